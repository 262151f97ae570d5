//! The in-process bus against the `Bus` contract, with real concurrency on a multi-threaded
//! runtime. Every wait is bounded by `tokio::time::timeout`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use workflow_bus::{partition_for, Bus, BusError, InProcessBus, Message, Subscription};

const DEADLINE: Duration = Duration::from_secs(20);
/// How long we watch for a message that must not come.
const QUIET: Duration = Duration::from_millis(150);

async fn next(sub: &mut Box<dyn Subscription>) -> Result<Message> {
    timeout(DEADLINE, sub.next())
        .await
        .context("no message before the deadline")??
        .ok_or_else(|| anyhow!("bus shut down"))
}

/// `None` if nothing arrives within `QUIET`.
async fn next_quiet(sub: &mut Box<dyn Subscription>) -> Result<Option<Message>> {
    match timeout(QUIET, sub.next()).await {
        Err(_elapsed) => Ok(None),
        Ok(result) => Ok(result?),
    }
}

/// The first `n` keys (of the form `{prefix}-{i}`) that land on `partition`.
fn keys_on(partition: u32, partitions: u32, prefix: &str, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .filter(|k| partition_for(k, partitions) == partition)
        .take(n)
        .collect()
}

fn decode(msg: &Message) -> Result<(String, u32)> {
    let text = std::str::from_utf8(&msg.payload)?;
    let (key, seq) = text.split_once(':').context("payload is key:seq")?;
    ensure!(key == msg.key, "payload {text} under key {}", msg.key);
    Ok((key.to_owned(), seq.parse()?))
}

