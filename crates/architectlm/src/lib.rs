//! # architectlm
//!
//! Reliable business workflows in Rust: systems of processes (state machines) and tasks, run by
//! a [`Runtime`], extended by four production components that each sit behind a Cargo feature.
//!
//! | feature | what it turns on |
//! |---|---|
//! | `saga` | [`saga`]: a durable saga coordinator (SQLite by default) |
//! | `scheduler` | [`scheduler`]: one-shot and cron runs of tasks, durable |
//! | `supervisor` | [`supervisor`]: health checks, recovery, OTP-style worker trees |
//! | `loadmanager` | [`loadmanager`]: resources, thresholds, circuit breakers |
//! | `sqlite` (default) | the embedded SQLite store of the durable extensions |
//! | `postgres` | the PostgreSQL store, for several nodes sharing one database |
//! | `tower` | a tower `Layer` guarding a service with a load-manager resource |
//! | `system` | cpu, memory and disk resources fed from the machine |
//! | `mock` | mockall mocks of the four extension traits (`architectlm::mock`) |
//! | `full` | all of the above but `mock` |
//!
//! The umbrella holds no logic: it re-exports [`architectlm_core`] and the enabled extensions.
#![cfg_attr(docsrs, feature(doc_cfg))]

#[doc(inline)]
pub use architectlm_core::*;

/// The durable saga coordinator.
#[cfg(feature = "saga")]
#[cfg_attr(docsrs, doc(cfg(feature = "saga")))]
#[doc(inline)]
pub use architectlm_saga as saga;

/// The scheduler.
#[cfg(feature = "scheduler")]
#[cfg_attr(docsrs, doc(cfg(feature = "scheduler")))]
#[doc(inline)]
pub use architectlm_scheduler as scheduler;

/// The supervisor.
#[cfg(feature = "supervisor")]
#[cfg_attr(docsrs, doc(cfg(feature = "supervisor")))]
#[doc(inline)]
pub use architectlm_supervisor as supervisor;

/// The load manager.
#[cfg(feature = "loadmanager")]
#[cfg_attr(docsrs, doc(cfg(feature = "loadmanager")))]
#[doc(inline)]
pub use architectlm_loadmanager as loadmanager;

/// The storage layer shared by the durable extensions.
#[cfg(any(feature = "saga", feature = "scheduler", feature = "postgres"))]
#[doc(inline)]
pub use architectlm_store as storage;

/// The types most programs need.
pub mod prelude {
    pub use architectlm_core::extensions::{LoadManager, SagaCoordinator, Scheduler, Supervisor};
    pub use architectlm_core::{
        Error, Event, EventFilter, ExtensionsConfig, ProcessDefinition, Result, RetryPolicy,
        Runtime, System, TaskContext, TaskDefinition, TaskError, TransitionDefinition,
    };
}
