//! [`TaskScheduler`]: the [`Scheduler`] implementation and its life cycle as an [`Extension`].

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use architectlm_core::event::{Event, EventFilter, EventHub, EventSubscription};
use architectlm_core::extensions::Page;
use architectlm_core::extensions::scheduler::{
    MAX_JITTER, MisfirePolicy, MisfireReason, MisfireRecord, OverlapPolicy, RecurringTaskConfig,
    RunRecord, SchedulePolicy, ScheduledTask, ScheduledTaskConfig, ScheduledTaskFilter,
    ScheduledTaskStatus, Scheduler, SchedulerEvent, SchedulerEventHandler, SchedulerEventType,
};
use architectlm_core::{
    Error, ExecuteOptions, Extension, Result, Runtime, ServiceRegistry, TaskOrigin, TaskRef,
    random_unit,
};
use architectlm_store::schedule::{
    InMemoryScheduleStore, RunState, ScheduleEntry, ScheduleRun, ScheduleStore,
    SharedScheduleStore, truncate_ms,
};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use parking_lot::{Mutex, RwLock};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::clock::{Clock, SystemClock};
use crate::cron::{CronSchedule, PatternCache, parse_timezone};
use crate::idhash::IdMap;
use crate::timer::{Timer, Timers};

#[path = "cluster.rs"]
mod cluster;
pub use self::cluster::ClusterOptions;

/// Runs queued behind a busy entry (overlap `allow` with `max_concurrent`) at most; more are
/// skipped and reported as `misfired` with reason `overlap`.
const ALLOW_QUEUE: usize = 1024;

/// Missed occurrences counted one by one at most when catching up; beyond, the count is capped.
const MISSED_COUNT_LIMIT: u32 = 10_000;

/// Settings of a [`TaskScheduler`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SchedulerOptions {
    /// Records kept in each entry's `history` — runs and misfire decisions — the newest
    /// first (default 20; 0 keeps none).
    pub history_limit: usize,
    /// Records older than this (by when they finished) leave the history as new ones arrive
    /// (default: none, only the count applies).
    pub history_max_age: Option<Duration>,
    /// How far an event subscriber may fall behind (default 1024).
    pub event_capacity: usize,
    /// Most entries that may be active (scheduled, running or paused) at once; scheduling more
    /// fails with [`Error::Unavailable`] instead of growing without bound (default 50 million).
    pub max_active: usize,
    /// How long before its time a run is acquired: claimed in the store, so that its body
    /// starts on time even when thousands are due at once (default 100 ms; zero acquires at
    /// the due time). See "Acquiring ahead" in [`TaskScheduler`]'s docs.
    pub acquire_ahead: Duration,
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        Self {
            history_limit: 20,
            history_max_age: None,
            event_capacity: architectlm_core::event::DEFAULT_EVENT_CAPACITY,
            max_active: 50_000_000,
            acquire_ahead: Duration::from_millis(100),
        }
    }
}

/// Builds a [`TaskScheduler`].
///
/// ```
/// use std::sync::Arc;
/// use architectlm_scheduler::{TaskScheduler, TokioClock};
/// use architectlm_store::schedule::InMemoryScheduleStore;
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let scheduler = TaskScheduler::builder()
///     .store(Arc::new(InMemoryScheduleStore::new()))
///     .clock(Arc::new(TokioClock::starting_at(chrono::Utc::now())))
///     .history_limit(5)
///     .build();
/// assert_eq!(scheduler.armed_timers(), 0);
/// # });
/// ```
#[must_use]
pub struct TaskSchedulerBuilder {
    store: Option<Arc<dyn ScheduleStore>>,
    cluster: Option<(Arc<dyn SharedScheduleStore>, ClusterOptions)>,
    clock: Arc<dyn Clock>,
    options: SchedulerOptions,
}

impl fmt::Debug for TaskSchedulerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskSchedulerBuilder")
            .field("store", &self.store)
            .field("clock", &self.clock)
            .field("options", &self.options)
            .field("cluster", &self.cluster.as_ref().map(|c| &c.1))
            .finish()
    }
}

impl TaskSchedulerBuilder {
    /// Runs this scheduler as one node of a cluster sharing `store` (PostgreSQL): entries
    /// scheduled on any node run on exactly one node, and runs of a node that dies are run
    /// again elsewhere once their lease expires. See [`ClusterOptions`] and the module
    /// `cluster` rules in [`TaskScheduler`]'s docs. Replaces [`store`](Self::store).
    pub fn cluster<S: SharedScheduleStore>(
        mut self,
        store: Arc<S>,
        options: ClusterOptions,
    ) -> Self {
        self.store = Some(store.clone());
        self.cluster = Some((store, options));
        self
    }

    /// Keeps entries in `store` (default: in memory).
    pub fn store(mut self, store: Arc<dyn ScheduleStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// Reads wall time from `clock` (default: [`SystemClock`]).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Records (runs and misfire decisions) kept in each entry's history (default 20).
    pub fn history_limit(mut self, n: usize) -> Self {
        self.options.history_limit = n;
        self
    }

    /// Drops history records that finished longer than `age` ago, as new ones arrive
    /// (default: no age limit).
    pub fn history_max_age(mut self, age: Duration) -> Self {
        self.options.history_max_age = Some(age);
        self
    }

    /// How far an event subscriber may fall behind.
    pub fn event_capacity(mut self, n: usize) -> Self {
        self.options.event_capacity = n;
        self
    }

    /// Most active entries at once.
    pub fn max_active(mut self, n: usize) -> Self {
        self.options.max_active = n;
        self
    }

    /// How long before its time a run is acquired (see [`SchedulerOptions::acquire_ahead`]).
    pub fn acquire_ahead(mut self, ahead: Duration) -> Self {
        self.options.acquire_ahead = ahead;
        self
    }

    /// Builds the scheduler. It runs nothing until started by a runtime.
    pub fn build(self) -> TaskScheduler {
        let clock = self.clock;
        let store = self
            .store
            .unwrap_or_else(|| Arc::new(InMemoryScheduleStore::new()));
        let events = EventHub::with_capacity("scheduler", self.options.event_capacity);
        store.on_unreadable(crate::unreadable_listener(&events));
        TaskScheduler {
            inner: Arc::new(Inner {
                store,
                timers: Timers::new(clock.clone()),
                clock,
                events,
                runtime: RwLock::new(None),
                slots: Mutex::new(IdMap::default()),
                active: AtomicUsize::new(0),
                patterns: PatternCache::new(),
                cancel: Mutex::new(CancellationToken::new()),
                stopped: AtomicBool::new(false),
                epoch: AtomicU64::new(0),
                firing: AtomicUsize::new(0),
                driver: Mutex::new(None),
                cluster: self
                    .cluster
                    .map(|(store, opts)| cluster::Cluster::new(store, opts)),
                options: self.options,
            }),
        }
    }
}

/// What only this node knows about an entry while something happens to it: its runs going on
/// and waiting. The entry itself lives only in the store; an idle entry has no slot at all (only
/// its timer), so that a pending entry costs no memory here.
#[derive(Default)]
struct SlotState {
    /// Runs of this entry going on now.
    running: u32,
    /// Claimed runs waiting for a free place (overlap `queue-one`, or `allow` at its limit).
    pending: VecDeque<DateTime<Utc>>,
    /// Runs acquired ahead of their time whose body has not started (counted in `running`).
    /// Cancelling closes their claims; pausing moves them to `pending`.
    acquired: Dues,
}

impl SlotState {
    /// Turns the acquired runs into waiting ones (they were cancelled or paused before their
    /// time); the runs themselves see that they were and do not start.
    fn revoke_acquired(&mut self) {
        let n = self.acquired.len() as u32;
        self.running = self.running.saturating_sub(n);
        for d in self.acquired.take().into_iter().rev() {
            self.pending.push_front(d);
        }
    }
}

/// Due times in order, the first kept inline: an entry rarely has more than one run acquired,
/// and checking it at the run's start then reads no memory apart from the entry's slot.
#[derive(Default)]
struct Dues {
    /// `None` only when `rest` is empty too.
    first: Option<DateTime<Utc>>,
    rest: Vec<DateTime<Utc>>,
}

impl Dues {
    fn push(&mut self, d: DateTime<Utc>) {
        if self.first.is_none() {
            self.first = Some(d);
        } else {
            self.rest.push(d);
        }
    }

    fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len()
    }

    fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    /// Removes `d`; whether it was there.
    fn remove(&mut self, d: DateTime<Utc>) -> bool {
        if self.first == Some(d) {
            self.first = (!self.rest.is_empty()).then(|| self.rest.remove(0));
            return true;
        }
        match self.rest.iter().position(|x| *x == d) {
            Some(i) => {
                self.rest.remove(i);
                true
            }
            None => false,
        }
    }

    /// All of them, in order, leaving none.
    fn take(&mut self) -> Vec<DateTime<Utc>> {
        let mut all = Vec::with_capacity(self.len());
        all.extend(self.first.take());
        all.append(&mut self.rest);
        all
    }
}

/// A run ready to start: acquired ahead of its time and held by the timers until then, with
/// everything its start needs made in advance.
struct Ready {
    slot: Slot,
    id: Uuid,
    due: DateTime<Utc>,
    starts: u32,
    /// The start of the scheduler it was acquired under.
    epoch: u64,
    task_id: String,
    attempts: u32,
    /// The execution, resolved by the runtime but not started (`None` without a runtime).
    run: Option<Execution>,
    /// What became of it when many runs of an instant were started (see
    /// [`TaskScheduler::start_many`]).
    outcome: Held,
}

/// What became of a held run started with the others of its instant: what is left to do is
/// done once every run of the instant has started.
enum Held {
    /// Not started yet.
    Waiting,
    /// Its body finished as it started: the start and the outcome, to record.
    Ended(DateTime<Utc>, Result<Value>),
    /// Its body goes on in a task of its own, which records its end.
    Moved,
    /// Cancelled, paused or acquired before a stop: its slot is given back.
    Refused,
    /// No runtime to run it: its place is given back and its claim left open.
    Abandoned,
}

/// A run's execution as the runtime returns it, boxed so that it can be built ahead, polled
/// in place and moved to a task of its own if it has to wait.
type Execution = Pin<Box<dyn Future<Output = Result<Value>> + Send>>;

/// Firings being handled at most (loading, deciding and claiming their runs). More wait, so
/// that a large backlog of acquisitions does not queue ahead of runs whose time has come.
const FIRING_LIMIT: usize = 64;

/// A firing being handled: counted in `Inner::firing` until dropped, when the driver is told
/// if that makes room for more.
struct Firing(TaskScheduler);

