//! Code written the way a user writes it: one glob import of the prelude, then the concrete
//! extensions by name, their trait methods, and the contracts' traits named where a program
//! needs them (`Arc<dyn …>`).
#![cfg(all(
    feature = "saga",
    feature = "scheduler",
    feature = "supervisor",
    feature = "loadmanager"
))]

use std::sync::Arc;

use architectlm::extensions::loadmanager::{ResourceConfig, ResourceType};
use architectlm::extensions::{LoadManager as LoadManagerContract, SagaCoordinator};
use architectlm::prelude::*;
use serde_json::json;

#[tokio::test]
async fn the_prelude_names_the_concrete_extensions_and_brings_the_trait_methods() {
    let system = System::builder("shop")
        .task(TaskDefinition::new("noop", |i, _ctx| async move { Ok(i) }).unwrap())
        .build()
        .unwrap();
    let sagas = Arc::new(Coordinator::in_memory());
    let scheduler = Arc::new(TaskScheduler::in_memory());
    let supervisor = Arc::new(Supervisor::new());
    let load = Arc::new(LoadManager::new());
    let runtime = Runtime::builder(system)
        .extension(sagas.clone())
        .extension(scheduler.clone())
        .extension(supervisor.clone())
        .extension(load.clone())
        .start()
        .await
        .unwrap();

    // Trait methods on the concrete types, with no trait imported by name.
    load.register_resource(ResourceConfig::new("db", ResourceType::Database, 2))
        .await
        .unwrap();
    assert!(load.acquire_resource("db", 1).await.unwrap());
    sagas
        .define_saga(SagaDefinition::new("s").step(SagaStep::task("a", "noop")))
        .await
        .unwrap();
    let started = sagas.start_saga("s", json!({})).await.unwrap();
    let page = scheduler.get_tasks(Default::default()).await.unwrap();
    assert!(!page.has_more());

    // The contracts by name, where a program stores services behind them.
    let as_contract: Arc<dyn LoadManagerContract> = load.clone();
    assert!(as_contract.is_resource_available("db").await.unwrap());
    let coordinator: Arc<dyn SagaCoordinator> = sagas.clone();
    assert!(
        coordinator
            .get_saga_status(started.id)
            .await
            .unwrap()
            .is_some()
    );
    runtime.shutdown(std::time::Duration::from_secs(1)).await;
}
