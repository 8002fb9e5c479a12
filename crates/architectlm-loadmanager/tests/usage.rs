//! Usage accounting: thresholds and hysteresis, permits released on drop and on panic, waiting
//! acquisition with a bounded queue, rate limits, and `used` staying in `[0, capacity]` under
//! random concurrent acquire/release.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use architectlm_core::extensions::loadmanager::{CircuitStatus, ResourceType, Thresholds};
use architectlm_loadmanager::{
    LoadEventType as E, LoadManager, RateLimit, Rejected, ResourceSettings,
};
use proptest::prelude::*;
use support::*;

fn hovering(hysteresis: f64) -> Vec<E> {
    let (m, _clock) = manual();
    let mut sub = m.subscribe("*");
    let r = register(
        &m,
        ResourceSettings::builder("api", ResourceType::Api, 100)
            .thresholds(Thresholds::new(70.0, 85.0, 95.0))
            .hysteresis(hysteresis),
    );
    r.set_usage(69);
    for _ in 0..50 {
        r.set_usage(70);
        r.set_usage(67);
    }
    // A real drop below the band leaves warning once.
    r.set_usage(60);
    drain(&mut sub)
}

#[test]
fn hysteresis_limits_events_of_usage_hovering_at_a_threshold() {
    let without = hovering(0.0);
    assert_eq!(
        without.len(),
        100,
        "every crossing is a change of status without hysteresis"
    );
    let with = hovering(5.0);
    assert_eq!(with, vec![E::ThresholdWarning, E::ThresholdNormal]);
}

#[test]
fn each_status_change_fires_exactly_once() {
    let (m, _clock) = manual();
    let mut sub = m.subscribe("*");
    let r = register(
        &m,
        ResourceSettings::builder("api", ResourceType::Api, 100)
            .thresholds(Thresholds::new(70.0, 85.0, 95.0))
            .open_on_usage(false),
    );
    for _ in 0..100 {
        r.acquire_units(1).unwrap();
    }
    assert_eq!(r.status().status, CircuitStatus::Critical);
    for _ in 0..100 {
        r.release(1);
    }
    assert_eq!(
        drain(&mut sub),
        vec![
            E::ThresholdWarning,
            E::ThresholdCritical,
            E::ThresholdWarning,
            E::ThresholdNormal
        ]
    );
}

#[tokio::test]
async fn permits_come_back_when_a_task_panics() {
    let m = LoadManager::new();
    let r = register(
        &m,
        ResourceSettings::builder("db", ResourceType::Database, 4)
            .open_on_usage(false)
            .consecutive_failures(2),
    );
    let mut tasks = vec![];
    for _ in 0..2 {
        let permit = r.try_acquire_owned(2).unwrap();
        tasks.push(tokio::spawn(async move {
            let _held = permit;
            tokio::task::yield_now().await;
            panic!("task failed while holding a permit");
        }));
    }
    assert_eq!(r.used(), 4);
    assert_eq!(r.status().status, CircuitStatus::Critical);
    for t in tasks {
        assert!(t.await.unwrap_err().is_panic());
    }
    assert_eq!(r.used(), 0);
    // Both panics were recorded as failures.
    assert_eq!(r.status().status, CircuitStatus::Open);

    // A borrowed permit on a panicking thread is released as well.
    let r2 = register(
        &m,
        ResourceSettings::builder("cache", ResourceType::Custom, 1).open_on_usage(false),
    );
    let r2c = r2.clone();
    let joined = std::thread::spawn(move || {
        let _p = r2c.try_acquire(1).unwrap();
        panic!("boom");
    })
    .join();
    assert!(joined.is_err());
    assert_eq!(r2.used(), 0);
    assert!(r2.is_available());
}

