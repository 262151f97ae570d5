//! The `seed` workload: instance throughput of the spec's Procurement Approval template.
//!
//! The driver is runtime-agnostic: it speaks to the engine only through its HTTP API at a base
//! URL, and reads latencies from the store (a database URL) once the run is over.
//!
//! 1. Setup (not timed), with the admin token: a fresh partner, API keys for a requester (human)
//!    and two agents, one with the `cfo` role and one with `finance_manager`; the template, as
//!    written in `examples/templates/procurement-approval.json`, saved by the requester.
//! 2. The run: `instances` instances are started through `POST /v1/workflows/instances`, half
//!    at or under $1,000 (step 0 routes `skip_to:3`, "Execute Payment" runs at once), half over
//!    (they wait for the CFO, then the finance manager). Each agent works through its pending
//!    inbox (`GET /v1/workflows/pending`) and approves (`POST .../steps/{n}/approve`) every
//!    step it may; `execute_transfer` calls the PayOS target the engine is configured with.
//! 3. Done when every instance is terminal (polled in the store). Then, from the store:
//!    - throughput: terminal instances / (last completion − first start);
//!    - step latency: for every step command, the `step.dispatched` audit event (written by the
//!      transition that emitted the command, in its transaction) to the `step.started` event
//!      (the pool's transition that recorded the step as taken up). Both are durable and in the
//!      instance's hash-chained trail, so no extra column is needed; resolution is 1 ms;
//!    - end-to-end latency: instance `created_at` to its last commit (`updated_at`, the
//!      completing transition).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sqlx::Row;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use workflow_store::Store;

use super::{percentile, BenchError};

/// The spec's template, compiled in (the binary never reads the examples directory).
pub const SEED_TEMPLATE: &str =
    include_str!("../../../../examples/templates/procurement-approval.json");

/// The steps the approvers decide, and who decides them.
const CFO_STEP: usize = 1;
const MANAGER_STEP: usize = 2;
/// How many pending items one inbox call asks for.
const INBOX_PAGE: u32 = 100;

/// How the seed workload runs.
#[derive(Debug, Clone)]
pub struct SeedOptions {
    /// Instances to start; even-numbered ones are at or under $1,000.
    pub instances: usize,
    /// Create calls in flight at once.
    pub concurrency: usize,
    /// Approve calls in flight at once, per agent. Kept under [`INBOX_PAGE`] so an inbox page
    /// always has room for items not yet being decided.
    pub approver_concurrency: usize,
    /// Start at most this many instances per second (0: as fast as the API answers).
    pub rate: f64,
    /// Give up when the run has not finished after this long.
    pub timeout: Duration,
    /// How the agents find what to approve.
    pub agents: AgentMode,
}

/// How the two agents find the steps they approve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentMode {
    /// Each agent is told the instances as they are created (the CFO agent) or approved by
    /// the CFO (the manager agent), and approves its step, retrying while the step is not
    /// waiting yet (`409 step_not_waiting`).
    Direct,
    /// Each agent polls its pending inbox (`GET /v1/workflows/pending`). A poll scans the
    /// partner's waiting approval steps up to its page and reads the instances of those whose
    /// approvers name the agent.
    Inbox,
}

impl Default for SeedOptions {
    fn default() -> SeedOptions {
        SeedOptions {
            instances: 2000,
            concurrency: 32,
            approver_concurrency: 32,
            rate: 0.0,
            timeout: Duration::from_secs(600),
            agents: AgentMode::Direct,
        }
    }
}

/// The engine under test: where its API is, how to administer it, where its store is.
#[derive(Debug, Clone)]
pub struct Target {
    pub base_url: String,
    pub admin_token: String,
    pub database_url: String,
}

/// p50, p99 and max of a latency, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Percentiles {
    pub p50: i64,
    pub p99: i64,
    pub max: i64,
}

impl Percentiles {
    pub fn of(mut samples: Vec<i64>) -> Percentiles {
        samples.sort_unstable();
        Percentiles {
            p50: percentile(&samples, 50.0),
            p99: percentile(&samples, 99.0),
            max: samples.last().copied().unwrap_or(0),
        }
    }

    fn to_json(self) -> Value {
        json!({"p50": self.p50, "p99": self.p99, "max": self.max})
    }
}

/// What the load itself observed (before CPU accounting).
#[derive(Debug, Clone)]
pub struct DriveOutcome {
    pub partner_id: String,
    pub instances: usize,
    /// Instances that ended `completed` (the others failed, were rejected or cancelled).
    pub completed: usize,
    pub terminal: usize,
    /// First start (client clock, ms) to the last terminal commit (engine clock, ms).
    pub elapsed_s: f64,
    pub http_requests: u64,
    pub approvals: usize,
}

/// What the seed workload measured.
#[derive(Debug, Clone)]
pub struct SeedReport {
    pub runtime: String,
    pub instances: usize,
    pub completed: usize,
    pub elapsed_s: f64,
    pub instances_per_s: f64,
    pub step_latency_ms: Percentiles,
    pub step_samples: usize,
    pub e2e_latency_ms: Percentiles,
    /// CPU of the engine's processes during the run (for embedded: the process minus the
    /// driver's own thread).
    pub cpu_s: f64,
    pub cpu_s_per_1000: f64,
    /// CPU of the load driver itself, when it could be told apart (embedded).
    pub driver_cpu_s: Option<f64>,
    /// Distributed, with PostgreSQL and Kafka on this machine: their CPU during the run.
    pub services_cpu: Option<super::cpu::ServicesCpu>,
    /// The CPU the machine spent during the run on anything the bench does not account for
    /// (other tenants of a shared host): how much of the cores the run did not have.
    pub others: Option<super::cpu::Others>,
    pub http_requests: u64,
}

