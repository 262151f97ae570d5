//! One member of a consumer group: a `StreamConsumer` of its own, explicit commits, and a
//! context that logs (and remembers) what the group assigned to it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::watch;
use workflow_bus::{BusError, Bytes, Message, Subscription};

use crate::error::{from_kafka, is_lost_assignment, is_transient, is_unknown};
use crate::LogContext;

/// What the group gave one member, as the member saw it at its last rebalance. Cheap to clone;
/// shared with the consumer's context, which updates it.
#[derive(Debug, Clone, Default)]
pub struct Assignment {
    state: Arc<Mutex<AssignmentState>>,
}

#[derive(Debug, Default)]
struct AssignmentState {
    /// The partitions of the subscribed topic this member owns.
    partitions: BTreeSet<u32>,
    /// Per owned partition: the offset this member last committed (the next one to read).
    committed: BTreeMap<u32, u64>,
    /// Per partition: the highest offset this member was handed by `next()`.
    delivered: BTreeMap<u32, u64>,
    /// How many rebalances this member went through.
    generation: u64,
    /// Per owned partition: a commit the coordinator refused while a rebalance was in progress
    /// although this member kept the partition (an incremental rebalance moves only some). It
    /// is made again before the next message is taken; a revoke drops it (the new owner then
    /// gets the messages again, as for any uncommitted message).
    owed: BTreeMap<u32, u64>,
}

impl Assignment {
    /// The partitions currently assigned to the member, in order.
    pub fn partitions(&self) -> Vec<u32> {
        self.lock().partitions.iter().copied().collect()
    }

    /// How many assignment changes the member has seen (0 before it joined the group).
    pub fn rebalances(&self) -> u64 {
        self.lock().generation
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AssignmentState> {
        // The state is plain data that every writer leaves consistent: a panic elsewhere
        // cannot leave it half-updated, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The consumer's context: logs through `tracing`, logs every rebalance, keeps [`Assignment`].
pub(crate) struct GroupContext {
    pub(crate) log: LogContext,
    pub(crate) topic: String,
    pub(crate) group: String,
    pub(crate) assignment: Assignment,
}

impl ClientContext for GroupContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.log.log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.log.error(error, reason);
    }
}

fn partitions_of(tpl: &TopicPartitionList, topic: &str) -> Vec<u32> {
    tpl.elements_for_topic(topic)
        .iter()
        .filter_map(|e| u32::try_from(e.partition()).ok())
        .collect()
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => tracing::info!(
                topic = %self.topic, group = %self.group, client = %self.log.name,
                partitions = ?partitions_of(tpl, &self.topic),
                "partitions assigned"
            ),
            Rebalance::Revoke(tpl) => tracing::info!(
                topic = %self.topic, group = %self.group, client = %self.log.name,
                partitions = ?partitions_of(tpl, &self.topic),
                "partitions revoked; their uncommitted messages go to the next owner"
            ),
            Rebalance::Error(e) => tracing::warn!(
                topic = %self.topic, group = %self.group, client = %self.log.name,
                error = %e, "rebalance failed"
            ),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, _rebalance: &Rebalance<'_>) {
        // Whatever the protocol (eager or cooperative), read back what librdkafka now assigns.
        let now: BTreeSet<u32> = match consumer.assignment() {
            Ok(tpl) => partitions_of(&tpl, &self.topic).into_iter().collect(),
            // Closing: the final revoke runs while the handle is being destroyed, and it
            // leaves nothing assigned either way.
            Err(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::BrokerDestroy) => {
                BTreeSet::new()
            }
            Err(e) => {
                tracing::warn!(topic = %self.topic, error = %e, "reading the assignment");
                BTreeSet::new()
            }
        };
        let mut state = self.assignment.lock();
        state.committed.retain(|p, _| now.contains(p));
        state.owed.retain(|p, _| now.contains(p));
        state.partitions = now;
        state.generation += 1;
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::warn!(
                topic = %self.topic, group = %self.group, error = %e,
                partitions = ?partitions_of(offsets, &self.topic),
                "offset commit failed; the messages will be delivered again"
            );
        }
    }
}

/// A member of a consumer group on one topic. Dropping it leaves the group (the consumer is
/// closed on a blocking thread), which hands its partitions to the remaining members.
pub struct KafkaSubscription {
    pub(crate) consumer: Arc<StreamConsumer<GroupContext>>,
    pub(crate) topic: String,
    pub(crate) group: String,
    pub(crate) assignment: Assignment,
    pub(crate) shutdown: watch::Receiver<bool>,
}

