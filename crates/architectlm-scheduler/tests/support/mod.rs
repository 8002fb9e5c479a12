//! Shared helpers: a runtime with recording tasks, a scheduler on a paused clock, and waiting
//! for events with a deadline.
#![allow(dead_code)] // Each test file uses a different part of the helpers.

#[cfg(feature = "postgres")]
pub(crate) mod pg;

use std::sync::Arc;
use std::time::Duration;

use architectlm_core::extensions::scheduler::{SchedulerEvent, SchedulerEventType};
use architectlm_core::{Runtime, Subscription, System, TaskDefinition, TaskError};
use architectlm_scheduler::{Clock, TaskScheduler, TokioClock};
use architectlm_store::schedule::{InMemoryScheduleStore, ScheduleStore};
use chrono::{DateTime, TimeZone, Utc};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

/// One run as the task saw it.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub(crate) task: &'static str,
    pub(crate) key: Option<String>,
    /// The entry and occurrence, as the task reads them from its context.
    pub(crate) origin: Option<(uuid::Uuid, DateTime<Utc>)>,
    pub(crate) input: Value,
    pub(crate) at: DateTime<Utc>,
}

pub(crate) struct Harness {
    pub(crate) runtime: Runtime,
    pub(crate) scheduler: Arc<TaskScheduler>,
    pub(crate) store: Arc<dyn ScheduleStore>,
    pub(crate) clock: Arc<TokioClock>,
    pub(crate) seen: Arc<Mutex<Vec<Seen>>>,
    /// `slow` waits for a permit of this gate.
    pub(crate) gate: Arc<Semaphore>,
}

/// Monday 2026-01-05 00:00:00 UTC.
pub(crate) fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 5, 0, 0, 0)
        .single()
        .unwrap_or_default()
}

pub(crate) fn secs(s: i64) -> chrono::Duration {
    chrono::Duration::seconds(s)
}

pub(crate) fn system(
    seen: Arc<Mutex<Vec<Seen>>>,
    gate: Arc<Semaphore>,
    clock: Arc<TokioClock>,
) -> System {
    let record = {
        let (seen, clock) = (seen.clone(), clock.clone());
        TaskDefinition::new("record", move |input, ctx| {
            seen.lock().push(Seen {
                task: "record",
                key: ctx.idempotency_key().map(str::to_owned),
                origin: ctx.schedule_entry_id().zip(ctx.scheduled_for()),
                input: input.clone(),
                at: clock.now(),
            });
            async move { Ok(json!({"echo": input})) }
        })
    };
    let slow = {
        let (seen, clock) = (seen.clone(), clock.clone());
        TaskDefinition::new("slow", move |input, ctx| {
            seen.lock().push(Seen {
                task: "slow",
                key: ctx.idempotency_key().map(str::to_owned),
                origin: ctx.schedule_entry_id().zip(ctx.scheduled_for()),
                input,
                at: clock.now(),
            });
            let gate = gate.clone();
            async move {
                let permit = gate
                    .acquire()
                    .await
                    .map_err(|e| TaskError::new(e.to_string()))?;
                permit.forget();
                Ok(json!("done"))
            }
        })
    };
    let fail = {
        let (seen, clock) = (seen.clone(), clock.clone());
        TaskDefinition::new("fail", move |input, ctx| {
            seen.lock().push(Seen {
                task: "fail",
                key: ctx.idempotency_key().map(str::to_owned),
                origin: ctx.schedule_entry_id().zip(ctx.scheduled_for()),
                input,
                at: clock.now(),
            });
            async move { Err(TaskError::new("boom")) }
        })
    };
    System::builder("scheduler-tests")
        .task(record.unwrap_or_else(|e| panic!("{e}")))
        .task(slow.unwrap_or_else(|e| panic!("{e}")))
        .task(fail.unwrap_or_else(|e| panic!("{e}")))
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

impl Harness {
    /// A runtime with an in-memory scheduler on a clock reading [`t0`] now.
    pub(crate) async fn start() -> Self {
        Self::start_with(Arc::new(InMemoryScheduleStore::new()), t0()).await
    }

    /// The same with a given store and start time (a "restart" reuses the store).
    pub(crate) async fn start_with(store: Arc<dyn ScheduleStore>, now: DateTime<Utc>) -> Self {
        let clock = Arc::new(TokioClock::starting_at(now));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(Semaphore::new(0));
        let scheduler = Arc::new(
            TaskScheduler::builder()
                .store(store.clone())
                .clock(clock.clone())
                .build(),
        );
        let runtime = Runtime::builder(system(seen.clone(), gate.clone(), clock.clone()))
            .extension(scheduler.clone())
            .start()
            .await
            .unwrap_or_else(|e| panic!("start: {e}"));
        Self {
            runtime,
            scheduler,
            store,
            clock,
            seen,
            gate,
        }
    }

    pub(crate) fn events(&self) -> Events {
        Events {
            sub: self.scheduler.subscribe("*"),
            log: Vec::new(),
            taken: std::collections::HashMap::new(),
        }
    }

    pub(crate) fn seen(&self, task: &str) -> Vec<Seen> {
        self.seen
            .lock()
            .iter()
            .filter(|s| s.task == task)
            .cloned()
            .collect()
    }

    pub(crate) async fn stop(&self) {
        self.runtime.shutdown(Duration::from_secs(1)).await;
    }
}

/// Scheduler events seen so far, so that waiting for one type never loses another.
pub(crate) struct Events {
    sub: Subscription<SchedulerEvent>,
    log: Vec<Arc<SchedulerEvent>>,
    taken: std::collections::HashMap<SchedulerEventType, usize>,
}

impl Events {
    /// Every event of `scheduler` from now on.
    pub(crate) fn of(scheduler: &TaskScheduler) -> Self {
        Self {
            sub: scheduler.subscribe("*"),
            log: Vec::new(),
            taken: std::collections::HashMap::new(),
        }
    }

    pub(crate) fn log(&self) -> &[Arc<SchedulerEvent>] {
        &self.log
    }
}

/// Waits (on the paused clock, which jumps to the next timer whenever everything is idle) for
/// `n` more events of type `t` than earlier calls took, at most `within` of virtual time.
pub(crate) async fn wait_for(
    ev: &mut Events,
    t: SchedulerEventType,
    n: usize,
    within: Duration,
) -> Vec<Arc<SchedulerEvent>> {
    let taken = ev.taken.get(&t).copied().unwrap_or(0);
    let count = |log: &[Arc<SchedulerEvent>]| log.iter().filter(|e| e.event_type == t).count();
    let res = tokio::time::timeout(within, async {
        while count(&ev.log) < taken + n {
            match ev.sub.recv().await {
                Some(e) => ev.log.push(e),
                None => break,
            }
        }
    })
    .await;
    let got: Vec<_> = ev
        .log
        .iter()
        .filter(|e| e.event_type == t)
        .skip(taken)
        .take(n)
        .cloned()
        .collect();
    assert!(
        res.is_ok() && got.len() >= n,
        "expected {n} more {t:?} events within {within:?}, got {}",
        got.len()
    );
    ev.taken.insert(t, taken + n);
    got
}

/// Lets spawned work run without moving the clock.
pub(crate) async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}
