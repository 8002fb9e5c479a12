//! Process definitions (state machines), their validation, guards, and process instances.
//!
//! A process has states (normal, initial or final). Transitions are declared either on a state
//! (`on` event → `target`, with an optional action and guard) or at the top level (`from` one
//! state, a list, or `*`; `to`; `on`; optional guard and action). For an event, the runtime
//! considers the state's own transitions first, then the top-level ones, in declaration order,
//! and takes the first whose guard passes. `*` matches every state except final ones.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::{Error, Result};

/// The kind of a state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum StateType {
    /// An ordinary state.
    #[default]
    Normal,
    /// The state new instances start in (at most one).
    Initial,
    /// A state the instance never leaves.
    Final,
}

/// What a guard sees: the instance and the event being applied.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GuardInput {
    /// The instance.
    pub instance_id: Uuid,
    /// Its current state.
    pub state: Arc<str>,
    /// The event.
    pub event: String,
    /// The instance context, with the event's data already merged in.
    pub context: Value,
    /// The data sent with the event.
    pub data: Value,
}

type GuardFn = dyn Fn(Arc<GuardInput>) -> BoxFuture<'static, bool> + Send + Sync;

/// An async predicate that decides whether a transition may be taken.
///
/// A guard sees the instance's context with the event's data merged in. A guard that panics
/// rejects its transition (and a `SYSTEM_ERROR` event says so).
///
/// ```
/// use architectlm_core::{Guard, ProcessDefinition, TransitionDefinition};
///
/// let big_order = Guard::new(|g| async move { g.context["total"].as_u64().unwrap_or(0) > 1000 });
/// let order = ProcessDefinition::builder("order")
///     .state("created")
///     .state("review")
///     .state("approved")
///     .transition(TransitionDefinition::new("created", "review", "submit").guard(big_order))
///     .transition(TransitionDefinition::new("created", "approved", "submit"))
///     .build()
///     .unwrap();
/// # let _ = order;
/// ```
#[derive(Clone)]
pub struct Guard(Arc<GuardFn>);

impl fmt::Debug for Guard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Guard")
    }
}

impl Guard {
    /// A guard from an async closure.
    pub fn new<F, Fut>(f: F) -> Self
    where
        F: Fn(Arc<GuardInput>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = bool> + Send + 'static,
    {
        Self(Arc::new(move |input| Box::pin(f(input))))
    }

    /// A guard from a plain predicate.
    pub fn sync(f: impl Fn(&GuardInput) -> bool + Send + Sync + 'static) -> Self {
        Self(Arc::new(move |input| {
            let ok = f(&input);
            Box::pin(async move { ok })
        }))
    }

    /// Evaluates the guard.
    pub async fn check(&self, input: Arc<GuardInput>) -> bool {
        (self.0)(input).await
    }
}

/// A transition declared on a state.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StateTransition {
    /// The event that triggers it.
    pub on: String,
    /// The state it leads to.
    pub target: String,
    /// A task to run once the state has changed.
    pub action: Option<String>,
    /// A guard that must pass.
    pub guard: Option<Guard>,
}

/// A state.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StateDefinition {
    /// Its name, unique in the process.
    pub name: String,
    /// Normal, initial or final.
    pub state_type: StateType,
    /// What it means.
    pub description: Option<String>,
    /// Its own transitions.
    pub transitions: Vec<StateTransition>,
}

/// Where a top-level transition may start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromStates {
    /// Any non-final state (`*`).
    Any,
    /// These states.
    States(Vec<String>),
}

/// A top-level transition.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TransitionDefinition {
    /// Where it may start.
    pub from: FromStates,
    /// Where it leads.
    pub to: String,
    /// The event that triggers it.
    pub on: String,
    /// A guard that must pass.
    pub guard: Option<Guard>,
    /// A task to run once the state has changed.
    pub action: Option<String>,
    /// What it means.
    pub description: Option<String>,
}

impl TransitionDefinition {
    /// A transition `from` → `to` on event `on`. `from` may be `"*"`.
    pub fn new(from: impl Into<String>, to: impl Into<String>, on: impl Into<String>) -> Self {
        let from = from.into();
        Self {
            from: if from == "*" {
                FromStates::Any
            } else {
                FromStates::States(vec![from])
            },
            to: to.into(),
            on: on.into(),
            guard: None,
            action: None,
            description: None,
        }
    }

