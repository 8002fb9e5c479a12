//! Leases with fencing tokens on PostgreSQL and SQLite: takeover after expiry, fenced writes
//! refused after a takeover, a takeover waiting for an in-flight fenced write, and contention.

mod support;

use std::time::Duration;

use architectlm_core::Error;
use architectlm_store::lease::{LeaseClock, LeaseStore, ManualClock};

const TTL: Duration = Duration::from_secs(10);

fn assert_lost(e: Error, name: &str, mine: u64, current: u64) {
    match &e {
        Error::Conflict {
            kind,
            id,
            expected,
            actual,
        } => {
            assert_eq!((*kind, id.as_str()), ("lease", name));
            assert_eq!((*expected, *actual), (mine, current), "{e}");
        }
        other => panic!("expected a lost lease {name}, got {other:?}"),
    }
}

/// The lease rules every store must follow, driven by a manual clock.
async fn lease_rules(store: &dyn LeaseStore, clock: &ManualClock) {
    // A free lease is taken with token 1; a live one is refused to others.
    let a = store
        .acquire("sweeper", "node-a", TTL)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((a.owner.as_str(), a.token), ("node-a", 1));
    assert!(
        store
            .acquire("sweeper", "node-b", TTL)
            .await
            .unwrap()
            .is_none()
    );
    // Re-acquiring by the holder extends it and keeps the token.
    clock.advance(Duration::from_secs(5));
    let a = store
        .acquire("sweeper", "node-a", TTL)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.token, 1);
    clock.advance(Duration::from_secs(9));
    assert!(
        store
            .acquire("sweeper", "node-b", TTL)
            .await
            .unwrap()
            .is_none()
    );
    let a = store.renew(&a, TTL).await.unwrap();
    assert_eq!(a.token, 1);

    // Past the expiry another node takes over with a larger token ...
    clock.advance(TTL + Duration::from_millis(1));
    let b = store
        .acquire("sweeper", "node-b", TTL)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((b.owner.as_str(), b.token), ("node-b", 2));
    assert_eq!(store.get("sweeper").await.unwrap().as_ref(), Some(&b));
    // ... and the old owner can neither renew nor release it.
    assert_lost(store.renew(&a, TTL).await.unwrap_err(), "sweeper", 1, 2);
    assert!(!store.release(&a).await.unwrap());
    assert_eq!(store.get("sweeper").await.unwrap().unwrap().owner, "node-b");

    // A release frees it at once; the next owner gets a new token.
    assert!(store.release(&b).await.unwrap());
    assert_eq!(store.get("sweeper").await.unwrap(), None);
    let c = store
        .acquire("sweeper", "node-c", TTL)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.token, 3);
    assert_lost(store.renew(&b, TTL).await.unwrap_err(), "sweeper", 2, 3);

    // Names are independent.
    let other = store
        .acquire("reports", "node-a", TTL)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(other.token, 1);

    let e = store
        .acquire("sweeper", "node-c", Duration::ZERO)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("ttl"), "{e}");
}

#[tokio::test]
async fn in_memory_leases_follow_the_rules() {
    use architectlm_store::lease::InMemoryLeaseStore;
    let clock = ManualClock::new(chrono::Utc::now());
    let store = InMemoryLeaseStore::new().with_clock(LeaseClock::Manual(clock.clone()));
    lease_rules(&store, &clock).await;
}

mod keeper {
    //! `LeaseKeeper` on the in-memory store with tokio's paused clock; the store's clock
    //! follows tokio's.

    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use architectlm_store::lease::{FnClock, InMemoryLeaseStore, Lease, LeaseKeeper};
    use async_trait::async_trait;

    use super::*;

    /// The in-memory store, with renewals that fail while `down` is set (a partition).
    #[derive(Debug)]
    struct Flaky {
        inner: InMemoryLeaseStore,
        down: AtomicBool,
    }

    #[async_trait]
    impl LeaseStore for Flaky {
        async fn acquire(
            &self,
            name: &str,
            owner: &str,
            ttl: Duration,
        ) -> architectlm_store::Result<Option<Lease>> {
            self.inner.acquire(name, owner, ttl).await
        }
        async fn renew(&self, lease: &Lease, ttl: Duration) -> architectlm_store::Result<Lease> {
            if self.down.load(Ordering::SeqCst) {
                return Err(Error::storage("connection refused"));
            }
            self.inner.renew(lease, ttl).await
        }
        async fn release(&self, lease: &Lease) -> architectlm_store::Result<bool> {
            self.inner.release(lease).await
        }
        async fn get(&self, name: &str) -> architectlm_store::Result<Option<Lease>> {
            self.inner.get(name).await
        }
    }

