//! The distributed runtime as OS processes: `api`, one `worker` per pool and the `scheduler`,
//! each a real `payos-workflows` process on a fresh PostgreSQL database and a real Kafka
//! broker (topics and consumer groups under a prefix unique to the test), with the PayOS
//! sandbox served by the test over HTTP.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};
use workflow_egress::payos_sandbox::{self, SandboxState};
use workflow_store::Store;

use crate::helpers::ADMIN;

/// At most this many clusters run at once in the suite: each is eight processes.
static SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// Every process of a full deployment.
pub const ALL: [&str; 8] = [
    "api",
    "approval",
    "condition",
    "action",
    "wait",
    "notification",
    "transfers",
    "scheduler",
];

/// The consumer groups [`ALL`]'s processes form (under the cluster's prefix).
const GROUPS: [&str; 8] = [
    "pool-approval",
    "pool-approval-decisions",
    "pool-condition",
    "pool-action",
    "pool-wait",
    "pool-notification",
    "pool-notification-deliveries",
    "workflow-triggers",
];

pub struct Cluster {
    /// The API's base URL.
    pub base: String,
    pub store: Store,
    pub sandbox: SandboxState,
    pub database_url: String,
    pub bootstrap: String,
    pub prefix: String,
    port: u16,
    sandbox_url: String,
    logs: tempfile::TempDir,
    procs: BTreeMap<String, Child>,
    client: reqwest::Client,
    extra: Vec<(String, String)>,
    _slot: tokio::sync::SemaphorePermit<'static>,
}

impl Drop for Cluster {
    /// The processes go, then the test's topics: a broker slows down with every partition it
    /// keeps, and each test makes its own. (Its consumer groups stay: killed members keep a
    /// group non-empty until the broker times them out, and a group costs little.)
    fn drop(&mut self) {
        for child in self.procs.values_mut() {
            let _ = child.start_kill();
        }
        let mut procs = std::mem::take(&mut self.procs);
        let (bootstrap, prefix) = (self.bootstrap.clone(), self.prefix.clone());
        // Drop cannot await: a thread with a runtime of its own.
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                for child in procs.values_mut() {
                    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                }
                let config = workflow_bus_kafka::KafkaConfig::new(&bootstrap);
                let Ok(bus) = workflow_bus_kafka::KafkaBus::new(config) else {
                    return;
                };
                // A topic a process asked for just before it was killed may appear a moment
                // later: look again until two looks in a row find none.
                let mut clean_looks = 0;
                for _ in 0..10 {
                    let left = match bus.existing_topics().await {
                        Ok(topics) => topics.keys().filter(|t| t.starts_with(&prefix)).count(),
                        Err(_) => break,
                    };
                    if left == 0 {
                        clean_looks += 1;
                        if clean_looks == 2 {
                            break;
                        }
                    } else if let Err(e) = bus.delete_topics_prefixed(&prefix).await {
                        eprintln!("cleaning up {prefix}*: {e}");
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                bus.shutdown();
            });
        });
        let _ = cleanup.join();
    }
}

impl Cluster {
    /// Start every process of [`ALL`], with `extra` environment variables, and wait until the
    /// API answers.
    pub async fn start_with_env(extra: &[(&str, String)]) -> Cluster {
        let slot = SLOTS
            .acquire()
            .await
            .unwrap_or_else(|e| panic!("cluster slots: {e}"));
        let database_url = workflow_testkit::postgres_url()
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL for tests: {e}"));
        let bootstrap = workflow_testkit::kafka_bootstrap()
            .await
            .unwrap_or_else(|e| panic!("Kafka for tests: {e}"));
        // Migrated once here, so the processes' own migrations find nothing to do.
        let store = Store::connect(&database_url)
            .await
            .unwrap_or_else(|e| panic!("connect: {e}"));
        store
            .migrate()
            .await
            .unwrap_or_else(|e| panic!("migrate: {e}"));

        let sandbox = SandboxState::in_memory();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind sandbox: {e}"));
        let sandbox_addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("addr: {e}"));
        let router = payos_sandbox::router(sandbox.clone());
        tokio::spawn(async move { axum::serve(listener, router).await });

