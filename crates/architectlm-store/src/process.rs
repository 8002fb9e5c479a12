//! Durable storage of process instances: the core [`ProcessStore`] contract on SQLite
//! ([`SqliteProcessStore`]) and PostgreSQL ([`PgProcessStore`]).
//!
//! Both keep one row per instance with its `version`; [`ProcessStore::update`] is a single
//! `UPDATE ... WHERE id = ? AND version = ?`, so two writers (two tasks, or two nodes sharing a
//! PostgreSQL database) that read the same version cannot both win: the second gets
//! [`Error::Conflict`] naming the instance, the version it expected and the one stored, and
//! nothing the first wrote is lost. A runtime serialises transitions of one instance inside its
//! own process, so conflicts only arise between nodes (or between runtimes sharing a store).
//!
//! Plug a store into a runtime with `Runtime::builder(system).process_store(Arc::new(store))`.
//!
//! # Precision
//! SQLite keeps timestamps to the nanosecond; PostgreSQL's `timestamptz` keeps microseconds, so
//! `created_at` and `updated_at` read back from [`PgProcessStore`] are truncated to the
//! microsecond. Contexts are stored as JSON (`jsonb` on PostgreSQL, which does not keep the order
//! of object keys).

#[cfg(any(feature = "sqlite", feature = "postgres"))]
use architectlm_core::ProcessInstance;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
use architectlm_core::store::{ProcessQuery, ProcessStore};
#[cfg(any(feature = "sqlite", feature = "postgres"))]
use async_trait::async_trait;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
use uuid::Uuid;

#[cfg(any(feature = "sqlite", feature = "postgres"))]
use crate::unreadable::{Reports, unreadable};
#[cfg(any(feature = "sqlite", feature = "postgres"))]
use crate::{Error, Result};

#[cfg(any(feature = "sqlite", feature = "postgres"))]
const KIND: &str = "process instance";

