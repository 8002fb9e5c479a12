//! The load manager contract: resources with a capacity, usage thresholds and circuit breakers.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::Result;
use crate::event::{EventFilter, EventSubscription, Typed};

/// The kind of a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ResourceType {
    /// CPU (can be fed by a system sampler).
    Cpu,
    /// Memory (can be fed by a system sampler).
    Memory,
    /// Disk (can be fed by a system sampler).
    Disk,
    /// Network.
    Network,
    /// A database.
    Database,
    /// An external API.
    Api,
    /// Anything else.
    Custom,
}

/// Thresholds in percent of capacity: `0 <= warning <= critical <= circuit <= 100`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Thresholds {
    /// Usage at or above this is `warning`.
    pub warning: f64,
    /// Usage at or above this is `critical`.
    pub critical: f64,
    /// Usage at or above this opens the circuit.
    pub circuit: f64,
}

impl Thresholds {
    /// Thresholds in percent.
    pub fn new(warning: f64, critical: f64, circuit: f64) -> Self {
        Self {
            warning,
            critical,
            circuit,
        }
    }
}

impl Default for Thresholds {
    fn default() -> Self {
        Self::new(70.0, 85.0, 95.0)
    }
}

/// A resource's configuration. Implementations may accept more settings (breaker windows, rate
/// limits) through their own richer types.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ResourceConfig {
    /// Unique id.
    pub id: String,
    /// The kind.
    #[serde(rename = "type")]
    pub resource_type: ResourceType,
    /// Units available, at least 1.
    pub capacity: u64,
    /// The thresholds.
    pub thresholds: Thresholds,
    /// How long the circuit stays open before trial calls are admitted.
    #[serde(with = "crate::serde_duration")]
    pub reset_timeout: Duration,
    /// What it is.
    pub description: Option<String>,
}

impl ResourceConfig {
    /// A resource with default thresholds (70/85/95) and a 30 s reset timeout.
    pub fn new(id: impl Into<String>, resource_type: ResourceType, capacity: u64) -> Self {
        Self {
            id: id.into(),
            resource_type,
            capacity,
            thresholds: Thresholds::default(),
            reset_timeout: Duration::from_secs(30),
            description: None,
        }
    }

    /// Sets the thresholds.
    pub fn thresholds(mut self, t: Thresholds) -> Self {
        self.thresholds = t;
        self
    }

    /// Sets the reset timeout.
    pub fn reset_timeout(mut self, d: Duration) -> Self {
        self.reset_timeout = d;
        self
    }

    /// Sets the description.
    pub fn description(mut self, d: impl Into<String>) -> Self {
        self.description = Some(d.into());
        self
    }
}

/// Status of a resource (the original's `CircuitStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum CircuitStatus {
    /// Normal.
    Closed,
    /// Usage at or above the warning threshold.
    Warning,
    /// Usage at or above the critical threshold.
    Critical,
    /// Refusing work.
    Open,
    /// Admitting a bounded number of trial calls.
    HalfOpen,
}

/// A snapshot of a resource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ResourceStatus {
    /// The id.
    pub id: String,
    /// The kind.
    #[serde(rename = "type")]
    pub resource_type: ResourceType,
    /// Capacity.
    pub capacity: u64,
    /// Units in use.
    pub used: u64,
    /// Units free.
    pub available: u64,
    /// `used / capacity * 100`.
    pub usage_percentage: f64,
    /// The status.
    pub status: CircuitStatus,
    /// When the status last changed.
    pub last_status_change_at: DateTime<Utc>,
    /// When an open circuit goes half-open.
    pub reset_at: Option<DateTime<Utc>>,
}

impl ResourceStatus {
    /// A snapshot; `available` and `usage_percentage` are derived from `capacity` and `used`.
    pub fn new(
        id: impl Into<String>,
        resource_type: ResourceType,
        capacity: u64,
        used: u64,
        status: CircuitStatus,
        last_status_change_at: DateTime<Utc>,
        reset_at: Option<DateTime<Utc>>,
    ) -> Self {
        Self {
            id: id.into(),
            resource_type,
            capacity,
            used,
            available: capacity.saturating_sub(used),
            usage_percentage: if capacity == 0 {
                0.0
            } else {
                used as f64 * 100.0 / capacity as f64
            },
            status,
            last_status_change_at,
            reset_at,
        }
    }
}