impl SeedReport {
    /// The one-line JSON summary (the bench's last line).
    pub fn to_json(&self) -> Value {
        json!({
            "workload": "seed",
            "runtime": self.runtime,
            "instances": self.instances,
            "completed": self.completed,
            "elapsed_s": round3(self.elapsed_s),
            "instances_per_s": round3(self.instances_per_s),
            "step_latency_ms": self.step_latency_ms.to_json(),
            "step_samples": self.step_samples,
            "e2e_latency_ms": self.e2e_latency_ms.to_json(),
            "cpu_s": round3(self.cpu_s),
            "cpu_s_per_1000": round3(self.cpu_s_per_1000),
            "driver_cpu_s": self.driver_cpu_s.map(round3),
            "services_cpu_s_per_1000": self.services_per_1000(|s| s.total_s()).map(round3),
            "postgres_cpu_s_per_1000": self.services_per_1000(|s| s.postgres_s).map(round3),
            "kafka_cpu_s_per_1000": self.services_per_1000(|s| s.kafka_s).map(round3),
            "others_cpu_s": self.others.map(|o| round3(o.cpu_s)),
            "others_cores": self.others.map(|o| round3(o.cores())),
            "http_requests": self.http_requests,
        })
    }

    /// The human-readable lines printed before the JSON one.
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec![
            format!(
                "seed: {} instances on the {} runtime ({} ≤ $1,000 run straight to the transfer; {} > $1,000 wait for a CFO agent and a finance_manager agent)",
                self.instances,
                self.runtime,
                self.instances.div_ceil(2),
                self.instances / 2
            ),
            format!(
                "completed {} in {:.2} s: {:.0} instances/s",
                self.completed, self.elapsed_s, self.instances_per_s
            ),
            format!(
                "step latency (command emitted → step taken up, {} steps): p50 {} ms  p99 {} ms  max {} ms",
                self.step_samples,
                self.step_latency_ms.p50,
                self.step_latency_ms.p99,
                self.step_latency_ms.max
            ),
            format!(
                "end-to-end (created → completed): p50 {} ms  p99 {} ms  max {} ms",
                self.e2e_latency_ms.p50, self.e2e_latency_ms.p99, self.e2e_latency_ms.max
            ),
        ];
        let driver = self
            .driver_cpu_s
            .map(|d| format!("; the load driver used {d:.2} s more, not counted"))
            .unwrap_or_default();
        out.push(format!(
            "CPU: {:.2} s, {:.2} s per 1,000 instances{driver}; {} HTTP requests",
            self.cpu_s, self.cpu_s_per_1000, self.http_requests
        ));
        if let Some(services) = self.services_cpu {
            out.push(format!(
                "PostgreSQL and Kafka on this machine: {:.2} s, {:.2} s per 1,000 instances (PostgreSQL {:.2}, Kafka {:.2}; not in the figure above)",
                services.total_s(),
                self.per_1000(services.total_s()),
                self.per_1000(services.postgres_s),
                self.per_1000(services.kafka_s),
            ));
        }
        if let Some(others) = self.others {
            out.push(format!(
                "the rest of the machine: {:.2} s of CPU in the {:.2} s measured ({:.2} cores on average: other tenants, other processes)",
                others.cpu_s,
                others.window_s,
                others.cores()
            ));
        }
        out
    }

    /// One figure of the services' CPU per 1,000 terminal instances.
    fn services_per_1000(&self, figure: impl Fn(&super::cpu::ServicesCpu) -> f64) -> Option<f64> {
        self.services_cpu.as_ref().map(|s| self.per_1000(figure(s)))
    }

    /// CPU seconds per 1,000 terminal instances.
    fn per_1000(&self, seconds: f64) -> f64 {
        seconds * 1000.0 / self.completed.max(1) as f64
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn now_ms() -> i64 {
    use workflow_engine::Clock;
    workflow_engine::SystemClock.now().0
}

/// An HTTP client for one engine, counting its requests.
#[derive(Clone)]
struct Api {
    client: reqwest::Client,
    base: Arc<str>,
    requests: Arc<AtomicU64>,
}

impl Api {
    fn new(base: &str) -> Result<Api, BenchError> {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| BenchError::Http(format!("cannot build the HTTP client: {e}")))?;
        Ok(Api {
            client,
            base: base.trim_end_matches('/').into(),
            requests: Arc::new(AtomicU64::new(0)),
        })
    }

    /// One request; the answer's status and body, undecoded.
    async fn call(
        &self,
        method: Method,
        path: &str,
        key: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), BenchError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut req = self
            .client
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(key);
        if let Some(body) = body {
            req = req.header("content-type", "application/json").body(body);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| BenchError::Http(format!("{method} {path}: {e}")))?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| BenchError::Http(format!("{method} {path}: {e}")))?;
        Ok((status, bytes))
    }

    /// A call that must answer `want`; returns the body, undecoded.
    async fn expect(
        &self,
        method: Method,
        path: &str,
        key: &str,
        body: Option<Vec<u8>>,
        want: StatusCode,
    ) -> Result<Bytes, BenchError> {
        let (status, bytes) = self.call(method.clone(), path, key, body).await?;
        if status != want {
            return Err(BenchError::Http(format!(
                "{method} {path}: expected {want}, got {status}: {}",
                String::from_utf8_lossy(&bytes)
            )));
        }
        Ok(bytes)
    }
}

