//! The contracts of the four extensions: data types, statuses, events and traits.
//!
//! Each trait is object safe and used as `Arc<dyn …>` in [`crate::Services`]. With the `mock`
//! feature, mockall generates `MockSagaCoordinator`, `MockScheduler`, `MockSupervisor` and
//! `MockLoadManager` for tests. Serialised names are kebab-case, as in the original contracts.

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
