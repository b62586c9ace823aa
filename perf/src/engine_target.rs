//! The candidate: the same workload through the engine. One job per core runs as a poller on
//! that core's reactor (as SPDK's bdevperf does), so every I/O takes the engine's whole
//! submit/complete path: validation, the bdev channel, the reactor's ring (for uring), and
//! completion delivery to the owner's queue.

use crate::report::{Recorder, RunResult};
use crate::workload::{OpGen, Workload};
use anyhow::{bail, Context, Result};
use cairn_engine::bdev::{
    malloc::MallocBdev, null::NullBdev, uring::UringBdev, uring::UringOptions, IoRequest,
};
use cairn_engine::dma::DmaBuf;
use cairn_engine::reactor::{BdevId, OwnerId};
use cairn_engine::volume::{Pool, CLUSTER_DEFAULT_BYTES};
use cairn_engine::{
    Bdev, Core, CoreId, CoreList, Engine, EngineConfig, IdlePolicy, IoOp, Poller, PollerState,
};
use clap::ValueEnum;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BdevKind {
    /// The file, O_DIRECT through io_uring.
    Uring,
    /// RAM.
    Malloc,
    /// No device: measures the engine alone.
    Null,
}

/// Engine knobs the perf tool exposes.
#[derive(Clone, Copy, Debug)]
pub struct EngineOpts {
    pub bdev: BdevKind,
    pub idle: IdlePolicy,
    pub iopoll: bool,
    pub sqpoll: bool,
    pub sqpoll_cpu: Option<u32>,
}

pub fn run(w: &Workload, cores: &[CoreId], opts: EngineOpts) -> Result<RunResult> {
    let engine = start_engine(w, cores, opts, 0)?;
    let bdev = engine.add_bdev(open_bdev(w, opts)?)?;
    let r = drive(&engine, bdev.id(), w, cores, "engine");
    engine.stop();
    r
}

/// Buffers beyond the jobs' for the volume target's preallocation queue.
const PREFILL_DEPTH: u32 = 16;
/// Size of each preallocation write.
const PREFILL_BYTES: u32 = 128 << 10;

/// The candidate through the volume store: a pool formatted on the file, one thin volume
/// filling it, preallocated with real data (unless `fresh`) so reads hit the disk as the raw
/// baseline's do, then the same jobs as the engine target.
pub fn run_volume(
    w: &Workload,
    cores: &[CoreId],
    opts: EngineOpts,
    fresh: bool,
    encrypt: bool,
) -> Result<RunResult> {
    let path = w.file.as_ref().context("--target volume needs --file")?;
    let engine = start_engine(w, cores, opts, PREFILL_DEPTH)?;
    let base: Arc<dyn Bdev> = Arc::new(UringBdev::open(
        "perf-pool",
        path,
        UringOptions {
            exclusive: true,
            ..UringOptions::default()
        },
    )?);
    let pool = Pool::create(&engine, "perf", base, cores[0], CLUSTER_DEFAULT_BYTES)?;
    let info = pool.info(&engine)?;
    let room = info.clusters * u64::from(info.cluster_size_bytes);
    let size = w.size_bytes.min(room) / u64::from(w.bs_bytes) * u64::from(w.bs_bytes);
    pool.create_volume(&engine, "perf", size, Vec::new())?;
    let vol = pool.open_volume(&engine, "perf")?;
    let (served, size) = if encrypt {
        let crypt = encrypted(&engine, &vol)?;
        let size = crypt.info().size_bytes / u64::from(w.bs_bytes) * u64::from(w.bs_bytes);
        (crypt, size)
    } else {
        (vol.clone(), size)
    };
    if !fresh {
        prefill(&engine, &served, cores[0], size)?;
    }
    let mut w = w.clone();
    w.size_bytes = size;
    let r = drive(&engine, served.id(), &w, cores, "volume");
    let allocated = pool
        .info(&engine)?
        .objects
        .iter()
        .map(|o| o.allocated_clusters)
        .sum::<u64>();
    if fresh {
        eprintln!(
            "volume: {allocated} of {} clusters allocated by the run's first writes",
            info.clusters
        );
    }
    engine.stop();
    r
}

/// The crypt layer on `vol` with a fresh random key, as an encrypted export serves it.
fn encrypted(engine: &Engine, vol: &cairn_engine::BdevHandle) -> Result<cairn_engine::BdevHandle> {
    use cairn_engine::bdev::crypt::{attach, CryptKey, CRYPT_KEY_BYTES};
    let mut raw = [0u8; CRYPT_KEY_BYTES];
    cairn_engine::sys::random_bytes(&mut raw).context("drawing a key")?;
    let key = CryptKey::parse(&raw)?;
    raw.fill(0);
    Ok(attach(engine, vol, "perf-crypt", "perf", &key, true)?)
}

