//! Inputs nested too deep to read back are refused when scheduling, inputs at the limit
//! round-trip through the durable stores, and one stored entry that cannot be decoded never
//! makes the others unreadable: listings and recovery skip it and announce
//! `record-unreadable`, a read of it names it, and the next start succeeds.
//!
//! The PostgreSQL test needs `DATABASE_URL` and works in a schema of its own.

mod support;

use std::sync::Arc;
use std::time::Duration;

use architectlm_core::extensions::scheduler::{
    RecurringTaskConfig, ScheduledTaskConfig, ScheduledTaskFilter, Scheduler, SchedulerEventType,
};
use architectlm_core::json::MAX_JSON_DEPTH;
use architectlm_core::{Error, Runtime, System, TaskDefinition};
use architectlm_scheduler::TaskScheduler;
use architectlm_store::schedule::ScheduleStore;
use chrono::Utc;
use serde_json::{Value, json};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(30);

fn nested(levels: usize) -> Value {
    let mut v = json!(1);
    for _ in 0..levels {
        v = json!([v]);
    }
    v
}

/// JSON text nested `levels` deep: more than `serde_json` reads back.
fn deep_text(levels: usize) -> String {
    format!("{}1{}", "[".repeat(levels), "]".repeat(levels))
}

async fn node(store: Arc<dyn ScheduleStore>) -> (TaskScheduler, Runtime) {
    let scheduler = TaskScheduler::builder().store(store).build();
    let system = System::builder("depth")
        .task(TaskDefinition::new("noop", |_input: Value, _ctx| async { Ok(json!({})) }).unwrap())
        .build()
        .unwrap();
    let rt = Runtime::builder(system)
        .extension(Arc::new(scheduler.clone()))
        .start()
        .await
        .unwrap();
    (scheduler, rt)
}

/// An hour from now: nothing fires during a test.
fn later() -> chrono::DateTime<Utc> {
    Utc::now() + chrono::Duration::hours(1)
}

async fn depth_limit_holds(store: Arc<dyn ScheduleStore>) {
    let (scheduler, rt) = node(store).await;
    let too_deep = nested(MAX_JSON_DEPTH + 1);
    for err in [
        scheduler
            .schedule_task(ScheduledTaskConfig::new("noop", too_deep.clone(), later()))
            .await
            .unwrap_err(),
        scheduler
            .schedule_many(vec![
                ScheduledTaskConfig::new("noop", json!(1), later()),
                ScheduledTaskConfig::new("noop", too_deep.clone(), later()),
            ])
            .await
            .unwrap_err(),
        scheduler
            .schedule_recurring_task(RecurringTaskConfig::new(
                "noop",
                too_deep.clone(),
                "0 0 * * *",
            ))
            .await
            .unwrap_err(),
    ] {
        assert!(matches!(err, Error::InvalidInput(_)), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("scheduled task input") && msg.contains("64"),
            "{msg}"
        );
    }
    let deep_meta = ScheduledTaskConfig::new("noop", json!(1), later()).metadata("k", too_deep);
    let msg = scheduler
        .schedule_task(deep_meta)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("metadata \"k\"") && msg.contains("64"),
        "{msg}"
    );
    let all = scheduler
        .get_tasks(ScheduledTaskFilter::new())
        .await
        .unwrap()
        .items;
    assert!(all.is_empty(), "nothing was stored: {all:?}");

    // At the limit: stored and read back unchanged, by id, in listings and after a restart.
    let input = nested(MAX_JSON_DEPTH);
    let one = scheduler
        .schedule_task(ScheduledTaskConfig::new("noop", input.clone(), later()))
        .await
        .unwrap();
    let cron = scheduler
        .schedule_recurring_task(RecurringTaskConfig::new("noop", input.clone(), "0 0 * * *"))
        .await
        .unwrap();
    for id in [one, cron] {
        assert_eq!(scheduler.get_task(id).await.unwrap().unwrap().input, input);
    }
    let listed = scheduler
        .get_tasks(ScheduledTaskFilter::new())
        .await
        .unwrap()
        .items;
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().all(|t| t.input == input));
    rt.shutdown(Duration::from_secs(5)).await;
}

