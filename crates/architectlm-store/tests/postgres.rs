//! The PostgreSQL backend itself: migrations run twice and from many nodes at once, a failing
//! migration leaves nothing behind, and `FOR UPDATE SKIP LOCKED` claims hand every work row to
//! exactly one node.
#![cfg(feature = "postgres")]

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use architectlm_store::migration::Migration;
use architectlm_store::postgres::{ClaimSpec, PgDb};
use support::{TestSchema, database_url};

/// v2 fails if it runs twice (the column exists) and v3 inserts a row, so any double
/// application shows.
static MIGRATIONS: &[Migration] = &[
    Migration {
        component: "widgets",
        version: 1,
        description: "widgets",
        sql: "CREATE TABLE widgets (id BIGINT PRIMARY KEY, name TEXT NOT NULL)",
    },
    Migration {
        component: "widgets",
        version: 2,
        description: "widgets.colour",
        sql: "ALTER TABLE widgets ADD COLUMN colour TEXT NOT NULL DEFAULT 'red'",
    },
    Migration {
        component: "widgets",
        version: 3,
        description: "seed widget",
        sql: "INSERT INTO widgets (id, name) VALUES (1, 'first')",
    },
];

async fn applied(db: &PgDb) -> Vec<(String, i32)> {
    db.client()
        .await
        .unwrap()
        .query(
            "SELECT component, version FROM architectlm_migrations ORDER BY component, version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

async fn count(db: &PgDb, sql: &str) -> i64 {
    db.client()
        .await
        .unwrap()
        .query_one(sql, &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_run_twice_apply_once() {
    let Some(url) = database_url("migrations_run_twice_apply_once") else {
        return;
    };
    let schema = TestSchema::new(&url);
    let db = schema.connect().await;
    db.migrate(&MIGRATIONS[..2]).await.unwrap();
    db.migrate(MIGRATIONS).await.unwrap();
    db.migrate(MIGRATIONS).await.unwrap();
    let expected: Vec<(String, i32)> = (1..=3).map(|v| ("widgets".to_owned(), v)).collect();
    assert_eq!(applied(&db).await, expected);
    assert_eq!(
        count(&db, "SELECT count(*) FROM widgets WHERE colour = 'red'").await,
        1
    );
    // The tables live in the test's own schema.
    let in_schema = db
        .client()
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = $1 AND table_name = 'widgets'",
            &[&schema.name],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(in_schema, 1);
    schema.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_starting_together_apply_each_migration_once() {
    let Some(url) = database_url("nodes_starting_together_apply_each_migration_once") else {
        return;
    };
    let schema = TestSchema::new(&url);
    // Eight nodes connect (creating the schema) and migrate at the same moment.
    let start = Arc::new(tokio::sync::Barrier::new(8));
    let mut nodes = Vec::new();
    for _ in 0..8 {
        let opts = schema.options().pool_size(2);
        let start = start.clone();
        nodes.push(tokio::spawn(async move {
            start.wait().await;
            let db = PgDb::connect(opts).await?;
            db.migrate(MIGRATIONS).await?;
            Ok::<_, architectlm_store::Error>(db)
        }));
    }
    let mut dbs = Vec::new();
    for n in nodes {
        dbs.push(n.await.unwrap().expect("every node starts"));
    }
    let expected: Vec<(String, i32)> = (1..=3).map(|v| ("widgets".to_owned(), v)).collect();
    assert_eq!(applied(&dbs[0]).await, expected);
    assert_eq!(count(&dbs[7], "SELECT count(*) FROM widgets").await, 1);
    drop(dbs);
    schema.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_migration_names_itself_and_applies_nothing() {
    let Some(url) = database_url("a_failing_migration_names_itself_and_applies_nothing") else {
        return;
    };
    static BROKEN: &[Migration] = &[
        Migration {
            component: "gadgets",
            version: 1,
            description: "gadgets",
            sql: "CREATE TABLE gadgets (id BIGINT PRIMARY KEY)",
        },
        Migration {
            component: "gadgets",
            version: 2,
            description: "typo",
            sql: "ALTER TABLE gadgetz ADD COLUMN x INT",
        },
    ];
    let schema = TestSchema::new(&url);
    let db = schema.connect().await;
    let e = db.migrate(BROKEN).await.unwrap_err().to_string();
    assert!(
        e.contains("gadgets v2") && e.contains("typo") && e.contains("gadgetz"),
        "{e}"
    );
    // Transactional DDL: v1 was rolled back with v2, so the fixed list applies from scratch.
    let tables = count(
        &db,
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'gadgets' AND table_schema = current_schema()",
    )
    .await;
    assert_eq!(tables, 0);
    db.migrate(&BROKEN[..1]).await.unwrap();
    assert_eq!(applied(&db).await, vec![("gadgets".to_owned(), 1)]);
    schema.drop().await;
}

static JOBS: ClaimSpec = ClaimSpec::new("jobs", "id")
    .ready("NOT done")
    .order_by("id");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_hand_each_row_to_exactly_one_node() {
    let Some(url) = database_url("claims_hand_each_row_to_exactly_one_node") else {
        return;
    };
    const ROWS: i64 = 600;
    let schema = TestSchema::new(&url);
    let db = schema.connect().await;
    db.client()
        .await
        .unwrap()
        .batch_execute(&format!(
            "CREATE TABLE jobs (id BIGINT PRIMARY KEY, done BOOLEAN NOT NULL DEFAULT false,
                                claimed_by TEXT, claimed_until TIMESTAMPTZ);
             CREATE TABLE ledger (job BIGINT PRIMARY KEY, node TEXT NOT NULL);
             INSERT INTO jobs (id) SELECT g FROM generate_series(1, {ROWS}) g;
             -- Rows claimed by a node that died: their claim has expired.
             UPDATE jobs SET claimed_by = 'dead-node', claimed_until = now() - interval '1 second'
              WHERE id % 50 = 0;
             -- A live claim of another node: must not be taken.
             UPDATE jobs SET claimed_by = 'busy-node', claimed_until = now() + interval '1 hour'
              WHERE id = 7;"
        ))
        .await
        .unwrap();

    // Four nodes, each with its own pool, claim in small batches until nothing is left.
    let mut nodes = Vec::new();
    for n in 0..4 {
        let db = schema.connect().await;
        nodes.push(tokio::spawn(async move {
            let node = format!("node-{n}");
            let mut mine = Vec::new();
            loop {
                let rows = db
                    .claim(&JOBS, &node, Duration::from_secs(60), 16)
                    .await
                    .unwrap();
                if rows.is_empty() {
                    return mine;
                }
                let client = db.client().await.unwrap();
                for row in rows {
                    let id: i64 = row.get("id");
                    assert_eq!(row.get::<_, String>("claimed_by"), node);
                    // A duplicate claim would violate the ledger's primary key.
                    client
                        .execute(
                            "INSERT INTO ledger (job, node) VALUES ($1, $2)",
                            &[&id, &node],
                        )
                        .await
                        .unwrap_or_else(|e| panic!("job {id} ran twice: {e}"));
                    let finished = client
                        .execute(
                            "UPDATE jobs SET done = true WHERE id = $1 AND claimed_by = $2",
                            &[&id, &node],
                        )
                        .await
                        .unwrap();
                    assert_eq!(finished, 1, "job {id}: claim of {node} lost");
                    mine.push(id);
                }
            }
        }));
    }
    let mut all = HashSet::new();
    let mut per_node = Vec::new();
    for n in nodes {
        let mine = n.await.unwrap();
        per_node.push(mine.len());
        for id in mine {
            assert!(all.insert(id), "job {id} claimed twice");
        }
    }
    let expected: HashSet<i64> = (1..=ROWS).filter(|id| *id != 7).collect();
    assert_eq!(all, expected, "lost or extra jobs");
    assert_eq!(count(&db, "SELECT count(*) FROM ledger").await, ROWS - 1);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM jobs WHERE NOT done AND claimed_by = 'busy-node'"
        )
        .await,
        1
    );
    assert!(
        per_node.iter().sum::<usize>() == (ROWS - 1) as usize,
        "{per_node:?}"
    );
    schema.drop().await;
}
