//! Group commit on PostgreSQL: the instance commits of one process that queue while a group is
//! being written share the next transaction, and its statements.
//!
//! A distributed pool process runs several consumer-group members, each committing one
//! transition at a time; alone, a commit is `BEGIN`, the version-checked `UPDATE`, the step
//! upsert, the outbox insert, the audit head read and insert, `COMMIT`: seven round trips, each
//! a statement PostgreSQL parses, plans and runs (its per-statement cost, not the rows, was
//! most of its CPU in the distributed bench). [`PgCommitter`] is one task per process that takes
//! every commit queued so far (a lone one too) and writes them together:
//! - **Heads known** (the usual case): each instance's audit stream head at the version the
//!   commit was made from is remembered from the read that loaded it (`Store::get_instance`)
//!   or from this process's last write of it ([`KnownHeads`]). The whole group is then ONE
//!   statement outside any transaction (`pg_rows::write_commits`): a version-checked `UPDATE`
//!   of every instance, and each table's rows for the instances it updated.
//! - **Otherwise**: a transaction of one `UPDATE ... FROM (VALUES ...)` that checks every
//!   commit's expected version at once and reads each one's audit stream head, then one
//!   statement for every table's rows (`pg_rows::write_rows`).
//!
//! Creates share groups the same way (one multi-row insert, then `write_rows`); those made at
//! a template's head (`Store::create_instance_at_head`) are written only if one
//! `SELECT ... FOR SHARE` of the group's heads finds theirs unmoved.
//!
//! Each commit still gets exactly the answer it would have had alone: one whose version no
//! longer matches (or whose instance is unknown) writes nothing and is answered `Conflict`
//! (`NotFound`) while the others commit; any other failure writes nothing of the group (the
//! one statement, or the transaction, fails whole) and its commits are retried, without known
//! heads, then one transaction each (`commit::commit_each`). A commit is answered only after
//! the statement or transaction holding it committed. Two commits of the same instance never
//! share a group (a multi-row `UPDATE` cannot apply both in order): the later one goes to the
//! next group.
//!
//! **Gathering.** A group is written as soon as the task is free, unless the task has been
//! busy writing nearly all of the recent time ([`Gather`]): the process then commits faster
//! than PostgreSQL answers, every commit already waits behind the backlog, and waiting up to
//! [`GATHER`] for more commits shares each statement's fixed cost among more of them
//! (`commit_delay` with `commit_siblings` is PostgreSQL's own version of the trade).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::{AnyConnection, AnyPool, Connection, Row};
use tokio::sync::{mpsc, oneshot};

use crate::commit::{commit_each, InstanceCommit};
use crate::pg_rows::{write_commits, write_rows, GroupRows};
use crate::queries::{
    bind_instance, stream_heads, to_json, values_placeholders, INSERT_INSTANCE, INSTANCE_WIDTH,
};
use crate::recent::Recent;
use crate::records::{AuditDraft, InstanceRecord};
use crate::sqlite_writer::NewInstance;
use crate::step_mirror::{step_mirror, worth_remembering, StepMirror};
use crate::{Backend, StoreError};

/// Most commits in one group: bounds a statement's parameters (7 per commit in the `UPDATE`)
/// and the work lost to one failure.
const MAX_GROUP: usize = 128;

/// How long a busy task waits for more commits before it writes a group (tokio's timers count
/// whole milliseconds).
const GATHER: Duration = Duration::from_millis(1);

/// The share of the recent time spent writing above which the task gathers.
const GATHER_ABOVE: f64 = 0.8;

/// How busy the group-commit task has been: a moving average of the share of its time spent
/// writing groups (against waiting for the first commit of the next), the time spent
/// gathering counted as neither. Saturated, the next commit is queued before a group is
/// written and the share stays near 1 while it gathers; paced below that, the task waits
/// between groups and writes each at once.
#[derive(Debug, Default)]
struct Gather {
    busy: f64,
}

impl Gather {
    /// A group was written in `writing`, after `idle` waiting for its first commit.
    fn observe(&mut self, idle: Duration, writing: Duration) {
        let total = (idle + writing).as_secs_f64();
        if total > 0.0 {
            self.busy = self.busy * 0.8 + writing.as_secs_f64() / total * 0.2;
        }
    }

    /// Whether to wait for more commits before writing the next group.
    fn waits(&self) -> bool {
        self.busy > GATHER_ABOVE
    }
}

/// Writes queued for the task, and where their answers go.
enum Job {
    /// Commits that must share a group; answered with each commit handed back.
    Commits {
        commits: Vec<InstanceCommit>,
        reply: oneshot::Sender<Vec<Answer>>,
    },
    /// A new instance; answered with it handed back.
    Create {
        new: Box<NewInstance>,
        reply: oneshot::Sender<(Created, Box<NewInstance>)>,
    },
}

/// A commit's answer, with the commit handed back: its caller moved it in (a copy of every
/// audit event's documents and of the state cost the pools ~5 % of their CPU) and may still
/// need its record and messages.
pub(crate) type Answer = (Result<(), StoreError>, InstanceCommit);

/// What the group did with a create.
#[derive(Debug)]
pub(crate) enum Created {
    /// Written, with its outbox messages and audit events.
    Written,
    /// Not written: its id or idempotency key was taken (by another instance, or by an
    /// earlier create of the same group), or the group failed. The caller writes it alone,
    /// which answers it exactly as without the group (`Existing`, `AlreadyExists`, the
    /// error).
    Alone,
}

/// The queue of the process's group-commit task. Cheap to clone; the task ends when every
/// clone is dropped.
#[derive(Debug, Clone)]
pub(crate) struct PgCommitter {
    jobs: mpsc::UnboundedSender<Job>,
    /// Audit heads of instances this process read or wrote last, shared with the task.
    known: Arc<KnownHeads>,
}

/// The prefix of an instance's audit stream (`workflow_engine::instance_stream`): the stream
/// whose head an instance read comes with.
pub(crate) const INSTANCE_STREAM_PREFIX: &str = "instance:";

/// Most instances whose audit head a process remembers; past it the least recently written
/// go first ([`Recent`]). An entry holds the instance's step rows too (about 8 KB for the seed
/// template), and a process keeps the entries of instances other processes move on: at 65,536
/// the api and the approval pool passed 370 and 320 MB after 20,000 instances, against the
/// Helm chart's 512 and 384 MiB limits. 4,096 covers the instances in flight at 1,000/s for
/// seconds; one forgotten costs its next commit a transaction that reads the head.
const KNOWN_HEADS_MAX: usize = 4_096;

/// What is stored of an instance as of one of its versions, besides its row.
#[derive(Debug, Clone)]
struct KnownHead {
    version: i64,
    stream: String,
    /// `None`: the stream has no events.
    head: Option<(i64, String)>,
    /// Its step mirror rows.
    steps: StepMirror,
}

