//! # architectlm-scheduler
//!
//! A durable scheduler of one-shot and cron runs of ArchitectLM tasks: [`TaskScheduler`]
//! implements the [`Scheduler`](architectlm_core::extensions::Scheduler) contract and plugs into
//! a runtime as an [`Extension`](architectlm_core::Extension).
//!
//! - **On time, never early.** One timer driver over a heap of timers ordered by wall-clock
//!   time (1 ms resolution) holds one timer per entry; no task per timer, no periodic scan.
//!   Runs are acquired (claimed) a little ahead of their time and held until the wall clock
//!   reaches it; then every run of that instant starts together, so that thousands due at once
//!   start within milliseconds.
//! - **Compact.** A pending entry is kept once, in the store; the scheduler holds only its
//!   timer (about 70 bytes), plus a small slot while the entry runs or is being changed.
//! - **Cron** patterns with 5, 6 or 7 fields, `L`, `W`, `#` and nicknames, in IANA time zones,
//!   with croner's DST rules ([`cron`]); the next run follows the previous *scheduled* time;
//!   `start_at`, `end_at`, `max_executions` and jitter.
//! - **Policies** per entry: misfire (skip, fire once, fire all up to a cap) with a threshold,
//!   overlap (allow, skip, queue one), retries with the core `RetryPolicy`, a concurrency limit.
//! - **Durable**: entries and run claims live in a
//!   [`ScheduleStore`](architectlm_store::schedule::ScheduleStore) (SQLite with the `sqlite`
//!   feature, or memory). Each `(entry, due time)` is claimed once; after a restart every entry
//!   is back, missed runs follow the misfire policy, and runs interrupted by a crash run again
//!   (at least once, with a stable idempotency key).
//! - **Several nodes** (feature `postgres`): nodes sharing a
//!   `PgScheduleStore` run each `(entry, due time)` exactly once between them and take over
//!   the runs of a node that dies ([`ClusterOptions`], [`TaskSchedulerBuilder::cluster`]).
//! - **Readable records.** Inputs and metadata nested deeper than
//!   [`MAX_JSON_DEPTH`](architectlm_core::json::MAX_JSON_DEPTH) are refused, and a result that
//!   deep fails its run, so that every stored entry can be read back; an entry or run the store
//!   cannot decode anyway (corrupt) is skipped by listings and recovery and announced as
//!   `record-unreadable`.
//! - **Time is injectable** ([`Clock`]): tests run on a paused Tokio clock with [`TokioClock`].
//!
//! See [`TaskScheduler`] for the exact semantics and an example.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod clock;
pub mod cron;
mod idhash;
mod scheduler;
mod timer;
mod values;

pub use clock::{Clock, SystemClock, TokioClock};
pub use cron::{CronSchedule, PatternCache};
pub use scheduler::{ClusterOptions, SchedulerOptions, TaskScheduler, TaskSchedulerBuilder};
pub(crate) use values::{check_values, checked_result, unreadable_listener};
