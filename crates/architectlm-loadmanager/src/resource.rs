//! One resource: lock-free usage accounting, thresholds with hysteresis and its circuit breaker.
//!
//! # Hot path
//! A closed-state acquisition is one load of the breaker state, one compare-and-swap on `used`
//! and one load of the usage level; a release is one compare-and-swap and two loads. Outcomes
//! go to a lock-free count window when outcome rules are configured. The clock is read only
//! when something needs it (slow calls, time windows, an open circuit). Nothing allocates.
//!
//! # Slow path
//! Status changes (crossing a threshold, opening, half-opening, closing) take the resource's
//! mutex, so each change is decided once and its event published once.

use std::fmt;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use architectlm_core::Error;
use architectlm_core::event::{Event, EventHub};
use architectlm_core::extensions::loadmanager::{
    CallOutcome, CircuitStatus, LoadEvent, LoadEventType, PermitRelease, PermitTicket,
    ResourcePermit, ResourceStatus, ResourceType,
};
use governor::RateLimiter;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use parking_lot::Mutex;
use serde_json::json;
use tokio::sync::Notify;

use crate::clock::{Clock, GovernorClock, duration_nanos};
use crate::settings::{ResourceSettings, SlidingWindow};
use crate::window::{CountWindow, FAILED, SLOW, TimeWindow, Totals, Window};

/// The source name of events forwarded to the runtime's bus.
pub const EVENT_SOURCE: &str = "load-manager";

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;
const FORCED_OPEN: u8 = 3;
const DISABLED: u8 = 4;
/// Records outcomes and publishes usage events, but never opens or refuses.
const METRICS_ONLY: u8 = 5;

/// Marks a permit's ticket as a half-open trial; the low bits carry the generation.
const TRIAL: u64 = PermitTicket::TRIAL;
/// Bits of the trial word that count the trials left; the rest is the generation.
const TRIAL_BITS: u32 = 24;
const TRIAL_MASK: u64 = (1 << TRIAL_BITS) - 1;

/// Level of usage: 0 normal, 1 warning, 2 critical, 3 at the circuit threshold.
const LEVELS: usize = 4;

/// Why an acquisition was refused. Cheap to copy; converts into the core
/// [`Error::Unavailable`] with [`Rejected::into_error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Rejected {
    /// The circuit is open.
    CircuitOpen,
    /// The circuit was forced open.
    ForcedOpen,
    /// The circuit is half-open and every trial call is taken.
    HalfOpenTrialsBusy,
    /// Not enough free units.
    CapacityFull,
    /// More units than the capacity were asked for.
    ExceedsCapacity,
    /// The waiting queue (bulkhead) is full.
    QueueFull,
    /// The rate limit is reached.
    RateLimited,
    /// No capacity came free within the wait.
    WaitTimedOut,
    /// Zero units were asked for.
    ZeroUnits,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::CircuitOpen => "circuit open",
            Self::ForcedOpen => "circuit forced open",
            Self::HalfOpenTrialsBusy => "circuit half-open and all trial calls taken",
            Self::CapacityFull => "capacity full",
            Self::ExceedsCapacity => "more units than the capacity",
            Self::QueueFull => "waiting queue full",
            Self::RateLimited => "rate limit reached",
            Self::WaitTimedOut => "no capacity within the wait",
            Self::ZeroUnits => "zero units requested",
        })
    }
}

impl std::error::Error for Rejected {}

impl Rejected {
    /// The core error for resource `id`: [`Error::Unavailable`] naming the reason, or
    /// [`Error::InvalidInput`] for zero units.
    pub fn into_error(self, id: &str) -> Error {
        match self {
            Self::ZeroUnits => {
                Error::InvalidInput(format!("resource \"{id}\": units = 0, must be at least 1"))
            }
            r => Error::Unavailable {
                id: id.to_owned(),
                reason: r.to_string(),
            },
        }
    }

    /// Whether waiting could help (only for a full capacity).
    pub fn is_capacity(self) -> bool {
        self == Self::CapacityFull
    }
}

/// Counters of a resource since registration. Refusals are counted only when they happen, so
/// the admitted path pays nothing for them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResourceMetrics {
    /// Refused because the circuit was open, forced open, or half-open with every trial taken.
    pub rejected_open: u64,
    /// Refused for want of capacity (including requests larger than the capacity).
    pub rejected_full: u64,
    /// Refused by the rate limit.
    pub rejected_rate_limited: u64,
    /// Refused because the waiting queue was full, or the wait ran out.
    pub rejected_queue: u64,
    /// Times the circuit opened.
    pub openings: u64,
}

/// The breaker's mode, finer than the status: how it admits calls now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BreakerMode {
    /// Admitting, recording outcomes.
    Closed,
    /// Refusing until the reset timeout.
    Open,
    /// Admitting K trial calls.
    HalfOpen,
    /// Refusing until reset ([`Resource::force_open`]).
    ForcedOpen,
    /// Admitting, recording nothing ([`Resource::disable`]).
    Disabled,
    /// Admitting and recording, never opening ([`Resource::metrics_only`]).
    MetricsOnly,
}

/// A consistent snapshot of a resource's breaker figures ([`Resource::snapshot`]): the
/// current window's calls by outcome, its rates, refusals, trials and time in the state.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct ResourceSnapshot {
    /// What `status()` reports.
    pub status: CircuitStatus,
    /// The breaker's mode.
    pub breaker: BreakerMode,
    /// Units in use.
    pub used: u64,
    /// Units available.
    pub capacity: u64,
    /// Calls with an outcome in the current window (0 without a rate rule).
    pub buffered_calls: u64,
    /// Failed calls among them.
    pub failed_calls: u64,
    /// Slow calls among them.
    pub slow_calls: u64,
    /// Failure rate in percent, once the window holds `minimum_calls` calls.
    pub failure_rate: Option<f64>,
    /// Slow-call rate in percent, likewise.
    pub slow_call_rate: Option<f64>,
    /// Calls refused since registration, for any reason.
    pub refused_calls: u64,
    /// Trial calls still to be admitted, while half-open.
    pub trials_left: Option<u32>,
    /// Trials that ended in this half-open period.
    pub trials_passed: Option<u32>,
    /// Times the circuit opened since registration.
    pub openings: u64,
    /// Time since the status last changed.
    pub in_state_for: Duration,
}

/// Manager-wide state shared by every resource.
pub(crate) struct Shared {
    pub(crate) clock: Clock,
    pub(crate) hub: EventHub<LoadEvent>,
    pub(crate) bus: OnceLock<EventHub<Event>>,
}

