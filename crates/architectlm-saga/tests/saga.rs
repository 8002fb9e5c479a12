//! Behaviour of the saga coordinator on the in-memory journal: execution, compensation,
//! retries, timeouts, parallel groups, idempotency, versions, queries and events.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use architectlm_core::extensions::Pagination;
use architectlm_core::extensions::SagaCoordinator;
use architectlm_core::extensions::saga::{
    SagaDefinition, SagaEventType as E, SagaFilter, SagaStatus, SagaStep, SagaStepStatus,
    StartSagaOptions,
};
use architectlm_core::{Error, RetryPolicy, TaskDefinition, TaskError, TaskErrorKind};
use architectlm_saga::{Coordinator, InMemorySagaStore};
use serde_json::{Value, json};
use support::*;
use tokio::sync::Notify;

const WAIT: Duration = Duration::from_secs(30);

fn four_steps(fail_at: Option<usize>) -> SagaDefinition {
    let mut d = SagaDefinition::new("order");
    for i in 1..=4 {
        let action = if fail_at == Some(i) { "fail" } else { "step" };
        let id: &'static str = ["", "s1", "s2", "s3", "s4"][i];
        let mut s = SagaStep::task(id, action);
        s.action = architectlm_core::TaskRef::Id(format!(
            "{action}{}",
            if action == "step" {
                i.to_string()
            } else {
                String::new()
            }
        ));
        d = d.step(s.compensate_with(format!("undo{i}")));
    }
    d
}

fn four_step_system(log: &Log) -> architectlm_core::System {
    system(vec![
        ok_task("step1", log),
        ok_task("step2", log),
        ok_task("step3", log),
        ok_task("step4", log),
        failing_task("fail", log),
        ok_task("undo1", log),
        ok_task("undo2", log),
        ok_task("undo3", log),
        ok_task("undo4", log),
    ])
}

