//! The event bus: subscriptions by type and to everything, unsubscribe on drop, async streams,
//! and a slow subscriber that neither blocks the runtime nor loses events silently.

mod support;

use std::time::Duration;

use architectlm_core::event::types;
use architectlm_core::{Event, EventFilter, Runtime};
use futures::StreamExt;
use serde_json::json;
use support::{DEADLINE, drain, empty, next_event, order_system, start};

#[tokio::test]
async fn runtime_events_carry_id_type_timestamp_source_and_payload() {
    let rt = start(order_system()).await;
    let mut all = rt.subscribe("*");
    let before = chrono::Utc::now();
    let order = rt
        .create_process("order", json!({"amount": 5}))
        .await
        .expect("created");
    rt.transition_process(order.id, "pay", empty())
        .await
        .expect("paid");

    let events: Vec<_> = std::iter::from_fn(|| all.try_recv()).collect();
    let kinds: Vec<&str> = events.iter().map(|e| &*e.event_type).collect();
    assert_eq!(
        kinds,
        vec![
            types::PROCESS_CREATED,
            types::STATE_CHANGED,
            types::TASK_STARTED,
            types::TASK_COMPLETED
        ]
    );
    for e in &events {
        assert_eq!(e.source, "runtime");
        assert!(e.timestamp >= before);
        assert_eq!(e.payload["instance_id"], json!(order.id), "{e:?}");
    }
    let mut ids: Vec<_> = events.iter().map(|e| e.id).collect();
    ids.dedup();
    assert_eq!(ids.len(), events.len(), "every event has its own id");
    assert_eq!(events[0].payload["process_id"], "order");
    assert_eq!(events[0].payload["state"], "created");
    assert_eq!(events[2].payload["task_id"], "charge");
    assert_eq!(events[3].payload["attempts"], 1);

    // Events serialise with the original's field names.
    let v = serde_json::to_value(&*events[1]).expect("serialisable");
    for field in ["id", "type", "timestamp", "source", "payload"] {
        assert!(v.get(field).is_some(), "{field} in {v}");
    }
}

#[tokio::test]
async fn a_failed_task_emits_task_failed_with_its_error() {
    let fail = architectlm_core::TaskDefinition::new("fail", |_i, _c| async move {
        Err(architectlm_core::TaskError::new("no stock"))
    })
    .expect("valid");
    let rt = start(
        architectlm_core::System::builder("s")
            .task(fail)
            .build()
            .expect("valid"),
    )
    .await;
    let mut failed = rt.subscribe(types::TASK_FAILED);
    rt.execute_task("fail", json!({"sku": 1}))
        .await
        .expect_err("fails");
    let e = next_event(&mut failed).await;
    assert_eq!(e.payload["task_id"], "fail");
    assert_eq!(e.payload["error"]["message"], "no stock");
    assert_eq!(e.payload["input"], json!({"sku": 1}));
}

#[tokio::test]
async fn subscriptions_filter_by_type_list_and_wildcard() {
    let rt = start(order_system()).await;
    let mut one = rt.subscribe("custom-a");
    let mut two = rt.subscribe(EventFilter::Types(vec![
        "custom-a".into(),
        "custom-b".into(),
    ]));
    let mut all = rt.subscribe(String::from("*"));
    rt.emit_event("custom-a", json!(1));
    rt.emit_event("custom-b", json!(2));
    rt.emit("custom-c", "billing", json!(3));

    let payloads = |v: Vec<(String, serde_json::Value)>| {
        v.into_iter()
            .map(|(t, p)| format!("{t}={p}"))
            .collect::<Vec<_>>()
    };
    assert_eq!(payloads(drain(&mut one)), vec!["custom-a=1"]);
    assert_eq!(payloads(drain(&mut two)), vec!["custom-a=1", "custom-b=2"]);
    assert_eq!(
        payloads(drain(&mut all)),
        vec!["custom-a=1", "custom-b=2", "custom-c=3"]
    );
    rt.publish(Event::new(
        "ready-made",
        "saga-coordinator",
        json!({"saga": 1}),
    ));
    let e = next_event(&mut all).await;
    assert_eq!(
        (&*e.event_type, &*e.source),
        ("ready-made", "saga-coordinator")
    );
}

