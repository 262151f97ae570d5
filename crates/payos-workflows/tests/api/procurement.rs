//! The spec's Procurement Approval example, end to end.

use serde_json::{json, Value};

use crate::helpers::{spawn_app, Backend, PROCUREMENT};

async fn seed_template_routes_small_and_large_procurements(backend: Backend) {
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    let tpl = app.create_template(&p.requester, PROCUREMENT).await;
    assert_eq!(tpl["version"], 1);
    assert_eq!(tpl["step_count"], 4);
    let tid = tpl["id"].as_str().unwrap_or_default();

    let small = app
        .start(&p.requester, tid, json!({"id": "tr_small", "amount": 500, "currency": "USD", "metadata": {"type": "procurement"}}))
        .await;
    let large = app
        .start(&p.requester, tid, json!({"id": "tr_large", "amount": 5000, "currency": "USD", "metadata": {"type": "procurement"}}))
        .await;

    // $500: no approval needed; skip_to:3 lands on "Execute Payment", which runs the transfer
    // in the PayOS sandbox and completes the instance.
    let s = app
        .wait_for(
            &p.requester,
            small["id"].as_str().unwrap_or_default(),
            "completed",
            |b| b["status"] == "completed",
        )
        .await;
    assert_eq!(s["current_step"], Value::Null);
    assert_eq!(s["steps"][3]["name"], "Execute Payment");
    assert_eq!(
        s["steps"][3]["output"]["response"]["body"]["status"],
        "executed"
    );
    assert_eq!(
        s["steps"][3]["output"]["response"]["body"]["transfer_id"],
        "tr_small"
    );
    let counts = app
        .sandbox
        .counts("tr_small")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(counts.executions, 1, "the transfer executed exactly once");
    let statuses: Vec<_> = s["steps"]
        .as_array()
        .map(|a| a.iter().map(|x| x["status"].clone()).collect())
        .unwrap_or_default();
    assert_eq!(
        statuses,
        vec![
            json!("completed"),
            json!("skipped"),
            json!("skipped"),
            json!("completed")
        ]
    );
    assert_eq!(
        s["steps"][0]["output"],
        json!({"result": true, "route": "skip_to:3"})
    );
    assert_eq!(s["steps"][0]["actor"]["id"], "pool:condition");
    // The seed's {{trigger.id}} was rendered when the step started, and recorded.
    assert_eq!(s["steps"][3]["input"]["params"]["transfer_id"], "tr_small");

    // $5,000: waits on the CFO, with a 48-hour deadline.
    let l = app
        .wait_for(
            &p.requester,
            large["id"].as_str().unwrap_or_default(),
            "waiting for the CFO",
            |b| b["status"] == "waiting" && b["current_step"]["index"] == 1,
        )
        .await;
    assert_eq!(l["current_step"]["name"], "CFO Approval");
    assert_eq!(l["waiting_on"]["kind"], "approval");
    assert_eq!(
        l["waiting_on"]["detail"]["approvers"],
        json!([{"type": "role", "value": "cfo"}])
    );
    let since = chrono_ms(&l["waiting_on"]["since"]);
    let due = chrono_ms(&l["waiting_on"]["due"]);
    assert_eq!(due - since, 48 * 3_600_000);
    assert_eq!(l["steps"][0]["output"]["result"], false);
}

fn chrono_ms(v: &serde_json::Value) -> i64 {
    v.as_str()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .map(|d| d.timestamp_millis())
        .unwrap_or_else(|| panic!("not a time: {v}"))
}

async fn evaluation_error_fails_the_step_with_a_stored_error(backend: Backend) {
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    let tpl = app.create_template(&p.requester, PROCUREMENT).await;
    let inst = app
        .start(
            &p.requester,
            tpl["id"].as_str().unwrap_or_default(),
            json!({"id": "tr"}),
        )
        .await;
    let b = app
        .wait_for(
            &p.requester,
            inst["id"].as_str().unwrap_or_default(),
            "failed",
            |b| b["status"] == "failed",
        )
        .await;
    assert_eq!(b["steps"][0]["status"], "failed");
    let err = b["steps"][0]["error"].as_str().unwrap_or_default();
    assert!(err.contains("amount"), "{err}");
    assert_eq!(b["current_step"], serde_json::Value::Null);
    assert_eq!(b["waiting_on"], serde_json::Value::Null);
}

async fn audit_trail_is_hash_chained_and_verifies(backend: Backend) {
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    let tpl = app.create_template(&p.requester, PROCUREMENT).await;
    let inst = app
        .start(
            &p.requester,
            tpl["id"].as_str().unwrap_or_default(),
            json!({"id": "t", "amount": 5000}),
        )
        .await;
    let id = inst["id"].as_str().unwrap_or_default().to_string();
    app.wait_for(&p.requester, &id, "waiting", |b| {
        b["status"] == "waiting" && b["current_step"]["index"] == 1
    })
    .await;
    let (s, _) = app
        .post(
            &format!("/v1/workflows/instances/{id}/cancel"),
            &p.cfo,
            json!({"reason": "not needed"}),
        )
        .await;
    assert_eq!(s, 200);
    let (s, ev) = app
        .get(
            &format!("/v1/workflows/instances/{id}/events"),
            &p.requester,
        )
        .await;
    assert_eq!(s, 200, "{ev}");
    assert_eq!(ev["chain"]["verified"], true, "{ev:#}");
    let kinds: Vec<_> = ev["data"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| e["kind"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(kinds.first().map(String::as_str), Some("instance.created"));
    assert_eq!(kinds.last().map(String::as_str), Some("instance.cancelled"));
    assert!(kinds.iter().any(|k| k == "step.completed"));
    let last = ev["data"]
        .as_array()
        .and_then(|a| a.last())
        .cloned()
        .unwrap_or_default();
    assert_eq!(last["actor"]["id"], "carol");
    assert_eq!(last["reason"], "not needed");
    // The condition and the CFO approval started inline, in the create's transition (the
    // approval's deadline timer written with it), or each through its pool's command, as the
    // runtime is configured; the audit trail says which.
    let started: Vec<(u64, bool)> = ev["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["kind"] == "step.started")
        .map(|e| {
            let after = &e["after"];
            (
                after["index"].as_u64().unwrap_or(u64::MAX),
                after["inline"] == true,
            )
        })
        .collect();
    let inline = !backend.inline_steps().is_empty();
    assert_eq!(started, vec![(0, inline), (1, inline)], "{ev:#}");
    for pair in ev["data"]
        .as_array()
        .map(|a| {
            a.windows(2)
                .map(|w| (w[0].clone(), w[1].clone()))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
    {
        assert_eq!(pair.1["prev_hash"], pair.0["hash"]);
    }
}

crate::on_both_stores!(
    seed_template_routes_small_and_large_procurements,
    evaluation_error_fails_the_step_with_a_stored_error,
    audit_trail_is_hash_chained_and_verifies,
);

crate::stepwise!(
    embedded: [
        seed_template_routes_small_and_large_procurements,
        evaluation_error_fails_the_step_with_a_stored_error,
        audit_trail_is_hash_chained_and_verifies,
    ],
    distributed: [seed_template_routes_small_and_large_procurements],
);

crate::on_distributed!(
    evaluation_error_fails_the_step_with_a_stored_error,
    seed_template_routes_small_and_large_procurements,
    audit_trail_is_hash_chained_and_verifies,
);
