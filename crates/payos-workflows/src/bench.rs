//! `payos-workflows bench`: workloads run against the engine, with figures printed.
//!
//! The `seed` workload (the default) measures instance throughput, step and end-to-end latency
//! and CPU per 1,000 instances of the spec's Procurement Approval template, driven through the
//! HTTP API; see [`seed`]. [`seed_embedded`] runs it on the embedded runtime in this process,
//! [`seed::run_distributed`] against a distributed engine given its URL, database and pids.
//!
//! The `timers` workload measures the scheduler: it starts `n` instances whose only step waits
//! `until` an instant spread over one window (by default 10,000 timers due within the same
//! minute), lets the embedded runtime fire them on the real clock, and reports timer lateness
//! (fire time minus due time, from the durable timer rows) at p50, p99 and max.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use workflow_core::instance::{ActorRef, ActorType};
use workflow_core::validate::{parse_template, Limits};
use workflow_core::InstanceStatus;
use workflow_engine::{Clock, SystemClock};
use workflow_store::records::{AuditDraft, PartnerRecord, TemplateRecord};
use workflow_store::Store;

use crate::embedded::{Embedded, EmbeddedConfig, RuntimeError};

mod cli;
pub mod cpu;
mod in_process;
mod launch;
pub mod machine;
pub mod probe;
pub mod seed;

pub use cli::{run_cli, BenchArgs};
pub use in_process::seed_embedded;
pub use seed::{SeedOptions, SeedReport, Target};

/// What the timer workload measured.
#[derive(Debug, Clone)]
pub struct TimerReport {
    pub timers: usize,
    pub window_ms: i64,
    pub lateness_p50_ms: i64,
    pub lateness_p99_ms: i64,
    pub lateness_max_ms: i64,
    pub setup_s: f64,
}

