//! Durable state of the workflow engine: partners and API keys, versioned templates, instances,
//! the transactional outbox and the hash-chained audit trail.
//!
//! # One SQL implementation, two backends
//! [`Store`] is written once against sqlx's `Any` driver and serves SQLite (embedded mode) and
//! PostgreSQL (distributed mode). To keep one implementation honest the schema uses only
//! portable types: ids and JSON documents as `TEXT`, timestamps as `BIGINT` milliseconds since
//! the epoch, booleans as integers `0/1`, outbox payloads as `BLOB`/`BYTEA`; every query uses
//! `$1, $2...` placeholders (the SQLite driver accepts them). The few real dialect differences
//! (how a write transaction starts, connection pragmas, the migration set) branch on
//! [`Backend`]. Migrations live in `migrations/sqlite` and `migrations/postgres` with the same
//! numbering and are embedded in the binary; [`Store::migrate`] applies them.
//!
//! One exception, for speed: on a SQLite file the hot writes (instance creates and commits,
//! decision enqueues and outcomes, outbox deletes) run in group transactions on the committer's
//! thread through rusqlite (`commit.rs`, `sqlite_writer.rs`), and the hot reads in place
//! (`sqlite_readers.rs`), with the same SQL and encodings as the portable path. On PostgreSQL
//! a process's instance creates and commits share group writes, one statement each when the
//! instances' audit heads and step rows are known (`pg_commit.rs`, `pg_rows.rs`), and its
//! instance reads share statements too (`pg_reads.rs`), still through sqlx.
//!
//! SQLite runs in WAL mode with a busy timeout, foreign keys on and `synchronous=NORMAL` (a
//! commit survives a process crash; see `SQLITE_PRAGMAS`); write transactions run on one
//! dedicated connection and start with `BEGIN IMMEDIATE`, so this process's writers queue on
//! the pool in order and another process's wait on the busy timeout, never failing on a lock
//! upgrade. Reads use a pool of their own. `sqlite::memory:` uses a single connection so every
//! caller sees the same database.
//!
//! # Invariants this crate keeps
//! - Every change and the outbox messages and audit events it causes commit in ONE transaction
//!   (or one statement, which is atomic the same way).
//! - Instances use optimistic concurrency: a commit names the version it read and loses with
//!   [`StoreError::Conflict`] if someone else committed first.
//! - Audit events are chained per stream inside the writing transaction and stored one row per
//!   commit and stream (`audit_blocks.rs`); the `(stream, first_seq)` primary key turns a
//!   racing append into a `Conflict`.
//! - Every tenant-facing query filters on `partner_id`. Only the engine-internal queries
//!   ([`Store::list_active_instances`], the outbox) span partners.
//!
//! It must never decide anything about workflows: it stores what the domain computed.

pub mod analytics;
mod approvals;
mod audit_blocks;
mod commit;
mod error;
#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures;
mod listen;
pub mod notifications;
mod pg_commit;
mod pg_reads;
mod pg_rows;
mod queries;
pub mod recent;
pub mod records;
mod relay;
pub mod sandbox;
mod sqlite_readers;
mod sqlite_writer;
mod step_mirror;
mod timers;

use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyQueryResult};
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, Executor};

pub use analytics::{Analytics, AnalyticsFilter, DurationTotals, InstanceAggregate, StepAggregate};
pub use commit::InstanceCommit;
pub use error::StoreError;
pub use listen::{DecisionListener, DecisionSignal, DECISION_OUTCOMES_CHANNEL};
pub use notifications::{
    AttemptVerdict, DeliveryAttemptRecord, DeliveryRecord, DeliveryStatus, NewDelivery,
    RedeliverOutcome, WebhookSecretRecord,
};
pub use records::*;
pub use relay::{EventLaneLeader, RelayPass};
pub use sandbox::{SandboxRecordOutcome, SandboxTransferRecord};
pub use sqlite_writer::NewInstance;

static SQLITE_MIGRATOR: Migrator = sqlx::migrate!("../../migrations/sqlite");
static POSTGRES_MIGRATOR: Migrator = sqlx::migrate!("../../migrations/postgres");

/// How long a SQLite connection waits for another writer before giving up with `SQLITE_BUSY`.
pub(crate) const SQLITE_BUSY_TIMEOUT_MS: u64 = 5_000;

