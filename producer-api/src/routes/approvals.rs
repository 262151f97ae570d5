//! Approvals: approve / reject a step, the caller's pending inbox, bulk decisions.
//!
//! A decision is checked against the current state (so a wrong one is refused at once with its
//! own error), then queued on the instance's ordered decision stream; the approval pool applies
//! it and this handler answers with the outcome.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use workflow_core::instance::Verdict;
use workflow_core::machine::{check_decision, may_decide, Decider, Proposal};
use workflow_core::validate::parse_duration_ms;
use workflow_core::Timestamp;
use workflow_engine::DecisionResult;
use workflow_store::{InstanceRecord, WaitingFilter};

use crate::auth::Caller;
use crate::error::{refusal, ApiError, ErrorBody};
use crate::extract::{parse_json, JsonBody, Params, RawBody};
use crate::views::{rfc3339, InstanceBody, InstanceView, Page};
use crate::AppState;

const MAX_COMMENT: usize = 2000;

/// A template version's name and its parsed form.
type NamedTemplate = (String, Arc<workflow_core::Template>);

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DecisionBody {
    pub comment: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DecisionView {
    /// `approved` or `rejected`: what this call recorded.
    pub decision: String,
    #[schema(value_type = InstanceView)]
    pub instance: InstanceBody,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PendingDecisionView {
    pub decision_id: String,
    /// Queued on the instance's decision stream, not yet applied; it will be, in order.
    pub status: String,
}

fn decider(caller: &Caller) -> Decider {
    Decider {
        actor: caller.actor.clone(),
        roles: caller.roles.clone(),
    }
}

fn verdict_text(v: Verdict) -> &'static str {
    match v {
        Verdict::Approve => "approved",
        Verdict::Reject => "rejected",
    }
}

fn check_comment(comment: &Option<String>, path: &str) -> Result<(), ApiError> {
    match comment {
        Some(c) if c.chars().count() > MAX_COMMENT => Err(ApiError::invalid(
            path,
            format!("must be at most {MAX_COMMENT} characters"),
        )),
        _ => Ok(()),
    }
}

/// One decision, start to outcome, as the single and the bulk endpoints both make it.
async fn decide(
    state: &AppState,
    caller: &Caller,
    instance_id: &str,
    step: &str,
    verdict: Verdict,
    comment: Option<String>,
) -> Result<Response, ApiError> {
    let index: usize = step
        .parse()
        .map_err(|_| refusal("step_not_found", format!("step `{step}` does not exist")))?;
    let result = state
        .engine
        .submit_decision(
            &caller.partner_id,
            instance_id,
            index,
            &decider(caller),
            verdict,
            comment,
            state.config.decision_wait,
        )
        .await?;
    match result {
        DecisionResult::Accepted(rec) => {
            let instance = super::instances::view(state, *rec).await;
            Ok(Json(DecisionView {
                decision: verdict_text(verdict).to_string(),
                instance,
            })
            .into_response())
        }
        DecisionResult::Refused { code, message } => Err(refusal(&code, message)),
        DecisionResult::Pending { decision_id } => Ok((
            StatusCode::ACCEPTED,
            Json(PendingDecisionView {
                decision_id,
                status: "pending".into(),
            }),
        )
            .into_response()),
    }
}

async fn single(
    state: AppState,
    caller: Caller,
    id: String,
    step: String,
    body: axum::body::Bytes,
    verdict: Verdict,
) -> Result<Response, ApiError> {
    let body: DecisionBody = if body.iter().all(u8::is_ascii_whitespace) {
        DecisionBody::default()
    } else {
        parse_json(&body)?
    };
    check_comment(&body.comment, "$.comment")?;
    decide(&state, &caller, &id, &step, verdict, body.comment).await
}

/// Approve step `n` (0-based) of an instance.
#[utoipa::path(post, path = "/v1/workflows/instances/{id}/steps/{n}/approve", tag = "approvals",
    params(("id" = String, Path), ("n" = usize, Path, description = "0-based step index")),
    request_body(content = Option<DecisionBody>),
    responses((status = 200, body = DecisionView),
        (status = 202, description = "queued; not applied within the wait", body = PendingDecisionView),
        (status = 403, description = "not an eligible approver, a separation-of-duties rule, or an agent outside its limit", body = crate::error::ErrorResponse),
        (status = 404, body = crate::error::ErrorResponse),
        (status = 409, description = "not an approval step, not waiting, or already decided by this actor", body = crate::error::ErrorResponse)),
    security(("api_key" = [])))]
