//! The rows a PostgreSQL group writes, in ONE statement.
//!
//! A group commit's steps, outbox messages, audit events, timers, notification deliveries and
//! decision outcomes each had a multi-row statement of their own: up to six round trips inside
//! the transaction, and as many statement texts as there are row counts (sqlx's per-connection
//! cache of prepared statements kept missing them, re-parsing each). Here every table's rows
//! travel as one JSON array parameter, unpacked by `json_to_recordset`, and each table's insert
//! is a data-modifying CTE of a single statement whose text does not depend on the row counts:
//! one round trip, one prepared statement per connection and form. The timers', deliveries' and
//! outcomes' CTEs are left out when the group has none of those rows (an empty CTE still opens
//! and locks its table and indexes), so each form has 8 texts. Two forms:
//! - [`write_rows`]: the rows alone, inside the group's transaction, after the statement that
//!   decided what is written (the version-checked `UPDATE` or the instances' insert);
//! - [`write_commits`]: the version-checked `UPDATE` too, as the first CTE, with each table's
//!   rows limited to the instances it updated: the whole group, atomic without a transaction.
//!
//! Either fails whole, so a failure still writes nothing of the group.

use serde::Serialize;
use sqlx::AnyConnection;
use workflow_core::StepExecution;

use crate::audit_blocks;
use crate::commit::InstanceCommit;
use crate::listen::DECISION_OUTCOMES_CHANNEL;
use crate::notifications::NewDelivery;
use crate::queries::{chain_audits, to_json, STEP_CONFLICT};
use crate::records::{AuditDraft, DecisionOutcome, InstanceRecord, OutboxMessage, TimerRecord};
use crate::step_mirror::{changed, step_mirror, StepMirror};
use crate::StoreError;

/// What one group writes besides its instances' rows.
#[derive(Debug, Default)]
pub(crate) struct GroupRows<'a> {
    pub(crate) recs: Vec<&'a InstanceRecord>,
    /// Per record (when known): its step mirror as stored now, so
    /// only the steps that changed are written.
    pub(crate) stored_steps: Vec<Option<StepMirror>>,
    /// (instance, message), in commit order.
    pub(crate) outbox: Vec<(&'a str, &'a OutboxMessage)>,
    /// (instance, partner, draft), in order per stream.
    pub(crate) events: Vec<(&'a str, &'a str, &'a AuditDraft)>,
    pub(crate) timers: Vec<&'a TimerRecord>,
    pub(crate) deliveries: Vec<&'a NewDelivery>,
    pub(crate) decisions: Vec<&'a DecisionOutcome>,
}

impl<'a> GroupRows<'a> {
    /// Everything `commits` write besides their instances' rows.
    pub(crate) fn of_commits(commits: &[&'a InstanceCommit]) -> GroupRows<'a> {
        let mut rows = GroupRows::default();
        for c in commits {
            rows.add(
                &c.rec,
                &c.outbox,
                &c.audit,
                &c.timers,
                &c.deliveries,
                c.decision.as_ref(),
            );
        }
        rows
    }

    pub(crate) fn add(
        &mut self,
        rec: &'a InstanceRecord,
        outbox: &'a [OutboxMessage],
        audit: &'a [AuditDraft],
        timers: &'a [TimerRecord],
        deliveries: &'a [NewDelivery],
        decision: Option<&'a DecisionOutcome>,
    ) {
        self.recs.push(rec);
        self.stored_steps.push(None);
        let id = rec.info.id.as_str();
        self.outbox.extend(outbox.iter().map(|m| (id, m)));
        let partner = rec.info.partner_id.as_str();
        self.events.extend(audit.iter().map(|d| (id, partner, d)));
        self.timers.extend(timers);
        self.deliveries.extend(deliveries);
        self.decisions.extend(decision);
    }

    /// (partner, draft) of every event, as `chain_audits` takes them.
    pub(crate) fn drafts(&self) -> Vec<(&'a str, &'a AuditDraft)> {
        self.events.iter().map(|&(_, p, d)| (p, d)).collect()
    }
}

/// The head each stream has after `rows` were written on `heads` (streams without events in
/// `rows` are not named).
pub(crate) type Heads<'a> = std::collections::HashMap<&'a str, (i64, String)>;

/// One step mirror row of `rec`, as JSON.
fn step_row_json(rec: &InstanceRecord, step: &StepExecution) -> Result<String, StoreError> {
    // The same row the SQLite writer binds.
    let step = crate::sqlite_writer::step_row(step)?;
    let row = StepRow {
        instance_id: rec.info.id.as_str(),
        partner_id: rec.info.partner_id.as_str(),
        step: &step,
    };
    serde_json::to_string(&row)
        .map_err(|e| StoreError::corrupt(format!("cannot encode a step row: {e}")))
}

/// Which of the rarely used tables a statement writes: a data-modifying CTE costs its
/// statement the opening and locking of its table and indexes even when its array is empty,
/// so each combination is a statement of its own (8 texts, each prepared once per connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Optional {
    timers: bool,
    deliveries: bool,
    outcomes: bool,
}

impl Optional {
    const ALL: [Optional; 8] = {
        let mut all = [Optional {
            timers: false,
            deliveries: false,
            outcomes: false,
        }; 8];
        let mut i = 0;
        while i < 8 {
            all[i] = Optional {
                timers: i & 1 != 0,
                deliveries: i & 2 != 0,
                outcomes: i & 4 != 0,
            };
            i += 1;
        }
        all
    };

