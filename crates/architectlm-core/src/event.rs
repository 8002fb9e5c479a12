//! Events and the event hub that carries them to subscribers.
//!
//! # Delivery policy
//!
//! Publishing never waits for a subscriber. Each hub keeps a bounded ring buffer
//! ([`EventHub::with_capacity`], 1024 events by default); a subscriber that falls more than that
//! far behind skips the oldest events it has not read. The loss is never silent: the
//! subscriber's [`Subscription::missed`] counter grows, the hub's [`EventHub::dropped`] total
//! grows, and a `tracing` warning names how many events were skipped. When nobody subscribes,
//! publishing costs one atomic load: the event is not even built.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use uuid::Uuid;

/// The runtime's own event types.
pub mod types {
    /// A process instance was created.
    pub const PROCESS_CREATED: &str = "PROCESS_CREATED";
    /// A process instance changed state.
    pub const STATE_CHANGED: &str = "STATE_CHANGED";
    /// A task execution started.
    pub const TASK_STARTED: &str = "TASK_STARTED";
    /// A task execution completed.
    pub const TASK_COMPLETED: &str = "TASK_COMPLETED";
    /// A task execution failed (after its retries).
    pub const TASK_FAILED: &str = "TASK_FAILED";
    /// Something went wrong outside of a task: a failed action, a lost event.
    pub const SYSTEM_ERROR: &str = "SYSTEM_ERROR";
    /// The process store skipped a stored instance it cannot decode; the payload names its
    /// `kind`, `id` and `error` (see [`crate::store::UnreadableRecord`]).
    pub const RECORD_UNREADABLE: &str = "RECORD_UNREADABLE";
}

/// An event on the runtime's bus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Event {
    /// Unique id.
    pub id: Uuid,
    /// The type, such as [`types::STATE_CHANGED`] or an extension's `saga-started`.
    #[serde(rename = "type")]
    pub event_type: Cow<'static, str>,
    /// When it happened.
    pub timestamp: DateTime<Utc>,
    /// Who emitted it: `runtime`, `saga-coordinator`, a task id, ...
    pub source: Cow<'static, str>,
    /// The details.
    pub payload: serde_json::Value,
}

impl Event {
    /// A new event stamped now.
    pub fn new(
        event_type: impl Into<Cow<'static, str>>,
        source: impl Into<Cow<'static, str>>,
        payload: serde_json::Value,
    ) -> Self {
        Self {
            id: Uuid::new_v4(),
            event_type: event_type.into(),
            timestamp: Utc::now(),
            source: source.into(),
            payload,
        }
    }
}

/// Anything with a type name that subscriptions can filter on.
pub trait Typed {
    /// The type name, such as `STATE_CHANGED` or `saga-started`.
    fn type_name(&self) -> &str;
}

impl Typed for Event {
    fn type_name(&self) -> &str {
        &self.event_type
    }
}

/// Which events a subscription receives.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum EventFilter {
    /// Every event (the original's `"*"`).
    #[default]
    All,
    /// Events of one type.
    Type(Cow<'static, str>),
    /// Events of any of these types.
    Types(Vec<Cow<'static, str>>),
}

impl EventFilter {
    /// Whether an event of this type passes.
    pub fn matches(&self, event_type: &str) -> bool {
        match self {
            Self::All => true,
            Self::Type(t) => t == event_type,
            Self::Types(ts) => ts.iter().any(|t| t == event_type),
        }
    }
}

impl From<&'static str> for EventFilter {
    /// `"*"` means all events; anything else one type.
    fn from(s: &'static str) -> Self {
        if s == "*" {
            Self::All
        } else {
            Self::Type(Cow::Borrowed(s))
        }
    }
}

impl From<String> for EventFilter {
    fn from(s: String) -> Self {
        if s == "*" {
            Self::All
        } else {
            Self::Type(Cow::Owned(s))
        }
    }
}