pub async fn approve(
    caller: Caller,
    State(state): State<AppState>,
    Path((id, step)): Path<(String, String)>,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    single(state, caller, id, step, body, Verdict::Approve).await
}

/// Reject step `n` (0-based) of an instance: the instance ends as `rejected`.
#[utoipa::path(post, path = "/v1/workflows/instances/{id}/steps/{n}/reject", tag = "approvals",
    params(("id" = String, Path), ("n" = usize, Path, description = "0-based step index")),
    request_body(content = Option<DecisionBody>),
    responses((status = 200, body = DecisionView), (status = 202, body = PendingDecisionView),
        (status = 403, body = crate::error::ErrorResponse), (status = 404, body = crate::error::ErrorResponse),
        (status = 409, body = crate::error::ErrorResponse), (status = 422, body = crate::error::ErrorResponse)),
    security(("api_key" = [])))]
pub async fn reject(
    caller: Caller,
    State(state): State<AppState>,
    Path((id, step)): Path<(String, String)>,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    single(state, caller, id, step, body, Verdict::Reject).await
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TriggerSummary {
    #[schema(value_type = Object)]
    pub amount: Option<Value>,
    pub currency: Option<String>,
    pub requester: Option<String>,
}

/// One approval the caller may decide now.
#[derive(Debug, Serialize, ToSchema)]
pub struct PendingItem {
    pub instance_id: String,
    pub template_id: String,
    pub template_name: String,
    pub template_version: i64,
    pub step_index: usize,
    pub step_name: String,
    pub trigger: TriggerSummary,
    /// Who started the instance.
    pub started_by: String,
    pub waiting_since: String,
    pub due_at: Option<String>,
    /// False when the caller may only reject (an agent outside its approval limit).
    pub may_approve: bool,
}

fn amount_of(trigger: &Value) -> Option<f64> {
    trigger.get("amount").and_then(Value::as_f64)
}

/// Waiting steps the inbox reads per statement while it fills a page.
const SCAN_BATCH: u32 = 200;

/// Every approval the caller may decide now, across instances, oldest first.
#[utoipa::path(get, path = "/v1/workflows/pending", tag = "approvals",
    params(("template_id" = Option<String>, Query), ("min_amount" = Option<f64>, Query),
        ("max_amount" = Option<f64>, Query),
        ("older_than" = Option<String>, Query, description = "a duration such as 30m, 2h, 1d"),
        ("limit" = Option<u32>, Query), ("cursor" = Option<String>, Query)),
    responses((status = 200, body = Page<PendingItem>)),
    security(("api_key" = [])))]
