//! A PayOS **sandbox**: an in-process stand-in for the PayOS API, so the embedded demo can run
//! its `action` steps end to end and tests have a real HTTP server that counts executions.
//! Nothing here moves money; every response says `"sandbox": true`.
//!
//! [`router`] serves the endpoints [`crate::PayosClient`] calls (see [`crate::payos`]):
//! - `POST /v1/transfers/{id}/execute` → `{"id", "status": "executed", "transfer_id",
//!   "executed_at", "sandbox": true}`
//! - `POST /v1/transfers/{id}/cancel` → `{"id", "status": "cancelled", "transfer_id",
//!   "cancelled_at", "sandbox": true}` (409 if the transfer was executed)
//! - `POST /v1/simulations` with `{"transfer_id", "params"}` → `{"simulation_id",
//!   "transfer_id", "outcome": "would_execute", "simulated_at", "sandbox": true}`
//!
//! and, for people and tests:
//! - `GET /sandbox/transfers`: every recorded call, counts per transfer, request and replay
//!   totals;
//! - `GET /sandbox/transfers/{id}`: one transfer's calls and counts (404 if none);
//! - `POST /sandbox/faults` `{"fault": {...}, "times": n}` / `DELETE /sandbox/faults`: fail
//!   the next `n` PayOS calls (see [`Fault`]); also [`SandboxState::inject`] in process.
//!
//! Idempotency, as PayOS is assumed to do it: `Idempotency-Key` is required (400 without);
//! the first successful response for a key is recorded, and a replay with that key gets the
//! same status and body (with `idempotent-replayed: true`) without executing again; reusing a
//! key for a different request is a 422. Failures (faults, 4xx) are not recorded, so a retry
//! after an injected 500 executes once.
//!
//! Calls are recorded through the [`SandboxLedger`] trait; [`InMemoryLedger`] is the default
//! and the lead may back it with a SQL table. Must never: be mounted in production in place of
//! the real PayOS, or share tables with real transfers.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, SecondsFormat, Utc};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::payos::PayosAction;

/// One successful PayOS call the sandbox answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedCall {
    pub idempotency_key: String,
    pub action: PayosAction,
    pub transfer_id: String,
    /// The request body as received.
    pub request: Value,
    /// SHA-256 over action, transfer id and body: a key reused for another request is a 422.
    pub fingerprint: String,
    pub status: u16,
    pub response: Value,
    pub recorded_at: DateTime<Utc>,
}

/// How often each operation ran for one transfer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferCounts {
    pub executions: u64,
    pub cancellations: u64,
    pub simulations: u64,
}

impl TransferCounts {
    fn add(&mut self, action: PayosAction) {
        match action {
            PayosAction::ExecuteTransfer => self.executions += 1,
            PayosAction::CancelTransfer => self.cancellations += 1,
            PayosAction::SimulateTransfer => self.simulations += 1,
        }
    }
}

/// What [`SandboxLedger::record_once`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Recorded {
    /// The call was new and is now recorded.
    New(RecordedCall),
    /// A call with the same idempotency key was already recorded; this is it.
    Existing(RecordedCall),
}

/// A ledger backend failed.
#[derive(Debug, thiserror::Error)]
#[error("sandbox ledger: {message}")]
pub struct LedgerError {
    pub message: String,
}

/// Where the sandbox records calls. Implementations must make [`SandboxLedger::record_once`]
/// atomic per idempotency key (a SQL backend: a unique index and `ON CONFLICT DO NOTHING`).
#[async_trait]
pub trait SandboxLedger: Send + Sync + 'static {
    /// The call recorded under `idempotency_key`, if any.
    async fn find(&self, idempotency_key: &str) -> Result<Option<RecordedCall>, LedgerError>;
    /// Records `call` unless its idempotency key is taken; returns the call that holds the key.
    async fn record_once(&self, call: RecordedCall) -> Result<Recorded, LedgerError>;
    /// Every recorded call, oldest first.
    async fn calls(&self) -> Result<Vec<RecordedCall>, LedgerError>;
    /// The calls for one transfer, oldest first.
    async fn calls_for(&self, transfer_id: &str) -> Result<Vec<RecordedCall>, LedgerError>;
    /// How often each operation ran for one transfer.
    async fn counts(&self, transfer_id: &str) -> Result<TransferCounts, LedgerError> {
        let mut counts = TransferCounts::default();
        for call in self.calls_for(transfer_id).await? {
            counts.add(call.action);
        }
        Ok(counts)
    }
}