/// Which database a [`Store`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The backend a connection URL names (`sqlite:...`, `postgres://...`, `postgresql://...`).
    pub fn from_url(url: &str) -> Option<Backend> {
        if url.starts_with("sqlite:") {
            Some(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Backend::Postgres)
        } else {
            None
        }
    }

    /// The backend of an open connection.
    pub(crate) fn from_connection(conn: &sqlx::AnyConnection) -> Backend {
        if conn.backend_name().eq_ignore_ascii_case("postgresql") {
            Backend::Postgres
        } else {
            Backend::Sqlite
        }
    }
}

/// What [`Store::create_instance`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum CreateOutcome {
    /// The instance was written, with its outbox messages and audit events.
    Created(InstanceRecord),
    /// An instance with the same `(partner_id, idempotency_key)` already existed; nothing was
    /// written and this is that instance.
    Existing(InstanceRecord),
}

impl CreateOutcome {
    pub fn record(&self) -> &InstanceRecord {
        match self {
            CreateOutcome::Created(r) | CreateOutcome::Existing(r) => r,
        }
    }

    pub fn into_record(self) -> InstanceRecord {
        match self {
            CreateOutcome::Created(r) | CreateOutcome::Existing(r) => r,
        }
    }

    pub fn is_created(&self) -> bool {
        matches!(self, CreateOutcome::Created(_))
    }
}

/// A handle on the database: cheap to clone (a connection pool inside).
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    /// Where write transactions run. On SQLite a pool of ONE connection, so writers of this
    /// process queue on the pool's fair semaphore instead of in SQLite's busy handler (which
    /// sleeps 1, 2, 5, 10... ms between retries and leaves the lock idle meanwhile); reads
    /// keep the other pool and, in WAL mode, never wait for the writer. On PostgreSQL the
    /// same pool as reads.
    writer: AnyPool,
    backend: Backend,
    /// The group committer of a SQLite file (`:memory:` has one connection for reads and
    /// writes and keeps the plain path).
    committer: Option<commit::Committer>,
    /// The group committer of instance commits on PostgreSQL (see `pg_commit.rs`).
    pg_committer: Option<pg_commit::PgCommitter>,
    /// Batched instance reads on PostgreSQL (see `pg_reads.rs`).
    pg_reader: Option<pg_reads::PgReader>,
    /// PostgreSQL: the pool of statements that find their rows by key (the group commit, the
    /// batched reads, the relay's), never planned as a scan ([`connect_postgres`]).
    keyed: Option<AnyPool>,
    /// In-place reads of instances (a SQLite file only; see `sqlite_readers.rs`).
    readers: Option<std::sync::Arc<sqlite_readers::SqliteReaders>>,
}

/// A pooled PostgreSQL connection idle this long is pinged before it is handed out.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);
/// Connections of the keyed pool: the group committer, the batched reader, the relay's pass
/// and its deletes each use one at a time; the rest is for a group's fallback of one
/// transaction per commit. (The event lane's leader takes its connection out of the pool,
/// which may then open another.)
const KEYED_CONNECTIONS: u32 = 6;

/// A PostgreSQL pool. `keyed`: the pool of the group committer, the batched reads and the
/// relay, whose statements all find their rows by key, so its sessions never plan a
/// sequential scan.
///
/// Why: sqlx prepares each statement once per connection, and after five runs PostgreSQL keeps
/// a generic plan of it, costed with the table's size at that moment. The first statements of
/// a fresh database see an empty `workflow_instances`, where reading the whole table is the
/// cheapest plan; that plan then served every group commit until autovacuum's next `ANALYZE`
/// (a minute apart), reading every instance each time (round 23 in docs/benchmarks.md: 2.5
/// times PostgreSQL's CPU per instance in a 6,000-instance run). `enable_seqscan = off` makes
/// the planner pick an index whenever one applies, whatever the table's size.
async fn connect_postgres(url: &str, max: u32, keyed: bool) -> Result<AnyPool, StoreError> {
    let options = AnyPoolOptions::new()
        .max_connections(max.max(1))
        .acquire_timeout(Duration::from_secs(30))
        // sqlx pings every connection it hands out by default: a round trip, and a wake-up of
        // its backend, before each transaction or statement (~1 in 8 of the api's and pools'
        // CPU samples in the distributed bench). Only a connection that sat idle is pinged; one
        // that broke while busy fails its next statement (retryable `Io`) and is replaced.
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_IF_IDLE_FOR {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        });
    let options = if keyed {
        options.after_connect(|conn, _meta| {
            Box::pin(async move {
                sqlx::Executor::execute(conn, "SET enable_seqscan = off").await?;
                Ok(())
            })
        })
    } else {
        options
    };
    Ok(options.connect(url).await?)
}

