//! Durable process instances on PostgreSQL (`PgProcessStore`: create + one transition per
//! operation, through the runtime) against the baseline of raw single-row insert transactions
//! on the same server, both at 200 concurrent callers over pools of the same size.
//!
//! `cargo run --release --manifest-path benches/store/Cargo.toml -- [--quick]`; reads
//! `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`). Prints one markdown
//! section to stdout and nothing else.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use architectlm_core::{ProcessDefinition, Runtime, System, TransitionDefinition};
use architectlm_store::postgres::{ClaimSpec, PgDb, PgOptions};
use architectlm_store::process::PgProcessStore;
use serde_json::json;

const CONCURRENCY: usize = 200;
const POOL: usize = 32;

struct Run {
    ops: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
    rss_kib: u64,
}

impl Run {
    fn throughput(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
    fn pct(&self, p: f64) -> Duration {
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies[i]
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Runs `op` `total` times from `CONCURRENCY` tasks and records each call's latency.
async fn drive<F, Fut>(total: usize, op: F) -> Run
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let op = op.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return lat;
                }
                let t = Instant::now();
                op(i).await;
                lat.push(t.elapsed());
            }
        }));
    }
    let mut latencies = Vec::with_capacity(total);
    for t in tasks {
        latencies.extend(t.await.expect("a benchmark task panicked"));
    }
    let elapsed = start.elapsed();
    latencies.sort_unstable();
    Run {
        ops: total,
        elapsed,
        latencies,
        rss_kib: rss_kib(),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let quick = std::env::args().any(|a| a == "--quick");
    let total = if quick { 4_000 } else { 40_000 };
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let schema = format!("bench_{}", uuid::Uuid::new_v4().simple());
    let opts = PgOptions::new(&url).schema(&schema).pool_size(POOL);

    // Baseline: one single-row INSERT per transaction (autocommit), same pool size.
    let raw_db = PgDb::connect(opts.clone()).await?;
    raw_db
        .client()
        .await?
        .batch_execute(
            "CREATE TABLE bench_raw (id UUID PRIMARY KEY, payload JSONB NOT NULL, version BIGINT NOT NULL)",
        )
        .await?;
    let db = raw_db.clone();
    // Warm the pool so both runs start with open connections.
    drive(POOL * 4, move |_| {
        let db = db.clone();
        async move {
            let c = db.client().await.expect("connection");
            c.execute("SELECT 1", &[]).await.expect("warm-up");
        }
    })
    .await;
    let db = raw_db.clone();
    let raw = drive(total, move |_| {
        let db = db.clone();
        async move {
            let c = db.client().await.expect("connection");
            let stmt = c
                .prepare_cached("INSERT INTO bench_raw (id, payload, version) VALUES ($1, $2, 1)")
                .await
                .expect("prepare");
            c.execute(&stmt, &[&uuid::Uuid::new_v4(), &json!({"n": 1})])
                .await
                .expect("raw insert");
        }
    })
    .await;

    // Ours: the runtime on PgProcessStore; one operation = create + one transition.
    let store = Arc::new(PgProcessStore::open(PgDb::connect(opts).await?).await?);
    let def = ProcessDefinition::builder("order")
        .initial_state("created")
        .final_state("paid")
        .transition(TransitionDefinition::new("created", "paid", "pay"))
        .build()?;
    let system = System::builder("bench").process(def).build()?;
    let rt = Runtime::builder(system)
        .process_store(store)
        .start()
        .await?;
    let runtime = rt.clone();
    drive(POOL * 4, move |_| {
        let rt = runtime.clone();
        async move {
            rt.get_process(uuid::Uuid::new_v4()).await.expect("warm-up");
        }
    })
    .await;
    let runtime = rt.clone();
    let ours = drive(total, move |_| {
        let rt = runtime.clone();
        async move {
            let i = rt
                .create_process("order", json!({"n": 1}))
                .await
                .expect("create");
            rt.transition_process(i.id, "pay", json!({"paid": true}))
                .await
                .expect("transition");
        }
    })
    .await;
    let stored = rt.get_processes_by_state("paid").await?.len();
    assert_eq!(
        stored, total,
        "every instance must have been stored and paid"
    );

    // Work claims: 3 nodes (own pools) claim batches with FOR UPDATE SKIP LOCKED and complete
    // each batch with one owner-checked UPDATE, until the table is drained.
    static JOBS: ClaimSpec = ClaimSpec::new("bench_jobs", "id").ready("NOT done");
    const NODES: usize = 3;
    const BATCH: usize = 100;
    let jobs = total * 5;
    raw_db
        .client()
        .await?
        .batch_execute(&format!(
            "CREATE TABLE bench_jobs (id BIGINT PRIMARY KEY, done BOOLEAN NOT NULL DEFAULT false,
                                      claimed_by TEXT, claimed_until TIMESTAMPTZ);
             INSERT INTO bench_jobs (id) SELECT g FROM generate_series(1, {jobs}) g;
             CREATE INDEX ON bench_jobs (id) WHERE NOT done;
             ANALYZE bench_jobs;"
        ))
        .await?;
    let claim_start = Instant::now();
    let mut nodes = Vec::new();
    for n in 0..NODES {
        let db =
            PgDb::connect(PgOptions::new(&url).schema(&schema).pool_size(POOL / NODES)).await?;
        nodes.push(tokio::spawn(async move {
            let node = format!("node-{n}");
            let mut done = 0usize;
            let mut lat = Vec::new();
            loop {
                let t = Instant::now();
                let rows = db
                    .claim(&JOBS, &node, Duration::from_secs(60), BATCH)
                    .await
                    .expect("claim");
                if rows.is_empty() {
                    return (done, lat);
                }
                let ids: Vec<i64> = rows.iter().map(|r| r.get("id")).collect();
                let finished = db
                    .client()
                    .await
                    .expect("connection")
                    .execute(
                        "UPDATE bench_jobs SET done = true WHERE id = ANY($1) AND claimed_by = $2",
                        &[&ids, &node],
                    )
                    .await
                    .expect("complete");
                assert_eq!(finished as usize, ids.len(), "a claim was lost");
                done += ids.len();
                lat.push(t.elapsed());
            }
        }));
    }
    let mut claimed = 0;
    let mut claim_lat = Vec::new();
    for n in nodes {
        let (done, lat) = n.await?;
        claimed += done;
        claim_lat.extend(lat);
    }
    let claim_elapsed = claim_start.elapsed();
    claim_lat.sort_unstable();
    assert_eq!(claimed, jobs, "every job claimed exactly once");
    let claims = Run {
        ops: claimed,
        elapsed: claim_elapsed,
        latencies: claim_lat,
        rss_kib: rss_kib(),
    };

    let server: String = raw_db
        .client()
        .await?
        .query_one("SHOW server_version", &[])
        .await?
        .get(0);
    raw_db
        .client()
        .await?
        .batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .await?;

    println!("### Process store on PostgreSQL");
    println!();
    println!(
        "{total} operations from {CONCURRENCY} concurrent tasks, pool of {POOL} connections, local PostgreSQL {server} (default `synchronous_commit=on`){}. \
         Baseline: one single-row `INSERT` transaction per operation. Ours: `Runtime::create_process` + `transition_process` on `PgProcessStore` \
         (3 statements, 2 of them commits: insert, read, versioned update). Claims: {} rows drained by {NODES} nodes (own pools), each batch claimed with `PgDb::claim` (`FOR UPDATE SKIP LOCKED`) and completed with one owner-checked `UPDATE` (2 commits per batch). Commits/s is the fair comparison of write load.",
        if quick { ", `--quick`" } else { "" },
        claims.ops
    );
    println!();
    println!(
        "| Workload | p50 (ms) | p99 (ms) | Throughput (ops/s) | Commits/s | RSS after (MiB) | Ratio to baseline (ops/s) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (name, run, stmts) in [
        ("Baseline: raw single-row insert txn", &raw, 1.0),
        ("PgProcessStore create + transition", &ours, 2.0),
    ] {
        println!(
            "| {name} | {} | {} | {:.0} | {:.0} | {:.1} | {:.2} |",
            ms(run.pct(0.5)),
            ms(run.pct(0.99)),
            run.throughput(),
            run.throughput() * stmts,
            run.rss_kib as f64 / 1024.0,
            run.throughput() / raw.throughput()
        );
    }
    println!(
        "| Claim + complete, {NODES} nodes, batches of {BATCH} (rows; latency per batch) | {} | {} | {:.0} | {:.0} | {:.1} | {:.2} |",
        ms(claims.pct(0.5)),
        ms(claims.pct(0.99)),
        claims.throughput(),
        claims.throughput() / BATCH as f64 * 2.0,
        claims.rss_kib as f64 / 1024.0,
        claims.throughput() / raw.throughput()
    );
    println!();
    println!(
        "Peers: tokio-postgres 0.7, deadpool-postgres 0.14 (the baseline uses the same driver and pool)."
    );
    Ok(())
}
