//! The values a scheduled entry stores: checked against the JSON depth limit on the way in,
//! and the records the store cannot decode announced as events.

use std::sync::Arc;

use architectlm_core::extensions::scheduler::{SchedulerEvent, SchedulerEventType};
use architectlm_core::json::check_depth;
use architectlm_core::store::UnreadableListener;
use architectlm_core::{EventHub, Result};
use serde_json::{Map, Value};
use uuid::Uuid;

/// Refuses a scheduled task's input or metadata nested deeper than
/// [`MAX_JSON_DEPTH`](architectlm_core::json::MAX_JSON_DEPTH): the entry could be stored but
/// not read back.
pub(crate) fn check_values(input: &Value, metadata: &Map<String, Value>) -> Result<()> {
    check_depth(input, "scheduled task input")?;
    for (k, v) in metadata {
        if check_depth(v, "metadata").is_err() {
            return check_depth(v, &format!("scheduled task metadata \"{k}\""));
        }
    }
    Ok(())
}

/// A run's result is kept with its entry: one nested too deep fails the run instead.
pub(crate) fn checked_result(v: Value) -> Result<Value> {
    check_depth(&v, "scheduled task result").map(|()| v)
}

/// A listener for the store's unreadable records that publishes `record-unreadable` (with
/// the entry id when the record has one, and the report as payload).
pub(crate) fn unreadable_listener(events: &EventHub<SchedulerEvent>) -> UnreadableListener {
    let events = events.clone();
    Arc::new(move |r| {
        events.publish_with(|| {
            let entry = r.id.split('@').next().unwrap_or_default();
            SchedulerEvent::new(
                SchedulerEventType::RecordUnreadable,
                Uuid::parse_str(entry).unwrap_or_default(),
                "",
                r.to_payload(),
            )
        });
    })
}
