//! [`Supervisor`]: health checks and recovery of process instances and task executions, the
//! implementation of [`architectlm_core::extensions::Supervisor`].
//!
//! # How it works
//! - **Processes.** Each supervised process has a check loop that runs every `check_interval`.
//!   It lists the process's instances and calls an instance *unhealthy* when its last
//!   transition's action failed (`last_action.status == Failed`) or when it has stayed in a
//!   non-final state longer than its deadline (`state_timeouts[state]`, else `state_timeout`,
//!   measured from `updated_at`). An unhealthy instance is recovered by the configured
//!   strategy, one attempt at a time, with the configured backoff between attempts (without a
//!   backoff, the next attempt waits for the next check).
//! - **Original context.** The *restart* strategy puts the instance back in its initial state
//!   with the context it was created with. The supervisor reads that context from the
//!   `PROCESS_CREATED` event (its payload carries it) for instances created after
//!   [`start`](Extension::start); an instance created earlier, or whose creation event was
//!   skipped by a lagging subscription, keeps the context it had when the supervisor first saw
//!   it.
//! - **Tasks.** A [`TaskMiddleware`] registered at start sees every execution's outcome; a failed
//!   execution of a supervised task is recorded (with its input) and recovered by the task's
//!   strategy: *retry* runs the task again with the same input and the same execution id,
//!   *custom* runs the recovery task with `{task_id, execution_id, input, error, attempt}`.
//!   Only executions that failed have a status; cancelled executions (shutdown) are ignored,
//!   and so are executions that ran as a process action (the process's supervision owns them:
//!   rerunning the task alone would not update the instance).
//! - **Statuses** go `unhealthy → recovering → recovered → healthy`, or `→ failed` once
//!   `max_recovery_attempts` attempts failed. Attempts are counted per episode: an instance that
//!   was healthy and falls ill again starts from zero.
//! - **Events.** The five [`SupervisionEventType`]s are published on the supervisor's own hub
//!   ([`on_supervision_event`](SupervisorContract::on_supervision_event)) and forwarded to the
//!   runtime's bus with source `supervisor` and the kebab-case type.
//!
//! # Rules
//! - `Send + Sync`; every method may be called concurrently. At most one recovery of a target
//!   runs at a time: a manual `recover_*` while one runs returns `Ok(false)`.
//! - Calling `supervise_process` / `supervise_task` again for the same id replaces the
//!   configuration.
//! - [`Extension::shutdown`] stops the check loops and any recovery still waiting; recoveries
//!   already inside the runtime finish under the runtime's own shutdown rules.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use architectlm_core::event::types;
use architectlm_core::extensions::Supervisor as SupervisorContract;
use architectlm_core::extensions::supervisor::{
    HealthStatus, ProcessRecoveryStrategy, ProcessSupervisionConfig, SupervisionEvent,
    SupervisionEventHandler, SupervisionEventType, SupervisionStatus, TargetType,
    TaskRecoveryStrategy, TaskSupervisionConfig,
};
use architectlm_core::time::add_to_instant;
use architectlm_core::{
    ActionStatus, Error, Event, EventFilter, EventHub, EventSubscription, ExecuteOptions,
    Extension, ProcessDefinition, ProcessInstance, Result, RetryPolicy, Runtime, ServiceRegistry,
    TaskCall, TaskErrorKind, TaskMiddleware, TaskRef, TaskResult,
};
use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::clock::Clock;

/// The name of this extension, used as the source of its events on the runtime bus.
pub const EXTENSION_NAME: &str = "supervisor";

/// Health checks and recovery of process instances and task executions.
///
/// Plug it into a runtime as an extension; tasks reach it with `ctx.supervisor()`.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use std::sync::Arc;
/// use std::time::Duration;
/// use architectlm_core::extensions::Supervisor as _;
/// use architectlm_core::extensions::supervisor::{ProcessRecoveryStrategy, ProcessSupervisionConfig};
/// use architectlm_core::{ProcessDefinition, Runtime, System, TransitionDefinition};
/// use architectlm_supervisor::Supervisor;
///
/// let order = ProcessDefinition::builder("order")
///     .initial_state("created")
///     .final_state("paid")
///     .transition(TransitionDefinition::new("created", "paid", "pay"))
///     .build()?;
/// let system = System::builder("shop").process(order).build()?;
/// let supervisor = Arc::new(Supervisor::new());
/// let runtime = Runtime::builder(system).extension(supervisor.clone()).start().await?;
///
/// supervisor
///     .supervise_process(
///         ProcessSupervisionConfig::new("order", ProcessRecoveryStrategy::Restart)
///             .check_interval(Duration::from_secs(5))
///             .state_timeout(Duration::from_secs(600)),
///     )
///     .await?;
/// let instance = runtime.create_process("order", serde_json::json!({"amount": 42})).await?;
/// # let _ = instance;
/// # runtime.shutdown(Duration::from_secs(1)).await;
/// # Ok::<_, architectlm_core::Error>(())
/// # }).unwrap();
/// ```
pub struct Supervisor {
    shared: Arc<Shared>,
}

impl fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Supervisor")
            .field("started", &self.shared.runtime.get().is_some())
            .field("processes", &self.shared.processes.lock().len())
            .field("tasks", &self.shared.tasks.read().len())
            .finish_non_exhaustive()
    }
}