/// The fields the hot path reads of an answer. Decoding only them skips the rest of the
/// instance view without building it: the driver shares the machine with the engine it
/// measures, so its parsing is kept small.
#[derive(Debug, Default, serde::Deserialize)]
struct Brief {
    id: Option<String>,
    waiting_on: Option<BriefWaiting>,
    error: Option<BriefError>,
}

#[derive(Debug, serde::Deserialize)]
struct BriefWaiting {
    step_index: usize,
    kind: String,
}

#[derive(Debug, serde::Deserialize)]
struct BriefError {
    code: String,
}

impl Brief {
    /// The instance view says it waits for an approval of `step`.
    fn waits_for_approval(&self, step: usize) -> bool {
        self.waiting_on
            .as_ref()
            .is_some_and(|w| w.step_index == step && w.kind == "approval")
    }
}

/// An instance handed to the next agent, as a webhook would: `waiting` when the answer that
/// handed it over already showed the instance waiting for that agent's approval.
#[derive(Debug)]
struct Handoff {
    id: String,
    waiting: bool,
}

/// `bytes` as JSON of type `T`; `T::default()` when they are not.
fn decode<T: serde::de::DeserializeOwned + Default>(bytes: &[u8]) -> T {
    serde_json::from_slice(bytes).unwrap_or_default()
}

fn to_body(v: &Value) -> Option<Vec<u8>> {
    serde_json::to_vec(v).ok()
}

/// The actors' keys and the template, made through the admin API.
struct Setup {
    partner_id: String,
    requester: String,
    cfo: String,
    manager: String,
    template_id: String,
}

async fn setup(api: &Api, admin: &str) -> Result<Setup, BenchError> {
    let partner_id = format!("bench-{}", uuid::Uuid::now_v7().simple());
    api.expect(
        Method::POST,
        "/v1/admin/partners",
        admin,
        to_body(&json!({"id": partner_id, "name": "Seed benchmark"})),
        StatusCode::CREATED,
    )
    .await?;
    let key = |id: &'static str, kind: &'static str, role: &'static str| {
        let (api, partner_id) = (api.clone(), partner_id.clone());
        async move {
            let body = json!({"partner_id": partner_id, "actor": {"id": id, "type": kind, "roles": [role]}});
            let v: Value = decode(
                &api.expect(
                    Method::POST,
                    "/v1/admin/api-keys",
                    admin,
                    to_body(&body),
                    StatusCode::CREATED,
                )
                .await?,
            );
            v.get("key")
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| BenchError::Http(format!("no key in the api-keys answer: {v}")))
        }
    };
    let requester = key("bench-requester", "human", "requester").await?;
    let cfo = key("bench-cfo-agent", "agent", "cfo").await?;
    let manager = key("bench-manager-agent", "agent", "finance_manager").await?;
    let tpl: Value = decode(
        &api.expect(
            Method::POST,
            "/v1/workflows/templates",
            &requester,
            Some(SEED_TEMPLATE.as_bytes().to_vec()),
            StatusCode::CREATED,
        )
        .await?,
    );
    let template_id = tpl
        .get("id")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| BenchError::Http(format!("no id in the template answer: {tpl}")))?;
    Ok(Setup {
        partner_id,
        requester,
        cfo,
        manager,
        template_id,
    })
}

/// The trigger of instance `i`: even ones at or under $1,000, odd ones over.
pub fn seed_trigger(run: &str, i: usize) -> Value {
    let amount = if i.is_multiple_of(2) {
        100 + (i % 901) as u64
    } else {
        1_001 + (i % 50_000) as u64
    };
    json!({
        "id": format!("tr_{run}_{i}"),
        "amount": amount,
        "currency": "USD",
        "metadata": {"type": "procurement"},
    })
}

