//! The Kafka adapter against the `Bus` contract, on a real broker (workflow-testkit starts one
//! when `KAFKA_BOOTSTRAP_SERVERS` is not set). Every test uses its own topics and groups; every
//! wait is bounded by `tokio::time::timeout` or a polling deadline.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use workflow_bus::{partition_for, Bus, BusError, Message, Outgoing, Subscription};
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
/// adapter's default `cooperative-sticky` (two rounds), which the rebalance tests also cover.
const FAST_ASSIGNOR: &str = "range";
const DEFAULT_ASSIGNOR: &str = "cooperative-sticky";

/// A bus on the test cluster whose topics get `partitions` partitions, with group timings
/// small enough for quick rebalances.
async fn bus(partitions: i32) -> Result<KafkaBus> {
    bus_with(partitions, FAST_ASSIGNOR).await
}

async fn bus_with(partitions: i32, assignor: &str) -> Result<KafkaBus> {
    init_tracing();
    let mut config = KafkaConfig::new(kafka_bootstrap().await?)
        .with("session.timeout.ms", "4000")
        .with("heartbeat.interval.ms", "250")
        .with("max.poll.interval.ms", "20000")
        .with("topic.metadata.refresh.interval.ms", "1000")
        .with("partition.assignment.strategy", assignor);
    config.client_id = "bus-kafka-tests".into();
    config.partitions = partitions;
    config.timeout = Duration::from_secs(20);
    Ok(KafkaBus::new(config)?)
}

async fn next(sub: &mut (impl Subscription + ?Sized)) -> Result<Message> {
    timeout(DEADLINE, sub.next())
        .await
        .context("no message before the deadline")??
        .ok_or_else(|| anyhow!("bus shut down"))
}

fn decode(msg: &Message) -> Result<(String, u32)> {
    let text = std::str::from_utf8(&msg.payload)?;
    let (key, seq) = text.split_once(':').context("payload is key:seq")?;
    ensure!(key == msg.key, "payload {text} under key {}", msg.key);
    Ok((key.to_owned(), seq.parse()?))
}

/// The first `n` keys (`{prefix}-{i}`) that land on `partition`.
fn keys_on(partition: u32, partitions: u32, prefix: &str, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .filter(|k| partition_for(k, partitions) == partition)
        .take(n)
        .collect()
}

/// A consumer task: commits each message and reports it with the member's name, until the bus
/// shuts down or the receiver is gone.
fn spawn_consumer(
    name: &'static str,
    mut sub: KafkaSubscription,
    seen: mpsc::UnboundedSender<(&'static str, Message)>,
) -> JoinHandle<Result<()>> {
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await? {
            sub.commit(&msg).await?;
            if seen.send((name, msg)).is_err() {
                break;
            }
        }
        Ok(())
    })
}

async fn collect(
    rx: &mut mpsc::UnboundedReceiver<(&'static str, Message)>,
    n: usize,
) -> Result<Vec<(&'static str, Message)>> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let item = timeout(DEADLINE, rx.recv())
            .await
            .with_context(|| format!("only {} of {n} messages arrived", out.len()))?
            .context("all consumers stopped")?;
        out.push(item);
    }
    Ok(out)
}

