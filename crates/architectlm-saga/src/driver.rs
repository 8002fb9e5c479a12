//! Drives one saga instance: forward through its step groups, or backward through the undo
//! stack, journaling every move before making the next one.
//!
//! # Journal discipline
//! - Before a group of steps runs, one journal entry marks them `running` (and carries the
//!   results of the previous group, if those were not journaled yet).
//! - A step's result is journaled at the latest together with the next group's start, and always
//!   before that group runs.
//! - Events are published after the journal entry that makes them true is durable.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use futures::FutureExt;
use futures::future::{BoxFuture, join_all};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use architectlm_core::extensions::saga::{
    SagaEvent, SagaEventType, SagaStatus, SagaStep, SagaStepStatus,
};
use architectlm_core::{
    Error, ExecuteOptions, Result, RetryPolicy, Runtime, TaskContext, TaskErrorKind, TaskHandler,
    TaskOrigin, TaskRef, TaskResult,
};
use architectlm_store::saga::{SagaUpdate, StoredSaga};

use crate::coordinator::{Control, Inner};
use crate::definition::Prepared;
use crate::state::State;

/// How a run ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Ended {
    /// The saga reached a terminal status.
    Finished,
    /// Shutdown stopped it; recovery carries it on.
    Stopped,
}

enum Forward {
    Done,
    Unwind(String),
    Stopped,
}

/// What one execution of a step's action or compensation gave.
enum Exec {
    Ok(Value, u32),
    Failed(String, u32),
    Stopped,
}

/// Counts attempts: the runtime retries inside `execute`, and the timeline shows them.
struct Counting {
    inner: Arc<dyn TaskHandler>,
    attempts: AtomicU32,
}

impl TaskHandler for Counting {
    fn call(&self, input: Value, ctx: TaskContext) -> BoxFuture<'static, TaskResult> {
        self.attempts.fetch_max(ctx.attempt(), Ordering::Relaxed);
        self.inner.call(input, ctx)
    }
}

pub(crate) struct Run {
    inner: Arc<Inner>,
    runtime: Runtime,
    prep: Arc<Prepared>,
    inst: State,
    fencing: u64,
    control: Arc<Control>,
    /// Events waiting for the journal entry that makes them true. Boxed: a driver without
    /// listeners never has any, and a waiting saga keeps this field.
    #[allow(clippy::box_collection)] // One pointer in place of a vector's three words.
    events: Option<Box<Vec<SagaEvent>>>,
    deadline: Option<Instant>,
    listening: bool,
    /// Created by `start_saga` just now (already journaled as running): still owes
    /// `saga-started`.
    fresh: bool,
}

impl Run {
    pub(crate) fn new(
        inner: Arc<Inner>,
        runtime: Runtime,
        prep: Arc<Prepared>,
        stored: StoredSaga,
        control: Arc<Control>,
    ) -> Self {
        if let Some(reason) = stored.compensation_requested.clone() {
            control.request(reason);
        }
        let deadline = prep.timeout().map(|t| {
            // The deadline counts from the durable start time, so it survives restarts.
            let elapsed = (crate::now() - stored.instance.started_at)
                .to_std()
                .unwrap_or_default();
            architectlm_core::time::add_to_instant(Instant::now(), t.saturating_sub(elapsed))
        });
        let inst = State::new(stored.instance, &prep);
        Self {
            inner,
            runtime,
            prep,
            inst,
            fencing: stored.fencing,
            control,
            events: None,
            deadline,
            listening: false,
            fresh: false,
        }
    }

    /// Marks an instance `start_saga` just created (see [`Run::fresh`]).
    pub(crate) fn fresh(mut self, fresh: bool) -> Self {
        self.fresh = fresh;
        self
    }

    fn event(&mut self, t: SagaEventType, step: Option<usize>, payload: impl FnOnce() -> Value) {
        if !self.listening {
            return;
        }
        let step_id = step.map(|i| self.prep.def.steps[i].id.clone());
        self.events.get_or_insert_default().push(SagaEvent::new(
            t,
            self.prep.def.id.clone(),
            self.inst.id,
            step_id,
            payload(),
        ));
    }

    fn touch(&mut self, i: usize) {
        self.inst.steps[i].dirty = true;
    }

