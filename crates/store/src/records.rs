//! The rows the store reads and writes, as plain Rust types.

use serde_json::Value;
use workflow_core::audit::{verify_chain, AuditContent, ChainError, ChainLink};
use workflow_core::instance::{ActorRef, ActorType, InstanceInfo};
use workflow_core::{InstanceState, InstanceStatus, Timestamp};

#[derive(Debug, Clone, PartialEq)]
pub struct PartnerRecord {
    pub id: String,
    pub name: String,
    pub created_at: Timestamp,
}

/// An API key's owner. The key itself is never stored, only its SHA-256.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiKeyRecord {
    /// Public identifier of the key (not secret), e.g. `key_...`.
    pub id: String,
    pub partner_id: String,
    pub actor_id: String,
    pub actor_type: ActorType,
    pub roles: Vec<String>,
    pub created_at: Timestamp,
}

/// One version of a template. Versions are immutable; `active` is per template (all versions).
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateRecord {
    pub id: String,
    pub partner_id: String,
    pub version: i64,
    pub name: String,
    pub trigger_type: String,
    pub active: bool,
    /// The document as submitted (validated).
    pub doc: Value,
    pub created_at: Timestamp,
    pub created_by: String,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct TemplateFilter {
    pub trigger_type: Option<String>,
    pub active: Option<bool>,
    /// Return templates whose id sorts before this one (ids are UUIDv7: newest first).
    pub before_id: Option<String>,
    pub limit: u32,
}

/// An instance row: immutable facts, the state document, and an optimistic-concurrency version.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceRecord {
    pub info: InstanceInfo,
    pub idempotency_key: Option<String>,
    pub state: InstanceState,
    pub updated_at: Timestamp,
    /// Incremented by every commit; a commit names the version it read.
    pub version: i64,
}

impl InstanceRecord {
    pub fn status(&self) -> InstanceStatus {
        self.state.status
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct InstanceFilter {
    pub status: Option<InstanceStatus>,
    pub template_id: Option<String>,
    pub created_from: Option<Timestamp>,
    pub created_to: Option<Timestamp>,
    pub before_id: Option<String>,
    pub limit: u32,
}

/// A message to publish, written in the same transaction as the state change that caused it.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxMessage {
    /// Unique per message; consumers dedupe on it.
    pub id: String,
    pub topic: String,
    /// Always the instance id, so one instance's messages stay in order.
    pub key: String,
    pub payload: Vec<u8>,
}

/// An audit event before the store chains it.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditDraft {
    /// `instance:<id>` or `template:<id>`: the chain it belongs to.
    pub stream: String,
    pub at: Timestamp,
    pub actor: ActorRef,
    pub kind: String,
    pub before: Value,
    pub after: Value,
    pub reason: Option<String>,
}

/// A stored, hash-chained audit event.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    pub partner_id: String,
    pub stream: String,
    pub seq: i64,
    pub at: Timestamp,
    pub actor: ActorRef,
    pub kind: String,
    pub before: Value,
    pub after: Value,
    pub reason: Option<String>,
    pub prev_hash: String,
    pub hash: String,
}

impl AuditRecord {
    /// What this event's hash covers, for [`workflow_core::audit::chain_hash`].
    pub fn content(&self) -> AuditContent<'_> {
        AuditContent {
            partner_id: &self.partner_id,
            stream: &self.stream,
            seq: self.seq,
            at: self.at,
            actor: &self.actor,
            kind: &self.kind,
            before: &self.before,
            after: &self.after,
            reason: self.reason.as_deref(),
        }
    }

    /// This event as a link of its stream's chain.
    pub fn link(&self) -> ChainLink<'_> {
        ChainLink {
            content: self.content(),
            prev_hash: &self.prev_hash,
            hash: &self.hash,
        }
    }
}

/// Verify one stream's events (as returned by `Store::list_audit`, ascending seq); returns how
/// many verified.
pub fn verify_audit_chain(records: &[AuditRecord]) -> Result<usize, ChainError> {
    let links: Vec<ChainLink<'_>> = records.iter().map(AuditRecord::link).collect();
    verify_chain(&links)
}

/// What the approval pool decided about one decision command.
#[derive(Debug, Clone, PartialEq)]
pub struct DecisionOutcome {
    pub decision_id: String,
    pub partner_id: String,
    pub instance_id: String,
    pub step_index: i64,
    pub accepted: bool,
    /// Why it was refused: a stable code and a message for humans.
    pub code: Option<String>,
    pub message: Option<String>,
    pub decided_at: Timestamp,
}

/// Which waiting approval steps a listing wants ([`crate::Store::list_waiting_approvals`]),
/// oldest wait first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WaitingFilter {
    pub template_id: Option<String>,
    /// Only steps waiting since this instant or earlier.
    pub waiting_since_at_most: Option<Timestamp>,
    /// The paging cursor: only steps after this `(since, instance id)`.
    pub after: Option<(Timestamp, String)>,
    /// `0` means no limit.
    pub limit: u32,
}

/// An approval step waiting for a decision, without its instance's state: what the pending
/// inbox filters on before it reads the instances it may list.
#[derive(Debug, Clone, PartialEq)]
pub struct WaitingApproval {
    pub instance_id: String,
    pub template_id: String,
    pub template_version: i64,
    pub step_index: i64,
    /// When the approval step started waiting.
    pub since: Timestamp,
    pub trigger: Value,
}

/// A durable timer: fire `kind` for step `step_index` of an instance at `due_at`.
#[derive(Debug, Clone, PartialEq)]
pub struct TimerRecord {
    /// Deterministic (instance, step, kind, level): storing it twice is harmless.
    pub id: String,
    pub partner_id: String,
    pub instance_id: String,
    pub step_index: i64,
    /// The pool that handles it when it fires.
    pub step_type: String,
    pub kind: String,
    pub due_at: Timestamp,
}
