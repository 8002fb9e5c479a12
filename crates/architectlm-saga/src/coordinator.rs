//! The [`Coordinator`]: definitions, instances, recovery and the extension life cycle.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use parking_lot::{Mutex, RwLock};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use architectlm_core::event::{EventFilter, EventHub, EventSubscription, types};
use architectlm_core::extensions::saga::{
    SagaDefinition, SagaEvent, SagaEventHandler, SagaEventType, SagaFilter, SagaInstance,
    SagaStatus, SagaStepExecution, StartSagaOptions,
};
use architectlm_core::extensions::{Page, SagaCoordinator};
use architectlm_core::{Error, Event, Extension, Result, Runtime, ServiceRegistry};
use architectlm_store::saga::{
    CreateOutcome, InMemorySagaStore, SagaStore, SagaUpdate, StoredSaga,
};

use crate::definition::{Prepared, check, check_tasks};
use crate::driver::{Ended, Run};

/// The name of the extension, and the `source` of the events it forwards to the runtime's bus.
pub const SOURCE: &str = "saga-coordinator";

/// Per-instance controls shared between the API and the instance's driver.
#[derive(Debug, Default)]
pub(crate) struct Control {
    requested: Mutex<Option<String>>,
    finished: std::sync::atomic::AtomicBool,
    done: tokio::sync::Notify,
}

impl Control {
    fn finish(&self) {
        self.finished
            .store(true, std::sync::atomic::Ordering::Release);
        self.done.notify_waiters();
    }

    async fn finished(&self) {
        loop {
            let wake = self.done.notified();
            if self.finished.load(std::sync::atomic::Ordering::Acquire) {
                return;
            }
            wake.await;
        }
    }

    pub(crate) fn request(&self, reason: String) {
        self.requested.lock().get_or_insert(reason);
    }

    pub(crate) fn requested(&self) -> Option<String> {
        self.requested.lock().clone()
    }
}

#[derive(Default)]
struct Versions {
    latest: u32,
    by_version: BTreeMap<u32, Arc<Prepared>>,
}

/// An instance that recovery could not carry on because its definition version is not
/// registered. It stays as it is in the store and resumes as soon as that version is defined.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StrandedSaga {
    /// The instance.
    pub instance_id: Uuid,
    /// Its definition.
    pub saga_id: String,
    /// The version it started with.
    pub saga_version: u32,
    /// Why it cannot run, naming the versions that are registered.
    pub reason: String,
}

/// What recovery found at start-up ([`Coordinator::recovery_report`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecoveryReport {
    /// Unfinished instances carried on (forward or with their unwind).
    pub resumed: usize,
    /// Instances whose definition version is not registered.
    pub stranded: Vec<StrandedSaga>,
}

pub(crate) struct Inner {
    pub(crate) store: Arc<dyn SagaStore>,
    node: String,
    defs: RwLock<HashMap<String, Versions>>,
    runtime: OnceLock<Runtime>,
    events: EventHub<SagaEvent>,
    /// The instances this node holds: driven now, or waiting for a place.
    active: Mutex<HashMap<Uuid, Arc<Control>>>,
    /// At most this many drivers at once (`None`: no bound).
    max_in_flight: Option<usize>,
    admission: Mutex<Admission>,
    stranded: Mutex<Vec<StrandedSaga>>,
    last_recovery: Mutex<Option<RecoveryReport>>,
    tracker: TaskTracker,
    pub(crate) stop: CancellationToken,
    shutdown_timeout: Duration,
    /// Set when the store is shared by several nodes.
    lease: Option<LeaseSettings>,
    taken_over: std::sync::atomic::AtomicU64,
}

/// The places for drivers, and the sagas waiting for one in the order they came.
#[derive(Default)]
struct Admission {
    /// Drivers running (or about to), each holding a [`Place`].
    running: usize,
    waiting: VecDeque<Waiting>,
}

/// A saga journaled and held by this node, waiting for a place to be driven.
struct Waiting {
    runtime: Runtime,
    prep: Arc<Prepared>,
    stored: StoredSaga,
    control: Arc<Control>,
}

/// One of the `max_in_flight` places, held by a driver (or by `start_saga` about to start
/// one). Dropping it gives the place to the first waiting saga, so a driver that ends in any
/// way (even a panic) frees its place.
struct Place {
    inner: Arc<Inner>,
}

impl Drop for Place {
    fn drop(&mut self) {
        let next = {
            let mut a = self.inner.admission.lock();
            // A place is handed on only while a task can be spawned to use it: at the
            // runtime's teardown the waiting sagas stay in the journal for the next start.
            let handoff =
                !self.inner.stop.is_cancelled() && tokio::runtime::Handle::try_current().is_ok();
            let next = if handoff { a.waiting.pop_front() } else { None };
            if next.is_none() {
                a.running = a.running.saturating_sub(1);
            }
            next
        };
        if let Some(w) = next {
            // The place passes to the waiting saga as it is (the count does not change).
            let place = Place {
                inner: self.inner.clone(),
            };
            Coordinator {
                inner: self.inner.clone(),
            }
            .launch(w.runtime, w.prep, w.stored, w.control, false, place);
        }
    }
}

/// How a node on a shared store leases the sagas it drives.
#[derive(Debug, Clone, Copy)]
struct LeaseSettings {
    duration: Duration,
    renew_every: Duration,
    takeover_every: Duration,
}

impl Inner {
    /// The lease to take on a saga now (`None` on a store serving one node).
    fn lease_until(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        self.lease
            .map(|l| architectlm_core::time::add_to_utc(chrono::Utc::now(), l.duration))
    }

