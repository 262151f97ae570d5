//! The SQL behind [`Store`]: one implementation for both backends (see the crate docs).
//!
//! Conventions: every statement uses `$n` placeholders and portable types; write transactions
//! start with [`Store::begin_write`]; each write transaction starts with the statement that
//! locks what it changes (the instance row, the template head), so concurrent writers of the
//! same object queue on that lock and the loser sees the winner's change.

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use sqlx::any::{AnyArguments, AnyRow};
use sqlx::query::Query;
use sqlx::{Any, AnyConnection, Row};
use workflow_core::audit::{chain_hash, AuditContent, GENESIS};
use workflow_core::instance::{ActorRef, ActorType, InstanceInfo, RunMode};
use workflow_core::{InstanceState, InstanceStatus, Timestamp};

use crate::audit_blocks;
use crate::error::{is_foreign_key_violation, is_unique_violation};
use crate::records::*;
use crate::{Backend, CreateOutcome, NewInstance, Store, StoreError};

/// Most ids one `DELETE ... IN (...)` names; keeps well under every backend's parameter limit.
const DELETE_CHUNK: usize = 500;

pub(crate) const TEMPLATE_COLS: &str =
    "v.id, v.partner_id, v.version, v.name, v.trigger_type, h.active, \
     v.doc, v.created_at, v.created_by";
pub(crate) const TEMPLATE_FROM: &str =
    "workflow_templates v JOIN workflow_template_heads h ON h.id = v.id AND h.partner_id = v.partner_id";

pub(crate) const INSTANCE_COLS: &str =
    "id, partner_id, template_id, template_version, status, current_step, \
     idempotency_key, created_by, trigger_data, state, created_at, updated_at, version, mode";

/// A bind value for queries assembled at run time (filters).
pub(crate) enum Arg {
    Text(String),
    Int(i64),
}

/// Builds `$n` placeholders and their values together, so they cannot drift apart.
#[derive(Default)]
pub(crate) struct Args {
    values: Vec<Arg>,
}

impl Args {
    pub(crate) fn push(&mut self, arg: Arg) -> String {
        self.values.push(arg);
        format!("${}", self.values.len())
    }

    /// Append ` AND <condition> $n` to `sql`, `$n` bound to `arg`.
    pub(crate) fn and(&mut self, sql: &mut String, condition: &str, arg: Arg) {
        let p = self.push(arg);
        sql.push_str(&format!(" AND {condition} {p}"));
    }

    /// Append ` LIMIT $n` to `sql` for `limit`, where `0` means no limit.
    pub(crate) fn limit(&mut self, sql: &mut String, limit: u32) {
        if limit > 0 {
            let p = self.push(Arg::Int(i64::from(limit)));
            sql.push_str(&format!(" LIMIT {p}"));
        }
    }

    pub(crate) fn bind<'q>(&'q self, sql: &'q str) -> Query<'q, Any, AnyArguments<'q>> {
        let mut query = sqlx::query(sql);
        for value in &self.values {
            query = match value {
                Arg::Text(s) => query.bind(s.as_str()),
                Arg::Int(i) => query.bind(*i),
            };
        }
        query
    }
}

impl Store {
    // ---------------------------------------------------------------- partners and keys

