//! Scheduled entries and run claims in the embedded SQLite database.

use rusqlite::{OptionalExtension, Row, params, params_from_iter, types::Value as SqlValue};

use super::*;
use crate::sqlite::{Migration, SqliteDb};
use crate::unreadable::{Reports, unreadable};
use architectlm_core::extensions::scheduler::RunRecord;

/// The scheduler's tables. `next_run` is in milliseconds since the epoch (NULL: none). An
/// entry's `data` is its compact form ([`Compact`]), or the whole entry as JSON in rows
/// written before it.
pub(super) static MIGRATIONS: &[Migration] = &[
    Migration {
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
    },
    Migration {
        component: "scheduler",
        version: 2,
        description: "narrower entry indexes, without the next-run-only one",
        // Each inserted entry walks every index: three B-trees of entries instead of five
        // (the table itself is appended to in rowid order). The plain next-run index served
        // only time ranges without a status, now a scan; the status and task indexes lose their
        // next-run column, which no query could use for its order (`next_run IS NULL` first).
        // Rows keep their text: the reader tells whole-entry JSON from the compact form.
        sql: "DROP INDEX scheduler_entries_next_run;
        DROP INDEX scheduler_entries_status;
        DROP INDEX scheduler_entries_task;
        CREATE INDEX scheduler_entries_status ON scheduler_entries (status);
        CREATE INDEX scheduler_entries_task ON scheduler_entries (task_id);",
    },
];

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

/// The columns an entry is read from, in this order.
const ENTRY_COLUMNS: &str = "id, task_id, version, data";

/// Decodes a row of [`ENTRY_COLUMNS`] in place, with no copy of its text.
fn row_entry(r: &Row<'_>) -> Result<ScheduleEntry> {
    let cell = |e: rusqlite::Error| Error::storage_with("corrupt scheduled entry row", e);
    let id = r.get_ref(0).and_then(|v| Ok(v.as_blob()?)).map_err(cell)?;
    let task_id = r.get_ref(1).and_then(|v| Ok(v.as_str()?)).map_err(cell)?;
    let version: i64 = r.get(2).map_err(cell)?;
    let data = r.get_ref(3).and_then(|v| Ok(v.as_str()?)).map_err(cell)?;
    decode(id, task_id, data, version)
}

/// The id of a row of [`ENTRY_COLUMNS`] or [`RUN_COLUMNS`], for reports.
fn row_id(r: &Row<'_>) -> String {
    match r.get_ref(0).ok().and_then(|v| v.as_blob().ok()) {
        Some(b) => Uuid::from_slice(b).map_or_else(|_| format!("{b:02x?}"), |u| u.to_string()),
        None => String::new(),
    }
}

/// Decodes every row of a query over [`ENTRY_COLUMNS`], skipping (and reporting) those that
/// cannot be decoded. Returns the entries and how many rows were read.
fn entries(mut rows: rusqlite::Rows<'_>, reports: &Reports) -> Result<(Vec<ScheduleEntry>, u64)> {
    let mut out = Vec::new();
    let mut read = 0;
    while let Some(r) = rows.next().map_err(db_err)? {
        read += 1;
        match row_entry(r) {
            Ok(e) => out.push(e),
            Err(e) => reports.skipped(ENTRY, &row_id(r), &e),
        }
    }
    Ok((out, read))
}

/// What a scheduled entry is called in reports and errors.
const ENTRY: &str = "scheduled task";
/// What a run is called in reports.
const RUN: &str = "scheduled run";

/// Decodes the run rows of a query over [`RUN_COLUMNS`], skipping (and reporting) those that
/// cannot be decoded.
fn runs_of(
    rows: impl Iterator<Item = rusqlite::Result<RunRow>>,
    reports: &Reports,
) -> Result<Vec<ScheduleRun>> {
    let mut out = Vec::new();
    for r in rows {
        let r = r.map_err(db_err)?;
        let id = match Uuid::from_slice(&r.entry_id) {
            Ok(u) => format!("{u}@{}", r.due_at),
            Err(_) => format!("{:02x?}@{}", r.entry_id, r.due_at),
        };
        match r.decode() {
            Ok(run) => out.push(run),
            Err(e) => reports.skipped(RUN, &id, &e),
        }
    }
    Ok(out)
}

