//! The supervisor contract: health checks and recovery of process instances and task
//! executions.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::Result;
use crate::event::{EventFilter, EventSubscription, Typed};
use crate::retry::RetryPolicy;

/// How an unhealthy process instance is recovered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ProcessRecoveryStrategy {
    /// Run the last transition's action again with the same input.
    RetryLastAction,
    /// Put the instance back in the initial state with its original context.
    Restart,
    /// Run `custom_recovery_action` (a task) with the instance.
    Custom,
}

/// How a failed task execution is recovered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum TaskRecoveryStrategy {
    /// Run the task again with the same input.
    Retry,
    /// Run `custom_recovery_action` (a task) with the failed execution.
    Custom,
}

/// Supervision of the instances of one process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ProcessSupervisionConfig {
    /// The process whose instances are supervised.
    pub process_id: String,
    /// Attempts before giving up (status failed).
    pub max_recovery_attempts: u32,
    /// How often health is checked.
    #[serde(with = "crate::serde_duration")]
    pub check_interval: Duration,
    /// The strategy.
    pub recovery_strategy: ProcessRecoveryStrategy,
    /// The task run by the custom strategy.
    pub custom_recovery_action: Option<String>,
    /// An instance in a non-final state for longer than this is unhealthy.
    #[serde(with = "crate::serde_duration::option")]
    pub state_timeout: Option<Duration>,
    /// Per-state deadlines, overriding `state_timeout`.
    pub state_timeouts: HashMap<String, u64>,
    /// Delay between attempts (`max_attempts` is ignored; `max_recovery_attempts` counts).
    pub backoff: Option<RetryPolicy>,
}

impl ProcessSupervisionConfig {
    /// Supervise `process_id` with `strategy`, 3 attempts, checked every 30 s.
    pub fn new(process_id: impl Into<String>, strategy: ProcessRecoveryStrategy) -> Self {
        Self {
            process_id: process_id.into(),
            max_recovery_attempts: 3,
            check_interval: Duration::from_secs(30),
            recovery_strategy: strategy,
            custom_recovery_action: None,
            state_timeout: None,
            state_timeouts: HashMap::new(),
            backoff: None,
        }
    }

    /// Sets the attempts.
    pub fn max_recovery_attempts(mut self, n: u32) -> Self {
        self.max_recovery_attempts = n;
        self
    }

    /// Sets the check interval.
    pub fn check_interval(mut self, d: Duration) -> Self {
        self.check_interval = d;
        self
    }

    /// Sets the custom recovery task.
    pub fn custom_recovery_action(mut self, task_id: impl Into<String>) -> Self {
        self.custom_recovery_action = Some(task_id.into());
        self
    }

    /// Sets the deadline for any non-final state.
    pub fn state_timeout(mut self, d: Duration) -> Self {
        self.state_timeout = Some(d);
        self
    }

    /// Sets the deadline of one state.
    pub fn state_timeout_for(mut self, state: impl Into<String>, d: Duration) -> Self {
        self.state_timeouts.insert(
            state.into(),
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
        );
        self
    }

    /// Sets the delay between attempts.
    pub fn backoff(mut self, p: RetryPolicy) -> Self {
        self.backoff = Some(p);
        self
    }
}

/// Supervision of the executions of one task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct TaskSupervisionConfig {
    /// The task whose failed executions are recovered.
    pub task_id: String,
    /// Attempts before giving up.
    pub max_recovery_attempts: u32,
    /// How often pending recoveries are looked at.
    #[serde(with = "crate::serde_duration")]
    pub check_interval: Duration,
    /// The strategy.
    pub recovery_strategy: TaskRecoveryStrategy,
    /// The task run by the custom strategy.
    pub custom_recovery_action: Option<String>,
    /// Delay between attempts.
    pub backoff: Option<RetryPolicy>,
}

impl TaskSupervisionConfig {
    /// Supervise `task_id` with `strategy`, 3 attempts, checked every 30 s.
    pub fn new(task_id: impl Into<String>, strategy: TaskRecoveryStrategy) -> Self {
        Self {
            task_id: task_id.into(),
            max_recovery_attempts: 3,
            check_interval: Duration::from_secs(30),
            recovery_strategy: strategy,
            custom_recovery_action: None,
            backoff: None,
        }
    }

    /// Sets the attempts.
    pub fn max_recovery_attempts(mut self, n: u32) -> Self {
        self.max_recovery_attempts = n;
        self
    }

    /// Sets the check interval.
    pub fn check_interval(mut self, d: Duration) -> Self {
        self.check_interval = d;
        self
    }

    /// Sets the custom recovery task.
    pub fn custom_recovery_action(mut self, task_id: impl Into<String>) -> Self {
        self.custom_recovery_action = Some(task_id.into());
        self
    }

    /// Sets the delay between attempts.
    pub fn backoff(mut self, p: RetryPolicy) -> Self {
        self.backoff = Some(p);
        self
    }
}

/// What is supervised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetType {
    /// A process instance.
    Process,
    /// A task execution.
    Task,
}

/// Health of a supervised target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum HealthStatus {
    /// Fine.
    Healthy,
    /// A problem was detected.
    Unhealthy,
    /// A recovery is running.
    Recovering,
    /// The last recovery succeeded.
    Recovered,
    /// Recovery gave up.
    Failed,
}

