//! Extreme but legal inputs: each is refused at scheduling time naming the field, or behaves;
//! none panics the scheduler or leaves an entry half-made.

mod support;

use std::time::Duration;

use architectlm_core::Error;
use architectlm_core::extensions::scheduler::{
    MAX_JITTER, RecurringTaskConfig, ScheduledTaskConfig, ScheduledTaskFilter, Scheduler,
    SchedulerEventType as T,
};
use serde_json::json;
use support::{Harness, secs, t0, wait_for};

const DAY: Duration = Duration::from_secs(86_400);

fn invalid_field(e: &Error) -> Option<&str> {
    match e {
        Error::InvalidConfig { field, .. } => Some(field),
        _ => None,
    }
}

#[tokio::test(start_paused = true)]
async fn a_jitter_past_the_limit_is_refused_by_name_and_one_at_the_limit_runs() {
    let h = Harness::start().await;
    for j in [
        Duration::MAX,
        Duration::from_secs(u64::MAX / 2),
        MAX_JITTER + Duration::from_millis(1),
    ] {
        let e = h
            .scheduler
            .schedule_recurring_task(
                RecurringTaskConfig::new("record", json!({}), "* * * * *").jitter(j),
            )
            .await
            .unwrap_err();
        assert_eq!(invalid_field(&e), Some("jitter"), "{e}");
        assert!(e.to_string().contains("30 days"), "{e}");
    }
    assert_eq!(
        h.scheduler
            .get_tasks(ScheduledTaskFilter::new())
            .await
            .unwrap()
            .total,
        0
    );

    // At the limit the entry is armed and listed; its run comes within the jitter.
    let mut ev = h.events();
    let id = h
        .scheduler
        .schedule_recurring_task(
            RecurringTaskConfig::new("record", json!({}), "0 0 1 * *").jitter(MAX_JITTER),
        )
        .await
        .unwrap();
    let page = h
        .scheduler
        .get_tasks(ScheduledTaskFilter::new())
        .await
        .unwrap();
    assert_eq!(page.items[0].id, id);
    wait_for(&mut ev, T::Completed, 1, 62 * DAY).await;
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn blank_task_ids_are_reported_as_written() {
    let h = Harness::start().await;
    for blank in ["", "   ", "\t"] {
        let e = h
            .scheduler
            .schedule_task(ScheduledTaskConfig::new(blank, json!({}), t0() + secs(1)))
            .await
            .unwrap_err();
        assert_eq!(invalid_field(&e), Some("task_id"), "{e}");
        assert!(e.to_string().contains(&format!("{blank:?}")), "{e}");
    }
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn times_at_the_calendars_edges_neither_panic_nor_run() {
    let h = Harness::start().await;
    let mut ev = h.events();
    // The last instant chrono can represent: accepted, listed, never due in this test.
    let far = chrono::DateTime::<chrono::Utc>::MAX_UTC;
    let id = h
        .scheduler
        .schedule_task(ScheduledTaskConfig::new("record", json!({}), far))
        .await
        .unwrap();
    assert!(h.scheduler.get_task(id).await.unwrap().is_some());
    assert!(h.scheduler.reschedule_task(id, far).await.unwrap());
    // The first instant: already past, so it runs now (a misfire decision, by policy).
    let past = chrono::DateTime::<chrono::Utc>::MIN_UTC;
    let old = h
        .scheduler
        .schedule_task(ScheduledTaskConfig::new("record", json!({}), past))
        .await
        .unwrap();
    let done = wait_for(&mut ev, T::Completed, 1, DAY).await;
    assert_eq!(done[0].scheduled_task_id, old);
    assert_eq!(h.seen("record").len(), 1);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_recurring_entry_starting_at_the_calendars_end_in_a_time_zone_is_refused_not_a_panic() {
    let h = Harness::start().await;
    let e = h
        .scheduler
        .schedule_recurring_task(
            RecurringTaskConfig::new("record", json!({}), "* * * * *")
                .timezone("Europe/Berlin")
                .start_at(chrono::DateTime::<chrono::Utc>::MAX_UTC),
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no future occurrence"), "{e}");
    assert_eq!(
        h.scheduler
            .get_tasks(ScheduledTaskFilter::new())
            .await
            .unwrap()
            .total,
        0
    );
    h.stop().await;
}
