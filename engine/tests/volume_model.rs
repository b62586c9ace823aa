//! Property test of the volume store against an in-memory model, with crashes.
//!
//! Random sequences of create, write (plain and FUA), flush, trim, write-zeroes, snapshot,
//! clone, grow, delete and crash-and-reopen run against a pool on a fault bdev with a volatile
//! write cache. The model keeps the live state and the durable state (as of the last completed
//! flush or control operation, both of which commit the whole pool); a crash drops every
//! unflushed write and the pool must reopen to exactly the durable state. After every step the
//! pool's own `check()` must pass and every object must read back byte-exact. Failing seeds are
//! kept in `volume_model.proptest-regressions` next to this file.

mod common;

use cairn_engine::bdev::fault::{FaultBdev, FaultControl};
use cairn_engine::bdev::malloc::MallocBdev;
use cairn_engine::volume::{Pool, PoolError};
use cairn_engine::{Bdev, BdevHandle, CoreId, Engine, IoQueue};
use proptest::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;

const CLUSTER: u64 = 64 << 10;
const BLOCK: u64 = 4096;
const BASE_BYTES: u64 = 8 << 20;
/// Keeps the pool far from full, so no write fails half-applied for lack of space.
const OBJECTS_MAX: usize = 6;

#[derive(Clone, Debug)]
enum Op {
    Create {
        blocks: u16,
    },
    Write {
        obj: u8,
        block: u16,
        blocks: u8,
        fill: u8,
        fua: bool,
    },
    Flush {
        obj: u8,
    },
    Trim {
        obj: u8,
        block: u16,
        blocks: u16,
    },
    WriteZeroes {
        obj: u8,
        block: u16,
        blocks: u16,
    },
    Snapshot {
        obj: u8,
    },
    Clone {
        obj: u8,
    },
    Grow {
        obj: u8,
        blocks: u16,
    },
    Delete {
        obj: u8,
    },
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (1u16..64).prop_map(|blocks| Op::Create { blocks }),
        6 => (any::<u8>(), any::<u16>(), 1u8..=16, any::<u8>(), any::<bool>())
            .prop_map(|(obj, block, blocks, fill, fua)| Op::Write { obj, block, blocks, fill, fua }),
        2 => any::<u8>().prop_map(|obj| Op::Flush { obj }),
        1 => (any::<u8>(), any::<u16>(), 1u16..64).prop_map(|(obj, block, blocks)| Op::Trim { obj, block, blocks }),
        1 => (any::<u8>(), any::<u16>(), 1u16..64).prop_map(|(obj, block, blocks)| Op::WriteZeroes { obj, block, blocks }),
        1 => any::<u8>().prop_map(|obj| Op::Snapshot { obj }),
        1 => any::<u8>().prop_map(|obj| Op::Clone { obj }),
        1 => (any::<u8>(), 1u16..32).prop_map(|(obj, blocks)| Op::Grow { obj, blocks }),
        1 => any::<u8>().prop_map(|obj| Op::Delete { obj }),
        2 => Just(Op::Crash),
    ]
}

#[derive(Clone, Debug, PartialEq)]
struct MObj {
    name: String,
    snapshot: bool,
    origin: Option<String>,
    data: Vec<u8>,
}

#[derive(Clone, Debug, Default)]
struct Model {
    live: Vec<MObj>,
    durable: Vec<MObj>,
    next: u32,
}

impl Model {
    fn commit(&mut self) {
        self.durable = self.live.clone();
    }
    fn pick(&self, i: u8, want_snapshot: Option<bool>) -> Option<usize> {
        let c: Vec<usize> = (0..self.live.len())
            .filter(|&j| want_snapshot.is_none_or(|s| self.live[j].snapshot == s))
            .collect();
        (!c.is_empty()).then(|| c[i as usize % c.len()])
    }
    fn name(&mut self, prefix: &str) -> String {
        self.next += 1;
        format!("{prefix}{}", self.next)
    }
}