/// Start instances `0..n`, `concurrency` calls at a time, paced to `rate` per second if set.
async fn create_all(
    api: &Api,
    setup: &Setup,
    opts: &SeedOptions,
    started: Instant,
    large: Option<mpsc::UnboundedSender<Handoff>>,
) -> Result<(), BenchError> {
    let next = Arc::new(AtomicUsize::new(0));
    let run = uuid::Uuid::now_v7().simple().to_string();
    let mut workers = JoinSet::new();
    for _ in 0..opts.concurrency.max(1) {
        let (api, next, run) = (api.clone(), next.clone(), run.clone());
        let (key, template_id) = (setup.requester.clone(), setup.template_id.clone());
        let (n, rate, large) = (opts.instances, opts.rate, large.clone());
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, BenchError>(());
                }
                if rate > 0.0 {
                    let at = started + Duration::from_secs_f64(i as f64 / rate);
                    tokio::time::sleep_until(at.into()).await;
                }
                let body = json!({
                    "template_id": template_id,
                    "trigger": seed_trigger(&run, i),
                    "idempotency_key": format!("bench-{run}-{i}"),
                });
                let created = api
                    .expect(
                        Method::POST,
                        "/v1/workflows/instances",
                        &key,
                        to_body(&body),
                        StatusCode::CREATED,
                    )
                    .await?;
                if let (Some(large), true) = (&large, i % 2 == 1) {
                    let brief: Brief = decode(&created);
                    let Some(id) = brief.id.clone() else {
                        return Err(BenchError::Http(format!(
                            "no id in the instance answer: {}",
                            String::from_utf8_lossy(&created)
                        )));
                    };
                    let waiting = brief.waits_for_approval(CFO_STEP);
                    // The agent is gone only if the run is failing already.
                    let _ = large.send(Handoff { id, waiting });
                }
            }
        });
    }
    join_all(workers).await
}

async fn join_all(mut set: JoinSet<Result<(), BenchError>>) -> Result<(), BenchError> {
    let mut first_error = None;
    while let Some(done) = set.join_next().await {
        let res = done.map_err(|e| BenchError::Http(format!("a driver task failed: {e}")));
        if let Err(e) = res.and_then(|r| r) {
            first_error.get_or_insert(e);
            set.abort_all();
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// One agent: work through the pending inbox, approving every `step` it may, until it has
/// approved `expected` of them.
async fn agent(
    api: Api,
    key: String,
    step: usize,
    expected: usize,
    concurrency: usize,
) -> Result<usize, BenchError> {
    let mut taken: HashSet<String> = HashSet::new();
    let mut approved = 0usize;
    let mut inflight: JoinSet<Result<(String, bool), BenchError>> = JoinSet::new();
    let path = format!("/v1/workflows/pending?limit={INBOX_PAGE}");
    while approved < expected {
        // Collect what finished.
        while let Some(done) = inflight.try_join_next() {
            let (id, ok) = done.map_err(|e| BenchError::Http(format!("approve task: {e}")))??;
            if ok {
                approved += 1;
            } else {
                // Not applied (e.g. it raced a step change): look at it again later.
                taken.remove(&id);
            }
        }
        if approved >= expected {
            break;
        }
        if inflight.len() >= concurrency {
            if let Some(done) = inflight.join_next().await {
                let (id, ok) =
                    done.map_err(|e| BenchError::Http(format!("approve task: {e}")))??;
                if ok {
                    approved += 1;
                } else {
                    taken.remove(&id);
                }
            }
            continue;
        }
        let page: Value = decode(
            &api.expect(Method::GET, &path, &key, None, StatusCode::OK)
                .await?,
        );
        let mut fresh = 0;
        for item in page
            .get("data")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let (Some(id), Some(index), Some(true)) = (
                item.get("instance_id").and_then(Value::as_str),
                item.get("step_index").and_then(Value::as_u64),
                item.get("may_approve").and_then(Value::as_bool),
            ) else {
                continue;
            };
            if index as usize != step || taken.contains(id) || inflight.len() >= concurrency {
                continue;
            }
            taken.insert(id.to_string());
            fresh += 1;
            let (api, key, id) = (api.clone(), key.clone(), id.to_string());
            inflight.spawn(async move {
                let path = format!("/v1/workflows/instances/{id}/steps/{step}/approve");
                let (status, body) = api.call(Method::POST, &path, &key, None).await?;
                match status {
                    // 202: queued on the instance's decision stream; it will be applied.
                    StatusCode::OK | StatusCode::ACCEPTED => Ok((id, true)),
                    StatusCode::CONFLICT => Ok((id, false)),
                    other => Err(BenchError::Http(format!(
                        "POST {path}: expected 200, got {other}: {}",
                        String::from_utf8_lossy(&body)
                    ))),
                }
            });
        }
        if fresh == 0 {
            // Nothing new to decide: wait for an approval in flight, or a little.
            tokio::select! {
                Some(done) = inflight.join_next(), if !inflight.is_empty() => {
                    let (id, ok) =
                        done.map_err(|e| BenchError::Http(format!("approve task: {e}")))??;
                    if ok { approved += 1 } else { taken.remove(&id); }
                }
                _ = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
        }
    }
    while let Some(done) = inflight.join_next().await {
        if done
            .map_err(|e| BenchError::Http(format!("approve task: {e}")))??
            .1
        {
            approved += 1;
        }
    }
    Ok(approved)
}

/// One agent told which instances to approve: approve `step` of each id received, retrying
/// while the step is not waiting yet, then hand the id on to `next` (the next agent and the
/// step it approves). Returns how many it approved.
async fn agent_direct(
    api: Api,
    key: String,
    step: usize,
    mut ids: mpsc::UnboundedReceiver<Handoff>,
    next: Option<(mpsc::UnboundedSender<Handoff>, usize)>,
    concurrency: usize,
) -> Result<usize, BenchError> {
    let mut inflight: JoinSet<Result<(), BenchError>> = JoinSet::new();
    let mut approved = 0usize;
    let mut open = true;
    let wait = Arc::new(TypicalWait::default());
    while open || !inflight.is_empty() {
        tokio::select! {
            id = ids.recv(), if open && inflight.len() < concurrency => {
                let Some(handoff) = id else {
                    open = false;
                    continue;
                };
                let (api, key, next, wait) = (api.clone(), key.clone(), next.clone(), wait.clone());
                inflight.spawn(async move {
                    let answer = approve_when_waiting(&api, &key, &handoff, step, &wait).await?;
                    if let Some((next, next_step)) = next {
                        let waiting = answer.waits_for_approval(next_step);
                        let _ = next.send(Handoff { id: handoff.id, waiting });
                    }
                    Ok(())
                });
            }
            Some(done) = inflight.join_next(), if !inflight.is_empty() => {
                done.map_err(|e| BenchError::Http(format!("approve task: {e}")))??;
                approved += 1;
            }
        }
    }
    Ok(approved)
}

/// How long after an agent is handed an id its step typically becomes approvable: a moving
/// average of the agent's own observations (hand-over → accepted attempt), in microseconds.
///
/// An agent told of an instance before its step waits (the CFO gets ids at creation) would
/// otherwise retry `409 step_not_waiting` every 5 → 100 ms; at saturation, when steps wait
/// seconds, those retries were 2–4 requests per instance, each served by the engine (auth,
/// load, eligibility check): load the driver added, not load of the workload. A webhook-driven
/// agent is told when the step waits; this agent approximates that by first waiting about as
/// long as the step usually takes. When the answer that handed the instance over already shows
/// the step waiting (a create or an approval answered in place), it is told, as by the webhook,
/// and attempts at once.
#[derive(Debug, Default)]
struct TypicalWait(AtomicU64);

impl TypicalWait {
    /// Half the typical wait: most first attempts land just after the step waits, and a
    /// faster-than-usual step is not held back long.
    fn first_attempt(&self) -> Duration {
        Duration::from_micros(self.0.load(Ordering::Relaxed) / 2)
    }

    fn observe(&self, waited: Duration) {
        let seen = waited.as_micros().min(u128::from(u64::MAX)) as u64;
        let old = self.0.load(Ordering::Relaxed);
        // An exponentially weighted average over about the last 16 approvals; a lost update
        // between agents' tasks only skips one observation.
        let new = if old == 0 {
            seen
        } else {
            old - old / 16 + seen / 16
        };
        self.0.store(new, Ordering::Relaxed);
    }
}

/// Approve `step` of the handed-over instance; the accepted answer, decoded (empty for a
/// `202`, whose body is not an instance view).
async fn approve_when_waiting(
    api: &Api,
    key: &str,
    handoff: &Handoff,
    step: usize,
    typical: &TypicalWait,
) -> Result<Brief, BenchError> {
    let path = format!(
        "/v1/workflows/instances/{}/steps/{step}/approve",
        handoff.id
    );
    let handed_over = Instant::now();
    if !handoff.waiting {
        tokio::time::sleep(typical.first_attempt()).await;
    }
    // Each retry is a request the engine serves (auth, load, eligibility check): back off so
    // the driver's polling does not become the load it measures.
    let mut delay = Duration::from_millis(5);
    let give_up = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, body) = api.call(Method::POST, &path, key, None).await?;
        match status {
            // 202: queued on the instance's decision stream; it will be applied, in order.
            StatusCode::OK | StatusCode::ACCEPTED => {
                // Only waits that were guessed teach the guess.
                if !handoff.waiting {
                    typical.observe(handed_over.elapsed());
                }
                return Ok(if status == StatusCode::OK {
                    decode(&body)
                } else {
                    Brief::default()
                });
            }
            StatusCode::CONFLICT
                if decode::<Brief>(&body).error.map(|e| e.code).as_deref()
                    == Some("step_not_waiting")
                    && Instant::now() < give_up =>
            {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(100));
            }
            other => {
                return Err(BenchError::Http(format!(
                    "POST {path}: expected 200, got {other}: {}",
                    String::from_utf8_lossy(&body)
                )))
            }
        }
    }
}