type Limiter =
    RateLimiter<NotKeyed, InMemoryState, GovernorClock, NoOpMiddleware<governor::nanos::Nanos>>;

/// Everything decided under the mutex.
struct Cold {
    reported: CircuitStatus,
    /// The usage status last published (closed, warning or critical).
    reported_usage: CircuitStatus,
    /// The breaker state last published (closed, open or half-open).
    reported_breaker: CircuitStatus,
    /// Units of the permit-less trials admitted in this half-open period and not yet returned.
    legacy_trial_units: u64,
    last_change: u64,
    generation: u64,
    trials_passed: u32,
    /// Failed and slow trials of this half-open period (rate-based decision).
    trials_failed: u32,
    trials_slow: u32,
    legacy_trials: u32,
    opens_in_row: u32,
    openings: u64,
}

/// The settings the running resource needs, kept compact (a resource should cost a few hundred
/// bytes so that a registry of 100,000 stays small).
struct Rules {
    id: Arc<str>,
    resource_type: ResourceType,
    open_on_usage: bool,
    failure_rate: Option<f32>,
    slow_rate: Option<f32>,
    minimum_calls: u32,
    /// 0 when the rule is off.
    consecutive_failures: u32,
    half_open_trials: u32,
    /// Nanoseconds a half-open period may last (`u64::MAX`: no limit).
    max_half_open_nanos: u64,
    half_open_by_rate: bool,
    max_waiting: u32,
    reset_backoff: f32,
    reset_timeout: Duration,
    max_reset_timeout: Duration,
}

// `repr(C)` keeps the declared order: the counters written on every call share a cache line.
#[repr(C)]
pub(crate) struct ResourceInner {
    // Hot, read or written on every call.
    used: AtomicU64,
    /// Outcomes recorded into the count window (kept beside `used`: one contended line).
    window_head: AtomicU64,
    breaker: AtomicU8,
    level: AtomicU8,
    waiting: AtomicU32,
    /// Generation (high bits) and trial calls left (low bits) while half-open.
    trials: AtomicU64,
    consecutive: AtomicU32,
    /// Clock reading at which an open circuit may go half-open.
    open_until: AtomicU64,
    capacity: u64,
    up: [u64; LEVELS],
    down: [u64; LEVELS],
    /// Stamp permits with the clock (slow-call rule or time window).
    measure: bool,
    /// Any outcome rule configured.
    outcome_rules: bool,
    slow_nanos: u64,
    window: Option<Box<Window>>,
    limiter: Option<Box<Limiter>>,
    notify: Notify,
    /// Refusals by reason: open, full, rate-limited, queue (only written when refusing).
    rejected: [AtomicU64; 4],
    // Cold.
    rules: Rules,
    shared: Arc<Shared>,
    /// Itself, for the reset timer of an opening.
    me: Weak<ResourceInner>,
    cold: Mutex<Cold>,
}

fn units_at(percent: f64, capacity: u64) -> u64 {
    if percent <= 0.0 {
        return 0;
    }
    // Ceil so that "usage at or above p %" means used * 100 >= p * capacity.
    let u = (percent * capacity as f64 / 100.0).ceil();
    if u >= capacity as f64 {
        capacity
    } else {
        u as u64
    }
}

impl ResourceInner {
    /// A resource for validated `settings`.
    pub(crate) fn new(
        settings: ResourceSettings,
        id: Arc<str>,
        shared: Arc<Shared>,
        me: Weak<ResourceInner>,
    ) -> Self {
        let cap = settings.capacity;
        let t = settings.thresholds;
        let h = settings.hysteresis;
        let up = [
            units_at(t.warning, cap),
            units_at(t.critical, cap),
            units_at(t.circuit, cap),
            u64::MAX,
        ];
        let down = [
            0,
            units_at(t.warning - h, cap),
            units_at(t.critical - h, cap),
            units_at(t.circuit - h, cap),
        ];
        let slow_rule = settings.slow_call_rate_threshold.is_some();
        let rate_rule = settings.failure_rate_threshold.is_some() || slow_rule;
        let window = rate_rule.then(|| {
            Box::new(match settings.window {
                SlidingWindow::Count(n) => Window::Count(CountWindow::new(n)),
                SlidingWindow::Time(d) => {
                    Window::Time(Box::new(Mutex::new(TimeWindow::new(duration_nanos(d)))))
                }
            })
        });
        let limiter = settings.rate_limit.and_then(|r| r.quota()).map(|q| {
            Box::new(RateLimiter::direct_with_clock(
                q,
                GovernorClock(shared.clock.clone()),
            ))
        });
        let measure = slow_rule || matches!(window.as_deref(), Some(Window::Time(_)));
        let now = shared.clock.now();
        let mut level = 0;
        while level < 3 && up[level] == 0 {
            level += 1;
        }
        let r = Self {
            used: AtomicU64::new(0),
            window_head: AtomicU64::new(0),
            breaker: AtomicU8::new(CLOSED),
            level: AtomicU8::new(level as u8),
            waiting: AtomicU32::new(0),
            trials: AtomicU64::new(0),
            consecutive: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            capacity: cap,
            up,
            down,
            measure,
            outcome_rules: rate_rule || settings.consecutive_failures.is_some(),
            slow_nanos: duration_nanos(settings.slow_call_duration),
            window,
            limiter,
            notify: Notify::new(),
            rejected: Default::default(),
            rules: Rules {
                id,
                resource_type: settings.resource_type,
                open_on_usage: settings.open_on_usage,
                failure_rate: settings.failure_rate_threshold.map(|r| r as f32),
                slow_rate: settings.slow_call_rate_threshold.map(|r| r as f32),
                minimum_calls: settings.minimum_calls,
                consecutive_failures: settings.consecutive_failures.unwrap_or(0),
                half_open_trials: settings.half_open_trials,
                max_half_open_nanos: settings
                    .max_wait_in_half_open
                    .map_or(u64::MAX, duration_nanos),
                half_open_by_rate: settings.half_open_by_rate,
                max_waiting: settings.max_waiting,
                reset_backoff: settings.reset_backoff as f32,
                reset_timeout: settings.reset_timeout,
                max_reset_timeout: settings.max_reset_timeout,
            },
            shared,
            me,
            cold: Mutex::new(Cold {
                reported: CircuitStatus::Closed,
                reported_usage: CircuitStatus::Closed,
                reported_breaker: CircuitStatus::Closed,
                legacy_trial_units: 0,
                last_change: now,
                generation: 0,
                trials_passed: 0,
                trials_failed: 0,
                trials_slow: 0,
                legacy_trials: 0,
                opens_in_row: 0,
                openings: 0,
            }),
        };
        {
            let mut cold = r.cold.lock();
            if level == 3 && r.rules.open_on_usage {
                r.open_locked(&mut cold, "usage", CLOSED);
            }
            r.publish_if_changed(&mut cold, "registered");
        }
        r
    }

