//! Checking definitions and preparing them for execution: step groups and task lookups.

use std::collections::HashSet;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use architectlm_core::extensions::saga::SagaDefinition;
use architectlm_core::{Error, Result, Runtime, TaskRef};

/// A checked definition with its steps cut into groups that run together.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub(crate) def: SagaDefinition,
    /// Consecutive ranges of step positions; a range of more than one step is a parallel group.
    pub(crate) groups: Vec<Range<usize>>,
    /// The saga's and each step's id, shared with the `TaskOrigin` of every execution (made
    /// once here, so that a running step allocates no copy of them).
    pub(crate) saga_id: Arc<str>,
    pub(crate) step_ids: Vec<Arc<str>>,
}

impl Prepared {
    pub(crate) fn timeout(&self) -> Option<Duration> {
        self.def.timeout
    }
}

/// Checks what can be checked without a runtime: ids, steps, timeouts, retry policies and
/// parallel groups.
pub(crate) fn check(def: SagaDefinition) -> Result<Arc<Prepared>> {
    let name = &def.id;
    if def.id.trim().is_empty() {
        return Err(Error::definition(format!(
            "saga id {:?} is missing (empty or only whitespace)",
            def.id
        )));
    }
    if def.steps.is_empty() {
        return Err(Error::definition(format!("saga \"{name}\" has no steps")));
    }
    if def.timeout == Some(Duration::ZERO) {
        return Err(Error::definition(format!(
            "saga \"{name}\" has a zero timeout"
        )));
    }
    let mut seen = HashSet::new();
    for step in &def.steps {
        if step.id.trim().is_empty() {
            return Err(Error::definition(format!(
                "saga \"{name}\" has a step whose id {:?} is empty or only whitespace",
                step.id
            )));
        }
        if !seen.insert(step.id.as_str()) {
            return Err(Error::definition(format!(
                "saga \"{name}\" has duplicate step id \"{}\"",
                step.id
            )));
        }
        if step.timeout == Some(Duration::ZERO) {
            return Err(Error::definition(format!(
                "step \"{}\" of saga \"{name}\" has a zero timeout",
                step.id
            )));
        }
        if step.compensate_on_failure && step.compensation.is_none() {
            return Err(Error::invalid_config(
                format!("steps[\"{}\"].compensate_on_failure", step.id),
                true,
                format!(
                    "step \"{}\" of saga \"{name}\" has no compensation to run when it fails \
                     (add one with compensate_with or compensate_closure)",
                    step.id
                ),
            ));
        }
        for (what, policy) in [
            ("retry", &step.retry),
            ("compensation retry", &step.compensation_retry),
        ] {
            if let Some(p) = policy {
                p.validate().map_err(|e| {
                    Error::definition(format!(
                        "step \"{}\" of saga \"{name}\" has an invalid {what} policy: {e}",
                        step.id
                    ))
                })?;
            }
        }
    }
    let mut groups: Vec<Range<usize>> = Vec::new();
    let mut closed: HashSet<&str> = HashSet::new();
    let mut i = 0;
    while i < def.steps.len() {
        let start = i;
        if let Some(g) = def.steps[i].parallel_group.as_deref() {
            if !closed.insert(g) {
                return Err(Error::definition(format!(
                    "parallel group \"{g}\" of saga \"{name}\" is not consecutive (step \"{}\")",
                    def.steps[i].id
                )));
            }
            while i < def.steps.len() && def.steps[i].parallel_group.as_deref() == Some(g) {
                i += 1;
            }
        } else {
            i += 1;
        }
        groups.push(start..i);
    }
    let saga_id = Arc::from(def.id.as_str());
    let step_ids = def.steps.iter().map(|s| Arc::from(s.id.as_str())).collect();
    Ok(Arc::new(Prepared {
        def,
        groups,
        saga_id,
        step_ids,
    }))
}

/// Checks that every task a definition names exists in the runtime's system.
pub(crate) fn check_tasks(p: &Prepared, runtime: &Runtime) -> Result<()> {
    let tasks = &runtime.system().tasks;
    for step in &p.def.steps {
        for (what, r) in [
            ("action", Some(&step.action)),
            ("compensation", step.compensation.as_ref()),
        ] {
            if let Some(TaskRef::Id(id)) = r
                && !tasks.contains_key(id.as_str())
            {
                return Err(Error::definition(format!(
                    "step \"{}\" of saga \"{}\" names unknown {what} task \"{id}\"",
                    step.id, p.def.id
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use architectlm_core::extensions::saga::SagaStep;

    #[test]
    fn groups_follow_parallel_marks() {
        let def = SagaDefinition::new("s")
            .step(SagaStep::task("a", "t"))
            .step(SagaStep::task("b", "t").parallel("g"))
            .step(SagaStep::task("c", "t").parallel("g"))
            .step(SagaStep::task("d", "t"));
        let p = check(def).unwrap();
        assert_eq!(p.groups, vec![0..1, 1..3, 3..4]);
    }

    #[test]
    fn a_split_group_is_rejected() {
        let def = SagaDefinition::new("s")
            .step(SagaStep::task("a", "t").parallel("g"))
            .step(SagaStep::task("b", "t"))
            .step(SagaStep::task("c", "t").parallel("g"));
        let e = check(def).unwrap_err().to_string();
        assert!(e.contains("\"g\"") && e.contains("not consecutive"), "{e}");
    }
}
