//! The saga journal on PostgreSQL, shared by several nodes.
//!
//! One table, `architectlm_saga_instances`: one row per instance with its owner, lease expiry
//! and fencing token, and the step records as a `jsonb` array. Leases are judged by the
//! server's clock: a node passes the lease *length* (its `lease_until` minus its own now) and
//! the server stores `clock_timestamp() + length`, so node clock offsets do not matter.
//!
//! Journal writes of concurrent sagas are batched: creates queue up and go to the server as
//! one `INSERT … SELECT FROM unnest(…)`, updates as one `UPDATE … FROM unnest(…)` that checks
//! every row's fencing token, so one round trip carries the journal entries of many sagas.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio_postgres::Row;
use tokio_postgres::types::{Json, ToSql};
use uuid::Uuid;

use architectlm_core::extensions::Page;
use architectlm_core::extensions::saga::{SagaFilter, SagaInstance, SagaStatus, SagaStepExecution};
use architectlm_core::store::UnreadableListener;

use super::{CreateOutcome, SagaStore, SagaUpdate, StoredSaga};
use crate::migration::Migration;
use crate::postgres::{PgClient, PgDb, pg_err};
use crate::unreadable::{Reports, unreadable};
use crate::{Error, Result};

/// The versioned schema of the saga table, applied by [`PgSagaStore::open`].
///
/// - v1: the table and its indexes.
/// - v2: fill factor 50, so that journal entries that keep the instance's status are
///   heap-only tuple updates (no index is touched, half the WAL). Pages written before keep
///   their layout until they are rewritten.
/// - v3: the step records become a `jsonb[]` array (converted from v1's `jsonb` array), and
///   `architectlm_saga_patch` (PL/pgSQL) replaces the changed records in it, which costs the
///   server less than rewriting a `jsonb` document with `jsonb_set`.
pub static PG_SAGA_MIGRATIONS: &[Migration] = &[
    Migration {
        component: "saga",
        version: 1,
        description: "saga instances with their step journal, owner, lease and fencing token",
        sql: "
        CREATE TABLE architectlm_saga_instances (
            id UUID PRIMARY KEY,
            saga_id TEXT NOT NULL,
            saga_version INTEGER NOT NULL,
            status TEXT NOT NULL,
            input JSONB NOT NULL,
            idempotency_key TEXT,
            started_at TIMESTAMPTZ NOT NULL,
            completed_at TIMESTAMPTZ,
            error TEXT,
            compensation_requested TEXT,
            owner TEXT,
            lease_until TIMESTAMPTZ,
            fencing BIGINT NOT NULL DEFAULT 1,
            steps JSONB NOT NULL
        );
        CREATE UNIQUE INDEX architectlm_saga_instances_key
            ON architectlm_saga_instances (saga_id, idempotency_key)
            WHERE idempotency_key IS NOT NULL;
        CREATE INDEX architectlm_saga_instances_started
            ON architectlm_saga_instances (started_at, id);
        CREATE INDEX architectlm_saga_instances_unfinished
            ON architectlm_saga_instances (lease_until)
            WHERE status IN ('created', 'running', 'compensating');
    ",
    },
    Migration {
        component: "saga",
        version: 2,
        description: "fill factor 50 on saga instances for heap-only journal updates",
        sql: "ALTER TABLE architectlm_saga_instances SET (fillfactor = 50);",
    },
    Migration {
        component: "saga",
        version: 3,
        description: "step records as a jsonb[] array, patched in place by architectlm_saga_patch",
        sql: "
        ALTER TABLE architectlm_saga_instances ADD COLUMN step_records JSONB[];
        UPDATE architectlm_saga_instances SET step_records = ARRAY(
            SELECT e.v FROM jsonb_array_elements(steps) WITH ORDINALITY AS e(v, o)
            ORDER BY e.o);
        ALTER TABLE architectlm_saga_instances DROP COLUMN steps;
        ALTER TABLE architectlm_saga_instances RENAME COLUMN step_records TO steps;
        ALTER TABLE architectlm_saga_instances ALTER COLUMN steps SET NOT NULL;
        CREATE FUNCTION architectlm_saga_patch(steps JSONB[], i1 INTEGER, r1 JSONB,
                                               i2 INTEGER, r2 JSONB, rest JSONB)
        RETURNS JSONB[] LANGUAGE plpgsql IMMUTABLE AS $$
        DECLARE
            n INTEGER := coalesce(cardinality(steps), 0);
            k TEXT;
            v JSONB;
        BEGIN
            IF rest IS NOT NULL THEN
                FOR k, v IN SELECT key, value FROM jsonb_each(rest) LOOP
                    IF k ~ '^[0-9]{1,9}$' AND k::INTEGER < n THEN
                        steps[k::INTEGER + 1] := v;
                    END IF;
                END LOOP;
                RETURN steps;
            END IF;
            IF i1 >= 0 AND i1 < n THEN
                steps[i1 + 1] := r1;
            END IF;
            IF i2 >= 0 AND i2 < n THEN
                steps[i2 + 1] := r2;
            END IF;
            RETURN steps;
        END
        $$;
    ",
    },
];

const COLUMNS: &str = "id, saga_id, saga_version, status, input, idempotency_key, started_at, \
     completed_at, error, compensation_requested, owner, lease_until, fencing, steps";

