//! The PayOS client against the real sandbox server: idempotency, error classification,
//! Retry-After, timeouts, and a retry loop with backoff.

use std::time::Duration;

use serde_json::{json, Value};
use workflow_egress::payos_sandbox::{self, Fault, SandboxState, TransferCounts};
use workflow_egress::{
    backoff, idempotency_key, CallErrorKind, PayosClient, PayosConfig, Timeouts,
};

use crate::helpers::{client, eventually, serve, Server};

const API_KEY: &str = "sk_test_sandbox";

struct Sandbox {
    state: SandboxState,
    server: Server,
}

async fn sandbox() -> Sandbox {
    let state = SandboxState::in_memory().with_api_key(API_KEY);
    let server = serve(payos_sandbox::router(state.clone())).await;
    Sandbox { state, server }
}

fn payos(sandbox: &Sandbox, request_timeout: Duration) -> PayosClient {
    PayosClient::new(&PayosConfig {
        base_url: sandbox.server.url(""),
        api_key: API_KEY.into(),
        timeouts: Timeouts {
            connect: Duration::from_secs(2),
            request: request_timeout,
        },
    })
    .unwrap()
}

async fn counts(sandbox: &Sandbox, transfer: &str) -> TransferCounts {
    sandbox.state.counts(transfer).await.unwrap()
}

#[tokio::test]
async fn the_same_idempotency_key_executes_once() {
    let sb = sandbox().await;
    let client = payos(&sb, Duration::from_secs(5));
    let key = idempotency_key("inst-1", 3, "execute_transfer");
    let params = json!({ "transfer_id": "tr_1", "note": "procurement" });

    let first = client
        .execute_transfer("tr_1", &params, &key)
        .await
        .unwrap();
    let again = client
        .execute_transfer("tr_1", &params, &key)
        .await
        .unwrap();
    assert_eq!(first.status, 200);
    assert_eq!(first.body["status"], "executed");
    assert_eq!(first.body["transfer_id"], "tr_1");
    assert_eq!(first.body["sandbox"], true);
    assert!(first.body["id"].as_str().unwrap().starts_with("sbx_"));
    assert!(first.body["executed_at"].is_string());
    assert_eq!(
        again.body, first.body,
        "a replay returns the first response"
    );
    assert_eq!(counts(&sb, "tr_1").await.executions, 1);
    assert_eq!(sb.state.replays(), 1);
    assert_eq!(sb.state.requests(), 2);

    // The sandbox's own endpoints show the same, over HTTP.
    let listed = client.base_url().join("sandbox/transfers/tr_1").unwrap();
    let http = crate::helpers::client("127.0.0.1");
    let one = http
        .http_action("GET", listed.as_str(), &Default::default(), None, "k")
        .await
        .unwrap();
    assert_eq!(one.body["counts"]["executions"], 1);
    assert_eq!(one.body["calls"][0]["idempotency_key"], key.as_str());
    let all = http
        .http_action(
            "GET",
            &sb.server.url("/sandbox/transfers"),
            &Default::default(),
            None,
            "k",
        )
        .await
        .unwrap();
    assert_eq!(all.body["sandbox"], true);
    assert_eq!(all.body["transfers"]["tr_1"]["executions"], 1);
    assert_eq!(all.body["replays"], 1);
    let missing = http
        .http_action(
            "GET",
            &sb.server.url("/sandbox/transfers/nope"),
            &Default::default(),
            None,
            "k",
        )
        .await
        .unwrap_err();
    assert_eq!(missing.status, Some(404));

    // Another key is another execution (which is why the key must be stable).
    let other = idempotency_key("inst-2", 3, "execute_transfer");
    client
        .execute_transfer("tr_1", &params, &other)
        .await
        .unwrap();
    assert_eq!(counts(&sb, "tr_1").await.executions, 2);

    // Reusing a key for a different request is refused, not executed.
    let err = client
        .execute_transfer("tr_2", &params, &key)
        .await
        .unwrap_err();
    assert_eq!(err.status, Some(422));
    assert!(!err.retryable);
    assert_eq!(counts(&sb, "tr_2").await, TransferCounts::default());
}

