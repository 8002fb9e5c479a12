//! Crash test: a child process runs many sagas on a SQLite file and is killed with SIGKILL in
//! the middle; a restart on the same file must finish every saga, and the ledger the steps
//! write must show no step completed twice except the ones running at the kill.
#![cfg(feature = "sqlite")]

mod support;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use architectlm_core::extensions::Pagination;
use architectlm_core::extensions::SagaCoordinator;
use architectlm_core::extensions::saga::{
    SagaDefinition, SagaFilter, SagaInstance, SagaStatus, SagaStep, SagaStepStatus,
};
use architectlm_core::{Runtime, System, TaskDefinition, TaskError};
use architectlm_saga::{Coordinator, SagaStore, SqliteSagaStore};
use architectlm_store::sqlite::{SqliteDb, SqliteOptions};
use parking_lot::Mutex;
use serde_json::{Value, json};

const CHILD_ENV: &str = "ARCHITECTLM_SAGA_CRASH_DIR";
const SAGAS: usize = 2000;

/// Appends one line per completed step or compensation; one `write` call per line.
#[derive(Clone)]
struct Ledger(Arc<Mutex<std::fs::File>>);

impl Ledger {
    fn open(path: &Path) -> Self {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        Self(Arc::new(Mutex::new(f)))
    }

    fn record(&self, key: &str) -> Result<(), TaskError> {
        self.0
            .lock()
            .write_all(format!("{key}\n").as_bytes())
            .map_err(|e| TaskError::new(e.to_string()))
    }
}

fn system(ledger: &Ledger) -> System {
    let task = |id: &'static str, may_fail: bool| {
        let ledger = ledger.clone();
        TaskDefinition::new(id, move |input: Value, ctx| {
            let ledger = ledger.clone();
            async move {
                let pause = 1 + (ctx.execution_id().as_u128() % 4) as u64;
                tokio::time::sleep(Duration::from_millis(pause)).await;
                if may_fail && input["input"]["fail"] == json!(true) {
                    return Err(TaskError::permanent("payment declined"));
                }
                ledger.record(ctx.idempotency_key().unwrap_or("no-key"))?;
                Ok(json!({"by": id}))
            }
        })
        .unwrap()
    };
    System::builder("crash")
        .task(task("work", false))
        .task(task("pay", true))
        .task(task("undo", false))
        .build()
        .unwrap()
}

fn definition() -> SagaDefinition {
    SagaDefinition::new("order")
        .step(SagaStep::task("s1", "work").compensate_with("undo"))
        .step(SagaStep::task("s2", "work").compensate_with("undo"))
        .step(SagaStep::task("s3", "pay").compensate_with("undo"))
        .step(SagaStep::task("s4", "work").compensate_with("undo"))
}

async fn coordinator(db: &Path, ledger: &Ledger) -> (Coordinator, Runtime, SqliteSagaStore) {
    let store = SqliteSagaStore::open(SqliteDb::open(SqliteOptions::file(db)).unwrap())
        .await
        .unwrap();
    let sagas = Coordinator::with_store(Arc::new(store.clone()));
    sagas.define_saga(definition()).await.unwrap();
    let rt = Runtime::builder(system(ledger))
        .extension(Arc::new(sagas.clone()))
        .start()
        .await
        .unwrap();
    (sagas, rt, store)
}

/// The child: starts sagas one by one until it is killed.
#[test]
#[ignore = "the child process of `sigkill_mid_run_loses_nothing`"]
fn crash_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV).map(PathBuf::from) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let ledger = Ledger::open(&dir.join("ledger.txt"));
        let (sagas, _rt, _store) = coordinator(&dir.join("sagas.sqlite"), &ledger).await;
        for batch in 0..SAGAS / 10 {
            let starts = (0..10).map(|j| {
                let i = batch * 10 + j;
                sagas.start_saga("order", json!({"n": i, "fail": i % 4 == 3}))
            });
            for r in futures::future::join_all(starts).await {
                r.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Wait to be killed; finishing would make the test meaningless.
        tokio::time::sleep(Duration::from_secs(600)).await;
    });
}

