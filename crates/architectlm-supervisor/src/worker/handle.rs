//! [`SupervisorHandle`]: starts a tree, talks to its root, and reports how it ended.

use std::fmt;
use std::sync::Arc;

use architectlm_core::{
    Error, Event, EventFilter, EventHub, EventSubscription, Result, Runtime, Subscription,
};
use futures::future::BoxFuture;
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::spec::{ChildSpec, SupervisorSpec};
use super::status::{ChildCounts, ChildStatus, ShutdownReport, StopOutcome, TreeExit, WorkerEvent};
use super::tree::{Command, SupervisorRef, tree};

/// A running supervision tree.
///
/// Cheap to clone; every clone talks to the same root. Dropping the handles does **not** stop
/// the tree (like a detached task); call [`shutdown`](Self::shutdown), or cancel the token
/// given to [`SupervisorSpec::start_with`]. Methods that talk to the root return
/// [`Error::ShuttingDown`] once it has stopped.
#[derive(Clone)]
pub struct SupervisorHandle {
    name: Arc<str>,
    root: SupervisorRef,
    events: EventHub<WorkerEvent>,
    exit: watch::Receiver<Option<TreeExit>>,
    cancel: CancellationToken,
}

impl fmt::Debug for SupervisorHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SupervisorHandle")
            .field("name", &self.name)
            .field("exit", &*self.exit.borrow())
            .finish()
    }
}

impl SupervisorSpec {
    /// Starts the tree on the current Tokio runtime with an event hub of its own.
    ///
    /// Events of the first start are published right away; subscribe with
    /// [`SupervisorSpec::start_with`] and a hub you subscribed to first if you must see them
    /// on a multi-threaded runtime.
    pub fn start(self) -> SupervisorHandle {
        self.start_with(EventHub::new("worker-supervisor"), CancellationToken::new())
    }

    /// Starts the tree publishing to `events`; cancelling `cancel` shuts it down like
    /// [`SupervisorHandle::shutdown`].
    pub fn start_with(
        self,
        events: EventHub<WorkerEvent>,
        cancel: CancellationToken,
    ) -> SupervisorHandle {
        let name = self.name.clone();
        let (root, run) = tree(Arc::new(self), cancel.clone(), events.clone(), None);
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            let exit = run.await;
            let _ = tx.send(Some(exit));
        });
        SupervisorHandle {
            name,
            root,
            events,
            exit: rx,
            cancel,
        }
    }
}

fn stopped(name: &str) -> Error {
    tracing::debug!(supervisor = name, "call on a stopped supervisor");
    Error::ShuttingDown
}

fn collect(root: SupervisorRef) -> BoxFuture<'static, Option<Vec<ChildStatus>>> {
    Box::pin(async move {
        let (tx, rx) = oneshot::channel();
        root.tx.send(Command::Children(tx)).ok()?;
        let list = rx.await.ok()?;
        let mut out = Vec::with_capacity(list.len());
        for (mut status, sub) in list {
            if let Some(sub) = sub {
                status.children = collect(sub).await.unwrap_or_default();
            }
            out.push(status);
        }
        Some(out)
    })
}

impl SupervisorHandle {
    /// The root supervisor's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The children of the root in start order, with the children of nested supervisors.
    pub async fn children(&self) -> Result<Vec<ChildStatus>> {
        collect(self.root.clone())
            .await
            .ok_or_else(|| stopped(&self.name))
    }