    pub(crate) fn id(&self) -> &str {
        &self.rules.id
    }

    /// Approximate heap bytes owned by this resource (for capacity planning and benchmarks).
    pub(crate) fn footprint(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.rules.id.len()
            + self
                .window
                .as_ref()
                .map_or(0, |w| std::mem::size_of::<Window>() + w.bytes())
            + self
                .limiter
                .as_ref()
                .map_or(0, |_| std::mem::size_of::<Limiter>())
    }

    // ---- acquisition -------------------------------------------------------------------

    // Always inlined: the hot path is a handful of instructions and a call frame costs as many.
    #[inline(always)]
    pub(crate) fn try_acquire(&self, units: u64) -> std::result::Result<PermitTicket, Rejected> {
        match self.admit(units) {
            Ok(t) => Ok(t),
            Err(r) => Err(self.count_rejection(r)),
        }
    }

    #[cold]
    fn count_rejection(&self, r: Rejected) -> Rejected {
        let i = match r {
            Rejected::CircuitOpen | Rejected::ForcedOpen | Rejected::HalfOpenTrialsBusy => 0,
            Rejected::CapacityFull | Rejected::ExceedsCapacity => 1,
            Rejected::RateLimited => 2,
            Rejected::QueueFull | Rejected::WaitTimedOut => 3,
            Rejected::ZeroUnits => return r,
        };
        self.rejected[i].fetch_add(1, Ordering::Relaxed);
        r
    }

    pub(crate) fn metrics(&self) -> ResourceMetrics {
        let n = |i: usize| self.rejected[i].load(Ordering::Relaxed);
        ResourceMetrics {
            rejected_open: n(0),
            rejected_full: n(1),
            rejected_rate_limited: n(2),
            rejected_queue: n(3),
            openings: self.cold.lock().openings,
        }
    }

    #[inline(always)]
    fn admit(&self, units: u64) -> std::result::Result<PermitTicket, Rejected> {
        if units == 0 {
            return Err(Rejected::ZeroUnits);
        }
        if units > self.capacity {
            return Err(Rejected::ExceedsCapacity);
        }
        let mut tag = 0;
        match self.breaker.load(Ordering::Acquire) {
            CLOSED | DISABLED | METRICS_ONLY => {}
            _ => tag = self.admit_not_closed()?,
        }
        if let Err(r) = self.take_units(units) {
            self.give_back_trial(tag);
            return Err(r);
        }
        if let Some(l) = &self.limiter
            && !rate_ok(l, units)
        {
            self.return_units(units);
            self.give_back_trial(tag);
            return Err(Rejected::RateLimited);
        }
        if tag != 0 && self.rules.open_on_usage && self.used.load(Ordering::Acquire) >= self.up[2] {
            // A trial that would take usage to the circuit threshold reopens the circuit.
            self.return_units(units);
            let mut cold = self.cold.lock();
            if cold.generation == tag & !TRIAL {
                self.open_locked(&mut cold, "usage", HALF_OPEN);
                self.publish_if_changed(&mut cold, "usage");
            }
            return Err(Rejected::CircuitOpen);
        }
        let started = if self.measure {
            self.shared.clock.now()
        } else {
            0
        };
        Ok(PermitTicket::new(started, tag))
    }

    /// Admission when the breaker is not closed: a trial while half-open, refusal otherwise.
    #[cold]
    fn admit_not_closed(&self) -> std::result::Result<u64, Rejected> {
        loop {
            match self.breaker.load(Ordering::Acquire) {
                CLOSED | DISABLED | METRICS_ONLY => return Ok(0),
                FORCED_OPEN => return Err(Rejected::ForcedOpen),
                OPEN => {
                    if !self.maybe_half_open() {
                        return Err(Rejected::CircuitOpen);
                    }
                }
                _ => {
                    let mut cur = self.trials.load(Ordering::Acquire);
                    loop {
                        if cur & TRIAL_MASK == 0 {
                            self.check_half_open_wait();
                            return Err(Rejected::HalfOpenTrialsBusy);
                        }
                        match self.trials.compare_exchange_weak(
                            cur,
                            cur - 1,
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        ) {
                            Ok(_) => return Ok(TRIAL | (cur >> TRIAL_BITS)),
                            Err(c) => cur = c,
                        }
                    }
                }
            }
        }
    }