    /// Writes the pending journal entry, then publishes the events it made true.
    async fn journal(&mut self) -> Result<()> {
        let mut up = SagaUpdate::new(self.inst.id, self.fencing, self.inst.status);
        up.error = self.inst.error.as_deref().map(str::to_owned);
        up.completed_at = self.inst.completed_at;
        up.steps = self.inst.take_dirty(&self.prep);
        self.inner.store.apply(up).await?;
        self.publish_events();
        Ok(())
    }

    fn publish_events(&mut self) {
        if let Some(events) = self.events.take() {
            for e in *events {
                self.inner.emit(&self.runtime, e);
            }
        }
        self.listening = self.inner.listening(&self.runtime);
    }

    fn stopping(&self) -> bool {
        self.inner.stop.is_cancelled() || self.runtime.is_shutting_down()
    }

    /// Drives the instance to its end (or to shutdown).
    ///
    /// An `async` block rather than an `async fn`, which would copy the driver into a local
    /// and keep both copies for as long as the saga waits.
    #[allow(clippy::manual_async_fn)] // Deliberately not an `async fn` (see above).
    pub(crate) fn run(mut self) -> impl Future<Output = Result<Ended>> + Send {
        async move { self.drive().await }
    }

    async fn drive(&mut self) -> Result<Ended> {
        self.listening = self.inner.listening(&self.runtime);
        if self.inst.status == SagaStatus::Created || self.fresh {
            self.inst.status = SagaStatus::Running;
            let input = self.inst.input.value();
            let version = self.prep.def.version;
            self.event(
                SagaEventType::SagaStarted,
                None,
                || json!({"input": input, "version": version}),
            );
        }
        if self.inst.status == SagaStatus::Running {
            // Boxed: the driver parks inside a step for long, and a boxed inner future takes only
            // the memory of the path it is on.
            // Bound first: the `?` temporary then does not outlive this statement.
            let forward = Box::pin(self.forward()).await?;
            match forward {
                Forward::Done => return Box::pin(self.complete()).await,
                Forward::Stopped => return Box::pin(self.stop()).await,
                Forward::Unwind(reason) => {
                    self.inst.status = SagaStatus::Compensating;
                    self.inst.error = Some(reason.into());
                }
            }
        }
        if self.inst.status == SagaStatus::Compensating {
            return Box::pin(self.unwind()).await;
        }
        Ok(Ended::Finished)
    }

    /// Journals the completion (with the last results) and announces it.
    async fn complete(&mut self) -> Result<Ended> {
        self.inst.status = SagaStatus::Completed;
        self.inst.completed_at = Some(crate::now());
        let ctx = self.results();
        self.event(
            SagaEventType::SagaCompleted,
            None,
            || json!({"results": ctx}),
        );
        self.journal().await?;
        Ok(Ended::Finished)
    }

    async fn stop(&mut self) -> Result<Ended> {
        if self.inst.has_dirty() {
            self.journal().await?;
        }
        Ok(Ended::Stopped)
    }

    /// The results of the completed steps by step id.
    fn results(&self) -> Value {
        Value::Object(self.inst.results(&self.prep))
    }

