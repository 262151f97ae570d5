//! The Apache Kafka adapter of the workflow engine's bus: [`KafkaBus`] implements
//! [`workflow_bus::Bus`] with rdkafka (librdkafka), for the distributed mode.
//!
//! # What this crate owns
//! - [`KafkaBus`]: an idempotent producer (`enable.idempotence=true`, `acks=all`) that keys every
//!   message by instance id and picks its partition explicitly with
//!   [`workflow_bus::partition_for`] (Kafka's murmur2, as Java clients do; librdkafka's own
//!   default partitioner would put the key elsewhere), so the in-process bus and Kafka route a
//!   key identically. [`Bus::publish`] returns once the broker acknowledged the message.
//!   Delivery reports reach the waiting publishers through a thread of the `producer` module,
//!   not rdkafka's `FutureProducer` (whose poll loop spins: see that module).
//! - [`KafkaSubscription`]: one `StreamConsumer` per subscription (one member of a consumer
//!   group) with `enable.auto.commit=false`, `enable.auto.offset.store=false` and
//!   `auto.offset.reset=earliest`. [`Subscription::commit`] commits `offset + 1` of that
//!   partition synchronously. A rebalance hands a partition's uncommitted messages to its next
//!   owner; a commit on a partition this member no longer owns fails with
//!   [`BusError::NotAssigned`]. Its context logs every assignment and revocation. As in any
//!   Kafka client, rebalances are processed while the member is polled: a member must keep
//!   awaiting [`Subscription::next`] (one that stops for `max.poll.interval.ms` is dropped from
//!   the group), and the default assignor is `cooperative-sticky`.
//! - [`KafkaBus::ensure_topics`]: creates topics with the configured partitions and
//!   replication (an existing topic is left as it is); the bus calls it on first use of a topic,
//!   then waits until every partition's leader hosts it (brokers before Kafka 4.5 can reorder
//!   an idempotent producer's first requests to a partition that is not hosted yet).
//! - The mapping of every rdkafka error to a [`BusError`]: transport failures, timeouts, full
//!   queues and leader/coordinator moves are [`BusError::Unavailable`] (retryable); refusals
//!   (authorisation, too large, bad config) are [`BusError::Backend`].
//!
//! # What it must never do
//! - Know what a payload means: payloads are opaque bytes.
//! - Let configuration undo the delivery guarantees: [`KafkaConfig::extra`] is applied to every
//!   client, but the settings above (idempotence, acks, manual commits, no offset auto-store)
//!   are set after it and cannot be overridden.
//! - Commit on a consumer's behalf, or move a committed offset backwards.
//! - Route a key with anything but `partition_for` over the topic's real partition count (read
//!   from the cluster's metadata, not assumed from the configuration).
//! - Block the async runtime: librdkafka's blocking calls (metadata, synchronous commits,
//!   closing a consumer) run on tokio's blocking threads.
//! - Panic on what callers or the broker send: every failure is a [`BusError`].
//!
//! # How librdkafka is built (the one supported way)
//! `rdkafka` 0.38 with `default-features = false, features = ["cmake-build", "tokio",
//! "libz-static"]`, and `rdkafka-sys` pinned to `=4.9.0` (librdkafka 2.10.0): librdkafka is
//! compiled from the source vendored in `rdkafka-sys` with CMake (3.x) and the system C
//! compiler, statically linked, with zlib compiled in (`libz-static`) and without TLS, SASL,
//! zstd or curl. So a build needs only `cmake`, `gcc`/`cc` and `make`: no system librdkafka, no
//! OpenSSL headers. The first build of librdkafka takes a minute or two. rdkafka 0.39
//! (librdkafka 2.12) is not used: without curl its CMake build does not compile
//! (`#ifdef WITH_OAUTHBEARER_OIDC` on a 0/1 define; rust-rdkafka#829, librdkafka#5135).
//! Connecting to a cluster that needs TLS or SASL would need the `ssl`/`sasl` features: add them
//! deliberately, with their system dependencies, when a deployment needs them.

mod consumer;
mod error;
mod producer;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::Consumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{ClientConfig, ClientContext};
use tokio::sync::watch;
use workflow_bus::{partition_for, Bus, BusError, Outgoing, Subscription};