#[tokio::test]
async fn cancel_and_simulate_follow_the_mapping() {
    let sb = sandbox().await;
    let client = payos(&sb, Duration::from_secs(5));
    let sim = client
        .simulate_transfer(
            "tr_9",
            &json!({ "amount": 1200 }),
            &idempotency_key("i", 0, "sim"),
        )
        .await
        .unwrap();
    assert_eq!(sim.body["outcome"], "would_execute");
    assert_eq!(sim.body["transfer_id"], "tr_9");
    assert_eq!(sim.body["params"], json!({ "amount": 1200 }));
    assert!(sim.body["simulation_id"].is_string());

    let cancelled = client
        .cancel_transfer("tr_9", &Value::Null, &idempotency_key("i", 1, "cancel"))
        .await
        .unwrap();
    assert_eq!(cancelled.body["status"], "cancelled");
    // Executing a cancelled transfer is a conflict: fatal.
    let err = client
        .execute_transfer("tr_9", &json!({}), &idempotency_key("i", 2, "exec"))
        .await
        .unwrap_err();
    assert_eq!(err.status, Some(409));
    assert!(!err.retryable);
    assert_eq!(
        counts(&sb, "tr_9").await,
        TransferCounts {
            executions: 0,
            cancellations: 1,
            simulations: 1
        }
    );
    // Ids with path characters stay one segment.
    client
        .execute_transfer("a/b c", &json!({}), &idempotency_key("i", 3, "exec"))
        .await
        .unwrap();
    assert_eq!(counts(&sb, "a/b c").await.executions, 1);
}

#[tokio::test]
async fn server_errors_are_retryable_and_the_retry_executes_once() {
    let sb = sandbox().await;
    let client = payos(&sb, Duration::from_secs(5));
    let key = idempotency_key("inst-500", 1, "execute_transfer");
    sb.state.inject(
        Fault::Status {
            status: 500,
            retry_after_secs: None,
        },
        1,
    );
    let err = client
        .execute_transfer("tr_5", &json!({}), &key)
        .await
        .unwrap_err();
    assert!(err.retryable);
    assert_eq!(err.status, Some(500));
    assert_eq!(err.kind, CallErrorKind::Status);
    assert_eq!(err.retry_after, None);
    assert!(err.message.contains("sandbox_fault"), "{err}");
    assert_eq!(counts(&sb, "tr_5").await.executions, 0);
    let ok = client
        .execute_transfer("tr_5", &json!({}), &key)
        .await
        .unwrap();
    assert_eq!(ok.status, 200);
    assert_eq!(counts(&sb, "tr_5").await.executions, 1);
}

#[tokio::test]
async fn rate_limits_carry_retry_after() {
    let sb = sandbox().await;
    let client = payos(&sb, Duration::from_secs(5));
    let key = idempotency_key("inst-429", 1, "execute_transfer");
    sb.state.inject(
        Fault::Status {
            status: 429,
            retry_after_secs: Some(7),
        },
        1,
    );
    sb.state.inject(
        Fault::Status {
            status: 503,
            retry_after_secs: Some(2),
        },
        1,
    );
    let err = client
        .execute_transfer("tr_4", &json!({}), &key)
        .await
        .unwrap_err();
    assert_eq!((err.status, err.retryable), (Some(429), true));
    assert_eq!(err.retry_after, Some(Duration::from_secs(7)));
    assert_eq!(
        err.next_delay(1, Duration::from_millis(100), Duration::from_secs(60)),
        Duration::from_secs(7)
    );
    let err = client
        .execute_transfer("tr_4", &json!({}), &key)
        .await
        .unwrap_err();
    assert_eq!(
        (err.status, err.retry_after),
        (Some(503), Some(Duration::from_secs(2)))
    );
    assert_eq!(counts(&sb, "tr_4").await.executions, 0);
}

#[tokio::test]
async fn client_errors_are_fatal() {
    let sb = sandbox().await;
    let client = payos(&sb, Duration::from_secs(5));
    sb.state.inject(
        Fault::Status {
            status: 400,
            retry_after_secs: Some(1),
        },
        1,
    );
    let err = client
        .execute_transfer("tr_400", &json!({}), &idempotency_key("i", 0, "x"))
        .await
        .unwrap_err();
    assert_eq!(
        (err.status, err.retryable, err.retry_after),
        (Some(400), false, None)
    );

    // A wrong API key: 401, fatal.
    let wrong = PayosClient::new(&PayosConfig {
        base_url: sb.server.url(""),
        api_key: "wrong".into(),
        timeouts: Timeouts::default(),
    })
    .unwrap();
    let err = wrong
        .execute_transfer("tr_400", &json!({}), &idempotency_key("i", 0, "x"))
        .await
        .unwrap_err();
    assert_eq!((err.status, err.retryable), (Some(401), false));
    assert_eq!(counts(&sb, "tr_400").await.executions, 0);
}

#[tokio::test]
async fn a_timeout_is_retryable_and_the_retry_does_not_execute_twice() {
    let sb = sandbox().await;
    let client = payos(&sb, Duration::from_millis(300));
    let key = idempotency_key("inst-slow", 2, "execute_transfer");
    sb.state.inject(Fault::Delay { millis: 1_000 }, 1);
    let err = client
        .execute_transfer("tr_slow", &json!({}), &key)
        .await
        .unwrap_err();
    assert_eq!(err.kind, CallErrorKind::Timeout, "{err}");
    assert!(err.retryable);
    assert_eq!(err.status, None);
    // The slow server still executes the first call after its delay...
    eventually(Duration::from_secs(5), "the delayed execution", || async {
        counts(&sb, "tr_slow").await.executions == 1
    })
    .await;
    // ...so the retry with the same key is a replay (sent with a patient client: under load
    // a 300 ms budget could fail the retry too).
    let ok = payos(&sb, Duration::from_secs(5))
        .execute_transfer("tr_slow", &json!({}), &key)
        .await
        .unwrap();
    assert_eq!(ok.body["status"], "executed");
    assert_eq!(counts(&sb, "tr_slow").await.executions, 1);
    assert_eq!(sb.state.replays(), 1);
}

