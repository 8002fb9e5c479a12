//! Retry policies: how many attempts a task, step or compensation gets and how long to wait
//! between them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How the delay grows between attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Backoff {
    /// The same delay every time: `initial_delay`.
    Fixed,
    /// `initial_delay * n` before the n-th retry.
    Linear,
    /// `initial_delay * factor^(n-1)` before the n-th retry.
    #[default]
    Exponential,
}

/// How often and how patiently to retry a failing operation.
///
/// `max_attempts` counts every attempt, the first included: `max_attempts = 1` means no retry.
/// Delays are capped at `max_delay`. With `jitter` set, each delay is drawn uniformly from
/// `[delay * (1 - jitter), delay]` ("equal jitter" style), which spreads retries of many callers
/// without ever waiting longer than the computed delay.
///
/// ```
/// use std::time::Duration;
/// use architectlm_core::{Backoff, RetryPolicy};
///
/// let policy = RetryPolicy::attempts(5)
///     .with_backoff(Backoff::Exponential)
///     .with_initial_delay(Duration::from_millis(100))
///     .with_max_delay(Duration::from_secs(1));
/// policy.validate().unwrap();
/// assert_eq!(policy.base_delay(1), Duration::from_millis(100));
/// assert_eq!(policy.base_delay(3), Duration::from_millis(400));
/// assert_eq!(policy.base_delay(9), Duration::from_secs(1));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Attempts in total, at least 1.
    pub max_attempts: u32,
    /// How the delay grows.
    pub backoff: Backoff,
    /// The delay before the first retry.
    #[serde(with = "crate::serde_duration")]
    pub initial_delay: Duration,
    /// The largest delay.
    #[serde(with = "crate::serde_duration")]
    pub max_delay: Duration,
    /// The growth factor of exponential backoff.
    pub factor: f64,
    /// Fraction (0.0–1.0) of each delay that is randomised.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            backoff: Backoff::Exponential,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(30),
            factor: 2.0,
            jitter: 0.0,
        }
    }
}

impl RetryPolicy {
    /// No retry: one attempt.
    pub fn none() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// `max_attempts` attempts with the default exponential backoff.
    pub fn attempts(max_attempts: u32) -> Self {
        Self {
            max_attempts,
            ..Self::default()
        }
    }

    /// Sets the backoff kind.
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Sets the first delay.
    pub fn with_initial_delay(mut self, delay: Duration) -> Self {
        self.initial_delay = delay;
        self
    }

    /// Sets the largest delay.
    pub fn with_max_delay(mut self, delay: Duration) -> Self {
        self.max_delay = delay;
        self
    }

    /// Sets the exponential growth factor.
    pub fn with_factor(mut self, factor: f64) -> Self {
        self.factor = factor;
        self
    }

    /// Sets the randomised fraction of each delay (0.0–1.0).
    pub fn with_jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// Checks the policy, naming the bad field and value.
    pub fn validate(&self) -> crate::Result<()> {
        if self.max_attempts == 0 {
            return Err(crate::Error::invalid_config(
                "retry.max_attempts",
                0,
                "must be at least 1",
            ));
        }
        if !(self.factor.is_finite() && self.factor >= 1.0) {
            return Err(crate::Error::invalid_config(
                "retry.factor",
                self.factor,
                "must be a finite number >= 1",
            ));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(crate::Error::invalid_config(
                "retry.jitter",
                self.jitter,
                "must be between 0.0 and 1.0",
            ));
        }
        if self.max_delay < self.initial_delay {
            return Err(crate::Error::invalid_config(
                "retry.max_delay",
                format!("{:?}", self.max_delay),
                format!("must not be below initial_delay ({:?})", self.initial_delay),
            ));
        }
        Ok(())
    }

    /// The delay to wait after the failed attempt number `attempt` (1-based) before the next one,
    /// without jitter.
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let n = attempt.max(1);
        let delay = match self.backoff {
            Backoff::Fixed => self.initial_delay,
            Backoff::Linear => self.initial_delay.saturating_mul(n),
            Backoff::Exponential => {
                let scale = self.factor.powi(n.saturating_sub(1).min(1024) as i32);
                let secs = self.initial_delay.as_secs_f64() * scale;
                if secs.is_finite() && secs < self.max_delay.as_secs_f64() {
                    Duration::from_secs_f64(secs)
                } else {
                    self.max_delay
                }
            }
        };
        delay.min(self.max_delay)
    }

    /// The delay after attempt number `attempt`, with jitter applied.
    pub fn delay(&self, attempt: u32) -> Duration {
        let base = self.base_delay(attempt);
        if self.jitter <= 0.0 || base.is_zero() {
            return base;
        }
        let r = crate::util::random_unit();
        base.mul_f64(1.0 - self.jitter * r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_as_configured_and_are_capped() {
        let p = RetryPolicy::attempts(5)
            .with_initial_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_millis(350));
        assert_eq!(p.base_delay(1), Duration::from_millis(100));
        assert_eq!(p.base_delay(2), Duration::from_millis(200));
        assert_eq!(p.base_delay(3), Duration::from_millis(350));
        let l = p.clone().with_backoff(Backoff::Linear);
        assert_eq!(l.base_delay(3), Duration::from_millis(300));
        let f = p.with_backoff(Backoff::Fixed);
        assert_eq!(f.base_delay(4), Duration::from_millis(100));
    }

    #[test]
    fn jitter_never_exceeds_the_base_delay() {
        let p = RetryPolicy::attempts(3).with_jitter(0.5);
        for _ in 0..100 {
            let d = p.delay(2);
            assert!(d <= p.base_delay(2) && d >= p.base_delay(2) / 2);
        }
    }

    #[test]
    fn invalid_policies_name_the_field() {
        let err = RetryPolicy::attempts(0).validate().unwrap_err().to_string();
        assert!(err.contains("retry.max_attempts"), "{err}");
        let err = RetryPolicy::default()
            .with_jitter(2.0)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("retry.jitter = 2"), "{err}");
    }
}
