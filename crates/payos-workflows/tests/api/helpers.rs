//! `spawn_app`: the whole embedded engine on a fresh database, serving HTTP on port 0.

use std::sync::Arc;
use std::time::{Duration, Instant};

use payos_workflows::embedded::{Embedded, EmbeddedConfig};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use step_workers::ActionExecutor;
use workflow_egress::payos_sandbox::{self, SandboxState};
use workflow_egress::{EgressClient, EgressPolicy, PayosClient, PayosConfig, Timeouts};
use workflow_engine::{Clock, SystemClock};
use workflow_store::Store;

use crate::cluster::Cluster;

pub const ADMIN: &str = "test-admin-token";
pub const PROCUREMENT: &str = payos_workflows::demo::PROCUREMENT_TEMPLATE;

#[derive(Debug, Clone, Copy)]
pub enum Backend {
    /// The embedded runtime on SQLite.
    Sqlite,
    /// The embedded runtime on PostgreSQL.
    Postgres,
    /// The distributed runtime: api, pools and scheduler as OS processes on PostgreSQL and
    /// Kafka (see cluster.rs).
    Distributed,
    /// The embedded runtime on SQLite, every step through its pool's command (no step
    /// executed inline: `Engine::with_inline_steps`).
    SqliteStepwise,
    /// The distributed runtime, every step through its pool's command.
    DistributedStepwise,
}

impl Backend {
    /// The step types the runtime executes inline.
    pub fn inline_steps(self) -> Vec<workflow_core::StepType> {
        match self {
            Backend::SqliteStepwise | Backend::DistributedStepwise => Vec::new(),
            _ => workflow_engine::DEFAULT_INLINE_STEPS.to_vec(),
        }
    }

    /// What the distributed runtime's processes need in their environment for this backend.
    pub fn process_env(self) -> Vec<(&'static str, String)> {
        match self {
            Backend::DistributedStepwise => vec![("WORKFLOWS_INLINE_STEPS", "none".to_string())],
            _ => Vec::new(),
        }
    }
}

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub store: Store,
    /// The PayOS sandbox the action pool calls: counts executions per transfer.
    pub sandbox: SandboxState,
    runtime: Option<Embedded>,
    /// The processes, when the app is the distributed runtime.
    pub cluster: Option<Cluster>,
    /// How long `wait_for` waits for an instance to reach a state.
    pub patience: Duration,
    _dir: tempfile::TempDir,
}

/// One partner's actors: rita (requester), carol (cfo), frank (finance_manager), bot (an agent
/// with the finance_manager role).
pub struct Partner {
    pub requester: String,
    pub cfo: String,
    pub manager: String,
    pub agent: String,
}

pub async fn spawn_app(backend: Backend) -> TestApp {
    match backend {
        Backend::Distributed | Backend::DistributedStepwise => {
            TestApp::distributed_with_env(&backend.process_env()).await
        }
        Backend::Sqlite | Backend::Postgres | Backend::SqliteStepwise => {
            spawn_app_with_clock(backend, Arc::new(SystemClock)).await
        }
    }
}

/// The app on a clock the test controls (timers, deadlines).
pub async fn spawn_app_with_clock(backend: Backend, clock: Arc<dyn Clock>) -> TestApp {
    spawn_app_with_notifier(backend, clock, None).await
}

