//! Storage of scheduled entries and of the runs claimed for them.
//!
//! # Model
//! - A [`ScheduleEntry`] is one scheduled entry (one-shot or recurring): its public view
//!   ([`ScheduledTask`]), its policies and limits, and a version for optimistic concurrency.
//! - A [`ScheduleRun`] is the claim of one occurrence, keyed by `(entry id, due time)`. The key is
//!   unique: a due time is claimed at most once, ever (until the row is pruned, long after the
//!   entry's next run moved past it). A run is `claimed` until it ends `completed` or `failed`.
//!
//! # Rules every implementation keeps
//! - `Send + Sync`; every method may be called concurrently.
//! - Writes that take an `expected_version` apply only if the stored version equals it and fail
//!   with [`Error::Conflict`] otherwise; the caller sets the new version on the entry it passes
//!   (`expected_version + 1`).
//! - [`ScheduleStore::claim`] updates the entry and inserts the claims in one atomic step, and
//!   returns only the due times it inserted: a due time claimed before (by this node before a
//!   crash, or by another node) is left out, so it never runs twice.
//! - A successful return means the change is durable at the backend's level.
//!
//! # Several nodes
//! The contract is shaped so that a shared backend (PostgreSQL) lets several nodes serve the
//! same entries: the version check serialises changes of one entry, and the unique
//! `(entry_id, due_at)` claim key (`INSERT … ON CONFLICT DO NOTHING RETURNING due_at`) makes
//! each occurrence run on exactly one node. Nodes find due work through the index on the next
//! run (`SELECT … WHERE next_run <= $1 ORDER BY next_run FOR UPDATE SKIP LOCKED`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::time::Duration;

use architectlm_core::extensions::Page;
use architectlm_core::extensions::scheduler::{
    SchedulePolicy, ScheduledTask, ScheduledTaskFilter, ScheduledTaskStatus,
};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::{Error, Result};

/// How many finished runs per entry the store keeps; older ones are pruned.
pub const KEPT_RUNS: usize = 32;

/// One scheduled entry as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleEntry {
    /// The public view: ids, status, times, input, last result, history.
    pub task: ScheduledTask,
    /// Misfire, overlap, retry and concurrency policies.
    pub policy: SchedulePolicy,
    /// No run before this (recurring entries).
    pub start_at: Option<DateTime<Utc>>,
    /// No run after this (recurring entries).
    pub end_at: Option<DateTime<Utc>>,
    /// Stop after this many runs (recurring entries).
    pub max_executions: Option<u32>,
    /// Random delay of each run, up to this.
    #[serde(with = "architectlm_core::serde_duration::option")]
    pub jitter: Option<Duration>,
    /// Bumped by every write.
    pub version: u64,
}

impl ScheduleEntry {
    /// A new entry (version 1) around its public view.
    pub fn new(task: ScheduledTask, policy: SchedulePolicy) -> Self {
        Self {
            task,
            policy,
            start_at: None,
            end_at: None,
            max_executions: None,
            jitter: None,
            version: 1,
        }
    }

    /// The entry's id.
    pub fn id(&self) -> Uuid {
        self.task.id
    }

    /// Whether the entry may still run on its schedule (scheduled, running or paused).
    pub fn is_active(&self) -> bool {
        matches!(
            self.task.status,
            ScheduledTaskStatus::Scheduled
                | ScheduledTaskStatus::Running
                | ScheduledTaskStatus::Paused
        )
    }
}

/// The state of a claimed run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum RunState {
    /// Claimed; running or about to run. Still claimed after a crash: recovery runs it again.
    Claimed,
    /// Ended with a result.
    Completed,
    /// Ended with an error (after retries).
    Failed,
}

impl RunState {
    #[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))] // Only the database backends store it.
    fn as_str(self) -> &'static str {
        match self {
            Self::Claimed => "claimed",
            Self::Completed => "completed",
            Self::Failed => "failed",
        }
    }

    #[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))] // Only the database backends parse it.
    fn parse(s: &str) -> Result<Self> {
        match s {
            "claimed" => Ok(Self::Claimed),
            "completed" => Ok(Self::Completed),
            "failed" => Ok(Self::Failed),
            other => Err(Error::storage(format!("unknown run state \"{other}\""))),
        }
    }
}

/// The claim of one occurrence of an entry, keyed by `(entry_id, due_at)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleRun {
    /// The entry.
    pub entry_id: Uuid,
    /// The occurrence's due time (milliseconds are kept; finer digits are dropped).
    pub due_at: DateTime<Utc>,
    /// Its state.
    pub state: RunState,
    /// When it was claimed.
    pub claimed_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// How many times it was started: more than 1 when a crash interrupted it and recovery
    /// started it again.
    pub starts: u32,
    /// The output of a completed run.
    pub result: Option<Value>,
    /// The error of a failed run.
    pub error: Option<String>,
}

impl ScheduleRun {
    /// A fresh claim.
    pub fn claimed(entry_id: Uuid, due_at: DateTime<Utc>, claimed_at: DateTime<Utc>) -> Self {
        Self {
            entry_id,
            due_at: truncate_ms(due_at),
            state: RunState::Claimed,
            claimed_at,
            finished_at: None,
            starts: 1,
            result: None,
            error: None,
        }
    }
}

/// Keeps milliseconds, the resolution of the claim key.
pub fn truncate_ms(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or(t)
}

