//! The supervisor loop: one Tokio task per supervisor owns its children's state, reacts to
//! exits, fires one timer for heartbeats, backoff delays and kill deadlines, and answers the
//! handle's commands.
//!
//! **Invariants.**
//! - Only the loop touches children's state, so no lock is taken on the restart path: a
//!   worker's exit travels as one message from its task to the loop, which spawns the
//!   replacement.
//! - Every start bumps the child's *generation*; an exit message of an older generation (a run
//!   the loop already stopped or aborted) is ignored, so an exit is handled exactly once.
//! - One timer per supervisor, armed at the earliest of: the next heartbeat deadline, the next
//!   delayed restart, the next kill deadline. Heartbeats are one atomic store by the worker; the
//!   loop reads them only when the timer fires, so 10 000 heartbeating workers cost the loop one
//!   scan per deadline period, not one wake-up per beat.
//! - Dropping the loop (its task aborted by a parent) aborts every child task it owns.
//! - Each poll of the loop runs inside a `worker-supervisor` tracing span (debug level) with
//!   the supervisor's path, so the loop's own CPU time can be told apart from its workers'.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use architectlm_core::time::add_to_instant;
use architectlm_core::{Error, EventHub, Result};
use chrono::{DateTime, Utc};
use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::context::{Beat, WorkerContext};
use super::spec::{
    ChildKind, ChildSpec, Restart, RestartBackoff, Strategy, SupervisorSpec, WorkerResult,
};
use super::status::{
    ChildCounts, ChildKindName, ChildShutdown, ChildState, ChildStatus, ExitReason, ShutdownReport,
    StopOutcome, TreeExit, WorkerEvent, WorkerEventKind,
};

pub(crate) enum Command {
    Children(oneshot::Sender<Vec<(ChildStatus, Option<SupervisorRef>)>>),
    Shutdown(oneshot::Sender<ShutdownReport>),
    StartChild(ChildSpec, oneshot::Sender<Result<()>>),
    TerminateChild(String, oneshot::Sender<Result<StopOutcome>>),
    RestartChild(String, oneshot::Sender<Result<()>>),
    DeleteChild(String, oneshot::Sender<Result<()>>),
    CountChildren(oneshot::Sender<ChildCounts>),
}

/// A way to talk to a running supervisor loop.
#[derive(Clone)]
pub(crate) struct SupervisorRef {
    pub(crate) tx: mpsc::UnboundedSender<Command>,
}

struct ExitMsg {
    slot: Slot,
    generation: u64,
    reason: ExitReason,
}

/// A child's position in its supervisor's list, shared with its running task's exit guard: the
/// list is compacted when ended temporary children leave, and the exit of a child that moved
/// must still find it. `usize::MAX` once the child left.
type Slot = Arc<AtomicUsize>;

const GONE: usize = usize::MAX;

/// Sends the child's exit when its task ends, however it ends: [`send`](Self::send) when the
/// run returned or panicked, on drop (as [`ExitReason::Killed`]) when the task was aborted.
pub(crate) struct ExitGuard {
    tx: Option<mpsc::UnboundedSender<ExitMsg>>,
    slot: Slot,
    generation: u64,
}

impl ExitGuard {
    pub(crate) fn send(mut self, reason: ExitReason) {
        self.send_once(reason);
    }

    fn send_once(&mut self, reason: ExitReason) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(ExitMsg {
                slot: self.slot.clone(),
                generation: self.generation,
                reason,
            });
        }
    }
}

impl Drop for ExitGuard {
    fn drop(&mut self) {
        self.send_once(ExitReason::Killed { timeout_ms: 0 });
    }
}

