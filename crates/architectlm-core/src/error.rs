//! The one error type of the core crate, shared by the extension contracts.
//!
//! Every message names the offending id or value, so a log line is enough to find the cause.

use std::time::Duration;

/// A boxed error from a lower layer (a database driver, an I/O error) that is not part of the
/// public API.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in ArchitectLM's core and its extension contracts.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A system, process or task definition is invalid; the message names what is wrong.
    #[error("invalid definition: {0}")]
    Definition(String),

    /// A configuration value is out of range or inconsistent.
    #[error("invalid configuration: {field} = {value}: {reason}")]
    InvalidConfig {
        /// The field, such as `capacity` or `thresholds.warning`.
        field: String,
        /// The rejected value, rendered for humans.
        value: String,
        /// Why it was rejected.
        reason: String,
    },

    /// An input given to an operation was rejected.
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// A named thing does not exist.
    #[error("unknown {kind} \"{id}\"")]
    NotFound {
        /// What kind of thing: `task`, `process`, `process instance`, `saga definition`, ...
        kind: &'static str,
        /// The id that was looked up.
        id: String,
    },

    /// The current state of a process instance does not accept the event.
    #[error(
        "process instance {instance_id} in state \"{state}\" does not accept event \"{event}\""
    )]
    InvalidTransition {
        /// The instance.
        instance_id: uuid::Uuid,
        /// Its current state.
        state: String,
        /// The event that was sent.
        event: String,
    },

    /// Transitions exist for the event, but every guard rejected it.
    #[error(
        "process instance {instance_id} in state \"{state}\": every guard rejected event \"{event}\""
    )]
    GuardRejected {
        /// The instance.
        instance_id: uuid::Uuid,
        /// Its current state.
        state: String,
        /// The event that was sent.
        event: String,
    },

    /// An optimistic-concurrency check failed: somebody else wrote the record first.
    #[error("conflict on {kind} {id}: expected version {expected}, found {actual}")]
    Conflict {
        /// What kind of record.
        kind: &'static str,
        /// Its id.
        id: String,
        /// The version the writer read.
        expected: u64,
        /// The version in the store.
        actual: u64,
    },

    /// A task failed (after its retries).
    #[error("task \"{task_id}\" failed: {error}")]
    TaskFailed {
        /// The task.
        task_id: String,
        /// The failure of its last attempt.
        error: crate::task::TaskError,
    },

    /// An extension is enabled in the system but no service was given for it.
    #[error("extension \"{0}\" is enabled but no service is configured for it")]
    ExtensionNotConfigured(&'static str),

    /// A task asked for a service that is not configured.
    #[error("service \"{0}\" is not configured")]
    ServiceNotConfigured(String),

    /// The runtime is shutting down and accepts no new work.
    #[error("the runtime is shutting down")]
    ShuttingDown,

    /// An operation did not finish in time.
    #[error("{what} timed out after {after:?}")]
    Timeout {
        /// What timed out.
        what: String,
        /// The limit that was exceeded.
        after: Duration,
    },

    /// A resource (of the load manager) refused the work: circuit open, capacity or queue full.
    #[error("resource \"{id}\" unavailable: {reason}")]
    Unavailable {
        /// The resource id.
        id: String,
        /// Why it refused.
        reason: String,
    },

    /// A storage backend failed.
    #[error("storage error: {0}")]
    Storage(#[source] BoxError),

    /// A stored record could not be decoded (corrupt, or written by a version that allowed
    /// values nested too deep to read back). Lists and recoveries skip such a record and
    /// report it (see [`UnreadableRecord`](crate::store::UnreadableRecord)); a read of that
    /// one record fails with this error.
    #[error("stored {kind} {id} cannot be read: {source}")]
    UnreadableRecord {
        /// What kind of record: `saga instance`, `scheduled task`, `process instance`, ...
        kind: &'static str,
        /// Its id.
        id: String,
        /// Why it cannot be decoded (a `serde_json` error, a value out of range, ...).
        #[source]
        source: BoxError,
    },

    /// (De)serialising a value failed.
    #[error("serialization error: {0}")]
    Serialization(#[from] serde_json::Error),

    /// A value could not be encoded or decoded; names which value (such as `output of task
    /// "charge" as my_app::Receipt`) and keeps serde's error as its source.
    #[error("cannot {action} the {what}: {source}")]
    Codec {
        /// `encode` or `decode`.
        action: &'static str,
        /// Which value.
        what: String,
        /// serde's error.
        #[source]
        source: serde_json::Error,
    },

    /// An extension implementation failed in a way of its own.
    #[error("{extension}: {source}")]
    Extension {
        /// The extension, such as `saga-coordinator`.
        extension: &'static str,
        /// The underlying error.
        #[source]
        source: BoxError,
    },
}

impl Error {
    /// A definition error with the given message.
    pub fn definition(message: impl Into<String>) -> Self {
        Self::Definition(message.into())
    }

    /// A not-found error.
    pub fn not_found(kind: &'static str, id: impl ToString) -> Self {
        Self::NotFound {
            kind,
            id: id.to_string(),
        }
    }

    /// An invalid-configuration error naming the field and the value.
    pub fn invalid_config(
        field: impl Into<String>,
        value: impl std::fmt::Display,
        reason: impl Into<String>,
    ) -> Self {
        Self::InvalidConfig {
            field: field.into(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    /// Wraps a storage backend error.
    pub fn storage(error: impl Into<BoxError>) -> Self {
        Self::Storage(error.into())
    }

    /// Wraps a storage backend error with what was being done, keeping the error as the
    /// source of a [`Context`].
    pub fn storage_with(what: impl Into<String>, error: impl Into<BoxError>) -> Self {
        Self::Storage(Box::new(Context {
            what: what.into(),
            source: error.into(),
        }))
    }

    /// A value that could not be decoded (`what` names it).
    pub fn decode(what: impl Into<String>, source: serde_json::Error) -> Self {
        Self::Codec {
            action: "decode",
            what: what.into(),
            source,
        }
    }

    /// A value that could not be encoded (`what` names it).
    pub fn encode(what: impl Into<String>, source: serde_json::Error) -> Self {
        Self::Codec {
            action: "encode",
            what: what.into(),
            source,
        }
    }
}

/// A lower layer's error with what was being done when it happened, such as `cannot get a
/// PostgreSQL connection to 127.0.0.1:5432/app`; the error stays its [`source`](std::error::Error::source).
#[derive(Debug)]
pub struct Context {
    what: String,
    source: BoxError,
}

impl std::fmt::Display for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.what, self.source)
    }
}

impl std::error::Error for Context {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// `Result` with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
