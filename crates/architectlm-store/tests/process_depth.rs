//! Process data nested too deep to read back is refused by the runtime, data at the limit
//! round-trips through the durable process stores, an action result that deep fails the
//! action, and one stored instance that cannot be decoded never makes the others unreadable:
//! listings skip it and the runtime announces `RECORD_UNREADABLE`, a read of it names it, and
//! the next start succeeds.
//!
//! The PostgreSQL tests need `DATABASE_URL` and work in a schema of their own.

mod support;

use std::sync::Arc;

use architectlm_core::json::MAX_JSON_DEPTH;

use architectlm_core::store::ProcessStore;
use architectlm_core::{
    ActionStatus, Error, ProcessDefinition, Runtime, System, TaskDefinition, TransitionDefinition,
};
use serde_json::{Value, json};
use uuid::Uuid;

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

/// `ticket`: `open --edit--> open`, `open --close [act]--> closed`; the action returns a value
/// nested `context.depth` deep.
async fn start(store: Arc<dyn ProcessStore>) -> Runtime {
    let ticket = ProcessDefinition::builder("ticket")
        .state("open")
        .state("closed")
        .transition(TransitionDefinition::new("open", "open", "edit"))
        .transition(TransitionDefinition::new("open", "closed", "close").action("act"))
        .build()
        .unwrap();
    let act = TaskDefinition::new("act", |input: Value, _ctx| async move {
        let depth = input["depth"].as_u64().unwrap_or(0);
        Ok(nested(usize::try_from(depth).unwrap_or(0)))
    })
    .unwrap();
    let system = System::builder("desk")
        .process(ticket)
        .task(act)
        .build()
        .unwrap();
    Runtime::builder(system)
        .process_store(store)
        .start()
        .await
        .unwrap()
}

fn assert_refused(err: &Error, field: &str) {
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(field) && msg.contains("64"), "{msg}");
}

async fn depth_limit_holds(store: Arc<dyn ProcessStore>) {
    let rt = start(store).await;
    let err = rt
        .create_process("ticket", json!({"d": nested(MAX_JSON_DEPTH)}))
        .await
        .unwrap_err();
    assert_refused(&err, "process data");
    assert!(rt.get_all_processes().await.unwrap().is_empty());

    // At the limit: stored and read back unchanged.
    let data = json!({"d": nested(MAX_JSON_DEPTH - 1)});
    let t = rt.create_process("ticket", data.clone()).await.unwrap();
    assert_eq!(rt.get_process(t.id).await.unwrap().unwrap().context, data);

    let err = rt
        .transition_process(t.id, "edit", json!({"e": nested(MAX_JSON_DEPTH)}))
        .await
        .unwrap_err();
    assert_refused(&err, "process data");
    let edit = json!({"e": nested(MAX_JSON_DEPTH - 1)});
    rt.transition_process(t.id, "edit", edit.clone())
        .await
        .unwrap();
    let got = rt.get_process(t.id).await.unwrap().unwrap();
    assert_eq!(got.context["e"], edit["e"]);
    assert_eq!(got.context["d"], data["d"]);
    let err = rt
        .reset_process(t.id, nested(MAX_JSON_DEPTH + 1))
        .await
        .unwrap_err();
    assert_refused(&err, "process data");

    // An action result one level too deep fails the action; the instance stays readable.
    rt.transition_process(t.id, "edit", json!({"depth": MAX_JSON_DEPTH + 1}))
        .await
        .unwrap();
    let out = rt
        .transition_process(t.id, "close", Value::Null)
        .await
        .unwrap();
    let result = out.action.unwrap().result;
    let msg = result.unwrap_err().message;
    assert!(msg.contains("action result") && msg.contains("64"), "{msg}");
    let got = rt.get_process(t.id).await.unwrap().unwrap();
    let last = got.last_action.unwrap();
    assert_eq!(last.status, ActionStatus::Failed);
    assert_eq!(last.output, None);

    // One at the limit is kept.
    let u = rt
        .create_process("ticket", json!({"depth": MAX_JSON_DEPTH}))
        .await
        .unwrap();
    let out = rt
        .transition_process(u.id, "close", Value::Null)
        .await
        .unwrap();
    assert_eq!(out.action.unwrap().result.unwrap(), nested(MAX_JSON_DEPTH));
    let got = rt.get_process(u.id).await.unwrap().unwrap();
    assert_eq!(
        got.last_action.unwrap().output,
        Some(nested(MAX_JSON_DEPTH))
    );
    assert_eq!(rt.get_all_processes().await.unwrap().len(), 2);
    rt.shutdown(std::time::Duration::from_secs(5)).await;
}