/// The default ledger: a `Vec` and indexes by idempotency key and by transfer behind a mutex
/// (every call looks its transfer's calls up: a scan of the `Vec` made a long run quadratic).
#[derive(Debug, Default)]
pub struct InMemoryLedger {
    inner: Mutex<LedgerInner>,
}

#[derive(Debug, Default)]
struct LedgerInner {
    calls: Vec<RecordedCall>,
    by_key: HashMap<String, usize>,
    by_transfer: HashMap<String, Vec<usize>>,
}

impl InMemoryLedger {
    fn lock(&self) -> std::sync::MutexGuard<'_, LedgerInner> {
        // No code panics while holding the lock; recover the data if one ever did.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl SandboxLedger for InMemoryLedger {
    async fn find(&self, idempotency_key: &str) -> Result<Option<RecordedCall>, LedgerError> {
        let inner = self.lock();
        Ok(inner
            .by_key
            .get(idempotency_key)
            .and_then(|&i| inner.calls.get(i))
            .cloned())
    }

    async fn record_once(&self, call: RecordedCall) -> Result<Recorded, LedgerError> {
        let mut inner = self.lock();
        if let Some(existing) = inner
            .by_key
            .get(&call.idempotency_key)
            .and_then(|&i| inner.calls.get(i))
        {
            return Ok(Recorded::Existing(existing.clone()));
        }
        let index = inner.calls.len();
        inner.by_key.insert(call.idempotency_key.clone(), index);
        inner
            .by_transfer
            .entry(call.transfer_id.clone())
            .or_default()
            .push(index);
        inner.calls.push(call.clone());
        Ok(Recorded::New(call))
    }

    async fn calls(&self) -> Result<Vec<RecordedCall>, LedgerError> {
        Ok(self.lock().calls.clone())
    }

    async fn calls_for(&self, transfer_id: &str) -> Result<Vec<RecordedCall>, LedgerError> {
        let inner = self.lock();
        let indexes = inner
            .by_transfer
            .get(transfer_id)
            .map_or(&[][..], Vec::as_slice);
        Ok(indexes
            .iter()
            .filter_map(|&i| inner.calls.get(i))
            .cloned()
            .collect())
    }
}

/// A failure the sandbox injects into the next PayOS call, before idempotency handling.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// Answer with `status` (e.g. 500, 503, 429, 400), with `Retry-After: retry_after_secs`
    /// if given. Nothing is executed or recorded.
    Status {
        status: u16,
        #[serde(default)]
        retry_after_secs: Option<u64>,
    },
    /// Wait `millis` before handling the call normally (a client with a shorter timeout gives
    /// up; the call still executes, as a slow real server would).
    Delay { millis: u64 },
}

#[derive(Debug, Default)]
struct Stats {
    requests: AtomicU64,
    replays: AtomicU64,
}

/// The sandbox's shared state: the ledger, the fault queue, the optional API key.
#[derive(Clone)]
pub struct SandboxState {
    ledger: Arc<dyn SandboxLedger>,
    faults: Arc<Mutex<VecDeque<Fault>>>,
    api_key: Option<Arc<str>>,
    stats: Arc<Stats>,
}

