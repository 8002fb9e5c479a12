//! PostgreSQL helpers for the cluster tests: the URL from `DATABASE_URL` (or a skip), a pool on
//! a schema of the test's own, and dropping that schema afterwards.

use architectlm_store::postgres::{PgDb, PgOptions};

/// `DATABASE_URL`, or `None` after saying that `test` is skipped.
pub(crate) fn database_url(test: &str) -> Option<String> {
    match std::env::var("DATABASE_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            eprintln!("{test}: skipped: DATABASE_URL not set");
            None
        }
    }
}

/// A pool of `pool` connections whose tables live in `schema`.
pub(crate) async fn connect(url: &str, schema: &str, pool: usize) -> PgDb {
    open(PgOptions::new(url).schema(schema).pool_size(pool)).await
}

/// Like [`connect`], with the connections named `application_name` in `pg_stat_activity`.
pub(crate) async fn connect_named(
    url: &str,
    schema: &str,
    pool: usize,
    application_name: &str,
) -> PgDb {
    open(
        PgOptions::new(url)
            .schema(schema)
            .pool_size(pool)
            .application_name(application_name),
    )
    .await
}

async fn open(options: PgOptions) -> PgDb {
    PgDb::connect(options)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Drops `schema` and everything in it.
pub(crate) async fn drop_schema(url: &str, schema: &str) {
    let db = PgDb::connect_url(url)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    db.client()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .batch_execute(&format!(
            "SET lock_timeout = '5s'; DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
        ))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}