struct Harness {
    engine: Engine,
    base: Arc<dyn Bdev>,
    fault: Arc<FaultControl>,
    pool: Option<Pool>,
    open: HashMap<String, (BdevHandle, IoQueue)>,
    home: CoreId,
    io_core: CoreId,
}

impl Harness {
    fn new() -> Harness {
        let cores = common::cores(2);
        let engine = common::start(cores.clone());
        let ids = common::core_ids(&cores);
        let malloc: Arc<dyn Bdev> = Arc::new(MallocBdev::new("ram", BASE_BYTES, 4096).unwrap());
        let fault = FaultBdev::with_volatile_cache("faulty", malloc);
        let control = fault.control();
        let base: Arc<dyn Bdev> = Arc::new(fault);
        let pool = Pool::create(&engine, "p", base.clone(), ids[0], CLUSTER as u32).unwrap();
        Harness {
            engine,
            base,
            fault: control,
            pool: Some(pool),
            open: HashMap::new(),
            home: ids[0],
            io_core: *ids.last().unwrap(),
        }
    }

    fn pool(&self) -> &Pool {
        self.pool.as_ref().unwrap()
    }

    fn q(&mut self, name: &str) -> &mut IoQueue {
        if !self.open.contains_key(name) {
            let h = self.pool().open_volume(&self.engine, name).unwrap();
            let q = self.engine.queue(&h, self.io_core, 4).unwrap();
            self.open.insert(name.to_string(), (h, q));
        }
        &mut self.open.get_mut(name).unwrap().1
    }

    fn close(&mut self, name: &str) {
        if let Some((h, q)) = self.open.remove(name) {
            drop(q);
            self.pool().close_volume(&self.engine, &h).unwrap();
        }
    }

    fn crash_and_reopen(&mut self) {
        let names: Vec<String> = self.open.keys().cloned().collect();
        names.iter().for_each(|n| self.close(n));
        self.pool.take().unwrap().close(&self.engine).unwrap();
        self.fault.crash();
        self.pool = Some(
            Pool::open(&self.engine, "p", self.base.clone(), self.home)
                .expect("pool reopens after a crash"),
        );
    }

    fn check(&mut self, model: &Model) {
        self.pool()
            .check(&self.engine)
            .expect("pool invariants hold");
        let info = self.pool().info(&self.engine).unwrap();
        let mut names: Vec<&str> = info.objects.iter().map(|o| o.name.as_str()).collect();
        let mut want: Vec<&str> = model.live.iter().map(|o| o.name.as_str()).collect();
        names.sort_unstable();
        want.sort_unstable();
        assert_eq!(names, want, "pool objects differ from the model");
        for o in model.live.clone() {
            let mut got = vec![0u8; o.data.len()];
            for (i, chunk) in got.chunks_mut(CLUSTER as usize).enumerate() {
                self.q(&o.name).read_at(i as u64 * CLUSTER, chunk).unwrap();
            }
            common::assert_same(&o.name, 0, &got, &o.data);
        }
    }
}