impl std::fmt::Debug for SandboxState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxState")
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl SandboxState {
    /// A sandbox recording into an [`InMemoryLedger`], accepting any API key.
    pub fn in_memory() -> Self {
        Self::new(Arc::new(InMemoryLedger::default()))
    }

    /// A sandbox recording into `ledger`, accepting any API key.
    pub fn new(ledger: Arc<dyn SandboxLedger>) -> Self {
        Self {
            ledger,
            faults: Arc::default(),
            api_key: None,
            stats: Arc::default(),
        }
    }

    /// Require `Authorization: Bearer <api_key>` on the PayOS endpoints (401 otherwise).
    pub fn with_api_key(mut self, api_key: &str) -> Self {
        self.api_key = Some(Arc::from(api_key));
        self
    }

    pub fn ledger(&self) -> &Arc<dyn SandboxLedger> {
        &self.ledger
    }

    /// Fail the next `times` PayOS calls with `fault` (queued after faults already injected).
    pub fn inject(&self, fault: Fault, times: usize) {
        let mut faults = self.faults.lock().unwrap_or_else(PoisonError::into_inner);
        faults.extend(std::iter::repeat_n(fault, times));
    }

    /// Drops every queued fault.
    pub fn clear_faults(&self) {
        self.faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// PayOS calls received (including failed and replayed ones).
    pub fn requests(&self) -> u64 {
        self.stats.requests.load(Ordering::Relaxed)
    }

    /// Calls answered from the idempotency record instead of executing.
    pub fn replays(&self) -> u64 {
        self.stats.replays.load(Ordering::Relaxed)
    }

    /// Shorthand for the ledger's counts for one transfer.
    pub async fn counts(&self, transfer_id: &str) -> Result<TransferCounts, LedgerError> {
        self.ledger.counts(transfer_id).await
    }

    fn next_fault(&self) -> Option<Fault> {
        self.faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop_front()
    }
}

/// The sandbox's routes, ready to be served or nested into a larger router.
pub fn router(state: SandboxState) -> Router {
    Router::new()
        .route("/v1/transfers/{id}/execute", post(execute))
        .route("/v1/transfers/{id}/cancel", post(cancel))
        .route("/v1/simulations", post(simulate))
        .route("/sandbox/transfers", get(list_transfers))
        .route("/sandbox/transfers/{id}", get(get_transfer))
        .route("/sandbox/faults", post(add_faults).delete(clear_faults))
        .with_state(state)
}

async fn execute(
    State(state): State<SandboxState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle_detached(state, PayosAction::ExecuteTransfer, Some(id), headers, body).await
}

async fn cancel(
    State(state): State<SandboxState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle_detached(state, PayosAction::CancelTransfer, Some(id), headers, body).await
}

async fn simulate(State(state): State<SandboxState>, headers: HeaderMap, body: Bytes) -> Response {
    handle_detached(state, PayosAction::SimulateTransfer, None, headers, body).await
}

/// Handles the call in its own task: hyper drops a handler when the client disconnects, but a
/// payment API that started executing finishes (a client that timed out does not know whether
/// the transfer ran; that is what the idempotency key is for). The sandbox behaves the same.
async fn handle_detached(
    state: SandboxState,
    action: PayosAction,
    path_id: Option<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let task = tokio::spawn(async move { handle(&state, action, path_id, &headers, &body).await });
    match task.await {
        Ok(response) => response,
        Err(e) => {
            tracing::error!(error = %e, "payos sandbox: handler task failed");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "sandbox handler failed",
            )
        }
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({ "error": { "code": code, "message": message }, "sandbox": true })),
    )
        .into_response()
}

fn ledger_failed(e: &LedgerError) -> Response {
    tracing::error!(error = %e, "payos sandbox: ledger failed");
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "ledger_failed",
        "sandbox ledger failed",
    )
}

fn replay(state: &SandboxState, call: &RecordedCall, fingerprint: &str) -> Response {
    if call.fingerprint != fingerprint {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            "this Idempotency-Key was used for a different request",
        );
    }
    state.stats.replays.fetch_add(1, Ordering::Relaxed);
    let status = StatusCode::from_u16(call.status).unwrap_or(StatusCode::OK);
    let mut response = (status, Json(call.response.clone())).into_response();
    response
        .headers_mut()
        .insert("idempotent-replayed", HeaderValue::from_static("true"));
    response
}