impl Default for Supervisor {
    fn default() -> Self {
        Self::new()
    }
}

/// Builds a [`Supervisor`] with non-default limits.
///
/// ```
/// use architectlm_supervisor::Supervisor;
/// let supervisor = Supervisor::builder().event_capacity(4096).retained_task_statuses(1000).build();
/// # let _ = supervisor;
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct SupervisorBuilder {
    event_capacity: usize,
    retained_task_statuses: usize,
}

impl SupervisorBuilder {
    /// How far a subscriber of supervision events may fall behind (default 1024).
    pub fn event_capacity(mut self, n: usize) -> Self {
        self.event_capacity = n;
        self
    }

    /// How many finished (recovered or failed) task statuses are kept for
    /// `get_task_supervision_status`; the oldest are forgotten first (default 10 000).
    pub fn retained_task_statuses(mut self, n: usize) -> Self {
        self.retained_task_statuses = n;
        self
    }

    /// Builds the supervisor.
    pub fn build(self) -> Supervisor {
        Supervisor {
            shared: Arc::new(Shared {
                runtime: OnceLock::new(),
                events: EventHub::with_capacity("supervisor", self.event_capacity),
                clock: Clock::new(),
                cancel: CancellationToken::new(),
                processes: Mutex::new(HashMap::new()),
                instances: Mutex::new(HashMap::new()),
                tasks: RwLock::new(HashMap::new()),
                executions: Mutex::new(Executions::default()),
                retained: self.retained_task_statuses,
                background: Mutex::new(Vec::new()),
            }),
        }
    }
}

/// A supervised process or task: its configuration, the wake-up of its check loop and the loop.
struct Watch<C> {
    config: Arc<C>,
    wake: Arc<Notify>,
    task: Option<JoinHandle<()>>,
}

type ProcessWatch = Watch<ProcessSupervisionConfig>;
type TaskWatch = Watch<TaskSupervisionConfig>;

impl<C> Watch<C> {
    /// Puts a fresh watch for `config` under `id`, stopping the loop of the one it replaces.
    fn install(watches: &mut HashMap<String, Self>, id: String, config: C) {
        let old = watches.insert(
            id,
            Self {
                config: Arc::new(config),
                wake: Arc::new(Notify::new()),
                task: None,
            },
        );
        if let Some(t) = old.and_then(|w| w.task) {
            t.abort();
        }
    }
}

struct InstanceEntry {
    process_id: Arc<str>,
    status: SupervisionStatus,
    original_context: Option<Value>,
    in_flight: bool,
    next_attempt_at: Instant,
}

struct ExecutionEntry {
    task_id: Arc<str>,
    input: Value,
    status: SupervisionStatus,
    in_flight: bool,
    next_attempt_at: Instant,
}

#[derive(Default)]
struct Executions {
    entries: HashMap<Uuid, ExecutionEntry>,
    /// Unhealthy executions waiting for an attempt, by task id.
    pending: HashMap<Arc<str>, HashSet<Uuid>>,
    /// Finished executions, oldest first, for bounded retention.
    finished: VecDeque<Uuid>,
}

struct Shared {
    runtime: OnceLock<Runtime>,
    events: EventHub<SupervisionEvent>,
    clock: Clock,
    cancel: CancellationToken,
    processes: Mutex<HashMap<String, ProcessWatch>>,
    instances: Mutex<HashMap<Uuid, InstanceEntry>>,
    tasks: RwLock<HashMap<String, TaskWatch>>,
    executions: Mutex<Executions>,
    retained: usize,
    background: Mutex<Vec<JoinHandle<()>>>,
}

fn new_status(
    target_id: Uuid,
    target_type: TargetType,
    max: u32,
    status: HealthStatus,
) -> SupervisionStatus {
    SupervisionStatus::new(target_id, target_type, status, max)
}

fn effective_backoff(policy: &RetryPolicy) -> RetryPolicy {
    // `max_attempts` of the policy is not used: `max_recovery_attempts` counts attempts.
    let mut p = policy.clone();
    p.max_attempts = 1;
    p
}

/// Checks a process supervision configuration on its own (without a runtime).
pub(crate) fn validate_process_config(c: &ProcessSupervisionConfig) -> Result<()> {
    if c.process_id.trim().is_empty() {
        return Err(Error::invalid_config(
            "process_id",
            format!("{:?}", c.process_id),
            "must name a process (not empty or only whitespace)",
        ));
    }
    check_attempts_and_interval(
        "process",
        &c.process_id,
        c.max_recovery_attempts,
        c.check_interval,
    )?;
    check_custom_action(
        c.recovery_strategy == ProcessRecoveryStrategy::Custom,
        c.custom_recovery_action.as_deref(),
        "process",
        &c.process_id,
    )?;
    if c.state_timeout == Some(Duration::ZERO) {
        return Err(Error::invalid_config(
            "state_timeout",
            "0ms",
            "a deadline must be positive",
        ));
    }
    for (state, ms) in &c.state_timeouts {
        if *ms == 0 {
            return Err(Error::invalid_config(
                format!("state_timeouts[\"{state}\"]"),
                "0ms",
                "a deadline must be positive",
            ));
        }
    }
    if let Some(b) = &c.backoff {
        effective_backoff(b).validate()?;
    }
    Ok(())
}

