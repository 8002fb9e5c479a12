//! Named leases with fencing tokens: how several nodes agree on who owns a piece of work (a
//! saga, a schedule partition, a singleton job) without a consensus protocol of their own.
//!
//! # Model
//! A lease has a `name`, an `owner` (a string that must be unique per running process, e.g.
//! `"node-3/0190c1e2-..."`), an expiry and a **fencing token**. The token is a per-name counter
//! that grows every time the lease passes to a different owner (or is taken again after a
//! release), and never goes back.
//!
//! - [`LeaseStore::acquire`] takes a lease that is free, released or expired; if the caller
//!   already holds it, it just extends it (same token). While another owner holds an unexpired
//!   lease, it returns `None`.
//! - [`LeaseStore::renew`] extends a lease the caller still holds. It fails with
//!   [`Error::Conflict`] once another owner has taken it over, even if the caller's expiry has not
//!   passed on its own clock.
//! - [`LeaseStore::release`] gives it up so that another node can take it at once.
//!
//! # Fencing
//! An owner can be paused (GC, a stalled VM, a network partition) past its expiry while another
//! node takes over. Checking "am I still the owner?" before writing is not enough, because the
//! takeover can happen between the check and the write. A *fenced write* checks the token in
//! the same transaction as the write and holds a lock on the lease row until commit, so a write
//! either commits before a takeover or is rejected after it: [`PgLeaseStore::fence`] and
//! [`SqliteLeaseStore::fence`]. Writes with a stale token fail with [`Error::Conflict`]
//! (kind `lease`, `expected` = the caller's token, `actual` = the current one).
//!
//! # Time
//! Expiry is judged by one clock for all nodes: PostgreSQL's server clock for
//! [`PgLeaseStore`] (so node clocks may drift), this machine's clock for [`SqliteLeaseStore`].
//! Tests can inject a [`ManualClock`] through [`LeaseClock::Manual`].
//!
//! # Stores
//! [`PgLeaseStore`] (feature `postgres`) for several nodes, [`SqliteLeaseStore`] (feature
//! `sqlite`) for one machine, [`InMemoryLeaseStore`] for one process and for tests.
//! [`LeaseKeeper`] renews a lease in the background on any of them and reports its loss.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use parking_lot::Mutex;

#[cfg(any(feature = "sqlite", feature = "postgres"))]
use crate::Error;
use crate::Result;

/// A lease held by an owner, as returned by [`LeaseStore::acquire`] and [`LeaseStore::renew`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Lease {
    /// What is leased.
    pub name: String,
    /// Who holds it.
    pub owner: String,
    /// The fencing token: grows each time the lease changes hands, never decreases.
    pub token: u64,
    /// When it expires unless renewed (by the store's clock).
    pub expires_at: DateTime<Utc>,
}

impl Lease {
    /// A lease value, e.g. rebuilt from an owner and token kept elsewhere. Holding a `Lease`
    /// grants nothing by itself: stores and fences check it against the stored token.
    pub fn new(
        name: impl Into<String>,
        owner: impl Into<String>,
        token: u64,
        expires_at: DateTime<Utc>,
    ) -> Self {
        Self {
            name: name.into(),
            owner: owner.into(),
            token,
            expires_at,
        }
    }

    /// Whether the lease has expired at `now`.
    pub fn is_expired_at(&self, now: DateTime<Utc>) -> bool {
        self.expires_at <= now
    }
}

/// Storage of named leases shared by the nodes of a cluster.
///
/// # Rules
/// - `Send + Sync`; every method may be called concurrently, from any node.
/// - At any instant (by the store's clock) at most one owner holds an unexpired lease of a name.
/// - Tokens of a name strictly increase with each change of owner; an owner that re-acquires or
///   renews keeps its token.
/// - `ttl` must be positive; a zero `ttl` is rejected with [`crate::Error::InvalidConfig`].
///
/// ```
/// use std::time::Duration;
/// use architectlm_store::lease::{LeaseStore, SqliteLeaseStore};
/// use architectlm_store::sqlite::{SqliteDb, SqliteOptions};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let leases = SqliteLeaseStore::open(SqliteDb::open(SqliteOptions::memory())?).await?;
/// let mine = leases.acquire("billing-sweeper", "node-a", Duration::from_secs(10)).await?.unwrap();
/// // Another node cannot take it while it is live.
/// assert!(leases.acquire("billing-sweeper", "node-b", Duration::from_secs(10)).await?.is_none());
/// let mine = leases.renew(&mine, Duration::from_secs(10)).await?;
/// assert!(leases.release(&mine).await?);
/// # Ok::<(), architectlm_store::Error>(()) }).unwrap();
/// ```
#[async_trait]
pub trait LeaseStore: Send + Sync + fmt::Debug + 'static {
    /// Takes `name` for `owner` for `ttl` if it is free, released, expired or already held by
    /// `owner`; `None` while another owner holds it.
    async fn acquire(&self, name: &str, owner: &str, ttl: Duration) -> Result<Option<Lease>>;
    /// Extends a lease the caller holds by `ttl` from now. [`crate::Error::Conflict`] if it was
    /// taken over or released meanwhile.
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease>;
    /// Gives the lease up; `false` if the caller no longer held it.
    async fn release(&self, lease: &Lease) -> Result<bool>;
    /// The current holder of `name` (possibly expired), `None` if free or released.
    async fn get(&self, name: &str) -> Result<Option<Lease>>;
}

