//! The distributed runtime: the same engine as the embedded one, split into processes that
//! share PostgreSQL and Kafka.
//!
//! - `api`: the HTTP API. Starts instances (state and messages in one transaction) and
//!   publishes approval decisions onto their topic.
//! - `worker --pool <type>`: one consumer group per step type (`pool-<type>`), several processes
//!   per pool share its partitions; the approval pool also applies decisions in order; the
//!   `transfers` pool starts instances from the transfer service's `on_transfer` events.
//! - `scheduler`: fires due timers (row locks share them between schedulers).
//!
//! The `api` also listens for decision outcomes ([`run_decision_listener`]): the approval pool
//! records them in another process, and PostgreSQL's `NOTIFY` wakes the waiting approve call
//! instead of a 20 ms poll of the store.
//!
//! Every process runs an outbox relay ([`workflow_engine::relay`]): its own commits leave at
//! once, and orphaned rows of a killed process are swept under a lock. SIGTERM (or Ctrl-C)
//! stops taking work, lets the message in hand finish and commit, publishes what the process
//! committed, and exits.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use workflow_bus::{Bus, NamedBus};
use workflow_bus_kafka::KafkaBus;
use workflow_core::validate::Limits;
use workflow_core::StepType;
use workflow_egress::egress_policy::Timeouts;
use workflow_egress::{EgressClient, EgressPolicy, PayosClient, PayosConfig};
use workflow_engine::dead_letter::DEAD_LETTER_TOPIC;
use workflow_engine::messages::{step_topic, LIFECYCLE_TOPIC, NOTIFICATION_TOPIC};
use workflow_engine::{relay, Clock, Engine, SystemClock, DECISION_TOPIC};
use workflow_store::{Backend, DecisionListener, DecisionSignal, Store};

use crate::config::Settings;

/// Errors while starting or running a process of the distributed runtime.
#[derive(Debug, thiserror::Error)]
pub enum DistributedError {
    #[error(transparent)]
    Store(#[from] workflow_store::StoreError),
    #[error(transparent)]
    Bus(#[from] workflow_bus::BusError),
    #[error(transparent)]
    Egress(#[from] workflow_egress::EgressError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
}

/// What a `worker` process consumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerPool {
    /// The pool of one step type.
    Steps(StepType),
    /// The transfer service's `on_transfer` events.
    Transfers,
}

impl WorkerPool {
    pub fn parse(s: &str) -> Option<WorkerPool> {
        match s {
            "transfers" => Some(WorkerPool::Transfers),
            other => StepType::parse(other).map(WorkerPool::Steps),
        }
    }
}

/// Every topic the engine uses (logical names), with the transfer events topic it reads.
pub fn engine_topics(settings: &Settings) -> Vec<String> {
    let mut topics: Vec<String> = StepType::ALL.into_iter().map(step_topic).collect();
    topics.push(DECISION_TOPIC.to_string());
    topics.push(NOTIFICATION_TOPIC.to_string());
    topics.push(LIFECYCLE_TOPIC.to_string());
    topics.push(DEAD_LETTER_TOPIC.to_string());
    topics.push(settings.transfer_events.clone());
    topics
}

/// One topic as the cluster has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicStatus {
    pub logical: String,
    pub physical: String,
    /// `None`: the cluster does not have it.
    pub partitions: Option<u32>,
}

/// Create the engine's missing topics (unless `check_only`), then report each one.
pub async fn topics(
    settings: &Settings,
    check_only: bool,
) -> Result<Vec<TopicStatus>, DistributedError> {
    let kafka = KafkaBus::new(settings.kafka.clone())?;
    let pairs: Vec<(String, String)> = engine_topics(settings)
        .into_iter()
        .map(|l| {
            let p = settings.naming.topic(&l);
            (l, p)
        })
        .collect();
    if !check_only {
        let names: Vec<&str> = pairs.iter().map(|(_, p)| p.as_str()).collect();
        kafka.ensure_topics(&names).await?;
    }
    let existing = kafka.existing_topics().await?;
    Ok(pairs
        .into_iter()
        .map(|(logical, physical)| TopicStatus {
            partitions: existing.get(&physical).copied(),
            logical,
            physical,
        })
        .collect())
}

/// How far one consumer group of the engine is behind on its topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupLag {
    /// Physical names, as the cluster has them.
    pub topic: String,
    pub group: String,
    /// Messages the group has not committed; `None`: the cluster does not have the topic.
    pub lag: Option<u64>,
}