fn check_custom_action(is_custom: bool, action: Option<&str>, kind: &str, id: &str) -> Result<()> {
    match (is_custom, action) {
        (true, None) => Err(Error::invalid_config(
            "custom_recovery_action",
            "none",
            format!("the custom strategy of {kind} \"{id}\" needs a recovery task"),
        )),
        (true, Some(a)) if a.trim().is_empty() => Err(Error::invalid_config(
            "custom_recovery_action",
            format!("{a:?}"),
            format!("the custom strategy of {kind} \"{id}\" needs a recovery task"),
        )),
        (false, Some(a)) => Err(Error::invalid_config(
            "custom_recovery_action",
            format!("\"{a}\""),
            format!(
                "{kind} \"{id}\" does not use the custom strategy, so the recovery task would never run"
            ),
        )),
        _ => Ok(()),
    }
}

/// Checks a process configuration against the system the runtime runs.
fn validate_process_against(rt: &Runtime, c: &ProcessSupervisionConfig) -> Result<()> {
    let def = rt
        .system()
        .processes
        .get(&c.process_id)
        .ok_or_else(|| Error::not_found("process", &c.process_id))?;
    for state in c.state_timeouts.keys() {
        match def.state(state) {
            None => {
                return Err(Error::invalid_config(
                    format!("state_timeouts[\"{state}\"]"),
                    format!("\"{state}\""),
                    format!("process \"{}\" has no such state", c.process_id),
                ));
            }
            Some((_, architectlm_core::StateType::Final)) => {
                return Err(Error::invalid_config(
                    format!("state_timeouts[\"{state}\"]"),
                    format!("\"{state}\""),
                    "a final state cannot time out",
                ));
            }
            Some(_) => {}
        }
    }
    if let Some(a) = &c.custom_recovery_action
        && !rt.system().tasks.contains_key(a)
    {
        return Err(Error::invalid_config(
            "custom_recovery_action",
            format!("\"{a}\""),
            "no task of the system has this id",
        ));
    }
    Ok(())
}

/// The rules process and task supervision share: at least one attempt, a positive interval.
fn check_attempts_and_interval(
    kind: &str,
    id: &str,
    max_recovery_attempts: u32,
    check_interval: Duration,
) -> Result<()> {
    if max_recovery_attempts == 0 {
        return Err(Error::invalid_config(
            "max_recovery_attempts",
            0,
            format!("supervision of {kind} \"{id}\" needs at least one recovery attempt"),
        ));
    }
    if check_interval.is_zero() {
        return Err(Error::invalid_config(
            "check_interval",
            "0ms",
            format!("supervision of {kind} \"{id}\" needs a positive check interval"),
        ));
    }
    Ok(())
}

/// Checks a task supervision configuration on its own.
pub(crate) fn validate_task_config(c: &TaskSupervisionConfig) -> Result<()> {
    if c.task_id.trim().is_empty() {
        return Err(Error::invalid_config(
            "task_id",
            format!("{:?}", c.task_id),
            "must name a task (not empty or only whitespace)",
        ));
    }
    check_attempts_and_interval(
        "task",
        &c.task_id,
        c.max_recovery_attempts,
        c.check_interval,
    )?;
    check_custom_action(
        c.recovery_strategy == TaskRecoveryStrategy::Custom,
        c.custom_recovery_action.as_deref(),
        "task",
        &c.task_id,
    )?;
    if c.custom_recovery_action.as_deref() == Some(c.task_id.as_str()) {
        return Err(Error::invalid_config(
            "custom_recovery_action",
            format!("\"{}\"", c.task_id),
            "a task cannot be its own recovery task",
        ));
    }
    if let Some(b) = &c.backoff {
        effective_backoff(b).validate()?;
    }
    Ok(())
}

fn validate_task_against(rt: &Runtime, c: &TaskSupervisionConfig) -> Result<()> {
    if !rt.system().tasks.contains_key(&c.task_id) {
        return Err(Error::not_found("task", &c.task_id));
    }
    if let Some(a) = &c.custom_recovery_action
        && !rt.system().tasks.contains_key(a)
    {
        return Err(Error::invalid_config(
            "custom_recovery_action",
            format!("\"{a}\""),
            "no task of the system has this id",
        ));
    }
    Ok(())
}

