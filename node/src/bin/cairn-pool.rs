//! cairn-pool: create, inspect and check a pool file or device without a daemon.
//!
//! `check` is the offline fsck: it reads the superblock and both metadata checkpoints with
//! plain reads and verifies every invariant of the newest valid one, exiting 1 on any problem.
//! The other commands start a one-core engine, do one operation durably, and stop.

use anyhow::{bail, Context, Result};
use cairn_engine::bdev::uring::{UringBdev, UringOptions};
use cairn_engine::volume::{self, Pool, CLUSTER_DEFAULT_BYTES};
use cairn_engine::{CoreId, CoreList, Engine, EngineConfig};
use clap::{Parser, Subcommand};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "cairn-pool",
    version,
    about = "Create, inspect and check Cairn pools offline"
)]
struct Cli {
    /// Pool file or block device.
    path: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Format PATH as an empty pool (creating a sparse file of --size if it does not exist).
    Create {
        #[arg(long, value_parser = cairn_engine::units::parse_size)]
        size: Option<u64>,
        #[arg(long, default_value_t = CLUSTER_DEFAULT_BYTES as u64, value_parser = cairn_engine::units::parse_size)]
        cluster: u64,
    },
    /// Verify the pool's metadata; exit 1 if anything is inconsistent.
    Check {
        #[arg(long)]
        json: bool,
    },
    /// List volumes and snapshots.
    Ls,
    /// Create a thin volume.
    VolumeCreate {
        name: String,
        #[arg(value_parser = cairn_engine::units::parse_size)]
        size: u64,
    },
    /// Snapshot VOLUME as NAME.
    Snapshot { volume: String, name: String },
    /// Make writable volume NAME from SNAPSHOT.
    Clone { snapshot: String, name: String },
    /// Grow a volume to SIZE.
    Grow {
        name: String,
        #[arg(value_parser = cairn_engine::units::parse_size)]
        size: u64,
    },
    /// Delete a volume or snapshot.
    Delete { name: String },
}

fn main() -> Result<()> {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Check { json } => check(&cli.path, json),
        Cmd::Create { size, cluster } => create(&cli.path, size, cluster),
        cmd => with_pool(&cli.path, |engine, pool| run(engine, pool, cmd)),
    }
}

fn check(path: &Path, json: bool) -> Result<()> {
    let r = volume::check_file(path).with_context(|| format!("checking {}", path.display()))?;
    if json {
        let v = serde_json::json!({
            "ok": r.problems.is_empty(), "seq": r.seq, "slot": r.slot, "lost_seq": r.lost_seq, "volumes": r.volumes,
            "snapshots": r.snapshots, "clusters": r.clusters, "allocated_clusters": r.allocated_clusters,
            "problems": r.problems,
        });
        println!("{v}");
    } else {
        println!(
            "{}: checkpoint seq {} (slot {}), {} volumes, {} snapshots, {}/{} clusters allocated",
            path.display(),
            r.seq,
            r.slot,
            r.volumes,
            r.snapshots,
            r.allocated_clusters,
            r.clusters
        );
        for p in &r.problems {
            println!("PROBLEM: {p}");
        }
    }
    if !r.problems.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}

fn engine() -> Result<Engine> {
    let mut config = EngineConfig::new(CoreList::parse(&first_core()?.to_string())?);
    config.buf_count = 64;
    Ok(Engine::start(config)?)
}

fn first_core() -> Result<CoreId> {
    let allowed = cairn_engine::sys::allowed_cpus();
    Ok(CoreId::new(
        *allowed
            .first()
            .context("no CPU is allowed for this process")?,
    )?)
}

fn create(path: &Path, size: Option<u64>, cluster: u64) -> Result<()> {
    if !path.exists() {
        let size = size.context("--size is needed to create a new pool file")?;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(cairn_engine::owner_only::FILE_MODE)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
        f.set_len(size)?;
    } else if size.is_some() {
        bail!(
            "{} exists; --size only applies to new files",
            path.display()
        );
    }
    let cluster = u32::try_from(cluster).context("--cluster is too large")?;
    let engine = engine()?;
    let base = open_base(path)?;
    let pool = Pool::create(&engine, "pool", base, first_core()?, cluster)?;
    let info = pool.info(&engine)?;
    println!(
        "created pool {} on {}: {} clusters of {} bytes",
        info.uuid,
        path.display(),
        info.clusters,
        info.cluster_size_bytes
    );
    pool.close(&engine)?;
    Ok(())
}

/// The pool file, locked so no other process opens it meanwhile.
fn open_base(path: &Path) -> Result<Arc<UringBdev>> {
    let options = UringOptions {
        exclusive: true,
        ..UringOptions::default()
    };
    Ok(Arc::new(UringBdev::open("pool", path, options)?))
}

fn with_pool(path: &Path, f: impl FnOnce(&Engine, &Pool) -> Result<()>) -> Result<()> {
    let engine = engine()?;
    let base = open_base(path)?;
    let pool = Pool::open(&engine, "pool", base, first_core()?)
        .with_context(|| format!("opening pool {}", path.display()))?;
    let result = f(&engine, &pool);
    pool.close(&engine)?;
    result
}

fn run(engine: &Engine, pool: &Pool, cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Ls => {
            let info = pool.info(engine)?;
            println!(
                "pool {}: {}/{} clusters free, cluster {} bytes",
                info.uuid, info.free_clusters, info.clusters, info.cluster_size_bytes
            );
            println!(
                "{:<24} {:<9} {:>14} {:>10}  origin",
                "NAME", "KIND", "SIZE", "CLUSTERS"
            );
            for o in info.objects {
                println!(
                    "{:<24} {:<9} {:>14} {:>10}  {}",
                    o.name,
                    o.kind.to_string(),
                    o.size_bytes,
                    o.allocated_clusters,
                    o.origin.unwrap_or_default()
                );
            }
        }
        Cmd::VolumeCreate { name, size } => pool.create_volume(engine, &name, size, Vec::new())?,
        Cmd::Snapshot { volume, name } => pool.snapshot(engine, &volume, &name)?,
        Cmd::Clone { snapshot, name } => pool.clone_snapshot(engine, &snapshot, &name)?,
        Cmd::Grow { name, size } => pool.grow(engine, &name, size)?,
        Cmd::Delete { name } => pool.delete(engine, &name)?,
        Cmd::Check { .. } | Cmd::Create { .. } => unreachable!("handled before opening"),
    }
    Ok(())
}
