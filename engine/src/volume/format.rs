//! On-disk format of a pool: the superblock and the two metadata checkpoint slots.
//!
//! Each slot holds one checkpoint: its header block, written twice (the slot's first and
//! last blocks, [`Superblock::header_offsets`]), and its payload in the blocks between. Two
//! copies of the header mean that one damaged block never hides a committed checkpoint.
//!
//! This file is the one place that encodes and decodes them; `docs/formats.md` draws every
//! byte. Everything is little-endian and fixed-width, every structure carries a magic, the
//! format version and a crc32c, and decoding checks all three before trusting a single field.
//! A format change bumps [`FORMAT_VERSION`]; `format_version_is_guarded` fails until the
//! layout constants, the superblock and checkpoint encodings, and the version are updated
//! together.

use super::cluster::PhysCluster;
use std::fmt;

pub const SUPERBLOCK_MAGIC: [u8; 8] = *b"CAIRNPL\0";
pub const CHECKPOINT_MAGIC: [u8; 8] = *b"CAIRNCK\0";
/// Version of the whole pool format. Pools from a newer version are refused, and so are
/// version 1 pools (one header copy per slot, payload in the header's block): see
/// [`FormatError::OldVersion`].
pub const FORMAT_VERSION: u32 = 2;
/// Metadata is read and written in units of this many bytes.
pub const META_BLOCK_BYTES: u64 = 4096;
/// Bytes of the superblock that carry data; the crc covers `0..SUPERBLOCK_CRC_OFFSET`.
pub const SUPERBLOCK_CRC_OFFSET: usize = 88;
/// Size of the checkpoint header at the start of its header block; the rest of the block is
/// zero.
pub const CHECKPOINT_HEADER_BYTES: usize = 64;
/// Copies of each checkpoint's header block in its slot.
pub const HEADER_COPIES: usize = 2;
/// Where a checkpoint's payload starts, in its encoding and in its slot: the block after the
/// header block, so a damaged header block never takes payload bytes with it.
pub const CHECKPOINT_PAYLOAD_OFFSET: usize = META_BLOCK_BYTES as usize;
/// Longest volume or snapshot name, and longest label key or value.
pub const NAME_MAX_BYTES: usize = 255;
/// Most labels on one volume.
pub const LABELS_MAX: usize = 64;
/// Most objects (volumes and snapshots) in one pool.
pub const OBJECTS_MAX: u64 = 1024;
/// Bytes of each checkpoint slot set aside for objects' names and labels. Control operations
/// that would not fit are refused with MetadataFull before they change anything.
pub const SLOT_OBJECT_BYTES: u64 = 256 << 10;
/// Bytes of an object's fixed fields in a checkpoint (id, uuid, kind, parent, size, counts).
pub const OBJECT_FIXED_BYTES: u64 = 8 + 16 + 8 + 8 + 8 + 2 + 2 + 8;
/// Cluster references a checkpoint slot is sized for, per data cluster: room for every
/// cluster to be shared by this many volumes and snapshots on average. Beyond it a commit
/// fails with MetadataFull.
pub const REFS_PER_CLUSTER: u64 = 4;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("{what}: bad magic (not a Cairn pool, or not written yet)")]
    Magic { what: &'static str },
    #[error(
        "{what}: format version {found} is newer than this build's {FORMAT_VERSION}; upgrade Cairn"
    )]
    NewerVersion { what: &'static str, found: u32 },
    #[error("{what}: format version {found} is not supported")]
    BadVersion { what: &'static str, found: u32 },
    #[error(
        "{what}: format version {found} is older than this build's {FORMAT_VERSION}, which writes every checkpoint header twice and lays slots out differently; this build does not convert pools in place: copy the volumes off with the release that wrote the pool, then recreate it"
    )]
    OldVersion { what: &'static str, found: u32 },
    #[error("{what}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        what: &'static str,
        stored: u32,
        computed: u32,
    },
    #[error("{what}: truncated at byte {at}")]
    Truncated { what: &'static str, at: usize },
    #[error("{what}: {detail}")]
    Invalid { what: &'static str, detail: String },
}

/// Fixed geometry of a pool, written once at format time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub block_size_bytes: u32,
    pub cluster_size_bytes: u32,
    pub uuid: [u8; 16],
    pub bdev_size_bytes: u64,
    pub slot_bytes: u64,
    pub slot_offsets: [u64; 2],
    pub data_offset_bytes: u64,
    pub cluster_count: u64,
}