/// Why an instance is unhealthy, or `None` if it is fine.
fn diagnose(
    def: &ProcessDefinition,
    config: &ProcessSupervisionConfig,
    instance: &ProcessInstance,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<String> {
    if def.is_final(&instance.state) {
        return None;
    }
    if let Some(a) = &instance.last_action
        && a.status == ActionStatus::Failed
    {
        return Some(format!(
            "action \"{}\" of event \"{}\" failed: {}",
            a.task_id,
            a.event,
            a.error.as_deref().unwrap_or("no error message")
        ));
    }
    let deadline = config
        .state_timeouts
        .get(&*instance.state)
        .map(|ms| Duration::from_millis(*ms))
        .or(config.state_timeout)?;
    let age = (now - instance.updated_at).to_std().unwrap_or_default();
    (age > deadline).then(|| {
        format!(
            "in state \"{}\" for {} ms, past its deadline of {} ms",
            instance.state,
            age.as_millis(),
            deadline.as_millis()
        )
    })
}

impl Supervisor {
    /// A supervisor with default limits.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A builder for non-default limits.
    pub fn builder() -> SupervisorBuilder {
        SupervisorBuilder {
            event_capacity: architectlm_core::event::DEFAULT_EVENT_CAPACITY,
            retained_task_statuses: 10_000,
        }
    }

    /// Subscribes to supervision events as a stream (the pull counterpart of
    /// `on_supervision_event`).
    pub fn subscribe(
        &self,
        filter: impl Into<EventFilter>,
    ) -> architectlm_core::Subscription<SupervisionEvent> {
        self.shared.events.subscribe(filter)
    }

    /// The statuses of every supervised instance of `process_id` seen so far.
    pub fn process_statuses(&self, process_id: &str) -> Vec<SupervisionStatus> {
        self.shared
            .instances
            .lock()
            .values()
            .filter(|e| &*e.process_id == process_id)
            .map(|e| e.status.clone())
            .collect()
    }
}

impl Shared {
    fn runtime(&self) -> Result<&Runtime> {
        self.runtime
            .get()
            .ok_or_else(|| Error::InvalidInput("the supervisor has not been started by a runtime; add it with RuntimeBuilder::extension".to_owned()))
    }

    fn emit(
        &self,
        event_type: SupervisionEventType,
        target: Uuid,
        kind: TargetType,
        payload: Value,
    ) {
        let event = SupervisionEvent::new(event_type, target, kind, payload);
        tracing::debug!(event = event_type.as_str(), %target, "supervision event");
        if let Some(rt) = self.runtime.get() {
            let forwarded = json!({
                "id": event.id,
                "target_id": target,
                "target_type": kind,
                "payload": &event.payload,
            });
            rt.publish(Event::new(event_type.as_str(), EXTENSION_NAME, forwarded));
        }
        self.events.publish(event);
    }

    fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        let cancel = self.cancel.clone();
        let handle = tokio::spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = fut => {}
            }
        });
        let mut bg = self.background.lock();
        bg.retain(|h| !h.is_finished());
        bg.push(handle);
    }

    // ----- processes ----------------------------------------------------------------------

    fn start_process_loop(self: &Arc<Self>, process_id: &str) {
        let Ok(rt) = self.runtime() else { return };
        let _ = rt;
        let mut watches = self.processes.lock();
        let Some(watch) = watches.get_mut(process_id) else {
            return;
        };
        if let Some(old) = watch.task.take() {
            old.abort();
        }
        let shared = self.clone();
        let config = watch.config.clone();
        let wake = watch.wake.clone();
        let cancel = self.cancel.clone();
        watch.task = Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(config.check_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                    _ = wake.notified() => {}
                }
                if let Err(e) = shared.check_process(&config, &wake).await {
                    tracing::warn!(process_id = %config.process_id, error = %e, "process health check failed");
                }
            }
        }));
    }

    async fn check_process(
        self: &Arc<Self>,
        config: &Arc<ProcessSupervisionConfig>,
        wake: &Arc<Notify>,
    ) -> Result<()> {
        let rt = self.runtime()?.clone();
        let def = rt
            .system()
            .processes
            .get(&config.process_id)
            .ok_or_else(|| Error::not_found("process", &config.process_id))?
            .clone();
        let list = rt.get_processes_by_type(&config.process_id).await?;
        let now_wall = self.clock.now();
        let now = Instant::now();
        let mut due = Vec::new();
        let mut detected = Vec::new();
        {
            let mut map = self.instances.lock();
            for inst in &list {
                let problem = diagnose(&def, config, inst, now_wall);
                let entry = map.entry(inst.id).or_insert_with(|| InstanceEntry {
                    process_id: inst.process_id.clone(),
                    status: new_status(
                        inst.id,
                        TargetType::Process,
                        config.max_recovery_attempts,
                        HealthStatus::Healthy,
                    ),
                    original_context: Some(inst.context.clone()),
                    in_flight: false,
                    next_attempt_at: now,
                });
                entry.status.last_check_at = Some(now_wall);
                entry.status.max_recovery_attempts = config.max_recovery_attempts;
                if def.is_final(&inst.state) {
                    // The instance will never be restarted again; its context need not be kept.
                    entry.original_context = None;
                }
                if entry.in_flight {
                    continue;
                }
                match problem {
                    None => {
                        if entry.status.status != HealthStatus::Healthy {
                            entry.status.status = HealthStatus::Healthy;
                            entry.status.error = None;
                        }
                    }
                    Some(problem) => {
                        match entry.status.status {
                            HealthStatus::Failed | HealthStatus::Recovering => continue,
                            HealthStatus::Healthy | HealthStatus::Recovered => {
                                if entry.status.status == HealthStatus::Healthy {
                                    entry.status.recovery_attempts = 0;
                                }
                                entry.status.status = HealthStatus::Unhealthy;
                                entry.next_attempt_at = now;
                                detected.push((inst.id, problem.clone()));
                            }
                            _ => {}
                        }
                        entry.status.error = Some(problem);
                        if entry.next_attempt_at <= now {
                            entry.in_flight = true;
                            due.push(inst.id);
                        }
                    }
                }
            }
        }
        for (id, problem) in detected {
            self.emit(
                SupervisionEventType::UnhealthyDetected,
                id,
                TargetType::Process,
                json!({"process_id": &config.process_id, "error": problem}),
            );
        }
        for id in due {
            let shared = self.clone();
            let config = config.clone();
            let wake = wake.clone();
            self.spawn(async move {
                shared.attempt_process(&config, id, Some(&wake)).await;
            });
        }
        Ok(())
    }

    /// Runs one recovery attempt of an instance whose entry is marked in flight. Returns
    /// whether it succeeded.
    async fn attempt_process(
        &self,
        config: &ProcessSupervisionConfig,
        instance_id: Uuid,
        wake: Option<&Arc<Notify>>,
    ) -> bool {
        let now_wall = self.clock.now();
        let (attempt, original) = {
            let mut map = self.instances.lock();
            let Some(e) = map.get_mut(&instance_id) else {
                return false;
            };
            e.status.recovery_attempts += 1;
            e.status.status = HealthStatus::Recovering;
            e.status.last_recovery_at = Some(now_wall);
            (e.status.recovery_attempts, e.original_context.clone())
        };
        self.emit(
            SupervisionEventType::RecoveryStarted,
            instance_id,
            TargetType::Process,
            json!({"process_id": &config.process_id, "attempt": attempt, "strategy": config.recovery_strategy}),
        );
        let outcome = self
            .run_process_strategy(config, instance_id, attempt, original)
            .await;
        self.finish_process_attempt(config, instance_id, attempt, outcome, wake)
    }

    async fn run_process_strategy(
        &self,
        config: &ProcessSupervisionConfig,
        instance_id: Uuid,
        attempt: u32,
        original: Option<Value>,
    ) -> std::result::Result<Value, String> {
        let rt = self.runtime().map_err(|e| e.to_string())?.clone();
        match config.recovery_strategy {
            ProcessRecoveryStrategy::RetryLastAction => {
                let outcome = rt
                    .retry_last_action(instance_id)
                    .await
                    .map_err(|e| e.to_string())?;
                match outcome.action {
                    Some(a) => match a.result {
                        Ok(v) => Ok(json!({"task_id": a.task_id, "output": v})),
                        Err(e) => Err(format!("action \"{}\" failed again: {e}", a.task_id)),
                    },
                    None => Ok(Value::Null),
                }
            }
            ProcessRecoveryStrategy::Restart => {
                let context = match original {
                    Some(c) => c,
                    None => rt
                        .get_process(instance_id)
                        .await
                        .map_err(|e| e.to_string())?
                        .map(|i| i.context)
                        .unwrap_or_else(|| json!({})),
                };
                let inst = rt
                    .reset_process(instance_id, context)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(json!({"state": &*inst.state}))
            }
            ProcessRecoveryStrategy::Custom => {
                let Some(task) = config.custom_recovery_action.as_deref() else {
                    return Err("no custom recovery action is configured".to_owned());
                };
                let instance = rt
                    .get_process(instance_id)
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("process instance {instance_id} no longer exists"))?;
                let input = json!({"instance": instance, "attempt": attempt});
                rt.execute_task(task, input)
                    .await
                    .map_err(|e| e.to_string())
            }
            other => Err(format!(
                "recovery strategy {other:?} is not supported by this supervisor"
            )),
        }
    }

    fn finish_process_attempt(
        &self,
        config: &ProcessSupervisionConfig,
        instance_id: Uuid,
        attempt: u32,
        outcome: std::result::Result<Value, String>,
        wake: Option<&Arc<Notify>>,
    ) -> bool {
        let now = Instant::now();
        let mut gave_up = false;
        let mut retry_in = None;
        {
            let mut map = self.instances.lock();
            if let Some(e) = map.get_mut(&instance_id) {
                e.in_flight = false;
                match &outcome {
                    Ok(_) => {
                        e.status.status = HealthStatus::Recovered;
                        e.status.error = None;
                    }
                    Err(err) => {
                        e.status.error = Some(err.clone());
                        if attempt >= config.max_recovery_attempts {
                            e.status.status = HealthStatus::Failed;
                            gave_up = true;
                        } else {
                            e.status.status = HealthStatus::Unhealthy;
                            let delay = config
                                .backoff
                                .as_ref()
                                .map(|b| effective_backoff(b).delay(attempt));
                            e.next_attempt_at =
                                add_to_instant(now, delay.unwrap_or(config.check_interval));
                            retry_in = delay;
                        }
                    }
                }
            }
        }
        let pid = &config.process_id;
        match outcome {
            Ok(result) => {
                self.emit(
                    SupervisionEventType::RecoverySucceeded,
                    instance_id,
                    TargetType::Process,
                    json!({"process_id": pid, "attempt": attempt, "strategy": config.recovery_strategy, "result": result}),
                );
                true
            }
            Err(error) => {
                self.emit(
                    SupervisionEventType::RecoveryFailed,
                    instance_id,
                    TargetType::Process,
                    json!({"process_id": pid, "attempt": attempt, "strategy": config.recovery_strategy, "error": &error}),
                );
                if gave_up {
                    self.emit(
                        SupervisionEventType::MaxRecoveryAttemptsReached,
                        instance_id,
                        TargetType::Process,
                        json!({"process_id": pid, "attempts": attempt, "max_recovery_attempts": config.max_recovery_attempts, "error": &error}),
                    );
                } else if let (Some(delay), Some(wake)) = (retry_in, wake) {
                    let wake = wake.clone();
                    self.spawn(async move {
                        tokio::time::sleep(delay).await;
                        wake.notify_one();
                    });
                }
                false
            }
        }
    }

    fn listen_for_creations(self: &Arc<Self>, rt: &Runtime) {
        let mut sub = rt.subscribe(types::PROCESS_CREATED);
        let shared = self.clone();
        self.spawn(async move {
            while let Some(event) = sub.recv().await {
                let p = &event.payload;
                let (Some(pid), Some(id)) = (
                    p.get("process_id").and_then(Value::as_str),
                    p.get("instance_id")
                        .and_then(Value::as_str)
                        .and_then(|s| Uuid::parse_str(s).ok()),
                ) else {
                    continue;
                };
                let Some(max) = shared
                    .processes
                    .lock()
                    .get(pid)
                    .map(|w| w.config.max_recovery_attempts)
                else {
                    continue;
                };
                let context = match p.get("context") {
                    Some(c) => Some(c.clone()),
                    None => match shared.runtime().ok().map(|rt| rt.get_process(id)) {
                        Some(fut) => fut
                            .await
                            .ok()
                            .flatten()
                            .filter(|i| i.version == 1)
                            .map(|i| i.context),
                        None => None,
                    },
                };
                let mut map = shared.instances.lock();
                let entry = map.entry(id).or_insert_with(|| InstanceEntry {
                    process_id: Arc::from(pid),
                    status: new_status(id, TargetType::Process, max, HealthStatus::Healthy),
                    original_context: None,
                    in_flight: false,
                    next_attempt_at: Instant::now(),
                });
                if context.is_some() {
                    entry.original_context = context;
                }
            }
        });
    }

    // ----- tasks --------------------------------------------------------------------------

    fn start_task_loop(self: &Arc<Self>, task_id: &str) {
        if self.runtime().is_err() {
            return;
        }
        let mut watches = self.tasks.write();
        let Some(watch) = watches.get_mut(task_id) else {
            return;
        };
        if let Some(old) = watch.task.take() {
            old.abort();
        }
        let shared = self.clone();
        let config = watch.config.clone();
        let wake = watch.wake.clone();
        let cancel = self.cancel.clone();
        watch.task = Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(config.check_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                    _ = wake.notified() => {}
                }
                shared.run_due_tasks(&config, &wake);
            }
        }));
    }

    fn run_due_tasks(self: &Arc<Self>, config: &Arc<TaskSupervisionConfig>, wake: &Arc<Notify>) {
        let now = Instant::now();
        let due: Vec<Uuid> = {
            let mut ex = self.executions.lock();
            let Executions {
                entries, pending, ..
            } = &mut *ex;
            let Some(set) = pending.get_mut(config.task_id.as_str()) else {
                return;
            };
            let mut due = Vec::new();
            set.retain(|id| match entries.get_mut(id) {
                Some(e) if e.status.status == HealthStatus::Unhealthy => {
                    if !e.in_flight && e.next_attempt_at <= now {
                        e.in_flight = true;
                        due.push(*id);
                    }
                    true
                }
                Some(e) if e.status.status == HealthStatus::Recovering => true,
                _ => false,
            });
            due
        };
        for id in due {
            let shared = self.clone();
            let config = config.clone();
            let wake = wake.clone();
            self.spawn(async move {
                shared.attempt_task(&config, id, Some(&wake)).await;
            });
        }
    }

    /// Records a failed execution of a supervised task (called by the middleware).
    fn record_task_failure(&self, call: &TaskCall<'_>, error: &architectlm_core::TaskError) {
        // A cancelled execution was stopped on purpose (shutdown); an execution that ran as a
        // process action belongs to its instance, whose supervision retries it in place.
        if error.kind == TaskErrorKind::Cancelled || call.instance_id.is_some() {
            return;
        }
        let (config, wake) = {
            let tasks = self.tasks.read();
            let Some(w) = tasks.get(call.task_id) else {
                return;
            };
            (w.config.clone(), w.wake.clone())
        };
        let permanent_retry = error.kind == TaskErrorKind::Permanent
            && config.recovery_strategy == TaskRecoveryStrategy::Retry;
        {
            let mut ex = self.executions.lock();
            if ex.entries.contains_key(&call.execution_id) {
                // One of this supervisor's own recovery runs (or a caller reusing the id): its
                // outcome is handled where it was started.
                return;
            }
            let task_id: Arc<str> = Arc::from(call.task_id);
            let mut status = new_status(
                call.execution_id,
                TargetType::Task,
                config.max_recovery_attempts,
                HealthStatus::Unhealthy,
            );
            status.last_check_at = Some(self.clock.now());
            status.error = Some(error.message.clone());
            if permanent_retry {
                status.status = HealthStatus::Failed;
                ex.finished.push_back(call.execution_id);
            } else {
                ex.pending
                    .entry(task_id.clone())
                    .or_default()
                    .insert(call.execution_id);
            }
            ex.entries.insert(
                call.execution_id,
                ExecutionEntry {
                    task_id,
                    input: call.input.clone(),
                    status,
                    in_flight: false,
                    next_attempt_at: Instant::now(),
                },
            );
            self.trim_finished(&mut ex);
        }
        self.emit(
            SupervisionEventType::UnhealthyDetected,
            call.execution_id,
            TargetType::Task,
            json!({"task_id": call.task_id, "error": error, "attempts": call.attempts}),
        );
        if permanent_retry {
            self.emit(
                SupervisionEventType::RecoveryFailed,
                call.execution_id,
                TargetType::Task,
                json!({"task_id": call.task_id, "attempt": 0, "error": format!("permanent failure, not retried: {}", error.message)}),
            );
        } else {
            wake.notify_one();
        }
    }

    fn trim_finished(&self, ex: &mut Executions) {
        while ex.finished.len() > self.retained {
            if let Some(old) = ex.finished.pop_front() {
                ex.entries.remove(&old);
            }
        }
    }

    async fn attempt_task(
        &self,
        config: &TaskSupervisionConfig,
        execution_id: Uuid,
        wake: Option<&Arc<Notify>>,
    ) -> bool {
        let now_wall = self.clock.now();
        let (attempt, input, error) = {
            let mut ex = self.executions.lock();
            let Some(e) = ex.entries.get_mut(&execution_id) else {
                return false;
            };
            e.status.recovery_attempts += 1;
            e.status.status = HealthStatus::Recovering;
            e.status.last_recovery_at = Some(now_wall);
            (
                e.status.recovery_attempts,
                e.input.clone(),
                e.status.error.clone(),
            )
        };
        self.emit(
            SupervisionEventType::RecoveryStarted,
            execution_id,
            TargetType::Task,
            json!({"task_id": &config.task_id, "attempt": attempt, "strategy": config.recovery_strategy}),
        );
        let result = match self.runtime() {
            Err(e) => Err(e),
            Ok(rt) => match config.recovery_strategy {
                TaskRecoveryStrategy::Retry => {
                    let mut opts = ExecuteOptions::default();
                    opts.execution_id = Some(execution_id);
                    rt.execute(TaskRef::Id(config.task_id.clone()), input, opts)
                        .await
                }
                TaskRecoveryStrategy::Custom => match config.custom_recovery_action.as_deref() {
                    None => Err(Error::InvalidInput(
                        "no custom recovery action is configured".to_owned(),
                    )),
                    Some(task) => {
                        rt.execute_task(
                            task,
                            json!({"task_id": &config.task_id, "execution_id": execution_id, "input": input, "error": error, "attempt": attempt}),
                        )
                        .await
                    }
                },
                other => Err(Error::InvalidInput(format!(
                    "recovery strategy {other:?} is not supported by this supervisor"
                ))),
            },
        };
        let now = Instant::now();
        let mut gave_up = false;
        let mut retry_in = None;
        {
            let mut ex = self.executions.lock();
            let mut finished = false;
            if let Some(e) = ex.entries.get_mut(&execution_id) {
                e.in_flight = false;
                match &result {
                    Ok(_) => {
                        e.status.status = HealthStatus::Recovered;
                        e.status.error = None;
                        finished = true;
                    }
                    Err(err) => {
                        e.status.error = Some(err.to_string());
                        if attempt >= config.max_recovery_attempts {
                            e.status.status = HealthStatus::Failed;
                            gave_up = true;
                            finished = true;
                        } else {
                            e.status.status = HealthStatus::Unhealthy;
                            let delay = config
                                .backoff
                                .as_ref()
                                .map(|b| effective_backoff(b).delay(attempt));
                            e.next_attempt_at =
                                add_to_instant(now, delay.unwrap_or(config.check_interval));
                            retry_in = delay;
                        }
                    }
                }
            }
            if finished {
                if let Some(set) = ex.pending.get_mut(config.task_id.as_str()) {
                    set.remove(&execution_id);
                }
                ex.finished.push_back(execution_id);
                self.trim_finished(&mut ex);
            }
        }
        let tid = &config.task_id;
        match result {
            Ok(output) => {
                self.emit(
                    SupervisionEventType::RecoverySucceeded,
                    execution_id,
                    TargetType::Task,
                    json!({"task_id": tid, "attempt": attempt, "strategy": config.recovery_strategy, "result": output}),
                );
                true
            }
            Err(error) => {
                let error = error.to_string();
                self.emit(
                    SupervisionEventType::RecoveryFailed,
                    execution_id,
                    TargetType::Task,
                    json!({"task_id": tid, "attempt": attempt, "strategy": config.recovery_strategy, "error": &error}),
                );
                if gave_up {
                    self.emit(
                        SupervisionEventType::MaxRecoveryAttemptsReached,
                        execution_id,
                        TargetType::Task,
                        json!({"task_id": tid, "attempts": attempt, "max_recovery_attempts": config.max_recovery_attempts, "error": &error}),
                    );
                } else if let (Some(delay), Some(wake)) = (retry_in, wake) {
                    let wake = wake.clone();
                    self.spawn(async move {
                        tokio::time::sleep(delay).await;
                        wake.notify_one();
                    });
                }
                false
            }
        }
    }
}

