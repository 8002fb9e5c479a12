//! Micro-benchmarks of the closed-state hot path: acquire + record + release on one thread,
//! with and without outcome rules and event subscribers, against a bare atomic counter, and a
//! lookup by id among many resources.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use architectlm_core::extensions::loadmanager::ResourceType;
use architectlm_loadmanager::{LoadManager, ResourceSettings, SlidingWindow};
use criterion::{Criterion, criterion_group, criterion_main};

fn settings(id: &str) -> architectlm_loadmanager::ResourceSettingsBuilder {
    ResourceSettings::builder(id, ResourceType::Api, 1_000_000)
}

fn hot_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("closed_call");
    let counter = AtomicU64::new(0);
    g.bench_function("bare_atomic_u64", |b| {
        b.iter(|| {
            counter.fetch_add(1, Ordering::AcqRel);
            black_box(&counter);
            counter.fetch_sub(1, Ordering::AcqRel);
        })
    });

    let m = LoadManager::new();
    let plain = m.register(settings("plain").build().unwrap()).unwrap();
    g.bench_function("usage_only", |b| {
        b.iter(|| plain.try_acquire(black_box(1)).unwrap().success())
    });

    let rated = m
        .register(
            settings("rated")
                .failure_rate_threshold(50.0)
                .sliding_window(SlidingWindow::Count(100))
                .consecutive_failures(5)
                .build()
                .unwrap(),
        )
        .unwrap();
    g.bench_function("failure_rate_and_consecutive", |b| {
        b.iter(|| rated.try_acquire(black_box(1)).unwrap().success())
    });
    g.bench_function("owned_core_permit", |b| {
        b.iter(|| rated.try_acquire_owned(black_box(1)).unwrap().success())
    });

    let _sub = m.subscribe("*");
    g.bench_function("failure_rate_with_subscriber", |b| {
        b.iter(|| rated.try_acquire(black_box(1)).unwrap().success())
    });
    g.finish();

    let many = LoadManager::new();
    for i in 0..10_000 {
        many.register(settings(&format!("resource-{i}")).build().unwrap())
            .unwrap();
    }
    c.bench_function("lookup_among_10k", |b| {
        b.iter(|| black_box(many.resource(black_box("resource-4711"))))
    });
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