/// The app on a clock the test controls, with a notifier for the notification delivery pool
/// (without one, deliveries stay queued).
pub async fn spawn_app_with_notifier(
    backend: Backend,
    clock: Arc<dyn Clock>,
    notifier: Option<Arc<step_workers::Notifier>>,
) -> TestApp {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let url = match backend {
        Backend::Distributed | Backend::DistributedStepwise => {
            panic!("the distributed runtime's processes run on the system clock")
        }
        Backend::Sqlite | Backend::SqliteStepwise => {
            format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display())
        }
        Backend::Postgres => workflow_testkit::postgres_url()
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL for tests: {e}")),
    };
    let store = Store::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    store
        .migrate()
        .await
        .unwrap_or_else(|e| panic!("migrate: {e}"));
    // A real PayOS sandbox over HTTP on its own port: the action pool's target.
    let sandbox = SandboxState::in_memory();
    let sandbox_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind sandbox: {e}"));
    let sandbox_addr = sandbox_listener
        .local_addr()
        .unwrap_or_else(|e| panic!("addr: {e}"));
    let sandbox_router = payos_sandbox::router(sandbox.clone());
    tokio::spawn(async move { axum::serve(sandbox_listener, sandbox_router).await });
    let payos = PayosClient::new(&PayosConfig {
        base_url: format!("http://{sandbox_addr}"),
        api_key: "test".into(),
        timeouts: Timeouts::default(),
    })
    .unwrap_or_else(|e| panic!("payos client: {e}"));
    let policy =
        EgressPolicy::strict().allow_net("127.0.0.1/32".parse().unwrap_or_else(|e| panic!("{e}")));
    let http = EgressClient::new(policy, Timeouts::default()).unwrap_or_else(|e| panic!("{e}"));
    let mut executor = ActionExecutor::new(payos, http);
    // Fast retries keep the suite quick; the schedule's shape is what is tested.
    executor.base_delay = Duration::from_millis(10);
    executor.max_delay = Duration::from_millis(100);
    let mut api = producer_api::ApiConfig::new(ADMIN.into());
    // The tests' own receivers live on loopback: allow-listed explicitly, as in production.
    api.egress =
        EgressPolicy::strict().allow_net("127.0.0.1/32".parse().unwrap_or_else(|e| panic!("{e}")));
    let config = EmbeddedConfig {
        api,
        limits: workflow_core::validate::Limits::default(),
        partitions: 4,
        clock,
        actions: Some(Arc::new(executor)),
        inline_steps: backend.inline_steps(),
    };
    let runtime = Embedded::start_with_notifier(store.clone(), config, notifier)
        .await
        .unwrap_or_else(|e| panic!("start: {e}"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("addr: {e}"));
    let (router, token) = (runtime.router.clone(), runtime.cancel_token());
    tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(token.cancelled_owned())
            .await
    });
    TestApp {
        base: format!("http://{addr}"),
        client: reqwest::Client::new(),
        store,
        sandbox,
        runtime: Some(runtime),
        cluster: None,
        patience: Duration::from_secs(15),
        _dir: dir,
    }
}

impl TestApp {
    /// The distributed runtime's processes, and a client of its API.
    pub async fn distributed() -> TestApp {
        TestApp::distributed_with_env(&[]).await
    }

