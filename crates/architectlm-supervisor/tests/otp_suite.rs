//! Cases of Erlang/OTP's `lib/stdlib/test/supervisor_SUITE.erl`, ported to the worker tree and
//! named after the Erlang cases they follow.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use architectlm_supervisor::worker::{ChildSpec, Restart, StopOutcome, SupervisorSpec};

/// A worker whose graceful path (after its token fires) counts in `graceful`; it signals
/// `up` once running.
fn graceful_counting(
    name: &str,
    graceful: Arc<AtomicU32>,
    up: Arc<tokio::sync::Notify>,
) -> ChildSpec {
    ChildSpec::worker(name, move |ctx| {
        let (graceful, up) = (graceful.clone(), up.clone());
        async move {
            up.notify_one();
            ctx.cancelled().await;
            graceful.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    })
}

/// `sup_stop_brutal_kill` / `child_shutdown_brutal_kill`: a shutdown timeout of zero kills the
/// child at once; it never runs its shutdown path, on a multi-thread runtime too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_shutdown_brutal_kill() {
    let graceful = Arc::new(AtomicU32::new(0));
    let handle = SupervisorSpec::builder("sup").build().unwrap().start();
    for round in 0..50 {
        let up = Arc::new(tokio::sync::Notify::new());
        let name = format!("w{round}");
        handle
            .start_child(
                graceful_counting(&name, graceful.clone(), up.clone())
                    .restart(Restart::Temporary)
                    .shutdown_timeout(Duration::ZERO),
            )
            .await
            .unwrap();
        up.notified().await;
        assert_eq!(
            handle.terminate_child(&name).await.unwrap(),
            StopOutcome::Killed
        );
    }
    assert_eq!(
        graceful.load(Ordering::SeqCst),
        0,
        "a brutal kill ran a shutdown path"
    );
    handle.shutdown().await;
}

/// `child_shutdown_timeout` contrast: with a timeout the child does get its shutdown path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_shutdown_with_a_timeout_is_graceful() {
    let graceful = Arc::new(AtomicU32::new(0));
    let up = Arc::new(tokio::sync::Notify::new());
    let handle = SupervisorSpec::builder("sup")
        .child(
            graceful_counting("w", graceful.clone(), up.clone())
                .shutdown_timeout(Duration::from_secs(5)),
        )
        .build()
        .unwrap()
        .start();
    up.notified().await;
    assert_eq!(
        handle.terminate_child("w").await.unwrap(),
        StopOutcome::Graceful
    );
    assert_eq!(graceful.load(Ordering::SeqCst), 1);
    handle.shutdown().await;
}

/// `count_children` at scale, the name index: every one of many dynamically started children
/// is found by name and stopped, the last as the first.
#[tokio::test(start_paused = true)]
async fn terminate_child_finds_each_of_many_children_by_name() {
    let handle = SupervisorSpec::builder("sup").build().unwrap().start();
    let n = 5_000;
    for i in 0..n {
        handle
            .start_child(ChildSpec::worker(format!("w{i}"), |ctx| async move {
                ctx.cancelled().await;
                Ok(())
            }))
            .await
            .unwrap();
    }
    for i in (0..n).rev() {
        assert_eq!(
            handle.terminate_child(&format!("w{i}")).await.unwrap(),
            StopOutcome::Graceful
        );
    }
    assert!(handle.terminate_child("nobody").await.is_err());
    handle.shutdown().await;
}

/// `temporary_normal` / `temporary_abnormal`, and `do_not_save_start_parameters_for_temporary_children`
/// at scale: a temporary child that ended is removed (not listed, its name free again), so a
/// supervisor of short-lived temporary workers does not grow.
#[tokio::test(start_paused = true)]
async fn temporary_children_leave_when_they_end() {
    let handle = SupervisorSpec::builder("sup").build().unwrap().start();
    let mut exited = handle.subscribe("child-exited");
    for i in 0..2_000 {
        let fail = i % 2 == 1;
        handle
            .start_child(
                ChildSpec::worker(format!("job{i}"), move |_ctx| async move {
                    if fail { Err("boom".into()) } else { Ok(()) }
                })
                .restart(Restart::Temporary),
            )
            .await
            .unwrap();
        // One at a time, so that no exit event is lost to a full subscription.
        support::next(&mut exited).await;
    }
    assert!(
        handle.children().await.unwrap().is_empty(),
        "ended temporary children are gone"
    );
    // The name is free again.
    handle
        .start_child(
            ChildSpec::worker("job0", |ctx| async move {
                ctx.cancelled().await;
                Ok(())
            })
            .restart(Restart::Temporary),
        )
        .await
        .unwrap();
    let listed = handle.children().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].name, "job0");
    // Terminating a temporary child removes it too (OTP deletes its spec).
    assert_eq!(
        handle.terminate_child("job0").await.unwrap(),
        StopOutcome::Graceful
    );
    assert!(handle.children().await.unwrap().is_empty());
    assert!(handle.terminate_child("job0").await.is_err());
    handle.shutdown().await;
}

/// Permanent and transient children stay listed after they stop (OTP keeps their specs).
#[tokio::test(start_paused = true)]
async fn transient_children_that_ended_stay_listed() {
    let handle = SupervisorSpec::builder("sup").build().unwrap().start();
    let mut exited = handle.subscribe("child-exited");
    handle
        .start_child(ChildSpec::worker("t", |_ctx| async { Ok(()) }).restart(Restart::Transient))
        .await
        .unwrap();
    support::next(&mut exited).await;
    let listed = handle.children().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        listed[0].state,
        architectlm_supervisor::worker::ChildState::Stopped
    );
    handle.shutdown().await;
}
