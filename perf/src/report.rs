//! Measured results: the latency histogram each job fills, the merged figures of one run, and
//! how they print as a table or JSON.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::time::Duration;

/// Highest latency the histogram can hold; slower I/Os are clamped to it.
pub const LATENCY_MAX_NS: u64 = 60_000_000_000;

/// Per-job latency recorder. Allocated once before the run; recording never allocates.
#[derive(Debug)]
pub struct Recorder {
    hist: Histogram<u64>,
    ios: u64,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            hist: Histogram::new_with_bounds(1, LATENCY_MAX_NS, 3)
                .expect("static bounds are valid"),
            ios: 0,
        }
    }
}

impl Recorder {
    #[inline]
    pub fn record(&mut self, latency: Duration) {
        let ns = (latency.as_nanos() as u64).clamp(1, LATENCY_MAX_NS);
        self.hist.saturating_record(ns);
        self.ios += 1;
    }

    pub fn merge(&mut self, other: &Recorder) {
        self.hist.add(&other.hist).expect("histograms share bounds");
        self.ios += other.ios;
    }
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub p9999: f64,
}

/// The figures of one run of one target.
#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    pub target: String,
    pub iops: f64,
    pub mib_s: f64,
    pub lat_us: Percentiles,
    pub cpu_s: f64,
    pub ios: u64,
    pub runtime_s: f64,
}

impl RunResult {
    pub fn new(
        target: &str,
        rec: &Recorder,
        bs_bytes: u32,
        elapsed: Duration,
        cpu_s: f64,
    ) -> RunResult {
        let secs = elapsed.as_secs_f64().max(1e-9);
        let us = |q: f64| rec.hist.value_at_quantile(q) as f64 / 1000.0;
        RunResult {
            target: target.into(),
            iops: rec.ios as f64 / secs,
            mib_s: rec.ios as f64 * f64::from(bs_bytes) / secs / f64::from(1u32 << 20),
            lat_us: Percentiles {
                p50: us(0.50),
                p99: us(0.99),
                p999: us(0.999),
                p9999: us(0.9999),
            },
            cpu_s,
            ios: rec.ios,
            runtime_s: secs,
        }
    }
}

pub const TABLE_HEADER: &str =
    "target        IOPS      MiB/s    p50 us    p99 us  p99.9 us p99.99 us   cpu s";

pub fn table_row(r: &RunResult) -> String {
    format!(
        "{:<8} {:>10.0} {:>10.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>7.2}",
        r.target,
        r.iops,
        r.mib_s,
        r.lat_us.p50,
        r.lat_us.p99,
        r.lat_us.p999,
        r.lat_us.p9999,
        r.cpu_s
    )
}

/// Process CPU time (user + system) so far.
pub fn cpu_time() -> Duration {
    cairn_engine::sys::process_cpu_time().unwrap_or_default()
}

/// Median of a non-empty list.
pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_lists() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn result_figures_follow_the_recorder() {
        let mut rec = Recorder::default();
        for _ in 0..1000 {
            rec.record(Duration::from_micros(100));
        }
        let r = RunResult::new("raw", &rec, 4096, Duration::from_secs(1), 0.5);
        assert_eq!(r.iops, 1000.0);
        assert!((r.lat_us.p99 - 100.0).abs() < 1.0);
        assert!((r.mib_s - 1000.0 * 4096.0 / 1048576.0).abs() < 1e-9);
    }
}
