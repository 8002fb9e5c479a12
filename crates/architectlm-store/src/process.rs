//! Durable storage of process instances (the core `ProcessStore` contract) on SQLite.
