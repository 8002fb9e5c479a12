//! The PostgreSQL backend: a connection pool, an optional schema, versioned migrations that
//! several nodes may run at once, and a helper to claim work rows with `FOR UPDATE SKIP LOCKED`.
//!
//! PostgreSQL is what lets several nodes share one store: every coordination rule (optimistic
//! versions, leases with fencing tokens, row claims) is a single SQL statement or transaction, so
//! there is no consensus protocol of our own. See `docs/multi-node.md`.
//!
//! # Connections
//! [`PgDb`] holds a [`deadpool_postgres`] pool of [`tokio_postgres`] connections (no TLS). It is
//! `Send + Sync` and cheap to clone; clones share the pool. A connection waits for a free slot at
//! most [`PgOptions::connect_timeout`], then fails with a storage error rather than hanging.
//!
//! # Schema
//! With [`PgOptions::schema`], every connection sets `search_path` to that schema and
//! [`PgDb::connect`] creates it if missing. Several applications (or tests) can share a database
//! this way, each in its own schema.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use crate::migration::{self, Migration};
use crate::{Error, Result};

pub use deadpool_postgres;
pub use tokio_postgres;

/// A pooled connection: derefs to [`tokio_postgres::Client`], goes back to the pool on drop.
pub type PgClient = deadpool_postgres::Object;

/// How to reach the database and how large the pool is.
///
/// ```
/// use std::time::Duration;
/// use architectlm_store::postgres::PgOptions;
///
/// let opts = PgOptions::new("postgres://postgres@127.0.0.1:5432/test")
///     .schema("billing")
///     .pool_size(32)
///     .connect_timeout(Duration::from_secs(5));
/// assert_eq!(opts.schema.as_deref(), Some("billing"));
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct PgOptions {
    /// A libpq-style URL (`postgres://user:password@host:port/database?...`) or key=value string.
    pub url: String,
    /// The schema holding the tables (created if missing); `None` uses the server's default
    /// `search_path` (normally `public`). Letters, digits and `_`, not starting with a digit.
    pub schema: Option<String>,
    /// Most connections open at once (at least 1). Default 16.
    pub pool_size: usize,
    /// Longest wait to open a connection or to get one from a full pool. Default 10 s.
    pub connect_timeout: Duration,
    /// `application_name` shown in `pg_stat_activity`. Default `architectlm`.
    pub application_name: String,
}

impl fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgOptions")
            .field("url", &redact(&self.url))
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("application_name", &self.application_name)
            .finish()
    }
}

impl PgOptions {
    /// Options for the database at `url`, with the defaults.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            schema: None,
            pool_size: 16,
            connect_timeout: Duration::from_secs(10),
            application_name: "architectlm".to_owned(),
        }
    }

    /// Puts the tables in `schema`.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }

    /// Sets the largest number of connections.
    pub fn pool_size(mut self, n: usize) -> Self {
        self.pool_size = n;
        self
    }

    /// Sets how long to wait for a connection.
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// Sets the `application_name` of the connections.
    pub fn application_name(mut self, name: impl Into<String>) -> Self {
        self.application_name = name.into();
        self
    }
}

/// Hides the password of a URL so that options can be logged.
fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end + 3],
            &rest[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

fn valid_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 63
}

/// A schema this library may create: an identifier not starting with `pg_`, which PostgreSQL
/// reserves for itself (it refuses `CREATE SCHEMA pg_…`).
fn valid_schema(s: &str) -> bool {
    valid_identifier(s) && !s.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("pg_"))
}

