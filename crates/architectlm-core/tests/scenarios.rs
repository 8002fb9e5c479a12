//! The five integration scenarios of the original, with mockall mocks as the extension
//! services: each asserts that the task called its service with the right arguments and that
//! the runtime reached the right states.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use architectlm_core::extensions::loadmanager::{
    LoadEvent, LoadEventHandler, LoadEventType, ResourceConfig, ResourceStatus, ResourceType,
    Thresholds,
};
use architectlm_core::extensions::saga::{SagaDefinition, SagaInstance, SagaStep};
use architectlm_core::extensions::scheduler::{
    ScheduledTask, ScheduledTaskConfig, ScheduledTaskStatus,
};
use architectlm_core::extensions::supervisor::{
    HealthStatus, ProcessRecoveryStrategy, ProcessSupervisionConfig, SupervisionEvent,
    SupervisionEventHandler, SupervisionEventType, SupervisionStatus, TargetType,
};
use architectlm_core::mock::{MockLoadManager, MockSagaCoordinator, MockScheduler, MockSupervisor};
use architectlm_core::{
    ActionStatus, Event, EventFilter, EventSubscription, ExtensionsConfig, ProcessDefinition,
    Runtime, System, TaskDefinition, TaskError, TransitionDefinition,
};
use chrono::{DateTime, Utc};
use mockall::predicate::eq;
use parking_lot::Mutex;
use serde_json::{Value, json};
use support::{empty, from_json, next_event};
use uuid::Uuid;

const ORDER_SAGA_STEPS: [&str; 4] = [
    "reserve-inventory",
    "process-payment",
    "ship-order",
    "notify-customer",
];

fn e(err: architectlm_core::Error) -> TaskError {
    TaskError::new(err.to_string())
}

fn saga_instance(id: Uuid, status: &str, input: &Value) -> SagaInstance {
    from_json(json!({
        "id": id, "saga_id": "order-saga", "saga_version": 1, "status": status,
        "steps": ORDER_SAGA_STEPS.iter().map(|s| json!({
            "id": Uuid::new_v4(), "step_id": s, "status": "pending", "attempts": 0,
            "compensation_attempts": 0, "idempotency_key": format!("{id}:{s}"),
            "started_at": null, "completed_at": null, "result": null, "error": null
        })).collect::<Vec<_>>(),
        "input": input, "context": {}, "idempotency_key": null,
        "started_at": Utc::now(), "completed_at": null, "error": null
    }))
}

fn scheduled_task(id: Uuid, task_id: &str, at: DateTime<Utc>, input: &Value) -> ScheduledTask {
    from_json(json!({
        "id": id, "task_id": task_id, "status": "scheduled", "execute_at": at,
        "executed_at": null, "next_execution_at": at, "pattern": null, "timezone": null,
        "remaining_executions": null, "execution_count": 0, "input": input, "result": null,
        "error": null, "description": null, "metadata": {}, "history": []
    }))
}

fn order_saga_definition() -> SagaDefinition {
    ORDER_SAGA_STEPS.iter().fold(
        SagaDefinition::new("order-saga").name("Order saga"),
        |d, s| d.step(SagaStep::task(*s, *s)),
    )
}

fn step_tasks() -> Vec<TaskDefinition> {
    ORDER_SAGA_STEPS.iter().map(|s| support::echo(s)).collect()
}

