//! The in-process adapter against the `Bus` contract: the shared conformance suite
//! (`workflow_bus::conformance`), then what only this adapter promises (memory held until every
//! group committed, the range assignor in join order, exact commit errors, commits after
//! shutdown). Every wait is bounded by `tokio::time::timeout`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use tokio::time::timeout;
use workflow_bus::conformance::{Fixture, Harness};
use workflow_bus::{partition_for, Bus, BusError, InProcessBus, Message, Subscription};

const DEADLINE: Duration = Duration::from_secs(20);
/// How long we watch for a message that must not come.
const QUIET: Duration = Duration::from_millis(150);

/// A fresh in-process bus per test: nothing is shared, so no namespace is needed.
struct InProcess;

#[async_trait::async_trait]
impl Harness for InProcess {
    async fn fixture(&self, partitions: u32) -> workflow_bus::conformance::Result<Fixture> {
        let bus = InProcessBus::new(partitions);
        let stop = bus.clone();
        Ok(
            Fixture::new(Arc::new(bus), partitions, "", move || stop.shutdown())
                .timing(DEADLINE, QUIET),
        )
    }
}

mod conformance {
    workflow_bus::bus_conformance_tests!(super::InProcess);
}

async fn next(sub: &mut Box<dyn Subscription>) -> Result<Message> {
    timeout(DEADLINE, sub.next())
        .await
        .context("no message before the deadline")??
        .ok_or_else(|| anyhow!("bus shut down"))
}

fn seq(msg: &Message) -> Result<u32> {
    let text = std::str::from_utf8(&msg.payload)?;
    let (_, seq) = text.split_once(':').context("payload is key:seq")?;
    Ok(seq.parse()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_is_reclaimed_once_every_group_committed() -> Result<()> {
    let bus = InProcessBus::new(4);
    // Published before anyone subscribed: kept for the first group.
    for i in 0..10 {
        bus.publish("cmd", "instance-1", format!("instance-1:{i}").into_bytes())
            .await?;
    }
    ensure!(bus.retained() == 10);

    let mut fast = bus.subscribe("cmd", "fast").await?;
    let mut slow = bus.subscribe("cmd", "slow").await?;
    let mut fast_msgs = Vec::new();
    for _ in 0..10 {
        fast_msgs.push(next(&mut fast).await?);
    }
    fast.commit(&fast_msgs[9]).await?;
    ensure!(bus.retained() == 10, "slow has committed nothing yet");

    let mut slow_msgs = Vec::new();
    for _ in 0..10 {
        slow_msgs.push(next(&mut slow).await?);
    }
    slow.commit(&slow_msgs[3]).await?;
    ensure!(bus.retained() == 6, "retained {}", bus.retained());
    // An older commit changes nothing.
    slow.commit(&slow_msgs[1]).await?;
    ensure!(bus.retained() == 6);
    slow.commit(&slow_msgs[9]).await?;
    ensure!(bus.retained() == 0);

    // Once every group committed, the messages are gone: a group that joins later starts at
    // the earliest message still held.
    bus.publish("cmd", "instance-1", b"instance-1:10".to_vec())
        .await?;
    let mut late = bus.subscribe("cmd", "late").await?;
    let first = next(&mut late).await?;
    ensure!(first.offset == 10 && seq(&first)? == 10, "got {first:?}");
    Ok(())
}

/// A topic nobody subscribed to keeps only its newest messages (else lifecycle events nobody
/// consumes would grow for as long as the process runs); once a group subscribes, nothing
/// it has not committed is dropped, however many.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_without_groups_keeps_only_its_newest_messages() -> Result<()> {
    let bus = InProcessBus::with_unclaimed_limit(1, 8);
    let publish = |range: std::ops::Range<u32>| {
        let bus = bus.clone();
        async move {
            for i in range {
                let payload = format!("instance-1:{i}").into_bytes();
                bus.publish("events", "instance-1", payload).await?;
            }
            anyhow::Ok(())
        }
    };
    publish(0..20).await?;
    ensure!(bus.retained() == 8, "retained {}", bus.retained());
    let mut sub = bus.subscribe("events", "late").await?;
    let first = next(&mut sub).await?;
    ensure!(first.offset == 12 && seq(&first)? == 12, "got {first:?}");

    // Claimed now: the limit no longer applies.
    publish(20..40).await?;
    ensure!(bus.retained() == 28, "retained {}", bus.retained());
    let mut last = first;
    for _ in 13..40 {
        last = next(&mut sub).await?;
    }
    ensure!(seq(&last)? == 39, "got {last:?}");
    sub.commit(&last).await?;
    ensure!(bus.retained() == 0, "retained {}", bus.retained());
    Ok(())
}

/// The unclaimed limit is the topic's, spread over its partitions (at least one message each):
/// more partitions do not multiply what a topic nobody consumes holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unclaimed_limit_is_per_topic_whatever_the_partitions() -> Result<()> {
    for (partitions, kept) in [(1, 64), (4, 64), (128, 128)] {
        let bus = InProcessBus::with_unclaimed_limit(partitions, 64);
        // Enough keys that every partition gets more than its share.
        for i in 0..4_000u32 {
            let key = format!("instance-{i}");
            bus.publish("events", &key, key.clone().into_bytes())
                .await?;
        }
        let retained = bus.retained();
        ensure!(retained == kept, "{partitions} partitions kept {retained}");
    }
    Ok(())
}