#[tokio::test]
async fn happy_path_runs_steps_in_order_with_previous_results_and_events() {
    let log = Log::default();
    let sagas = Coordinator::in_memory();
    sagas.define_saga(four_steps(None)).await.unwrap();
    let rt = runtime(four_step_system(&log), &sagas).await;
    let mut sub = sagas.events().subscribe("*");
    let mut bus = rt.subscribe("saga-completed");

    let started = sagas
        .start_saga("order", json!({"order": 7}))
        .await
        .unwrap();
    let events = events_until_end(&mut sub, started.id).await;
    let done = sagas.wait_for(started.id, WAIT).await.unwrap();

    assert_eq!(done.status, SagaStatus::Completed);
    assert_eq!(log.tasks(), vec!["step1", "step2", "step3", "step4"]);
    // Each step sees the input and the results of the steps before it.
    assert_eq!(
        log.inputs_of("step3")[0],
        json!({"input": {"order": 7}, "results": {"s1": {"done": "step1"}, "s2": {"done": "step2"}}})
    );
    assert_eq!(done.context["s4"], json!({"done": "step4"}));
    assert!(
        done.steps
            .iter()
            .all(|s| s.status == SagaStepStatus::Completed && s.attempts == 1)
    );
    assert!(done.completed_at.is_some());
    // Each step got its own stable key.
    assert_eq!(
        log.keys_of("step2")[0].as_deref(),
        Some(done.steps[1].idempotency_key.as_str())
    );
    assert_eq!(done.steps[1].idempotency_key, format!("{}:s2", done.id));
    let mut expected = vec![(E::SagaStarted, None)];
    for s in ["s1", "s2", "s3", "s4"] {
        expected.push((E::StepStarted, Some(s.to_owned())));
        expected.push((E::StepCompleted, Some(s.to_owned())));
    }
    expected.push((E::SagaCompleted, None));
    assert_eq!(events, expected);
    // Forwarded to the runtime's bus with the coordinator as the source.
    let e = tokio::time::timeout(WAIT, bus.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(e.source, "saga-coordinator");
    assert_eq!(e.payload["instance_id"], json!(started.id));
}

#[tokio::test]
async fn failure_at_step_k_compensates_previous_steps_in_reverse_with_their_results() {
    let log = Log::default();
    let sagas = Coordinator::in_memory();
    sagas.define_saga(four_steps(Some(3))).await.unwrap();
    let _rt = runtime(four_step_system(&log), &sagas).await;
    let mut sub = sagas.events().subscribe("*");

    let started = sagas.start_saga("order", json!({})).await.unwrap();
    let events = events_until_end(&mut sub, started.id).await;
    let done = sagas.wait_for(started.id, WAIT).await.unwrap();

    assert_eq!(done.status, SagaStatus::Compensated);
    assert_eq!(
        log.tasks(),
        vec!["step1", "step2", "fail", "undo2", "undo1"]
    );
    assert_eq!(log.inputs_of("undo2"), vec![json!({"done": "step2"})]);
    assert_eq!(log.inputs_of("undo1"), vec![json!({"done": "step1"})]);
    let st: Vec<SagaStepStatus> = done.steps.iter().map(|s| s.status).collect();
    assert_eq!(
        st,
        vec![
            SagaStepStatus::Compensated,
            SagaStepStatus::Compensated,
            SagaStepStatus::Failed,
            SagaStepStatus::Pending
        ]
    );
    assert!(
        done.steps[2]
            .error
            .as_deref()
            .unwrap()
            .contains("fail refused")
    );
    assert!(
        done.error
            .as_deref()
            .unwrap()
            .contains("step \"s3\" failed")
    );
    assert_eq!(
        log.keys_of("undo2")[0].as_deref(),
        Some(format!("{}:s2:compensation", done.id).as_str())
    );
    let tail: Vec<_> = events.iter().rev().take(6).rev().cloned().collect();
    assert_eq!(
        tail,
        vec![
            (E::StepFailed, Some("s3".into())),
            (E::CompensationStarted, Some("s2".into())),
            (E::CompensationCompleted, Some("s2".into())),
            (E::CompensationStarted, Some("s1".into())),
            (E::CompensationCompleted, Some("s1".into())),
            (E::SagaFailed, None),
        ]
    );
}

#[tokio::test]
async fn failure_at_the_first_step_leaves_nothing_to_undo_and_ends_failed() {
    let log = Log::default();
    let sagas = Coordinator::in_memory();
    sagas.define_saga(four_steps(Some(1))).await.unwrap();
    let _rt = runtime(four_step_system(&log), &sagas).await;
    let started = sagas.start_saga("order", json!({})).await.unwrap();
    let done = sagas.wait_for(started.id, WAIT).await.unwrap();
    assert_eq!(done.status, SagaStatus::Failed);
    assert_eq!(log.tasks(), vec!["fail"]);
}

#[tokio::test(start_paused = true)]
async fn a_step_retries_with_the_same_key_then_succeeds() {
    let calls = Arc::new(AtomicU32::new(0));
    let keys = Log::default();
    let (c, k) = (calls.clone(), keys.clone());
    let flaky = TaskDefinition::new("flaky", move |input: Value, ctx| {
        let (c, k) = (c.clone(), k.clone());
        async move {
            k.push("flaky", &input, ctx.idempotency_key());
            if c.fetch_add(1, Ordering::SeqCst) < 2 {
                Err(TaskError::new("not yet"))
            } else {
                Ok(json!("ok"))
            }
        }
    })
    .unwrap();
    let sagas = Coordinator::in_memory();
    sagas
        .define_saga(
            SagaDefinition::new("retry")
                .step(SagaStep::task("only", "flaky").retry(
                    RetryPolicy::attempts(3).with_initial_delay(Duration::from_millis(100)),
                )),
        )
        .await
        .unwrap();
    let _rt = runtime(system(vec![flaky]), &sagas).await;
    let started = sagas.start_saga("retry", json!({})).await.unwrap();
    let done = sagas.wait_for(started.id, WAIT).await.unwrap();
    assert_eq!(done.status, SagaStatus::Completed);
    assert_eq!(done.steps[0].attempts, 3);
    let ks = keys.keys_of("flaky");
    assert_eq!(ks.len(), 3);
    assert!(ks.iter().all(|k| k == &ks[0] && k.is_some()));
}

#[tokio::test(start_paused = true)]
async fn the_saga_timeout_cancels_the_running_step_and_unwinds() {
    let log = Log::default();
    let slow = TaskDefinition::new("slow", |_input: Value, ctx| async move {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(3600)) => Ok(json!("late")),
            _ = ctx.cancellation().cancelled() => {
                Err(TaskError::with_kind(TaskErrorKind::Cancelled, "stopped"))
            }
        }
    })
    .unwrap();
    let sagas = Coordinator::in_memory();
    sagas
        .define_saga(
            SagaDefinition::new("slow")
                .timeout(Duration::from_secs(2))
                .step(SagaStep::task("a", "step1").compensate_with("undo1"))
                .step(SagaStep::task("b", "slow").compensate_with("undo2")),
        )
        .await
        .unwrap();
    let _rt = runtime(
        system(vec![
            ok_task("step1", &log),
            slow,
            ok_task("undo1", &log),
            ok_task("undo2", &log),
        ]),
        &sagas,
    )
    .await;
    let t0 = tokio::time::Instant::now();
    let started = sagas.start_saga("slow", json!({})).await.unwrap();
    let done = sagas.wait_for(started.id, WAIT).await.unwrap();
    assert_eq!(done.status, SagaStatus::Compensated);
    assert!(
        done.error.as_deref().unwrap().contains("timed out"),
        "{:?}",
        done.error
    );
    assert_eq!(done.steps[1].status, SagaStepStatus::Failed);
    assert_eq!(log.tasks(), vec!["step1", "undo1"]);
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(60),
        "{waited:?}"
    );
}

/// A task that waits until released, then succeeds.
fn gated(id: &'static str, gate: Arc<Notify>, entered: Arc<Notify>, log: &Log) -> TaskDefinition {
    let log = log.clone();
    TaskDefinition::new(id, move |input: Value, ctx| {
        let (gate, entered, log) = (gate.clone(), entered.clone(), log.clone());
        async move {
            entered.notify_one();
            gate.notified().await;
            log.push(id, &input, ctx.idempotency_key());
            Ok(json!({"done": id}))
        }
    })
    .unwrap()
}

#[tokio::test]
async fn manual_compensation_stops_after_the_running_step_and_unwinds_it_too() {
    let log = Log::default();
    let (gate, entered) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let sagas = Coordinator::in_memory();
    sagas
        .define_saga(
            SagaDefinition::new("manual")
                .step(SagaStep::task("a", "step1").compensate_with("undo1"))
                .step(SagaStep::task("b", "gated").compensate_with("undo2"))
                .step(SagaStep::task("c", "step3").compensate_with("undo3")),
        )
        .await
        .unwrap();
    let _rt = runtime(
        system(vec![
            ok_task("step1", &log),
            gated("gated", gate.clone(), entered.clone(), &log),
            ok_task("step3", &log),
            ok_task("undo1", &log),
            ok_task("undo2", &log),
            ok_task("undo3", &log),
        ]),
        &sagas,
    )
    .await;
    let started = sagas.start_saga("manual", json!({})).await.unwrap();
    tokio::time::timeout(WAIT, entered.notified())
        .await
        .unwrap();
    let during = sagas
        .compensate_saga(started.id, "customer cancelled")
        .await
        .unwrap();
    assert_eq!(during.status, SagaStatus::Running);
    gate.notify_one();
    let done = sagas.wait_for(started.id, WAIT).await.unwrap();
    assert_eq!(done.status, SagaStatus::Compensated);
    assert_eq!(log.tasks(), vec!["step1", "gated", "undo2", "undo1"]);
    assert!(
        done.error
            .as_deref()
            .unwrap()
            .contains("customer cancelled")
    );
    assert_eq!(done.steps[2].status, SagaStepStatus::Pending);
}

