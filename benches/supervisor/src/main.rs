//! Restart latency, supervised spawn cost and heartbeat overhead of architectlm-supervisor's
//! worker trees, against a bare `JoinHandle` restart loop and kameo (a supervisor actor that
//! re-spawns its linked child from `on_link_died`), in one run. Prints one markdown section.
//!
//! `--quick` runs smaller workloads (for CI smoke use).

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use architectlm_supervisor::worker::{
    ChildSpec, RestartIntensity, SupervisorSpec, WorkerEventKind,
};
use kameo::Actor;
use kameo::actor::{ActorId, ActorRef, Spawn, WeakActorRef};
use kameo::error::ActorStopReason;
use kameo::message::{Context, Message};
use tokio::sync::Notify;

// ----- live-byte counting allocator -----------------------------------------------------------

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);
/// Allocations made while counting is on (reallocations count as one).
static ALLOCS: AtomicUsize = AtomicUsize::new(0);
/// Counting is switched on only while memory is measured, so that the shared counter does not
/// slow down the timed runs.
static COUNTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn count(delta: isize) {
    if COUNTING.load(Ordering::Relaxed) {
        LIVE.fetch_add(delta, Ordering::Relaxed);
        if delta > 0 {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

// SAFETY: forwards to the system allocator unchanged and only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-(layout.size() as isize));
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            LIVE.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live_bytes() -> isize {
    LIVE.load(Ordering::Relaxed)
}

fn allocations() -> usize {
    ALLOCS.load(Ordering::Relaxed)
}

/// Runs `f` twice: once timed with counting off, once with counting on for memory.
async fn timed_and_counted<F, Fut, T>(f: F) -> (T, T)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let timed = f().await;
    COUNTING.store(true, Ordering::SeqCst);
    let counted = f().await;
    COUNTING.store(false, Ordering::SeqCst);
    (timed, counted)
}

fn cpu_time() -> Duration {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

// ----- restart latency ------------------------------------------------------------------------

/// Shared by the workers of one run: the time of the last panic and the latencies measured.
struct Latency {
    last_panic: Option<Instant>,
    samples: Vec<Duration>,
    target: usize,
    done: Arc<Notify>,
}

impl Latency {
    fn new(target: usize) -> Arc<Mutex<Self>> {
        Arc::new(Mutex::new(Self {
            last_panic: None,
            samples: Vec::with_capacity(target),
            target,
            done: Arc::new(Notify::new()),
        }))
    }
}

/// Called when a worker starts: records the latency since the previous panic and tells whether
/// the worker must crash again (recording the time of its panic).
fn started(lat: &Mutex<Latency>) -> bool {
    let now = Instant::now();
    let mut l = lat.lock().unwrap();
    if let Some(p) = l.last_panic.take() {
        l.samples.push(now - p);
    }
    if l.samples.len() >= l.target {
        l.done.notify_one();
        return false;
    }
    l.last_panic = Some(Instant::now());
    true
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

struct Dist {
    p50: Duration,
    p99: Duration,
}

impl Dist {
    fn show(&self) {
        eprintln!("p50 {:?} p99 {:?}", self.p50, self.p99);
    }
}

fn dist(lat: &Mutex<Latency>) -> Dist {
    let mut s = lat.lock().unwrap().samples.clone();
    s.sort();
    Dist {
        p50: percentile(&s, 0.5),
        p99: percentile(&s, 0.99),
    }
}

async fn restart_ours(n: usize) -> Dist {
    let lat = Latency::new(n);
    let done = lat.lock().unwrap().done.clone();
    let l = lat.clone();
    let handle = SupervisorSpec::builder("bench")
        .intensity(RestartIntensity::new(u32::MAX, Duration::from_secs(1)))
        .child(ChildSpec::worker("w", move |ctx| {
            let l = l.clone();
            async move {
                if started(&l) {
                    panic!("crash");
                }
                ctx.cancelled().await;
                Ok(())
            }
        }))
        .build()
        .expect("valid spec")
        .start();
    done.notified().await;
    handle.shutdown().await;
    dist(&lat)
}

async fn restart_bare(n: usize) -> Dist {
    let lat = Latency::new(n);
    let done = lat.lock().unwrap().done.clone();
    let l = lat.clone();
    tokio::spawn(async move {
        loop {
            let l = l.clone();
            let h = tokio::spawn(async move {
                if started(&l) {
                    panic!("crash");
                }
            });
            match h.await {
                Err(e) if e.is_panic() => continue,
                _ => break,
            }
        }
    });
    done.notified().await;
    dist(&lat)
}

struct KWorker {
    lat: Arc<Mutex<Latency>>,
    crash: bool,
    spawned: Option<Arc<SpawnCount>>,
}

struct Crash;

impl Actor for KWorker {
    type Args = Self;
    type Error = Infallible;

    async fn on_start(args: Self, actor_ref: ActorRef<Self>) -> Result<Self, Infallible> {
        if let Some(s) = &args.spawned {
            s.one_more();
        }
        if args.crash && started(&args.lat) {
            let _ = actor_ref.tell(Crash).try_send();
        }
        Ok(args)
    }
}

impl Message<Crash> for KWorker {
    type Reply = ();

    async fn handle(&mut self, _msg: Crash, _ctx: &mut Context<Self, Self::Reply>) {
        self.lat.lock().unwrap().last_panic = Some(Instant::now());
        panic!("crash");
    }
}

struct KSupervisor {
    lat: Arc<Mutex<Latency>>,
}

impl Actor for KSupervisor {
    type Args = Self;
    type Error = Infallible;

    async fn on_start(args: Self, _actor_ref: ActorRef<Self>) -> Result<Self, Infallible> {
        Ok(args)
    }

    async fn on_link_died(
        &mut self,
        actor_ref: WeakActorRef<Self>,
        _id: ActorId,
        reason: ActorStopReason,
    ) -> Result<ControlFlow<ActorStopReason>, Infallible> {
        if matches!(reason, ActorStopReason::Panicked(_))
            && let Some(me) = actor_ref.upgrade()
        {
            let w = KWorker {
                lat: self.lat.clone(),
                crash: true,
                spawned: None,
            };
            KWorker::spawn_link(&me, w).await;
        }
        Ok(ControlFlow::Continue(()))
    }
}

async fn restart_kameo(n: usize) -> Dist {
    let lat = Latency::new(n);
    let done = lat.lock().unwrap().done.clone();
    let sup = KSupervisor::spawn(KSupervisor { lat: lat.clone() });
    // `started` re-records the panic time in the handler; the message hop before the panic is
    // not counted.
    KWorker::spawn_link(
        &sup,
        KWorker {
            lat: lat.clone(),
            crash: true,
            spawned: None,
        },
    )
    .await;
    done.notified().await;
    sup.kill();
    dist(&lat)
}

// ----- spawn cost -----------------------------------------------------------------------------

struct SpawnCount {
    n: AtomicUsize,
    target: usize,
    done: Notify,
}

impl SpawnCount {
    fn new(target: usize) -> Arc<Self> {
        Arc::new(Self {
            n: AtomicUsize::new(0),
            target,
            done: Notify::new(),
        })
    }
    fn one_more(&self) {
        if self.n.fetch_add(1, Ordering::AcqRel) + 1 == self.target {
            self.done.notify_one();
        }
    }
}

/// Per child: time from nothing to every child running, the part of it after the spec was
/// built, live bytes per running child, and heap allocations per child (spec and start).
async fn spawn_ours(n: usize) -> (Duration, Duration, isize, f64) {
    let count = SpawnCount::new(n);
    let before = live_bytes();
    let allocs_before = allocations();
    let t = Instant::now();
    let mut b = SupervisorSpec::builder("bench")
        .intensity(RestartIntensity::new(u32::MAX, Duration::from_secs(1)));
    for i in 0..n {
        let c = count.clone();
        b = b.child(ChildSpec::worker(format!("w{i}"), move |ctx| {
            c.one_more();
            async move {
                ctx.cancelled().await;
                Ok(())
            }
        }));
    }
    let spec = b.build().expect("valid spec");
    let t_start = Instant::now();
    let handle = spec.start();
    count.done.notified().await;
    let per = t.elapsed() / n as u32;
    let start_only = t_start.elapsed() / n as u32;
    let mem = (live_bytes() - before) / n as isize;
    let allocs = (allocations() - allocs_before) as f64 / n as f64;
    handle.shutdown().await;
    (per, start_only, mem, allocs)
}

async fn spawn_ours_dynamic(n: usize) -> Duration {
    let count = SpawnCount::new(n);
    let handle = SupervisorSpec::builder("bench")
        .intensity(RestartIntensity::new(u32::MAX, Duration::from_secs(1)))
        .build()
        .expect("valid spec")
        .start();
    let t = Instant::now();
    for i in 0..n {
        let c = count.clone();
        handle
            .start_child(ChildSpec::worker(format!("w{i}"), move |ctx| {
                c.one_more();
                async move {
                    ctx.cancelled().await;
                    Ok(())
                }
            }))
            .await
            .expect("child starts");
    }
    count.done.notified().await;
    let per = t.elapsed() / n as u32;
    handle.shutdown().await;
    per
}

async fn spawn_bare(n: usize) -> (Duration, isize, f64) {
    let count = SpawnCount::new(n);
    let stop = Arc::new(tokio_util_like::Stop::default());
    let before = live_bytes();
    let allocs_before = allocations();
    let t = Instant::now();
    let mut handles = Vec::with_capacity(n);
    for _ in 0..n {
        let c = count.clone();
        let s = stop.clone();
        handles.push(tokio::spawn(async move {
            c.one_more();
            s.wait().await;
        }));
    }
    count.done.notified().await;
    let per = t.elapsed() / n as u32;
    let mem = (live_bytes() - before) / n as isize;
    let allocs = (allocations() - allocs_before) as f64 / n as f64;
    stop.fire();
    for h in handles {
        let _ = h.await;
    }
    (per, mem, allocs)
}

async fn spawn_kameo(n: usize) -> (Duration, isize) {
    let count = SpawnCount::new(n);
    let lat = Latency::new(0);
    let before = live_bytes();
    let t = Instant::now();
    let sup = KSupervisor::spawn(KSupervisor { lat: lat.clone() });
    let mut refs = Vec::with_capacity(n);
    for _ in 0..n {
        refs.push(
            KWorker::spawn_link(
                &sup,
                KWorker {
                    lat: lat.clone(),
                    crash: false,
                    spawned: Some(count.clone()),
                },
            )
            .await,
        );
    }
    count.done.notified().await;
    let per = t.elapsed() / n as u32;
    let mem = (live_bytes() - before) / n as isize;
    for r in &refs {
        r.kill();
    }
    for r in &refs {
        r.wait_for_shutdown().await;
    }
    sup.kill();
    sup.wait_for_shutdown().await;
    (per, mem)
}

/// A tiny broadcast stop signal for the bare baseline.
mod tokio_util_like {
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::sync::Notify;

    #[derive(Default)]
    pub struct Stop {
        fired: AtomicBool,
        notify: Notify,
    }

    impl Stop {
        pub fn fire(&self) {
            self.fired.store(true, Ordering::SeqCst);
            self.notify.notify_waiters();
        }
        pub async fn wait(&self) {
            loop {
                let n = self.notify.notified();
                if self.fired.load(Ordering::SeqCst) {
                    return;
                }
                n.await;
            }
        }
    }
}

// ----- heartbeats -----------------------------------------------------------------------------

/// Times the supervisor loops apart from their workers: each poll of a loop runs inside a
/// `worker-supervisor` span, and this subscriber adds up the thread CPU time spent inside it.
/// Installed only for the heartbeat runs, so the other measures pay nothing for it.
mod supervisor_cpu {
    use std::cell::Cell;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use tracing::subscriber::Interest;
    use tracing::{Event, Metadata, Subscriber, span};

    static NANOS: AtomicU64 = AtomicU64::new(0);
    static POLLS: AtomicU64 = AtomicU64::new(0);

    thread_local! {
        static ENTERED: Cell<u64> = const { Cell::new(0) };
    }

    fn thread_cpu_nanos() -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes into the timespec we pass.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }

    fn ours(m: &Metadata<'_>) -> bool {
        m.is_span() && m.name() == "worker-supervisor"
    }

    struct PollTimer;

    impl Subscriber for PollTimer {
        fn register_callsite(&self, m: &'static Metadata<'static>) -> Interest {
            if ours(m) {
                Interest::always()
            } else {
                Interest::never()
            }
        }
        fn enabled(&self, m: &Metadata<'_>) -> bool {
            ours(m)
        }
        fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
            span::Id::from_u64(1)
        }
        fn record(&self, _: &span::Id, _: &span::Record<'_>) {}
        fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
        fn event(&self, _: &Event<'_>) {}
        fn enter(&self, _: &span::Id) {
            ENTERED.with(|e| e.set(thread_cpu_nanos()));
        }
        fn exit(&self, _: &span::Id) {
            let spent = thread_cpu_nanos().saturating_sub(ENTERED.with(Cell::get));
            NANOS.fetch_add(spent, Ordering::Relaxed);
            POLLS.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn install() {
        let _ = tracing::subscriber::set_global_default(PollTimer);
    }

    /// CPU time spent in supervisor loops so far, and their number of polls.
    pub fn spent() -> (Duration, u64) {
        (
            Duration::from_nanos(NANOS.load(Ordering::Relaxed)),
            POLLS.load(Ordering::Relaxed),
        )
    }
}

const BEAT: Duration = Duration::from_millis(100);
const DEADLINE: Duration = Duration::from_secs(1);

/// CPU time used over `run` by `w` bare tasks waking every 100 ms.
async fn heartbeat_bare(w: usize, run: Duration) -> Duration {
    let stop = Arc::new(tokio_util_like::Stop::default());
    let mut hs = Vec::with_capacity(w);
    for i in 0..w {
        let s = stop.clone();
        hs.push(tokio::spawn(async move {
            // Spread the wake-ups over the 100 ms period, as independent workers would be.
            tokio::time::sleep(Duration::from_millis((i % 100) as u64)).await;
            loop {
                tokio::select! {
                    _ = s.wait() => return,
                    _ = tokio::time::sleep(BEAT) => {}
                }
            }
        }));
    }
    tokio::time::sleep(BEAT * 2).await;
    let c0 = cpu_time();
    tokio::time::sleep(run).await;
    let used = cpu_time() - c0;
    stop.fire();
    for h in hs {
        let _ = h.await;
    }
    used
}

/// CPU time used over `run` by `w` supervised workers beating every 100 ms (deadline 1 s), and
/// the lateness of hang detection for `victims` workers that stop beating.
async fn heartbeat_ours(
    w: usize,
    run: Duration,
    victims: usize,
    beat: bool,
) -> (Duration, Duration, Vec<Duration>) {
    let last_beats: Arc<Mutex<Vec<Option<std::time::SystemTime>>>> =
        Arc::new(Mutex::new(vec![None; victims]));
    let mut b = SupervisorSpec::builder("bench")
        .intensity(RestartIntensity::new(u32::MAX, Duration::from_secs(1)));
    for i in 0..w {
        b = b.child({
            let spec = ChildSpec::worker(format!("w{i}"), move |ctx| async move {
                tokio::time::sleep(Duration::from_millis((i % 100) as u64)).await;
                loop {
                    if beat {
                        ctx.heartbeat();
                    }
                    tokio::select! {
                        _ = ctx.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(BEAT) => {}
                    }
                }
            });
            if beat { spec.heartbeat(DEADLINE) } else { spec }
        });
    }
    for v in 0..victims {
        let lb = last_beats.clone();
        b = b.child(
            ChildSpec::worker(format!("victim{v}"), move |ctx| {
                let lb = lb.clone();
                async move {
                    // On its first run: beat for a while (staggered), then go silent but honour
                    // cancellation. Once restarted: beat like the others.
                    let first = ctx.restart_count() == 0;
                    let until = Instant::now() + Duration::from_millis(300 + 37 * v as u64);
                    while !first || Instant::now() < until {
                        ctx.heartbeat();
                        if first {
                            lb.lock().unwrap()[v] = Some(std::time::SystemTime::now());
                        }
                        tokio::select! {
                            _ = ctx.cancelled() => return Ok(()),
                            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                        }
                    }
                    ctx.cancelled().await;
                    Ok(())
                }
            })
            .heartbeat(DEADLINE),
        );
    }
    let handle = b.build().expect("valid spec").start();
    let mut missed = handle.subscribe("heartbeat-missed");
    let lateness = Arc::new(Mutex::new(Vec::new()));
    let (l2, lb2) = (lateness.clone(), last_beats.clone());
    let watcher = tokio::spawn(async move {
        // The event's timestamp is taken by the supervisor when it detects the hang, so the
        // watcher's own scheduling delay is not counted.
        while let Some(e) = missed.recv().await {
            let detected = std::time::SystemTime::from(e.timestamp);
            if let (Some(name), WorkerEventKind::HeartbeatMissed { .. }) = (&e.child, &e.kind)
                && let Some(v) = name
                    .strip_prefix("victim")
                    .and_then(|s| s.parse::<usize>().ok())
                && let Some(beat) = lb2.lock().unwrap()[v].take()
            {
                let late = detected.duration_since(beat + DEADLINE).unwrap_or_default();
                l2.lock().unwrap().push(late);
            }
        }
    });
    tokio::time::sleep(BEAT * 2).await;
    let c0 = cpu_time();
    let (s0, _) = supervisor_cpu::spent();
    tokio::time::sleep(run).await;
    let used = cpu_time() - c0;
    let (s1, _) = supervisor_cpu::spent();
    handle.shutdown().await;
    watcher.abort();
    let late = lateness.lock().unwrap().clone();
    (used, s1 - s0, late)
}

// ----- report ---------------------------------------------------------------------------------

fn us(d: Duration) -> String {
    format!("{:.2} µs", d.as_secs_f64() * 1e6)
}

fn ratio(a: Duration, b: Duration) -> String {
    if b.is_zero() {
        "n/a".into()
    } else {
        format!("{:.2}×", a.as_secs_f64() / b.as_secs_f64())
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    // Thousands of deliberate panics: keep the default hook from printing each one.
    std::panic::set_hook(Box::new(|_| {}));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let restarts = if quick { 2_000 } else { 10_000 };
    let spawns = 10_000;
    let dynamic = if quick { 2_000 } else { 10_000 };
    let workers = 10_000;
    let hb_run = if quick {
        Duration::from_secs(2)
    } else {
        Duration::from_secs(10)
    };
    let victims = 10;

    // `--profile <workload> [n]` runs one workload alone and prints nothing, for profilers
    // (callgrind, perf) that should see only that workload.
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--profile") {
        let what = args.get(i + 1).map(String::as_str).unwrap_or("");
        let n: usize = args.get(i + 2).and_then(|s| s.parse().ok()).unwrap_or(1_000);
        rt.block_on(async {
            match what {
                "restart" => restart_ours(n).await.show(),
                "restart-bare" => restart_bare(n).await.show(),
                "restart-kameo" => restart_kameo(n).await.show(),
                "spawn" => eprintln!("{:?}", spawn_ours(n).await),
                "spawn-dynamic" => eprintln!("{:?}", spawn_ours_dynamic(n).await),
                "seq-ours" => {
                    let _ = timed_and_counted(|| spawn_ours(10_000)).await;
                    eprintln!("{:?}", spawn_ours_dynamic(n).await)
                }
                "seq-kameo" => {
                    let _ = timed_and_counted(|| spawn_kameo(10_000)).await;
                    eprintln!("{:?}", spawn_ours_dynamic(n).await)
                }
                "spawn-bare" => eprintln!("{:?}", spawn_bare(n).await),
                "spawn-repeat" => {
                    // Alternating warm runs; the medians are steadier than one cold run.
                    let (mut ours, mut start, mut bare) = (Vec::new(), Vec::new(), Vec::new());
                    for _ in 0..9 {
                        let (o, s, _, _) = spawn_ours(n).await;
                        let (b, _, _) = spawn_bare(n).await;
                        ours.push(o);
                        start.push(s);
                        bare.push(b);
                    }
                    for v in [&mut ours, &mut start, &mut bare] {
                        v.sort();
                    }
                    let (_, (_, _, _, ao)) = timed_and_counted(|| spawn_ours(n)).await;
                    let (_, (_, _, ab)) = timed_and_counted(|| spawn_bare(n)).await;
                    eprintln!(
                        "median per child: ours {:?} (start only {:?}), bare {:?}; allocations per child: ours {ao:.2}, bare {ab:.2}",
                        ours[4], start[4], bare[4]
                    );
                }
                "heartbeat" => {
                    supervisor_cpu::install();
                    let (all, sup, _) = heartbeat_ours(n, Duration::from_secs(2), 0, true).await;
                    eprintln!("all {all:?} supervisor {sup:?} polls {}", supervisor_cpu::spent().1);
                }
                "heartbeat-plain" => {
                    drop(heartbeat_ours(n, Duration::from_secs(2), 0, false).await)
                }
                "heartbeat-bare" => drop(heartbeat_bare(n, Duration::from_secs(2)).await),
                other => eprintln!("unknown workload {other:?}"),
            }
        });
        return;
    }

    rt.block_on(async {
        // Warm up the allocator and the scheduler.
        restart_bare(200).await;
        restart_ours(200).await;
        restart_kameo(200).await;

        let bare = restart_bare(restarts).await;
        let ours = restart_ours(restarts).await;
        let kameo = restart_kameo(restarts).await;

        let ((sb, _, _), (_, mb, ab)) = timed_and_counted(|| spawn_bare(spawns)).await;
        let ((so, so_start, _, _), (_, _, mo, ao)) = timed_and_counted(|| spawn_ours(spawns)).await;
        let ((sk, _), (_, mk)) = timed_and_counted(|| spawn_kameo(spawns)).await;
        let sd = spawn_ours_dynamic(dynamic).await;

        // Two alternating rounds; the smaller CPU figure of each is the least disturbed by
        // other load on the machine.
        let mut cpu_bare = Duration::MAX;
        let mut cpu_ours = Duration::MAX;
        let mut cpu_plain = Duration::MAX;
        let mut cpu_sup = Duration::MAX;
        let mut late = Vec::new();
        supervisor_cpu::install();
        for _ in 0..2 {
            cpu_bare = cpu_bare.min(heartbeat_bare(workers, hb_run).await);
            let (c, _, _) = heartbeat_ours(workers, hb_run, 0, false).await;
            cpu_plain = cpu_plain.min(c);
            let (c, s, l) = heartbeat_ours(workers, hb_run, victims, true).await;
            cpu_ours = cpu_ours.min(c);
            cpu_sup = cpu_sup.min(s);
            late.extend(l);
        }

        let pct = |d: Duration| d.as_secs_f64() / hb_run.as_secs_f64() * 100.0;
        let overhead = cpu_ours.saturating_sub(cpu_bare);
        let mut late_sorted = late.clone();
        late_sorted.sort();
        let max_late = late_sorted.last().copied().unwrap_or_default();
        let med_late = percentile(&late_sorted, 0.5);

        println!("### Supervisor: worker restarts, spawn cost, heartbeats");
        println!();
        println!(
            "Tokio multi-thread runtime, 2 workers{}. Restart latency: panic inside the worker → replacement running, {restarts} consecutive restarts of one child (one-for-one, no backoff). Spawn: {spawns} idle children until all run. Heartbeats: {workers} workers beating every 100 ms (phases spread over the period), deadline 1 s, over {:?} (two alternating rounds, the lower CPU figure kept); {victims} extra workers go silent to time hang detection.",
            if quick { ", quick mode" } else { "" },
            hb_run
        );
        println!();
        println!("| measure | architectlm-supervisor | bare `JoinHandle` loop | kameo 0.19.2 (`on_link_died` re-spawn) | ours / bare | ours / kameo |");
        println!("|---|---|---|---|---|---|");
        println!(
            "| restart latency p50 | {} | {} | {} | {} | {} |",
            us(ours.p50), us(bare.p50), us(kameo.p50), ratio(ours.p50, bare.p50), ratio(ours.p50, kameo.p50)
        );
        println!(
            "| restart latency p99 | {} | {} | {} | {} | {} |",
            us(ours.p99), us(bare.p99), us(kameo.p99), ratio(ours.p99, bare.p99), ratio(ours.p99, kameo.p99)
        );
        println!(
            "| spawn, per child (static tree) | {} | {} | {} | {} | {} |",
            us(so), us(sb), us(sk), ratio(so, sb), ratio(so, sk)
        );
        println!(
            "| spawn, per child (static tree, start only: spec built beforehand) | {} | {} | {} | {} | {} |",
            us(so_start), us(sb), us(sk), ratio(so_start, sb), ratio(so_start, sk)
        );
        println!(
            "| spawn, per child (`start_child` round trip, {dynamic} in a row) | {} | – | – | {} | {} |",
            us(sd), ratio(sd, sb), ratio(sd, sk)
        );
        println!(
            "| live heap per idle child (counting allocator, separate run) | {} B | {} B | {} B | +{} B | – |",
            mo, mb, mk, mo - mb
        );
        println!(
            "| heap allocations per child (spec built and started; counting run) | {ao:.2} | {ab:.2} | – | +{:.2} | – |",
            ao - ab
        );
        println!(
            "| CPU of {workers} beating workers | {:.2} % of a core | {:.2} % (no heartbeat checks) | – | +{:.2} % of a core | – |",
            pct(cpu_ours), pct(cpu_bare), pct(overhead)
        );
        println!(
            "| of which the supervisor loop's own polls (thread CPU time in its span) | {:.3} % of a core | – | – | – | – |",
            pct(cpu_sup)
        );
        println!(
            "| CPU of the same {workers} supervised workers without heartbeats | {:.2} % of a core | {:.2} % | – | +{:.2} % of a core | – |",
            pct(cpu_plain), pct(cpu_bare), pct(cpu_plain.saturating_sub(cpu_bare))
        );
        println!(
            "| hang detected after its deadline, median / max of {} victims | {} / {} | – | – | – | – |",
            late.len(),
            us(med_late),
            us(max_late)
        );
        println!();
        println!("kameo has no restart or heartbeat of its own: its peer is a supervisor actor that spawns a fresh linked child in `on_link_died`, the pattern its book describes. Ratios compare figures from this same run.");
    });
}
