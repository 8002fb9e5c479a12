//! The tower layer in front of a real service: permits per request, outcomes from responses,
//! typed errors when open or full, and permits released when a response future is dropped.
#![cfg(feature = "tower")]

mod support;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use architectlm_core::extensions::loadmanager::{CallOutcome, CircuitStatus, ResourceType};
use architectlm_loadmanager::tower::{LoadError, LoadLayer};
use architectlm_loadmanager::{LoadManager, Rejected, ResourceSettings};
use tokio::sync::Semaphore;
use tower::{Layer, Service, ServiceExt};

/// A small account service: looks balances up after waiting for its "backend" (a semaphore the
/// test controls), fails for unknown accounts.
#[derive(Clone)]
struct Accounts {
    balances: Arc<HashMap<&'static str, u64>>,
    backend: Arc<Semaphore>,
    calls: Arc<AtomicUsize>,
}

#[derive(Debug, PartialEq)]
struct UnknownAccount(String);

impl Service<&'static str> for Accounts {
    type Response = u64;
    type Error = UnknownAccount;
    type Future = Pin<Box<dyn Future<Output = Result<u64, UnknownAccount>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, account: &'static str) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let balances = self.balances.clone();
        let backend = self.backend.clone();
        Box::pin(async move {
            let _turn = backend
                .acquire()
                .await
                .map_err(|_| UnknownAccount("closed".into()))?;
            balances
                .get(account)
                .copied()
                .ok_or_else(|| UnknownAccount(account.to_owned()))
        })
    }
}

fn accounts(open_backend: usize) -> Accounts {
    Accounts {
        balances: Arc::new(HashMap::from([("alice", 100), ("bob", 7)])),
        backend: Arc::new(Semaphore::new(open_backend)),
        calls: Arc::new(AtomicUsize::new(0)),
    }
}

#[tokio::test(start_paused = true)]
async fn failures_open_the_circuit_and_a_successful_trial_closes_it() {
    let m = LoadManager::new();
    let r = m
        .register(
            ResourceSettings::builder("accounts", ResourceType::Api, 10)
                .consecutive_failures(2)
                .reset_timeout(Duration::from_secs(5))
                .build()
                .unwrap(),
        )
        .unwrap();
    let inner = accounts(1_000);
    let calls = inner.calls.clone();
    let mut svc = LoadLayer::new(r.clone()).layer(inner);

    assert_eq!(svc.ready().await.unwrap().call("alice").await.unwrap(), 100);
    for _ in 0..2 {
        let e = svc
            .ready()
            .await
            .unwrap()
            .call("mallory")
            .await
            .unwrap_err();
        assert!(matches!(e, LoadError::Service(UnknownAccount(ref a)) if a == "mallory"));
    }
    assert_eq!(r.status().status, CircuitStatus::Open);
    let e = svc.ready().await.unwrap().call("alice").await.unwrap_err();
    assert!(matches!(e, LoadError::Rejected(Rejected::CircuitOpen)));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "a refused request never reaches the service"
    );

    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(svc.ready().await.unwrap().call("bob").await.unwrap(), 7);
    assert_eq!(r.status().status, CircuitStatus::Closed);
    assert_eq!(r.used(), 0);
}

#[tokio::test]
async fn a_full_resource_refuses_and_dropped_futures_release_their_permits() {
    let m = LoadManager::new();
    let r = m
        .register(
            ResourceSettings::builder("accounts", ResourceType::Api, 2)
                .open_on_usage(false)
                .build()
                .unwrap(),
        )
        .unwrap();
    let inner = accounts(0);
    let backend = inner.backend.clone();
    let mut svc = LoadLayer::new(r.clone()).layer(inner);
    let a = svc.ready().await.unwrap().call("alice");
    let b = svc.ready().await.unwrap().call("bob");
    assert_eq!(r.used(), 2);
    let e = svc.ready().await.unwrap().call("alice").await.unwrap_err();
    assert!(matches!(e, LoadError::Rejected(Rejected::CapacityFull)));
    assert!(matches!(e, LoadError::Rejected(r) if r.to_string() == "capacity full"));

    drop(a);
    assert_eq!(
        r.used(),
        1,
        "a dropped response future gives its permit back"
    );
    backend.add_permits(1);
    assert_eq!(b.await.unwrap(), 7);
    assert_eq!(r.used(), 0);
}

#[tokio::test]
async fn a_classifier_decides_what_counts_as_failure() {
    let m = LoadManager::new();
    let r = m
        .register(
            ResourceSettings::builder("accounts", ResourceType::Api, 10)
                .consecutive_failures(2)
                .build()
                .unwrap(),
        )
        .unwrap();
    // Unknown accounts are the caller's mistake, not the backend's: they do not count; a zero
    // balance stands in for a backend fault here.
    let classify = |res: &Result<u64, UnknownAccount>| match res {
        Ok(0) => CallOutcome::Failure,
        Ok(_) => CallOutcome::Success,
        Err(_) => CallOutcome::Unknown,
    };
    let mut inner = accounts(1_000);
    Arc::get_mut(&mut inner.balances).unwrap().insert("zero", 0);
    let mut svc = LoadLayer::new(r.clone()).classifier(classify).layer(inner);
    for _ in 0..5 {
        assert!(svc.ready().await.unwrap().call("mallory").await.is_err());
    }
    assert_eq!(r.status().status, CircuitStatus::Closed);
    for _ in 0..2 {
        assert_eq!(svc.ready().await.unwrap().call("zero").await.unwrap(), 0);
    }
    assert_eq!(r.status().status, CircuitStatus::Open);
}

