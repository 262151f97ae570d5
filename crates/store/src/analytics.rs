//! Workflow analytics (spec story 29.11): how many instances of each template ended how, how
//! long they took, and which steps hold them up, aggregated in SQL.
//!
//! Two grouped statements, one implementation for both backends: instances by template and
//! status, and step executions by template, step and status. Durations are BIGINT arithmetic
//! on the millisecond columns; sums are cast back to BIGINT because PostgreSQL widens them to
//! `numeric`, which the `Any` driver cannot decode. What the rows mean (completion rates,
//! averages) is the caller's to compute.

use sqlx::Row;
use workflow_core::Timestamp;

use crate::queries::{Arg, Args};
use crate::{Store, StoreError};

/// Which instances the aggregates cover: one partner's, optionally of one template, created
/// in an inclusive range.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AnalyticsFilter {
    pub template_id: Option<String>,
    pub created_from: Option<Timestamp>,
    pub created_to: Option<Timestamp>,
}

/// Sum, count and maximum of a set of durations, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DurationTotals {
    /// How many durations were known (both ends recorded).
    pub count: i64,
    pub sum_ms: i64,
    pub max_ms: Option<i64>,
}

/// The instances of one template in one status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceAggregate {
    pub template_id: String,
    /// An `InstanceStatus` as stored (`completed`, `waiting`, ...).
    pub status: String,
    pub count: i64,
    /// Creation to last change: for a terminal status, how long the instances took.
    pub duration: DurationTotals,
}

/// The executions of one step of one template in one status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepAggregate {
    pub template_id: String,
    pub step_index: i64,
    pub name: String,
    pub step_type: String,
    /// A `StepStatus` as stored.
    pub status: String,
    pub count: i64,
    /// Start to finish, for the executions that have both.
    pub duration: DurationTotals,
    /// The earliest start among them: for a waiting status, how long the oldest has waited.
    pub oldest_started_at: Option<Timestamp>,
}

/// What [`Store::analytics`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Analytics {
    /// Ordered by template id, then status.
    pub instances: Vec<InstanceAggregate>,
    /// Ordered by template id, step index, then status.
    pub steps: Vec<StepAggregate>,
}

impl Store {
    /// The partner's instance and step aggregates under `filter`.
    pub async fn analytics(
        &self,
        partner_id: &str,
        filter: &AnalyticsFilter,
    ) -> Result<Analytics, StoreError> {
        let (args, instance_sql) = filtered(
            partner_id,
            filter,
            "SELECT i.template_id, i.status, COUNT(*) AS n, \
             COUNT(i.updated_at - i.created_at) AS timed, \
             CAST(COALESCE(SUM(i.updated_at - i.created_at), 0) AS BIGINT) AS total, \
             MAX(i.updated_at - i.created_at) AS longest \
             FROM workflow_instances i WHERE i.partner_id = $1",
            " GROUP BY i.template_id, i.status ORDER BY i.template_id, i.status",
        );
        let rows = args.bind(&instance_sql).fetch_all(self.pool()).await?;
        let mut instances = Vec::with_capacity(rows.len());
        for row in &rows {
            instances.push(InstanceAggregate {
                template_id: row.try_get("template_id")?,
                status: row.try_get("status")?,
                count: row.try_get("n")?,
                duration: durations(row)?,
            });
        }

        // The step rows carry the partner too: both sides filter on it, so the join never
        // reaches another partner's rows even through a mistaken id.
        let (args, step_sql) = filtered(
            partner_id,
            filter,
            "SELECT i.template_id, s.step_index, s.name, s.step_type, s.status, COUNT(*) AS n, \
             COUNT(s.finished_at - s.started_at) AS timed, \
             CAST(COALESCE(SUM(s.finished_at - s.started_at), 0) AS BIGINT) AS total, \
             MAX(s.finished_at - s.started_at) AS longest, MIN(s.started_at) AS oldest \
             FROM workflow_step_executions s \
             JOIN workflow_instances i ON i.id = s.instance_id \
             WHERE s.partner_id = $1 AND i.partner_id = $1",
            " GROUP BY i.template_id, s.step_index, s.name, s.step_type, s.status \
             ORDER BY i.template_id, s.step_index, s.status, s.name",
        );
        let rows = args.bind(&step_sql).fetch_all(self.pool()).await?;
        let mut steps = Vec::with_capacity(rows.len());
        for row in &rows {
            steps.push(StepAggregate {
                template_id: row.try_get("template_id")?,
                step_index: row.try_get("step_index")?,
                name: row.try_get("name")?,
                step_type: row.try_get("step_type")?,
                status: row.try_get("status")?,
                count: row.try_get("n")?,
                duration: durations(row)?,
                oldest_started_at: row.try_get::<Option<i64>, _>("oldest")?.map(Timestamp),
            });
        }
        Ok(Analytics { instances, steps })
    }
}

/// `head` (which binds the partner as `$1`) with the filter's conditions on `i` and `tail`.
fn filtered(partner_id: &str, filter: &AnalyticsFilter, head: &str, tail: &str) -> (Args, String) {
    let mut args = Args::default();
    args.push(Arg::Text(partner_id.to_string()));
    let mut sql = head.to_string();
    if let Some(template_id) = &filter.template_id {
        args.and(&mut sql, "i.template_id =", Arg::Text(template_id.clone()));
    }
    if let Some(from) = filter.created_from {
        args.and(&mut sql, "i.created_at >=", Arg::Int(from.0));
    }
    if let Some(to) = filter.created_to {
        args.and(&mut sql, "i.created_at <=", Arg::Int(to.0));
    }
    sql.push_str(tail);
    (args, sql)
}

fn durations(row: &sqlx::any::AnyRow) -> Result<DurationTotals, StoreError> {
    Ok(DurationTotals {
        count: row.try_get("timed")?,
        sum_ms: row.try_get("total")?,
        max_ms: row.try_get("longest")?,
    })
}
