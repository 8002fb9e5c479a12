//! Shared helpers of the integration tests: event waiting with a deadline on the paused clock.
#![allow(dead_code)] // Each test file uses a different subset of the helpers.

use std::sync::Arc;
use std::time::Duration;

use architectlm_core::Subscription;
use architectlm_core::event::Typed;

/// Waits (on the test's paused clock) for the next event, failing the test after an hour of
/// virtual time.
pub(crate) async fn next<E: Typed + Send + Sync + 'static>(sub: &mut Subscription<E>) -> Arc<E> {
    match tokio::time::timeout(Duration::from_secs(3600), sub.recv()).await {
        Ok(Some(e)) => e,
        Ok(None) => panic!("the event hub closed"),
        Err(_) => panic!("no event within an hour of virtual time"),
    }
}

/// Waits for the first event that satisfies `pred`, returning it and the events skipped.
pub(crate) async fn until<E: Typed + Send + Sync + 'static>(
    sub: &mut Subscription<E>,
    pred: impl Fn(&E) -> bool,
) -> Arc<E> {
    loop {
        let e = next(sub).await;
        if pred(&e) {
            return e;
        }
    }
}

/// Asserts that no event arrives within `d` of virtual time.
pub(crate) async fn quiet_for<E: Typed + Send + Sync + 'static>(
    sub: &mut Subscription<E>,
    d: Duration,
) {
    if let Ok(Some(e)) = tokio::time::timeout(d, sub.recv()).await {
        panic!("unexpected event {}", e.type_name());
    }
}
