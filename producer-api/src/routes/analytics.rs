//! /v1/workflows/analytics: how the partner's workflows perform (spec story 29.11): instances
//! by template and status, completion rates and durations, and the steps that hold instances
//! up (how many wait at each, and since when).

use std::collections::{BTreeMap, HashMap};

use axum::extract::State;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;
use workflow_core::instance::StepStatus;
use workflow_core::{InstanceStatus, Timestamp};
use workflow_store::records::TemplateFilter;
use workflow_store::{AnalyticsFilter, DurationTotals, InstanceAggregate, StepAggregate};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::Params;
use crate::views::{parse_rfc3339, rfc3339};
use crate::AppState;

/// Count, mean and maximum of a set of durations, in milliseconds (`avg` and `max` are null
/// when there are none).
#[derive(Debug, Clone, Default, PartialEq, Serialize, ToSchema)]
pub struct DurationView {
    pub count: i64,
    pub avg: Option<f64>,
    pub max: Option<i64>,
}

/// Instances of one template, or of all of them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, ToSchema)]
pub struct InstanceStatsView {
    pub instances: i64,
    /// Every instance status, zero included.
    pub by_status: BTreeMap<&'static str, i64>,
    /// Completed over terminal (completed, rejected, failed, cancelled); null before any ended.
    pub completion_rate: Option<f64>,
    /// Creation to end, over the terminal instances.
    pub duration_ms: DurationView,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct TemplateStatsView {
    pub template_id: String,
    /// The template's name at its latest version (null if the template is gone).
    pub name: Option<String>,
    #[serde(flatten)]
    pub stats: InstanceStatsView,
}

/// The executions still in flight at a step: how many, and since when the oldest.
#[derive(Debug, Clone, Default, PartialEq, Serialize, ToSchema)]
pub struct InFlightView {
    pub count: i64,
    pub oldest_since: Option<String>,
}

/// One step of one template, over every instance that reached it.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct StepStatsView {
    pub template_id: String,
    pub step_index: i64,
    pub name: String,
    pub step_type: String,
    pub executions: i64,
    /// Every step status, zero included.
    pub by_status: BTreeMap<&'static str, i64>,
    /// Start to finish, over the executions that finished.
    pub duration_ms: DurationView,
    /// Pending, running or waiting now: the bottlenecks.
    pub waiting: InFlightView,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct AnalyticsView {
    pub template_id: Option<String>,
    pub created_from: Option<String>,
    pub created_to: Option<String>,
    pub totals: InstanceStatsView,
    /// One entry per template with instances in range, by template id.
    pub templates: Vec<TemplateStatsView>,
    /// One entry per step (index, name and type) of those templates.
    pub steps: Vec<StepStatsView>,
}

/// The partner's workflow analytics, optionally for one template and a creation range.
#[utoipa::path(get, path = "/v1/workflows/analytics", tag = "analytics",
    params(("template_id" = Option<String>, Query),
        ("created_from" = Option<String>, Query, description = "RFC 3339, inclusive"),
        ("created_to" = Option<String>, Query, description = "RFC 3339, inclusive")),
    responses((status = 200, body = AnalyticsView),
        (status = 404, description = "no such template", body = crate::error::ErrorResponse),
        (status = 422, body = crate::error::ErrorResponse)),
    security(("api_key" = [])))]
pub async fn analytics(
    caller: Caller,
    State(state): State<AppState>,
    mut params: Params,
) -> Result<Json<AnalyticsView>, ApiError> {
    let template_id = params.take("template_id");
    let created_from = params.take_parsed("created_from", parse_rfc3339, "an RFC 3339 time")?;
    let created_to = params.take_parsed("created_to", parse_rfc3339, "an RFC 3339 time")?;
    params.finish()?;
    let store = state.engine.store();
    if let Some(id) = &template_id {
        if store.get_template(&caller.partner_id, id).await?.is_none() {
            return Err(ApiError::not_found("template", id));
        }
    }
    let filter = AnalyticsFilter {
        template_id: template_id.clone(),
        created_from,
        created_to,
    };
    let found = store.analytics(&caller.partner_id, &filter).await?;
    let names: HashMap<String, String> = store
        .list_templates(&caller.partner_id, &TemplateFilter::default())
        .await?
        .into_iter()
        .map(|t| (t.id, t.name))
        .collect();
    Ok(Json(AnalyticsView {
        template_id,
        created_from: created_from.map(rfc3339),
        created_to: created_to.map(rfc3339),
        totals: instance_stats(found.instances.iter()),
        templates: templates(&found.instances, &names),
        steps: steps(&found.steps),
    }))
}

