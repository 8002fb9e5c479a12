//! The timer core: at most one timer per entry (its next run) in a binary heap ordered by
//! wall-clock time, polled by a single driver task.
//!
//! There is no task per pending timer and no periodic scan of the entries. A timer is 32 bytes
//! in the heap plus its place in the id map (20 bytes); inserting is O(log n). The rare timers
//! that carry a `late_from` after their time keep it in a side map. Moving or removing a timer
//! leaves the old heap item behind as stale (recognised by its generation) instead of searching
//! for it; stale items are dropped when they reach the top, and the heap is compacted and its
//! memory given back once stale items outnumber live ones. The driver sleeps until the earliest
//! deadline (at most [`MAX_TIMER`] ahead) or until an earlier timer is armed. When a timer's
//! deadline passes, the driver checks the wall clock and only hands out timers whose time comes
//! within the acquire window.
//!
//! Runs acquired ahead of their time are [held](Timers::hold) by instant (millisecond) until
//! the wall clock reaches it, then handed to the driver all at once: nothing starts early, and
//! thousands of runs due at one instant cost one wake-up, not a timer and a task each.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;
use uuid::Uuid;

use crate::clock::{Clock, MAX_TIMER};
use crate::idhash::IdMap;

/// Most timers handed out per wake of the driver.
const BATCH: usize = 4096;

/// Held items come out in chunks of at most this many, built as they are held (so that
/// handing out thousands of them at their instant allocates nothing).
pub(crate) const HELD_CHUNK: usize = 128;

/// How long before the instant of held runs the driver stops relying on Tokio's
/// millisecond timer (see [`Clock::precise_wait`]).
const PRECISE_WINDOW: Duration = Duration::from_millis(2);

/// What a timer carries: the entry, the occurrence's due time, the (jittered) time it may
/// start at, which is never before the due time, and the time lateness is measured from when
/// that is later than the start time (see the scheduler's `late_from`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timer {
    pub(crate) id: Uuid,
    pub(crate) due: DateTime<Utc>,
    pub(crate) fire_at: DateTime<Utc>,
    pub(crate) late_from: Option<DateTime<Utc>>,
}

/// A timer as kept in the heap.
#[derive(Debug, Clone, Copy)]
struct Item {
    /// Milliseconds since the epoch, rounded up, so that firing at this millisecond is never
    /// early.
    fire_at: i64,
    id: Uuid,
    generation: u32,
    /// `fire_at` minus the due time (milliseconds, rounded down): the jitter.
    jitter: u32,
}

impl Item {
    fn timer(&self, late_from: Option<i64>) -> Timer {
        let t = |ms: i64| DateTime::from_timestamp_millis(ms).unwrap_or_default();
        Timer {
            id: self.id,
            due: t(self.fire_at - i64::from(self.jitter)),
            fire_at: t(self.fire_at),
            late_from: late_from.map(t),
        }
    }
}

impl PartialEq for Item {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Item {}

impl PartialOrd for Item {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Item {
    /// Reversed: the earliest timer is the greatest, at the top of the max-heap.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.fire_at, other.generation).cmp(&(self.fire_at, self.generation))
    }
}

fn ceil_ms(t: DateTime<Utc>) -> i64 {
    let ms = t.timestamp_millis();
    if t.timestamp_subsec_nanos().is_multiple_of(1_000_000) {
        ms
    } else {
        ms.saturating_add(1)
    }
}

struct Queue<R> {
    heap: BinaryHeap<Item>,
    /// What is held for an instant (milliseconds) not reached yet, in chunks.
    held: BTreeMap<i64, Vec<Vec<R>>>,
    /// The generation of each entry's live timer.
    live: IdMap<u32>,
    /// `late_from` of the live timers that have one later than their time (milliseconds).
    late: IdMap<i64>,
    /// Wraps around; a stale item whose generation comes round again is caught by the
    /// scheduler, which re-arms an active entry that finds itself without a timer.
    generation: u32,
    /// Heap items whose timer was moved or removed.
    stale: usize,
}

impl<R> Default for Queue<R> {
    fn default() -> Self {
        Self {
            heap: BinaryHeap::new(),
            held: BTreeMap::new(),
            live: IdMap::default(),
            late: IdMap::default(),
            generation: 0,
            stale: 0,
        }
    }
}

impl<R> Queue<R> {
    fn is_live(&self, item: &Item) -> bool {
        self.live.get(&item.id) == Some(&item.generation)
    }

