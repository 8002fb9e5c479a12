//! The quickstart: an order system using all four extensions on the embedded SQLite default.
//!
//! Run it with `cargo run -p examples --example quickstart`. It prints the state changes, task
//! events and extension events of:
//! 1. an order whose `submit` action starts a 4-step order saga and schedules a follow-up 24 h
//!    ahead;
//! 2. an order whose payment is declined, so the saga undoes the completed steps in reverse;
//! 3. a recurring job firing every second (three runs, then cancelled);
//! 4. the supervisor watching the order process and a background worker that crashes once and
//!    is restarted;
//! 5. the payment resource's circuit opening after failures and closing again after a trial.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use architectlm::extensions::loadmanager::{CircuitStatus, ResourceType};
use architectlm::extensions::supervisor::{ProcessRecoveryStrategy, ProcessSupervisionConfig};
use architectlm::prelude::*;
use architectlm::storage::saga::SqliteSagaStore;
use architectlm::storage::schedule::SqliteScheduleStore;
use architectlm::storage::sqlite::{SqliteDb, SqliteOptions};
use architectlm::supervisor::worker::{ChildSpec, SupervisorSpec, WorkerEventKind};
use architectlm::{ExtensionsConfig as Extensions, TaskError};
use serde_json::{Value, json};

/// The order a task works on: saga steps receive `{"input": order, "results": {...}}`, direct
/// calls the order itself.
fn order_of(input: &Value) -> &Value {
    input.get("input").unwrap_or(input)
}

/// A step that succeeds and says what it did.
fn step(id: &'static str, verb: &'static str) -> TaskDefinition {
    TaskDefinition::new(id, move |input: Value, _ctx| async move {
        Ok(json!({ "step": verb, "order": order_of(&input)["order_id"] }))
    })
    .expect("a valid task")
}

fn tasks() -> Vec<TaskDefinition> {
    vec![
        step("reserve-inventory", "reserved"),
        step("release-inventory", "released"),
        // Payment goes through the `payment-api` resource of the load manager: a permit per
        // call, released on drop, with the outcome reported to the circuit breaker.
        TaskDefinition::new("charge-payment", |input: Value, ctx| async move {
            let permit = ctx
                .load_manager()?
                .acquire_permit("payment-api", 1, None)
                .await?;
            let order = order_of(&input);
            if order["card"] == "declined" {
                permit.failure();
                return Err(TaskError::permanent("card declined"));
            }
            permit.success();
            Ok(json!({ "charged": order["amount"] }))
        })
        .expect("a valid task"),
        step("refund-payment", "refunded"),
        step("ship-order", "shipped"),
        step("cancel-shipment", "shipment cancelled"),
        step("send-confirmation", "confirmed"),
        step("send-follow-up", "followed up"),
        step("report-metrics", "reported"),
        // The action of the order's `submit` transition: start the order saga and schedule a
        // follow-up a day later, both through the services of the task context.
        TaskDefinition::new("process-order", |order: Value, ctx| async move {
            let saga = ctx
                .saga_coordinator()?
                .start_saga("order-saga", order.clone())
                .await?;
            let follow_up = ctx
                .scheduler()?
                .schedule_task(ScheduledTaskConfig::new(
                    "send-follow-up",
                    order.clone(),
                    chrono::Utc::now() + chrono::Duration::hours(24),
                ))
                .await?;
            Ok(json!({ "saga_instance": saga.id, "follow_up": follow_up }))
        })
        .expect("a valid task"),
    ]
}

fn order_process() -> Result<ProcessDefinition> {
    ProcessDefinition::builder("order")
        .initial_state("created")
        .state("processing")
        .final_state("completed")
        .final_state("cancelled")
        .transition(
            TransitionDefinition::new("created", "processing", "submit").action("process-order"),
        )
        .transition(TransitionDefinition::new(
            "processing",
            "completed",
            "complete",
        ))
        .transition(TransitionDefinition::new("*", "cancelled", "cancel"))
        .build()
}

fn order_saga() -> SagaDefinition {
    SagaDefinition::new("order-saga")
        .name("Order fulfilment")
        .step(SagaStep::task("reserve", "reserve-inventory").compensate_with("release-inventory"))
        .step(
            SagaStep::task("charge", "charge-payment")
                .compensate_with("refund-payment")
                .retry(RetryPolicy::attempts(2).with_initial_delay(Duration::from_millis(10))),
        )
        .step(SagaStep::task("ship", "ship-order").compensate_with("cancel-shipment"))
        .step(SagaStep::task("confirm", "send-confirmation"))
}

