//! The store's one error type, with database failures already classified.
//!
//! Unique and foreign-key violations are translated here (into [`StoreError::AlreadyExists`],
//! [`StoreError::NotFound`] or [`StoreError::Conflict`]) so callers never parse SQL errors.

use sqlx::error::ErrorKind;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what} {id} not found")]
    NotFound { what: &'static str, id: String },
    /// A unique key is taken (duplicate id, duplicate key hash...).
    #[error("{what} {id} already exists")]
    AlreadyExists { what: &'static str, id: String },
    /// Optimistic concurrency lost: someone else changed the row (or the audit stream) first.
    /// Re-read and try again.
    #[error("{what} {id} was changed concurrently")]
    Conflict { what: &'static str, id: String },
    /// A create made from a template's head (`Store::create_instance_at_head`) found that
    /// head moved: a newer version, deactivated, or gone. Nothing was written; read the
    /// template again.
    #[error("template {id} changed since it was read")]
    TemplateChanged { id: String },
    /// A stored document does not decode: the database was changed outside this crate.
    #[error("corrupt stored data: {message}")]
    Corrupt { message: String },
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    /// A failure of the embedded runtime's SQLite writer (`sqlite_writer.rs`).
    #[error("database error: {0}")]
    Sqlite(#[source] rusqlite::Error),
    #[error("migration failed: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),
}

impl StoreError {
    /// True when the same operation may succeed if retried (after re-reading, for a
    /// [`StoreError::Conflict`]): lost optimistic concurrency, pool exhaustion, IO, SQLite
    /// busy/locked, PostgreSQL serialization failures and deadlocks.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Conflict { .. } => true,
            StoreError::Database(e) => is_transient(e),
            StoreError::Sqlite(e) => is_transient_sqlite(e),
            StoreError::NotFound { .. }
            | StoreError::AlreadyExists { .. }
            | StoreError::TemplateChanged { .. }
            | StoreError::Corrupt { .. }
            | StoreError::Migrate(_) => false,
        }
    }

    pub(crate) fn corrupt(message: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            message: message.into(),
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Database(e)
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Sqlite(e)
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        StoreError::Migrate(e)
    }
}

/// PostgreSQL SQLSTATEs worth a retry: serialization_failure, deadlock_detected,
/// lock_not_available, too_many_connections, admin_shutdown, cannot_connect_now.
const PG_TRANSIENT: [&str; 6] = ["40001", "40P01", "55P03", "53300", "57P01", "57P03"];
/// SQLite primary result codes worth a retry: SQLITE_BUSY, SQLITE_LOCKED. The driver reports
/// extended codes (e.g. 517 = SQLITE_BUSY_SNAPSHOT); the low byte is the primary code.
const SQLITE_BUSY: i64 = 5;
const SQLITE_LOCKED: i64 = 6;

fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            if db
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .is_some()
            {
                PG_TRANSIENT.contains(&code.as_str())
            } else if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                code.parse::<i64>()
                    .map(|c| matches!(c & 0xff, SQLITE_BUSY | SQLITE_LOCKED))
                    .unwrap_or(false)
            } else {
                false
            }
        }
        _ => false,
    }
}

fn is_transient_sqlite(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(i64::from(f.extended_code) & 0xff, SQLITE_BUSY | SQLITE_LOCKED)
    )
}

pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.kind() == ErrorKind::UniqueViolation)
}

pub(crate) fn is_foreign_key_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.kind() == ErrorKind::ForeignKeyViolation)
}
