//! Exactness under concurrency and the meaning of each event: status follows usage after any
//! quiescent point, only a call admitted as a trial decides a trial, a rule that could never
//! fire is refused, every status change and breaker transition is its own event, and reading
//! the status changes nothing.

mod support;

use std::sync::Arc;

use architectlm_core::Error;
use architectlm_core::extensions::LoadManager as _;
use architectlm_core::extensions::loadmanager::{CircuitStatus, ResourceType, Thresholds};
use architectlm_loadmanager::{LoadEventType as E, ResourceSettings, SlidingWindow};
use support::*;

/// The documented function of usage (hysteresis 0): below 70 % closed, below 85 % warning,
/// else critical (the circuit rule is off here).
fn expected(used: u64) -> CircuitStatus {
    match used {
        0..70 => CircuitStatus::Closed,
        70..85 => CircuitStatus::Warning,
        _ => CircuitStatus::Critical,
    }
}

/// Two threads cross the warning threshold at the same instant in opposite directions, round
/// after round; after each round (a quiescent point) the status must follow the usage. The
/// rounds are synchronised by polling, so that the two crossings overlap closely. The race this
/// guards against (a recomputation storing a level from a usage read just before the other
/// crossing, which read the old level and skipped) has a window of a few instructions; the
/// test is a regression guard, the argument for the fix is in `usage_changed`.
#[test]
fn after_concurrent_takes_and_returns_the_status_is_the_function_of_usage() {
    use std::sync::atomic::{AtomicU64, Ordering};
    const ROUNDS: u64 = 5_000;
    let (m, _clock) = manual();
    let r = register(
        &m,
        ResourceSettings::builder("pool", ResourceType::Custom, 100)
            .thresholds(Thresholds::new(70.0, 85.0, 95.0))
            .open_on_usage(false),
    );
    // `go` counts rounds started, `done` the threads' ends of rounds.
    let (go, done) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let spawn = |take: bool| {
        let (r, go, done) = (r.clone(), go.clone(), done.clone());
        std::thread::spawn(move || {
            for round in 1..=ROUNDS {
                while go.load(Ordering::Acquire) < round {
                    std::thread::yield_now();
                }
                if take {
                    r.acquire_units(1).expect("room");
                } else {
                    r.release(1);
                }
                done.fetch_add(1, Ordering::AcqRel);
            }
        })
    };
    let (taker, returner) = (spawn(true), spawn(false));
    let mut stale = Vec::new();
    for round in 1..=ROUNDS {
        // 70 % used: warning. One unit comes back while another is taken: 70 % again.
        r.set_usage(70);
        assert_eq!(r.status().status, CircuitStatus::Warning);
        go.store(round, Ordering::Release);
        while done.load(Ordering::Acquire) < round * 2 {
            std::thread::yield_now();
        }
        let used = r.used();
        let status = r.status().status;
        if status != expected(used) && stale.len() < 10 {
            stale.push((round, used, status));
        }
    }
    taker.join().unwrap();
    returner.join().unwrap();
    assert!(
        stale.is_empty(),
        "status out of line with usage (round, used, status): {stale:?}"
    );
}

#[tokio::test]
async fn returning_units_taken_before_the_circuit_opened_decides_no_trial() {
    let (m, clock) = manual();
    register(
        &m,
        ResourceSettings::builder("db", ResourceType::Database, 100)
            .consecutive_failures(1)
            .reset_timeout(secs(10)),
    );
    // Ten units taken while closed, then the circuit opens on a failure.
    assert!(m.acquire_resource("db", 10).await.unwrap());
    m.try_acquire("db", 1).unwrap().failure();
    clock.advance(secs(10));
    // Half-open: a permit-less call is admitted as the trial.
    assert!(m.acquire_resource("db", 1).await.unwrap());
    assert_eq!(
        m.resource("db").unwrap().status().status,
        CircuitStatus::HalfOpen
    );
    // The ten units of before are no trial: the circuit stays half-open.
    m.release_resource("db", 10).await.unwrap();
    assert_eq!(
        m.resource("db").unwrap().status().status,
        CircuitStatus::HalfOpen
    );
    // The trial's own unit decides it.
    m.release_resource("db", 1).await.unwrap();
    assert_eq!(
        m.resource("db").unwrap().status().status,
        CircuitStatus::Closed
    );
}

