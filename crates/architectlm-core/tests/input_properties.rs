//! Random and extreme inputs to the core's builders and JSON checks: each builds and behaves,
//! or is refused with an error naming the field; nothing panics.

use std::time::Duration;

use architectlm_core::json::{MAX_JSON_DEPTH, check_depth};
use architectlm_core::{Backoff, Error, ExtensionsConfig, RetryPolicy, TaskDefinition};
use proptest::prelude::*;
use serde_json::{Value, json};

/// Durations with the edges over-represented: zero, one nanosecond, `MAX`, and anything.
fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        Just(Duration::ZERO),
        Just(Duration::from_nanos(1)),
        Just(Duration::MAX),
        Just(Duration::from_secs(u64::MAX)),
        (0u64..=u64::MAX, 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
        (0u64..100_000).prop_map(Duration::from_millis),
    ]
}

fn float() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(0.0),
        Just(1.0),
        Just(-1.0),
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::MAX),
        Just(1e300),
        -10.0..10.0f64,
    ]
}

fn nested(depth: usize, leaf: Value, objects: bool) -> Value {
    let mut v = leaf;
    for i in 0..depth {
        v = if objects && i % 2 == 1 {
            json!({ "k": v })
        } else {
            json!([v])
        };
    }
    v
}

fn names() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("   ".to_owned()),
        Just("\t\n".to_owned()),
        Just("zahlung-prüfen".to_owned()),
        Just("注文".to_owned()),
        "[a-z]{1,12}",
        ".{0,20}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn a_retry_policy_validates_or_names_its_field_and_its_delays_never_panic(
        attempts in prop_oneof![Just(0u32), Just(1), Just(u32::MAX), 0u32..20],
        initial in duration(),
        max in duration(),
        factor in float(),
        jitter in float(),
        backoff in prop_oneof![Just(Backoff::Fixed), Just(Backoff::Linear), Just(Backoff::Exponential)],
        attempt in prop_oneof![Just(0u32), Just(u32::MAX), 0u32..2_000],
    ) {
        let p = RetryPolicy::attempts(attempts)
            .with_backoff(backoff)
            .with_initial_delay(initial)
            .with_max_delay(max)
            .with_factor(factor)
            .with_jitter(jitter);
        match p.validate() {
            Ok(()) => {
                let d = p.delay(attempt);
                prop_assert!(d <= max, "{d:?} above the cap {max:?}");
                prop_assert!(p.base_delay(attempt) <= max);
            }
            Err(Error::InvalidConfig { field, .. }) => prop_assert!(field.starts_with("retry.")),
            Err(e) => prop_assert!(false, "unexpected error kind: {e}"),
        }
    }

    #[test]
    fn a_value_is_accepted_exactly_when_it_is_within_the_depth_limit_and_then_reads_back(
        depth in prop_oneof![0usize..8, (MAX_JSON_DEPTH - 2)..(MAX_JSON_DEPTH + 3), 120usize..300],
        objects in any::<bool>(),
        leaf in prop_oneof![Just(json!(null)), Just(json!("ü")), Just(json!(1.5)), Just(json!([]))],
    ) {
        let v = nested(depth, leaf, objects);
        let ok = check_depth(&v, "input").is_ok();
        // An empty container as the leaf adds no level.
        prop_assert_eq!(ok, depth <= MAX_JSON_DEPTH);
        if ok {
            // Inside a record a few levels deep it still reads back.
            let text = serde_json::to_string(&json!({"a": {"b": {"c": v}}})).unwrap();
            prop_assert!(serde_json::from_str::<Value>(&text).is_ok());
        } else {
            let msg = check_depth(&v, "saga input").unwrap_err().to_string();
            prop_assert!(msg.contains("saga input") && msg.contains(&MAX_JSON_DEPTH.to_string()));
        }
    }

    #[test]
    fn a_task_id_builds_or_is_refused_quoting_it(id in names()) {
        match TaskDefinition::new(id.clone(), |i, _c| async move { Ok(i) }) {
            Ok(t) => prop_assert!(!t.id.trim().is_empty()),
            Err(e) => {
                prop_assert!(id.trim().is_empty());
                prop_assert!(e.to_string().contains(&format!("{id:?}")), "{e}");
            }
        }
    }

    #[test]
    fn extensions_config_json_is_read_or_refused_naming_the_key(
        key in prop_oneof![
            Just("scheduler".to_owned()),
            Just("saga-coordinator".to_owned()),
            Just("load_manager".to_owned()),
            "[a-z_-]{1,16}",
        ],
        on in any::<bool>(),
    ) {
        let text = json!({ key.clone(): on }).to_string();
        match serde_json::from_str::<ExtensionsConfig>(&text) {
            Ok(c) => prop_assert!(c == ExtensionsConfig::none() || on),
            Err(e) => prop_assert!(e.to_string().contains(&key), "{e}"),
        }
    }
}