impl Superblock {
    /// Lays out a pool on a device of `bdev_size_bytes`.
    pub fn layout(
        bdev_size_bytes: u64,
        block_size_bytes: u32,
        cluster_size_bytes: u32,
        uuid: [u8; 16],
    ) -> Result<Superblock, FormatError> {
        let invalid = |detail: String| FormatError::Invalid {
            what: "pool geometry",
            detail,
        };
        let cluster = u64::from(cluster_size_bytes);
        if !cluster_size_bytes.is_power_of_two() || !(META_BLOCK_BYTES..=1 << 30).contains(&cluster)
        {
            return Err(invalid(format!(
                "cluster size {cluster_size_bytes} must be a power of two between 4096 and 1 GiB"
            )));
        }
        if u64::from(block_size_bytes) > META_BLOCK_BYTES {
            return Err(invalid(format!("block size {block_size_bytes} above 4096")));
        }
        let approx_clusters = bdev_size_bytes / cluster;
        let slot_bytes = slot_bytes_for(approx_clusters);
        let meta_end = META_BLOCK_BYTES + 2 * slot_bytes;
        const _: () = assert!(HEADER_COPIES == 2, "a slot holds its first and last block");
        let data_offset_bytes = meta_end.next_multiple_of(cluster);
        if bdev_size_bytes < data_offset_bytes + cluster {
            return Err(invalid(format!(
                "device of {bdev_size_bytes} bytes is too small: metadata needs {data_offset_bytes} bytes plus at least one {cluster}-byte cluster"
            )));
        }
        Ok(Superblock {
            block_size_bytes,
            cluster_size_bytes,
            uuid,
            bdev_size_bytes,
            slot_bytes,
            slot_offsets: [META_BLOCK_BYTES, META_BLOCK_BYTES + slot_bytes],
            data_offset_bytes,
            cluster_count: (bdev_size_bytes - data_offset_bytes) / cluster,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; META_BLOCK_BYTES as usize];
        b[0..8].copy_from_slice(&SUPERBLOCK_MAGIC);
        put_u32(&mut b, 8, FORMAT_VERSION);
        put_u32(&mut b, 12, self.block_size_bytes);
        put_u32(&mut b, 16, self.cluster_size_bytes);
        b[24..40].copy_from_slice(&self.uuid);
        put_u64(&mut b, 40, self.bdev_size_bytes);
        put_u64(&mut b, 48, self.slot_bytes);
        put_u64(&mut b, 56, self.slot_offsets[0]);
        put_u64(&mut b, 64, self.slot_offsets[1]);
        put_u64(&mut b, 72, self.data_offset_bytes);
        put_u64(&mut b, 80, self.cluster_count);
        let crc = crc32c::crc32c(&b[..SUPERBLOCK_CRC_OFFSET]);
        put_u32(&mut b, SUPERBLOCK_CRC_OFFSET, crc);
        debug_assert_eq!(Superblock::decode(&b).as_ref(), Ok(self));
        b
    }

    pub fn decode(b: &[u8]) -> Result<Superblock, FormatError> {
        const WHAT: &str = "superblock";
        if b.len() < SUPERBLOCK_CRC_OFFSET + 4 {
            return Err(FormatError::Truncated {
                what: WHAT,
                at: b.len(),
            });
        }
        if b[0..8] != SUPERBLOCK_MAGIC {
            return Err(FormatError::Magic { what: WHAT });
        }
        check_version(WHAT, get_u32(b, 8))?;
        let stored = get_u32(b, SUPERBLOCK_CRC_OFFSET);
        let computed = crc32c::crc32c(&b[..SUPERBLOCK_CRC_OFFSET]);
        if stored != computed {
            return Err(FormatError::Checksum {
                what: WHAT,
                stored,
                computed,
            });
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[24..40]);
        let sb = Superblock {
            block_size_bytes: get_u32(b, 12),
            cluster_size_bytes: get_u32(b, 16),
            uuid,
            bdev_size_bytes: get_u64(b, 40),
            slot_bytes: get_u64(b, 48),
            slot_offsets: [get_u64(b, 56), get_u64(b, 64)],
            data_offset_bytes: get_u64(b, 72),
            cluster_count: get_u64(b, 80),
        };
        let expect = Superblock::layout(
            sb.bdev_size_bytes,
            sb.block_size_bytes,
            sb.cluster_size_bytes,
            uuid,
        )
        .map_err(|e| FormatError::Invalid {
            what: WHAT,
            detail: e.to_string(),
        })?;
        if expect != sb {
            return Err(FormatError::Invalid {
                what: WHAT,
                detail: "geometry fields disagree with each other".into(),
            });
        }
        Ok(sb)
    }

    /// Where the copies of slot `slot`'s header block go: its first and its last block, as far
    /// apart as the slot allows.
    pub fn header_offsets(&self, slot: usize) -> [u64; HEADER_COPIES] {
        let at = self.slot_offsets[slot];
        [at, at + self.slot_bytes - META_BLOCK_BYTES]
    }

    /// Where slot `slot`'s payload starts: the block after its first header copy.
    pub fn payload_offset(&self, slot: usize) -> u64 {
        self.slot_offsets[slot] + CHECKPOINT_PAYLOAD_OFFSET as u64
    }

    /// Byte offset on the base device of physical cluster `cluster`.
    pub fn cluster_offset(&self, cluster: PhysCluster) -> u64 {
        debug_assert!(cluster.get() < self.cluster_count);
        self.data_offset_bytes + cluster.get() * u64::from(self.cluster_size_bytes)
    }
}

/// Size of one checkpoint slot for a pool of `clusters` data clusters: the two header
/// blocks, and payload room for objects, [`REFS_PER_CLUSTER`] references per cluster and the
/// bitmap.
fn slot_bytes_for(clusters: u64) -> u64 {
    let objects = SLOT_OBJECT_BYTES;
    let refs = clusters * REFS_PER_CLUSTER * 16;
    let bitmap = clusters.div_ceil(8) + 8;
    HEADER_COPIES as u64 * META_BLOCK_BYTES
        + (32 + objects + refs + bitmap).next_multiple_of(META_BLOCK_BYTES)
}

/// The last format version whose pools this build refuses as too old.
const OLD_VERSION_MAX: u32 = 1;

fn check_version(what: &'static str, found: u32) -> Result<(), FormatError> {
    match found {
        FORMAT_VERSION => Ok(()),
        v if v > FORMAT_VERSION => Err(FormatError::NewerVersion { what, found }),
        1..=OLD_VERSION_MAX => Err(FormatError::OldVersion { what, found }),
        _ => Err(FormatError::BadVersion { what, found }),
    }
}

/// What kind of object a checkpoint entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ObjectKind {
    Volume = 1,
    Snapshot = 2,
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ObjectKind::Volume => "volume",
            ObjectKind::Snapshot => "snapshot",
        })
    }
}

