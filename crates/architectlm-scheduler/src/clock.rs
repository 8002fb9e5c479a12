//! Where the scheduler gets wall time from, and how it maps wall time onto the timer's
//! monotonic clock.
//!
//! Due times are wall-clock instants (UTC); timers run on Tokio's monotonic clock. A [`Clock`]
//! gives both views so that tests can run on a paused Tokio clock ([`TokioClock`]) and
//! production can follow the system clock ([`SystemClock`]).

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;

/// A source of wall time for the scheduler.
///
/// # Rules
/// - `Send + Sync`; called from the timer driver and from every operation.
/// - [`deadline`](Self::deadline) is an estimate: the driver checks [`now`](Self::now) again
///   when a timer expires and re-arms it if the wall clock has not reached the due time yet, so
///   a run never starts before its due time even if the wall clock is adjusted.
///
/// ```
/// use architectlm_scheduler::{Clock, SystemClock};
///
/// let clock = SystemClock;
/// let now = clock.now();
/// assert!(clock.deadline(now) <= tokio::time::Instant::now());
/// ```
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current wall time.
    fn now(&self) -> DateTime<Utc>;

    /// Whether the last stretch of a wait for this clock may be slept on a blocking thread,
    /// which wakes within tens of microseconds rather than at Tokio's next millisecond tick.
    /// True for the system clock; false (the default) for a clock that follows Tokio's
    /// (possibly paused) time, which only Tokio's timer may wait for.
    fn precise_wait(&self) -> bool {
        false
    }

    /// The monotonic instant at which the wall clock is expected to read `at`.
    fn deadline(&self, at: DateTime<Utc>) -> Instant {
        let now_wall = self.now();
        let now = Instant::now();
        match (at - now_wall).to_std() {
            Ok(d) => architectlm_core::time::add_to_instant(now, d),
            Err(_) => now,
        }
    }
}

/// The system's wall clock (`Utc::now`). The default.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn precise_wait(&self) -> bool {
        true
    }
}

/// Wall time derived from Tokio's clock: `anchor + (Instant::now() - start)`.
///
/// Under `tokio::time::pause` it moves only when Tokio's clock is advanced, which makes
/// scheduling tests deterministic: advancing the paused clock by a day runs a day of cron
/// occurrences in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    anchor: DateTime<Utc>,
    start: Instant,
}

impl TokioClock {
    /// A clock that reads `anchor` now and then follows Tokio's clock.
    pub fn starting_at(anchor: DateTime<Utc>) -> Self {
        Self {
            anchor,
            start: Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> DateTime<Utc> {
        let elapsed = Instant::now().saturating_duration_since(self.start);
        self.anchor + chrono::Duration::from_std(elapsed).unwrap_or(chrono::Duration::MAX)
    }

    fn deadline(&self, at: DateTime<Utc>) -> Instant {
        match (at - self.anchor).to_std() {
            Ok(d) => self.start + d,
            Err(_) => self.start,
        }
    }
}

/// The longest a single timer is armed for; a later due time is re-armed when this passes
/// (Tokio's timer wheel covers about two years).
pub(crate) const MAX_TIMER: Duration = Duration::from_secs(365 * 24 * 3600);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn tokio_clock_follows_the_paused_clock() {
        let anchor = DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default();
        let clock = TokioClock::starting_at(anchor);
        assert_eq!(clock.now(), anchor);
        tokio::time::advance(Duration::from_secs(90)).await;
        assert_eq!(clock.now(), anchor + chrono::Duration::seconds(90));
        let at = anchor + chrono::Duration::seconds(100);
        assert_eq!(clock.deadline(at) - Instant::now(), Duration::from_secs(10));
    }
}