/// Writes every byte of the volume once, so every cluster is allocated and holds data.
fn prefill(engine: &Engine, vol: &cairn_engine::BdevHandle, core: CoreId, size: u64) -> Result<()> {
    let mut q = engine.queue(vol, core, PREFILL_DEPTH)?;
    let chunk = u64::from(PREFILL_BYTES.min(q.buf_size_bytes()));
    let mut next = 0u64;
    let mut done = Vec::new();
    let started = Instant::now();
    let mut last = Instant::now();
    while next < size || q.in_flight() > 0 {
        while next < size && q.in_flight() < PREFILL_DEPTH {
            let buf = q.alloc_buf()?;
            q.buf_mut(&buf)
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = (i as u64 ^ next) as u8);
            let len = chunk.min(size - next) as u32;
            let req = cairn_engine::Request {
                op: IoOp::Write,
                offset_bytes: next,
                len_bytes: len,
                buf: Some(buf),
                fua: false,
                user_data: 0,
            };
            q.submit(req).map_err(|(e, _)| e)?;
            next += u64::from(len);
        }
        done.clear();
        q.wait(1, &mut done);
        for c in done.drain(..) {
            c.result?;
            q.free_buf(c.buf.expect("writes return their buffer"));
        }
        if last.elapsed().as_millis() >= 1000 {
            eprintln!(
                "preallocating the volume: {}/{} MiB, {:.0} MiB/s",
                next >> 20,
                size >> 20,
                (next >> 20) as f64 / started.elapsed().as_secs_f64()
            );
            last = Instant::now();
        }
    }
    q.flush()?;
    Ok(())
}

fn start_engine(
    w: &Workload,
    cores: &[CoreId],
    opts: EngineOpts,
    extra_bufs: u32,
) -> Result<Engine> {
    let text: Vec<String> = cores.iter().map(|c| c.to_string()).collect();
    let mut config = EngineConfig::new(CoreList::parse(&text.join(","))?);
    config.idle = opts.idle;
    config.buf_count = w.qd + extra_bufs;
    config.buf_size_bytes = if extra_bufs > 0 {
        crate::buf_size(w.bs_bytes).max(PREFILL_BYTES)
    } else {
        crate::buf_size(w.bs_bytes)
    };
    Ok(Engine::start(config)?)
}

/// Runs one job per core against `bdev` and merges their figures.
fn drive(
    engine: &Engine,
    bdev: BdevId,
    w: &Workload,
    cores: &[CoreId],
    label: &str,
) -> Result<RunResult> {
    let (tx, rx) = std::sync::mpsc::channel();
    let cpu0 = crate::report::cpu_time();
    for (job, &core) in cores.iter().enumerate() {
        let poller = Job::new(w, job as u32, bdev, tx.clone());
        engine.spawn_poller(core, Box::new(poller), None)?;
    }
    drop(tx);
    let mut rec = Recorder::default();
    let mut elapsed = Duration::ZERO;
    for out in rx.iter() {
        let (r, e) = out.map_err(|e| anyhow::anyhow!(e))?;
        rec.merge(&r);
        elapsed = elapsed.max(e);
    }
    let cpu_s = (crate::report::cpu_time() - cpu0).as_secs_f64();
    Ok(RunResult::new(label, &rec, w.bs_bytes, elapsed, cpu_s))
}

fn open_bdev(w: &Workload, opts: EngineOpts) -> Result<Arc<dyn Bdev>> {
    Ok(match opts.bdev {
        BdevKind::Uring => {
            let path = w.file.as_ref().context("--bdev uring needs --file")?;
            let options = UringOptions {
                iopoll: opts.iopoll,
                sqpoll_idle_ms: opts.sqpoll.then_some(1000),
                sqpoll_cpu: opts.sqpoll_cpu,
                ..UringOptions::default()
            };
            Arc::new(UringBdev::open("perf", path, options)?)
        }
        BdevKind::Malloc => Arc::new(MallocBdev::new("perf", w.size_bytes, 4096)?),
        BdevKind::Null => Arc::new(NullBdev::new("perf", w.size_bytes, 4096)?),
    })
}

type JobOut = Result<(Recorder, Duration), String>;

/// One core's load generator, living on that core's reactor.
struct Job {
    bdev: BdevId,
    bs_bytes: u32,
    qd: u32,
    runtime: Duration,
    gen: OpGen,
    rec: Recorder,
    state: Option<Running>,
    done: Option<Sender<JobOut>>,
}