const UNFINISHED_SQL: &str = "('created', 'running', 'compensating')";

/// Most journal writes one batch takes.
const MAX_BATCH: usize = 1024;
/// Batches in flight at once (each on its own connection) whatever the queue's length.
const BASE_FLUSHERS: usize = 2;
/// Most batches in flight at once, when at least [`DEEP_QUEUE`] writes wait.
const MAX_FLUSHERS: usize = 8;
/// Queued writes from which another batch goes out beside the [`BASE_FLUSHERS`] ones.
const DEEP_QUEUE: usize = 256;

/// A [`SagaStore`] on PostgreSQL, for coordinators on several nodes.
///
/// `Send + Sync`, cheap to clone (clones share the pool and the write queue).
///
/// # Rules
/// - [`shared`](SagaStore::shared) is `true`: a coordinator on this store leases the instances
///   it drives. A claim succeeds only for an instance that is unowned, owned by the claimant,
///   finished, or whose lease has run out by the server's clock; claims use
///   `FOR UPDATE SKIP LOCKED`, so two nodes never claim the same instance at once, and each
///   claim bumps the fencing token.
/// - Every update carries the writer's fencing token and is refused with
///   [`Error::Conflict`] (kind `"saga instance"`, expected = the writer's token, actual = the
///   current one) once another node has claimed the instance.
/// - Journal writes of concurrent sagas share statements: a batch's creates and entries go as
///   one statement (one commit), two batches in flight (up to eight while hundreds of writes
///   wait). A statement the server refuses is retried apart, so only a bad write fails.
/// - Journal entries replace the changed step records in place in a `jsonb[]` array, and the
///   table keeps free room on its pages (fill factor 50), so an entry that keeps the
///   instance's status is a heap-only update that touches no index.
///
/// ```no_run
/// use architectlm_store::postgres::{PgDb, PgOptions};
/// use architectlm_store::saga::{PgSagaStore, SagaStore};
///
/// # async fn demo() -> architectlm_store::Result<()> {
/// let db = PgDb::connect(PgOptions::new("postgres://postgres@127.0.0.1:5432/test")).await?;
/// let store = PgSagaStore::open(db).await?; // applies the saga migrations
/// assert!(store.shared());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PgSagaStore {
    db: PgDb,
    queue: Arc<Mutex<Queue>>,
    reports: Reports,
}

impl std::fmt::Debug for PgSagaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSagaStore")
            .field("db", &self.db)
            .finish_non_exhaustive()
    }
}

enum Op {
    Create(SagaInstance, String, Option<f64>),
    Apply(SagaUpdate),
}

enum OpOut {
    Created(Box<CreateOutcome>),
    Applied,
}

type Reply = oneshot::Sender<Result<OpOut>>;

#[derive(Default)]
struct Queue {
    ops: Vec<(Op, Reply)>,
    flushers: usize,
    round_trips: u64,
    writes: u64,
}

/// Seconds from now until `t` by this node's clock (at least 0), the lease length sent to the
/// server.
fn lease_secs(t: Option<DateTime<Utc>>) -> Option<f64> {
    t.map(|t| {
        (t - Utc::now())
            .to_std()
            .unwrap_or(Duration::ZERO)
            .as_secs_f64()
    })
}

fn fencing_i64(f: u64) -> i64 {
    i64::try_from(f).unwrap_or(i64::MAX)
}

fn row_err(e: tokio_postgres::Error) -> Error {
    pg_err("bad saga journal row", e)
}

/// What an instance is called in reports and errors.
const KIND: &str = "saga instance";

/// The id of a row of [`COLUMNS`], for reports and errors.
fn row_id(r: &Row) -> String {
    r.try_get::<_, Uuid>(0)
        .map(|u| u.to_string())
        .unwrap_or_default()
}

/// Builds the instance of a row read by its id: one that cannot be decoded is an error
/// naming it.
fn build_one(r: &Row) -> Result<StoredSaga> {
    build(r).map_err(|e| unreadable(KIND, row_id(r), e))
}

fn build(r: &Row) -> Result<StoredSaga> {
    let status: String = r.try_get(3).map_err(row_err)?;
    let status = SagaStatus::parse(&status).ok_or_else(|| {
        Error::storage(format!("invalid saga status \"{status}\" in the journal"))
    })?;
    let steps: Vec<Json<SagaStepExecution>> = r
        .try_get(13)
        .map_err(|e| pg_err("invalid step records in the saga journal", e))?;
    let steps: Vec<SagaStepExecution> = steps.into_iter().map(|s| s.0).collect();
    let version: i32 = r.try_get(2).map_err(row_err)?;
    let mut instance = SagaInstance::new(
        r.try_get(0).map_err(row_err)?,
        r.try_get::<_, String>(1).map_err(row_err)?,
        u32::try_from(version).unwrap_or(0),
        r.try_get(4).map_err(row_err)?,
        r.try_get(5).map_err(row_err)?,
        r.try_get(6).map_err(row_err)?,
        steps,
    );
    instance.status = status;
    instance.completed_at = r.try_get(7).map_err(row_err)?;
    instance.error = r.try_get(8).map_err(row_err)?;
    instance.rebuild_context();
    let mut stored = StoredSaga::new(instance, r.try_get(10).map_err(row_err)?);
    stored.compensation_requested = r.try_get(9).map_err(row_err)?;
    stored.lease_until = r.try_get(11).map_err(row_err)?;
    let fencing: i64 = r.try_get(12).map_err(row_err)?;
    stored.fencing = u64::try_from(fencing).unwrap_or(0);
    Ok(stored)
}