#[tokio::test]
async fn compensating_a_completed_saga_unwinds_it_and_a_second_call_changes_nothing() {
    let log = Log::default();
    let sagas = Coordinator::in_memory();
    sagas.define_saga(four_steps(None)).await.unwrap();
    let _rt = runtime(four_step_system(&log), &sagas).await;
    let started = sagas.start_saga("order", json!({})).await.unwrap();
    sagas.wait_for(started.id, WAIT).await.unwrap();
    sagas.compensate_saga(started.id, "refund").await.unwrap();
    let done = sagas.wait_for(started.id, WAIT).await.unwrap();
    assert_eq!(done.status, SagaStatus::Compensated);
    assert_eq!(
        log.tasks()[4..].to_vec(),
        vec!["undo4", "undo3", "undo2", "undo1"]
    );
    let again = sagas.compensate_saga(started.id, "refund").await.unwrap();
    assert_eq!(again.status, SagaStatus::Compensated);
    assert_eq!(log.tasks().len(), 8);
}

#[tokio::test]
async fn a_failed_compensation_stops_in_compensation_failed_and_resumes_on_request() {
    let log = Log::default();
    let broken = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let b = broken.clone();
    let l = log.clone();
    let undo1 = TaskDefinition::new("undo1", move |input: Value, ctx| {
        let (b, l) = (b.clone(), l.clone());
        async move {
            l.push("undo1", &input, ctx.idempotency_key());
            if b.load(Ordering::SeqCst) {
                Err(TaskError::permanent("ledger offline"))
            } else {
                Ok(json!(null))
            }
        }
    })
    .unwrap();
    let sagas = Coordinator::in_memory();
    sagas
        .define_saga(
            SagaDefinition::new("stuck")
                .step(SagaStep::task("a", "step1").compensate_with("undo1"))
                .step(SagaStep::task("b", "step2").compensate_with("undo2"))
                .step(SagaStep::task("c", "fail")),
        )
        .await
        .unwrap();
    let _rt = runtime(
        system(vec![
            ok_task("step1", &log),
            ok_task("step2", &log),
            failing_task("fail", &log),
            undo1,
            ok_task("undo2", &log),
        ]),
        &sagas,
    )
    .await;
    let started = sagas.start_saga("stuck", json!({})).await.unwrap();
    let stuck = sagas.wait_for(started.id, WAIT).await.unwrap();
    assert_eq!(stuck.status, SagaStatus::CompensationFailed);
    assert_eq!(stuck.steps[0].status, SagaStepStatus::CompensationFailed);
    assert_eq!(stuck.steps[1].status, SagaStepStatus::Compensated);
    assert!(stuck.error.as_deref().unwrap().contains("ledger offline"));
    // The undo stack is intact: the failed compensation's step keeps its result.
    assert_eq!(stuck.steps[0].result, Some(json!({"done": "step1"})));

    let not_stuck = sagas.resume_compensation(Uuid::now_v7()).await.unwrap_err();
    assert!(matches!(not_stuck, Error::NotFound { .. }), "{not_stuck}");
    broken.store(false, Ordering::SeqCst);
    sagas.resume_compensation(started.id).await.unwrap();
    let done = sagas.wait_for(started.id, WAIT).await.unwrap();
    assert_eq!(done.status, SagaStatus::Compensated);
    assert_eq!(done.steps[0].status, SagaStepStatus::Compensated);
    assert_eq!(done.steps[0].compensation_attempts, 2);
    // Resuming ran only what was left: undo2 once, undo1 twice.
    assert_eq!(
        log.tasks(),
        vec!["step1", "step2", "fail", "undo2", "undo1", "undo1"]
    );
    let err = sagas.resume_compensation(started.id).await.unwrap_err();
    assert!(err.to_string().contains("not compensation-failed"), "{err}");
}

use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parallel_group_runs_together_and_is_compensated_together_when_one_fails() {
    let log = Log::default();
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let mk = |id: &'static str, fail: bool| {
        let (log, barrier) = (log.clone(), barrier.clone());
        TaskDefinition::new(id, move |input: Value, ctx| {
            let (log, barrier) = (log.clone(), barrier.clone());
            async move {
                // Both members must be running at once to pass the barrier.
                barrier.wait().await;
                log.push(id, &input, ctx.idempotency_key());
                if fail {
                    Err(TaskError::permanent("no stock"))
                } else {
                    Ok(json!(id))
                }
            }
        })
        .unwrap()
    };
    let sagas = Coordinator::in_memory();
    sagas
        .define_saga(
            SagaDefinition::new("par")
                .step(SagaStep::task("a", "step1").compensate_with("undo1"))
                .step(
                    SagaStep::task("b", "pb")
                        .compensate_with("undo2")
                        .parallel("g"),
                )
                .step(
                    SagaStep::task("c", "pc")
                        .compensate_with("undo3")
                        .parallel("g"),
                )
                .step(SagaStep::task("d", "step4").compensate_with("undo4")),
        )
        .await
        .unwrap();
    let _rt = runtime(
        system(vec![
            ok_task("step1", &log),
            mk("pb", false),
            mk("pc", true),
            ok_task("step4", &log),
            ok_task("undo1", &log),
            ok_task("undo2", &log),
            ok_task("undo3", &log),
            ok_task("undo4", &log),
        ]),
        &sagas,
    )
    .await;
    let started = sagas.start_saga("par", json!({})).await.unwrap();
    let done = sagas.wait_for(started.id, WAIT).await.unwrap();
    assert_eq!(done.status, SagaStatus::Compensated);
    let t = log.tasks();
    assert!(
        !t.contains(&"step4".to_owned()) && !t.contains(&"undo3".to_owned()),
        "{t:?}"
    );
    // b is undone before a; c failed, so it has nothing to undo.
    let pos = |x: &str| t.iter().position(|y| y == x).unwrap();
    assert!(pos("undo2") < pos("undo1"), "{t:?}");
    assert_eq!(done.steps[1].status, SagaStepStatus::Compensated);
    assert_eq!(done.steps[2].status, SagaStepStatus::Failed);
}

