//! Scheduler workloads run on architectlm-scheduler and its peers in one invocation; prints one
//! markdown section.
//!
//! `cargo run --release --manifest-path benches/scheduler/Cargo.toml -- [--quick] [--instant-only | --one-shots-only]`

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicIsize, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use architectlm_core::extensions::scheduler::{ScheduledTaskConfig, Scheduler};
use architectlm_core::{Runtime, System as ArchSystem, TaskDefinition};
use architectlm_scheduler::TaskScheduler;
use chrono::{DateTime, Utc};
use serde_json::json;

struct Counting;

/// Live heap bytes, counted per shard: each thread adds to a shard of its own, so that the
/// count does not make two threads that allocate at once contend for one cache line (which
/// would slow every allocating workload measured here, ours and the peers alike).
const SHARDS: usize = 64;

#[repr(align(128))]
struct Shard(AtomicIsize);

static LIVE: [Shard; SHARDS] = [const { Shard(AtomicIsize::new(0)) }; SHARDS];

fn shard() -> &'static AtomicIsize {
    &LIVE[thread_no() % SHARDS].0
}

// Safety: every call is forwarded unchanged to the system allocator; only sizes are counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        shard().fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        shard().fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        shard().fetch_add(n as isize - l.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live() -> usize {
    let sum: isize = LIVE.iter().map(|s| s.0.load(Ordering::Relaxed)).sum();
    sum.max(0) as usize
}

/// Signed lateness per timer in microseconds; `i64::MIN` means it never fired.
struct Recorder {
    late: Vec<AtomicI64>,
    fired: AtomicUsize,
}