fn step_json(s: &SagaStepExecution) -> Result<Value> {
    serde_json::to_value(s)
        .map_err(|e| Error::storage_with(format!("cannot serialise step \"{}\"", s.step_id), e))
}

const INSERT_SQL: &str = "INSERT INTO architectlm_saga_instances \
     (id, saga_id, saga_version, status, input, idempotency_key, started_at, completed_at, \
      error, owner, lease_until, fencing, steps) \
     SELECT u.id, u.saga_id, u.saga_version, u.status, u.input, u.key, u.started_at, \
            u.completed_at, u.error, u.owner, \
            CASE WHEN u.lease IS NULL THEN NULL \
                 ELSE clock_timestamp() + make_interval(secs => u.lease) END, \
            1, ARRAY(SELECT e.v FROM jsonb_array_elements(u.steps) WITH ORDINALITY AS e(v, o) \
                     ORDER BY e.o) \
     FROM unnest($1::uuid[], $2::text[], $3::int4[], $4::text[], $5::jsonb[], $6::text[], \
                 $7::timestamptz[], $8::timestamptz[], $9::text[], $10::text[], \
                 $11::float8[], $12::jsonb[]) \
          AS u(id, saga_id, saga_version, status, input, key, started_at, completed_at, \
               error, owner, lease, steps) \
     ON CONFLICT DO NOTHING RETURNING id";

/// Writes the changed step records into the stored array in place (`architectlm_saga_patch`,
/// migration v3): the first two by position (`i1`/`r1`, `i2`/`r2`; a journal entry usually
/// closes one step and opens the next), any more through `rest` (position → record, or
/// `NULL`). Positions outside the array are ignored.
///
/// The table's fill factor leaves room on each page, so an update that keeps the status (and
/// so every indexed column) is a heap-only tuple update that touches no index.
const UPDATE_SQL: &str = "UPDATE architectlm_saga_instances AS s \
     SET status = u.status, error = u.error, completed_at = u.completed_at, \
         steps = CASE WHEN u.i1 IS NULL THEN s.steps \
                      ELSE architectlm_saga_patch(s.steps, u.i1, u.r1, u.i2, u.r2, u.rest) END \
     FROM unnest($1::uuid[], $2::int8[], $3::text[], $4::text[], $5::timestamptz[], \
                 $6::int4[], $7::jsonb[], $8::int4[], $9::jsonb[], $10::jsonb[]) \
          WITH ORDINALITY AS u(id, fencing, status, error, completed_at, i1, r1, i2, r2, rest, \
                               ord) \
     WHERE s.id = u.id AND s.fencing = u.fencing \
     RETURNING u.ord";

/// Creates and journal entries of one batch in a single statement (so a single commit): the
/// insert and the update as data-modifying `WITH` queries. Rows: `(id, NULL)` per inserted
/// instance, `(NULL, ord)` per applied entry.
static BOTH_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    // The update's parameters follow the insert's twelve.
    let mut update = UPDATE_SQL.to_owned();
    for n in (1..=10).rev() {
        update = update.replace(&format!("${n}:"), &format!("${}:", n + 12));
    }
    format!(
        "WITH ins AS ({INSERT_SQL}), upd AS ({update}) \
         SELECT id, NULL::int8 FROM ins UNION ALL SELECT NULL::uuid, ord FROM upd"
    )
});

type NewInstance = (SagaInstance, String, Option<f64>);

/// The insert's parameters, by column, borrowed from the instances.
struct CreateColumns<'a> {
    ids: Vec<Uuid>,
    saga_ids: Vec<&'a str>,
    versions: Vec<i32>,
    statuses: Vec<&'a str>,
    inputs: Vec<Json<&'a Value>>,
    keys: Vec<Option<&'a str>>,
    started: Vec<DateTime<Utc>>,
    completed: Vec<Option<DateTime<Utc>>>,
    errors: Vec<Option<&'a str>>,
    owners: Vec<&'a str>,
    leases: Vec<Option<f64>>,
    steps: Vec<Json<&'a Vec<SagaStepExecution>>>,
}

