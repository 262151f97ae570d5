//! The PayOS **sandbox**'s ledger: the calls a sandbox answered, in `payos_sandbox_transfers`.
//!
//! Dev and local runs only, not real money: the sandbox (`workflow_egress::payos_sandbox`)
//! stands in for PayOS, and this table lets its idempotency survive a restart. One row per
//! `Idempotency-Key` (a unique index): [`Store::record_sandbox_transfer`] inserts with
//! `ON CONFLICT DO NOTHING` and hands back whichever row holds the key, so racing calls with one
//! key record once. The store knows nothing of HTTP or of the sandbox's rules (fingerprints,
//! 409s): it keeps what the sandbox computed. The adapter implementing the sandbox's
//! `SandboxLedger` trait on top of this lives in `payos-workflows` (the crate that sees both),
//! so neither this crate nor the egress crate depends on the other.
//!
//! Must never: be read or written by the engine's workflow code, or hold real transfers.

use serde_json::Value;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};
use workflow_core::Timestamp;

use crate::{Store, StoreError};

/// One call the sandbox answered.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxTransferRecord {
    pub idempotency_key: String,
    /// `execute_transfer`, `cancel_transfer` or `simulate_transfer`.
    pub action: String,
    pub transfer_id: String,
    /// The request body as received.
    pub request: Value,
    /// The sandbox's fingerprint of the request (a key reused for another request is refused).
    pub fingerprint: String,
    /// The HTTP status answered.
    pub status: i64,
    /// The body answered; a replay answers it again.
    pub response: Value,
    pub recorded_at: Timestamp,
}

/// What [`Store::record_sandbox_transfer`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum SandboxRecordOutcome {
    /// The call was new and is now recorded.
    Inserted(SandboxTransferRecord),
    /// Its idempotency key was taken: nothing was written, this is the call holding it.
    Existing(SandboxTransferRecord),
}

const COLS: &str = "idempotency_key, action, transfer_id, request, fingerprint, status, \
     response, recorded_at";

fn json_col(r: &AnyRow, col: &str, key: &str) -> Result<Value, StoreError> {
    let raw: String = r.try_get(col)?;
    serde_json::from_str(&raw).map_err(|e| {
        StoreError::corrupt(format!(
            "sandbox transfer {key}: {col} does not decode: {e}"
        ))
    })
}

fn from_row(r: &AnyRow) -> Result<SandboxTransferRecord, StoreError> {
    let key: String = r.try_get("idempotency_key")?;
    Ok(SandboxTransferRecord {
        request: json_col(r, "request", &key)?,
        response: json_col(r, "response", &key)?,
        action: r.try_get("action")?,
        transfer_id: r.try_get("transfer_id")?,
        fingerprint: r.try_get("fingerprint")?,
        status: r.try_get("status")?,
        recorded_at: Timestamp(r.try_get("recorded_at")?),
        idempotency_key: key,
    })
}

async fn find_in(
    conn: &mut AnyConnection,
    idempotency_key: &str,
) -> Result<Option<SandboxTransferRecord>, StoreError> {
    let sql = format!("SELECT {COLS} FROM payos_sandbox_transfers WHERE idempotency_key = $1");
    let row = sqlx::query(&sql)
        .bind(idempotency_key)
        .fetch_optional(&mut *conn)
        .await?;
    row.as_ref().map(from_row).transpose()
}

fn encode(value: &Value, what: &str) -> Result<String, StoreError> {
    serde_json::to_string(value)
        .map_err(|e| StoreError::corrupt(format!("cannot encode a sandbox {what}: {e}")))
}

impl Store {
    /// The sandbox call recorded under `idempotency_key`, if any.
    pub async fn find_sandbox_transfer(
        &self,
        idempotency_key: &str,
    ) -> Result<Option<SandboxTransferRecord>, StoreError> {
        let mut conn = self.pool().acquire().await?;
        find_in(&mut conn, idempotency_key).await
    }

    /// Record `call` unless its idempotency key is taken, atomically: racing callers with one
    /// key record once, and each gets the row that holds the key.
    pub async fn record_sandbox_transfer(
        &self,
        call: &SandboxTransferRecord,
    ) -> Result<SandboxRecordOutcome, StoreError> {
        let request = encode(&call.request, "request")?;
        let response = encode(&call.response, "response")?;
        let mut tx = self.begin_write().await?;
        let done = sqlx::query(
            "INSERT INTO payos_sandbox_transfers (idempotency_key, action, transfer_id, request, \
             fingerprint, status, response, recorded_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (idempotency_key) DO NOTHING",
        )
        .bind(call.idempotency_key.as_str())
        .bind(call.action.as_str())
        .bind(call.transfer_id.as_str())
        .bind(request)
        .bind(call.fingerprint.as_str())
        .bind(call.status)
        .bind(response)
        .bind(call.recorded_at.0)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 1 {
            tx.commit().await?;
            return Ok(SandboxRecordOutcome::Inserted(call.clone()));
        }
        let existing = find_in(&mut tx, &call.idempotency_key).await?;
        tx.commit().await?;
        existing
            .map(SandboxRecordOutcome::Existing)
            .ok_or_else(|| StoreError::NotFound {
                what: "sandbox transfer with idempotency key",
                id: call.idempotency_key.clone(),
            })
    }

    /// Every recorded sandbox call, oldest first.
    pub async fn list_sandbox_transfers(&self) -> Result<Vec<SandboxTransferRecord>, StoreError> {
        let sql = format!("SELECT {COLS} FROM payos_sandbox_transfers ORDER BY seq ASC");
        let rows = sqlx::query(&sql).fetch_all(self.pool()).await?;
        rows.iter().map(from_row).collect()
    }

    /// The recorded sandbox calls for one transfer, oldest first.
    pub async fn list_sandbox_transfers_for(
        &self,
        transfer_id: &str,
    ) -> Result<Vec<SandboxTransferRecord>, StoreError> {
        let sql = format!(
            "SELECT {COLS} FROM payos_sandbox_transfers WHERE transfer_id = $1 ORDER BY seq ASC"
        );
        let rows = sqlx::query(&sql)
            .bind(transfer_id)
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(from_row).collect()
    }
}