    fn give_back_trial(&self, tag: u64) {
        if tag & TRIAL == 0 {
            return;
        }
        let generation = tag & !TRIAL;
        let mut cur = self.trials.load(Ordering::Acquire);
        while cur >> TRIAL_BITS == generation {
            match self.trials.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return,
                Err(c) => cur = c,
            }
        }
    }

    /// The usage level as an index that needs no bounds check (levels are 0 to 3).
    #[inline]
    fn level_index(&self) -> usize {
        // SeqCst pairs with the store in `usage_changed`: a change of `used` either sees the
        // level that change's recomputation stored, or that recomputation sees the change.
        usize::from(self.level.load(Ordering::SeqCst) & 3)
    }

    #[inline]
    fn take_units(&self, units: u64) -> std::result::Result<(), Rejected> {
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            let new = cur + units;
            if new > self.capacity {
                return Err(Rejected::CapacityFull);
            }
            match self
                .used
                .compare_exchange_weak(cur, new, Ordering::SeqCst, Ordering::Relaxed)
            {
                Ok(_) => {
                    if new >= self.up[self.level_index()] {
                        self.usage_changed();
                    }
                    return Ok(());
                }
                Err(c) => cur = c,
            }
        }
    }

    /// Gives units back without touching the breaker; `used` saturates at zero.
    #[inline]
    pub(crate) fn return_units(&self, units: u64) {
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            let new = cur.saturating_sub(units);
            match self
                .used
                .compare_exchange_weak(cur, new, Ordering::SeqCst, Ordering::Relaxed)
            {
                Ok(_) => {
                    if new < self.down[self.level_index()] {
                        self.usage_changed();
                    }
                    break;
                }
                Err(c) => cur = c,
            }
        }
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.notify.notify_waiters();
        }
    }

    /// Waits up to `wait` for capacity, in a queue bounded by `max_waiting`.
    pub(crate) async fn acquire_waiting(
        &self,
        units: u64,
        wait: Duration,
    ) -> std::result::Result<PermitTicket, Rejected> {
        match self.wait_for_units(units, wait).await {
            Ok(t) => Ok(t),
            Err(r) => Err(self.count_rejection(r)),
        }
    }

    async fn wait_for_units(
        &self,
        units: u64,
        wait: Duration,
    ) -> std::result::Result<PermitTicket, Rejected> {
        {
            match self.admit(units) {
                Err(Rejected::CapacityFull) => {}
                other => return other,
            }
            if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.rules.max_waiting {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                return Err(Rejected::QueueFull);
            }
            let _slot = WaitSlot(&self.waiting);
            let deadline = architectlm_core::time::deadline_in(wait);
            loop {
                let notified = self.notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                match self.admit(units) {
                    Err(Rejected::CapacityFull) => {}
                    other => return other,
                }
                if tokio::time::timeout_at(deadline, notified).await.is_err() {
                    return Err(Rejected::WaitTimedOut);
                }
            }
        }
    }

    // ---- release and outcomes ----------------------------------------------------------

    #[inline]
    pub(crate) fn release_ticket(&self, units: u64, outcome: CallOutcome, ticket: PermitTicket) {
        self.return_units(units);
        if ticket.tag & TRIAL != 0 {
            if outcome == CallOutcome::Unknown {
                // A trial that decides nothing hands its slot to the next caller, so the
                // circuit cannot stay half-open for want of an outcome.
                self.give_back_trial(ticket.tag);
            } else {
                self.trial_done(ticket.tag & !TRIAL, outcome, ticket.started);
            }
        } else if self.outcome_rules && outcome != CallOutcome::Unknown {
            self.record(outcome, ticket.started);
        }
    }

    fn is_slow(&self, started: u64, now: u64) -> bool {
        self.rules.slow_rate.is_some()
            && started != 0
            && now.saturating_sub(started) >= self.slow_nanos
    }

    #[inline]
    fn record(&self, outcome: CallOutcome, started: u64) {
        let b = self.breaker.load(Ordering::Acquire);
        if b != CLOSED && b != METRICS_ONLY {
            // Outcomes count only while closed (or only measured); trials are handled apart.
            return;
        }
        let failed = outcome == CallOutcome::Failure;
        let n = self.rules.consecutive_failures;
        if n != 0 {
            if failed {
                if self.consecutive.fetch_add(1, Ordering::AcqRel) + 1 >= n && b == CLOSED {
                    self.open_from(CLOSED, "consecutive-failures");
                    return;
                }
            } else if self.consecutive.load(Ordering::Relaxed) != 0 {
                self.consecutive.store(0, Ordering::Relaxed);
            }
        }
        if let Some(w) = &self.window {
            let now = if self.measure {
                self.shared.clock.now()
            } else {
                0
            };
            let mut flags = 0;
            if failed {
                flags |= FAILED;
            }
            if self.is_slow(started, now) {
                flags |= SLOW;
            }
            if let Some(t) = w.record(&self.window_head, flags, now)
                && let Some(reason) = self.rate_exceeded(t)
            {
                self.open_from(CLOSED, reason);
            }
        }
    }

    fn rate_exceeded(&self, t: Totals) -> Option<&'static str> {
        self.rate_exceeded_in(t, self.rules.minimum_calls)
    }

    fn rate_exceeded_in(&self, t: Totals, minimum_calls: u32) -> Option<&'static str> {
        if t.calls < u64::from(minimum_calls) || t.calls == 0 {
            return None;
        }
        let calls = t.calls as f64;
        if let Some(r) = self.rules.failure_rate
            && t.failures as f64 * 100.0 >= f64::from(r) * calls
        {
            return Some("failure-rate");
        }
        if let Some(r) = self.rules.slow_rate
            && t.slow as f64 * 100.0 >= f64::from(r) * calls
        {
            return Some("slow-call-rate");
        }
        None
    }

    fn trial_done(&self, generation: u64, outcome: CallOutcome, started: u64) {
        let now = self.shared.clock.now();
        let slow = self.is_slow(started, now);
        let mut cold = self.cold.lock();
        if self.breaker.load(Ordering::Acquire) != HALF_OPEN || cold.generation != generation {
            return;
        }
        let failed = outcome == CallOutcome::Failure;
        if self.rules.half_open_by_rate {
            cold.trials_failed += u32::from(failed);
            cold.trials_slow += u32::from(slow);
            cold.trials_passed += 1;
            if cold.trials_passed >= self.rules.half_open_trials {
                let t = Totals {
                    calls: u64::from(cold.trials_passed),
                    failures: u64::from(cold.trials_failed),
                    slow: u64::from(cold.trials_slow),
                };
                // The trials are the whole sample: the minimum of calls does not apply.
                match self.rate_exceeded_in(t, 0) {
                    Some(reason) => {
                        self.open_locked(&mut cold, reason, HALF_OPEN);
                        self.publish_if_changed(&mut cold, reason);
                    }
                    None => {
                        cold.trials_passed -= 1;
                        self.trial_passed(&mut cold);
                    }
                }
            }
            return;
        }
        if failed || slow {
            let reason = if slow { "slow-trial" } else { "failed-trial" };
            self.open_locked(&mut cold, reason, HALF_OPEN);
            self.publish_if_changed(&mut cold, reason);
            return;
        }
        self.trial_passed(&mut cold);
    }

    fn trial_passed(&self, cold: &mut Cold) {
        cold.trials_passed += 1;
        if cold.trials_passed >= self.rules.half_open_trials {
            if self.rules.open_on_usage && self.used.load(Ordering::Acquire) >= self.up[2] {
                self.open_locked(cold, "usage", HALF_OPEN);
                self.publish_if_changed(cold, "usage");
            } else {
                self.close_locked(cold);
                self.publish_if_changed(cold, "trials-passed");
            }
        }
    }

    // ---- legacy acquire/release without permits -----------------------------------------

    pub(crate) fn acquire_legacy(&self, units: u64) -> std::result::Result<(), Rejected> {
        let ticket = self.try_acquire(units)?;
        if ticket.tag & TRIAL != 0 {
            let mut cold = self.cold.lock();
            if cold.generation == ticket.tag & !TRIAL {
                cold.legacy_trials += 1;
                cold.legacy_trial_units = cold.legacy_trial_units.saturating_add(units);
            }
        }
        Ok(())
    }

    /// Gives back units taken without a permit. While half-open, only units of a trial admitted
    /// without a permit can decide it: a release pays back the units that are no such trial's
    /// first (taken before the circuit opened, or by permits), and passes a trial only when it
    /// returns more than those. Without a permit there is no outcome, so giving a trial's units
    /// back passes it.
    pub(crate) fn release_legacy(&self, units: u64) {
        let mut decides = None;
        if self.breaker.load(Ordering::Acquire) == HALF_OPEN {
            let mut cold = self.cold.lock();
            if self.breaker.load(Ordering::Acquire) == HALF_OPEN && cold.legacy_trials > 0 {
                let used = self.used.load(Ordering::SeqCst);
                let others = used.saturating_sub(cold.legacy_trial_units);
                if units > others {
                    cold.legacy_trials -= 1;
                    cold.legacy_trial_units =
                        cold.legacy_trial_units.saturating_sub(units - others);
                    decides = Some(cold.generation);
                }
            }
        }
        // Outside the lock: giving units back may recompute the usage status, which locks.
        self.return_units(units);
        if let Some(generation) = decides {
            let mut cold = self.cold.lock();
            if self.breaker.load(Ordering::Acquire) == HALF_OPEN && cold.generation == generation {
                self.trial_passed(&mut cold);
            }
        }
    }

    /// Sets usage directly (for gauges fed by a sampler), clamped to the capacity.
    pub(crate) fn set_usage(&self, units: u64) {
        let units = units.min(self.capacity);
        let old = self.used.swap(units, Ordering::SeqCst);
        let level = self.level_index();
        if units >= self.up[level] || units < self.down[level] {
            self.usage_changed();
        }
        if units < old && self.waiting.load(Ordering::SeqCst) > 0 {
            self.notify.notify_waiters();
        }
    }

    // ---- status changes ----------------------------------------------------------------

    #[cold]
    fn usage_changed(&self) {
        let mut cold = self.cold.lock();
        // The fast paths change `used` first and read the level after (both SeqCst); this
        // stores the level first and reads `used` after. So a change that read the old level
        // (and skipped calling here) is seen by the second read, and the level is computed
        // again until it agrees with the usage it was computed from.
        let mut used = self.used.load(Ordering::SeqCst);
        let mut l = self.level_index();
        loop {
            while l < LEVELS - 1 && used >= self.up[l] {
                l += 1;
            }
            while l > 0 && used < self.down[l] {
                l -= 1;
            }
            self.level.store(l as u8, Ordering::SeqCst);
            let again = self.used.load(Ordering::SeqCst);
            if again == used {
                break;
            }
            used = again;
        }
        if l == LEVELS - 1
            && self.rules.open_on_usage
            && self.breaker.load(Ordering::Acquire) == CLOSED
        {
            self.open_locked(&mut cold, "usage", CLOSED);
        }
        self.publish_if_changed(&mut cold, "usage");
    }

    #[cold]
    fn open_from(&self, from: u8, reason: &'static str) {
        let mut cold = self.cold.lock();
        self.open_locked(&mut cold, reason, from);
        self.publish_if_changed(&mut cold, reason);
    }

    fn open_locked(&self, cold: &mut Cold, reason: &'static str, from: u8) {
        if self.breaker.load(Ordering::Acquire) != from {
            return;
        }
        let s = &self.rules;
        let factor =
            f64::from(s.reset_backoff).powi(i32::try_from(cold.opens_in_row).unwrap_or(i32::MAX));
        // Saturates: a `reset_timeout` or backoff product past `Duration::MAX` is `MAX`, capped
        // by `max_reset_timeout`.
        let timeout =
            architectlm_core::time::mul_duration(s.reset_timeout, factor).min(s.max_reset_timeout);
        cold.opens_in_row = cold.opens_in_row.saturating_add(1);
        cold.openings += 1;
        tracing::info!(resource = %self.id(), reason, ?timeout, "circuit opened");
        cold.generation += 1;
        self.trials
            .store(cold.generation << TRIAL_BITS, Ordering::Release);
        self.open_until.store(
            self.shared
                .clock
                .now()
                .saturating_add(duration_nanos(timeout)),
            Ordering::Release,
        );
        self.breaker.store(OPEN, Ordering::Release);
        self.schedule_half_open(cold.generation, timeout);
    }

    /// One timer per opening (never per call) moves the circuit to half-open when the reset
    /// timeout has passed, so `circuit-half-open` fires even when no call arrives. Without a
    /// Tokio runtime, or on a manual clock, the move happens on the next call or status read.
    fn schedule_half_open(&self, generation: u64, after: Duration) {
        self.schedule(generation, after, |r| {
            r.maybe_half_open();
        });
    }

    /// Runs `then` after `after` if the breaker is still in the same generation (on a Tokio
    /// clock with a runtime; otherwise the next call does the same check).
    fn schedule(&self, generation: u64, after: Duration, then: fn(&ResourceInner)) {
        if !self.shared.clock.is_tokio() {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let me = self.me.clone();
        handle.spawn(async move {
            tokio::time::sleep(after).await;
            if let Some(r) = me.upgrade() {
                let current = r.cold.lock().generation == generation;
                if current {
                    then(&r);
                }
            }
        });
    }

    /// Opens a half-open circuit whose longest wait for its trials has passed.
    fn check_half_open_wait(&self) {
        if self.rules.max_half_open_nanos == u64::MAX
            || self.shared.clock.now() < self.open_until.load(Ordering::Acquire)
        {
            return;
        }
        let mut cold = self.cold.lock();
        if self.breaker.load(Ordering::Acquire) == HALF_OPEN
            && self.shared.clock.now() >= self.open_until.load(Ordering::Acquire)
        {
            self.open_locked(&mut cold, "half-open-timeout", HALF_OPEN);
            self.publish_if_changed(&mut cold, "half-open-timeout");
        }
    }

    fn close_locked(&self, cold: &mut Cold) {
        cold.opens_in_row = 0;
        cold.legacy_trials = 0;
        cold.legacy_trial_units = 0;
        cold.generation += 1;
        self.trials
            .store(cold.generation << TRIAL_BITS, Ordering::Release);
        if let Some(w) = &self.window {
            w.clear(&self.window_head);
        }
        self.consecutive.store(0, Ordering::Relaxed);
        self.breaker.store(CLOSED, Ordering::Release);
    }

    /// Moves an open circuit whose reset timeout has passed to half-open. Returns whether the
    /// circuit is half-open now.
    fn maybe_half_open(&self) -> bool {
        if self.shared.clock.now() < self.open_until.load(Ordering::Acquire) {
            return false;
        }
        let mut cold = self.cold.lock();
        match self.breaker.load(Ordering::Acquire) {
            HALF_OPEN => return true,
            OPEN => {}
            _ => return false,
        }
        if self.shared.clock.now() < self.open_until.load(Ordering::Acquire) {
            return false;
        }
        cold.generation += 1;
        cold.trials_passed = 0;
        cold.trials_failed = 0;
        cold.trials_slow = 0;
        cold.legacy_trials = 0;
        cold.legacy_trial_units = 0;
        let k = u64::from(self.rules.half_open_trials).min(TRIAL_MASK);
        self.trials
            .store((cold.generation << TRIAL_BITS) | k, Ordering::Release);
        // While half-open, `open_until` holds the end of the longest wait for the trials.
        let wait = self.rules.max_half_open_nanos;
        self.open_until.store(
            self.shared.clock.now().saturating_add(wait),
            Ordering::Release,
        );
        self.breaker.store(HALF_OPEN, Ordering::Release);
        if wait != u64::MAX {
            self.schedule(
                cold.generation,
                Duration::from_nanos(wait),
                Self::check_half_open_wait,
            );
        }
        self.publish_if_changed(&mut cold, "reset-timeout");
        true
    }

    pub(crate) fn force_open(&self) {
        let mut cold = self.cold.lock();
        cold.generation += 1;
        self.trials
            .store(cold.generation << TRIAL_BITS, Ordering::Release);
        self.breaker.store(FORCED_OPEN, Ordering::Release);
        self.publish_if_changed(&mut cold, "forced-open");
    }

    /// Opens the circuit for `d` (then half-open as after any opening), whatever its state.
    pub(crate) fn open_for(&self, d: Duration) {
        let mut cold = self.cold.lock();
        cold.generation += 1;
        cold.openings += 1;
        self.trials
            .store(cold.generation << TRIAL_BITS, Ordering::Release);
        self.open_until.store(
            self.shared.clock.now().saturating_add(duration_nanos(d)),
            Ordering::Release,
        );
        self.breaker.store(OPEN, Ordering::Release);
        tracing::info!(resource = %self.id(), timeout = ?d, "circuit opened by hand");
        self.schedule_half_open(cold.generation, d);
        self.publish_if_changed(&mut cold, "manual");
    }

    /// Records outcomes and usage as usual but never opens or refuses for the breaker.
    pub(crate) fn metrics_only(&self) {
        let mut cold = self.cold.lock();
        self.close_locked(&mut cold);
        self.breaker.store(METRICS_ONLY, Ordering::Release);
        self.publish_if_changed(&mut cold, "metrics-only");
    }

    /// A consistent snapshot of the breaker's figures (one lock, a few atomic reads).
    pub(crate) fn snapshot(&self) -> ResourceSnapshot {
        let cold = self.cold.lock();
        let now = self.shared.clock.now();
        let t = self
            .window
            .as_ref()
            .map(|w| w.totals(&self.window_head, now));
        let rate = |n: u64, calls: u64| {
            (calls >= u64::from(self.rules.minimum_calls) && calls > 0)
                .then(|| n as f64 * 100.0 / calls as f64)
        };
        let breaker = self.breaker.load(Ordering::Acquire);
        let trials_left = (breaker == HALF_OPEN)
            .then(|| (self.trials.load(Ordering::Acquire) & TRIAL_MASK) as u32);
        ResourceSnapshot {
            status: self.current_status(),
            breaker: match breaker {
                DISABLED => BreakerMode::Disabled,
                METRICS_ONLY => BreakerMode::MetricsOnly,
                FORCED_OPEN => BreakerMode::ForcedOpen,
                OPEN => BreakerMode::Open,
                HALF_OPEN => BreakerMode::HalfOpen,
                _ => BreakerMode::Closed,
            },
            used: self.used.load(Ordering::Acquire),
            capacity: self.capacity,
            buffered_calls: t.map_or(0, |t| t.calls),
            failed_calls: t.map_or(0, |t| t.failures),
            slow_calls: t.map_or(0, |t| t.slow),
            failure_rate: t.and_then(|t| rate(t.failures, t.calls)),
            slow_call_rate: t.and_then(|t| rate(t.slow, t.calls)),
            refused_calls: self
                .rejected
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .sum(),
            trials_left,
            trials_passed: (breaker == HALF_OPEN).then_some(cold.trials_passed),
            openings: cold.openings,
            in_state_for: Duration::from_nanos(now.saturating_sub(cold.last_change)),
        }
    }

    pub(crate) fn disable(&self) {
        let mut cold = self.cold.lock();
        self.close_locked(&mut cold);
        self.breaker.store(DISABLED, Ordering::Release);
        self.publish_if_changed(&mut cold, "disabled");
    }

    pub(crate) fn reset(&self) {
        let mut cold = self.cold.lock();
        self.close_locked(&mut cold);
        if self.rules.open_on_usage && self.level_index() == LEVELS - 1 {
            self.open_locked(&mut cold, "usage", CLOSED);
        }
        self.publish_if_changed(&mut cold, "reset");
    }

    /// The status by usage alone: closed, warning or critical.
    fn usage_status(&self) -> CircuitStatus {
        match self.level_index() {
            0 => CircuitStatus::Closed,
            1 => CircuitStatus::Warning,
            // At the circuit threshold with usage opening disabled, critical is the top.
            _ => CircuitStatus::Critical,
        }
    }

    /// The breaker's state as a status: closed (also when disabled), open, or half-open.
    fn breaker_status(&self) -> CircuitStatus {
        match self.breaker.load(Ordering::Acquire) {
            OPEN | FORCED_OPEN => CircuitStatus::Open,
            HALF_OPEN => CircuitStatus::HalfOpen,
            _ => CircuitStatus::Closed,
        }
    }

    /// What `status()` reports: the breaker's state when it is not closed, else the usage's.
    fn current_status(&self) -> CircuitStatus {
        match self.breaker_status() {
            CircuitStatus::Closed => self.usage_status(),
            b => b,
        }
    }

    /// Publishes what changed since the last publication, one event per change, in order:
    /// first the usage status (`threshold-warning`, `threshold-critical`, `threshold-normal`),
    /// then the breaker (`circuit-open`, `circuit-half-open`, `circuit-closed`); each with
    /// `from` and `to`, and the combined `status` / `previous` that `status()` reports.
    fn publish_if_changed(&self, cold: &mut Cold, reason: &'static str) {
        let usage = self.usage_status();
        let breaker = self.breaker_status();
        let status = self.current_status();
        let previous = cold.reported;
        if status != previous {
            cold.reported = status;
            cold.last_change = self.shared.clock.now();
            tracing::debug!(resource = %self.id(), ?previous, ?status, reason, "resource status changed");
        }
        let mut changes: [Option<(LoadEventType, CircuitStatus, CircuitStatus)>; 2] = [None, None];
        if usage != cold.reported_usage {
            let t = match usage {
                CircuitStatus::Warning => LoadEventType::ThresholdWarning,
                CircuitStatus::Critical => LoadEventType::ThresholdCritical,
                _ => LoadEventType::ThresholdNormal,
            };
            changes[0] = Some((t, cold.reported_usage, usage));
            cold.reported_usage = usage;
        }
        if breaker != cold.reported_breaker {
            let t = match breaker {
                CircuitStatus::Open => LoadEventType::CircuitOpen,
                CircuitStatus::HalfOpen => LoadEventType::CircuitHalfOpen,
                _ => LoadEventType::CircuitClosed,
            };
            changes[1] = Some((t, cold.reported_breaker, breaker));
            cold.reported_breaker = breaker;
        }
        if changes.iter().all(Option::is_none) {
            return;
        }
        let bus = self.shared.bus.get();
        let listened =
            self.shared.hub.has_subscribers() || bus.is_some_and(EventHub::has_subscribers);
        if !listened {
            return;
        }
        let used = self.used.load(Ordering::Acquire);
        for (event_type, from, to) in changes.into_iter().flatten() {
            let payload = json!({
                "from": from,
                "to": to,
                "status": status,
                "previous": previous,
                "reason": reason,
                "used": used,
                "capacity": self.capacity,
                "usage_percentage": used as f64 * 100.0 / self.capacity as f64,
            });
            self.publish(LoadEvent::new(event_type, self.id(), payload));
        }
    }

    fn publish(&self, event: LoadEvent) {
        let bus = self.shared.bus.get();
        let event_type = event.event_type;
        if let Some(bus) = bus {
            bus.publish_with(|| {
                let mut e = Event::new(event_type.as_str(), EVENT_SOURCE, event.payload.clone());
                e.timestamp = event.timestamp;
                e.payload["resource_id"] = json!(self.id());
                e
            });
        }
        self.shared.hub.publish(event);
    }

    // ---- snapshots ---------------------------------------------------------------------

    pub(crate) fn is_available(&self) -> bool {
        let room = self.used.load(Ordering::Acquire) < self.capacity;
        match self.breaker.load(Ordering::Acquire) {
            CLOSED | DISABLED | METRICS_ONLY => room,
            // A read changes nothing: past its reset timeout an open circuit would admit the
            // next call as a trial (with K >= 1 trials per half-open period).
            OPEN => room && self.shared.clock.now() >= self.open_until.load(Ordering::Acquire),
            HALF_OPEN => room && self.trials.load(Ordering::Acquire) & TRIAL_MASK > 0,
            _ => false,
        }
    }

    /// A snapshot; reading it changes nothing (an open circuit past its reset timeout stays
    /// `open` until the timer or the next call moves it to half-open, with its event).
    pub(crate) fn status(&self) -> ResourceStatus {
        let cold = self.cold.lock();
        let used = self.used.load(Ordering::Acquire);
        let status = self.current_status();
        let clock = &self.shared.clock;
        let reset_at = (self.breaker.load(Ordering::Acquire) == OPEN)
            .then(|| clock.to_utc(self.open_until.load(Ordering::Acquire)));
        ResourceStatus::new(
            self.id(),
            self.rules.resource_type,
            self.capacity,
            used,
            status,
            clock.to_utc(cold.last_change),
            reset_at,
        )
    }

    pub(crate) fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    pub(crate) fn resource_type(&self) -> ResourceType {
        self.rules.resource_type
    }

    pub(crate) fn capacity(&self) -> u64 {
        self.capacity
    }
}

