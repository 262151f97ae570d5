//! The store conformance suite: every test is written once as an async fn taking a migrated
//! [`Store`] and run against each backend by the `both_backends!` macro (tests/common) (SQLite on a temporary
//! file, PostgreSQL on a fresh database from `workflow-testkit`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;

use serde_json::json;
use sqlx::Row;
use workflow_core::audit::ChainError;
use workflow_core::instance::{ActorRef, ActorType, InstanceInfo};
use workflow_core::{
    InstanceState, InstanceStatus, StepExecution, StepStatus, StepType, Timestamp,
};
use workflow_store::*;

mod common;

use common::{postgres_db, sqlite_db, TestResult};

crate::both_backends!(
    migrate_is_idempotent,
    partners_and_api_keys,
    templates_versions_lists_and_activation,
    tenancy_is_enforced,
    create_instance_is_idempotent,
    a_create_at_the_template_head_writes_only_while_it_is_the_head,
    racing_creates_with_one_key_create_once,
    commit_instance_uses_optimistic_concurrency,
    a_failed_transaction_writes_nothing,
    outbox_is_fetched_in_order_and_deleted,
    audit_chain_verifies_and_tampering_breaks_it,
    list_instances_filters_and_pages,
    analytics_aggregate_per_template_and_step,
    list_active_instances_spans_partners,
    concurrent_commits_exactly_one_wins,
    timers_fire_once_under_concurrent_schedulers,
    decision_outcomes_keep_the_first,
    a_decision_outcome_commits_with_its_transition,
    a_group_commit_records_each_decision_it_applied,
    group_commit_answers_each_commit_as_alone,
    group_commit_refuses_alone_and_chains_every_stream,
    owned_creates_and_commits_come_back_as_written,
);

// ------------------------------------------------------------------------------- fixtures

fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

fn actor() -> ActorRef {
    ActorRef {
        id: "user-1".into(),
        actor_type: ActorType::Human,
    }
}

fn partner(id: &str) -> PartnerRecord {
    PartnerRecord {
        id: id.into(),
        name: format!("Partner {id}"),
        created_at: Timestamp(1_000),
    }
}

fn template(partner_id: &str, id: &str, trigger_type: &str) -> TemplateRecord {
    TemplateRecord {
        id: id.into(),
        partner_id: partner_id.into(),
        version: 1,
        name: format!("template {id}"),
        trigger_type: trigger_type.into(),
        active: true,
        doc: json!({"name": "t", "steps": [{"type": "approval", "amount": 12.5}]}),
        created_at: Timestamp(2_000),
        created_by: "user-1".into(),
    }
}

fn draft(stream: &str, kind: &str, after: serde_json::Value) -> AuditDraft {
    AuditDraft {
        stream: stream.into(),
        at: Timestamp(3_000),
        actor: actor(),
        kind: kind.into(),
        before: serde_json::Value::Null,
        after,
        reason: Some("because".into()),
    }
}

fn step(index: usize, status: StepStatus) -> StepExecution {
    StepExecution {
        index,
        name: format!("step {index}"),
        step_type: StepType::Approval,
        status,
        started_at: Some(Timestamp(4_000)),
        finished_at: None,
        actor: Some(actor()),
        input: Some(json!({"approvers": ["a", "b"]}).into()),
        output: None,
        error: None,
        decisions: Vec::new(),
        escalations: 0,
    }
}

fn instance(partner_id: &str, template_id: &str, key: Option<&str>) -> InstanceRecord {
    InstanceRecord {
        info: InstanceInfo {
            id: new_id(),
            partner_id: partner_id.into(),
            template_id: template_id.into(),
            template_version: 1,
            created_at: Timestamp(5_000),
            created_by: actor(),
            trigger: json!({"amount": 100.25, "currency": "EUR"}).into(),
            mode: Default::default(),
        },
        idempotency_key: key.map(str::to_string),
        state: InstanceState {
            status: InstanceStatus::Running,
            current_step: Some(0),
            waiting_on: None,
            steps: vec![step(0, StepStatus::Pending)],
            error: None,
            finished_at: None,
        },
        updated_at: Timestamp(5_000),
        version: 1,
    }
}

fn message(key: &str) -> OutboxMessage {
    OutboxMessage {
        id: new_id(),
        topic: "workflow.commands".into(),
        key: key.into(),
        payload: format!("{{\"instance\":\"{key}\"}}").into_bytes(),
    }
}

fn instance_stream(rec: &InstanceRecord) -> String {
    format!("instance:{}", rec.info.id)
}

/// The next state of `rec` (step 0 completed, step 1 waiting) as a commit would write it.
fn advanced(rec: &InstanceRecord, status: InstanceStatus) -> InstanceRecord {
    let mut next = rec.clone();
    next.state.status = status;
    next.state.current_step = if status.is_terminal() { None } else { Some(1) };
    if let Some(s) = next.state.execution_mut(0) {
        s.status = StepStatus::Completed;
        s.finished_at = Some(Timestamp(6_000));
        s.output = Some(json!({"approved": true}).into());
    }
    next.state.steps.push(step(1, StepStatus::Waiting));
    next.updated_at = Timestamp(6_000);
    next.version = rec.version + 1;
    next
}

async fn created(store: &Store, rec: &InstanceRecord) -> Result<(), StoreError> {
    let audit = [draft(
        &instance_stream(rec),
        "instance.created",
        json!({"status": "running"}),
    )];
    match store
        .create_instance(rec, &[message(&rec.info.id)], &audit)
        .await?
    {
        CreateOutcome::Created(_) => Ok(()),
        CreateOutcome::Existing(r) => panic!("expected a new instance, got existing {}", r.info.id),
    }
}

// ------------------------------------------------------------------------------- the suite

async fn migrate_is_idempotent(store: Store) -> TestResult {
    store.migrate().await?;
    store.migrate().await?;
    store.ping().await?;
    Ok(())
}

async fn partners_and_api_keys(store: Store) -> TestResult {
    let p = partner("p1");
    store.create_partner(&p).await?;
    assert_eq!(store.get_partner("p1").await?, Some(p.clone()));
    assert_eq!(store.get_partner("nobody").await?, None);
    let dup = store.create_partner(&p).await.unwrap_err();
    assert!(
        matches!(dup, StoreError::AlreadyExists { what: "partner", ref id } if id == "p1"),
        "{dup:?}"
    );
    assert!(!dup.is_retryable());

    let key = ApiKeyRecord {
        id: "key_1".into(),
        partner_id: "p1".into(),
        actor_id: "agent-7".into(),
        actor_type: ActorType::Agent,
        roles: vec!["approver".into(), "admin".into()],
        created_at: Timestamp(1_500),
    };
    store.create_api_key("hash-1", &key).await?;
    assert_eq!(store.find_api_key("hash-1").await?, Some(key.clone()));
    assert_eq!(store.find_api_key("hash-unknown").await?, None);

    let dup = store.create_api_key("hash-1", &key).await.unwrap_err();
    assert!(matches!(dup, StoreError::AlreadyExists { .. }), "{dup:?}");

    let orphan = ApiKeyRecord {
        id: "key_2".into(),
        partner_id: "nobody".into(),
        ..key.clone()
    };
    let err = store.create_api_key("hash-2", &orphan).await.unwrap_err();
    assert!(
        matches!(err, StoreError::NotFound { what: "partner", ref id } if id == "nobody"),
        "{err:?}"
    );
    assert_eq!(store.find_api_key("hash-2").await?, None);
    Ok(())
}

