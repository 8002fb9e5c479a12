//! Crash test: a child process with a SQLite store is killed with SIGKILL while runs are due;
//! after a restart, the ledger the task writes shows no lost and no duplicated
//! `(entry, due time)`, except a documented re-run of runs that were in flight at the kill.
#![cfg(all(unix, feature = "sqlite"))]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use architectlm_core::extensions::scheduler::{
    RecurringTaskConfig, ScheduledTaskConfig, ScheduledTaskFilter, ScheduledTaskStatus, Scheduler,
};
use architectlm_core::{Runtime, System, TaskDefinition, TaskError};
use architectlm_scheduler::TaskScheduler;
use architectlm_store::schedule::{ScheduleStore, SqliteScheduleStore};
use architectlm_store::sqlite::{SqliteDb, SqliteOptions};
use chrono::{DateTime, Utc};
use serde_json::json;

const CHILD_ENV: &str = "ARCHITECTLM_SCHEDULER_CRASH_DIR";
const MODE_ENV: &str = "ARCHITECTLM_SCHEDULER_CRASH_MODE";
const ONE_SHOTS: usize = 300;
const RECURRING: usize = 4;
const RECURRING_RUNS: u32 = 5;

fn system(ledger: PathBuf) -> System {
    let task = TaskDefinition::new("ledger", move |_input, ctx| {
        let ledger = ledger.clone();
        async move {
            // Long enough that several runs are in flight when the kill comes.
            tokio::time::sleep(Duration::from_millis(15)).await;
            let key = ctx.idempotency_key().unwrap_or("no-key").to_owned();
            let line = format!("{key}\t{}\n", Utc::now().to_rfc3339());
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&ledger)
                .map_err(|e| TaskError::new(e.to_string()))?;
            f.write_all(line.as_bytes())
                .map_err(|e| TaskError::new(e.to_string()))?;
            Ok(json!({}))
        }
    });
    System::builder("crash")
        .task(task.unwrap_or_else(|e| panic!("{e}")))
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn open_store(dir: &Path) -> Arc<SqliteScheduleStore> {
    let db = SqliteDb::open(SqliteOptions::file(dir.join("schedule.sqlite")))
        .unwrap_or_else(|e| panic!("{e}"));
    Arc::new(
        SqliteScheduleStore::open(db)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    )
}

async fn active(store: &SqliteScheduleStore) -> u64 {
    let f = ScheduledTaskFilter::new()
        .status(ScheduledTaskStatus::Scheduled)
        .status(ScheduledTaskStatus::Running)
        .status(ScheduledTaskStatus::Paused)
        .limit(1);
    store.query(&f).await.map(|p| p.total).unwrap_or(u64::MAX)
}

/// The child: schedules (first life) or recovers (second life), and works until killed or done.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let setup = std::env::var(MODE_ENV).as_deref() == Ok("setup");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    rt.block_on(async move {
        let store = open_store(&dir).await;
        let scheduler = Arc::new(TaskScheduler::builder().store(store.clone()).build());
        let _runtime = Runtime::builder(system(dir.join("ledger")))
            .extension(scheduler.clone())
            .start()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        if setup {
            let now = Utc::now();
            let configs = (0..ONE_SHOTS)
                .map(|i| {
                    let at = now
                        + chrono::Duration::milliseconds(
                            300 + (i as i64 * 1500) / ONE_SHOTS as i64,
                        );
                    ScheduledTaskConfig::new("ledger", json!({"i": i}), at)
                })
                .collect();
            scheduler
                .schedule_many(configs)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            for _ in 0..RECURRING {
                scheduler
                    .schedule_recurring_task(
                        RecurringTaskConfig::new("ledger", json!({}), "* * * * * *")
                            .max_executions(RECURRING_RUNS),
                    )
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
            }
            println!("READY");
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if !setup && active(&store).await == 0 {
                println!("DONE");
                break;
            }
            if Instant::now() > deadline {
                let f = ScheduledTaskFilter::new()
                    .status(ScheduledTaskStatus::Scheduled)
                    .status(ScheduledTaskStatus::Running)
                    .limit(3);
                let left = store.query(&f).await.map(|p| p.items).unwrap_or_default();
                let runs = match left.first() {
                    Some(e) => store.runs(e.id()).await.unwrap_or_default(),
                    None => Vec::new(),
                };
                panic!("the child did not finish in time: {left:#?} {runs:#?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

fn spawn_child(dir: &Path, mode: &str) -> (Child, std::sync::mpsc::Receiver<String>) {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("{e}"));
    let mut child = Command::new(exe)
        .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir)
        .env(MODE_ENV, mode)
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

fn wait_line(rx: &std::sync::mpsc::Receiver<String>, want: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.trim().ends_with(want) => return,
            Ok(_) => {}
            Err(e) => panic!("no {want} from the child: {e}"),
        }
    }
}

