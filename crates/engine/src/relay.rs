//! The outbox relay: moves committed outbox rows onto the bus, then deletes them.
//!
//! A state change and the messages it causes commit together in the store; this is what makes
//! them leave. Two paths, one task per process:
//! - **Fast path.** The process that committed rows hands them to its [`Outbox`] right after the
//!   commit; the relay publishes them at once (in commit order per process, one batch in flight)
//!   and deletes them (within [`DELETE_DELAY`], several batches' rows in one statement). No
//!   second process is involved, so a step's command reaches its pool
//!   within one bus round trip of the commit.
//! - **Sweep.** Rows whose process died between commit and publish stay in the table. Every
//!   [`SWEEP`] a relay makes a pass under the store's relay lock (one process at a time,
//!   [`Store::relay_pass`]) and publishes the rows it already saw on its previous pass: rows at
//!   least one sweep old, which no fast path is still handling. With the event lane only the
//!   lane's leader sweeps (one pass a second is enough; each steps over the queue's dead rows),
//!   so the sweep moves with the lead.
//!
//! - **Event lane** (an outbox made [`Outbox::with_event_lane`], the distributed runtime's).
//!   Messages for services outside the engine ([`EVENT_LANE`]: lifecycle events) skip the fast
//!   path: no step waits on them, and published one commit at a time they
//!   cost the broker a request each (librdkafka sends one partition per produce request). The
//!   process leading the lane ([`Store::lead_event_lane`], one at a time) publishes every
//!   process's rows of it in commit order, at most every [`EVENT_PASS`] while they keep coming
//!   (every [`EVENT_IDLE`] when none came), so a pass sends one batch per partition. An
//!   instance's events keep their order: its commits are serialised, and the lane reads in
//!   commit order. The other relays try to take the lead every [`SWEEP`], so it moves within
//!   about a second of its leader's death. The embedded runtime's in-process bus charges
//!   nothing per request, so there these rows take the fast path like the rest.
//!
//! Delivery is at-least-once: a crash between publish and delete, or a sweep overlapping a slow
//! fast path, publishes a row twice, and consumers recognise the redelivered commands. An
//! instance has one command in flight at a time, so its commands keep their order.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use workflow_bus::{Bus, Outgoing};
use workflow_store::records::OutboxMessage;
use workflow_store::{EventLaneLeader, RelayPass, Store};

use crate::messages::LIFECYCLE_TOPIC;

/// The topics of the event lane: messages for services outside the engine.
pub const EVENT_LANE: &[&str] = &[LIFECYCLE_TOPIC];
/// How often the lane's leader publishes while rows keep coming: the most an event waits.
pub const EVENT_PASS: Duration = Duration::from_millis(100);
/// How often the lane's leader looks for rows after a pass found none.
pub const EVENT_IDLE: Duration = Duration::from_millis(250);
/// Rows one event-lane pass publishes at most.
const EVENT_BATCH: u32 = 2048;

/// Rows one sweep pass looks at.
const SWEEP_BATCH: u32 = 512;
/// Rows one fast-path publish carries at most.
const FAST_BATCH: usize = 2048;
/// How often a relay sweeps for rows no fast path published.
pub const SWEEP: Duration = Duration::from_millis(1000);
/// Back-off after a failed publish.
const BACKOFF: Duration = Duration::from_millis(250);
/// How long published rows may wait to be deleted, so the deletes of several fast-path batches
/// share one statement (each is a write transaction on SQLite's single writer). Far below
/// [`SWEEP`], and the relay deletes before each sweep, so a sweep never republishes them.
const DELETE_DELAY: Duration = Duration::from_millis(20);
/// Published rows that are deleted at once, without waiting for [`DELETE_DELAY`].
const DELETE_BATCH: usize = 1024;

/// The rows this process committed and has not published yet.
#[derive(Debug, Default)]
pub struct Outbox {
    pending: Mutex<Vec<OutboxMessage>>,
    ready: Notify,
    /// Set when rows were committed without being handed over: the next pass sweeps them now.
    sweep_now: std::sync::atomic::AtomicBool,
    /// Set when this process committed rows of the event lane (which the fast path leaves).
    events_committed: std::sync::atomic::AtomicBool,
    /// Wakes the event lane's task.
    events: Notify,
    /// Whether [`EVENT_LANE`] rows take the event lane ([`Outbox::with_event_lane`]) or, like
    /// every other row, the fast path.
    lane: bool,
    /// Set while this process leads the event lane: with a lane, only its leader sweeps.
    leads_lane: std::sync::atomic::AtomicBool,
}

