//! One outbound call and what became of it: [`ActionResponse`] on success, [`CallError`] (which
//! says retryable or fatal, and for how long to wait) on failure; the idempotency key that makes
//! retries safe; the backoff between attempts; the generic `http` action.
//!
//! Classification (the worker's retry policy reads only this):
//!
//! | outcome | retryable | `retry_after` |
//! | --- | --- | --- |
//! | status < 400 (a 3xx is returned as is: redirects are never followed) | success | |
//! | 408, 425, 429, 5xx | yes | from `Retry-After` on 429 and 503 (seconds or HTTP date) |
//! | other 4xx | no | |
//! | timeout, connect error, connection reset, truncated body, DNS failure | yes | |
//! | egress refused by policy, bad URL/method/header, oversized response | no | |
//!
//! Must never: retry by itself or sleep. One function call is one attempt.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::time::{Duration, Instant, SystemTime};

use rand::Rng;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use reqwest::Method;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::egress_policy::{EgressClient, EgressError};

/// The header carrying the idempotency key on every action call.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// Responses larger than this are refused (fatal): a step's output is stored with the instance.
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// How many bytes of an error response go into [`CallError::message`].
pub const ERROR_SNIPPET_BYTES: usize = 512;

/// A successful call: becomes the step's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionResponse {
    pub status: u16,
    /// The JSON body; a non-JSON body becomes a JSON string, an empty one `null`.
    pub body: serde_json::Value,
    pub latency_ms: u64,
}

/// What kind of failure a [`CallError`] is, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallErrorKind {
    /// The egress policy refused the target.
    Refused,
    /// The request itself is invalid (URL, method, header, body); retrying cannot help.
    InvalidRequest,
    /// Connect or whole-request timeout.
    Timeout,
    /// Could not connect, or the connection broke.
    Connect,
    /// The server answered with an error status.
    Status,
    /// The response body could not be read or was too large.
    Body,
    /// An SMTP failure (see [`crate::email`]).
    Smtp,
}

/// A failed call, classified. `retryable` is the only thing retry policy should read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CallError {
    pub kind: CallErrorKind,
    pub retryable: bool,
    /// The server's `Retry-After`, if it sent one on a 429 or 503.
    pub retry_after: Option<Duration>,
    /// HTTP status (or SMTP reply code) when the server answered.
    pub status: Option<u16>,
    pub message: String,
}

impl CallError {
    /// A failure that retrying cannot fix.
    pub fn fatal(kind: CallErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            retryable: false,
            retry_after: None,
            status: None,
            message: message.into(),
        }
    }

    /// A failure that may go away on a later attempt.
    pub fn transient(kind: CallErrorKind, message: impl Into<String>) -> Self {
        Self {
            retryable: true,
            ..Self::fatal(kind, message)
        }
    }

    /// Policy refusals and malformed targets are fatal; a failed DNS lookup is transient.
    pub fn from_egress(error: EgressError) -> Self {
        match error {
            EgressError::Resolve { .. } => {
                Self::transient(CallErrorKind::Connect, error.to_string())
            }
            EgressError::Refused { .. } => Self::fatal(CallErrorKind::Refused, error.to_string()),
            EgressError::InvalidUrl { .. }
            | EgressError::UnsupportedScheme { .. }
            | EgressError::UserInfo
            | EgressError::InvalidAllowEntry { .. }
            | EgressError::Client { .. }
            | EgressError::Config { .. } => {
                Self::fatal(CallErrorKind::InvalidRequest, error.to_string())
            }
        }
    }

    /// Classifies a transport error. A refusal by [`crate::PolicyResolver`] arrives wrapped
    /// as a connect error; it is found in the source chain and stays fatal.
    pub fn from_reqwest(error: &reqwest::Error) -> Self {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
        while let Some(e) = source {
            if let Some(egress) = e.downcast_ref::<EgressError>() {
                return Self::from_egress(egress.clone());
            }
            source = e.source();
        }
        let message = error_chain(error);
        if error.is_timeout() {
            Self::transient(CallErrorKind::Timeout, format!("timed out: {message}"))
        } else if error.is_builder() {
            Self::fatal(CallErrorKind::InvalidRequest, message)
        } else if error.is_connect() {
            Self::transient(CallErrorKind::Connect, format!("connect failed: {message}"))
        } else if error.is_body() || error.is_decode() {
            Self::transient(
                CallErrorKind::Body,
                format!("reading the response failed: {message}"),
            )
        } else {
            // Connection reset mid-request and the like: the idempotency key makes a retry safe.
            Self::transient(CallErrorKind::Connect, message)
        }
    }

    /// Classifies an error status (>= 400). `snippet` is the start of the response body.
    pub fn from_status(status: u16, headers: &HeaderMap, snippet: &str, now: SystemTime) -> Self {
        let retryable = matches!(status, 408 | 425 | 429) || status >= 500;
        let retry_after = if matches!(status, 429 | 503) {
            headers
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, now))
        } else {
            None
        };
        Self {
            kind: CallErrorKind::Status,
            retryable,
            retry_after,
            status: Some(status),
            message: format!("http status {status}: {snippet}"),
        }
    }

    /// How long to wait before attempt `failed_attempt + 1`: the server's `Retry-After` when
    /// it sent one, otherwise [`backoff`].
    pub fn next_delay(&self, failed_attempt: u32, base: Duration, max: Duration) -> Duration {
        self.retry_after
            .unwrap_or_else(|| backoff(failed_attempt, base, max))
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        message.push_str(": ");
        message.push_str(&e.to_string());
        source = e.source();
    }
    message
}

