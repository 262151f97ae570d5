//! Group commit: instance commits that arrive while a write transaction is running share the
//! next one.
//!
//! SQLite has one writer, and a transaction holds it for every statement plus `BEGIN` and
//! `COMMIT`. On a SQLite file, [`Committer`] owns the writing of instance creates and commits:
//! a thread of its own (so the transaction holding the lock is never queued behind HTTP
//! handlers on the shared runtime) takes every write queued so far and runs them in ONE
//! transaction, in arrival order, through `sqlite_writer.rs` (statements on this thread, no
//! hop to a driver thread each). What can be done without the lock is done before a write is
//! queued, on the caller's thread: its documents are serialised there (`Encoded`).
//!
//! Each write stays all or nothing and is checked against its own expected version: one that
//! fails (version conflict, unknown instance, a duplicate outbox id) is undone alone and
//! answered with its error while the others go on, so every write gets exactly the answer it
//! would have had alone. A write is answered only after the transaction holding it committed.
//!
//! WAL checkpoints (copying committed pages from the WAL into the database file, with an
//! fsync each) run on a second thread with its own connection: a passive checkpoint does not
//! take the write lock, and done by the committer at the end of a commit (SQLite's automatic
//! checkpoint) it took about a sixth of the committer's time, with every queued write waiting.
//! The WAL can only start over once a checkpoint has copied all of it, which a pass racing
//! the committer rarely does. So when the WAL is long, the checkpointer catches up with passes
//! that each leave a shorter tail, then copies the last few frames while the committer waits
//! (`Wal::appending`): about 1 ms, where the committer's own checkpoint of everything appended
//! since the last pass had stalled every queued write for 2–8 ms (docs/benchmarks.md, round 22).
//!
//! PostgreSQL (and `:memory:`) write with sqlx: [`commit_group`] does the same in one
//! transaction there, with a fallback to one transaction per commit after a partial failure.

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, MutexGuard};
use sqlx::AnyPool;
use tokio::sync::{mpsc, oneshot};

use crate::notifications::NewDelivery;
use crate::queries::write_instance_commit;
use crate::records::{AuditDraft, DecisionOutcome, InstanceRecord, OutboxMessage, TimerRecord};
use crate::sqlite_writer::{Done, Encoded, NewInstance, Pending, SqliteWriter, Write, Written};
use crate::step_mirror::{step_mirror, worth_remembering, KnownSteps};
use crate::{begin_on, Backend, CreateOutcome, Store, StoreError};

/// Most writes in one transaction.
const MAX_GROUP: usize = 256;

/// How often the checkpointer looks for new commits to checkpoint. Every 10 ms cut the step
/// latency's tail a little more at 1,000 instances/s in a quiet hour, but its passes copied
/// the same hot pages ten times as often: +0.04 CPU s per 1,000 instances, and fewer
/// instances/s at saturation (docs/benchmarks.md, round 22).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// WAL frames (pages) past which the checkpointer makes the WAL start over (16 MiB of 4 KiB
/// pages; SQLite's automatic checkpoint starts at 1,000).
const WAL_FRAMES_MAX: i64 = 4_000;

/// Most passes, without the committer waiting, to shorten the tail before the last one.
const CATCH_UP_PASSES: usize = 4;

/// A tail (frames appended during the previous pass) short enough to copy while the
/// committer waits.
const SHORT_TAIL: i64 = 64;

/// Most syncs of the database file before the last pass.
const SYNC_ROUNDS: usize = 3;

/// Frames copied since the last sync few enough (about 1 MiB) for the last pass to sync
/// their pages while the committer waits.
const SHORT_SYNC: i64 = 256;

/// One instance commit: what [`Store::commit_instance_with_deliveries`] takes, owned.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceCommit {
    /// The new state; written with `version = expected_version + 1`.
    pub rec: InstanceRecord,
    pub expected_version: i64,
    pub outbox: Vec<OutboxMessage>,
    pub audit: Vec<AuditDraft>,
    pub timers: Vec<TimerRecord>,
    pub deliveries: Vec<NewDelivery>,
    /// The outcome of the approval decision this transition applied, recorded with it.
    pub decision: Option<DecisionOutcome>,
}

