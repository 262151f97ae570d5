//! The SQLite file's hot write path: instance creates and commits, whole transactions run on
//! the group committer's own thread (see `commit.rs`) through a rusqlite connection.
//!
//! Why not sqlx here: sqlx's SQLite driver runs each connection on a worker thread and hands
//! every statement over a channel, so one instance commit (six or so statements plus `BEGIN`
//! and `COMMIT`) costs a dozen thread wake-ups while the database's one write lock is held.
//! Here the statements run where the transaction is decided, prepared once and cached.
//!
//! The SQL is the same as the portable statements in `queries.rs` (same columns, same
//! encodings, same audit chaining), so a row written here reads back through sqlx exactly as
//! one written there; the store's conformance suites run both paths.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use rusqlite::{params, OpenFlags, OptionalExtension};
use workflow_core::audit::{chain_hash, GENESIS};

use crate::commit::InstanceCommit;
use crate::notifications::NewDelivery;
use crate::queries::{audit_content, enum_to_str, to_json};
use crate::records::{AuditDraft, DecisionOutcome, InstanceRecord, OutboxMessage, TimerRecord};
use crate::sqlite_readers::instance_by_key;
use crate::{CreateOutcome, StoreError, SQLITE_BUSY_TIMEOUT_MS, SQLITE_PRAGMAS};

/// A new instance with the outbox messages and audit events of its creation.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NewInstance {
    pub(crate) rec: InstanceRecord,
    pub(crate) outbox: Vec<OutboxMessage>,
    pub(crate) audit: Vec<AuditDraft>,
}

/// One write of a group.
#[derive(Debug)]
pub(crate) enum Write {
    Create(NewInstance),
    Commit(InstanceCommit),
    /// `Store::enqueue`: messages that change no state.
    Enqueue(Vec<OutboxMessage>),
    /// `Store::record_decision_outcome`.
    Decision(DecisionOutcome),
    /// `Store::delete_outbox`: published messages.
    DeleteOutbox(Vec<String>),
}

/// What a write did.
#[derive(Debug)]
pub(crate) enum Written {
    Created(Box<CreateOutcome>),
    Committed,
}

/// The write connection of a SQLite file (used from one thread at a time).
pub(crate) struct SqliteWriter {
    conn: rusqlite::Connection,
}

impl SqliteWriter {
    /// Open `path` (an existing or new file, already in WAL mode) with the store's pragmas.
    pub(crate) fn open(path: &Path) -> Result<SqliteWriter, StoreError> {
        let conn = rusqlite::Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_millis(SQLITE_BUSY_TIMEOUT_MS))?;
        for pragma in SQLITE_PRAGMAS {
            // `execute_batch`: some pragmas answer with a row, which `execute` refuses.
            conn.execute_batch(pragma)?;
        }
        // Prepared statements of a multi-row group stay prepared between groups.
        conn.set_prepared_statement_cache_capacity(32);
        Ok(SqliteWriter { conn })
    }

    /// Run `writes` in ONE transaction, in order, each inside a savepoint: a write that fails
    /// is undone alone and answered with its error, the others go on. Each answer is the one
    /// the write would have had in a transaction of its own; a write is answered only after
    /// the transaction holding it committed. If `BEGIN` or `COMMIT` fails, every write is
    /// retried in a transaction of its own.
    pub(crate) fn write_group(&mut self, writes: &[Write]) -> Vec<Result<Written, StoreError>> {
        match self.try_group(writes) {
            Ok(results) => results,
            Err(_) => writes.iter().map(|w| self.write_alone(w)).collect(),
        }
    }

    fn try_group(
        &mut self,
        writes: &[Write],
    ) -> Result<Vec<Result<Written, StoreError>>, StoreError> {
        let mut tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut results = Vec::with_capacity(writes.len());
        for write in writes {
            let mut sp = tx.savepoint()?;
            let result = apply(&sp, write);
            if result.is_err() {
                sp.rollback()?;
            }
            sp.commit()?;
            results.push(result);
        }
        tx.commit()?;
        Ok(results)
    }

    fn write_alone(&mut self, write: &Write) -> Result<Written, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let written = apply(&tx, write)?;
        tx.commit()?;
        Ok(written)
    }
}

fn apply(conn: &rusqlite::Connection, write: &Write) -> Result<Written, StoreError> {
    match write {
        Write::Create(new) => create(conn, new).map(|c| Written::Created(Box::new(c))),
        Write::Commit(c) => {
            commit(conn, c)?;
            Ok(Written::Committed)
        }
        Write::DeleteOutbox(ids) => {
            let mut stmt = conn.prepare_cached("DELETE FROM outbox WHERE id = ?1")?;
            for id in ids {
                stmt.execute(params![id])?;
            }
            Ok(Written::Committed)
        }
        Write::Enqueue(messages) => {
            insert_outbox(conn, messages)?;
            Ok(Written::Committed)
        }
        Write::Decision(o) => {
            conn.prepare_cached(
                "INSERT INTO approval_decisions \
                 (decision_id, partner_id, instance_id, step_index, accepted, code, message, decided_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (decision_id) DO NOTHING",
            )?
            .execute(params![
                o.decision_id,
                o.partner_id,
                o.instance_id,
                o.step_index,
                i64::from(o.accepted),
                o.code,
                o.message,
                o.decided_at.0,
            ])?;
            Ok(Written::Committed)
        }
    }
}

