//! The saga journal on the embedded SQLite database.
//!
//! Two tables. `saga_instances` holds one row per instance, keyed by an integer `seq` (and
//! unique by its id): its small mutable columns (status, error, completion time, `owner`,
//! `lease_until`, `fencing`) and, in `steps`, the step records as a JSON array written once when
//! the instance is created. `saga_steps` holds one row per step record a journal entry changed
//! since, keyed by one integer made of the instance's `seq` and the step's position, in plain
//! columns; a row there replaces the element of the array at the same position.
//!
//! A journal entry is a look at the instance row (fencing token, status, error, completion
//! time), an `UPDATE` of that row only when one of them changes, and one UPSERT per step record
//! it names: no JSON is built or parsed on the writer thread, the callers serialise step results
//! beforehand. Journal writes (creates and updates) queue up and a flusher applies everything
//! queued in one closure on the database's writer thread (two such batches may be in flight, so
//! the writer never waits for callers to wake up), so journal entries of concurrent sagas share
//! one savepoint, one commit and the batch's prepared statements. Times are stored as
//! microseconds since the Unix epoch, ids as 16-byte blobs, JSON as text.
//!
//! A database written by the first version of the schema (every journal entry rewrote the
//! `steps` array) needs no conversion of its step data: its arrays are complete and no
//! `saga_steps` row overrides them. Migration 2 only rebuilds `saga_instances` with `seq` and
//! creates `saga_steps`.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use rusqlite::{CachedStatement, Connection, OptionalExtension, Row, params};
use serde_json::Value;
use tokio::sync::oneshot;
use uuid::Uuid;

use architectlm_core::extensions::Page;
use architectlm_core::extensions::saga::{
    SagaFilter, SagaInstance, SagaStatus, SagaStepExecution, SagaStepStatus,
};
use architectlm_core::store::UnreadableListener;

use super::{CreateOutcome, SagaStore, SagaUpdate, StoredSaga};
use crate::sqlite::{Migration, SqliteDb};
use crate::unreadable::{Reports, unreadable};
use crate::{Error, Result};

/// What an instance is called in reports and errors.
const KIND: &str = "saga instance";

/// The versioned schema of the saga tables, applied by [`SqliteSagaStore::open`].
pub static SAGA_MIGRATIONS: &[Migration] = &[
    Migration {
        component: "saga",
        version: 1,
        description: "saga instances with their step journal",
        sql: "
        CREATE TABLE saga_instances (
            id BLOB NOT NULL UNIQUE,
            saga_id TEXT NOT NULL,
            saga_version INTEGER NOT NULL,
            status TEXT NOT NULL,
            input TEXT NOT NULL,
            idempotency_key TEXT,
            started_at INTEGER NOT NULL,
            completed_at INTEGER,
            error TEXT,
            compensation_requested TEXT,
            owner TEXT,
            lease_until INTEGER,
            fencing INTEGER NOT NULL DEFAULT 1,
            steps TEXT NOT NULL
        );
        CREATE UNIQUE INDEX saga_instances_key
            ON saga_instances (saga_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
        CREATE INDEX saga_instances_started ON saga_instances (started_at);
        CREATE INDEX saga_instances_unfinished ON saga_instances (status)
            WHERE status IN ('created', 'running', 'compensating');
    ",
    },
    Migration {
        component: "saga",
        version: 2,
        description: "instances keyed by an integer; one row per changed step record",
        // `saga_instances` gets an explicit integer key (`seq`, its former rowid, which a
        // VACUUM may not renumber once it is declared); `AUTOINCREMENT` keeps a deleted
        // instance's key from being given to a new one, which would inherit the step rows left
        // behind. The step records a journal entry changes go to `saga_steps`, one row per
        // step keyed by one integer, `seq * 2^20 + position` ([`step_key`]): the rows of an
        // instance are a range of keys, a new row is appended at the end of the table's b-tree
        // and a changed one is rewritten in place, all far cheaper than in a b-tree keyed by
        // blobs or by two columns. `steps` keeps the array as created (or, for rows of version
        // 1, as last journaled), which the rows override. The partial index of version 1
        // tested `status IN (...)`, which SQLite evaluates with a temporary table for the old
        // and the new row of every status update; an `OR` of equalities costs nothing, and the
        // queries name the same expression so that the planner still uses the index.
        sql: "
        CREATE TABLE saga_instances_v2 (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id BLOB NOT NULL UNIQUE,
            saga_id TEXT NOT NULL,
            saga_version INTEGER NOT NULL,
            status TEXT NOT NULL,
            input TEXT NOT NULL,
            idempotency_key TEXT,
            started_at INTEGER NOT NULL,
            completed_at INTEGER,
            error TEXT,
            compensation_requested TEXT,
            owner TEXT,
            lease_until INTEGER,
            fencing INTEGER NOT NULL DEFAULT 1,
            steps TEXT NOT NULL
        );
        INSERT INTO saga_instances_v2 (seq, id, saga_id, saga_version, status, input,
            idempotency_key, started_at, completed_at, error, compensation_requested, owner,
            lease_until, fencing, steps)
        SELECT rowid, id, saga_id, saga_version, status, input, idempotency_key, started_at,
            completed_at, error, compensation_requested, owner, lease_until, fencing, steps
        FROM saga_instances;
        DROP TABLE saga_instances;
        ALTER TABLE saga_instances_v2 RENAME TO saga_instances;
        CREATE UNIQUE INDEX saga_instances_key
            ON saga_instances (saga_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
        CREATE INDEX saga_instances_started ON saga_instances (started_at);
        CREATE INDEX saga_instances_unfinished ON saga_instances (status)
            WHERE status = 'created' OR status = 'running' OR status = 'compensating';
        CREATE TABLE saga_steps (
            key INTEGER PRIMARY KEY,
            id BLOB NOT NULL,
            step_id TEXT NOT NULL,
            status TEXT NOT NULL,
            attempts INTEGER NOT NULL,
            compensation_attempts INTEGER NOT NULL,
            idempotency_key TEXT NOT NULL,
            started_at INTEGER,
            completed_at INTEGER,
            result TEXT,
            error TEXT
        );
    ",
    },
];

/// Bits of a `saga_steps` key that hold the step's position: an instance has at most 2^20
/// (1,048,576) steps.
const STEP_BITS: u32 = 20;

/// Most step records an instance may have in this journal.
const MAX_STEPS: usize = 1 << STEP_BITS;

/// The `saga_steps` key of step `idx` of instance `seq`, or `None` for a position past the
/// steps an instance may have (which [`SagaUpdate::apply_to`] ignores, and so does the store).
fn step_key(seq: i64, idx: u32) -> Result<Option<i64>> {
    if idx as usize >= MAX_STEPS {
        return Ok(None);
    }
    seq.checked_mul(1 << STEP_BITS)
        .map(|k| Some(k + i64::from(idx)))
        .ok_or_else(|| Error::storage(format!("saga instance key {seq} out of range")))
}

/// The `WHERE` expression of the `saga_instances_unfinished` index, which a query must repeat
/// word for word for the planner to use the index.
const UNFINISHED_SQL: &str =
    "(status = 'created' OR status = 'running' OR status = 'compensating')";

/// A [`SagaStore`] on an embedded SQLite database.
///
/// `saga_instances` holds one row per instance with its small mutable columns and the step
/// records as created; `saga_steps` holds the step records journal entries changed since, one
/// row per step in plain columns. A journal entry checks the fencing token on the instance row,
/// rewrites that row only when the instance's status, error or completion time change, and
/// upserts the step records it names, all with prepared statements held for the whole batch.
/// Journal writes of concurrent sagas queue up and share one write closure and one commit;
/// reads use the reader pool. The schema is versioned ([`SAGA_MIGRATIONS`]).
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use architectlm_store::saga::SqliteSagaStore;
/// use architectlm_store::sqlite::{SqliteDb, SqliteOptions};
///
/// let db = SqliteDb::open(SqliteOptions::memory())?;
/// let store = SqliteSagaStore::open(db).await?; // applies the saga migrations
/// # let _ = store;
/// # Ok::<_, architectlm_core::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct SqliteSagaStore {
    db: SqliteDb,
    queue: Arc<Mutex<Queue>>,
    seqs: Seqs,
    reports: Reports,
}

/// The integer keys of the unfinished instances this store journals, used on the writer
/// thread only (batches run one after the other there) to find an instance row without
/// searching the index of ids. A key is only a hint: the row it finds must have the id.
type Seqs = Arc<Mutex<HashMap<Uuid, i64>>>;

impl std::fmt::Debug for SqliteSagaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteSagaStore")
            .field("db", &self.db)
            .finish_non_exhaustive()
    }
}