impl Store {
    /// Connect to `sqlite:///path/file.db?mode=rwc`, `sqlite::memory:` or `postgres://...`.
    ///
    /// A SQLite file (and its directory) is created if missing. Does not migrate: call
    /// [`Store::migrate`].
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        Store::connect_with(url, 10).await
    }

    /// [`Store::connect`] with at most `max_connections` PostgreSQL connections in the pool
    /// (SQLite sizes its own).
    pub async fn connect_with(url: &str, max_connections: u32) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = Backend::from_url(url).ok_or_else(|| {
            StoreError::Database(sqlx::Error::Configuration(
                format!(
                    "unsupported database URL scheme (expected sqlite: or postgres://): {}",
                    redact(url)
                )
                .into(),
            ))
        })?;
        let (pool, writer, committer, readers) = match backend {
            Backend::Sqlite => {
                let (pool, writer, memory) = connect_sqlite(url).await?;
                match sqlite_path(url) {
                    Some(path) if !memory => (
                        pool,
                        writer.clone(),
                        Some(commit::Committer::start(writer, &path)?),
                        Some(std::sync::Arc::new(sqlite_readers::SqliteReaders::new(
                            &path,
                        ))),
                    ),
                    _ => (pool, writer, None, None),
                }
            }
            Backend::Postgres => {
                let pool = connect_postgres(url, max_connections, false).await?;
                (pool.clone(), pool, None, None)
            }
        };
        let (pg_committer, pg_reader, keyed) = match backend {
            Backend::Postgres => {
                let keyed = connect_postgres(url, KEYED_CONNECTIONS, true).await?;
                (
                    Some(pg_commit::PgCommitter::start(keyed.clone())),
                    Some(pg_reads::PgReader::start(keyed.clone())),
                    Some(keyed),
                )
            }
            Backend::Sqlite => (None, None, None),
        };
        tracing::debug!(?backend, "store connected");
        Ok(Store {
            pool,
            writer,
            backend,
            committer,
            pg_committer,
            pg_reader,
            keyed,
            readers,
        })
    }

    /// Apply the embedded migrations of this backend that are not applied yet.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let migrator = match self.backend {
            Backend::Sqlite => &SQLITE_MIGRATOR,
            Backend::Postgres => &POSTGRES_MIGRATOR,
        };
        migrator.run(&self.pool).await?;
        Ok(())
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The underlying pool, for health checks, operational tooling and tests. Writes through it
    /// bypass every invariant of this crate.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Where a write outside [`Store::begin_write`] (a single autocommit statement) runs. On
    /// SQLite a write on a read connection would contend with the writer in SQLite's busy
    /// handler, which sleeps milliseconds while the lock sits idle; on the writer it queues.
    pub(crate) fn write_pool(&self) -> &AnyPool {
        &self.writer
    }

    /// Where statements that find their rows by key run: on PostgreSQL the keyed pool, which
    /// never plans a scan ([`connect_postgres`]); on SQLite the writer.
    pub(crate) fn keyed_pool(&self) -> &AnyPool {
        self.keyed.as_ref().unwrap_or(&self.writer)
    }

    /// Close the pools, waiting for connections in use to be returned.
    pub async fn close(&self) {
        if let Some(keyed) = &self.keyed {
            keyed.close().await;
        }
        self.writer.close().await;
        self.pool.close().await;
    }

    /// Cheap liveness check: one round trip to the database.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let _: AnyQueryResult = self.pool.execute("SELECT 1").await?;
        Ok(())
    }

    /// Start a write transaction. On SQLite `BEGIN IMMEDIATE` takes the write lock up front
    /// (waiting up to the busy timeout), so a transaction that reads before it writes can never
    /// fail on the lock upgrade with `SQLITE_BUSY_SNAPSHOT`. PostgreSQL uses row locks.
    pub(crate) async fn begin_write(
        &self,
    ) -> Result<sqlx::Transaction<'static, sqlx::Any>, StoreError> {
        begin_on(&self.writer, self.backend).await
    }
}

/// [`Store::begin_write`] on a given write pool.
pub(crate) async fn begin_on(
    writer: &AnyPool,
    backend: Backend,
) -> Result<sqlx::Transaction<'static, sqlx::Any>, StoreError> {
    let tx = match backend {
        Backend::Sqlite => writer.begin_with("BEGIN IMMEDIATE").await?,
        Backend::Postgres => writer.begin().await?,
    };
    Ok(tx)
}

