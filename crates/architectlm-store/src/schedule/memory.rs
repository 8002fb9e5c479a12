//! Scheduled entries and run claims in memory, in a compact form.
//!
//! Each entry is one [`Record`] in a chunked slab (no copy of the whole table when it grows,
//! and at most one partly used chunk), found by id through a map of slab positions. A record
//! keeps what every entry has inline and shares what entries have in common: task ids and
//! policies are interned (`Arc`), and the rarely set parts (pattern, time zone, description,
//! metadata, last result, history, limits) live in one optional box, absent for a fresh one-shot
//! entry. The input is kept as given.
//!
//! Ended entries (completed, failed, cancelled) stay queryable; past the newest
//! [`keep_ended`](InMemoryScheduleStore::keep_ended) of them, the oldest are removed as others
//! end (at most two per ending, each in place: its slab place is freed for reuse and a slab
//! chunk left empty gives its memory back; the index keeps its size until
//! [`forget_finished`](InMemoryScheduleStore::forget_finished), as shrinking it would stall the
//! store).

use std::collections::VecDeque;
use std::sync::Arc;

use architectlm_core::extensions::scheduler::RunRecord;

use super::*;

/// Seeded fast hashing for maps keyed by entry id (several times cheaper than SipHash).
type IdHash = foldhash::fast::RandomState;

/// Mixes id bits when choosing a shard.
const MIX: u64 = 0x9E37_79B9_7F4A_7C15;

/// Records per slab chunk.
const CHUNK: usize = 1024;

/// Distinct task ids and policies shared at most; past this, new values are simply not shared.
const INTERN_LIMIT: usize = 4096;
const POLICY_LIMIT: usize = 32;

/// The rarely set parts of an entry.
#[derive(Debug, Clone, Default, PartialEq)]
struct Cold {
    executed_at: Option<DateTime<Utc>>,
    pattern: Option<String>,
    timezone: Option<String>,
    result: Option<Value>,
    error: Option<String>,
    description: Option<String>,
    metadata: serde_json::Map<String, Value>,
    history: Vec<RunRecord>,
    start_at: Option<DateTime<Utc>>,
    end_at: Option<DateTime<Utc>>,
    max_executions: Option<u32>,
    jitter: Option<Duration>,
}

impl Cold {
    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// One stored entry.
#[derive(Debug, Clone)]
struct Record {
    id: Uuid,
    task_id: Arc<str>,
    input: Value,
    execute_at: DateTime<Utc>,
    next: Option<DateTime<Utc>>,
    version: u64,
    policy: Arc<SchedulePolicy>,
    cold: Option<Box<Cold>>,
    execution_count: u32,
    remaining: Option<u32>,
    status: ScheduledTaskStatus,
}

impl Record {
    fn to_entry(&self) -> ScheduleEntry {
        let cold = self.cold.as_deref().cloned().unwrap_or_default();
        let mut task =
            ScheduledTask::new(self.id, &*self.task_id, self.input.clone(), self.execute_at);
        task.status = self.status;
        task.executed_at = cold.executed_at;
        task.next_execution_at = self.next;
        task.pattern = cold.pattern;
        task.timezone = cold.timezone;
        task.remaining_executions = self.remaining;
        task.execution_count = self.execution_count;
        task.result = cold.result;
        task.error = cold.error;
        task.description = cold.description;
        task.metadata = cold.metadata;
        task.history = cold.history;
        ScheduleEntry {
            task,
            policy: (*self.policy).clone(),
            start_at: cold.start_at,
            end_at: cold.end_at,
            max_executions: cold.max_executions,
            jitter: cold.jitter,
            version: self.version,
        }
    }

    fn is_recurring(&self) -> bool {
        self.cold.as_ref().is_some_and(|c| c.pattern.is_some())
    }

    fn is_active(&self) -> bool {
        matches!(
            self.status,
            ScheduledTaskStatus::Scheduled
                | ScheduledTaskStatus::Running
                | ScheduledTaskStatus::Paused
        )
    }

    fn next_key(&self) -> i64 {
        self.next.map_or(i64::MAX, |t| t.timestamp_millis())
    }
}

/// Makes `to` equal to `from`, copying only the runs added at its end when `from` is `to` with
/// runs dropped from its front and added at its back (the usual change of a history).
fn sync_history(to: &mut Vec<RunRecord>, from: &[RunRecord]) {
    if to.as_slice() == from {
        return;
    }
    for k in 0..=to.len() {
        let kept = &to[k..];
        if kept.len() <= from.len() && from[..kept.len()] == *kept {
            let added = &from[kept.len()..];
            to.drain(..k);
            to.extend_from_slice(added);
            return;
        }
    }
    // Not reached: with every run dropped (`k == to.len()`), what is kept is a prefix.
}

/// Shares task ids and policies between records.
#[derive(Default)]
struct Interner {
    task_ids: std::collections::HashSet<Arc<str>, IdHash>,
    /// The task id interned last: entries come in batches of one task more often than not.
    last_task_id: Option<Arc<str>>,
    policies: Vec<Arc<SchedulePolicy>>,
}

impl Interner {
    fn task_id(&mut self, s: String) -> Arc<str> {
        if let Some(last) = &self.last_task_id
            && **last == *s
        {
            return last.clone();
        }
        let a = match self.task_ids.get(s.as_str()) {
            Some(a) => a.clone(),
            None => {
                let a: Arc<str> = Arc::from(s);
                if self.task_ids.len() < INTERN_LIMIT {
                    self.task_ids.insert(a.clone());
                }
                a
            }
        };
        self.last_task_id = Some(a.clone());
        a
    }