fn db_err(e: rusqlite::Error) -> Error {
    Error::storage(e)
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn from_micros(v: i64) -> Result<DateTime<Utc>> {
    DateTime::from_timestamp_micros(v)
        .ok_or_else(|| Error::storage(format!("invalid timestamp {v} in the saga journal")))
}

fn opt_time(v: Option<i64>) -> Result<Option<DateTime<Utc>>> {
    v.map(from_micros).transpose()
}

fn uuid_of(bytes: &[u8]) -> Result<Uuid> {
    Uuid::from_slice(bytes).map_err(|e| Error::storage_with("invalid id in the saga journal", e))
}

fn json_of(text: &str) -> Result<Value> {
    Ok(serde_json::from_str(text)?)
}

fn to_json(v: &Value) -> String {
    // Serialising a `Value` cannot fail: its keys are strings.
    serde_json::to_string(v).unwrap_or_else(|_| "null".to_owned())
}

const INSTANCE_COLUMNS: &str = "id, saga_id, saga_version, status, input, idempotency_key, \
     started_at, completed_at, error, compensation_requested, owner, lease_until, fencing, steps, \
     seq";

struct InstanceRow {
    id: Vec<u8>,
    saga_id: String,
    saga_version: u32,
    status: String,
    input: String,
    idempotency_key: Option<String>,
    started_at: i64,
    completed_at: Option<i64>,
    error: Option<String>,
    compensation_requested: Option<String>,
    owner: Option<String>,
    lease_until: Option<i64>,
    fencing: i64,
    steps: String,
    seq: i64,
}

fn instance_row(r: &Row<'_>) -> rusqlite::Result<InstanceRow> {
    Ok(InstanceRow {
        id: r.get(0)?,
        saga_id: r.get(1)?,
        saga_version: r.get(2)?,
        status: r.get(3)?,
        input: r.get(4)?,
        idempotency_key: r.get(5)?,
        started_at: r.get(6)?,
        completed_at: r.get(7)?,
        error: r.get(8)?,
        compensation_requested: r.get(9)?,
        owner: r.get(10)?,
        lease_until: r.get(11)?,
        fencing: r.get(12)?,
        steps: r.get(13)?,
        seq: r.get(14)?,
    })
}

/// Replaces the step records `saga_steps` holds for instance `seq`. Rows whose position is past
/// the end of the array are ignored, as [`SagaUpdate::apply_to`] ignores such updates.
fn overlay_steps(conn: &Connection, seq: i64, steps: &mut [SagaStepExecution]) -> Result<()> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT key - ?1, id, step_id, status, attempts, compensation_attempts, \
             idempotency_key, started_at, completed_at, result, error FROM saga_steps \
             WHERE key >= ?1 AND key < ?2",
        )
        .map_err(db_err)?;
    let first = step_key(seq, 0)?.unwrap_or(i64::MAX);
    let end = first.saturating_add(1 << STEP_BITS);
    let mut rows = stmt.query([first, end]).map_err(db_err)?;
    while let Some(r) = rows.next().map_err(db_err)? {
        let idx: i64 = r.get(0).map_err(db_err)?;
        let Some(slot) = usize::try_from(idx).ok().and_then(|i| steps.get_mut(i)) else {
            continue;
        };
        let status: String = r.get(3).map_err(db_err)?;
        let result: Option<String> = r.get(9).map_err(db_err)?;
        let step_uuid: Vec<u8> = r.get(1).map_err(db_err)?;
        let step_id: String = r.get(2).map_err(db_err)?;
        let key: String = r.get(6).map_err(db_err)?;
        let mut step = SagaStepExecution::new(uuid_of(&step_uuid)?, step_id, key);
        step.status = SagaStepStatus::parse(&status).ok_or_else(|| {
            Error::storage(format!(
                "invalid step status \"{status}\" at position {idx} in the saga journal"
            ))
        })?;
        step.attempts = r.get(4).map_err(db_err)?;
        step.compensation_attempts = r.get(5).map_err(db_err)?;
        step.started_at = opt_time(r.get(7).map_err(db_err)?)?;
        step.completed_at = opt_time(r.get(8).map_err(db_err)?)?;
        step.result = result.as_deref().map(json_of).transpose()?;
        step.error = r.get(10).map_err(db_err)?;
        *slot = step;
    }
    Ok(())
}

