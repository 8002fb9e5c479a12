//! Saga coordinator benchmark: runs every workload in one invocation and prints one markdown
//! section.
//!
//! Workloads (full / `--quick`):
//! - in memory: 5-step no-op sagas, 1,000 at a time (200,000 / 20,000 sagas);
//! - SQLite file, `synchronous=NORMAL`: 5-step no-op sagas, 200 at a time (40,000 / 5,000),
//!   with journal commits per step from the database's writer statistics; the same with
//!   `synchronous=FULL` (every commit flushed to the device, power-loss safe);
//! - raw SQLite inserts on the same settings in the same run: single-row writes from 200
//!   concurrent tasks (group commit), and 1,000-row transactions;
//! - duroxide's published workload: 20 concurrent sagas × 5 steps × 10 ms on SQLite, beside the
//!   same loop of plain Tokio sleeps without sagas (the timer's ceiling);
//! - recovery: 10,000 unfinished sagas resumed after a restart;
//! - memory: sagas parked inside a step (100,000 / 20,000).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use architectlm_core::extensions::SagaCoordinator;
use architectlm_core::extensions::saga::{SagaDefinition, SagaStep};
use architectlm_core::{Runtime, System, TaskDefinition};
use architectlm_saga::{Coordinator, SqliteSagaStore};
use architectlm_store::sqlite::{SqliteDb, SqliteOptions, Synchronous};
use serde_json::{Value, json};

/// Counts live heap bytes, so memory per saga is measured without allocator slack.
struct Counting;

static LIVE: AtomicU64 = AtomicU64::new(0);
/// Counting is switched on only for the memory workload, so it costs the others nothing.
static COUNT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