    /// A transition from any of several states. A `"*"` among them is a definition error.
    pub fn from_many<S: Into<String>>(
        from: impl IntoIterator<Item = S>,
        to: impl Into<String>,
        on: impl Into<String>,
    ) -> Self {
        Self {
            from: FromStates::States(from.into_iter().map(Into::into).collect()),
            to: to.into(),
            on: on.into(),
            guard: None,
            action: None,
            description: None,
        }
    }

    /// Adds a guard.
    pub fn guard(mut self, guard: Guard) -> Self {
        self.guard = Some(guard);
        self
    }

    /// Adds an action (a task id).
    pub fn action(mut self, task_id: impl Into<String>) -> Self {
        self.action = Some(task_id.into());
        self
    }
}

/// A compiled transition, ready for lookup.
#[derive(Debug, Clone)]
pub(crate) struct Compiled {
    pub(crate) target: Arc<str>,
    pub(crate) action: Option<Arc<str>>,
    pub(crate) guard: Option<Guard>,
}

/// A validated process definition.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ProcessDefinition {
    /// Unique id within the system.
    pub id: Arc<str>,
    /// Human name.
    pub name: String,
    /// What it models.
    pub description: Option<String>,
    /// Its states.
    pub states: Vec<StateDefinition>,
    /// The state new instances start in.
    pub initial_state: Arc<str>,
    /// Top-level transitions.
    pub transitions: Vec<TransitionDefinition>,
    /// Free-form metadata.
    pub metadata: serde_json::Map<String, Value>,
    state_names: HashMap<String, (Arc<str>, StateType)>,
    table: HashMap<Arc<str>, HashMap<String, Vec<Compiled>>>,
}

impl ProcessDefinition {
    /// Starts a builder.
    ///
    /// ```
    /// use architectlm_core::{ProcessDefinition, TransitionDefinition};
    ///
    /// let order = ProcessDefinition::builder("order")
    ///     .initial_state("created")
    ///     .state("paid")
    ///     .final_state("shipped")
    ///     .transition(TransitionDefinition::new("created", "paid", "pay").action("charge"))
    ///     .transition(TransitionDefinition::new("paid", "shipped", "ship"))
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(&*order.initial_state, "created");
    /// assert!(order.is_final("shipped"));
    /// ```
    pub fn builder(id: impl Into<String>) -> ProcessBuilder {
        ProcessBuilder {
            id: id.into(),
            name: None,
            description: None,
            states: Vec::new(),
            initial_state: None,
            transitions: Vec::new(),
            metadata: serde_json::Map::new(),
        }
    }

    /// The interned name of a state, if the process has it.
    pub fn state(&self, name: &str) -> Option<(&Arc<str>, StateType)> {
        self.state_names.get(name).map(|(n, t)| (n, *t))
    }

    /// Whether `name` is a final state.
    pub fn is_final(&self, name: &str) -> bool {
        matches!(self.state(name), Some((_, StateType::Final)))
    }

    /// The events the given state accepts.
    pub fn events_from(&self, state: &str) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .table
            .get(state)
            .map(|m| m.keys().map(String::as_str).collect())
            .unwrap_or_default();
        v.sort_unstable();
        v
    }

    pub(crate) fn candidates(&self, state: &str, event: &str) -> Option<&[Compiled]> {
        self.table.get(state)?.get(event).map(Vec::as_slice)
    }

    /// Every task id named as an action.
    pub fn action_task_ids(&self) -> impl Iterator<Item = &str> {
        self.table
            .values()
            .flat_map(HashMap::values)
            .flatten()
            .filter_map(|c| c.action.as_deref())
    }
}

/// Builder of [`ProcessDefinition`]; `build()` validates.
#[derive(Debug)]
#[must_use]
pub struct ProcessBuilder {
    id: String,
    name: Option<String>,
    description: Option<String>,
    states: Vec<StateDefinition>,
    initial_state: Option<String>,
    transitions: Vec<TransitionDefinition>,
    metadata: serde_json::Map<String, Value>,
}

impl ProcessBuilder {
    /// Sets the human name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Sets the description.
    pub fn description(mut self, d: impl Into<String>) -> Self {
        self.description = Some(d.into());
        self
    }