const TERMINAL: &str = "('completed', 'failed', 'rejected', 'cancelled')";
/// The statuses of the store's partial index `workflow_instances_active` (migration 0009), as
/// literals so the planner can use it.
const ACTIVE: &str = "('running', 'waiting')";

/// How often the driver looks for the end of the run. The run's end is the last instance's
/// `updated_at`, not when a poll sees it, so a slower poll changes no figure but the CPU spent
/// watching.
const PROGRESS_POLL: Duration = Duration::from_secs(1);

/// How many of the partner's instances are in flight: read by the index of the instances in
/// flight, so a poll costs the backlog, not the run (counting the terminal ones read every
/// instance of the run: 64 ms of PostgreSQL a poll at 20,000, ~6 % of what the run reported).
async fn active_count(store: &Store, partner: &str) -> Result<usize, BenchError> {
    let sql = format!(
        "SELECT COUNT(*) AS n FROM workflow_instances WHERE partner_id = $1 AND status IN {ACTIVE}"
    );
    let n: i64 = sqlx::query(&sql)
        .bind(partner)
        .fetch_one(store.pool())
        .await
        .and_then(|row| row.try_get("n"))
        .map_err(workflow_store::StoreError::from)?;
    Ok(n.max(0) as usize)
}

async fn terminal_counts(store: &Store, partner: &str) -> Result<(usize, usize), BenchError> {
    let sql = format!(
        "SELECT COUNT(*) AS n, COALESCE(SUM(CASE WHEN status = 'completed' THEN 1 ELSE 0 END), 0) AS c \
         FROM workflow_instances \
         WHERE partner_id = $1 AND status IN {TERMINAL}"
    );
    let row = sqlx::query(&sql)
        .bind(partner)
        .fetch_one(store.pool())
        .await
        .map_err(workflow_store::StoreError::from)?;
    let n: i64 = row.try_get("n").map_err(workflow_store::StoreError::from)?;
    let c: i64 = row.try_get("c").map_err(workflow_store::StoreError::from)?;
    Ok((n.max(0) as usize, c.max(0) as usize))
}

