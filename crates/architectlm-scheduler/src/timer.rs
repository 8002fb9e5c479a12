//! The timer core: one slab-backed delay queue holding at most one timer per entry (its next
//! run), polled by a single driver task.
//!
//! There is no task per pending timer and no periodic scan of the entries: inserting, moving and
//! removing a timer is O(1) on a hierarchical wheel (`tokio_util::time::DelayQueue`, 1 ms
//! resolution), and the driver sleeps until the earliest deadline. Deadlines further than
//! [`MAX_TIMER`] are armed for that long and re-armed when it passes. When a timer expires the
//! driver checks the wall clock again and re-arms the timer if its due time has not been
//! reached, so nothing fires early.

use std::collections::HashMap;
use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;

use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use tokio::time::Instant;
use tokio_util::time::DelayQueue;
use tokio_util::time::delay_queue::Key;
use uuid::Uuid;

use crate::clock::{Clock, MAX_TIMER};

/// What a timer carries: the entry, the occurrence's due time and the (jittered) time it may
/// start at, which is never before the due time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timer {
    pub(crate) id: Uuid,
    pub(crate) due: DateTime<Utc>,
    pub(crate) fire_at: DateTime<Utc>,
}

#[derive(Default)]
struct Queue {
    queue: Option<DelayQueue<Timer>>,
    keys: HashMap<Uuid, Key>,
}

/// The set of armed timers. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Timers {
    inner: Arc<Mutex<Queue>>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Timers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timers")
            .field("armed", &self.len())
            .finish()
    }
}

impl Timers {
    pub(crate) fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Queue::default())),
            clock,
        }
    }

    fn instant_for(&self, at: DateTime<Utc>) -> Instant {
        let now = Instant::now();
        let when = self.clock.deadline(at);
        when.min(now + MAX_TIMER)
    }

    /// Arms (or moves) the timer of `timer.id`. Must be called inside a Tokio runtime.
    pub(crate) fn arm(&self, timer: Timer) {
        self.arm_many(std::iter::once(timer));
    }

    /// Arms many timers under one lock (recovery, batch inserts).
    pub(crate) fn arm_many(&self, timers: impl IntoIterator<Item = Timer>) {
        let mut q = self.inner.lock();
        let Queue { queue, keys } = &mut *q;
        let queue = queue.get_or_insert_with(DelayQueue::new);
        for timer in timers {
            let when = self.instant_for(timer.fire_at);
            if let Some(key) = keys.get(&timer.id) {
                queue.try_remove(key);
            }
            let key = queue.insert_at(timer, when);
            keys.insert(timer.id, key);
        }
    }

    /// Removes the timer of `id`, if armed.
    pub(crate) fn disarm(&self, id: Uuid) {
        let mut q = self.inner.lock();
        let Queue { queue, keys } = &mut *q;
        if let (Some(key), Some(queue)) = (keys.remove(&id), queue.as_mut()) {
            queue.try_remove(&key);
            if queue.is_empty() {
                // Gives the memory of a drained queue back (after mass cancellations).
                queue.shrink_to_fit();
                keys.shrink_to_fit();
            }
        }
    }

    /// Armed timers.
    pub(crate) fn len(&self) -> usize {
        self.inner.lock().keys.len()
    }

    /// Waits for the next expired timers and returns every one that is due by the wall clock;
    /// timers whose wall time has not come yet are re-armed.
    pub(crate) async fn next_batch(&self, out: &mut Vec<Timer>) {
        loop {
            let mut early = Vec::new();
            poll_fn(|cx| {
                let mut q = self.inner.lock();
                let Queue { queue, keys } = &mut *q;
                let queue = queue.get_or_insert_with(DelayQueue::new);
                while let Poll::Ready(Some(exp)) = queue.poll_expired(cx) {
                    let t = exp.into_inner();
                    keys.remove(&t.id);
                    if self.clock.now() >= t.fire_at {
                        out.push(t);
                    } else {
                        early.push(t);
                    }
                    if out.len() >= 4096 {
                        break;
                    }
                }
                if out.is_empty() && early.is_empty() {
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            })
            .await;
            if !early.is_empty() {
                // The monotonic deadline passed before the wall clock reached the due time (the
                // clocks drift apart): wait for the rest, at least one tick, so this never spins.
                let now = self.clock.now();
                let mut q = self.inner.lock();
                let Queue { queue, keys } = &mut *q;
                let queue = queue.get_or_insert_with(DelayQueue::new);
                for t in early {
                    let rest = (t.fire_at - now)
                        .to_std()
                        .unwrap_or_default()
                        .max(std::time::Duration::from_millis(1));
                    let key = queue.insert_at(t, Instant::now() + rest.min(MAX_TIMER));
                    keys.insert(t.id, key);
                }
            }
            if !out.is_empty() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::clock::TokioClock;

    fn t0() -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default()
    }

    #[tokio::test(start_paused = true)]
    async fn timers_fire_in_order_never_early_and_can_move_or_go() {
        let clock = Arc::new(TokioClock::starting_at(t0()));
        let timers = Timers::new(clock.clone());
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let at = |s: i64| t0() + chrono::Duration::seconds(s);
        timers.arm(Timer {
            id: a,
            due: at(5),
            fire_at: at(5),
        });
        timers.arm(Timer {
            id: b,
            due: at(2),
            fire_at: at(2),
        });
        timers.arm(Timer {
            id: c,
            due: at(3),
            fire_at: at(3),
        });
        timers.arm(Timer {
            id: b,
            due: at(4),
            fire_at: at(4),
        });
        timers.disarm(c);
        assert_eq!(timers.len(), 2);
        let mut out = Vec::new();
        timers.next_batch(&mut out).await;
        assert_eq!(out.iter().map(|t| t.id).collect::<Vec<_>>(), vec![b]);
        assert!(clock.now() >= at(4));
        out.clear();
        timers.next_batch(&mut out).await;
        assert_eq!(out[0].id, a);
        assert!(clock.now() >= at(5));
        assert_eq!(timers.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn far_deadlines_are_clamped_and_rearmed() {
        let clock = Arc::new(TokioClock::starting_at(t0()));
        let timers = Timers::new(clock.clone());
        let id = Uuid::new_v4();
        let far = t0() + chrono::Duration::days(3 * 365);
        timers.arm(Timer {
            id,
            due: far,
            fire_at: far,
        });
        let mut out = Vec::new();
        timers.next_batch(&mut out).await;
        assert_eq!(out[0].id, id);
        assert!(clock.now() >= far);
        assert!(clock.now() - far < chrono::Duration::seconds(1));
        let _ = Duration::ZERO;
    }
}