impl Drop for Firing {
    fn drop(&mut self) {
        if self.0.inner.firing.fetch_sub(1, Ordering::AcqRel) == FIRING_LIMIT / 2 + 1 {
            self.0.inner.timers.notify();
        }
    }
}

/// The runs of one instant, started a chunk per task: the ends of those that finished at once
/// are recorded when the last task is done, so that recording them (and freeing what the runs
/// were built with) does not delay the others' starts.
struct StartBatch {
    tasks_left: AtomicUsize,
    done: Mutex<Vec<Vec<Ready>>>,
}

/// The lock of one entry: every change of an entry happens under it (read from the store,
/// decide, write back). Created on first use, dropped when unused and idle.
type Slot = Arc<tokio::sync::Mutex<SlotState>>;

struct Inner {
    store: Arc<dyn ScheduleStore>,
    clock: Arc<dyn Clock>,
    timers: Timers<Ready>,
    events: EventHub<SchedulerEvent>,
    runtime: RwLock<Option<Runtime>>,
    /// Slots of the entries in use (being changed, fired, or running).
    slots: Mutex<IdMap<Slot>>,
    /// Active entries (scheduled, running or paused) this scheduler serves.
    active: AtomicUsize,
    patterns: PatternCache,
    /// Stops the driver; a fresh token per start, so a scheduler can be started again.
    cancel: Mutex<CancellationToken>,
    stopped: AtomicBool,
    /// Counts starts, so that a run acquired before a stop does not start after a restart
    /// (the restart runs it again from its claim).
    epoch: AtomicU64,
    /// Firings being handled (at most [`FIRING_LIMIT`] handed out).
    firing: AtomicUsize,
    driver: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Set when this scheduler is one node of a cluster.
    cluster: Option<cluster::Cluster>,
    options: SchedulerOptions,
}

/// A durable scheduler of one-shot and cron runs of the runtime's tasks.
///
/// # Semantics
/// - **Time.** A run never starts before its due time (the timer driver re-checks the wall
///   clock). A recurring entry's next run is found from its previous *scheduled* time, so late
///   runs never shift the schedule. Time zones and DST follow [`crate::cron`].
/// - **A past `execute_at`** means "run now": the entry is accepted and runs at once; its
///   recorded due time is the given `execute_at`. The misfire policy applies only to runs
///   missed while the scheduler was stopped, the entry was paused, or the scheduler fell
///   behind by more than the misfire threshold.
/// - **Durability.** Each change is written to the [`ScheduleStore`] before it is returned or
///   announced. Before a run starts, its `(entry, due time)` is claimed in the store in the same
///   write that advances the entry's next run; a due time is claimed at most once, so a run
///   that completed is never run again for the same due time.
/// - **Crash (at-least-once).** A run that was claimed but had not finished when the process
///   died is started again on the next start, with the same idempotency key
///   (`"{entry id}@{due time, RFC 3339}"`, visible to the task as
///   [`TaskContext::idempotency_key`](architectlm_core::TaskContext::idempotency_key)); its
///   run record counts the extra start. Tasks that must not repeat a side effect use the key.
/// - **Misfires** (missed by more than `misfire_threshold`): `skip` runs none of them and
///   carries on from the next due time (a skipped one-shot entry ends `failed`); `fire-once`
///   runs once, for the latest missed due time; `fire-all { max }` runs the earliest `max`
///   missed ones. Each decision emits `misfired` with the count.
/// - **Overlap** (a run is due while the previous one still runs): `allow` starts it (up to
///   `max_concurrent`, then up to 1024 wait); `skip` skips it (`misfired`, reason `overlap`);
///   `queue-one` keeps one to start when the running one ends. Waiting runs are claimed.
///   The catch-up runs of `fire-all` are never skipped as overlaps: they wait for each other.
/// - **Pause** stops new runs (running ones finish; waiting ones wait); **resume** treats what
///   was missed meanwhile by the misfire policy. **Cancel** is final; running runs finish,
///   waiting ones are dropped. **Trigger** runs an entry now, outside of its schedule, without
///   moving it or counting toward `max_executions`. **Reschedule** moves the next run.
/// - **Acquiring ahead.** A run is acquired up to [`SchedulerOptions::acquire_ahead`] (100 ms
///   by default) before its time: its entry is read, the misfire policy applied and the run
///   claimed then, so that its body starts at its time even when thousands are due at the same
///   instant (they start together, from a few tasks; the ends of those that finish at once are
///   recorded after all have started). From the acquisition the entry reads `running` and
///   counts the run in `execution_count`; its `started` event and body come at the due time,
///   never before. A cancel in that window stops the run (its claim is closed as "cancelled
///   before it started"); a pause holds it until the resume, like a queued run; a reschedule
///   moves the entry's next run but not the acquired one (a one-shot entry's reschedule then
///   answers `false`). While a run of the entry still goes, the next one is not acquired ahead:
///   whether it overlaps is decided at its time. A run acquired before a crash follows the
///   at-least-once rule above. With the system clock, the last 2 ms before the instant are
///   slept on a blocking thread, so runs start within about 0.1 ms of it rather than at Tokio's
///   next millisecond tick. Zero turns acquiring ahead off.
/// - **Shutdown** stops the timer driver; runs the runtime is finishing are recorded.
/// - **Several nodes** ([`TaskSchedulerBuilder::cluster`], a shared PostgreSQL store): no
///   entries are held in memory; each node polls the store's next-run index for due entries
///   (`FOR UPDATE SKIP LOCKED`), claims runs in batches with itself as owner and a lease, renews
///   its leases every `lease / 3`, and takes over runs whose lease expired. Each
///   `(entry, due time)` is claimed exactly once across nodes; a run of a node that died runs
///   again elsewhere (same idempotency key) about one lease after the death. Overlap policies
///   and concurrency limits count the runs of every node, and jitter is applied with a delay
///   every node agrees on; `max_active` is not applied in this mode. See `docs/multi-node.md`.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use std::sync::Arc;
/// use architectlm_core::extensions::scheduler::{RecurringTaskConfig, ScheduledTaskConfig, Scheduler};
/// use architectlm_core::{Runtime, System, TaskDefinition};
/// use architectlm_scheduler::TaskScheduler;
/// use serde_json::json;
///
/// let system = System::builder("shop")
///     .task(TaskDefinition::new("send-reminder", |input, _ctx| async move { Ok(input) })?)
///     .build()?;
/// let scheduler = Arc::new(TaskScheduler::in_memory());
/// let runtime = Runtime::builder(system).extension(scheduler.clone()).start().await?;
///
/// let in_a_minute = chrono::Utc::now() + chrono::Duration::minutes(1);
/// let id = scheduler
///     .schedule_task(ScheduledTaskConfig::new("send-reminder", json!({"to": "ada"}), in_a_minute))
///     .await?;
/// assert_eq!(scheduler.get_task(id).await?.unwrap().next_execution_at.map(|t| t.timestamp()),
///            Some(in_a_minute.timestamp()));
/// let daily = scheduler
///     .schedule_recurring_task(
///         RecurringTaskConfig::new("send-reminder", json!({}), "0 9 * * MON-FRI").timezone("Europe/Berlin"),
///     )
///     .await?;
/// assert!(scheduler.cancel_task(daily).await?);
/// runtime.shutdown(std::time::Duration::from_secs(1)).await;
/// # Ok::<_, architectlm_core::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct TaskScheduler {
    inner: Arc<Inner>,
}

impl fmt::Debug for TaskScheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskScheduler")
            .field("store", &self.inner.store)
            .field("active", &self.inner.active.load(Ordering::Relaxed))
            .field("armed", &self.inner.timers.len())
            .finish()
    }
}

/// What to do at one firing of an entry.
#[derive(Debug, Default)]
struct Plan {
    /// Due times to run (claimed together).
    run: Vec<DateTime<Utc>>,
    /// Occurrences missed and not run.
    missed: u32,
    /// The next due time after this firing.
    next: Option<DateTime<Utc>>,
}

/// The idempotency key of the run of `id` due at `due`: `"{id}@{due in RFC 3339}"` as
/// `to_rfc3339` writes it, in one allocation and without the formatting machinery (it is built
/// at every run).
/// Appends a record to an entry's run history, keeping the newest `history_limit` and none
/// older than `history_max_age`. The oldest go first, so that a full history does not grow
/// its buffer.
pub(crate) fn push_history(e: &mut ScheduleEntry, record: RunRecord, options: &SchedulerOptions) {
    let limit = options.history_limit;
    let history = &mut e.task.history;
    if let Some(age) = options.history_max_age {
        let oldest = architectlm_core::time::sub_from_utc(record.started_at, age);
        let stale = history
            .iter()
            .take_while(|r| r.finished_at.unwrap_or(r.started_at) < oldest)
            .count();
        history.drain(..stale);
    }
    let excess = (history.len() + 1).saturating_sub(limit).min(history.len());
    history.drain(..excess);
    if limit > 0 {
        history.push(record);
    }
}

fn idempotency_key(id: Uuid, due: DateTime<Utc>) -> String {
    use chrono::{Datelike, Timelike};
    let mut key = String::with_capacity(72);
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    key.push_str(id.hyphenated().encode_lower(&mut buf));
    key.push('@');
    let year = due.year();
    let nanos = due.nanosecond();
    if !(0..=9999).contains(&year) || nanos >= 1_000_000_000 {
        // Years with a sign or five digits, and leap seconds: as chrono writes them.
        key.push_str(&due.to_rfc3339());
        return key;
    }
    fn digits(key: &mut String, v: u32, width: u32) {
        for k in (0..width).rev() {
            let d = (v / 10u32.pow(k)) % 10;
            key.push(char::from(b'0' + d as u8));
        }
    }
    digits(&mut key, year as u32, 4);
    key.push('-');
    digits(&mut key, due.month(), 2);
    key.push('-');
    digits(&mut key, due.day(), 2);
    key.push('T');
    digits(&mut key, due.hour(), 2);
    key.push(':');
    digits(&mut key, due.minute(), 2);
    key.push(':');
    digits(&mut key, due.second(), 2);
    // As many fraction digits as needed: none, milliseconds, microseconds or nanoseconds.
    if nanos != 0 {
        key.push('.');
        if nanos.is_multiple_of(1_000_000) {
            digits(&mut key, nanos / 1_000_000, 3);
        } else if nanos.is_multiple_of(1_000) {
            digits(&mut key, nanos / 1_000, 6);
        } else {
            digits(&mut key, nanos, 9);
        }
    }
    key.push_str("+00:00");
    key
}

