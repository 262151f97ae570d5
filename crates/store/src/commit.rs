//! Group commit: instance commits that arrive while a write transaction is running share the
//! next one.
//!
//! SQLite has one writer, and a transaction holds it for every statement's round trip to
//! sqlx's connection thread, plus `BEGIN` and `COMMIT`. On a SQLite file, [`Committer`] owns
//! the writing of instance commits: a thread of its own (so the transaction holding the lock is
//! never queued behind HTTP handlers on the shared runtime) takes every commit queued so far
//! and writes them in ONE transaction, in arrival order.
//!
//! Each commit stays all or nothing and is checked against its own expected version: a commit
//! refused before it wrote anything (version conflict, unknown instance) is answered with its
//! error and the others go on; a failure after a commit started writing (a duplicate outbox id,
//! an I/O error) rolls the group back and its commits are retried one transaction each, so
//! every commit gets exactly the answer it would have had alone. A commit is answered only
//! after the transaction holding it committed.

use sqlx::AnyPool;
use tokio::sync::{mpsc, oneshot};

use crate::notifications::NewDelivery;
use crate::queries::write_instance_commit;
use crate::records::{AuditDraft, InstanceRecord, OutboxMessage, TimerRecord};
use crate::{begin_on, Backend, Store, StoreError};

/// Most commits written in one transaction.
const MAX_GROUP: usize = 128;

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
}

struct Job {
    commit: InstanceCommit,
    reply: oneshot::Sender<Result<(), StoreError>>,
}

/// The queue of the group-commit thread. Cheap to clone; the thread ends when every clone is
/// dropped.
#[derive(Debug, Clone)]
pub(crate) struct Committer {
    jobs: mpsc::UnboundedSender<Job>,
}

impl Committer {
    /// Start the thread writing through `writer` (a SQLite file's one write connection).
    pub(crate) fn start(writer: AnyPool, backend: Backend) -> Result<Committer, StoreError> {
        let (jobs, queue) = mpsc::unbounded_channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Database(sqlx::Error::Io(e)))?;
        std::thread::Builder::new()
            .name("store-committer".to_string())
            .spawn(move || runtime.block_on(run(writer, backend, queue)))
            .map_err(|e| StoreError::Database(sqlx::Error::Io(e)))?;
        Ok(Committer { jobs })
    }

    /// Queue a commit and wait until its transaction committed (or it failed).
    pub(crate) async fn submit(&self, commit: InstanceCommit) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job { commit, reply })
            .map_err(|_| StoreError::Database(sqlx::Error::PoolClosed))?;
        answer
            .await
            .map_err(|_| StoreError::Database(sqlx::Error::PoolClosed))?
    }
}

async fn run(writer: AnyPool, backend: Backend, mut queue: mpsc::UnboundedReceiver<Job>) {
    while let Some(first) = queue.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let (commits, replies): (Vec<_>, Vec<_>) =
            jobs.into_iter().map(|j| (j.commit, j.reply)).unzip();
        let results = commit_group(&writer, backend, &commits).await;
        for (reply, result) in replies.into_iter().zip(results) {
            // The caller may have gone away (its request was dropped): nothing to tell.
            let _ = reply.send(result);
        }
    }
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
async fn commit_each(
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
    write_instance_commit(
        conn,
        &c.rec,
        c.expected_version,
        &c.outbox,
        &c.audit,
        &c.timers,
        &c.deliveries,
    )
    .await
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
        commit_group(self.write_pool(), self.backend(), commits).await
    }
}