impl<'a> CreateColumns<'a> {
    fn new(creates: &'a [NewInstance]) -> Self {
        let n = creates.len();
        let mut c = Self {
            ids: Vec::with_capacity(n),
            saga_ids: Vec::with_capacity(n),
            versions: Vec::with_capacity(n),
            statuses: Vec::with_capacity(n),
            inputs: Vec::with_capacity(n),
            keys: Vec::with_capacity(n),
            started: Vec::with_capacity(n),
            completed: Vec::with_capacity(n),
            errors: Vec::with_capacity(n),
            owners: Vec::with_capacity(n),
            leases: Vec::with_capacity(n),
            steps: Vec::with_capacity(n),
        };
        for (i, owner, lease) in creates {
            c.ids.push(i.id);
            c.saga_ids.push(i.saga_id.as_str());
            c.versions
                .push(i32::try_from(i.saga_version).unwrap_or(i32::MAX));
            c.statuses.push(i.status.as_str());
            c.inputs.push(Json(&i.input));
            c.keys.push(i.idempotency_key.as_deref());
            c.started.push(i.started_at);
            c.completed.push(i.completed_at);
            c.errors.push(i.error.as_deref());
            c.owners.push(owner.as_str());
            c.leases.push(*lease);
            c.steps.push(Json(&i.steps));
        }
        c
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 12] {
        [
            &self.ids,
            &self.saga_ids,
            &self.versions,
            &self.statuses,
            &self.inputs,
            &self.keys,
            &self.started,
            &self.completed,
            &self.errors,
            &self.owners,
            &self.leases,
            &self.steps,
        ]
    }
}

/// The journal update's parameters, by column, borrowed from the entries.
struct UpdateColumns<'a> {
    ids: Vec<Uuid>,
    fencings: Vec<i64>,
    statuses: Vec<&'a str>,
    errors: Vec<Option<&'a str>>,
    completed: Vec<Option<DateTime<Utc>>>,
    firsts: Vec<Option<i32>>,
    // Step records go as `Json` of the records themselves: serialised straight into the
    // message, with no intermediate `Value`.
    first_records: Vec<Option<Json<&'a SagaStepExecution>>>,
    seconds: Vec<Option<i32>>,
    second_records: Vec<Option<Json<&'a SagaStepExecution>>>,
    rests: Vec<Option<Value>>,
}

impl<'a> UpdateColumns<'a> {
    fn new(updates: &'a [SagaUpdate]) -> Result<Self> {
        let n = updates.len();
        let mut c = Self {
            ids: Vec::with_capacity(n),
            fencings: Vec::with_capacity(n),
            statuses: Vec::with_capacity(n),
            errors: Vec::with_capacity(n),
            completed: Vec::with_capacity(n),
            firsts: Vec::with_capacity(n),
            first_records: Vec::with_capacity(n),
            seconds: Vec::with_capacity(n),
            second_records: Vec::with_capacity(n),
            rests: Vec::with_capacity(n),
        };
        for u in updates {
            c.ids.push(u.instance_id);
            c.fencings.push(fencing_i64(u.fencing));
            c.statuses.push(u.status.as_str());
            c.errors.push(u.error.as_deref());
            c.completed.push(u.completed_at);
            let (mut i1, mut r1, mut i2, mut r2, mut rest) = (None, None, None, None, None);
            if u.steps.len() > 2 {
                let mut patch = serde_json::Map::new();
                for (idx, s) in &u.steps {
                    patch.insert(idx.to_string(), step_json(s)?);
                }
                // `i1` only marks the entry as changing steps; `rest` carries them all.
                i1 = Some(0);
                i2 = Some(0);
                rest = Some(Value::Object(patch));
            } else {
                for (n, (idx, s)) in u.steps.iter().enumerate() {
                    // A position beyond `i32` is beyond any array: left out, like the others.
                    let Ok(idx) = i32::try_from(*idx) else {
                        continue;
                    };
                    if n == 0 || i1.is_none() {
                        i1 = Some(idx);
                        r1 = Some(Json(s));
                    } else {
                        i2 = Some(idx);
                        r2 = Some(Json(s));
                    }
                }
            }
            c.firsts.push(i1);
            c.first_records.push(r1);
            c.seconds.push(i2);
            c.second_records.push(r2);
            c.rests.push(rest);
        }
        Ok(c)
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 10] {
        [
            &self.ids,
            &self.fencings,
            &self.statuses,
            &self.errors,
            &self.completed,
            &self.firsts,
            &self.first_records,
            &self.seconds,
            &self.second_records,
            &self.rests,
        ]
    }
}

/// The outcome of each create given the ids the insert took; instances not inserted are
/// looked up (same idempotency key) or refused (same id). Returns the outcomes and the
/// number of reads made.
async fn create_outcomes(
    client: &PgClient,
    creates: Vec<NewInstance>,
    inserted: &HashSet<Uuid>,
) -> Result<(Vec<Result<OpOut>>, u64)> {
    let mut out = Vec::with_capacity(creates.len());
    let mut reads = 0;
    for (instance, owner, _) in creates {
        if inserted.contains(&instance.id) {
            out.push(Ok(OpOut::Created(Box::new(CreateOutcome::Created(
                StoredSaga::new(instance, Some(owner)),
            )))));
            continue;
        }
        // Not inserted: an instance with the same idempotency key, or the same id, exists.
        let existing = match &instance.idempotency_key {
            Some(key) => {
                reads += 1;
                client
                    .query_opt(
                        &format!(
                            "SELECT {COLUMNS} FROM architectlm_saga_instances \
                             WHERE saga_id = $1 AND idempotency_key = $2"
                        ),
                        &[&instance.saga_id, key],
                    )
                    .await
                    .map_err(|e| pg_err("cannot read a saga instance", e))?
            }
            None => None,
        };
        out.push(match existing {
            Some(row) => {
                build_one(&row).map(|s| OpOut::Created(Box::new(CreateOutcome::Existing(s))))
            }
            None => Err(Error::InvalidInput(format!(
                "saga instance {} already exists",
                instance.id
            ))),
        });
    }
    Ok((out, reads))
}