/// `Store::create_instance`'s statements.
fn create(conn: &rusqlite::Connection, new: &NewInstance) -> Result<CreateOutcome, StoreError> {
    let rec = &new.rec;
    let info = &rec.info;
    let inserted = conn
        .prepare_cached(
            "INSERT INTO workflow_instances (id, partner_id, template_id, template_version, status, \
             current_step, idempotency_key, created_by, trigger_data, state, created_at, updated_at, version, mode) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14) \
             ON CONFLICT (partner_id, idempotency_key) DO NOTHING",
        )?
        .execute(params![
            info.id,
            info.partner_id,
            info.template_id,
            info.template_version,
            rec.state.status.as_str(),
            rec.state.current_step.map(|s| s as i64),
            rec.idempotency_key,
            to_json(&info.created_by)?,
            to_json(&info.trigger)?,
            to_json(&rec.state)?,
            info.created_at.0,
            rec.updated_at.0,
            rec.version,
            info.mode.as_str(),
        ]);
    let inserted = match inserted {
        Ok(rows) => rows > 0,
        // The key is handled by ON CONFLICT: a violation is on the id, unless the key's row
        // came from elsewhere in between; the lookup below tells which.
        Err(e) if is_unique_violation(&e) && rec.idempotency_key.is_some() => false,
        Err(e) if is_unique_violation(&e) => {
            return Err(StoreError::AlreadyExists {
                what: "instance",
                id: info.id.clone(),
            })
        }
        Err(e) => return Err(e.into()),
    };
    if !inserted {
        let key = rec.idempotency_key.as_deref().unwrap_or_default();
        return match instance_by_key(conn, &info.partner_id, key)? {
            Some(existing) => Ok(CreateOutcome::Existing(existing)),
            None => Err(StoreError::AlreadyExists {
                what: "instance",
                id: info.id.clone(),
            }),
        };
    }
    upsert_steps(conn, rec)?;
    insert_outbox(conn, &new.outbox)?;
    append_audits(conn, &info.partner_id, &new.audit)?;
    Ok(CreateOutcome::Created(rec.clone()))
}

/// `write_instance_commit`'s statements (see there for why the UPDATE comes first).
fn commit(conn: &rusqlite::Connection, c: &InstanceCommit) -> Result<(), StoreError> {
    let rec = &c.rec;
    let info = &rec.info;
    let owner: Option<String> = conn
        .prepare_cached(
            "UPDATE workflow_instances SET status = ?1, current_step = ?2, state = ?3, \
             updated_at = ?4, version = ?5 WHERE id = ?6 AND version = ?7 RETURNING partner_id",
        )?
        .query_row(
            params![
                rec.state.status.as_str(),
                rec.state.current_step.map(|s| s as i64),
                to_json(&rec.state)?,
                rec.updated_at.0,
                c.expected_version + 1,
                info.id,
                c.expected_version,
            ],
            |row| row.get(0),
        )
        .optional()?;
    match owner {
        Some(owner) if owner == info.partner_id => {}
        Some(_) => return Err(not_found(&info.id)),
        None => {
            let owner: Option<String> = conn
                .prepare_cached("SELECT partner_id FROM workflow_instances WHERE id = ?1")?
                .query_row(params![info.id], |row| row.get(0))
                .optional()?;
            return Err(match owner {
                Some(owner) if owner == info.partner_id => StoreError::Conflict {
                    what: "instance",
                    id: info.id.clone(),
                },
                _ => not_found(&info.id),
            });
        }
    }
    upsert_steps(conn, rec)?;
    insert_outbox(conn, &c.outbox)?;
    insert_timers(conn, &c.timers)?;
    insert_deliveries(conn, &c.deliveries)?;
    append_audits(conn, &info.partner_id, &c.audit)?;
    Ok(())
}