/// One instance commit's parts, borrowed from the caller: what [`InstanceCommit`] owns. The
/// committer encodes straight from them, so nothing of the state is copied on its way.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CommitParts<'a> {
    pub(crate) rec: &'a InstanceRecord,
    pub(crate) expected_version: i64,
    pub(crate) outbox: &'a [OutboxMessage],
    pub(crate) audit: &'a [AuditDraft],
    pub(crate) timers: &'a [TimerRecord],
    pub(crate) deliveries: &'a [NewDelivery],
    pub(crate) decision: Option<&'a DecisionOutcome>,
}

#[cfg(test)]
impl InstanceCommit {
    /// A commit of `rec`'s state alone: no messages, events, timers, deliveries or decision.
    pub(crate) fn state_only(rec: InstanceRecord, expected_version: i64) -> InstanceCommit {
        InstanceCommit {
            rec,
            expected_version,
            outbox: vec![],
            audit: vec![],
            timers: vec![],
            deliveries: vec![],
            decision: None,
        }
    }
}

impl CommitParts<'_> {
    /// The owned commit, for the PostgreSQL group commit, which queues it for its task.
    pub(crate) fn owned(self) -> InstanceCommit {
        InstanceCommit {
            rec: self.rec.clone(),
            expected_version: self.expected_version,
            outbox: self.outbox.to_vec(),
            audit: self.audit.to_vec(),
            timers: self.timers.to_vec(),
            deliveries: self.deliveries.to_vec(),
            decision: self.decision.cloned(),
        }
    }
}

impl InstanceCommit {
    /// This commit's parts, borrowed.
    pub(crate) fn parts(&self) -> CommitParts<'_> {
        CommitParts {
            rec: &self.rec,
            expected_version: self.expected_version,
            outbox: &self.outbox,
            audit: &self.audit,
            timers: &self.timers,
            deliveries: &self.deliveries,
            decision: self.decision.as_ref(),
        }
    }
}

/// Writes that must share one transaction, and where their answers go.
struct Job {
    writes: Vec<Encoded>,
    reply: oneshot::Sender<Vec<Result<Done, StoreError>>>,
}

/// What the committer and the checkpointer share.
#[derive(Debug, Default)]
struct Wal {
    /// Groups committed so far.
    commits: AtomicU64,
    /// Held by the committer while it writes a group, and by the checkpointer for the last
    /// pass before the WAL starts over, so that pass copies every frame.
    appending: Mutex<()>,
}

/// The queue of the group-commit thread. Cheap to clone; the thread ends when every clone is
/// dropped (and the checkpointer with it).
#[derive(Debug, Clone)]
pub(crate) struct Committer {
    jobs: mpsc::UnboundedSender<Job>,
    /// Each instance's step mirror as this committer last wrote it, so a commit writes only
    /// the step rows that changed (an upsert of an unchanged row still cost a b-tree seek and
    /// the comparison, and encoding it).
    known: Arc<KnownSteps>,
}

