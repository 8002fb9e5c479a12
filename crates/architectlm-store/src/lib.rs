//! # architectlm-store
//!
//! The storage layer shared by the durable extensions. It owns connections, schema migrations
//! and write batching; each extension owns its tables and the queries on them.
//!
//! - [`sqlite`] (feature `sqlite`, on by default): an embedded SQLite database in a file, in WAL
//!   mode, with one writer thread that commits concurrent writes together (group commit) and a
//!   small pool of readers. `synchronous=NORMAL` by default (survives a process crash; the last
//!   transactions may be lost on power failure), `FULL` as an option (survives power loss).
//!
//! **Architecture invariant:** this crate knows no extension; it depends on `architectlm-core`
//! only for the error type.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod process;
pub mod saga;
pub mod schedule;
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub mod sqlite;

pub use architectlm_core::{Error, Result};