fn rate_ok(l: &Limiter, units: u64) -> bool {
    let n = u32::try_from(units)
        .ok()
        .and_then(std::num::NonZeroU32::new);
    match n {
        Some(n) => matches!(l.check_n(n), Ok(Ok(()))),
        None => false,
    }
}

struct WaitSlot<'a>(&'a AtomicU32);

impl Drop for WaitSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl PermitRelease for ResourceInner {
    fn release(&self, units: u64, outcome: CallOutcome, ticket: PermitTicket) {
        self.release_ticket(units, outcome, ticket);
    }
}

// ---- public handle ---------------------------------------------------------------------

/// A registered resource: a cheap handle (one `Arc`) for the hot path, with no lookup by id.
///
/// All methods may be called from any thread at once. `used` never exceeds the capacity and
/// never goes below zero.
///
/// ```
/// use architectlm_core::extensions::loadmanager::{CircuitStatus, ResourceType};
/// use architectlm_loadmanager::{LoadManager, Rejected, ResourceSettings};
///
/// let manager = LoadManager::new();
/// let db = manager
///     .register(
///         ResourceSettings::builder("db", ResourceType::Database, 2)
///             // A pool that is full refuses callers but is not a broken backend.
///             .open_on_usage(false)
///             .build()
///             .unwrap(),
///     )
///     .unwrap();
/// let a = db.try_acquire(1).unwrap();
/// let b = db.try_acquire(1).unwrap();
/// assert_eq!(db.try_acquire(1).unwrap_err(), Rejected::CapacityFull);
/// a.success();
/// b.failure();
/// assert_eq!(db.used(), 0);
/// assert_eq!(db.status().status, CircuitStatus::Closed);
/// ```
#[derive(Clone)]
pub struct Resource {
    pub(crate) inner: Arc<ResourceInner>,
}

