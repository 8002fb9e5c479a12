//! Scheduled entries and run claims in PostgreSQL, shared by several scheduler nodes.
//!
//! Times that take part in keys and ordering (`next_run`, `due_at`, `claimed_at`,
//! `finished_at`) are stored as milliseconds since the epoch (`BIGINT`), as in SQLite; lease
//! and reservation expiries are `TIMESTAMPTZ` judged by the server's clock.
//!
//! Every multi-row write locks the entries it touches in id order first, so concurrent
//! batches of different nodes never deadlock on each other.

use std::collections::HashMap;

use tokio_postgres::Row;
use tokio_postgres::error::SqlState;

use super::*;
use crate::migration::Migration;
use crate::postgres::{PgClient, PgDb, pg_err};
use crate::unreadable::{Reports, unreadable};

/// The scheduler's tables on PostgreSQL.
///
/// - v1: entries, run claims, the next-run index.
/// - v2: `fire_at`, the time a node may start the next run (its due time plus the entry's
///   jitter), and the due index on it.
static MIGRATIONS: &[Migration] = &[
    Migration {
        component: "scheduler",
        version: 1,
        description: "entries, run claims with owners and leases, the next-run index",
        sql: "CREATE TABLE scheduler_entries (
            id UUID PRIMARY KEY,
            task_id TEXT NOT NULL,
            status TEXT NOT NULL,
            recurring BOOLEAN NOT NULL,
            next_run BIGINT,
            version BIGINT NOT NULL,
            data TEXT NOT NULL,
            fired_by TEXT,
            fired_until TIMESTAMPTZ
        );
        CREATE INDEX scheduler_entries_due ON scheduler_entries (next_run)
            WHERE status IN ('scheduled', 'running');
        CREATE INDEX scheduler_entries_next_run ON scheduler_entries (next_run, id);
        CREATE INDEX scheduler_entries_task ON scheduler_entries (task_id, next_run);
        CREATE INDEX scheduler_entries_status ON scheduler_entries (status, next_run);
        CREATE TABLE scheduler_runs (
            entry_id UUID NOT NULL,
            due_at BIGINT NOT NULL,
            state TEXT NOT NULL,
            claimed_at BIGINT NOT NULL,
            finished_at BIGINT,
            starts INTEGER NOT NULL,
            result JSONB,
            error TEXT,
            owner TEXT,
            lease_until TIMESTAMPTZ,
            PRIMARY KEY (entry_id, due_at)
        );
        CREATE INDEX scheduler_runs_expiry ON scheduler_runs (lease_until) WHERE state = 'claimed';
        CREATE INDEX scheduler_runs_owner ON scheduler_runs (owner) WHERE state = 'claimed';",
    },
    Migration {
        component: "scheduler",
        version: 2,
        description: "fire_at (next run plus jitter) and the due index on it",
        sql: "ALTER TABLE scheduler_entries ADD COLUMN fire_at BIGINT;
        UPDATE scheduler_entries SET fire_at = next_run;
        DROP INDEX scheduler_entries_due;
        CREATE INDEX scheduler_entries_due ON scheduler_entries (fire_at)
            WHERE status IN ('scheduled', 'running');",
    },
];

const ACTIVE: &str = "status IN ('scheduled', 'running')";
const RUN_COLUMNS: &str =
    "r.entry_id, r.due_at, r.state, r.claimed_at, r.finished_at, r.starts, r.result, r.error";

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_ms(v: i64) -> Result<DateTime<Utc>> {
    DateTime::from_timestamp_millis(v)
        .ok_or_else(|| Error::storage(format!("timestamp {v} ms is out of range")))
}

/// When a node may start the entry's next run (ms): its due time plus a delay below the
/// entry's jitter. The delay is a hash of the entry's id and the due time, so every node (and
/// every rewrite of the entry) computes the same one, and it is spread evenly over
/// `[0, jitter)` across entries and occurrences, like the single-node scheduler's random one.
fn fire_at(e: &ScheduleEntry) -> Option<i64> {
    let due = ms(e.task.next_execution_at?);
    let jitter = e
        .jitter
        .map_or(0, |j| u64::try_from(j.as_millis()).unwrap_or(u64::MAX));
    if jitter == 0 {
        return Some(due);
    }
    let id = e.id().as_u128();
    // splitmix64's finaliser over the id's halves and the due time.
    let mut h = (id as u64) ^ ((id >> 64) as u64).rotate_left(17) ^ (due as u64);
    h = h.wrapping_add(0x9E37_79B9_7F4A_7C15);
    h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^= h >> 31;
    Some(due.saturating_add(i64::try_from(h % jitter).unwrap_or(0)))
}

