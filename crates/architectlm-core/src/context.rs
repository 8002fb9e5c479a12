//! The context a task runs with: services, the runtime, the process instance it acts for, and a
//! cancellation signal.

use std::fmt;
use std::sync::Arc;

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::runtime::Runtime;
use crate::services::Services;
use crate::{Result, extensions};

/// The process instance a task runs for, when it runs as a transition's action.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ProcessRef {
    /// The instance.
    pub instance_id: Uuid,
    /// The process id.
    pub process_id: Arc<str>,
    /// The instance's context after the transition.
    pub context: Value,
}

/// Who started an execution, when an extension did: typed, so that a task never has to parse
/// its idempotency key to learn its saga, step or schedule entry.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TaskOrigin {
    /// A saga step, or the compensation of one.
    SagaStep {
        /// The saga definition's id.
        saga_id: Arc<str>,
        /// The saga instance.
        instance_id: Uuid,
        /// The step's id.
        step_id: Arc<str>,
        /// Whether this runs the step's compensation.
        compensation: bool,
    },
    /// A run of a scheduled entry.
    ScheduledRun {
        /// The schedule entry.
        entry_id: Uuid,
        /// The occurrence this run is for (its due time, before jitter).
        due_at: chrono::DateTime<chrono::Utc>,
    },
}

/// What a running task can reach. Cheap to clone.
#[derive(Clone)]
pub struct TaskContext {
    pub(crate) runtime: Runtime,
    pub(crate) task_id: Arc<str>,
    pub(crate) execution_id: Uuid,
    pub(crate) attempt: u32,
    pub(crate) process: Option<Arc<ProcessRef>>,
    pub(crate) idempotency_key: Option<Arc<str>>,
    pub(crate) origin: Option<Arc<TaskOrigin>>,
    /// The attempt's own token (with a timeout or a caller's token); `None` for the
    /// runtime's, reached through `runtime` so that most executions touch no shared count.
    pub(crate) cancel: Option<Arc<CancellationToken>>,
}

impl fmt::Debug for TaskContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskContext")
            .field("task_id", &self.task_id)
            .field("execution_id", &self.execution_id)
            .field("attempt", &self.attempt)
            .field("process", &self.process)
            .field("idempotency_key", &self.idempotency_key)
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl TaskContext {
    /// The runtime's services.
    pub fn services(&self) -> &Services {
        self.runtime.services()
    }

    /// The saga coordinator, or an error naming it when it is not configured.
    pub fn saga_coordinator(&self) -> Result<Arc<dyn extensions::SagaCoordinator>> {
        self.services().saga_coordinator()
    }

    /// The scheduler, or an error naming it.
    pub fn scheduler(&self) -> Result<Arc<dyn extensions::Scheduler>> {
        self.services().scheduler()
    }

    /// The supervisor, or an error naming it.
    pub fn supervisor(&self) -> Result<Arc<dyn extensions::Supervisor>> {
        self.services().supervisor()
    }

    /// The load manager, or an error naming it.
    pub fn load_manager(&self) -> Result<Arc<dyn extensions::LoadManager>> {
        self.services().load_manager()
    }

    /// A user service by type.
    pub fn service<T: Send + Sync + 'static>(&self) -> Result<Arc<T>> {
        self.services().get::<T>()
    }

    /// The runtime itself.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// The id of the running task.
    pub fn task_id(&self) -> &str {
        &self.task_id
    }

    /// The id of this execution (the same across retries of it).
    pub fn execution_id(&self) -> Uuid {
        self.execution_id
    }

    /// The attempt number, starting at 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The idempotency key the caller attached (a saga step's key, a scheduled run's key), to
    /// pass on to external systems.
    pub fn idempotency_key(&self) -> Option<&str> {
        self.idempotency_key.as_deref()
    }

    /// Who started this execution, when an extension did (a saga step, a scheduled run).
    pub fn origin(&self) -> Option<&TaskOrigin> {
        self.origin.as_deref()
    }

    /// The saga instance this task runs a step (or compensation) of.
    pub fn saga_instance_id(&self) -> Option<Uuid> {
        match self.origin()? {
            TaskOrigin::SagaStep { instance_id, .. } => Some(*instance_id),
            _ => None,
        }
    }

    /// The saga definition's id, when this task runs a saga step.
    pub fn saga_id(&self) -> Option<&str> {
        match self.origin()? {
            TaskOrigin::SagaStep { saga_id, .. } => Some(saga_id),
            _ => None,
        }
    }

    /// The saga step's id, when this task runs one (or its compensation).
    pub fn saga_step_id(&self) -> Option<&str> {
        match self.origin()? {
            TaskOrigin::SagaStep { step_id, .. } => Some(step_id),
            _ => None,
        }
    }

    /// The schedule entry this task runs for, when the scheduler started it.
    pub fn schedule_entry_id(&self) -> Option<Uuid> {
        match self.origin()? {
            TaskOrigin::ScheduledRun { entry_id, .. } => Some(*entry_id),
            _ => None,
        }
    }

    /// The occurrence a scheduled run is for (its due time, before jitter).
    pub fn scheduled_for(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        match self.origin()? {
            TaskOrigin::ScheduledRun { due_at, .. } => Some(*due_at),
            _ => None,
        }
    }

    /// The process instance this task acts for, when it runs as a transition's action.
    pub fn process(&self) -> Option<&ProcessRef> {
        self.process.as_deref()
    }

    /// The id of that instance.
    pub fn instance_id(&self) -> Option<Uuid> {
        self.process.as_ref().map(|p| p.instance_id)
    }

    /// Cancelled when the runtime shuts down, the attempt times out, or the caller cancels.
    /// Long tasks should watch it.
    pub fn cancellation(&self) -> &CancellationToken {
        self.cancel
            .as_deref()
            .unwrap_or_else(|| self.runtime.cancellation())
    }

    /// Whether cancellation was requested.
    pub fn is_cancelled(&self) -> bool {
        self.cancellation().is_cancelled()
    }

    /// Emits an event on the runtime's bus, with this task as its source.
    pub fn emit_event(&self, event_type: impl Into<String>, payload: Value) {
        let source = format!("task:{}", self.task_id);
        self.runtime.emit(event_type.into(), source, payload);
    }

    /// Runs another task through the runtime.
    pub async fn execute_task(&self, task_id: &str, input: Value) -> Result<Value> {
        self.runtime.execute_task(task_id, input).await
    }
}