fn decode(id: &[u8], task_id: &str, data: &str, version: i64) -> Result<ScheduleEntry> {
    let corrupt = Error::Serialization;
    let mut e = if data.starts_with(COMPACT_PREFIX) {
        let id = Uuid::from_slice(id)
            .map_err(|e| Error::storage_with("corrupt scheduled entry id", e))?;
        serde_json::from_str::<Compact>(data)
            .map_err(corrupt)?
            .into_entry(id, task_id.to_owned())
    } else {
        // A row written before the compact form: the whole entry as JSON.
        serde_json::from_str::<ScheduleEntry>(data).map_err(corrupt)?
    };
    e.version = u64::try_from(version).unwrap_or_default();
    Ok(e)
}

/// What every compact row's text starts with; rows of the first layout hold the whole entry
/// (`{"task":…`) and are still read.
const COMPACT_PREFIX: &str = "{\"v\":2";

/// A timestamp as `[seconds, nanoseconds]` since the epoch: exact, and far cheaper to write and
/// parse than RFC 3339 text.
mod ts {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn to_parts(t: &DateTime<Utc>) -> (i64, u32) {
        (t.timestamp(), t.timestamp_subsec_nanos())
    }

    pub(super) fn from_parts<E: serde::de::Error>((s, n): (i64, u32)) -> Result<DateTime<Utc>, E> {
        DateTime::from_timestamp(s, n)
            .ok_or_else(|| E::custom(format!("timestamp [{s}, {n}] is out of range")))
    }

    pub(super) fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        to_parts(t).serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        from_parts(<(i64, u32)>::deserialize(d)?)
    }

    pub(super) mod option {
        use super::*;

        pub(crate) fn serialize<S: Serializer>(
            t: &Option<DateTime<Utc>>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            t.as_ref().map(to_parts).serialize(s)
        }

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<DateTime<Utc>>, D::Error> {
            Option::<(i64, u32)>::deserialize(d)?
                .map(from_parts::<D::Error>)
                .transpose()
        }
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn is_default_policy(p: &SchedulePolicy) -> bool {
    *p == SchedulePolicy::default()
}

/// An entry's `data` column: everything but the id, task id and version (columns of their
/// own), with short keys, timestamps as numbers, and empty or default fields left out. A fresh
/// one-shot entry takes about 70 bytes, against nearly 600 for the whole entry as JSON.
#[derive(Serialize, Deserialize)]
struct Compact {
    /// The layout's version; always first, see [`COMPACT_PREFIX`].
    v: u8,
    s: ScheduledTaskStatus,
    #[serde(with = "ts")]
    e: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "ts::option")]
    x: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "ts::option")]
    n: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    p: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    z: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    r: Option<u32>,
    #[serde(default, skip_serializing_if = "is_zero")]
    c: u32,
    i: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    o: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    f: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    d: Option<String>,
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    m: serde_json::Map<String, Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    h: Vec<RunRecord>,
    #[serde(default, skip_serializing_if = "is_default_policy")]
    y: SchedulePolicy,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "ts::option")]
    sa: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "ts::option")]
    ea: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mx: Option<u32>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "architectlm_core::serde_duration::option"
    )]
    j: Option<Duration>,
}

/// Serialises an entry's `data` column (see [`Compact`]).
fn encode(e: &ScheduleEntry) -> Result<String> {
    // The same fields as `Compact`, borrowed.
    #[derive(Serialize)]
    struct Ref<'a> {
        v: u8,
        s: ScheduledTaskStatus,
        #[serde(with = "ts")]
        e: &'a DateTime<Utc>,
        #[serde(skip_serializing_if = "Option::is_none", with = "ts::option")]
        x: &'a Option<DateTime<Utc>>,
        #[serde(skip_serializing_if = "Option::is_none", with = "ts::option")]
        n: &'a Option<DateTime<Utc>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        p: &'a Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        z: &'a Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        r: &'a Option<u32>,
        #[serde(skip_serializing_if = "is_zero")]
        c: &'a u32,
        i: &'a Value,
        #[serde(skip_serializing_if = "Option::is_none")]
        o: &'a Option<Value>,
        #[serde(skip_serializing_if = "Option::is_none")]
        f: &'a Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        d: &'a Option<String>,
        #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
        m: &'a serde_json::Map<String, Value>,
        #[serde(skip_serializing_if = "<[RunRecord]>::is_empty")]
        h: &'a [RunRecord],
        #[serde(skip_serializing_if = "is_default_policy")]
        y: &'a SchedulePolicy,
        #[serde(skip_serializing_if = "Option::is_none", with = "ts::option")]
        sa: &'a Option<DateTime<Utc>>,
        #[serde(skip_serializing_if = "Option::is_none", with = "ts::option")]
        ea: &'a Option<DateTime<Utc>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        mx: &'a Option<u32>,
        #[serde(
            skip_serializing_if = "Option::is_none",
            with = "architectlm_core::serde_duration::option"
        )]
        j: &'a Option<Duration>,
    }
    let t = &e.task;
    let out = serde_json::to_string(&Ref {
        v: 2,
        s: t.status,
        e: &t.execute_at,
        x: &t.executed_at,
        n: &t.next_execution_at,
        p: &t.pattern,
        z: &t.timezone,
        r: &t.remaining_executions,
        c: &t.execution_count,
        i: &t.input,
        o: &t.result,
        f: &t.error,
        d: &t.description,
        m: &t.metadata,
        h: &t.history,
        y: &e.policy,
        sa: &e.start_at,
        ea: &e.end_at,
        mx: &e.max_executions,
        j: &e.jitter,
    })?;
    Ok(out)
}