fn kind(e: &ScheduleEntry) -> &'static str {
    if e.task.is_recurring() {
        "recurring"
    } else {
        "one-shot"
    }
}

impl TaskScheduler {
    /// Starts building a scheduler.
    pub fn builder() -> TaskSchedulerBuilder {
        TaskSchedulerBuilder {
            store: None,
            cluster: None,
            clock: Arc::new(SystemClock),
            options: SchedulerOptions::default(),
        }
    }

    /// A scheduler keeping its entries in memory (lost with the process).
    pub fn in_memory() -> Self {
        Self::builder().build()
    }

    /// A scheduler keeping its entries in the SQLite database at `path` (created if missing).
    #[cfg(feature = "sqlite")]
    #[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
    pub async fn sqlite(path: impl AsRef<std::path::Path>) -> Result<Self> {
        use architectlm_store::schedule::SqliteScheduleStore;
        use architectlm_store::sqlite::{SqliteDb, SqliteOptions};
        let db = SqliteDb::open(SqliteOptions::file(path))?;
        let store = SqliteScheduleStore::open(db).await?;
        Ok(Self::builder().store(Arc::new(store)).build())
    }

    /// A scheduler that is one node of a cluster sharing the PostgreSQL database `db` (its
    /// tables are created if missing; safe when several nodes start at once). Shorthand for
    /// [`TaskSchedulerBuilder::cluster`] with a
    /// [`PgScheduleStore`](architectlm_store::schedule::PgScheduleStore).
    ///
    /// ```no_run
    /// # async fn demo() -> architectlm_core::Result<()> {
    /// use architectlm_scheduler::{ClusterOptions, TaskScheduler};
    /// use architectlm_store::postgres::{PgDb, PgOptions};
    ///
    /// let db = PgDb::connect(PgOptions::new("postgres://postgres@127.0.0.1:5432/test")).await?;
    /// let scheduler = TaskScheduler::postgres(db, ClusterOptions::new("host-a/1")).await?;
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "postgres")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    pub async fn postgres(
        db: architectlm_store::postgres::PgDb,
        options: ClusterOptions,
    ) -> Result<Self> {
        let store = architectlm_store::schedule::PgScheduleStore::open(db).await?;
        Ok(Self::builder().cluster(Arc::new(store), options).build())
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn ScheduleStore> {
        &self.inner.store
    }

    /// Timers armed now (one per entry waiting for its next run).
    pub fn armed_timers(&self) -> usize {
        self.inner.timers.len()
    }

    /// Active entries (scheduled, running or paused) this scheduler serves; 0 in cluster
    /// mode, where entries are not held by a node.
    pub fn active_entries(&self) -> usize {
        self.inner.active.load(Ordering::Relaxed)
    }

    /// The cache of parsed cron patterns.
    pub fn patterns(&self) -> &PatternCache {
        &self.inner.patterns
    }

    fn runtime(&self) -> Option<Runtime> {
        self.inner.runtime.read().clone()
    }

    fn now(&self) -> DateTime<Utc> {
        self.inner.clock.now()
    }

    /// Whether anybody listens to events (the scheduler's hub or the runtime's bus).
    fn listening(&self) -> bool {
        self.inner.events.has_subscribers()
            || self
                .inner
                .runtime
                .read()
                .as_ref()
                .is_some_and(|r| r.events().has_subscribers())
    }

    /// Publishes an event to the scheduler's hub and the runtime's bus; builds it only if
    /// somebody listens.
    fn emit(&self, t: SchedulerEventType, entry: &ScheduleEntry, payload: impl FnOnce() -> Value) {
        self.emit_for(t, entry.id(), &entry.task.task_id, payload);
    }

    /// [`emit`](Self::emit) for the entry `id` of the runtime task `task_id`.
    fn emit_for(
        &self,
        t: SchedulerEventType,
        id: Uuid,
        task_id: &str,
        payload: impl FnOnce() -> Value,
    ) {
        if !self.listening() {
            return;
        }
        let local = self.inner.events.has_subscribers();
        let runtime = self.runtime();
        let to_bus = runtime
            .as_ref()
            .is_some_and(|r| r.events().has_subscribers());
        if !local && !to_bus {
            return;
        }
        let mut event = SchedulerEvent::new(t, id, task_id, payload());
        event.timestamp = self.now();
        if let (Some(r), true) = (runtime, to_bus) {
            let payload = serde_json::to_value(&event).unwrap_or(Value::Null);
            r.publish(Event::new(t.as_str(), "scheduler", payload));
        }
        if local {
            self.inner.events.publish(event);
        }
    }

    /// The slot of an entry, created if it has none.
    fn slot(&self, id: Uuid) -> Slot {
        self.inner.slots.lock().entry(id).or_default().clone()
    }

    /// Gives back a slot taken by [`slot`](Self::slot): it is dropped when nobody else holds it
    /// and nothing of the entry runs or waits. Call after unlocking it.
    fn release(&self, id: Uuid, slot: Slot) {
        let mut slots = self.inner.slots.lock();
        let ours = slots.get(&id).is_some_and(|s| Arc::ptr_eq(s, &slot));
        if ours
            && Arc::strong_count(&slot) == 2
            && let Ok(st) = slot.try_lock()
            && st.running == 0
            && st.pending.is_empty()
            && st.acquired.is_empty()
        {
            drop(st);
            slots.remove(&id);
        }
    }

    /// Counts an entry that stopped being active (`was_active` before the write of `now`).
    fn note_end(&self, was_active: bool, now: &ScheduleEntry) {
        if was_active && !now.is_active() {
            self.count_ended();
        }
    }

    /// Counts one active entry fewer.
    fn count_ended(&self) {
        let _ = self
            .inner
            .active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_sub(1))
            });
    }

    fn schedule_of(&self, e: &ScheduleEntry) -> Result<Option<CronSchedule>> {
        match &e.task.pattern {
            None => Ok(None),
            Some(p) => {
                CronSchedule::with_cache(&self.inner.patterns, p, e.task.timezone.as_deref())
                    .map(Some)
            }
        }
    }

    /// The occurrence after `due` that the entry may still run, within `end_at` and
    /// `max_executions` (counting `claimed` more runs than recorded).
    fn next_after(
        &self,
        e: &ScheduleEntry,
        due: DateTime<Utc>,
        claimed: u32,
    ) -> Option<DateTime<Utc>> {
        let sched = self.schedule_of(e).ok().flatten()?;
        if e.max_executions
            .is_some_and(|m| e.task.execution_count + claimed >= m)
        {
            return None;
        }
        let next = sched.next_after(due)?;
        if e.end_at.is_some_and(|end| next > end) {
            return None;
        }
        Some(next)
    }

    fn check_task(&self, task_id: &str) -> Result<()> {
        Self::check_task_in(self.runtime().as_ref(), task_id)
    }

    /// Checks a task id against the runtime's tasks (when bound to one).
    fn check_task_in(runtime: Option<&Runtime>, task_id: &str) -> Result<()> {
        if task_id.trim().is_empty() {
            return Err(Error::invalid_config(
                "task_id",
                format!("{task_id:?}"),
                "must not be empty or only whitespace",
            ));
        }
        if let Some(r) = runtime
            && !r.system().tasks.contains_key(task_id)
        {
            return Err(Error::not_found("task", task_id));
        }
        Ok(())
    }

    fn check_policy(p: &SchedulePolicy) -> Result<()> {
        if let Some(r) = &p.retry {
            r.validate()?;
        }
        if p.max_concurrent == Some(0) {
            return Err(Error::invalid_config(
                "policy.max_concurrent",
                0,
                "must be at least 1",
            ));
        }
        if let MisfirePolicy::FireAll { max: 0 } = p.misfire {
            return Err(Error::invalid_config(
                "policy.misfire.max",
                0,
                "fire-all needs a cap of at least 1",
            ));
        }
        Ok(())
    }

    fn check_capacity(&self, n: usize) -> Result<()> {
        let active = self.inner.active.load(Ordering::Acquire);
        if active + n > self.inner.options.max_active {
            return Err(Error::Unavailable {
                id: "scheduler".into(),
                reason: format!(
                    "{active} active entries; the limit is {}",
                    self.inner.options.max_active
                ),
            });
        }
        Ok(())
    }

    fn one_shot_entry(&self, c: ScheduledTaskConfig) -> Result<ScheduleEntry> {
        self.check_task(&c.task_id)?;
        Self::one_shot_checked(c)
    }

    /// [`one_shot_entry`](Self::one_shot_entry) once the task id is checked.
    fn one_shot_checked(c: ScheduledTaskConfig) -> Result<ScheduleEntry> {
        Self::check_policy(&c.policy)?;
        crate::check_values(&c.input, &c.metadata)?;
        let at = truncate_ms(c.execute_at);
        let mut task = ScheduledTask::new(Uuid::now_v7(), c.task_id, c.input, at);
        task.description = c.description;
        task.metadata = c.metadata;
        task.remaining_executions = Some(1);
        Ok(ScheduleEntry::new(task, c.policy))
    }

    fn recurring_entry(&self, c: RecurringTaskConfig) -> Result<ScheduleEntry> {
        self.check_task(&c.task_id)?;
        Self::check_policy(&c.policy)?;
        crate::check_values(&c.input, &c.metadata)?;
        if let Some(tz) = &c.timezone {
            parse_timezone(tz)?;
        }
        let sched =
            CronSchedule::with_cache(&self.inner.patterns, &c.pattern, c.timezone.as_deref())?;
        if let Some(j) = c.jitter.filter(|j| *j > MAX_JITTER) {
            return Err(Error::invalid_config(
                "jitter",
                format!("{j:?}"),
                format!("must be at most {MAX_JITTER:?} (30 days)"),
            ));
        }
        if c.max_executions == Some(0) {
            return Err(Error::invalid_config(
                "max_executions",
                0,
                "must be at least 1 (leave it unset for no limit)",
            ));
        }
        let now = self.now();
        if let (Some(s), Some(e)) = (c.start_at, c.end_at)
            && e < s
        {
            return Err(Error::invalid_config(
                "end_at",
                e.to_rfc3339(),
                format!("is before start_at {}", s.to_rfc3339()),
            ));
        }
        let first = match c.start_at {
            Some(s) if s > now => sched.next_from(s),
            _ => sched.next_after(now),
        };
        let first = match (first, c.end_at) {
            (Some(f), Some(end)) if f > end => None,
            (f, _) => f,
        };
        let Some(first) = first else {
            return Err(match c.end_at {
                Some(end) if end < now => Error::invalid_config(
                    "end_at",
                    end.to_rfc3339(),
                    format!("is before the start {}", now.to_rfc3339()),
                ),
                Some(end) => Error::invalid_config(
                    "pattern",
                    format!("\"{}\"", c.pattern),
                    format!("has no occurrence before end_at {}", end.to_rfc3339()),
                ),
                None => Error::invalid_config(
                    "pattern",
                    format!("\"{}\"", c.pattern),
                    "has no future occurrence",
                ),
            });
        };
        let mut task = ScheduledTask::new(Uuid::now_v7(), c.task_id, c.input, first);
        task.pattern = Some(c.pattern);
        task.timezone = c.timezone;
        task.description = c.description;
        task.metadata = c.metadata;
        task.remaining_executions = c.max_executions;
        let mut entry = ScheduleEntry::new(task, c.policy);
        entry.start_at = c.start_at;
        entry.end_at = c.end_at;
        entry.max_executions = c.max_executions;
        entry.jitter = c.jitter;
        Ok(entry)
    }

    /// Persists new entries in one batch, then arms them and emits `scheduled` for each.
    async fn add(&self, entries: Vec<ScheduleEntry>) -> Result<Vec<Uuid>> {
        self.check_capacity(entries.len())?;
        let ids: Vec<Uuid> = entries.iter().map(ScheduleEntry::id).collect();
        let started = self.runtime().is_some() && !self.inner.stopped.load(Ordering::Acquire);
        let local = started && self.inner.cluster.is_none();
        let timers: Vec<Timer> = if local {
            let now = self.now();
            entries
                .iter()
                .filter_map(|e| self.timer_for(e, Some(now)))
                .collect()
        } else {
            Vec::new()
        };
        // Events are built only if somebody listens; the entries then are kept for them.
        let announced = self.listening().then(|| entries.clone());
        let n = entries.len();
        self.inner.store.insert(entries).await?;
        if let Some(c) = &self.inner.cluster {
            // Any node's poller picks them up; this one looks at once.
            c.wake();
        } else if local {
            self.inner.active.fetch_add(n, Ordering::AcqRel);
            self.inner.timers.arm_many(timers);
        }
        for e in announced.iter().flatten() {
            self.emit(
                SchedulerEventType::Scheduled,
                e,
                || json!({"next_execution_at": e.task.next_execution_at, "kind": kind(e)}),
            );
        }
        Ok(ids)
    }

    /// The timer for an entry's next run, with its jitter; lateness of that run is measured
    /// from `late_from` if later than its time.
    fn timer_for(&self, e: &ScheduleEntry, late_from: Option<DateTime<Utc>>) -> Option<Timer> {
        if !matches!(
            e.task.status,
            ScheduledTaskStatus::Scheduled | ScheduledTaskStatus::Running
        ) {
            return None;
        }
        let due = e.task.next_execution_at?;
        let fire_at = match e.jitter {
            Some(j) if !j.is_zero() => {
                // A float-to-int cast saturates; a jitter past the calendar's end fires at
                // its end.
                let ms = (j.as_millis() as f64 * random_unit()) as u64;
                architectlm_core::time::add_to_utc(due, Duration::from_millis(ms))
            }
            _ => due,
        };
        Some(Timer {
            id: e.id(),
            due,
            fire_at,
            late_from,
        })
    }

    /// Arms the timer of an entry's next run (see [`timer_for`](Self::timer_for)), or disarms
    /// it if it has none.
    fn arm(&self, e: &ScheduleEntry, late_from: Option<DateTime<Utc>>) {
        match self.timer_for(e, late_from) {
            Some(t) if !self.inner.stopped.load(Ordering::Acquire) => self.inner.timers.arm(t),
            _ => self.inner.timers.disarm(e.id()),
        }
    }

    /// Schedules many one-shot runs in one durable batch (one commit); returns their ids in
    /// order. Every config is checked before anything is stored.
    pub async fn schedule_many(&self, configs: Vec<ScheduledTaskConfig>) -> Result<Vec<Uuid>> {
        let runtime = self.runtime();
        let mut last_task: Option<String> = None;
        let entries = configs
            .into_iter()
            .map(|c| {
                // The runtime is looked up once; the same task id is checked once in a row.
                if last_task.as_deref() != Some(c.task_id.as_str()) {
                    Self::check_task_in(runtime.as_ref(), &c.task_id)?;
                    last_task = Some(c.task_id.clone());
                }
                Self::one_shot_checked(c)
            })
            .collect::<Result<Vec<_>>>()?;
        self.add(entries).await
    }

    /// The status an entry settles in given what runs and what comes next.
    fn settle(e: &mut ScheduleEntry, running: u32, pending: usize) {
        let s = &mut e.task.status;
        if matches!(
            *s,
            ScheduledTaskStatus::Cancelled | ScheduledTaskStatus::Paused
        ) {
            return;
        }
        *s = if running > 0 || pending > 0 {
            ScheduledTaskStatus::Running
        } else if e.task.next_execution_at.is_some() {
            ScheduledTaskStatus::Scheduled
        } else if e.task.error.is_some() {
            ScheduledTaskStatus::Failed
        } else {
            ScheduledTaskStatus::Completed
        };
    }

    fn remaining(e: &ScheduleEntry) -> Option<u32> {
        if e.task.is_recurring() {
            e.max_executions
                .map(|m| m.saturating_sub(e.task.execution_count))
        } else {
            Some(u32::from(e.task.execution_count == 0))
        }
    }

    /// Decides what a firing of `due` (observed at `now`, late by `late`) runs.
    fn plan(
        &self,
        e: &ScheduleEntry,
        due: DateTime<Utc>,
        now: DateTime<Utc>,
        misfire: bool,
    ) -> Plan {
        if !e.task.is_recurring() {
            if !misfire {
                return Plan {
                    run: vec![due],
                    missed: 0,
                    next: None,
                };
            }
            return match e.policy.misfire {
                MisfirePolicy::Skip => Plan {
                    run: vec![],
                    missed: 1,
                    next: None,
                },
                _ => Plan {
                    run: vec![due],
                    missed: 0,
                    next: None,
                },
            };
        }
        if !misfire {
            return Plan {
                run: vec![due],
                missed: 0,
                next: self.next_after(e, due, 1),
            };
        }
        // Every occurrence from `due` up to `now` was missed.
        let cap = match e.policy.misfire {
            MisfirePolicy::FireAll { max } => max,
            _ => 0,
        };
        let mut missed = vec![due];
        let mut last = due;
        let mut count: u32 = 1;
        let mut cur = due;
        while let Some(n) = self.next_after(e, cur, count) {
            if n > now {
                break;
            }
            count = count.saturating_add(1);
            if (missed.len() as u32) < cap {
                missed.push(n);
            }
            last = n;
            cur = n;
            if count >= MISSED_COUNT_LIMIT {
                // Jump ahead without counting each one.
                cur = now;
                break;
            }
        }
        let run = match e.policy.misfire {
            MisfirePolicy::Skip => vec![],
            MisfirePolicy::FireAll { .. } => missed,
            _ => vec![last],
        };
        let ran = run.len() as u32;
        // With max_executions, only the runs actually made count.
        let next = {
            let mut probe = e.clone();
            probe.task.execution_count += ran;
            self.next_after(&probe, cur.max(last), 0).and_then(|n| {
                if n <= now {
                    self.next_after(&probe, now, 0)
                } else {
                    Some(n)
                }
            })
        };
        Plan {
            missed: count.saturating_sub(ran),
            run,
            next,
        }
    }

    /// The next run when runs of a plan were dropped as overlaps: a plan counts every planned
    /// run toward `max_executions`, so one that ended the entry may have to go on.
    fn next_after_dropped(
        &self,
        e: &ScheduleEntry,
        planned_next: Option<DateTime<Utc>>,
        claimed: u32,
        last_due: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        if planned_next.is_some() || !e.task.is_recurring() || e.max_executions.is_none() {
            return planned_next;
        }
        let mut probe = e.clone();
        probe.task.execution_count += claimed;
        let n = self.next_after(&probe, last_due?, 0)?;
        if n <= now {
            self.next_after(&probe, now, 0)
        } else {
            Some(n)
        }
    }

    /// Handles an expired timer. The task the driver spawns for it is small until it runs
    /// (many may wait at one instant); the work is allocated when it starts.
    async fn fire(self, timer: Timer) {
        let firing = Firing(self.clone());
        if self.inner.stopped.load(Ordering::Acquire) {
            return;
        }
        Box::pin(self.fire_now(timer, firing)).await;
    }

    /// [`fire`](Self::fire)'s work.
    async fn fire_now(self, timer: Timer, firing: Firing) {
        let id = timer.id;
        let slot = self.slot(id);
        let mut st = slot.lock().await;
        let mut firing = Some(firing);
        if (st.running > 0 || !st.pending.is_empty()) && timer.fire_at > self.now() {
            // A run of the entry goes on: whether the next one overlaps is decided at its
            // time, not ahead of it. The wait does not hold up other firings.
            drop(st);
            drop(firing.take());
            self.wait_until(timer.fire_at).await;
            st = slot.lock().await;
        }
        let e = match self.inner.store.get(id).await {
            Ok(Some(e)) => e,
            Ok(None) => {
                drop(st);
                self.release(id, slot);
                return;
            }
            Err(err) => {
                tracing::error!(entry = %id, error = %err, "cannot load a due entry; it will be retried");
                let mut t = timer;
                t.fire_at = self.now() + chrono::Duration::seconds(1);
                self.inner.timers.arm(t);
                drop(st);
                self.release(id, slot);
                return;
            }
        };
        if e.task.next_execution_at.map(|t| t.timestamp_millis())
            != Some(timer.due.timestamp_millis())
            || !matches!(
                e.task.status,
                ScheduledTaskStatus::Scheduled | ScheduledTaskStatus::Running
            )
        {
            // A stale timer: the entry moved, paused or ended meanwhile. Should an entry that
            // may still run have lost its timer (it cannot, short of a generation collision in
            // the timer heap), it gets one again, so that it is never left without.
            if matches!(
                e.task.status,
                ScheduledTaskStatus::Scheduled | ScheduledTaskStatus::Running
            ) && e.task.next_execution_at.is_some()
                && !self.inner.timers.is_armed(id)
            {
                self.arm(&e, None);
            }
            drop(st);
            self.release(id, slot);
            return;
        }
        let due = e.task.next_execution_at.unwrap_or(timer.due);
        let now = self.now();
        let from = timer
            .late_from
            .map_or(timer.fire_at, |l| l.max(timer.fire_at));
        let threshold =
            chrono::Duration::from_std(e.policy.misfire_threshold).unwrap_or(chrono::Duration::MAX);
        let misfire = now - from > threshold;
        let plan = self.plan(&e, due, now, misfire);
        // Acquired ahead of its time, the run starts at its time.
        let start_at = now.max(timer.fire_at);
        // The larger steps are boxed, so that a firing waiting to be polled (there may be many
        // at one instant) stays a small task.
        let start =
            Box::pin(self.apply(&mut st, e, plan, now, start_at, misfire, timer.late_from)).await;
        drop(st);
        drop(firing);
        // The first run goes on this task (spawned by the driver already); others get their own.
        match start {
            Some((entry, due)) if start_at > now => {
                // Held until its time, then started with the others due at that instant.
                let epoch = self.inner.epoch.load(Ordering::Acquire);
                for &d in &due[1..] {
                    let ready = self.ready(slot.clone(), entry.clone(), d, 1, epoch);
                    if let Err(ready) = self.inner.timers.hold(start_at, ready) {
                        self.spawn_start(ready);
                    }
                }
                let ready = self.ready(slot, entry, due[0], 1, epoch);
                if let Err(ready) = self.inner.timers.hold(start_at, ready) {
                    Box::pin(self.start(ready)).await;
                }
            }
            Some((entry, due)) => {
                for &d in &due[1..] {
                    self.spawn_run(slot.clone(), entry.clone(), d, 1);
                }
                Box::pin(self.run(slot, entry, due[0], 1)).await;
            }
            None => self.release(id, slot),
        }
    }

    /// Claims the runs of a plan of `old` under the entry's lock; returns the entry as written
    /// and the due times of the runs to start at `start_at` (now, or later when acquired
    /// ahead), if any. `late_from` is the firing timer's (kept if the claim has to be tried
    /// again).
    #[allow(clippy::too_many_arguments)] // The second half of `fire_now`.
    async fn apply(
        &self,
        st: &mut SlotState,
        old: ScheduleEntry,
        plan: Plan,
        now: DateTime<Utc>,
        start_at: DateTime<Utc>,
        misfire: bool,
        late_from: Option<DateTime<Utc>>,
    ) -> Option<(ScheduleEntry, Vec<DateTime<Utc>>)> {
        let p = &old.policy;
        let limit = match p.overlap {
            OverlapPolicy::Allow => p.max_concurrent.unwrap_or(u32::MAX),
            _ => 1,
        };
        let cap = match p.overlap {
            OverlapPolicy::Skip => 0,
            OverlapPolicy::QueueOne => 1,
            _ => ALLOW_QUEUE,
        };
        // Catch-up runs of `fire-all` are all wanted: they wait for each other instead of
        // being skipped as overlaps.
        let cap = if misfire {
            cap.max(plan.run.len())
        } else {
            cap
        };
        // The runs to start now stay in the plan's vector (in order); the others move out.
        let mut queue = Vec::new();
        let mut overlapped = Vec::new();
        let mut start = plan.run;
        let mut starting = 0u32;
        start.retain(|&d| {
            if st.running + starting < limit && st.pending.is_empty() {
                starting += 1;
                true
            } else {
                if st.pending.len() + queue.len() < cap {
                    queue.push(d);
                } else {
                    overlapped.push(d);
                }
                false
            }
        });
        // Tried again a little later if the claim fails (nothing is changed then).
        let retry = self.timer_for(&old, late_from);
        let was_active = old.is_active();
        let first_due = old.task.next_execution_at.unwrap_or(now);
        let mut e = old;
        let claimed = (start.len() + queue.len()) as u32;
        let next = if overlapped.is_empty() {
            plan.next
        } else {
            self.next_after_dropped(&e, plan.next, claimed, overlapped.last().copied(), now)
        };
        e.task.execution_count += claimed;
        e.task.remaining_executions = Self::remaining(&e);
        e.task.next_execution_at = next;
        if plan.missed > 0 && !e.task.is_recurring() && claimed == 0 {
            e.task.error = Some(format!(
                "misfired: due at {} and skipped by the misfire policy",
                e.task.execute_at.to_rfc3339()
            ));
        }
        if !start.is_empty() {
            e.task.executed_at = Some(start_at);
        }
        // Misfire decisions go into the run history with the claim, so they outlive a restart.
        let opts = &self.inner.options;
        if plan.missed > 0 || misfire {
            let reason = MisfireReason::Late {
                policy: e.policy.misfire,
            };
            let rec = MisfireRecord::new(reason, plan.missed, claimed);
            push_history(&mut e, RunRecord::misfire(first_due, now, rec), opts);
        }
        if let Some(&skipped) = overlapped.first() {
            let reason = MisfireReason::Overlap {
                policy: e.policy.overlap,
            };
            let n = u32::try_from(overlapped.len()).unwrap_or(u32::MAX);
            let rec = MisfireRecord::new(reason, n, claimed);
            push_history(&mut e, RunRecord::misfire(skipped, now, rec), opts);
        }
        Self::settle(
            &mut e,
            st.running + start.len() as u32,
            st.pending.len() + queue.len(),
        );
        let expected = e.version;
        e.version += 1;
        let joined: Vec<DateTime<Utc>>;
        let due: &[DateTime<Utc>] = if queue.is_empty() {
            &start
        } else {
            joined = start.iter().chain(queue.iter()).copied().collect();
            &joined
        };
        let newly = match self.inner.store.claim(&e, expected, due, start_at).await {
            Ok(c) => c,
            Err(err) => {
                tracing::error!(entry = %e.id(), error = %err, "cannot claim a due run; it will be retried");
                if let Some(mut t) = retry {
                    t.fire_at = now + chrono::Duration::seconds(1);
                    self.inner.timers.arm(t);
                }
                return None;
            }
        };
        let late = plan.missed > 0 || misfire;
        // What the misfire event reports as run (only built when it is due).
        let running = if late { due.to_vec() } else { Vec::new() };
        // Due times claimed before (and so already run or running elsewhere) are not run again.
        if newly.len() != due.len() {
            start.retain(|d| newly.contains(d));
            queue.retain(|d| newly.contains(d));
        }
        st.running += start.len() as u32;
        if start_at > now {
            for &d in &start {
                st.acquired.push(d);
            }
        }
        st.pending.extend(queue.iter().copied());
        self.arm(&e, Some(now));
        if late {
            self.emit(
                SchedulerEventType::Misfired,
                &e,
                || json!({"reason": "late", "missed": plan.missed, "running": running, "policy": e.policy.misfire}),
            );
        }
        if !overlapped.is_empty() {
            self.emit(
                SchedulerEventType::Misfired,
                &e,
                || json!({"reason": "overlap", "skipped": overlapped, "policy": e.policy.overlap}),
            );
        }
        self.note_end(was_active, &e);
        (!start.is_empty()).then_some((e, start))
    }

    fn spawn_run(&self, slot: Slot, entry: ScheduleEntry, due: DateTime<Utc>, starts: u32) {
        let this = self.clone();
        tokio::spawn(async move { Box::pin(this.run(slot, entry, due, starts)).await });
    }

    /// Waits until the wall clock reads `at` (never returns before).
    async fn wait_until(&self, at: DateTime<Utc>) {
        while self.now() < at {
            let now = tokio::time::Instant::now();
            // The clocks may drift apart: then wait a tick at a time, never spinning.
            let deadline = self
                .inner
                .clock
                .deadline(at)
                .max(now + Duration::from_micros(100));
            tokio::time::sleep_until(deadline).await;
        }
    }

    /// What the start of a run needs, made in advance; only what the task needs is kept (the
    /// entry is read again when the run ends).
    fn ready(
        &self,
        slot: Slot,
        entry: ScheduleEntry,
        due: DateTime<Utc>,
        starts: u32,
        epoch: u64,
    ) -> Ready {
        let id = entry.id();
        let ScheduleEntry { task, policy, .. } = entry;
        let attempts = policy.retry.as_ref().map_or(1, |r| r.max_attempts);
        let mut options = ExecuteOptions::default()
            .idempotency_key(idempotency_key(id, due))
            .origin(TaskOrigin::ScheduledRun {
                entry_id: id,
                due_at: due,
            });
        if let Some(r) = policy.retry {
            options = options.retry(r);
        }
        let run = self.runtime().map(|rt| {
            Box::pin(rt.execute(TaskRef::Id(task.task_id.clone()), task.input, options))
                as Execution
        });
        Ready {
            slot,
            id,
            due,
            starts,
            epoch,
            task_id: task.task_id,
            attempts,
            run,
            outcome: Held::Waiting,
        }
    }

    /// Whether a held run may start now: it may not if it was cancelled or paused meanwhile
    /// (which closed or kept its claim), or acquired before a stop (its claim stays open and
    /// the next start runs it).
    fn admit(&self, st: &mut SlotState, r: &Ready) -> bool {
        if !st.acquired.remove(r.due) {
            return false;
        }
        let current = self.inner.epoch.load(Ordering::Acquire) == r.epoch
            && !self.inner.stopped.load(Ordering::Acquire);
        if !current {
            st.running = st.running.saturating_sub(1);
        }
        current
    }

    fn spawn_start(&self, ready: Ready) {
        let this = self.clone();
        tokio::spawn(async move { Box::pin(this.start(ready)).await });
    }

    /// Starts a held run now and records its outcome.
    async fn start(self, r: Ready) {
        let admitted = {
            let mut st = r.slot.lock().await;
            self.admit(&mut st, &r)
        };
        if !admitted {
            self.release(r.id, r.slot);
            return;
        }
        self.execute(r).await;
    }

    /// Runs a run's execution now and records its outcome (the run is given up, its claim left
    /// open, if there is no runtime).
    async fn execute(self, r: Ready) {
        let Ready {
            slot,
            id,
            due,
            starts,
            task_id,
            attempts,
            run,
            ..
        } = r;
        let (Some(runtime), Some(run)) = (self.runtime(), run) else {
            self.abandon(id, slot).await;
            return;
        };
        let started = self.now();
        self.emit_started(id, &task_id, due, starts, started, &runtime);
        drop(task_id);
        let outcome = run.await;
        Box::pin(self.end_run(slot, id, due, starts, started, attempts, outcome)).await;
    }

    /// Starts the held runs of one instant, one after another on this task: each body starts
    /// here; one that does not finish at once goes on in a task of its own, and the ends of
    /// those that did are recorded once all of these have started. Nothing is allocated or
    /// freed here for a run whose body finishes at once: its outcome is kept in place.
    async fn start_many(self, mut runs: Vec<Ready>, batch: Arc<StartBatch>) {
        let runtime = self.runtime();
        // Stands in for the slot of a run that moved to a task of its own (which takes the
        // slot, so that giving the slot back later finds it unshared); made when first needed.
        let mut moved: Option<Slot> = None;
        for r in &mut runs {
            let admitted = match r.slot.try_lock() {
                Ok(mut st) => self.admit(&mut st, r),
                Err(_) => {
                    let mut st = r.slot.lock().await;
                    self.admit(&mut st, r)
                }
            };
            if !admitted {
                r.outcome = Held::Refused;
                continue;
            }
            let (Some(runtime), Some(run)) = (&runtime, r.run.as_mut()) else {
                r.outcome = Held::Abandoned;
                continue;
            };
            let started = self.now();
            self.emit_started(r.id, &r.task_id, r.due, r.starts, started, runtime);
            match std::future::poll_fn(|cx| Poll::Ready(run.as_mut().poll(cx))).await {
                Poll::Ready(outcome) => r.outcome = Held::Ended(started, outcome),
                Poll::Pending => {
                    let Some(run) = r.run.take() else { continue };
                    r.outcome = Held::Moved;
                    let stand_in = moved.get_or_insert_with(Slot::default).clone();
                    let slot = std::mem::replace(&mut r.slot, stand_in);
                    let this = self.clone();
                    let (id, due, starts, attempts) = (r.id, r.due, r.starts, r.attempts);
                    tokio::spawn(async move {
                        let outcome = run.await;
                        Box::pin(this.end_run(slot, id, due, starts, started, attempts, outcome))
                            .await;
                    });
                }
            }
        }
        let all = {
            let mut done = batch.done.lock();
            done.push(runs);
            if batch.tasks_left.fetch_sub(1, Ordering::AcqRel) > 1 {
                return;
            }
            std::mem::take(&mut *done)
        };
        for r in all.into_iter().flatten() {
            let Ready {
                slot,
                id,
                due,
                starts,
                attempts,
                outcome,
                run,
                task_id,
                ..
            } = r;
            // What the run was built with is freed here, not while others started.
            drop((run, task_id));
            match outcome {
                Held::Ended(started, outcome) => {
                    let this = self.clone();
                    tokio::spawn(async move {
                        Box::pin(this.end_run(slot, id, due, starts, started, attempts, outcome))
                            .await;
                    });
                }
                Held::Refused => self.release(id, slot),
                Held::Abandoned => self.abandon(id, slot).await,
                Held::Waiting | Held::Moved => {}
            }
        }
    }

    /// A run that cannot start (no runtime): its place is given back and its claim stays open.
    async fn abandon(&self, id: Uuid, slot: Slot) {
        let mut st = slot.lock().await;
        st.running = st.running.saturating_sub(1);
        drop(st);
        self.release(id, slot);
    }

    /// Emits `started` for a run on `runtime` (which tells whether its bus has listeners without
    /// the scheduler's lock).
    fn emit_started(
        &self,
        id: Uuid,
        task_id: &str,
        due: DateTime<Utc>,
        starts: u32,
        started: DateTime<Utc>,
        runtime: &Runtime,
    ) {
        if !self.inner.events.has_subscribers() && !runtime.events().has_subscribers() {
            return;
        }
        self.emit_for(SchedulerEventType::Started, id, task_id, || {
            json!({"due_at": due, "started_at": started,
                   "idempotency_key": idempotency_key(id, due), "starts": starts})
        });
    }

    /// One run: executes the task and records its outcome.
    async fn run(self, slot: Slot, entry: ScheduleEntry, due: DateTime<Utc>, starts: u32) {
        let r = self.ready(slot, entry, due, starts, 0);
        self.execute(r).await;
    }

    /// Records the outcome of a run and starts a waiting one if a place is free.
    #[allow(clippy::too_many_arguments)] // The second half of `run`.
    async fn end_run(
        self,
        slot: Slot,
        id: Uuid,
        due: DateTime<Utc>,
        starts: u32,
        started: DateTime<Utc>,
        attempts: u32,
        outcome: Result<Value>,
    ) {
        if matches!(outcome, Err(Error::ShuttingDown)) {
            // Not run: the claim stays open and the next start runs it.
            let mut st = slot.lock().await;
            st.running = st.running.saturating_sub(1);
            drop(st);
            self.release(id, slot);
            return;
        }
        let outcome = outcome.and_then(crate::checked_result);
        let finished = self.now();
        let mut record = RunRecord::new(due, started);
        record.finished_at = Some(finished);
        let mut run = ScheduleRun::claimed(id, due, started);
        run.starts = starts;
        run.finished_at = Some(finished);
        match &outcome {
            Ok(v) => {
                record.result = Some(v.clone());
                record.attempts = 1;
                run.state = RunState::Completed;
                run.result = Some(v.clone());
            }
            Err(err) => {
                let msg = match err {
                    Error::TaskFailed { error, .. } => error.message.clone(),
                    other => other.to_string(),
                };
                record.error = Some(msg.clone());
                record.attempts = attempts;
                run.state = RunState::Failed;
                run.error = Some(msg);
            }
        }
        let mut st = slot.lock().await;
        st.running = st.running.saturating_sub(1);
        let current = match self.inner.store.get(id).await {
            Ok(Some(e)) => e,
            other => {
                let error = other.err().map(|e| e.to_string());
                tracing::error!(entry = %id, %due, error = ?error,
                    "cannot load the entry of a finished run; it stays claimed and runs again at the next start");
                drop(st);
                self.release(id, slot);
                return;
            }
        };
        let was_active = current.is_active();
        let mut e = current;
        e.task.result = record.result.clone();
        e.task.error = record.error.clone();
        e.task.executed_at = Some(started);
        push_history(&mut e, record, &self.inner.options);
        // Start a waiting run now that a place is free (not while paused).
        let mut next_run = None;
        if e.task.status != ScheduledTaskStatus::Paused
            && e.task.status != ScheduledTaskStatus::Cancelled
            && let Some(d) = st.pending.pop_front()
        {
            next_run = Some(d);
        }
        Self::settle(
            &mut e,
            st.running + u32::from(next_run.is_some()),
            st.pending.len(),
        );
        let expected = e.version;
        e.version += 1;
        let now = match self.inner.store.finish(&e, expected, &run).await {
            Ok(()) => {
                self.note_end(was_active, &e);
                e
            }
            Err(err) => {
                tracing::error!(entry = %id, %due, error = %err,
                    "cannot record the end of a run; it stays claimed and runs again at the next start");
                // The entry as stored (the write did not happen); what was read if that fails.
                e.version = expected;
                self.current(id, &e).await
            }
        };
        let ev = if outcome.is_ok() {
            SchedulerEventType::Completed
        } else {
            SchedulerEventType::Failed
        };
        self.emit(ev, &now, || {
            json!({"due_at": due, "started_at": started, "finished_at": finished,
                   "result": run.result, "error": run.error})
        });
        if let Some(d) = next_run {
            st.running += 1;
            self.spawn_run(slot.clone(), now, d, 1);
        }
        drop(st);
        self.release(id, slot);
    }

    /// Applies `change` to an entry under its lock and persists it; `Ok(None)` when the entry
    /// is unknown or `change` refuses. The slot returned is to be [released](Self::release).
    async fn modify(
        &self,
        id: Uuid,
        change: impl FnOnce(&mut ScheduleEntry, &SlotState) -> Result<bool>,
    ) -> Result<Option<(Slot, ScheduleEntry)>> {
        let slot = self.slot(id);
        let st = slot.lock().await;
        let out = async {
            let Some(mut e) = self.inner.store.get(id).await? else {
                return Ok(None);
            };
            let was_active = e.is_active();
            if !change(&mut e, &st)? {
                return Ok(None);
            }
            let expected = e.version;
            e.version += 1;
            self.inner.store.update(&e, expected).await?;
            self.note_end(was_active, &e);
            Ok(Some(e))
        }
        .await;
        drop(st);
        match out {
            Ok(Some(e)) => Ok(Some((slot, e))),
            other => {
                self.release(id, slot);
                other.map(|_| None)
            }
        }
    }

    /// The entry as stored now (`fallback` if it cannot be read).
    async fn current(&self, id: Uuid, fallback: &ScheduleEntry) -> ScheduleEntry {
        match self.inner.store.get(id).await {
            Ok(Some(e)) => e,
            _ => fallback.clone(),
        }
    }

    /// Closes the claims of an entry's waiting runs (it was cancelled).
    async fn close_pending(&self, id: Uuid, st: &mut SlotState) -> Result<()> {
        st.revoke_acquired();
        if st.pending.is_empty() {
            return Ok(());
        }
        let Some(mut cur) = self.inner.store.get(id).await? else {
            st.pending.clear();
            return Ok(());
        };
        while let Some(d) = st.pending.pop_front() {
            let mut run = ScheduleRun::claimed(id, d, self.now());
            run.state = RunState::Failed;
            run.error = Some("cancelled before it started".into());
            run.finished_at = Some(self.now());
            let mut next = cur.clone();
            let expected = next.version;
            next.version += 1;
            self.inner.store.finish(&next, expected, &run).await?;
            cur = next;
        }
        Ok(())
    }

    /// [`Scheduler::cancel_task`] under the entry's lock: stores the entry cancelled, disarms
    /// its timer and closes the claims of its waiting runs. `None` if it was not active.
    async fn cancel_locked(&self, id: Uuid, st: &mut SlotState) -> Result<Option<ScheduleEntry>> {
        let Some(mut e) = self.inner.store.get(id).await? else {
            return Ok(None);
        };
        if !e.is_active() {
            return Ok(None);
        }
        e.task.status = ScheduledTaskStatus::Cancelled;
        e.task.next_execution_at = None;
        let expected = e.version;
        e.version += 1;
        self.inner.store.update(&e, expected).await?;
        self.note_end(true, &e);
        self.inner.timers.disarm(id);
        self.close_pending(id, st).await?;
        Ok(Some(e))
    }

    /// [`Scheduler::trigger_task`] under the entry's lock.
    async fn trigger_locked(&self, id: Uuid, slot: &Slot, st: &mut SlotState) -> Result<bool> {
        let Some(mut e) = self.inner.store.get(id).await? else {
            return Ok(false);
        };
        if !e.is_active() {
            return Ok(false);
        }
        let mut due = truncate_ms(self.now());
        let expected = e.version;
        e.version += 1;
        let mut claimed = self.inner.store.claim(&e, expected, &[due], due).await?;
        if claimed.is_empty() {
            // Another run holds this millisecond: take the next one.
            due += chrono::Duration::milliseconds(1);
            let expected = e.version;
            e.version += 1;
            claimed = self.inner.store.claim(&e, expected, &[due], due).await?;
        }
        if claimed.is_empty() {
            return Ok(false);
        }
        st.running += 1;
        self.spawn_run(slot.clone(), e, due, 1);
        Ok(true)
    }

    /// Without a runtime, changes go to the store directly (the entry is not in memory).
    async fn modify_stored(
        &self,
        id: Uuid,
        change: impl FnOnce(&mut ScheduleEntry) -> Result<bool>,
    ) -> Result<Option<ScheduleEntry>> {
        let Some(mut e) = self.inner.store.get(id).await? else {
            return Ok(None);
        };
        if !change(&mut e)? {
            return Ok(None);
        }
        let expected = e.version;
        e.version += 1;
        self.inner.store.update(&e, expected).await?;
        Ok(Some(e))
    }

    async fn change(
        &self,
        id: Uuid,
        change: impl Fn(&mut ScheduleEntry, Option<&SlotState>) -> Result<bool>,
    ) -> Result<Option<(Option<Slot>, ScheduleEntry)>> {
        if let Some(c) = &self.inner.cluster {
            // Other nodes write the same entries: on a version conflict, reload and decide
            // again.
            let mut attempt = 0;
            loop {
                attempt += 1;
                match self.modify_stored(id, |e| change(e, None)).await {
                    Err(Error::Conflict { .. }) if attempt < 50 => continue,
                    Err(e) => return Err(e),
                    Ok(r) => {
                        c.wake();
                        return Ok(r.map(|e| (None, e)));
                    }
                }
            }
        }
        if self.runtime().is_some() {
            Ok(self
                .modify(id, |e, st| change(e, Some(st)))
                .await?
                .map(|(s, e)| (Some(s), e)))
        } else {
            Ok(self
                .modify_stored(id, |e| change(e, None))
                .await?
                .map(|e| (None, e)))
        }
    }

    async fn recover(&self) -> Result<()> {
        let store = &self.inner.store;
        let entries = store.load_active().await?;
        let mut open: HashMap<Uuid, Vec<ScheduleRun>> = HashMap::new();
        for r in store.unfinished_runs().await? {
            open.entry(r.entry_id).or_default().push(r);
        }
        let mut timers = Vec::with_capacity(entries.len());
        let mut restarts = Vec::new();
        let mut settled = Vec::new();
        self.inner.active.store(entries.len(), Ordering::Release);
        let now = self.now();
        let epoch = self.inner.epoch.load(Ordering::Acquire);
        {
            let mut slots = self.inner.slots.lock();
            slots.clear();
            for e in entries {
                let id = e.id();
                let mut state = SlotState::default();
                for r in open.remove(&id).unwrap_or_default() {
                    if e.task.status == ScheduledTaskStatus::Paused {
                        state.pending.push_back(r.due_at);
                    } else {
                        state.running += 1;
                        // Acquired ahead of its time before the stop: it still waits for it.
                        if r.due_at > now {
                            state.acquired.push(r.due_at);
                        }
                        restarts.push((id, r));
                    }
                }
                // What was missed while stopped follows the misfire policy.
                if let Some(t) = self.timer_for(&e, None) {
                    timers.push(t);
                }
                let busy = state.running > 0 || !state.pending.is_empty();
                if e.task.status == ScheduledTaskStatus::Running && !busy {
                    // Marked running, but nothing is left to run: settle it.
                    settled.push(id);
                }
                if busy {
                    slots.insert(id, Arc::new(tokio::sync::Mutex::new(state)));
                }
            }
        }
        self.inner.timers.arm_many(timers);
        for id in settled {
            let settled = self
                .modify(id, |e, st| {
                    if e.task.status != ScheduledTaskStatus::Running
                        || st.running > 0
                        || !st.pending.is_empty()
                    {
                        return Ok(false);
                    }
                    Self::settle(e, 0, 0);
                    Ok(true)
                })
                .await?;
            if let Some((slot, _)) = settled {
                self.release(id, slot);
            }
        }
        // Claims of entries that are no longer active (cancelled meanwhile) are closed.
        for (id, runs) in open {
            let Some(mut e) = store.get(id).await? else {
                continue;
            };
            for r in runs {
                let mut run = r.clone();
                run.state = RunState::Failed;
                run.error = Some("abandoned: the entry is no longer active".into());
                run.finished_at = Some(self.now());
                let expected = e.version;
                e.version += 1;
                store.finish(&e, expected, &run).await?;
            }
        }
        let n = restarts.len();
        for (id, r) in restarts {
            let starts = store.restart(id, r.due_at).await?;
            if let Some(entry) = store.get(id).await? {
                tracing::info!(entry = %id, due = %r.due_at, starts, "restarting a run interrupted by a stop");
                let slot = self.slot(id);
                if r.due_at > now {
                    // Acquired ahead of its time before the stop: held until then.
                    let ready = self.ready(slot, entry, r.due_at, starts, epoch);
                    if let Err(ready) = self.inner.timers.hold(r.due_at, ready) {
                        self.spawn_start(ready);
                    }
                } else {
                    self.spawn_run(slot, entry, r.due_at, starts);
                }
            }
        }
        tracing::info!(
            active = self.inner.active.load(Ordering::Acquire),
            restarted = n,
            "scheduler recovered"
        );
        Ok(())
    }

    async fn drive(self, cancel: CancellationToken) {
        let mut batch = Vec::new();
        let mut ready = Vec::new();
        let ahead = self.inner.options.acquire_ahead;
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                () = self.inner.timers.next_batch(
                    &mut batch,
                    &mut ready,
                    ahead,
                    FIRING_LIMIT.saturating_sub(self.inner.firing.load(Ordering::Acquire)),
                ) => {}
            }
            // Runs whose instant has come start first, a chunk per task so that every worker
            // takes part.
            if !ready.is_empty() {
                let batch = Arc::new(StartBatch {
                    tasks_left: AtomicUsize::new(ready.len()),
                    done: Mutex::new(Vec::with_capacity(ready.len())),
                });
                for chunk in ready.drain(..) {
                    tokio::spawn(self.clone().start_many(chunk, batch.clone()));
                }
            }
            self.inner.firing.fetch_add(batch.len(), Ordering::AcqRel);
            for t in batch.drain(..) {
                tokio::spawn(self.clone().fire(t));
            }
        }
    }
}

