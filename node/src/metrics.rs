//! Prometheus metrics: [`render`] turns export statistics and reactor times into the text
//! exposition format, and [`serve`] answers `GET /metrics` on a minimal HTTP/1.1 responder
//! (404 for other paths, 405 for other methods; one request per connection).
//!
//! Families, per export (label `volume` is the export name):
//! `cairn_volume_ops_total{volume,op}`, `cairn_volume_bytes_total{volume,dir}`,
//! `cairn_volume_errors_total{volume}`, `cairn_volume_latency_seconds` (histogram) and
//! `cairn_volume_connections{volume}`; per reactor: `cairn_reactor_busy_seconds_total{core}`
//! and `cairn_reactor_idle_seconds_total{core}`; per nexus: `cairn_nexus_epoch{nexus}`,
//! `cairn_nexus_fenced{nexus}`, `cairn_nexus_replicas{nexus,state}`, and per replica
//! `cairn_nexus_replica_dirty_bytes{nexus,replica}`,
//! `cairn_nexus_replica_copied_bytes{nexus,replica}` (its running or last job), and while
//! a resync or rebuild runs, `cairn_nexus_resync_done_bytes`, `_total_bytes`,
//! `_progress_ratio`, `_bytes_per_second` and `_eta_seconds{nexus,replica}`.
//!
//! Scrapes read relaxed counters and the NBD server's export table; they never send a
//! message to a reactor, so a scrape cannot slow the data path.

use crate::state::Node;
use cairn_engine::frontend::nbd::{ExportStatus, LATENCY_BUCKETS_US};
use cairn_engine::ReactorTimes;
use cairn_replication::nexus::manager::{NexusView, ResyncView};
use cairn_replication::nexus::ChildState;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Largest request head read; a longer one is answered 431 and closed.
pub const REQUEST_HEAD_MAX_BYTES: usize = 8 << 10;
/// How long a client may take to send its request before it is dropped.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Scrapes answered at once; a connection beyond this waits in the accept backlog.
pub const SCRAPES_MAX: usize = 16;

/// The exposition text for these exports, reactors and nexuses.
pub fn render(
    exports: &[ExportStatus],
    reactors: &[ReactorTimes],
    nexuses: &[NexusView],
) -> String {
    let mut out = String::new();
    render_exports(&mut out, exports);
    render_reactors(&mut out, reactors);
    render_nexuses(&mut out, nexuses);
    out
}

