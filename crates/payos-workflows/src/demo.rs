//! The demo partner that `dev` seeds, with ready API keys for each demo actor.

use workflow_core::instance::ActorType;
use workflow_store::records::{ApiKeyRecord, PartnerRecord};
use workflow_store::{Store, StoreError};

pub const DEMO_PARTNER: &str = "demo";

/// The spec's procurement template, as the demo and the tests use it.
pub const PROCUREMENT_TEMPLATE: &str =
    include_str!("../../../examples/templates/procurement-approval.json");

/// A demo actor: (environment variable name, actor id, type, roles).
const ACTORS: [(&str, &str, ActorType, &[&str]); 4] = [
    (
        "REQUESTER_KEY",
        "rita.requester",
        ActorType::Human,
        &["requester"],
    ),
    (
        "MANAGER_KEY",
        "frank.manager",
        ActorType::Human,
        &["finance_manager"],
    ),
    ("CFO_KEY", "carol.cfo", ActorType::Human, &["cfo"]),
    (
        "AGENT_KEY",
        "approval-agent",
        ActorType::Agent,
        &["finance_manager"],
    ),
];

/// One issued demo key.
#[derive(Debug, Clone)]
pub struct DemoKey {
    pub env_name: &'static str,
    pub actor_id: &'static str,
    pub roles: &'static [&'static str],
    pub key: String,
}

/// Create the demo partner if it is missing and issue a fresh key for every demo actor.
pub async fn seed(
    store: &Store,
    now: workflow_core::Timestamp,
) -> Result<Vec<DemoKey>, StoreError> {
    if store.get_partner(DEMO_PARTNER).await?.is_none() {
        store
            .create_partner(&PartnerRecord {
                id: DEMO_PARTNER.into(),
                name: "Demo Partner".into(),
                created_at: now,
            })
            .await?;
    }
    let mut keys = Vec::new();
    for (env_name, actor_id, actor_type, roles) in ACTORS {
        let key = producer_api::auth::generate_key();
        let rec = ApiKeyRecord {
            id: format!("key_{}", uuid::Uuid::now_v7().simple()),
            partner_id: DEMO_PARTNER.into(),
            actor_id: actor_id.into(),
            actor_type,
            roles: roles.iter().map(|r| r.to_string()).collect(),
            created_at: now,
        };
        store
            .create_api_key(&producer_api::auth::hash_key(&key), &rec)
            .await?;
        keys.push(DemoKey {
            env_name,
            actor_id,
            roles,
            key,
        });
    }
    Ok(keys)
}
