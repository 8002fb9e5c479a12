//! What a running worker gets from its supervisor: its name, a cancellation token, a heartbeat.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::spec::Spawner;

/// The last heartbeat of a child, in microseconds since the supervisor's epoch.
#[derive(Debug)]
pub(crate) struct Beat {
    pub(crate) epoch: Instant,
    pub(crate) last_micros: AtomicU64,
}

impl Beat {
    pub(crate) fn new(epoch: Instant) -> Self {
        let b = Self {
            epoch,
            last_micros: AtomicU64::new(0),
        };
        b.touch();
        b
    }

    pub(crate) fn touch(&self) {
        let micros = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.last_micros.store(micros, Ordering::Relaxed);
    }

    pub(crate) fn last(&self) -> Instant {
        self.epoch + std::time::Duration::from_micros(self.last_micros.load(Ordering::Relaxed))
    }
}

/// Handed to a worker's factory at each (re)start.
///
/// A worker should watch [`cancellation`](Self::cancellation) (or await
/// [`cancelled`](Self::cancelled)) and return soon after it fires: that is how it is asked to
/// stop, at shutdown, when a sibling's failure restarts it, or when it missed its heartbeat.
/// A worker that does not stop within its shutdown timeout is aborted at its next `.await`.
/// Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct WorkerContext {
    /// The child's factory, which holds its name.
    pub(crate) worker: Arc<dyn Spawner>,
    pub(crate) path: Arc<str>,
    pub(crate) cancel: CancellationToken,
    /// `None` when the child has no heartbeat deadline: beating is then a no-op.
    pub(crate) beat: Option<Arc<Beat>>,
    pub(crate) restart_count: u32,
}

impl fmt::Debug for WorkerContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerContext")
            .field("name", &self.name())
            .field("supervisor", &self.path)
            .field("restart_count", &self.restart_count)
            .field("cancelled", &self.cancel.is_cancelled())
            .finish()
    }
}

impl WorkerContext {
    /// The child's name.
    pub fn name(&self) -> &str {
        self.worker.name()
    }

    /// The path of the supervisor that runs it, such as `app/db`.
    pub fn supervisor(&self) -> &str {
        &self.path
    }

    /// How many times this child was restarted before this run (0 on the first run).
    pub fn restart_count(&self) -> u32 {
        self.restart_count
    }

    /// Tells the supervisor the worker is alive. One atomic store; call it as often as useful.
    /// A no-op for a child without a heartbeat deadline.
    pub fn heartbeat(&self) {
        if let Some(b) = &self.beat {
            b.touch();
        }
    }

    /// Fires when the worker must stop.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Whether the worker must stop.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Resolves when the worker must stop.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await;
    }
}
