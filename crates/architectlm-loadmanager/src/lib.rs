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
pub use resource::{EVENT_SOURCE, Permit, Rejected, Resource, ResourceMetrics};
pub use sample::SystemSample;
#[cfg(feature = "system")]
pub use sample::sample_system;
pub use settings::{RateLimit, ResourceSettings, ResourceSettingsBuilder, SlidingWindow};
