//! The runtime: runs tasks, moves process instances through their states, and carries events.
//!
//! # Rules
//! - [`Runtime`] is a cheap handle (`Clone`, `Send`, `Sync`); every method may be called from any
//!   task concurrently.
//! - Transitions of one instance are serialised on this node; two nodes sharing a durable store
//!   are kept apart by the store's version check ([`crate::Error::Conflict`]).
//! - A task's panic, timeout or error fails that execution only.
//! - [`Runtime::shutdown`] stops accepting work, waits (up to a limit) for running tasks, then
//!   cancels the runtime's token and shuts the extensions down.

use std::collections::HashMap;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use futures::FutureExt;
use futures::future::Either;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::context::{ProcessRef, TaskContext, TaskOrigin};
use crate::event::{Event, EventFilter, EventHub, EventSubscription, Subscription, types};
use crate::extensions::{LoadManager, SagaCoordinator, Scheduler, Supervisor};
use crate::process::{
    ActionRecord, ActionStatus, GuardInput, ProcessDefinition, ProcessInstance, merge_context,
};
use crate::retry::RetryPolicy;
use crate::services::{ServiceRegistry, Services};
use crate::store::{InMemoryProcessStore, ProcessQuery, ProcessStore};
use crate::system::System;
use crate::task::{TaskDefinition, TaskError, TaskErrorKind, TaskHandler, TaskResult};
use crate::{Error, Result};

/// An extension's life cycle, driven by the runtime.
///
/// An extension implementation (a saga coordinator, a scheduler, ...) registers itself as a
/// service, is started once the runtime exists (to bind to it, recover durable work and start its
/// loops), and is shut down with the runtime.
///
/// # Rules
/// - `register` is called once, before any `start`.
/// - `start` is called once, in registration order; an error aborts start-up.
/// - `shutdown` is called once, in reverse order, after running tasks finished or the shutdown
///   deadline passed; it must stop the extension's background tasks.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicBool, Ordering};
/// use architectlm_core::{Extension, Runtime, ServiceRegistry, System};
///
/// /// An extension that is also a user service, found with `ctx.service::<Audit>()`.
/// #[derive(Default)]
/// struct Audit {
///     started: AtomicBool,
/// }
///
/// #[async_trait::async_trait]
/// impl Extension for Audit {
///     fn name(&self) -> &'static str {
///         "audit"
///     }
///     fn register(self: Arc<Self>, registry: &mut ServiceRegistry) {
///         registry.insert(self);
///     }
///     async fn start(&self, _runtime: Runtime) -> architectlm_core::Result<()> {
///         self.started.store(true, Ordering::SeqCst);
///         Ok(())
///     }
/// }
///
/// let audit = Arc::new(Audit::default());
/// let system = System::builder("shop").build()?;
/// let runtime = Runtime::builder(system).extension(audit.clone()).start().await?;
/// assert!(audit.started.load(Ordering::SeqCst));
/// assert!(runtime.services().get::<Audit>().is_ok());
/// # Ok::<_, architectlm_core::Error>(())
/// # }).unwrap();
/// ```
#[async_trait]
pub trait Extension: Send + Sync + 'static {
    /// A short name for logs, such as `saga-coordinator`.
    fn name(&self) -> &'static str;
    /// Puts the extension into the service registry (for example with
    /// [`ServiceRegistry::set_saga_coordinator`]).
    fn register(self: Arc<Self>, registry: &mut ServiceRegistry);
    /// Binds to the started runtime.
    async fn start(&self, runtime: Runtime) -> Result<()>;
    /// Stops background work.
    async fn shutdown(&self) {}
}

/// What a [`TaskMiddleware`] sees of an execution.
#[derive(Debug)]
#[non_exhaustive]
pub struct TaskCall<'a> {
    /// The task id.
    pub task_id: &'a str,
    /// The execution id.
    pub execution_id: Uuid,
    /// The input.
    pub input: &'a Value,
    /// The process instance, when the task runs as an action.
    pub instance_id: Option<Uuid>,
    /// Attempts made so far (in `after`: all of them).
    pub attempts: u32,
}

/// Hooks around every task execution.
///
/// Hooks are synchronous and run on the executing task: they must not block. A hook that needs
/// to do async work should hand it to a task of its own. `before` may refuse the execution.
/// Middleware sees every execution, actions and nested executions included, and may be called
/// concurrently from many tasks.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use architectlm_core::{Runtime, System, TaskCall, TaskDefinition, TaskError, TaskMiddleware, TaskResult};
///
/// /// Counts failures and refuses a task that is switched off.
/// #[derive(Default)]
/// struct Guardrail {
///     failures: AtomicU64,
/// }
///
/// impl TaskMiddleware for Guardrail {
///     fn before(&self, call: &TaskCall<'_>) -> Result<(), TaskError> {
///         if call.task_id == "legacy-export" {
///             return Err(TaskError::permanent("legacy-export is switched off"));
///         }
///         Ok(())
///     }
///     fn after(&self, _call: &TaskCall<'_>, outcome: &TaskResult) {
///         if outcome.is_err() {
///             self.failures.fetch_add(1, Ordering::Relaxed);
///         }
///     }
/// }
///
/// let guardrail = Arc::new(Guardrail::default());
/// let system = System::builder("shop")
///     .task(TaskDefinition::new("legacy-export", |i, _ctx| async move { Ok(i) })?)
///     .build()?;
/// let runtime = Runtime::builder(system).middleware(guardrail.clone()).start().await?;
/// assert!(runtime.execute_task("legacy-export", serde_json::json!({})).await.is_err());
/// assert_eq!(guardrail.failures.load(Ordering::Relaxed), 1);
/// # Ok::<_, architectlm_core::Error>(())
/// # }).unwrap();
/// ```
pub trait TaskMiddleware: Send + Sync + 'static {
    /// Before the first attempt; an error fails the execution without running it.
    fn before(&self, call: &TaskCall<'_>) -> std::result::Result<(), TaskError> {
        let _ = call;
        Ok(())
    }
    /// After the last attempt, with the outcome.
    fn after(&self, call: &TaskCall<'_>, outcome: &TaskResult) {
        let _ = (call, outcome);
    }
}

/// Per-call options of [`Runtime::execute`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct ExecuteOptions {
    /// Replaces the task's own retry policy.
    pub retry: Option<RetryPolicy>,
    /// Replaces the task's own timeout.
    pub timeout: Option<Duration>,
    /// An idempotency key visible to the task as [`TaskContext::idempotency_key`].
    pub idempotency_key: Option<String>,
    /// Cancels the execution when cancelled; the runtime's shutdown still cancels it too.
    pub cancel: Option<CancellationToken>,
    /// Pins the execution id (for example to keep it stable across a recovery).
    pub execution_id: Option<Uuid>,
    /// Who starts the execution, visible to the task as [`TaskContext::origin`].
    pub origin: Option<Arc<TaskOrigin>>,
}

