//! Process supervision end to end with the runtime, on a paused clock: each strategy recovers an
//! instance whose action fails twice, backoff spaces the attempts, the limit gives up once, and
//! bad configuration is refused.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use architectlm_core::extensions::Supervisor as _;
use architectlm_core::extensions::supervisor::{
    HealthStatus, ProcessRecoveryStrategy, ProcessSupervisionConfig, SupervisionEvent,
    SupervisionEventType as T,
};
use architectlm_core::{
    ActionStatus, Backoff, ProcessDefinition, RetryPolicy, Runtime, System, TaskDefinition,
    TaskError, TransitionDefinition,
};
use architectlm_supervisor::Supervisor;
use parking_lot::Mutex;
use serde_json::json;
use support::{next, quiet_for, until};
use tokio::time::Instant;

struct Fixture {
    runtime: Runtime,
    supervisor: Arc<Supervisor>,
    charges: Arc<AtomicU32>,
    charge_times: Arc<Mutex<Vec<Instant>>>,
    repairs: Arc<AtomicU32>,
}

/// An order process whose `charge` action fails `charge_failures` times, and a `repair` task
/// that fails `repair_failures` times and then cancels the order.
async fn fixture(charge_failures: u32, repair_failures: u32) -> Fixture {
    let order = ProcessDefinition::builder("order")
        .initial_state("created")
        .state("paid")
        .state("processing")
        .final_state("done")
        .final_state("cancelled")
        .transition(TransitionDefinition::new("created", "paid", "pay").action("charge"))
        .transition(TransitionDefinition::new("paid", "processing", "process"))
        .transition(TransitionDefinition::new("processing", "done", "finish"))
        .transition(TransitionDefinition::new("*", "cancelled", "cancel"))
        .build()
        .unwrap();
    let charges = Arc::new(AtomicU32::new(0));
    let charge_times = Arc::new(Mutex::new(Vec::new()));
    let (c, t) = (charges.clone(), charge_times.clone());
    let charge = TaskDefinition::new("charge", move |input, _ctx| {
        let n = c.fetch_add(1, Ordering::SeqCst) + 1;
        t.lock().push(Instant::now());
        async move {
            if n <= charge_failures {
                Err(TaskError::new(format!("card declined (call {n})")))
            } else {
                Ok(json!({"charged": input["amount"]}))
            }
        }
    })
    .unwrap();
    let repairs = Arc::new(AtomicU32::new(0));
    let r = repairs.clone();
    let repair = TaskDefinition::new("repair", move |input, ctx| {
        let n = r.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            if n <= repair_failures {
                return Err(TaskError::new(format!("repair failed (call {n})")));
            }
            let id = input["instance"]["id"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| TaskError::permanent("no instance id in the input"))?;
            ctx.runtime()
                .transition_process(id, "cancel", json!({"repaired": true}))
                .await
                .map_err(|e| TaskError::new(e.to_string()))?;
            Ok(json!({"cancelled": id}))
        }
    })
    .unwrap();
    let system = System::builder("shop")
        .process(order)
        .task(charge)
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
        charges,
        charge_times,
        repairs,
    }
}

fn kinds(events: &[Arc<SupervisionEvent>]) -> Vec<(T, u64)> {
    events
        .iter()
        .map(|e| {
            (
                e.event_type,
                e.payload["attempt"]
                    .as_u64()
                    .or(e.payload["attempts"].as_u64())
                    .unwrap_or(0),
            )
        })
        .collect()
}