impl Compact {
    fn into_entry(self, id: Uuid, task_id: String) -> ScheduleEntry {
        let mut task = ScheduledTask::new(id, task_id, self.i, self.e);
        task.status = self.s;
        task.executed_at = self.x;
        task.next_execution_at = self.n;
        task.pattern = self.p;
        task.timezone = self.z;
        task.remaining_executions = self.r;
        task.execution_count = self.c;
        task.result = self.o;
        task.error = self.f;
        task.description = self.d;
        task.metadata = self.m;
        task.history = self.h;
        let mut e = ScheduleEntry::new(task, self.y);
        e.start_at = self.sa;
        e.end_at = self.ea;
        e.max_executions = self.mx;
        e.jitter = self.j;
        e
    }
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
                .map_err(|e| Error::storage_with("corrupt run entry id", e))?,
            due_at: from_ms(self.due_at)?,
            state: RunState::parse(&self.state)?,
            claimed_at: from_ms(self.claimed_at)?,
            finished_at: self.finished_at.map(from_ms).transpose()?,
            starts: u32::try_from(self.starts).unwrap_or(u32::MAX),
            result: self.result.map(|s| serde_json::from_str(&s)).transpose()?,
            error: self.error,
        })
    }
}

const RUN_COLUMNS: &str = "entry_id, due_at, state, claimed_at, finished_at, starts, result, error";

fn replace(txn: &rusqlite::Transaction<'_>, entry: &ScheduleEntry, expected: u64) -> Result<()> {
    let data = encode(entry)?;
    let id = entry.id();
    let n = txn
        .prepare_cached(
            "UPDATE scheduler_entries SET task_id = ?2, status = ?3, recurring = ?4, next_run = ?5,
                version = ?6, data = ?7 WHERE id = ?1 AND version = ?8",
        )
        .and_then(|mut stmt| {
            stmt.execute(params![
                &id.as_bytes()[..],
                entry.task.task_id,
                status_str(entry.task.status),
                entry.task.is_recurring(),
                entry.task.next_execution_at.map(ms),
                i64::try_from(entry.version).unwrap_or(i64::MAX),
                data,
                i64::try_from(expected).unwrap_or(i64::MAX),
            ])
        })
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

/// Rows per multi-row `INSERT`: the statement's setup and teardown (cursors, the rowid seek,
/// the reset) are paid once per 64 entries instead of once per entry.
const INSERT_CHUNK: usize = 64;
/// Parameters per entry in an `INSERT`.
const ENTRY_PARAMS: usize = 7;
const INSERT_COLUMNS: &str = "INSERT INTO scheduler_entries (id, task_id, status, recurring, next_run, version, data) VALUES ";

static INSERT_MANY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let mut sql = String::from(INSERT_COLUMNS);
    for i in 0..INSERT_CHUNK {
        sql.push_str(if i == 0 { "(" } else { ", (" });
        sql.push_str(&["?"; ENTRY_PARAMS].join(", "));
        sql.push(')');
    }
    sql
});

