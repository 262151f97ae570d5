//! The SQLite file's hot write path: instance creates and commits, whole transactions run on
//! the group committer's own thread (see `commit.rs`) through a rusqlite connection.
//!
//! Why not sqlx here: sqlx's SQLite driver runs each connection on a worker thread and hands
//! every statement over a channel, so one instance commit (six or so statements plus `BEGIN`
//! and `COMMIT`) costs a dozen thread wake-ups while the database's one write lock is held.
//! Here the statements run where the transaction is decided, prepared once and cached.
//!
//! Work is split so the one writer thread does as little as possible while it holds the lock:
//! a [`Write`] is turned into an [`Encoded`] one on the caller's thread (every JSON document
//! serialised, the step rows deduplicated, the audit hash's canonical JSON prepared around the
//! two values only the writer knows: the stream's previous hash and the event's seq), and the
//! writer only binds, steps and hashes. WAL checkpoints run on a thread of their own too (see
//! `commit.rs`); this connection never checkpoints automatically.
//!
//! The SQL is the same as the portable statements in `queries.rs` (same columns, same
//! encodings, same audit chaining), so a row written here reads back through sqlx exactly as
//! one written there; the store's conformance suites run both paths.

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use rusqlite::{params, OpenFlags, OptionalExtension};
use workflow_core::audit::{chain_hash, ChainHasher, GENESIS};
use workflow_core::instance::StepExecution;

use crate::audit_blocks;
use crate::commit::{CommitParts, InstanceCommit};
use crate::notifications::NewDelivery;
use crate::queries::{audit_content, push_json, to_json};
use crate::records::{AuditDraft, DecisionOutcome, InstanceRecord, OutboxMessage, TimerRecord};
use crate::sqlite_readers::instance_by_key;
use crate::step_mirror::{changed, step_mirror, worth_remembering, KnownSteps, StepMirror};
use crate::{CreateOutcome, StoreError, SQLITE_BUSY_TIMEOUT_MS, SQLITE_PRAGMAS};

/// The writer's page cache (`PRAGMA cache_size`, negative: KiB), smaller than the store's 32
/// MiB. A commit that splits a b-tree page renumbers a page through the lock-byte page's number
/// (`balance_nonroot` sorts the new pages), which raises the cache's highest key to 262,145;
/// the end of the transaction then truncates the cache to the database's size by walking its
/// whole hash table, one slot per cached page. With 32 MiB (8,192 pages) that walk was the
/// committer's largest single cost; what a commit touches (each b-tree's right-hand edge and
/// the rows of instances in flight) fits in 2 MiB, and the rest is a read of the mapped file or
/// the WAL away. Readers keep the larger cache.
const WRITER_CACHE_SIZE: &str = "PRAGMA cache_size = -2048";

/// A new instance with the outbox messages, audit events, timers and notification deliveries
/// of its creation: what [`crate::Store::create_owned`] takes.
#[derive(Debug, Clone, PartialEq)]
pub struct NewInstance {
    pub rec: InstanceRecord,
    pub outbox: Vec<OutboxMessage>,
    pub audit: Vec<AuditDraft>,
    pub timers: Vec<TimerRecord>,
    pub deliveries: Vec<NewDelivery>,
    /// Write only if the template's head is still `rec`'s version, and active.
    pub at_head: bool,
}

impl NewInstance {
    /// This create's parts, borrowed.
    pub(crate) fn parts(&self) -> CreateParts<'_> {
        CreateParts {
            rec: &self.rec,
            outbox: &self.outbox,
            audit: &self.audit,
            timers: &self.timers,
            deliveries: &self.deliveries,
            at_head: self.at_head,
        }
    }
}

/// [`NewInstance`]'s parts, borrowed from the caller.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CreateParts<'a> {
    pub(crate) rec: &'a InstanceRecord,
    pub(crate) outbox: &'a [OutboxMessage],
    pub(crate) audit: &'a [AuditDraft],
    pub(crate) timers: &'a [TimerRecord],
    pub(crate) deliveries: &'a [NewDelivery],
    pub(crate) at_head: bool,
}

/// One write of a group, as the store's methods hand it to the committer.
#[derive(Debug)]
pub(crate) enum Write {
    Commit(Box<InstanceCommit>),
    /// `Store::enqueue`: messages that change no state.
    Enqueue(Vec<OutboxMessage>),
    /// `Store::record_decision_outcome`.
    Decision(DecisionOutcome),
    /// `Store::delete_outbox`: published messages.
    DeleteOutbox(Vec<String>),
}

/// What the caller keeps of a write until it is answered.
#[derive(Debug)]
pub(crate) enum Pending {
    Nothing,
    /// A create's record: the answer to the create once written.
    Created(Box<InstanceRecord>),
    /// A commit's instance, the version it writes and its step mirror then; `None` when the
    /// instance is finished, so nothing is kept of it ([`worth_remembering`]).
    Committed {
        id: String,
        version: i64,
        mirror: Option<StepMirror>,
    },
}