/// One volume or snapshot as persisted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectRecord {
    pub id: u64,
    pub uuid: [u8; 16],
    pub kind: ObjectKind,
    /// Snapshot: the volume it was taken of. Clone: the snapshot it came from. 0: none.
    pub parent: u64,
    pub size_bytes: u64,
    pub name: String,
    pub labels: Vec<(String, String)>,
    /// (virtual cluster, physical cluster) for every mapped cluster, ascending.
    pub mappings: Vec<(u64, u64)>,
}

/// The whole metadata of a pool at one commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub seq: u64,
    pub pool_uuid: [u8; 16],
    pub next_object_id: u64,
    pub objects: Vec<ObjectRecord>,
    /// One bit per data cluster: set when some object maps it.
    pub bitmap: Vec<u8>,
}

/// Payload bytes of one object in a checkpoint.
pub fn object_bytes(name: &str, labels: &[(String, String)], mappings: u64) -> u64 {
    let labels: u64 = labels
        .iter()
        .map(|(k, v)| 4 + k.len() as u64 + v.len() as u64)
        .sum();
    OBJECT_FIXED_BYTES + name.len() as u64 + labels + 16 * mappings
}

/// Bytes of a slot a checkpoint fills besides its objects: both header blocks, and the
/// payload's fixed fields and bitmap.
pub fn checkpoint_fixed_bytes(clusters: u64) -> u64 {
    HEADER_COPIES as u64 * META_BLOCK_BYTES + 16 + 8 + 4 + 8 + clusters.div_ceil(8)
}