/// Binds one entry's values from parameter `offset + 1` on.
fn bind_entry(
    stmt: &mut rusqlite::Statement<'_>,
    offset: usize,
    data: &str,
    e: &ScheduleEntry,
) -> rusqlite::Result<()> {
    let id = e.id();
    stmt.raw_bind_parameter(offset + 1, &id.as_bytes()[..])?;
    stmt.raw_bind_parameter(offset + 2, e.task.task_id.as_str())?;
    stmt.raw_bind_parameter(offset + 3, status_str(e.task.status))?;
    stmt.raw_bind_parameter(offset + 4, e.task.is_recurring())?;
    stmt.raw_bind_parameter(offset + 5, e.task.next_execution_at.map(ms))?;
    stmt.raw_bind_parameter(offset + 6, i64::try_from(e.version).unwrap_or(i64::MAX))?;
    stmt.raw_bind_parameter(offset + 7, data)
}

fn is_constraint(err: &rusqlite::Error) -> bool {
    matches!(err, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation)
}

/// Inserts entries one statement each; an existing id is a [`Error::Conflict`] naming it.
fn insert_rows(txn: &rusqlite::Transaction<'_>, rows: &[(String, ScheduleEntry)]) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut one = txn
        .prepare_cached(&format!("{INSERT_COLUMNS}(?1, ?2, ?3, ?4, ?5, ?6, ?7)"))
        .map_err(db_err)?;
    for (data, e) in rows {
        bind_entry(&mut one, 0, data, e).map_err(db_err)?;
        one.raw_execute().map_err(|err| {
            if is_constraint(&err) {
                conflict(e.id(), 0, e.version)
            } else {
                db_err(err)
            }
        })?;
    }
    Ok(())
}

/// Entries in an embedded SQLite database (see [`crate::sqlite`] for durability levels).
#[derive(Debug, Clone)]
pub struct SqliteScheduleStore {
    db: SqliteDb,
    reports: Reports,
}

impl SqliteScheduleStore {
    /// Uses `db`, creating the scheduler's tables if needed.
    pub async fn open(db: SqliteDb) -> Result<Self> {
        db.migrate(MIGRATIONS).await?;
        Ok(Self {
            db,
            reports: Reports::default(),
        })
    }

    /// The database.
    pub fn db(&self) -> &SqliteDb {
        &self.db
    }
}

#[async_trait]
impl ScheduleStore for SqliteScheduleStore {
    async fn insert(&self, entries: Vec<ScheduleEntry>) -> Result<()> {
        // Encoded before the write, off the writer thread; the entries move along, uncopied.
        let rows = entries
            .into_iter()
            .map(|e| Ok((encode(&e)?, e)))
            .collect::<Result<Vec<_>>>()?;
        self.db
            .write(move |txn| {
                let mut chunks = rows.chunks_exact(INSERT_CHUNK);
                if chunks.len() > 0 {
                    let mut many = txn.prepare_cached(&INSERT_MANY).map_err(db_err)?;
                    for chunk in &mut chunks {
                        for (k, (data, e)) in chunk.iter().enumerate() {
                            bind_entry(&mut many, k * ENTRY_PARAMS, data, e).map_err(db_err)?;
                        }
                        match many.raw_execute() {
                            Ok(_) => {}
                            // SQLite undid the statement; row by row names the entry at fault.
                            Err(err) if is_constraint(&err) => {
                                insert_rows(txn, chunk)?;
                                return Err(db_err(err));
                            }
                            Err(err) => return Err(db_err(err)),
                        }
                    }
                }
                insert_rows(txn, chunks.remainder())
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
                let mut stmt = conn
                    .prepare_cached(&format!(
                        "SELECT {ENTRY_COLUMNS} FROM scheduler_entries WHERE id = ?1"
                    ))
                    .map_err(db_err)?;
                let mut rows = stmt.query([&id.as_bytes()[..]]).map_err(db_err)?;
                rows.next()
                    .map_err(db_err)?
                    .map(row_entry)
                    .transpose()
                    .map_err(|e| unreadable(ENTRY, id, e))
            })
            .await
    }

