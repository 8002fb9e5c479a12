//! The supervisor's notion of "now": Tokio's monotonic clock anchored to the wall clock.
//!
//! Deadlines are compared with [`ProcessInstance::updated_at`](architectlm_core::ProcessInstance),
//! a wall-clock timestamp. Reading the wall clock directly would make the checks jump with clock
//! adjustments and would ignore `tokio::time::pause` in tests. Instead the wall clock is read once
//! and every later "now" is that reading plus the time elapsed on Tokio's clock, so supervision
//! follows a paused or advanced test clock and never moves backwards.

use chrono::{DateTime, Utc};
use tokio::time::Instant;

/// Wall time at a Tokio instant, advanced by Tokio's clock.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    wall: DateTime<Utc>,
    mono: Instant,
}

impl Clock {
    /// A clock anchored now.
    pub(crate) fn new() -> Self {
        Self {
            wall: Utc::now(),
            mono: Instant::now(),
        }
    }

    /// The current wall time as seen through Tokio's clock.
    pub(crate) fn now(&self) -> DateTime<Utc> {
        let elapsed = Instant::now().saturating_duration_since(self.mono);
        chrono::Duration::from_std(elapsed)
            .ok()
            .and_then(|d| self.wall.checked_add_signed(d))
            .unwrap_or(self.wall)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn follows_a_paused_tokio_clock() {
        let clock = Clock::new();
        let before = clock.now();
        tokio::time::advance(Duration::from_secs(90)).await;
        let after = clock.now();
        assert_eq!((after - before).num_seconds(), 90);
    }
}
