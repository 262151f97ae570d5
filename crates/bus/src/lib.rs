//! The message bus of the workflow engine, shaped like Kafka.
//!
//! Every command the runtime exchanges (triggers, approvals, next steps, timer firings) travels
//! through the [`Bus`] trait: a message goes to a *topic*, is keyed by the workflow *instance id*,
//! and lands on the partition [`partition_for`] picks for that key. Consumers join a *consumer
//! group* with [`Bus::subscribe`]; the members of a group share the topic's partitions, and each
//! group sees every message. Delivery is at-least-once: a consumer calls
//! [`Subscription::commit`] after the effects of a message are durable, and whatever it has not
//! committed is redelivered to the next owner of the partition.
//!
//! # What this crate owns
//! - The [`Bus`] / [`Subscription`] contract that the embedded runtime and the distributed
//!   services program against, and its error type [`BusError`].
//! - The partitioner ([`partition_for`], Kafka's murmur2), so both adapters route a key the same way.
//! - [`InProcessBus`]: the adapter of the embedded mode (one process, no broker). It behaves like
//!   the Kafka topics: same keys, same per-key order, same consumer-group semantics.
//!
//! - With the `conformance` feature (tests only), [`conformance`]: the contract tests every
//!   adapter runs, so the contract is written once.
//!
//! The Kafka adapter (rdkafka) is another implementation of the same trait; nothing that uses
//! the bus may depend on which adapter it has.
//!
//! # What it must never do
//! - Know what a payload means: payloads are opaque bytes; encoding (Avro, JSON) is the caller's.
//! - Break per-key order: one key always maps to one partition, and a partition is consumed by
//!   one member of a group at a time, in offset order.
//! - Lose a message it accepted before a consumer committed it, or commit on a consumer's behalf.
//! - Block the async runtime: no lock is held across an `.await`, no blocking sleeps.
//! - Panic on bad input from callers: every failure is a [`BusError`].

#[cfg(feature = "conformance")]
pub mod conformance;
mod error;
mod in_process;
mod naming;
mod partitioner;
mod sync;

pub use bytes::Bytes;
pub use error::BusError;
pub use in_process::{InProcessBus, DEFAULT_PARTITIONS, DEFAULT_UNCLAIMED_LIMIT};
pub use naming::{NamedBus, Naming};
pub use partitioner::{murmur2, partition_for};

/// One message read from a topic.
///
/// `payload` is a [`Bytes`]: cloning a message (for example to hand it to a worker task) shares
/// the payload instead of copying it. It dereferences to `&[u8]`, so decoders take `&msg.payload`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The topic the message was published to.
    pub topic: String,
    /// The partition of `topic` that holds it: `partition_for(&key, partitions)`.
    pub partition: u32,
    /// Its position in the partition; offsets increase by one per message, from 0.
    pub offset: u64,
    /// The partition key: the workflow instance id.
    pub key: String,
    /// The opaque encoded command.
    pub payload: Bytes,
}

/// One message to publish with [`Bus::publish_batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub topic: String,
    /// The partition key: the workflow instance id.
    pub key: String,
    pub payload: Vec<u8>,
}

/// A Kafka-shaped message bus: topics, keys, partitions, consumer groups, explicit commits.
#[async_trait::async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Append `payload` to the partition of `topic` chosen by [`partition_for`]`(key, ..)`.
    ///
    /// Messages published with the same key, one after the other, are consumed in that order.
    /// The topic is created on first use.
    async fn publish(&self, topic: &str, key: &str, payload: Vec<u8>) -> Result<(), BusError>;

    /// Publish `batch` in order: messages with the same key keep the batch's order. Returns once
    /// every message is acknowledged; on an error some may have been published (at-least-once:
    /// the caller publishes the whole batch again). Adapters with a pipelined producer override
    /// this to have the whole batch in flight at once.
    async fn publish_batch(&self, batch: Vec<Outgoing>) -> Result<(), BusError> {
        for m in batch {
            self.publish(&m.topic, &m.key, m.payload).await?;
        }
        Ok(())
    }

    /// Join consumer group `group` on `topic`. Members of one group share the topic's partitions
    /// (each partition to exactly one member; rebalanced when members join/leave); different
    /// groups each see every message.
    ///
    /// A group that is new to the topic starts at the earliest message the topic still holds.
    async fn subscribe(&self, topic: &str, group: &str) -> Result<Box<dyn Subscription>, BusError>;
}

/// One member of a consumer group. Dropping it leaves the group.
#[async_trait::async_trait]
pub trait Subscription: Send {
    /// Next message from the assigned partitions, in offset order per partition. Waits when there
    /// is none; `Ok(None)` after the bus is shut down.
    ///
    /// Cancel-safe: dropping the future before it completes loses no message (the pools race
    /// it against a commit timer).
    async fn next(&mut self) -> Result<Option<Message>, BusError>;

    /// Mark this message (and everything before it in its partition) processed. Uncommitted
    /// messages are redelivered to whoever owns the partition after a rebalance or when this
    /// subscription is dropped.
    ///
    /// Fails with [`BusError::NotAssigned`] when a rebalance moved the partition to another
    /// member meanwhile: that member gets the message again, so the caller drops it.
    async fn commit(&mut self, msg: &Message) -> Result<(), BusError>;
}