#[tokio::test(start_paused = true)]
async fn waiting_acquisition_gets_released_capacity_or_times_out() {
    let m = LoadManager::new();
    let r = register(
        &m,
        ResourceSettings::builder("db", ResourceType::Database, 2).open_on_usage(false),
    );
    let held = r.try_acquire_owned(2).unwrap();
    let r2 = r.clone();
    let waiter = tokio::spawn(async move {
        r2.acquire_owned(1, Duration::from_secs(5))
            .await
            .map(|p| p.units())
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!waiter.is_finished());
    held.success();
    assert_eq!(waiter.await.unwrap(), Ok(1));

    let _full = r.try_acquire_owned(2).unwrap();
    let start = tokio::time::Instant::now();
    assert_eq!(
        r.acquire(1, Duration::from_secs(3)).await.unwrap_err(),
        Rejected::WaitTimedOut
    );
    assert_eq!(start.elapsed(), Duration::from_secs(3));
}

#[tokio::test(start_paused = true)]
async fn the_bulkhead_refuses_rather_than_queues_when_full() {
    let m = LoadManager::new();
    let r = register(
        &m,
        ResourceSettings::builder("db", ResourceType::Database, 1)
            .open_on_usage(false)
            .max_waiting(2),
    );
    let held = r.try_acquire_owned(1).unwrap();
    let mut waiters = vec![];
    for _ in 0..2 {
        let r = r.clone();
        waiters.push(tokio::spawn(async move {
            r.acquire_owned(1, Duration::from_secs(60))
                .await
                .map(|p| p.success())
        }));
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(
        r.acquire(1, Duration::from_secs(60)).await.unwrap_err(),
        Rejected::QueueFull
    );
    // Refusals of an open circuit never wait.
    held.success();
    for w in waiters {
        assert_eq!(w.await.unwrap(), Ok(()));
    }
    assert_eq!(r.used(), 0);
    r.force_open();
    assert_eq!(
        r.acquire(1, Duration::from_secs(60)).await.unwrap_err(),
        Rejected::ForcedOpen
    );
}

#[tokio::test(start_paused = true)]
async fn rate_limits_follow_the_clock() {
    let m = LoadManager::new();
    let r = register(
        &m,
        ResourceSettings::builder("api", ResourceType::Api, 100)
            .rate_limit(RateLimit::per_second(2)),
    );
    r.try_acquire(1).unwrap().success();
    r.try_acquire(1).unwrap().success();
    assert_eq!(r.try_acquire(1).unwrap_err(), Rejected::RateLimited);
    assert_eq!(r.used(), 0, "a refused call holds nothing");
    tokio::time::sleep(Duration::from_millis(500)).await;
    r.try_acquire(1).unwrap().success();
    assert_eq!(r.try_acquire(1).unwrap_err(), Rejected::RateLimited);
}

#[test]
fn zero_and_oversized_requests_are_refused() {
    let (m, _c) = manual();
    let r = register(&m, ResourceSettings::builder("api", ResourceType::Api, 3));
    assert_eq!(r.try_acquire(0).unwrap_err(), Rejected::ZeroUnits);
    assert_eq!(r.try_acquire(4).unwrap_err(), Rejected::ExceedsCapacity);
    r.release(10);
    assert_eq!(r.used(), 0, "releasing more than used saturates at zero");
}

/// Threads acquire and release at random while a watcher checks the bound all along.
fn stress(capacity: u64, threads: usize, ops: &[(u8, u8)]) {
    let (m, _c) = manual();
    let r = register(
        &m,
        ResourceSettings::builder("r", ResourceType::Custom, capacity)
            .thresholds(Thresholds::new(50.0, 75.0, 100.0))
            .hysteresis(10.0)
            .open_on_usage(false),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (r, stop) = (r.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut max = 0;
            while !stop.load(Ordering::Relaxed) {
                let u = r.used();
                assert!(u <= r.capacity(), "used {u} above capacity");
                max = max.max(u);
            }
            max
        })
    };
    let ops: Arc<Vec<(u8, u8)>> = Arc::new(ops.to_vec());
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (r, ops) = (r.clone(), ops.clone());
            std::thread::spawn(move || {
                let mut held = vec![];
                let mut legacy = 0u64;
                for (i, &(kind, units)) in ops.iter().enumerate().skip(t) {
                    let units = u64::from(units) % capacity + 1;
                    match kind.wrapping_add(i as u8) % 4 {
                        0 | 1 => {
                            if let Ok(p) = r.try_acquire_owned(units) {
                                held.push(p);
                            }
                        }
                        2 => {
                            if r.acquire_units(units).is_ok() {
                                legacy += units;
                            }
                        }
                        _ => {
                            if let Some(p) = held.pop() {
                                p.success();
                            }
                            let back = legacy.min(units);
                            r.release(back);
                            legacy -= back;
                        }
                    }
                    assert!(r.used() <= r.capacity());
                }
                drop(held);
                r.release(legacy);
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    assert_eq!(r.used(), 0, "every unit came back");
    let expected = CircuitStatus::Closed;
    assert_eq!(r.status().status, expected);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn used_stays_within_zero_and_capacity_under_random_concurrency(
        capacity in 1u64..40,
        threads in 2usize..5,
        ops in proptest::collection::vec((any::<u8>(), any::<u8>()), 50..400),
    ) {
        stress(capacity, threads, &ops);
    }

    #[test]
    fn single_thread_usage_matches_a_model(
        capacity in 1u64..20,
        ops in proptest::collection::vec((any::<bool>(), 1u64..8), 1..200),
    ) {
        let (m, _c) = manual();
        let r = register(&m, ResourceSettings::builder("r", ResourceType::Custom, capacity).open_on_usage(false));
        let mut model = 0u64;
        for (acquire, units) in ops {
            if acquire {
                let ok = r.acquire_units(units).is_ok();
                prop_assert_eq!(ok, model + units <= capacity);
                if ok { model += units; }
            } else {
                r.release(units);
                model = model.saturating_sub(units);
            }
            prop_assert_eq!(r.used(), model);
            prop_assert_eq!(r.status().available, capacity - model);
        }
    }
}