    fn of(arrays: &Arrays) -> Optional {
        Optional {
            timers: arrays.timers != EMPTY,
            deliveries: arrays.deliveries != EMPTY,
            outcomes: arrays.outcomes != EMPTY,
        }
    }

    fn index(self) -> usize {
        usize::from(self.timers)
            | usize::from(self.deliveries) << 1
            | usize::from(self.outcomes) << 2
    }
}

/// An empty JSON array.
const EMPTY: &str = "[]";

/// The inserts of [`write_rows`] as data-modifying CTEs over JSON array parameters, from `$p`
/// on, in [`Arrays::bind`]'s order (steps, outbox, audit, the audit documents, then timers,
/// deliveries, outcomes and the channel when `optional` has them). With `updated` (the name of
/// a CTE returning `id`), only the rows of those instances are written. Ends with a CTE
/// `notified` counting the outcomes announced.
fn insert_ctes(p: usize, updated: Option<&str>, optional: Optional) -> String {
    let only_r = match updated {
        Some(u) => format!(" WHERE r.instance_id IN (SELECT id FROM {u})"),
        None => String::new(),
    };
    let mut next = p + 4;
    let mut param = || {
        next += 1;
        next - 1
    };
    let mut sql = format!(
        "steps AS (INSERT INTO workflow_step_executions (instance_id, step_index, partner_id, \
         name, step_type, status, started_at, finished_at, actor, input, output, error) \
         SELECT instance_id, step_index, partner_id, name, step_type, status, started_at, \
         finished_at, actor, input, output, error FROM json_to_recordset(${steps}::json) AS r(\
         instance_id text, step_index bigint, partner_id text, name text, step_type text, \
         status text, started_at bigint, finished_at bigint, actor text, input text, \
         output text, error text){only_r} {STEP_CONFLICT}), \
         messages AS (INSERT INTO outbox (id, topic, msg_key, payload) \
         SELECT id, topic, msg_key, decode(payload, 'base64') FROM json_to_recordset(${outbox}::json) \
         AS r(n bigint, instance_id text, id text, topic text, msg_key text, payload text){only_r} \
         ORDER BY n), \
         events AS (INSERT INTO audit_blocks (stream, first_seq, last_seq, partner_id, \
         last_hash, events) \
         SELECT stream, first_seq, last_seq, partner_id, last_hash, events \
         FROM ROWS FROM (json_to_recordset(${audit}::json) AS (instance_id text, stream text, \
         first_seq bigint, last_seq bigint, partner_id text, last_hash text), \
         unnest(string_to_array(${documents}, chr(30)))) AS r(instance_id, stream, first_seq, \
         last_seq, partner_id, last_hash, events){only_r})",
        steps = p,
        outbox = p + 1,
        audit = p + 2,
        documents = p + 3,
    );
    if optional.timers {
        sql.push_str(&format!(
            ", due AS (INSERT INTO timers (id, partner_id, instance_id, step_index, step_type, \
             kind, due_at) SELECT id, partner_id, instance_id, step_index, step_type, kind, \
             due_at FROM json_to_recordset(${timers}::json) AS r(id text, partner_id text, \
             instance_id text, step_index bigint, step_type text, kind text, due_at bigint)\
             {only_r} ON CONFLICT (id) DO NOTHING)",
            timers = param(),
        ));
    }
    if optional.deliveries {
        sql.push_str(&format!(
            ", sends AS (INSERT INTO notification_deliveries (id, partner_id, instance_id, \
             step_index, purpose, channel, target, request, wait, status, attempts, \
             round_failures, next_check_at, created_at, updated_at) \
             SELECT id, partner_id, instance_id, step_index, purpose, channel, target, request, \
             wait, 'queued', 0, 0, next_check_at, created_at, created_at \
             FROM json_to_recordset(${deliveries}::json) AS r(id text, partner_id text, \
             instance_id text, step_index bigint, purpose text, channel text, target text, \
             request text, wait bigint, next_check_at bigint, created_at bigint){only_r} \
             ON CONFLICT (id) DO NOTHING)",
            deliveries = param(),
        ));
    }
    if optional.outcomes {
        let outcomes = param();
        sql.push_str(&format!(
            ", outcomes AS (INSERT INTO approval_decisions (decision_id, partner_id, \
             instance_id, step_index, accepted, code, message, decided_at) \
             SELECT decision_id, partner_id, instance_id, step_index, accepted, code, message, \
             decided_at FROM json_to_recordset(${outcomes}::json) AS r(decision_id text, \
             partner_id text, instance_id text, step_index integer, accepted bigint, code text, \
             message text, decided_at bigint){only_r} \
             ON CONFLICT (decision_id) DO NOTHING RETURNING decision_id, accepted), \
             notified AS (SELECT pg_notify(${channel}, decision_id || CASE WHEN accepted = 1 \
             THEN ' accepted' ELSE ' refused' END)::text AS n FROM outcomes \
             WHERE octet_length(decision_id) < 7990)",
            channel = param(),
        ));
    } else {
        sql.push_str(", notified AS (SELECT NULL::text AS n WHERE false)");
    }
    sql
}

/// Every table's rows in one statement ([`insert_ctes`]), announcing each decision outcome
/// inserted (as `approvals.rs` does, so a waiting API call wakes).
fn write_rows_sql(optional: Optional) -> &'static str {
    static SQL: std::sync::LazyLock<[String; 8]> = std::sync::LazyLock::new(|| {
        Optional::ALL.map(|o| format!("WITH {} SELECT n FROM notified", insert_ctes(1, None, o)))
    });
    SQL[optional.index()].as_str()
}