    pub(crate) fn listening(&self, runtime: &Runtime) -> bool {
        self.events.has_subscribers() || runtime.events().has_subscribers()
    }

    pub(crate) fn emit(&self, runtime: &Runtime, e: SagaEvent) {
        runtime.events().publish_with(|| {
            Event::new(
                e.event_type.as_str(),
                SOURCE,
                json!({
                    "id": e.id,
                    "saga_id": e.saga_id,
                    "instance_id": e.instance_id,
                    "step_id": e.step_id,
                    "timestamp": e.timestamp,
                    "payload": e.payload,
                }),
            )
        });
        self.events.publish(e);
    }

    fn prepared(&self, saga_id: &str, version: u32) -> Result<Arc<Prepared>> {
        let defs = self.defs.read();
        let Some(v) = defs.get(saga_id) else {
            return Err(Error::definition(format!(
                "saga \"{saga_id}\" version {version} is not registered (no version of it is)"
            )));
        };
        v.by_version.get(&version).cloned().ok_or_else(|| {
            let known: Vec<u32> = v.by_version.keys().copied().collect();
            Error::definition(format!(
                "saga \"{saga_id}\" version {version} is not registered (registered versions: {known:?})"
            ))
        })
    }
}

/// A durable saga coordinator: implements [`SagaCoordinator`] and [`Extension`].
///
/// A cheap handle (`Clone`); all clones drive the same sagas. Add it to a runtime with
/// `Runtime::builder(system).extension(Arc::new(coordinator.clone()))`; tasks then reach it
/// with `ctx.saga_coordinator()`.
///
/// # Rules
/// - **Write-ahead journal.** A step is journaled as `running` before it runs and its result is
///   journaled before the next step starts; events are published after the journal entry that
///   makes them true.
/// - **At least once.** A step that was running when the process died runs again after
///   recovery, with the same idempotency key ([`TaskContext::idempotency_key`], also the
///   step record's `idempotency_key`) and the same execution id. Steps must therefore be
///   idempotent, or pass the key to the external system so it can deduplicate. Compensations
///   follow the same rule with the key `<step key>:compensation`.
/// - **Recovery.** When the runtime starts the coordinator, every unfinished instance
///   (`created`, `running`, `compensating`) is carried on: forward, or on with its unwind. An
///   instance whose definition version is not registered is not touched: it is reported
///   ([`Coordinator::stranded`], a `SYSTEM_ERROR` event on the runtime's bus) and resumes
///   once that version is defined.
/// - **Versions.** An instance runs the definition version it started with, to the end.
///   [`define_saga`](SagaCoordinator::define_saga) with a new version makes it the one new
///   instances use; re-defining an existing version replaces it and must not change its steps
///   while instances of it are unfinished.
/// - **Step input.** A step receives `{"input": <saga input>, "results": {<step id>:
///   <result>, ...}}` with the results of the steps completed before it; a compensation
///   receives its step's result.
/// - **Compensation.** When a step fails after its retries, or the saga times out, or an
///   operator calls [`compensate_saga`](SagaCoordinator::compensate_saga), the completed steps
///   are compensated in strict reverse order (the steps of a parallel group together). A
///   step without a compensation is skipped; a failed step is compensated (first) only if it
///   is marked [`compensate_on_failure`](architectlm_core::extensions::saga::SagaStep::compensate_on_failure).
///   The saga ends `compensated`, or `failed` when a step failed before any step had taken
///   effect (nothing to undo), or `compensation-failed` when a
///   compensation failed after its retries; [`resume_compensation`](SagaCoordinator::resume_compensation)
///   carries that unwind on.
/// - **`compensate_saga` on a completed saga unwinds it**: every completed step is compensated
///   in reverse order and the saga ends `compensated`. The undo stack of a completed saga is
///   intact (its step results are journaled), and an explicit operator call is the way to
///   reverse a business transaction after the fact (a cancelled order). On a `compensated` or
///   `failed` saga it changes nothing and returns the instance; on a running one it stops
///   forward progress after the running step (which is not interrupted) and unwinds.
/// - **Timeout.** The saga timeout counts from the durable start time (so it survives a
///   restart). When it passes, the running step's cancellation token is cancelled (it stops if
///   it observes [`TaskContext::cancellation`], or finishes), and the saga unwinds.
/// - **Admission.** With [`CoordinatorBuilder::max_in_flight`] a node drives at most that
///   many sagas at once. A saga started (recovered, taken over) beyond the bound is journaled
///   as `created` with its steps `pending`, waits in this node's queue and is driven as soon
///   as a place frees, in start order; a crash loses nothing (recovery carries it on). No
///   bound by default (see the option for why).
/// - **Shutdown.** [`Extension::shutdown`] stops starting steps, waits up to the shutdown
///   timeout for running ones, and leaves unfinished sagas in the journal for the next start.
/// - **Several nodes.** On a store shared by several nodes ([`SagaStore::shared`], e.g.
///   PostgreSQL) each coordinator leases the sagas it drives
///   ([`CoordinatorBuilder::lease_duration`]), renews the leases every third of the lease, and
///   takes over the unfinished sagas of other nodes whose lease ran out
///   ([`CoordinatorBuilder::takeover_interval`]). Every journal write carries the saga's
///   fencing token, so a node that lost a saga cannot write to it and stops driving it.
///   Shutdown releases this node's leases so that the others take over at once. A node
///   with a [`max_in_flight`](CoordinatorBuilder::max_in_flight) bound takes over only as
///   many sagas as it has free places; recovery at start-up still claims all of this node's
///   own unfinished sagas and those without a live owner (the excess waits here, leased).
///
/// [`TaskContext::idempotency_key`]: architectlm_core::TaskContext::idempotency_key
/// [`TaskContext::cancellation`]: architectlm_core::TaskContext::cancellation
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use std::sync::Arc;
/// use architectlm_core::extensions::saga::{SagaDefinition, SagaStatus, SagaStep};
/// use architectlm_core::extensions::SagaCoordinator;
/// use architectlm_core::{Runtime, System, TaskDefinition};
/// use architectlm_saga::Coordinator;
/// use serde_json::json;
///
/// let system = System::builder("shop")
///     .task(TaskDefinition::new("reserve", |_, _| async { Ok(json!({"reservation": 7})) })?)
///     .task(TaskDefinition::new("release", |_, _| async { Ok(json!(null)) })?)
///     .build()?;
/// let sagas = Coordinator::in_memory();
/// sagas
///     .define_saga(
///         SagaDefinition::new("order")
///             .step(SagaStep::task("reserve", "reserve").compensate_with("release"))
///             .step(SagaStep::closure("charge", |_input, _ctx| async { Ok(json!("charged")) })),
///     )
///     .await?;
/// let runtime = Runtime::builder(system).extension(Arc::new(sagas.clone())).start().await?;
///
/// let started = sagas.start_saga("order", json!({"order": 1})).await?;
/// let done = sagas.wait_for(started.id, std::time::Duration::from_secs(5)).await?;
/// assert_eq!(done.status, SagaStatus::Completed);
/// assert_eq!(done.context["charge"], json!("charged"));
/// runtime.shutdown(std::time::Duration::from_secs(1)).await;
/// # Ok::<_, architectlm_core::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