fn version_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// What a scheduled entry is called in reports and errors.
const ENTRY: &str = "scheduled task";
/// What a run is called in reports.
const RUN: &str = "scheduled run";

/// The id of a row with an `id` column, for reports.
fn entry_id(r: &Row) -> String {
    r.try_get::<_, Uuid>("id")
        .map(|u| u.to_string())
        .unwrap_or_default()
}

/// The `<entry>@<due ms>` of a row of [`RUN_COLUMNS`], for reports.
fn run_id(r: &Row) -> String {
    let entry = r
        .try_get::<_, Uuid>(0)
        .map(|u| u.to_string())
        .unwrap_or_default();
    let due = r.try_get::<_, i64>(1).unwrap_or_default();
    format!("{entry}@{due}")
}

fn decode_entry(r: &Row) -> Result<ScheduleEntry> {
    let bad = |e| pg_err("bad scheduler_entries row", e);
    let data: String = r.try_get("data").map_err(bad)?;
    let version: i64 = r.try_get("version").map_err(bad)?;
    let mut e: ScheduleEntry = serde_json::from_str(&data)?;
    e.version = u64::try_from(version).unwrap_or_default();
    Ok(e)
}

fn decode_run(r: &Row) -> Result<ScheduleRun> {
    let bad = |e| pg_err("bad scheduler_runs row", e);
    let state: String = r.try_get(2).map_err(bad)?;
    let starts: i32 = r.try_get(5).map_err(bad)?;
    Ok(ScheduleRun {
        entry_id: r.try_get(0).map_err(bad)?,
        due_at: from_ms(r.try_get(1).map_err(bad)?)?,
        state: RunState::parse(&state)?,
        claimed_at: from_ms(r.try_get(3).map_err(bad)?)?,
        finished_at: r
            .try_get::<_, Option<i64>>(4)
            .map_err(bad)?
            .map(from_ms)
            .transpose()?,
        starts: u32::try_from(starts).unwrap_or_default(),
        result: r.try_get(6).map_err(bad)?,
        error: r.try_get(7).map_err(bad)?,
    })
}

/// An error inside a transaction: from the pool or decoding, or from the server (which may be
/// a deadlock or serialization failure worth retrying).
enum TxError {
    Store(Error),
    Pg(tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for TxError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Pg(e)
    }
}

impl TxError {
    fn is_retryable(&self) -> bool {
        match self {
            Self::Pg(e) => e.code().is_some_and(|c| {
                *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
            }),
            Self::Store(_) => false,
        }
    }

    fn into_error(self, context: &str) -> Error {
        match self {
            Self::Pg(e) => pg_err(context, e),
            Self::Store(e) => e,
        }
    }
}

/// Columns of entries written in bulk through `unnest`.
#[derive(Default)]
struct EntryColumns {
    ids: Vec<Uuid>,
    task_ids: Vec<String>,
    statuses: Vec<String>,
    recurring: Vec<bool>,
    next_runs: Vec<Option<i64>>,
    fire_ats: Vec<Option<i64>>,
    versions: Vec<i64>,
    data: Vec<String>,
    expected: Vec<i64>,
}

impl EntryColumns {
    fn push(&mut self, e: &ScheduleEntry, expected: u64) -> Result<()> {
        self.ids.push(e.id());
        self.task_ids.push(e.task.task_id.clone());
        self.statuses.push(status_str(e.task.status).to_owned());
        self.recurring.push(e.task.is_recurring());
        self.next_runs.push(e.task.next_execution_at.map(ms));
        self.fire_ats.push(fire_at(e));
        self.versions.push(version_i64(e.version));
        self.data.push(serde_json::to_string(e)?);
        self.expected.push(version_i64(expected));
        Ok(())
    }

    /// The parameters of [`UPDATE_ENTRIES`].
    fn update_params(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 9] {
        [
            &self.ids,
            &self.task_ids,
            &self.statuses,
            &self.recurring,
            &self.next_runs,
            &self.versions,
            &self.data,
            &self.expected,
            &self.fire_ats,
        ]
    }
}

const LOCK_ENTRIES: &str =
    "SELECT id FROM scheduler_entries WHERE id = ANY($1) ORDER BY id FOR UPDATE";

