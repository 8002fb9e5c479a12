//! What a supervision tree is made of: child specifications, restart types and strategies,
//! restart intensity, backoff, and the validating builder of a supervisor.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use architectlm_core::{BoxError, Error, Result};
use futures::FutureExt;
use futures::future;
use serde::{Deserialize, Serialize};
use std::panic::AssertUnwindSafe;
use tokio::task::JoinHandle;

use super::context::WorkerContext;
use super::tree::{ExitGuard, worker_exit};

/// What a worker returns: `Ok(())` is a normal exit, an error an abnormal one.
pub type WorkerResult = std::result::Result<(), BoxError>;

/// Starts one run of a worker: spawns a task that calls the factory under `catch_unwind` and
/// reports how the run ended through the [`ExitGuard`]. It is generic over the factory, so the
/// worker's future lives inside the task itself, with no box of its own.
pub(crate) trait Spawner: Send + Sync {
    /// The child's name, kept with the factory: one allocation for both.
    fn name(&self) -> &str;
    fn spawn(self: Arc<Self>, ctx: WorkerContext, exit: ExitGuard) -> JoinHandle<()>;
}

/// The [`Spawner`] of a factory closure, with the child's name.
struct FnWorker<F> {
    name: String,
    factory: F,
}

impl<F, Fut> Spawner for FnWorker<F>
where
    F: Fn(WorkerContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = WorkerResult> + Send + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn spawn(self: Arc<Self>, ctx: WorkerContext, exit: ExitGuard) -> JoinHandle<()> {
        // The factory is called inside the task, under `catch_unwind`, so that a panic in it is
        // caught like a panic of the worker. Combinators rather than nested `async` blocks: the
        // factory and its context share their place in the task with the worker's future
        // (`Flatten` is an enum of the two), where each `async` block would keep its own copy
        // of the captured context, and the task (copied several times by the spawn) grows.
        let run = future::lazy(move |_| (self.factory)(ctx)).flatten();
        tokio::spawn(
            AssertUnwindSafe(run)
                .catch_unwind()
                .map(move |outcome| exit.send(worker_exit(outcome))),
        )
    }
}

/// Builds and spawns a worker's run each time the child is (re)started.
pub(crate) type Factory = Arc<dyn Spawner>;

/// Which siblings are restarted with a child that must be restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Strategy {
    /// Only the child itself.
    #[default]
    OneForOne,
    /// Every child: the others are stopped (in reverse start order), then all are started again
    /// in start order.
    OneForAll,
    /// The child and every child started after it. A dependent starts only once the children
    /// before it are up: it waits while one of them is stopping, waiting for its restart,
    /// stopped by `terminate_child`, or restarting after repeated failures and not yet running
    /// for its backoff's `reset_after` (so dependents do not start and stop at every backoff
    /// deadline of a failing child).
    RestForOne,
}

/// When a child is restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Restart {
    /// Always, even after a normal exit.
    #[default]
    Permanent,
    /// Only after an abnormal exit (an error, a panic, a missed heartbeat).
    Transient,
    /// Never; a temporary child stopped by a sibling's group restart is not started again
    /// either. As in OTP, a temporary child that ended (or was terminated) leaves the
    /// supervisor: it is no longer listed and its name can be used again.
    Temporary,
}

/// At most `max_restarts` restarts within any sliding `period`; one more and the supervisor
/// gives up: it stops all its children and exits, which its parent sees as a failure of that
/// child (escalation). At the top of a tree the whole tree stops.
///
/// `max_restarts = 0` means the first restart already trips it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RestartIntensity {
    /// Restarts allowed within `period`.
    pub max_restarts: u32,
    /// The sliding window.
    #[serde(with = "architectlm_core::serde_duration")]
    pub period: Duration,
}

impl RestartIntensity {
    /// At most `max_restarts` restarts in `period`.
    pub fn new(max_restarts: u32, period: Duration) -> Self {
        Self {
            max_restarts,
            period,
        }
    }
}

impl Default for RestartIntensity {
    /// 3 restarts in 5 seconds.
    fn default() -> Self {
        Self::new(3, Duration::from_secs(5))
    }
}

