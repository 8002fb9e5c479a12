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
//! A failed saga ends `failed` when no step had taken effect (nothing to undo) and
//! `compensated` when steps had and were undone ([`SagaStatus`]). Steps must be atomic, or be
//! marked [`compensate_on_failure`](SagaStep::compensate_on_failure).
//! [`CoordinatorBuilder::max_in_flight`] bounds the sagas a node drives at once (no bound by
//! default).
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `sqlite` | yes | [`Coordinator::sqlite`] and the SQLite saga journal |
//! | `postgres` | no | `PgSagaStore`: the saga journal on PostgreSQL, shared by coordinators on several nodes |
//!
//! # Several nodes
//! On a store shared by several nodes (PostgreSQL), each coordinator is a node with its own
//! [`node_id`](CoordinatorBuilder::node_id). Every unfinished saga is owned by one node through
//! a lease ([`lease_duration`](CoordinatorBuilder::lease_duration), default 10 s) that the node
//! renews every third of the lease while it runs. Every node looks for sagas whose lease ran
//! out and carries them on (forward or unwinding), so a dead node's sagas move to the others
//! within the lease time plus the takeover interval. Each claim bumps the saga's fencing token
//! and every journal write carries the token, so a node that lost a saga (stalled past its
//! lease) cannot write to it any more and stops driving it. Steps run at least once with
//! stable idempotency keys; a step running on a node that dies runs again on the new owner.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod coordinator;
mod definition;
mod driver;
mod state;

pub use coordinator::{Coordinator, CoordinatorBuilder, RecoveryReport, SOURCE, StrandedSaga};

pub use architectlm_core::extensions::saga::{
    SagaCoordinator, SagaDefinition, SagaEvent, SagaEventType, SagaFilter, SagaInstance,
    SagaStatus, SagaStep, SagaStepExecution, SagaStepStatus, StartSagaOptions,
};
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use architectlm_store::saga::PgSagaStore;
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