async fn templates_versions_lists_and_activation(store: Store) -> TestResult {
    let (a, b, c) = (new_id(), new_id(), new_id());
    for (id, trigger) in [(&a, "manual"), (&b, "on_transfer"), (&c, "manual")] {
        let t = template("p1", id, trigger);
        store
            .insert_template(
                &t,
                &draft(
                    &format!("template:{id}"),
                    "template.created",
                    json!({"v": 1}),
                ),
            )
            .await?;
    }
    assert_eq!(
        store.get_template("p1", &a).await?,
        Some(template("p1", &a, "manual"))
    );

    // A new version is latest + 1, keeps the template's activity, and leaves v1 untouched.
    let doc2 = json!({"name": "t", "steps": [], "v": 2});
    let v2 = store
        .add_template_version(
            "p1",
            &a,
            "renamed",
            "on_transfer",
            &doc2,
            "user-2",
            Timestamp(9_000),
            &draft(
                &format!("template:{a}"),
                "template.versioned",
                json!({"v": 2}),
            ),
        )
        .await?;
    assert_eq!(v2.version, 2);
    assert_eq!(v2.name, "renamed");
    assert!(v2.active);
    assert_eq!(store.get_template("p1", &a).await?, Some(v2.clone()));
    assert_eq!(
        store.get_template_version("p1", &a, 1).await?,
        Some(template("p1", &a, "manual"))
    );
    assert_eq!(store.get_template_version("p1", &a, 3).await?, None);
    let versions: Vec<i64> = store
        .list_template_versions("p1", &a)
        .await?
        .iter()
        .map(|t| t.version)
        .collect();
    assert_eq!(versions, vec![1, 2]);
    let v3 = store
        .add_template_version(
            "p1",
            &a,
            "again",
            "manual",
            &doc2,
            "u",
            Timestamp(9_500),
            &draft(&format!("template:{a}"), "template.versioned", json!({})),
        )
        .await?;
    assert_eq!(v3.version, 3);

    // Lists: latest version of each, id descending, filters on the latest version.
    let ids = |ts: Vec<TemplateRecord>| {
        ts.into_iter()
            .map(|t| (t.id, t.version))
            .collect::<Vec<_>>()
    };
    let all = store
        .list_templates("p1", &TemplateFilter::default())
        .await?;
    assert_eq!(
        ids(all),
        vec![(c.clone(), 1), (b.clone(), 1), (a.clone(), 3)]
    );
    let on_transfer = TemplateFilter {
        trigger_type: Some("on_transfer".into()),
        ..Default::default()
    };
    assert_eq!(
        ids(store.list_templates("p1", &on_transfer).await?),
        vec![(b.clone(), 1)]
    );

    // Cursor paging.
    let page1 = store
        .list_templates(
            "p1",
            &TemplateFilter {
                limit: 2,
                ..Default::default()
            },
        )
        .await?;
    assert_eq!(ids(page1.clone()), vec![(c.clone(), 1), (b.clone(), 1)]);
    let page2 = store
        .list_templates(
            "p1",
            &TemplateFilter {
                limit: 2,
                before_id: Some(page1[1].id.clone()),
                ..Default::default()
            },
        )
        .await?;
    assert_eq!(ids(page2), vec![(a.clone(), 3)]);

    // Deactivation applies to every version and is filterable.
    store
        .set_template_active(
            "p1",
            &c,
            false,
            &draft(
                &format!("template:{c}"),
                "template.deactivated",
                json!({"active": false}),
            ),
        )
        .await?;
    let inactive = TemplateFilter {
        active: Some(false),
        ..Default::default()
    };
    assert_eq!(
        ids(store.list_templates("p1", &inactive).await?),
        vec![(c.clone(), 1)]
    );
    let active = TemplateFilter {
        active: Some(true),
        ..Default::default()
    };
    assert_eq!(
        ids(store.list_templates("p1", &active).await?),
        vec![(b.clone(), 1), (a.clone(), 3)]
    );
    assert!(!store.get_template("p1", &c).await?.unwrap().active);
    assert!(
        !store
            .get_template_version("p1", &c, 1)
            .await?
            .unwrap()
            .active
    );

    // Errors.
    let missing = new_id();
    let err = store
        .set_template_active("p1", &missing, true, &draft("template:x", "k", json!({})))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::NotFound {
                what: "template",
                ..
            }
        ),
        "{err:?}"
    );
    let err = store
        .add_template_version(
            "p1",
            &missing,
            "n",
            "manual",
            &doc2,
            "u",
            Timestamp(1),
            &draft("template:x", "k", json!({})),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::NotFound {
                what: "template",
                ..
            }
        ),
        "{err:?}"
    );
    let err = store
        .insert_template(
            &template("p1", &a, "manual"),
            &draft("template:x", "k", json!({})),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::AlreadyExists {
                what: "template",
                ..
            }
        ),
        "{err:?}"
    );
    let mut not_v1 = template("p1", &new_id(), "manual");
    not_v1.version = 2;
    assert!(store
        .insert_template(&not_v1, &draft("template:y", "k", json!({})))
        .await
        .is_err());
    // Failed writes appended no audit events.
    assert!(store.list_audit("p1", "template:x").await?.is_empty());

    // The template's audit stream: created, versioned twice.
    let trail = store.list_audit("p1", &format!("template:{a}")).await?;
    assert_eq!(trail.len(), 3);
    assert_eq!(verify_audit_chain(&trail), Ok(3));
    Ok(())
}

async fn tenancy_is_enforced(store: Store) -> TestResult {
    let t = new_id();
    store
        .insert_template(
            &template("pa", &t, "manual"),
            &draft(&format!("template:{t}"), "template.created", json!({})),
        )
        .await?;
    let rec = instance("pa", &t, Some("key-1"));
    created(&store, &rec).await?;

    // Partner B sees nothing of partner A's.
    assert_eq!(store.get_template("pb", &t).await?, None);
    assert_eq!(store.get_template_version("pb", &t, 1).await?, None);
    assert!(store.list_template_versions("pb", &t).await?.is_empty());
    assert!(store
        .list_templates("pb", &TemplateFilter::default())
        .await?
        .is_empty());
    assert_eq!(store.get_instance("pb", &rec.info.id).await?, None);
    assert_eq!(store.get_instance_by_key("pb", "key-1").await?, None);
    assert!(store.get_instances("pb", &[&rec.info.id]).await?.is_empty());
    assert!(store
        .list_instances("pb", &InstanceFilter::default())
        .await?
        .is_empty());
    assert!(store
        .list_audit("pb", &instance_stream(&rec))
        .await?
        .is_empty());
    assert!(store
        .list_audit("pb", &format!("template:{t}"))
        .await?
        .is_empty());

    // ... and cannot change it.
    let err = store
        .set_template_active("pb", &t, false, &draft("template:z", "k", json!({})))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err:?}");
    let err = store
        .add_template_version(
            "pb",
            &t,
            "n",
            "manual",
            &json!({}),
            "u",
            Timestamp(1),
            &draft("template:z", "k", json!({})),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err:?}");
    let mut hijack = advanced(&rec, InstanceStatus::Cancelled);
    hijack.info.partner_id = "pb".into();
    let err = store
        .commit_instance(&hijack, 1, &[], &[])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::NotFound {
                what: "instance",
                ..
            }
        ),
        "{err:?}"
    );

    // The same idempotency key is independent per partner.
    let other = instance("pb", &t, Some("key-1"));
    assert!(store.create_instance(&other, &[], &[]).await?.is_created());

    // Partner A's view is intact.
    assert_eq!(
        store.get_instance("pa", &rec.info.id).await?,
        Some(rec.clone())
    );
    assert_eq!(
        store
            .get_instances("pa", &[&rec.info.id, "no-such-instance"])
            .await?,
        std::slice::from_ref(&rec)
    );
    assert!(store.get_template("pa", &t).await?.unwrap().active);
    Ok(())
}

