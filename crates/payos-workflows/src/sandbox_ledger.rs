//! The PayOS **sandbox**'s ledger on the engine's store (`payos_sandbox_transfers`): what `dev`
//! and the `sandbox` subcommand record their calls in, so the sandbox's idempotency survives a
//! restart (the same `Idempotency-Key` replays the recorded response instead of executing
//! again) and its records stay visible at `/sandbox/transfers`. Not real money.
//!
//! Why an adapter here: the sandbox and its `SandboxLedger` trait live in `workflow-egress`,
//! which must not touch the store; the SQL lives in `workflow-store`, which knows nothing of
//! HTTP. This binary crate already depends on both, so it implements the trait by translating
//! between the two record types, and neither library gains a dependency.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use workflow_core::Timestamp;
use workflow_egress::payos_sandbox::{
    LedgerError, Recorded, RecordedCall, SandboxLedger, SandboxState,
};
use workflow_egress::PayosAction;
use workflow_store::{SandboxRecordOutcome, SandboxTransferRecord, Store, StoreError};

/// The default database of `payos-workflows sandbox`.
pub const DEFAULT_SANDBOX_DATABASE_URL: &str = "sqlite://./.payos-workflows/sandbox.db";

/// A [`SandboxLedger`] on the store's `payos_sandbox_transfers` table.
#[derive(Debug, Clone)]
pub struct SqlSandboxLedger {
    store: Store,
}

impl SqlSandboxLedger {
    /// A ledger on `store` (migrated).
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

/// A sandbox recording into `store` (migrated), accepting any API key: what `dev` serves.
pub fn sandbox_on(store: Store) -> SandboxState {
    SandboxState::new(Arc::new(SqlSandboxLedger::new(store)))
}

/// Connect to `database_url`, apply the migrations and return a sandbox recording there: what
/// the `sandbox` subcommand serves. The store is returned too, to be closed on shutdown.
pub async fn open_sandbox(database_url: &str) -> Result<(Store, SandboxState), StoreError> {
    let store = Store::connect(database_url).await?;
    store.migrate().await?;
    Ok((store.clone(), sandbox_on(store)))
}

fn ledger_error(e: &StoreError) -> LedgerError {
    LedgerError {
        message: e.to_string(),
    }
}

fn to_record(call: &RecordedCall) -> SandboxTransferRecord {
    SandboxTransferRecord {
        idempotency_key: call.idempotency_key.clone(),
        action: call.action.name().to_owned(),
        transfer_id: call.transfer_id.clone(),
        request: call.request.clone(),
        fingerprint: call.fingerprint.clone(),
        status: i64::from(call.status),
        response: call.response.clone(),
        recorded_at: Timestamp(call.recorded_at.timestamp_millis()),
    }
}

fn from_record(rec: SandboxTransferRecord) -> Result<RecordedCall, LedgerError> {
    let corrupt = |what: &str| LedgerError {
        message: format!(
            "sandbox transfer {}: stored {what} is invalid",
            rec.idempotency_key
        ),
    };
    let action = PayosAction::from_name(&rec.action).ok_or_else(|| corrupt("action"))?;
    let status = u16::try_from(rec.status).map_err(|_| corrupt("status"))?;
    let recorded_at: DateTime<Utc> =
        DateTime::from_timestamp_millis(rec.recorded_at.0).ok_or_else(|| corrupt("time"))?;
    Ok(RecordedCall {
        idempotency_key: rec.idempotency_key,
        action,
        transfer_id: rec.transfer_id,
        request: rec.request,
        fingerprint: rec.fingerprint,
        status,
        response: rec.response,
        recorded_at,
    })
}

#[async_trait]
impl SandboxLedger for SqlSandboxLedger {
    async fn find(&self, idempotency_key: &str) -> Result<Option<RecordedCall>, LedgerError> {
        self.store
            .find_sandbox_transfer(idempotency_key)
            .await
            .map_err(|e| ledger_error(&e))?
            .map(from_record)
            .transpose()
    }

    async fn record_once(&self, call: RecordedCall) -> Result<Recorded, LedgerError> {
        let outcome = self
            .store
            .record_sandbox_transfer(&to_record(&call))
            .await
            .map_err(|e| ledger_error(&e))?;
        Ok(match outcome {
            // What was recorded, at the store's precision (milliseconds), so a replay after a
            // restart answers exactly what the first call did.
            SandboxRecordOutcome::Inserted(rec) => Recorded::New(from_record(rec)?),
            SandboxRecordOutcome::Existing(rec) => Recorded::Existing(from_record(rec)?),
        })
    }

    async fn calls(&self) -> Result<Vec<RecordedCall>, LedgerError> {
        self.store
            .list_sandbox_transfers()
            .await
            .map_err(|e| ledger_error(&e))?
            .into_iter()
            .map(from_record)
            .collect()
    }

    async fn calls_for(&self, transfer_id: &str) -> Result<Vec<RecordedCall>, LedgerError> {
        self.store
            .list_sandbox_transfers_for(transfer_id)
            .await
            .map_err(|e| ledger_error(&e))?
            .into_iter()
            .map(from_record)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn records_round_trip_at_millisecond_precision() {
        let at = DateTime::from_timestamp_millis(1_700_000_000_123).unwrap_or_default();
        let call = RecordedCall {
            idempotency_key: "wf_x".into(),
            action: PayosAction::CancelTransfer,
            transfer_id: "tr_1".into(),
            request: json!({"reason": "dup"}),
            fingerprint: "fp".into(),
            status: 200,
            response: json!({"status": "cancelled"}),
            recorded_at: at,
        };
        let back = from_record(to_record(&call)).map_err(|e| e.to_string());
        assert_eq!(back, Ok(call));
    }

    #[test]
    fn invalid_stored_values_are_errors_not_panics() {
        let mut rec = SandboxTransferRecord {
            idempotency_key: "k".into(),
            action: "wire_money".into(),
            transfer_id: "t".into(),
            request: json!({}),
            fingerprint: "f".into(),
            status: 200,
            response: json!({}),
            recorded_at: Timestamp(0),
        };
        assert!(from_record(rec.clone()).is_err());
        rec.action = "execute_transfer".into();
        rec.status = 70_000;
        assert!(from_record(rec).is_err());
    }
}
