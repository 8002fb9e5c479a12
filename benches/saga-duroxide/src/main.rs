//! duroxide on the workload it published: 20 concurrent orchestrations × 5 activities ×
//! 10 ms each, on its SQLite provider in a file. Prints one markdown table row, to be merged
//! with the `benches/saga` table.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use duroxide::providers::sqlite::SqliteProvider;
use duroxide::runtime::registry::ActivityRegistry;
use duroxide::runtime::{self};
use duroxide::{ActivityContext, Client, OrchestrationContext, OrchestrationRegistry};

fn main() {
    // duroxide logs through `tracing` to stdout; the output must be the table row only.
    if std::env::var_os("RUST_LOG").is_none() {
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("RUST_LOG", "off") };
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(run());
}

async fn run() {
    let quick = std::env::args().any(|a| a == "--quick");
    let dir = std::env::temp_dir().join(format!("duroxide-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("duroxide.db");
    std::fs::File::create(&path).expect("db file");
    let url = format!("sqlite:{}", path.display());
    let store = Arc::new(SqliteProvider::new(&url, None).await.expect("provider"));

    let activities = ActivityRegistry::builder()
        .register("Step", |_ctx: ActivityContext, input: String| async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Ok(input)
        })
        .build();
    let orchestration = |ctx: OrchestrationContext, input: String| async move {
        let mut v = input;
        for _ in 0..5 {
            v = ctx.schedule_activity("Step", v).await?;
        }
        Ok(v)
    };
    let orchestrations = OrchestrationRegistry::builder()
        .register("Saga", orchestration)
        .build();
    let rt = runtime::Runtime::start_with_store(store.clone(), activities, orchestrations).await;
    let client = Arc::new(Client::new(store.clone()));

    let run_for = Duration::from_secs(if quick { 3 } else { 10 });
    let t0 = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..20 {
        let (client, next) = (client.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while t0.elapsed() < run_for {
                let id = format!("saga-{}", next.fetch_add(1, Ordering::Relaxed));
                let t = Instant::now();
                client
                    .start_orchestration(&id, "Saga", "x")
                    .await
                    .expect("start");
                client
                    .wait_for_orchestration(&id, Duration::from_secs(60))
                    .await
                    .expect("wait");
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for w in workers {
        lat.extend(w.await.expect("worker"));
    }
    let elapsed = t0.elapsed();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e3;
    let per_sec = lat.len() as f64 / elapsed.as_secs_f64();
    println!(
        "| duroxide 0.1.32 (SQLite provider), 20 concurrent × 5 activities × 10 ms | {} | {per_sec:.0} | {:.2} | {:.2} | {:.1}% of the 400/s bound |",
        lat.len(),
        pct(0.5),
        pct(0.99),
        per_sec / 400.0 * 100.0
    );
    rt.shutdown(None).await;
    let _ = std::fs::remove_dir_all(&dir);
}
