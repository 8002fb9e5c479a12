//! Helpers shared by the integration tests.
#![allow(dead_code)] // Each test file uses a different subset.

use std::time::Duration;

use architectlm_core::Subscription;
use architectlm_loadmanager::{
    Clock, LoadEvent, LoadEventType, LoadManager, Resource, ResourceSettingsBuilder,
};

/// A manager on a manual clock.
pub(crate) fn manual() -> (LoadManager, Clock) {
    let clock = Clock::manual();
    (LoadManager::builder().clock(clock.clone()).build(), clock)
}

/// Registers the built settings.
pub(crate) fn register(m: &LoadManager, b: ResourceSettingsBuilder) -> Resource {
    m.register(b.build().expect("valid settings"))
        .expect("registered")
}

/// Every event already published, in order.
pub(crate) fn drain(sub: &mut Subscription<LoadEvent>) -> Vec<LoadEventType> {
    let mut out = vec![];
    while let Some(e) = sub.try_recv() {
        out.push(e.event_type);
    }
    out
}

/// Every event already published, with its payload reason.
pub(crate) fn drain_reasons(sub: &mut Subscription<LoadEvent>) -> Vec<(LoadEventType, String)> {
    let mut out = vec![];
    while let Some(e) = sub.try_recv() {
        out.push((
            e.event_type,
            e.payload["reason"].as_str().unwrap_or_default().to_owned(),
        ));
    }
    out
}

/// Seconds.
pub(crate) fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}
