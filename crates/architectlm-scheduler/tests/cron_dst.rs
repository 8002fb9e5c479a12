//! Cron golden cases across daylight-saving changes in Europe/Berlin and America/New_York, a
//! property test against croner's own iteration, and the scheduler firing across a DST change.

mod support;

use std::time::Duration;

use architectlm_core::extensions::scheduler::{
    RecurringTaskConfig, Scheduler, SchedulerEventType as T,
};
use architectlm_scheduler::CronSchedule;
use architectlm_store::schedule::InMemoryScheduleStore;
use chrono::{DateTime, TimeZone, Utc};
use proptest::prelude::*;
use serde_json::json;
use std::sync::Arc;
use support::{Harness, wait_for};

fn utc(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .unwrap_or_else(|e| panic!("{s}: {e}"))
        .with_timezone(&Utc)
}

fn runs(pattern: &str, tz: &str, after: &str, n: usize) -> Vec<DateTime<Utc>> {
    CronSchedule::new(pattern, Some(tz))
        .unwrap_or_else(|e| panic!("{e}"))
        .upcoming(utc(after), n)
}

fn all(v: &[&str]) -> Vec<DateTime<Utc>> {
    v.iter().map(|s| utc(s)).collect()
}

#[test]
fn berlin_spring_forward() {
    // 2026-03-29 02:00 CET jumps to 03:00 CEST (01:00 UTC).
    assert_eq!(
        runs("30 2 * * *", "Europe/Berlin", "2026-03-27T12:00:00Z", 3),
        all(&[
            "2026-03-28T01:30:00Z",
            "2026-03-29T01:00:00Z",
            "2026-03-30T00:30:00Z"
        ]),
        "a fixed time inside the gap runs right after it, at 03:00 CEST"
    );
    assert_eq!(
        runs("*/30 * * * *", "Europe/Berlin", "2026-03-29T00:15:00Z", 3),
        all(&[
            "2026-03-29T00:30:00Z",
            "2026-03-29T01:00:00Z",
            "2026-03-29T01:30:00Z"
        ]),
        "an interval skips the wall-clock times inside the gap"
    );
}

#[test]
fn berlin_fall_back() {
    // 2026-10-25 03:00 CEST falls back to 02:00 CET (01:00 UTC): 02:00-02:59 happens twice.
    assert_eq!(
        runs("30 2 * * *", "Europe/Berlin", "2026-10-24T12:00:00Z", 2),
        all(&["2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"]),
        "a fixed time in the repeated hour runs once, on the first pass"
    );
    assert_eq!(
        runs("*/30 * * * *", "Europe/Berlin", "2026-10-24T23:45:00Z", 5),
        all(&[
            "2026-10-25T00:00:00Z",
            "2026-10-25T00:30:00Z",
            "2026-10-25T01:00:00Z",
            "2026-10-25T01:30:00Z",
            "2026-10-25T02:00:00Z",
        ]),
        "an interval runs on both passes of the repeated hour"
    );
}

#[test]
fn new_york_spring_forward() {
    // 2026-03-08 02:00 EST jumps to 03:00 EDT (07:00 UTC).
    assert_eq!(
        runs("30 2 * * *", "America/New_York", "2026-03-06T12:00:00Z", 3),
        all(&[
            "2026-03-07T07:30:00Z",
            "2026-03-08T07:00:00Z",
            "2026-03-09T06:30:00Z"
        ]),
    );
    assert_eq!(
        runs(
            "*/20 * * * *",
            "America/New_York",
            "2026-03-08T06:45:00Z",
            2
        ),
        all(&["2026-03-08T07:00:00Z", "2026-03-08T07:20:00Z"]),
    );
}

#[test]
fn new_york_fall_back() {
    // 2026-11-01 02:00 EDT falls back to 01:00 EST (06:00 UTC): 01:00-01:59 happens twice.
    assert_eq!(
        runs("30 1 * * *", "America/New_York", "2026-10-31T12:00:00Z", 2),
        all(&["2026-11-01T05:30:00Z", "2026-11-02T06:30:00Z"]),
    );
    assert_eq!(
        runs(
            "*/30 * * * *",
            "America/New_York",
            "2026-11-01T04:45:00Z",
            5
        ),
        all(&[
            "2026-11-01T05:00:00Z",
            "2026-11-01T05:30:00Z",
            "2026-11-01T06:00:00Z",
            "2026-11-01T06:30:00Z",
            "2026-11-01T07:00:00Z",
        ]),
    );
}