#[cfg(any(feature = "sqlite", feature = "postgres"))]
fn version_to_db(id: Uuid, version: u64) -> Result<i64> {
    i64::try_from(version).map_err(|_| {
        Error::InvalidInput(format!(
            "process instance {id}: version {version} does not fit in a 64-bit signed integer"
        ))
    })
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
fn version_from_db(id: &str, version: i64) -> Result<u64> {
    u64::try_from(version).map_err(|_| {
        Error::storage(format!(
            "process instance {id}: stored version {version} is negative"
        ))
    })
}

/// Builds an instance from its stored columns. `ProcessInstance` is `#[non_exhaustive]`, so
/// outside the core crate it is built through its serde form, which is also its stored form.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
struct Parts {
    id: Uuid,
    process_id: String,
    state: String,
    context: serde_json::Value,
    version: u64,
    created_at: chrono::DateTime<chrono::Utc>,
    updated_at: chrono::DateTime<chrono::Utc>,
    last_action: Option<serde_json::Value>,
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
impl Parts {
    fn build(self) -> Result<ProcessInstance> {
        serde_json::from_value(serde_json::json!({
            "id": self.id,
            "process_id": self.process_id,
            "state": self.state,
            "context": self.context,
            "version": self.version,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "last_action": self.last_action,
        }))
        .map_err(Error::Serialization)
    }
}

#[cfg(feature = "sqlite")]
pub use sqlite_impl::{SQLITE_MIGRATIONS, SqliteProcessStore};

#[cfg(feature = "sqlite")]
mod sqlite_impl {
    use std::fmt;

    use chrono::{DateTime, SecondsFormat, Utc};
    use rusqlite::{OptionalExtension, params};

    use super::*;
    use crate::migration::Migration;
    use crate::sqlite::SqliteDb;

    /// The SQLite tables of [`SqliteProcessStore`] (component `process`).
    pub static SQLITE_MIGRATIONS: &[Migration] = &[Migration {
        component: "process",
        version: 1,
        description: "process instances",
        sql: "CREATE TABLE architectlm_process_instances (
                id TEXT PRIMARY KEY,
                process_id TEXT NOT NULL,
                state TEXT NOT NULL,
                context TEXT NOT NULL,
                version INTEGER NOT NULL,
                created_at TEXT NOT NULL,
                updated_at TEXT NOT NULL,
                last_action TEXT
            );
            CREATE INDEX architectlm_process_instances_by_process
                ON architectlm_process_instances (process_id, created_at, id);
            CREATE INDEX architectlm_process_instances_by_state
                ON architectlm_process_instances (state, created_at, id);",
    }];

    /// Process instances in an embedded SQLite database.
    ///
    /// `Send + Sync`, cheap to clone. Writes go through the database's group-commit writer, so
    /// many concurrent transitions share one flush; a write that returned `Ok` survives a crash
    /// of the process (and power loss with `Synchronous::Full`).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use architectlm_core::store::ProcessStore;
    /// use architectlm_store::process::SqliteProcessStore;
    /// use architectlm_store::sqlite::{SqliteDb, SqliteOptions};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let db = SqliteDb::open(SqliteOptions::memory())?;
    /// let store: Arc<dyn ProcessStore> = Arc::new(SqliteProcessStore::open(db).await?);
    /// // Runtime::builder(system).process_store(store).start().await?;
    /// # Ok::<(), architectlm_store::Error>(()) }).unwrap();
    /// ```
    #[derive(Clone)]
    pub struct SqliteProcessStore {
        db: SqliteDb,
        reports: Reports,
    }

    impl fmt::Debug for SqliteProcessStore {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("SqliteProcessStore")
                .field("db", &self.db)
                .finish()
        }
    }

    fn ts(t: &DateTime<Utc>) -> String {
        // A fixed width (nanoseconds, `Z`) so that text order is time order.
        t.to_rfc3339_opts(SecondsFormat::Nanos, true)
    }

    fn db_err(e: rusqlite::Error) -> Error {
        Error::storage(e)
    }

    const COLUMNS: &str =
        "id, process_id, state, context, version, created_at, updated_at, last_action";

    fn from_row(r: &rusqlite::Row<'_>) -> Result<ProcessInstance> {
        let id: String = r.get(0).map_err(db_err)?;
        let parse_ts = |i: usize| -> Result<DateTime<Utc>> {
            let s: String = r.get(i).map_err(db_err)?;
            DateTime::parse_from_rfc3339(&s)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|e| {
                    Error::storage_with(format!("process instance {id}: bad timestamp {s:?}"), e)
                })
        };
        let context: String = r.get(3).map_err(db_err)?;
        let last_action: Option<String> = r.get(7).map_err(db_err)?;
        Parts {
            id: Uuid::parse_str(&id)
                .map_err(|e| Error::storage_with(format!("bad process instance id {id:?}"), e))?,
            process_id: r.get(1).map_err(db_err)?,
            state: r.get(2).map_err(db_err)?,
            context: serde_json::from_str(&context)?,
            version: version_from_db(&id, r.get(4).map_err(db_err)?)?,
            created_at: parse_ts(5)?,
            updated_at: parse_ts(6)?,
            last_action: last_action.map(|s| serde_json::from_str(&s)).transpose()?,
        }
        .build()
    }

    struct Row {
        id: String,
        process_id: String,
        state: String,
        context: String,
        version: i64,
        created_at: String,
        updated_at: String,
        last_action: Option<String>,
    }

    fn to_row(i: &ProcessInstance) -> Result<Row> {
        Ok(Row {
            id: i.id.to_string(),
            process_id: i.process_id.to_string(),
            state: i.state.to_string(),
            context: serde_json::to_string(&i.context)?,
            version: version_to_db(i.id, i.version)?,
            created_at: ts(&i.created_at),
            updated_at: ts(&i.updated_at),
            last_action: i
                .last_action
                .as_ref()
                .map(serde_json::to_string)
                .transpose()?,
        })
    }

    fn stored_version(t: &rusqlite::Connection, id: &str) -> Result<Option<u64>> {
        t.query_row(
            "SELECT version FROM architectlm_process_instances WHERE id = ?1",
            [id],
            |r| r.get::<_, i64>(0),
        )
        .optional()
        .map_err(db_err)?
        .map(|v| version_from_db(id, v))
        .transpose()
    }

    impl SqliteProcessStore {
        /// A store on `db`, creating its tables if needed.
        pub async fn open(db: SqliteDb) -> Result<Self> {
            db.migrate(SQLITE_MIGRATIONS).await?;
            Ok(Self {
                db,
                reports: Reports::default(),
            })
        }

        /// The database it uses.
        pub fn db(&self) -> &SqliteDb {
            &self.db
        }
    }

    #[async_trait]
    impl ProcessStore for SqliteProcessStore {
        async fn insert(&self, instance: &ProcessInstance) -> Result<()> {
            let row = to_row(instance)?;
            self.db
                .write(move |t| {
                    let n = t
                        .execute(
                            "INSERT INTO architectlm_process_instances (id, process_id, state, context, version, created_at, updated_at, last_action)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (id) DO NOTHING",
                            params![row.id, row.process_id, row.state, row.context, row.version, row.created_at, row.updated_at, row.last_action],
                        )
                        .map_err(db_err)?;
                    if n == 1 {
                        return Ok(());
                    }
                    Err(Error::Conflict {
                        kind: KIND,
                        id: row.id.clone(),
                        expected: 0,
                        actual: stored_version(t, &row.id)?.unwrap_or(0),
                    })
                })
                .await
        }

        async fn get(&self, id: Uuid) -> Result<Option<ProcessInstance>> {
            self.db
                .read(move |c| {
                    let mut s = c
                        .prepare_cached(&format!(
                            "SELECT {COLUMNS} FROM architectlm_process_instances WHERE id = ?1"
                        ))
                        .map_err(db_err)?;
                    let mut rows = s.query([id.to_string()]).map_err(db_err)?;
                    match rows.next().map_err(db_err)? {
                        Some(r) => from_row(r).map(Some).map_err(|e| unreadable(KIND, id, e)),
                        None => Ok(None),
                    }
                })
                .await
        }

        async fn update(&self, instance: &ProcessInstance, expected_version: u64) -> Result<()> {
            let row = to_row(instance)?;
            let expected = version_to_db(instance.id, expected_version)?;
            self.db
                .write(move |t| {
                    let n = t
                        .execute(
                            "UPDATE architectlm_process_instances
                             SET process_id = ?2, state = ?3, context = ?4, version = ?5,
                                 created_at = ?6, updated_at = ?7, last_action = ?8
                             WHERE id = ?1 AND version = ?9",
                            params![
                                row.id,
                                row.process_id,
                                row.state,
                                row.context,
                                row.version,
                                row.created_at,
                                row.updated_at,
                                row.last_action,
                                expected
                            ],
                        )
                        .map_err(db_err)?;
                    if n == 1 {
                        return Ok(());
                    }
                    match stored_version(t, &row.id)? {
                        None => Err(Error::not_found(KIND, &row.id)),
                        Some(actual) => Err(Error::Conflict {
                            kind: KIND,
                            id: row.id.clone(),
                            expected: expected_version,
                            actual,
                        }),
                    }
                })
                .await
        }

        async fn list(&self, query: &ProcessQuery) -> Result<Vec<ProcessInstance>> {
            let process_id = query.process_id.clone();
            let state = query.state.clone();
            let reports = self.reports.clone();
            self.db
                .read(move |c| {
                    let mut s = c
                        .prepare_cached(&format!(
                            "SELECT {COLUMNS} FROM architectlm_process_instances
                             WHERE (?1 IS NULL OR process_id = ?1) AND (?2 IS NULL OR state = ?2)
                             ORDER BY created_at, id"
                        ))
                        .map_err(db_err)?;
                    let mut rows = s.query(params![process_id, state]).map_err(db_err)?;
                    let mut out = Vec::new();
                    while let Some(r) = rows.next().map_err(db_err)? {
                        match from_row(r) {
                            Ok(i) => out.push(i),
                            Err(e) => {
                                let id = r.get::<_, String>(0).unwrap_or_default();
                                reports.skipped(KIND, &id, &e);
                            }
                        }
                    }
                    Ok(out)
                })
                .await
        }

        fn on_unreadable(&self, listener: architectlm_core::store::UnreadableListener) {
            self.reports.add(listener);
        }
    }
}