/// Storage of scheduled entries and their run claims. See the [module docs](self) for the
/// rules.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use architectlm_core::extensions::scheduler::{SchedulePolicy, ScheduledTask, ScheduledTaskFilter};
/// use architectlm_store::schedule::{InMemoryScheduleStore, ScheduleEntry, ScheduleStore};
/// use chrono::Utc;
///
/// let store = InMemoryScheduleStore::new();
/// let due = Utc::now();
/// let mut entry = ScheduleEntry::new(
///     ScheduledTask::new(uuid::Uuid::new_v4(), "send-reminder", serde_json::json!({}), due),
///     SchedulePolicy::default(),
/// );
/// store.insert(vec![entry.clone()]).await?;
/// entry.version = 2;
/// let claimed = store.claim(&entry, 1, &[due], due).await?;
/// assert_eq!(claimed.len(), 1);
/// // The same occurrence is never claimed twice.
/// entry.version = 3;
/// assert!(store.claim(&entry, 2, &[due], due).await?.is_empty());
/// let page = store.query(&ScheduledTaskFilter::new().task_id("send-reminder")).await?;
/// assert_eq!(page.total, 1);
/// # Ok::<_, architectlm_core::Error>(())
/// # }).unwrap();
/// ```
#[async_trait]
pub trait ScheduleStore: Send + Sync + fmt::Debug + 'static {
    /// Stores new entries in one atomic batch; [`Error::Conflict`] if an id exists.
    async fn insert(&self, entries: Vec<ScheduleEntry>) -> Result<()>;
    /// Replaces an entry if its stored version is `expected_version`.
    async fn update(&self, entry: &ScheduleEntry, expected_version: u64) -> Result<()>;
    /// Atomically replaces the entry (version-checked) and claims the given due times of it;
    /// returns the due times newly claimed (already claimed ones are left out).
    async fn claim(
        &self,
        entry: &ScheduleEntry,
        expected_version: u64,
        due: &[DateTime<Utc>],
        now: DateTime<Utc>,
    ) -> Result<Vec<DateTime<Utc>>>;
    /// Atomically replaces the entry (version-checked) and records the end of a claimed run.
    async fn finish(
        &self,
        entry: &ScheduleEntry,
        expected_version: u64,
        run: &ScheduleRun,
    ) -> Result<()>;
    /// Counts one more start of a claimed run (recovery after a crash); returns the new count.
    async fn restart(&self, entry_id: Uuid, due_at: DateTime<Utc>) -> Result<u32>;
    /// One entry.
    async fn get(&self, id: Uuid) -> Result<Option<ScheduleEntry>>;
    /// Entries matching the filter, sorted by next run (entries without one last, then by id),
    /// one page of them, with the total count.
    async fn query(&self, filter: &ScheduledTaskFilter) -> Result<Page<ScheduleEntry>>;
    /// Every entry that may still run: scheduled, running or paused.
    async fn load_active(&self) -> Result<Vec<ScheduleEntry>>;
    /// Every run still claimed (in flight, or interrupted by a crash).
    async fn unfinished_runs(&self) -> Result<Vec<ScheduleRun>>;
    /// The kept runs of an entry, oldest due time first.
    async fn runs(&self, entry_id: Uuid) -> Result<Vec<ScheduleRun>>;
}

/// One entry's part of a [`SharedScheduleStore::claim_batch`]: the entry as it is after the
/// firing (its version already bumped), the version it must still have in the store, and the due
/// times to claim.
#[derive(Debug, Clone)]
pub struct Claim {
    /// The entry after the firing; its `version` is the new one.
    pub entry: ScheduleEntry,
    /// The version the stored entry must have for the claim to apply.
    pub expected_version: u64,
    /// The due times to claim (may be empty: the firing only moved the entry, e.g. a skip).
    pub due: Vec<DateTime<Utc>>,
}

/// A due entry reserved by [`SharedScheduleStore::acquire_due`].
#[derive(Debug, Clone)]
pub struct DueEntry {
    /// The entry as stored.
    pub entry: ScheduleEntry,
    /// Its runs claimed and not finished yet, on any node (for overlap policies).
    pub running: u32,
}

/// What [`SharedScheduleStore::acquire_due`] found.
#[derive(Debug, Clone, Default)]
pub struct DueBatch {
    /// Due entries, now reserved for the caller until they are claimed or the hold expires.
    pub entries: Vec<DueEntry>,
    /// The earliest next run after `now` among active entries, if any: when to look again.
    pub next_due: Option<DateTime<Utc>>,
}

/// Applies the outcome of a run to its entry inside [`SharedScheduleStore::finish_batch`].
pub type ApplyRun = dyn Fn(&mut ScheduleEntry, &ScheduleRun) + Send + Sync;