/// One group's whole commit in one statement, without a transaction around it: the
/// version-checked `UPDATE` of every instance (`$1`, a JSON array), then [`insert_ctes`] for
/// the instances it updated only. Returns the ids updated (and announces their outcomes: the
/// scalar subquery runs once, when the first id is returned; with none, no outcome was
/// written).
///
/// The `= ANY` of the ids keeps the `UPDATE` on the primary key. The planner takes any
/// set-returning function for 100 rows, so joined on `json_to_recordset` alone, 100 probes
/// cost more than reading a table of a few thousand instances whole, and every group read
/// every instance (round 23 in docs/benchmarks.md). An `= ANY` of an array the planner cannot
/// see is taken for 10 elements, and the keyed pool's sessions never plan a scan.
fn write_commits_sql(optional: Optional) -> &'static str {
    static SQL: std::sync::LazyLock<[String; 8]> = std::sync::LazyLock::new(|| {
        Optional::ALL.map(|o| {
            format!(
                "WITH u AS (UPDATE workflow_instances AS w SET status = v.status, \
                 current_step = v.current_step, state = v.state, updated_at = v.updated_at, \
                 version = v.expected + 1 FROM ROWS FROM (json_to_recordset($1::json) AS (id text, \
                 partner_id text, status text, current_step bigint, updated_at bigint, \
                 expected bigint), unnest(string_to_array($2, chr(30)))) AS v(id, partner_id, \
                 status, current_step, updated_at, expected, state) \
                 WHERE w.id = ANY(ARRAY(SELECT json_array_elements($1::json) ->> 'id')) \
                 AND w.id = v.id AND w.partner_id = v.partner_id \
                 AND w.version = v.expected RETURNING w.id), {} \
                 SELECT u.id, (SELECT count(*) FROM notified) AS announced FROM u",
                insert_ctes(3, Some("u"), o)
            )
        })
    });
    SQL[optional.index()].as_str()
}