impl std::fmt::Debug for KafkaSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSubscription")
            .field("topic", &self.topic)
            .field("group", &self.group)
            .field("assignment", &self.assignment.partitions())
            .finish()
    }
}

impl KafkaSubscription {
    /// The topic this member consumes.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The consumer group it belongs to.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// A handle on its current assignment. Rebalances are processed while [`Subscription::next`]
    /// is being awaited, so the assignment only changes while the member is polled.
    pub fn assignment(&self) -> Assignment {
        self.assignment.clone()
    }

    fn convert(&self, msg: &BorrowedMessage<'_>) -> Result<Message, BusError> {
        let partition = u32::try_from(msg.partition()).map_err(|_| BusError::Backend {
            reason: format!(
                "message with partition {} on {}",
                msg.partition(),
                msg.topic()
            ),
        })?;
        let offset = u64::try_from(msg.offset()).map_err(|_| BusError::Backend {
            reason: format!("message with offset {} on {}", msg.offset(), msg.topic()),
        })?;
        // Keys are instance ids (UTF-8); a foreign producer's binary key is kept readable.
        let key = msg
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .unwrap_or_default();
        Ok(Message {
            topic: msg.topic().to_owned(),
            partition,
            offset,
            key,
            payload: Bytes::copy_from_slice(msg.payload().unwrap_or_default()),
        })
    }
}

/// Resolves when the bus is shut down; never if the bus itself is gone.
async fn shut_down(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|down| *down).await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[async_trait::async_trait]
impl Subscription for KafkaSubscription {
    async fn next(&mut self) -> Result<Option<Message>, BusError> {
        self.pay_owed_commits().await;
        loop {
            if *self.shutdown.borrow() {
                return Ok(None);
            }
            let received = tokio::select! {
                biased;
                () = shut_down(&mut self.shutdown) => return Ok(None),
                received = self.consumer.recv() => match received {
                    Ok(msg) => Ok(self.convert(&msg)?),
                    Err(e) => Err(e),
                },
            };
            match received {
                Ok(msg) => {
                    let mut state = self.assignment.lock();
                    let highest = state.delivered.entry(msg.partition).or_insert(msg.offset);
                    *highest = (*highest).max(msg.offset);
                    return Ok(Some(msg));
                }
                // librdkafka reconnects, re-elects and re-fetches by itself: while the cluster
                // is away, waiting for the next message is all a member can do.
                // "Subscribed topic not available" right after the topic was created, until
                // the consumer's metadata catches up (or for as long as the topic is missing).
                Err(e)
                    if e.rdkafka_error_code()
                        .is_some_and(|c| is_transient(c) || is_unknown(c)) =>
                {
                    tracing::warn!(topic = %self.topic, group = %self.group, error = %e,
                        "consumer error; librdkafka retries");
                }
                Err(KafkaError::PartitionEOF(_)) => {}
                Err(e) => {
                    return Err(from_kafka(
                        &e,
                        &format!("consuming {} as {}", self.topic, self.group),
                    ))
                }
            }
        }
    }