impl TimerReport {
    /// The one-line JSON summary (the bench's last line).
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "workload": "timers",
            "runtime": "embedded",
            "timers": self.timers,
            "window_ms": self.window_ms,
            "timer_lateness_ms": {
                "p50": self.lateness_p50_ms,
                "p99": self.lateness_p99_ms,
                "max": self.lateness_max_ms,
            },
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Store(#[from] workflow_store::StoreError),
    #[error(transparent)]
    Engine(#[from] workflow_engine::EngineError),
    #[error("the bench template does not validate: {0}")]
    Template(String),
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("HTTP: {0}")]
    Http(String),
    #[error("cannot reach PayOS: {0}")]
    Egress(#[from] workflow_egress::EgressError),
    #[error("the run went wrong: {0}")]
    Wrong(String),
    #[error("only {terminal} of {expected} instances ended within {waited:?}")]
    Unfinished {
        terminal: usize,
        expected: usize,
        waited: Duration,
    },
    #[error("only {fired} of {expected} timers fired within {waited:?}")]
    Incomplete {
        fired: usize,
        expected: usize,
        waited: Duration,
    },
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Run the timer workload on `store` (migrated, empty of this bench's partner).
pub async fn timers(store: Store, n: usize, window: Duration) -> Result<TimerReport, BenchError> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let now = clock.now();
    let actor = ActorRef {
        id: "bench".into(),
        actor_type: ActorType::System,
    };
    let partner = format!("bench-{}", uuid::Uuid::now_v7().simple());
    store
        .create_partner(&PartnerRecord {
            id: partner.clone(),
            name: "Benchmark".into(),
            created_at: now,
        })
        .await?;
    let doc = json!({"name": "Timer bench", "trigger_type": "manual", "steps": [
        {"type": "wait", "name": "Until", "config": {"until": "trigger.at"}}
    ]});
    parse_template(&doc, &Limits::default()).map_err(|p| BenchError::Template(format!("{p:?}")))?;
    let template_id = uuid::Uuid::now_v7().to_string();
    let template = TemplateRecord {
        id: template_id.clone(),
        partner_id: partner.clone(),
        version: 1,
        name: "Timer bench".into(),
        trigger_type: "manual".into(),
        active: true,
        doc,
        created_at: now,
        created_by: actor.id.clone(),
    };
    let audit = AuditDraft {
        stream: format!("template:{template_id}"),
        at: now,
        actor: actor.clone(),
        kind: "template.created".into(),
        before: json!(null),
        after: json!({}),
        reason: None,
    };
    store.insert_template(&template, &audit).await?;

    let config = EmbeddedConfig {
        api: producer_api::ApiConfig::new(uuid::Uuid::new_v4().to_string()),
        limits: Limits::default(),
        partitions: 8,
        clock: clock.clone(),
        actions: None,
        inline_steps: workflow_engine::DEFAULT_INLINE_STEPS.to_vec(),
    };
    let runtime = Embedded::start(store.clone(), config).await?;
    let engine = runtime.engine.clone();

    // Every timer falls due inside one window that opens after the setup has had time to run.
    let setup_started = Instant::now();
    // Room for the setup to finish first (about 1 ms per instance here), so every timer is
    // stored before its window opens and lateness measures the scheduler, not the setup.
    let lead_ms = 5_000 + 2 * n as i64;
    let window_ms = window.as_millis() as i64;
    let first_due = now.0 + lead_ms;
    let mut ids = Vec::with_capacity(n);
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in 0..4usize {
        let (engine, partner, template_id, actor) = (
            engine.clone(),
            partner.clone(),
            template_id.clone(),
            actor.clone(),
        );
        tasks.spawn(async move {
            let mut mine = Vec::new();
            for i in (chunk..n).step_by(4) {
                let offset = (i as i64 * window_ms) / (n.max(1) as i64);
                let at = first_due + offset;
                let out = engine
                    .start_instance(
                        &partner,
                        &actor,
                        &template_id,
                        json!({"at": at}),
                        None,
                        Default::default(),
                    )
                    .await?;
                mine.push(out.instance.info.id);
            }
            Ok::<_, workflow_engine::EngineError>(mine)
        });
    }
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(mine) => ids.extend(mine?),
            Err(e) => tracing::error!(error = %e, "bench task failed"),
        }
    }
    let setup_s = setup_started.elapsed().as_secs_f64();
    println!("started {n} instances in {setup_s:.1}s; timers fall due over {window_ms} ms");

    // Wait for every instance to complete (or a generous deadline).
    let waited = Instant::now();
    let deadline = Duration::from_millis((lead_ms + window_ms) as u64) + Duration::from_secs(60);
    let mut lateness = Vec::with_capacity(n);
    loop {
        lateness.clear();
        let firings = store.timer_firings(&partner).await?;
        let mut pending = n.saturating_sub(firings.len());
        for (due, fired) in firings {
            match fired {
                Some(fired) => lateness.push(fired.0 - due.0),
                None => pending += 1,
            }
        }
        if pending == 0 {
            break;
        }
        if waited.elapsed() > deadline {
            runtime.shutdown(Duration::from_secs(5)).await;
            return Err(BenchError::Incomplete {
                fired: lateness.len(),
                expected: n,
                waited: waited.elapsed(),
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Each fired timer moved its instance on: check a sample end to end.
    for id in ids.iter().take(20) {
        let done = store
            .get_instance(&partner, id)
            .await?
            .is_some_and(|r| r.state.status == InstanceStatus::Completed);
        if !done {
            tracing::warn!(instance = %id, "fired but not yet completed");
        }
    }
    runtime.shutdown(Duration::from_secs(5)).await;
    lateness.sort_unstable();
    Ok(TimerReport {
        timers: n,
        window_ms,
        lateness_p50_ms: percentile(&lateness, 50.0),
        lateness_p99_ms: percentile(&lateness, 99.0),
        lateness_max_ms: lateness.last().copied().unwrap_or(0),
        setup_s,
    })
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles_of_a_known_list() {
        let v: Vec<i64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&[], 99.0), 0);
        assert_eq!(percentile(&[7], 1.0), 7);
    }
}
