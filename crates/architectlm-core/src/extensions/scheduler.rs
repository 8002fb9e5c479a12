//! The scheduler contract: run tasks of the runtime once at a time, or on a cron pattern.
//!
//! Ids: the `id` of [`Scheduler::cancel_task`], `pause_task`, `resume_task` and `get_task` is the
//! *scheduled entry's* id; `task_id` in configs and filters is the runtime task to run.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::{Page, Pagination};

/// The longest jitter a recurring entry accepts: 30 days. Spreading runs further apart than
/// that is a different schedule, not a jitter.
pub const MAX_JITTER: Duration = Duration::from_secs(30 * 86_400);
use crate::Result;
use crate::event::{EventFilter, EventSubscription, Typed};
use crate::retry::RetryPolicy;

/// What to do with runs that were due while the scheduler was down or paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum MisfirePolicy {
    /// Skip them; carry on from the next due time.
    Skip,
    /// Run once now for all of them.
    #[default]
    FireOnce,
    /// Run each of them, up to a cap.
    FireAll {
        /// At most this many catch-up runs.
        max: u32,
    },
}

/// What to do when a run is due while the previous one is still going.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum OverlapPolicy {
    /// Start it anyway.
    Allow,
    /// Skip it.
    #[default]
    Skip,
    /// Queue one run to start when the previous one ends (further ones are skipped).
    QueueOne,
}

/// Per-entry policies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SchedulePolicy {
    /// What to do with missed runs.
    pub misfire: MisfirePolicy,
    /// A run later than this after its due time counts as missed.
    #[serde(with = "crate::serde_duration")]
    pub misfire_threshold: Duration,
    /// What to do when runs overlap.
    pub overlap: OverlapPolicy,
    /// Retries of a failing run.
    pub retry: Option<RetryPolicy>,
    /// At most this many runs of the entry at once.
    pub max_concurrent: Option<u32>,
}

impl SchedulePolicy {
    /// Sets the misfire policy.
    pub fn misfire(mut self, m: MisfirePolicy) -> Self {
        self.misfire = m;
        self
    }

    /// Sets how late a run may start before it counts as missed.
    pub fn misfire_threshold(mut self, t: Duration) -> Self {
        self.misfire_threshold = t;
        self
    }

    /// Sets the overlap policy.
    pub fn overlap(mut self, o: OverlapPolicy) -> Self {
        self.overlap = o;
        self
    }

    /// Sets the retry policy of each run.
    pub fn retry(mut self, r: RetryPolicy) -> Self {
        self.retry = Some(r);
        self
    }

    /// Sets the most runs of the entry at once.
    pub fn max_concurrent(mut self, n: u32) -> Self {
        self.max_concurrent = Some(n);
        self
    }
}

impl Default for SchedulePolicy {
    fn default() -> Self {
        Self {
            misfire: MisfirePolicy::default(),
            misfire_threshold: Duration::from_secs(60),
            overlap: OverlapPolicy::default(),
            retry: None,
            max_concurrent: None,
        }
    }
}

/// A one-shot entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ScheduledTaskConfig {
    /// The runtime task to run.
    pub task_id: String,
    /// Its input.
    pub input: Value,
    /// When to run it.
    pub execute_at: DateTime<Utc>,
    /// What it is for.
    pub description: Option<String>,
    /// Free-form metadata (filterable).
    pub metadata: serde_json::Map<String, Value>,
    /// Policies.
    pub policy: SchedulePolicy,
}

impl ScheduledTaskConfig {
    /// Run `task_id` with `input` at `execute_at`.
    pub fn new(task_id: impl Into<String>, input: Value, execute_at: DateTime<Utc>) -> Self {
        Self {
            task_id: task_id.into(),
            input,
            execute_at,
            description: None,
            metadata: serde_json::Map::new(),
            policy: SchedulePolicy::default(),
        }
    }

    /// Sets the description.
    pub fn description(mut self, d: impl Into<String>) -> Self {
        self.description = Some(d.into());
        self
    }