async fn quiet(rx: &mut mpsc::UnboundedReceiver<(&'static str, Message)>) -> bool {
    timeout(QUIET, rx.recv()).await.is_err()
}

async fn stop(bus: &KafkaBus, tasks: Vec<JoinHandle<Result<()>>>) -> Result<()> {
    bus.shutdown();
    for task in tasks {
        timeout(DEADLINE, task)
            .await
            .context("consumer did not stop")???;
    }
    Ok(())
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

/// Wait (polling, up to the deadline) until `done` holds. Members that run in spawned tasks are
/// polled there; `driven` members are polled here, and must receive nothing meanwhile.
async fn settle(driven: &mut [&mut KafkaSubscription], done: impl Fn() -> bool) -> Result<()> {
    let started = Instant::now();
    while !done() {
        ensure!(
            started.elapsed() < DEADLINE,
            "the group did not settle within {DEADLINE:?}"
        );
        if driven.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for sub in driven.iter_mut() {
            if let Ok(got) = timeout(Duration::from_millis(50), sub.next()).await {
                bail!("a message arrived while the group settled: {:?}", got?);
            }
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_consume_round_trip_on_the_partition_partition_for_names() -> Result<()> {
    const PARTITIONS: u32 = 4;
    let bus = bus(PARTITIONS as i32).await?;
    let topic = unique_topic("round-trip");
    let mut sub = bus
        .subscribe_member(&topic, &unique_topic("workers"))
        .await?;
    for i in 0..40 {
        let key = format!("instance-{i}");
        bus.publish(&topic, &key, format!("{key}:{i}").into_bytes())
            .await?;
    }
    ensure!(bus.partitions(&topic).await? == PARTITIONS);

    let mut seen = BTreeSet::new();
    let mut last_offset: HashMap<u32, u64> = HashMap::new();
    for _ in 0..40 {
        let msg = next(&mut sub).await?;
        let (key, seq) = decode(&msg)?;
        ensure!(msg.topic == topic);
        ensure!(key == format!("instance-{seq}"));
        ensure!(
            msg.partition == partition_for(&key, PARTITIONS),
            "{key} on partition {} instead of {}",
            msg.partition,
            partition_for(&key, PARTITIONS)
        );
        if let Some(prev) = last_offset.insert(msg.partition, msg.offset) {
            ensure!(msg.offset > prev, "offsets go up within a partition");
        }
        ensure!(seen.insert(seq), "{seq} twice");
        sub.commit(&msg).await?;
    }
    ensure!(seen == (0..40).collect(), "got {seen:?}");

    // An empty payload and a key outside the ASCII range survive the trip.
    bus.publish(&topic, "instance-ü", Vec::new()).await?;
    let msg = next(&mut sub).await?;
    ensure!(msg.key == "instance-ü" && msg.payload.is_empty(), "{msg:?}");
    ensure!(msg.partition == partition_for("instance-ü", PARTITIONS));
    sub.commit(&msg).await?;
    Ok(())
}

/// A batch bigger than the producer's queue is all delivered, each key's messages in the
/// batch's order (the relay publishes the outbox this way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_keeps_per_key_order_even_past_the_producer_queue() -> Result<()> {
    const PARTITIONS: u32 = 3;
    const KEYS: u32 = 20;
    const PER_KEY: u32 = 100;
    init_tracing();
    let mut config = KafkaConfig::new(kafka_bootstrap().await?)
        // A tiny queue, so enqueueing meets QueueFull and must wait for room.
        .with("queue.buffering.max.messages", "50");
    config.client_id = "bus-kafka-tests-batch".into();
    config.partitions = PARTITIONS as i32;
    let bus = KafkaBus::new(config)?;
    let topic = unique_topic("batch");
    let mut sub = bus
        .subscribe_member(&topic, &unique_topic("workers"))
        .await?;
    let mut batch = Vec::new();
    for seq in 0..PER_KEY {
        for k in 0..KEYS {
            batch.push(Outgoing {
                topic: topic.clone(),
                key: format!("instance-{k}"),
                payload: format!("instance-{k}:{seq}").into_bytes(),
            });
        }
    }
    bus.publish_batch(batch).await?;

    let mut last: HashMap<String, u32> = HashMap::new();
    for _ in 0..KEYS * PER_KEY {
        let msg = next(&mut sub).await?;
        let (key, seq) = decode(&msg)?;
        let expected = last.get(&key).map_or(0, |prev| prev + 1);
        ensure!(
            seq == expected,
            "{key}: got {seq} after {:?}",
            last.get(&key)
        );
        last.insert(key, seq);
        sub.commit(&msg).await?;
    }
    ensure!(last.len() == KEYS as usize && last.values().all(|&s| s == PER_KEY - 1));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_order_holds_with_many_keys_and_two_members() -> Result<()> {
    const PARTITIONS: u32 = 8;
    const KEYS: u32 = 100;
    const PER_KEY: u32 = 10;
    const LANES: u32 = 5;
    let bus = bus(PARTITIONS as i32).await?;
    let topic = unique_topic("order");
    let group = unique_topic("workers");
    let a = bus.subscribe_member(&topic, &group).await?;
    let b = bus.subscribe_member(&topic, &group).await?;
    let (a_assigned, b_assigned) = (a.assignment(), b.assignment());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let tasks = vec![
        spawn_consumer("a", a, tx.clone()),
        spawn_consumer("b", b, tx),
    ];
    settle(&mut [], || split(&[&a_assigned, &b_assigned], PARTITIONS)).await?;

    // Publishers each owning a fifth of the keys, interleaving keys and sequence numbers.
    let mut publishers = Vec::new();
    for lane in 0..LANES {
        let bus = bus.clone();
        let topic = topic.clone();
        publishers.push(tokio::spawn(async move {
            for seq in 0..PER_KEY {
                for key in (lane..KEYS).step_by(LANES as usize) {
                    let key = format!("instance-{key}");
                    bus.publish(&topic, &key, format!("{key}:{seq}").into_bytes())
                        .await?;
                }
            }
            Ok::<_, BusError>(())
        }));
    }
    for publisher in publishers {
        timeout(DEADLINE, publisher).await???;
    }

    let seen = collect(&mut rx, (KEYS * PER_KEY) as usize).await?;
    ensure!(quiet(&mut rx).await, "a message came twice");
    stop(&bus, tasks).await?;

    let mut per_key: HashMap<String, (&str, Vec<u32>)> = HashMap::new();
    let mut members = BTreeSet::new();
    for (member, msg) in &seen {
        let (key, seq) = decode(msg)?;
        ensure!(msg.partition == partition_for(&key, PARTITIONS));
        members.insert(*member);
        let entry = per_key.entry(key.clone()).or_insert((member, Vec::new()));
        ensure!(entry.0 == *member, "key {key} consumed by two members");
        entry.1.push(seq);
    }
    ensure!(per_key.len() == KEYS as usize, "keys: {}", per_key.len());
    for (key, (_, seqs)) in &per_key {
        ensure!(
            seqs.iter().copied().eq(0..PER_KEY),
            "key {key} arrived as {seqs:?}"
        );
    }
    ensure!(members.len() == 2, "both members get work: {members:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_groups_each_get_every_message() -> Result<()> {
    const N: u32 = 300;
    let bus = bus(4).await?;
    let topic = unique_topic("events");
    let (audit, billing) = (unique_topic("audit"), unique_topic("billing"));
    let audit_1 = bus.subscribe_member(&topic, &audit).await?;
    let billing_1 = bus.subscribe_member(&topic, &billing).await?;
    let billing_2 = bus.subscribe_member(&topic, &billing).await?;
    let assigned = [
        audit_1.assignment(),
        billing_1.assignment(),
        billing_2.assignment(),
    ];
    let (tx, mut rx) = mpsc::unbounded_channel();
    let tasks = vec![
        spawn_consumer("audit", audit_1, tx.clone()),
        spawn_consumer("billing-1", billing_1, tx.clone()),
        spawn_consumer("billing-2", billing_2, tx),
    ];
    settle(&mut [], || {
        split(&[&assigned[0]], 4) && split(&[&assigned[1], &assigned[2]], 4)
    })
    .await?;

    for i in 0..N {
        let key = format!("instance-{}", i % 37);
        bus.publish(&topic, &key, format!("{key}:{i}").into_bytes())
            .await?;
    }
    let seen = collect(&mut rx, 2 * N as usize).await?;
    ensure!(quiet(&mut rx).await, "more than one copy per group");
    stop(&bus, tasks).await?;

    let mut per_group: BTreeMap<&str, BTreeSet<u32>> = BTreeMap::new();
    for (member, msg) in &seen {
        let group = if member.starts_with("billing") {
            "billing"
        } else {
            "audit"
        };
        let (_, seq) = decode(msg)?;
        ensure!(
            per_group.entry(group).or_default().insert(seq),
            "{group} got {seq} twice"
        );
    }
    ensure!(per_group.len() == 2);
    for (group, seqs) in &per_group {
        ensure!(
            seqs.len() == N as usize,
            "{group} got {} of {N}",
            seqs.len()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncommitted_messages_go_to_the_remaining_member_when_one_drops() -> Result<()> {
    handover(FAST_ASSIGNOR).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncommitted_messages_go_to_the_remaining_member_cooperatively() -> Result<()> {
    handover(DEFAULT_ASSIGNOR).await
}

async fn handover(assignor: &str) -> Result<()> {
    const PARTITIONS: u32 = 2;
    let bus = bus_with(PARTITIONS as i32, assignor).await?;
    let topic = unique_topic("handover");
    let group = unique_topic("workers");
    let mut a = bus.subscribe_member(&topic, &group).await?;
    let b = bus.subscribe_member(&topic, &group).await?;
    let (a_assigned, b_assigned) = (a.assignment(), b.assignment());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let b_task = spawn_consumer("b", b, tx);
    settle(&mut [&mut a], || {
        split(&[&a_assigned, &b_assigned], PARTITIONS)
    })
    .await?;

    // A key on a partition `a` owns: `a` reads five messages, commits two, then goes away.
    let owned = a_assigned.partitions()[0];
    let key = keys_on(owned, PARTITIONS, "instance", 1).remove(0);
    for seq in 0..5 {
        bus.publish(&topic, &key, format!("{key}:{seq}").into_bytes())
            .await?;
    }
    let mut read = Vec::new();
    for _ in 0..5 {
        read.push(next(&mut a).await?);
    }
    let seqs = read.iter().map(decode).collect::<Result<Vec<_>>>()?;
    ensure!(seqs.iter().map(|(_, s)| *s).eq(0..5), "read {seqs:?}");
    a.commit(&read[1]).await?;
    ensure!(quiet(&mut rx).await, "b does not own that partition yet");
    drop(a);

    let got = collect(&mut rx, 3).await?;
    let seqs = got
        .iter()
        .map(|(_, m)| decode(m).map(|(_, s)| s))
        .collect::<Result<Vec<_>>>()?;
    ensure!(seqs == [2, 3, 4], "redelivered {seqs:?}");
    ensure!(
        got.iter()
            .map(|(_, m)| m.offset)
            .eq(read[2..].iter().map(|m| m.offset)),
        "same offsets as before"
    );
    ensure!(quiet(&mut rx).await, "nothing is delivered twice to b");
    ensure!(b_assigned.partitions() == (0..PARTITIONS).collect::<Vec<_>>());
    stop(&bus, vec![b_task]).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_sole_member_hands_over_to_the_next_subscriber() -> Result<()> {
    let bus = bus(4).await?;
    let topic = unique_topic("sole");
    let group = unique_topic("workers");
    let mut a = bus.subscribe_member(&topic, &group).await?;
    for seq in 0..4 {
        bus.publish(
            &topic,
            "instance-7",
            format!("instance-7:{seq}").into_bytes(),
        )
        .await?;
    }
    let first = next(&mut a).await?;
    a.commit(&first).await?;
    let _uncommitted = next(&mut a).await?;
    drop(a);

    let mut b = bus.subscribe_member(&topic, &group).await?;
    let mut seqs = Vec::new();
    for _ in 0..3 {
        seqs.push(decode(&next(&mut b).await?)?.1);
    }
    ensure!(seqs == [1, 2, 3], "got {seqs:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_on_a_revoked_partition_fails_with_not_assigned() -> Result<()> {
    commit_after_revoke(FAST_ASSIGNOR).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_on_a_cooperatively_revoked_partition_fails_with_not_assigned() -> Result<()> {
    commit_after_revoke(DEFAULT_ASSIGNOR).await
}

async fn commit_after_revoke(assignor: &str) -> Result<()> {
    const PARTITIONS: u32 = 4;
    let bus = bus_with(PARTITIONS as i32, assignor).await?;
    let topic = unique_topic("revoke");
    let group = unique_topic("workers");
    let mut a = bus.subscribe_member(&topic, &group).await?;
    for i in 0..40 {
        let key = format!("instance-{i}");
        bus.publish(&topic, &key, format!("{key}:0").into_bytes())
            .await?;
    }
    let mut last: BTreeMap<u32, Message> = BTreeMap::new();
    for _ in 0..40 {
        let msg = next(&mut a).await?;
        a.commit(&msg).await?;
        last.insert(msg.partition, msg);
    }
    ensure!(last.len() == PARTITIONS as usize);

    let mut b = bus.subscribe_member(&topic, &group).await?;
    let (a_assigned, b_assigned) = (a.assignment(), b.assignment());
    settle(&mut [&mut a, &mut b], || {
        split(&[&a_assigned, &b_assigned], PARTITIONS)
    })
    .await?;
    let moved = b_assigned.partitions()[0];
    let kept = a_assigned.partitions()[0];
    let moved_msg = last.get(&moved).context("a message of a moved partition")?;
    match a.commit(moved_msg).await {
        Err(BusError::NotAssigned { partition, .. }) if partition == moved => {}
        other => bail!("a commit on a revoked partition must fail, got {other:?}"),
    }
    // On a partition it kept, the same (already committed) commit is fine.
    a.commit(last.get(&kept).context("a message of a kept partition")?)
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_are_checked() -> Result<()> {
    let bus = bus(2).await?;
    let topic = unique_topic("checked");
    let mut sub = bus.subscribe_member(&topic, &unique_topic("g")).await?;
    bus.publish(&topic, "instance-1", b"instance-1:0".to_vec())
        .await?;
    let msg = next(&mut sub).await?;

    let mut foreign = msg.clone();
    foreign.topic = "elsewhere".into();
    ensure!(matches!(
        sub.commit(&foreign).await,
        Err(BusError::UnknownTopic { .. })
    ));
    let mut beyond = msg.clone();
    beyond.offset = 99;
    ensure!(matches!(
        sub.commit(&beyond).await,
        Err(BusError::OffsetOutOfRange { offset: 99, .. })
    ));
    let mut nowhere = msg.clone();
    nowhere.partition = 7;
    ensure!(matches!(
        sub.commit(&nowhere).await,
        Err(BusError::NotAssigned { partition: 7, .. })
    ));
    sub.commit(&msg).await?;
    // Commits never move backwards; repeating one is harmless.
    sub.commit(&msg).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_topics_is_idempotent_and_routing_follows_the_real_partition_count() -> Result<()> {
    let bus = bus(5).await?;
    let (t1, t2) = (unique_topic("ensure"), unique_topic("ensure"));
    bus.ensure_topics(&[&t1, &t2, &t1]).await?;
    bus.ensure_topics(&[&t1, &t2]).await?;
    bus.ensure_topics(&[]).await?;
    ensure!(bus.partitions(&t1).await? == 5);
    ensure!(bus.partitions(&t2).await? == 5);

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
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_waiting_and_future_calls() -> Result<()> {
    let bus = bus(2).await?;
    let topic = unique_topic("shutdown");
    let mut idle = bus.subscribe_member(&topic, &unique_topic("g")).await?;
    let waiting = tokio::spawn(async move { idle.next().await });
    bus.shutdown();
    let ended = timeout(DEADLINE, waiting)
        .await
        .context("a waiting next() must return on shutdown")??;
    ensure!(matches!(ended, Ok(None)), "got {ended:?}");
    ensure!(matches!(
        bus.publish(&topic, "instance-1", Vec::new()).await,
        Err(BusError::Closed)
    ));
    ensure!(matches!(
        bus.subscribe(&topic, "late").await.map(|_| ()),
        Err(BusError::Closed)
    ));
    ensure!(bus.is_shut_down());
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
