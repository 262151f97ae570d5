//! The SQL of approvals: decision outcomes, queued commands, and the pending-approval scan.

use sqlx::Row;
use workflow_core::Timestamp;

use crate::listen::DECISION_OUTCOMES_CHANNEL;
use crate::queries::{from_json, insert_outbox, values_placeholders, Arg, Args, ROWS_PER_INSERT};
use crate::records::{DecisionOutcome, OutboxMessage, WaitingApproval, WaitingFilter};
use crate::sqlite_writer::Write;
use crate::{Backend, Store, StoreError};

const RECORD_OUTCOME: &str = "INSERT INTO approval_decisions \
     (decision_id, partner_id, instance_id, step_index, accepted, code, message, decided_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (decision_id) DO NOTHING";

/// [`RECORD_OUTCOME`] for `rows` outcomes (`$1`...: eight per outcome, then the channel) that
/// also announces each one inserted on [`DECISION_OUTCOMES_CHANNEL`], so an API call waiting
/// for it in another process wakes at once (see `listen.rs`). The payload is the decision id
/// and whether it was accepted (`<id> accepted` / `<id> refused`): a call woken for an accepted
/// decision answers without reading the outcome back. One statement: no extra round trip, and
/// PostgreSQL delivers the notifications only if the insert commits. A redelivered command
/// whose outcome exists inserts nothing and announces nothing (its waiter already found the
/// outcome). `::text`: `pg_notify` returns `void`, which the `Any` driver cannot decode. Ids
/// too long for a payload (never: the engine makes UUIDs) are not announced rather than failing
/// the insert with "payload string too long".
fn record_outcomes_and_notify_sql(rows: usize) -> String {
    format!(
        "WITH ins AS (INSERT INTO approval_decisions \
         (decision_id, partner_id, instance_id, step_index, accepted, code, message, decided_at) \
         VALUES {} ON CONFLICT (decision_id) DO NOTHING RETURNING decision_id, accepted) \
         SELECT pg_notify(${}, decision_id || CASE WHEN accepted = 1 THEN ' accepted' ELSE ' refused' END)::text \
         FROM ins WHERE octet_length(decision_id) < 7990",
        values_placeholders(rows, OUTCOME_WIDTH),
        rows * OUTCOME_WIDTH + 1
    )
}

/// Parameters of one outcome in [`RECORD_OUTCOME`]'s VALUES.
const OUTCOME_WIDTH: usize = 8;

