//! OTP-style worker supervision on a paused clock: restart intensity and escalation, the three
//! strategies, restart types, heartbeats, backoff, shutdown order, and introspection.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use architectlm_supervisor::worker::{
    ChildSpec, ChildState, ExitReason, Restart, RestartBackoff, RestartIntensity, StopOutcome,
    Strategy, SupervisorSpec, TreeExit, WorkerEvent, WorkerEventKind,
};
use parking_lot::Mutex;
use support::{next, until};
use tokio::time::Instant;

/// A worker that runs until it is told to stop and records that it stopped.
fn idle(name: &str, runs: Arc<AtomicU32>, stops: Arc<Mutex<Vec<String>>>) -> ChildSpec {
    let n = name.to_owned();
    ChildSpec::worker(name, move |ctx| {
        runs.fetch_add(1, Ordering::SeqCst);
        let stops = stops.clone();
        let n = n.clone();
        async move {
            ctx.cancelled().await;
            stops.lock().push(n);
            Ok(())
        }
    })
}

/// A worker that fails on its first run, then idles.
fn fails_once(name: &str, runs: Arc<AtomicU32>) -> ChildSpec {
    ChildSpec::worker(name, move |ctx| {
        let first = runs.fetch_add(1, Ordering::SeqCst) == 0;
        async move {
            if first {
                return Err("first run fails".into());
            }
            ctx.cancelled().await;
            Ok(())
        }
    })
}

fn counter() -> Arc<AtomicU32> {
    Arc::new(AtomicU32::new(0))
}

async fn wait_exit(handle: &architectlm_supervisor::worker::SupervisorHandle) -> TreeExit {
    tokio::time::timeout(Duration::from_secs(3600), handle.wait())
        .await
        .expect("the tree did not stop within an hour of virtual time")
}

#[tokio::test(start_paused = true)]
async fn exactly_n_restarts_within_the_period_then_escalation_to_the_top() {
    let conn_starts = counter();
    let c = conn_starts.clone();
    let db = SupervisorSpec::builder("db")
        .intensity(RestartIntensity::new(3, Duration::from_secs(5)))
        .child(ChildSpec::worker("conn", move |_ctx| {
            c.fetch_add(1, Ordering::SeqCst);
            async { Err("connection refused".into()) }
        }))
        .build()
        .unwrap();
    let web_stops = Arc::new(Mutex::new(Vec::new()));
    let root = SupervisorSpec::builder("app")
        .intensity(RestartIntensity::new(1, Duration::from_secs(60)))
        .child(ChildSpec::supervisor(db))
        .child(idle("web", counter(), web_stops.clone()))
        .build()
        .unwrap()
        .start();
    let mut tripped = root.subscribe("intensity-exceeded");
    let exit = wait_exit(&root).await;
    // Each incarnation of "db" allows 3 restarts of "conn" (4 runs); the root restarts "db"
    // once (its own limit is 1), then gives up.
    assert_eq!(conn_starts.load(Ordering::SeqCst), 8);
    let TreeExit::IntensityExceeded {
        child,
        cause,
        max_restarts,
        ..
    } = exit
    else {
        panic!("expected the root to give up, got {exit:?}");
    };
    assert_eq!(child, "db");
    assert_eq!(max_restarts, 1);
    let ExitReason::Escalated {
        supervisor,
        child,
        cause,
    } = cause
    else {
        panic!("expected an escalation, got {cause:?}");
    };
    assert_eq!(supervisor, "app/db");
    assert_eq!(child, "conn");
    assert_eq!(
        *cause,
        ExitReason::Failed {
            error: "connection refused".into()
        }
    );
    let mut who = Vec::new();
    for _ in 0..3 {
        who.push(next(&mut tripped).await.supervisor.clone());
    }
    assert_eq!(who, vec!["app/db", "app/db", "app"]);
    // The sibling was stopped when the root gave up.
    assert_eq!(*web_stops.lock(), vec!["web".to_owned()]);
}

