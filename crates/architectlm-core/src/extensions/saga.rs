//! The saga coordinator contract: multi-step workflows that undo completed steps, in reverse
//! order, when a later step fails.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::{Page, Pagination};
use crate::Result;
use crate::event::{EventFilter, EventSubscription, Typed};
use crate::retry::RetryPolicy;
use crate::runtime::TaskRef;

/// A step of a saga: the work, and how to undo it.
///
/// # Steps must be atomic
/// A step's compensation undoes a **completed** step, given its result. A step that fails
/// (after its retries, or by the saga's timeout) is **not** compensated by default: the saga
/// takes a failed step to have had no effect. A step that can take effect and then fail — it
/// wrote to a database and then timed out, it called a payment service whose answer was lost —
/// must therefore either be atomic (all or nothing, for example one transaction, or an external
/// call made idempotent with [`TaskContext::idempotency_key`](crate::TaskContext::idempotency_key)
/// and checked on retry), or be marked [`compensate_on_failure`](Self::compensate_on_failure)
/// so that its own compensation runs when it fails.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SagaStep {
    /// Unique within the saga.
    pub id: String,
    /// Human name.
    pub name: String,
    /// What does the work: a task id or a closure.
    pub action: TaskRef,
    /// What undoes it, given the step's result.
    pub compensation: Option<TaskRef>,
    /// Retries of the action (default: the task's own policy).
    pub retry: Option<RetryPolicy>,
    /// Limit of each attempt of the action.
    pub timeout: Option<Duration>,
    /// Retries of the compensation.
    pub compensation_retry: Option<RetryPolicy>,
    /// Consecutive steps with the same group run in parallel and are compensated together.
    pub parallel_group: Option<String>,
    /// Whether the compensation also runs when this step fails after its retries (default
    /// `false`); see [`compensate_on_failure`](Self::compensate_on_failure).
    pub compensate_on_failure: bool,
    /// Free-form metadata.
    pub metadata: serde_json::Map<String, Value>,
}

impl SagaStep {
    /// A step whose action is a task of the system.
    pub fn task(id: impl Into<String>, task_id: impl Into<String>) -> Self {
        Self::with_action(id, TaskRef::Id(task_id.into()))
    }

    /// A step whose action is any [`TaskRef`] (for example a closure).
    pub fn with_action(id: impl Into<String>, action: TaskRef) -> Self {
        let id = id.into();
        Self {
            name: id.clone(),
            id,
            action,
            compensation: None,
            retry: None,
            timeout: None,
            compensation_retry: None,
            parallel_group: None,
            compensate_on_failure: false,
            metadata: serde_json::Map::new(),
        }
    }

