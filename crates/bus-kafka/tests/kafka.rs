//! The Kafka adapter against the `Bus` contract, on a real broker (workflow-testkit starts one
//! when `KAFKA_BOOTSTRAP_SERVERS` is not set): the shared conformance suite
//! (`workflow_bus::conformance`) with the quick `range` assignor, its rebalancing tests again
//! with the adapter's default `cooperative-sticky` assignor, then what only this adapter has
//! (topic creation, routing by the cluster's partition count, `Assignment`, connection errors).
//! Every test uses its own topics and groups; every wait is bounded by `tokio::time::timeout`
//! or a polling deadline.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use tokio::time::timeout;
use workflow_bus::conformance::{Fixture, Harness, BATCH_MESSAGES};
use workflow_bus::{partition_for, Bus, Message, Subscription};
use workflow_bus_kafka::{Assignment, KafkaBus, KafkaConfig, KafkaSubscription};
use workflow_testkit::{kafka_bootstrap, unique_topic};

const DEADLINE: Duration = Duration::from_secs(30);
/// How long we watch for a message that must not come.
const QUIET: Duration = Duration::from_millis(1500);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// The assignor most tests use: eager `range` rebalances in one round, quicker than the
/// adapter's default `cooperative-sticky` (two rounds), which the rebalancing tests also cover.
const FAST_ASSIGNOR: &str = "range";
const DEFAULT_ASSIGNOR: &str = "cooperative-sticky";

/// A bus on the test cluster whose topics get `partitions` partitions, with group timings
/// small enough for quick rebalances and a producer queue smaller than the conformance batch.
async fn bus_with(partitions: u32, assignor: &str) -> Result<KafkaBus> {
    init_tracing();
    let mut config = KafkaConfig::new(kafka_bootstrap().await?)
        .with("session.timeout.ms", "4000")
        .with("heartbeat.interval.ms", "250")
        .with("max.poll.interval.ms", "20000")
        .with("topic.metadata.refresh.interval.ms", "1000")
        .with("partition.assignment.strategy", assignor)
        // A batch must meet QueueFull and wait for room, keeping its order.
        .with(
            "queue.buffering.max.messages",
            (BATCH_MESSAGES / 20).to_string(),
        );
    config.client_id = "bus-kafka-tests".into();
    config.partitions = i32::try_from(partitions)?;
    config.timeout = Duration::from_secs(20);
    Ok(KafkaBus::new(config)?)
}

/// A fresh `KafkaBus` per test, its topics and groups under a unique prefix on the shared
/// cluster; deleted when the test ends.
struct Kafka {
    assignor: &'static str,
    namespaces: std::sync::Mutex<Vec<String>>,
}

impl Kafka {
    fn new(assignor: &'static str) -> Kafka {
        Kafka {
            assignor,
            namespaces: std::sync::Mutex::default(),
        }
    }
}

#[async_trait::async_trait]
impl Harness for Kafka {
    async fn fixture(&self, partitions: u32) -> workflow_bus::conformance::Result<Fixture> {
        let bus = bus_with(partitions, self.assignor).await?;
        let stop = bus.clone();
        let namespace = format!("{}.", unique_topic("conformance"));
        self.namespaces
            .lock()
            .map_err(|_| anyhow::anyhow!("namespaces lock poisoned"))?
            .push(namespace.clone());
        Ok(Fixture::new(Arc::new(bus), partitions, namespace, move || {
            stop.shutdown()
        })
        .timing(DEADLINE, QUIET))
    }

    async fn teardown(&self) {
        let namespaces = match self.namespaces.lock() {
            Ok(mut n) => std::mem::take(&mut *n),
            Err(_) => return,
        };
        for namespace in namespaces {
            delete_run(&namespace).await;
        }
    }
}

