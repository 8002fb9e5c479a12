//! The in-memory saga store: the same contract as the durable ones, lost with the process.

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use uuid::Uuid;

use architectlm_core::extensions::Page;
use architectlm_core::extensions::saga::{SagaFilter, SagaInstance, SagaStatus};

use super::{CreateOutcome, SagaStore, SagaUpdate, StoredSaga, UNFINISHED, matches};
use crate::{Error, Result};

#[derive(Default)]
struct State {
    /// Boxed: the map's spare capacity then costs a pointer per slot, not a whole record.
    sagas: HashMap<Uuid, Box<StoredSaga>>,
    keys: HashMap<(String, String), Uuid>,
}

/// A [`SagaStore`] in memory. For tests, benchmarks and sagas that need not survive a restart.
///
/// Cheap operations under one lock; `get` and `list` clone what they return.
#[derive(Default)]
pub struct InMemorySagaStore {
    state: Mutex<State>,
}

impl std::fmt::Debug for InMemorySagaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemorySagaStore")
            .field("instances", &self.state.lock().sagas.len())
            .finish()
    }
}

impl InMemorySagaStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

fn with_context(mut s: StoredSaga) -> StoredSaga {
    s.instance.rebuild_context();
    s
}

#[async_trait]
impl SagaStore for InMemorySagaStore {
    async fn create(&self, instance: &SagaInstance, owner: &str) -> Result<CreateOutcome> {
        let mut st = self.state.lock();
        if let Some(key) = &instance.idempotency_key {
            let k = (instance.saga_id.clone(), key.clone());
            if let Some(existing) = st.keys.get(&k).and_then(|id| st.sagas.get(id)) {
                return Ok(CreateOutcome::Existing(with_context((**existing).clone())));
            }
            st.keys.insert(k, instance.id);
        }
        if st.sagas.contains_key(&instance.id) {
            return Err(Error::InvalidInput(format!(
                "saga instance {} already exists",
                instance.id
            )));
        }
        let stored = StoredSaga::new(instance.clone(), Some(owner.to_owned()));
        st.sagas.insert(instance.id, Box::new(stored.clone()));
        Ok(CreateOutcome::Created(stored))
    }

    async fn apply(&self, update: SagaUpdate) -> Result<()> {
        let mut st = self.state.lock();
        let Some(rec) = st.sagas.get_mut(&update.instance_id) else {
            return Err(Error::not_found("saga instance", update.instance_id));
        };
        if rec.fencing != update.fencing {
            return Err(Error::Conflict {
                kind: "saga instance",
                id: update.instance_id.to_string(),
                expected: update.fencing,
                actual: rec.fencing,
            });
        }
        // The update is ours: its step records move in (what `apply_to` does, without copies).
        let inst = &mut rec.instance;
        inst.status = update.status;
        inst.error = update.error;
        inst.completed_at = update.completed_at;
        for (idx, step) in update.steps {
            if let Some(slot) = inst.steps.get_mut(idx as usize) {
                *slot = step;
            }
        }
        Ok(())
    }

    async fn request_compensation(
        &self,
        instance_id: Uuid,
        reason: &str,
    ) -> Result<Option<StoredSaga>> {
        let mut st = self.state.lock();
        let Some(rec) = st.sagas.get_mut(&instance_id) else {
            return Ok(None);
        };
        if matches!(
            rec.instance.status,
            SagaStatus::Created | SagaStatus::Running
        ) && rec.compensation_requested.is_none()
        {
            rec.compensation_requested = Some(reason.to_owned());
        }
        Ok(Some(with_context((**rec).clone())))
    }

    async fn claim(
        &self,
        instance_id: Uuid,
        owner: &str,
        lease_until: Option<DateTime<Utc>>,
    ) -> Result<Option<StoredSaga>> {
        let mut st = self.state.lock();
        let Some(rec) = st.sagas.get_mut(&instance_id) else {
            return Ok(None);
        };
        rec.owner = Some(owner.to_owned());
        rec.lease_until = lease_until;
        rec.fencing += 1;
        Ok(Some(with_context((**rec).clone())))
    }

    async fn claim_unfinished(
        &self,
        owner: &str,
        lease_until: Option<DateTime<Utc>>,
    ) -> Result<Vec<StoredSaga>> {
        let mut st = self.state.lock();
        let mut out = Vec::new();
        for rec in st.sagas.values_mut() {
            if UNFINISHED.contains(&rec.instance.status) {
                rec.owner = Some(owner.to_owned());
                rec.lease_until = lease_until;
                rec.fencing += 1;
                out.push(with_context((**rec).clone()));
            }
        }
        out.sort_by_key(|r| (r.instance.started_at, r.instance.id));
        Ok(out)
    }

    async fn get(&self, instance_id: Uuid) -> Result<Option<StoredSaga>> {
        Ok(self
            .state
            .lock()
            .sagas
            .get(&instance_id)
            .map(|r| with_context((**r).clone())))
    }

    async fn list(&self, filter: &SagaFilter) -> Result<Page<SagaInstance>> {
        let st = self.state.lock();
        let mut hits: Vec<&StoredSaga> = st
            .sagas
            .values()
            .map(|r| &**r)
            .filter(|r| matches(filter, &r.instance))
            .collect();
        hits.sort_by_key(|r| (r.instance.started_at, r.instance.id));
        let total = hits.len() as u64;
        let offset = filter.page.offset.min(total) as usize;
        let limit = filter.page.limit as usize;
        let items: Vec<SagaInstance> = hits
            .into_iter()
            .skip(offset)
            .take(limit)
            .map(|r| {
                let mut i = r.instance.clone();
                i.rebuild_context();
                i
            })
            .collect();
        let end = offset as u64 + items.len() as u64;
        let next = (end < total).then_some(end);
        Ok(Page::new(items, total, next))
    }
}
