//! Records for tests, this crate's and (with the `fixtures` feature) other crates': a valid
//! instance each test changes in place to what it needs.

use serde_json::json;
use workflow_core::instance::{ActorRef, ActorType, InstanceInfo, InstanceState};
use workflow_core::{InstanceStatus, Timestamp};

use crate::records::InstanceRecord;

/// A running instance of partner `p1` at version 1, with a fresh id.
pub fn instance() -> InstanceRecord {
    InstanceRecord {
        info: InstanceInfo {
            id: uuid::Uuid::now_v7().to_string(),
            partner_id: "p1".into(),
            template_id: "t1".into(),
            template_version: 1,
            created_at: Timestamp(1_000),
            created_by: ActorRef {
                id: "u".into(),
                actor_type: ActorType::Human,
            },
            trigger: json!({}).into(),
            mode: Default::default(),
        },
        idempotency_key: None,
        state: InstanceState {
            status: InstanceStatus::Running,
            current_step: None,
            waiting_on: None,
            steps: vec![],
            error: None,
            finished_at: None,
        },
        updated_at: Timestamp(1_000),
        version: 1,
    }
}
