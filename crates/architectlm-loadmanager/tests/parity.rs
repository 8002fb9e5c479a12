//! What Resilience4j's users rely on, on a manual clock and through the tower layer: a
//! longest wait in half-open, a rate-based half-open decision, manual transitions, a
//! metrics-only mode and a consistent metrics snapshot.

mod support;

use std::time::Duration;

use architectlm_core::Error;
use architectlm_core::extensions::loadmanager::{CircuitStatus, ResourceType};
use architectlm_loadmanager::{
    BreakerMode, LoadEventType as E, Rejected, ResourceSettings, SlidingWindow,
};
use support::*;

#[test]
fn a_half_open_circuit_whose_trials_never_end_opens_again_after_the_longest_wait() {
    let (m, clock) = manual();
    let mut sub = m.subscribe("*");
    let r = register(
        &m,
        ResourceSettings::builder("api", ResourceType::Api, 10)
            .consecutive_failures(1)
            .reset_timeout(secs(10))
            .max_wait_in_half_open(secs(3)),
    );
    r.try_acquire(1).unwrap().failure();
    clock.advance(secs(10));
    // The trial is taken and never reported (held, like a hung call).
    let hung = r.try_acquire_owned(1).unwrap();
    assert!(hung.is_trial());
    assert_eq!(r.status().status, CircuitStatus::HalfOpen);
    clock.advance(secs(2));
    assert_eq!(r.try_acquire(1).unwrap_err(), Rejected::HalfOpenTrialsBusy);
    clock.advance(secs(1));
    // Past the longest wait the next caller finds it open again.
    assert_eq!(r.try_acquire(1).unwrap_err(), Rejected::HalfOpenTrialsBusy);
    assert_eq!(r.status().status, CircuitStatus::Open);
    let reasons = drain_reasons(&mut sub);
    assert_eq!(
        reasons.last(),
        Some(&(E::CircuitOpen, "half-open-timeout".to_owned()))
    );
    // The late trial's outcome counts for nothing.
    hung.success();
    assert_eq!(r.status().status, CircuitStatus::Open);
    let e = ResourceSettings::builder("x", ResourceType::Api, 1)
        .max_wait_in_half_open(Duration::ZERO)
        .build()
        .unwrap_err();
    assert!(e.to_string().contains("max_wait_in_half_open"), "{e}");
}

#[tokio::test(start_paused = true)]
async fn on_a_tokio_clock_the_longest_wait_needs_no_call() {
    let m = architectlm_loadmanager::LoadManager::new();
    let r = register(
        &m,
        ResourceSettings::builder("api", ResourceType::Api, 10)
            .consecutive_failures(1)
            .reset_timeout(secs(10))
            .max_wait_in_half_open(secs(3)),
    );
    r.try_acquire(1).unwrap().failure();
    tokio::time::sleep(secs(10)).await;
    let _hung = r.try_acquire_owned(1).unwrap();
    tokio::time::sleep(secs(4)).await;
    assert_eq!(r.status().status, CircuitStatus::Open);
}

fn by_rate(k: u32) -> ResourceSettings {
    ResourceSettings::builder("api", ResourceType::Api, 100)
        .failure_rate_threshold(50.0)
        .sliding_window(SlidingWindow::Count(10))
        .minimum_calls(10)
        .half_open_trials(k)
        .half_open_by_rate(true)
        .reset_timeout(secs(5))
        .build()
        .unwrap()
}