/// How a worker's run ended, from its `catch_unwind` outcome.
pub(crate) fn worker_exit(outcome: std::thread::Result<WorkerResult>) -> ExitReason {
    match outcome {
        Ok(Ok(())) => ExitReason::Normal,
        Ok(Err(e)) => match e.downcast_ref::<super::spec::Shutdown>() {
            Some(s) => {
                tracing::debug!(reason = s.reason(), "worker asked to shut down");
                ExitReason::Shutdown
            }
            None => ExitReason::Failed {
                error: e.to_string(),
            },
        },
        Err(p) => ExitReason::Panicked {
            message: panic_message(&*p),
        },
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

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// One child's state, kept small: a supervisor holds one per child, idle or not.
struct Child {
    spec: ChildSpec,
    slot: Slot,
    generation: u64,
    restart_count: u32,
    consecutive: u32,
    state: ChildState,
    ever_started: bool,
    /// Stopped by `terminate_child`: under rest-for-one its dependents wait for it.
    held: bool,
    /// The current run was cancelled for a missed heartbeat: its exit is a hang.
    hung: bool,
    last_exit: Option<ExitReason>,
    started_at: Option<Instant>,
    /// In [`ChildState::Restarting`], when to start it again; in [`ChildState::Stopping`]
    /// after a missed heartbeat, when to abort it. Never both at once.
    deadline: Option<Instant>,
    cancel: Option<CancellationToken>,
    join: Option<JoinHandle<()>>,
    beat: Option<Arc<Beat>>,
    sub: Option<SupervisorRef>,
}

impl Child {
    fn new(spec: ChildSpec, idx: usize) -> Self {
        Self {
            spec,
            slot: Arc::new(AtomicUsize::new(idx)),
            generation: 0,
            restart_count: 0,
            consecutive: 0,
            state: ChildState::Stopped,
            ever_started: false,
            held: false,
            hung: false,
            last_exit: None,
            started_at: None,
            deadline: None,
            cancel: None,
            join: None,
            beat: None,
            sub: None,
        }
    }

    fn restart_at(&self) -> Option<Instant> {
        self.deadline
            .filter(|_| self.state == ChildState::Restarting)
    }

    fn kill_at(&self) -> Option<Instant> {
        self.deadline.filter(|_| self.state == ChildState::Stopping)
    }

    /// Running, stopping or waiting to restart: part of a group restart.
    fn is_live(&self) -> bool {
        self.state != ChildState::Stopped
    }

    /// `epoch` and `wall` are the same moment on the monotonic and the wall clock: the wall
    /// time of a start is derived from them rather than read at every start.
    fn status(&self, epoch: Instant, wall: DateTime<Utc>) -> ChildStatus {
        ChildStatus {
            name: self.spec.name().to_owned(),
            kind: match self.spec.kind {
                ChildKind::Worker(_) => ChildKindName::Worker,
                ChildKind::Supervisor(_) => ChildKindName::Supervisor,
            },
            restart: self.spec.restart,
            state: self.state,
            restart_count: self.restart_count,
            consecutive_failures: self.consecutive,
            last_exit: self.last_exit.clone(),
            started_at: self.started_at.map(|s| {
                wall + chrono::TimeDelta::from_std(s.saturating_duration_since(epoch))
                    .unwrap_or_default()
            }),
            children: Vec::new(),
        }
    }
}

fn min_opt(a: Option<Instant>, b: Instant) -> Option<Instant> {
    Some(a.map_or(b, |a| a.min(b)))
}

struct Actor {
    path: Arc<str>,
    strategy: Strategy,
    max_restarts: u32,
    period: Duration,
    count_delayed: bool,
    children: Vec<Child>,
    /// Each child's position by name, to refuse a duplicate and find a child in O(1). Built
    /// by the first command that needs it: the spec's names were already checked by its
    /// builder, and a tree that is never changed at run time never pays for it.
    names: Option<HashMap<Box<str>, usize>>,
    /// Children that left (ended temporary ones) and wait for the next compaction.
    gone: usize,
    restarts: VecDeque<Instant>,
    events: EventHub<WorkerEvent>,
    exit_tx: mpsc::UnboundedSender<ExitMsg>,
    cancel: CancellationToken,
    epoch: Instant,
    /// `epoch` on the wall clock.
    wall_epoch: DateTime<Utc>,
    next_hb: Option<Instant>,
    next_restart: Option<Instant>,
    next_kill: Option<Instant>,
}

impl Drop for Actor {
    fn drop(&mut self) {
        for c in &mut self.children {
            if let Some(j) = c.join.take() {
                j.abort();
            }
        }
    }
}

/// Builds the loop of a supervisor; the future ends when the supervisor stops.
pub(crate) fn tree(
    spec: Arc<SupervisorSpec>,
    cancel: CancellationToken,
    events: EventHub<WorkerEvent>,
    parent: Option<&str>,
) -> (SupervisorRef, BoxFuture<'static, TreeExit>) {
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let (exit_tx, exit_rx) = mpsc::unbounded_channel();

    let path_name = spec.name.clone();
    let strategy = spec.strategy;
    let intensity = spec.intensity;
    let count_delayed = spec.count_delayed_restarts;
    // The root owns its spec alone and moves the children out of it; a nested supervisor
    // shares its spec with its parent (which needs it for the next incarnation) and copies.
    let children: Vec<Child> = match Arc::try_unwrap(spec) {
        Ok(owned) => owned
            .children
            .into_iter()
            .enumerate()
            .map(|(i, c)| Child::new(c, i))
            .collect(),
        Err(shared) => shared
            .children
            .iter()
            .enumerate()
            .map(|(i, c)| Child::new(c.clone_spec(), i))
            .collect(),
    };
    let path: Arc<str> = match parent {
        Some(p) => Arc::from(format!("{p}/{path_name}")),
        None => path_name,
    };
    let mut actor = Actor {
        path,
        strategy,
        max_restarts: intensity.max_restarts,
        period: intensity.period,
        count_delayed,
        names: None,
        gone: 0,
        children,
        restarts: VecDeque::new(),
        events,
        exit_tx,
        cancel,
        epoch: Instant::now(),
        wall_epoch: Utc::now(),
        next_hb: None,
        next_restart: None,
        next_kill: None,
    };
    // Every poll of the loop runs in this span: a subscriber can time the supervisor's own
    // work apart from its workers', and the loop's log events carry the supervisor's path.
    let span = tracing::debug_span!("worker-supervisor", supervisor = %actor.path);
    // The children start here, on the caller's thread, rather than at the loop's first poll:
    // when the caller is not the worker that will run the loop (the root started from
    // `block_on`, or from another task), the runtime's workers run the first children while
    // the caller still spawns the last ones. Their exits wait in the channel for the loop; if
    // the loop is dropped unpolled, dropping the actor aborts them.
    span.in_scope(|| actor.start_all());
    (
        SupervisorRef { tx: cmd_tx },
        Box::pin(actor.run(cmd_rx, exit_rx).instrument(span)),
    )
}

impl ChildSpec {
    /// A copy for a running child: the factory and nested specs are shared.
    pub(crate) fn clone_spec(&self) -> ChildSpec {
        ChildSpec {
            kind: match &self.kind {
                ChildKind::Worker(f) => ChildKind::Worker(f.clone()),
                ChildKind::Supervisor(s) => ChildKind::Supervisor(s.clone()),
            },
            restart: self.restart,
            backoff: self.backoff.clone(),
            heartbeat: self.heartbeat,
            shutdown_timeout: self.shutdown_timeout,
        }
    }
}

impl Actor {
    /// Publishes an event; `kind` is only called when someone listens.
    fn emit(&self, child: Option<&str>, kind: impl FnOnce() -> WorkerEventKind) {
        self.events.publish_with(|| WorkerEvent {
            supervisor: self.path.to_string(),
            child: child.map(str::to_owned),
            timestamp: Utc::now(),
            kind: kind(),
        });
    }

    async fn run(
        mut self,
        mut cmd_rx: mpsc::UnboundedReceiver<Command>,
        mut exit_rx: mpsc::UnboundedReceiver<ExitMsg>,
    ) -> TreeExit {
        let far = || Instant::now() + Duration::from_secs(86_400 * 365);
        let sleep = tokio::time::sleep_until(far());
        tokio::pin!(sleep);
        let mut armed: Option<Instant> = None;
        let mut commands_open = true;
        // Pinned once: re-creating it at every turn of the loop would register and unregister
        // a waiter on the token each time.
        let cancelled = self.cancel.clone().cancelled_owned();
        tokio::pin!(cancelled);
        loop {
            let next = [self.next_hb, self.next_restart, self.next_kill]
                .into_iter()
                .flatten()
                .min();
            if next != armed {
                sleep.as_mut().reset(next.unwrap_or_else(far));
                armed = next;
            }
            tokio::select! {
                biased;
                _ = &mut cancelled => {
                    self.stop_all().await;
                    return self.finish(TreeExit::Shutdown);
                }
                Some(msg) = exit_rx.recv() => {
                    if let Some(exit) = self.on_exit(msg).await {
                        return self.finish(exit);
                    }
                    self.compact();
                }
                cmd = cmd_rx.recv(), if commands_open => match cmd {
                    None => commands_open = false,
                    Some(Command::Shutdown(reply)) => {
                        let report = self.stop_all().await;
                        let _ = reply.send(report);
                        return self.finish(TreeExit::Shutdown);
                    }
                    Some(Command::Children(reply)) => {
                        let list = self
                            .children
                            .iter()
                            .filter(|c| !Self::is_gone(c))
                            .map(|c| (c.status(self.epoch, self.wall_epoch), c.sub.clone()))
                            .collect();
                        let _ = reply.send(list);
                    }
                    Some(Command::StartChild(spec, reply)) => {
                        let _ = reply.send(self.add_child(spec));
                    }
                    Some(Command::TerminateChild(name, reply)) => {
                        let found = self.names().get(name.as_str()).copied();
                        let result = match found {
                            None => Err(Error::not_found("child", &name)),
                            Some(i) => {
                                let outcome = self.stop_child(i).await;
                                if self.children[i].spec.restart == Restart::Temporary {
                                    self.remove(i);
                                } else {
                                    self.children[i].held = true;
                                }
                                Ok(outcome)
                            }
                        };
                        let _ = reply.send(result);
                        self.compact();
                    }
                    Some(Command::RestartChild(name, reply)) => {
                        let found = self.names().get(name.as_str()).copied();
                        let result = match found {
                            None => Err(Error::not_found("child", &name)),
                            Some(i) if self.children[i].state != ChildState::Stopped => {
                                Err(Error::invalid_config(
                                    "child",
                                    format!("{name:?}"),
                                    format!("is {:?}, not stopped: only a stopped child is restarted", self.children[i].state),
                                ))
                            }
                            Some(i) => {
                                self.start(i);
                                // Dependents waiting for it (rest-for-one) may start now.
                                if self.strategy == Strategy::RestForOne {
                                    self.start_waiting_dependents(Instant::now());
                                }
                                Ok(())
                            }
                        };
                        let _ = reply.send(result);
                    }
                    Some(Command::DeleteChild(name, reply)) => {
                        let found = self.names().get(name.as_str()).copied();
                        let result = match found {
                            None => Err(Error::not_found("child", &name)),
                            Some(i) if self.children[i].state != ChildState::Stopped => {
                                Err(Error::invalid_config(
                                    "child",
                                    format!("{name:?}"),
                                    format!("is {:?}: terminate it before deleting it", self.children[i].state),
                                ))
                            }
                            Some(i) => {
                                self.remove(i);
                                Ok(())
                            }
                        };
                        let _ = reply.send(result);
                        self.compact();
                    }
                    Some(Command::CountChildren(reply)) => {
                        let mut n = ChildCounts::default();
                        for c in self.children.iter().filter(|c| !Self::is_gone(c)) {
                            n.specs += 1;
                            n.active += usize::from(c.state == ChildState::Running);
                            match c.spec.kind {
                                ChildKind::Worker(_) => n.workers += 1,
                                ChildKind::Supervisor(_) => n.supervisors += 1,
                            }
                        }
                        let _ = reply.send(n);
                    }
                },
                _ = &mut sleep, if armed.is_some() => {
                    armed = None;
                    if let Some(exit) = self.on_timer().await {
                        return self.finish(exit);
                    }
                }
            }
        }
    }

    /// Starts every child of the spec, in start order.
    fn start_all(&mut self) {
        for i in 0..self.children.len() {
            self.start(i);
        }
    }

    fn finish(&self, exit: TreeExit) -> TreeExit {
        tracing::debug!(supervisor = %self.path, ?exit, "supervisor stopped");
        self.emit(None, || WorkerEventKind::SupervisorStopped {
            exit: exit.clone(),
        });
        exit
    }

    fn add_child(&mut self, spec: ChildSpec) -> Result<()> {
        spec.validate()?;
        let idx = self.children.len();
        let names = self.names();
        if names.contains_key(spec.name()) {
            return Err(Error::invalid_config(
                "children[].name",
                format!("\"{}\"", spec.name()),
                format!(
                    "supervisor \"{}\" already has a child with this name",
                    self.path
                ),
            ));
        }
        names.insert(spec.name().into(), idx);
        self.children.push(Child::new(spec, idx));
        self.start(idx);
        Ok(())
    }

    /// Takes an ended child out of the list: out of the name index and the listings at once,
    /// out of memory at the next compaction.
    fn remove(&mut self, idx: usize) {
        let c = &mut self.children[idx];
        if c.slot.load(Ordering::Relaxed) == GONE {
            return;
        }
        c.slot.store(GONE, Ordering::Relaxed);
        let name: Box<str> = c.spec.name().into();
        if let Some(names) = &mut self.names {
            names.remove(&name);
        }
        self.gone += 1;
    }

    /// Drops the children that left once they are at least half of the list (amortised O(1)
    /// per removal), and moves the others' slots with them.
    fn compact(&mut self) {
        if self.gone < 32 || self.gone * 2 < self.children.len() {
            return;
        }
        self.children
            .retain(|c| c.slot.load(Ordering::Relaxed) != GONE);
        for (i, c) in self.children.iter().enumerate() {
            c.slot.store(i, Ordering::Relaxed);
        }
        if self.children.capacity() > 4 * self.children.len().max(16) {
            self.children.shrink_to_fit();
        }
        self.gone = 0;
        if self.names.is_some() {
            self.names = None;
            self.names();
        }
    }

    fn is_gone(c: &Child) -> bool {
        c.slot.load(Ordering::Relaxed) == GONE
    }

    /// The index by name, built on first use.
    fn names(&mut self) -> &mut HashMap<Box<str>, usize> {
        let children = &self.children;
        self.names.get_or_insert_with(|| {
            children
                .iter()
                .enumerate()
                .filter(|(_, c)| !Self::is_gone(c))
                .map(|(i, c)| (c.spec.name().into(), i))
                .collect()
        })
    }

    fn start(&mut self, idx: usize) {
        let now = Instant::now();
        let c = &mut self.children[idx];
        c.generation += 1;
        if c.ever_started {
            c.restart_count += 1;
        }
        c.ever_started = true;
        c.held = false;
        let cancel = CancellationToken::new();
        let exit = ExitGuard {
            tx: Some(self.exit_tx.clone()),
            slot: c.slot.clone(),
            generation: c.generation,
        };
        let beat = c.spec.heartbeat.map(|_| Arc::new(Beat::new(self.epoch)));
        let join = match &c.spec.kind {
            ChildKind::Worker(factory) => factory.clone().spawn(
                WorkerContext {
                    worker: factory.clone(),
                    path: self.path.clone(),
                    cancel: cancel.clone(),
                    beat: beat.clone(),
                    restart_count: c.restart_count,
                },
                exit,
            ),
            ChildKind::Supervisor(spec) => {
                let (sub, run) = tree(
                    spec.clone(),
                    cancel.clone(),
                    self.events.clone(),
                    Some(&self.path),
                );
                c.sub = Some(sub);
                let nested_path = format!("{}/{}", self.path, c.spec.name());
                tokio::spawn(async move {
                    let outcome = AssertUnwindSafe(run).catch_unwind().await;
                    exit.send(match outcome {
                        Ok(TreeExit::Shutdown) => ExitReason::Normal,
                        Ok(TreeExit::IntensityExceeded { child, cause, .. }) => {
                            ExitReason::Escalated {
                                supervisor: nested_path,
                                child,
                                cause: Box::new(cause),
                            }
                        }
                        Err(p) => ExitReason::Panicked {
                            message: panic_message(&*p),
                        },
                    });
                })
            }
        };
        c.join = Some(join);
        c.cancel = Some(cancel);
        c.state = ChildState::Running;
        c.started_at = Some(now);
        c.deadline = None;
        c.hung = false;
        if let Some(hb) = c.spec.heartbeat {
            self.next_hb = min_opt(self.next_hb, add_to_instant(now, hb));
        }
        c.beat = beat;
        let restart_count = c.restart_count;
        let c = &self.children[idx];
        self.emit(Some(c.spec.name()), || WorkerEventKind::ChildStarted {
            restart_count,
        });
    }
    async fn on_exit(&mut self, msg: ExitMsg) -> Option<TreeExit> {
        let idx = msg.slot.load(Ordering::Relaxed);
        let c = self.children.get_mut(idx)?;
        if c.generation != msg.generation || c.join.is_none() {
            return None;
        }
        let reason = match (c.hung, c.spec.heartbeat) {
            (true, Some(hb)) => ExitReason::Hung {
                deadline_ms: ms(hb),
                aborted: false,
            },
            _ => msg.reason,
        };
        c.join = None;
        self.handle_exit(idx, reason).await
    }

    /// A child's run ended (its task is gone or abandoned): apply its restart type, the
    /// intensity limit and the strategy.
    async fn handle_exit(&mut self, idx: usize, reason: ExitReason) -> Option<TreeExit> {
        let now = Instant::now();
        let c = &mut self.children[idx];
        c.cancel = None;
        c.deadline = None;
        c.hung = false;
        c.beat = None;
        c.sub = None;
        c.state = ChildState::Stopped;
        let ran = c
            .started_at
            .take()
            .map(|s| now.saturating_duration_since(s))
            .unwrap_or_default();
        let restart = match c.spec.restart {
            Restart::Permanent => true,
            Restart::Transient => reason.is_abnormal(),
            Restart::Temporary => false,
        };
        let c = &self.children[idx];
        if reason.is_abnormal() {
            tracing::warn!(supervisor = %self.path, child = %c.spec.name(), ?reason, "child exited abnormally");
        }
        self.emit(Some(c.spec.name()), || WorkerEventKind::ChildExited {
            reason: reason.clone(),
            ran_for_ms: ms(ran),
        });
        if !restart {
            self.children[idx].last_exit = Some(reason);
            if self.children[idx].spec.restart == Restart::Temporary {
                // As in OTP: a temporary child that ended leaves; its name is free again.
                self.remove(idx);
            }
            return None;
        }
        let c = &mut self.children[idx];
        let backoff = c.spec.backoff.as_deref();
        let reset_after = backoff.map_or(RestartBackoff::none().reset_after, |b| b.reset_after);
        if ran >= reset_after {
            c.consecutive = 0;
        }
        c.consecutive += 1;
        let attempt = c.consecutive;
        let delay = backoff.map_or(Duration::ZERO, |b| b.delay(attempt));
        if self.count_delayed || delay.is_zero() {
            self.restarts.push_back(now);
            while let Some(first) = self.restarts.front() {
                if now.saturating_duration_since(*first) >= self.period {
                    self.restarts.pop_front();
                } else {
                    break;
                }
            }
            if self.restarts.len() > self.max_restarts as usize {
                let name = self.children[idx].spec.name().to_owned();
                self.emit(Some(&name), || WorkerEventKind::IntensityExceeded {
                    cause: reason.clone(),
                    max_restarts: self.max_restarts,
                    period_ms: ms(self.period),
                });
                tracing::error!(supervisor = %self.path, child = %name, "restart intensity exceeded; stopping");
                self.children[idx].last_exit = Some(reason.clone());
                self.stop_all().await;
                return Some(TreeExit::IntensityExceeded {
                    child: name,
                    cause: reason,
                    max_restarts: self.max_restarts,
                    period_ms: ms(self.period),
                });
            }
        }
        self.children[idx].last_exit = Some(reason);
        if self.strategy == Strategy::OneForOne {
            // The common case, without building a group.
            if delay.is_zero() {
                self.start(idx);
            } else {
                self.schedule_restart(idx, add_to_instant(now, delay), delay, attempt);
            }
            return None;
        }
        let n = self.children.len();
        let mut group: Vec<usize> = match self.strategy {
            Strategy::RestForOne => (idx..n)
                .filter(|&j| j == idx || self.children[j].is_live())
                .collect(),
            _ => (0..n)
                .filter(|&j| j == idx || self.children[j].is_live())
                .collect(),
        };
        if group.len() > 1 {
            for &j in group.iter().rev() {
                if j != idx {
                    self.stop_child(j).await;
                }
            }
            // Temporary siblings are not restarted: they leave, as in OTP.
            for &j in &group {
                if j != idx && self.children[j].spec.restart == Restart::Temporary {
                    self.remove(j);
                }
            }
            group.retain(|&j| j == idx || self.children[j].spec.restart != Restart::Temporary);
            self.emit(Some(self.children[idx].spec.name()), || {
                WorkerEventKind::GroupRestart {
                    strategy: self.strategy,
                    children: group
                        .iter()
                        .map(|&j| self.children[j].spec.name().to_owned())
                        .collect(),
                }
            });
        }
        if delay.is_zero() {
            for j in group {
                self.start(j);
            }
        } else {
            for j in group {
                self.schedule_restart(j, add_to_instant(now, delay), delay, attempt);
            }
        }
        None
    }

    /// Marks a stopped child to be started again at `at`.
    fn schedule_restart(&mut self, idx: usize, at: Instant, delay: Duration, attempt: u32) {
        let c = &mut self.children[idx];
        c.state = ChildState::Restarting;
        c.deadline = Some(at);
        self.next_restart = min_opt(self.next_restart, at);
        self.emit(Some(self.children[idx].spec.name()), || {
            WorkerEventKind::RestartScheduled {
                delay_ms: ms(delay),
                attempt,
            }
        });
    }

    /// Stops one child: cancel, wait up to its shutdown timeout, then abort.
    async fn stop_child(&mut self, idx: usize) -> StopOutcome {
        let now = Instant::now();
        let c = &mut self.children[idx];
        c.deadline = None;
        c.hung = false;
        c.beat = None;
        c.sub = None;
        let Some(mut join) = c.join.take() else {
            c.state = ChildState::Stopped;
            return StopOutcome::NotRunning;
        };
        c.generation += 1;
        c.state = ChildState::Stopping;
        let timeout = c.spec.effective_shutdown_timeout();
        let graceful = if timeout.is_zero() {
            // OTP's brutal kill: the child gets no shutdown path. Abort first, and only then
            // fire its token (for what it handed the token to); wait for the task to be gone.
            join.abort();
            let _ = (&mut join).await;
            if let Some(cancel) = c.cancel.take() {
                cancel.cancel();
            }
            false
        } else {
            if let Some(cancel) = c.cancel.take() {
                cancel.cancel();
            }
            tokio::time::timeout(timeout, &mut join).await.is_ok()
        };
        let (outcome, reason) = if graceful {
            (StopOutcome::Graceful, ExitReason::Shutdown)
        } else {
            join.abort();
            if !timeout.is_zero() {
                tracing::warn!(supervisor = %self.path, child = %c.spec.name(), ?timeout, "child ignored its cancellation; aborted");
            }
            (
                StopOutcome::Killed,
                ExitReason::Killed {
                    timeout_ms: ms(timeout),
                },
            )
        };
        let ran = c
            .started_at
            .take()
            .map(|s| now.saturating_duration_since(s))
            .unwrap_or_default();
        c.state = ChildState::Stopped;
        let c = &self.children[idx];
        if outcome == StopOutcome::Killed {
            self.emit(Some(c.spec.name()), || WorkerEventKind::ChildKilled {
                timeout_ms: ms(timeout),
            });
        }
        self.emit(Some(c.spec.name()), || WorkerEventKind::ChildExited {
            reason: reason.clone(),
            ran_for_ms: ms(ran),
        });
        self.children[idx].last_exit = Some(reason);
        outcome
    }

    /// Stops every child in reverse start order.
    async fn stop_all(&mut self) -> ShutdownReport {
        let mut report = ShutdownReport::default();
        report.children.reserve(self.children.len());
        for j in (0..self.children.len()).rev() {
            if Self::is_gone(&self.children[j]) {
                continue;
            }
            let outcome = self.stop_child(j).await;
            report.children.push(ChildShutdown {
                name: self.children[j].spec.name().to_owned(),
                outcome,
            });
        }
        self.next_hb = None;
        self.next_restart = None;
        self.next_kill = None;
        report
    }

    async fn on_timer(&mut self) -> Option<TreeExit> {
        let now = Instant::now();
        let mut to_start = Vec::new();
        let mut hung = Vec::new();
        let mut kill = Vec::new();
        let (mut next_hb, mut next_restart, mut next_kill) = (None, None, None);
        for (j, c) in self.children.iter().enumerate() {
            if let Some(t) = c.restart_at() {
                if t <= now {
                    to_start.push(j);
                } else {
                    next_restart = min_opt(next_restart, t);
                }
            }
            if let Some(k) = c.kill_at() {
                if k <= now {
                    kill.push(j);
                } else {
                    next_kill = min_opt(next_kill, k);
                }
            }
            if c.state == ChildState::Running
                && let (Some(hb), Some(beat)) = (c.spec.heartbeat, &c.beat)
            {
                let last = beat.last();
                let due = add_to_instant(last, hb);
                if due <= now {
                    hung.push((j, now.saturating_duration_since(last)));
                } else {
                    next_hb = min_opt(next_hb, due);
                }
            }
        }
        self.next_hb = next_hb;
        self.next_restart = next_restart;
        self.next_kill = next_kill;
        for (j, silent) in hung {
            let c = &mut self.children[j];
            let Some(hb) = c.spec.heartbeat else { continue };
            let timeout = c.spec.effective_shutdown_timeout();
            if let Some(cancel) = &c.cancel {
                cancel.cancel();
            }
            c.state = ChildState::Stopping;
            c.hung = true;
            let at = add_to_instant(now, timeout);
            c.deadline = Some(at);
            self.next_kill = min_opt(self.next_kill, at);
            let c = &self.children[j];
            tracing::warn!(supervisor = %self.path, child = %c.spec.name(), ?hb, "child missed its heartbeat; cancelling");
            self.emit(Some(c.spec.name()), || WorkerEventKind::HeartbeatMissed {
                deadline_ms: ms(hb),
                silent_for_ms: ms(silent),
            });
        }
        for j in kill {
            let c = &mut self.children[j];
            c.deadline = None;
            let Some(join) = c.join.take() else { continue };
            join.abort();
            // The task may be stuck in blocking code and never notice the abort; the loop does
            // not wait for it.
            c.generation += 1;
            let timeout = c.spec.effective_shutdown_timeout();
            let reason = match (c.hung, c.spec.heartbeat) {
                (true, Some(hb)) => ExitReason::Hung {
                    deadline_ms: ms(hb),
                    aborted: true,
                },
                _ => ExitReason::Killed {
                    timeout_ms: ms(timeout),
                },
            };
            c.hung = false;
            let c = &self.children[j];
            self.emit(Some(c.spec.name()), || WorkerEventKind::ChildKilled {
                timeout_ms: ms(timeout),
            });
            if let Some(exit) = self.handle_exit(j, reason).await {
                return Some(exit);
            }
        }
        for j in to_start {
            if self.children[j].state == ChildState::Restarting {
                self.start_unless_blocked(j, now);
            }
        }
        if self.strategy == Strategy::RestForOne {
            self.start_waiting_dependents(now);
        }
        None
    }

    /// Under rest-for-one, whether child `j` must wait for a child before it: one that is
    /// stopping, waiting to restart, stopped by hand, or restarting after repeated failures
    /// and not yet running for its backoff's `reset_after` (so dependents do not flap with
    /// it). Returns when to look again, if a time will tell.
    fn blocked(&self, j: usize, now: Instant) -> Option<Option<Instant>> {
        if self.strategy != Strategy::RestForOne {
            return None;
        }
        for c in &self.children[..j] {
            if Self::is_gone(c) {
                continue;
            }
            match c.state {
                ChildState::Restarting | ChildState::Stopping => return Some(None),
                ChildState::Stopped if c.held => return Some(None),
                ChildState::Running if c.consecutive > 1 => {
                    let reset_after = c
                        .spec
                        .backoff
                        .as_deref()
                        .map_or(RestartBackoff::none().reset_after, |b| b.reset_after);
                    let up_at = c.started_at.map(|s| add_to_instant(s, reset_after));
                    if let Some(at) = up_at.filter(|at| *at > now) {
                        return Some(Some(at));
                    }
                }
                _ => {}
            }
        }
        None
    }

    /// Starts a child due for a restart, or leaves it waiting for the children before it.
    fn start_unless_blocked(&mut self, j: usize, now: Instant) {
        match self.blocked(j, now) {
            None => self.start(j),
            Some(recheck) => {
                let c = &mut self.children[j];
                c.deadline = recheck;
                if let Some(at) = recheck {
                    self.next_restart = min_opt(self.next_restart, at);
                }
            }
        }
    }

    /// Starts, in order, the children waiting for a dependency that is up now.
    fn start_waiting_dependents(&mut self, now: Instant) {
        for j in 0..self.children.len() {
            let c = &self.children[j];
            if c.state == ChildState::Restarting && c.deadline.is_none() && !Self::is_gone(c) {
                self.start_unless_blocked(j, now);
            }
        }
    }
}
