//! Values nested too deep to read back are refused at the door, values at the limit round-trip
//! through the durable journals, and one journal row that cannot be decoded never makes the
//! others unreadable: lists and recovery skip it and announce `record-unreadable`, a read of
//! it names it, and the next start succeeds.
//!
//! The PostgreSQL tests need `DATABASE_URL` and work in a schema of their own.

mod support;

use std::sync::Arc;
use std::time::Duration;

use architectlm_core::extensions::SagaCoordinator;
use architectlm_core::extensions::saga::{
    SagaDefinition, SagaEventType, SagaFilter, SagaStatus, SagaStep, SagaStepStatus,
};
use architectlm_core::json::MAX_JSON_DEPTH;
use architectlm_core::{Error, Runtime, TaskDefinition};
use architectlm_saga::{Coordinator, SagaStore};
use serde_json::{Value, json};
use support::*;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(30);

/// `levels` nested arrays around a number.
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

fn order_saga() -> SagaDefinition {
    SagaDefinition::new("order")
        .step(SagaStep::task("reserve", "reserve").compensate_with("release"))
        .step(SagaStep::task("charge", "charge"))
}

/// `reserve` and `release` log; `charge` returns a value nested `input.depth` deep.
fn tasks(log: &Log) -> Vec<TaskDefinition> {
    let charge = TaskDefinition::new("charge", |input: Value, _ctx| async move {
        let depth = input["input"]["depth"].as_u64().unwrap_or(0);
        Ok(nested(usize::try_from(depth).unwrap_or(0)))
    })
    .unwrap();
    vec![ok_task("reserve", log), ok_task("release", log), charge]
}

async fn node(store: Arc<dyn SagaStore>, log: &Log) -> (Coordinator, Runtime) {
    let sagas = Coordinator::builder()
        .store(store)
        .shutdown_timeout(Duration::from_millis(50))
        .build()
        .unwrap();
    sagas.define_saga(order_saga()).await.unwrap();
    let rt = runtime(system(tasks(log)), &sagas).await;
    (sagas, rt)
}

/// The limit is enforced on the saga input and on a step's output; a value at the limit
/// round-trips through the journal.
async fn depth_limit_holds(store: Arc<dyn SagaStore>) {
    let log = Log::default();
    let (sagas, rt) = node(store, &log).await;

    let err = sagas
        .start_saga("order", json!({"deep": nested(MAX_JSON_DEPTH)}))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("saga input") && msg.contains("64"), "{msg}");
    assert!(log.tasks().is_empty(), "nothing ran: {:?}", log.tasks());

    // At the limit: accepted, journaled and read back unchanged.
    let input = nested(MAX_JSON_DEPTH);
    let started = sagas.start_saga("order", input.clone()).await.unwrap();
    let done = sagas.wait_for(started.id, WAIT).await.unwrap();
    assert_eq!(done.status, SagaStatus::Completed);
    assert_eq!(done.input, input);
    let listed = sagas.list_sagas(SagaFilter::default()).await.unwrap();
    assert_eq!(listed.items.len(), 1);
    assert_eq!(listed.items[0].input, input);

    // A step output at the limit is kept; one level more fails the step, which is not
    // retried, and the saga compensates.
    let ok = sagas
        .start_saga("order", json!({"depth": MAX_JSON_DEPTH}))
        .await
        .unwrap();
    let ok = sagas.wait_for(ok.id, WAIT).await.unwrap();
    assert_eq!(ok.status, SagaStatus::Completed);
    assert_eq!(ok.steps[1].result, Some(nested(MAX_JSON_DEPTH)));

    let bad = sagas
        .start_saga("order", json!({"depth": MAX_JSON_DEPTH + 1}))
        .await
        .unwrap();
    let bad = sagas.wait_for(bad.id, WAIT).await.unwrap();
    assert_eq!(bad.status, SagaStatus::Compensated, "{bad:?}");
    let charge = &bad.steps[1];
    assert_eq!(charge.status, SagaStepStatus::Failed);
    assert_eq!(charge.attempts, 1);
    assert_eq!(charge.result, None);
    let error = charge.error.as_deref().unwrap_or_default();
    assert!(
        error.contains("step \"charge\" output") && error.contains("64"),
        "{error}"
    );
    assert_eq!(log.inputs_of("release").len(), 1);
    // The journal still reads back whole.
    assert_eq!(
        sagas
            .list_sagas(SagaFilter::default())
            .await
            .unwrap()
            .items
            .len(),
        3
    );
    rt.shutdown(Duration::from_secs(5)).await;
}

