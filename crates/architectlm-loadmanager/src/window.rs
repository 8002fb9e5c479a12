//! Sliding windows of call outcomes for the failure-rate and slow-call-rate rules.
//!
//! The count-based window is lock-free: a ring of one-byte slots claimed with `fetch_add`, and
//! two signed counters adjusted only when a slot's flags change, so a run of successes writes
//! nothing but the ring. Counters may lag each other by the calls in flight, never drift.
//! The time-based window keeps ten buckets under a mutex.

use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU64, Ordering};

use parking_lot::Mutex;

/// The call failed.
pub(crate) const FAILED: u8 = 1;
/// The call was slow.
pub(crate) const SLOW: u8 = 2;
const FILLED: u8 = 4;

/// Aggregates of a window after a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Totals {
    pub(crate) calls: u64,
    pub(crate) failures: u64,
    pub(crate) slow: u64,
}

pub(crate) enum Window {
    Count(CountWindow),
    Time(Box<Mutex<TimeWindow>>),
}

impl Window {
    /// Records one outcome; returns the totals only when the record could have raised a rate
    /// (a failure or slow call, or a window still filling up).
    #[inline]
    pub(crate) fn record(&self, head: &AtomicU64, flags: u8, now: u64) -> Option<Totals> {
        match self {
            Self::Count(w) => w.record(head, flags),
            Self::Time(w) => Some(w.lock().record(flags, now)),
        }
    }

    pub(crate) fn clear(&self, head: &AtomicU64) {
        match self {
            Self::Count(w) => w.clear(head),
            Self::Time(w) => w.lock().clear(),
        }
    }

    pub(crate) fn bytes(&self) -> usize {
        match self {
            Self::Count(w) => w.slots.len(),
            Self::Time(_) => std::mem::size_of::<TimeWindow>() + 10 * std::mem::size_of::<Bucket>(),
        }
    }
}

pub(crate) struct CountWindow {
    slots: Box<[AtomicU8]>,
    /// Lemire's fastmod constant for `slots.len()`: a slot index without a division.
    magic: u64,
    failures: AtomicI64,
    slow: AtomicI64,
}

impl CountWindow {
    pub(crate) fn new(size: u32) -> Self {
        let size = size.max(1);
        Self {
            magic: (u64::MAX / u64::from(size)).wrapping_add(1),
            slots: (0..size).map(|_| AtomicU8::new(0)).collect(),
            failures: AtomicI64::new(0),
            slow: AtomicI64::new(0),
        }
    }

    /// Records one outcome. `head` counts the records; the resource keeps it on the cache
    /// line of its usage counter, so a call touches one contended line, not two.
    #[inline]
    pub(crate) fn record(&self, head: &AtomicU64, flags: u8) -> Option<Totals> {
        let len = self.slots.len() as u64;
        let i = head.fetch_add(1, Ordering::Relaxed);
        let new = flags | FILLED;
        // The index wraps at 2^32 calls: one out-of-order slot every four billion calls.
        let slot = &self.slots[fastmod(i as u32, self.magic, len as u32) as usize];
        // A run of identical outcomes does not write the slot at all.
        let old = if slot.load(Ordering::Relaxed) == new {
            new
        } else {
            slot.swap(new, Ordering::Relaxed)
        };
        let changed = old ^ new;
        let filling = i < len;
        if changed == 0 && flags == 0 && !filling {
            // A success over a success in a full window changes no rate.
            return None;
        }
        let mut failures = None;
        let mut slow = None;
        if changed & FAILED != 0 {
            let d = if new & FAILED != 0 { 1 } else { -1 };
            failures = Some(self.failures.fetch_add(d, Ordering::Relaxed) + d);
        }
        if changed & SLOW != 0 {
            let d = if new & SLOW != 0 { 1 } else { -1 };
            slow = Some(self.slow.fetch_add(d, Ordering::Relaxed) + d);
        }
        let failures = failures.unwrap_or_else(|| self.failures.load(Ordering::Relaxed));
        let slow = slow.unwrap_or_else(|| self.slow.load(Ordering::Relaxed));
        Some(Totals {
            calls: (i + 1).min(len),
            // Counters can be transiently negative while racing updates land; clamp.
            failures: failures.max(0) as u64,
            slow: slow.max(0) as u64,
        })
    }

