//! The outbox relay: publishes committed outbox rows onto the bus, oldest first, then deletes them.
//!
//! A state change and the commands it causes commit together in the store; this loop is what
//! makes them leave. It is at-least-once: a crash between publish and delete republishes the
//! rows, and consumers recognise the redelivered commands. Rows are published in commit order,
//! so one instance's commands keep their order on its partition.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use workflow_bus::Bus;
use workflow_store::Store;

/// How many rows one pass publishes.
const BATCH: u32 = 512;
/// How often the relay looks even without a wake-up (commits made by other processes).
const POLL: Duration = Duration::from_millis(50);
/// Back-off after a failed pass.
const BACKOFF: Duration = Duration::from_millis(250);

/// Publish one batch; returns how many rows left the outbox.
pub async fn relay_once(store: &Store, bus: &dyn Bus) -> Result<usize, RelayError> {
    let rows = store.fetch_outbox(BATCH).await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut ids = Vec::with_capacity(rows.len());
    for row in rows {
        bus.publish(&row.topic, &row.key, row.payload).await?;
        ids.push(row.id);
    }
    store.delete_outbox(&ids).await?;
    Ok(ids.len())
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Store(#[from] workflow_store::StoreError),
    #[error(transparent)]
    Bus(#[from] workflow_bus::BusError),
}

/// Run until cancelled: relay whenever woken, and at least every [`POLL`].
pub async fn run(store: Store, bus: Arc<dyn Bus>, wake: Arc<Notify>, cancel: CancellationToken) {
    loop {
        match relay_once(&store, bus.as_ref()).await {
            // A full batch: there may be more waiting.
            Ok(n) if n as u32 >= BATCH => continue,
            Ok(_) => {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(POLL) => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "outbox relay pass failed; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(BACKOFF) => {}
                }
            }
        }
        if cancel.is_cancelled() {
            return;
        }
    }
}
