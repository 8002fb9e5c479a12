//! Resource settings: capacity, thresholds with hysteresis, circuit breaking, rate limits and
//! the waiting queue, with a validating builder.
//!
//! [`ResourceSettings`] is a superset of the core [`ResourceConfig`]; every core config converts
//! into it (`ResourceSettings::try_from(config)`), keeping the original's meaning: the circuit
//! opens on usage only, and outcome-based breaking is off until configured.

use std::num::NonZeroU32;
use std::time::Duration;

use architectlm_core::extensions::loadmanager::{ResourceConfig, ResourceType, Thresholds};
use architectlm_core::{Error, Result};

/// How outcomes are aggregated for the failure-rate and slow-call-rate rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SlidingWindow {
    /// The last `n` calls with a reported outcome. Recording is lock-free.
    Count(u32),
    /// The calls of the last `span`, kept in ten buckets of `span / 10`.
    Time(Duration),
}

impl Default for SlidingWindow {
    fn default() -> Self {
        Self::Count(100)
    }
}

/// A rate limit (GCRA, by governor): `burst` units at once, replenished evenly over `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    burst: u32,
    period: Duration,
}

impl RateLimit {
    /// `burst` units at once, all replenished over `period` (one every `period / burst`).
    pub fn new(burst: u32, period: Duration) -> Self {
        Self { burst, period }
    }

    /// `n` units per second.
    pub fn per_second(n: u32) -> Self {
        Self::new(n, Duration::from_secs(1))
    }

    /// Units allowed at once.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// Time over which a full burst is replenished.
    pub fn period(&self) -> Duration {
        self.period
    }

    pub(crate) fn quota(&self) -> Option<governor::Quota> {
        let burst = NonZeroU32::new(self.burst)?;
        governor::Quota::with_period(self.period / self.burst).map(|q| q.allow_burst(burst))
    }
}

/// Settings of one resource. Build with [`ResourceSettings::builder`] or convert a core
/// [`ResourceConfig`]; both validate.
///
/// ```
/// use std::time::Duration;
/// use architectlm_core::extensions::loadmanager::{ResourceType, Thresholds};
/// use architectlm_loadmanager::{ResourceSettings, SlidingWindow};
///
/// let settings = ResourceSettings::builder("payment-api", ResourceType::Api, 100)
///     .thresholds(Thresholds::new(70.0, 85.0, 95.0))
///     .hysteresis(5.0)
///     .failure_rate_threshold(50.0)
///     .sliding_window(SlidingWindow::Count(20))
///     .minimum_calls(10)
///     .half_open_trials(3)
///     .reset_timeout(Duration::from_secs(10))
///     .build()
///     .unwrap();
/// assert_eq!(settings.capacity(), 100);
///
/// let err = ResourceSettings::builder("db", ResourceType::Database, 0).build().unwrap_err();
/// assert!(err.to_string().contains("capacity = 0"));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceSettings {
    pub(crate) id: String,
    pub(crate) resource_type: ResourceType,
    pub(crate) capacity: u64,
    pub(crate) thresholds: Thresholds,
    pub(crate) hysteresis: f64,
    pub(crate) description: Option<String>,
    pub(crate) open_on_usage: bool,
    pub(crate) failure_rate_threshold: Option<f64>,
    pub(crate) slow_call_rate_threshold: Option<f64>,
    pub(crate) slow_call_duration: Duration,
    pub(crate) window: SlidingWindow,
    pub(crate) minimum_calls: u32,
    pub(crate) consecutive_failures: Option<u32>,
    pub(crate) half_open_trials: u32,
    pub(crate) max_wait_in_half_open: Option<Duration>,
    pub(crate) half_open_by_rate: bool,
    pub(crate) reset_timeout: Duration,
    pub(crate) reset_backoff: f64,
    pub(crate) max_reset_timeout: Duration,
    pub(crate) rate_limit: Option<RateLimit>,
    pub(crate) max_waiting: u32,
}

impl ResourceSettings {
    /// A builder with the original's defaults: thresholds 70/85/95 %, no hysteresis, opening on
    /// usage only, a 30 s reset timeout, one half-open trial, and a waiting queue of 1024.
    pub fn builder(
        id: impl Into<String>,
        resource_type: ResourceType,
        capacity: u64,
    ) -> ResourceSettingsBuilder {
        ResourceSettingsBuilder {
            settings: Self {
                id: id.into(),
                resource_type,
                capacity,
                thresholds: Thresholds::default(),
                hysteresis: 0.0,
                description: None,
                open_on_usage: true,
                failure_rate_threshold: None,
                slow_call_rate_threshold: None,
                slow_call_duration: Duration::from_secs(1),
                window: SlidingWindow::default(),
                minimum_calls: 10,
                consecutive_failures: None,
                half_open_trials: 1,
                max_wait_in_half_open: None,
                half_open_by_rate: false,
                reset_timeout: Duration::from_secs(30),
                reset_backoff: 1.0,
                max_reset_timeout: Duration::from_secs(300),
                rate_limit: None,
                max_waiting: 1024,
            },
        }
    }

