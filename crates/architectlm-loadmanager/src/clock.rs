//! The clock the load manager reads: monotonic nanoseconds since the manager was created.
//!
//! By default it follows Tokio's clock (`tokio::time::Instant`), so tests that pause time with
//! `tokio::time::pause` or `#[tokio::test(start_paused = true)]` drive reset timeouts, slow-call
//! measurement, time windows and rate limits deterministically. Outside of a paused runtime Tokio's
//! instant is the operating system's monotonic clock.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};

/// A monotonic time source, cheap to clone.
///
/// [`Clock::tokio`] (the default) follows Tokio's clock; [`Clock::manual`] only moves when told
/// to, for tests that run without a Tokio runtime.
///
/// ```
/// use std::time::Duration;
/// use architectlm_loadmanager::Clock;
///
/// let clock = Clock::manual();
/// let t0 = clock.now();
/// clock.advance(Duration::from_millis(5));
/// assert_eq!(clock.now() - t0, 5_000_000);
/// ```
#[derive(Clone)]
pub struct Clock {
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    Tokio(tokio::time::Instant),
    Manual(Arc<AtomicU64>),
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            Inner::Tokio(_) => f.write_str("Clock::Tokio"),
            Inner::Manual(n) => write!(f, "Clock::Manual({})", n.load(Ordering::Relaxed)),
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::tokio()
    }
}

impl Clock {
    /// A clock that follows `tokio::time::Instant` (and so `tokio::time::pause`).
    pub fn tokio() -> Self {
        Self {
            inner: Inner::Tokio(tokio::time::Instant::now()),
        }
    }

    /// A clock that stands still until [`advance`](Self::advance) moves it.
    pub fn manual() -> Self {
        Self {
            // Start above zero so that a reading of 0 can mean "not measured".
            inner: Inner::Manual(Arc::new(AtomicU64::new(1))),
        }
    }

    /// Moves a manual clock forward; does nothing to a Tokio clock.
    pub fn advance(&self, by: Duration) {
        if let Inner::Manual(n) = &self.inner {
            n.fetch_add(duration_nanos(by), Ordering::Relaxed);
        }
    }

    /// Whether this clock follows Tokio's (so Tokio timers agree with it).
    pub(crate) fn is_tokio(&self) -> bool {
        matches!(self.inner, Inner::Tokio(_))
    }

    /// Nanoseconds since the clock was created (never 0).
    #[inline]
    pub fn now(&self) -> u64 {
        match &self.inner {
            Inner::Tokio(base) => duration_nanos(base.elapsed()).saturating_add(1),
            Inner::Manual(n) => n.load(Ordering::Relaxed),
        }
    }

    /// The wall-clock time of a reading of this clock.
    pub fn to_utc(&self, reading: u64) -> DateTime<Utc> {
        let now = self.now();
        let wall = Utc::now();
        if reading >= now {
            wall + chrono::Duration::nanoseconds(i64::try_from(reading - now).unwrap_or(i64::MAX))
        } else {
            wall - chrono::Duration::nanoseconds(i64::try_from(now - reading).unwrap_or(i64::MAX))
        }
    }
}

/// A duration in nanoseconds, saturating at `u64::MAX`.
pub(crate) fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Adapts [`Clock`] to governor's clock trait so rate limits follow the same time.
#[derive(Clone, Debug)]
pub(crate) struct GovernorClock(pub(crate) Clock);

impl governor::clock::Clock for GovernorClock {
    type Instant = governor::nanos::Nanos;

    fn now(&self) -> Self::Instant {
        governor::nanos::Nanos::from(self.0.now())
    }
}
