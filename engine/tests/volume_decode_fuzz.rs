//! Pool metadata is outside input: a file anyone can damage. Decoding a superblock or a
//! checkpoint from arbitrary or mutated bytes, and running the fsck on whatever decodes, must
//! return a result (usually an error naming the problem) and never panic or overflow.

use cairn_engine::volume::format::{Checkpoint, ObjectKind, ObjectRecord, Superblock};
use cairn_engine::volume::meta::check_checkpoint;
use proptest::prelude::*;

fn sample() -> (Superblock, Vec<u8>) {
    let sb = Superblock::layout(64 << 20, 4096, 1 << 20, [3; 16]).unwrap();
    let mut bitmap = vec![0u8; sb.cluster_count.div_ceil(8) as usize];
    bitmap[0] = 0b11;
    let c = Checkpoint {
        seq: 9,
        pool_uuid: [3; 16],
        next_object_id: 3,
        objects: vec![
            ObjectRecord {
                id: 1,
                uuid: [1; 16],
                kind: ObjectKind::Volume,
                parent: 0,
                size_bytes: 8 << 20,
                name: "pg".into(),
                labels: vec![("app".into(), "db".into())],
                mappings: vec![(0, 0), (3, 1)],
            },
            ObjectRecord {
                id: 2,
                uuid: [2; 16],
                kind: ObjectKind::Snapshot,
                parent: 1,
                size_bytes: 8 << 20,
                name: "pg-snap".into(),
                labels: vec![],
                mappings: vec![(0, 0)],
            },
        ],
        bitmap,
    };
    let bytes = c.encode(sb.slot_bytes).unwrap();
    (sb, bytes)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn mutated_checkpoints_never_panic(flips in proptest::collection::vec((0usize..8192, any::<u8>()), 1..8), cut in 0usize..9000) {
        let (sb, mut bytes) = sample();
        for (at, x) in flips {
            let at = at % bytes.len();
            bytes[at] ^= x | 1;
        }
        bytes.truncate(cut.max(1).min(bytes.len()));
        if let Ok(c) = Checkpoint::decode(&bytes) {
            let _ = check_checkpoint(&sb, &c);
        }
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..8192)) {
        let _ = Superblock::decode(&bytes);
        let _ = Checkpoint::decode_header(&bytes);
        let _ = Checkpoint::decode(&bytes);
    }

    /// Checkpoints that decode but carry nonsense (huge ids, clusters past the pool, unsorted
    /// mappings) are reported by the fsck, not trusted.
    #[test]
    fn fsck_survives_nonsense_records(v in any::<u64>(), p in any::<u64>(), size in any::<u64>(), parent in any::<u64>()) {
        let (sb, bytes) = sample();
        let mut c = Checkpoint::decode(&bytes).unwrap();
        c.objects[0].mappings.push((v, p));
        c.objects[0].size_bytes = size;
        c.objects[1].parent = parent;
        let _ = check_checkpoint(&sb, &c);
    }

    /// Whatever the fsck accepts can be loaded: opening never panics on metadata it passed.
    #[test]
    fn fsck_accepted_checkpoints_load(size_blocks in 1u64..1 << 22, id in 1u64..3) {
        let (sb, bytes) = sample();
        let mut c = Checkpoint::decode(&bytes).unwrap();
        c.objects[0].size_bytes = size_blocks * 4096;
        c.objects[1].id = id;
        if check_checkpoint(&sb, &c).is_ok() {
            cairn_engine::volume::meta::Meta::from_checkpoint(sb.clone(), &c).unwrap();
        }
    }
}