/// A consumer task: reads until the bus shuts down, commits each message, reports it with the
/// consumer's name.
fn spawn_consumer(
    name: &'static str,
    mut sub: Box<dyn Subscription>,
    seen: mpsc::UnboundedSender<(&'static str, Message)>,
) -> JoinHandle<Result<()>> {
    tokio::spawn(async move {
        let mut count = 0u64;
        while let Some(msg) = sub.next().await? {
            sub.commit(&msg).await?;
            if seen.send((name, msg)).is_err() {
                break;
            }
            count += 1;
            if count.is_multiple_of(7) {
                // Let the other consumer and the publishers interleave with us.
                tokio::task::yield_now().await;
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

async fn stop(bus: &InProcessBus, tasks: Vec<JoinHandle<Result<()>>>) -> Result<()> {
    bus.shutdown();
    for task in tasks {
        timeout(DEADLINE, task)
            .await
            .context("consumer did not stop")???;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_order_holds_with_many_keys_and_two_members() -> Result<()> {
    const KEYS: u32 = 300;
    const PER_KEY: u32 = 20;
    let bus = InProcessBus::new(8);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let tasks = vec![
        spawn_consumer("a", bus.subscribe("cmd", "workers").await?, tx.clone()),
        spawn_consumer("b", bus.subscribe("cmd", "workers").await?, tx),
    ];

    // Three publishers, each owning a third of the keys, interleaving keys and sequence numbers.
    let mut publishers = Vec::new();
    for lane in 0..3u32 {
        let bus = bus.clone();
        publishers.push(tokio::spawn(async move {
            for seq in 0..PER_KEY {
                for key in (lane..KEYS).step_by(3) {
                    let key = format!("instance-{key}");
                    bus.publish("cmd", &key, format!("{key}:{seq}").into_bytes())
                        .await?;
                }
                tokio::task::yield_now().await;
            }
            Ok::<_, BusError>(())
        }));
    }
    for publisher in publishers {
        timeout(DEADLINE, publisher).await???;
    }

    let seen = collect(&mut rx, (KEYS * PER_KEY) as usize).await?;
    stop(&bus, tasks).await?;

    let mut per_key: HashMap<String, (&str, Vec<u32>)> = HashMap::new();
    let mut members = BTreeSet::new();
    for (member, msg) in &seen {
        let (key, seq) = decode(msg)?;
        members.insert(*member);
        let entry = per_key.entry(key.clone()).or_insert((member, Vec::new()));
        ensure!(entry.0 == *member, "key {key} consumed by two members");
        entry.1.push(seq);
    }
    ensure!(
        per_key.len() == KEYS as usize,
        "keys seen: {}",
        per_key.len()
    );
    for (key, (_, seqs)) in &per_key {
        let expected: Vec<u32> = (0..PER_KEY).collect();
        ensure!(*seqs == expected, "key {key} arrived as {seqs:?}");
    }
    ensure!(
        members.len() == 2,
        "both members must get work: {members:?}"
    );
    ensure!(
        bus.retained() == 0,
        "all committed, yet {} retained",
        bus.retained()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_groups_each_get_every_message() -> Result<()> {
    const N: usize = 500;
    let bus = InProcessBus::new(4);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let tasks = vec![
        spawn_consumer("audit", bus.subscribe("events", "audit").await?, tx.clone()),
        spawn_consumer(
            "billing-1",
            bus.subscribe("events", "billing").await?,
            tx.clone(),
        ),
        spawn_consumer("billing-2", bus.subscribe("events", "billing").await?, tx),
    ];
    for i in 0..N {
        let key = format!("instance-{}", i % 37);
        bus.publish("events", &key, format!("{key}:{i}").into_bytes())
            .await?;
    }
    let seen = collect(&mut rx, 2 * N).await?;
    ensure!(
        next_quiet_rx(&mut rx).await.is_none(),
        "more than one copy per group"
    );
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
    for (group, seqs) in &per_group {
        ensure!(seqs.len() == N, "{group} got {} of {N}", seqs.len());
    }
    ensure!(per_group.len() == 2);
    Ok(())
}

async fn next_quiet_rx(
    rx: &mut mpsc::UnboundedReceiver<(&'static str, Message)>,
) -> Option<(&'static str, Message)> {
    timeout(QUIET, rx.recv()).await.ok().flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncommitted_messages_are_redelivered_after_a_member_drops() -> Result<()> {
    let bus = InProcessBus::new(2);
    // Range assignment: the first member gets partition 0, the second partition 1.
    let mut a = bus.subscribe("cmd", "workers").await?;
    let mut b = bus.subscribe("cmd", "workers").await?;
    let key = keys_on(0, 2, "instance", 1).remove(0);
    for seq in 0..5 {
        bus.publish("cmd", &key, format!("{key}:{seq}").into_bytes())
            .await?;
    }

    // `a` reads all five, commits the first two, then crashes.
    let mut read = Vec::new();
    for _ in 0..5 {
        read.push(next(&mut a).await?);
    }
    ensure!(read.iter().map(|m| m.offset).eq(0..5));
    a.commit(&read[1]).await?;
    ensure!(
        next_quiet(&mut b).await?.is_none(),
        "b does not own partition 0 yet"
    );

    // `b` is already waiting when `a` goes away.
    let waiting = tokio::spawn(async move {
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(next(&mut b).await?);
        }
        Ok::<_, anyhow::Error>((b, got))
    });
    tokio::task::yield_now().await;
    drop(a);
    let (mut b, got) = timeout(DEADLINE, waiting).await???;
    let offsets: Vec<u64> = got.iter().map(|m| m.offset).collect();
    ensure!(offsets == [2, 3, 4], "redelivered {offsets:?}");
    let seqs = got.iter().map(decode).collect::<Result<Vec<_>>>()?;
    ensure!(seqs.iter().map(|(_, s)| *s).eq(2..5));
    ensure!(
        next_quiet(&mut b).await?.is_none(),
        "nothing is delivered twice to b"
    );

    // Committing the redelivered tail frees the memory.
    b.commit(&got[2]).await?;
    ensure!(bus.retained() == 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_sole_member_hands_over_to_the_next_subscriber() -> Result<()> {
    let bus = InProcessBus::new(4);
    let mut a = bus.subscribe("cmd", "workers").await?;
    for seq in 0..4 {
        bus.publish(
            "cmd",
            "instance-7",
            format!("instance-7:{seq}").into_bytes(),
        )
        .await?;
    }
    let first = next(&mut a).await?;
    a.commit(&first).await?;
    let _uncommitted = next(&mut a).await?;
    drop(a);

    let mut b = bus.subscribe("cmd", "workers").await?;
    let mut seqs = Vec::new();
    for _ in 0..3 {
        seqs.push(decode(&next(&mut b).await?)?.1);
    }
    ensure!(seqs == [1, 2, 3], "got {seqs:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_splits_the_partitions_without_sharing_any() -> Result<()> {
    const PARTITIONS: u32 = 8;
    const N: usize = 400;
    let bus = InProcessBus::new(PARTITIONS);
    let mut a = bus.subscribe("cmd", "workers").await?;
    for i in 0..N {
        let key = format!("instance-{i}");
        bus.publish("cmd", &key, format!("{key}:0").into_bytes())
            .await?;
    }
    // `a` owns all partitions: it reads and commits everything.
    let mut last_per_partition: BTreeMap<u32, Message> = BTreeMap::new();
    for _ in 0..N {
        let msg = next(&mut a).await?;
        a.commit(&msg).await?;
        last_per_partition.insert(msg.partition, msg);
    }
    ensure!(last_per_partition.len() == PARTITIONS as usize);
    ensure!(bus.retained() == 0);

    // `b` joins: range assignment moves partitions 4..8 to it.
    let b = bus.subscribe("cmd", "workers").await?;
    let moved = last_per_partition
        .get(&(PARTITIONS - 1))
        .context("a message of the last partition")?;
    match a.commit(moved).await {
        Err(BusError::NotAssigned { partition, .. }) if partition == PARTITIONS - 1 => {}
        other => bail!("a commit on a revoked partition must fail, got {other:?}"),
    }

    let (tx, mut rx) = mpsc::unbounded_channel();
    let tasks = vec![
        spawn_consumer("a", a, tx.clone()),
        spawn_consumer("b", b, tx),
    ];
    for i in 0..N {
        let key = format!("instance-{i}");
        bus.publish("cmd", &key, format!("{key}:1").into_bytes())
            .await?;
    }
    let seen = collect(&mut rx, N).await?;
    ensure!(
        next_quiet_rx(&mut rx).await.is_none(),
        "a message came twice"
    );
    stop(&bus, tasks).await?;

    let mut delivered = BTreeSet::new();
    let mut owner_of: BTreeMap<u32, &str> = BTreeMap::new();
    for (member, msg) in &seen {
        ensure!(
            decode(msg)?.1 == 1,
            "a committed message was redelivered: {msg:?}"
        );
        ensure!(
            delivered.insert((msg.partition, msg.offset)),
            "delivered twice: {msg:?}"
        );
        let owner = owner_of.entry(msg.partition).or_insert(member);
        ensure!(
            *owner == *member,
            "partition {} consumed by both",
            msg.partition
        );
    }
    let expected: BTreeMap<u32, &str> = (0..PARTITIONS)
        .map(|p| (p, if p < PARTITIONS / 2 { "a" } else { "b" }))
        .collect();
    ensure!(owner_of == expected, "assignment after join: {owner_of:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_waiting_and_future_consumers() -> Result<()> {
    let bus = InProcessBus::default();
    let mut idle = bus.subscribe("cmd", "workers").await?;
    let mut busy = bus.subscribe("other", "workers").await?;
    bus.publish("other", "instance-1", b"instance-1:0".to_vec())
        .await?;
    let waiting = tokio::spawn(async move { idle.next().await });
    tokio::task::yield_now().await;

    bus.shutdown();
    let ended = timeout(DEADLINE, waiting)
        .await
        .context("a waiting next() must return on shutdown")??;
    ensure!(matches!(ended, Ok(None)), "got {ended:?}");
    // Even with a message pending, a shut-down bus hands out nothing more.
    ensure!(matches!(busy.next().await, Ok(None)));
    ensure!(matches!(busy.next().await, Ok(None)), "stays shut down");
    ensure!(matches!(
        bus.publish("cmd", "instance-1", Vec::new()).await,
        Err(BusError::Closed)
    ));
    ensure!(matches!(
        bus.subscribe("cmd", "late").await.map(|_| ()),
        Err(BusError::Closed)
    ));
    ensure!(bus.is_shut_down());
    Ok(())
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
    ensure!(
        decode(&fast_msgs[0])?.1 == 0,
        "the first group sees the early messages"
    );
    fast.commit(&fast_msgs[9]).await?;
    ensure!(bus.retained() == 10, "slow has committed nothing yet");

    let mut slow_msgs = Vec::new();
    for _ in 0..10 {
        slow_msgs.push(next(&mut slow).await?);
    }
    slow.commit(&slow_msgs[3]).await?;
    ensure!(bus.retained() == 6, "retained {}", bus.retained());
    // Commits never move backwards.
    slow.commit(&slow_msgs[1]).await?;
    ensure!(bus.retained() == 6);
    slow.commit(&slow_msgs[9]).await?;
    ensure!(bus.retained() == 0);

    // A group that joins later starts at the earliest message still held.
    bus.publish("cmd", "instance-1", b"instance-1:10".to_vec())
        .await?;
    let mut late = bus.subscribe("cmd", "late").await?;
    let first = next(&mut late).await?;
    ensure!(
        first.offset == 10 && decode(&first)?.1 == 10,
        "got {first:?}"
    );
    Ok(())
}

#[tokio::test]
async fn commits_are_checked() -> Result<()> {
    let bus = InProcessBus::new(2);
    let mut sub = bus.subscribe("cmd", "workers").await?;
    bus.publish("cmd", "instance-1", b"instance-1:0".to_vec())
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
        Err(BusError::UnknownPartition { partition: 7, .. })
    ));
    sub.commit(&msg).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_map_to_the_partition_partition_for_names() -> Result<()> {
    let bus = InProcessBus::new(16);
    let mut sub = bus.subscribe("cmd", "workers").await?;
    for i in 0..64 {
        let key = format!("instance-{i}");
        bus.publish("cmd", &key, format!("{key}:0").into_bytes())
            .await?;
        let msg = next(&mut sub).await?;
        ensure!(msg.key == key && msg.partition == partition_for(&key, 16));
        sub.commit(&msg).await?;
    }
    Ok(())
}
