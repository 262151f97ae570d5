//! What the API answers: response documents built from store records.
//!
//! Times are RFC 3339 (UTC) strings; ids are UUIDv7 strings, so newest-first order is id order.

use std::borrow::Cow;
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;
use utoipa::openapi::{RefOr, Schema};
use utoipa::{PartialSchema, ToSchema};
use workflow_core::instance::{ActorRef, StepExecution, WaitingOn};
use workflow_core::{Template, Timestamp};
use workflow_store::records::{AuditRecord, InstanceRecord, TemplateRecord};

pub fn rfc3339(t: Timestamp) -> String {
    t.rfc3339().unwrap_or_default()
}

/// Parse an RFC 3339 time from a client.
pub fn parse_rfc3339(s: &str) -> Option<Timestamp> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|d| Timestamp(d.timestamp_millis()))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Page<T: ToSchema> {
    pub data: Vec<T>,
    /// Pass as `cursor` to get the next page; null on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ActorView {
    pub id: String,
    #[serde(rename = "type")]
    pub actor_type: String,
}

impl From<&ActorRef> for ActorView {
    fn from(a: &ActorRef) -> Self {
        ActorView {
            id: a.id.clone(),
            actor_type: a.actor_type.as_str().to_string(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TemplateVersionView {
    pub version: i64,
    pub created_at: String,
    pub created_by: String,
    /// The template document of this version, as submitted.
    #[schema(value_type = Object)]
    pub definition: Value,
}

impl TemplateVersionView {
    pub fn new(v: &TemplateRecord) -> TemplateVersionView {
        TemplateVersionView {
            version: v.version,
            created_at: rfc3339(v.created_at),
            created_by: v.created_by.clone(),
            definition: v.doc.clone(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TemplateView {
    pub id: String,
    pub version: i64,
    pub name: String,
    pub trigger_type: String,
    pub active: bool,
    pub step_count: usize,
    pub created_at: String,
    pub created_by: String,
    #[schema(value_type = Object)]
    pub definition: Value,
    /// Every version, oldest first (GET one only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub versions: Option<Vec<TemplateVersionView>>,
}

impl TemplateView {
    pub fn new(rec: &TemplateRecord, versions: Option<&[TemplateRecord]>) -> TemplateView {
        TemplateView {
            id: rec.id.clone(),
            version: rec.version,
            name: rec.name.clone(),
            trigger_type: rec.trigger_type.clone(),
            active: rec.active,
            step_count: rec
                .doc
                .get("steps")
                .and_then(Value::as_array)
                .map_or(0, Vec::len),
            created_at: rfc3339(rec.created_at),
            created_by: rec.created_by.clone(),
            definition: rec.doc.clone(),
            versions: versions.map(|vs| vs.iter().map(TemplateVersionView::new).collect()),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WaitingOnView<'a> {
    pub step_index: usize,
    pub kind: &'a str,
    pub description: &'a str,
    pub since: String,
    pub due: Option<String>,
    #[schema(value_type = Object)]
    pub detail: &'a Value,
}

impl<'a> From<&'a WaitingOn> for WaitingOnView<'a> {
    fn from(w: &'a WaitingOn) -> Self {
        WaitingOnView {
            step_index: w.step_index,
            kind: &w.kind,
            description: &w.description,
            since: rfc3339(w.since),
            due: w.due.map(rfc3339),
            detail: &w.detail,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CurrentStepView<'a> {
    pub index: usize,
    pub name: &'a str,
    #[serde(rename = "type")]
    pub step_type: &'a str,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StepExecutionView<'a> {
    pub index: usize,
    pub name: &'a str,
    #[serde(rename = "type")]
    pub step_type: &'a str,
    pub status: &'a str,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub actor: Option<ActorView>,
    /// The step's config with placeholders rendered, as it ran.
    #[schema(value_type = Object)]
    pub input: Option<&'a Value>,
    #[schema(value_type = Object)]
    pub output: Option<&'a Value>,
    pub error: Option<&'a str>,
}

impl<'a> From<&'a StepExecution> for StepExecutionView<'a> {
    fn from(s: &'a StepExecution) -> Self {
        StepExecutionView {
            index: s.index,
            name: &s.name,
            step_type: s.step_type.as_str(),
            status: s.status.as_str(),
            started_at: s.started_at.map(rfc3339),
            finished_at: s.finished_at.map(rfc3339),
            actor: s.actor.as_ref().map(ActorView::from),
            input: s.input.as_deref(),
            output: s.output.as_deref(),
            error: s.error.as_deref(),
        }
    }
}

// It borrows from the record it shows: a view is built and serialized in one go
// ([`InstanceBody`]), so answering copies no step input or output. (A comment, not a doc
// comment: that would become the schema's description.)
#[derive(Debug, Serialize, ToSchema)]
pub struct InstanceView<'a> {
    pub id: &'a str,
    pub template_id: &'a str,
    pub template_version: i64,
    pub status: &'a str,
    /// `live`, or `simulate`: transfer actions went to the simulation endpoint.
    pub mode: &'a str,
    /// The step the instance is at; null once it finished.
    pub current_step: Option<CurrentStepView<'a>>,
    /// What it waits for, since when, due when: "who is blocking this workflow?"
    pub waiting_on: Option<WaitingOnView<'a>>,
    #[schema(value_type = Object)]
    pub trigger: &'a Value,
    pub idempotency_key: Option<&'a str>,
    pub created_by: ActorView,
    pub created_at: String,
    pub updated_at: String,
    pub finished_at: Option<String>,
    pub error: Option<&'a str>,
    pub steps: Vec<StepExecutionView<'a>>,
}

impl<'a> InstanceView<'a> {
    pub fn new(rec: &'a InstanceRecord, template: Option<&'a Template>) -> InstanceView<'a> {
        let state = &rec.state;
        let current_step = state.current_step.map(|index| {
            let step = template.and_then(|t| t.steps.get(index));
            let exec = state.execution(index);
            CurrentStepView {
                index,
                name: step
                    .map(|s| s.name.as_str())
                    .or_else(|| exec.map(|e| e.name.as_str()))
                    .unwrap_or_default(),
                step_type: step
                    .map(|s| s.kind.step_type().as_str())
                    .or_else(|| exec.map(|e| e.step_type.as_str()))
                    .unwrap_or_default(),
            }
        });
        InstanceView {
            id: &rec.info.id,
            template_id: &rec.info.template_id,
            template_version: rec.info.template_version,
            status: state.status.as_str(),
            mode: rec.info.mode.as_str(),
            current_step,
            waiting_on: state.waiting_on.as_ref().map(WaitingOnView::from),
            trigger: &rec.info.trigger,
            idempotency_key: rec.idempotency_key.as_deref(),
            created_by: ActorView::from(&rec.info.created_by),
            created_at: rfc3339(rec.info.created_at),
            updated_at: rfc3339(rec.updated_at),
            finished_at: state.finished_at.map(rfc3339),
            error: state.error.as_deref(),
            steps: state.steps.iter().map(StepExecutionView::from).collect(),
        }
    }
}

/// An instance record and its template version (for the current step's name), answered as
/// an [`InstanceView`] built while it is serialized. Its schema is the view's.
#[derive(Debug)]
pub struct InstanceBody {
    pub rec: InstanceRecord,
    pub template: Option<Arc<Template>>,
}

impl Serialize for InstanceBody {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        InstanceView::new(&self.rec, self.template.as_deref()).serialize(serializer)
    }
}

impl PartialSchema for InstanceBody {
    fn schema() -> RefOr<Schema> {
        <InstanceView<'static> as PartialSchema>::schema()
    }
}

impl ToSchema for InstanceBody {
    fn name() -> Cow<'static, str> {
        <InstanceView<'static> as ToSchema>::name()
    }

    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        <InstanceView<'static> as ToSchema>::schemas(schemas);
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditEventView {
    pub seq: i64,
    pub at: String,
    pub actor: ActorView,
    pub kind: String,
    #[schema(value_type = Object)]
    pub before: Value,
    #[schema(value_type = Object)]
    pub after: Value,
    pub reason: Option<String>,
    pub prev_hash: String,
    pub hash: String,
}

impl From<&AuditRecord> for AuditEventView {
    fn from(r: &AuditRecord) -> Self {
        AuditEventView {
            seq: r.seq,
            at: rfc3339(r.at),
            actor: ActorView::from(&r.actor),
            kind: r.kind.clone(),
            before: r.before.clone(),
            after: r.after.clone(),
            reason: r.reason.clone(),
            prev_hash: r.prev_hash.clone(),
            hash: r.hash.clone(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChainView {
    /// True when every event's hash matches its content and its predecessor.
    pub verified: bool,
    pub events: usize,
    pub problem: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventsView {
    pub data: Vec<AuditEventView>,
    pub chain: ChainView,
}

/// The result of one item of `POST /v1/workflows/instances/batch`.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchItemResult {
    /// The item's position in the request (0-based).
    pub index: usize,
    /// What the single endpoint would have answered: 201 created, 200 idempotent replay, or
    /// the status of `error`.
    pub status: u16,
    /// The instance, when it was created or replayed.
    #[schema(value_type = Option<InstanceView>)]
    pub instance: Option<InstanceBody>,
    /// Why the item failed; its details' paths start with `$.items[<index>]`.
    pub error: Option<crate::error::ErrorBody>,
}

/// The answer of `POST /v1/workflows/instances/batch`: a result per item, in request order.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchStartResponse {
    pub results: Vec<BatchItemResult>,
    pub created: usize,
    pub replayed: usize,
    pub failed: usize,
}