impl fmt::Debug for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resource")
            .field("id", &self.inner.id())
            .field("used", &self.inner.used())
            .field("capacity", &self.inner.capacity)
            .finish()
    }
}

impl Resource {
    /// The id.
    pub fn id(&self) -> &str {
        self.inner.id()
    }

    /// The kind.
    pub fn resource_type(&self) -> ResourceType {
        self.inner.resource_type()
    }

    /// Units available in total.
    pub fn capacity(&self) -> u64 {
        self.inner.capacity()
    }

    /// Units in use now.
    pub fn used(&self) -> u64 {
        self.inner.used()
    }

    /// Takes `units` now or says why not. The permit borrows the handle; see
    /// [`try_acquire_owned`](Self::try_acquire_owned) for one that can move into a task.
    #[inline]
    pub fn try_acquire(&self, units: u64) -> std::result::Result<Permit<'_>, Rejected> {
        let ticket = self.inner.try_acquire(units)?;
        Ok(Permit {
            resource: &self.inner,
            units,
            ticket,
            done: false,
        })
    }

    /// Takes `units`, waiting up to `wait` for capacity (not for an open circuit) in the
    /// bounded queue; refused at once with [`Rejected::QueueFull`] when the queue is full.
    pub async fn acquire(
        &self,
        units: u64,
        wait: Duration,
    ) -> std::result::Result<Permit<'_>, Rejected> {
        let ticket = self.inner.acquire_waiting(units, wait).await?;
        Ok(Permit {
            resource: &self.inner,
            units,
            ticket,
            done: false,
        })
    }

    /// Like [`try_acquire`](Self::try_acquire), as an owned core permit.
    #[inline]
    pub fn try_acquire_owned(&self, units: u64) -> std::result::Result<ResourcePermit, Rejected> {
        let ticket = self.inner.try_acquire(units)?;
        Ok(ResourcePermit::with_ticket(
            self.inner.clone(),
            units,
            ticket,
        ))
    }

    /// Like [`acquire`](Self::acquire), as an owned core permit.
    pub async fn acquire_owned(
        &self,
        units: u64,
        wait: Duration,
    ) -> std::result::Result<ResourcePermit, Rejected> {
        let ticket = self.inner.acquire_waiting(units, wait).await?;
        Ok(ResourcePermit::with_ticket(
            self.inner.clone(),
            units,
            ticket,
        ))
    }

    /// Takes `units` without a permit (the original's `acquire_resource`); give them back
    /// with [`release`](Self::release). While half-open such an acquisition is a trial that
    /// passes when its units are released.
    pub fn acquire_units(&self, units: u64) -> std::result::Result<(), Rejected> {
        self.inner.acquire_legacy(units)
    }

    /// Gives back units taken with [`acquire_units`](Self::acquire_units); `used` saturates
    /// at zero. Never moves an open circuit out of open.
    pub fn release(&self, units: u64) {
        self.inner.release_legacy(units);
    }

    /// Sets usage directly, clamped to the capacity (for gauges such as a system sampler).
    pub fn set_usage(&self, units: u64) {
        self.inner.set_usage(units);
    }

    /// Whether a call would be admitted now (not open, not full, a trial left if half-open).
    pub fn is_available(&self) -> bool {
        self.inner.is_available()
    }

    /// A snapshot.
    pub fn status(&self) -> ResourceStatus {
        self.inner.status()
    }

    /// Counters of refusals and openings since registration.
    pub fn metrics(&self) -> ResourceMetrics {
        self.inner.metrics()
    }

    /// Opens the circuit until [`reset`](Self::reset); no reset timeout applies.
    pub fn force_open(&self) {
        self.inner.force_open();
    }

    /// Opens the circuit for `d`, whatever its state (reason `manual`); it goes half-open
    /// after `d` like after any opening.
    pub fn open_for(&self, d: Duration) {
        self.inner.open_for(d);
    }

    /// Opens the circuit until `deadline` (a reading of this manager's clock, which follows
    /// Tokio's by default): `open_for(deadline - now)`.
    pub fn open_until(&self, deadline: tokio::time::Instant) {
        self.inner
            .open_for(deadline.saturating_duration_since(tokio::time::Instant::now()));
    }

    /// Records outcomes and usage as usual and publishes usage events, but never opens or
    /// refuses for the breaker (reason `metrics-only`); [`reset`](Self::reset) leaves it.
    pub fn metrics_only(&self) {
        self.inner.metrics_only();
    }

    /// A consistent snapshot of the breaker's figures, cheap enough to read on every scrape.
    pub fn snapshot(&self) -> ResourceSnapshot {
        self.inner.snapshot()
    }

    /// Disables the breaker: it never opens (capacity and rate limits still apply) until
    /// [`reset`](Self::reset).
    pub fn disable(&self) {
        self.inner.disable();
    }

    /// Closes the circuit and clears its windows (opens again at once if usage is at the
    /// circuit threshold).
    pub fn reset(&self) {
        self.inner.reset();
    }

    /// Approximate bytes this resource occupies.
    pub fn footprint(&self) -> usize {
        self.inner.footprint()
    }
}