#[cfg(feature = "postgres")]
pub use pg_impl::{PG_MIGRATIONS, PgProcessStore};

#[cfg(feature = "postgres")]
mod pg_impl {
    use std::fmt;

    use super::*;
    use crate::migration::Migration;
    use crate::postgres::{PgDb, pg_err};

    /// The PostgreSQL tables of [`PgProcessStore`] (component `process`).
    pub static PG_MIGRATIONS: &[Migration] = &[Migration {
        component: "process",
        version: 1,
        description: "process instances",
        sql: "CREATE TABLE architectlm_process_instances (
                id UUID PRIMARY KEY,
                process_id TEXT NOT NULL,
                state TEXT NOT NULL,
                context JSONB NOT NULL,
                version BIGINT NOT NULL,
                created_at TIMESTAMPTZ NOT NULL,
                updated_at TIMESTAMPTZ NOT NULL,
                last_action JSONB
            );
            CREATE INDEX architectlm_process_instances_by_process
                ON architectlm_process_instances (process_id, created_at, id);
            CREATE INDEX architectlm_process_instances_by_state
                ON architectlm_process_instances (state, created_at, id);",
    }];

    /// Process instances in PostgreSQL, shared by every node pointing at the same database
    /// (and schema).
    ///
    /// `Send + Sync`, cheap to clone. Each call is one statement on a pooled connection (two
    /// when a write is refused, to report the stored version). Two nodes updating the same
    /// instance from the same version: exactly one succeeds, the other gets
    /// [`Error::Conflict`] and should reload the instance and decide again.
    ///
    /// ```no_run
    /// use std::sync::Arc;
    /// use architectlm_core::store::ProcessStore;
    /// use architectlm_store::postgres::{PgDb, PgOptions};
    /// use architectlm_store::process::PgProcessStore;
    ///
    /// # async fn demo() -> architectlm_store::Result<()> {
    /// let db = PgDb::connect(PgOptions::new("postgres://postgres@127.0.0.1:5432/test")).await?;
    /// let store: Arc<dyn ProcessStore> = Arc::new(PgProcessStore::open(db).await?);
    /// // Runtime::builder(system).process_store(store).start().await?;
    /// # Ok(()) }
    /// ```
    #[derive(Clone)]
    pub struct PgProcessStore {
        db: PgDb,
        reports: Reports,
    }

    impl fmt::Debug for PgProcessStore {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("PgProcessStore")
                .field("db", &self.db)
                .finish()
        }
    }

    const COLUMNS: &str =
        "id, process_id, state, context, version, created_at, updated_at, last_action";

    fn from_row(r: &tokio_postgres::Row) -> Result<ProcessInstance> {
        let bad = |e| pg_err("bad architectlm_process_instances row", e);
        let id: Uuid = r.try_get(0).map_err(bad)?;
        let last_action: Option<serde_json::Value> = r.try_get(7).map_err(bad)?;
        Parts {
            id,
            process_id: r.try_get(1).map_err(bad)?,
            state: r.try_get(2).map_err(bad)?,
            context: r.try_get(3).map_err(bad)?,
            version: version_from_db(&id.to_string(), r.try_get(4).map_err(bad)?)?,
            created_at: r.try_get(5).map_err(bad)?,
            updated_at: r.try_get(6).map_err(bad)?,
            last_action,
        }
        .build()
    }

    impl PgProcessStore {
        /// A store on `db`, creating its tables if needed (safe when nodes start together).
        pub async fn open(db: PgDb) -> Result<Self> {
            db.migrate(PG_MIGRATIONS).await?;
            Ok(Self {
                db,
                reports: Reports::default(),
            })
        }

        /// The database it uses.
        pub fn db(&self) -> &PgDb {
            &self.db
        }

        async fn stored_version(
            &self,
            client: &tokio_postgres::Client,
            id: Uuid,
        ) -> Result<Option<u64>> {
            let row = client
                .query_opt(
                    "SELECT version FROM architectlm_process_instances WHERE id = $1",
                    &[&id],
                )
                .await
                .map_err(|e| pg_err(&format!("cannot read process instance {id}"), e))?;
            row.map(|r| {
                let v: i64 = r
                    .try_get(0)
                    .map_err(|e| pg_err("bad architectlm_process_instances row", e))?;
                version_from_db(&id.to_string(), v)
            })
            .transpose()
        }
    }

    #[async_trait]
    impl ProcessStore for PgProcessStore {
        async fn insert(&self, i: &ProcessInstance) -> Result<()> {
            let version = version_to_db(i.id, i.version)?;
            let last_action = i
                .last_action
                .as_ref()
                .map(serde_json::to_value)
                .transpose()?;
            let client = self.db.client().await?;
            let stmt = client
                .prepare_cached(
                    "INSERT INTO architectlm_process_instances (id, process_id, state, context, version, created_at, updated_at, last_action)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO NOTHING",
                )
                .await
                .map_err(|e| pg_err("cannot prepare the instance insert", e))?;
            let n = client
                .execute(
                    &stmt,
                    &[
                        &i.id,
                        &&*i.process_id,
                        &&*i.state,
                        &i.context,
                        &version,
                        &i.created_at,
                        &i.updated_at,
                        &last_action,
                    ],
                )
                .await
                .map_err(|e| pg_err(&format!("cannot insert process instance {}", i.id), e))?;
            if n == 1 {
                return Ok(());
            }
            Err(Error::Conflict {
                kind: KIND,
                id: i.id.to_string(),
                expected: 0,
                actual: self.stored_version(&client, i.id).await?.unwrap_or(0),
            })
        }

        async fn get(&self, id: Uuid) -> Result<Option<ProcessInstance>> {
            let client = self.db.client().await?;
            let stmt = client
                .prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM architectlm_process_instances WHERE id = $1"
                ))
                .await
                .map_err(|e| pg_err("cannot prepare the instance read", e))?;
            client
                .query_opt(&stmt, &[&id])
                .await
                .map_err(|e| pg_err(&format!("cannot read process instance {id}"), e))?
                .as_ref()
                .map(from_row)
                .transpose()
                .map_err(|e| unreadable(KIND, id, e))
        }

        async fn update(&self, i: &ProcessInstance, expected_version: u64) -> Result<()> {
            let version = version_to_db(i.id, i.version)?;
            let expected = version_to_db(i.id, expected_version)?;
            let last_action = i
                .last_action
                .as_ref()
                .map(serde_json::to_value)
                .transpose()?;
            let client = self.db.client().await?;
            let stmt = client
                .prepare_cached(
                    "UPDATE architectlm_process_instances
                     SET process_id = $2, state = $3, context = $4, version = $5,
                         created_at = $6, updated_at = $7, last_action = $8
                     WHERE id = $1 AND version = $9",
                )
                .await
                .map_err(|e| pg_err("cannot prepare the instance update", e))?;
            let n = client
                .execute(
                    &stmt,
                    &[
                        &i.id,
                        &&*i.process_id,
                        &&*i.state,
                        &i.context,
                        &version,
                        &i.created_at,
                        &i.updated_at,
                        &last_action,
                        &expected,
                    ],
                )
                .await
                .map_err(|e| pg_err(&format!("cannot update process instance {}", i.id), e))?;
            if n == 1 {
                return Ok(());
            }
            match self.stored_version(&client, i.id).await? {
                None => Err(Error::not_found(KIND, i.id)),
                Some(actual) => Err(Error::Conflict {
                    kind: KIND,
                    id: i.id.to_string(),
                    expected: expected_version,
                    actual,
                }),
            }
        }

        async fn list(&self, query: &ProcessQuery) -> Result<Vec<ProcessInstance>> {
            let client = self.db.client().await?;
            let stmt = client
                .prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM architectlm_process_instances
                     WHERE ($1::text IS NULL OR process_id = $1) AND ($2::text IS NULL OR state = $2)
                     ORDER BY created_at, id"
                ))
                .await
                .map_err(|e| pg_err("cannot prepare the instance list", e))?;
            let rows = client
                .query(&stmt, &[&query.process_id, &query.state])
                .await
                .map_err(|e| pg_err("cannot list process instances", e))?;
            Ok(self.reports.keep(KIND, &rows, |r| {
                let id = r
                    .try_get::<_, Uuid>(0)
                    .map(|id| id.to_string())
                    .unwrap_or_default();
                (id, from_row(r))
            }))
        }

        fn on_unreadable(&self, listener: architectlm_core::store::UnreadableListener) {
            self.reports.add(listener);
        }
    }
}