/// Load event types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum LoadEventType {
    /// `threshold-warning`
    ThresholdWarning,
    /// `threshold-critical`
    ThresholdCritical,
    /// `threshold-normal`: usage fell back below the warning threshold (less its hysteresis).
    ThresholdNormal,
    /// `circuit-open`
    CircuitOpen,
    /// `circuit-half-open`
    CircuitHalfOpen,
    /// `circuit-closed`
    CircuitClosed,
}

impl LoadEventType {
    /// The kebab-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ThresholdWarning => "threshold-warning",
            Self::ThresholdCritical => "threshold-critical",
            Self::ThresholdNormal => "threshold-normal",
            Self::CircuitOpen => "circuit-open",
            Self::CircuitHalfOpen => "circuit-half-open",
            Self::CircuitClosed => "circuit-closed",
        }
    }
}

/// A load event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LoadEvent {
    /// Unique id.
    pub id: Uuid,
    /// The type.
    #[serde(rename = "type")]
    pub event_type: LoadEventType,
    /// When it happened.
    pub timestamp: DateTime<Utc>,
    /// The resource.
    pub resource_id: String,
    /// The details (usage, reason).
    pub payload: Value,
}

impl LoadEvent {
    /// A new event stamped now.
    pub fn new(event_type: LoadEventType, resource_id: impl Into<String>, payload: Value) -> Self {
        Self {
            id: Uuid::new_v4(),
            event_type,
            timestamp: Utc::now(),
            resource_id: resource_id.into(),
            payload,
        }
    }
}

impl Typed for LoadEvent {
    fn type_name(&self) -> &str {
        self.event_type.as_str()
    }
}

/// A callback for load events.
pub type LoadEventHandler = Arc<dyn Fn(&LoadEvent) + Send + Sync>;

/// The outcome of the work done under a permit, fed to the circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CallOutcome {
    /// The call succeeded (it may still count as slow).
    Success,
    /// The call failed.
    Failure,
    /// Not reported: counts toward neither rate.
    Unknown,
}

/// What a load manager attached to a permit when it issued it, handed back on release.
///
/// The meaning of both fields belongs to the implementation (for example the clock reading at
/// acquisition, used to measure slow calls, and the circuit generation of a half-open trial).
/// Keeping them in the permit lets a release find its bookkeeping without a lookup or an
/// allocation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct PermitTicket {
    /// When the permit was issued, in the implementation's clock (0 when not measured).
    pub started: u64,
    /// Implementation-defined tag; its top bit ([`PermitTicket::TRIAL`]) marks a trial call.
    pub tag: u64,
}

impl PermitTicket {
    /// The bit of [`tag`](Self::tag) that marks a permit admitted as a half-open trial.
    pub const TRIAL: u64 = 1 << 63;

    /// Whether the permit was admitted as a half-open trial call.
    pub fn is_trial(&self) -> bool {
        self.tag & Self::TRIAL != 0
    }

    /// A ticket with the given start reading and tag.
    pub fn new(started: u64, tag: u64) -> Self {
        Self { started, tag }
    }
}

/// Gives a permit's units back; implemented by load managers.
///
/// Called exactly once per permit, from whichever thread drops or completes it; it must not
/// block and must not panic.
pub trait PermitRelease: Send + Sync + 'static {
    /// Returns `units` and records `outcome` for the permit issued with `ticket`.
    fn release(&self, units: u64, outcome: CallOutcome, ticket: PermitTicket);
}

/// Units of a resource held until dropped. Report the outcome with
/// [`success`](Self::success) or [`failure`](Self::failure); a permit dropped while its thread
/// panics counts as a failure, one dropped without a report as unknown.
///
/// A permit is `Send` and may be moved into another task; its units come back exactly once.
pub struct ResourcePermit {
    release: Option<Arc<dyn PermitRelease>>,
    units: u64,
    ticket: PermitTicket,
}

impl fmt::Debug for ResourcePermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResourcePermit")
            .field("units", &self.units)
            .field("ticket", &self.ticket)
            .field("attached", &self.release.is_some())
            .finish()
    }
}

impl ResourcePermit {
    /// Whether this call was admitted as a half-open trial: its outcome decides whether the
    /// circuit closes (report it with `success` / `failure`).
    pub fn is_trial(&self) -> bool {
        self.ticket.is_trial()
    }

    /// A permit that gives `units` back through `release`.
    pub fn new(release: Arc<dyn PermitRelease>, units: u64) -> Self {
        Self::with_ticket(release, units, PermitTicket::default())
    }

    /// A permit that gives `units` back through `release`, handing `ticket` back with them.
    pub fn with_ticket(release: Arc<dyn PermitRelease>, units: u64, ticket: PermitTicket) -> Self {
        Self {
            release: Some(release),
            units,
            ticket,
        }
    }