    /// A step whose action is a closure `(input, context) -> TaskResult`.
    pub fn closure<F, Fut>(id: impl Into<String>, handler: F) -> Self
    where
        F: Fn(Value, crate::TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = crate::TaskResult> + Send + 'static,
    {
        let id = id.into();
        let name: Arc<str> = Arc::from(id.as_str());
        Self::with_action(
            id,
            TaskRef::Handler {
                name,
                handler: Arc::new(handler),
            },
        )
    }

    /// Sets the human name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Undoes the step with a task of the system.
    pub fn compensate_with(mut self, task_id: impl Into<String>) -> Self {
        self.compensation = Some(TaskRef::Id(task_id.into()));
        self
    }

    /// Undoes the step with a closure `(step result, context) -> TaskResult`.
    pub fn compensate_closure<F, Fut>(mut self, handler: F) -> Self
    where
        F: Fn(Value, crate::TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = crate::TaskResult> + Send + 'static,
    {
        let name: Arc<str> = Arc::from(format!("{}:compensation", self.id));
        self.compensation = Some(TaskRef::Handler {
            name,
            handler: Arc::new(handler),
        });
        self
    }

    /// Sets the action's retry policy.
    pub fn retry(mut self, p: RetryPolicy) -> Self {
        self.retry = Some(p);
        self
    }

    /// Sets the compensation's retry policy.
    pub fn compensation_retry(mut self, p: RetryPolicy) -> Self {
        self.compensation_retry = Some(p);
        self
    }

    /// Sets the timeout of each attempt of the action.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = Some(t);
        self
    }

    /// Also compensates the step when **it** fails after its retries, not only when a later
    /// step fails: for a step that may have taken effect before failing (a timeout after
    /// the remote side committed). Known in Temporal and Camunda as compensating the failed
    /// activity too.
    ///
    /// When the step fails, the unwind runs this step's compensation first (with the
    /// steps of its parallel group), then the earlier completed steps' in reverse order. The
    /// compensation receives `null` in place of a result (the step has none) and the key
    /// `<instance>:<step>:compensation`; the failed action had `<instance>:<step>`
    /// ([`TaskContext::idempotency_key`](crate::TaskContext::idempotency_key)), by which the
    /// compensation can find what the action did, and it must do nothing when the action did
    /// nothing. The step's record goes `failed` → `compensating` → `compensated` in the
    /// journal: a crash during that compensation runs it again after recovery, with the same
    /// key. The saga then ends `compensated`, even when this was its first step.
    ///
    /// A definition that sets it on a step without a compensation is refused.
    pub fn compensate_on_failure(mut self, yes: bool) -> Self {
        self.compensate_on_failure = yes;
        self
    }

    /// Puts the step in a parallel group.
    pub fn parallel(mut self, group: impl Into<String>) -> Self {
        self.parallel_group = Some(group.into());
        self
    }

    /// Adds a metadata entry.
    pub fn metadata(mut self, key: impl Into<String>, value: Value) -> Self {
        self.metadata.insert(key.into(), value);
        self
    }
}

/// A saga: steps run in order; when one fails for good, the completed ones are compensated in
/// reverse order.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SagaDefinition {
    /// Unique id.
    pub id: String,
    /// Human name.
    pub name: String,
    /// What it does.
    pub description: Option<String>,
    /// Version; an instance keeps the version it started with.
    pub version: u32,
    /// The steps, in order.
    pub steps: Vec<SagaStep>,
    /// Limit for the whole saga; reaching it unwinds.
    pub timeout: Option<Duration>,
    /// Free-form metadata.
    pub metadata: serde_json::Map<String, Value>,
}

impl SagaDefinition {
    /// A definition with an id, version 1 and no steps yet.
    pub fn new(id: impl Into<String>) -> Self {
        let id = id.into();
        Self {
            name: id.clone(),
            id,
            description: None,
            version: 1,
            steps: Vec::new(),
            timeout: None,
            metadata: serde_json::Map::new(),
        }
    }

    /// Adds a step.
    pub fn step(mut self, step: SagaStep) -> Self {
        self.steps.push(step);
        self
    }

    /// Sets the version.
    pub fn version(mut self, v: u32) -> Self {
        self.version = v;
        self
    }

    /// Sets the saga timeout.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = Some(t);
        self
    }

    /// Sets the human name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets the description.
    pub fn description(mut self, d: impl Into<String>) -> Self {
        self.description = Some(d.into());
        self
    }

    /// Adds a metadata entry.
    pub fn metadata(mut self, key: impl Into<String>, value: Value) -> Self {
        self.metadata.insert(key.into(), value);
        self
    }
}

/// Status of a saga instance.
///
/// A saga that fails ends in one of two statuses, which say whether anything had to be undone:
/// - `failed`: a step failed and **no step had taken effect** — the failing step was the
///   first, or every step before it had nothing to undo (none completed). There was nothing
///   to compensate; nothing ran backwards.
/// - `compensated`: steps had taken effect (completed, or a failed step marked
///   [`compensate_on_failure`](SagaStep::compensate_on_failure)) and the unwind undid them:
///   every compensation ran and succeeded. A completed step without a compensation is
///   skipped by the unwind (it needs no undo) and does not make the saga `failed`.
///
/// Either way [`SagaInstance::error`] says which step failed and why. Both are terminal and
/// mean the business transaction did not happen; `compensation-failed` means it is neither
/// done nor undone, and needs an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum SagaStatus {
    /// Accepted, not yet running.
    Created,
    /// Running its steps.
    Running,
    /// Every step completed.
    Completed,
    /// A step failed before any step had taken effect: there was nothing to compensate.
    Failed,
    /// Undoing completed steps.
    Compensating,
    /// Unwound: every step that had taken effect and has a compensation was undone (after a
    /// failed step, the saga's timeout, or [`SagaCoordinator::compensate_saga`]).
    Compensated,
    /// A compensation failed after its retries; the undo stack is intact and
    /// `resume_compensation` carries on.
    CompensationFailed,
}

