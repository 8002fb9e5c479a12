//! Extreme but legal durations in worker trees: a backoff or shutdown timeout of
//! `Duration::MAX` means "never" (saturating), and panics nothing.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use architectlm_supervisor::worker::{
    ChildSpec, ChildState, RestartBackoff, RestartIntensity, SupervisorSpec,
};
use support::next;

#[tokio::test(start_paused = true)]
async fn a_restart_backoff_of_duration_max_waits_forever_without_panicking() {
    let runs = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    let handle = SupervisorSpec::builder("s")
        .intensity(RestartIntensity::new(10, Duration::from_secs(1)))
        .child(
            ChildSpec::worker("w", move |_ctx| {
                r.fetch_add(1, Ordering::SeqCst);
                async { Err("crash".into()) }
            })
            .backoff(RestartBackoff::exponential(Duration::MAX, Duration::MAX)),
        )
        .build()
        .unwrap()
        .start();
    let mut scheduled = handle.subscribe("restart-scheduled");
    next(&mut scheduled).await;
    // A year later the restart is still pending, and the tree still answers.
    tokio::time::advance(Duration::from_secs(86_400 * 365)).await;
    let children = handle.children().await.unwrap();
    assert_eq!(children.len(), 1);
    assert_ne!(children[0].state, ChildState::Running);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    handle.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_shutdown_timeout_of_duration_max_waits_for_the_child() {
    let stopped = Arc::new(AtomicU32::new(0));
    let s = stopped.clone();
    let up = Arc::new(tokio::sync::Notify::new());
    let u = up.clone();
    let handle = SupervisorSpec::builder("s")
        .child(
            ChildSpec::worker("w", move |ctx| {
                let s = s.clone();
                u.notify_one();
                async move {
                    ctx.cancelled().await;
                    s.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            })
            .shutdown_timeout(Duration::MAX),
        )
        .build()
        .unwrap()
        .start();
    up.notified().await;
    handle.shutdown().await;
    assert_eq!(stopped.load(Ordering::SeqCst), 1, "stopped gracefully");
}
