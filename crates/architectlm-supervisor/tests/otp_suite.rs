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