/// `host:port` of each configured host, comma-separated, as a user writes them.
fn hosts_label(cfg: &tokio_postgres::Config) -> String {
    let ports = cfg.get_ports();
    cfg.get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let host = match h {
                tokio_postgres::config::Host::Tcp(h) => h.clone(),
                #[cfg(unix)]
                tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
            };
            match ports.get(i).or(ports.first()) {
                Some(port) => format!("{host}:{port}"),
                None => host,
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Turns a driver error into a storage error whose message carries the server's own words
/// (message, detail and SQLSTATE), not just "db error".
pub(crate) fn pg_err(context: &str, e: tokio_postgres::Error) -> Error {
    match e.as_db_error() {
        Some(db) => {
            let detail = db.detail().map(|d| format!(" ({d})")).unwrap_or_default();
            Error::storage(format!(
                "{context}: {}{detail} [SQLSTATE {}]",
                db.message(),
                db.code().code()
            ))
        }
        None => Error::storage_with(context, e),
    }
}

/// A 64-bit FNV-1a hash, stable across builds and machines, so that every node derives the
/// same advisory-lock key from the same name.
pub(crate) fn lock_key(name: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    i64::from_ne_bytes(h.to_ne_bytes())
}

struct Inner {
    pool: Pool,
    schema: Option<String>,
    label: String,
}

/// A handle to a PostgreSQL database: a pool of connections and the schema they use.
///
/// `Send + Sync`, cheap to clone (clones share the pool). Dropping the last handle closes the
/// idle connections; connections in use close when their [`PgClient`] is dropped.
///
/// ```no_run
/// use architectlm_store::postgres::{PgDb, PgOptions};
/// use architectlm_store::migration::Migration;
///
/// static ITEMS: &[Migration] = &[Migration {
///     component: "items",
///     version: 1,
///     description: "items table",
///     sql: "CREATE TABLE items (id BIGINT PRIMARY KEY, v TEXT NOT NULL)",
/// }];
///
/// # async fn demo() -> architectlm_store::Result<()> {
/// let db = PgDb::connect(PgOptions::new("postgres://postgres@127.0.0.1:5432/test").schema("shop")).await?;
/// db.migrate(ITEMS).await?; // safe when several nodes start at once
/// let client = db.client().await?;
/// client.execute("INSERT INTO items (id, v) VALUES (1, 'a')", &[]).await.ok();
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PgDb {
    inner: Arc<Inner>,
}

impl fmt::Debug for PgDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = self.inner.pool.status();
        f.debug_struct("PgDb")
            .field("database", &self.inner.label)
            .field("schema", &self.inner.schema)
            .field("connections", &status.size)
            .field("idle", &status.available)
            .finish()
    }
}

