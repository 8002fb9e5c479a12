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

/// The types most programs write by name, with no two of the same name.
///
/// The extension *traits* come in anonymously (`as _`), so that their methods work on any
/// service, while the names `LoadManager`, `Supervisor`, ... are the concrete extensions a
/// program builds (with their features on). To name a trait — for `Arc<dyn SagaCoordinator>`
/// or a mock — import it from [`crate::extensions`].
///
/// ```
/// use architectlm::prelude::*;
/// use architectlm::extensions::LoadManager as _; // already in the prelude, anonymously
///
/// # #[cfg(all(feature = "loadmanager", feature = "supervisor"))]
/// # fn f() -> architectlm::Result<()> {
/// let supervisor = Supervisor::new(); // the struct, no clash with the trait
/// let manager = LoadManager::new();
/// # let _ = (supervisor, manager);
/// # Ok(()) }
/// ```
pub mod prelude {
    pub use architectlm_core::extensions::saga::{SagaDefinition, SagaStatus, SagaStep};
    pub use architectlm_core::extensions::scheduler::{RecurringTaskConfig, ScheduledTaskConfig};
    pub use architectlm_core::extensions::{
        LoadManager as _, SagaCoordinator as _, Scheduler as _, Supervisor as _,
    };
    pub use architectlm_core::{
        Error, Event, EventFilter, ExecuteOptions, ExtensionsConfig, ProcessDefinition, Result,
        RetryPolicy, Runtime, System, TaskContext, TaskDefinition, TaskError, TaskOrigin, TaskRef,
        TransitionDefinition,
    };

    #[cfg(feature = "loadmanager")]
    pub use architectlm_loadmanager::{LoadManager, ResourceSettings};
    #[cfg(feature = "saga")]
    pub use architectlm_saga::Coordinator;
    #[cfg(feature = "scheduler")]
    pub use architectlm_scheduler::TaskScheduler;
    #[cfg(feature = "supervisor")]
    pub use architectlm_supervisor::Supervisor;
}
