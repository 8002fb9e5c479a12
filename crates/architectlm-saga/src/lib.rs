//! # architectlm-saga
//!
//! A durable saga coordinator for ArchitectLM: multi-step workflows whose completed steps are
//! undone, in strict reverse order, when a later step fails, the saga times out, or an operator
//! asks for it.
//!
//! [`Coordinator`] implements the core [`architectlm_core::extensions::SagaCoordinator`]
//! contract and the runtime's [`Extension`](architectlm_core::Extension) life cycle. Steps run
//! through [`Runtime::execute`](architectlm_core::Runtime::execute), so they get their retry
//! policy, timeout, idempotency key, cancellation and `ctx.services()` like any task.
//!
//! The journal is a [`SagaStore`] from
//! `architectlm-store`: in memory by default, or the embedded SQLite file with the `sqlite`
//! feature (on by default, [`Coordinator::sqlite`]). See [`Coordinator`] for the rules:
//! write-ahead journal, at-least-once steps, recovery, versions, compensation and shutdown.
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `sqlite` | yes | [`Coordinator::sqlite`] and the SQLite saga journal |
#![cfg_attr(docsrs, feature(doc_cfg))]

mod coordinator;
mod definition;
mod driver;

pub use coordinator::{Coordinator, CoordinatorBuilder, RecoveryReport, SOURCE, StrandedSaga};

pub use architectlm_core::extensions::saga::{
    SagaCoordinator, SagaDefinition, SagaEvent, SagaEventType, SagaFilter, SagaInstance,
    SagaStatus, SagaStep, SagaStepExecution, SagaStepStatus, StartSagaOptions,
};
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub use architectlm_store::saga::SqliteSagaStore;
pub use architectlm_store::saga::{InMemorySagaStore, SagaStore};

/// The current time at the journal's precision (microseconds), so that what a caller holds
/// equals what the journal returns.
pub(crate) fn now() -> chrono::DateTime<chrono::Utc> {
    let t = chrono::Utc::now();
    chrono::DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}