    /// Adds a metadata entry.
    pub fn metadata(mut self, k: impl Into<String>, v: Value) -> Self {
        self.metadata.insert(k.into(), v);
        self
    }

    /// Sets the policies.
    pub fn policy(mut self, p: SchedulePolicy) -> Self {
        self.policy = p;
        self
    }
}

/// A recurring entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RecurringTaskConfig {
    /// The runtime task to run.
    pub task_id: String,
    /// Its input.
    pub input: Value,
    /// A cron pattern: 5, 6 or 7 fields, `L`, `W`, `#`, nicknames such as `@daily`.
    pub pattern: String,
    /// IANA time zone of the pattern (default UTC).
    pub timezone: Option<String>,
    /// No run before this.
    pub start_at: Option<DateTime<Utc>>,
    /// No run after this.
    pub end_at: Option<DateTime<Utc>>,
    /// Stop after this many runs.
    pub max_executions: Option<u32>,
    /// Delay each run by a random amount up to this; at most [`MAX_JITTER`] (30 days), a
    /// longer one is refused when the entry is scheduled.
    #[serde(with = "crate::serde_duration::option")]
    pub jitter: Option<Duration>,
    /// What it is for.
    pub description: Option<String>,
    /// Free-form metadata (filterable).
    pub metadata: serde_json::Map<String, Value>,
    /// Policies.
    pub policy: SchedulePolicy,
}

impl RecurringTaskConfig {
    /// Run `task_id` with `input` on `pattern` (UTC unless [`timezone`](Self::timezone) is set).
    pub fn new(task_id: impl Into<String>, input: Value, pattern: impl Into<String>) -> Self {
        Self {
            task_id: task_id.into(),
            input,
            pattern: pattern.into(),
            timezone: None,
            start_at: None,
            end_at: None,
            max_executions: None,
            jitter: None,
            description: None,
            metadata: serde_json::Map::new(),
            policy: SchedulePolicy::default(),
        }
    }

    /// Sets the time zone.
    pub fn timezone(mut self, tz: impl Into<String>) -> Self {
        self.timezone = Some(tz.into());
        self
    }

    /// Sets the start.
    pub fn start_at(mut self, t: DateTime<Utc>) -> Self {
        self.start_at = Some(t);
        self
    }

    /// Sets the end.
    pub fn end_at(mut self, t: DateTime<Utc>) -> Self {
        self.end_at = Some(t);
        self
    }

    /// Sets the maximum number of runs.
    pub fn max_executions(mut self, n: u32) -> Self {
        self.max_executions = Some(n);
        self
    }

    /// Sets the jitter (at most [`MAX_JITTER`]).
    pub fn jitter(mut self, j: Duration) -> Self {
        self.jitter = Some(j);
        self
    }

    /// Sets the description.
    pub fn description(mut self, d: impl Into<String>) -> Self {
        self.description = Some(d.into());
        self
    }

    /// Adds a metadata entry.
    pub fn metadata(mut self, k: impl Into<String>, v: Value) -> Self {
        self.metadata.insert(k.into(), v);
        self
    }

    /// Sets the policies.
    pub fn policy(mut self, p: SchedulePolicy) -> Self {
        self.policy = p;
        self
    }
}

/// Status of a scheduled entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ScheduledTaskStatus {
    /// Waiting for its time.
    Scheduled,
    /// A run is going.
    Running,
    /// Done (one-shot, or a recurring entry past its end).
    Completed,
    /// Its (last) run failed after retries.
    Failed,
    /// Cancelled.
    Cancelled,
    /// Paused.
    Paused,
}

/// One run of an entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RunRecord {
    /// The time the run was due.
    pub due_at: DateTime<Utc>,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// Its output.
    pub result: Option<Value>,
    /// Its error.
    pub error: Option<String>,
    /// Attempts made (0 for a misfire decision that started nothing).
    pub attempts: u32,
    /// Set when this record is a misfire decision: occurrences that were late or overlapped,
    /// what the policy made of them. Such a record's `due_at` is the first occurrence it
    /// decided on and `started_at` = `finished_at` the time of the decision. Kept in the run
    /// history with the runs, so the decision survives restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub misfire: Option<MisfireRecord>,
}