    /// [`TestApp::distributed`], with more environment variables for every process.
    pub async fn distributed_with_env(env: &[(&str, String)]) -> TestApp {
        let cluster = Cluster::start_with_env(env).await;
        TestApp {
            base: cluster.base.clone(),
            client: reqwest::Client::new(),
            store: cluster.store.clone(),
            sandbox: cluster.sandbox.clone(),
            runtime: None,
            cluster: Some(cluster),
            // Consumer groups form when the processes start: the first steps take longer.
            patience: Duration::from_secs(60),
            _dir: tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}")),
        }
    }

    /// Stop the whole engine (API, pools, scheduler, relay) and wait for its tasks to end.
    pub async fn stop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown(Duration::from_secs(10)).await;
        }
    }

    /// The embedded runtime's in-process bus (to publish other services' events, or read the
    /// engine's topics).
    pub fn bus(&self) -> Arc<workflow_bus::InProcessBus> {
        match &self.runtime {
            Some(runtime) => runtime.bus.clone(),
            None => panic!("no in-process bus: the app is stopped, or distributed"),
        }
    }

    /// Send a request; returns status and JSON body (Null when empty or not JSON).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .client
            .request(method, format!("{}{}", self.base, path));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap_or_else(|e| panic!("{path}: {e}"));
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Send raw bytes as the body.
    pub async fn call_raw(
        &self,
        method: Method,
        path: &str,
        key: &str,
        body: Vec<u8>,
    ) -> (StatusCode, Value) {
        let resp = self
            .client
            .request(method, format!("{}{}", self.base, path))
            .bearer_auth(key)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str, key: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, Some(key), None).await
    }

    pub async fn post(&self, path: &str, key: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(key), Some(body)).await
    }

    /// A partner with four actors, created through the admin API.
    pub async fn partner(&self, id: &str) -> Partner {
        let (s, b) = self
            .call(
                Method::POST,
                "/v1/admin/partners",
                Some(ADMIN),
                Some(json!({"id": id, "name": id})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        Partner {
            requester: self.key(id, "rita", "human", &["requester"]).await,
            cfo: self.key(id, "carol", "human", &["cfo"]).await,
            manager: self.key(id, "frank", "human", &["finance_manager"]).await,
            agent: self.key(id, "bot", "agent", &["finance_manager"]).await,
        }
    }

    /// Issue a key for a new actor of `partner`.
    pub async fn key(&self, partner: &str, actor: &str, kind: &str, roles: &[&str]) -> String {
        let body =
            json!({"partner_id": partner, "actor": {"id": actor, "type": kind, "roles": roles}});
        let (s, b) = self
            .call(Method::POST, "/v1/admin/api-keys", Some(ADMIN), Some(body))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        b["key"].as_str().unwrap_or_default().to_string()
    }

    pub async fn create_template(&self, key: &str, doc: &str) -> Value {
        let (s, b) = self
            .call_raw(
                Method::POST,
                "/v1/workflows/templates",
                key,
                doc.as_bytes().to_vec(),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        b
    }

    pub async fn start(&self, key: &str, template_id: &str, trigger: Value) -> Value {
        let (s, b) = self
            .post(
                "/v1/workflows/instances",
                key,
                json!({"template_id": template_id, "trigger": trigger}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        b
    }

    /// Poll the instance until `done` holds; fail after a deadline.
    pub async fn wait_for(
        &self,
        key: &str,
        id: &str,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + self.patience;
        loop {
            let (s, b) = self
                .get(&format!("/v1/workflows/instances/{id}"), key)
                .await;
            assert_eq!(s, StatusCode::OK, "{b}");
            if done(&b) {
                return b;
            }
            assert!(
                Instant::now() < deadline,
                "instance {id} never reached: {what}; last: {b:#}\n{}",
                self.cluster
                    .as_ref()
                    .map(Cluster::tails)
                    .unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The error shape every failure must have.
pub fn assert_error(body: &Value, code: &str) {
    assert_eq!(body["error"]["code"], code, "{body:#}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body:#}"
    );
    assert!(body["error"]["details"].is_array(), "{body:#}");
    assert!(
        body["request_id"].as_str().is_some_and(|r| !r.is_empty()),
        "{body:#}"
    );
}

/// The paths of an error's details.
pub fn paths(body: &Value) -> Vec<String> {
    body["error"]["details"]
        .as_array()
        .map(|d| {
            d.iter()
                .filter_map(|x| x["path"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Run each listed scenario against SQLite and against PostgreSQL.
#[macro_export]
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::Backend::Postgres).await
                }
            )*
        }
    };
}

/// Also run scenarios with every step through its pool's command, as the runtimes do with
/// `inline_steps` empty: embedded on SQLite, and distributed.
#[macro_export]
macro_rules! stepwise {
    (embedded: [$($e:ident),* $(,)?], distributed: [$($d:ident),* $(,)?] $(,)?) => {
        mod sqlite_stepwise {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $e() {
                    super::$e($crate::helpers::Backend::SqliteStepwise).await
                }
            )*
        }
        mod distributed_stepwise {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $d() {
                    super::$d($crate::helpers::Backend::DistributedStepwise).await
                }
            )*
        }
    };
}

/// Also run scenarios against the distributed runtime (api, pools and scheduler as OS
/// processes on PostgreSQL and Kafka). Scenarios that move a manual clock or reach into the
/// in-process bus stay embedded-only.
#[macro_export]
macro_rules! on_distributed {
    ($($name:ident),* $(,)?) => {
        mod distributed {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::Backend::Distributed).await
                }
            )*
        }
    };
}