    pub async fn create_partner(&self, p: &PartnerRecord) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO partners (id, name, created_at) VALUES ($1, $2, $3)")
            .bind(p.id.as_str())
            .bind(p.name.as_str())
            .bind(p.created_at.0)
            .execute(self.write_pool())
            .await
            .map_err(|e| unique_to(e, "partner", &p.id))?;
        Ok(())
    }

    pub async fn get_partner(&self, id: &str) -> Result<Option<PartnerRecord>, StoreError> {
        let row = sqlx::query("SELECT id, name, created_at FROM partners WHERE id = $1")
            .bind(id)
            .fetch_optional(self.pool())
            .await?;
        row.map(|row| {
            Ok(PartnerRecord {
                id: row.try_get("id")?,
                name: row.try_get("name")?,
                created_at: Timestamp(row.try_get("created_at")?),
            })
        })
        .transpose()
    }

    /// Store an API key's owner under the key's hash. `NotFound { what: "partner" }` if the
    /// partner does not exist; `AlreadyExists` if the hash or the key id is taken.
    pub async fn create_api_key(
        &self,
        key_hash: &str,
        rec: &ApiKeyRecord,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let partner = sqlx::query("SELECT id FROM partners WHERE id = $1")
            .bind(rec.partner_id.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        if partner.is_none() {
            return Err(not_found("partner", &rec.partner_id));
        }
        sqlx::query(
            "INSERT INTO api_keys (key_hash, id, partner_id, actor_id, actor_type, roles, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(key_hash)
        .bind(rec.id.as_str())
        .bind(rec.partner_id.as_str())
        .bind(rec.actor_id.as_str())
        .bind(rec.actor_type.as_str())
        .bind(to_json(&rec.roles)?)
        .bind(rec.created_at.0)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            if is_foreign_key_violation(&e) {
                not_found("partner", &rec.partner_id)
            } else {
                unique_to(e, "api key", &rec.id)
            }
        })?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn find_api_key(&self, key_hash: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT id, partner_id, actor_id, actor_type, roles, created_at FROM api_keys \
             WHERE key_hash = $1",
        )
        .bind(key_hash)
        .fetch_optional(self.pool())
        .await?;
        row.map(|row| {
            let actor_type: String = row.try_get("actor_type")?;
            let roles: String = row.try_get("roles")?;
            Ok(ApiKeyRecord {
                id: row.try_get("id")?,
                partner_id: row.try_get("partner_id")?,
                actor_id: row.try_get("actor_id")?,
                actor_type: enum_from_str::<ActorType>(&actor_type, "api key actor_type")?,
                roles: from_json(&roles, "api key roles")?,
                created_at: Timestamp(row.try_get("created_at")?),
            })
        })
        .transpose()
    }

    // ---------------------------------------------------------------- templates

    /// Insert a new template (its version 1, which `rec.version` must be) and its audit events.
    /// `AlreadyExists` if the id is taken; `Conflict` if `rec.version != 1`.
    pub async fn insert_template(
        &self,
        rec: &TemplateRecord,
        audit: &AuditDraft,
    ) -> Result<(), StoreError> {
        if rec.version != 1 {
            return Err(StoreError::Conflict {
                what: "template version",
                id: format!("{}@{}", rec.id, rec.version),
            });
        }
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO workflow_template_heads (id, partner_id, latest_version, active, created_at) \
             VALUES ($1, $2, 1, $3, $4)",
        )
        .bind(rec.id.as_str())
        .bind(rec.partner_id.as_str())
        .bind(i64::from(rec.active))
        .bind(rec.created_at.0)
        .execute(&mut *tx)
        .await
        .map_err(|e| unique_to(e, "template", &rec.id))?;
        insert_template_version(&mut tx, rec).await?;
        append_audit(&mut tx, &rec.partner_id, audit).await?;
        tx.commit().await?;
        Ok(())
    }

    /// New immutable version = latest + 1 (computed here, in the transaction); returns it.
    /// `NotFound` if the template is not the partner's.
    #[allow(clippy::too_many_arguments)]
    pub async fn add_template_version(
        &self,
        partner_id: &str,
        id: &str,
        name: &str,
        trigger_type: &str,
        doc: &Value,
        created_by: &str,
        at: Timestamp,
        audit: &AuditDraft,
    ) -> Result<TemplateRecord, StoreError> {
        let mut tx = self.begin_write().await?;
        // Bumping the head first locks it: concurrent adders queue here and get distinct
        // versions. (RETURNING: SQLite >= 3.35, PostgreSQL.)
        let head = sqlx::query(
            "UPDATE workflow_template_heads SET latest_version = latest_version + 1 \
             WHERE partner_id = $1 AND id = $2 RETURNING latest_version, active",
        )
        .bind(partner_id)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| not_found("template", id))?;
        let version: i64 = head.try_get("latest_version")?;
        let active: i64 = head.try_get("active")?;
        let rec = TemplateRecord {
            id: id.to_string(),
            partner_id: partner_id.to_string(),
            version,
            name: name.to_string(),
            trigger_type: trigger_type.to_string(),
            active: active != 0,
            doc: doc.clone(),
            created_at: at,
            created_by: created_by.to_string(),
        };
        insert_template_version(&mut tx, &rec).await?;
        append_audit(&mut tx, partner_id, audit).await?;
        tx.commit().await?;
        Ok(rec)
    }

    /// The latest version of a template.
    pub async fn get_template(
        &self,
        partner_id: &str,
        id: &str,
    ) -> Result<Option<TemplateRecord>, StoreError> {
        if let Some(readers) = &self.readers {
            return readers.latest_template(partner_id, id);
        }
        let sql = format!(
            "SELECT {TEMPLATE_COLS} FROM {TEMPLATE_FROM} \
             WHERE v.partner_id = $1 AND v.id = $2 AND v.version = h.latest_version"
        );
        let row = sqlx::query(&sql)
            .bind(partner_id)
            .bind(id)
            .fetch_optional(self.pool())
            .await?;
        row.as_ref().map(template_from_row).transpose()
    }

    pub async fn get_template_version(
        &self,
        partner_id: &str,
        id: &str,
        version: i64,
    ) -> Result<Option<TemplateRecord>, StoreError> {
        let sql = format!(
            "SELECT {TEMPLATE_COLS} FROM {TEMPLATE_FROM} \
             WHERE v.partner_id = $1 AND v.id = $2 AND v.version = $3"
        );
        let row = sqlx::query(&sql)
            .bind(partner_id)
            .bind(id)
            .bind(version)
            .fetch_optional(self.pool())
            .await?;
        row.as_ref().map(template_from_row).transpose()
    }

    /// Every version of a template, ascending; empty if it is not the partner's.
    pub async fn list_template_versions(
        &self,
        partner_id: &str,
        id: &str,
    ) -> Result<Vec<TemplateRecord>, StoreError> {
        let sql = format!(
            "SELECT {TEMPLATE_COLS} FROM {TEMPLATE_FROM} \
             WHERE v.partner_id = $1 AND v.id = $2 ORDER BY v.version ASC"
        );
        let rows = sqlx::query(&sql)
            .bind(partner_id)
            .bind(id)
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(template_from_row).collect()
    }

    /// The latest version of each of the partner's templates, id descending (newest first for
    /// UUIDv7 ids). Filters apply to the latest version; `before_id` is the paging cursor;
    /// `limit == 0` means no limit.
    pub async fn list_templates(
        &self,
        partner_id: &str,
        filter: &TemplateFilter,
    ) -> Result<Vec<TemplateRecord>, StoreError> {
        let mut args = Args::default();
        let mut sql = format!(
            "SELECT {TEMPLATE_COLS} FROM {TEMPLATE_FROM} \
             WHERE h.partner_id = {} AND v.version = h.latest_version",
            args.push(Arg::Text(partner_id.to_string()))
        );
        if let Some(trigger_type) = &filter.trigger_type {
            args.and(
                &mut sql,
                "v.trigger_type =",
                Arg::Text(trigger_type.clone()),
            );
        }
        if let Some(active) = filter.active {
            args.and(&mut sql, "h.active =", Arg::Int(i64::from(active)));
        }
        if let Some(before_id) = &filter.before_id {
            args.and(&mut sql, "h.id <", Arg::Text(before_id.clone()));
        }
        sql.push_str(" ORDER BY h.id DESC");
        args.limit(&mut sql, filter.limit);
        let rows = args.bind(&sql).fetch_all(self.pool()).await?;
        rows.iter().map(template_from_row).collect()
    }

    /// Activate or deactivate a template (all its versions). `NotFound` if not the partner's.
    pub async fn set_template_active(
        &self,
        partner_id: &str,
        id: &str,
        active: bool,
        audit: &AuditDraft,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let done = sqlx::query(
            "UPDATE workflow_template_heads SET active = $1 WHERE partner_id = $2 AND id = $3",
        )
        .bind(i64::from(active))
        .bind(partner_id)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(not_found("template", id));
        }
        append_audit(&mut tx, partner_id, audit).await?;
        tx.commit().await?;
        Ok(())
    }

    // ---------------------------------------------------------------- instances

    /// Insert instance + outbox + audit in ONE transaction. If `(partner_id, idempotency_key)`
    /// already exists, write nothing and return `Existing` with that record (also when two
    /// racing creates hit the unique index). `AlreadyExists` if the instance id is taken.
    pub async fn create_instance(
        &self,
        rec: &InstanceRecord,
        outbox: &[OutboxMessage],
        audit: &[AuditDraft],
    ) -> Result<CreateOutcome, StoreError> {
        self.create_instance_with(rec, outbox, audit, &[], &[])
            .await
    }

    /// [`Store::create_instance`], with the timers and notification deliveries the creation
    /// asks for (a first step that ran inline, e.g. an approval with a deadline), in the same
    /// transaction.
    pub async fn create_instance_with(
        &self,
        rec: &InstanceRecord,
        outbox: &[OutboxMessage],
        audit: &[AuditDraft],
        timers: &[TimerRecord],
        deliveries: &[crate::NewDelivery],
    ) -> Result<CreateOutcome, StoreError> {
        self.create(rec, outbox, audit, timers, deliveries, false)
            .await
    }

    /// [`Store::create_instance_with`] for a caller that did not read the template in this
    /// create (it remembered the template's head): the instance is written only if its
    /// template's latest version is still `rec`'s and active, checked in the create's
    /// transaction; else nothing is written and the answer is
    /// [`StoreError::TemplateChanged`]. An idempotency key already taken still answers
    /// `Existing` when the head has not moved.
    ///
    /// The SQLite file's committer checks with one indexed lookup on its own thread; on
    /// PostgreSQL a group of creates checks every head its creates were made at in one
    /// statement, and holds them (`FOR SHARE`) until it commits.
    pub async fn create_instance_at_head(
        &self,
        rec: &InstanceRecord,
        outbox: &[OutboxMessage],
        audit: &[AuditDraft],
        timers: &[TimerRecord],
        deliveries: &[crate::NewDelivery],
    ) -> Result<CreateOutcome, StoreError> {
        self.create(rec, outbox, audit, timers, deliveries, true)
            .await
    }

    async fn create(
        &self,
        rec: &InstanceRecord,
        outbox: &[OutboxMessage],
        audit: &[AuditDraft],
        timers: &[TimerRecord],
        deliveries: &[crate::NewDelivery],
        at_head: bool,
    ) -> Result<CreateOutcome, StoreError> {
        self.create_owned(NewInstance {
            rec: rec.clone(),
            outbox: outbox.to_vec(),
            audit: audit.to_vec(),
            timers: timers.to_vec(),
            deliveries: deliveries.to_vec(),
            at_head,
        })
        .await
    }

    /// [`Store::create_instance_with`] (or [`Store::create_instance_at_head`] when
    /// `new.at_head`) of a create moved in: the record comes back in
    /// [`CreateOutcome::Created`], and nothing is copied on the way (PostgreSQL's
    /// group-commit task owns what it queues; SQLite's committer keeps the record until the
    /// create is answered).
    pub async fn create_owned(&self, new: NewInstance) -> Result<CreateOutcome, StoreError> {
        if let Some(committer) = &self.committer {
            return match committer.create(new).await? {
                crate::sqlite_writer::Written::Created(outcome) => Ok(*outcome),
                crate::sqlite_writer::Written::Committed => Err(StoreError::corrupt(
                    "the committer answered a create with a commit",
                )),
            };
        }
        let new = match &self.pg_committer {
            Some(committer) => match committer.create(new).await {
                Some((crate::pg_commit::Created::Written, new)) => {
                    return Ok(CreateOutcome::Created(new.rec))
                }
                Some((crate::pg_commit::Created::Alone, new)) => new,
                None => return Err(StoreError::Database(sqlx::Error::PoolClosed)),
            },
            None => new,
        };
        self.create_alone(new).await
    }

    /// A create in a transaction of its own.
    async fn create_alone(&self, new: NewInstance) -> Result<CreateOutcome, StoreError> {
        let NewInstance {
            rec,
            outbox,
            audit,
            timers,
            deliveries,
            at_head,
        } = new;
        let info = &rec.info;
        let mut tx = self.begin_write().await?;
        if at_head {
            // FOR SHARE where it exists: a concurrent new version or deactivation waits for
            // this create (or this create for it), so the check holds until the commit.
            let lock = match self.backend {
                Backend::Postgres => " FOR SHARE",
                Backend::Sqlite => "",
            };
            let head = sqlx::query(&format!(
                "SELECT latest_version, active FROM workflow_template_heads \
                 WHERE partner_id = $1 AND id = $2{lock}"
            ))
            .bind(info.partner_id.as_str())
            .bind(info.template_id.as_str())
            .fetch_optional(&mut *tx)
            .await?
            .map(|row| -> Result<(i64, i64), StoreError> {
                Ok((row.try_get("latest_version")?, row.try_get("active")?))
            })
            .transpose()?;
            if head != Some((info.template_version, 1)) {
                tx.rollback().await?;
                return Err(StoreError::TemplateChanged {
                    id: info.template_id.clone(),
                });
            }
        }
        // ON CONFLICT on the idempotency key only: an id collision still raises. On PostgreSQL a
        // racing insert of the same key waits for the other transaction, then does nothing.
        let sql = format!(
            "{INSERT_INSTANCE} VALUES {} ON CONFLICT (partner_id, idempotency_key) DO NOTHING",
            values_placeholders(1, INSTANCE_WIDTH)
        );
        let inserted = bind_instance(sqlx::query(&sql), &rec)?
            .execute(&mut *tx)
            .await;
        let inserted = match inserted {
            Ok(done) => done.rows_affected() > 0,
            Err(e) if is_unique_violation(&e) && rec.idempotency_key.is_some() => false,
            Err(e) => return Err(unique_to(e, "instance", &info.id)),
        };
        if !inserted {
            tx.rollback().await?;
            let key = rec.idempotency_key.as_deref().unwrap_or_default();
            return match self.get_instance_by_key(&info.partner_id, key).await? {
                Some(existing) => Ok(CreateOutcome::Existing(existing)),
                // The unique violation was on the id, or the row vanished: retryable.
                None => Err(StoreError::AlreadyExists {
                    what: "instance",
                    id: info.id.clone(),
                }),
            };
        }
        upsert_steps(&mut tx, &[&rec]).await?;
        insert_outbox(&mut tx, &outbox).await?;
        crate::timers::insert_timers(&mut tx, &timers).await?;
        crate::notifications::insert_deliveries(&mut tx, &deliveries).await?;
        let events: Vec<_> = audit
            .iter()
            .map(|d| (info.partner_id.as_str(), d))
            .collect();
        append_audits(&mut tx, &events).await?;
        tx.commit().await?;
        Ok(CreateOutcome::Created(rec))
    }

    pub async fn get_instance(
        &self,
        partner_id: &str,
        id: &str,
    ) -> Result<Option<InstanceRecord>, StoreError> {
        // By primary key alone, the partner checked here: with `partner_id = $1` in the WHERE
        // clause the planner may pick any partner-prefixed index for a partner that is rare in
        // its statistics, and scan every instance of that partner.
        let found = match (&self.readers, &self.pg_committer, &self.pg_reader) {
            (Some(readers), ..) => readers.instance(id)?,
            // Batched with the process's other reads, with its audit stream's head, so the group
            // commit of its next transition knows it (`pg_reads.rs`, `pg_commit.rs`).
            (None, Some(committer), Some(reader)) => {
                reader.instance(self.pool(), id).await?.map(|(rec, head)| {
                    committer.observed(&rec, head);
                    rec
                })
            }
            _ => {
                let sql = format!("SELECT {INSTANCE_COLS} FROM workflow_instances WHERE id = $1");
                let row = sqlx::query(&sql)
                    .bind(id)
                    .fetch_optional(self.pool())
                    .await?;
                row.as_ref().map(instance_from_row).transpose()?
            }
        };
        Ok(found.filter(|rec| rec.info.partner_id == partner_id))
    }

    /// The partner's instances of these ids that exist, in no particular order: one statement
    /// per 200 ids. Like [`Store::get_instance`] it selects by primary key alone and checks
    /// the partner here.
    pub async fn get_instances(
        &self,
        partner_id: &str,
        ids: &[&str],
    ) -> Result<Vec<InstanceRecord>, StoreError> {
        let mut found = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(200) {
            let sql = format!(
                "SELECT {INSTANCE_COLS} FROM workflow_instances WHERE id IN ({})",
                (1..=chunk.len())
                    .map(|k| format!("${k}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let mut q = sqlx::query(&sql);
            for id in chunk {
                q = q.bind(*id);
            }
            for row in q.fetch_all(self.pool()).await? {
                let rec = instance_from_row(&row)?;
                if rec.info.partner_id == partner_id {
                    found.push(rec);
                }
            }
        }
        Ok(found)
    }

    /// The instance a partner created with an idempotency key, if any.
    pub async fn get_instance_by_key(
        &self,
        partner_id: &str,
        idempotency_key: &str,
    ) -> Result<Option<InstanceRecord>, StoreError> {
        if let Some(readers) = &self.readers {
            return readers.instance_by_key(partner_id, idempotency_key);
        }
        let sql = format!(
            "SELECT {INSTANCE_COLS} FROM workflow_instances WHERE partner_id = $1 AND idempotency_key = $2"
        );
        let row = sqlx::query(&sql)
            .bind(partner_id)
            .bind(idempotency_key)
            .fetch_optional(self.pool())
            .await?;
        row.as_ref().map(instance_from_row).transpose()
    }

    /// The partner's instances, id descending. `created_from` and `created_to` are both
    /// inclusive; `before_id` is the paging cursor; `limit == 0` means no limit.
    pub async fn list_instances(
        &self,
        partner_id: &str,
        filter: &InstanceFilter,
    ) -> Result<Vec<InstanceRecord>, StoreError> {
        let mut args = Args::default();
        let mut sql = format!(
            "SELECT {INSTANCE_COLS} FROM workflow_instances WHERE partner_id = {}",
            args.push(Arg::Text(partner_id.to_string()))
        );
        if let Some(status) = filter.status {
            args.and(&mut sql, "status =", Arg::Text(status.as_str().to_string()));
        }
        if let Some(template_id) = &filter.template_id {
            args.and(&mut sql, "template_id =", Arg::Text(template_id.clone()));
        }
        if let Some(from) = filter.created_from {
            args.and(&mut sql, "created_at >=", Arg::Int(from.0));
        }
        if let Some(to) = filter.created_to {
            args.and(&mut sql, "created_at <=", Arg::Int(to.0));
        }
        if let Some(before_id) = &filter.before_id {
            args.and(&mut sql, "id <", Arg::Text(before_id.clone()));
        }
        sql.push_str(" ORDER BY id DESC");
        args.limit(&mut sql, filter.limit);
        let rows = args.bind(&sql).fetch_all(self.pool()).await?;
        rows.iter().map(instance_from_row).collect()
    }

    /// Write `rec.state` (and the status/current_step columns and step mirror) with
    /// `version = expected_version + 1`, plus outbox and audit, in ONE transaction. `Conflict`
    /// if the stored version is not `expected_version`; `NotFound` if there is no such
    /// instance for the partner. `rec.version` is ignored.
    pub async fn commit_instance(
        &self,
        rec: &InstanceRecord,
        expected_version: i64,
        outbox: &[OutboxMessage],
        audit: &[AuditDraft],
    ) -> Result<(), StoreError> {
        self.commit_instance_with_timers(rec, expected_version, outbox, audit, &[])
            .await
    }

    /// [`Store::commit_instance`], also storing the timers the transition asked for, in the
    /// same transaction: a timer exists exactly when the state change that needs it does.
    pub async fn commit_instance_with_timers(
        &self,
        rec: &InstanceRecord,
        expected_version: i64,
        outbox: &[OutboxMessage],
        audit: &[AuditDraft],
        timers: &[TimerRecord],
    ) -> Result<(), StoreError> {
        self.commit_instance_with_deliveries(rec, expected_version, outbox, audit, timers, &[])
            .await
    }

    /// [`Store::commit_instance_with_timers`], also storing the notification deliveries the
    /// transition queued, in the same transaction (their bus messages are in `outbox`).
    ///
    /// On a SQLite file this goes through the group committer (see `commit.rs`), on PostgreSQL
    /// through the process's group-commit task (`pg_commit.rs`): commits that queue while a
    /// batch is being written share the next transaction, each still all or nothing and each
    /// checked against its own expected version.
    pub async fn commit_instance_with_deliveries(
        &self,
        rec: &InstanceRecord,
        expected_version: i64,
        outbox: &[OutboxMessage],
        audit: &[AuditDraft],
        timers: &[TimerRecord],
        deliveries: &[crate::notifications::NewDelivery],
    ) -> Result<(), StoreError> {
        self.commit_transition(
            rec,
            expected_version,
            outbox,
            audit,
            timers,
            deliveries,
            None,
        )
        .await
    }

    /// [`Store::commit_instance_with_deliveries`], also recording `decision`, the outcome of
    /// the approval decision the transition applied, in the same transaction: the outcome
    /// exists exactly when the state change does, and costs no transaction of its own. If the
    /// version check loses, neither is written. On PostgreSQL the outcome is announced to
    /// [`crate::DecisionListener`]s when the transaction commits.
    #[allow(clippy::too_many_arguments)]
    pub async fn commit_transition(
        &self,
        rec: &InstanceRecord,
        expected_version: i64,
        outbox: &[OutboxMessage],
        audit: &[AuditDraft],
        timers: &[TimerRecord],
        deliveries: &[crate::notifications::NewDelivery],
        decision: Option<&DecisionOutcome>,
    ) -> Result<(), StoreError> {
        let parts = crate::commit::CommitParts {
            rec,
            expected_version,
            outbox,
            audit,
            timers,
            deliveries,
            decision,
        };
        if self.pg_committer.is_some() {
            return self.commit_owned(parts.owned()).await.map(drop);
        }
        self.commit_parts(parts).await
    }

    /// [`Store::commit_transition`] of a commit moved in, and handed back once committed. A
    /// caller that keeps the record and the messages (the engine caches the one and relays the
    /// others) moves them instead of having every part copied for PostgreSQL's group-commit
    /// task, which owns what it queues (the copies of the audit events' documents and of the
    /// state cost the pools ~5 % of their CPU).
    pub async fn commit_owned(
        &self,
        commit: crate::InstanceCommit,
    ) -> Result<crate::InstanceCommit, StoreError> {
        if let Some(committer) = &self.pg_committer {
            return match committer.submit_owned(vec![commit]).await.pop() {
                Some((Ok(()), commit)) => Ok(commit),
                Some((Err(e), _)) => Err(e),
                None => Err(StoreError::Database(sqlx::Error::PoolClosed)),
            };
        }
        self.commit_parts(commit.parts()).await?;
        Ok(commit)
    }

    /// One commit from borrowed parts, where nothing needs them owned: SQLite's committer
    /// encodes straight from them; a store without a committer writes them in a transaction.
    async fn commit_parts(&self, parts: crate::commit::CommitParts<'_>) -> Result<(), StoreError> {
        if let Some(committer) = &self.committer {
            return committer.commit(parts).await;
        }
        let mut tx = self.begin_write().await?;
        write_instance_commit(&mut tx, parts)
            .await
            .map_err(|e| e.error)?;
        tx.commit().await?;
        Ok(())
    }

    /// Non-terminal instances (running or waiting) across partners, id ascending after
    /// `after_id`: used to resume work after a restart. `limit == 0` means no limit.
    pub async fn list_active_instances(
        &self,
        after_id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<InstanceRecord>, StoreError> {
        let mut args = Args::default();
        let mut sql = format!(
            "SELECT {INSTANCE_COLS} FROM workflow_instances WHERE status IN ({})",
            active_statuses()
        );
        if let Some(after_id) = after_id {
            args.and(&mut sql, "id >", Arg::Text(after_id.to_string()));
        }
        sql.push_str(" ORDER BY id ASC");
        args.limit(&mut sql, limit);
        let rows = args.bind(&sql).fetch_all(self.pool()).await?;
        rows.iter().map(instance_from_row).collect()
    }

    // ---------------------------------------------------------------- outbox

    /// The oldest unpublished messages (by insertion order), at most `limit` (0: all).
    ///
    /// Messages of one instance are in commit order: they are written under that instance's
    /// row lock, so a later commit's messages get later sequence numbers.
    pub async fn fetch_outbox(&self, limit: u32) -> Result<Vec<OutboxMessage>, StoreError> {
        let rows = if limit > 0 {
            sqlx::query("SELECT id, topic, msg_key, payload FROM outbox ORDER BY seq ASC LIMIT $1")
                .bind(i64::from(limit))
                .fetch_all(self.pool())
                .await?
        } else {
            sqlx::query("SELECT id, topic, msg_key, payload FROM outbox ORDER BY seq ASC")
                .fetch_all(self.pool())
                .await?
        };
        rows.iter()
            .map(|row| {
                Ok(OutboxMessage {
                    id: row.try_get("id")?,
                    topic: row.try_get("topic")?,
                    key: row.try_get("msg_key")?,
                    payload: row.try_get("payload")?,
                })
            })
            .collect()
    }

    /// Forget published messages. Unknown ids are ignored.
    pub async fn delete_outbox(&self, ids: &[String]) -> Result<(), StoreError> {
        if let Some(committer) = &self.committer {
            // With the instance writes: one transaction instead of a lock of its own.
            return committer
                .submit(crate::sqlite_writer::Write::DeleteOutbox(ids.to_vec()))
                .await
                .map(|_| ());
        }
        for chunk in ids.chunks(DELETE_CHUNK) {
            let mut args = Args::default();
            let placeholders: Vec<String> = chunk
                .iter()
                .map(|id| args.push(Arg::Text(id.clone())))
                .collect();
            let sql = format!(
                "DELETE FROM outbox WHERE id IN ({})",
                placeholders.join(", ")
            );
            args.bind(&sql).execute(self.write_pool()).await?;
        }
        Ok(())
    }

    // ---------------------------------------------------------------- audit

    /// One stream's events, ascending seq; empty if the stream is not the partner's.
    pub async fn list_audit(
        &self,
        partner_id: &str,
        stream: &str,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT stream, events FROM audit_blocks WHERE partner_id = $1 AND stream = $2 \
             ORDER BY first_seq ASC",
        )
        .bind(partner_id)
        .bind(stream)
        .fetch_all(self.pool())
        .await?;
        decode_blocks(partner_id, &rows)
    }

    /// Every event of every stream of the partner, each stream in ascending seq (streams in no
    /// particular order). For reports over a whole run (the bench's step latency).
    pub async fn list_partner_audit(
        &self,
        partner_id: &str,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT stream, events FROM audit_blocks WHERE partner_id = $1 \
             ORDER BY stream, first_seq",
        )
        .bind(partner_id)
        .fetch_all(self.pool())
        .await?;
        decode_blocks(partner_id, &rows)
    }
}

// -------------------------------------------------------------------- helpers in a transaction

/// Why [`write_instance_commit`] failed, and whether it wrote anything before failing.
pub(crate) struct CommitFailure {
    pub(crate) error: StoreError,
    /// True when the commit was refused before any write (version conflict, unknown
    /// instance): the transaction it ran in is untouched and may go on with other commits.
    pub(crate) clean: bool,
}

impl From<StoreError> for CommitFailure {
    fn from(error: StoreError) -> Self {
        CommitFailure {
            error,
            clean: false,
        }
    }
}

impl From<sqlx::Error> for CommitFailure {
    fn from(error: sqlx::Error) -> Self {
        StoreError::from(error).into()
    }
}

/// The statements of one instance commit, inside a write transaction the caller owns.
pub(crate) async fn write_instance_commit(
    conn: &mut AnyConnection,
    commit: crate::commit::CommitParts<'_>,
) -> Result<(), CommitFailure> {
    let crate::commit::CommitParts {
        rec,
        expected_version,
        outbox,
        audit,
        timers,
        deliveries,
        decision,
    } = commit;
    let info = &rec.info;
    let refused = |error| CommitFailure { error, clean: true };
    // The UPDATE comes first: on PostgreSQL it takes the row lock, so a racing commit waits,
    // re-evaluates `version = expected` against the winner's row and matches nothing. By
    // primary key alone (see `get_instance`); the partner is checked on the returned row, and
    // a mismatch fails the transaction (not clean: the row was updated).
    let updated = sqlx::query(
        "UPDATE workflow_instances SET status = $1, current_step = $2, state = $3, \
         updated_at = $4, version = $5 \
         WHERE id = $6 AND version = $7 RETURNING partner_id",
    )
    .bind(rec.state.status.as_str())
    .bind(rec.state.current_step.map(|s| s as i64))
    .bind(to_json(&rec.state)?)
    .bind(rec.updated_at.0)
    .bind(expected_version + 1)
    .bind(info.id.as_str())
    .bind(expected_version)
    .fetch_optional(&mut *conn)
    .await?
    .map(|row| row.try_get::<String, _>("partner_id"))
    .transpose()?;
    match updated {
        Some(owner) if owner == info.partner_id => {}
        Some(_) => return Err(not_found("instance", &info.id).into()),
        None => {
            let owner = sqlx::query("SELECT partner_id FROM workflow_instances WHERE id = $1")
                .bind(info.id.as_str())
                .fetch_optional(&mut *conn)
                .await?
                .map(|row| row.try_get::<String, _>("partner_id"))
                .transpose()?;
            return Err(refused(match owner {
                Some(owner) if owner == info.partner_id => StoreError::Conflict {
                    what: "instance",
                    id: info.id.clone(),
                },
                _ => not_found("instance", &info.id),
            }));
        }
    }
    upsert_steps(conn, &[rec]).await?;
    insert_outbox(conn, outbox).await?;
    crate::timers::insert_timers(conn, timers).await?;
    crate::notifications::insert_deliveries(conn, deliveries).await?;
    let events: Vec<_> = audit
        .iter()
        .map(|d| (info.partner_id.as_str(), d))
        .collect();
    append_audits(conn, &events).await?;
    if let Some(decision) = decision {
        crate::approvals::insert_outcome(conn, decision).await?;
    }
    Ok(())
}

async fn insert_template_version(
    conn: &mut AnyConnection,
    rec: &TemplateRecord,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO workflow_templates (id, version, partner_id, name, trigger_type, doc, created_at, created_by) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(rec.id.as_str())
    .bind(rec.version)
    .bind(rec.partner_id.as_str())
    .bind(rec.name.as_str())
    .bind(rec.trigger_type.as_str())
    .bind(to_json(&rec.doc)?)
    .bind(rec.created_at.0)
    .bind(rec.created_by.as_str())
    .execute(&mut *conn)
    .await
    .map_err(|e| unique_to(e, "template version", &format!("{}@{}", rec.id, rec.version)))?;
    Ok(())
}

/// The instance insert without its VALUES; [`bind_instance`] binds one row of it.
pub(crate) const INSERT_INSTANCE: &str = "INSERT INTO workflow_instances (id, partner_id, \
     template_id, template_version, status, current_step, idempotency_key, created_by, \
     trigger_data, state, created_at, updated_at, version, mode)";

/// Parameters of one row of [`INSERT_INSTANCE`].
pub(crate) const INSTANCE_WIDTH: usize = 14;

/// Bind `rec` as one row of [`INSERT_INSTANCE`].
pub(crate) fn bind_instance<'q>(
    query: Query<'q, Any, AnyArguments<'q>>,
    rec: &'q InstanceRecord,
) -> Result<Query<'q, Any, AnyArguments<'q>>, StoreError> {
    let info = &rec.info;
    Ok(query
        .bind(info.id.as_str())
        .bind(info.partner_id.as_str())
        .bind(info.template_id.as_str())
        .bind(info.template_version)
        .bind(rec.state.status.as_str())
        .bind(rec.state.current_step.map(|s| s as i64))
        .bind(rec.idempotency_key.as_deref())
        .bind(to_json(&info.created_by)?)
        .bind(to_json(&info.trigger)?)
        .bind(to_json(&rec.state)?)
        .bind(info.created_at.0)
        .bind(rec.updated_at.0)
        .bind(rec.version)
        .bind(info.mode.as_str()))
}