/// The lag of every consumer group the engine's processes run (each pool's, the decisions',
/// the notification deliveries', the transfer triggers'): what an operator watches to see a
/// pool falling behind, and what a drained deployment leaves at zero.
pub async fn lags(settings: &Settings) -> Result<Vec<GroupLag>, DistributedError> {
    let kafka = KafkaBus::new(settings.kafka.clone())?;
    let mut groups: Vec<(String, String)> = StepType::ALL
        .into_iter()
        .flat_map(step_workers::PoolKind::for_step_type)
        .map(|kind| (kind.topic(), kind.group()))
        .collect();
    groups.push((
        settings.transfer_events.clone(),
        step_workers::TransferTriggerConfig::default().group,
    ));
    let existing = kafka.existing_topics().await?;
    let mut lags = Vec::with_capacity(groups.len());
    for (topic, group) in groups {
        let (topic, group) = (settings.naming.topic(&topic), settings.naming.group(&group));
        let lag = if existing.contains_key(&topic) {
            Some(kafka.lag(&topic, &group).await?)
        } else {
            None
        };
        lags.push(GroupLag { topic, group, lag });
    }
    Ok(lags)
}

/// A connected process: store, bus, engine and the relay, under one cancellation token.
pub struct Node {
    pub engine: Engine,
    pub bus: Arc<dyn Bus>,
    pub settings: Settings,
    kafka: KafkaBus,
    /// The engine of this process's pools, with transition hints (`Engine::with_transition_hints`).
    pools_engine: Option<Engine>,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
}

impl Node {
    /// Connect, migrate (concurrent migrations are serialised by the database), and start the
    /// relay.
    pub async fn start(settings: Settings, limits: Limits) -> Result<Node, DistributedError> {
        let store =
            Store::connect_with(&settings.database_url, settings.database_max_connections).await?;
        store.migrate().await?;
        let kafka = KafkaBus::new(settings.kafka.clone())?;
        let bus: Arc<dyn Bus> = Arc::new(NamedBus::new(
            Arc::new(kafka.clone()),
            settings.naming.clone(),
        ));
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        // Every engine of the process (api, pools) shares the template heads: a start reads
        // no template while its head holds (`Engine::with_template_heads`).
        let engine = Engine::new(store.clone(), limits, clock)
            .with_inline_steps(&settings.inline_steps)
            .with_template_heads()
            .with_event_lane();
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        tasks.spawn(relay::run(
            store,
            bus.clone(),
            engine.outbox(),
            cancel.child_token(),
        ));
        Ok(Node {
            engine,
            bus,
            settings,
            kafka,
            pools_engine: None,
            cancel,
            tasks,
        })
    }

    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Run a task until the node stops; when it ends with an error, the node stops.
    fn spawn<F, E>(&mut self, what: &'static str, task: F)
    where
        F: std::future::Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let root = self.cancel.clone();
        self.tasks.spawn(async move {
            if let Err(e) = task.await {
                tracing::error!(error = %e, what, "task stopped; stopping the process");
                root.cancel();
            }
        });
    }

    /// Start the consumers of `pool`.
    pub fn start_pool(&mut self, pool: WorkerPool) -> Result<(), DistributedError> {
        // One for every pool of this process (the approval pool's steps and decisions share
        // their hints); the api has hints of its own, the scheduler the plain engine.
        let pools_engine = self
            .pools_engine
            .get_or_insert_with(|| self.engine.clone().with_transition_hints())
            .clone();
        match pool {
            WorkerPool::Steps(step_type) => {
                let actions = if step_type == StepType::Action {
                    Some(Arc::new(action_executor(&self.settings)?))
                } else {
                    None
                };
                let notifier = if step_type == StepType::Notification {
                    let http = EgressClient::new(EgressPolicy::from_env()?, Timeouts::default())?;
                    let notifier = step_workers::Notifier::from_env(http)
                        .map_err(|e| DistributedError::Config(e.to_string()))?;
                    Some(Arc::new(notifier))
                } else {
                    None
                };
                for kind in step_workers::PoolKind::for_step_type(step_type) {
                    let mut config = step_workers::PoolConfig::new(kind);
                    config.members = self.settings.pool_members;
                    config.actions.clone_from(&actions);
                    config.notifier.clone_from(&notifier);
                    let (engine, bus, token) = (
                        pools_engine.clone(),
                        self.bus.clone(),
                        self.cancel.child_token(),
                    );
                    self.spawn("worker pool", async move {
                        step_workers::run_pool(engine, bus, config, token).await
                    });
                }
            }
            WorkerPool::Transfers => {
                let config = step_workers::TransferTriggerConfig {
                    topic: self.settings.transfer_events.clone(),
                    members: self.settings.pool_members,
                    ..step_workers::TransferTriggerConfig::default()
                };
                let (engine, bus, token) =
                    (pools_engine, self.bus.clone(), self.cancel.child_token());
                self.spawn("transfer triggers", async move {
                    step_workers::run_transfer_triggers(engine, bus, config, token).await
                });
            }
        }
        Ok(())
    }

