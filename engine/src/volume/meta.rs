//! The pool's metadata in memory: objects (volumes and snapshots), their cluster maps,
//! per-cluster reference counts, the allocator and the quarantine of freed clusters.
//!
//! Pure bookkeeping, no I/O: the pool runtime calls these operations on its home core and
//! persists the result with [`Meta::to_checkpoint`]. [`check_checkpoint`] is the fsck: it
//! verifies a persisted checkpoint against the superblock without trusting anything in it.
//!
//! Reference counts are not persisted; they are recomputed from the maps at open. A cluster is
//! free when no map references it and it is not quarantined. Freed clusters go to quarantine
//! and are reused only after the pool has made the free durable and every core has finished the
//! I/O it had in flight to them (see `pool.rs`).

use super::cluster::{PhysCluster, VirtCluster};
use super::format::{
    Checkpoint, CheckpointWriter, ObjectKind, ObjectRecord, Superblock, LABELS_MAX, NAME_MAX_BYTES,
    OBJECTS_MAX,
};
use super::map::{ClusterMap, Entry};
use super::PoolError;
use std::collections::BTreeMap;
use std::sync::Arc;

/// A volume or snapshot.
#[derive(Debug)]
pub struct Object {
    pub id: u64,
    pub uuid: [u8; 16],
    pub kind: ObjectKind,
    pub parent: u64,
    pub size_bytes: u64,
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub map: Arc<ClusterMap>,
}

#[derive(Debug)]
pub struct Meta {
    pub sb: Superblock,
    /// Sequence number of the last durable checkpoint.
    pub seq: u64,
    next_id: u64,
    objects: BTreeMap<u64, Object>,
    /// References per physical cluster, indexed by [`PhysCluster`].
    refcount: Vec<u32>,
    quarantined: Vec<bool>,
    quarantine: Vec<PhysCluster>,
    cursor: u64,
    free_count: u64,
    /// Something changed since the last durable checkpoint.
    pub dirty: bool,
}

impl Meta {
    /// An empty pool.
    pub fn new(sb: Superblock) -> Meta {
        let n = sb.cluster_count as usize;
        Meta {
            free_count: sb.cluster_count,
            sb,
            seq: 0,
            next_id: 1,
            objects: BTreeMap::new(),
            refcount: vec![0; n],
            quarantined: vec![false; n],
            quarantine: Vec::new(),
            cursor: 0,
            dirty: true,
        }
    }

    /// Rebuilds memory state from a checkpoint that passed [`check_checkpoint`].
    pub fn from_checkpoint(sb: Superblock, c: &Checkpoint) -> Result<Meta, PoolError> {
        check_checkpoint(&sb, c).map_err(|problems| PoolError::Inconsistent { problems })?;
        let mut m = Meta::new(sb);
        m.seq = c.seq;
        m.next_id = c.next_object_id;
        for o in &c.objects {
            let map = ClusterMap::new(o.size_bytes.div_ceil(m.cluster_bytes()));
            for &(v, p) in &o.mappings {
                let v = VirtCluster::new(v).expect("the fsck checked every virtual cluster");
                let p = PhysCluster::new(p).expect("the fsck checked every physical cluster");
                map.set(
                    v,
                    Entry::Mapped {
                        cluster: p,
                        shared: false,
                    },
                );
                m.take_ref(p);
            }
            m.objects.insert(
                o.id,
                Object {
                    id: o.id,
                    uuid: o.uuid,
                    kind: o.kind,
                    parent: o.parent,
                    size_bytes: o.size_bytes,
                    name: o.name.clone(),
                    labels: o.labels.clone(),
                    map: Arc::new(map),
                },
            );
        }
        for o in m.objects.values() {
            for (v, p, _) in o.map.mapped() {
                if m.refcount(p) > 1 {
                    o.map.set(
                        v,
                        Entry::Mapped {
                            cluster: p,
                            shared: true,
                        },
                    );
                }
            }
        }
        m.dirty = false;
        Ok(m)
    }