/// The one encoder of a checkpoint: writes it field by field into caller memory (a slot's
/// worth at most), so the pool's commit can encode its live metadata into preallocated
/// staging memory without building a [`Checkpoint`] first, and [`Checkpoint::encode`] writes
/// exactly the same bytes. Call [`CheckpointWriter::object`] once per announced object, each
/// followed by its mappings, then [`CheckpointWriter::bitmap`], then
/// [`CheckpointWriter::finish`].
pub struct CheckpointWriter<'a> {
    out: &'a mut [u8],
    at: usize,
    /// Cleared once something did not fit in `out`; `finish` then reports None.
    fits: bool,
}

impl<'a> CheckpointWriter<'a> {
    /// Starts a checkpoint of `objects` objects in `out`.
    pub fn new(
        out: &'a mut [u8],
        pool_uuid: &[u8; 16],
        next_object_id: u64,
        objects: u32,
    ) -> CheckpointWriter<'a> {
        let mut w = CheckpointWriter {
            out,
            at: CHECKPOINT_PAYLOAD_OFFSET,
            fits: true,
        };
        w.put(pool_uuid);
        w.put(&next_object_id.to_le_bytes());
        w.put(&objects.to_le_bytes());
        w
    }

    fn put(&mut self, bytes: &[u8]) {
        match self.out.get_mut(self.at..self.at + bytes.len()) {
            Some(dst) if self.fits => {
                dst.copy_from_slice(bytes);
                self.at += bytes.len();
            }
            _ => self.fits = false,
        }
    }

    fn put_str(&mut self, s: &str) {
        debug_assert!(s.len() <= NAME_MAX_BYTES);
        self.put(&(s.len() as u16).to_le_bytes());
        self.put(s.as_bytes());
    }

    /// One object's fixed fields, name and labels; its `mappings` mappings follow.
    #[allow(clippy::too_many_arguments)]
    pub fn object(
        &mut self,
        id: u64,
        uuid: &[u8; 16],
        kind: ObjectKind,
        parent: u64,
        size_bytes: u64,
        name: &str,
        labels: &[(String, String)],
        mappings: u64,
    ) {
        self.put(&id.to_le_bytes());
        self.put(uuid);
        self.put(&[kind as u8]);
        self.put(&[0u8; 7]);
        self.put(&parent.to_le_bytes());
        self.put(&size_bytes.to_le_bytes());
        self.put_str(name);
        self.put(&(labels.len() as u16).to_le_bytes());
        for (k, v) in labels {
            self.put_str(k);
            self.put_str(v);
        }
        self.put(&mappings.to_le_bytes());
    }

    /// One (virtual cluster, physical cluster) mapping of the current object, ascending.
    pub fn mapping(&mut self, vcluster: u64, cluster: u64) {
        self.put(&vcluster.to_le_bytes());
        self.put(&cluster.to_le_bytes());
    }

    /// The allocation bitmap: `len` bytes, byte `i` given by `byte(i)`.
    pub fn bitmap(&mut self, len: u64, byte: impl Fn(u64) -> u8) {
        self.put(&len.to_le_bytes());
        for i in 0..len {
            self.put(&[byte(i)]);
        }
    }

    /// Writes the header block and zero-fills the payload's last block: returns the
    /// checkpoint's length (header block and payload) in whole metadata blocks, or None when
    /// it did not fit in `out` with a block to spare for the header's second copy (`out` is
    /// a slot's worth).
    pub fn finish(self, seq: u64) -> Option<usize> {
        let end = self.at.next_multiple_of(META_BLOCK_BYTES as usize);
        if !self.fits || end + META_BLOCK_BYTES as usize > self.out.len() {
            return None;
        }
        let b = self.out;
        let payload_len = self.at - CHECKPOINT_PAYLOAD_OFFSET;
        b[self.at..end].fill(0);
        b[..CHECKPOINT_PAYLOAD_OFFSET].fill(0);
        b[0..8].copy_from_slice(&CHECKPOINT_MAGIC);
        put_u32(b, 8, FORMAT_VERSION);
        put_u64(b, 16, seq);
        put_u64(b, 24, payload_len as u64);
        let payload_crc = crc32c::crc32c(&b[CHECKPOINT_PAYLOAD_OFFSET..self.at]);
        put_u32(b, 32, payload_crc);
        let header_crc = crc32c::crc32c(&b[..CHECKPOINT_HEADER_BYTES]);
        put_u32(b, 12, header_crc);
        Some(end)
    }
}

