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
/// each other's rows. Dropped by [`TestSchema::drop`] at the end of a passing test.
pub(crate) struct TestSchema {
    pub(crate) url: String,
    pub(crate) name: String,
}

#[cfg(feature = "postgres")]
impl TestSchema {
    pub(crate) fn new(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            name: format!("t_{}", uuid::Uuid::new_v4().simple()),
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

    pub(crate) async fn drop(self) {
        let db = PgDb::connect_url(&self.url).await.expect("connect");
        db.client()
            .await
            .expect("client")
            .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.name))
            .await
            .expect("drop the test schema");
    }
}