fn build(conn: &Connection, row: InstanceRow) -> Result<StoredSaga> {
    let mut steps: Vec<SagaStepExecution> = serde_json::from_str(&row.steps)?;
    overlay_steps(conn, row.seq, &mut steps)?;
    let status = SagaStatus::parse(&row.status).ok_or_else(|| {
        Error::storage(format!(
            "invalid saga status \"{}\" in the journal",
            row.status
        ))
    })?;
    let mut instance = SagaInstance::new(
        uuid_of(&row.id)?,
        row.saga_id,
        row.saga_version,
        json_of(&row.input)?,
        row.idempotency_key,
        from_micros(row.started_at)?,
        steps,
    );
    instance.status = status;
    instance.completed_at = opt_time(row.completed_at)?;
    instance.error = row.error;
    instance.rebuild_context();
    let mut stored = StoredSaga::new(instance, row.owner);
    stored.lease_until = opt_time(row.lease_until)?;
    stored.fencing = u64::try_from(row.fencing).unwrap_or(0);
    stored.compensation_requested = row.compensation_requested;
    Ok(stored)
}

fn load(conn: &Connection, id: Uuid) -> Result<Option<StoredSaga>> {
    let row = conn
        .prepare_cached(&format!(
            "SELECT {INSTANCE_COLUMNS} FROM saga_instances WHERE id = ?1"
        ))
        .map_err(db_err)?
        .query_row([id.as_bytes().as_slice()], instance_row)
        .optional()
        .map_err(db_err)?;
    row.map(|r| build(conn, r).map_err(|e| unreadable(KIND, id, e)))
        .transpose()
}

/// Builds the instances of `rows`, skipping (and reporting) those that cannot be decoded.
fn build_all(conn: &Connection, rows: Vec<InstanceRow>, reports: &Reports) -> Vec<StoredSaga> {
    reports.keep(KIND, rows, |r| {
        let id =
            Uuid::from_slice(&r.id).map_or_else(|_| format!("{:02x?}", r.id), |u| u.to_string());
        (id, build(conn, r))
    })
}

/// Appends `s` as a JSON string, escaped as `serde_json` escapes it.
fn push_json_str(out: &mut String, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        // Serialising a string cannot fail.
        out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned()));
    }
}

/// The step records as the JSON array `serde_json` would write, built directly for records
/// that have not run yet (what a create stores), which costs a fraction of the derived
/// serialiser; other records go through `serde_json`.
fn steps_json(steps: &[SagaStepExecution]) -> Result<String> {
    let mut out = String::with_capacity(steps.len() * 256 + 2);
    out.push('[');
    for (k, s) in steps.iter().enumerate() {
        if k > 0 {
            out.push(',');
        }
        if s.started_at.is_some()
            || s.completed_at.is_some()
            || s.result.is_some()
            || s.error.is_some()
        {
            out.push_str(&serde_json::to_string(s).map_err(|e| {
                Error::storage_with(format!("cannot serialise step \"{}\"", s.step_id), e)
            })?);
            continue;
        }
        let mut id = [0u8; uuid::fmt::Hyphenated::LENGTH];
        out.push_str("{\"id\":\"");
        out.push_str(s.id.hyphenated().encode_lower(&mut id));
        out.push_str("\",\"step_id\":");
        push_json_str(&mut out, &s.step_id);
        out.push_str(",\"status\":\"");
        out.push_str(s.status.as_str());
        out.push_str("\",\"attempts\":");
        out.push_str(&s.attempts.to_string());
        out.push_str(",\"compensation_attempts\":");
        out.push_str(&s.compensation_attempts.to_string());
        out.push_str(",\"idempotency_key\":");
        push_json_str(&mut out, &s.idempotency_key);
        out.push_str(",\"started_at\":null,\"completed_at\":null,\"result\":null,\"error\":null}");
    }
    out.push(']');
    Ok(out)
}

/// A journal write waiting for the next batch. The JSON it stores is serialised by the caller,
/// so that the writer thread, which every journal write goes through, only runs SQL.
enum Op {
    /// The instance, its owner, and its input and step records as JSON.
    Create(SagaInstance, String, String, String),
    /// The update, and the result of each step record it names as JSON.
    Apply(SagaUpdate, Vec<Option<String>>),
}

enum OpOut {
    Created(Box<CreateOutcome>),
    Applied,
}

type Reply = oneshot::Sender<Result<OpOut>>;

#[derive(Default)]
struct Queue {
    ops: Vec<(Op, Reply)>,
    /// Flushers running (at most [`FLUSHERS`]).
    flushers: usize,
}

/// Most journal writes one batch takes.
const MAX_BATCH: usize = 2048;

/// Batches in flight at once: while one commits, the next is queued at the writer thread, so
/// the writer goes from one batch to the next without waiting for the callers of the first to
/// wake up and write again. Each batch is its own write closure (savepoint); the writer thread
/// runs them in the order they were queued, and one instance's writes are never in two
/// batches at once (its driver waits for each write before the next).
const FLUSHERS: usize = 2;

const INSERT_INSTANCE: &str = "INSERT INTO saga_instances (id, saga_id, saga_version, status, \
     input, idempotency_key, started_at, completed_at, error, owner, fencing, steps) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 1, ?11)";