impl Outbox {
    /// An outbox whose [`EVENT_LANE`] rows stay in the table for the lane's leader.
    pub fn with_event_lane() -> Outbox {
        Outbox {
            lane: true,
            ..Outbox::default()
        }
    }

    /// Hand over rows just committed. With the event lane, its rows stay in the table for the
    /// lane's leader.
    pub fn committed(&self, rows: &[OutboxMessage]) {
        let mut events = false;
        let mut commands = false;
        {
            let mut pending = self.lock();
            for row in rows {
                if self.lane && is_event(row) {
                    events = true;
                } else {
                    commands = true;
                    pending.push(row.clone());
                }
            }
        }
        if events {
            self.events_committed
                .store(true, std::sync::atomic::Ordering::SeqCst);
            self.events.notify_one();
        }
        if commands {
            self.ready.notify_one();
        }
    }

    /// Rows were committed that this process does not hold (written by the store itself):
    /// publish whatever the outbox table has, now.
    pub fn sweep_soon(&self) {
        self.sweep_now
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.ready.notify_one();
    }

    /// How many rows wait for the fast path.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn take(&self, max: usize) -> Vec<OutboxMessage> {
        let mut pending = self.lock();
        let n = pending.len().min(max);
        pending.drain(..n).collect()
    }

    /// Put rows back at the front after a failed publish, keeping their order.
    fn restore(&self, rows: Vec<OutboxMessage>) {
        let mut pending = self.lock();
        let later = std::mem::replace(&mut *pending, rows);
        pending.extend(later);
    }

    /// Whether this process's relay makes the periodic sweep: every relay without the event
    /// lane, only the lane's leader with it (one sweep a second is enough, and each pass steps
    /// over the queue's dead rows; the lead moves within a second of its holder's death).
    fn sweeps(&self) -> bool {
        !self.lane || self.leads_lane.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<OutboxMessage>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Store(#[from] workflow_store::StoreError),
    #[error(transparent)]
    Bus(#[from] workflow_bus::BusError),
}

fn is_event(row: &OutboxMessage) -> bool {
    EVENT_LANE.contains(&row.topic.as_str())
}

fn outgoing(rows: &[OutboxMessage]) -> Vec<Outgoing> {
    rows.iter()
        .map(|row| Outgoing {
            topic: row.topic.clone(),
            key: row.key.clone(),
            payload: row.payload.clone(),
        })
        .collect()
}

/// Publish what the fast path holds; returns how many rows left the outbox.
pub async fn publish_pending(
    store: &Store,
    bus: &dyn Bus,
    outbox: &Outbox,
) -> Result<usize, RelayError> {
    let mut published = Vec::new();
    let result = publish_into(bus, outbox, &mut published).await;
    delete_published(store, &mut published).await;
    result
}

/// Publish what the fast path holds, adding the published ids to `published` (to delete).
async fn publish_into(
    bus: &dyn Bus,
    outbox: &Outbox,
    published: &mut Vec<String>,
) -> Result<usize, RelayError> {
    let mut total = 0;
    loop {
        let rows = outbox.take(FAST_BATCH);
        if rows.is_empty() {
            return Ok(total);
        }
        if let Err(e) = bus.publish_batch(outgoing(&rows)).await {
            outbox.restore(rows);
            return Err(e.into());
        }
        total += rows.len();
        published.extend(rows.into_iter().map(|r| r.id));
    }
}

/// Delete published rows and empty `ids`. A failed delete only means the sweep publishes them
/// again (consumers skip redelivered messages).
async fn delete_published(store: &Store, ids: &mut Vec<String>) {
    if ids.is_empty() {
        return;
    }
    if let Err(e) = store.delete_published(ids).await {
        tracing::warn!(error = %e, rows = ids.len(), "published outbox rows not deleted; the sweep will republish them");
    }
    ids.clear();
}

/// One sweep pass: publish the rows of the outbox table that `seen` already held (or every row
/// when `all`), and remember the others for the next pass; with the event `lane`, its rows are
/// left to it. Returns how many were published.
pub async fn sweep_once(
    store: &Store,
    bus: &dyn Bus,
    seen: &mut HashSet<String>,
    all: bool,
    lane: bool,
) -> Result<usize, RelayError> {
    let mut fresh = HashSet::new();
    let lane_topics: &[&str] = if lane { EVENT_LANE } else { &[] };
    let pass = store
        .relay_pass(lane_topics, SWEEP_BATCH, |rows| {
            let (old, new): (Vec<_>, Vec<_>) =
                rows.into_iter().partition(|r| all || seen.contains(&r.id));
            fresh = new.into_iter().map(|r| r.id).collect();
            async move {
                if old.is_empty() {
                    return Ok::<_, RelayError>(Vec::new());
                }
                bus.publish_batch(outgoing(&old))
                    .await
                    .map_err(RelayError::from)?;
                Ok(old.into_iter().map(|r| r.id).collect())
            }
        })
        .await?;
    *seen = fresh;
    Ok(match pass {
        RelayPass::Published(n) => n,
        RelayPass::NotLeader => 0,
    })
}

/// One pass of the event lane's leader: publish the oldest rows of each of its topics. Returns
/// how many left.
pub async fn event_pass(
    store: &Store,
    bus: &dyn Bus,
    leader: &mut EventLaneLeader,
) -> Result<usize, RelayError> {
    let mut total = 0;
    for topic in EVENT_LANE {
        total += store
            .event_pass::<_, _, RelayError>(leader, topic, EVENT_BATCH, |rows| async move {
                bus.publish_batch(outgoing(&rows))
                    .await
                    .map_err(RelayError::from)?;
                Ok(rows.into_iter().map(|r| r.id).collect())
            })
            .await?;
    }
    Ok(total)
}

/// This relay's part in the event lane: its leadership, and when it next acts.
struct EventLane {
    leader: Option<EventLaneLeader>,
    next: tokio::time::Instant,
}

impl EventLane {
    /// Lead or pass, if due; a relay that does not lead tries to take the lead every [`SWEEP`].
    async fn act(&mut self, store: &Store, bus: &dyn Bus, committed_events: bool) {
        let now = tokio::time::Instant::now();
        if committed_events && self.leader.is_some() {
            // This process's own events: an idle leader need not wait out EVENT_IDLE.
            self.next = self.next.min(now + EVENT_PASS);
        }
        if now < self.next {
            return;
        }
        let Some(leader) = self.leader.as_mut() else {
            self.next = now + SWEEP;
            match store.lead_event_lane().await {
                Ok(Some(leader)) => {
                    tracing::info!("this process leads the outbox's event lane");
                    self.leader = Some(leader);
                    self.next = now;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "cannot take the event lane's lead"),
            }
            return;
        };
        self.next = match event_pass(store, bus, leader).await {
            Ok(0) => now + EVENT_IDLE,
            Ok(_) => now + EVENT_PASS,
            Err(RelayError::Bus(e)) => {
                tracing::warn!(error = %e, "event lane publish failed; retrying");
                now + BACKOFF
            }
            Err(RelayError::Store(e)) => {
                // Its session may be gone, and the lock with it: lead again only once re-won.
                tracing::warn!(error = %e, "event lane pass failed; giving up the lead");
                self.leader = None;
                now + BACKOFF
            }
        };
    }

    /// On shutdown: publish what the lane holds, if this relay leads it.
    async fn drain(&mut self, store: &Store, bus: &dyn Bus) {
        let Some(leader) = self.leader.as_mut() else {
            return;
        };
        loop {
            match event_pass(store, bus, leader).await {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "event lane rows left for the next leader");
                    return;
                }
            }
        }
    }
}