fn ledger_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

async fn all_instances(store: &SqliteSagaStore) -> Vec<SagaInstance> {
    store
        .list(&SagaFilter::all().page(Pagination::new(0, 100_000)))
        .await
        .unwrap()
        .items
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_run_loses_nothing_and_repeats_only_running_steps() {
    let dir = std::env::temp_dir().join(format!("alm-saga-crash-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let ledger_path = dir.join("ledger.txt");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "crash_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once a good share of the work is done, while sagas are in flight.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if ledger_lines(&ledger_path).len() >= 1500 {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the child exited on its own"
        );
        assert!(Instant::now() < deadline, "the child made no progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    // What the journal says was in flight at the kill.
    let db = dir.join("sagas.sqlite");
    let mut in_flight_keys = HashSet::new();
    let unfinished_at_kill;
    {
        let store = SqliteSagaStore::open(SqliteDb::open(SqliteOptions::file(&db)).unwrap())
            .await
            .unwrap();
        let before = all_instances(&store).await;
        unfinished_at_kill = before.iter().filter(|i| !i.status.is_terminal()).count();
        for i in &before {
            for s in &i.steps {
                match s.status {
                    SagaStepStatus::Running => {
                        in_flight_keys.insert(s.idempotency_key.clone());
                    }
                    SagaStepStatus::Compensating => {
                        in_flight_keys.insert(format!("{}:compensation", s.idempotency_key));
                    }
                    _ => {}
                }
            }
        }
    }
    assert!(
        unfinished_at_kill > 0,
        "the kill should interrupt running sagas"
    );

    // Restart on the same file: recovery carries every saga on.
    let ledger = Ledger::open(&ledger_path);
    let (sagas, rt, store) = coordinator(&db, &ledger).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let open = sagas
            .list_sagas(
                SagaFilter::all()
                    .status(SagaStatus::Created)
                    .status(SagaStatus::Running)
                    .status(SagaStatus::Compensating),
            )
            .await
            .unwrap();
        if open.total == 0 && sagas.active() == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} sagas never finished",
            open.total
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    rt.shutdown(Duration::from_secs(5)).await;

    let after = all_instances(&store).await;
    assert!(!after.is_empty());
    let mut counts: HashMap<String, usize> = HashMap::new();
    for line in ledger_lines(&ledger_path) {
        *counts.entry(line).or_default() += 1;
    }
    for i in &after {
        let fail = i.input["fail"] == json!(true);
        let expected = if fail {
            SagaStatus::Compensated
        } else {
            SagaStatus::Completed
        };
        assert_eq!(
            i.status, expected,
            "saga {} ({:?}) ended {:?}",
            i.id, i.input, i.status
        );
        let keys: Vec<String> = if fail {
            vec![
                i.steps[0].idempotency_key.clone(),
                i.steps[1].idempotency_key.clone(),
                format!("{}:compensation", i.steps[1].idempotency_key),
                format!("{}:compensation", i.steps[0].idempotency_key),
            ]
        } else {
            i.steps.iter().map(|s| s.idempotency_key.clone()).collect()
        };
        for k in keys {
            assert!(
                counts.contains_key(&k),
                "completed step {k} left no ledger line"
            );
        }
        if fail {
            assert!(!counts.contains_key(&i.steps[3].idempotency_key));
        }
    }
    for (key, n) in &counts {
        if *n > 1 {
            assert!(
                in_flight_keys.contains(key),
                "{key} completed {n} times but was not running at the kill"
            );
            assert_eq!(*n, 2, "{key} completed {n} times");
        }
    }
    let repeated = counts.values().filter(|n| **n > 1).count();
    eprintln!(
        "crash test: {} sagas, {unfinished_at_kill} unfinished at the kill, {} steps in flight, {repeated} repeated",
        after.len(),
        in_flight_keys.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