#[async_trait]
impl Scheduler for TaskScheduler {
    async fn schedule_task(&self, config: ScheduledTaskConfig) -> Result<Uuid> {
        let e = self.one_shot_entry(config)?;
        let id = e.id();
        self.add(vec![e]).await?;
        Ok(id)
    }

    async fn schedule_recurring_task(&self, config: RecurringTaskConfig) -> Result<Uuid> {
        let e = self.recurring_entry(config)?;
        let id = e.id();
        self.add(vec![e]).await?;
        Ok(id)
    }

    async fn cancel_task(&self, id: Uuid) -> Result<bool> {
        let changed = self.cancel_entry(id).await?;
        self.known(id, changed).await
    }

    async fn pause_task(&self, id: Uuid) -> Result<bool> {
        let changed = self.pause_entry(id).await?;
        self.known(id, changed).await
    }

    async fn resume_task(&self, id: Uuid) -> Result<bool> {
        let changed = self.resume_entry(id).await?;
        self.known(id, changed).await
    }

    async fn reschedule_task(&self, id: Uuid, execute_at: DateTime<Utc>) -> Result<bool> {
        let changed = self.reschedule_entry(id, execute_at).await?;
        self.known(id, changed).await
    }

    async fn trigger_task(&self, id: Uuid) -> Result<bool> {
        let changed = self.trigger_entry(id).await?;
        self.known(id, changed).await
    }

