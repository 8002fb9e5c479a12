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

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use architectlm_core::extensions::Page;
use architectlm_core::extensions::scheduler::{
    SchedulePolicy, ScheduledTask, ScheduledTaskFilter, ScheduledTaskStatus,
};
use architectlm_core::store::UnreadableListener;
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

    /// Adds a listener for the records this store skips because they cannot be decoded
    /// (kinds `scheduled task` and `scheduled run`). Lists and recoveries ([`query`],
    /// [`load_active`], [`unfinished_runs`], [`runs`], and a shared store's
    /// [`SharedScheduleStore::acquire_due`] and [`SharedScheduleStore::take_expired`]) skip such
    /// a record, warn and tell the listeners; [`get`] of it fails with
    /// [`Error::UnreadableRecord`]. The scheduler adds one that publishes `record-unreadable`.
    /// The default ignores it: the in-memory store never holds an unreadable record.
    ///
    /// [`query`]: Self::query
    /// [`load_active`]: Self::load_active
    /// [`unfinished_runs`]: Self::unfinished_runs
    /// [`runs`]: Self::runs
    /// [`get`]: Self::get
    fn on_unreadable(&self, listener: UnreadableListener) {
        let _ = listener;
    }

    /// Cancels the entry `id` in one write if it is `scheduled` or `paused` (no run of it
    /// claimed): status `cancelled`, no next run, version + 1. Returns its task id; `None` if
    /// it is unknown, in another status, or changed while this ran (the caller then cancels it
    /// the long way). The default reads and updates; a store may do it in place.
    async fn cancel_unclaimed(&self, id: Uuid) -> Result<Option<String>> {
        let Some(mut e) = self.get(id).await? else {
            return Ok(None);
        };
        if !matches!(
            e.task.status,
            ScheduledTaskStatus::Scheduled | ScheduledTaskStatus::Paused
        ) {
            return Ok(None);
        }
        e.task.status = ScheduledTaskStatus::Cancelled;
        e.task.next_execution_at = None;
        let expected = e.version;
        e.version += 1;
        match self.update(&e, expected).await {
            Ok(()) => Ok(Some(e.task.task_id)),
            Err(Error::Conflict { .. }) => Ok(None),
            Err(err) => Err(err),
        }
    }
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

fn paginate<T>(items: Vec<T>, filter: &ScheduledTaskFilter) -> Page<T> {
    let total = items.len() as u64;
    let offset = usize::try_from(filter.page.offset).unwrap_or(usize::MAX);
    let limit = usize::try_from(filter.page.limit).unwrap_or(usize::MAX);
    let page: Vec<T> = items.into_iter().skip(offset).take(limit).collect();
    let end = filter.page.offset.saturating_add(page.len() as u64);
    Page::new(page, total, (end < total).then_some(end))
}

mod memory;
pub use self::memory::InMemoryScheduleStore;

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

#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use self::postgres::PgScheduleStore;

#[cfg(feature = "sqlite")]
mod sqlite;
#[cfg(feature = "sqlite")]
pub use self::sqlite::SqliteScheduleStore;

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
        // A scheduled entry with nothing claimed is cancelled in one write; a cancelled one,
        // a running one or an unknown id is left to the long way.
        let mut d = entry("d", 300, false);
        store.insert(vec![d.clone()]).await.unwrap();
        assert_eq!(
            store.cancel_unclaimed(d.id()).await.unwrap().as_deref(),
            Some("d")
        );
        let stored = store.get(d.id()).await.unwrap().unwrap();
        assert_eq!(stored.task.status, ScheduledTaskStatus::Cancelled);
        assert_eq!(stored.task.next_execution_at, None);
        assert_eq!(stored.version, d.version + 1);
        assert_eq!(store.cancel_unclaimed(d.id()).await.unwrap(), None);
        assert_eq!(store.cancel_unclaimed(Uuid::new_v4()).await.unwrap(), None);
        d = entry("d2", 300, false);
        store.insert(vec![d.clone()]).await.unwrap();
        d.version += 1;
        d.task.status = ScheduledTaskStatus::Running;
        store
            .claim(&d, d.version - 1, &[at(300)], at(300))
            .await
            .unwrap();
        assert_eq!(store.cancel_unclaimed(d.id()).await.unwrap(), None);
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
            6
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
