//! Versioned schema changes, shared by every backend.
//!
//! Each component (`process`, `lease`, `saga`, `scheduler`, ...) declares its tables as a static
//! list of [`Migration`]s. A backend applies the versions it has not applied yet, in increasing
//! order, and records each in its `architectlm_migrations` table, so applying the same list again
//! is a no-op. The SQL of a migration is backend-specific: a component that supports SQLite and
//! PostgreSQL keeps one list per backend under the same component name.

/// A versioned schema change of one component (`saga`, `scheduler`, ...).
///
/// ```
/// use architectlm_store::migration::Migration;
///
/// static ITEMS: &[Migration] = &[Migration {
///     component: "items",
///     version: 1,
///     description: "items table",
///     sql: "CREATE TABLE items (id BIGINT PRIMARY KEY, v TEXT NOT NULL)",
/// }];
/// assert_eq!(ITEMS[0].version, 1);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// The component owning the tables.
    pub component: &'static str,
    /// Versions apply in increasing order, each once.
    pub version: u32,
    /// What it does.
    pub description: &'static str,
    /// The SQL (several statements allowed).
    pub sql: &'static str,
}

/// The migrations in the order they apply: by component, then version.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub(crate) fn ordered(migrations: &[Migration]) -> Vec<&Migration> {
    let mut sorted: Vec<&Migration> = migrations.iter().collect();
    sorted.sort_by_key(|m| (m.component, m.version));
    sorted
}
