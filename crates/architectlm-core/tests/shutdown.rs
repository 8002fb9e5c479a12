//! Graceful shutdown: running tasks finish, new work is refused, and the deadline is honoured.

mod support;

use std::sync::Arc;
use std::time::Duration;

use architectlm_core::{Error, Runtime, System, TaskDefinition};
use serde_json::json;
use support::{DEADLINE, assert_msg, start};
use tokio::sync::{Notify, oneshot};

#[tokio::test]
async fn shutdown_waits_for_a_running_task_then_refuses_new_ones() {
    let release = Arc::new(Notify::new());
    let (started_tx, started_rx) = oneshot::channel::<()>();
    let started_tx = Arc::new(parking_lot::Mutex::new(Some(started_tx)));
    let r = release.clone();
    let long = TaskDefinition::new("long", move |_i, ctx| {
        let release = r.clone();
        let started = started_tx.lock().take();
        async move {
            if let Some(tx) = started {
                let _ = tx.send(());
            }
            release.notified().await;
            Ok(json!({"finished": true, "cancelled": ctx.is_cancelled()}))
        }
    })
    .expect("valid");
    let rt = start(
        System::builder("s")
            .task(long)
            .task(support::echo("echo"))
            .build()
            .expect("valid"),
    )
    .await;

    let running = tokio::spawn({
        let rt = rt.clone();
        async move { rt.execute_task("long", json!(null)).await }
    });
    tokio::time::timeout(DEADLINE, started_rx)
        .await
        .expect("started")
        .expect("sent");

    let shutdown = rt.shutdown(Duration::from_secs(3600));
    tokio::pin!(shutdown);
    assert!(
        futures::poll!(&mut shutdown).is_pending(),
        "shutdown waits for the running task"
    );
    assert!(rt.is_shutting_down());
    let err = rt
        .execute_task("echo", json!(1))
        .await
        .expect_err("refused");
    assert!(matches!(err, Error::ShuttingDown));
    assert!(futures::poll!(&mut shutdown).is_pending());

    release.notify_one();
    let still_running = tokio::time::timeout(DEADLINE, shutdown)
        .await
        .expect("shutdown ends");
    assert_eq!(still_running, 0, "a clean shutdown");
    let out = running
        .await
        .expect("no panic")
        .expect("the running task completed");
    assert_eq!(
        out,
        json!({"finished": true, "cancelled": false}),
        "it was not cut short"
    );
    assert!(rt.cancellation().is_cancelled());
    assert_msg(
        &rt.execute_task("echo", json!(1))
            .await
            .expect_err("refused"),
        "shutting down",
    );
}

#[tokio::test(start_paused = true)]
async fn a_task_past_the_deadline_is_cancelled_and_counted() {
    let stubborn = TaskDefinition::new("stubborn", |_i, ctx| async move {
        // Stops only when told to.
        ctx.cancellation().cancelled().await;
        Ok(json!("stopped"))
    })
    .expect("valid");
    let never = TaskDefinition::new("never", |_i, _ctx| async move {
        std::future::pending::<()>().await;
        Ok(json!(null))
    })
    .expect("valid");
    let rt = Runtime::builder(
        System::builder("s")
            .task(stubborn)
            .task(never)
            .build()
            .expect("valid"),
    )
    .start()
    .await
    .expect("starts");
    let a = tokio::spawn({
        let rt = rt.clone();
        async move { rt.execute_task("stubborn", json!(null)).await }
    });
    let _b = tokio::spawn({
        let rt = rt.clone();
        async move { rt.execute_task("never", json!(null)).await }
    });
    // Let both start: with a paused clock, yielding until both are in flight is deterministic.
    while rt.running_tasks() < 2 {
        tokio::task::yield_now().await;
    }
    let t0 = tokio::time::Instant::now();
    let left = rt.shutdown(Duration::from_secs(30)).await;
    assert_eq!(
        t0.elapsed(),
        Duration::from_secs(30),
        "the whole grace period was given"
    );
    assert_eq!(left, 2, "both were still running at the deadline");
    // The stubborn task stops once cancelled; the other one ignores cancellation.
    let out = a.await.expect("no panic").expect("stopped when told");
    assert_eq!(out, json!("stopped"));
    assert_eq!(rt.running_tasks(), 1);
}

/// Executions counted on one thread and ended on another still add up: once they are all
/// done none is counted as running, and a shutdown started while they run waits for every
/// one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executions_that_move_between_threads_are_all_waited_for() {
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let r = release.clone();
    let hop = TaskDefinition::new("hop", move |_i, _ctx| {
        let release = r.clone();
        async move {
            // Waiting moves the execution to whichever worker wakes it.
            let _permit = release.acquire().await;
            for _ in 0..3 {
                tokio::task::yield_now().await;
            }
            Ok(json!(true))
        }
    })
    .expect("valid");
    let rt = start(System::builder("s").task(hop).build().expect("valid")).await;
    let runs: Vec<_> = (0..200)
        .map(|_| {
            let rt = rt.clone();
            tokio::spawn(async move { rt.execute_task("hop", json!(null)).await })
        })
        .collect();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while rt.running_tasks() < 200 {
        assert!(tokio::time::Instant::now() < deadline, "all started");
        tokio::task::yield_now().await;
    }
    let shutdown = tokio::spawn({
        let rt = rt.clone();
        async move { rt.shutdown(Duration::from_secs(3600)).await }
    });
    release.add_permits(200);
    let left = tokio::time::timeout(DEADLINE, shutdown)
        .await
        .expect("shutdown ends once the last execution has")
        .expect("joined");
    assert_eq!(left, 0);
    for r in runs {
        assert_eq!(r.await.expect("joined").expect("ran"), json!(true));
    }
    assert_eq!(rt.running_tasks(), 0);
}