    async fn get_task(&self, id: Uuid) -> Result<Option<ScheduledTask>> {
        Ok(self.inner.store.get(id).await?.map(|e| e.task))
    }

    async fn get_tasks(&self, filter: ScheduledTaskFilter) -> Result<Page<ScheduledTask>> {
        let page = self.inner.store.query(&filter).await?;
        Ok(Page::new(
            page.items.into_iter().map(|e| e.task).collect(),
            page.total,
            page.next_offset,
        ))
    }

    fn on_scheduler_event(
        &self,
        filter: EventFilter,
        handler: SchedulerEventHandler,
    ) -> EventSubscription {
        self.inner.events.on(filter, move |e| handler(e))
    }
}

/// The control operations behind the [`Scheduler`] contract; each answers whether it changed
/// the entry, and [`known`](TaskScheduler::known) turns an unknown id into `NotFound`.
impl TaskScheduler {
    /// The refusal rule of the contracts: `Ok(false)` when the entry exists but the operation
    /// changes nothing (already in that state, or ended); `Err(NotFound)` for an unknown id.
    /// The extra read is paid only when nothing changed.
    async fn known(&self, id: Uuid, changed: bool) -> Result<bool> {
        if changed || self.inner.store.get(id).await?.is_some() {
            Ok(changed)
        } else {
            Err(Error::not_found("schedule entry", id))
        }
    }