const CHECK_INSTANCE: &str =
    "SELECT fencing, status, error, completed_at, seq FROM saga_instances WHERE id = ?1";

/// [`CHECK_INSTANCE`] by the integer key, for instances whose key the writer remembers; the
/// id is read back and compared, so a key remembered wrongly only costs the lookup by id.
const CHECK_INSTANCE_SEQ: &str =
    "SELECT fencing, status, error, completed_at, seq, id FROM saga_instances WHERE seq = ?1";

const UPDATE_INSTANCE: &str = "UPDATE saga_instances SET status = ?2, error = ?3, \
     completed_at = ?4 WHERE seq = ?1 AND fencing = ?5";

const UPSERT_STEP: &str = "INSERT INTO saga_steps (key, id, step_id, status, attempts, \
     compensation_attempts, idempotency_key, started_at, completed_at, result, error) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) \
     ON CONFLICT (key) DO UPDATE SET id = excluded.id, step_id = excluded.step_id, \
     status = excluded.status, attempts = excluded.attempts, \
     compensation_attempts = excluded.compensation_attempts, \
     idempotency_key = excluded.idempotency_key, started_at = excluded.started_at, \
     completed_at = excluded.completed_at, result = excluded.result, error = excluded.error";

/// The statements of a batch, taken from the connection's cache once per batch rather than
/// once per journal entry.
struct Statements<'c> {
    conn: &'c Connection,
    insert: Option<CachedStatement<'c>>,
    check: Option<CachedStatement<'c>>,
    check_seq: Option<CachedStatement<'c>>,
    update: Option<CachedStatement<'c>>,
    upsert: Option<CachedStatement<'c>>,
}

impl<'c> Statements<'c> {
    fn new(conn: &'c Connection) -> Self {
        Self {
            conn,
            insert: None,
            check: None,
            check_seq: None,
            update: None,
            upsert: None,
        }
    }
}

/// The statement in `slot`, prepared (through the connection's cache) on first use.
fn stmt<'s, 'c>(
    conn: &'c Connection,
    slot: &'s mut Option<CachedStatement<'c>>,
    sql: impl FnOnce() -> String,
) -> Result<&'s mut CachedStatement<'c>> {
    if slot.is_none() {
        *slot = Some(conn.prepare_cached(&sql()).map_err(db_err)?);
    }
    slot.as_mut()
        .ok_or_else(|| Error::storage("saga journal statement missing"))
}

fn create_in(
    st: &mut Statements<'_>,
    seqs: &mut HashMap<Uuid, i64>,
    instance: SagaInstance,
    owner: String,
    input: &str,
    steps: &str,
) -> Result<CreateOutcome> {
    let txn = st.conn;
    if let Some(key) = &instance.idempotency_key {
        let existing: Option<Vec<u8>> = txn
            .prepare_cached(
                "SELECT id FROM saga_instances WHERE saga_id = ?1 AND idempotency_key = ?2",
            )
            .map_err(db_err)?
            .query_row(params![instance.saga_id, key], |r| r.get(0))
            .optional()
            .map_err(db_err)?;
        if let Some(id) = existing {
            let found = load(txn, uuid_of(&id)?)?.ok_or_else(|| {
                Error::storage("saga instance vanished during its idempotency check")
            })?;
            return Ok(CreateOutcome::Existing(found));
        }
    }
    stmt(txn, &mut st.insert, || INSERT_INSTANCE.to_owned())?
        .execute(params![
            instance.id.as_bytes().as_slice(),
            instance.saga_id,
            instance.saga_version,
            instance.status.as_str(),
            input,
            instance.idempotency_key,
            micros(instance.started_at),
            instance.completed_at.map(micros),
            instance.error,
            owner,
            steps,
        ])
        .map_err(db_err)?;
    if !instance.status.is_terminal() {
        seqs.insert(instance.id, txn.last_insert_rowid());
    }
    Ok(CreateOutcome::Created(StoredSaga::new(
        instance,
        Some(owner),
    )))
}

/// Applies an update, or refuses it (`Conflict`, `NotFound`) before changing anything.
fn apply_in(
    st: &mut Statements<'_>,
    seqs: &mut HashMap<Uuid, i64>,
    update: &SagaUpdate,
    results: &[Option<String>],
) -> Result<()> {
    let txn = st.conn;
    let id = update.instance_id.as_bytes().as_slice();
    let fencing = i64::try_from(update.fencing).unwrap_or(i64::MAX);
    // One look at the row checks the fencing token and tells whether the instance's own
    // columns change: most entries only move steps on, and rewriting the instance row (and its
    // status index) for them would cost more than the rest of the entry.
    let status = update.status.as_str();
    let completed_at = update.completed_at.map(micros);
    let check = |r: &Row<'_>| {
        let same = r.get_ref(1)?.as_str()? == status
            && r.get_ref(2)?.as_str_or_null()? == update.error.as_deref()
            && r.get::<_, Option<i64>>(3)? == completed_at;
        Ok((r.get::<_, i64>(0)?, same, r.get::<_, i64>(4)?))
    };
    let mut current = None;
    if let Some(&seq) = seqs.get(&update.instance_id) {
        current = stmt(txn, &mut st.check_seq, || CHECK_INSTANCE_SEQ.to_owned())?
            .query_row([seq], |r| {
                let found = check(r)?;
                Ok((r.get_ref(5)?.as_blob()? == id).then_some(found))
            })
            .optional()
            .map_err(db_err)?
            .flatten();
    }
    if current.is_none() {
        current = stmt(txn, &mut st.check, || CHECK_INSTANCE.to_owned())?
            .query_row([id], check)
            .optional()
            .map_err(db_err)?;
    }
    // Remembered until the instance ends; a refused entry forgets it.
    match current {
        Some((actual, _, seq)) if actual == fencing && !update.status.is_terminal() => {
            seqs.insert(update.instance_id, seq);
        }
        _ => {
            seqs.remove(&update.instance_id);
        }
    }
    let seq = match current {
        None => return Err(Error::not_found("saga instance", update.instance_id)),
        Some((actual, _, _)) if actual != fencing => {
            return Err(Error::Conflict {
                kind: "saga instance",
                id: update.instance_id.to_string(),
                expected: update.fencing,
                actual: u64::try_from(actual).unwrap_or(0),
            });
        }
        Some((_, true, seq)) => seq,
        Some((_, false, seq)) => {
            // The writer thread holds the write lock, so the row is as just read; the fencing
            // condition stays as a second guard.
            let n = stmt(txn, &mut st.update, || UPDATE_INSTANCE.to_owned())?
                .execute(params![seq, status, update.error, completed_at, fencing])
                .map_err(db_err)?;
            if n != 1 {
                return Err(Error::storage(format!(
                    "saga instance {} changed during its journal entry",
                    update.instance_id
                )));
            }
            seq
        }
    };
    if update.steps.is_empty() {
        return Ok(());
    }
    let upsert = stmt(txn, &mut st.upsert, || UPSERT_STEP.to_owned())?;
    for ((idx, s), result) in update.steps.iter().zip(results) {
        let Some(key) = step_key(seq, *idx)? else {
            continue;
        };
        upsert
            .execute(params![
                key,
                s.id.as_bytes().as_slice(),
                s.step_id,
                s.status.as_str(),
                s.attempts,
                s.compensation_attempts,
                s.idempotency_key,
                s.started_at.map(micros),
                s.completed_at.map(micros),
                result,
                s.error,
            ])
            .map_err(db_err)?;
    }
    Ok(())
}