async fn create_instance_is_idempotent(store: Store) -> TestResult {
    let first = instance("p1", "t1", Some("idem-1"));
    let outcome = store
        .create_instance(
            &first,
            &[message(&first.info.id)],
            &[draft(
                &instance_stream(&first),
                "instance.created",
                json!({}),
            )],
        )
        .await?;
    assert_eq!(outcome, CreateOutcome::Created(first.clone()));
    assert_eq!(
        store.get_instance("p1", &first.info.id).await?,
        Some(first.clone())
    );

    // Same key, new id: nothing written, the first instance returned.
    let second = instance("p1", "t1", Some("idem-1"));
    let outcome = store
        .create_instance(
            &second,
            &[message(&second.info.id)],
            &[draft(
                &instance_stream(&second),
                "instance.created",
                json!({}),
            )],
        )
        .await?;
    assert_eq!(outcome, CreateOutcome::Existing(first.clone()));
    assert_eq!(store.get_instance("p1", &second.info.id).await?, None);
    assert!(store
        .list_audit("p1", &instance_stream(&second))
        .await?
        .is_empty());
    assert_eq!(
        store
            .list_audit("p1", &instance_stream(&first))
            .await?
            .len(),
        1
    );
    let outbox = store.fetch_outbox(0).await?;
    assert_eq!(outbox.len(), 1);
    assert_eq!(outbox[0].key, first.info.id);
    assert_eq!(
        store
            .list_instances("p1", &InstanceFilter::default())
            .await?
            .len(),
        1
    );

    // Without a key every create is new; a reused id is refused.
    let (x, y) = (instance("p1", "t1", None), instance("p1", "t1", None));
    assert!(store.create_instance(&x, &[], &[]).await?.is_created());
    assert!(store.create_instance(&y, &[], &[]).await?.is_created());
    let err = store.create_instance(&x, &[], &[]).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::AlreadyExists {
                what: "instance",
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        store.get_instance_by_key("p1", "idem-1").await?,
        Some(first)
    );
    Ok(())
}

async fn a_create_at_the_template_head_writes_only_while_it_is_the_head(
    store: Store,
) -> TestResult {
    let id = new_id();
    store
        .insert_template(
            &template("p1", &id, "manual"),
            &draft(&format!("template:{id}"), "template.created", json!({})),
        )
        .await?;
    let at_head = |rec: InstanceRecord| {
        let store = store.clone();
        async move {
            let audit = [draft(&instance_stream(&rec), "instance.created", json!({}))];
            let outbox = [message(&rec.info.id)];
            store
                .create_instance_at_head(&rec, &outbox, &audit, &[], &[])
                .await
        }
    };
    let refused = |result: Result<CreateOutcome, StoreError>| match result {
        Err(StoreError::TemplateChanged { .. }) => {}
        other => panic!("expected TemplateChanged, got {other:?}"),
    };

    // Version 1 is the active head: written, and a replay of its key answers it.
    let first = instance("p1", &id, Some("k-1"));
    assert!(at_head(first.clone()).await?.is_created());
    let replay = instance("p1", &id, Some("k-1"));
    assert_eq!(
        at_head(replay).await?,
        CreateOutcome::Existing(first.clone())
    );

    // A new version moves the head: a create of version 1 writes nothing at all.
    store
        .add_template_version(
            "p1",
            &id,
            "t",
            "manual",
            &json!({"name": "t", "steps": []}),
            "user-2",
            Timestamp(9_000),
            &draft(&format!("template:{id}"), "template.versioned", json!({})),
        )
        .await?;
    let stale = instance("p1", &id, Some("k-2"));
    refused(at_head(stale.clone()).await);
    assert_eq!(store.get_instance("p1", &stale.info.id).await?, None);
    assert_eq!(store.get_instance_by_key("p1", "k-2").await?, None);
    assert!(store
        .list_audit("p1", &instance_stream(&stale))
        .await?
        .is_empty());
    assert_eq!(
        store.fetch_outbox(0).await?.len(),
        1,
        "only the first's message"
    );
    let mut current = instance("p1", &id, None);
    current.info.template_version = 2;
    assert!(at_head(current.clone()).await?.is_created());

    // A deactivated template, another partner's and a missing one have no head to create at.
    let deactivated = draft(&format!("template:{id}"), "template.deactivated", json!({}));
    store
        .set_template_active("p1", &id, false, &deactivated)
        .await?;
    let mut later = current.clone();
    later.info.id = new_id();
    refused(at_head(later).await);
    let mut elsewhere = current.clone();
    elsewhere.info.id = new_id();
    elsewhere.info.partner_id = "p2".into();
    refused(at_head(elsewhere).await);
    refused(at_head(instance("p1", &new_id(), None)).await);

    // Without the check (`create_instance_with`) the head is not consulted.
    assert!(store
        .create_instance_with(&instance("p1", &id, None), &[], &[], &[], &[])
        .await?
        .is_created());
    Ok(())
}

async fn racing_creates_with_one_key_create_once(store: Store) -> TestResult {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let store = store.clone();
        tasks.spawn(async move {
            let rec = instance("p1", "t1", Some("race"));
            store
                .create_instance(
                    &rec,
                    &[message(&rec.info.id)],
                    &[draft(&instance_stream(&rec), "instance.created", json!({}))],
                )
                .await
        });
    }
    let mut created_ids = Vec::new();
    let mut seen = HashSet::new();
    while let Some(joined) = tasks.join_next().await {
        let outcome = joined??;
        if outcome.is_created() {
            created_ids.push(outcome.record().info.id.clone());
        }
        seen.insert(outcome.into_record().info.id);
    }
    assert_eq!(created_ids.len(), 1, "exactly one create wins");
    assert_eq!(seen.len(), 1, "every caller gets the winner's instance");
    assert_eq!(store.fetch_outbox(0).await?.len(), 1);
    assert_eq!(
        store
            .list_instances("p1", &InstanceFilter::default())
            .await?
            .len(),
        1
    );

    // Racing creates of different keys and partners (on PostgreSQL they share group
    // transactions): every one is written whole, with a valid chain of its own.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..16 {
        let store = store.clone();
        tasks.spawn(async move {
            let partner = if i % 2 == 0 { "p1" } else { "p2" };
            let rec = instance(partner, "t1", Some(&format!("k{i}")));
            let outcome = store
                .create_instance(
                    &rec,
                    &[message(&rec.info.id)],
                    &[draft(&instance_stream(&rec), "instance.created", json!({}))],
                )
                .await?;
            Ok::<_, StoreError>((rec, outcome))
        });
    }
    while let Some(joined) = tasks.join_next().await {
        let (rec, outcome) = joined??;
        assert_eq!(outcome, CreateOutcome::Created(rec.clone()));
        let partner = rec.info.partner_id.as_str();
        assert_eq!(
            store.get_instance(partner, &rec.info.id).await?,
            Some(rec.clone())
        );
        let trail = store.list_audit(partner, &instance_stream(&rec)).await?;
        assert_eq!(verify_audit_chain(&trail), Ok(1));
    }
    assert_eq!(store.fetch_outbox(0).await?.len(), 17);
    Ok(())
}

async fn commit_instance_uses_optimistic_concurrency(store: Store) -> TestResult {
    let rec = instance("p1", "t1", None);
    created(&store, &rec).await?;

    let next = advanced(&rec, InstanceStatus::Waiting);
    store
        .commit_instance(&next, 1, &[message(&rec.info.id)], &[])
        .await?;
    let stored = store.get_instance("p1", &rec.info.id).await?.unwrap();
    assert_eq!(stored.version, 2);
    assert_eq!(stored, next);

    // A second commit from the same read loses.
    let stale = advanced(&rec, InstanceStatus::Cancelled);
    let err = store
        .commit_instance(&stale, 1, &[message(&rec.info.id)], &[])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Conflict {
                what: "instance",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_retryable());
    assert_eq!(
        store.get_instance("p1", &rec.info.id).await?,
        Some(next.clone())
    );
    assert_eq!(
        store.fetch_outbox(0).await?.len(),
        2,
        "the losing commit's message is not written"
    );

    // Unknown instance.
    let ghost = instance("p1", "t1", None);
    let err = store
        .commit_instance(&ghost, 1, &[], &[])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::NotFound {
                what: "instance",
                ..
            }
        ),
        "{err:?}"
    );

    // The step mirror follows the state document.
    let rows = sqlx::query(
        "SELECT step_index, status, step_type FROM workflow_step_executions \
         WHERE partner_id = $1 AND instance_id = $2 ORDER BY step_index",
    )
    .bind("p1")
    .bind(rec.info.id.as_str())
    .fetch_all(store.pool())
    .await?;
    let steps: Vec<(i64, String, String)> = rows
        .iter()
        .map(|r| (r.get("step_index"), r.get("status"), r.get("step_type")))
        .collect();
    assert_eq!(
        steps,
        vec![
            (0, "completed".to_string(), "approval".to_string()),
            (1, "waiting".to_string(), "approval".to_string())
        ]
    );
    Ok(())
}

