//! Task execution: retries per backoff kind and timeouts under a paused clock, panic isolation,
//! middleware, typed tasks, services, and what the task context offers.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use architectlm_core::event::types;
use architectlm_core::{
    Backoff, Error, ExecuteOptions, RetryPolicy, System, TaskCall, TaskDefinition, TaskError,
    TaskErrorKind, TaskMiddleware, TaskRef, TaskResult,
};
use parking_lot::Mutex;
use serde_json::{Value, json};
use support::{Log, assert_msg, drain, empty, start};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A task that fails until its `succeed_on`-th attempt and records when each attempt started.
fn flaky(
    id: &str,
    succeed_on: u32,
    policy: RetryPolicy,
    starts: Arc<Mutex<Vec<Instant>>>,
) -> TaskDefinition {
    TaskDefinition::builder(id)
        .retry(policy)
        .handler(move |_input, ctx| {
            let starts = starts.clone();
            async move {
                starts.lock().push(Instant::now());
                if ctx.attempt() < succeed_on {
                    Err(TaskError::new(format!("attempt {} failed", ctx.attempt())))
                } else {
                    Ok(json!(ctx.attempt()))
                }
            }
        })
        .build()
        .expect("valid")
}

fn gaps(starts: &[Instant]) -> Vec<u64> {
    starts
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis() as u64)
        .collect()
}

