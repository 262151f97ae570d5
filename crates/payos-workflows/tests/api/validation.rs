//! Every template validation error through HTTP: 422 with the JSON path of each problem, 400 for
//! malformed JSON, and hostile expressions that leave the server up.

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{assert_error, paths, spawn_app, Backend, PROCUREMENT};

fn seed() -> Value {
    serde_json::from_str(PROCUREMENT).unwrap_or_default()
}

/// The seed template with one change applied.
fn with(change: impl FnOnce(&mut Value)) -> Value {
    let mut doc = seed();
    change(&mut doc);
    doc
}

async fn every_invalid_template_is_a_422_with_paths(backend: Backend) {
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "unknown step type",
            with(|d| d["steps"][1]["type"] = json!("aproval")),
            "$.steps[1].type",
        ),
        (
            "unknown top-level field",
            with(|d| d["trigger_typ"] = json!("manual")),
            "$.trigger_typ",
        ),
        (
            "unknown config field",
            with(|d| d["steps"][1]["config"]["timeout_hrs"] = json!(4)),
            "$.steps[1].config.timeout_hrs",
        ),
        (
            "missing config",
            with(|d| {
                d["steps"][2].as_object_mut().map(|o| o.remove("config"));
            }),
            "$.steps[2].config",
        ),
        (
            "mistyped config",
            with(|d| d["steps"][1]["config"]["timeout_hours"] = json!("soon")),
            "$.steps[1].config.timeout_hours",
        ),
        (
            "expression does not compile",
            with(|d| d["steps"][0]["config"]["expression"] = json!("trigger.amount <=")),
            "$.steps[0].config.expression",
        ),
        (
            "unknown root",
            with(|d| d["steps"][0]["config"]["expression"] = json!("transfer.amount <= 1000")),
            "$.steps[0].config.expression",
        ),
        (
            "skip_to out of range",
            with(|d| d["steps"][0]["config"]["if_true"] = json!("skip_to:9")),
            "$.steps[0].config.if_true",
        ),
        (
            "skip_to backwards",
            with(|d| {
                d["steps"][2] = json!({"type": "condition", "name": "Loop", "config": {"expression": "true", "if_true": "skip_to:1"}});
            }),
            "$.steps[2].config.if_true",
        ),
        (
            "unknown approver type",
            with(|d| d["steps"][1]["config"]["approvers"]["type"] = json!("group")),
            "$.steps[1].config.approvers.type",
        ),
        (
            "unknown trigger op",
            with(|d| d["trigger_config"]["conditions"][0]["op"] = json!("like")),
            "$.trigger_config.conditions[0].op",
        ),
        (
            "unknown trigger type",
            with(|d| d["trigger_type"] = json!("weekly")),
            "$.trigger_type",
        ),
        ("no steps", with(|d| d["steps"] = json!([])), "$.steps"),
        (
            "too many steps",
            with(|d| {
                d["steps"] = json!((0..51).map(|i| json!({"type": "condition", "name": format!("s{i}"), "config": {"expression": "true"}})).collect::<Vec<_>>())
            }),
            "$.steps",
        ),
        (
            "bad placeholder",
            with(|d| d["steps"][3]["config"]["params"]["transfer_id"] = json!("{{ nope.id }}")),
            "$.steps[3].config.params.transfer_id",
        ),
    ];
    for (what, doc, path) in cases {
        let (s, b) = app
            .call_raw(
                Method::POST,
                "/v1/workflows/templates",
                &p.requester,
                serde_json::to_vec(&doc).unwrap_or_default(),
            )
            .await;
        assert_eq!(s, 422, "{what}: {b:#}");
        assert_error(&b, "validation_failed");
        assert!(
            paths(&b).iter().any(|p| p == path),
            "{what}: expected a problem at {path}, got {:?}",
            paths(&b)
        );
    }

    // All problems at once, not only the first.
    let doc = with(|d| {
        d["steps"][1]["type"] = json!("aproval");
        d["steps"][3]["config"]["action"] = json!("teleport");
        d["name"] = json!("");
    });
    let (s, b) = app
        .call_raw(
            Method::POST,
            "/v1/workflows/templates",
            &p.requester,
            serde_json::to_vec(&doc).unwrap_or_default(),
        )
        .await;
    assert_eq!(s, 422);
    let got = paths(&b);
    for path in ["$.steps[1].type", "$.steps[3].config.action", "$.name"] {
        assert!(got.iter().any(|p| p == path), "missing {path} in {got:?}");
    }

    // PUT validates the same way and keeps the old version.
    let tpl = app.create_template(&p.requester, PROCUREMENT).await;
    let tid = tpl["id"].as_str().unwrap_or_default();
    let bad = with(|d| d["steps"] = json!([]));
    let (s, _) = app
        .call_raw(
            Method::PUT,
            &format!("/v1/workflows/templates/{tid}"),
            &p.requester,
            serde_json::to_vec(&bad).unwrap_or_default(),
        )
        .await;
    assert_eq!(s, 422);
    let (_, got) = app
        .get(&format!("/v1/workflows/templates/{tid}"), &p.requester)
        .await;
    assert_eq!(got["version"], 1);
}

