//! # architectlm-store
//!
//! The storage layer shared by the durable extensions. It owns connections, schema migrations
//! and write batching; each extension owns its tables and the queries on them.
//!
//! - [`sqlite`] (feature `sqlite`, on by default): an embedded SQLite database in a file, in WAL
//!   mode, with one writer thread that commits concurrent writes together (group commit) and a
//!   small pool of readers. `synchronous=NORMAL` by default (survives a process crash; the last
//!   transactions may be lost on power failure), `FULL` as an option (survives power loss).
//! - [`postgres`] (feature `postgres`): PostgreSQL through a pool of `tokio-postgres`
//!   connections, for several nodes sharing one database. Migrations run under an advisory
//!   lock, so nodes may start together; coordination uses row versions, leases with fencing
//!   tokens ([`lease`]) and `FOR UPDATE SKIP LOCKED` claims ([`postgres::PgDb::claim`]).
//! - [`process`]: durable process instances (the core `ProcessStore`) on either backend, with
//!   optimistic concurrency.
//! - [`migration`]: the backend-neutral versioned [`migration::Migration`].
//!
//! A stored record that cannot be decoded never makes the others unreadable: lists and
//! recoveries skip it, log a warning and report it to the store's `on_unreadable` listeners
//! ([`architectlm_core::store::UnreadableRecord`]); a read of that record alone fails with
//! [`Error::UnreadableRecord`].
//!
//! **Architecture invariant:** this crate knows no extension; it depends on `architectlm-core`
//! only for the error type and the storage contracts it implements (`ProcessStore`).
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod lease;
pub mod migration;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod postgres;
pub mod process;
pub mod saga;
pub mod schedule;
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub mod sqlite;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod unreadable;

pub use architectlm_core::{Error, Result};
