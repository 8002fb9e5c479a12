//! Shared helpers of the store's integration tests: a private PostgreSQL schema per test, and
//! the process-store conformance suite every backend must pass.
// Each test file uses a different subset of these helpers.
#![allow(dead_code)]

pub(crate) mod conformance;

#[cfg(feature = "postgres")]
use architectlm_store::postgres::{PgDb, PgOptions};

/// The test database URL, or `None` (after saying so) when `DATABASE_URL` is not set.
pub(crate) fn database_url(test: &str) -> Option<String> {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("{test}: skipped: DATABASE_URL not set");
            None
        }
    }
}

#[cfg(feature = "postgres")]
/// A schema of its own for one test, so tests run in parallel and repeatedly without seeing
/// each other's rows. Dropped by [`TestSchema::drop`] at the end of a passing test, and on a
/// best-effort basis when a failing test unwinds.
pub(crate) struct TestSchema {
    pub(crate) url: String,
    pub(crate) name: String,
    dropped: bool,
}

#[cfg(feature = "postgres")]
impl TestSchema {
    pub(crate) fn new(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            name: format!("t_{}", uuid::Uuid::new_v4().simple()),
            dropped: false,
        }
    }

    pub(crate) fn options(&self) -> PgOptions {
        PgOptions::new(&self.url).schema(&self.name)
    }

    pub(crate) async fn connect(&self) -> PgDb {
        PgDb::connect(self.options())
            .await
            .expect("connect to the test database")
    }

    pub(crate) async fn drop(mut self) {
        drop_schema(&self.url, &self.name)
            .await
            .expect("drop the test schema");
        self.dropped = true;
    }
}

#[cfg(feature = "postgres")]
async fn drop_schema(url: &str, name: &str) -> architectlm_store::Result<()> {
    let db = PgDb::connect_url(url).await?;
    // A failed test may leave a transaction open on a table of the schema; give up rather
    // than wait for it forever.
    db.client()
        .await?
        .batch_execute(&format!(
            "SET lock_timeout = '5s'; DROP SCHEMA IF EXISTS \"{name}\" CASCADE"
        ))
        .await
        .map_err(architectlm_store::Error::storage)
}

#[cfg(feature = "postgres")]
impl Drop for TestSchema {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        // The test is unwinding: drop the schema from a thread with its own runtime.
        let (url, name) = (self.url.clone(), self.name.clone());
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(drop_schema(&url, &name))
                .map_err(|e| e.to_string())
        })
        .join();
        if !matches!(done, Ok(Ok(()))) {
            eprintln!("could not drop test schema {}: {done:?}", self.name);
        }
    }
}