#[tokio::test(start_paused = true)]
async fn with_a_wait_requests_queue_for_capacity_in_poll_ready() {
    let m = LoadManager::new();
    let r = m
        .register(
            ResourceSettings::builder("accounts", ResourceType::Api, 1)
                .open_on_usage(false)
                .max_waiting(1)
                .build()
                .unwrap(),
        )
        .unwrap();
    let inner = accounts(0);
    let backend = inner.backend.clone();
    let layer = LoadLayer::new(r.clone()).wait(Duration::from_secs(10));
    let mut first = layer.layer(inner.clone());
    let busy = first.ready().await.unwrap().call("alice");
    assert_eq!(r.used(), 1);

    // A second service waits in poll_ready until the first request finishes.
    let mut second = layer.layer(inner.clone());
    let waiter = tokio::spawn(async move { second.ready().await.unwrap().call("bob").await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!waiter.is_finished());
    // The queue holds one: a third is refused at once, without waiting.
    let mut third = layer.layer(inner.clone());
    let e = third
        .ready()
        .await
        .unwrap()
        .call("alice")
        .await
        .unwrap_err();
    assert!(matches!(e, LoadError::Rejected(Rejected::QueueFull)));

    backend.add_permits(2);
    assert_eq!(busy.await.unwrap(), 100);
    assert_eq!(waiter.await.unwrap().unwrap(), 7);
    assert_eq!(r.used(), 0);

    // Nothing frees up within the wait: the request is refused once the wait runs out.
    let mut fourth = layer.layer(inner.clone());
    let _held = r.try_acquire_owned(1).unwrap();
    let start = tokio::time::Instant::now();
    let e = fourth
        .ready()
        .await
        .unwrap()
        .call("alice")
        .await
        .unwrap_err();
    assert!(matches!(e, LoadError::Rejected(Rejected::WaitTimedOut)));
    assert_eq!(start.elapsed(), Duration::from_secs(10));
}

#[tokio::test(start_paused = true)]
async fn through_the_layer_a_hung_trial_reopens_after_the_longest_half_open_wait() {
    let m = LoadManager::new();
    let r = m
        .register(
            ResourceSettings::builder("accounts", ResourceType::Api, 10)
                .consecutive_failures(1)
                .reset_timeout(Duration::from_secs(5))
                .max_wait_in_half_open(Duration::from_secs(2))
                .build()
                .unwrap(),
        )
        .unwrap();
    let inner = accounts(1_000);
    let backend = inner.backend.clone();
    let mut svc = LoadLayer::new(r.clone()).layer(inner);
    assert!(svc.ready().await.unwrap().call("mallory").await.is_err());
    assert_eq!(r.status().status, CircuitStatus::Open);
    tokio::time::sleep(Duration::from_secs(5)).await;
    // The trial request hangs on its backend.
    backend.forget_permits(1_000);
    let trial = tokio::spawn(svc.ready().await.unwrap().call("alice"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        r.status().status,
        CircuitStatus::Open,
        "reopened while the trial hung"
    );
    backend.add_permits(1);
    assert_eq!(trial.await.unwrap().unwrap(), 100);
    assert_eq!(
        r.status().status,
        CircuitStatus::Open,
        "the late trial decided nothing"
    );
}

#[tokio::test(start_paused = true)]
async fn through_the_layer_manual_and_metrics_only_modes_decide_admission() {
    let m = LoadManager::new();
    let r = m
        .register(
            ResourceSettings::builder("accounts", ResourceType::Api, 10)
                .consecutive_failures(1)
                .reset_timeout(Duration::from_secs(5))
                .build()
                .unwrap(),
        )
        .unwrap();
    let mut svc = LoadLayer::new(r.clone()).layer(accounts(1_000));
    // Opened by hand for 2 s: refused, then a trial closes it.
    r.open_for(Duration::from_secs(2));
    let e = svc.ready().await.unwrap().call("alice").await.unwrap_err();
    assert!(matches!(e, LoadError::Rejected(Rejected::CircuitOpen)));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(svc.ready().await.unwrap().call("alice").await.unwrap(), 100);
    assert_eq!(r.status().status, CircuitStatus::Closed);
    // Metrics only: failures are recorded, nothing is refused.
    r.metrics_only();
    for _ in 0..3 {
        assert!(matches!(
            svc.ready().await.unwrap().call("mallory").await,
            Err(LoadError::Service(_))
        ));
    }
    assert_eq!(svc.ready().await.unwrap().call("bob").await.unwrap(), 7);
    assert_eq!(r.status().status, CircuitStatus::Closed);
}

#[tokio::test(start_paused = true)]
async fn through_the_layer_a_rate_based_half_open_tolerates_one_failed_trial_in_four() {
    use architectlm_loadmanager::SlidingWindow;
    let m = LoadManager::new();
    let r = m
        .register(
            ResourceSettings::builder("accounts", ResourceType::Api, 10)
                .failure_rate_threshold(50.0)
                .sliding_window(SlidingWindow::Count(4))
                .minimum_calls(4)
                .half_open_trials(4)
                .half_open_by_rate(true)
                .reset_timeout(Duration::from_secs(5))
                .build()
                .unwrap(),
        )
        .unwrap();
    let mut svc = LoadLayer::new(r.clone()).layer(accounts(1_000));
    for _ in 0..4 {
        let _ = svc.ready().await.unwrap().call("mallory").await;
    }
    assert_eq!(r.status().status, CircuitStatus::Open);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let _ = svc.ready().await.unwrap().call("mallory").await;
    for _ in 0..3 {
        assert_eq!(svc.ready().await.unwrap().call("alice").await.unwrap(), 100);
    }
    assert_eq!(
        r.status().status,
        CircuitStatus::Closed,
        "1 of 4 trials failed: 25 % < 50 %"
    );
}
