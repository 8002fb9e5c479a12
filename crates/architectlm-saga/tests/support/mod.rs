//! Shared helpers of the saga integration tests: a call log, systems of recording tasks, and
//! event collection.
#![allow(dead_code, unreachable_pub)] // Each test binary uses a different part of the helpers.

use std::sync::Arc;
use std::time::Duration;

use architectlm_core::extensions::saga::{SagaEvent, SagaEventType};
use architectlm_core::{Runtime, Subscription, System, SystemBuilder, TaskDefinition, TaskError};
use architectlm_saga::Coordinator;
use parking_lot::Mutex;
use serde_json::{Value, json};

/// One call: `(task id, input, idempotency key)`.
pub type Call = (String, Value, Option<String>);

/// What the tasks of a test did, in order.
#[derive(Debug, Default, Clone)]
pub struct Log(pub Arc<Mutex<Vec<Call>>>);

impl Log {
    pub fn push(&self, task: &str, input: &Value, key: Option<&str>) {
        self.0
            .lock()
            .push((task.to_owned(), input.clone(), key.map(str::to_owned)));
    }

    pub fn tasks(&self) -> Vec<String> {
        self.0.lock().iter().map(|(t, _, _)| t.clone()).collect()
    }

    pub fn inputs_of(&self, task: &str) -> Vec<Value> {
        self.0
            .lock()
            .iter()
            .filter(|(t, _, _)| t == task)
            .map(|(_, i, _)| i.clone())
            .collect()
    }

    pub fn keys_of(&self, task: &str) -> Vec<Option<String>> {
        self.0
            .lock()
            .iter()
            .filter(|(t, _, _)| t == task)
            .map(|(_, _, k)| k.clone())
            .collect()
    }
}

/// A task that logs its call and returns `{"done": <id>}`.
pub fn ok_task(id: &'static str, log: &Log) -> TaskDefinition {
    let log = log.clone();
    TaskDefinition::new(id, move |input: Value, ctx| {
        let log = log.clone();
        async move {
            log.push(id, &input, ctx.idempotency_key());
            Ok(json!({ "done": id }))
        }
    })
    .unwrap()
}

/// A task that logs its call and fails permanently.
pub fn failing_task(id: &'static str, log: &Log) -> TaskDefinition {
    let log = log.clone();
    TaskDefinition::new(id, move |input: Value, ctx| {
        let log = log.clone();
        async move {
            log.push(id, &input, ctx.idempotency_key());
            Err(TaskError::permanent(format!("{id} refused")))
        }
    })
    .unwrap()
}

/// A system with the given tasks.
pub fn system(tasks: Vec<TaskDefinition>) -> System {
    let mut b: SystemBuilder = System::builder("saga-tests");
    for t in tasks {
        b = b.task(t);
    }
    b.build().unwrap()
}

/// Starts a runtime with the coordinator as an extension.
pub async fn runtime(system: System, sagas: &Coordinator) -> Runtime {
    Runtime::builder(system)
        .extension(Arc::new(sagas.clone()))
        .start()
        .await
        .unwrap()
}

/// Collects saga events of one instance until (and including) its terminal event.
pub async fn events_until_end(
    sub: &mut Subscription<SagaEvent>,
    instance: uuid::Uuid,
) -> Vec<(SagaEventType, Option<String>)> {
    let mut out = Vec::new();
    let collect = async {
        while let Some(e) = sub.recv().await {
            if e.instance_id != instance {
                continue;
            }
            out.push((e.event_type, e.step_id.clone()));
            if matches!(
                e.event_type,
                SagaEventType::SagaCompleted | SagaEventType::SagaFailed
            ) {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), collect)
        .await
        .expect("the saga did not end in time");
    out
}