async fn collect_until(
    sub: &mut architectlm_core::Subscription<SupervisionEvent>,
    last: T,
) -> Vec<Arc<SupervisionEvent>> {
    let mut out = Vec::new();
    loop {
        let e = next(sub).await;
        let done = e.event_type == last;
        out.push(e);
        if done {
            return out;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn retry_last_action_recovers_an_action_that_fails_twice() {
    let f = fixture(2, 0).await;
    f.supervisor
        .supervise_process(
            ProcessSupervisionConfig::new("order", ProcessRecoveryStrategy::RetryLastAction)
                .max_recovery_attempts(5)
                .check_interval(Duration::from_secs(1)),
        )
        .await
        .unwrap();
    let mut events = f.supervisor.subscribe("*");
    let mut bus = f.runtime.subscribe("recovery-succeeded");
    let inst = f
        .runtime
        .create_process("order", json!({"amount": 42}))
        .await
        .unwrap();
    let first = f
        .runtime
        .transition_process(inst.id, "pay", json!({}))
        .await
        .unwrap();
    assert!(first.action.unwrap().result.is_err());

    let seen = collect_until(&mut events, T::RecoverySucceeded).await;
    assert_eq!(
        kinds(&seen),
        vec![
            (T::UnhealthyDetected, 0),
            (T::RecoveryStarted, 1),
            (T::RecoveryFailed, 1),
            (T::RecoveryStarted, 2),
            (T::RecoverySucceeded, 2),
        ]
    );
    assert!(seen.iter().all(|e| e.target_id == inst.id));
    assert_eq!(f.charges.load(Ordering::SeqCst), 3);
    // Same input every time: the context of the transition.
    let after = f.runtime.get_process(inst.id).await.unwrap().unwrap();
    let action = after.last_action.unwrap();
    assert_eq!(action.status, ActionStatus::Completed);
    assert_eq!(action.output, Some(json!({"charged": 42})));
    assert_eq!(&*after.state, "paid");

    let status = f
        .supervisor
        .get_process_supervision_status(inst.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.status, HealthStatus::Recovered);
    assert_eq!(status.recovery_attempts, 2);
    assert!(status.last_recovery_at.is_some());

    // Forwarded to the runtime's bus.
    let fwd = next(&mut bus).await;
    assert_eq!(fwd.source, "supervisor");
    assert_eq!(fwd.payload["target_id"], json!(inst.id));

    // The next check finds it healthy.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = f
        .supervisor
        .get_process_supervision_status(inst.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.status, HealthStatus::Healthy);
    assert_eq!(status.error, None);
}

#[tokio::test(start_paused = true)]
async fn restart_puts_the_instance_back_with_its_original_context() {
    let f = fixture(2, 0).await;
    f.supervisor
        .supervise_process(
            ProcessSupervisionConfig::new("order", ProcessRecoveryStrategy::Restart)
                .check_interval(Duration::from_secs(1)),
        )
        .await
        .unwrap();
    let mut events = f.supervisor.subscribe("*");
    let inst = f
        .runtime
        .create_process("order", json!({"amount": 7}))
        .await
        .unwrap();
    // Each failed payment is restarted; the client pays again after each restart.
    for round in 1..=2 {
        let out = f
            .runtime
            .transition_process(inst.id, "pay", json!({"coupon": format!("round-{round}")}))
            .await
            .unwrap();
        assert!(out.action.unwrap().result.is_err(), "round {round}");
        until(&mut events, |e| e.event_type == T::RecoverySucceeded).await;
        let back = f.runtime.get_process(inst.id).await.unwrap().unwrap();
        assert_eq!(&*back.state, "created");
        // The data merged by the failed transition is gone: the original context is back.
        assert_eq!(back.context, json!({"amount": 7}));
        assert!(back.last_action.is_none());
    }
    let out = f
        .runtime
        .transition_process(inst.id, "pay", json!({}))
        .await
        .unwrap();
    assert_eq!(out.action.unwrap().result.unwrap(), json!({"charged": 7}));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = f
        .supervisor
        .get_process_supervision_status(inst.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.status, HealthStatus::Healthy);
}

#[tokio::test(start_paused = true)]
async fn restart_unsticks_an_instance_past_its_state_deadline() {
    let f = fixture(0, 0).await;
    f.supervisor
        .supervise_process(
            ProcessSupervisionConfig::new("order", ProcessRecoveryStrategy::Restart)
                .check_interval(Duration::from_secs(5))
                .state_timeout(Duration::from_secs(3600))
                .state_timeout_for("processing", Duration::from_secs(60)),
        )
        .await
        .unwrap();
    let mut events = f.supervisor.subscribe(T::UnhealthyDetected.as_str());
    let inst = f
        .runtime
        .create_process("order", json!({"amount": 1}))
        .await
        .unwrap();
    f.runtime
        .transition_process(inst.id, "pay", json!({}))
        .await
        .unwrap();
    f.runtime
        .transition_process(inst.id, "process", json!({}))
        .await
        .unwrap();
    let entered = Instant::now();
    let e = next(&mut events).await;
    let waited = entered.elapsed();
    // Detected on the first check after the 60 s deadline, not before it.
    assert!(waited > Duration::from_secs(60), "{waited:?}");
    assert!(waited <= Duration::from_secs(66), "{waited:?}");
    assert!(
        e.payload["error"]
            .as_str()
            .unwrap()
            .contains("\"processing\"")
    );
    let mut done = f.supervisor.subscribe(T::RecoverySucceeded.as_str());
    next(&mut done).await;
    let back = f.runtime.get_process(inst.id).await.unwrap().unwrap();
    assert_eq!(&*back.state, "created");
    assert_eq!(back.context, json!({"amount": 1}));
}

#[tokio::test(start_paused = true)]
async fn custom_recovery_task_runs_with_the_instance_until_it_succeeds() {
    let f = fixture(u32::MAX, 2).await;
    f.supervisor
        .supervise_process(
            ProcessSupervisionConfig::new("order", ProcessRecoveryStrategy::Custom)
                .custom_recovery_action("repair")
                .max_recovery_attempts(4)
                .check_interval(Duration::from_secs(1)),
        )
        .await
        .unwrap();
    let mut events = f.supervisor.subscribe("*");
    let inst = f
        .runtime
        .create_process("order", json!({"amount": 3}))
        .await
        .unwrap();
    f.runtime
        .transition_process(inst.id, "pay", json!({}))
        .await
        .unwrap();
    let seen = collect_until(&mut events, T::RecoverySucceeded).await;
    assert_eq!(
        kinds(&seen),
        vec![
            (T::UnhealthyDetected, 0),
            (T::RecoveryStarted, 1),
            (T::RecoveryFailed, 1),
            (T::RecoveryStarted, 2),
            (T::RecoveryFailed, 2),
            (T::RecoveryStarted, 3),
            (T::RecoverySucceeded, 3),
        ]
    );
    assert_eq!(f.repairs.load(Ordering::SeqCst), 3);
    let after = f.runtime.get_process(inst.id).await.unwrap().unwrap();
    assert_eq!(&*after.state, "cancelled");
    assert_eq!(after.context["repaired"], json!(true));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = f
        .supervisor
        .get_process_supervision_status(inst.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.status, HealthStatus::Healthy);
    assert_eq!(status.recovery_attempts, 3);
}

#[tokio::test(start_paused = true)]
async fn backoff_spaces_the_attempts() {
    let f = fixture(3, 0).await;
    f.supervisor
        .supervise_process(
            ProcessSupervisionConfig::new("order", ProcessRecoveryStrategy::RetryLastAction)
                .max_recovery_attempts(5)
                .check_interval(Duration::from_secs(60))
                .backoff(
                    RetryPolicy::default()
                        .with_backoff(Backoff::Exponential)
                        .with_initial_delay(Duration::from_secs(2))
                        .with_max_delay(Duration::from_secs(30)),
                ),
        )
        .await
        .unwrap();
    let mut events = f.supervisor.subscribe(T::RecoverySucceeded.as_str());
    let inst = f
        .runtime
        .create_process("order", json!({"amount": 3}))
        .await
        .unwrap();
    f.runtime
        .transition_process(inst.id, "pay", json!({}))
        .await
        .unwrap();
    next(&mut events).await;
    let times = f.charge_times.lock().clone();
    assert_eq!(times.len(), 4);
    let gaps: Vec<u64> = times
        .windows(2)
        .skip(1)
        .map(|w| (w[1] - w[0]).as_millis() as u64)
        .collect();
    // After attempt 1 fails: 2 s, after attempt 2: 4 s (not the 60 s check interval).
    assert_eq!(gaps, vec![2000, 4000]);
}

#[tokio::test(start_paused = true)]
async fn reaching_the_maximum_gives_up_once() {
    let f = fixture(u32::MAX, 0).await;
    f.supervisor
        .supervise_process(
            ProcessSupervisionConfig::new("order", ProcessRecoveryStrategy::RetryLastAction)
                .max_recovery_attempts(3)
                .check_interval(Duration::from_secs(1)),
        )
        .await
        .unwrap();
    let mut events = f.supervisor.subscribe("*");
    let mut bus = f.runtime.subscribe("max-recovery-attempts-reached");
    let inst = f
        .runtime
        .create_process("order", json!({"amount": 3}))
        .await
        .unwrap();
    f.runtime
        .transition_process(inst.id, "pay", json!({}))
        .await
        .unwrap();
    let seen = collect_until(&mut events, T::MaxRecoveryAttemptsReached).await;
    assert_eq!(
        kinds(&seen),
        vec![
            (T::UnhealthyDetected, 0),
            (T::RecoveryStarted, 1),
            (T::RecoveryFailed, 1),
            (T::RecoveryStarted, 2),
            (T::RecoveryFailed, 2),
            (T::RecoveryStarted, 3),
            (T::RecoveryFailed, 3),
            (T::MaxRecoveryAttemptsReached, 3),
        ]
    );
    assert_eq!(next(&mut bus).await.source, "supervisor");
    // Nothing more happens: the instance stays failed.
    quiet_for(&mut events, Duration::from_secs(30)).await;
    assert_eq!(f.charges.load(Ordering::SeqCst), 4);
    let status = f
        .supervisor
        .get_process_supervision_status(inst.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.status, HealthStatus::Failed);
    assert_eq!(status.recovery_attempts, 3);
    assert_eq!(status.max_recovery_attempts, 3);
    assert!(status.error.unwrap().contains("card declined"));

    // An operator may still try by hand: one more attempt, a new episode.
    assert!(!f.supervisor.recover_process(inst.id).await.unwrap());
    let status = f
        .supervisor
        .get_process_supervision_status(inst.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.status, HealthStatus::Unhealthy);
    assert_eq!(status.recovery_attempts, 1);
}

#[tokio::test(start_paused = true)]
async fn a_manual_recovery_while_one_runs_returns_false() {
    let gate = Arc::new(tokio::sync::Notify::new());
    let g = gate.clone();
    let order = ProcessDefinition::builder("order")
        .initial_state("created")
        .final_state("paid")
        .transition(TransitionDefinition::new("created", "paid", "pay"))
        .build()
        .unwrap();
    let slow = TaskDefinition::new("slow-repair", move |_input, _ctx| {
        let g = g.clone();
        async move {
            g.notified().await;
            Ok(json!(null))
        }
    })
    .unwrap();
    let system = System::builder("s")
        .process(order)
        .task(slow)
        .build()
        .unwrap();
    let supervisor = Arc::new(Supervisor::new());
    let runtime = Runtime::builder(system)
        .extension(supervisor.clone())
        .start()
        .await
        .unwrap();
    supervisor
        .supervise_process(
            ProcessSupervisionConfig::new("order", ProcessRecoveryStrategy::Custom)
                .custom_recovery_action("slow-repair")
                .check_interval(Duration::from_secs(1))
                .state_timeout(Duration::from_secs(10)),
        )
        .await
        .unwrap();
    let mut started = supervisor.subscribe(T::RecoveryStarted.as_str());
    let inst = runtime.create_process("order", json!({})).await.unwrap();
    next(&mut started).await;
    assert!(!supervisor.recover_process(inst.id).await.unwrap());
    gate.notify_one();
    let mut done = supervisor.subscribe(T::RecoverySucceeded.as_str());
    next(&mut done).await;
}

#[tokio::test(start_paused = true)]
async fn bad_configuration_is_rejected_naming_the_field_and_value() {
    let f = fixture(0, 0).await;
    let cfg = || ProcessSupervisionConfig::new("order", ProcessRecoveryStrategy::Restart);
    let err = |c: ProcessSupervisionConfig| {
        let s = f.supervisor.clone();
        async move { s.supervise_process(c).await.unwrap_err().to_string() }
    };
    let e = err(cfg().check_interval(Duration::ZERO)).await;
    assert!(e.contains("check_interval = 0ms"), "{e}");
    let e = err(cfg().max_recovery_attempts(0)).await;
    assert!(e.contains("max_recovery_attempts = 0"), "{e}");
    let e = err(ProcessSupervisionConfig::new(
        "order",
        ProcessRecoveryStrategy::Custom,
    ))
    .await;
    assert!(e.contains("custom_recovery_action = none"), "{e}");
    let e = err(cfg().custom_recovery_action("repair")).await;
    assert!(e.contains("does not use the custom strategy"), "{e}");
    let e = err(ProcessSupervisionConfig::new(
        "nope",
        ProcessRecoveryStrategy::Restart,
    ))
    .await;
    assert!(e.contains("unknown process \"nope\""), "{e}");
    let e = err(cfg().state_timeout_for("shipping", Duration::from_secs(1))).await;
    assert!(e.contains("state_timeouts[\"shipping\"]"), "{e}");
    let e = err(cfg().state_timeout_for("done", Duration::from_secs(1))).await;
    assert!(e.contains("final state"), "{e}");
    let e = err(cfg().state_timeout(Duration::ZERO)).await;
    assert!(e.contains("state_timeout = 0ms"), "{e}");
    let e = err(
        ProcessSupervisionConfig::new("order", ProcessRecoveryStrategy::Custom)
            .custom_recovery_action("missing-task"),
    )
    .await;
    assert!(
        e.contains("custom_recovery_action = \"missing-task\""),
        "{e}"
    );
    let e = err(cfg().backoff(RetryPolicy::default().with_jitter(3.0))).await;
    assert!(e.contains("retry.jitter = 3"), "{e}");
}

#[tokio::test(start_paused = true)]
async fn configuration_given_before_start_is_checked_at_start() {
    let system = System::builder("empty").build().unwrap();
    let supervisor = Arc::new(Supervisor::new());
    supervisor
        .supervise_process(ProcessSupervisionConfig::new(
            "ghost",
            ProcessRecoveryStrategy::Restart,
        ))
        .await
        .unwrap();
    let err = Runtime::builder(system)
        .extension(supervisor)
        .start()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown process \"ghost\""), "{err}");
}
