//! The [`Bus`] conformance suite: the contract of [`Bus`] and [`Subscription`] written once, as
//! async tests that every adapter runs against fresh buses from its own [`Harness`].
//!
//! # What this module owns
//! - One public async function per promise of the trait docs (and of the crate docs, where both
//!   adapters make the same promise), each taking a [`Harness`]; [`TESTS`] lists them.
//! - [`bus_conformance_tests!`](crate::bus_conformance_tests), which turns them into `#[test]`s in
//!   an adapter's test crate: `workflow_bus::bus_conformance_tests!(MyHarness);` for all of them,
//!   or `workflow_bus::bus_conformance_tests!(MyHarness; test_a, test_b);` for a subset.
//! - The helpers the tests share: consumer tasks ("crews"), settling a group before measuring it
//!   (adapter-neutral: rounds of marker messages on every partition until two rounds in a row
//!   reach every member with the same owners), and deadline-bounded receives. Every wait is on a
//!   condition and bounded by the fixture's deadline; the only sleep is the pause between two
//!   settle rounds while a join is still in progress.
//!
//! It is compiled only with the `conformance` feature, which test crates enable from their
//! dev-dependencies. It knows no adapter: what differs between adapters (how to build a bus, how
//! long to watch for a message that must not come) comes from the [`Fixture`].
//!
//! # Writing a harness
//! Every call to [`Harness::fixture`] returns a bus no other test uses, or at least a namespace
//! (a prefix for topic and group names) no other test uses on a shared cluster. Topics the bus
//! creates get the requested number of partitions. If the adapter has producer queues, they must
//! hold fewer than [`BATCH_MESSAGES`] messages, so the batch test runs past them.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::timeout;

use crate::{partition_for, Bus, BusError, Message, NamedBus, Naming, Outgoing, Subscription};

/// What every conformance test returns.
pub type Result<T, E = anyhow::Error> = std::result::Result<T, E>;

/// Messages in the batch of [`publish_batch_keeps_per_key_order_past_any_queue`]: an adapter's
/// producer queues must be smaller, so the batch cannot fit in them at once.
pub const BATCH_MESSAGES: usize = 2000;

/// The name of every conformance test, in the order [`bus_conformance_tests!`] generates them.
///
/// [`bus_conformance_tests!`]: crate::bus_conformance_tests
pub const TESTS: &[&str] = &[
    "keys_land_on_the_partition_partition_for_names",
    "publish_batch_keeps_per_key_order_past_any_queue",
    "members_of_a_group_share_partitions_and_keep_per_key_order",
    "every_group_gets_every_message",
    "a_new_group_starts_at_the_earliest_message",
    "uncommitted_messages_go_to_the_remaining_member_when_one_drops",
    "a_dropped_sole_member_hands_over_to_the_next_subscriber",
    "commits_never_move_backwards",
    "a_join_and_a_leave_move_partitions_cleanly",
    "no_message_is_lost_while_a_member_joins",
    "commits_of_messages_not_delivered_here_are_refused",
    "shutdown_ends_waiting_and_future_calls",
    "named_bus_prefixes_topics_and_groups",
];

/// Generates one `#[tokio::test]` per conformance test, running it on the harness `$harness`
/// (an expression, evaluated per test). The calling crate needs `tokio` with the `macros` and
/// `rt-multi-thread` features. In the list form, a test may carry attributes, e.g.
/// `#[ignore = "why"]` for a known violation of the adapter. Wrap the call in a module to keep
/// the names apart:
///
/// ```ignore
/// mod conformance {
///     workflow_bus::bus_conformance_tests!(super::InProcess);
/// }
/// mod rebalancing_only {
///     workflow_bus::bus_conformance_tests!(super::InProcess;
///         a_join_and_a_leave_move_partitions_cleanly,
///         #[ignore = "known violation: ..."] no_message_is_lost_while_a_member_joins);
/// }
/// ```
#[macro_export]
macro_rules! bus_conformance_tests {
    ($harness:expr) => {
        $crate::bus_conformance_tests!(
            $harness;
            keys_land_on_the_partition_partition_for_names,
            publish_batch_keeps_per_key_order_past_any_queue,
            members_of_a_group_share_partitions_and_keep_per_key_order,
            every_group_gets_every_message,
            a_new_group_starts_at_the_earliest_message,
            uncommitted_messages_go_to_the_remaining_member_when_one_drops,
            a_dropped_sole_member_hands_over_to_the_next_subscriber,
            commits_never_move_backwards,
            a_join_and_a_leave_move_partitions_cleanly,
            no_message_is_lost_while_a_member_joins,
            commits_of_messages_not_delivered_here_are_refused,
            shutdown_ends_waiting_and_future_calls,
            named_bus_prefixes_topics_and_groups,
        );
    };
    ($harness:expr; $($(#[$attr:meta])* $test:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $(#[$attr])*
            async fn $test() -> $crate::conformance::Result<()> {
                let harness = $harness;
                let result = $crate::conformance::$test(&harness).await;
                $crate::conformance::Harness::teardown(&harness).await;
                result
            }
        )+
    };
}

/// Builds the fresh buses the conformance tests run on.
#[async_trait::async_trait]
pub trait Harness: Send + Sync {
    /// A bus (or namespace on a shared cluster) no other test uses, whose new topics get
    /// `partitions` partitions.
    async fn fixture(&self, partitions: u32) -> Result<Fixture>;

    /// Called once the test ended, passed or failed: remove what its fixtures left on a
    /// shared cluster (topics and groups are what a broker keeps paying for).
    async fn teardown(&self) {}
}

/// One test's bus, its namespace and its timings.
pub struct Fixture {
    bus: Arc<dyn Bus>,
    partitions: u32,
    namespace: String,
    shutdown: Box<dyn Fn() + Send + Sync>,
    deadline: Duration,
    quiet: Duration,
}

impl fmt::Debug for Fixture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fixture")
            .field("partitions", &self.partitions)
            .field("namespace", &self.namespace)
            .field("deadline", &self.deadline)
            .field("quiet", &self.quiet)
            .finish_non_exhaustive()
    }
}

impl Fixture {
    /// `bus`, whose new topics have `partitions` partitions; every topic and group name of the
    /// test is `namespace` followed by the test's own name. `shutdown` is the adapter's shutdown
    /// (after it, `next()` returns `Ok(None)` and publish/subscribe fail with `Closed`).
    /// Timings default to a 20 s deadline and a 200 ms quiet period; see [`Fixture::timing`].
    pub fn new(
        bus: Arc<dyn Bus>,
        partitions: u32,
        namespace: impl Into<String>,
        shutdown: impl Fn() + Send + Sync + 'static,
    ) -> Fixture {
        Fixture {
            bus,
            partitions,
            namespace: namespace.into(),
            shutdown: Box::new(shutdown),
            deadline: Duration::from_secs(20),
            quiet: Duration::from_millis(200),
        }
    }

