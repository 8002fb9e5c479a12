//! Runtime overhead and memory of `architectlm-core`, printed as one markdown section.
//!
//! `cargo run --release --manifest-path benches/core/Cargo.toml -- [--quick]`
//!
//! Measures, in one run on a current-thread Tokio runtime:
//! - `execute_task` of a no-op task with no subscriber and with one (unread) subscriber,
//!   against awaiting the same async function directly: median and p99 per call, and the
//!   overhead (runtime minus direct) with its ratio to the direct call;
//! - `transition_process` without an action;
//! - the memory of N process instances held in the default in-memory store, in bytes per
//!   instance, counted by a global allocator (live bytes after minus before; the context is an
//!   empty object, which allocates nothing, so the figure excludes context data).

use std::alloc::{GlobalAlloc, Layout, System as SystemAlloc};
use std::hint::black_box;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use architectlm_core::{
    ProcessDefinition, Runtime, System, TaskDefinition, TaskError, TransitionDefinition,
};
use serde_json::{Value, json};

/// Counts live heap bytes.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged and only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { SystemAlloc.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { SystemAlloc.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { SystemAlloc.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

async fn noop(input: Value) -> Result<Value, TaskError> {
    Ok(input)
}

fn system() -> System {
    let task = TaskDefinition::new("noop", |input, _ctx| noop(input)).expect("valid task");
    let process = ProcessDefinition::builder("ticker")
        .state("on")
        .state("off")
        .transition(TransitionDefinition::new("on", "off", "toggle"))
        .transition(TransitionDefinition::new("off", "on", "toggle"))
        .build()
        .expect("valid process");
    System::builder("bench")
        .task(task)
        .process(process)
        .build()
        .expect("valid system")
}

/// Nanoseconds per call of each of `n` calls, after `n / 10` warm-up calls.
async fn sample<F, Fut>(n: usize, mut f: F) -> Vec<f64>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    for _ in 0..n / 10 {
        f().await;
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f().await;
        out.push(t.elapsed().as_nanos() as f64);
    }
    out.sort_by(f64::total_cmp);
    out
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn us(ns: f64) -> String {
    format!("{:.3} µs", ns / 1000.0)
}

struct Row {
    name: &'static str,
    median: f64,
    p99: f64,
    baseline: Option<(f64, f64)>,
    target: &'static str,
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let n = if quick { 20_000 } else { 200_000 };
    let instances = if quick { 100_000 } else { 1_000_000 };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");

    let (rows, bytes_per_instance, throughput) = rt.block_on(async {
        let runtime = Runtime::builder(system())
            .start()
            .await
            .expect("runtime starts");
        let direct = sample(n, || async {
            black_box(noop(black_box(Value::Null)).await).ok();
        })
        .await;
        let plain = sample(n, || async {
            black_box(runtime.execute_task("noop", Value::Null).await).ok();
        })
        .await;
        let one_sub = {
            // Unread: publishing must still never block, and the events are still built.
            let _sub = runtime.subscribe("*");
            sample(n, || async {
                black_box(runtime.execute_task("noop", Value::Null).await).ok();
            })
            .await
        };
        let instance = runtime
            .create_process("ticker", json!({}))
            .await
            .expect("created");
        let transition = sample(n, || async {
            black_box(
                runtime
                    .transition_process(instance.id, "toggle", Value::Null)
                    .await,
            )
            .ok();
        })
        .await;
        let base = (pct(&direct, 0.5), pct(&direct, 0.99));
        let rows = vec![
            Row {
                name: "direct call of the async fn (baseline)",
                median: base.0,
                p99: base.1,
                baseline: None,
                target: "",
            },
            Row {
                name: "`execute_task` no-op, no subscriber",
                median: pct(&plain, 0.5),
                p99: pct(&plain, 0.99),
                baseline: Some(base),
                target: "overhead ≤ 2 µs median",
            },
            Row {
                name: "`execute_task` no-op, one subscriber",
                median: pct(&one_sub, 0.5),
                p99: pct(&one_sub, 0.99),
                baseline: Some(base),
                target: "overhead ≤ 5 µs median",
            },
            Row {
                name: "`transition_process` without action",
                median: pct(&transition, 0.5),
                p99: pct(&transition, 0.99),
                baseline: None,
                target: "≤ 2 µs median",
            },
        ];

        // Memory: a fresh runtime so that nothing else is counted.
        let fresh = Runtime::builder(system())
            .start()
            .await
            .expect("runtime starts");
        let before = LIVE.load(Ordering::Relaxed);
        let t = Instant::now();
        for _ in 0..instances {
            fresh
                .create_process("ticker", json!({}))
                .await
                .expect("created");
        }
        let secs = t.elapsed().as_secs_f64();
        let after = LIVE.load(Ordering::Relaxed);
        let per = (after - before) as f64 / instances as f64;
        (rows, per, instances as f64 / secs)
    });

    println!("### Core runtime overhead and instance memory");
    println!();
    println!(
        "No-op task and action-less transition on a current-thread Tokio runtime, {n} timed calls each \
         after {} warm-up calls ({}); memory of {instances} instances in the in-memory store, counted by a \
         global allocator (context `{{}}`, which allocates nothing).",
        n / 10,
        if quick { "quick mode" } else { "full mode" }
    );
    println!();
    println!(
        "| operation | median | p99 | overhead vs direct (median / p99) | ratio to direct (median) | target |"
    );
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        let (over, ratio) = match r.baseline {
            Some((m, p)) => (
                format!("{} / {}", us(r.median - m), us(r.p99 - p)),
                format!("{:.1}×", r.median / m.max(1.0)),
            ),
            None => ("–".to_owned(), "–".to_owned()),
        };
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.name,
            us(r.median),
            us(r.p99),
            over,
            ratio,
            r.target
        );
    }
    println!(
        "| {instances} process instances in memory | {bytes_per_instance:.0} B per instance | – | – | – | ≤ 500 B |"
    );
    println!();
    println!(
        "`create_process` throughput while filling the store: {:.0} instances/s. The direct call is \
         measured with the same timer, so the ratio includes the timer's own cost on both sides. \
         Peers: none (the baseline is the task's own function).",
        throughput
    );
}