/// Run the workload against `target` and wait for every instance to end. Latencies are read
/// afterwards with [`read_latencies`].
pub async fn drive(target: &Target, opts: &SeedOptions) -> Result<DriveOutcome, BenchError> {
    let api = Api::new(&target.base_url)?;
    let store = Store::connect(&target.database_url).await?;
    let setup = setup(&api, &target.admin_token).await?;
    let n = opts.instances;
    let large = n / 2;

    let started = Instant::now();
    let first_ms = now_ms();
    let mut tasks: JoinSet<Result<(), BenchError>> = JoinSet::new();
    let approvals = Arc::new(AtomicUsize::new(0));
    let conc = opts.approver_concurrency.max(1);
    let large_ids = match opts.agents {
        AgentMode::Inbox => {
            for (key, step) in [
                (setup.cfo.clone(), CFO_STEP),
                (setup.manager.clone(), MANAGER_STEP),
            ] {
                let (api, approvals) = (api.clone(), approvals.clone());
                tasks.spawn(async move {
                    let done = agent(api, key, step, large, conc.min(64)).await?;
                    approvals.fetch_add(done, Ordering::Relaxed);
                    Ok(())
                });
            }
            None
        }
        AgentMode::Direct => {
            let (to_cfo, for_cfo) = mpsc::unbounded_channel();
            let (to_manager, for_manager) = mpsc::unbounded_channel();
            let agents = [
                (
                    setup.cfo.clone(),
                    CFO_STEP,
                    for_cfo,
                    Some((to_manager, MANAGER_STEP)),
                ),
                (setup.manager.clone(), MANAGER_STEP, for_manager, None),
            ];
            for (key, step, ids, next) in agents {
                let (api, approvals) = (api.clone(), approvals.clone());
                tasks.spawn(async move {
                    let done = agent_direct(api, key, step, ids, next, conc).await?;
                    approvals.fetch_add(done, Ordering::Relaxed);
                    Ok(())
                });
            }
            Some(to_cfo)
        }
    };
    let partner_id = setup.partner_id.clone();
    {
        let (api, opts) = (api.clone(), opts.clone());
        tasks.spawn(async move { create_all(&api, &setup, &opts, started, large_ids).await });
    }

    // Wait until every instance is terminal; a failing driver task ends the run early.
    let deadline = started + opts.timeout;
    let (terminal, completed) = loop {
        if let Some(done) = tasks.try_join_next() {
            done.map_err(|e| BenchError::Http(format!("a driver task failed: {e}")))??;
        }
        // Only when nothing is in flight can every instance be terminal (or none started yet).
        if active_count(&store, &partner_id).await? == 0 {
            let (terminal, completed) = terminal_counts(&store, &partner_id).await?;
            if terminal >= n {
                break (terminal, completed);
            }
        }
        if Instant::now() > deadline {
            tasks.abort_all();
            let (terminal, _) = terminal_counts(&store, &partner_id).await?;
            return Err(BenchError::Unfinished {
                terminal,
                expected: n,
                waited: started.elapsed(),
            });
        }
        tokio::time::sleep(PROGRESS_POLL).await;
    };
    join_all(tasks).await?;
    let last = sqlx::query(&format!(
        "SELECT COALESCE(MAX(updated_at), 0) AS last FROM workflow_instances \
         WHERE partner_id = $1 AND status IN {TERMINAL}"
    ))
    .bind(&partner_id)
    .fetch_one(store.pool())
    .await
    .and_then(|r| r.try_get::<i64, _>("last"))
    .map_err(workflow_store::StoreError::from)?;
    store.close().await;
    Ok(DriveOutcome {
        partner_id,
        instances: n,
        completed,
        terminal,
        elapsed_s: ((last - first_ms).max(1) as f64) / 1000.0,
        http_requests: api.requests.load(Ordering::Relaxed),
        approvals: approvals.load(Ordering::Relaxed),
    })
}