    fn policy(&mut self, p: SchedulePolicy) -> Arc<SchedulePolicy> {
        if let Some(a) = self.policies.iter().find(|a| ***a == p) {
            return a.clone();
        }
        let a = Arc::new(p);
        if self.policies.len() < POLICY_LIMIT {
            self.policies.push(a.clone());
        }
        a
    }

    /// A record of `e` replacing `old`: parts equal to `old`'s are shared with it, and only
    /// what differs is copied.
    fn record_ref(&mut self, e: &ScheduleEntry, old: &mut Record) -> Record {
        let t = &e.task;
        let task_id = if *old.task_id == *t.task_id {
            old.task_id.clone()
        } else {
            self.task_id(t.task_id.clone())
        };
        let policy = if *old.policy == e.policy {
            old.policy.clone()
        } else {
            self.policy(e.policy.clone())
        };
        let cold_empty = t.executed_at.is_none()
            && t.pattern.is_none()
            && t.timezone.is_none()
            && t.result.is_none()
            && t.error.is_none()
            && t.description.is_none()
            && t.metadata.is_empty()
            && t.history.is_empty()
            && e.start_at.is_none()
            && e.end_at.is_none()
            && e.max_executions.is_none()
            && e.jitter.is_none();
        // The rare parts are updated in place: only what changed is copied.
        let cold = if cold_empty {
            None
        } else {
            let mut c = old.cold.take().unwrap_or_default();
            fn sync<T: Clone + PartialEq>(to: &mut T, from: &T) {
                if to != from {
                    to.clone_from(from);
                }
            }
            c.executed_at = t.executed_at;
            sync(&mut c.pattern, &t.pattern);
            sync(&mut c.timezone, &t.timezone);
            sync(&mut c.result, &t.result);
            sync(&mut c.error, &t.error);
            sync(&mut c.description, &t.description);
            sync(&mut c.metadata, &t.metadata);
            sync_history(&mut c.history, &t.history);
            c.start_at = e.start_at;
            c.end_at = e.end_at;
            c.max_executions = e.max_executions;
            c.jitter = e.jitter;
            Some(c)
        };
        // The input rarely changes: keep the stored one rather than copy it again.
        let input = if old.input == t.input {
            std::mem::take(&mut old.input)
        } else {
            t.input.clone()
        };
        Record {
            id: t.id,
            task_id,
            input,
            execute_at: t.execute_at,
            next: t.next_execution_at,
            version: e.version,
            policy,
            cold,
            execution_count: t.execution_count,
            remaining: t.remaining_executions,
            status: t.status,
        }
    }

    /// A record of a new entry.
    fn record(&mut self, e: ScheduleEntry, old: Option<&Record>) -> Record {
        let ScheduleEntry {
            task,
            policy,
            start_at,
            end_at,
            max_executions,
            jitter,
            version,
        } = e;
        let task_id = match old {
            Some(o) if *o.task_id == *task.task_id => o.task_id.clone(),
            _ => self.task_id(task.task_id),
        };
        let policy = match old {
            Some(o) if *o.policy == policy => o.policy.clone(),
            _ => self.policy(policy),
        };
        let cold = Cold {
            executed_at: task.executed_at,
            pattern: task.pattern,
            timezone: task.timezone,
            result: task.result,
            error: task.error,
            description: task.description,
            metadata: task.metadata,
            history: task.history,
            start_at,
            end_at,
            max_executions,
            jitter,
        };
        Record {
            id: task.id,
            task_id,
            input: task.input,
            execute_at: task.execute_at,
            next: task.next_execution_at,
            version,
            policy,
            cold: (!cold.is_empty()).then(|| Box::new(cold)),
            execution_count: task.execution_count,
            remaining: task.remaining_executions,
            status: task.status,
        }
    }
}

/// A slab of records in fixed-size chunks. A chunk whose records are all removed gives its
/// memory back, and is allocated again when one of its places is reused.
#[derive(Default)]
struct Slab {
    chunks: Vec<Box<[Option<Record>]>>,
    /// Records in each chunk.
    live: Vec<u32>,
    free: Vec<u32>,
}

fn empty_chunk() -> Box<[Option<Record>]> {
    (0..CHUNK)
        .map(|_| None)
        .collect::<Vec<_>>()
        .into_boxed_slice()
}

impl Slab {
    fn get(&self, i: u32) -> Option<&Record> {
        let i = i as usize;
        self.chunks.get(i / CHUNK)?.get(i % CHUNK)?.as_ref()
    }