    pub fn to_checkpoint(&self, seq: u64) -> Checkpoint {
        let mut bitmap = vec![0u8; self.sb.cluster_count.div_ceil(8) as usize];
        for (c, &r) in self.refcount.iter().enumerate() {
            if r > 0 {
                bitmap[c / 8] |= 1 << (c % 8);
            }
        }
        Checkpoint {
            seq,
            pool_uuid: self.sb.uuid,
            next_object_id: self.next_id,
            objects: self
                .objects
                .values()
                .map(|o| ObjectRecord {
                    id: o.id,
                    uuid: o.uuid,
                    kind: o.kind,
                    parent: o.parent,
                    size_bytes: o.size_bytes,
                    name: o.name.clone(),
                    labels: o.labels.clone(),
                    mappings: o.map.mapped().map(|(v, p, _)| (v.get(), p.get())).collect(),
                })
                .collect(),
            bitmap,
        }
    }

    /// Encodes the checkpoint of sequence `seq` straight into `out` (staging memory a slot
    /// long) with the format's one encoder, allocating nothing: the same bytes as
    /// `to_checkpoint(seq).encode(..)`. Returns its length, or None when it does not fit.
    pub fn encode_checkpoint(&self, seq: u64, out: &mut [u8]) -> Option<usize> {
        let mut w =
            CheckpointWriter::new(out, &self.sb.uuid, self.next_id, self.objects.len() as u32);
        for o in self.objects.values() {
            w.object(
                o.id,
                &o.uuid,
                o.kind,
                o.parent,
                o.size_bytes,
                &o.name,
                &o.labels,
                o.map.mapped().count() as u64,
            );
            for (v, p, _) in o.map.mapped() {
                w.mapping(v.get(), p.get());
            }
        }
        let refcount = &self.refcount;
        w.bitmap(self.sb.cluster_count.div_ceil(8), |i| {
            let first = (i * 8) as usize;
            let last = (first + 8).min(refcount.len());
            refcount[first..last]
                .iter()
                .enumerate()
                .fold(0u8, |byte, (bit, &r)| byte | (u8::from(r > 0) << bit))
        });
        w.finish(seq)
    }

    fn refcount(&self, cluster: PhysCluster) -> u32 {
        self.refcount[cluster.get() as usize]
    }

    pub fn cluster_bytes(&self) -> u64 {
        u64::from(self.sb.cluster_size_bytes)
    }

    pub fn free_clusters(&self) -> u64 {
        self.free_count
    }

    pub fn objects(&self) -> impl Iterator<Item = &Object> {
        self.objects.values()
    }

    pub fn object(&self, id: u64) -> Option<&Object> {
        self.objects.get(&id)
    }

    pub fn find(&self, name: &str) -> Result<&Object, PoolError> {
        self.objects
            .values()
            .find(|o| o.name == name)
            .ok_or_else(|| PoolError::NotFound { name: name.into() })
    }

    fn check_new_name(&self, name: &str) -> Result<(), PoolError> {
        if name.is_empty() || name.len() > NAME_MAX_BYTES || name.chars().any(char::is_control) {
            return Err(PoolError::BadName { name: name.into() });
        }
        if self.objects.values().any(|o| o.name == name) {
            return Err(PoolError::DuplicateName { name: name.into() });
        }
        if self.objects.len() as u64 >= OBJECTS_MAX {
            return Err(PoolError::TooManyObjects { max: OBJECTS_MAX });
        }
        Ok(())
    }

    fn check_size(&self, name: &str, size_bytes: u64) -> Result<(), PoolError> {
        let block = u64::from(self.sb.block_size_bytes);
        let max = ClusterMap::clusters_max() * self.cluster_bytes();
        let reason = if size_bytes == 0 {
            "must be above zero".to_string()
        } else if !size_bytes.is_multiple_of(block) {
            format!("is not a multiple of the block size {block}")
        } else if size_bytes > max {
            format!("exceeds the largest volume, {max} bytes")
        } else {
            return Ok(());
        };
        Err(PoolError::BadSize {
            name: name.into(),
            size_bytes,
            reason,
        })
    }