async fn handle(
    state: &SandboxState,
    action: PayosAction,
    path_id: Option<String>,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    state.stats.requests.fetch_add(1, Ordering::Relaxed);
    if let Some(expected) = &state.api_key {
        let presented = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if presented != Some(expected) {
            return error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong API key",
            );
        }
    }
    match state.next_fault() {
        Some(Fault::Status {
            status,
            retry_after_secs,
        }) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = error(status, "sandbox_fault", "fault injected by the sandbox");
            if let Some(secs) = retry_after_secs {
                response
                    .headers_mut()
                    .insert(axum::http::header::RETRY_AFTER, HeaderValue::from(secs));
            }
            return response;
        }
        Some(Fault::Delay { millis }) => tokio::time::sleep(Duration::from_millis(millis)).await,
        None => {}
    }
    let Some(key) = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty())
    else {
        return error(
            StatusCode::BAD_REQUEST,
            "idempotency_key_required",
            "the Idempotency-Key header is required",
        );
    };
    let request: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(_) => return error(StatusCode::BAD_REQUEST, "invalid_json", "body is not JSON"),
        }
    };
    let transfer_id = match path_id {
        Some(id) => id,
        None => match request.get("transfer_id").and_then(Value::as_str) {
            Some(id) if !id.is_empty() => id.to_owned(),
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "transfer_id_required",
                    "the body needs a string transfer_id",
                )
            }
        },
    };
    let fingerprint = fingerprint(action, &transfer_id, &request);

    match state.ledger.find(key).await {
        Ok(Some(existing)) => return replay(state, &existing, &fingerprint),
        Ok(None) => {}
        Err(e) => return ledger_failed(&e),
    }
    let counts = match state.ledger.counts(&transfer_id).await {
        Ok(c) => c,
        Err(e) => return ledger_failed(&e),
    };
    let now = Utc::now();
    let at = now.to_rfc3339_opts(SecondsFormat::Millis, true);
    let response = match action {
        PayosAction::ExecuteTransfer if counts.cancellations > 0 => {
            return error(
                StatusCode::CONFLICT,
                "transfer_cancelled",
                "the transfer was cancelled",
            )
        }
        PayosAction::CancelTransfer if counts.executions > 0 => {
            return error(
                StatusCode::CONFLICT,
                "transfer_executed",
                "the transfer was executed",
            )
        }
        PayosAction::ExecuteTransfer => json!({
            "id": sandbox_id("exe"),
            "status": "executed",
            "transfer_id": transfer_id,
            "executed_at": at,
            "sandbox": true,
        }),
        PayosAction::CancelTransfer => json!({
            "id": sandbox_id("can"),
            "status": "cancelled",
            "transfer_id": transfer_id,
            "cancelled_at": at,
            "sandbox": true,
        }),
        PayosAction::SimulateTransfer => json!({
            "simulation_id": sandbox_id("sim"),
            "transfer_id": transfer_id,
            "outcome": "would_execute",
            "params": request.get("params").cloned().unwrap_or(Value::Null),
            "simulated_at": at,
            "sandbox": true,
        }),
    };
    let call = RecordedCall {
        idempotency_key: key.to_owned(),
        action,
        transfer_id,
        request,
        fingerprint: fingerprint.clone(),
        status: 200,
        response,
        recorded_at: now,
    };
    match state.ledger.record_once(call).await {
        Ok(Recorded::New(call)) => {
            tracing::info!(action = action.name(), transfer_id = %call.transfer_id, "payos sandbox: recorded");
            (StatusCode::OK, Json(call.response)).into_response()
        }
        // Another request with the same key won the race: answer as a replay.
        Ok(Recorded::Existing(existing)) => replay(state, &existing, &fingerprint),
        Err(e) => ledger_failed(&e),
    }
}

fn fingerprint(action: PayosAction, transfer_id: &str, request: &Value) -> String {
    let mut hasher = Sha256::new();
    for part in [action.name(), transfer_id, &request.to_string()] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    hex::encode(hasher.finalize())
}