/// What a write did.
#[derive(Debug)]
pub(crate) enum Written {
    Created(Box<CreateOutcome>),
    Committed,
}

/// A write ready for the writer thread: every document already serialised.
#[derive(Debug)]
pub(crate) enum Encoded {
    Create(Box<CreateRows>),
    Commit(Box<CommitRows>),
    Enqueue(Vec<OutboxMessage>),
    Decision(DecisionOutcome),
    DeleteOutbox(Vec<String>),
}

/// What the writer did with an [`Encoded`] write. A create answers without its record: the
/// caller still has it (see `Committer::submit`).
#[derive(Debug)]
pub(crate) enum Done {
    Created,
    /// The idempotency key was taken: nothing written, this is the instance holding it.
    Existing(Box<InstanceRecord>),
    Committed,
}

/// `Store::create_instance`'s rows.
#[derive(Debug)]
pub(crate) struct CreateRows {
    id: String,
    partner_id: String,
    template_id: String,
    template_version: i64,
    status: &'static str,
    current_step: Option<i64>,
    idempotency_key: Option<String>,
    created_by: String,
    trigger: String,
    state: String,
    created_at: i64,
    updated_at: i64,
    version: i64,
    mode: &'static str,
    at_head: bool,
    steps: Vec<StepRow>,
    outbox: Vec<OutboxMessage>,
    timers: Vec<TimerRecord>,
    deliveries: Vec<DeliveryRow>,
    audit: Vec<AuditRow>,
}

/// An instance commit's rows (`write_instance_commit`'s).
#[derive(Debug)]
pub(crate) struct CommitRows {
    id: String,
    partner_id: String,
    status: &'static str,
    current_step: Option<i64>,
    state: String,
    updated_at: i64,
    expected_version: i64,
    steps: Vec<StepRow>,
    outbox: Vec<OutboxMessage>,
    timers: Vec<TimerRecord>,
    deliveries: Vec<DeliveryRow>,
    audit: Vec<AuditRow>,
    /// The outcome of the approval decision the transition applied.
    decision: Option<DecisionOutcome>,
}

/// A `workflow_step_executions` row (without its instance's keys); serialized with the
/// column names (the PostgreSQL group's JSON rows, `pg_rows.rs`).
#[derive(Debug, serde::Serialize)]
pub(crate) struct StepRow {
    #[serde(rename = "step_index")]
    pub(crate) index: i64,
    name: String,
    step_type: &'static str,
    status: &'static str,
    started_at: Option<i64>,
    finished_at: Option<i64>,
    actor: Option<String>,
    input: Option<String>,
    output: Option<String>,
    error: Option<String>,
}

/// A `notification_deliveries` row.
#[derive(Debug)]
struct DeliveryRow {
    id: String,
    partner_id: String,
    instance_id: String,
    step_index: i64,
    purpose: String,
    channel: String,
    target: String,
    request: String,
    wait: bool,
    check_at: i64,
    created_at: i64,
}

/// An audit event, without the chain (seq and hashes) the writer fills in.
#[derive(Debug)]
struct AuditRow {
    stream: String,
    at: i64,
    actor: String,
    kind: String,
    before: String,
    after: String,
    reason: Option<String>,
    hash: HashInput,
}

/// What the event's hash covers, but its seq.
#[derive(Debug)]
enum HashInput {
    /// The canonical JSON (`workflow_core::audit`'s: keys sorted at every level, compact) of
    /// the content is `head + after + mid + before + tail + seq + end`: `after` and `before`
    /// are the columns' own JSON, which is canonical when serde_json's maps iterate in key
    /// order (they do unless its `preserve_order` feature is on). The four pieces are one
    /// buffer, `cuts` the ends of the first three (one allocation an event, not four).
    Prepared { pieces: Vec<u8>, cuts: [usize; 3] },
    /// serde_json keeps insertion order in this build: hash from the draft itself.
    Draft {
        partner_id: String,
        draft: Box<AuditDraft>,
    },
}

impl Encoded {
    /// Encode `write` (on the caller's thread). A commit's step rows are those that differ
    /// from what `known` remembers of its instance at its expected version. (Creates are
    /// encoded from borrowed parts, [`Encoded::create_from`]; the caller keeps the record,
    /// the create's answer once written.)
    pub(crate) fn of(write: Write, known: &KnownSteps) -> Result<(Encoded, Pending), StoreError> {
        Ok(match write {
            Write::Commit(c) => {
                let stored = known.at(&c.rec.info.id, c.expected_version);
                let (encoded, mirror) = Encoded::commit(c.parts(), stored.as_ref())?;
                let pending = Pending::Committed {
                    mirror: worth_remembering(&c.rec).then_some(mirror),
                    id: c.rec.info.id,
                    version: c.expected_version + 1,
                };
                (encoded, pending)
            }
            Write::Enqueue(messages) => (Encoded::Enqueue(messages), Pending::Nothing),
            Write::Decision(o) => (Encoded::Decision(o), Pending::Nothing),
            Write::DeleteOutbox(ids) => (Encoded::DeleteOutbox(ids), Pending::Nothing),
        })
    }