    async fn cancel_entry(&self, id: Uuid) -> Result<bool> {
        if self.inner.cluster.is_none() && self.runtime().is_some() {
            // An entry nobody uses (no runs going, waiting or held, not being fired or
            // changed) and with no run claimed is cancelled in one store write without taking
            // its lock: a firing that starts meanwhile has its claim refused (the version
            // moved) and then finds the entry cancelled; one that claimed first made it
            // `running`, and the cancel is done under the lock.
            if !self.inner.slots.lock().contains_key(&id)
                && let Some(task_id) = self.inner.store.cancel_unclaimed(id).await?
            {
                self.count_ended();
                self.inner.timers.disarm(id);
                self.emit_for(SchedulerEventType::Cancelled, id, &task_id, || json!({}));
                return Ok(true);
            }
            // One pass under the entry's lock.
            let slot = self.slot(id);
            let mut st = slot.lock().await;
            let out = self.cancel_locked(id, &mut st).await;
            drop(st);
            self.release(id, slot);
            let Some(e) = out? else {
                return Ok(false);
            };
            self.emit(SchedulerEventType::Cancelled, &e, || json!({}));
            return Ok(true);
        }
        let Some((slot, e)) = self
            .change(id, |e, _| {
                if !e.is_active() {
                    return Ok(false);
                }
                e.task.status = ScheduledTaskStatus::Cancelled;
                e.task.next_execution_at = None;
                Ok(true)
            })
            .await?
        else {
            return Ok(false);
        };
        self.inner.timers.disarm(id);
        if let Some(slot) = slot {
            let mut st = slot.lock().await;
            // Waiting runs will not start: close their claims.
            let closed = self.close_pending(id, &mut st).await;
            drop(st);
            self.release(id, slot);
            closed?;
        }
        self.emit(SchedulerEventType::Cancelled, &e, || json!({}));
        Ok(true)
    }