/// The outcome of each journal entry given which were applied (by position); refused ones
/// are told apart (stale token or unknown instance) with one read. Returns the outcomes and
/// the number of reads made.
async fn update_outcomes(
    client: &PgClient,
    updates: &[SagaUpdate],
    applied: &[bool],
) -> Result<(Vec<Result<OpOut>>, u64)> {
    let refused: Vec<Uuid> = updates
        .iter()
        .zip(applied)
        .filter(|(_, ok)| !**ok)
        .map(|(u, _)| u.instance_id)
        .collect();
    let mut current = HashMap::new();
    if !refused.is_empty() {
        for r in client
            .query(
                "SELECT id, fencing FROM architectlm_saga_instances WHERE id = ANY($1)",
                &[&refused],
            )
            .await
            .map_err(|e| pg_err("cannot read saga fencing tokens", e))?
        {
            let id: Uuid = r.try_get(0).map_err(row_err)?;
            let f: i64 = r.try_get(1).map_err(row_err)?;
            current.insert(id, u64::try_from(f).unwrap_or(0));
        }
    }
    let out = updates
        .iter()
        .zip(applied)
        .map(|(u, ok)| {
            if *ok {
                return Ok(OpOut::Applied);
            }
            Err(match current.get(&u.instance_id) {
                None => Error::not_found("saga instance", u.instance_id),
                Some(actual) => Error::Conflict {
                    kind: "saga instance",
                    id: u.instance_id.to_string(),
                    expected: u.fencing,
                    actual: *actual,
                },
            })
        })
        .collect();
    Ok((out, u64::from(!refused.is_empty())))
}

/// Marks the entry at `ord` (1-based, from `WITH ORDINALITY`) as applied.
fn mark_applied(applied: &mut [bool], ord: i64) {
    if let Some(slot) = usize::try_from(ord - 1)
        .ok()
        .and_then(|i| applied.get_mut(i))
    {
        *slot = true;
    }
}

/// Creates alone: one insert. Returns the outcomes and the statements sent, or the error and
/// the creates (nothing was written).
async fn run_creates(
    db: &PgDb,
    creates: Vec<NewInstance>,
) -> std::result::Result<(Vec<Result<OpOut>>, u64), (Error, Vec<NewInstance>)> {
    let client = match db.client().await {
        Ok(c) => c,
        Err(e) => return Err((e, creates)),
    };
    let inserted = async {
        let stmt = client
            .prepare_cached(INSERT_SQL)
            .await
            .map_err(|e| pg_err("cannot prepare the saga insert", e))?;
        let cols = CreateColumns::new(&creates);
        client
            .query(&stmt, &cols.params())
            .await
            .map_err(|e| pg_err("cannot record saga instances", e))?
            .iter()
            .map(|r| r.try_get::<_, Uuid>(0).map_err(row_err))
            .collect::<Result<HashSet<Uuid>>>()
    }
    .await;
    let inserted = match inserted {
        Ok(i) => i,
        Err(e) => return Err((e, creates)),
    };
    let n = creates.len();
    match create_outcomes(&client, creates, &inserted).await {
        Ok((out, reads)) => Ok((out, 1 + reads)),
        Err(e) => {
            let msg = e.to_string();
            Ok((
                (0..n).map(|_| Err(Error::storage(msg.clone()))).collect(),
                1,
            ))
        }
    }
}

/// Journal entries alone: one update. Returns the outcomes and the statements sent.
async fn run_updates(db: &PgDb, updates: &[SagaUpdate]) -> Result<(Vec<Result<OpOut>>, u64)> {
    let client = db.client().await?;
    let cols = UpdateColumns::new(updates)?;
    let stmt = client
        .prepare_cached(UPDATE_SQL)
        .await
        .map_err(|e| pg_err("cannot prepare the saga journal update", e))?;
    let mut applied = vec![false; updates.len()];
    for r in client
        .query(&stmt, &cols.params())
        .await
        .map_err(|e| pg_err("cannot write the saga journal", e))?
    {
        mark_applied(&mut applied, r.try_get(0).map_err(row_err)?);
    }
    let (out, reads) = update_outcomes(&client, updates, &applied).await?;
    Ok((out, 1 + reads))
}

/// Outcomes of a batch's creates and journal entries, and the statements sent.
type BatchOut = (Vec<Result<OpOut>>, Vec<Result<OpOut>>, u64);