        let port = free_port();
        let prefix = format!("t{}.", uuid::Uuid::now_v7().simple());
        let mut cluster = Cluster {
            base: format!("http://127.0.0.1:{port}"),
            store,
            sandbox,
            database_url,
            bootstrap,
            prefix,
            port,
            sandbox_url: format!("http://{sandbox_addr}"),
            logs: tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}")),
            procs: BTreeMap::new(),
            client: reqwest::Client::new(),
            extra: extra
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            _slot: slot,
        };
        for name in ALL {
            cluster.spawn(name);
        }
        cluster.wait_for_api().await;
        cluster.wait_for_groups().await;
        cluster
    }

    fn command(&self, name: &str) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_payos-workflows"));
        match name {
            "api" => {
                cmd.arg(name);
            }
            // "scheduler", "scheduler-2"...: several schedulers may run.
            scheduler if scheduler.starts_with("scheduler") => {
                cmd.arg("scheduler");
            }
            pool => {
                cmd.args(["worker", "--pool", pool]);
            }
        }
        cmd.env("DATABASE_URL", &self.database_url)
            .env("KAFKA_BOOTSTRAP_SERVERS", &self.bootstrap)
            .env("WORKFLOWS_TOPIC_PREFIX", &self.prefix)
            .env("WORKFLOWS_ADMIN_TOKEN", ADMIN)
            .env("WORKFLOWS_LISTEN", format!("127.0.0.1:{}", self.port))
            .env("WORKFLOWS_TOPIC_PARTITIONS", "4")
            .env("WORKFLOWS_DB_MAX_CONNECTIONS", "4")
            // A decision call waits this long for its outcome before answering 202. With two
            // clusters of eight processes on the suite's two cores, a pool's consumer group can
            // still be rebalancing when a test decides, and once that took over the default 10 s
            // (a bulk item answered 202 in CI). The tests assert the decisions' outcomes.
            .env("WORKFLOWS_DECISION_WAIT_MS", "30000")
            .env("PAYOS_API_URL", &self.sandbox_url)
            .env("PAYOS_API_KEY", "test")
            .env("WORKFLOWS_EGRESS_ALLOW", "127.0.0.1/32")
            .env("RUST_LOG", "info,librdkafka=warn")
            .envs(self.extra.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .kill_on_drop(true);
        cmd
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.logs.path().join(format!("{name}.log"))
    }

    /// Start (or restart) process `name`, appending its output to its log.
    pub fn spawn(&mut self, name: &str) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(name))
            .unwrap_or_else(|e| panic!("log of {name}: {e}"));
        let err = log
            .try_clone()
            .unwrap_or_else(|e| panic!("log of {name}: {e}"));
        let child = self
            .command(name)
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        self.procs.insert(name.to_string(), child);
    }

    /// SIGKILL process `name` and reap it: no drain, no goodbye.
    pub async fn kill(&mut self, name: &str) {
        if let Some(mut child) = self.procs.remove(name) {
            let _ = child.kill().await;
        }
    }

    /// SIGTERM process `name`; returns its exit status once it has drained and exited.
    pub async fn terminate(&mut self, name: &str, within: Duration) -> std::process::ExitStatus {
        let mut child = self
            .procs
            .remove(name)
            .unwrap_or_else(|| panic!("{name} is not running"));
        let pid = child.id().unwrap_or_else(|| panic!("{name} has no pid"));
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap_or_else(|e| panic!("kill -TERM: {e}"));
        assert!(sent.success(), "kill -TERM {pid} failed");
        match tokio::time::timeout(within, child.wait()).await {
            Ok(status) => status.unwrap_or_else(|e| panic!("wait {name}: {e}")),
            Err(_) => panic!(
                "{name} did not exit within {within:?} of SIGTERM\n{}",
                self.tail(name)
            ),
        }
    }

    /// Wait until the API process answers HTTP.
    pub async fn wait_for_api(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = self
                .client
                .get(format!("{}/openapi.json", self.base))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the api never answered\n{}",
                self.tail("api")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Wait until every consumer group of the processes is `Stable` with all its members, so
    /// no test starts while a pool still rebalances (a bulk decision once waited past the
    /// api's patience in CI while two clusters started side by side).
    pub async fn wait_for_groups(&self) {
        let members = self
            .extra
            .iter()
            .find(|(k, _)| k == "WORKFLOWS_POOL_MEMBERS")
            .and_then(|(_, v)| v.trim().parse::<usize>().ok())
            .unwrap_or(payos_workflows::config::DEFAULT_POOL_MEMBERS);
        let bus = workflow_bus_kafka::KafkaBus::new(workflow_bus_kafka::KafkaConfig::new(
            &self.bootstrap,
        ))
        .unwrap_or_else(|e| panic!("kafka: {e}"));
        let groups: Vec<String> = GROUPS
            .iter()
            .map(|name| format!("{}{name}", self.prefix))
            .collect();
        let settled = bus
            .wait_until_settled(&groups, members, Duration::from_secs(90))
            .await;
        bus.shutdown();
        if let Err(e) = settled {
            panic!("{e}\n{}", self.tails());
        }
    }

    /// The last lines of a process's log, for failure messages.
    pub fn tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.log_path(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(40);
        format!("--- {name} log ---\n{}", lines[from..].join("\n"))
    }

    /// Every process's log tail.
    pub fn tails(&self) -> String {
        ALL.iter()
            .map(|n| self.tail(n))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("free port: {e}"))
}
