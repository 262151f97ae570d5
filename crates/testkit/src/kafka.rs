//! An Apache Kafka broker for tests: from `KAFKA_BOOTSTRAP_SERVERS`, a local single-node KRaft
//! broker started as a plain Java process, or (feature `testcontainers`) a container. See the
//! crate docs for the order; this module's docs for the local broker's layout.
//!
//! # The local broker
//! - Version: [`DEFAULT_VERSION`] (or `PAYOS_TEST_KAFKA_VERSION`), the `org.apache.kafka:kafka_2.13`
//!   artifact from Maven Central. `crates/testkit/kafka/pom.xml` resolves it; `mvn
//!   dependency:copy-dependencies` copies its runtime classpath into
//!   `<cache>/kafka-<version>/libs`, where `<cache>` is `PAYOS_TEST_KAFKA_CACHE`, or
//!   `$XDG_CACHE_HOME/payos-testkit`, or `~/.cache/payos-testkit`. Maven runs only when that
//!   directory is missing (it is filled in a temporary directory and renamed into place).
//! - Java: `PAYOS_TEST_JAVA`, else `$JAVA_HOME/bin/java`, else `java` on the `PATH` (Kafka 4
//!   brokers need Java 17 or newer).
//! - It listens on `127.0.0.1:<port>` (59092, or `PAYOS_TEST_KAFKA_PORT`; its KRaft controller on
//!   `<port>+1`), with its files in `<tmp>/payos-testkit-kafka-<port>/`: `server.properties`,
//!   `log4j2.properties`, the broker's log `server.log` (plus `server.out` for the JVM's own
//!   output), `kafka.pid`, and the topic data in `data/`. The data directory is formatted afresh
//!   each time the broker is started, so topics never pile up across broker restarts.
//! - It is started once, by whichever test process gets there first (a file lock serialises the
//!   start), in its own process group so it outlives the test binary, and is left running for
//!   the rest of the run and later runs. Stop it with `kill $(cat <tmp>/payos-testkit-kafka-59092/kafka.pid)`.
//! - Settings for tests: 512 MiB heap, one network and two request handler threads (sized for
//!   a 2-core machine that also runs PostgreSQL and the engine; docs/benchmarks.md round 25),
//!   8 partitions per topic by default, replication factor 1 for everything (internal topics
//!   included), no initial rebalance delay, a group session timeout as low as 500 ms accepted,
//!   automatic topic creation OFF (as on a production cluster: a client asking for a deleted
//!   topic must not bring it back, and nothing may rely on it).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio::sync::OnceCell;

use crate::process::{remove_dir, run, StartLock};
use crate::TestkitError;

/// The Kafka version the local broker runs unless `PAYOS_TEST_KAFKA_VERSION` says otherwise.
/// Keep in step with `kafka.version` in `crates/testkit/kafka/pom.xml`.
pub const DEFAULT_VERSION: &str = "4.4.0";
const DEFAULT_PORT: u16 = 59092;
/// How long the broker may take to answer once started, and how long we wait for another
/// process that holds the start lock (which may be downloading the jars).
const START_DEADLINE: Duration = Duration::from_secs(300);
/// How long `mvn` may take to fetch the broker's jars.
const FETCH_DEADLINE: Duration = Duration::from_secs(600);
/// How long one readiness probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// The KRaft cluster id of the local broker: 16 bytes ("payos-testkit-ka") in URL-safe base64.
const CLUSTER_ID: &str = "cGF5b3MtdGVzdGtpdC1rYQ";
const POM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/kafka/pom.xml");

/// The bootstrap address this process uses; found once, then shared by every test of the binary.
static BOOTSTRAP: OnceCell<String> = OnceCell::const_new();

/// The bootstrap servers (`host:port[,host:port...]`) of a Kafka cluster for tests.
///
/// Tests share the cluster: give every test its own topics and groups ([`unique_topic`]).
/// Fails loudly (never skips) when no Kafka can be had; see the crate docs.
pub async fn kafka_bootstrap() -> Result<String, TestkitError> {
    BOOTSTRAP.get_or_try_init(find_bootstrap).await.cloned()
}