impl Committer {
    /// Start the thread writing the SQLite file at `path`, and its checkpointer. `writer` is
    /// the store's one sqlx write connection: the thread holds it while a group is written,
    /// so the store's other writes (templates, timers...) queue behind the group instead of
    /// meeting its lock in SQLite's sleeping busy handler, and the other way round.
    pub(crate) fn start(writer: AnyPool, path: &Path) -> Result<Committer, StoreError> {
        let sqlite = SqliteWriter::open(path)?;
        let checkpointer = SqliteWriter::open(path)?;
        // The checkpointer flushes the database file itself before a last pass (see
        // `checkpoint`); opened for writing because some systems refuse to sync a read-only
        // handle.
        let file = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| StoreError::Database(sqlx::Error::Io(e)))?;
        let (jobs, queue) = mpsc::unbounded_channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Database(sqlx::Error::Io(e)))?;
        let wal = Arc::new(Wal::default());
        let shared = wal.clone();
        // Dropped when the committer ends, which ends the checkpointer.
        let (alive, committer_ended) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("store-checkpoint".to_string())
            .spawn(move || checkpoints(checkpointer, &file, &shared, &committer_ended))
            .map_err(|e| StoreError::Database(sqlx::Error::Io(e)))?;
        std::thread::Builder::new()
            .name("store-committer".to_string())
            .spawn(move || runtime.block_on(run(writer, sqlite, queue, &wal, alive)))
            .map_err(|e| StoreError::Database(sqlx::Error::Io(e)))?;
        Ok(Committer {
            jobs,
            known: Arc::default(),
        })
    }

    /// Queue one write and wait until its transaction committed (or it failed).
    pub(crate) async fn submit(&self, write: Write) -> Result<Written, StoreError> {
        self.submit_all(vec![write])
            .await
            .pop()
            .unwrap_or_else(|| Err(closed()))
    }

    /// Queue writes that must share a transaction; one answer per write, in order. Each is
    /// encoded here, on the caller's thread; one that cannot be is answered at once.
    pub(crate) async fn submit_all(&self, writes: Vec<Write>) -> Vec<Result<Written, StoreError>> {
        let mut answers: Vec<Option<Result<Written, StoreError>>> = Vec::new();
        let mut pending = Vec::new();
        let mut encoded = Vec::with_capacity(writes.len());
        for write in writes {
            match Encoded::of(write, &self.known) {
                Ok((e, p)) => {
                    answers.push(None);
                    pending.push(p);
                    encoded.push(e);
                }
                Err(e) => answers.push(Some(Err(e))),
            }
        }
        let mut done = self.send(encoded).await.into_iter().zip(pending);
        answers
            .into_iter()
            .map(|answer| match answer {
                Some(failed) => failed,
                None => match done.next() {
                    Some((result, p)) => self.answered(result, p),
                    None => Err(closed()),
                },
            })
            .collect()
    }

    /// Commit one instance transition (see [`Store::commit_transition`]), encoded from the
    /// caller's borrowed parts.
    pub(crate) async fn commit(&self, parts: CommitParts<'_>) -> Result<(), StoreError> {
        let id = parts.rec.info.id.as_str();
        let version = parts.expected_version;
        let stored = self.known.at(id, version);
        let rec = parts.rec;
        let (write, mirror) = Encoded::commit(parts, stored.as_ref())?;
        let pending = Pending::Committed {
            id: id.to_string(),
            version: version + 1,
            mirror: worth_remembering(rec).then_some(mirror),
        };
        match self.send(vec![write]).await.pop() {
            Some(result) => self.answered(result, pending).map(|_| ()),
            None => Err(closed()),
        }
    }

    /// Create one instance (see [`Store::create_owned`]); its record, moved in, is the answer.
    pub(crate) async fn create(&self, new: NewInstance) -> Result<Written, StoreError> {
        let write = Encoded::create_from(new.parts())?;
        // Encoded: the rest of it is not needed, the record is the answer.
        let pending = Pending::Created(Box::new(new.rec));
        match self.send(vec![write]).await.pop() {
            Some(result) => self.answered(result, pending),
            None => Err(closed()),
        }
    }

    /// The answer to a write, and what is then known of its instance's step rows.
    fn answered(
        &self,
        result: Result<Done, StoreError>,
        pending: Pending,
    ) -> Result<Written, StoreError> {
        match (result, pending) {
            (
                Ok(Done::Committed),
                Pending::Committed {
                    id,
                    version,
                    mirror,
                },
            ) => {
                match mirror {
                    Some(mirror) => self.known.remember(&id, version, mirror),
                    None => self.known.forget(&id),
                }
                Ok(Written::Committed)
            }
            (Ok(Done::Committed), _) => Ok(Written::Committed),
            (Ok(Done::Created), Pending::Created(rec)) => {
                if worth_remembering(&rec) {
                    self.known
                        .remember(&rec.info.id, rec.version, step_mirror(&rec, None));
                }
                Ok(Written::Created(Box::new(CreateOutcome::Created(*rec))))
            }
            (Ok(Done::Created), _) => Err(StoreError::corrupt(
                "the committer answered a commit as a create",
            )),
            (Ok(Done::Existing(existing)), _) => Ok(Written::Created(Box::new(
                CreateOutcome::Existing(*existing),
            ))),
            (Err(e), Pending::Committed { id, .. }) => {
                self.known.forget(&id);
                Err(e)
            }
            (Err(e), _) => Err(e),
        }
    }

    async fn send(&self, writes: Vec<Encoded>) -> Vec<Result<Done, StoreError>> {
        let count = writes.len();
        if count == 0 {
            return Vec::new();
        }
        let (reply, answer) = oneshot::channel();
        if self.jobs.send(Job { writes, reply }).is_err() {
            return (0..count).map(|_| Err(closed())).collect();
        }
        answer
            .await
            .unwrap_or_else(|_| (0..count).map(|_| Err(closed())).collect())
    }
}