impl ExecuteOptions {
    /// Sets the retry policy.
    pub fn retry(mut self, p: RetryPolicy) -> Self {
        self.retry = Some(p);
        self
    }
    /// Sets the timeout of each attempt.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = Some(t);
        self
    }
    /// Sets the idempotency key.
    pub fn idempotency_key(mut self, k: impl Into<String>) -> Self {
        self.idempotency_key = Some(k.into());
        self
    }
    /// Sets a cancellation token.
    pub fn cancel(mut self, c: CancellationToken) -> Self {
        self.cancel = Some(c);
        self
    }
    /// Pins the execution id.
    pub fn execution_id(mut self, id: Uuid) -> Self {
        self.execution_id = Some(id);
        self
    }
    /// Says who starts the execution.
    pub fn origin(mut self, origin: TaskOrigin) -> Self {
        self.origin = Some(Arc::new(origin));
        self
    }
}

/// What to run: a task of the system or an ad-hoc handler (a saga step given as a closure).
#[derive(Clone)]
pub enum TaskRef {
    /// A task of the system, by id.
    Id(String),
    /// An ad-hoc handler with a name for events and logs.
    Handler {
        /// The name used in events and logs.
        name: Arc<str>,
        /// The implementation.
        handler: Arc<dyn TaskHandler>,
    },
}

impl fmt::Debug for TaskRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Id(id) => f.debug_tuple("Id").field(id).finish(),
            Self::Handler { name, .. } => f.debug_struct("Handler").field("name", name).finish(),
        }
    }
}

/// The result of [`Runtime::transition_process`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TransitionOutcome {
    /// The instance after the transition (and after its action's outcome was recorded).
    pub instance: ProcessInstance,
    /// The state it left.
    pub from: Arc<str>,
    /// The action's outcome, if the transition had one.
    pub action: Option<ActionOutcome>,
}

impl TransitionOutcome {
    /// Turns a failed action into an error, for callers that treat it as one.
    pub fn into_result(self) -> Result<ProcessInstance> {
        match self.action {
            Some(ActionOutcome {
                task_id,
                result: Err(error),
            }) => Err(Error::TaskFailed { task_id, error }),
            _ => Ok(self.instance),
        }
    }
}

/// The outcome of a transition's action.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ActionOutcome {
    /// The task that ran.
    pub task_id: String,
    /// Its output or error.
    pub result: TaskResult,
}

/// Builds a [`Runtime`].
#[must_use]
pub struct RuntimeBuilder {
    system: System,
    registry: ServiceRegistry,
    extensions: Vec<Arc<dyn Extension>>,
    store: Option<Arc<dyn ProcessStore>>,
    middleware: Vec<Arc<dyn TaskMiddleware>>,
    event_capacity: usize,
}

impl fmt::Debug for RuntimeBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuntimeBuilder")
            .field("system", &self.system.id)
            .field("services", &self.registry)
            .field("extensions", &self.extensions.len())
            .finish_non_exhaustive()
    }
}

impl RuntimeBuilder {
    /// Uses an extension implementation: it registers its service and follows the runtime's
    /// life cycle.
    pub fn extension<E: Extension>(mut self, extension: Arc<E>) -> Self {
        extension.clone().register(&mut self.registry);
        self.extensions.push(extension);
        self
    }

    /// Sets the saga coordinator service directly (a mock, or an implementation with no life
    /// cycle).
    pub fn saga_coordinator(mut self, s: Arc<dyn SagaCoordinator>) -> Self {
        self.registry.set_saga_coordinator(s);
        self
    }

    /// Sets the scheduler service directly.
    pub fn scheduler(mut self, s: Arc<dyn Scheduler>) -> Self {
        self.registry.set_scheduler(s);
        self
    }

    /// Sets the supervisor service directly.
    pub fn supervisor(mut self, s: Arc<dyn Supervisor>) -> Self {
        self.registry.set_supervisor(s);
        self
    }

    /// Sets the load manager service directly.
    pub fn load_manager(mut self, s: Arc<dyn LoadManager>) -> Self {
        self.registry.set_load_manager(s);
        self
    }

    /// Adds a user service, found by type with [`TaskContext::service`].
    pub fn service<T: Send + Sync + 'static>(mut self, s: Arc<T>) -> Self {
        self.registry.insert(s);
        self
    }

    /// Adds a user service under a name.
    pub fn named_service<T: Send + Sync + 'static>(
        mut self,
        name: impl Into<String>,
        s: Arc<T>,
    ) -> Self {
        self.registry.insert_named(name, s);
        self
    }

    /// Keeps process instances in `store` (default: in memory).
    pub fn process_store(mut self, store: Arc<dyn ProcessStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// Adds task middleware.
    pub fn middleware(mut self, m: Arc<dyn TaskMiddleware>) -> Self {
        self.middleware.push(m);
        self
    }

    /// How far an event subscriber may fall behind before it skips events (default 1024).
    pub fn event_capacity(mut self, n: usize) -> Self {
        self.event_capacity = n;
        self
    }

    /// Checks that every enabled extension has a service, builds the runtime and starts the
    /// extensions.
    pub async fn start(self) -> Result<Runtime> {
        let ext = self.system.extensions;
        let r = &self.registry;
        for (enabled, present, name) in [
            (
                ext.saga_coordinator,
                r.saga_coordinator.is_some(),
                "saga-coordinator",
            ),
            (ext.scheduler, r.scheduler.is_some(), "scheduler"),
            (ext.supervisor, r.supervisor.is_some(), "supervisor"),
            (ext.load_manager, r.load_manager.is_some(), "load-manager"),
        ] {
            if enabled && !present {
                return Err(Error::ExtensionNotConfigured(name));
            }
        }
        let runtime = Runtime {
            inner: Arc::new(Inner {
                system: self.system,
                services: Services::freeze(self.registry),
                store: self
                    .store
                    .unwrap_or_else(|| Arc::new(InMemoryProcessStore::new())),
                events: EventHub::with_capacity("runtime", self.event_capacity),
                locks: (0..LOCK_SHARDS)
                    .map(|_| Mutex::new(HashMap::new()))
                    .collect(),
                has_middleware: AtomicBool::new(!self.middleware.is_empty()),
                middleware: parking_lot::RwLock::new(self.middleware.into()),
                inflight: Inflight::default(),
                idle: Notify::new(),
                shutting_down: AtomicBool::new(false),
                cancel: CancellationToken::new(),
                extensions: self.extensions,
            }),
        };
        let events = runtime.inner.events.clone();
        runtime.inner.store.on_unreadable(Arc::new(move |r| {
            events.publish_with(|| Event::new(types::RECORD_UNREADABLE, "runtime", r.to_payload()));
        }));
        for e in &runtime.inner.extensions {
            e.start(runtime.clone()).await?;
            tracing::debug!(extension = e.name(), "extension started");
        }
        Ok(runtime)
    }
}