#[test]
fn extended_syntax_last_weekday_nth_and_nicknames() {
    // Last day of the month at noon UTC.
    assert_eq!(
        runs("0 12 L * *", "UTC", "2026-01-15T00:00:00Z", 2),
        all(&["2026-01-31T12:00:00Z", "2026-02-28T12:00:00Z"])
    );
    // Nearest weekday to the 15th: 2026-02-15 is a Sunday, so Monday the 16th.
    assert_eq!(
        runs("0 9 15W * *", "UTC", "2026-02-01T00:00:00Z", 1),
        all(&["2026-02-16T09:00:00Z"])
    );
    // Second Monday of the month.
    assert_eq!(
        runs("0 9 * * MON#2", "UTC", "2026-01-01T00:00:00Z", 2),
        all(&["2026-01-12T09:00:00Z", "2026-02-09T09:00:00Z"])
    );
    // Seconds (6 fields) and year (7 fields).
    assert_eq!(
        runs("15 0 0 1 1 * 2028", "UTC", "2026-01-01T00:00:00Z", 1),
        all(&["2028-01-01T00:00:15Z"])
    );
    assert_eq!(
        runs("@daily", "Europe/Berlin", "2026-06-01T12:00:00Z", 1),
        all(&["2026-06-01T22:00:00Z"])
    );
}

#[tokio::test(start_paused = true)]
async fn the_scheduler_fires_across_spring_forward_in_berlin() {
    let h = Harness::start_with(
        Arc::new(InMemoryScheduleStore::new()),
        utc("2026-03-28T00:00:00Z"),
    )
    .await;
    let mut ev = h.events();
    h.scheduler
        .schedule_recurring_task(
            RecurringTaskConfig::new("record", json!({}), "30 2 * * *")
                .timezone("Europe/Berlin")
                .max_executions(3),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    wait_for(&mut ev, T::Completed, 3, Duration::from_secs(4 * 86_400)).await;
    let at: Vec<_> = h.seen("record").iter().map(|s| s.at).collect();
    assert_eq!(
        at,
        all(&[
            "2026-03-28T01:30:00Z",
            "2026-03-29T01:00:00Z",
            "2026-03-30T00:30:00Z"
        ])
    );
    h.stop().await;
}

fn field(lo: u32, hi: u32) -> impl Strategy<Value = String> {
    prop_oneof![
        Just("*".to_owned()),
        (1..=((hi - lo) / 2).max(1)).prop_map(|n| format!("*/{n}")),
        (lo..=hi).prop_map(|a| a.to_string()),
        (lo..=hi, lo..=hi).prop_map(|(a, b)| format!("{}-{}", a.min(b), a.max(b))),
        (lo..=hi, lo..=hi).prop_map(|(a, b)| if a == b {
            a.to_string()
        } else {
            format!("{a},{b}")
        }),
    ]
}

fn pattern() -> impl Strategy<Value = String> {
    let dom = prop_oneof![
        4 => field(1, 28),
        1 => Just("L".to_owned()),
        1 => (1u32..=28).prop_map(|d| format!("{d}W")),
    ];
    let dow = prop_oneof![
        4 => Just("*".to_owned()),
        2 => field(0, 6),
        1 => (0u32..=6, 1u32..=4).prop_map(|(d, n)| format!("{d}#{n}")),
    ];
    (
        proptest::option::of(field(0, 59)),
        field(0, 59),
        field(0, 23),
        dom,
        field(1, 12),
        dow,
    )
        .prop_map(|(s, mi, h, dom, mo, dow)| match s {
            Some(s) => format!("{s} {mi} {h} {dom} {mo} {dow}"),
            None => format!("{mi} {h} {dom} {mo} {dow}"),
        })
}

const ZONES: &[&str] = &[
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Australia/Lord_Howe",
    "Asia/Kolkata",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn the_fire_sequence_increases_strictly_and_equals_croners_iteration(
        p in pattern(),
        zone in 0..ZONES.len(),
        start in 1_760_000_000i64..1_900_000_000i64,
    ) {
        let tz: chrono_tz::Tz = ZONES[zone].parse().unwrap_or(chrono_tz::Tz::UTC);
        let ours = CronSchedule::new(&p, Some(ZONES[zone])).unwrap_or_else(|e| panic!("{p}: {e}"));
        let start = Utc.timestamp_opt(start, 0).single().unwrap_or_default();
        let got = ours.upcoming(start, 12);
        let cron: croner::Cron = p.parse().unwrap_or_else(|e| panic!("{p}: {e}"));
        let want: Vec<DateTime<Utc>> = cron
            .iter_after(start.with_timezone(&tz))
            .take(12)
            .map(|d| d.with_timezone(&Utc))
            .collect();
        prop_assert_eq!(&got, &want, "pattern {} in {}", p, ZONES[zone]);
        prop_assert!(got.first().is_none_or(|f| *f > start));
        prop_assert!(got.windows(2).all(|w| w[0] < w[1]), "not increasing: {:?}", got);
    }
}