impl fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Coordinator")
            .field("node", &self.inner.node)
            .field("definitions", &self.inner.defs.read().len())
            .field("active", &self.inner.active.lock().len())
            .field("in_flight", &self.in_flight())
            .field("max_in_flight", &self.inner.max_in_flight)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Coordinator`].
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use architectlm_saga::Coordinator;
/// use architectlm_store::saga::InMemorySagaStore;
///
/// let coordinator = Coordinator::builder()
///     .store(Arc::new(InMemorySagaStore::new()))
///     .node_id("node-a")
///     .shutdown_timeout(Duration::from_secs(5))
///     .build()
///     .unwrap();
/// # let _ = coordinator;
/// ```
#[must_use]
pub struct CoordinatorBuilder {
    store: Option<Arc<dyn SagaStore>>,
    node: Option<String>,
    shutdown_timeout: Duration,
    event_capacity: usize,
    lease_duration: Duration,
    takeover_interval: Option<Duration>,
    max_in_flight: Option<usize>,
}

impl fmt::Debug for CoordinatorBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoordinatorBuilder")
            .field("node", &self.node)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("max_in_flight", &self.max_in_flight)
            .finish_non_exhaustive()
    }
}

impl CoordinatorBuilder {
    /// Journals sagas in `store` (default: in memory).
    pub fn store(mut self, store: Arc<dyn SagaStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// The name this node records as the owner of the sagas it drives (default: random).
    pub fn node_id(mut self, id: impl Into<String>) -> Self {
        self.node = Some(id.into());
        self
    }

    /// How long shutdown waits for running steps (default 10 s).
    pub fn shutdown_timeout(mut self, t: Duration) -> Self {
        self.shutdown_timeout = t;
        self
    }

    /// How far a saga event subscriber may fall behind before it skips events (default 1024).
    pub fn event_capacity(mut self, n: usize) -> Self {
        self.event_capacity = n;
        self
    }

    /// On a store shared by several nodes ([`SagaStore::shared`]): how long this node's
    /// ownership of a saga lasts without renewal (default
    /// [`DEFAULT_LEASE`](architectlm_core::time::DEFAULT_LEASE), 30 s, as for the scheduler's
    /// runs; at most 24 h). The node renews every third
    /// of it; when the node dies, other nodes take its sagas over once the lease runs out, so
    /// this bounds failover time. Ignored on a store serving one node.
    pub fn lease_duration(mut self, d: Duration) -> Self {
        self.lease_duration = d;
        self
    }

    /// On a shared store: how often this node looks for sagas whose lease ran out, to take
    /// them over (default: a fifth of the lease duration, at most 500 ms).
    pub fn takeover_interval(mut self, d: Duration) -> Self {
        self.takeover_interval = Some(d);
        self
    }

    /// At most `n` sagas driven at once by this node (default: no bound).
    ///
    /// A saga started, recovered or taken over while `n` are in flight is journaled first
    /// (`start_saga` returns it in status `created`, its steps `pending`), so a crash loses
    /// nothing and recovery carries it on; it waits in this node's queue and is driven as soon
    /// as a place frees, in the order the sagas came (start order). Waiting sagas count
    /// for [`wait_for`](SagaCoordinator::wait_for), [`settled`](SagaCoordinator::settled) and
    /// [`active`](Coordinator::active), take compensation requests, and on a shared store keep
    /// their lease; a node takes over other nodes' sagas only into its free places. A
    /// waiting saga's `saga-started` event is published when it is driven.
    ///
    /// A saga holds its place from its first step to its end, including the time it waits
    /// inside a step, so set `n` from what the steps share (connection pools, rate limits of
    /// the systems they call): under overload, sagas then wait in the queue instead of timing
    /// out on the shared resources and being compensated. The saga timeout counts from the
    /// start, so it includes the time spent waiting for a place.
    ///
    /// There is no bound by default, for compatibility and because a bound is a deadlock
    /// risk no default can rule out: a step that waits for another saga (a child saga, a
    /// signal sent by one) waits forever if every place is held by such steps. Choose a bound
    /// that leaves room for those. `n` must be at least 1.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = Some(n);
        self
    }