/// A step mirror row with its instance's keys.
#[derive(Serialize)]
struct StepRow<'a> {
    instance_id: &'a str,
    partner_id: &'a str,
    #[serde(flatten)]
    step: &'a crate::sqlite_writer::StepRow,
}

#[derive(Serialize)]
struct OutboxRow<'a> {
    n: usize,
    instance_id: &'a str,
    id: &'a str,
    topic: &'a str,
    msg_key: &'a str,
    payload: String,
}

/// An `audit_blocks` row (`audit_blocks.rs`).
#[derive(Serialize)]
struct AuditRow<'a> {
    instance_id: &'a str,
    stream: &'a str,
    first_seq: i64,
    last_seq: i64,
    partner_id: &'a str,
    last_hash: String,
}

#[derive(Serialize)]
struct TimerRow<'a> {
    id: &'a str,
    partner_id: &'a str,
    instance_id: &'a str,
    step_index: i64,
    step_type: &'a str,
    kind: &'a str,
    due_at: i64,
}

#[derive(Serialize)]
struct DeliveryRow<'a> {
    id: &'a str,
    partner_id: &'a str,
    instance_id: &'a str,
    step_index: i64,
    purpose: &'a str,
    channel: &'a str,
    target: &'a str,
    request: String,
    wait: i64,
    next_check_at: i64,
    created_at: i64,
}

#[derive(Serialize)]
struct OutcomeRow<'a> {
    decision_id: &'a str,
    partner_id: &'a str,
    instance_id: &'a str,
    step_index: i64,
    accepted: i64,
    code: Option<&'a str>,
    message: Option<&'a str>,
    decided_at: i64,
}

/// JSON documents joined by the ASCII record separator (U+001E), for `string_to_array($n,
/// chr(30))` zipped with a row set (`ROWS FROM`). A large document inside the rows' JSON cost
/// twice: escaped here, and unescaped by PostgreSQL 15's JSON lexer a character at a time
/// (3,000 states of ~1.7 KB: 126–150 ms through `json_to_recordset`, 38–42 ms this way).
/// Serialised JSON never holds a raw control character (every one is escaped), so the
/// separator cannot occur inside a document.
#[derive(Debug, Default)]
struct Documents {
    text: String,
    count: usize,
}

impl Documents {
    fn push(&mut self, document: &str) {
        if self.count > 0 {
            self.text.push('\u{1e}');
        }
        self.text.push_str(document);
        self.count += 1;
    }
}

fn json_array<T: Serialize>(rows: &[T]) -> Result<String, StoreError> {
    serde_json::to_string(rows)
        .map_err(|e| StoreError::corrupt(format!("cannot encode a group's rows: {e}")))
}

