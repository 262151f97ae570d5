//! Signals of decision outcomes recorded by other processes (PostgreSQL only).
//!
//! In the distributed runtime the approval pool records a decision's outcome in one process and
//! the API call waiting for it sits in another. [`Store::record_decision_outcome`] sends a
//! `NOTIFY` on [`DECISION_OUTCOMES_CHANNEL`] with the decision id and whether it was accepted,
//! in the statement that inserts the outcome, so PostgreSQL delivers it only once the outcome is
//! committed. [`DecisionListener`] `LISTEN`s on its own connection and yields them.
//!
//! Notifications are transient: one sent while the listener is disconnected is lost. Callers
//! therefore keep a (slow) poll of the store as a safety net, and on [`DecisionSignal::Connected`]
//! re-check whatever they are waiting for, since outcomes may have been recorded meanwhile.
//!
//! [`Store::record_decision_outcome`]: crate::Store::record_decision_outcome

use std::time::{Duration, Instant};

use sqlx::postgres::PgListener;

use crate::{Backend, StoreError};

/// The channel recorded decision outcomes are announced on; the payload is the decision id,
/// a space and `accepted` or `refused`.
pub const DECISION_OUTCOMES_CHANNEL: &str = "payos_decision_outcomes";

/// First wait before reconnecting after a failure; doubled per failure up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A connection that lived this long before dropping was healthy: reconnect at once, with the
/// back-off reset. A shorter one counts as a failure, so a flapping server is not hammered.
const HEALTHY: Duration = Duration::from_secs(30);

/// What [`DecisionListener::next`] observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecisionSignal {
    /// Listening (again). Outcomes recorded while not listening were not announced.
    Connected,
    /// The connection dropped; it is re-established on the next calls, with back-off.
    Disconnected,
    /// The outcome of this decision was committed.
    Decided {
        decision_id: String,
        /// Whether it was accepted; `None` for a payload of the id alone (an older engine's).
        accepted: Option<bool>,
    },
}

impl DecisionSignal {
    /// The signal a notification's payload carries (see [`DECISION_OUTCOMES_CHANNEL`]).
    pub fn decided(payload: &str) -> DecisionSignal {
        let (id, accepted) = match payload.rsplit_once(' ') {
            Some((id, "accepted")) => (id, Some(true)),
            Some((id, "refused")) => (id, Some(false)),
            _ => (payload, None),
        };
        DecisionSignal::Decided {
            decision_id: id.to_string(),
            accepted,
        }
    }
}

/// A `LISTEN` on [`DECISION_OUTCOMES_CHANNEL`] that reconnects by itself.
pub struct DecisionListener {
    url: String,
    listener: Option<PgListener>,
    connected_at: Option<Instant>,
    backoff: Duration,
    /// Wait `backoff` before the next connection attempt (the last one dropped quickly).
    delay: bool,
}

impl std::fmt::Debug for DecisionListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecisionListener")
            .field("connected", &self.listener.is_some())
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

impl DecisionListener {
    /// A listener on the PostgreSQL database at `url`. Does not connect yet: the first
    /// [`DecisionListener::next`] does. Other backends have nothing to listen to.
    pub fn new(url: &str) -> Result<DecisionListener, StoreError> {
        if Backend::from_url(url) != Some(Backend::Postgres) {
            return Err(StoreError::Database(sqlx::Error::Configuration(
                "decision outcome signals need a postgres:// database URL".into(),
            )));
        }
        Ok(DecisionListener {
            url: url.to_string(),
            listener: None,
            connected_at: None,
            backoff: BACKOFF_MIN,
            delay: false,
        })
    }

    /// Whether the listener is connected (as of its last [`DecisionListener::next`]).
    pub fn is_connected(&self) -> bool {
        self.listener.is_some()
    }

    /// Wait for the next signal. Never fails: connection errors are logged and retried with
    /// back-off, and reported as [`DecisionSignal::Disconnected`] once per lost connection.
    pub async fn next(&mut self) -> DecisionSignal {
        loop {
            let Some(listener) = self.listener.as_mut() else {
                if std::mem::take(&mut self.delay) {
                    self.pause().await;
                }
                match connect(&self.url).await {
                    Ok(listener) => {
                        self.listener = Some(listener);
                        self.connected_at = Some(Instant::now());
                        return DecisionSignal::Connected;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?self.backoff,
                            "cannot listen for decision outcomes");
                        self.pause().await;
                        continue;
                    }
                }
            };
            match listener.try_recv().await {
                Ok(Some(n)) if n.channel() == DECISION_OUTCOMES_CHANNEL => {
                    return DecisionSignal::decided(n.payload());
                }
                Ok(Some(_)) => continue,
                Ok(None) => tracing::warn!("decision outcome listener lost its connection"),
                Err(e) => tracing::warn!(error = %e, "decision outcome listener failed"),
            }
            self.listener = None;
            let lived = self.connected_at.take().map(|at| at.elapsed());
            if lived.is_some_and(|d| d >= HEALTHY) {
                self.backoff = BACKOFF_MIN;
            } else {
                // Dropped soon after connecting: wait before the next attempt, but report the
                // loss first so callers fall back to polling at once.
                self.delay = true;
            }
            return DecisionSignal::Disconnected;
        }
    }

    async fn pause(&mut self) {
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }
}

async fn connect(url: &str) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect(url).await?;
    // Reconnects are ours (with back-off and a Disconnected signal), not sqlx's silent ones.
    listener.eager_reconnect(false);
    listener.listen(DECISION_OUTCOMES_CHANNEL).await?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::DecisionSignal;

    fn decided(id: &str, accepted: Option<bool>) -> DecisionSignal {
        DecisionSignal::Decided {
            decision_id: id.into(),
            accepted,
        }
    }

    #[test]
    fn payloads_carry_the_id_and_the_verdict_of_the_outcome() {
        assert_eq!(
            DecisionSignal::decided("d1 accepted"),
            decided("d1", Some(true))
        );
        assert_eq!(
            DecisionSignal::decided("d1 refused"),
            decided("d1", Some(false))
        );
        // An older engine's payload is the id alone: the waiter reads the outcome.
        assert_eq!(DecisionSignal::decided("d1"), decided("d1", None));
        assert_eq!(
            DecisionSignal::decided("d1 other"),
            decided("d1 other", None)
        );
    }
}