    fn setup() -> (Arc<Flaky>, FnClock, tokio::time::Instant) {
        let epoch = (chrono::Utc::now(), tokio::time::Instant::now());
        let clock = FnClock::new(move || epoch.0 + (tokio::time::Instant::now() - epoch.1));
        let store = Arc::new(Flaky {
            inner: InMemoryLeaseStore::new().with_clock(LeaseClock::Fn(clock.clone())),
            down: AtomicBool::new(false),
        });
        (store, clock, epoch.1)
    }

    #[tokio::test(start_paused = true)]
    async fn a_kept_lease_outlives_many_ttls_and_others_cannot_take_it() {
        let (store, _, _) = setup();
        let keeper = LeaseKeeper::acquire(store.clone(), "job", "node-a", TTL)
            .await
            .unwrap()
            .unwrap();
        for _ in 0..40 {
            tokio::time::sleep(TTL / 4).await;
            assert!(store.acquire("job", "node-b", TTL).await.unwrap().is_none());
            assert!(keeper.is_held());
        }
        assert_eq!(keeper.lease().unwrap().token, 1);
        // A release hands it over at once.
        assert!(keeper.release().await.unwrap());
        let b = store.acquire("job", "node-b", TTL).await.unwrap().unwrap();
        assert_eq!(b.token, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_partitioned_keeper_reports_the_loss_before_anyone_can_take_over() {
        let (store, clock, _) = setup();
        let keeper = LeaseKeeper::acquire(store.clone(), "job", "node-a", TTL)
            .await
            .unwrap()
            .unwrap();
        tokio::time::sleep(TTL / 2).await;
        let held_until = keeper.lease().unwrap().expires_at;
        store.down.store(true, Ordering::SeqCst);
        // Move both clocks until the keeper gives up.
        let mut steps = 0;
        while keeper.is_held() {
            tokio::time::sleep(TTL / 20).await;
            steps += 1;
            assert!(steps < 100, "the keeper never reported the loss");
        }
        keeper.lost().await;
        // It gave up before the store's expiry: nobody else could have had the lease yet.
        assert!(clock.now() < held_until, "{} vs {held_until}", clock.now());
        assert!(store.acquire("job", "node-b", TTL).await.unwrap().is_none());
        store.down.store(false, Ordering::SeqCst);
        while store.acquire("job", "node-b", TTL).await.unwrap().is_none() {
            tokio::time::sleep(TTL / 20).await;
        }
        assert_eq!(store.get("job").await.unwrap().unwrap().owner, "node-b");
        // The lost keeper does not come back.
        assert!(keeper.lease().is_none());
        assert!(!keeper.release().await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_keeper_whose_lease_was_taken_over_reports_it_at_the_next_renewal() {
        let (store, _clock, start) = setup();
        let keeper = LeaseKeeper::acquire(store.clone(), "job", "node-a", TTL)
            .await
            .unwrap()
            .unwrap();
        // Someone frees the lease behind the keeper's back (an operator, a bug) and node B
        // takes it.
        let a = keeper.lease().unwrap();
        assert!(store.release(&a).await.unwrap());
        let b = store.acquire("job", "node-b", TTL).await.unwrap().unwrap();
        assert_eq!(b.token, 2);
        keeper.lost().await;
        assert!(keeper.lease().is_none());
        // At the first renewal, a third of the ttl in (tokio's timers round up to 1 ms).
        let at = start.elapsed();
        assert!(
            at >= TTL / 3 && at < TTL / 3 + Duration::from_millis(2),
            "{at:?}"
        );
    }
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use architectlm_store::lease::{Lease, SqliteLeaseStore};
    use architectlm_store::sqlite::{SqliteDb, SqliteOptions, rusqlite};

    use super::*;

    async fn open() -> (SqliteDb, SqliteLeaseStore, ManualClock) {
        let db = SqliteDb::open(SqliteOptions::memory()).unwrap();
        db.write(|t| {
            t.execute_batch("CREATE TABLE ledger (n INTEGER NOT NULL, by TEXT NOT NULL)")
                .map_err(Error::storage)
        })
        .await
        .unwrap();
        let clock = ManualClock::new(chrono::Utc::now());
        let store = SqliteLeaseStore::open(db.clone())
            .await
            .unwrap()
            .with_clock(LeaseClock::Manual(clock.clone()));
        (db, store, clock)
    }

    #[tokio::test]
    async fn sqlite_leases_follow_the_rules() {
        let (_db, store, clock) = open().await;
        lease_rules(&store, &clock).await;
    }

    async fn fenced_insert(db: &SqliteDb, lease: &Lease, n: i64) -> architectlm_store::Result<()> {
        let lease = lease.clone();
        db.write(move |t| {
            SqliteLeaseStore::fence(t, &lease)?;
            t.execute(
                "INSERT INTO ledger (n, by) VALUES (?1, ?2)",
                rusqlite::params![n, lease.owner],
            )
            .map_err(Error::storage)?;
            Ok(())
        })
        .await
    }

    #[tokio::test]
    async fn sqlite_fenced_writes_are_refused_after_a_takeover() {
        let (db, store, clock) = open().await;
        let a = store.acquire("job", "node-a", TTL).await.unwrap().unwrap();
        fenced_insert(&db, &a, 1).await.unwrap();
        clock.advance(TTL * 2);
        let b = store.acquire("job", "node-b", TTL).await.unwrap().unwrap();
        assert_lost(fenced_insert(&db, &a, 2).await.unwrap_err(), "job", 1, 2);
        fenced_insert(&db, &b, 3).await.unwrap();
        let rows: Vec<(i64, String)> = db
            .read(|c| {
                let mut s = c
                    .prepare("SELECT n, by FROM ledger ORDER BY n")
                    .map_err(Error::storage)?;
                let rows = s
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                    .map_err(Error::storage)?;
                rows.collect::<Result<Vec<_>, _>>().map_err(Error::storage)
            })
            .await
            .unwrap();
        assert_eq!(rows, vec![(1, "node-a".into()), (3, "node-b".into())]);
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use std::sync::Arc;

    use architectlm_store::lease::{Lease, PgLeaseStore};
    use architectlm_store::postgres::PgDb;

    use super::*;
    use crate::support::{TestSchema, database_url};

    async fn setup(url: &str) -> (TestSchema, PgDb) {
        let schema = TestSchema::new(url);
        let db = schema.connect().await;
        db.client()
            .await
            .unwrap()
            .batch_execute("CREATE TABLE ledger (n BIGINT NOT NULL, by TEXT NOT NULL)")
            .await
            .unwrap();
        (schema, db)
    }

    async fn ledger(db: &PgDb) -> Vec<(i64, String)> {
        db.client()
            .await
            .unwrap()
            .query("SELECT n, by FROM ledger ORDER BY n", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }

    async fn fenced_insert(
        store: &PgLeaseStore,
        lease: &Lease,
        n: i64,
    ) -> architectlm_store::Result<u64> {
        store
            .fenced_execute(
                lease,
                "INSERT INTO ledger (n, by) VALUES ($1, $2)",
                &[&n, &lease.owner],
            )
            .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_leases_follow_the_rules() {
        let Some(url) = database_url("postgres_leases_follow_the_rules") else {
            return;
        };
        let (schema, db) = setup(&url).await;
        let clock = ManualClock::new(chrono::Utc::now());
        let store = PgLeaseStore::open(db)
            .await
            .unwrap()
            .with_clock(LeaseClock::Manual(clock.clone()));
        lease_rules(&store, &clock).await;
        schema.drop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_fenced_writes_are_refused_after_a_takeover() {
        let Some(url) = database_url("postgres_fenced_writes_are_refused_after_a_takeover") else {
            return;
        };
        let (schema, db) = setup(&url).await;
        let clock = ManualClock::new(chrono::Utc::now());
        // Two nodes: separate pools, one shared clock standing in for the server's.
        let node_a = PgLeaseStore::open(db.clone())
            .await
            .unwrap()
            .with_clock(LeaseClock::Manual(clock.clone()));
        let node_b = PgLeaseStore::open(schema.connect().await)
            .await
            .unwrap()
            .with_clock(LeaseClock::Manual(clock.clone()));
        let a = node_a
            .acquire("saga:7", "node-a", TTL)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(fenced_insert(&node_a, &a, 1).await.unwrap(), 1);
        // Node A stalls past its expiry; node B takes over.
        clock.advance(TTL + Duration::from_secs(1));
        let b = node_b
            .acquire("saga:7", "node-b", TTL)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(b.token, a.token + 1);
        // A wakes up and writes with its stale token: refused, nothing written.
        assert_lost(
            fenced_insert(&node_a, &a, 2).await.unwrap_err(),
            "saga:7",
            1,
            2,
        );
        assert_eq!(fenced_insert(&node_b, &b, 3).await.unwrap(), 1);
        assert_eq!(
            ledger(&db).await,
            vec![(1, "node-a".to_owned()), (3, "node-b".to_owned())]
        );
        schema.drop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_takeover_waits_for_a_fenced_write_in_flight() {
        let Some(url) = database_url("a_takeover_waits_for_a_fenced_write_in_flight") else {
            return;
        };
        let (schema, db) = setup(&url).await;
        let clock = ManualClock::new(chrono::Utc::now());
        let node_a = PgLeaseStore::open(db.clone())
            .await
            .unwrap()
            .with_clock(LeaseClock::Manual(clock.clone()));
        let app_b = format!("lease-test-b-{}", uuid::Uuid::new_v4().simple());
        let db_b = PgDb::connect(schema.options().application_name(&app_b))
            .await
            .unwrap();
        let node_b = PgLeaseStore::open(db_b)
            .await
            .unwrap()
            .with_clock(LeaseClock::Manual(clock.clone()));
        let a = node_a
            .acquire("saga:9", "node-a", TTL)
            .await
            .unwrap()
            .unwrap();

        // A passes the fence and holds its transaction open ...
        let mut client = db.client().await.unwrap();
        let txn = client.transaction().await.unwrap();
        PgLeaseStore::fence(&txn, &a).await.unwrap();
        // ... the lease expires and B tries to take it: B must wait for A's transaction.
        clock.advance(TTL * 2);
        let takeover = tokio::spawn(async move { node_b.acquire("saga:9", "node-b", TTL).await });
        let watcher = db.client().await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let waiting: i64 = watcher
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'",
                    &[&app_b],
                )
                .await
                .unwrap()
                .get(0);
            if waiting == 1 {
                break;
            }
            assert!(
                !takeover.is_finished(),
                "the takeover did not wait for the fenced write"
            );
            assert!(
                tokio::time::Instant::now() < deadline,
                "node B never reached the lease lock"
            );
            tokio::task::yield_now().await;
        }
        txn.execute("INSERT INTO ledger (n, by) VALUES (1, 'node-a')", &[])
            .await
            .unwrap();
        txn.commit().await.unwrap();
        let b = takeover.await.unwrap().unwrap().unwrap();
        assert_eq!(b.token, 2);
        // A's write committed before the takeover; after it, A is fenced off.
        assert_eq!(ledger(&db).await, vec![(1, "node-a".to_owned())]);
        assert_lost(
            fenced_insert(&node_a, &a, 2).await.unwrap_err(),
            "saga:9",
            1,
            2,
        );
        drop(watcher);
        drop(client);
        schema.drop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_nodes_contending_one_wins() {
        let Some(url) = database_url("many_nodes_contending_one_wins") else {
            return;
        };
        let (schema, db) = setup(&url).await;
        let store = Arc::new(PgLeaseStore::open(db).await.unwrap());
        let mut tasks = Vec::new();
        for n in 0..12 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                store
                    .acquire("singleton", &format!("node-{n}"), TTL)
                    .await
                    .unwrap()
            }));
        }
        let mut winners = Vec::new();
        for t in tasks {
            winners.extend(t.await.unwrap());
        }
        assert_eq!(winners.len(), 1, "{winners:?}");
        assert_eq!(winners[0].token, 1);
        assert_eq!(
            store.get("singleton").await.unwrap().as_ref(),
            Some(&winners[0])
        );
        // With the server's clock, the expiry is about TTL ahead of the server's now.
        let left: f64 = store
            .db()
            .client()
            .await
            .unwrap()
            .query_one(
                "SELECT EXTRACT(EPOCH FROM (expires_at - now()))::float8 FROM architectlm_leases WHERE name = 'singleton'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(left > 0.0 && left <= TTL.as_secs_f64(), "{left}");
        schema.drop().await;
    }
}

#[cfg(feature = "postgres")]
mod failover {
    //! A node holding a lease (server clock, 1 s) is killed with SIGKILL mid-work; another node
    //! takes the lease over once it expires, every write the dead node acknowledged is there,
    //! and the dead node's token is fenced off.

    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    use architectlm_store::lease::{Lease, PgLeaseStore};
    use architectlm_store::postgres::PgDb;

    use super::*;
    use crate::support::{TestSchema, database_url};

    const CHILD_ENV: &str = "ARCHITECTLM_LEASE_CRASH_SCHEMA";
    const LEASE_TTL: Duration = Duration::from_secs(1);

    async fn child(url: String, schema: String) {
        let db = PgDb::connect(architectlm_store::postgres::PgOptions::new(url).schema(schema))
            .await
            .unwrap();
        let store = PgLeaseStore::open(db).await.unwrap();
        let owner = format!("child-{}", std::process::id());
        let lease = store
            .acquire("worker", &owner, LEASE_TTL)
            .await
            .unwrap()
            .unwrap();
        // A newline first: the test harness has printed the test name without one.
        println!("\nlease {} {}", lease.owner, lease.token);
        let renewer = {
            let store = store.clone();
            let lease = lease.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(LEASE_TTL / 4).await;
                    store.renew(&lease, LEASE_TTL).await.unwrap();
                }
            })
        };
        for n in 0i64.. {
            store
                .fenced_execute(
                    &lease,
                    "INSERT INTO ledger (n, by) VALUES ($1, $2)",
                    &[&n, &lease.owner],
                )
                .await
                .unwrap();
            println!("wrote {n}");
        }
        renewer.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_killed_owner_is_taken_over_after_expiry_and_fenced_off() {
        if let (Ok(schema), Some(url)) = (std::env::var(CHILD_ENV), database_url("child")) {
            child(url, schema).await;
            return;
        }
        let Some(url) = database_url("a_killed_owner_is_taken_over_after_expiry_and_fenced_off")
        else {
            return;
        };
        let schema = TestSchema::new(&url);
        let db = schema.connect().await;
        db.client()
            .await
            .unwrap()
            .batch_execute("CREATE TABLE ledger (n BIGINT PRIMARY KEY, by TEXT NOT NULL)")
            .await
            .unwrap();
        let store = PgLeaseStore::open(db.clone()).await.unwrap();

        let mut proc = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "failover::a_killed_owner_is_taken_over_after_expiry_and_fenced_off",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &schema.name)
            .env("DATABASE_URL", &url)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = proc.stdout.take().unwrap();
        let (child_lease, acked) = tokio::task::spawn_blocking(move || {
            let mut lease = None;
            let mut acked = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let parts: Vec<&str> = line.split_whitespace().collect();
                match parts.as_slice() {
                    ["lease", owner, token] => {
                        lease = Some(((*owner).to_owned(), token.parse::<u64>().unwrap()));
                    }
                    ["wrote", n] => {
                        acked.push(n.parse::<i64>().unwrap());
                        if acked.len() == 100 {
                            break;
                        }
                    }
                    _ => {}
                }
            }
            (lease, acked)
        })
        .await
        .unwrap();
        proc.kill().unwrap();
        let killed_at = tokio::time::Instant::now();
        proc.wait().unwrap();
        let (child_owner, child_token) = child_lease.expect("the child took the lease");
        assert_eq!(acked.len(), 100, "the child stopped early");

        // While the dead node's lease is live nobody else gets it; once it expires, we do.
        let deadline = killed_at + LEASE_TTL * 10;
        let mine = loop {
            if let Some(l) = store
                .acquire("worker", "survivor", LEASE_TTL)
                .await
                .unwrap()
            {
                break l;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the lease was never freed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        eprintln!(
            "lease taken over {:?} after the kill (ttl {:?})",
            killed_at.elapsed(),
            LEASE_TTL
        );
        assert_eq!(mine.token, child_token + 1);

        // Nothing the dead node acknowledged is lost.
        let rows: Vec<i64> = db
            .client()
            .await
            .unwrap()
            .query(
                "SELECT n FROM ledger WHERE by = $1 ORDER BY n",
                &[&child_owner],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        for n in &acked {
            assert!(rows.binary_search(n).is_ok(), "acknowledged write {n} lost");
        }
        // A write with the dead node's token (a zombie waking up) is refused.
        let zombie = Lease::new("worker", &child_owner, child_token, mine.expires_at);
        let e = store
            .fenced_execute(
                &zombie,
                "INSERT INTO ledger (n, by) VALUES (-1, 'zombie')",
                &[],
            )
            .await
            .unwrap_err();
        assert_lost(e, "worker", child_token, child_token + 1);
        schema.drop().await;
    }
}