    /// The id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The kind.
    pub fn resource_type(&self) -> ResourceType {
        self.resource_type
    }

    /// Units available.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The thresholds in percent.
    pub fn thresholds(&self) -> Thresholds {
        self.thresholds
    }

    /// The base reset timeout.
    pub fn reset_timeout(&self) -> Duration {
        self.reset_timeout
    }

    /// Checks every rule; the error names the field and the rejected value.
    pub fn validate(&self) -> Result<()> {
        if self.id.trim().is_empty() {
            return Err(Error::invalid_config(
                "id",
                format!("{:?}", self.id),
                "must not be empty",
            ));
        }
        if self.capacity == 0 {
            return Err(Error::invalid_config("capacity", 0, "must be at least 1"));
        }
        let t = self.thresholds;
        for (field, v) in [
            ("thresholds.warning", t.warning),
            ("thresholds.critical", t.critical),
            ("thresholds.circuit", t.circuit),
        ] {
            percent(field, v)?;
        }
        if t.warning <= 0.0 {
            // Usage is never below 0 %: such a resource would never be Normal.
            return Err(Error::invalid_config(
                "thresholds.warning",
                t.warning,
                "must be above 0 (at 0 % every usage, even none, would be a warning)",
            ));
        }
        if t.critical < t.warning {
            return Err(Error::invalid_config(
                "thresholds.critical",
                t.critical,
                format!("must not be below thresholds.warning ({})", t.warning),
            ));
        }
        if t.circuit < t.critical {
            return Err(Error::invalid_config(
                "thresholds.circuit",
                t.circuit,
                format!("must not be below thresholds.critical ({})", t.critical),
            ));
        }
        percent("hysteresis", self.hysteresis)?;
        if self.hysteresis >= t.warning {
            // Leaving warning needs usage below warning − hysteresis, which would be below 0 %.
            return Err(Error::invalid_config(
                "hysteresis",
                self.hysteresis,
                format!(
                    "must be below thresholds.warning ({}), or a resource in warning could never \
                     leave it",
                    t.warning
                ),
            ));
        }
        if let Some(r) = self.failure_rate_threshold {
            positive_percent("failure_rate_threshold", r)?;
        }
        if let Some(r) = self.slow_call_rate_threshold {
            positive_percent("slow_call_rate_threshold", r)?;
        }
        match self.window {
            SlidingWindow::Count(0) => {
                return Err(Error::invalid_config(
                    "sliding_window.count",
                    0,
                    "must be at least 1",
                ));
            }
            SlidingWindow::Time(d) if d < Duration::from_micros(10) => {
                return Err(Error::invalid_config(
                    "sliding_window.time",
                    format!("{d:?}"),
                    "must be at least 10µs",
                ));
            }
            _ => {}
        }
        if self.minimum_calls == 0 {
            return Err(Error::invalid_config(
                "minimum_calls",
                0,
                "must be at least 1",
            ));
        }
        let rate_rule =
            self.failure_rate_threshold.is_some() || self.slow_call_rate_threshold.is_some();
        if let SlidingWindow::Count(n) = self.window
            && rate_rule
            && n < self.minimum_calls
        {
            return Err(Error::invalid_config(
                "sliding_window.count",
                n,
                format!(
                    "must hold at least minimum_calls ({}) calls, or the failure-rate and \
                     slow-call rules could never fire",
                    self.minimum_calls
                ),
            ));
        }
        if self.consecutive_failures == Some(0) {
            return Err(Error::invalid_config(
                "consecutive_failures",
                0,
                "must be at least 1",
            ));
        }
        if self.max_wait_in_half_open == Some(Duration::ZERO) {
            return Err(Error::invalid_config(
                "max_wait_in_half_open",
                "0s",
                "must be above zero (a half-open period needs time for its trials)",
            ));
        }
        if self.half_open_by_rate && !rate_rule_on(self) {
            return Err(Error::invalid_config(
                "half_open_by_rate",
                true,
                "needs failure_rate_threshold or slow_call_rate_threshold to decide by",
            ));
        }
        if self.half_open_trials == 0 {
            return Err(Error::invalid_config(
                "half_open_trials",
                0,
                "must be at least 1",
            ));
        }
        if !(self.reset_backoff >= 1.0 && self.reset_backoff.is_finite()) {
            return Err(Error::invalid_config(
                "reset_backoff",
                self.reset_backoff,
                "must be a finite factor of at least 1",
            ));
        }
        if self.max_reset_timeout < self.reset_timeout {
            return Err(Error::invalid_config(
                "max_reset_timeout",
                format!("{:?}", self.max_reset_timeout),
                format!("must not be below reset_timeout ({:?})", self.reset_timeout),
            ));
        }
        if let Some(r) = self.rate_limit {
            if r.burst == 0 {
                return Err(Error::invalid_config(
                    "rate_limit.burst",
                    0,
                    "must be at least 1",
                ));
            }
            if r.quota().is_none() {
                return Err(Error::invalid_config(
                    "rate_limit.period",
                    format!("{:?}", r.period),
                    "must leave at least 1ns per unit",
                ));
            }
        }
        Ok(())
    }
}

