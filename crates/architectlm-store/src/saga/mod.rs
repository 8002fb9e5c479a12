//! Storage of saga instances and their step journal.
//!
//! The saga coordinator writes ahead: a step is journaled as running before it runs, and its
//! result is journaled before the next step starts. A [`SagaStore`] is the journal: it keeps one
//! [`StoredSaga`] per instance and applies [`SagaUpdate`]s atomically.
//!
//! Two implementations ship here: [`InMemorySagaStore`] (tests, benchmarks, no durability) and,
//! with the `sqlite` feature, [`SqliteSagaStore`] (an embedded file in WAL mode whose writes from
//! concurrent sagas share commits).
//!
//! # Ownership, leases and fencing
//! Every instance records the node that owns it (`owner`), until when that ownership holds
//! (`lease_until`, `None` meaning "until the owner gives it up") and a fencing token (`fencing`)
//! that grows by one each time the instance is claimed. Every [`SagaUpdate`] carries the fencing
//! token its writer holds, and the store refuses it with [`Error::Conflict`](crate::Error::Conflict) when the token is
//! stale. With one node (SQLite, memory) a claim always succeeds and the token only guards
//! against a forgotten driver of the same process; a backend shared by several nodes (such as
//! PostgreSQL) grants a claim only when the instance is unowned, owned by the claimant, or its
//! lease has run out, and its owners renew their leases with [`SagaStore::renew_leases`]. A node
//! that lost its lease is fenced out on its next write and stops driving the instance.

mod memory;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "sqlite")]
mod sqlite;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use architectlm_core::extensions::Page;
use architectlm_core::extensions::saga::{SagaFilter, SagaInstance, SagaStatus, SagaStepExecution};
use architectlm_core::store::UnreadableListener;

use crate::Result;

pub use memory::InMemorySagaStore;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use postgres::{PG_SAGA_MIGRATIONS, PgSagaStore};
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub use sqlite::{SAGA_MIGRATIONS, SqliteSagaStore};

/// An instance as stored: the instance and the ownership data of the journal.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct StoredSaga {
    /// The instance with its step timeline; `context` is rebuilt from the step results.
    pub instance: SagaInstance,
    /// The node driving it.
    pub owner: Option<String>,
    /// Until when the owner holds it (`None`: until it gives it up).
    pub lease_until: Option<DateTime<Utc>>,
    /// Grows by one at every claim; updates must carry the current value.
    pub fencing: u64,
    /// Why an operator asked to compensate it, if one did while it ran forward.
    pub compensation_requested: Option<String>,
}

impl StoredSaga {
    /// A freshly created record owned by `owner` with fencing token 1.
    pub fn new(instance: SagaInstance, owner: Option<String>) -> Self {
        Self {
            instance,
            owner,
            lease_until: None,
            fencing: 1,
            compensation_requested: None,
        }
    }
}

/// One atomic journal entry: the instance's status and the step records that changed.
///
/// Steps are addressed by their position in the definition. A single update may close one step
/// and open the next, which is how the coordinator journals "result of step k" and "step k+1
/// running" in one write without breaking the write-ahead rule.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct SagaUpdate {
    /// The instance.
    pub instance_id: Uuid,
    /// The fencing token the writer holds.
    pub fencing: u64,
    /// The new status.
    pub status: SagaStatus,
    /// The instance's error (replaces the stored one).
    pub error: Option<String>,
    /// When it reached a terminal status.
    pub completed_at: Option<DateTime<Utc>>,
    /// Changed step records, by position.
    pub steps: Vec<(u32, SagaStepExecution)>,
}

impl SagaUpdate {
    /// An update of the instance's status with no step change.
    pub fn new(instance_id: Uuid, fencing: u64, status: SagaStatus) -> Self {
        Self {
            instance_id,
            fencing,
            status,
            error: None,
            completed_at: None,
            steps: Vec::new(),
        }
    }

    /// Applies the update to an in-memory copy (what the stores do on their side).
    pub fn apply_to(&self, instance: &mut SagaInstance) {
        instance.status = self.status;
        instance.error.clone_from(&self.error);
        instance.completed_at = self.completed_at;
        for (idx, step) in &self.steps {
            if let Some(slot) = instance.steps.get_mut(*idx as usize) {
                slot.clone_from(step);
            }
        }
    }
}

/// The result of [`SagaStore::create`].
#[derive(Debug, Clone, PartialEq)]
pub enum CreateOutcome {
    /// The instance was recorded.
    Created(StoredSaga),
    /// An instance of the same definition with the same idempotency key exists; this is it.
    Existing(StoredSaga),
}