/// The audit stream head and step mirror rows of each instance at the version this process
/// last read ([`PgCommitter::observed`]) or wrote. A commit made at that version finds them
/// here: no audit event of the instance's stream and no step row of it is written without a
/// new version of the instance, so while the version check holds, they hold too. The group's
/// whole commit is then one statement ([`write_commits`]) that writes only the step rows that
/// changed. Were a head stale anyway, the audit insert would fail on the stream's key and the
/// group fall back (never a forked chain).
#[derive(Debug)]
struct KnownHeads {
    map: std::sync::Mutex<Recent<KnownHead>>,
}

impl Default for KnownHeads {
    fn default() -> KnownHeads {
        KnownHeads {
            map: std::sync::Mutex::new(Recent::new(KNOWN_HEADS_MAX)),
        }
    }
}

impl KnownHeads {
    fn lock(&self) -> std::sync::MutexGuard<'_, Recent<KnownHead>> {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn remember(&self, id: &str, head: KnownHead) {
        self.lock().insert(id.to_string(), head);
    }

    /// What is known of `c`'s instance, if known at the version `c` was made at and every
    /// event of `c` is on its stream.
    fn of(&self, c: &InstanceCommit) -> Option<KnownHead> {
        let map = self.lock();
        let known = map.get(&c.rec.info.id)?;
        (known.version == c.expected_version && c.audit.iter().all(|d| d.stream == known.stream))
            .then(|| known.clone())
    }

    fn forget(&self, id: &str) {
        self.lock().remove(id);
    }

    /// The version `id` is known at, if it is.
    fn version_of(&self, id: &str) -> Option<i64> {
        self.lock().get(id).map(|known| known.version)
    }

    /// After `c` was written: its instance at its new version, with the head `after` gives its
    /// stream (unchanged if it wrote no event) and its step rows `steps`; a finished instance
    /// is forgotten instead ([`worth_remembering`]).
    fn written(&self, c: &InstanceCommit, after: &HashMap<&str, (i64, String)>, steps: StepMirror) {
        if !worth_remembering(&c.rec) {
            self.forget(&c.rec.info.id);
            return;
        }
        self.moved(&c.rec.info.id, c.expected_version, &c.audit, after, steps);
    }

    /// Instance `id`, at `from`, was written to `from + 1` with the events `audit` and step
    /// rows `steps`.
    fn moved(
        &self,
        id: &str,
        from: i64,
        audit: &[AuditDraft],
        after: &HashMap<&str, (i64, String)>,
        steps: StepMirror,
    ) {
        let Some(stream) = audit.first().map(|d| d.stream.clone()) else {
            // No event: the head stays, the version moves.
            let mut map = self.lock();
            if let Some(known) = map.get_mut(id) {
                if known.version == from {
                    known.version += 1;
                    known.steps = steps;
                    map.touch(id);
                    return;
                }
            }
            map.remove(id);
            return;
        };
        match after.get(stream.as_str()) {
            Some(head) if audit.iter().all(|d| d.stream == stream) => self.remember(
                id,
                KnownHead {
                    version: from + 1,
                    stream,
                    head: Some(head.clone()),
                    steps,
                },
            ),
            _ => self.forget(id),
        }
    }
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Job::Commits { commits, .. } => write!(f, "Commits({})", commits.len()),
            Job::Create { new, .. } => write!(f, "Create({})", new.rec.info.id),
        }
    }
}

impl PgCommitter {
    /// Start the task on the current tokio runtime; it writes through `pool`.
    pub(crate) fn start(pool: AnyPool) -> PgCommitter {
        PgCommitter::start_with(pool, Gather::default())
    }

    fn start_with(pool: AnyPool, gather: Gather) -> PgCommitter {
        let (jobs, queue) = mpsc::unbounded_channel();
        let known = Arc::new(KnownHeads::default());
        tokio::spawn(run(pool, queue, known.clone(), gather));
        PgCommitter { jobs, known }
    }

    /// An instance as read, with its own stream's head (`None`: no events).
    pub(crate) fn observed(&self, rec: &InstanceRecord, head: Option<(i64, String)>) {
        let id = rec.info.id.as_str();
        // Known at this version already (this process wrote or read it): what it holds is what
        // was read, as nothing of an instance changes without a new version.
        if self.known.version_of(id) == Some(rec.version) {
            return;
        }
        if !worth_remembering(rec) {
            self.known.forget(id);
            return;
        }
        let steps = step_mirror(rec, None);
        self.known.remember(
            id,
            KnownHead {
                version: rec.version,
                stream: format!("{INSTANCE_STREAM_PREFIX}{id}"),
                head,
                steps,
            },
        );
    }

    /// Queue commits and wait until the transaction holding them committed (or they failed);
    /// one answer per commit, in order.
    pub(crate) async fn submit(&self, commits: Vec<InstanceCommit>) -> Vec<Result<(), StoreError>> {
        let count = commits.len();
        let mut results: Vec<_> = self
            .submit_owned(commits)
            .await
            .into_iter()
            .map(|(result, _)| result)
            .collect();
        results.resize_with(count, || Err(closed()));
        results
    }

    /// [`PgCommitter::submit`], each answer with its commit handed back; none when the task
    /// ended while the commits waited (the process is stopping).
    pub(crate) async fn submit_owned(&self, commits: Vec<InstanceCommit>) -> Vec<Answer> {
        let (reply, answer) = oneshot::channel();
        match self.jobs.send(Job::Commits { commits, reply }) {
            Err(mpsc::error::SendError(Job::Commits { commits, .. })) => {
                commits.into_iter().map(|c| (Err(closed()), c)).collect()
            }
            Err(_) => Vec::new(),
            Ok(()) => answer.await.unwrap_or_default(),
        }
    }

    /// Queue a create and wait until the transaction holding it committed (or the group
    /// failed, or the task is gone: [`Created::Alone`]); the create is handed back with the
    /// answer. `None` if the task ended while the create waited (the process is stopping).
    pub(crate) async fn create(&self, new: NewInstance) -> Option<(Created, NewInstance)> {
        let (reply, answer) = oneshot::channel();
        let job = Job::Create {
            new: Box::new(new),
            reply,
        };
        match self.jobs.send(job) {
            Err(mpsc::error::SendError(Job::Create { new, .. })) => Some((Created::Alone, *new)),
            Err(_) => None,
            Ok(()) => answer.await.ok().map(|(created, new)| (created, *new)),
        }
    }
}

fn closed() -> StoreError {
    StoreError::Database(sqlx::Error::PoolClosed)
}

/// The number of commits `job` adds to a group.
fn size_of(job: &Job) -> usize {
    match job {
        Job::Commits { commits, .. } => commits.len(),
        Job::Create { .. } => 1,
    }
}