/// A group declared before any member subscribes holds the topic's messages for it, past the
/// unclaimed limit: its first member reads them all, from the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_group_keeps_every_message_for_its_first_member() -> Result<()> {
    let bus = InProcessBus::with_unclaimed_limit(1, 8);
    bus.declare_group("cmd", "workers");
    bus.declare_group("cmd", "workers");
    for i in 0..20u32 {
        bus.publish("cmd", "instance-1", format!("instance-1:{i}").into_bytes())
            .await?;
    }
    ensure!(bus.retained() == 20, "retained {}", bus.retained());
    let mut sub = bus.subscribe("cmd", "workers").await?;
    for i in 0..20u32 {
        let got = next(&mut sub).await?;
        ensure!(got.offset == u64::from(i) && seq(&got)? == i, "got {got:?}");
    }
    Ok(())
}

/// Range assignment over the members in join order: the member that joins second takes the
/// upper half of the partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_second_member_takes_the_upper_half_of_the_partitions() -> Result<()> {
    const PARTITIONS: u32 = 8;
    let bus = InProcessBus::new(PARTITIONS);
    let mut a = bus.subscribe("cmd", "workers").await?;
    let mut b = bus.subscribe("cmd", "workers").await?;
    let mut keys = BTreeSet::new();
    for i in 0.. {
        let key = format!("instance-{i}");
        if keys.insert(partition_for(&key, PARTITIONS)) {
            bus.publish("cmd", &key, format!("{key}:0").into_bytes())
                .await?;
        }
        if keys.len() == PARTITIONS as usize {
            break;
        }
    }
    for (sub, expected) in [
        (&mut a, 0..PARTITIONS / 2),
        (&mut b, PARTITIONS / 2..PARTITIONS),
    ] {
        let mut got = BTreeSet::new();
        for _ in expected.clone() {
            got.insert(next(sub).await?.partition);
        }
        ensure!(got == expected.clone().collect(), "got partitions {got:?}");
        ensure!(
            timeout(QUIET, sub.next()).await.is_err(),
            "one message per partition"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_commit_on_a_partition_the_topic_lacks_is_unknown_partition() -> Result<()> {
    let bus = InProcessBus::new(2);
    let mut sub = bus.subscribe("cmd", "workers").await?;
    bus.publish("cmd", "instance-1", b"instance-1:0".to_vec())
        .await?;
    let mut msg = next(&mut sub).await?;
    msg.partition = 7;
    let result = sub.commit(&msg).await;
    ensure!(
        matches!(result, Err(BusError::UnknownPartition { partition: 7, .. })),
        "got {result:?}"
    );
    Ok(())
}

#[tokio::test]
async fn commits_are_still_accepted_after_shutdown() -> Result<()> {
    let bus = InProcessBus::new(2);
    let mut sub = bus.subscribe("cmd", "workers").await?;
    bus.publish("cmd", "instance-1", b"instance-1:0".to_vec())
        .await?;
    let msg = next(&mut sub).await?;
    bus.shutdown();
    bus.shutdown();
    ensure!(bus.is_shut_down());
    sub.commit(&msg).await?;
    ensure!(bus.retained() == 0, "the commit took effect");
    Ok(())
}
