//! The distributed runtime's configuration: defaults, then an optional TOML file
//! (`--config`, or `WORKFLOWS_CONFIG`), then environment variables, each overriding the last.
//! `examples/distributed.toml` shows every key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use workflow_bus::Naming;
use workflow_bus_kafka::KafkaConfig;
use workflow_core::StepType;
use workflow_engine::DEFAULT_INLINE_STEPS;

/// Members per pool process (`WORKFLOWS_POOL_MEMBERS`): one consumer per partition of the
/// default 8. A member handles one message at a time, and more members in flight make bigger
/// group commits (docs/benchmarks.md, round 4).
pub const DEFAULT_POOL_MEMBERS: usize = 8;

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("environment variable {name}={value:?}: {reason}")]
    Env {
        name: &'static str,
        value: String,
        reason: String,
    },
    #[error("{0} is required (config file key `{1}` or environment variable {0})")]
    Missing(&'static str, &'static str),
}

/// The file's shape; every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FileConfig {
    database_url: Option<String>,
    database_max_connections: Option<u32>,
    kafka: KafkaFile,
    topics: TopicsFile,
    api: ApiFile,
    pools: PoolsFile,
    payos: PayosFile,
    engine: EngineFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct EngineFile {
    /// Step type names, e.g. `["condition", "approval"]`; `[]` for none.
    inline_steps: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct KafkaFile {
    bootstrap: Option<String>,
    client_id: Option<String>,
    partitions: Option<i32>,
    replication: Option<i32>,
    timeout_ms: Option<u64>,
    /// librdkafka properties, e.g. `"session.timeout.ms" = "6000"`.
    properties: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct TopicsFile {
    prefix: Option<String>,
    /// Logical topic name → the cluster's name for it.
    names: BTreeMap<String, String>,
    transfer_events: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ApiFile {
    listen: Option<SocketAddr>,
    admin_token: Option<String>,
    max_bulk_decisions: Option<usize>,
    max_batch_triggers: Option<usize>,
    decision_wait_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct PoolsFile {
    members: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct PayosFile {
    api_url: Option<String>,
    api_key: Option<String>,
}

/// Everything a process of the distributed runtime needs, resolved.
#[derive(Debug, Clone)]
pub struct Settings {
    pub database_url: String,
    pub database_max_connections: u32,
    pub kafka: KafkaConfig,
    pub naming: Naming,
    /// The transfer service's events topic (logical name; `naming` may map it).
    pub transfer_events: String,
    pub listen: SocketAddr,
    pub admin_token: Option<String>,
    pub max_bulk_decisions: usize,
    pub max_batch_triggers: usize,
    pub decision_wait: Duration,
    /// Consumer-group members per pool in one process.
    pub pool_members: usize,
    pub payos_api_url: Option<String>,
    pub payos_api_key: Option<String>,
    /// Step types executed in the transition that dispatches them (`Engine::with_inline_steps`).
    pub inline_steps: Vec<StepType>,
}

impl Settings {
    /// Defaults, then `file` (if any), then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        Settings::resolve(file, &|name| std::env::var(name).ok())
    }

    /// [`Settings::load`] with the environment given as a lookup (tests).
    pub fn resolve(
        file: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Settings, ConfigError> {
        let f = match file {
            Some(path) => parse_file(path)?,
            None => FileConfig::default(),
        };
        let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());

        let database_url = env("DATABASE_URL")
            .or(f.database_url)
            .ok_or(ConfigError::Missing("DATABASE_URL", "database_url"))?;
        let bootstrap =
            env("KAFKA_BOOTSTRAP_SERVERS")
                .or(f.kafka.bootstrap)
                .ok_or(ConfigError::Missing(
                    "KAFKA_BOOTSTRAP_SERVERS",
                    "kafka.bootstrap",
                ))?;
        let mut kafka = KafkaConfig::new(bootstrap);
        if let Some(id) = f.kafka.client_id {
            kafka.client_id = id;
        }
        kafka.partitions = parsed(&env, "WORKFLOWS_TOPIC_PARTITIONS")?
            .or(f.kafka.partitions)
            .unwrap_or(kafka.partitions);
        kafka.replication = parsed(&env, "WORKFLOWS_TOPIC_REPLICATION")?
            .or(f.kafka.replication)
            .unwrap_or(kafka.replication);
        if let Some(ms) = f.kafka.timeout_ms {
            kafka.timeout = Duration::from_millis(ms);
        }
        kafka.extra.extend(f.kafka.properties);

        let naming = Naming {
            prefix: env("WORKFLOWS_TOPIC_PREFIX")
                .or(f.topics.prefix)
                .unwrap_or_default(),
            topics: f.topics.names,
        };
        Ok(Settings {
            database_url,
            database_max_connections: parsed(&env, "WORKFLOWS_DB_MAX_CONNECTIONS")?
                .or(f.database_max_connections)
                .unwrap_or(10),
            kafka,
            naming,
            transfer_events: env("WORKFLOWS_TRANSFER_EVENTS_TOPIC")
                .or(f.topics.transfer_events)
                .unwrap_or_else(|| "payos.transfers.events".to_string()),
            listen: parsed(&env, "WORKFLOWS_LISTEN")?
                .or(f.api.listen)
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8080))),
            admin_token: env("WORKFLOWS_ADMIN_TOKEN").or(f.api.admin_token),
            max_bulk_decisions: parsed(&env, "WORKFLOWS_MAX_BULK_DECISIONS")?
                .or(f.api.max_bulk_decisions)
                .unwrap_or(500),
            max_batch_triggers: parsed(&env, "WORKFLOWS_MAX_BATCH_TRIGGERS")?
                .or(f.api.max_batch_triggers)
                .unwrap_or(500),
            decision_wait: Duration::from_millis(
                parsed(&env, "WORKFLOWS_DECISION_WAIT_MS")?
                    .or(f.api.decision_wait_ms)
                    .unwrap_or(10_000),
            ),
            pool_members: parsed(&env, "WORKFLOWS_POOL_MEMBERS")?
                .or(f.pools.members)
                .unwrap_or(DEFAULT_POOL_MEMBERS)
                .max(1),
            payos_api_url: env("PAYOS_API_URL").or(f.payos.api_url),
            payos_api_key: env("PAYOS_API_KEY").or(f.payos.api_key),
            inline_steps: match env(INLINE_STEPS_ENV) {
                Some(value) => inline_steps_env(&value)?,
                None => match f.engine.inline_steps {
                    Some(names) => {
                        parse_inline_steps(&names).map_err(|message| ConfigError::Parse {
                            path: file.map(|p| p.display().to_string()).unwrap_or_default(),
                            message: format!("engine.inline_steps: {message}"),
                        })?
                    }
                    None => DEFAULT_INLINE_STEPS.to_vec(),
                },
            },
        })
    }
}

/// The environment variable naming the inline step types: a comma-separated list, or `none`.
pub const INLINE_STEPS_ENV: &str = "WORKFLOWS_INLINE_STEPS";

/// The inline step types the environment asks for (for the embedded runtime, which has no
/// config file), else the default.
pub fn inline_steps_from_env() -> Result<Vec<StepType>, ConfigError> {
    match std::env::var(INLINE_STEPS_ENV) {
        Ok(value) if !value.trim().is_empty() => inline_steps_env(&value),
        _ => Ok(DEFAULT_INLINE_STEPS.to_vec()),
    }
}

fn inline_steps_env(value: &str) -> Result<Vec<StepType>, ConfigError> {
    let names: Vec<String> = match value.trim() {
        "none" => Vec::new(),
        list => list.split(',').map(|n| n.trim().to_string()).collect(),
    };
    parse_inline_steps(&names).map_err(|reason| ConfigError::Env {
        name: INLINE_STEPS_ENV,
        value: value.to_string(),
        reason,
    })
}

/// Step type names to step types (an action only starts inline: its pool makes the call).
fn parse_inline_steps(names: &[String]) -> Result<Vec<StepType>, String> {
    let mut steps = Vec::new();
    for name in names {
        match StepType::parse(name) {
            Some(t) if !steps.contains(&t) => steps.push(t),
            Some(_) => {}
            None => {
                return Err(format!(
                    "unknown step type `{name}` (condition, approval, wait, notification, action)"
                ))
            }
        }
    }
    Ok(steps)
}

fn parse_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: shown.clone(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: shown,
        message: e.to_string(),
    })
}