/// Sees every task execution's outcome and hands failures of supervised tasks to the
/// supervisor. Successful executions cost one branch.
struct FailureWatch(Arc<Shared>);

impl TaskMiddleware for FailureWatch {
    fn after(&self, call: &TaskCall<'_>, outcome: &TaskResult) {
        if let Err(e) = outcome {
            self.0.record_task_failure(call, e);
        }
    }
}

#[async_trait]
impl Extension for Supervisor {
    fn name(&self) -> &'static str {
        EXTENSION_NAME
    }

    fn register(self: Arc<Self>, registry: &mut ServiceRegistry) {
        registry.set_supervisor(self);
    }

    async fn start(&self, runtime: Runtime) -> Result<()> {
        // Configurations given before start are checked against the system now.
        let processes: Vec<_> = self
            .shared
            .processes
            .lock()
            .values()
            .map(|w| w.config.clone())
            .collect();
        for c in &processes {
            validate_process_against(&runtime, c)?;
        }
        let tasks: Vec<_> = self
            .shared
            .tasks
            .read()
            .values()
            .map(|w| w.config.clone())
            .collect();
        for c in &tasks {
            validate_task_against(&runtime, c)?;
        }
        self.shared.runtime.set(runtime.clone()).map_err(|_| {
            Error::InvalidInput("this supervisor was already started by a runtime".to_owned())
        })?;
        runtime.add_middleware(Arc::new(FailureWatch(self.shared.clone())));
        self.shared.listen_for_creations(&runtime);
        for c in processes {
            self.shared.start_process_loop(&c.process_id);
        }
        for c in tasks {
            self.shared.start_task_loop(&c.task_id);
        }
        Ok(())
    }

    async fn shutdown(&self) {
        self.shared.cancel.cancel();
        for w in self.shared.processes.lock().values_mut() {
            if let Some(t) = w.task.take() {
                t.abort();
            }
        }
        for w in self.shared.tasks.write().values_mut() {
            if let Some(t) = w.task.take() {
                t.abort();
            }
        }
        for h in self.shared.background.lock().drain(..) {
            h.abort();
        }
    }
}

