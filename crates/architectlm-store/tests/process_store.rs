//! Durable process instances: the conformance suite on every backend, two runtimes ("nodes")
//! racing on one PostgreSQL instance, and a SQLite store surviving SIGKILL.

mod support;

use std::sync::Arc;

use architectlm_core::store::InMemoryProcessStore;

use support::conformance::process_store_conformance;

#[tokio::test]
async fn in_memory_store_conforms() {
    process_store_conformance(Arc::new(InMemoryProcessStore::new())).await;
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_conforms() {
    use architectlm_store::process::SqliteProcessStore;
    use architectlm_store::sqlite::{SqliteDb, SqliteOptions};

    let dir = std::env::temp_dir().join(format!("alm-proc-{}", uuid::Uuid::new_v4()));
    let db = SqliteDb::open(SqliteOptions::file(dir.join("db.sqlite"))).unwrap();
    let store = SqliteProcessStore::open(db).await.unwrap();
    process_store_conformance(Arc::new(store)).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_conforms() {
    use architectlm_store::process::PgProcessStore;

    let Some(url) = support::database_url("postgres_store_conforms") else {
        return;
    };
    let schema = support::TestSchema::new(&url);
    let store = PgProcessStore::open(schema.connect().await).await.unwrap();
    process_store_conformance(Arc::new(store)).await;
    schema.drop().await;
}

#[cfg(feature = "postgres")]
mod two_nodes {
    //! Two runtimes ("nodes") sharing one PostgreSQL store race on the same instance.

    use std::sync::atomic::{AtomicUsize, Ordering};

    use architectlm_core::store::ProcessStore;
    use architectlm_core::{
        Error, Guard, ProcessDefinition, Runtime, System, TransitionDefinition,
    };
    use serde_json::json;

    use super::*;

    /// A process whose one transition ("add", a self-loop) waits at a barrier in its guard the
    /// first time each node evaluates it, so both nodes have read the same version before either
    /// writes.
    fn racing_system(barrier: Arc<tokio::sync::Barrier>, waits: Arc<AtomicUsize>) -> System {
        let guard = Guard::new(move |_input| {
            let barrier = barrier.clone();
            let waits = waits.clone();
            async move {
                if waits.fetch_add(1, Ordering::SeqCst) < 2 {
                    barrier.wait().await;
                }
                true
            }
        });
        let counter = ProcessDefinition::builder("counter")
            .initial_state("open")
            .final_state("closed")
            .transition(TransitionDefinition::new("open", "open", "add").guard(guard))
            .transition(TransitionDefinition::new("open", "closed", "close"))
            .build()
            .unwrap();
        System::builder("race").process(counter).build().unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_nodes_racing_on_one_instance_one_wins_and_nothing_is_lost() {
        use architectlm_store::process::PgProcessStore;

        let Some(url) = support::database_url("two_nodes_racing_on_one_instance") else {
            return;
        };
        let schema = support::TestSchema::new(&url);
        // Each node has its own pool and store object, as separate machines would.
        let store_a = Arc::new(PgProcessStore::open(schema.connect().await).await.unwrap());
        let store_b = Arc::new(PgProcessStore::open(schema.connect().await).await.unwrap());
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let waits = Arc::new(AtomicUsize::new(0));
        let node_a = Runtime::builder(racing_system(barrier.clone(), waits.clone()))
            .process_store(store_a.clone())
            .start()
            .await
            .unwrap();
        let node_b = Runtime::builder(racing_system(barrier, waits))
            .process_store(store_b.clone())
            .start()
            .await
            .unwrap();

        let created = node_a.create_process("counter", json!({})).await.unwrap();
        let id = created.id;
        let (ra, rb) = tokio::join!(
            node_a.transition_process(id, "add", json!({"from_a": 1})),
            node_b.transition_process(id, "add", json!({"from_b": 1})),
        );

        // Exactly one node wins; the other is told who and which versions.
        let (winner_key, loser_key, loser, loser_err) = match (ra, rb) {
            (Ok(_), Err(e)) => ("from_a", "from_b", &node_b, e),
            (Err(e), Ok(_)) => ("from_b", "from_a", &node_a, e),
            (a, b) => panic!("expected one winner and one conflict, got {a:?} and {b:?}"),
        };
        match &loser_err {
            Error::Conflict {
                kind,
                id: got,
                expected,
                actual,
            } => {
                assert_eq!(*kind, "process instance");
                assert_eq!(got, &id.to_string());
                assert_eq!((*expected, *actual), (1, 2));
            }
            other => panic!("expected a conflict, got {other:?}"),
        }
        let msg = loser_err.to_string();
        assert!(
            msg.contains(&id.to_string()) && msg.contains("version 1") && msg.contains('2'),
            "{msg}"
        );

        // The winner's write is stored; the loser retries on fresh state and both writes survive.
        let stored = store_b.get(id).await.unwrap().unwrap();
        assert_eq!(stored.version, 2);
        assert_eq!(stored.context[winner_key], 1);
        assert!(stored.context.get(loser_key).is_none());
        let retried = loser
            .transition_process(id, "add", json!({loser_key: 1}))
            .await
            .unwrap();
        assert_eq!(retried.instance.version, 3);
        let stored = store_a.get(id).await.unwrap().unwrap();
        assert_eq!(stored.version, 3);
        assert_eq!(stored.context["from_a"], 1);
        assert_eq!(stored.context["from_b"], 1);
        // Both nodes see the same instance.
        assert_eq!(
            node_a.get_process(id).await.unwrap(),
            node_b.get_process(id).await.unwrap()
        );
        schema.drop().await;
    }
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod crash {
    //! The child creates and transitions instances (in a SQLite file, or a PostgreSQL schema)
    //! and prints each one it got `Ok` for; the parent kills it with SIGKILL and checks every
    //! acknowledged write survived and no row is torn.

    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    use architectlm_core::store::{ProcessQuery, ProcessStore};
    use architectlm_core::{ProcessDefinition, Runtime, System, TransitionDefinition};
    use serde_json::json;

    use super::*;

    const CHILD_ENV: &str = "ARCHITECTLM_PROCESS_CRASH_CHILD";
    const ACKED: usize = 300;

    fn system() -> System {
        let p = ProcessDefinition::builder("order")
            .initial_state("created")
            .state("paid")
            .final_state("shipped")
            .transition(TransitionDefinition::new("created", "paid", "pay"))
            .transition(TransitionDefinition::new("paid", "shipped", "ship"))
            .build()
            .unwrap();
        System::builder("crash").process(p).build().unwrap()
    }

    /// Opens the store named by `spec`: `sqlite:<path>` or `pg:<schema>` (with `DATABASE_URL`).
    async fn open(spec: &str) -> Arc<dyn ProcessStore> {
        if let Some(_path) = spec.strip_prefix("sqlite:") {
            #[cfg(feature = "sqlite")]
            {
                use architectlm_store::process::SqliteProcessStore;
                use architectlm_store::sqlite::{SqliteDb, SqliteOptions};
                let db = SqliteDb::open(SqliteOptions::file(_path)).unwrap();
                return Arc::new(SqliteProcessStore::open(db).await.unwrap());
            }
        }
        if let Some(_schema) = spec.strip_prefix("pg:") {
            #[cfg(feature = "postgres")]
            {
                use architectlm_store::postgres::{PgDb, PgOptions};
                use architectlm_store::process::PgProcessStore;
                let url = std::env::var("DATABASE_URL").unwrap();
                let db = PgDb::connect(PgOptions::new(url).schema(_schema))
                    .await
                    .unwrap();
                return Arc::new(PgProcessStore::open(db).await.unwrap());
            }
        }
        panic!("unknown store {spec:?}")
    }

    async fn child(spec: String) {
        let rt = Runtime::builder(system())
            .process_store(open(&spec).await)
            .start()
            .await
            .unwrap();
        let mut n = 0u64;
        loop {
            let mut batch = Vec::new();
            for _ in 0..16 {
                let rt = rt.clone();
                batch.push(tokio::spawn(async move {
                    let i = rt.create_process("order", json!({"n": n})).await.unwrap();
                    rt.transition_process(i.id, "pay", json!({})).await.unwrap();
                    i.id
                }));
                n += 1;
            }
            for t in batch {
                let id = t.await.unwrap();
                // Printed only once both writes returned Ok.
                println!("paid {id}");
            }
        }
    }

    /// Runs the child on `spec`, kills it after `ACKED` acknowledged instances, and checks
    /// the store.
    async fn crash_and_check(test: &str, spec: &str) {
        let mut proc = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, spec)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = proc.stdout.take().unwrap();
        let acked = tokio::task::spawn_blocking(move || {
            let mut acked = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(id) = line.strip_prefix("paid ") {
                    acked.push(uuid::Uuid::parse_str(id.trim()).unwrap());
                    if acked.len() == ACKED {
                        break;
                    }
                }
            }
            acked
        })
        .await
        .unwrap();
        // Killed mid-work: the child keeps creating and paying while we kill it.
        proc.kill().unwrap();
        proc.wait().unwrap();
        assert_eq!(acked.len(), ACKED, "the child stopped early");

        let store = open(spec).await;
        for id in &acked {
            let i = store
                .get(*id)
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("acknowledged instance {id} lost"));
            assert_eq!(
                i.state.as_ref(),
                "paid",
                "instance {id} lost its transition"
            );
            assert_eq!(i.version, 2);
        }
        // Whatever was not acknowledged is still a consistent instance, never a torn row.
        let all = store.list(&ProcessQuery::process("order")).await.unwrap();
        assert!(all.len() >= ACKED);
        for i in all {
            assert!(
                (i.state.as_ref(), i.version) == ("created", 1)
                    || (i.state.as_ref(), i.version) == ("paid", 2),
                "inconsistent instance {i:?}"
            );
        }
    }

    #[cfg(feature = "sqlite")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acknowledged_instances_survive_sigkill() {
        if let Ok(spec) = std::env::var(CHILD_ENV) {
            child(spec).await;
            return;
        }
        let dir = std::env::temp_dir().join(format!("alm-proc-crash-{}", uuid::Uuid::new_v4()));
        let spec = format!("sqlite:{}", dir.join("db.sqlite").display());
        crash_and_check("crash::acknowledged_instances_survive_sigkill", &spec).await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[cfg(feature = "postgres")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_acknowledged_instances_survive_sigkill() {
        if let Ok(spec) = std::env::var(CHILD_ENV) {
            child(spec).await;
            return;
        }
        let Some(url) = support::database_url("postgres_acknowledged_instances_survive_sigkill")
        else {
            return;
        };
        let schema = support::TestSchema::new(&url);
        let spec = format!("pg:{}", schema.name);
        crash_and_check(
            "crash::postgres_acknowledged_instances_survive_sigkill",
            &spec,
        )
        .await;
        schema.drop().await;
    }
}
