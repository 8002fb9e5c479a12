//! The coordinator on the SQLite journal: write-ahead order, recovery of unwinds and of
//! operator requests across a restart, fencing of a stale driver, and shared commits.
#![cfg(feature = "sqlite")]

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use architectlm_core::extensions::SagaCoordinator;
use architectlm_core::extensions::saga::{SagaDefinition, SagaStatus, SagaStep, SagaStepStatus};
use architectlm_core::{Runtime, TaskDefinition, TaskError};
use architectlm_saga::{Coordinator, SagaStore, SqliteSagaStore};
use architectlm_store::sqlite::{SqliteDb, SqliteOptions};
use serde_json::{Value, json};
use support::*;
use tokio::sync::Notify;

const WAIT: Duration = Duration::from_secs(30);

fn temp_db() -> PathBuf {
    std::env::temp_dir()
        .join(format!("alm-saga-{}", uuid::Uuid::new_v4()))
        .join("sagas.sqlite")
}

async fn open(path: &PathBuf) -> SqliteSagaStore {
    SqliteSagaStore::open(SqliteDb::open(SqliteOptions::file(path)).unwrap())
        .await
        .unwrap()
}

async fn node(
    store: &SqliteSagaStore,
    def: SagaDefinition,
    tasks: Vec<TaskDefinition>,
) -> (Coordinator, Runtime) {
    let sagas = Coordinator::builder()
        .store(Arc::new(store.clone()))
        .shutdown_timeout(Duration::from_millis(50))
        .build()
        .unwrap();
    sagas.define_saga(def).await.unwrap();
    let rt = runtime(system(tasks), &sagas).await;
    (sagas, rt)
}

