//! Region bitmaps shared by a nexus's cores: which regions of the volume a replica missed
//! (dirty) or holds only in its volatile state (written since its last flush).
//!
//! Bits are set with a relaxed load first and a `fetch_or` only when the bit is clear, so the
//! steady state of a degraded volume costs each write one shared read. Setting and clearing
//! are `SeqCst`: resync's correctness argument (`docs/replication.md`) pairs a clear before a
//! copy's read with a set after a write's completion.

use std::sync::atomic::{AtomicU64, Ordering};

/// One bit per region of a volume.
#[derive(Debug)]
pub struct RegionMap {
    words: Box<[AtomicU64]>,
    regions: u64,
    region_shift: u32,
}

impl RegionMap {
    /// A clear map of `regions` regions of `1 << region_shift` bytes.
    pub fn new(regions: u64, region_shift: u32) -> RegionMap {
        let words = regions.div_ceil(64) as usize;
        RegionMap {
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            regions,
            region_shift,
        }
    }

    pub fn regions(&self) -> u64 {
        self.regions
    }

    pub fn region_bytes(&self) -> u64 {
        1 << self.region_shift
    }

    /// Marks every region `[offset_bytes, offset_bytes + len_bytes)` touches.
    #[inline]
    pub fn mark(&self, offset_bytes: u64, len_bytes: u64) {
        if len_bytes == 0 {
            return;
        }
        let first = offset_bytes >> self.region_shift;
        let last = ((offset_bytes + len_bytes - 1) >> self.region_shift).min(self.regions - 1);
        for r in first..=last {
            self.set(r);
        }
    }

    #[inline]
    pub fn set(&self, region: u64) {
        let (w, bit) = ((region / 64) as usize, 1u64 << (region % 64));
        if self.words[w].load(Ordering::Relaxed) & bit == 0 {
            self.words[w].fetch_or(bit, Ordering::SeqCst);
        }
    }

    /// Clears `region`; true if it was set.
    pub fn take(&self, region: u64) -> bool {
        let (w, bit) = ((region / 64) as usize, 1u64 << (region % 64));
        self.words[w].fetch_and(!bit, Ordering::SeqCst) & bit != 0
    }

    pub fn is_set(&self, region: u64) -> bool {
        let (w, bit) = ((region / 64) as usize, 1u64 << (region % 64));
        self.words[w].load(Ordering::SeqCst) & bit != 0
    }

    /// The first set region at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        let mut r = from;
        while r < self.regions {
            let w = self.words[(r / 64) as usize].load(Ordering::SeqCst) >> (r % 64);
            if w != 0 {
                let found = r + u64::from(w.trailing_zeros());
                return (found < self.regions).then_some(found);
            }
            r = (r / 64 + 1) * 64;
        }
        None
    }

    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::SeqCst).count_ones()))
            .sum()
    }

    pub fn set_all(&self) {
        for r in 0..self.regions {
            self.set(r);
        }
    }

    pub fn clear_all(&self) {
        for w in self.words.iter() {
            w.store(0, Ordering::SeqCst);
        }
    }

    /// Sets every bit set in `other` (same geometry).
    pub fn merge(&self, other: &RegionMap) {
        for (w, o) in self.words.iter().zip(other.words.iter()) {
            let bits = o.load(Ordering::SeqCst);
            if bits != 0 {
                w.fetch_or(bits, Ordering::SeqCst);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_ranges_and_finds_them() {
        let m = RegionMap::new(200, 16);
        m.mark(0, 1);
        m.mark((1 << 16) * 70 - 512, 1024);
        m.mark((1 << 16) * 199, 1 << 20);
        assert_eq!(m.count(), 4);
        assert_eq!(m.next_set(0), Some(0));
        assert_eq!(m.next_set(1), Some(69));
        assert_eq!(m.next_set(71), Some(199));
        assert!(m.take(69));
        assert!(!m.take(69));
        assert_eq!(m.next_set(1), Some(70));
        let n = RegionMap::new(200, 16);
        n.merge(&m);
        assert_eq!(n.count(), 3);
        m.clear_all();
        assert_eq!(m.next_set(0), None);
        m.set_all();
        assert_eq!(m.count(), 200);
    }
}