/// A topic (or consumer group) name no other test uses: `<prefix>-<uuidv7>`, with the
/// characters Kafka does not allow in a topic name replaced by `_`.
pub fn unique_topic(prefix: &str) -> String {
    let prefix: String = prefix
        .chars()
        .take(100)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

async fn find_bootstrap() -> Result<String, TestkitError> {
    if let Ok(servers) = std::env::var("KAFKA_BOOTSTRAP_SERVERS") {
        if !servers.trim().is_empty() {
            return Ok(servers.trim().to_string());
        }
    }
    let mut attempts = vec!["KAFKA_BOOTSTRAP_SERVERS: not set".to_string()];
    match local_broker().await {
        Ok(bootstrap) => return Ok(bootstrap),
        Err(e) => attempts.push(format!("local broker: {e}")),
    }
    #[cfg(feature = "testcontainers")]
    match container::start().await {
        Ok(bootstrap) => return Ok(bootstrap),
        Err(e) => attempts.push(format!("testcontainers: {e}")),
    }
    #[cfg(not(feature = "testcontainers"))]
    attempts.push("testcontainers: the `testcontainers` feature is not enabled".to_string());
    Err(TestkitError::NoKafka { attempts })
}

// ------------------------------------------------------------------------- local broker

fn port() -> Result<u16, TestkitError> {
    match std::env::var("PAYOS_TEST_KAFKA_PORT") {
        Ok(p) => match p.trim().parse::<u16>() {
            // The controller listens on port + 1.
            Ok(port) if port > 0 && port < u16::MAX => Ok(port),
            _ => Err(TestkitError::Command {
                command: "PAYOS_TEST_KAFKA_PORT".into(),
                status: "invalid".into(),
                output: format!("not a port number below 65535: {p:?}"),
            }),
        },
        Err(_) => Ok(DEFAULT_PORT),
    }
}

fn version() -> String {
    match std::env::var("PAYOS_TEST_KAFKA_VERSION") {
        Ok(v) if !v.trim().is_empty() => v.trim().to_string(),
        _ => DEFAULT_VERSION.to_string(),
    }
}

/// Reuse the broker if it is up; otherwise start it (under a cross-process lock, so the test
/// binaries cargo runs in parallel start it once).
async fn local_broker() -> Result<String, TestkitError> {
    let port = port()?;
    let bootstrap = format!("127.0.0.1:{port}");
    if probe(&bootstrap).await.is_ok() {
        return Ok(bootstrap);
    }
    let root = std::env::temp_dir().join(format!("payos-testkit-kafka-{port}"));
    let _lock = StartLock::acquire(
        &root.with_extension("lock"),
        START_DEADLINE + FETCH_DEADLINE,
    )
    .await?;
    // Someone else may have started it while we waited for the lock.
    if probe(&bootstrap).await.is_ok() {
        return Ok(bootstrap);
    }
    // A broker of an earlier run may still be starting (its starter died) or be wedged.
    if let Some(pid) = running_broker(&root) {
        tracing::info!(
            pid,
            "a local Kafka broker is running but not answering; waiting for it"
        );
        if wait_ready(&bootstrap, &root, None, Duration::from_secs(30))
            .await
            .is_ok()
        {
            return Ok(bootstrap);
        }
        tracing::warn!(pid, "stopping the unresponsive local Kafka broker");
        kill(pid).await;
    }
    let java = java();
    let libs = ensure_libs(&version()).await?;
    tracing::info!(root = %root.display(), port, "starting a local Kafka broker for tests");
    let child = start_broker(&java, &libs, &root, port).await?;
    wait_ready(&bootstrap, &root, Some(child), START_DEADLINE).await?;
    Ok(bootstrap)
}

fn java() -> PathBuf {
    if let Ok(java) = std::env::var("PAYOS_TEST_JAVA") {
        if !java.trim().is_empty() {
            return PathBuf::from(java.trim());
        }
    }
    if let Ok(home) = std::env::var("JAVA_HOME") {
        let java = Path::new(&home).join("bin").join("java");
        if java.is_file() {
            return java;
        }
    }
    PathBuf::from("java")
}

fn cache_dir() -> Result<PathBuf, TestkitError> {
    let from_env = |name: &str| {
        std::env::var(name)
            .ok()
            .filter(|v| !v.trim().is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = from_env("PAYOS_TEST_KAFKA_CACHE") {
        return Ok(dir);
    }
    if let Some(dir) = from_env("XDG_CACHE_HOME") {
        return Ok(dir.join("payos-testkit"));
    }
    if let Some(home) = from_env("HOME") {
        return Ok(home.join(".cache").join("payos-testkit"));
    }
    Err(TestkitError::Command {
        command: "find a cache directory for the Kafka jars".into(),
        status: "not found".into(),
        output: "set PAYOS_TEST_KAFKA_CACHE, XDG_CACHE_HOME or HOME".into(),
    })
}

/// The directory holding the broker's classpath, fetched with Maven if not cached yet.
async fn ensure_libs(version: &str) -> Result<PathBuf, TestkitError> {
    let dir = cache_dir()?.join(format!("kafka-{version}"));
    let libs = dir.join("libs");
    let marker = libs.join(format!("kafka_2.13-{version}.jar"));
    if marker.is_file() {
        return Ok(libs);
    }
    tracing::info!(dir = %libs.display(), version, "fetching the Kafka broker's jars with Maven");
    let partial = dir.join(format!("libs.partial-{}", std::process::id()));
    remove_dir(&partial)?;
    create_dir(&dir)?;
    let mvn = std::env::var("PAYOS_TEST_MVN").unwrap_or_else(|_| "mvn".to_string());
    let mut cmd = Command::new(&mvn);
    cmd.args(["-B", "-q", "-f", POM, "dependency:copy-dependencies"])
        .arg(format!("-Dkafka.version={version}"))
        .arg(format!("-Dkafka.libs={}", partial.display()))
        .kill_on_drop(true);
    match tokio::time::timeout(
        FETCH_DEADLINE,
        run(&mut cmd, "mvn dependency:copy-dependencies"),
    )
    .await
    {
        Ok(result) => result.map_err(|e| match e {
            TestkitError::Io { action, source } => TestkitError::Io {
                action: format!("{action} (is Maven installed? set PAYOS_TEST_MVN)"),
                source,
            },
            other => other,
        })?,
        Err(_) => {
            return Err(TestkitError::Timeout {
                what: format!("fetching Kafka {version} with Maven"),
                seconds: FETCH_DEADLINE.as_secs(),
                detail: String::new(),
            })
        }
    }
    if !partial.join(format!("kafka_2.13-{version}.jar")).is_file() {
        return Err(TestkitError::Command {
            command: format!("{mvn} dependency:copy-dependencies"),
            status: "incomplete".into(),
            output: format!("no kafka_2.13-{version}.jar in {}", partial.display()),
        });
    }
    if let Err(source) = std::fs::rename(&partial, &libs) {
        // Another process (testing on another port) may have filled the cache meanwhile.
        remove_dir(&partial)?;
        if !marker.is_file() {
            return Err(TestkitError::Io {
                action: format!("moving {} to {}", partial.display(), libs.display()),
                source,
            });
        }
    }
    Ok(libs)
}

/// Write the configuration, format fresh storage and launch the broker, detached.
async fn start_broker(
    java: &Path,
    libs: &Path,
    root: &Path,
    port: u16,
) -> Result<std::process::Child, TestkitError> {
    remove_dir(root)?;
    create_dir(root)?;
    let properties = root.join("server.properties");
    write(&properties, &server_properties(root, port))?;
    let log4j = root.join("log4j2.properties");
    write(&log4j, &log4j_properties(root))?;
    let classpath = format!("{}/*", libs.display());
    let log_config = format!("-Dlog4j2.configurationFile={}", log4j.display());

    let mut format = Command::new(java);
    format
        .args(["-Xmx256m", "-Djava.awt.headless=true"])
        .arg(&log_config)
        .arg("-cp")
        .arg(&classpath)
        .args(["kafka.tools.StorageTool", "format", "-t", CLUSTER_ID, "-c"])
        .arg(&properties)
        .kill_on_drop(true);
    match tokio::time::timeout(
        Duration::from_secs(120),
        run(&mut format, "kafka storage format"),
    )
    .await
    {
        Ok(result) => result.map_err(|e| match e {
            TestkitError::Io { action, source } => TestkitError::Io {
                action: format!(
                    "{action} (is Java 17+ installed? set PAYOS_TEST_JAVA or JAVA_HOME)"
                ),
                source,
            },
            other => other,
        })?,
        Err(_) => {
            return Err(TestkitError::Timeout {
                what: "formatting the Kafka storage".into(),
                seconds: 120,
                detail: String::new(),
            })
        }
    }

    let out =
        std::fs::File::create(root.join("server.out")).map_err(|source| TestkitError::Io {
            action: format!("creating {}", root.join("server.out").display()),
            source,
        })?;
    let err = out.try_clone().map_err(|source| TestkitError::Io {
        action: "duplicating the broker's output file".into(),
        source,
    })?;
    let mut broker = std::process::Command::new(java);
    broker
        .args([
            "-Xms128m",
            "-Xmx512m",
            // G1 for its pause goal: the serial GC cost no less CPU here, and its young pauses
            // took 20-40 ms against G1's 11-26 (docs/benchmarks.md, round 25, item 107).
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
        ])
        .arg(&log_config)
        .arg(format!("-Dkafka.logs.dir={}", root.display()))
        .arg("-cp")
        .arg(&classpath)
        .arg("kafka.Kafka")
        .arg(&properties)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    // Its own process group: Ctrl-C on `cargo test` and the end of this test binary leave it be.
    std::os::unix::process::CommandExt::process_group(&mut broker, 0);
    let child = broker.spawn().map_err(|source| TestkitError::Io {
        action: format!("starting the Kafka broker ({:?})", broker),
        source,
    })?;
    write(&root.join("kafka.pid"), &child.id().to_string())?;
    Ok(child)
}

fn server_properties(root: &Path, port: u16) -> String {
    let controller = port + 1;
    format!(
        "# Written by workflow-testkit (crates/testkit/src/kafka.rs): a single-node KRaft broker \
         for tests.\n\
         process.roles=broker,controller\n\
         node.id=1\n\
         controller.quorum.voters=1@127.0.0.1:{controller}\n\
         listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}\n\
         advertised.listeners=PLAINTEXT://127.0.0.1:{port}\n\
         controller.listener.names=CONTROLLER\n\
         inter.broker.listener.name=PLAINTEXT\n\
         listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
         log.dirs={data}\n\
         num.partitions=8\n\
         default.replication.factor=1\n\
         min.insync.replicas=1\n\
         auto.create.topics.enable=false\n\
         delete.topic.enable=true\n\
         offsets.topic.replication.factor=1\n\
         offsets.topic.num.partitions=8\n\
         transaction.state.log.replication.factor=1\n\
         transaction.state.log.min.isr=1\n\
         transaction.state.log.num.partitions=4\n\
         share.coordinator.state.topic.replication.factor=1\n\
         share.coordinator.state.topic.min.isr=1\n\
         group.initial.rebalance.delay.ms=0\n\
         group.min.session.timeout.ms=500\n\
         group.consumer.min.session.timeout.ms=500\n\
         group.consumer.min.heartbeat.interval.ms=100\n\
         group.consumer.heartbeat.interval.ms=500\n\
         num.network.threads=1\n\
         num.io.threads=2\n\
         num.recovery.threads.per.data.dir=1\n\
         log.segment.bytes=16777216\n\
         log.retention.hours=24\n\
         log.retention.check.interval.ms=60000\n",
        data = root.join("data").display(),
    )
}

fn log4j_properties(root: &Path) -> String {
    format!(
        "# Written by workflow-testkit: the local Kafka broker logs to server.log.\n\
         status = warn\n\
         appender.file.type = File\n\
         appender.file.name = file\n\
         appender.file.fileName = {log}\n\
         appender.file.layout.type = PatternLayout\n\
         appender.file.layout.pattern = [%d] %p %m (%c)%n\n\
         rootLogger.level = info\n\
         rootLogger.appenderRef.file.ref = file\n\
         logger.kafka.name = kafka\n\
         logger.kafka.level = info\n\
         logger.clients.name = org.apache.kafka.clients\n\
         logger.clients.level = warn\n\
         logger.requests.name = kafka.request.logger\n\
         logger.requests.level = warn\n",
        log = root.join("server.log").display(),
    )
}

/// The pid in `kafka.pid`, if that process is still a Kafka broker using `root`.
fn running_broker(root: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(root.join("kafka.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&cmdline);
    let ours = cmdline.contains("kafka.Kafka") && cmdline.contains(&*root.to_string_lossy());
    ours.then_some(pid)
}

async fn kill(pid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .await;
}

/// Poll until the broker answers a metadata request listing itself, up to `deadline`. With the
/// `child` we started, stop early if it exits.
async fn wait_ready(
    bootstrap: &str,
    root: &Path,
    mut child: Option<std::process::Child>,
    deadline: Duration,
) -> Result<(), TestkitError> {
    let started = Instant::now();
    let mut last_error;
    loop {
        match probe(bootstrap).await {
            Ok(()) => return Ok(()),
            Err(e) => last_error = e,
        }
        if let Some(child) = child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(TestkitError::Command {
                    command: format!("kafka.Kafka {}", root.join("server.properties").display()),
                    status: status.to_string(),
                    output: format!("the broker exited while starting\n{}", log_tail(root)),
                });
            }
        }
        if started.elapsed() >= deadline {
            return Err(TestkitError::Timeout {
                what: format!("Kafka answering at {bootstrap}"),
                seconds: deadline.as_secs(),
                detail: format!(": {last_error}\n{}", log_tail(root)),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Ready means: the broker answers a Metadata request (v4, no topics) and lists at least one
/// broker, i.e. it is registered and unfenced, so topics can be created.
async fn probe(bootstrap: &str) -> Result<(), String> {
    match tokio::time::timeout(PROBE_TIMEOUT, metadata_brokers(bootstrap)).await {
        Ok(Ok(0)) => Err("the broker lists no live brokers yet".into()),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!(
            "no metadata response within {}s",
            PROBE_TIMEOUT.as_secs()
        )),
    }
}

/// The number of brokers in a Metadata v4 response (the oldest version Kafka 4 still serves
/// that has the non-flexible encoding; enough for a liveness check).
async fn metadata_brokers(bootstrap: &str) -> Result<usize, String> {
    const CORRELATION_ID: i32 = 0x7e57;
    let mut stream = TcpStream::connect(bootstrap)
        .await
        .map_err(|e| format!("connecting to {bootstrap}: {e}"))?;
    let client_id = b"payos-testkit";
    let mut request = Vec::with_capacity(32);
    request.extend_from_slice(&3i16.to_be_bytes()); // api key: Metadata
    request.extend_from_slice(&4i16.to_be_bytes()); // api version
    request.extend_from_slice(&CORRELATION_ID.to_be_bytes());
    request.extend_from_slice(&(client_id.len() as i16).to_be_bytes());
    request.extend_from_slice(client_id);
    request.extend_from_slice(&0i32.to_be_bytes()); // topics: empty array
    request.push(0); // allow_auto_topic_creation: false
    let mut frame = (request.len() as i32).to_be_bytes().to_vec();
    frame.extend_from_slice(&request);
    stream
        .write_all(&frame)
        .await
        .map_err(|e| format!("sending a metadata request: {e}"))?;
    let mut len = [0u8; 4];
    stream
        .read_exact(&mut len)
        .await
        .map_err(|e| format!("reading a metadata response: {e}"))?;
    let len = i32::from_be_bytes(len);
    if !(12..=1 << 20).contains(&len) {
        return Err(format!("implausible metadata response length {len}"));
    }
    let mut body = vec![0u8; len as usize];
    stream
        .read_exact(&mut body)
        .await
        .map_err(|e| format!("reading a metadata response: {e}"))?;
    let int = |at: usize| -> Option<i32> {
        Some(i32::from_be_bytes(body.get(at..at + 4)?.try_into().ok()?))
    };
    // correlation id, throttle_time_ms, then the brokers array's length.
    if int(0) != Some(CORRELATION_ID) {
        return Err("the metadata response has another correlation id".into());
    }
    let brokers = int(8).ok_or("truncated metadata response")?;
    Ok(usize::try_from(brokers).unwrap_or(0))
}

fn create_dir(dir: &Path) -> Result<(), TestkitError> {
    std::fs::create_dir_all(dir).map_err(|source| TestkitError::Io {
        action: format!("creating {}", dir.display()),
        source,
    })
}

fn write(path: &Path, contents: &str) -> Result<(), TestkitError> {
    std::fs::write(path, contents).map_err(|source| TestkitError::Io {
        action: format!("writing {}", path.display()),
        source,
    })
}

fn log_tail(root: &Path) -> String {
    let mut out = String::new();
    for name in ["server.log", "server.out"] {
        let path = root.join(name);
        if let Ok(log) = std::fs::read_to_string(&path) {
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(20)..].join("\n");
            out.push_str(&format!("last lines of {}:\n{tail}\n", path.display()));
        }
    }
    if out.is_empty() {
        out = format!("(no broker log in {})", root.display());
    }
    out
}

// ------------------------------------------------------------------------- testcontainers

#[cfg(feature = "testcontainers")]
mod container {
    //! An Apache Kafka container (KRaft, `apache/kafka`) on a local Docker engine, started once
    //! per test process. The container handle is leaked on purpose so it outlives the test that
    //! started it; testcontainers' reaper removes it when the process ends.

    use testcontainers_modules::kafka::apache::{Kafka, KAFKA_PORT};
    use testcontainers_modules::testcontainers::runners::AsyncRunner;

    pub(super) async fn start() -> Result<String, String> {
        let container = Kafka::default()
            .start()
            .await
            .map_err(|e| format!("starting a kafka container: {e}"))?;
        let host = container
            .get_host()
            .await
            .map_err(|e| format!("container host: {e}"))?;
        let port = container
            .get_host_port_ipv4(KAFKA_PORT)
            .await
            .map_err(|e| format!("container port: {e}"))?;
        std::mem::forget(container);
        Ok(format!("{host}:{port}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_topics_are_distinct_and_valid() {
        let a = unique_topic("orders/in flight");
        let b = unique_topic("orders/in flight");
        assert_ne!(a, b);
        assert!(a.starts_with("orders_in_flight-"));
        assert!(a
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')));
        assert!(a.len() < 249);
    }

    #[test]
    fn server_properties_name_both_listeners() {
        let props = server_properties(Path::new("/tmp/k"), 59092);
        assert!(
            props.contains("listeners=PLAINTEXT://127.0.0.1:59092,CONTROLLER://127.0.0.1:59093")
        );
        assert!(props.contains("log.dirs=/tmp/k/data"));
    }

    #[tokio::test]
    async fn a_broker_answers() -> Result<(), Box<dyn std::error::Error>> {
        let bootstrap = kafka_bootstrap().await?;
        let first = bootstrap.split(',').next().unwrap_or_default();
        probe(first).await?;
        Ok(())
    }
}