/// How long a child waits before it is restarted.
///
/// The n-th consecutive restart waits `initial * factor^(n-1)`, capped at `max`; with `jitter`
/// the wait is drawn uniformly from `[delay * (1 - jitter), delay]` so that many children
/// failing together do not restart in lockstep. A child that ran at least `reset_after` before
/// failing starts again from `initial`. [`RestartBackoff::none`] (the default) restarts at once,
/// as OTP does.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RestartBackoff {
    /// The first delay (zero: restart at once).
    #[serde(with = "architectlm_core::serde_duration")]
    pub initial: Duration,
    /// The largest delay.
    #[serde(with = "architectlm_core::serde_duration")]
    pub max: Duration,
    /// Growth factor, at least 1.
    pub factor: f64,
    /// Randomised fraction of each delay, 0.0–1.0.
    pub jitter: f64,
    /// A run at least this long resets the delay to `initial`.
    #[serde(with = "architectlm_core::serde_duration")]
    pub reset_after: Duration,
}

impl Default for RestartBackoff {
    fn default() -> Self {
        Self::none()
    }
}

impl RestartBackoff {
    /// Restart at once.
    pub fn none() -> Self {
        Self {
            initial: Duration::ZERO,
            max: Duration::ZERO,
            factor: 1.0,
            jitter: 0.0,
            reset_after: Duration::from_secs(60),
        }
    }

    /// Exponential backoff from `initial` to `max`, factor 2, no jitter, reset after 60 s.
    pub fn exponential(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            factor: 2.0,
            jitter: 0.0,
            reset_after: Duration::from_secs(60),
        }
    }

    /// Sets the growth factor.
    pub fn factor(mut self, factor: f64) -> Self {
        self.factor = factor;
        self
    }

    /// Sets the randomised fraction of each delay.
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// Sets how long a run must last to reset the delay.
    pub fn reset_after(mut self, d: Duration) -> Self {
        self.reset_after = d;
        self
    }

    /// The delay before the `n`-th consecutive restart (1-based), without jitter.
    pub fn base_delay(&self, n: u32) -> Duration {
        if self.initial.is_zero() {
            return Duration::ZERO;
        }
        let scale = self.factor.powi(n.saturating_sub(1).min(1024) as i32);
        let secs = self.initial.as_secs_f64() * scale;
        if secs.is_finite() && secs < self.max.as_secs_f64() {
            Duration::from_secs_f64(secs)
        } else {
            self.max
        }
    }

    /// The delay before the `n`-th consecutive restart, with jitter.
    pub fn delay(&self, n: u32) -> Duration {
        let base = self.base_delay(n);
        if self.jitter <= 0.0 || base.is_zero() {
            return base;
        }
        base.mul_f64(1.0 - self.jitter * architectlm_core::random_unit())
    }

    fn validate(&self, child: &str) -> Result<()> {
        let field = |f: &str| format!("children[\"{child}\"].backoff.{f}");
        if !(self.factor.is_finite() && self.factor >= 1.0) {
            return Err(Error::invalid_config(
                field("factor"),
                self.factor,
                "must be a finite number >= 1",
            ));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(Error::invalid_config(
                field("jitter"),
                self.jitter,
                "must be between 0.0 and 1.0",
            ));
        }
        if self.max < self.initial {
            return Err(Error::invalid_config(
                field("max"),
                format!("{:?}", self.max),
                format!("must not be below initial ({:?})", self.initial),
            ));
        }
        Ok(())
    }
}

pub(crate) enum ChildKind {
    Worker(Factory),
    Supervisor(Arc<SupervisorSpec>),
}

