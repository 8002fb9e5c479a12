//! Extreme but legal values and inputs that cannot mean anything: the first behave (saturating,
//! documented), the second are refused naming the field and the value; nothing panics, and no
//! usage is left counted.

mod support;

use std::time::Duration;

use architectlm_core::Error;
use architectlm_core::extensions::LoadManager as _;
use architectlm_core::extensions::loadmanager::{
    CircuitStatus, ResourceConfig, ResourceType, Thresholds,
};
use architectlm_loadmanager::{LoadManager, ResourceSettings};
use support::*;

#[tokio::test]
async fn a_reset_timeout_of_duration_max_opens_on_usage_without_panicking() {
    let m = LoadManager::new();
    m.register_resource(
        ResourceConfig::new("db", ResourceType::Database, 100).reset_timeout(Duration::MAX),
    )
    .await
    .unwrap();
    // 95 % opens the circuit on usage: the opening computes the (saturated) timeout.
    assert!(m.acquire_resource("db", 95).await.unwrap());
    let s = m.get_resource_status("db").await.unwrap().unwrap();
    assert_eq!(s.status, CircuitStatus::Open);
    // The units come back, and a reset closes it: nothing is stuck.
    m.release_resource("db", 95).await.unwrap();
    assert_eq!(m.resource("db").unwrap().used(), 0);
    m.resource("db").unwrap().reset();
    let s = m.get_resource_status("db").await.unwrap().unwrap();
    assert_eq!(s.status, CircuitStatus::Closed);
}

#[test]
fn a_failure_opens_a_circuit_whose_reset_timeout_is_duration_max() {
    let (m, clock) = manual();
    let r = register(
        &m,
        ResourceSettings::builder("api", ResourceType::Api, 10)
            .consecutive_failures(1)
            .reset_backoff(1.0, Duration::MAX)
            .reset_timeout(Duration::MAX),
    );
    r.try_acquire(1).unwrap().failure();
    assert_eq!(r.status().status, CircuitStatus::Open);
    assert_eq!(r.used(), 0);
    // "Never" half-opens: a century later it still refuses.
    clock.advance(Duration::from_secs(86_400 * 365 * 100));
    assert!(r.try_acquire(1).is_err());
    r.reset();
    assert_eq!(r.status().status, CircuitStatus::Closed);
}

#[test]
fn a_growing_reset_timeout_saturates_at_its_cap() {
    let (m, clock) = manual();
    let base = Duration::from_secs(10_000_000_000); // about 317 years
    let r = register(
        &m,
        ResourceSettings::builder("api", ResourceType::Api, 10)
            .consecutive_failures(1)
            .reset_backoff(1e300, Duration::MAX)
            .reset_timeout(base),
    );
    r.try_acquire(1).unwrap().failure();
    assert_eq!(r.status().status, CircuitStatus::Open);
    clock.advance(base);
    // The trial fails: the next timeout is base × 1e300, past `Duration::MAX`: saturated.
    let trial = r.try_acquire(1).expect("a trial once the timeout passed");
    assert_eq!(r.status().status, CircuitStatus::HalfOpen);
    trial.failure();
    assert_eq!(r.status().status, CircuitStatus::Open);
    assert_eq!(r.used(), 0);
    clock.advance(base);
    assert!(
        r.try_acquire(1).is_err(),
        "the reopened circuit waits far longer"
    );
}

#[tokio::test]
async fn waiting_forever_for_capacity_is_allowed() {
    tokio::time::pause();
    let m = LoadManager::new();
    let r = register(
        &m,
        ResourceSettings::builder("pool", ResourceType::Custom, 1)
            .max_waiting(4)
            .open_on_usage(false),
    );
    let held = r.try_acquire_owned(1).unwrap();
    let waiter = {
        let r = r.clone();
        tokio::spawn(async move { r.acquire_owned(1, Duration::MAX).await.map(|_| ()) })
    };
    tokio::task::yield_now().await;
    drop(held);
    waiter.await.unwrap().unwrap();
}

#[tokio::test]
async fn releasing_zero_units_is_refused_naming_the_resource() {
    let m = LoadManager::new();
    m.register_resource(ResourceConfig::new("db", ResourceType::Database, 10))
        .await
        .unwrap();
    let e = m.release_resource("db", 0).await.unwrap_err();
    assert!(matches!(e, Error::InvalidInput(_)), "{e}");
    assert!(
        e.to_string().contains("\"db\"") && e.to_string().contains("units = 0"),
        "{e}"
    );
}

#[test]
fn thresholds_at_zero_are_refused_naming_the_field() {
    for t in [
        Thresholds::new(0.0, 0.0, 0.0),
        Thresholds::new(0.0, 50.0, 90.0),
    ] {
        let e = ResourceSettings::builder("cpu", ResourceType::Cpu, 100)
            .thresholds(t)
            .build()
            .unwrap_err();
        assert!(
            matches!(&e, Error::InvalidConfig { field, value, .. } if field == "thresholds.warning" && value == "0"),
            "{e}"
        );
    }
    // The same through the contract's config.
    let e = ResourceSettings::try_from(
        ResourceConfig::new("cpu", ResourceType::Cpu, 100)
            .thresholds(Thresholds::new(0.0, 0.0, 0.0)),
    )
    .unwrap_err();
    assert!(e.to_string().contains("thresholds.warning"), "{e}");
}

#[test]
fn blank_ids_are_reported_as_written() {
    for id in ["", "  "] {
        let e = ResourceSettings::builder(id, ResourceType::Cpu, 1)
            .build()
            .unwrap_err();
        assert!(e.to_string().contains(&format!("{id:?}")), "{e}");
    }
}