impl Checkpoint {
    /// Encodes into whole metadata blocks (the header block, then the payload), or None if it
    /// would not fit in a slot of `slot_bytes` beside the header's second copy.
    pub fn encode(&self, slot_bytes: u64) -> Option<Vec<u8>> {
        let mut b = vec![0u8; usize::try_from(slot_bytes).ok()?];
        let mut w = CheckpointWriter::new(
            &mut b,
            &self.pool_uuid,
            self.next_object_id,
            self.objects.len() as u32,
        );
        for o in &self.objects {
            w.object(
                o.id,
                &o.uuid,
                o.kind,
                o.parent,
                o.size_bytes,
                &o.name,
                &o.labels,
                o.mappings.len() as u64,
            );
            for &(v, c) in &o.mappings {
                w.mapping(v, c);
            }
        }
        w.bitmap(self.bitmap.len() as u64, |i| self.bitmap[i as usize]);
        let len = w.finish(self.seq)?;
        b.truncate(len);
        debug_assert_eq!(Checkpoint::decode(&b).as_ref(), Ok(self));
        Some(b)
    }

    /// The sequence number and payload length announced by a valid header, so a reader knows
    /// which copy is newest and how much to read.
    pub fn decode_header(b: &[u8]) -> Result<(u64, u64), FormatError> {
        const WHAT: &str = "metadata checkpoint header";
        if b.len() < CHECKPOINT_HEADER_BYTES {
            return Err(FormatError::Truncated {
                what: WHAT,
                at: b.len(),
            });
        }
        if b[0..8] != CHECKPOINT_MAGIC {
            return Err(FormatError::Magic { what: WHAT });
        }
        check_version(WHAT, get_u32(b, 8))?;
        let mut header = b[..CHECKPOINT_HEADER_BYTES].to_vec();
        let stored = get_u32(&header, 12);
        put_u32(&mut header, 12, 0);
        let computed = crc32c::crc32c(&header);
        if stored != computed {
            return Err(FormatError::Checksum {
                what: WHAT,
                stored,
                computed,
            });
        }
        Ok((get_u64(b, 16), get_u64(b, 24)))
    }

    pub fn decode(b: &[u8]) -> Result<Checkpoint, FormatError> {
        const WHAT: &str = "metadata checkpoint";
        let (seq, len) = Checkpoint::decode_header(b)?;
        let end = (CHECKPOINT_PAYLOAD_OFFSET as u64).saturating_add(len);
        if end > b.len() as u64 {
            return Err(FormatError::Truncated {
                what: WHAT,
                at: b.len(),
            });
        }
        let p = &b[CHECKPOINT_PAYLOAD_OFFSET..end as usize];
        let stored = get_u32(b, 32);
        let computed = crc32c::crc32c(p);
        if stored != computed {
            return Err(FormatError::Checksum {
                what: WHAT,
                stored,
                computed,
            });
        }
        let mut r = Reader { b: p, at: 0 };
        let mut pool_uuid = [0u8; 16];
        pool_uuid.copy_from_slice(r.bytes(16)?);
        let next_object_id = r.u64()?;
        let count = r.u32()?;
        if u64::from(count) > OBJECTS_MAX {
            return Err(r.invalid(format!("{count} objects exceed the maximum {OBJECTS_MAX}")));
        }
        let objects = (0..count)
            .map(|_| decode_object(&mut r))
            .collect::<Result<_, _>>()?;
        let bitmap_len = r.u64()?;
        let bitmap = r
            .bytes(usize::try_from(bitmap_len).map_err(|_| r.invalid("bitmap length".into()))?)?
            .to_vec();
        if r.at != p.len() {
            return Err(r.invalid(format!("{} trailing bytes", p.len() - r.at)));
        }
        Ok(Checkpoint {
            seq,
            pool_uuid,
            next_object_id,
            objects,
            bitmap,
        })
    }
}