/// 1. An order process whose `processing` transition action starts a 4-step order saga.
#[tokio::test]
async fn scenario_1_an_order_transition_starts_the_order_saga() {
    let saga_id = Uuid::new_v4();
    let mut saga = MockSagaCoordinator::new();
    saga.expect_define_saga()
        .withf(|d| {
            d.id == "order-saga"
                && d.steps.iter().map(|s| s.id.as_str()).collect::<Vec<_>>() == ORDER_SAGA_STEPS
        })
        .times(1)
        .returning(|_| Ok(()));
    saga.expect_start_saga()
        .withf(|id, input| id == "order-saga" && input["order_id"] == "o-1" && input["total"] == 99)
        .times(1)
        .returning(move |_, input| Ok(saga_instance(saga_id, "running", &input)));
    saga.expect_get_saga_status()
        .with(eq(saga_id))
        .times(1)
        .returning(move |_| Ok(Some(saga_instance(saga_id, "completed", &json!({})))));

    let order = ProcessDefinition::builder("order")
        .initial_state("created")
        .state("processing")
        .final_state("completed")
        .transition(
            TransitionDefinition::new("created", "processing", "process")
                .action("start-order-saga"),
        )
        .transition(TransitionDefinition::new(
            "processing",
            "completed",
            "complete",
        ))
        .build()
        .expect("valid");
    let define = TaskDefinition::new("define-order-saga", |_i, ctx| async move {
        ctx.saga_coordinator()
            .map_err(e)?
            .define_saga(order_saga_definition())
            .await
            .map_err(e)?;
        Ok(json!("defined"))
    })
    .expect("valid");
    let start_saga = TaskDefinition::new("start-order-saga", |input, ctx| async move {
        let saga = ctx.saga_coordinator().map_err(e)?;
        let instance = saga.start_saga("order-saga", input).await.map_err(e)?;
        Ok(json!({"saga_instance": instance.id, "status": instance.status, "steps": instance.steps.len()}))
    })
    .expect("valid");
    let check = TaskDefinition::new("check-saga", |input, ctx| async move {
        let id: Uuid = serde_json::from_value(input["saga_instance"].clone())?;
        let status = ctx
            .saga_coordinator()
            .map_err(e)?
            .get_saga_status(id)
            .await
            .map_err(e)?;
        Ok(json!(status.map(|s| s.status)))
    })
    .expect("valid");
    let mut ext = ExtensionsConfig::default();
    ext.saga_coordinator = true;
    let system = System::builder("shop")
        .extensions(ext)
        .process(order)
        .tasks([define, start_saga, check])
        .tasks(step_tasks())
        .build()
        .expect("valid");
    let rt = Runtime::builder(system)
        .saga_coordinator(Arc::new(saga))
        .start()
        .await
        .expect("starts");

    rt.execute_task("define-order-saga", empty())
        .await
        .expect("defined");
    let instance = rt
        .create_process("order", json!({"order_id": "o-1", "total": 99}))
        .await
        .expect("created");
    let out = rt
        .transition_process(instance.id, "process", empty())
        .await
        .expect("transition");
    assert_eq!(&*out.instance.state, "processing");
    let started = out
        .action
        .expect("an action ran")
        .result
        .expect("the saga started");
    assert_eq!(
        started,
        json!({"saga_instance": saga_id, "status": "running", "steps": 4})
    );
    assert_eq!(
        out.instance.last_action.as_ref().map(|a| a.status),
        Some(ActionStatus::Completed)
    );

    let status = rt
        .execute_task("check-saga", started)
        .await
        .expect("checked");
    assert_eq!(status, json!("completed"));
    let done = rt
        .transition_process(instance.id, "complete", empty())
        .await
        .expect("completed");
    assert_eq!(&*done.instance.state, "completed");
}

/// 2. A task schedules `send-reminder` one minute ahead and reads it back as scheduled.
#[tokio::test]
async fn scenario_2_a_task_schedules_a_reminder_a_minute_ahead() {
    let entry = Uuid::new_v4();
    let stored: Arc<Mutex<Option<ScheduledTaskConfig>>> = Arc::default();
    let mut scheduler = MockScheduler::new();
    let s = stored.clone();
    scheduler
        .expect_schedule_task()
        .withf(|c| {
            let ahead = c.execute_at - Utc::now();
            c.task_id == "send-reminder"
                && c.input == json!({"user_id": "u-7", "message": "Your cart misses you"})
                && ahead > chrono::Duration::seconds(55)
                && ahead <= chrono::Duration::seconds(60)
        })
        .times(1)
        .returning(move |c| {
            *s.lock() = Some(c);
            Ok(entry)
        });
    let s = stored.clone();
    scheduler
        .expect_get_task()
        .with(eq(entry))
        .times(1)
        .returning(move |id| {
            Ok(s.lock()
                .as_ref()
                .map(|c| scheduled_task(id, &c.task_id, c.execute_at, &c.input)))
        });

    let plan = TaskDefinition::new("plan-reminder", |input, ctx| async move {
        let scheduler = ctx.scheduler().map_err(e)?;
        let at = Utc::now() + chrono::Duration::minutes(1);
        let id = scheduler
            .schedule_task(ScheduledTaskConfig::new("send-reminder", input, at))
            .await
            .map_err(e)?;
        let task = scheduler.get_task(id).await.map_err(e)?.ok_or("scheduled entry vanished")?;
        Ok(json!({"id": task.id, "task_id": task.task_id, "status": task.status, "execute_at": task.execute_at}))
    })
    .expect("valid");
    let mut ext = ExtensionsConfig::default();
    ext.scheduler = true;
    let system = System::builder("crm")
        .extensions(ext)
        .task(plan)
        .task(support::echo("send-reminder"))
        .build()
        .expect("valid");
    let rt = Runtime::builder(system)
        .scheduler(Arc::new(scheduler))
        .start()
        .await
        .expect("starts");
    let out = rt
        .execute_task(
            "plan-reminder",
            json!({"user_id": "u-7", "message": "Your cart misses you"}),
        )
        .await
        .expect("scheduled");
    assert_eq!(out["id"], json!(entry));
    assert_eq!(out["task_id"], "send-reminder");
    assert_eq!(
        serde_json::from_value::<ScheduledTaskStatus>(out["status"].clone()).ok(),
        Some(ScheduledTaskStatus::Scheduled)
    );
    let config = stored
        .lock()
        .clone()
        .expect("the scheduler received the config");
    assert_eq!(out["execute_at"], json!(config.execute_at));
}