/// How long a publish waits before retrying an enqueue that librdkafka's full queue refused.
const QUEUE_FULL_RETRY: Duration = Duration::from_millis(10);

pub use consumer::{Assignment, KafkaSubscription};

/// How to reach and use a Kafka cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaConfig {
    /// `bootstrap.servers`: `host:port[,host:port...]`.
    pub bootstrap: String,
    /// `client.id` of the producer and the admin client; consumers add `-<group>`.
    pub client_id: String,
    /// Partitions of the topics this bus creates. The partition of a key is computed from the
    /// topic's actual partition count, read from the cluster.
    pub partitions: i32,
    /// Replication factor of the topics this bus creates.
    pub replication: i32,
    /// Bound of every request to the cluster: metadata, topic creation, delivery of a
    /// published message (`message.timeout.ms`), waiting for room in the producer's queue.
    pub timeout: Duration,
    /// More librdkafka properties, applied to every client (producer, admin, consumers) after
    /// the bus's defaults and before the settings the delivery guarantees rest on. For example
    /// `session.timeout.ms`, `partition.assignment.strategy`, `security.protocol`.
    pub extra: BTreeMap<String, String>,
}

impl KafkaConfig {
    /// The defaults: client id `payos-workflow`, 8 partitions, replication 1, 30 s timeout.
    pub fn new(bootstrap: impl Into<String>) -> KafkaConfig {
        KafkaConfig {
            bootstrap: bootstrap.into(),
            client_id: "payos-workflow".into(),
            partitions: 8,
            replication: 1,
            timeout: Duration::from_secs(30),
            extra: BTreeMap::new(),
        }
    }

    /// `self` with librdkafka property `key` set to `value` (see [`KafkaConfig::extra`]).
    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> KafkaConfig {
        self.extra.insert(key.into(), value.into());
        self
    }

    fn validate(&self) -> Result<(), BusError> {
        let invalid = |reason: String| Err(BusError::Backend { reason });
        if self.bootstrap.trim().is_empty() {
            return invalid("kafka config: bootstrap servers are empty".into());
        }
        if self.partitions < 1 {
            return invalid(format!(
                "kafka config: partitions must be at least 1, not {}",
                self.partitions
            ));
        }
        if self.replication < 1 {
            return invalid(format!(
                "kafka config: replication must be at least 1, not {}",
                self.replication
            ));
        }
        if self.timeout < Duration::from_millis(100) {
            return invalid(format!(
                "kafka config: timeout {:?} is below 100ms",
                self.timeout
            ));
        }
        Ok(())
    }

    fn millis(&self) -> String {
        self.timeout.as_millis().to_string()
    }

    /// The common part of every client's configuration, with the extras applied.
    fn client(&self, client_id: &str) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap)
            .set("client.id", client_id)
            .set("socket.timeout.ms", self.millis());
        for (key, value) in &self.extra {
            config.set(key, value);
        }
        config
    }

    fn producer(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap)
            .set("client.id", &self.client_id)
            .set("socket.timeout.ms", self.millis())
            .set("message.timeout.ms", self.millis())
            // No lingering: every send is a batch already (the relay's fast path hands over
            // all it holds) or a call waiting on it (an approval's decision), and messages
            // still batch behind a request in flight. 1 ms added ~4 ms to a seed instance's
            // end-to-end latency paced, and saved the broker nothing (docs/benchmarks.md 83).
            .set("linger.ms", "0");
        for (key, value) in &self.extra {
            config.set(key, value);
        }
        // What the delivery guarantees rest on: not overridable.
        config.set("enable.idempotence", "true").set("acks", "all");
        config
    }

    fn consumer(&self, group: &str) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap)
            .set("client.id", format!("{}-{group}", self.client_id))
            .set("socket.timeout.ms", self.millis())
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "cooperative-sticky")
            // A killed member's partitions move within seconds, not librdkafka's 45 s.
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500")
            .set("enable.partition.eof", "false");
        for (key, value) in &self.extra {
            config.set(key, value);
        }
        // What the delivery guarantees rest on: not overridable.
        config
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        config
    }
}

