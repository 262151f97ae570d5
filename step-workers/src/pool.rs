//! One pool: members of a consumer group executing step commands.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use workflow_bus::{Bus, Message, Subscription};
use workflow_core::StepType;
use workflow_engine::dead_letter::send_to_dead_letter;
use workflow_engine::messages::step_topic;
use workflow_engine::{DecisionCommand, Engine, ExecuteOutcome, StepMessage, DECISION_TOPIC};

use crate::action::ActionExecutor;

/// What a pool consumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolKind {
    /// Step commands of one step type.
    Steps(StepType),
    /// Approval decisions, applied in order per instance (part of the approval pool).
    ApprovalDecisions,
    /// Notification deliveries (part of the notification pool): one attempt per message, and
    /// the scanner that re-queues due retries.
    NotificationDeliveries,
}

impl PoolKind {
    pub fn topic(self) -> String {
        match self {
            PoolKind::Steps(t) => step_topic(t),
            PoolKind::ApprovalDecisions => DECISION_TOPIC.to_string(),
            PoolKind::NotificationDeliveries => {
                workflow_engine::messages::NOTIFICATION_TOPIC.to_string()
            }
        }
    }

    /// The consumer group.
    pub fn group(self) -> String {
        match self {
            PoolKind::Steps(t) => format!("pool-{}", t.as_str()),
            PoolKind::ApprovalDecisions => "pool-approval-decisions".to_string(),
            PoolKind::NotificationDeliveries => "pool-notification-deliveries".to_string(),
        }
    }

    /// Every consumer a pool of this step type runs: the approval pool also applies decisions.
    pub fn for_step_type(step_type: StepType) -> Vec<PoolKind> {
        match step_type {
            StepType::Approval => vec![PoolKind::Steps(step_type), PoolKind::ApprovalDecisions],
            StepType::Notification => {
                vec![PoolKind::Steps(step_type), PoolKind::NotificationDeliveries]
            }
            StepType::Condition | StepType::Action | StepType::Wait => {
                vec![PoolKind::Steps(step_type)]
            }
        }
    }
}

/// How a pool runs.
#[derive(Clone)]
pub struct PoolConfig {
    pub kind: PoolKind,
    /// Makes the calls of action steps (the action pool only). Without one, action steps stay
    /// in flight, visibly, until a pool that has one picks them up.
    pub actions: Option<std::sync::Arc<ActionExecutor>>,
    /// Makes notification deliveries (the delivery pool only). Without one, deliveries stay
    /// queued, visibly, until a pool that has one picks them up.
    pub notifier: Option<std::sync::Arc<crate::notify::Notifier>>,
    /// Members of the consumer group in this process; partitions are shared among them.
    pub members: usize,
}

impl PoolConfig {
    pub fn new(kind: PoolKind) -> PoolConfig {
        PoolConfig {
            kind,
            actions: None,
            notifier: None,
            members: 4,
        }
    }
}

/// Run the pool until cancelled.
pub async fn run_pool(
    engine: Engine,
    bus: std::sync::Arc<dyn Bus>,
    config: PoolConfig,
    cancel: CancellationToken,
) -> Result<(), workflow_bus::BusError> {
    let topic = config.kind.topic();
    let group = config.kind.group();
    let mut members = JoinSet::new();
    if config.kind == PoolKind::NotificationDeliveries {
        let (engine, cancel) = (engine.clone(), cancel.child_token());
        members.spawn(async move {
            crate::notify::run_scanner(engine, cancel).await;
            None
        });
    }
    let handler = Arc::new(StepHandler {
        engine,
        config: config.clone(),
    });
    let spawned = spawn_members(
        &mut members,
        handler,
        &bus,
        (&topic, &group),
        config.members,
        (&cancel, COMMIT_AFTER),
    )
    .await;
    if spawned.is_err() {
        cancel.cancel();
    }
    join_members(members, &cancel, &group).await;
    spawned
}

