//! The SQLite file's hot reads (an instance by id or idempotency key, a template's latest
//! version, a decision's outcome), run on the caller's thread.
//!
//! Every step a pool takes starts by loading its instance, every start reads its template and
//! every approval call its outcome. Through sqlx each read is a hop to a driver thread and back
//! (two wake-ups) for an indexed lookup that takes SQLite a few microseconds on a warm page
//! cache, so here they run in place, on a connection taken from a small idle list. In WAL mode a reader never waits for the writer, so the read cannot block
//! the async runtime for longer than the lookup itself.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{params, OpenFlags, OptionalExtension};

use workflow_core::Timestamp;

use crate::queries::{
    decode_instance, decode_template, InstanceColumns, TemplateColumns, INSTANCE_COLS,
    TEMPLATE_COLS, TEMPLATE_FROM,
};
use crate::records::{DecisionOutcome, InstanceRecord, TemplateRecord};
use crate::{StoreError, SQLITE_BUSY_TIMEOUT_MS};

/// Idle connections kept; more are opened when needed and closed when returned.
const IDLE: usize = 8;

/// Read connections of a SQLite file, opened on demand.
#[derive(Debug)]
pub(crate) struct SqliteReaders {
    path: PathBuf,
    idle: Mutex<Vec<rusqlite::Connection>>,
}

impl SqliteReaders {
    pub(crate) fn new(path: &Path) -> SqliteReaders {
        SqliteReaders {
            path: path.to_path_buf(),
            idle: Mutex::new(Vec::new()),
        }
    }

    /// The instance with this id (any partner: the caller checks the owner).
    pub(crate) fn instance(&self, id: &str) -> Result<Option<InstanceRecord>, StoreError> {
        self.with(|conn| {
            let sql = format!("SELECT {INSTANCE_COLS} FROM workflow_instances WHERE id = ?1");
            let cols = conn
                .prepare_cached(&sql)?
                .query_row(params![id], instance_columns)
                .optional()?;
            cols.map(decode_instance).transpose()
        })
    }

    /// The instance a partner created with an idempotency key.
    pub(crate) fn instance_by_key(
        &self,
        partner_id: &str,
        key: &str,
    ) -> Result<Option<InstanceRecord>, StoreError> {
        self.with(|conn| instance_by_key(conn, partner_id, key))
    }

    /// The latest version of a partner's template.
    pub(crate) fn latest_template(
        &self,
        partner_id: &str,
        id: &str,
    ) -> Result<Option<TemplateRecord>, StoreError> {
        self.with(|conn| {
            let sql = format!(
                "SELECT {TEMPLATE_COLS} FROM {TEMPLATE_FROM} \
                 WHERE v.partner_id = ?1 AND v.id = ?2 AND v.version = h.latest_version"
            );
            let row = conn
                .prepare_cached(&sql)?
                .query_row(params![partner_id, id], |row| {
                    Ok(TemplateColumns {
                        id: row.get(0)?,
                        partner_id: row.get(1)?,
                        version: row.get(2)?,
                        name: row.get(3)?,
                        trigger_type: row.get(4)?,
                        active: row.get(5)?,
                        doc: row.get(6)?,
                        created_at: row.get(7)?,
                        created_by: row.get(8)?,
                    })
                })
                .optional()?;
            row.map(decode_template).transpose()
        })
    }

    /// A decision's recorded outcome.
    pub(crate) fn decision_outcome(
        &self,
        partner_id: &str,
        decision_id: &str,
    ) -> Result<Option<DecisionOutcome>, StoreError> {
        self.with(|conn| {
            let outcome = conn
                .prepare_cached(
                    "SELECT decision_id, partner_id, instance_id, step_index, accepted, code, \
                     message, decided_at FROM approval_decisions \
                     WHERE partner_id = ?1 AND decision_id = ?2",
                )?
                .query_row(params![partner_id, decision_id], |r| {
                    Ok(DecisionOutcome {
                        decision_id: r.get(0)?,
                        partner_id: r.get(1)?,
                        instance_id: r.get(2)?,
                        step_index: r.get(3)?,
                        accepted: r.get::<_, i64>(4)? != 0,
                        code: r.get(5)?,
                        message: r.get(6)?,
                        decided_at: Timestamp(r.get(7)?),
                    })
                })
                .optional()?;
            Ok(outcome)
        })
    }

    fn with<T>(
        &self,
        read: impl FnOnce(&rusqlite::Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let idle = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        let conn = match idle {
            Some(conn) => conn,
            None => self.open()?,
        };
        let result = read(&conn);
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < IDLE {
                idle.push(conn);
            }
        }
        result
    }

    fn open(&self) -> Result<rusqlite::Connection, StoreError> {
        let conn = rusqlite::Connection::open_with_flags(
            &self.path,
            // Read-write (not READ_ONLY) so WAL shared memory works whatever the file modes;
            // only SELECTs run here.
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_millis(SQLITE_BUSY_TIMEOUT_MS))?;
        conn.execute_batch("PRAGMA mmap_size = 268435456; PRAGMA cache_size = -32768;")?;
        Ok(conn)
    }
}

/// The instance a partner created with an idempotency key, on `conn`.
pub(crate) fn instance_by_key(
    conn: &rusqlite::Connection,
    partner_id: &str,
    key: &str,
) -> Result<Option<InstanceRecord>, StoreError> {
    let sql = format!(
        "SELECT {INSTANCE_COLS} FROM workflow_instances WHERE partner_id = ?1 AND idempotency_key = ?2"
    );
    let cols = conn
        .prepare_cached(&sql)?
        .query_row(params![partner_id, key], instance_columns)
        .optional()?;
    cols.map(decode_instance).transpose()
}

/// The columns of [`INSTANCE_COLS`], in that order.
pub(crate) fn instance_columns(row: &rusqlite::Row<'_>) -> rusqlite::Result<InstanceColumns> {
    Ok(InstanceColumns {
        id: row.get(0)?,
        partner_id: row.get(1)?,
        template_id: row.get(2)?,
        template_version: row.get(3)?,
        idempotency_key: row.get(6)?,
        created_by: row.get(7)?,
        trigger: row.get(8)?,
        state: row.get(9)?,
        created_at: row.get(10)?,
        updated_at: row.get(11)?,
        version: row.get(12)?,
        mode: row.get(13)?,
    })
}
