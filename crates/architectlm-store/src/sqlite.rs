//! The embedded SQLite backend: one writer thread with group commit, a pool of readers, and
//! versioned migrations.
//!
//! # Write path
//! [`SqliteDb::write`] hands a closure to the writer thread. The thread takes every closure that
//! is queued, runs each inside a `SAVEPOINT` of one transaction (so one failing closure rolls
//! back only its own changes), commits once, and only then answers the callers. Under load many
//! writes share one flush; an idle writer commits a single write at once. A caller that gets
//! `Ok` knows its change is durable at the configured [`Synchronous`] level.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use parking_lot::Mutex;
use rusqlite::{Connection, OpenFlags, Transaction};
use tokio::sync::oneshot;

use crate::{Error, Result};

pub use rusqlite;

/// SQLite's `synchronous` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Synchronous {
    /// Survives a crash of the process; may lose the last commits on power loss (WAL default).
    #[default]
    Normal,
    /// Survives power loss: every commit is flushed to the device. Group commit keeps the
    /// cost moderate: the saga benchmark runs both levels side by side (`docs/benchmarks.md`,
    /// "SQLite FULL" row; about 0.7× NORMAL's sagas/s on this project's 2-core machine).
    Full,
}

/// Where and how to open a database.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SqliteOptions {
    /// The file; `None` for a private in-memory database.
    pub path: Option<PathBuf>,
    /// Flush level.
    pub synchronous: Synchronous,
    /// Reader connections (at least 1).
    pub readers: usize,
    /// How long a connection waits for a lock before failing.
    pub busy_timeout: Duration,
}

impl SqliteOptions {
    /// A database in `path` (created if missing).
    pub fn file(path: impl AsRef<Path>) -> Self {
        Self {
            path: Some(path.as_ref().to_path_buf()),
            synchronous: Synchronous::Normal,
            readers: 4,
            busy_timeout: Duration::from_secs(5),
        }
    }

    /// A private in-memory database (lost when the last handle is dropped).
    pub fn memory() -> Self {
        Self {
            path: None,
            ..Self::file("")
        }
    }

    /// Sets the flush level.
    pub fn synchronous(mut self, s: Synchronous) -> Self {
        self.synchronous = s;
        self
    }
}

/// The backend-neutral migration type, re-exported here where it was first defined.
pub use crate::migration::Migration;

type Completion = Box<dyn FnOnce(&std::result::Result<(), String>) + Send>;
type Job = Box<dyn FnOnce(&Transaction<'_>) -> Completion + Send>;

/// Counters of the writer, for benchmarks and monitoring.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Transactions committed.
    pub commits: AtomicU64,
    /// Write closures run.
    pub writes: AtomicU64,
}

struct Shared {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    readers: Mutex<Vec<Connection>>,
    open_reader: Box<dyn Fn() -> rusqlite::Result<Connection> + Send + Sync>,
    stats: Arc<WriterStats>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    label: String,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Closing the channel lets the writer drain what is queued and exit.
        self.tx.lock().take();
        if let Some(h) = self.writer.lock().take() {
            let _ = h.join();
        }
    }
}

/// A handle to an embedded SQLite database. Cheap to clone; the writer stops when the last
/// handle is dropped, after committing what was queued.
#[derive(Clone)]
pub struct SqliteDb {
    shared: Arc<Shared>,
}

impl fmt::Debug for SqliteDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteDb")
            .field("database", &self.shared.label)
            .field(
                "commits",
                &self.shared.stats.commits.load(Ordering::Relaxed),
            )
            .finish()
    }
}

fn db_err(e: rusqlite::Error) -> Error {
    Error::storage(e)
}

/// Prepared statements each connection keeps. The writer serves every store on the database
/// (processes, leases, sagas, schedules) and runs savepoint statements for each closure; with
/// rusqlite's default of 16 they would evict one another and be parsed again.
const STATEMENT_CACHE: usize = 64;

fn configure(conn: &Connection, opts: &SqliteOptions, writer: bool) -> rusqlite::Result<()> {
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    conn.busy_timeout(opts.busy_timeout)?;
    if writer && opts.path.is_some() {
        conn.pragma_update(None, "journal_mode", "WAL")?;
    }
    let sync = match opts.synchronous {
        Synchronous::Normal => "NORMAL",
        Synchronous::Full => "FULL",
    };
    conn.pragma_update(None, "synchronous", sync)?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Savepoint journals and temporary tables stay in memory. By default a savepoint journal
    // spills to a temporary file once it passes 64 KiB, which a batch of write closures does
    // all the time: a file created, written and deleted per batch. Durability is unchanged:
    // these journals only serve rollbacks inside the open transaction.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(())
}

