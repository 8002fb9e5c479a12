//! The core `LoadManager` contract, the runtime extension, events on the runtime's bus, and
//! system samples.

mod support;

use std::sync::Arc;
use std::time::Duration;

use architectlm_core::extensions::LoadManager as _;
use architectlm_core::extensions::loadmanager::{
    CircuitStatus, LoadEvent, ResourceConfig, ResourceType, Thresholds,
};
use architectlm_core::{Error, EventFilter, Runtime, System, TaskDefinition};
use architectlm_loadmanager::{EVENT_SOURCE, LoadManager, ResourceSettings, SystemSample};
use serde_json::json;
use support::*;

#[tokio::test]
async fn unknown_ids_and_invalid_configs_are_consistent_errors() {
    let m = LoadManager::new();
    for err in [
        m.is_resource_available("nope").await.unwrap_err(),
        m.acquire_resource("nope", 1).await.unwrap_err(),
        m.release_resource("nope", 1).await.unwrap_err(),
        m.acquire_permit("nope", 1, None).await.unwrap_err(),
    ] {
        assert_eq!(err.to_string(), "unknown resource \"nope\"");
    }
    assert!(m.get_resource_status("nope").await.unwrap().is_none());

    let cases = [
        (
            ResourceConfig::new("a", ResourceType::Api, 0),
            "capacity = 0",
        ),
        (
            ResourceConfig::new("a", ResourceType::Api, 10)
                .thresholds(Thresholds::new(70.0, 85.0, 120.0)),
            "thresholds.circuit = 120",
        ),
        (
            ResourceConfig::new("a", ResourceType::Api, 10)
                .thresholds(Thresholds::new(-5.0, 85.0, 95.0)),
            "thresholds.warning = -5",
        ),
        (
            ResourceConfig::new("a", ResourceType::Api, 10)
                .thresholds(Thresholds::new(90.0, 85.0, 95.0)),
            "thresholds.critical = 85: must not be below thresholds.warning (90)",
        ),
    ];
    for (config, expected) in cases {
        let err = m.register_resource(config).await.unwrap_err();
        assert!(matches!(err, Error::InvalidConfig { .. }));
        assert!(
            err.to_string().contains(expected),
            "{err} should contain {expected}"
        );
    }
    assert!(m.is_empty(), "nothing invalid was registered");

    m.register_resource(ResourceConfig::new("a", ResourceType::Api, 10))
        .await
        .unwrap();
    let dup = m
        .register_resource(ResourceConfig::new("a", ResourceType::Api, 5))
        .await
        .unwrap_err();
    assert_eq!(
        dup.to_string(),
        "invalid configuration: id = \"a\": a resource with this id is already registered"
    );
    let zero = m.acquire_resource("a", 0).await.unwrap_err();
    assert!(matches!(zero, Error::InvalidInput(_)));
}

#[tokio::test]
async fn the_original_payment_api_scenario() {
    let m = Arc::new(LoadManager::new());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<LoadEvent>();
    let _sub = m.on_load_event(
        EventFilter::from("threshold-warning"),
        Arc::new(move |e: &LoadEvent| {
            let _ = tx.send(e.clone());
        }),
    );
    m.register_resource(
        ResourceConfig::new("payment-api", ResourceType::Api, 100)
            .thresholds(Thresholds::new(70.0, 85.0, 95.0)),
    )
    .await
    .unwrap();
    for _ in 0..75 {
        assert!(m.acquire_resource("payment-api", 1).await.unwrap());
    }
    let e = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(e.resource_id, "payment-api");
    assert_eq!(e.payload["used"], json!(70));
    let st = m.get_resource_status("payment-api").await.unwrap().unwrap();
    assert_eq!(
        (st.status, st.used, st.available),
        (CircuitStatus::Warning, 75, 25)
    );
    assert_eq!(st.usage_percentage, 75.0);
    m.release_resource("payment-api", 75).await.unwrap();
    let all = m.get_all_resource_statuses().await.unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!((all[0].used, all[0].status), (0, CircuitStatus::Closed));

    let permit = m
        .acquire_permit("payment-api", 10, Some(Duration::from_millis(10)))
        .await
        .unwrap();
    assert_eq!(m.resource("payment-api").unwrap().used(), 10);
    permit.success();
    assert_eq!(m.resource("payment-api").unwrap().used(), 0);
}