#[tokio::test]
async fn dropping_a_subscription_unsubscribes() {
    let rt = start(order_system()).await;
    assert!(!rt.events().has_subscribers());
    let sub = rt.subscribe("*");
    assert!(rt.events().has_subscribers());
    drop(sub);
    assert!(!rt.events().has_subscribers());

    // A callback subscription stops calling its handler once dropped.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let handle = rt.subscribe_to_event(types::PROCESS_CREATED, move |e| {
        let _ = tx.send(e.payload["instance_id"].clone());
    });
    let first = rt.create_process("order", empty()).await.expect("created");
    let got = tokio::time::timeout(DEADLINE, rx.recv())
        .await
        .expect("delivered");
    assert_eq!(got, Some(json!(first.id)));
    drop(handle);
    rt.create_process("order", empty()).await.expect("created");
    // The handler (and the sender it owns) is dropped: the channel closes with nothing more.
    let after = tokio::time::timeout(DEADLINE, rx.recv())
        .await
        .expect("the channel closes");
    assert_eq!(after, None, "no callback after unsubscribing");
}

#[tokio::test]
async fn a_subscription_is_an_async_stream() {
    let rt = start(order_system()).await;
    let stream = rt.subscribe(types::STATE_CHANGED).into_stream();
    let order = rt.create_process("order", empty()).await.expect("created");
    rt.transition_process(order.id, "pay", empty())
        .await
        .expect("paid");
    rt.transition_process(order.id, "ship", empty())
        .await
        .expect("shipped");
    let changes: Vec<_> = tokio::time::timeout(DEADLINE, stream.take(2).collect::<Vec<_>>())
        .await
        .expect("two changes");
    let path: Vec<String> = changes
        .iter()
        .map(|e| {
            format!(
                "{}->{}",
                e.payload["from"].as_str().unwrap_or("?"),
                e.payload["to"].as_str().unwrap_or("?")
            )
        })
        .collect();
    assert_eq!(path, vec!["created->paid", "paid->shipped"]);
}

#[tokio::test]
async fn a_slow_subscriber_never_blocks_and_its_loss_is_counted() {
    let rt = Runtime::builder(order_system())
        .event_capacity(8)
        .start()
        .await
        .expect("starts");
    let mut slow = rt.subscribe("*");
    let mut fast = rt.subscribe(types::TASK_COMPLETED);
    let mut fast_seen = 0;
    // 100 executions publish 200 events while `slow` reads nothing.
    for i in 0..100 {
        tokio::time::timeout(Duration::from_secs(5), rt.execute_task("echo", json!(i)))
            .await
            .expect("publishing never waits for a subscriber")
            .expect("ok");
        // The fast subscriber keeps up and loses nothing.
        while fast.try_recv().is_some() {
            fast_seen += 1;
        }
    }
    assert_eq!(fast_seen, 100);
    assert_eq!(fast.missed(), 0);
    let received = drain(&mut slow).len() as u64;
    assert_eq!(received, 8, "the ring keeps the newest events");
    assert_eq!(slow.missed(), 192, "the skipped events are counted");
    assert_eq!(
        received + slow.missed(),
        200,
        "nothing vanished without a trace"
    );
    assert!(
        rt.events().dropped() >= 192,
        "the hub's total shows the loss too"
    );
}

#[tokio::test]
async fn a_panicking_handler_keeps_its_subscription() {
    let rt = start(order_system()).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let _handle = rt.subscribe_to_event("tick", move |e| {
        if e.payload == json!(1) {
            panic!("handler bug");
        }
        let _ = tx.send(e.payload.clone());
    });
    rt.emit_event("tick", json!(1));
    rt.emit_event("tick", json!(2));
    let got = tokio::time::timeout(DEADLINE, rx.recv())
        .await
        .expect("delivered");
    assert_eq!(
        got,
        Some(json!(2)),
        "the event after the panic still arrives"
    );
}