impl SqliteDb {
    /// Opens (or creates) a database and starts its writer thread.
    pub fn open(opts: SqliteOptions) -> Result<Self> {
        let (uri, flags, label) = match &opts.path {
            Some(p) => {
                if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| {
                        Error::storage_with(format!("cannot create directory {}", dir.display()), e)
                    })?;
                }
                (
                    p.to_string_lossy().into_owned(),
                    OpenFlags::SQLITE_OPEN_READ_WRITE
                        | OpenFlags::SQLITE_OPEN_CREATE
                        | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                    p.display().to_string(),
                )
            }
            None => {
                let name = format!(
                    "file:architectlm-{}?mode=memory&cache=shared",
                    uuid::Uuid::new_v4()
                );
                (
                    name,
                    OpenFlags::SQLITE_OPEN_READ_WRITE
                        | OpenFlags::SQLITE_OPEN_CREATE
                        | OpenFlags::SQLITE_OPEN_URI
                        | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                    ":memory:".to_owned(),
                )
            }
        };
        let writer = Connection::open_with_flags(&uri, flags)
            .map_err(|e| Error::storage_with(format!("cannot open SQLite database {label}"), e))?;
        configure(&writer, &opts, true).map_err(db_err)?;
        let stats = Arc::new(WriterStats::default());
        let (tx, rx) = mpsc::channel::<Job>();
        let thread_stats = stats.clone();
        let handle = std::thread::Builder::new()
            .name("architectlm-sqlite-writer".into())
            .spawn(move || writer_loop(writer, rx, thread_stats))
            .map_err(|e| Error::storage_with("cannot start the SQLite writer", e))?;
        let reader_opts = opts.clone();
        let open_reader = Box::new(move || {
            let c = Connection::open_with_flags(&uri, flags)?;
            configure(&c, &reader_opts, false)?;
            Ok(c)
        });
        Ok(Self {
            shared: Arc::new(Shared {
                tx: Mutex::new(Some(tx)),
                readers: Mutex::new(Vec::with_capacity(opts.readers.max(1))),
                open_reader,
                stats,
                writer: Mutex::new(Some(handle)),
                label,
            }),
        })
    }

    /// Writer counters: commits and writes, so flushes per unit of work can be measured.
    pub fn stats(&self) -> &WriterStats {
        &self.shared.stats
    }

    /// Runs `f` in the shared write transaction and returns its result once committed.
    pub async fn write<R, F>(&self, f: F) -> Result<R>
    where
        F: FnOnce(&Transaction<'_>) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let (reply, rx) = oneshot::channel::<Result<R>>();
        let job: Job = Box::new(move |txn: &Transaction<'_>| {
            let out = run_in_savepoint(txn, f);
            // The result is released only once the batch's commit outcome is known.
            Box::new(move |commit: &std::result::Result<(), String>| {
                let out = match commit {
                    Ok(()) => out,
                    Err(e) => Err(Error::storage(format!("commit failed: {e}"))),
                };
                let _ = reply.send(out);
            }) as Completion
        });
        {
            let tx = self.shared.tx.lock();
            let Some(tx) = tx.as_ref() else {
                return Err(Error::storage("the SQLite writer has stopped"));
            };
            tx.send(job)
                .map_err(|_| Error::storage("the SQLite writer has stopped"))?;
        }
        rx.await.unwrap_or_else(|_| {
            Err(Error::storage(
                "the SQLite writer stopped before committing",
            ))
        })
    }

    /// Runs `f` on a reader connection (on the blocking pool) and returns its result.
    pub async fn read<R, F>(&self, f: F) -> Result<R>
    where
        F: FnOnce(&Connection) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            let conn = match shared.readers.lock().pop() {
                Some(c) => c,
                None => (shared.open_reader)().map_err(db_err)?,
            };
            let out = f(&conn);
            shared.readers.lock().push(conn);
            out
        })
        .await
        .map_err(|e| Error::storage_with("reader task failed", e))?
    }

    /// Runs `f` on a reader connection on the current thread. For start-up and tests.
    pub fn read_blocking<R>(&self, f: impl FnOnce(&Connection) -> Result<R>) -> Result<R> {
        let conn = match self.shared.readers.lock().pop() {
            Some(c) => c,
            None => (self.shared.open_reader)().map_err(db_err)?,
        };
        let out = f(&conn);
        self.shared.readers.lock().push(conn);
        out
    }

    /// Applies the migrations of one or more components that are not applied yet, in version
    /// order, each in its own transaction. Safe to call again: applied versions are skipped.
    pub async fn migrate(&self, migrations: &'static [Migration]) -> Result<()> {
        self.write(move |txn| {
            txn.execute_batch(
                "CREATE TABLE IF NOT EXISTS architectlm_migrations (
                    component TEXT NOT NULL,
                    version INTEGER NOT NULL,
                    description TEXT NOT NULL,
                    applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),
                    PRIMARY KEY (component, version)
                )",
            )
            .map_err(db_err)?;
            for m in crate::migration::ordered(migrations) {
                let applied: bool = txn
                    .query_row(
                        "SELECT EXISTS(SELECT 1 FROM architectlm_migrations WHERE component = ?1 AND version = ?2)",
                        rusqlite::params![m.component, m.version],
                        |r| r.get(0),
                    )
                    .map_err(db_err)?;
                if applied {
                    continue;
                }
                txn.execute_batch(m.sql).map_err(|e| {
                    Error::storage(format!(
                        "migration {} v{} ({}) failed: {e}",
                        m.component, m.version, m.description
                    ))
                })?;
                txn.execute(
                    "INSERT INTO architectlm_migrations (component, version, description) VALUES (?1, ?2, ?3)",
                    rusqlite::params![m.component, m.version, m.description],
                )
                .map_err(db_err)?;
                tracing::info!(component = m.component, version = m.version, "migration applied");
            }
            Ok(())
        })
        .await
    }
}