/// A child of a supervisor: a worker built by a factory closure, or a nested supervisor.
///
/// ```
/// use std::time::Duration;
/// use architectlm_supervisor::worker::{ChildSpec, Restart, RestartBackoff};
///
/// let poller = ChildSpec::worker("poller", |ctx| async move {
///     while !ctx.is_cancelled() {
///         ctx.heartbeat();
///         tokio::time::sleep(Duration::from_millis(100)).await;
///     }
///     Ok(())
/// })
/// .restart(Restart::Permanent)
/// .heartbeat(Duration::from_secs(1))
/// .backoff(RestartBackoff::exponential(Duration::from_millis(10), Duration::from_secs(5)).jitter(0.2))
/// .shutdown_timeout(Duration::from_secs(2));
/// # let _ = poller;
/// ```
pub struct ChildSpec {
    /// Holds the name too: a worker's in its factory, a supervisor's in its spec.
    pub(crate) kind: ChildKind,
    pub(crate) restart: Restart,
    /// `None` for no backoff ([`RestartBackoff::none`]): most children have none, and the
    /// settings would otherwise take 64 bytes in every child.
    pub(crate) backoff: Option<Box<RestartBackoff>>,
    pub(crate) heartbeat: Option<Duration>,
    pub(crate) shutdown_timeout: Option<Duration>,
}

impl fmt::Debug for ChildSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChildSpec")
            .field("name", &self.name())
            .field(
                "kind",
                &match self.kind {
                    ChildKind::Worker(_) => "worker",
                    ChildKind::Supervisor(_) => "supervisor",
                },
            )
            .field("restart", &self.restart)
            .field("backoff", &self.backoff_settings())
            .field("heartbeat", &self.heartbeat)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .finish()
    }
}

/// A worker's request to end as [`ExitReason::Shutdown`](super::ExitReason::Shutdown) rather
/// than as a failure: return `Err(Shutdown::new("queue drained").into())`. A transient child
/// that ends so is not restarted (as Erlang's `{shutdown, Reason}`), and nothing is counted
/// toward the restart intensity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shutdown {
    reason: String,
}

impl Shutdown {
    /// A shutdown for `reason` (logged with the exit).
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
        }
    }

    /// Why.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl std::fmt::Display for Shutdown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "shutdown: {}", self.reason)
    }
}

impl std::error::Error for Shutdown {}

/// The default time a worker gets to stop after it was told to.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

impl ChildSpec {
    /// A worker: `factory` is called with a fresh [`WorkerContext`] at every (re)start and its
    /// future is the worker's life. Permanent, no backoff, no heartbeat, 5 s to shut down.
    pub fn worker<F, Fut>(name: impl Into<String>, factory: F) -> Self
    where
        F: Fn(WorkerContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = WorkerResult> + Send + 'static,
    {
        Self {
            kind: ChildKind::Worker(Arc::new(FnWorker {
                name: name.into(),
                factory,
            })),
            restart: Restart::Permanent,
            backoff: None,
            heartbeat: None,
            shutdown_timeout: None,
        }
    }

    /// A nested supervisor. When its restart intensity trips, it stops its children and exits;
    /// this supervisor sees that as a failure of this child. Its shutdown timeout defaults to
    /// the sum of its children's effective shutdown timeouts plus one second for its own loop,
    /// so that each of its children can use its whole timeout when they stop one after another.
    pub fn supervisor(spec: SupervisorSpec) -> Self {
        Self {
            kind: ChildKind::Supervisor(Arc::new(spec)),
            restart: Restart::Permanent,
            backoff: None,
            heartbeat: None,
            shutdown_timeout: None,
        }
    }

    /// Sets when the child is restarted.
    pub fn restart(mut self, restart: Restart) -> Self {
        self.restart = restart;
        self
    }

    /// Sets the delay before restarts.
    pub fn backoff(mut self, backoff: RestartBackoff) -> Self {
        self.backoff = (backoff != RestartBackoff::none()).then(|| Box::new(backoff));
        self
    }

    /// Requires a [`WorkerContext::heartbeat`] at least every `deadline`; a worker silent for
    /// longer is considered hung: it is cancelled, aborted after its shutdown timeout, and
    /// restarted per its restart type.
    pub fn heartbeat(mut self, deadline: Duration) -> Self {
        self.heartbeat = Some(deadline);
        self
    }

    /// How long the worker may take to stop after its cancellation token fired before it is
    /// aborted. Zero is OTP's `brutal_kill`: the task is aborted first and gets no shutdown
    /// path (its token fires only afterwards, for what it handed the token to).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = Some(timeout);
        self
    }

    /// The child's name.
    pub fn name(&self) -> &str {
        match &self.kind {
            ChildKind::Worker(w) => w.name(),
            ChildKind::Supervisor(s) => &s.name,
        }
    }

