//! Micro-benchmarks of the runtime's hot paths: executing a no-op task (against calling the
//! same async function directly), transitions without an action, and creating instances.
//!
//! `cargo bench -p architectlm-core --bench runtime`

#![allow(missing_docs)] // criterion's macros generate undocumented items.

use std::hint::black_box;

use architectlm_core::{
    ProcessDefinition, Runtime, System, TaskDefinition, TaskError, TransitionDefinition,
};
use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::{Value, json};

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

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let runtime: Runtime = rt
        .block_on(Runtime::builder(system()).start())
        .expect("runtime starts");

    let mut g = c.benchmark_group("execute_task");
    g.bench_function("direct async fn call (baseline)", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(noop(black_box(Value::Null)).await) })
    });
    g.bench_function("no-op task, no subscriber", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(runtime.execute_task("noop", Value::Null).await) })
    });
    {
        // An unread subscription still makes the runtime build and publish every event.
        let _sub = runtime.subscribe("*");
        g.bench_function("no-op task, one subscriber", |b| {
            b.to_async(&rt)
                .iter(|| async { black_box(runtime.execute_task("noop", Value::Null).await) })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("process");
    let instance = rt
        .block_on(runtime.create_process("ticker", json!({"n": 1})))
        .expect("created");
    g.bench_function("transition_process without action", |b| {
        b.to_async(&rt).iter(|| async {
            black_box(
                runtime
                    .transition_process(instance.id, "toggle", Value::Null)
                    .await,
            )
        })
    });
    g.bench_function("create_process", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(runtime.create_process("ticker", json!({})).await) })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