    /// Adds a normal state.
    pub fn state(self, name: impl Into<String>) -> Self {
        self.state_of(name, StateType::Normal)
    }

    /// Adds the initial state.
    pub fn initial_state(self, name: impl Into<String>) -> Self {
        self.state_of(name, StateType::Initial)
    }

    /// Adds a final state.
    pub fn final_state(self, name: impl Into<String>) -> Self {
        self.state_of(name, StateType::Final)
    }

    /// Adds a state of the given type.
    pub fn state_of(mut self, name: impl Into<String>, state_type: StateType) -> Self {
        self.states.push(StateDefinition {
            name: name.into(),
            state_type,
            description: None,
            transitions: Vec::new(),
        });
        self
    }

    /// Adds a fully specified state (with its own transitions).
    pub fn state_definition(mut self, state: StateDefinition) -> Self {
        self.states.push(state);
        self
    }

    /// Adds a transition on the most recently added state: on `event`, go to `target`, then run
    /// `action` if given.
    pub fn on(
        mut self,
        event: impl Into<String>,
        target: impl Into<String>,
        action: Option<&str>,
        guard: Option<Guard>,
    ) -> Self {
        let t = StateTransition {
            on: event.into(),
            target: target.into(),
            action: action.map(str::to_owned),
            guard,
        };
        match self.states.last_mut() {
            Some(s) => s.transitions.push(t),
            // Recorded against an empty state name so that `build()` reports it clearly.
            None => self.states.push(StateDefinition {
                name: String::new(),
                state_type: StateType::Normal,
                description: None,
                transitions: vec![t],
            }),
        }
        self
    }

    /// Names the initial state explicitly (instead of marking one `Initial` or taking the
    /// first).
    pub fn start_in(mut self, name: impl Into<String>) -> Self {
        self.initial_state = Some(name.into());
        self
    }

    /// Adds a top-level transition.
    pub fn transition(mut self, t: TransitionDefinition) -> Self {
        self.transitions.push(t);
        self
    }

    /// Adds a metadata entry.
    pub fn metadata(mut self, key: impl Into<String>, value: Value) -> Self {
        self.metadata.insert(key.into(), value);
        self
    }