/// Why occurrences misfired, and the policy that decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum MisfireReason {
    /// Later than the misfire threshold (the scheduler was down, paused or busy).
    Late {
        /// The entry's misfire policy.
        policy: MisfirePolicy,
    },
    /// Due while earlier runs were still going, beyond what the overlap policy lets wait.
    Overlap {
        /// The entry's overlap policy.
        policy: OverlapPolicy,
    },
}

/// A misfire decision in an entry's run history ([`RunRecord::misfire`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct MisfireRecord {
    /// Why, and the policy that decided.
    pub reason: MisfireReason,
    /// Occurrences the decision skipped (never run).
    pub skipped: u32,
    /// Runs it started or queued.
    pub started: u32,
}

impl MisfireRecord {
    /// A decision skipping `skipped` occurrences and starting `started` runs.
    pub fn new(reason: MisfireReason, skipped: u32, started: u32) -> Self {
        Self {
            reason,
            skipped,
            started,
        }
    }
}

impl RunRecord {
    /// A run of the occurrence due at `due_at` that started at `started_at`.
    pub fn new(due_at: DateTime<Utc>, started_at: DateTime<Utc>) -> Self {
        Self {
            due_at,
            started_at,
            finished_at: None,
            result: None,
            error: None,
            attempts: 0,
            misfire: None,
        }
    }

    /// The record of a misfire decision taken at `decided_at` about the occurrences from
    /// `due_at` on.
    pub fn misfire(
        due_at: DateTime<Utc>,
        decided_at: DateTime<Utc>,
        decision: MisfireRecord,
    ) -> Self {
        Self {
            finished_at: Some(decided_at),
            misfire: Some(decision),
            ..Self::new(due_at, decided_at)
        }
    }
}

/// A scheduled entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ScheduledTask {
    /// The entry's id.
    pub id: Uuid,
    /// The runtime task it runs.
    pub task_id: String,
    /// Its status.
    pub status: ScheduledTaskStatus,
    /// When it was (first) due.
    pub execute_at: DateTime<Utc>,
    /// When it last ran.
    pub executed_at: Option<DateTime<Utc>>,
    /// When it runs next.
    pub next_execution_at: Option<DateTime<Utc>>,
    /// The cron pattern of a recurring entry.
    pub pattern: Option<String>,
    /// Its time zone.
    pub timezone: Option<String>,
    /// Runs left, when limited.
    pub remaining_executions: Option<u32>,
    /// Runs so far.
    pub execution_count: u32,
    /// The input.
    pub input: Value,
    /// The last run's output.
    pub result: Option<Value>,
    /// The last run's error.
    pub error: Option<String>,
    /// What it is for.
    pub description: Option<String>,
    /// Free-form metadata.
    pub metadata: serde_json::Map<String, Value>,
    /// The most recent runs, newest last (bounded).
    pub history: Vec<RunRecord>,
}

impl ScheduledTask {
    /// An entry in status `scheduled` that runs `task_id` with `input` at `execute_at`; the
    /// other fields are empty and set by the scheduler.
    pub fn new(
        id: Uuid,
        task_id: impl Into<String>,
        input: Value,
        execute_at: DateTime<Utc>,
    ) -> Self {
        Self {
            id,
            task_id: task_id.into(),
            status: ScheduledTaskStatus::Scheduled,
            execute_at,
            executed_at: None,
            next_execution_at: Some(execute_at),
            pattern: None,
            timezone: None,
            remaining_executions: None,
            execution_count: 0,
            input,
            result: None,
            error: None,
            description: None,
            metadata: serde_json::Map::new(),
            history: Vec::new(),
        }
    }

    /// Whether it is a recurring (cron) entry.
    pub fn is_recurring(&self) -> bool {
        self.pattern.is_some()
    }
}

