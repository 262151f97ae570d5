//! Webhooks in the [Standard Webhooks](https://www.standardwebhooks.com/) format, so partners
//! verify them with an existing library (svix, standardwebhooks, …) and reject replays.
//!
//! Each delivery carries three headers:
//! - `webhook-id`: the message id, stable across retries of one notification (derive it with
//!   [`message_id`]): receivers dedupe on it;
//! - `webhook-timestamp`: Unix seconds of this attempt;
//! - `webhook-signature`: `v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>` per secret,
//!   space-separated: during a secret rotation both the old and the new signature are sent and
//!   a receiver holding either secret verifies.
//!
//! Secrets are `whsec_` + base64 of the key bytes ([`generate_secret`]: 32 random bytes); the
//! HMAC key is the decoded bytes. [`verify`] checks the signature in constant time and refuses
//! timestamps more than the tolerance (5 minutes by default) away from now: a captured request
//! replayed later fails.
//!
//! Delivery: [`deliver`] makes ONE attempt through the SSRF-checked [`EgressClient`] (no
//! redirects) and returns a [`DeliveryAttempt`] for the delivery log (status, latency, first
//! 512 bytes of the response). Each attempt is signed afresh with the current time. The worker
//! retries on [`RETRY_SCHEDULE`] while the attempt is `retryable`.
//!
//! Must never: reuse a `webhook-id` for different content, sign with a stale timestamp, follow
//! redirects, or log secrets.

use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use chrono::{DateTime, SecondsFormat, Utc};
use hmac::{Hmac, Mac};
use rand::Rng;
use reqwest::header::{HeaderMap, CONTENT_TYPE};
use reqwest::Method;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::call::{scoped_hash, snippet, CallError, CallErrorKind};
use crate::egress_policy::EgressClient;

/// Prefix of Standard Webhooks secrets.
pub const SECRET_PREFIX: &str = "whsec_";
pub const HEADER_ID: &str = "webhook-id";
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
pub const HEADER_SIGNATURE: &str = "webhook-signature";
/// The largest clock difference [`verify`] accepts by default (as the reference libraries).
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(5 * 60);
/// How much of a receiver's response body is kept in the delivery log.
pub const RESPONSE_SNIPPET_BYTES: usize = 512;

/// When to make each delivery attempt, counted from the previous failure: `RETRY_SCHEDULE[0]`
/// is the first attempt (immediately), `RETRY_SCHEDULE[n]` the wait after the `n`-th failed
/// attempt. Seven attempts over about 17.6 hours, the schedule Standard Webhooks recommends:
/// immediately, 5 seconds, 5 minutes, 30 minutes, 2 hours, 5 hours, 10 hours. After the last
/// failure the notification fails (the step's `on_failure` applies). See [`next_retry_delay`].
pub const RETRY_SCHEDULE: [Duration; 7] = [
    Duration::ZERO,
    Duration::from_secs(5),
    Duration::from_secs(5 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(2 * 60 * 60),
    Duration::from_secs(5 * 60 * 60),
    Duration::from_secs(10 * 60 * 60),
];

/// The wait before the next attempt after `failed_attempts` attempts failed, or `None` when the
/// schedule is exhausted.
pub fn next_retry_delay(failed_attempts: usize) -> Option<Duration> {
    RETRY_SCHEDULE.get(failed_attempts).copied()
}

/// Why a secret, a signature or a received webhook is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error("invalid webhook secret: {reason}")]
    InvalidSecret { reason: &'static str },
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    #[error("invalid header {0}")]
    InvalidHeader(&'static str),
    #[error("webhook-timestamp is not a unix timestamp")]
    InvalidTimestamp,
    #[error("webhook timestamp is {age_secs}s old: too old (replay?)")]
    TimestampTooOld { age_secs: i64 },
    #[error("webhook timestamp is {ahead_secs}s in the future")]
    TimestampInFuture { ahead_secs: i64 },
    #[error("no matching webhook signature")]
    InvalidSignature,
}

/// A new secret: `whsec_` + base64 of 32 random bytes.
pub fn generate_secret() -> String {
    let key: [u8; 32] = rand::thread_rng().gen();
    format!("{SECRET_PREFIX}{}", BASE64.encode(key))
}

/// The key bytes of a secret (`whsec_` prefix optional, as in the reference libraries).
fn decode_secret(secret: &str) -> Result<Vec<u8>, WebhookError> {
    let encoded = secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret);
    let key = BASE64
        .decode(encoded)
        .map_err(|_| WebhookError::InvalidSecret {
            reason: "not base64 after the whsec_ prefix",
        })?;
    if key.is_empty() {
        return Err(WebhookError::InvalidSecret { reason: "empty" });
    }
    Ok(key)
}

fn mac(
    key: &[u8],
    msg_id: &str,
    timestamp_secs: i64,
    body: &[u8],
) -> Result<Hmac<Sha256>, WebhookError> {
    // HMAC accepts keys of any length; the error arm exists only in the type.
    let mut mac = Hmac::<Sha256>::new_from_slice(key).map_err(|_| WebhookError::InvalidSecret {
        reason: "rejected as an HMAC key",
    })?;
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp_secs.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Ok(mac)
}

/// One signature, `v1,<base64>`, of `body` for message `msg_id` at `timestamp_secs`.
pub fn sign(
    secret: &str,
    msg_id: &str,
    timestamp_secs: i64,
    body: &[u8],
) -> Result<String, WebhookError> {
    let key = decode_secret(secret)?;
    let tag = mac(&key, msg_id, timestamp_secs, body)?
        .finalize()
        .into_bytes();
    Ok(format!("v1,{}", BASE64.encode(tag)))
}

/// The `webhook-signature` value: one signature per secret, space-separated (rotation sends
/// the old and the new). At least one secret is required.
pub fn signature_header(
    secrets: &[&str],
    msg_id: &str,
    timestamp_secs: i64,
    body: &[u8],
) -> Result<String, WebhookError> {
    if secrets.is_empty() {
        return Err(WebhookError::InvalidSecret {
            reason: "no secret",
        });
    }
    let signatures = secrets
        .iter()
        .map(|s| sign(s, msg_id, timestamp_secs, body))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(signatures.join(" "))
}

fn header<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<&'a str, WebhookError> {
    headers
        .get(name)
        .ok_or(WebhookError::MissingHeader(name))?
        .to_str()
        .map_err(|_| WebhookError::InvalidHeader(name))
}