type InstanceMutex = Arc<tokio::sync::Mutex<()>>;

const LOCK_SHARDS: usize = 32;

struct Inner {
    system: System,
    services: Services,
    store: Arc<dyn ProcessStore>,
    events: EventHub<Event>,
    /// Per-instance transition locks, sharded so that transitions of different instances on
    /// different threads rarely meet on one mutex.
    locks: Box<[Mutex<HashMap<Uuid, InstanceMutex>>]>,
    middleware: parking_lot::RwLock<Arc<[Arc<dyn TaskMiddleware>]>>,
    /// Whether `middleware` has any: executions without skip its lock.
    has_middleware: AtomicBool,
    inflight: Inflight,
    idle: Notify,
    shutting_down: AtomicBool,
    /// The token of the executions that have no token of their own (their contexts reach it
    /// through the runtime: cloning the token itself takes a lock every execution would
    /// contend for).
    cancel: CancellationToken,
    extensions: Vec<Arc<dyn Extension>>,
}

impl Inner {
    fn lock_shard(&self, id: Uuid) -> &Mutex<HashMap<Uuid, InstanceMutex>> {
        // v7 and v4 ids both end in random bits.
        let b = id.as_bytes();
        &self.locks[(b[15] as usize ^ b[14] as usize) % LOCK_SHARDS]
    }
}

/// The ArchitectLM runtime: runs tasks, moves process instances through their states, and
/// carries events.
///
/// # Rules
/// - A cheap handle (`Clone`, `Send`, `Sync`); every method may be called from any task
///   concurrently.
/// - Transitions of one instance are serialised on this node (in arrival order); two nodes
///   sharing a durable store are kept apart by the store's version check
///   ([`Error::Conflict`]). A transition's action runs while its instance is held, so the action
///   cannot transition its own instance (it gets an error instead of a deadlock).
/// - A task's panic, timeout or error fails that execution only.
/// - [`Runtime::shutdown`] stops accepting tasks, waits (up to a limit) for running ones, then
///   cancels the runtime's token and shuts the extensions down in reverse order.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

impl fmt::Debug for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runtime")
            .field("system", &self.inner.system.id)
            .field("inflight", &self.inner.inflight.load())
            .finish_non_exhaustive()
    }
}

/// Executions running, counted per shard: each thread counts on a shard of its own, so that
/// executions starting and ending at once on several threads do not contend for one counter.
/// An execution may end on another thread than it started on, so a shard may go negative;
/// only the sum means anything.
struct Inflight {
    shards: Box<[PaddedCount]>,
}

/// A counter alone on its cache lines.
#[repr(align(128))]
#[derive(Default)]
struct PaddedCount(AtomicIsize);

const INFLIGHT_SHARDS: usize = 16;

impl Default for Inflight {
    fn default() -> Self {
        Self {
            shards: (0..INFLIGHT_SHARDS)
                .map(|_| PaddedCount::default())
                .collect(),
        }
    }
}

impl Inflight {
    /// This thread's shard.
    fn shard(&self) -> &AtomicIsize {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed);
        }
        let i = SHARD.try_with(|s| *s).unwrap_or(0) % self.shards.len();
        &self.shards[i].0
    }

    fn enter(&self) {
        self.shard().fetch_add(1, Ordering::SeqCst);
    }

    fn exit(&self) {
        self.shard().fetch_sub(1, Ordering::SeqCst);
    }

    /// Executions running now.
    fn load(&self) -> usize {
        let n: isize = self.shards.iter().map(|s| s.0.load(Ordering::SeqCst)).sum();
        usize::try_from(n).unwrap_or(0)
    }
}

/// Counts a running execution; wakes a waiting shutdown when the last one ends.
///
/// Every step is `SeqCst`: an execution that enters either sees `shutting_down` or is seen by
/// the shutdown's count, and of executions ending at once the last to count sees zero.
struct InflightGuard<'a>(&'a Inner);

impl<'a> InflightGuard<'a> {
    fn enter(inner: &'a Inner) -> Result<Self> {
        inner.inflight.enter();
        let guard = Self(inner);
        if inner.shutting_down.load(Ordering::SeqCst) {
            return Err(Error::ShuttingDown);
        }
        Ok(guard)
    }
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.0.inflight.exit();
        if self.0.shutting_down.load(Ordering::SeqCst) && self.0.inflight.load() == 0 {
            self.0.idle.notify_waiters();
        }
    }
}

/// One execution, resolved before it starts: what runs and with which settings.
struct Job {
    task_id: Arc<str>,
    handler: Arc<dyn TaskHandler>,
    /// Boxed: most executions have none, and a waiting execution holds its job.
    retry: Option<Box<RetryPolicy>>,
    timeout: Option<Duration>,
    process: Option<Arc<ProcessRef>>,
    key: Option<Arc<str>>,
    origin: Option<Arc<TaskOrigin>>,
    caller: Option<CancellationToken>,
    execution_id: Uuid,
    /// The runtime for the first attempt's context, cloned when the job is resolved.
    ctx_runtime: Option<Runtime>,
}

impl Job {
    /// The runtime's error for a failed execution.
    fn failed(&self, error: TaskError) -> Error {
        Error::TaskFailed {
            task_id: self.task_id.to_string(),
            error,
        }
    }

    fn instance_id(&self) -> Option<Uuid> {
        self.process.as_ref().map(|p| p.instance_id)
    }

    /// What middleware sees of this execution.
    fn call<'a>(&'a self, input: &'a Value, attempts: u32) -> TaskCall<'a> {
        TaskCall {
            task_id: &self.task_id,
            execution_id: self.execution_id,
            input,
            instance_id: self.instance_id(),
            attempts,
        }
    }

    /// The error of an attempt that panicked.
    fn panicked(&self, panic: &(dyn std::any::Any + Send)) -> TaskResult {
        let msg = panic_message(panic);
        let task_id = &*self.task_id;
        tracing::error!(task_id, execution_id = %self.execution_id, panic = %msg, "task panicked");
        Err(TaskError::with_kind(
            TaskErrorKind::Panicked,
            format!("task \"{task_id}\" panicked: {msg}"),
        ))
    }
}

