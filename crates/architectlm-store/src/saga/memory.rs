//! The in-memory saga store: the same contract as the durable ones, lost with the process.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use uuid::Uuid;

use architectlm_core::extensions::Page;
use architectlm_core::extensions::saga::{
    SagaFilter, SagaInstance, SagaStatus, SagaStepExecution, SagaStepStatus,
};
use serde_json::Value;

use super::{CreateOutcome, SagaStore, SagaUpdate, StoredSaga, UNFINISHED};
use crate::{Error, Result};

#[derive(Default)]
struct State {
    /// Boxed: the map's spare capacity then costs a pointer per slot, not a whole record.
    sagas: HashMap<Uuid, Box<Record>>,
    keys: HashMap<(String, String), Uuid>,
    /// The last owner seen: records of the same owner share its name.
    owner: Option<Arc<str>>,
}

impl State {
    fn owner(&mut self, owner: &str) -> Arc<str> {
        match &self.owner {
            Some(o) if **o == *owner => o.clone(),
            _ => {
                let o: Arc<str> = Arc::from(owner);
                self.owner = Some(o.clone());
                o
            }
        }
    }
}

/// A [`SagaStore`] in memory. For tests, benchmarks and sagas that need not survive a restart.
///
/// Cheap operations under one lock; `get` and `list` build what they return. Records are
/// compact, so that many waiting sagas fit: JSON objects and arrays (inputs, step results) are
/// kept as JSON text, idempotency keys of the usual form `<instance id>:<step id>` are not
/// stored, and records of one owner share its name.
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

/// Nesting depth up to which a value is kept as text (the JSON parser stops at 128 levels).
const TEXT_DEPTH: usize = 100;

/// A JSON value as a record keeps it.
enum Json {
    /// Scalars, empty containers and very deep documents.
    Value(Value),
    /// Objects and arrays: a few bytes of text where a tree of maps costs hundreds.
    Text(Box<str>),
}

impl Json {
    fn new(v: Value) -> Self {
        let tree = match &v {
            Value::Array(a) => !a.is_empty(),
            Value::Object(m) => !m.is_empty(),
            _ => false,
        };
        if tree && within_depth(&v, TEXT_DEPTH) {
            Self::Text(v.to_string().into_boxed_str())
        } else {
            Self::Value(v)
        }
    }

    fn value(&self) -> Value {
        match self {
            Self::Value(v) => v.clone(),
            // Written from a value of bounded depth, so it parses back.
            Self::Text(t) => serde_json::from_str(t).unwrap_or(Value::Null),
        }
    }
}

fn within_depth(v: &Value, limit: usize) -> bool {
    match v {
        Value::Array(a) => limit > 0 && a.iter().all(|x| within_depth(x, limit - 1)),
        Value::Object(m) => limit > 0 && m.values().all(|x| within_depth(x, limit - 1)),
        _ => true,
    }
}

/// Whether `key` is `<instance>:<step_id>`.
fn is_usual_key(key: &str, instance: Uuid, step_id: &str) -> bool {
    let mut buf = Uuid::encode_buffer();
    let id = instance.hyphenated().encode_lower(&mut buf);
    key.strip_prefix(&*id)
        .and_then(|k| k.strip_prefix(':'))
        .is_some_and(|k| k == step_id)
}

/// A step record: its id and step id, and the rest only once it differs from a pending step's
/// (a saga waiting in its first step keeps one full record, not one per step).
struct Step {
    id: Uuid,
    step_id: Box<str>,
    data: Option<Box<StepData>>,
}

struct StepData {
    status: SagaStepStatus,
    attempts: u32,
    compensation_attempts: u32,
    started_at: Option<DateTime<Utc>>,
    completed_at: Option<DateTime<Utc>>,
    /// The idempotency key when it is not `<instance id>:<step id>`.
    key: Option<String>,
    result: Option<Json>,
    error: Option<String>,
}

impl Step {
    fn new(instance: Uuid, s: SagaStepExecution) -> Self {
        let key =
            (!is_usual_key(&s.idempotency_key, instance, &s.step_id)).then_some(s.idempotency_key);
        let pending = s.status == SagaStepStatus::Pending
            && s.attempts == 0
            && s.compensation_attempts == 0
            && s.started_at.is_none()
            && s.completed_at.is_none()
            && key.is_none()
            && s.result.is_none()
            && s.error.is_none();
        let data = (!pending).then(|| {
            Box::new(StepData {
                status: s.status,
                attempts: s.attempts,
                compensation_attempts: s.compensation_attempts,
                started_at: s.started_at,
                completed_at: s.completed_at,
                key,
                result: s.result.map(Json::new),
                error: s.error,
            })
        });
        Self {
            id: s.id,
            step_id: s.step_id.into_boxed_str(),
            data,
        }
    }