    fn get_mut(&mut self, i: u32) -> Option<&mut Record> {
        let i = i as usize;
        self.chunks.get_mut(i / CHUNK)?.get_mut(i % CHUNK)?.as_mut()
    }

    fn insert(&mut self, r: Record) -> u32 {
        let i = match self.free.pop() {
            Some(i) => i,
            None => {
                let i = self.chunks.len() * CHUNK;
                self.chunks.push(empty_chunk());
                self.live.push(0);
                self.free.extend((i + 1..i + CHUNK).rev().map(|k| k as u32));
                i as u32
            }
        };
        let (c, k) = (i as usize / CHUNK, i as usize % CHUNK);
        if self.chunks[c].is_empty() {
            self.chunks[c] = empty_chunk();
        }
        self.chunks[c][k] = Some(r);
        self.live[c] += 1;
        i
    }

    /// Takes the record at `i` out; its place is reused by a later insert.
    fn remove(&mut self, i: u32) -> Option<Record> {
        let (c, k) = (i as usize / CHUNK, i as usize % CHUNK);
        let r = self.chunks.get_mut(c)?.get_mut(k)?.take()?;
        self.free.push(i);
        self.live[c] -= 1;
        if self.live[c] == 0 {
            self.chunks[c] = Box::default();
        }
        Some(r)
    }

    fn iter(&self) -> impl Iterator<Item = &Record> {
        self.chunks.iter().flat_map(|c| c.iter().flatten())
    }
}

/// Slab positions by id: open addressing with linear probing, 8 bytes a place: the position
/// and 32 bits of the id's hash, which both choose the place and are compared before the
/// record is looked at (so growing never reads the records). A removal shifts the later places
/// of its probe run back (no tombstones).
#[derive(Default)]
struct Index {
    places: Vec<u64>,
    len: usize,
    hasher: IdHash,
}

const EMPTY: u64 = u64::MAX;

impl Index {
    fn hash(&self, id: &Uuid) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(id)
    }

    fn tag(h: u64) -> u64 {
        (h >> 32) << 32
    }

    fn find(&self, id: &Uuid, slab: &Slab) -> Option<u32> {
        self.find_place(id, slab).map(|(_, pos)| pos)
    }

    /// Makes room for `additional` more ids (a load of at most 7/8).
    fn reserve(&mut self, additional: usize) {
        let need = self.len + additional;
        if need * 8 <= self.places.len() * 7 {
            return;
        }
        let mut cap = self.places.len().max(16);
        while need * 8 > cap * 7 {
            cap *= 2;
        }
        let old = std::mem::replace(&mut self.places, vec![EMPTY; cap]);
        for p in old.into_iter().filter(|&p| p != EMPTY) {
            self.place(p, p as u32);
        }
    }

    fn place(&mut self, h: u64, pos: u32) {
        let mask = self.places.len() - 1;
        let mut i = (h >> 32) as usize & mask;
        while self.places[i] != EMPTY {
            i = (i + 1) & mask;
        }
        self.places[i] = Self::tag(h) | u64::from(pos);
    }

    /// Where `id` is: its place in the index and its slab position.
    fn find_place(&self, id: &Uuid, slab: &Slab) -> Option<(usize, u32)> {
        if self.places.is_empty() {
            return None;
        }
        let h = self.hash(id);
        let mask = self.places.len() - 1;
        let mut i = (h >> 32) as usize & mask;
        loop {
            let p = self.places[i];
            if p == EMPTY {
                return None;
            }
            if p & !0xFFFF_FFFF == Self::tag(h) {
                let pos = p as u32;
                if slab.get(pos).is_some_and(|r| r.id == *id) {
                    return Some((i, pos));
                }
            }
            i = (i + 1) & mask;
        }
    }

    /// Removes the id at place `hole` (from [`find_place`](Self::find_place)).
    fn remove_place(&mut self, mut hole: usize) {
        let mask = self.places.len() - 1;
        // A later place of the run moves into the hole unless its own ideal place lies
        // after the hole (cyclically), where a lookup would not look back.
        let mut j = (hole + 1) & mask;
        while self.places[j] != EMPTY {
            let p = self.places[j];
            let ideal = (p >> 32) as usize & mask;
            if hole.wrapping_sub(ideal) & mask <= j.wrapping_sub(ideal) & mask {
                self.places[hole] = p;
                hole = j;
            }
            j = (j + 1) & mask;
        }
        self.places[hole] = EMPTY;
        self.len -= 1;
    }