/// Delete the topics and groups under `prefix` (a test's own), on a bus of its own: the
/// test's may be shut down. Best effort: a leftover costs the broker, not the result.
async fn delete_run(prefix: &str) {
    let Ok(bus) = bus_with(1, DEFAULT_ASSIGNOR).await else {
        return;
    };
    if let Err(e) = bus.delete_prefixed(prefix).await {
        tracing::warn!(error = %e, prefix, "cannot delete the test's topics");
    }
    bus.shutdown();
}

mod conformance {
    workflow_bus::bus_conformance_tests!(super::Kafka::new(super::FAST_ASSIGNOR));
}

/// The tests that rebalance, with the adapter's default (incremental) assignor.
mod cooperative_sticky {
    workflow_bus::bus_conformance_tests!(
        super::Kafka::new(super::DEFAULT_ASSIGNOR);
        members_of_a_group_share_partitions_and_keep_per_key_order,
        uncommitted_messages_go_to_the_remaining_member_when_one_drops,
        a_join_and_a_leave_move_partitions_cleanly,
        no_message_is_lost_while_a_member_joins,
    );
}

async fn next(sub: &mut (impl Subscription + ?Sized)) -> Result<Message> {
    timeout(DEADLINE, sub.next())
        .await
        .context("no message before the deadline")??
        .ok_or_else(|| anyhow!("bus shut down"))
}

/// Whether the members' assignments are disjoint, non-empty and cover `0..partitions`.
fn split(assignments: &[&Assignment], partitions: u32) -> bool {
    let mut all = BTreeSet::new();
    for a in assignments {
        let mine = a.partitions();
        if mine.is_empty() {
            return false;
        }
        for p in mine {
            if !all.insert(p) {
                return false;
            }
        }
    }
    all == (0..partitions).collect()
}

/// Poll `members` (a rebalance only progresses while they are polled) until `done` holds or
/// the deadline passes; they must receive nothing meanwhile.
async fn settle(members: &mut [&mut KafkaSubscription], done: impl Fn() -> bool) -> Result<()> {
    let started = Instant::now();
    while !done() {
        ensure!(
            started.elapsed() < DEADLINE,
            "the group did not settle within {DEADLINE:?}"
        );
        for sub in members.iter_mut() {
            if let Ok(got) = timeout(Duration::from_millis(50), sub.next()).await {
                bail!("a message arrived while the group settled: {:?}", got?);
            }
        }
    }
    Ok(())
}