    /// Validates the definition. Errors name the process and the offending state or event:
    /// missing id, no states, no transitions, an empty or duplicate state name, more than one
    /// initial state, an unknown initial state, an unknown from/target state, a wildcard mixed
    /// with named states, and a duplicate (state, event) pair whose first transition has no guard
    /// (the second could never be taken).
    pub fn build(self) -> Result<ProcessDefinition> {
        let pid = self.id.trim().to_owned();
        if pid.is_empty() {
            return Err(Error::definition(format!(
                "process id {:?} is missing (empty or only whitespace)",
                self.id
            )));
        }
        if self.states.is_empty() {
            return Err(Error::definition(format!(
                "process \"{pid}\" has no states"
            )));
        }
        let mut state_names: HashMap<String, (Arc<str>, StateType)> = HashMap::new();
        for s in &self.states {
            if s.name.trim().is_empty() {
                return Err(Error::definition(format!(
                    "process \"{pid}\" has a state without a name"
                )));
            }
            if state_names
                .insert(s.name.clone(), (Arc::from(s.name.as_str()), s.state_type))
                .is_some()
            {
                return Err(Error::definition(format!(
                    "process \"{pid}\" has duplicate state \"{}\"",
                    s.name
                )));
            }
        }
        let marked: Vec<&str> = self
            .states
            .iter()
            .filter(|s| s.state_type == StateType::Initial)
            .map(|s| s.name.as_str())
            .collect();
        if marked.len() > 1 {
            return Err(Error::definition(format!(
                "process \"{pid}\" has more than one initial state: {}",
                marked.join(", ")
            )));
        }
        let initial_name = match (&self.initial_state, marked.first()) {
            (Some(explicit), _) => explicit.clone(),
            (None, Some(m)) => (*m).to_owned(),
            (None, None) => self.states[0].name.clone(),
        };
        let Some((initial, _)) = state_names.get(&initial_name).cloned() else {
            return Err(Error::definition(format!(
                "process \"{pid}\" has unknown initial state \"{initial_name}\""
            )));
        };
        let lookup = |name: &str, role: &str| -> Result<(Arc<str>, StateType)> {
            state_names.get(name).cloned().ok_or_else(|| {
                Error::definition(format!(
                    "process \"{pid}\": transition {role} unknown state \"{name}\""
                ))
            })
        };

        let mut table: HashMap<Arc<str>, HashMap<String, Vec<Compiled>>> = HashMap::new();
        let mut push = |from: &Arc<str>, on: &str, c: Compiled| -> Result<()> {
            let entry = table
                .entry(from.clone())
                .or_default()
                .entry(on.to_owned())
                .or_default();
            if entry.last().is_some_and(|prev| prev.guard.is_none()) {
                return Err(Error::definition(format!(
                    "process \"{pid}\" has duplicate transition from \"{from}\" on \"{on}\""
                )));
            }
            entry.push(c);
            Ok(())
        };
        let mut count = 0usize;
        for s in &self.states {
            let (from, _) = lookup(&s.name, "from")?;
            for t in &s.transitions {
                if t.on.trim().is_empty() {
                    return Err(Error::definition(format!(
                        "process \"{pid}\": a transition of state \"{}\" has no event",
                        s.name
                    )));
                }
                let (target, _) = lookup(&t.target, "to")?;
                push(
                    &from,
                    &t.on,
                    Compiled {
                        target,
                        action: t.action.as_deref().map(Arc::from),
                        guard: t.guard.clone(),
                    },
                )?;
                count += 1;
            }
        }
        for t in &self.transitions {
            if t.on.trim().is_empty() {
                return Err(Error::definition(format!(
                    "process \"{pid}\": a transition to \"{}\" has no event",
                    t.to
                )));
            }
            let (target, _) = lookup(&t.to, "to")?;
            let froms: Vec<Arc<str>> = match &t.from {
                FromStates::Any => self
                    .states
                    .iter()
                    .filter(|s| s.state_type != StateType::Final)
                    .map(|s| state_names[&s.name].0.clone())
                    .collect(),
                FromStates::States(list) => {
                    if list.is_empty() {
                        return Err(Error::definition(format!(
                            "process \"{pid}\": transition on \"{}\" has no from state",
                            t.on
                        )));
                    }
                    if list.len() > 1 && list.iter().any(|s| s == "*") {
                        return Err(Error::definition(format!(
                            "process \"{pid}\": transition on \"{}\" mixes the wildcard \"*\" with named states",
                            t.on
                        )));
                    }
                    if list[0] == "*" {
                        return Err(Error::definition(format!(
                            "process \"{pid}\": transition on \"{}\": use FromStates::Any for \"*\"",
                            t.on
                        )));
                    }
                    let mut seen = HashSet::new();
                    let mut v = Vec::with_capacity(list.len());
                    for name in list {
                        if seen.insert(name.as_str()) {
                            v.push(lookup(name, "from")?.0);
                        }
                    }
                    v
                }
            };
            for from in &froms {
                push(
                    from,
                    &t.on,
                    Compiled {
                        target: target.clone(),
                        action: t.action.as_deref().map(Arc::from),
                        guard: t.guard.clone(),
                    },
                )?;
                count += 1;
            }
        }
        if count == 0 {
            return Err(Error::definition(format!(
                "process \"{pid}\" has no transitions"
            )));
        }
        Ok(ProcessDefinition {
            name: self.name.unwrap_or_else(|| pid.clone()),
            id: Arc::from(pid),
            description: self.description,
            states: self.states,
            initial_state: initial,
            transitions: self.transitions,
            metadata: self.metadata,
            state_names,
            table,
        })
    }
}

/// The outcome of the action of the last transition, kept on the instance so that a supervisor
/// can see a failure and run the action again with the same input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ActionRecord {
    /// The task that ran.
    pub task_id: String,
    /// The event whose transition ran it.
    pub event: String,
    /// The input it was given.
    pub input: Value,
    /// Whether it is running, completed or failed.
    pub status: ActionStatus,
    /// Its output, when it completed.
    pub output: Option<Value>,
    /// Its error, when it failed.
    pub error: Option<String>,
    /// When it finished (or started, while running).
    pub at: DateTime<Utc>,
}

/// Status of an [`ActionRecord`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActionStatus {
    /// The action is running.
    Running,
    /// The action completed.
    Completed,
    /// The action failed after its retries.
    Failed,
}