    fn execution(&self, instance: Uuid) -> SagaStepExecution {
        let Some(d) = self.data.as_deref() else {
            let key = format!("{instance}:{}", self.step_id);
            return SagaStepExecution::new(self.id, &*self.step_id, key);
        };
        let key = match &d.key {
            Some(k) => k.clone(),
            None => format!("{instance}:{}", self.step_id),
        };
        let mut s = SagaStepExecution::new(self.id, &*self.step_id, key);
        s.status = d.status;
        s.attempts = d.attempts;
        s.compensation_attempts = d.compensation_attempts;
        s.started_at = d.started_at;
        s.completed_at = d.completed_at;
        s.result = d.result.as_ref().map(Json::value);
        s.error.clone_from(&d.error);
        s
    }
}

/// An instance as the store keeps it.
struct Record {
    saga_id: Box<str>,
    saga_version: u32,
    status: SagaStatus,
    input: Json,
    idempotency_key: Option<Box<str>>,
    started_at: DateTime<Utc>,
    completed_at: Option<DateTime<Utc>>,
    error: Option<Box<str>>,
    steps: Box<[Step]>,
    owner: Option<Arc<str>>,
    lease_until: Option<DateTime<Utc>>,
    fencing: u64,
    compensation_requested: Option<Box<str>>,
}

impl Record {
    fn new(i: &SagaInstance, owner: Arc<str>) -> Self {
        Self {
            saga_id: i.saga_id.as_str().into(),
            saga_version: i.saga_version,
            status: i.status,
            input: Json::new(i.input.clone()),
            idempotency_key: i.idempotency_key.as_deref().map(Into::into),
            started_at: i.started_at,
            completed_at: i.completed_at,
            error: i.error.as_deref().map(Into::into),
            steps: i.steps.iter().map(|s| Step::new(i.id, s.clone())).collect(),
            owner: Some(owner),
            lease_until: None,
            fencing: 1,
            compensation_requested: None,
        }
    }

    fn instance(&self, id: Uuid) -> SagaInstance {
        let mut i = SagaInstance::new(
            id,
            &*self.saga_id,
            self.saga_version,
            self.input.value(),
            self.idempotency_key.as_deref().map(str::to_owned),
            self.started_at,
            self.steps.iter().map(|s| s.execution(id)).collect(),
        );
        i.status = self.status;
        i.completed_at = self.completed_at;
        i.error = self.error.as_deref().map(str::to_owned);
        i.rebuild_context();
        i
    }

    fn stored(&self, id: Uuid) -> StoredSaga {
        let mut s = StoredSaga::new(self.instance(id), self.owner.as_deref().map(str::to_owned));
        s.lease_until = self.lease_until;
        s.fencing = self.fencing;
        s.compensation_requested = self.compensation_requested.as_deref().map(str::to_owned);
        s
    }

    /// Whether the record passes `filter` (the rule of `super::matches`).
    fn matches(&self, filter: &SagaFilter) -> bool {
        filter
            .saga_id
            .as_deref()
            .is_none_or(|s| *s == *self.saga_id)
            && (filter.status.is_empty() || filter.status.contains(&self.status))
            && filter.started_after.is_none_or(|t| self.started_at >= t)
            && filter.started_before.is_none_or(|t| self.started_at <= t)
    }

    fn claim(&mut self, owner: Arc<str>, lease_until: Option<DateTime<Utc>>) {
        self.owner = Some(owner);
        self.lease_until = lease_until;
        self.fencing += 1;
    }
}