    /// Builds the coordinator; errors on an empty node id, a zero event capacity or a zero
    /// `max_in_flight`.
    pub fn build(self) -> Result<Coordinator> {
        let node = self
            .node
            .unwrap_or_else(|| format!("node-{}", Uuid::new_v4()));
        if node.trim().is_empty() {
            return Err(Error::invalid_config(
                "node_id",
                format!("{node:?}"),
                "must not be empty or only whitespace",
            ));
        }
        if self.max_in_flight == Some(0) {
            return Err(Error::invalid_config(
                "max_in_flight",
                0,
                "must be at least 1 (leave it unset for no bound)",
            ));
        }
        if self.event_capacity == 0 {
            return Err(Error::invalid_config(
                "event_capacity",
                0,
                "must be at least 1",
            ));
        }
        architectlm_core::time::check_lease(
            "lease_duration",
            self.lease_duration,
            Duration::from_millis(100),
        )?;
        let takeover_every = self
            .takeover_interval
            .unwrap_or_else(|| (self.lease_duration / 5).min(Duration::from_millis(500)));
        if takeover_every.is_zero() {
            return Err(Error::invalid_config(
                "takeover_interval",
                "0s",
                "must be greater than zero",
            ));
        }
        let store = self
            .store
            .unwrap_or_else(|| Arc::new(InMemorySagaStore::new()));
        let lease = store.shared().then_some(LeaseSettings {
            duration: self.lease_duration,
            renew_every: self.lease_duration / 3,
            takeover_every,
        });
        let events = EventHub::with_capacity(SOURCE, self.event_capacity);
        // Instances the journal cannot decode are skipped by its lists and recoveries and
        // announced here.
        let hub = events.clone();
        store.on_unreadable(Arc::new(move |r| {
            hub.publish_with(|| {
                SagaEvent::new(
                    SagaEventType::RecordUnreadable,
                    "",
                    Uuid::parse_str(&r.id).unwrap_or_default(),
                    None,
                    r.to_payload(),
                )
            });
        }));
        Ok(Coordinator {
            inner: Arc::new(Inner {
                store,
                lease,
                taken_over: std::sync::atomic::AtomicU64::new(0),
                node,
                defs: RwLock::new(HashMap::new()),
                runtime: OnceLock::new(),
                events,
                active: Mutex::new(HashMap::new()),
                max_in_flight: self.max_in_flight,
                admission: Mutex::new(Admission::default()),
                stranded: Mutex::new(Vec::new()),
                last_recovery: Mutex::new(None),
                tracker: TaskTracker::new(),
                stop: CancellationToken::new(),
                shutdown_timeout: self.shutdown_timeout,
            }),
        })
    }
}

impl Coordinator {
    /// Starts building a coordinator.
    pub fn builder() -> CoordinatorBuilder {
        CoordinatorBuilder {
            store: None,
            node: None,
            shutdown_timeout: Duration::from_secs(10),
            event_capacity: architectlm_core::event::DEFAULT_EVENT_CAPACITY,
            lease_duration: architectlm_core::time::DEFAULT_LEASE,
            takeover_interval: None,
            max_in_flight: None,
        }
    }

    /// A coordinator whose sagas live in memory only.
    pub fn in_memory() -> Self {
        Self::with_store(Arc::new(InMemorySagaStore::new()))
    }

    /// A coordinator journaling in `store`.
    pub fn with_store(store: Arc<dyn SagaStore>) -> Self {
        Self {
            inner: Self::builder().store(store).build_inner(),
        }
    }

    /// A coordinator journaling in the SQLite file at `path` (created if missing; WAL,
    /// `synchronous=NORMAL`: survives a process crash). For `FULL` or other settings, open a
    /// [`SqliteDb`](architectlm_store::sqlite::SqliteDb) yourself and pass a
    /// [`SqliteSagaStore`](architectlm_store::saga::SqliteSagaStore) to
    /// [`with_store`](Self::with_store).
    #[cfg(feature = "sqlite")]
    #[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
    pub async fn sqlite(path: impl AsRef<std::path::Path>) -> Result<Self> {
        use architectlm_store::saga::SqliteSagaStore;
        use architectlm_store::sqlite::{SqliteDb, SqliteOptions};
        let db = SqliteDb::open(SqliteOptions::file(path))?;
        Ok(Self::with_store(Arc::new(SqliteSagaStore::open(db).await?)))
    }

    /// The journal.
    pub fn store(&self) -> &Arc<dyn SagaStore> {
        &self.inner.store
    }

    /// The saga event hub (for direct subscriptions and its `dropped()` count).
    pub fn events(&self) -> &EventHub<SagaEvent> {
        &self.inner.events
    }

    /// Instances that recovery could not carry on (see [`StrandedSaga`]).
    pub fn stranded(&self) -> Vec<StrandedSaga> {
        self.inner.stranded.lock().clone()
    }

    /// What recovery found when the runtime started the coordinator (`None` before that).
    pub fn recovery_report(&self) -> Option<RecoveryReport> {
        self.inner.last_recovery.lock().clone()
    }

    /// How many instances this node holds: driven now ([`in_flight`](Self::in_flight)) or
    /// waiting for a place ([`waiting`](Self::waiting)).
    pub fn active(&self) -> usize {
        self.inner.active.lock().len()
    }

    /// How many sagas this node drives now; at most
    /// [`max_in_flight`](CoordinatorBuilder::max_in_flight).
    pub fn in_flight(&self) -> usize {
        self.inner.admission.lock().running
    }

    /// How many sagas wait on this node for a place (journaled, not yet driven).
    pub fn waiting(&self) -> usize {
        self.inner.admission.lock().waiting.len()
    }

