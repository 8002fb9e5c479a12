//! Every definition error of systems, processes and tasks, asserted by its message, and the
//! defaults a valid definition gets.

mod support;

use std::time::Duration;

use architectlm_core::{
    Error, ProcessDefinition, RetryPolicy, StateType, System, TaskDefinition, TransitionDefinition,
};
use support::{assert_msg, echo};

fn process_err(b: architectlm_core::ProcessBuilder) -> Error {
    b.build().expect_err("the definition is invalid")
}

#[test]
fn process_definition_errors_name_the_offender() {
    let cases: Vec<(architectlm_core::ProcessBuilder, &str)> =
        vec![
            (
                ProcessDefinition::builder("  ").state("a"),
                "process id \"  \" is missing",
            ),
            (
                ProcessDefinition::builder("p"),
                "process \"p\" has no states",
            ),
            (
                ProcessDefinition::builder("p").state("a").state("b"),
                "process \"p\" has no transitions",
            ),
            (
                ProcessDefinition::builder("p")
                    .state("a")
                    .state("a")
                    .transition(TransitionDefinition::new("a", "a", "go")),
                "process \"p\" has duplicate state \"a\"",
            ),
            (
                ProcessDefinition::builder("p")
                    .state("a")
                    .start_in("nowhere")
                    .transition(TransitionDefinition::new("a", "a", "go")),
                "process \"p\" has unknown initial state \"nowhere\"",
            ),
            (
                ProcessDefinition::builder("p")
                    .state("a")
                    .transition(TransitionDefinition::new("ghost", "a", "go")),
                "transition from unknown state \"ghost\"",
            ),
            (
                ProcessDefinition::builder("p")
                    .state("a")
                    .transition(TransitionDefinition::new("a", "ghost", "go")),
                "transition to unknown state \"ghost\"",
            ),
            (
                ProcessDefinition::builder("p")
                    .state("a")
                    .on("go", "ghost", None, None),
                "transition to unknown state \"ghost\"",
            ),
            (
                ProcessDefinition::builder("p")
                    .state("a")
                    .state("b")
                    .transition(TransitionDefinition::new("a", "b", "go"))
                    .transition(TransitionDefinition::new("a", "a", "go")),
                "process \"p\" has duplicate transition from \"a\" on \"go\"",
            ),
            (
                ProcessDefinition::builder("p")
                    .state("a")
                    .state("b")
                    .on("go", "b", None, None)
                    .transition(TransitionDefinition::new("b", "a", "back"))
                    .transition(TransitionDefinition::new("*", "a", "back")),
                "duplicate transition from \"b\" on \"back\"",
            ),
            (
                ProcessDefinition::builder("p")
                    .state("a")
                    .transition(TransitionDefinition::from_many(["*", "a"], "a", "go")),
                "transition on \"go\" mixes the wildcard \"*\" with named states",
            ),
            (
                ProcessDefinition::builder("p")
                    .initial_state("a")
                    .initial_state("b")
                    .transition(TransitionDefinition::new("a", "b", "go")),
                "process \"p\" has more than one initial state: a, b",
            ),
            (
                ProcessDefinition::builder("p")
                    .state("a")
                    .transition(TransitionDefinition::new("a", "a", "")),
                "process \"p\": a transition to \"a\" has no event",
            ),
            (
                ProcessDefinition::builder("p")
                    .state("a")
                    .on("", "a", None, None),
                "process \"p\": a transition of state \"a\" has no event",
            ),
            (
                ProcessDefinition::builder("p")
                    .state("")
                    .transition(TransitionDefinition::new("a", "a", "go")),
                "process \"p\" has a state without a name",
            ),
            (
                ProcessDefinition::builder("p").state("a").transition(
                    TransitionDefinition::from_many(Vec::<String>::new(), "a", "go"),
                ),
                "process \"p\": transition on \"go\" has no from state",
            ),
            (
                ProcessDefinition::builder("p")
                    .state("a")
                    .transition(TransitionDefinition::from_many(["*"], "a", "go")),
                "use FromStates::Any for \"*\"",
            ),
        ];
    for (builder, needle) in cases {
        let err = process_err(builder);
        assert!(matches!(err, Error::Definition(_)), "{err:?}");
        assert_msg(&err, needle);
    }
}