    /// `deadline` bounds every wait for something that must happen (a message, a rebalance);
    /// `quiet` is how long a test watches for a message that must not come: long enough for the
    /// adapter to deliver a stray message if there were one.
    pub fn timing(mut self, deadline: Duration, quiet: Duration) -> Fixture {
        self.deadline = deadline;
        self.quiet = quiet;
        self
    }

    /// The bus under test.
    pub fn bus(&self) -> &Arc<dyn Bus> {
        &self.bus
    }

    /// Partitions of the topics the bus creates.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The physical name of the test's topic `name`.
    pub fn topic(&self, name: &str) -> String {
        format!("{}{name}", self.namespace)
    }

    /// The physical name of the test's consumer group `name`.
    pub fn group(&self, name: &str) -> String {
        format!("{}{name}", self.namespace)
    }

    /// Shut the bus down.
    pub fn shutdown(&self) {
        (self.shutdown)();
    }
}

// ------------------------------------------------------------------------------------ helpers

/// Keys of the marker messages [`Crew::settle`] publishes; the tests' own keys never start so.
const WARMUP: &str = "warmup-";
/// Pause between two settle rounds that did not reach every member yet.
const SETTLE_POLL: Duration = Duration::from_millis(100);
/// Makes the markers of every settle call distinct.
static SETTLE_CALLS: AtomicU64 = AtomicU64::new(0);

fn is_warmup(msg: &Message) -> bool {
    msg.key.starts_with(WARMUP)
}

/// The first `n` keys `{prefix}-{i}` that land on `partition`.
fn keys_on(partition: u32, partitions: u32, prefix: &str, n: usize) -> Vec<String> {
    (0u64..)
        .map(|i| format!("{prefix}-{i}"))
        .filter(|k| partition_for(k, partitions) == partition)
        .take(n)
        .collect()
}

fn key_on(partition: u32, partitions: u32, prefix: &str) -> Result<String> {
    keys_on(partition, partitions, prefix, 1)
        .pop()
        .with_context(|| format!("no key for partition {partition}"))
}

/// The payload of message `seq` of `key`: `key:seq`.
fn payload(key: &str, seq: u32) -> Vec<u8> {
    format!("{key}:{seq}").into_bytes()
}

/// `(key, seq)` of a message built with [`payload`], checking the key matches the message's.
fn decode(msg: &Message) -> Result<(String, u32)> {
    let text = std::str::from_utf8(&msg.payload).context("payload is UTF-8")?;
    let (key, seq) = text.split_once(':').context("payload is key:seq")?;
    ensure!(key == msg.key, "payload {text} under key {}", msg.key);
    Ok((key.to_owned(), seq.parse().context("seq is a number")?))
}

fn seq_of(msg: &Message) -> Result<u32> {
    Ok(decode(msg)?.1)
}

/// The next message, within the deadline; the bus shutting down is a failure.
async fn next(fx: &Fixture, sub: &mut dyn Subscription) -> Result<Message> {
    timeout(fx.deadline, sub.next())
        .await
        .with_context(|| format!("no message within {:?}", fx.deadline))?
        .context("next() failed")?
        .ok_or_else(|| anyhow!("next() returned None: the bus shut down"))
}

/// The next message that is not a settle marker.
async fn next_data(fx: &Fixture, sub: &mut dyn Subscription) -> Result<Message> {
    loop {
        let msg = next(fx, sub).await?;
        if !is_warmup(&msg) {
            return Ok(msg);
        }
    }
}

async fn read_data(fx: &Fixture, sub: &mut dyn Subscription, n: usize) -> Result<Vec<Message>> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let msg = next_data(fx, sub)
            .await
            .with_context(|| format!("after {} of {n} messages", out.len()))?;
        out.push(msg);
    }
    Ok(out)
}

/// Whether `result` is `NotAssigned` for `partition`.
fn not_assigned(result: &Result<(), BusError>, partition: u32) -> bool {
    matches!(result, Err(BusError::NotAssigned { partition: p, .. }) if *p == partition)
}

/// A message one member of a [`Crew`] received (and committed, once the crew commits).
#[derive(Debug)]
struct Seen {
    member: &'static str,
    msg: Message,
}

struct Member {
    name: &'static str,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<Box<dyn Subscription>>>,
}

/// Members of one consumer group, each consuming in its own task and reporting what it receives.
/// A crew starts without committing; after [`Crew::start_committing`] each member commits
/// every message before reporting it, and drops a message whose commit fails with
/// `NotAssigned`, as the contract asks (the partition's owner receives it again). Tests settle
/// a group before they start committing: a commit covers every earlier message, so committing
/// the markers would also cover messages a test left uncommitted on purpose, and it keeps
/// commits out of the rebalance being waited for.
struct Crew {
    deadline: Duration,
    quiet: Duration,
    commit: Arc<AtomicBool>,
    tx: mpsc::UnboundedSender<Seen>,
    rx: mpsc::UnboundedReceiver<Seen>,
    members: Vec<Member>,
    /// Test messages received while settling, handed out first by `recv`.
    backlog: VecDeque<Seen>,
}

impl Crew {
    fn new(fx: &Fixture) -> Crew {
        let (tx, rx) = mpsc::unbounded_channel();
        Crew {
            deadline: fx.deadline,
            quiet: fx.quiet,
            commit: Arc::new(AtomicBool::new(false)),
            tx,
            rx,
            members: Vec::new(),
            backlog: VecDeque::new(),
        }
    }