/// Commits write only the step rows that changed (each backend remembers the mirror it wrote):
/// after each one, the rows are still exactly the state's steps, also when a commit changes a
/// step an earlier one left alone, and when another store handle committed in between.
async fn the_step_mirror_follows_every_commit(store: Store, url: &str) -> TestResult {
    let mut rec = instance("p1", "t1", None);
    rec.state.steps = vec![step(0, StepStatus::Running)];
    created(&store, &rec).await?;
    let mirror = |id: String| {
        let store = store.clone();
        async move {
            let rows = sqlx::query(
                "SELECT step_index, status, COALESCE(output, '') AS output, \
                 COALESCE(error, '') AS error FROM workflow_step_executions \
                 WHERE partner_id = 'p1' AND instance_id = $1 ORDER BY step_index",
            )
            .bind(id)
            .fetch_all(store.pool())
            .await?;
            Ok::<_, sqlx::Error>(
                rows.iter()
                    .map(|r| {
                        (
                            r.get::<i64, _>("step_index"),
                            r.get::<String, _>("status"),
                            r.get::<String, _>("output"),
                            r.get::<String, _>("error"),
                        )
                    })
                    .collect::<Vec<_>>(),
            )
        }
    };
    let expected = |rec: &InstanceRecord| {
        rec.state
            .steps
            .iter()
            .map(|s| {
                (
                    s.index as i64,
                    serde_json::to_value(s.status)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default(),
                    s.output.as_ref().map(|o| o.to_string()).unwrap_or_default(),
                    s.error.clone().unwrap_or_default(),
                )
            })
            .collect::<Vec<_>>()
    };
    let changes: [fn(&mut InstanceRecord); 4] = [
        // The first step completes and a second starts.
        |r| {
            r.state.steps[0].status = StepStatus::Completed;
            r.state.steps[0].output = Some(json!({"ok": true}).into());
            r.state.steps.push(step(1, StepStatus::Running));
        },
        // Only the second changes.
        |r| r.state.steps[1].status = StepStatus::Waiting,
        // No step changes.
        |r| r.state.status = InstanceStatus::Waiting,
        // The first changes again, after a commit that left it alone.
        |r| r.state.steps[0].error = Some("late".into()),
    ];
    for change in changes {
        let mut next = rec.clone();
        next.version += 1;
        change(&mut next);
        store.commit_instance(&next, rec.version, &[], &[]).await?;
        rec = next;
        assert_eq!(mirror(rec.info.id.clone()).await?, expected(&rec));
    }

    // Another handle on the same database commits; this one's next commit still leaves the
    // mirror exactly the state's.
    let other = Store::connect(url).await?;
    let mut next = rec.clone();
    next.version += 1;
    next.state.steps[1].status = StepStatus::Completed;
    next.state.steps[1].output = Some(json!({"by": "the other handle"}).into());
    other.commit_instance(&next, rec.version, &[], &[]).await?;
    rec = next;
    let mut next = rec.clone();
    next.version += 1;
    next.state.status = InstanceStatus::Completed;
    store.commit_instance(&next, rec.version, &[], &[]).await?;
    rec = next;
    assert_eq!(mirror(rec.info.id.clone()).await?, expected(&rec));
    other.close().await;
    Ok(())
}

// It takes the database's URL too (for a second handle): run on each backend here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_the_step_mirror_follows_every_commit() -> TestResult {
    let db = sqlite_db().await?;
    the_step_mirror_follows_every_commit(db.store.clone(), &db.url).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_the_step_mirror_follows_every_commit() -> TestResult {
    let db = postgres_db().await?;
    the_step_mirror_follows_every_commit(db.store.clone(), &db.url).await
}

async fn a_failed_transaction_writes_nothing(store: Store) -> TestResult {
    let rec = instance("p1", "t1", Some("k"));
    let dup = message(&rec.info.id);
    // The second message reuses the first's id: the whole create must roll back.
    let err = store
        .create_instance(
            &rec,
            &[dup.clone(), dup.clone()],
            &[draft(&instance_stream(&rec), "instance.created", json!({}))],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::AlreadyExists {
                what: "outbox message",
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(store.get_instance("p1", &rec.info.id).await?, None);
    assert!(store.fetch_outbox(0).await?.is_empty());
    assert!(store
        .list_audit("p1", &instance_stream(&rec))
        .await?
        .is_empty());

    // Same for a commit: state, version and audit stay as they were.
    created(&store, &rec).await?;
    let next = advanced(&rec, InstanceStatus::Waiting);
    let err = store
        .commit_instance(
            &next,
            1,
            &[dup.clone(), dup.clone()],
            &[draft(
                &instance_stream(&rec),
                "instance.advanced",
                json!({}),
            )],
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists { .. }), "{err:?}");
    assert_eq!(
        store.get_instance("p1", &rec.info.id).await?,
        Some(rec.clone())
    );
    assert_eq!(
        store.list_audit("p1", &instance_stream(&rec)).await?.len(),
        1
    );
    Ok(())
}

async fn outbox_is_fetched_in_order_and_deleted(store: Store) -> TestResult {
    let rec = instance("p1", "t1", None);
    let mut first: Vec<OutboxMessage> = (0..3).map(|_| message(&rec.info.id)).collect();
    first[1].payload = vec![0, 159, 255, 10, 0]; // not UTF-8: payloads are bytes
    store.create_instance(&rec, &first, &[]).await?;
    let more: Vec<OutboxMessage> = (0..2).map(|_| message(&rec.info.id)).collect();
    store
        .commit_instance(&advanced(&rec, InstanceStatus::Waiting), 1, &more, &[])
        .await?;
    let expected: Vec<OutboxMessage> = first.iter().chain(more.iter()).cloned().collect();

    assert_eq!(store.fetch_outbox(0).await?, expected);
    assert_eq!(store.fetch_outbox(2).await?, expected[..2].to_vec());

    store
        .delete_outbox(&[
            expected[0].id.clone(),
            expected[1].id.clone(),
            "unknown".into(),
        ])
        .await?;
    assert_eq!(store.fetch_outbox(10).await?, expected[2..].to_vec());
    store.delete_outbox(&[]).await?;
    let rest: Vec<String> = expected[2..].iter().map(|m| m.id.clone()).collect();
    store.delete_outbox(&rest).await?;
    assert!(store.fetch_outbox(10).await?.is_empty());
    Ok(())
}

async fn audit_chain_verifies_and_tampering_breaks_it(store: Store) -> TestResult {
    let rec = instance("p1", "t1", None);
    let stream = instance_stream(&rec);
    created(&store, &rec).await?;
    let next = advanced(&rec, InstanceStatus::Waiting);
    // Floats and nesting must read back exactly as they were hashed.
    let after = json!({"status": "waiting", "amount": 0.1, "big": 1e300, "nested": {"b": [1, 2.5], "a": null}});
    store
        .commit_instance(
            &next,
            1,
            &[],
            &[
                draft(&stream, "step.completed", after.clone()),
                draft(&stream, "step.started", json!({"step": 1})),
            ],
        )
        .await?;
    let done = advanced(&next, InstanceStatus::Completed);
    let mut finished = draft(
        &stream,
        "instance.completed",
        json!({"status": "completed"}),
    );
    finished.reason = None;
    finished.actor = ActorRef {
        id: "engine".into(),
        actor_type: ActorType::System,
    };
    store.commit_instance(&done, 2, &[], &[finished]).await?;

    let trail = store.list_audit("p1", &stream).await?;
    let seqs: Vec<i64> = trail.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);
    assert_eq!(trail[0].prev_hash, workflow_core::audit::GENESIS);
    assert_eq!(trail[1].after, after);
    assert!(trail
        .iter()
        .all(|e| e.partner_id == "p1" && e.stream == stream));
    assert_eq!(trail[3].reason, None);
    assert_eq!(trail[3].actor.actor_type, ActorType::System);
    assert_eq!(verify_audit_chain(&trail), Ok(4));

    // Tampering with a stored event is detected.
    edit_stored_event(&store, &stream, 2, |events, i| {
        events[i]["after"] = json!({"status": "approved"});
    })
    .await?;
    let tampered = store.list_audit("p1", &stream).await?;
    assert!(
        matches!(
            verify_audit_chain(&tampered),
            Err(ChainError::Content { seq: 2, .. })
        ),
        "{:?}",
        verify_audit_chain(&tampered)
    );

    // Deleting an event breaks the chain too.
    edit_stored_event(&store, &stream, 3, |events, i| {
        events.remove(i);
    })
    .await?;
    let gapped = store.list_audit("p1", &stream).await?;
    assert!(verify_audit_chain(&gapped).is_err());
    Ok(())
}