    fn timed_out(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    fn timeout_reason(&self) -> String {
        format!(
            "saga \"{}\" timed out after {:?}",
            self.prep.def.id,
            self.prep.timeout().unwrap_or_default()
        )
    }

    async fn forward(&mut self) -> Result<Forward> {
        let prep = self.prep.clone();
        for g in prep.groups.iter().cloned() {
            let todo: Vec<usize> = g
                .filter(|&i| self.inst.steps[i].status != SagaStepStatus::Completed)
                .collect();
            if todo.is_empty() {
                continue;
            }
            // A step that was running at a crash may have taken effect: it runs again (at
            // least once) before any unwind, so that its result can be compensated.
            let resuming = todo
                .iter()
                .any(|&i| self.inst.steps[i].status == SagaStepStatus::Running);
            if !resuming {
                if let Some(reason) = self.control.requested() {
                    return Ok(Forward::Unwind(format!("compensation requested: {reason}")));
                }
                if self.timed_out() {
                    return Ok(Forward::Unwind(self.timeout_reason()));
                }
            }
            if self.stopping() {
                return Ok(Forward::Stopped);
            }
            // Steps already journaled as running (by `start_saga`, or before a crash) need no
            // new entry unless results of earlier steps wait to be journaled.
            let journaled = !self.inst.has_dirty()
                && resuming
                && todo
                    .iter()
                    .all(|&i| self.inst.steps[i].status == SagaStepStatus::Running);
            let now = crate::now();
            for &i in &todo {
                let s = &mut self.inst.steps[i];
                if !journaled {
                    s.status = SagaStepStatus::Running;
                    s.started_at = Some(now);
                    s.completed_at = None;
                    s.error = None;
                }
                let attempts = s.attempts;
                if !journaled {
                    self.touch(i);
                }
                self.event(
                    SagaEventType::StepStarted,
                    Some(i),
                    || json!({"attempts_before": attempts}),
                );
            }
            if journaled {
                self.publish_events();
            } else {
                // Boxed, like the other awaits of the driver that are not the step itself: the
                // future of a saga waiting in a step is then no larger than that wait needs.
                Box::pin(self.journal()).await?;
            }

            // Built here and moved into the step's execution: the driver keeps no copy of it
            // while the step runs.
            let mut input = serde_json::Map::new();
            input.insert("input".to_owned(), self.inst.input.value());
            input.insert("results".to_owned(), self.results());
            let (outcomes, timed_out) = self.run_group(&todo, Value::Object(input), false).await;
            if outcomes.iter().any(|(_, o)| matches!(o, Exec::Stopped)) {
                // The steps stay `running` in the journal; recovery runs them again.
                return Ok(Forward::Stopped);
            }
            let now = crate::now();
            let mut failure = None;
            for (i, o) in outcomes {
                let o = self.checked_output(i, o);
                let s = &mut self.inst.steps[i];
                match o {
                    Exec::Ok(v, n) => {
                        s.status = SagaStepStatus::Completed;
                        s.attempts += n;
                        s.completed_at = Some(now);
                        s.result = Some(Box::new(v));
                        let attempts = s.attempts;
                        self.touch(i);
                        self.event(
                            SagaEventType::StepCompleted,
                            Some(i),
                            || json!({"attempts": attempts}),
                        );
                    }
                    Exec::Failed(msg, n) => {
                        s.status = SagaStepStatus::Failed;
                        s.attempts += n;
                        s.completed_at = Some(now);
                        s.error = Some(msg.as_str().into());
                        let attempts = s.attempts;
                        let step_id = &self.prep.def.steps[i].id;
                        failure.get_or_insert_with(|| format!("step \"{step_id}\" failed: {msg}"));
                        self.touch(i);
                        let m = msg;
                        self.event(
                            SagaEventType::StepFailed,
                            Some(i),
                            || json!({"attempts": attempts, "error": m}),
                        );
                    }
                    Exec::Stopped => {}
                }
            }
            if timed_out {
                return Ok(Forward::Unwind(self.timeout_reason()));
            }
            if let Some(reason) = failure {
                return Ok(Forward::Unwind(reason));
            }
        }
        Ok(Forward::Done)
    }

    /// A step's output is journaled, so one nested deeper than the journal can read back
    /// ([`MAX_JSON_DEPTH`](architectlm_core::json::MAX_JSON_DEPTH)) fails the step, without a
    /// retry, and the saga compensates.
    fn checked_output(&self, i: usize, o: Exec) -> Exec {
        use architectlm_core::json::{MAX_JSON_DEPTH, check_depth};
        match o {
            Exec::Ok(v, n) if check_depth(&v, "step output").is_err() => Exec::Failed(
                format!(
                    "step \"{}\" output is nested more than {MAX_JSON_DEPTH} levels deep (the \
                     limit of architectlm_core::json::MAX_JSON_DEPTH), so it could not be \
                     journaled and read back",
                    self.prep.def.steps[i].id
                ),
                n,
            ),
            o => o,
        }
    }

    async fn unwind(&mut self) -> Result<Ended> {
        let prep = self.prep.clone();
        for g in prep.groups.iter().rev().cloned() {
            let todo: Vec<usize> = g
                .filter(|&i| {
                    let step = &self.prep.def.steps[i];
                    step.compensation.is_some()
                        && match self.inst.steps[i].status {
                            SagaStepStatus::Completed
                            | SagaStepStatus::Compensating
                            | SagaStepStatus::CompensationFailed => true,
                            // A step that may have taken effect before failing: it is
                            // compensated first, as the last step of the undo stack.
                            SagaStepStatus::Failed => step.compensate_on_failure,
                            _ => false,
                        }
                })
                .collect();
            if todo.is_empty() {
                continue;
            }
            if self.stopping() {
                return self.stop().await;
            }
            for &i in &todo {
                self.inst.steps[i].status = SagaStepStatus::Compensating;
                self.touch(i);
                let result = self.inst.steps[i].result.clone();
                self.event(
                    SagaEventType::CompensationStarted,
                    Some(i),
                    || json!({"result": result}),
                );
            }
            self.journal().await?;
            let (outcomes, _) = self.run_group(&todo, Value::Null, true).await;
            if outcomes.iter().any(|(_, o)| matches!(o, Exec::Stopped)) {
                return Ok(Ended::Stopped);
            }
            let now = crate::now();
            let mut failure = None;
            for (i, o) in outcomes {
                let s = &mut self.inst.steps[i];
                match o {
                    Exec::Ok(_, n) => {
                        s.status = SagaStepStatus::Compensated;
                        s.compensation_attempts += n;
                        s.completed_at = Some(now);
                        s.error = None;
                        let attempts = s.compensation_attempts;
                        self.touch(i);
                        self.event(
                            SagaEventType::CompensationCompleted,
                            Some(i),
                            || json!({"attempts": attempts}),
                        );
                    }
                    Exec::Failed(msg, n) => {
                        s.status = SagaStepStatus::CompensationFailed;
                        s.compensation_attempts += n;
                        s.completed_at = Some(now);
                        s.error = Some(msg.as_str().into());
                        let attempts = s.compensation_attempts;
                        let step_id = &self.prep.def.steps[i].id;
                        failure.get_or_insert_with(|| {
                            format!("compensation of step \"{step_id}\" failed: {msg}")
                        });
                        self.touch(i);
                        let m = msg;
                        self.event(
                            SagaEventType::CompensationFailed,
                            Some(i),
                            || json!({"attempts": attempts, "error": m}),
                        );
                    }
                    Exec::Stopped => {}
                }
            }
            if let Some(f) = failure {
                let cause = self.inst.error.take().unwrap_or_default();
                self.inst.status = SagaStatus::CompensationFailed;
                self.inst.error = Some(format!("{f} (unwinding because {cause})").into());
                self.inst.completed_at = Some(crate::now());
                let error = self.inst.error.clone();
                self.event(
                    SagaEventType::SagaFailed,
                    None,
                    || json!({"status": SagaStatus::CompensationFailed, "error": error}),
                );
                self.journal().await?;
                return Ok(Ended::Finished);
            }
        }
        let undid_work = self.inst.steps.iter().any(|s| {
            matches!(
                s.status,
                SagaStepStatus::Compensated | SagaStepStatus::Completed
            )
        });
        let step_failed = self
            .inst
            .steps
            .iter()
            .any(|s| s.status == SagaStepStatus::Failed);
        // `failed` means a step failed before anything was done: there was nothing to undo.
        self.inst.status = if step_failed && !undid_work {
            SagaStatus::Failed
        } else {
            SagaStatus::Compensated
        };
        self.inst.completed_at = Some(crate::now());
        let (status, error) = (self.inst.status, self.inst.error.clone());
        self.event(
            SagaEventType::SagaFailed,
            None,
            || json!({"status": status, "error": error}),
        );
        self.journal().await?;
        Ok(Ended::Finished)
    }

    /// Runs the actions (or compensations) of `todo` together. Returns the outcomes and
    /// whether the saga's deadline passed while they ran (the steps were then asked to stop).
    ///
    /// Returns a boxed future built for the case at hand: a saga parks here for as long as
    /// its step runs, so a single step without a deadline carries no join or timer state.
    fn run_group<'a>(
        &'a self,
        todo: &[usize],
        input: Value,
        compensate: bool,
    ) -> BoxFuture<'a, (Vec<(usize, Exec)>, bool)> {
        let token = (!compensate && self.deadline.is_some())
            .then(|| self.runtime.cancellation().child_token());
        // The last step of the group takes the input itself; the others get copies.
        let mut input = Some(input);
        let last = todo.len().saturating_sub(1);
        let mut execs: Vec<BoxFuture<'static, (usize, Exec)>> = todo
            .iter()
            .enumerate()
            .map(|(n, &i)| {
                let step = &self.prep.def.steps[i];
                let rec = &self.inst.steps[i];
                let id = self.inst.id;
                let (task, retry, timeout, key, input, execution_id) = if compensate {
                    (
                        step.compensation.clone(),
                        step.compensation_retry.clone(),
                        None,
                        format!("{}:compensation", rec.key(id, &step.id)),
                        rec.result.as_deref().cloned().unwrap_or(Value::Null),
                        None,
                    )
                } else {
                    (
                        Some(step.action.clone()),
                        step.retry.clone(),
                        step.timeout,
                        rec.key(id, &step.id).into_owned(),
                        if n == last {
                            input.take().unwrap_or(Value::Null)
                        } else {
                            input.clone().unwrap_or(Value::Null)
                        },
                        Some(rec.id),
                    )
                };
                let origin = TaskOrigin::SagaStep {
                    saga_id: self.prep.saga_id.clone(),
                    instance_id: id,
                    step_id: self.prep.step_ids[i].clone(),
                    compensation: compensate,
                };
                execute(
                    &self.runtime,
                    i,
                    step,
                    task,
                    retry,
                    timeout,
                    key,
                    input,
                    execution_id,
                    token.clone(),
                    origin,
                )
            })
            .collect();
        if execs.len() == 1
            && token.is_none()
            && let Some(only) = execs.pop()
        {
            return only.map(|out| (vec![out], false)).boxed();
        }
        let deadline = self.deadline;
        Box::pin(async move {
            let all = join_all(execs);
            match (deadline, token) {
                (Some(deadline), Some(token)) => {
                    tokio::pin!(all);
                    tokio::select! {
                        out = &mut all => (out, false),
                        () = tokio::time::sleep_until(deadline) => {
                            // Steps are asked to stop; each ends when it notices (or finishes).
                            token.cancel();
                            (all.await, true)
                        }
                    }
                }
                _ => (all.await, false),
            }
        })
    }
}