/// 3. Supervising a payment process: a recovery-started event is observed and the status
///    shows the recovery attempts.
#[tokio::test]
async fn scenario_3_a_supervised_payment_process_is_recovered() {
    let handler: Arc<Mutex<Option<SupervisionEventHandler>>> = Arc::default();
    let attempts = Arc::new(AtomicU64::new(0));
    let mut supervisor = MockSupervisor::new();
    supervisor
        .expect_supervise_process()
        .withf(|c| {
            c.process_id == "payment"
                && c.recovery_strategy == ProcessRecoveryStrategy::RetryLastAction
                && c.max_recovery_attempts == 3
                && c.check_interval == Duration::from_secs(5)
        })
        .times(1)
        .returning(|_| Ok(()));
    let h = handler.clone();
    supervisor
        .expect_on_supervision_event()
        .times(1)
        .returning(move |filter, f| {
            assert_eq!(filter, EventFilter::All);
            *h.lock() = Some(f);
            EventSubscription::noop()
        });
    let (h, a) = (handler.clone(), attempts.clone());
    supervisor
        .expect_recover_process()
        .times(1)
        .returning(move |id| {
            a.fetch_add(1, Ordering::SeqCst);
            if let Some(f) = h.lock().as_ref() {
                f(&SupervisionEvent::new(
                    SupervisionEventType::RecoveryStarted,
                    id,
                    TargetType::Process,
                    json!({"attempt": 1}),
                ));
            }
            Ok(true)
        });
    let a = attempts.clone();
    supervisor.expect_get_process_supervision_status().times(1).returning(move |id| {
        Ok(Some(from_json::<SupervisionStatus>(json!({
            "id": Uuid::new_v4(), "target_id": id, "target_type": "process", "status": "recovering",
            "recovery_attempts": a.load(Ordering::SeqCst), "max_recovery_attempts": 3,
            "last_check_at": Utc::now(), "last_recovery_at": Utc::now(), "error": "card declined"
        }))))
    });

    let payment = ProcessDefinition::builder("payment")
        .initial_state("pending")
        .state("processing")
        .final_state("completed")
        .transition(
            TransitionDefinition::new("pending", "processing", "charge").action("charge-card"),
        )
        .transition(TransitionDefinition::new(
            "processing",
            "completed",
            "confirm",
        ))
        .build()
        .expect("valid");
    let charge = TaskDefinition::new("charge-card", |_i, _c| async move {
        Err(TaskError::new("card declined"))
    })
    .expect("valid");
    // Keeps the event subscription alive for the runtime's lifetime and forwards the events.
    let subscriptions: Arc<Mutex<Vec<EventSubscription>>> = Arc::default();
    let subs = subscriptions.clone();
    let watch = TaskDefinition::new("supervise-payments", move |_i, ctx| {
        let subs = subs.clone();
        async move {
            let supervisor = ctx.supervisor().map_err(e)?;
            let config =
                ProcessSupervisionConfig::new("payment", ProcessRecoveryStrategy::RetryLastAction)
                    .max_recovery_attempts(3)
                    .check_interval(Duration::from_secs(5));
            supervisor.supervise_process(config).await.map_err(e)?;
            let rt = ctx.runtime().clone();
            let sub = supervisor.on_supervision_event(
                EventFilter::All,
                Arc::new(move |ev: &SupervisionEvent| {
                    rt.publish(Event::new(
                        ev.event_type.as_str().to_owned(),
                        "supervisor",
                        json!({"target_id": ev.target_id}),
                    ));
                }),
            );
            subs.lock().push(sub);
            Ok(json!("supervising"))
        }
    })
    .expect("valid");
    let recover = TaskDefinition::new("recover-payment", |input, ctx| async move {
        let id: Uuid = serde_json::from_value(input["instance_id"].clone())?;
        let supervisor = ctx.supervisor().map_err(e)?;
        let ok = supervisor.recover_process(id).await.map_err(e)?;
        let status = supervisor.get_process_supervision_status(id).await.map_err(e)?.ok_or("not supervised")?;
        Ok(json!({"recovered": ok, "attempts": status.recovery_attempts, "status": status.status, "target": status.target_type}))
    })
    .expect("valid");
    let mut ext = ExtensionsConfig::default();
    ext.supervisor = true;
    let system = System::builder("payments")
        .extensions(ext)
        .process(payment)
        .tasks([charge, watch, recover])
        .build()
        .expect("valid");
    let rt = Runtime::builder(system)
        .supervisor(Arc::new(supervisor))
        .start()
        .await
        .expect("starts");
    let mut recovery_events = rt.subscribe("recovery-started");

    rt.execute_task("supervise-payments", empty())
        .await
        .expect("supervising");
    let p = rt
        .create_process("payment", json!({"amount": 10}))
        .await
        .expect("created");
    let out = rt
        .transition_process(p.id, "charge", empty())
        .await
        .expect("state changes");
    assert_eq!(&*out.instance.state, "processing");
    assert_eq!(
        out.instance.last_action.as_ref().map(|a| a.status),
        Some(ActionStatus::Failed)
    );

    let status = rt
        .execute_task("recover-payment", json!({"instance_id": p.id}))
        .await
        .expect("recovered");
    let ev = next_event(&mut recovery_events).await;
    assert_eq!(ev.source, "supervisor");
    assert_eq!(ev.payload["target_id"], json!(p.id));
    assert_eq!(status["recovered"], true);
    assert_eq!(status["attempts"], 1);
    assert_eq!(
        serde_json::from_value::<HealthStatus>(status["status"].clone()).ok(),
        Some(HealthStatus::Recovering)
    );
    assert_eq!(
        serde_json::from_value::<TargetType>(status["target"].clone()).ok(),
        Some(TargetType::Process)
    );
    drop(subscriptions.lock().drain(..));
}

