//! The two cluster number spaces of the volume store, as distinct types.
//!
//! A [`VirtCluster`] indexes a volume's address space (byte offset / cluster size); a
//! [`PhysCluster`] indexes a cluster on the pool's base device. The cluster map turns one into
//! the other. Mixing them up would read or write another volume's data, so they are newtypes
//! that do not convert into each other: a map entry, the allocator, the reference counts and
//! the device address computation each take only the one they mean.
//!
//! The persisted checkpoint stores both as plain `u64` (docs/formats.md); its records stay raw
//! until the fsck has checked them, and only then become these types.

use super::format::META_BLOCK_BYTES;
use super::map::{LEAF_ENTRIES, MAP_LEAVES_MAX};
use std::fmt;

/// Virtual clusters any volume can have: what a cluster map can cover.
pub const VIRT_CLUSTERS_MAX: u64 = LEAF_ENTRIES * MAP_LEAVES_MAX;
/// Physical clusters any pool can have: a device of 2^64 bytes in the smallest (4 KiB)
/// clusters.
pub const PHYS_CLUSTERS_MAX: u64 = 1 << (64 - META_BLOCK_BYTES.trailing_zeros());

/// A cluster index outside its number space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClusterIndexError {
    #[error("virtual cluster {index} is beyond the largest volume's {VIRT_CLUSTERS_MAX} clusters")]
    Virt { index: u64 },
    #[error("physical cluster {index} is beyond the largest pool's {PHYS_CLUSTERS_MAX} clusters")]
    Phys { index: u64 },
}

/// Index of a cluster in one volume's address space, below [`VIRT_CLUSTERS_MAX`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VirtCluster(u64);

impl VirtCluster {
    /// The one constructor: refuses an index no cluster map can hold.
    #[inline]
    pub const fn new(index: u64) -> Result<VirtCluster, ClusterIndexError> {
        if index < VIRT_CLUSTERS_MAX {
            Ok(VirtCluster(index))
        } else {
            Err(ClusterIndexError::Virt { index })
        }
    }

    #[inline]
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for VirtCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Index of a cluster on the pool's base device (after the metadata area), below
/// [`PHYS_CLUSTERS_MAX`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PhysCluster(u64);

impl PhysCluster {
    /// The one constructor: refuses an index no pool can have.
    #[inline]
    pub const fn new(index: u64) -> Result<PhysCluster, ClusterIndexError> {
        if index < PHYS_CLUSTERS_MAX {
            Ok(PhysCluster(index))
        } else {
            Err(ClusterIndexError::Phys { index })
        }
    }

    #[inline]
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for PhysCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructors_refuse_indices_beyond_their_space() {
        assert_eq!(
            VirtCluster::new(VIRT_CLUSTERS_MAX - 1).unwrap().get(),
            VIRT_CLUSTERS_MAX - 1
        );
        assert_eq!(
            VirtCluster::new(VIRT_CLUSTERS_MAX),
            Err(ClusterIndexError::Virt {
                index: VIRT_CLUSTERS_MAX
            })
        );
        assert_eq!(
            PhysCluster::new(PHYS_CLUSTERS_MAX - 1).unwrap().get(),
            PHYS_CLUSTERS_MAX - 1
        );
        assert_eq!(
            PhysCluster::new(PHYS_CLUSTERS_MAX),
            Err(ClusterIndexError::Phys {
                index: PHYS_CLUSTERS_MAX
            })
        );
    }
}