    /// Refuses an operation adding an object of `name`/`labels` with `refs` mappings when the
    /// checkpoint could then overflow its slot, counting room for every free cluster to be
    /// mapped later (so data-path allocations can never be the ones that do not fit).
    fn check_room(
        &self,
        name: &str,
        labels: &[(String, String)],
        refs: u64,
    ) -> Result<(), PoolError> {
        let now: u64 = self
            .objects
            .values()
            .map(|o| super::format::object_bytes(&o.name, &o.labels, o.map.mapped().count() as u64))
            .sum();
        let need = super::format::checkpoint_fixed_bytes(self.sb.cluster_count)
            + now
            + super::format::object_bytes(name, labels, refs)
            + 16 * self.free_count;
        if need > self.sb.slot_bytes {
            return Err(PoolError::MetadataFull {
                slot_bytes: self.sb.slot_bytes,
            });
        }
        Ok(())
    }

    fn add(
        &mut self,
        kind: ObjectKind,
        parent: u64,
        size_bytes: u64,
        name: &str,
        labels: Vec<(String, String)>,
        map: ClusterMap,
    ) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.objects.insert(
            id,
            Object {
                id,
                uuid: super::random_uuid(),
                kind,
                parent,
                size_bytes,
                name: name.into(),
                labels,
                map: Arc::new(map),
            },
        );
        self.dirty = true;
        id
    }

    pub fn create_volume(
        &mut self,
        name: &str,
        size_bytes: u64,
        labels: Vec<(String, String)>,
    ) -> Result<u64, PoolError> {
        self.check_new_name(name)?;
        self.check_size(name, size_bytes)?;
        if labels.len() > LABELS_MAX
            || labels
                .iter()
                .any(|(k, v)| k.len() > NAME_MAX_BYTES || v.len() > NAME_MAX_BYTES)
        {
            return Err(PoolError::BadLabels { name: name.into() });
        }
        self.check_room(name, &labels, 0)?;
        let map = ClusterMap::new(size_bytes.div_ceil(self.cluster_bytes()));
        Ok(self.add(ObjectKind::Volume, 0, size_bytes, name, labels, map))
    }

    /// First half of a snapshot: marks every mapped cluster of the volume shared, so writes
    /// from now on copy first. The caller then waits for in-flight writes to drain.
    pub fn snapshot_prepare(&mut self, volume: &str, snapshot: &str) -> Result<u64, PoolError> {
        self.check_new_name(snapshot)?;
        let o = self.find(volume)?;
        expect_kind(o, volume, ObjectKind::Volume)?;
        self.check_room(snapshot, &[], o.map.mapped().count() as u64)?;
        mark_shared(&o.map);
        Ok(o.id)
    }

    /// Second half: the snapshot takes a copy of the (now quiet) volume's map.
    pub fn snapshot_finish(&mut self, volume_id: u64, snapshot: &str) -> Result<u64, PoolError> {
        self.check_new_name(snapshot)?;
        let o = self
            .objects
            .get(&volume_id)
            .ok_or_else(|| PoolError::NotFound {
                name: format!("volume id {volume_id}"),
            })?;
        let (size, map) = (o.size_bytes, copy_map(&o.map));
        for (_, p, _) in map.mapped() {
            self.take_ref(p);
        }
        Ok(self.add(
            ObjectKind::Snapshot,
            volume_id,
            size,
            snapshot,
            Vec::new(),
            map,
        ))
    }

    /// A writable volume sharing every cluster of a snapshot.
    pub fn clone_snapshot(&mut self, snapshot: &str, name: &str) -> Result<u64, PoolError> {
        self.check_new_name(name)?;
        let s = self.find(snapshot)?;
        expect_kind(s, snapshot, ObjectKind::Snapshot)?;
        self.check_room(name, &[], s.map.mapped().count() as u64)?;
        let (sid, size, map) = (s.id, s.size_bytes, copy_map(&s.map));
        mark_shared(&map);
        for (_, p, _) in map.mapped() {
            self.take_ref(p);
        }
        Ok(self.add(ObjectKind::Volume, sid, size, name, Vec::new(), map))
    }

    /// Names of clones made from snapshot `id`.
    pub fn dependants(&self, id: u64) -> Vec<String> {
        self.objects
            .values()
            .filter(|o| o.kind == ObjectKind::Volume && o.parent == id)
            .map(|o| o.name.clone())
            .collect()
    }

    /// Deletes an object. A snapshot with clones is refused: clones record it as their origin.
    pub fn delete(&mut self, name: &str) -> Result<u64, PoolError> {
        let o = self.find(name)?;
        let id = o.id;
        if o.kind == ObjectKind::Snapshot {
            let clones = self.dependants(id);
            if !clones.is_empty() {
                return Err(PoolError::HasDependants {
                    name: name.into(),
                    clones,
                });
            }
        }
        let o = self.objects.remove(&id).expect("found above");
        for (_, p, _) in o.map.mapped() {
            self.drop_ref(p);
        }
        self.dirty = true;
        Ok(id)
    }

    pub fn grow(&mut self, name: &str, size_bytes: u64) -> Result<(), PoolError> {
        let o = self.find(name)?;
        expect_kind(o, name, ObjectKind::Volume)?;
        if size_bytes < o.size_bytes {
            return Err(PoolError::ShrinkRefused {
                name: name.into(),
                size_bytes: o.size_bytes,
                requested_bytes: size_bytes,
            });
        }
        self.check_size(name, size_bytes)?;
        let id = o.id;
        let clusters = size_bytes.div_ceil(self.cluster_bytes());
        let o = self.objects.get_mut(&id).expect("found above");
        o.map.grow(clusters);
        o.size_bytes = size_bytes;
        self.dirty = true;
        Ok(())
    }

    /// Takes a free cluster (not yet referenced by any map), or None when the pool is full.
    pub fn alloc(&mut self) -> Option<PhysCluster> {
        let n = self.sb.cluster_count;
        if self.free_count == 0 {
            return None;
        }
        for i in 0..n {
            let c = (self.cursor + i) % n;
            if self.refcount[c as usize] == 0 && !self.quarantined[c as usize] {
                self.cursor = (c + 1) % n;
                self.refcount[c as usize] = 1;
                self.free_count -= 1;
                return Some(PhysCluster::new(c).expect("a pool's clusters are physical clusters"));
            }
        }
        unreachable!("free_count {} but no free cluster", self.free_count)
    }

    /// Gives back a cluster taken by `alloc` that never got mapped (its preparation failed).
    pub fn unalloc(&mut self, cluster: PhysCluster) {
        self.drop_ref(cluster);
    }

    /// Publishes `cluster` (from `alloc`) as `vcluster` of object `id`, replacing whatever was
    /// there: a shared cluster being copied loses this reference.
    pub fn map(&mut self, id: u64, vcluster: VirtCluster, cluster: PhysCluster) {
        let map = self.objects[&id].map.clone();
        if let Entry::Mapped { cluster: old, .. } = map.get(vcluster) {
            self.drop_ref(old);
        }
        map.set(
            vcluster,
            Entry::Mapped {
                cluster,
                shared: false,
            },
        );
        self.dirty = true;
    }

    /// Clears a shared flag that no longer holds (the other references went away).
    pub fn unshare_if_sole(&mut self, id: u64, vcluster: VirtCluster) -> bool {
        let map = &self.objects[&id].map;
        match map.get(vcluster) {
            Entry::Mapped {
                cluster,
                shared: true,
            } if self.refcount(cluster) == 1 => {
                map.set(
                    vcluster,
                    Entry::Mapped {
                        cluster,
                        shared: false,
                    },
                );
                true
            }
            Entry::Mapped { shared: false, .. } => true,
            _ => false,
        }
    }

    /// Unmaps `vcluster` of object `id` (trim, whole-cluster write-zeroes).
    pub fn unmap(&mut self, id: u64, vcluster: VirtCluster) {
        let map = self.objects[&id].map.clone();
        if let Entry::Mapped { cluster, .. } = map.get(vcluster) {
            map.set(vcluster, Entry::Unallocated);
            self.drop_ref(cluster);
            self.dirty = true;
        }
    }

    fn take_ref(&mut self, cluster: PhysCluster) {
        let r = &mut self.refcount[cluster.get() as usize];
        if *r == 0 {
            self.free_count -= 1;
        }
        *r += 1;
    }

    fn drop_ref(&mut self, cluster: PhysCluster) {
        let r = &mut self.refcount[cluster.get() as usize];
        assert!(
            *r > 0,
            "cluster {cluster} released more often than referenced"
        );
        *r -= 1;
        if *r == 0 {
            self.quarantined[cluster.get() as usize] = true;
            self.quarantine.push(cluster);
        }
    }

    /// Hands over the clusters freed so far; they stay unusable until `release`.
    pub fn take_quarantine(&mut self) -> Vec<PhysCluster> {
        std::mem::take(&mut self.quarantine)
    }

    /// Puts clusters back in quarantine after the commit that would have freed them failed.
    pub fn requarantine(&mut self, clusters: Vec<PhysCluster>) {
        self.quarantine.extend(clusters);
    }

    /// Makes quarantined clusters allocatable again.
    pub fn release(&mut self, clusters: &[PhysCluster]) {
        for &c in clusters {
            let i = c.get() as usize;
            debug_assert!(self.quarantined[i]);
            self.quarantined[i] = false;
            if self.refcount[i] == 0 {
                self.free_count += 1;
            }
        }
    }

    /// Verifies memory state against itself: refcounts match the maps, free counts add up.
    pub fn check(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        let mut refs = vec![0u32; self.refcount.len()];
        for o in self.objects.values() {
            for (v, p, shared) in o.map.mapped() {
                if p.get() >= self.sb.cluster_count {
                    problems.push(format!(
                        "{} '{}' cluster {v} maps beyond the pool: {p}",
                        o.kind, o.name
                    ));
                    continue;
                }
                refs[p.get() as usize] += 1;
                if !shared && self.refcount(p) > 1 && o.kind == ObjectKind::Volume {
                    problems.push(format!(
                        "volume '{}' cluster {v} writes in place to shared cluster {p}",
                        o.name
                    ));
                }
            }
        }
        let free = (0..self.refcount.len())
            .filter(|&c| self.refcount[c] == 0 && !self.quarantined[c])
            .count() as u64;
        for (c, (&have, &want)) in self.refcount.iter().zip(&refs).enumerate() {
            if have != want {
                problems.push(format!(
                    "cluster {c}: refcount {have} but {want} references"
                ));
            }
        }
        if free != self.free_count {
            problems.push(format!(
                "free count {} but {free} free clusters",
                self.free_count
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

fn expect_kind(o: &Object, name: &str, wanted: ObjectKind) -> Result<(), PoolError> {
    if o.kind == wanted {
        return Ok(());
    }
    Err(PoolError::WrongKind {
        name: name.into(),
        kind: o.kind,
        wanted,
    })
}

/// Marks every mapped cluster of `map` shared: writes to them must copy first.
fn mark_shared(map: &ClusterMap) {
    for (v, cluster, _) in map.mapped() {
        map.set(
            v,
            Entry::Mapped {
                cluster,
                shared: true,
            },
        );
    }
}

fn copy_map(src: &ClusterMap) -> ClusterMap {
    let map = ClusterMap::new(src.clusters());
    for (v, p, shared) in src.mapped() {
        map.set(v, Entry::Mapped { cluster: p, shared });
    }
    map
}

/// The fsck of a persisted checkpoint: every invariant a reopened pool relies on.
pub fn check_checkpoint(sb: &Superblock, c: &Checkpoint) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    if c.pool_uuid != sb.uuid {
        problems.push(
            "checkpoint belongs to another pool (uuid differs from the superblock)".to_string(),
        );
    }
    if c.bitmap.len() as u64 != sb.cluster_count.div_ceil(8) {
        problems.push(format!(
            "bitmap of {} bytes for {} clusters",
            c.bitmap.len(),
            sb.cluster_count
        ));
        return Err(problems);
    }
    let mut refs: Vec<Vec<u64>> = vec![Vec::new(); sb.cluster_count as usize];
    let mut names = std::collections::HashSet::new();
    let mut seen_ids = std::collections::HashSet::new();
    let ids: std::collections::HashMap<u64, &ObjectRecord> =
        c.objects.iter().map(|o| (o.id, o)).collect();
    let cluster = u64::from(sb.cluster_size_bytes);
    for o in &c.objects {
        let what = format!("{} '{}' (id {})", o.kind, o.name, o.id);
        if !names.insert(o.name.as_str()) {
            problems.push(format!("{what}: name used twice"));
        }
        if !seen_ids.insert(o.id) {
            problems.push(format!("{what}: id used twice"));
        }
        let max = ClusterMap::clusters_max() * cluster;
        if o.size_bytes > max {
            problems.push(format!(
                "{what}: size {} above the largest volume, {max} bytes",
                o.size_bytes
            ));
        }
        if o.id == 0 || o.id >= c.next_object_id {
            problems.push(format!("{what}: id outside 1..{}", c.next_object_id));
        }
        if o.size_bytes == 0 || o.size_bytes % u64::from(sb.block_size_bytes) != 0 {
            problems.push(format!(
                "{what}: size {} is not a positive multiple of the block size",
                o.size_bytes
            ));
        }
        if o.parent != 0 && !ids.contains_key(&o.parent) && o.kind == ObjectKind::Volume {
            problems.push(format!(
                "{what}: origin snapshot {} does not exist",
                o.parent
            ));
        }
        let vclusters = o.size_bytes.div_ceil(cluster);
        let mut last = None;
        for &(v, p) in &o.mappings {
            if last.is_some_and(|l| v <= l) {
                problems.push(format!(
                    "{what}: mappings not strictly ascending at cluster {v}"
                ));
            }
            last = Some(v);
            if v >= vclusters {
                problems.push(format!("{what}: maps cluster {v} beyond its size"));
            }
            if p >= sb.cluster_count {
                problems.push(format!(
                    "{what}: cluster {v} maps to {p}, beyond the pool's {} clusters",
                    sb.cluster_count
                ));
                continue;
            }
            refs[p as usize].push(o.id);
        }
    }
    for (p, owners) in refs.iter().enumerate() {
        let marked = c.bitmap[p / 8] & (1 << (p % 8)) != 0;
        match (owners.is_empty(), marked) {
            (true, true) => problems.push(format!(
                "cluster {p} leaked: marked allocated but unreferenced"
            )),
            (false, false) => problems.push(format!("cluster {p} referenced but marked free")),
            _ => {}
        }
        if owners.len() > 1 && !same_family(owners, &ids) {
            problems.push(format!(
                "cluster {p} owned twice by unrelated objects {owners:?}"
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// Objects may share clusters only through snapshot lineage: all of them descend (via
/// snapshot → volume and clone → snapshot links) from one root volume.
fn same_family(owners: &[u64], ids: &std::collections::HashMap<u64, &ObjectRecord>) -> bool {
    let root = |mut id: u64| {
        for _ in 0..ids.len() + 1 {
            match ids.get(&id) {
                Some(o) if o.parent != 0 && ids.contains_key(&o.parent) => id = o.parent,
                _ => return id,
            }
        }
        id
    };
    let r = root(owners[0]);
    owners.iter().all(|&o| root(o) == r)
}