/// Units of a [`Resource`] held until dropped; report the outcome with
/// [`success`](Self::success), [`failure`](Self::failure) or [`complete`](Self::complete).
/// Dropped without a report it counts as unknown, or as a failure while its thread panics.
#[must_use = "dropping a permit releases it at once"]
pub struct Permit<'a> {
    resource: &'a ResourceInner,
    units: u64,
    ticket: PermitTicket,
    done: bool,
}

impl fmt::Debug for Permit<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("resource", &self.resource.id())
            .field("units", &self.units)
            .field("trial", &(self.ticket.tag & TRIAL != 0))
            .finish()
    }
}

impl Permit<'_> {
    /// The units held.
    pub fn units(&self) -> u64 {
        self.units
    }

    /// Whether this permit is a half-open trial call.
    pub fn is_trial(&self) -> bool {
        self.ticket.tag & TRIAL != 0
    }

    #[inline]
    fn finish(&mut self, outcome: CallOutcome) {
        if !self.done {
            self.done = true;
            self.resource
                .release_ticket(self.units, outcome, self.ticket);
        }
    }

    /// Releases and records a success.
    #[inline]
    pub fn success(mut self) {
        self.finish(CallOutcome::Success);
    }

    /// Releases and records a failure.
    #[inline]
    pub fn failure(mut self) {
        self.finish(CallOutcome::Failure);
    }

    /// Releases with the given outcome.
    #[inline]
    pub fn complete(mut self, outcome: CallOutcome) {
        self.finish(outcome);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.done {
            let outcome = if std::thread::panicking() {
                CallOutcome::Failure
            } else {
                CallOutcome::Unknown
            };
            self.finish(outcome);
        }
    }
}