/// Edit, behind the store's back, the stored block (one row per commit and stream) that holds
/// event `seq` of `stream`: `edit` gets the block's events and the event's index among them.
async fn edit_stored_event(
    store: &Store,
    stream: &str,
    seq: i64,
    edit: impl FnOnce(&mut Vec<serde_json::Value>, usize),
) -> TestResult {
    let row = sqlx::query(
        "SELECT first_seq, events FROM audit_blocks WHERE stream = $1 \
         AND first_seq <= $2 AND last_seq >= $2",
    )
    .bind(stream)
    .bind(seq)
    .fetch_one(store.pool())
    .await?;
    let first_seq: i64 = row.try_get("first_seq")?;
    let mut events: Vec<serde_json::Value> =
        serde_json::from_str(&row.try_get::<String, _>("events")?)?;
    let at = events
        .iter()
        .position(|e| e["seq"] == json!(seq))
        .ok_or("the block does not hold the event")?;
    edit(&mut events, at);
    sqlx::query("UPDATE audit_blocks SET events = $1 WHERE stream = $2 AND first_seq = $3")
        .bind(serde_json::to_string(&events)?)
        .bind(stream)
        .bind(first_seq)
        .execute(store.pool())
        .await?;
    Ok(())
}

async fn list_instances_filters_and_pages(store: Store) -> TestResult {
    let mut recs = Vec::new();
    for i in 0..5 {
        let mut rec = instance("p1", if i % 2 == 0 { "t-even" } else { "t-odd" }, None);
        rec.info.created_at = Timestamp(10_000 + i);
        created(&store, &rec).await?;
        recs.push(rec);
    }
    // Instance 4 completes.
    let done = advanced(&recs[4], InstanceStatus::Completed);
    store.commit_instance(&done, 1, &[], &[]).await?;

    let ids = |rs: Vec<InstanceRecord>| rs.into_iter().map(|r| r.info.id).collect::<Vec<_>>();
    let id = |i: usize| recs[i].info.id.clone();

    let all = store
        .list_instances("p1", &InstanceFilter::default())
        .await?;
    assert_eq!(ids(all), vec![id(4), id(3), id(2), id(1), id(0)]);
    let f = InstanceFilter {
        status: Some(InstanceStatus::Completed),
        ..Default::default()
    };
    assert_eq!(ids(store.list_instances("p1", &f).await?), vec![id(4)]);
    let f = InstanceFilter {
        status: Some(InstanceStatus::Running),
        template_id: Some("t-even".into()),
        ..Default::default()
    };
    assert_eq!(
        ids(store.list_instances("p1", &f).await?),
        vec![id(2), id(0)]
    );
    let f = InstanceFilter {
        created_from: Some(Timestamp(10_001)),
        created_to: Some(Timestamp(10_003)),
        ..Default::default()
    };
    assert_eq!(
        ids(store.list_instances("p1", &f).await?),
        vec![id(3), id(2), id(1)]
    );
    let page = InstanceFilter {
        limit: 2,
        before_id: Some(id(3)),
        ..Default::default()
    };
    assert_eq!(
        ids(store.list_instances("p1", &page).await?),
        vec![id(2), id(1)]
    );
    Ok(())
}

async fn analytics_aggregate_per_template_and_step(store: Store) -> TestResult {
    // p1: on t-a one instance completed (created 5,000, done 6,000), one waiting, one
    // running created later; on t-b one rejected. p2 has one on t-a that p1 must not count.
    let a_done = instance("p1", "t-a", None);
    let a_waiting = instance("p1", "t-a", None);
    let mut a_running = instance("p1", "t-a", None);
    a_running.info.created_at = Timestamp(7_000);
    a_running.updated_at = Timestamp(7_000);
    let b_rejected = instance("p1", "t-b", None);
    let other = instance("p2", "t-a", None);
    for rec in [&a_done, &a_waiting, &a_running, &b_rejected, &other] {
        created(&store, rec).await?;
    }
    for (rec, status) in [
        (&a_done, InstanceStatus::Completed),
        (&a_waiting, InstanceStatus::Waiting),
        (&b_rejected, InstanceStatus::Rejected),
        (&other, InstanceStatus::Completed),
    ] {
        store
            .commit_instance(&advanced(rec, status), 1, &[], &[])
            .await?;
    }

    let all = store.analytics("p1", &AnalyticsFilter::default()).await?;
    let instances: Vec<_> = all
        .instances
        .iter()
        .map(|a| (a.template_id.as_str(), a.status.as_str(), a.count))
        .collect();
    assert_eq!(
        instances,
        vec![
            ("t-a", "completed", 1),
            ("t-a", "running", 1),
            ("t-a", "waiting", 1),
            ("t-b", "rejected", 1),
        ]
    );
    let completed = &all.instances[0].duration;
    assert_eq!(
        (completed.count, completed.sum_ms, completed.max_ms),
        (1, 1_000, Some(1_000))
    );

    let t_a_steps: Vec<_> = all
        .steps
        .iter()
        .filter(|s| s.template_id == "t-a")
        .map(|s| (s.step_index, s.status.as_str(), s.count, s.duration.count))
        .collect();
    assert_eq!(
        t_a_steps,
        vec![
            (0, "completed", 2, 2),
            (0, "pending", 1, 0),
            (1, "waiting", 2, 0)
        ]
    );
    let step0_done = &all.steps[0];
    assert_eq!(
        (step0_done.name.as_str(), step0_done.step_type.as_str()),
        ("step 0", "approval")
    );
    assert_eq!(
        (step0_done.duration.sum_ms, step0_done.duration.max_ms),
        (4_000, Some(2_000))
    );
    let waiting = all
        .steps
        .iter()
        .find(|s| s.template_id == "t-a" && s.status == "waiting")
        .expect("the waiting step's row");
    assert_eq!(waiting.oldest_started_at, Some(Timestamp(4_000)));
    assert_eq!(waiting.duration.max_ms, None);

    // Filters: one template; a creation range that only the later instance falls in.
    let only_b = AnalyticsFilter {
        template_id: Some("t-b".into()),
        ..Default::default()
    };
    let b = store.analytics("p1", &only_b).await?;
    assert!(b.instances.iter().all(|a| a.template_id == "t-b"));
    assert!(b.steps.iter().all(|s| s.template_id == "t-b"));
    assert_eq!(b.instances.len(), 1);
    let late = AnalyticsFilter {
        created_from: Some(Timestamp(6_000)),
        created_to: Some(Timestamp(7_000)),
        ..Default::default()
    };
    let late = store.analytics("p1", &late).await?;
    let late_instances: Vec<_> = late
        .instances
        .iter()
        .map(|a| (a.status.as_str(), a.count))
        .collect();
    assert_eq!(late_instances, vec![("running", 1)]);
    assert_eq!(late.steps.len(), 1);

    // The other partner sees only its own instance; a partner with none sees nothing.
    let p2 = store.analytics("p2", &AnalyticsFilter::default()).await?;
    assert_eq!(p2.instances.len(), 1);
    assert_eq!(p2.instances[0].status, "completed");
    assert_eq!(
        store.analytics("p3", &AnalyticsFilter::default()).await?,
        Analytics::default()
    );
    Ok(())
}