/// A clock that only moves when told to, for tests of expiry and takeover.
///
/// ```
/// use std::time::Duration;
/// use architectlm_store::lease::ManualClock;
///
/// let clock = ManualClock::new(chrono::Utc::now());
/// let before = clock.now();
/// clock.advance(Duration::from_secs(5));
/// assert_eq!((clock.now() - before).num_seconds(), 5);
/// ```
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Mutex<DateTime<Utc>>>);

impl ManualClock {
    /// A clock showing `start`.
    pub fn new(start: DateTime<Utc>) -> Self {
        Self(Arc::new(Mutex::new(start)))
    }

    /// The time it shows.
    pub fn now(&self) -> DateTime<Utc> {
        *self.0.lock()
    }

    /// Moves it forward.
    pub fn advance(&self, by: Duration) {
        let by = chrono::Duration::from_std(by).unwrap_or(chrono::Duration::MAX);
        let mut t = self.0.lock();
        *t = t.checked_add_signed(by).unwrap_or(DateTime::<Utc>::MAX_UTC);
    }
}

/// A clock given as a function, e.g. one that follows tokio's (pausable) clock in tests.
///
/// ```
/// use architectlm_store::lease::{FnClock, LeaseClock};
///
/// let epoch = (chrono::Utc::now(), tokio::time::Instant::now());
/// let clock = LeaseClock::Fn(FnClock::new(move || {
///     epoch.0 + (tokio::time::Instant::now() - epoch.1)
/// }));
/// # let _ = clock;
/// ```
#[derive(Clone)]
pub struct FnClock(Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>);

impl fmt::Debug for FnClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("FnClock").field(&self.now()).finish()
    }
}

impl FnClock {
    /// A clock reading `now`.
    pub fn new(now: impl Fn() -> DateTime<Utc> + Send + Sync + 'static) -> Self {
        Self(Arc::new(now))
    }

    /// The time it shows.
    pub fn now(&self) -> DateTime<Utc> {
        (self.0)()
    }
}

/// Which clock judges lease expiry.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub enum LeaseClock {
    /// The store's own clock: PostgreSQL's server time, or this machine's time for SQLite.
    #[default]
    Store,
    /// A clock the caller moves (tests).
    Manual(ManualClock),
    /// A clock given as a function.
    Fn(FnClock),
}

impl LeaseClock {
    fn manual_now(&self) -> Option<DateTime<Utc>> {
        match self {
            Self::Store => None,
            Self::Manual(c) => Some(c.now()),
            Self::Fn(c) => Some(c.now()),
        }
    }
}

/// One stored lease: its owner (`None` once released), token and expiry.
type Slot = (Option<String>, u64, DateTime<Utc>);

/// Leases in this process's memory: the same contract for a single node and for tests of code
/// written against [`LeaseStore`] (with a [`ManualClock`] or tokio's paused clock, no database).
///
/// It has no fenced-write helper: writes it could guard live elsewhere. Use
/// [`InMemoryLeaseStore::is_current`] for a check that is only as good as its caller's
/// atomicity.
///
/// ```
/// use std::time::Duration;
/// use architectlm_store::lease::{InMemoryLeaseStore, LeaseClock, LeaseStore, ManualClock};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let clock = ManualClock::new(chrono::Utc::now());
/// let leases = InMemoryLeaseStore::new().with_clock(LeaseClock::Manual(clock.clone()));
/// let a = leases.acquire("job", "node-a", Duration::from_secs(5)).await?.unwrap();
/// clock.advance(Duration::from_secs(6));
/// let b = leases.acquire("job", "node-b", Duration::from_secs(5)).await?.unwrap();
/// assert!(b.token > a.token);
/// assert!(!leases.is_current(&a));
/// # Ok::<(), architectlm_store::Error>(()) }).unwrap();
/// ```
#[derive(Debug, Default)]
pub struct InMemoryLeaseStore {
    leases: Mutex<std::collections::HashMap<String, Slot>>,
    clock: LeaseClock,
}