impl SagaStatus {
    /// Whether the saga will not move on by itself.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Failed | Self::Compensated | Self::CompensationFailed
        )
    }

    /// The kebab-case name, as serialised.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Compensating => "compensating",
            Self::Compensated => "compensated",
            Self::CompensationFailed => "compensation-failed",
        }
    }

    /// Parses a kebab-case name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "created" => Self::Created,
            "running" => Self::Running,
            "completed" => Self::Completed,
            "failed" => Self::Failed,
            "compensating" => Self::Compensating,
            "compensated" => Self::Compensated,
            "compensation-failed" => Self::CompensationFailed,
            _ => return None,
        })
    }
}

impl SagaStepStatus {
    /// The kebab-case name, as serialised.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Compensating => "compensating",
            Self::Compensated => "compensated",
            Self::CompensationFailed => "compensation-failed",
        }
    }

    /// Parses a kebab-case name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Self::Pending,
            "running" => Self::Running,
            "completed" => Self::Completed,
            "failed" => Self::Failed,
            "compensating" => Self::Compensating,
            "compensated" => Self::Compensated,
            "compensation-failed" => Self::CompensationFailed,
            _ => return None,
        })
    }
}

/// Status of one step of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum SagaStepStatus {
    /// Not started.
    Pending,
    /// Running.
    Running,
    /// Done.
    Completed,
    /// Failed after its retries.
    Failed,
    /// Being undone.
    Compensating,
    /// Undone.
    Compensated,
    /// Its compensation failed after its retries.
    CompensationFailed,
}

/// The record of one step of an instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SagaStepExecution {
    /// Unique id.
    pub id: Uuid,
    /// The step.
    pub step_id: String,
    /// Its status.
    pub status: SagaStepStatus,
    /// Attempts of the action so far.
    pub attempts: u32,
    /// Attempts of the compensation so far.
    pub compensation_attempts: u32,
    /// The key to pass to external systems; stable across retries and recovery.
    pub idempotency_key: String,
    /// When the action started.
    pub started_at: Option<DateTime<Utc>>,
    /// When the action (or compensation) finished.
    pub completed_at: Option<DateTime<Utc>>,
    /// The action's result.
    pub result: Option<Value>,
    /// The last error.
    pub error: Option<String>,
}

impl SagaStepExecution {
    /// A pending step record with its stable idempotency key.
    pub fn new(id: Uuid, step_id: impl Into<String>, idempotency_key: impl Into<String>) -> Self {
        Self {
            id,
            step_id: step_id.into(),
            status: SagaStepStatus::Pending,
            attempts: 0,
            compensation_attempts: 0,
            idempotency_key: idempotency_key.into(),
            started_at: None,
            completed_at: None,
            result: None,
            error: None,
        }
    }
}

/// A saga instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SagaInstance {
    /// Unique id.
    pub id: Uuid,
    /// The definition.
    pub saga_id: String,
    /// The definition version it started with.
    pub saga_version: u32,
    /// Its status.
    pub status: SagaStatus,
    /// One record per step.
    pub steps: Vec<SagaStepExecution>,
    /// The input it was started with.
    pub input: Value,
    /// Step results by step id.
    pub context: Value,
    /// The idempotency key it was started with.
    pub idempotency_key: Option<String>,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it reached a terminal status.
    pub completed_at: Option<DateTime<Utc>>,
    /// Why it failed or was compensated.
    pub error: Option<String>,
}

impl SagaInstance {
    /// A new instance in status `created`, with its step records; `context` starts as `{}`.
    pub fn new(
        id: Uuid,
        saga_id: impl Into<String>,
        saga_version: u32,
        input: Value,
        idempotency_key: Option<String>,
        started_at: DateTime<Utc>,
        steps: Vec<SagaStepExecution>,
    ) -> Self {
        Self {
            id,
            saga_id: saga_id.into(),
            saga_version,
            status: SagaStatus::Created,
            steps,
            input,
            context: Value::Object(serde_json::Map::new()),
            idempotency_key,
            started_at,
            completed_at: None,
            error: None,
        }
    }

    /// Rebuilds [`context`](Self::context) from the step records: the result of every step that
    /// has one, by step id.
    pub fn rebuild_context(&mut self) {
        let mut map = serde_json::Map::new();
        for s in &self.steps {
            if let Some(r) = &s.result {
                map.insert(s.step_id.clone(), r.clone());
            }
        }
        self.context = Value::Object(map);
    }
}

/// Options of [`SagaCoordinator::start_saga_with`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct StartSagaOptions {
    /// Starting twice with the same key returns the first instance.
    pub idempotency_key: Option<String>,
}