/// Run until cancelled: publish handed-over rows as soon as they come, sweep every [`SWEEP`],
/// and take part in the event lane if the outbox has one ([`Outbox::with_event_lane`]). On
/// cancellation, what is handed over is published before returning, and the lane's rows too if
/// this relay leads it.
pub async fn run(store: Store, bus: Arc<dyn Bus>, outbox: Arc<Outbox>, cancel: CancellationToken) {
    // Two loops in one task: a lane pass's round trips never hold up the fast path.
    let lane = async {
        if outbox.lane {
            run_event_lane(&store, bus.as_ref(), &outbox, &cancel).await;
        }
    };
    tokio::join!(run_fast_path(&store, bus.as_ref(), &outbox, &cancel), lane);
}

/// The event lane's loop: lead or pass when due, until cancelled.
async fn run_event_lane(store: &Store, bus: &dyn Bus, outbox: &Outbox, cancel: &CancellationToken) {
    let mut lane = EventLane {
        leader: None,
        next: tokio::time::Instant::now(),
    };
    loop {
        let committed = outbox
            .events_committed
            .swap(false, std::sync::atomic::Ordering::SeqCst);
        lane.act(store, bus, committed).await;
        outbox
            .leads_lane
            .store(lane.leader.is_some(), std::sync::atomic::Ordering::SeqCst);
        tokio::select! {
            _ = cancel.cancelled() => {
                lane.drain(store, bus).await;
                return;
            }
            _ = outbox.events.notified() => {}
            _ = tokio::time::sleep_until(lane.next) => {}
        }
    }
}