    /// The backoff settings in force.
    pub(crate) fn backoff_settings(&self) -> RestartBackoff {
        self.backoff
            .as_deref()
            .copied()
            .unwrap_or_else(RestartBackoff::none)
    }

    pub(crate) fn effective_shutdown_timeout(&self) -> Duration {
        if let Some(t) = self.shutdown_timeout {
            return t;
        }
        match &self.kind {
            ChildKind::Worker(_) => DEFAULT_SHUTDOWN_TIMEOUT,
            ChildKind::Supervisor(s) => s
                .children
                .iter()
                .map(ChildSpec::effective_shutdown_timeout)
                .fold(Duration::from_secs(1), Duration::saturating_add),
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.name().trim().is_empty() {
            return Err(Error::invalid_config(
                "children[].name",
                format!("{:?}", self.name()),
                "a child needs a name (not empty or only whitespace)",
            ));
        }
        if self.heartbeat == Some(Duration::ZERO) {
            return Err(Error::invalid_config(
                format!("children[\"{}\"].heartbeat", self.name()),
                "0ms",
                "a heartbeat deadline must be positive",
            ));
        }
        if self.heartbeat.is_some() && matches!(self.kind, ChildKind::Supervisor(_)) {
            return Err(Error::invalid_config(
                format!("children[\"{}\"].heartbeat", self.name()),
                format!("{:?}", self.heartbeat.unwrap_or_default()),
                "a nested supervisor does not heartbeat; set heartbeats on its workers",
            ));
        }
        match &self.backoff {
            Some(b) => b.validate(self.name()),
            None => Ok(()),
        }
    }
}

/// A validated supervisor specification: name, strategy, restart intensity and children.
/// Start it with [`SupervisorSpec::start`], or nest it with [`ChildSpec::supervisor`].
pub struct SupervisorSpec {
    pub(crate) name: Arc<str>,
    pub(crate) strategy: Strategy,
    pub(crate) intensity: RestartIntensity,
    pub(crate) count_delayed_restarts: bool,
    pub(crate) children: Vec<ChildSpec>,
}

impl fmt::Debug for SupervisorSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SupervisorSpec")
            .field("name", &self.name)
            .field("strategy", &self.strategy)
            .field("intensity", &self.intensity)
            .field("count_delayed_restarts", &self.count_delayed_restarts)
            .field("children", &self.children)
            .finish()
    }
}

impl SupervisorSpec {
    /// Starts a builder.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use std::time::Duration;
    /// use architectlm_supervisor::worker::{ChildSpec, RestartIntensity, Strategy, SupervisorSpec};
    ///
    /// let tree = SupervisorSpec::builder("app")
    ///     .strategy(Strategy::OneForOne)
    ///     .intensity(RestartIntensity::new(3, Duration::from_secs(5)))
    ///     .child(ChildSpec::worker("ticker", |ctx| async move {
    ///         ctx.cancelled().await;
    ///         Ok(())
    ///     }))
    ///     .build()
    ///     .unwrap();
    /// let handle = tree.start();
    /// let children = handle.children().await.unwrap();
    /// assert_eq!(children[0].name, "ticker");
    /// let report = handle.shutdown().await;
    /// assert_eq!(report.children.len(), 1);
    /// # });
    /// ```
    pub fn builder(name: impl Into<String>) -> SupervisorSpecBuilder {
        SupervisorSpecBuilder {
            name: name.into(),
            strategy: Strategy::OneForOne,
            intensity: RestartIntensity::default(),
            count_delayed_restarts: true,
            children: Vec::new(),
        }
    }

    /// The supervisor's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Builds a [`SupervisorSpec`]; [`build`](Self::build) validates it.
#[must_use]
#[derive(Debug)]
pub struct SupervisorSpecBuilder {
    name: String,
    strategy: Strategy,
    intensity: RestartIntensity,
    count_delayed_restarts: bool,
    children: Vec<ChildSpec>,
}

impl SupervisorSpecBuilder {
    /// Sets the restart strategy (default one-for-one).
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// Sets the restart intensity (default 3 restarts in 5 s).
    pub fn intensity(mut self, intensity: RestartIntensity) -> Self {
        self.intensity = intensity;
        self
    }