    /// Consume with `sub` in a task, as member `name`.
    fn run(&mut self, name: &'static str, mut sub: Box<dyn Subscription>) {
        let (stop, mut stopped) = oneshot::channel::<()>();
        let tx = self.tx.clone();
        let commit = Arc::clone(&self.commit);
        let task = tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    biased;
                    _ = &mut stopped => return Ok(sub),
                    next = sub.next() => next,
                };
                let Some(msg) = next.with_context(|| format!("{name}: next()"))? else {
                    return Ok(sub);
                };
                if commit.load(Ordering::Acquire) {
                    match sub.commit(&msg).await {
                        Ok(()) => {}
                        Err(BusError::NotAssigned { .. }) => continue,
                        Err(e) => {
                            return Err(anyhow!(e).context(format!("{name}: committing {msg:?}")))
                        }
                    }
                }
                if tx.send(Seen { member: name, msg }).is_err() {
                    return Ok(sub);
                }
            }
        });
        self.members.push(Member { name, stop, task });
    }

    /// From now on, members commit every message before reporting it.
    fn start_committing(&self) {
        self.commit.store(true, Ordering::Release);
    }

    /// Stop member `name`'s task and hand its subscription back (still a member of the group).
    async fn take(&mut self, name: &str) -> Result<Box<dyn Subscription>> {
        let index = self
            .members
            .iter()
            .position(|m| m.name == name)
            .with_context(|| format!("no member {name}"))?;
        let member = self.members.remove(index);
        self.finish(member).await
    }

    async fn finish(&self, member: Member) -> Result<Box<dyn Subscription>> {
        let name = member.name;
        let _ = member.stop.send(());
        timeout(self.deadline, member.task)
            .await
            .with_context(|| format!("member {name} did not stop"))?
            .with_context(|| format!("member {name}'s task panicked"))?
    }

    /// Stop every member; their subscriptions, and the test messages received but not yet
    /// taken with `recv`.
    async fn stop(mut self) -> Result<(BTreeMap<&'static str, Box<dyn Subscription>>, Vec<Seen>)> {
        let mut subs = BTreeMap::new();
        for member in std::mem::take(&mut self.members) {
            let name = member.name;
            subs.insert(name, self.finish(member).await?);
        }
        let mut rest: Vec<Seen> = self.backlog.drain(..).collect();
        while let Ok(seen) = self.rx.try_recv() {
            if !is_warmup(&seen.msg) {
                rest.push(seen);
            }
        }
        Ok((subs, rest))
    }

    /// Why nothing arrives: the first member whose task ended with an error, if any.
    async fn failure(&mut self, what: String) -> anyhow::Error {
        if let Some(index) = self.members.iter().position(|m| m.task.is_finished()) {
            let member = self.members.remove(index);
            let name = member.name;
            return match member.task.await {
                Ok(Err(e)) => e.context(format!("{what}: member {name} failed")),
                Ok(Ok(_)) => anyhow!("{what}: member {name} stopped (the bus shut down?)"),
                Err(e) => anyhow!("{what}: member {name} panicked: {e}"),
            };
        }
        anyhow!("{what}")
    }

    /// The next message of any member, settle markers included, within `until`.
    async fn recv_any(&mut self, until: Instant, what: impl Fn() -> String) -> Result<Seen> {
        let left = until.saturating_duration_since(Instant::now());
        match timeout(left, self.rx.recv()).await {
            Ok(Some(seen)) => Ok(seen),
            Ok(None) => Err(self
                .failure(format!("{}: every member stopped", what()))
                .await),
            Err(_) => Err(self
                .failure(format!("{}: nothing within the deadline", what()))
                .await),
        }
    }

    /// The next test message (not a settle marker), within the deadline.
    async fn recv(&mut self) -> Result<Seen> {
        if let Some(seen) = self.backlog.pop_front() {
            return Ok(seen);
        }
        let until = Instant::now() + self.deadline;
        loop {
            let seen = self
                .recv_any(until, || "waiting for a message".into())
                .await?;
            if !is_warmup(&seen.msg) {
                return Ok(seen);
            }
        }
    }

    /// The next `n` test messages.
    async fn collect(&mut self, n: usize) -> Result<Vec<Seen>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let seen = self
                .recv()
                .await
                .with_context(|| format!("only {} of {n} messages arrived", out.len()))?;
            out.push(seen);
        }
        Ok(out)
    }

    /// Fails if a test message arrives within the quiet period.
    async fn quiet(&mut self, why: &str) -> Result<()> {
        if let Some(seen) = self.backlog.pop_front() {
            bail!("{why}: {} got {:?}", seen.member, seen.msg);
        }
        let until = Instant::now() + self.quiet;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match timeout(left, self.rx.recv()).await {
                Err(_) => return Ok(()),
                Ok(None) => return Err(self.failure(format!("{why}: every member stopped")).await),
                Ok(Some(seen)) if is_warmup(&seen.msg) => {}
                Ok(Some(seen)) => bail!("{why}: {} got {:?}", seen.member, seen.msg),
            }
        }
    }

    /// Wait until the group is stable: publish one marker to every partition of `topic`, in
    /// rounds, until two rounds in a row reach every member of the crew with the same owner per
    /// partition. A member only gets partitions once its join completed, and nothing joins or
    /// leaves afterwards; a round may straddle the last rebalance, the next one cannot. Returns
    /// the owner of each partition. Test messages received meanwhile are kept for `recv`.
    async fn settle(&mut self, fx: &Fixture, topic: &str) -> Result<BTreeMap<u32, &'static str>> {
        let call = SETTLE_CALLS.fetch_add(1, Ordering::Relaxed);
        let keys = (0..fx.partitions)
            .map(|p| key_on(p, fx.partitions, &format!("{WARMUP}{call}")))
            .collect::<Result<Vec<_>>>()?;
        let members: BTreeSet<&str> = self.members.iter().map(|m| m.name).collect();
        let until = Instant::now() + fx.deadline;
        let mut last = BTreeMap::new();
        for round in 0u32.. {
            if Instant::now() >= until {
                return Err(self
                    .failure(format!(
                        "the group did not settle within {:?}: last round's owners {last:?}",
                        fx.deadline
                    ))
                    .await);
            }
            let marker = format!("{call}:{round}").into_bytes();
            for key in &keys {
                fx.bus
                    .publish(topic, key, marker.clone())
                    .await
                    .context("publishing a settle marker")?;
            }
            let mut owners: BTreeMap<u32, &'static str> = BTreeMap::new();
            while owners.len() < keys.len() {
                let seen = self
                    .recv_any(until, || {
                        format!("settling, round {round}: owners {owners:?}")
                    })
                    .await?;
                if !is_warmup(&seen.msg) {
                    self.backlog.push_back(seen);
                } else if seen.msg.payload[..] == marker[..] {
                    owners.insert(seen.msg.partition, seen.member);
                }
            }
            if owners.values().copied().collect::<BTreeSet<_>>() == members && owners == last {
                return Ok(owners);
            }
            last = owners;
            if last.values().copied().collect::<BTreeSet<_>>() != members {
                // Give the join in progress time to complete before the next round.
                tokio::time::sleep(SETTLE_POLL).await;
            }
        }
        bail!("unreachable: rounds are unbounded")
    }
}

// ---------------------------------------------------------------------------- the contract