#[tokio::test(start_paused = true)]
async fn the_window_slides() {
    // A worker that fails every 3 s: at most 2 restarts fall in any 5 s window, never 3.
    let runs = counter();
    let r = runs.clone();
    let every_3s = move |_ctx| {
        r.fetch_add(1, Ordering::SeqCst);
        async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            Err("tick failure".into())
        }
    };
    let handle = SupervisorSpec::builder("s")
        .intensity(RestartIntensity::new(2, Duration::from_secs(5)))
        .child(ChildSpec::worker("w", every_3s.clone()))
        .build()
        .unwrap()
        .start();
    tokio::time::sleep(Duration::from_millis(40_500)).await;
    assert_eq!(handle.exit(), None);
    assert_eq!(handle.children().await.unwrap()[0].restart_count, 13);
    handle.shutdown().await;

    // With a 7 s window, the failures at 3, 6 and 9 s are 3 restarts within it: it trips at 9 s.
    let t0 = Instant::now();
    let handle = SupervisorSpec::builder("s")
        .intensity(RestartIntensity::new(2, Duration::from_secs(7)))
        .child(ChildSpec::worker("w", every_3s))
        .build()
        .unwrap()
        .start();
    let exit = wait_exit(&handle).await;
    assert!(
        matches!(exit, TreeExit::IntensityExceeded { .. }),
        "{exit:?}"
    );
    assert_eq!(t0.elapsed(), Duration::from_secs(9));
}