/// `Retry-After` is either delay-seconds or an HTTP date (RFC 9110 §10.2.3).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The idempotency key of one step's external effect: deterministic in
/// `(instance_id, step_index, attempt_scope)` and nothing else, so every retry and every
/// redelivery of the same step sends the same key and PayOS executes at most once.
///
/// `attempt_scope` distinguishes several effects of one step (e.g. the action name, or
/// `"notify:ops@example.com"`); it must NOT contain the attempt number. The inputs are
/// length-prefixed and hashed with SHA-256, so the key is `wf_` plus 32 hex digits: safe in
/// any header and free of the instance's identifiers.
pub fn idempotency_key(
    instance_id: impl Display,
    step_index: usize,
    attempt_scope: &str,
) -> String {
    format!("wf_{}", scoped_hash(instance_id, step_index, attempt_scope))
}

/// 32 hex digits of SHA-256 over the length-prefixed parts.
pub(crate) fn scoped_hash(instance_id: impl Display, step_index: usize, scope: &str) -> String {
    let instance = instance_id.to_string();
    let step = (step_index as u64).to_be_bytes();
    let mut hasher = Sha256::new();
    for part in [instance.as_bytes(), &step[..], scope.as_bytes()] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    hex::encode(&hasher.finalize()[..16])
}

/// Exponential backoff with full jitter (the "Full Jitter" of AWS's backoff study): a uniformly
/// random delay between zero and `min(max, base * 2^(failed_attempt - 1))`.
///
/// `failed_attempt` is the 1-based number of the attempt that just failed, so the ceilings are
/// `base`, `2*base`, `4*base`, … capped at `max`. Full jitter spreads the retries of many
/// instances that failed together (a PayOS outage) instead of sending them in waves.
/// `failed_attempt == 0` is treated as 1.
pub fn backoff(failed_attempt: u32, base: Duration, max: Duration) -> Duration {
    let ceiling = backoff_ceiling(failed_attempt, base, max);
    let ceiling_ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    if ceiling_ms == 0 {
        return Duration::ZERO;
    }
    Duration::from_millis(rand::thread_rng().gen_range(0..=ceiling_ms))
}

/// The upper bound [`backoff`] draws from: `min(max, base * 2^(failed_attempt - 1))`.
pub fn backoff_ceiling(failed_attempt: u32, base: Duration, max: Duration) -> Duration {
    let exponent = failed_attempt.max(1) - 1;
    let factor = 1u32.checked_shl(exponent.min(31)).unwrap_or(u32::MAX);
    base.checked_mul(factor).unwrap_or(max).min(max)
}

/// Headers a template may not set: they belong to the transport or to us.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
    "proxy-authorization",
    "proxy-connection",
    IDEMPOTENCY_KEY_HEADER,
];

impl EgressClient {
    /// The generic `http` action: `method` `url` with `headers`, an optional JSON `body` and
    /// the `Idempotency-Key` header. The URL passes the egress policy (statically here, per
    /// resolved address at connect time). Redirects are returned as they are.
    pub async fn http_action(
        &self,
        method: &str,
        url: &str,
        headers: &BTreeMap<String, String>,
        body: Option<&serde_json::Value>,
        idempotency_key: &str,
    ) -> Result<ActionResponse, CallError> {
        let method = parse_method(method)?;
        let mut header_map = HeaderMap::new();
        for (name, value) in headers {
            let lower = name.to_ascii_lowercase();
            if RESERVED_HEADERS.contains(&lower.as_str()) {
                return Err(CallError::fatal(
                    CallErrorKind::InvalidRequest,
                    format!("header {name:?} may not be set by a template"),
                ));
            }
            let header_name = HeaderName::from_bytes(lower.as_bytes()).map_err(|_| {
                CallError::fatal(
                    CallErrorKind::InvalidRequest,
                    format!("invalid header name {name:?}"),
                )
            })?;
            let header_value = HeaderValue::from_str(value).map_err(|_| {
                CallError::fatal(
                    CallErrorKind::InvalidRequest,
                    format!("invalid value for header {name:?}"),
                )
            })?;
            header_map.append(header_name, header_value);
        }
        let mut request = self
            .request(method, url)
            .map_err(CallError::from_egress)?
            .headers(header_map)
            .header(IDEMPOTENCY_KEY_HEADER, idempotency_key);
        if let Some(body) = body {
            request = request.json(body);
        }
        send(request).await
    }
}