impl InMemoryLeaseStore {
    /// An empty store judging expiry by this machine's clock.
    pub fn new() -> Self {
        Self::default()
    }

    /// Judges expiry by `clock` instead.
    pub fn with_clock(mut self, clock: LeaseClock) -> Self {
        self.clock = clock;
        self
    }

    fn now(&self) -> DateTime<Utc> {
        self.clock.manual_now().unwrap_or_else(Utc::now)
    }

    /// Whether `lease` is still held with its token (expired but not taken over counts).
    pub fn is_current(&self, lease: &Lease) -> bool {
        matches!(
            self.leases.lock().get(&lease.name),
            Some((Some(owner), token, _)) if *owner == lease.owner && *token == lease.token
        )
    }

    fn expiry(&self, ttl: Duration) -> Result<DateTime<Utc>> {
        if ttl.is_zero() {
            return Err(crate::Error::invalid_config(
                "ttl",
                format!("{ttl:?}"),
                "a lease needs a positive time to live",
            ));
        }
        chrono::Duration::from_std(ttl)
            .ok()
            .and_then(|d| self.now().checked_add_signed(d))
            .ok_or_else(|| crate::Error::invalid_config("ttl", format!("{ttl:?}"), "too long"))
    }

    fn lost(lease: &Lease, current: Option<u64>) -> crate::Error {
        crate::Error::Conflict {
            kind: "lease",
            id: lease.name.clone(),
            expected: lease.token,
            actual: current.unwrap_or(0),
        }
    }
}

#[async_trait]
impl LeaseStore for InMemoryLeaseStore {
    async fn acquire(&self, name: &str, owner: &str, ttl: Duration) -> Result<Option<Lease>> {
        let expires_at = self.expiry(ttl)?;
        let now = self.now();
        let mut leases = self.leases.lock();
        let token = match leases.get(name) {
            None => 1,
            Some((Some(holder), token, _)) if holder == owner => *token,
            Some((Some(_), _, exp)) if *exp > now => return Ok(None),
            Some((_, token, _)) => token + 1,
        };
        leases.insert(name.to_owned(), (Some(owner.to_owned()), token, expires_at));
        Ok(Some(Lease {
            name: name.to_owned(),
            owner: owner.to_owned(),
            token,
            expires_at,
        }))
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        let expires_at = self.expiry(ttl)?;
        let mut leases = self.leases.lock();
        match leases.get_mut(&lease.name) {
            Some((Some(owner), token, exp)) if *owner == lease.owner && *token == lease.token => {
                *exp = expires_at;
                Ok(Lease {
                    expires_at,
                    ..lease.clone()
                })
            }
            Some((_, token, _)) => Err(Self::lost(lease, Some(*token))),
            None => Err(Self::lost(lease, None)),
        }
    }