#[test]
fn a_rule_that_could_never_fire_is_refused_naming_the_fields() {
    let e = ResourceSettings::builder("api", ResourceType::Api, 10)
        .failure_rate_threshold(50.0)
        .sliding_window(SlidingWindow::Count(5))
        .build()
        .unwrap_err();
    assert!(
        matches!(&e, Error::InvalidConfig { field, value, .. } if field == "sliding_window.count" && value == "5"),
        "{e}"
    );
    assert!(e.to_string().contains("minimum_calls (10)"), "{e}");
    // Without a rate rule the window is unused, so nothing to refuse.
    assert!(
        ResourceSettings::builder("api", ResourceType::Api, 10)
            .sliding_window(SlidingWindow::Count(5))
            .build()
            .is_ok()
    );
    let e = ResourceSettings::builder("api", ResourceType::Api, 10)
        .thresholds(Thresholds::new(70.0, 85.0, 95.0))
        .hysteresis(70.0)
        .build()
        .unwrap_err();
    assert!(
        matches!(&e, Error::InvalidConfig { field, .. } if field == "hysteresis"),
        "{e}"
    );
    assert!(e.to_string().contains("thresholds.warning (70)"), "{e}");
}

fn transitions(
    sub: &mut architectlm_core::Subscription<architectlm_loadmanager::LoadEvent>,
) -> Vec<(E, String, String)> {
    let mut out = vec![];
    while let Some(e) = sub.try_recv() {
        out.push((
            e.event_type,
            e.payload["from"].as_str().unwrap_or_default().to_owned(),
            e.payload["to"].as_str().unwrap_or_default().to_owned(),
        ));
    }
    out
}

#[test]
fn every_status_change_and_breaker_transition_is_its_own_event() {
    let (m, clock) = manual();
    let mut sub = m.subscribe("*");
    let r = register(
        &m,
        ResourceSettings::builder("pool", ResourceType::Custom, 100)
            .thresholds(Thresholds::new(70.0, 85.0, 95.0))
            .reset_timeout(secs(5)),
    );
    let s = |a: &str, b: &str| (a.to_owned(), b.to_owned());
    // Warning and back: the way back is a usage event, not a circuit event.
    r.set_usage(75);
    r.set_usage(10);
    let got = transitions(&mut sub);
    let want = vec![
        (E::ThresholdWarning, s("closed", "warning")),
        (E::ThresholdNormal, s("warning", "closed")),
    ];
    assert_eq!(
        got.iter()
            .map(|(t, a, b)| (*t, (a.clone(), b.clone())))
            .collect::<Vec<_>>(),
        want
    );
    // 0 → 95 %: the status change to critical, then the breaker opening.
    r.set_usage(0);
    let _ = transitions(&mut sub);
    r.set_usage(95);
    let got = transitions(&mut sub);
    assert_eq!(
        got,
        vec![
            (E::ThresholdCritical, "closed".into(), "critical".into()),
            (E::CircuitOpen, "closed".into(), "open".into()),
        ]
    );
    // Usage back to normal while open, then the reset timeout and a trial that closes it.
    r.set_usage(0);
    clock.advance(secs(5));
    r.try_acquire(1).unwrap().success();
    let got = transitions(&mut sub);
    assert_eq!(
        got,
        vec![
            (E::ThresholdNormal, "critical".into(), "closed".into()),
            (E::CircuitHalfOpen, "open".into(), "half-open".into()),
            (E::CircuitClosed, "half-open".into(), "closed".into()),
        ]
    );
}

#[test]
fn reading_the_status_changes_nothing() {
    let (m, clock) = manual();
    let mut sub = m.subscribe("*");
    let r = register(
        &m,
        ResourceSettings::builder("api", ResourceType::Api, 10)
            .consecutive_failures(1)
            .reset_timeout(secs(5)),
    );
    r.try_acquire(1).unwrap().failure();
    clock.advance(secs(6));
    let _ = drain(&mut sub);
    for _ in 0..3 {
        assert_eq!(r.status().status, CircuitStatus::Open);
        assert!(r.is_available(), "a call now would be admitted as a trial");
    }
    assert!(m.resource("api").is_some());
    assert!(drain(&mut sub).is_empty(), "a read published an event");
    // The first call after the timeout moves it, and says so.
    let trial = r.try_acquire(1).unwrap();
    assert_eq!(r.status().status, CircuitStatus::HalfOpen);
    assert_eq!(drain(&mut sub), vec![E::CircuitHalfOpen]);
    trial.success();
}

#[tokio::test]
async fn a_permit_says_whether_it_is_a_trial() {
    let (m, clock) = manual();
    register(
        &m,
        ResourceSettings::builder("api", ResourceType::Api, 10)
            .consecutive_failures(1)
            .reset_timeout(secs(5)),
    );
    let p = m.acquire_permit("api", 1, None).await.unwrap();
    assert!(!p.is_trial());
    p.failure();
    clock.advance(secs(5));
    let trial = m.acquire_permit("api", 1, None).await.unwrap();
    assert!(trial.is_trial());
    trial.success();
    assert!(!m.acquire_permit("api", 1, None).await.unwrap().is_trial());
}
