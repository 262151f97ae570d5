//! What a scheduler in this process is told about the timers this process stores.
//!
//! A scheduler looks at the timers table on its own every `max_idle` (other processes store
//! timers too), and sooner only when a commit here stored a timer due before that look. Most
//! timers are far off (an approval's deadline is hours away): waking the scheduler for each
//! one cost the embedded runtime a write transaction and a read per commit that stored one
//! (about 500 a second at 1,000 instances/s; round 23 in docs/benchmarks.md).

use std::sync::atomic::{AtomicI64, Ordering};

use tokio::sync::Notify;
use workflow_store::records::TimerRecord;

/// Shared by the engine, which reports the timers it committed, and the scheduler.
#[derive(Debug)]
pub struct TimerWake {
    notify: Notify,
    /// The earliest due time (ms, the engine's clock) stored since the scheduler last took
    /// it; `i64::MAX` when none was.
    earliest: AtomicI64,
}

impl Default for TimerWake {
    fn default() -> Self {
        TimerWake {
            notify: Notify::new(),
            earliest: AtomicI64::new(i64::MAX),
        }
    }
}

impl TimerWake {
    /// `timers` were committed (none: nothing to tell).
    pub fn stored(&self, timers: &[TimerRecord]) {
        let Some(due) = timers.iter().map(|t| t.due_at.0).min() else {
            return;
        };
        self.earliest.fetch_min(due, Ordering::AcqRel);
        // Kept as a permit if the scheduler is not waiting right now.
        self.notify.notify_one();
    }

    /// Returns once a timer due before `deadline` (ms, the engine's clock) was stored. Timers
    /// due later are left to the look the scheduler makes at `deadline` anyway.
    pub async fn sooner_than(&self, deadline: i64) {
        loop {
            self.notify.notified().await;
            if self.earliest.swap(i64::MAX, Ordering::AcqRel) < deadline {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use workflow_core::Timestamp;

    use super::*;

    fn timer(due: i64) -> TimerRecord {
        TimerRecord {
            id: format!("t{due}"),
            partner_id: "p".into(),
            instance_id: "i".into(),
            step_index: 0,
            step_type: "wait".into(),
            kind: "wait".into(),
            due_at: Timestamp(due),
        }
    }

    #[tokio::test]
    async fn only_a_timer_due_before_the_next_look_wakes_the_scheduler() {
        let wake = TimerWake::default();
        // Stored before the scheduler waits: remembered.
        wake.stored(&[timer(5_000), timer(900)]);
        tokio::time::timeout(Duration::from_secs(5), wake.sooner_than(1_000))
            .await
            .expect("a timer due at 900 wakes a look planned for 1,000");

        wake.stored(&[timer(2_000)]);
        wake.stored(&[]);
        let later = tokio::time::timeout(Duration::from_millis(100), wake.sooner_than(1_000)).await;
        assert!(later.is_err(), "a timer due after the look wakes nothing");

        // Taken while waiting, too.
        let waiting = tokio::spawn({
            let wake = std::sync::Arc::new(wake);
            let stored = wake.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                stored.stored(&[timer(10)]);
            });
            async move { wake.sooner_than(1_000).await }
        });
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken while waiting")
            .expect("the waiting task ends");
    }
}