// SAFETY: forwards to the system allocator and only counts sizes.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        if COUNT.load(Ordering::Relaxed) {
            LIVE.fetch_add(l.size() as u64, Ordering::Relaxed);
        }
        unsafe { std::alloc::System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        if COUNT.load(Ordering::Relaxed) {
            LIVE.fetch_sub(l.size() as u64, Ordering::Relaxed);
        }
        unsafe { std::alloc::System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: std::alloc::Layout, n: usize) -> *mut u8 {
        if COUNT.load(Ordering::Relaxed) {
            LIVE.fetch_add(n as u64, Ordering::Relaxed);
            LIVE.fetch_sub(l.size() as u64, Ordering::Relaxed);
        }
        unsafe { std::alloc::System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

struct Row {
    workload: String,
    sagas: u64,
    per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    extra: String,
}

fn rss_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// CPU time this process used so far (user + system), from `/proc/self/stat` (10 ms ticks).
/// Beside wall-clock rates it gives a figure that other load on a shared machine does not skew.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

fn temp_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("alm-saga-bench-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn noop_system(sleep: Option<Duration>) -> System {
    let t = TaskDefinition::new("step", move |_input: Value, _ctx| async move {
        if let Some(d) = sleep {
            tokio::time::sleep(d).await;
        }
        Ok(Value::Null)
    })
    .expect("task");
    System::builder("bench").task(t).build().expect("system")
}

fn five_steps(id: &str) -> SagaDefinition {
    let mut d = SagaDefinition::new(id);
    for i in 0..5 {
        d = d.step(SagaStep::task(format!("s{i}"), "step"));
    }
    d
}

async fn start(sagas: &Coordinator, system: System) -> Runtime {
    Runtime::builder(system)
        .extension(Arc::new(sagas.clone()))
        .start()
        .await
        .expect("runtime")
}

/// `workers` closed loops, each starting a saga and waiting for it to end, until `total`
/// sagas ran (or `for_time` passed). Returns the latencies and the elapsed time.
async fn closed_loop(
    sagas: &Coordinator,
    saga: &'static str,
    workers: usize,
    total: u64,
    for_time: Option<Duration>,
) -> (Vec<Duration>, Duration) {
    let left = Arc::new(AtomicU64::new(total));
    let t0 = Instant::now();
    let stop_at = for_time.map(|d| t0 + d);
    let mut handles = Vec::new();
    for _ in 0..workers {
        let (sagas, left) = (sagas.clone(), left.clone());
        handles.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                if stop_at.is_some_and(|s| Instant::now() >= s) {
                    break;
                }
                if stop_at.is_none()
                    && left
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                        .is_err()
                {
                    break;
                }
                let t = Instant::now();
                let inst = sagas.start_saga(saga, Value::Null).await.expect("start");
                sagas.settled(inst.id).await;
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.expect("worker"));
    }
    let elapsed = t0.elapsed();
    all.sort();
    (all, elapsed)
}

async fn in_memory(quick: bool) -> Row {
    let n = if quick { 20_000 } else { 200_000 };
    let sagas = Coordinator::in_memory();
    sagas.define_saga(five_steps("noop")).await.expect("define");
    let rt = start(&sagas, noop_system(None)).await;
    // Warm-up.
    closed_loop(&sagas, "noop", 100, 2_000, None).await;
    let cpu0 = cpu_time();
    let (lat, el) = closed_loop(&sagas, "noop", 1_000, n, None).await;
    let cpu = cpu_time().saturating_sub(cpu0);
    rt.shutdown(Duration::from_secs(5)).await;
    let per_sec = lat.len() as f64 / el.as_secs_f64();
    let per_step_us = el.as_secs_f64() * 1e6 / (lat.len() as f64 * 5.0);
    let cpu_step_us = cpu.as_secs_f64() * 1e6 / (lat.len() as f64 * 5.0);
    Row {
        workload: "in memory, 5 no-op steps, 1,000 concurrent".into(),
        sagas: lat.len() as u64,
        per_sec,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        extra: format!(
            "{per_step_us:.2} µs wall time per step; {cpu_step_us:.2} µs CPU time per step (all threads)"
        ),
    }
}

async fn sqlite_store(path: &Path) -> SqliteSagaStore {
    sqlite_store_with(path, Synchronous::Normal).await
}

async fn sqlite_store_with(path: &Path, sync: Synchronous) -> SqliteSagaStore {
    let mut opts = SqliteOptions::file(path);
    opts.synchronous = sync;
    let db = SqliteDb::open(opts).expect("open");
    SqliteSagaStore::open(db).await.expect("migrate")
}

async fn sqlite(quick: bool) -> Row {
    sqlite_with(quick, Synchronous::Normal).await
}

/// The same closed loop with every commit flushed to the device (`synchronous=FULL`, power-loss
/// safe).
async fn sqlite_full(quick: bool) -> Row {
    sqlite_with(quick, Synchronous::Full).await
}

async fn sqlite_with(quick: bool, sync: Synchronous) -> Row {
    let n = if quick { 5_000 } else { 40_000 };
    let dir = temp_dir();
    let store = sqlite_store_with(&dir.join("sagas.sqlite"), sync).await;
    let sagas = Coordinator::with_store(Arc::new(store.clone()));
    sagas.define_saga(five_steps("noop")).await.expect("define");
    let rt = start(&sagas, noop_system(None)).await;
    closed_loop(&sagas, "noop", 200, 1_000, None).await;
    let stats = store.db().stats();
    let (c0, w0) = (
        stats.commits.load(Ordering::Relaxed),
        stats.writes.load(Ordering::Relaxed),
    );
    let cpu0 = cpu_time();
    let (lat, el) = closed_loop(&sagas, "noop", 200, n, None).await;
    let cpu = cpu_time().saturating_sub(cpu0);
    let commits = stats.commits.load(Ordering::Relaxed) - c0;
    let writes = stats.writes.load(Ordering::Relaxed) - w0;
    rt.shutdown(Duration::from_secs(5)).await;
    drop(sagas);
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
    let steps = lat.len() as f64 * 5.0;
    Row {
        workload: format!(
            "SQLite {}, 5 no-op steps, 200 concurrent",
            if sync == Synchronous::Full { "FULL (power-loss safe)" } else { "NORMAL" }
        ),
        sagas: lat.len() as u64,
        per_sec: lat.len() as f64 / el.as_secs_f64(),
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        extra: format!(
            "{:.3} commits/step, {:.3} write closures/step (6 journal entries per saga); {:.1} µs CPU time per saga (all threads)",
            commits as f64 / steps,
            writes as f64 / steps,
            cpu.as_secs_f64() * 1e6 / lat.len() as f64
        ),
    }
}

async fn raw_inserts(quick: bool) -> (Row, Row) {
    let n: u64 = if quick { 20_000 } else { 200_000 };
    let dir = temp_dir();
    let db = SqliteDb::open(SqliteOptions::file(dir.join("raw.sqlite"))).expect("open");
    db.write(|t| {
        t.execute_batch("CREATE TABLE raw (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
            .map_err(architectlm_core::Error::storage)
    })
    .await
    .expect("schema");
    // Single-row writes from 200 concurrent tasks: what the journal does.
    let next = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut hs = Vec::new();
    for _ in 0..200 {
        let (db, next) = (db.clone(), next.clone());
        hs.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                db.write(move |t| {
                    t.prepare_cached("INSERT INTO raw (id, v) VALUES (?1, 'x')")
                        .and_then(|mut s| s.execute([i as i64]))
                        .map_err(architectlm_core::Error::storage)
                })
                .await
                .expect("insert");
            }
        }));
    }
    for h in hs {
        h.await.expect("writer");
    }
    let single = n as f64 / t0.elapsed().as_secs_f64();
    // 1,000 rows per transaction.
    let batches = n / 1_000;
    let t0 = Instant::now();
    for b in 0..batches {
        db.write(move |t| {
            let mut s = t
                .prepare_cached("INSERT INTO raw (id, v) VALUES (?1, 'y')")
                .map_err(architectlm_core::Error::storage)?;
            for j in 0..1_000u64 {
                s.execute([(n + b * 1_000 + j) as i64])
                    .map_err(architectlm_core::Error::storage)?;
            }
            Ok(())
        })
        .await
        .expect("batch");
    }
    let batched = (batches * 1_000) as f64 / t0.elapsed().as_secs_f64();
    drop(db);
    let _ = std::fs::remove_dir_all(&dir);
    let row = |w: &str, r: f64| Row {
        workload: w.into(),
        sagas: 0,
        per_sec: r,
        p50_ms: f64::NAN,
        p99_ms: f64::NAN,
        extra: "rows/s (baseline)".into(),
    };
    (
        row(
            "raw SQLite NORMAL: single-row writes, 200 concurrent (group commit)",
            single,
        ),
        row("raw SQLite NORMAL: 1,000-row transactions", batched),
    )
}