/// Runs one batch in one write closure. A refusal (`Conflict`, `NotFound`) answers its own
/// caller; any other error aborts the whole closure, so no write is half applied.
/// What a batch leaves over (updates, JSON texts): handed back so that the flusher frees it,
/// not the writer thread.
#[derive(Default)]
struct Spent {
    updates: Vec<SagaUpdate>,
    texts: Vec<String>,
}

fn run_batch(
    txn: &Connection,
    seqs: &mut HashMap<Uuid, i64>,
    ops: Vec<Op>,
) -> Result<(Vec<Result<OpOut>>, Spent)> {
    let mut out = Vec::with_capacity(ops.len());
    let mut spent = Spent::default();
    let mut st = Statements::new(txn);
    for op in ops {
        let r = match op {
            Op::Create(instance, owner, input, steps) => {
                let r = create_in(&mut st, seqs, instance, owner, &input, &steps)
                    .map(|c| OpOut::Created(Box::new(c)));
                spent.texts.extend([input, steps]);
                r
            }
            Op::Apply(update, results) => {
                let r = apply_in(&mut st, seqs, &update, &results).map(|()| OpOut::Applied);
                spent.updates.push(update);
                spent.texts.extend(results.into_iter().flatten());
                r
            }
        };
        match r {
            Err(e @ (Error::Conflict { .. } | Error::NotFound { .. })) => out.push(Err(e)),
            Err(e) => return Err(e),
            Ok(v) => out.push(Ok(v)),
        }
    }
    Ok((out, spent))
}

async fn flush(db: SqliteDb, queue: Arc<Mutex<Queue>>, seqs: Seqs) {
    loop {
        let batch = {
            let mut q = queue.lock();
            if q.ops.is_empty() {
                q.flushers -= 1;
                return;
            }
            let take = q.ops.len().min(MAX_BATCH);
            q.ops.drain(..take).collect::<Vec<_>>()
        };
        let (ops, replies): (Vec<Op>, Vec<Reply>) = batch.into_iter().unzip();
        let seqs = seqs.clone();
        match db
            .write(move |txn| run_batch(txn, &mut seqs.lock(), ops))
            .await
        {
            Ok((results, spent)) => {
                for (reply, r) in replies.into_iter().zip(results) {
                    let _ = reply.send(r);
                }
                drop(spent);
            }
            Err(e) => {
                let msg = e.to_string();
                for reply in replies {
                    let _ = reply.send(Err(Error::storage(format!(
                        "saga journal write failed: {msg}"
                    ))));
                }
            }
        }
    }
}

impl SqliteSagaStore {
    /// Uses `db`, applying the saga migrations first.
    pub async fn open(db: SqliteDb) -> Result<Self> {
        db.migrate(SAGA_MIGRATIONS).await?;
        Ok(Self {
            db,
            queue: Arc::new(Mutex::new(Queue::default())),
            seqs: Arc::default(),
            reports: Reports::default(),
        })
    }

    /// Queues a journal write; a writer that finds fewer than [`FLUSHERS`] flushers running
    /// starts one. A flusher takes everything queued into one write closure (one savepoint),
    /// waits for its commit, answers, and goes on while writes keep arriving.
    async fn submit(&self, op: Op) -> Result<OpOut> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut q = self.queue.lock();
            q.ops.push((op, tx));
            let start = q.flushers < FLUSHERS;
            if start {
                q.flushers += 1;
            }
            start
        };
        if start {
            tokio::spawn(flush(
                self.db.clone(),
                self.queue.clone(),
                self.seqs.clone(),
            ));
        }
        rx.await
            .unwrap_or_else(|_| Err(Error::storage("the saga journal flusher stopped")))
    }

    /// The database (for its writer statistics).
    pub fn db(&self) -> &SqliteDb {
        &self.db
    }
}

#[async_trait]
impl SagaStore for SqliteSagaStore {
    async fn create(&self, instance: &SagaInstance, owner: &str) -> Result<CreateOutcome> {
        if instance.steps.len() > MAX_STEPS {
            return Err(Error::storage(format!(
                "saga instance {} has {} steps; the SQLite journal holds at most {MAX_STEPS}",
                instance.id,
                instance.steps.len()
            )));
        }
        let steps = steps_json(&instance.steps)?;
        let op = Op::Create(
            instance.clone(),
            owner.to_owned(),
            to_json(&instance.input),
            steps,
        );
        match self.submit(op).await? {
            OpOut::Created(c) => Ok(*c),
            OpOut::Applied => Err(Error::storage(
                "the saga journal answered a create with an update",
            )),
        }
    }