async fn list_active_instances_spans_partners(store: Store) -> TestResult {
    let a1 = instance("pa", "t", None);
    let b1 = instance("pb", "t", None);
    let a2 = instance("pa", "t", None);
    let b2 = instance("pb", "t", None);
    for rec in [&a1, &b1, &a2, &b2] {
        created(&store, rec).await?;
    }
    store
        .commit_instance(&advanced(&b1, InstanceStatus::Waiting), 1, &[], &[])
        .await?;
    store
        .commit_instance(&advanced(&a2, InstanceStatus::Failed), 1, &[], &[])
        .await?;

    let ids = |rs: Vec<InstanceRecord>| rs.into_iter().map(|r| r.info.id).collect::<Vec<_>>();
    let all = store.list_active_instances(None, 0).await?;
    assert_eq!(
        ids(all),
        vec![a1.info.id.clone(), b1.info.id.clone(), b2.info.id.clone()]
    );
    let page1 = store.list_active_instances(None, 2).await?;
    assert_eq!(ids(page1), vec![a1.info.id.clone(), b1.info.id.clone()]);
    let page2 = store.list_active_instances(Some(&b1.info.id), 2).await?;
    assert_eq!(ids(page2), vec![b2.info.id.clone()]);
    assert!(store
        .list_active_instances(Some(&b2.info.id), 2)
        .await?
        .is_empty());
    Ok(())
}

async fn concurrent_commits_exactly_one_wins(store: Store) -> TestResult {
    let rec = instance("p1", "t1", None);
    created(&store, &rec).await?;
    let stream = instance_stream(&rec);

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8 {
        let store = store.clone();
        let mut next = advanced(&rec, InstanceStatus::Waiting);
        next.state.error = Some(format!("writer {i}"));
        let stream = stream.clone();
        tasks.spawn(async move {
            let result = store
                .commit_instance(
                    &next,
                    1,
                    &[message(&next.info.id)],
                    &[draft(&stream, "instance.advanced", json!({"writer": i}))],
                )
                .await;
            (next, result)
        });
    }
    let mut winners = Vec::new();
    let mut conflicts = 0;
    while let Some(joined) = tasks.join_next().await {
        match joined? {
            (next, Ok(())) => winners.push(next),
            (_, Err(StoreError::Conflict { .. })) => conflicts += 1,
            (_, Err(e)) => return Err(format!("unexpected error: {e:?}").into()),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one commit wins");
    assert_eq!(conflicts, 7);
    let stored = store.get_instance("p1", &rec.info.id).await?.unwrap();
    assert_eq!(stored, winners[0]);
    assert_eq!(
        store.fetch_outbox(0).await?.len(),
        2,
        "creation + the winner's message"
    );
    let trail = store.list_audit("p1", &stream).await?;
    assert_eq!(verify_audit_chain(&trail), Ok(2));
    Ok(())
}

// ------------------------------------------------------------------------------- SQLite only

#[tokio::test]
async fn sqlite_memory_is_one_database() -> TestResult {
    let store = Store::connect("sqlite::memory:").await?;
    store.migrate().await?;
    store.create_partner(&partner("p1")).await?;
    // Several concurrent callers all see the same in-memory database.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let store = store.clone();
        tasks.spawn(async move { store.get_partner("p1").await });
    }
    while let Some(joined) = tasks.join_next().await {
        assert!(joined??.is_some());
    }
    Ok(())
}

#[tokio::test]
async fn sqlite_file_and_directory_are_created_in_wal_mode() -> TestResult {
    let dir = workflow_testkit::temp_dir()?;
    let path = dir.path().join("nested").join("dir").join("engine.db");
    let store = Store::connect(&format!("sqlite://{}", path.display())).await?;
    store.migrate().await?;
    assert!(path.is_file());
    let mode: String = sqlx::query("PRAGMA journal_mode")
        .fetch_one(store.pool())
        .await?
        .try_get(0)?;
    assert_eq!(mode.to_lowercase(), "wal");
    let fk: i64 = sqlx::query("PRAGMA foreign_keys")
        .fetch_one(store.pool())
        .await?
        .try_get(0)?;
    assert_eq!(fk, 1);
    store.close().await;

    // Reopening sees the data and migrating again is a no-op.
    let store = Store::connect(&format!("sqlite://{}", path.display())).await?;
    store.migrate().await?;
    Ok(())
}

#[tokio::test]
async fn corrupt_documents_are_reported() -> TestResult {
    let db = sqlite_db().await?;
    let rec = instance("p1", "t1", None);
    created(&db.store, &rec).await?;
    sqlx::query("UPDATE workflow_instances SET state = $1 WHERE id = $2")
        .bind("{not json")
        .bind(rec.info.id.as_str())
        .execute(db.store.pool())
        .await?;
    let err = db.store.get_instance("p1", &rec.info.id).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    assert!(!err.is_retryable());
    Ok(())
}

#[tokio::test]
async fn unsupported_urls_are_refused() {
    let err = Store::connect("mysql://localhost/db").await.unwrap_err();
    assert!(matches!(err, StoreError::Database(_)), "{err:?}");
}

/// Pooled PostgreSQL connections are not pinged before every use (a round trip each): one that
/// died while idle for a while is found by the ping it then gets and replaced; one that died
/// in the middle of use may fail its next statement, with a retryable error, and is replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_that_died_are_replaced() -> TestResult {
    let db = postgres_db().await?;
    let store = Store::connect_with(&db.url, 1).await?;
    store.create_partner(&partner("p1")).await?;
    // The one pooled connection's backend is ended from another connection, and gone.
    let terminate = || async {
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(store.pool())
            .await?;
        sqlx::query("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .execute(db.store.pool())
            .await?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let left: i64 =
                sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = $1")
                    .bind(pid)
                    .fetch_one(db.store.pool())
                    .await?;
            if left == 0 {
                return Ok::<(), Box<dyn std::error::Error + Send + Sync>>(());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "backend {pid} still there"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    };

    // Died while busy (used again at once, not pinged): its next statement may fail, and then
    // retryably; the one after works. (Whether it fails depends on when the client notices the
    // closed socket, which a loaded machine moves: that is not what this asserts.)
    terminate().await?;
    if let Err(err) = store.create_partner(&partner("p2")).await {
        assert!(err.is_retryable(), "{err:?}");
    }
    if store.get_partner("p2").await?.is_none() {
        store.create_partner(&partner("p2")).await?;
    }

    // Died while idle (for longer than the ping threshold): nothing fails.
    terminate().await?;
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    store.create_partner(&partner("p3")).await?;
    Ok(())
}

#[tokio::test]
async fn sqlite_busy_is_retryable() -> TestResult {
    let db = sqlite_db().await?;
    // Another connection holds the write lock for longer than the store's busy timeout.
    let mut blocker = db.store.pool().acquire().await?;
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut *blocker)
        .await?;
    let err = db.store.create_partner(&partner("p1")).await.unwrap_err();
    assert!(matches!(err, StoreError::Database(_)), "{err:?}");
    assert!(err.is_retryable(), "{err:?}");
    sqlx::query("ROLLBACK").execute(&mut *blocker).await?;
    drop(blocker);
    db.store.create_partner(&partner("p1")).await?;
    Ok(())
}

// ------------------------------------------------------------------------------- timers

async fn timers_fire_once_under_concurrent_schedulers(store: Store) -> TestResult {
    let rec = instance("p1", "t1", None);
    store.create_instance(&rec, &[], &[]).await?;
    let timers: Vec<TimerRecord> = (0..300)
        .map(|n| TimerRecord {
            id: format!("{}:0:wait_elapsed:{n}", rec.info.id),
            partner_id: "p1".into(),
            instance_id: rec.info.id.clone(),
            step_index: 0,
            step_type: "wait".into(),
            kind: "wait_elapsed".into(),
            // Half due by t=5000, half later.
            due_at: Timestamp(if n % 2 == 0 { 1_000 + n } else { 100_000 + n }),
        })
        .collect();
    let mut next = rec.clone();
    next.version = rec.version + 1;
    store
        .commit_instance_with_timers(&next, rec.version, &[], &[], &timers)
        .await?;
    // Storing the same timers again (a retried commit) adds nothing.
    assert_eq!(store.list_timers("p1", &rec.info.id).await?.len(), 300);
    assert_eq!(store.next_timer_due().await?, Some(Timestamp(1_000)));

    // Four schedulers at once, small batches, until nothing due at t=5000 is left.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let store = store.clone();
        tasks.spawn(async move {
            let mut fired = Vec::new();
            loop {
                let batch = store
                    .fire_due_timers(Timestamp(5_000), 7, |t| OutboxMessage {
                        id: format!("timer:{}", t.id),
                        topic: "workflow.steps.wait".into(),
                        key: t.instance_id.clone(),
                        payload: t.id.clone().into_bytes(),
                    })
                    .await;
                match batch {
                    Ok(b) if b.is_empty() => return Ok::<_, StoreError>(fired),
                    Ok(b) => fired.extend(b.into_iter().map(|t| t.id)),
                    // SQLite may report a busy database under four writers: try again.
                    Err(e) if e.is_retryable() => continue,
                    Err(e) => return Err(e),
                }
            }
        });
    }
    let mut all = Vec::new();
    while let Some(done) = tasks.join_next().await {
        all.extend(done??);
    }
    let unique: HashSet<&String> = all.iter().collect();
    assert_eq!(all.len(), 150, "each due timer fired exactly once");
    assert_eq!(unique.len(), 150);
    let outbox = store.fetch_outbox(0).await?;
    assert_eq!(outbox.len(), 150, "one message per firing");
    assert_eq!(store.next_timer_due().await?, Some(Timestamp(100_001)));
    let listed = store.list_timers("p1", &rec.info.id).await?;
    assert_eq!(
        listed.iter().filter(|(_, fired)| fired.is_some()).count(),
        150
    );
    Ok(())
}