    /// Adds an id known to be absent.
    fn insert(&mut self, id: &Uuid, pos: u32) {
        self.reserve(1);
        let h = self.hash(id);
        self.place(h, pos);
        self.len += 1;
    }
}

/// Ended entries kept by default (see [`InMemoryScheduleStore::keep_ended`]).
const DEFAULT_KEEP_ENDED: usize = 10_000;

struct MemInner {
    index: Index,
    slab: Slab,
    interner: Interner,
    /// The kept runs of each entry, sorted by due time (a handful each: a sorted vector is
    /// smaller and faster than a tree).
    runs: Runs,
    /// Entries that ended (completed, failed or cancelled), in the order they did.
    ended: VecDeque<Uuid>,
    /// Ended entries kept at least; more are removed, oldest first, once they make up three
    /// quarters of the store.
    keep_ended: usize,
}

impl Default for MemInner {
    fn default() -> Self {
        Self {
            index: Index::default(),
            slab: Slab::default(),
            interner: Interner::default(),
            runs: Runs::default(),
            ended: VecDeque::new(),
            keep_ended: DEFAULT_KEEP_ENDED,
        }
    }
}

/// Shards of [`Runs`].
const RUN_SHARDS: usize = 256;

/// The kept runs of each entry, in shards by id. The table gains an entry at each entry's first
/// run, so it grows while timers fire; growing rehashes one small shard at a time instead of the
/// whole table under the store's lock (tens of milliseconds at a million entries).
struct Runs {
    shards: Box<[HashMap<Uuid, Vec<ScheduleRun>, IdHash>]>,
}

impl Default for Runs {
    fn default() -> Self {
        Self {
            shards: (0..RUN_SHARDS)
                .map(|_| HashMap::with_hasher(IdHash::default()))
                .collect(),
        }
    }
}

impl Runs {
    fn shard(&self, id: &Uuid) -> &HashMap<Uuid, Vec<ScheduleRun>, IdHash> {
        &self.shards[Self::shard_of(id)]
    }

    fn shard_mut(&mut self, id: &Uuid) -> &mut HashMap<Uuid, Vec<ScheduleRun>, IdHash> {
        &mut self.shards[Self::shard_of(id)]
    }

    /// The top bits of a mix of all the id's bits (ids need not be random).
    fn shard_of(id: &Uuid) -> usize {
        let (a, b) = id.as_u64_pair();
        ((a ^ b.rotate_left(32)).wrapping_mul(MIX) >> 56) as usize % RUN_SHARDS
    }

    fn entry(&mut self, id: Uuid) -> &mut Vec<ScheduleRun> {
        self.shard_mut(&id).entry(id).or_default()
    }

    fn get(&self, id: &Uuid) -> Option<&Vec<ScheduleRun>> {
        self.shard(id).get(id)
    }

    fn get_mut(&mut self, id: &Uuid) -> Option<&mut Vec<ScheduleRun>> {
        self.shard_mut(id).get_mut(id)
    }

    fn remove(&mut self, id: &Uuid) -> Option<Vec<ScheduleRun>> {
        self.shard_mut(id).remove(id)
    }

    fn iter(&self) -> impl Iterator<Item = (&Uuid, &Vec<ScheduleRun>)> {
        self.shards.iter().flat_map(|s| s.iter())
    }

    fn shrink_to_fit(&mut self) {
        for s in &mut self.shards {
            s.shrink_to_fit();
        }
    }
}

/// Where the run due at `key` (milliseconds) is or would go.
fn run_at(runs: &[ScheduleRun], key: i64) -> std::result::Result<usize, usize> {
    runs.binary_search_by_key(&key, |r| r.due_at.timestamp_millis())
}

impl MemInner {
    fn record(&self, id: Uuid) -> Option<&Record> {
        self.slab.get(self.index.find(&id, &self.slab)?)
    }

    fn replace(&mut self, entry: &ScheduleEntry, expected: u64) -> Result<()> {
        let id = entry.id();
        let Some(i) = self.index.find(&id, &self.slab) else {
            return Err(Error::not_found("scheduled entry", id));
        };
        let MemInner { slab, interner, .. } = self;
        let Some(old) = slab.get_mut(i) else {
            return Err(Error::not_found("scheduled entry", id));
        };
        if old.version != expected {
            return Err(conflict(id, expected, old.version));
        }
        let was_active = old.is_active();
        *old = interner.record_ref(entry, old);
        if was_active && !old.is_active() {
            self.ended.push_back(id);
            self.prune_ended();
        }
        Ok(())
    }