/// Step and end-to-end latencies of a partner's instances, from the store.
pub async fn read_latencies(
    database_url: &str,
    partner_id: &str,
) -> Result<(Vec<i64>, Vec<i64>), BenchError> {
    let store = Store::connect(database_url).await?;
    let db = |e: sqlx::Error| BenchError::Store(e.into());
    let rows = sqlx::query(&format!(
        "SELECT created_at, updated_at FROM workflow_instances \
         WHERE partner_id = $1 AND status IN {TERMINAL}"
    ))
    .bind(partner_id)
    .fetch_all(store.pool())
    .await
    .map_err(db)?;
    let mut e2e = Vec::with_capacity(rows.len());
    for r in &rows {
        let created: i64 = r.try_get("created_at").map_err(db)?;
        let updated: i64 = r.try_get("updated_at").map_err(db)?;
        e2e.push(updated - created);
    }
    let events = store.list_partner_audit(partner_id).await?;
    let mut steps: HashMap<(String, u64), StepTimes> = HashMap::new();
    for event in events {
        let kind = event.kind.as_str();
        if !matches!(
            kind,
            "step.dispatched" | "step.started" | "action.succeeded" | "action.failed"
        ) {
            continue;
        }
        let (stream, at, after) = (event.stream, event.at.0, event.after);
        let Some(index) = after.get("index").and_then(Value::as_u64) else {
            continue;
        };
        let times = steps.entry((stream, index)).or_default();
        match kind {
            "step.dispatched" => times.dispatched = Some(at),
            "step.started" if after.get("inline") == Some(&Value::Bool(true)) => {
                times.inline = true;
            }
            "step.started" => times.started = Some(at),
            _ => times.outcome = times.outcome.or(Some(at)),
        }
    }
    let steps = steps.values().filter_map(StepTimes::latency).collect();
    store.close().await;
    Ok((steps, e2e))
}

/// When a step's command was emitted and when its pool recorded it, from the audit trail.
#[derive(Debug, Default)]
struct StepTimes {
    dispatched: Option<i64>,
    /// Started by its pool (`step.started` without the inline marker).
    started: Option<i64>,
    /// Started inline, in the transition that dispatched it.
    inline: bool,
    /// An action's outcome (`action.succeeded` / `action.failed`), the first recorded.
    outcome: Option<i64>,
}

impl StepTimes {
    /// From the command's emission to the step's record by its pool: its start, or for an
    /// action started inline (whose command only asks for the call) the call's outcome. A
    /// step run wholly inline had no command in flight: no sample.
    fn latency(&self) -> Option<i64> {
        let recorded = if self.inline {
            self.outcome?
        } else {
            self.started?
        };
        Some(recorded - self.dispatched?)
    }
}

/// Turn what was driven and measured into the report.
pub fn report(
    runtime: &str,
    outcome: &DriveOutcome,
    steps: Vec<i64>,
    e2e: Vec<i64>,
    cpu_s: f64,
    driver_cpu_s: Option<f64>,
) -> SeedReport {
    let step_samples = steps.len();
    let done = outcome.terminal.max(1) as f64;
    SeedReport {
        runtime: runtime.to_string(),
        instances: outcome.instances,
        completed: outcome.completed,
        elapsed_s: outcome.elapsed_s,
        instances_per_s: outcome.terminal as f64 / outcome.elapsed_s.max(0.001),
        step_latency_ms: Percentiles::of(steps),
        step_samples,
        e2e_latency_ms: Percentiles::of(e2e),
        cpu_s,
        cpu_s_per_1000: cpu_s * 1000.0 / done,
        driver_cpu_s,
        services_cpu: None,
        others: None,
        http_requests: outcome.http_requests,
    }
}

/// The seed workload against an engine already running as separate processes: `pids` are the
/// engine's processes (API, pools, scheduler...), whose CPU time during the run is summed
/// (with their waited-for children's).
pub async fn run_distributed(
    target: &Target,
    pids: &[u32],
    opts: &SeedOptions,
) -> Result<SeedReport, BenchError> {
    let machine_before = super::cpu::machine();
    let own_before = super::cpu::this_process()?;
    let before = super::cpu::processes_total_s(pids)?;
    let services_before = super::cpu::local_services();
    let outcome = drive(target, opts).await?;
    let after = super::cpu::processes_total_s(pids)?;
    let services_after = super::cpu::local_services();
    let own_after = super::cpu::this_process()?;
    let machine_after = super::cpu::machine();
    let (steps, e2e) = read_latencies(&target.database_url, &outcome.partner_id).await?;
    check(&outcome)?;
    let mut report = report(
        "distributed",
        &outcome,
        steps,
        e2e,
        (after - before).max(0.0),
        None,
    );
    report.services_cpu = services_before
        .zip(services_after)
        .map(|(before, after)| after.since(&before));
    // Measured: the engine's processes, the services, and this process (driver and sandbox).
    let measured = report.cpu_s
        + report.services_cpu.map_or(0.0, |s| s.total_s())
        + (own_after.own_s - own_before.own_s).max(0.0);
    report.others = super::cpu::others(machine_before, machine_after, measured);
    Ok(report)
}