    fn clear(&self, head: &AtomicU64) {
        for s in self.slots.iter() {
            s.store(0, Ordering::Relaxed);
        }
        head.store(0, Ordering::Relaxed);
        self.failures.store(0, Ordering::Relaxed);
        self.slow.store(0, Ordering::Relaxed);
    }
}

/// `a % d` with `magic = u64::MAX / d + 1` (Lemire, Kaser, Kurz: "Faster remainder by direct
/// computation", 2019).
#[inline]
fn fastmod(a: u32, magic: u64, d: u32) -> u32 {
    let low = magic.wrapping_mul(u64::from(a));
    ((u128::from(low) * u128::from(d)) >> 64) as u32
}

#[derive(Clone, Copy, Default)]
struct Bucket {
    epoch: u64,
    calls: u64,
    failures: u64,
    slow: u64,
}

pub(crate) struct TimeWindow {
    bucket_nanos: u64,
    buckets: [Bucket; 10],
}

impl TimeWindow {
    pub(crate) fn new(span_nanos: u64) -> Self {
        Self {
            bucket_nanos: (span_nanos / 10).max(1),
            buckets: [Bucket::default(); 10],
        }
    }

    fn record(&mut self, flags: u8, now: u64) -> Totals {
        // Epochs start at 1 so that an untouched bucket (epoch 0) never counts.
        let epoch = now / self.bucket_nanos + 1;
        let b = &mut self.buckets[(epoch % 10) as usize];
        if b.epoch != epoch {
            *b = Bucket {
                epoch,
                ..Bucket::default()
            };
        }
        b.calls += 1;
        b.failures += u64::from(flags & FAILED != 0);
        b.slow += u64::from(flags & SLOW != 0);
        let mut t = Totals {
            calls: 0,
            failures: 0,
            slow: 0,
        };
        for b in self
            .buckets
            .iter()
            .filter(|b| b.epoch + 10 > epoch && b.epoch != 0)
        {
            t.calls += b.calls;
            t.failures += b.failures;
            t.slow += b.slow;
        }
        t
    }

    fn clear(&mut self) {
        self.buckets = [Bucket::default(); 10];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_window_keeps_the_last_n_outcomes() {
        let w = CountWindow::new(4);
        let head = AtomicU64::new(0);
        let w = |f| w.record(&head, f);
        assert_eq!(w(FAILED).unwrap().failures, 1);
        w(FAILED);
        w(0);
        let t = w(SLOW).unwrap();
        assert_eq!((t.calls, t.failures, t.slow), (4, 2, 1));
        // Two successes push both failures out of the window.
        w(0);
        let t = w(0).unwrap();
        assert_eq!((t.calls, t.failures, t.slow), (4, 0, 1));
        // A success over a success in a full window reports nothing.
        w(0);
        w(0);
        assert_eq!(w(0), None);
        let t = w(FAILED).unwrap();
        assert_eq!((t.calls, t.failures, t.slow), (4, 1, 0));
    }

    #[test]
    fn fastmod_matches_the_remainder() {
        for d in [1u32, 2, 3, 7, 10, 100, 1000, 65_537, u32::MAX] {
            let magic = (u64::MAX / u64::from(d)).wrapping_add(1);
            for a in [0u32, 1, 2, 99, 100, 101, 12_345, u32::MAX - 1, u32::MAX] {
                assert_eq!(fastmod(a, magic, d), a % d, "{a} % {d}");
            }
        }
    }

    #[test]
    fn time_window_forgets_old_buckets() {
        let mut w = TimeWindow::new(1_000);
        w.record(FAILED, 0);
        w.record(FAILED, 450);
        let t = w.record(0, 950);
        assert_eq!((t.calls, t.failures), (3, 2));
        // 1000 ns later the first bucket has left the window, the one at 450 has not.
        let t = w.record(0, 1_000);
        assert_eq!((t.calls, t.failures), (3, 1));
        let t = w.record(0, 5_000);
        assert_eq!((t.calls, t.failures), (1, 0));
    }
}