/// Subscribe `count` members (at least one) of `group` to `topic` and start them.
async fn spawn_members<H: Handler>(
    members: &mut JoinSet<Option<Box<dyn Subscription>>>,
    handler: Arc<H>,
    bus: &Arc<dyn Bus>,
    (topic, group): (&str, &str),
    count: usize,
    (cancel, commit_after): (&CancellationToken, Duration),
) -> Result<(), workflow_bus::BusError> {
    for _ in 0..count.max(1) {
        let sub = bus.subscribe(topic, group).await?;
        members.spawn(member(
            Arc::clone(&handler),
            bus.clone(),
            sub,
            cancel.child_token(),
            commit_after,
        ));
    }
    Ok(())
}

/// Wait for every member, then let the subscriptions of those that stopped with the pool go
/// together. A member leaving its group rebalances it: dropped as each member stopped, the
/// first to stop took the others' partitions away before they had committed what they
/// handled, so a drained pool left work to be delivered again.
pub(crate) async fn join_members(
    mut members: JoinSet<Option<Box<dyn Subscription>>>,
    cancel: &CancellationToken,
    group: &str,
) {
    let mut subscriptions = Vec::new();
    while let Some(res) = members.join_next().await {
        match res {
            Ok(sub) => subscriptions.extend(sub),
            Err(e) => {
                tracing::error!(error = %e, group, "pool member crashed");
                cancel.cancel();
            }
        }
    }
    drop(subscriptions);
}

/// Offsets are committed at most this long after a message was handled (with 20 ms a busy
/// member committed every message or two, each a request the broker's group coordinator
/// writes; 250 ms cut the CPU per instance of the broker and PostgreSQL together by ~8 % and
/// the engine's by ~5 %: docs/benchmarks.md, round 10)...
const COMMIT_AFTER: Duration = Duration::from_millis(250);
/// ...or after this many messages, whichever comes first.
const COMMIT_EVERY: usize = 64;

/// Messages handled but not committed yet: the latest per partition (committing it commits
/// every earlier one of the partition).
///
/// A commit is a round trip to the group coordinator (and a write to Kafka's offsets topic):
/// made after every message it held each member for a round trip per step. Handled messages
/// are instead committed together, when [`COMMIT_AFTER`] has passed since the first of them or
/// [`COMMIT_EVERY`] accumulated, and before the member stops. A crash in between only means
/// those messages are delivered again, and a redelivered command is recognised by its id and
/// skipped (the engine's dedupe), as after any crash before a commit.
struct Uncommitted {
    latest: std::collections::BTreeMap<u32, Message>,
    count: usize,
    since: Option<tokio::time::Instant>,
    /// How long a handled message may wait for its commit: [`COMMIT_AFTER`] (tests set their own).
    after: Duration,
}

impl Uncommitted {
    fn new(after: Duration) -> Uncommitted {
        Uncommitted {
            latest: Default::default(),
            count: 0,
            since: None,
            after,
        }
    }

    fn add(&mut self, msg: Message) {
        self.since.get_or_insert_with(tokio::time::Instant::now);
        self.count += 1;
        self.latest.insert(msg.partition, msg);
    }

    /// When the held messages must be committed (`None`: nothing held).
    fn due(&self) -> Option<tokio::time::Instant> {
        self.since.map(|since| since + self.after)
    }

    async fn commit(&mut self, sub: &mut dyn Subscription) {
        for msg in std::mem::take(&mut self.latest).into_values() {
            if let Err(e) = sub.commit(&msg).await {
                // Lost in a rebalance, or refused: the new owner gets the messages again.
                tracing::warn!(error = %e, offset = msg.offset, partition = msg.partition, "commit failed; messages will be redelivered");
            }
        }
        self.count = 0;
        self.since = None;
    }
}

/// What a member does with each message it receives.
trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        msg: &Message,
        cancel: &CancellationToken,
    ) -> impl std::future::Future<Output = Handled> + Send;

    /// Now, by the engine's clock: a dead letter's time.
    fn now(&self) -> workflow_core::Timestamp;
}

/// The pools' handler: the engine applies the message's command.
struct StepHandler {
    engine: Engine,
    config: PoolConfig,
}

impl Handler for StepHandler {
    async fn handle(&self, msg: &Message, cancel: &CancellationToken) -> Handled {
        handle(&self.engine, msg, &self.config, cancel).await
    }

    fn now(&self) -> workflow_core::Timestamp {
        self.engine.clock().now()
    }
}

