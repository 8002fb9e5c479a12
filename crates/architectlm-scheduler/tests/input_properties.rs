//! Random and extreme schedule configurations through the public API: each is scheduled and
//! then fires (or not) without a panic, or is refused naming the field; a refused one leaves
//! nothing behind.

mod support;

use std::time::Duration;

use architectlm_core::Error;
use architectlm_core::extensions::scheduler::{
    MisfirePolicy, OverlapPolicy, RecurringTaskConfig, SchedulePolicy, ScheduledTaskConfig,
    ScheduledTaskFilter, Scheduler,
};
use chrono::{DateTime, Utc};
use proptest::prelude::*;
use serde_json::json;
use support::{Harness, t0};

fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        Just(Duration::ZERO),
        Just(Duration::MAX),
        (0u64..=u64::MAX).prop_map(Duration::from_secs),
        (0u64..600_000).prop_map(Duration::from_millis),
    ]
}

fn time() -> impl Strategy<Value = Option<DateTime<Utc>>> {
    prop_oneof![
        Just(None),
        Just(Some(DateTime::<Utc>::MAX_UTC)),
        Just(Some(DateTime::<Utc>::MIN_UTC)),
        (-86_400i64 * 400..86_400 * 400).prop_map(|s| Some(t0() + chrono::Duration::seconds(s))),
    ]
}

fn policy() -> impl Strategy<Value = SchedulePolicy> {
    (
        prop_oneof![
            Just(MisfirePolicy::Skip),
            Just(MisfirePolicy::FireOnce),
            (0u32..5).prop_map(|max| MisfirePolicy::FireAll { max }),
        ],
        duration(),
        prop_oneof![
            Just(OverlapPolicy::Skip),
            Just(OverlapPolicy::Allow),
            Just(OverlapPolicy::QueueOne)
        ],
        prop_oneof![Just(None), (0u32..4).prop_map(Some)],
    )
        .prop_map(|(m, t, o, c)| {
            let mut p = SchedulePolicy::default()
                .misfire(m)
                .misfire_threshold(t)
                .overlap(o);
            if let Some(c) = c {
                p = p.max_concurrent(c);
            }
            p
        })
}

fn field_of(e: &Error) -> Option<String> {
    match e {
        Error::InvalidConfig { field, .. } => Some(field.clone()),
        Error::NotFound { kind, .. } => Some((*kind).to_owned()),
        Error::InvalidInput(m) | Error::Definition(m) => Some(m.clone()),
        _ => None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn recurring_configs_schedule_and_fire_or_are_refused_naming_the_field(
        pattern in prop_oneof![
            Just("* * * * *".to_owned()),
            Just("*/5 * * * * *".to_owned()),
            Just("0 0 29 2 *".to_owned()),
            Just("".to_owned()),
            Just("61 * * * *".to_owned()),
            "[0-9*/ ,-]{0,14}",
        ],
        timezone in prop_oneof![Just(None), Just(Some("Europe/Berlin".to_owned())), Just(Some("Mars/Olympus".to_owned())), Just(Some(String::new()))],
        start in time(),
        end in time(),
        max in prop_oneof![Just(None), (0u32..4).prop_map(Some)],
        jitter in prop_oneof![Just(None), duration().prop_map(Some)],
        policy in policy(),
        advance in (0u64..3_600).prop_map(Duration::from_secs),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
        rt.block_on(async {
            let h = Harness::start().await;
            let mut c = RecurringTaskConfig::new("record", json!({"p": pattern.clone()}), pattern.clone()).policy(policy);
            if let Some(tz) = timezone { c = c.timezone(tz); }
            if let Some(s) = start { c = c.start_at(s); }
            if let Some(e) = end { c = c.end_at(e); }
            if let Some(m) = max { c = c.max_executions(m); }
            if let Some(j) = jitter { c = c.jitter(j); }
            let listed = match h.scheduler.schedule_recurring_task(c).await {
                Ok(id) => {
                    tokio::time::advance(advance).await;
                    let t = h.scheduler.get_task(id).await.unwrap().expect("listed");
                    prop_assert_eq!(t.id, id);
                    1
                }
                Err(e) => {
                    prop_assert!(field_of(&e).is_some(), "unexpected error kind: {e}");
                    0
                }
            };
            let page = h.scheduler.get_tasks(ScheduledTaskFilter::new()).await.unwrap();
            prop_assert_eq!(page.total, listed);
            h.stop().await;
            Ok(())
        })?;
    }

    #[test]
    fn one_shot_configs_schedule_or_are_refused_naming_the_field(
        task in prop_oneof![Just("record".to_owned()), Just("".to_owned()), Just(" ".to_owned()), Just("nope".to_owned())],
        at in time(),
        policy in policy(),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
        rt.block_on(async {
            let h = Harness::start().await;
            let at = at.unwrap_or_else(t0);
            match h.scheduler.schedule_task(ScheduledTaskConfig::new(task.clone(), json!({}), at).policy(policy)).await {
                Ok(id) => prop_assert!(h.scheduler.get_task(id).await.unwrap().is_some()),
                Err(e) => prop_assert!(field_of(&e).is_some(), "unexpected error kind: {e}"),
            }
            h.stop().await;
            Ok(())
        })?;
    }
}
