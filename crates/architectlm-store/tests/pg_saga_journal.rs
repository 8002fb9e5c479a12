//! The saga journal on PostgreSQL writes only the changed step records: entries changing one,
//! two or many steps (and positions outside the array) leave the stored instance equal to the
//! same entries applied in memory; a v1 table is upgraded in place with its rows intact.
#![cfg(feature = "postgres")]

mod support;

use architectlm_core::extensions::saga::{
    SagaInstance, SagaStatus, SagaStepExecution, SagaStepStatus,
};
use architectlm_store::saga::{
    CreateOutcome, PG_SAGA_MIGRATIONS, PgSagaStore, SagaStore, SagaUpdate,
};
use serde_json::json;
use support::{TestSchema, database_url};
use uuid::Uuid;

fn instance(steps: usize) -> SagaInstance {
    let id = Uuid::now_v7();
    let steps = (0..steps)
        .map(|i| SagaStepExecution::new(Uuid::now_v7(), format!("s{i}"), format!("{id}:s{i}")))
        .collect();
    SagaInstance::new(
        id,
        "order",
        1,
        json!({"n": 1}),
        None,
        chrono::Utc::now(),
        steps,
    )
}

fn step(
    i: &SagaInstance,
    k: usize,
    status: SagaStepStatus,
    result: serde_json::Value,
) -> (u32, SagaStepExecution) {
    let mut s = i.steps[k].clone();
    s.status = status;
    s.attempts += 1;
    s.started_at = Some(chrono::Utc::now());
    s.result = Some(result);
    (u32::try_from(k).unwrap(), s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_patch_exactly_the_changed_steps() {
    let Some(url) = database_url("entries_patch_exactly_the_changed_steps") else {
        return;
    };
    let schema = TestSchema::new(&url);
    let store = PgSagaStore::open(schema.connect().await).await.unwrap();
    let mut expected = instance(6);
    let CreateOutcome::Created(created) = store.create(&expected, "a").await.unwrap() else {
        panic!("not created");
    };
    let fencing = created.fencing;

    let entries: Vec<Vec<(u32, SagaStepExecution)>> = vec![
        // No step.
        vec![],
        // One step.
        vec![step(&expected, 0, SagaStepStatus::Running, json!(0))],
        // Close one, open the next (the usual entry), out of order.
        vec![
            step(&expected, 1, SagaStepStatus::Running, json!(0)),
            step(&expected, 0, SagaStepStatus::Completed, json!({"r": 0})),
        ],
        // Many (a parallel group), one of them outside the array.
        vec![
            step(&expected, 1, SagaStepStatus::Completed, json!({"r": 1})),
            step(&expected, 2, SagaStepStatus::Running, json!("x")),
            step(&expected, 3, SagaStepStatus::Running, json!([1, 2])),
            step(&expected, 5, SagaStepStatus::Running, json!(5)),
            (40, expected.steps[4].clone()),
        ],
        // One inside and one outside the array.
        vec![
            (6, expected.steps[4].clone()),
            step(&expected, 4, SagaStepStatus::Completed, json!({"r": 4})),
        ],
        // Only outside.
        vec![(u32::MAX, expected.steps[0].clone())],
    ];
    for (n, steps) in entries.into_iter().enumerate() {
        let mut up = SagaUpdate::new(expected.id, fencing, SagaStatus::Running);
        up.error = (n % 2 == 1).then(|| format!("error {n}"));
        up.steps = steps;
        up.apply_to(&mut expected);
        store.apply(up).await.unwrap();
        let stored = store.get(expected.id).await.unwrap().unwrap();
        assert_eq!(stored.instance.steps, expected.steps, "after entry {n}");
        assert_eq!(stored.instance.error, expected.error, "after entry {n}");
        assert_eq!(stored.instance.status, SagaStatus::Running);
    }
    let mut done = SagaUpdate::new(expected.id, fencing, SagaStatus::Completed);
    done.completed_at = Some(chrono::Utc::now());
    done.steps = vec![step(&expected, 5, SagaStepStatus::Completed, json!(6))];
    done.apply_to(&mut expected);
    store.apply(done).await.unwrap();
    let stored = store.get(expected.id).await.unwrap().unwrap();
    assert_eq!(stored.instance.steps, expected.steps);
    assert_eq!(stored.instance.status, SagaStatus::Completed);
    assert!(stored.instance.completed_at.is_some());

    // A stale token still changes nothing.
    let mut stale = SagaUpdate::new(expected.id, fencing + 1, SagaStatus::Failed);
    stale.steps = vec![step(&expected, 0, SagaStepStatus::Failed, json!(0))];
    assert!(store.apply(stale).await.is_err());
    assert_eq!(
        store
            .get(expected.id)
            .await
            .unwrap()
            .unwrap()
            .instance
            .steps,
        expected.steps
    );
    schema.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1_table_is_upgraded_with_its_rows() {
    let Some(url) = database_url("a_v1_table_is_upgraded_with_its_rows") else {
        return;
    };
    let schema = TestSchema::new(&url);
    let db = schema.connect().await;
    db.migrate(&PG_SAGA_MIGRATIONS[..1]).await.unwrap();
    // A row written by a v1 node (the whole array of step records).
    let old = instance(3);
    db.client()
        .await
        .unwrap()
        .execute(
            "INSERT INTO architectlm_saga_instances (id, saga_id, saga_version, status, input, \
             started_at, owner, steps) VALUES ($1, $2, 1, 'running', $3, $4, 'old', $5)",
            &[
                &old.id,
                &old.saga_id,
                &old.input,
                &old.started_at,
                &serde_json::to_value(&old.steps).unwrap(),
            ],
        )
        .await
        .unwrap();

    let store = PgSagaStore::open(db.clone()).await.unwrap();
    let options: Vec<String> = db
        .client()
        .await
        .unwrap()
        .query_one(
            "SELECT coalesce(reloptions, '{}') FROM pg_class \
             WHERE oid = 'architectlm_saga_instances'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(options.contains(&"fillfactor=50".to_owned()), "{options:?}");

    let stored = store.get(old.id).await.unwrap().unwrap();
    assert_eq!(stored.instance.steps, old.steps);
    let mut expected = old.clone();
    let mut up = SagaUpdate::new(old.id, stored.fencing, SagaStatus::Running);
    up.steps = vec![step(&old, 2, SagaStepStatus::Running, json!(0))];
    up.apply_to(&mut expected);
    store.apply(up).await.unwrap();
    assert_eq!(
        store.get(old.id).await.unwrap().unwrap().instance.steps,
        expected.steps
    );
    schema.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_and_entries_share_batches_and_a_bad_one_fails_alone() {
    let Some(url) = database_url("concurrent_creates_and_entries_share_batches") else {
        return;
    };
    let schema = TestSchema::new(&url);
    let store = PgSagaStore::open(schema.connect().await).await.unwrap();
    // Instances to journal entries on, created first.
    let mut running = Vec::new();
    for _ in 0..40 {
        let i = instance(3);
        let CreateOutcome::Created(s) = store.create(&i, "a").await.unwrap() else {
            panic!("not created");
        };
        running.push((i, s.fencing));
    }
    let (rt0, w0) = store.write_stats();
    let mut tasks = tokio::task::JoinSet::new();
    for (n, (i, fencing)) in running.iter().cloned().enumerate() {
        let writer = store.clone();
        tasks.spawn(async move {
            let mut up = SagaUpdate::new(i.id, fencing, SagaStatus::Running);
            up.steps = vec![step(&i, n % 3, SagaStepStatus::Running, json!(n))];
            let mut expected = i.clone();
            up.apply_to(&mut expected);
            (writer.apply(up).await.map(|_| None), expected)
        });
        let creator = store.clone();
        tasks.spawn(async move {
            let mut new = instance(2);
            if n == 7 {
                // PostgreSQL refuses `\u0000` in `jsonb`: this create fails.
                new.input = json!({"bad": "nul \u{0} here"});
            }
            let out = creator.create(&new, "b").await;
            (out.map(Some), new)
        });
    }
    let mut failed = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (out, expected) = done.unwrap();
        match out {
            Ok(None) => {
                let stored = store.get(expected.id).await.unwrap().unwrap();
                assert_eq!(stored.instance.steps, expected.steps);
            }
            Ok(Some(CreateOutcome::Created(s))) => {
                assert_eq!(s.instance.id, expected.id);
                let stored = store.get(expected.id).await.unwrap().unwrap();
                assert_eq!(stored.instance.steps, expected.steps);
            }
            Ok(Some(other)) => panic!("unexpected outcome {other:?}"),
            Err(e) => failed.push((expected.id, e.to_string())),
        }
    }
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(store.get(failed[0].0).await.unwrap().is_none());
    let (rt1, w1) = store.write_stats();
    assert_eq!(w1 - w0, 80);
    // Writes shared statements (the failed joint statement and its retries included).
    assert!(rt1 - rt0 < 80, "{} statements for 80 writes", rt1 - rt0);
    schema.drop().await;
}
