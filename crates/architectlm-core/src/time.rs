//! Saturating time arithmetic for durations a user configures.
//!
//! A configured duration may be anything up to `Duration::MAX` ("never" is a legal answer to
//! "how long may this wait?"). Adding such a duration to a clock reading with `+` panics on
//! overflow, so every deadline built from a user's duration goes through these helpers, which
//! saturate: a deadline past what the clock can represent becomes the clock's far future
//! (the last representable `DateTime<Utc>`, or about 30 years from now for a monotonic
//! instant), which for any process means "never".

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};

/// About 30 years: the "never" of a monotonic deadline (the same horizon tokio uses for
/// a sleep that cannot be represented).
pub const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

/// The default lease of every multi-node claim (a saga driven by a node, a scheduled run
/// claimed by a node): 30 s, renewed every third of it.
///
/// The lease is the failover time: when a node dies, others take its work over once its
/// leases run out. It is as long as it is so that a node survives a PostgreSQL failover or a
/// long pause (which commonly take 10–30 s) without every node dropping its work at once;
/// shorten it for faster takeover on a database that does not fail over.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// The longest lease accepted: 24 h. A longer one would leave a dead node's work stranded
/// for days, and is refused at build time.
pub const MAX_LEASE: Duration = Duration::from_secs(86_400);

/// Checks a configured lease against `min` and [`MAX_LEASE`]; the error names `field`.
pub fn check_lease(field: &str, lease: Duration, min: Duration) -> crate::Result<()> {
    if lease < min || lease > MAX_LEASE {
        return Err(crate::Error::invalid_config(
            field,
            format!("{lease:?}"),
            format!("must be between {min:?} and {MAX_LEASE:?} (renewed every third of it)"),
        ));
    }
    Ok(())
}

/// `t + d`, saturating at [`DateTime::<Utc>::MAX_UTC`].
///
/// ```
/// use std::time::Duration;
/// use architectlm_core::time::add_to_utc;
/// use chrono::{DateTime, Utc};
///
/// let now = Utc::now();
/// assert_eq!(add_to_utc(now, Duration::from_secs(1)), now + chrono::Duration::seconds(1));
/// assert_eq!(add_to_utc(now, Duration::MAX), DateTime::<Utc>::MAX_UTC);
/// ```
pub fn add_to_utc(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    TimeDelta::from_std(d)
        .ok()
        .and_then(|d| t.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// `t - d`, saturating at [`DateTime::<Utc>::MIN_UTC`].
pub fn sub_from_utc(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    TimeDelta::from_std(d)
        .ok()
        .and_then(|d| t.checked_sub_signed(d))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// `at + d` for a monotonic instant, capped at `at + FAR_FUTURE`.
pub fn add_to_instant(at: tokio::time::Instant, d: Duration) -> tokio::time::Instant {
    at.checked_add(d)
        .filter(|_| d <= FAR_FUTURE)
        .or_else(|| at.checked_add(FAR_FUTURE))
        .unwrap_or(at)
}

/// The monotonic deadline `d` from now, saturating as [`add_to_instant`] does.
pub fn deadline_in(d: Duration) -> tokio::time::Instant {
    add_to_instant(tokio::time::Instant::now(), d)
}

/// `d * factor` for a finite factor of at least zero, saturating at `Duration::MAX` (and `0`
/// for a factor that is not a finite positive number). `Duration::mul_f64` panics instead.
///
/// ```
/// use std::time::Duration;
/// use architectlm_core::time::mul_duration;
///
/// assert_eq!(mul_duration(Duration::from_secs(2), 1.5), Duration::from_secs(3));
/// assert_eq!(mul_duration(Duration::MAX, 2.0), Duration::MAX);
/// assert_eq!(mul_duration(Duration::from_secs(1), f64::NAN), Duration::ZERO);
/// ```
pub fn mul_duration(d: Duration, factor: f64) -> Duration {
    if factor.is_nan() || factor <= 0.0 {
        return Duration::ZERO;
    }
    Duration::try_from_secs_f64(d.as_secs_f64() * factor).unwrap_or(Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_saturate_at_the_edges_of_the_calendar() {
        assert_eq!(
            add_to_utc(DateTime::<Utc>::MAX_UTC, Duration::from_millis(1)),
            DateTime::<Utc>::MAX_UTC
        );
        assert_eq!(
            sub_from_utc(DateTime::<Utc>::MIN_UTC, Duration::from_millis(1)),
            DateTime::<Utc>::MIN_UTC
        );
        assert_eq!(
            sub_from_utc(Utc::now(), Duration::MAX),
            DateTime::<Utc>::MIN_UTC
        );
    }

    #[tokio::test]
    async fn instants_saturate_at_the_far_future() {
        let now = tokio::time::Instant::now();
        assert_eq!(add_to_instant(now, Duration::MAX), now + FAR_FUTURE);
        assert_eq!(
            add_to_instant(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
        assert!(deadline_in(Duration::MAX) > now);
    }

    #[test]
    fn products_saturate() {
        assert_eq!(mul_duration(Duration::MAX, 1e300), Duration::MAX);
        assert_eq!(
            mul_duration(Duration::from_secs(1), f64::INFINITY),
            Duration::MAX
        );
        assert_eq!(mul_duration(Duration::from_secs(1), -1.0), Duration::ZERO);
    }
}