#[tokio::test]
async fn starting_twice_with_one_idempotency_key_runs_one_saga() {
    let log = Log::default();
    let sagas = Coordinator::in_memory();
    sagas.define_saga(four_steps(None)).await.unwrap();
    let _rt = runtime(four_step_system(&log), &sagas).await;
    let a = sagas
        .start_saga_with(
            "order",
            json!({"n": 1}),
            StartSagaOptions::idempotency_key("order-1"),
        )
        .await
        .unwrap();
    let b = sagas
        .start_saga_with(
            "order",
            json!({"n": 2}),
            StartSagaOptions::idempotency_key("order-1"),
        )
        .await
        .unwrap();
    assert_eq!(a.id, b.id);
    assert_eq!(b.input, json!({"n": 1}));
    sagas.wait_for(a.id, WAIT).await.unwrap();
    assert_eq!(log.tasks().iter().filter(|t| *t == "step1").count(), 1);
    let page = sagas.list_sagas(SagaFilter::all()).await.unwrap();
    assert_eq!(page.total, 1);
}

#[tokio::test]
async fn bad_definitions_and_unknown_ids_are_refused_with_clear_errors() {
    let log = Log::default();
    let sagas = Coordinator::in_memory();
    let cases = [
        (SagaDefinition::new("empty"), "has no steps"),
        (
            SagaDefinition::new("dup")
                .step(SagaStep::task("x", "step1"))
                .step(SagaStep::task("x", "step2")),
            "duplicate step id \"x\"",
        ),
        (
            SagaDefinition::new("zero")
                .timeout(Duration::ZERO)
                .step(SagaStep::task("x", "step1")),
            "zero timeout",
        ),
        (
            SagaDefinition::new("badretry")
                .step(SagaStep::task("x", "step1").retry(RetryPolicy::attempts(0))),
            "retry.max_attempts",
        ),
    ];
    for (def, msg) in cases {
        let e = sagas.define_saga(def).await.unwrap_err().to_string();
        assert!(e.contains(msg), "{e} should mention {msg}");
    }
    let _rt = runtime(system(vec![ok_task("step1", &log)]), &sagas).await;
    let e = sagas
        .define_saga(SagaDefinition::new("ghost").step(SagaStep::task("x", "nope")))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown action task \"nope\""), "{e}");
    let e = sagas.start_saga("missing", json!({})).await.unwrap_err();
    assert_eq!(e.to_string(), "unknown saga definition \"missing\"");
    let id = Uuid::now_v7();
    let e = sagas.compensate_saga(id, "x").await.unwrap_err();
    assert_eq!(e.to_string(), format!("unknown saga instance \"{id}\""));
    assert!(sagas.get_saga_status(id).await.unwrap().is_none());
}

#[tokio::test]
async fn a_definition_naming_an_unknown_task_fails_runtime_start() {
    let sagas = Coordinator::in_memory();
    sagas
        .define_saga(
            SagaDefinition::new("s").step(SagaStep::task("x", "t").compensate_with("undo")),
        )
        .await
        .unwrap();
    let log = Log::default();
    let err = architectlm_core::Runtime::builder(system(vec![ok_task("t", &log)]))
        .extension(Arc::new(sagas.clone()))
        .start()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown compensation task \"undo\""), "{err}");
}

#[tokio::test]
async fn an_instance_keeps_its_version_and_an_unregistered_version_is_reported_until_defined() {
    let log = Log::default();
    let store = Arc::new(InMemorySagaStore::new());
    let v1 = || {
        SagaDefinition::new("ver")
            .version(1)
            .step(SagaStep::task("a", "step1"))
    };
    let v2 = || {
        SagaDefinition::new("ver")
            .version(2)
            .step(SagaStep::task("a", "step2"))
    };

    // An instance of version 1 is journaled by a node that never ran it.
    let first = Coordinator::with_store(store.clone());
    first.define_saga(v1()).await.unwrap();
    let old = first.start_saga("ver", json!({})).await.unwrap();
    assert_eq!(old.saga_version, 1);
    drop(first);

    // A node that knows only version 2 leaves it alone and says why.
    let second = Coordinator::with_store(store.clone());
    second.define_saga(v2()).await.unwrap();
    let _rt = runtime(
        system(vec![ok_task("step1", &log), ok_task("step2", &log)]),
        &second,
    )
    .await;
    let stranded = second.stranded();
    assert_eq!(stranded.len(), 1);
    let report = second.recovery_report().unwrap();
    assert_eq!((report.resumed, report.stranded.len()), (0, 1));
    assert_eq!(stranded[0].instance_id, old.id);
    assert!(
        stranded[0]
            .reason
            .contains("\"ver\" version 1 is not registered (registered versions: [2])"),
        "{}",
        stranded[0].reason
    );
    let status = second.get_saga_status(old.id).await.unwrap().unwrap();
    assert_eq!(status.status, SagaStatus::Created);
    let new = second.start_saga("ver", json!({})).await.unwrap();
    assert_eq!(new.saga_version, 2);
    second.wait_for(new.id, WAIT).await.unwrap();

    // Defining version 1 again carries the old instance on with its own steps.
    second.define_saga(v1()).await.unwrap();
    let done = second.wait_for(old.id, WAIT).await.unwrap();
    assert_eq!(done.status, SagaStatus::Completed);
    assert_eq!(done.saga_version, 1);
    assert_eq!(log.tasks(), vec!["step2", "step1"]);
    assert!(second.stranded().is_empty());
}