/// Which entries [`Scheduler::get_tasks`] returns; sorted by next run.
///
/// ```
/// use architectlm_core::extensions::scheduler::{ScheduledTaskFilter, ScheduledTaskStatus};
///
/// let filter = ScheduledTaskFilter::new()
///     .status(ScheduledTaskStatus::Scheduled)
///     .task_id("send-reminder")
///     .recurring(false)
///     .limit(20);
/// assert_eq!(filter.page.limit, 20);
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct ScheduledTaskFilter {
    /// Any of these statuses (empty: all).
    pub status: Vec<ScheduledTaskStatus>,
    /// Any of these runtime tasks (empty: all).
    pub task_id: Vec<String>,
    /// Next run at or after (inclusive).
    pub from: Option<DateTime<Utc>>,
    /// Next run at or before (inclusive).
    pub to: Option<DateTime<Utc>>,
    /// Only recurring (true) or one-shot (false) entries.
    pub recurring: Option<bool>,
    /// Entries whose metadata contains all of these pairs.
    pub metadata: serde_json::Map<String, Value>,
    /// Which page.
    pub page: Pagination,
}

impl ScheduledTaskFilter {
    /// Every entry, first page.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a status (entries in any of the added statuses match).
    pub fn status(mut self, s: ScheduledTaskStatus) -> Self {
        self.status.push(s);
        self
    }

    /// Adds a runtime task id (entries running any of the added tasks match).
    pub fn task_id(mut self, t: impl Into<String>) -> Self {
        self.task_id.push(t.into());
        self
    }

    /// Next run at or after `t`.
    pub fn from(mut self, t: DateTime<Utc>) -> Self {
        self.from = Some(t);
        self
    }

    /// Next run at or before `t`.
    pub fn to(mut self, t: DateTime<Utc>) -> Self {
        self.to = Some(t);
        self
    }

    /// Only recurring (`true`) or only one-shot (`false`) entries.
    pub fn recurring(mut self, r: bool) -> Self {
        self.recurring = Some(r);
        self
    }

    /// Entries whose metadata has `key` equal to `value`.
    pub fn metadata(mut self, key: impl Into<String>, value: Value) -> Self {
        self.metadata.insert(key.into(), value);
        self
    }

    /// Skips `offset` entries.
    pub fn offset(mut self, offset: u64) -> Self {
        self.page.offset = offset;
        self
    }

    /// Returns at most `limit` entries.
    pub fn limit(mut self, limit: u64) -> Self {
        self.page.limit = limit;
        self
    }

    /// Whether `task` passes every condition (pagination aside). Entries without a next run
    /// fail a `from`/`to` condition.
    pub fn matches(&self, task: &ScheduledTask) -> bool {
        if !self.status.is_empty() && !self.status.contains(&task.status) {
            return false;
        }
        if !self.task_id.is_empty() && !self.task_id.contains(&task.task_id) {
            return false;
        }
        if self.from.is_some() || self.to.is_some() {
            let Some(next) = task.next_execution_at else {
                return false;
            };
            if self.from.is_some_and(|f| next < f) || self.to.is_some_and(|t| next > t) {
                return false;
            }
        }
        if self.recurring.is_some_and(|r| r != task.is_recurring()) {
            return false;
        }
        self.metadata
            .iter()
            .all(|(k, v)| task.metadata.get(k) == Some(v))
    }
}

/// Scheduler event types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum SchedulerEventType {
    /// `scheduled`
    Scheduled,
    /// `started`
    Started,
    /// `completed`
    Completed,
    /// `failed`
    Failed,
    /// `cancelled`
    Cancelled,
    /// `paused`
    Paused,
    /// `resumed`
    Resumed,
    /// `misfired`
    Misfired,
    /// `record-unreadable`: a stored record could not be decoded and was skipped; the payload
    /// names its `kind`, `id` and `error` (see
    /// [`UnreadableRecord`](crate::store::UnreadableRecord)).
    RecordUnreadable,
}

impl SchedulerEventType {
    /// The kebab-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Scheduled => "scheduled",
            Self::Started => "started",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Paused => "paused",
            Self::Resumed => "resumed",
            Self::Misfired => "misfired",
            Self::RecordUnreadable => "record-unreadable",
        }
    }
}

