//! # architectlm-loadmanager
//!
//! Resource limits, thresholds and circuit breakers for ArchitectLM, joined in one registry:
//!
//! - **Resources** with a capacity in units; `used` is kept with atomics and never exceeds the
//!   capacity nor goes below zero, under any contention.
//! - **Permits** ([`Permit`], or the core [`ResourcePermit`]) released on drop, so a failing or
//!   panicking task cannot leak capacity; the holder reports the outcome. Waiting acquisition
//!   with a timeout, in a bounded queue (a bulkhead) that refuses when full.
//! - **Thresholds** warning / critical / circuit in percent of capacity, with hysteresis; an
//!   event fires once per change of status, on the manager's hub and on the runtime's bus.
//! - **Circuit breaking** per resource, on usage at the circuit threshold and on outcomes
//!   (failure rate, slow-call rate over a count or time window with a minimum of calls,
//!   consecutive failures). After the reset timeout (optionally growing) the circuit goes
//!   half-open and admits exactly K trial calls; their outcomes close or reopen it. Forced-open
//!   and disabled modes.
//! - **Rate limits** per resource (GCRA by `governor`).
//! - **System resources** (feature `system`): cpu, memory and disk resources fed by `sysinfo`.
//! - **tower** (feature `tower`): [`LoadLayer`](crate::tower::LoadLayer) guards a service.
//!
//! # Choosing the meaning of "full"
//!
//! As in the original contract, usage at or above the circuit threshold *opens the circuit*
//! (for the reset timeout), which suits shared backends whose saturation means trouble. For a
//! pool whose being full is normal (connections, worker slots), build the resource with
//! [`open_on_usage(false)`](ResourceSettingsBuilder::open_on_usage): it then refuses with
//! [`Rejected::CapacityFull`] (or waits, with [`Resource::acquire`]) and stays closed.
//!
//! # Semantics
//!
//! **Status.** `status()` is the breaker's state when it is not closed (`open`, `half-open`),
//! else the usage status: `closed` below the warning threshold, `warning` from it, `critical`
//! from the critical threshold (and from the circuit threshold when `open_on_usage(false)`).
//! A status entered at a threshold is left once usage falls below that threshold less the
//! hysteresis. After any quiescent point the status is exactly this function of usage, however
//! many threads took and returned units concurrently. Reading the status (or
//! `is_available()`) never changes it: an open circuit past its reset timeout stays `open` until
//! its timer (on a Tokio clock) or the next call moves it to `half-open`.
//!
//! **Events.** Every change is its own event, in the order it happened, each with `from` and
//! `to` (and the combined `status` / `previous`, `reason`, `used`, `capacity`):
//!
//! | event | when |
//! |---|---|
//! | `threshold-warning` / `threshold-critical` | usage status rose to warning / critical |
//! | `threshold-normal` | usage fell back below the warning threshold (less hysteresis) |
//! | `circuit-open` | the breaker opened: usage at the circuit threshold, a failure-rate, slow-call-rate or consecutive-failure rule, a failed or slow trial, a half-open period past `max_wait_in_half_open` (`half-open-timeout`), `open_for` / `open_until` (`manual`) or `force_open` |
//! | `circuit-half-open` | the reset timeout passed (timer or first call after it) |
//! | `circuit-closed` | all K trials succeeded, or `reset` / `disable` |
//!
//! A jump from 0 to the circuit threshold is `threshold-critical` then `circuit-open`; usage
//! changes while the breaker is open are still published as usage events.
//!
//! **Trials.** Half-open admits exactly K calls (`half_open_trials`, default 1); a call not
//! admitted as a trial never decides one ([`ResourcePermit::is_trial`], [`Permit::is_trial`]).
//! A trial permit dropped without an outcome hands its slot to the next caller. Without permits
//! (`acquire_resource` / `release_resource`), a release pays back units that are no trial's
//! first (taken before the circuit opened, or by permits) and passes a trial only with units
//! beyond those.
//!
//! **Half-open decisions.** By default every one of the K trials must succeed (the first
//! failed or slow trial reopens). With `half_open_by_rate(true)` the period is decided once all
//! K ended, by the failure-rate and slow-call-rate thresholds over the K trials alone. A period
//! longer than `max_wait_in_half_open` reopens (on a Tokio clock by a timer, otherwise at the
//! next call); outcomes of trials from an earlier period count for nothing.
//!
//! **Manual modes.** `force_open` (until `reset`), `open_for(d)` / `open_until(t)` (then
//! half-open as usual), `disable` (admits, records nothing), `metrics_only` (admits and
//! records, never opens), `reset` (closed). Each publishes its transition with its reason.
//! [`Resource::snapshot`] reads the window's calls by outcome, its rates (once `minimum_calls`
//! are in), refusals, trials, openings and time in the current state under one lock.
//!
//! **Settings and what `build()` refuses** (each error names the field and the value):
//!
//! | setting | default | refused |
//! |---|---|---|
//! | `capacity` | — | 0 |
//! | `thresholds` (warning / critical / circuit, %) | 70 / 85 / 95 | outside 0–100, warning = 0, critical < warning, circuit < critical |
//! | `hysteresis` (points) | 0 | outside 0–100, at or above the warning threshold |
//! | `failure_rate_threshold`, `slow_call_rate_threshold` (%) | off | ≤ 0 or > 100 |
//! | `slow_call_duration` | 1 s | — |
//! | `sliding_window` | count of 100 | count 0; time below 10 µs; a count below `minimum_calls` when a rate rule is on |
//! | `minimum_calls` | 10 | 0 |
//! | `consecutive_failures` | off | 0 |
//! | `half_open_trials` | 1 | 0 |
//! | `max_wait_in_half_open` | no limit | 0 |
//! | `half_open_by_rate` | off (every trial must succeed) | on without a rate rule |
//! | `reset_timeout` | 30 s | — (up to `Duration::MAX`, saturating: "never") |
//! | `reset_backoff(factor, max)` | 1.0, 300 s | factor < 1 or not finite; max below `reset_timeout` |
//! | `rate_limit` | off | burst 0; a period under 1 ns per unit |
//! | `max_waiting` | 1024 | — |
//! | `open_on_usage` | true | — |
//!
//! # Timing
//! Reset timeouts, slow calls, time windows and rate limits read the manager's [`Clock`],
//! which follows Tokio's clock by default, so `tokio::time::pause` drives them in tests.
//!
//! ```
//! use std::time::Duration;
//! use architectlm_core::extensions::loadmanager::{CircuitStatus, ResourceType};
//! use architectlm_loadmanager::{Clock, LoadManager, Rejected, ResourceSettings};
//!
//! let clock = Clock::manual();
//! let manager = LoadManager::builder().clock(clock.clone()).build();
//! let api = manager
//!     .register(
//!         ResourceSettings::builder("payment-api", ResourceType::Api, 10)
//!             .consecutive_failures(3)
//!             .reset_timeout(Duration::from_secs(5))
//!             .build()
//!             .unwrap(),
//!     )
//!     .unwrap();
//! for _ in 0..3 {
//!     api.try_acquire(1).unwrap().failure();
//! }
//! assert_eq!(api.status().status, CircuitStatus::Open);
//! assert_eq!(api.try_acquire(1).unwrap_err(), Rejected::CircuitOpen);
//!
//! clock.advance(Duration::from_secs(5));
//! let trial = api.try_acquire(1).unwrap(); // the one trial call while half-open
//! assert_eq!(api.status().status, CircuitStatus::HalfOpen);
//! trial.success();
//! assert_eq!(api.status().status, CircuitStatus::Closed);
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

mod clock;
mod manager;
mod resource;
mod sample;
mod settings;
#[cfg(feature = "tower")]
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
pub mod tower;
mod window;

pub use architectlm_core::extensions::loadmanager::{
    CallOutcome, CircuitStatus, LoadEvent, LoadEventType, ResourceConfig, ResourcePermit,
    ResourceStatus, ResourceType, Thresholds,
};
pub use clock::Clock;
pub use manager::{LoadManager, LoadManagerBuilder};
pub use resource::{
    BreakerMode, EVENT_SOURCE, Permit, Rejected, Resource, ResourceMetrics, ResourceSnapshot,
};
pub use sample::SystemSample;
#[cfg(feature = "system")]
pub use sample::sample_system;
pub use settings::{RateLimit, ResourceSettings, ResourceSettingsBuilder, SlidingWindow};
