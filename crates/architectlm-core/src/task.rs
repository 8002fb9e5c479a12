//! Task definitions: named async units of work with a timeout and a retry policy.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;

use crate::context::TaskContext;
use crate::retry::RetryPolicy;
use crate::{Error, Result};

/// Why a task failed. Cloneable and serialisable so it can be journaled and sent in events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct TaskError {
    /// What went wrong.
    pub message: String,
    /// What kind of failure it was.
    pub kind: TaskErrorKind,
}

/// The kind of a [`TaskError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum TaskErrorKind {
    /// The task returned an error; its retry policy applies.
    Failed,
    /// The task returned an error that must not be retried.
    Permanent,
    /// The task panicked. Retried like `Failed`.
    Panicked,
    /// The task ran past its timeout. Retried like `Failed`.
    TimedOut,
    /// The task was cancelled (shutdown, a saga unwinding). Not retried.
    Cancelled,
}

impl TaskError {
    /// A retryable failure.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            kind: TaskErrorKind::Failed,
        }
    }

    /// A failure that retrying cannot fix (bad input, a business rule).
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            kind: TaskErrorKind::Permanent,
        }
    }

    /// A failure of the given kind.
    pub fn with_kind(kind: TaskErrorKind, message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            kind,
        }
    }

    /// Whether a retry policy may try again.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            TaskErrorKind::Failed | TaskErrorKind::Panicked | TaskErrorKind::TimedOut
        )
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for TaskError {}

impl From<String> for TaskError {
    fn from(s: String) -> Self {
        Self::new(s)
    }
}

impl From<&str> for TaskError {
    fn from(s: &str) -> Self {
        Self::new(s)
    }
}

impl From<serde_json::Error> for TaskError {
    fn from(e: serde_json::Error) -> Self {
        Self::permanent(format!("invalid task data: {e}"))
    }
}

impl From<Error> for TaskError {
    fn from(e: Error) -> Self {
        match e {
            Error::TaskFailed { error, .. } => error,
            other => Self::new(other.to_string()),
        }
    }
}

/// What a task returns.
pub type TaskResult = std::result::Result<Value, TaskError>;

/// The implementation of a task: `(input, context) -> output`.
///
/// Implemented for every `Fn(Value, TaskContext) -> impl Future<Output = TaskResult>`; implement
/// it by hand for a struct that carries its own state. A handler may be called concurrently
/// (several executions, retries of one) and must be `Send + Sync`.
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use architectlm_core::{TaskContext, TaskDefinition, TaskHandler, TaskResult};
/// use futures::future::BoxFuture;
/// use serde_json::{Value, json};
///
/// /// Hands out invoice numbers.
/// struct NextInvoice(Arc<AtomicU64>);
///
/// impl TaskHandler for NextInvoice {
///     fn call(&self, _input: Value, _ctx: TaskContext) -> BoxFuture<'static, TaskResult> {
///         let n = self.0.fetch_add(1, Ordering::SeqCst);
///         Box::pin(async move { Ok(json!({"invoice": n})) })
///     }
/// }
///
/// let task = TaskDefinition::builder("next-invoice")
///     .handler_impl(NextInvoice(Arc::new(AtomicU64::new(1000))))
///     .build()
///     .unwrap();
/// # let _ = task;
/// ```
pub trait TaskHandler: Send + Sync + 'static {
    /// Runs the task once. The runtime applies timeout, retries and panic isolation around it.
    fn call(&self, input: Value, ctx: TaskContext) -> BoxFuture<'static, TaskResult>;
}

impl<F, Fut> TaskHandler for F
where
    F: Fn(Value, TaskContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = TaskResult> + Send + 'static,
{
    fn call(&self, input: Value, ctx: TaskContext) -> BoxFuture<'static, TaskResult> {
        Box::pin(self(input, ctx))
    }
}

/// A task: id, name, description, implementation, timeout, retry policy and metadata.
#[derive(Clone)]
#[non_exhaustive]
pub struct TaskDefinition {
    /// Unique id within the system.
    pub id: String,
    /// Human name (defaults to the id).
    pub name: String,
    /// What it does.
    pub description: Option<String>,
    /// The implementation.
    pub handler: Arc<dyn TaskHandler>,
    /// Limit for one attempt.
    pub timeout: Option<Duration>,
    /// Retries for failed attempts; `None` means one attempt.
    pub retry: Option<RetryPolicy>,
    /// Free-form metadata.
    pub metadata: serde_json::Map<String, Value>,
}