    async fn release(&self, lease: &Lease) -> Result<bool> {
        let now = self.now();
        let mut leases = self.leases.lock();
        match leases.get_mut(&lease.name) {
            Some((owner, token, exp))
                if owner.as_deref() == Some(lease.owner.as_str()) && *token == lease.token =>
            {
                *owner = None;
                *exp = now;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn get(&self, name: &str) -> Result<Option<Lease>> {
        Ok(match self.leases.lock().get(name) {
            Some((Some(owner), token, exp)) => Some(Lease {
                name: name.to_owned(),
                owner: owner.clone(),
                token: *token,
                expires_at: *exp,
            }),
            _ => None,
        })
    }
}

/// Keeps a lease alive in the background and says when it is lost.
///
/// [`LeaseKeeper::acquire`] takes the lease, then renews it every third of its `ttl`. The
/// keeper tracks, by this process's monotonic clock, the latest moment the lease is surely
/// still live: the send time of the last successful renewal plus `ttl`, less a tenth of `ttl`
/// as a margin for clock-rate differences. The lease counts as **lost** — [`LeaseKeeper::lease`] turns `None` and [`LeaseKeeper::lost`] resolves — when a
/// renewal reports a takeover, or when renewals keep failing (database unreachable) until that
/// moment passes. A lost lease is not retaken: acquire again to compete for it.
///
/// The signal is advisory: a process can stall between checking it and writing. Guard the
/// writes themselves with the token ([`PgLeaseStore::fence`], [`SqliteLeaseStore::fence`]).
///
/// Dropping the keeper stops renewing; the lease then expires on its own after `ttl`.
/// [`LeaseKeeper::release`] hands it over at once. Uses tokio's clock, so tests can pause time.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use architectlm_store::lease::{InMemoryLeaseStore, LeaseKeeper};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let store = Arc::new(InMemoryLeaseStore::new());
/// let keeper = LeaseKeeper::acquire(store, "singleton", "node-a", Duration::from_secs(15))
///     .await?
///     .expect("free");
/// assert_eq!(keeper.lease().map(|l| l.token), Some(1));
/// // ... do the work, fencing writes with keeper.lease() ...
/// assert!(keeper.release().await?);
/// # Ok::<(), architectlm_store::Error>(()) }).unwrap();
/// ```
pub struct LeaseKeeper {
    store: Arc<dyn LeaseStore>,
    state: tokio::sync::watch::Receiver<Option<Lease>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl fmt::Debug for LeaseKeeper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaseKeeper")
            .field("lease", &*self.state.borrow())
            .finish()
    }
}

impl LeaseKeeper {
    /// Acquires `name` for `owner` and starts renewing it; `None` while another owner holds it.
    /// Must be called inside a tokio runtime.
    pub async fn acquire(
        store: Arc<dyn LeaseStore>,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> Result<Option<Self>> {
        let sent = tokio::time::Instant::now();
        let Some(lease) = store.acquire(name, owner, ttl).await? else {
            return Ok(None);
        };
        let (tx, state) = tokio::sync::watch::channel(Some(lease.clone()));
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(keep(
            store.clone(),
            lease,
            ttl,
            sent + live(ttl),
            tx,
            stopped,
        ));
        Ok(Some(Self {
            store,
            state,
            stop: Some(stop),
            task: Some(task),
        }))
    }

    /// The lease as last renewed, `None` once lost.
    pub fn lease(&self) -> Option<Lease> {
        self.state.borrow().clone()
    }

    /// Whether the lease is still held (as far as this process knows).
    pub fn is_held(&self) -> bool {
        self.state.borrow().is_some()
    }

    /// Resolves once the lease is lost (at once if it already is).
    pub async fn lost(&self) {
        let mut state = self.state.clone();
        // An error means the keeper task ended, which only happens once the lease is gone.
        let _ = state.wait_for(Option::is_none).await;
    }

    /// Stops renewing and releases the lease so another owner can take it at once. `false`
    /// if it was already lost.
    pub async fn release(mut self) -> Result<bool> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        match self.state.borrow().clone() {
            Some(lease) => self.store.release(&lease).await,
            None => Ok(false),
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// How long after sending a successful acquire or renewal the keeper trusts the lease.
fn live(ttl: Duration) -> Duration {
    ttl - ttl / 10
}

async fn keep(
    store: Arc<dyn LeaseStore>,
    mut lease: Lease,
    ttl: Duration,
    mut live_until: tokio::time::Instant,
    state: tokio::sync::watch::Sender<Option<Lease>>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let every = ttl / 3;
    let mut next = architectlm_core::time::deadline_in(every);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep_until(next.min(live_until)) => {}
        }
        let now = tokio::time::Instant::now();
        if now >= live_until {
            tracing::warn!(lease = %lease.name, token = lease.token, "lease lost: not renewed in time");
            state.send_replace(None);
            return;
        }
        let renewal = tokio::time::timeout(live_until - now, store.renew(&lease, ttl)).await;
        match renewal {
            Ok(Ok(renewed)) => {
                lease = renewed;
                live_until = now + live(ttl);
                next = architectlm_core::time::add_to_instant(now, every);
                state.send_replace(Some(lease.clone()));
            }
            Ok(Err(crate::Error::Conflict { actual, .. })) => {
                tracing::warn!(lease = %lease.name, token = lease.token, current = actual, "lease lost: taken over");
                state.send_replace(None);
                return;
            }
            Ok(Err(e)) => {
                // Keep trying until the lease may have expired; retry sooner than usual.
                tracing::warn!(lease = %lease.name, error = %e, "lease renewal failed");
                next = tokio::time::Instant::now() + every / 3;
            }
            Err(_) => {
                tracing::warn!(lease = %lease.name, token = lease.token, "lease lost: renewal timed out");
                state.send_replace(None);
                return;
            }
        }
    }
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
fn check_ttl(ttl: Duration) -> Result<f64> {
    if ttl.is_zero() || ttl > architectlm_core::time::MAX_LEASE {
        return Err(Error::invalid_config(
            "ttl",
            format!("{ttl:?}"),
            format!(
                "a lease needs a positive time to live of at most {:?}",
                architectlm_core::time::MAX_LEASE
            ),
        ));
    }
    Ok(ttl.as_secs_f64())
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
fn token_to_db(token: u64) -> Result<i64> {
    i64::try_from(token)
        .map_err(|_| Error::InvalidInput(format!("lease token {token} is out of range")))
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
fn token_from_db(name: &str, token: i64) -> Result<u64> {
    u64::try_from(token)
        .map_err(|_| Error::storage(format!("lease {name:?}: stored token {token} is negative")))
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
fn lost(lease: &Lease, current: Option<u64>) -> Error {
    Error::Conflict {
        kind: "lease",
        id: lease.name.clone(),
        expected: lease.token,
        actual: current.unwrap_or(0),
    }
}

#[cfg(feature = "sqlite")]
pub use sqlite_impl::{SQLITE_MIGRATIONS, SqliteLeaseStore};

#[cfg(feature = "sqlite")]
mod sqlite_impl {
    use rusqlite::{OptionalExtension, params};

    use super::*;
    use crate::migration::Migration;
    use crate::sqlite::SqliteDb;

    /// The SQLite table of [`SqliteLeaseStore`] (component `lease`). Times are microseconds
    /// since the Unix epoch.
    pub static SQLITE_MIGRATIONS: &[Migration] = &[Migration {
        component: "lease",
        version: 1,
        description: "leases with fencing tokens",
        sql: "CREATE TABLE architectlm_leases (
                name TEXT PRIMARY KEY,
                owner TEXT,
                token INTEGER NOT NULL,
                expires_at INTEGER NOT NULL
            );",
    }];

    /// Leases in an embedded SQLite database: the same contract as [`super::PgLeaseStore`],
    /// for a single machine (several processes sharing one file, or tests).
    #[derive(Debug, Clone)]
    pub struct SqliteLeaseStore {
        db: SqliteDb,
        clock: LeaseClock,
    }

    fn micros(t: DateTime<Utc>) -> i64 {
        t.timestamp_micros()
    }

    fn from_micros(name: &str, us: i64) -> Result<DateTime<Utc>> {
        DateTime::from_timestamp_micros(us)
            .ok_or_else(|| Error::storage(format!("lease {name:?}: bad expiry {us}")))
    }

    fn db_err(e: rusqlite::Error) -> Error {
        Error::storage(e)
    }

    fn current(t: &rusqlite::Connection, name: &str) -> Result<Option<(Option<String>, u64, i64)>> {
        t.query_row(
            "SELECT owner, token, expires_at FROM architectlm_leases WHERE name = ?1",
            [name],
            |r| {
                Ok((
                    r.get::<_, Option<String>>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            },
        )
        .optional()
        .map_err(db_err)?
        .map(|(o, tok, exp)| Ok((o, token_from_db(name, tok)?, exp)))
        .transpose()
    }

    impl SqliteLeaseStore {
        /// A store on `db`, creating its table if needed, judging expiry by this machine's clock.
        pub async fn open(db: SqliteDb) -> Result<Self> {
            db.migrate(SQLITE_MIGRATIONS).await?;
            Ok(Self {
                db,
                clock: LeaseClock::Store,
            })
        }

        /// Judges expiry by `clock` instead.
        pub fn with_clock(mut self, clock: LeaseClock) -> Self {
            self.clock = clock;
            self
        }

        fn now(&self) -> DateTime<Utc> {
            self.clock.manual_now().unwrap_or_else(Utc::now)
        }

        /// Fails with [`Error::Conflict`] unless `lease` is still held with its token. Call it
        /// first inside [`SqliteDb::write`]: SQLite has one writer, so no takeover can commit
        /// between this check and the end of the closure's transaction.
        ///
        /// ```
        /// # use std::time::Duration;
        /// # use architectlm_store::lease::{LeaseStore, SqliteLeaseStore};
        /// # use architectlm_store::sqlite::{SqliteDb, SqliteOptions};
        /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
        /// let db = SqliteDb::open(SqliteOptions::memory())?;
        /// let leases = SqliteLeaseStore::open(db.clone()).await?;
        /// let lease = leases.acquire("job", "node-a", Duration::from_secs(5)).await?.unwrap();
        /// db.write(move |t| {
        ///     SqliteLeaseStore::fence(t, &lease)?;
        ///     // ... the guarded writes ...
        ///     Ok(())
        /// })
        /// .await?;
        /// # Ok::<(), architectlm_store::Error>(()) }).unwrap();
        /// ```
        pub fn fence(txn: &rusqlite::Transaction<'_>, lease: &Lease) -> Result<()> {
            match current(txn, &lease.name)? {
                Some((Some(owner), token, _)) if owner == lease.owner && token == lease.token => {
                    Ok(())
                }
                Some((_, token, _)) => Err(lost(lease, Some(token))),
                None => Err(lost(lease, None)),
            }
        }
    }

    #[async_trait]
    impl LeaseStore for SqliteLeaseStore {
        async fn acquire(&self, name: &str, owner: &str, ttl: Duration) -> Result<Option<Lease>> {
            check_ttl(ttl)?;
            let now = self.now();
            let expires_at = now
                + chrono::Duration::from_std(ttl)
                    .map_err(|_| Error::invalid_config("ttl", format!("{ttl:?}"), "too long"))?;
            let (name, owner) = (name.to_owned(), owner.to_owned());
            self.db
                .write(move |t| {
                    let token = match current(t, &name)? {
                        None => 1,
                        Some((Some(holder), token, _)) if holder == owner => token,
                        Some((Some(_), _, exp)) if exp > micros(now) => return Ok(None),
                        Some((_, token, _)) => token + 1,
                    };
                    t.execute(
                        "INSERT INTO architectlm_leases (name, owner, token, expires_at) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, token = excluded.token, expires_at = excluded.expires_at",
                        params![name, owner, token_to_db(token)?, micros(expires_at)],
                    )
                    .map_err(db_err)?;
                    Ok(Some(Lease {
                        expires_at: from_micros(&name, micros(expires_at))?,
                        name,
                        owner,
                        token,
                    }))
                })
                .await
        }

        async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
            check_ttl(ttl)?;
            let expires_at = self.now()
                + chrono::Duration::from_std(ttl)
                    .map_err(|_| Error::invalid_config("ttl", format!("{ttl:?}"), "too long"))?;
            let lease = lease.clone();
            self.db
                .write(move |t| {
                    let n = t
                        .execute(
                            "UPDATE architectlm_leases SET expires_at = ?4 WHERE name = ?1 AND owner = ?2 AND token = ?3",
                            params![lease.name, lease.owner, token_to_db(lease.token)?, micros(expires_at)],
                        )
                        .map_err(db_err)?;
                    if n == 0 {
                        return Err(lost(&lease, current(t, &lease.name)?.map(|c| c.1)));
                    }
                    Ok(Lease {
                        expires_at: from_micros(&lease.name, micros(expires_at))?,
                        ..lease
                    })
                })
                .await
        }

        async fn release(&self, lease: &Lease) -> Result<bool> {
            let now = micros(self.now());
            let lease = lease.clone();
            self.db
                .write(move |t| {
                    let n = t
                        .execute(
                            "UPDATE architectlm_leases SET owner = NULL, expires_at = ?4 WHERE name = ?1 AND owner = ?2 AND token = ?3",
                            params![lease.name, lease.owner, token_to_db(lease.token)?, now],
                        )
                        .map_err(db_err)?;
                    Ok(n == 1)
                })
                .await
        }

        async fn get(&self, name: &str) -> Result<Option<Lease>> {
            let name = name.to_owned();
            self.db
                .read(move |c| match current(c, &name)? {
                    Some((Some(owner), token, exp)) => Ok(Some(Lease {
                        expires_at: from_micros(&name, exp)?,
                        name,
                        owner,
                        token,
                    })),
                    _ => Ok(None),
                })
                .await
        }
    }
}

#[cfg(feature = "postgres")]
pub use pg_impl::{PG_MIGRATIONS, PgLeaseStore};

#[cfg(feature = "postgres")]
mod pg_impl {
    use tokio_postgres::types::ToSql;

    use super::*;
    use crate::migration::Migration;
    use crate::postgres::{PgDb, pg_err};

    /// The PostgreSQL table of [`PgLeaseStore`] (component `lease`).
    pub static PG_MIGRATIONS: &[Migration] = &[Migration {
        component: "lease",
        version: 1,
        description: "leases with fencing tokens",
        sql: "CREATE TABLE architectlm_leases (
                name TEXT PRIMARY KEY,
                owner TEXT,
                token BIGINT NOT NULL,
                expires_at TIMESTAMPTZ NOT NULL
            );",
    }];

    /// Leases in PostgreSQL, shared by every node pointing at the same database (and schema).
    ///
    /// Each call is one statement; expiry is judged by the server's clock (unless a
    /// [`LeaseClock::Manual`] is set), so nodes need not agree on the time.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use architectlm_store::lease::{LeaseStore, PgLeaseStore};
    /// use architectlm_store::postgres::PgDb;
    ///
    /// # async fn demo(db: PgDb) -> architectlm_store::Result<()> {
    /// let leases = PgLeaseStore::open(db).await?;
    /// if let Some(lease) = leases.acquire("saga:42", "node-a/1", Duration::from_secs(15)).await? {
    ///     // Every write on behalf of the lease is fenced by its token:
    ///     leases
    ///         .fenced_execute(&lease, "UPDATE sagas SET step = step + 1 WHERE id = 42", &[])
    ///         .await?;
    /// }
    /// # Ok(()) }
    /// ```
    #[derive(Debug, Clone)]
    pub struct PgLeaseStore {
        db: PgDb,
        clock: LeaseClock,
    }

    // `statement_timestamp()` is constant within a statement, so one statement judges expiry
    // and sets the new expiry from the same instant.
    const NOW: &str = "COALESCE($1::timestamptz, statement_timestamp())";

    fn row_lease(r: &tokio_postgres::Row, name: &str, owner: &str) -> Result<Lease> {
        let bad = |e| pg_err("bad architectlm_leases row", e);
        Ok(Lease {
            name: name.to_owned(),
            owner: owner.to_owned(),
            token: token_from_db(name, r.try_get(0).map_err(bad)?)?,
            expires_at: r.try_get(1).map_err(bad)?,
        })
    }

    impl PgLeaseStore {
        /// A store on `db`, creating its table if needed.
        pub async fn open(db: PgDb) -> Result<Self> {
            db.migrate(PG_MIGRATIONS).await?;
            Ok(Self {
                db,
                clock: LeaseClock::Store,
            })
        }

        /// Judges expiry by `clock` instead of the server's clock.
        pub fn with_clock(mut self, clock: LeaseClock) -> Self {
            self.clock = clock;
            self
        }

        /// The database it uses.
        pub fn db(&self) -> &PgDb {
            &self.db
        }

        /// Fails with [`Error::Conflict`] unless `lease` is still held with its token, and
        /// locks the lease row (`FOR SHARE`) until `txn` ends, so that a takeover waits for this
        /// transaction. Call it first in every transaction that writes on behalf of the lease,
        /// and keep that transaction short: renewals of the lease wait for it too. Fenced
        /// transactions of the same lease do not block each other.
        pub async fn fence(txn: &tokio_postgres::Transaction<'_>, lease: &Lease) -> Result<()> {
            let row = txn
                .query_opt(
                    "SELECT owner, token FROM architectlm_leases WHERE name = $1 FOR SHARE",
                    &[&lease.name],
                )
                .await
                .map_err(|e| pg_err(&format!("cannot check lease {:?}", lease.name), e))?;
            let Some(row) = row else {
                return Err(lost(lease, None));
            };
            let bad = |e| pg_err("bad architectlm_leases row", e);
            let owner: Option<String> = row.try_get(0).map_err(bad)?;
            let token = token_from_db(&lease.name, row.try_get(1).map_err(bad)?)?;
            if owner.as_deref() == Some(lease.owner.as_str()) && token == lease.token {
                Ok(())
            } else {
                Err(lost(lease, Some(token)))
            }
        }

        /// Runs one statement in a transaction fenced by `lease` and returns the rows it
        /// changed; [`Error::Conflict`] (and no change) once the lease was taken over.
        pub async fn fenced_execute(
            &self,
            lease: &Lease,
            statement: &str,
            params: &[&(dyn ToSql + Sync)],
        ) -> Result<u64> {
            let mut client = self.db.client().await?;
            let txn = client
                .transaction()
                .await
                .map_err(|e| pg_err("cannot begin a fenced transaction", e))?;
            Self::fence(&txn, lease).await?;
            let n = txn
                .execute(statement, params)
                .await
                .map_err(|e| pg_err("fenced statement failed", e))?;
            txn.commit()
                .await
                .map_err(|e| pg_err("cannot commit a fenced transaction", e))?;
            Ok(n)
        }

        async fn current_token(
            &self,
            client: &tokio_postgres::Client,
            name: &str,
        ) -> Result<Option<u64>> {
            let row = client
                .query_opt(
                    "SELECT token FROM architectlm_leases WHERE name = $1",
                    &[&name],
                )
                .await
                .map_err(|e| pg_err(&format!("cannot read lease {name:?}"), e))?;
            row.map(|r| {
                token_from_db(
                    name,
                    r.try_get(0)
                        .map_err(|e| pg_err("bad architectlm_leases row", e))?,
                )
            })
            .transpose()
        }
    }

    #[async_trait]
    impl LeaseStore for PgLeaseStore {
        async fn acquire(&self, name: &str, owner: &str, ttl: Duration) -> Result<Option<Lease>> {
            let secs = check_ttl(ttl)?;
            let now = self.clock.manual_now();
            let client = self.db.client().await?;
            // One statement: insert a new lease, or take over a free/expired one (token + 1),
            // or extend our own (same token). The WHERE of DO UPDATE refuses a live lease of
            // someone else, and then no row is returned.
            let stmt = client
                .prepare_cached(&format!(
                    "INSERT INTO architectlm_leases AS l (name, owner, token, expires_at)
                     VALUES ($2, $3, 1, {NOW} + make_interval(secs => $4::float8))
                     ON CONFLICT (name) DO UPDATE SET
                        owner = EXCLUDED.owner,
                        token = CASE WHEN l.owner = EXCLUDED.owner THEN l.token ELSE l.token + 1 END,
                        expires_at = EXCLUDED.expires_at
                     WHERE l.owner IS NULL OR l.owner = EXCLUDED.owner OR l.expires_at <= {NOW}
                     RETURNING token, expires_at"
                ))
                .await
                .map_err(|e| pg_err("cannot prepare the lease acquire", e))?;
            let row = client
                .query_opt(&stmt, &[&now, &name, &owner, &secs])
                .await
                .map_err(|e| pg_err(&format!("cannot acquire lease {name:?}"), e))?;
            row.map(|r| row_lease(&r, name, owner)).transpose()
        }

        async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
            let secs = check_ttl(ttl)?;
            let now = self.clock.manual_now();
            let client = self.db.client().await?;
            let stmt = client
                .prepare_cached(&format!(
                    "UPDATE architectlm_leases SET expires_at = {NOW} + make_interval(secs => $5::float8)
                     WHERE name = $2 AND owner = $3 AND token = $4
                     RETURNING token, expires_at"
                ))
                .await
                .map_err(|e| pg_err("cannot prepare the lease renew", e))?;
            let row = client
                .query_opt(
                    &stmt,
                    &[
                        &now,
                        &lease.name,
                        &lease.owner,
                        &token_to_db(lease.token)?,
                        &secs,
                    ],
                )
                .await
                .map_err(|e| pg_err(&format!("cannot renew lease {:?}", lease.name), e))?;
            match row {
                Some(r) => row_lease(&r, &lease.name, &lease.owner),
                None => Err(lost(lease, self.current_token(&client, &lease.name).await?)),
            }
        }

        async fn release(&self, lease: &Lease) -> Result<bool> {
            let now = self.clock.manual_now();
            let client = self.db.client().await?;
            let n = client
                .execute(
                    &format!(
                        "UPDATE architectlm_leases SET owner = NULL, expires_at = {NOW}
                         WHERE name = $2 AND owner = $3 AND token = $4"
                    ),
                    &[&now, &lease.name, &lease.owner, &token_to_db(lease.token)?],
                )
                .await
                .map_err(|e| pg_err(&format!("cannot release lease {:?}", lease.name), e))?;
            Ok(n == 1)
        }

        async fn get(&self, name: &str) -> Result<Option<Lease>> {
            let client = self.db.client().await?;
            let row = client
                .query_opt(
                    "SELECT token, expires_at, owner FROM architectlm_leases WHERE name = $1 AND owner IS NOT NULL",
                    &[&name],
                )
                .await
                .map_err(|e| pg_err(&format!("cannot read lease {name:?}"), e))?;
            match row {
                Some(r) => {
                    let owner: String = r
                        .try_get(2)
                        .map_err(|e| pg_err("bad architectlm_leases row", e))?;
                    row_lease(&r, name, &owner).map(Some)
                }
                None => Ok(None),
            }
        }
    }
}
