//! Overlap policies and jitter on three scheduler nodes sharing one PostgreSQL database:
//! `queue-one` never runs two at once and keeps at most one occurrence waiting, `allow` with
//! `max_concurrent` never runs more than that many at once on all nodes together, and jitter
//! delays each run by up to its amount.
#![cfg(all(unix, feature = "postgres"))]

use std::sync::Arc;
use std::time::{Duration, Instant};

use architectlm_core::extensions::scheduler::{
    OverlapPolicy, RecurringTaskConfig, SchedulePolicy, Scheduler,
};
use architectlm_core::{Runtime, System, TaskDefinition, TaskError};
use architectlm_scheduler::{ClusterOptions, TaskScheduler};
use architectlm_store::postgres::PgDb;
use architectlm_store::schedule::PgScheduleStore;
use serde_json::json;
use uuid::Uuid;

mod support;
use support::pg::{connect, database_url, drop_schema};

const LEASE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(20);

/// A task that takes `pause` and records each execution in the ledger, keyed by its
/// idempotency key.
fn system(db: PgDb, node: String, pause: Duration) -> System {
    let task = TaskDefinition::new("ledger", move |_input, ctx| {
        let db = db.clone();
        let node = node.clone();
        async move {
            tokio::time::sleep(pause).await;
            let key = ctx.idempotency_key().unwrap_or("no-key").to_owned();
            db.client()
                .await
                .map_err(|e| TaskError::new(e.to_string()))?
                .execute(
                    "INSERT INTO ledger (key, executions) VALUES ($1, 1)
                     ON CONFLICT (key) DO UPDATE SET executions = ledger.executions + 1",
                    &[&key],
                )
                .await
                .map_err(|e| TaskError::new(e.to_string()))?;
            Ok(json!({"node": node}))
        }
    });
    System::builder("cluster")
        .task(task.unwrap_or_else(|e| panic!("{e}")))
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Three nodes on the schema (ledger table created), and a connection for the test.
async fn cluster(
    url: &str,
    schema: &str,
    pause: Duration,
) -> (Vec<(Runtime, Arc<TaskScheduler>)>, PgDb) {
    let db = connect(url, schema, 2).await;
    db.client()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS \"{schema}\";
             CREATE TABLE ledger (key TEXT PRIMARY KEY, executions INTEGER NOT NULL)"
        ))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        let db = connect(url, schema, 6).await;
        let store = Arc::new(
            PgScheduleStore::open(db.clone())
                .await
                .unwrap_or_else(|e| panic!("{e}")),
        );
        let scheduler = Arc::new(
            TaskScheduler::builder()
                .cluster(
                    store,
                    ClusterOptions::new(name).lease(LEASE).poll_interval(POLL),
                )
                .build(),
        );
        let runtime = Runtime::builder(system(db, name.to_owned(), pause))
            .extension(scheduler.clone())
            .start()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        nodes.push((runtime, scheduler));
    }
    (nodes, db)
}