#[async_trait]
impl SagaStore for InMemorySagaStore {
    async fn create(&self, instance: &SagaInstance, owner: &str) -> Result<CreateOutcome> {
        let mut st = self.state.lock();
        if let Some(key) = &instance.idempotency_key {
            let k = (instance.saga_id.clone(), key.clone());
            if let Some((id, existing)) = st
                .keys
                .get(&k)
                .and_then(|id| st.sagas.get(id).map(|r| (*id, r)))
            {
                return Ok(CreateOutcome::Existing(existing.stored(id)));
            }
            st.keys.insert(k, instance.id);
        }
        if st.sagas.contains_key(&instance.id) {
            return Err(Error::InvalidInput(format!(
                "saga instance {} already exists",
                instance.id
            )));
        }
        let owner = st.owner(owner);
        let stored = StoredSaga::new(instance.clone(), Some(owner.to_string()));
        st.sagas
            .insert(instance.id, Box::new(Record::new(instance, owner)));
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
        rec.status = update.status;
        rec.error = update.error.map(String::into_boxed_str);
        rec.completed_at = update.completed_at;
        for (idx, step) in update.steps {
            if let Some(slot) = rec.steps.get_mut(idx as usize) {
                *slot = Step::new(update.instance_id, step);
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
        if matches!(rec.status, SagaStatus::Created | SagaStatus::Running)
            && rec.compensation_requested.is_none()
        {
            rec.compensation_requested = Some(reason.into());
        }
        Ok(Some(rec.stored(instance_id)))
    }

    async fn claim(
        &self,
        instance_id: Uuid,
        owner: &str,
        lease_until: Option<DateTime<Utc>>,
    ) -> Result<Option<StoredSaga>> {
        let mut st = self.state.lock();
        let owner = st.owner(owner);
        let Some(rec) = st.sagas.get_mut(&instance_id) else {
            return Ok(None);
        };
        rec.claim(owner, lease_until);
        Ok(Some(rec.stored(instance_id)))
    }

    async fn claim_unfinished(
        &self,
        owner: &str,
        lease_until: Option<DateTime<Utc>>,
    ) -> Result<Vec<StoredSaga>> {
        let mut st = self.state.lock();
        let owner = st.owner(owner);
        let mut out = Vec::new();
        for (id, rec) in &mut st.sagas {
            if UNFINISHED.contains(&rec.status) {
                rec.claim(owner.clone(), lease_until);
                out.push(rec.stored(*id));
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
            .map(|r| r.stored(instance_id)))
    }

    async fn list(&self, filter: &SagaFilter) -> Result<Page<SagaInstance>> {
        let st = self.state.lock();
        let mut hits: Vec<(Uuid, &Record)> = st
            .sagas
            .iter()
            .map(|(id, r)| (*id, &**r))
            .filter(|(_, r)| r.matches(filter))
            .collect();
        hits.sort_by_key(|(id, r)| (r.started_at, *id));
        let total = hits.len() as u64;
        let offset = filter.page.offset.min(total) as usize;
        let limit = filter.page.limit as usize;
        let items: Vec<SagaInstance> = hits
            .into_iter()
            .skip(offset)
            .take(limit)
            .map(|(id, r)| {
                let i = r.instance(id);
                // The record's filter is the shared rule applied without building instances.
                debug_assert!(super::matches(filter, &i));
                i
            })
            .collect();
        let end = offset as u64 + items.len() as u64;
        let next = (end < total).then_some(end);
        Ok(Page::new(items, total, next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn records_come_back_as_they_went_in() {
        let store = InMemorySagaStore::new();
        let id = Uuid::now_v7();
        let mut a = SagaStepExecution::new(Uuid::new_v4(), "a", format!("{id}:a"));
        a.status = SagaStepStatus::Completed;
        a.result = Some(json!({"ok": [1, 2.5, "x"]}));
        a.attempts = 2;
        a.started_at = Some(Utc::now());
        let mut b = SagaStepExecution::new(Uuid::new_v4(), "b", "custom-key");
        b.error = Some("boom".into());
        let c = SagaStepExecution::new(Uuid::new_v4(), "c", format!("{id}:c"));
        let mut inst = SagaInstance::new(
            id,
            "s",
            3,
            json!({"order": 1, "lines": [{"sku": "x"}]}),
            Some("k".into()),
            Utc::now(),
            vec![a, b, c],
        );
        inst.error = Some("why".into());
        let CreateOutcome::Created(created) = store.create(&inst, "node").await.unwrap() else {
            panic!("not created");
        };
        assert_eq!(created.instance, inst);
        let got = store.get(id).await.unwrap().unwrap();
        assert_eq!((got.fencing, &got.owner), (created.fencing, &created.owner));
        let mut want = inst.clone();
        want.rebuild_context();
        assert_eq!(got.instance, want);
        assert_eq!(got.instance.context, json!({"a": {"ok": [1, 2.5, "x"]}}));
        assert_eq!(got.owner.as_deref(), Some("node"));

        let mut up = SagaUpdate::new(id, got.fencing, SagaStatus::Running);
        let mut c2 = got.instance.steps[2].clone();
        c2.status = SagaStepStatus::Completed;
        c2.result = Some(json!(7));
        up.steps.push((2, c2));
        store.apply(up.clone()).await.unwrap();
        let mut want = got.instance.clone();
        up.apply_to(&mut want);
        want.rebuild_context();
        assert_eq!(store.get(id).await.unwrap().unwrap().instance, want);
    }

    #[tokio::test]
    async fn deep_values_are_kept_as_they_are() {
        let mut deep = json!(1);
        for _ in 0..200 {
            deep = json!([deep]);
        }
        let store = InMemorySagaStore::new();
        let id = Uuid::now_v7();
        let inst = SagaInstance::new(id, "s", 1, deep.clone(), None, Utc::now(), Vec::new());
        store.create(&inst, "node").await.unwrap();
        assert_eq!(store.get(id).await.unwrap().unwrap().instance.input, deep);
    }
}