fn rate_rule_on(s: &ResourceSettings) -> bool {
    s.failure_rate_threshold.is_some() || s.slow_call_rate_threshold.is_some()
}

fn percent(field: &str, v: f64) -> Result<()> {
    if (0.0..=100.0).contains(&v) {
        Ok(())
    } else {
        Err(Error::invalid_config(
            field,
            v,
            "must be a percentage between 0 and 100",
        ))
    }
}

fn positive_percent(field: &str, v: f64) -> Result<()> {
    if v > 0.0 && v <= 100.0 {
        Ok(())
    } else {
        Err(Error::invalid_config(
            field,
            v,
            "must be a percentage above 0 and at most 100",
        ))
    }
}

impl TryFrom<ResourceConfig> for ResourceSettings {
    type Error = Error;

    fn try_from(c: ResourceConfig) -> Result<Self> {
        let mut b = ResourceSettings::builder(c.id, c.resource_type, c.capacity)
            .thresholds(c.thresholds)
            .reset_timeout(c.reset_timeout);
        // A long base timeout must not be rejected for exceeding the default cap.
        b.settings.max_reset_timeout = b.settings.max_reset_timeout.max(c.reset_timeout);
        if let Some(d) = c.description {
            b = b.description(d);
        }
        b.build()
    }
}

/// Builds a validated [`ResourceSettings`]. See [`ResourceSettings`] for an example.
#[derive(Debug, Clone)]
pub struct ResourceSettingsBuilder {
    settings: ResourceSettings,
}

impl ResourceSettingsBuilder {
    /// Thresholds in percent of capacity (`warning <= critical <= circuit`).
    pub fn thresholds(mut self, t: Thresholds) -> Self {
        self.settings.thresholds = t;
        self
    }

    /// Percentage points usage must fall below a threshold before its status is left, so usage
    /// hovering at a threshold does not flood events. Default 0.
    pub fn hysteresis(mut self, points: f64) -> Self {
        self.settings.hysteresis = points;
        self
    }

    /// What the resource is.
    pub fn description(mut self, d: impl Into<String>) -> Self {
        self.settings.description = Some(d.into());
        self
    }

    /// Whether usage at the circuit threshold opens the circuit (default true, the original's
    /// meaning). When false, usage only moves between closed, warning and critical.
    pub fn open_on_usage(mut self, yes: bool) -> Self {
        self.settings.open_on_usage = yes;
        self
    }

    /// Opens the circuit when the failure rate in the window reaches this percentage (after
    /// [`minimum_calls`](Self::minimum_calls)). Off by default.
    pub fn failure_rate_threshold(mut self, percent: f64) -> Self {
        self.settings.failure_rate_threshold = Some(percent);
        self
    }

    /// Opens the circuit when the share of calls lasting at least
    /// [`slow_call_duration`](Self::slow_call_duration) reaches this percentage. Off by default.
    pub fn slow_call_rate_threshold(mut self, percent: f64) -> Self {
        self.settings.slow_call_rate_threshold = Some(percent);
        self
    }

    /// A call lasting at least this long is slow (default 1 s).
    pub fn slow_call_duration(mut self, d: Duration) -> Self {
        self.settings.slow_call_duration = d;
        self
    }

    /// The window the rates are computed over (default the last 100 calls).
    pub fn sliding_window(mut self, w: SlidingWindow) -> Self {
        self.settings.window = w;
        self
    }

    /// Calls needed in the window before a rate can open the circuit (default 10).
    pub fn minimum_calls(mut self, n: u32) -> Self {
        self.settings.minimum_calls = n;
        self
    }

    /// Opens the circuit after `n` failures in a row. Off by default.
    pub fn consecutive_failures(mut self, n: u32) -> Self {
        self.settings.consecutive_failures = Some(n);
        self
    }

    /// Trial calls admitted while half-open (default 1). All must succeed to close; one failure
    /// reopens.
    pub fn half_open_trials(mut self, k: u32) -> Self {
        self.settings.half_open_trials = k;
        self
    }

