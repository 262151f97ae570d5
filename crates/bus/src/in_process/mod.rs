//! The in-process adapter: the bus of the embedded mode, with Kafka's semantics and no broker.
//!
//! Layout, and the locks (always taken in this order, never held across an `.await`):
//! 1. `Inner::topics` (read-mostly `RwLock`): topic name -> [`Topic`], created on first use.
//! 2. `Topic::groups`: the consumer groups that ever subscribed to the topic.
//! 3. a group's state (`group.rs`): members and partition ownership.
//! 4. one partition (`partition_log.rs`): its retained messages and, per group, the committed
//!    offset and owner.
//!
//! The hot paths take one partition lock each: `publish` appends, `next` reads one message,
//! `commit` moves the group's offset and truncates. Waiting consumers sleep on their own
//! `Notify`, which `publish` pokes for the owner of the partition in every group.

mod group;
mod partition_log;
mod subscription;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;

use self::group::Group;
use self::partition_log::PartitionLog;
use self::subscription::InProcessSubscription;
use crate::sync::{lock, read, write};
use crate::{partition_for, Bus, BusError, Subscription};

/// Partitions per topic of [`InProcessBus::default`]: enough to spread work over the workers
/// of one machine while keeping per-key order.
pub const DEFAULT_PARTITIONS: u32 = 16;

/// Messages a topic keeps while no consumer group has subscribed to it, by default, spread
/// evenly over its partitions: the newest ones; older ones are dropped (Kafka's retention, in
/// miniature). A group that subscribes later reads from the oldest one kept. Per topic, not per
/// partition: at 10,000 per partition, a 128-partition runtime kept up to 1.28 million
/// lifecycle events nobody consumed (~1 KB of heap per instance, growing for hours).
pub const DEFAULT_UNCLAIMED_LIMIT: usize = 10_000;

/// An in-memory, partitioned bus with consumer groups, for the embedded mode and for tests.
///
/// Cloning it is cheap and shares the same topics. Messages live in memory until every consumer
/// group that subscribed to their topic has committed them; nothing survives the process (the
/// embedded runtime recovers in-flight work from its store).
#[derive(Clone)]
pub struct InProcessBus {
    inner: Arc<Inner>,
}

struct Inner {
    partitions: u32,
    unclaimed_limit: usize,
    closed: AtomicBool,
    topics: RwLock<HashMap<String, Arc<Topic>>>,
}

pub(crate) struct Topic {
    name: String,
    partitions: Box<[Mutex<PartitionLog>]>,
    groups: Mutex<Vec<Arc<Group>>>,
}

impl InProcessBus {
    /// A bus whose topics have `partitions` partitions each (at least 1).
    pub fn new(partitions: u32) -> Self {
        Self::with_unclaimed_limit(partitions, DEFAULT_UNCLAIMED_LIMIT)
    }

    /// [`InProcessBus::new`], keeping at most about `limit` messages of a topic no group has
    /// subscribed to yet: `limit / partitions` per partition, at least 1.
    pub fn with_unclaimed_limit(partitions: u32, limit: usize) -> Self {
        let partitions = partitions.max(1);
        let per_partition = limit / usize::try_from(partitions).unwrap_or(usize::MAX);
        Self {
            inner: Arc::new(Inner {
                partitions,
                unclaimed_limit: per_partition.max(1),
                closed: AtomicBool::new(false),
                topics: RwLock::new(HashMap::new()),
            }),
        }
    }

    /// Partitions per topic.
    pub fn partitions(&self) -> u32 {
        self.inner.partitions
    }

    /// Stop the bus: every `next()` returns `Ok(None)` (now and later), and `publish` and
    /// `subscribe` fail with [`BusError::Closed`]. Commits are still accepted. Idempotent.
    pub fn shutdown(&self) {
        // SeqCst pairs with the load in `next()` and `subscribe()`: a consumer either sees the
        // flag or is registered in time to be woken below (its Notify keeps the permit).
        self.inner.closed.store(true, Ordering::SeqCst);
        let topics: Vec<Arc<Topic>> = read(&self.inner.topics).values().cloned().collect();
        for topic in topics {
            let groups: Vec<Arc<Group>> = lock(&topic.groups).clone();
            for group in groups {
                group.wake_all();
            }
        }
    }