    /// Drops stale items and gives memory back once they outnumber the live ones.
    fn compact(&mut self) {
        if self.stale <= 1024 || self.stale <= self.live.len() {
            return;
        }
        let live = &self.live;
        self.heap.retain(|i| live.get(&i.id) == Some(&i.generation));
        self.stale = 0;
        if self.heap.capacity() > 2 * self.heap.len() + 1024 {
            self.heap.shrink_to_fit();
        }
        if self.live.capacity() > 2 * self.live.len() + 1024 {
            self.live.shrink_to_fit();
        }
        if self.late.capacity() > 2 * self.late.len() + 1024 {
            self.late.shrink_to_fit();
        }
    }
}

/// The set of armed timers, and what is held for an instant (`R`). Cheap to clone.
pub(crate) struct Timers<R> {
    inner: Arc<Mutex<Queue<R>>>,
    wake: Arc<Notify>,
    clock: Arc<dyn Clock>,
}

impl<R> Clone for Timers<R> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            wake: self.wake.clone(),
            clock: self.clock.clone(),
        }
    }
}

impl<R> std::fmt::Debug for Timers<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timers")
            .field("armed", &self.len())
            .finish()
    }
}

impl<R> Timers<R> {
    pub(crate) fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Queue::default())),
            wake: Arc::new(Notify::new()),
            clock,
        }
    }

    /// Arms (or moves) the timer of `timer.id`.
    pub(crate) fn arm(&self, timer: Timer) {
        self.arm_many(std::iter::once(timer));
    }

    /// Arms many timers under one lock (recovery, batch inserts).
    pub(crate) fn arm_many(&self, timers: impl IntoIterator<Item = Timer>) {
        let timers = timers.into_iter();
        let mut q = self.inner.lock();
        let before = q.heap.peek().map(|i| i.fire_at);
        let (lower, _) = timers.size_hint();
        let (len, cap) = (q.heap.len(), q.heap.capacity());
        if len + lower > cap {
            // Grow by a quarter rather than double: a large heap is the bulk of the memory.
            q.heap.reserve_exact(lower.max(len / 4));
        }
        q.live.reserve(lower);
        let mut earliest = i64::MAX;
        for t in timers {
            q.generation = q.generation.wrapping_add(1);
            let generation = q.generation;
            if q.live.insert(t.id, generation).is_some() {
                q.stale += 1;
            }
            let due = t.due.timestamp_millis();
            // A jitter beyond 49 days is cut to that.
            let fire_at =
                ceil_ms(t.fire_at.max(t.due)).min(due.saturating_add(i64::from(u32::MAX)));
            let jitter = u32::try_from(fire_at - due).unwrap_or(u32::MAX);
            match t.late_from.map(|l| l.timestamp_millis()) {
                Some(l) if l > fire_at => {
                    q.late.insert(t.id, l);
                }
                _ if !q.late.is_empty() => {
                    q.late.remove(&t.id);
                }
                _ => {}
            }
            earliest = earliest.min(fire_at);
            q.heap.push(Item {
                fire_at,
                id: t.id,
                generation,
                jitter,
            });
        }
        q.compact();
        drop(q);
        if before.is_none_or(|b| earliest < b) {
            // An earlier deadline than the one the driver sleeps for.
            self.wake.notify_one();
        }
    }

    /// Removes the timer of `id`, if armed.
    pub(crate) fn disarm(&self, id: Uuid) {
        let mut q = self.inner.lock();
        if q.live.remove(&id).is_some() {
            q.stale += 1;
            if !q.late.is_empty() {
                q.late.remove(&id);
            }
            if q.live.is_empty() {
                // Nothing is armed: give all the memory back (after mass cancellations).
                q.heap = BinaryHeap::new();
                q.live = IdMap::default();
                q.late = IdMap::default();
                q.stale = 0;
            } else {
                q.compact();
            }
        }
    }

    /// Holds `item` until the wall clock reaches `at`, when [`next_batch`](Self::next_batch)
    /// hands it out; gives it back if the wall clock has reached `at` already.
    pub(crate) fn hold(&self, at: DateTime<Utc>, item: R) -> Result<(), R> {
        let key = ceil_ms(at);
        if key <= self.clock.now().timestamp_millis() {
            return Err(item);
        }
        let mut q = self.inner.lock();
        let earliest = q.held.keys().next().is_none_or(|&k| key < k);
        let chunks = q.held.entry(key).or_default();
        match chunks.last_mut() {
            Some(c) if c.len() < HELD_CHUNK => c.push(item),
            _ => {
                let mut c = Vec::with_capacity(HELD_CHUNK);
                c.push(item);
                chunks.push(c);
            }
        }
        drop(q);
        if earliest {
            // The driver may be sleeping past it.
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Moves what is held for instants up to `now` to `out`, in chunks of at most
    /// [`HELD_CHUNK`]; returns the next instant held.
    fn release_held(&self, now: i64, out: &mut Vec<Vec<R>>) -> Option<i64> {
        let mut q = self.inner.lock();
        loop {
            match q.held.first_key_value() {
                Some((&k, _)) if k <= now => {
                    if let Some((_, items)) = q.held.pop_first() {
                        if out.is_empty() {
                            *out = items;
                        } else {
                            out.extend(items);
                        }
                    }
                }
                Some((&k, _)) => return Some(k),
                None => return None,
            }
        }
    }

    /// Wakes the driver waiting in [`next_batch`](Self::next_batch) (there is room again).
    pub(crate) fn notify(&self) {
        self.wake.notify_one();
    }

    /// Whether `id` has a timer armed.
    pub(crate) fn is_armed(&self, id: Uuid) -> bool {
        self.inner.lock().live.contains_key(&id)
    }

    /// Armed timers.
    pub(crate) fn len(&self) -> usize {
        self.inner.lock().live.len()
    }

    /// Waits for the next timers whose time comes within `ahead` by the wall clock, or for
    /// what is [held](Self::hold) for an instant the wall clock has reached, and returns them:
    /// the timers (up to a batch, earliest first) in `out`, the held items in `ready` (in
    /// chunks of at most [`HELD_CHUNK`]). With
    /// `ahead` zero, only timers whose time has come. At most `room` timers are handed out;
    /// with no room, only held items (until [`notify`](Self::notify) is called).
    pub(crate) async fn next_batch(
        &self,
        out: &mut Vec<Timer>,
        ready: &mut Vec<Vec<R>>,
        ahead: Duration,
        room: usize,
    ) {
        let ahead = i64::try_from(ahead.as_millis()).unwrap_or(i64::MAX);
        let room = room.min(BATCH);
        loop {
            let notified = self.wake.notified();
            let wall = self.clock.now().timestamp_millis();
            let held = self.release_held(wall, ready);
            let next = if room == 0 {
                None
            } else {
                let now = wall.saturating_add(ahead);
                let mut q = self.inner.lock();
                let mut next = None;
                while let Some(top) = q.heap.peek().copied() {
                    if !q.is_live(&top) {
                        q.heap.pop();
                        q.stale = q.stale.saturating_sub(1);
                        continue;
                    }
                    if top.fire_at > now {
                        next = Some(top.fire_at);
                        break;
                    }
                    q.heap.pop();
                    q.live.remove(&top.id);
                    let late = if q.late.is_empty() {
                        None
                    } else {
                        q.late.remove(&top.id)
                    };
                    out.push(top.timer(late));
                    if out.len() >= room {
                        break;
                    }
                }
                next
            };
            if !out.is_empty() || !ready.is_empty() {
                return;
            }
            // Held runs start at their instant to the tick of the wall clock, acquisitions
            // need no such precision.
            let (next, precise) = match (next.map(|n| n.saturating_sub(ahead)), held) {
                (Some(a), Some(h)) if h <= a => (Some(h), true),
                (Some(a), _) => (Some(a), false),
                (None, h) => (h, h.is_some()),
            };
            let precise = precise && self.clock.precise_wait();
            match next {
                Some(at) => {
                    let at = DateTime::from_timestamp_millis(at).unwrap_or_default();
                    let now = Instant::now();
                    let deadline = self.clock.deadline(at);
                    if precise && deadline <= now + PRECISE_WINDOW {
                        // The last stretch is slept on a blocking thread, which wakes within
                        // microseconds of the time rather than at the next millisecond tick.
                        let left = deadline
                            .saturating_duration_since(now)
                            .max(Duration::from_micros(50));
                        let sleep = tokio::task::spawn_blocking(move || std::thread::sleep(left));
                        tokio::select! {
                            slept = sleep => if slept.is_err() {
                                // No blocking thread (the runtime is shutting down): wait a
                                // tick instead, so that this never spins.
                                tokio::time::sleep(Duration::from_millis(1)).await;
                            },
                            // With no room, the caller looks again for room.
                            () = notified => if room == 0 { return },
                        }
                        continue;
                    }
                    // Tokio's timer wakes up to a tick or two late: a precise wait wakes that
                    // much early and sleeps the rest as above.
                    let deadline = if precise {
                        deadline - PRECISE_WINDOW
                    } else {
                        deadline
                    };
                    // The monotonic deadline may pass before the wall clock reaches the time
                    // (the clocks drift apart): then wait at least a tick, so this never spins.
                    let deadline = if deadline > now {
                        deadline.min(now + MAX_TIMER)
                    } else {
                        now + Duration::from_millis(1)
                    };
                    tokio::select! {
                        () = tokio::time::sleep_until(deadline) => {}
                        () = notified => if room == 0 { return },
                    }
                }
                None => {
                    notified.await;
                    if room == 0 {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::TokioClock;

    fn t0() -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default()
    }

    #[tokio::test(start_paused = true)]
    async fn timers_fire_in_order_never_early_and_can_move_or_go() {
        let clock = Arc::new(TokioClock::starting_at(t0()));
        let timers = Timers::<()>::new(clock.clone());
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let at = |s: i64| t0() + chrono::Duration::seconds(s);
        timers.arm(Timer {
            id: a,
            due: at(5),
            fire_at: at(5),
            late_from: None,
        });
        timers.arm(Timer {
            id: b,
            due: at(2),
            fire_at: at(2),
            late_from: None,
        });
        timers.arm(Timer {
            id: c,
            due: at(3),
            fire_at: at(3),
            late_from: None,
        });
        timers.arm(Timer {
            id: b,
            due: at(4),
            fire_at: at(4),
            late_from: None,
        });
        timers.disarm(c);
        assert_eq!(timers.len(), 2);
        let mut out = Vec::new();
        timers
            .next_batch(&mut out, &mut Vec::new(), Duration::ZERO, usize::MAX)
            .await;
        assert_eq!(out.iter().map(|t| t.id).collect::<Vec<_>>(), vec![b]);
        assert!(clock.now() >= at(4));
        out.clear();
        timers
            .next_batch(&mut out, &mut Vec::new(), Duration::ZERO, usize::MAX)
            .await;
        assert_eq!(out[0].id, a);
        assert!(clock.now() >= at(5));
        assert_eq!(timers.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_timer_wakes_the_driver_and_cancelled_ones_give_memory_back() {
        let clock = Arc::new(TokioClock::starting_at(t0()));
        let timers = Timers::<()>::new(clock.clone());
        let at = |s: i64| t0() + chrono::Duration::seconds(s);
        let ids: Vec<Uuid> = (0..5000).map(|_| Uuid::new_v4()).collect();
        timers.arm_many(ids.iter().map(|&id| Timer {
            id,
            due: at(100),
            fire_at: at(100),
            // Kept only when later than the time (otherwise it changes nothing).
            late_from: Some(at(if id.as_u128() % 2 == 0 { 200 } else { 50 })),
        }));
        let driver = {
            let timers = timers.clone();
            tokio::spawn(async move {
                let mut out = Vec::new();
                timers
                    .next_batch(&mut out, &mut Vec::new(), Duration::ZERO, usize::MAX)
                    .await;
                out
            })
        };
        tokio::task::yield_now().await;
        let early = Uuid::new_v4();
        timers.arm(Timer {
            id: early,
            due: at(1),
            fire_at: at(1),
            late_from: None,
        });
        let out = driver.await.unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].id, early);
        assert!(clock.now() >= at(1) && clock.now() < at(2));
        for id in &ids[..4000] {
            timers.disarm(*id);
        }
        assert_eq!(timers.len(), 1000);
        {
            let q = timers.inner.lock();
            assert!(q.heap.len() < 2500, "{} heap items left", q.heap.len());
            assert!(q.late.len() <= 1000);
        }
        let mut out = Vec::new();
        timers
            .next_batch(&mut out, &mut Vec::new(), Duration::ZERO, usize::MAX)
            .await;
        assert_eq!(out.len(), 1000);
        for t in &out {
            let want = (t.id.as_u128() % 2 == 0).then(|| at(200));
            assert_eq!(t.late_from, want);
        }
        for id in &ids[4000..] {
            assert!(out.iter().any(|t| t.id == *id));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn held_items_come_out_together_at_their_instant_never_before() {
        let clock = Arc::new(TokioClock::starting_at(t0()));
        let timers = Timers::<u32>::new(clock.clone());
        let at = |ms: i64| t0() + chrono::Duration::milliseconds(ms);
        // The past gives the item back at once.
        assert_eq!(timers.hold(at(0), 7), Err(7));
        for i in 0..1000 {
            assert_eq!(timers.hold(at(2_000), i), Ok(()));
        }
        assert_eq!(timers.hold(at(1_000), 1000), Ok(()));
        let (mut out, mut ready) = (Vec::new(), Vec::new());
        timers
            .next_batch(&mut out, &mut ready, Duration::ZERO, usize::MAX)
            .await;
        assert_eq!(ready, vec![vec![1000]]);
        assert_eq!(clock.now(), at(1_000));
        ready.clear();
        timers
            .next_batch(&mut out, &mut ready, Duration::ZERO, usize::MAX)
            .await;
        assert!(ready.iter().all(|c| c.len() <= HELD_CHUNK), "in chunks");
        let all: Vec<u32> = ready.concat();
        assert_eq!(
            all,
            (0..1000).collect::<Vec<_>>(),
            "all of one instant at once"
        );
        assert_eq!(clock.now(), at(2_000));
        assert!(out.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn timers_are_handed_out_ahead_of_their_time_within_the_room_given() {
        let clock = Arc::new(TokioClock::starting_at(t0()));
        let timers = Timers::<()>::new(clock.clone());
        let at = t0() + chrono::Duration::seconds(10);
        timers.arm_many((0..10).map(|_| Timer {
            id: Uuid::new_v4(),
            due: at,
            fire_at: at,
            late_from: None,
        }));
        let mut out = Vec::new();
        timers
            .next_batch(&mut out, &mut Vec::new(), Duration::from_millis(100), 4)
            .await;
        assert_eq!(out.len(), 4);
        assert_eq!(clock.now(), at - chrono::Duration::milliseconds(100));
        out.clear();
        timers
            .next_batch(&mut out, &mut Vec::new(), Duration::from_millis(100), 100)
            .await;
        assert_eq!(out.len(), 6);
    }

    #[test]
    fn sub_millisecond_times_round_up() {
        let t = t0() + chrono::Duration::microseconds(1500);
        assert_eq!(ceil_ms(t), t0().timestamp_millis() + 2);
        assert_eq!(ceil_ms(t0()), t0().timestamp_millis());
    }

    #[tokio::test(start_paused = true)]
    async fn far_deadlines_are_clamped_and_rearmed() {
        let clock = Arc::new(TokioClock::starting_at(t0()));
        let timers = Timers::<()>::new(clock.clone());
        let id = Uuid::new_v4();
        let far = t0() + chrono::Duration::days(3 * 365);
        timers.arm(Timer {
            id,
            due: far,
            fire_at: far,
            late_from: None,
        });
        let mut out = Vec::new();
        timers
            .next_batch(&mut out, &mut Vec::new(), Duration::ZERO, usize::MAX)
            .await;
        assert_eq!(out[0].id, id);
        assert!(clock.now() >= far);
        assert!(clock.now() - far < chrono::Duration::seconds(1));
    }
}