/// The client context of the producer and the admin client: librdkafka's log and its
/// asynchronous errors go to `tracing`.
pub(crate) struct LogContext {
    pub(crate) name: String,
}

impl ClientContext for LogContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        let client = &self.name;
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => tracing::error!(client, fac, "librdkafka: {log_message}"),
            RDKafkaLogLevel::Warning => tracing::warn!(client, fac, "librdkafka: {log_message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(client, fac, "librdkafka: {log_message}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(client, fac, "librdkafka: {log_message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // Mostly transient (a broker went away); librdkafka recovers on its own.
        tracing::warn!(client = %self.name, error = %error, "librdkafka: {reason}");
    }
}

/// The names in `map` that start with `prefix`.
fn named<'a, V>(map: &'a BTreeMap<String, V>, prefix: &str) -> Vec<&'a str> {
    map.keys()
        .filter(|name| name.starts_with(prefix))
        .map(String::as_str)
        .collect()
}

/// The per-name results of an admin request: a name failing with `already` (created before,
/// deleted before) counts as done; any other failure is an error naming `action` and the name.
/// The names the request changed.
fn changed(
    results: Vec<Result<String, (String, RDKafkaErrorCode)>>,
    already: RDKafkaErrorCode,
    action: &str,
) -> Result<Vec<String>, BusError> {
    let mut done = Vec::new();
    for result in results {
        match result {
            Ok(name) => done.push(name),
            Err((_, code)) if code == already => {}
            Err((name, code)) => return Err(error::from_code(code, &format!("{action} {name}"))),
        }
    }
    Ok(done)
}

/// A consumer group as the cluster reports it ([`KafkaBus::consumer_groups`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupState {
    /// `Stable` once every member has its partitions.
    pub state: String,
    pub members: usize,
}

/// The [`Bus`] on an Apache Kafka cluster. Cheap to clone: clones share the producer.
#[derive(Clone)]
pub struct KafkaBus {
    inner: Arc<Inner>,
}

struct Inner {
    config: KafkaConfig,
    producer: producer::Producer,
    admin: AdminClient<LogContext>,
    /// Partition count per topic, from the cluster's metadata.
    partitions: Mutex<HashMap<String, u32>>,
    shutdown: watch::Sender<bool>,
}

impl std::fmt::Debug for KafkaBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBus")
            .field("bootstrap", &self.inner.config.bootstrap)
            .field("client_id", &self.inner.config.client_id)
            .finish()
    }
}

impl KafkaBus {
    /// A bus on the cluster `config` names. Connects lazily: an unreachable cluster shows as
    /// [`BusError::Unavailable`] on first use, not here.
    pub fn new(config: KafkaConfig) -> Result<KafkaBus, BusError> {
        config.validate()?;
        let producer = producer::Producer::new(
            &config.producer(),
            LogContext {
                name: config.client_id.clone(),
            },
        )
        .map_err(|e| error::from_kafka(&e, "creating the kafka producer"))?;
        let admin_id = format!("{}-admin", config.client_id);
        let admin = config
            .client(&admin_id)
            .create_with_context(LogContext { name: admin_id })
            .map_err(|e| error::from_kafka(&e, "creating the kafka admin client"))?;
        let (shutdown, _) = watch::channel(false);
        Ok(KafkaBus {
            inner: Arc::new(Inner {
                config,
                producer,
                admin,
                partitions: Mutex::new(HashMap::new()),
                shutdown,
            }),
        })
    }

    /// The configuration this bus was made with.
    pub fn config(&self) -> &KafkaConfig {
        &self.inner.config
    }

