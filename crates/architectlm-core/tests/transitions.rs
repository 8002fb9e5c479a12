//! Process transitions: guards are really evaluated, actions are awaited and their outcome is
//! recorded, concurrent transitions of one instance are serialised, and instances can be listed.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use architectlm_core::event::types;
use architectlm_core::{
    ActionStatus, Guard, ProcessDefinition, System, TaskDefinition, TaskError, TransitionDefinition,
};
use serde_json::json;
use support::{Log, assert_msg, empty, next_event, order_system, start};

#[tokio::test]
async fn an_async_guard_is_awaited_and_sees_instance_event_and_data() {
    let seen = Log::default();
    let log = seen.clone();
    let p = ProcessDefinition::builder("review")
        .state("draft")
        .state("published")
        .state("rejected")
        .transition(
            TransitionDefinition::new("draft", "published", "submit").guard(Guard::new(move |g| {
                let log = log.clone();
                async move {
                    // A real await point: the guard is a future, not a flag.
                    tokio::task::yield_now().await;
                    log.push(format!("{}:{}:{}", g.state, g.event, g.data["words"]));
                    g.context["words"].as_u64().unwrap_or(0) >= 100
                }
            })),
        )
        .transition(TransitionDefinition::new("draft", "rejected", "submit"))
        .build()
        .expect("valid");
    let rt = start(System::builder("cms").process(p).build().expect("valid")).await;

    let short = rt.create_process("review", empty()).await.expect("created");
    let out = rt
        .transition_process(short.id, "submit", json!({"words": 10}))
        .await
        .expect("ok");
    assert_eq!(
        &*out.instance.state, "rejected",
        "the guard failed: the fallback is taken"
    );

    let long = rt.create_process("review", empty()).await.expect("created");
    let out = rt
        .transition_process(long.id, "submit", json!({"words": 500}))
        .await
        .expect("ok");
    assert_eq!(&*out.instance.state, "published");
    assert_eq!(seen.entries(), vec!["draft:submit:10", "draft:submit:500"]);
}

#[tokio::test]
async fn a_panicking_guard_rejects_and_the_caller_survives() {
    let p = ProcessDefinition::builder("p")
        .state("a")
        .state("b")
        .transition(
            TransitionDefinition::new("a", "b", "go").guard(Guard::sync(|_| panic!("guard bug"))),
        )
        .build()
        .expect("valid");
    let rt = start(System::builder("s").process(p).build().expect("valid")).await;
    let mut errors = rt.subscribe(types::SYSTEM_ERROR);
    let i = rt.create_process("p", empty()).await.expect("created");
    let err = rt
        .transition_process(i.id, "go", empty())
        .await
        .expect_err("rejected");
    assert_msg(&err, "every guard rejected event \"go\"");
    let e = next_event(&mut errors).await;
    assert_eq!(e.payload["kind"], "guard-panicked");
    assert_msg(
        &e.payload["error"].as_str().unwrap_or_default(),
        "guard bug",
    );
}

#[tokio::test]
async fn the_action_is_awaited_and_its_outcome_recorded() {
    let rt = start(order_system()).await;
    let mut changes = rt.subscribe(types::STATE_CHANGED);
    let order = rt
        .create_process("order", json!({"amount": 42}))
        .await
        .expect("created");

    let out = rt
        .transition_process(order.id, "pay", json!({"card": "visa"}))
        .await
        .expect("ok");
    assert_eq!(&*out.from, "created");
    assert_eq!(&*out.instance.state, "paid");
    let action = out.action.clone().expect("pay has an action");
    assert_eq!(action.task_id, "charge");
    // `charge` echoes its input: the context with the event's data merged in.
    assert_eq!(
        action.result.clone().expect("completed"),
        json!({"amount": 42, "card": "visa"})
    );
    let rec = out.instance.last_action.as_ref().expect("recorded");
    assert_eq!(rec.status, ActionStatus::Completed);
    assert_eq!(rec.event, "pay");
    assert_eq!(rec.output, Some(json!({"amount": 42, "card": "visa"})));

    let stored = rt.get_process(order.id).await.expect("ok").expect("exists");
    assert_eq!(
        stored, out.instance,
        "the returned instance is what was stored"
    );
    assert_eq!(stored.version, 3, "created, state change, action outcome");

    let e = next_event(&mut changes).await;
    assert_eq!(e.source, "runtime");
    assert_eq!(e.payload["instance_id"], json!(order.id));
    assert_eq!(
        (e.payload["from"].as_str(), e.payload["to"].as_str()),
        (Some("created"), Some("paid"))
    );
    assert_eq!(e.payload["event"], "pay");
    assert!(out.into_result().is_ok());
}

