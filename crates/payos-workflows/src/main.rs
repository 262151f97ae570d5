//! `payos-workflows`: one binary, one subcommand per role.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use payos_workflows::config::Settings;
use payos_workflows::demo;
use payos_workflows::distributed::{self, Node, WorkerPool};
use payos_workflows::embedded::{Embedded, EmbeddedConfig};
use payos_workflows::sandbox_ledger;
use step_workers::ActionExecutor;
use workflow_core::validate::Limits;
use workflow_egress::egress_policy::Timeouts;
use workflow_egress::{EgressClient, EgressPolicy, PayosClient, PayosConfig};
use workflow_engine::{Clock, SystemClock};
use workflow_store::Store;

/// mimalloc: per-thread free lists instead of glibc's locked arenas (see Cargo.toml).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "payos-workflows", version, about = "The PayOS workflow engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Bounds on templates, shared by every subcommand that validates them.
#[derive(clap::Args, Clone)]
struct LimitArgs {
    /// Most steps a template may have.
    #[arg(long, env = "WORKFLOWS_MAX_STEPS", default_value_t = 50)]
    max_steps: usize,
    /// Largest template document, in bytes.
    #[arg(long, env = "WORKFLOWS_MAX_TEMPLATE_BYTES", default_value_t = 65536)]
    max_template_bytes: usize,
    /// Most decisions one bulk approval call may carry.
    #[arg(long, env = "WORKFLOWS_MAX_BULK_DECISIONS", default_value_t = 500)]
    max_bulk_decisions: usize,
}