    /// Whether restarts that wait for a backoff delay count toward the restart intensity
    /// (default `true`, as in OTP). With `false`, only immediate restarts count: a child in
    /// backoff is already throttled and may keep retrying at its largest delay without
    /// tripping the supervisor (the "crash loop back-off" behaviour of service managers).
    pub fn count_delayed_restarts(mut self, count: bool) -> Self {
        self.count_delayed_restarts = count;
        self
    }

    /// Adds a child; children start in the order they are added.
    pub fn child(mut self, child: ChildSpec) -> Self {
        self.children.push(child);
        self
    }

    /// Adds several children.
    pub fn children(mut self, children: impl IntoIterator<Item = ChildSpec>) -> Self {
        self.children.extend(children);
        self
    }

    /// Validates: a non-empty name, a positive intensity period, unique child names, and each
    /// child's heartbeat and backoff.
    pub fn build(self) -> Result<SupervisorSpec> {
        if self.name.trim().is_empty() {
            return Err(Error::invalid_config(
                "name",
                format!("{:?}", self.name),
                "a supervisor needs a name (not empty or only whitespace)",
            ));
        }
        if self.intensity.period.is_zero() {
            return Err(Error::invalid_config(
                "intensity.period",
                "0ms",
                format!(
                    "supervisor \"{}\" needs a positive restart-intensity period",
                    self.name
                ),
            ));
        }
        // Sized up front and keyed by borrowed names: no rehash, no reference count traffic.
        let mut seen = std::collections::HashSet::with_capacity(self.children.len());
        for c in &self.children {
            c.validate()?;
            if !seen.insert(c.name()) {
                return Err(Error::invalid_config(
                    "children[].name",
                    format!("\"{}\"", c.name()),
                    format!(
                        "supervisor \"{}\" already has a child with this name",
                        self.name
                    ),
                ));
            }
        }
        Ok(SupervisorSpec {
            name: Arc::from(self.name),
            strategy: self.strategy,
            intensity: self.intensity,
            count_delayed_restarts: self.count_delayed_restarts,
            children: self.children,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters_below_the_base() {
        let b = RestartBackoff::exponential(Duration::from_millis(10), Duration::from_millis(50));
        assert_eq!(b.base_delay(1), Duration::from_millis(10));
        assert_eq!(b.base_delay(2), Duration::from_millis(20));
        assert_eq!(b.base_delay(3), Duration::from_millis(40));
        assert_eq!(b.base_delay(4), Duration::from_millis(50));
        let j = b.jitter(0.5);
        for _ in 0..100 {
            let d = j.delay(2);
            assert!(d <= Duration::from_millis(20) && d >= Duration::from_millis(10));
        }
        assert_eq!(RestartBackoff::none().delay(7), Duration::ZERO);
    }

    #[test]
    fn bad_configuration_is_rejected_with_the_field_and_value() {
        let w = || ChildSpec::worker("w", |_ctx| async { Ok(()) });
        let err = |b: SupervisorSpecBuilder| b.build().unwrap_err().to_string();
        assert!(err(SupervisorSpec::builder("")).contains("name = \"\""));
        let e =
            err(SupervisorSpec::builder("s").intensity(RestartIntensity::new(3, Duration::ZERO)));
        assert!(e.contains("intensity.period = 0ms"), "{e}");
        let e = err(SupervisorSpec::builder("s").child(w()).child(w()));
        assert!(e.contains("children[].name = \"w\""), "{e}");
        let e = err(SupervisorSpec::builder("s").child(w().heartbeat(Duration::ZERO)));
        assert!(e.contains("children[\"w\"].heartbeat = 0ms"), "{e}");
        let e = err(
            SupervisorSpec::builder("s").child(w().backoff(RestartBackoff::exponential(
                Duration::from_secs(2),
                Duration::from_secs(1),
            ))),
        );
        assert!(e.contains("children[\"w\"].backoff.max"), "{e}");
        let e = err(SupervisorSpec::builder("s").child(w().backoff(
            RestartBackoff::exponential(Duration::from_secs(1), Duration::from_secs(2)).jitter(1.5),
        )));
        assert!(e.contains("backoff.jitter = 1.5"), "{e}");
    }
}
