//! Property test: random event sequences on random valid processes never panic, and every
//! instance only ever moves along a transition the definition allows, exactly as a reference
//! model of the rules predicts (per-state transitions first, then top-level ones in declaration
//! order; the first whose guard passes wins; final states accept nothing).

mod support;

use std::collections::HashMap;

use architectlm_core::{Error, Guard, ProcessDefinition, StateType, System, TransitionDefinition};
use proptest::prelude::*;
use serde_json::json;

const EVENTS: [&str; 4] = ["a", "b", "c", "d"];

/// A declared transition: (from: `None` for `*`, to, event, guarded).
type Declared = (Option<usize>, usize, usize, bool);

#[derive(Debug, Clone)]
struct Spec {
    /// State types; state i is named `s{i}`.
    states: Vec<StateType>,
    transitions: Vec<Declared>,
}

fn spec() -> impl Strategy<Value = Spec> {
    (2usize..7).prop_flat_map(|n| {
        let states = prop::collection::vec(
            prop_oneof![4 => Just(StateType::Normal), 1 => Just(StateType::Final)],
            n,
        );
        let transition = (
            prop_oneof![6 => (0..n).prop_map(Some), 1 => Just(None)],
            0..n,
            0..EVENTS.len(),
            any::<bool>(),
        );
        (states, prop::collection::vec(transition, 1..14)).prop_map(|(states, transitions)| Spec {
            states,
            transitions,
        })
    })
}

/// The candidate lists per (state, event), keeping only transitions that are valid to
/// declare: a pair may have several entries only while all but the last are guarded.
type Table = HashMap<(usize, usize), Vec<(usize, bool)>>;

fn sanitise(spec: &Spec) -> (Vec<Declared>, Table) {
    let mut table: Table = HashMap::new();
    let mut kept = vec![];
    let is_final = |i: usize| spec.states[i] == StateType::Final;
    for &(from, to, ev, guarded) in &spec.transitions {
        let froms: Vec<usize> = match from {
            Some(f) => vec![f],
            None => (0..spec.states.len()).filter(|&i| !is_final(i)).collect(),
        };
        let clash = froms.iter().any(|f| {
            table
                .get(&(*f, ev))
                .and_then(|v| v.last())
                .is_some_and(|(_, g)| !g)
        });
        if clash {
            continue;
        }
        for f in froms {
            table.entry((f, ev)).or_default().push((to, guarded));
        }
        kept.push((from, to, ev, guarded));
    }
    (kept, table)
}

fn name(i: usize) -> String {
    format!("s{i}")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn random_events_only_follow_allowed_transitions(
        spec in spec(),
        steps in prop::collection::vec((0..EVENTS.len(), any::<bool>()), 0..40),
    ) {
        let (kept, table) = sanitise(&spec);
        let mut b = ProcessDefinition::builder("p");
        for (i, t) in spec.states.iter().enumerate() {
            b = b.state_of(name(i), *t);
        }
        // The first state is the initial one, unless it is final (then the first normal one).
        let initial = (0..spec.states.len()).find(|&i| spec.states[i] != StateType::Final).unwrap_or(0);
        b = b.start_in(name(initial));
        for &(from, to, ev, guarded) in &kept {
            let mut t = TransitionDefinition::new(from.map_or("*".to_owned(), name), name(to), EVENTS[ev]);
            if guarded {
                t = t.guard(Guard::new(|g| async move { g.data["pass"] == true }));
            }
            b = b.transition(t);
        }
        let Ok(def) = b.build() else {
            // Only a process whose transitions all vanished (a wildcard with no non-final
            // source) may be rejected, and then for that reason.
            prop_assert!(table.values().all(Vec::is_empty));
            return Ok(());
        };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let runtime = support::start(System::builder("s").process(def).build().expect("valid")).await;
            let instance = runtime.create_process("p", json!({})).await.expect("created");
            let mut state = initial;
            let mut version = instance.version;
            for (ev, pass) in steps {
                let result = runtime
                    .transition_process(instance.id, EVENTS[ev], json!({"pass": pass}))
                    .await;
                // The reference model.
                let expected = if spec.states[state] == StateType::Final {
                    None
                } else {
                    table.get(&(state, ev)).map(|cands| {
                        cands.iter().find(|(_, guarded)| !guarded || pass).map(|(to, _)| *to)
                    })
                };
                match (expected, result) {
                    (Some(Some(to)), Ok(out)) => {
                        prop_assert_eq!(out.from.to_string(), name(state));
                        prop_assert_eq!(out.instance.state.to_string(), name(to));
                        prop_assert!(out.instance.version > version);
                        version = out.instance.version;
                        state = to;
                    }
                    (Some(None), Err(Error::GuardRejected { state: s, .. })) => {
                        prop_assert_eq!(s, name(state));
                    }
                    (None, Err(Error::InvalidTransition { state: s, event, .. })) => {
                        prop_assert_eq!(s, name(state));
                        prop_assert_eq!(event, EVENTS[ev]);
                    }
                    (expected, got) => {
                        prop_assert!(false, "in {} on {}: expected {:?}, got {:?}", name(state), EVENTS[ev], expected, got.map(|o| o.instance.state));
                    }
                }
                let stored = runtime.get_process(instance.id).await.expect("ok").expect("exists");
                prop_assert_eq!(stored.state.to_string(), name(state));
                prop_assert!(def_allows(&spec, &stored.state));
            }
            Ok(())
        })?;
    }
}

/// Whether the state is one the definition declares.
fn def_allows(spec: &Spec, state: &str) -> bool {
    (0..spec.states.len()).any(|i| name(i) == state)
}