/// Mirror `state.steps` into `workflow_step_executions`; the last entry of a step index wins.
/// A row whose values did not change is left alone (no page dirtied for it).
fn upsert_steps(conn: &rusqlite::Connection, rec: &InstanceRecord) -> Result<(), StoreError> {
    let unique: std::collections::BTreeMap<usize, &workflow_core::instance::StepExecution> =
        rec.state.steps.iter().map(|s| (s.index, s)).collect();
    // SQLite numbers `$1`...`$12` by first appearance, so they bind positionally.
    static SQL: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| crate::queries::step_upsert_sql(1));
    let mut stmt = conn.prepare_cached(&SQL)?;
    for step in unique.into_values() {
        stmt.execute(params![
            rec.info.id,
            step.index as i64,
            rec.info.partner_id,
            step.name,
            step.step_type.as_str(),
            enum_to_str(&step.status)?,
            step.started_at.map(|t| t.0),
            step.finished_at.map(|t| t.0),
            step.actor.as_ref().map(to_json).transpose()?,
            step.input.as_ref().map(to_json).transpose()?,
            step.output.as_ref().map(to_json).transpose()?,
            step.error,
        ])?;
    }
    Ok(())
}

fn insert_outbox(
    conn: &rusqlite::Connection,
    messages: &[OutboxMessage],
) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO outbox (id, topic, msg_key, payload) VALUES (?1, ?2, ?3, ?4)",
    )?;
    for m in messages {
        stmt.execute(params![m.id, m.topic, m.key, m.payload])
            .map_err(|e| {
                on_unique(e, || StoreError::AlreadyExists {
                    what: "outbox message",
                    id: m.id.clone(),
                })
            })?;
    }
    Ok(())
}

fn insert_timers(conn: &rusqlite::Connection, timers: &[TimerRecord]) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO timers (id, partner_id, instance_id, step_index, step_type, kind, due_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (id) DO NOTHING",
    )?;
    for t in timers {
        stmt.execute(params![
            t.id,
            t.partner_id,
            t.instance_id,
            t.step_index,
            t.step_type,
            t.kind,
            t.due_at.0
        ])?;
    }
    Ok(())
}

fn insert_deliveries(
    conn: &rusqlite::Connection,
    deliveries: &[NewDelivery],
) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO notification_deliveries (id, partner_id, instance_id, step_index, purpose, \
         channel, target, request, wait, status, attempts, round_failures, next_check_at, \
         created_at, updated_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'queued', 0, 0, ?10, ?11, ?11) \
         ON CONFLICT (id) DO NOTHING",
    )?;
    for d in deliveries {
        let request = serde_json::to_string(&d.request)
            .map_err(|e| StoreError::corrupt(format!("cannot encode a delivery: {e}")))?;
        stmt.execute(params![
            d.id,
            d.partner_id,
            d.instance_id,
            d.step_index,
            d.purpose,
            d.channel,
            d.target,
            request,
            i64::from(d.wait),
            d.check_at.0,
            d.created_at.0,
        ])?;
    }
    Ok(())
}

/// Chain `drafts` onto their streams: each stream's head read once, then one INSERT per event.
fn append_audits(
    conn: &rusqlite::Connection,
    partner_id: &str,
    drafts: &[AuditDraft],
) -> Result<(), StoreError> {
    let mut heads: HashMap<&str, (i64, String)> = HashMap::new();
    let mut insert = conn.prepare_cached(
        "INSERT INTO audit_events (stream, seq, partner_id, at, actor, kind, before_doc, \
         after_doc, reason, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?;
    for draft in drafts {
        let (prev_seq, prev_hash) = match heads.remove(draft.stream.as_str()) {
            Some(head) => head,
            None => stream_head(conn, partner_id, &draft.stream)?,
        };
        let seq = prev_seq + 1;
        let hash = chain_hash(&prev_hash, &audit_content(partner_id, draft, seq));
        insert
            .execute(params![
                draft.stream,
                seq,
                partner_id,
                draft.at.0,
                to_json(&draft.actor)?,
                draft.kind,
                to_json(&draft.before)?,
                to_json(&draft.after)?,
                draft.reason,
                prev_hash,
                hash,
            ])
            .map_err(|e| {
                on_unique(e, || StoreError::Conflict {
                    what: "audit stream",
                    id: draft.stream.clone(),
                })
            })?;
        heads.insert(draft.stream.as_str(), (seq, hash));
    }
    Ok(())
}

fn stream_head(
    conn: &rusqlite::Connection,
    partner_id: &str,
    stream: &str,
) -> Result<(i64, String), StoreError> {
    let head = conn
        .prepare_cached(
            "SELECT seq, hash FROM audit_events WHERE partner_id = ?1 AND stream = ?2 \
             ORDER BY seq DESC LIMIT 1",
        )?
        .query_row(params![partner_id, stream], |row| {
            Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
        })
        .optional()?;
    Ok(head.unwrap_or_else(|| (0, GENESIS.to_string())))
}

fn not_found(id: &str) -> StoreError {
    StoreError::NotFound {
        what: "instance",
        id: id.to_string(),
    }
}

/// A unique violation as `taken()` (what the key means to the caller); any other error as is.
fn on_unique(e: rusqlite::Error, taken: impl FnOnce() -> StoreError) -> StoreError {
    if is_unique_violation(&e) {
        taken()
    } else {
        e.into()
    }
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
    )
}