    /// Adds a child to the root and starts it (after the existing children in start order).
    pub async fn start_child(&self, child: ChildSpec) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.root
            .tx
            .send(Command::StartChild(child, tx))
            .map_err(|_| stopped(&self.name))?;
        rx.await.map_err(|_| stopped(&self.name))?
    }

    /// Stops one child of the root (cancel, wait its shutdown timeout, abort). A permanent or
    /// transient child stays listed as stopped and is not restarted until
    /// [`restart_child`](Self::restart_child); a temporary one leaves.
    pub async fn terminate_child(&self, name: &str) -> Result<StopOutcome> {
        let (tx, rx) = oneshot::channel();
        self.root
            .tx
            .send(Command::TerminateChild(name.to_owned(), tx))
            .map_err(|_| stopped(&self.name))?;
        rx.await.map_err(|_| stopped(&self.name))?
    }

    /// Starts a stopped child of the root again (OTP's `restart_child`); an error for an
    /// unknown name or a child that is not stopped. Under rest-for-one, children after it that
    /// waited for it start too.
    pub async fn restart_child(&self, name: &str) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.root
            .tx
            .send(Command::RestartChild(name.to_owned(), tx))
            .map_err(|_| stopped(&self.name))?;
        rx.await.map_err(|_| stopped(&self.name))?
    }

    /// Removes a stopped child of the root (OTP's `delete_child`): it is no longer listed and
    /// its name is free. An error for an unknown name or a child that is not stopped.
    pub async fn delete_child(&self, name: &str) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.root
            .tx
            .send(Command::DeleteChild(name.to_owned(), tx))
            .map_err(|_| stopped(&self.name))?;
        rx.await.map_err(|_| stopped(&self.name))?
    }

    /// The root's child counts (OTP's `count_children`).
    pub async fn count_children(&self) -> Result<ChildCounts> {
        let (tx, rx) = oneshot::channel();
        self.root
            .tx
            .send(Command::CountChildren(tx))
            .map_err(|_| stopped(&self.name))?;
        rx.await.map_err(|_| stopped(&self.name))
    }

    /// Stops the tree: children in reverse start order, each within its shutdown timeout.
    /// Returns what happened to each; an empty report if the tree had already stopped.
    pub async fn shutdown(&self) -> ShutdownReport {
        let (tx, rx) = oneshot::channel();
        if self.root.tx.send(Command::Shutdown(tx)).is_err() {
            return ShutdownReport::default();
        }
        let report = rx.await.unwrap_or_default();
        self.wait().await;
        report
    }

    /// Waits until the tree has stopped and tells how.
    pub async fn wait(&self) -> TreeExit {
        let mut rx = self.exit.clone();
        loop {
            if let Some(exit) = rx.borrow_and_update().clone() {
                return exit;
            }
            if rx.changed().await.is_err() {
                // The loop's task was dropped without reporting: treat as a shutdown.
                return rx.borrow().clone().unwrap_or(TreeExit::Shutdown);
            }
        }
    }

    /// How the tree ended, if it has.
    pub fn exit(&self) -> Option<TreeExit> {
        self.exit.borrow().clone()
    }

    /// The token whose cancellation shuts the tree down.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.cancel
    }

    /// The tree's event hub.
    pub fn events(&self) -> &EventHub<WorkerEvent> {
        &self.events
    }

    /// Subscribes to the tree's events (`"*"` for all, or a kebab-case type such as
    /// `child-exited`).
    pub fn subscribe(&self, filter: impl Into<EventFilter>) -> Subscription<WorkerEvent> {
        self.events.subscribe(filter)
    }

    /// Calls `handler` for each matching event, on a task of its own.
    pub fn on_event(
        &self,
        filter: impl Into<EventFilter>,
        handler: impl Fn(&WorkerEvent) + Send + Sync + 'static,
    ) -> EventSubscription {
        self.events.on(filter, handler)
    }

    /// Forwards the tree's events to a runtime's bus, with source `supervisor` and the
    /// kebab-case type, until the returned handle is dropped.
    pub fn forward_to(&self, runtime: &Runtime) -> EventSubscription {
        let rt = runtime.clone();
        self.events.on(EventFilter::All, move |e| {
            if let Ok(payload) = serde_json::to_value(e) {
                rt.publish(Event::new(e.kind.as_str(), crate::EXTENSION_NAME, payload));
            }
        })
    }
}