/// A bounded, never-blocking publish/subscribe hub. See the [module docs](self) for the policy.
///
/// Cheap to clone (clones share the hub); `Send + Sync`; publishing and subscribing may happen
/// from any thread.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use architectlm_core::{Event, EventHub};
/// use serde_json::json;
///
/// let hub = EventHub::<Event>::with_capacity("billing", 16);
/// let mut invoices = hub.subscribe("invoice-sent");
/// hub.publish(Event::new("invoice-sent", "billing", json!({"invoice": 1})));
/// hub.publish(Event::new("reminder-sent", "billing", json!({"invoice": 1})));
/// let event = invoices.recv().await.unwrap();
/// assert_eq!(event.payload["invoice"], 1);
/// assert_eq!(invoices.missed(), 0);
/// # });
/// ```
pub struct EventHub<E> {
    tx: broadcast::Sender<Arc<E>>,
    /// Live subscriptions, kept apart from the channel's own count (which takes a lock) so that
    /// publishing to nobody costs one atomic load.
    subscribers: Arc<AtomicUsize>,
    dropped: Arc<AtomicU64>,
    name: &'static str,
}

impl<E> fmt::Debug for EventHub<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventHub")
            .field("name", &self.name)
            .field("subscribers", &self.tx.receiver_count())
            .field("dropped", &self.dropped.load(Ordering::Relaxed))
            .finish()
    }
}

impl<E> Clone for EventHub<E> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            subscribers: self.subscribers.clone(),
            dropped: self.dropped.clone(),
            name: self.name,
        }
    }
}

/// The default number of events a subscriber may fall behind before it skips some.
pub const DEFAULT_EVENT_CAPACITY: usize = 1024;

impl<E: Typed + Send + Sync + 'static> EventHub<E> {
    /// A hub whose subscribers may fall `capacity` events behind. `name` appears in warnings.
    pub fn with_capacity(name: &'static str, capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        Self {
            tx,
            subscribers: Arc::new(AtomicUsize::new(0)),
            dropped: Arc::new(AtomicU64::new(0)),
            name,
        }
    }

    /// A hub with [`DEFAULT_EVENT_CAPACITY`].
    pub fn new(name: &'static str) -> Self {
        Self::with_capacity(name, DEFAULT_EVENT_CAPACITY)
    }

    /// Whether anybody listens; publishers use it to skip building events.
    #[inline]
    pub fn has_subscribers(&self) -> bool {
        self.subscribers.load(Ordering::Acquire) > 0
    }

    /// Publishes an event built by `make`, only if somebody listens. Never blocks.
    #[inline]
    pub fn publish_with(&self, make: impl FnOnce() -> E) {
        if self.has_subscribers() {
            let _ = self.tx.send(Arc::new(make()));
        }
    }

    /// Publishes an event. Never blocks.
    pub fn publish(&self, event: E) {
        self.publish_with(|| event);
    }

    /// How many events subscribers of this hub have skipped in total.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Subscribes to the events that pass `filter`. Dropping the subscription unsubscribes.
    pub fn subscribe(&self, filter: impl Into<EventFilter>) -> Subscription<E> {
        self.subscribers.fetch_add(1, Ordering::AcqRel);
        Subscription {
            subscribers: self.subscribers.clone(),
            rx: self.tx.subscribe(),
            filter: filter.into(),
            missed: 0,
            dropped: self.dropped.clone(),
            name: self.name,
        }
    }

    /// Calls `handler` for every event that passes `filter`, on a task of its own so a slow
    /// handler never blocks the publisher. Dropping the returned handle unsubscribes.
    pub fn on(
        &self,
        filter: impl Into<EventFilter>,
        handler: impl Fn(&E) + Send + Sync + 'static,
    ) -> EventSubscription {
        let mut sub = self.subscribe(filter);
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                let name = self.name;
                let task = handle.spawn(async move {
                    while let Some(event) = sub.recv().await {
                        // A panicking handler loses that one event, not its subscription.
                        let call = std::panic::AssertUnwindSafe(|| handler(&event));
                        if std::panic::catch_unwind(call).is_err() {
                            tracing::error!(hub = name, "an event handler panicked");
                        }
                    }
                });
                EventSubscription::new(move || task.abort())
            }
            Err(_) => {
                // Outside of a Tokio runtime: a plain thread does the same job.
                let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let flag = stop.clone();
                std::thread::spawn(move || {
                    while let Some(event) = sub.blocking_recv() {
                        if flag.load(Ordering::Relaxed) {
                            break;
                        }
                        handler(&event);
                    }
                });
                EventSubscription::new(move || stop.store(true, Ordering::Relaxed))
            }
        }
    }
}

/// A stream of events from an [`EventHub`]. Dropping it unsubscribes.
pub struct Subscription<E> {
    subscribers: Arc<AtomicUsize>,
    rx: broadcast::Receiver<Arc<E>>,
    filter: EventFilter,
    missed: u64,
    dropped: Arc<AtomicU64>,
    name: &'static str,
}