    async fn pause_entry(&self, id: Uuid) -> Result<bool> {
        let Some((slot, e)) = self
            .change(id, |e, _| {
                if !matches!(
                    e.task.status,
                    ScheduledTaskStatus::Scheduled | ScheduledTaskStatus::Running
                ) {
                    return Ok(false);
                }
                e.task.status = ScheduledTaskStatus::Paused;
                Ok(true)
            })
            .await?
        else {
            return Ok(false);
        };
        self.inner.timers.disarm(id);
        if let Some(slot) = slot {
            // Runs acquired ahead of their time wait for the resume, as queued ones do.
            let mut st = slot.lock().await;
            st.revoke_acquired();
            drop(st);
            self.release(id, slot);
        }
        self.emit(
            SchedulerEventType::Paused,
            &e,
            || json!({"next_execution_at": e.task.next_execution_at}),
        );
        Ok(true)
    }

    async fn resume_entry(&self, id: Uuid) -> Result<bool> {
        let Some((slot, e)) = self
            .change(id, |e, st| {
                if e.task.status != ScheduledTaskStatus::Paused {
                    return Ok(false);
                }
                e.task.status = ScheduledTaskStatus::Scheduled;
                let (running, pending) = st.map_or((0, 0), |s| (s.running, s.pending.len()));
                Self::settle(e, running, pending);
                Ok(true)
            })
            .await?
        else {
            return Ok(false);
        };
        if let Some(slot) = slot {
            let mut st = slot.lock().await;
            let current = self.current(id, &e).await;
            let limit = match current.policy.overlap {
                OverlapPolicy::Allow => current.policy.max_concurrent.unwrap_or(u32::MAX),
                _ => 1,
            };
            while st.running < limit {
                let Some(d) = st.pending.pop_front() else {
                    break;
                };
                st.running += 1;
                self.spawn_run(slot.clone(), current.clone(), d, 1);
            }
            // What was missed while paused follows the misfire policy.
            self.arm(&current, None);
            drop(st);
            self.release(id, slot);
        }
        self.emit(
            SchedulerEventType::Resumed,
            &e,
            || json!({"next_execution_at": e.task.next_execution_at}),
        );
        Ok(true)
    }