#[tokio::test]
async fn list_sagas_filters_by_definition_status_and_time_and_pages() {
    let log = Log::default();
    let sagas = Coordinator::in_memory();
    sagas.define_saga(four_steps(None)).await.unwrap();
    sagas
        .define_saga(SagaDefinition::new("other").step(SagaStep::task("x", "fail")))
        .await
        .unwrap();
    let _rt = runtime(four_step_system(&log), &sagas).await;
    let before = chrono::Utc::now();
    let mut ids = vec![];
    for _ in 0..5 {
        ids.push(sagas.start_saga("order", json!({})).await.unwrap().id);
    }
    let o = sagas.start_saga("other", json!({})).await.unwrap();
    for id in ids.iter().chain([&o.id]) {
        sagas.wait_for(*id, WAIT).await.unwrap();
    }
    let p1 = sagas
        .list_sagas(SagaFilter::all().saga("order").page(Pagination::new(0, 3)))
        .await
        .unwrap();
    assert_eq!((p1.total, p1.items.len(), p1.next_offset), (5, 3, Some(3)));
    let p2 = sagas
        .list_sagas(SagaFilter::all().saga("order").page(Pagination::new(3, 3)))
        .await
        .unwrap();
    assert_eq!((p2.items.len(), p2.next_offset), (2, None));
    let mut seen: Vec<Uuid> = p1.items.iter().chain(&p2.items).map(|i| i.id).collect();
    seen.sort();
    ids.sort();
    assert_eq!(seen, ids);
    let failed = sagas
        .list_sagas(SagaFilter::all().status(SagaStatus::Failed))
        .await
        .unwrap();
    assert_eq!(
        failed.items.iter().map(|i| i.id).collect::<Vec<_>>(),
        vec![o.id]
    );
    let later = sagas
        .list_sagas(SagaFilter::all().started_before(before))
        .await
        .unwrap();
    assert_eq!(later.total, 0);
}

#[tokio::test]
async fn closures_work_as_steps_and_reach_services_through_the_context() {
    let sagas = Coordinator::in_memory();
    sagas
        .define_saga(
            SagaDefinition::new("closures")
                .step(SagaStep::closure("nested", |_input, ctx| async move {
                    // A step can reach the coordinator itself through the runtime's services.
                    let me = ctx
                        .saga_coordinator()
                        .map_err(|e| TaskError::new(e.to_string()))?;
                    let page = me
                        .list_sagas(SagaFilter::all().saga("closures"))
                        .await
                        .map_err(|e| TaskError::new(e.to_string()))?;
                    Ok(json!(page.total))
                }))
                .step(SagaStep::closure("boom", |_i, _c| async {
                    Err(TaskError::permanent("boom"))
                }))
                .step(SagaStep::closure("never", |_i, _c| async { Ok(json!(1)) })),
        )
        .await
        .unwrap();
    let _rt = runtime(system(vec![]), &sagas).await;
    let started = sagas.start_saga("closures", json!({})).await.unwrap();
    let done = sagas.wait_for(started.id, WAIT).await.unwrap();
    assert_eq!(done.steps[0].result, Some(json!(1)));
    assert_eq!(done.status, SagaStatus::Compensated);
    assert_eq!(done.steps[2].status, SagaStepStatus::Pending);
}

/// Application code written against the contract: starts an order saga and waits for its end.
async fn place_order(
    sagas: Arc<dyn SagaCoordinator>,
    order: u32,
) -> architectlm_core::Result<SagaStatus> {
    let started = sagas.start_saga("order", json!({"order": order})).await?;
    sagas.settled(started.id).await;
    let done = sagas.wait_for(started.id, WAIT).await?;
    Ok(done.status)
}

#[tokio::test]
async fn code_written_against_the_trait_can_wait_for_a_saga() {
    let log = Log::default();
    let sagas = Coordinator::in_memory();
    sagas.define_saga(four_steps(None)).await.unwrap();
    let _rt = runtime(four_step_system(&log), &sagas).await;
    let dyn_sagas: Arc<dyn SagaCoordinator> = Arc::new(sagas.clone());

    assert_eq!(
        place_order(dyn_sagas.clone(), 1).await.unwrap(),
        SagaStatus::Completed
    );
    assert_eq!(log.tasks(), vec!["step1", "step2", "step3", "step4"]);
    // Unknown instances: `settled` returns at once, `wait_for` names the instance.
    let unknown = uuid::Uuid::now_v7();
    dyn_sagas.settled(unknown).await;
    let e = dyn_sagas.wait_for(unknown, WAIT).await.unwrap_err();
    assert!(
        matches!(e, Error::NotFound { .. }) && e.to_string().contains(&unknown.to_string()),
        "{e}"
    );
}