/// Mirror `state.steps` into `workflow_step_executions` (insert or overwrite each).
/// Steps per upsert statement (12 parameters each; well under every backend's limit).
const STEPS_PER_UPSERT: usize = 64;

/// The upsert of `rows` step rows (12 parameters each, `$1`...), shared with the SQLite
/// writer. A row whose values did not change is not updated: no page dirtied on SQLite, no new
/// row version on PostgreSQL.
pub(crate) fn step_upsert_sql(rows: usize) -> String {
    format!(
        "{INSERT_STEPS} VALUES {} {STEP_CONFLICT}",
        values_placeholders(rows, 12)
    )
}

/// The step mirror's insert without its rows.
pub(crate) const INSERT_STEPS: &str = "INSERT INTO workflow_step_executions (instance_id, \
     step_index, partner_id, name, step_type, status, started_at, finished_at, actor, input, \
     output, error)";

/// What a step row that exists becomes: the new values, only if one of them changed.
pub(crate) const STEP_CONFLICT: &str = "ON CONFLICT (instance_id, step_index) DO UPDATE SET \
     name = excluded.name, step_type = excluded.step_type, status = excluded.status, \
     started_at = excluded.started_at, finished_at = excluded.finished_at, \
     actor = excluded.actor, input = excluded.input, output = excluded.output, \
     error = excluded.error \
     WHERE workflow_step_executions.status IS DISTINCT FROM excluded.status \
     OR workflow_step_executions.name IS DISTINCT FROM excluded.name \
     OR workflow_step_executions.step_type IS DISTINCT FROM excluded.step_type \
     OR workflow_step_executions.started_at IS DISTINCT FROM excluded.started_at \
     OR workflow_step_executions.finished_at IS DISTINCT FROM excluded.finished_at \
     OR workflow_step_executions.actor IS DISTINCT FROM excluded.actor \
     OR workflow_step_executions.input IS DISTINCT FROM excluded.input \
     OR workflow_step_executions.output IS DISTINCT FROM excluded.output \
     OR workflow_step_executions.error IS DISTINCT FROM excluded.error";