#[tokio::test]
async fn events_are_forwarded_to_the_runtime_bus_and_tasks_find_the_service() {
    let m = Arc::new(LoadManager::new());
    m.register(
        ResourceSettings::builder("payment-api", ResourceType::Api, 2)
            .consecutive_failures(1)
            .build()
            .unwrap(),
    )
    .unwrap();
    let pay = TaskDefinition::new("pay", |input, ctx| async move {
        let lm = ctx
            .load_manager()
            .map_err(|e| architectlm_core::TaskError::new(e.to_string()))?;
        let permit = lm
            .acquire_permit("payment-api", 1, None)
            .await
            .map_err(|e| architectlm_core::TaskError::new(e.to_string()))?;
        if input["fail"] == json!(true) {
            permit.failure();
            return Err(architectlm_core::TaskError::new("card declined"));
        }
        permit.success();
        Ok(json!({"paid": true}))
    })
    .unwrap();
    let system = System::builder("shop").task(pay).build().unwrap();
    let runtime = Runtime::builder(system)
        .extension(m.clone())
        .start()
        .await
        .unwrap();
    let mut bus = runtime.subscribe("circuit-open");

    assert_eq!(
        runtime.execute_task("pay", json!({})).await.unwrap(),
        json!({"paid": true})
    );
    assert!(
        runtime
            .execute_task("pay", json!({"fail": true}))
            .await
            .is_err()
    );
    let e = tokio::time::timeout(Duration::from_secs(5), bus.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(e.source, EVENT_SOURCE);
    assert_eq!(e.payload["resource_id"], json!("payment-api"));
    assert_eq!(e.payload["reason"], json!("consecutive-failures"));
    let refused = runtime.execute_task("pay", json!({})).await.unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("resource \"payment-api\" unavailable: circuit open"),
        "{refused}"
    );
    assert_eq!(m.resource("payment-api").unwrap().used(), 0);
}

#[test]
fn system_samples_drive_cpu_memory_and_disk_resources() {
    let (m, _c) = manual();
    let mut sub = m.subscribe("*");
    let cpu = register(&m, ResourceSettings::builder("cpu", ResourceType::Cpu, 100));
    let mem = register(
        &m,
        ResourceSettings::builder("mem", ResourceType::Memory, 1_000)
            .thresholds(Thresholds::new(50.0, 80.0, 99.0)),
    );
    let api = register(&m, ResourceSettings::builder("api", ResourceType::Api, 10));
    let n = m.apply_system_sample(&SystemSample::new(Some(72.4), Some(85.0), None));
    assert_eq!(n, 2);
    assert_eq!(
        (cpu.used(), cpu.status().status),
        (72, CircuitStatus::Warning)
    );
    assert_eq!(
        (mem.used(), mem.status().status),
        (850, CircuitStatus::Critical)
    );
    assert_eq!(api.used(), 0);
    m.apply_system_sample(&SystemSample::new(Some(10.0), Some(f64::NAN), None));
    assert_eq!(
        (cpu.used(), cpu.status().status),
        (10, CircuitStatus::Closed)
    );
    assert_eq!(mem.used(), 0, "a non-finite sample counts as zero");
    assert_eq!(drain(&mut sub).len(), 4);
}

#[cfg(feature = "system")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_system_sampler_reads_the_machine() {
    let m = Arc::new(LoadManager::new());
    let mem = m
        .register(
            ResourceSettings::builder("mem", ResourceType::Memory, 10_000)
                .open_on_usage(false)
                .build()
                .unwrap(),
        )
        .unwrap();
    m.start_system_sampler(Duration::from_millis(20));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    // Any running machine uses some memory: wait for the sampler's first reading.
    while mem.used() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no sample within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(mem.used() <= 10_000);
    m.stop_sampler();
}