#[tokio::test]
async fn a_failed_action_is_reported_recorded_and_can_be_retried() {
    let fail = Arc::new(AtomicBool::new(true));
    let flag = fail.clone();
    let charge = TaskDefinition::new("charge", move |input, ctx| {
        let fail = flag.load(Ordering::SeqCst);
        async move {
            // The action knows which instance it acts for, and sees its context.
            let Some(process) = ctx.process() else {
                return Err(TaskError::permanent("not run as an action"));
            };
            if ctx.instance_id() != Some(process.instance_id) || &*process.process_id != "order" {
                return Err(TaskError::permanent("wrong instance"));
            }
            if fail {
                Err(TaskError::new("card declined"))
            } else {
                Ok(json!({"charged": input["amount"], "instance": process.instance_id, "context": process.context}))
            }
        }
    })
    .expect("valid");
    let system = System::builder("shop")
        .process(support::order_process())
        .task(charge)
        .build()
        .expect("valid");
    let rt = start(system).await;
    let mut errors = rt.subscribe(types::SYSTEM_ERROR);
    let order = rt
        .create_process("order", json!({"amount": 7}))
        .await
        .expect("created");

    let out = rt
        .transition_process(order.id, "pay", empty())
        .await
        .expect("state changes");
    assert_eq!(
        &*out.instance.state, "paid",
        "a failed action does not undo the state change"
    );
    assert_msg(
        &out.action
            .as_ref()
            .and_then(|a| a.result.clone().err())
            .expect("failed"),
        "card declined",
    );
    let rec = out.instance.last_action.clone().expect("recorded");
    assert_eq!(rec.status, ActionStatus::Failed);
    assert_eq!(rec.error.as_deref(), Some("card declined"));
    let stored = rt.get_process(order.id).await.expect("ok").expect("exists");
    assert_eq!(
        stored.last_action.as_ref().map(|a| a.status),
        Some(ActionStatus::Failed)
    );
    let e = next_event(&mut errors).await;
    assert_eq!(e.payload["kind"], "action-failed");
    assert_eq!(e.payload["task_id"], "charge");
    let err = out
        .into_result()
        .expect_err("the caller may treat it as an error");
    assert_msg(&err, "task \"charge\" failed: card declined");

    fail.store(false, Ordering::SeqCst);
    let again = rt.retry_last_action(order.id).await.expect("retried");
    assert_eq!(
        again.action.expect("ran").result.expect("completed"),
        json!({"charged": 7, "instance": order.id, "context": {"amount": 7}})
    );
    let stored = rt.get_process(order.id).await.expect("ok").expect("exists");
    assert_eq!(
        stored.last_action.as_ref().map(|a| a.status),
        Some(ActionStatus::Completed)
    );
    assert_eq!(&*stored.state, "paid");

    let reset = rt
        .reset_process(order.id, json!({"amount": 1}))
        .await
        .expect("reset");
    assert_eq!(&*reset.state, "created");
    assert!(reset.last_action.is_none());
    assert_msg(
        &rt.retry_last_action(order.id)
            .await
            .expect_err("nothing to retry"),
        "has no action to retry",
    );
}