fn closed() -> StoreError {
    StoreError::Database(sqlx::Error::PoolClosed)
}

async fn run(
    writer: AnyPool,
    mut sqlite: SqliteWriter,
    mut queue: mpsc::UnboundedReceiver<Job>,
    wal: &Wal,
    _alive: Sender<()>,
) {
    while let Some(first) = queue.recv().await {
        let mut jobs = vec![first];
        let mut size = jobs[0].writes.len();
        while size < MAX_GROUP {
            match queue.try_recv() {
                Ok(job) => {
                    size += job.writes.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        let mut writes = Vec::with_capacity(size);
        let mut replies = Vec::with_capacity(jobs.len());
        for job in jobs {
            replies.push((job.reply, job.writes.len()));
            writes.extend(job.writes);
        }
        let results = match writer.acquire().await {
            Ok(_lock) => {
                let appending = wal.appending.lock();
                let results = sqlite.write_group(&writes);
                // Straight to a waiting checkpointer: back at once with the next group, the
                // committer would otherwise take the lock again first, and again.
                MutexGuard::unlock_fair(appending);
                wal.commits.fetch_add(1, Ordering::Relaxed);
                results
            }
            Err(e) => {
                let retryable = matches!(e, sqlx::Error::PoolTimedOut);
                writes
                    .iter()
                    .map(|_| {
                        Err(if retryable {
                            StoreError::Database(sqlx::Error::PoolTimedOut)
                        } else {
                            closed()
                        })
                    })
                    .collect()
            }
        };
        let mut results = results.into_iter();
        for (reply, count) in replies {
            // The caller may have gone away (its request was dropped): nothing to tell.
            let _ = reply.send(results.by_ref().take(count).collect());
        }
    }
}

/// The checkpointer: a passive checkpoint whenever groups were committed since the last one,
/// at most every [`CHECKPOINT_EVERY`]; ends with the committer.
fn checkpoints(conn: SqliteWriter, file: &File, wal: &Wal, committer_ended: &Receiver<()>) {
    let mut seen = 0;
    loop {
        match committer_ended.recv_timeout(CHECKPOINT_EVERY) {
            Err(RecvTimeoutError::Timeout) => {}
            // Nothing is ever sent: the committer is gone.
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        let commits = wal.commits.load(Ordering::Relaxed);
        if commits == seen {
            continue;
        }
        seen = commits;
        // Busy (another connection is checkpointing) or failing: the next round retries.
        if let Err(e) = checkpoint(&conn, file, wal) {
            tracing::debug!(error = %e, "WAL checkpoint failed");
        }
    }
}

/// One passive checkpoint; when the WAL is longer than [`WAL_FRAMES_MAX`], the steps that let
/// it start over while the committer waits for as little as possible:
/// 1. passes until the tail (frames appended during the previous pass) is short;
/// 2. the database file synced here: the pass that copies everything syncs it, and would
///    otherwise flush every page the passes since the last sync wrote, with the committer
///    waiting. Steps 1 and 2 again while the passes after a sync had much to copy (the frames
///    appended during a long sync), at most [`SYNC_ROUNDS`] times;
/// 3. the last pass while the committer waits: its copy and its two syncs are small. The
///    committer's next transaction then starts the WAL over (unless a reader still reads from
///    it: then a later round does).
fn checkpoint(conn: &SqliteWriter, file: &File, wal: &Wal) -> Result<(), StoreError> {
    let (mut log, _) = conn.checkpoint()?;
    if log <= WAL_FRAMES_MAX {
        return Ok(());
    }
    let mut synced = 0;
    for _ in 0..SYNC_ROUNDS {
        let Some(now) = catch_up(conn, log)? else {
            return Ok(());
        };
        file.sync_data()
            .map_err(|e| StoreError::Database(sqlx::Error::Io(e)))?;
        // The frames appended since the previous sync: about what this one flushed.
        let flushed = now - synced;
        (log, synced) = (now, now);
        if flushed <= SHORT_SYNC {
            break;
        }
    }
    let _appending = wal.appending.lock();
    conn.checkpoint()?;
    Ok(())
}

/// Passes, at most [`CATCH_UP_PASSES`], until one leaves a tail of at most [`SHORT_TAIL`]
/// frames after the WAL's length `log` at the previous one; the WAL's length then, or `None`
/// if the committer started it over meanwhile.
fn catch_up(conn: &SqliteWriter, mut log: i64) -> Result<Option<i64>, StoreError> {
    for _ in 0..CATCH_UP_PASSES {
        let (now, _) = conn.checkpoint()?;
        if now <= WAL_FRAMES_MAX {
            return Ok(None);
        }
        let tail = now - log;
        log = now;
        if tail <= SHORT_TAIL {
            break;
        }
    }
    Ok(Some(log))
}

/// Write `commits` in one transaction, in order; one result per commit (see the module docs).
pub(crate) async fn commit_group(
    writer: &AnyPool,
    backend: Backend,
    commits: &[InstanceCommit],
) -> Vec<Result<(), StoreError>> {
    let mut refused: Vec<Option<StoreError>> = commits.iter().map(|_| None).collect();
    let Ok(mut tx) = begin_on(writer, backend).await else {
        return commit_each(writer, backend, commits).await;
    };
    for (i, c) in commits.iter().enumerate() {
        match write(&mut tx, c).await {
            Ok(()) => {}
            Err(failure) if failure.clean => refused[i] = Some(failure.error),
            Err(_) => {
                // Partly written: undo the group, then give each commit its own answer.
                let _ = tx.rollback().await;
                return commit_each(writer, backend, commits).await;
            }
        }
    }
    if tx.commit().await.is_err() {
        return commit_each(writer, backend, commits).await;
    }
    refused
        .into_iter()
        .map(|r| match r {
            Some(e) => Err(e),
            None => Ok(()),
        })
        .collect()
}

/// The fallback: every commit in a transaction of its own.
pub(crate) async fn commit_each(
    writer: &AnyPool,
    backend: Backend,
    commits: &[InstanceCommit],
) -> Vec<Result<(), StoreError>> {
    let mut results = Vec::with_capacity(commits.len());
    for c in commits {
        results.push(commit_one(writer, backend, c).await);
    }
    results
}

async fn commit_one(
    writer: &AnyPool,
    backend: Backend,
    c: &InstanceCommit,
) -> Result<(), StoreError> {
    let mut tx = begin_on(writer, backend).await?;
    write(&mut tx, c).await.map_err(|f| f.error)?;
    tx.commit().await?;
    Ok(())
}

async fn write(
    conn: &mut sqlx::AnyConnection,
    c: &InstanceCommit,
) -> Result<(), crate::queries::CommitFailure> {
    write_instance_commit(conn, c.parts()).await
}

impl Store {
    /// Write several instance commits in ONE transaction, in order, and answer each as
    /// [`Store::commit_instance_with_deliveries`] would have alone: a commit that loses its
    /// optimistic-concurrency check (also against an earlier commit of the same group) gets
    /// `Conflict` and writes nothing, the others commit. Both backends.
    pub async fn commit_instances(
        &self,
        commits: &[InstanceCommit],
    ) -> Vec<Result<(), StoreError>> {
        match &self.committer {
            Some(committer) => {
                let writes = commits
                    .iter()
                    .map(|c| Write::Commit(Box::new(c.clone())))
                    .collect();
                committer
                    .submit_all(writes)
                    .await
                    .into_iter()
                    .map(|r| r.map(|_| ()))
                    .collect()
            }
            None => match &self.pg_committer {
                Some(committer) => committer.submit(commits.to_vec()).await,
                None => commit_group(self.write_pool(), self.backend(), commits).await,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::atomic::AtomicBool;

    use super::*;

    /// A writer that appends without ever pausing (as the committer does at saturation) still
    /// sees the WAL start over, again and again: a pass racing it never copies everything, the
    /// last pass under `Wal::appending` does.
    #[test]
    fn the_wal_starts_over_under_a_writer_that_never_pauses() {
        const ROWS: i64 = 256;
        let dir = workflow_testkit::temp_dir().unwrap();
        let path = dir.path().join("engine.db");
        let writer = rusqlite::Connection::open(&path).unwrap();
        writer
            .execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;
                 PRAGMA wal_autocheckpoint = 0; CREATE TABLE t (x BLOB);",
            )
            .unwrap();
        for _ in 0..ROWS {
            writer
                .execute("INSERT INTO t VALUES (randomblob(3000))", [])
                .unwrap();
        }
        let checkpointer = SqliteWriter::open(&path).unwrap();
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        let wal = Arc::new(Wal::default());
        let stop = Arc::new(AtomicBool::new(false));

        // Like the committer's, its transactions rewrite the same pages again and again (a
        // row of ~3 KB fills a page): many frames, few pages for a pass to copy.
        let appender = {
            let (wal, stop) = (wal.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut transactions = 0_i64;
                while !stop.load(Ordering::Relaxed) && transactions < 100 * WAL_FRAMES_MAX {
                    let appending = wal.appending.lock();
                    writer
                        .execute(
                            "UPDATE t SET x = randomblob(3000) WHERE rowid = ?1",
                            [transactions % ROWS + 1],
                        )
                        .unwrap();
                    MutexGuard::unlock_fair(appending);
                    transactions += 1;
                }
                transactions
            })
        };

        // Rounds as the checkpointer thread runs them, back to back; the WAL's length (the
        // next pass's `log`) drops when the writer has started it over.
        let mut restarts = 0;
        let mut longest = 0;
        let (mut last, _) = checkpointer.checkpoint().unwrap();
        while restarts < 3 && !appender.is_finished() {
            checkpoint(&checkpointer, &file, &wal).unwrap();
            let (log, _) = checkpointer.checkpoint().unwrap();
            longest = longest.max(log);
            if log < last {
                restarts += 1;
            }
            last = log;
        }
        stop.store(true, Ordering::Relaxed);
        let transactions = appender.join().unwrap();
        assert_eq!(
            restarts, 3,
            "{transactions} transactions, {restarts} restarts"
        );
        // Bounded: without the restarts it would grow all run long (up to 100 times the
        // limit). The margin is for this thread being preempted while the appender runs on
        // (2 shared cores and the other tests: 2 times the limit was once exceeded).
        assert!(
            longest < 4 * WAL_FRAMES_MAX,
            "the WAL reached {longest} frames"
        );
    }
}