async fn count(db: &PgDb, sql: &str) -> i64 {
    db.client()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .query_one(sql, &[])
        .await
        .and_then(|r| r.try_get(0))
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Waits (polling the database, with a deadline) until `sql` counts at least `want`.
async fn wait_count(db: &PgDb, sql: &str, want: i64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let n = count(db, sql).await;
        if n >= want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {sql} >= {want} (at {n})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Completed runs as `(entry, due, claimed, finished)` in ms, by claim time.
async fn completed(db: &PgDb) -> Vec<(Uuid, i64, i64, i64)> {
    db.client()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .query(
            "SELECT entry_id, due_at, claimed_at, finished_at FROM scheduler_runs
             WHERE state = 'completed' ORDER BY claimed_at, due_at",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

async fn stop(nodes: Vec<(Runtime, Arc<TaskScheduler>)>, url: &str, schema: &str) {
    for (rt, _) in nodes {
        rt.shutdown(Duration::from_secs(5)).await;
    }
    drop_schema(url, schema).await;
}

fn every_second(overlap: OverlapPolicy) -> RecurringTaskConfig {
    RecurringTaskConfig::new("ledger", json!({}), "* * * * * *")
        .policy(SchedulePolicy::default().overlap(overlap))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queue_one_runs_one_at_a_time_with_one_waiting_across_nodes() {
    let Some(url) = database_url("queue_one_runs_one_at_a_time_with_one_waiting_across_nodes")
    else {
        return;
    };
    let schema = format!("t_{}", Uuid::new_v4().simple());
    // Runs take 1.5 s; the entry is due every second.
    let (nodes, db) = cluster(&url, &schema, Duration::from_millis(1500)).await;
    let id = nodes[0]
        .1
        .schedule_recurring_task(every_second(OverlapPolicy::QueueOne))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    wait_count(
        &db,
        "SELECT count(*) FROM scheduler_runs WHERE state = 'completed'",
        6,
        Duration::from_secs(40),
    )
    .await;
    assert!(
        nodes[1]
            .1
            .cancel_task(id)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    );
    let runs = completed(&db).await;
    for w in runs.windows(2) {
        let (_, prev_due, _, prev_end) = w[0];
        let (_, due, claimed, _) = w[1];
        // Never two at once, on any node: a run is claimed only after the previous ended.
        assert!(claimed >= prev_end, "runs overlap: {runs:?}");
        assert!(due > prev_due, "out of order: {runs:?}");
    }
    for &(_, due, claimed, _) in &runs {
        // One waiting occurrence at most: a run starts within about one period after the
        // previous ended. With every passed occurrence waiting, each run would start half a
        // second later than the one before (2.5 s late by the sixth).
        assert!(
            claimed - due < 2000,
            "a run started {} ms after its due time: {runs:?}",
            claimed - due
        );
    }
    // Occurrences due while one ran and one waited were skipped.
    assert!(
        runs.windows(2).any(|w| w[1].1 - w[0].1 >= 2000),
        "nothing skipped: {runs:?}"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM ledger WHERE executions > 1").await,
        0
    );
    stop(nodes, &url, &schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn allow_caps_concurrent_runs_across_nodes() {
    let Some(url) = database_url("allow_caps_concurrent_runs_across_nodes") else {
        return;
    };
    let schema = format!("t_{}", Uuid::new_v4().simple());
    // Runs take 2.5 s; the entry is due every second; two may run at once on all nodes.
    let (nodes, db) = cluster(&url, &schema, Duration::from_millis(2500)).await;
    let mut config = every_second(OverlapPolicy::Allow);
    config.policy = config.policy.max_concurrent(2);
    let id = nodes[2]
        .1
        .schedule_recurring_task(config)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    wait_count(
        &db,
        "SELECT count(*) FROM scheduler_runs WHERE state = 'completed'",
        6,
        Duration::from_secs(40),
    )
    .await;
    assert!(
        nodes[0]
            .1
            .cancel_task(id)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    );
    let runs = completed(&db).await;
    // How many ran at each run's start, on all nodes together.
    let mut most = 0;
    for &(_, _, start, _) in &runs {
        let at_once = runs
            .iter()
            .filter(|&&(_, _, s, f)| s <= start && start < f)
            .count();
        most = most.max(at_once);
    }
    assert_eq!(
        most, 2,
        "at most two at once, and two did run together: {runs:?}"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM ledger WHERE executions > 1").await,
        0
    );
    stop(nodes, &url, &schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jitter_delays_runs_across_nodes() {
    let Some(url) = database_url("jitter_delays_runs_across_nodes") else {
        return;
    };
    let schema = format!("t_{}", Uuid::new_v4().simple());
    let (nodes, db) = cluster(&url, &schema, Duration::ZERO).await;
    let jitter = Duration::from_millis(800);
    let mut ids = Vec::new();
    for i in 0..8 {
        let config = every_second(OverlapPolicy::Allow).jitter(jitter);
        ids.push(
            nodes[i % 3]
                .1
                .schedule_recurring_task(config)
                .await
                .unwrap_or_else(|e| panic!("{e}")),
        );
    }
    wait_count(
        &db,
        "SELECT count(*) FROM scheduler_runs WHERE state = 'completed'",
        40,
        Duration::from_secs(40),
    )
    .await;
    for id in ids {
        assert!(
            nodes[0]
                .1
                .cancel_task(id)
                .await
                .unwrap_or_else(|e| panic!("{e}"))
        );
    }
    let runs = completed(&db).await;
    let delays: Vec<i64> = runs
        .iter()
        .map(|&(_, due, claimed, _)| claimed - due)
        .collect();
    // Never before the due time; within the jitter plus the poll and some scheduling slack.
    assert!(
        delays.iter().all(|&d| (0..800 + 700).contains(&d)),
        "{delays:?}"
    );
    // Spread over the jitter: without it runs start within a poll or two of their due time.
    let late = delays.iter().filter(|&&d| d >= 250).count();
    assert!(late * 3 >= delays.len(), "jitter not applied: {delays:?}");
    let mut distinct = delays.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert!(
        distinct.len() * 2 >= delays.len(),
        "delays not spread: {delays:?}"
    );
    // Jitter is no misfire: every occurrence of an entry ran, in turn.
    let mut by_entry: std::collections::HashMap<Uuid, Vec<i64>> = std::collections::HashMap::new();
    for &(entry, due, _, _) in &runs {
        by_entry.entry(entry).or_default().push(due);
    }
    for dues in by_entry.values_mut() {
        dues.sort_unstable();
        assert!(
            dues.windows(2).all(|w| w[1] - w[0] == 1000),
            "occurrences skipped: {dues:?}"
        );
    }
    stop(nodes, &url, &schema).await;
}