impl Recorder {
    fn new(n: usize) -> Arc<Self> {
        Arc::new(Self {
            late: (0..n).map(|_| AtomicI64::new(i64::MIN)).collect(),
            fired: AtomicUsize::new(0),
        })
    }
    fn record(&self, i: usize, late_us: i64) {
        if let Some(slot) = self.late.get(i)
            && slot.swap(late_us, Ordering::Relaxed) == i64::MIN
        {
            self.fired.fetch_add(1, Ordering::Relaxed);
        }
    }
    async fn wait(&self, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.fired.load(Ordering::Relaxed) < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[derive(Default, Clone)]
struct Row {
    workload: String,
    name: String,
    n: usize,
    insert_per_s: f64,
    bytes_per_entry: f64,
    /// Bytes per entry without its input (our rows; peers carry no input).
    bytes_excl_input: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    early: usize,
    lost: usize,
    extra: String,
}

fn summarize(rec: &Recorder, mut row: Row) -> Row {
    let mut v: Vec<i64> = rec
        .late
        .iter()
        .map(|a| a.load(Ordering::Relaxed))
        .filter(|x| *x != i64::MIN)
        .collect();
    row.lost = row.n - v.len();
    row.early = v.iter().filter(|x| **x < 0).count();
    v.sort_unstable();
    let q = |p: f64| {
        if v.is_empty() {
            f64::NAN
        } else {
            v[((v.len() - 1) as f64 * p) as usize] as f64 / 1000.0
        }
    };
    row.p50_ms = q(0.5);
    row.p99_ms = q(0.99);
    row.max_ms = v.last().map_or(f64::NAN, |x| *x as f64 / 1000.0);
    row
}

/// Live bytes of one input as the scheduler keeps it: its heap part (measured on a sample of
/// 1,000) and the inline `Value`.
fn input_bytes(make: impl Fn(usize) -> serde_json::Value) -> f64 {
    let mut sample = Vec::with_capacity(1000);
    let before = live();
    for k in 0..1000 {
        sample.push(make(k));
    }
    let heap = live().saturating_sub(before) as f64 / 1000.0;
    drop(sample);
    heap + std::mem::size_of::<serde_json::Value>() as f64
}

fn wall_us(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

async fn ours_runtime(rec: Arc<Recorder>, sched: Arc<TaskScheduler>) -> Runtime {
    let task = TaskDefinition::new("tick", move |input, _ctx| {
        let now = wall_us(Utc::now());
        let i = input[0].as_u64().unwrap_or(0) as usize;
        let due = input[1].as_i64().unwrap_or(0);
        rec.record(i, now - due);
        async { Ok(serde_json::Value::Null) }
    })
    .expect("task");
    let system = ArchSystem::builder("bench")
        .task(task)
        .build()
        .expect("system");
    Runtime::builder(system)
        .extension(sched)
        .start()
        .await
        .expect("runtime")
}

/// Due offsets: `n` timers spread evenly over `span` (all at `span` when `same_instant`).
fn offset(i: usize, n: usize, span: Duration, same_instant: bool) -> Duration {
    if same_instant {
        span
    } else {
        span.mul_f64((i as f64 + 1.0) / n as f64)
    }
}

/// How long after the start of inserting the first timer is due: 1.5 s, or more for large `n`
/// (4 µs an entry), so that inserting is over before timers fire and the memory figure counts
/// pending entries only.
fn lead(n: usize) -> Duration {
    Duration::from_millis(1500.max(n as u64 / 250))
}

async fn ours(workload: &str, n: usize, span: Duration, same: bool) -> Row {
    let rec = Recorder::new(n);
    let sched = Arc::new(TaskScheduler::in_memory());
    let _rt = ours_runtime(rec.clone(), sched.clone()).await;
    let base = Utc::now() + chrono::Duration::from_std(lead(n)).unwrap_or_default();
    let input = input_bytes(|k| json!([k, wall_us(base)]));
    let before = live();
    let t = Instant::now();
    let mut i = 0;
    while i < n {
        let end = (i + 10_000).min(n);
        let batch = (i..end)
            .map(|k| {
                let due =
                    base + chrono::Duration::from_std(offset(k, n, span, same)).unwrap_or_default();
                let due = DateTime::from_timestamp_millis(due.timestamp_millis()).unwrap_or(due);
                ScheduledTaskConfig::new("tick", json!([k, wall_us(due)]), due)
            })
            .collect();
        sched.schedule_many(batch).await.expect("schedule");
        i = end;
    }
    let insert = t.elapsed();
    let bytes = live().saturating_sub(before) as f64 / n as f64;
    rec.wait(n, lead(n) + span + Duration::from_secs(10)).await;
    summarize(
        &rec,
        Row {
            workload: workload.into(),
            name: "architectlm-scheduler (in-memory store)".into(),
            n,
            insert_per_s: n as f64 / insert.as_secs_f64(),
            bytes_per_entry: bytes,
            bytes_excl_input: bytes - input,
            ..Row::default()
        },
    )
}

async fn delay_queue(workload: &str, n: usize, span: Duration, same: bool) -> Row {
    use tokio_util::time::DelayQueue;
    let rec = Recorder::new(n);
    let base = tokio::time::Instant::now() + lead(n);
    let before = live();
    let t = Instant::now();
    let mut q = DelayQueue::with_capacity(0);
    for k in 0..n {
        q.insert_at(k, base + offset(k, n, span, same));
    }
    let insert = t.elapsed();
    let bytes = live().saturating_sub(before) as f64 / n as f64;
    let r = rec.clone();
    let h = tokio::spawn(async move {
        use std::future::poll_fn;
        while let Some(e) = poll_fn(|cx| q.poll_expired(cx)).await {
            let now = tokio::time::Instant::now();
            let due = e.deadline();
            let late = if now >= due {
                (now - due).as_micros() as i64
            } else {
                -((due - now).as_micros() as i64)
            };
            r.record(e.into_inner(), late);
        }
    });
    rec.wait(n, lead(n) + span + Duration::from_secs(10)).await;
    h.abort();
    summarize(
        &rec,
        Row {
            workload: workload.into(),
            name: "tokio-util DelayQueue".into(),
            n,
            insert_per_s: n as f64 / insert.as_secs_f64(),
            bytes_per_entry: bytes,
            bytes_excl_input: bytes,
            ..Row::default()
        },
    )
}

async fn spawn_sleep(workload: &str, n: usize, span: Duration, same: bool) -> Row {
    let rec = Recorder::new(n);
    let base = tokio::time::Instant::now() + lead(n);
    let before = live();
    let t = Instant::now();
    let mut handles = Vec::with_capacity(n);
    for k in 0..n {
        let r = rec.clone();
        let due = base + offset(k, n, span, same);
        handles.push(tokio::spawn(async move {
            tokio::time::sleep_until(due).await;
            let now = tokio::time::Instant::now();
            let late = if now >= due {
                (now - due).as_micros() as i64
            } else {
                -((due - now).as_micros() as i64)
            };
            r.record(k, late);
        }));
    }
    let insert = t.elapsed();
    let bytes = live().saturating_sub(before) as f64 / n as f64;
    rec.wait(n, lead(n) + span + Duration::from_secs(10)).await;
    drop(handles);
    summarize(
        &rec,
        Row {
            workload: workload.into(),
            name: "tokio spawn + sleep_until".into(),
            n,
            insert_per_s: n as f64 / insert.as_secs_f64(),
            bytes_per_entry: bytes,
            bytes_excl_input: bytes,
            ..Row::default()
        },
    )
}

async fn tokio_cron(workload: &str, n: usize, span: Duration, same: bool) -> Row {
    use tokio_cron_scheduler::{Job, JobScheduler};
    let rec = Recorder::new(n);
    let sched = JobScheduler::new().await.expect("tcs");
    sched.start().await.expect("tcs start");
    let base = Instant::now() + lead(n);
    let before = live();
    let t = Instant::now();
    for k in 0..n {
        let r = rec.clone();
        let due = base + offset(k, n, span, same);
        let job = Job::new_one_shot_at_instant(due, move |_id, _l| {
            let now = Instant::now();
            let late = if now >= due {
                (now - due).as_micros() as i64
            } else {
                -((due - now).as_micros() as i64)
            };
            r.record(k, late);
        })
        .expect("job");
        sched.add(job).await.expect("add");
    }
    let insert = t.elapsed();
    let bytes = live().saturating_sub(before) as f64 / n as f64;
    rec.wait(n, lead(n) + span + Duration::from_secs(10)).await;
    let mut sched = sched;
    let _ = sched.shutdown().await;
    summarize(
        &rec,
        Row {
            workload: workload.into(),
            name: "tokio-cron-scheduler 0.15".into(),
            n,
            insert_per_s: n as f64 / insert.as_secs_f64(),
            bytes_per_entry: bytes,
            bytes_excl_input: bytes,
            ..Row::default()
        },
    )
}

async fn cancel_ours(n: usize) -> Row {
    let rec = Recorder::new(0);
    let store = Arc::new(architectlm_store::schedule::InMemoryScheduleStore::new());
    let sched = Arc::new(TaskScheduler::builder().store(store.clone()).build());
    let _rt = ours_runtime(rec, sched.clone()).await;
    let due = Utc::now() + chrono::Duration::hours(1);
    let input = input_bytes(|k| json!([k, 0]));
    let before = live();
    let mut ids = Vec::with_capacity(n);
    let mut i = 0;
    while i < n {
        let end = (i + 10_000).min(n);
        let batch = (i..end)
            .map(|k| ScheduledTaskConfig::new("tick", json!([k, 0]), due))
            .collect();
        ids.extend(sched.schedule_many(batch).await.expect("schedule"));
        i = end;
    }
    let full = live().saturating_sub(before);
    let cancel = n * 4 / 5;
    let t = Instant::now();
    for id in &ids[..cancel] {
        sched.cancel_task(*id).await.expect("cancel");
    }
    let el = t.elapsed();
    let after = live().saturating_sub(before);
    let forgotten = store.forget_finished();
    let pruned = live().saturating_sub(before);
    Row {
        workload: "cancel 80%".into(),
        name: "architectlm-scheduler (in-memory store)".into(),
        n,
        insert_per_s: cancel as f64 / el.as_secs_f64(),
        bytes_per_entry: full as f64 / n as f64,
        bytes_excl_input: full as f64 / n as f64 - input,
        extra: format!(
            "live memory {:.0} MB → {:.0} MB after the cancels (ended entries past the newest 10,000 are removed on their own) → {:.0} MB after `forget_finished` ({forgotten} more removed)",
            full as f64 / 1e6,
            after as f64 / 1e6,
            pruned as f64 / 1e6
        ),
        ..Row::default()
    }
}

async fn cancel_delay_queue(n: usize) -> Row {
    use tokio_util::time::DelayQueue;
    let before = live();
    let base = tokio::time::Instant::now() + Duration::from_secs(3600);
    let mut q = DelayQueue::new();
    let keys: Vec<_> = (0..n).map(|k| q.insert_at(k, base)).collect();
    let full = live().saturating_sub(before);
    let cancel = n * 4 / 5;
    let t = Instant::now();
    for k in &keys[..cancel] {
        q.remove(k);
    }
    let el = t.elapsed();
    q.shrink_to_fit();
    let after = live().saturating_sub(before);
    drop(keys);
    Row {
        workload: "cancel 80%".into(),
        name: "tokio-util DelayQueue".into(),
        n,
        insert_per_s: cancel as f64 / el.as_secs_f64(),
        bytes_per_entry: full as f64 / n as f64,
        bytes_excl_input: full as f64 / n as f64,
        extra: format!(
            "live memory {:.0} MB → {:.0} MB",
            full as f64 / 1e6,
            after as f64 / 1e6
        ),
        ..Row::default()
    }
}

async fn durable(n: usize) -> Row {
    let dir = std::env::temp_dir().join(format!("alm-sched-bench-{}", uuid::Uuid::new_v4()));
    let path = dir.join("s.sqlite");
    let rec = Recorder::new(0);
    let sched = Arc::new(TaskScheduler::sqlite(&path).await.expect("sqlite"));
    let rt = ours_runtime(rec.clone(), sched.clone()).await;
    let due = Utc::now() + chrono::Duration::hours(1);
    let t = Instant::now();
    let mut i = 0;
    while i < n {
        let end = (i + 10_000).min(n);
        let batch = (i..end)
            .map(|k| ScheduledTaskConfig::new("tick", json!([k, 0]), due))
            .collect();
        sched.schedule_many(batch).await.expect("schedule");
        i = end;
    }
    let insert = t.elapsed();
    rt.shutdown(Duration::from_secs(1)).await;
    drop(rt);
    drop(sched);
    let sched = Arc::new(TaskScheduler::sqlite(&path).await.expect("sqlite"));
    let t = Instant::now();
    let rt = ours_runtime(rec, sched.clone()).await;
    let reload = t.elapsed();
    let active = sched.active_entries();
    rt.shutdown(Duration::from_secs(1)).await;
    let _ = std::fs::remove_dir_all(&dir);
    Row {
        workload: "durable (SQLite WAL, synchronous=NORMAL)".into(),
        name: "architectlm-scheduler (SQLite store)".into(),
        n,
        insert_per_s: n as f64 / insert.as_secs_f64(),
        extra: format!(
            "batches of 10,000; restart reloaded {active} entries in {:.2} s",
            reload.as_secs_f64()
        ),
        bytes_per_entry: f64::NAN,
        bytes_excl_input: f64::NAN,
        p50_ms: f64::NAN,
        p99_ms: f64::NAN,
        max_ms: f64::NAN,
        ..Row::default()
    }
}

fn cpu_seconds() -> f64 {
    // utime + stime of this process, in clock ticks (100 per second on Linux).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

async fn idle_recurring(n: usize, idle: Duration) -> Row {
    use architectlm_core::extensions::scheduler::RecurringTaskConfig;
    let rec = Recorder::new(0);
    let sched = Arc::new(TaskScheduler::in_memory());
    let _rt = ours_runtime(rec, sched.clone()).await;
    let t = Instant::now();
    for k in 0..n {
        sched
            .schedule_recurring_task(RecurringTaskConfig::new("tick", json!([k, 0]), "0 0 1 1 *"))
            .await
            .expect("schedule");
    }
    let insert = t.elapsed();
    let cpu0 = cpu_seconds();
    tokio::time::sleep(idle).await;
    let cpu = cpu_seconds() - cpu0;
    Row {
        workload: format!("{n} recurring, due far ahead, idle {}s", idle.as_secs()),
        name: "architectlm-scheduler (in-memory store)".into(),
        n,
        insert_per_s: n as f64 / insert.as_secs_f64(),
        bytes_per_entry: f64::NAN,
        bytes_excl_input: f64::NAN,
        p50_ms: f64::NAN,
        p99_ms: f64::NAN,
        max_ms: f64::NAN,
        extra: format!(
            "idle CPU {:.3}% of a core (whole process, 10 ms tick resolution)",
            cpu / idle.as_secs_f64() * 100.0
        ),
        ..Row::default()
    }
}

/// The every-second workloads start on a whole second, two seconds out.
fn whole_second_start() -> DateTime<Utc> {
    let start = Utc::now() + chrono::Duration::seconds(2);
    DateTime::from_timestamp(start.timestamp(), 0).unwrap_or(start)
}

/// Sleeps until every occurrence up to `end` has had three seconds to run.
async fn settle_after(end: DateTime<Utc>) {
    let over = (end + chrono::Duration::seconds(3) - Utc::now())
        .to_std()
        .unwrap_or_default();
    tokio::time::sleep(over).await;
}

/// The due time of a run (microseconds since the epoch) from the RFC 3339 part of its
/// idempotency key. A whole second in UTC (`YYYY-MM-DDTHH:MM:SS+00:00`, the every-second
/// workload's) is read by position, which costs the measuring body little; anything else goes
/// through chrono.
fn due_us(d: &str) -> Option<i64> {
    let b = d.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        b.get(r)?.iter().try_fold(0i64, |acc, c| {
            c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0'))
        })
    };
    if b.len() == 25 && &b[19..] == b"+00:00" {
        let (y, m, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
        let (h, min, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
        // Days from the civil date (proleptic Gregorian), after Howard Hinnant's algorithm.
        let y = if m <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        return Some(((days * 24 + h) * 60 + min) * 60_000_000 + sec * 1_000_000);
    }
    DateTime::parse_from_rfc3339(d)
        .ok()
        .map(|t| wall_us(t.with_timezone(&Utc)))
}

/// Prints, per occurrence, the lateness of its first, median, 99th-percentile and last run
/// (for looking into where a burst's time goes).
fn spread(late: &[AtomicI64], n: usize, threads: &[AtomicUsize]) {
    for (occ, runs) in late.chunks(n).enumerate() {
        let mut v: Vec<i64> = runs
            .iter()
            .map(|l| l.load(Ordering::Relaxed))
            .filter(|l| *l != i64::MIN)
            .collect();
        v.sort_unstable();
        // Runs and the last lateness per thread that ran them.
        let mut per: std::collections::BTreeMap<usize, (usize, i64)> = Default::default();
        for (k, l) in runs.iter().enumerate() {
            let l = l.load(Ordering::Relaxed);
            if let Some(t) = threads.get(occ * n + k) {
                let e = per.entry(t.load(Ordering::Relaxed)).or_default();
                e.0 += 1;
                e.1 = e.1.max(l);
            }
        }
        if let (Some(first), Some(last)) = (v.first(), v.last()) {
            eprintln!(
                "occurrence {occ}: first {first} us, p50 {} us, p99 {} us, last {last} us; per thread (runs, last us): {per:?}",
                v[v.len() / 2],
                v[v.len() * 99 / 100]
            );
        }
    }
}

/// A small number for the calling thread, from 1 (0 while the thread is being torn down).
/// Usable from the allocator: it allocates nothing.
fn thread_no() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(1);
    thread_local! {
        static NO: Cell<usize> = const { Cell::new(0) };
    }
    NO.try_with(|no| {
        if no.get() == 0 {
            no.set(NEXT.fetch_add(1, Ordering::Relaxed));
        }
        no.get()
    })
    .unwrap_or(0)
}

/// Lateness records appended by each thread to a log of its own, so that recording writes no
/// cache line another thread writes (the runs of one instant start on several workers, in no
/// particular entry order); merged into one slot per (entry, occurrence) afterwards.
struct Logs {
    id: usize,
    capacity: usize,
    all: std::sync::Mutex<Vec<Arc<std::sync::Mutex<Vec<Record>>>>>,
}

/// One recorded run: its slot, the thread that ran it and its lateness (microseconds).
#[derive(Clone, Copy)]
struct Record {
    slot: u32,
    thread: u32,
    late_us: i64,
}

type LocalLog = std::cell::RefCell<Option<(usize, Arc<std::sync::Mutex<Vec<Record>>>)>>;

impl Logs {
    fn new(capacity: usize) -> Arc<Self> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        Arc::new(Self {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            capacity,
            all: std::sync::Mutex::new(Vec::new()),
        })
    }

    fn record(&self, slot: usize, late_us: i64) {
        thread_local! {
            static LOG: LocalLog = const { std::cell::RefCell::new(None) };
        }
        let r = Record {
            slot: slot as u32,
            thread: thread_no() as u32,
            late_us,
        };
        LOG.with(|l| {
            let mut l = l.borrow_mut();
            if l.as_ref().is_none_or(|(id, _)| *id != self.id) {
                let log = Arc::new(std::sync::Mutex::new(Vec::with_capacity(self.capacity)));
                self.all.lock().expect("logs").push(log.clone());
                *l = Some((self.id, log));
            }
            if let Some((_, log)) = l.as_ref() {
                log.lock().expect("log").push(r);
            }
        });
    }

    /// The lateness per slot (a second record of a slot counts as a duplicate), the thread
    /// that ran each slot's run, and the number of duplicates.
    fn merge(&self, len: usize) -> (Vec<AtomicI64>, Vec<AtomicUsize>, usize) {
        let late: Vec<AtomicI64> = (0..len).map(|_| AtomicI64::new(i64::MIN)).collect();
        let threads: Vec<AtomicUsize> = (0..len).map(|_| AtomicUsize::new(0)).collect();
        let mut dups = 0;
        for log in self.all.lock().expect("logs").iter() {
            for r in log.lock().expect("log").iter() {
                let i = r.slot as usize;
                if late[i].swap(r.late_us, Ordering::Relaxed) != i64::MIN {
                    dups += 1;
                }
                threads[i].store(r.thread as usize, Ordering::Relaxed);
            }
        }
        (late, threads, dups)
    }
}

/// The recorded slots as a [`Recorder`] (empty slots count as lost).
fn recorded(late: &[AtomicI64]) -> Arc<Recorder> {
    let rec = Recorder::new(late.len());
    for (i, l) in late.iter().enumerate() {
        let l = l.load(Ordering::Relaxed);
        if l != i64::MIN {
            rec.record(i, l);
        }
    }
    rec
}

async fn every_second(n: usize, window: u32) -> Row {
    use architectlm_core::extensions::scheduler::RecurringTaskConfig;
    // Start on a whole second, two seconds out, and stop after `window` occurrences each.
    let start = whole_second_start();
    let end = start + chrono::Duration::seconds(i64::from(window) - 1);
    // One place per (entry, occurrence): the body records its lateness there (no counter
    // shared by all runs), and counts a second run of the same occurrence as a duplicate. The
    // due time comes from the run's idempotency key (`<entry>@<due, RFC 3339>`).
    for t in [start, end, start - chrono::Duration::days(400)] {
        assert_eq!(due_us(&t.to_rfc3339()), Some(wall_us(t)), "{t}");
    }
    let logs = Logs::new(n * window as usize);
    let unknown = Arc::new(AtomicUsize::new(0));
    let (logs2, u2) = (logs.clone(), unknown.clone());
    let task = TaskDefinition::new("every", move |input, ctx| {
        let now = wall_us(Utc::now());
        let k = input[0].as_u64().unwrap_or(u64::MAX) as usize;
        let due = ctx
            .idempotency_key()
            .and_then(|key| key.split_once('@'))
            .and_then(|(_, d)| due_us(d));
        match due {
            Some(due) if due >= wall_us(start) && due <= wall_us(end) && k < n => {
                // Occurrence-major.
                let i = ((due - wall_us(start)) / 1_000_000) as usize * n + k;
                logs2.record(i, now - due);
            }
            _ => {
                u2.fetch_add(1, Ordering::Relaxed);
            }
        }
        async { Ok(serde_json::Value::Null) }
    })
    .expect("task");
    let mut b = TaskScheduler::builder();
    if let Ok(ms) = std::env::var("ACQUIRE_AHEAD_MS") {
        b = b.acquire_ahead(Duration::from_millis(ms.parse().expect("ms")));
    }
    let sched = Arc::new(b.build());
    let system = ArchSystem::builder("bench")
        .task(task)
        .build()
        .expect("system");
    let rt = Runtime::builder(system)
        .extension(sched.clone())
        .start()
        .await
        .expect("rt");
    let mut ids = Vec::with_capacity(n);
    for k in 0..n {
        ids.push(
            sched
                .schedule_recurring_task(
                    RecurringTaskConfig::new("every", json!([k, 0]), "* * * * * *")
                        .start_at(start)
                        .end_at(end),
                )
                .await
                .expect("schedule"),
        );
    }
    let expected = n * window as usize;
    settle_after(end).await;
    rt.shutdown(Duration::from_secs(1)).await;
    let (late, threads, dups) = logs.merge(expected);
    if std::env::var_os("EVERY_SECOND_SPREAD").is_some() {
        spread(&late, n, &threads);
    }
    let rec = recorded(&late);
    let mut row = summarize(
        &rec,
        Row {
            workload: format!("{n} every-second entries for {window}s"),
            name: "architectlm-scheduler (in-memory store)".into(),
            n: expected,
            insert_per_s: f64::NAN,
            bytes_per_entry: f64::NAN,
            bytes_excl_input: f64::NAN,
            ..Row::default()
        },
    );
    let distinct = rec.fired.load(Ordering::Relaxed);
    row.extra = format!(
        "{expected} occurrences expected, {distinct} distinct ran, {dups} duplicates, {} outside the window",
        unknown.load(Ordering::Relaxed)
    );
    row
}

/// The every-second workload with plain Tokio: one task per entry sleeping until each whole
/// second (`spawn` + `sleep_until`), or one `DelayQueue` holding every entry's next second.
/// Lateness is measured against the wall clock, as for the scheduler.
async fn every_second_peer(n: usize, window: u32, delay_queue: bool) -> Row {
    let start = whole_second_start();
    let logs = Logs::new(n * window as usize);
    // The monotonic instant at which the wall clock reads `at`.
    let instant = |at: DateTime<Utc>| {
        let now = tokio::time::Instant::now();
        match (at - Utc::now()).to_std() {
            Ok(d) => now + d,
            Err(_) => now,
        }
    };
    let due = move |occ: u32| start + chrono::Duration::seconds(i64::from(occ));
    let record = {
        let logs = logs.clone();
        move |k: usize, occ: u32| {
            let now = wall_us(Utc::now());
            logs.record(occ as usize * n + k, now - wall_us(due(occ)));
        }
    };
    let handles: Vec<tokio::task::JoinHandle<()>> = if delay_queue {
        use tokio_util::time::DelayQueue;
        let mut q = DelayQueue::with_capacity(n);
        for k in 0..n {
            q.insert_at((k, 0u32), instant(due(0)));
        }
        vec![tokio::spawn(async move {
            use std::future::poll_fn;
            while let Some(e) = poll_fn(|cx| q.poll_expired(cx)).await {
                let (k, occ) = e.into_inner();
                record(k, occ);
                if occ + 1 < window {
                    q.insert_at((k, occ + 1), instant(due(occ + 1)));
                }
            }
        })]
    } else {
        (0..n)
            .map(|k| {
                let record = record.clone();
                tokio::spawn(async move {
                    for occ in 0..window {
                        tokio::time::sleep_until(instant(due(occ))).await;
                        record(k, occ);
                    }
                })
            })
            .collect()
    };
    let end = due(window - 1);
    settle_after(end).await;
    for h in handles {
        h.abort();
    }
    let expected = n * window as usize;
    let (late, threads, _) = logs.merge(expected);
    if std::env::var_os("EVERY_SECOND_SPREAD").is_some() {
        spread(&late, n, &threads);
    }
    let rec = recorded(&late);
    summarize(
        &rec,
        Row {
            workload: format!("{n} every-second entries for {window}s"),
            name: if delay_queue {
                "tokio-util DelayQueue".into()
            } else {
                "tokio spawn + sleep_until".into()
            },
            n: expected,
            insert_per_s: f64::NAN,
            bytes_per_entry: f64::NAN,
            bytes_excl_input: f64::NAN,
            ..Row::default()
        },
    )
}

fn fmt(x: f64) -> String {
    if x.is_nan() {
        "–".into()
    } else if x >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (n, span, same_n, tcs_n, cancel_n, durable_n) = if quick {
        (
            50_000,
            Duration::from_secs(2),
            20_000,
            5_000,
            100_000,
            50_000,
        )
    } else {
        (
            1_000_000,
            Duration::from_secs(10),
            100_000,
            20_000,
            1_000_000,
            1_000_000,
        )
    };
    if std::env::args().any(|a| a == "--instant-only") {
        // For profiling the firing path: only our same-instant workload.
        let r = ours("due at one instant", same_n, Duration::ZERO, true).await;
        println!(
            "{} due at one instant: p50 {} ms, p99 {} ms, max {} ms",
            r.n,
            fmt(r.p50_ms),
            fmt(r.p99_ms),
            fmt(r.max_ms)
        );
        return;
    }
    if std::env::args().any(|a| a == "--cancel-only") {
        let r = cancel_ours(cancel_n).await;
        println!("{} cancels/s; {}", fmt(r.insert_per_s), r.extra);
        return;
    }
    if std::env::args().any(|a| a == "--every-second-only") {
        // For profiling the recurring firing path: only the every-second workload.
        let (es_n, es_w) = if quick { (2_000, 5) } else { (10_000, 20) };
        let es_w = std::env::var("EVERY_SECOND_WINDOW")
            .ok()
            .and_then(|w| w.parse().ok())
            .unwrap_or(es_w);
        let r = every_second(es_n, es_w).await;
        for peer in [true, false] {
            let p = every_second_peer(es_n, es_w, peer).await;
            println!(
                "{}: p50 {} ms, p99 {} ms, max {} ms, lost {}",
                p.name,
                fmt(p.p50_ms),
                fmt(p.p99_ms),
                fmt(p.max_ms),
                p.lost
            );
        }
        println!(
            "{} every-second entries for {es_w}s: p50 {} ms, p99 {} ms, max {} ms, lost {} ({})",
            es_n,
            fmt(r.p50_ms),
            fmt(r.p99_ms),
            fmt(r.max_ms),
            r.lost,
            r.extra
        );
        return;
    }
    if std::env::args().any(|a| a == "--one-shots-only") {
        // For profiling the firing path: only our spread one-shot workload.
        let r = ours("one-shots", n, span, false).await;
        println!(
            "{} one-shots over {}s: inserted at {}/s, {} B each without input; p50 {} ms, p99 {} ms, max {} ms",
            r.n,
            span.as_secs(),
            fmt(r.insert_per_s),
            fmt(r.bytes_excl_input),
            fmt(r.p50_ms),
            fmt(r.p99_ms),
            fmt(r.max_ms)
        );
        return;
    }
    let mut rows = Vec::new();
    let w = format!("{n} one-shots over {}s", span.as_secs());
    rows.push(ours(&w, n, span, false).await);
    rows.push(delay_queue(&w, n, span, false).await);
    rows.push(spawn_sleep(&w, n, span, false).await);
    let wt = format!("{tcs_n} one-shots over {}s", span.as_secs());
    rows.push(ours(&wt, tcs_n, span, false).await);
    rows.push(tokio_cron(&wt, tcs_n, span, false).await);
    let ws = format!("{same_n} due at one instant");
    rows.push(ours(&ws, same_n, Duration::ZERO, true).await);
    rows.push(delay_queue(&ws, same_n, Duration::ZERO, true).await);
    rows.push(spawn_sleep(&ws, same_n, Duration::ZERO, true).await);
    rows.push(cancel_ours(cancel_n).await);
    rows.push(cancel_delay_queue(cancel_n).await);
    rows.push(durable(durable_n).await);
    let (idle_n, idle_s, es_n, es_w) = if quick {
        (20_000, Duration::from_secs(3), 2_000, 5)
    } else {
        (100_000, Duration::from_secs(10), 10_000, 60)
    };
    rows.push(idle_recurring(idle_n, idle_s).await);
    rows.push(every_second(es_n, es_w).await);
    rows.push(every_second_peer(es_n, es_w, true).await);
    rows.push(every_second_peer(es_n, es_w, false).await);

    println!("### Scheduler");
    println!();
    println!(
        "{} mode, 2 Tokio workers, release build. Timers are due from max(1.5 s, n × 4 µs) after inserting starts, so that inserting is over first. Lateness is signed (start of the job body minus its due time), measured inside the job; 'early' counts negative values. Memory is live heap bytes (counting allocator) per pending entry, input included (a 2-number JSON array), and without the input (its heap part and inline `Value`, measured apart). The cancel rows give cancels/s in the rate column. Peers run in the same process, one after another.",
        if quick { "Quick" } else { "Full" }
    );
    println!();
    println!(
        "| workload | implementation | n | rate (/s) | B/entry | B/entry excl. input | p50 ms | p99 ms | max ms | early | lost | rate vs DelayQueue | notes |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for r in &rows {
        let peer = rows
            .iter()
            .find(|p| p.workload == r.workload && p.name.starts_with("tokio-util"))
            .map(|p| p.insert_per_s);
        let ratio = peer
            .map(|p| r.insert_per_s / p)
            .filter(|x| x.is_finite())
            .map_or("–".into(), |x| format!("{x:.2}×"));
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.workload,
            r.name,
            r.n,
            fmt(r.insert_per_s),
            fmt(r.bytes_per_entry),
            fmt(r.bytes_excl_input),
            fmt(r.p50_ms),
            fmt(r.p99_ms),
            fmt(r.max_ms),
            r.early,
            r.lost,
            ratio,
            r.extra
        );
    }
    println!();
    println!(
        "Peers: tokio-cron-scheduler 0.15, tokio-util 0.7 (DelayQueue), tokio 1 (spawn + sleep_until)."
    );
}
