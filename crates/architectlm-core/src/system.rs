//! System definitions: the processes and tasks of an application and the extensions it uses.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::process::ProcessDefinition;
use crate::task::TaskDefinition;
use crate::{Error, Result};

/// One switch per extension; an enabled extension must get a service when the runtime starts.
///
/// Built with [`none`](Self::none) (or `default()`), [`all`](Self::all) and one setter per
/// switch; its JSON form is partial — a missing key is `false` — and an unknown key is
/// refused by name. Keys are kebab-case (`saga-coordinator`), snake_case is accepted too.
///
/// ```
/// use architectlm_core::ExtensionsConfig;
///
/// let c = ExtensionsConfig::none().scheduler(true);
/// assert!(c.scheduler && !c.saga_coordinator);
/// let from_json: ExtensionsConfig = serde_json::from_str(r#"{"scheduler": true}"#).unwrap();
/// assert_eq!(from_json, c);
/// let typo = serde_json::from_str::<ExtensionsConfig>(r#"{"schedular": true}"#).unwrap_err();
/// assert!(typo.to_string().contains("schedular"));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ExtensionsConfig {
    /// The saga coordinator.
    #[serde(alias = "saga_coordinator")]
    pub saga_coordinator: bool,
    /// The scheduler.
    pub scheduler: bool,
    /// The supervisor.
    pub supervisor: bool,
    /// The load manager.
    #[serde(alias = "load_manager")]
    pub load_manager: bool,
}

impl ExtensionsConfig {
    /// No extension enabled (the default).
    pub fn none() -> Self {
        Self::default()
    }

    /// Enables or disables the saga coordinator.
    pub fn saga_coordinator(mut self, on: bool) -> Self {
        self.saga_coordinator = on;
        self
    }

    /// Enables or disables the scheduler.
    pub fn scheduler(mut self, on: bool) -> Self {
        self.scheduler = on;
        self
    }

    /// Enables or disables the supervisor.
    pub fn supervisor(mut self, on: bool) -> Self {
        self.supervisor = on;
        self
    }

    /// Enables or disables the load manager.
    pub fn load_manager(mut self, on: bool) -> Self {
        self.load_manager = on;
        self
    }

    /// Every extension enabled.
    pub fn all() -> Self {
        Self {
            saga_coordinator: true,
            scheduler: true,
            supervisor: true,
            load_manager: true,
        }
    }
}

/// A validated system: id, name, description, processes, tasks, extensions and metadata.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct System {
    /// Unique id.
    pub id: String,
    /// Human name.
    pub name: String,
    /// What it does.
    pub description: Option<String>,
    /// Processes by id.
    pub processes: HashMap<String, Arc<ProcessDefinition>>,
    /// Tasks by id.
    pub tasks: HashMap<String, Arc<TaskDefinition>>,
    /// Which extensions it uses.
    pub extensions: ExtensionsConfig,
    /// Free-form metadata.
    pub metadata: serde_json::Map<String, Value>,
}

impl System {
    /// Starts a builder.
    ///
    /// ```
    /// use architectlm_core::{System, TaskDefinition};
    ///
    /// let system = System::builder("shop")
    ///     .name("Shop")
    ///     .task(TaskDefinition::new("noop", |input, _ctx| async move { Ok(input) }).unwrap())
    ///     .build()
    ///     .unwrap();
    /// assert!(system.tasks.contains_key("noop"));
    /// ```
    pub fn builder(id: impl Into<String>) -> SystemBuilder {
        SystemBuilder {
            id: id.into(),
            name: None,
            description: None,
            processes: Vec::new(),
            tasks: Vec::new(),
            extensions: ExtensionsConfig::default(),
            metadata: serde_json::Map::new(),
        }
    }
}

/// Builder of [`System`]; `build()` validates.
#[derive(Debug)]
#[must_use]
pub struct SystemBuilder {
    id: String,
    name: Option<String>,
    description: Option<String>,
    processes: Vec<ProcessDefinition>,
    tasks: Vec<TaskDefinition>,
    extensions: ExtensionsConfig,
    metadata: serde_json::Map<String, Value>,
}

impl SystemBuilder {
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

    /// Adds a process.
    pub fn process(mut self, p: ProcessDefinition) -> Self {
        self.processes.push(p);
        self
    }

    /// Adds a task.
    pub fn task(mut self, t: TaskDefinition) -> Self {
        self.tasks.push(t);
        self
    }

    /// Adds several tasks.
    pub fn tasks(mut self, ts: impl IntoIterator<Item = TaskDefinition>) -> Self {
        self.tasks.extend(ts);
        self
    }

    /// Sets which extensions are enabled.
    pub fn extensions(mut self, e: ExtensionsConfig) -> Self {
        self.extensions = e;
        self
    }

    /// Adds a metadata entry.
    pub fn metadata(mut self, key: impl Into<String>, value: Value) -> Self {
        self.metadata.insert(key.into(), value);
        self
    }

    /// Validates and builds: the id must be present, task and process ids unique, and every
    /// process action must name a task of the system.
    pub fn build(self) -> Result<System> {
        let id = self.id.trim().to_owned();
        if id.is_empty() {
            return Err(Error::definition(format!(
                "system id {:?} is missing (empty or only whitespace)",
                self.id
            )));
        }
        let mut tasks = HashMap::with_capacity(self.tasks.len());
        for t in self.tasks {
            let tid = t.id.clone();
            if tasks.insert(tid.clone(), Arc::new(t)).is_some() {
                return Err(Error::definition(format!(
                    "system \"{id}\" has duplicate task \"{tid}\""
                )));
            }
        }
        let mut processes = HashMap::with_capacity(self.processes.len());
        for p in self.processes {
            if let Some(action) = p.action_task_ids().find(|a| !tasks.contains_key(*a)) {
                return Err(Error::definition(format!(
                    "process \"{}\" names unknown task \"{action}\" as an action",
                    p.id
                )));
            }
            let pid = p.id.to_string();
            if processes.insert(pid.clone(), Arc::new(p)).is_some() {
                return Err(Error::definition(format!(
                    "system \"{id}\" has duplicate process \"{pid}\""
                )));
            }
        }
        Ok(System {
            name: self.name.unwrap_or_else(|| id.clone()),
            id,
            description: self.description,
            processes,
            tasks,
            extensions: self.extensions,
            metadata: self.metadata,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::TransitionDefinition;

    fn noop(id: &str) -> TaskDefinition {
        TaskDefinition::new(id, |i, _c| async move { Ok(i) }).unwrap()
    }

    #[test]
    fn system_errors_name_the_culprit() {
        let e = System::builder(" ").build().unwrap_err().to_string();
        assert!(e.contains("system id \" \" is missing"), "{e}");
        let e = System::builder("s")
            .task(noop("a"))
            .task(noop("a"))
            .build()
            .unwrap_err()
            .to_string();
        assert!(e.contains("duplicate task \"a\""), "{e}");
        let p = || {
            ProcessDefinition::builder("p")
                .state("x")
                .transition(TransitionDefinition::new("x", "x", "go"))
                .build()
                .unwrap()
        };
        let e = System::builder("s")
            .process(p())
            .process(p())
            .build()
            .unwrap_err()
            .to_string();
        assert!(e.contains("duplicate process \"p\""), "{e}");
        let q = ProcessDefinition::builder("q")
            .state("x")
            .transition(TransitionDefinition::new("x", "x", "go").action("missing"))
            .build()
            .unwrap();
        let e = System::builder("s")
            .process(q)
            .build()
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown task \"missing\""), "{e}");
    }
}
