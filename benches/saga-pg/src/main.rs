//! Durable 5-step no-op sagas on a local PostgreSQL at 200 concurrent, against raw single-row
//! insert transactions on the same server in the same run; and the failover time from a
//! SIGKILL of a node to its sagas running on another.
//!
//! `cargo run --release --manifest-path benches/saga-pg/Cargo.toml -- [--quick]`
//! (`DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`). Prints a markdown
//! section on stdout only.

use std::sync::Arc;
use std::time::{Duration, Instant};

use architectlm_core::extensions::SagaCoordinator;
use architectlm_core::extensions::saga::{SagaDefinition, SagaStep};
use architectlm_core::{Runtime, System};
use architectlm_saga::{Coordinator, PgSagaStore};
use architectlm_store::postgres::{PgDb, PgOptions};
use serde_json::json;
use tokio::sync::Semaphore;

const CONCURRENCY: usize = 200;
const STEPS: usize = 5;

fn url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// CPU seconds (user + system) of one `/proc/<pid>/stat` file's process.
fn proc_cpu(stat: &str) -> Option<f64> {
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// CPU seconds used so far by every PostgreSQL server process on this machine, by pid.
fn postgres_cpu() -> std::collections::HashMap<u32, f64> {
    let mut out = std::collections::HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(stat) = std::fs::read_to_string(e.path().join("stat"))
            && stat.contains("(postgres)")
            && let Some(cpu) = proc_cpu(&stat)
        {
            out.insert(pid, cpu);
        }
    }
    out
}

/// CPU seconds the server spent between two [`postgres_cpu`] snapshots (processes that
/// started in between count whole; those that ended in between are missed).
fn postgres_cpu_since(before: &std::collections::HashMap<u32, f64>) -> f64 {
    postgres_cpu()
        .iter()
        .map(|(pid, now)| now - before.get(pid).copied().unwrap_or(0.0))
        .sum()
}

/// CPU seconds used so far by this process.
fn self_cpu() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| proc_cpu(&s))
        .unwrap_or(0.0)
}

/// The server's current write-ahead log position, as text (`pg_lsn`).
async fn wal_lsn(db: &PgDb) -> String {
    let c = db.client().await.expect("client");
    c.query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .map(|r| r.get::<_, String>(0))
        .unwrap_or_default()
}

/// Bytes of write-ahead log the server wrote since `from` (by every client of the server).
async fn wal_since(db: &PgDb, from: &str) -> f64 {
    let c = db.client().await.expect("client");
    c.query_one(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::float8",
        &[&from],
    )
    .await
    .map(|r| r.get::<_, f64>(0))
    .unwrap_or(0.0)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

async fn db(schema: &str, app: &str) -> PgDb {
    PgDb::connect(
        PgOptions::new(url())
            .schema(schema)
            .pool_size(16)
            .application_name(app),
    )
    .await
    .expect("connect to PostgreSQL")
}

fn definition() -> SagaDefinition {
    let mut d = SagaDefinition::new("noop");
    for i in 0..STEPS {
        d = d.step(SagaStep::closure(format!("s{i}"), |_input, _ctx| async {
            Ok(json!(null))
        }));
    }
    d
}

fn slow_definition() -> SagaDefinition {
    let mut d = SagaDefinition::new("slow");
    for i in 0..STEPS {
        d = d.step(SagaStep::closure(format!("s{i}"), |_input, _ctx| async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok(json!(null))
        }));
    }
    d
}

async fn node(db: &PgDb, name: &str, lease: Duration) -> (Coordinator, Runtime, PgSagaStore) {
    let store = PgSagaStore::open(db.clone()).await.expect("saga tables");
    let sagas = Coordinator::builder()
        .store(Arc::new(store.clone()))
        .node_id(name)
        .lease_duration(lease)
        .takeover_interval(Duration::from_millis(50))
        .build()
        .expect("coordinator");
    sagas.define_saga(definition()).await.expect("definition");
    sagas
        .define_saga(slow_definition())
        .await
        .expect("definition");
    let system = System::builder("bench").build().expect("system");
    let rt = Runtime::builder(system)
        .extension(Arc::new(sagas.clone()))
        .start()
        .await
        .expect("runtime");
    (sagas, rt, store)
}

struct Run {
    per_sec: f64,
    p50: Duration,
    p99: Duration,
    extra: String,
    /// CPU microseconds per item: (PostgreSQL server, this process).
    cpu_us: (f64, f64),
}

