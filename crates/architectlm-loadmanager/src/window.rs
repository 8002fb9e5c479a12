//! Sliding windows of call outcomes for the failure-rate and slow-call-rate rules.
//!
//! The count-based window is lock-free: a ring of two-bit slots (failed, slow), 32 to a word,
//! claimed with `fetch_add` on the head, and one word of two counters adjusted only when a
//! slot's bits change, so a run of successes writes nothing but the head. A window of up to
//! 128 calls keeps its ring inline, with no allocation of its own. Counters may lag each other
//! by the calls in flight, never drift: a slot is replaced by compare-and-swap, which sees its
//! true previous bits.
//! The time-based window keeps ten buckets under a mutex.

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

/// The call failed.
pub(crate) const FAILED: u8 = 1;
/// The call was slow.
pub(crate) const SLOW: u8 = 2;

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

    /// The totals now, without recording (for metrics snapshots).
    pub(crate) fn totals(&self, head: &AtomicU64, now: u64) -> Totals {
        match self {
            Self::Count(w) => w.totals(head),
            Self::Time(w) => w.lock().totals(now),
        }
    }

    /// Heap bytes beyond the `Window` itself.
    pub(crate) fn bytes(&self) -> usize {
        match self {
            Self::Count(w) => w.heap_bytes(),
            Self::Time(_) => std::mem::size_of::<TimeWindow>() + 10 * std::mem::size_of::<Bucket>(),
        }
    }
}

/// Slots per word: two bits each.
const PER_WORD: u32 = 32;
/// Words kept inline: windows of up to 128 calls.
const INLINE_WORDS: usize = 4;

/// The ring's words, with the window's length beside the variant's tag.
enum Ring {
    Inline {
        len: u32,
        words: [AtomicU64; INLINE_WORDS],
    },
    Heap {
        len: u32,
        words: Box<[AtomicU64]>,
    },
}

/// Each counter of [`CountWindow::counters`] is kept biased by 2^31 in its 32-bit half, so that
/// transient negative values (racing updates) never borrow from or carry into the other half.
const BIAS: u64 = 1 << 31;
const BIASED_ZERO: u64 = BIAS | (BIAS << 32);

pub(crate) struct CountWindow {
    ring: Ring,
    /// Failures in the low half, slow calls in the high half, each biased by [`BIAS`].
    counters: AtomicU64,
    /// Lemire's fastmod constant for the length: a slot index without a division.
    magic: u64,
}

impl CountWindow {
    pub(crate) fn new(size: u32) -> Self {
        let len = size.max(1);
        let n = len.div_ceil(PER_WORD) as usize;
        let ring = if n <= INLINE_WORDS {
            Ring::Inline {
                len,
                words: Default::default(),
            }
        } else {
            Ring::Heap {
                len,
                words: (0..n).map(|_| AtomicU64::new(0)).collect(),
            }
        };
        Self {
            ring,
            counters: AtomicU64::new(BIASED_ZERO),
            magic: (u64::MAX / u64::from(len)).wrapping_add(1),
        }
    }

    #[inline]
    fn ring(&self) -> (u32, &[AtomicU64]) {
        match &self.ring {
            Ring::Inline { len, words } => (*len, words),
            Ring::Heap { len, words } => (*len, words),
        }
    }

    fn heap_bytes(&self) -> usize {
        match &self.ring {
            Ring::Inline { .. } => 0,
            Ring::Heap { words, .. } => std::mem::size_of_val::<[AtomicU64]>(words),
        }
    }