#[tokio::test]
async fn an_action_cannot_deadlock_on_its_own_instance() {
    let nested = TaskDefinition::new("charge", |_input, ctx| async move {
        let id = ctx.instance_id().expect("an action");
        match ctx.runtime().transition_process(id, "ship", empty()).await {
            Ok(_) => Ok(json!("transitioned")),
            Err(e) => Err(TaskError::permanent(e.to_string())),
        }
    })
    .expect("valid");
    let system = System::builder("shop")
        .process(support::order_process())
        .task(nested)
        .build()
        .expect("valid");
    let rt = start(system).await;
    let order = rt.create_process("order", empty()).await.expect("created");
    let out = tokio::time::timeout(
        support::DEADLINE,
        rt.transition_process(order.id, "pay", empty()),
    )
    .await
    .expect("no deadlock")
    .expect("state changes");
    let err = out.action.expect("ran").result.expect_err("refused");
    assert_msg(&err, "its own action cannot transition");
    // The instance is still usable afterwards.
    let out = rt
        .transition_process(order.id, "ship", empty())
        .await
        .expect("ok");
    assert_eq!(&*out.instance.state, "shipped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_transitions_of_one_instance_lose_no_update() {
    let p = ProcessDefinition::builder("counter")
        .state("open")
        .transition(TransitionDefinition::new("open", "open", "add"))
        .transition(TransitionDefinition::new("open", "open", "bump").action("bump"))
        .build()
        .expect("valid");
    let running = Arc::new(AtomicBool::new(false));
    let overlaps = Arc::new(AtomicUsize::new(0));
    let (r, o) = (running.clone(), overlaps.clone());
    let bump = TaskDefinition::new("bump", move |_input, ctx| {
        let (running, overlaps) = (r.clone(), o.clone());
        async move {
            if running.swap(true, Ordering::SeqCst) {
                overlaps.fetch_add(1, Ordering::SeqCst);
            }
            tokio::task::yield_now().await;
            let n = ctx
                .process()
                .map(|p| p.context["n"].as_u64().unwrap_or(0))
                .unwrap_or(0);
            running.store(false, Ordering::SeqCst);
            Ok(json!(n))
        }
    })
    .expect("valid");
    let rt = start(
        System::builder("s")
            .process(p)
            .task(bump)
            .build()
            .expect("valid"),
    )
    .await;
    let counter = rt
        .create_process("counter", empty())
        .await
        .expect("created");

    // 100 concurrent merges of distinct keys: a lost update would lose a key.
    let mut handles = vec![];
    for i in 0..100 {
        let rt = rt.clone();
        handles.push(tokio::spawn(async move {
            rt.transition_process(counter.id, "add", json!({format!("k{i}"): i}))
                .await
                .map(|o| o.instance.version)
        }));
    }
    let mut versions = vec![];
    for h in handles {
        versions.push(h.await.expect("no panic").expect("transition ok"));
    }
    versions.sort_unstable();
    assert_eq!(
        versions,
        (2..=101).collect::<Vec<u64>>(),
        "every write got its own version"
    );
    let stored = rt
        .get_process(counter.id)
        .await
        .expect("ok")
        .expect("exists");
    let keys = stored.context.as_object().expect("an object").len();
    assert_eq!(keys, 100, "no merge was lost");
    assert_eq!(stored.version, 101);

    // 50 concurrent transitions with an action: the actions never overlap.
    let mut handles = vec![];
    for _ in 0..50 {
        let rt = rt.clone();
        handles.push(tokio::spawn(async move {
            rt.transition_process(counter.id, "bump", empty()).await
        }));
    }
    for h in handles {
        let out = h.await.expect("no panic").expect("ok");
        assert!(out.action.expect("ran").result.is_ok());
    }
    assert_eq!(
        overlaps.load(Ordering::SeqCst),
        0,
        "actions of one instance are serialised"
    );
    let stored = rt
        .get_process(counter.id)
        .await
        .expect("ok")
        .expect("exists");
    assert_eq!(stored.version, 101 + 2 * 50);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_transition_leaves_the_instance_usable() {
    let slow = TaskDefinition::new("charge", |_i, _c| async move {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok(json!(null))
    })
    .expect("valid");
    let system = System::builder("shop")
        .process(support::order_process())
        .task(slow)
        .build()
        .expect("valid");
    let rt = start(system).await;
    let order = rt.create_process("order", empty()).await.expect("created");
    // The caller gives up while the action runs: the lock must be released.
    let gave_up = tokio::time::timeout(
        Duration::from_millis(50),
        rt.transition_process(order.id, "pay", empty()),
    )
    .await;
    assert!(gave_up.is_err());
    let out = rt
        .transition_process(order.id, "ship", empty())
        .await
        .expect("not locked");
    assert_eq!(&*out.instance.state, "shipped");
}

#[tokio::test]
async fn instances_are_listed_by_type_and_state() {
    let mut system = order_system();
    let other = ProcessDefinition::builder("ticket")
        .state("open")
        .state("closed")
        .transition(TransitionDefinition::new("open", "closed", "close"))
        .build()
        .expect("valid");
    system.processes.insert("ticket".into(), Arc::new(other));
    let rt = start(system).await;
    let a = rt.create_process("order", empty()).await.expect("created");
    let b = rt.create_process("order", empty()).await.expect("created");
    let t = rt.create_process("ticket", empty()).await.expect("created");
    rt.transition_process(b.id, "cancel", empty())
        .await
        .expect("ok");

    let ids =
        |v: Vec<architectlm_core::ProcessInstance>| v.into_iter().map(|i| i.id).collect::<Vec<_>>();
    assert_eq!(
        ids(rt.get_processes_by_type("order").await.expect("ok")),
        vec![a.id, b.id]
    );
    assert_eq!(
        ids(rt.get_processes_by_type("ticket").await.expect("ok")),
        vec![t.id]
    );
    assert_eq!(
        ids(rt.get_processes_by_state("cancelled").await.expect("ok")),
        vec![b.id]
    );
    assert_eq!(
        ids(rt.get_processes_by_state("created").await.expect("ok")),
        vec![a.id]
    );
    assert_eq!(rt.get_all_processes().await.expect("ok").len(), 3);
}

#[tokio::test]
async fn per_state_transitions_come_before_top_level_ones() {
    let p = ProcessDefinition::builder("p")
        .state("a")
        .on(
            "go",
            "b",
            None,
            Some(Guard::sync(|g| g.data["fast"] == true)),
        )
        .state("b")
        .state("c")
        .transition(TransitionDefinition::new("a", "c", "go"))
        .build()
        .expect("valid");
    let rt = start(System::builder("s").process(p).build().expect("valid")).await;
    let x = rt.create_process("p", empty()).await.expect("created");
    let out = rt
        .transition_process(x.id, "go", json!({"fast": true}))
        .await
        .expect("ok");
    assert_eq!(&*out.instance.state, "b");
    let y = rt.create_process("p", empty()).await.expect("created");
    let out = rt
        .transition_process(y.id, "go", json!({"fast": false}))
        .await
        .expect("ok");
    assert_eq!(&*out.instance.state, "c");
}
