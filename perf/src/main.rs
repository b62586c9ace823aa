//! cairn-perf: drives a workload through the raw disk or through the engine and compares them.
//!
//! `run` measures one target; `compare` interleaves baseline and candidate runs (A B A B …) on
//! the same file and reports the median per-round ratio, so drift in the device (caches,
//! thermal, background writeback) hits both sides alike.

mod engine_target;
mod fill;
mod idle_pool;
mod raw;
mod report;
mod workload;

use anyhow::{bail, Context, Result};
use cairn_engine::{CoreId, IdlePolicy};
use clap::{Args, Parser, Subcommand, ValueEnum};
use engine_target::{BdevKind, EngineOpts};
use report::{median, RunResult};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Duration;
use workload::{Rw, Workload};

#[derive(Parser)]
#[command(
    name = "cairn-perf",
    version,
    about = "Measure Cairn's engine against the raw disk, side by side"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one workload against one target and print its figures.
    Run {
        #[arg(long, value_enum)]
        target: Target,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// Interleave baseline and candidate runs and print the median ratios.
    Compare {
        /// [default: raw; volume with --encrypt]
        #[arg(long, value_enum)]
        baseline: Option<Target>,
        #[arg(long, value_enum, default_value = "engine")]
        candidate: Target,
        /// Baseline/candidate pairs to run.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// Start an engine with no work and measure the CPU its reactors burn while idle.
    Idle {
        /// Reactors to start (the first N CPUs this process may use).
        #[arg(long, default_value_t = 2)]
        cores: u32,
        /// Seconds to measure.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Engine idle policy (poll shows what a never-sleeping reactor costs).
        #[arg(long, value_enum, default_value = "adaptive")]
        idle: Idle,
        /// Hold what a daemon holds while measuring: a pool formatted on --file (homed on the
        /// first reactor), a volume in it, and a queue on that volume on the last reactor,
        /// after a few writes, reads and a flush through it.
        #[arg(long)]
        with_pool: bool,
        /// Pool file for --with-pool: created (256 MiB) when missing and removed afterwards;
        /// an existing file is formatted, so everything on it is lost.
        #[arg(long, default_value = "cairn-perf-idle.img")]
        file: PathBuf,
        /// Print exactly one JSON object instead of a line.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Target {
    /// Plain io_uring on the file: O_DIRECT, registered file, fixed buffers.
    Raw,
    /// The engine's reactors and a bdev (see --bdev).
    Engine,
    /// A thin volume on a pool formatted on --file, preallocated with data unless --fresh.
    Volume,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Idle {
    /// Spin only while work is expected within --spin-us (default 5), else sleep in the kernel
    /// and wake in time (the engine's default).
    Adaptive,
    /// Spin for --spin-us (default 50) after the last work, then sleep in the kernel.
    Sleep,
    /// Never sleep.
    Poll,
}

#[derive(Args, Clone)]
struct LoadArgs {
    /// File (or block device) to drive; created and filled with random data when missing.
    #[arg(long, default_value = "cairn-perf.img")]
    file: PathBuf,
    /// Bytes to use, e.g. 4G, 512M, 1048576.
    #[arg(long, default_value = "4G", value_parser = cairn_engine::units::parse_size)]
    size: u64,
    #[arg(long, value_enum, default_value = "randread")]
    rw: Rw,
    /// Read percentage for --rw randrw.
    #[arg(long, default_value_t = 70)]
    mix: u32,
    /// Block size of every I/O, e.g. 4096 or 4k.
    #[arg(long, default_value = "4096", value_parser = cairn_engine::units::parse_size)]
    bs: u64,
    /// I/Os in flight per core.
    #[arg(long, default_value_t = 32)]
    qd: u32,
    /// Cores (one job each); the first N CPUs this process may use.
    #[arg(long, default_value_t = 1)]
    cores: u32,
    /// Seconds per run.
    #[arg(long, default_value_t = 10.0)]
    runtime: f64,
    /// Device behind the engine target.
    #[arg(long, value_enum, default_value = "uring")]
    bdev: BdevKind,
    /// Engine idle policy.
    #[arg(long, value_enum, default_value = "adaptive")]
    idle: Idle,
    /// Engine spin budget in µs: with --idle adaptive the most it spins for work it expects
    /// (default 5), with --idle sleep how long it spins after the last work (default 50).
    #[arg(long)]
    spin_us: Option<u64>,
    /// Engine uring bdev: busy-poll completions (block devices with poll queues only).
    #[arg(long)]
    iopoll: bool,
    /// Engine uring bdev: kernel submission-polling thread.
    #[arg(long)]
    sqpoll: bool,
    /// CPU for the --sqpoll kernel thread (best a core no reactor uses).
    #[arg(long)]
    sqpoll_cpu: Option<u32>,
    /// How the raw target waits for completions: block in the kernel (like fio) or spin
    /// (like a polled engine, to isolate the engine's own cost).
    #[arg(long, value_enum, default_value = "block")]
    raw_wait: raw::RawWait,
    /// Volume target: skip preallocation, so writes include first-write allocation.
    #[arg(long)]
    fresh: bool,
    /// Volume target: serve the volume through the crypt layer (AES-256-XTS, a random key),
    /// as an encrypted export does. With `compare`, the candidate only: the baseline stays
    /// plain, so the ratio is encryption's cost.
    #[arg(long)]
    encrypt: bool,
    /// Print exactly one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

impl LoadArgs {
    fn workload(&self) -> Result<Workload> {
        let w = Workload {
            file: Some(self.file.clone()),
            size_bytes: self.size,
            rw: self.rw,
            mix_read_pct: self.mix,
            bs_bytes: u32::try_from(self.bs).context("--bs is too large")?,
            qd: self.qd,
            cores: self.cores,
            runtime: Duration::try_from_secs_f64(self.runtime)
                .ok()
                .filter(|d| !d.is_zero())
                .context("--runtime must be a positive number of seconds")?,
        };
        w.check()?;
        Ok(w)
    }

    fn engine_opts(&self) -> EngineOpts {
        EngineOpts {
            bdev: self.bdev,
            idle: idle_policy(self.idle, self.spin_us),
            iopoll: self.iopoll,
            sqpoll: self.sqpoll,
            sqpoll_cpu: self.sqpoll_cpu,
        }
    }

    fn needs_file(&self, targets: &[Target]) -> bool {
        targets
            .iter()
            .any(|t| *t != Target::Engine || self.bdev == BdevKind::Uring)
    }
}

/// The engine policy for `--idle` and `--spin-us`.
fn idle_policy(idle: Idle, spin_us: Option<u64>) -> IdlePolicy {
    let spin = |default: Duration| spin_us.map_or(default, Duration::from_micros);
    match idle {
        Idle::Adaptive => IdlePolicy::Adaptive {
            spin: spin(cairn_engine::reactor::ADAPTIVE_SPIN_DEFAULT),
        },
        Idle::Sleep => IdlePolicy::Sleep {
            spin: spin(cairn_engine::reactor::SPIN_DEFAULT),
        },
        Idle::Poll => IdlePolicy::Poll,
    }
}

/// Buffer size for a block size: DMA buffers are whole 4 KiB pages.
pub(crate) fn buf_size(bs_bytes: u32) -> u32 {
    bs_bytes.next_multiple_of(4096)
}

/// Pins the calling thread to `core`.
pub(crate) fn pin(core: CoreId) -> Result<()> {
    cairn_engine::sys::pin_current_thread(core.get())
        .with_context(|| format!("pinning to core {core}"))
}

fn pick_cores(n: u32) -> Result<Vec<CoreId>> {
    let allowed = cairn_engine::sys::allowed_cpus();
    if allowed.len() < n as usize {
        bail!(
            "--cores {n} asked for, but this process may use only {} CPUs",
            allowed.len()
        );
    }
    allowed[..n as usize]
        .iter()
        .map(|&c| CoreId::new(c).map_err(Into::into))
        .collect()
}

fn run_target(
    target: Target,
    load: &LoadArgs,
    w: &Workload,
    cores: &[CoreId],
    encrypt: bool,
) -> Result<RunResult> {
    match target {
        Target::Raw => raw::run(w, cores, load.raw_wait),
        Target::Engine => engine_target::run(w, cores, load.engine_opts()),
        Target::Volume => {
            engine_target::run_volume(w, cores, load.engine_opts(), load.fresh, encrypt)
        }
    }
}

#[derive(Serialize)]
struct CompareOut<'a> {
    workload: &'a Workload,
    baseline_target: &'a str,
    candidate_target: &'a str,
    ratio_iops: f64,
    ratio_p99: f64,
    /// Candidate IOPS per CPU-second over the baseline's (median of the rounds' ratios).
    ratio_cpu_efficiency: f64,
    baseline: Vec<RunResult>,
    candidate: Vec<RunResult>,
}

fn compare(
    baseline: Option<Target>,
    candidate: Target,
    rounds: u32,
    load: &LoadArgs,
) -> Result<()> {
    if rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    if load.encrypt && candidate != Target::Volume {
        bail!("--encrypt needs --candidate volume");
    }
    let baseline = baseline.unwrap_or(if load.encrypt {
        Target::Volume
    } else {
        Target::Raw
    });
    let w = load.workload()?;
    let cores = pick_cores(w.cores)?;
    if load.needs_file(&[baseline, candidate]) {
        fill::ensure_file(&load.file, w.size_bytes)?;
    }
    let (mut base, mut cand) = (Vec::new(), Vec::new());
    if !load.json {
        println!("round {}", report::TABLE_HEADER);
    }
    for round in 1..=rounds {
        let sides = [
            (baseline, false, &mut base),
            (candidate, load.encrypt, &mut cand),
        ];
        for (target, encrypt, out) in sides {
            let mut r = run_target(target, load, &w, &cores, encrypt)?;
            r.target = format!("{target:?}").to_lowercase() + if encrypt { "+xts" } else { "" };
            if !load.json {
                println!("{round:>5} {}", report::table_row(&r));
            }
            out.push(r);
        }
    }
    let ratio = |f: fn(&RunResult) -> f64| {
        median(base.iter().zip(&cand).map(|(b, c)| f(c) / f(b)).collect())
    };
    let ratio_iops = ratio(|r| r.iops);
    let ratio_p99 = ratio(|r| r.lat_us.p99);
    let ratio_cpu_efficiency = ratio(|r| r.iops / r.cpu_s.max(f64::MIN_POSITIVE));
    if load.json {
        let out = CompareOut {
            workload: &w,
            baseline_target: &format!("{baseline:?}").to_lowercase(),
            candidate_target: &format!("{candidate:?}").to_lowercase(),
            ratio_iops,
            ratio_p99,
            ratio_cpu_efficiency,
            baseline: base,
            candidate: cand,
        };
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!(
            "median ratio {candidate:?}/{baseline:?}: iops {ratio_iops:.3}  p99 {ratio_p99:.3}  \
             iops per cpu-s {ratio_cpu_efficiency:.3}"
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    tracing_init();
    match Cli::parse().cmd {
        Cmd::Run { target, load } => {
            let w = load.workload()?;
            let cores = pick_cores(w.cores)?;
            if load.needs_file(&[target]) {
                fill::ensure_file(&load.file, w.size_bytes)?;
            }
            if load.encrypt && target != Target::Volume {
                bail!("--encrypt needs --target volume");
            }
            let r = run_target(target, &load, &w, &cores, load.encrypt)?;
            if load.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("{}", report::TABLE_HEADER);
                println!("{}", report::table_row(&r));
            }
            Ok(())
        }
        Cmd::Compare {
            baseline,
            candidate,
            rounds,
            load,
        } => compare(baseline, candidate, rounds, &load),
        Cmd::Idle {
            cores,
            seconds,
            idle,
            with_pool,
            file,
            json,
        } => idle_cpu(
            cores,
            seconds,
            idle,
            with_pool.then_some(file.as_path()),
            json,
        ),
    }
}

/// Time an idle engine gets to settle before measuring.
const IDLE_SETTLE: Duration = Duration::from_millis(500);

/// Measures the process's CPU over `seconds` with an idle engine, holding an open pool on
/// `pool_file` when one is given.
fn idle_cpu(
    cores: u32,
    seconds: f64,
    idle: Idle,
    pool_file: Option<&std::path::Path>,
    json: bool,
) -> Result<()> {
    let window = Duration::try_from_secs_f64(seconds)
        .ok()
        .filter(|d| !d.is_zero())
        .context("--seconds must be a positive number")?;
    let list = pick_cores(cores)?;
    let text: Vec<String> = list.iter().map(|c| c.to_string()).collect();
    let mut config =
        cairn_engine::EngineConfig::new(cairn_engine::CoreList::parse(&text.join(","))?);
    config.idle = idle_policy(idle, None);
    let engine = cairn_engine::Engine::start(config)?;
    let pool = match pool_file {
        Some(path) => Some(idle_pool::IdlePool::open(&engine, path, &list)?),
        None => None,
    };
    std::thread::sleep(IDLE_SETTLE);
    let cpu0 = report::cpu_time();
    std::thread::sleep(window);
    let cpu_s = (report::cpu_time() - cpu0).as_secs_f64();
    if let Some(pool) = pool {
        pool.close(&engine)?;
    }
    engine.stop();
    let pct = 100.0 * cpu_s / window.as_secs_f64();
    if json {
        let out = serde_json::json!({"reactors": cores, "with_pool": pool_file.is_some(), "seconds": window.as_secs_f64(), "cpu_s": cpu_s, "pct_of_one_core": pct});
        println!("{out}");
    } else {
        let holding = match pool_file {
            Some(path) => format!(
                " (holding a pool on {}, a volume and a queue)",
                path.display()
            ),
            None => String::new(),
        };
        println!(
            "{cores} idle reactors{holding} used {cpu_s:.6} CPU-s over {seconds} s: {pct:.5}% of one core"
        );
    }
    Ok(())
}

fn tracing_init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