    /// A create, from the caller's borrowed parts: nothing of them is copied but what the
    /// writer thread needs, already encoded (the audit drafts' documents were deep-copied
    /// once per create before).
    pub(crate) fn create_from(new: CreateParts<'_>) -> Result<Encoded, StoreError> {
        let rec = new.rec;
        let info = &rec.info;
        Ok(Encoded::Create(Box::new(CreateRows {
            id: info.id.clone(),
            partner_id: info.partner_id.clone(),
            template_id: info.template_id.clone(),
            template_version: info.template_version,
            status: rec.state.status.as_str(),
            current_step: rec.state.current_step.map(|s| s as i64),
            idempotency_key: rec.idempotency_key.clone(),
            created_by: to_json(&info.created_by)?,
            trigger: to_json(&info.trigger)?,
            state: to_json(&rec.state)?,
            created_at: info.created_at.0,
            updated_at: rec.updated_at.0,
            version: rec.version,
            mode: info.mode.as_str(),
            at_head: new.at_head,
            steps: step_rows(&rec.state.steps)?,
            outbox: new.outbox.to_vec(),
            timers: new.timers.to_vec(),
            deliveries: new
                .deliveries
                .iter()
                .map(delivery_row)
                .collect::<Result<_, _>>()?,
            audit: audit_rows(&info.partner_id, new.audit)?,
        })))
    }

    /// An instance commit, from the caller's borrowed parts (the state is serialised straight
    /// from the record), with the step rows that differ from `stored` (every one when that is
    /// unknown); and the instance's step mirror once it is written.
    pub(crate) fn commit(
        parts: CommitParts<'_>,
        stored: Option<&StepMirror>,
    ) -> Result<(Encoded, StepMirror), StoreError> {
        let CommitParts {
            rec,
            expected_version,
            outbox,
            audit,
            timers,
            deliveries,
            decision,
        } = parts;
        let info = &rec.info;
        let mirror = step_mirror(rec, stored);
        let steps = changed(&mirror, stored)
            .map(step_row)
            .collect::<Result<_, _>>()?;
        let encoded = Encoded::Commit(Box::new(CommitRows {
            id: info.id.clone(),
            partner_id: info.partner_id.clone(),
            status: rec.state.status.as_str(),
            current_step: rec.state.current_step.map(|s| s as i64),
            state: to_json(&rec.state)?,
            updated_at: rec.updated_at.0,
            expected_version,
            steps,
            outbox: outbox.to_vec(),
            timers: timers.to_vec(),
            deliveries: deliveries
                .iter()
                .map(delivery_row)
                .collect::<Result<_, _>>()?,
            audit: audit_rows(&info.partner_id, audit)?,
            decision: decision.cloned(),
        }));
        Ok((encoded, mirror))
    }
}

/// `state.steps` as rows; the last entry of a step index wins.
pub(crate) fn step_rows(steps: &[StepExecution]) -> Result<Vec<StepRow>, StoreError> {
    let unique: BTreeMap<usize, &StepExecution> = steps.iter().map(|s| (s.index, s)).collect();
    unique.into_values().map(step_row).collect()
}

/// One step's mirror row.
pub(crate) fn step_row(step: &StepExecution) -> Result<StepRow, StoreError> {
    Ok(StepRow {
        index: step.index as i64,
        name: step.name.clone(),
        step_type: step.step_type.as_str(),
        status: step.status.as_str(),
        started_at: step.started_at.map(|t| t.0),
        finished_at: step.finished_at.map(|t| t.0),
        actor: step.actor.as_ref().map(to_json).transpose()?,
        input: step.input.as_ref().map(to_json).transpose()?,
        output: step.output.as_ref().map(to_json).transpose()?,
        error: step.error.clone(),
    })
}

fn delivery_row(d: &NewDelivery) -> Result<DeliveryRow, StoreError> {
    Ok(DeliveryRow {
        id: d.id.clone(),
        partner_id: d.partner_id.clone(),
        instance_id: d.instance_id.clone(),
        step_index: d.step_index,
        purpose: d.purpose.clone(),
        channel: d.channel.clone(),
        target: d.target.clone(),
        request: serde_json::to_string(&d.request)
            .map_err(|e| StoreError::corrupt(format!("cannot encode a delivery: {e}")))?,
        wait: d.wait,
        check_at: d.check_at.0,
        created_at: d.created_at.0,
    })
}

fn audit_rows(partner_id: &str, drafts: &[AuditDraft]) -> Result<Vec<AuditRow>, StoreError> {
    drafts
        .iter()
        .map(|draft| audit_row(partner_id, draft))
        .collect()
}

