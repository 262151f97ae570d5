//! Verifying a stored audit stream against its hash chain.

use workflow_core::audit::{verify_chain, AuditContent, ChainError, ChainLink};
use workflow_store::records::AuditRecord;

/// Check the stream's stored events (ascending seq). Returns how many verified.
pub fn verify(records: &[AuditRecord]) -> Result<usize, ChainError> {
    let links: Vec<ChainLink<'_>> = records
        .iter()
        .map(|r| ChainLink {
            content: AuditContent {
                partner_id: &r.partner_id,
                stream: &r.stream,
                seq: r.seq,
                at: r.at,
                actor: &r.actor,
                kind: &r.kind,
                before: &r.before,
                after: &r.after,
                reason: r.reason.as_deref(),
            },
            prev_hash: &r.prev_hash,
            hash: &r.hash,
        })
        .collect();
    verify_chain(&links)
}