async fn sagas_run(schema: &str, total: usize) -> Run {
    let db = db(schema, "saga-bench").await;
    let (sagas, rt, store) = node(&db, "bench-node", Duration::from_secs(10)).await;
    // Warm up the pool and the prepared statements.
    for _ in 0..50 {
        let s = sagas.start_saga("noop", json!({})).await.expect("start");
        sagas.settled(s.id).await;
    }
    let (rt0, w0) = store.write_stats();
    let lsn0 = wal_lsn(&db).await;
    let (pg0, me0) = (postgres_cpu(), self_cpu());
    let gate = Arc::new(Semaphore::new(CONCURRENCY));
    let started = Instant::now();
    let mut handles = Vec::with_capacity(total);
    for _ in 0..total {
        let permit = gate.clone().acquire_owned().await.expect("semaphore");
        let sagas = sagas.clone();
        handles.push(tokio::spawn(async move {
            let t = Instant::now();
            let s = sagas.start_saga("noop", json!({})).await.expect("start");
            sagas.settled(s.id).await;
            drop(permit);
            t.elapsed()
        }));
    }
    let mut lat = Vec::with_capacity(total);
    for h in handles {
        lat.push(h.await.expect("saga task"));
    }
    let elapsed = started.elapsed();
    let (pg, me) = (postgres_cpu_since(&pg0), self_cpu() - me0);
    let wal = wal_since(&db, &lsn0).await;
    let (rt1, w1) = store.write_stats();
    lat.sort();
    let trips = (rt1 - rt0) as f64;
    let run = Run {
        per_sec: total as f64 / elapsed.as_secs_f64(),
        p50: pct(&lat, 0.5),
        p99: pct(&lat, 0.99),
        extra: format!(
            "{:.3} round trips/step ({:.0} journal writes/round trip), {:.1} KiB of WAL/saga",
            trips / (total * STEPS) as f64,
            (w1 - w0) as f64 / trips.max(1.0),
            wal / 1024.0 / total as f64
        ),
        cpu_us: (pg * 1e6 / total as f64, me * 1e6 / total as f64),
    };
    rt.shutdown(Duration::from_secs(5)).await;
    run
}

async fn inserts_run(schema: &str, total: usize) -> Run {
    let db = db(schema, "saga-bench-raw").await;
    db.client()
        .await
        .expect("client")
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS raw_rows (id UUID PRIMARY KEY, v JSONB NOT NULL)",
        )
        .await
        .expect("table");
    let lsn0 = wal_lsn(&db).await;
    let (pg0, me0) = (postgres_cpu(), self_cpu());
    let gate = Arc::new(Semaphore::new(CONCURRENCY));
    let started = Instant::now();
    let mut handles = Vec::with_capacity(total);
    for _ in 0..total {
        let permit = gate.clone().acquire_owned().await.expect("semaphore");
        let db = db.clone();
        handles.push(tokio::spawn(async move {
            let t = Instant::now();
            let c = db.client().await.expect("client");
            c.execute(
                "INSERT INTO raw_rows (id, v) VALUES ($1, $2)",
                &[&uuid::Uuid::new_v4(), &json!({"n": 1})],
            )
            .await
            .expect("insert");
            drop(permit);
            t.elapsed()
        }));
    }
    let mut lat = Vec::with_capacity(total);
    for h in handles {
        lat.push(h.await.expect("insert task"));
    }
    let elapsed = started.elapsed();
    let (pg, me) = (postgres_cpu_since(&pg0), self_cpu() - me0);
    let wal = wal_since(&db, &lsn0).await;
    lat.sort();
    Run {
        per_sec: total as f64 / elapsed.as_secs_f64(),
        p50: pct(&lat, 0.5),
        p99: pct(&lat, 0.99),
        extra: format!(
            "1 round trip and 1 commit per row, {:.2} KiB of WAL/row",
            wal / 1024.0 / total as f64
        ),
        cpu_us: (pg * 1e6 / total as f64, me * 1e6 / total as f64),
    }
}

/// The child node of the failover measurement: starts slow sagas until it is killed.
async fn child(schema: String) {
    let db = db(&schema, "saga-bench-child").await;
    let (sagas, _rt, _store) = node(&db, "child", Duration::from_secs(1)).await;
    for _ in 0..300 {
        let _ = sagas.start_saga("slow", json!({})).await;
    }
    println!("ready");
    tokio::time::sleep(Duration::from_secs(600)).await;
}