/// `Bus::publish`: a message lands on `partition_for(key, partitions)` and keeps its key,
/// payload (empty and non-ASCII keys included) and topic; the same key lands on the same
/// partition every time, by `publish` or `publish_batch`; offsets of a fresh topic's partition
/// go 0, 1, 2... in publish order (`Message::offset`); a topic is created on first use, by
/// `subscribe` as well.
pub async fn keys_land_on_the_partition_partition_for_names(h: &dyn Harness) -> Result<()> {
    const PARTITIONS: u32 = 4;
    const KEYS: u32 = 40;
    const ODD_KEY: &str = "instance-ü";
    let fx = h.fixture(PARTITIONS).await?;
    let topic = fx.topic("routing");
    let mut sub = fx.bus.subscribe(&topic, &fx.group("workers")).await?;
    for round in 0..2 {
        for i in 0..KEYS {
            let key = format!("instance-{i}");
            fx.bus.publish(&topic, &key, payload(&key, round)).await?;
        }
    }
    let batch = (0..KEYS)
        .map(|i| {
            let key = format!("instance-{i}");
            Outgoing {
                topic: topic.clone(),
                payload: payload(&key, 2),
                key,
            }
        })
        .collect();
    fx.bus.publish_batch(batch).await?;
    fx.bus.publish(&topic, ODD_KEY, Vec::new()).await?;

    let mut next_offset: BTreeMap<u32, u64> = BTreeMap::new();
    let mut seqs: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    let mut odd = None;
    for _ in 0..KEYS * 3 + 1 {
        let msg = next(&fx, sub.as_mut()).await?;
        ensure!(msg.topic == topic, "topic {} instead of {topic}", msg.topic);
        let expected = partition_for(&msg.key, PARTITIONS);
        ensure!(
            msg.partition == expected,
            "{} on partition {} instead of {expected}",
            msg.key,
            msg.partition
        );
        let offset = next_offset.entry(msg.partition).or_insert(0);
        ensure!(
            msg.offset == *offset,
            "partition {}: offset {} where {} was next",
            msg.partition,
            msg.offset,
            *offset
        );
        *offset += 1;
        if msg.key == ODD_KEY {
            ensure!(msg.payload.is_empty(), "empty payload came back as {msg:?}");
            odd = Some(msg.clone());
        } else {
            let (key, seq) = decode(&msg)?;
            seqs.entry(key).or_default().push(seq);
        }
        sub.commit(&msg).await?;
    }
    ensure!(odd.is_some(), "the non-ASCII key never arrived");
    ensure!(seqs.len() == KEYS as usize, "{} keys arrived", seqs.len());
    for (key, got) in &seqs {
        ensure!(*got == [0, 1, 2], "{key} arrived as {got:?}");
    }
    ensure!(
        next_offset.len() == PARTITIONS as usize,
        "the keys should cover every partition: {next_offset:?}"
    );
    Ok(())
}

/// `Bus::publish_batch`: every message of a batch bigger than any producer queue arrives, each
/// key's in the batch's order, on the partition `publish` would use, also when the batch spans
/// two topics.
pub async fn publish_batch_keeps_per_key_order_past_any_queue(h: &dyn Harness) -> Result<()> {
    const PARTITIONS: u32 = 3;
    const KEYS: u32 = 20;
    const PER_KEY: u32 = (BATCH_MESSAGES as u32) / KEYS;
    /// Every `SIDE`-th key also goes to the second topic.
    const SIDE: u32 = 5;
    let fx = h.fixture(PARTITIONS).await?;
    let (main, side) = (fx.topic("batch"), fx.topic("batch-side"));
    // One group per topic: a Kafka group spans topics, the in-process bus's does not.
    let mut main_sub = fx.bus.subscribe(&main, &fx.group("main-workers")).await?;
    let mut side_sub = fx.bus.subscribe(&side, &fx.group("side-workers")).await?;
    let mut batch = Vec::new();
    for seq in 0..PER_KEY {
        for k in 0..KEYS {
            let key = format!("instance-{k}");
            if k % SIDE == 0 {
                batch.push(Outgoing {
                    topic: side.clone(),
                    key: key.clone(),
                    payload: payload(&key, seq),
                });
            }
            batch.push(Outgoing {
                topic: main.clone(),
                payload: payload(&key, seq),
                key,
            });
        }
    }
    fx.bus.publish_batch(batch).await?;

    for (topic, sub, keys) in [
        (&main, &mut main_sub, KEYS),
        (&side, &mut side_sub, KEYS / SIDE),
    ] {
        let mut last: HashMap<String, u32> = HashMap::new();
        let mut tail: BTreeMap<u32, Message> = BTreeMap::new();
        for _ in 0..keys * PER_KEY {
            let msg = next(&fx, sub.as_mut())
                .await
                .with_context(|| format!("{topic}: after {} keys", last.len()))?;
            let (key, seq) = decode(&msg)?;
            ensure!(msg.topic == *topic, "{msg:?} on the wrong topic");
            ensure!(msg.partition == partition_for(&key, PARTITIONS), "{msg:?}");
            let expected = last.get(&key).map_or(0, |prev| prev + 1);
            ensure!(
                seq == expected,
                "{topic}/{key}: got {seq} after {:?}",
                last.get(&key)
            );
            last.insert(key, seq);
            tail.insert(msg.partition, msg);
        }
        ensure!(last.len() == keys as usize, "{topic}: {} keys", last.len());
        for msg in tail.values() {
            sub.commit(msg).await?;
        }
    }
    Ok(())
}

