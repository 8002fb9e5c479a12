//! Where process instances live: the [`ProcessStore`] contract and the in-memory store.
//!
//! Durable stores (SQLite, PostgreSQL) implement the same contract in `architectlm-store`.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::RwLock;
use uuid::Uuid;

use crate::process::ProcessInstance;
use crate::{Error, Result};

/// Which instances [`ProcessStore::list`] returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProcessQuery {
    /// Only instances of this process.
    pub process_id: Option<String>,
    /// Only instances in this state.
    pub state: Option<String>,
}

impl ProcessQuery {
    /// Every instance.
    pub fn all() -> Self {
        Self::default()
    }
    /// Instances of one process.
    pub fn process(process_id: impl Into<String>) -> Self {
        Self {
            process_id: Some(process_id.into()),
            state: None,
        }
    }
    /// Restricts to one state.
    pub fn in_state(mut self, state: impl Into<String>) -> Self {
        self.state = Some(state.into());
        self
    }
}

/// A stored record that a durable store could not decode, and skipped.
///
/// One bad record never makes the rest unreadable: lists and recoveries return every other
/// record, log a `tracing` warning naming this one, and hand it to the listeners given to the
/// store (see [`ProcessStore::on_unreadable`]); the runtime and the extensions publish it as an
/// event (`RECORD_UNREADABLE` on the runtime's bus, `record-unreadable` from the saga
/// coordinator and the scheduler). A direct read of the record fails with
/// [`Error::UnreadableRecord`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UnreadableRecord {
    /// What kind of record: `saga instance`, `scheduled task`, `scheduled run`,
    /// `process instance`.
    pub kind: &'static str,
    /// Its id as stored.
    pub id: String,
    /// Why it cannot be decoded.
    pub error: String,
}

impl UnreadableRecord {
    /// A report of record `id` of `kind`, which failed to decode with `error`.
    pub fn new(kind: &'static str, id: impl Into<String>, error: impl Into<String>) -> Self {
        Self {
            kind,
            id: id.into(),
            error: error.into(),
        }
    }

    /// The report as an event payload: `{"kind", "id", "error"}`.
    pub fn to_payload(&self) -> serde_json::Value {
        serde_json::json!({"kind": self.kind, "id": self.id, "error": self.error})
    }
}

/// Hears the records a store skipped because they could not be decoded. Called on the
/// reading task; it must not block.
pub type UnreadableListener = Arc<dyn Fn(&UnreadableRecord) + Send + Sync>;

/// Storage of process instances with optimistic concurrency.
///
/// # Rules
/// - `Send + Sync`; every method may be called concurrently.
/// - [`insert`](Self::insert) fails with [`Error::Conflict`] if the id exists.
/// - [`update`](Self::update) writes only if the stored version equals `expected_version`, and
///   fails with [`Error::Conflict`] naming the instance and both versions otherwise. The caller
///   sets the new version (`expected_version + 1`) on the instance it passes.
/// - Reads return what the last successful write stored.
/// - A durable store whose row cannot be decoded skips it in [`list`](Self::list) (and warns
///   and tells its [`on_unreadable`](Self::on_unreadable) listeners), and fails
///   [`get`](Self::get) of that id with [`Error::UnreadableRecord`].
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use std::sync::Arc;
/// use architectlm_core::store::{InMemoryProcessStore, ProcessStore};
/// use architectlm_core::{ProcessDefinition, Runtime, System, TransitionDefinition};
///
/// let store = Arc::new(InMemoryProcessStore::new());
/// let ticket = ProcessDefinition::builder("ticket")
///     .state("open")
///     .state("closed")
///     .transition(TransitionDefinition::new("open", "closed", "close"))
///     .build()?;
/// let system = System::builder("desk").process(ticket).build()?;
/// let runtime = Runtime::builder(system).process_store(store.clone()).start().await?;
/// let t = runtime.create_process("ticket", serde_json::json!({})).await?;
/// assert_eq!(store.get(t.id).await?.map(|i| i.version), Some(1));
/// # Ok::<_, architectlm_core::Error>(())
/// # }).unwrap();
/// ```
#[async_trait]
pub trait ProcessStore: Send + Sync + fmt::Debug + 'static {
    /// Stores a new instance.
    async fn insert(&self, instance: &ProcessInstance) -> Result<()>;
    /// Loads an instance.
    async fn get(&self, id: Uuid) -> Result<Option<ProcessInstance>>;
    /// Replaces an instance if its stored version is `expected_version`.
    async fn update(&self, instance: &ProcessInstance, expected_version: u64) -> Result<()>;
    /// Lists instances matching the query, oldest first.
    async fn list(&self, query: &ProcessQuery) -> Result<Vec<ProcessInstance>>;

    /// Adds a listener for the records this store skips because they cannot be decoded
    /// ([`UnreadableRecord`]). The runtime adds one when it starts, which publishes
    /// `RECORD_UNREADABLE`. The default ignores it: a store that keeps decoded values (such
    /// as [`InMemoryProcessStore`]) never holds an unreadable record.
    fn on_unreadable(&self, listener: UnreadableListener) {
        let _ = listener;
    }
}

const SHARDS: usize = 32;

/// Process instances in memory, in shards so that writers to different instances rarely
/// contend. The default store.
pub struct InMemoryProcessStore {
    shards: Box<[RwLock<HashMap<Uuid, ProcessInstance>>]>,
}

impl fmt::Debug for InMemoryProcessStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InMemoryProcessStore")
            .field("len", &self.len())
            .finish()
    }
}

impl Default for InMemoryProcessStore {
    fn default() -> Self {
        Self::new()
    }
}

impl InMemoryProcessStore {
    /// An empty store.
    pub fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
        }
    }

    fn shard(&self, id: &Uuid) -> &RwLock<HashMap<Uuid, ProcessInstance>> {
        let b = id.as_bytes();
        &self.shards[(b[15] as usize ^ b[7] as usize) % SHARDS]
    }

    /// How many instances it holds.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait]
impl ProcessStore for InMemoryProcessStore {
    async fn insert(&self, instance: &ProcessInstance) -> Result<()> {
        let mut shard = self.shard(&instance.id).write();
        if let Some(existing) = shard.get(&instance.id) {
            return Err(Error::Conflict {
                kind: "process instance",
                id: instance.id.to_string(),
                expected: 0,
                actual: existing.version,
            });
        }
        shard.insert(instance.id, instance.clone());
        Ok(())
    }

    async fn get(&self, id: Uuid) -> Result<Option<ProcessInstance>> {
        Ok(self.shard(&id).read().get(&id).cloned())
    }

    async fn update(&self, instance: &ProcessInstance, expected_version: u64) -> Result<()> {
        let mut shard = self.shard(&instance.id).write();
        match shard.get_mut(&instance.id) {
            None => Err(Error::not_found("process instance", instance.id)),
            Some(stored) if stored.version != expected_version => Err(Error::Conflict {
                kind: "process instance",
                id: instance.id.to_string(),
                expected: expected_version,
                actual: stored.version,
            }),
            Some(stored) => {
                stored.clone_from(instance);
                Ok(())
            }
        }
    }

    async fn list(&self, query: &ProcessQuery) -> Result<Vec<ProcessInstance>> {
        let mut out: Vec<ProcessInstance> = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.read();
            out.extend(
                shard
                    .values()
                    .filter(|i| {
                        query
                            .process_id
                            .as_deref()
                            .is_none_or(|p| &*i.process_id == p)
                            && query.state.as_deref().is_none_or(|s| &*i.state == s)
                    })
                    .cloned(),
            );
        }
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(out)
    }
}
