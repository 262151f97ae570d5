//! Notifications through HTTP, on SQLite and PostgreSQL: webhooks delivered to a real local
//! receiver and verified the way a partner would (Standard Webhooks), retries on the documented
//! schedule on an injected clock, dead-lettering and redelivery, email to a real SMTP sink,
//! secret rotation, the SSRF check at send time, `wait_for_delivery`, approval notices
//! (`notify`, `remind_before`, `on_timeout: notify`) and partner isolation.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde_json::{json, Value};
use workflow_core::Timestamp;
use workflow_egress::webhook::{verify, DEFAULT_TOLERANCE, RETRY_SCHEDULE};
use workflow_egress::{EgressClient, EgressPolicy, Mailer, SmtpSettings, Timeouts};
use workflow_engine::ManualClock;
use workflow_testkit::smtp::SmtpSink;

use crate::helpers::{assert_error, spawn_app_with_notifier, Backend, TestApp};

const HOUR: i64 = 3_600_000;
const WAIT: Duration = Duration::from_secs(15);

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Hit {
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Hit {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    }
}

/// A partner's webhook endpoint: records every request, answers the scripted statuses in
/// order, then 200.
#[derive(Clone, Default)]
struct Receiver {
    hits: Arc<Mutex<Vec<Hit>>>,
    script: Arc<Mutex<VecDeque<u16>>>,
    url: String,
}