const UPDATE_ENTRIES: &str = "UPDATE scheduler_entries AS e SET task_id = u.task_id, status = u.status,
        recurring = u.recurring, next_run = u.next_run, version = u.version, data = u.data,
        fired_by = NULL, fired_until = NULL, fire_at = u.fire_at
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bool[], $5::int8[], $6::int8[], $7::text[], $8::int8[],
                $9::int8[])
        AS u(id, task_id, status, recurring, next_run, version, data, expected, fire_at)
    WHERE e.id = u.id AND e.version = u.expected
    RETURNING e.id";

const PRUNE: &str =
    "DELETE FROM scheduler_runs AS r WHERE r.entry_id = ANY($1) AND r.state <> 'claimed'
    AND r.due_at < (SELECT x.due_at FROM scheduler_runs AS x WHERE x.entry_id = r.entry_id
                    AND x.state <> 'claimed' ORDER BY x.due_at DESC LIMIT 1 OFFSET $2)";

/// Entries and run claims in a PostgreSQL database; several scheduler nodes may share it (see
/// [`SharedScheduleStore`]).
///
/// `Send + Sync`, cheap to clone (clones share the pool). [`open`](Self::open) applies the
/// scheduler's migrations under the advisory lock of [`PgDb::migrate`], so nodes may open it
/// at the same time.
///
/// ```no_run
/// use std::sync::Arc;
/// use architectlm_store::postgres::{PgDb, PgOptions};
/// use architectlm_store::schedule::PgScheduleStore;
///
/// # async fn demo() -> architectlm_store::Result<()> {
/// let db = PgDb::connect(PgOptions::new("postgres://postgres@127.0.0.1:5432/test")).await?;
/// let store = Arc::new(PgScheduleStore::open(db).await?);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PgScheduleStore {
    db: PgDb,
    /// A connection kept for lease renewals, so that a pool busy with runs (tasks may share
    /// it) cannot delay a renewal past the lease and let another node take live runs over.
    renewal: std::sync::Arc<tokio::sync::Mutex<Option<PgClient>>>,
    reports: Reports,
}

impl std::fmt::Debug for PgScheduleStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgScheduleStore")
            .field("db", &self.db)
            .finish()
    }
}

impl PgScheduleStore {
    /// Uses `db`, creating the scheduler's tables if needed.
    pub async fn open(db: PgDb) -> Result<Self> {
        db.migrate(MIGRATIONS).await?;
        Ok(Self {
            db,
            renewal: std::sync::Arc::default(),
            reports: Reports::default(),
        })
    }

    /// The database.
    pub fn db(&self) -> &PgDb {
        &self.db
    }