fn audit_row(partner_id: &str, draft: &AuditDraft) -> Result<AuditRow, StoreError> {
    let before = to_json(&draft.before)?;
    let after = to_json(&draft.after)?;
    let hash = if maps_iterate_sorted() {
        // The same keys, in the same (sorted) order, as `workflow_core::audit`'s canonical
        // document; pinned by `prepared_hash_is_the_chain_hash` below.
        // Written straight into one buffer: a `to_json` string per value was ~8 allocations
        // an event, and a commit appends several events per instance.
        let mut pieces =
            Vec::with_capacity(192 + draft.actor.id.len() + partner_id.len() + draft.stream.len());
        pieces.extend_from_slice(b"{\"actor\":{\"id\":");
        push_json(&mut pieces, &draft.actor.id)?;
        pieces.extend_from_slice(b",\"type\":");
        push_json(&mut pieces, &draft.actor.actor_type)?;
        pieces.extend_from_slice(b"},\"after\":");
        let head = pieces.len();
        pieces.extend_from_slice(b",\"at\":");
        push_json(&mut pieces, &draft.at.0)?;
        pieces.extend_from_slice(b",\"before\":");
        let mid = pieces.len();
        pieces.extend_from_slice(b",\"kind\":");
        push_json(&mut pieces, &draft.kind)?;
        pieces.extend_from_slice(b",\"partner_id\":");
        push_json(&mut pieces, &partner_id)?;
        pieces.extend_from_slice(b",\"reason\":");
        push_json(&mut pieces, &draft.reason)?;
        pieces.extend_from_slice(b",\"seq\":");
        let tail = pieces.len();
        pieces.extend_from_slice(b",\"stream\":");
        push_json(&mut pieces, &draft.stream)?;
        pieces.push(b'}');
        HashInput::Prepared {
            pieces,
            cuts: [head, mid, tail],
        }
    } else {
        HashInput::Draft {
            partner_id: partner_id.to_string(),
            draft: Box::new(draft.clone()),
        }
    };
    Ok(AuditRow {
        stream: draft.stream.clone(),
        at: draft.at.0,
        actor: to_json(&draft.actor)?,
        kind: draft.kind.clone(),
        before,
        after,
        reason: draft.reason.clone(),
        hash,
    })
}

/// Whether serde_json's maps iterate in key order (its `preserve_order` feature is off), so
/// a document's compact JSON is its canonical JSON. Found out once, by trying.
fn maps_iterate_sorted() -> bool {
    static SORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SORTED.get_or_init(|| {
        let mut map = serde_json::Map::new();
        map.insert("b".to_string(), serde_json::Value::Null);
        map.insert("a".to_string(), serde_json::Value::Null);
        map.keys().map(String::as_str).eq(["a", "b"])
    })
}

impl AuditRow {
    /// `workflow_core::audit::chain_hash` of this event at `seq` after `prev_hash`.
    fn chain_hash(&self, prev_hash: &str, seq: i64) -> String {
        match &self.hash {
            HashInput::Prepared {
                pieces,
                cuts: [head, mid, tail],
            } => {
                let mut hasher = ChainHasher::new(prev_hash);
                hasher.update(&pieces[..*head]);
                hasher.update(self.after.as_bytes());
                hasher.update(&pieces[*head..*mid]);
                hasher.update(self.before.as_bytes());
                hasher.update(&pieces[*mid..*tail]);
                // The seq's digits on the stack (`seq.to_string()` was an allocation an event).
                let mut digits = [0u8; 20];
                let mut rest = &mut digits[..];
                let _ = write!(rest, "{seq}");
                let written = 20 - rest.len();
                hasher.update(&digits[..written]);
                hasher.update(&pieces[*tail..]);
                hasher.finish_hex()
            }
            HashInput::Draft { partner_id, draft } => {
                chain_hash(prev_hash, &audit_content(partner_id, draft, seq))
            }
        }
    }
}

/// Why a write failed, and whether it had written anything before it did: a clean failure
/// (the version check lost, a key taken by the first statement...) leaves nothing to undo.
struct Failed {
    error: StoreError,
    clean: bool,
}

impl Failed {
    fn clean(error: impl Into<StoreError>) -> Failed {
        Failed {
            error: error.into(),
            clean: true,
        }
    }

    fn dirty(error: impl Into<StoreError>) -> Failed {
        Failed {
            error: error.into(),
            clean: false,
        }
    }

    /// The same failure, after the write had already written something.
    fn after_writing(self) -> Failed {
        Failed {
            error: self.error,
            clean: false,
        }
    }
}

/// The write connection of a SQLite file (used from one thread at a time).
pub(crate) struct SqliteWriter {
    conn: rusqlite::Connection,
}