#[tokio::test(start_paused = true)]
async fn one_for_all_restarts_every_sibling_but_temporary_ones() {
    let stops = Arc::new(Mutex::new(Vec::new()));
    let (a, b, c, t) = (counter(), counter(), counter(), counter());
    let handle = SupervisorSpec::builder("s")
        .strategy(Strategy::OneForAll)
        .child(idle("a", a.clone(), stops.clone()))
        .child(fails_once("b", b.clone()))
        .child(idle("c", c.clone(), stops.clone()))
        .child(idle("t", t.clone(), stops.clone()).restart(Restart::Temporary))
        .build()
        .unwrap()
        .start();
    let mut events = handle.subscribe("group-restart");
    let group = next(&mut events).await;
    let WorkerEventKind::GroupRestart { children, .. } = &group.kind else {
        panic!("{group:?}");
    };
    assert_eq!(children, &vec!["a", "b", "c"]);
    // Stopped in reverse start order before the restart.
    assert_eq!(*stops.lock(), vec!["t", "c", "a"]);
    tokio::time::sleep(Duration::from_millis(10)).await;
    let runs: Vec<u32> = [&a, &b, &c, &t]
        .iter()
        .map(|x| x.load(Ordering::SeqCst))
        .collect();
    assert_eq!(runs, vec![2, 2, 2, 1]);
    let status = handle.children().await.unwrap();
    let summary: Vec<(String, ChildState, u32)> = status
        .iter()
        .map(|s| (s.name.clone(), s.state, s.restart_count))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("a".into(), ChildState::Running, 1),
            ("b".into(), ChildState::Running, 1),
            ("c".into(), ChildState::Running, 1),
        ]
    );
    // The temporary sibling stopped by the group restart left, as in OTP
    // (`temporary_normal`: a temporary child's spec is deleted when it terminates).
    assert!(status.iter().all(|s| s.name != "t"));
    handle.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn rest_for_one_restarts_the_child_and_those_started_after_it() {
    let stops = Arc::new(Mutex::new(Vec::new()));
    let (a, b, c) = (counter(), counter(), counter());
    let handle = SupervisorSpec::builder("s")
        .strategy(Strategy::RestForOne)
        .child(idle("a", a.clone(), stops.clone()))
        .child(fails_once("b", b.clone()))
        .child(idle("c", c.clone(), stops.clone()))
        .build()
        .unwrap()
        .start();
    let mut events = handle.subscribe("group-restart");
    let group = next(&mut events).await;
    let WorkerEventKind::GroupRestart { children, .. } = &group.kind else {
        panic!("{group:?}");
    };
    assert_eq!(children, &vec!["b", "c"]);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(*stops.lock(), vec!["c"]);
    let runs: Vec<u32> = [&a, &b, &c]
        .iter()
        .map(|x| x.load(Ordering::SeqCst))
        .collect();
    assert_eq!(runs, vec![1, 2, 2]);
    let counts: Vec<u32> = handle
        .children()
        .await
        .unwrap()
        .iter()
        .map(|s| s.restart_count)
        .collect();
    assert_eq!(counts, vec![0, 1, 1]);
    handle.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn restart_types_decide_what_is_restarted() {
    let normal_once = |name: &str, restart: Restart| {
        let runs = counter();
        ChildSpec::worker(name, move |ctx| {
            let first = runs.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                if !first {
                    ctx.cancelled().await;
                }
                Ok(())
            }
        })
        .restart(restart)
    };
    let handle = SupervisorSpec::builder("s")
        .child(normal_once("permanent-normal", Restart::Permanent))
        .child(normal_once("transient-normal", Restart::Transient))
        .child(fails_once("transient-error", counter()).restart(Restart::Transient))
        .child(fails_once("temporary-error", counter()).restart(Restart::Temporary))
        .build()
        .unwrap()
        .start();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let summary: Vec<(String, ChildState, u32)> = handle
        .children()
        .await
        .unwrap()
        .iter()
        .map(|s| (s.name.clone(), s.state, s.restart_count))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("permanent-normal".into(), ChildState::Running, 1),
            ("transient-normal".into(), ChildState::Stopped, 0),
            ("transient-error".into(), ChildState::Running, 1),
            // `temporary-error` ended and, being temporary, left (OTP `temporary_abnormal`).
        ]
    );
    handle.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn panics_and_errors_are_told_apart() {
    let runs = counter();
    let r = runs.clone();
    let handle = SupervisorSpec::builder("s")
        .child(ChildSpec::worker("w", move |ctx| {
            let n = r.fetch_add(1, Ordering::SeqCst);
            async move {
                match n {
                    0 => panic!("boom at startup"),
                    1 => Err("bad input".into()),
                    _ => {
                        ctx.cancelled().await;
                        Ok(())
                    }
                }
            }
        }))
        .build()
        .unwrap()
        .start();
    let mut exits = handle.subscribe("child-exited");
    let reason = |e: &WorkerEvent| match &e.kind {
        WorkerEventKind::ChildExited { reason, .. } => reason.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        reason(&*next(&mut exits).await),
        ExitReason::Panicked {
            message: "boom at startup".into()
        }
    );
    assert_eq!(
        reason(&*next(&mut exits).await),
        ExitReason::Failed {
            error: "bad input".into()
        }
    );
    let status = &handle.children().await.unwrap()[0];
    assert_eq!(status.restart_count, 2);
    assert_eq!(status.state, ChildState::Running);
    handle.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_hung_worker_is_detected_at_its_deadline_cancelled_and_restarted() {
    let last_beat = Arc::new(Mutex::new(None::<Instant>));
    let runs = counter();
    let (lb, r) = (last_beat.clone(), runs.clone());
    let handle = SupervisorSpec::builder("s")
        .child(
            ChildSpec::worker("poller", move |ctx| {
                let first = r.fetch_add(1, Ordering::SeqCst) == 0;
                let lb = lb.clone();
                async move {
                    // Beats every 100 ms; on its first run it stops beating after 2 s but still
                    // honours its cancellation.
                    let until = Instant::now() + Duration::from_secs(2);
                    while !first || Instant::now() < until {
                        ctx.heartbeat();
                        if first {
                            *lb.lock() = Some(Instant::now());
                        }
                        tokio::select! {
                            _ = ctx.cancelled() => return Ok(()),
                            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        }
                    }
                    ctx.cancelled().await;
                    Ok(())
                }
            })
            .heartbeat(Duration::from_secs(1))
            .shutdown_timeout(Duration::from_millis(500)),
        )
        .build()
        .unwrap()
        .start();
    let mut events = handle.subscribe("*");
    let missed = until(&mut events, |e| {
        matches!(e.kind, WorkerEventKind::HeartbeatMissed { .. })
    })
    .await;
    let beat = last_beat.lock().expect("the worker beat");
    let late = Instant::now() - beat;
    assert!(late >= Duration::from_secs(1), "detected early: {late:?}");
    assert!(
        late <= Duration::from_millis(1010),
        "detected late: {late:?}"
    );
    assert!(matches!(
        missed.kind,
        WorkerEventKind::HeartbeatMissed {
            deadline_ms: 1000,
            ..
        }
    ));
    let exited = next(&mut events).await;
    assert!(
        matches!(
            &exited.kind,
            WorkerEventKind::ChildExited {
                reason: ExitReason::Hung {
                    deadline_ms: 1000,
                    aborted: false
                },
                ..
            }
        ),
        "{exited:?}"
    );
    let restarted = next(&mut events).await;
    assert!(matches!(
        restarted.kind,
        WorkerEventKind::ChildStarted { restart_count: 1 }
    ));
    // The second run keeps beating: no further detection.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    handle.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_hung_worker_that_ignores_cancellation_is_aborted_after_its_shutdown_timeout() {
    let handle = SupervisorSpec::builder("s")
        .intensity(RestartIntensity::new(0, Duration::from_secs(1)))
        .child(
            ChildSpec::worker("stuck", |_ctx| async {
                // Never beats and never looks at its cancellation.
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(())
            })
            .heartbeat(Duration::from_secs(2))
            .shutdown_timeout(Duration::from_millis(300)),
        )
        .build()
        .unwrap()
        .start();
    let t0 = Instant::now();
    let mut events = handle.subscribe("*");
    until(&mut events, |e| {
        matches!(e.kind, WorkerEventKind::HeartbeatMissed { .. })
    })
    .await;
    assert_eq!(t0.elapsed(), Duration::from_secs(2));
    until(&mut events, |e| {
        matches!(e.kind, WorkerEventKind::ChildKilled { .. })
    })
    .await;
    assert_eq!(t0.elapsed(), Duration::from_millis(2300));
    let exited = next(&mut events).await;
    assert!(
        matches!(
            &exited.kind,
            WorkerEventKind::ChildExited {
                reason: ExitReason::Hung { aborted: true, .. },
                ..
            }
        ),
        "{exited:?}"
    );
    // No restart allowed: the tree gives up.
    assert!(matches!(
        wait_exit(&handle).await,
        TreeExit::IntensityExceeded { .. }
    ));
}

#[tokio::test(start_paused = true)]
async fn shutdown_stops_children_in_reverse_order_each_within_its_timeout() {
    let stops = Arc::new(Mutex::new(Vec::new()));
    let s = stops.clone();
    let slow = ChildSpec::worker("b", move |ctx| {
        let s = s.clone();
        async move {
            ctx.cancelled().await;
            // Flushing takes 300 ms.
            tokio::time::sleep(Duration::from_millis(300)).await;
            s.lock().push("b".to_owned());
            Ok(())
        }
    })
    .shutdown_timeout(Duration::from_secs(1));
    let stubborn = ChildSpec::worker("c", |_ctx| async {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok(())
    })
    .shutdown_timeout(Duration::from_secs(2));
    let handle = SupervisorSpec::builder("s")
        .child(idle("a", counter(), stops.clone()))
        .child(slow)
        .child(stubborn)
        .build()
        .unwrap()
        .start();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let t0 = Instant::now();
    let report = handle.shutdown().await;
    assert_eq!(t0.elapsed(), Duration::from_millis(2300));
    let lines: Vec<(String, StopOutcome)> = report
        .children
        .iter()
        .map(|c| (c.name.clone(), c.outcome))
        .collect();
    assert_eq!(
        lines,
        vec![
            ("c".into(), StopOutcome::Killed),
            ("b".into(), StopOutcome::Graceful),
            ("a".into(), StopOutcome::Graceful),
        ]
    );
    assert_eq!(*stops.lock(), vec!["b", "a"]);
    assert_eq!(handle.exit(), Some(TreeExit::Shutdown));
    assert!(handle.children().await.is_err());
}

#[tokio::test(start_paused = true)]
async fn backoff_grows_and_resets_after_a_stable_run() {
    let starts = Arc::new(Mutex::new(Vec::new()));
    let s = starts.clone();
    let handle = SupervisorSpec::builder("s")
        .intensity(RestartIntensity::new(100, Duration::from_secs(1)))
        .child(
            ChildSpec::worker("w", move |_ctx| {
                let n = {
                    let mut s = s.lock();
                    s.push(Instant::now());
                    s.len()
                };
                async move {
                    if n == 5 {
                        // A stable run, longer than reset_after.
                        tokio::time::sleep(Duration::from_secs(10)).await;
                    }
                    Err("crash".into())
                }
            })
            .backoff(
                RestartBackoff::exponential(Duration::from_millis(100), Duration::from_secs(1))
                    .reset_after(Duration::from_secs(5)),
            ),
        )
        .build()
        .unwrap()
        .start();
    let mut scheduled = handle.subscribe("restart-scheduled");
    for _ in 0..6 {
        next(&mut scheduled).await;
    }
    handle.shutdown().await;
    let starts = starts.lock().clone();
    let gaps: Vec<u128> = starts
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis())
        .collect();
    assert_eq!(gaps, vec![100, 200, 400, 800, 10_100]);
}