    async fn commit(&mut self, msg: &Message) -> Result<(), BusError> {
        if msg.topic != self.topic {
            return Err(BusError::UnknownTopic {
                topic: msg.topic.clone(),
            });
        }
        let not_assigned = || BusError::NotAssigned {
            topic: msg.topic.clone(),
            partition: msg.partition,
        };
        let next = {
            let state = self.assignment.lock();
            if !state.partitions.contains(&msg.partition) {
                return Err(not_assigned());
            }
            match state.delivered.get(&msg.partition) {
                Some(highest) if msg.offset <= *highest => {}
                _ => {
                    return Err(BusError::OffsetOutOfRange {
                        topic: msg.topic.clone(),
                        partition: msg.partition,
                        offset: msg.offset,
                    })
                }
            }
            let next = msg.offset.saturating_add(1);
            // Commits never move backwards (a late commit of an earlier message is a no-op).
            if state
                .committed
                .get(&msg.partition)
                .is_some_and(|c| *c >= next)
            {
                return Ok(());
            }
            next
        };
        let partition = i32::try_from(msg.partition).map_err(|_| not_assigned())?;
        let offset = i64::try_from(next).map_err(|_| BusError::OffsetOutOfRange {
            topic: msg.topic.clone(),
            partition: msg.partition,
            offset: msg.offset,
        })?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, partition, Offset::Offset(offset))
            .map_err(|e| from_kafka(&e, "building a commit"))?;
        // A synchronous commit waits for the coordinator's answer on its own reply queue (no
        // polling of this consumer needed); it blocks, so it runs on a blocking thread.
        let consumer = Arc::clone(&self.consumer);
        let result = tokio::task::spawn_blocking(move || consumer.commit(&tpl, CommitMode::Sync))
            .await
            .map_err(|e| BusError::Backend {
                reason: format!("commit task failed: {e}"),
            })?;
        match result {
            Ok(()) => {
                let mut state = self.assignment.lock();
                // Only if the partition is still ours: a revoke meanwhile cleared the entry.
                if state.partitions.contains(&msg.partition) {
                    let committed = state.committed.entry(msg.partition).or_insert(next);
                    *committed = (*committed).max(next);
                }
                Ok(())
            }
            Err(e) if e.rdkafka_error_code().is_some_and(is_lost_assignment) => {
                let mut state = self.assignment.lock();
                if state.partitions.contains(&msg.partition) {
                    // Refused mid-rebalance, but the partition stays ours: the message is done
                    // here and nobody else will get it, so the commit is owed, not dropped.
                    tracing::info!(topic = %self.topic, group = %self.group,
                        partition = msg.partition, error = %e, "commit refused during a rebalance; owed");
                    let owed = state.owed.entry(msg.partition).or_insert(next);
                    *owed = (*owed).max(next);
                    return Ok(());
                }
                tracing::info!(topic = %self.topic, group = %self.group,
                    partition = msg.partition, error = %e, "commit after the partition moved");
                Err(not_assigned())
            }
            Err(e) => Err(from_kafka(
                &e,
                &format!(
                    "committing offset {next} of {}/{} for {}",
                    self.topic, msg.partition, self.group
                ),
            )),
        }
    }
}

impl KafkaSubscription {
    /// Make the commits owed since a rebalance (see `AssignmentState::owed`), for the
    /// partitions still owned. One still refused stays owed; the rest are forgotten once made.
    async fn pay_owed_commits(&mut self) {
        let owed: Vec<(u32, u64)> = {
            let mut state = self.assignment.lock();
            if state.owed.is_empty() {
                return;
            }
            // Copied, not taken: `next()` may be cancelled while the commit is in flight.
            let AssignmentState {
                partitions,
                committed,
                owed,
                ..
            } = &mut *state;
            owed.retain(|p, next| {
                partitions.contains(p) && committed.get(p).is_none_or(|c| c < next)
            });
            owed.iter().map(|(p, next)| (*p, *next)).collect()
        };
        let mut tpl = TopicPartitionList::new();
        for (partition, next) in &owed {
            let (Ok(partition), Ok(offset)) = (i32::try_from(*partition), i64::try_from(*next))
            else {
                continue;
            };
            if tpl
                .add_partition_offset(&self.topic, partition, Offset::Offset(offset))
                .is_err()
            {
                continue;
            }
        }
        let consumer = Arc::clone(&self.consumer);
        let result =
            tokio::task::spawn_blocking(move || consumer.commit(&tpl, CommitMode::Sync)).await;
        let mut state = self.assignment.lock();
        match result {
            Ok(Ok(())) => {
                for (partition, next) in owed {
                    if state.partitions.contains(&partition) {
                        let committed = state.committed.entry(partition).or_insert(next);
                        *committed = (*committed).max(next);
                    }
                    if state.owed.get(&partition).is_some_and(|o| *o <= next) {
                        state.owed.remove(&partition);
                    }
                }
            }
            failed => {
                tracing::info!(topic = %self.topic, group = %self.group, result = ?failed.map(|r| r.err()),
                    "owed commit refused again; kept for the next call");
            }
        }
    }
}

impl Drop for KafkaSubscription {
    fn drop(&mut self) {
        // Closing the consumer (leave the group, wait for the final rebalance) blocks: do it on
        // a blocking thread when there is a runtime, inline otherwise.
        let consumer = Arc::clone(&self.consumer);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn_blocking(move || drop(consumer));
        }
    }
}