fn parse_method(method: &str) -> Result<Method, CallError> {
    match method.to_ascii_uppercase().as_str() {
        "GET" => Ok(Method::GET),
        "POST" => Ok(Method::POST),
        "PUT" => Ok(Method::PUT),
        "PATCH" => Ok(Method::PATCH),
        "DELETE" => Ok(Method::DELETE),
        "HEAD" => Ok(Method::HEAD),
        "OPTIONS" => Ok(Method::OPTIONS),
        _ => Err(CallError::fatal(
            CallErrorKind::InvalidRequest,
            format!("http method {method:?} is not allowed"),
        )),
    }
}

/// Sends one request and classifies the outcome: the single place where responses become
/// [`ActionResponse`] or [`CallError`].
pub(crate) async fn send(request: reqwest::RequestBuilder) -> Result<ActionResponse, CallError> {
    let started = Instant::now();
    let mut response = request
        .send()
        .await
        .map_err(|e| CallError::from_reqwest(&e))?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let mut bytes = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| CallError::from_reqwest(&e))?
    {
        if bytes.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(CallError {
                status: Some(status),
                ..CallError::fatal(
                    CallErrorKind::Body,
                    format!("response body exceeds {MAX_RESPONSE_BYTES} bytes"),
                )
            });
        }
        bytes.extend_from_slice(&chunk);
    }
    let latency_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    if status >= 400 {
        let snippet = snippet(&bytes, ERROR_SNIPPET_BYTES);
        return Err(CallError::from_status(
            status,
            &headers,
            &snippet,
            SystemTime::now(),
        ));
    }
    Ok(ActionResponse {
        status,
        body: json_or_text(&bytes),
        latency_ms,
    })
}

/// At most `max` bytes of `bytes` as text, cut at a character boundary.
pub(crate) fn snippet(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(max)]);
    // A cut inside a multi-byte character shows up as a trailing U+FFFD: drop it.
    text.trim_end_matches('\u{FFFD}').to_owned()
}

fn json_or_text(bytes: &[u8]) -> serde_json::Value {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return serde_json::Value::Null;
    }
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_key_is_stable_and_scoped() {
        let a = idempotency_key("inst-1", 3, "execute_transfer");
        assert_eq!(a, idempotency_key("inst-1", 3, "execute_transfer"));
        assert!(a.starts_with("wf_") && a.len() == 35, "{a}");
        assert_ne!(a, idempotency_key("inst-1", 4, "execute_transfer"));
        assert_ne!(a, idempotency_key("inst-2", 3, "execute_transfer"));
        assert_ne!(a, idempotency_key("inst-1", 3, "cancel_transfer"));
        // Length prefixes: moving bytes between parts changes the key.
        assert_ne!(idempotency_key("ab", 1, "c"), idempotency_key("a", 1, "bc"));
    }

    #[test]
    fn backoff_stays_under_the_ceiling() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        assert_eq!(backoff_ceiling(1, base, max), base);
        assert_eq!(backoff_ceiling(0, base, max), base);
        assert_eq!(backoff_ceiling(3, base, max), Duration::from_millis(400));
        assert_eq!(backoff_ceiling(10, base, max), max);
        assert_eq!(backoff_ceiling(u32::MAX, base, max), max);
        for attempt in 1..12 {
            for _ in 0..50 {
                assert!(backoff(attempt, base, max) <= backoff_ceiling(attempt, base, max));
            }
        }
        assert_eq!(backoff(1, Duration::ZERO, max), Duration::ZERO);
    }

    #[test]
    fn status_classification() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        let e = CallError::from_status(429, &headers, "slow down", now);
        assert!(e.retryable);
        assert_eq!(e.retry_after, Some(Duration::from_secs(7)));
        assert_eq!(e.status, Some(429));
        assert_eq!(
            e.next_delay(1, Duration::from_secs(1), Duration::from_secs(60)),
            Duration::from_secs(7)
        );
        let e = CallError::from_status(503, &headers, "", now);
        assert!(e.retryable && e.retry_after.is_some());
        let e = CallError::from_status(500, &headers, "", now);
        assert!(e.retryable && e.retry_after.is_none());
        for fatal in [400, 401, 403, 404, 409, 422] {
            assert!(
                !CallError::from_status(fatal, &headers, "", now).retryable,
                "{fatal}"
            );
        }
        for transient in [408, 425, 502, 504] {
            assert!(
                CallError::from_status(transient, &headers, "", now).retryable,
                "{transient}"
            );
        }
    }

    #[test]
    fn retry_after_http_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        // 784111777 is Sun, 06 Nov 1994 08:49:37 GMT (RFC 9110's example date).
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:47 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn bodies() {
        assert_eq!(json_or_text(b""), serde_json::Value::Null);
        assert_eq!(json_or_text(br#"{"a":1}"#), serde_json::json!({"a": 1}));
        assert_eq!(json_or_text(b"ok"), serde_json::json!("ok"));
        assert_eq!(snippet("héllo".as_bytes(), 2), "h");
    }
}