/// A load manager mock that keeps a usage counter and fires threshold-warning once when usage
/// crosses the warning threshold, as the contract says.
fn counting_load_manager(
    used: Arc<AtomicU64>,
    acquires: usize,
    releases: usize,
) -> (MockLoadManager, Arc<Mutex<Option<LoadEventHandler>>>) {
    let handler: Arc<Mutex<Option<LoadEventHandler>>> = Arc::default();
    let mut lm = MockLoadManager::new();
    lm.expect_register_resource()
        .withf(|c| {
            c.id == "payment-api"
                && c.resource_type == ResourceType::Api
                && c.capacity == 100
                && c.thresholds == Thresholds::new(70.0, 85.0, 95.0)
        })
        .times(1)
        .returning(|_| Ok(()));
    let h = handler.clone();
    lm.expect_on_load_event()
        .times(1)
        .returning(move |filter, f| {
            assert_eq!(filter, EventFilter::Type("threshold-warning".into()));
            *h.lock() = Some(f);
            EventSubscription::noop()
        });
    let (u, h) = (used.clone(), handler.clone());
    lm.expect_acquire_resource()
        .withf(|id, units| id == "payment-api" && *units == 1)
        .times(acquires)
        .returning(move |id, units| {
            let now = u.fetch_add(units, Ordering::SeqCst) + units;
            if now == 70 {
                if let Some(f) = h.lock().as_ref() {
                    f(&LoadEvent::new(
                        LoadEventType::ThresholdWarning,
                        id,
                        json!({"used": now}),
                    ));
                }
            }
            Ok(true)
        });
    let u = used.clone();
    lm.expect_release_resource()
        .withf(|id, units| id == "payment-api" && *units == 1)
        .times(releases)
        .returning(move |_, units| {
            u.fetch_sub(units, Ordering::SeqCst);
            Ok(())
        });
    let u = used.clone();
    lm.expect_get_resource_status()
        .with(eq("payment-api"))
        .returning(move |id| {
            let used = u.load(Ordering::SeqCst);
            let status = if used >= 70 { "warning" } else { "closed" };
            Ok(Some(from_json::<ResourceStatus>(json!({
                "id": id, "type": "api", "capacity": 100, "used": used, "available": 100 - used,
                "usage_percentage": used as f64, "status": status,
                "last_status_change_at": Utc::now(), "reset_at": null
            }))))
        });
    (lm, handler)
}

