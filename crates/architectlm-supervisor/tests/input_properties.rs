//! Random and extreme supervisor specs: each builds, starts, lets a crashing child restart and
//! shuts down without a panic, or is refused naming the field.

mod support;

use std::time::Duration;

use architectlm_core::Error;
use architectlm_supervisor::worker::{
    ChildSpec, Restart, RestartBackoff, RestartIntensity, Strategy as TreeStrategy, SupervisorSpec,
};
use proptest::prelude::*;

fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        Just(Duration::ZERO),
        Just(Duration::from_nanos(1)),
        Just(Duration::MAX),
        (0u64..=u64::MAX).prop_map(Duration::from_secs),
        (0u64..10_000).prop_map(Duration::from_millis),
    ]
}

fn float() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(0.0),
        Just(1.0),
        Just(-1.0),
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(1e300),
        0.0..4.0f64
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn specs_build_and_run_or_are_refused_naming_the_field(
        name in prop_oneof![Just(String::new()), Just(" ".to_owned()), Just("wächter".to_owned()), "[a-z]{1,6}"],
        child in prop_oneof![Just(String::new()), Just("\t".to_owned()), "[a-z]{1,6}"],
        strategy in prop_oneof![Just(TreeStrategy::OneForOne), Just(TreeStrategy::OneForAll), Just(TreeStrategy::RestForOne)],
        // Bounded: an always-crashing child with no backoff and no intensity limit restarts
        // forever at one instant, as in OTP.
        restarts in 0u32..10,
        period in duration(),
        initial in duration(),
        max in duration(),
        factor in float(),
        jitter in float(),
        // At least a millisecond: a silent worker with a nanosecond heartbeat is cancelled and
        // restarted at every virtual nanosecond, which would take this test forever.
        heartbeat in prop_oneof![Just(None), (1u64..10_000).prop_map(|ms| Some(Duration::from_millis(ms))), Just(Some(Duration::MAX))],
        shutdown in prop_oneof![Just(None), duration().prop_map(Some)],
    ) {
        let mut c = ChildSpec::worker(child, |_ctx| async { Err("crash".into()) })
            .restart(Restart::Permanent)
            .backoff(RestartBackoff::exponential(initial, max).factor(factor).jitter(jitter));
        if let Some(h) = heartbeat { c = c.heartbeat(h); }
        if let Some(s) = shutdown { c = c.shutdown_timeout(s); }
        let built = SupervisorSpec::builder(name)
            .strategy(strategy)
            .intensity(RestartIntensity::new(restarts, period))
            .child(c)
            .child(ChildSpec::worker("idle", |ctx| async move { ctx.cancelled().await; Ok(()) }))
            .build();
        match built {
            Ok(spec) => {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
                rt.block_on(async {
                    let handle = spec.start();
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    let _ = handle.children().await;
                    let _ = tokio::time::timeout(Duration::from_secs(3600), handle.shutdown()).await;
                });
            }
            Err(Error::InvalidConfig { field, value, .. }) => {
                prop_assert!(!field.is_empty() && !value.is_empty());
            }
            Err(e) => prop_assert!(false, "unexpected error kind: {e}"),
        }
    }
}