fn render_nexuses(out: &mut String, nexuses: &[NexusView]) {
    header(
        out,
        "cairn_nexus_epoch",
        "gauge",
        "The epoch each nexus holds its replicas under.",
    );
    for n in nexuses {
        let _ = writeln!(
            out,
            "cairn_nexus_epoch{{nexus=\"{}\"}} {}",
            escape(&n.name),
            n.epoch
        );
    }
    header(
        out,
        "cairn_nexus_fenced",
        "gauge",
        "1 when a newer nexus owns the volume and this one's writes fail.",
    );
    for n in nexuses {
        let fenced = u8::from(n.state == "fenced");
        let _ = writeln!(
            out,
            "cairn_nexus_fenced{{nexus=\"{}\"}} {fenced}",
            escape(&n.name)
        );
    }
    header(
        out,
        "cairn_nexus_replicas",
        "gauge",
        "Replicas of each nexus, by state.",
    );
    for n in nexuses {
        for state in [ChildState::InSync, ChildState::Faulted, ChildState::Syncing] {
            let count = n.children.iter().filter(|c| c.state == state).count();
            let _ = writeln!(
                out,
                "cairn_nexus_replicas{{nexus=\"{}\",state=\"{}\"}} {count}",
                escape(&n.name),
                state.name()
            );
        }
    }
    let per_replica =
        |out: &mut String,
         name: &str,
         kind: &str,
         help: &str,
         f: &dyn Fn(&cairn_replication::nexus::manager::ChildView) -> u64| {
            header(out, name, kind, help);
            for n in nexuses {
                for c in &n.children {
                    let _ = writeln!(
                        out,
                        "{name}{{nexus=\"{}\",replica=\"{}\"}} {}",
                        escape(&n.name),
                        escape(&c.spec),
                        f(c)
                    );
                }
            }
        };
    per_replica(
        out,
        "cairn_nexus_replica_dirty_bytes",
        "gauge",
        "Bytes of regions a replica missed and still needs copied.",
        &|c| c.dirty_bytes,
    );
    per_replica(
        out,
        "cairn_nexus_replica_copied_bytes",
        "gauge",
        "Bytes copied to a replica by its running or last resync or rebuild (0 when one starts).",
        &|c| c.copied_bytes,
    );
    header(
        out,
        "cairn_nexus_resync_write_wait_max_seconds",
        "gauge",
        "Longest a client write waited on a copy of a replica's running or last resync or rebuild (0 when one starts).",
    );
    for n in nexuses {
        for c in &n.children {
            let _ = writeln!(
                out,
                "cairn_nexus_resync_write_wait_max_seconds{{nexus=\"{}\",replica=\"{}\"}} {}",
                escape(&n.name),
                escape(&c.spec),
                c.write_wait_max_us as f64 / 1e6
            );
        }
    }
    type Field = fn(&ResyncView) -> f64;
    let families: [(&str, &str, Field); 5] = [
        (
            "cairn_nexus_resync_done_bytes",
            "Bytes the running resync or rebuild has copied.",
            |r| r.done_bytes as f64,
        ),
        (
            "cairn_nexus_resync_total_bytes",
            "Bytes the running resync or rebuild has to copy (fixed when its single pass starts).",
            |r| r.total_bytes as f64,
        ),
        (
            "cairn_nexus_resync_progress_ratio",
            "Highest fraction done of the running resync or rebuild; never goes back within it.",
            |r| r.progress,
        ),
        (
            "cairn_nexus_resync_bytes_per_second",
            "Average copy rate of the running resync or rebuild.",
            |r| r.bytes_per_s,
        ),
        (
            "cairn_nexus_resync_eta_seconds",
            "Seconds the running resync or rebuild needs at its rate (0 until it has copied).",
            |r| r.eta_s,
        ),
    ];
    for (name, help, field) in families {
        header(out, name, "gauge", help);
        for n in nexuses {
            if let Some(r) = &n.resync {
                let v = field(r);
                let _ = writeln!(
                    out,
                    "{name}{{nexus=\"{}\",replica=\"{}\"}} {v}",
                    escape(&n.name),
                    escape(&r.child)
                );
            }
        }
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn render_exports(out: &mut String, exports: &[ExportStatus]) {
    header(
        out,
        "cairn_volume_ops_total",
        "counter",
        "NBD requests answered per export, by operation.",
    );
    for e in exports {
        let v = escape(&e.name);
        let s = &e.stats;
        for (op, n) in [
            ("read", s.reads),
            ("write", s.writes),
            ("flush", s.flushes),
            ("trim", s.trims),
            ("write_zeroes", s.write_zeroes),
            ("block_status", s.block_status),
        ] {
            let _ = writeln!(
                out,
                "cairn_volume_ops_total{{volume=\"{v}\",op=\"{op}\"}} {n}"
            );
        }
    }
    header(
        out,
        "cairn_volume_bytes_total",
        "counter",
        "Bytes moved per export, by direction.",
    );
    for e in exports {
        let v = escape(&e.name);
        let _ = writeln!(
            out,
            "cairn_volume_bytes_total{{volume=\"{v}\",dir=\"read\"}} {}",
            e.stats.bytes_read
        );
        let _ = writeln!(
            out,
            "cairn_volume_bytes_total{{volume=\"{v}\",dir=\"write\"}} {}",
            e.stats.bytes_written
        );
    }
    header(
        out,
        "cairn_volume_errors_total",
        "counter",
        "NBD requests answered with an error, per export.",
    );
    for e in exports {
        let v = escape(&e.name);
        let _ = writeln!(
            out,
            "cairn_volume_errors_total{{volume=\"{v}\"}} {}",
            e.stats.errors
        );
    }
    render_latency(out, exports);
    header(
        out,
        "cairn_volume_connections",
        "gauge",
        "Open NBD connections per export.",
    );
    for e in exports {
        let v = escape(&e.name);
        let _ = writeln!(
            out,
            "cairn_volume_connections{{volume=\"{v}\"}} {}",
            e.connections
        );
    }
}

fn render_latency(out: &mut String, exports: &[ExportStatus]) {
    header(
        out,
        "cairn_volume_latency_seconds",
        "histogram",
        "NBD request latency per export, from receipt to reply.",
    );
    for e in exports {
        let v = escape(&e.name);
        let mut cumulative = 0u64;
        for (bound_us, n) in LATENCY_BUCKETS_US.iter().zip(e.stats.latency_buckets) {
            cumulative += n;
            let le = if *bound_us == u64::MAX {
                "+Inf".to_string()
            } else {
                seconds(*bound_us as f64 / 1e6)
            };
            let _ = writeln!(
                out,
                "cairn_volume_latency_seconds_bucket{{volume=\"{v}\",le=\"{le}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "cairn_volume_latency_seconds_sum{{volume=\"{v}\"}} {}",
            seconds(e.stats.latency_sum_us as f64 / 1e6)
        );
        let _ = writeln!(
            out,
            "cairn_volume_latency_seconds_count{{volume=\"{v}\"}} {cumulative}"
        );
    }
}

fn render_reactors(out: &mut String, reactors: &[ReactorTimes]) {
    header(
        out,
        "cairn_reactor_busy_seconds_total",
        "counter",
        "Wall time each reactor spent out of the kernel: work and spinning.",
    );
    for r in reactors {
        let _ = writeln!(
            out,
            "cairn_reactor_busy_seconds_total{{core=\"{}\"}} {}",
            r.core,
            seconds(r.busy_ns as f64 / 1e9)
        );
    }
    header(
        out,
        "cairn_reactor_idle_seconds_total",
        "counter",
        "Wall time each reactor spent waiting in the kernel (spinning counts as busy).",
    );
    for r in reactors {
        let _ = writeln!(
            out,
            "cairn_reactor_idle_seconds_total{{core=\"{}\"}} {}",
            r.core,
            seconds(r.idle_ns as f64 / 1e9)
        );
    }
}

/// Seconds as Prometheus writes floats (shortest form that round-trips).
fn seconds(s: f64) -> String {
    format!("{s}")
}

/// Escapes a label value: backslash, double quote and newline.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Answers scrapes on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    node: Arc<Node>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(SCRAPES_MAX));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => return,
            p = permits.clone().acquire_owned() => p.expect("never closed"),
        };
        let stream = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let node = node.clone();
        tokio::spawn(async move {
            if let Err(e) = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, node)).await {
                tracing::debug!(error = %e, "metrics client timed out");
            }
            drop(permit);
        });
    }
}