/// Keeps event subscriptions alive as a user service.
#[derive(Default)]
struct Subscriptions(Mutex<Vec<EventSubscription>>);

fn register_payment_api() -> TaskDefinition {
    TaskDefinition::new("register-payment-api", |_i, ctx| async move {
        let lm = ctx.load_manager().map_err(e)?;
        lm.register_resource(
            ResourceConfig::new("payment-api", ResourceType::Api, 100)
                .thresholds(Thresholds::new(70.0, 85.0, 95.0)),
        )
        .await
        .map_err(e)?;
        let rt = ctx.runtime().clone();
        let sub = lm.on_load_event(
            EventFilter::Type("threshold-warning".into()),
            Arc::new(move |ev: &LoadEvent| {
                rt.publish(Event::new(
                    ev.event_type.as_str(),
                    "load-manager",
                    json!({"resource_id": ev.resource_id}),
                ));
            }),
        );
        // The subscription lives as long as the runtime's `Subscriptions` service.
        ctx.service::<Subscriptions>()
            .map_err(e)?
            .0
            .lock()
            .push(sub);
        Ok(json!("registered"))
    })
    .expect("valid")
}

/// 4. A `payment-api` resource (capacity 100, thresholds 70/85/95) reaches warning after 75
///    acquisitions and emits threshold-warning.
#[tokio::test]
async fn scenario_4_the_payment_api_reaches_warning_after_75_calls() {
    let used = Arc::new(AtomicU64::new(0));
    let (lm, _handler) = counting_load_manager(used.clone(), 75, 0);
    let call = TaskDefinition::new("call-payment-api", |_i, ctx| async move {
        let admitted = ctx
            .load_manager()
            .map_err(e)?
            .acquire_resource("payment-api", 1)
            .await
            .map_err(e)?;
        Ok(json!(admitted))
    })
    .expect("valid");
    let status = TaskDefinition::new("payment-api-status", |_i, ctx| async move {
        let s = ctx
            .load_manager()
            .map_err(e)?
            .get_resource_status("payment-api")
            .await
            .map_err(e)?;
        Ok(serde_json::to_value(s)?)
    })
    .expect("valid");
    let mut ext = ExtensionsConfig::default();
    ext.load_manager = true;
    let system = System::builder("payments")
        .extensions(ext)
        .tasks([register_payment_api(), call, status])
        .build()
        .expect("valid");
    let rt = Runtime::builder(system)
        .load_manager(Arc::new(lm))
        .service(Arc::new(Subscriptions::default()))
        .start()
        .await
        .expect("starts");
    let mut warnings = rt.subscribe("threshold-warning");
    rt.execute_task("register-payment-api", empty())
        .await
        .expect("registered");
    for _ in 0..75 {
        assert_eq!(
            rt.execute_task("call-payment-api", empty())
                .await
                .expect("ok"),
            json!(true)
        );
    }
    let ev = next_event(&mut warnings).await;
    assert_eq!(ev.payload["resource_id"], "payment-api");
    assert!(warnings.try_recv().is_none(), "the warning fires once");
    let s = rt
        .execute_task("payment-api-status", empty())
        .await
        .expect("status");
    assert_eq!(
        (s["used"].as_u64(), s["status"].as_str()),
        (Some(75), Some("warning"))
    );
    assert_eq!(used.load(Ordering::SeqCst), 75);
}