    /// Writes entries (version-checked) and claims due times in one transaction; retried on a
    /// deadlock or serialization failure.
    async fn write_claims(
        &self,
        owner: Option<&str>,
        lease: Option<Duration>,
        now: DateTime<Utc>,
        claims: &[Claim],
    ) -> Result<Vec<Result<Vec<DateTime<Utc>>>>> {
        let mut cols = EntryColumns::default();
        let mut run_ids = Vec::new();
        let mut run_due = Vec::new();
        for c in claims {
            cols.push(&c.entry, c.expected_version)?;
            for d in &c.due {
                run_ids.push(c.entry.id());
                run_due.push(ms(truncate_ms(*d)));
            }
        }
        let lease_secs = lease.map(|l| l.as_secs_f64());
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self
                .try_write_claims(owner, lease_secs, now, &cols, &run_ids, &run_due)
                .await
            {
                Ok((written, claimed, actual)) => {
                    return Ok(claims
                        .iter()
                        .map(|c| {
                            let id = c.entry.id();
                            if !written.contains(&id) {
                                return Err(match actual.get(&id) {
                                    Some(v) => conflict(id, c.expected_version, *v),
                                    None => Error::not_found("scheduled entry", id),
                                });
                            }
                            Ok(c.due
                                .iter()
                                .map(|d| truncate_ms(*d))
                                .filter(|d| claimed.contains(&(id, ms(*d))))
                                .collect())
                        })
                        .collect());
                }
                Err(e) if attempt < 5 && e.is_retryable() => continue,
                Err(e) => return Err(e.into_error("cannot claim scheduled runs")),
            }
        }
    }

    #[allow(clippy::type_complexity)]
    async fn try_write_claims(
        &self,
        owner: Option<&str>,
        lease_secs: Option<f64>,
        now: DateTime<Utc>,
        cols: &EntryColumns,
        run_ids: &[Uuid],
        run_due: &[i64],
    ) -> std::result::Result<
        (
            std::collections::HashSet<Uuid>,
            std::collections::HashSet<(Uuid, i64)>,
            HashMap<Uuid, u64>,
        ),
        TxError,
    > {
        let mut client = self.db.client().await.map_err(TxError::Store)?;
        let txn = client.transaction().await?;
        txn.execute(LOCK_ENTRIES, &[&cols.ids]).await?;
        let written: std::collections::HashSet<Uuid> = txn
            .query(UPDATE_ENTRIES, &cols.update_params())
            .await?
            .iter()
            .map(|r| r.try_get::<_, Uuid>(0))
            .collect::<std::result::Result<_, tokio_postgres::Error>>()?;
        let mut claimed = std::collections::HashSet::new();
        if !run_ids.is_empty() && !written.is_empty() {
            let ok: Vec<Uuid> = written.iter().copied().collect();
            let rows = txn
                .query(
                    "INSERT INTO scheduler_runs (entry_id, due_at, state, claimed_at, starts, owner, lease_until)
                     SELECT r.entry_id, r.due_at, 'claimed', $3, 1, $4,
                            clock_timestamp() + make_interval(secs => $5::float8)
                     FROM unnest($1::uuid[], $2::int8[]) AS r(entry_id, due_at)
                     WHERE r.entry_id = ANY($6)
                     ON CONFLICT DO NOTHING RETURNING entry_id, due_at",
                    &[&run_ids, &run_due, &ms(now), &owner, &lease_secs, &ok],
                )
                .await?;
            for r in rows {
                claimed.insert((r.try_get::<_, Uuid>(0)?, r.try_get::<_, i64>(1)?));
            }
        }
        let mut actual = HashMap::new();
        if written.len() < cols.ids.len() {
            let missing: Vec<Uuid> = cols
                .ids
                .iter()
                .filter(|id| !written.contains(id))
                .copied()
                .collect();
            for r in txn
                .query(
                    "SELECT id, version FROM scheduler_entries WHERE id = ANY($1)",
                    &[&missing],
                )
                .await?
            {
                let v: i64 = r.try_get(1)?;
                actual.insert(r.try_get(0)?, u64::try_from(v).unwrap_or_default());
            }
        }
        txn.commit().await?;
        Ok((written, claimed, actual))
    }

    async fn select_entries(
        &self,
        sql: &str,
        args: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<ScheduleEntry>> {
        let rows = self
            .select(sql, args, "cannot read scheduled entries")
            .await?;
        Ok(self
            .reports
            .keep(ENTRY, &rows, |r| (entry_id(r), decode_entry(r))))
    }

    async fn select_runs(
        &self,
        sql: &str,
        args: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<ScheduleRun>> {
        let rows = self.select(sql, args, "cannot read scheduled runs").await?;
        Ok(self
            .reports
            .keep(RUN, &rows, |r| (run_id(r), decode_run(r))))
    }

    /// Runs a query on a pooled connection.
    async fn select(
        &self,
        sql: &str,
        args: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        what: &'static str,
    ) -> Result<Vec<Row>> {
        let client = self.db.client().await?;
        client.query(sql, args).await.map_err(|e| pg_err(what, e))
    }
}

#[async_trait]
impl ScheduleStore for PgScheduleStore {
    async fn insert(&self, entries: Vec<ScheduleEntry>) -> Result<()> {
        let mut cols = EntryColumns::default();
        for e in &entries {
            cols.push(e, 0)?;
        }
        let client = self.db.client().await?;
        let res = client
            .execute(
                "INSERT INTO scheduler_entries (id, task_id, status, recurring, next_run, version, data, fire_at)
                 SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bool[], $5::int8[], $6::int8[], $7::text[],
                                      $8::int8[])",
                &[
                    &cols.ids,
                    &cols.task_ids,
                    &cols.statuses,
                    &cols.recurring,
                    &cols.next_runs,
                    &cols.versions,
                    &cols.data,
                    &cols.fire_ats,
                ],
            )
            .await;
        match res {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                // Name the first id that exists already.
                let existing = client
                    .query(
                        "SELECT id, version FROM scheduler_entries WHERE id = ANY($1) LIMIT 1",
                        &[&cols.ids],
                    )
                    .await
                    .map_err(|e| pg_err("cannot read scheduled entries", e))?;
                match existing.first() {
                    Some(r) => {
                        let id: Uuid = r.try_get(0).map_err(|e| pg_err("bad row", e))?;
                        let v: i64 = r.try_get(1).map_err(|e| pg_err("bad row", e))?;
                        Err(conflict(id, 0, u64::try_from(v).unwrap_or_default()))
                    }
                    None => Err(pg_err("cannot insert scheduled entries", e)),
                }
            }
            Err(e) => Err(pg_err("cannot insert scheduled entries", e)),
        }
    }

    async fn update(&self, entry: &ScheduleEntry, expected_version: u64) -> Result<()> {
        let claim = Claim {
            entry: entry.clone(),
            expected_version,
            due: Vec::new(),
        };
        self.write_claims(None, None, Utc::now(), std::slice::from_ref(&claim))
            .await?
            .pop()
            .unwrap_or_else(|| Err(Error::not_found("scheduled entry", entry.id())))
            .map(|_| ())
    }

    async fn claim(
        &self,
        entry: &ScheduleEntry,
        expected_version: u64,
        due: &[DateTime<Utc>],
        now: DateTime<Utc>,
    ) -> Result<Vec<DateTime<Utc>>> {
        let claim = Claim {
            entry: entry.clone(),
            expected_version,
            due: due.to_vec(),
        };
        self.write_claims(None, None, now, std::slice::from_ref(&claim))
            .await?
            .pop()
            .unwrap_or_else(|| Err(Error::not_found("scheduled entry", entry.id())))
    }

    async fn finish(
        &self,
        entry: &ScheduleEntry,
        expected_version: u64,
        run: &ScheduleRun,
    ) -> Result<()> {
        let mut cols = EntryColumns::default();
        cols.push(entry, expected_version)?;
        let id = entry.id();
        let mut client = self.db.client().await?;
        let err = |e| pg_err("cannot record the end of a scheduled run", e);
        let txn = client.transaction().await.map_err(err)?;
        let written = txn
            .query(UPDATE_ENTRIES, &cols.update_params())
            .await
            .map_err(err)?;
        if written.is_empty() {
            let actual = txn
                .query_opt(
                    "SELECT version FROM scheduler_entries WHERE id = $1",
                    &[&id],
                )
                .await
                .map_err(err)?;
            return Err(match actual {
                Some(r) => {
                    let v: i64 = r.try_get(0).map_err(err)?;
                    conflict(id, expected_version, u64::try_from(v).unwrap_or_default())
                }
                None => Error::not_found("scheduled entry", id),
            });
        }
        txn.execute(
            "INSERT INTO scheduler_runs (entry_id, due_at, state, claimed_at, finished_at, starts, result, error)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (entry_id, due_at) DO UPDATE SET state = excluded.state,
                finished_at = excluded.finished_at, result = excluded.result, error = excluded.error,
                owner = NULL, lease_until = NULL",
            &[
                &run.entry_id,
                &ms(run.due_at),
                &run.state.as_str(),
                &ms(run.claimed_at),
                &run.finished_at.map(ms),
                &i32::try_from(run.starts).unwrap_or(i32::MAX),
                &run.result,
                &run.error,
            ],
        )
        .await
        .map_err(err)?;
        txn.execute(PRUNE, &[&vec![id], &(KEPT_RUNS as i64 - 1)])
            .await
            .map_err(err)?;
        txn.commit().await.map_err(err)
    }

    async fn restart(&self, entry_id: Uuid, due_at: DateTime<Utc>) -> Result<u32> {
        let client = self.db.client().await?;
        let row = client
            .query_opt(
                "UPDATE scheduler_runs SET starts = starts + 1
                 WHERE entry_id = $1 AND due_at = $2 RETURNING starts",
                &[&entry_id, &ms(due_at)],
            )
            .await
            .map_err(|e| pg_err("cannot count a restart", e))?;
        let row =
            row.ok_or_else(|| Error::not_found("scheduled run", format!("{entry_id}@{due_at}")))?;
        let starts: i32 = row.try_get(0).map_err(|e| pg_err("bad row", e))?;
        Ok(u32::try_from(starts).unwrap_or_default())
    }

    async fn get(&self, id: Uuid) -> Result<Option<ScheduleEntry>> {
        self.select(
            "SELECT id, data, version FROM scheduler_entries WHERE id = $1",
            &[&id],
            "cannot read scheduled entries",
        )
        .await?
        .first()
        .map(decode_entry)
        .transpose()
        .map_err(|e| unreadable(ENTRY, id, e))
    }

    async fn query(&self, filter: &ScheduledTaskFilter) -> Result<Page<ScheduleEntry>> {
        let mut sql = String::from(" FROM scheduler_entries WHERE TRUE");
        let statuses: Vec<String> = filter
            .status
            .iter()
            .map(|s| status_str(*s).to_owned())
            .collect();
        let from = filter.from.map(ms);
        let to = filter.to.map(ms);
        let mut args: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = Vec::new();
        if !statuses.is_empty() {
            args.push(&statuses);
            sql.push_str(&format!(" AND status = ANY(${})", args.len()));
        }
        if !filter.task_id.is_empty() {
            args.push(&filter.task_id);
            sql.push_str(&format!(" AND task_id = ANY(${})", args.len()));
        }
        if let Some(f) = &from {
            args.push(f);
            sql.push_str(&format!(" AND next_run >= ${}", args.len()));
        }
        if let Some(t) = &to {
            args.push(t);
            sql.push_str(&format!(" AND next_run <= ${}", args.len()));
        }
        if let Some(r) = &filter.recurring {
            args.push(r);
            sql.push_str(&format!(" AND recurring = ${}", args.len()));
        }
        let select = format!("SELECT id, data, version{sql} ORDER BY next_run NULLS LAST, id");
        if !filter.metadata.is_empty() {
            // Metadata is matched on the decoded entries (JSON equality of values), after the
            // indexed conditions narrowed the rows.
            let items = self
                .select_entries(&select, &args)
                .await?
                .into_iter()
                .filter(|e| filter.matches(&e.task))
                .collect();
            return Ok(paginate(items, filter));
        }
        let client = self.db.client().await?;
        let total: i64 = client
            .query_one(&format!("SELECT COUNT(*){sql}"), &args)
            .await
            .and_then(|r| r.try_get(0))
            .map_err(|e| pg_err("cannot count scheduled entries", e))?;
        drop(client);
        let limit = i64::try_from(filter.page.limit).unwrap_or(i64::MAX);
        let offset = i64::try_from(filter.page.offset).unwrap_or(i64::MAX);
        let n = args.len();
        args.push(&limit);
        args.push(&offset);
        let rows = self
            .select(
                &format!("{select} LIMIT ${} OFFSET ${}", n + 1, n + 2),
                &args,
                "cannot read scheduled entries",
            )
            .await?;
        let read = rows.len() as u64;
        let items = self
            .reports
            .keep(ENTRY, &rows, |r| (entry_id(r), decode_entry(r)));
        let total = u64::try_from(total).unwrap_or_default();
        let end = filter.page.offset.saturating_add(read);
        Ok(Page::new(items, total, (end < total).then_some(end)))
    }

    async fn load_active(&self) -> Result<Vec<ScheduleEntry>> {
        self.select_entries(
            "SELECT id, data, version FROM scheduler_entries
             WHERE status IN ('scheduled', 'running', 'paused')",
            &[],
        )
        .await
    }

    async fn unfinished_runs(&self) -> Result<Vec<ScheduleRun>> {
        self.select_runs(
            &format!("SELECT {RUN_COLUMNS} FROM scheduler_runs AS r WHERE r.state = 'claimed'"),
            &[],
        )
        .await
    }

    async fn runs(&self, entry_id: Uuid) -> Result<Vec<ScheduleRun>> {
        self.select_runs(
            &format!(
                "SELECT {RUN_COLUMNS} FROM scheduler_runs AS r WHERE r.entry_id = $1 ORDER BY r.due_at"
            ),
            &[&entry_id],
        )
        .await
    }

    fn on_unreadable(&self, listener: UnreadableListener) {
        self.reports.add(listener);
    }
}