    /// Removes the oldest ended entries past `keep_ended`, with their runs, two at most per
    /// call (so that the work is spread over the endings): each is dropped in place and its
    /// memory given back. An entry with a run still claimed goes to the back of the line.
    fn prune_ended(&mut self) {
        for _ in 0..2 {
            if self.ended.len() <= self.keep_ended {
                return;
            }
            let Some(id) = self.ended.pop_front() else {
                return;
            };
            let Some((place, pos)) = self.index.find_place(&id, &self.slab) else {
                continue;
            };
            if self.slab.get(pos).is_none_or(Record::is_active) {
                continue;
            }
            if let Some(runs) = self.runs.remove(&id)
                && runs.iter().any(|r| r.state == RunState::Claimed)
            {
                // A run still claimed: kept, and looked at again later.
                *self.runs.entry(id) = runs;
                self.ended.push_back(id);
                continue;
            }
            self.slab.remove(pos);
            self.index.remove_place(place);
        }
        if self.ended.capacity() > 2 * self.ended.len() + 1024 {
            self.ended.shrink_to_fit();
        }
    }
}

/// Entries in memory, in a compact form (see the module source for the layout). Lost with the
/// process; for tests and for deployments that do not need durability.
#[derive(Default)]
pub struct InMemoryScheduleStore {
    inner: RwLock<MemInner>,
}

impl fmt::Debug for InMemoryScheduleStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InMemoryScheduleStore")
            .field("entries", &self.inner.read().index.len)
            .finish()
    }
}

impl InMemoryScheduleStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Keeps at least `n` ended entries (completed, failed or cancelled), so that `get` and
    /// queries still answer for them (default 10,000). Past `n`, the oldest are removed as
    /// others end, with their runs, and their memory is given back (an entry with a run still
    /// claimed waits). `usize::MAX` keeps every entry.
    #[must_use]
    pub fn keep_ended(self, n: usize) -> Self {
        self.inner.write().keep_ended = n;
        self
    }

    /// Entries stored (active or not).
    pub fn len(&self) -> usize {
        self.inner.read().index.len
    }

    /// Whether no entry is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes the entries that can no longer run (completed, failed or cancelled) with their
    /// runs, and gives their memory back; returns how many. They are no longer found by `get`
    /// or `query` afterwards. An entry with a run still claimed is kept. Without this, ended
    /// entries are removed on their own past [`keep_ended`](Self::keep_ended).
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use architectlm_core::extensions::scheduler::{SchedulePolicy, ScheduledTask, ScheduledTaskStatus};
    /// use architectlm_store::schedule::{InMemoryScheduleStore, ScheduleEntry, ScheduleStore};
    ///
    /// let store = InMemoryScheduleStore::new();
    /// let task = ScheduledTask::new(uuid::Uuid::new_v4(), "t", serde_json::json!({}), chrono::Utc::now());
    /// let mut e = ScheduleEntry::new(task, SchedulePolicy::default());
    /// store.insert(vec![e.clone()]).await?;
    /// e.task.status = ScheduledTaskStatus::Cancelled;
    /// e.version = 2;
    /// store.update(&e, 1).await?;
    /// assert_eq!(store.forget_finished(), 1);
    /// assert!(store.get(e.id()).await?.is_none());
    /// # Ok::<_, architectlm_core::Error>(())
    /// # }).unwrap();
    /// ```
    pub fn forget_finished(&self) -> usize {
        let mut g = self.inner.write();
        let g = &mut *g;
        let claimed: std::collections::HashSet<Uuid> = g
            .runs
            .iter()
            .filter(|(_, runs)| runs.iter().any(|r| r.state == RunState::Claimed))
            .map(|(id, _)| *id)
            .collect();
        let old = std::mem::take(&mut g.slab);
        let mut index = Index::default();
        let mut removed = 0;
        for chunk in old.chunks {
            for r in chunk.into_vec().into_iter().flatten() {
                if r.is_active() || claimed.contains(&r.id) {
                    let id = r.id;
                    let at = g.slab.insert(r);
                    index.insert(&id, at);
                } else {
                    g.runs.remove(&r.id);
                    removed += 1;
                }
            }
        }
        g.index = index;
        g.runs.shrink_to_fit();
        let ended = std::mem::take(&mut g.ended);
        g.ended = ended
            .into_iter()
            .filter(|id| g.record(*id).is_some())
            .collect();
        removed
    }
}

#[async_trait]
impl ScheduleStore for InMemoryScheduleStore {
    async fn insert(&self, entries: Vec<ScheduleEntry>) -> Result<()> {
        let mut g = self.inner.write();
        for e in &entries {
            if let Some(old) = g.record(e.id()) {
                return Err(conflict(e.id(), 0, old.version));
            }
        }
        let g = &mut *g;
        g.index.reserve(entries.len());
        for e in entries {
            let id = e.id();
            let r = g.interner.record(e, None);
            let i = g.slab.insert(r);
            g.index.insert(&id, i);
        }
        Ok(())
    }

    async fn update(&self, entry: &ScheduleEntry, expected_version: u64) -> Result<()> {
        self.inner.write().replace(entry, expected_version)
    }

