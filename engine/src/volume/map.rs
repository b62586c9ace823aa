//! A volume's cluster map: virtual cluster → physical cluster, readable from every core without
//! a lock, written only by the pool's home core.
//!
//! Two levels: a directory sized at creation for [`MAP_LEAVES_MAX`] leaves, each leaf a fixed
//! array of atomic entries created once (on creation or growth) and never freed while the map
//! lives. A reader does two acquire loads; a writer stores with release after the cluster's
//! contents are ready, so a core that sees an entry also sees the data behind it.

use super::cluster::{PhysCluster, VirtCluster, PHYS_CLUSTERS_MAX, VIRT_CLUSTERS_MAX};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Entries per leaf.
pub const LEAF_ENTRIES: u64 = 4096;
/// Leaves per map: with 1 MiB clusters a volume can grow to 16 TiB.
pub const MAP_LEAVES_MAX: u64 = 4096;
/// Entry bit meaning "another object also maps this cluster: copy before writing".
const SHARED: u64 = 1 << 63;

const _: () = assert!(PHYS_CLUSTERS_MAX < SHARED - 1);

/// What one virtual cluster maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    Unallocated,
    /// Mapped to this physical cluster; `shared` means writes must copy it first.
    Mapped {
        cluster: PhysCluster,
        shared: bool,
    },
}

impl Entry {
    fn encode(self) -> u64 {
        match self {
            Entry::Unallocated => 0,
            Entry::Mapped { cluster, shared } => {
                (cluster.get() + 1) | if shared { SHARED } else { 0 }
            }
        }
    }

    fn decode(raw: u64) -> Entry {
        match raw {
            0 => Entry::Unallocated,
            raw => Entry::Mapped {
                cluster: PhysCluster::new((raw & !SHARED) - 1)
                    .expect("map entries hold only encoded physical clusters"),
                shared: raw & SHARED != 0,
            },
        }
    }
}

#[derive(Debug)]
pub struct ClusterMap {
    dir: Box<[OnceLock<Box<[AtomicU64]>>]>,
    clusters: AtomicU64,
}

impl ClusterMap {
    /// A map of `clusters` unallocated entries.
    pub fn new(clusters: u64) -> ClusterMap {
        let map = ClusterMap {
            dir: (0..MAP_LEAVES_MAX).map(|_| OnceLock::new()).collect(),
            clusters: AtomicU64::new(0),
        };
        map.grow(clusters);
        map
    }

    /// Most clusters any map can cover.
    pub const fn clusters_max() -> u64 {
        VIRT_CLUSTERS_MAX
    }

    pub fn clusters(&self) -> u64 {
        self.clusters.load(Ordering::Acquire)
    }

    /// Extends the map to `clusters` entries (home core only). New entries are unallocated.
    pub fn grow(&self, clusters: u64) {
        assert!(
            clusters <= Self::clusters_max(),
            "map of {clusters} clusters exceeds the maximum"
        );
        for leaf in 0..clusters.div_ceil(LEAF_ENTRIES) {
            self.dir[leaf as usize]
                .get_or_init(|| (0..LEAF_ENTRIES).map(|_| AtomicU64::new(0)).collect());
        }
        self.clusters.fetch_max(clusters, Ordering::AcqRel);
    }

    #[inline]
    fn slot(&self, vcluster: VirtCluster) -> &AtomicU64 {
        let v = vcluster.get();
        let leaf = self.dir[(v / LEAF_ENTRIES) as usize]
            .get()
            .expect("entry inside the map's size");
        &leaf[(v % LEAF_ENTRIES) as usize]
    }

    #[inline]
    pub fn get(&self, vcluster: VirtCluster) -> Entry {
        Entry::decode(self.slot(vcluster).load(Ordering::Acquire))
    }

    /// Publishes an entry (home core only).
    pub fn set(&self, vcluster: VirtCluster, entry: Entry) {
        self.slot(vcluster).store(entry.encode(), Ordering::Release);
    }

    /// Every mapped entry, ascending.
    pub fn mapped(&self) -> impl Iterator<Item = (VirtCluster, PhysCluster, bool)> + '_ {
        (0..self.clusters()).filter_map(|v| {
            let v = VirtCluster::new(v).expect("a map covers at most VIRT_CLUSTERS_MAX clusters");
            match self.get(v) {
                Entry::Mapped { cluster, shared } => Some((v, cluster, shared)),
                Entry::Unallocated => None,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(index: u64) -> VirtCluster {
        VirtCluster::new(index).unwrap()
    }

    fn p(index: u64) -> PhysCluster {
        PhysCluster::new(index).unwrap()
    }

    #[test]
    fn entries_round_trip_and_grow_keeps_them() {
        let m = ClusterMap::new(10);
        assert_eq!(m.get(v(9)), Entry::Unallocated);
        m.set(
            v(3),
            Entry::Mapped {
                cluster: p(0),
                shared: false,
            },
        );
        m.set(
            v(9),
            Entry::Mapped {
                cluster: p(77),
                shared: true,
            },
        );
        m.grow(LEAF_ENTRIES * 2 + 1);
        assert_eq!(
            m.get(v(3)),
            Entry::Mapped {
                cluster: p(0),
                shared: false
            }
        );
        assert_eq!(
            m.get(v(9)),
            Entry::Mapped {
                cluster: p(77),
                shared: true
            }
        );
        assert_eq!(m.get(v(LEAF_ENTRIES * 2)), Entry::Unallocated);
        assert_eq!(
            m.mapped().collect::<Vec<_>>(),
            vec![(v(3), p(0), false), (v(9), p(77), true)]
        );
    }
}