/// The fast path and the sweep, until cancelled.
async fn run_fast_path(store: &Store, bus: &dyn Bus, outbox: &Outbox, cancel: &CancellationToken) {
    let mut seen = HashSet::new();
    let mut next_sweep = tokio::time::Instant::now();
    // Published ids not deleted yet, and when they must be.
    let mut published: Vec<String> = Vec::new();
    let mut delete_by: Option<tokio::time::Instant> = None;
    loop {
        let result = publish_into(bus, outbox, &mut published).await;
        if !published.is_empty() && delete_by.is_none() {
            delete_by = Some(tokio::time::Instant::now() + DELETE_DELAY);
        }
        let now_requested = outbox
            .sweep_now
            .swap(false, std::sync::atomic::Ordering::SeqCst);
        let sweep_due = now_requested || tokio::time::Instant::now() >= next_sweep;
        if published.len() >= DELETE_BATCH
            || sweep_due
            || delete_by.is_some_and(|t| tokio::time::Instant::now() >= t)
        {
            delete_published(store, &mut published).await;
            delete_by = None;
        }
        if let Err(e) = result {
            tracing::warn!(error = %e, "outbox publish failed; retrying");
            tokio::select! {
                _ = cancel.cancelled() => {
                    delete_published(store, &mut published).await;
                    return;
                }
                _ = tokio::time::sleep(BACKOFF) => {}
            }
            continue;
        }
        if sweep_due {
            // Rows this process committed without handing them over are swept at once by it.
            if now_requested || outbox.sweeps() {
                match sweep_once(store, bus, &mut seen, now_requested, outbox.lane).await {
                    Ok(n) if n > 0 => tracing::debug!(rows = n, "outbox sweep published rows"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "outbox sweep failed; retrying"),
                }
            } else {
                // Not sweeping: what it saw is no longer a pass ago.
                seen.clear();
            }
            next_sweep = tokio::time::Instant::now() + SWEEP;
        }
        tokio::select! {
            _ = cancel.cancelled() => {
                // Publish what was handed over before stopping (SIGTERM drains in-flight work).
                let result = publish_into(bus, outbox, &mut published).await;
                delete_published(store, &mut published).await;
                if let Err(e) = result {
                    tracing::warn!(error = %e, "outbox rows left for the next relay");
                }
                return;
            }
            _ = outbox.ready.notified() => {}
            _ = tokio::time::sleep_until(next_sweep) => {}
            _ = tokio::time::sleep_until(delete_by.unwrap_or(next_sweep)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(topic: &str) -> OutboxMessage {
        OutboxMessage {
            id: uuid::Uuid::now_v7().to_string(),
            topic: topic.into(),
            key: "i-1".into(),
            payload: Vec::new(),
        }
    }

    fn topics(outbox: &Outbox) -> Vec<String> {
        outbox
            .take(FAST_BATCH)
            .into_iter()
            .map(|r| r.topic)
            .collect()
    }

    #[test]
    fn with_the_event_lane_only_commands_take_the_fast_path() {
        let rows = [
            row("workflow.steps.action"),
            row(LIFECYCLE_TOPIC),
            row("workflow.approvals.decisions"),
        ];
        let lane = Outbox::with_event_lane();
        lane.committed(&rows);
        assert_eq!(
            topics(&lane),
            ["workflow.steps.action", "workflow.approvals.decisions"]
        );
        assert!(lane
            .events_committed
            .load(std::sync::atomic::Ordering::SeqCst));

        let plain = Outbox::default();
        plain.committed(&rows);
        assert_eq!(
            topics(&plain),
            [
                "workflow.steps.action",
                LIFECYCLE_TOPIC,
                "workflow.approvals.decisions"
            ],
            "no lane: every row, in order"
        );
        assert!(!plain
            .events_committed
            .load(std::sync::atomic::Ordering::SeqCst));
    }

    #[test]
    fn with_the_event_lane_only_its_leader_sweeps() {
        assert!(Outbox::default().sweeps(), "no lane: every relay sweeps");
        let lane = Outbox::with_event_lane();
        assert!(
            !lane.sweeps(),
            "a relay that does not lead leaves the sweep"
        );
        lane.leads_lane
            .store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(lane.sweeps(), "the lane's leader sweeps");
    }
}
