//! Task supervision with the runtime, on a paused clock: failed executions of a supervised task
//! are seen through the middleware and recovered by retry (same execution id, same input) or a
//! custom task, with attempts, statuses and events.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use architectlm_core::extensions::Supervisor as _;
use architectlm_core::extensions::supervisor::{
    HealthStatus, SupervisionEventType as T, TargetType, TaskRecoveryStrategy,
    TaskSupervisionConfig,
};
use architectlm_core::{Runtime, System, TaskDefinition, TaskError};
use architectlm_supervisor::Supervisor;
use parking_lot::Mutex;
use serde_json::{Value, json};
use support::{next, quiet_for, until};
use uuid::Uuid;

struct Fixture {
    runtime: Runtime,
    supervisor: Arc<Supervisor>,
    calls: Arc<Mutex<Vec<(Uuid, Value)>>>,
    repairs: Arc<Mutex<Vec<Value>>>,
}

async fn fixture(failures: u32, repair_failures: u32, permanent: bool) -> Fixture {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let c = calls.clone();
    let flaky = TaskDefinition::new("send-email", move |input, ctx| {
        let n = {
            let mut calls = c.lock();
            calls.push((ctx.execution_id(), input.clone()));
            calls.len() as u32
        };
        async move {
            if n <= failures {
                if permanent {
                    Err(TaskError::permanent("mailbox does not exist"))
                } else {
                    Err(TaskError::new(format!("smtp timeout (call {n})")))
                }
            } else {
                Ok(json!({"sent": input["to"]}))
            }
        }
    })
    .unwrap();
    let repairs = Arc::new(Mutex::new(Vec::new()));
    let r = repairs.clone();
    let count = Arc::new(AtomicU32::new(0));
    let repair = TaskDefinition::new("queue-for-later", move |input, _ctx| {
        r.lock().push(input.clone());
        let n = count.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            if n <= repair_failures {
                Err(TaskError::new("queue unavailable"))
            } else {
                Ok(json!({"queued": input["input"]["to"]}))
            }
        }
    })
    .unwrap();
    let system = System::builder("mail")
        .task(flaky)
        .task(repair)
        .build()
        .unwrap();
    let supervisor = Arc::new(Supervisor::new());
    let runtime = Runtime::builder(system)
        .extension(supervisor.clone())
        .start()
        .await
        .unwrap();
    Fixture {
        runtime,
        supervisor,
        calls,
        repairs,
    }
}

