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

fn counting_idle(name: &str, starts: Arc<AtomicU32>) -> ChildSpec {
    ChildSpec::worker(name, move |ctx| {
        starts.fetch_add(1, Ordering::SeqCst);
        async move {
            ctx.cancelled().await;
            Ok(())
        }
    })
}

fn always_fails(name: &str, starts: Arc<AtomicU32>) -> ChildSpec {
    ChildSpec::worker(name, move |_ctx| {
        starts.fetch_add(1, Ordering::SeqCst);
        async { Err("connection refused".into()) }
    })
}

/// `rest_for_one_other_child_abnormal` with a terminated dependency: when the child a group
/// restart waits on is stopped by hand during its backoff, the children after it are not
/// started without it.
#[tokio::test(start_paused = true)]
async fn rest_for_one_does_not_start_a_dependent_of_a_terminated_child() {
    use architectlm_supervisor::worker::{ChildState, RestartBackoff, RestartIntensity, Strategy};
    let (a, b, c) = (
        Arc::new(AtomicU32::new(0)),
        Arc::new(AtomicU32::new(0)),
        Arc::new(AtomicU32::new(0)),
    );
    let handle = SupervisorSpec::builder("s")
        .strategy(Strategy::RestForOne)
        .intensity(RestartIntensity::new(100, Duration::from_secs(1)))
        .child(counting_idle("a", a.clone()))
        .child(
            always_fails("b", b.clone()).backoff(RestartBackoff::exponential(
                Duration::from_secs(1),
                Duration::from_secs(1),
            )),
        )
        .child(counting_idle("c", c.clone()))
        .build()
        .unwrap()
        .start();
    let mut scheduled = handle.subscribe("restart-scheduled");
    support::next(&mut scheduled).await;
    // b waits for its restart; stop it by hand before the deadline.
    handle.terminate_child("b").await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let states: Vec<(String, ChildState)> = handle
        .children()
        .await
        .unwrap()
        .into_iter()
        .map(|s| (s.name, s.state))
        .collect();
    assert_eq!(states[0], ("a".to_owned(), ChildState::Running));
    assert_eq!(states[1], ("b".to_owned(), ChildState::Stopped));
    assert_ne!(
        states[2].1,
        ChildState::Running,
        "c started without b: {states:?}"
    );
    assert_eq!(c.load(Ordering::SeqCst), 1, "c ran only at the first start");
    handle.shutdown().await;
}

/// While a child's restarts keep failing, the children after it do not start and stop again
/// at every backoff deadline: they wait until it has stayed up for its `reset_after`.
#[tokio::test(start_paused = true)]
async fn rest_for_one_dependents_do_not_flap_with_a_failing_child() {
    use architectlm_supervisor::worker::{RestartBackoff, RestartIntensity, Strategy};
    let (b, c) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let handle = SupervisorSpec::builder("s")
        .strategy(Strategy::RestForOne)
        .intensity(RestartIntensity::new(1_000, Duration::from_secs(1)))
        .child(
            always_fails("b", b.clone()).backoff(
                RestartBackoff::exponential(Duration::from_millis(100), Duration::from_millis(100))
                    .reset_after(Duration::from_secs(5)),
            ),
        )
        .child(counting_idle("c", c.clone()))
        .build()
        .unwrap()
        .start();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(b.load(Ordering::SeqCst) >= 20, "b kept restarting");
    // c's first start and the group restart after b's first failure; none after.
    assert!(
        c.load(Ordering::SeqCst) <= 2,
        "c flapped: {} starts",
        c.load(Ordering::SeqCst)
    );
    handle.shutdown().await;
}

/// `restart_child`, `delete_child` and `count_children`, as in OTP: only a stopped child is
/// restarted or deleted; a deleted child's name is free again.
#[tokio::test(start_paused = true)]
async fn restart_delete_and_count_children() {
    use architectlm_supervisor::worker::ChildState;
    let (a, b) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let handle = SupervisorSpec::builder("sup")
        .child(counting_idle("a", a.clone()))
        .child(counting_idle("b", b.clone()))
        .build()
        .unwrap()
        .start();
    let counts = handle.count_children().await.unwrap();
    assert_eq!(
        (
            counts.specs,
            counts.active,
            counts.workers,
            counts.supervisors
        ),
        (2, 2, 2, 0)
    );
    // A running child is neither restarted nor deleted.
    assert!(handle.restart_child("b").await.is_err());
    assert!(handle.delete_child("b").await.is_err());
    assert!(handle.restart_child("nobody").await.is_err());
    handle.terminate_child("b").await.unwrap();
    assert_eq!(handle.count_children().await.unwrap().active, 1);
    handle.restart_child("b").await.unwrap();
    let states: Vec<_> = handle
        .children()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.state)
        .collect();
    assert_eq!(states, vec![ChildState::Running, ChildState::Running]);
    assert_eq!(b.load(Ordering::SeqCst), 2);
    handle.terminate_child("b").await.unwrap();
    handle.delete_child("b").await.unwrap();
    let counts = handle.count_children().await.unwrap();
    assert_eq!((counts.specs, counts.active, counts.workers), (1, 1, 1));
    assert!(
        handle
            .children()
            .await
            .unwrap()
            .iter()
            .all(|s| s.name != "b")
    );
    // The name is free again.
    handle
        .start_child(counting_idle("b", b.clone()))
        .await
        .unwrap();
    assert_eq!(handle.count_children().await.unwrap().specs, 2);
    handle.shutdown().await;
}

/// `transient_shutdown`: a transient child ending with `{shutdown, Reason}` is not restarted,
/// and its exit is a shutdown, not a failure.
#[tokio::test(start_paused = true)]
async fn transient_shutdown() {
    use architectlm_supervisor::worker::{ExitReason, Shutdown};
    let starts = Arc::new(AtomicU32::new(0));
    let s = starts.clone();
    let handle = SupervisorSpec::builder("sup")
        .child(
            ChildSpec::worker("drainer", move |_ctx| {
                s.fetch_add(1, Ordering::SeqCst);
                async { Err(Shutdown::new("queue drained").into()) }
            })
            .restart(Restart::Transient),
        )
        .build()
        .unwrap()
        .start();
    let mut exited = handle.subscribe("child-exited");
    support::next(&mut exited).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(starts.load(Ordering::SeqCst), 1, "not restarted");
    let c = handle.children().await.unwrap();
    assert_eq!(c[0].last_exit, Some(ExitReason::Shutdown));
    // The token type is reachable from the crate alone.
    let _: Option<architectlm_supervisor::worker::CancellationToken> = None;
    handle.shutdown().await;
}