    async fn apply(&self, update: SagaUpdate) -> Result<()> {
        let results = update
            .steps
            .iter()
            .map(|(_, s)| s.result.as_ref().map(to_json))
            .collect();
        self.submit(Op::Apply(update, results)).await.map(|_| ())
    }

    async fn request_compensation(
        &self,
        instance_id: Uuid,
        reason: &str,
    ) -> Result<Option<StoredSaga>> {
        let reason = reason.to_owned();
        self.db
            .write(move |txn| {
                txn.execute(
                    "UPDATE saga_instances SET compensation_requested = ?2 WHERE id = ?1 \
                     AND status IN ('created', 'running') AND compensation_requested IS NULL",
                    params![instance_id.as_bytes().as_slice(), reason],
                )
                .map_err(db_err)?;
                load(txn, instance_id)
            })
            .await
    }

    async fn claim(
        &self,
        instance_id: Uuid,
        owner: &str,
        lease_until: Option<DateTime<Utc>>,
    ) -> Result<Option<StoredSaga>> {
        let owner = owner.to_owned();
        self.db
            .write(move |txn| {
                txn.execute(
                    "UPDATE saga_instances SET owner = ?2, lease_until = ?3, fencing = fencing + 1 \
                     WHERE id = ?1",
                    params![
                        instance_id.as_bytes().as_slice(),
                        owner,
                        lease_until.map(micros)
                    ],
                )
                .map_err(db_err)?;
                load(txn, instance_id)
            })
            .await
    }

    async fn claim_unfinished(
        &self,
        owner: &str,
        lease_until: Option<DateTime<Utc>>,
    ) -> Result<Vec<StoredSaga>> {
        let owner = owner.to_owned();
        let reports = self.reports.clone();
        self.db
            .write(move |txn| {
                txn.execute(
                    &format!(
                        "UPDATE saga_instances SET owner = ?1, lease_until = ?2, \
                         fencing = fencing + 1 WHERE {UNFINISHED_SQL}"
                    ),
                    params![owner, lease_until.map(micros)],
                )
                .map_err(db_err)?;
                let mut stmt = txn
                    .prepare(&format!(
                        "SELECT {INSTANCE_COLUMNS} FROM saga_instances \
                         WHERE {UNFINISHED_SQL} ORDER BY started_at, id"
                    ))
                    .map_err(db_err)?;
                let rows = stmt
                    .query_map([], instance_row)
                    .map_err(db_err)?
                    .collect::<rusqlite::Result<Vec<_>>>()
                    .map_err(db_err)?;
                Ok(build_all(txn, rows, &reports))
            })
            .await
    }

    async fn get(&self, instance_id: Uuid) -> Result<Option<StoredSaga>> {
        self.db.read(move |conn| load(conn, instance_id)).await
    }

    async fn list(&self, filter: &SagaFilter) -> Result<Page<SagaInstance>> {
        let filter = filter.clone();
        let reports = self.reports.clone();
        self.db
            .read(move |conn| {
                let mut clauses: Vec<String> = Vec::new();
                let mut args: Vec<rusqlite::types::Value> = Vec::new();
                if let Some(s) = &filter.saga_id {
                    args.push(s.clone().into());
                    clauses.push(format!("saga_id = ?{}", args.len()));
                }
                if !filter.status.is_empty() {
                    let mut marks = Vec::new();
                    for s in &filter.status {
                        args.push(s.as_str().to_owned().into());
                        marks.push(format!("?{}", args.len()));
                    }
                    clauses.push(format!("status IN ({})", marks.join(", ")));
                }
                if let Some(t) = filter.started_after {
                    args.push(micros(t).into());
                    clauses.push(format!("started_at >= ?{}", args.len()));
                }
                if let Some(t) = filter.started_before {
                    args.push(micros(t).into());
                    clauses.push(format!("started_at <= ?{}", args.len()));
                }
                let where_ = if clauses.is_empty() {
                    String::new()
                } else {
                    format!("WHERE {}", clauses.join(" AND "))
                };
                let total: i64 = conn
                    .query_row(
                        &format!("SELECT COUNT(*) FROM saga_instances {where_}"),
                        rusqlite::params_from_iter(args.iter()),
                        |r| r.get(0),
                    )
                    .map_err(db_err)?;
                let total = u64::try_from(total).unwrap_or(0);
                let limit = i64::try_from(filter.page.limit).unwrap_or(i64::MAX);
                let offset = i64::try_from(filter.page.offset).unwrap_or(i64::MAX);
                let mut stmt = conn
                    .prepare(&format!(
                        "SELECT {INSTANCE_COLUMNS} FROM saga_instances {where_} \
                         ORDER BY started_at, id LIMIT {limit} OFFSET {offset}"
                    ))
                    .map_err(db_err)?;
                let rows = stmt
                    .query_map(rusqlite::params_from_iter(args.iter()), instance_row)
                    .map_err(db_err)?
                    .collect::<rusqlite::Result<Vec<_>>>()
                    .map_err(db_err)?;
                let read = rows.len() as u64;
                let items = build_all(conn, rows, &reports)
                    .into_iter()
                    .map(|s| s.instance)
                    .collect();
                let end = filter.page.offset.saturating_add(read);
                let next = (end < total).then_some(end);
                Ok(Page::new(items, total, next))
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

    fn instance(key: Option<&str>) -> SagaInstance {
        let id = Uuid::now_v7();
        let steps = (0..3)
            .map(|i| SagaStepExecution::new(Uuid::now_v7(), format!("s{i}"), format!("{id}:s{i}")))
            .collect();
        SagaInstance::new(
            id,
            "order",
            2,
            serde_json::json!({"n": 1}),
            key.map(str::to_owned),
            DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap(),
            steps,
        )
    }

    #[tokio::test]
    async fn journal_round_trips_and_fences_stale_writers() {
        let store = SqliteSagaStore::open(SqliteDb::open(SqliteOptions::memory()).unwrap())
            .await
            .unwrap();
        let inst = instance(Some("k1"));
        let CreateOutcome::Created(created) = store.create(&inst, "a").await.unwrap() else {
            panic!("expected a new instance");
        };
        let again = store.create(&instance(Some("k1")), "a").await.unwrap();
        assert_eq!(again, CreateOutcome::Existing(created.clone()));

        let mut step = inst.steps[0].clone();
        step.status = SagaStepStatus::Completed;
        step.result = Some(serde_json::json!({"reserved": true}));
        step.attempts = 2;
        let mut up = SagaUpdate::new(inst.id, created.fencing, SagaStatus::Running);
        up.steps.push((0, step));
        store.apply(up.clone()).await.unwrap();
        let got = store.get(inst.id).await.unwrap().unwrap();
        assert_eq!(got.instance.status, SagaStatus::Running);
        assert_eq!(got.instance.steps[0].attempts, 2);
        assert_eq!(
            got.instance.context,
            serde_json::json!({"s0": {"reserved": true}})
        );
        assert_eq!(got.instance.saga_version, 2);

        let claimed = store.claim_unfinished("b", None).await.unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].fencing, created.fencing + 1);
        assert_eq!(claimed[0].owner.as_deref(), Some("b"));
        let err = store.apply(up).await.unwrap_err();
        assert!(matches!(err, Error::Conflict { .. }), "{err}");

        // The new owner journals on top of the records the old one wrote.
        let mut step = inst.steps[1].clone();
        step.status = SagaStepStatus::Failed;
        step.error = Some("card declined".into());
        let mut up = SagaUpdate::new(inst.id, claimed[0].fencing, SagaStatus::Compensating);
        up.steps.push((1, step));
        store.apply(up).await.unwrap();
        let got = store.get(inst.id).await.unwrap().unwrap();
        assert_eq!(got.instance.status, SagaStatus::Compensating);
        assert_eq!(
            got.instance.steps[0].result,
            Some(serde_json::json!({"reserved": true}))
        );
        assert_eq!(
            got.instance.steps[1].error.as_deref(),
            Some("card declined")
        );
        assert_eq!(got.instance.steps[2].status, SagaStepStatus::Pending);

        let mut up = SagaUpdate::new(Uuid::now_v7(), 1, SagaStatus::Running);
        up.steps.push((0, inst.steps[0].clone()));
        let err = store.apply(up).await.unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err}");
    }

