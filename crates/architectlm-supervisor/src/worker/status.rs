//! What a supervision tree reports: exit reasons, events, child statuses and shutdown reports.
//! Everything here is serialisable with kebab-case names.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::spec::{Restart, Strategy};
use architectlm_core::event::Typed;

/// Why a child stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ExitReason {
    /// The worker returned `Ok(())` on its own.
    Normal,
    /// The supervisor stopped it (shutdown or a sibling's group restart) and it stopped in time.
    Shutdown,
    /// The worker returned an error.
    Failed {
        /// The error's message.
        error: String,
    },
    /// The worker panicked.
    Panicked {
        /// The panic message.
        message: String,
    },
    /// The worker missed its heartbeat deadline and was stopped.
    Hung {
        /// The deadline it missed, in milliseconds.
        deadline_ms: u64,
        /// Whether it had to be aborted because it ignored its cancellation.
        aborted: bool,
    },
    /// The supervisor stopped it and it did not stop within its shutdown timeout: aborted.
    Killed {
        /// The shutdown timeout, in milliseconds.
        timeout_ms: u64,
    },
    /// A nested supervisor gave up: its restart intensity was exceeded.
    Escalated {
        /// The nested supervisor's path.
        supervisor: String,
        /// The child whose failure tripped it.
        child: String,
        /// That child's exit.
        cause: Box<ExitReason>,
    },
}

impl ExitReason {
    /// Whether the exit was abnormal (transient children are restarted only after these).
    pub fn is_abnormal(&self) -> bool {
        !matches!(self, Self::Normal | Self::Shutdown)
    }
}

/// The life-cycle state of a child.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ChildState {
    /// Running.
    Running,
    /// Told to stop, waiting for it to exit (a hung worker).
    Stopping,
    /// Waiting for its backoff delay before a restart.
    Restarting,
    /// Not running and not to be restarted (a transient child that exited normally, a
    /// temporary child, or a stopped tree).
    Stopped,
}

/// Whether a child is a worker or a nested supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChildKindName {
    /// A worker built by a factory.
    Worker,
    /// A nested supervisor.
    Supervisor,
}

/// A snapshot of one child, from [`SupervisorHandle::children`](super::SupervisorHandle::children).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ChildStatus {
    /// The child's name.
    pub name: String,
    /// Worker or supervisor.
    pub kind: ChildKindName,
    /// Its restart type.
    pub restart: Restart,
    /// Its state.
    pub state: ChildState,
    /// How many times it was restarted since the supervisor started.
    pub restart_count: u32,
    /// Consecutive restarts without a stable run (drives the backoff).
    pub consecutive_failures: u32,
    /// How it last exited.
    pub last_exit: Option<ExitReason>,
    /// When the current run started.
    pub started_at: Option<DateTime<Utc>>,
    /// For a nested supervisor: its children.
    pub children: Vec<ChildStatus>,
}

/// How a child ended during a shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum StopOutcome {
    /// It stopped within its timeout.
    Graceful,
    /// It was aborted after its timeout.
    Killed,
    /// It was not running.
    NotRunning,
}

/// One child's line in a [`ShutdownReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ChildShutdown {
    /// The child's name.
    pub name: String,
    /// How it ended.
    pub outcome: StopOutcome,
}

/// How many children a supervisor has, as OTP's `count_children` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[non_exhaustive]
pub struct ChildCounts {
    /// Child specs held (running or not; ended temporary children are gone).
    pub specs: usize,
    /// Children running now.
    pub active: usize,
    /// Nested supervisors among the specs.
    pub supervisors: usize,
    /// Workers among the specs.
    pub workers: usize,
}

/// What a shutdown did, in the order the children were stopped (reverse start order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// The children, in stop order.
    pub children: Vec<ChildShutdown>,
}

/// How a supervision tree ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum TreeExit {
    /// It was shut down.
    Shutdown,
    /// Its restart intensity was exceeded: it stopped every child and gave up.
    IntensityExceeded {
        /// The child whose failure tripped it.
        child: String,
        /// That child's exit.
        cause: ExitReason,
        /// The limit.
        max_restarts: u32,
        /// The window, in milliseconds.
        period_ms: u64,
    },
}

/// What happened in a supervision tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum WorkerEventKind {
    /// A child started (`restart_count` 0 on its first run).
    ChildStarted {
        /// Restarts so far.
        restart_count: u32,
    },
    /// A child exited; `reason` tells a panic from an error from a missed heartbeat.
    ChildExited {
        /// Why.
        reason: ExitReason,
        /// How long it ran, in milliseconds.
        ran_for_ms: u64,
    },
    /// A child will be restarted after a backoff delay.
    RestartScheduled {
        /// The delay, in milliseconds.
        delay_ms: u64,
        /// The consecutive restart number.
        attempt: u32,
    },
    /// A child missed its heartbeat deadline; it is being cancelled.
    HeartbeatMissed {
        /// The deadline, in milliseconds.
        deadline_ms: u64,
        /// How long it had been silent, in milliseconds.
        silent_for_ms: u64,
    },
    /// A child ignored its cancellation for its whole shutdown timeout and was aborted.
    ChildKilled {
        /// The timeout, in milliseconds.
        timeout_ms: u64,
    },
    /// The restart intensity was exceeded; the supervisor stops its children and exits.
    IntensityExceeded {
        /// The child whose failure tripped it.
        cause: ExitReason,
        /// The limit.
        max_restarts: u32,
        /// The window, in milliseconds.
        period_ms: u64,
    },
    /// Siblings are stopped and restarted with a failed child (one-for-all, rest-for-one).
    GroupRestart {
        /// The strategy.
        strategy: Strategy,
        /// The children restarted, in start order.
        children: Vec<String>,
    },
    /// The supervisor stopped.
    SupervisorStopped {
        /// How.
        exit: TreeExit,
    },
}

/// An event of a supervision tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct WorkerEvent {
    /// The supervisor's path, such as `app/db`.
    pub supervisor: String,
    /// The child concerned, if any.
    pub child: Option<String>,
    /// When it happened.
    pub timestamp: DateTime<Utc>,
    /// What happened.
    #[serde(flatten)]
    pub kind: WorkerEventKind,
}

impl WorkerEventKind {
    /// The kebab-case name, such as `child-exited`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::ChildStarted { .. } => "child-started",
            Self::ChildExited { .. } => "child-exited",
            Self::RestartScheduled { .. } => "restart-scheduled",
            Self::HeartbeatMissed { .. } => "heartbeat-missed",
            Self::ChildKilled { .. } => "child-killed",
            Self::IntensityExceeded { .. } => "intensity-exceeded",
            Self::GroupRestart { .. } => "group-restart",
            Self::SupervisorStopped { .. } => "supervisor-stopped",
        }
    }
}

impl Typed for WorkerEvent {
    fn type_name(&self) -> &str {
        self.kind.as_str()
    }
}