struct Running {
    owner: OwnerId,
    bufs: Vec<DmaBuf>,
    sent: Vec<Instant>,
    start: Instant,
    deadline: Instant,
    in_flight: u32,
    error: Option<String>,
}

impl Job {
    fn new(w: &Workload, job: u32, bdev: BdevId, done: Sender<JobOut>) -> Job {
        Job {
            bdev,
            bs_bytes: w.bs_bytes,
            qd: w.qd,
            runtime: w.runtime,
            gen: w.generator(job),
            rec: Recorder::default(),
            state: None,
            done: Some(done),
        }
    }

    fn start(&mut self, core: &mut Core) -> Result<Running> {
        let io = core.io();
        let mut bufs: Vec<_> = (0..self.qd).map_while(|_| io.pool().get()).collect();
        crate::workload::fill_payloads(&mut bufs);
        if bufs.len() != self.qd as usize {
            bufs.into_iter().for_each(|b| io.pool().put(b));
            bail!(
                "core {}: buffer pool smaller than --qd {}",
                core.id(),
                self.qd
            );
        }
        let owner = io.register_owner(self.qd as usize);
        let now = core.now();
        let mut run = Running {
            owner,
            bufs,
            sent: vec![now; self.qd as usize],
            start: now,
            deadline: now + self.runtime,
            in_flight: 0,
            error: None,
        };
        for slot in 0..self.qd {
            self.submit(core, &mut run, slot)?;
        }
        Ok(run)
    }

    #[inline]
    fn submit(
        &mut self,
        core: &mut Core,
        run: &mut Running,
        slot: u32,
    ) -> Result<(), cairn_engine::IoError> {
        let (write, offset_bytes) = self.gen.next();
        let req = IoRequest {
            op: if write { IoOp::Write } else { IoOp::Read },
            offset_bytes,
            len_bytes: self.bs_bytes,
            buf: Some(run.bufs[slot as usize].io_buf()),
            fua: false,
            owner: run.owner,
            tag: slot,
        };
        run.sent[slot as usize] = core.now();
        core.submit(self.bdev, req)?;
        run.in_flight += 1;
        Ok(())
    }

    fn finish(&mut self, core: &mut Core, run: Running) -> PollerState {
        let io = core.io();
        io.release_owner(run.owner);
        run.bufs.into_iter().for_each(|b| io.pool().put(b));
        let out = match run.error {
            Some(e) => Err(e),
            None => Ok((std::mem::take(&mut self.rec), core.now() - run.start)),
        };
        if let Some(tx) = self.done.take() {
            drop(tx.send(out));
        }
        PollerState::Finished
    }
}

impl Poller for Job {
    /// Until it has started; then every completion it waits for wakes the reactor (a ring
    /// completion, or one posted inside submit, which the reactor sees as pending work), so
    /// the reactor may wait in the kernel as it would for any other client.
    fn needs_poll(&self) -> bool {
        self.state.is_none()
    }

    fn poll(&mut self, core: &mut Core) -> PollerState {
        let mut run = match self.state.take() {
            Some(run) => run,
            None => match self.start(core) {
                Ok(run) => run,
                Err(e) => {
                    if let Some(tx) = self.done.take() {
                        drop(tx.send(Err(e.to_string())));
                    }
                    return PollerState::Finished;
                }
            },
        };
        let now = core.now();
        let mut reaped = 0;
        // At most qd per call: RAM bdevs complete inside submit, and an unbounded loop would
        // never hand the core back to the reactor.
        while reaped < self.qd {
            let Some(c) = core.io().pop(run.owner) else {
                break;
            };
            reaped += 1;
            run.in_flight -= 1;
            if c.res != self.bs_bytes as i32 && run.error.is_none() {
                run.error = Some(format!(
                    "I/O failed: {}",
                    cairn_engine::IoError::check(IoOp::Read, c.res, self.bs_bytes)
                        .err()
                        .map_or(format!("result {}", c.res), |e| e.to_string())
                ));
            }
            self.rec.record(now - run.sent[c.tag as usize]);
            let more = now < run.deadline && run.error.is_none() && !core.stopping();
            if more {
                if let Err(e) = self.submit(core, &mut run, c.tag) {
                    run.error = Some(e.to_string());
                }
            }
        }
        if run.in_flight == 0 {
            return self.finish(core, run);
        }
        self.state = Some(run);
        if reaped > 0 {
            PollerState::Busy(reaped as usize)
        } else {
            PollerState::Idle
        }
    }
}