/// A running (or finished) instance of a process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ProcessInstance {
    /// Unique id.
    pub id: Uuid,
    /// The process it instantiates.
    pub process_id: Arc<str>,
    /// Its current state.
    pub state: Arc<str>,
    /// Its data; each transition merges the event's data into it.
    pub context: Value,
    /// Incremented by every write; used for optimistic concurrency.
    pub version: u64,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it last changed state (the time it entered `state`).
    pub updated_at: DateTime<Utc>,
    /// The outcome of the last transition's action, if it had one.
    pub last_action: Option<Box<ActionRecord>>,
}

/// Merges `data` into `context`: objects merge key by key (shallowly), anything else replaces.
pub fn merge_context(context: &mut Value, data: Value) {
    match (context, data) {
        (_, Value::Null) => {}
        (Value::Object(ctx), Value::Object(data)) => {
            for (k, v) in data {
                ctx.insert(k, v);
            }
        }
        (ctx, data) => *ctx = data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(b: ProcessBuilder) -> String {
        b.build().unwrap_err().to_string()
    }

    #[test]
    fn each_definition_error_names_the_culprit() {
        assert!(err(ProcessDefinition::builder("")).contains("process id \"\" is missing"));
        assert!(err(ProcessDefinition::builder("p")).contains("\"p\" has no states"));
        assert!(err(ProcessDefinition::builder("p").state("a")).contains("has no transitions"));
        assert!(
            err(ProcessDefinition::builder("p")
                .state("a")
                .state("a")
                .transition(TransitionDefinition::new("a", "a", "x")))
            .contains("duplicate state \"a\"")
        );
        assert!(
            err(ProcessDefinition::builder("p")
                .state("a")
                .start_in("zz")
                .transition(TransitionDefinition::new("a", "a", "x")))
            .contains("unknown initial state \"zz\"")
        );
        assert!(
            err(ProcessDefinition::builder("p")
                .state("a")
                .transition(TransitionDefinition::new("nope", "a", "x")))
            .contains("transition from unknown state \"nope\"")
        );
        assert!(
            err(ProcessDefinition::builder("p")
                .state("a")
                .transition(TransitionDefinition::new("a", "nope", "x")))
            .contains("transition to unknown state \"nope\"")
        );
        assert!(
            err(ProcessDefinition::builder("p")
                .state("a")
                .state("b")
                .transition(TransitionDefinition::new("a", "b", "x"))
                .transition(TransitionDefinition::new("a", "a", "x")))
            .contains("duplicate transition from \"a\" on \"x\"")
        );
        assert!(
            err(ProcessDefinition::builder("p")
                .state("a")
                .transition(TransitionDefinition::from_many(["*", "a"], "a", "x")))
            .contains("mixes the wildcard")
        );
        assert!(
            err(ProcessDefinition::builder("p")
                .initial_state("a")
                .initial_state("b")
                .transition(TransitionDefinition::new("a", "b", "x")))
            .contains("more than one initial state")
        );
    }

    #[test]
    fn initial_state_defaults_to_the_first_and_wildcard_skips_final_states() {
        let p = ProcessDefinition::builder("p")
            .state("a")
            .state("b")
            .final_state("done")
            .transition(TransitionDefinition::new("*", "done", "finish"))
            .build()
            .unwrap();
        assert_eq!(&*p.initial_state, "a");
        assert_eq!(p.events_from("a"), vec!["finish"]);
        assert!(p.events_from("done").is_empty());
    }

    #[test]
    fn guarded_alternatives_are_allowed() {
        let p = ProcessDefinition::builder("p")
            .state("a")
            .state("b")
            .state("c")
            .transition(TransitionDefinition::new("a", "b", "go").guard(Guard::sync(|_| false)))
            .transition(TransitionDefinition::new("a", "c", "go"))
            .build()
            .unwrap();
        assert_eq!(p.candidates("a", "go").unwrap().len(), 2);
    }

    #[test]
    fn merge_is_shallow_and_null_is_a_no_op() {
        let mut c = serde_json::json!({"a": 1, "b": {"x": 1}});
        merge_context(&mut c, serde_json::json!({"b": {"y": 2}, "c": 3}));
        assert_eq!(c, serde_json::json!({"a": 1, "b": {"y": 2}, "c": 3}));
        merge_context(&mut c, Value::Null);
        assert_eq!(c["c"], 3);
    }
}
