//! Creates the benchmark file when it is missing: sized, and filled with random data so that
//! reads hit allocated blocks (a sparse file would let the filesystem answer reads with zeros
//! without touching the disk). Progress goes to stderr.

use anyhow::{bail, Context, Result};
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Instant;

/// Bytes written per call while filling.
const FILL_CHUNK_BYTES: usize = 4 << 20;

pub fn ensure_file(path: &Path, size_bytes: u64) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.len() >= size_bytes => return Ok(()),
        Ok(meta) if meta.file_type().is_file() => bail!(
            "{} is {} bytes, smaller than --size {}; remove it or lower --size",
            path.display(),
            meta.len(),
            size_bytes
        ),
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("inspecting {}", path.display())),
    }
    fill(path, size_bytes).inspect_err(|_| drop(std::fs::remove_file(path)))
}

fn fill(path: &Path, size_bytes: u64) -> Result<()> {
    let mut file =
        std::fs::File::create_new(path).with_context(|| format!("creating {}", path.display()))?;
    let mut chunk = vec![0u8; FILL_CHUNK_BYTES];
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let started = Instant::now();
    let mut written = 0u64;
    let mut last_report = Instant::now();
    while written < size_bytes {
        for word in chunk.chunks_exact_mut(8) {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            word.copy_from_slice(&rng.to_le_bytes());
        }
        let n = (size_bytes - written).min(chunk.len() as u64) as usize;
        file.write_all(&chunk[..n])
            .with_context(|| format!("writing {} at {written}", path.display()))?;
        written += n as u64;
        // A live bar on a terminal; one line per tenth otherwise, so logs stay readable.
        let tty = std::io::stderr().is_terminal();
        let tenth = (size_bytes / 10).max(1);
        let due = if tty {
            last_report.elapsed().as_millis() >= 250
        } else {
            (written - n as u64) / tenth != written / tenth
        };
        if due || written == size_bytes {
            progress(path, written, size_bytes, started, tty);
            last_report = Instant::now();
        }
    }
    file.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    eprintln!();
    Ok(())
}

fn progress(path: &Path, done: u64, total: u64, started: Instant, tty: bool) {
    const WIDTH: u64 = 30;
    let filled = done * WIDTH / total.max(1);
    let bar: String = (0..WIDTH)
        .map(|i| if i < filled { '#' } else { '.' })
        .collect();
    let mib = |b: u64| b >> 20;
    let rate = mib(done) as f64 / started.elapsed().as_secs_f64().max(1e-3);
    let (lead, tail) = if tty { ("\r", "") } else { ("", "\n") };
    eprint!(
        "{lead}filling {} [{bar}] {}/{} MiB {:.0} MiB/s{tail}",
        path.display(),
        mib(done),
        mib(total),
        rate
    );
}