/// Creates and journal entries together: one statement, one commit.
async fn run_both(
    db: &PgDb,
    creates: Vec<NewInstance>,
    updates: &[SagaUpdate],
) -> std::result::Result<BatchOut, (Error, Vec<NewInstance>)> {
    let client = match db.client().await {
        Ok(c) => c,
        Err(e) => return Err((e, creates)),
    };
    let written = async {
        let stmt = client
            .prepare_cached(&BOTH_SQL)
            .await
            .map_err(|e| pg_err("cannot prepare the saga journal write", e))?;
        let c = CreateColumns::new(&creates);
        let u = UpdateColumns::new(updates)?;
        let mut params: Vec<&(dyn ToSql + Sync)> = c.params().to_vec();
        params.extend(u.params());
        let mut inserted = HashSet::new();
        let mut applied = vec![false; updates.len()];
        for r in client
            .query(&stmt, &params)
            .await
            .map_err(|e| pg_err("cannot write the saga journal", e))?
        {
            match r.try_get::<_, Option<Uuid>>(0).map_err(row_err)? {
                Some(id) => {
                    inserted.insert(id);
                }
                None => mark_applied(
                    &mut applied,
                    r.try_get::<_, Option<i64>>(1)
                        .map_err(row_err)?
                        .unwrap_or(0),
                ),
            }
        }
        Ok::<_, Error>((inserted, applied))
    }
    .await;
    let (inserted, applied) = match written {
        Ok(w) => w,
        Err(e) => return Err((e, creates)),
    };
    // The statement is committed: from here on, errors are the outcomes' own.
    let n = creates.len();
    let (created, create_reads) = match create_outcomes(&client, creates, &inserted).await {
        Ok(o) => o,
        Err(e) => {
            let msg = e.to_string();
            (
                (0..n).map(|_| Err(Error::storage(msg.clone()))).collect(),
                0,
            )
        }
    };
    let (updated, update_reads) = match update_outcomes(&client, updates, &applied).await {
        Ok(o) => o,
        Err(e) => {
            let msg = e.to_string();
            (
                updates
                    .iter()
                    .map(|_| Err(Error::storage(msg.clone())))
                    .collect(),
                0,
            )
        }
    };
    Ok((created, updated, 1 + create_reads + update_reads))
}

/// Runs one batch: its creates and journal entries in one statement (one commit) when it has
/// both, else the one kind in one statement. Should a statement fail (say, the server refuses
/// one instance's input), its writes are tried again apart — creates and entries, then each
/// alone — so one bad write fails alone. Returns the number of statements sent.
async fn run_batch(db: &PgDb, batch: Vec<(Op, Reply)>) -> u64 {
    let mut creates = Vec::new();
    let mut create_replies = Vec::new();
    let mut updates = Vec::new();
    let mut update_replies = Vec::new();
    for (op, reply) in batch {
        match op {
            Op::Create(i, o, l) => {
                creates.push((i, o, l));
                create_replies.push(reply);
            }
            Op::Apply(u) => {
                updates.push(u);
                update_replies.push(reply);
            }
        }
    }
    let mut statements = 0;
    if !creates.is_empty() && !updates.is_empty() {
        match run_both(db, creates, &updates).await {
            Ok((created, updated, sent)) => {
                answer(create_replies, Ok(created));
                answer(update_replies, Ok(updated));
                return sent;
            }
            Err((_, back)) => {
                statements += 1;
                creates = back;
            }
        }
    }
    if !creates.is_empty() {
        match run_creates(db, creates).await {
            Ok((out, sent)) => {
                statements += sent;
                answer(create_replies, Ok(out));
            }
            Err((e, back)) if back.len() == 1 => {
                statements += 1;
                answer(create_replies, Err(e));
            }
            Err((_, back)) => {
                // One bad instance fails the statement: each goes alone, so only it fails.
                statements += 1;
                for (create, reply) in back.into_iter().zip(create_replies) {
                    let r = run_creates(db, vec![create]).await;
                    statements += r.as_ref().map_or(1, |(_, sent)| *sent);
                    answer(vec![reply], r.map(|(out, _)| out).map_err(|(e, _)| e));
                }
            }
        }
    }
    if !updates.is_empty() {
        match run_updates(db, &updates).await {
            Ok((out, sent)) => {
                statements += sent;
                answer(update_replies, Ok(out));
            }
            Err(e) if updates.len() == 1 => {
                statements += 1;
                answer(update_replies, Err(e));
            }
            Err(_) => {
                // As for creates: each goes alone, so only a bad one fails.
                statements += 1;
                for (update, reply) in updates.iter().zip(update_replies) {
                    let r = run_updates(db, std::slice::from_ref(update)).await;
                    statements += r.as_ref().map_or(1, |(_, sent)| *sent);
                    answer(vec![reply], r.map(|(out, _)| out));
                }
            }
        }
    }
    statements
}

