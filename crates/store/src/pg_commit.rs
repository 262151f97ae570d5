//! Group commit on PostgreSQL: the instance commits of one process that queue while a group is
//! being written share the next transaction, and its statements.
//!
//! A distributed pool process runs several consumer-group members, each committing one
//! transition at a time; alone, a commit is `BEGIN`, the version-checked `UPDATE`, the step
//! upsert, the outbox insert, the audit head read and insert, `COMMIT`: seven round trips, each
//! a statement PostgreSQL parses, plans and runs (its per-statement cost, not the rows, was
//! most of its CPU in the distributed bench). [`PgCommitter`] is one task per process that takes
//! every commit queued so far (a lone one too) and writes them with one statement per table:
//! one `UPDATE ... FROM (VALUES ...)` checks every commit's expected version at once and reads
//! each one's audit stream head, then one multi-row statement each for steps, outbox, timers,
//! deliveries, audit events and decision outcomes. Creates share groups the same way (one
//! multi-row insert); those made at a template's head (`Store::create_instance_at_head`) are
//! written only if one `SELECT ... FOR SHARE` of the group's heads finds theirs unmoved.
//!
//! Each commit still gets exactly the answer it would have had alone: one whose version no
//! longer matches (or whose instance is unknown) writes nothing and is answered `Conflict`
//! (`NotFound`) while the others commit; any other failure rolls the group back and its commits
//! are retried one transaction each (`commit::commit_each`). A commit is answered only after
//! the transaction holding it committed. Two commits of the same instance never share a group
//! (a multi-row `UPDATE` cannot apply both in order): the later one goes to the next group.

use std::collections::{HashMap, HashSet};

use sqlx::{AnyConnection, AnyPool, Connection, Row};
use tokio::sync::{mpsc, oneshot};

use crate::commit::{commit_each, InstanceCommit};
use crate::queries::{
    bind_instance, insert_chained, insert_outbox, stream_heads, to_json, upsert_steps,
    values_placeholders, INSERT_INSTANCE, INSTANCE_WIDTH,
};
use crate::sqlite_writer::NewInstance;
use crate::{Backend, StoreError};

/// Most commits in one group: bounds a statement's parameters (7 per commit in the `UPDATE`)
/// and the work lost to one failure.
const MAX_GROUP: usize = 128;

/// Writes queued for the task, and where their answers go.
enum Job {
    /// Commits that must share a group.
    Commits {
        commits: Vec<InstanceCommit>,
        reply: oneshot::Sender<Vec<Result<(), StoreError>>>,
    },
    /// A new instance.
    Create {
        new: Box<NewInstance>,
        reply: oneshot::Sender<Created>,
    },
}

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
        let (jobs, queue) = mpsc::unbounded_channel();
        tokio::spawn(run(pool, queue));
        PgCommitter { jobs }
    }

    /// Queue commits and wait until the transaction holding them committed (or they failed);
    /// one answer per commit, in order.
    pub(crate) async fn submit(&self, commits: Vec<InstanceCommit>) -> Vec<Result<(), StoreError>> {
        let count = commits.len();
        let (reply, answer) = oneshot::channel();
        if self.jobs.send(Job::Commits { commits, reply }).is_err() {
            return (0..count).map(|_| Err(closed())).collect();
        }
        answer
            .await
            .unwrap_or_else(|_| (0..count).map(|_| Err(closed())).collect())
    }

    /// Queue a create and wait until the transaction holding it committed (or the group
    /// failed, or the task is gone: [`Created::Alone`]).
    pub(crate) async fn create(&self, new: NewInstance) -> Created {
        let (reply, answer) = oneshot::channel();
        if self
            .jobs
            .send(Job::Create {
                new: Box::new(new),
                reply,
            })
            .is_err()
        {
            return Created::Alone;
        }
        answer.await.unwrap_or(Created::Alone)
    }
}

fn closed() -> StoreError {
    StoreError::Database(sqlx::Error::PoolClosed)
}