#[async_trait]
impl SupervisorContract for Supervisor {
    async fn supervise_process(&self, config: ProcessSupervisionConfig) -> Result<()> {
        validate_process_config(&config)?;
        if let Some(rt) = self.shared.runtime.get() {
            validate_process_against(rt, &config)?;
        }
        let id = config.process_id.clone();
        Watch::install(&mut self.shared.processes.lock(), id.clone(), config);
        self.shared.start_process_loop(&id);
        Ok(())
    }

    async fn supervise_task(&self, config: TaskSupervisionConfig) -> Result<()> {
        validate_task_config(&config)?;
        if let Some(rt) = self.shared.runtime.get() {
            validate_task_against(rt, &config)?;
        }
        let id = config.task_id.clone();
        Watch::install(&mut self.shared.tasks.write(), id.clone(), config);
        self.shared.start_task_loop(&id);
        Ok(())
    }

    async fn get_process_supervision_status(
        &self,
        instance_id: Uuid,
    ) -> Result<Option<SupervisionStatus>> {
        Ok(self
            .shared
            .instances
            .lock()
            .get(&instance_id)
            .map(|e| e.status.clone()))
    }

    async fn get_task_supervision_status(
        &self,
        execution_id: Uuid,
    ) -> Result<Option<SupervisionStatus>> {
        Ok(self
            .shared
            .executions
            .lock()
            .entries
            .get(&execution_id)
            .map(|e| e.status.clone()))
    }