#[test]
fn a_rate_based_half_open_closes_below_the_failure_rate_and_opens_at_it() {
    for (failures, closes) in [(1u32, true), (2, false)] {
        let (m, clock) = manual();
        let r = m.register(by_rate(4)).unwrap();
        for _ in 0..10 {
            r.try_acquire(1).unwrap().failure();
        }
        assert_eq!(r.status().status, CircuitStatus::Open);
        clock.advance(secs(5));
        let trials: Vec<_> = (0..4).map(|_| r.try_acquire_owned(1).unwrap()).collect();
        for (i, t) in trials.into_iter().enumerate() {
            if (i as u32) < failures {
                t.failure();
            } else {
                t.success();
            }
            if i < 3 {
                assert_eq!(
                    r.status().status,
                    CircuitStatus::HalfOpen,
                    "decided after all K"
                );
            }
        }
        let want = if closes {
            CircuitStatus::Closed
        } else {
            CircuitStatus::Open
        };
        assert_eq!(r.status().status, want, "{failures} of 4 failed");
    }
    let e = ResourceSettings::builder("x", ResourceType::Api, 1)
        .half_open_by_rate(true)
        .build()
        .unwrap_err();
    assert!(
        matches!(&e, Error::InvalidConfig { field, .. } if field == "half_open_by_rate"),
        "{e}"
    );
}

#[test]
fn manual_transitions_publish_their_reason() {
    let (m, clock) = manual();
    let mut sub = m.subscribe("*");
    let r = register(
        &m,
        ResourceSettings::builder("api", ResourceType::Api, 10).reset_timeout(secs(30)),
    );
    r.open_for(secs(2));
    assert_eq!(r.status().status, CircuitStatus::Open);
    assert_eq!(r.try_acquire(1).unwrap_err(), Rejected::CircuitOpen);
    clock.advance(secs(2));
    r.try_acquire(1).unwrap().success();
    assert_eq!(r.status().status, CircuitStatus::Closed);
    assert_eq!(
        drain_reasons(&mut sub),
        vec![
            (E::CircuitOpen, "manual".to_owned()),
            (E::CircuitHalfOpen, "reset-timeout".to_owned()),
            (E::CircuitClosed, "trials-passed".to_owned()),
        ]
    );
}

#[test]
fn metrics_only_records_and_never_refuses() {
    let (m, _clock) = manual();
    let r = register(
        &m,
        ResourceSettings::builder("api", ResourceType::Api, 10)
            .consecutive_failures(2)
            .failure_rate_threshold(50.0)
            .sliding_window(SlidingWindow::Count(10))
            .minimum_calls(4),
    );
    r.metrics_only();
    for _ in 0..8 {
        r.try_acquire(1).unwrap().failure();
    }
    assert_eq!(r.status().status, CircuitStatus::Closed);
    let s = r.snapshot();
    assert_eq!(s.breaker, BreakerMode::MetricsOnly);
    assert_eq!((s.buffered_calls, s.failed_calls), (8, 8));
    assert_eq!(s.failure_rate, Some(100.0));
    assert_eq!(s.openings, 0);
    r.reset();
    assert_eq!(r.snapshot().breaker, BreakerMode::Closed);
}

#[test]
fn the_snapshot_reports_the_window_refusals_trials_and_time_in_state() {
    let (m, clock) = manual();
    let r = register(
        &m,
        ResourceSettings::builder("api", ResourceType::Api, 10)
            .failure_rate_threshold(50.0)
            .sliding_window(SlidingWindow::Count(4))
            .minimum_calls(4)
            .half_open_trials(2)
            .reset_timeout(secs(5)),
    );
    r.try_acquire(1).unwrap().success();
    r.try_acquire(1).unwrap().failure();
    let s = r.snapshot();
    assert_eq!(
        (s.buffered_calls, s.failed_calls, s.failure_rate),
        (2, 1, None)
    );
    r.try_acquire(1).unwrap().failure();
    r.try_acquire(1).unwrap().success();
    // Two of four failed: 50 % opens it.
    let s = r.snapshot();
    assert_eq!(s.status, CircuitStatus::Open);
    assert_eq!(s.openings, 1);
    assert!(r.try_acquire(1).is_err());
    clock.advance(secs(5));
    let t = r.try_acquire_owned(1).unwrap();
    let s = r.snapshot();
    assert_eq!(s.breaker, BreakerMode::HalfOpen);
    assert_eq!((s.trials_left, s.trials_passed), (Some(1), Some(0)));
    assert_eq!(s.refused_calls, 1);
    assert_eq!(s.in_state_for, Duration::ZERO);
    clock.advance(secs(1));
    assert_eq!(r.snapshot().in_state_for, secs(1));
    t.success();
}
