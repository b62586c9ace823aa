//! Bitmaps shared by a nexus's cores: which 4 KiB blocks of the volume a replica missed
//! ([`BlockMap`], two levels, dirty) and which regions it holds only in its volatile state
//! ([`RegionMap`], flat, written since its last flush).
//!
//! Bits are set with a relaxed load first and a `fetch_or` only when the bit is clear, so the
//! steady state of a volume costs each write one shared read per map it marks. Setting and
//! clearing are `SeqCst`: resync's correctness argument (`docs/replication.md`) pairs a clear
//! before a copy's read with a set after a write's completion.

use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

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

/// Granularity of a [`BlockMap`]: the volume block size of Cairn's data path.
pub const BLOCK_BYTES: u64 = 4096;
/// Bytes one leaf of a [`BlockMap`] covers: also the resync's copy range (its lock and
/// coalescing granularity, `resync.rs`).
pub const AREA_BYTES: u64 = 1 << 20;
const AREA_BLOCKS: u64 = AREA_BYTES / BLOCK_BYTES;
/// Words of one leaf (one bit per block of an area).
pub const LEAF_WORDS: usize = (AREA_BLOCKS / 64) as usize;

/// One area's blocks, as a resync takes them.
pub type AreaBits = [u64; LEAF_WORDS];

struct Leaf {
    words: [AtomicU64; LEAF_WORDS],
}

/// Which 4 KiB blocks of a volume a replica missed: two levels, so memory follows what was
/// missed rather than the volume's size.
///
/// Level one is always there: per 1 MiB area, a leaf pointer (8 bytes), a "something
/// marked" summary bit and a "whole area" bit (what a full rebuild sets, with no leaf).
/// Level two is a 32-byte leaf of 256 block bits, allocated by the first [`BlockMap::mark`]
/// of its area and kept until the map is dropped (so a leaf is never freed under a marker).
/// Marks come only from writes a child missed or failed, never from the in-sync hot path, so
/// allocation happens only while a child is out of sync. Memory per TiB of volume: 8 MiB of
/// pointers and 256 KiB of summary bits, plus 32 bytes per area written while out of sync
/// (at most 32 MiB, when every area was).
///
/// Every operation is lock-free: leaves are installed with a compare-and-swap (a loser frees
/// its own), bits are set with `fetch_or` and taken with `swap`, all `SeqCst` (the resync
/// argument in `docs/replication.md` pairs a take before a copy's read with a mark after a
/// write's completion).
pub struct BlockMap {
    leaves: Box<[AtomicPtr<Leaf>]>,
    summary: RegionMap,
    full: RegionMap,
    size_bytes: u64,
}

impl std::fmt::Debug for BlockMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockMap")
            .field("size_bytes", &self.size_bytes)
            .finish()
    }
}

impl BlockMap {
    /// A clear map of a volume of `size_bytes`.
    pub fn new(size_bytes: u64) -> BlockMap {
        let areas = size_bytes.div_ceil(AREA_BYTES);
        let shift = AREA_BYTES.trailing_zeros();
        BlockMap {
            leaves: (0..areas)
                .map(|_| AtomicPtr::new(ptr::null_mut()))
                .collect(),
            summary: RegionMap::new(areas, shift),
            full: RegionMap::new(areas, shift),
            size_bytes,
        }
    }

    pub fn areas(&self) -> u64 {
        self.leaves.len() as u64
    }

    /// Blocks of area `a` inside the volume (the last one may be short).
    pub fn area_blocks(&self, a: u64) -> u64 {
        let end = ((a + 1) * AREA_BYTES).min(self.size_bytes);
        (end - a * AREA_BYTES).div_ceil(BLOCK_BYTES)
    }

    fn leaf(&self, a: u64) -> &Leaf {
        let slot = &self.leaves[a as usize];
        let mut p = slot.load(Ordering::Acquire);
        if p.is_null() {
            let fresh = Box::into_raw(Box::new(Leaf {
                words: std::array::from_fn(|_| AtomicU64::new(0)),
            }));
            p = match slot.compare_exchange(
                ptr::null_mut(),
                fresh,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => fresh,
                Err(winner) => {
                    // SAFETY: `fresh` came from Box::into_raw above and was never published.
                    drop(unsafe { Box::from_raw(fresh) });
                    winner
                }
            };
        }
        // SAFETY: a published leaf is freed only by Drop, which has the map to itself.
        unsafe { &*p }
    }

    /// Marks every block `[offset_bytes, offset_bytes + len_bytes)` touches.
    pub fn mark(&self, offset_bytes: u64, len_bytes: u64) {
        if len_bytes == 0 || offset_bytes >= self.size_bytes {
            return;
        }
        let end = (offset_bytes + len_bytes).min(self.size_bytes);
        let (first, last) = (offset_bytes / BLOCK_BYTES, (end - 1) / BLOCK_BYTES);
        let mut b = first;
        while b <= last {
            let a = b / AREA_BLOCKS;
            let stop = last.min((a + 1) * AREA_BLOCKS - 1);
            // A whole-area mark already covers these blocks until a resync takes it, and
            // that resync's copy reads after this write completed.
            if !self.full.is_set(a) {
                let leaf = self.leaf(a);
                for blk in b..=stop {
                    let i = blk % AREA_BLOCKS;
                    let (w, bit) = ((i / 64) as usize, 1u64 << (i % 64));
                    if leaf.words[w].load(Ordering::Relaxed) & bit == 0 {
                        leaf.words[w].fetch_or(bit, Ordering::SeqCst);
                    }
                }
            }
            self.summary.set(a);
            b = stop + 1;
        }
    }

