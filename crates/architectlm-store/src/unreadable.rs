//! Records that cannot be decoded.
//!
//! A stored row that fails to decode (corrupt, or holding a value nested deeper than
//! `serde_json` reads back) must not make the rest unreadable. Every durable store therefore
//! skips such a row in its lists and recoveries, logs a `tracing` warning naming its id and the
//! decode error, and hands an [`UnreadableRecord`] to the listeners given to it
//! (`on_unreadable`); a direct read of the row fails with [`Error::UnreadableRecord`] naming
//! the id, the decode error as its source.

use std::fmt;
use std::sync::Arc;

use architectlm_core::store::{UnreadableListener, UnreadableRecord};
use parking_lot::RwLock;

use crate::Error;

/// The listeners of one store (shared by its clones).
#[derive(Clone, Default)]
pub(crate) struct Reports {
    listeners: Arc<RwLock<Vec<UnreadableListener>>>,
}

impl fmt::Debug for Reports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reports")
            .field("listeners", &self.listeners.read().len())
            .finish()
    }
}

impl Reports {
    /// Adds a listener.
    pub(crate) fn add(&self, listener: UnreadableListener) {
        self.listeners.write().push(listener);
    }

    /// Logs and reports a record that a list or a recovery skipped.
    pub(crate) fn skipped(&self, kind: &'static str, id: &str, error: &Error) {
        tracing::warn!(kind, id, %error, "skipping a stored record that cannot be decoded");
        let listeners = self.listeners.read().clone();
        if listeners.is_empty() {
            return;
        }
        let record = UnreadableRecord::new(kind, id, error.to_string());
        for l in &listeners {
            l(&record);
        }
    }

    /// Keeps the decoded records of `rows` and reports the others. `decode` returns the id
    /// of a row with its decoded record or decode error.
    pub(crate) fn keep<R, T>(
        &self,
        kind: &'static str,
        rows: impl IntoIterator<Item = R>,
        mut decode: impl FnMut(R) -> (String, Result<T, Error>),
    ) -> Vec<T> {
        let mut out = Vec::new();
        for r in rows {
            match decode(r) {
                (_, Ok(t)) => out.push(t),
                (id, Err(e)) => self.skipped(kind, &id, &e),
            }
        }
        out
    }
}

/// The error of a direct read of a record that cannot be decoded.
pub(crate) fn unreadable(kind: &'static str, id: impl ToString, error: Error) -> Error {
    Error::UnreadableRecord {
        kind,
        id: id.to_string(),
        source: Box::new(error),
    }
}