#[tokio::test(start_paused = true)]
async fn wait_for_through_the_trait_times_out_while_the_saga_carries_on() {
    let gate = Arc::new(Notify::new());
    let g = gate.clone();
    let sagas = Coordinator::in_memory();
    sagas
        .define_saga(SagaDefinition::new("slow").step(SagaStep::closure(
            "wait",
            move |_input, _ctx| {
                let g = g.clone();
                async move {
                    g.notified().await;
                    Ok(json!("done"))
                }
            },
        )))
        .await
        .unwrap();
    let _rt = runtime(system(vec![]), &sagas).await;
    let dyn_sagas: Arc<dyn SagaCoordinator> = Arc::new(sagas.clone());
    let started = dyn_sagas.start_saga("slow", json!({})).await.unwrap();
    let e = dyn_sagas
        .wait_for(started.id, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    gate.notify_one();
    let done = dyn_sagas.wait_for(started.id, Duration::MAX).await.unwrap();
    assert_eq!(done.status, SagaStatus::Completed);
}

#[tokio::test]
async fn a_mock_coordinator_can_stand_in_for_waiting() {
    use architectlm_core::mock::MockSagaCoordinator;
    let id = uuid::Uuid::now_v7();
    let instance = |status| {
        let mut i = architectlm_core::extensions::saga::SagaInstance::new(
            id,
            "order",
            1,
            json!({"order": 2}),
            None,
            chrono::Utc::now(),
            vec![],
        );
        i.status = status;
        i
    };
    let mut mock = MockSagaCoordinator::new();
    let running = instance(SagaStatus::Running);
    mock.expect_start_saga()
        .times(1)
        .returning(move |_, _| Ok(running.clone()));
    mock.expect_settled().times(1).returning(|_| ());
    let completed = instance(SagaStatus::Completed);
    mock.expect_wait_for()
        .withf(move |i, t| *i == id && *t == WAIT)
        .times(1)
        .returning(move |_, _| Ok(completed.clone()));
    assert_eq!(
        place_order(Arc::new(mock), 2).await.unwrap(),
        SagaStatus::Completed
    );
}

/// What an overload run saw from inside its steps.
#[derive(Default)]
struct Seen {
    /// Sagas between their first step's start and their last step's end.
    inside: std::sync::atomic::AtomicUsize,
    most_inside: std::sync::atomic::AtomicUsize,
    /// The coordinator's own count of drivers, read by every step.
    most_in_flight: std::sync::atomic::AtomicUsize,
}

/// Two steps that each need one of the 8 connections of a shared pool for 100 ms, and give up
/// after 150 ms (waiting for the connection included), without retries.
fn pooled_saga(
    pool: &Arc<tokio::sync::Semaphore>,
    seen: &Arc<Seen>,
    sagas: &Coordinator,
) -> SagaDefinition {
    let step = |id: &'static str, first: bool| {
        let (pool, seen, sagas) = (pool.clone(), seen.clone(), sagas.clone());
        SagaStep::closure(id, move |_input, _ctx| {
            let (pool, seen, sagas) = (pool.clone(), seen.clone(), sagas.clone());
            async move {
                if first {
                    let now = seen.inside.fetch_add(1, Ordering::SeqCst) + 1;
                    seen.most_inside.fetch_max(now, Ordering::SeqCst);
                }
                seen.most_in_flight
                    .fetch_max(sagas.in_flight(), Ordering::SeqCst);
                let _connection = pool.acquire().await.map_err(|e| e.to_string())?;
                tokio::time::sleep(Duration::from_millis(100)).await;
                if !first {
                    seen.inside.fetch_sub(1, Ordering::SeqCst);
                }
                Ok(json!(id))
            }
        })
        .timeout(Duration::from_millis(150))
        .retry(RetryPolicy::none())
        .compensate_closure(|_result, _ctx| async { Ok(Value::Null) })
    };
    SagaDefinition::new("pooled")
        .step(step("reserve", true))
        .step(step("charge", false))
}

/// Starts 80 pooled sagas at once on a coordinator with the given bound and waits for them all.
async fn overload(bound: Option<usize>) -> (Coordinator, Vec<SagaStatus>, Arc<Seen>) {
    let pool = Arc::new(tokio::sync::Semaphore::new(8));
    let seen = Arc::new(Seen::default());
    let mut builder = Coordinator::builder();
    if let Some(n) = bound {
        builder = builder.max_in_flight(n);
    }
    let sagas = builder.build().unwrap();
    sagas
        .define_saga(pooled_saga(&pool, &seen, &sagas))
        .await
        .unwrap();
    let _rt = runtime(system(vec![]), &sagas).await;
    let mut started = Vec::new();
    for n in 0..80 {
        started.push(sagas.start_saga("pooled", json!({"n": n})).await.unwrap());
    }
    if let Some(n) = bound {
        // Beyond the bound, sagas are journaled as created and wait, in start order.
        assert_eq!(sagas.in_flight(), n);
        assert_eq!(sagas.waiting(), 80 - n);
        assert_eq!(sagas.active(), 80);
        for s in &started[n..] {
            assert_eq!(s.status, SagaStatus::Created);
            let stored = sagas.get_saga_status(s.id).await.unwrap().unwrap();
            assert_eq!(stored.status, SagaStatus::Created);
            assert!(
                stored
                    .steps
                    .iter()
                    .all(|st| st.status == SagaStepStatus::Pending)
            );
        }
    }
    let mut statuses = Vec::new();
    for s in &started {
        statuses.push(sagas.wait_for(s.id, Duration::MAX).await.unwrap().status);
    }
    assert_eq!(sagas.active(), 0);
    assert_eq!(sagas.in_flight(), 0);
    (sagas, statuses, seen)
}

#[tokio::test(start_paused = true)]
async fn under_ten_times_the_bound_every_saga_completes_and_at_most_the_bound_run() {
    let (sagas, statuses, seen) = overload(Some(8)).await;
    assert_eq!(sagas.max_in_flight(), Some(8));
    assert!(
        statuses.iter().all(|s| *s == SagaStatus::Completed),
        "{statuses:?}"
    );
    assert_eq!(seen.most_inside.load(Ordering::SeqCst), 8);
    assert!(seen.most_in_flight.load(Ordering::SeqCst) <= 8);
}