/// One multi-row statement per [`STEPS_PER_UPSERT`] steps, not one per step: every statement
/// is a round trip made while the write lock is held. Every commit names every step; a row whose
/// values did not change is not updated (on PostgreSQL an update writes a new row version).
/// Several instances' steps share the statements (PostgreSQL's group commit).
pub(crate) async fn upsert_steps(
    conn: &mut AnyConnection,
    recs: &[&InstanceRecord],
) -> Result<(), StoreError> {
    // One row per (instance, step index) (the last wins, as one statement per step would have
    // it): a multi-row upsert may not touch a row twice.
    let mut steps = Vec::new();
    for rec in recs {
        let unique: std::collections::BTreeMap<usize, &workflow_core::instance::StepExecution> =
            rec.state.steps.iter().map(|s| (s.index, s)).collect();
        steps.extend(unique.into_values().map(|step| (*rec, step)));
    }
    for chunk in steps.chunks(STEPS_PER_UPSERT) {
        let sql = step_upsert_sql(chunk.len());
        let mut query = sqlx::query(&sql);
        for (rec, step) in chunk {
            query = query
                .bind(rec.info.id.as_str())
                .bind(step.index as i64)
                .bind(rec.info.partner_id.as_str())
                .bind(step.name.as_str())
                .bind(step.step_type.as_str())
                .bind(step.status.as_str())
                .bind(step.started_at.map(|t| t.0))
                .bind(step.finished_at.map(|t| t.0))
                .bind(step.actor.as_ref().map(to_json).transpose()?)
                .bind(step.input.as_ref().map(to_json).transpose()?)
                .bind(step.output.as_ref().map(to_json).transpose()?)
                .bind(step.error.as_deref());
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Rows per multi-row INSERT (at most 11 parameters a row: well under every backend's limit).
pub(crate) const ROWS_PER_INSERT: usize = 64;

/// `($1, $2, ...), ($k+1, ...)`: the VALUES of `rows` rows of `width` parameters.
pub(crate) fn values_placeholders(rows: usize, width: usize) -> String {
    (0..rows)
        .map(|r| {
            let params: Vec<String> = (1..=width).map(|k| format!("${}", r * width + k)).collect();
            format!("({})", params.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The statuses of instances in flight, as SQL literals (`'running', 'waiting'`): the same list
/// as the predicate of the partial index `workflow_instances_active` (migration 0009), which
/// the planner uses only for a query naming exactly these values, not parameters.
fn active_statuses() -> String {
    InstanceStatus::ALL
        .into_iter()
        .filter(|s| !s.is_terminal())
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One multi-row statement per [`ROWS_PER_INSERT`] messages: every statement is a round trip
/// made while the write lock is held. Rows are inserted in order, so `seq` keeps their order.
pub(crate) async fn insert_outbox(
    conn: &mut AnyConnection,
    messages: &[OutboxMessage],
) -> Result<(), StoreError> {
    for chunk in messages.chunks(ROWS_PER_INSERT) {
        let sql = format!(
            "INSERT INTO outbox (id, topic, msg_key, payload) VALUES {}",
            values_placeholders(chunk.len(), 4)
        );
        let mut query = sqlx::query(&sql);
        for m in chunk {
            query = query
                .bind(m.id.as_str())
                .bind(m.topic.as_str())
                .bind(m.key.as_str())
                .bind(m.payload.as_slice());
        }
        query.execute(&mut *conn).await.map_err(|e| {
            let ids: Vec<&str> = chunk.iter().map(|m| m.id.as_str()).collect();
            unique_to(e, "outbox message", &ids.join(", "))
        })?;
    }
    Ok(())
}

/// Chain one event onto its stream (see [`append_audits`]). A racing append to the same stream
/// fails on the stream's `(stream, first_seq)` key and becomes a `Conflict`.
async fn append_audit(
    conn: &mut AnyConnection,
    partner_id: &str,
    draft: &AuditDraft,
) -> Result<(), StoreError> {
    append_audits(conn, &[(partner_id, draft)]).await
}

/// [`append_audit`] for several events of one transaction, each with its partner: each
/// stream's head is read once, the events are chained in order in memory, and written with one
/// multi-row INSERT per [`ROWS_PER_INSERT`] events (a transition writes several; each statement
/// is a round trip made while the write lock is held). PostgreSQL's group commit reads its
/// heads with its `UPDATE` instead (`pg_commit.rs`).
pub(crate) async fn append_audits(
    conn: &mut AnyConnection,
    events: &[(&str, &AuditDraft)],
) -> Result<(), StoreError> {
    let mut heads = std::collections::HashMap::new();
    for &(partner_id, draft) in events {
        if !heads.contains_key(draft.stream.as_str()) {
            let head = stream_head(conn, partner_id, &draft.stream).await?;
            heads.insert(draft.stream.as_str(), head);
        }
    }
    insert_chained(conn, events, heads).await
}

/// Chain `events` onto their streams' `heads` (see [`chain_audits`]) and insert them as blocks
/// (`audit_blocks.rs`: one row per stream's consecutive events), one multi-row statement per
/// [`ROWS_PER_INSERT`] blocks. A head that is not the stream's latest makes the insert fail on
/// the stream's `(stream, first_seq)` key: a lost race, never a fork.
pub(crate) async fn insert_chained<'a>(
    conn: &mut AnyConnection,
    events: &[(&'a str, &'a AuditDraft)],
    heads: std::collections::HashMap<&'a str, (i64, String)>,
) -> Result<(), StoreError> {
    let rows = chain_audits(events, heads);
    let blocks = audit_blocks::chained_blocks(&rows, |i| (rows[i].0, rows[i].1.stream.as_str()))?;
    for chunk in blocks.chunks(ROWS_PER_INSERT) {
        let sql = format!(
            "INSERT INTO audit_blocks (stream, first_seq, last_seq, partner_id, last_hash, \
             events) VALUES {}",
            values_placeholders(chunk.len(), 6)
        );
        let mut query = sqlx::query(&sql);
        for ((partner_id, stream), block) in chunk {
            query = query
                .bind(*stream)
                .bind(block.first_seq)
                .bind(block.last_seq)
                .bind(*partner_id)
                .bind(block.last_hash.as_str())
                .bind(block.events.as_str());
        }
        query.execute(&mut *conn).await.map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Conflict {
                    what: "audit stream",
                    id: chunk
                        .first()
                        .map(|((_, stream), _)| stream.to_string())
                        .unwrap_or_default(),
                }
            } else {
                StoreError::Database(e)
            }
        })?;
    }
    Ok(())
}

/// An audit event chained onto its stream: (partner, draft, seq, prev_hash, hash).
pub(crate) type Chained<'a> = (&'a str, &'a AuditDraft, i64, String, String);

/// Chain `events` in order onto their streams' `heads` (a stream missing from `heads` is new).
pub(crate) fn chain_audits<'a>(
    events: &[(&'a str, &'a AuditDraft)],
    mut heads: std::collections::HashMap<&'a str, (i64, String)>,
) -> Vec<Chained<'a>> {
    let mut rows = Vec::with_capacity(events.len());
    for &(partner_id, draft) in events {
        let (prev_seq, prev_hash) = heads
            .remove(draft.stream.as_str())
            .unwrap_or_else(|| (0, GENESIS.to_string()));
        let seq = prev_seq + 1;
        let hash = chain_hash(&prev_hash, &audit_content(partner_id, draft, seq));
        heads.insert(draft.stream.as_str(), (seq, hash.clone()));
        rows.push((partner_id, draft, seq, prev_hash, hash));
    }
    rows
}

/// The heads of every stream `events` name, in ONE statement (PostgreSQL only: a LATERAL lookup
/// per stream, a backward probe of its `(stream, first_seq)` key); a stream without events is missing.
pub(crate) async fn stream_heads<'a>(
    conn: &mut AnyConnection,
    events: &[(&str, &'a AuditDraft)],
) -> Result<std::collections::HashMap<&'a str, (i64, String)>, StoreError> {
    let mut streams: Vec<(&str, &'a str)> = Vec::new();
    for &(partner_id, draft) in events {
        if !streams.iter().any(|(_, s)| *s == draft.stream) {
            streams.push((partner_id, draft.stream.as_str()));
        }
    }
    let mut heads = std::collections::HashMap::new();
    for chunk in streams.chunks(ROWS_PER_INSERT) {
        let values = (0..chunk.len())
            .map(|i| format!("(${}::text, ${}::text)", 2 * i + 1, 2 * i + 2))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT s.stream, h.seq, h.hash FROM (VALUES {values}) AS s (partner_id, stream) \
             CROSS JOIN LATERAL (SELECT b.last_seq AS seq, b.last_hash AS hash \
             FROM audit_blocks b WHERE b.partner_id = s.partner_id AND b.stream = s.stream \
             ORDER BY b.first_seq DESC LIMIT 1) AS h"
        );
        let mut query = sqlx::query(&sql);
        for (partner_id, stream) in chunk {
            query = query.bind(*partner_id).bind(*stream);
        }
        for row in query.fetch_all(&mut *conn).await? {
            let stream: String = row.try_get("stream")?;
            if let Some((_, name)) = chunk.iter().find(|(_, s)| *s == stream) {
                heads.insert(
                    *name,
                    (
                        row.try_get::<i64, _>("seq")?,
                        row.try_get::<String, _>("hash")?,
                    ),
                );
            }
        }
    }
    Ok(heads)
}

/// What an event's hash covers.
pub(crate) fn audit_content<'a>(
    partner_id: &'a str,
    draft: &'a AuditDraft,
    seq: i64,
) -> AuditContent<'a> {
    AuditContent {
        partner_id,
        stream: &draft.stream,
        seq,
        at: draft.at,
        actor: &draft.actor,
        kind: &draft.kind,
        before: &draft.before,
        after: &draft.after,
        reason: draft.reason.as_deref(),
    }
}

/// The stream's last (seq, hash), or (0, genesis) for a new stream.
async fn stream_head(
    conn: &mut AnyConnection,
    partner_id: &str,
    stream: &str,
) -> Result<(i64, String), StoreError> {
    let last = sqlx::query(
        "SELECT last_seq AS seq, last_hash AS hash FROM audit_blocks WHERE partner_id = $1 \
         AND stream = $2 ORDER BY first_seq DESC LIMIT 1",
    )
    .bind(partner_id)
    .bind(stream)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(match last {
        Some(row) => (
            row.try_get::<i64, _>("seq")?,
            row.try_get::<String, _>("hash")?,
        ),
        None => (0, GENESIS.to_string()),
    })
}

// -------------------------------------------------------------------- row decoding

/// The raw columns of [`TEMPLATE_COLS`], whichever driver read them.
pub(crate) struct TemplateColumns {
    pub(crate) id: String,
    pub(crate) partner_id: String,
    pub(crate) version: i64,
    pub(crate) name: String,
    pub(crate) trigger_type: String,
    pub(crate) active: i64,
    pub(crate) doc: String,
    pub(crate) created_at: i64,
    pub(crate) created_by: String,
}

fn template_from_row(row: &AnyRow) -> Result<TemplateRecord, StoreError> {
    decode_template(TemplateColumns {
        id: row.try_get("id")?,
        partner_id: row.try_get("partner_id")?,
        version: row.try_get("version")?,
        name: row.try_get("name")?,
        trigger_type: row.try_get("trigger_type")?,
        active: row.try_get("active")?,
        doc: row.try_get("doc")?,
        created_at: row.try_get("created_at")?,
        created_by: row.try_get("created_by")?,
    })
}

/// A template record from its stored columns (the document decoded).
pub(crate) fn decode_template(cols: TemplateColumns) -> Result<TemplateRecord, StoreError> {
    Ok(TemplateRecord {
        id: cols.id,
        partner_id: cols.partner_id,
        version: cols.version,
        name: cols.name,
        trigger_type: cols.trigger_type,
        active: cols.active != 0,
        doc: from_json(&cols.doc, "template doc")?,
        created_at: Timestamp(cols.created_at),
        created_by: cols.created_by,
    })
}

/// The raw columns of [`INSTANCE_COLS`] (the ones the record keeps), whichever driver read them.
pub(crate) struct InstanceColumns {
    pub(crate) id: String,
    pub(crate) partner_id: String,
    pub(crate) template_id: String,
    pub(crate) template_version: i64,
    pub(crate) idempotency_key: Option<String>,
    pub(crate) created_by: String,
    pub(crate) trigger: String,
    pub(crate) state: String,
    pub(crate) created_at: i64,
    pub(crate) updated_at: i64,
    pub(crate) version: i64,
    pub(crate) mode: String,
}

pub(crate) fn instance_from_row(row: &AnyRow) -> Result<InstanceRecord, StoreError> {
    decode_instance(InstanceColumns {
        id: row.try_get("id")?,
        partner_id: row.try_get("partner_id")?,
        template_id: row.try_get("template_id")?,
        template_version: row.try_get("template_version")?,
        idempotency_key: row.try_get("idempotency_key")?,
        created_by: row.try_get("created_by")?,
        trigger: row.try_get("trigger_data")?,
        state: row.try_get("state")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        version: row.try_get("version")?,
        mode: row.try_get("mode")?,
    })
}

/// An instance record from its stored columns (the JSON documents decoded).
pub(crate) fn decode_instance(cols: InstanceColumns) -> Result<InstanceRecord, StoreError> {
    let id = cols.id;
    let mode = RunMode::parse(&cols.mode).ok_or_else(|| StoreError::Corrupt {
        message: format!("instance {id} has unknown mode `{}`", cols.mode),
    })?;
    Ok(InstanceRecord {
        info: InstanceInfo {
            partner_id: cols.partner_id,
            template_id: cols.template_id,
            template_version: cols.template_version,
            created_at: Timestamp(cols.created_at),
            created_by: from_json::<ActorRef>(
                &cols.created_by,
                &format!("instance {id} created_by"),
            )?,
            trigger: from_json(&cols.trigger, &format!("instance {id} trigger"))?,
            mode,
            id: id.clone(),
        },
        idempotency_key: cols.idempotency_key,
        state: from_json::<InstanceState>(&cols.state, &format!("instance {id} state"))?,
        updated_at: Timestamp(cols.updated_at),
        version: cols.version,
    })
}

/// The events of `rows` (`stream`, `events` of `audit_blocks`), in their order.
fn decode_blocks(partner_id: &str, rows: &[AnyRow]) -> Result<Vec<AuditRecord>, StoreError> {
    let mut events = Vec::new();
    for row in rows {
        let stream: String = row.try_get("stream")?;
        let block: String = row.try_get("events")?;
        events.extend(audit_blocks::decode(partner_id, &stream, &block)?);
    }
    Ok(events)
}

// -------------------------------------------------------------------- small conversions

fn not_found(what: &'static str, id: &str) -> StoreError {
    StoreError::NotFound {
        what,
        id: id.to_string(),
    }
}

/// A unique violation becomes `AlreadyExists { what, id }`; anything else stays a database error.
fn unique_to(e: sqlx::Error, what: &'static str, id: &str) -> StoreError {
    if is_unique_violation(&e) {
        StoreError::AlreadyExists {
            what,
            id: id.to_string(),
        }
    } else {
        StoreError::Database(e)
    }
}

/// `value`'s compact JSON.
///
/// Serialised into a scratch buffer of the thread's, then copied once at its size: growing a
/// fresh string by doubling took ~1.7 allocations a document (a state document several), and
/// the writer encodes a few dozen documents per instance (round 27: 37 allocations per
/// instance fewer, instructions the same).
pub(crate) fn to_json<T: Serialize>(value: &T) -> Result<String, StoreError> {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SCRATCH.with_borrow_mut(|buf| {
        buf.clear();
        serde_json::to_writer(&mut *buf, value).map_err(cannot_encode)?;
        let json = String::from_utf8(buf.as_slice().to_vec())
            .map_err(|e| StoreError::corrupt(format!("cannot encode a document: {e}")));
        // An unusually large document does not stay with the thread.
        if buf.capacity() > SCRATCH_KEPT {
            *buf = Vec::new();
        }
        json
    })
}

/// The most a thread's [`to_json`] scratch buffer keeps between documents.
const SCRATCH_KEPT: usize = 256 * 1024;

/// Append `value`'s JSON to `out` ([`to_json`] without a string of its own).
pub(crate) fn push_json<T: Serialize + ?Sized>(
    out: &mut Vec<u8>,
    value: &T,
) -> Result<(), StoreError> {
    serde_json::to_writer(out, value).map_err(cannot_encode)
}

fn cannot_encode(e: serde_json::Error) -> StoreError {
    StoreError::corrupt(format!("cannot encode a document: {e}"))
}

pub(crate) fn from_json<T: DeserializeOwned>(text: &str, what: &str) -> Result<T, StoreError> {
    serde_json::from_str(text)
        .map_err(|e| StoreError::corrupt(format!("{what} does not decode: {e}")))
}

/// A unit enum from its serde name (`snake_case`), e.g. `completed` -> `StepStatus::Completed`.
fn enum_from_str<T: DeserializeOwned>(text: &str, what: &str) -> Result<T, StoreError> {
    serde_json::from_value(Value::String(text.to_string()))
        .map_err(|e| StoreError::corrupt(format!("{what} {text:?} does not decode: {e}")))
}

#[cfg(test)]
mod tests {
    /// A status added to the instances in flight must be added to the partial index too:
    /// otherwise a restart's resume query no longer matches it and reads every instance.
    #[test]
    fn the_resume_query_names_the_active_index_statuses() {
        let predicate = format!("WHERE status IN ({});", super::active_statuses());
        for migration in [
            include_str!("../../../migrations/postgres/0009_active_instances_index.sql"),
            include_str!("../../../migrations/sqlite/0009_active_instances_index.sql"),
        ] {
            assert!(migration.contains(&predicate), "{predicate} in {migration}");
        }
    }

    /// SQLite's migration 0012 rebuilds the outbox without AUTOINCREMENT: rows in flight when
    /// it runs keep their ids, payloads and commit order, and later rows sort after them. The
    /// instance listing still reads its index backwards rather than sorting.
    #[test]
    fn sqlite_0012_keeps_the_outbox_in_flight_in_order() -> Result<(), rusqlite::Error> {
        let conn = rusqlite::Connection::open_in_memory()?;
        for migration in [
            include_str!("../../../migrations/sqlite/0001_init.sql"),
            include_str!("../../../migrations/sqlite/0002_approval_decisions.sql"),
            include_str!("../../../migrations/sqlite/0003_timers.sql"),
            include_str!("../../../migrations/sqlite/0004_instance_mode.sql"),
            include_str!("../../../migrations/sqlite/0005_notifications.sql"),
            include_str!("../../../migrations/sqlite/0006_payos_sandbox.sql"),
            include_str!("../../../migrations/sqlite/0007_drop_partner_created_index.sql"),
            include_str!("../../../migrations/sqlite/0008_drop_unused_indexes.sql"),
            include_str!("../../../migrations/sqlite/0009_active_instances_index.sql"),
            include_str!("../../../migrations/sqlite/0010_outbox_topic_index.sql"),
            include_str!("../../../migrations/sqlite/0011_audit_blocks.sql"),
        ] {
            conn.execute_batch(migration)?;
        }
        let insert = "INSERT INTO outbox (id, topic, msg_key, payload) VALUES (?1, 't', 'k', ?2)";
        for (id, payload) in [("m1", [1u8]), ("m2", [2]), ("m3", [3])] {
            conn.execute(insert, rusqlite::params![id, payload.to_vec()])?;
        }
        // The oldest was published: a gap below the rows in flight.
        conn.execute("DELETE FROM outbox WHERE id = 'm1'", [])?;
        conn.execute_batch(include_str!(
            "../../../migrations/sqlite/0012_fewer_pages_per_commit.sql"
        ))?;
        conn.execute(insert, rusqlite::params!["m4", vec![4u8]])?;
        let rows = conn
            .prepare("SELECT id, payload FROM outbox ORDER BY seq ASC")?
            .query_map([], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, Vec<u8>>(1)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let expected = [("m2", 2u8), ("m3", 3), ("m4", 4)]
            .map(|(id, p)| (id.to_string(), vec![p]))
            .to_vec();
        assert_eq!(rows, expected);
        let table: String = conn.query_row(
            "SELECT sql FROM sqlite_schema WHERE name = 'outbox'",
            [],
            |row| row.get(0),
        )?;
        assert!(!table.contains("AUTOINCREMENT"), "{table}");
        let plan = conn
            .prepare(
                "EXPLAIN QUERY PLAN SELECT id FROM workflow_instances WHERE partner_id = 'p' \
                 AND status = 'running' ORDER BY id DESC LIMIT 10",
            )?
            .query_map([], |row| row.get::<_, String>(3))?
            .collect::<Result<Vec<_>, _>>()?;
        assert_eq!(plan.len(), 1, "{plan:?}");
        assert!(
            plan[0].contains("workflow_instances_partner_status"),
            "{plan:?}"
        );
        Ok(())
    }
}