impl StartSagaOptions {
    /// Options with an idempotency key.
    pub fn idempotency_key(key: impl Into<String>) -> Self {
        Self {
            idempotency_key: Some(key.into()),
        }
    }
}

/// Which instances [`SagaCoordinator::list_sagas`] returns.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct SagaFilter {
    /// Only this definition.
    pub saga_id: Option<String>,
    /// Only these statuses (empty: all).
    pub status: Vec<SagaStatus>,
    /// Started at or after.
    pub started_after: Option<DateTime<Utc>>,
    /// Started at or before.
    pub started_before: Option<DateTime<Utc>>,
    /// Which page.
    pub page: Pagination,
}

impl SagaFilter {
    /// Every instance, first page.
    pub fn all() -> Self {
        Self::default()
    }

    /// Only instances of this definition.
    pub fn saga(mut self, saga_id: impl Into<String>) -> Self {
        self.saga_id = Some(saga_id.into());
        self
    }

    /// Adds a status to match (several statuses match any of them).
    pub fn status(mut self, status: SagaStatus) -> Self {
        self.status.push(status);
        self
    }

    /// Only instances started at or after `t`.
    pub fn started_after(mut self, t: DateTime<Utc>) -> Self {
        self.started_after = Some(t);
        self
    }

    /// Only instances started at or before `t`.
    pub fn started_before(mut self, t: DateTime<Utc>) -> Self {
        self.started_before = Some(t);
        self
    }

    /// Sets the page.
    pub fn page(mut self, page: Pagination) -> Self {
        self.page = page;
        self
    }
}

/// Saga event types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum SagaEventType {
    /// `saga-started`
    SagaStarted,
    /// `saga-completed`
    SagaCompleted,
    /// `saga-failed`
    SagaFailed,
    /// `step-started`
    StepStarted,
    /// `step-completed`
    StepCompleted,
    /// `step-failed`
    StepFailed,
    /// `compensation-started`
    CompensationStarted,
    /// `compensation-completed`
    CompensationCompleted,
    /// `compensation-failed`
    CompensationFailed,
    /// `record-unreadable`: a stored record could not be decoded and was skipped; the payload
    /// names its `kind`, `id` and `error` (see
    /// [`UnreadableRecord`](crate::store::UnreadableRecord)).
    RecordUnreadable,
}

impl SagaEventType {
    /// The kebab-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SagaStarted => "saga-started",
            Self::SagaCompleted => "saga-completed",
            Self::SagaFailed => "saga-failed",
            Self::StepStarted => "step-started",
            Self::StepCompleted => "step-completed",
            Self::StepFailed => "step-failed",
            Self::CompensationStarted => "compensation-started",
            Self::CompensationCompleted => "compensation-completed",
            Self::CompensationFailed => "compensation-failed",
            Self::RecordUnreadable => "record-unreadable",
        }
    }
}

/// A saga event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SagaEvent {
    /// Unique id.
    pub id: Uuid,
    /// The type.
    #[serde(rename = "type")]
    pub event_type: SagaEventType,
    /// When it happened.
    pub timestamp: DateTime<Utc>,
    /// The definition.
    pub saga_id: String,
    /// The instance.
    pub instance_id: Uuid,
    /// The step, for step and compensation events.
    pub step_id: Option<String>,
    /// The details.
    pub payload: Value,
}

impl SagaEvent {
    /// A new event stamped now.
    pub fn new(
        event_type: SagaEventType,
        saga_id: impl Into<String>,
        instance_id: Uuid,
        step_id: Option<String>,
        payload: Value,
    ) -> Self {
        Self {
            id: Uuid::new_v4(),
            event_type,
            timestamp: Utc::now(),
            saga_id: saga_id.into(),
            instance_id,
            step_id,
            payload,
        }
    }
}

impl Typed for SagaEvent {
    fn type_name(&self) -> &str {
        self.event_type.as_str()
    }
}

/// A callback for saga events.
pub type SagaEventHandler = Arc<dyn Fn(&SagaEvent) + Send + Sync>;