fn answer(replies: Vec<Reply>, results: Result<Vec<Result<OpOut>>>) {
    match results {
        Ok(results) => {
            for (reply, r) in replies.into_iter().zip(results) {
                let _ = reply.send(r);
            }
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

async fn flush(db: PgDb, queue: Arc<Mutex<Queue>>) {
    loop {
        let batch = {
            let mut q = queue.lock();
            if q.ops.is_empty() {
                q.flushers -= 1;
                return;
            }
            let take = q.ops.len().min(MAX_BATCH);
            q.writes += take as u64;
            q.ops.drain(..take).collect::<Vec<_>>()
        };
        let statements = run_batch(&db, batch).await;
        queue.lock().round_trips += statements;
    }
}

impl PgSagaStore {
    /// Uses `db`, applying the saga migrations first (safe when several nodes start at once).
    pub async fn open(db: PgDb) -> Result<Self> {
        db.migrate(PG_SAGA_MIGRATIONS).await?;
        Ok(Self {
            db,
            queue: Arc::new(Mutex::new(Queue::default())),
            reports: Reports::default(),
        })
    }

    /// The database.
    pub fn db(&self) -> &PgDb {
        &self.db
    }

    /// Journal write statistics: `(round trips, journal writes)` so far, counting creates and
    /// updates (not claims, renewals or reads). `writes / round trips` is how many journal
    /// entries share a round trip on average.
    pub fn write_stats(&self) -> (u64, u64) {
        let q = self.queue.lock();
        (q.round_trips, q.writes)
    }

    async fn submit(&self, op: Op) -> Result<OpOut> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut q = self.queue.lock();
            q.ops.push((op, tx));
            // Two batches in flight keep the server busy while one commits; more only when
            // writes pile up. Fewer, larger batches cost the server less per write.
            if q.flushers < BASE_FLUSHERS
                || (q.flushers < MAX_FLUSHERS && q.ops.len() >= DEEP_QUEUE)
            {
                q.flushers += 1;
                true
            } else {
                false
            }
        };
        if start {
            tokio::spawn(flush(self.db.clone(), self.queue.clone()));
        }
        rx.await
            .unwrap_or_else(|_| Err(Error::storage("the saga journal flusher stopped")))
    }

    async fn query_rows(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        let client = self.db.client().await?;
        let stmt = client
            .prepare_cached(sql)
            .await
            .map_err(|e| pg_err("cannot prepare a saga journal query", e))?;
        client
            .query(&stmt, params)
            .await
            .map_err(|e| pg_err("saga journal query failed", e))
    }

    async fn claim_where(
        &self,
        condition: &str,
        owner: &str,
        lease_until: Option<DateTime<Utc>>,
        limit: i64,
    ) -> Result<Vec<StoredSaga>> {
        let sql = format!(
            "UPDATE architectlm_saga_instances AS t SET owner = $1, \
                 lease_until = CASE WHEN $2::float8 IS NULL THEN NULL \
                     ELSE clock_timestamp() + make_interval(secs => $2::float8) END, \
                 fencing = t.fencing + 1 \
             FROM (SELECT id FROM architectlm_saga_instances \
                   WHERE status IN {UNFINISHED_SQL} AND ({condition}) \
                   ORDER BY started_at, id LIMIT $3 FOR UPDATE SKIP LOCKED) AS c \
             WHERE t.id = c.id \
             RETURNING {}",
            COLUMNS
                .split(", ")
                .map(|c| format!("t.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let rows = self
            .query_rows(&sql, &[&owner, &lease_secs(lease_until), &limit])
            .await?;
        let mut out = self.reports.keep(KIND, &rows, |r| (row_id(r), build(r)));
        out.sort_by_key(|s| (s.instance.started_at, s.instance.id));
        Ok(out)
    }
}

#[async_trait]
impl SagaStore for PgSagaStore {
    async fn create(&self, instance: &SagaInstance, owner: &str) -> Result<CreateOutcome> {
        self.create_leased(instance, owner, None).await
    }

    async fn create_leased(
        &self,
        instance: &SagaInstance,
        owner: &str,
        lease_until: Option<DateTime<Utc>>,
    ) -> Result<CreateOutcome> {
        let op = Op::Create(instance.clone(), owner.to_owned(), lease_secs(lease_until));
        match self.submit(op).await? {
            OpOut::Created(c) => {
                let mut c = *c;
                if let CreateOutcome::Created(s) = &mut c {
                    s.lease_until = lease_until;
                }
                Ok(c)
            }
            OpOut::Applied => Err(Error::storage(
                "the saga journal answered a create with an update",
            )),
        }
    }

    async fn apply(&self, update: SagaUpdate) -> Result<()> {
        self.submit(Op::Apply(update)).await.map(|_| ())
    }

    async fn request_compensation(
        &self,
        instance_id: Uuid,
        reason: &str,
    ) -> Result<Option<StoredSaga>> {
        let client = self.db.client().await?;
        client
            .execute(
                "UPDATE architectlm_saga_instances SET compensation_requested = $2 WHERE id = $1 \
                 AND status IN ('created', 'running') AND compensation_requested IS NULL",
                &[&instance_id, &reason],
            )
            .await
            .map_err(|e| pg_err("cannot record a compensation request", e))?;
        drop(client);
        self.get(instance_id).await
    }

    async fn claim(
        &self,
        instance_id: Uuid,
        owner: &str,
        lease_until: Option<DateTime<Utc>>,
    ) -> Result<Option<StoredSaga>> {
        let sql = format!(
            "UPDATE architectlm_saga_instances SET owner = $2, \
                 lease_until = CASE WHEN $3::float8 IS NULL THEN NULL \
                     ELSE clock_timestamp() + make_interval(secs => $3::float8) END, \
                 fencing = fencing + 1 \
             WHERE id = $1 AND (status NOT IN {UNFINISHED_SQL} OR owner IS NULL OR owner = $2 \
                               OR lease_until <= clock_timestamp()) \
             RETURNING {COLUMNS}"
        );
        let claimed = self
            .query_rows(&sql, &[&instance_id, &owner, &lease_secs(lease_until)])
            .await?;
        if let Some(r) = claimed.first() {
            return build_one(r).map(Some);
        }
        match self.get(instance_id).await? {
            None => Ok(None),
            Some(current) => Err(Error::Conflict {
                kind: "saga lease",
                id: format!(
                    "{instance_id} (held by {} until {})",
                    current.owner.as_deref().unwrap_or("nobody"),
                    current
                        .lease_until
                        .map_or_else(|| "released".to_owned(), |t| t.to_rfc3339())
                ),
                expected: current.fencing,
                actual: current.fencing,
            }),
        }
    }

    async fn claim_unfinished(
        &self,
        owner: &str,
        lease_until: Option<DateTime<Utc>>,
    ) -> Result<Vec<StoredSaga>> {
        self.claim_where(
            "owner IS NULL OR owner = $1 OR lease_until <= clock_timestamp()",
            owner,
            lease_until,
            i64::MAX,
        )
        .await
    }

    async fn claim_expired(
        &self,
        owner: &str,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<StoredSaga>> {
        self.claim_where(
            "owner IS DISTINCT FROM $1 AND (owner IS NULL OR lease_until <= clock_timestamp())",
            owner,
            Some(lease_until),
            i64::try_from(limit).unwrap_or(i64::MAX),
        )
        .await
    }

    /// Rows being written right now are skipped (`SKIP LOCKED`) rather than waited for, so a
    /// renewal never waits on (or deadlocks with) journal writes; the next renewal, a third
    /// of a lease later, extends them.
    async fn renew_leases(&self, owner: &str, lease_until: DateTime<Utc>) -> Result<u64> {
        let client = self.db.client().await?;
        client
            .execute(
                &format!(
                    "UPDATE architectlm_saga_instances AS t \
                     SET lease_until = clock_timestamp() + make_interval(secs => $2::float8) \
                     FROM (SELECT id FROM architectlm_saga_instances \
                           WHERE owner = $1 AND status IN {UNFINISHED_SQL} \
                           FOR UPDATE SKIP LOCKED) AS mine \
                     WHERE t.id = mine.id"
                ),
                &[&owner, &lease_secs(Some(lease_until))],
            )
            .await
            .map_err(|e| pg_err("cannot renew saga leases", e))
    }

    fn shared(&self) -> bool {
        true
    }

    async fn release_leases(&self, owner: &str) -> Result<u64> {
        let client = self.db.client().await?;
        client
            .execute(
                &format!(
                    "UPDATE architectlm_saga_instances SET owner = NULL, lease_until = NULL \
                     WHERE owner = $1 AND status IN {UNFINISHED_SQL}"
                ),
                &[&owner],
            )
            .await
            .map_err(|e| pg_err("cannot release saga leases", e))
    }

    async fn get(&self, instance_id: Uuid) -> Result<Option<StoredSaga>> {
        let sql = format!("SELECT {COLUMNS} FROM architectlm_saga_instances WHERE id = $1");
        self.query_rows(&sql, &[&instance_id])
            .await?
            .first()
            .map(build_one)
            .transpose()
    }

    async fn list(&self, filter: &SagaFilter) -> Result<Page<SagaInstance>> {
        let mut clauses: Vec<String> = Vec::new();
        let mut args: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        if let Some(s) = &filter.saga_id {
            args.push(Box::new(s.clone()));
            clauses.push(format!("saga_id = ${}", args.len()));
        }
        if !filter.status.is_empty() {
            let statuses: Vec<String> = filter
                .status
                .iter()
                .map(|s| s.as_str().to_owned())
                .collect();
            args.push(Box::new(statuses));
            clauses.push(format!("status = ANY(${})", args.len()));
        }
        if let Some(t) = filter.started_after {
            args.push(Box::new(t));
            clauses.push(format!("started_at >= ${}", args.len()));
        }
        if let Some(t) = filter.started_before {
            args.push(Box::new(t));
            clauses.push(format!("started_at <= ${}", args.len()));
        }
        let where_ = if clauses.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", clauses.join(" AND "))
        };
        let params: Vec<&(dyn ToSql + Sync)> = args
            .iter()
            .map(|a| a.as_ref() as &(dyn ToSql + Sync))
            .collect();
        let client = self.db.client().await?;
        let total: i64 = client
            .query_one(
                &format!("SELECT count(*) FROM architectlm_saga_instances {where_}"),
                &params,
            )
            .await
            .map_err(|e| pg_err("cannot count saga instances", e))?
            .try_get(0)
            .map_err(row_err)?;
        let total = u64::try_from(total).unwrap_or(0);
        let limit = i64::try_from(filter.page.limit).unwrap_or(i64::MAX);
        let offset = i64::try_from(filter.page.offset).unwrap_or(i64::MAX);
        let rows = client
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM architectlm_saga_instances {where_} \
                     ORDER BY started_at, id LIMIT {limit} OFFSET {offset}"
                ),
                &params,
            )
            .await
            .map_err(|e| pg_err("cannot list saga instances", e))?;
        let items = self
            .reports
            .keep(KIND, &rows, |r| (row_id(r), build(r).map(|s| s.instance)));
        let end = filter.page.offset.saturating_add(rows.len() as u64);
        let next = (end < total).then_some(end);
        Ok(Page::new(items, total, next))
    }

    fn on_unreadable(&self, listener: UnreadableListener) {
        self.reports.add(listener);
    }
}