impl SqliteWriter {
    /// Open `path` (an existing or new file, already in WAL mode) with the store's pragmas.
    /// Its commits never checkpoint the WAL: [`SqliteWriter::checkpoint`] does, called from
    /// the checkpointer's thread on a connection of its own (see `commit.rs`).
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
        conn.execute_batch("PRAGMA wal_autocheckpoint = 0")?;
        conn.execute_batch(WRITER_CACHE_SIZE)?;
        // Prepared statements of a multi-row group stay prepared between groups.
        conn.set_prepared_statement_cache_capacity(32);
        Ok(SqliteWriter { conn })
    }

    /// A passive checkpoint: copy what it can of the WAL into the database file without
    /// waiting for readers or the writer. Returns the WAL's frames and how many of them are
    /// now in the database file.
    pub(crate) fn checkpoint(&self) -> Result<(i64, i64), StoreError> {
        Ok(self
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
                Ok((row.get(1)?, row.get(2)?))
            })?)
    }

    /// Run `writes` in ONE transaction, in order. Each answer is the one the write would
    /// have had in a transaction of its own, and a write is answered only after the
    /// transaction holding it committed.
    ///
    /// First without savepoints: a write that fails before writing anything (the usual
    /// failure: a lost version check) is answered with its error and the group goes on. If
    /// one fails after writing (a duplicate outbox id...), the transaction is rolled back and
    /// the group runs again with each write in a savepoint, so that one is undone alone.
    /// Savepoints cost a statement each way plus a sub-journal copy of every page a write
    /// touches, so they are paid only when needed. If `BEGIN` or `COMMIT` fails, every write
    /// is retried in a transaction of its own.
    pub(crate) fn write_group(&mut self, writes: &[Encoded]) -> Vec<Result<Done, StoreError>> {
        let results = match self.try_plain(writes) {
            Ok(Some(results)) => Ok(results),
            Ok(None) => self.try_savepoints(writes),
            Err(e) => Err(e),
        };
        match results {
            Ok(results) => results,
            Err(_) => writes.iter().map(|w| self.write_alone(w)).collect(),
        }
    }

    /// The group without savepoints; `None` when a write failed after writing (the
    /// transaction was rolled back).
    #[allow(clippy::type_complexity)]
    fn try_plain(
        &mut self,
        writes: &[Encoded],
    ) -> Result<Option<Vec<Result<Done, StoreError>>>, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut results = Vec::with_capacity(writes.len());
        for write in writes {
            match apply(&tx, write) {
                Ok(done) => results.push(Ok(done)),
                // Still in the transaction: some errors (IO, full disk) make SQLite roll the
                // whole transaction back, and what follows would run in autocommit.
                Err(f) if f.clean && !tx.is_autocommit() => results.push(Err(f.error)),
                // Dropping `tx` rolls it back.
                Err(_) => return Ok(None),
            }
        }
        tx.commit()?;
        Ok(Some(results))
    }

    fn try_savepoints(
        &mut self,
        writes: &[Encoded],
    ) -> Result<Vec<Result<Done, StoreError>>, StoreError> {
        let mut tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut results = Vec::with_capacity(writes.len());
        for write in writes {
            let mut sp = tx.savepoint()?;
            let result = apply(&sp, write).map_err(|f| f.error);
            if result.is_err() {
                sp.rollback()?;
            }
            sp.commit()?;
            results.push(result);
        }
        tx.commit()?;
        Ok(results)
    }

    fn write_alone(&mut self, write: &Encoded) -> Result<Done, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let done = apply(&tx, write).map_err(|f| f.error)?;
        tx.commit()?;
        Ok(done)
    }
}

fn apply(conn: &rusqlite::Connection, write: &Encoded) -> Result<Done, Failed> {
    match write {
        Encoded::Create(rows) => create(conn, rows),
        Encoded::Commit(rows) => {
            commit(conn, rows)?;
            Ok(Done::Committed)
        }
        Encoded::DeleteOutbox(ids) => {
            let mut stmt = conn
                .prepare_cached("DELETE FROM outbox WHERE id = ?1")
                .map_err(Failed::clean)?;
            for (i, id) in ids.iter().enumerate() {
                stmt.execute(params![id]).map_err(|e| Failed {
                    error: e.into(),
                    clean: i == 0,
                })?;
            }
            Ok(Done::Committed)
        }
        Encoded::Enqueue(messages) => {
            insert_outbox(conn, messages)?;
            Ok(Done::Committed)
        }
        Encoded::Decision(o) => {
            // One statement: a failure leaves nothing written.
            insert_decision(conn, o).map_err(Failed::clean)?;
            Ok(Done::Committed)
        }
    }
}

/// Record a decision outcome; the first one recorded for a decision id stands.
fn insert_decision(conn: &rusqlite::Connection, o: &DecisionOutcome) -> rusqlite::Result<()> {
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
    Ok(())
}