#[test]
fn a_valid_process_gets_its_defaults() {
    let p = ProcessDefinition::builder("p")
        .state("first")
        .state("second")
        .final_state("end")
        .transition(TransitionDefinition::new("first", "second", "next"))
        .transition(TransitionDefinition::new("*", "end", "stop"))
        .build()
        .expect("valid");
    assert_eq!(
        &*p.initial_state, "first",
        "the initial state defaults to the first"
    );
    assert_eq!(p.name, "p", "the name defaults to the id");
    assert_eq!(p.events_from("first"), vec!["next", "stop"]);
    assert_eq!(p.events_from("second"), vec!["stop"]);
    assert!(
        p.events_from("end").is_empty(),
        "the wildcard skips final states"
    );
    assert_eq!(p.state("end").map(|(_, t)| t), Some(StateType::Final));

    // A state marked initial wins over the first one.
    let q = ProcessDefinition::builder("q")
        .state("a")
        .initial_state("b")
        .transition(TransitionDefinition::new("b", "a", "go"))
        .build()
        .expect("valid");
    assert_eq!(&*q.initial_state, "b");
}

#[test]
fn guarded_transitions_may_share_a_state_and_event() {
    let p = ProcessDefinition::builder("p")
        .state("a")
        .state("b")
        .state("c")
        .transition(
            TransitionDefinition::new("a", "b", "go")
                .guard(architectlm_core::Guard::sync(|_| true)),
        )
        .transition(TransitionDefinition::new("a", "c", "go"))
        .build();
    assert!(p.is_ok(), "{p:?}");
}

#[test]
fn system_definition_errors_name_the_offender() {
    assert_msg(
        &System::builder("").build().expect_err("no id"),
        "system id \"\" is missing",
    );
    assert_msg(
        &System::builder("s")
            .task(echo("t"))
            .task(echo("t"))
            .build()
            .expect_err("duplicate task"),
        "system \"s\" has duplicate task \"t\"",
    );
    let p = || {
        ProcessDefinition::builder("p")
            .state("a")
            .transition(TransitionDefinition::new("a", "a", "go"))
            .build()
            .expect("valid")
    };
    assert_msg(
        &System::builder("s")
            .process(p())
            .process(p())
            .build()
            .expect_err("duplicate process"),
        "system \"s\" has duplicate process \"p\"",
    );
    let with_action = ProcessDefinition::builder("p")
        .state("a")
        .transition(TransitionDefinition::new("a", "a", "go").action("missing-task"))
        .build()
        .expect("valid on its own");
    assert_msg(
        &System::builder("s")
            .process(with_action)
            .build()
            .expect_err("unknown action task"),
        "process \"p\" names unknown task \"missing-task\" as an action",
    );
}

#[test]
fn system_keeps_name_description_extensions_and_metadata() {
    let s = System::builder("s")
        .name("Shop")
        .description("sells things")
        .extensions(architectlm_core::ExtensionsConfig::all())
        .metadata("team", serde_json::json!("payments"))
        .build()
        .expect("valid");
    assert_eq!(s.name, "Shop");
    assert_eq!(s.description.as_deref(), Some("sells things"));
    assert!(s.extensions.saga_coordinator && s.extensions.load_manager);
    assert_eq!(s.metadata["team"], "payments");
}

#[test]
fn task_definition_errors_name_the_offender() {
    assert_msg(
        &TaskDefinition::builder(" ")
            .handler(|i, _c| async move { Ok(i) })
            .build()
            .expect_err("no id"),
        "task id \" \" is missing",
    );
    assert_msg(
        &TaskDefinition::builder("t")
            .build()
            .expect_err("no implementation"),
        "task \"t\" has no implementation",
    );
    assert_msg(
        &TaskDefinition::builder("t")
            .handler(|i, _c| async move { Ok(i) })
            .timeout(Duration::ZERO)
            .build()
            .expect_err("zero timeout"),
        "task \"t\" has a zero timeout",
    );
    let err = TaskDefinition::builder("t")
        .handler(|i, _c| async move { Ok(i) })
        .retry(RetryPolicy::attempts(0))
        .build()
        .expect_err("bad retry");
    assert_msg(&err, "task \"t\" has an invalid retry policy");
    assert_msg(&err, "retry.max_attempts = 0");
    assert_msg(
        &RetryPolicy::default()
            .with_factor(0.5)
            .validate()
            .expect_err("bad factor"),
        "retry.factor = 0.5",
    );
}
