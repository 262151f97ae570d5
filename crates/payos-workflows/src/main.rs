//! `payos-workflows`: one binary, one subcommand per role.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use payos_workflows::demo;
use payos_workflows::embedded::{Embedded, EmbeddedConfig};
use step_workers::ActionExecutor;
use workflow_core::validate::Limits;
use workflow_core::StepType;
use workflow_egress::egress_policy::Timeouts;
use workflow_egress::{EgressClient, EgressPolicy, PayosClient, PayosConfig};
use workflow_engine::{Clock, SystemClock};
use workflow_store::Store;

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
        #[arg(long, env = "WORKFLOWS_LISTEN", default_value = "0.0.0.0:8080")]
        listen: SocketAddr,
    },
    /// One worker pool of the distributed runtime.
    Worker {
        #[arg(long, value_parser = parse_step_type)]
        pool: StepType,
    },
    /// The timer service of the distributed runtime.
    Scheduler,
    /// Apply the database migrations and exit.
    Migrate {
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
    },
    /// Run a benchmark workload and print its figures (last line: one JSON object).
    Bench {
        /// `timers`: timer lateness of the scheduler.
        #[arg(long, default_value = "timers", value_parser = ["timers"])]
        workload: String,
        /// `embedded` (a SQLite file in a temporary directory) or `distributed`.
        #[arg(long, default_value = "embedded", value_parser = ["embedded", "distributed"])]
        runtime: String,
        /// How many timers (one instance each).
        #[arg(long, default_value_t = 10_000)]
        timers: usize,
        /// The window, in seconds, over which the timers fall due.
        #[arg(long, default_value_t = 60)]
        window_s: u64,
    },
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

fn parse_step_type(s: &str) -> Result<StepType, String> {
    StepType::parse(s).ok_or_else(|| {
        format!("unknown pool `{s}`; expected approval, condition, action, wait or notification")
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match Cli::parse().command {
        Command::Dev {
            listen,
            data_dir,
            limits,
        } => dev(listen, data_dir, limits).await,
        Command::Api { .. } | Command::Worker { .. } | Command::Scheduler => bail!(
            "the distributed runtime needs the Kafka bus adapter, which this build does not have yet; \
             run `payos-workflows dev` for the embedded engine"
        ),
        Command::Bench {
            workload: _,
            runtime,
            timers,
            window_s,
        } => {
            if runtime != "embedded" {
                bail!("the distributed runtime is not wired yet; run --runtime embedded");
            }
            let dir = std::env::temp_dir().join(format!("payos-bench-{}", uuid::Uuid::now_v7().simple()));
            std::fs::create_dir_all(&dir)?;
            let store = Store::connect(&format!("sqlite://{}?mode=rwc", dir.join("bench.db").display())).await?;
            store.migrate().await?;
            let report = payos_workflows::bench::timers(
                store,
                timers,
                Duration::from_secs(window_s),
            )
            .await?;
            println!(
                "timers: {}  due within {} ms  setup {:.1}s",
                report.timers, report.window_ms, report.setup_s
            );
            println!(
                "timer lateness (fire - due): p50 {} ms  p99 {} ms  max {} ms",
                report.lateness_p50_ms, report.lateness_p99_ms, report.lateness_max_ms
            );
            println!("{}", report.to_json());
            let _ = std::fs::remove_dir_all(&dir);
            Ok(())
        }
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
                .list_audit(&partner, &workflow_engine::service::instance_stream(&instance))
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
    api.egress = EgressPolicy::from_env()?;
    // Actions go to PAYOS_API_URL, or to the PayOS sandbox this process serves itself.
    let sandbox = workflow_egress::payos_sandbox::SandboxState::in_memory();
    let payos = PayosConfig {
        base_url: std::env::var("PAYOS_API_URL")
            .unwrap_or_else(|_| format!("http://{listen}/payos-sandbox")),
        api_key: std::env::var("PAYOS_API_KEY").unwrap_or_else(|_| "sandbox".into()),
        timeouts: Timeouts::default(),
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
    };
    let runtime = Embedded::start(store, config).await?;

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