async fn malformed_json_is_a_400_with_position(backend: Backend) {
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    let (s, b) = app
        .call_raw(
            Method::POST,
            "/v1/workflows/templates",
            &p.requester,
            b"{\n  \"name\": \"x\",\n  oops\n}".to_vec(),
        )
        .await;
    assert_eq!(s, 400, "{b}");
    assert_error(&b, "invalid_json");
    let msg = b["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("line 3"), "{msg}");
    let (s, b) = app
        .call_raw(
            Method::POST,
            "/v1/workflows/instances",
            &p.requester,
            b"{\"template_id\": ".to_vec(),
        )
        .await;
    assert_eq!(s, 400, "{b}");
    assert_error(&b, "invalid_json");
}

async fn oversized_documents_are_refused(backend: Backend) {
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    let doc = with(|d| d["description"] = json!("x".repeat(70_000)));
    let (s, b) = app
        .call_raw(
            Method::POST,
            "/v1/workflows/templates",
            &p.requester,
            serde_json::to_vec(&doc).unwrap_or_default(),
        )
        .await;
    assert_eq!(s, 422, "{b}");
    assert_eq!(paths(&b), vec!["$".to_string()]);
    let (s, b) = app
        .call_raw(
            Method::POST,
            "/v1/workflows/templates",
            &p.requester,
            vec![b' '; 2 * 1024 * 1024],
        )
        .await;
    assert_eq!(s, 413, "{b}");
    assert_error(&b, "payload_too_large");
}

async fn hostile_expressions_are_refused_and_the_server_stays_up(backend: Backend) {
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    let hostile = [
        format!("{}1{}", "(".repeat(5000), ")".repeat(5000)),
        format!("{}true", "!".repeat(5000)),
        format!("{}1", "-".repeat(5000)),
        "[".repeat(3000),
        "trigger.a.b.c.d.e.f.g.h.i.j.k.l.m.n.o.p.q.r.s.t.u.v.w.x.y.z".repeat(200),
        "[1,2,3].map(x, [1,2,3].map(y, [1,2,3].map(z, [1,2,3].map(w, w))))".to_string(),
    ];
    for expr in hostile {
        let doc = with(|d| d["steps"][0]["config"]["expression"] = json!(expr));
        let (s, b) = app
            .call_raw(
                Method::POST,
                "/v1/workflows/templates",
                &p.requester,
                serde_json::to_vec(&doc).unwrap_or_default(),
            )
            .await;
        assert_eq!(s, 422, "{}: {b}", &expr[..expr.len().min(40)]);
        assert!(
            paths(&b)
                .iter()
                .any(|p| p == "$.steps[0].config.expression"),
            "{b}"
        );
    }
    let (s, _) = app.get("/v1/workflows/templates", &p.requester).await;
    assert_eq!(s, 200, "the server is still up");
}

async fn outbound_urls_are_checked_against_ssrf_when_saved(backend: Backend) {
    let app = spawn_app(backend).await;
    let p = app.partner("acme").await;
    let http = |url: &str| {
        json!({"name": "h", "trigger_type": "manual", "steps": [
            {"type": "action", "name": "Call", "config": {"action": "http", "params": {"url": url}}}
        ]})
    };
    let hook = |url: &str| {
        json!({"name": "n", "trigger_type": "manual", "steps": [
            {"type": "notification", "name": "Tell", "config": {"channel": "webhook", "url": url}}
        ]})
    };
    // An approval that notifies a webhook when it starts waiting (and on reminders, overdue
    // notices and escalations): step 1, after a condition.
    let approval_hook = |url: &str| {
        json!({"name": "a", "trigger_type": "manual", "steps": [
            {"type": "condition", "name": "Check", "config": {"expression": "true"}},
            {"type": "approval", "name": "Approve", "config": {
                "approvers": {"type": "role", "value": "cfo"},
                "notify": {"webhook": {"url": url}, "email": {"to": "cfo@example.com", "subject": "s"}}}}
        ]})
    };
    let refused = [
        (
            approval_hook("http://169.254.169.254/latest/meta-data"),
            "$.steps[1].config.notify.webhook.url",
        ),
        (
            approval_hook("http://10.0.0.7:8080/hooks"),
            "$.steps[1].config.notify.webhook.url",
        ),
        (
            http("http://169.254.169.254/latest/meta-data"),
            "$.steps[0].config.params.url",
        ),
        (
            http("http://10.1.2.3/internal"),
            "$.steps[0].config.params.url",
        ),
        (
            http("http://localhost:9000/admin"),
            "$.steps[0].config.params.url",
        ),
        (http("http://[::1]/x"), "$.steps[0].config.params.url"),
        (hook("http://192.168.1.10/hook"), "$.steps[0].config.url"),
    ];
    for (doc, path) in refused {
        let (s, b) = app
            .call_raw(
                Method::POST,
                "/v1/workflows/templates",
                &p.requester,
                serde_json::to_vec(&doc).unwrap_or_default(),
            )
            .await;
        assert_eq!(s, 422, "{doc}: {b}");
        assert_eq!(paths(&b), vec![path.to_string()], "{b}");
        assert!(
            b["error"]["details"][0]["problem"]
                .as_str()
                .unwrap_or_default()
                .contains("egress"),
            "{b}"
        );
    }
    // Allow-listed (this suite allows 127.0.0.1), public, and templated URLs are accepted.
    for doc in [
        http("http://127.0.0.1:9/ok"),
        hook("https://hooks.example.com/x"),
        http("{{trigger.url}}"),
        approval_hook("https://hooks.example.com/approvals"),
        approval_hook("http://127.0.0.1:9/approvals"),
    ] {
        let (s, b) = app
            .call_raw(
                Method::POST,
                "/v1/workflows/templates",
                &p.requester,
                serde_json::to_vec(&doc).unwrap_or_default(),
            )
            .await;
        assert_eq!(s, 201, "{doc}: {b}");
    }
    // A new version (PUT) is checked the same way, and the refused one is not saved.
    let (s, b) = app
        .call_raw(
            Method::POST,
            "/v1/workflows/templates",
            &p.requester,
            serde_json::to_vec(&approval_hook("https://hooks.example.com/a")).unwrap_or_default(),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let tid = b["id"].as_str().unwrap_or_default().to_string();
    let (s, b) = app
        .call_raw(
            Method::PUT,
            &format!("/v1/workflows/templates/{tid}"),
            &p.requester,
            serde_json::to_vec(&approval_hook("http://172.16.0.1/hook")).unwrap_or_default(),
        )
        .await;
    assert_eq!(s, 422, "{b}");
    assert_eq!(
        paths(&b),
        vec!["$.steps[1].config.notify.webhook.url".to_string()],
        "{b}"
    );
    let (_, got) = app
        .get(&format!("/v1/workflows/templates/{tid}"), &p.requester)
        .await;
    assert_eq!(got["version"], 1, "{got}");
}

crate::on_both_stores!(
    outbound_urls_are_checked_against_ssrf_when_saved,
    every_invalid_template_is_a_422_with_paths,
    malformed_json_is_a_400_with_position,
    oversized_documents_are_refused,
    hostile_expressions_are_refused_and_the_server_stays_up,
);