impl PgDb {
    /// Builds the pool, checks that the server answers, and creates the schema if one is set
    /// and missing (under an advisory lock, so nodes starting together do not race).
    ///
    /// Fails with [`Error::InvalidConfig`] naming the field for a bad URL, schema or pool size,
    /// and with [`Error::Storage`] if the server cannot be reached within the connect timeout.
    pub async fn connect(opts: PgOptions) -> Result<Self> {
        if opts.pool_size == 0 {
            return Err(Error::invalid_config(
                "pool_size",
                0,
                "the pool needs at least one connection",
            ));
        }
        if let Some(s) = opts.schema.as_deref().filter(|s| !valid_schema(s)) {
            return Err(Error::invalid_config(
                "schema",
                format!("{s:?}"),
                "use letters, digits and '_' (at most 63, not starting with a digit, not \
                 starting with \"pg_\", which PostgreSQL reserves)",
            ));
        }
        let mut cfg: tokio_postgres::Config = opts.url.parse().map_err(|e| {
            Error::invalid_config(
                "url",
                redact(&opts.url),
                format!("not a PostgreSQL URL: {e}"),
            )
        })?;
        cfg.application_name(&opts.application_name);
        cfg.connect_timeout(opts.connect_timeout);
        if let Some(schema) = &opts.schema {
            let path = format!("-c search_path={schema}");
            let options = match cfg.get_options() {
                Some(o) if !o.is_empty() => format!("{o} {path}"),
                _ => path,
            };
            cfg.options(options);
        }
        let label = format!(
            "{}/{}",
            hosts_label(&cfg),
            cfg.get_dbname().unwrap_or("(default)")
        );
        let manager = Manager::from_config(
            cfg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(opts.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(opts.connect_timeout))
            .create_timeout(Some(opts.connect_timeout))
            .build()
            .map_err(|e| Error::storage_with("cannot build the PostgreSQL pool", e))?;
        let db = Self {
            inner: Arc::new(Inner {
                pool,
                schema: opts.schema.clone(),
                label,
            }),
        };
        let mut client = db.client().await?;
        if let Some(schema) = &opts.schema {
            let txn = client
                .transaction()
                .await
                .map_err(|e| pg_err("cannot begin a transaction", e))?;
            txn.execute(
                "SELECT pg_advisory_xact_lock($1)",
                &[&lock_key(&format!("architectlm:schema:{schema}"))],
            )
            .await
            .map_err(|e| pg_err("cannot take the schema lock", e))?;
            txn.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
                .await
                .map_err(|e| pg_err(&format!("cannot create schema {schema:?}"), e))?;
            txn.commit()
                .await
                .map_err(|e| pg_err(&format!("cannot create schema {schema:?}"), e))?;
        }
        Ok(db)
    }

    /// Connects to `url` with the default options.
    pub async fn connect_url(url: impl Into<String>) -> Result<Self> {
        Self::connect(PgOptions::new(url)).await
    }

    /// The schema the tables live in, if one was set.
    pub fn schema(&self) -> Option<&str> {
        self.inner.schema.as_deref()
    }

    /// Takes a connection from the pool (opening one if needed), waiting at most the connect
    /// timeout. The connection returns to the pool when dropped.
    pub async fn client(&self) -> Result<PgClient> {
        self.inner.pool.get().await.map_err(|e| {
            Error::storage_with(
                format!("cannot get a PostgreSQL connection to {}", self.inner.label),
                e,
            )
        })
    }

    /// Connections open and idle now, for monitoring.
    pub fn pool_status(&self) -> (usize, usize) {
        let s = self.inner.pool.status();
        (s.size, s.available)
    }

    fn migration_lock(&self) -> i64 {
        lock_key(&format!(
            "architectlm:migrate:{}",
            self.inner.schema.as_deref().unwrap_or("")
        ))
    }

    /// Applies the migrations that are not applied yet, in (component, version) order, in one
    /// transaction that holds a transaction-level advisory lock.
    ///
    /// # Concurrency
    /// Any number of nodes may call this at once: the lock makes them take turns, and each
    /// applies only what the ones before it did not, so every version runs exactly once. The
    /// lock is released when the transaction ends, even if the connection dies. PostgreSQL DDL
    /// is transactional, so a failing migration leaves nothing half-applied; the error names
    /// the component, version and the server's message.
    pub async fn migrate(&self, migrations: &[Migration]) -> Result<()> {
        let mut client = self.client().await?;
        let txn = client
            .transaction()
            .await
            .map_err(|e| pg_err("cannot begin the migration transaction", e))?;
        txn.execute(
            "SELECT pg_advisory_xact_lock($1)",
            &[&self.migration_lock()],
        )
        .await
        .map_err(|e| pg_err("cannot take the migration lock", e))?;
        txn.batch_execute(
            "CREATE TABLE IF NOT EXISTS architectlm_migrations (
                component TEXT NOT NULL,
                version INTEGER NOT NULL,
                description TEXT NOT NULL,
                applied_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                PRIMARY KEY (component, version)
            )",
        )
        .await
        .map_err(|e| pg_err("cannot create architectlm_migrations", e))?;
        let applied: HashSet<(String, i32)> = txn
            .query("SELECT component, version FROM architectlm_migrations", &[])
            .await
            .map_err(|e| pg_err("cannot read architectlm_migrations", e))?
            .iter()
            .map(|r| -> Result<(String, i32)> {
                Ok((
                    r.try_get(0)
                        .map_err(|e| pg_err("bad architectlm_migrations row", e))?,
                    r.try_get(1)
                        .map_err(|e| pg_err("bad architectlm_migrations row", e))?,
                ))
            })
            .collect::<Result<_>>()?;
        for m in migration::ordered(migrations) {
            let version = i32::try_from(m.version).map_err(|_| {
                Error::invalid_config(
                    format!("migration {}.version", m.component),
                    m.version,
                    "must fit in a 32-bit signed integer",
                )
            })?;
            if applied.contains(&(m.component.to_owned(), version)) {
                continue;
            }
            txn.batch_execute(m.sql).await.map_err(|e| {
                pg_err(
                    &format!(
                        "migration {} v{} ({}) failed",
                        m.component, m.version, m.description
                    ),
                    e,
                )
            })?;
            txn.execute(
                "INSERT INTO architectlm_migrations (component, version, description) VALUES ($1, $2, $3)",
                &[&m.component, &version, &m.description],
            )
            .await
            .map_err(|e| pg_err("cannot record a migration", e))?;
            tracing::info!(
                component = m.component,
                version = m.version,
                "migration applied"
            );
        }
        txn.commit()
            .await
            .map_err(|e| pg_err("cannot commit the migrations", e))
    }