/// Three entries, one made unreadable by `poison`, then the scheduler started again on the
/// same database (`reopen`).
async fn poisoned_store_stays_usable<P, PF, F>(store: Arc<dyn ScheduleStore>, poison: P, reopen: F)
where
    P: FnOnce(Uuid) -> PF,
    PF: std::future::Future<Output = ()>,
    F: AsyncFnOnce() -> Arc<dyn ScheduleStore>,
{
    let (scheduler, rt) = node(store).await;
    let mut ids = Vec::new();
    for n in 0..3 {
        let config = ScheduledTaskConfig::new("noop", json!({"n": n}), later());
        ids.push(scheduler.schedule_task(config).await.unwrap());
    }
    let bad = ids[1];
    poison(bad).await;

    let mut reports = scheduler.subscribe("record-unreadable");
    let listed = scheduler
        .get_tasks(ScheduledTaskFilter::new())
        .await
        .unwrap()
        .items;
    let listed: Vec<Uuid> = listed.iter().map(|t| t.id).collect();
    assert_eq!(listed, vec![ids[0], ids[2]]);
    let e = reports.try_recv().expect("the listing reports the entry");
    assert_eq!(e.event_type, SchedulerEventType::RecordUnreadable);
    assert_eq!(e.scheduled_task_id, bad);
    assert_eq!(e.payload["id"], bad.to_string());
    assert_eq!(e.payload["kind"], "scheduled task");
    // A page count includes it, so the next offset stays right.
    let page = scheduler.query(&ScheduledTaskFilter::new()).await.unwrap();
    assert_eq!(page.items.len(), 2);

    let err = scheduler.get_task(bad).await.unwrap_err();
    match &err {
        Error::UnreadableRecord { kind, id, .. } => {
            assert_eq!(*kind, "scheduled task");
            assert_eq!(*id, bad.to_string());
        }
        other => panic!("expected UnreadableRecord, got {other}"),
    }
    assert!(std::error::Error::source(&err).is_some());
    for id in [ids[0], ids[2]] {
        assert!(scheduler.get_task(id).await.unwrap().is_some());
    }
    rt.shutdown(Duration::from_secs(5)).await;

    // The next start recovers every other entry and reports this one.
    let store = reopen().await;
    let scheduler = TaskScheduler::builder().store(store).build();
    let mut reports = scheduler.subscribe("record-unreadable");
    let system = System::builder("depth")
        .task(TaskDefinition::new("noop", |_input: Value, _ctx| async { Ok(json!({})) }).unwrap())
        .build()
        .unwrap();
    let rt = Runtime::builder(system)
        .extension(Arc::new(scheduler.clone()))
        .start()
        .await
        .unwrap();
    let e = tokio::time::timeout(WAIT, reports.recv())
        .await
        .expect("record-unreadable in time")
        .unwrap();
    assert_eq!(e.scheduled_task_id, bad);
    assert_eq!(scheduler.active_entries(), 2);
    let listed = scheduler
        .get_tasks(ScheduledTaskFilter::new())
        .await
        .unwrap()
        .items;
    assert_eq!(listed.len(), 2);
    rt.shutdown(Duration::from_secs(5)).await;
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use std::path::PathBuf;

    use architectlm_store::schedule::SqliteScheduleStore;
    use architectlm_store::sqlite::{SqliteDb, SqliteOptions};

    use super::*;

    fn temp_db() -> PathBuf {
        std::env::temp_dir()
            .join(format!("alm-sched-depth-{}", Uuid::new_v4()))
            .join("schedule.sqlite")
    }

    async fn open(path: &PathBuf) -> SqliteScheduleStore {
        SqliteScheduleStore::open(SqliteDb::open(SqliteOptions::file(path)).unwrap())
            .await
            .unwrap()
    }

    async fn set_data(store: &SqliteScheduleStore, id: Uuid, text: String) {
        let n = store
            .db()
            .write(move |txn| {
                txn.execute(
                    "UPDATE scheduler_entries SET data = ?1 WHERE id = ?2",
                    (text, id.as_bytes().as_slice()),
                )
                .map_err(Error::storage)
            })
            .await
            .unwrap();
        assert_eq!(n, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_store_refuses_too_deep_inputs_and_keeps_those_at_the_limit() {
        depth_limit_holds(Arc::new(open(&temp_db()).await)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_store_skips_and_reports_an_entry_nested_too_deep() {
        let path = temp_db();
        let store = open(&path).await;
        let raw = store.clone();
        poisoned_store_stays_usable(
            Arc::new(store),
            async move |id| set_data(&raw, id, deep_text(200)).await,
            async || Arc::new(open(&path).await) as Arc<dyn ScheduleStore>,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_store_skips_and_reports_an_entry_of_garbage() {
        let path = temp_db();
        let store = open(&path).await;
        let raw = store.clone();
        poisoned_store_stays_usable(
            Arc::new(store),
            async move |id| set_data(&raw, id, "{\"v\":2,garbage".to_owned()).await,
            async || Arc::new(open(&path).await) as Arc<dyn ScheduleStore>,
        )
        .await;
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use architectlm_store::schedule::{PgScheduleStore, SharedScheduleStore};

    use super::support::pg::{connect, database_url, drop_schema};
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pg_store_refuses_too_deep_inputs_and_keeps_those_at_the_limit() {
        let Some(url) = database_url("pg_store_refuses_too_deep_inputs") else {
            return;
        };
        let schema = format!("t_{}", Uuid::new_v4().simple());
        let store = PgScheduleStore::open(connect(&url, &schema, 4).await)
            .await
            .unwrap();
        depth_limit_holds(Arc::new(store)).await;
        drop_schema(&url, &schema).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pg_store_skips_and_reports_an_entry_nested_too_deep() {
        let Some(url) = database_url("pg_store_skips_and_reports_an_entry_nested_too_deep") else {
            return;
        };
        let schema = format!("t_{}", Uuid::new_v4().simple());
        let db = connect(&url, &schema, 4).await;
        let store = PgScheduleStore::open(db.clone()).await.unwrap();
        let raw = db.clone();
        let bad = std::sync::Arc::new(parking_lot::Mutex::new(None));
        let seen = bad.clone();
        poisoned_store_stays_usable(
            Arc::new(store),
            async move |id| {
                *seen.lock() = Some(id);
                let n = raw
                    .client()
                    .await
                    .unwrap()
                    .execute(
                        "UPDATE scheduler_entries SET data = $2 WHERE id = $1",
                        &[&id, &deep_text(200)],
                    )
                    .await
                    .unwrap();
                assert_eq!(n, 1);
            },
            async || {
                Arc::new(PgScheduleStore::open(db.clone()).await.unwrap()) as Arc<dyn ScheduleStore>
            },
        )
        .await;

        // A node of a cluster polling for due entries skips it too.
        let bad = bad.lock().unwrap();
        let client = db.client().await.unwrap();
        client
            .execute(
                "UPDATE scheduler_entries SET next_run = 0, fire_at = 0 WHERE TRUE",
                &[],
            )
            .await
            .unwrap();
        drop(client);
        let store = PgScheduleStore::open(db.clone()).await.unwrap();
        let skipped = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let heard = skipped.clone();
        store.on_unreadable(Arc::new(move |r| heard.lock().push(r.id.clone())));
        let due = store
            .acquire_due("node-a", Utc::now(), Duration::from_secs(5), 10)
            .await
            .unwrap();
        assert_eq!(due.entries.len(), 2);
        assert!(due.entries.iter().all(|d| d.entry.id() != bad));
        assert_eq!(*skipped.lock(), vec![bad.to_string()]);
        drop_schema(&url, &schema).await;
    }
}
