//! Maps keyed by entry ids, with foldhash's seeded fast hashing: several times cheaper than the
//! standard SipHash on every insert, cancel and firing, and still unpredictable per map.

use std::collections::HashMap;

use uuid::Uuid;

/// A map keyed by entry id.
pub(crate) type IdMap<V> = HashMap<Uuid, V, foldhash::fast::RandomState>;