fn sandbox_id(prefix: &str) -> String {
    let bytes: [u8; 8] = rand::thread_rng().gen();
    format!("sbx_{prefix}_{}", hex::encode(bytes))
}

async fn list_transfers(State(state): State<SandboxState>) -> Response {
    let calls = match state.ledger.calls().await {
        Ok(c) => c,
        Err(e) => return ledger_failed(&e),
    };
    let mut transfers: BTreeMap<&str, TransferCounts> = BTreeMap::new();
    for call in &calls {
        transfers
            .entry(&call.transfer_id)
            .or_default()
            .add(call.action);
    }
    Json(json!({
        "sandbox": true,
        "requests": state.requests(),
        "replays": state.replays(),
        "transfers": transfers,
        "calls": calls,
    }))
    .into_response()
}

async fn get_transfer(State(state): State<SandboxState>, Path(id): Path<String>) -> Response {
    let calls = match state.ledger.calls_for(&id).await {
        Ok(c) => c,
        Err(e) => return ledger_failed(&e),
    };
    if calls.is_empty() {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no calls recorded for this transfer",
        );
    }
    let mut counts = TransferCounts::default();
    for call in &calls {
        counts.add(call.action);
    }
    Json(json!({ "sandbox": true, "transfer_id": id, "counts": counts, "calls": calls }))
        .into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultRequest {
    fault: Fault,
    #[serde(default = "one")]
    times: usize,
}

fn one() -> usize {
    1
}

async fn add_faults(State(state): State<SandboxState>, body: Bytes) -> Response {
    match serde_json::from_slice::<FaultRequest>(&body) {
        Ok(req) if req.times <= 1000 => {
            state.inject(req.fault, req.times);
            (
                StatusCode::OK,
                Json(json!({ "sandbox": true, "queued": req.times })),
            )
                .into_response()
        }
        Ok(_) => error(
            StatusCode::BAD_REQUEST,
            "invalid_fault",
            "times must be at most 1000",
        ),
        Err(e) => error(StatusCode::BAD_REQUEST, "invalid_fault", &e.to_string()),
    }
}

async fn clear_faults(State(state): State<SandboxState>) -> Response {
    state.clear_faults();
    StatusCode::NO_CONTENT.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(key: &str, transfer: &str, action: PayosAction) -> RecordedCall {
        RecordedCall {
            idempotency_key: key.to_string(),
            action,
            transfer_id: transfer.to_string(),
            request: Value::Null,
            fingerprint: String::new(),
            status: 200,
            response: Value::Null,
            recorded_at: Utc::now(),
        }
    }

    #[tokio::test]
    async fn the_in_memory_ledger_finds_each_transfers_calls_in_order() -> Result<(), LedgerError> {
        let ledger = InMemoryLedger::default();
        ledger
            .record_once(call("k1", "tr_a", PayosAction::ExecuteTransfer))
            .await?;
        ledger
            .record_once(call("k2", "tr_b", PayosAction::ExecuteTransfer))
            .await?;
        ledger
            .record_once(call("k3", "tr_a", PayosAction::CancelTransfer))
            .await?;
        // A replayed key is answered from the ledger, not recorded again.
        let replay = ledger
            .record_once(call("k1", "tr_a", PayosAction::ExecuteTransfer))
            .await?;
        assert!(matches!(replay, Recorded::Existing(_)));
        let keys = |calls: Vec<RecordedCall>| -> Vec<String> {
            calls.into_iter().map(|c| c.idempotency_key).collect()
        };
        assert_eq!(keys(ledger.calls_for("tr_a").await?), ["k1", "k3"]);
        assert_eq!(keys(ledger.calls_for("tr_b").await?), ["k2"]);
        assert!(ledger.calls_for("tr_c").await?.is_empty());
        let counts = ledger.counts("tr_a").await?;
        assert_eq!((counts.executions, counts.cancellations), (1, 1));
        Ok(())
    }
}
