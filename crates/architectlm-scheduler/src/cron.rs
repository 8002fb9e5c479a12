//! Cron patterns in IANA time zones, parsed once and cached.
//!
//! Patterns are parsed by [croner](https://docs.rs/croner): 5 fields (minute precision),
//! 6 (leading seconds) or 7 (trailing year); `L` (last day of month / last weekday of a kind),
//! `W` (nearest weekday), `#` (n-th weekday of the month), and the nicknames `@yearly`,
//! `@annually`, `@monthly`, `@weekly`, `@daily`, `@midnight`, `@hourly`. Day of month and day
//! of week combine with OR, as in Vixie cron.
//!
//! # Daylight saving time
//! Occurrences are found on the wall clock of the entry's time zone (UTC unless given), with
//! croner's rules:
//! - **Spring forward** (a wall-clock hour does not exist): a *fixed-time* pattern (numbers in
//!   its second, minute and hour fields, such as `30 2 * * *`) runs at the first valid time after
//!   the gap on the same day (03:00); an *interval* pattern (`*` or `*/n` there) skips the
//!   occurrences inside the gap.
//! - **Fall back** (a wall-clock hour happens twice): a fixed-time pattern runs once, at the
//!   first pass; an interval pattern runs on both passes.
//!
//! Each next run is found from the previous *scheduled* time (never from "now"), so a late
//! run does not shift the schedule and the duplicated hour is walked in real time.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;

use architectlm_core::{Error, Result};
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;
use parking_lot::Mutex;

/// Distinct patterns kept parsed; past this the cache starts over (parsing again is correct,
/// only slower).
const CACHE_LIMIT: usize = 16_384;

/// A cache of parsed cron patterns. Parsing costs tens of microseconds; entries that share a
/// pattern share one parse.
#[derive(Debug, Default)]
pub struct PatternCache {
    map: Mutex<HashMap<String, Arc<Cron>>>,
}

impl PatternCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// The parsed pattern, or an error with croner's reason.
    pub fn parse(&self, pattern: &str) -> Result<Arc<Cron>> {
        if let Some(c) = self.map.lock().get(pattern) {
            return Ok(c.clone());
        }
        let cron = Arc::new(Cron::from_str(pattern).map_err(|e| {
            Error::invalid_config("pattern", format!("\"{pattern}\""), e.to_string())
        })?);
        let mut map = self.map.lock();
        if map.len() >= CACHE_LIMIT {
            map.clear();
        }
        map.insert(pattern.to_owned(), cron.clone());
        Ok(cron)
    }

    /// How many patterns are cached.
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Parses an IANA time zone name such as `Europe/Berlin`.
pub fn parse_timezone(name: &str) -> Result<Tz> {
    Tz::from_str(name).map_err(|_| {
        Error::invalid_config(
            "timezone",
            format!("\"{name}\""),
            "unknown IANA time zone (expected a name such as \"Europe/Berlin\" or \"UTC\")",
        )
    })
}

/// A parsed cron pattern in a time zone.
///
/// ```
/// use architectlm_scheduler::CronSchedule;
/// use chrono::{TimeZone, Utc};
///
/// // 02:30 every day in Berlin; on 2026-03-29 02:30 does not exist, so it runs at 03:00 CEST.
/// let s = CronSchedule::new("30 2 * * *", Some("Europe/Berlin"))?;
/// let before = Utc.with_ymd_and_hms(2026, 3, 28, 12, 0, 0).unwrap();
/// let next = s.next_after(before).unwrap();
/// assert_eq!(next, Utc.with_ymd_and_hms(2026, 3, 29, 1, 0, 0).unwrap());
/// # Ok::<_, architectlm_core::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct CronSchedule {
    cron: Arc<Cron>,
    tz: Tz,
}

impl CronSchedule {
    /// Parses `pattern` in `timezone` (UTC when `None`).
    pub fn new(pattern: &str, timezone: Option<&str>) -> Result<Self> {
        Self::with_cache(&PatternCache::new(), pattern, timezone)
    }

    /// Like [`new`](Self::new), taking the parsed pattern from `cache`.
    pub fn with_cache(cache: &PatternCache, pattern: &str, timezone: Option<&str>) -> Result<Self> {
        let tz = match timezone {
            Some(name) => parse_timezone(name)?,
            None => Tz::UTC,
        };
        Ok(Self {
            cron: cache.parse(pattern)?,
            tz,
        })
    }

    /// The time zone.
    pub fn timezone(&self) -> Tz {
        self.tz
    }

    /// The first occurrence strictly after `t`, or `None` if there is none (croner searches a
    /// bounded range of years).
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.find(t, false)
    }

    /// The first occurrence at or after `t`.
    pub fn next_from(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.find(t, true)
    }

    fn find(&self, t: DateTime<Utc>, inclusive: bool) -> Option<DateTime<Utc>> {
        // Occurrences are searched from year 1 to year 9999: beyond, a local time may not be
        // representable at all (chrono's calendar ends near year 262,000 in UTC, a zone's
        // offset pushes past it). Later than the range has no occurrence; earlier searches
        // from its start.
        const FIRST: i64 = -62_135_596_800; // 0001-01-01T00:00:00Z
        const LAST: i64 = 253_402_300_799; // 9999-12-31T23:59:59Z
        let secs = t.timestamp();
        if secs > LAST {
            return None;
        }
        let t = if secs < FIRST {
            DateTime::from_timestamp(FIRST, 0).unwrap_or(t)
        } else {
            t
        };
        let local = t.with_timezone(&self.tz);
        self.cron
            .find_next_occurrence(&local, inclusive)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    /// The next `n` occurrences after `t`, each found from the previous one.
    pub fn upcoming(&self, t: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
        let mut out = Vec::with_capacity(n);
        let mut cur = t;
        while out.len() < n {
            match self.next_after(cur) {
                Some(next) => {
                    out.push(next);
                    cur = next;
                }
                None => break,
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_patterns_and_zones_name_the_value_and_the_reason() {
        let e = CronSchedule::new("61 * * * *", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"61 * * * *\""), "{e}");
        assert!(e.contains("pattern"), "{e}");
        let e = CronSchedule::new("* * * * *", Some("Mars/Olympus"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("Mars/Olympus"), "{e}");
        assert!(CronSchedule::new("@daily", Some("America/New_York")).is_ok());
    }

    #[test]
    fn the_cache_parses_each_pattern_once() {
        let cache = PatternCache::new();
        let a = cache.parse("*/5 * * * *").unwrap();
        let b = cache.parse("*/5 * * * *").unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(cache.len(), 1);
    }
}