/// What a receiver does: checks that `headers` carry a `v1` signature of `body` made with
/// `secret`, and that `webhook-timestamp` is within `tolerance` of `now_secs`. The comparison
/// is constant-time.
pub fn verify(
    secret: &str,
    headers: &HeaderMap,
    body: &[u8],
    now_secs: i64,
    tolerance: Duration,
) -> Result<(), WebhookError> {
    let key = decode_secret(secret)?;
    let msg_id = header(headers, HEADER_ID)?;
    let timestamp = header(headers, HEADER_TIMESTAMP)?;
    let signatures = header(headers, HEADER_SIGNATURE)?;
    let timestamp: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| WebhookError::InvalidTimestamp)?;
    let tolerance = i64::try_from(tolerance.as_secs()).unwrap_or(i64::MAX);
    let age = now_secs.saturating_sub(timestamp);
    if age > tolerance {
        return Err(WebhookError::TimestampTooOld { age_secs: age });
    }
    if -age > tolerance {
        return Err(WebhookError::TimestampInFuture { ahead_secs: -age });
    }
    let expected = mac(&key, msg_id, timestamp, body)?;
    let matched = signatures
        .split(' ')
        .filter_map(|s| s.split_once(','))
        .filter(|(version, _)| *version == "v1")
        .filter_map(|(_, sig)| BASE64.decode(sig).ok())
        .any(|sig| expected.clone().verify_slice(&sig).is_ok());
    if matched {
        Ok(())
    } else {
        Err(WebhookError::InvalidSignature)
    }
}

/// The `webhook-id` of one notification: `msg_` + 32 hex digits, deterministic in
/// `(instance_id, step_index, scope)` so it stays the same across retries and redeliveries.
/// `scope` tells apart several webhooks of one step (e.g. the endpoint id); never the attempt.
pub fn message_id(instance_id: impl std::fmt::Display, step_index: usize, scope: &str) -> String {
    format!("msg_{}", scoped_hash(instance_id, step_index, scope))
}

/// One notification: its body is the Standard Webhooks envelope
/// `{"type", "timestamp", "data"}`, the same bytes on every attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookEvent {
    /// The `webhook-id` (see [`message_id`]).
    pub msg_id: String,
    /// Dotted event type, e.g. `workflow.step.completed`.
    pub event_type: String,
    /// When the event happened (not when it is delivered).
    pub occurred_at: DateTime<Utc>,
    pub data: serde_json::Value,
}

impl WebhookEvent {
    /// The JSON body that is signed and sent.
    pub fn body(&self) -> Vec<u8> {
        serde_json::json!({
            "type": self.event_type,
            "timestamp": self.occurred_at.to_rfc3339_opts(SecondsFormat::Millis, true),
            "data": self.data,
        })
        .to_string()
        .into_bytes()
    }
}

/// One delivery attempt, as the delivery log stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryAttempt {
    pub msg_id: String,
    pub attempted_at: DateTime<Utc>,
    /// The receiver's status, if it answered.
    pub status: Option<u16>,
    pub latency_ms: u64,
    /// The first [`RESPONSE_SNIPPET_BYTES`] of the response body.
    pub response_snippet: String,
    /// Why the attempt failed (transport error or non-2xx), if it did.
    pub error: Option<String>,
    /// Whether a later attempt on [`RETRY_SCHEDULE`] may succeed: false on success, on a
    /// refused or invalid target, a bad secret, and `410 Gone`; true on every other failure
    /// (any other status, timeouts, connection errors), as Standard Webhooks senders do.
    pub retryable: bool,
}