async fn hook(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> (StatusCode, String) {
    r.hits
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(Hit {
            headers,
            body: body.to_vec(),
        });
    let status = r
        .script
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .pop_front()
        .unwrap_or(200);
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    (status, format!("receiver says {}", status.as_u16()))
}

impl Receiver {
    async fn start(script: &[u16]) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let receiver = Receiver {
            url: format!("http://{addr}/hook"),
            script: Arc::new(Mutex::new(script.iter().copied().collect())),
            ..Receiver::default()
        };
        let router = axum::Router::new()
            .route("/hook", axum::routing::post(hook))
            .with_state(receiver.clone());
        tokio::spawn(async move { axum::serve(listener, router).await });
        receiver
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    async fn wait_for(&self, n: usize) -> Vec<Hit> {
        let deadline = Instant::now() + WAIT;
        loop {
            let hits = self.hits();
            if hits.len() >= n {
                return hits;
            }
            assert!(
                Instant::now() < deadline,
                "the receiver got {} request(s), expected {n}",
                hits.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// An app with a notifier (webhooks to loopback allowed, email to a local SMTP sink) on a
/// manual clock.
struct Env {
    app: TestApp,
    clock: Arc<ManualClock>,
    sink: SmtpSink,
}

async fn env(backend: Backend) -> Env {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let clock = Arc::new(ManualClock::new(Timestamp(now)));
    let sink = SmtpSink::start()
        .await
        .unwrap_or_else(|e| panic!("smtp sink: {e}"));
    // The receivers live on loopback: allow-listed explicitly, as an operator would.
    let policy =
        EgressPolicy::strict().allow_net("127.0.0.1/32".parse().unwrap_or_else(|e| panic!("{e}")));
    let http = EgressClient::new(policy, Timeouts::default()).unwrap_or_else(|e| panic!("{e}"));
    let mailer = Mailer::new(SmtpSettings::plain(
        "127.0.0.1",
        sink.addr.port(),
        "Workflows <wf@example.com>",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let notifier = Arc::new(step_workers::Notifier::new(http, Some(mailer)));
    let app = match backend {
        // The processes' notifier comes from their environment; their clock is the system's.
        Backend::Distributed | Backend::DistributedStepwise => {
            let mut env = backend.process_env();
            env.push((
                "WORKFLOWS_SMTP_URL",
                format!("smtp://127.0.0.1:{}", sink.addr.port()),
            ));
            env.push((
                "WORKFLOWS_SMTP_FROM",
                "Workflows <wf@example.com>".to_string(),
            ));
            TestApp::distributed_with_env(&env).await
        }
        Backend::Sqlite | Backend::Postgres | Backend::SqliteStepwise => {
            spawn_app_with_notifier(backend, clock.clone(), Some(notifier)).await
        }
    };
    Env { app, clock, sink }
}

fn id(v: &Value) -> String {
    v["id"].as_str().unwrap_or_default().to_string()
}

async fn start(app: &TestApp, key: &str, steps: Value, trigger: Value) -> String {
    let doc = json!({"name": "Notify", "trigger_type": "manual", "steps": steps});
    let tid = id(&app.create_template(key, &doc.to_string()).await);
    id(&app.start(key, &tid, trigger).await)
}

/// Poll the instance's deliveries until `done` holds on the list.
async fn deliveries(
    app: &TestApp,
    key: &str,
    iid: &str,
    what: &str,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let (s, b) = app
            .get(&format!("/v1/workflows/instances/{iid}/deliveries"), key)
            .await;
        assert_eq!(s, 200, "{b}");
        let list = b["data"].as_array().cloned().unwrap_or_default();
        if done(&list) {
            return list;
        }
        assert!(
            Instant::now() < deadline,
            "deliveries never reached: {what}; last: {b:#}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the instance has exactly `count` deliveries, each delivered.
async fn all_delivered(app: &TestApp, key: &str, iid: &str, count: usize) -> Vec<Value> {
    deliveries(app, key, iid, &format!("{count} delivered"), |l| {
        l.len() == count && l.iter().all(|d| d["status"] == "delivered")
    })
    .await
}

async fn secret(app: &TestApp, key: &str) -> Value {
    let (s, b) = app.get("/v1/workflows/webhooks/secret", key).await;
    assert_eq!(s, 200, "{b}");
    b
}

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

fn webhook_step(url: &str, extra: Value) -> Value {
    let mut config = json!({"channel": "webhook", "url": url, "event": "payment.approved",
        "payload": {"transfer": "{{ trigger.id }}", "amount": "{{ trigger.amount }}"}});
    if let (Value::Object(c), Value::Object(e)) = (&mut config, extra) {
        c.extend(e);
    }
    json!({"type": "notification", "name": "Tell the partner", "config": config})
}

async fn a_webhook_is_delivered_signed_and_logged(backend: Backend) {
    let Env { app, .. } = env(backend).await;
    let p = app.partner("acme").await;
    let rx = Receiver::start(&[]).await;
    let iid = start(
        &app,
        &p.requester,
        json!([webhook_step(&rx.url, json!({}))]),
        json!({"id": "tr_1", "amount": 250}),
    )
    .await;
    // The step did not wait for the delivery.
    app.wait_for(&p.requester, &iid, "completed", |b| {
        b["status"] == "completed"
    })
    .await;
    let hit = rx.wait_for(1).await.remove(0);
    let body = hit.json();
    assert_eq!(body["type"], "payment.approved");
    assert_eq!(body["data"], json!({"transfer": "tr_1", "amount": 250}));
    assert!(body["timestamp"].is_string(), "{body}");

    // The partner verifies it with its secret, as a Standard Webhooks library would.
    let whsec = secret(&app, &p.requester).await["secret"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(whsec.starts_with("whsec_"), "{whsec}");
    verify(
        &whsec,
        &hit.headers,
        &hit.body,
        now_secs(),
        DEFAULT_TOLERANCE,
    )
    .unwrap_or_else(|e| panic!("signature: {e}"));
    // A tampered body, or another secret, does not verify.
    let mut tampered = hit.body.clone();
    tampered.extend_from_slice(b" ");
    assert!(verify(
        &whsec,
        &hit.headers,
        &tampered,
        now_secs(),
        DEFAULT_TOLERANCE
    )
    .is_err());
    let forged = String::from_utf8_lossy(&hit.body).replace("tr_1", "tr_2");
    assert!(verify(
        &whsec,
        &hit.headers,
        forged.as_bytes(),
        now_secs(),
        DEFAULT_TOLERANCE
    )
    .is_err());
    assert!(verify(
        &workflow_egress::webhook::generate_secret(),
        &hit.headers,
        &hit.body,
        now_secs(),
        DEFAULT_TOLERANCE
    )
    .is_err());

    let list = deliveries(&app, &p.requester, &iid, "delivered", |l| {
        l.first().is_some_and(|d| d["status"] == "delivered")
    })
    .await;
    let d = &list[0];
    assert_eq!(
        hit.header("webhook-id"),
        d["id"].as_str().unwrap_or_default(),
        "webhook-id is the delivery id"
    );
    assert_eq!(
        (
            d["channel"].clone(),
            d["target"].clone(),
            d["purpose"].clone()
        ),
        (json!("webhook"), json!(rx.url), json!("step"))
    );
    assert_eq!(d["attempt_count"], 1);
    assert_eq!(d["attempts"][0]["status_code"], 200);
    assert_eq!(d["attempts"][0]["succeeded"], true);
    assert!(d["attempts"][0]["latency_ms"].is_number());
    assert_eq!(d["attempts"][0]["response_snippet"], "receiver says 200");
    // The instance's step records the queued delivery; the audit trail too.
    let inst = app
        .get(&format!("/v1/workflows/instances/{iid}"), &p.requester)
        .await
        .1;
    assert_eq!(
        inst["steps"][0]["output"]["delivery_id"], d["id"],
        "{inst:#}"
    );
    let (_, events) = app
        .get(
            &format!("/v1/workflows/instances/{iid}/events"),
            &p.requester,
        )
        .await;
    assert!(
        events["data"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["kind"] == "notification.queued")),
        "{events:#}"
    );
}

async fn a_failed_attempt_is_retried_on_the_schedule(backend: Backend) {
    let Env { app, clock, .. } = env(backend).await;
    let p = app.partner("acme").await;
    let rx = Receiver::start(&[500]).await;
    let iid = start(
        &app,
        &p.requester,
        json!([webhook_step(&rx.url, json!({}))]),
        json!({"id": "tr_2", "amount": 1}),
    )
    .await;
    let list = deliveries(&app, &p.requester, &iid, "retrying", |l| {
        l.first().is_some_and(|d| d["status"] == "retrying")
    })
    .await;
    let d = &list[0];
    assert_eq!(d["attempts"][0]["status_code"], 500);
    assert_eq!(d["attempts"][0]["response_snippet"], "receiver says 500");
    let (tried, next) = (
        d["attempts"][0]["attempted_at"]
            .as_str()
            .unwrap_or_default(),
        d["next_attempt_at"].as_str().unwrap_or_default(),
    );
    let gap = chrono::DateTime::parse_from_rfc3339(next)
        .map(|n| n.timestamp_millis())
        .unwrap_or(0)
        - chrono::DateTime::parse_from_rfc3339(tried)
            .map(|t| t.timestamp_millis())
            .unwrap_or(0);
    assert_eq!(
        gap,
        RETRY_SCHEDULE[1].as_millis() as i64,
        "the second attempt waits 5 s"
    );
    // Not before its time.
    clock.advance(RETRY_SCHEDULE[1].as_millis() as i64 - 1000);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(rx.hits().len(), 1, "retried early");
    clock.advance(1000);
    let list = deliveries(&app, &p.requester, &iid, "delivered", |l| {
        l.first().is_some_and(|d| d["status"] == "delivered")
    })
    .await;
    assert_eq!(list[0]["attempt_count"], 2);
    let hits = rx.wait_for(2).await;
    assert_eq!(
        hits[0].header("webhook-id"),
        hits[1].header("webhook-id"),
        "stable across retries"
    );
    assert_eq!(
        hits[0].body, hits[1].body,
        "the same bytes on every attempt"
    );
}

async fn exhausted_retries_dead_letter_and_redeliver_succeeds(backend: Backend) {
    let Env { app, clock, .. } = env(backend).await;
    let p = app.partner("acme").await;
    let rx = Receiver::start(&[503; 7]).await;
    let iid = start(
        &app,
        &p.requester,
        json!([webhook_step(&rx.url, json!({}))]),
        json!({"id": "tr_3", "amount": 1}),
    )
    .await;
    for (n, wait) in RETRY_SCHEDULE.iter().enumerate().skip(1) {
        deliveries(
            &app,
            &p.requester,
            &iid,
            &format!("{n} failed attempt(s)"),
            |l| {
                l.first()
                    .is_some_and(|d| d["status"] == "retrying" && d["attempt_count"] == n)
            },
        )
        .await;
        clock.advance(wait.as_millis() as i64);
    }
    let list = deliveries(&app, &p.requester, &iid, "dead-lettered", |l| {
        l.first().is_some_and(|d| d["status"] == "dead_lettered")
    })
    .await;
    let d = list[0].clone();
    assert_eq!(d["attempt_count"], 7);
    assert!(
        d["last_error"].as_str().is_some_and(|e| e.contains("503")),
        "{d:#}"
    );
    let did = id(&d);

    let (s, b) = app
        .post(
            &format!("/v1/workflows/deliveries/{did}/redeliver"),
            &p.requester,
            json!({}),
        )
        .await;
    assert_eq!(s, 202, "{b}");
    assert_eq!(b["status"], "queued");
    let (s, b) = app
        .post(
            &format!("/v1/workflows/deliveries/{did}/redeliver"),
            &p.requester,
            json!({}),
        )
        .await;
    if s != 202 {
        // Only while the attempt is pending is it refused.
        assert_eq!(s, 409, "{b}");
        assert_error(&b, "delivery_in_progress");
    }
    let list = deliveries(
        &app,
        &p.requester,
        &iid,
        "delivered after redelivery",
        |l| l.first().is_some_and(|d| d["status"] == "delivered"),
    )
    .await;
    assert!(list[0]["attempt_count"].as_i64().is_some_and(|n| n >= 8));
    let (s, one) = app
        .get(&format!("/v1/workflows/deliveries/{did}"), &p.requester)
        .await;
    assert_eq!(s, 200, "{one}");
    assert_eq!(one["attempts"][7]["succeeded"], true, "{one:#}");
    let hits = rx.hits();
    assert!(
        hits.iter().all(|h| h.header("webhook-id") == did),
        "one webhook-id throughout"
    );
}

async fn an_email_arrives_at_the_smtp_sink(backend: Backend) {
    let Env { app, sink, .. } = env(backend).await;
    let p = app.partner("acme").await;
    let step = json!({"type": "notification", "name": "Mail", "config": {"channel": "email",
        "to": "{{ trigger.email }}", "subject": "Transfer {{ trigger.id }} approved",
        "body": "Amount: {{ trigger.amount }}"}});
    let iid = start(
        &app,
        &p.requester,
        json!([step]),
        json!({"id": "tr_4", "amount": 99, "email": "cfo@acme.test"}),
    )
    .await;
    let mail = sink
        .wait_for_messages(1, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .remove(0);
    assert_eq!(mail.rcpt_to, vec!["cfo@acme.test".to_string()]);
    assert_eq!(
        mail.header("Subject").as_deref(),
        Some("Transfer tr_4 approved")
    );
    assert!(mail.body().contains("Amount: 99"), "{}", mail.data);
    let list = deliveries(&app, &p.requester, &iid, "delivered", |l| {
        l.first().is_some_and(|d| d["status"] == "delivered")
    })
    .await;
    assert_eq!(
        (
            list[0]["channel"].clone(),
            list[0]["attempts"][0]["status_code"].clone()
        ),
        (json!("email"), json!(250))
    );
}

async fn rotation_signs_with_both_secrets(backend: Backend) {
    let Env { app, .. } = env(backend).await;
    let p = app.partner("acme").await;
    let old = secret(&app, &p.requester).await["secret"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let (s, rotated) = app
        .post(
            "/v1/workflows/webhooks/secret/rotate",
            &p.requester,
            json!({}),
        )
        .await;
    assert_eq!(s, 200, "{rotated}");
    let new = rotated["secret"].as_str().unwrap_or_default().to_string();
    assert_ne!(old, new);
    assert_eq!(rotated["previous_secret"], json!(old));
    assert!(rotated["previous_expires_at"].is_string());
    assert_eq!(rotated["rotation_grace_seconds"], 86_400);
    let rx = Receiver::start(&[]).await;
    start(
        &app,
        &p.requester,
        json!([webhook_step(&rx.url, json!({}))]),
        json!({"id": "tr_5", "amount": 1}),
    )
    .await;
    let hit = rx.wait_for(1).await.remove(0);
    let signatures = hit.header("webhook-signature");
    assert_eq!(
        signatures
            .split(' ')
            .filter(|s| s.starts_with("v1,"))
            .count(),
        2,
        "{signatures}"
    );
    for whsec in [&old, &new] {
        verify(
            whsec,
            &hit.headers,
            &hit.body,
            now_secs(),
            DEFAULT_TOLERANCE,
        )
        .unwrap_or_else(|e| panic!("a receiver holding either secret verifies: {e}"));
    }
}

async fn outbound_urls_are_checked_at_send_time(backend: Backend) {
    let Env { app, .. } = env(backend).await;
    let p = app.partner("acme").await;
    // A placeholder passes the check at save time; the rendered address is refused at send.
    let step = webhook_step("http://{{ trigger.host }}/latest/meta-data", json!({}));
    let iid = start(
        &app,
        &p.requester,
        json!([step]),
        json!({"id": "tr_6", "amount": 1, "host": "169.254.169.254"}),
    )
    .await;
    let list = deliveries(&app, &p.requester, &iid, "dead-lettered", |l| {
        l.first().is_some_and(|d| d["status"] == "dead_lettered")
    })
    .await;
    assert_eq!(
        list[0]["attempt_count"], 1,
        "a refused target is not retried"
    );
    assert!(
        list[0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("refused")),
        "{:#}",
        list[0]
    );
    assert_eq!(list[0]["attempts"][0]["status_code"], Value::Null);
}

async fn wait_for_delivery_holds_the_step_until_delivered_or_dead_lettered(backend: Backend) {
    let Env { app, clock, .. } = env(backend).await;
    let p = app.partner("acme").await;
    let rx = Receiver::start(&[500]).await;
    let after = json!({"type": "condition", "name": "After", "config": {"expression": "true"}});
    let steps = json!([
        webhook_step(&rx.url, json!({"wait_for_delivery": true})),
        after
    ]);
    let iid = start(
        &app,
        &p.requester,
        steps.clone(),
        json!({"id": "tr_7", "amount": 1}),
    )
    .await;
    deliveries(&app, &p.requester, &iid, "retrying", |l| {
        l.first().is_some_and(|d| d["status"] == "retrying")
    })
    .await;
    let waiting = app
        .wait_for(&p.requester, &iid, "waiting on the delivery", |b| {
            b["status"] == "waiting"
        })
        .await;
    assert_eq!(waiting["waiting_on"]["kind"], "notification", "{waiting:#}");
    clock.advance(RETRY_SCHEDULE[1].as_millis() as i64);
    let done = app
        .wait_for(&p.requester, &iid, "completed", |b| {
            b["status"] == "completed"
        })
        .await;
    assert_eq!(
        done["steps"][0]["output"]["status"], "delivered",
        "{done:#}"
    );

    // 410 Gone is final: dead-lettered at once, and the step fails the instance by default.
    let gone = Receiver::start(&[410]).await;
    let steps = json!([
        webhook_step(&gone.url, json!({"wait_for_delivery": true})),
        after
    ]);
    let iid = start(
        &app,
        &p.requester,
        steps,
        json!({"id": "tr_8", "amount": 1}),
    )
    .await;
    let failed = app
        .wait_for(&p.requester, &iid, "failed", |b| b["status"] == "failed")
        .await;
    assert!(
        failed["error"]
            .as_str()
            .is_some_and(|e| e.contains("not delivered")),
        "{failed:#}"
    );
}

async fn approvals_notify_remind_and_report_overdue(backend: Backend) {
    let Env { app, clock, sink } = env(backend).await;
    let p = app.partner("acme").await;
    let rx = Receiver::start(&[]).await;
    let step = json!({"type": "approval", "name": "CFO sign-off", "config": {
        "approvers": {"type": "role", "value": "cfo"}, "timeout": "24h", "remind_before": "2h",
        "on_timeout": {"action": "notify"},
        "notify": {"webhook": {"url": rx.url, "payload": {"transfer": "{{ trigger.id }}"}},
                   "email": {"to": "cfo@acme.test", "subject": "Please approve {{ trigger.id }}"}}}});
    let iid = start(
        &app,
        &p.requester,
        json!([step]),
        json!({"id": "tr_9", "amount": 5000}),
    )
    .await;
    let first = rx.wait_for(1).await.remove(0).json();
    assert_eq!(first["type"], "workflow.approval.requested");
    assert_eq!(first["data"]["payload"], json!({"transfer": "tr_9"}));
    assert_eq!(first["data"]["approvers"][0]["value"], "cfo");
    assert_eq!(first["data"]["instance_id"], json!(iid));
    let mail = sink
        .wait_for_messages(1, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        mail[0].header("Subject").as_deref(),
        Some("Please approve tr_9")
    );
    // The sink sees a message before its attempt is recorded. Jumping the manual clock past
    // the delivery lease while an attempt is unrecorded would re-queue it (a real clock never
    // jumps 22 h within one attempt), so let both attempts be recorded first.
    all_delivered(&app, &p.requester, &iid, 2).await;

    // Two hours before the deadline: a reminder, on both channels.
    clock.advance(22 * HOUR);
    let reminder = rx.wait_for(2).await.remove(1).json();
    assert_eq!(reminder["type"], "workflow.approval.reminder");
    let mail = sink
        .wait_for_messages(2, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        mail[1].header("Subject").as_deref(),
        Some("Reminder: Please approve tr_9")
    );
    assert_eq!(
        app.wait_for(&p.requester, &iid, "still waiting", |b| b["status"]
            == "waiting")
            .await["status"],
        "waiting"
    );

    all_delivered(&app, &p.requester, &iid, 4).await;

    // The deadline passes: an overdue notice, and the approval keeps waiting.
    clock.advance(2 * HOUR + 1);
    let overdue = rx.wait_for(3).await.remove(2).json();
    assert_eq!(overdue["type"], "workflow.approval.overdue");
    sink.wait_for_messages(3, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (_, events) = app
        .get(
            &format!("/v1/workflows/instances/{iid}/events"),
            &p.requester,
        )
        .await;
    let kinds: Vec<&str> = events["data"]
        .as_array()
        .map(|e| e.iter().filter_map(|e| e["kind"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        kinds.contains(&"approval.reminder") && kinds.contains(&"approval.overdue"),
        "{kinds:?}"
    );
    let inst = app
        .get(&format!("/v1/workflows/instances/{iid}"), &p.requester)
        .await
        .1;
    assert_eq!(inst["status"], "waiting", "{inst:#}");
    let list = all_delivered(&app, &p.requester, &iid, 6).await;
    let purposes: Vec<&str> = list.iter().filter_map(|d| d["purpose"].as_str()).collect();
    for purpose in [
        "approval_requested",
        "approval_reminder",
        "approval_overdue",
    ] {
        assert_eq!(
            purposes.iter().filter(|p| **p == purpose).count(),
            2,
            "{purposes:?}"
        );
    }
}

async fn deliveries_and_secrets_are_the_partners_own(backend: Backend) {
    let Env { app, .. } = env(backend).await;
    let acme = app.partner("acme").await;
    let globex = app.partner("globex").await;
    let rx = Receiver::start(&[]).await;
    let iid = start(
        &app,
        &acme.requester,
        json!([webhook_step(&rx.url, json!({}))]),
        json!({"id": "tr_10", "amount": 1}),
    )
    .await;
    let list = deliveries(&app, &acme.requester, &iid, "delivered", |l| {
        l.first().is_some_and(|d| d["status"] == "delivered")
    })
    .await;
    let did = id(&list[0]);
    for (s, b) in [
        app.get(
            &format!("/v1/workflows/deliveries/{did}"),
            &globex.requester,
        )
        .await,
        app.post(
            &format!("/v1/workflows/deliveries/{did}/redeliver"),
            &globex.requester,
            json!({}),
        )
        .await,
        app.get(
            &format!("/v1/workflows/instances/{iid}/deliveries"),
            &globex.requester,
        )
        .await,
        app.get("/v1/workflows/deliveries/dlv_nope", &acme.requester)
            .await,
    ] {
        assert_eq!(s, 404, "{b}");
        assert_error(&b, "not_found");
    }
    let (a, g) = (
        secret(&app, &acme.requester).await,
        secret(&app, &globex.requester).await,
    );
    assert_ne!(a["secret"], g["secret"]);
    let hit = rx.wait_for(1).await.remove(0);
    assert!(
        verify(
            g["secret"].as_str().unwrap_or_default(),
            &hit.headers,
            &hit.body,
            now_secs(),
            DEFAULT_TOLERANCE
        )
        .is_err(),
        "another partner's secret does not verify"
    );
    // Agents do not read signing secrets.
    let (s, b) = app.get("/v1/workflows/webhooks/secret", &acme.agent).await;
    assert_eq!(s, 403, "{b}");
    assert_error(&b, "not_eligible");
    let (s, b) = app
        .call(
            reqwest::Method::GET,
            "/v1/workflows/webhooks/secret",
            None,
            None,
        )
        .await;
    assert_eq!(s, 401, "{b}");
}

/// The same approval notifications on the real clock with short durations (the distributed
/// runtime's processes run on the system clock): requested at once, a reminder a second before
/// the deadline, an overdue notice after it, each once.
async fn approval_notifications_on_the_real_clock(backend: Backend) {
    let Env { app, .. } = env(backend).await;
    let p = app.partner("acme").await;
    let rx = Receiver::start(&[]).await;
    let step = json!({"type": "approval", "name": "CFO sign-off", "config": {
        "approvers": {"type": "role", "value": "cfo"}, "timeout": "3s", "remind_before": "1s",
        "on_timeout": {"action": "notify"},
        "notify": {"webhook": {"url": rx.url, "payload": {"transfer": "{{ trigger.id }}"}}}}});
    let started = std::time::Instant::now();
    let iid = start(
        &app,
        &p.requester,
        json!([step]),
        json!({"id": "tr_rt", "amount": 5000}),
    )
    .await;
    let hits = rx.wait_for(3).await;
    let kinds: Vec<Value> = hits.iter().map(|h| h.json()["type"].clone()).collect();
    assert_eq!(
        kinds,
        vec![
            json!("workflow.approval.requested"),
            json!("workflow.approval.reminder"),
            json!("workflow.approval.overdue")
        ]
    );
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "the overdue notice came before the deadline: {:?}",
        started.elapsed()
    );
    app.wait_for(&p.requester, &iid, "still waiting", |b| {
        b["status"] == "waiting"
    })
    .await;
    // Nothing more arrives: each notice was sent once.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(rx.hits().len(), 3, "no duplicate notice");
}

crate::on_both_stores!(
    a_webhook_is_delivered_signed_and_logged,
    a_failed_attempt_is_retried_on_the_schedule,
    exhausted_retries_dead_letter_and_redeliver_succeeds,
    an_email_arrives_at_the_smtp_sink,
    rotation_signs_with_both_secrets,
    outbound_urls_are_checked_at_send_time,
    wait_for_delivery_holds_the_step_until_delivered_or_dead_lettered,
    approvals_notify_remind_and_report_overdue,
    deliveries_and_secrets_are_the_partners_own,
);

// Scenarios that do not move the clock also run on the distributed runtime's processes.
crate::stepwise!(
    embedded: [
        wait_for_delivery_holds_the_step_until_delivered_or_dead_lettered,
        approvals_notify_remind_and_report_overdue,
    ],
    distributed: [approval_notifications_on_the_real_clock],
);

crate::on_distributed!(
    a_webhook_is_delivered_signed_and_logged,
    an_email_arrives_at_the_smtp_sink,
    rotation_signs_with_both_secrets,
    outbound_urls_are_checked_at_send_time,
    approval_notifications_on_the_real_clock,
);