/// One member: handles its partitions' messages until cancelled or the bus closes, then
/// commits what it handled and hands its subscription back (see [`join_members`]). A member
/// that stops on its own (a message it can neither handle nor dead-letter) drops its
/// subscription instead, handing its partitions to the members still running.
async fn member<H: Handler>(
    handler: Arc<H>,
    bus: Arc<dyn Bus>,
    mut sub: Box<dyn Subscription>,
    cancel: CancellationToken,
    commit_after: Duration,
) -> Option<Box<dyn Subscription>> {
    let mut held = Uncommitted::new(commit_after);
    loop {
        if held.count >= COMMIT_EVERY {
            held.commit(sub.as_mut()).await;
        }
        let due = held.due();
        let msg = tokio::select! {
            // Stopping (SIGTERM drains): what was handled is committed first.
            _ = cancel.cancelled() => {
                held.commit(sub.as_mut()).await;
                return Some(sub);
            }
            msg = sub.next() => msg,
            // `next` is cancel-safe: a message it was about to return stays queued.
            _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                held.commit(sub.as_mut()).await;
                continue;
            }
        };
        let msg = match msg {
            Ok(Some(msg)) => msg,
            Ok(None) => {
                held.commit(sub.as_mut()).await;
                return Some(sub);
            }
            Err(e) => {
                tracing::warn!(error = %e, "bus receive failed");
                tokio::select! {
                    _ = cancel.cancelled() => {
                        held.commit(sub.as_mut()).await;
                        return Some(sub);
                    }
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        // Cancellation between steps is fine; the uncommitted message is redelivered.
        match handler.handle(&msg, &cancel).await {
            Handled::Done => {}
            Handled::Cancelled => {
                held.commit(sub.as_mut()).await;
                return Some(sub);
            }
            Handled::Dead(reason) => {
                let now = handler.now().0;
                if let Err(e) = send_to_dead_letter(bus.as_ref(), &msg, &reason, now).await {
                    // Not committed: the message comes back rather than being lost. Neither
                    // are the earlier ones of its partition held here (a commit covers them).
                    tracing::error!(error = %e, offset = msg.offset, "cannot dead-letter; leaving the message uncommitted");
                    held.latest.remove(&msg.partition);
                    held.commit(sub.as_mut()).await;
                    // Stopping alone while the others go on: leave the group now, so the
                    // partitions (this message's too) go to a member that still reads.
                    return None;
                }
                // Committed at once: a dead letter has no command id to recognise it by, so
                // a redelivery (a rebalance within the commit delay) would send it twice.
                held.add(msg);
                held.commit(sub.as_mut()).await;
                continue;
            }
        }
        held.add(msg);
    }
}

/// How handling one message ended.
#[derive(Debug)]
pub(crate) enum Handled {
    /// Done with (applied, or recognised as stale or redelivered): commit it.
    Done,
    /// Cancelled before it finished: leave it uncommitted, it is redelivered.
    Cancelled,
    /// Undecodable, or failing for good: to the dead-letter topic with the reason, then commit,
    /// so the partition moves on.
    Dead(String),
}

impl<T> From<Attempted<T>> for Handled {
    fn from(attempted: Attempted<T>) -> Handled {
        match attempted {
            Attempted::Done(_) => Handled::Done,
            Attempted::GaveUp(reason) => Handled::Dead(reason),
            Attempted::Cancelled => Handled::Cancelled,
        }
    }
}

/// Handle one message.
async fn handle(
    engine: &Engine,
    msg: &Message,
    config: &PoolConfig,
    cancel: &CancellationToken,
) -> Handled {
    match config.kind {
        PoolKind::Steps(_) => handle_step(engine, msg, config, cancel).await,
        PoolKind::ApprovalDecisions => handle_decision(engine, msg, cancel).await,
        PoolKind::NotificationDeliveries => {
            crate::notify::handle_delivery(engine, msg, config.notifier.as_deref(), cancel).await
        }
    }
}

async fn handle_decision(engine: &Engine, msg: &Message, cancel: &CancellationToken) -> Handled {
    let cmd = match DecisionCommand::decode(&msg.payload) {
        Ok(cmd) => cmd,
        Err(e) => return Handled::Dead(format!("undecodable decision command: {e}")),
    };
    retrying(cancel, &cmd.instance_id, || engine.apply_decision(&cmd))
        .await
        .into()
}

/// How a retried operation ended.
enum Attempted<T> {
    Done(T),
    /// Failed for good (logged), with the error.
    GaveUp(String),
    /// Cancelled while waiting to retry: leave the message uncommitted.
    Cancelled,
}

/// Run `op` until it succeeds or fails for good. A retryable failure (the store unreachable, a
/// lost optimistic-concurrency race) is retried with capped backoff for as long as it lasts: the
/// command is not at fault, and moving past it would strand its instance. Only a permanent
/// failure gives up (and the message goes to the dead-letter topic).
async fn retrying<T, F, Fut>(
    cancel: &CancellationToken,
    instance_id: &str,
    mut op: F,
) -> Attempted<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, workflow_engine::EngineError>>,
{
    let mut delay = Duration::from_millis(20);
    let mut attempt: u64 = 0;
    loop {
        attempt += 1;
        match op().await {
            Ok(value) => return Attempted::Done(value),
            Err(e) if e.is_retryable() => {
                tracing::warn!(error = %e, attempt, instance = %instance_id, "retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return Attempted::Cancelled,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                tracing::error!(error = %e, instance = %instance_id, attempt, "command failed permanently");
                return Attempted::GaveUp(format!("failed permanently: {e}"));
            }
        }
    }
}

async fn handle_step(
    engine: &Engine,
    msg: &Message,
    config: &PoolConfig,
    cancel: &CancellationToken,
) -> Handled {
    let cmd = match StepMessage::decode(&msg.payload) {
        Ok(StepMessage::Execute(cmd)) => cmd,
        Ok(StepMessage::TimerFired(fired)) => {
            return retrying(cancel, &fired.instance_id, || engine.fire_timer(&fired))
                .await
                .into();
        }
        Err(e) => return Handled::Dead(format!("undecodable step message: {e}")),
    };
    let executed = retrying(cancel, &cmd.instance_id, || engine.execute_step(&cmd)).await;
    let task = match executed {
        Attempted::Done(ExecuteOutcome::Perform(task)) => task,
        Attempted::Done(ExecuteOutcome::Skipped(why)) => {
            tracing::debug!(instance = %cmd.instance_id, step = cmd.step_index, %why, "step command skipped");
            return Handled::Done;
        }
        other => return other.into(),
    };
    let Some(executor) = &config.actions else {
        tracing::warn!(instance = %task.instance_id, step = task.step_index, "no action executor in this pool; the action stays in flight");
        return Handled::Done;
    };
    let Some(outcome) = executor.perform(&task, cancel).await else {
        return Handled::Cancelled;
    };
    let outcome = Arc::new(outcome);
    retrying(cancel, &task.instance_id, || {
        engine.record_action(&task, Arc::clone(&outcome))
    })
    .await
    .into()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::sync::Notify;
    use workflow_bus::InProcessBus;

    use super::*;

    /// `count` members of group `g` on topic `t`, handing each message to `handler`. They commit
    /// only when stopping: the commit timer never falls due within a test.
    async fn start<H: Handler>(
        handler: &Arc<H>,
        bus: &Arc<dyn Bus>,
        count: usize,
    ) -> (JoinSet<Option<Box<dyn Subscription>>>, CancellationToken) {
        let cancel = CancellationToken::new();
        let mut members = JoinSet::new();
        spawn_members(
            &mut members,
            Arc::clone(handler),
            bus,
            ("t", "g"),
            count,
            (&cancel, Duration::from_secs(3600)),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        (members, cancel)
    }

    /// Counts what it is handed, and says when it has seen `expected`.
    struct Counting {
        seen: AtomicUsize,
        expected: usize,
        all_seen: Notify,
    }

    impl Handler for Counting {
        async fn handle(&self, _msg: &Message, _cancel: &CancellationToken) -> Handled {
            if self.seen.fetch_add(1, Ordering::SeqCst) + 1 == self.expected {
                self.all_seen.notify_one();
            }
            Handled::Done
        }

        fn now(&self) -> workflow_core::Timestamp {
            workflow_core::Timestamp(0)
        }
    }

    /// Four members handle 40 messages, then the pool stops. Which member sees its
    /// cancellation first varies from run to run (`select!` picks among ready branches at
    /// random), so the stop is repeated.
    #[tokio::test]
    async fn a_stopping_pool_commits_what_every_member_handled() {
        for round in 0..20 {
            stop_after_handling(round).await;
        }
    }

    async fn stop_after_handling(round: usize) {
        let in_process = Arc::new(InProcessBus::new(8));
        let bus: Arc<dyn Bus> = in_process.clone();
        let handler = Arc::new(Counting {
            seen: AtomicUsize::new(0),
            expected: 40,
            all_seen: Notify::new(),
        });
        let (members, cancel) = start(&handler, &bus, 4).await;
        for i in 0..handler.expected {
            bus.publish("t", &format!("instance-{i}"), vec![1])
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        tokio::time::timeout(Duration::from_secs(10), handler.all_seen.notified())
            .await
            .unwrap_or_else(|_| panic!("handled {} messages", handler.seen.load(Ordering::SeqCst)));
        assert_eq!(
            in_process.retained(),
            40,
            "round {round}: committed before stopping"
        );

        cancel.cancel();
        join_members(members, &cancel, "g").await;
        // The group stays, without members: whatever it had not committed would be kept for
        // its next member, and delivered again.
        assert_eq!(in_process.retained(), 0, "round {round}: left uncommitted");
        assert_eq!(
            handler.seen.load(Ordering::SeqCst),
            40,
            "round {round}: delivered again"
        );
    }

    /// The first delivery of the message keyed `poison` is dead; later ones are done.
    struct PoisonOnce {
        poison_seen: AtomicUsize,
        redelivered: Notify,
    }

    impl Handler for PoisonOnce {
        async fn handle(&self, msg: &Message, _cancel: &CancellationToken) -> Handled {
            if msg.key != "poison" {
                return Handled::Done;
            }
            if self.poison_seen.fetch_add(1, Ordering::SeqCst) == 0 {
                return Handled::Dead("poison".into());
            }
            self.redelivered.notify_one();
            Handled::Done
        }

        fn now(&self) -> workflow_core::Timestamp {
            workflow_core::Timestamp(0)
        }
    }

    /// An in-process bus whose first dead letter cannot be published.
    struct DeadLetterRefusedOnce {
        inner: InProcessBus,
        refused: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl Bus for DeadLetterRefusedOnce {
        async fn publish(
            &self,
            topic: &str,
            key: &str,
            payload: Vec<u8>,
        ) -> Result<(), workflow_bus::BusError> {
            let dead_letter = topic == workflow_engine::dead_letter::DEAD_LETTER_TOPIC;
            if dead_letter && !self.refused.swap(true, Ordering::SeqCst) {
                return Err(workflow_bus::BusError::Closed);
            }
            self.inner.publish(topic, key, payload).await
        }

        async fn subscribe(
            &self,
            topic: &str,
            group: &str,
        ) -> Result<Box<dyn Subscription>, workflow_bus::BusError> {
            self.inner.subscribe(topic, group).await
        }
    }

    /// A member that stops on its own (its message could not be dead-lettered) leaves the
    /// group at once: a member still running takes its partitions and gets the message again,
    /// while the pool runs on.
    #[tokio::test]
    async fn a_member_stopping_alone_hands_its_partitions_over() {
        let bus: Arc<dyn Bus> = Arc::new(DeadLetterRefusedOnce {
            inner: InProcessBus::new(8),
            refused: std::sync::atomic::AtomicBool::new(false),
        });
        let handler = Arc::new(PoisonOnce {
            poison_seen: AtomicUsize::new(0),
            redelivered: Notify::new(),
        });
        let (members, cancel) = start(&handler, &bus, 2).await;
        bus.publish("t", "poison", vec![1])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        tokio::time::timeout(Duration::from_secs(10), handler.redelivered.notified())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "seen {} times: never delivered again",
                    handler.poison_seen.load(Ordering::SeqCst)
                )
            });
        assert!(!cancel.is_cancelled(), "the pool runs on");
        cancel.cancel();
        join_members(members, &cancel, "g").await;
    }
}