    /// The bound on sagas driven at once by this node (`None`: no bound).
    pub fn max_in_flight(&self) -> Option<usize> {
        self.inner.max_in_flight
    }

    /// The name this node records as the owner of the sagas it drives.
    pub fn node_id(&self) -> &str {
        &self.inner.node
    }

    /// The lease this node takes on the sagas it drives, when the store is shared by several
    /// nodes (`None` otherwise).
    pub fn lease_duration(&self) -> Option<Duration> {
        self.inner.lease.map(|l| l.duration)
    }

    /// How many sagas this node has taken over from other nodes whose lease ran out.
    pub fn taken_over(&self) -> u64 {
        self.inner
            .taken_over
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn is_active(&self, id: Uuid) -> bool {
        self.inner.active.lock().contains_key(&id)
    }

    /// Carries on every unfinished instance in the journal. Called once, by
    /// [`Extension::start`]: claiming bumps every unfinished instance's fencing token, which
    /// would fence out drivers already running here.
    async fn recover(&self) -> Result<RecoveryReport> {
        let runtime = self.runtime()?;
        let claimed = self
            .inner
            .store
            .claim_unfinished(&self.inner.node, self.inner.lease_until())
            .await?;
        let report = self.carry_on(&runtime, claimed);
        if report.resumed > 0 || !report.stranded.is_empty() {
            tracing::info!(
                resumed = report.resumed,
                stranded = report.stranded.len(),
                "saga recovery"
            );
        }
        Ok(report)
    }

    /// Drives the instances this node just claimed; reports those whose version is missing.
    fn carry_on(&self, runtime: &Runtime, claimed: Vec<StoredSaga>) -> RecoveryReport {
        let mut report = RecoveryReport::default();
        for stored in claimed {
            let id = stored.instance.id;
            match self
                .inner
                .prepared(&stored.instance.saga_id, stored.instance.saga_version)
            {
                Ok(prep) => {
                    if self.is_active(id) {
                        // A driver of an older claim still runs here; the fence stops it at
                        // its next write, and the new claim is driven after it.
                        let this = self.clone();
                        let rt = runtime.clone();
                        self.inner.tracker.spawn(async move {
                            this.settled(id).await;
                            this.spawn(rt, prep, stored);
                        });
                    } else {
                        self.spawn(runtime.clone(), prep, stored);
                    }
                    report.resumed += 1;
                }
                Err(e) => {
                    let s = StrandedSaga {
                        instance_id: id,
                        saga_id: stored.instance.saga_id.clone(),
                        saga_version: stored.instance.saga_version,
                        reason: format!("cannot recover saga instance {id}: {e}"),
                    };
                    tracing::error!(instance_id = %id, error = %s.reason, "saga instance not recovered");
                    runtime.emit(
                        types::SYSTEM_ERROR,
                        SOURCE,
                        json!({"kind": "saga-version-not-registered", "instance_id": id,
                               "saga_id": s.saga_id, "version": s.saga_version, "error": s.reason}),
                    );
                    let mut stranded = self.inner.stranded.lock();
                    if !stranded.iter().any(|x| x.instance_id == id) {
                        stranded.push(s.clone());
                    }
                    report.stranded.push(s);
                }
            }
        }
        report
    }

    /// On a shared store: renews this node's leases every third of the lease duration, until
    /// shutdown.
    /// Renewals and takeovers run in two tasks, so that a slow takeover never delays a renewal.
    async fn renew_loop(self, lease: LeaseSettings) {
        // Nothing needs renewing at start: claims and creates take a fresh lease.
        let mut renew = tokio::time::interval_at(
            architectlm_core::time::deadline_in(lease.renew_every),
            lease.renew_every,
        );
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stop = self.inner.stop.clone();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = renew.tick() => {
                    let until = self.inner.lease_until().unwrap_or_else(chrono::Utc::now);
                    if let Err(e) = self.inner.store.renew_leases(&self.inner.node, until).await {
                        // The fence keeps a node that lost its leases from writing.
                        tracing::warn!(node = %self.inner.node, error = %e, "cannot renew saga leases");
                    }
                }
            }
        }
    }

    /// On a shared store: takes over sagas whose owner's lease ran out, until shutdown.
    async fn takeover_loop(self, runtime: Runtime, lease: LeaseSettings) {
        let mut takeover = tokio::time::interval(lease.takeover_every);
        takeover.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stop = self.inner.stop.clone();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = takeover.tick() => {
                    if let Err(e) = self.take_over(&runtime).await {
                        tracing::warn!(node = %self.inner.node, error = %e, "cannot take over sagas");
                    }
                }
            }
        }
    }

    /// Claims the sagas of other nodes whose lease ran out and drives them here.
    async fn take_over(&self, runtime: &Runtime) -> Result<()> {
        const BATCH: usize = 256;
        loop {
            if self.inner.stop.is_cancelled() {
                return Ok(());
            }
            // Never more than this node has room for: the rest stay for the other nodes.
            let limit = self.free_places().map_or(BATCH, |free| free.min(BATCH));
            if limit == 0 {
                return Ok(());
            }
            let until = self.inner.lease_until().unwrap_or_else(chrono::Utc::now);
            let claimed = self
                .inner
                .store
                .claim_expired(&self.inner.node, until, limit)
                .await?;
            let n = claimed.len();
            if n == 0 {
                return Ok(());
            }
            tracing::info!(node = %self.inner.node, count = n, "taking over sagas whose lease ran out");
            self.inner
                .taken_over
                .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            self.carry_on(runtime, claimed);
            if n < limit {
                return Ok(());
            }
        }
    }

    fn runtime(&self) -> Result<Runtime> {
        self.inner
            .runtime
            .get()
            .cloned()
            .ok_or_else(|| Error::Extension {
                extension: SOURCE,
                source: "the coordinator is not bound to a runtime yet: add it with \
                     Runtime::builder(..).extension(..)"
                    .into(),
            })
    }

    /// Starts the driver of an instance (the caller made sure none is running).
    fn spawn(&self, runtime: Runtime, prep: Arc<Prepared>, stored: StoredSaga) {
        self.spawn_run(runtime, prep, stored, false, None);
    }

    /// Holds the instance on this node and drives it as soon as a place is free: at once, or
    /// after the sagas already waiting (see [`CoordinatorBuilder::max_in_flight`]). `place` is
    /// one `start_saga` took before journaling the instance as running.
    fn spawn_run(
        &self,
        runtime: Runtime,
        prep: Arc<Prepared>,
        stored: StoredSaga,
        fresh: bool,
        place: Option<Place>,
    ) {
        let id = stored.instance.id;
        let control = Arc::new(Control::default());
        {
            let mut active = self.inner.active.lock();
            if active.contains_key(&id) {
                return;
            }
            active.insert(id, control.clone());
        }
        let place = match place {
            Some(p) => p,
            None => {
                let mut a = self.inner.admission.lock();
                let free =
                    a.waiting.is_empty() && self.inner.max_in_flight.is_none_or(|m| a.running < m);
                if free {
                    a.running += 1;
                    drop(a);
                    Place {
                        inner: self.inner.clone(),
                    }
                } else if self.inner.stop.is_cancelled() {
                    // Shutdown drained the queue: the instance stays in the journal.
                    drop(a);
                    if let Some(c) = self.inner.active.lock().remove(&id) {
                        c.finish();
                    }
                    return;
                } else {
                    a.waiting.push_back(Waiting {
                        runtime,
                        prep,
                        stored,
                        control,
                    });
                    return;
                }
            }
        };
        self.launch(runtime, prep, stored, control, fresh, place);
    }

    /// Takes a place for a saga `start_saga` is about to journal, if one is free and no saga
    /// waits for one (waiting sagas go first).
    fn take_place(&self) -> Option<Place> {
        let mut a = self.inner.admission.lock();
        let free = a.waiting.is_empty() && self.inner.max_in_flight.is_none_or(|m| a.running < m);
        free.then(|| {
            a.running += 1;
            Place {
                inner: self.inner.clone(),
            }
        })
    }

    /// How many more sagas this node may take on now (`None`: no bound).
    fn free_places(&self) -> Option<usize> {
        self.inner.max_in_flight.map(|m| {
            let a = self.inner.admission.lock();
            m.saturating_sub(a.running + a.waiting.len())
        })
    }

    /// Starts the driver of an instance held in `active`, in the place it holds.
    fn launch(
        &self,
        runtime: Runtime,
        prep: Arc<Prepared>,
        stored: StoredSaga,
        control: Arc<Control>,
        fresh: bool,
        place: Place,
    ) {
        let id = stored.instance.id;
        let inner = self.inner.clone();
        // The driver's future is built here: the task then holds it alone, not also the
        // arguments it was built from (a parked saga keeps its task for as long as it waits).
        let run = Run::new(inner.clone(), runtime.clone(), prep, stored, control)
            .fresh(fresh)
            .run();
        // A map, not an `async` block, which would hold the driver twice.
        let task = run.map(move |ended| {
            match ended {
                Ok(Ended::Finished | Ended::Stopped) => {}
                Err(e @ Error::Conflict { .. }) => {
                    tracing::warn!(instance_id = %id, error = %e, "saga instance taken over by another owner");
                }
                Err(e) => {
                    // The journal is the truth: the instance stays unfinished there and the
                    // next recovery carries it on (on a shared store: this node's takeover,
                    // once the lease it gives up below runs out).
                    tracing::error!(instance_id = %id, error = %e, "saga driver stopped on a journal error");
                    if inner.lease.is_some() {
                        // This node still holds (and renews) the lease: claim the instance again
                        // after a pause and drive it anew.
                        let this = Coordinator { inner: inner.clone() };
                        let rt = runtime.clone();
                        inner.tracker.spawn(async move { this.redrive(rt, id).await });
                    }
                    runtime.emit(
                        types::SYSTEM_ERROR,
                        SOURCE,
                        json!({"kind": "saga-journal-error", "instance_id": id, "error": e.to_string()}),
                    );
                }
            }
            if let Some(c) = inner.active.lock().remove(&id) {
                c.finish();
            }
            // The next waiting saga takes the place.
            drop(place);
        });
        self.inner.tracker.spawn(task);
    }

    /// After a journal error on a shared store: claims the instance again and drives it, retrying
    /// until it succeeds, another node holds it, or the coordinator stops.
    async fn redrive(self, runtime: Runtime, id: Uuid) {
        let pause = self
            .inner
            .lease
            .map_or(Duration::from_secs(1), |l| l.renew_every);
        loop {
            tokio::select! {
                () = self.inner.stop.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
            self.settled(id).await;
            match self
                .inner
                .store
                .claim(id, &self.inner.node, self.inner.lease_until())
                .await
            {
                Ok(Some(stored)) if !stored.instance.status.is_terminal() => {
                    self.carry_on(&runtime, vec![stored]);
                    return;
                }
                Ok(_) | Err(Error::Conflict { .. }) => return,
                Err(e) => {
                    tracing::warn!(instance_id = %id, error = %e, "cannot claim saga instance again");
                }
            }
        }
    }

    /// Claims an instance and drives it from `status` (used to unwind a completed saga and to
    /// resume a failed unwind).
    async fn restart_unwind(
        &self,
        current: StoredSaga,
        reason: Option<String>,
    ) -> Result<SagaInstance> {
        let runtime = self.runtime()?;
        let id = current.instance.id;
        let prep = self
            .inner
            .prepared(&current.instance.saga_id, current.instance.saga_version)
            .map_err(|e| match e {
                Error::Definition(m) => {
                    Error::Definition(format!("cannot compensate saga instance {id}: {m}"))
                }
                other => other,
            })?;
        // Reserve the instance so two calls cannot both drive it.
        let control = Arc::new(Control::default());
        {
            let mut active = self.inner.active.lock();
            if active.contains_key(&id) {
                drop(active);
                return Ok(current.instance);
            }
            active.insert(id, control);
        }
        let result = async {
            let mut stored = self
                .inner
                .store
                .claim(id, &self.inner.node, self.inner.lease_until())
                .await?
                .ok_or_else(|| Error::not_found("saga instance", id))?;
            stored.instance.status = SagaStatus::Compensating;
            stored.instance.completed_at = None;
            if let Some(r) = reason {
                stored.instance.error = Some(format!("compensation requested: {r}"));
            }
            let mut up = SagaUpdate::new(id, stored.fencing, SagaStatus::Compensating);
            up.error.clone_from(&stored.instance.error);
            self.inner.store.apply(up).await?;
            Ok::<_, Error>(stored)
        }
        .await;
        if let Some(c) = self.inner.active.lock().remove(&id) {
            c.finish();
        }
        let stored = result?;
        let instance = stored.instance.clone();
        self.spawn(runtime, prep, stored);
        Ok(instance)
    }

    fn build_instance(&self, prep: &Prepared, input: Value, key: Option<String>) -> SagaInstance {
        let id = Uuid::now_v7();
        let steps = prep
            .def
            .steps
            .iter()
            .map(|s| SagaStepExecution::new(Uuid::new_v4(), s.id.clone(), format!("{id}:{}", s.id)))
            .collect();
        SagaInstance::new(
            id,
            prep.def.id.clone(),
            prep.def.version,
            input,
            key,
            crate::now(),
            steps,
        )
    }
}