/// The supervision status of one target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SupervisionStatus {
    /// Unique id of this record.
    pub id: Uuid,
    /// The instance id or execution id.
    pub target_id: Uuid,
    /// Process or task.
    pub target_type: TargetType,
    /// Health.
    pub status: HealthStatus,
    /// Attempts so far.
    pub recovery_attempts: u32,
    /// The limit.
    pub max_recovery_attempts: u32,
    /// When health was last checked.
    pub last_check_at: Option<DateTime<Utc>>,
    /// When recovery last ran.
    pub last_recovery_at: Option<DateTime<Utc>>,
    /// The last problem.
    pub error: Option<String>,
}

impl SupervisionStatus {
    /// A fresh record for a target: no attempts, never checked, no error.
    pub fn new(
        target_id: Uuid,
        target_type: TargetType,
        status: HealthStatus,
        max_recovery_attempts: u32,
    ) -> Self {
        Self {
            id: Uuid::new_v4(),
            target_id,
            target_type,
            status,
            recovery_attempts: 0,
            max_recovery_attempts,
            last_check_at: None,
            last_recovery_at: None,
            error: None,
        }
    }
}

/// Supervision event types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum SupervisionEventType {
    /// `unhealthy-detected`
    UnhealthyDetected,
    /// `recovery-started`
    RecoveryStarted,
    /// `recovery-succeeded`
    RecoverySucceeded,
    /// `recovery-failed`
    RecoveryFailed,
    /// `max-recovery-attempts-reached`
    MaxRecoveryAttemptsReached,
}

impl SupervisionEventType {
    /// The kebab-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnhealthyDetected => "unhealthy-detected",
            Self::RecoveryStarted => "recovery-started",
            Self::RecoverySucceeded => "recovery-succeeded",
            Self::RecoveryFailed => "recovery-failed",
            Self::MaxRecoveryAttemptsReached => "max-recovery-attempts-reached",
        }
    }
}

/// A supervision event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SupervisionEvent {
    /// Unique id.
    pub id: Uuid,
    /// The type.
    #[serde(rename = "type")]
    pub event_type: SupervisionEventType,
    /// When it happened.
    pub timestamp: DateTime<Utc>,
    /// The instance or execution.
    pub target_id: Uuid,
    /// Process or task.
    pub target_type: TargetType,
    /// The details (attempt, error, cause).
    pub payload: Value,
}

impl SupervisionEvent {
    /// A new event stamped now.
    pub fn new(
        event_type: SupervisionEventType,
        target_id: Uuid,
        target_type: TargetType,
        payload: Value,
    ) -> Self {
        Self {
            id: Uuid::new_v4(),
            event_type,
            timestamp: Utc::now(),
            target_id,
            target_type,
            payload,
        }
    }
}

impl Typed for SupervisionEvent {
    fn type_name(&self) -> &str {
        self.event_type.as_str()
    }
}

/// A callback for supervision events.
pub type SupervisionEventHandler = Arc<dyn Fn(&SupervisionEvent) + Send + Sync>;

/// Watches process instances and task executions and recovers them.
///
/// # Rules
/// - `Send + Sync`; every method may be called concurrently.
/// - At most one recovery of a target runs at a time; `recover_*` while one runs returns
///   `false`.
/// - Attempts are bounded by `max_recovery_attempts`; reaching it sets status failed and emits
///   `max-recovery-attempts-reached` once.
/// - A status goes `unhealthy` (with `unhealthy-detected`) → `recovering` (`recovery-started`)
///   → `recovered` (`recovery-succeeded`, then `healthy` at the next check that finds the
///   target well) or back to `unhealthy` (`recovery-failed`) until the limit.
/// - Configurations are validated when given: a zero `check_interval` or
///   `max_recovery_attempts`, or a custom strategy without a recovery task, is
///   [`Error::InvalidConfig`](crate::Error::InvalidConfig) naming the field and value.
///
/// ```
/// use std::time::Duration;
/// use architectlm_core::extensions::Supervisor;
/// use architectlm_core::extensions::supervisor::{ProcessRecoveryStrategy, ProcessSupervisionConfig};
///
/// async fn watch_payments(supervisor: &dyn Supervisor) -> architectlm_core::Result<()> {
///     supervisor
///         .supervise_process(
///             ProcessSupervisionConfig::new("payment", ProcessRecoveryStrategy::RetryLastAction)
///                 .max_recovery_attempts(5)
///                 .check_interval(Duration::from_secs(10))
///                 .state_timeout_for("authorising", Duration::from_secs(60)),
///         )
///         .await
/// }
/// ```
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait Supervisor: Send + Sync {
    /// Supervises every instance of a process.
    async fn supervise_process(&self, config: ProcessSupervisionConfig) -> Result<()>;
    /// Supervises every execution of a task.
    async fn supervise_task(&self, config: TaskSupervisionConfig) -> Result<()>;
    /// The status of a supervised instance.
    async fn get_process_supervision_status(
        &self,
        instance_id: Uuid,
    ) -> Result<Option<SupervisionStatus>>;
    /// The status of a supervised execution.
    async fn get_task_supervision_status(
        &self,
        execution_id: Uuid,
    ) -> Result<Option<SupervisionStatus>>;
    /// Recovers an instance now; `true` if the recovery succeeded.
    async fn recover_process(&self, instance_id: Uuid) -> Result<bool>;
    /// Recovers a failed execution now; `true` if the recovery succeeded.
    async fn recover_task(&self, execution_id: Uuid) -> Result<bool>;
    /// Calls `handler` for matching events until the handle is dropped.
    fn on_supervision_event(
        &self,
        filter: EventFilter,
        handler: SupervisionEventHandler,
    ) -> EventSubscription;
}
