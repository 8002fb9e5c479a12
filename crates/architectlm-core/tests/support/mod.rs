//! Helpers shared by the integration tests: small systems, waiting for events with a deadline,
//! and recorders.

#![allow(dead_code, unreachable_pub)] // Each test file uses a different subset of the helpers.

use std::sync::Arc;
use std::time::Duration;

use architectlm_core::{
    Event, ProcessDefinition, Runtime, Subscription, System, TaskDefinition, TransitionDefinition,
};
use parking_lot::Mutex;
use serde_json::{Value, json};

/// How long a test waits for something that should happen at once.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// A task that returns its input.
pub fn echo(id: &str) -> TaskDefinition {
    TaskDefinition::new(id, |input, _ctx| async move { Ok(input) }).expect("valid task")
}

/// An order process: created -pay-> paid -ship-> shipped (final), `cancel` from anywhere
/// non-final to cancelled (final). `pay` runs `charge` as its action.
pub fn order_process() -> ProcessDefinition {
    ProcessDefinition::builder("order")
        .initial_state("created")
        .state("paid")
        .final_state("shipped")
        .final_state("cancelled")
        .transition(TransitionDefinition::new("created", "paid", "pay").action("charge"))
        .transition(TransitionDefinition::new("paid", "shipped", "ship"))
        .transition(TransitionDefinition::new("*", "cancelled", "cancel"))
        .build()
        .expect("valid process")
}

/// A system with the order process, `charge` (echo) and `echo`.
pub fn order_system() -> System {
    System::builder("shop")
        .process(order_process())
        .task(echo("charge"))
        .task(echo("echo"))
        .build()
        .expect("valid system")
}

/// A runtime over `system` with no services.
pub async fn start(system: System) -> Runtime {
    Runtime::builder(system)
        .start()
        .await
        .expect("runtime starts")
}

/// The next event of `sub`, failing the test when none arrives before the deadline.
pub async fn next_event(sub: &mut Subscription<Event>) -> Arc<Event> {
    tokio::time::timeout(DEADLINE, sub.recv())
        .await
        .expect("an event before the deadline")
        .expect("the hub is alive")
}

/// Waits for the first event of `sub` that satisfies `pred`.
pub async fn wait_for(sub: &mut Subscription<Event>, pred: impl Fn(&Event) -> bool) -> Arc<Event> {
    tokio::time::timeout(DEADLINE, async {
        loop {
            match sub.recv().await {
                Some(e) if pred(&e) => return e,
                Some(_) => {}
                None => panic!("the event hub closed"),
            }
        }
    })
    .await
    .expect("a matching event before the deadline")
}

/// Every event already queued on `sub`, as (type, payload).
pub fn drain(sub: &mut Subscription<Event>) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    while let Some(e) = sub.try_recv() {
        out.push((e.event_type.to_string(), e.payload.clone()));
    }
    out
}

/// A shared, cloneable log of strings.
#[derive(Clone, Default, Debug)]
pub struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    pub fn push(&self, s: impl Into<String>) {
        self.0.lock().push(s.into());
    }
    pub fn entries(&self) -> Vec<String> {
        self.0.lock().clone()
    }
}

/// Asserts that `err`'s message contains `needle`.
#[track_caller]
pub fn assert_msg(err: &impl std::fmt::Display, needle: &str) {
    let msg = err.to_string();
    assert!(msg.contains(needle), "expected {needle:?} in {msg:?}");
}

/// Builds a contract type from JSON (the extension data types are `#[non_exhaustive]`).
pub fn from_json<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("valid contract JSON")
}

/// `json!({})`.
pub fn empty() -> Value {
    json!({})
}