    /// A permit that gives nothing back (for mocks).
    pub fn detached(units: u64) -> Self {
        Self {
            release: None,
            units,
            ticket: PermitTicket::default(),
        }
    }

    /// The units held.
    pub fn units(&self) -> u64 {
        self.units
    }

    /// The ticket the load manager attached.
    pub fn ticket(&self) -> PermitTicket {
        self.ticket
    }

    fn finish(&mut self, outcome: CallOutcome) {
        if let Some(r) = self.release.take() {
            r.release(self.units, outcome, self.ticket);
        }
    }

    /// Releases the units and records a success.
    pub fn success(mut self) {
        self.finish(CallOutcome::Success);
    }

    /// Releases the units and records a failure.
    pub fn failure(mut self) {
        self.finish(CallOutcome::Failure);
    }

    /// Releases the units with the given outcome.
    pub fn complete(mut self, outcome: CallOutcome) {
        self.finish(outcome);
    }
}

impl Drop for ResourcePermit {
    fn drop(&mut self) {
        if self.release.is_none() {
            // Already completed (or detached): nothing to give back, no need to ask whether
            // the thread panics.
            return;
        }
        let outcome = if std::thread::panicking() {
            CallOutcome::Failure
        } else {
            CallOutcome::Unknown
        };
        self.finish(outcome);
    }
}

/// Tracks resource usage and breaks circuits.
///
/// # Rules
/// - `Send + Sync`; every method may be called concurrently; `used` never exceeds capacity and
///   never goes below zero (releasing more than is used saturates at zero).
/// - Status is `open` or `half-open` while the circuit says so, otherwise `closed`, `warning` or
///   `critical` by usage. An event fires once per change of status, named after the new status
///   (`threshold-warning`, `threshold-critical`, `circuit-open`, `circuit-half-open`,
///   `circuit-closed`).
/// - Usage at or above the circuit threshold opens the circuit; so may outcomes reported on
///   permits. Releasing units never moves a circuit out of open: only the reset timeout does,
///   to half-open, where a bounded number of trial calls is admitted and their outcomes close
///   or reopen the circuit. An acquisition with `acquire_resource` while half-open is a trial
///   that passes when its units are released.
/// - Unknown ids give [`crate::Error::NotFound`]; invalid configurations
///   [`crate::Error::InvalidConfig`] naming the field and value; zero units
///   [`crate::Error::InvalidInput`].
/// - Nothing here blocks a thread; only [`acquire_permit`](Self::acquire_permit) with a wait
///   suspends the caller.
///
/// ```
/// use architectlm_core::extensions::LoadManager;
/// use architectlm_core::extensions::loadmanager::{ResourceConfig, ResourceType};
///
/// async fn guarded_payment(lm: &dyn LoadManager) -> architectlm_core::Result<()> {
///     lm.register_resource(ResourceConfig::new("payment-api", ResourceType::Api, 100)).await?;
///     let permit = lm.acquire_permit("payment-api", 1, None).await?;
///     // ... call the payment API ...
///     permit.success();
///     Ok(())
/// }
/// ```
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait LoadManager: Send + Sync {
    /// Registers a resource.
    async fn register_resource(&self, config: ResourceConfig) -> Result<()>;
    /// Whether the resource would admit a call now (not open, not full).
    async fn is_resource_available(&self, id: &str) -> Result<bool>;
    /// Takes `units` if admitted; `false` when refused. Give them back with
    /// [`release_resource`](Self::release_resource).
    async fn acquire_resource(&self, id: &str, units: u64) -> Result<bool>;
    /// Gives back units taken with `acquire_resource`.
    async fn release_resource(&self, id: &str, units: u64) -> Result<()>;
    /// Takes `units` as a permit released on drop, waiting up to `wait` for capacity
    /// (`None`: no waiting). Refusal is [`crate::Error::Unavailable`] with the reason.
    async fn acquire_permit(
        &self,
        id: &str,
        units: u64,
        wait: Option<Duration>,
    ) -> Result<ResourcePermit>;
    /// A snapshot of one resource.
    async fn get_resource_status(&self, id: &str) -> Result<Option<ResourceStatus>>;
    /// Snapshots of all resources.
    async fn get_all_resource_statuses(&self) -> Result<Vec<ResourceStatus>>;
    /// Calls `handler` for matching events until the handle is dropped.
    fn on_load_event(&self, filter: EventFilter, handler: LoadEventHandler) -> EventSubscription;
}
