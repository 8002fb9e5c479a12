//! One-shot and recurring runs on a paused clock: timing, events, policies, queries, errors and
//! recovery after a restart.

mod support;

use std::sync::Arc;
use std::time::Duration;

use architectlm_core::Error;
use architectlm_core::RetryPolicy;
use architectlm_core::extensions::scheduler::{
    MisfirePolicy, OverlapPolicy, RecurringTaskConfig, SchedulePolicy, ScheduledTaskConfig,
    ScheduledTaskFilter, ScheduledTaskStatus, Scheduler, SchedulerEventType as T,
};
use architectlm_scheduler::Clock;
use architectlm_store::schedule::{InMemoryScheduleStore, RunState, ScheduleStore};
use serde_json::json;
use support::{Harness, secs, settle, t0, wait_for};

const DAY: Duration = Duration::from_secs(86_400);

#[tokio::test(start_paused = true)]
async fn a_one_shot_runs_its_task_with_its_input_at_its_time_and_records_the_result() {
    let h = Harness::start().await;
    let mut ev = h.events();
    let due = t0() + secs(90);
    let id = h
        .scheduler
        .schedule_task(
            ScheduledTaskConfig::new("record", json!({"n": 1}), due).description("hello"),
        )
        .await
        .unwrap();
    let scheduled = wait_for(&mut ev, T::Scheduled, 1, DAY).await;
    assert_eq!(scheduled[0].scheduled_task_id, id);
    let done = wait_for(&mut ev, T::Completed, 1, DAY).await;
    assert_eq!(done[0].payload["result"], json!({"echo": {"n": 1}}));
    let seen = h.seen("record");
    assert_eq!(seen.len(), 1);
    assert!(seen[0].at >= due, "ran early: {} < {due}", seen[0].at);
    assert!(seen[0].at - due < chrono::Duration::milliseconds(5));
    assert_eq!(seen[0].input, json!({"n": 1}));
    assert_eq!(
        seen[0].key.as_deref(),
        Some(format!("{id}@{}", due.to_rfc3339()).as_str())
    );
    // The task learns its entry and occurrence without parsing the key.
    assert_eq!(seen[0].origin, Some((id, due)));
    let task = h.scheduler.get_task(id).await.unwrap().unwrap();
    assert_eq!(task.status, ScheduledTaskStatus::Completed);
    assert_eq!(task.result, Some(json!({"echo": {"n": 1}})));
    assert_eq!(task.execution_count, 1);
    assert_eq!(task.remaining_executions, Some(0));
    assert_eq!(task.next_execution_at, None);
    assert_eq!(task.history.len(), 1);
    assert_eq!(task.history[0].due_at, due);
    assert_eq!(h.scheduler.armed_timers(), 0);
    // The run is in the store's ledger as completed.
    let runs = h.store.runs(id).await.unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].state, RunState::Completed);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn scheduler_events_also_reach_the_runtime_bus() {
    let h = Harness::start().await;
    let mut bus = h.runtime.subscribe("completed");
    h.scheduler
        .schedule_task(ScheduledTaskConfig::new("record", json!(1), t0() + secs(1)))
        .await
        .unwrap();
    let e = tokio::time::timeout(DAY, bus.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(e.source, "scheduler");
    assert_eq!(e.payload["type"], "completed");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_past_execute_at_runs_at_once_and_is_not_a_misfire() {
    let h = Harness::start().await;
    let mut ev = h.events();
    let past = t0() - secs(3600);
    let id = h
        .scheduler
        .schedule_task(ScheduledTaskConfig::new("record", json!({}), past))
        .await
        .unwrap();
    wait_for(&mut ev, T::Completed, 1, Duration::from_secs(1)).await;
    let task = h.scheduler.get_task(id).await.unwrap().unwrap();
    assert_eq!(task.status, ScheduledTaskStatus::Completed);
    assert_eq!(task.history[0].due_at, past);
    assert!(h.clock.now() - t0() < chrono::Duration::milliseconds(10));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_failing_run_is_retried_by_policy_then_recorded_as_failed() {
    let h = Harness::start().await;
    let mut ev = h.events();
    let policy = SchedulePolicy::default()
        .retry(RetryPolicy::attempts(3).with_initial_delay(Duration::from_millis(10)));
    let id = h
        .scheduler
        .schedule_task(ScheduledTaskConfig::new("fail", json!({}), t0() + secs(5)).policy(policy))
        .await
        .unwrap();
    let failed = wait_for(&mut ev, T::Failed, 1, DAY).await;
    assert_eq!(failed[0].payload["error"], "boom");
    assert_eq!(h.seen("fail").len(), 3);
    let task = h.scheduler.get_task(id).await.unwrap().unwrap();
    assert_eq!(task.status, ScheduledTaskStatus::Failed);
    assert_eq!(task.error.as_deref(), Some("boom"));
    assert_eq!(task.history[0].attempts, 3);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_recurring_entry_fires_on_its_pattern_until_max_executions() {
    let h = Harness::start().await;
    let mut ev = h.events();
    let id = h
        .scheduler
        .schedule_recurring_task(
            RecurringTaskConfig::new("record", json!({}), "*/10 * * * * *").max_executions(3),
        )
        .await
        .unwrap();
    wait_for(&mut ev, T::Completed, 3, DAY).await;
    let at: Vec<_> = h.seen("record").iter().map(|s| s.at).collect();
    assert_eq!(at, vec![t0() + secs(10), t0() + secs(20), t0() + secs(30)]);
    let task = h.scheduler.get_task(id).await.unwrap().unwrap();
    assert_eq!(task.status, ScheduledTaskStatus::Completed);
    assert_eq!(task.remaining_executions, Some(0));
    assert_eq!(task.next_execution_at, None);
    assert_eq!(h.scheduler.armed_timers(), 0);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn start_at_and_end_at_bound_the_runs() {
    let h = Harness::start().await;
    let mut ev = h.events();
    let id = h
        .scheduler
        .schedule_recurring_task(
            RecurringTaskConfig::new("record", json!({}), "* * * * *")
                .start_at(t0() + secs(120))
                .end_at(t0() + secs(240)),
        )
        .await
        .unwrap();
    assert_eq!(
        h.scheduler
            .get_task(id)
            .await
            .unwrap()
            .unwrap()
            .next_execution_at,
        Some(t0() + secs(120))
    );
    wait_for(&mut ev, T::Completed, 3, DAY).await;
    let at: Vec<_> = h.seen("record").iter().map(|s| s.at).collect();
    assert_eq!(
        at,
        vec![t0() + secs(120), t0() + secs(180), t0() + secs(240)]
    );
    let task = h.scheduler.get_task(id).await.unwrap().unwrap();
    assert_eq!(task.status, ScheduledTaskStatus::Completed);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn jitter_delays_a_run_but_never_makes_it_early() {
    let h = Harness::start().await;
    let mut ev = h.events();
    h.scheduler
        .schedule_recurring_task(
            RecurringTaskConfig::new("record", json!({}), "*/10 * * * * *")
                .jitter(Duration::from_secs(3))
                .max_executions(5),
        )
        .await
        .unwrap();
    let started = wait_for(&mut ev, T::Started, 5, DAY).await;
    for (i, s) in h.seen("record").iter().enumerate() {
        let due = t0() + secs(10 * (i as i64 + 1));
        assert!(
            s.at >= due && s.at <= due + secs(3),
            "run {i} at {} for {due}",
            s.at
        );
        assert_eq!(started[i].payload["due_at"], json!(due));
    }
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn pause_stops_runs_and_resume_follows_the_misfire_policy() {
    for (policy, expect_runs_at_resume) in [
        (MisfirePolicy::Skip, 0usize),
        (MisfirePolicy::FireOnce, 1),
        (MisfirePolicy::FireAll { max: 3 }, 3),
    ] {
        let h = Harness::start().await;
        let mut ev = h.events();
        let id = h
            .scheduler
            .schedule_recurring_task(
                RecurringTaskConfig::new("record", json!({}), "* * * * *").policy(
                    SchedulePolicy::default()
                        .misfire(policy)
                        .misfire_threshold(Duration::from_secs(5)),
                ),
            )
            .await
            .unwrap();
        wait_for(&mut ev, T::Completed, 1, DAY).await;
        assert!(h.scheduler.pause_task(id).await.unwrap());
        assert!(!h.scheduler.pause_task(id).await.unwrap(), "pausing twice");
        assert_eq!(
            h.scheduler.get_task(id).await.unwrap().unwrap().status,
            ScheduledTaskStatus::Paused
        );
        // Ten minutes pass with nothing running.
        tokio::time::advance(Duration::from_secs(600) + Duration::from_millis(500)).await;
        settle().await;
        assert_eq!(h.seen("record").len(), 1, "{policy:?}: ran while paused");
        assert!(h.scheduler.resume_task(id).await.unwrap());
        let misfired = wait_for(&mut ev, T::Misfired, 1, Duration::from_secs(1)).await;
        if expect_runs_at_resume > 0 {
            wait_for(
                &mut ev,
                T::Completed,
                expect_runs_at_resume,
                Duration::from_secs(1),
            )
            .await;
        }
        settle().await;
        assert_eq!(
            h.seen("record").len(),
            1 + expect_runs_at_resume,
            "{policy:?}: {:?}",
            misfired[0].payload
        );
        // The schedule carries on from the next due time after now, never from "now".
        let task = h.scheduler.get_task(id).await.unwrap().unwrap();
        assert_eq!(task.next_execution_at, Some(t0() + secs(720)), "{policy:?}");
        assert_eq!(task.status, ScheduledTaskStatus::Scheduled);
        h.stop().await;
    }
}

#[tokio::test(start_paused = true)]
async fn cancel_is_final_and_unknown_ids_answer_false() {
    let h = Harness::start().await;
    let mut ev = h.events();
    let id = h
        .scheduler
        .schedule_task(ScheduledTaskConfig::new(
            "record",
            json!({}),
            t0() + secs(60),
        ))
        .await
        .unwrap();
    assert!(h.scheduler.cancel_task(id).await.unwrap());
    wait_for(&mut ev, T::Cancelled, 1, Duration::from_secs(1)).await;
    assert!(!h.scheduler.cancel_task(id).await.unwrap());
    assert!(!h.scheduler.resume_task(id).await.unwrap());
    assert!(!h.scheduler.pause_task(id).await.unwrap());
    assert!(!h.scheduler.trigger_task(id).await.unwrap());
    let unknown = uuid::Uuid::new_v4();
    // An unknown id is an error naming it, in every control operation (the contracts' rule);
    // a lookup answers `None`.
    for e in [
        h.scheduler.cancel_task(unknown).await.unwrap_err(),
        h.scheduler.pause_task(unknown).await.unwrap_err(),
        h.scheduler.resume_task(unknown).await.unwrap_err(),
        h.scheduler.trigger_task(unknown).await.unwrap_err(),
        h.scheduler
            .reschedule_task(unknown, t0() + secs(5))
            .await
            .unwrap_err(),
    ] {
        assert!(
            matches!(&e, architectlm_core::Error::NotFound { id, .. } if *id == unknown.to_string()),
            "{e}"
        );
    }
    assert!(h.scheduler.get_task(unknown).await.unwrap().is_none());
    tokio::time::advance(Duration::from_secs(120)).await;
    settle().await;
    assert!(h.seen("record").is_empty());
    let task = h.scheduler.get_task(id).await.unwrap().unwrap();
    assert_eq!(task.status, ScheduledTaskStatus::Cancelled);
    assert_eq!(h.scheduler.armed_timers(), 0);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn reschedule_moves_the_run_and_trigger_runs_now_without_moving_it() {
    let h = Harness::start().await;
    let mut ev = h.events();
    let id = h
        .scheduler
        .schedule_task(ScheduledTaskConfig::new(
            "record",
            json!({}),
            t0() + secs(60),
        ))
        .await
        .unwrap();
    assert!(
        h.scheduler
            .reschedule_task(id, t0() + secs(300))
            .await
            .unwrap()
    );
    assert!(h.scheduler.trigger_task(id).await.unwrap());
    wait_for(&mut ev, T::Completed, 1, Duration::from_secs(1)).await;
    assert_eq!(h.seen("record")[0].at, t0());
    let task = h.scheduler.get_task(id).await.unwrap().unwrap();
    assert_eq!(task.next_execution_at, Some(t0() + secs(300)));
    assert_eq!(task.status, ScheduledTaskStatus::Scheduled);
    wait_for(&mut ev, T::Completed, 1, DAY).await;
    let at: Vec<_> = h.seen("record").iter().map(|s| s.at).collect();
    assert_eq!(at, vec![t0(), t0() + secs(300)]);
    assert_eq!(
        h.scheduler.get_task(id).await.unwrap().unwrap().status,
        ScheduledTaskStatus::Completed
    );
    h.stop().await;
}

async fn overlap_case(overlap: OverlapPolicy) -> (Harness, uuid::Uuid) {
    let h = Harness::start().await;
    let id = h
        .scheduler
        .schedule_recurring_task(
            RecurringTaskConfig::new("slow", json!({}), "*/10 * * * * *")
                .max_executions(3)
                .policy(SchedulePolicy::default().overlap(overlap)),
        )
        .await
        .unwrap();
    (h, id)
}

#[tokio::test(start_paused = true)]
async fn overlap_skip_skips_runs_due_while_one_is_going() {
    let (h, id) = overlap_case(OverlapPolicy::Skip).await;
    let mut ev = h.events();
    wait_for(&mut ev, T::Started, 1, DAY).await;
    let skipped = wait_for(&mut ev, T::Misfired, 1, DAY).await;
    assert_eq!(skipped[0].payload["reason"], "overlap");
    assert_eq!(h.seen("slow").len(), 1);
    h.gate.add_permits(10);
    wait_for(&mut ev, T::Completed, 1, DAY).await;
    wait_for(&mut ev, T::Completed, 1, DAY).await;
    let task = h.scheduler.get_task(id).await.unwrap().unwrap();
    // First at 10 s, 20 s skipped, then 30 s.
    let at: Vec<_> = h.seen("slow").iter().map(|s| s.at).collect();
    assert_eq!(at[0], t0() + secs(10));
    assert!(at[1] >= t0() + secs(30), "{at:?}");
    // Two runs, and the decision that skipped 20 s, in the run history.
    let runs: Vec<_> = task
        .history
        .iter()
        .filter(|r| r.misfire.is_none())
        .collect();
    assert_eq!(runs.len(), 2);
    let skip: Vec<_> = task
        .history
        .iter()
        .filter_map(|r| r.misfire.map(|m| (r.due_at, m)))
        .collect();
    assert_eq!(skip.len(), 1, "{:?}", task.history);
    assert_eq!(skip[0].0, t0() + secs(20));
    assert_eq!(
        skip[0].1.reason,
        architectlm_core::extensions::scheduler::MisfireReason::Overlap {
            policy: OverlapPolicy::Skip
        }
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_skipped_overlap_does_not_count_toward_max_executions() {
    let h = Harness::start().await;
    let id = h
        .scheduler
        .schedule_recurring_task(
            RecurringTaskConfig::new("slow", json!({}), "*/10 * * * * *")
                .max_executions(2)
                .policy(SchedulePolicy::default().overlap(OverlapPolicy::Skip)),
        )
        .await
        .unwrap();
    let mut ev = h.events();
    wait_for(&mut ev, T::Started, 1, DAY).await;
    // 20 s is skipped while the first run is going; it was planned as the last run.
    let skipped = wait_for(&mut ev, T::Misfired, 1, DAY).await;
    assert_eq!(skipped[0].payload["reason"], "overlap");
    h.gate.add_permits(10);
    wait_for(&mut ev, T::Completed, 2, DAY).await;
    let at: Vec<_> = h.seen("slow").iter().map(|s| s.at).collect();
    assert_eq!(at.len(), 2, "{at:?}");
    assert!(at[1] >= t0() + secs(30), "{at:?}");
    let task = h.scheduler.get_task(id).await.unwrap().unwrap();
    assert_eq!(task.execution_count, 2);
    assert_eq!(task.status, ScheduledTaskStatus::Completed);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn overlap_queue_one_starts_one_waiting_run_when_the_previous_ends() {
    let (h, _) = overlap_case(OverlapPolicy::QueueOne).await;
    let mut ev = h.events();
    wait_for(&mut ev, T::Started, 1, DAY).await;
    // 20 s is queued, 30 s is skipped: one waits at most.
    let skipped = wait_for(&mut ev, T::Misfired, 1, DAY).await;
    assert_eq!(skipped[0].payload["reason"], "overlap");
    assert_eq!(h.seen("slow").len(), 1);
    h.gate.add_permits(1);
    let started = wait_for(&mut ev, T::Started, 1, Duration::from_secs(1)).await;
    assert_eq!(started[0].payload["due_at"], json!(t0() + secs(20)));
    h.gate.add_permits(1);
    wait_for(&mut ev, T::Completed, 2, Duration::from_secs(1)).await;
    assert_eq!(h.seen("slow").len(), 2);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn overlap_allow_runs_side_by_side_up_to_max_concurrent() {
    let h = Harness::start().await;
    let mut ev = h.events();
    h.scheduler
        .schedule_recurring_task(
            RecurringTaskConfig::new("slow", json!({}), "*/10 * * * * *")
                .max_executions(4)
                .policy(
                    SchedulePolicy::default()
                        .overlap(OverlapPolicy::Allow)
                        .max_concurrent(2),
                ),
        )
        .await
        .unwrap();
    wait_for(&mut ev, T::Started, 2, DAY).await;
    // Runs 3 and 4 wait for a free place.
    tokio::time::advance(Duration::from_secs(30)).await;
    settle().await;
    assert_eq!(h.seen("slow").len(), 2);
    h.gate.add_permits(1);
    wait_for(&mut ev, T::Started, 1, Duration::from_secs(1)).await;
    assert_eq!(h.seen("slow").len(), 3);
    h.gate.add_permits(3);
    wait_for(&mut ev, T::Completed, 4, Duration::from_secs(1)).await;
    assert_eq!(h.seen("slow").len(), 4);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn bad_input_gets_a_clear_error() {
    let h = Harness::start().await;
    let s = &h.scheduler;
    let err = |r: Result<uuid::Uuid, Error>| r.unwrap_err().to_string();
    let e = err(s
        .schedule_recurring_task(RecurringTaskConfig::new("record", json!({}), "61 * * * *"))
        .await);
    assert!(e.contains("pattern") && e.contains("61 * * * *"), "{e}");
    let e = err(s
        .schedule_recurring_task(
            RecurringTaskConfig::new("record", json!({}), "* * * * *").timezone("Europe/Atlantis"),
        )
        .await);
    assert!(e.contains("Europe/Atlantis"), "{e}");
    let e = err(s
        .schedule_recurring_task(
            RecurringTaskConfig::new("record", json!({}), "* * * * *")
                .start_at(t0() + secs(100))
                .end_at(t0() + secs(50)),
        )
        .await);
    assert!(e.contains("end_at") && e.contains("before start_at"), "{e}");
    let e = err(s
        .schedule_recurring_task(
            RecurringTaskConfig::new("record", json!({}), "* * * * *").max_executions(0),
        )
        .await);
    assert!(e.contains("max_executions"), "{e}");
    let e = err(s
        .schedule_task(ScheduledTaskConfig::new("no-such-task", json!({}), t0()))
        .await);
    assert!(e.contains("no-such-task"), "{e}");
    let e = err(s
        .schedule_recurring_task(RecurringTaskConfig::new("record", json!({}), "0 0 30 2 *"))
        .await);
    assert!(e.contains("0 0 30 2 *"), "{e}");
    // Nothing was stored by the rejected calls.
    assert_eq!(s.query(&ScheduledTaskFilter::new()).await.unwrap().total, 0);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn queries_filter_sort_and_paginate() {
    let h = Harness::start().await;
    let s = &h.scheduler;
    let mut ids = Vec::new();
    for i in 0..6i64 {
        let task = if i % 2 == 0 { "record" } else { "slow" };
        let c = ScheduledTaskConfig::new(task, json!({}), t0() + secs(600 - i * 60))
            .metadata("tenant", json!(if i < 3 { "a" } else { "b" }));
        ids.push(s.schedule_task(c).await.unwrap());
    }
    let cron = s
        .schedule_recurring_task(RecurringTaskConfig::new("record", json!({}), "0 0 * * *"))
        .await
        .unwrap();
    assert!(s.pause_task(ids[0]).await.unwrap());
    let all = s.get_tasks(ScheduledTaskFilter::new()).await.unwrap().items;
    assert_eq!(all.len(), 7);
    let next: Vec<_> = all.iter().map(|t| t.next_execution_at).collect();
    assert!(
        next.windows(2).all(|w| w[0] <= w[1]),
        "sorted by next run: {next:?}"
    );
    let q = ScheduledTaskFilter::new().task_id("slow");
    assert_eq!(s.get_tasks(q).await.unwrap().items.len(), 3);
    let q = ScheduledTaskFilter::new()
        .task_id("slow")
        .task_id("record")
        .recurring(false);
    assert_eq!(s.get_tasks(q).await.unwrap().items.len(), 6);
    let q = ScheduledTaskFilter::new().recurring(true);
    assert_eq!(s.get_tasks(q).await.unwrap().items[0].id, cron);
    let q = ScheduledTaskFilter::new().status(ScheduledTaskStatus::Paused);
    assert_eq!(s.get_tasks(q).await.unwrap().items[0].id, ids[0]);
    let q = ScheduledTaskFilter::new()
        .status(ScheduledTaskStatus::Paused)
        .status(ScheduledTaskStatus::Scheduled);
    assert_eq!(s.get_tasks(q).await.unwrap().items.len(), 7);
    // Inclusive range on the next run: 360 s ..= 480 s holds entries 2, 3 and 4.
    let q = ScheduledTaskFilter::new()
        .from(t0() + secs(360))
        .to(t0() + secs(480));
    let got: Vec<_> = s
        .get_tasks(q)
        .await
        .unwrap()
        .items
        .iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(got, vec![ids[4], ids[3], ids[2]]);
    let q = ScheduledTaskFilter::new().metadata("tenant", json!("b"));
    assert_eq!(s.get_tasks(q).await.unwrap().items.len(), 3);
    let page = s
        .query(
            &ScheduledTaskFilter::new()
                .recurring(false)
                .offset(2)
                .limit(2),
        )
        .await
        .unwrap();
    assert_eq!(page.total, 6);
    assert_eq!(page.next_offset, Some(4));
    assert_eq!(
        page.items.iter().map(|t| t.id).collect::<Vec<_>>(),
        vec![ids[3], ids[2]]
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_restart_brings_every_entry_back_and_applies_the_misfire_policy() {
    let store: Arc<dyn ScheduleStore> = Arc::new(InMemoryScheduleStore::new());
    let h = Harness::start_with(store.clone(), t0()).await;
    let skip = SchedulePolicy::default()
        .misfire(MisfirePolicy::Skip)
        .misfire_threshold(Duration::from_secs(5));
    let missed_skip = h
        .scheduler
        .schedule_task(
            ScheduledTaskConfig::new("record", json!("skip"), t0() + secs(60)).policy(skip.clone()),
        )
        .await
        .unwrap();
    let missed_fire = h
        .scheduler
        .schedule_task(ScheduledTaskConfig::new(
            "record",
            json!("fire"),
            t0() + secs(60),
        ))
        .await
        .unwrap();
    let later = h
        .scheduler
        .schedule_task(ScheduledTaskConfig::new(
            "record",
            json!("later"),
            t0() + secs(7200),
        ))
        .await
        .unwrap();
    let cron = h
        .scheduler
        .schedule_recurring_task(
            RecurringTaskConfig::new("record", json!("cron"), "*/15 * * * *")
                .policy(SchedulePolicy::default().misfire(MisfirePolicy::FireAll { max: 2 })),
        )
        .await
        .unwrap();
    h.stop().await;
    drop(h);
    // Down for one hour.
    let back = t0() + secs(3600);
    let h = Harness::start_with(store.clone(), back).await;
    let mut ev = h.events();
    wait_for(&mut ev, T::Completed, 3, Duration::from_secs(1)).await;
    let inputs: Vec<_> = h.seen("record").iter().map(|s| s.input.clone()).collect();
    assert_eq!(inputs.iter().filter(|i| **i == json!("fire")).count(), 1);
    assert_eq!(inputs.iter().filter(|i| **i == json!("cron")).count(), 2);
    assert!(!inputs.contains(&json!("skip")));
    let t = |id| {
        let s = h.scheduler.clone();
        async move { s.get_task(id).await.unwrap().unwrap() }
    };
    assert_eq!(t(missed_skip).await.status, ScheduledTaskStatus::Failed);
    assert!(
        t(missed_skip)
            .await
            .error
            .unwrap_or_default()
            .contains("misfired")
    );
    assert_eq!(t(missed_fire).await.status, ScheduledTaskStatus::Completed);
    assert_eq!(t(later).await.status, ScheduledTaskStatus::Scheduled);
    let c = t(cron).await;
    // The earliest two missed occurrences ran, and the schedule goes on after "now".
    let dues: Vec<_> = c
        .history
        .iter()
        .filter(|r| r.misfire.is_none())
        .map(|r| r.due_at)
        .collect();
    assert_eq!(dues, vec![t0() + secs(900), t0() + secs(1800)]);
    // The decision is in the history too: four missed, two run (fire-all, max 2).
    let decision = c
        .history
        .iter()
        .find_map(|r| r.misfire)
        .expect("a misfire record");
    assert_eq!((decision.skipped, decision.started), (2, 2));
    assert_eq!(c.next_execution_at, Some(back + secs(900)));
    // The later one-shot still runs at its time.
    wait_for(&mut ev, T::Completed, 1, DAY).await;
    let last = h.seen("record").last().cloned().unwrap();
    assert!(last.input == json!("cron") || last.input == json!("later"));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_run_in_flight_at_a_stop_runs_again_with_the_same_key() {
    let store: Arc<dyn ScheduleStore> = Arc::new(InMemoryScheduleStore::new());
    let h = Harness::start_with(store.clone(), t0()).await;
    let mut ev = h.events();
    let id = h
        .scheduler
        .schedule_task(ScheduledTaskConfig::new("slow", json!({}), t0() + secs(10)))
        .await
        .unwrap();
    wait_for(&mut ev, T::Started, 1, DAY).await;
    // Stop the scheduler while the run is going (its end is never recorded), like a crash.
    use architectlm_core::Extension as _;
    h.scheduler.shutdown().await;
    let first_key = h.seen("slow")[0].key.clone();
    drop(h);
    let h = Harness::start_with(store.clone(), t0() + secs(20)).await;
    let mut ev = h.events();
    h.gate.add_permits(1);
    wait_for(&mut ev, T::Completed, 1, Duration::from_secs(1)).await;
    assert_eq!(h.seen("slow")[0].key, first_key);
    let runs = store.runs(id).await.unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].starts, 2);
    assert_eq!(runs[0].state, RunState::Completed);
    assert_eq!(
        h.scheduler.get_task(id).await.unwrap().unwrap().status,
        ScheduledTaskStatus::Completed
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn one_scheduler_can_be_stopped_and_started_again() {
    let h = Harness::start().await;
    let id = h
        .scheduler
        .schedule_task(ScheduledTaskConfig::new(
            "record",
            json!({}),
            t0() + secs(30),
        ))
        .await
        .unwrap();
    h.stop().await;
    // A new runtime on the same scheduler instance picks the entry up again.
    let runtime = architectlm_core::Runtime::builder(support::system(
        h.seen.clone(),
        h.gate.clone(),
        h.clock.clone(),
    ))
    .extension(h.scheduler.clone())
    .start()
    .await
    .unwrap();
    let mut ev = h.events();
    wait_for(&mut ev, T::Completed, 1, DAY).await;
    assert_eq!(h.seen("record").len(), 1);
    assert!(h.seen("record")[0].at >= t0() + secs(30));
    assert_eq!(
        h.scheduler.get_task(id).await.unwrap().unwrap().status,
        ScheduledTaskStatus::Completed
    );
    runtime.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn a_batch_fires_every_entry_once_and_mass_cancels_leave_the_rest_armed() {
    let h = Harness::start().await;
    let configs = (0..3000)
        .map(|k| {
            // Half of them at one instant, the rest a second apart in pairs.
            let at = if k % 2 == 0 {
                t0() + secs(10)
            } else {
                t0() + secs(20 + k / 2)
            };
            ScheduledTaskConfig::new("record", json!(k), at)
        })
        .collect();
    let ids = h.scheduler.schedule_many(configs).await.unwrap();
    assert_eq!(h.scheduler.active_entries(), 3000);
    assert_eq!(h.scheduler.armed_timers(), 3000);
    // Cancel four in five of the later ones before they are due.
    let mut cancelled = 0;
    for (k, id) in ids.iter().enumerate() {
        if k % 2 == 1 && k % 5 != 0 {
            assert!(h.scheduler.cancel_task(*id).await.unwrap());
            cancelled += 1;
        }
    }
    assert_eq!(h.scheduler.armed_timers(), 3000 - cancelled);
    assert_eq!(h.scheduler.active_entries(), 3000 - cancelled);
    tokio::time::advance(Duration::from_secs(11)).await;
    for _ in 0..200 {
        if h.seen("record").len() >= 1500 {
            break;
        }
        settle().await;
    }
    let seen = h.seen("record");
    assert_eq!(seen.len(), 1500, "every entry due at the instant ran once");
    assert!(seen.iter().all(|s| s.at >= t0() + secs(10)));
    tokio::time::advance(Duration::from_secs(2000)).await;
    for _ in 0..200 {
        if h.scheduler.active_entries() == 0 {
            break;
        }
        settle().await;
    }
    let mut inputs: Vec<i64> = h
        .seen("record")
        .iter()
        .filter_map(|s| s.input.as_i64())
        .collect();
    inputs.sort_unstable();
    let want: Vec<i64> = (0..3000).filter(|k| k % 2 == 0 || k % 5 == 0).collect();
    assert_eq!(inputs, want, "each remaining entry ran exactly once");
    assert_eq!(h.scheduler.armed_timers(), 0);
    assert_eq!(h.scheduler.active_entries(), 0);
    let task = h.scheduler.get_task(ids[1]).await.unwrap().unwrap();
    assert_eq!(task.status, ScheduledTaskStatus::Cancelled);
    h.stop().await;
}

// On Tokio's real clock: the store's writes go through SQLite's own thread, and a paused clock
// would jump ahead while they are under way. The scheduler's clock still starts at the
// virtual `t0` of each start.
#[tokio::test]
async fn misfire_decisions_are_kept_in_the_run_history_across_restarts() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("misfire-history-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let open = || {
        let dir = dir.clone();
        async move {
            let db = architectlm_store::sqlite::SqliteDb::open(
                architectlm_store::sqlite::SqliteOptions::file(dir.join("schedule.sqlite")),
            )
            .unwrap();
            let s: Arc<dyn ScheduleStore> = Arc::new(
                architectlm_store::schedule::SqliteScheduleStore::open(db)
                    .await
                    .unwrap(),
            );
            s
        }
    };
    let h = Harness::start_with(open().await, t0()).await;
    let id = h
        .scheduler
        .schedule_recurring_task(
            RecurringTaskConfig::new("record", json!("cron"), "*/10 * * * *").policy(
                SchedulePolicy::default()
                    .misfire(MisfirePolicy::Skip)
                    .misfire_threshold(Duration::from_secs(5)),
            ),
        )
        .await
        .unwrap();
    h.stop().await;
    drop(h);
    // Down for an hour: six occurrences missed, skipped by the policy. Subscribed before the
    // start, since the decision is taken as the scheduler starts.
    {
        let clock = Arc::new(architectlm_scheduler::TokioClock::starting_at(
            t0() + secs(3600),
        ));
        let scheduler = Arc::new(
            architectlm_scheduler::TaskScheduler::builder()
                .store(open().await)
                .clock(clock.clone())
                .build(),
        );
        let mut ev = support::Events::of(&scheduler);
        let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let runtime = architectlm_core::Runtime::builder(support::system(seen, gate, clock))
            .extension(scheduler.clone())
            .start()
            .await
            .unwrap();
        wait_for(&mut ev, T::Misfired, 1, Duration::from_secs(30)).await;
        runtime.shutdown(Duration::from_secs(5)).await;
    }
    // The decision outlives another restart: it is in the entry's history in the file.
    let h = Harness::start_with(open().await, t0() + secs(3601)).await;
    let t = h.scheduler.get_task(id).await.unwrap().unwrap();
    let decisions: Vec<_> = t
        .history
        .iter()
        .filter_map(|r| r.misfire.map(|m| (r, m)))
        .collect();
    assert_eq!(decisions.len(), 1, "{:?}", t.history);
    let (rec, m) = decisions[0];
    assert_eq!(rec.due_at, t0() + secs(600));
    assert!(
        rec.started_at >= t0() + secs(3600) && rec.started_at < t0() + secs(3630),
        "decided at {}",
        rec.started_at
    );
    assert_eq!(rec.attempts, 0);
    assert_eq!(
        m.reason,
        architectlm_core::extensions::scheduler::MisfireReason::Late {
            policy: MisfirePolicy::Skip
        }
    );
    assert_eq!((m.skipped, m.started), (6, 0));
    assert!(h.seen("record").is_empty(), "skipped runs never ran");
    h.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(start_paused = true)]
async fn history_retention_keeps_the_newest_by_count_and_drops_the_old_by_age() {
    let store: Arc<dyn ScheduleStore> = Arc::new(InMemoryScheduleStore::new());
    let clock = Arc::new(architectlm_scheduler::TokioClock::starting_at(t0()));
    let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let scheduler = Arc::new(
        architectlm_scheduler::TaskScheduler::builder()
            .store(store)
            .clock(clock.clone())
            .history_limit(3)
            .history_max_age(Duration::from_secs(90))
            .build(),
    );
    let runtime = architectlm_core::Runtime::builder(support::system(seen, gate, clock))
        .extension(scheduler.clone())
        .start()
        .await
        .unwrap();
    let mut ev = support::Events::of(&scheduler);
    let id = scheduler
        .schedule_recurring_task(RecurringTaskConfig::new("record", json!({}), "* * * * *"))
        .await
        .unwrap();
    wait_for(&mut ev, T::Completed, 2, DAY).await;
    // Two runs, a minute apart: both within the age and the count.
    let t = scheduler.get_task(id).await.unwrap().unwrap();
    assert_eq!(t.history.len(), 2);
    wait_for(&mut ev, T::Completed, 3, DAY).await;
    // Five runs: the count would keep three, the age (90 s before the newest) keeps two.
    let t = scheduler.get_task(id).await.unwrap().unwrap();
    let dues: Vec<_> = t.history.iter().map(|r| r.due_at).collect();
    assert_eq!(dues, vec![t0() + secs(240), t0() + secs(300)], "{dues:?}");
    runtime.shutdown(Duration::from_secs(1)).await;
}