    async fn query(&self, filter: &ScheduledTaskFilter) -> Result<Page<ScheduleEntry>> {
        let filter = filter.clone();
        let reports = self.reports.clone();
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
                let select = format!("SELECT {ENTRY_COLUMNS}{sql}{order}");
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
                    let (items, read) = entries(
                        stmt.query(params_from_iter(paged.iter())).map_err(db_err)?,
                        &reports,
                    )?;
                    let total = u64::try_from(total).unwrap_or_default();
                    let end = filter.page.offset.saturating_add(read);
                    return Ok(Page::new(items, total, (end < total).then_some(end)));
                }
                // Metadata is matched on the decoded entries (JSON equality of values), after
                // the indexed conditions narrowed the rows.
                let mut stmt = conn.prepare(&select).map_err(db_err)?;
                let (mut items, _) = entries(
                    stmt.query(params_from_iter(args.iter())).map_err(db_err)?,
                    &reports,
                )?;
                items.retain(|e| filter.matches(&e.task));
                Ok(paginate(items, &filter))
            })
            .await
    }

    async fn load_active(&self) -> Result<Vec<ScheduleEntry>> {
        let reports = self.reports.clone();
        self.db
            .read(move |conn| {
                // One scan; each row is decoded from the cells in place.
                let mut stmt = conn
                    .prepare(&format!(
                        "SELECT {ENTRY_COLUMNS} FROM scheduler_entries
                         WHERE status IN ('scheduled', 'running', 'paused')"
                    ))
                    .map_err(db_err)?;
                Ok(entries(stmt.query([]).map_err(db_err)?, &reports)?.0)
            })
            .await
    }

    async fn unfinished_runs(&self) -> Result<Vec<ScheduleRun>> {
        let reports = self.reports.clone();
        self.db
            .read(move |conn| {
                let mut stmt = conn
                    .prepare(&format!(
                        "SELECT {RUN_COLUMNS} FROM scheduler_runs WHERE state = 'claimed'"
                    ))
                    .map_err(db_err)?;
                runs_of(stmt.query_map([], row_run).map_err(db_err)?, &reports)
            })
            .await
    }

    async fn runs(&self, entry_id: Uuid) -> Result<Vec<ScheduleRun>> {
        let reports = self.reports.clone();
        self.db
            .read(move |conn| {
                let mut stmt = conn
                    .prepare(&format!(
                        "SELECT {RUN_COLUMNS} FROM scheduler_runs WHERE entry_id = ?1 ORDER BY due_at"
                    ))
                    .map_err(db_err)?;
                runs_of(
                    stmt.query_map([&entry_id.as_bytes()[..]], row_run)
                        .map_err(db_err)?,
                    &reports,
                )
            })
            .await
    }

    fn on_unreadable(&self, listener: UnreadableListener) {
        self.reports.add(listener);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sqlite::SqliteOptions;
    use architectlm_core::extensions::scheduler::{MisfirePolicy, ScheduledTaskFilter};
    use chrono::TimeZone;

    fn at(s: i64, nanos: u32) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + s, nanos)
            .single()
            .unwrap_or_default()
    }

    /// An entry with every optional field set, and one with none.
    fn entries() -> Vec<ScheduleEntry> {
        let mut full = ScheduledTask::new(
            Uuid::now_v7(),
            "report",
            serde_json::json!({"to": "ops"}),
            at(0, 123_456_789),
        );
        full.status = ScheduledTaskStatus::Paused;
        full.executed_at = Some(at(-60, 1));
        full.next_execution_at = Some(at(60, 999_999_999));
        full.pattern = Some("*/5 * * * *".into());
        full.timezone = Some("Europe/Paris".into());
        full.remaining_executions = Some(7);
        full.execution_count = 3;
        full.result = Some(serde_json::json!([1, "two"]));
        full.error = Some("timed out".into());
        full.description = Some("weekly \"report\"".into());
        full.metadata
            .insert("team".into(), serde_json::json!("ops"));
        let mut full =
            ScheduleEntry::new(full, SchedulePolicy::default().misfire(MisfirePolicy::Skip));
        full.start_at = Some(at(-3600, 0));
        full.end_at = Some(at(86_400, 5));
        full.max_executions = Some(10);
        full.jitter = Some(Duration::from_millis(250));
        full.version = 4;
        let bare = ScheduleEntry::new(
            ScheduledTask::new(Uuid::now_v7(), "tick", serde_json::json!(null), at(5, 0)),
            SchedulePolicy::default(),
        );
        vec![full, bare]
    }

    #[test]
    fn the_compact_form_round_trips_every_field() {
        for e in entries() {
            let data = encode(&e).unwrap();
            assert!(data.starts_with(COMPACT_PREFIX), "{data}");
            let back = decode(e.id().as_bytes(), &e.task.task_id, &data, e.version as i64).unwrap();
            assert_eq!(back, e, "{data}");
        }
        let bare = &entries()[1];
        assert!(
            encode(bare).unwrap().len() < 100,
            "{}",
            encode(bare).unwrap()
        );
    }

    #[test]
    fn a_corrupt_row_is_an_error_naming_it() {
        let e = &entries()[1];
        let err = decode(e.id().as_bytes(), "tick", "{\"v\":2,\"s\":\"nonsense\"}", 1).unwrap_err();
        assert!(matches!(err, Error::Serialization(_)), "{err}");
        let err = decode(
            e.id().as_bytes(),
            "tick",
            "{\"v\":2,\"s\":\"scheduled\",\"e\":[9223372036854775807,0],\"i\":null}",
            1,
        )
        .unwrap_err();
        assert!(err.to_string().contains("out of range"), "{err}");
    }

    #[tokio::test]
    async fn a_batch_with_an_existing_id_inserts_nothing_and_names_it() {
        let store = SqliteScheduleStore::open(SqliteDb::open(SqliteOptions::memory()).unwrap())
            .await
            .unwrap();
        let fresh = |k: usize| {
            ScheduleEntry::new(
                ScheduledTask::new(
                    Uuid::now_v7(),
                    "tick",
                    serde_json::json!([k]),
                    at(k as i64, 0),
                ),
                SchedulePolicy::default(),
            )
        };
        // 150 entries: two full multi-row statements and a remainder of 22.
        let first: Vec<_> = (0..150).map(fresh).collect();
        store.insert(first.clone()).await.unwrap();
        assert_eq!(store.load_active().await.unwrap().len(), 150);
        for (dup, len) in [(10, 100), (140, 150), (70, 200)] {
            let mut batch: Vec<_> = (0..len).map(fresh).collect();
            batch[dup] = first[dup % 150].clone();
            let err = store.insert(batch).await.unwrap_err();
            match err {
                Error::Conflict { id, .. } => assert_eq!(id, first[dup % 150].id().to_string()),
                other => panic!("expected a conflict, got {other}"),
            }
            assert_eq!(
                store.load_active().await.unwrap().len(),
                150,
                "nothing of the batch stays"
            );
        }
        // The same id twice in one batch is a conflict too.
        let mut batch: Vec<_> = (0..80).map(fresh).collect();
        batch[50] = batch[3].clone();
        assert!(matches!(
            store.insert(batch).await,
            Err(Error::Conflict { .. })
        ));
        let got = store.load_active().await.unwrap();
        assert_eq!(got.len(), 150);
        let mut got_ids: Vec<_> = got.iter().map(|e| e.id()).collect();
        let mut want: Vec<_> = first.iter().map(|e| e.id()).collect();
        got_ids.sort();
        want.sort();
        assert_eq!(got_ids, want);
    }

    #[tokio::test]
    async fn rows_of_the_first_layout_are_migrated_and_read() {
        let db = SqliteDb::open(SqliteOptions::memory()).unwrap();
        // A database of the first layout, holding whole-entry JSON rows.
        db.migrate(&MIGRATIONS[..1]).await.unwrap();
        let old = entries();
        let rows = old.clone();
        db.write(move |txn| {
            for e in &rows {
                txn.execute(
                    "INSERT INTO scheduler_entries (id, task_id, status, recurring, next_run, version, data)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![
                        &e.id().as_bytes()[..],
                        e.task.task_id,
                        status_str(e.task.status),
                        e.task.is_recurring(),
                        e.task.next_execution_at.map(ms),
                        e.version as i64,
                        serde_json::to_string(e)?,
                    ],
                )
                .map_err(db_err)?;
            }
            Ok(())
        })
        .await
        .unwrap();
        let store = SqliteScheduleStore::open(db).await.unwrap();
        for e in &old {
            assert_eq!(store.get(e.id()).await.unwrap().as_ref(), Some(e));
        }
        let mut active = store.load_active().await.unwrap();
        active.sort_by_key(|e| e.task.task_id.clone());
        assert_eq!(active, old);
        let page = store
            .query(&ScheduledTaskFilter::new().task_id("tick"))
            .await
            .unwrap();
        assert_eq!(page.items, vec![old[1].clone()]);
        // Updated rows are written in the compact form and still read back the same.
        let mut e = old[0].clone();
        e.version = 5;
        e.task.execution_count = 4;
        store.update(&e, 4).await.unwrap();
        assert_eq!(store.get(e.id()).await.unwrap(), Some(e));
        // The same id cannot be inserted twice, in either form.
        let err = store.insert(vec![old[1].clone()]).await.unwrap_err();
        assert!(matches!(err, Error::Conflict { .. }), "{err}");
    }
}
