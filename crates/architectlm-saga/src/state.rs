//! The driver's copy of an instance: what it needs to decide and to write journal entries,
//! without the copies of names, keys and maps that the journal keeps anyway.
//!
//! A saga waiting inside a step holds this for as long as the step runs, so it is kept small:
//! step ids come from the definition, idempotency keys are derived from the instance id when
//! they have the usual form, and the saga input is kept as JSON text.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use architectlm_core::extensions::saga::{
    SagaInstance, SagaStatus, SagaStepExecution, SagaStepStatus,
};

use crate::definition::Prepared;

/// Nesting depth up to which an input is kept as text: deeper documents would not parse back
/// (the JSON parser stops at 128 levels).
const TEXT_DEPTH: usize = 100;

/// The saga input as the driver keeps it between steps: two words in place, and as JSON text
/// a few bytes where a tree of maps costs hundreds.
pub(crate) enum Input {
    Null,
    Text(Box<str>),
    /// Documents nested too deep to parse back.
    Deep(Box<Value>),
}

impl Input {
    fn new(v: Value) -> Self {
        match v {
            Value::Null => Self::Null,
            v if within_depth(&v, TEXT_DEPTH) => Self::Text(v.to_string().into_boxed_str()),
            v => Self::Deep(Box::new(v)),
        }
    }

    /// A copy of the input (each step receives its own).
    pub(crate) fn value(&self) -> Value {
        match self {
            Self::Null => Value::Null,
            // The text was written from a value of bounded depth, so it parses back.
            Self::Text(t) => serde_json::from_str(t).unwrap_or(Value::Null),
            Self::Deep(v) => (**v).clone(),
        }
    }
}

/// Whether `v` nests at most `limit` levels deep (stops looking past the limit).
fn within_depth(v: &Value, limit: usize) -> bool {
    match v {
        Value::Array(a) => limit > 0 && a.iter().all(|x| within_depth(x, limit - 1)),
        Value::Object(m) => limit > 0 && m.values().all(|x| within_depth(x, limit - 1)),
        _ => true,
    }
}

/// One step record without its step id (the definition has it) and, usually, its key.
///
/// A step that has not started is its id alone: it reads as [`PENDING`], and the first write
/// gives it a record of its own (`DerefMut`). A saga waiting in its first step thus holds one
/// full record, not one per step.
pub(crate) struct Step {
    pub(crate) id: Uuid,
    data: Option<Box<StepData>>,
}

/// What a step record holds besides its id.
#[derive(PartialEq)]
pub(crate) struct StepData {
    /// The step id and key when they differ from the definition's id and
    /// `<instance id>:<step id>` (an instance journaled by other means).
    names: Option<Box<(String, String)>>,
    pub(crate) status: SagaStepStatus,
    pub(crate) attempts: u32,
    pub(crate) compensation_attempts: u32,
    pub(crate) started_at: Option<DateTime<Utc>>,
    pub(crate) completed_at: Option<DateTime<Utc>>,
    /// Boxed, like `error`: most steps of a waiting saga have neither.
    pub(crate) result: Option<Box<Value>>,
    pub(crate) error: Option<Box<str>>,
    /// Changed since the last journal entry.
    pub(crate) dirty: bool,
}

/// The record of a step that has not started.
static PENDING: StepData = StepData {
    names: None,
    status: SagaStepStatus::Pending,
    attempts: 0,
    compensation_attempts: 0,
    started_at: None,
    completed_at: None,
    result: None,
    error: None,
    dirty: false,
};

impl std::ops::Deref for Step {
    type Target = StepData;

    fn deref(&self) -> &StepData {
        self.data.as_deref().unwrap_or(&PENDING)
    }
}

impl std::ops::DerefMut for Step {
    fn deref_mut(&mut self) -> &mut StepData {
        self.data.get_or_insert_with(|| {
            Box::new(StepData {
                names: None,
                status: SagaStepStatus::Pending,
                attempts: 0,
                compensation_attempts: 0,
                started_at: None,
                completed_at: None,
                result: None,
                error: None,
                dirty: false,
            })
        })
    }
}

impl StepData {
    /// The step's idempotency key.
    pub(crate) fn key(&self, instance: Uuid, step_id: &str) -> Cow<'_, str> {
        match &self.names {
            Some(n) => Cow::Borrowed(n.1.as_str()),
            None => Cow::Owned(format!("{instance}:{step_id}")),
        }
    }
}

/// The instance as its driver keeps it.
pub(crate) struct State {
    pub(crate) id: Uuid,
    pub(crate) status: SagaStatus,
    pub(crate) error: Option<Box<str>>,
    pub(crate) completed_at: Option<DateTime<Utc>>,
    pub(crate) input: Input,
    pub(crate) steps: Box<[Step]>,
}