async fn run(
    pool: AnyPool,
    mut queue: mpsc::UnboundedReceiver<Job>,
    known: Arc<KnownHeads>,
    mut gather: Gather,
) {
    let mut free_since = Instant::now();
    while let Some(first) = queue.recv().await {
        let idle = free_since.elapsed();
        let mut size = size_of(&first);
        let mut jobs = vec![first];
        while size < MAX_GROUP {
            match queue.try_recv() {
                Ok(job) => {
                    size += size_of(&job);
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        if gather.waits() {
            let until = tokio::time::Instant::now() + GATHER;
            while size < MAX_GROUP {
                match tokio::time::timeout_at(until, queue.recv()).await {
                    Ok(Some(job)) => {
                        size += size_of(&job);
                        jobs.push(job);
                    }
                    // The time is up, or every sender is gone (the loop ends after this group).
                    Ok(None) | Err(_) => break,
                }
            }
        }
        let writing_since = Instant::now();
        // Creates and commits are never of the same instance (a commit needs its create
        // answered first), so writing the creates first keeps every answer as it was.
        let mut creates = Vec::new();
        let mut commits = Vec::new();
        let mut replies = Vec::new();
        for job in jobs {
            match job {
                Job::Create { new, reply } => creates.push((*new, reply)),
                Job::Commits { commits: c, reply } => {
                    replies.push((reply, c.len()));
                    commits.extend(c);
                }
            }
        }
        if !creates.is_empty() {
            let (news, reply_to): (Vec<_>, Vec<_>) = creates.into_iter().unzip();
            let answers = write_creates(&pool, &news, &known).await;
            for ((reply, answer), new) in reply_to.into_iter().zip(answers).zip(news) {
                let _ = reply.send((answer, Box::new(new)));
            }
        }
        let mut results = Vec::with_capacity(commits.len());
        for batch in batches(&commits) {
            results.extend(write_batch(&pool, batch, &known).await);
        }
        let mut answers = results.into_iter().zip(commits);
        for (reply, count) in replies {
            // The caller may have gone away (its request was dropped): nothing to tell.
            let _ = reply.send(answers.by_ref().take(count).collect());
        }
        free_since = Instant::now();
        gather.observe(idle, free_since - writing_since);
    }
}

/// Write `news` in one transaction: one multi-row insert that skips any whose id or
/// idempotency key is taken, then the written ones' steps, outbox rows, timers, deliveries and
/// audit events. Any
/// failure writes nothing and sends every create back to be written alone.
async fn write_creates(pool: &AnyPool, news: &[NewInstance], known: &KnownHeads) -> Vec<Created> {
    let written = async {
        let mut conn = pool.acquire().await?;
        let mut tx = conn.begin().await?;
        // Creates made at a template's head only while it is the head: the others of the
        // group are not written here (answered alone, where the head is checked again and
        // the create refused).
        let at_heads = heads_held(&mut tx, news).await?;
        let news: Vec<&NewInstance> = news
            .iter()
            .filter(|n| !n.at_head || at_heads.contains(&head_of(n)))
            .collect();
        if news.is_empty() {
            return Ok(HashSet::new());
        }
        let inserted = insert_instances(&mut tx, &news).await?;
        let new: Vec<&NewInstance> = news
            .iter()
            .copied()
            .filter(|n| inserted.contains(n.rec.info.id.as_str()))
            .collect();
        let mut rows = GroupRows::default();
        for n in &new {
            rows.add(&n.rec, &n.outbox, &n.audit, &n.timers, &n.deliveries, None);
        }
        // A new instance's events start their stream: no head to read. Were one there, the
        // insert would fail on the stream's key and the creates be written alone.
        let (after, prints) = write_rows(&mut tx, &rows, HashMap::new()).await?;
        tx.commit().await?;
        for (n, steps) in new.iter().zip(prints) {
            if !worth_remembering(&n.rec) {
                continue;
            }
            known.moved(&n.rec.info.id, n.rec.version - 1, &n.audit, &after, steps);
        }
        Ok::<_, StoreError>(inserted)
    }
    .await
    .unwrap_or_default();
    news.iter()
        .map(|n| {
            if written.contains(n.rec.info.id.as_str()) {
                Created::Written
            } else {
                Created::Alone
            }
        })
        .collect()
}

/// (partner, template, version) of a create.
fn head_of(n: &NewInstance) -> (String, String, i64) {
    let info = &n.rec.info;
    (
        info.partner_id.clone(),
        info.template_id.clone(),
        info.template_version,
    )
}

/// Of the heads the group's `at_head` creates were made at, those that are still their
/// template's latest version, active; held (`FOR SHARE`) until the transaction ends, so no new
/// version or deactivation commits in between. One statement, none without such creates.
async fn heads_held(
    conn: &mut AnyConnection,
    news: &[NewInstance],
) -> Result<HashSet<(String, String, i64)>, StoreError> {
    let wanted: Vec<(String, String, i64)> = news
        .iter()
        .filter(|n| n.at_head)
        .map(head_of)
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    if wanted.is_empty() {
        return Ok(HashSet::new());
    }
    let sql = format!(
        "SELECT h.partner_id, h.id, h.latest_version FROM workflow_template_heads h \
         JOIN (VALUES {}) AS w (partner_id, id) ON h.partner_id = w.partner_id AND h.id = w.id \
         WHERE h.active = 1 FOR SHARE OF h",
        values_placeholders(wanted.len(), 2)
    );
    let mut query = sqlx::query(&sql);
    for (partner_id, id, _) in &wanted {
        query = query.bind(partner_id.as_str()).bind(id.as_str());
    }
    let mut held = HashSet::new();
    for row in query.fetch_all(&mut *conn).await? {
        held.insert((
            row.try_get::<String, _>("partner_id")?,
            row.try_get::<String, _>("id")?,
            row.try_get::<i64, _>("latest_version")?,
        ));
    }
    Ok(held)
}

/// Insert every instance of `news` whose id and idempotency key are free, in ONE statement;
/// returns the ids inserted.
async fn insert_instances(
    conn: &mut AnyConnection,
    news: &[&NewInstance],
) -> Result<HashSet<String>, StoreError> {
    let sql = format!(
        "{INSERT_INSTANCE} VALUES {} ON CONFLICT DO NOTHING RETURNING id",
        values_placeholders(news.len(), INSTANCE_WIDTH)
    );
    let mut query = sqlx::query(&sql);
    for n in news {
        query = bind_instance(query, &n.rec)?;
    }
    let mut inserted = HashSet::new();
    for row in query.fetch_all(&mut *conn).await? {
        inserted.insert(row.try_get::<String, _>("id")?);
    }
    Ok(inserted)
}

/// Consecutive runs of `commits` in which no instance appears twice, in order.
fn batches(commits: &[InstanceCommit]) -> Vec<&[InstanceCommit]> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < commits.len() {
        let mut seen = HashSet::new();
        let mut end = start;
        while end < commits.len() && seen.insert(commits[end].rec.info.id.as_str()) {
            end += 1;
        }
        out.push(&commits[start..end]);
        start = end;
    }
    out
}

/// Write one batch (distinct instances) in one transaction; see the module docs.
async fn write_batch(
    pool: &AnyPool,
    commits: &[InstanceCommit],
    known: &KnownHeads,
) -> Vec<Result<(), StoreError>> {
    // A lone commit too: its stream head comes with the `UPDATE`, a statement less than the
    // plain path, which answers the same (and remains the fallback).
    let Ok(mut conn) = pool.acquire().await else {
        return commit_each(pool, Backend::Postgres, commits).await;
    };
    // Every head known: the whole group is one statement, no transaction around it.
    let heads: Option<Vec<_>> = commits.iter().map(|c| known.of(c)).collect();
    if let Some(heads) = heads {
        if let Ok(answers) = write_known(&mut conn, commits, heads, known).await {
            return answers;
        }
        // Nothing was written (one statement): the transaction below tries again.
    }
    let written = match conn.begin().await {
        Ok(mut tx) => match write_many(&mut tx, commits, known).await {
            Ok(refused) => match tx.commit().await {
                Ok(()) => Some(refused),
                Err(_) => None,
            },
            Err(_) => {
                let _ = tx.rollback().await;
                None
            }
        },
        Err(_) => None,
    };
    match written {
        Some(refused) => refused
            .into_iter()
            .map(|r| match r {
                Some(e) => Err(e),
                None => Ok(()),
            })
            .collect(),
        // Something failed after writing started: each commit gets its own transaction and
        // answer (a duplicate outbox id, an audit race, a lost connection...).
        None => {
            drop(conn);
            commit_each(pool, Backend::Postgres, commits).await
        }
    }
}

/// The statements of a batch inside `conn`'s transaction. `Ok` holds, per commit, why it was
/// refused before writing anything (`None`: written); `Err` means the transaction must be
/// rolled back.
async fn write_many(
    conn: &mut AnyConnection,
    commits: &[InstanceCommit],
    known: &KnownHeads,
) -> Result<Vec<Option<StoreError>>, StoreError> {
    let (updated, heads) = update_instances(conn, commits).await?;
    let mut refused: Vec<Option<StoreError>> = Vec::with_capacity(commits.len());
    let mut missing = Vec::new();
    for c in commits {
        let info = &c.rec.info;
        if updated.contains(info.id.as_str()) {
            refused.push(None);
        } else {
            // Stale (`Conflict`), or unknown or another partner's (`NotFound`): read below.
            missing.push(info.id.as_str());
            refused.push(Some(not_found(&info.id)));
        }
    }
    if !missing.is_empty() {
        let existing = owners_of(conn, &missing).await?;
        for (c, r) in commits.iter().zip(refused.iter_mut()) {
            let info = &c.rec.info;
            if r.is_some() && existing.get(info.id.as_str()) == Some(&info.partner_id) {
                *r = Some(StoreError::Conflict {
                    what: "instance",
                    id: info.id.clone(),
                });
            }
        }
    }
    let written: Vec<&InstanceCommit> = commits
        .iter()
        .zip(&refused)
        .filter(|(_, r)| r.is_none())
        .map(|(c, _)| c)
        .collect();
    if written.is_empty() {
        return Ok(refused);
    }
    let rows = GroupRows::of_commits(&written);
    let events = rows.drafts();
    // The `UPDATE` read each commit's own stream's head (keyed here by the drafts' own
    // strings, as `chain_audits` wants them); any other stream an event names (none the engine
    // writes today) is read now.
    let mut found: HashMap<&str, (i64, String)> = events
        .iter()
        .filter_map(|(_, d)| {
            let head = heads.found.get(d.stream.as_str())?;
            Some((d.stream.as_str(), head.clone()))
        })
        .collect();
    let unread: Vec<_> = events
        .iter()
        .copied()
        .filter(|(_, d)| !heads.read.contains(d.stream.as_str()))
        .collect();
    if !unread.is_empty() {
        found.extend(stream_heads(conn, &unread).await?);
    }
    // Steps, outbox, audit events, timers, deliveries and decision outcomes (announced to
    // waiting API calls): one statement.
    let (after, prints) = write_rows(conn, &rows, found).await?;
    // Remembered before the transaction commits: were it not to, the next commit of these
    // instances is refused by its version check anyway.
    for (c, steps) in written.iter().zip(prints) {
        known.written(c, &after, steps);
    }
    for (c, r) in commits.iter().zip(&refused) {
        if r.is_some() {
            known.forget(&c.rec.info.id);
        }
    }
    Ok(refused)
}

/// [`write_batch`] when every commit's audit head is known: one statement. `Err`: nothing was
/// written.
async fn write_known(
    conn: &mut AnyConnection,
    commits: &[InstanceCommit],
    stored: Vec<KnownHead>,
    known: &KnownHeads,
) -> Result<Vec<Result<(), StoreError>>, StoreError> {
    let heads: HashMap<&str, (i64, String)> = stored
        .iter()
        .filter_map(|k| Some((k.stream.as_str(), k.head.clone()?)))
        .collect();
    let steps = stored.iter().map(|k| Some(k.steps.clone())).collect();
    let all: Vec<&InstanceCommit> = commits.iter().collect();
    let (written, after, prints) = write_commits(conn, &all, heads, steps).await?;
    let refused: Vec<&str> = commits
        .iter()
        .map(|c| c.rec.info.id.as_str())
        .filter(|id| !written.contains(*id))
        .collect();
    // Stale (`Conflict`), or unknown or another partner's (`NotFound`). The others are
    // written already, so a failure here cannot fail the group: unread owners answer
    // `Conflict`, whose caller reads the instance again (and then finds it, or not).
    let owners = if refused.is_empty() {
        Some(HashMap::new())
    } else {
        owners_of(conn, &refused).await.ok()
    };
    Ok(commits
        .iter()
        .zip(prints)
        .map(|(c, steps)| {
            let info = &c.rec.info;
            if written.contains(info.id.as_str()) {
                known.written(c, &after, steps);
                return Ok(());
            }
            known.forget(&info.id);
            let owner = owners.as_ref().map(|o| o.get(info.id.as_str()));
            if owner.is_none() || owner == Some(Some(&info.partner_id)) {
                Err(StoreError::Conflict {
                    what: "instance",
                    id: info.id.clone(),
                })
            } else {
                Err(not_found(&info.id))
            }
        })
        .collect())
}

/// Parameters of one commit in the `UPDATE`'s VALUES.
const UPDATE_WIDTH: usize = 8;

/// Audit stream heads the group read: the streams looked up (`read`) and, of those with
/// events, the latest `(seq, hash)` (`found`; a stream read but not found is new).
#[derive(Debug, Default)]
struct Heads {
    read: HashSet<String>,
    found: HashMap<String, (i64, String)>,
}

/// Apply every commit's new state whose instance is its partner's and whose expected version
/// still matches, in ONE statement (the row locks are taken here, as the single-commit path's
/// `UPDATE` takes its one; the join goes by primary key and the partner is a filter on the
/// row); returns the ids updated. The same statement reads the head of each updated commit's
/// audit stream (the stream of its first event; the engine writes a transition's events to
/// its instance's stream), a lookup that had been a statement of its own: once the row is
/// locked no other commit of the instance can append to it, and a head that is stale anyway
/// (an event appended without a commit) fails the insert on the stream's key, never forks it.
async fn update_instances(
    conn: &mut AnyConnection,
    commits: &[InstanceCommit],
) -> Result<(HashSet<String>, Heads), StoreError> {
    let values = (0..commits.len())
        .map(|r| {
            let p = |k: usize| r * UPDATE_WIDTH + k;
            format!(
                "(${}::text, ${}::text, ${}::text, ${}::bigint, ${}::text, ${}::bigint, ${}::bigint, ${}::text)",
                p(1),
                p(2),
                p(3),
                p(4),
                p(5),
                p(6),
                p(7),
                p(8)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "UPDATE workflow_instances AS w SET status = v.status, current_step = v.current_step, \
         state = v.state, updated_at = v.updated_at, version = v.expected + 1 \
         FROM (VALUES {values}) AS v (id, partner_id, status, current_step, state, updated_at, expected, stream) \
         LEFT JOIN LATERAL (SELECT b.last_seq AS seq, b.last_hash AS hash FROM audit_blocks b \
         WHERE b.partner_id = v.partner_id AND b.stream = v.stream \
         ORDER BY b.first_seq DESC LIMIT 1) AS h ON true \
         WHERE w.id = v.id AND w.partner_id = v.partner_id AND w.version = v.expected \
         RETURNING w.id, v.stream, h.seq AS head_seq, h.hash AS head_hash"
    );
    let mut query = sqlx::query(&sql);
    for c in commits {
        let rec = &c.rec;
        query = query
            .bind(rec.info.id.as_str())
            .bind(rec.info.partner_id.as_str())
            .bind(rec.state.status.as_str())
            .bind(rec.state.current_step.map(|s| s as i64))
            .bind(to_json(&rec.state)?)
            .bind(rec.updated_at.0)
            .bind(c.expected_version)
            .bind(c.audit.first().map(|d| d.stream.as_str()));
    }
    let mut updated = HashSet::new();
    let mut heads = Heads::default();
    for row in query.fetch_all(&mut *conn).await? {
        updated.insert(row.try_get::<String, _>("id")?);
        let Some(stream) = row.try_get::<Option<String>, _>("stream")? else {
            continue;
        };
        let seq = row.try_get::<Option<i64>, _>("head_seq")?;
        let hash = row.try_get::<Option<String>, _>("head_hash")?;
        if let (Some(seq), Some(hash)) = (seq, hash) {
            heads.found.insert(stream.clone(), (seq, hash));
        }
        heads.read.insert(stream);
    }
    Ok((updated, heads))
}

/// The owner of each of `ids` that exists.
async fn owners_of(
    conn: &mut AnyConnection,
    ids: &[&str],
) -> Result<HashMap<String, String>, StoreError> {
    let params = (1..=ids.len())
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!("SELECT id, partner_id FROM workflow_instances WHERE id IN ({params})");
    let mut query = sqlx::query(&sql);
    for id in ids {
        query = query.bind(*id);
    }
    let mut owners = HashMap::new();
    for row in query.fetch_all(&mut *conn).await? {
        owners.insert(
            row.try_get::<String, _>("id")?,
            row.try_get::<String, _>("partner_id")?,
        );
    }
    Ok(owners)
}

fn not_found(id: &str) -> StoreError {
    StoreError::NotFound {
        what: "instance",
        id: id.to_string(),
    }
}

#[cfg(test)]
mod tests {
    //! The group's own statements, called directly: through `Store::commit_instances` a
    //! failure of theirs would be masked by the fallback (each commit alone gives the same
    //! answers), so this is where the heads read by the `UPDATE` are shown to chain.

    use serde_json::json;
    use workflow_core::instance::{ActorRef, ActorType};
    use workflow_core::{InstanceStatus, Timestamp};

    use super::*;
    use crate::fixtures::instance;
    use crate::records::{verify_audit_chain, AuditDraft, InstanceRecord, OutboxMessage};
    use crate::{CreateOutcome, Store};

    fn event(stream: &str, n: u64) -> AuditDraft {
        AuditDraft {
            stream: stream.into(),
            at: Timestamp(3_000),
            actor: ActorRef {
                id: "u".into(),
                actor_type: ActorType::Human,
            },
            kind: "instance.advanced".into(),
            before: serde_json::Value::Null,
            after: json!({ "n": n }),
            reason: None,
        }
    }

    /// The task gathers only while it has been writing nearly all of the time: paced with
    /// gaps between groups it never does, and it stops soon after the load does.
    #[test]
    fn only_a_busy_task_gathers() {
        let ms = Duration::from_millis;
        let mut gather = Gather::default();
        assert!(!gather.waits(), "a new task writes at once");
        for _ in 0..3 {
            gather.observe(ms(0), ms(2));
        }
        assert!(!gather.waits(), "three busy groups are not yet a trend");
        for _ in 0..10 {
            gather.observe(ms(0), ms(2));
        }
        assert!(
            gather.waits(),
            "saturated: the next commit was always queued"
        );
        gather.observe(ms(8), ms(2));
        assert!(!gather.waits(), "one long wait for work ends the gathering");
        let mut paced = Gather::default();
        for _ in 0..1_000 {
            paced.observe(ms(1), ms(2));
        }
        assert!(
            !paced.waits(),
            "busy two thirds of the time: {}",
            paced.busy
        );
    }

    /// While gathering, every commit is still written and answered, whether it arrived before
    /// the wait, during it or after it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_gathering_task_writes_and_answers_every_commit(
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let store = Store::connect(&workflow_testkit::postgres_url().await?).await?;
        store.migrate().await?;
        let committer = Arc::new(PgCommitter::start_with(
            store.write_pool().clone(),
            Gather { busy: 1.0 },
        ));
        let mut recs = Vec::new();
        for _ in 0..24 {
            let rec = instance();
            let created = store.create_instance(&rec, &[], &[]).await?;
            assert!(matches!(created, CreateOutcome::Created(_)));
            recs.push(rec);
        }
        let mut submitted = tokio::task::JoinSet::new();
        for (i, rec) in recs.iter().enumerate() {
            let mut next = rec.clone();
            next.version = 2;
            next.state.current_step = Some(i);
            let commit = InstanceCommit::state_only(next, 1);
            let committer = Arc::clone(&committer);
            submitted.spawn(async move {
                if i % 2 == 1 {
                    // Half arrive about a millisecond later (tokio's timer granularity):
                    // during the first group's wait or after it.
                    tokio::time::sleep(Duration::from_micros(300)).await;
                }
                committer.submit(vec![commit]).await
            });
        }
        while let Some(answers) = submitted.join_next().await {
            for answer in answers? {
                answer?;
            }
        }
        for (i, rec) in recs.iter().enumerate() {
            let stored = store
                .get_instance("p1", &rec.info.id)
                .await?
                .ok_or("stored")?;
            assert_eq!((stored.version, stored.state.current_step), (2, Some(i)));
        }
        Ok(())
    }

    /// A commit that finishes its instance leaves nothing of it behind: no transition follows,
    /// and a finished instance's head and mirror held until the map filled add up to hundreds of
    /// MB in a long-running process.
    #[test]
    fn a_finished_instance_is_forgotten_and_a_running_one_remembered() {
        let known = KnownHeads::default();
        let rec = instance();
        let id = rec.info.id.clone();
        let stream = format!("{INSTANCE_STREAM_PREFIX}{id}");
        let after = HashMap::from([(stream.as_str(), (2, "h2".to_string()))]);
        let commit = |from: i64, status: InstanceStatus| {
            let mut next = rec.clone();
            next.version = from + 1;
            next.state.status = status;
            InstanceCommit {
                rec: next,
                expected_version: from,
                outbox: vec![],
                audit: vec![event(&stream, 1)],
                timers: vec![],
                deliveries: vec![],
                decision: None,
            }
        };
        let running = commit(1, InstanceStatus::Running);
        known.written(&running, &after, step_mirror(&running.rec, None));
        assert_eq!(known.version_of(&id), Some(2));
        assert!(known.of(&commit(2, InstanceStatus::Completed)).is_some());

        let done = commit(2, InstanceStatus::Completed);
        known.written(&done, &after, step_mirror(&done.rec, None));
        assert_eq!(known.version_of(&id), None);
    }

    /// What a process remembers stays bounded however many instances it sees, and what it
    /// forgets is what it wrote longest ago.
    #[test]
    fn the_known_heads_stay_under_their_bound() {
        let known = KnownHeads::default();
        for n in 0..KNOWN_HEADS_MAX + 10 {
            let id = format!("i{n}");
            known.remember(
                &id,
                KnownHead {
                    version: 1,
                    stream: format!("{INSTANCE_STREAM_PREFIX}{id}"),
                    head: None,
                    steps: StepMirror::default(),
                },
            );
            assert!(known.lock().len() <= KNOWN_HEADS_MAX, "{n}");
        }
        let map = known.lock();
        assert!(map.get("i0").is_none());
        // The last three quarters of the bound written are all kept.
        let total = KNOWN_HEADS_MAX + 10;
        for n in total - KNOWN_HEADS_MAX * 3 / 4..total {
            assert!(map.get(&format!("i{n}")).is_some(), "i{n}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_group_chains_each_stream_onto_the_head_its_update_read(
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let store = Store::connect(&workflow_testkit::postgres_url().await?).await?;
        store.migrate().await?;
        // One stream with events already (its create's), one new (created without events).
        let (old, new) = (instance(), instance());
        let (old_stream, new_stream) = (
            format!("instance:{}", old.info.id),
            format!("instance:{}", new.info.id),
        );
        let first = [event(&old_stream, 1), event(&old_stream, 2)];
        for (rec, audit) in [(&old, &first[..]), (&new, &[][..])] {
            let created = store.create_instance(rec, &[], audit).await?;
            assert!(matches!(created, CreateOutcome::Created(_)));
        }
        let commit = |rec: &InstanceRecord, stream: &str| {
            let mut next = rec.clone();
            next.version += 1;
            InstanceCommit {
                rec: next,
                expected_version: rec.version,
                outbox: vec![],
                audit: vec![event(stream, 3), event(stream, 4)],
                timers: vec![],
                deliveries: vec![],
                decision: None,
            }
        };
        let commits = [commit(&old, &old_stream), commit(&new, &new_stream)];

        let mut conn = store.write_pool().acquire().await?;
        let mut tx = conn.begin().await?;
        let refused = write_many(&mut tx, &commits, &KnownHeads::default()).await?;
        assert!(refused.iter().all(Option::is_none), "{refused:?}");
        tx.commit().await?;

        for (stream, events) in [(&old_stream, 4), (&new_stream, 2)] {
            let trail = store.list_audit("p1", stream).await?;
            assert_eq!(verify_audit_chain(&trail), Ok(events), "{stream}");
        }
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_group_whose_heads_are_known_is_one_statement_that_writes_only_current_commits(
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let store = Store::connect(&workflow_testkit::postgres_url().await?).await?;
        store.migrate().await?;
        // `a` has events, `b` none; `stale` moves on after its head was remembered; `other` is
        // another partner's.
        let (mut a, b, stale, mut other) = (instance(), instance(), instance(), instance());
        other.info.partner_id = "p2".into();
        // `a` has two steps: its commit changes the second only.
        let step = |index: usize| workflow_core::instance::StepExecution {
            index,
            name: format!("s{index}"),
            step_type: workflow_core::StepType::Action,
            status: workflow_core::StepStatus::Running,
            started_at: Some(Timestamp(1_000)),
            finished_at: None,
            actor: None,
            input: Some(json!({ "amount": index }).into()),
            output: None,
            error: None,
            decisions: vec![],
            escalations: 0,
        };
        a.state.steps = vec![step(0), step(1)];
        let stream = |rec: &InstanceRecord| format!("{INSTANCE_STREAM_PREFIX}{}", rec.info.id);
        for rec in [&a, &b, &stale] {
            let audit = if rec.info.id == b.info.id {
                vec![]
            } else {
                vec![event(&stream(rec), 1), event(&stream(rec), 2)]
            };
            let created = store.create_instance(rec, &[], &audit).await?;
            assert!(matches!(created, CreateOutcome::Created(_)));
        }
        let head = |rec: &InstanceRecord| {
            let stream = stream(rec);
            let store = store.clone();
            async move {
                let trail = store.list_audit("p1", &stream).await?;
                Ok::<_, StoreError>(trail.last().map(|e| (e.seq, e.hash.clone())))
            }
        };
        let known = KnownHeads::default();
        for rec in [&a, &b, &stale, &other] {
            known.remember(
                &rec.info.id,
                KnownHead {
                    version: 1,
                    stream: stream(rec),
                    head: head(rec).await?,
                    steps: step_mirror(rec, None),
                },
            );
        }
        let commit = |rec: &InstanceRecord, from: i64| {
            let mut next = rec.clone();
            next.version = from + 1;
            next.state.current_step = Some(from as usize);
            if let Some(second) = next.state.steps.get_mut(1) {
                second.status = workflow_core::StepStatus::Completed;
                second.output = Some(json!({ "from": from }).into());
            }
            InstanceCommit {
                rec: next,
                expected_version: from,
                outbox: vec![OutboxMessage {
                    id: new_id(),
                    topic: "t".into(),
                    key: rec.info.id.clone(),
                    payload: vec![0, 1, 2, 255],
                }],
                audit: vec![event(&stream(rec), 10), event(&stream(rec), 11)],
                timers: vec![],
                deliveries: vec![],
                decision: None,
            }
        };
        for answer in store.commit_instances(&[commit(&stale, 1)]).await {
            answer?;
        }

        let group = [
            commit(&a, 1),
            commit(&b, 1),
            commit(&stale, 1),
            commit(&other, 1),
        ];
        let heads: Option<Vec<_>> = group.iter().map(|c| known.of(c)).collect();
        let heads = heads.ok_or("every head is known")?;
        let mut conn = store.write_pool().acquire().await?;
        let answers = write_known(&mut conn, &group, heads, &known).await?;
        assert!(answers[0].is_ok() && answers[1].is_ok(), "{answers:?}");
        assert!(
            matches!(answers[2], Err(StoreError::Conflict { .. })),
            "{answers:?}"
        );
        assert!(
            matches!(answers[3], Err(StoreError::NotFound { .. })),
            "{answers:?}"
        );
        // Only the step that changed was written (the other is not even locked: no `xmax`);
        // the mirror is the state's.
        let rows: Vec<(i64, String, String, i64)> = sqlx::query_as(
            "SELECT step_index, status, COALESCE(output, ''), xmax::text::bigint \
             FROM workflow_step_executions WHERE instance_id = $1 ORDER BY step_index",
        )
        .bind(a.info.id.as_str())
        .fetch_all(store.pool())
        .await?;
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (rows[0].1.as_str(), rows[0].2.as_str(), rows[0].3),
            ("running", "", 0)
        );
        assert_eq!(
            (rows[1].1.as_str(), rows[1].2.as_str()),
            ("completed", r#"{"from":1}"#)
        );
        // Written whole: state, events chained on the known heads, outbox rows.
        for (rec, events) in [(&a, 4), (&b, 2)] {
            let stored = store
                .get_instance("p1", &rec.info.id)
                .await?
                .ok_or("stored")?;
            assert_eq!((stored.version, stored.state.current_step), (2, Some(1)));
            let trail = store.list_audit("p1", &stream(rec)).await?;
            assert_eq!(verify_audit_chain(&trail), Ok(events));
        }
        // The stale one: nothing of the group's commit (its own commit's events only).
        let trail = store.list_audit("p1", &stream(&stale)).await?;
        assert_eq!(verify_audit_chain(&trail), Ok(4));
        let outbox: i64 =
            sqlx::query_scalar("SELECT count(*) FROM outbox WHERE msg_key = $1 OR msg_key = $2")
                .bind(a.info.id.as_str())
                .bind(stale.info.id.as_str())
                .fetch_one(store.pool())
                .await?;
        assert_eq!(outbox, 2, "a's message and the stale one's own");
        // The written ones' next commits know their heads; the refused ones' do not.
        let next = commit(&a, 2);
        assert_eq!(known.of(&next).and_then(|k| k.head).map(|h| h.0), Some(4));
        assert!(known.of(&commit(&stale, 2)).is_none());
        let answers = write_known(
            &mut conn,
            std::slice::from_ref(&next),
            vec![known.of(&next).ok_or("known")?],
            &known,
        )
        .await?;
        assert!(answers[0].is_ok(), "{answers:?}");
        let trail = store.list_audit("p1", &stream(&a)).await?;
        assert_eq!(verify_audit_chain(&trail), Ok(6));
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_group_writes_only_the_creates_whose_template_head_held(
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let store = Store::connect(&workflow_testkit::postgres_url().await?).await?;
        store.migrate().await?;
        let draft = event("template:t", 0);
        let (kept, moved, inactive) = (new_id(), new_id(), new_id());
        for id in [&kept, &moved, &inactive] {
            store.insert_template(&template(id), &draft).await?;
        }
        store
            .add_template_version(
                "p1",
                &moved,
                "t",
                "manual",
                &json!({}),
                "u",
                Timestamp(2),
                &draft,
            )
            .await?;
        store
            .set_template_active("p1", &inactive, false, &draft)
            .await?;
        let at = |template_id: &str, version: i64, at_head: bool| {
            let mut rec = instance();
            rec.info.template_id = template_id.into();
            rec.info.template_version = version;
            NewInstance {
                rec,
                outbox: vec![],
                audit: vec![],
                timers: vec![],
                deliveries: vec![],
                at_head,
            }
        };
        let news = [
            at(&kept, 1, true),
            at(&moved, 1, true),
            at(&moved, 2, true),
            at(&inactive, 1, true),
            // Without the check, the head is not consulted.
            at(&moved, 1, false),
        ];
        let created = write_creates(store.write_pool(), &news, &KnownHeads::default()).await;
        let written: Vec<bool> = created
            .iter()
            .map(|c| matches!(c, Created::Written))
            .collect();
        assert_eq!(written, [true, false, true, false, true]);
        for (n, was) in news.iter().zip(&written) {
            let found = store.get_instance("p1", &n.rec.info.id).await?;
            assert_eq!(found.is_some(), *was, "{:?}", n.rec.info.template_id);
        }
        Ok(())
    }

    /// A new version committed while a group waits on its head's lock: the group sees the
    /// moved head and leaves the create made at the old one unwritten (answered alone, where
    /// it is refused).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_group_waiting_on_a_moving_head_sees_it_moved(
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let store = Store::connect(&workflow_testkit::postgres_url().await?).await?;
        store.migrate().await?;
        let template_id = new_id();
        store
            .insert_template(&template(&template_id), &event("template:t", 0))
            .await?;
        let mut rec = instance();
        rec.info.template_id = template_id.clone();
        let news = [NewInstance {
            rec,
            outbox: vec![],
            audit: vec![],
            timers: vec![],
            deliveries: vec![],
            at_head: true,
        }];
        // Another session moves the head and holds its lock.
        let mut mover = store.write_pool().begin().await?;
        sqlx::query(
            "UPDATE workflow_template_heads SET latest_version = 2 \
             WHERE partner_id = 'p1' AND id = $1",
        )
        .bind(template_id.as_str())
        .execute(&mut *mover)
        .await?;
        let pool = store.write_pool().clone();
        let group = tokio::spawn(async move {
            write_creates(&pool, &news, &KnownHeads::default())
                .await
                .into_iter()
                .map(|c| matches!(c, Created::Written))
                .collect::<Vec<_>>()
        });
        // Committed only once the group waits on the head's lock.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                 AND query LIKE '%workflow_template_heads%' AND datname = current_database()",
            )
            .fetch_one(store.pool())
            .await?;
            if waiting > 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the group never waited on the head"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        mover.commit().await?;
        assert_eq!(group.await?, [false]);
        Ok(())
    }

    /// Outbox payloads keep every byte through a group's rows (base64 inside their JSON), an
    /// empty payload too, alone in its group or among others.
    #[tokio::test]
    async fn outbox_payloads_keep_every_byte(
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let store = Store::connect(&workflow_testkit::postgres_url().await?).await?;
        store.migrate().await?;
        let message = |payload: Vec<u8>| OutboxMessage {
            id: new_id(),
            topic: "t".into(),
            key: "k".into(),
            payload,
        };
        let create = |outbox: Vec<OutboxMessage>| NewInstance {
            rec: instance(),
            outbox,
            audit: vec![],
            timers: vec![],
            deliveries: vec![],
            at_head: false,
        };
        let all_bytes: Vec<u8> = (0..=255).collect();
        let groups = [
            vec![create(vec![message(vec![])])],
            vec![
                create(vec![message(vec![0x1e]), message(vec![])]),
                create(vec![message(all_bytes.clone()), message(b"x".to_vec())]),
            ],
        ];
        for news in groups {
            let created = write_creates(store.write_pool(), &news, &KnownHeads::default()).await;
            assert!(
                created.iter().all(|c| matches!(c, Created::Written)),
                "{created:?}"
            );
            for m in news.iter().flat_map(|n| &n.outbox) {
                let stored: Vec<u8> =
                    sqlx::query_scalar("SELECT payload FROM outbox WHERE id = $1")
                        .bind(m.id.as_str())
                        .fetch_one(store.pool())
                        .await?;
                assert_eq!(stored, m.payload, "message {}", m.id);
            }
        }
        Ok(())
    }

    /// Version 1 of template `id` of partner `p1`, active, without steps.
    fn template(id: &str) -> crate::records::TemplateRecord {
        crate::records::TemplateRecord {
            id: id.into(),
            partner_id: "p1".into(),
            version: 1,
            name: "t".into(),
            trigger_type: "manual".into(),
            active: true,
            doc: json!({"name": "t", "steps": []}),
            created_at: Timestamp(1),
            created_by: "u".into(),
        }
    }

    fn new_id() -> String {
        uuid::Uuid::now_v7().to_string()
    }

    /// A fresh database's `workflow_instances` is empty, where reading it whole is the
    /// cheapest plan, and PostgreSQL keeps a statement's plan once it has run a few times: the
    /// group commits and batched reads made from then on must still find their instances by
    /// key. Counted by PostgreSQL itself (`pg_stat_user_tables`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn commits_and_reads_never_scan_the_instances_table(
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        const INSTANCES: usize = 40;
        const ROUNDS: i64 = 3;
        let url = workflow_testkit::postgres_url().await?;
        let migrated = Store::connect(&url).await?;
        migrated.migrate().await?;
        migrated.close().await;
        // A backend reports its counters when its session ends (or seconds later while idle):
        // once every other session is gone, the counters hold all they did.
        let mut stats = <AnyConnection as Connection>::connect(&url).await?;
        the_only_session(&mut stats).await?;
        // The migrations' index builds scanned the table: counted from here on.
        sqlx::query("SELECT pg_stat_reset_single_table_counters('workflow_instances'::regclass)")
            .execute(&mut stats)
            .await?;
        let store = Store::connect(&url).await?;
        let mut recs = Vec::new();
        for _ in 0..INSTANCES {
            let rec = instance();
            let stream = format!("{INSTANCE_STREAM_PREFIX}{}", rec.info.id);
            let created = store
                .create_instance(&rec, &[], &[event(&stream, 1)])
                .await?;
            assert!(matches!(created, CreateOutcome::Created(_)));
            recs.push(rec);
        }
        for round in 1..=ROUNDS {
            for rec in &recs {
                // The read tells the committer the instance's head: each commit is then the
                // group's one statement.
                let read = store.get_instance("p1", &rec.info.id).await?;
                assert_eq!(read.map(|r| r.version), Some(round));
                let mut next = rec.clone();
                next.version = round + 1;
                let stream = format!("{INSTANCE_STREAM_PREFIX}{}", rec.info.id);
                let commit = InstanceCommit {
                    rec: next,
                    expected_version: round,
                    outbox: vec![],
                    audit: vec![event(&stream, 1 + round as u64)],
                    timers: vec![],
                    deliveries: vec![],
                    decision: None,
                };
                for answer in store.commit_instances(&[commit]).await {
                    answer?;
                }
            }
        }
        store.close().await;
        the_only_session(&mut stats).await?;
        let (seq, idx): (i64, i64) = sqlx::query_as(
            "SELECT seq_scan, COALESCE(idx_scan, 0) FROM pg_stat_user_tables \
             WHERE relname = 'workflow_instances'",
        )
        .fetch_one(&mut stats)
        .await?;
        // Each round reads and commits every instance, by key.
        let expected = (INSTANCES as i64) * ROUNDS * 2;
        assert!(
            seq + idx >= expected,
            "{seq} scans and {idx} probes reported"
        );
        assert_eq!(seq, 0, "{seq} scans of the instances table, {idx} probes");
        Ok(())
    }

    /// End every other client session on `conn`'s database and wait until they are gone (at
    /// most 30 s; autovacuum may come and go). A closed store's pool may still hold a
    /// connection or two for a moment (sqlx returns connections to the pool from spawned
    /// tasks, racing its `close`); an ended session reports its counters on the way out.
    async fn the_only_session(
        conn: &mut AnyConnection,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid() \
             AND backend_type = 'client backend'",
        )
        .execute(&mut *conn)
        .await?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let others: Vec<(String, String, String)> = sqlx::query_as(
                "SELECT pid::text, COALESCE(state, ''), left(query, 120) FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid() \
                 AND backend_type = 'client backend'",
            )
            .fetch_all(&mut *conn)
            .await?;
            if others.is_empty() {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(format!("other sessions stay on the database: {others:?}").into());
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// An instance read at the version this process knows it at is not taken again: nothing
    /// of an instance changes without a new version, so what is known stands (its step
    /// mirror is not taken again). A read at another version replaces it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_at_a_known_version_keeps_what_is_known(
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let store = Store::connect(&workflow_testkit::postgres_url().await?).await?;
        store.migrate().await?;
        let committer = PgCommitter::start(store.write_pool().clone());
        let first = instance();
        let id = first.info.id.clone();
        let known = |c: &PgCommitter| {
            c.known
                .lock()
                .get(&id)
                .map(|k| (k.version, k.head.clone(), k.steps.clone()))
        };

        committer.observed(&first, Some((1, "h1".into())));
        let taken = (1, Some((1, "h1".to_string())), step_mirror(&first, None));
        assert_eq!(known(&committer), Some(taken.clone()));

        // The same version with other contents (which a store never holds): not taken.
        let mut other = first.clone();
        other
            .state
            .steps
            .push(workflow_core::instance::StepExecution {
                index: 0,
                name: "s0".into(),
                step_type: workflow_core::StepType::Condition,
                status: workflow_core::StepStatus::Completed,
                started_at: Some(Timestamp(2_000)),
                finished_at: Some(Timestamp(2_000)),
                actor: None,
                input: None,
                output: Some(json!(true).into()),
                error: None,
                decisions: vec![],
                escalations: 0,
            });
        assert_ne!(step_mirror(&other, None), taken.2);
        committer.observed(&other, Some((2, "h2".into())));
        assert_eq!(known(&committer), Some(taken));

        // A new version is.
        other.version = 2;
        committer.observed(&other, Some((2, "h2".into())));
        assert_eq!(
            known(&committer),
            Some((2, Some((2, "h2".to_string())), step_mirror(&other, None)))
        );
        Ok(())
    }
}