impl DeliveryAttempt {
    /// A 2xx answer.
    pub fn succeeded(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }

    fn failed(
        msg_id: &str,
        attempted_at: DateTime<Utc>,
        started: Instant,
        error: CallError,
    ) -> Self {
        Self {
            msg_id: msg_id.to_owned(),
            attempted_at,
            status: error.status,
            latency_ms: elapsed_ms(started),
            response_snippet: String::new(),
            error: Some(error.message),
            retryable: error.retryable,
        }
    }
}

fn elapsed_ms(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Makes one signed delivery attempt of `event` to `url`, signed with every secret in
/// `secrets` (two during rotation).
pub async fn deliver(
    client: &EgressClient,
    url: &str,
    event: &WebhookEvent,
    secrets: &[&str],
) -> DeliveryAttempt {
    deliver_body(client, url, &event.msg_id, &event.body(), secrets).await
}

/// Like [`deliver`] for a body that is already serialised.
pub async fn deliver_body(
    client: &EgressClient,
    url: &str,
    msg_id: &str,
    body: &[u8],
    secrets: &[&str],
) -> DeliveryAttempt {
    let attempted_at = Utc::now();
    let started = Instant::now();
    let timestamp = attempted_at.timestamp();
    let signature = match signature_header(secrets, msg_id, timestamp, body) {
        Ok(s) => s,
        Err(e) => {
            let error = CallError::fatal(CallErrorKind::InvalidRequest, e.to_string());
            return DeliveryAttempt::failed(msg_id, attempted_at, started, error);
        }
    };
    let request = match client.request(Method::POST, url) {
        Ok(r) => r,
        Err(e) => {
            return DeliveryAttempt::failed(
                msg_id,
                attempted_at,
                started,
                CallError::from_egress(e),
            )
        }
    };
    let request = request
        .header(CONTENT_TYPE, "application/json")
        .header(HEADER_ID, msg_id)
        .header(HEADER_TIMESTAMP, timestamp.to_string())
        .header(HEADER_SIGNATURE, signature)
        .body(body.to_vec());
    let mut response = match request.send().await {
        Ok(r) => r,
        Err(e) => {
            let error = CallError::from_reqwest(&e);
            return DeliveryAttempt::failed(msg_id, attempted_at, started, error);
        }
    };
    let status = response.status().as_u16();
    // Read only what the log keeps; a receiver's large answer is not our business.
    let mut head = Vec::new();
    let mut read_error = None;
    while head.len() < RESPONSE_SNIPPET_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => head.extend_from_slice(&chunk),
            Ok(None) => break,
            Err(e) => {
                read_error = Some(CallError::from_reqwest(&e).message);
                break;
            }
        }
    }
    let succeeded = (200..300).contains(&status);
    let error = if succeeded {
        None
    } else {
        Some(read_error.unwrap_or_else(|| format!("receiver answered http status {status}")))
    };
    DeliveryAttempt {
        msg_id: msg_id.to_owned(),
        attempted_at,
        status: Some(status),
        latency_ms: elapsed_ms(started),
        response_snippet: snippet(&head, RESPONSE_SNIPPET_BYTES),
        error,
        retryable: !succeeded && status != 410,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_round_trip() {
        let secret = generate_secret();
        assert!(secret.starts_with(SECRET_PREFIX));
        assert_eq!(decode_secret(&secret).unwrap().len(), 32);
        assert_ne!(secret, generate_secret());
        assert!(decode_secret("whsec_!!!").is_err());
        assert!(decode_secret("whsec_").is_err());
        assert!(signature_header(&[], "m", 1, b"x").is_err());
    }

    #[test]
    fn schedule() {
        assert_eq!(next_retry_delay(0), Some(Duration::ZERO));
        assert_eq!(next_retry_delay(1), Some(Duration::from_secs(5)));
        assert_eq!(next_retry_delay(6), Some(Duration::from_secs(36_000)));
        assert_eq!(next_retry_delay(7), None);
        let total: Duration = RETRY_SCHEDULE.iter().sum();
        assert_eq!(total.as_secs(), 5 + 300 + 1800 + 7200 + 18000 + 36000);
    }

    #[test]
    fn message_ids_are_stable() {
        assert_eq!(message_id("i", 1, "ep"), message_id("i", 1, "ep"));
        assert_ne!(message_id("i", 1, "ep"), message_id("i", 2, "ep"));
        assert!(message_id("i", 1, "ep").starts_with("msg_"));
    }
}