fn apply(h: &mut Harness, m: &mut Model, op: &Op) {
    match *op {
        Op::Create { blocks } => {
            if m.live.len() >= OBJECTS_MAX {
                return;
            }
            let name = m.name("v");
            let size = u64::from(blocks) * BLOCK;
            h.pool()
                .create_volume(&h.engine, &name, size, vec![])
                .unwrap();
            m.live.push(MObj {
                name,
                snapshot: false,
                origin: None,
                data: vec![0; size as usize],
            });
            m.commit();
        }
        Op::Write {
            obj,
            block,
            blocks,
            fill,
            fua,
        } => {
            let Some(i) = m.pick(obj, Some(false)) else {
                return;
            };
            let size = m.live[i].data.len() as u64 / BLOCK;
            let start = u64::from(block) % size;
            let n = u64::from(blocks).min(size - start);
            let data = vec![fill; (n * BLOCK) as usize];
            let name = m.live[i].name.clone();
            h.q(&name).write_at(start * BLOCK, &data, fua).unwrap();
            m.live[i].data[(start * BLOCK) as usize..((start + n) * BLOCK) as usize]
                .copy_from_slice(&data);
            if fua {
                // A FUA write commits the pool (its cluster mapping must be durable too).
                m.commit();
            }
        }
        Op::Flush { obj } => {
            let Some(i) = m.pick(obj, Some(false)) else {
                return;
            };
            let name = m.live[i].name.clone();
            h.q(&name).flush().unwrap();
            m.commit();
        }
        Op::Trim { obj, block, blocks } | Op::WriteZeroes { obj, block, blocks } => {
            let Some(i) = m.pick(obj, Some(false)) else {
                return;
            };
            let size = m.live[i].data.len() as u64 / BLOCK;
            let start = u64::from(block) % size;
            let n = u64::from(blocks).min(size - start);
            let name = m.live[i].name.clone();
            let (off, len) = (start * BLOCK, n * BLOCK);
            let data = &mut m.live[i].data;
            if matches!(op, Op::Trim { .. }) {
                h.q(&name).trim(off, len as u32).unwrap();
                let first = off.div_ceil(CLUSTER) * CLUSTER;
                let end = ((off + len) / CLUSTER * CLUSTER).min(data.len() as u64);
                if first < end {
                    data[first as usize..end as usize].fill(0);
                }
            } else {
                h.q(&name).write_zeroes(off, len as u32).unwrap();
                data[off as usize..(off + len) as usize].fill(0);
            }
        }
        Op::Snapshot { obj } => {
            let Some(i) = m.pick(obj, Some(false)) else {
                return;
            };
            if m.live.len() >= OBJECTS_MAX {
                return;
            }
            let name = m.name("s");
            let src = m.live[i].clone();
            h.pool().snapshot(&h.engine, &src.name, &name).unwrap();
            m.live.push(MObj {
                name,
                snapshot: true,
                origin: Some(src.name),
                data: src.data,
            });
            m.commit();
        }
        Op::Clone { obj } => {
            let Some(i) = m.pick(obj, Some(true)) else {
                return;
            };
            if m.live.len() >= OBJECTS_MAX {
                return;
            }
            let name = m.name("c");
            let src = m.live[i].clone();
            h.pool()
                .clone_snapshot(&h.engine, &src.name, &name)
                .unwrap();
            m.live.push(MObj {
                name,
                snapshot: false,
                origin: Some(src.name),
                data: src.data,
            });
            m.commit();
        }
        Op::Grow { obj, blocks } => {
            let Some(i) = m.pick(obj, Some(false)) else {
                return;
            };
            let size = m.live[i].data.len() as u64 + u64::from(blocks) * BLOCK;
            h.pool()
                .grow(&h.engine, &m.live[i].name.clone(), size)
                .unwrap();
            m.live[i].data.resize(size as usize, 0);
            m.commit();
        }
        Op::Delete { obj } => {
            let Some(i) = m.pick(obj, None) else { return };
            let name = m.live[i].name.clone();
            h.close(&name);
            let has_clones = m
                .live
                .iter()
                .any(|o| !o.snapshot && o.origin.as_deref() == Some(&name));
            match h.pool().delete(&h.engine, &name) {
                Ok(()) => {
                    assert!(
                        !(m.live[i].snapshot && has_clones),
                        "deleted snapshot {name} that has clones"
                    );
                    m.live.remove(i);
                    m.commit();
                }
                Err(PoolError::HasDependants { .. }) if m.live[i].snapshot && has_clones => {}
                Err(e) => panic!("delete {name}: {e}"),
            }
        }
        Op::Crash => {
            h.crash_and_reopen();
            m.live = m.durable.clone();
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, max_shrink_iters: 64, ..ProptestConfig::default() })]

    #[test]
    fn volume_store_matches_model_across_crashes(ops in proptest::collection::vec(op(), 1..30)) {
        let mut h = Harness::new();
        let mut m = Model::default();
        for op in &ops {
            apply(&mut h, &mut m, op);
            h.check(&m);
        }
        h.crash_and_reopen();
        m.live = m.durable.clone();
        h.check(&m);
    }
}