/// The outcome of one attempt: the task's result, or the panic it raised.
type AttemptResult = std::result::Result<TaskResult, Box<dyn std::any::Any + Send>>;

/// One attempt in progress: the task's own future behind a panic guard, or (with a timeout or
/// a caller's token) a boxed future that adds them.
type Attempt = Either<
    futures::future::CatchUnwind<AssertUnwindSafe<futures::future::BoxFuture<'static, TaskResult>>>,
    futures::future::BoxFuture<'static, AttemptResult>,
>;

/// Runs `fut`; if the caller's token is cancelled first, cancels `token` (the task's own) and
/// lets the task finish in response.
async fn forward_cancel<F: Future>(
    fut: F,
    caller: Option<&CancellationToken>,
    token: &CancellationToken,
) -> F::Output {
    let Some(caller) = caller else {
        return fut.await;
    };
    tokio::pin!(fut);
    tokio::select! {
        biased;
        out = &mut fut => return out,
        () = caller.cancelled() => token.cancel(),
    }
    fut.await
}

/// Completes when the runtime's token or the caller's is cancelled.
async fn either_cancelled(runtime: &CancellationToken, caller: Option<&CancellationToken>) {
    match caller {
        None => runtime.cancelled().await,
        Some(c) => {
            tokio::select! {
                () = runtime.cancelled() => {}
                () = c.cancelled() => {}
            }
        }
    }
}

tokio::task_local! {
    /// The instance whose transition's action the current task is running, if any.
    static ACTION_OF: Uuid;
}

/// The per-instance lock held by a transition (see `Runtime::lock_instance`).
struct InstanceLock<'a> {
    inner: &'a Inner,
    id: Uuid,
    lock: Option<Arc<tokio::sync::Mutex<()>>>,
    held: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl InstanceLock<'_> {
    async fn acquire(mut self) -> Self {
        if let Some(lock) = self.lock.clone() {
            self.held = Some(lock.lock_owned().await);
        }
        self
    }
}