#[async_trait]
impl SharedScheduleStore for PgScheduleStore {
    async fn acquire_due(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        hold: Duration,
        limit: usize,
    ) -> Result<DueBatch> {
        // Set aside the renewal connection before this node claims anything, while the pool
        // is not busy yet.
        {
            let mut kept = self.renewal.lock().await;
            if kept.is_none() {
                *kept = Some(self.db.client().await?);
            }
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut client = self.db.client().await?;
        let err = |e| pg_err("cannot look for due scheduled entries", e);
        let mut entries = Vec::new();
        if limit > 0 {
            // Two statements in one transaction: the count of claimed runs is read by a
            // statement that starts after the entries are locked, so it includes the runs of
            // every claim that changed them before (one statement would count with a snapshot
            // older than the entry version it returns, and a node could start more runs than
            // the overlap policy allows). Claims and recordings lock the entry first, so the
            // count stays right until this node's version-checked claim.
            let txn = client.transaction().await.map_err(err)?;
            let rows = txn
                .query(
                    &format!(
                        "UPDATE scheduler_entries AS e SET fired_by = $1,
                            fired_until = clock_timestamp() + make_interval(secs => $3::float8)
                         FROM (SELECT id FROM scheduler_entries
                               WHERE {ACTIVE} AND fire_at <= $2
                                 AND (fired_by IS NULL OR fired_until < clock_timestamp())
                               ORDER BY fire_at LIMIT $4 FOR UPDATE SKIP LOCKED) AS d
                         WHERE e.id = d.id RETURNING e.id, e.data, e.version"
                    ),
                    &[&owner, &ms(now), &hold.as_secs_f64(), &limit],
                )
                .await
                .map_err(err)?;
            let found = self
                .reports
                .keep(ENTRY, &rows, |r| (entry_id(r), decode_entry(r)));
            let mut running: HashMap<Uuid, i64> = HashMap::new();
            if !found.is_empty() {
                let ids: Vec<Uuid> = found.iter().map(ScheduleEntry::id).collect();
                for r in txn
                    .query(
                        "SELECT entry_id, count(*) FROM scheduler_runs
                         WHERE entry_id = ANY($1) AND state = 'claimed' GROUP BY entry_id",
                        &[&ids],
                    )
                    .await
                    .map_err(err)?
                {
                    running.insert(r.try_get(0).map_err(err)?, r.try_get(1).map_err(err)?);
                }
            }
            txn.commit().await.map_err(err)?;
            entries = found
                .into_iter()
                .map(|entry| {
                    let n = running.get(&entry.id()).copied().unwrap_or(0);
                    DueEntry {
                        entry,
                        running: u32::try_from(n).unwrap_or(u32::MAX),
                    }
                })
                .collect();
        }
        let next: Option<i64> = client
            .query_one(
                &format!(
                    "SELECT min(fire_at) FROM scheduler_entries WHERE {ACTIVE} AND fire_at > $1"
                ),
                &[&ms(now)],
            )
            .await
            .and_then(|r| r.try_get(0))
            .map_err(err)?;
        Ok(DueBatch {
            entries,
            next_due: next.map(from_ms).transpose()?,
        })
    }

    async fn claim_batch(
        &self,
        owner: &str,
        lease: Duration,
        now: DateTime<Utc>,
        claims: Vec<Claim>,
    ) -> Result<Vec<Result<Vec<DateTime<Utc>>>>> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        self.write_claims(Some(owner), Some(lease), now, &claims)
            .await
    }