    /// Marks every block of the volume (a full rebuild); allocates nothing.
    pub fn set_all(&self) {
        self.full.set_all();
        self.summary.set_all();
    }

    /// Sets again the blocks of area `a` in `bits` (a copy that did not finish).
    pub fn remark(&self, a: u64, bits: &AreaBits) {
        for (w, &word) in bits.iter().enumerate() {
            let mut rest = word;
            while rest != 0 {
                let i = w as u64 * 64 + u64::from(rest.trailing_zeros());
                rest &= rest - 1;
                self.mark((a * AREA_BLOCKS + i) * BLOCK_BYTES, BLOCK_BYTES);
            }
        }
    }

    /// Clears area `a` and returns the blocks that were marked in it.
    pub fn take_area(&self, a: u64) -> AreaBits {
        // Summary first: a mark racing this sets its block, then the summary again.
        self.summary.take(a);
        let mut out = [0u64; LEAF_WORDS];
        if self.full.take(a) {
            let n = self.area_blocks(a);
            for (w, o) in out.iter_mut().enumerate() {
                let lo = w as u64 * 64;
                *o = match n.saturating_sub(lo) {
                    0 => 0,
                    k if k >= 64 => u64::MAX,
                    k => (1u64 << k) - 1,
                };
            }
        }
        let p = self.leaves[a as usize].load(Ordering::Acquire);
        if !p.is_null() {
            // SAFETY: as in `leaf`.
            let leaf = unsafe { &*p };
            for (o, w) in out.iter_mut().zip(leaf.words.iter()) {
                if w.load(Ordering::Relaxed) != 0 {
                    *o |= w.swap(0, Ordering::SeqCst);
                }
            }
        }
        out
    }

    /// The first area at or after `from` with anything marked.
    pub fn next_area(&self, from: u64) -> Option<u64> {
        self.summary.next_set(from)
    }

    /// Blocks marked.
    pub fn count(&self) -> u64 {
        let mut n = 0;
        let mut a = 0;
        while let Some(found) = self.summary.next_set(a) {
            if self.full.is_set(found) {
                n += self.area_blocks(found);
            } else {
                let p = self.leaves[found as usize].load(Ordering::Acquire);
                if !p.is_null() {
                    // SAFETY: as in `leaf`.
                    let leaf = unsafe { &*p };
                    n += leaf
                        .words
                        .iter()
                        .map(|w| u64::from(w.load(Ordering::SeqCst).count_ones()))
                        .sum::<u64>();
                }
            }
            a = found + 1;
        }
        n
    }

    /// Bytes marked (the last block clipped to the volume).
    pub fn count_bytes(&self) -> u64 {
        (self.count() * BLOCK_BYTES).min(self.size_bytes)
    }

    /// Clears every mark; keeps the leaves.
    pub fn clear_all(&self) {
        self.summary.clear_all();
        self.full.clear_all();
        for slot in self.leaves.iter() {
            let p = slot.load(Ordering::Acquire);
            if !p.is_null() {
                // SAFETY: as in `leaf`.
                for w in unsafe { &*p }.words.iter() {
                    w.store(0, Ordering::SeqCst);
                }
            }
        }
    }

    /// Marks every region set in `regions` (an unflushed map of coarser regions).
    pub fn merge_regions(&self, regions: &RegionMap) {
        let rb = regions.region_bytes();
        let mut r = 0;
        while let Some(found) = regions.next_set(r) {
            self.mark(found * rb, rb);
            r = found + 1;
        }
    }
}

impl Drop for BlockMap {
    fn drop(&mut self) {
        for slot in self.leaves.iter_mut() {
            let p = std::mem::replace(slot.get_mut(), ptr::null_mut());
            if !p.is_null() {
                // SAFETY: every non-null leaf came from Box::into_raw in `leaf`, and `&mut
                // self` means no marker holds a reference to it.
                drop(unsafe { Box::from_raw(p) });
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

    #[test]
    fn block_map_marks_takes_and_counts_blocks() {
        let size = 3 * AREA_BYTES + 8 * BLOCK_BYTES;
        let m = BlockMap::new(size);
        assert_eq!(m.areas(), 4);
        assert_eq!(m.area_blocks(3), 8);
        m.mark(4096, 1);
        m.mark(AREA_BYTES - 4096, 8192);
        assert_eq!(m.count(), 3);
        assert_eq!(m.next_area(0), Some(0));
        assert_eq!(m.next_area(1), Some(1));
        let a0 = m.take_area(0);
        assert_eq!(a0[0], 1 << 1);
        assert_eq!(a0[LEAF_WORDS - 1], 1 << 63);
        assert_eq!(m.count(), 1);
        m.remark(0, &a0);
        assert_eq!(m.count(), 3);
        m.clear_all();
        assert_eq!(m.count(), 0);
        assert_eq!(m.next_area(0), None);
        m.set_all();
        assert_eq!(m.count(), 3 * AREA_BLOCKS + 8);
        assert_eq!(m.count_bytes(), size);
        let last = m.take_area(3);
        assert_eq!(last, [0xff, 0, 0, 0]);
        let regions = RegionMap::new(4, 16);
        regions.set(2);
        let n = BlockMap::new(AREA_BYTES);
        n.merge_regions(&regions);
        assert_eq!(n.count(), 16);
    }
}