impl State {
    /// Takes the instance apart; `prep` is the definition version it runs.
    pub(crate) fn new(inst: SagaInstance, prep: &Prepared) -> Self {
        let id = inst.id;
        let steps = inst
            .steps
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                let usual = prep.def.steps.get(i).is_some_and(|d| {
                    d.id == s.step_id && is_usual_key(&s.idempotency_key, id, &s.step_id)
                });
                let data = StepData {
                    names: (!usual).then(|| Box::new((s.step_id, s.idempotency_key))),
                    status: s.status,
                    attempts: s.attempts,
                    compensation_attempts: s.compensation_attempts,
                    started_at: s.started_at,
                    completed_at: s.completed_at,
                    result: s.result.map(Box::new),
                    error: s.error.map(String::into_boxed_str),
                    dirty: false,
                };
                Step {
                    id: s.id,
                    data: (data != PENDING).then(|| Box::new(data)),
                }
            })
            .collect();
        Self {
            id,
            status: inst.status,
            error: inst.error.map(String::into_boxed_str),
            completed_at: inst.completed_at,
            input: Input::new(inst.input),
            steps,
        }
    }

    /// The step's id.
    pub(crate) fn step_id<'a>(&'a self, i: usize, prep: &'a Prepared) -> &'a str {
        match &self.steps[i].data.as_deref().and_then(|d| d.names.as_ref()) {
            Some(n) => &n.0,
            None => &prep.def.steps[i].id,
        }
    }

    /// The full record of step `i`, as the journal takes it.
    pub(crate) fn record(&self, i: usize, prep: &Prepared) -> SagaStepExecution {
        let s = &self.steps[i];
        let step_id = self.step_id(i, prep);
        let mut r = SagaStepExecution::new(s.id, step_id, s.key(self.id, step_id));
        r.status = s.status;
        r.attempts = s.attempts;
        r.compensation_attempts = s.compensation_attempts;
        r.started_at = s.started_at;
        r.completed_at = s.completed_at;
        r.result = s.result.as_deref().cloned();
        r.error = s.error.as_deref().map(str::to_owned);
        r
    }

    /// Whether steps changed since the last journal entry.
    pub(crate) fn has_dirty(&self) -> bool {
        self.steps.iter().any(|s| s.dirty)
    }

    /// The records of the steps that changed since the last journal entry, by position; they
    /// count as journaled from now on.
    pub(crate) fn take_dirty(&mut self, prep: &Prepared) -> Vec<(u32, SagaStepExecution)> {
        let mut out = Vec::new();
        for i in 0..self.steps.len() {
            if self.steps[i].dirty {
                self.steps[i].dirty = false;
                out.push((i as u32, self.record(i, prep)));
            }
        }
        out
    }

    /// The results of the completed steps by step id.
    pub(crate) fn results(&self, prep: &Prepared) -> serde_json::Map<String, Value> {
        let mut out = serde_json::Map::new();
        for (i, s) in self.steps.iter().enumerate() {
            if s.status == SagaStepStatus::Completed
                && let Some(r) = &s.result
            {
                out.insert(self.step_id(i, prep).to_owned(), (**r).clone());
            }
        }
        out
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

#[cfg(test)]
mod tests {
    use super::*;
    use architectlm_core::extensions::saga::{SagaDefinition, SagaStep};
    use serde_json::json;

    fn prep() -> std::sync::Arc<Prepared> {
        crate::definition::check(
            SagaDefinition::new("s")
                .step(SagaStep::task("a", "t"))
                .step(SagaStep::task("b", "t")),
        )
        .unwrap()
    }

    fn instance(input: Value, key_b: Option<&str>) -> SagaInstance {
        let id = Uuid::now_v7();
        let steps = vec![
            SagaStepExecution::new(Uuid::new_v4(), "a", format!("{id}:a")),
            SagaStepExecution::new(
                Uuid::new_v4(),
                "b",
                key_b.map_or_else(|| format!("{id}:b"), str::to_owned),
            ),
        ];
        SagaInstance::new(id, "s", 1, input, None, Utc::now(), steps)
    }

    #[test]
    fn records_come_back_as_they_went_in() {
        let p = prep();
        let mut inst = instance(json!({"order": 1, "lines": [1, 2]}), Some("custom"));
        inst.steps[0].status = SagaStepStatus::Completed;
        inst.steps[0].result = Some(json!({"ok": true}));
        inst.steps[0].attempts = 2;
        inst.steps[1].error = Some("boom".into());
        let want = inst.clone();
        let st = State::new(inst, &p);
        assert!(matches!(st.input, Input::Text(_)));
        assert_eq!(st.input.value(), want.input);
        assert!(st.steps[0].names.is_none());
        assert!(st.steps[1].data.is_some(), "a custom key needs a record");
        assert_eq!(st.record(0, &p), want.steps[0]);
        assert_eq!(st.record(1, &p), want.steps[1]);
        assert_eq!(Value::Object(st.results(&p)), json!({"a": {"ok": true}}));
    }

    #[test]
    fn pending_steps_share_one_record_until_written() {
        let p = prep();
        let inst = instance(json!(null), None);
        let want = inst.steps[1].clone();
        let mut st = State::new(inst, &p);
        assert!(st.steps.iter().all(|s| s.data.is_none()));
        assert_eq!(st.record(1, &p), want);
        st.steps[1].status = SagaStepStatus::Running;
        assert!(st.steps[1].data.is_some() && st.steps[0].data.is_none());
        assert_eq!(PENDING.status, SagaStepStatus::Pending);
    }

    #[test]
    fn null_and_deep_inputs_are_not_text() {
        let p = prep();
        let st = State::new(instance(json!(null), None), &p);
        assert!(matches!(st.input, Input::Null));
        let st = State::new(instance(json!("x"), None), &p);
        assert_eq!(st.input.value(), json!("x"));
        let mut deep = json!(1);
        for _ in 0..200 {
            deep = json!([deep]);
        }
        let st = State::new(instance(deep.clone(), None), &p);
        assert!(matches!(st.input, Input::Deep(_)));
        assert_eq!(st.input.value(), deep);
    }

    #[test]
    fn only_the_usual_key_form_is_derived() {
        let id = Uuid::now_v7();
        assert!(is_usual_key(&format!("{id}:a"), id, "a"));
        assert!(!is_usual_key(&format!("{id}:ab"), id, "a"));
        assert!(!is_usual_key(&format!("{id}a"), id, "a"));
        assert!(!is_usual_key("a", id, "a"));
    }
}
