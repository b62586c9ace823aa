//! The baseline: the file driven with plain io_uring, one pinned thread per core, no engine.
//!
//! It is deliberately a fair opponent, not a handicapped one: the ring comes from the same
//! `build_ring` as the engine's (SINGLE_ISSUER, DEFER_TASKRUN, COOP_TASKRUN where accepted), the
//! file is opened O_DIRECT and registered, buffers come from the same kind of DMA pool and are
//! registered as fixed buffers, and the queue depth is the same. The loop is the tightest one
//! io_uring allows: submit, wait for at least one completion, reap all, resubmit.

use crate::report::{Recorder, RunResult};
use crate::workload::Workload;
use anyhow::{bail, Context, Result};
use cairn_engine::dma::BufPool;
use cairn_engine::reactor::ring::{Ring, RingOptions, Route, RING_ENTRIES_DEFAULT};
use cairn_engine::CoreId;
use io_uring::{opcode, types};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

/// How the raw loop waits for completions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RawWait {
    /// Block in io_uring_enter until at least one completion, as fio does.
    Block,
    /// Never block: enter without waiting and reap in a loop, as a polled engine does.
    Spin,
}

pub fn run(w: &Workload, cores: &[CoreId], wait: RawWait) -> Result<RunResult> {
    let path = w.file.as_ref().context("--target raw needs --file")?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .with_context(|| format!("opening {} with O_DIRECT", path.display()))?;
    let cpu0 = crate::report::cpu_time();
    let jobs: Vec<_> = cores
        .iter()
        .enumerate()
        .map(|(job, &core)| {
            let w = w.clone();
            let fd = file.as_raw_fd();
            std::thread::Builder::new()
                .name(format!("raw-{job}"))
                .spawn(move || run_job(&w, job as u32, core, fd, wait))
                .context("spawning a raw job thread")
        })
        .collect::<Result<_>>()?;
    let mut rec = Recorder::default();
    let mut elapsed = Duration::ZERO;
    for j in jobs {
        let (r, e) = j
            .join()
            .map_err(|_| anyhow::anyhow!("raw job panicked"))??;
        rec.merge(&r);
        elapsed = elapsed.max(e);
    }
    let cpu_s = (crate::report::cpu_time() - cpu0).as_secs_f64();
    Ok(RunResult::new("raw", &rec, w.bs_bytes, elapsed, cpu_s))
}

fn run_job(
    w: &Workload,
    job: u32,
    core: CoreId,
    fd: i32,
    wait: RawWait,
) -> Result<(Recorder, Duration)> {
    crate::pin(core)?;
    let mut ring =
        Ring::new(RING_ENTRIES_DEFAULT, RingOptions::default()).context("building the raw ring")?;
    let mut pool = BufPool::new(w.qd, crate::buf_size(w.bs_bytes), true)?;
    if ring.register_region(pool.region()).is_ok() {
        pool.set_fixed_index(0);
    }
    let file = types::Fixed(ring.register_file(fd).context("registering the file")?);
    let mut bufs: Vec<_> = (0..w.qd)
        .map(|_| pool.get().expect("pool sized to qd"))
        .collect();
    crate::workload::fill_payloads(&mut bufs);
    let mut gen = w.generator(job);
    let mut rec = Recorder::default();
    let mut sent = vec![Instant::now(); w.qd as usize];
    let start = Instant::now();
    let deadline = start + w.runtime;
    for slot in 0..w.qd {
        submit(
            &mut ring,
            file,
            &mut bufs[slot as usize],
            w.bs_bytes,
            gen.next(),
            slot,
        );
        sent[slot as usize] = start;
    }
    let mut in_flight = w.qd;
    let mut error = None;
    let mut done = Vec::with_capacity(w.qd as usize);
    while in_flight > 0 {
        match wait {
            RawWait::Block => ring.wait(None),
            RawWait::Spin => ring.kick(),
        }
        let now = Instant::now();
        ring.reap(|route, res| {
            if let Route::Io { tag, .. } = route {
                done.push((tag, res));
            }
        });
        for (slot, res) in done.drain(..) {
            if res != w.bs_bytes as i32 && error.is_none() {
                error = Some(res);
            }
            rec.record(now - sent[slot as usize]);
            if now < deadline && error.is_none() {
                submit(
                    &mut ring,
                    file,
                    &mut bufs[slot as usize],
                    w.bs_bytes,
                    gen.next(),
                    slot,
                );
                sent[slot as usize] = now;
            } else {
                in_flight -= 1;
            }
        }
    }
    let elapsed = start.elapsed();
    bufs.into_iter().for_each(|b| pool.put(b));
    if let Some(res) = error {
        bail!(
            "raw I/O failed: result {res} ({})",
            std::io::Error::from_raw_os_error(-res)
        );
    }
    Ok((rec, elapsed))
}

fn submit(
    ring: &mut Ring,
    file: types::Fixed,
    buf: &mut cairn_engine::dma::DmaBuf,
    bs: u32,
    (write, offset): (bool, u64),
    slot: u32,
) {
    let b = buf.io_buf();
    let entry = match (write, b.fixed_index()) {
        (false, Some(i)) => opcode::ReadFixed::new(file, b.ptr(), bs, i)
            .offset(offset)
            .build(),
        (true, Some(i)) => opcode::WriteFixed::new(file, b.ptr(), bs, i)
            .offset(offset)
            .build(),
        (false, None) => opcode::Read::new(file, b.ptr(), bs).offset(offset).build(),
        (true, None) => opcode::Write::new(file, b.ptr(), bs).offset(offset).build(),
    };
    let route = Route::Io {
        owner: 0,
        tag: slot,
    };
    // SAFETY: the buffer belongs to this job until its completion is reaped, and the file stays
    // registered and open for the whole run.
    unsafe { ring.push_io(entry.user_data(route.encode())) };
}
