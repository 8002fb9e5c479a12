//! The load manager: a registry of resources with O(1) lookup, the core `LoadManager` contract
//! and the runtime `Extension`.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use architectlm_core::Extension;
use architectlm_core::ServiceRegistry;
use architectlm_core::event::{EventFilter, EventHub, EventSubscription, Subscription};
use architectlm_core::extensions::loadmanager::{
    self as contract, LoadEvent, LoadEventHandler, ResourceConfig, ResourcePermit, ResourceStatus,
};
use architectlm_core::{Error, Result, Runtime};
use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};

use crate::clock::Clock;
use crate::resource::{Resource, ResourceInner, Shared};
use crate::settings::ResourceSettings;

/// Resource limits, thresholds and per-resource circuit breakers.
///
/// `Send + Sync` and cheap to share in an `Arc`; every method may be called concurrently. Look a
/// resource up once with [`resource`](Self::resource) and keep the [`Resource`] handle for the
/// hot path. Implements the core [`LoadManager`](contract::LoadManager) contract and the
/// runtime's [`Extension`] (it forwards its events to the runtime's bus once started, with
/// source `load-manager`). It holds no background work of its own, except the optional system
/// sampler, which [`Extension::shutdown`] stops.
///
/// ```
/// use std::sync::Arc;
/// use architectlm_core::extensions::loadmanager::{CircuitStatus, ResourceConfig, ResourceType, Thresholds};
/// use architectlm_core::extensions::LoadManager as _;
/// use architectlm_loadmanager::LoadManager;
///
/// # tokio_test_block_on(async {
/// let manager = Arc::new(LoadManager::new());
/// manager
///     .register_resource(
///         ResourceConfig::new("payment-api", ResourceType::Api, 100)
///             .thresholds(Thresholds::new(70.0, 85.0, 95.0)),
///     )
///     .await
///     .unwrap();
/// for _ in 0..75 {
///     assert!(manager.acquire_resource("payment-api", 1).await.unwrap());
/// }
/// let status = manager.get_resource_status("payment-api").await.unwrap().unwrap();
/// assert_eq!(status.status, CircuitStatus::Warning);
/// # });
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
/// # }
/// ```
pub struct LoadManager {
    shared: Arc<Shared>,
    resources: RwLock<HashMap<Arc<str>, Resource>>,
    sampler: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl fmt::Debug for LoadManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadManager")
            .field("resources", &self.resources.read().len())
            .field("clock", &self.shared.clock)
            .field("bound_to_runtime", &self.shared.bus.get().is_some())
            .finish()
    }
}

impl Default for LoadManager {
    fn default() -> Self {
        Self::new()
    }
}

/// Builds a [`LoadManager`] with a chosen clock and event buffer.
///
/// ```
/// use architectlm_loadmanager::{Clock, LoadManager};
///
/// let clock = Clock::manual();
/// let manager = LoadManager::builder().clock(clock.clone()).event_capacity(256).build();
/// assert!(manager.resource("none").is_none());
/// ```
#[derive(Debug, Clone)]
pub struct LoadManagerBuilder {
    clock: Clock,
    event_capacity: usize,
}

impl LoadManagerBuilder {
    /// The clock for reset timeouts, slow calls, time windows and rate limits (default:
    /// Tokio's, so `tokio::time::pause` controls it).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// How many events a subscriber may fall behind before it skips some (default 1024).
    pub fn event_capacity(mut self, n: usize) -> Self {
        self.event_capacity = n;
        self
    }

    /// The manager.
    pub fn build(self) -> LoadManager {
        LoadManager {
            shared: Arc::new(Shared {
                clock: self.clock,
                hub: EventHub::with_capacity(EVENT_HUB, self.event_capacity),
                bus: OnceLock::new(),
            }),
            resources: RwLock::new(HashMap::new()),
            sampler: Mutex::new(None),
        }
    }
}

const EVENT_HUB: &str = "load-manager";

impl LoadManager {
    /// A manager on Tokio's clock.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A builder.
    pub fn builder() -> LoadManagerBuilder {
        LoadManagerBuilder {
            clock: Clock::default(),
            event_capacity: architectlm_core::event::DEFAULT_EVENT_CAPACITY,
        }
    }

    /// The clock in use.
    pub fn clock(&self) -> &Clock {
        &self.shared.clock
    }

    /// Registers a resource and returns its handle. An id already registered is
    /// [`Error::InvalidConfig`] on field `id`.
    pub fn register(&self, settings: ResourceSettings) -> Result<Resource> {
        let id: Arc<str> = Arc::from(settings.id());
        let mut map = self.resources.write();
        if map.contains_key(&id) {
            return Err(Error::invalid_config(
                "id",
                format!("\"{id}\""),
                "a resource with this id is already registered",
            ));
        }
        settings.validate()?;
        let shared = self.shared.clone();
        let key = id.clone();
        let r = Resource {
            inner: Arc::new_cyclic(|me| ResourceInner::new(settings, key, shared, me.clone())),
        };
        map.insert(id, r.clone());
        Ok(r)
    }

    /// The handle of a resource (one hash lookup).
    #[inline]
    pub fn resource(&self, id: &str) -> Option<Resource> {
        self.resources.read().get(id).cloned()
    }

    fn get(&self, id: &str) -> Result<Resource> {
        self.resource(id)
            .ok_or_else(|| Error::not_found("resource", id))
    }

    /// Removes a resource; permits still held release into the removed resource harmlessly.
    pub fn unregister(&self, id: &str) -> Option<Resource> {
        self.resources.write().remove(id)
    }

    /// The number of registered resources.
    pub fn len(&self) -> usize {
        self.resources.read().len()
    }

