//! Time as the domain sees it: milliseconds since the Unix epoch, always passed in.

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch (UTC). The domain never reads a clock; callers pass `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn millis(self) -> i64 {
        self.0
    }

    /// This instant plus a number of milliseconds, saturating instead of overflowing.
    pub fn plus_millis(self, ms: i64) -> Timestamp {
        Timestamp(self.0.saturating_add(ms))
    }
}
