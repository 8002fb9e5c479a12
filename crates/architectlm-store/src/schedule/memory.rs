//! Scheduled entries and run claims in memory.

use super::*;

#[derive(Default)]
struct MemInner {
    entries: HashMap<Uuid, ScheduleEntry>,
    by_next: BTreeSet<(i64, Uuid)>,
    runs: HashMap<Uuid, BTreeMap<i64, ScheduleRun>>,
}

impl MemInner {
    fn replace(&mut self, entry: &ScheduleEntry, expected: u64) -> Result<()> {
        let id = entry.id();
        let Some(old) = self.entries.get(&id) else {
            return Err(Error::not_found("scheduled entry", id));
        };
        if old.version != expected {
            return Err(conflict(id, expected, old.version));
        }
        self.by_next.remove(&(next_key(old), id));
        self.by_next.insert((next_key(entry), id));
        self.entries.insert(id, entry.clone());
        Ok(())
    }
}

/// Entries in memory, indexed by next run. Lost with the process; for tests and for
/// deployments that do not need durability.
#[derive(Default)]
pub struct InMemoryScheduleStore {
    inner: RwLock<MemInner>,
}

impl fmt::Debug for InMemoryScheduleStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InMemoryScheduleStore")
            .field("entries", &self.inner.read().entries.len())
            .finish()
    }
}

impl InMemoryScheduleStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl ScheduleStore for InMemoryScheduleStore {
    async fn insert(&self, entries: Vec<ScheduleEntry>) -> Result<()> {
        let mut g = self.inner.write();
        for e in &entries {
            if let Some(old) = g.entries.get(&e.id()) {
                return Err(conflict(e.id(), 0, old.version));
            }
        }
        for e in entries {
            g.by_next.insert((next_key(&e), e.id()));
            g.entries.insert(e.id(), e);
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
        let runs = g.runs.entry(entry.id()).or_default();
        let mut claimed = Vec::with_capacity(due.len());
        for &d in due {
            let d = truncate_ms(d);
            let key = d.timestamp_millis();
            if let std::collections::btree_map::Entry::Vacant(v) = runs.entry(key) {
                v.insert(ScheduleRun::claimed(entry.id(), d, now));
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
        let runs = g.runs.entry(entry.id()).or_default();
        runs.insert(run.due_at.timestamp_millis(), run.clone());
        let finished: Vec<i64> = runs
            .iter()
            .filter(|(_, r)| r.state != RunState::Claimed)
            .map(|(k, _)| *k)
            .collect();
        if finished.len() > KEPT_RUNS {
            for k in &finished[..finished.len() - KEPT_RUNS] {
                runs.remove(k);
            }
        }
        Ok(())
    }

    async fn restart(&self, entry_id: Uuid, due_at: DateTime<Utc>) -> Result<u32> {
        let mut g = self.inner.write();
        let run = g
            .runs
            .get_mut(&entry_id)
            .and_then(|r| r.get_mut(&due_at.timestamp_millis()))
            .ok_or_else(|| Error::not_found("scheduled run", format!("{entry_id}@{due_at}")))?;
        run.starts += 1;
        Ok(run.starts)
    }

    async fn get(&self, id: Uuid) -> Result<Option<ScheduleEntry>> {
        Ok(self.inner.read().entries.get(&id).cloned())
    }

    async fn query(&self, filter: &ScheduledTaskFilter) -> Result<Page<ScheduleEntry>> {
        let g = self.inner.read();
        let lo = filter.from.map_or(i64::MIN, |t| t.timestamp_millis());
        let hi = filter.to.map_or(i64::MAX, |t| t.timestamp_millis());
        let items: Vec<ScheduleEntry> = g
            .by_next
            .range((lo, Uuid::nil())..=(hi, Uuid::max()))
            .filter_map(|(_, id)| g.entries.get(id))
            .filter(|e| filter.matches(&e.task))
            .cloned()
            .collect();
        Ok(paginate(items, filter))
    }

    async fn load_active(&self) -> Result<Vec<ScheduleEntry>> {
        Ok(self
            .inner
            .read()
            .entries
            .values()
            .filter(|e| e.is_active())
            .cloned()
            .collect())
    }

    async fn unfinished_runs(&self) -> Result<Vec<ScheduleRun>> {
        Ok(self
            .inner
            .read()
            .runs
            .values()
            .flat_map(|r| r.values())
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
            .map(|r| r.values().cloned().collect())
            .unwrap_or_default())
    }
}
