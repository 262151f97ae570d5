//! /v1/workflows/reports/instances: the partner's instances as CSV (spec story 29.11's
//! reporting), one row per instance with its outcome, timings, trigger summary, who decided
//! each approval and what it waits on, for finance and compliance tools.
//!
//! The same filters as the instance list; newest first; at most `limit` rows a call, their
//! count in `x-row-count` and the cursor of the next call in `x-next-cursor`. Text cells that
//! a spreadsheet would run as a formula (starting with `=`, `+`, `-`, `@`, tab or CR) are
//! prefixed with `'`: trigger data comes from partners' systems, and a report must not run it.

use axum::extract::State;
use axum::http::header::{CONTENT_DISPOSITION, CONTENT_TYPE};
use axum::http::{HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use workflow_core::instance::Verdict;
use workflow_store::records::{InstanceFilter, InstanceRecord};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::Params;
use crate::views::rfc3339;
use crate::AppState;

/// Rows per call unless `limit` says otherwise, and the most it may say.
const DEFAULT_ROWS: u32 = 10_000;
const MAX_ROWS: u32 = 100_000;
/// Instances read per statement while a report fills.
const READ_BATCH: u32 = 500;

const COLUMNS: [&str; 16] = [
    "instance_id",
    "template_id",
    "template_version",
    "mode",
    "status",
    "created_at",
    "finished_at",
    "duration_ms",
    "created_by",
    "trigger_id",
    "amount",
    "currency",
    "current_step",
    "waiting_on",
    "decisions",
    "error",
];

/// The partner's instances as CSV, newest first.
#[utoipa::path(get, path = "/v1/workflows/reports/instances", tag = "reports",
    params(("status" = Option<String>, Query), ("template_id" = Option<String>, Query),
        ("created_from" = Option<String>, Query, description = "RFC 3339, inclusive"),
        ("created_to" = Option<String>, Query, description = "RFC 3339, inclusive"),
        ("limit" = Option<u32>, Query, description = "rows, 1 to 100,000 (default 10,000)"),
        ("cursor" = Option<String>, Query, description = "the previous call's x-next-cursor")),
    responses((status = 200, description = "text/csv, a header row then one row per instance", content_type = "text/csv"),
        (status = 422, body = crate::error::ErrorResponse)),
    security(("api_key" = [])))]
pub async fn instances(
    caller: Caller,
    State(state): State<AppState>,
    mut params: Params,
) -> Result<Response, ApiError> {
    let filter = super::instances::take_filter(&mut params)?;
    let limit = params
        .take_parsed("limit", |s| s.parse::<u32>().ok(), "an integer")?
        .unwrap_or(DEFAULT_ROWS);
    if limit == 0 || limit > MAX_ROWS {
        return Err(ApiError::invalid(
            "limit",
            format!("must be between 1 and {MAX_ROWS}"),
        ));
    }
    let mut cursor = params.take("cursor");
    params.finish()?;

    let mut csv = String::new();
    push_row(&mut csv, COLUMNS.iter().map(|c| Cell::Plain(c.to_string())));
    let mut written = 0u32;
    let mut next_cursor = None;
    while written < limit {
        let want = READ_BATCH.min(limit - written);
        let page = InstanceFilter {
            before_id: cursor.clone(),
            limit: want,
            ..filter.clone()
        };
        let batch = state
            .engine
            .store()
            .list_instances(&caller.partner_id, &page)
            .await?;
        for rec in &batch {
            push_row(&mut csv, row(rec));
        }
        written += batch.len() as u32;
        cursor = batch.last().map(|r| r.info.id.clone());
        if (batch.len() as u32) < want {
            break;
        }
        if written == limit {
            next_cursor = cursor.clone();
        }
    }

    let mut response = (
        [
            (
                CONTENT_TYPE,
                HeaderValue::from_static("text/csv; charset=utf-8"),
            ),
            (
                CONTENT_DISPOSITION,
                HeaderValue::from_static("attachment; filename=\"workflow-instances.csv\""),
            ),
        ],
        csv,
    )
        .into_response();
    response.headers_mut().insert(
        HeaderName::from_static("x-row-count"),
        HeaderValue::from(written),
    );
    if let Some(next) = next_cursor.and_then(|c| HeaderValue::from_str(&c).ok()) {
        response
            .headers_mut()
            .insert(HeaderName::from_static("x-next-cursor"), next);
    }
    Ok(response)
}

/// A cell: text from the data (guarded against formulas) or a value we wrote ourselves.
enum Cell {
    Text(String),
    Plain(String),
}