/// Every instance must have completed, and every large one been approved twice.
pub fn check(outcome: &DriveOutcome) -> Result<(), BenchError> {
    if outcome.completed != outcome.instances {
        return Err(BenchError::Wrong(format!(
            "{} of {} instances completed ({} terminal)",
            outcome.completed, outcome.instances, outcome.terminal
        )));
    }
    let expected = 2 * (outcome.instances / 2);
    if outcome.approvals != expected {
        return Err(BenchError::Wrong(format!(
            "{} approvals were made, {expected} expected",
            outcome.approvals
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_brief_reads_the_id_the_wait_and_the_error_code_of_an_answer() {
        let view = br#"{"id":"i1","status":"waiting","steps":[{"index":0,"output":{"x":[1,2]}}],
            "waiting_on":{"step_index":1,"kind":"approval","description":"cfo","detail":{}}}"#;
        let brief: Brief = decode(view);
        assert_eq!(brief.id.as_deref(), Some("i1"));
        assert!(brief.waits_for_approval(1));
        assert!(!brief.waits_for_approval(2));
        let signal: Brief = decode(br#"{"id":"i1","waiting_on":{"step_index":1,"kind":"signal"}}"#);
        assert!(!signal.waits_for_approval(1));
        let refused: Brief = decode(br#"{"error":{"code":"step_not_waiting","message":"m"}}"#);
        assert_eq!(
            refused.error.map(|e| e.code).as_deref(),
            Some("step_not_waiting")
        );
        // Not JSON (a 202's empty body, say): nothing known.
        let empty: Brief = decode(b"");
        assert!(empty.id.is_none() && !empty.waits_for_approval(1));
    }

    #[test]
    fn a_step_sample_runs_from_its_command_to_its_pools_record() {
        let times = |dispatched, started, inline, outcome| StepTimes {
            dispatched,
            started,
            inline,
            outcome,
        };
        // Started by its pool.
        assert_eq!(times(Some(10), Some(13), false, None).latency(), Some(3));
        // An action started inline: its command is answered by the call's outcome.
        assert_eq!(times(Some(10), None, true, Some(17)).latency(), Some(7));
        // Run wholly inline (no command travelled), or not recorded yet: no sample.
        assert_eq!(times(Some(10), None, true, None).latency(), None);
        assert_eq!(times(Some(10), None, false, Some(17)).latency(), None);
        assert_eq!(times(None, Some(13), false, None).latency(), None);
    }

    #[test]
    fn half_the_triggers_need_approval() {
        let small = (0..1000)
            .filter(|i| {
                seed_trigger("r", *i)
                    .get("amount")
                    .and_then(Value::as_u64)
                    .is_some_and(|a| a <= 1000)
            })
            .count();
        assert_eq!(small, 500);
    }

    #[test]
    fn the_embedded_template_parses() {
        let doc: Value = serde_json::from_str(SEED_TEMPLATE).unwrap_or(Value::Null);
        let parsed = workflow_core::validate::parse_template(
            &doc,
            &workflow_core::validate::Limits::default(),
        );
        assert!(parsed.is_ok(), "{parsed:?}");
    }

    #[test]
    fn the_summary_has_the_required_fields() {
        let outcome = DriveOutcome {
            partner_id: "p".into(),
            instances: 4,
            completed: 4,
            terminal: 4,
            elapsed_s: 2.0,
            http_requests: 10,
            approvals: 4,
        };
        let r = report(
            "embedded",
            &outcome,
            vec![1, 2, 3],
            vec![10, 20],
            1.0,
            Some(0.5),
        );
        let line = r.to_json().to_string();
        assert!(!line.contains('\n'));
        let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        assert_eq!(v["workload"], "seed");
        assert_eq!(v["runtime"], "embedded");
        assert_eq!(v["instances"], 4);
        assert!((v["instances_per_s"].as_f64().unwrap_or(0.0) - 2.0).abs() < 1e-9);
        for field in ["step_latency_ms", "e2e_latency_ms"] {
            for p in ["p50", "p99", "max"] {
                assert!(v[field][p].is_i64(), "{field}.{p} in {v}");
            }
        }
        assert_eq!(v["step_latency_ms"]["max"], 3);
        assert_eq!(v["e2e_latency_ms"]["p50"], 10);
        assert!((v["cpu_s_per_1000"].as_f64().unwrap_or(0.0) - 250.0).abs() < 1e-9);
        assert!(v["services_cpu_s_per_1000"].is_null(), "{v}");
        assert!(check(&outcome).is_ok());

        for field in ["postgres_cpu_s_per_1000", "kafka_cpu_s_per_1000"] {
            assert!(v[field].is_null(), "{field} in {v}");
        }

        let mut with_services = r;
        with_services.services_cpu = Some(super::super::cpu::ServicesCpu {
            postgres_s: 1.5,
            kafka_s: 0.5,
        });
        let v = with_services.to_json();
        for (field, expected) in [
            ("services_cpu_s_per_1000", 500.0),
            ("postgres_cpu_s_per_1000", 375.0),
            ("kafka_cpu_s_per_1000", 125.0),
        ] {
            assert!(
                (v[field].as_f64().unwrap_or(0.0) - expected).abs() < 1e-9,
                "{field} in {v}"
            );
        }
        assert!(with_services
            .lines()
            .iter()
            .any(|l| l.contains("PostgreSQL and Kafka") && l.contains("500.00 s per 1,000")));
        assert!(v["others_cpu_s"].is_null(), "{v}");

        let mut with_others = with_services;
        with_others.others = Some(super::super::cpu::Others {
            cpu_s: 1.25,
            window_s: 2.5,
        });
        assert_eq!(with_others.to_json()["others_cpu_s"], 1.25);
        assert_eq!(with_others.to_json()["others_cores"], 0.5);
        assert!(with_others
            .lines()
            .iter()
            .any(|l| l.contains("the rest of the machine: 1.25 s") && l.contains("0.50 cores")));
    }
}
