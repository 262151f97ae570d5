//! The embedded runtime: one process, one store, an in-process partitioned bus, the API, every
//! worker pool, the `on_transfer` trigger consumer, the scheduler and the outbox relay, all
//! under one cancellation token.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use workflow_bus::{Bus, InProcessBus};
use workflow_core::{StepStatus, StepType};
use workflow_engine::messages::step_topic;
use workflow_engine::{relay, Clock, Engine, StepCommand};
use workflow_store::Store;

/// Errors while starting or running the embedded runtime.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Store(#[from] workflow_store::StoreError),
    #[error(transparent)]
    Bus(#[from] workflow_bus::BusError),
    #[error("cannot listen: {0}")]
    Io(#[from] std::io::Error),
}

/// A running embedded engine.
pub struct Embedded {
    pub engine: Engine,
    pub bus: Arc<InProcessBus>,
    pub router: axum::Router,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
}

/// How the embedded runtime is built.
pub struct EmbeddedConfig {
    pub api: producer_api::ApiConfig,
    pub limits: workflow_core::validate::Limits,
    pub partitions: u32,
    pub clock: Arc<dyn Clock>,
    /// Makes action steps' calls; without one they stay in flight, visibly.
    pub actions: Option<Arc<step_workers::ActionExecutor>>,
    /// Step types executed in the transition that dispatches them (`Engine::with_inline_steps`).
    pub inline_steps: Vec<StepType>,
}

impl Embedded {
    /// Start the relay and every pool on `store` (already migrated), and resume instances whose
    /// step command was in flight when the process last stopped. Notification deliveries stay
    /// queued (visibly) without a notifier: see [`Embedded::start_with_notifier`].
    pub async fn start(store: Store, config: EmbeddedConfig) -> Result<Embedded, RuntimeError> {
        Embedded::start_with_notifier(store, config, None).await
    }

    /// [`Embedded::start`], with the notifier the notification delivery pool sends webhooks and
    /// email with (its consumer group on `workflow.notifications.deliveries`, and the scanner
    /// that re-queues due retries on the engine's clock).
    pub async fn start_with_notifier(
        store: Store,
        config: EmbeddedConfig,
        notifier: Option<Arc<step_workers::Notifier>>,
    ) -> Result<Embedded, RuntimeError> {
        let mut engine = Engine::new(store.clone(), config.limits, config.clock);
        if store.backend() == workflow_store::Backend::Sqlite {
            // This process is the only writer of its SQLite file, so the instances it
            // committed last can be kept in memory: pools skip the store read and the state's
            // decoding (the version check on commit still guards every write).
            engine = engine.with_instance_cache();
        }
        // Creates check the template's head in their transaction: no template read per start.
        engine = engine
            .with_inline_steps(&config.inline_steps)
            .with_template_heads();
        let bus = Arc::new(InProcessBus::new(config.partitions));
        let dyn_bus: Arc<dyn Bus> = bus.clone();
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();

        let kinds: Vec<_> = StepType::ALL
            .into_iter()
            .flat_map(step_workers::PoolKind::for_step_type)
            .collect();
        // The pools subscribe in their own tasks, which may not have run when `resume` below
        // publishes: their groups exist first, so the bus keeps every command for them (a topic
        // without a group keeps only its newest messages).
        for kind in &kinds {
            bus.declare_group(&kind.topic(), &kind.group());
        }
        for kind in kinds {
            let (engine, bus, token) = (engine.clone(), dyn_bus.clone(), cancel.child_token());
            let mut pool = step_workers::PoolConfig::new(kind);
            // A member handles one message at a time, and a partition goes to one member: a
            // member per partition lets every partition progress while others wait on the
            // store's group commit or an action's call (4 members capped the action pool).
            pool.members = pool.members.max(config.partitions as usize);
            if kind == step_workers::PoolKind::Steps(StepType::Action) {
                pool.actions = config.actions.clone();
            }
            if kind == step_workers::PoolKind::NotificationDeliveries {
                pool.notifier = notifier.clone();
            }
            let root = cancel.clone();
            tasks.spawn(async move {
                if let Err(e) = step_workers::run_pool(engine, bus, pool, token).await {
                    tracing::error!(error = %e, "worker pool stopped");
                    root.cancel();
                }
            });
        }
        {
            // The on_transfer trigger: the transfer service's events start instances.
            let config = step_workers::TransferTriggerConfig::default();
            bus.declare_group(&config.topic, &config.group);
            let (engine, bus, token) = (engine.clone(), dyn_bus.clone(), cancel.child_token());
            let root = cancel.clone();
            tasks.spawn(async move {
                if let Err(e) =
                    step_workers::run_transfer_triggers(engine, bus, config, token).await
                {
                    tracing::error!(error = %e, "transfer trigger consumer stopped");
                    root.cancel();
                }
            });
        }
        tasks.spawn(workflow_scheduler::run(
            engine.clone(),
            workflow_scheduler::SchedulerConfig::default(),
            cancel.child_token(),
        ));
        // The pools' groups exist before anything is published, so no command is missed.
        resume(&engine, dyn_bus.as_ref()).await?;
        tasks.spawn(relay::run(
            store,
            dyn_bus.clone(),
            engine.outbox(),
            cancel.child_token(),
        ));
        let router = producer_api::router(engine.clone(), config.api);
        Ok(Embedded {
            engine,
            bus,
            router,
            cancel,
            tasks,
        })
    }

    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Stop every task, waiting up to `deadline` for in-flight work.
    pub async fn shutdown(mut self, deadline: Duration) {
        self.cancel.cancel();
        self.bus.shutdown();
        let drained = tokio::time::timeout(deadline, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                left = self.tasks.len(),
                "tasks still running at the shutdown deadline; aborting them"
            );
            self.tasks.abort_all();
        }
    }
}

/// Re-send the command of every instance whose current step was dispatched but not executed:
/// the in-process bus does not survive a restart, the store does. Duplicates are harmless.
async fn resume(engine: &Engine, bus: &dyn Bus) -> Result<usize, RuntimeError> {
    let mut after: Option<String> = None;
    let mut resent = 0;
    loop {
        let page = engine
            .store()
            .list_active_instances(after.as_deref(), 500)
            .await?;
        let Some(last) = page.last() else { break };
        after = Some(last.info.id.clone());
        for rec in &page {
            let Some(index) = rec.state.current_step else {
                continue;
            };
            let Some(exec) = rec.state.execution(index) else {
                continue;
            };
            if exec.status != StepStatus::Pending {
                continue;
            }
            let cmd = StepCommand {
                command_id: uuid::Uuid::now_v7().to_string(),
                partner_id: rec.info.partner_id.clone(),
                instance_id: rec.info.id.clone(),
                step_index: index,
                step_type: exec.step_type,
                issued_at: engine.clock().now().0,
            };
            let payload = match cmd.encode() {
                Ok(payload) => payload,
                Err(e) => {
                    tracing::error!(error = %e, instance = %rec.info.id, "cannot resume");
                    continue;
                }
            };
            bus.publish(&step_topic(exec.step_type), &rec.info.id, payload)
                .await?;
            resent += 1;
        }
    }
    if resent > 0 {
        tracing::info!(resent, "resumed in-flight steps");
    }
    Ok(resent)
}