/// The JSON array parameters of `rows`, in [`insert_ctes`]' order, and each stream's head
/// after them.
fn encode<'a>(
    rows: &GroupRows<'a>,
    heads: Heads<'a>,
) -> Result<(Arrays, Heads<'a>, Vec<StepMirror>), StoreError> {
    use base64::Engine as _;
    // Only the step rows that differ from what is stored (every one when that is unknown):
    // compared as steps, so an unchanged one is not encoded at all.
    let mut steps = String::from("[");
    let mut mirrors = Vec::with_capacity(rows.recs.len());
    for (rec, stored) in rows.recs.iter().zip(&rows.stored_steps) {
        let now = step_mirror(rec, stored.as_ref());
        for step in changed(&now, stored.as_ref()) {
            if steps.len() > 1 {
                steps.push(',');
            }
            steps.push_str(&step_row_json(rec, step)?);
        }
        mirrors.push(now);
    }
    steps.push(']');
    let outbox: Vec<OutboxRow<'_>> = rows
        .outbox
        .iter()
        .enumerate()
        .map(|(n, (instance_id, m))| OutboxRow {
            n,
            instance_id,
            id: m.id.as_str(),
            topic: m.topic.as_str(),
            msg_key: m.key.as_str(),
            payload: base64::engine::general_purpose::STANDARD.encode(&m.payload),
        })
        .collect();
    let chained = chain_audits(&rows.drafts(), heads);
    let mut after = Heads::new();
    for (_, draft, seq, _, hash) in &chained {
        after.insert(draft.stream.as_str(), (*seq, hash.clone()));
    }
    let blocks = audit_blocks::chained_blocks(&chained, |i| {
        let (_, draft, ..) = &chained[i];
        (rows.events[i].0, chained[i].0, draft.stream.as_str())
    })?;
    let mut events = Vec::with_capacity(blocks.len());
    let mut documents = Documents::default();
    for ((instance_id, partner_id, stream), block) in blocks {
        documents.push(&block.events);
        events.push(AuditRow {
            instance_id,
            stream,
            first_seq: block.first_seq,
            last_seq: block.last_seq,
            partner_id,
            last_hash: block.last_hash,
        });
    }
    // Each id once, as the statements these replace wrote them.
    let mut seen = std::collections::HashSet::new();
    let timers: Vec<TimerRow<'_>> = rows
        .timers
        .iter()
        .filter(|t| seen.insert(t.id.as_str()))
        .map(|t| TimerRow {
            id: t.id.as_str(),
            partner_id: t.partner_id.as_str(),
            instance_id: t.instance_id.as_str(),
            step_index: t.step_index,
            step_type: t.step_type.as_str(),
            kind: t.kind.as_str(),
            due_at: t.due_at.0,
        })
        .collect();
    let mut seen = std::collections::HashSet::new();
    let mut deliveries = Vec::with_capacity(rows.deliveries.len());
    for d in rows
        .deliveries
        .iter()
        .filter(|d| seen.insert(d.id.as_str()))
    {
        deliveries.push(DeliveryRow {
            id: d.id.as_str(),
            partner_id: d.partner_id.as_str(),
            instance_id: d.instance_id.as_str(),
            step_index: d.step_index,
            purpose: d.purpose.as_str(),
            channel: d.channel.as_str(),
            target: d.target.as_str(),
            request: to_json(&d.request)?,
            wait: i64::from(d.wait),
            next_check_at: d.check_at.0,
            created_at: d.created_at.0,
        });
    }
    let mut seen = std::collections::HashSet::new();
    let outcomes: Vec<OutcomeRow<'_>> = rows
        .decisions
        .iter()
        .filter(|o| seen.insert(o.decision_id.as_str()))
        .map(|o| OutcomeRow {
            decision_id: o.decision_id.as_str(),
            partner_id: o.partner_id.as_str(),
            instance_id: o.instance_id.as_str(),
            step_index: o.step_index,
            accepted: i64::from(o.accepted),
            code: o.code.as_deref(),
            message: o.message.as_deref(),
            decided_at: o.decided_at.0,
        })
        .collect();
    Ok((
        Arrays {
            steps,
            outbox: json_array(&outbox)?,
            audit: json_array(&events)?,
            documents: documents.text,
            timers: json_array(&timers)?,
            deliveries: json_array(&deliveries)?,
            outcomes: json_array(&outcomes)?,
        },
        after,
        mirrors,
    ))
}

/// The parameters of [`insert_ctes`], encoded by [`encode`]: JSON arrays of rows, and the
/// audit blocks' documents beside theirs.
struct Arrays {
    steps: String,
    outbox: String,
    audit: String,
    documents: String,
    timers: String,
    deliveries: String,
    outcomes: String,
}

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

impl Arrays {
    /// Bind them after `query`'s first parameters, in [`insert_ctes`]' order for `optional`.
    fn bind(self, query: AnyQuery<'_>, optional: Optional) -> AnyQuery<'_> {
        let mut query = query
            .bind(self.steps)
            .bind(self.outbox)
            .bind(self.audit)
            .bind(self.documents);
        if optional.timers {
            query = query.bind(self.timers);
        }
        if optional.deliveries {
            query = query.bind(self.deliveries);
        }
        if optional.outcomes {
            query = query.bind(self.outcomes).bind(DECISION_OUTCOMES_CHANNEL);
        }
        query
    }
}

/// Write `rows` in one statement, each audit event chained onto its stream's head in `heads`
/// (a stream missing from it is new); returns the heads the written streams then have.
pub(crate) async fn write_rows<'a>(
    conn: &mut AnyConnection,
    rows: &GroupRows<'a>,
    heads: Heads<'a>,
) -> Result<(Heads<'a>, Vec<StepMirror>), StoreError> {
    let (arrays, after, mirrors) = encode(rows, heads)?;
    let optional = Optional::of(&arrays);
    arrays
        .bind(sqlx::query(write_rows_sql(optional)), optional)
        .fetch_all(&mut *conn)
        .await?;
    Ok((after, mirrors))
}

#[derive(Serialize)]
struct UpdateRow<'a> {
    id: &'a str,
    partner_id: &'a str,
    status: &'a str,
    current_step: Option<i64>,
    updated_at: i64,
    expected: i64,
}

