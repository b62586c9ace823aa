//! The workload both targets run: fio's vocabulary (rw, bs, iodepth, rwmixread), a per-job
//! slice of the device, and the deterministic offset/op generator.
//!
//! Baseline and candidate draw offsets and read/write choices from the same generator with the
//! same seed per job, so the two see the same access pattern.

use anyhow::{bail, Result};
use clap::ValueEnum;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rw {
    Randread,
    Randwrite,
    Read,
    Write,
    Randrw,
}

/// One workload, as parsed from the command line and checked.
#[derive(Clone, Debug, Serialize)]
pub struct Workload {
    pub file: Option<PathBuf>,
    pub size_bytes: u64,
    pub rw: Rw,
    /// Percentage of reads in `randrw`.
    pub mix_read_pct: u32,
    pub bs_bytes: u32,
    pub qd: u32,
    pub cores: u32,
    #[serde(serialize_with = "secs")]
    pub runtime: Duration,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl Workload {
    pub fn check(&self) -> Result<()> {
        if self.bs_bytes == 0 || !self.bs_bytes.is_multiple_of(512) {
            bail!("--bs {} must be a non-zero multiple of 512", self.bs_bytes);
        }
        if self.qd == 0 || self.qd > 4096 {
            bail!("--qd {} must be between 1 and 4096", self.qd);
        }
        if self.cores == 0 {
            bail!("--cores must be at least 1");
        }
        if self.mix_read_pct > 100 {
            bail!(
                "--mix {} is a read percentage and must be 0..=100",
                self.mix_read_pct
            );
        }
        let slice = self.slice_bytes();
        if slice < u64::from(self.bs_bytes) {
            bail!(
                "--size {} split over {} cores leaves {} bytes per core, less than one --bs {} block",
                self.size_bytes, self.cores, slice, self.bs_bytes
            );
        }
        Ok(())
    }

    /// Each job drives its own equal slice of the device, like fio's offset_increment.
    pub fn slice_bytes(&self) -> u64 {
        let per = self.size_bytes / u64::from(self.cores);
        per - per % u64::from(self.bs_bytes)
    }

    pub fn generator(&self, job: u32) -> OpGen {
        let slice = self.slice_bytes();
        OpGen {
            rw: self.rw,
            mix_read_pct: self.mix_read_pct,
            bs: u64::from(self.bs_bytes),
            base: slice * u64::from(job),
            blocks: slice / u64::from(self.bs_bytes),
            next_seq: 0,
            rng: 0x9E37_79B9_7F4A_7C15 ^ (u64::from(job) + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9),
        }
    }
}

/// Produces the next (is_write, offset) pair of one job.
#[derive(Clone, Debug)]
pub struct OpGen {
    rw: Rw,
    mix_read_pct: u32,
    bs: u64,
    base: u64,
    blocks: u64,
    next_seq: u64,
    rng: u64,
}

impl OpGen {
    #[inline]
    fn next_rand(&mut self) -> u64 {
        // xorshift64*: fast, good enough to scatter offsets, and identical on both targets.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    #[inline]
    pub fn next(&mut self) -> (bool, u64) {
        let (write, block) = match self.rw {
            Rw::Randread => (false, self.next_rand() % self.blocks),
            Rw::Randwrite => (true, self.next_rand() % self.blocks),
            Rw::Randrw => {
                let r = self.next_rand();
                (
                    (r >> 32) % 100 >= u64::from(self.mix_read_pct),
                    r % self.blocks,
                )
            }
            Rw::Read | Rw::Write => {
                let b = self.next_seq;
                self.next_seq = (self.next_seq + 1) % self.blocks;
                (self.rw == Rw::Write, b)
            }
        };
        (write, self.base + block * self.bs)
    }
}

/// Fills a write buffer with data that is neither zeros nor compressible (a xorshift stream
/// from `seed`), as an application's writes are: a device or host that treats zero writes
/// specially would otherwise flatter a plain target against an encrypted one, whose
/// ciphertext never is zeros. A mixed workload's reads land in the same buffers, so its
/// writes then carry what was read.
pub fn fill_payload(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for w in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
    }
}

/// Fills each of a job's buffers with [`fill_payload`], seeded by its slot.
pub fn fill_payloads(bufs: &mut [cairn_engine::dma::DmaBuf]) {
    for (i, b) in bufs.iter_mut().enumerate() {
        fill_payload(b.as_mut_slice(), i as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_never_zero_and_differ_by_seed() {
        let (mut a, mut b) = (vec![0u8; 4096], vec![0u8; 4096]);
        fill_payload(&mut a, 0);
        fill_payload(&mut b, 1);
        assert!(a.chunks(8).all(|w| w != [0u8; 8]));
        assert!(a != b, "seeds 0 and 1 gave the same payload");
        let mut odd = vec![0u8; 13];
        fill_payload(&mut odd, 7);
        assert!(odd.iter().any(|&x| x != 0));
    }

    fn w(rw: Rw, cores: u32) -> Workload {
        Workload {
            file: None,
            size_bytes: 1 << 20,
            rw,
            mix_read_pct: 70,
            bs_bytes: 4096,
            qd: 4,
            cores,
            runtime: Duration::from_secs(1),
        }
    }

    #[test]
    fn offsets_stay_aligned_and_inside_the_job_slice() {
        for rw in [Rw::Randread, Rw::Randwrite, Rw::Read, Rw::Write, Rw::Randrw] {
            let wl = w(rw, 3);
            for job in 0..3 {
                let mut g = wl.generator(job);
                let lo = wl.slice_bytes() * u64::from(job);
                for _ in 0..10_000 {
                    let (_, off) = g.next();
                    assert_eq!(off % 4096, 0);
                    assert!(off >= lo && off + 4096 <= lo + wl.slice_bytes());
                }
            }
        }
    }

    #[test]
    fn randrw_honours_the_mix() {
        let mut g = w(Rw::Randrw, 1).generator(0);
        let reads = (0..100_000).filter(|_| !g.next().0).count();
        assert!((65_000..75_000).contains(&reads), "reads {reads}");
    }

    #[test]
    fn bad_workloads_are_refused() {
        let mut bad = w(Rw::Randread, 1);
        bad.bs_bytes = 100;
        assert!(bad.check().is_err());
        let mut bad = w(Rw::Randread, 1);
        bad.cores = 1024;
        assert!(bad.check().is_err());
        let mut bad = w(Rw::Randrw, 1);
        bad.mix_read_pct = 101;
        assert!(bad.check().is_err());
    }
}