/// A [`ScheduleStore`] that several scheduler nodes share (PostgreSQL).
///
/// # Rules
/// - Nodes find due entries by [`acquire_due`](Self::acquire_due), which reserves them for the
///   caller (`FOR UPDATE SKIP LOCKED` on the next-run index), so that two nodes do not plan the
///   same firing; a reservation ends with the next write of the entry or after `hold`.
/// - [`claim_batch`](Self::claim_batch) writes each entry (version-checked) and inserts its run
///   claims with the caller as owner and a lease expiry, in one transaction; the unique
///   `(entry, due time)` key makes each occurrence claimed exactly once across nodes.
/// - A live owner extends its leases with [`renew`](Self::renew); runs whose lease expired
///   (their owner died or stalled) are taken by another node with
///   [`take_expired`](Self::take_expired) and run again with the same idempotency key.
/// - [`finish_batch`](Self::finish_batch) records only runs the caller still owns; a run taken
///   over meanwhile is left to its new owner.
/// - Expiry is judged by the database server's clock; due times by the caller's `now`.
///
/// ```
/// use architectlm_store::schedule::SharedScheduleStore;
/// fn shared(_store: &dyn SharedScheduleStore) {}
/// ```
#[async_trait]
pub trait SharedScheduleStore: ScheduleStore {
    /// Reserves up to `limit` active entries whose next run is at or before `now` and that no
    /// other node holds, for `hold`; also returns when the next entry after `now` is due.
    async fn acquire_due(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        hold: Duration,
        limit: usize,
    ) -> Result<DueBatch>;
    /// Writes each entry (version-checked) and claims its due times for `owner` until
    /// `lease` from now, in one transaction. Returns, per claim in order, the due times newly
    /// claimed, or [`Error::Conflict`] when the entry changed meanwhile (nothing is written for
    /// it).
    async fn claim_batch(
        &self,
        owner: &str,
        lease: Duration,
        now: DateTime<Utc>,
        claims: Vec<Claim>,
    ) -> Result<Vec<Result<Vec<DateTime<Utc>>>>>;
    /// Records the end of runs `owner` still holds and applies each to its entry with `apply`
    /// (under the entry's row lock, version bumped), in one transaction. Returns the entries
    /// and runs recorded; runs no longer held by `owner` are left out.
    async fn finish_batch(
        &self,
        owner: &str,
        runs: Vec<ScheduleRun>,
        apply: &ApplyRun,
    ) -> Result<Vec<(ScheduleEntry, ScheduleRun)>>;
    /// Extends every lease `owner` holds to `lease` from now; returns how many.
    async fn renew(&self, owner: &str, lease: Duration) -> Result<u64>;
    /// Takes up to `limit` claimed runs whose lease expired: `owner` becomes their owner for
    /// `lease`, and their start count grows by one. Returns them.
    async fn take_expired(
        &self,
        owner: &str,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<ScheduleRun>>;
}

fn conflict(id: Uuid, expected: u64, actual: u64) -> Error {
    Error::Conflict {
        kind: "scheduled entry",
        id: id.to_string(),
        expected,
        actual,
    }
}

fn next_key(e: &ScheduleEntry) -> i64 {
    e.task
        .next_execution_at
        .map_or(i64::MAX, |t| t.timestamp_millis())
}

fn paginate<T>(items: Vec<T>, filter: &ScheduledTaskFilter) -> Page<T> {
    let total = items.len() as u64;
    let offset = usize::try_from(filter.page.offset).unwrap_or(usize::MAX);
    let limit = usize::try_from(filter.page.limit).unwrap_or(usize::MAX);
    let page: Vec<T> = items.into_iter().skip(offset).take(limit).collect();
    let end = filter.page.offset.saturating_add(page.len() as u64);
    Page::new(page, total, (end < total).then_some(end))
}

#[derive(Default)]
struct MemInner {
    entries: HashMap<Uuid, ScheduleEntry>,
    by_next: BTreeSet<(i64, Uuid)>,
    runs: HashMap<Uuid, BTreeMap<i64, ScheduleRun>>,
}

impl MemInner {
    fn replace(&mut self, entry: &ScheduleEntry, expected: u64) -> Result<()> {
        let id = entry.id();
        let Some(old) = self.entries.get(&id) else {
            return Err(Error::not_found("scheduled entry", id));
        };
        if old.version != expected {
            return Err(conflict(id, expected, old.version));
        }
        self.by_next.remove(&(next_key(old), id));
        self.by_next.insert((next_key(entry), id));
        self.entries.insert(id, entry.clone());
        Ok(())
    }
}

/// Entries in memory, indexed by next run. Lost with the process; for tests and for
/// deployments that do not need durability.
#[derive(Default)]
pub struct InMemoryScheduleStore {
    inner: RwLock<MemInner>,
}

impl fmt::Debug for InMemoryScheduleStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InMemoryScheduleStore")
            .field("entries", &self.inner.read().entries.len())
            .finish()
    }
}

impl InMemoryScheduleStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl ScheduleStore for InMemoryScheduleStore {
    async fn insert(&self, entries: Vec<ScheduleEntry>) -> Result<()> {
        let mut g = self.inner.write();
        for e in &entries {
            if let Some(old) = g.entries.get(&e.id()) {
                return Err(conflict(e.id(), 0, old.version));
            }
        }
        for e in entries {
            g.by_next.insert((next_key(&e), e.id()));
            g.entries.insert(e.id(), e);
        }
        Ok(())
    }

    async fn update(&self, entry: &ScheduleEntry, expected_version: u64) -> Result<()> {
        self.inner.write().replace(entry, expected_version)
    }

    async fn claim(
        &self,
        entry: &ScheduleEntry,
        expected_version: u64,
        due: &[DateTime<Utc>],
        now: DateTime<Utc>,
    ) -> Result<Vec<DateTime<Utc>>> {
        let mut g = self.inner.write();
        g.replace(entry, expected_version)?;
        let runs = g.runs.entry(entry.id()).or_default();
        let mut claimed = Vec::with_capacity(due.len());
        for &d in due {
            let d = truncate_ms(d);
            let key = d.timestamp_millis();
            if let std::collections::btree_map::Entry::Vacant(v) = runs.entry(key) {
                v.insert(ScheduleRun::claimed(entry.id(), d, now));
                claimed.push(d);
            }
        }
        Ok(claimed)
    }

    async fn finish(
        &self,
        entry: &ScheduleEntry,
        expected_version: u64,
        run: &ScheduleRun,
    ) -> Result<()> {
        let mut g = self.inner.write();
        g.replace(entry, expected_version)?;
        let runs = g.runs.entry(entry.id()).or_default();
        runs.insert(run.due_at.timestamp_millis(), run.clone());
        let finished: Vec<i64> = runs
            .iter()
            .filter(|(_, r)| r.state != RunState::Claimed)
            .map(|(k, _)| *k)
            .collect();
        if finished.len() > KEPT_RUNS {
            for k in &finished[..finished.len() - KEPT_RUNS] {
                runs.remove(k);
            }
        }
        Ok(())
    }

    async fn restart(&self, entry_id: Uuid, due_at: DateTime<Utc>) -> Result<u32> {
        let mut g = self.inner.write();
        let run = g
            .runs
            .get_mut(&entry_id)
            .and_then(|r| r.get_mut(&due_at.timestamp_millis()))
            .ok_or_else(|| Error::not_found("scheduled run", format!("{entry_id}@{due_at}")))?;
        run.starts += 1;
        Ok(run.starts)
    }

    async fn get(&self, id: Uuid) -> Result<Option<ScheduleEntry>> {
        Ok(self.inner.read().entries.get(&id).cloned())
    }