/// The saga journal.
///
/// # Rules
/// - `Send + Sync`; every method may be called concurrently. Updates of one instance come from
///   one driver at a time (the fencing token enforces it).
/// - A method that returns `Ok` has made its change durable at the backend's durability level.
/// - [`create`](Self::create) is atomic with its idempotency check: two concurrent creates with
///   the same `(saga_id, idempotency_key)` record one instance and return it to both.
/// - [`apply`](Self::apply) is atomic and refuses a stale fencing token with
///   [`Error::Conflict`](crate::Error::Conflict) and an unknown instance with
///   [`Error::NotFound`](crate::Error::NotFound).
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use architectlm_core::extensions::saga::{SagaInstance, SagaStatus, SagaStepExecution};
/// use architectlm_store::saga::{CreateOutcome, InMemorySagaStore, SagaStore, SagaUpdate};
/// use uuid::Uuid;
///
/// let store = InMemorySagaStore::new();
/// let id = Uuid::now_v7();
/// let steps = vec![SagaStepExecution::new(Uuid::now_v7(), "reserve", format!("{id}:reserve"))];
/// let instance = SagaInstance::new(id, "order", 1, serde_json::json!({}), None, chrono::Utc::now(), steps);
/// let CreateOutcome::Created(stored) = store.create(&instance, "node-a").await? else { panic!() };
/// store.apply(SagaUpdate::new(id, stored.fencing, SagaStatus::Running)).await?;
/// assert_eq!(store.get(id).await?.unwrap().instance.status, SagaStatus::Running);
/// # Ok::<_, architectlm_core::Error>(())
/// # }).unwrap();
/// ```
#[async_trait]
pub trait SagaStore: Send + Sync + 'static {
    /// Records a new instance owned by `owner`, or returns the existing one with the same
    /// definition and idempotency key.
    async fn create(&self, instance: &SagaInstance, owner: &str) -> Result<CreateOutcome>;

    /// Applies one journal entry atomically.
    async fn apply(&self, update: SagaUpdate) -> Result<()>;

    /// Records an operator's request to compensate an instance that runs forward (status
    /// `created` or `running`); the driver stops after its running step and unwinds. Returns the
    /// record, or `None` for an unknown instance. Instances in other statuses are returned
    /// unchanged.
    async fn request_compensation(
        &self,
        instance_id: Uuid,
        reason: &str,
    ) -> Result<Option<StoredSaga>>;

    /// Takes ownership of one instance (whatever its status) for `owner`, bumping its fencing
    /// token. `None` for an unknown instance. A shared backend refuses (with
    /// [`Error::Conflict`](crate::Error::Conflict)) an instance leased to another live node.
    async fn claim(
        &self,
        instance_id: Uuid,
        owner: &str,
        lease_until: Option<DateTime<Utc>>,
    ) -> Result<Option<StoredSaga>>;

    /// Takes ownership of every unfinished instance (`created`, `running`, `compensating`)
    /// that `owner` may claim, bumping their fencing tokens, and returns them oldest first.
    async fn claim_unfinished(
        &self,
        owner: &str,
        lease_until: Option<DateTime<Utc>>,
    ) -> Result<Vec<StoredSaga>>;

    /// Extends the leases `owner` holds. Stores serving one node have no leases to renew.
    async fn renew_leases(&self, owner: &str, lease_until: DateTime<Utc>) -> Result<u64> {
        let _ = (owner, lease_until);
        Ok(0)
    }

    /// Whether several nodes share this store. A coordinator on a shared store leases every
    /// instance it drives, renews the leases, and takes over instances whose lease ran out
    /// ([`claim_expired`](Self::claim_expired)). Default `false`.
    fn shared(&self) -> bool {
        false
    }

    /// [`create`](Self::create) with the lease the creator holds on the new instance
    /// (`None`: until it gives it up). The default ignores the lease, which suits stores
    /// serving one node.
    async fn create_leased(
        &self,
        instance: &SagaInstance,
        owner: &str,
        lease_until: Option<DateTime<Utc>>,
    ) -> Result<CreateOutcome> {
        let _ = lease_until;
        self.create(instance, owner).await
    }

    /// Takes over up to `limit` unfinished instances of *other* nodes whose lease has run out
    /// (or that have no owner) for `owner`, bumping their fencing tokens, oldest first.
    /// Instances under a live lease, and those `owner` already holds, are left alone, so live
    /// drivers are not fenced out. Stores serving one node have nothing to take over (the
    /// default).
    async fn claim_expired(
        &self,
        owner: &str,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<StoredSaga>> {
        let _ = (owner, lease_until, limit);
        Ok(Vec::new())
    }

    /// Gives up the leases `owner` holds on unfinished instances, so that another node can
    /// take them over at once (a clean shutdown). Returns how many. Default: none.
    async fn release_leases(&self, owner: &str) -> Result<u64> {
        let _ = owner;
        Ok(0)
    }

    /// One instance.
    async fn get(&self, instance_id: Uuid) -> Result<Option<StoredSaga>>;

    /// Instances matching `filter`, oldest first, one page.
    async fn list(&self, filter: &SagaFilter) -> Result<Page<SagaInstance>>;

    /// Adds a listener for the instances this store skips because they cannot be decoded
    /// (kind `saga instance`). [`list`](Self::list) and the recoveries
    /// ([`claim_unfinished`](Self::claim_unfinished), [`claim_expired`](Self::claim_expired))
    /// skip such an instance, warn and tell the listeners; a read of it ([`get`](Self::get),
    /// [`claim`](Self::claim), ...) fails with
    /// [`Error::UnreadableRecord`](crate::Error::UnreadableRecord). The coordinator adds one
    /// that publishes `record-unreadable`. The default ignores it: the in-memory store never
    /// holds an unreadable instance.
    fn on_unreadable(&self, listener: UnreadableListener) {
        let _ = listener;
    }
}

/// Statuses from which a saga moves on by itself (recovery carries them on).
pub const UNFINISHED: [SagaStatus; 3] = [
    SagaStatus::Created,
    SagaStatus::Running,
    SagaStatus::Compensating,
];

pub(crate) fn matches(filter: &SagaFilter, i: &SagaInstance) -> bool {
    filter.saga_id.as_ref().is_none_or(|s| *s == i.saga_id)
        && (filter.status.is_empty() || filter.status.contains(&i.status))
        && filter.started_after.is_none_or(|t| i.started_at >= t)
        && filter.started_before.is_none_or(|t| i.started_at <= t)
}