/// Three sagas recorded before the runtime starts (so recovery carries them on), one of them
/// then made unreadable by `poison`; `reopen` gives a store on the same database.
async fn poisoned_journal_stays_usable<F, P, PF>(store: Arc<dyn SagaStore>, poison: P, reopen: F)
where
    P: FnOnce(Uuid) -> PF,
    PF: std::future::Future<Output = ()>,
    F: AsyncFnOnce() -> Arc<dyn SagaStore>,
{
    let log = Log::default();
    let sagas = Coordinator::builder()
        .store(store)
        .shutdown_timeout(Duration::from_millis(50))
        .build()
        .unwrap();
    sagas.define_saga(order_saga()).await.unwrap();
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(sagas.start_saga("order", json!({"n": n})).await.unwrap().id);
    }
    let bad = ids[1];
    poison(bad).await;

    let mut reports = sagas.events().subscribe("record-unreadable");
    let rt = runtime(system(tasks(&log)), &sagas).await;
    // Recovery skipped the bad one, announced it, and drove the others.
    let e = tokio::time::timeout(WAIT, reports.recv())
        .await
        .expect("record-unreadable in time")
        .unwrap();
    assert_eq!(e.event_type, SagaEventType::RecordUnreadable);
    assert_eq!(e.instance_id, bad);
    assert_eq!(e.payload["id"], bad.to_string());
    assert_eq!(e.payload["kind"], "saga instance");
    assert!(!e.payload["error"].as_str().unwrap_or_default().is_empty());
    for id in [ids[0], ids[2]] {
        let done = sagas.wait_for(id, WAIT).await.unwrap();
        assert_eq!(done.status, SagaStatus::Completed);
    }
    let listed = sagas.list_sagas(SagaFilter::default()).await.unwrap();
    let listed: Vec<Uuid> = listed.items.iter().map(|i| i.id).collect();
    assert_eq!(listed, vec![ids[0], ids[2]]);
    assert!(reports.try_recv().is_some(), "the list reports it too");

    let err = sagas.get_saga_status(bad).await.unwrap_err();
    match &err {
        Error::UnreadableRecord { kind, id, .. } => {
            assert_eq!(*kind, "saga instance");
            assert_eq!(*id, bad.to_string());
        }
        other => panic!("expected UnreadableRecord, got {other}"),
    }
    assert!(std::error::Error::source(&err).is_some());
    assert!(err.to_string().contains(&bad.to_string()), "{err}");
    rt.shutdown(Duration::from_secs(5)).await;

    // The next start on the same journal succeeds.
    let (again, rt) = node(reopen().await, &log).await;
    let listed = again.list_sagas(SagaFilter::default()).await.unwrap();
    assert_eq!(listed.items.len(), 2);
    rt.shutdown(Duration::from_secs(5)).await;
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use std::path::PathBuf;

    use architectlm_saga::SqliteSagaStore;
    use architectlm_store::sqlite::{SqliteDb, SqliteOptions};

    use super::*;

    fn temp_db() -> PathBuf {
        std::env::temp_dir()
            .join(format!("alm-saga-depth-{}", Uuid::new_v4()))
            .join("sagas.sqlite")
    }

    async fn open(path: &PathBuf) -> SqliteSagaStore {
        SqliteSagaStore::open(SqliteDb::open(SqliteOptions::file(path)).unwrap())
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_journal_refuses_too_deep_values_and_keeps_those_at_the_limit() {
        let path = temp_db();
        depth_limit_holds(Arc::new(open(&path).await)).await;
    }

    async fn set_column(store: &SqliteSagaStore, id: Uuid, column: &str, text: String) {
        let sql = format!("UPDATE saga_instances SET {column} = ?1 WHERE id = ?2");
        let n = store
            .db()
            .write(move |txn| {
                txn.execute(&sql, (text, id.as_bytes().as_slice()))
                    .map_err(Error::storage)
            })
            .await
            .unwrap();
        assert_eq!(n, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_journal_skips_and_reports_a_row_nested_too_deep() {
        let path = temp_db();
        let store = open(&path).await;
        let raw = store.clone();
        poisoned_journal_stays_usable(
            Arc::new(store),
            async move |id| set_column(&raw, id, "input", deep_text(200)).await,
            async || Arc::new(open(&path).await) as Arc<dyn SagaStore>,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_journal_skips_and_reports_a_row_of_garbage() {
        let path = temp_db();
        let store = open(&path).await;
        let raw = store.clone();
        poisoned_journal_stays_usable(
            Arc::new(store),
            async move |id| set_column(&raw, id, "steps", "{garbage".to_owned()).await,
            async || Arc::new(open(&path).await) as Arc<dyn SagaStore>,
        )
        .await;
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use architectlm_saga::PgSagaStore;
    use architectlm_store::postgres::{PgDb, PgOptions};

    use super::*;

    fn database_url(test: &str) -> Option<String> {
        match std::env::var("DATABASE_URL") {
            Ok(url) if !url.is_empty() => Some(url),
            _ => {
                eprintln!("{test}: skipped: DATABASE_URL not set");
                None
            }
        }
    }

    /// A schema of its own for one test, dropped at the end.
    struct TestSchema {
        url: String,
        name: String,
    }

    impl TestSchema {
        fn new(url: &str) -> Self {
            Self {
                url: url.to_owned(),
                name: format!("t_{}", Uuid::new_v4().simple()),
            }
        }

        async fn connect(&self) -> PgDb {
            PgDb::connect(PgOptions::new(&self.url).schema(&self.name).pool_size(4))
                .await
                .expect("connect to the test database")
        }
    }

    impl Drop for TestSchema {
        fn drop(&mut self) {
            let (url, name) = (self.url.clone(), self.name.clone());
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                rt.block_on(async {
                    let db = PgDb::connect_url(&url).await.map_err(|e| e.to_string())?;
                    db.client()
                        .await
                        .map_err(|e| e.to_string())?
                        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE"))
                        .await
                        .map_err(|e| e.to_string())
                })
            })
            .join();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pg_journal_refuses_too_deep_values_and_keeps_those_at_the_limit() {
        let Some(url) = database_url("pg_journal_refuses_too_deep_values") else {
            return;
        };
        let schema = TestSchema::new(&url);
        let store = PgSagaStore::open(schema.connect().await).await.unwrap();
        depth_limit_holds(Arc::new(store)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pg_journal_skips_and_reports_a_row_nested_too_deep() {
        let Some(url) = database_url("pg_journal_skips_and_reports_a_row_nested_too_deep") else {
            return;
        };
        let schema = TestSchema::new(&url);
        let db = schema.connect().await;
        let store = PgSagaStore::open(db.clone()).await.unwrap();
        let raw = db.clone();
        poisoned_journal_stays_usable(
            Arc::new(store),
            async move |id| {
                let n = raw
                    .client()
                    .await
                    .unwrap()
                    .execute(
                        "UPDATE architectlm_saga_instances SET input = $2::text::jsonb \
                         WHERE id = $1",
                        &[&id, &deep_text(200)],
                    )
                    .await
                    .unwrap();
                assert_eq!(n, 1);
            },
            async || Arc::new(PgSagaStore::open(db).await.unwrap()) as Arc<dyn SagaStore>,
        )
        .await;
    }
}