    async fn reschedule_entry(&self, id: Uuid, execute_at: DateTime<Utc>) -> Result<bool> {
        let at = truncate_ms(execute_at);
        let Some((slot, e)) = self
            .change(id, |e, _| {
                if !e.is_active() {
                    return Ok(false);
                }
                if e.end_at.is_some_and(|end| at > end) {
                    return Err(Error::invalid_config(
                        "execute_at",
                        at.to_rfc3339(),
                        "is after the entry's end_at",
                    ));
                }
                if !e.task.is_recurring() {
                    if e.task.execution_count > 0 {
                        return Ok(false);
                    }
                    e.task.execute_at = at;
                }
                e.task.next_execution_at = Some(at);
                if e.task.status != ScheduledTaskStatus::Paused
                    && e.task.status != ScheduledTaskStatus::Running
                {
                    e.task.status = ScheduledTaskStatus::Scheduled;
                }
                Ok(true)
            })
            .await?
        else {
            return Ok(false);
        };
        if let Some(slot) = slot {
            let st = slot.lock().await;
            let current = self.current(id, &e).await;
            self.arm(&current, Some(self.now()));
            drop(st);
            self.release(id, slot);
        }
        self.emit(
            SchedulerEventType::Scheduled,
            &e,
            || json!({"next_execution_at": at, "kind": kind(&e), "rescheduled": true}),
        );
        Ok(true)
    }

    async fn trigger_entry(&self, id: Uuid) -> Result<bool> {
        if self.runtime().is_none() {
            return Ok(false);
        }
        if self.inner.cluster.is_some() {
            return self.cluster_trigger(id).await;
        }
        let slot = self.slot(id);
        let mut st = slot.lock().await;
        let out = self.trigger_locked(id, &slot, &mut st).await;
        drop(st);
        self.release(id, slot);
        out
    }
}

impl TaskScheduler {
    /// Subscribes to scheduler events as a stream (`on_scheduler_event` with a callback is the
    /// contract's way; this one suits tests and loops).
    pub fn subscribe(
        &self,
        filter: impl Into<EventFilter>,
    ) -> architectlm_core::Subscription<SchedulerEvent> {
        self.inner.events.subscribe(filter)
    }

    /// Entries matching a filter, one page with the total count.
    pub async fn query(
        &self,
        filter: &ScheduledTaskFilter,
    ) -> Result<architectlm_core::extensions::Page<ScheduledTask>> {
        let page = self.inner.store.query(filter).await?;
        Ok(architectlm_core::extensions::Page::new(
            page.items.into_iter().map(|e| e.task).collect(),
            page.total,
            page.next_offset,
        ))
    }
}

#[async_trait]
impl Extension for TaskScheduler {
    fn name(&self) -> &'static str {
        "scheduler"
    }

    fn register(self: Arc<Self>, registry: &mut ServiceRegistry) {
        registry.set_scheduler(self);
    }

    /// Binds to the runtime, reloads every active entry from the store, restarts runs a stop
    /// interrupted, and starts the timer driver. Overdue entries fire at once and follow their
    /// misfire policy.
    async fn start(&self, runtime: Runtime) -> Result<()> {
        if let Some(c) = &self.inner.cluster {
            c.opts.validate()?;
            *self.inner.runtime.write() = Some(runtime);
            self.inner.stopped.store(false, Ordering::Release);
            let cancel = CancellationToken::new();
            *self.inner.cancel.lock() = cancel.clone();
            let handle = self.start_cluster(cancel);
            *self.inner.driver.lock() = Some(handle);
            return Ok(());
        }
        *self.inner.runtime.write() = Some(runtime);
        self.inner.epoch.fetch_add(1, Ordering::AcqRel);
        self.inner.stopped.store(false, Ordering::Release);
        self.recover().await?;
        let cancel = CancellationToken::new();
        *self.inner.cancel.lock() = cancel.clone();
        let handle = tokio::spawn(self.clone().drive(cancel));
        *self.inner.driver.lock() = Some(handle);
        Ok(())
    }

    async fn shutdown(&self) {
        self.inner.stopped.store(true, Ordering::Release);
        self.inner.cancel.lock().cancel();
        let handle = self.inner.driver.lock().take();
        if let Some(h) = handle {
            let _ = h.await;
        }
        self.stop_cluster().await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use architectlm_core::{System, TaskDefinition};

    use super::*;
    use crate::clock::TokioClock;

    /// An entry whose timer was lost and replaced by a stale one (what a wrapped timer
    /// generation could do) gets its timer back and still runs once, on time.
    #[tokio::test(start_paused = true)]
    async fn an_active_entry_left_without_its_timer_is_armed_again() {
        let t0 = DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default();
        let clock = Arc::new(TokioClock::starting_at(t0));
        let runs = Arc::new(AtomicU32::new(0));
        let (r, c) = (runs.clone(), clock.clone());
        let task = TaskDefinition::new("t", move |_input, _ctx| {
            assert!(c.now() >= t0 + chrono::Duration::seconds(10), "ran early");
            r.fetch_add(1, Ordering::SeqCst);
            async { Ok(Value::Null) }
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let system = System::builder("heal")
            .task(task)
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        let scheduler = Arc::new(TaskScheduler::builder().clock(clock.clone()).build());
        let runtime = Runtime::builder(system)
            .extension(scheduler.clone())
            .start()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let due = t0 + chrono::Duration::seconds(10);
        let id = scheduler
            .schedule_task(ScheduledTaskConfig::new("t", json!({}), due))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        // The live timer is replaced by one for a time the entry does not have.
        let wrong = t0 + chrono::Duration::seconds(5);
        scheduler.inner.timers.arm(Timer {
            id,
            due: wrong,
            fire_at: wrong,
            late_from: None,
        });
        tokio::time::sleep(Duration::from_secs(6)).await;
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        assert_eq!(runs.load(Ordering::SeqCst), 0);
        assert_eq!(
            scheduler.armed_timers(),
            1,
            "armed again after the stale firing"
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(scheduler.armed_timers(), 0);
        runtime.shutdown(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod key_tests {
    use super::*;

    #[test]
    fn acquired_dues_keep_their_order_through_removals() {
        let t = |s: i64| DateTime::from_timestamp(s, 0).unwrap_or_default();
        let mut d = Dues::default();
        assert!(d.is_empty());
        for s in [1, 2, 3, 4] {
            d.push(t(s));
        }
        assert_eq!(d.len(), 4);
        assert!(d.remove(t(1)), "the first");
        assert!(d.remove(t(3)), "one of the rest");
        assert!(!d.remove(t(3)), "gone already");
        assert!(!d.remove(t(9)), "never there");
        d.push(t(5));
        assert_eq!(d.take(), vec![t(2), t(4), t(5)]);
        assert!(d.is_empty());
        assert_eq!(d.len(), 0);
        d.push(t(6));
        assert_eq!(d.take(), vec![t(6)]);
    }

    #[test]
    fn idempotency_key_is_id_at_rfc3339() {
        let id = Uuid::from_u128(0x1234_5678_9abc_def0_1234_5678_9abc_def0);
        for ms in [
            0_i64,
            1_700_000_000_000,
            1_700_000_000_123,
            1_700_000_000_120,
            -86_400_001,
        ] {
            let due = DateTime::from_timestamp_millis(ms).expect("time");
            assert_eq!(
                idempotency_key(id, due),
                format!("{id}@{}", due.to_rfc3339()),
                "{ms}"
            );
        }
        for (secs, nanos) in [
            (1_700_000_000, 123_456_789),
            (1_700_000_000, 123_456_000),
            (1_700_000_000, 5_000_000),
            (1_700_000_000, 1),
            (-62_167_219_200, 0),
            (-62_167_219_201, 0),
            (253_402_300_799, 999_000_000),
            (253_402_300_800, 0),
            (1_483_228_799, 1_500_000_000),
        ] {
            let due = DateTime::from_timestamp(secs, nanos).expect("time");
            assert_eq!(
                idempotency_key(id, due),
                format!("{id}@{}", due.to_rfc3339()),
                "{secs} {nanos}"
            );
        }
    }
}