impl Drop for InstanceLock<'_> {
    fn drop(&mut self) {
        // Unlock first, then drop our reference: the entry goes when the map's is the last one.
        self.held = None;
        if let Some(lock) = self.lock.take() {
            let mut locks = self.inner.lock_shard(self.id).lock();
            if Arc::strong_count(&lock) == 2 {
                locks.remove(&self.id);
            }
        }
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

impl Runtime {
    /// Starts building a runtime for `system`.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use architectlm_core::{Runtime, System, TaskDefinition};
    /// use serde_json::json;
    ///
    /// let system = System::builder("demo")
    ///     .task(TaskDefinition::new("double", |v: serde_json::Value, _ctx| async move {
    ///         Ok(json!(v.as_i64().unwrap_or(0) * 2))
    ///     }).unwrap())
    ///     .build()
    ///     .unwrap();
    /// let runtime = Runtime::builder(system).start().await.unwrap();
    /// assert_eq!(runtime.execute_task("double", json!(21)).await.unwrap(), json!(42));
    /// # });
    /// ```
    pub fn builder(system: System) -> RuntimeBuilder {
        RuntimeBuilder {
            system,
            registry: ServiceRegistry::default(),
            extensions: Vec::new(),
            store: None,
            middleware: Vec::new(),
            event_capacity: crate::event::DEFAULT_EVENT_CAPACITY,
        }
    }

    /// The system it runs.
    pub fn system(&self) -> &System {
        &self.inner.system
    }

    /// Its services.
    pub fn services(&self) -> &Services {
        &self.inner.services
    }

    /// The process store.
    pub fn process_store(&self) -> &Arc<dyn ProcessStore> {
        &self.inner.store
    }

    /// The event hub (for `dropped()` and direct subscriptions).
    pub fn events(&self) -> &EventHub<Event> {
        &self.inner.events
    }

    /// The token cancelled at shutdown.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.inner.cancel
    }

    /// How many task executions are running now (actions included).
    pub fn running_tasks(&self) -> usize {
        self.inner.inflight.load()
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::Acquire)
    }

    /// Adds task middleware to a running runtime (extensions use this in `start`).
    pub fn add_middleware(&self, m: Arc<dyn TaskMiddleware>) {
        let mut slot = self.inner.middleware.write();
        let mut v: Vec<_> = slot.iter().cloned().collect();
        v.push(m);
        *slot = v.into();
        self.inner.has_middleware.store(true, Ordering::Release);
    }

    // ----- events -------------------------------------------------------------------------

    /// Emits an event with the given source. Costs one atomic load when nobody listens.
    pub fn emit(&self, event_type: impl Into<String>, source: impl Into<String>, payload: Value) {
        self.inner.events.publish_with(|| {
            Event::new(
                event_type.into(),
                std::borrow::Cow::Owned(source.into()),
                payload,
            )
        });
    }

    /// Emits an event from user code (source `user`).
    pub fn emit_event(&self, event_type: impl Into<String>, payload: Value) {
        self.emit(event_type, "user", payload);
    }

    /// Publishes a ready-made event (extensions forward theirs this way).
    pub fn publish(&self, event: Event) {
        self.inner.events.publish(event);
    }

    /// Subscribes to one event type, a list, or all (`"*"`). Dropping the subscription
    /// unsubscribes; [`Subscription::missed`] tells how many events it skipped.
    pub fn subscribe(&self, filter: impl Into<EventFilter>) -> Subscription<Event> {
        self.inner.events.subscribe(filter)
    }

    /// Calls `handler` for each matching event, on a task of its own. Dropping the handle
    /// unsubscribes.
    pub fn subscribe_to_event(
        &self,
        filter: impl Into<EventFilter>,
        handler: impl Fn(&Event) + Send + Sync + 'static,
    ) -> EventSubscription {
        self.inner.events.on(filter, handler)
    }

    // ----- tasks --------------------------------------------------------------------------

    /// Runs a task of the system with its timeout and retry policy and returns its output.
    /// Emits `TASK_STARTED`, then `TASK_COMPLETED` or `TASK_FAILED`.
    pub async fn execute_task(&self, task_id: &str, input: Value) -> Result<Value> {
        self.execute(
            TaskRef::Id(task_id.to_owned()),
            input,
            ExecuteOptions::default(),
        )
        .await
    }

    /// Runs a task with serde types in and out.
    pub async fn execute_typed<I, O>(&self, task_id: &str, input: &I) -> Result<O>
    where
        I: serde::Serialize + ?Sized,
        O: serde::de::DeserializeOwned,
    {
        let input = serde_json::to_value(input).map_err(|e| {
            Error::encode(
                format!(
                    "input of task \"{task_id}\" from {}",
                    std::any::type_name::<I>()
                ),
                e,
            )
        })?;
        let out = self.execute_task(task_id, input).await?;
        serde_json::from_value(out).map_err(|e| {
            Error::decode(
                format!(
                    "output of task \"{task_id}\" as {}",
                    std::any::type_name::<O>()
                ),
                e,
            )
        })
    }

    /// Runs a task or an ad-hoc handler with per-call options.
    ///
    /// The task and options are resolved now; the returned future owns what it needs (it does
    /// not borrow the runtime) and is small, so that many executions can wait at once cheaply.
    /// The input moves into the task when nothing after the call needs it (no retry left, no
    /// middleware, no event subscriber when the last attempt started); otherwise the runtime
    /// keeps it. A `TASK_FAILED` event carries `"input": null` only when its subscriber arrived
    /// while that attempt ran.
    pub fn execute(
        &self,
        task: TaskRef,
        input: Value,
        options: ExecuteOptions,
    ) -> impl Future<Output = Result<Value>> + Send + use<> {
        match self.job(task, options) {
            Ok(job) => Either::Left(self.clone().run_job(job, input)),
            Err(e) => Either::Right(std::future::ready(Err(e))),
        }
    }

    fn task(&self, id: &str) -> Result<&Arc<TaskDefinition>> {
        self.inner
            .system
            .tasks
            .get(id)
            .ok_or_else(|| Error::not_found("task", id))
    }

    /// Resolves what `execute` runs and with which settings.
    fn job(&self, task: TaskRef, options: ExecuteOptions) -> Result<Job> {
        let (task_id, handler, retry, timeout) = match task {
            TaskRef::Id(id) => {
                let def = self.task(&id)?;
                (
                    Arc::<str>::from(def.id.as_str()),
                    def.handler.clone(),
                    options.retry.or_else(|| def.retry.clone()).map(Box::new),
                    options.timeout.or(def.timeout),
                )
            }
            TaskRef::Handler { name, handler } => {
                (name, handler, options.retry.map(Box::new), options.timeout)
            }
        };
        Ok(Job {
            task_id,
            handler,
            retry,
            timeout,
            process: None,
            key: options.idempotency_key.as_deref().map(Arc::from),
            origin: options.origin,
            caller: options.cancel,
            execution_id: options.execution_id.unwrap_or_else(Uuid::new_v4),
            ctx_runtime: Some(self.clone()),
        })
    }

    /// Runs a resolved execution in its tracing span. Without a subscriber for the span the
    /// execution runs as it is; with one it is boxed with its span, so that the span costs
    /// nothing when nobody records it.
    fn run_job(self, job: Job, input: Value) -> impl Future<Output = Result<Value>> + Send + use<> {
        let span =
            tracing::debug_span!("task", task_id = &*job.task_id, execution_id = %job.execution_id);
        let fut = self.run_attempts(job, Some(input));
        if span.is_disabled() {
            Either::Left(fut)
        } else {
            Either::Right(Box::pin(fut.instrument(span)))
        }
    }

    /// Starts one attempt. The common case (no timeout, no caller's token) is the task's own
    /// future behind a panic guard; the others are boxed, so that they cost the common case
    /// nothing while it waits.
    fn attempt(&self, job: &Job, runtime: Runtime, input: Value, attempt: u32) -> Attempt {
        let inner = &*self.inner;
        let own = job.timeout.is_some() || job.caller.is_some();
        let cancel = own.then(|| Arc::new(inner.cancel.child_token()));
        let ctx = TaskContext {
            runtime,
            task_id: job.task_id.clone(),
            execution_id: job.execution_id,
            attempt,
            process: job.process.clone(),
            idempotency_key: job.key.clone(),
            origin: job.origin.clone(),
            cancel: cancel.clone(),
        };
        // A handler may panic before it returns its future: that fails the attempt too.
        let fut = match std::panic::catch_unwind(AssertUnwindSafe(|| job.handler.call(input, ctx)))
        {
            Ok(fut) => fut,
            Err(panic) => Box::pin(async move { std::panic::resume_unwind(panic) }),
        };
        let fut = AssertUnwindSafe(fut).catch_unwind();
        let Some(cancel) = cancel else {
            return Either::Left(fut);
        };
        let (caller, timeout, task_id) = (job.caller.clone(), job.timeout, job.task_id.clone());
        Either::Right(Box::pin(async move {
            let fut = forward_cancel(fut, caller.as_ref(), &cancel);
            match timeout {
                None => fut.await,
                Some(limit) => match tokio::time::timeout(limit, fut).await {
                    Ok(r) => r,
                    Err(_) => {
                        cancel.cancel();
                        Ok(Err(TaskError::with_kind(
                            TaskErrorKind::TimedOut,
                            format!("task \"{task_id}\" timed out after {limit:?}"),
                        )))
                    }
                },
            }
        }))
    }

    /// Counts the execution in flight, runs its attempts and maps the failure.
    ///
    /// An `async` block rather than an `async fn`, which would copy its arguments into locals
    /// and hold both while the task runs; `input` is `None` once it moved into the last attempt.
    #[allow(clippy::manual_async_fn)] // Deliberately not an `async fn` (see above).
    fn run_attempts(
        self,
        job: Job,
        mut input: Option<Value>,
    ) -> impl Future<Output = Result<Value>> + Send + use<> {
        async move {
            let inner = &*self.inner;
            let _guard = InflightGuard::enter(inner)?;
            let mut job = job;
            let mut ctx_runtime = job.ctx_runtime.take();
            let job = &job;
            let middleware = inner
                .has_middleware
                .load(Ordering::Acquire)
                .then(|| inner.middleware.read().clone());
            let middleware: &[Arc<dyn TaskMiddleware>] = middleware.as_deref().unwrap_or(&[]);
            for m in middleware.iter() {
                let input = input.as_ref().unwrap_or(&Value::Null);
                if let Err(e) = m.before(&job.call(input, 0)) {
                    let outcome = Err(e);
                    for m in middleware.iter() {
                        m.after(&job.call(input, 0), &outcome);
                    }
                    return outcome.map_err(|e| job.failed(e));
                }
            }
            inner.events.publish_with(|| {
            Event::new(
                types::TASK_STARTED,
                "runtime",
                json!({"task_id": &*job.task_id, "execution_id": job.execution_id, "instance_id": job.instance_id()}),
            )
        });
            let max_attempts = job.retry.as_ref().map_or(1, |r| r.max_attempts.max(1));
            let mut attempt = 0;
            // Only `job`, `input`, `middleware`, the counters and the attempt itself live while
            // the task runs: a waiting execution stays small.
            let outcome = loop {
                attempt += 1;
                // The last attempt takes the input itself unless something after it needs it: the
                // middleware's `after` or a subscriber of `TASK_FAILED` (the event carries it).
                let keep = attempt < max_attempts
                    || !middleware.is_empty()
                    || inner.events.has_subscribers();
                let arg = if keep { input.clone() } else { input.take() };
                // The first attempt's context takes the runtime cloned when the execution was
                // resolved, so that starting it touches no count shared by every execution.
                let runtime = ctx_runtime.take().unwrap_or_else(|| self.clone());
                let result = self
                    .attempt(job, runtime, arg.unwrap_or(Value::Null), attempt)
                    .await;
                let result = result.unwrap_or_else(|panic| job.panicked(&*panic));
                // Taken apart before the wait, so that the wait does not also hold it.
                let e = match result {
                    Err(e) if e.is_retryable() && attempt < max_attempts => e,
                    other => break other,
                };
                if let Some(cancelled) = self.wait_to_retry(job, attempt, e).await {
                    break Err(cancelled);
                }
            };
            self.finish(job, input.as_ref(), attempt, &outcome, middleware);
            outcome.map_err(|e| job.failed(e))
        }
    }

    /// Waits before attempt `attempt + 1` after `e`; returns the error to end with when the
    /// runtime or the caller cancels the wait. Boxed: only a failing task pays for the timer.
    fn wait_to_retry<'a>(
        &'a self,
        job: &'a Job,
        attempt: u32,
        e: TaskError,
    ) -> futures::future::BoxFuture<'a, Option<TaskError>> {
        let delay = job
            .retry
            .as_ref()
            .map_or(Duration::ZERO, |r| r.delay(attempt));
        let task_id = &*job.task_id;
        tracing::debug!(task_id, attempt, error = %e, ?delay, "task attempt failed; retrying");
        Box::pin(async move {
            tokio::select! {
                _ = tokio::time::sleep(delay) => None,
                _ = either_cancelled(&self.inner.cancel, job.caller.as_ref()) => {
                    Some(TaskError::with_kind(
                        TaskErrorKind::Cancelled,
                        format!("task \"{task_id}\" cancelled while waiting to retry: {e}"),
                    ))
                }
            }
        })
    }

    /// Publishes the outcome and runs the middleware's `after` hooks.
    fn finish(
        &self,
        job: &Job,
        input: Option<&Value>,
        attempt: u32,
        outcome: &TaskResult,
        middleware: &[Arc<dyn TaskMiddleware>],
    ) {
        let inner = &*self.inner;
        let (task_id, execution_id, instance_id) =
            (&*job.task_id, job.execution_id, job.instance_id());
        match outcome {
            Ok(_) => inner.events.publish_with(|| {
                Event::new(
                    types::TASK_COMPLETED,
                    "runtime",
                    json!({"task_id": task_id, "execution_id": execution_id, "instance_id": instance_id, "attempts": attempt}),
                )
            }),
            Err(e) => {
                tracing::debug!(task_id, %execution_id, attempts = attempt, error = %e, "task failed");
                inner.events.publish_with(|| {
                    Event::new(
                        types::TASK_FAILED,
                        "runtime",
                        json!({"task_id": task_id, "execution_id": execution_id, "instance_id": instance_id, "attempts": attempt, "error": e, "input": input}),
                    )
                })
            }
        }
        let input = input.unwrap_or(&Value::Null);
        for m in middleware {
            m.after(&job.call(input, attempt), outcome);
        }
    }

    // ----- processes ----------------------------------------------------------------------

    fn process(&self, process_id: &str) -> Result<&Arc<ProcessDefinition>> {
        self.inner
            .system
            .processes
            .get(process_id)
            .ok_or_else(|| Error::not_found("process", process_id))
    }

    /// Creates an instance of a process in its initial state. Emits `PROCESS_CREATED` (its payload
    /// carries the initial context, which a supervisor's restart strategy restores).
    pub async fn create_process(
        &self,
        process_id: &str,
        context: Value,
    ) -> Result<ProcessInstance> {
        let def = self.process(process_id)?;
        crate::json::check_depth(&context, "process data")?;
        let now = Utc::now();
        let context = if context.is_null() {
            json!({})
        } else {
            context
        };
        let instance = ProcessInstance {
            id: Uuid::now_v7(),
            process_id: def.id.clone(),
            state: def.initial_state.clone(),
            context,
            version: 1,
            created_at: now,
            updated_at: now,
            last_action: None,
        };
        self.inner.store.insert(&instance).await?;
        self.inner.events.publish_with(|| {
            Event::new(
                types::PROCESS_CREATED,
                "runtime",
                json!({"instance_id": instance.id, "process_id": &*instance.process_id, "state": &*instance.state, "context": &instance.context}),
            )
        });
        tracing::debug!(instance_id = %instance.id, process_id, "process created");
        Ok(instance)
    }

    /// Loads an instance.
    pub async fn get_process(&self, instance_id: Uuid) -> Result<Option<ProcessInstance>> {
        self.inner.store.get(instance_id).await
    }

    /// Every instance.
    pub async fn get_all_processes(&self) -> Result<Vec<ProcessInstance>> {
        self.inner.store.list(&ProcessQuery::all()).await
    }

    /// Instances of one process.
    pub async fn get_processes_by_type(&self, process_id: &str) -> Result<Vec<ProcessInstance>> {
        self.inner
            .store
            .list(&ProcessQuery::process(process_id))
            .await
    }

    /// Instances in one state (of any process).
    pub async fn get_processes_by_state(&self, state: &str) -> Result<Vec<ProcessInstance>> {
        self.inner
            .store
            .list(&ProcessQuery::all().in_state(state))
            .await
    }

    /// Takes the per-instance lock. The returned guard releases it, and removes the map entry
    /// when nobody else waits, on drop, so a caller that is cancelled while waiting or holding
    /// the lock leaves nothing behind.
    async fn lock_instance(&self, id: Uuid) -> Result<InstanceLock<'_>> {
        if ACTION_OF.try_with(|acting| *acting == id).unwrap_or(false) {
            // The action of a transition of this instance runs while the instance is locked;
            // waiting here would wait for ourselves forever.
            return Err(Error::InvalidInput(format!(
                "process instance {id}: its own action cannot transition, retry or reset it \
                 (the transition that runs the action still holds the instance)"
            )));
        }
        let lock = self
            .inner
            .lock_shard(id)
            .lock()
            .entry(id)
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(())))
            .clone();
        let guard = InstanceLock {
            inner: &self.inner,
            id,
            lock: Some(lock),
            held: None,
        };
        Ok(guard.acquire().await)
    }

    /// Applies `event` to an instance: merges `data` into its context, picks the first
    /// transition whose guard passes, moves to its target (emitting `STATE_CHANGED`), then runs
    /// its action, if any, and awaits it. The action's outcome is recorded on the instance and
    /// returned; a failed action does not undo the state change.
    ///
    /// Transitions of one instance run one at a time, in arrival order.
    pub async fn transition_process(
        &self,
        instance_id: Uuid,
        event: &str,
        data: Value,
    ) -> Result<TransitionOutcome> {
        crate::json::check_depth(&data, "process data")?;
        let _held = self.lock_instance(instance_id).await?;
        self.transition_locked(instance_id, event, data)
            .instrument(tracing::debug_span!("transition", %instance_id, event))
            .await
    }

    async fn transition_locked(
        &self,
        instance_id: Uuid,
        event: &str,
        data: Value,
    ) -> Result<TransitionOutcome> {
        let store = &self.inner.store;
        let mut instance = store
            .get(instance_id)
            .await?
            .ok_or_else(|| Error::not_found("process instance", instance_id))?;
        let def = self.process(&instance.process_id)?.clone();
        let invalid = || Error::InvalidTransition {
            instance_id,
            state: instance.state.to_string(),
            event: event.to_owned(),
        };
        if def.is_final(&instance.state) {
            return Err(invalid());
        }
        let candidates = def.candidates(&instance.state, event).ok_or_else(invalid)?;
        // The loaded copy is ours: move its context out instead of cloning it.
        let mut context = std::mem::take(&mut instance.context);
        merge_context(&mut context, data.clone());
        let mut chosen = None;
        let mut guard_input: Option<Arc<GuardInput>> = None;
        for c in candidates {
            match &c.guard {
                None => {
                    chosen = Some(c);
                    break;
                }
                Some(g) => {
                    let input = guard_input
                        .get_or_insert_with(|| {
                            Arc::new(GuardInput {
                                instance_id,
                                state: instance.state.clone(),
                                event: event.to_owned(),
                                context: context.clone(),
                                data: data.clone(),
                            })
                        })
                        .clone();
                    // A panicking guard rejects its transition; the caller's task survives.
                    let passed = match AssertUnwindSafe(g.check(input)).catch_unwind().await {
                        Ok(passed) => passed,
                        Err(panic) => {
                            let msg = panic_message(&*panic);
                            tracing::error!(%instance_id, event, panic = %msg, "guard panicked");
                            self.inner.events.publish_with(|| {
                                Event::new(
                                    types::SYSTEM_ERROR,
                                    "runtime",
                                    json!({"instance_id": instance_id, "event": event, "error": format!("guard panicked: {msg}"), "kind": "guard-panicked"}),
                                )
                            });
                            false
                        }
                    };
                    if passed {
                        chosen = Some(c);
                        break;
                    }
                }
            }
        }
        let Some(chosen) = chosen else {
            return Err(Error::GuardRejected {
                instance_id,
                state: instance.state.to_string(),
                event: event.to_owned(),
            });
        };
        let from = std::mem::replace(&mut instance.state, chosen.target.clone());
        let expected = instance.version;
        instance.context = context;
        instance.version += 1;
        instance.updated_at = Utc::now();
        instance.last_action = chosen.action.as_ref().map(|task_id| {
            Box::new(ActionRecord {
                task_id: task_id.to_string(),
                event: event.to_owned(),
                input: instance.context.clone(),
                status: ActionStatus::Running,
                output: None,
                error: None,
                at: instance.updated_at,
            })
        });
        store.update(&instance, expected).await?;
        self.inner.events.publish_with(|| {
            Event::new(
                types::STATE_CHANGED,
                "runtime",
                json!({"instance_id": instance_id, "process_id": &*instance.process_id, "from": &*from, "to": &*instance.state, "event": event}),
            )
        });
        let Some(task_id) = chosen.action.clone() else {
            return Ok(TransitionOutcome {
                instance,
                from,
                action: None,
            });
        };
        let result = self.run_action(&instance, &task_id).await;
        self.record_action(&mut instance, &result).await?;
        Ok(TransitionOutcome {
            instance,
            from,
            action: Some(ActionOutcome {
                task_id: task_id.to_string(),
                result,
            }),
        })
    }

    async fn run_action(&self, instance: &ProcessInstance, task_id: &str) -> TaskResult {
        let input = instance
            .last_action
            .as_ref()
            .map_or_else(|| instance.context.clone(), |a| a.input.clone());
        let def = match self.task(task_id) {
            Ok(d) => d.clone(),
            Err(e) => return Err(TaskError::permanent(e.to_string())),
        };
        let process = Arc::new(ProcessRef {
            instance_id: instance.id,
            process_id: instance.process_id.clone(),
            context: instance.context.clone(),
        });
        let job = Job {
            task_id: Arc::from(def.id.as_str()),
            handler: def.handler.clone(),
            retry: def.retry.clone().map(Box::new),
            timeout: def.timeout,
            process: Some(process),
            key: None,
            origin: None,
            caller: None,
            execution_id: Uuid::new_v4(),
            ctx_runtime: None,
        };
        let result = ACTION_OF
            .scope(instance.id, self.clone().run_job(job, input))
            .await
            .map_err(TaskError::from)
            // The result is stored with the instance: one that could not be read back fails
            // the action instead.
            .and_then(|v| match crate::json::check_depth(&v, "action result") {
                Ok(()) => Ok(v),
                Err(e) => Err(TaskError::permanent(format!("task \"{task_id}\": {e}"))),
            });
        if let Err(e) = &result {
            self.inner.events.publish_with(|| {
                Event::new(
                    types::SYSTEM_ERROR,
                    "runtime",
                    json!({"instance_id": instance.id, "task_id": task_id, "error": e, "kind": "action-failed"}),
                )
            });
        }
        result
    }

    async fn record_action(
        &self,
        instance: &mut ProcessInstance,
        result: &TaskResult,
    ) -> Result<()> {
        if let Some(rec) = instance.last_action.as_mut() {
            match result {
                Ok(v) => {
                    rec.status = ActionStatus::Completed;
                    rec.output = Some(v.clone());
                    rec.error = None;
                }
                Err(e) => {
                    rec.status = ActionStatus::Failed;
                    rec.output = None;
                    rec.error = Some(e.message.clone());
                }
            }
            rec.at = Utc::now();
        }
        let expected = instance.version;
        instance.version += 1;
        self.inner.store.update(instance, expected).await
    }

    /// Runs the action of the instance's last transition again, with the same input (what a
    /// supervisor's *retry-last-action* strategy does). Errors if the instance has no recorded
    /// action.
    pub async fn retry_last_action(&self, instance_id: Uuid) -> Result<TransitionOutcome> {
        let _held = self.lock_instance(instance_id).await?;
        {
            async {
                let mut instance = self
                    .inner
                    .store
                    .get(instance_id)
                    .await?
                    .ok_or_else(|| Error::not_found("process instance", instance_id))?;
                let Some(task_id) = instance.last_action.as_ref().map(|a| a.task_id.clone()) else {
                    return Err(Error::InvalidInput(format!(
                        "process instance {instance_id} has no action to retry"
                    )));
                };
                let result = self.run_action(&instance, &task_id).await;
                self.record_action(&mut instance, &result).await?;
                Ok(TransitionOutcome {
                    from: instance.state.clone(),
                    instance,
                    action: Some(ActionOutcome { task_id, result }),
                })
            }
            .await
        }
    }

    /// Puts an instance back in its process's initial state with `context` (what a
    /// supervisor's *restart* strategy does). Emits `STATE_CHANGED` with event `restart`.
    pub async fn reset_process(
        &self,
        instance_id: Uuid,
        context: Value,
    ) -> Result<ProcessInstance> {
        crate::json::check_depth(&context, "process data")?;
        let _held = self.lock_instance(instance_id).await?;
        {
            async {
                let mut instance = self
                    .inner
                    .store
                    .get(instance_id)
                    .await?
                    .ok_or_else(|| Error::not_found("process instance", instance_id))?;
                let def = self.process(&instance.process_id)?;
                let from = std::mem::replace(&mut instance.state, def.initial_state.clone());
                let expected = instance.version;
                instance.version += 1;
                instance.context = context;
                instance.updated_at = Utc::now();
                instance.last_action = None;
                self.inner.store.update(&instance, expected).await?;
                self.inner.events.publish_with(|| {
                    Event::new(
                        types::STATE_CHANGED,
                        "runtime",
                        json!({"instance_id": instance_id, "process_id": &*instance.process_id, "from": &*from, "to": &*instance.state, "event": "restart"}),
                    )
                });
                Ok(instance)
            }
            .await
        }
    }

    // ----- shutdown -----------------------------------------------------------------------

    /// Stops accepting tasks, waits up to `timeout` for running ones to finish on their own,
    /// then cancels the runtime's token (which every task's
    /// [`TaskContext::cancellation`] descends from) and shuts the extensions down in reverse
    /// order. Returns how many executions
    /// were still running when the deadline passed (0 on a clean shutdown).
    pub async fn shutdown(&self, timeout: Duration) -> usize {
        let inner = &*self.inner;
        if inner.shutting_down.swap(true, Ordering::SeqCst) {
            return inner.inflight.load();
        }
        let wait = async {
            loop {
                let idle = inner.idle.notified();
                if inner.inflight.load() == 0 {
                    break;
                }
                idle.await;
            }
        };
        // Running tasks get the whole grace period to finish on their own; only then are they
        // told to stop.
        if tokio::time::timeout(timeout, wait).await.is_err() {
            tracing::warn!(
                running = inner.inflight.load(),
                "shutdown deadline passed with tasks still running"
            );
        }
        inner.cancel.cancel();
        for e in inner.extensions.iter().rev() {
            e.shutdown().await;
        }
        inner.inflight.load()
    }

    /// Waits for running tasks; like [`shutdown`](Self::shutdown) with no deadline.
    pub async fn graceful_shutdown(&self) {
        self.shutdown(Duration::MAX).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ProcessDefinition, TaskDefinition, TransitionDefinition};

    fn held_locks(rt: &Runtime) -> usize {
        rt.inner.locks.iter().map(|s| s.lock().len()).sum()
    }

    #[tokio::test(start_paused = true)]
    async fn instance_locks_are_removed_after_use_even_when_callers_give_up() {
        let slow = TaskDefinition::new("slow", |_i, _c| async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(Value::Null)
        })
        .unwrap();
        let p = ProcessDefinition::builder("p")
            .state("a")
            .transition(TransitionDefinition::new("a", "a", "tick"))
            .transition(TransitionDefinition::new("a", "a", "slow").action("slow"))
            .build()
            .unwrap();
        let system = System::builder("s").process(p).task(slow).build().unwrap();
        let rt = Runtime::builder(system).start().await.unwrap();
        let mut ids = vec![];
        for _ in 0..50 {
            let i = rt.create_process("p", json!({})).await.unwrap();
            rt.transition_process(i.id, "tick", Value::Null)
                .await
                .unwrap();
            ids.push(i.id);
        }
        assert_eq!(held_locks(&rt), 0);
        // A caller that gives up while holding the lock, and one that gives up while waiting.
        let id = ids[0];
        let holder = rt.transition_process(id, "slow", Value::Null);
        let waiter = rt.transition_process(id, "tick", Value::Null);
        let both = async { tokio::join!(holder, waiter) };
        assert!(
            tokio::time::timeout(Duration::from_secs(1), both)
                .await
                .is_err()
        );
        assert_eq!(held_locks(&rt), 0, "no lock entry is left behind");
        assert_eq!(rt.running_tasks(), 0);
    }

    #[tokio::test]
    async fn an_execution_outlives_the_handle_that_started_it_and_counts_in_flight() {
        let gate = Arc::new(tokio::sync::Notify::new());
        let g = gate.clone();
        let wait = TaskDefinition::new("wait", move |input, _c| {
            let g = g.clone();
            async move {
                g.notified().await;
                Ok(input)
            }
        })
        .unwrap();
        let system = System::builder("s").task(wait).build().unwrap();
        let rt = Runtime::builder(system).start().await.unwrap();
        // The future owns what it needs: it can be spawned without the runtime handle.
        let running = {
            let handle = rt.clone();
            handle.execute(
                TaskRef::Id("wait".into()),
                json!({"n": 1}),
                ExecuteOptions::default(),
            )
        };
        let task = tokio::spawn(running);
        while rt.running_tasks() == 0 {
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        assert_eq!(task.await.unwrap().unwrap(), json!({"n": 1}));
        assert_eq!(rt.running_tasks(), 0);
        // An unknown task is an error of the returned future, not a panic.
        let e = rt
            .execute(
                TaskRef::Id("nope".into()),
                Value::Null,
                ExecuteOptions::default(),
            )
            .await
            .unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
