//! Storage of saga definitions versions, instances and the step journal.