    async fn finish_batch(
        &self,
        owner: &str,
        runs: Vec<ScheduleRun>,
        apply: &ApplyRun,
    ) -> Result<Vec<(ScheduleEntry, ScheduleRun)>> {
        if runs.is_empty() {
            return Ok(Vec::new());
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.try_finish_batch(owner, &runs, apply).await {
                Ok(done) => return Ok(done),
                Err(e) if attempt < 5 && e.is_retryable() => continue,
                Err(e) => return Err(e.into_error("cannot record the end of scheduled runs")),
            }
        }
    }

    /// Runs on a connection this store keeps for renewals (taken from the pool once, and again
    /// after it fails), so a busy pool does not delay it. Rows locked right now (being recorded
    /// as finished by this node, or examined by another node's takeover) are skipped rather
    /// than waited for: a renewal never queues behind other transactions.
    async fn renew(&self, owner: &str, lease: Duration) -> Result<u64> {
        let mut kept = self.renewal.lock().await;
        if kept.is_none() {
            *kept = Some(self.db.client().await?);
        }
        let Some(client) = kept.as_ref() else {
            return Err(Error::storage("no connection for lease renewals"));
        };
        let res = client
            .execute(
                "UPDATE scheduler_runs AS r
                    SET lease_until = clock_timestamp() + make_interval(secs => $2::float8)
                 FROM (SELECT entry_id, due_at FROM scheduler_runs
                       WHERE owner = $1 AND state = 'claimed' FOR UPDATE SKIP LOCKED) AS x
                 WHERE r.entry_id = x.entry_id AND r.due_at = x.due_at",
                &[&owner, &lease.as_secs_f64()],
            )
            .await;
        if res.is_err() {
            // A broken connection is replaced at the next renewal.
            *kept = None;
        }
        res.map_err(|e| pg_err("cannot renew the leases of scheduled runs", e))
    }