fn print_event(e: &Event) {
    let p = &e.payload;
    let detail = match &*e.event_type {
        "STATE_CHANGED" => format!("{} -> {} on {}", p["from"], p["to"], p["event"]),
        "TASK_STARTED" | "TASK_COMPLETED" => format!("{}", p["task_id"]),
        "TASK_FAILED" => format!("{}: {}", p["task_id"], p["error"]["message"]),
        "PROCESS_CREATED" => format!("{} in {}", p["process_id"], p["state"]),
        _ if e.source == "saga-coordinator" => match p["step_id"].as_str() {
            Some(step) => format!("step {step}"),
            None => format!("saga {}", p["saga_id"]),
        },
        _ if e.source == "scheduler" => format!("{} {}", p["task_id"], p["payload"]["due_at"]),
        _ if e.source == "load-manager" => {
            format!("{} ({})", p["resource_id"], p["reason"])
        }
        _ => {
            let mut s = p.to_string();
            s.truncate(90);
            s
        }
    };
    println!("  [{:<18}] {:<24} {detail}", e.source, e.event_type);
}

#[tokio::main]
async fn main() -> Result<()> {
    // Everything durable lives in one embedded SQLite file; no setup needed.
    let dir = std::env::temp_dir().join(format!("architectlm-quickstart-{}", std::process::id()));
    let db = SqliteDb::open(SqliteOptions::file(dir.join("state.db")))?;
    println!(
        "ArchitectLM quickstart — state in {}",
        dir.join("state.db").display()
    );

    let sagas = Arc::new(Coordinator::with_store(Arc::new(
        SqliteSagaStore::open(db.clone()).await?,
    )));
    let scheduler = Arc::new(
        TaskScheduler::builder()
            .store(Arc::new(SqliteScheduleStore::open(db.clone()).await?))
            .build(),
    );
    let supervisor = Arc::new(Supervisor::new());
    let load = Arc::new(LoadManager::new());

    let system = System::builder("shop")
        .name("A small shop")
        .process(order_process()?)
        .tasks(tasks())
        .extensions(Extensions::all())
        .build()?;
    let runtime = Runtime::builder(system)
        .extension(sagas.clone())
        .extension(scheduler.clone())
        .extension(supervisor.clone())
        .extension(load.clone())
        .start()
        .await?;
    let printer = runtime.subscribe_to_event("*", print_event);

    sagas.define_saga(order_saga()).await?;
    load.register(
        ResourceSettings::builder("payment-api", ResourceType::Api, 100)
            .consecutive_failures(3)
            .reset_timeout(Duration::from_millis(300))
            .build()?,
    )?;
    supervisor
        .supervise_process(
            ProcessSupervisionConfig::new("order", ProcessRecoveryStrategy::RetryLastAction)
                .check_interval(Duration::from_millis(200))
                .state_timeout(Duration::from_secs(60)),
        )
        .await?;

    println!("\n1. An order: the submit action starts the order saga and schedules a follow-up");
    let order = runtime
        .create_process(
            "order",
            json!({"order_id": "A-1", "amount": 42, "card": "ok"}),
        )
        .await?;
    let outcome = runtime
        .transition_process(order.id, "submit", json!({}))
        .await?;
    let action = outcome.into_result()?;
    let started = action
        .last_action
        .as_ref()
        .and_then(|a| a.output.clone())
        .unwrap_or_default();
    let saga_id = serde_json::from_value(started["saga_instance"].clone())?;
    let saga = sagas.wait_for(saga_id, Duration::from_secs(10)).await?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    println!(
        "   saga {} ended {:?} after steps {:?}",
        saga.id,
        saga.status,
        saga.steps
            .iter()
            .map(|s| (s.step_id.as_str(), s.status))
            .collect::<Vec<_>>()
    );
    assert_eq!(saga.status, SagaStatus::Completed);
    let follow_up = serde_json::from_value(started["follow_up"].clone())?;
    let entry = scheduler
        .get_task(follow_up)
        .await?
        .ok_or_else(|| Error::not_found("entry", follow_up))?;
    println!(
        "   follow-up {:?}, due {}",
        entry.status,
        entry
            .next_execution_at
            .map(|t| t.to_rfc3339())
            .unwrap_or_default()
    );
    runtime
        .transition_process(order.id, "complete", json!({}))
        .await?;

    println!("\n2. A declined card: the saga undoes the completed steps in reverse order");
    let declined = sagas
        .start_saga(
            "order-saga",
            json!({"order_id": "B-2", "amount": 7, "card": "declined"}),
        )
        .await?;
    let declined = sagas.wait_for(declined.id, Duration::from_secs(10)).await?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    println!(
        "   saga ended {:?}: {}",
        declined.status,
        declined.error.unwrap_or_default()
    );
    for s in &declined.steps {
        println!("     step {:<8} {:?}", s.step_id, s.status);
    }

    println!("\n3. A recurring job every second (three runs, then cancelled)");
    let mut runs = runtime.subscribe("TASK_COMPLETED");
    let job = scheduler
        .schedule_recurring_task(RecurringTaskConfig::new(
            "report-metrics",
            json!({}),
            "* * * * * *",
        ))
        .await?;
    let mut fired = 0;
    while fired < 3 {
        match tokio::time::timeout(Duration::from_secs(5), runs.recv()).await {
            Ok(Some(e)) if e.payload["task_id"] == "report-metrics" => fired += 1,
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    scheduler.cancel_task(job).await?;
    let job = scheduler
        .get_task(job)
        .await?
        .ok_or_else(|| Error::not_found("entry", job))?;
    println!(
        "   fired {} times, now {:?}",
        job.execution_count, job.status
    );

    println!(
        "\n4. Supervision: the order process is watched; a worker crashes once and is restarted"
    );
    let status = supervisor.get_process_supervision_status(order.id).await?;
    println!(
        "   order {} supervision: {:?}",
        order.id,
        status.map(|s| s.status)
    );
    let crashed = Arc::new(AtomicBool::new(false));
    let flag = crashed.clone();
    let tree = SupervisorSpec::builder("background")
        .child(ChildSpec::worker("mailer", move |ctx| {
            let first = !flag.swap(true, Ordering::SeqCst);
            async move {
                if first {
                    return Err("lost the SMTP connection".into());
                }
                ctx.cancelled().await;
                Ok(())
            }
        }))
        .build()?;
    let handle = tree.start();
    let mut worker_events = handle.subscribe("*");
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_secs(5), worker_events.recv()).await
    {
        println!("  [worker            ] {:?}", e.kind);
        if matches!(e.kind, WorkerEventKind::ChildStarted { restart_count: 1 }) {
            break;
        }
    }
    for child in handle.children().await? {
        println!(
            "   child {} is {:?} after {} restart(s)",
            child.name, child.state, child.restart_count
        );
    }
    handle.shutdown().await;

    println!(
        "\n5. Load: failed payments open the circuit; after the reset timeout a trial closes it"
    );
    // Order B-2's declined card was the first consecutive failure; two more open the circuit.
    let api = load
        .resource("payment-api")
        .ok_or_else(|| Error::not_found("resource", "payment-api"))?;
    let attempts = Arc::new(AtomicU32::new(0));
    while api.status().status != CircuitStatus::Open && attempts.load(Ordering::Relaxed) < 10 {
        attempts.fetch_add(1, Ordering::Relaxed);
        let _ = runtime
            .execute_task(
                "charge-payment",
                json!({"order_id": "C-3", "amount": 1, "card": "declined"}),
            )
            .await;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    println!(
        "   after {} more failures: {:?}",
        attempts.load(Ordering::Relaxed),
        api.status().status
    );
    let refused = runtime
        .execute_task(
            "charge-payment",
            json!({"order_id": "C-4", "amount": 1, "card": "ok"}),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    println!(
        "   while open a payment is refused: {}",
        refused.err().map(|e| e.to_string()).unwrap_or_default()
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    runtime
        .execute_task(
            "charge-payment",
            json!({"order_id": "C-5", "amount": 1, "card": "ok"}),
        )
        .await?;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let status = api.status();
    println!(
        "   after a successful trial: {:?}, {} of {} units in use",
        status.status, status.used, status.capacity
    );

    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(printer);
    let left = runtime.shutdown(Duration::from_secs(5)).await;
    println!(
        "\nShut down with {left} task(s) still running; {} event(s) skipped by slow subscribers.",
        runtime.events().dropped()
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
