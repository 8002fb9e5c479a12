//! A fast hasher for the maps keyed by entry ids.
//!
//! Entry ids are UUIDs, random in most of their bits, so a multiply-rotate mix is enough to
//! spread them; a random seed per map keeps the layout unpredictable. It is several times
//! cheaper than the standard SipHash on every insert, cancel and firing.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher, RandomState};

use uuid::Uuid;

const K: u64 = 0x9E37_79B9_7F4A_7C15;

/// Builds [`IdHasher`]s with a seed of its own.
#[derive(Debug, Clone, Copy)]
pub(crate) struct IdHash {
    seed: u64,
}

impl Default for IdHash {
    fn default() -> Self {
        Self {
            seed: RandomState::new().hash_one(K),
        }
    }
}

impl BuildHasher for IdHash {
    type Hasher = IdHasher;

    fn build_hasher(&self) -> IdHasher {
        IdHasher { h: self.seed }
    }
}

/// See the [module docs](self).
#[derive(Debug)]
pub(crate) struct IdHasher {
    h: u64,
}

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for c in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..c.len()].copy_from_slice(c);
            self.write_u64(u64::from_le_bytes(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.h = (self.h ^ n).wrapping_mul(K).rotate_left(31);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn finish(&self) -> u64 {
        let mut x = self.h;
        x ^= x >> 33;
        x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
        x ^ (x >> 33)
    }
}

/// A map keyed by entry id.
pub(crate) type IdMap<V> = HashMap<Uuid, V, IdHash>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_spread_over_the_buckets_and_equal_ids_hash_equal() {
        let h = IdHash::default();
        let a = Uuid::now_v7();
        assert_eq!(h.hash_one(a), h.hash_one(a));
        // Sequential v7 ids differ mostly in their random bits and low timestamp bits.
        let mut buckets = [0u32; 64];
        for _ in 0..64_000 {
            buckets[(h.hash_one(Uuid::now_v7()) % 64) as usize] += 1;
        }
        assert!(
            buckets.iter().all(|&n| (700..1300).contains(&n)),
            "{buckets:?}"
        );
        let mut m: IdMap<u32> = IdMap::default();
        m.insert(a, 1);
        assert_eq!(m.get(&a), Some(&1));
    }
}
