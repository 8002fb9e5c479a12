//! Several scheduler nodes on one PostgreSQL database: three nodes in this process and one
//! child process killed with SIGKILL mid-work. Every `(entry, due time)` must run, none may be
//! lost, none may run twice on live nodes, and the dead node's claimed runs must be run again
//! elsewhere (same idempotency key) once their lease expires.
#![cfg(all(unix, feature = "postgres"))]

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use architectlm_core::extensions::scheduler::{
    RecurringTaskConfig, ScheduledTaskConfig, ScheduledTaskStatus, Scheduler,
};
use architectlm_core::{Runtime, System, TaskDefinition, TaskError};
use architectlm_scheduler::{ClusterOptions, TaskScheduler};
use architectlm_store::postgres::PgDb;
use architectlm_store::schedule::PgScheduleStore;
use chrono::Utc;
use serde_json::json;
use uuid::Uuid;

mod support;
use support::pg::{connect, connect_named, database_url, drop_schema};

const SCHEMA_ENV: &str = "ARCHITECTLM_SCHEDULER_PG_CHILD_SCHEMA";
/// Scheduled runs in the crash test.
const RUNS: usize = 10_000;
const LEASE: Duration = Duration::from_secs(2);
const POLL: Duration = Duration::from_millis(50);

/// A task that records each execution in the ledger table, keyed by its idempotency key.
fn system(db: PgDb, node: String, pause: Duration) -> System {
    let task = TaskDefinition::new("ledger", move |_input, ctx| {
        let db = db.clone();
        let node = node.clone();
        async move {
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            let key = ctx.idempotency_key().unwrap_or("no-key").to_owned();
            let client = db
                .client()
                .await
                .map_err(|e| TaskError::new(e.to_string()))?;
            client
                .execute(
                    "INSERT INTO ledger (key, node, executions, nodes) VALUES ($1, $2, 1, $2)
                     ON CONFLICT (key) DO UPDATE SET executions = ledger.executions + 1,
                        nodes = ledger.nodes || ',' || excluded.node",
                    &[&key, &node],
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

async fn node(
    url: &str,
    schema: &str,
    name: &str,
    pause: Duration,
    max_in_flight: usize,
) -> (Runtime, Arc<TaskScheduler>) {
    let db = connect_named(url, schema, 12, &application_name(name, schema)).await;
    let store = Arc::new(
        PgScheduleStore::open(db.clone())
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let scheduler = Arc::new(
        TaskScheduler::builder()
            .cluster(
                store,
                ClusterOptions::new(name)
                    .lease(LEASE)
                    .poll_interval(POLL)
                    .max_in_flight(max_in_flight),
            )
            .build(),
    );
    let runtime = Runtime::builder(system(db, name.to_owned(), pause))
        .extension(scheduler.clone())
        .start()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    (runtime, scheduler)
}

/// The `application_name` of node `name`'s connections: a killed node's transactions are
/// settled once none of its connections is left in `pg_stat_activity`.
fn application_name(name: &str, schema: &str) -> String {
    format!("{name}-{schema}")
}

/// The child node: works on the shared schema until it is killed.
#[test]
fn cluster_child_node() {
    let Ok(schema) = std::env::var(SCHEMA_ENV) else {
        return;
    };
    let Some(url) = database_url("cluster_child_node") else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    rt.block_on(async move {
        // Slow runs, so that some are in flight when the kill comes.
        let (_runtime, _scheduler) =
            node(&url, &schema, "child", Duration::from_millis(100), 64).await;
        println!("READY");
        tokio::time::sleep(Duration::from_secs(120)).await;
    });
}

fn spawn_child(schema: &str) -> (Child, std::sync::mpsc::Receiver<String>) {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("{e}"));
    let mut child = Command::new(exe)
        .args([
            "cluster_child_node",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(SCHEMA_ENV, schema)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

async fn count(db: &PgDb, sql: &str) -> i64 {
    let client = db.client().await.unwrap_or_else(|e| panic!("{e}"));
    client
        .query_one(sql, &[])
        .await
        .and_then(|r| r.try_get(0))
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Waits until no server process serves connections named `application_name` (a node's
/// name and a schema: nothing to quote).
async fn wait_gone(db: &PgDb, application_name: &str) {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{application_name}'"
    );
    wait_for(db, &sql, |n| n == 0, "= 0", Duration::from_secs(30)).await;
}

/// Waits (polling the database, with a deadline) until `sql` counts at least `want`.
async fn wait_count(db: &PgDb, sql: &str, want: i64, within: Duration) -> i64 {
    wait_for(db, sql, |n| n >= want, &format!(">= {want}"), within).await
}

/// Waits (polling the database, with a deadline) until the count `sql` reads is `done`
/// (`wanted` says how, for the timeout's message).
async fn wait_for(
    db: &PgDb,
    sql: &str,
    done: impl Fn(i64) -> bool,
    wanted: &str,
    within: Duration,
) -> i64 {
    let deadline = Instant::now() + within;
    loop {
        let n = count(db, sql).await;
        if done(n) {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {sql} {wanted} (at {n})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_and_a_killed_one_run_each_occurrence_exactly_once() {
    if std::env::var(SCHEMA_ENV).is_ok() {
        return;
    }
    let Some(url) = database_url("three_nodes_and_a_killed_one") else {
        return;
    };
    let schema = format!("t_{}", Uuid::new_v4().simple());
    let db = connect(&url, &schema, 4).await;
    PgScheduleStore::open(db.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    db.client()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .batch_execute(
            "CREATE TABLE ledger (key TEXT PRIMARY KEY, node TEXT NOT NULL, executions INTEGER NOT NULL, nodes TEXT NOT NULL)",
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let (mut child, lines) = spawn_child(&schema);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(l) if l.trim().ends_with("READY") => break,
            Ok(_) => {}
            Err(e) => panic!("the child node did not start: {e}"),
        }
    }
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(node(&url, &schema, &format!("node-{i}"), Duration::ZERO, 4096).await);
    }

    // Each node schedules a third of the runs; due times spread over three seconds.
    let start = Utc::now() + chrono::Duration::milliseconds(500);
    let mut created: HashMap<Uuid, usize> = HashMap::new();
    let mut expected: HashSet<String> = HashSet::new();
    for (i, (_, scheduler)) in nodes.iter().enumerate() {
        let configs: Vec<ScheduledTaskConfig> = (0..RUNS)
            .filter(|k| k % 3 == i)
            .map(|k| {
                let at = start + chrono::Duration::milliseconds((k as i64 * 3000) / RUNS as i64);
                ScheduledTaskConfig::new("ledger", json!({"k": k}), at)
            })
            .collect();
        let ats: Vec<_> = configs.iter().map(|c| c.execute_at).collect();
        let ids = scheduler
            .schedule_many(configs)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        for (id, at) in ids.into_iter().zip(ats) {
            created.insert(id, i);
            let due = architectlm_store::schedule::truncate_ms(at);
            expected.insert(format!("{id}@{}", due.to_rfc3339()));
        }
    }
    // A recurring entry too: every second, three runs.
    let recurring = nodes[0]
        .1
        .schedule_recurring_task(
            RecurringTaskConfig::new("ledger", json!({}), "* * * * * *").max_executions(3),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // Kill the child once it has executed some runs and holds others in flight.
    wait_count(
        &db,
        "SELECT count(*) FROM ledger WHERE node = 'child'",
        1,
        Duration::from_secs(30),
    )
    .await;
    wait_count(
        &db,
        "SELECT count(*) FROM scheduler_runs WHERE owner = 'child' AND state = 'claimed'",
        1,
        Duration::from_secs(30),
    )
    .await;
    child.kill().unwrap_or_else(|e| panic!("{e}"));
    let killed_at = Instant::now();
    let _ = child.wait();
    // A transaction the child sent before dying (a claim's COMMIT, say) may still be read by
    // its server process: the runs it held are known once its connections are gone.
    wait_gone(&db, &application_name("child", &schema)).await;
    let held: HashSet<(Uuid, i64)> = {
        let client = db.client().await.unwrap_or_else(|e| panic!("{e}"));
        client
            .query(
                "SELECT entry_id, due_at FROM scheduler_runs WHERE owner = 'child' AND state = 'claimed'",
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    };
    assert!(!held.is_empty(), "the child held no runs at the kill");

    // Failover: the dead node's runs are run elsewhere once their lease expires.
    let ids: Vec<Uuid> = held.iter().map(|h| h.0).collect();
    let dues: Vec<i64> = held.iter().map(|h| h.1).collect();
    // Taken over: every held run has a new owner (or is already recorded as finished).
    let takeover = {
        let deadline = Instant::now() + LEASE * 10;
        loop {
            let client = db.client().await.unwrap_or_else(|e| panic!("{e}"));
            let open: i64 = client
                .query_one(
                    "SELECT count(*) FROM scheduler_runs AS r
                     JOIN unnest($1::uuid[], $2::int8[]) AS h(entry_id, due_at)
                       ON r.entry_id = h.entry_id AND r.due_at = h.due_at
                     WHERE r.state = 'claimed' AND r.owner = 'child'",
                    &[&ids, &dues],
                )
                .await
                .and_then(|r| r.try_get(0))
                .unwrap_or_else(|e| panic!("{e}"));
            if open == 0 {
                break killed_at.elapsed();
            }
            assert!(
                Instant::now() < deadline,
                "{open} runs of the dead node were not taken over"
            );
            drop(client);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    // Within the lease (counted from the dead node's last renewal) plus a poll; the bound
    // here is loose so that a loaded machine does not fail the test.
    assert!(
        takeover < LEASE * 3,
        "takeover took {takeover:?} with a lease of {LEASE:?}"
    );
    let failover = {
        let deadline = Instant::now() + LEASE * 10;
        loop {
            let client = db.client().await.unwrap_or_else(|e| panic!("{e}"));
            let open: i64 = client
                .query_one(
                    "SELECT count(*) FROM scheduler_runs AS r
                     JOIN unnest($1::uuid[], $2::int8[]) AS h(entry_id, due_at)
                       ON r.entry_id = h.entry_id AND r.due_at = h.due_at
                     WHERE r.state = 'claimed'",
                    &[&ids, &dues],
                )
                .await
                .and_then(|r| r.try_get(0))
                .unwrap_or_else(|e| panic!("{e}"));
            if open == 0 {
                break killed_at.elapsed();
            }
            assert!(
                Instant::now() < deadline,
                "{open} runs of the dead node were not taken over"
            );
            drop(client);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    eprintln!(
        "{} runs held by the killed node: taken over after {takeover:?}, all re-run and recorded after {failover:?} (lease {LEASE:?})",
        held.len()
    );

    // Everything runs: wait for every run to be recorded as finished.
    let total = RUNS as i64 + 3;
    wait_count(
        &db,
        "SELECT count(*) FROM scheduler_runs WHERE state = 'completed'",
        total,
        Duration::from_secs(45),
    )
    .await;

    // The ledger: every expected one-shot key once, nothing else but the recurring runs.
    let client = db.client().await.unwrap_or_else(|e| panic!("{e}"));
    let rows = client
        .query("SELECT key, node, executions, nodes FROM ledger", &[])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut by_node: HashMap<String, usize> = HashMap::new();
    let mut cross = [false; 3];
    let mut seen = HashSet::new();
    let mut recurring_runs = 0;
    let mut reruns = 0;
    for r in &rows {
        let key: String = r.get(0);
        let node: String = r.get(1);
        let executions: i32 = r.get(2);
        *by_node.entry(node.clone()).or_default() += 1;
        if key.starts_with(&recurring.to_string()) {
            recurring_runs += 1;
        } else {
            assert!(expected.contains(&key), "unexpected ledger key {key}");
            seen.insert(key.clone());
        }
        if executions > 1 {
            // Only a run the dead node had executed and not recorded may run twice.
            let nodes: String = r.get(3);
            let id: Uuid = key
                .split_once('@')
                .and_then(|(id, _)| id.parse().ok())
                .unwrap_or_default();
            let run = client
                .query_one(
                    "SELECT starts, owner, state FROM scheduler_runs WHERE entry_id = $1",
                    &[&id],
                )
                .await
                .map(|r| {
                    format!(
                        "{:?} {:?} {:?}",
                        r.get::<_, i32>(0),
                        r.get::<_, Option<String>>(1),
                        r.get::<_, String>(2)
                    )
                })
                .unwrap_or_default();
            assert_eq!(
                node, "child",
                "{key} ran {executions} times, on {nodes}; run {run}"
            );
            let (id, due) = key.split_once('@').unwrap_or_else(|| panic!("{key}"));
            let id: Uuid = id.parse().unwrap_or_else(|e| panic!("{e}"));
            let due = chrono::DateTime::parse_from_rfc3339(due)
                .unwrap_or_else(|e| panic!("{e}"))
                .timestamp_millis();
            assert!(
                held.contains(&(id, due)),
                "{key} ran twice but was not held by the dead node"
            );
            reruns += 1;
        }
        if let Some(i) = node
            .strip_prefix("node-")
            .and_then(|i| i.parse::<usize>().ok())
        {
            let id: Option<Uuid> = key.split_once('@').and_then(|(id, _)| id.parse().ok());
            if id.and_then(|id| created.get(&id)).is_some_and(|c| *c != i) {
                cross[i] = true;
            }
        }
    }
    assert_eq!(seen.len(), RUNS, "lost one-shot runs");
    assert_eq!(recurring_runs, 3, "recurring runs");
    assert_eq!(rows.len(), RUNS + 3);
    assert_eq!(
        cross, [true; 3],
        "every node runs entries other nodes scheduled: {by_node:?}"
    );
    // Each occurrence claimed once; the dead node's runs were started again.
    assert_eq!(
        count(&db, "SELECT count(*) FROM scheduler_runs").await,
        total
    );
    let restarted = count(&db, "SELECT count(*) FROM scheduler_runs WHERE starts > 1").await;
    assert_eq!(
        restarted,
        held.len() as i64,
        "runs held by the dead node are started again"
    );
    let done = nodes[0]
        .1
        .get_task(recurring)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("recurring entry"));
    assert_eq!(done.status, ScheduledTaskStatus::Completed);
    assert_eq!(done.execution_count, 3);
    eprintln!(
        "{RUNS} runs: per node {by_node:?}; {reruns} re-executed after the kill (of {} held)",
        held.len()
    );
    for (runtime, _) in nodes {
        runtime.shutdown(Duration::from_secs(5)).await;
    }
    drop_schema(&url, &schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_from_any_node_apply_cluster_wide() {
    let Some(url) = database_url("operations_from_any_node") else {
        return;
    };
    let schema = format!("t_{}", Uuid::new_v4().simple());
    let (ra, a) = node(&url, &schema, "a", Duration::ZERO, 64).await;
    let (rb, b) = node(&url, &schema, "b", Duration::ZERO, 64).await;
    let db = connect(&url, &schema, 2).await;
    db.client()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .batch_execute(
            "CREATE TABLE ledger (key TEXT PRIMARY KEY, node TEXT NOT NULL, executions INTEGER NOT NULL, nodes TEXT NOT NULL)",
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // Scheduled on a, paused on b: it does not run; resumed on b, it runs once.
    let id = a
        .schedule_task(ScheduledTaskConfig::new(
            "ledger",
            json!({}),
            Utc::now() + chrono::Duration::milliseconds(300),
        ))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(b.pause_task(id).await.unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(
        a.get_task(id).await.ok().flatten().map(|t| t.status),
        Some(ScheduledTaskStatus::Paused)
    );
    assert!(b.resume_task(id).await.unwrap_or_else(|e| panic!("{e}")));
    wait_count(
        &db,
        "SELECT count(*) FROM ledger",
        1,
        Duration::from_secs(20),
    )
    .await;
    // A trigger on b of an entry created on a runs it once more, with its own due time.
    let later = a
        .schedule_task(ScheduledTaskConfig::new(
            "ledger",
            json!({}),
            Utc::now() + chrono::Duration::hours(1),
        ))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        b.trigger_task(later)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    );
    wait_count(
        &db,
        "SELECT count(*) FROM ledger",
        2,
        Duration::from_secs(20),
    )
    .await;
    // Cancelled on a: never runs on b.
    assert!(a.cancel_task(later).await.unwrap_or_else(|e| panic!("{e}")));
    let t = b.get_task(later).await.ok().flatten();
    assert_eq!(t.map(|t| t.status), Some(ScheduledTaskStatus::Cancelled));
    let store = b.store().clone();
    let first = store
        .get(id)
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("entry"));
    // Wait until the first entry's end is recorded, then check it.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut first = first;
    while first.task.status != ScheduledTaskStatus::Completed {
        assert!(
            Instant::now() < deadline,
            "not completed: {:?}",
            first.task.status
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        first = store
            .get(id)
            .await
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("entry"));
    }
    assert_eq!(first.task.history.len(), 1);
    assert_eq!(
        count(&db, "SELECT count(*) FROM ledger WHERE executions > 1").await,
        0
    );
    ra.shutdown(Duration::from_secs(2)).await;
    rb.shutdown(Duration::from_secs(2)).await;
    drop_schema(&url, &schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlap_skip_holds_across_nodes() {
    let Some(url) = database_url("overlap_skip_holds_across_nodes") else {
        return;
    };
    let schema = format!("t_{}", Uuid::new_v4().simple());
    // Runs take 1.5 s; the entry is due every second.
    let pause = Duration::from_millis(1500);
    let (ra, a) = node(&url, &schema, "a", pause, 64).await;
    let (rb, _b) = node(&url, &schema, "b", pause, 64).await;
    let db = connect(&url, &schema, 2).await;
    db.client()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .batch_execute(
            "CREATE TABLE ledger (key TEXT PRIMARY KEY, node TEXT NOT NULL, executions INTEGER NOT NULL, nodes TEXT NOT NULL)",
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let id = a
        .schedule_recurring_task(
            RecurringTaskConfig::new("ledger", json!({}), "* * * * * *").policy(
                architectlm_core::extensions::scheduler::SchedulePolicy::default()
                    .overlap(architectlm_core::extensions::scheduler::OverlapPolicy::Skip),
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    wait_count(
        &db,
        "SELECT count(*) FROM scheduler_runs WHERE state = 'completed'",
        3,
        Duration::from_secs(30),
    )
    .await;
    assert!(a.cancel_task(id).await.unwrap_or_else(|e| panic!("{e}")));
    let client = db.client().await.unwrap_or_else(|e| panic!("{e}"));
    let runs: Vec<(i64, i64, Option<i64>)> = client
        .query(
            "SELECT due_at, claimed_at, finished_at FROM scheduler_runs
             WHERE state = 'completed' ORDER BY due_at",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    for w in runs.windows(2) {
        let (prev_due, _, prev_end) = w[0];
        let (due, claimed, _) = w[1];
        let prev_end = prev_end.unwrap_or_else(|| panic!("finished run without an end"));
        // Never two at once, on any node: a run is claimed only after the previous ended.
        assert!(claimed >= prev_end, "runs overlap: {runs:?}");
        // The occurrence(s) due while one ran were skipped.
        assert!(due - prev_due >= 2000, "no occurrence skipped: {runs:?}");
    }
    assert_eq!(
        count(&db, "SELECT count(*) FROM ledger WHERE executions > 1").await,
        0
    );
    ra.shutdown(Duration::from_secs(3)).await;
    rb.shutdown(Duration::from_secs(3)).await;
    drop_schema(&url, &schema).await;
}
