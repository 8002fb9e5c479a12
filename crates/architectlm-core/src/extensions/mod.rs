//! The contracts of the four extensions: data types, statuses, events and traits.
//!
//! Each trait is object safe and used as `Arc<dyn …>` in [`crate::Services`]. With the `mock`
//! feature, mockall generates `MockSagaCoordinator`, `MockScheduler`, `MockSupervisor` and
//! `MockLoadManager` for tests. Serialised names are kebab-case, as in the original contracts.
//!
//! # The refusal rule
//!
//! Every extension answers the same situation the same way:
//!
//! | situation | answer |
//! |---|---|
//! | a lookup (`get_*`) of an id nobody knows | `Ok(None)` |
//! | a command (`cancel_task`, `compensate_saga`, `recover_process`, `acquire_resource`, ...) on an id nobody knows | `Err(Error::NotFound { kind, id })` |
//! | a command whose answer is a `bool`, on a known thing that it leaves unchanged (already in that state, ended, or — for `acquire_resource` — refused for load) | `Ok(false)`; `Ok(true)` when it changed something |
//! | a command that returns a value (a permit, an instance) and cannot produce it for load | `Err(Error::Unavailable { id, reason })` |
//! | a command that is impossible in the thing's state (unwinding a saga whose version is not registered, rescheduling past `end_at`) | `Err` naming the id and the state |
//! | a bad argument (zero units, a blank name, a value nested too deep) | `Err(Error::InvalidInput)` or `Err(Error::InvalidConfig)` naming the field and the value |
//!
//! So `false` always means "known, and nothing happened, for an ordinary reason"; an error
//! always means the caller asked for something that cannot be, or the engine failed.
//! Lists come as a [`Page`], whose [`has_more`](Page::has_more) says when more items match
//! than were returned.

pub mod loadmanager;
pub mod saga;
pub mod scheduler;
pub mod supervisor;

pub use loadmanager::LoadManager;
pub use saga::SagaCoordinator;
pub use scheduler::Scheduler;
pub use supervisor::Supervisor;

use serde::{Deserialize, Serialize};

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Page<T> {
    /// The items on this page.
    pub items: Vec<T>,
    /// How many items match in total.
    pub total: u64,
    /// The offset of the next page, if there is one.
    pub next_offset: Option<u64>,
}

impl<T> Page<T> {
    /// A page.
    pub fn new(items: Vec<T>, total: u64, next_offset: Option<u64>) -> Self {
        Self {
            items,
            total,
            next_offset,
        }
    }

    /// Whether more items match than this page holds (its [`next_offset`](Self::next_offset)
    /// reads the next page): a list is never cut short silently.
    pub fn has_more(&self) -> bool {
        self.next_offset.is_some()
    }
}

/// Offset and limit of a listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Pagination {
    /// Items to skip.
    pub offset: u64,
    /// Items to return at most.
    pub limit: u64,
}

impl Default for Pagination {
    fn default() -> Self {
        Self {
            offset: 0,
            limit: 100,
        }
    }
}

impl Pagination {
    /// A page of `limit` items after `offset` items.
    pub fn new(offset: u64, limit: u64) -> Self {
        Self { offset, limit }
    }
}
