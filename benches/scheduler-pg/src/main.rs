//! Scheduled runs claimed and executed across three scheduler nodes sharing one PostgreSQL
//! database, against raw single-row insert transactions on the same server in the same run;
//! then the failover time of a node killed with SIGKILL. Prints one markdown section.
//!
//! `cargo run --release --manifest-path benches/scheduler-pg/Cargo.toml -- [--quick]`
//! (`DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use architectlm_core::extensions::scheduler::ScheduledTaskConfig;
use architectlm_core::{Runtime, System, TaskDefinition};
use architectlm_scheduler::{ClusterOptions, TaskScheduler};
use architectlm_store::postgres::{PgDb, PgOptions};
use architectlm_store::schedule::PgScheduleStore;
use chrono::Utc;
use serde_json::json;

const NODES: usize = 3;
const POOL: usize = 16;
const FAILOVER_LEASE: Duration = Duration::from_secs(1);

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn url() -> String {
    std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

async fn connect(schema: &str) -> Res<PgDb> {
    Ok(PgDb::connect(PgOptions::new(url()).schema(schema).pool_size(POOL)).await?)
}

async fn node(
    schema: &str,
    name: &str,
    lease: Duration,
    counter: Arc<AtomicUsize>,
    pause: Duration,
) -> Res<(Runtime, Arc<TaskScheduler>)> {
    let db = connect(schema).await?;
    let store = Arc::new(PgScheduleStore::open(db).await?);
    let scheduler = Arc::new(
        TaskScheduler::builder()
            .cluster(
                store,
                ClusterOptions::new(name)
                    .lease(lease)
                    .poll_interval(Duration::from_millis(50)),
            )
            .build(),
    );
    let task = TaskDefinition::new("noop", move |input, _ctx| {
        let counter = counter.clone();
        async move {
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            counter.fetch_add(1, Ordering::Relaxed);
            Ok(input)
        }
    })?;
    let system = System::builder("bench").task(task).build()?;
    let runtime = Runtime::builder(system)
        .extension(scheduler.clone())
        .start()
        .await?;
    Ok((runtime, scheduler))
}

async fn count(db: &PgDb, sql: &str) -> Res<i64> {
    Ok(db.client().await?.query_one(sql, &[]).await?.try_get(0)?)
}

/// Our side: `n` one-shot runs all due at one instant, drained by three nodes. Returns
/// (executed/s, recorded/s, seconds to execute all).
async fn ours(schema: &str, n: usize) -> Res<(f64, f64, f64)> {
    let counter = Arc::new(AtomicUsize::new(0));
    let mut nodes = Vec::new();
    for i in 0..NODES {
        nodes.push(
            node(
                schema,
                &format!("bench-{i}"),
                Duration::from_secs(30),
                counter.clone(),
                Duration::ZERO,
            )
            .await?,
        );
    }
    let due = Utc::now() + chrono::Duration::seconds(2);
    for chunk in (0..n).collect::<Vec<_>>().chunks(5000) {
        let configs = chunk
            .iter()
            .map(|k| ScheduledTaskConfig::new("noop", json!({ "k": k }), due))
            .collect();
        nodes[0].1.schedule_many(configs).await?;
    }
    let wait = (due - Utc::now()).to_std().unwrap_or(Duration::ZERO);
    tokio::time::sleep(wait).await;
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(300);
    while counter.load(Ordering::Relaxed) < n {
        if Instant::now() > deadline {
            return Err("runs did not finish in time".into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let executed = t0.elapsed();
    let db = connect(schema).await?;
    loop {
        let done = count(&db, "SELECT count(*) FROM scheduler_runs WHERE state = 'completed'").await?;
        if done as usize >= n {
            break;
        }
        if Instant::now() > deadline {
            return Err("runs were not recorded in time".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let recorded = t0.elapsed();
    let twice = counter.load(Ordering::Relaxed).saturating_sub(n);
    if twice > 0 {
        return Err(format!("{twice} runs executed twice").into());
    }
    for (rt, _) in nodes {
        rt.shutdown(Duration::from_secs(2)).await;
    }
    Ok((
        n as f64 / executed.as_secs_f64(),
        n as f64 / recorded.as_secs_f64(),
        executed.as_secs_f64(),
    ))
}

/// The baseline: `n` single-row insert transactions (autocommit) over the same number of
/// connections. Returns rows/s.
async fn baseline(schema: &str, n: usize) -> Res<f64> {
    let db = connect(schema).await?;
    db.client()
        .await?
        .batch_execute("CREATE TABLE baseline (id BIGINT PRIMARY KEY, v TEXT NOT NULL)")
        .await?;
    let next = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..NODES * POOL {
        let db = db.clone();
        let next = next.clone();
        workers.push(tokio::spawn(async move {
            let client = db.client().await?;
            let stmt = client
                .prepare("INSERT INTO baseline (id, v) VALUES ($1, $2)")
                .await?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                client.execute(&stmt, &[&(i as i64), &"run"]).await?;
            }
            Res::Ok(())
        }));
    }
    for w in workers {
        w.await??;
    }
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

/// A node in a child process with slow runs, killed with SIGKILL while it holds runs; returns
/// (runs it held, seconds from the kill until all were owned by other nodes).
async fn failover(schema: &str) -> Res<(i64, f64)> {
    let counter = Arc::new(AtomicUsize::new(0));
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args(["--child", schema])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no child stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.trim() == "READY" => break,
            Some(_) => {}
            None => return Err("the child node did not start".into()),
        }
    }
    let mut nodes = Vec::new();
    for i in 0..NODES {
        nodes.push(
            node(
                schema,
                &format!("survivor-{i}"),
                FAILOVER_LEASE,
                counter.clone(),
                Duration::ZERO,
            )
            .await?,
        );
    }
    let db = connect(schema).await?;
    let due = Utc::now() + chrono::Duration::milliseconds(300);
    let configs = (0..2000)
        .map(|k| {
            let at = due + chrono::Duration::milliseconds(k);
            ScheduledTaskConfig::new("noop", json!({ "k": k }), at)
        })
        .collect();
    nodes[0].1.schedule_many(configs).await?;
    let held_sql = "SELECT count(*) FROM scheduler_runs WHERE owner = 'victim' AND state = 'claimed'";
    let deadline = Instant::now() + Duration::from_secs(30);
    while count(&db, held_sql).await? < 1 {
        if Instant::now() > deadline {
            return Err("the child claimed nothing".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill()?;
    let killed = Instant::now();
    child.wait()?;
    let held = count(&db, held_sql).await?;
    while count(&db, held_sql).await? > 0 {
        if Instant::now() > deadline + Duration::from_secs(30) {
            return Err("runs of the killed node were not taken over".into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let took = killed.elapsed().as_secs_f64();
    for (rt, _) in nodes {
        rt.shutdown(Duration::from_secs(2)).await;
    }
    Ok((held, took))
}

async fn child(schema: &str) -> Res<()> {
    let (_rt, _s) = node(
        schema,
        "victim",
        FAILOVER_LEASE,
        Arc::new(AtomicUsize::new(0)),
        Duration::from_millis(200),
    )
    .await?;
    println!("READY");
    tokio::time::sleep(Duration::from_secs(120)).await;
    Ok(())
}

async fn drop_schema(schema: &str) -> Res<()> {
    let db = PgDb::connect_url(url()).await?;
    db.client()
        .await?
        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .await?;
    Ok(())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        let schema = args.get(i + 1).ok_or("--child needs a schema")?;
        return child(schema).await;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let n = if quick { 20_000 } else { 100_000 };
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let (s_ours, s_base, s_fail) = (
        format!("bench_sched_{tag}"),
        format!("bench_base_{tag}"),
        format!("bench_fail_{tag}"),
    );
    let version: String = {
        let db = PgDb::connect_url(url()).await?;
        db.client()
            .await?
            .query_one("SHOW server_version", &[])
            .await?
            .try_get(0)?
    };
    let result = async {
        let (exec, rec, secs) = ours(&s_ours, n).await?;
        let rss = peak_rss_mb();
        let base = baseline(&s_base, n).await?;
        let (held, took) = failover(&s_fail).await?;
        Res::Ok((exec, rec, secs, rss, base, held, took))
    }
    .await;
    for s in [&s_ours, &s_base, &s_fail] {
        drop_schema(s).await?;
    }
    let (exec, rec, secs, rss, base, held, took) = result?;
    println!("### Scheduler on PostgreSQL: runs claimed and executed across {NODES} nodes");
    println!();
    println!(
        "{n} one-shot runs of a no-op task, all due at one instant, drained by {NODES} scheduler nodes (one process, a pool of {POOL} connections each) sharing local PostgreSQL {version}; baseline: {n} single-row `INSERT` transactions (autocommit) over {} connections to the same server, same run. {}.",
        NODES * POOL,
        if quick { "`--quick`" } else { "full run" }
    );
    println!();
    println!("| Workload | Throughput | Time | Peak RSS | Ratio to baseline |");
    println!("|---|---|---|---|---|");
    println!(
        "| architectlm-scheduler, 3 nodes: runs executed | {exec:.0} runs/s | {secs:.2} s | {rss:.0} MB | {:.2}× |",
        exec / base
    );
    println!(
        "| architectlm-scheduler, 3 nodes: runs executed and recorded | {rec:.0} runs/s | {:.2} s | — | {:.2}× |",
        n as f64 / rec,
        rec / base
    );
    println!(
        "| baseline: single-row insert transactions | {base:.0} rows/s | {:.2} s | — | 1.00× |",
        n as f64 / base
    );
    println!();
    println!(
        "Failover: a node killed with SIGKILL while holding {held} claimed runs (lease {:.1} s, renewed every lease/3, poll 50 ms); all its runs were owned by surviving nodes {took:.2} s after the kill.",
        FAILOVER_LEASE.as_secs_f64()
    );
    println!();
    println!("Versions: PostgreSQL {version}; tokio-postgres 0.7, deadpool-postgres 0.14 (our pool).");
    Ok(())
}
