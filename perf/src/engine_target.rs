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
}

pub fn run(w: &Workload, cores: &[CoreId], opts: EngineOpts) -> Result<RunResult> {
    let list = CoreList::parse(
        &cores
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(","),
    )?;
    let mut config = EngineConfig::new(list);
    config.idle = opts.idle;
    config.buf_count = w.qd;
    config.buf_size_bytes = crate::buf_size(w.bs_bytes);
    let engine = Engine::start(config)?;
    let bdev = engine.add_bdev(open_bdev(w, opts)?)?;
    let (tx, rx) = std::sync::mpsc::channel();
    let cpu0 = crate::report::cpu_time();
    for (job, &core) in cores.iter().enumerate() {
        let poller = Job::new(w, job as u32, bdev.id(), tx.clone());
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
    engine.stop();
    Ok(RunResult::new("engine", &rec, w.bs_bytes, elapsed, cpu_s))
}

fn open_bdev(w: &Workload, opts: EngineOpts) -> Result<Arc<dyn Bdev>> {
    Ok(match opts.bdev {
        BdevKind::Uring => {
            let path = w.file.as_ref().context("--bdev uring needs --file")?;
            let options = UringOptions {
                iopoll: opts.iopoll,
                sqpoll_idle_ms: opts.sqpoll.then_some(1000),
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
        let bufs: Vec<_> = (0..self.qd).map_while(|_| io.pool().get()).collect();
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
                run.error = Some(format!("I/O failed: result {}", c.res));
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
