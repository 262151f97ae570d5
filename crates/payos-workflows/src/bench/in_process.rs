//! The seed workload on the embedded runtime, in this process.
//!
//! A SQLite file in a temporary directory; the embedded runtime (API, pools, scheduler, relay)
//! served on a local port with axum, with the PayOS sandbox mounted under `/payos-sandbox` as
//! `dev` does, so `execute_transfer` makes a real HTTP call. The load driver runs on its own
//! thread (a current-thread tokio runtime) so its CPU time can be read apart from the engine's
//! and left out of the CPU figure.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use step_workers::ActionExecutor;
use workflow_core::validate::Limits;
use workflow_egress::payos_sandbox::{self, SandboxState};
use workflow_egress::{EgressClient, EgressPolicy, PayosClient, PayosConfig, Timeouts};
use workflow_engine::{Clock, SystemClock};
use workflow_store::Store;

use super::seed::{self, DriveOutcome, SeedOptions, SeedReport, Target};
use super::{cpu, BenchError};
use crate::embedded::{Embedded, EmbeddedConfig};

/// Partitions of the bench's in-process bus, so pool members per pool (`BENCH_PARTITIONS`
/// overrides it). A member handles one message at a time, so this bounds the transitions in
/// flight, and with them the size of the store's commit groups: on 2 cores 32 gave ~750
/// instances/s, 128 ~950 and 256 the same (2026-11-26, `--instances 3000`, back to back).
const DEFAULT_PARTITIONS: u32 = 128;

/// Run the seed workload on a fresh embedded engine; the temporary directory is removed after.
pub async fn seed_embedded(opts: &SeedOptions) -> Result<SeedReport, BenchError> {
    let dir = std::env::temp_dir().join(format!("payos-bench-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir)?;
    let result = run_in(&dir, opts).await;
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        tracing::warn!(error = %e, dir = %dir.display(), "cannot remove the bench directory");
    }
    result
}

async fn run_in(dir: &Path, opts: &SeedOptions) -> Result<SeedReport, BenchError> {
    let url = format!("sqlite://{}?mode=rwc", dir.join("bench.db").display());
    let store = Store::connect(&url).await?;
    store.migrate().await?;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let sandbox = SandboxState::in_memory();
    let payos = PayosClient::new(&PayosConfig {
        base_url: format!("http://{addr}/payos-sandbox"),
        api_key: "sandbox".into(),
        timeouts: Timeouts::default(),
    })?;
    let executor = ActionExecutor::new(
        payos,
        EgressClient::new(EgressPolicy::strict(), Timeouts::default())?,
    );
    let admin_token = format!("adm_{}", uuid::Uuid::new_v4().simple());
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let config = EmbeddedConfig {
        api: producer_api::ApiConfig::new(admin_token.clone()),
        limits: Limits::default(),
        partitions: std::env::var("BENCH_PARTITIONS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_PARTITIONS),
        clock,
        actions: Some(Arc::new(executor)),
        inline_steps: crate::config::inline_steps_from_env()?,
    };
    let runtime = Embedded::start(store.clone(), config).await?;
    let router = runtime
        .router
        .clone()
        .nest("/payos-sandbox", payos_sandbox::router(sandbox.clone()));
    let stop = runtime.cancel_token();
    let server = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
    });
    let target = Target {
        base_url: format!("http://{addr}"),
        admin_token,
        database_url: url.clone(),
    };

    let machine_before = cpu::machine();
    let before = cpu::this_process()?;
    let driven = drive_on_own_thread(target, opts.clone()).await;
    let after = cpu::this_process()?;
    let machine_after = cpu::machine();
    runtime.shutdown(Duration::from_secs(10)).await;
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "bench server stopped with an error"),
        Err(e) => tracing::warn!(error = %e, "bench server task failed"),
    }
    let (outcome, driver_cpu_s) = driven?;
    let (steps, e2e) = seed::read_latencies(&url, &outcome.partner_id).await?;
    store.close().await;
    tracing::info!(
        requests = sandbox.requests(),
        replays = sandbox.replays(),
        "PayOS sandbox calls"
    );
    seed::check(&outcome)?;
    let engine_cpu_s = (after.own_s - before.own_s - driver_cpu_s).max(0.0);
    let mut report = seed::report(
        "embedded",
        &outcome,
        steps,
        e2e,
        engine_cpu_s,
        Some(driver_cpu_s),
    );
    report.others = cpu::others(
        machine_before,
        machine_after,
        (after.own_s - before.own_s).max(0.0),
    );
    Ok(report)
}

/// Drive the load from a dedicated thread; returns what it saw and the thread's CPU seconds.
async fn drive_on_own_thread(
    target: Target,
    opts: SeedOptions,
) -> Result<(DriveOutcome, f64), BenchError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("bench-driver".into())
        .spawn(move || {
            let run = || -> Result<(DriveOutcome, f64), BenchError> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let before = cpu::this_thread()?;
                let outcome = rt.block_on(seed::drive(&target, &opts))?;
                let after = cpu::this_thread()?;
                Ok((outcome, (after.own_s - before.own_s).max(0.0)))
            };
            // The receiver only goes away if the bench itself was dropped.
            let _ = tx.send(run());
        })?;
    rx.await
        .map_err(|_| BenchError::Wrong("the load driver thread died".into()))?
}