fn run_in_savepoint<R>(
    txn: &Transaction<'_>,
    f: impl FnOnce(&Transaction<'_>) -> Result<R>,
) -> Result<R> {
    // Cached statements: a batch runs one savepoint per closure, and parsing these each time
    // cost more than running them.
    let exec = |sql: &str| -> Result<()> {
        txn.prepare_cached(sql)
            .and_then(|mut s| s.execute([]))
            .map(|_| ())
            .map_err(db_err)
    };
    exec("SAVEPOINT job")?;
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(txn)))
        .unwrap_or_else(|_| Err(Error::storage("a write closure panicked")));
    if out.is_err() {
        exec("ROLLBACK TO job")?;
    }
    exec("RELEASE job")?;
    out
}

/// Most closures one transaction takes; bounds the latency a batch adds to its first write.
const MAX_BATCH: usize = 512;

fn writer_loop(mut conn: Connection, rx: mpsc::Receiver<Job>, stats: Arc<WriterStats>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        let mut waiters: Vec<Completion> = Vec::with_capacity(batch.len());
        let outcome = (|| -> rusqlite::Result<()> {
            let txn = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            for job in batch.drain(..) {
                waiters.push(job(&txn));
            }
            txn.commit()
        })();
        // A failed BEGIN means no job ran: their reply channels were dropped with the jobs,
        // which callers see as an error.
        let reply = outcome.map_err(|e| e.to_string());
        if let Err(e) = &reply {
            tracing::error!(error = %e, "SQLite group commit failed");
        } else {
            stats.commits.fetch_add(1, Ordering::Relaxed);
            stats.writes.fetch_add(n, Ordering::Relaxed);
        }
        for w in waiters {
            w(&reply);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static MIGRATIONS: &[Migration] = &[
        Migration {
            component: "test",
            version: 1,
            description: "items",
            sql: "CREATE TABLE items (id INTEGER PRIMARY KEY, v TEXT NOT NULL)",
        },
        Migration {
            component: "test",
            version: 2,
            description: "items.n",
            sql: "ALTER TABLE items ADD COLUMN n INTEGER NOT NULL DEFAULT 0",
        },
    ];

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_share_commits_and_all_persist() {
        let dir = std::env::temp_dir().join(format!("alm-store-{}", uuid::Uuid::new_v4()));
        let db = SqliteDb::open(SqliteOptions::file(dir.join("db.sqlite"))).unwrap();
        db.migrate(MIGRATIONS).await.unwrap();
        db.migrate(MIGRATIONS).await.unwrap();
        let mut handles = vec![];
        for i in 0..200 {
            let db = db.clone();
            handles.push(tokio::spawn(async move {
                db.write(move |t| {
                    t.execute("INSERT INTO items (id, v) VALUES (?1, 'x')", [i])
                        .map_err(db_err)
                })
                .await
            }));
        }
        for h in handles {
            h.await.unwrap().unwrap();
        }
        let n: i64 = db
            .read(|c| {
                c.query_row("SELECT COUNT(*) FROM items", [], |r| r.get(0))
                    .map_err(db_err)
            })
            .await
            .unwrap();
        assert_eq!(n, 200);
        let commits = db.stats().commits.load(Ordering::Relaxed);
        assert!(commits < 200, "expected shared commits, got {commits}");
        drop(db);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_failing_write_rolls_back_alone() {
        let db = SqliteDb::open(SqliteOptions::memory()).unwrap();
        db.migrate(MIGRATIONS).await.unwrap();
        let ok = db.write(|t| {
            t.execute("INSERT INTO items (id, v) VALUES (1, 'a')", [])
                .map_err(db_err)
        });
        let bad = db.write(|t| {
            t.execute("INSERT INTO items (id, v) VALUES (2, 'b')", [])
                .map_err(db_err)?;
            Err::<(), _>(Error::storage("business rule"))
        });
        let (a, b) = tokio::join!(ok, bad);
        a.unwrap();
        assert!(b.unwrap_err().to_string().contains("business rule"));
        let ids: Vec<i64> = db
            .read(|c| {
                let mut s = c
                    .prepare("SELECT id FROM items ORDER BY id")
                    .map_err(db_err)?;
                let rows = s.query_map([], |r| r.get(0)).map_err(db_err)?;
                rows.collect::<rusqlite::Result<Vec<i64>>>().map_err(db_err)
            })
            .await
            .unwrap();
        assert_eq!(ids, vec![1]);
    }
}