/// `Store::create_instance`'s statements.
fn create(conn: &rusqlite::Connection, new: &CreateRows) -> Result<Done, Failed> {
    if new.at_head {
        let head: Option<(i64, i64)> = conn
            .prepare_cached(
                "SELECT latest_version, active FROM workflow_template_heads \
                 WHERE partner_id = ?1 AND id = ?2",
            )
            .and_then(|mut stmt| {
                stmt.query_row(params![new.partner_id, new.template_id], |row| {
                    Ok((row.get(0)?, row.get(1)?))
                })
                .optional()
            })
            .map_err(Failed::clean)?;
        if head != Some((new.template_version, 1)) {
            return Err(Failed::clean(StoreError::TemplateChanged {
                id: new.template_id.clone(),
            }));
        }
    }
    let inserted = conn
        .prepare_cached(
            "INSERT INTO workflow_instances (id, partner_id, template_id, template_version, status, \
             current_step, idempotency_key, created_by, trigger_data, state, created_at, updated_at, version, mode) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14) \
             ON CONFLICT (partner_id, idempotency_key) DO NOTHING",
        )
        .and_then(|mut stmt| {
            stmt.execute(params![
                new.id,
                new.partner_id,
                new.template_id,
                new.template_version,
                new.status,
                new.current_step,
                new.idempotency_key,
                new.created_by,
                new.trigger,
                new.state,
                new.created_at,
                new.updated_at,
                new.version,
                new.mode,
            ])
        });
    // Up to here nothing was written: a failed statement is undone by SQLite itself.
    let inserted = match inserted {
        Ok(rows) => rows > 0,
        // The key is handled by ON CONFLICT: a violation is on the id, unless the key's row
        // came from elsewhere in between; the lookup below tells which.
        Err(e) if is_unique_violation(&e) && new.idempotency_key.is_some() => false,
        Err(e) if is_unique_violation(&e) => {
            return Err(Failed::clean(StoreError::AlreadyExists {
                what: "instance",
                id: new.id.clone(),
            }))
        }
        Err(e) => return Err(Failed::clean(e)),
    };
    if !inserted {
        let key = new.idempotency_key.as_deref().unwrap_or_default();
        return match instance_by_key(conn, &new.partner_id, key).map_err(Failed::clean)? {
            Some(existing) => Ok(Done::Existing(Box::new(existing))),
            None => Err(Failed::clean(StoreError::AlreadyExists {
                what: "instance",
                id: new.id.clone(),
            })),
        };
    }
    let more = || -> Result<(), Failed> {
        upsert_steps(conn, &new.id, &new.partner_id, &new.steps)?;
        insert_outbox(conn, &new.outbox)?;
        insert_timers(conn, &new.timers)?;
        insert_deliveries(conn, &new.deliveries)?;
        append_audits(conn, &new.partner_id, &new.audit)?;
        Ok(())
    };
    more().map_err(Failed::after_writing)?;
    Ok(Done::Created)
}

/// `write_instance_commit`'s statements (see there for why the UPDATE comes first). The
/// UPDATE names the partner, so it never touches another partner's row, and says nothing back:
/// on SQLite a `RETURNING` clause collects its rows in a temporary b-tree, opened and closed
/// (with its page cache) by every commit.
fn commit(conn: &rusqlite::Connection, c: &CommitRows) -> Result<(), Failed> {
    let updated = conn
        .prepare_cached(
            "UPDATE workflow_instances SET status = ?1, current_step = ?2, state = ?3, \
             updated_at = ?4, version = ?5 WHERE id = ?6 AND version = ?7 AND partner_id = ?8",
        )
        .and_then(|mut stmt| {
            stmt.execute(params![
                c.status,
                c.current_step,
                c.state,
                c.updated_at,
                c.expected_version + 1,
                c.id,
                c.expected_version,
                c.partner_id,
            ])
        })
        .map_err(Failed::clean)?;
    if updated == 0 {
        // The version check lost, or the partner has no such instance: nothing was written.
        let owner: Option<String> = conn
            .prepare_cached("SELECT partner_id FROM workflow_instances WHERE id = ?1")
            .and_then(|mut stmt| stmt.query_row(params![c.id], |row| row.get(0)).optional())
            .map_err(Failed::clean)?;
        return Err(Failed::clean(match owner {
            Some(owner) if owner == c.partner_id => StoreError::Conflict {
                what: "instance",
                id: c.id.clone(),
            },
            _ => not_found(&c.id),
        }));
    }
    let more = || -> Result<(), Failed> {
        upsert_steps(conn, &c.id, &c.partner_id, &c.steps)?;
        insert_outbox(conn, &c.outbox)?;
        insert_timers(conn, &c.timers)?;
        insert_deliveries(conn, &c.deliveries)?;
        append_audits(conn, &c.partner_id, &c.audit)?;
        if let Some(decision) = &c.decision {
            insert_decision(conn, decision).map_err(Failed::dirty)?;
        }
        Ok(())
    };
    more().map_err(Failed::after_writing)
}