impl fmt::Debug for TaskDefinition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskDefinition")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("timeout", &self.timeout)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl TaskDefinition {
    /// Starts a builder for a task with this id.
    ///
    /// ```
    /// use architectlm_core::{TaskDefinition, RetryPolicy};
    /// use std::time::Duration;
    ///
    /// let task = TaskDefinition::builder("charge-card")
    ///     .name("Charge the card")
    ///     .timeout(Duration::from_secs(5))
    ///     .retry(RetryPolicy::attempts(3))
    ///     .handler(|input, _ctx| async move { Ok(input) })
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(task.id, "charge-card");
    /// ```
    pub fn builder(id: impl Into<String>) -> TaskBuilder {
        TaskBuilder {
            id: id.into(),
            name: None,
            description: None,
            handler: None,
            timeout: None,
            retry: None,
            metadata: serde_json::Map::new(),
        }
    }

    /// Shorthand: a task with an id and an untyped implementation.
    pub fn new<F, Fut>(id: impl Into<String>, f: F) -> Result<Self>
    where
        F: Fn(Value, TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = TaskResult> + Send + 'static,
    {
        Self::builder(id).handler(f).build()
    }

    /// Shorthand: a task whose input and output are serde types.
    ///
    /// ```
    /// use architectlm_core::{TaskDefinition, TaskError};
    /// #[derive(serde::Deserialize)] struct Order { amount: u64 }
    /// #[derive(serde::Serialize)] struct Receipt { charged: u64 }
    ///
    /// let task = TaskDefinition::typed("charge", |order: Order, _ctx| async move {
    ///     Ok::<_, TaskError>(Receipt { charged: order.amount })
    /// }).unwrap();
    /// # let _ = task;
    /// ```
    pub fn typed<I, O, F, Fut>(id: impl Into<String>, f: F) -> Result<Self>
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(I, TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<O, TaskError>> + Send + 'static,
    {
        Self::builder(id).typed_handler(f).build()
    }
}

/// Builder of [`TaskDefinition`]; `build()` validates.
#[must_use]
pub struct TaskBuilder {
    id: String,
    name: Option<String>,
    description: Option<String>,
    handler: Option<Arc<dyn TaskHandler>>,
    timeout: Option<Duration>,
    retry: Option<RetryPolicy>,
    metadata: serde_json::Map<String, Value>,
}

impl fmt::Debug for TaskBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskBuilder")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl TaskBuilder {
    /// Sets the human name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Sets the description.
    pub fn description(mut self, d: impl Into<String>) -> Self {
        self.description = Some(d.into());
        self
    }

    /// Sets the implementation: an async closure `(input, context) -> TaskResult`.
    pub fn handler<F, Fut>(self, f: F) -> Self
    where
        F: Fn(Value, TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = TaskResult> + Send + 'static,
    {
        self.handler_impl(f)
    }

    /// Sets the implementation from any [`TaskHandler`] (a struct carrying its own state).
    pub fn handler_impl(mut self, handler: impl TaskHandler) -> Self {
        self.handler = Some(Arc::new(handler));
        self
    }

    /// Sets an implementation over serde types: the input is deserialised (a mismatch is a
    /// permanent failure naming the task) and the output serialised.
    pub fn typed_handler<I, O, F, Fut>(self, f: F) -> Self
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(I, TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<O, TaskError>> + Send + 'static,
    {
        let id = self.id.clone();
        let f = Arc::new(f);
        self.handler(move |input: Value, ctx: TaskContext| {
            let f = f.clone();
            let id = id.clone();
            async move {
                let typed: I = serde_json::from_value(input).map_err(|e| {
                    TaskError::permanent(format!("invalid input for task \"{id}\": {e}"))
                })?;
                let out = f(typed, ctx).await?;
                serde_json::to_value(out).map_err(|e| {
                    TaskError::permanent(format!(
                        "task \"{id}\" returned unserialisable output: {e}"
                    ))
                })
            }
        })
    }

    /// Limits each attempt to `timeout`.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Retries failed attempts.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    /// Adds a metadata entry.
    pub fn metadata(mut self, key: impl Into<String>, value: Value) -> Self {
        self.metadata.insert(key.into(), value);
        self
    }

    /// Validates and builds: the id must be non-empty, an implementation must be set, the
    /// timeout must be positive and the retry policy valid.
    pub fn build(self) -> Result<TaskDefinition> {
        if self.id.trim().is_empty() {
            return Err(Error::definition(format!(
                "task id {:?} is missing (empty or only whitespace)",
                self.id
            )));
        }
        let Some(handler) = self.handler else {
            return Err(Error::definition(format!(
                "task \"{}\" has no implementation",
                self.id
            )));
        };
        if self.timeout == Some(Duration::ZERO) {
            return Err(Error::definition(format!(
                "task \"{}\" has a zero timeout",
                self.id
            )));
        }
        if let Some(r) = &self.retry {
            r.validate().map_err(|e| {
                Error::definition(format!(
                    "task \"{}\" has an invalid retry policy: {e}",
                    self.id
                ))
            })?;
        }
        Ok(TaskDefinition {
            name: self.name.unwrap_or_else(|| self.id.clone()),
            id: self.id,
            description: self.description,
            handler,
            timeout: self.timeout,
            retry: self.retry,
            metadata: self.metadata,
        })
    }
}