/// Prepares the execution of step `i` and returns it as one boxed future.
///
/// Not an `async fn`: the preparation runs now, so the future a parked saga keeps holds only
/// the runtime's execution and what is needed to read its outcome (an `async fn` would also
/// keep its arguments and their copies for as long as the step runs).
#[allow(clippy::too_many_arguments)] // One call site; the arguments are the step's settings.
fn execute(
    runtime: &Runtime,
    i: usize,
    step: &SagaStep,
    task: Option<TaskRef>,
    retry: Option<RetryPolicy>,
    timeout: Option<std::time::Duration>,
    key: String,
    input: Value,
    execution_id: Option<Uuid>,
    cancel: Option<CancellationToken>,
    origin: TaskOrigin,
) -> BoxFuture<'static, (usize, Exec)> {
    let Some(task) = task else {
        return Box::pin(std::future::ready((i, Exec::Ok(Value::Null, 0))));
    };
    let (name, handler, retry, timeout) = match task {
        TaskRef::Id(id) => match runtime.system().tasks.get(id.as_str()) {
            Some(def) => (
                Arc::<str>::from(id.as_str()),
                def.handler.clone(),
                retry.or_else(|| def.retry.clone()),
                timeout.or(def.timeout),
            ),
            None => {
                let msg = format!("step \"{}\" names unknown task \"{id}\"", step.id);
                return Box::pin(std::future::ready((i, Exec::Failed(msg, 0))));
            }
        },
        TaskRef::Handler { name, handler } => (name, handler, retry, timeout),
    };
    // One allocation: the runtime holds the handler, the driver reads its count.
    let counting = Arc::new(Counting {
        inner: handler,
        attempts: AtomicU32::new(0),
    });
    let counted = TaskRef::Handler {
        name,
        handler: counting.clone(),
    };
    let mut opts = ExecuteOptions::default();
    opts.retry = retry;
    opts.timeout = timeout;
    opts.idempotency_key = Some(key);
    opts.cancel = cancel;
    opts.execution_id = execution_id;
    opts.origin = Some(Arc::new(origin));
    // Started here, so the boxed future holds the execution only (not also its arguments).
    let running = runtime.execute(counted, input, opts);
    let runtime = runtime.clone();
    // A map, not an `async` block: the block would hold the execution twice (as its capture
    // and as the future it awaits).
    let fut = running.map(move |out| {
        let n = counting.attempts.load(Ordering::Relaxed);
        let exec = match out {
            Ok(v) => Exec::Ok(v, n),
            Err(Error::ShuttingDown) => Exec::Stopped,
            Err(Error::TaskFailed { error, .. })
                if error.kind == TaskErrorKind::Cancelled && runtime.is_shutting_down() =>
            {
                Exec::Stopped
            }
            Err(Error::TaskFailed { error, .. }) => Exec::Failed(error.message, n),
            Err(e) => Exec::Failed(e.to_string(), n),
        };
        (i, exec)
    });
    Box::pin(fut)
}