/// Per-connection SQLite settings. `busy_timeout` comes first so the others wait for locks.
///
/// Durability: in WAL mode `synchronous = NORMAL` fsyncs the WAL at each checkpoint, not at
/// each commit. A committed transaction survives a crash of the process (its frames are in the
/// WAL file, in the OS's page cache); a power loss or OS crash can lose the last commits
/// before the checkpoint, never corrupt the database. `FULL` would fsync every commit.
/// `mmap_size` lets readers map the database file instead of copying pages with `pread`;
/// `cache_size` (negative: KiB) keeps 32 MiB of pages per connection (the embedded
/// committer's own connection keeps 2 MiB: `sqlite_writer::WRITER_CACHE_SIZE` says why).
pub(crate) const SQLITE_PRAGMAS: [&str; 5] = [
    "PRAGMA foreign_keys = ON",
    "PRAGMA synchronous = NORMAL",
    "PRAGMA temp_store = MEMORY",
    "PRAGMA mmap_size = 268435456",
    "PRAGMA cache_size = -32768",
];

/// Read connections of a SQLite file (the writer has its own one).
const SQLITE_READERS: u32 = 4;

/// The read pool and the one-connection write pool of a SQLite database (the same pool, of
/// one connection, for `:memory:`), and whether it is `:memory:`.
async fn connect_sqlite(url: &str) -> Result<(AnyPool, AnyPool, bool), StoreError> {
    let memory = url.contains(":memory:") || url.contains("mode=memory");
    let url = if memory {
        url.to_string()
    } else {
        create_parent_dir(url)?;
        let url = if url.contains("mode=") {
            url.to_string()
        } else if url.contains('?') {
            format!("{url}&mode=rwc")
        } else {
            format!("{url}?mode=rwc")
        };
        // Switch the file to WAL once, on a lone connection: the mode is persistent, and
        // changing it while other connections are open could fail with SQLITE_BUSY.
        let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&url).await?;
        conn.execute(format!("PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}").as_str())
            .await?;
        conn.execute("PRAGMA journal_mode = WAL").await?;
        sqlx::Connection::close(conn).await?;
        url
    };
    let options = || {
        AnyPoolOptions::new()
            .after_connect(|conn, _meta| {
                Box::pin(async move {
                    conn.execute(
                        format!("PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}").as_str(),
                    )
                    .await?;
                    for pragma in SQLITE_PRAGMAS {
                        conn.execute(pragma).await?;
                    }
                    Ok(())
                })
            })
            .acquire_timeout(Duration::from_secs(30))
            // A file's connection has no peer that could hang up: a ping per acquire (a hop to
            // its worker thread and back) would find nothing.
            .test_before_acquire(false)
    };
    if memory {
        // Each connection to `:memory:` is its own database: keep exactly one, forever.
        let pool = options()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect(&url)
            .await?;
        return Ok((pool.clone(), pool, true));
    }
    // The writer stays open, its page cache warm.
    let writer = options()
        .max_connections(1)
        .min_connections(1)
        .idle_timeout(None)
        .max_lifetime(None)
        .connect(&url)
        .await?;
    let readers = options()
        .max_connections(SQLITE_READERS)
        .connect(&url)
        .await?;
    Ok((readers, writer, false))
}

/// The file a `sqlite:` URL names (`sqlite:///abs/path?...`, `sqlite:rel/path`), if any.
fn sqlite_path(url: &str) -> Option<std::path::PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    let path = rest.split('?').next().unwrap_or(rest);
    (!path.is_empty()).then(|| std::path::PathBuf::from(path))
}

/// sqlx creates a missing SQLite file (mode=rwc) but not its directory.
fn create_parent_dir(url: &str) -> Result<(), StoreError> {
    let Some(path) = sqlite_path(url) else {
        return Ok(());
    };
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent)
                .map_err(|e| StoreError::Database(sqlx::Error::Io(e)))?;
        }
    }
    Ok(())
}

/// A URL fit for an error message: the password, if any, replaced.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_from_url() {
        assert_eq!(Backend::from_url("sqlite::memory:"), Some(Backend::Sqlite));
        assert_eq!(
            Backend::from_url("sqlite:///tmp/x.db?mode=rwc"),
            Some(Backend::Sqlite)
        );
        assert_eq!(
            Backend::from_url("postgres://u@h/db"),
            Some(Backend::Postgres)
        );
        assert_eq!(
            Backend::from_url("postgresql://u@h/db"),
            Some(Backend::Postgres)
        );
        assert_eq!(Backend::from_url("mysql://u@h/db"), None);
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("sqlite::memory:"), "sqlite::memory:");
    }
}