#[tokio::test(start_paused = true)]
async fn without_a_bound_the_same_overload_times_steps_out_on_the_shared_pool() {
    // What the bound prevents: all 80 run at once and most steps time out on the pool.
    let (sagas, statuses, seen) = overload(None).await;
    assert_eq!(sagas.max_in_flight(), None);
    let completed = statuses
        .iter()
        .filter(|s| **s == SagaStatus::Completed)
        .count();
    assert!(completed < 80, "{statuses:?}");
    assert!(seen.most_inside.load(Ordering::SeqCst) > 8);
}

#[tokio::test(start_paused = true)]
async fn waiting_sagas_are_driven_in_start_order() {
    let order = Log::default();
    let gate = Arc::new(Notify::new());
    let (o, g) = (order.clone(), gate.clone());
    let sagas = Coordinator::builder().max_in_flight(1).build().unwrap();
    sagas
        .define_saga(SagaDefinition::new("queued").step(SagaStep::closure(
            "only",
            move |input: Value, _ctx| {
                let (o, g) = (o.clone(), g.clone());
                async move {
                    o.push("only", &input["input"], None);
                    if input["input"]["n"] == json!(0) {
                        g.notified().await;
                    }
                    Ok(Value::Null)
                }
            },
        )))
        .await
        .unwrap();
    let _rt = runtime(system(vec![]), &sagas).await;
    let mut started = Vec::new();
    for n in 0..6 {
        started.push(sagas.start_saga("queued", json!({"n": n})).await.unwrap());
    }
    // A compensation request reaches a waiting saga: it unwinds (nothing done) when its turn comes.
    sagas
        .compensate_saga(started[3].id, "cancelled")
        .await
        .unwrap();
    while order.tasks().is_empty() {
        tokio::task::yield_now().await;
    }
    assert_eq!(sagas.waiting(), 5);
    gate.notify_one();
    for s in &started {
        sagas.wait_for(s.id, Duration::MAX).await.unwrap();
    }
    let ns: Vec<Value> = order
        .inputs_of("only")
        .iter()
        .map(|i| i["n"].clone())
        .collect();
    assert_eq!(ns, vec![json!(0), json!(1), json!(2), json!(4), json!(5)]);
    let cancelled = sagas.get_saga_status(started[3].id).await.unwrap().unwrap();
    assert_eq!(cancelled.status, SagaStatus::Compensated);
}

#[tokio::test]
async fn a_zero_bound_is_refused_naming_the_field() {
    let e = Coordinator::builder().max_in_flight(0).build().unwrap_err();
    assert!(
        matches!(&e, Error::InvalidConfig { field, value, .. } if field == "max_in_flight" && value == "0"),
        "{e}"
    );
}

/// Steps s1, s2 and a failing s3, each with its compensation; s3 compensated when it fails.
fn charge_may_have_happened() -> SagaDefinition {
    SagaDefinition::new("order")
        .step(SagaStep::task("s1", "step1").compensate_with("undo1"))
        .step(SagaStep::task("s2", "step2").compensate_with("undo2"))
        .step(
            SagaStep::task("s3", "fail")
                .compensate_with("undo3")
                .compensate_on_failure(true),
        )
        .step(SagaStep::task("s4", "step4").compensate_with("undo4"))
}

#[tokio::test]
async fn a_step_marked_compensate_on_failure_is_undone_first_when_it_fails() {
    let log = Log::default();
    let sagas = Coordinator::in_memory();
    sagas.define_saga(charge_may_have_happened()).await.unwrap();
    let _rt = runtime(four_step_system(&log), &sagas).await;
    let mut sub = sagas.events().subscribe("*");
    let started = sagas.start_saga("order", json!({})).await.unwrap();
    let events = events_until_end(&mut sub, started.id).await;
    let done = sagas.wait_for(started.id, WAIT).await.unwrap();

    assert_eq!(done.status, SagaStatus::Compensated);
    assert_eq!(
        log.tasks(),
        vec!["step1", "step2", "fail", "undo3", "undo2", "undo1"]
    );
    // The failed step has no result: its compensation gets null and the step's key.
    assert_eq!(log.inputs_of("undo3"), vec![Value::Null]);
    assert_eq!(
        log.keys_of("undo3")[0].as_deref(),
        Some(format!("{}:s3:compensation", done.id).as_str())
    );
    let st: Vec<SagaStepStatus> = done.steps.iter().map(|s| s.status).collect();
    assert_eq!(
        st,
        vec![
            SagaStepStatus::Compensated,
            SagaStepStatus::Compensated,
            SagaStepStatus::Compensated,
            SagaStepStatus::Pending
        ]
    );
    assert!(
        done.error
            .as_deref()
            .unwrap()
            .contains("step \"s3\" failed")
    );
    let tail: Vec<_> = events.iter().rev().take(8).rev().cloned().collect();
    assert_eq!(
        tail,
        vec![
            (E::StepFailed, Some("s3".into())),
            (E::CompensationStarted, Some("s3".into())),
            (E::CompensationCompleted, Some("s3".into())),
            (E::CompensationStarted, Some("s2".into())),
            (E::CompensationCompleted, Some("s2".into())),
            (E::CompensationStarted, Some("s1".into())),
            (E::CompensationCompleted, Some("s1".into())),
            (E::SagaFailed, None),
        ]
    );
}