impl LimitArgs {
    fn limits(&self) -> Limits {
        Limits {
            max_steps: self.max_steps,
            max_document_bytes: self.max_template_bytes,
            ..Limits::default()
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Everything in one process on a SQLite file: API, worker pools, relay. Seeds a demo partner.
    Dev {
        #[arg(long, env = "WORKFLOWS_LISTEN", default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        #[arg(long, env = "WORKFLOWS_DATA_DIR", default_value = "./.payos-workflows")]
        data_dir: PathBuf,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// The API process of the distributed runtime (Kafka + PostgreSQL).
    Api {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// One worker pool of the distributed runtime: approval, condition, action, wait,
    /// notification, or transfers (starts instances from on_transfer events).
    Worker {
        #[arg(long, value_parser = parse_pool)]
        pool: WorkerPool,
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// The timer service of the distributed runtime.
    Scheduler {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Serve a PayOS SANDBOX (not real money) for local runs of the distributed runtime: the
    /// action pool's target when PAYOS_API_URL points here.
    Sandbox {
        #[arg(long, default_value = "127.0.0.1:8099")]
        listen: SocketAddr,
        /// Where the sandbox records its calls (table `payos_sandbox_transfers`), so a replayed
        /// Idempotency-Key is answered from the record across restarts.
        #[arg(long, env = "DATABASE_URL", default_value = sandbox_ledger::DEFAULT_SANDBOX_DATABASE_URL)]
        database_url: String,
    },
    /// Create the engine's Kafka topics that are missing (or only check them), and list them.
    Topics {
        /// Only check: exit 1 if a topic is missing.
        #[arg(long)]
        check: bool,
        /// Also print each consumer group's lag: the messages it has not committed yet.
        #[arg(long)]
        lag: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Apply the database migrations and exit.
    Migrate {
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
    },
    /// Run a benchmark workload and print its figures (last line: one JSON object).
    Bench(payos_workflows::bench::BenchArgs),
    /// Verify the hash chain of an instance's audit trail.
    VerifyAudit {
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
        #[arg(long)]
        partner: String,
        #[arg(long)]
        instance: String,
    },
}

/// The distributed runtime's configuration file.
#[derive(clap::Args, Clone)]
struct ConfigArg {
    /// A TOML file (see examples/distributed.toml); environment variables override it.
    #[arg(long = "config", env = "WORKFLOWS_CONFIG")]
    path: Option<PathBuf>,
}

impl ConfigArg {
    fn settings(&self) -> anyhow::Result<Settings> {
        Ok(Settings::load(self.path.as_deref())?)
    }
}

fn parse_pool(s: &str) -> Result<WorkerPool, String> {
    WorkerPool::parse(s).ok_or_else(|| {
        format!(
            "unknown pool `{s}`; expected approval, condition, action, wait, notification or transfers"
        )
    })
}

/// How long SIGTERM waits for in-flight work.
const DRAIN: Duration = Duration::from_secs(20);

async fn api(settings: Settings, limits: &LimitArgs) -> anyhow::Result<()> {
    let admin_token = settings.admin_token.clone().context(
        "the api needs WORKFLOWS_ADMIN_TOKEN (config key api.admin_token) for /v1/admin",
    )?;
    let mut api = producer_api::ApiConfig::new(admin_token);
    api.max_bulk_decisions = settings.max_bulk_decisions;
    api.max_batch_triggers = settings.max_batch_triggers;
    api.decision_wait = settings.decision_wait;
    api.egress = EgressPolicy::from_env()?;
    let node = Node::start(settings, limits.limits()).await?;
    let serve = node.serve_api(api);
    let stop = node.cancel_token();
    tokio::spawn(async move {
        distributed::shutdown_signal().await;
        stop.cancel();
    });
    let served = serve.await;
    node.run_until_stopped(DRAIN).await;
    Ok(served?)
}

async fn worker(settings: Settings, pool: WorkerPool, limits: &LimitArgs) -> anyhow::Result<()> {
    let mut node = Node::start(settings, limits.limits()).await?;
    node.start_pool(pool)?;
    println!("worker pool {pool:?} running");
    node.run_until_stopped(DRAIN).await;
    Ok(())
}

async fn scheduler(settings: Settings, limits: &LimitArgs) -> anyhow::Result<()> {
    let mut node = Node::start(settings, limits.limits()).await?;
    node.start_scheduler();
    println!("scheduler running");
    node.run_until_stopped(DRAIN).await;
    Ok(())
}

async fn topics(settings: Settings, check: bool, lag: bool) -> anyhow::Result<()> {
    let report = distributed::topics(&settings, check).await?;
    let mut missing = 0;
    for t in &report {
        match t.partitions {
            Some(n) => println!("{:<40} {:<48} {n} partitions", t.logical, t.physical),
            None => {
                missing += 1;
                println!("{:<40} {:<48} MISSING", t.logical, t.physical);
            }
        }
    }
    if lag {
        println!();
        for g in distributed::lags(&settings).await? {
            let behind = g
                .lag
                .map_or("no topic".to_string(), |n| format!("{n} behind"));
            println!("{:<40} {:<48} {behind}", g.group, g.topic);
        }
    }
    if missing > 0 {
        bail!("{missing} topic(s) missing; run `payos-workflows topics` to create them");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let bench = matches!(cli.command, Command::Bench(_));
    // The bench serves the PayOS sandbox (and, embedded, runs the engine) in its own process:
    // at `info` each transfer's log line was formatted and written to stderr inside what it
    // measures (embedded: ~16,000 instructions and a `write` per instance). `RUST_LOG` wins.
    let default_filter = if bench { "warn" } else { "info" };
    let logs = tracing_subscriber::fmt().with_env_filter(
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
    );
    if bench {
        // The bench's figures are its stdout, the last line one JSON object: a log line
        // (librdkafka's, say, as a client closes at exit) must not follow it there.
        logs.with_writer(std::io::stderr).init();
    } else {
        logs.init();
    }
    match cli.command {
        Command::Dev {
            listen,
            data_dir,
            limits,
        } => dev(listen, data_dir, limits).await,
        Command::Api { config, limits } => api(config.settings()?, &limits).await,
        Command::Worker {
            pool,
            config,
            limits,
        } => worker(config.settings()?, pool, &limits).await,
        Command::Scheduler { config, limits } => scheduler(config.settings()?, &limits).await,
        Command::Topics { check, lag, config } => topics(config.settings()?, check, lag).await,
        Command::Sandbox {
            listen,
            database_url,
        } => {
            let (store, sandbox) = sandbox_ledger::open_sandbox(&database_url)
                .await
                .context("cannot open the sandbox's database")?;
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            println!("PayOS SANDBOX (not real money) on http://{listen}; transfers at /sandbox/transfers");
            let router = workflow_egress::payos_sandbox::router(sandbox);
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(distributed::shutdown_signal())
                .await;
            store.close().await;
            Ok(served?)
        }
        Command::Bench(args) => Ok(payos_workflows::bench::run_cli(args).await?),
        Command::Migrate { database_url } => {
            let store = Store::connect(&database_url).await?;
            store.migrate().await?;
            println!("migrations applied");
            Ok(())
        }
        Command::VerifyAudit {
            database_url,
            partner,
            instance,
        } => {
            let store = Store::connect(&database_url).await?;
            let records = store
                .list_audit(
                    &partner,
                    &workflow_engine::service::instance_stream(&instance),
                )
                .await?;
            if records.is_empty() {
                bail!("no audit events for instance {instance} of partner {partner}");
            }
            let n = workflow_store::records::verify_audit_chain(&records)
                .with_context(|| format!("audit chain of instance {instance} is broken"))?;
            println!("audit chain of instance {instance}: {n} events verified");
            Ok(())
        }
    }
}

async fn dev(listen: SocketAddr, data_dir: PathBuf, args: LimitArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    let db = data_dir.join("workflows.db");
    let url = format!("sqlite://{}?mode=rwc", db.display());
    let store = Store::connect(&url).await?;
    store.migrate().await?;

    let admin_token = match std::env::var("WORKFLOWS_ADMIN_TOKEN") {
        Ok(t) if !t.is_empty() => t,
        _ => format!("adm_{}", uuid::Uuid::new_v4().simple()),
    };
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let keys = demo::seed(&store, clock.now()).await?;

    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let mut api = producer_api::ApiConfig::new(admin_token.clone());
    api.max_bulk_decisions = args.max_bulk_decisions;
    if let Ok(raw) = std::env::var("WORKFLOWS_MAX_BATCH_TRIGGERS") {
        api.max_batch_triggers =
            raw.parse()
                .ok()
                .filter(|n: &usize| *n > 0)
                .with_context(|| {
                    format!("WORKFLOWS_MAX_BATCH_TRIGGERS must be a positive integer, not {raw:?}")
                })?;
    }
    api.egress = EgressPolicy::from_env()?;
    // Actions go to PAYOS_API_URL, or to the PayOS sandbox this process serves itself.
    // Its calls are recorded in the engine's store, so its idempotency survives a restart.
    let sandbox = sandbox_ledger::sandbox_on(store.clone());
    let payos = PayosConfig {
        base_url: std::env::var("PAYOS_API_URL")
            .unwrap_or_else(|_| format!("http://{listen}/payos-sandbox")),
        api_key: std::env::var("PAYOS_API_KEY").unwrap_or_else(|_| "sandbox".into()),
        timeouts: PayosConfig::timeouts_from_env()?,
    };
    let using_sandbox = std::env::var("PAYOS_API_URL").is_err();
    let executor = ActionExecutor::new(
        PayosClient::new(&payos)?,
        EgressClient::new(EgressPolicy::from_env()?, Timeouts::default())?,
    );
    let config = EmbeddedConfig {
        api,
        limits: args.limits(),
        partitions: 8,
        clock,
        actions: Some(Arc::new(executor)),
        inline_steps: payos_workflows::config::inline_steps_from_env()?,
    };
    // Notifications: webhooks through the same egress policy, email through WORKFLOWS_SMTP_URL.
    let notifier = step_workers::Notifier::from_env(EgressClient::new(
        EgressPolicy::from_env()?,
        Timeouts::default(),
    )?)?;
    let smtp = std::env::var("WORKFLOWS_SMTP_URL").unwrap_or_default();
    let runtime = Embedded::start_with_notifier(store, config, Some(Arc::new(notifier))).await?;

    let env_file = data_dir.join("demo-keys.env");
    let mut env = format!("export WF=http://{listen}\nexport ADMIN_TOKEN={admin_token}\n");
    for k in &keys {
        env.push_str(&format!("export {}={}\n", k.env_name, k.key));
    }
    std::fs::write(&env_file, &env)
        .with_context(|| format!("cannot write {}", env_file.display()))?;

    println!("PayOS workflow engine (embedded) listening on http://{listen}");
    println!("  data: {}", db.display());
    println!("  OpenAPI: http://{listen}/openapi.json");
    println!("  dashboard: http://{listen}/dashboard (sign in with a key from the file below)");
    if using_sandbox {
        println!(
            "  PayOS SANDBOX (not real money): actions go to http://{listen}/payos-sandbox; \
             recorded transfers at http://{listen}/payos-sandbox/sandbox/transfers"
        );
    } else {
        println!("  PayOS API: {}", payos.base_url);
    }
    println!(
        "  demo partner `{}` keys (also in {}):",
        demo::DEMO_PARTNER,
        env_file.display()
    );
    for k in &keys {
        println!(
            "    {:<14} {:<16} roles {:?}",
            k.env_name, k.actor_id, k.roles
        );
    }
    println!("  source {} to use them in curl", env_file.display());
    if smtp.trim().is_empty() {
        println!(
            "  email notifications: off (set WORKFLOWS_SMTP_URL=smtp://host:port to send them)"
        );
    }

    let token = runtime.cancel_token();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        token.cancel();
    });
    let router = runtime.router.clone().nest(
        "/payos-sandbox",
        workflow_egress::payos_sandbox::router(sandbox),
    );
    let stop = runtime.cancel_token();
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await?;
    runtime.shutdown(Duration::from_secs(10)).await;
    Ok(())
}