#[tokio::test(start_paused = true)]
async fn retry_recovers_a_failed_execution_with_the_same_id_and_input() {
    let f = fixture(3, 0, false).await;
    f.supervisor
        .supervise_task(
            TaskSupervisionConfig::new("send-email", TaskRecoveryStrategy::Retry)
                .max_recovery_attempts(5)
                .check_interval(Duration::from_secs(1)),
        )
        .await
        .unwrap();
    let mut events = f.supervisor.subscribe("*");
    let err = f
        .runtime
        .execute_task("send-email", json!({"to": "a@example.com"}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("smtp timeout"));
    let detected = next(&mut events).await;
    assert_eq!(detected.event_type, T::UnhealthyDetected);
    assert_eq!(detected.target_type, TargetType::Task);
    let execution_id = detected.target_id;
    until(&mut events, |e| e.event_type == T::RecoverySucceeded).await;

    let calls = f.calls.lock().clone();
    assert_eq!(calls.len(), 4);
    assert!(calls.iter().all(|(id, _)| *id == execution_id));
    assert!(
        calls
            .iter()
            .all(|(_, input)| *input == json!({"to": "a@example.com"}))
    );
    let status = f
        .supervisor
        .get_task_supervision_status(execution_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.status, HealthStatus::Recovered);
    assert_eq!(status.recovery_attempts, 3);
    assert_eq!(status.target_id, execution_id);
    // Executions that never failed have no status.
    f.runtime
        .execute_task("send-email", json!({"to": "b@example.com"}))
        .await
        .unwrap();
    quiet_for(&mut events, Duration::from_secs(5)).await;
}

#[tokio::test(start_paused = true)]
async fn custom_recovery_gets_the_failed_execution() {
    let f = fixture(u32::MAX, 1, false).await;
    f.supervisor
        .supervise_task(
            TaskSupervisionConfig::new("send-email", TaskRecoveryStrategy::Custom)
                .custom_recovery_action("queue-for-later")
                .check_interval(Duration::from_secs(1)),
        )
        .await
        .unwrap();
    let mut events = f.supervisor.subscribe("*");
    let _ = f
        .runtime
        .execute_task("send-email", json!({"to": "c@example.com"}))
        .await;
    let ok = until(&mut events, |e| e.event_type == T::RecoverySucceeded).await;
    assert_eq!(ok.payload["attempt"], json!(2));
    assert_eq!(ok.payload["result"], json!({"queued": "c@example.com"}));
    let repairs = f.repairs.lock().clone();
    assert_eq!(repairs.len(), 2);
    assert_eq!(repairs[0]["task_id"], json!("send-email"));
    assert_eq!(repairs[0]["execution_id"], json!(ok.target_id));
    assert_eq!(repairs[0]["input"], json!({"to": "c@example.com"}));
    assert!(
        repairs[0]["error"]
            .as_str()
            .unwrap()
            .contains("smtp timeout")
    );
    // The supervised task itself ran once: custom recovery does not rerun it.
    assert_eq!(f.calls.lock().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn task_recovery_gives_up_at_the_maximum() {
    let f = fixture(u32::MAX, 0, false).await;
    f.supervisor
        .supervise_task(
            TaskSupervisionConfig::new("send-email", TaskRecoveryStrategy::Retry)
                .max_recovery_attempts(2)
                .check_interval(Duration::from_secs(1)),
        )
        .await
        .unwrap();
    let mut events = f.supervisor.subscribe("*");
    let _ = f
        .runtime
        .execute_task("send-email", json!({"to": "d"}))
        .await;
    let max = until(&mut events, |e| {
        e.event_type == T::MaxRecoveryAttemptsReached
    })
    .await;
    assert_eq!(max.payload["attempts"], json!(2));
    quiet_for(&mut events, Duration::from_secs(30)).await;
    assert_eq!(f.calls.lock().len(), 3);
    let status = f
        .supervisor
        .get_task_supervision_status(max.target_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.status, HealthStatus::Failed);
    assert_eq!(status.recovery_attempts, 2);

    // A manual recovery of the failed execution runs it once more.
    assert!(!f.supervisor.recover_task(max.target_id).await.unwrap());
    assert_eq!(f.calls.lock().len(), 4);
    let unknown = f.supervisor.recover_task(Uuid::new_v4()).await.unwrap_err();
    assert!(
        unknown.to_string().contains("unknown failed execution"),
        "{unknown}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_permanent_failure_is_not_retried() {
    let f = fixture(u32::MAX, 0, true).await;
    f.supervisor
        .supervise_task(TaskSupervisionConfig::new(
            "send-email",
            TaskRecoveryStrategy::Retry,
        ))
        .await
        .unwrap();
    let mut events = f.supervisor.subscribe("*");
    let _ = f
        .runtime
        .execute_task("send-email", json!({"to": "e"}))
        .await;
    let detected = next(&mut events).await;
    let failed = next(&mut events).await;
    assert_eq!(detected.event_type, T::UnhealthyDetected);
    assert_eq!(failed.event_type, T::RecoveryFailed);
    quiet_for(&mut events, Duration::from_secs(120)).await;
    assert_eq!(f.calls.lock().len(), 1);
    let status = f
        .supervisor
        .get_task_supervision_status(detected.target_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.status, HealthStatus::Failed);
}

#[tokio::test(start_paused = true)]
async fn bad_task_configuration_is_rejected() {
    let f = fixture(0, 0, false).await;
    let cfg = || TaskSupervisionConfig::new("send-email", TaskRecoveryStrategy::Retry);
    let err = |c: TaskSupervisionConfig| {
        let s = f.supervisor.clone();
        async move { s.supervise_task(c).await.unwrap_err().to_string() }
    };
    let e = err(cfg().check_interval(Duration::ZERO)).await;
    assert!(e.contains("check_interval = 0ms"), "{e}");
    let e = err(cfg().max_recovery_attempts(0)).await;
    assert!(e.contains("max_recovery_attempts = 0"), "{e}");
    let e = err(TaskSupervisionConfig::new(
        "send-email",
        TaskRecoveryStrategy::Custom,
    ))
    .await;
    assert!(e.contains("custom_recovery_action = none"), "{e}");
    let e = err(TaskSupervisionConfig::new(
        "nope",
        TaskRecoveryStrategy::Retry,
    ))
    .await;
    assert!(e.contains("unknown task \"nope\""), "{e}");
    let e = err(
        TaskSupervisionConfig::new("send-email", TaskRecoveryStrategy::Custom)
            .custom_recovery_action("send-email"),
    )
    .await;
    assert!(e.contains("its own recovery task"), "{e}");
}