    /// Start the timer service.
    pub fn start_scheduler(&mut self) {
        let (engine, token) = (self.engine.clone(), self.cancel.child_token());
        self.spawn("scheduler", async move {
            workflow_scheduler::run(
                engine,
                workflow_scheduler::SchedulerConfig::default(),
                token,
            )
            .await;
            Ok::<(), std::convert::Infallible>(())
        });
    }

    /// Serve the API until the node stops.
    pub async fn serve_api(&self, api: producer_api::ApiConfig) -> Result<(), DistributedError> {
        let addr = self.settings.listen;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| DistributedError::Listen { addr, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| DistributedError::Listen { addr, source })?;
        tracing::info!(%bound, "api listening");
        println!("api listening on http://{bound}");
        // Approve calls wait for outcomes recorded by the approval pool's processes.
        let signals = self.cancel.child_token();
        let decisions = (self.engine.store().backend() == Backend::Postgres).then(|| {
            tokio::spawn(run_decision_listener(
                self.engine.clone(),
                self.settings.database_url.clone(),
                signals.clone(),
            ))
        });
        // Hints let an approval's check start from the record this process created or last
        // read (`Engine::submit_decision`); reads never answer from them. Decisions go onto
        // the bus directly: they commit no state when submitted (`Engine::with_command_bus`).
        let engine = self
            .engine
            .clone()
            .with_transition_hints()
            .with_command_bus(self.bus.clone());
        let router = producer_api::router(engine, api);
        let stop = self.cancel.clone();
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
            .map_err(|source| DistributedError::Listen { addr, source });
        signals.cancel();
        if let Some(task) = decisions {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "decision outcome listener failed"),
                Err(e) => tracing::warn!(error = %e, "decision outcome listener panicked"),
            }
        }
        served
    }

    /// Wait for SIGTERM/Ctrl-C (or a task failing), then drain: every task finishes the work
    /// in hand (up to `deadline`), the relay publishes what this process committed.
    pub async fn run_until_stopped(mut self, deadline: Duration) {
        let cancel = self.cancel.clone();
        tokio::select! {
            _ = shutdown_signal() => tracing::info!("stopping: draining in-flight work"),
            _ = cancel.cancelled() => {}
        }
        self.stop(deadline).await;
    }

    /// Cancel and drain.
    pub async fn stop(&mut self, deadline: Duration) {
        self.cancel.cancel();
        let drained = tokio::time::timeout(deadline, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                left = self.tasks.len(),
                "still running at the drain deadline; aborting"
            );
            self.tasks.abort_all();
        }
        self.kafka.shutdown();
        self.engine.store().close().await;
    }
}

/// Relay decision outcomes that other processes record (PostgreSQL `NOTIFY`, see
/// [`workflow_store::DecisionListener`]) to `engine`'s waiting calls until `token` is
/// cancelled. While disconnected, the engine falls back to polling; the listener reconnects
/// with back-off. Fails only if `database_url` is not a PostgreSQL URL.
pub async fn run_decision_listener(
    engine: Engine,
    database_url: String,
    token: CancellationToken,
) -> Result<(), workflow_store::StoreError> {
    let mut listener = DecisionListener::new(&database_url)?;
    loop {
        let signal = tokio::select! {
            _ = token.cancelled() => break,
            signal = listener.next() => signal,
        };
        match signal {
            DecisionSignal::Connected => {
                tracing::debug!("listening for decision outcomes");
                engine.set_decisions_signalled(true);
            }
            DecisionSignal::Disconnected => engine.set_decisions_signalled(false),
            DecisionSignal::Decided {
                decision_id,
                accepted,
            } => engine.wake_decision(&decision_id, accepted),
        }
    }
    engine.set_decisions_signalled(false);
    Ok(())
}

/// The action pool's executor: PayOS at `PAYOS_API_URL`, generic `http` actions through the
/// egress policy (`WORKFLOWS_EGRESS_ALLOW`).
fn action_executor(settings: &Settings) -> Result<step_workers::ActionExecutor, DistributedError> {
    let base_url = settings.payos_api_url.clone().ok_or_else(|| {
        DistributedError::Config(
            "the action pool needs PAYOS_API_URL (config key payos.api_url)".into(),
        )
    })?;
    let payos = PayosClient::new(&PayosConfig {
        base_url,
        api_key: settings.payos_api_key.clone().unwrap_or_default(),
        timeouts: PayosConfig::timeouts_from_env()?,
    })?;
    let egress = EgressClient::new(EgressPolicy::from_env()?, Timeouts::default())?;
    Ok(step_workers::ActionExecutor::new(payos, egress))
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
