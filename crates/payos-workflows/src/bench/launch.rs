//! `bench --runtime distributed` without `--url`: deploy the distributed runtime for the run.
//! The api, one worker per pool of the seed workload and the scheduler are started as separate
//! processes of this same binary on `DATABASE_URL` and `KAFKA_BOOTSTRAP_SERVERS` (topics and
//! consumer groups under a prefix unique to the run), with a PayOS sandbox served by the bench
//! itself; they are stopped with SIGTERM afterwards.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use super::BenchError;

/// The processes the seed workload needs.
const PROCESSES: [&[&str]; 6] = [
    &["api"],
    &["worker", "--pool", "condition"],
    &["worker", "--pool", "approval"],
    &["worker", "--pool", "action"],
    &["worker", "--pool", "wait"],
    &["scheduler"],
];

/// The consumer groups of the pools above; each of their processes runs
/// `WORKFLOWS_POOL_MEMBERS` members.
const POOL_GROUPS: [&str; 5] = [
    "pool-condition",
    "pool-approval",
    "pool-approval-decisions",
    "pool-action",
    "pool-wait",
];

/// How long the processes may take to answer and their consumer groups to settle.
const SETTLE_DEADLINE: Duration = Duration::from_secs(90);

/// A running deployment.
pub struct Deployment {
    pub base_url: String,
    pub admin_token: String,
    children: Vec<Child>,
    bootstrap: String,
    /// The run's topics and consumer groups start with it.
    prefix: String,
}

impl Deployment {
    /// Start every process and wait until the API answers.
    pub async fn start(database_url: &str, bootstrap: &str) -> Result<Deployment, BenchError> {
        let exe = std::env::current_exe()?;
        let sandbox = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let sandbox_addr = sandbox.local_addr()?;
        let router = workflow_egress::payos_sandbox::router(
            workflow_egress::payos_sandbox::SandboxState::in_memory(),
        );
        tokio::spawn(async move { axum::serve(sandbox, router).await });
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let run = uuid::Uuid::now_v7().simple().to_string();
        let prefix = format!("bench-{run}.");
        let members = std::env::var("WORKFLOWS_POOL_MEMBERS")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(crate::config::DEFAULT_POOL_MEMBERS)
            .max(1);
        let admin_token = format!("adm_{run}");
        let mut children = Vec::new();
        for args in PROCESSES {
            let child = Command::new(&exe)
                .args(args)
                .env("DATABASE_URL", database_url)
                .env("KAFKA_BOOTSTRAP_SERVERS", bootstrap)
                .env("WORKFLOWS_TOPIC_PREFIX", &prefix)
                .env("WORKFLOWS_POOL_MEMBERS", members.to_string())
                .env("WORKFLOWS_ADMIN_TOKEN", &admin_token)
                .env("WORKFLOWS_LISTEN", format!("127.0.0.1:{port}"))
                .env("PAYOS_API_URL", format!("http://{sandbox_addr}"))
                .env("PAYOS_API_KEY", "bench")
                .env("WORKFLOWS_EGRESS_ALLOW", "127.0.0.1/32")
                .env("RUST_LOG", "warn")
                .envs(crate::allocator::allocator_env())
                .stdout(Stdio::null())
                .kill_on_drop(true)
                .spawn()?;
            children.push(child);
        }
        let deployment = Deployment {
            base_url: format!("http://127.0.0.1:{port}"),
            admin_token,
            children,
            bootstrap: bootstrap.to_string(),
            prefix: prefix.clone(),
        };
        deployment.wait_for_api().await?;
        wait_for_groups(bootstrap, &prefix, members).await?;
        Ok(deployment)
    }

    /// The processes' pids, for CPU accounting.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().filter_map(Child::id).collect()
    }

    async fn wait_for_api(&self) -> Result<(), BenchError> {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let up = client
                .get(format!("{}/openapi.json", self.base_url))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if up {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(BenchError::Wrong(
                    "the distributed api did not answer within 60 s".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM every process and wait for it (killing what is still up after 20 s), then
    /// delete the run's topics and consumer groups: every partition a broker keeps costs it
    /// (checkpoints iterate them all), and after ~40 runs the test broker held 4,300
    /// partitions and paced runs showed bursts of its CPU as latency.
    pub async fn stop(mut self) {
        for child in &self.children {
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
        }
        for child in &mut self.children {
            if tokio::time::timeout(Duration::from_secs(20), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
        if let Err(e) = delete_run(&self.bootstrap, &self.prefix).await {
            tracing::warn!(error = %e, prefix = %self.prefix, "cannot delete the run's topics and groups");
        }
    }
}

/// Delete the topics and consumer groups whose names start with `prefix`.
async fn delete_run(bootstrap: &str, prefix: &str) -> Result<(), workflow_bus::BusError> {
    let bus = workflow_bus_kafka::KafkaBus::new(workflow_bus_kafka::KafkaConfig::new(bootstrap))?;
    let deleted = bus.delete_prefixed(prefix).await;
    bus.shutdown();
    deleted
}

/// Wait until every pool's consumer group is `Stable` with all its members. Members join one
/// after another and each join is a rebalance, during which the group's partitions are held
/// back: a run started before that settled measured up to 1.5 s of it as step latency.
async fn wait_for_groups(bootstrap: &str, prefix: &str, members: usize) -> Result<(), BenchError> {
    let bus = workflow_bus_kafka::KafkaBus::new(workflow_bus_kafka::KafkaConfig::new(bootstrap))
        .map_err(|e| BenchError::Wrong(format!("cannot reach Kafka: {e}")))?;
    let groups: Vec<String> = POOL_GROUPS
        .iter()
        .map(|name| format!("{prefix}{name}"))
        .collect();
    let settled = bus
        .wait_until_settled(&groups, members, SETTLE_DEADLINE)
        .await
        .map_err(|e| BenchError::Wrong(format!("the pools' consumer groups: {e}")));
    bus.shutdown();
    settled
}