/// A task that announces it started, then waits for the gate.
fn gated(id: &'static str, gate: Arc<Notify>, entered: Arc<Notify>, log: &Log) -> TaskDefinition {
    let log = log.clone();
    TaskDefinition::new(id, move |input: Value, ctx| {
        let (gate, entered, log) = (gate.clone(), entered.clone(), log.clone());
        async move {
            log.push(id, &input, ctx.idempotency_key());
            entered.notify_one();
            gate.notified().await;
            Ok(json!({"done": id}))
        }
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_runs_only_after_its_start_and_the_previous_result_are_journaled() {
    let path = temp_db();
    let store = open(&path).await;
    let seen = Log::default();
    let s = store.clone();
    let l = seen.clone();
    let probe = TaskDefinition::new("probe", move |_input: Value, ctx| {
        let (s, l) = (s.clone(), l.clone());
        async move {
            let key = ctx.idempotency_key().unwrap_or_default().to_owned();
            let id: uuid::Uuid = key
                .split(':')
                .next()
                .and_then(|x| x.parse().ok())
                .ok_or_else(|| TaskError::new("no key"))?;
            let journal = s
                .get(id)
                .await
                .map_err(|e| TaskError::new(e.to_string()))?
                .ok_or_else(|| TaskError::new("not journaled"))?;
            l.push(
                "probe",
                &serde_json::to_value(&journal.instance.steps).unwrap(),
                None,
            );
            Ok(json!("probed"))
        }
    })
    .unwrap();
    let log = Log::default();
    let (sagas, _rt) = node(
        &store,
        SagaDefinition::new("wal")
            .step(SagaStep::task("first", "step1"))
            .step(SagaStep::task("second", "probe")),
        vec![ok_task("step1", &log), probe],
    )
    .await;
    let started = sagas.start_saga("wal", json!({})).await.unwrap();
    let done = sagas.wait_for(started.id, WAIT).await.unwrap();
    assert_eq!(done.status, SagaStatus::Completed);
    let journal_seen_by_step_2 = &seen.inputs_of("probe")[0];
    assert_eq!(journal_seen_by_step_2[0]["status"], json!("completed"));
    assert_eq!(
        journal_seen_by_step_2[0]["result"],
        json!({"done": "step1"})
    );
    assert_eq!(journal_seen_by_step_2[1]["status"], json!("running"));
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_carries_an_unwind_on_and_fences_the_stale_driver() {
    let path = temp_db();
    let store = open(&path).await;
    let log = Log::default();
    let (gate, entered) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let def = || {
        SagaDefinition::new("unwind")
            .step(SagaStep::task("a", "step1").compensate_with("undo1"))
            .step(SagaStep::task("b", "step2").compensate_with("undo2"))
            .step(SagaStep::task("c", "fail"))
    };
    // Node A: its compensation of step "a" hangs, as if the process froze there.
    let (a, rt_a) = node(
        &store,
        def(),
        vec![
            ok_task("step1", &log),
            ok_task("step2", &log),
            failing_task("fail", &log),
            gated("undo1", gate.clone(), entered.clone(), &log),
            ok_task("undo2", &log),
        ],
    )
    .await;
    let started = a.start_saga("unwind", json!({})).await.unwrap();
    tokio::time::timeout(WAIT, entered.notified())
        .await
        .unwrap();
    let mid = store.get(started.id).await.unwrap().unwrap();
    assert_eq!(mid.instance.status, SagaStatus::Compensating);
    assert_eq!(mid.instance.steps[0].status, SagaStepStatus::Compensating);
    rt_a.shutdown(Duration::from_millis(10)).await;

    // Node B on the same file takes over and finishes the unwind.
    let log_b = Log::default();
    let (b, _rt_b) = node(
        &open(&path).await,
        def(),
        vec![
            ok_task("step1", &log_b),
            ok_task("step2", &log_b),
            failing_task("fail", &log_b),
            ok_task("undo1", &log_b),
            ok_task("undo2", &log_b),
        ],
    )
    .await;
    let done = b.wait_for(started.id, WAIT).await.unwrap();
    assert_eq!(done.status, SagaStatus::Compensated);
    // Only the interrupted compensation ran again, with the same key.
    assert_eq!(log_b.tasks(), vec!["undo1"]);
    assert_eq!(log_b.keys_of("undo1"), log.keys_of("undo1"));

    // A's driver wakes up late: its journal write is refused, nothing changes.
    gate.notify_one();
    let deadline = tokio::time::Instant::now() + WAIT;
    while a.active() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "A's driver never ended"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let after = store.get(started.id).await.unwrap().unwrap();
    assert_eq!(after.instance, done);
    assert!(after.fencing > mid.fencing);
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compensation_request_survives_a_restart() {
    let path = temp_db();
    let store = open(&path).await;
    let log = Log::default();
    let (gate, entered) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let def = || {
        SagaDefinition::new("req")
            .step(SagaStep::task("a", "step1").compensate_with("undo1"))
            .step(SagaStep::task("b", "slow").compensate_with("undo2"))
            .step(SagaStep::task("c", "step3"))
    };
    let (a, rt_a) = node(
        &store,
        def(),
        vec![
            ok_task("step1", &log),
            gated("slow", gate.clone(), entered.clone(), &log),
            ok_task("step3", &log),
            ok_task("undo1", &log),
            ok_task("undo2", &log),
        ],
    )
    .await;
    let started = a.start_saga("req", json!({})).await.unwrap();
    tokio::time::timeout(WAIT, entered.notified())
        .await
        .unwrap();
    a.compensate_saga(started.id, "fraud suspected")
        .await
        .unwrap();
    rt_a.shutdown(Duration::from_millis(10)).await;

    let log_b = Log::default();
    let (b, _rt_b) = node(
        &open(&path).await,
        def(),
        vec![
            ok_task("step1", &log_b),
            ok_task("slow", &log_b),
            ok_task("step3", &log_b),
            ok_task("undo1", &log_b),
            ok_task("undo2", &log_b),
        ],
    )
    .await;
    let done = b.wait_for(started.id, WAIT).await.unwrap();
    assert_eq!(done.status, SagaStatus::Compensated);
    assert!(done.error.as_deref().unwrap().contains("fraud suspected"));
    // The step running at the crash ran again (at least once), then the unwind.
    assert_eq!(log_b.tasks(), vec!["slow", "undo2", "undo1"]);
    gate.notify_one();
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sagas_share_journal_commits() {
    let path = temp_db();
    let store = open(&path).await;
    let log = Log::default();
    let mut def = SagaDefinition::new("many");
    for i in 0..5 {
        def = def.step(SagaStep::task(format!("s{i}"), "step1"));
    }
    let (sagas, _rt) = node(&store, def, vec![ok_task("step1", &log)]).await;
    let c0 = store.db().stats().commits.load(Ordering::Relaxed);
    let w0 = store.db().stats().writes.load(Ordering::Relaxed);
    let starts = (0..200).map(|_| sagas.start_saga("many", json!({})));
    let ids: Vec<_> = futures::future::join_all(starts)
        .await
        .into_iter()
        .map(|r| r.unwrap().id)
        .collect();
    for id in ids {
        assert_eq!(
            sagas.wait_for(id, WAIT).await.unwrap().status,
            SagaStatus::Completed
        );
    }
    let commits = store.db().stats().commits.load(Ordering::Relaxed) - c0;
    let writes = store.db().stats().writes.load(Ordering::Relaxed) - w0;
    // Six journal entries per saga (the create carrying the first start, four more starts
    // each carrying the previous result, the end): 1,200 entries shared far fewer write
    // closures and commits.
    let entries = 200 * 6;
    assert!(
        writes < entries,
        "{writes} write closures for {entries} journal entries"
    );
    assert!(
        commits <= writes,
        "{commits} commits for {writes} write closures"
    );
    assert_eq!(log.tasks().len(), 1000);
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_waiting_for_a_place_are_journaled_and_recovered_after_a_restart() {
    let path = temp_db();
    let store = open(&path).await;
    let def = || SagaDefinition::new("bounded").step(SagaStep::task("only", "work"));
    let bounded = |store: &SqliteSagaStore| {
        Coordinator::builder()
            .store(Arc::new(store.clone()))
            .max_in_flight(1)
            .shutdown_timeout(Duration::from_millis(50))
            .build()
            .unwrap()
    };
    // Node A: the first saga holds the only place and hangs in its step.
    let log = Log::default();
    let (gate, entered) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let a = bounded(&store);
    a.define_saga(def()).await.unwrap();
    let rt_a = runtime(
        system(vec![gated("work", gate.clone(), entered.clone(), &log)]),
        &a,
    )
    .await;
    let mut started = Vec::new();
    for n in 0..4 {
        started.push(a.start_saga("bounded", json!({"n": n})).await.unwrap());
    }
    tokio::time::timeout(WAIT, entered.notified())
        .await
        .unwrap();
    assert_eq!((a.in_flight(), a.waiting()), (1, 3));
    for s in &started[1..] {
        let stored = store.get(s.id).await.unwrap().unwrap();
        assert_eq!(stored.instance.status, SagaStatus::Created);
    }
    // The process stops with three sagas waiting: nothing of them is lost.
    rt_a.shutdown(Duration::from_millis(10)).await;
    assert_eq!(a.waiting(), 0);
    a.settled(started[3].id).await;

    let log_b = Log::default();
    let b = bounded(&open(&path).await);
    b.define_saga(def()).await.unwrap();
    let _rt_b = runtime(system(vec![ok_task("work", &log_b)]), &b).await;
    assert_eq!(b.recovery_report().unwrap().resumed, 4);
    for s in &started {
        let done = b.wait_for(s.id, WAIT).await.unwrap();
        assert_eq!(done.status, SagaStatus::Completed);
    }
    // The interrupted step runs again first, then the waiting sagas in start order.
    let ns: Vec<Value> = log_b
        .inputs_of("work")
        .iter()
        .map(|i| i["input"]["n"].clone())
        .collect();
    assert_eq!(ns, vec![json!(0), json!(1), json!(2), json!(3)]);
    gate.notify_waiters();
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_the_compensation_of_a_failed_step() {
    let path = temp_db();
    let store = open(&path).await;
    let def = || {
        SagaDefinition::new("charge")
            .step(SagaStep::task("reserve", "step1").compensate_with("undo1"))
            .step(
                SagaStep::task("charge", "fail")
                    .compensate_with("refund")
                    .compensate_on_failure(true),
            )
    };
    // Node A: the charge fails after the money may have moved; the refund hangs.
    let log = Log::default();
    let (gate, entered) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let (a, rt_a) = node(
        &store,
        def(),
        vec![
            ok_task("step1", &log),
            failing_task("fail", &log),
            ok_task("undo1", &log),
            gated("refund", gate.clone(), entered.clone(), &log),
        ],
    )
    .await;
    let started = a.start_saga("charge", json!({})).await.unwrap();
    tokio::time::timeout(WAIT, entered.notified())
        .await
        .unwrap();
    let mid = store.get(started.id).await.unwrap().unwrap();
    assert_eq!(mid.instance.status, SagaStatus::Compensating);
    assert_eq!(mid.instance.steps[0].status, SagaStepStatus::Completed);
    assert_eq!(mid.instance.steps[1].status, SagaStepStatus::Compensating);
    rt_a.shutdown(Duration::from_millis(10)).await;

    // Node B on the same file runs the interrupted refund again, then undoes the reservation.
    let log_b = Log::default();
    let (b, _rt_b) = node(
        &open(&path).await,
        def(),
        vec![
            ok_task("step1", &log_b),
            failing_task("fail", &log_b),
            ok_task("undo1", &log_b),
            ok_task("refund", &log_b),
        ],
    )
    .await;
    let done = b.wait_for(started.id, WAIT).await.unwrap();
    assert_eq!(done.status, SagaStatus::Compensated);
    assert_eq!(log_b.tasks(), vec!["refund", "undo1"]);
    assert_eq!(log_b.keys_of("refund"), log.keys_of("refund"));
    assert_eq!(log_b.inputs_of("refund"), vec![Value::Null]);
    gate.notify_waiters();
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}