/// Mirror the instance's steps into `workflow_step_executions`. A row whose values did not
/// change is left alone (no page dirtied for it).
fn upsert_steps(
    conn: &rusqlite::Connection,
    instance_id: &str,
    partner_id: &str,
    steps: &[StepRow],
) -> Result<(), Failed> {
    // SQLite numbers `$1`...`$12` by first appearance, so they bind positionally.
    static SQL: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| crate::queries::step_upsert_sql(1));
    let mut stmt = conn.prepare_cached(&SQL).map_err(Failed::clean)?;
    for (i, step) in steps.iter().enumerate() {
        stmt.execute(params![
            instance_id,
            step.index,
            partner_id,
            step.name,
            step.step_type,
            step.status,
            step.started_at,
            step.finished_at,
            step.actor,
            step.input,
            step.output,
            step.error,
        ])
        .map_err(|e| Failed {
            error: e.into(),
            clean: i == 0,
        })?;
    }
    Ok(())
}

fn insert_outbox(conn: &rusqlite::Connection, messages: &[OutboxMessage]) -> Result<(), Failed> {
    let mut stmt = conn
        .prepare_cached("INSERT INTO outbox (id, topic, msg_key, payload) VALUES (?1, ?2, ?3, ?4)")
        .map_err(Failed::clean)?;
    for (i, m) in messages.iter().enumerate() {
        stmt.execute(params![m.id, m.topic, m.key, m.payload])
            .map_err(|e| Failed {
                error: on_unique(e, || StoreError::AlreadyExists {
                    what: "outbox message",
                    id: m.id.clone(),
                }),
                clean: i == 0,
            })?;
    }
    Ok(())
}

fn insert_timers(conn: &rusqlite::Connection, timers: &[TimerRecord]) -> Result<(), Failed> {
    let mut stmt = conn
        .prepare_cached(
            "INSERT INTO timers (id, partner_id, instance_id, step_index, step_type, kind, due_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (id) DO NOTHING",
        )
        .map_err(Failed::clean)?;
    for (i, t) in timers.iter().enumerate() {
        stmt.execute(params![
            t.id,
            t.partner_id,
            t.instance_id,
            t.step_index,
            t.step_type,
            t.kind,
            t.due_at.0
        ])
        .map_err(|e| Failed {
            error: e.into(),
            clean: i == 0,
        })?;
    }
    Ok(())
}

fn insert_deliveries(
    conn: &rusqlite::Connection,
    deliveries: &[DeliveryRow],
) -> Result<(), Failed> {
    let mut stmt = conn
        .prepare_cached(
            "INSERT INTO notification_deliveries (id, partner_id, instance_id, step_index, purpose, \
             channel, target, request, wait, status, attempts, round_failures, next_check_at, \
             created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'queued', 0, 0, ?10, ?11, ?11) \
             ON CONFLICT (id) DO NOTHING",
        )
        .map_err(Failed::clean)?;
    for (i, d) in deliveries.iter().enumerate() {
        stmt.execute(params![
            d.id,
            d.partner_id,
            d.instance_id,
            d.step_index,
            d.purpose,
            d.channel,
            d.target,
            d.request,
            i64::from(d.wait),
            d.check_at,
            d.created_at,
        ])
        .map_err(|e| Failed {
            error: e.into(),
            clean: i == 0,
        })?;
    }
    Ok(())
}