#[tokio::test]
async fn a_first_step_failing_ends_failed_unless_it_is_compensated_on_failure() {
    let log = Log::default();
    let sagas = Coordinator::in_memory();
    let def = |on_failure: bool, id: &str| {
        SagaDefinition::new(id)
            .step(
                SagaStep::task("s1", "fail")
                    .compensate_with("undo1")
                    .compensate_on_failure(on_failure),
            )
            .step(SagaStep::task("s2", "step2").compensate_with("undo2"))
    };
    sagas.define_saga(def(false, "atomic")).await.unwrap();
    sagas.define_saga(def(true, "effectful")).await.unwrap();
    let _rt = runtime(four_step_system(&log), &sagas).await;

    // Nothing to undo: failed.
    let a = sagas.start_saga("atomic", json!({})).await.unwrap();
    let a = sagas.wait_for(a.id, WAIT).await.unwrap();
    assert_eq!(a.status, SagaStatus::Failed);
    assert_eq!(log.tasks(), vec!["fail"]);
    assert_eq!(a.steps[0].status, SagaStepStatus::Failed);

    // The failed step was undone: compensated.
    let e = sagas.start_saga("effectful", json!({})).await.unwrap();
    let e = sagas.wait_for(e.id, WAIT).await.unwrap();
    assert_eq!(e.status, SagaStatus::Compensated);
    assert_eq!(log.tasks(), vec!["fail", "fail", "undo1"]);
    assert_eq!(e.steps[0].status, SagaStepStatus::Compensated);
}

#[tokio::test]
async fn compensate_on_failure_without_a_compensation_is_refused_naming_the_step() {
    let sagas = Coordinator::in_memory();
    let e = sagas
        .define_saga(
            SagaDefinition::new("order")
                .step(SagaStep::task("charge", "fail").compensate_on_failure(true)),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::InvalidConfig { field, .. } if field.contains("charge") && field.contains("compensate_on_failure")),
        "{e}"
    );
    assert!(e.to_string().contains("\"order\""), "{e}");
}

#[tokio::test]
async fn recovery_compensates_a_failed_step_marked_compensate_on_failure() {
    use architectlm_core::extensions::saga::{SagaInstance, SagaStepExecution};
    use architectlm_saga::SagaStore;
    use architectlm_store::saga::{CreateOutcome, SagaUpdate};
    // The journal as a driver leaves it when it stops between the step's failure and the
    // start of the unwind: unwinding, s3 failed, s1 and s2 completed.
    let store = Arc::new(InMemorySagaStore::new());
    let id = uuid::Uuid::now_v7();
    let steps: Vec<SagaStepExecution> = ["s1", "s2", "s3", "s4"]
        .iter()
        .map(|s| SagaStepExecution::new(uuid::Uuid::now_v7(), *s, format!("{id}:{s}")))
        .collect();
    let inst = SagaInstance::new(id, "order", 1, json!({}), None, chrono::Utc::now(), steps);
    let CreateOutcome::Created(stored) = store.create(&inst, "old").await.unwrap() else {
        panic!("created")
    };
    let mut up = SagaUpdate::new(id, stored.fencing, SagaStatus::Compensating);
    up.error = Some("step \"s3\" failed: fail refused".into());
    for (i, status) in [
        SagaStepStatus::Completed,
        SagaStepStatus::Completed,
        SagaStepStatus::Failed,
    ]
    .into_iter()
    .enumerate()
    {
        let mut rec = inst.steps[i].clone();
        rec.status = status;
        rec.attempts = 1;
        if status == SagaStepStatus::Completed {
            rec.result = Some(json!({"done": format!("step{}", i + 1)}));
        }
        up.steps.push((i as u32, rec));
    }
    store.apply(up).await.unwrap();

    let log = Log::default();
    let sagas = Coordinator::with_store(store);
    sagas.define_saga(charge_may_have_happened()).await.unwrap();
    let _rt = runtime(four_step_system(&log), &sagas).await;
    let done = sagas.wait_for(id, WAIT).await.unwrap();
    assert_eq!(done.status, SagaStatus::Compensated);
    assert_eq!(log.tasks(), vec!["undo3", "undo2", "undo1"]);
}

#[tokio::test]
async fn steps_and_compensations_read_their_saga_and_step_from_the_context() {
    type Seen = Arc<parking_lot::Mutex<Vec<architectlm_core::TaskOrigin>>>;
    let seen: Seen = Arc::default();
    let task = |id: &'static str, fail: bool, seen: Seen| {
        TaskDefinition::new(id, move |_input: Value, ctx| {
            seen.lock().extend(ctx.origin().cloned());
            async move {
                if fail {
                    Err(TaskError::permanent("declined"))
                } else {
                    Ok(json!({}))
                }
            }
        })
        .unwrap()
    };
    let sagas = Coordinator::in_memory();
    sagas
        .define_saga(
            SagaDefinition::new("order")
                .step(SagaStep::task("reserve", "reserve").compensate_with("release"))
                .step(SagaStep::task("charge", "charge")),
        )
        .await
        .unwrap();
    let _rt = runtime(
        system(vec![
            task("reserve", false, seen.clone()),
            task("release", false, seen.clone()),
            task("charge", true, seen.clone()),
        ]),
        &sagas,
    )
    .await;
    let started = sagas.start_saga("order", json!({})).await.unwrap();
    let done = sagas.wait_for(started.id, WAIT).await.unwrap();
    assert_eq!(done.status, SagaStatus::Compensated);
    let origin = |step: &str, compensation: bool| architectlm_core::TaskOrigin::SagaStep {
        saga_id: Arc::from("order"),
        instance_id: started.id,
        step_id: Arc::from(step),
        compensation,
    };
    assert_eq!(
        *seen.lock(),
        vec![
            origin("reserve", false),
            origin("charge", false),
            origin("reserve", true)
        ]
    );
}