/// What one copy of a checkpoint header block holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderCopy {
    Valid {
        seq: u64,
        payload_bytes: u64,
    },
    /// All zeros: never written, or cleared before a failed commit was retried.
    Blank,
    /// Anything else (a flipped bit, a torn write, stray bytes): the sequence number its seq
    /// field holds, untrusted, and why the copy is unusable.
    Damaged {
        raw_seq: u64,
        error: FormatError,
    },
}

impl HeaderCopy {
    /// Classifies a header block: only a copy that passes every check of
    /// [`Checkpoint::decode_header`] is valid.
    pub fn classify(b: &[u8]) -> HeaderCopy {
        match Checkpoint::decode_header(b) {
            Ok((seq, payload_bytes)) => HeaderCopy::Valid { seq, payload_bytes },
            Err(_)
                if b.len() >= CHECKPOINT_HEADER_BYTES
                    && b[..CHECKPOINT_HEADER_BYTES].iter().all(|&x| x == 0) =>
            {
                HeaderCopy::Blank
            }
            Err(error) => HeaderCopy::Damaged {
                raw_seq: b
                    .get(16..24)
                    .map_or(0, |s| u64::from_le_bytes(s.try_into().expect("8 bytes"))),
                error,
            },
        }
    }
}

fn decode_object(r: &mut Reader<'_>) -> Result<ObjectRecord, FormatError> {
    let id = r.u64()?;
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(r.bytes(16)?);
    let kind = match r.bytes(8)?[0] {
        1 => ObjectKind::Volume,
        2 => ObjectKind::Snapshot,
        k => return Err(r.invalid(format!("object {id} has unknown kind {k}"))),
    };
    let parent = r.u64()?;
    let size_bytes = r.u64()?;
    let name = r.str()?;
    let label_count = r.u16()? as usize;
    if label_count > LABELS_MAX {
        return Err(r.invalid(format!(
            "object '{name}' has {label_count} labels, above {LABELS_MAX}"
        )));
    }
    let labels = (0..label_count)
        .map(|_| Ok((r.str()?, r.str()?)))
        .collect::<Result<_, FormatError>>()?;
    let count = r.u64()?;
    if count > (r.b.len() - r.at) as u64 / 16 {
        return Err(r.invalid(format!(
            "object '{name}' claims {count} mappings, more than the bytes left"
        )));
    }
    let mappings = (0..count)
        .map(|_| Ok((r.u64()?, r.u64()?)))
        .collect::<Result<_, FormatError>>()?;
    Ok(ObjectRecord {
        id,
        uuid,
        kind,
        parent,
        size_bytes,
        name,
        labels,
        mappings,
    })
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn bytes(&mut self, n: usize) -> Result<&[u8], FormatError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or(FormatError::Truncated {
                what: "metadata checkpoint",
                at: self.at,
            })?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16, FormatError> {
        Ok(u16::from_le_bytes(
            self.bytes(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(
            self.bytes(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(
            self.bytes(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn str(&mut self) -> Result<String, FormatError> {
        let n = self.u16()? as usize;
        if n > NAME_MAX_BYTES {
            return Err(self.invalid(format!("string of {n} bytes above {NAME_MAX_BYTES}")));
        }
        let at = self.at;
        String::from_utf8(self.bytes(n)?.to_vec()).map_err(|_| FormatError::Invalid {
            what: "metadata checkpoint",
            detail: format!("string at byte {at} is not UTF-8"),
        })
    }
    fn invalid(&self, detail: String) -> FormatError {
        FormatError::Invalid {
            what: "metadata checkpoint",
            detail,
        }
    }
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        Checkpoint {
            seq: 7,
            pool_uuid: [9; 16],
            next_object_id: 3,
            objects: vec![ObjectRecord {
                id: 1,
                uuid: [1; 16],
                kind: ObjectKind::Volume,
                parent: 0,
                size_bytes: 1 << 30,
                name: "pg".into(),
                labels: vec![("app".into(), "postgres".into())],
                mappings: vec![(0, 5), (7, 2)],
            }],
            bitmap: vec![0b0010_0100, 0],
        }
    }

    #[test]
    fn superblock_round_trips_and_rejects_damage() {
        let sb = Superblock::layout(4 << 30, 4096, 1 << 20, [7; 16]).unwrap();
        let mut b = sb.encode();
        assert_eq!(Superblock::decode(&b).unwrap(), sb);
        b[45] ^= 1;
        assert!(matches!(
            Superblock::decode(&b),
            Err(FormatError::Checksum { .. })
        ));
        let mut newer = sb.encode();
        put_u32(&mut newer, 8, FORMAT_VERSION + 1);
        assert!(matches!(
            Superblock::decode(&newer),
            Err(FormatError::NewerVersion { .. })
        ));
        assert!(matches!(
            Superblock::decode(&[0u8; 4096]),
            Err(FormatError::Magic { .. })
        ));
    }

    #[test]
    fn checkpoint_round_trips_and_rejects_damage() {
        let c = sample();
        let b = c.encode(1 << 20).unwrap();
        assert_eq!(Checkpoint::decode(&b).unwrap(), c);
        for at in [3, 20, CHECKPOINT_PAYLOAD_OFFSET + 5] {
            let mut bad = b.clone();
            bad[at] ^= 0x40;
            assert!(
                Checkpoint::decode(&bad).is_err(),
                "flip at {at} went unnoticed"
            );
        }
        assert!(
            c.encode(64).is_none(),
            "a slot too small is reported, not overrun"
        );
    }

    #[test]
    fn tiny_devices_are_refused_with_the_sizes() {
        let e = Superblock::layout(1 << 20, 4096, 1 << 20, [0; 16]).unwrap_err();
        assert!(e.to_string().contains("too small"), "{e}");
    }

    /// The layout this build writes. Changing any of these without bumping FORMAT_VERSION
    /// would let old builds misread new pools; update both together.
    #[test]
    fn format_version_is_guarded() {
        let fingerprint = (
            FORMAT_VERSION,
            SUPERBLOCK_MAGIC,
            CHECKPOINT_MAGIC,
            SUPERBLOCK_CRC_OFFSET,
            CHECKPOINT_HEADER_BYTES,
            sample().encode(1 << 20).unwrap().len(),
            crc32c::crc32c(&sample().encode(1 << 20).unwrap()),
        );
        assert_eq!(
            fingerprint.0, 2,
            "bump the expected fingerprint with the version"
        );
        assert_eq!(fingerprint.5, 8192);
        assert_eq!(fingerprint.6, 233_286_296, "checkpoint encoding changed");
        let layout = Superblock::layout(4 << 30, 4096, 1 << 20, [7; 16]).unwrap();
        assert_eq!(
            (
                layout.slot_bytes,
                layout.data_offset_bytes,
                layout.cluster_count
            ),
            (536_576, 2 << 20, 4094)
        );
        // The whole block's crc would not do: a crc over data followed by its own crc is the
        // same for every input. The stored crc covers every field; the rest must stay zero.
        let sb = sample_superblock().encode();
        assert_eq!(sb.len(), META_BLOCK_BYTES as usize);
        assert_eq!(
            get_u32(&sb, SUPERBLOCK_CRC_OFFSET),
            SUPERBLOCK_FIELDS_CRC,
            "superblock encoding changed"
        );
        assert!(
            sb[SUPERBLOCK_CRC_OFFSET + 4..].iter().all(|&x| x == 0),
            "superblock encoding grew past its crc"
        );
    }

    /// crc32c of bytes `0..SUPERBLOCK_CRC_OFFSET` of [`sample_superblock`] at FORMAT_VERSION 2.
    const SUPERBLOCK_FIELDS_CRC: u32 = 287_654_976;

    /// A real geometry (decode checks that the fields agree) with a distinct value in each
    /// field, so moving, widening or dropping any field changes its encoding.
    fn sample_superblock() -> Superblock {
        Superblock::layout(
            (4 << 30) + 12_345 * 4096,
            512,
            1 << 20,
            *b"0123456789abcdef",
        )
        .expect("a valid geometry")
    }
}
