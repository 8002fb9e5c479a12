//! Scheduled entries and run claims in the embedded SQLite database.

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

const RUN_COLUMNS: &str = "entry_id, due_at, state, claimed_at, finished_at, starts, result, error";

fn replace(txn: &rusqlite::Transaction<'_>, entry: &ScheduleEntry, expected: u64) -> Result<()> {
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