impl CoordinatorBuilder {
    fn build_inner(self) -> Arc<Inner> {
        // The defaults cannot fail validation.
        match self.build() {
            Ok(c) => c.inner,
            Err(e) => unreachable!("default coordinator settings are valid: {e}"),
        }
    }
}

#[async_trait]
impl SagaCoordinator for Coordinator {
    async fn define_saga(&self, definition: SagaDefinition) -> Result<()> {
        let prep = check(definition)?;
        if let Some(rt) = self.inner.runtime.get() {
            check_tasks(&prep, rt)?;
        }
        let (id, version) = (prep.def.id.clone(), prep.def.version);
        {
            let mut defs = self.inner.defs.write();
            let v = defs.entry(id.clone()).or_default();
            v.latest = v.latest.max(version);
            v.by_version.insert(version, prep.clone());
        }
        // Instances stranded for want of this version carry on now.
        let waiting: Vec<Uuid> = {
            let mut stranded = self.inner.stranded.lock();
            let (now, keep): (Vec<_>, Vec<_>) = stranded
                .drain(..)
                .partition(|s| s.saga_id == id && s.saga_version == version);
            *stranded = keep;
            now.into_iter().map(|s| s.instance_id).collect()
        };
        if let (false, Ok(runtime)) = (waiting.is_empty(), self.runtime()) {
            for iid in waiting {
                match self
                    .inner
                    .store
                    .claim(iid, &self.inner.node, self.inner.lease_until())
                    .await
                {
                    Ok(Some(stored)) => self.spawn(runtime.clone(), prep.clone(), stored),
                    Ok(None) => {}
                    // Another node holds it now (and drives it if it knows this version).
                    Err(Error::Conflict { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    async fn start_saga(&self, saga_id: &str, input: Value) -> Result<SagaInstance> {
        self.start_saga_with(saga_id, input, StartSagaOptions::default())
            .await
    }

    async fn start_saga_with(
        &self,
        saga_id: &str,
        input: Value,
        options: StartSagaOptions,
    ) -> Result<SagaInstance> {
        if self.inner.stop.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let prep = {
            let defs = self.inner.defs.read();
            let v = defs
                .get(saga_id)
                .ok_or_else(|| Error::not_found("saga definition", saga_id))?;
            v.by_version
                .get(&v.latest)
                .cloned()
                .ok_or_else(|| Error::not_found("saga definition", saga_id))?
        };
        architectlm_core::json::check_depth(&input, "saga input")?;
        let mut instance = self.build_instance(&prep, input, options.idempotency_key);
        let runtime = self.inner.runtime.get().cloned();
        // Without a free place the instance is journaled `created` and waits for one.
        let place = runtime.as_ref().and_then(|_| self.take_place());
        if place.is_some() {
            // One journal entry records the instance and its first steps as running: the
            // write-ahead rule holds and the saga saves a round trip.
            instance.status = SagaStatus::Running;
            let now = crate::now();
            if let Some(first) = prep.groups.first() {
                for s in &mut instance.steps[first.clone()] {
                    s.status = architectlm_core::extensions::saga::SagaStepStatus::Running;
                    s.started_at = Some(now);
                }
            }
        }
        match self
            .inner
            .store
            .create_leased(&instance, &self.inner.node, self.inner.lease_until())
            .await?
        {
            CreateOutcome::Existing(found) => Ok(found.instance),
            CreateOutcome::Created(stored) => {
                // Before the runtime is bound, recovery at start-up picks the instance up.
                if let Some(rt) = runtime {
                    let fresh = place.is_some();
                    self.spawn_run(rt, prep, stored, fresh, place);
                }
                Ok(instance)
            }
        }
    }

    async fn get_saga_status(&self, instance_id: Uuid) -> Result<Option<SagaInstance>> {
        Ok(self.inner.store.get(instance_id).await?.map(|s| s.instance))
    }

    async fn compensate_saga(&self, instance_id: Uuid, reason: &str) -> Result<SagaInstance> {
        let current = self
            .inner
            .store
            .get(instance_id)
            .await?
            .ok_or_else(|| Error::not_found("saga instance", instance_id))?;
        match current.instance.status {
            SagaStatus::Created | SagaStatus::Running => {
                // Durable first, so the request survives a crash; then tell the driver.
                let stored = self
                    .inner
                    .store
                    .request_compensation(instance_id, reason)
                    .await?
                    .ok_or_else(|| Error::not_found("saga instance", instance_id))?;
                if let Some(c) = self.inner.active.lock().get(&instance_id) {
                    c.request(reason.to_owned());
                }
                if stored.instance.status == SagaStatus::Completed {
                    // It completed between the two reads.
                    return self.restart_unwind(stored, Some(reason.to_owned())).await;
                }
                Ok(stored.instance)
            }
            SagaStatus::Completed => self.restart_unwind(current, Some(reason.to_owned())).await,
            SagaStatus::CompensationFailed => self.restart_unwind(current, None).await,
            _ => Ok(current.instance),
        }
    }

    async fn resume_compensation(&self, instance_id: Uuid) -> Result<SagaInstance> {
        let current = self
            .inner
            .store
            .get(instance_id)
            .await?
            .ok_or_else(|| Error::not_found("saga instance", instance_id))?;
        if current.instance.status != SagaStatus::CompensationFailed {
            return Err(Error::InvalidInput(format!(
                "saga instance {instance_id} is {}, not compensation-failed: there is no stopped unwind to resume",
                current.instance.status.as_str()
            )));
        }
        self.restart_unwind(current, None).await
    }

    async fn list_sagas(&self, filter: SagaFilter) -> Result<Page<SagaInstance>> {
        self.inner.store.list(&filter).await
    }

    fn on_saga_event(&self, filter: EventFilter, handler: SagaEventHandler) -> EventSubscription {
        self.inner.events.on(filter, move |e| handler(e))
    }

    async fn wait_for(&self, instance_id: Uuid, timeout: Duration) -> Result<SagaInstance> {
        let mut sub = self.inner.events.subscribe(EventFilter::All);
        let wait = async {
            loop {
                let inst = self
                    .inner
                    .store
                    .get(instance_id)
                    .await?
                    .ok_or_else(|| Error::not_found("saga instance", instance_id))?;
                if inst.instance.status.is_terminal() && !self.is_active(instance_id) {
                    return Ok(inst.instance);
                }
                if self.is_active(instance_id) {
                    self.settled(instance_id).await;
                    continue;
                }
                // Wake on this instance's next event; poll now and then in case it was missed.
                let next = async {
                    while let Some(e) = sub.recv().await {
                        if e.instance_id == instance_id {
                            break;
                        }
                    }
                };
                let _ = tokio::time::timeout(Duration::from_millis(50), next).await;
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .unwrap_or_else(|_| {
                Err(Error::Timeout {
                    what: format!("waiting for saga instance {instance_id}"),
                    after: timeout,
                })
            })
    }

    async fn settled(&self, instance_id: Uuid) {
        let control = self.inner.active.lock().get(&instance_id).cloned();
        if let Some(c) = control {
            c.finished().await;
        }
    }
}

#[async_trait]
impl Extension for Coordinator {
    fn name(&self) -> &'static str {
        SOURCE
    }

    fn register(self: Arc<Self>, registry: &mut ServiceRegistry) {
        registry.set_saga_coordinator(self);
    }

    async fn start(&self, runtime: Runtime) -> Result<()> {
        let all: Vec<Arc<Prepared>> = self
            .inner
            .defs
            .read()
            .values()
            .flat_map(|v| v.by_version.values().cloned())
            .collect();
        for p in &all {
            check_tasks(p, &runtime)?;
        }
        if self.inner.runtime.set(runtime).is_err() {
            return Err(Error::Extension {
                extension: SOURCE,
                source: "the coordinator is already bound to a runtime".into(),
            });
        }
        let report = self.recover().await?;
        *self.inner.last_recovery.lock() = Some(report);
        if let (Some(lease), Ok(runtime)) = (self.inner.lease, self.runtime()) {
            self.inner.tracker.spawn(self.clone().renew_loop(lease));
            self.inner
                .tracker
                .spawn(self.clone().takeover_loop(runtime, lease));
        }
        Ok(())
    }

    async fn shutdown(&self) {
        self.inner.stop.cancel();
        // Sagas waiting for a place stay in the journal for the next start.
        let waiting = std::mem::take(&mut self.inner.admission.lock().waiting);
        for w in waiting {
            if let Some(c) = self.inner.active.lock().remove(&w.stored.instance.id) {
                c.finish();
            }
        }
        self.inner.tracker.close();
        if tokio::time::timeout(self.inner.shutdown_timeout, self.inner.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                running = self.inner.tracker.len(),
                "saga drivers still running at the shutdown deadline; recovery will carry them on"
            );
        }
        if self.inner.lease.is_some() {
            // Hand the unfinished sagas to the other nodes now rather than at lease expiry.
            match self.inner.store.release_leases(&self.inner.node).await {
                Ok(n) if n > 0 => {
                    tracing::info!(node = %self.inner.node, released = n, "saga leases released");
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(node = %self.inner.node, error = %e, "cannot release saga leases; they expire instead");
                }
            }
        }
    }
}