    /// The longest a circuit stays half-open waiting for its trials to end (Resilience4j's
    /// `maxWaitDurationInHalfOpenState`; default: no limit). When it passes with a trial
    /// still undecided, the circuit opens again (reason `half-open-timeout`), as after a failed
    /// trial, and the late trials' outcomes count for nothing.
    pub fn max_wait_in_half_open(mut self, d: Duration) -> Self {
        self.settings.max_wait_in_half_open = Some(d);
        self
    }

    /// Decides a half-open period by rate instead of "every trial must succeed": after all K
    /// trials ended, the circuit closes unless their failure rate (or slow-call rate) reaches
    /// the configured `failure_rate_threshold` (`slow_call_rate_threshold`). Needs a rate rule;
    /// default off.
    pub fn half_open_by_rate(mut self, yes: bool) -> Self {
        self.settings.half_open_by_rate = yes;
        self
    }

    /// How long the circuit stays open before going half-open (default 30 s).
    pub fn reset_timeout(mut self, d: Duration) -> Self {
        self.settings.reset_timeout = d;
        self
    }

    /// Multiplies the reset timeout on every reopening without a close in between, up to
    /// `max` (default factor 1: constant).
    pub fn reset_backoff(mut self, factor: f64, max: Duration) -> Self {
        self.settings.reset_backoff = factor;
        self.settings.max_reset_timeout = max;
        self
    }

    /// Limits the rate of acquired units.
    pub fn rate_limit(mut self, limit: RateLimit) -> Self {
        self.settings.rate_limit = Some(limit);
        self
    }

    /// How many callers may wait for capacity at once (the bulkhead's queue, default 1024);
    /// further waiting acquisitions are refused at once.
    pub fn max_waiting(mut self, n: u32) -> Self {
        self.settings.max_waiting = n;
        self
    }

    /// Validates and returns the settings.
    pub fn build(self) -> Result<ResourceSettings> {
        self.settings.validate()?;
        Ok(self.settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(b: ResourceSettingsBuilder) -> String {
        match b.build() {
            Ok(_) => String::from("accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn bad_configs_are_rejected_with_field_and_value() {
        let b = || ResourceSettings::builder("r", ResourceType::Api, 10);
        assert_eq!(
            msg(ResourceSettings::builder("r", ResourceType::Api, 0)),
            "invalid configuration: capacity = 0: must be at least 1"
        );
        assert!(
            msg(b().thresholds(Thresholds::new(-1.0, 80.0, 90.0)))
                .contains("thresholds.warning = -1")
        );
        assert!(
            msg(b().thresholds(Thresholds::new(70.0, 80.0, 101.0)))
                .contains("thresholds.circuit = 101")
        );
        assert!(
            msg(b().thresholds(Thresholds::new(70.0, f64::NAN, 90.0)))
                .contains("thresholds.critical = NaN")
        );
        assert_eq!(
            msg(b().thresholds(Thresholds::new(80.0, 60.0, 90.0))),
            "invalid configuration: thresholds.critical = 60: must not be below thresholds.warning (80)"
        );
        assert!(
            msg(b().thresholds(Thresholds::new(50.0, 60.0, 55.0)))
                .contains("thresholds.circuit = 55")
        );
        assert!(msg(b().half_open_trials(0)).contains("half_open_trials = 0"));
        assert!(msg(b().failure_rate_threshold(0.0)).contains("failure_rate_threshold = 0"));
        assert!(
            msg(b().sliding_window(SlidingWindow::Count(0))).contains("sliding_window.count = 0")
        );
        assert!(msg(b().consecutive_failures(0)).contains("consecutive_failures = 0"));
        assert!(msg(b().rate_limit(RateLimit::per_second(0))).contains("rate_limit.burst = 0"));
        assert!(
            msg(b().reset_backoff(0.5, Duration::from_secs(60))).contains("reset_backoff = 0.5")
        );
        assert!(msg(ResourceSettings::builder(" ", ResourceType::Api, 1)).contains("id = \" \""));
        assert_eq!(msg(b()), "accepted");
    }

    #[test]
    fn core_config_converts_and_is_validated() {
        let c = ResourceConfig::new("payment-api", ResourceType::Api, 100)
            .thresholds(Thresholds::new(70.0, 85.0, 95.0))
            .reset_timeout(Duration::from_secs(3600))
            .description("payments");
        let s = ResourceSettings::try_from(c).unwrap();
        assert_eq!(s.id(), "payment-api");
        assert_eq!(s.reset_timeout(), Duration::from_secs(3600));
        assert!(s.open_on_usage);
        assert_eq!(s.failure_rate_threshold, None);

        let bad = ResourceConfig::new("x", ResourceType::Cpu, 0);
        let err = ResourceSettings::try_from(bad).unwrap_err();
        assert!(
            matches!(err, Error::InvalidConfig { ref field, ref value, .. } if field == "capacity" && value == "0")
        );
    }
}