    /// Whether no resource is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Handles of all resources, in no particular order.
    pub fn resources(&self) -> Vec<Resource> {
        self.resources.read().values().cloned().collect()
    }

    /// Takes `units` of resource `id` as an owned permit, without waiting.
    pub fn try_acquire(&self, id: &str, units: u64) -> Result<ResourcePermit> {
        self.get(id)?
            .try_acquire_owned(units)
            .map_err(|r| r.into_error(id))
    }

    /// Takes `units` of resource `id` as an owned permit, waiting up to `wait` for capacity.
    pub async fn acquire(&self, id: &str, units: u64, wait: Duration) -> Result<ResourcePermit> {
        self.get(id)?
            .acquire_owned(units, wait)
            .await
            .map_err(|r| r.into_error(id))
    }

    /// Forces the circuit of `id` open until [`reset`](Self::reset).
    pub fn force_open(&self, id: &str) -> Result<()> {
        self.get(id)?.force_open();
        Ok(())
    }

    /// Disables the breaker of `id` until [`reset`](Self::reset).
    pub fn disable(&self, id: &str) -> Result<()> {
        self.get(id)?.disable();
        Ok(())
    }

    /// Closes the circuit of `id` and clears its windows.
    pub fn reset(&self, id: &str) -> Result<()> {
        self.get(id)?.reset();
        Ok(())
    }

    /// The event hub (for streams: `events().subscribe(filter)`).
    pub fn events(&self) -> &EventHub<LoadEvent> {
        &self.shared.hub
    }

    /// A stream of the events that pass `filter`.
    pub fn subscribe(&self, filter: impl Into<EventFilter>) -> Subscription<LoadEvent> {
        self.shared.hub.subscribe(filter)
    }

    /// Forwards events to a runtime's bus (done by [`Extension::start`]). Only the first call
    /// takes effect.
    pub fn bind_bus(&self, bus: EventHub<architectlm_core::event::Event>) {
        let _ = self.shared.bus.set(bus);
    }

    /// Feeds cpu, memory and disk resources from a sample: each such resource's usage is set
    /// to the sampled percentage of its capacity. Returns how many resources were updated.
    pub fn apply_system_sample(&self, sample: &crate::SystemSample) -> usize {
        use architectlm_core::extensions::loadmanager::ResourceType;
        let mut n = 0;
        for r in self.resources() {
            let pct = match r.resource_type() {
                ResourceType::Cpu => sample.cpu_percent,
                ResourceType::Memory => sample.memory_percent,
                ResourceType::Disk => sample.disk_percent,
                _ => None,
            };
            if let Some(p) = pct {
                let p = if p.is_finite() {
                    p.clamp(0.0, 100.0)
                } else {
                    0.0
                };
                r.set_usage((p * r.capacity() as f64 / 100.0).round() as u64);
                n += 1;
            }
        }
        n
    }

    #[cfg(feature = "system")]
    pub(crate) fn set_sampler(&self, handle: tokio::task::JoinHandle<()>) {
        if let Some(old) = self.sampler.lock().replace(handle) {
            old.abort();
        }
    }

    /// Stops the system sampler, if one runs.
    pub fn stop_sampler(&self) {
        if let Some(h) = self.sampler.lock().take() {
            h.abort();
        }
    }
}

impl Drop for LoadManager {
    fn drop(&mut self) {
        self.stop_sampler();
    }
}

#[async_trait]
impl contract::LoadManager for LoadManager {
    async fn register_resource(&self, config: ResourceConfig) -> Result<()> {
        self.register(ResourceSettings::try_from(config)?)
            .map(|_| ())
    }

    async fn is_resource_available(&self, id: &str) -> Result<bool> {
        Ok(self.get(id)?.is_available())
    }

    async fn acquire_resource(&self, id: &str, units: u64) -> Result<bool> {
        match self.get(id)?.acquire_units(units) {
            Ok(()) => Ok(true),
            Err(crate::Rejected::ZeroUnits) => Err(crate::Rejected::ZeroUnits.into_error(id)),
            Err(_) => Ok(false),
        }
    }

    async fn release_resource(&self, id: &str, units: u64) -> Result<()> {
        let r = self.get(id)?;
        if units == 0 {
            // Releasing nothing is a caller's mistake (a count lost on the way), not a no-op.
            return Err(crate::Rejected::ZeroUnits.into_error(id));
        }
        r.release(units);
        Ok(())
    }

    async fn acquire_permit(
        &self,
        id: &str,
        units: u64,
        wait: Option<Duration>,
    ) -> Result<ResourcePermit> {
        match wait {
            None => self.try_acquire(id, units),
            Some(w) => self.acquire(id, units, w).await,
        }
    }

    async fn get_resource_status(&self, id: &str) -> Result<Option<ResourceStatus>> {
        Ok(self.resource(id).map(|r| r.status()))
    }

    async fn get_all_resource_statuses(&self) -> Result<Vec<ResourceStatus>> {
        let mut all: Vec<ResourceStatus> = self.resources().iter().map(Resource::status).collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(all)
    }

    fn on_load_event(&self, filter: EventFilter, handler: LoadEventHandler) -> EventSubscription {
        self.shared.hub.on(filter, move |e: &LoadEvent| handler(e))
    }
}

#[async_trait]
impl Extension for LoadManager {
    fn name(&self) -> &'static str {
        EVENT_HUB
    }

    fn register(self: Arc<Self>, registry: &mut ServiceRegistry) {
        registry.set_load_manager(self);
    }

    async fn start(&self, runtime: Runtime) -> Result<()> {
        self.bind_bus(runtime.events().clone());
        Ok(())
    }

    async fn shutdown(&self) {
        self.stop_sampler();
    }
}
