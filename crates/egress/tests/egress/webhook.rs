//! Standard Webhooks: the published test vectors, rotation, tampering and replay, and
//! delivery to a real receiver that verifies what it gets.

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::routing::post;
use axum::Router;
use chrono::Utc;
use serde_json::json;
use workflow_egress::webhook::{
    self, deliver, generate_secret, message_id, sign, signature_header, verify, WebhookError,
    WebhookEvent, DEFAULT_TOLERANCE, HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP,
};

use crate::helpers::{client, counting_server, serve};

fn headers(id: &str, timestamp: i64, signature: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(HEADER_ID, HeaderValue::from_str(id).unwrap());
    h.insert(
        HEADER_TIMESTAMP,
        HeaderValue::from_str(&timestamp.to_string()).unwrap(),
    );
    h.insert(HEADER_SIGNATURE, HeaderValue::from_str(signature).unwrap());
    h
}

/// From standard-webhooks/standard-webhooks, libraries/php/tests/WebhookTest.php
/// (`testSignFunctionWorks`), the same vector as the svix libraries.
const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SPEC_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
const SPEC_TS: i64 = 1_614_265_330;
const SPEC_BODY: &[u8] = br#"{"test": 2432232314}"#;
const SPEC_SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

#[test]
fn the_spec_test_vectors_reproduce() {
    assert_eq!(
        sign(SPEC_SECRET, SPEC_ID, SPEC_TS, SPEC_BODY).unwrap(),
        SPEC_SIGNATURE
    );
    // Without the prefix, as the reference libraries accept.
    assert_eq!(
        sign(&SPEC_SECRET["whsec_".len()..], SPEC_ID, SPEC_TS, SPEC_BODY).unwrap(),
        SPEC_SIGNATURE
    );
    // standard-webhooks/standard-webhooks, libraries/rust/src/lib.rs `test_sign`.
    assert_eq!(
        sign(
            "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            1_649_367_553,
            br#"{"email":"test@example.com","username":"test_user"}"#,
        )
        .unwrap(),
        "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw="
    );
    let h = headers(SPEC_ID, SPEC_TS, SPEC_SIGNATURE);
    assert_eq!(
        verify(SPEC_SECRET, &h, SPEC_BODY, SPEC_TS, DEFAULT_TOLERANCE),
        Ok(())
    );
    // Other versions and garbage in the list are ignored, a v1 match anywhere counts.
    let h = headers(
        SPEC_ID,
        SPEC_TS,
        &format!("v2,abc v1,bm9wZQ== {SPEC_SIGNATURE} junk"),
    );
    assert_eq!(
        verify(SPEC_SECRET, &h, SPEC_BODY, SPEC_TS, DEFAULT_TOLERANCE),
        Ok(())
    );
}

#[test]
fn rotation_sends_both_signatures_and_either_secret_verifies() {
    let (old, new) = (generate_secret(), generate_secret());
    let body = br#"{"type":"workflow.completed"}"#;
    let now = 1_700_000_000;
    let header = signature_header(&[&old, &new], "msg_rot", now, body).unwrap();
    assert_eq!(header.split(' ').count(), 2);
    assert!(header.split(' ').all(|s| s.starts_with("v1,")));
    let h = headers("msg_rot", now, &header);
    assert_eq!(verify(&old, &h, body, now, DEFAULT_TOLERANCE), Ok(()));
    assert_eq!(verify(&new, &h, body, now, DEFAULT_TOLERANCE), Ok(()));
    assert_eq!(
        verify(&generate_secret(), &h, body, now, DEFAULT_TOLERANCE),
        Err(WebhookError::InvalidSignature)
    );
}