/// Runs sagas.
///
/// # Rules
/// - `Send + Sync`; every method may be called concurrently.
/// - `start_saga` returns as soon as the instance is durably recorded; the steps run in the
///   background. The instance returned is `running`, or `created` when the implementation
///   holds it back (an admission bound on sagas in flight) until it can be driven.
/// - Starting with an idempotency key that was already used for the same definition returns
///   the existing instance and starts nothing.
/// - **At least once.** A step is recorded as running before it runs and its result before the
///   next step starts. A step that was running at a crash runs again after recovery, with the
///   same idempotency key ([`crate::TaskContext::idempotency_key`]): steps must be idempotent
///   or hand the key to the system they call. Compensations follow the same rule.
/// - An instance runs the definition version it started with; recovering an instance whose
///   version is no longer registered is an error naming the version, never a silent mismatch.
/// - `compensate_saga` on a running saga stops forward progress after the running step and
///   unwinds (the running step, if it completes, is compensated too). On a **completed** saga
///   it unwinds it: every completed step is compensated in reverse order and the saga ends
///   `compensated` (the undo stack of a completed saga is intact; this is how a finished
///   business transaction is reversed). On a `compensated` or `failed` saga it changes
///   nothing; on a `compensation-failed` one it resumes the unwind.
/// - Events are delivered as in [`crate::event`]: never blocking the saga, never lost silently.
///
/// ```
/// use architectlm_core::extensions::SagaCoordinator;
/// use architectlm_core::extensions::saga::{SagaDefinition, SagaStep};
///
/// // Any implementation is used through the trait, for example from a task with
/// // `ctx.saga_coordinator()?`.
/// async fn place_order(sagas: &dyn SagaCoordinator) -> architectlm_core::Result<()> {
///     sagas
///         .define_saga(
///             SagaDefinition::new("order")
///                 .step(SagaStep::task("reserve", "reserve-stock").compensate_with("release-stock"))
///                 .step(SagaStep::task("charge", "charge-card").compensate_with("refund-card")),
///         )
///         .await?;
///     let instance = sagas.start_saga("order", serde_json::json!({"order": 42})).await?;
///     let _ = sagas.get_saga_status(instance.id).await?;
///     // Waits for the saga's end (or gives up after 30 s; the saga carries on).
///     let done = sagas.wait_for(instance.id, std::time::Duration::from_secs(30)).await?;
///     assert!(done.status.is_terminal());
///     Ok(())
/// }
/// # let _ = place_order;
/// ```
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait SagaCoordinator: Send + Sync {
    /// Registers (or replaces, for a new version) a definition.
    async fn define_saga(&self, definition: SagaDefinition) -> Result<()>;
    /// Starts an instance of the latest version of a definition.
    async fn start_saga(&self, saga_id: &str, input: Value) -> Result<SagaInstance>;
    /// Starts an instance with options (an idempotency key).
    async fn start_saga_with(
        &self,
        saga_id: &str,
        input: Value,
        options: StartSagaOptions,
    ) -> Result<SagaInstance>;
    /// The instance with its step timeline.
    async fn get_saga_status(&self, instance_id: Uuid) -> Result<Option<SagaInstance>>;
    /// Stops forward progress after the running step and undoes the completed steps; unwinds
    /// a completed saga (see the rules above).
    async fn compensate_saga(&self, instance_id: Uuid, reason: &str) -> Result<SagaInstance>;
    /// Carries on an unwind that stopped in `compensation-failed`.
    async fn resume_compensation(&self, instance_id: Uuid) -> Result<SagaInstance>;
    /// Lists instances.
    async fn list_sagas(&self, filter: SagaFilter) -> Result<Page<SagaInstance>>;
    /// Waits until the instance reaches a terminal status ([`SagaStatus::is_terminal`]) and
    /// this coordinator no longer drives it, then returns it as stored.
    ///
    /// Errors: [`Error::Timeout`](crate::Error::Timeout) when `timeout` passes first (the saga
    /// carries on; call again to keep waiting), [`Error::NotFound`](crate::Error::NotFound)
    /// for an unknown instance. A saga waiting for a place (see the implementation's admission
    /// bound) is waited for like a running one. `Duration::MAX` waits without limit.
    async fn wait_for(&self, instance_id: Uuid, timeout: Duration) -> Result<SagaInstance>;
    /// Waits until this coordinator neither drives the instance nor holds it waiting for a
    /// place: it reached a terminal status, or shutdown stopped it. Returns at once for an
    /// instance this coordinator does not hold (unknown, finished, or driven by another node).
    /// Cheaper than [`wait_for`](Self::wait_for): no read of the journal, no status returned.
    async fn settled(&self, instance_id: Uuid);
    /// Calls `handler` for matching events until the handle is dropped.
    fn on_saga_event(&self, filter: EventFilter, handler: SagaEventHandler) -> EventSubscription;
}