    async fn query(&self, filter: &ScheduledTaskFilter) -> Result<Page<ScheduleEntry>> {
        let g = self.inner.read();
        let lo = filter.from.map_or(i64::MIN, |t| t.timestamp_millis());
        let hi = filter.to.map_or(i64::MAX, |t| t.timestamp_millis());
        let items: Vec<ScheduleEntry> = g
            .by_next
            .range((lo, Uuid::nil())..=(hi, Uuid::max()))
            .filter_map(|(_, id)| g.entries.get(id))
            .filter(|e| filter.matches(&e.task))
            .cloned()
            .collect();
        Ok(paginate(items, filter))
    }

    async fn load_active(&self) -> Result<Vec<ScheduleEntry>> {
        Ok(self
            .inner
            .read()
            .entries
            .values()
            .filter(|e| e.is_active())
            .cloned()
            .collect())
    }

    async fn unfinished_runs(&self) -> Result<Vec<ScheduleRun>> {
        Ok(self
            .inner
            .read()
            .runs
            .values()
            .flat_map(|r| r.values())
            .filter(|r| r.state == RunState::Claimed)
            .cloned()
            .collect())
    }

    async fn runs(&self, entry_id: Uuid) -> Result<Vec<ScheduleRun>> {
        Ok(self
            .inner
            .read()
            .runs
            .get(&entry_id)
            .map(|r| r.values().cloned().collect())
            .unwrap_or_default())
    }
}

#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))] // Only the database backends store it.
fn status_str(s: ScheduledTaskStatus) -> &'static str {
    match s {
        ScheduledTaskStatus::Scheduled => "scheduled",
        ScheduledTaskStatus::Running => "running",
        ScheduledTaskStatus::Completed => "completed",
        ScheduledTaskStatus::Failed => "failed",
        ScheduledTaskStatus::Cancelled => "cancelled",
        ScheduledTaskStatus::Paused => "paused",
        // A status added later is stored by its serialised name.
        #[allow(unreachable_patterns)]
        _ => "unknown",
    }
}

#[cfg(feature = "sqlite")]
pub use self::sqlite_impl::SqliteScheduleStore;

#[cfg(feature = "postgres")]
#[path = "schedule_pg.rs"]
mod pg_impl;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use self::pg_impl::PgScheduleStore;

#[cfg(feature = "sqlite")]
mod sqlite_impl {
    use rusqlite::{OptionalExtension, Row, params, params_from_iter, types::Value as SqlValue};

    use super::*;
    use crate::sqlite::{Migration, SqliteDb};

