//! Every runtime error, asserted by its message: unknown task, process and instance, an event
//! the state does not accept, guards that reject, extensions without services, services that are
//! not configured, and work refused during shutdown.

mod support;

use std::time::Duration;

use architectlm_core::{
    Error, ExtensionsConfig, Guard, ProcessDefinition, Runtime, System, TaskDefinition,
    TransitionDefinition,
};
use serde_json::json;
use support::{assert_msg, empty, order_system, start};
use uuid::Uuid;

#[tokio::test]
async fn unknown_task_process_and_instance_are_named() {
    let rt = start(order_system()).await;

    let err = rt
        .execute_task("nope", json!(1))
        .await
        .expect_err("unknown task");
    assert!(
        matches!(err, Error::NotFound { kind: "task", .. }),
        "{err:?}"
    );
    assert_msg(&err, "unknown task \"nope\"");

    let err = rt
        .create_process("nope", empty())
        .await
        .expect_err("unknown process");
    assert_msg(&err, "unknown process \"nope\"");

    let ghost = Uuid::new_v4();
    let err = rt
        .transition_process(ghost, "pay", empty())
        .await
        .expect_err("unknown instance");
    assert_msg(&err, &format!("unknown process instance \"{ghost}\""));
    let err = rt
        .retry_last_action(ghost)
        .await
        .expect_err("unknown instance");
    assert_msg(&err, &format!("unknown process instance \"{ghost}\""));
    let err = rt
        .reset_process(ghost, empty())
        .await
        .expect_err("unknown instance");
    assert_msg(&err, &format!("unknown process instance \"{ghost}\""));
    assert!(rt.get_process(ghost).await.expect("lookup works").is_none());
}

#[tokio::test]
async fn an_event_the_state_does_not_accept_names_state_and_event() {
    let rt = start(order_system()).await;
    let order = rt.create_process("order", empty()).await.expect("created");

    let err = rt
        .transition_process(order.id, "ship", empty())
        .await
        .expect_err("not accepted");
    assert!(matches!(err, Error::InvalidTransition { .. }), "{err:?}");
    assert_msg(
        &err,
        &format!(
            "process instance {} in state \"created\" does not accept event \"ship\"",
            order.id
        ),
    );
    // Nothing changed.
    let stored = rt.get_process(order.id).await.expect("ok").expect("exists");
    assert_eq!(&*stored.state, "created");
    assert_eq!(stored.version, order.version);

    // A final state accepts nothing, not even the wildcard's event.
    rt.transition_process(order.id, "cancel", empty())
        .await
        .expect("cancelled");
    let err = rt
        .transition_process(order.id, "cancel", empty())
        .await
        .expect_err("final");
    assert_msg(
        &err,
        "in state \"cancelled\" does not accept event \"cancel\"",
    );
}

#[tokio::test]
async fn a_rejecting_guard_is_an_error_and_changes_nothing() {
    let p = ProcessDefinition::builder("loan")
        .state("applied")
        .state("approved")
        .transition(
            TransitionDefinition::new("applied", "approved", "approve").guard(Guard::sync(|g| {
                g.context["score"].as_i64().unwrap_or(0) >= 700
            })),
        )
        .build()
        .expect("valid");
    let rt = start(System::builder("bank").process(p).build().expect("valid")).await;
    let loan = rt
        .create_process("loan", json!({"score": 600}))
        .await
        .expect("created");

    let err = rt
        .transition_process(loan.id, "approve", json!({"note": "please"}))
        .await
        .expect_err("guard rejects");
    assert!(matches!(err, Error::GuardRejected { .. }), "{err:?}");
    assert_msg(
        &err,
        &format!(
            "process instance {} in state \"applied\": every guard rejected event \"approve\"",
            loan.id
        ),
    );
    let stored = rt.get_process(loan.id).await.expect("ok").expect("exists");
    assert_eq!(&*stored.state, "applied");
    assert!(
        stored.context.get("note").is_none(),
        "a rejected event merges no data"
    );

    // The guard sees the event's data merged into the context.
    let out = rt
        .transition_process(loan.id, "approve", json!({"score": 720}))
        .await
        .expect("guard passes");
    assert_eq!(&*out.instance.state, "approved");
}

#[tokio::test]
async fn an_enabled_extension_without_a_service_fails_start_up() {
    let only = |pick: fn(&mut ExtensionsConfig)| {
        let mut e = ExtensionsConfig::default();
        pick(&mut e);
        e
    };
    for (ext, name) in [
        (only(|e| e.saga_coordinator = true), "saga-coordinator"),
        (only(|e| e.scheduler = true), "scheduler"),
        (only(|e| e.supervisor = true), "supervisor"),
        (only(|e| e.load_manager = true), "load-manager"),
    ] {
        let system = System::builder("s").extensions(ext).build().expect("valid");
        let err = Runtime::builder(system)
            .start()
            .await
            .expect_err("no service");
        assert!(
            matches!(err, Error::ExtensionNotConfigured(n) if n == name),
            "{err:?}"
        );
        assert_msg(
            &err,
            &format!("extension \"{name}\" is enabled but no service is configured for it"),
        );
    }
}

#[tokio::test]
async fn a_missing_service_is_named_when_a_task_asks_for_it() {
    let probe = TaskDefinition::new("probe", |_input, ctx| async move {
        let msg = |e: Option<architectlm_core::Error>| e.map(|e| e.to_string());
        let errors = vec![
            msg(ctx.saga_coordinator().err()),
            msg(ctx.scheduler().err()),
            msg(ctx.supervisor().err()),
            msg(ctx.load_manager().err()),
            msg(ctx.service::<String>().err()),
            msg(ctx.services().get_named::<String>("mailer").err()),
        ];
        Ok(json!(errors))
    })
    .expect("valid");
    let rt = start(System::builder("s").task(probe).build().expect("valid")).await;
    let out = rt.execute_task("probe", empty()).await.expect("runs");
    assert_eq!(
        out,
        json!([
            "service \"saga-coordinator\" is not configured",
            "service \"scheduler\" is not configured",
            "service \"supervisor\" is not configured",
            "service \"load-manager\" is not configured",
            "service \"alloc::string::String\" is not configured",
            "service \"mailer\" is not configured",
        ])
    );
}

#[tokio::test]
async fn a_runtime_that_shuts_down_refuses_new_tasks() {
    let rt = start(order_system()).await;
    assert_eq!(rt.shutdown(Duration::from_secs(1)).await, 0);
    assert!(rt.is_shutting_down());
    let err = rt
        .execute_task("echo", json!(1))
        .await
        .expect_err("refused");
    assert!(matches!(err, Error::ShuttingDown), "{err:?}");
    assert_msg(&err, "the runtime is shutting down");
    // A transition's action is refused too, and the refusal is reported as its outcome.
    let order = rt.create_process("order", empty()).await.expect("created");
    let out = rt
        .transition_process(order.id, "pay", empty())
        .await
        .expect("state changes");
    let action = out.action.expect("the transition has an action");
    assert_msg(
        &action.result.expect_err("refused"),
        "the runtime is shutting down",
    );
}
