//! `payos-workflows bench`'s command line: which workload, on which runtime, and the printing.

use std::time::Duration;

use workflow_store::Store;

use super::seed::{self, AgentMode, SeedOptions, Target};
use super::BenchError;

/// Run a benchmark workload and print its figures (last line: one JSON object).
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// `seed`: instance throughput of the Procurement Approval template (approvals by two
    /// agents through the API). `timers`: timer lateness of the scheduler.
    #[arg(long, default_value = "seed", value_parser = ["seed", "timers"])]
    pub workload: String,
    /// `embedded` (in this process, a SQLite file in a temporary directory) or `distributed`
    /// (processes this bench starts on DATABASE_URL and KAFKA_BOOTSTRAP_SERVERS, or an engine
    /// already running at --url).
    #[arg(long, default_value = "embedded", value_parser = ["embedded", "distributed"])]
    pub runtime: String,
    /// seed: how many instances (half at or under $1,000, half over).
    #[arg(long, default_value_t = 2000)]
    pub instances: usize,
    /// seed: create calls in flight at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// seed: approve calls in flight at once, per agent (at most 64).
    #[arg(long, default_value_t = 32)]
    pub approver_concurrency: usize,
    /// seed: start at most this many instances per second (0: as fast as the API answers).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// seed: how the agents find their approvals: `direct` (told each instance id, as a
    /// webhook-driven agent would be) or `inbox` (polling GET /v1/workflows/pending).
    #[arg(long, default_value = "direct", value_parser = ["direct", "inbox"])]
    pub agents: String,
    /// seed: skip the host probe timed before the run (about a second; `machine.probe` is then
    /// absent). For runs under a profiler, where its work would swamp the run's.
    #[arg(long)]
    pub no_probe: bool,
    /// seed: give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,
    /// seed, distributed: the engine's API.
    #[arg(long, env = "WORKFLOWS_BENCH_URL")]
    pub url: Option<String>,
    /// seed, distributed: the engine's database, where latencies are read.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// seed, distributed: the engine's admin token.
    #[arg(long, env = "WORKFLOWS_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// seed, distributed without --url: the Kafka cluster the deployed processes use.
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS")]
    pub kafka: Option<String>,
    /// seed, distributed: pids of the engine's processes, for CPU accounting (comma-separated).
    #[arg(long, env = "WORKFLOWS_BENCH_PIDS", value_delimiter = ',')]
    pub pids: Vec<u32>,
    /// timers: how many timers (one instance each).
    #[arg(long, default_value_t = 10_000)]
    pub timers: usize,
    /// timers: the window, in seconds, over which the timers fall due.
    #[arg(long, default_value_t = 60)]
    pub window_s: u64,
}

/// Run what `args` asks for and print its figures; the last line printed is the JSON summary.
pub async fn run_cli(args: BenchArgs) -> Result<(), BenchError> {
    match args.workload.as_str() {
        "timers" => timers(&args).await,
        _ => seed_cli(&args).await,
    }
}

async fn seed_cli(args: &BenchArgs) -> Result<(), BenchError> {
    // Before the run: its load average is what the rest of the machine was doing, the probe
    // how fast the host is in this hour (synchronous: nothing else runs yet).
    let mut machine = super::machine::Machine::observe();
    if !args.no_probe {
        machine.probe = Some(super::probe::Probe::run(seed::SEED_TEMPLATE, machine.cores));
    }
    let opts = SeedOptions {
        instances: args.instances,
        concurrency: args.concurrency.max(1),
        approver_concurrency: args.approver_concurrency.clamp(1, 64),
        rate: if args.rate.is_finite() {
            args.rate.max(0.0)
        } else {
            0.0
        },
        timeout: Duration::from_secs(args.timeout_s),
        agents: if args.agents == "inbox" {
            AgentMode::Inbox
        } else {
            AgentMode::Direct
        },
    };
    let report = if args.runtime == "distributed" {
        match args.url.clone() {
            Some(base_url) => {
                let (Some(database_url), Some(admin_token)) =
                    (args.database_url.clone(), args.admin_token.clone())
                else {
                    return Err(BenchError::Usage(
                        "--url benchmarks a distributed engine that is already running: also give                          its database (DATABASE_URL or --database-url), its admin token                          (WORKFLOWS_ADMIN_TOKEN or --admin-token) and, for CPU accounting, the pids                          of its processes (WORKFLOWS_BENCH_PIDS or --pids)"
                            .into(),
                    ));
                };
                if args.pids.is_empty() {
                    tracing::warn!(
                        "no pids given: the CPU figure of the distributed runtime will be 0"
                    );
                }
                let target = Target {
                    base_url,
                    admin_token,
                    database_url,
                };
                seed::run_distributed(&target, &args.pids, &opts).await?
            }
            None => {
                // Deploy the processes for the run.
                let (Some(database_url), Some(bootstrap)) =
                    (args.database_url.clone(), args.kafka.clone())
                else {
                    return Err(BenchError::Usage(
                        "--runtime distributed deploys the api, the pools and the scheduler as \
                         processes: give DATABASE_URL and KAFKA_BOOTSTRAP_SERVERS (or --url for an \
                         engine already running)"
                            .into(),
                    ));
                };
                let deployment =
                    super::launch::Deployment::start(&database_url, &bootstrap).await?;
                let target = Target {
                    base_url: deployment.base_url.clone(),
                    admin_token: deployment.admin_token.clone(),
                    database_url,
                };
                // Warm-up on its own partner (latencies are read per partner): the consumer
                // groups form and the connections open before the measured run.
                let warm_up = SeedOptions {
                    instances: 20,
                    rate: 0.0,
                    ..opts.clone()
                };
                if let Err(e) = seed::run_distributed(&target, &[], &warm_up).await {
                    deployment.stop().await;
                    return Err(e);
                }
                let report = seed::run_distributed(&target, &deployment.pids(), &opts).await;
                deployment.stop().await;
                report?
            }
        }
    } else {
        super::seed_embedded(&opts).await?
    };
    for line in report.lines() {
        println!("{line}");
    }
    println!("{}", machine.line());
    let mut summary = report.to_json();
    summary["machine"] = machine.to_json();
    println!("{summary}");
    Ok(())
}

async fn timers(args: &BenchArgs) -> Result<(), BenchError> {
    if args.runtime != "embedded" {
        return Err(BenchError::Usage(
            "the timers workload runs on the embedded runtime only; use --runtime embedded".into(),
        ));
    }
    let dir = std::env::temp_dir().join(format!("payos-bench-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir)?;
    let store = Store::connect(&format!(
        "sqlite://{}?mode=rwc",
        dir.join("bench.db").display()
    ))
    .await?;
    store.migrate().await?;
    let report = super::timers(store, args.timers, Duration::from_secs(args.window_s)).await?;
    println!(
        "timers: {}  due within {} ms  setup {:.1}s",
        report.timers, report.window_ms, report.setup_s
    );
    println!(
        "timer lateness (fire - due): p50 {} ms  p99 {} ms  max {} ms",
        report.lateness_p50_ms, report.lateness_p99_ms, report.lateness_max_ms
    );
    println!("{}", report.to_json());
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        tracing::warn!(error = %e, dir = %dir.display(), "cannot remove the bench directory");
    }
    Ok(())
}
