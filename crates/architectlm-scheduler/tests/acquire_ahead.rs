//! Runs acquired ahead of their time (on a paused clock): claimed up to `acquire_ahead` early,
//! started exactly at their time, stopped by a cancel or held by a pause in between, and never
//! skipped as an overlap because a previous run was still going when they were acquired.

mod support;

use std::time::Duration;

use architectlm_core::extensions::scheduler::{
    OverlapPolicy, RecurringTaskConfig, SchedulePolicy, ScheduledTaskConfig, ScheduledTaskStatus,
    Scheduler, SchedulerEventType as T,
};
use architectlm_store::schedule::RunState;
use serde_json::json;
use support::{Harness, secs, settle, t0, wait_for};

const DAY: Duration = Duration::from_secs(86_400);

/// Advances the paused clock to `ms` milliseconds after [`t0`] and lets every task react.
async fn advance_to(h: &Harness, ms: i64) {
    use architectlm_scheduler::Clock;
    let now = h.clock.now();
    let at = t0() + chrono::Duration::milliseconds(ms);
    if let Ok(d) = (at - now).to_std() {
        tokio::time::advance(d).await;
    }
    settle().await;
}

#[tokio::test(start_paused = true)]
async fn a_run_is_claimed_ahead_of_its_time_and_starts_exactly_at_it() {
    let h = Harness::start().await;
    let mut ev = h.events();
    let due = t0() + secs(10);
    let id = h
        .scheduler
        .schedule_task(ScheduledTaskConfig::new("record", json!(1), due))
        .await
        .unwrap();
    advance_to(&h, 9_950).await;
    // Acquired: claimed in the store, counted as running, but not started.
    assert!(h.seen("record").is_empty(), "started 50 ms early");
    let task = h.scheduler.get_task(id).await.unwrap().unwrap();
    assert_eq!(task.status, ScheduledTaskStatus::Running);
    assert_eq!(task.execution_count, 1);
    let runs = h.store.runs(id).await.unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].state, RunState::Claimed);
    assert_eq!(runs[0].due_at, due);
    wait_for(&mut ev, T::Completed, 1, DAY).await;
    let seen = h.seen("record");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].at, due, "started at its time, not before or after");
    let started = wait_for(&mut ev, T::Started, 1, DAY).await;
    assert_eq!(started[0].payload["started_at"], json!(due));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn cancelling_an_acquired_run_before_its_time_stops_it_and_closes_its_claim() {
    let h = Harness::start().await;
    let mut ev = h.events();
    let due = t0() + secs(10);
    let id = h
        .scheduler
        .schedule_task(ScheduledTaskConfig::new("record", json!(1), due))
        .await
        .unwrap();
    advance_to(&h, 9_950).await;
    assert_eq!(
        h.store.runs(id).await.unwrap()[0].state,
        RunState::Claimed,
        "acquired before the cancel"
    );
    assert!(h.scheduler.cancel_task(id).await.unwrap());
    wait_for(&mut ev, T::Cancelled, 1, DAY).await;
    advance_to(&h, 20_000).await;
    assert!(h.seen("record").is_empty(), "a cancelled run started");
    let runs = h.store.runs(id).await.unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].state, RunState::Failed);
    assert_eq!(
        runs[0].error.as_deref(),
        Some("cancelled before it started")
    );
    let task = h.scheduler.get_task(id).await.unwrap().unwrap();
    assert_eq!(task.status, ScheduledTaskStatus::Cancelled);
    assert!(h.store.unfinished_runs().await.unwrap().is_empty());
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn pausing_an_acquired_run_holds_it_until_the_resume() {
    let h = Harness::start().await;
    let mut ev = h.events();
    let due = t0() + secs(10);
    let id = h
        .scheduler
        .schedule_task(ScheduledTaskConfig::new("record", json!(1), due))
        .await
        .unwrap();
    advance_to(&h, 9_950).await;
    assert!(h.scheduler.pause_task(id).await.unwrap());
    advance_to(&h, 15_000).await;
    assert!(h.seen("record").is_empty(), "a paused run started");
    assert_eq!(
        h.scheduler.get_task(id).await.unwrap().unwrap().status,
        ScheduledTaskStatus::Paused
    );
    assert!(h.scheduler.resume_task(id).await.unwrap());
    wait_for(&mut ev, T::Completed, 1, DAY).await;
    let seen = h.seen("record");
    assert_eq!(seen.len(), 1, "ran once, at the resume");
    assert_eq!(seen[0].at, t0() + secs(15));
    let runs = h.store.runs(id).await.unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].state, RunState::Completed);
    assert_eq!(
        h.scheduler.get_task(id).await.unwrap().unwrap().status,
        ScheduledTaskStatus::Completed
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_run_ending_just_before_the_next_is_due_is_no_overlap() {
    let h = Harness::start().await;
    let mut ev = h.events();
    // Every 2 s; a run that is still going when the next would be skipped.
    let id = h
        .scheduler
        .schedule_recurring_task(
            RecurringTaskConfig::new("slow", json!({}), "*/2 * * * * *")
                .max_executions(2)
                .policy(SchedulePolicy::default().overlap(OverlapPolicy::Skip)),
        )
        .await
        .unwrap();
    wait_for(&mut ev, T::Started, 1, DAY).await;
    assert_eq!(h.seen("slow")[0].at, t0() + secs(2));
    // The run at 4 s is looked at 100 ms ahead, while the first still goes; the first ends
    // 50 ms before 4 s.
    advance_to(&h, 3_950).await;
    assert_eq!(h.seen("slow").len(), 1);
    h.gate.add_permits(1);
    wait_for(&mut ev, T::Completed, 1, DAY).await;
    wait_for(&mut ev, T::Started, 1, Duration::from_secs(1)).await;
    let seen = h.seen("slow");
    assert_eq!(seen.len(), 2, "the run at 4 s was skipped as an overlap");
    assert_eq!(seen[1].at, t0() + secs(4));
    h.gate.add_permits(1);
    wait_for(&mut ev, T::Completed, 1, DAY).await;
    let task = h.scheduler.get_task(id).await.unwrap().unwrap();
    assert_eq!(task.execution_count, 2);
    assert_eq!(task.status, ScheduledTaskStatus::Completed);
    assert_eq!(task.history.len(), 2);
    assert!(
        !ev.log().iter().any(|e| e.event_type == T::Misfired),
        "nothing was skipped or late"
    );
    h.stop().await;
}
