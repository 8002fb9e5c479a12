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
    /// Whether a success could still raise a rate (the window is not yet full).
    pub(crate) filling: bool,
}

pub(crate) enum Window {
    Count(CountWindow),
    Time(Box<Mutex<TimeWindow>>),
}

impl Window {
    pub(crate) fn record(&self, flags: u8, now: u64) -> Totals {
        match self {
            Self::Count(w) => w.record(flags),
            Self::Time(w) => w.lock().record(flags, now),
        }
    }

    pub(crate) fn clear(&self) {
        match self {
            Self::Count(w) => w.clear(),
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
    head: AtomicU64,
    failures: AtomicI64,
    slow: AtomicI64,
}

impl CountWindow {
    pub(crate) fn new(size: u32) -> Self {
        Self {
            slots: (0..size.max(1)).map(|_| AtomicU8::new(0)).collect(),
            head: AtomicU64::new(0),
            failures: AtomicI64::new(0),
            slow: AtomicI64::new(0),
        }
    }

    #[inline]
    pub(crate) fn record(&self, flags: u8) -> Totals {
        let len = self.slots.len() as u64;
        let i = self.head.fetch_add(1, Ordering::Relaxed);
        let new = flags | FILLED;
        let slot = &self.slots[(i % len) as usize];
        // A run of identical outcomes does not write the slot at all.
        let old = if slot.load(Ordering::Relaxed) == new {
            new
        } else {
            slot.swap(new, Ordering::Relaxed)
        };
        let changed = old ^ new;
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
        Totals {
            calls: (i + 1).min(len),
            // Counters can be transiently negative while racing updates land; clamp.
            failures: failures.max(0) as u64,
            slow: slow.max(0) as u64,
            filling: i < len,
        }
    }

    fn clear(&self) {
        for s in self.slots.iter() {
            s.store(0, Ordering::Relaxed);
        }
        self.head.store(0, Ordering::Relaxed);
        self.failures.store(0, Ordering::Relaxed);
        self.slow.store(0, Ordering::Relaxed);
    }
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
            filling: true,
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
        assert_eq!(w.record(FAILED).failures, 1);
        w.record(FAILED);
        w.record(0);
        let t = w.record(SLOW);
        assert_eq!((t.calls, t.failures, t.slow, t.filling), (4, 2, 1, true));
        // Two successes push both failures out of the window.
        w.record(0);
        let t = w.record(0);
        assert_eq!((t.calls, t.failures, t.slow, t.filling), (4, 0, 1, false));
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
