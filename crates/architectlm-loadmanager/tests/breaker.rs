//! Circuit breaking: usage, failure rate, slow calls, consecutive failures, half-open trials,
//! growing reset timeouts, forced-open and disabled modes.

mod support;

use std::sync::{Arc, Barrier};
use std::time::Duration;

use architectlm_core::extensions::loadmanager::{CircuitStatus, ResourceType, Thresholds};
use architectlm_loadmanager::{
    LoadEventType as E, LoadManager, Rejected, ResourceSettings, SlidingWindow,
};
use support::*;

#[test]
fn half_open_admits_exactly_k_trials_among_100_concurrent_callers() {
    for k in [1u32, 3, 7] {
        let (m, clock) = manual();
        let r = register(
            &m,
            ResourceSettings::builder("api", ResourceType::Api, 1_000)
                .consecutive_failures(1)
                .half_open_trials(k)
                .reset_timeout(secs(10)),
        );
        r.try_acquire(1).unwrap().failure();
        assert_eq!(r.status().status, CircuitStatus::Open);
        clock.advance(secs(10));

        let barrier = Arc::new(Barrier::new(100));
        let handles: Vec<_> = (0..100)
            .map(|_| {
                let r = r.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    r.try_acquire_owned(1)
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let (admitted, refused): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
        assert_eq!(admitted.len(), k as usize, "exactly K trials for K = {k}");
        assert!(
            refused
                .iter()
                .all(|e| matches!(e, Err(Rejected::HalfOpenTrialsBusy)))
        );
        assert_eq!(r.status().status, CircuitStatus::HalfOpen);
        assert_eq!(r.used(), u64::from(k));

        // All K trials must succeed to close; until the last one the circuit stays half-open.
        let mut permits: Vec<_> = admitted.into_iter().map(Result::unwrap).collect();
        let last = permits.pop().unwrap();
        for p in permits {
            p.success();
            assert_eq!(r.status().status, CircuitStatus::HalfOpen);
        }
        last.success();
        assert_eq!(r.status().status, CircuitStatus::Closed);
        assert_eq!(r.used(), 0);
    }
}

#[test]
fn a_failed_trial_reopens_and_the_reset_timeout_grows() {
    let (m, clock) = manual();
    let mut sub = m.subscribe("*");
    let r = register(
        &m,
        ResourceSettings::builder("api", ResourceType::Api, 10)
            .consecutive_failures(2)
            .half_open_trials(2)
            .reset_timeout(secs(10))
            .reset_backoff(2.0, secs(25)),
    );
    r.try_acquire(1).unwrap().failure();
    r.try_acquire(1).unwrap().failure();
    assert_eq!(r.try_acquire(1).unwrap_err(), Rejected::CircuitOpen);

    clock.advance(secs(10));
    let t1 = r.try_acquire(1).unwrap();
    let t2 = r.try_acquire(1).unwrap();
    assert!(t1.is_trial() && t2.is_trial());
    t1.success();
    t2.failure();
    assert_eq!(r.status().status, CircuitStatus::Open);
    // Second opening in a row: 20 s.
    clock.advance(secs(19));
    assert_eq!(r.try_acquire(1).unwrap_err(), Rejected::CircuitOpen);
    clock.advance(secs(1));
    r.try_acquire(1).unwrap().failure();
    // Third: 40 s capped at 25 s.
    clock.advance(secs(24));
    assert!(!r.is_available());
    clock.advance(secs(1));
    assert!(r.is_available());
    let (a, b) = (r.try_acquire(1).unwrap(), r.try_acquire(1).unwrap());
    a.success();
    b.success();
    assert_eq!(r.status().status, CircuitStatus::Closed);

    assert_eq!(
        drain(&mut sub),
        vec![
            E::CircuitOpen,
            E::CircuitHalfOpen,
            E::CircuitOpen,
            E::CircuitHalfOpen,
            E::CircuitOpen,
            E::CircuitHalfOpen,
            E::CircuitClosed
        ]
    );
    let metrics = r.metrics();
    assert_eq!((metrics.openings, metrics.rejected_open), (3, 2));
    // After closing, the timeout starts from the base again.
    r.try_acquire(1).unwrap().failure();
    r.try_acquire(1).unwrap().failure();
    clock.advance(secs(10));
    assert!(r.is_available());
}

#[test]
fn failure_rate_opens_after_the_minimum_number_of_calls() {
    let (m, _clock) = manual();
    let mut sub = m.subscribe("*");
    let r = register(
        &m,
        ResourceSettings::builder("db", ResourceType::Database, 10)
            .failure_rate_threshold(50.0)
            .sliding_window(SlidingWindow::Count(10))
            .minimum_calls(10),
    );
    for _ in 0..4 {
        r.try_acquire(1).unwrap().failure();
    }
    for _ in 0..5 {
        r.try_acquire(1).unwrap().success();
    }
    // 4 of 9: below the minimum of calls and below the rate.
    assert_eq!(r.status().status, CircuitStatus::Closed);
    r.try_acquire(1).unwrap().failure();
    // 5 of 10 = 50 %.
    assert_eq!(r.status().status, CircuitStatus::Open);
    assert_eq!(
        drain_reasons(&mut sub),
        vec![(E::CircuitOpen, "failure-rate".to_owned())]
    );
}

#[test]
fn failure_rate_is_over_the_last_n_calls_only() {
    let (m, _clock) = manual();
    let r = register(
        &m,
        ResourceSettings::builder("db", ResourceType::Database, 10)
            .failure_rate_threshold(50.0)
            .sliding_window(SlidingWindow::Count(4))
            .minimum_calls(4),
    );
    // F F S S -> 50 % at 4 calls would open; so start with F S S S then keep succeeding.
    r.try_acquire(1).unwrap().failure();
    for _ in 0..3 {
        r.try_acquire(1).unwrap().success();
    }
    r.try_acquire(1).unwrap().failure(); // window S S S F: 25 %
    r.try_acquire(1).unwrap().success(); // S S F S
    assert_eq!(r.status().status, CircuitStatus::Closed);
    r.try_acquire(1).unwrap().failure(); // S F S F: 50 %
    assert_eq!(r.status().status, CircuitStatus::Open);
}

#[tokio::test(start_paused = true)]
async fn slow_calls_open_the_circuit_on_tokio_time() {
    let m = LoadManager::new();
    let mut sub = m.subscribe("*");
    let r = register(
        &m,
        ResourceSettings::builder("api", ResourceType::Api, 10)
            .slow_call_rate_threshold(50.0)
            .slow_call_duration(Duration::from_millis(500))
            .sliding_window(SlidingWindow::Count(4))
            .minimum_calls(4)
            .reset_timeout(secs(5)),
    );
    for slow in [true, false, false] {
        let p = r.acquire(1, secs(1)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(if slow { 600 } else { 100 })).await;
        p.success();
    }
    assert_eq!(r.status().status, CircuitStatus::Closed);
    let p = r.try_acquire(1).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    p.success();
    assert_eq!(r.status().status, CircuitStatus::Open);
    assert_eq!(
        drain_reasons(&mut sub),
        vec![(E::CircuitOpen, "slow-call-rate".to_owned())]
    );
    // A slow trial reopens too.
    tokio::time::sleep(secs(5)).await;
    let t = r.try_acquire(1).unwrap();
    tokio::time::sleep(secs(1)).await;
    t.success();
    assert_eq!(r.status().status, CircuitStatus::Open);
    assert_eq!(
        drain_reasons(&mut sub),
        vec![
            (E::CircuitHalfOpen, "reset-timeout".to_owned()),
            (E::CircuitOpen, "slow-trial".to_owned())
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn time_window_forgets_old_failures() {
    let m = LoadManager::new();
    let r = register(
        &m,
        ResourceSettings::builder("api", ResourceType::Api, 10)
            .failure_rate_threshold(60.0)
            .sliding_window(SlidingWindow::Time(secs(10)))
            .minimum_calls(3),
    );
    r.try_acquire(1).unwrap().failure();
    r.try_acquire(1).unwrap().failure();
    tokio::time::sleep(secs(11)).await;
    // The two failures have left the window: F S S would be 33 %.
    r.try_acquire(1).unwrap().failure();
    r.try_acquire(1).unwrap().success();
    r.try_acquire(1).unwrap().success();
    assert_eq!(r.status().status, CircuitStatus::Closed);
    r.try_acquire(1).unwrap().failure();
    r.try_acquire(1).unwrap().failure();
    // F S S F F = 60 % within 10 s.
    assert_eq!(r.status().status, CircuitStatus::Open);
}

#[test]
fn consecutive_failures_open_and_a_success_resets_the_count() {
    let (m, _clock) = manual();
    let r = register(
        &m,
        ResourceSettings::builder("api", ResourceType::Api, 10).consecutive_failures(3),
    );
    r.try_acquire(1).unwrap().failure();
    r.try_acquire(1).unwrap().failure();
    r.try_acquire(1).unwrap().success();
    r.try_acquire(1).unwrap().failure();
    r.try_acquire(1).unwrap().failure();
    assert_eq!(r.status().status, CircuitStatus::Closed);
    // Unknown outcomes count toward nothing.
    drop(r.try_acquire(1).unwrap());
    assert_eq!(r.status().status, CircuitStatus::Closed);
    r.try_acquire(1).unwrap().failure();
    assert_eq!(r.status().status, CircuitStatus::Open);
    assert_eq!(r.used(), 0);
}

#[tokio::test(start_paused = true)]
async fn usage_at_the_circuit_threshold_opens_and_only_the_reset_timeout_leaves_open() {
    let m = LoadManager::new();
    let mut sub = m.subscribe("*");
    let r = register(
        &m,
        ResourceSettings::builder("payment-api", ResourceType::Api, 100)
            .thresholds(Thresholds::new(70.0, 85.0, 95.0))
            .reset_timeout(secs(30)),
    );
    for _ in 0..95 {
        r.acquire_units(1).unwrap();
    }
    assert_eq!(r.acquire_units(1).unwrap_err(), Rejected::CircuitOpen);
    let st = r.status();
    assert_eq!((st.status, st.used), (CircuitStatus::Open, 95));
    assert!(st.reset_at.is_some());
    // Releasing does not skip out of open.
    r.release(95);
    assert_eq!(r.status().status, CircuitStatus::Open);
    assert!(!r.is_available());
    // The reset timer moves it to half-open at 30 s (reading the status never does).
    tokio::time::sleep(secs(31)).await;
    assert!(r.is_available());
    assert_eq!(r.status().status, CircuitStatus::HalfOpen);
    // A legacy acquisition is the trial; releasing its units passes it.
    r.acquire_units(1).unwrap();
    assert_eq!(
        r.acquire_units(1).unwrap_err(),
        Rejected::HalfOpenTrialsBusy
    );
    r.release(1);
    assert_eq!(r.status().status, CircuitStatus::Closed);
    assert_eq!(
        drain(&mut sub),
        vec![
            E::ThresholdWarning,
            E::ThresholdCritical,
            E::CircuitOpen,
            // Usage fell back to normal while open: a usage event of its own.
            E::ThresholdNormal,
            E::CircuitHalfOpen,
            E::CircuitClosed
        ]
    );
}

#[test]
fn forced_open_and_disabled_modes() {
    let (m, clock) = manual();
    let r = register(
        &m,
        ResourceSettings::builder("api", ResourceType::Api, 10)
            .consecutive_failures(1)
            .reset_timeout(secs(1)),
    );
    m.force_open("api").unwrap();
    clock.advance(secs(3600));
    assert_eq!(r.try_acquire(1).unwrap_err(), Rejected::ForcedOpen);
    assert_eq!(r.status().status, CircuitStatus::Open);
    m.disable("api").unwrap();
    for _ in 0..10 {
        r.try_acquire(1).unwrap().failure();
    }
    assert_eq!(r.status().status, CircuitStatus::Closed);
    // Capacity still applies when disabled.
    let held: Vec<_> = (0..10).map(|_| r.try_acquire(1).unwrap()).collect();
    assert_eq!(r.try_acquire(1).unwrap_err(), Rejected::CapacityFull);
    drop(held);
    m.reset("api").unwrap();
    r.try_acquire(1).unwrap().failure();
    assert_eq!(r.status().status, CircuitStatus::Open);
    assert!(m.force_open("nope").is_err());
}

#[test]
fn outcomes_of_calls_started_before_opening_do_not_close_the_circuit() {
    let (m, clock) = manual();
    let r = register(
        &m,
        ResourceSettings::builder("api", ResourceType::Api, 10)
            .consecutive_failures(1)
            .reset_timeout(secs(1)),
    );
    let early = r.try_acquire_owned(1).unwrap();
    r.try_acquire(1).unwrap().failure();
    clock.advance(secs(1));
    let trial = r.try_acquire(1).unwrap();
    // A non-trial permit reporting success while half-open decides nothing.
    early.success();
    assert_eq!(r.status().status, CircuitStatus::HalfOpen);
    trial.success();
    assert_eq!(r.status().status, CircuitStatus::Closed);
}

#[test]
fn a_trial_without_an_outcome_hands_its_slot_to_the_next_caller() {
    let (m, clock) = manual();
    let r = register(
        &m,
        ResourceSettings::builder("api", ResourceType::Api, 10)
            .consecutive_failures(1)
            .reset_timeout(secs(1)),
    );
    r.try_acquire(1).unwrap().failure();
    clock.advance(secs(1));
    let trial = r.try_acquire(1).unwrap();
    assert_eq!(r.try_acquire(1).unwrap_err(), Rejected::HalfOpenTrialsBusy);
    drop(trial);
    assert_eq!(r.status().status, CircuitStatus::HalfOpen);
    let next = r.try_acquire(1).unwrap();
    assert!(next.is_trial());
    next.success();
    assert_eq!(r.status().status, CircuitStatus::Closed);
}

#[tokio::test(start_paused = true)]
async fn the_circuit_goes_half_open_on_time_without_any_call() {
    let m = LoadManager::new();
    let mut sub = m.subscribe("circuit-half-open");
    let r = register(
        &m,
        ResourceSettings::builder("api", ResourceType::Api, 10)
            .consecutive_failures(1)
            .reset_timeout(secs(30)),
    );
    let opened = tokio::time::Instant::now();
    r.try_acquire(1).unwrap().failure();
    let e = tokio::time::timeout(secs(60), sub.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(e.resource_id, "api");
    assert_eq!(
        opened.elapsed(),
        secs(30),
        "half-open exactly at the reset timeout"
    );
    assert_eq!(r.status().status, CircuitStatus::HalfOpen);
    assert!(sub.try_recv().is_none(), "one event per change");
}