async fn poisoned_store_stays_usable<P, PF, F>(store: Arc<dyn ProcessStore>, poison: P, reopen: F)
where
    P: FnOnce(Uuid) -> PF,
    PF: std::future::Future<Output = ()>,
    F: AsyncFnOnce() -> Arc<dyn ProcessStore>,
{
    let rt = start(store).await;
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(
            rt.create_process("ticket", json!({"n": n}))
                .await
                .unwrap()
                .id,
        );
    }
    let bad = ids[1];
    poison(bad).await;

    let mut reports = rt.subscribe("RECORD_UNREADABLE");
    let listed: Vec<Uuid> = rt
        .get_all_processes()
        .await
        .unwrap()
        .iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(listed, vec![ids[0], ids[2]]);
    let e = reports
        .try_recv()
        .expect("the listing reports the instance");
    assert_eq!(e.source, "runtime");
    assert_eq!(e.payload["id"], bad.to_string());
    assert_eq!(e.payload["kind"], "process instance");
    assert!(!e.payload["error"].as_str().unwrap_or_default().is_empty());
    assert_eq!(rt.get_processes_by_type("ticket").await.unwrap().len(), 2);

    let err = rt.get_process(bad).await.unwrap_err();
    match &err {
        Error::UnreadableRecord { kind, id, .. } => {
            assert_eq!(*kind, "process instance");
            assert_eq!(*id, bad.to_string());
        }
        other => panic!("expected UnreadableRecord, got {other}"),
    }
    assert!(std::error::Error::source(&err).is_some());
    // The others still move.
    rt.transition_process(ids[0], "edit", json!({"x": 1}))
        .await
        .unwrap();
    rt.shutdown(std::time::Duration::from_secs(5)).await;

    let rt = start(reopen().await).await;
    assert_eq!(rt.get_all_processes().await.unwrap().len(), 2);
    rt.shutdown(std::time::Duration::from_secs(5)).await;
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use std::path::PathBuf;

    use architectlm_store::process::SqliteProcessStore;
    use architectlm_store::sqlite::{SqliteDb, SqliteOptions};

    use super::*;

    fn temp_db() -> PathBuf {
        std::env::temp_dir()
            .join(format!("alm-proc-depth-{}", Uuid::new_v4()))
            .join("db.sqlite")
    }

    async fn open(path: &PathBuf) -> SqliteProcessStore {
        SqliteProcessStore::open(SqliteDb::open(SqliteOptions::file(path)).unwrap())
            .await
            .unwrap()
    }

    async fn set_context(store: &SqliteProcessStore, id: Uuid, text: String) {
        let n = store
            .db()
            .write(move |txn| {
                txn.execute(
                    "UPDATE architectlm_process_instances SET context = ?1 WHERE id = ?2",
                    (text, id.to_string()),
                )
                .map_err(Error::storage)
            })
            .await
            .unwrap();
        assert_eq!(n, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_process_store_refuses_too_deep_data_and_keeps_data_at_the_limit() {
        depth_limit_holds(Arc::new(open(&temp_db()).await)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_process_store_skips_and_reports_a_row_nested_too_deep() {
        let path = temp_db();
        let store = open(&path).await;
        let raw = store.clone();
        poisoned_store_stays_usable(
            Arc::new(store),
            async move |id| set_context(&raw, id, deep_text(200)).await,
            async || Arc::new(open(&path).await) as Arc<dyn ProcessStore>,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_process_store_skips_and_reports_a_row_of_garbage() {
        let path = temp_db();
        let store = open(&path).await;
        let raw = store.clone();
        poisoned_store_stays_usable(
            Arc::new(store),
            async move |id| set_context(&raw, id, "{garbage".to_owned()).await,
            async || Arc::new(open(&path).await) as Arc<dyn ProcessStore>,
        )
        .await;
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use architectlm_store::process::PgProcessStore;

    use super::support::{TestSchema, database_url};
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pg_process_store_refuses_too_deep_data_and_keeps_data_at_the_limit() {
        let Some(url) = database_url("pg_process_store_refuses_too_deep_data") else {
            return;
        };
        let schema = TestSchema::new(&url);
        let store = PgProcessStore::open(schema.connect().await).await.unwrap();
        depth_limit_holds(Arc::new(store)).await;
        schema.drop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pg_process_store_skips_and_reports_a_row_nested_too_deep() {
        let Some(url) = database_url("pg_process_store_skips_and_reports_a_row") else {
            return;
        };
        let schema = TestSchema::new(&url);
        let db = schema.connect().await;
        let store = PgProcessStore::open(db.clone()).await.unwrap();
        let raw = db.clone();
        poisoned_store_stays_usable(
            Arc::new(store),
            async move |id| {
                let n = raw
                    .client()
                    .await
                    .unwrap()
                    .execute(
                        "UPDATE architectlm_process_instances SET context = $2::text::jsonb \
                         WHERE id = $1",
                        &[&id, &deep_text(200)],
                    )
                    .await
                    .unwrap();
                assert_eq!(n, 1);
            },
            async || Arc::new(PgProcessStore::open(db).await.unwrap()) as Arc<dyn ProcessStore>,
        )
        .await;
        schema.drop().await;
    }
}