/// 5. All four together: an order saga, a follow-up scheduled 24 h ahead, a supervised
///    process, and the resource back at zero use at the end.
#[tokio::test]
async fn scenario_5_all_four_extensions_together() {
    let saga_id = Uuid::new_v4();
    let follow_up = Uuid::new_v4();
    let mut saga = MockSagaCoordinator::new();
    saga.expect_define_saga()
        .withf(|d| d.id == "order-saga" && d.steps.len() == 4)
        .times(1)
        .returning(|_| Ok(()));
    saga.expect_start_saga()
        .withf(|id, input| id == "order-saga" && input["order_id"] == "o-9")
        .times(1)
        .returning(move |_, input| Ok(saga_instance(saga_id, "running", &input)));
    let mut scheduler = MockScheduler::new();
    scheduler
        .expect_schedule_task()
        .withf(|c| {
            let ahead = c.execute_at - Utc::now();
            c.task_id == "order-follow-up"
                && c.input == json!({"order_id": "o-9"})
                && ahead > chrono::Duration::hours(24) - chrono::Duration::seconds(5)
                && ahead <= chrono::Duration::hours(24)
        })
        .times(1)
        .returning(move |_| Ok(follow_up));
    let mut supervisor = MockSupervisor::new();
    supervisor
        .expect_supervise_process()
        .withf(|c| {
            c.process_id == "order" && c.recovery_strategy == ProcessRecoveryStrategy::Restart
        })
        .times(1)
        .returning(|_| Ok(()));
    let used = Arc::new(AtomicU64::new(0));
    let (lm, _handler) = counting_load_manager(used.clone(), 1, 1);

    let order = ProcessDefinition::builder("order")
        .initial_state("created")
        .state("processing")
        .final_state("completed")
        .transition(
            TransitionDefinition::new("created", "processing", "submit").action("fulfil-order"),
        )
        .transition(TransitionDefinition::new(
            "processing",
            "completed",
            "complete",
        ))
        .build()
        .expect("valid");
    let setup = TaskDefinition::new("setup", |_i, ctx| async move {
        ctx.saga_coordinator()
            .map_err(e)?
            .define_saga(order_saga_definition())
            .await
            .map_err(e)?;
        ctx.supervisor()
            .map_err(e)?
            .supervise_process(ProcessSupervisionConfig::new(
                "order",
                ProcessRecoveryStrategy::Restart,
            ))
            .await
            .map_err(e)?;
        ctx.execute_task("register-payment-api", empty())
            .await
            .map_err(e)?;
        Ok(json!("ready"))
    })
    .expect("valid");
    let fulfil = TaskDefinition::new("fulfil-order", |input, ctx| async move {
        let lm = ctx.load_manager().map_err(e)?;
        if !lm.acquire_resource("payment-api", 1).await.map_err(e)? {
            return Err(TaskError::new("payment-api unavailable"));
        }
        let result = async {
            let saga = ctx
                .saga_coordinator()?
                .start_saga("order-saga", input.clone())
                .await?;
            let at = Utc::now() + chrono::Duration::hours(24);
            let follow = ctx
                .scheduler()?
                .schedule_task(ScheduledTaskConfig::new(
                    "order-follow-up",
                    json!({"order_id": input["order_id"]}),
                    at,
                ))
                .await?;
            Ok::<_, architectlm_core::Error>(json!({"saga": saga.id, "follow_up": follow}))
        }
        .await;
        lm.release_resource("payment-api", 1).await.map_err(e)?;
        result.map_err(e)
    })
    .expect("valid");
    let system = System::builder("shop")
        .extensions(ExtensionsConfig::all())
        .process(order)
        .tasks([
            setup,
            fulfil,
            register_payment_api(),
            support::echo("order-follow-up"),
        ])
        .tasks(step_tasks())
        .build()
        .expect("valid");
    let rt = Runtime::builder(system)
        .saga_coordinator(Arc::new(saga))
        .scheduler(Arc::new(scheduler))
        .supervisor(Arc::new(supervisor))
        .load_manager(Arc::new(lm))
        .service(Arc::new(Subscriptions::default()))
        .start()
        .await
        .expect("starts");

    rt.execute_task("setup", empty()).await.expect("ready");
    let o = rt
        .create_process("order", json!({"order_id": "o-9"}))
        .await
        .expect("created");
    let out = rt
        .transition_process(o.id, "submit", empty())
        .await
        .expect("submitted");
    assert_eq!(&*out.instance.state, "processing");
    assert_eq!(
        out.action.expect("ran").result.expect("fulfilled"),
        json!({"saga": saga_id, "follow_up": follow_up})
    );
    let done = rt
        .transition_process(o.id, "complete", empty())
        .await
        .expect("completed");
    assert_eq!(&*done.instance.state, "completed");
    assert_eq!(
        used.load(Ordering::SeqCst),
        0,
        "the resource is back at zero use"
    );
    let statuses = rt.get_processes_by_state("completed").await.expect("ok");
    assert_eq!(statuses.len(), 1);
}