/// Chain `rows` onto their streams (each stream's head read once) and insert them as blocks
/// (`audit_blocks.rs`): one INSERT per stream's consecutive events.
fn append_audits(
    conn: &rusqlite::Connection,
    partner_id: &str,
    rows: &[AuditRow],
) -> Result<(), Failed> {
    let mut heads: HashMap<&str, (i64, String)> = HashMap::new();
    let mut chained = Vec::with_capacity(rows.len());
    for row in rows {
        let (prev_seq, prev_hash) = match heads.remove(row.stream.as_str()) {
            Some(head) => head,
            None => stream_head(conn, partner_id, &row.stream).map_err(Failed::clean)?,
        };
        let seq = prev_seq + 1;
        let hash = row.chain_hash(&prev_hash, seq);
        heads.insert(row.stream.as_str(), (seq, hash.clone()));
        chained.push((seq, prev_hash, hash));
    }
    let blocks = audit_blocks::blocks(rows.iter().zip(&chained).map(
        |(row, (seq, prev_hash, hash))| {
            (
                row.stream.as_str(),
                audit_blocks::BlockEvent {
                    seq: *seq,
                    at: row.at,
                    actor: &row.actor,
                    kind: &row.kind,
                    before: &row.before,
                    after: &row.after,
                    reason: row.reason.as_deref(),
                    prev_hash,
                    hash,
                },
            )
        },
    ));
    let mut insert = conn
        .prepare_cached(
            "INSERT INTO audit_blocks (stream, first_seq, last_seq, partner_id, last_hash, \
             events) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .map_err(Failed::clean)?;
    for (i, (stream, block)) in blocks.iter().enumerate() {
        insert
            .execute(params![
                stream,
                block.first_seq,
                block.last_seq,
                partner_id,
                block.last_hash,
                block.events,
            ])
            .map_err(|e| Failed {
                error: on_unique(e, || StoreError::Conflict {
                    what: "audit stream",
                    id: stream.to_string(),
                }),
                clean: i == 0,
            })?;
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
            "SELECT last_seq, last_hash FROM audit_blocks WHERE partner_id = ?1 AND stream = ?2 \
             ORDER BY first_seq DESC LIMIT 1",
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

#[cfg(test)]
mod tests {
    use serde_json::json;
    use workflow_core::instance::{ActorRef, ActorType};
    use workflow_core::{InstanceStatus, Timestamp};

    use super::*;

    fn draft(
        before: serde_json::Value,
        after: serde_json::Value,
        reason: Option<&str>,
    ) -> AuditDraft {
        AuditDraft {
            stream: "instance:0190-\"ü\"".to_string(),
            at: Timestamp(1_764_000_000_123),
            actor: ActorRef {
                id: "usr_\\a\nb".to_string(),
                actor_type: ActorType::Agent,
            },
            kind: "step.completed".to_string(),
            before,
            after,
            reason: reason.map(str::to_string),
        }
    }

    /// A commit remembers its instance's step mirror for the next one, unless it finishes
    /// the instance (no next one).
    #[test]
    fn a_commit_remembers_the_mirror_of_a_running_instance_only() {
        let known = KnownSteps::default();
        let mut rec = crate::fixtures::instance();
        rec.state.steps = vec![serde_json::from_value(json!({
            "index": 0, "name": "ok", "type": "approval", "status": "waiting",
            "input": {"amount": 5}
        }))
        .expect("a step")];
        let pending = |status: InstanceStatus| {
            let mut rec = rec.clone();
            rec.state.status = status;
            let commit = InstanceCommit::state_only(rec, 1);
            match Encoded::of(Write::Commit(Box::new(commit)), &known) {
                Ok((
                    _,
                    Pending::Committed {
                        mirror, version, ..
                    },
                )) => (mirror, version),
                Ok((_, other)) => panic!("not a commit: {other:?}"),
                Err(e) => panic!("cannot encode: {e}"),
            }
        };
        for going_on in [InstanceStatus::Running, InstanceStatus::Waiting] {
            let (mirror, version) = pending(going_on);
            assert_eq!(version, 2);
            assert_eq!(mirror.map(|m| m.len()), Some(1), "{going_on:?}");
        }
        for finished in [
            InstanceStatus::Completed,
            InstanceStatus::Rejected,
            InstanceStatus::Failed,
            InstanceStatus::Cancelled,
        ] {
            assert!(pending(finished).0.is_none(), "{finished:?}");
        }
    }

    /// The writer's connection keeps the smaller page cache and never checkpoints by itself;
    /// the store's other settings hold for it as for every connection.
    #[test]
    fn the_writer_keeps_a_small_page_cache() -> Result<(), Box<dyn std::error::Error>> {
        let dir = workflow_testkit::temp_dir()?;
        let writer = SqliteWriter::open(&dir.path().join("w.db"))?;
        let pragma = |name: &str| -> Result<i64, rusqlite::Error> {
            writer
                .conn
                .query_row(&format!("PRAGMA {name}"), [], |row| row.get(0))
        };
        assert_eq!(pragma("cache_size")?, -2048);
        assert_eq!(pragma("wal_autocheckpoint")?, 0);
        // NORMAL
        assert_eq!(pragma("synchronous")?, 1);
        assert_eq!(pragma("foreign_keys")?, 1);
        Ok(())
    }

    /// The prepared canonical JSON hashes exactly as `workflow_core::audit::chain_hash`.
    #[test]
    fn prepared_hash_is_the_chain_hash() {
        let drafts = [
            draft(json!(null), json!({}), None),
            draft(
                json!({"z": 1, "a": [true, null, 1.5, -2, {"y": "x", "b": "é\u{1F600}\t"}]}),
                json!({"status": "running", "steps": [{"index": 0, "output": {"ok": 1e300}}]}),
                Some("because \"quoted\""),
            ),
            draft(json!("text"), json!([[], {}]), Some("")),
        ];
        for (i, d) in drafts.iter().enumerate() {
            let row = audit_row("prt_1", d).expect("encodes");
            assert!(matches!(row.hash, HashInput::Prepared { .. }));
            for (seq, prev) in [(1, GENESIS), (42, "ab12"), (i64::MAX, "")] {
                assert_eq!(
                    row.chain_hash(prev, seq),
                    chain_hash(prev, &audit_content("prt_1", d, seq)),
                    "draft {i}, seq {seq}"
                );
            }
        }
    }
}