    /// Create consumer group `group` on `topic` (each created on first use) without a member:
    /// from now on the topic keeps every message until the group commits it, as for a group
    /// whose members subscribed and left. A runtime whose consumers subscribe in tasks of their
    /// own declares their groups first, so what it publishes before they run (commands resumed
    /// after a restart) is not cut to the unclaimed limit.
    pub fn declare_group(&self, topic: &str, group: &str) {
        self.inner.topic(topic).group(group);
    }

    /// Whether [`InProcessBus::shutdown`] was called.
    pub fn is_shut_down(&self) -> bool {
        self.inner.is_closed()
    }

    /// Messages held in memory over all topics and partitions: those some subscribed group has
    /// not committed yet, and the newest of topics no group subscribed to yet.
    pub fn retained(&self) -> usize {
        let topics: Vec<Arc<Topic>> = read(&self.inner.topics).values().cloned().collect();
        topics
            .iter()
            .flat_map(|topic| topic.partitions.iter())
            .map(|log| lock(log).retained())
            .sum()
    }
}

impl Default for InProcessBus {
    fn default() -> Self {
        Self::new(DEFAULT_PARTITIONS)
    }
}

impl fmt::Debug for InProcessBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InProcessBus")
            .field("partitions", &self.inner.partitions)
            .field("topics", &read(&self.inner.topics).len())
            .field("shut_down", &self.is_shut_down())
            .finish()
    }
}

impl Inner {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// The topic called `name`, created on first use.
    fn topic(&self, name: &str) -> Arc<Topic> {
        if let Some(topic) = read(&self.topics).get(name) {
            return Arc::clone(topic);
        }
        let mut topics = write(&self.topics);
        let topic = topics.entry(name.to_owned()).or_insert_with(|| {
            Arc::new(Topic {
                name: name.to_owned(),
                partitions: (0..self.partitions)
                    .map(|_| Mutex::new(PartitionLog::new(self.unclaimed_limit)))
                    .collect(),
                groups: Mutex::new(Vec::new()),
            })
        });
        Arc::clone(topic)
    }
}

impl Topic {
    /// The consumer group `name` on this topic, created on first use.
    fn group(&self, name: &str) -> Arc<Group> {
        let mut groups = lock(&self.groups);
        if let Some(group) = groups.iter().find(|g| g.name == name) {
            return Arc::clone(group);
        }
        let slot = groups.len();
        for log in self.partitions.iter() {
            // Each partition has one cursor per group, in the same order as `groups`.
            let added = lock(log).add_group();
            debug_assert_eq!(added, slot);
        }
        let group = Arc::new(Group::new(name, slot, self.partitions.len()));
        groups.push(Arc::clone(&group));
        group
    }
}

#[async_trait::async_trait]
impl Bus for InProcessBus {
    async fn publish(&self, topic: &str, key: &str, payload: Vec<u8>) -> Result<(), BusError> {
        if self.inner.is_closed() {
            return Err(BusError::Closed);
        }
        let topic = self.inner.topic(topic);
        let partition = partition_for(key, self.inner.partitions);
        let log =
            topic
                .partitions
                .get(partition as usize)
                .ok_or_else(|| BusError::UnknownPartition {
                    topic: topic.name.clone(),
                    partition,
                })?;
        lock(log).append(key, Bytes::from(payload));
        Ok(())
    }

    async fn subscribe(&self, topic: &str, group: &str) -> Result<Box<dyn Subscription>, BusError> {
        if self.inner.is_closed() {
            return Err(BusError::Closed);
        }
        let topic = self.inner.topic(topic);
        let group = topic.group(group);
        let subscription = InProcessSubscription::join(Arc::clone(&self.inner), topic, group);
        if self.inner.is_closed() {
            // Shut down while joining; dropping leaves the group again.
            drop(subscription);
            return Err(BusError::Closed);
        }
        Ok(Box::new(subscription))
    }
}