    async fn take_expired(
        &self,
        owner: &str,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<ScheduleRun>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.select_runs(
            &format!(
                "UPDATE scheduler_runs AS r SET owner = $1,
                    lease_until = clock_timestamp() + make_interval(secs => $2::float8),
                    starts = r.starts + 1
                 FROM (SELECT entry_id, due_at FROM scheduler_runs
                       WHERE state = 'claimed' AND lease_until < clock_timestamp()
                       ORDER BY lease_until LIMIT $3 FOR UPDATE SKIP LOCKED) AS x
                 WHERE r.entry_id = x.entry_id AND r.due_at = x.due_at
                 RETURNING {RUN_COLUMNS}"
            ),
            &[&owner, &lease.as_secs_f64(), &limit],
        )
        .await
    }
}

impl PgScheduleStore {
    async fn try_finish_batch(
        &self,
        owner: &str,
        runs: &[ScheduleRun],
        apply: &ApplyRun,
    ) -> std::result::Result<Vec<(ScheduleEntry, ScheduleRun)>, TxError> {
        let mut ids: Vec<Uuid> = runs.iter().map(|r| r.entry_id).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut client = self.db.client().await.map_err(TxError::Store)?;
        let txn = client.transaction().await?;
        // Entries first, in id order (the order every batch locks them in).
        let mut entries: HashMap<Uuid, ScheduleEntry> = HashMap::new();
        for r in txn
            .query(
                "SELECT id, data, version FROM scheduler_entries WHERE id = ANY($1) ORDER BY id FOR UPDATE",
                &[&ids],
            )
            .await?
        {
            // An entry that cannot be decoded is left as it is (like a deleted one): its runs
            // are recorded, the entry is reported.
            match decode_entry(&r) {
                Ok(e) => {
                    entries.insert(e.id(), e);
                }
                Err(e) => self.reports.skipped(ENTRY, &entry_id(&r), &e),
            }
        }
        let mut run_ids = Vec::with_capacity(runs.len());
        let mut run_due = Vec::with_capacity(runs.len());
        let mut states = Vec::with_capacity(runs.len());
        let mut finished = Vec::with_capacity(runs.len());
        let mut results = Vec::with_capacity(runs.len());
        let mut errors = Vec::with_capacity(runs.len());
        for r in runs {
            run_ids.push(r.entry_id);
            run_due.push(ms(r.due_at));
            states.push(r.state.as_str().to_owned());
            finished.push(r.finished_at.map(ms));
            results.push(r.result.clone());
            errors.push(r.error.clone());
        }
        let owned: std::collections::HashMap<(Uuid, i64), i32> = txn
            .query(
                "UPDATE scheduler_runs AS r SET state = u.state, finished_at = u.finished_at,
                    result = u.result, error = u.error, owner = NULL, lease_until = NULL
                 FROM unnest($1::uuid[], $2::int8[], $3::text[], $4::int8[], $5::jsonb[], $6::text[])
                    AS u(entry_id, due_at, state, finished_at, result, error)
                 WHERE r.entry_id = u.entry_id AND r.due_at = u.due_at
                   AND r.owner = $7 AND r.state = 'claimed'
                 RETURNING r.entry_id, r.due_at, r.starts",
                &[&run_ids, &run_due, &states, &finished, &results, &errors, &owner],
            )
            .await?
            .iter()
            .map(|r| Ok(((r.try_get(0)?, r.try_get(1)?), r.try_get(2)?)))
            .collect::<std::result::Result<_, tokio_postgres::Error>>()?;
        let mut done = Vec::with_capacity(owned.len());
        let mut touched: HashMap<Uuid, u64> = HashMap::new();
        for r in runs {
            let Some(starts) = owned.get(&(r.entry_id, ms(r.due_at))) else {
                continue;
            };
            let Some(e) = entries.get_mut(&r.entry_id) else {
                continue;
            };
            let mut run = r.clone();
            run.starts = u32::try_from(*starts).unwrap_or_default();
            touched.entry(e.id()).or_insert(e.version);
            apply(e, &run);
            done.push((e.id(), run));
        }
        let mut cols = EntryColumns::default();
        for (id, old) in &touched {
            if let Some(e) = entries.get_mut(id) {
                e.version = old + 1;
                cols.push(e, *old).map_err(TxError::Store)?;
            }
        }
        if !cols.ids.is_empty() {
            txn.execute(UPDATE_ENTRIES, &cols.update_params()).await?;
            txn.execute(PRUNE, &[&cols.ids, &(KEPT_RUNS as i64 - 1)])
                .await?;
        }
        txn.commit().await?;
        Ok(done
            .into_iter()
            .filter_map(|(id, run)| entries.get(&id).map(|e| (e.clone(), run)))
            .collect())
    }
}
