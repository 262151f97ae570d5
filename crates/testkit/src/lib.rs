//! Test infrastructure shared by the workspace's integration tests: a FRESH, EMPTY PostgreSQL
//! database per call and SQLite files in temporary directories.
//!
//! [`postgres_url`] finds a PostgreSQL server in this order:
//! 1. `DATABASE_URL`, if set: an admin URL of a server you run; a new database is created in it.
//! 2. A throw-away local cluster started as a plain process from the PostgreSQL binaries
//!    (`pg_config --bindir`, `PAYOS_TEST_PG_BINDIR`, or `/usr/lib/postgresql/*/bin`; Debian
//!    package `postgresql`). Its data lives in `<tmp>/payos-testkit-pg-<port>`; it listens on
//!    `127.0.0.1:<port>` (54329, or `PAYOS_TEST_PG_PORT`) with trust auth and fsync off. It is
//!    started once, by whichever test process gets there first (a file lock serialises the
//!    start), and left running for the rest of the run and later runs. As root, `initdb` and
//!    `pg_ctl` run as the `postgres` user via `runuser`, because PostgreSQL refuses root.
//! 3. With the cargo feature `testcontainers` (off by default: heavy to compile, and our
//!    machines and CI have no Docker engine), a `postgres` container on a local Docker engine:
//!    `cargo test --features workflow-testkit/testcontainers`. It is tried only when 1 and 2
//!    are unavailable, so on a laptop with Docker and no local PostgreSQL binaries.
//!
//! If none works, it returns a loud [`TestkitError`]: tests must fail, never silently skip.
//!
//! [`kafka_bootstrap`] finds an Apache Kafka cluster the same way: `KAFKA_BOOTSTRAP_SERVERS`,
//! else a single-node KRaft broker started as a local Java process (its jars fetched once with
//! Maven into a cache; see [`kafka`] for the layout), else, with the `testcontainers` feature, a
//! container. Tests share that cluster: each uses its own topics and groups ([`unique_topic`]).
//!
//! [`browser::webdriver`] provides a chromedriver and Debian's headless Chromium for the
//! dashboard's browser tests, the same way: `WEBDRIVER_URL`, else a local process.
//!
//! [`smtp::SmtpSink`] is a real SMTP server on `127.0.0.1:0` that keeps what it receives: the
//! mail sink for email notification tests.
//!
//! It must stay free of workflow-specific logic: no schema, no migrations, no domain types.

pub mod browser;
pub mod kafka;
mod postgres;
mod process;
pub mod smtp;

use std::path::Path;

pub use kafka::{kafka_bootstrap, unique_topic};
pub use postgres::postgres_url;
pub use tempfile::TempDir;

/// Why test infrastructure could not be provided.
#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    /// No way to get a PostgreSQL server worked; each attempt says why.
    #[error(
        "no PostgreSQL available for tests. Install the `postgresql` package (its binaries are \
         used to start a local cluster), or set DATABASE_URL to an admin URL of a running server, \
         or build with `--features workflow-testkit/testcontainers` on a machine with Docker.\n{}",
        .attempts.join("\n")
    )]
    NoPostgres { attempts: Vec<String> },
    /// No way to get a Kafka broker worked; each attempt says why.
    #[error(
        "no Kafka available for tests. Install Java 17+ and Maven (a local broker is started from \
         the Kafka jars on Maven Central), or set KAFKA_BOOTSTRAP_SERVERS to a running cluster, \
         or build with `--features workflow-testkit/testcontainers` on a machine with Docker.\n{}",
        .attempts.join("\n")
    )]
    NoKafka { attempts: Vec<String> },
    /// No browser or WebDriver for the browser tests.
    #[error(
        "no headless browser for tests: {missing}. Install Debian's `chromium` and \
         `chromium-driver` packages, or set WEBDRIVER_URL to a running chromedriver."
    )]
    NoBrowser { missing: String },
    #[error("{action}: {source}")]
    Io {
        action: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}):\n{output}")]
    Command {
        command: String,
        status: String,
        output: String,
    },
    #[error("{what} did not happen within {seconds}s{detail}")]
    Timeout {
        what: String,
        seconds: u64,
        detail: String,
    },
    #[error("database error while {action}: {source}")]
    Database {
        action: String,
        #[source]
        source: sqlx::Error,
    },
}

/// A fresh temporary directory, removed when the value is dropped.
pub fn temp_dir() -> Result<TempDir, TestkitError> {
    tempfile::Builder::new()
        .prefix("payos-test-")
        .tempdir()
        .map_err(|source| TestkitError::Io {
            action: "creating a temporary directory".into(),
            source,
        })
}

/// The URL of a SQLite database file `workflow.db` in `dir`, created on first connect.
pub fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}?mode=rwc", dir.join("workflow.db").display())
}

/// A SQLite database in a fresh temporary directory. Keep the [`TempDir`] alive while the
/// database is used: dropping it deletes the file.
pub fn temp_sqlite() -> Result<(TempDir, String), TestkitError> {
    let dir = temp_dir()?;
    let url = sqlite_url(dir.path());
    Ok((dir, url))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_url_points_into_the_dir() {
        let url = sqlite_url(Path::new("/tmp/x"));
        assert_eq!(url, "sqlite:///tmp/x/workflow.db?mode=rwc");
    }
}