    async fn claim(
        &self,
        entry: &ScheduleEntry,
        expected_version: u64,
        due: &[DateTime<Utc>],
        now: DateTime<Utc>,
    ) -> Result<Vec<DateTime<Utc>>> {
        let mut g = self.inner.write();
        g.replace(entry, expected_version)?;
        let runs = g.runs.entry(entry.id());
        let mut claimed = Vec::with_capacity(due.len());
        for &d in due {
            let d = truncate_ms(d);
            if let Err(at) = run_at(runs, d.timestamp_millis()) {
                runs.insert(at, ScheduleRun::claimed(entry.id(), d, now));
                claimed.push(d);
            }
        }
        Ok(claimed)
    }

    async fn finish(
        &self,
        entry: &ScheduleEntry,
        expected_version: u64,
        run: &ScheduleRun,
    ) -> Result<()> {
        let mut g = self.inner.write();
        g.replace(entry, expected_version)?;
        let runs = g.runs.entry(entry.id());
        match run_at(runs, run.due_at.timestamp_millis()) {
            Ok(at) => runs[at] = run.clone(),
            Err(at) => runs.insert(at, run.clone()),
        }
        if entry.task.is_recurring() && runs.capacity() <= KEPT_RUNS {
            // A recurring entry's kept runs grow to `KEPT_RUNS` finished ones and the next one
            // claimed, and no further: room for them is made once, here, when a run ends. Grown
            // by doubling as runs are claimed instead, the runs of entries firing together all
            // grow at the same occurrence and stall the claims of that occurrence.
            let left = entry.max_executions.map_or(usize::MAX, |m| {
                m.saturating_sub(entry.task.execution_count) as usize
            });
            let want = (KEPT_RUNS + 1).min(runs.len().saturating_add(left));
            runs.reserve_exact(want.saturating_sub(runs.len()));
        }
        let finished = runs.iter().filter(|r| r.state != RunState::Claimed).count();
        if finished > KEPT_RUNS {
            // The oldest finished runs go.
            let mut extra = finished - KEPT_RUNS;
            runs.retain(|r| {
                if extra > 0 && r.state != RunState::Claimed {
                    extra -= 1;
                    false
                } else {
                    true
                }
            });
        }
        Ok(())
    }

    async fn restart(&self, entry_id: Uuid, due_at: DateTime<Utc>) -> Result<u32> {
        let mut g = self.inner.write();
        let run = g
            .runs
            .get_mut(&entry_id)
            .and_then(|r| {
                let at = run_at(r, due_at.timestamp_millis()).ok()?;
                r.get_mut(at)
            })
            .ok_or_else(|| Error::not_found("scheduled run", format!("{entry_id}@{due_at}")))?;
        run.starts += 1;
        Ok(run.starts)
    }

    async fn get(&self, id: Uuid) -> Result<Option<ScheduleEntry>> {
        Ok(self.inner.read().record(id).map(Record::to_entry))
    }

    async fn cancel_unclaimed(&self, id: Uuid) -> Result<Option<String>> {
        let mut g = self.inner.write();
        let g = &mut *g;
        let Some(pos) = g.index.find(&id, &g.slab) else {
            return Ok(None);
        };
        let Some(r) = g.slab.get_mut(pos) else {
            return Ok(None);
        };
        if !matches!(
            r.status,
            ScheduledTaskStatus::Scheduled | ScheduledTaskStatus::Paused
        ) {
            return Ok(None);
        }
        // Only what a cancel changes; the rest of the record stays as it is.
        r.status = ScheduledTaskStatus::Cancelled;
        r.next = None;
        r.version += 1;
        let task_id = r.task_id.to_string();
        g.ended.push_back(id);
        g.prune_ended();
        Ok(Some(task_id))
    }

    async fn query(&self, filter: &ScheduledTaskFilter) -> Result<Page<ScheduleEntry>> {
        let g = self.inner.read();
        let lo = filter.from.map_or(i64::MIN, |t| t.timestamp_millis());
        let hi = filter.to.map_or(i64::MAX, |t| t.timestamp_millis());
        // Cheap checks on the compact records first; the full filter on the survivors.
        let mut hits: Vec<(i64, Uuid, &Record)> = g
            .slab
            .iter()
            .filter(|r| {
                let k = r.next_key();
                k >= lo
                    && k <= hi
                    && (filter.status.is_empty() || filter.status.contains(&r.status))
                    && (filter.task_id.is_empty()
                        || filter.task_id.iter().any(|t| **t == *r.task_id))
                    && filter.recurring.is_none_or(|want| want == r.is_recurring())
            })
            .map(|r| (r.next_key(), r.id, r))
            .collect();
        hits.sort_unstable_by_key(|&(k, id, _)| (k, id));
        let items: Vec<ScheduleEntry> = hits
            .into_iter()
            .map(|(_, _, r)| r.to_entry())
            .filter(|e| filter.matches(&e.task))
            .collect();
        Ok(paginate(items, filter))
    }

    async fn load_active(&self) -> Result<Vec<ScheduleEntry>> {
        Ok(self
            .inner
            .read()
            .slab
            .iter()
            .filter(|r| r.is_active())
            .map(Record::to_entry)
            .collect())
    }

