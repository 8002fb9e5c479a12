//! # architectlm-supervisor
//!
//! Health checks, recovery and OTP-style worker supervision for ArchitectLM.
//!
//! Two independent parts:
//! - [`Supervisor`] implements the runtime's
//!   [`Supervisor`](architectlm_core::extensions::Supervisor) contract: it checks process
//!   instances on an interval (stuck past a deadline, or last action failed) and recovers them
//!   (retry the last action, restart from the initial state, or a custom recovery task), and it
//!   recovers failed executions of supervised tasks. See [`health`](crate::Supervisor) docs.
//! - [`worker`] supervises long-running async workers the Erlang/OTP way: restart strategies,
//!   restart intensity with escalation through a tree, exponential backoff with jitter,
//!   heartbeats, and graceful shutdown.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod clock;
mod health;
pub mod worker;

pub use health::{EXTENSION_NAME, Supervisor, SupervisorBuilder};