    #[tokio::test]
    async fn rows_of_the_first_schema_load_and_take_new_entries() {
        let db = SqliteDb::open(SqliteOptions::memory()).unwrap();
        db.migrate(&SAGA_MIGRATIONS[..1]).await.unwrap();
        // An instance as version 1 journaled it: the whole step array in the row.
        let mut inst = instance(Some("old"));
        inst.status = SagaStatus::Running;
        inst.steps[0].status = SagaStepStatus::Completed;
        inst.steps[0].attempts = 1;
        inst.steps[0].started_at = Some(inst.started_at);
        inst.steps[0].completed_at = Some(inst.started_at);
        inst.steps[0].result = Some(serde_json::json!({"reserved": 3}));
        inst.steps[1].status = SagaStepStatus::Running;
        inst.steps[1].started_at = Some(inst.started_at);
        inst.rebuild_context();
        let row = inst.clone();
        db.write(move |txn| {
            txn.execute(
                "INSERT INTO saga_instances (id, saga_id, saga_version, status, input, \
                 idempotency_key, started_at, owner, fencing, steps) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'a', 4, ?8)",
                params![
                    row.id.as_bytes().as_slice(),
                    row.saga_id,
                    row.saga_version,
                    row.status.as_str(),
                    to_json(&row.input),
                    row.idempotency_key,
                    micros(row.started_at),
                    serde_json::to_string(&row.steps).unwrap(),
                ],
            )
            .map_err(db_err)
        })
        .await
        .unwrap();

        let store = SqliteSagaStore::open(db).await.unwrap();
        let got = store.get(inst.id).await.unwrap().unwrap();
        assert_eq!(got.instance, inst);
        assert_eq!(got.fencing, 4);
        let claimed = store.claim_unfinished("b", None).await.unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].instance, inst);
        assert_eq!(claimed[0].fencing, 5);

        let mut step = inst.steps[1].clone();
        step.status = SagaStepStatus::Completed;
        step.attempts = 1;
        step.completed_at = Some(inst.started_at);
        step.result = Some(serde_json::Value::Null);
        let mut up = SagaUpdate::new(inst.id, 5, SagaStatus::Running);
        up.steps.push((1, step));
        up.apply_to(&mut inst);
        store.apply(up).await.unwrap();
        let got = store.get(inst.id).await.unwrap().unwrap();
        inst.rebuild_context();
        assert_eq!(got.instance, inst);
        assert_eq!(got.instance.steps[1].result, Some(serde_json::Value::Null));
    }

    #[tokio::test]
    async fn recovery_queries_use_the_unfinished_index() {
        let store = SqliteSagaStore::open(SqliteDb::open(SqliteOptions::memory()).unwrap())
            .await
            .unwrap();
        let plans = store
            .db()
            .read(|conn| {
                let mut plans = Vec::new();
                for sql in [
                    format!(
                        "SELECT {INSTANCE_COLUMNS} FROM saga_instances WHERE {UNFINISHED_SQL} \
                         ORDER BY started_at, id"
                    ),
                    format!(
                        "UPDATE saga_instances SET fencing = fencing + 1 WHERE {UNFINISHED_SQL}"
                    ),
                ] {
                    let mut stmt = conn
                        .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                        .map_err(db_err)?;
                    let rows = stmt
                        .query_map([], |r| r.get::<_, String>(3))
                        .map_err(db_err)?
                        .collect::<rusqlite::Result<Vec<_>>>()
                        .map_err(db_err)?;
                    plans.push(rows.join("; "));
                }
                Ok(plans)
            })
            .await
            .unwrap();
        for plan in plans {
            assert!(plan.contains("saga_instances_unfinished"), "{plan}");
        }
    }

    #[tokio::test]
    async fn a_bad_step_status_is_reported_with_its_value() {
        let store = SqliteSagaStore::open(SqliteDb::open(SqliteOptions::memory()).unwrap())
            .await
            .unwrap();
        let inst = instance(None);
        store.create(&inst, "a").await.unwrap();
        let mut up = SagaUpdate::new(inst.id, 1, SagaStatus::Running);
        up.steps.push((2, inst.steps[2].clone()));
        // A position past the end of the array is ignored, as `apply_to` ignores it.
        up.steps.push((7, inst.steps[2].clone()));
        store.apply(up).await.unwrap();
        assert_eq!(
            store
                .get(inst.id)
                .await
                .unwrap()
                .unwrap()
                .instance
                .steps
                .len(),
            3
        );
        let id = inst.id;
        store
            .db()
            .write(move |txn| {
                txn.execute(
                    "UPDATE saga_steps SET status = 'exploded' WHERE key = \
                     (SELECT seq * 1048576 + 2 FROM saga_instances WHERE id = ?1)",
                    [id.as_bytes().as_slice()],
                )
                .map_err(db_err)
            })
            .await
            .unwrap();
        let err = store.get(inst.id).await.unwrap_err().to_string();
        assert!(err.contains("\"exploded\""), "{err}");
    }

    #[test]
    fn step_arrays_are_written_as_serde_json_writes_them() {
        let mut steps: Vec<SagaStepExecution> = [
            "plain",
            "quote \" and back\\slash",
            "tab\tnewline\ncontrol\u{1}",
            "unicode é ☃ \u{7f}",
            "",
        ]
        .iter()
        .enumerate()
        .map(|(i, name)| SagaStepExecution::new(Uuid::now_v7(), *name, format!("key:{name}:{i}")))
        .collect();
        steps[1].attempts = 3;
        steps[1].compensation_attempts = u32::MAX;
        steps[2].status = SagaStepStatus::CompensationFailed;
        let mut ran = steps[0].clone();
        ran.status = SagaStepStatus::Completed;
        ran.started_at = Some(Utc::now());
        ran.result = Some(serde_json::json!({"a": [1, "\""]}));
        steps.push(ran);
        let mut failed = steps[1].clone();
        failed.error = Some("boom".into());
        steps.push(failed);
        for n in 0..=steps.len() {
            let text = steps_json(&steps[..n]).unwrap();
            assert_eq!(text, serde_json::to_string(&steps[..n]).unwrap());
        }
    }

    #[tokio::test]
    async fn a_new_instance_never_inherits_step_rows_of_a_deleted_one() {
        let store = SqliteSagaStore::open(SqliteDb::open(SqliteOptions::memory()).unwrap())
            .await
            .unwrap();
        let old = instance(None);
        store.create(&old, "a").await.unwrap();
        let mut step = old.steps[0].clone();
        step.status = SagaStepStatus::Completed;
        let mut up = SagaUpdate::new(old.id, 1, SagaStatus::Running);
        up.steps.push((0, step));
        store.apply(up).await.unwrap();
        // An operator removes the newest instance by hand, leaving its step rows behind.
        let id = old.id;
        store
            .db()
            .write(move |txn| {
                txn.execute(
                    "DELETE FROM saga_instances WHERE id = ?1",
                    [id.as_bytes().as_slice()],
                )
                .map_err(db_err)
            })
            .await
            .unwrap();
        let new = instance(None);
        store.create(&new, "a").await.unwrap();
        let got = store.get(new.id).await.unwrap().unwrap();
        assert_eq!(got.instance, new);
    }

    #[tokio::test]
    async fn a_remembered_key_now_holding_another_instance_is_not_trusted() {
        let store = SqliteSagaStore::open(SqliteDb::open(SqliteOptions::memory()).unwrap())
            .await
            .unwrap();
        let a = instance(None);
        store.create(&a, "x").await.unwrap();
        // The row under a's key becomes another instance's, behind the store's back.
        let b = Uuid::now_v7();
        let ida = a.id;
        store
            .db()
            .write(move |txn| {
                txn.execute(
                    "UPDATE saga_instances SET id = ?2 WHERE id = ?1",
                    params![ida.as_bytes().as_slice(), b.as_bytes().as_slice()],
                )
                .map_err(db_err)
            })
            .await
            .unwrap();
        let err = store
            .apply(SagaUpdate::new(a.id, 1, SagaStatus::Running))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err}");
        let other = store.get(b).await.unwrap().unwrap();
        assert_eq!(other.instance.status, SagaStatus::Created);
    }

    #[tokio::test]
    async fn an_instance_with_too_many_steps_is_refused_with_its_count() {
        let store = SqliteSagaStore::open(SqliteDb::open(SqliteOptions::memory()).unwrap())
            .await
            .unwrap();
        let mut inst = instance(None);
        let step = inst.steps[0].clone();
        inst.steps.resize(MAX_STEPS + 1, step);
        let err = store.create(&inst, "a").await.unwrap_err().to_string();
        assert!(err.contains(&format!("{} steps", MAX_STEPS + 1)), "{err}");
        assert!(store.get(inst.id).await.unwrap().is_none());
        assert_eq!(step_key(3, 5).unwrap(), Some(3 * 1_048_576 + 5));
        assert_eq!(step_key(3, u32::MAX).unwrap(), None);
        assert!(step_key(i64::MAX / 2, 0).is_err());
    }

    #[tokio::test]
    async fn list_filters_and_pages() {
        let store = SqliteSagaStore::open(SqliteDb::open(SqliteOptions::memory()).unwrap())
            .await
            .unwrap();
        for _ in 0..5 {
            store.create(&instance(None), "a").await.unwrap();
        }
        let page = store
            .list(
                &SagaFilter::all()
                    .saga("order")
                    .page(architectlm_core::extensions::Pagination::new(0, 2)),
            )
            .await
            .unwrap();
        assert_eq!(page.total, 5);
        assert_eq!(page.items.len(), 2);
        assert_eq!(page.next_offset, Some(2));
        let none = store
            .list(&SagaFilter::all().status(SagaStatus::Completed))
            .await
            .unwrap();
        assert_eq!(none.total, 0);
    }
}