    async fn recover_process(&self, instance_id: Uuid) -> Result<bool> {
        let rt = self.shared.runtime()?.clone();
        let instance = rt
            .get_process(instance_id)
            .await?
            .ok_or_else(|| Error::not_found("process instance", instance_id))?;
        let config = self
            .shared
            .processes
            .lock()
            .get(&*instance.process_id)
            .map(|w| w.config.clone())
            .ok_or_else(|| Error::not_found("supervised process", &*instance.process_id))?;
        {
            let mut map = self.shared.instances.lock();
            let entry = map.entry(instance_id).or_insert_with(|| InstanceEntry {
                process_id: instance.process_id.clone(),
                status: new_status(
                    instance_id,
                    TargetType::Process,
                    config.max_recovery_attempts,
                    HealthStatus::Healthy,
                ),
                original_context: Some(instance.context.clone()),
                in_flight: false,
                next_attempt_at: Instant::now(),
            });
            if entry.in_flight {
                return Ok(false);
            }
            if matches!(
                entry.status.status,
                HealthStatus::Healthy | HealthStatus::Failed
            ) {
                // A manual recovery starts a new episode.
                entry.status.recovery_attempts = 0;
            }
            entry.in_flight = true;
        }
        Ok(self
            .shared
            .attempt_process(&config, instance_id, None)
            .await)
    }

    async fn recover_task(&self, execution_id: Uuid) -> Result<bool> {
        self.shared.runtime()?;
        let config = {
            let mut ex = self.shared.executions.lock();
            let entry = ex.entries.get_mut(&execution_id).ok_or_else(|| {
                Error::not_found("failed execution of a supervised task", execution_id)
            })?;
            if entry.in_flight {
                return Ok(false);
            }
            let task_id = entry.task_id.clone();
            let config = self
                .shared
                .tasks
                .read()
                .get(&*task_id)
                .map(|w| w.config.clone())
                .ok_or_else(|| Error::not_found("supervised task", &*task_id))?;
            if entry.status.status == HealthStatus::Failed {
                entry.status.recovery_attempts = 0;
            }
            entry.in_flight = true;
            entry.status.status = HealthStatus::Unhealthy;
            ex.finished.retain(|id| *id != execution_id);
            ex.pending.entry(task_id).or_default().insert(execution_id);
            config
        };
        Ok(self.shared.attempt_task(&config, execution_id, None).await)
    }

    fn on_supervision_event(
        &self,
        filter: EventFilter,
        handler: SupervisionEventHandler,
    ) -> EventSubscription {
        self.shared.events.on(filter, move |e| handler(e))
    }
}