async fn answer(mut stream: TcpStream, node: Arc<Node>) {
    let head = match read_head(&mut stream).await {
        Some(h) => h,
        None => {
            drop(
                respond(
                    &mut stream,
                    "431 Request Header Fields Too Large",
                    "text/plain",
                    "",
                )
                .await,
            );
            return;
        }
    };
    let line = head.lines().next().unwrap_or_default();
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let r = match (method, path) {
        ("GET", "/metrics") => {
            let body = tokio::task::spawn_blocking(move || {
                render(
                    &node.export_statuses(),
                    &node.reactor_times(),
                    &node.nexus_views(),
                )
            })
            .await
            .unwrap_or_default();
            respond(&mut stream, "200 OK", "text/plain; version=0.0.4", &body).await
        }
        ("GET", _) => respond(&mut stream, "404 Not Found", "text/plain", "not found\n").await,
        _ => {
            respond(
                &mut stream,
                "405 Method Not Allowed",
                "text/plain",
                "only GET\n",
            )
            .await
        }
    };
    if let Err(e) = r {
        tracing::debug!(error = %e, "metrics reply failed");
    }
}

/// Reads up to the blank line ending the request head; None when it is too long or the
/// client went away first.
async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        if buf.len() >= REQUEST_HEAD_MAX_BYTES {
            return None;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(String::from_utf8_lossy(&buf).into_owned())
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_engine::frontend::nbd::ExportStats;
    use cairn_engine::CoreId;

    #[test]
    fn families_have_help_type_and_cumulative_buckets() {
        let mut stats = ExportStats {
            reads: 3,
            bytes_read: 12288,
            latency_sum_us: 300,
            ..ExportStats::default()
        };
        stats.latency_buckets[0] = 1;
        stats.latency_buckets[2] = 2;
        let e = ExportStatus {
            name: "pg\"1".into(),
            bdev: "pg".into(),
            size_bytes: 1 << 20,
            read_only: false,
            connections: 2,
            stats,
        };
        let r = ReactorTimes {
            core: CoreId::new(0).unwrap(),
            busy_ns: 1_500_000_000,
            idle_ns: 2_000_000_000,
        };
        let nexus = NexusView {
            name: "pg".into(),
            volume_id: String::new(),
            epoch: 4,
            size_bytes: 1 << 20,
            block_size_bytes: 4096,
            state: "degraded".into(),
            min_in_sync: 1,
            region_bytes: 1 << 20,
            io_timeout_ms: 5000,
            children: vec![cairn_replication::nexus::manager::ChildView {
                spec: "10.0.0.6:10820".into(),
                state: ChildState::Syncing,
                reason: String::new(),
                dirty_bytes: 3 << 20,
                copied_bytes: 7,
                generation: 2,
                write_wait_max_us: 1500,
            }],
            resync: Some(ResyncView {
                child: "10.0.0.6:10820".into(),
                full: true,
                done_bytes: 1 << 20,
                total_bytes: 4 << 20,
                progress: 0.25,
                bytes_per_s: 1048576.0,
                eta_s: 3.0,
                write_wait_max_us: 1500,
            }),
            generation: 3,
            rebuilt_bytes: 1 << 20,
        };
        let text = render(&[e], &[r], &[nexus]);
        for family in [
            "cairn_volume_ops_total counter",
            "cairn_volume_bytes_total counter",
            "cairn_volume_errors_total counter",
            "cairn_volume_latency_seconds histogram",
            "cairn_volume_connections gauge",
            "cairn_reactor_busy_seconds_total counter",
            "cairn_reactor_idle_seconds_total counter",
        ] {
            assert!(
                text.contains(&format!("# TYPE {family}")),
                "{family}\n{text}"
            );
        }
        assert!(text.contains("cairn_volume_ops_total{volume=\"pg\\\"1\",op=\"read\"} 3"));
        assert!(text
            .contains("cairn_volume_latency_seconds_bucket{volume=\"pg\\\"1\",le=\"0.000025\"} 1"));
        assert!(text
            .contains("cairn_volume_latency_seconds_bucket{volume=\"pg\\\"1\",le=\"0.0001\"} 3"));
        assert!(
            text.contains("cairn_volume_latency_seconds_bucket{volume=\"pg\\\"1\",le=\"+Inf\"} 3")
        );
        assert!(text.contains("cairn_volume_latency_seconds_count{volume=\"pg\\\"1\"} 3"));
        assert!(text.contains("cairn_volume_latency_seconds_sum{volume=\"pg\\\"1\"} 0.0003"));
        assert!(text.contains("cairn_reactor_busy_seconds_total{core=\"0\"} 1.5"));
        assert!(text.contains("cairn_reactor_idle_seconds_total{core=\"0\"} 2"));
        assert!(text.contains("cairn_nexus_epoch{nexus=\"pg\"} 4"));
        assert!(text.contains("cairn_nexus_replicas{nexus=\"pg\",state=\"syncing\"} 1"));
        assert!(text.contains(
            "cairn_nexus_replica_dirty_bytes{nexus=\"pg\",replica=\"10.0.0.6:10820\"} 3145728"
        ));
        for line in [
            "# TYPE cairn_nexus_replica_copied_bytes gauge",
            "cairn_nexus_replica_copied_bytes{nexus=\"pg\",replica=\"10.0.0.6:10820\"} 7",
            "cairn_nexus_resync_done_bytes{nexus=\"pg\",replica=\"10.0.0.6:10820\"} 1048576",
            "cairn_nexus_resync_total_bytes{nexus=\"pg\",replica=\"10.0.0.6:10820\"} 4194304",
            "cairn_nexus_resync_progress_ratio{nexus=\"pg\",replica=\"10.0.0.6:10820\"} 0.25",
            "cairn_nexus_resync_bytes_per_second{nexus=\"pg\",replica=\"10.0.0.6:10820\"} 1048576",
            "cairn_nexus_resync_eta_seconds{nexus=\"pg\",replica=\"10.0.0.6:10820\"} 3",
            "# TYPE cairn_nexus_resync_write_wait_max_seconds gauge",
            "cairn_nexus_resync_write_wait_max_seconds{nexus=\"pg\",replica=\"10.0.0.6:10820\"} 0.0015",
        ] {
            assert!(text.contains(line), "{line}\n{text}");
        }
    }
}
