//! The quickstart's story, end to end: a payment task guarded by a resource, a circuit that
//! opens on failures, refuses while open, goes half-open on time and closes after a good trial.

use std::sync::Arc;
use std::time::Duration;

use architectlm_core::extensions::loadmanager::{CircuitStatus, ResourceType};
use architectlm_core::{Runtime, System, TaskDefinition, TaskError};
use architectlm_loadmanager::{LoadManager, ResourceSettings};
use serde_json::{Value, json};

fn payment_task() -> TaskDefinition {
    TaskDefinition::new("charge-card", |input: Value, ctx| async move {
        let lm = ctx
            .load_manager()
            .map_err(|e| TaskError::new(e.to_string()))?;
        let permit = lm
            .acquire_permit("payment-api", 1, Some(Duration::from_millis(100)))
            .await
            .map_err(|e| TaskError::new(e.to_string()))?;
        if input["card"] == json!("declined") {
            permit.failure();
            return Err(TaskError::new("gateway error"));
        }
        permit.success();
        Ok(json!({ "charged": input["amount"] }))
    })
    .expect("task")
}

#[tokio::test(start_paused = true)]
async fn a_guarded_payment_task_opens_and_closes_its_circuit() {
    let lm = Arc::new(LoadManager::new());
    lm.register(
        ResourceSettings::builder("payment-api", ResourceType::Api, 10)
            .open_on_usage(false)
            .consecutive_failures(3)
            .half_open_trials(1)
            .reset_timeout(Duration::from_secs(30))
            .build()
            .expect("settings"),
    )
    .expect("register");
    let system = System::builder("shop")
        .task(payment_task())
        .build()
        .expect("system");
    let runtime = Runtime::builder(system)
        .extension(lm.clone())
        .start()
        .await
        .expect("runtime");
    let mut events = runtime.subscribe("*");

    for _ in 0..3 {
        let r = runtime
            .execute_task("charge-card", json!({"card": "declined", "amount": 5}))
            .await;
        assert!(r.is_err());
    }
    let refused = runtime
        .execute_task("charge-card", json!({"card": "ok", "amount": 5}))
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("circuit open"), "{refused}");

    tokio::time::sleep(Duration::from_secs(30)).await;
    let paid = runtime
        .execute_task("charge-card", json!({"card": "ok", "amount": 5}))
        .await
        .expect("trial call");
    assert_eq!(paid, json!({"charged": 5}));
    let status = lm.resource("payment-api").expect("resource").status();
    assert_eq!((status.status, status.used), (CircuitStatus::Closed, 0));

    let mut seen = vec![];
    while let Some(e) = events.try_recv() {
        if e.source == "load-manager" {
            seen.push(e.event_type.to_string());
        }
    }
    assert_eq!(
        seen,
        ["circuit-open", "circuit-half-open", "circuit-closed"]
    );
}
