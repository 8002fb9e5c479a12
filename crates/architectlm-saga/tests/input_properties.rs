//! Random and extreme coordinator settings and saga definitions: each builds (and a saga then
//! runs to an end) or is refused naming the field; nothing panics.

mod support;

use std::time::Duration;

use architectlm_core::Error;
use architectlm_core::RetryPolicy;
use architectlm_core::extensions::SagaCoordinator;
use architectlm_core::extensions::saga::{SagaDefinition, SagaStep};
use architectlm_saga::Coordinator;
use proptest::prelude::*;
use serde_json::json;
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

fn names() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("  ".to_owned()),
        Just("bestellung-prüfen".to_owned()),
        Just("注文".to_owned()),
        "[a-z]{1,8}",
    ]
}

fn refused_by_name(e: &Error) -> bool {
    match e {
        Error::InvalidConfig { field, .. } => !field.is_empty(),
        Error::Definition(m) | Error::InvalidInput(m) => !m.is_empty(),
        _ => false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn coordinator_settings_build_or_are_refused_naming_the_field(
        node in prop_oneof![Just(None), names().prop_map(Some)],
        lease in duration(),
        takeover in prop_oneof![Just(None), duration().prop_map(Some)],
        shutdown in duration(),
        events in prop_oneof![Just(0usize), Just(1), 1usize..5_000],
        in_flight in prop_oneof![Just(None), (0usize..20).prop_map(Some)],
    ) {
        let mut b = Coordinator::builder()
            .lease_duration(lease)
            .shutdown_timeout(shutdown)
            .event_capacity(events);
        if let Some(n) = node { b = b.node_id(n); }
        if let Some(t) = takeover { b = b.takeover_interval(t); }
        if let Some(n) = in_flight { b = b.max_in_flight(n); }
        match b.build() {
            Ok(_) => {}
            Err(e) => prop_assert!(refused_by_name(&e), "unexpected error kind: {e}"),
        }
    }

    #[test]
    fn definitions_run_to_an_end_or_are_refused_naming_what_is_wrong(
        id in names(),
        steps in proptest::collection::vec((names(), any::<bool>(), prop_oneof![Just(None), duration().prop_map(Some)]), 0..4),
        timeout in prop_oneof![Just(None), duration().prop_map(Some)],
        attempts in prop_oneof![Just(0u32), Just(1), 2u32..4],
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
        rt.block_on(async {
            let log = Log::default();
            let mut def = SagaDefinition::new(id.clone());
            for (sid, fails, t) in &steps {
                let mut s = SagaStep::task(sid.clone(), if *fails { "fail" } else { "step1" })
                    .compensate_with("undo1")
                    .retry(RetryPolicy::attempts(attempts));
                if let Some(t) = t { s = s.timeout(*t); }
                def = def.step(s);
            }
            if let Some(t) = timeout { def = def.timeout(t); }
            let sagas = Coordinator::in_memory();
            let _rt = runtime(
                system(vec![ok_task("step1", &log), failing_task("fail", &log), ok_task("undo1", &log)]),
                &sagas,
            )
            .await;
            match sagas.define_saga(def).await {
                Ok(()) => {
                    let started = sagas.start_saga(&id, json!({"n": 1})).await;
                    match started {
                        Ok(i) => {
                            let end = sagas.wait_for(i.id, Duration::from_secs(86_400)).await;
                            prop_assert!(end.is_ok(), "{end:?}");
                        }
                        Err(e) => prop_assert!(refused_by_name(&e), "{e}"),
                    }
                }
                Err(e) => prop_assert!(refused_by_name(&e), "unexpected error kind: {e}"),
            }
            Ok(())
        })?;
    }
}