fn ledger(dir: &Path) -> Vec<(String, DateTime<Utc>)> {
    std::fs::read_to_string(dir.join("ledger"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (k, t) = l.split_once('\t')?;
            Some((
                k.to_owned(),
                DateTime::parse_from_rfc3339(t).ok()?.with_timezone(&Utc),
            ))
        })
        .collect()
}

#[test]
fn sigkill_while_runs_are_due_loses_nothing_and_repeats_nothing_completed() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("alm-sched-crash-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));

    let (mut child, rx) = spawn_child(&dir, "setup");
    wait_line(&rx, "READY", Duration::from_secs(60));
    // Kill once a good part of the runs happened, while the rest are due or running.
    let deadline = Instant::now() + Duration::from_secs(30);
    while ledger(&dir).len() < ONE_SHOTS / 3 {
        assert!(Instant::now() < deadline, "the child made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap_or_else(|e| panic!("{e}")); // SIGKILL
    let _ = child.wait();
    let before = ledger(&dir).len();
    assert!(
        before < ONE_SHOTS + RECURRING * RECURRING_RUNS as usize,
        "killed too late"
    );

    let (mut child, rx) = spawn_child(&dir, "recover");
    wait_line(&rx, "DONE", Duration::from_secs(90));
    let _ = child.wait();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    rt.block_on(async {
        let store = open_store(&dir).await;
        let entries = store
            .query(&ScheduledTaskFilter::new().limit(10_000))
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .items;
        assert_eq!(entries.len(), ONE_SHOTS + RECURRING);
        let lines = ledger(&dir);
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for (k, _) in &lines {
            *counts.entry(k.as_str()).or_default() += 1;
        }
        let mut expected = 0;
        let mut reruns = 0;
        let mut restarted = 0;
        for e in &entries {
            assert_eq!(e.task.status, ScheduledTaskStatus::Completed, "{:?}", e.task);
            let runs = store.runs(e.id()).await.unwrap_or_else(|err| panic!("{err}"));
            let want = if e.task.is_recurring() { RECURRING_RUNS as usize } else { 1 };
            assert_eq!(runs.len(), want, "runs of {}", e.id());
            for r in runs {
                expected += 1;
                restarted += usize::from(r.starts >= 2);
                let key = format!("{}@{}", e.id(), r.due_at.to_rfc3339());
                let n = counts.get(key.as_str()).copied().unwrap_or(0);
                assert!(n >= 1, "lost: {key}");
                if n > 1 {
                    // Only a run the kill interrupted may run again (at least once).
                    assert!(r.starts >= 2, "duplicated without a crash: {key} ran {n} times");
                    reruns += n - 1;
                }
            }
        }
        // Nothing ran early, and nothing outside the expected set ran.
        for (k, at) in &lines {
            let due = k
                .split_once('@')
                .and_then(|(_, d)| DateTime::parse_from_rfc3339(d).ok())
                .unwrap_or_else(|| panic!("bad key {k}"));
            assert!(*at >= due, "{k} ran early at {at}");
        }
        assert_eq!(counts.len(), expected, "keys outside the expected runs");
        // Re-runs are bounded by what can be in flight at once (2 worker threads, 15 ms tasks).
        assert!(reruns <= 64, "{reruns} re-runs");
        eprintln!(
            "crash test: {before} runs before the kill, {} ledger lines, {expected} runs, {restarted} restarted after the kill, {reruns} of them had already written their line",
            lines.len()
        );
    });
    let _ = std::fs::remove_dir_all(&dir);
}