/// `KafkaSubscription::assignment` shows each member's share: after a join, the two members
/// own disjoint sets covering the topic, and both went through a rebalance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_assignment_shows_each_members_share_after_a_join() -> Result<()> {
    const PARTITIONS: u32 = 4;
    let bus = bus_with(PARTITIONS, DEFAULT_ASSIGNOR).await?;
    let topic = unique_topic("assignment");
    let group = unique_topic("workers");
    let mut a = bus.subscribe_member(&topic, &group).await?;
    let a_assigned = a.assignment();
    ensure!(a_assigned.rebalances() == 0 && a_assigned.partitions().is_empty());
    settle(&mut [&mut a], || split(&[&a_assigned], PARTITIONS)).await?;
    let a_before = a_assigned.rebalances();

    let mut b = bus.subscribe_member(&topic, &group).await?;
    let b_assigned = b.assignment();
    ensure!(a.topic() == topic && b.group() == group);
    settle(&mut [&mut a, &mut b], || {
        split(&[&a_assigned, &b_assigned], PARTITIONS)
    })
    .await?;
    ensure!(a_assigned.rebalances() > a_before && b_assigned.rebalances() > 0);

    // The cluster reports the settled group as `Stable` with both members (how the bench
    // waits for a deployment's pools before measuring).
    let started = Instant::now();
    loop {
        let groups = bus.consumer_groups().await?;
        match groups.get(&group) {
            Some(g) if g.state == "Stable" && g.members == 2 => break,
            other => ensure!(
                started.elapsed() < DEADLINE,
                "group {group} still {other:?} after {DEADLINE:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop((a, b));
    delete_run(&topic).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_topics_is_idempotent_and_routing_follows_the_real_partition_count() -> Result<()> {
    let bus = bus_with(5, FAST_ASSIGNOR).await?;
    let (t1, t2) = (unique_topic("ensure"), unique_topic("ensure"));
    bus.ensure_topics(&[&t1, &t2, &t1]).await?;
    bus.ensure_topics(&[&t1, &t2]).await?;
    bus.ensure_topics(&[]).await?;
    ensure!(bus.partitions(&t1).await? == 5);
    ensure!(bus.partitions(&t2).await? == 5);
    let existing = bus.existing_topics().await?;
    ensure!(existing.get(&t1) == Some(&5) && existing.get(&t2) == Some(&5));

    // Another bus configured with 3 partitions leaves the topic as it is, and routes keys by
    // the topic's real partition count.
    let mut config = bus.config().clone();
    config.partitions = 3;
    let other = KafkaBus::new(config)?;
    other.ensure_topics(&[&t1]).await?;
    ensure!(other.partitions(&t1).await? == 5);
    let mut sub = bus.subscribe_member(&t1, &unique_topic("g")).await?;
    for i in 0..20 {
        let key = format!("instance-{i}");
        other
            .publish(&t1, &key, format!("{key}:0").into_bytes())
            .await?;
    }
    for _ in 0..20 {
        let msg = next(&mut sub).await?;
        ensure!(msg.partition == partition_for(&msg.key, 5), "{msg:?}");
    }

    // Deleting removes them from the cluster; names already gone are not an error.
    drop(sub);
    bus.delete(&[&t1, &t2], &[]).await?;
    let started = Instant::now();
    loop {
        let existing = bus.existing_topics().await?;
        if !existing.contains_key(&t1) && !existing.contains_key(&t2) {
            break;
        }
        ensure!(
            started.elapsed() < DEADLINE,
            "topics still listed after {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bus.delete(&[&t1], &[&unique_topic("no-such-group")])
        .await?;

    // By prefix: a run's topics and groups go, another run's stay.
    let (run, other_run) = (unique_topic("run"), unique_topic("run"));
    let (mine, theirs) = (format!("{run}.steps"), format!("{other_run}.steps"));
    bus.ensure_topics(&[&mine, &theirs]).await?;
    let group = format!("{run}.pool");
    let mut sub = bus.subscribe_member(&mine, &group).await?;
    bus.publish(&mine, "k", b"m".to_vec()).await?;
    let msg = next(&mut sub).await?;
    sub.commit(&msg).await?;
    drop(sub);
    let started = Instant::now();
    loop {
        // The group is deletable once its member has left.
        match bus.delete_prefixed(&run).await {
            Ok(()) => break,
            Err(e) => ensure!(started.elapsed() < DEADLINE, "still not deleted: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let started = Instant::now();
    loop {
        let existing = bus.existing_topics().await?;
        let groups = bus.consumer_groups().await?;
        ensure!(
            existing.contains_key(&theirs),
            "another prefix's topic was deleted"
        );
        if !existing.contains_key(&mine) && !groups.contains_key(&group) {
            break;
        }
        ensure!(
            started.elapsed() < DEADLINE,
            "{mine} or {group} still listed after {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bus.delete(&[&theirs], &[]).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_cluster_is_a_retryable_error() -> Result<()> {
    init_tracing();
    // Nothing listens on port 1.
    let mut config = KafkaConfig::new("127.0.0.1:1");
    config.timeout = Duration::from_secs(2);
    let bus = KafkaBus::new(config)?;
    let started = Instant::now();
    let published = timeout(DEADLINE, bus.publish("t", "instance-1", b"x".to_vec())).await?;
    ensure!(
        matches!(&published, Err(e) if e.is_retryable()),
        "got {published:?}"
    );
    let ensured = timeout(DEADLINE, bus.ensure_topics(&["t"])).await?;
    ensure!(
        matches!(&ensured, Err(e) if e.is_retryable()),
        "got {ensured:?}"
    );
    ensure!(
        started.elapsed() < Duration::from_secs(15),
        "bounded by the timeout"
    );
    Ok(())
}

/// A topic's first batch keeps each key's order, published the moment the topic exists.
/// Kafka before 4.5 (KAFKA-15591) accepts an idempotent producer's second request to a
/// partition whose leader is not yet hosting it while the first was refused, so the first
/// request's messages land after it: the bus waits until every partition's leader answers.
/// A race, so a guard by numbers: without that wait this failed in 4 of 13 runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_topics_first_batch_keeps_each_keys_order() -> Result<()> {
    const PARTITIONS: u32 = 6;
    const TOPICS: usize = 12;
    const KEYS: u32 = 24;
    const PER_KEY: u32 = 50;
    let bus = bus_with(PARTITIONS, FAST_ASSIGNOR).await?;
    let run = unique_topic("fresh");
    let topics: Vec<String> = (0..TOPICS).map(|i| format!("{run}.t{i}")).collect();
    let mut batch = Vec::new();
    for seq in 0..PER_KEY {
        for topic in &topics {
            for k in 0..KEYS {
                let key = format!("instance-{k}");
                batch.push(workflow_bus::Outgoing {
                    topic: topic.clone(),
                    payload: format!("{seq}").into_bytes(),
                    key,
                });
            }
        }
    }
    // The bus creates each topic on its first message, then enqueues the rest at once.
    bus.publish_batch(batch).await?;
    for topic in &topics {
        let mut sub = bus
            .subscribe_member(topic, &format!("{topic}.reader"))
            .await?;
        let mut last: std::collections::HashMap<String, u32> = Default::default();
        for _ in 0..KEYS * PER_KEY {
            let msg = next(&mut sub).await?;
            let seq: u32 = std::str::from_utf8(&msg.payload)?.parse()?;
            let expected = last.get(&msg.key).map_or(0, |prev| prev + 1);
            ensure!(
                seq == expected,
                "{topic}/{}: got {seq} after {:?}",
                msg.key,
                last.get(&msg.key)
            );
            last.insert(msg.key.clone(), seq);
        }
    }
    delete_run(&run).await;
    Ok(())
}

/// `KafkaBus::lag`: the messages a group has not committed; a partition it never committed
/// counts from its earliest message, and a commit covers the partition's earlier messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_counts_what_a_group_has_not_committed() -> Result<()> {
    let bus = bus_with(3, FAST_ASSIGNOR).await?;
    let (topic, group) = (unique_topic("lag"), unique_topic("g"));
    bus.ensure_topics(&[&topic]).await?;
    ensure!(bus.lag(&topic, &group).await? == 0, "an empty topic");
    for i in 0..6 {
        bus.publish(&topic, &format!("instance-{i}"), vec![1])
            .await?;
    }
    ensure!(
        bus.lag(&topic, &group).await? == 6,
        "a group that never committed"
    );

    let mut sub = bus.subscribe_member(&topic, &group).await?;
    let mut got = Vec::new();
    for _ in 0..6 {
        got.push(next(&mut sub).await?);
    }
    // The second message of a partition commits its first too.
    let second = got
        .iter()
        .find(|m| m.offset == 1)
        .context("6 keys on 3 partitions put two messages on one")?
        .clone();
    sub.commit(&second).await?;
    lag_becomes(&bus, &topic, &group, 4).await?;
    for msg in &got {
        sub.commit(msg).await?;
    }
    lag_becomes(&bus, &topic, &group, 0).await
}

/// Poll `lag` until it is `expected` (offset commits reach the coordinator asynchronously).
async fn lag_becomes(bus: &KafkaBus, topic: &str, group: &str, expected: u64) -> Result<()> {
    let started = Instant::now();
    loop {
        let lag = bus.lag(topic, group).await?;
        if lag == expected {
            return Ok(());
        }
        ensure!(
            started.elapsed() < DEADLINE,
            "lag {lag}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