/// Write `commits` (distinct instances, each audit stream's head known: `heads`, and the
/// steps of its stored step rows: `stored`, in order) in ONE statement, outside any
/// transaction: each commit whose expected version still matches is written whole (its
/// changed step rows), the others not at all. Returns the ids written, the heads their
/// streams then have, and each commit's step mirror after it.
pub(crate) async fn write_commits<'a>(
    conn: &mut AnyConnection,
    commits: &[&'a InstanceCommit],
    heads: Heads<'a>,
    stored: Vec<Option<StepMirror>>,
) -> Result<
    (
        std::collections::HashSet<String>,
        Heads<'a>,
        Vec<StepMirror>,
    ),
    StoreError,
> {
    let mut updates = Vec::with_capacity(commits.len());
    let mut states = Documents::default();
    for c in commits {
        let rec = &c.rec;
        states.push(&to_json(&rec.state)?);
        updates.push(UpdateRow {
            id: rec.info.id.as_str(),
            partner_id: rec.info.partner_id.as_str(),
            status: rec.state.status.as_str(),
            current_step: rec.state.current_step.map(|s| s as i64),
            updated_at: rec.updated_at.0,
            expected: c.expected_version,
        });
    }
    let mut rows = GroupRows::of_commits(commits);
    rows.stored_steps = stored;
    let (arrays, after, mirrors) = encode(&rows, heads)?;
    let optional = Optional::of(&arrays);
    let query = sqlx::query(write_commits_sql(optional))
        .bind(json_array(&updates)?)
        .bind(states.text);
    let mut written = std::collections::HashSet::new();
    for row in arrays.bind(query, optional).fetch_all(&mut *conn).await? {
        written.insert(sqlx::Row::try_get::<String, _>(&row, "id")?);
    }
    Ok((written, after, mirrors))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every statement text with the number of parameters its binds supply.
    fn statements() -> Vec<(&'static str, usize)> {
        let mut all = Vec::new();
        for o in Optional::ALL {
            let optional = usize::from(o.timers) + usize::from(o.deliveries);
            let outcomes = if o.outcomes { 2 } else { 0 };
            all.push((write_rows_sql(o), 4 + optional + outcomes));
            all.push((write_commits_sql(o), 2 + 4 + optional + outcomes));
        }
        all
    }

    fn placeholders(sql: &str) -> std::collections::BTreeSet<usize> {
        let mut found = std::collections::BTreeSet::new();
        let bytes = sql.as_bytes();
        for (i, b) in bytes.iter().enumerate() {
            if *b == b'$' {
                let digits: String = sql[i + 1..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                if let Ok(n) = digits.parse() {
                    found.insert(n);
                }
            }
        }
        found
    }

    #[test]
    fn each_statement_reads_exactly_the_parameters_bound() {
        for (sql, bound) in statements() {
            let expected: std::collections::BTreeSet<usize> = (1..=bound).collect();
            assert_eq!(placeholders(sql), expected, "{sql}");
        }
        // The variants differ: an optional table's CTE is there only when it has rows.
        let none = Optional::ALL[0];
        let all = Optional::ALL[7];
        assert!(!write_commits_sql(none).contains("INSERT INTO timers"));
        assert!(!write_commits_sql(none).contains("pg_notify"));
        assert!(write_commits_sql(all).contains("INSERT INTO notification_deliveries"));
        assert!(write_commits_sql(all).contains("pg_notify"));
    }

    /// PostgreSQL parses and plans every text against the migrated schema.
    #[tokio::test]
    async fn postgres_prepares_every_statement() -> Result<(), Box<dyn std::error::Error>> {
        use sqlx::{Connection, Executor};
        let url = workflow_testkit::postgres_url().await?;
        let store = crate::Store::connect(&url).await?;
        store.migrate().await?;
        // The native driver: sqlx's `Any` cannot describe a `json` parameter.
        let mut conn = sqlx::PgConnection::connect(&url).await?;
        for (sql, bound) in statements() {
            let prepared = conn.prepare(sql).await?;
            let params = sqlx::Statement::parameters(&prepared).map(|p| match p {
                sqlx::Either::Left(types) => types.len(),
                sqlx::Either::Right(n) => n,
            });
            assert_eq!(params, Some(bound), "{sql}");
        }
        Ok(())
    }
}