    /// Stop: waiting and future [`Subscription::next`] calls return `Ok(None)`; publishing and
    /// subscribing fail with [`BusError::Closed`]. Messages already acknowledged stay in Kafka.
    pub fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
    }

    /// Whether [`KafkaBus::shutdown`] was called.
    pub fn is_shut_down(&self) -> bool {
        *self.inner.shutdown.borrow()
    }

    fn check_open(&self) -> Result<(), BusError> {
        if self.is_shut_down() {
            Err(BusError::Closed)
        } else {
            Ok(())
        }
    }

    /// Create the `topics` that do not exist yet, each with the configured partitions and
    /// replication. Topics that exist are left as they are (whatever their partition count).
    pub async fn ensure_topics(&self, topics: &[&str]) -> Result<(), BusError> {
        let mut names: Vec<&str> = topics.to_vec();
        names.sort_unstable();
        names.dedup();
        if names.is_empty() {
            return Ok(());
        }
        let config = &self.inner.config;
        let new: Vec<NewTopic<'_>> = names
            .iter()
            .map(|name| {
                NewTopic::new(
                    name,
                    config.partitions,
                    TopicReplication::Fixed(config.replication),
                )
            })
            .collect();
        let results = self
            .inner
            .admin
            .create_topics(&new, &self.admin_options())
            .await
            .map_err(|e| error::from_kafka(&e, &format!("creating topics {names:?}")))?;
        for name in changed(
            results,
            RDKafkaErrorCode::TopicAlreadyExists,
            "creating topic",
        )? {
            tracing::info!(
                topic = %name, partitions = config.partitions,
                replication = config.replication, "created topic"
            );
        }
        Ok(())
    }

    /// Options of an admin request: the configured timeout, for the request and the operation.
    fn admin_options(&self) -> AdminOptions {
        let timeout = self.inner.config.timeout;
        AdminOptions::new()
            .request_timeout(Some(timeout))
            .operation_timeout(Some(timeout))
    }

    /// Run `call` on the producer's librdkafka client on a blocking thread (its metadata,
    /// offsets and group calls block); `what` names the call if that thread fails.
    async fn on_client<T: Send + 'static>(
        &self,
        what: &str,
        call: impl FnOnce(&rdkafka::client::Client<producer::DeliveryContext>) -> T + Send + 'static,
    ) -> Result<T, BusError> {
        let producer = self.inner.producer.clone();
        tokio::task::spawn_blocking(move || call(producer.client()))
            .await
            .map_err(|e| BusError::Backend {
                reason: format!("{what} task failed: {e}"),
            })
    }

    /// Every topic the cluster has, with its partition count. Reads metadata only: unlike a
    /// lookup by name, it can never make a broker auto-create a topic.
    pub async fn existing_topics(&self) -> Result<BTreeMap<String, u32>, BusError> {
        let wait = self.inner.config.timeout;
        let metadata = self
            .on_client("metadata", move |client| client.fetch_metadata(None, wait))
            .await?
            .map_err(|e| error::from_kafka(&e, "listing the cluster's topics"))?;
        Ok(metadata
            .topics()
            .iter()
            .filter(|t| t.error().is_none())
            .map(|t| (t.name().to_owned(), t.partitions().len() as u32))
            .collect())
    }

    /// Delete `topics` and the consumer `groups` (those of a finished run: a broker slows
    /// down with every partition it keeps). Names that do not exist are not an error.
    pub async fn delete(&self, topics: &[&str], groups: &[&str]) -> Result<(), BusError> {
        let options = self.admin_options();
        if !topics.is_empty() {
            let results = self
                .inner
                .admin
                .delete_topics(topics, &options)
                .await
                .map_err(|e| error::from_kafka(&e, &format!("deleting topics {topics:?}")))?;
            changed(
                results,
                RDKafkaErrorCode::UnknownTopicOrPartition,
                "deleting topic",
            )?;
        }
        if !groups.is_empty() {
            let results = self
                .inner
                .admin
                .delete_groups(groups, &options)
                .await
                .map_err(|e| error::from_kafka(&e, &format!("deleting groups {groups:?}")))?;
            changed(results, RDKafkaErrorCode::GroupIdNotFound, "deleting group")?;
        }
        Ok(())
    }

    /// Delete every topic and consumer group whose name starts with `prefix` (a finished run's
    /// or test's). Topics go first: a group whose members died is only deletable once the
    /// broker has timed them out, and its error then leaves the topics deleted all the same.
    pub async fn delete_prefixed(&self, prefix: &str) -> Result<(), BusError> {
        self.delete_topics_prefixed(prefix).await?;
        let groups = self.consumer_groups().await?;
        self.delete(&[], &named(&groups, prefix)).await
    }

    /// Delete every topic whose name starts with `prefix` (the partitions are what a broker
    /// pays for; see [`KafkaBus::delete_prefixed`] for the groups too).
    pub async fn delete_topics_prefixed(&self, prefix: &str) -> Result<(), BusError> {
        let topics = self.existing_topics().await?;
        self.delete(&named(&topics, prefix), &[]).await
    }

    /// Every consumer group the cluster knows, with its state (`Stable`, `PreparingRebalance`,
    /// `CompletingRebalance`, `Empty`, `Dead`) and member count: how a deployment tells that
    /// its pools have settled (a group rebalancing holds its partitions back from everyone).
    pub async fn consumer_groups(&self) -> Result<BTreeMap<String, GroupState>, BusError> {
        let wait = self.inner.config.timeout;
        // The group list is a C object that cannot leave the blocking thread: read it there.
        let groups = self
            .on_client("group list", move |client| {
                client.fetch_group_list(None, wait).map(|list| {
                    list.groups()
                        .iter()
                        .map(|g| {
                            let state = GroupState {
                                state: g.state().to_owned(),
                                members: g.members().len(),
                            };
                            (g.name().to_owned(), state)
                        })
                        .collect::<BTreeMap<_, _>>()
                })
            })
            .await?
            .map_err(|e| error::from_kafka(&e, "listing the cluster's consumer groups"))?;
        Ok(groups)
    }

    /// Wait until each of `groups` is `Stable` with `members` members, polling the cluster's
    /// group list, for at most `within`. Members join one by one and each join is a
    /// rebalance that holds the group's partitions back, so work started before this can
    /// stall for seconds. A retryable error (a fresh broker's `CoordinatorLoadInProgress`)
    /// counts as not settled yet; on time-out the error names what was still unsettled.
    pub async fn wait_until_settled(
        &self,
        groups: &[String],
        members: usize,
        within: Duration,
    ) -> Result<(), BusError> {
        let deadline = Instant::now() + within;
        loop {
            let unsettled: Vec<String> = match self.consumer_groups().await {
                Ok(known) => groups
                    .iter()
                    .filter_map(|name| match known.get(name) {
                        Some(g) if g.state == "Stable" && g.members == members => None,
                        Some(g) => Some(format!("{name}: {} with {} members", g.state, g.members)),
                        None => Some(format!("{name}: not formed")),
                    })
                    .collect(),
                Err(e) if e.is_retryable() => vec![format!("listing the groups: {e}")],
                Err(e) => return Err(e),
            };
            if unsettled.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(BusError::Unavailable {
                    reason: format!(
                        "consumer groups did not settle within {} s ({members} members each): {}",
                        within.as_secs(),
                        unsettled.join("; ")
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// How many messages of `topic` consumer group `group` has not committed yet, over all
    /// partitions (a partition it never committed counts from its earliest message): zero for
    /// a pool that drained and committed everything it was given. Reads the group's committed
    /// offsets without joining it.
    pub async fn lag(&self, topic: &str, group: &str) -> Result<u64, BusError> {
        let partitions = self.partitions(topic).await?;
        let action = format!("reading the lag of group {group} on {topic}");
        let reader: rdkafka::consumer::BaseConsumer = self
            .inner
            .config
            .consumer(group)
            .create()
            .map_err(|e| error::from_kafka(&e, &action))?;
        let (topic, wait) = (topic.to_owned(), self.inner.config.timeout);
        let answer = tokio::task::spawn_blocking(move || -> Result<u64, KafkaError> {
            let mut asked = rdkafka::TopicPartitionList::new();
            for partition in 0..partitions {
                asked.add_partition(&topic, i32::try_from(partition).unwrap_or(i32::MAX));
            }
            let mut lag = 0u64;
            for entry in reader.committed_offsets(asked, wait)?.elements() {
                let (low, high) = reader.fetch_watermarks(&topic, entry.partition(), wait)?;
                let from = match entry.offset() {
                    rdkafka::Offset::Offset(committed) => committed.max(low),
                    _ => low,
                };
                lag += u64::try_from(high - from).unwrap_or(0);
            }
            Ok(lag)
        })
        .await
        .map_err(|e| BusError::Backend {
            reason: format!("{action}: task failed: {e}"),
        })?;
        answer.map_err(|e| error::from_kafka(&e, &action))
    }

    /// The number of partitions `topic` has, from the cluster's metadata. Retries while the
    /// topic is being created or has no leader yet, up to the configured timeout.
    pub async fn partitions(&self, topic: &str) -> Result<u32, BusError> {
        let deadline = Instant::now() + self.inner.config.timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let name = topic.to_owned();
            let wait = remaining.clamp(Duration::from_millis(100), Duration::from_secs(5));
            let metadata = self
                .on_client("metadata", move |client| {
                    client.fetch_metadata(Some(&name), wait)
                })
                .await?;
            let action = format!("reading the metadata of topic {topic}");
            // Just created, a topic is briefly unknown or leaderless: that is worth waiting for.
            let unknown = RDKafkaErrorCode::UnknownTopicOrPartition;
            let (problem, retry) = match metadata {
                Ok(metadata) => match metadata.topics().iter().find(|t| t.name() == topic) {
                    None => (error::from_code(unknown, &action), true),
                    Some(t) => match t.error().map(RDKafkaErrorCode::from) {
                        Some(code) => (
                            error::from_code(code, &action),
                            code == unknown || error::is_transient(code),
                        ),
                        None if t.partitions().is_empty() => (
                            BusError::Unavailable {
                                reason: format!("{action}: no partitions yet"),
                            },
                            true,
                        ),
                        None if t.partitions().iter().any(|p| p.leader() < 0) => (
                            BusError::Unavailable {
                                reason: format!("{action}: a partition has no leader"),
                            },
                            true,
                        ),
                        None => {
                            return u32::try_from(t.partitions().len()).map_err(|_| {
                                BusError::Backend {
                                    reason: format!("{action}: too many partitions"),
                                }
                            })
                        }
                    },
                },
                Err(e) => {
                    let problem = error::from_kafka(&e, &action);
                    let retry = problem.is_retryable();
                    (problem, retry)
                }
            };
            if !retry || Instant::now() >= deadline {
                return Err(problem);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The partition count used to route keys of `topic`: cached after the first look-up,
    /// which creates the topic if it is missing.
    async fn routing_partitions(&self, topic: &str) -> Result<u32, BusError> {
        if let Some(n) = self.cached(topic) {
            return Ok(n);
        }
        self.ensure_topics(&[topic]).await?;
        let n = self.partitions(topic).await?;
        self.wait_for_leaders(topic, n).await?;
        if i64::from(n) != i64::from(self.inner.config.partitions) {
            tracing::info!(
                topic,
                partitions = n,
                configured = self.inner.config.partitions,
                "topic has another partition count than configured; routing by its actual count"
            );
        }
        self.partition_cache().insert(topic.to_owned(), n);
        Ok(n)
    }

    /// Wait until the leader of each of `topic`'s `partitions` answers an offsets request,
    /// i.e. hosts the partition, not merely names it in its metadata. Before Kafka 4.5
    /// (KAFKA-15591), an idempotent producer's second request to a partition whose leader is
    /// not hosting it yet can be appended while the first was refused, and the first then
    /// lands after it: a just-created topic would break per-key order in its first batch.
    async fn wait_for_leaders(&self, topic: &str, partitions: u32) -> Result<(), BusError> {
        let deadline = Instant::now() + self.inner.config.timeout;
        for partition in 0..partitions {
            let target = i32::try_from(partition).map_err(|_| BusError::UnknownPartition {
                topic: topic.to_owned(),
                partition,
            })?;
            loop {
                let name = topic.to_owned();
                let left = deadline.saturating_duration_since(Instant::now());
                let wait = left.clamp(Duration::from_millis(100), Duration::from_secs(5));
                let answer = self
                    .on_client("offsets", move |client| {
                        client.fetch_watermarks(&name, target, wait)
                    })
                    .await?;
                let Err(e) = answer else { break };
                let retry = e
                    .rdkafka_error_code()
                    .is_some_and(|code| error::is_transient(code) || error::is_unknown(code));
                if !retry || Instant::now() >= deadline {
                    return Err(error::from_kafka(
                        &e,
                        &format!("waiting for the leader of {topic}/{partition}"),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }

    /// Publish one message and wait for the broker's acknowledgement. While librdkafka's queue
    /// is full, the enqueue is retried until the configured timeout has passed.
    async fn send_one(
        &self,
        topic: &str,
        partition: i32,
        key: &str,
        payload: &[u8],
    ) -> Result<(), KafkaError> {
        let deadline = Instant::now() + self.inner.config.timeout;
        let delivery = loop {
            match self.inner.producer.enqueue(topic, partition, key, payload) {
                Ok(delivery) => break delivery,
                Err(e)
                    if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull)
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(QUEUE_FULL_RETRY).await;
                }
                Err(e) => return Err(e),
            }
        };
        match delivery.await {
            Ok(outcome) => outcome,
            // The producer went away with the message (the bus was dropped meanwhile).
            Err(_) => Err(KafkaError::Canceled),
        }
    }

    fn partition_cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        // A plain map that every writer leaves consistent: a poisoned lock is still usable.
        self.inner
            .partitions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn cached(&self, topic: &str) -> Option<u32> {
        self.partition_cache().get(topic).copied()
    }

    /// Join consumer group `group` on `topic` (created if missing), as the concrete type: it
    /// also shows the member's [`Assignment`].
    pub async fn subscribe_member(
        &self,
        topic: &str,
        group: &str,
    ) -> Result<KafkaSubscription, BusError> {
        self.check_open()?;
        if group.is_empty() {
            return Err(BusError::Backend {
                reason: "a consumer group needs a name".into(),
            });
        }
        // Created and visible in the cluster's metadata before the consumer looks for it.
        self.routing_partitions(topic).await?;
        let assignment = Assignment::default();
        let context = consumer::GroupContext {
            log: LogContext {
                name: format!("{}-{group}", self.inner.config.client_id),
            },
            topic: topic.to_owned(),
            group: group.to_owned(),
            assignment: assignment.clone(),
        };
        let consumer: rdkafka::consumer::StreamConsumer<consumer::GroupContext> = self
            .inner
            .config
            .consumer(group)
            .create_with_context(context)
            .map_err(|e| error::from_kafka(&e, &format!("creating a consumer for {group}")))?;
        consumer
            .subscribe(&[topic])
            .map_err(|e| error::from_kafka(&e, &format!("subscribing {group} to {topic}")))?;
        Ok(KafkaSubscription {
            consumer: Arc::new(consumer),
            topic: topic.to_owned(),
            group: group.to_owned(),
            assignment,
            shutdown: self.inner.shutdown.subscribe(),
        })
    }
}

#[async_trait::async_trait]
impl Bus for KafkaBus {
    async fn publish(&self, topic: &str, key: &str, payload: Vec<u8>) -> Result<(), BusError> {
        self.check_open()?;
        let partitions = self.routing_partitions(topic).await?;
        let partition = partition_for(key, partitions);
        let target = i32::try_from(partition).map_err(|_| BusError::UnknownPartition {
            topic: topic.to_owned(),
            partition,
        })?;
        match self.send_one(topic, target, key, &payload).await {
            Ok(()) => Ok(()),
            Err(e) => {
                if e.rdkafka_error_code().is_some_and(error::is_unknown) {
                    // The topic was deleted or recreated: look its partitions up again.
                    self.partition_cache().remove(topic);
                }
                Err(error::from_kafka(
                    &e,
                    &format!("publishing to {topic}/{partition}"),
                ))
            }
        }
    }

    /// Enqueues the whole batch in order without waiting (librdkafka keeps per-partition order
    /// with the idempotent producer), then waits for every acknowledgement: one round trip per
    /// batch instead of one per message.
    async fn publish_batch(&self, batch: Vec<Outgoing>) -> Result<(), BusError> {
        self.check_open()?;
        let mut pending = std::collections::VecDeque::with_capacity(batch.len());
        for m in &batch {
            let partitions = self.routing_partitions(&m.topic).await?;
            let partition = partition_for(&m.key, partitions);
            let target = i32::try_from(partition).map_err(|_| BusError::UnknownPartition {
                topic: m.topic.clone(),
                partition,
            })?;
            loop {
                match self
                    .inner
                    .producer
                    .enqueue(&m.topic, target, &m.key, &m.payload)
                {
                    Ok(delivery) => {
                        pending.push_back((delivery, m.topic.as_str(), partition));
                        break;
                    }
                    Err(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                        // Make room by waiting for the oldest message in flight, keeping order.
                        match pending.pop_front() {
                            Some((delivery, topic, partition)) => {
                                delivered(delivery.await, topic, partition)?
                            }
                            None => tokio::time::sleep(Duration::from_millis(1)).await,
                        }
                    }
                    Err(e) => {
                        return Err(error::from_kafka(
                            &e,
                            &format!("publishing to {}/{partition}", m.topic),
                        ))
                    }
                }
            }
        }
        let mut first_error = None;
        for (delivery, topic, partition) in pending {
            if let Err(e) = delivered(delivery.await, topic, partition) {
                // The topic may have been recreated: look its partitions up again next time.
                self.partition_cache().remove(topic);
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn subscribe(&self, topic: &str, group: &str) -> Result<Box<dyn Subscription>, BusError> {
        Ok(Box::new(self.subscribe_member(topic, group).await?))
    }
}

/// The outcome of one delivery future of [`KafkaBus::publish_batch`].
fn delivered(
    outcome: Result<producer::Delivered, tokio::sync::oneshot::error::RecvError>,
    topic: &str,
    partition: u32,
) -> Result<(), BusError> {
    match outcome {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(error::from_kafka(
            &e,
            &format!("publishing to {topic}/{partition}"),
        )),
        Err(_) => Err(BusError::Backend {
            reason: format!("the producer dropped a message to {topic}/{partition}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(config: &ClientConfig, key: &str) -> Option<String> {
        config.get(key).map(str::to_owned)
    }

    #[test]
    fn guarantees_cannot_be_configured_away() {
        let config = KafkaConfig::new("k:9092")
            .with("enable.auto.commit", "true")
            .with("enable.idempotence", "false")
            .with("acks", "1")
            .with("session.timeout.ms", "6000");
        let consumer = config.consumer("g");
        assert_eq!(
            get(&consumer, "enable.auto.commit").as_deref(),
            Some("false")
        );
        assert_eq!(
            get(&consumer, "enable.auto.offset.store").as_deref(),
            Some("false")
        );
        assert_eq!(
            get(&consumer, "session.timeout.ms").as_deref(),
            Some("6000")
        );
        assert_eq!(get(&consumer, "group.id").as_deref(), Some("g"));
        let producer = config.producer();
        assert_eq!(
            get(&producer, "enable.idempotence").as_deref(),
            Some("true")
        );
        assert_eq!(get(&producer, "acks").as_deref(), Some("all"));
    }

    #[test]
    fn producers_do_not_linger_unless_configured_to() {
        let plain = KafkaConfig::new("k:9092").producer();
        assert_eq!(get(&plain, "linger.ms").as_deref(), Some("0"));
        let lingering = KafkaConfig::new("k:9092").with("linger.ms", "5").producer();
        assert_eq!(get(&lingering, "linger.ms").as_deref(), Some("5"));
    }

    #[test]
    fn defaults_can_be_overridden() {
        let config = KafkaConfig::new("k:9092").with("partition.assignment.strategy", "range");
        assert_eq!(
            get(&config.consumer("g"), "partition.assignment.strategy").as_deref(),
            Some("range")
        );
        assert_eq!(
            get(&config.consumer("g"), "auto.offset.reset").as_deref(),
            Some("earliest")
        );
    }

    #[test]
    fn bad_configs_are_refused() {
        let mut config = KafkaConfig::new("k:9092");
        config.partitions = 0;
        assert!(matches!(
            KafkaBus::new(config),
            Err(BusError::Backend { .. })
        ));
        assert!(matches!(
            KafkaBus::new(KafkaConfig::new(" ")),
            Err(BusError::Backend { .. })
        ));
        let bad = KafkaConfig::new("k:9092").with("no.such.property", "1");
        assert!(matches!(KafkaBus::new(bad), Err(BusError::Backend { .. })));
    }
}