async fn decision_outcomes_keep_the_first(store: Store) -> TestResult {
    let outcome = |accepted: bool| DecisionOutcome {
        decision_id: "d1".into(),
        partner_id: "p1".into(),
        instance_id: "i1".into(),
        step_index: 1,
        accepted,
        code: (!accepted).then(|| "step_not_waiting".to_string()),
        message: None,
        decided_at: Timestamp(7),
    };
    store.record_decision_outcome(&outcome(true)).await?;
    store.record_decision_outcome(&outcome(false)).await?;
    let got = store.get_decision_outcome("p1", "d1").await?;
    assert_eq!(got, Some(outcome(true)));
    assert_eq!(
        store.get_decision_outcome("p2", "d1").await?,
        None,
        "tenancy"
    );
    Ok(())
}

/// The accepted outcome of a decision applied to `rec` (its id derived from the instance's).
fn applied_decision(rec: &InstanceRecord) -> DecisionOutcome {
    DecisionOutcome {
        decision_id: format!("decision-{}", rec.info.id),
        partner_id: rec.info.partner_id.clone(),
        instance_id: rec.info.id.clone(),
        step_index: 1,
        accepted: true,
        code: None,
        message: None,
        decided_at: Timestamp(9),
    }
}

/// A create and a commit moved into the store come back as they were written: the create's
/// record as its answer (also when its key was taken: the existing instance, written alone
/// from the parts handed back), the commit whole once committed, a stale one refused.
async fn owned_creates_and_commits_come_back_as_written(store: Store) -> TestResult {
    let new = |rec: &InstanceRecord| NewInstance {
        rec: rec.clone(),
        outbox: vec![message(&rec.info.id)],
        audit: vec![draft(
            &instance_stream(rec),
            "instance.created",
            json!({"status": "running"}),
        )],
        timers: vec![],
        deliveries: vec![],
        at_head: false,
    };
    let rec = instance("p1", "t1", Some("owned-1"));
    let outcome = store.create_owned(new(&rec)).await?;
    assert_eq!(outcome, CreateOutcome::Created(rec.clone()));
    let again = instance("p1", "t1", Some("owned-1"));
    let outcome = store.create_owned(new(&again)).await?;
    assert_eq!(outcome, CreateOutcome::Existing(rec.clone()));
    assert_eq!(store.get_instance("p1", &again.info.id).await?, None);

    let next = advanced(&rec, InstanceStatus::Waiting);
    let commit = InstanceCommit {
        rec: next.clone(),
        expected_version: 1,
        outbox: vec![message(&rec.info.id)],
        audit: vec![draft(
            &instance_stream(&rec),
            "step.completed",
            json!({"index": 0}),
        )],
        timers: vec![],
        deliveries: vec![],
        decision: None,
    };
    let back = store.commit_owned(commit.clone()).await?;
    assert_eq!(back, commit, "the commit comes back as it went in");
    assert_eq!(store.get_instance("p1", &rec.info.id).await?, Some(next));
    let stale = store.commit_owned(commit).await;
    assert!(
        matches!(stale, Err(StoreError::Conflict { .. })),
        "{stale:?}"
    );
    let queued = store.fetch_outbox(0).await?;
    assert_eq!(
        queued.len(),
        2,
        "the create's message and the commit's: {queued:?}"
    );
    let trail = store.list_audit("p1", &instance_stream(&rec)).await?;
    assert_eq!(verify_audit_chain(&trail), Ok(2));
    Ok(())
}

/// A transition commit records the decision it applied in the same transaction; a commit
/// that loses its version check records neither.
async fn a_decision_outcome_commits_with_its_transition(store: Store) -> TestResult {
    let rec = instance("p1", "t1", None);
    created(&store, &rec).await?;
    let next = advanced(&rec, InstanceStatus::Waiting);
    let decision = applied_decision(&rec);
    let stale = DecisionOutcome {
        decision_id: "decision-stale".into(),
        ..decision.clone()
    };
    let refused = store
        .commit_transition(&next, 5, &[], &[], &[], &[], Some(&stale))
        .await;
    assert!(
        matches!(refused, Err(StoreError::Conflict { .. })),
        "{refused:?}"
    );
    assert_eq!(
        store.get_decision_outcome("p1", "decision-stale").await?,
        None
    );
    store
        .commit_transition(&next, 1, &[], &[], &[], &[], Some(&decision))
        .await?;
    assert_eq!(
        store
            .get_decision_outcome("p1", &decision.decision_id)
            .await?,
        Some(decision)
    );
    assert_eq!(store.get_instance("p1", &rec.info.id).await?, Some(next));
    Ok(())
}

/// A group of commits that each applied a decision (the approval pool's usual group) records
/// every written commit's outcome (PostgreSQL: in one statement) and none of a refused one's.
async fn a_group_commit_records_each_decision_it_applied(store: Store) -> TestResult {
    let recs = [
        instance("p1", "t1", None),
        instance("p1", "t1", None),
        instance("p1", "t1", None),
    ];
    for rec in &recs {
        created(&store, rec).await?;
    }
    let commits: Vec<InstanceCommit> = recs
        .iter()
        .enumerate()
        .map(|(i, rec)| InstanceCommit {
            rec: advanced(rec, InstanceStatus::Waiting),
            // The last one is stale: refused, its decision not recorded.
            expected_version: if i == 2 { 7 } else { 1 },
            outbox: vec![],
            audit: vec![],
            timers: vec![],
            deliveries: vec![],
            decision: Some(applied_decision(rec)),
        })
        .collect();
    let results = store.commit_instances(&commits).await;
    assert!(results[0].is_ok() && results[1].is_ok(), "{results:?}");
    assert!(
        matches!(results[2], Err(StoreError::Conflict { .. })),
        "{results:?}"
    );
    for (i, rec) in recs.iter().enumerate() {
        let decision = applied_decision(rec);
        let recorded = store
            .get_decision_outcome("p1", &decision.decision_id)
            .await?;
        assert_eq!(recorded, (i < 2).then_some(decision), "decision {i}");
    }
    Ok(())
}