#[tokio::test]
async fn connection_refused_is_retryable() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let client = PayosClient::new(&PayosConfig {
        base_url: format!("http://{addr}"),
        api_key: API_KEY.into(),
        timeouts: Timeouts::default(),
    })
    .unwrap();
    let err = client
        .execute_transfer("tr", &json!({}), "wf_x")
        .await
        .unwrap_err();
    assert_eq!(err.kind, CallErrorKind::Connect, "{err}");
    assert!(err.retryable);
}

/// What a worker does: attempts until success or `max_attempts`, waiting `next_delay`.
#[tokio::test]
async fn a_retry_loop_with_backoff_gets_through_faults() {
    let sb = sandbox().await;
    let client = payos(&sb, Duration::from_secs(5));
    // Injected over HTTP, as an out-of-process test would.
    let http = crate::helpers::client("127.0.0.1");
    let queued = http
        .http_action(
            "POST",
            &sb.server.url("/sandbox/faults"),
            &Default::default(),
            Some(&json!({ "fault": { "kind": "status", "status": 502 }, "times": 2 })),
            "k",
        )
        .await
        .unwrap();
    assert_eq!(queued.body["queued"], 2);

    let key = idempotency_key("inst-loop", 0, "execute_transfer");
    let (base, max, max_attempts) = (Duration::from_millis(5), Duration::from_millis(50), 5);
    let mut attempt = 0;
    let response = loop {
        attempt += 1;
        match client.execute_transfer("tr_loop", &json!({}), &key).await {
            Ok(response) => break response,
            Err(e) if e.retryable && attempt < max_attempts => {
                let delay = e.next_delay(attempt, base, max);
                assert!(delay <= max);
                tokio::time::sleep(delay).await;
            }
            Err(e) => panic!("gave up after {attempt}: {e}"),
        }
    };
    assert_eq!(attempt, 3);
    assert_eq!(response.status, 200);
    assert_eq!(counts(&sb, "tr_loop").await.executions, 1);
    assert!(backoff(3, base, max) <= Duration::from_millis(20));
}

#[tokio::test]
async fn the_generic_http_action_sends_method_headers_body_and_key() {
    use axum::http::HeaderMap;
    use axum::routing::any;
    use axum::{Json, Router};
    let echo = Router::new().route(
        "/echo",
        any(
            |method: axum::http::Method, headers: HeaderMap, body: String| async move {
                Json(json!({
                    "method": method.as_str(),
                    "key": headers.get("idempotency-key").and_then(|v| v.to_str().ok()),
                    "custom": headers.get("x-partner").and_then(|v| v.to_str().ok()),
                    "content_type": headers.get("content-type").and_then(|v| v.to_str().ok()),
                    "body": body,
                }))
            },
        ),
    );
    let server = serve(echo).await;
    let mut headers = std::collections::BTreeMap::new();
    headers.insert("X-Partner".to_owned(), "acme".to_owned());
    let key = idempotency_key("inst-http", 4, "http");
    let response = client("127.0.0.1")
        .http_action(
            "put",
            &server.url("/echo"),
            &headers,
            Some(&json!({ "a": 1 })),
            &key,
        )
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.body["method"], "PUT");
    assert_eq!(response.body["key"], key.as_str());
    assert_eq!(response.body["custom"], "acme");
    assert_eq!(response.body["content_type"], "application/json");
    assert_eq!(response.body["body"], r#"{"a":1}"#);
}

#[tokio::test]
async fn concurrent_redeliveries_execute_once() {
    let sb = sandbox().await;
    let client = payos(&sb, Duration::from_secs(10));
    let key = idempotency_key("inst-race", 1, "execute_transfer");
    let calls = (0..8).map(|_| {
        let client = client.clone();
        let key = key.clone();
        tokio::spawn(async move {
            client
                .execute_transfer("tr_race", &json!({}), &key)
                .await
                .unwrap()
        })
    });
    let mut bodies = Vec::new();
    for call in calls {
        bodies.push(call.await.unwrap().body);
    }
    assert!(
        bodies.iter().all(|b| *b == bodies[0]),
        "every caller sees the one execution"
    );
    assert_eq!(counts(&sb, "tr_race").await.executions, 1);
    assert_eq!(sb.state.replays(), 7);
}