fn row(rec: &InstanceRecord) -> Vec<Cell> {
    let info = &rec.info;
    let state = &rec.state;
    let trigger = info.trigger.as_ref();
    let duration = state
        .finished_at
        .map(|end| (end.0 - info.created_at.0).to_string());
    let decisions: Vec<String> = state
        .steps
        .iter()
        .flat_map(|step| {
            step.decisions.iter().map(move |d| {
                let verdict = match d.verdict {
                    Verdict::Approve => "approved",
                    Verdict::Reject => "rejected",
                };
                format!(
                    "step {} {} by {} at {}",
                    step.index,
                    verdict,
                    d.actor.id,
                    rfc3339(d.at)
                )
            })
        })
        .collect();
    vec![
        Cell::Plain(info.id.clone()),
        Cell::Text(info.template_id.clone()),
        Cell::Plain(info.template_version.to_string()),
        Cell::Plain(info.mode.as_str().to_string()),
        Cell::Plain(state.status.as_str().to_string()),
        Cell::Plain(rfc3339(info.created_at)),
        Cell::Plain(state.finished_at.map(rfc3339).unwrap_or_default()),
        Cell::Plain(duration.unwrap_or_default()),
        Cell::Text(info.created_by.id.clone()),
        Cell::Text(scalar(trigger.get("id"))),
        Cell::Plain(number(trigger.get("amount"))),
        Cell::Text(scalar(trigger.get("currency"))),
        Cell::Plain(
            state
                .current_step
                .map(|s| s.to_string())
                .unwrap_or_default(),
        ),
        Cell::Text(
            state
                .waiting_on
                .as_ref()
                .map(|w| w.description.clone())
                .unwrap_or_default(),
        ),
        Cell::Text(decisions.join("; ")),
        Cell::Text(state.error.clone().unwrap_or_default()),
    ]
}

/// A trigger field as text: strings as they are, other scalars as JSON, absent as empty.
fn scalar(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// A number, or empty when the field is absent or not a number (never text: this column is
/// summed by spreadsheets).
fn number(v: Option<&Value>) -> String {
    match v {
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    }
}

fn push_row(out: &mut String, cells: impl IntoIterator<Item = Cell>) {
    for (i, cell) in cells.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let (text, guard) = match &cell {
            Cell::Text(s) => (s.as_str(), s.starts_with(['=', '+', '-', '@', '\t', '\r'])),
            Cell::Plain(s) => (s.as_str(), false),
        };
        push_cell(out, text, guard);
    }
    out.push_str("\r\n");
}

/// RFC 4180: quote a cell holding a comma, quote or line break, doubling its quotes.
fn push_cell(out: &mut String, text: &str, guard: bool) {
    let quote = guard || text.contains([',', '"', '\n', '\r']);
    if quote {
        out.push('"');
    }
    if guard {
        out.push('\'');
    }
    for c in text.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    if quote {
        out.push('"');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(cells: Vec<Cell>) -> String {
        let mut out = String::new();
        push_row(&mut out, cells);
        out
    }

    #[test]
    fn cells_are_quoted_as_rfc_4180_says() {
        let got = line(vec![
            Cell::Text("plain".into()),
            Cell::Text("a,b".into()),
            Cell::Text("say \"hi\"".into()),
            Cell::Text("two\nlines".into()),
            Cell::Plain(String::new()),
        ]);
        assert_eq!(got, "plain,\"a,b\",\"say \"\"hi\"\"\",\"two\nlines\",\r\n");
    }

    #[test]
    fn text_that_a_spreadsheet_would_run_is_defused() {
        let got = line(vec![
            Cell::Text("=HYPERLINK(\"x\")".into()),
            Cell::Text("+1".into()),
            Cell::Text("@SUM(A1)".into()),
            Cell::Plain("-12.5".into()),
        ]);
        assert_eq!(
            got,
            "\"'=HYPERLINK(\"\"x\"\")\",\"'+1\",\"'@SUM(A1)\",-12.5\r\n"
        );
    }

    #[test]
    fn amounts_are_numbers_or_nothing() {
        assert_eq!(number(Some(&serde_json::json!(12.5))), "12.5");
        assert_eq!(number(Some(&serde_json::json!("=1+1"))), "");
        assert_eq!(number(None), "");
        assert_eq!(scalar(Some(&serde_json::json!(true))), "true");
        assert_eq!(scalar(Some(&Value::Null)), "");
    }
}
