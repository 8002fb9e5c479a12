//! Storage of scheduled entries and their runs.
