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