/// A group of distinct instances of two partners where some commits are refused before
/// writing (a stale version, an unknown instance, another partner's instance id): those are
/// answered alone and write nothing; every other commit is written with its steps, outbox rows
/// and audit events, each stream's chain continuing from its own head (one stream already
/// three events long, the others new since their create).
async fn group_commit_refuses_alone_and_chains_every_stream(store: Store) -> TestResult {
    let recs = [
        instance("p1", "t1", None),
        instance("p2", "t1", None),
        instance("p1", "t1", None),
        instance("p2", "t1", None),
    ];
    for rec in &recs {
        created(&store, rec).await?;
    }
    // recs[0]'s stream gets longer first, so its head is not the create's.
    let first = advanced(&recs[0], InstanceStatus::Waiting);
    let events = [
        draft(
            &instance_stream(&recs[0]),
            "instance.advanced",
            json!({"n": 1}),
        ),
        draft(
            &instance_stream(&recs[0]),
            "instance.advanced",
            json!({"n": 2}),
        ),
    ];
    store
        .commit_instance(&first, 1, &[message(&recs[0].info.id)], &events)
        .await?;
    let commit = |rec: &InstanceRecord, expected_version: i64| InstanceCommit {
        rec: advanced(rec, InstanceStatus::Waiting),
        expected_version,
        outbox: vec![message(&rec.info.id)],
        audit: vec![draft(&instance_stream(rec), "instance.advanced", json!({}))],
        timers: vec![],
        deliveries: vec![],
        decision: Some(applied_decision(rec)),
    };
    let unknown = instance("p1", "t1", None);
    let mut foreign = advanced(&recs[3], InstanceStatus::Waiting);
    foreign.info.partner_id = "p1".into();
    let group = [
        commit(&first, 2),
        commit(&recs[1], 1),
        // Stale: recs[2] is at version 1.
        commit(&recs[2], 7),
        commit(&unknown, 1),
        InstanceCommit {
            rec: foreign,
            ..commit(&recs[3], 1)
        },
    ];
    let results = store.commit_instances(&group).await;
    assert!(results[0].is_ok(), "{:?}", results[0]);
    assert!(results[1].is_ok(), "{:?}", results[1]);
    assert!(
        matches!(
            results[2],
            Err(StoreError::Conflict {
                what: "instance",
                ..
            })
        ),
        "{:?}",
        results[2]
    );
    for r in &results[3..] {
        assert!(
            matches!(
                r,
                Err(StoreError::NotFound {
                    what: "instance",
                    ..
                })
            ),
            "{r:?}"
        );
    }

    assert_eq!(
        store.get_instance("p1", &recs[0].info.id).await?.unwrap(),
        group[0].rec
    );
    assert_eq!(
        store.get_instance("p2", &recs[1].info.id).await?.unwrap(),
        group[1].rec
    );
    assert_eq!(
        store.get_instance("p1", &recs[2].info.id).await?.unwrap(),
        recs[2]
    );
    assert_eq!(
        store.get_instance("p2", &recs[3].info.id).await?.unwrap(),
        recs[3]
    );
    assert_eq!(store.get_instance("p1", &unknown.info.id).await?, None);
    // A decision outcome rides with its commit: recorded for those written, not for the
    // refused.
    for (rec, written) in [
        (&recs[0], true),
        (&recs[1], true),
        (&recs[2], false),
        (&unknown, false),
        (&recs[3], false),
    ] {
        let outcome = applied_decision(rec);
        let got = store
            .get_decision_outcome(&rec.info.partner_id, &outcome.decision_id)
            .await?;
        assert_eq!(got, written.then_some(outcome), "{}", rec.info.id);
    }
    let mirrored = |id: String| {
        let store = store.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT COUNT(*) FROM workflow_step_executions WHERE instance_id = $1",
            )
            .bind(id)
            .fetch_one(store.pool())
            .await
        }
    };
    assert_eq!(
        mirrored(recs[1].info.id.clone()).await?,
        2,
        "written: both steps mirrored"
    );
    assert_eq!(
        mirrored(recs[2].info.id.clone()).await?,
        1,
        "refused: only the create's step"
    );

    let outbox: Vec<String> = store
        .fetch_outbox(0)
        .await?
        .into_iter()
        .map(|m| m.id)
        .collect();
    // 4 creates, the first commit, then the two written commits of the group, in order.
    assert_eq!(outbox.len(), 7, "{outbox:?}");
    assert_eq!(outbox[5], group[0].outbox[0].id);
    assert_eq!(outbox[6], group[1].outbox[0].id);

    for (partner, rec, events) in [
        ("p1", &recs[0], 4),
        ("p2", &recs[1], 2),
        ("p1", &recs[2], 1),
        ("p2", &recs[3], 1),
    ] {
        let trail = store.list_audit(partner, &instance_stream(rec)).await?;
        assert_eq!(verify_audit_chain(&trail), Ok(events), "{}", rec.info.id);
    }
    Ok(())
}

/// Several commits in one group transaction: a commit that loses its version check (here to an
/// earlier commit of the same group) is refused alone and writes nothing; one that fails after
/// it started writing (a duplicate outbox id) rolls back alone; the others commit, with their
/// outbox rows and a valid audit chain.
async fn group_commit_answers_each_commit_as_alone(store: Store) -> TestResult {
    let (a, b, c) = (
        instance("p1", "t1", None),
        instance("p1", "t1", None),
        instance("p1", "t1", None),
    );
    for rec in [&a, &b, &c] {
        created(&store, rec).await?;
    }
    let commit = |rec: &InstanceRecord, status, outbox: Vec<OutboxMessage>| InstanceCommit {
        rec: advanced(rec, status),
        expected_version: 1,
        outbox,
        audit: vec![draft(&instance_stream(rec), "instance.advanced", json!({}))],
        timers: vec![],
        deliveries: vec![],
        decision: None,
    };
    let dup = message(&c.info.id);
    let group = [
        commit(&a, InstanceStatus::Waiting, vec![message(&a.info.id)]),
        // Read the same version as the first: loses to it.
        commit(&a, InstanceStatus::Cancelled, vec![message(&a.info.id)]),
        commit(&b, InstanceStatus::Waiting, vec![message(&b.info.id)]),
        commit(&c, InstanceStatus::Waiting, vec![dup.clone(), dup]),
    ];
    let results = store.commit_instances(&group).await;
    assert_eq!(results.len(), 4);
    assert!(results[0].is_ok(), "{:?}", results[0]);
    assert!(
        matches!(
            results[1],
            Err(StoreError::Conflict {
                what: "instance",
                ..
            })
        ),
        "{:?}",
        results[1]
    );
    assert!(results[2].is_ok(), "{:?}", results[2]);
    assert!(
        matches!(results[3], Err(StoreError::AlreadyExists { .. })),
        "{:?}",
        results[3]
    );

    let stored_a = store.get_instance("p1", &a.info.id).await?.unwrap();
    assert_eq!(stored_a, group[0].rec);
    assert_eq!(stored_a.state.status, InstanceStatus::Waiting);
    assert_eq!(
        store.get_instance("p1", &b.info.id).await?.unwrap(),
        group[2].rec
    );
    assert_eq!(store.get_instance("p1", &c.info.id).await?.unwrap(), c);

    // Outbox: the three creates' rows, then the two winning commits' rows, in commit order.
    let outbox: Vec<String> = store
        .fetch_outbox(0)
        .await?
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(outbox.len(), 5, "{outbox:?}");
    assert_eq!(outbox[3], group[0].outbox[0].id);
    assert_eq!(outbox[4], group[2].outbox[0].id);

    for (rec, events) in [(&a, 2), (&b, 2), (&c, 1)] {
        let trail = store.list_audit("p1", &instance_stream(rec)).await?;
        assert_eq!(verify_audit_chain(&trail), Ok(events));
    }

    // The same through the ordinary entry point, racing: exactly one of two commits of one
    // read wins, however they are grouped.
    let (s1, s2) = (store.clone(), store.clone());
    let (x, y) = (
        advanced(&stored_a, InstanceStatus::Waiting),
        advanced(&stored_a, InstanceStatus::Cancelled),
    );
    let (r1, r2) = tokio::join!(
        s1.commit_instance(&x, 2, &[], &[]),
        s2.commit_instance(&y, 2, &[], &[])
    );
    assert!(r1.is_ok() != r2.is_ok(), "{r1:?} {r2:?}");
    assert_eq!(
        store.get_instance("p1", &a.info.id).await?.unwrap().version,
        3
    );
    Ok(())
}
