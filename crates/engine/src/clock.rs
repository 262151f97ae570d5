//! The clock adapter: the only place the engine reads the time.

use std::time::{SystemTime, UNIX_EPOCH};

use workflow_core::Timestamp;

/// A source of "now", injectable so tests can run hours of workflow time in milliseconds.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Timestamp;
}

/// Wall-clock time.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        Timestamp(ms)
    }
}

/// A clock that moves only when told: tests run a 48-hour deadline in milliseconds.
#[derive(Debug, Default)]
pub struct ManualClock {
    now_ms: std::sync::atomic::AtomicI64,
}

impl ManualClock {
    pub fn new(start: Timestamp) -> ManualClock {
        ManualClock {
            now_ms: std::sync::atomic::AtomicI64::new(start.0),
        }
    }

    /// Move time forward (never backwards).
    pub fn advance(&self, ms: i64) {
        self.now_ms
            .fetch_add(ms.max(0), std::sync::atomic::Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.now_ms.load(std::sync::atomic::Ordering::SeqCst))
    }
}