/// `Bus::subscribe`, one group: its members share the partitions (each partition to one
/// member, every member some), each message goes to exactly one member, and each key's
/// messages arrive in publish order, with several publishers interleaving keys.
pub async fn members_of_a_group_share_partitions_and_keep_per_key_order(
    h: &dyn Harness,
) -> Result<()> {
    const PARTITIONS: u32 = 8;
    const KEYS: u32 = 100;
    const PER_KEY: u32 = 10;
    const LANES: u32 = 5;
    let fx = h.fixture(PARTITIONS).await?;
    let topic = fx.topic("order");
    let group = fx.group("workers");
    let mut crew = Crew::new(&fx);
    crew.run("a", fx.bus.subscribe(&topic, &group).await?);
    crew.run("b", fx.bus.subscribe(&topic, &group).await?);
    let owners = crew.settle(&fx, &topic).await?;
    crew.start_committing();

    // Publishers each owning a fifth of the keys, interleaving keys and sequence numbers.
    let mut publishers = Vec::new();
    for lane in 0..LANES {
        let bus = Arc::clone(&fx.bus);
        let topic = topic.clone();
        publishers.push(tokio::spawn(async move {
            for seq in 0..PER_KEY {
                for key in (lane..KEYS).step_by(LANES as usize) {
                    let key = format!("instance-{key}");
                    bus.publish(&topic, &key, payload(&key, seq)).await?;
                }
                tokio::task::yield_now().await;
            }
            Ok::<_, BusError>(())
        }));
    }
    for publisher in publishers {
        timeout(fx.deadline, publisher)
            .await
            .context("a publisher did not finish")?
            .context("a publisher panicked")??;
    }

    let seen = crew.collect((KEYS * PER_KEY) as usize).await?;
    crew.quiet("a message came twice").await?;
    crew.stop().await?;

    let mut per_key: HashMap<String, (&str, Vec<u32>)> = HashMap::new();
    let mut delivered = BTreeSet::new();
    for Seen { member, msg } in &seen {
        let (key, seq) = decode(msg)?;
        ensure!(msg.partition == partition_for(&key, PARTITIONS), "{msg:?}");
        ensure!(
            delivered.insert((msg.partition, msg.offset)),
            "delivered twice: {msg:?}"
        );
        ensure!(
            owners.get(&msg.partition) == Some(member),
            "partition {} belongs to {:?}, yet {member} consumed {msg:?}",
            msg.partition,
            owners.get(&msg.partition)
        );
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
    let members: BTreeSet<&str> = seen.iter().map(|s| s.member).collect();
    ensure!(members.len() == 2, "both members get work: {members:?}");
    Ok(())
}

/// `Bus::subscribe`, several groups: each group sees every message once, however many
/// members it has.
pub async fn every_group_gets_every_message(h: &dyn Harness) -> Result<()> {
    const PARTITIONS: u32 = 4;
    const N: u32 = 300;
    let fx = h.fixture(PARTITIONS).await?;
    let topic = fx.topic("events");
    let mut audit = Crew::new(&fx);
    audit.run("audit", fx.bus.subscribe(&topic, &fx.group("audit")).await?);
    let mut billing = Crew::new(&fx);
    billing.run(
        "billing-1",
        fx.bus.subscribe(&topic, &fx.group("billing")).await?,
    );
    billing.run(
        "billing-2",
        fx.bus.subscribe(&topic, &fx.group("billing")).await?,
    );
    audit.settle(&fx, &topic).await?;
    let billing_owners = billing.settle(&fx, &topic).await?;
    audit.start_committing();
    billing.start_committing();

    for i in 0..N {
        let key = format!("instance-{}", i % 37);
        fx.bus.publish(&topic, &key, payload(&key, i)).await?;
    }
    for (name, crew) in [("audit", &mut audit), ("billing", &mut billing)] {
        let seen = crew
            .collect(N as usize)
            .await
            .with_context(|| format!("group {name}"))?;
        let mut seqs = BTreeSet::new();
        for Seen { member, msg } in &seen {
            let seq = seq_of(msg)?;
            ensure!(seqs.insert(seq), "{name} got {seq} twice");
            if name == "billing" {
                ensure!(
                    billing_owners.get(&msg.partition) == Some(member),
                    "{member} consumed partition {} of {:?}",
                    msg.partition,
                    billing_owners.get(&msg.partition)
                );
            }
        }
        ensure!(seqs.len() == N as usize, "{name} got {} of {N}", seqs.len());
    }
    let (a, b) = tokio::join!(
        audit.quiet("audit got a message twice"),
        billing.quiet("billing got a message twice")
    );
    a?;
    b?;
    audit.stop().await?;
    billing.stop().await?;
    Ok(())
}

/// `Bus::subscribe`: a group new to the topic starts at the earliest message it holds, even
/// when another group is already reading it.
pub async fn a_new_group_starts_at_the_earliest_message(h: &dyn Harness) -> Result<()> {
    const PARTITIONS: u32 = 2;
    const PER_KEY: u32 = 3;
    let fx = h.fixture(PARTITIONS).await?;
    let topic = fx.topic("early");
    let keys = (0..PARTITIONS)
        .map(|p| key_on(p, PARTITIONS, "instance"))
        .collect::<Result<Vec<_>>>()?;
    // Published before any group subscribed (and before the topic existed).
    for seq in 0..PER_KEY {
        for key in &keys {
            fx.bus.publish(&topic, key, payload(key, seq)).await?;
        }
    }
    let check = |got: &[Message], group: &str| -> Result<()> {
        let mut per_partition: BTreeMap<u32, Vec<(u64, u32)>> = BTreeMap::new();
        for msg in got {
            per_partition
                .entry(msg.partition)
                .or_default()
                .push((msg.offset, seq_of(msg)?));
        }
        let expected: Vec<(u64, u32)> = (0..PER_KEY).map(|s| (u64::from(s), s)).collect();
        ensure!(
            per_partition.len() == PARTITIONS as usize
                && per_partition.values().all(|v| *v == expected),
            "group {group} read (offset, seq) per partition {per_partition:?}"
        );
        Ok(())
    };
    let n = (PARTITIONS * PER_KEY) as usize;
    let mut first = fx.bus.subscribe(&topic, &fx.group("first")).await?;
    let first_got = read_data(&fx, first.as_mut(), n).await?;
    check(&first_got, "first")?;
    // `first` has read everything and committed nothing yet.
    let mut second = fx.bus.subscribe(&topic, &fx.group("second")).await?;
    let second_got = read_data(&fx, second.as_mut(), n).await?;
    check(&second_got, "second")?;
    for msg in &first_got {
        first.commit(msg).await?;
    }
    for msg in &second_got {
        second.commit(msg).await?;
    }
    Ok(())
}

/// `Subscription::commit` and dropping a member: when a member leaves, the remaining member
/// takes its partition over from the committed offset: what the leaver read without committing
/// is delivered again (same offsets), what it committed is not (a commit covers the messages
/// before it), and nothing is delivered twice to the new owner.
pub async fn uncommitted_messages_go_to_the_remaining_member_when_one_drops(
    h: &dyn Harness,
) -> Result<()> {
    const PARTITIONS: u32 = 2;
    let fx = h.fixture(PARTITIONS).await?;
    let topic = fx.topic("handover");
    let group = fx.group("workers");
    let mut crew = Crew::new(&fx);
    crew.run("a", fx.bus.subscribe(&topic, &group).await?);
    crew.run("b", fx.bus.subscribe(&topic, &group).await?);
    let owners = crew.settle(&fx, &topic).await?;
    crew.start_committing();
    let mut a = crew.take("a").await?;

    // A key on a partition `a` owns: `a` reads five messages, commits the second, then leaves.
    let owned = owners
        .iter()
        .find_map(|(p, m)| (*m == "a").then_some(*p))
        .context("a owns a partition")?;
    let key = key_on(owned, PARTITIONS, "instance")?;
    for seq in 0..5 {
        fx.bus.publish(&topic, &key, payload(&key, seq)).await?;
    }
    let read = read_data(&fx, a.as_mut(), 5).await?;
    let seqs = read.iter().map(seq_of).collect::<Result<Vec<_>>>()?;
    ensure!(seqs == [0, 1, 2, 3, 4], "a read {seqs:?}");
    a.commit(&read[1]).await?;
    crew.quiet("b must not get a's partition while a is there")
        .await?;
    drop(a);

    let got = crew.collect(3).await?;
    let seqs = got
        .iter()
        .map(|s| seq_of(&s.msg))
        .collect::<Result<Vec<_>>>()?;
    ensure!(seqs == [2, 3, 4], "redelivered {seqs:?}");
    let offsets: Vec<u64> = got.iter().map(|s| s.msg.offset).collect();
    let before: Vec<u64> = read[2..].iter().map(|m| m.offset).collect();
    ensure!(
        offsets == before,
        "redelivered at {offsets:?}, read at {before:?}"
    );
    ensure!(got.iter().all(|s| s.member == "b"));
    crew.quiet("nothing is delivered twice to b").await?;
    crew.stop().await?;
    Ok(())
}

/// Dropping the only member: the next subscriber of the group starts after the last commit.
pub async fn a_dropped_sole_member_hands_over_to_the_next_subscriber(
    h: &dyn Harness,
) -> Result<()> {
    let fx = h.fixture(4).await?;
    let topic = fx.topic("sole");
    let group = fx.group("workers");
    let mut a = fx.bus.subscribe(&topic, &group).await?;
    for seq in 0..4 {
        fx.bus
            .publish(&topic, "instance-7", payload("instance-7", seq))
            .await?;
    }
    let first = next_data(&fx, a.as_mut()).await?;
    ensure!(seq_of(&first)? == 0, "got {first:?}");
    a.commit(&first).await?;
    let uncommitted = next_data(&fx, a.as_mut()).await?;
    ensure!(seq_of(&uncommitted)? == 1, "got {uncommitted:?}");
    drop(a);

    let mut b = fx.bus.subscribe(&topic, &group).await?;
    let got = read_data(&fx, b.as_mut(), 3).await?;
    let seqs = got.iter().map(seq_of).collect::<Result<Vec<_>>>()?;
    ensure!(seqs == [1, 2, 3], "got {seqs:?}");
    ensure!(got[0].offset == uncommitted.offset, "{:?}", got[0]);
    Ok(())
}

/// `Subscription::commit`: committing an earlier message after a later one (or the same one
/// twice) succeeds and does not move the group back; a commit covers every earlier message of
/// the partition.
pub async fn commits_never_move_backwards(h: &dyn Harness) -> Result<()> {
    let fx = h.fixture(2).await?;
    let topic = fx.topic("forward");
    let group = fx.group("workers");
    // Another group that commits nothing: an adapter may not hide a backward commit by having
    // dropped the messages already.
    let _bystander = fx.bus.subscribe(&topic, &fx.group("bystander")).await?;
    let mut a = fx.bus.subscribe(&topic, &group).await?;
    for seq in 0..6 {
        fx.bus
            .publish(&topic, "instance-3", payload("instance-3", seq))
            .await?;
    }
    let read = read_data(&fx, a.as_mut(), 6).await?;
    a.commit(&read[3]).await?;
    a.commit(&read[3])
        .await
        .context("a repeated commit is a no-op")?;
    a.commit(&read[1])
        .await
        .context("an older commit is a no-op")?;
    drop(a);

    let mut b = fx.bus.subscribe(&topic, &group).await?;
    let got = next_data(&fx, b.as_mut()).await?;
    ensure!(
        got.offset == read[4].offset && seq_of(&got)? == 4,
        "the group resumed at {got:?}, not after the highest commit"
    );
    Ok(())
}

/// Rebalancing on a join, then a leave. On the join the new member takes some partitions and
/// the old member keeps the others; each message goes to its partition's current owner only;
/// the old member's commits on moved partitions fail with `NotAssigned` while they work on kept
/// ones; what it read from a moved partition without committing goes to the new owner;
/// committed messages are never delivered again. When the new member leaves, the old one gets
/// the partitions back from the group's commits, not from where it had read before.
pub async fn a_join_and_a_leave_move_partitions_cleanly(h: &dyn Harness) -> Result<()> {
    const PARTITIONS: u32 = 4;
    let fx = h.fixture(PARTITIONS).await?;
    let topic = fx.topic("join");
    let group = fx.group("workers");
    let keys = (0..PARTITIONS)
        .map(|p| key_on(p, PARTITIONS, "instance"))
        .collect::<Result<Vec<_>>>()?;
    let mut a = fx.bus.subscribe(&topic, &group).await?;

    // `a` alone: on every partition it commits seq 0, then reads seq 1 without committing.
    let mut committed: BTreeMap<u32, Message> = BTreeMap::new();
    let mut pending: BTreeMap<u32, Message> = BTreeMap::new();
    for key in &keys {
        fx.bus.publish(&topic, key, payload(key, 0)).await?;
    }
    for msg in read_data(&fx, a.as_mut(), keys.len()).await? {
        a.commit(&msg).await?;
        committed.insert(msg.partition, msg);
    }
    for key in &keys {
        fx.bus.publish(&topic, key, payload(key, 1)).await?;
    }
    for msg in read_data(&fx, a.as_mut(), keys.len()).await? {
        ensure!(seq_of(&msg)? == 1, "{msg:?}");
        pending.insert(msg.partition, msg);
    }
    ensure!(
        committed.len() == PARTITIONS as usize && pending.len() == PARTITIONS as usize,
        "every partition has a message: {committed:?} {pending:?}"
    );

    let b = fx.bus.subscribe(&topic, &group).await?;
    let mut crew = Crew::new(&fx);
    crew.run("a", a);
    crew.run("b", b);
    let owners = crew.settle(&fx, &topic).await?;
    let (mut subs, during) = crew.stop().await?;
    let moved: BTreeSet<u32> = owners
        .iter()
        .filter_map(|(p, m)| (*m == "b").then_some(*p))
        .collect();
    let kept: BTreeSet<u32> = owners
        .iter()
        .filter_map(|(p, m)| (*m == "a").then_some(*p))
        .collect();
    ensure!(
        !moved.is_empty() && !kept.is_empty(),
        "owners after the join: {owners:?}"
    );

    // What arrived during the rebalance: only uncommitted messages, each to its new owner.
    let mut redelivered = BTreeSet::new();
    for Seen { member, msg } in &during {
        ensure!(
            seq_of(msg)? == 1,
            "a committed message was delivered again, to {member}: {msg:?}"
        );
        let owner = owners.get(&msg.partition).copied();
        ensure!(
            owner == Some(*member),
            "{member} got {msg:?} of a partition of {owner:?}"
        );
        redelivered.insert(msg.partition);
    }
    ensure!(
        moved.is_subset(&redelivered),
        "a's uncommitted messages of partitions {moved:?} must go to b; redelivered: {redelivered:?}"
    );

    let mut a = subs.remove("a").context("a's subscription")?;
    let b = subs.remove("b").context("b's subscription")?;
    for p in &moved {
        for msg in [&pending[p], &committed[p]] {
            let result = a.commit(msg).await;
            ensure!(
                not_assigned(&result, *p),
                "a commit on moved partition {p} must fail with NotAssigned, got {result:?}"
            );
        }
    }
    for p in &kept {
        a.commit(&pending[p])
            .await
            .with_context(|| format!("committing on kept partition {p}"))?;
    }

    // `b` leaves without having committed anything: `a` gets the partitions back from the
    // group's commits, so what both read there without committing comes again (not resumed
    // from where `a` had read before the join), and nothing committed does.
    drop(b);
    let mut crew = Crew::new(&fx);
    crew.start_committing();
    crew.run("a", a);
    let regained = crew.collect(moved.len()).await?;
    let mut partitions = BTreeSet::new();
    for Seen { member, msg } in &regained {
        ensure!(
            *member == "a" && seq_of(msg)? == 1 && moved.contains(&msg.partition),
            "after b left, {member} got {msg:?}; expected the uncommitted seq 1 of {moved:?}"
        );
        partitions.insert(msg.partition);
    }
    ensure!(partitions == moved, "regained {partitions:?} of {moved:?}");
    for key in &keys {
        fx.bus.publish(&topic, key, payload(key, 2)).await?;
    }
    let after = crew.collect(keys.len()).await?;
    crew.quiet("a message came twice after the leave").await?;
    let mut partitions = BTreeSet::new();
    for Seen { member, msg } in &after {
        ensure!(
            *member == "a" && seq_of(msg)? == 2,
            "after b left, {member} got {msg:?}"
        );
        partitions.insert(msg.partition);
    }
    ensure!(partitions.len() == PARTITIONS as usize, "{partitions:?}");
    crew.stop().await?;
    Ok(())
}

/// At-least-once through a rebalance: while messages keep coming and a member keeps
/// committing, a second member joins. A commit refused with `NotAssigned` meanwhile is dropped
/// by its member (as the contract asks), so whoever owns the partition must receive the message
/// again: every message ends up committed by some member (duplicates are allowed).
pub async fn no_message_is_lost_while_a_member_joins(h: &dyn Harness) -> Result<()> {
    const PARTITIONS: u32 = 4;
    /// Rounds (one message per partition) published after `b` received its first message.
    const ROUNDS_AFTER_JOIN: u32 = 30;
    /// Bound on the rounds, whatever happens.
    const MAX_ROUNDS: u32 = 5000;
    let fx = h.fixture(PARTITIONS).await?;
    let topic = fx.topic("stream");
    let group = fx.group("workers");
    let keys = (0..PARTITIONS)
        .map(|p| key_on(p, PARTITIONS, "instance"))
        .collect::<Result<Vec<_>>>()?;
    let mut crew = Crew::new(&fx);
    crew.start_committing();
    crew.run("a", fx.bus.subscribe(&topic, &group).await?);

    // One round per partition at a time, until told to stop; returns the rounds published.
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let publisher = {
        let bus = Arc::clone(&fx.bus);
        let topic = topic.clone();
        let keys = keys.clone();
        tokio::spawn(async move {
            for seq in 0..MAX_ROUNDS {
                if *stop_rx.borrow_and_update() {
                    return Ok(seq);
                }
                for key in &keys {
                    bus.publish(&topic, key, payload(key, seq)).await?;
                }
                tokio::task::yield_now().await;
            }
            Ok::<_, BusError>(MAX_ROUNDS)
        })
    };

    let mut committed: BTreeSet<(String, u32)> = BTreeSet::new();
    // `a` alone is consuming and committing...
    for seen in crew.collect(keys.len() * 5).await? {
        committed.insert(decode(&seen.msg)?);
    }
    // ... when `b` joins; the stream goes on until `b` has received some of it.
    crew.run("b", fx.bus.subscribe(&topic, &group).await?);
    let started = Instant::now();
    let mut b_first: Option<u32> = None;
    let mut newest = 0;
    loop {
        let seen = crew.recv().await.context("while b joins")?;
        committed.insert(decode(&seen.msg)?);
        let seq = seq_of(&seen.msg)?;
        newest = newest.max(seq);
        if seen.member == "b" && b_first.is_none() {
            b_first = Some(seq);
        }
        if b_first.is_some_and(|first| newest >= first + ROUNDS_AFTER_JOIN) {
            break;
        }
        ensure!(
            started.elapsed() < fx.deadline,
            "b received nothing within {:?}",
            fx.deadline
        );
    }
    stop_tx.send_replace(true);
    let rounds = timeout(fx.deadline, publisher)
        .await
        .context("the publisher did not stop")?
        .context("the publisher panicked")??;

    // Every message published must end up committed by someone.
    let expected = rounds as usize * keys.len();
    let until = Instant::now() + fx.deadline;
    while committed.len() < expected && Instant::now() < until {
        let left = until.saturating_duration_since(Instant::now());
        match timeout(left, crew.recv()).await {
            Ok(seen) => {
                committed.insert(decode(&seen?.msg)?);
            }
            Err(_) => break,
        }
    }
    if committed.len() < expected {
        let missing: Vec<(String, u32)> = keys
            .iter()
            .flat_map(|k| (0..rounds).map(move |s| (k.clone(), s)))
            .filter(|m| !committed.contains(m))
            .take(20)
            .collect();
        bail!(
            "{} of {expected} messages were never committed by any member (a commit refused \
             during the rebalance, the message dropped and not delivered again?); first ones: \
             {missing:?}",
            expected - committed.len()
        );
    }
    crew.stop().await?;
    Ok(())
}

/// `Subscription::commit` refuses what it was not given, with errors that are not retryable: a
/// message of another topic (`UnknownTopic`), an offset the partition has not reached
/// (`OffsetOutOfRange`), a partition the topic does not have (`UnknownPartition` or
/// `NotAssigned`: it is not this member's either). The real message then commits, twice.
pub async fn commits_of_messages_not_delivered_here_are_refused(h: &dyn Harness) -> Result<()> {
    const PARTITIONS: u32 = 2;
    let fx = h.fixture(PARTITIONS).await?;
    let topic = fx.topic("checked");
    let mut sub = fx.bus.subscribe(&topic, &fx.group("workers")).await?;
    fx.bus
        .publish(&topic, "instance-1", payload("instance-1", 0))
        .await?;
    let msg = next_data(&fx, sub.as_mut()).await?;

    let mut foreign = msg.clone();
    foreign.topic = fx.topic("elsewhere");
    let result = sub.commit(&foreign).await;
    ensure!(
        matches!(&result, Err(BusError::UnknownTopic { topic }) if *topic == foreign.topic),
        "another topic: {result:?}"
    );
    let mut beyond = msg.clone();
    beyond.offset = 99;
    let result = sub.commit(&beyond).await;
    ensure!(
        matches!(&result, Err(BusError::OffsetOutOfRange { offset: 99, .. })),
        "an offset not reached: {result:?}"
    );
    let mut nowhere = msg.clone();
    nowhere.partition = PARTITIONS + 5;
    let result = sub.commit(&nowhere).await;
    ensure!(
        matches!(
            &result,
            Err(BusError::UnknownPartition { partition, .. } | BusError::NotAssigned { partition, .. })
                if *partition == PARTITIONS + 5
        ),
        "a partition the topic does not have: {result:?}"
    );
    for refused in [&foreign, &beyond, &nowhere] {
        let result = sub.commit(refused).await;
        ensure!(
            matches!(&result, Err(e) if !e.is_retryable()),
            "a refused commit is final: {result:?}"
        );
    }
    sub.commit(&msg).await?;
    sub.commit(&msg).await.context("repeating a commit")?;
    Ok(())
}

/// Shutting the bus down (each adapter's `shutdown()`): a waiting `next()` returns `Ok(None)`,
/// later ones too even with messages pending; `publish`, `publish_batch` and `subscribe` fail
/// with `Closed`.
pub async fn shutdown_ends_waiting_and_future_calls(h: &dyn Harness) -> Result<()> {
    let fx = h.fixture(2).await?;
    let (idle_topic, busy_topic) = (fx.topic("idle"), fx.topic("busy"));
    let mut idle = fx
        .bus
        .subscribe(&idle_topic, &fx.group("idle-workers"))
        .await?;
    let mut busy = fx
        .bus
        .subscribe(&busy_topic, &fx.group("busy-workers"))
        .await?;
    fx.bus
        .publish(&busy_topic, "instance-1", payload("instance-1", 0))
        .await?;
    fx.bus
        .publish(&busy_topic, "instance-1", payload("instance-1", 1))
        .await?;
    // `busy` surely has the topic assigned and its messages coming once one arrived.
    let first = next_data(&fx, busy.as_mut()).await?;
    ensure!(seq_of(&first)? == 0, "{first:?}");
    let mut waiting = tokio::spawn(async move { idle.next().await });
    // Nothing was published to `idle`'s topic: its next() must wait (and be waiting when the
    // bus shuts down).
    if let Ok(early) = timeout(fx.quiet, &mut waiting).await {
        bail!("next() on an empty topic returned {early:?}");
    }

    fx.shutdown();
    let ended = timeout(fx.deadline, waiting)
        .await
        .context("a waiting next() must return on shutdown")?
        .context("the waiting task panicked")?;
    ensure!(matches!(ended, Ok(None)), "a waiting next() got {ended:?}");
    for attempt in 0..2 {
        let got = timeout(fx.deadline, busy.next())
            .await
            .context("next() after shutdown must return at once")?;
        ensure!(
            matches!(got, Ok(None)),
            "next() #{attempt} after shutdown, a message pending: {got:?}"
        );
    }
    let published = fx.bus.publish(&busy_topic, "instance-1", Vec::new()).await;
    ensure!(
        matches!(published, Err(BusError::Closed)),
        "publish: {published:?}"
    );
    let batch = vec![Outgoing {
        topic: busy_topic.clone(),
        key: "instance-1".into(),
        payload: Vec::new(),
    }];
    let published = fx.bus.publish_batch(batch).await;
    ensure!(
        matches!(published, Err(BusError::Closed)),
        "publish_batch: {published:?}"
    );
    let subscribed = fx
        .bus
        .subscribe(&busy_topic, &fx.group("late"))
        .await
        .map(|_| ());
    ensure!(
        matches!(subscribed, Err(BusError::Closed)),
        "subscribe: {subscribed:?}"
    );
    Ok(())
}

/// [`NamedBus`] over the adapter: topics get the prefix (or their explicit name), consumer
/// groups get the prefix, callers see logical topic names and commit with them. Two
/// deployments with different prefixes do not see each other's topics, and on a topic both map
/// explicitly, their same-named groups are distinct groups that each get every message.
pub async fn named_bus_prefixes_topics_and_groups(h: &dyn Harness) -> Result<()> {
    let fx = h.fixture(1).await?;
    let shared_physical = fx.topic("shared-physical");
    let naming = |tenant: &str| Naming {
        prefix: fx.topic(&format!("{tenant}.")),
        topics: BTreeMap::from([("shared".to_owned(), shared_physical.clone())]),
    };
    let tenant_a = NamedBus::new(Arc::clone(&fx.bus), naming("tenant-a"));
    let tenant_b = NamedBus::new(Arc::clone(&fx.bus), naming("tenant-b"));
    let a_orders_physical = fx.topic("tenant-a.orders");
    ensure!(tenant_a.naming().topic("orders") == a_orders_physical);

    // One group per topic: a Kafka group spans topics, the in-process bus's does not.
    let mut spy = fx
        .bus
        .subscribe(&a_orders_physical, &fx.group("spy-orders"))
        .await?;
    let mut a_orders = tenant_a.subscribe("orders", "orders-workers").await?;
    let mut b_orders = tenant_b.subscribe("orders", "orders-workers").await?;
    tenant_a
        .publish("orders", "instance-1", payload("instance-1", 0))
        .await?;
    tenant_a
        .publish_batch(vec![Outgoing {
            topic: "orders".into(),
            key: "instance-1".into(),
            payload: payload("instance-1", 1),
        }])
        .await?;
    tenant_b
        .publish("orders", "instance-1", payload("instance-1", 100))
        .await?;

    for seq in 0..2 {
        let seen = next_data(&fx, spy.as_mut()).await?;
        ensure!(
            seen.topic == a_orders_physical && seq_of(&seen)? == seq,
            "the cluster holds {seen:?}"
        );
        let got = next_data(&fx, a_orders.as_mut()).await?;
        ensure!(
            got.topic == "orders" && seq_of(&got)? == seq,
            "tenant a got {got:?}"
        );
        a_orders
            .commit(&got)
            .await
            .context("committing with the logical topic name")?;
    }
    let got = next_data(&fx, b_orders.as_mut()).await?;
    ensure!(
        got.topic == "orders" && seq_of(&got)? == 100,
        "tenant b must see only its own topic, got {got:?}"
    );
    b_orders.commit(&got).await?;

    // Same physical topic, same logical group name: two groups, each gets the message.
    let mut raw_shared = fx
        .bus
        .subscribe(&shared_physical, &fx.group("spy-shared"))
        .await?;
    let mut a_shared = tenant_a.subscribe("shared", "shared-workers").await?;
    let mut b_shared = tenant_b.subscribe("shared", "shared-workers").await?;
    tenant_a
        .publish("shared", "instance-2", payload("instance-2", 7))
        .await?;
    let seen = next_data(&fx, raw_shared.as_mut()).await?;
    ensure!(
        seen.topic == shared_physical && seq_of(&seen)? == 7,
        "the explicit name wins over the prefix: {seen:?}"
    );
    for (tenant, sub) in [("a", &mut a_shared), ("b", &mut b_shared)] {
        let got = next_data(&fx, sub.as_mut())
            .await
            .with_context(|| format!("tenant {tenant}'s group must get the message too"))?;
        ensure!(
            got.topic == "shared" && seq_of(&got)? == 7,
            "tenant {tenant} got {got:?}"
        );
        sub.commit(&got).await?;
    }
    Ok(())
}