async fn duroxide_workload(quick: bool) -> Row {
    let dir = temp_dir();
    let store = sqlite_store(&dir.join("sagas.sqlite")).await;
    let sagas = Coordinator::with_store(Arc::new(store));
    sagas
        .define_saga(five_steps("sleepy"))
        .await
        .expect("define");
    let rt = start(&sagas, noop_system(Some(Duration::from_millis(10)))).await;
    let run_for = Duration::from_secs(if quick { 3 } else { 10 });
    let (lat, el) = closed_loop(&sagas, "sleepy", 20, 0, Some(run_for)).await;
    rt.shutdown(Duration::from_secs(5)).await;
    drop(sagas);
    let _ = std::fs::remove_dir_all(&dir);
    let per_sec = lat.len() as f64 / el.as_secs_f64();
    Row {
        workload: "duroxide workload: SQLite, 20 concurrent × 5 steps × 10 ms".into(),
        sagas: lat.len() as u64,
        per_sec,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        extra: format!("{:.1}% of the 400/s bound", per_sec / 400.0 * 100.0),
    }
}

/// The same 20 × 5 × 10 ms loop with no saga code: five `tokio::time::sleep(10 ms)` in a row per
/// iteration. Tokio's timer works in whole milliseconds and rounds every sleep up, so this is the
/// ceiling any coordinator running 10 ms Tokio sleeps can reach on this machine.
async fn sleep_ceiling(quick: bool) -> Row {
    let run_for = Duration::from_secs(if quick { 3 } else { 10 });
    let t0 = Instant::now();
    let stop_at = t0 + run_for;
    let mut handles = Vec::new();
    for _ in 0..20 {
        handles.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < stop_at {
                let t = Instant::now();
                for _ in 0..5 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for h in handles {
        lat.extend(h.await.expect("worker"));
    }
    let el = t0.elapsed();
    lat.sort();
    let per_sec = lat.len() as f64 / el.as_secs_f64();
    Row {
        workload: "plain Tokio, same loop without sagas: 20 concurrent × 5 sleeps of 10 ms".into(),
        sagas: lat.len() as u64,
        per_sec,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        extra: format!(
            "{:.1}% of the 400/s bound (the timer's ceiling: Tokio rounds each sleep up to whole milliseconds)",
            per_sec / 400.0 * 100.0
        ),
    }
}

async fn recovery() -> Row {
    let n = 10_000;
    let dir = temp_dir();
    let path = dir.join("sagas.sqlite");
    {
        // A coordinator that is not bound to a runtime journals instances without running them:
        // what a node leaves behind when it dies with sagas in flight.
        let sagas = Coordinator::with_store(Arc::new(sqlite_store(&path).await));
        sagas.define_saga(five_steps("noop")).await.expect("define");
        let mut pending = Vec::new();
        for _ in 0..n {
            let s = sagas.clone();
            pending.push(async move { s.start_saga("noop", Value::Null).await });
            if pending.len() == 500 {
                for r in join_all(std::mem::take(&mut pending)).await {
                    r.expect("journal");
                }
            }
        }
        for r in join_all(pending).await {
            r.expect("journal");
        }
    }
    let sagas = Coordinator::with_store(Arc::new(sqlite_store(&path).await));
    sagas.define_saga(five_steps("noop")).await.expect("define");
    let t0 = Instant::now();
    let rt = start(&sagas, noop_system(None)).await;
    let resumed = t0.elapsed();
    while sagas.active() > 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let finished = t0.elapsed();
    rt.shutdown(Duration::from_secs(5)).await;
    let _ = std::fs::remove_dir_all(&dir);
    Row {
        workload: format!("recovery: {n} unfinished sagas after a restart (SQLite)"),
        sagas: n as u64,
        per_sec: f64::NAN,
        p50_ms: f64::NAN,
        p99_ms: f64::NAN,
        extra: format!(
            "all resumed {:.0} ms after start; all finished after {:.0} ms",
            resumed.as_secs_f64() * 1e3,
            finished.as_secs_f64() * 1e3
        ),
    }
}

/// Awaits futures concurrently (each on a task of its own).
async fn join_all<F>(fs: Vec<F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let hs: Vec<_> = fs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(hs.len());
    for h in hs {
        out.push(h.await.expect("task"));
    }
    out
}

async fn memory(quick: bool) -> Row {
    let n: u64 = if quick { 20_000 } else { 100_000 };
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let entered = Arc::new(AtomicU64::new(0));
    let (g, e) = (gate.clone(), entered.clone());
    let park = TaskDefinition::new("park", move |_input: Value, _ctx| {
        let (g, e) = (g.clone(), e.clone());
        async move {
            e.fetch_add(1, Ordering::Relaxed);
            let _permit = g.acquire().await.map_err(|x| x.to_string())?;
            Ok(Value::Null)
        }
    })
    .expect("task");
    let system = System::builder("mem").task(park).build().expect("system");
    let sagas = Coordinator::in_memory();
    let mut def = SagaDefinition::new("parked");
    for i in 0..5 {
        def = def.step(SagaStep::task(format!("s{i}"), "park"));
    }
    sagas.define_saga(def).await.expect("define");
    let rt = start(&sagas, system).await;
    let before = rss_kb("VmRSS:");
    // Frees of blocks allocated before counting started make the counter wrap below zero;
    // the difference of two readings stays right in wrapping arithmetic.
    COUNT.store(true, Ordering::SeqCst);
    let live_before = LIVE.load(Ordering::Relaxed);
    for _ in 0..n {
        sagas
            .start_saga("parked", json!({"order": 1}))
            .await
            .expect("start");
    }
    while entered.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let after = rss_kb("VmRSS:");
    let live = LIVE.load(Ordering::Relaxed).wrapping_sub(live_before) as f64 / n as f64;
    COUNT.store(false, Ordering::SeqCst);
    gate.add_permits(usize::MAX >> 4);
    rt.shutdown(Duration::from_secs(10)).await;
    let per = (after.saturating_sub(before)) as f64 * 1024.0 / n as f64;
    Row {
        workload: "memory: sagas parked inside a step (in memory journal)".into(),
        sagas: n,
        per_sec: f64::NAN,
        p50_ms: f64::NAN,
        p99_ms: f64::NAN,
        extra: format!("{live:.0} live heap bytes per waiting saga ({per:.0} RSS)"),
    }
}

fn fmt(v: f64, digits: usize) -> String {
    if v.is_nan() {
        "–".into()
    } else {
        format!("{v:.digits$}")
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    // `--only=sqlite,raw` runs the named workloads (in-memory, sqlite, raw, duroxide,
    // recovery, memory), for profiling and quick comparisons.
    if let Some(only) = std::env::args().find_map(|a| a.strip_prefix("--only=").map(str::to_owned))
    {
        let mut rows = Vec::new();
        for name in only.split(',') {
            match name {
                "in-memory" => rows.push(in_memory(quick).await),
                "sqlite" => rows.push(sqlite(quick).await),
                "sqlite-full" => rows.push(sqlite_full(quick).await),
                "raw" => {
                    let (a, b) = raw_inserts(quick).await;
                    rows.extend([a, b]);
                }
                "duroxide" => rows.push(duroxide_workload(quick).await),
                "ceiling" => rows.push(sleep_ceiling(quick).await),
                "recovery" => rows.push(recovery().await),
                "memory" => rows.push(memory(quick).await),
                other => {
                    eprintln!(
                        "unknown workload \"{other}\" in --only (expected in-memory, sqlite, sqlite-full, raw, duroxide, ceiling, recovery or memory)"
                    );
                    std::process::exit(2);
                }
            }
        }
        for r in rows {
            println!(
                "{} | {} | {} | {} | {} | {}",
                r.workload,
                r.sagas,
                fmt(r.per_sec, 0),
                fmt(r.p50_ms, 2),
                fmt(r.p99_ms, 2),
                r.extra
            );
        }
        return;
    }
    let mem = in_memory(quick).await;
    let sql = sqlite(quick).await;
    let sql_full = sqlite_full(quick).await;
    let (raw1, raw2) = raw_inserts(quick).await;
    let dur = duroxide_workload(quick).await;
    let ceiling = sleep_ceiling(quick).await;
    let rec = recovery().await;
    let park = memory(quick).await;
    let sql_steps_per_sec = sql.per_sec * 5.0;
    println!(
        "### Saga coordinator{}",
        if quick { " (quick)" } else { "" }
    );
    println!();
    println!(
        "5-step sagas through `Runtime::execute`, closed loops (start, wait until settled); SQLite in a file, WAL, `synchronous=NORMAL`; {} cores; peak RSS {} MB.",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        rss_kb("VmHWM:") / 1024
    );
    println!();
    println!("| workload | sagas | sagas/s (rows/s) | p50 ms | p99 ms | notes |");
    println!("|---|---:|---:|---:|---:|---|");
    for r in [&mem, &sql, &sql_full, &raw1, &raw2, &dur, &ceiling, &rec, &park] {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.workload,
            if r.sagas == 0 {
                "–".into()
            } else {
                r.sagas.to_string()
            },
            fmt(r.per_sec, 0),
            fmt(r.p50_ms, 2),
            fmt(r.p99_ms, 2),
            r.extra
        );
    }
    println!();
    println!(
        "Ratios in this run: SQLite journal steps/s vs raw single-row writes/s = {:.2}; duroxide workload vs its 400/s bound = {:.2}, vs plain Tokio sleeps on the same loop = {:.2} (duroxide itself published 16–28/s on this workload; run in the same invocation by `benches/saga-duroxide`, row below).",
        sql_steps_per_sec / raw1.per_sec,
        dur.per_sec / 400.0,
        dur.per_sec / ceiling.per_sec
    );
}