async fn run(pool: AnyPool, mut queue: mpsc::UnboundedReceiver<Job>) {
    while let Some(first) = queue.recv().await {
        let mut jobs = vec![first];
        let mut size = 1;
        while size < MAX_GROUP {
            match queue.try_recv() {
                Ok(job) => {
                    size += match &job {
                        Job::Commits { commits, .. } => commits.len(),
                        Job::Create { .. } => 1,
                    };
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
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
            let answers = write_creates(&pool, &news).await;
            for (reply, answer) in reply_to.into_iter().zip(answers) {
                let _ = reply.send(answer);
            }
        }
        let mut results = Vec::with_capacity(commits.len());
        for batch in batches(&commits) {
            results.extend(write_batch(&pool, batch).await);
        }
        let mut results = results.into_iter();
        for (reply, count) in replies {
            // The caller may have gone away (its request was dropped): nothing to tell.
            let _ = reply.send(results.by_ref().take(count).collect());
        }
    }
}

/// Write `news` in one transaction: one multi-row insert that skips any whose id or
/// idempotency key is taken, then the written ones' steps, outbox rows, timers, deliveries and
/// audit events. Any
/// failure writes nothing and sends every create back to be written alone.
async fn write_creates(pool: &AnyPool, news: &[NewInstance]) -> Vec<Created> {
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
        let recs: Vec<_> = new.iter().map(|n| &n.rec).collect();
        upsert_steps(&mut tx, &recs).await?;
        let outbox: Vec<_> = new.iter().flat_map(|n| n.outbox.clone()).collect();
        insert_outbox(&mut tx, &outbox).await?;
        let timers: Vec<_> = new.iter().flat_map(|n| n.timers.clone()).collect();
        crate::timers::insert_timers(&mut tx, &timers).await?;
        let deliveries: Vec<_> = new.iter().flat_map(|n| n.deliveries.clone()).collect();
        crate::notifications::insert_deliveries(&mut tx, &deliveries).await?;
        let events: Vec<_> = new
            .iter()
            .flat_map(|n| n.audit.iter().map(|d| (n.rec.info.partner_id.as_str(), d)))
            .collect();
        // A new instance's events start their stream: no head to read. Were one there, the
        // insert would fail on the stream's key and the creates be written alone.
        insert_chained(&mut tx, &events, HashMap::new()).await?;
        tx.commit().await?;
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
async fn write_batch(pool: &AnyPool, commits: &[InstanceCommit]) -> Vec<Result<(), StoreError>> {
    // A lone commit too: its stream head comes with the `UPDATE`, a statement less than the
    // plain path, which answers the same (and remains the fallback).
    let Ok(mut conn) = pool.acquire().await else {
        return commit_each(pool, Backend::Postgres, commits).await;
    };
    let written = match conn.begin().await {
        Ok(mut tx) => match write_many(&mut tx, commits).await {
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
    let recs: Vec<_> = written.iter().map(|c| &c.rec).collect();
    upsert_steps(conn, &recs).await?;
    let outbox: Vec<_> = written.iter().flat_map(|c| c.outbox.clone()).collect();
    insert_outbox(conn, &outbox).await?;
    let timers: Vec<_> = written.iter().flat_map(|c| c.timers.clone()).collect();
    crate::timers::insert_timers(conn, &timers).await?;
    let deliveries: Vec<_> = written.iter().flat_map(|c| c.deliveries.clone()).collect();
    crate::notifications::insert_deliveries(conn, &deliveries).await?;
    let events: Vec<_> = written
        .iter()
        .flat_map(|c| c.audit.iter().map(|d| (c.rec.info.partner_id.as_str(), d)))
        .collect();
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
    insert_chained(conn, &events, found).await?;
    // In the approval pool's process nearly every commit applies a decision: one statement
    // records (and announces) all of the group's.
    let decisions: Vec<_> = written.iter().filter_map(|c| c.decision.as_ref()).collect();
    crate::approvals::insert_outcomes(conn, &decisions).await?;
    Ok(refused)
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
         LEFT JOIN LATERAL (SELECT a.seq, a.hash FROM audit_events a \
         WHERE a.partner_id = v.partner_id AND a.stream = v.stream \
         ORDER BY a.seq DESC LIMIT 1) AS h ON true \
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
    use workflow_core::instance::{ActorRef, ActorType, InstanceInfo, InstanceState};
    use workflow_core::{InstanceStatus, Timestamp};

    use super::*;
    use crate::records::{verify_audit_chain, AuditDraft, InstanceRecord};
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

    fn instance() -> InstanceRecord {
        InstanceRecord {
            info: InstanceInfo {
                id: uuid::Uuid::now_v7().to_string(),
                partner_id: "p1".into(),
                template_id: "t1".into(),
                template_version: 1,
                created_at: Timestamp(1_000),
                created_by: ActorRef {
                    id: "u".into(),
                    actor_type: ActorType::Human,
                },
                trigger: json!({}),
                mode: Default::default(),
            },
            idempotency_key: None,
            state: InstanceState {
                status: InstanceStatus::Running,
                current_step: None,
                waiting_on: None,
                steps: vec![],
                error: None,
                finished_at: None,
            },
            updated_at: Timestamp(1_000),
            version: 1,
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
        let refused = write_many(&mut tx, &commits).await?;
        assert!(refused.iter().all(Option::is_none), "{refused:?}");
        tx.commit().await?;

        for (stream, events) in [(&old_stream, 4), (&new_stream, 2)] {
            let trail = store.list_audit("p1", stream).await?;
            assert_eq!(verify_audit_chain(&trail), Ok(events), "{stream}");
        }
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_group_writes_only_the_creates_whose_template_head_held(
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let store = Store::connect(&workflow_testkit::postgres_url().await?).await?;
        store.migrate().await?;
        let draft = event("template:t", 0);
        let template = |id: &str| crate::records::TemplateRecord {
            id: id.into(),
            partner_id: "p1".into(),
            version: 1,
            name: "t".into(),
            trigger_type: "manual".into(),
            active: true,
            doc: json!({"name": "t", "steps": []}),
            created_at: Timestamp(1),
            created_by: "u".into(),
        };
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
        let created = write_creates(store.write_pool(), &news).await;
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

    fn new_id() -> String {
        uuid::Uuid::now_v7().to_string()
    }
}