    /// The scheduler's tables. `next_run` is in milliseconds since the epoch (NULL: none).
    pub(super) static MIGRATIONS: &[Migration] = &[Migration {
        component: "scheduler",
        version: 1,
        description: "entries, run claims and the next-run index",
        sql: "CREATE TABLE scheduler_entries (
                id BLOB PRIMARY KEY,
                task_id TEXT NOT NULL,
                status TEXT NOT NULL,
                recurring INTEGER NOT NULL,
                next_run INTEGER,
                version INTEGER NOT NULL,
                data TEXT NOT NULL
            );
            CREATE INDEX scheduler_entries_next_run ON scheduler_entries (next_run);
            CREATE INDEX scheduler_entries_status ON scheduler_entries (status, next_run);
            CREATE INDEX scheduler_entries_task ON scheduler_entries (task_id, next_run);
            CREATE TABLE scheduler_runs (
                entry_id BLOB NOT NULL,
                due_at INTEGER NOT NULL,
                state TEXT NOT NULL,
                claimed_at INTEGER NOT NULL,
                finished_at INTEGER,
                starts INTEGER NOT NULL,
                result TEXT,
                error TEXT,
                PRIMARY KEY (entry_id, due_at)
            ) WITHOUT ROWID;
            CREATE INDEX scheduler_runs_open ON scheduler_runs (state) WHERE state = 'claimed';",
    }];

    fn db_err(e: rusqlite::Error) -> Error {
        Error::storage(e)
    }

    fn ms(t: DateTime<Utc>) -> i64 {
        t.timestamp_millis()
    }

    fn from_ms(v: i64) -> Result<DateTime<Utc>> {
        DateTime::from_timestamp_millis(v)
            .ok_or_else(|| Error::storage(format!("timestamp {v} ms is out of range")))
    }

    fn row_entry(r: &Row<'_>) -> rusqlite::Result<(String, i64)> {
        Ok((r.get(0)?, r.get(1)?))
    }

    fn decode(data: &str, version: i64) -> Result<ScheduleEntry> {
        let mut e: ScheduleEntry = serde_json::from_str(data)
            .map_err(|err| Error::storage(format!("corrupt scheduled entry: {err}")))?;
        e.version = u64::try_from(version).unwrap_or_default();
        Ok(e)
    }

    fn row_run(r: &Row<'_>) -> rusqlite::Result<RunRow> {
        Ok(RunRow {
            entry_id: r.get(0)?,
            due_at: r.get(1)?,
            state: r.get(2)?,
            claimed_at: r.get(3)?,
            finished_at: r.get(4)?,
            starts: r.get(5)?,
            result: r.get(6)?,
            error: r.get(7)?,
        })
    }

    struct RunRow {
        entry_id: Vec<u8>,
        due_at: i64,
        state: String,
        claimed_at: i64,
        finished_at: Option<i64>,
        starts: i64,
        result: Option<String>,
        error: Option<String>,
    }

    impl RunRow {
        fn decode(self) -> Result<ScheduleRun> {
            Ok(ScheduleRun {
                entry_id: Uuid::from_slice(&self.entry_id)
                    .map_err(|e| Error::storage(format!("corrupt run entry id: {e}")))?,
                due_at: from_ms(self.due_at)?,
                state: RunState::parse(&self.state)?,
                claimed_at: from_ms(self.claimed_at)?,
                finished_at: self.finished_at.map(from_ms).transpose()?,
                starts: u32::try_from(self.starts).unwrap_or(u32::MAX),
                result: self
                    .result
                    .map(|s| serde_json::from_str(&s))
                    .transpose()
                    .map_err(|e| Error::storage(format!("corrupt run result: {e}")))?,
                error: self.error,
            })
        }
    }

    const RUN_COLUMNS: &str =
        "entry_id, due_at, state, claimed_at, finished_at, starts, result, error";

    fn replace(
        txn: &rusqlite::Transaction<'_>,
        entry: &ScheduleEntry,
        expected: u64,
    ) -> Result<()> {
        let data = serde_json::to_string(entry)?;
        let id = entry.id();
        let n = txn
            .execute(
                "UPDATE scheduler_entries SET task_id = ?2, status = ?3, recurring = ?4, next_run = ?5,
                    version = ?6, data = ?7 WHERE id = ?1 AND version = ?8",
                params![
                    &id.as_bytes()[..],
                    entry.task.task_id,
                    status_str(entry.task.status),
                    entry.task.is_recurring(),
                    entry.task.next_execution_at.map(ms),
                    i64::try_from(entry.version).unwrap_or(i64::MAX),
                    data,
                    i64::try_from(expected).unwrap_or(i64::MAX),
                ],
            )
            .map_err(db_err)?;
        if n == 1 {
            return Ok(());
        }
        let actual: Option<i64> = txn
            .query_row(
                "SELECT version FROM scheduler_entries WHERE id = ?1",
                [&id.as_bytes()[..]],
                |r| r.get(0),
            )
            .optional()
            .map_err(db_err)?;
        match actual {
            None => Err(Error::not_found("scheduled entry", id)),
            Some(v) => Err(conflict(id, expected, u64::try_from(v).unwrap_or_default())),
        }
    }

    /// Entries in an embedded SQLite database (see [`crate::sqlite`] for durability levels).
    #[derive(Debug, Clone)]
    pub struct SqliteScheduleStore {
        db: SqliteDb,
    }

    impl SqliteScheduleStore {
        /// Uses `db`, creating the scheduler's tables if needed.
        pub async fn open(db: SqliteDb) -> Result<Self> {
            db.migrate(MIGRATIONS).await?;
            Ok(Self { db })
        }

        /// The database.
        pub fn db(&self) -> &SqliteDb {
            &self.db
        }
    }

    #[async_trait]
    impl ScheduleStore for SqliteScheduleStore {
        async fn insert(&self, entries: Vec<ScheduleEntry>) -> Result<()> {
            let rows = entries
                .iter()
                .map(|e| Ok((e.id(), serde_json::to_string(e)?, e.clone())))
                .collect::<Result<Vec<_>>>()?;
            self.db
                .write(move |txn| {
                    let mut stmt = txn
                        .prepare_cached(
                            "INSERT INTO scheduler_entries (id, task_id, status, recurring, next_run, version, data)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                        )
                        .map_err(db_err)?;
                    for (id, data, e) in &rows {
                        stmt.execute(params![
                            &id.as_bytes()[..],
                            e.task.task_id,
                            status_str(e.task.status),
                            e.task.is_recurring(),
                            e.task.next_execution_at.map(ms),
                            i64::try_from(e.version).unwrap_or(i64::MAX),
                            data,
                        ])
                        .map_err(|err| match err {
                            rusqlite::Error::SqliteFailure(f, _)
                                if f.code == rusqlite::ErrorCode::ConstraintViolation =>
                            {
                                conflict(*id, 0, e.version)
                            }
                            other => db_err(other),
                        })?;
                    }
                    Ok(())
                })
                .await
        }

        async fn update(&self, entry: &ScheduleEntry, expected_version: u64) -> Result<()> {
            let entry = entry.clone();
            self.db
                .write(move |txn| replace(txn, &entry, expected_version))
                .await
        }

        async fn claim(
            &self,
            entry: &ScheduleEntry,
            expected_version: u64,
            due: &[DateTime<Utc>],
            now: DateTime<Utc>,
        ) -> Result<Vec<DateTime<Utc>>> {
            let entry = entry.clone();
            let due: Vec<DateTime<Utc>> = due.iter().map(|d| truncate_ms(*d)).collect();
            self.db
                .write(move |txn| {
                    replace(txn, &entry, expected_version)?;
                    let mut stmt = txn
                        .prepare_cached(
                            "INSERT INTO scheduler_runs (entry_id, due_at, state, claimed_at, starts)
                             VALUES (?1, ?2, 'claimed', ?3, 1) ON CONFLICT DO NOTHING",
                        )
                        .map_err(db_err)?;
                    let mut claimed = Vec::with_capacity(due.len());
                    for d in due {
                        let n = stmt
                            .execute(params![&entry.id().as_bytes()[..], ms(d), ms(now)])
                            .map_err(db_err)?;
                        if n == 1 {
                            claimed.push(d);
                        }
                    }
                    Ok(claimed)
                })
                .await
        }

        async fn finish(
            &self,
            entry: &ScheduleEntry,
            expected_version: u64,
            run: &ScheduleRun,
        ) -> Result<()> {
            let entry = entry.clone();
            let run = run.clone();
            self.db
                .write(move |txn| {
                    replace(txn, &entry, expected_version)?;
                    let id = &run.entry_id.as_bytes()[..];
                    let result = run.result.as_ref().map(serde_json::to_string).transpose()?;
                    txn.execute(
                        "INSERT INTO scheduler_runs (entry_id, due_at, state, claimed_at, finished_at, starts, result, error)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                         ON CONFLICT (entry_id, due_at) DO UPDATE SET state = excluded.state,
                            finished_at = excluded.finished_at, result = excluded.result,
                            error = excluded.error",
                        params![
                            id,
                            ms(run.due_at),
                            run.state.as_str(),
                            ms(run.claimed_at),
                            run.finished_at.map(ms),
                            run.starts,
                            result,
                            run.error,
                        ],
                    )
                    .map_err(db_err)?;
                    txn.execute(
                        "DELETE FROM scheduler_runs WHERE entry_id = ?1 AND state != 'claimed' AND due_at <
                            (SELECT due_at FROM scheduler_runs WHERE entry_id = ?1 AND state != 'claimed'
                             ORDER BY due_at DESC LIMIT 1 OFFSET ?2)",
                        params![id, KEPT_RUNS as i64 - 1],
                    )
                    .map_err(db_err)?;
                    Ok(())
                })
                .await
        }

        async fn restart(&self, entry_id: Uuid, due_at: DateTime<Utc>) -> Result<u32> {
            self.db
                .write(move |txn| {
                    let starts: Option<i64> = txn
                        .query_row(
                            "UPDATE scheduler_runs SET starts = starts + 1
                             WHERE entry_id = ?1 AND due_at = ?2 RETURNING starts",
                            params![&entry_id.as_bytes()[..], ms(due_at)],
                            |r| r.get(0),
                        )
                        .optional()
                        .map_err(db_err)?;
                    let starts = starts.ok_or_else(|| {
                        Error::not_found("scheduled run", format!("{entry_id}@{due_at}"))
                    })?;
                    Ok(u32::try_from(starts).unwrap_or(u32::MAX))
                })
                .await
        }

        async fn get(&self, id: Uuid) -> Result<Option<ScheduleEntry>> {
            self.db
                .read(move |conn| {
                    let row = conn
                        .query_row(
                            "SELECT data, version FROM scheduler_entries WHERE id = ?1",
                            [&id.as_bytes()[..]],
                            row_entry,
                        )
                        .optional()
                        .map_err(db_err)?;
                    row.map(|(d, v)| decode(&d, v)).transpose()
                })
                .await
        }

        async fn query(&self, filter: &ScheduledTaskFilter) -> Result<Page<ScheduleEntry>> {
            let filter = filter.clone();
            self.db
                .read(move |conn| {
                    let mut sql = String::from(" FROM scheduler_entries WHERE 1 = 1");
                    let mut args: Vec<SqlValue> = Vec::new();
                    if !filter.status.is_empty() {
                        sql.push_str(" AND status IN (");
                        for (i, s) in filter.status.iter().enumerate() {
                            sql.push_str(if i == 0 { "?" } else { ", ?" });
                            args.push(SqlValue::Text(status_str(*s).to_owned()));
                        }
                        sql.push(')');
                    }
                    if !filter.task_id.is_empty() {
                        sql.push_str(" AND task_id IN (");
                        for (i, t) in filter.task_id.iter().enumerate() {
                            sql.push_str(if i == 0 { "?" } else { ", ?" });
                            args.push(SqlValue::Text(t.clone()));
                        }
                        sql.push(')');
                    }
                    if let Some(f) = filter.from {
                        sql.push_str(" AND next_run >= ?");
                        args.push(SqlValue::Integer(ms(f)));
                    }
                    if let Some(t) = filter.to {
                        sql.push_str(" AND next_run <= ?");
                        args.push(SqlValue::Integer(ms(t)));
                    }
                    if let Some(r) = filter.recurring {
                        sql.push_str(" AND recurring = ?");
                        args.push(SqlValue::Integer(i64::from(r)));
                    }
                    let order = " ORDER BY next_run IS NULL, next_run, id";
                    let select = format!("SELECT data, version{sql}{order}");
                    if filter.metadata.is_empty() {
                        // Everything is decided in SQL: count, then fetch one page.
                        let total: i64 = conn
                            .query_row(
                                &format!("SELECT COUNT(*){sql}"),
                                params_from_iter(args.iter()),
                                |r| r.get(0),
                            )
                            .map_err(db_err)?;
                        let mut paged = args.clone();
                        paged.push(SqlValue::Integer(
                            i64::try_from(filter.page.limit).unwrap_or(i64::MAX),
                        ));
                        paged.push(SqlValue::Integer(
                            i64::try_from(filter.page.offset).unwrap_or(i64::MAX),
                        ));
                        let mut stmt = conn
                            .prepare(&format!("{select} LIMIT ? OFFSET ?"))
                            .map_err(db_err)?;
                        let items = stmt
                            .query_map(params_from_iter(paged.iter()), row_entry)
                            .map_err(db_err)?
                            .map(|r| r.map_err(db_err).and_then(|(d, v)| decode(&d, v)))
                            .collect::<Result<Vec<_>>>()?;
                        let total = u64::try_from(total).unwrap_or_default();
                        let end = filter.page.offset.saturating_add(items.len() as u64);
                        return Ok(Page::new(items, total, (end < total).then_some(end)));
                    }
                    // Metadata is matched on the decoded entries (JSON equality of values), after
                    // the indexed conditions narrowed the rows.
                    let mut stmt = conn.prepare(&select).map_err(db_err)?;
                    let items = stmt
                        .query_map(params_from_iter(args.iter()), row_entry)
                        .map_err(db_err)?
                        .map(|r| r.map_err(db_err).and_then(|(d, v)| decode(&d, v)))
                        .filter(|e| e.as_ref().map_or(true, |e| filter.matches(&e.task)))
                        .collect::<Result<Vec<_>>>()?;
                    Ok(paginate(items, &filter))
                })
                .await
        }

        async fn load_active(&self) -> Result<Vec<ScheduleEntry>> {
            self.db
                .read(|conn| {
                    let mut stmt = conn
                        .prepare(
                            "SELECT data, version FROM scheduler_entries
                             WHERE status IN ('scheduled', 'running', 'paused')",
                        )
                        .map_err(db_err)?;
                    let rows = stmt
                        .query_map([], row_entry)
                        .map_err(db_err)?
                        .map(|r| r.map_err(db_err).and_then(|(d, v)| decode(&d, v)))
                        .collect::<Result<Vec<_>>>()?;
                    Ok(rows)
                })
                .await
        }

        async fn unfinished_runs(&self) -> Result<Vec<ScheduleRun>> {
            self.db
                .read(|conn| {
                    let mut stmt = conn
                        .prepare(&format!(
                            "SELECT {RUN_COLUMNS} FROM scheduler_runs WHERE state = 'claimed'"
                        ))
                        .map_err(db_err)?;
                    let rows = stmt
                        .query_map([], row_run)
                        .map_err(db_err)?
                        .map(|r| r.map_err(db_err).and_then(RunRow::decode))
                        .collect::<Result<Vec<_>>>()?;
                    Ok(rows)
                })
                .await
        }

        async fn runs(&self, entry_id: Uuid) -> Result<Vec<ScheduleRun>> {
            self.db
                .read(move |conn| {
                    let mut stmt = conn
                        .prepare(&format!(
                            "SELECT {RUN_COLUMNS} FROM scheduler_runs WHERE entry_id = ?1 ORDER BY due_at"
                        ))
                        .map_err(db_err)?;
                    let rows = stmt
                        .query_map([&entry_id.as_bytes()[..]], row_run)
                        .map_err(db_err)?
                        .map(|r| r.map_err(db_err).and_then(RunRow::decode))
                        .collect::<Result<Vec<_>>>()?;
                    Ok(rows)
                })
                .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use architectlm_core::extensions::scheduler::ScheduledTaskFilter;
    use chrono::TimeZone;

    fn at(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + s, 0)
            .single()
            .unwrap_or_default()
    }

    fn entry(task: &str, next: i64, recurring: bool) -> ScheduleEntry {
        let mut t = ScheduledTask::new(Uuid::new_v4(), task, serde_json::json!({}), at(next));
        if recurring {
            t.pattern = Some("* * * * *".into());
        }
        t.metadata.insert("team".into(), serde_json::json!(task));
        ScheduleEntry::new(t, SchedulePolicy::default())
    }

    async fn exercise(store: &dyn ScheduleStore) {
        let a = entry("a", 30, false);
        let b = entry("b", 10, true);
        let mut c = entry("a", 20, true);
        store
            .insert(vec![a.clone(), b.clone(), c.clone()])
            .await
            .unwrap();
        assert!(matches!(
            store.insert(vec![a.clone()]).await,
            Err(Error::Conflict { .. })
        ));
        // Sorted by next run.
        let all = store.query(&ScheduledTaskFilter::new()).await.unwrap();
        let order: Vec<Uuid> = all.items.iter().map(|e| e.id()).collect();
        assert_eq!(order, vec![b.id(), c.id(), a.id()]);
        // Filters: task id, inclusive range, recurring, metadata, pagination.
        let q = ScheduledTaskFilter::new().task_id("a");
        assert_eq!(store.query(&q).await.unwrap().total, 2);
        let q = ScheduledTaskFilter::new().from(at(10)).to(at(20));
        assert_eq!(store.query(&q).await.unwrap().total, 2);
        let q = ScheduledTaskFilter::new().recurring(false);
        assert_eq!(store.query(&q).await.unwrap().items[0].id(), a.id());
        let q = ScheduledTaskFilter::new().metadata("team", serde_json::json!("b"));
        assert_eq!(store.query(&q).await.unwrap().items[0].id(), b.id());
        let q = ScheduledTaskFilter::new().offset(1).limit(1);
        let page = store.query(&q).await.unwrap();
        assert_eq!(
            (page.total, page.items.len(), page.next_offset),
            (3, 1, Some(2))
        );
        assert_eq!(page.items[0].id(), c.id());
        // Version check.
        c.version = 2;
        c.task.next_execution_at = Some(at(40));
        store.update(&c, 1).await.unwrap();
        assert!(matches!(
            store.update(&c, 1).await,
            Err(Error::Conflict {
                expected: 1,
                actual: 2,
                ..
            })
        ));
        assert_eq!(
            store
                .get(c.id())
                .await
                .unwrap()
                .unwrap()
                .task
                .next_execution_at,
            Some(at(40))
        );
        // Claims are unique per (entry, due time), and survive as unfinished until finished.
        c.version = 3;
        let got = store.claim(&c, 2, &[at(20), at(30)], at(31)).await.unwrap();
        assert_eq!(got, vec![at(20), at(30)]);
        c.version = 4;
        let got = store.claim(&c, 3, &[at(30), at(40)], at(41)).await.unwrap();
        assert_eq!(got, vec![at(40)]);
        assert_eq!(store.unfinished_runs().await.unwrap().len(), 3);
        assert_eq!(store.restart(c.id(), at(20)).await.unwrap(), 2);
        let mut run = ScheduleRun::claimed(c.id(), at(20), at(31));
        run.state = RunState::Completed;
        run.result = Some(serde_json::json!({"ok": true}));
        run.finished_at = Some(at(32));
        c.version = 5;
        store.finish(&c, 4, &run).await.unwrap();
        let runs = store.runs(c.id()).await.unwrap();
        assert_eq!(runs.len(), 3);
        assert_eq!(runs[0].state, RunState::Completed);
        assert_eq!(runs[0].result, Some(serde_json::json!({"ok": true})));
        assert_eq!(store.unfinished_runs().await.unwrap().len(), 2);
        // A finished occurrence is never claimed again.
        c.version = 6;
        assert!(
            store
                .claim(&c, 5, &[at(20)], at(50))
                .await
                .unwrap()
                .is_empty()
        );
        // Terminal entries are not loaded as active.
        c.version = 7;
        c.task.status = ScheduledTaskStatus::Cancelled;
        store.update(&c, 6).await.unwrap();
        let active: Vec<Uuid> = store
            .load_active()
            .await
            .unwrap()
            .iter()
            .map(|e| e.id())
            .collect();
        assert_eq!(active.len(), 2);
        assert!(!active.contains(&c.id()));
        let q = ScheduledTaskFilter::new()
            .status(ScheduledTaskStatus::Cancelled)
            .status(ScheduledTaskStatus::Paused);
        assert_eq!(store.query(&q).await.unwrap().items[0].id(), c.id());
    }

    #[tokio::test]
    async fn in_memory_store_keeps_the_contract() {
        exercise(&InMemoryScheduleStore::new()).await;
    }

    /// A PostgreSQL store in a schema of its own (dropped by the caller), or `None` when
    /// `DATABASE_URL` is not set.
    #[cfg(feature = "postgres")]
    async fn pg_store(test: &str) -> Option<(PgScheduleStore, String, String)> {
        use crate::postgres::{PgDb, PgOptions};
        let url = match std::env::var("DATABASE_URL") {
            Ok(u) if !u.is_empty() => u,
            _ => {
                eprintln!("{test}: skipped: DATABASE_URL not set");
                return None;
            }
        };
        let schema = format!("t_{}", Uuid::new_v4().simple());
        let db = PgDb::connect(PgOptions::new(&url).schema(&schema))
            .await
            .unwrap();
        Some((PgScheduleStore::open(db).await.unwrap(), url, schema))
    }

    #[cfg(feature = "postgres")]
    async fn drop_schema(url: &str, schema: &str) {
        let db = crate::postgres::PgDb::connect_url(url).await.unwrap();
        db.client()
            .await
            .unwrap()
            .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
            .await
            .unwrap();
    }

    #[cfg(feature = "postgres")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_store_keeps_the_contract_and_prunes_runs() {
        let Some((store, url, schema)) = pg_store("postgres_store_keeps_the_contract").await else {
            return;
        };
        exercise(&store).await;
        prunes_runs(&store).await;
        // Opening again (a second node) applies nothing twice.
        let again = PgScheduleStore::open(store.db().clone()).await.unwrap();
        assert_eq!(
            again
                .query(&ScheduledTaskFilter::new())
                .await
                .unwrap()
                .total,
            4
        );
        drop_schema(&url, &schema).await;
    }

    #[cfg(feature = "postgres")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_shared_claims_are_exclusive_and_expired_leases_move() {
        let Some((store, url, schema)) = pg_store("postgres_shared_claims").await else {
            return;
        };
        let lease = Duration::from_secs(30);
        let e = entry("due", 0, false);
        let f = entry("later", 100, false);
        store.insert(vec![e.clone(), f.clone()]).await.unwrap();
        // Node a reserves the due entry; node b sees nothing due while a holds it.
        let got = store.acquire_due("a", at(10), lease, 10).await.unwrap();
        assert_eq!(got.entries.len(), 1);
        assert_eq!(got.entries[0].entry.id(), e.id());
        assert_eq!(got.entries[0].running, 0);
        assert_eq!(got.next_due, Some(at(100)));
        let other = store.acquire_due("b", at(10), lease, 10).await.unwrap();
        assert!(other.entries.is_empty());
        // a claims the run; a stale claim of the same version by b is a conflict.
        let mut next = got.entries[0].entry.clone();
        next.version += 1;
        next.task.next_execution_at = None;
        let claim = Claim {
            entry: next.clone(),
            expected_version: 1,
            due: vec![at(0)],
        };
        let out = store
            .claim_batch("a", lease, at(10), vec![claim.clone()])
            .await
            .unwrap();
        assert_eq!(out[0].as_ref().unwrap(), &vec![at(0)]);
        let out = store
            .claim_batch("b", lease, at(10), vec![claim])
            .await
            .unwrap();
        assert!(matches!(
            out[0],
            Err(Error::Conflict {
                expected: 1,
                actual: 2,
                ..
            })
        ));
        // Nothing expired yet; after a zero-length renewal, b takes the run over.
        assert!(store.take_expired("b", lease, 10).await.unwrap().is_empty());
        assert_eq!(store.renew("a", Duration::ZERO).await.unwrap(), 1);
        let taken = store.take_expired("b", lease, 10).await.unwrap();
        assert_eq!(taken.len(), 1);
        assert_eq!(
            (taken[0].entry_id, taken[0].due_at, taken[0].starts),
            (e.id(), at(0), 2)
        );
        // a lost it: its finish is dropped; b's is recorded and applied to the entry.
        let mut run = taken[0].clone();
        run.state = RunState::Completed;
        run.finished_at = Some(at(11));
        run.result = Some(serde_json::json!("done"));
        let apply = |e: &mut ScheduleEntry, r: &ScheduleRun| {
            e.task.status = ScheduledTaskStatus::Completed;
            e.task.result = r.result.clone();
        };
        assert!(
            store
                .finish_batch("a", vec![run.clone()], &apply)
                .await
                .unwrap()
                .is_empty()
        );
        let done = store.finish_batch("b", vec![run], &apply).await.unwrap();
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].0.version, 3);
        let stored = store.get(e.id()).await.unwrap().unwrap();
        assert_eq!(stored.task.status, ScheduledTaskStatus::Completed);
        assert_eq!(stored.version, 3);
        assert!(store.unfinished_runs().await.unwrap().is_empty());
        drop_schema(&url, &schema).await;
    }

    #[cfg(feature = "sqlite")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_store_keeps_the_contract_and_prunes_runs() {
        let db = crate::sqlite::SqliteDb::open(crate::sqlite::SqliteOptions::memory()).unwrap();
        let store = SqliteScheduleStore::open(db).await.unwrap();
        exercise(&store).await;
        prunes_runs(&store).await;
    }

    /// Pruning keeps the newest finished runs.
    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    async fn prunes_runs(store: &dyn ScheduleStore) {
        let mut e = entry("p", 0, true);
        store.insert(vec![e.clone()]).await.unwrap();
        for i in 0..(KEPT_RUNS as i64 + 8) {
            let v = e.version;
            e.version += 1;
            store.claim(&e, v, &[at(i)], at(i)).await.unwrap();
            let mut run = ScheduleRun::claimed(e.id(), at(i), at(i));
            run.state = RunState::Failed;
            run.error = Some("boom".into());
            let v = e.version;
            e.version += 1;
            store.finish(&e, v, &run).await.unwrap();
        }
        let runs = store.runs(e.id()).await.unwrap();
        assert_eq!(runs.len(), KEPT_RUNS);
        assert_eq!(runs[0].due_at, at(8));
        assert_eq!(runs[0].error.as_deref(), Some("boom"));
    }
}
