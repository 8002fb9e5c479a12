//! The process-store conformance suite: what every `ProcessStore` must do, run against the
//! in-memory, SQLite and PostgreSQL stores.

use std::sync::Arc;

use architectlm_core::store::{ProcessQuery, ProcessStore};
use architectlm_core::{Error, ProcessInstance};
use chrono::{DateTime, SubsecRound, Utc};
use serde_json::json;
use uuid::Uuid;

/// An instance as the runtime would create it. Timestamps are whole microseconds, the finest
/// precision every backend keeps.
pub(crate) fn instance(
    process_id: &str,
    state: &str,
    created_at: DateTime<Utc>,
) -> ProcessInstance {
    let created_at = created_at.trunc_subsecs(6);
    serde_json::from_value(json!({
        "id": Uuid::now_v7(),
        "process_id": process_id,
        "state": state,
        "context": {"customer": "c-1", "lines": [1, 2, 3]},
        "version": 1,
        "created_at": created_at,
        "updated_at": created_at,
        "last_action": null,
    }))
    .expect("a valid instance")
}

fn with_action(mut i: ProcessInstance) -> ProcessInstance {
    i.last_action = serde_json::from_value(json!({
        "task_id": "charge",
        "event": "pay",
        "input": {"amount": 12},
        "status": "failed",
        "output": null,
        "error": "card declined",
        "at": i.updated_at,
    }))
    .expect("a valid action record");
    i
}

fn assert_conflict(e: Error, id: Uuid, expected: u64, actual: u64) {
    match &e {
        Error::Conflict {
            kind,
            id: got,
            expected: exp,
            actual: act,
        } => {
            assert_eq!(*kind, "process instance");
            assert_eq!(got, &id.to_string());
            assert_eq!((*exp, *act), (expected, actual), "{e}");
            let msg = e.to_string();
            assert!(msg.contains(&id.to_string()), "{msg}");
        }
        other => panic!("expected a conflict on {id}, got {other:?}"),
    }
}

/// Runs every rule of the `ProcessStore` contract against `store`, which must be empty.
pub(crate) async fn process_store_conformance(store: Arc<dyn ProcessStore>) {
    let t0 = Utc::now();
    let sec = chrono::Duration::seconds(1);

    // Insert, then read back exactly what was written (including the action record).
    let a = with_action(instance("order", "created", t0));
    store.insert(&a).await.expect("insert a");
    assert_eq!(store.get(a.id).await.expect("get a"), Some(a.clone()));
    assert_eq!(store.get(Uuid::now_v7()).await.expect("get unknown"), None);

    // A second insert of the same id is a conflict and changes nothing.
    let mut dup = a.clone();
    dup.state = "paid".into();
    assert_conflict(store.insert(&dup).await.unwrap_err(), a.id, 0, 1);
    assert_eq!(
        store.get(a.id).await.unwrap().unwrap().state.as_ref(),
        "created"
    );

    // An update from the stored version wins; one from a stale version is refused and the
    // stored instance keeps the winner's write.
    let mut a2 = a.clone();
    a2.state = "paid".into();
    a2.version = 2;
    a2.updated_at = (t0 + sec).trunc_subsecs(6);
    a2.context = json!({"customer": "c-1", "paid": true});
    a2.last_action = None;
    store.update(&a2, 1).await.expect("update from v1");
    let mut stale = a.clone();
    stale.state = "cancelled".into();
    stale.version = 2;
    assert_conflict(store.update(&stale, 1).await.unwrap_err(), a.id, 1, 2);
    assert_eq!(store.get(a.id).await.unwrap(), Some(a2.clone()));

    // Updating an unknown instance is "not found", not a conflict.
    let ghost = instance("order", "created", t0);
    match store.update(&ghost, 1).await.unwrap_err() {
        Error::NotFound { kind, id } => {
            assert_eq!(kind, "process instance");
            assert_eq!(id, ghost.id.to_string());
        }
        other => panic!("expected not found, got {other:?}"),
    }
    assert_eq!(store.get(ghost.id).await.unwrap(), None);

    // Listing filters by process and state and returns the oldest first.
    let b = instance("order", "created", t0 - sec);
    let c = instance("invoice", "created", t0 + sec);
    let d = instance("order", "shipped", t0 + sec + sec);
    for i in [&d, &c, &b] {
        store.insert(i).await.expect("insert");
    }
    let ids = |v: Vec<ProcessInstance>| v.into_iter().map(|i| i.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.list(&ProcessQuery::all()).await.unwrap()),
        vec![b.id, a.id, c.id, d.id]
    );
    assert_eq!(
        ids(store.list(&ProcessQuery::process("order")).await.unwrap()),
        vec![b.id, a.id, d.id]
    );
    assert_eq!(
        ids(store
            .list(&ProcessQuery::all().in_state("created"))
            .await
            .unwrap()),
        vec![b.id, c.id]
    );
    assert_eq!(
        ids(store
            .list(&ProcessQuery::process("order").in_state("paid"))
            .await
            .unwrap()),
        vec![a.id]
    );
    assert!(
        store
            .list(&ProcessQuery::process("nothing"))
            .await
            .unwrap()
            .is_empty()
    );

    // Many writers on one instance, each retrying on conflict: every write lands once.
    let counter = instance("counter", "open", t0);
    store.insert(&counter).await.unwrap();
    let writers = 16u64;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let store = store.clone();
        let id = counter.id;
        tasks.push(tokio::spawn(async move {
            let mut conflicts = 0u32;
            loop {
                let mut i = store.get(id).await.unwrap().unwrap();
                let expected = i.version;
                i.version += 1;
                let mut ctx = i.context.clone();
                let seen = ctx["writers"].as_array().cloned().unwrap_or_default();
                let mut seen = seen;
                seen.push(json!(w));
                ctx["writers"] = json!(seen);
                i.context = ctx;
                match store.update(&i, expected).await {
                    Ok(()) => return conflicts,
                    Err(Error::Conflict { .. }) => conflicts += 1,
                    Err(e) => panic!("writer {w}: {e}"),
                }
                assert!(conflicts < 10_000, "writer {w} starved");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let done = store.get(counter.id).await.unwrap().unwrap();
    assert_eq!(done.version, 1 + writers);
    let mut seen: Vec<u64> = done.context["writers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..writers).collect::<Vec<_>>(), "a write was lost");
}