    /// Records one outcome. `head` counts the records; the resource keeps it on the cache
    /// line of its usage counter, so a call touches one contended line, not two.
    #[inline]
    pub(crate) fn record(&self, head: &AtomicU64, flags: u8) -> Option<Totals> {
        let (len, words) = self.ring();
        let i = head.fetch_add(1, Ordering::Relaxed);
        let new = u64::from(flags & (FAILED | SLOW));
        // The index wraps at 2^32 calls: one out-of-order slot every four billion calls.
        let slot = fastmod(i as u32, self.magic, len);
        let word = &words[(slot / PER_WORD) as usize];
        let shift = (slot % PER_WORD) * 2;
        let mut cur = word.load(Ordering::Relaxed);
        let old = loop {
            let old = (cur >> shift) & 3;
            // A run of identical outcomes does not write the word at all.
            if old == new {
                break old;
            }
            let next = (cur & !(3 << shift)) | (new << shift);
            match word.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => break old,
                Err(actual) => cur = actual,
            }
        };
        let changed = old ^ new;
        let filling = i < u64::from(len);
        if changed == 0 && new == 0 && !filling {
            // A success over a success in a full window changes no rate.
            return None;
        }
        let mut delta = 0u64;
        if changed & u64::from(FAILED) != 0 {
            delta = if new & u64::from(FAILED) != 0 {
                delta.wrapping_add(1)
            } else {
                delta.wrapping_sub(1)
            };
        }
        if changed & u64::from(SLOW) != 0 {
            delta = if new & u64::from(SLOW) != 0 {
                delta.wrapping_add(1 << 32)
            } else {
                delta.wrapping_sub(1 << 32)
            };
        }
        let counters = if delta == 0 {
            self.counters.load(Ordering::Relaxed)
        } else {
            self.counters
                .fetch_add(delta, Ordering::Relaxed)
                .wrapping_add(delta)
        };
        // Counters can be transiently negative while racing updates land; clamp.
        let half = |c: u64| (c & 0xFFFF_FFFF).saturating_sub(BIAS);
        Some(Totals {
            calls: (i + 1).min(u64::from(len)),
            failures: half(counters),
            slow: half(counters >> 32),
        })
    }

    fn totals(&self, head: &AtomicU64) -> Totals {
        let (len, _) = self.ring();
        let counters = self.counters.load(Ordering::Relaxed);
        let half = |c: u64| (c & 0xFFFF_FFFF).saturating_sub(BIAS);
        Totals {
            calls: head.load(Ordering::Relaxed).min(u64::from(len)),
            failures: half(counters),
            slow: half(counters >> 32),
        }
    }

    fn clear(&self, head: &AtomicU64) {
        for w in self.ring().1 {
            w.store(0, Ordering::Relaxed);
        }
        head.store(0, Ordering::Relaxed);
        self.counters.store(BIASED_ZERO, Ordering::Relaxed);
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

    fn totals(&self, now: u64) -> Totals {
        let epoch = now / self.bucket_nanos + 1;
        let mut t = Totals {
            calls: 0,
            failures: 0,
            slow: 0,
        };
        for b in self
            .buckets
            .iter()
            .filter(|b| b.epoch + 10 > epoch && b.epoch != 0 && b.epoch <= epoch)
        {
            t.calls += b.calls;
            t.failures += b.failures;
            t.slow += b.slow;
        }
        t
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
    fn count_window_of_any_size_keeps_its_last_n_outcomes() {
        // Inline (up to 128 calls) and heap rings, lengths that do and do not fill a word.
        for n in [1u32, 31, 32, 33, 100, 128, 129, 1000] {
            let w = CountWindow::new(n);
            let head = AtomicU64::new(0);
            let mut model: std::collections::VecDeque<u8> = Default::default();
            for k in 0..(3 * n as usize + 7) {
                // A pattern with runs and isolated failures and slow calls.
                let flags = match k % 7 {
                    0 | 1 => FAILED,
                    3 => SLOW,
                    5 => FAILED | SLOW,
                    _ => 0,
                };
                model.push_back(flags);
                if model.len() > n as usize {
                    model.pop_front();
                }
                if let Some(t) = w.record(&head, flags) {
                    let failures = model.iter().filter(|f| *f & FAILED != 0).count() as u64;
                    let slow = model.iter().filter(|f| *f & SLOW != 0).count() as u64;
                    assert_eq!(
                        (t.calls, t.failures, t.slow),
                        (model.len() as u64, failures, slow),
                        "n = {n}, call {k}"
                    );
                } else {
                    assert_eq!(
                        flags, 0,
                        "n = {n}, call {k}: only a success may report nothing"
                    );
                }
            }
            w.clear(&head);
            let t = w.record(&head, SLOW).unwrap();
            assert_eq!(
                (t.calls, t.failures, t.slow),
                (1, 0, 1),
                "n = {n} after clear"
            );
        }
    }

    #[test]
    fn counters_stay_exact_under_concurrent_records() {
        let w = std::sync::Arc::new(CountWindow::new(100));
        let head = std::sync::Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (w, head) = (w.clone(), head.clone());
                std::thread::spawn(move || {
                    for k in 0..20_000u32 {
                        w.record(&head, if (k + t) % 3 == 0 { FAILED } else { SLOW });
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Quiescent: the counters must equal the bits left in the ring.
        let (_, words) = w.ring();
        let (mut failures, mut slow) = (0, 0);
        for word in words {
            let v = word.load(Ordering::Relaxed);
            for s in 0..PER_WORD {
                let bits = (v >> (s * 2)) & 3;
                failures += bits & 1;
                slow += bits >> 1;
            }
        }
        let c = w.counters.load(Ordering::Relaxed);
        assert_eq!(
            ((c & 0xFFFF_FFFF) - BIAS, (c >> 32) - BIAS),
            (failures, slow)
        );
        assert_eq!(failures + slow, 100);
    }

    #[test]
    fn a_small_window_needs_no_heap() {
        assert_eq!(Window::Count(CountWindow::new(100)).bytes(), 0);
        assert_eq!(Window::Count(CountWindow::new(1000)).bytes(), 32 * 8);
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