    /// Claims up to `limit` ready rows of a work table for `owner` for `lease`, skipping rows
    /// other nodes hold locked right now (`FOR UPDATE SKIP LOCKED`), and returns them.
    ///
    /// A row is claimable when the spec's `ready` condition holds and it is unclaimed or its
    /// claim expired (by the server clock). Claiming sets the owner and claim-expiry columns in
    /// the same statement, so two nodes never get the same row while a claim is live, and a
    /// node that dies leaves rows that become claimable again once their claim expires.
    ///
    /// Finish the work with a statement that checks the claim, e.g.
    /// `UPDATE jobs SET done = true WHERE id = $1 AND claimed_by = $2`; if it updates no row,
    /// the claim expired and somebody else took the row, so this node's result must be dropped.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use architectlm_store::postgres::{ClaimSpec, PgDb};
    ///
    /// static JOBS: ClaimSpec = ClaimSpec::new("jobs", "id").ready("done = false").order_by("id");
    ///
    /// # async fn demo(db: PgDb) -> architectlm_store::Result<()> {
    /// for row in db.claim(&JOBS, "node-a", Duration::from_secs(30), 100).await? {
    ///     let id: i64 = row.get("id");
    ///     let client = db.client().await?;
    ///     client
    ///         .execute("UPDATE jobs SET done = true WHERE id = $1 AND claimed_by = $2", &[&id, &"node-a"])
    ///         .await
    ///         .ok();
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn claim(
        &self,
        spec: &ClaimSpec,
        owner: &str,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<tokio_postgres::Row>> {
        spec.validate()?;
        let limit =
            i64::try_from(limit).map_err(|_| Error::invalid_config("limit", limit, "too large"))?;
        let client = self.client().await?;
        let sql = spec.sql();
        let stmt = client
            .prepare_cached(&sql)
            .await
            .map_err(|e| pg_err(&format!("cannot prepare the claim on {}", spec.table), e))?;
        client
            .query(&stmt, &[&owner, &lease.as_secs_f64(), &limit])
            .await
            .map_err(|e| pg_err(&format!("cannot claim rows of {}", spec.table), e))
    }
}

/// Which rows of a work table [`PgDb::claim`] takes and which columns record the claim.
///
/// Table and column names are checked to be plain identifiers; `ready` and `order_by` are SQL
/// fragments written by the programmer (they are `&'static str` so that they cannot come from
/// user input by accident).
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct ClaimSpec {
    /// The table.
    pub table: &'static str,
    /// Its primary key column.
    pub key: &'static str,
    /// A nullable text column holding the claiming owner. Default `claimed_by`.
    pub owner_column: &'static str,
    /// A nullable `timestamptz` column holding when the claim expires. Default `claimed_until`.
    pub until_column: &'static str,
    /// An SQL condition a row must meet to be claimed (e.g. `due_at <= now() AND NOT done`).
    /// Default `TRUE`.
    pub ready: &'static str,
    /// The SQL `ORDER BY` list that decides which rows go first. Default: the key.
    pub order_by: &'static str,
}

impl ClaimSpec {
    /// Claims on `table`, identified by `key`, with the default columns.
    pub const fn new(table: &'static str, key: &'static str) -> Self {
        Self {
            table,
            key,
            owner_column: "claimed_by",
            until_column: "claimed_until",
            ready: "TRUE",
            order_by: key,
        }
    }