fn templates(
    rows: &[InstanceAggregate],
    names: &HashMap<String, String>,
) -> Vec<TemplateStatsView> {
    // The rows come ordered by template id, so each template's rows are adjacent.
    rows.chunk_by(|a, b| a.template_id == b.template_id)
        .map(|group| TemplateStatsView {
            template_id: group[0].template_id.clone(),
            name: names.get(&group[0].template_id).cloned(),
            stats: instance_stats(group.iter()),
        })
        .collect()
}

fn instance_stats<'a>(rows: impl Iterator<Item = &'a InstanceAggregate>) -> InstanceStatsView {
    let mut by_status: BTreeMap<&'static str, i64> = InstanceStatus::ALL
        .iter()
        .map(|s| (s.as_str(), 0))
        .collect();
    let mut ended = DurationTotals::default();
    let mut instances = 0;
    for row in rows {
        instances += row.count;
        let Some(status) = InstanceStatus::parse(&row.status) else {
            continue;
        };
        *by_status.entry(status.as_str()).or_default() += row.count;
        if status.is_terminal() {
            add(&mut ended, &row.duration);
        }
    }
    let terminal: i64 = InstanceStatus::ALL
        .iter()
        .filter(|s| s.is_terminal())
        .map(|s| by_status.get(s.as_str()).copied().unwrap_or(0))
        .sum();
    let completed = by_status
        .get(InstanceStatus::Completed.as_str())
        .copied()
        .unwrap_or(0);
    InstanceStatsView {
        instances,
        by_status,
        completion_rate: (terminal > 0).then(|| completed as f64 / terminal as f64),
        duration_ms: duration_view(&ended),
    }
}

/// One step's figures while its rows are summed.
struct StepTotals {
    view: StepStatsView,
    finished: DurationTotals,
    oldest: Option<Timestamp>,
}

fn steps(rows: &[StepAggregate]) -> Vec<StepStatsView> {
    // Ordered by template, index, status, name: a step's rows (same template, index, name and
    // type) are not always adjacent when a later version renamed it, so group by key.
    let mut out: Vec<StepTotals> = Vec::new();
    let mut at: HashMap<(&str, i64, &str, &str), usize> = HashMap::new();
    for row in rows {
        let key = (
            row.template_id.as_str(),
            row.step_index,
            row.name.as_str(),
            row.step_type.as_str(),
        );
        let i = *at.entry(key).or_insert_with(|| {
            out.push(StepTotals {
                view: StepStatsView {
                    template_id: row.template_id.clone(),
                    step_index: row.step_index,
                    name: row.name.clone(),
                    step_type: row.step_type.clone(),
                    executions: 0,
                    by_status: StepStatus::ALL.iter().map(|s| (s.as_str(), 0)).collect(),
                    duration_ms: DurationView::default(),
                    waiting: InFlightView::default(),
                },
                finished: DurationTotals::default(),
                oldest: None,
            });
            out.len() - 1
        });
        let step = &mut out[i];
        step.view.executions += row.count;
        let Some(status) = StepStatus::ALL
            .into_iter()
            .find(|s| s.as_str() == row.status)
        else {
            continue;
        };
        *step.view.by_status.entry(status.as_str()).or_default() += row.count;
        match status {
            StepStatus::Pending | StepStatus::Running | StepStatus::Waiting => {
                step.view.waiting.count += row.count;
                step.oldest = match (step.oldest, row.oldest_started_at) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            _ => add(&mut step.finished, &row.duration),
        }
    }
    out.into_iter()
        .map(|mut step| {
            step.view.duration_ms = duration_view(&step.finished);
            step.view.waiting.oldest_since = step.oldest.map(rfc3339);
            step.view
        })
        .collect()
}

fn add(total: &mut DurationTotals, more: &DurationTotals) {
    total.count += more.count;
    total.sum_ms += more.sum_ms;
    total.max_ms = total.max_ms.max(more.max_ms);
}

fn duration_view(d: &DurationTotals) -> DurationView {
    DurationView {
        count: d.count,
        avg: (d.count > 0).then(|| d.sum_ms as f64 / d.count as f64),
        max: d.max_ms,
    }
}