#[tokio::test(start_paused = true)]
async fn jitter_stays_within_its_band() {
    let starts = Arc::new(Mutex::new(Vec::new()));
    let s = starts.clone();
    let handle = SupervisorSpec::builder("s")
        .intensity(RestartIntensity::new(100, Duration::from_secs(1)))
        .child(
            ChildSpec::worker("w", move |_ctx| {
                s.lock().push(Instant::now());
                async { Err("crash".into()) }
            })
            .backoff(
                RestartBackoff::exponential(Duration::from_millis(100), Duration::from_secs(10))
                    .jitter(0.5),
            ),
        )
        .build()
        .unwrap()
        .start();
    let mut started = handle.subscribe("child-started");
    for _ in 0..5 {
        next(&mut started).await;
    }
    handle.shutdown().await;
    let starts = starts.lock().clone();
    for (i, w) in starts.windows(2).enumerate() {
        let base = 100u128 << i;
        let gap = (w[1] - w[0]).as_millis();
        assert!(
            gap >= base / 2 && gap <= base,
            "gap {i}: {gap} ms, base {base} ms"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn delayed_restarts_may_be_left_out_of_the_intensity() {
    let crash = || {
        ChildSpec::worker("w", |_ctx| async { Err("crash".into()) }).backoff(
            RestartBackoff::exponential(Duration::from_millis(10), Duration::from_millis(50)),
        )
    };
    // Counted (the default): with no restart allowed, the first failure stops the tree.
    let counted = SupervisorSpec::builder("s")
        .intensity(RestartIntensity::new(0, Duration::from_secs(60)))
        .child(crash())
        .build()
        .unwrap()
        .start();
    assert!(matches!(
        wait_exit(&counted).await,
        TreeExit::IntensityExceeded { .. }
    ));
    // Not counted: the child keeps being restarted at its backoff pace.
    let lenient = SupervisorSpec::builder("s")
        .intensity(RestartIntensity::new(0, Duration::from_secs(60)))
        .count_delayed_restarts(false)
        .child(crash())
        .build()
        .unwrap()
        .start();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(lenient.exit(), None);
    let status = &lenient.children().await.unwrap()[0];
    assert!(status.restart_count >= 15, "{}", status.restart_count);
    lenient.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn the_tree_can_be_listed_serialised_and_changed_at_run_time() {
    let stops = Arc::new(Mutex::new(Vec::new()));
    let db = SupervisorSpec::builder("db")
        .child(idle("pool", counter(), stops.clone()))
        .build()
        .unwrap();
    let handle = SupervisorSpec::builder("app")
        .child(ChildSpec::supervisor(db))
        .child(idle("web", counter(), stops.clone()))
        .build()
        .unwrap()
        .start();
    handle
        .start_child(idle("cron", counter(), stops.clone()))
        .await
        .unwrap();
    let dup = handle
        .start_child(idle("web", counter(), stops.clone()))
        .await
        .unwrap_err();
    assert!(dup.to_string().contains("\"web\""), "{dup}");
    let tree = handle.children().await.unwrap();
    let json = serde_json::to_value(&tree).unwrap();
    assert_eq!(json[0]["name"], "db");
    assert_eq!(json[0]["kind"], "supervisor");
    assert_eq!(json[0]["state"], "running");
    assert_eq!(json[0]["restart"], "permanent");
    assert_eq!(json[0]["children"][0]["name"], "pool");
    assert_eq!(json[2]["name"], "cron");

    assert_eq!(
        handle.terminate_child("web").await.unwrap(),
        StopOutcome::Graceful
    );
    assert!(handle.terminate_child("nope").await.is_err());
    let states: Vec<ChildState> = handle
        .children()
        .await
        .unwrap()
        .iter()
        .map(|c| c.state)
        .collect();
    assert_eq!(
        states,
        vec![
            ChildState::Running,
            ChildState::Stopped,
            ChildState::Running
        ]
    );
    let report = handle.shutdown().await;
    let names: Vec<&str> = report.children.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, vec!["cron", "web", "db"]);
    assert_eq!(*stops.lock(), vec!["web", "cron", "pool"]);
}

#[tokio::test(start_paused = true)]
async fn tree_events_can_be_forwarded_to_the_runtime_bus() {
    let system = architectlm_core::System::builder("s").build().unwrap();
    let runtime = architectlm_core::Runtime::builder(system)
        .start()
        .await
        .unwrap();
    let mut bus = runtime.subscribe("child-exited");
    let handle = SupervisorSpec::builder("app")
        .child(fails_once("flaky", counter()))
        .build()
        .unwrap()
        .start();
    let _forwarding = handle.forward_to(&runtime);
    let event = next(&mut bus).await;
    assert_eq!(event.source, "supervisor");
    assert_eq!(event.payload["supervisor"], "app");
    assert_eq!(event.payload["child"], "flaky");
    assert_eq!(event.payload["reason"]["kind"], "failed");
    assert_eq!(event.payload["reason"]["error"], "first run fails");
    handle.shutdown().await;
}
