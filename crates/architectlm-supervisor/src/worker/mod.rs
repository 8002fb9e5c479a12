//! Erlang/OTP-style supervision of long-running async workers.
//!
//! A [`SupervisorSpec`] names a [`Strategy`], a [`RestartIntensity`] and its children
//! ([`ChildSpec`]): workers built by factory closures, or nested supervisors, which make a tree.
//! [`SupervisorSpec::start`] runs it and returns a [`SupervisorHandle`].
//!
//! - **Restart types**: [`Restart::Permanent`] children are always restarted,
//!   [`Restart::Transient`] ones only after an abnormal exit (error, panic, missed heartbeat),
//!   [`Restart::Temporary`] ones never.
//! - **Strategies**: one-for-one restarts the child alone; one-for-all stops every other child
//!   (reverse start order) and starts them all again (start order); rest-for-one does the same
//!   for the children started after the failed one.
//! - **Restart intensity**: more than `max_restarts` restarts within `period` make the
//!   supervisor stop all its children and exit; its parent sees an
//!   [`ExitReason::Escalated`] failure of that child and applies its own strategy and limit. At
//!   the top, the tree stops and [`SupervisorHandle::wait`] returns
//!   [`TreeExit::IntensityExceeded`].
//! - **Backoff**: [`RestartBackoff`] delays restarts exponentially with jitter and resets after a
//!   stable run; [`SupervisorSpecBuilder::count_delayed_restarts`] chooses whether delayed
//!   restarts count toward the intensity.
//! - **Heartbeats**: a child with [`ChildSpec::heartbeat`] must call
//!   [`WorkerContext::heartbeat`] within its deadline; a silent one is cancelled, aborted after
//!   its shutdown timeout, and restarted as an abnormal exit.
//! - **Shutdown**: [`SupervisorHandle::shutdown`] stops children in reverse start order, each
//!   with its own timeout, and reports how each ended.
//! - **Events and introspection**: panics, errors and hangs are told apart in
//!   [`ExitReason`], carried by [`WorkerEvent`]s; [`SupervisorHandle::children`] lists the tree
//!   with states and restart counts. All of it serialises with serde.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use architectlm_core::EventHub;
//! use architectlm_supervisor::worker::{ChildSpec, SupervisorSpec, WorkerEventKind};
//! use tokio_util::sync::CancellationToken;
//!
//! let runs = Arc::new(AtomicU32::new(0));
//! let counter = runs.clone();
//! let tree = SupervisorSpec::builder("app")
//!     .child(ChildSpec::worker("flaky", move |ctx| {
//!         let first = counter.fetch_add(1, Ordering::SeqCst) == 0;
//!         async move {
//!             if first {
//!                 return Err("lost the connection".into());
//!             }
//!             ctx.cancelled().await;
//!             Ok(())
//!         }
//!     }))
//!     .build()
//!     .unwrap();
//! // Subscribe before the start so the first restart cannot slip past.
//! let hub = EventHub::new("app");
//! let mut events = hub.subscribe("child-started");
//! let handle = tree.start_with(hub, CancellationToken::new());
//! while events.recv().await.map(|e| matches!(e.kind, WorkerEventKind::ChildStarted { restart_count: 1 })) != Some(true) {}
//! assert_eq!(handle.children().await.unwrap()[0].restart_count, 1);
//! handle.shutdown().await;
//! # });
//! ```

mod context;
mod handle;
mod spec;
mod status;
mod tree;

pub use context::WorkerContext;
pub use handle::SupervisorHandle;
pub use spec::{
    ChildSpec, DEFAULT_SHUTDOWN_TIMEOUT, Restart, RestartBackoff, RestartIntensity, Shutdown,
    Strategy, SupervisorSpec, SupervisorSpecBuilder, WorkerResult,
};
pub use status::{
    ChildCounts, ChildKindName, ChildShutdown, ChildState, ChildStatus, ExitReason, ShutdownReport,
    StopOutcome, TreeExit, WorkerEvent, WorkerEventKind,
};
/// The token a worker's context hands out ([`WorkerContext::cancellation`]), re-exported so
/// that a worker's code needs no dependency of its own to name it.
pub use tokio_util::sync::CancellationToken;