impl Store {
    /// Queue messages that change no state (e.g. a decision command), in one transaction.
    pub async fn enqueue(&self, messages: &[OutboxMessage]) -> Result<(), StoreError> {
        if let Some(committer) = &self.committer {
            return committer
                .submit(Write::Enqueue(messages.to_vec()))
                .await
                .map(|_| ());
        }
        if messages.len() <= crate::queries::ROWS_PER_INSERT {
            // One statement is atomic by itself: no BEGIN and COMMIT round trips around it.
            let mut conn = self.write_pool().acquire().await?;
            return insert_outbox(&mut conn, messages).await;
        }
        let mut tx = self.begin_write().await?;
        insert_outbox(&mut tx, messages).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Record a decision's outcome. The first outcome recorded for a decision id stands: a
    /// redelivered command cannot overwrite it. On PostgreSQL a newly recorded outcome is also
    /// announced to [`crate::DecisionListener`]s, on commit.
    pub async fn record_decision_outcome(&self, o: &DecisionOutcome) -> Result<(), StoreError> {
        if let Some(committer) = &self.committer {
            return committer
                .submit(Write::Decision(o.clone()))
                .await
                .map(|_| ());
        }
        let mut conn = self.write_pool().acquire().await?;
        insert_outcome(&mut conn, o).await
    }

    pub async fn get_decision_outcome(
        &self,
        partner_id: &str,
        decision_id: &str,
    ) -> Result<Option<DecisionOutcome>, StoreError> {
        if let Some(readers) = &self.readers {
            return readers.decision_outcome(partner_id, decision_id);
        }
        let row = sqlx::query(
            "SELECT decision_id, partner_id, instance_id, step_index, accepted, code, message, \
             decided_at FROM approval_decisions WHERE partner_id = $1 AND decision_id = $2",
        )
        .bind(partner_id)
        .bind(decision_id)
        .fetch_optional(self.pool())
        .await?;
        row.map(|r| {
            Ok(DecisionOutcome {
                decision_id: r.try_get("decision_id")?,
                partner_id: r.try_get("partner_id")?,
                instance_id: r.try_get("instance_id")?,
                step_index: r.try_get("step_index")?,
                accepted: r.try_get::<i64, _>("accepted")? != 0,
                code: r.try_get("code")?,
                message: r.try_get("message")?,
                decided_at: Timestamp(r.try_get("decided_at")?),
            })
        })
        .transpose()
    }

    /// The partner's approval steps waiting for a decision, oldest wait first, as `filter`
    /// narrows them. Each comes without its instance's state ([`Store::get_instances`] reads
    /// the ones the caller keeps): an inbox that can list few of many waiting steps reads
    /// only those.
    pub async fn list_waiting_approvals(
        &self,
        partner_id: &str,
        filter: &WaitingFilter,
    ) -> Result<Vec<WaitingApproval>, StoreError> {
        let (sql, args) = waiting_approvals_query(self.backend, partner_id, filter);
        let rows = args.bind(&sql).fetch_all(self.pool()).await?;
        let mut waiting = Vec::with_capacity(rows.len());
        for r in &rows {
            // Never another partner's: the step rows are written from their instances.
            if r.try_get::<String, _>("partner_id")? != partner_id {
                continue;
            }
            let instance_id: String = r.try_get("instance_id")?;
            let trigger: String = r.try_get("trigger_data")?;
            waiting.push(WaitingApproval {
                trigger: from_json(&trigger, &format!("instance {instance_id}'s trigger"))?,
                instance_id,
                template_id: r.try_get("template_id")?,
                template_version: r.try_get("template_version")?,
                step_index: r.try_get("step_index")?,
                since: Timestamp(r.try_get::<Option<i64>, _>("started_at")?.unwrap_or(0)),
            });
        }
        Ok(waiting)
    }
}

/// [`Store::list_waiting_approvals`]' statement and its parameters.
fn waiting_approvals_query(
    backend: Backend,
    partner_id: &str,
    filter: &WaitingFilter,
) -> (String, Args) {
    let mut args = Args::default();
    // Each step row's instance must be found by its id. PostgreSQL's planner, on statistics
    // that do not know the partner or the table's size yet (a partner's first minutes), took
    // the join for one row and probed the partner's, or every active, instance once per step
    // row: 70–95 ms a statement over 5,000 waiting steps, seconds for an empty inbox. A
    // LATERAL subquery kept apart (`OFFSET 0`) leaves it the primary key only. SQLite has no
    // LATERAL and finds them by id anyway. The partner is checked on each row read.
    let instance = match backend {
        Backend::Postgres => {
            "CROSS JOIN LATERAL (SELECT partner_id, template_id, template_version, \
             trigger_data, status FROM workflow_instances WHERE id = s.instance_id OFFSET 0) i"
        }
        Backend::Sqlite => "JOIN workflow_instances i ON i.id = s.instance_id",
    };
    let mut sql = format!(
        "SELECT s.instance_id, s.step_index, s.started_at, i.partner_id, i.template_id, \
         i.template_version, i.trigger_data FROM workflow_step_executions s {instance} \
         WHERE s.partner_id = {} AND s.step_type = 'approval' AND s.status = 'waiting' \
         AND i.status = 'waiting'",
        args.push(Arg::Text(partner_id.to_string()))
    );
    if let Some(template_id) = &filter.template_id {
        args.and(&mut sql, "i.template_id =", Arg::Text(template_id.clone()));
    }
    if let Some(at_most) = filter.waiting_since_at_most {
        args.and(&mut sql, "s.started_at <=", Arg::Int(at_most.0));
    }
    if let Some((since, id)) = &filter.after {
        let t = args.push(Arg::Int(since.0));
        let i = args.push(Arg::Text(id.clone()));
        // A row comparison: the index on (partner, started_at, instance) seeks to it.
        sql.push_str(&format!(" AND (s.started_at, s.instance_id) > ({t}, {i})"));
    }
    sql.push_str(" ORDER BY s.started_at ASC, s.instance_id ASC");
    args.limit(&mut sql, filter.limit);
    (sql, args)
}

/// Insert a decision outcome (the first one for a decision id stands), announcing it on
/// PostgreSQL (see [`record_outcomes_and_notify_sql`]; in a transaction, on its commit).
pub(crate) async fn insert_outcome(
    conn: &mut sqlx::AnyConnection,
    o: &DecisionOutcome,
) -> Result<(), StoreError> {
    insert_outcomes(conn, &[o]).await
}

/// [`insert_outcome`] for several: on PostgreSQL one statement per [`ROWS_PER_INSERT`]
/// outcomes (a group commit's decisions: in the approval pool nearly every commit carries
/// one), on SQLite one statement each.
pub(crate) async fn insert_outcomes(
    conn: &mut sqlx::AnyConnection,
    outcomes: &[&DecisionOutcome],
) -> Result<(), StoreError> {
    if Backend::from_connection(conn) != Backend::Postgres {
        for o in outcomes {
            bind_outcome(sqlx::query(RECORD_OUTCOME), o)
                .execute(&mut *conn)
                .await?;
        }
        return Ok(());
    }
    for chunk in outcomes.chunks(ROWS_PER_INSERT) {
        let sql = record_outcomes_and_notify_sql(chunk.len());
        let mut q = sqlx::query(&sql);
        for o in chunk {
            q = bind_outcome(q, o);
        }
        q.bind(DECISION_OUTCOMES_CHANNEL)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

/// `o`'s eight parameters, in [`RECORD_OUTCOME`]'s order.
fn bind_outcome<'q>(q: AnyQuery<'q>, o: &'q DecisionOutcome) -> AnyQuery<'q> {
    q.bind(o.decision_id.as_str())
        .bind(o.partner_id.as_str())
        .bind(o.instance_id.as_str())
        .bind(o.step_index)
        .bind(i64::from(o.accepted))
        .bind(o.code.as_deref())
        .bind(o.message.as_deref())
        .bind(o.decided_at.0)
}

#[cfg(test)]
mod tests {
    use workflow_core::instance::{StepExecution, StepStatus};
    use workflow_core::template::StepType;
    use workflow_core::InstanceStatus;

    use super::*;
    use crate::fixtures;

    /// An instance of partner `p1` whose step 0, an approval, waits since `since`.
    fn waiting(since: i64) -> crate::InstanceRecord {
        let mut rec = fixtures::instance();
        rec.state.status = InstanceStatus::Waiting;
        rec.state.current_step = Some(0);
        rec.state.steps = vec![StepExecution {
            index: 0,
            name: "approve".into(),
            step_type: StepType::Approval,
            status: StepStatus::Waiting,
            started_at: Some(Timestamp(since)),
            finished_at: None,
            actor: None,
            input: None,
            output: None,
            error: None,
            decisions: vec![],
            escalations: 0,
        }];
        rec
    }

    /// On a database PostgreSQL has no statistics of yet (a partner's first waiting steps),
    /// each waiting step's instance is found by its id: not by probing the partner's waiting
    /// instances once per step row, which made an inbox over 5,000 waiting steps take seconds.
    /// And the pages, read after the cursor, hold every waiting step once, oldest first.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiting_steps_page_in_order_and_join_their_instances_by_id(
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let url = workflow_testkit::postgres_url().await?;
        let store = Store::connect(&url).await?;
        store.migrate().await?;
        let mut recs = Vec::new();
        for n in 0..120 {
            let rec = waiting(10_000 + n / 3);
            store.create_instance(&rec, &[], &[]).await?;
            recs.push(rec);
        }
        recs.sort_by(|a, b| {
            let since = |r: &crate::InstanceRecord| r.state.steps[0].started_at;
            (since(a), &a.info.id).cmp(&(since(b), &b.info.id))
        });

        let mut filter = WaitingFilter {
            limit: 50,
            ..WaitingFilter::default()
        };
        let mut seen = Vec::new();
        loop {
            let page = store.list_waiting_approvals("p1", &filter).await?;
            let Some(last) = page.last() else { break };
            filter.after = Some((last.since, last.instance_id.clone()));
            seen.extend(page.iter().map(|w| w.instance_id.clone()));
        }
        let expected: Vec<String> = recs.iter().map(|r| r.info.id.clone()).collect();
        assert_eq!(seen, expected);
        assert!(store
            .list_waiting_approvals("p2", &WaitingFilter::default())
            .await?
            .is_empty());

        let mut filter = WaitingFilter {
            limit: 50,
            after: Some((Timestamp(10_010), recs[30].info.id.clone())),
            ..WaitingFilter::default()
        };
        filter.template_id = Some("t1".into());
        let (sql, args) = waiting_approvals_query(store.backend(), "p1", &filter);
        let explain = format!("EXPLAIN {sql}");
        let plan: Vec<String> = args
            .bind(&explain)
            .fetch_all(store.pool())
            .await?
            .iter()
            .map(|row| row.try_get::<String, _>(0))
            .collect::<Result<_, _>>()?;
        let plan = plan.join("\n");
        assert!(
            plan.contains("Index Scan using workflow_instances_pkey on workflow_instances"),
            "{plan}"
        );
        assert!(plan.contains("Index Cond: (id = s.instance_id)"), "{plan}");
        store.close().await;
        Ok(())
    }
}
