//! Random and extreme settings: each resource builds and behaves under random calls and clock
//! jumps, or is refused naming the field; nothing panics and usage stays in `[0, capacity]`.

mod support;

use std::time::Duration;

use architectlm_core::Error;
use architectlm_core::extensions::loadmanager::{ResourceType, Thresholds};
use architectlm_loadmanager::{ResourceSettings, SlidingWindow};
use proptest::prelude::*;
use support::*;

fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        Just(Duration::ZERO),
        Just(Duration::from_nanos(1)),
        Just(Duration::MAX),
        (0u64..=u64::MAX).prop_map(Duration::from_secs),
        (0u64..100_000).prop_map(Duration::from_millis),
    ]
}

fn percent() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(0.0),
        Just(100.0),
        Just(-1.0),
        Just(f64::NAN),
        Just(f64::INFINITY),
        0.0..=100.0f64,
    ]
}

#[derive(Debug, Clone)]
enum Op {
    Call { units: u64, fail: bool },
    Advance(Duration),
    Set(u64),
    Reset,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u64..20, any::<bool>()).prop_map(|(units, fail)| Op::Call { units, fail }),
        duration().prop_map(Op::Advance),
        (0u64..=u64::MAX).prop_map(Op::Set),
        Just(Op::Reset),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn settings_build_and_behave_or_are_refused_naming_the_field(
        id in prop_oneof![Just(String::new()), Just(" ".to_owned()), Just("db-ü".to_owned()), "[a-z]{1,8}"],
        capacity in prop_oneof![Just(0u64), Just(1), Just(u64::MAX), 1u64..1000],
        (w, c, o) in (percent(), percent(), percent()),
        hysteresis in percent(),
        reset in duration(),
        backoff in prop_oneof![Just(1.0f64), Just(1e300), Just(0.5), Just(f64::NAN), 1.0..10.0f64],
        max_reset in duration(),
        window in prop_oneof![
            (0u32..50).prop_map(SlidingWindow::Count),
            duration().prop_map(SlidingWindow::Time),
        ],
        minimum_calls in 0u32..20,
        consecutive in prop_oneof![Just(None), (0u32..5).prop_map(Some)],
        trials in 0u32..4,
        ops in proptest::collection::vec(op(), 0..40),
    ) {
        let mut b = ResourceSettings::builder(id, ResourceType::Api, capacity)
            .thresholds(Thresholds::new(w, c, o))
            .hysteresis(hysteresis)
            .reset_timeout(reset)
            .reset_backoff(backoff, max_reset)
            .sliding_window(window)
            .minimum_calls(minimum_calls)
            .failure_rate_threshold(50.0)
            .half_open_trials(trials);
        if let Some(n) = consecutive {
            b = b.consecutive_failures(n);
        }
        let settings = match b.build() {
            Ok(s) => s,
            Err(Error::InvalidConfig { field, value, .. }) => {
                prop_assert!(!field.is_empty() && !value.is_empty());
                return Ok(());
            }
            Err(e) => return Err(TestCaseError::fail(format!("unexpected error kind: {e}"))),
        };
        let (m, clock) = manual();
        let r = m.register(settings).expect("registered");
        for op in ops {
            match op {
                Op::Call { units, fail } => {
                    if let Ok(p) = r.try_acquire(units) {
                        if fail { p.failure() } else { p.success() }
                    }
                }
                Op::Advance(d) => clock.advance(d),
                Op::Set(u) => r.set_usage(u),
                Op::Reset => r.reset(),
            }
            prop_assert!(r.used() <= capacity);
            let _ = r.status();
        }
    }
}