/// Kills a node running 300 sagas and measures until every one is owned by the survivor.
async fn failover(schema: &str) -> Option<(Duration, usize)> {
    let exe = std::env::current_exe().ok()?;
    let db = db(schema, "saga-bench-survivor").await;
    let lease = Duration::from_secs(1);
    let (survivor, rt, _store) = node(&db, "survivor", lease).await;
    let mut child = std::process::Command::new(exe)
        .args(["--child", schema])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    {
        use std::io::BufRead;
        let out = child.stdout.take()?;
        let mut line = String::new();
        std::io::BufReader::new(out).read_line(&mut line).ok()?;
    }
    let _ = child.kill();
    let killed = Instant::now();
    let _ = child.wait();
    let count = |db: PgDb| async move {
        db.client()
            .await
            .ok()?
            .query_one(
                "SELECT count(*) FROM architectlm_saga_instances WHERE owner = 'child' \
                 AND status IN ('created', 'running', 'compensating')",
                &[],
            )
            .await
            .ok()
            .map(|r| r.get::<_, i64>(0))
    };
    let orphans = count(db.clone()).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let took = loop {
        if count(db.clone()).await? == 0 {
            break killed.elapsed();
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let _ = survivor.taken_over();
    rt.shutdown(Duration::from_secs(5)).await;
    Some((took, usize::try_from(orphans).unwrap_or(0)))
}

async fn drop_schema(schema: &str) {
    if let Ok(db) = PgDb::connect_url(url()).await
        && let Ok(c) = db.client().await
    {
        let _ = c
            .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
            .await;
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        if let Some(schema) = args.get(i + 1) {
            child(schema.clone()).await;
        }
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let total = if quick { 6_000 } else { 30_000 };
    let schema = format!("bench_{}", uuid::Uuid::new_v4().simple());

    let raw = inserts_run(&schema, total).await;
    let ours = sagas_run(&schema, total).await;
    let fail_schema = format!("bench_{}", uuid::Uuid::new_v4().simple());
    let fo = failover(&fail_schema).await;
    drop_schema(&schema).await;
    drop_schema(&fail_schema).await;

    let version = {
        let db = PgDb::connect_url(url()).await.ok();
        match db {
            Some(db) => match db.client().await {
                Ok(c) => c
                    .query_one("SHOW server_version", &[])
                    .await
                    .map(|r| r.get::<_, String>(0))
                    .unwrap_or_default(),
                Err(_) => String::new(),
            },
            None => String::new(),
        }
    };
    println!("### Sagas on PostgreSQL");
    println!();
    println!(
        "{total} durable 5-step no-op sagas at {CONCURRENCY} concurrent on one node against local \
         PostgreSQL {version} (pool 16, lease 10 s), vs {total} raw single-row INSERT transactions \
         at {CONCURRENCY} concurrent on the same server, same run{}.",
        if quick { " (--quick)" } else { "" }
    );
    println!();
    println!(
        "| workload | throughput | median | p99 | round trips | CPU per item (server / client) | ratio | peak RSS |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| raw INSERT transactions (baseline) | {:.0} rows/s | {} | {} | {} | {:.0} µs / {:.0} µs | 1.00× | |",
        raw.per_sec,
        ms(raw.p50),
        ms(raw.p99),
        raw.extra,
        raw.cpu_us.0,
        raw.cpu_us.1
    );
    println!(
        "| architectlm sagas (5 steps, PgSagaStore) | {:.0} sagas/s ({:.0} steps/s) | {} | {} | {} | {:.0} µs / {:.0} µs | {:.2}× sagas/s per raw row/s | {:.0} MiB |",
        ours.per_sec,
        ours.per_sec * STEPS as f64,
        ms(ours.p50),
        ms(ours.p99),
        ours.extra,
        ours.cpu_us.0,
        ours.cpu_us.1,
        ours.per_sec / raw.per_sec,
        rss_mib()
    );
    println!();
    println!(
        "CPU per item: user + system time of every PostgreSQL server process on the machine \
         (backends, WAL writer, checkpointer) and of the benchmark process during the run, \
         divided by the items done; the server and the benchmark share the machine's cores."
    );
    println!();
    match fo {
        Some((took, n)) => println!(
            "Failover: a node driving {n} unfinished sagas (lease 1 s, renewed every 333 ms) killed \
             with SIGKILL; every one owned by the surviving node (takeover every 50 ms) {} after \
             the kill.",
            ms(took)
        ),
        None => println!("Failover: not measured (the child node could not be run)."),
    }
}