pub async fn pending(
    caller: Caller,
    State(state): State<AppState>,
    mut params: Params,
) -> Result<Json<Page<PendingItem>>, ApiError> {
    let number = |s: &str| s.parse::<f64>().ok().filter(|f| f.is_finite());
    let template_id = params.take("template_id");
    let min_amount = params.take_parsed("min_amount", number, "a number")?;
    let max_amount = params.take_parsed("max_amount", number, "a number")?;
    let older_than = params.take_parsed(
        "older_than",
        parse_duration_ms,
        "a duration such as 30m or 2h",
    )?;
    let (limit, cursor) = params.page(state.config.max_page_size)?;
    params.finish()?;
    let after = match cursor {
        None => None,
        Some(c) => Some(
            parse_cursor(&c)
                .ok_or_else(|| ApiError::invalid("cursor", "not a cursor this endpoint issued"))?,
        ),
    };
    let now = state.engine.clock().now();
    let mut scan = WaitingFilter {
        template_id,
        waiting_since_at_most: older_than.map(|ms| now.plus_millis(-ms)),
        after,
        limit: SCAN_BATCH,
    };
    let store = state.engine.store();
    let who = decider(&caller);
    let mut names: HashMap<(String, i64), Option<NamedTemplate>> = HashMap::new();
    let mut items = Vec::new();
    let mut next_cursor = None;
    'scan: loop {
        let batch = store
            .list_waiting_approvals(&caller.partner_id, &scan)
            .await?;
        let exhausted = batch.len() < SCAN_BATCH as usize;
        // What the waiting step alone rules out (the amount, approvers that never name the
        // caller) is ruled out before any instance is read.
        let mut candidates = Vec::new();
        for w in &batch {
            scan.after = Some((w.since, w.instance_id.clone()));
            let amount = amount_of(&w.trigger);
            if min_amount.is_some_and(|m| amount.is_none_or(|a| a < m))
                || max_amount.is_some_and(|m| amount.is_none_or(|a| a > m))
            {
                continue;
            }
            let key = (w.template_id.clone(), w.template_version);
            if !names.contains_key(&key) {
                let parsed = store
                    .get_template_version(&caller.partner_id, &key.0, key.1)
                    .await?
                    .and_then(|rec| {
                        state
                            .engine
                            .parsed(&rec)
                            .ok()
                            .map(|t| (rec.name.clone(), t))
                    });
                names.insert(key.clone(), parsed);
            }
            if let Some(Some((_, template))) = names.get(&key) {
                if may_decide(template, w.step_index as usize, &who) {
                    candidates.push(w);
                }
            }
        }
        // Read in slices of what the page still lacks: most candidates pass the full check.
        let mut instances: HashMap<String, InstanceRecord> = HashMap::new();
        let mut read = 0;
        for (i, w) in candidates.iter().copied().enumerate() {
            if i == read {
                let want = (limit as usize).saturating_sub(items.len()).max(1);
                let ids: Vec<&str> = candidates[i..]
                    .iter()
                    .take(want)
                    .map(|w| w.instance_id.as_str())
                    .collect();
                read += ids.len();
                instances.extend(
                    store
                        .get_instances(&caller.partner_id, &ids)
                        .await?
                        .into_iter()
                        .map(|rec| (rec.info.id.clone(), rec)),
                );
            }
            // Not read back: not the caller's partner's (the scan keeps to it, so never).
            let Some(instance) = instances.get(&w.instance_id) else {
                continue;
            };
            let info = &instance.info;
            let key = (info.template_id.clone(), info.template_version);
            let Some(Some((name, template))) = names.get(&key) else {
                continue;
            };
            let index = w.step_index as usize;
            let limits = &state.engine.limits().expr;
            // A comment is given so that a rejection's comment requirement hides nothing.
            let can = |verdict: Verdict| {
                let proposal = Proposal {
                    index,
                    decider: &who,
                    verdict,
                    comment: Some("-"),
                };
                check_decision(template, info, &instance.state, &proposal, limits).is_ok()
            };
            let may_approve = can(Verdict::Approve);
            if !may_approve && !can(Verdict::Reject) {
                continue;
            }
            let text = |k: &str| {
                info.trigger
                    .get(k)
                    .and_then(Value::as_str)
                    .map(str::to_string)
            };
            items.push(PendingItem {
                instance_id: info.id.clone(),
                template_id: info.template_id.clone(),
                template_name: name.clone(),
                template_version: info.template_version,
                step_index: index,
                step_name: template
                    .steps
                    .get(index)
                    .map(|s| s.name.clone())
                    .unwrap_or_default(),
                trigger: TriggerSummary {
                    amount: info.trigger.get("amount").cloned(),
                    currency: text("currency"),
                    requester: text("requester"),
                },
                started_by: info.created_by.id.clone(),
                waiting_since: rfc3339(w.since),
                due_at: instance
                    .state
                    .waiting_on
                    .as_ref()
                    .and_then(|x| x.due)
                    .map(rfc3339),
                may_approve,
            });
            if items.len() as u32 >= limit {
                next_cursor = Some(format!("{}:{}", w.since.0, info.id));
                break 'scan;
            }
        }
        if exhausted {
            break;
        }
    }
    Ok(Json(Page {
        data: items,
        next_cursor,
    }))
}