#[test]
fn tampering_and_replays_are_rejected() {
    let h = headers(SPEC_ID, SPEC_TS, SPEC_SIGNATURE);
    let tol = DEFAULT_TOLERANCE;
    assert_eq!(
        verify(SPEC_SECRET, &h, br#"{"test": 2432232315}"#, SPEC_TS, tol),
        Err(WebhookError::InvalidSignature)
    );
    // Changing the id or the timestamp breaks the signature too.
    let other_id = headers("msg_other", SPEC_TS, SPEC_SIGNATURE);
    assert_eq!(
        verify(SPEC_SECRET, &other_id, SPEC_BODY, SPEC_TS, tol),
        Err(WebhookError::InvalidSignature)
    );
    let other_ts = headers(SPEC_ID, SPEC_TS + 1, SPEC_SIGNATURE);
    assert_eq!(
        verify(SPEC_SECRET, &other_ts, SPEC_BODY, SPEC_TS, tol),
        Err(WebhookError::InvalidSignature)
    );
    // Stale: a correctly signed message replayed 5 minutes and 1 second later.
    assert_eq!(
        verify(SPEC_SECRET, &h, SPEC_BODY, SPEC_TS + 301, tol),
        Err(WebhookError::TimestampTooOld { age_secs: 301 })
    );
    assert_eq!(
        verify(SPEC_SECRET, &h, SPEC_BODY, SPEC_TS + 300, tol),
        Ok(())
    );
    assert_eq!(
        verify(SPEC_SECRET, &h, SPEC_BODY, SPEC_TS - 301, tol),
        Err(WebhookError::TimestampInFuture { ahead_secs: 301 })
    );
    let mut missing = h.clone();
    missing.remove(HEADER_SIGNATURE);
    assert_eq!(
        verify(SPEC_SECRET, &missing, SPEC_BODY, SPEC_TS, tol),
        Err(WebhookError::MissingHeader(HEADER_SIGNATURE))
    );
    let bad_ts = headers(SPEC_ID, 0, SPEC_SIGNATURE);
    let mut bad_ts = bad_ts;
    bad_ts.insert(HEADER_TIMESTAMP, HeaderValue::from_static("1614265330.0"));
    assert_eq!(
        verify(SPEC_SECRET, &bad_ts, SPEC_BODY, SPEC_TS, tol),
        Err(WebhookError::InvalidTimestamp)
    );
}

#[derive(Clone)]
struct Receiver {
    secret: String,
    received: Arc<Mutex<Vec<(String, String, serde_json::Value)>>>,
}

/// A partner's endpoint: verifies with `verify` and the current time, as a library would.
async fn receive(
    State(r): State<Receiver>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let now = Utc::now().timestamp();
    match verify(&r.secret, &headers, &body, now, DEFAULT_TOLERANCE) {
        Ok(()) => {
            let id = headers[HEADER_ID].to_str().unwrap().to_owned();
            let sig = headers[HEADER_SIGNATURE].to_str().unwrap().to_owned();
            let payload = serde_json::from_slice(&body).unwrap();
            r.received.lock().unwrap().push((id, sig, payload));
            (StatusCode::NO_CONTENT, String::new())
        }
        Err(e) => (StatusCode::UNAUTHORIZED, format!("rejected: {e}")),
    }
}

#[tokio::test]
async fn delivery_to_a_verifying_receiver() {
    let secret = generate_secret();
    let receiver = Receiver {
        secret: secret.clone(),
        received: Arc::default(),
    };
    let server = serve(
        Router::new()
            .route("/hook", post(receive))
            .with_state(receiver.clone()),
    )
    .await;
    let egress = client("127.0.0.1");
    let event = WebhookEvent {
        msg_id: message_id("inst-7", 2, "endpoint-1"),
        event_type: "workflow.step.completed".into(),
        occurred_at: Utc::now(),
        data: json!({ "instance_id": "inst-7", "step": 2 }),
    };

    let first = deliver(&egress, &server.url("/hook"), &event, &[&secret]).await;
    assert!(first.succeeded(), "{first:?}");
    assert_eq!(
        (first.status, first.error.clone(), first.retryable),
        (Some(204), None, false)
    );
    assert_eq!(first.msg_id, event.msg_id);
    // A retry (e.g. the first answer was lost) carries the same webhook-id and body.
    let second = deliver(&egress, &server.url("/hook"), &event, &[&secret]).await;
    assert!(second.succeeded());
    let received = receiver.received.lock().unwrap().clone();
    assert_eq!(received.len(), 2);
    assert_eq!(received[0].0, event.msg_id);
    assert_eq!(received[1].0, event.msg_id);
    assert_eq!(received[0].2["type"], "workflow.step.completed");
    assert_eq!(received[0].2["data"], event.data);
    assert_eq!(received[0].2, received[1].2);

    // During rotation the receiver may still hold only the old secret.
    let rotated = deliver(
        &egress,
        &server.url("/hook"),
        &event,
        &[&secret, &generate_secret()],
    )
    .await;
    assert!(rotated.succeeded(), "{rotated:?}");
    assert_eq!(
        receiver
            .received
            .lock()
            .unwrap()
            .last()
            .unwrap()
            .1
            .split(' ')
            .count(),
        2
    );

    // A receiver with another secret refuses: logged with its answer, retryable.
    let failed = deliver(&egress, &server.url("/hook"), &event, &[&generate_secret()]).await;
    assert_eq!(failed.status, Some(401));
    assert!(!failed.succeeded() && failed.retryable);
    assert!(
        failed
            .response_snippet
            .contains("rejected: no matching webhook signature"),
        "{failed:?}"
    );
    assert!(failed.error.is_some());
}

#[tokio::test]
async fn delivery_logs_a_bounded_snippet_and_refuses_private_targets() {
    let big = Router::new().route(
        "/hook",
        post(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "x".repeat(4000)) }),
    );
    let server = serve(big).await;
    let secret = generate_secret();
    let attempt = webhook::deliver_body(
        &client("127.0.0.1"),
        &server.url("/hook"),
        "msg_1",
        b"{}",
        &[&secret],
    )
    .await;
    assert_eq!(attempt.status, Some(500));
    assert_eq!(
        attempt.response_snippet.len(),
        webhook::RESPONSE_SNIPPET_BYTES
    );
    assert!(attempt.retryable);

    let (target, hits) = counting_server("127.0.0.1:0").await.unwrap();
    let refused = webhook::deliver_body(
        &client(""),
        &target.url("/hook"),
        "msg_2",
        b"{}",
        &[&secret],
    )
    .await;
    assert_eq!(refused.status, None);
    assert!(!refused.retryable);
    assert!(
        refused.error.as_deref().unwrap_or("").contains("refused"),
        "{refused:?}"
    );
    let unreachable = webhook::deliver_body(
        &client("127.0.0.1"),
        &target.url("/redirect"),
        "msg_3",
        b"{}",
        &[&secret],
    )
    .await;
    assert_eq!(
        unreachable.status,
        Some(302),
        "redirects are failures, not followed"
    );
    assert!(unreachable.retryable);
    assert_eq!(hits.target(), 0);
    assert_eq!(hits.any(), 1);
    let bad_secret = webhook::deliver_body(
        &client("127.0.0.1"),
        &target.url("/hook"),
        "msg_4",
        b"{}",
        &["whsec_***"],
    )
    .await;
    assert!(!bad_secret.retryable && bad_secret.status.is_none());
    assert_eq!(hits.any(), 1, "nothing is sent without a valid signature");
}