#[tokio::test(start_paused = true)]
async fn retries_wait_as_each_backoff_kind_says() {
    let base = RetryPolicy::attempts(4)
        .with_initial_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_millis(350));
    for (backoff, expected) in [
        (Backoff::Fixed, vec![100, 100, 100]),
        (Backoff::Linear, vec![100, 200, 300]),
        (Backoff::Exponential, vec![100, 200, 350]), // 400 is capped at max_delay
    ] {
        let starts = Arc::new(Mutex::new(vec![]));
        let task = flaky(
            "flaky",
            4,
            base.clone().with_backoff(backoff),
            starts.clone(),
        );
        let rt = start(System::builder("s").task(task).build().expect("valid")).await;
        let t0 = Instant::now();
        let out = rt
            .execute_task("flaky", empty())
            .await
            .expect("succeeds on attempt 4");
        assert_eq!(out, json!(4), "{backoff:?}");
        assert_eq!(gaps(&starts.lock()), expected, "{backoff:?}");
        assert_eq!(
            t0.elapsed().as_millis() as u64,
            expected.iter().sum::<u64>(),
            "{backoff:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn exhausted_retries_fail_with_the_last_error_and_jitter_only_shortens() {
    let starts = Arc::new(Mutex::new(vec![]));
    let policy = RetryPolicy::attempts(3)
        .with_backoff(Backoff::Fixed)
        .with_initial_delay(Duration::from_secs(1))
        .with_jitter(0.5);
    let rt = start(
        System::builder("s")
            .task(flaky("never", 99, policy, starts.clone()))
            .build()
            .expect("valid"),
    )
    .await;
    let mut events = rt.subscribe(types::TASK_FAILED);
    let err = rt.execute_task("never", empty()).await.expect_err("fails");
    assert_msg(&err, "task \"never\" failed: attempt 3 failed");
    for gap in gaps(&starts.lock()) {
        assert!((500..=1000).contains(&gap), "jittered delay {gap} ms");
    }
    let e = support::next_event(&mut events).await;
    assert_eq!(e.payload["attempts"], 3);
}

#[tokio::test(start_paused = true)]
async fn a_permanent_error_is_not_retried() {
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let task = TaskDefinition::builder("strict")
        .retry(RetryPolicy::attempts(5))
        .handler(move |_i, _ctx| {
            c.fetch_add(1, Ordering::SeqCst);
            async move { Err(TaskError::permanent("bad input")) }
        })
        .build()
        .expect("valid");
    let rt = start(System::builder("s").task(task).build().expect("valid")).await;
    let err = rt.execute_task("strict", empty()).await.expect_err("fails");
    assert!(
        matches!(&err, Error::TaskFailed { error, .. } if error.kind == TaskErrorKind::Permanent)
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_timeout_cancels_the_attempt_and_retries() {
    let tokens: Arc<Mutex<Vec<CancellationToken>>> = Arc::default();
    let t = tokens.clone();
    let task = TaskDefinition::builder("slow")
        .timeout(Duration::from_secs(1))
        .retry(
            RetryPolicy::attempts(2)
                .with_backoff(Backoff::Fixed)
                .with_initial_delay(Duration::from_millis(500)),
        )
        .handler(move |_i, ctx| {
            t.lock().push(ctx.cancellation().clone());
            async move {
                tokio::time::sleep(Duration::from_secs(10)).await;
                Ok(json!("too late"))
            }
        })
        .build()
        .expect("valid");
    let rt = start(System::builder("s").task(task).build().expect("valid")).await;
    let t0 = Instant::now();
    let err = rt
        .execute_task("slow", empty())
        .await
        .expect_err("times out");
    assert_eq!(
        t0.elapsed(),
        Duration::from_millis(2500),
        "1 s + 0.5 s backoff + 1 s"
    );
    assert!(
        matches!(&err, Error::TaskFailed { error, .. } if error.kind == TaskErrorKind::TimedOut)
    );
    assert_msg(&err, "task \"slow\" timed out after 1s");
    {
        let tokens = tokens.lock();
        assert_eq!(tokens.len(), 2);
        assert!(
            tokens.iter().all(CancellationToken::is_cancelled),
            "each timed-out attempt was told to stop"
        );
    }
    assert!(
        !rt.cancellation().is_cancelled(),
        "the runtime itself is not cancelled"
    );

    // A per-call option replaces the task's own timeout and policy.
    let t0 = Instant::now();
    let opts = ExecuteOptions::default()
        .timeout(Duration::from_millis(200))
        .retry(RetryPolicy::none());
    rt.execute(TaskRef::Id("slow".into()), empty(), opts)
        .await
        .expect_err("times out");
    assert_eq!(t0.elapsed(), Duration::from_millis(200));
}

#[tokio::test]
async fn a_handler_panicking_before_its_future_fails_only_its_task() {
    let boom = TaskDefinition::new("boom", |i: serde_json::Value, _c| {
        let first = i.as_array().map(|a| a.len()).unwrap_or(0);
        if first == 0 {
            panic!("no lines in the order");
        }
        async move { Ok(json!(first)) }
    })
    .expect("valid");
    let rt = start(System::builder("s").task(boom).build().expect("valid")).await;
    let err = rt
        .execute_task("boom", json!([]))
        .await
        .expect_err("panicked");
    assert_msg(&err, "task \"boom\" panicked: no lines in the order");
    assert_eq!(
        rt.execute_task("boom", json!([1, 2]))
            .await
            .expect("the runtime still works"),
        json!(2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_task_fails_only_itself() {
    let boom = TaskDefinition::new("boom", |_i, _c| async move {
        let v: Vec<u8> = vec![];
        if v.is_empty() {
            panic!("index out of range in the payment code");
        }
        Ok(json!(null))
    })
    .expect("valid");
    let slow_ok = TaskDefinition::new("ok", |i, _c| async move {
        tokio::task::yield_now().await;
        Ok(i)
    })
    .expect("valid");
    let rt = start(
        System::builder("s")
            .task(boom)
            .task(slow_ok)
            .build()
            .expect("valid"),
    )
    .await;
    let (a, b) = tokio::join!(
        rt.execute_task("boom", empty()),
        rt.execute_task("ok", json!(5))
    );
    let err = a.expect_err("panicked");
    assert!(
        matches!(&err, Error::TaskFailed { error, .. } if error.kind == TaskErrorKind::Panicked)
    );
    assert_msg(
        &err,
        "task \"boom\" panicked: index out of range in the payment code",
    );
    assert_eq!(b.expect("the other task is unaffected"), json!(5));
    assert_eq!(
        rt.execute_task("ok", json!(6))
            .await
            .expect("the runtime still works"),
        json!(6)
    );
}

#[derive(Default)]
struct Recorder {
    log: Log,
    refuse: Option<&'static str>,
}

impl TaskMiddleware for Recorder {
    fn before(&self, call: &TaskCall<'_>) -> Result<(), TaskError> {
        self.log.push(format!(
            "before {} input={} attempts={}",
            call.task_id, call.input, call.attempts
        ));
        match self.refuse {
            Some(t) if t == call.task_id => {
                Err(TaskError::permanent(format!("{t} is switched off")))
            }
            _ => Ok(()),
        }
    }
    fn after(&self, call: &TaskCall<'_>, outcome: &TaskResult) {
        let o = match outcome {
            Ok(v) => format!("ok {v}"),
            Err(e) => format!("err {e}"),
        };
        self.log.push(format!(
            "after {} attempts={} {o}",
            call.task_id, call.attempts
        ));
    }
}

#[tokio::test(start_paused = true)]
async fn middleware_sees_every_execution_before_and_after() {
    let ran = Arc::new(AtomicU32::new(0));
    let r = ran.clone();
    let off = TaskDefinition::new("off", move |_i, _c| {
        r.fetch_add(1, Ordering::SeqCst);
        async move { Ok(json!(null)) }
    })
    .expect("valid");
    let starts = Arc::default();
    let policy = RetryPolicy::attempts(2).with_initial_delay(Duration::from_millis(1));
    let system = System::builder("s")
        .task(support::echo("echo"))
        .task(off)
        .task(flaky("flaky", 2, policy, starts))
        .build()
        .expect("valid");
    let log = Log::default();
    let first = Arc::new(Recorder {
        log: log.clone(),
        refuse: Some("off"),
    });
    let rt = architectlm_core::Runtime::builder(system)
        .middleware(first)
        .start()
        .await
        .expect("starts");
    let second = Log::default();
    rt.add_middleware(Arc::new(Recorder {
        log: second.clone(),
        refuse: None,
    }));

    rt.execute_task("echo", json!(1)).await.expect("ok");
    rt.execute_task("flaky", json!(2))
        .await
        .expect("ok on attempt 2");
    let err = rt.execute_task("off", json!(3)).await.expect_err("refused");
    assert_msg(&err, "off is switched off");
    assert_eq!(ran.load(Ordering::SeqCst), 0, "a refused task never runs");
    assert_eq!(
        log.entries(),
        vec![
            "before echo input=1 attempts=0",
            "after echo attempts=1 ok 1",
            "before flaky input=2 attempts=0",
            "after flaky attempts=2 ok 2",
            "before off input=3 attempts=0",
            "after off attempts=0 err off is switched off",
        ]
    );
    assert_eq!(
        second.entries()[..2],
        [
            "before echo input=1 attempts=0",
            "after echo attempts=1 ok 1"
        ]
    );
}

#[derive(serde::Deserialize)]
struct Order {
    amount: u64,
}

#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
struct Receipt {
    charged: u64,
}

#[tokio::test]
async fn typed_tasks_convert_in_and_out_and_name_bad_input() {
    let charge = TaskDefinition::typed("charge", |o: Order, _ctx| async move {
        Ok::<_, TaskError>(Receipt {
            charged: o.amount * 100,
        })
    })
    .expect("valid");
    let rt = start(System::builder("s").task(charge).build().expect("valid")).await;
    let r: Receipt = rt
        .execute_typed("charge", &json!({"amount": 3}))
        .await
        .expect("ok");
    assert_eq!(r, Receipt { charged: 300 });
    let err = rt
        .execute_task("charge", json!({"amount": "three"}))
        .await
        .expect_err("bad input");
    assert!(
        matches!(&err, Error::TaskFailed { error, .. } if error.kind == TaskErrorKind::Permanent)
    );
    assert_msg(&err, "invalid input for task \"charge\"");
}

#[tokio::test]
async fn a_typed_output_that_does_not_match_names_the_task_and_the_output() {
    #[derive(Debug, serde::Deserialize)]
    struct Invoice {
        #[allow(dead_code)]
        number: u64,
    }
    let charge = TaskDefinition::typed("charge", |o: Order, _ctx| async move {
        Ok::<_, TaskError>(Receipt {
            charged: o.amount * 100,
        })
    })
    .expect("valid");
    let rt = start(System::builder("s").task(charge).build().expect("valid")).await;
    let err = rt
        .execute_typed::<_, Invoice>("charge", &json!({"amount": 3}))
        .await
        .expect_err("a receipt is no invoice");
    assert!(
        matches!(
            &err,
            Error::Codec {
                action: "decode",
                ..
            }
        ),
        "{err:?}"
    );
    assert_msg(&err, "output of task \"charge\"");
    assert_msg(&err, "Invoice");
    assert_msg(&err, "missing field `number`");
    // serde's error stays the source, for callers that walk the chain.
    let source = std::error::Error::source(&err).expect("a source");
    assert!(source.to_string().contains("number"), "{source}");

    // The input side, likewise: a map with non-string keys cannot become JSON.
    let bad: std::collections::HashMap<(u8, u8), u8> = [((1, 2), 3)].into();
    let err = rt
        .execute_typed::<_, Receipt>("charge", &bad)
        .await
        .expect_err("unencodable input");
    assert!(
        matches!(
            &err,
            Error::Codec {
                action: "encode",
                ..
            }
        ),
        "{err:?}"
    );
    assert_msg(&err, "input of task \"charge\"");
}

#[test]
fn blank_ids_are_named_as_written() {
    for id in ["", "  ", "\t"] {
        let e = TaskDefinition::new(id, |i, _ctx| async move { Ok(i) }).expect_err("blank");
        assert_msg(&e, &format!("{id:?}"));
        let e = System::builder(id).build().expect_err("blank");
        assert_msg(&e, &format!("{id:?}"));
        let e = architectlm_core::ProcessDefinition::builder(id)
            .initial_state("a")
            .build()
            .expect_err("blank");
        assert_msg(&e, &format!("{id:?}"));
    }
}

#[test]
fn extensions_config_is_built_by_setters_and_read_partially_from_json() {
    use architectlm_core::ExtensionsConfig;
    let c = ExtensionsConfig::none().scheduler(true).load_manager(true);
    assert!(c.scheduler && c.load_manager && !c.saga_coordinator && !c.supervisor);
    let from_json: ExtensionsConfig =
        serde_json::from_str(r#"{"scheduler": true, "load_manager": true}"#).expect("partial");
    assert_eq!(from_json, c);
    let empty: ExtensionsConfig = serde_json::from_str("{}").expect("empty");
    assert_eq!(empty, ExtensionsConfig::none());
    let typo = serde_json::from_str::<ExtensionsConfig>(r#"{"schedular": true}"#).unwrap_err();
    assert!(typo.to_string().contains("schedular"), "{typo}");
    let round: ExtensionsConfig =
        serde_json::from_str(&serde_json::to_string(&ExtensionsConfig::all()).unwrap()).unwrap();
    assert_eq!(round, ExtensionsConfig::all());
}

#[derive(Debug)]
struct Mailer {
    from: &'static str,
}

#[tokio::test]
async fn user_services_are_found_by_type_and_by_name() {
    let task = TaskDefinition::new("send", |_i, ctx| async move {
        let by_type = ctx
            .service::<Mailer>()
            .map_err(|e| TaskError::new(e.to_string()))?;
        let by_name = ctx
            .services()
            .get_named::<Mailer>("backup")
            .map_err(|e| TaskError::new(e.to_string()))?;
        // A service registered under a name is type-checked too.
        let wrong = ctx.services().get_named::<String>("backup").is_err();
        Ok(json!([by_type.from, by_name.from, wrong]))
    })
    .expect("valid");
    let rt =
        architectlm_core::Runtime::builder(System::builder("s").task(task).build().expect("valid"))
            .service(Arc::new(Mailer {
                from: "shop@example.com",
            }))
            .named_service(
                "backup",
                Arc::new(Mailer {
                    from: "backup@example.com",
                }),
            )
            .start()
            .await
            .expect("starts");
    assert_eq!(
        rt.execute_task("send", empty()).await.expect("ok"),
        json!(["shop@example.com", "backup@example.com", true])
    );
}

#[tokio::test]
async fn the_context_carries_ids_key_events_and_nested_execution() {
    let seen: Arc<Mutex<Vec<Value>>> = Arc::default();
    let s = seen.clone();
    let outer = TaskDefinition::new("outer", move |input, ctx| {
        let seen = s.clone();
        async move {
            seen.lock().push(json!({
                "task": ctx.task_id(),
                "execution": ctx.execution_id(),
                "attempt": ctx.attempt(),
                "key": ctx.idempotency_key(),
                "process": ctx.process().is_some(),
                "cancelled": ctx.is_cancelled(),
            }));
            ctx.emit_event("order-noted", json!({"n": input["n"]}));
            let doubled = ctx
                .execute_task("double", input["n"].clone())
                .await
                .map_err(TaskError::from)?;
            Ok(json!({"doubled": doubled}))
        }
    })
    .expect("valid");
    let double = TaskDefinition::new("double", |v: Value, _c| async move {
        Ok(json!(v.as_i64().unwrap_or(0) * 2))
    })
    .expect("valid");
    let rt = start(
        System::builder("s")
            .task(outer)
            .task(double)
            .build()
            .expect("valid"),
    )
    .await;
    let mut custom = rt.subscribe("order-noted");
    let mut all = rt.subscribe("*");
    let id = uuid::Uuid::new_v4();
    let opts = ExecuteOptions::default()
        .idempotency_key("order-17")
        .execution_id(id);
    let out = rt
        .execute(TaskRef::Id("outer".into()), json!({"n": 21}), opts)
        .await
        .expect("ok");
    assert_eq!(out, json!({"doubled": 42}));
    assert_eq!(
        seen.lock()[0],
        json!({"task": "outer", "execution": id, "attempt": 1, "key": "order-17", "process": false, "cancelled": false})
    );
    let e = support::next_event(&mut custom).await;
    assert_eq!(e.source, "task:outer");
    assert_eq!(e.payload, json!({"n": 21}));
    let kinds: Vec<String> = drain(&mut all)
        .into_iter()
        .map(|(t, p)| format!("{t}:{}", p["task_id"].as_str().unwrap_or("-")))
        .collect();
    assert_eq!(
        kinds,
        vec![
            "TASK_STARTED:outer",
            "order-noted:-",
            "TASK_STARTED:double",
            "TASK_COMPLETED:double",
            "TASK_COMPLETED:outer",
        ]
    );
}

#[tokio::test]
async fn an_ad_hoc_handler_runs_with_the_given_options_and_caller_cancellation() {
    let rt = start(System::builder("s").build().expect("valid")).await;
    let handler: Arc<dyn architectlm_core::TaskHandler> =
        Arc::new(|_i: Value, ctx: architectlm_core::TaskContext| async move {
            ctx.cancellation().cancelled().await;
            Err(TaskError::with_kind(
                TaskErrorKind::Cancelled,
                "stopped by the caller",
            ))
        });
    let cancel = CancellationToken::new();
    let call = rt.execute(
        TaskRef::Handler {
            name: "waiter".into(),
            handler,
        },
        empty(),
        ExecuteOptions::default().cancel(cancel.clone()),
    );
    cancel.cancel();
    let err = call.await.expect_err("cancelled");
    assert_msg(&err, "task \"waiter\" failed: stopped by the caller");
}

#[tokio::test]
async fn a_task_with_a_caller_token_is_still_cancelled_by_shutdown() {
    let rt = start(System::builder("s").build().expect("valid")).await;
    let handler: Arc<dyn architectlm_core::TaskHandler> =
        Arc::new(|_i: Value, ctx: architectlm_core::TaskContext| async move {
            ctx.cancellation().cancelled().await;
            Ok(json!("stopped"))
        });
    let caller = CancellationToken::new();
    let call = tokio::spawn({
        let rt = rt.clone();
        async move {
            rt.execute(
                TaskRef::Handler {
                    name: "waiter".into(),
                    handler,
                },
                empty(),
                ExecuteOptions::default().cancel(caller),
            )
            .await
        }
    });
    while rt.running_tasks() == 0 {
        tokio::task::yield_now().await;
    }
    rt.shutdown(Duration::ZERO).await;
    let out = tokio::time::timeout(support::DEADLINE, call)
        .await
        .expect("the task stops")
        .expect("no panic");
    assert_eq!(out.expect("ok"), json!("stopped"));
}