    async fn unfinished_runs(&self) -> Result<Vec<ScheduleRun>> {
        Ok(self
            .inner
            .read()
            .runs
            .iter()
            .flat_map(|(_, runs)| runs)
            .filter(|r| r.state == RunState::Claimed)
            .cloned()
            .collect())
    }

    async fn runs(&self, entry_id: Uuid) -> Result<Vec<ScheduleRun>> {
        Ok(self
            .inner
            .read()
            .runs
            .get(&entry_id)
            .cloned()
            .unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> ScheduleEntry {
        ScheduleEntry::new(
            ScheduledTask::new(
                Uuid::new_v4(),
                "tick",
                serde_json::json!([1, 2]),
                Utc::now(),
            ),
            SchedulePolicy::default(),
        )
    }

    #[tokio::test]
    async fn ended_entries_beyond_the_kept_number_go_oldest_first_and_give_memory_back() {
        let store = InMemoryScheduleStore::new().keep_ended(10);
        let entries: Vec<ScheduleEntry> = (0..100).map(|_| entry()).collect();
        store.insert(entries.clone()).await.unwrap();
        // Entry 0 ends with a run still claimed: it is kept whatever its age.
        let mut first = entries[0].clone();
        first.version = 2;
        store
            .claim(&first, 1, &[first.task.execute_at], Utc::now())
            .await
            .unwrap();
        let end = |e: &ScheduleEntry, from: u64| {
            let mut e = e.clone();
            e.task.status = ScheduledTaskStatus::Cancelled;
            e.version = from + 1;
            e
        };
        store.update(&end(&first, 2), 2).await.unwrap();
        for e in &entries[1..80] {
            store.update(&end(e, 1), 1).await.unwrap();
        }
        // All but the newest 10 ended went, and the claimed one.
        let chunks = store.inner.read().slab.chunks.len();
        assert!(store.len() < 40, "{} left", store.len());
        assert_eq!(chunks, 1);
        assert!(
            store.get(entries[0].id()).await.unwrap().is_some(),
            "claimed"
        );
        assert_eq!(store.runs(entries[0].id()).await.unwrap().len(), 1);
        assert!(
            store.get(entries[1].id()).await.unwrap().is_none(),
            "oldest"
        );
        // The claimed one takes one of the 10 places kept.
        assert!(store.get(entries[70].id()).await.unwrap().is_none());
        for e in &entries[71..80] {
            let kept = store
                .get(e.id())
                .await
                .unwrap()
                .expect("among the newest ended");
            assert_eq!(kept.task.status, ScheduledTaskStatus::Cancelled);
        }
        for e in &entries[80..] {
            assert!(store.get(e.id()).await.unwrap().is_some(), "active");
        }
        // Keeping every entry is a setting.
        let all = InMemoryScheduleStore::new().keep_ended(usize::MAX);
        all.insert(entries.clone()).await.unwrap();
        for e in &entries {
            all.update(&end(e, 1), 1).await.unwrap();
        }
        assert_eq!(all.len(), 100);
    }

    #[tokio::test]
    async fn entries_round_trip_exactly_and_share_task_ids_and_policies() {
        let store = InMemoryScheduleStore::new();
        let plain = entry();
        let mut full = entry();
        full.task.pattern = Some("* * * * *".into());
        full.task.description = Some("d".into());
        full.task.metadata.insert("k".into(), serde_json::json!(1));
        full.task.error = Some("e".into());
        full.end_at = Some(Utc::now());
        full.jitter = Some(Duration::from_millis(5));
        store
            .insert(vec![plain.clone(), full.clone()])
            .await
            .unwrap();
        assert_eq!(store.get(plain.id()).await.unwrap(), Some(plain.clone()));
        assert_eq!(store.get(full.id()).await.unwrap(), Some(full.clone()));
        let g = store.inner.read();
        let (a, b) = (g.record(plain.id()).unwrap(), g.record(full.id()).unwrap());
        assert!(Arc::ptr_eq(&a.task_id, &b.task_id));
        assert!(Arc::ptr_eq(&a.policy, &b.policy));
        assert!(a.cold.is_none());
        assert!(b.cold.is_some());
    }

    #[tokio::test]
    async fn the_index_finds_every_entry_across_growth() {
        let store = InMemoryScheduleStore::new();
        let mut ids = Vec::new();
        for _ in 0..7 {
            let batch: Vec<ScheduleEntry> = (0..500).map(|_| entry()).collect();
            ids.extend(batch.iter().map(ScheduleEntry::id));
            store.insert(batch).await.unwrap();
        }
        for id in &ids {
            assert_eq!(store.get(*id).await.unwrap().map(|e| e.id()), Some(*id));
        }
        assert_eq!(store.get(Uuid::new_v4()).await.unwrap(), None);
        let g = store.inner.read();
        assert_eq!(g.index.len, ids.len());
        assert!(g.index.places.len() * 7 >= ids.len() * 8);
    }

    #[tokio::test]
    async fn removals_keep_every_other_entry_findable_and_give_chunks_back() {
        let store = InMemoryScheduleStore::new().keep_ended(0);
        let entries: Vec<ScheduleEntry> = (0..20_000).map(|_| entry()).collect();
        store.insert(entries.clone()).await.unwrap();
        // End (and so remove) the first 19,000 and every third of the rest.
        let gone = |k: usize| k < 19_000 || k.is_multiple_of(3);
        for (k, e) in entries.iter().enumerate() {
            if gone(k) {
                let mut c = e.clone();
                c.task.status = ScheduledTaskStatus::Cancelled;
                c.version = 2;
                store.update(&c, 1).await.unwrap();
            }
        }
        for (k, e) in entries.iter().enumerate() {
            let found = store.get(e.id()).await.unwrap().is_some();
            assert_eq!(found, !gone(k), "entry {k}");
        }
        {
            let g = store.inner.read();
            assert_eq!(g.index.len, (19_000..20_000).filter(|k| !gone(*k)).count());
            let allocated = g.slab.chunks.iter().filter(|c| !c.is_empty()).count();
            assert!(allocated <= 2, "{allocated} chunks still allocated");
        }
        // Freed places are reused, their chunks allocated again.
        let more: Vec<ScheduleEntry> = (0..5000).map(|_| entry()).collect();
        store.insert(more.clone()).await.unwrap();
        for e in &more {
            assert!(store.get(e.id()).await.unwrap().is_some());
        }
    }

    #[tokio::test]
    async fn forgetting_finished_entries_keeps_active_and_claimed_ones_and_compacts() {
        let store = InMemoryScheduleStore::new();
        let entries: Vec<ScheduleEntry> = (0..3000).map(|_| entry()).collect();
        store.insert(entries.clone()).await.unwrap();
        let now = Utc::now();
        for (k, e) in entries.iter().enumerate() {
            let mut next = e.clone();
            next.version = 2;
            match k % 4 {
                0 => {}
                1 => {
                    next.task.status = ScheduledTaskStatus::Cancelled;
                    store.update(&next, 1).await.unwrap();
                }
                2 => {
                    next.task.status = ScheduledTaskStatus::Completed;
                    store.claim(&next, 1, &[now], now).await.unwrap();
                    let mut run = ScheduleRun::claimed(e.id(), now, now);
                    run.state = RunState::Completed;
                    let mut last = next.clone();
                    last.version = 3;
                    store.finish(&last, 2, &run).await.unwrap();
                }
                _ => {
                    // Failed, but a run is still claimed: kept.
                    next.task.status = ScheduledTaskStatus::Failed;
                    store.claim(&next, 1, &[now], now).await.unwrap();
                }
            }
        }
        assert_eq!(store.forget_finished(), 1500);
        assert_eq!(store.len(), 1500);
        for (k, e) in entries.iter().enumerate() {
            let found = store.get(e.id()).await.unwrap().is_some();
            assert_eq!(found, k % 4 == 0 || k % 4 == 3, "entry {k}");
            assert_eq!(store.runs(e.id()).await.unwrap().is_empty(), k % 4 != 3);
        }
        assert_eq!(
            store.inner.read().slab.chunks.len(),
            1500_usize.div_ceil(CHUNK)
        );
        assert_eq!(store.unfinished_runs().await.unwrap().len(), 750);
    }

    #[test]
    fn a_history_is_updated_by_its_changes_only() {
        let run = |s: i64| {
            RunRecord::new(
                DateTime::from_timestamp(s, 0).unwrap_or_default(),
                DateTime::from_timestamp(s, 0).unwrap_or_default(),
            )
        };
        let mut to: Vec<RunRecord> = (0..5).map(run).collect();
        let from: Vec<RunRecord> = (2..7).map(run).collect();
        sync_history(&mut to, &from);
        assert_eq!(to, from);
        let other: Vec<RunRecord> = (10..12).map(run).collect();
        sync_history(&mut to, &other);
        assert_eq!(to, other);
        sync_history(&mut to, &[]);
        assert!(to.is_empty());
    }

    #[test]
    fn the_slab_grows_in_chunks_and_reuses_freed_places() {
        let mut slab = Slab::default();
        let rec = InMemoryScheduleStore::new()
            .inner
            .write()
            .interner
            .record(entry(), None);
        let ids: Vec<u32> = (0..CHUNK + 1).map(|_| slab.insert(rec.clone())).collect();
        assert_eq!(slab.chunks.len(), 2);
        assert_eq!(ids[0], 0);
        assert_eq!(ids[CHUNK], CHUNK as u32);
        assert!(slab.get(ids[5]).is_some());
        assert!(slab.get(u32::MAX).is_none());
    }
}