fn parsed<T: std::str::FromStr>(
    env: &dyn Fn(&str) -> Option<String>,
    name: &'static str,
) -> Result<Option<T>, ConfigError>
where
    T::Err: std::fmt::Display,
{
    match env(name) {
        None => Ok(None),
        Some(value) => value
            .trim()
            .parse()
            .map(Some)
            .map_err(|e: T::Err| ConfigError::Env {
                name,
                reason: e.to_string(),
                value,
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn file_then_environment() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            r#"
database_url = "postgres://file/db"
[kafka]
bootstrap = "file:9092"
partitions = 12
properties = { "session.timeout.ms" = "9000" }
[topics]
prefix = "prod."
names = { "payos.transfers.events" = "transfers" }
[api]
listen = "127.0.0.1:9000"
"#,
        )?;
        let env = env_of(&[
            ("KAFKA_BOOTSTRAP_SERVERS", "env:9092"),
            ("WORKFLOWS_POOL_MEMBERS", "4"),
        ]);
        let s = Settings::resolve(Some(&path), &env)?;
        assert_eq!(s.database_url, "postgres://file/db");
        assert_eq!(s.kafka.bootstrap, "env:9092");
        assert_eq!(s.kafka.partitions, 12);
        assert_eq!(
            s.kafka.extra.get("session.timeout.ms").map(String::as_str),
            Some("9000")
        );
        assert_eq!(
            s.naming.topic("workflow.steps.wait"),
            "prod.workflow.steps.wait"
        );
        assert_eq!(s.naming.topic(&s.transfer_events), "transfers");
        assert_eq!(s.listen.port(), 9000);
        assert_eq!(s.pool_members, 4);
        Ok(())
    }

    #[test]
    fn the_example_file_parses() -> Result<(), Box<dyn std::error::Error>> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/distributed.toml");
        let s = Settings::resolve(Some(&path), &env_of(&[]))?;
        assert_eq!(s.kafka.bootstrap, "127.0.0.1:9092");
        assert_eq!(
            s.naming.topic("payos.transfers.events"),
            "transfers.events.v1"
        );
        assert_eq!(s.pool_members, 8);
        assert_eq!(s.inline_steps, DEFAULT_INLINE_STEPS.to_vec());
        Ok(())
    }

    #[test]
    fn inline_steps_from_file_and_environment() -> Result<(), Box<dyn std::error::Error>> {
        let base = [
            ("DATABASE_URL", "postgres://x"),
            ("KAFKA_BOOTSTRAP_SERVERS", "k:1"),
        ];
        let with = |value: &str| {
            let mut pairs = base.to_vec();
            pairs.push((INLINE_STEPS_ENV, value));
            Settings::resolve(None, &env_of(&pairs))
        };
        let s = Settings::resolve(None, &env_of(&base))?;
        assert_eq!(s.inline_steps, DEFAULT_INLINE_STEPS.to_vec());
        assert_eq!(with("none")?.inline_steps, Vec::<StepType>::new());
        assert_eq!(
            with(" approval, condition,approval ")?.inline_steps,
            vec![StepType::Approval, StepType::Condition]
        );
        assert_eq!(
            with("action,condition")?.inline_steps,
            vec![StepType::Action, StepType::Condition]
        );
        let err = with("conditon")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains(INLINE_STEPS_ENV) && err.contains("unknown step type"),
            "{err}"
        );

        let dir = tempfile::tempdir()?;
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[engine]\ninline_steps = []\n")?;
        let s = Settings::resolve(Some(&path), &env_of(&base))?;
        assert!(s.inline_steps.is_empty());
        // The environment overrides the file.
        let mut pairs = base.to_vec();
        pairs.push((INLINE_STEPS_ENV, "wait"));
        let s = Settings::resolve(Some(&path), &env_of(&pairs))?;
        assert_eq!(s.inline_steps, vec![StepType::Wait]);
        std::fs::write(&path, "[engine]\ninline_steps = [\"actoin\"]\n")?;
        let err = Settings::resolve(Some(&path), &env_of(&base))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("engine.inline_steps"), "{err}");
        Ok(())
    }

    #[test]
    fn missing_and_malformed_values_are_named() -> Result<(), Box<dyn std::error::Error>> {
        let none = env_of(&[("KAFKA_BOOTSTRAP_SERVERS", "k:1")]);
        let err = Settings::resolve(None, &none).err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("DATABASE_URL")));
        let bad = env_of(&[
            ("DATABASE_URL", "postgres://x"),
            ("KAFKA_BOOTSTRAP_SERVERS", "k:1"),
            ("WORKFLOWS_TOPIC_PARTITIONS", "many"),
        ]);
        let err = Settings::resolve(None, &bad).err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("WORKFLOWS_TOPIC_PARTITIONS")));
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "no_such_key = 1\n")?;
        let err = Settings::resolve(Some(&path), &none)
            .err()
            .map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("no_such_key")));
        Ok(())
    }
}