fn parse_cursor(c: &str) -> Option<(Timestamp, String)> {
    let (ms, id) = c.split_once(':')?;
    Some((Timestamp(ms.parse().ok()?), id.to_string()))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkItem {
    pub instance_id: String,
    pub step: usize,
    /// `approve` or `reject`.
    pub decision: String,
    pub comment: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkBody {
    pub decisions: Vec<BulkItem>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BulkResult {
    pub index: usize,
    pub instance_id: String,
    pub step: usize,
    /// The HTTP status the single endpoint would have answered.
    pub status: u16,
    pub decision: Option<String>,
    pub instance_status: Option<String>,
    pub error: Option<ErrorBody>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BulkResponse {
    pub results: Vec<BulkResult>,
    pub succeeded: usize,
    pub failed: usize,
}

/// Many decisions in one call; each succeeds or fails on its own.
#[utoipa::path(post, path = "/v1/workflows/approvals/bulk", tag = "approvals",
    request_body = BulkBody,
    responses((status = 200, body = BulkResponse), (status = 422, body = crate::error::ErrorResponse)),
    security(("api_key" = [])))]
pub async fn bulk(
    caller: Caller,
    State(state): State<AppState>,
    JsonBody(body): JsonBody<BulkBody>,
) -> Result<Json<BulkResponse>, ApiError> {
    let max = state.config.max_bulk_decisions;
    if body.decisions.is_empty() || body.decisions.len() > max {
        return Err(ApiError::invalid(
            "$.decisions",
            format!("must hold 1 to {max} decisions"),
        ));
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (index, item) in body.decisions.into_iter().enumerate() {
        let (state, caller) = (state.clone(), caller.clone());
        tasks.spawn(async move {
            let result = bulk_one(&state, &caller, index, &item).await;
            let (status, decision, instance_status, error) = match result {
                Ok((decision, status)) => (200, Some(decision), Some(status), None),
                Err(e) => (
                    e.status.as_u16(),
                    None,
                    None,
                    Some(ErrorBody {
                        code: e.code.to_string(),
                        message: e.message,
                        details: e.details,
                    }),
                ),
            };
            BulkResult {
                index,
                instance_id: item.instance_id,
                step: item.step,
                status,
                decision,
                instance_status,
                error,
            }
        });
    }
    let mut results = Vec::new();
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(r) => results.push(r),
            Err(e) => tracing::error!(error = %e, "bulk decision task failed"),
        }
    }
    results.sort_by_key(|r| r.index);
    let succeeded = results.iter().filter(|r| r.status == 200).count();
    Ok(Json(BulkResponse {
        failed: results.len() - succeeded,
        succeeded,
        results,
    }))
}

async fn bulk_one(
    state: &AppState,
    caller: &Caller,
    index: usize,
    item: &BulkItem,
) -> Result<(String, String), ApiError> {
    let path = format!("$.decisions[{index}]");
    let verdict = match item.decision.as_str() {
        "approve" => Verdict::Approve,
        "reject" => Verdict::Reject,
        _ => {
            return Err(ApiError::invalid(
                format!("{path}.decision"),
                "must be `approve` or `reject`",
            ))
        }
    };
    check_comment(&item.comment, &format!("{path}.comment"))?;
    let result = state
        .engine
        .submit_decision(
            &caller.partner_id,
            &item.instance_id,
            item.step,
            &decider(caller),
            verdict,
            item.comment.clone(),
            state.config.decision_wait,
        )
        .await?;
    match result {
        DecisionResult::Accepted(rec) => Ok((
            verdict_text(verdict).to_string(),
            rec.state.status.as_str().to_string(),
        )),
        DecisionResult::Refused { code, message } => Err(refusal(&code, message)),
        DecisionResult::Pending { decision_id } => Err(ApiError::new(
            StatusCode::ACCEPTED,
            "pending",
            format!("decision {decision_id} is queued and not yet applied"),
        )),
    }
}