    /// Sets the condition a row must meet.
    pub const fn ready(mut self, condition: &'static str) -> Self {
        self.ready = condition;
        self
    }

    /// Sets the order in which rows are claimed.
    pub const fn order_by(mut self, order: &'static str) -> Self {
        self.order_by = order;
        self
    }

    /// Sets the columns recording the owner and the claim expiry.
    pub const fn columns(mut self, owner: &'static str, until: &'static str) -> Self {
        self.owner_column = owner;
        self.until_column = until;
        self
    }

    fn validate(&self) -> Result<()> {
        for (field, value) in [
            ("table", self.table),
            ("key", self.key),
            ("owner_column", self.owner_column),
            ("until_column", self.until_column),
        ] {
            let ok = value.split('.').all(valid_identifier) && !value.is_empty();
            if !ok {
                return Err(Error::invalid_config(
                    format!("ClaimSpec.{field}"),
                    format!("{value:?}"),
                    "must be a plain (optionally schema-qualified) identifier",
                ));
            }
        }
        Ok(())
    }

    fn sql(&self) -> String {
        let Self {
            table,
            key,
            owner_column: owner,
            until_column: until,
            ready,
            order_by,
        } = self;
        format!(
            "UPDATE {table} AS claimed SET {owner} = $1, \
             {until} = clock_timestamp() + make_interval(secs => $2::float8) \
             FROM (SELECT {key} FROM {table} \
                   WHERE ({ready}) AND ({owner} IS NULL OR {until} < clock_timestamp()) \
                   ORDER BY {order_by} LIMIT $3 FOR UPDATE SKIP LOCKED) AS ready \
             WHERE claimed.{key} = ready.{key} RETURNING claimed.*"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_only_the_password() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db?x=1"),
            "postgres://u:***@h:5432/db?x=1"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("host=h user=u"), "host=h user=u");
    }

    #[test]
    fn lock_keys_are_stable_and_distinct() {
        assert_eq!(lock_key("a"), lock_key("a"));
        assert_ne!(
            lock_key("architectlm:migrate:a"),
            lock_key("architectlm:migrate:b")
        );
        // FNV-1a of the empty string is the offset basis.
        assert_eq!(lock_key(""), 0xcbf2_9ce4_8422_2325_u64 as i64);
    }

    #[test]
    fn identifiers_are_checked() {
        assert!(valid_identifier("t_0a"));
        assert!(!valid_identifier("0a"));
        assert!(!valid_identifier("a;drop"));
        assert!(!valid_identifier(""));
        assert!(valid_identifier("pg_x"), "a column may be named pg_…");
        assert!(!valid_schema("pg_temp_app") && !valid_schema("PG_x") && valid_schema("app_pg"));
        let bad = ClaimSpec::new("jobs; --", "id").validate().unwrap_err();
        assert!(bad.to_string().contains("jobs; --"), "{bad}");
        assert!(ClaimSpec::new("s.jobs", "id").validate().is_ok());
    }

    #[tokio::test]
    async fn bad_options_name_the_field_and_value() {
        let e = PgDb::connect(PgOptions::new("postgres://x@127.0.0.1/db").schema("a-b"))
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("schema") && e.to_string().contains("a-b"),
            "{e}"
        );
        let e = PgDb::connect(PgOptions::new("postgres://x@127.0.0.1/db").pool_size(0))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("pool_size"), "{e}");
        let e = PgDb::connect(PgOptions::new("postgres://u:pw@h:notaport/db"))
            .await
            .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("url") && !msg.contains("pw@"), "{msg}");
    }
}