/// A scheduler event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SchedulerEvent {
    /// Unique id.
    pub id: Uuid,
    /// The type.
    #[serde(rename = "type")]
    pub event_type: SchedulerEventType,
    /// When it happened.
    pub timestamp: DateTime<Utc>,
    /// The entry.
    pub scheduled_task_id: Uuid,
    /// The runtime task.
    pub task_id: String,
    /// The details (due time, result, error).
    pub payload: Value,
}

impl SchedulerEvent {
    /// A new event stamped now.
    pub fn new(
        event_type: SchedulerEventType,
        scheduled_task_id: Uuid,
        task_id: impl Into<String>,
        payload: Value,
    ) -> Self {
        Self {
            id: Uuid::new_v4(),
            event_type,
            timestamp: Utc::now(),
            scheduled_task_id,
            task_id: task_id.into(),
            payload,
        }
    }
}

impl Typed for SchedulerEvent {
    fn type_name(&self) -> &str {
        self.event_type.as_str()
    }
}

/// A callback for scheduler events.
pub type SchedulerEventHandler = Arc<dyn Fn(&SchedulerEvent) + Send + Sync>;

/// Runs tasks of the runtime at their time.
///
/// # Rules
/// - `Send + Sync`; every method may be called concurrently.
/// - A change is persisted before it is announced (returned or emitted).
/// - A run never starts before its due time; a recurring entry's next run is found from its
///   previous *scheduled* time.
/// - Each `(entry, due time)` runs once; a run interrupted by a crash may run again (at least
///   once) with the same idempotency key.
/// - `cancel_task`, `pause_task`, `resume_task`, `reschedule_task` and `trigger_task` return
///   `false` for an unknown id or a status that does not allow the change; bad configuration
///   (an invalid pattern, an unknown time zone or task) is an error naming the value.
/// - Events are published without blocking (see [`crate::event`]).
///
/// ```
/// use architectlm_core::extensions::scheduler::{ScheduledTaskConfig, Scheduler};
/// use chrono::{Duration, Utc};
///
/// /// Code that schedules a follow-up works with any implementation (or a mock).
/// async fn remind_later(scheduler: &dyn Scheduler, to: &str) -> architectlm_core::Result<uuid::Uuid> {
///     let at = Utc::now() + Duration::hours(24);
///     scheduler
///         .schedule_task(
///             ScheduledTaskConfig::new("send-reminder", serde_json::json!({"to": to}), at)
///                 .description("follow-up"),
///         )
///         .await
/// }
/// # let _ = remind_later;
/// ```
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait Scheduler: Send + Sync {
    /// Schedules a one-shot run; returns the entry's id.
    async fn schedule_task(&self, config: ScheduledTaskConfig) -> Result<Uuid>;
    /// Schedules a recurring entry; returns its id.
    async fn schedule_recurring_task(&self, config: RecurringTaskConfig) -> Result<Uuid>;
    /// Cancels an entry.
    async fn cancel_task(&self, id: Uuid) -> Result<bool>;
    /// Pauses an entry.
    async fn pause_task(&self, id: Uuid) -> Result<bool>;
    /// Resumes a paused entry.
    async fn resume_task(&self, id: Uuid) -> Result<bool>;
    /// Moves a one-shot entry (or the next run of a recurring one) to `execute_at`.
    async fn reschedule_task(&self, id: Uuid, execute_at: DateTime<Utc>) -> Result<bool>;
    /// Runs an entry now, outside of its schedule.
    async fn trigger_task(&self, id: Uuid) -> Result<bool>;
    /// One entry.
    async fn get_task(&self, id: Uuid) -> Result<Option<ScheduledTask>>;
    /// Entries matching a filter, sorted by next run: one page of at most the filter's limit
    /// (100 by default), with the total and the offset of the next page
    /// ([`Page::has_more`](super::Page::has_more)).
    async fn get_tasks(&self, filter: ScheduledTaskFilter) -> Result<Page<ScheduledTask>>;
    /// Calls `handler` for matching events until the handle is dropped.
    fn on_scheduler_event(
        &self,
        filter: EventFilter,
        handler: SchedulerEventHandler,
    ) -> EventSubscription;
}