impl<E> fmt::Debug for Subscription<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("hub", &self.name)
            .field("filter", &self.filter)
            .field("missed", &self.missed)
            .finish()
    }
}

impl<E: Typed + Send + Sync + 'static> Subscription<E> {
    fn lagged(&mut self, n: u64) {
        self.missed += n;
        self.dropped.fetch_add(n, Ordering::Relaxed);
        tracing::warn!(
            hub = self.name,
            skipped = n,
            "a slow event subscriber skipped events"
        );
    }

    /// The next matching event; `None` when the hub is gone.
    pub async fn recv(&mut self) -> Option<Arc<E>> {
        loop {
            match self.rx.recv().await {
                Ok(e) if self.filter.matches(e.type_name()) => return Some(e),
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => self.lagged(n),
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// The next matching event if one is ready, without waiting.
    pub fn try_recv(&mut self) -> Option<Arc<E>> {
        loop {
            match self.rx.try_recv() {
                Ok(e) if self.filter.matches(e.type_name()) => return Some(e),
                Ok(_) => {}
                Err(broadcast::error::TryRecvError::Lagged(n)) => self.lagged(n),
                Err(_) => return None,
            }
        }
    }

    /// Blocking variant of [`recv`](Self::recv) for threads outside of Tokio.
    pub fn blocking_recv(&mut self) -> Option<Arc<E>> {
        loop {
            match self.rx.blocking_recv() {
                Ok(e) if self.filter.matches(e.type_name()) => return Some(e),
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => self.lagged(n),
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// How many events this subscriber skipped because it fell behind. The count covers every
    /// event of the hub it skipped, including ones its filter would have passed over, so it is
    /// an upper bound of the matching events lost: zero means nothing was lost.
    pub fn missed(&self) -> u64 {
        self.missed
    }

    /// Turns the subscription into an async stream.
    pub fn into_stream(self) -> impl futures::Stream<Item = Arc<E>> + Send + 'static {
        futures::stream::unfold(
            self,
            |mut sub| async move { sub.recv().await.map(|e| (e, sub)) },
        )
    }
}

impl<E> Drop for Subscription<E> {
    fn drop(&mut self) {
        self.subscribers.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A handle to a callback subscription; dropping it (or calling
/// [`unsubscribe`](Self::unsubscribe)) stops the callbacks.
pub struct EventSubscription {
    cancel: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl fmt::Debug for EventSubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventSubscription")
            .field("active", &self.cancel.is_some())
            .finish()
    }
}

impl EventSubscription {
    /// A handle that runs `cancel` when dropped.
    pub fn new(cancel: impl FnOnce() + Send + Sync + 'static) -> Self {
        Self {
            cancel: Some(Box::new(cancel)),
        }
    }

    /// A handle that does nothing: useful for mocks.
    pub fn noop() -> Self {
        Self { cancel: None }
    }

    /// Stops the callbacks now.
    pub fn unsubscribe(mut self) {
        if let Some(c) = self.cancel.take() {
            c();
        }
    }
}

impl Drop for EventSubscription {
    fn drop(&mut self) {
        if let Some(c) = self.cancel.take() {
            c();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn subscribers_see_only_their_type_and_loss_is_counted() {
        let hub = EventHub::<Event>::with_capacity("test", 4);
        let mut all = hub.subscribe(EventFilter::All);
        let mut one = hub.subscribe("B");
        for i in 0..10 {
            let t = if i % 2 == 0 { "A" } else { "B" };
            hub.publish(Event::new(t, "test", serde_json::json!(i)));
        }
        // The ring holds 4: the first 6 events were skipped and counted.
        let mut seen = vec![];
        while let Some(e) = all.try_recv() {
            seen.push(e.payload.as_i64().unwrap());
        }
        assert_eq!(seen, vec![6, 7, 8, 9]);
        assert_eq!(all.missed(), 6);
        let e = one.try_recv().unwrap();
        assert_eq!(e.event_type, "B");
        assert_eq!(hub.dropped(), 12);
    }

    #[tokio::test]
    async fn dropping_a_subscription_unsubscribes() {
        let hub = EventHub::<Event>::new("test");
        let sub = hub.subscribe(EventFilter::All);
        assert!(hub.has_subscribers());
        drop(sub);
        assert!(!hub.has_subscribers());
    }
}
