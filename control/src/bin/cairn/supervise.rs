//! The children of `cairn up` and how they are started, watched and stopped.
//!
//! Each child runs in a process group of its own, so a Ctrl-C at the terminal reaches only
//! `cairn up`, which then stops the children in order (nodes first, then the control
//! process): SIGTERM, a bounded wait ([`STOP_TIMEOUT`]), then SIGKILL for whoever is still
//! running, named. A second Ctrl-C skips the wait. Each child also asks the kernel for SIGTERM
//! when `cairn up` dies (`PR_SET_PDEATHSIG`), so even a `kill -9` of `cairn up` leaves no
//! node holding its pool or ports.
//!
//! Signals reach the main loop through a small bounded channel fed by one thread that owns
//! tokio's signal handlers; the loop waits on that channel, so it wakes at once on a signal and
//! otherwise every [`POLL_INTERVAL`] to look at the children.
//!
//! Every wait here is bounded, and every child is reaped by this module only (its pid is
//! signalled only while it is unreaped, so the pid cannot name another process).

use anyhow::{Context, Result};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::{Duration, Instant};

/// How often the main loop looks at the children while nothing else wakes it.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How long a group of children (the nodes, then the control process) gets to stop after
/// SIGTERM before SIGKILL. A node closes its pools durably on SIGTERM, which takes well under
/// a second when idle.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Signals waiting for the main loop; more are dropped (the loop acts on the first, and a
/// second one during the stop skips the wait).
const SIGNALS_QUEUED_MAX: usize = 4;
/// Lines of a child's log printed when it dies or does not come up.
const LOG_TAIL_LINES: usize = 20;
/// The most of a log's end read to find those lines.
const LOG_TAIL_BYTES_MAX: u64 = 16 * 1024;

/// SIGTERM and SIGINT, as they arrive.
pub struct Signals {
    rx: Receiver<&'static str>,
}

impl Signals {
    /// Installs the handlers (from here on SIGTERM and SIGINT no longer kill this process).
    pub fn install() -> Result<Signals> {
        let (tx, rx) = std::sync::mpsc::sync_channel(SIGNALS_QUEUED_MAX);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("cairn-signals".into())
            .spawn(move || watch_signals(&tx, &ready_tx))
            .context("starting the signal thread")?;
        ready_rx
            .recv()
            .context("the signal thread stopped before it was ready")??;
        Ok(Signals { rx })
    }

    /// Waits up to `timeout` for a signal; its name, or None.
    pub fn wait(&self, timeout: Duration) -> Option<&'static str> {
        // Timeout, or the signal thread is gone (it never returns while the channel is open).
        self.rx.recv_timeout(timeout).ok()
    }
}

fn watch_signals(tx: &SyncSender<&'static str>, ready: &std::sync::mpsc::Sender<Result<()>>) {
    use tokio::signal::unix::{signal, SignalKind};
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            drop(ready.send(Err(
                anyhow::Error::new(e).context("starting the signal runtime"),
            )));
            return;
        }
    };
    runtime.block_on(async {
        let (mut term, mut int) = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(term), Ok(int)) => (term, int),
            (Err(e), _) | (_, Err(e)) => {
                drop(ready.send(Err(
                    anyhow::Error::new(e).context("installing the SIGTERM and SIGINT handlers"),
                )));
                return;
            }
        };
        drop(ready.send(Ok(())));
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            match tx.try_send(name) {
                Ok(()) | Err(TrySendError::Full(_)) => {}
                Err(TrySendError::Disconnected(_)) => return,
            }
        }
    });
}

/// One running child.
pub struct Proc {
    /// `control` or `node-I`.
    pub name: String,
    pub log: PathBuf,
    child: Child,
    /// Set once the child has been reaped.
    status: Option<ExitStatus>,
}

impl Proc {
    /// Starts `program ARGS` as `name`, with stdin from /dev/null and stdout and stderr into
    /// `log` (truncated: each run's log is that run's).
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[std::ffi::OsString],
        log: &Path,
    ) -> Result<Proc> {
        let out = File::create(log).with_context(|| format!("creating log {}", log.display()))?;
        let err = out
            .try_clone()
            .with_context(|| format!("opening log {}", log.display()))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let die_with_parent = || {
            // SAFETY: prctl(2) with two integer arguments reads and writes no memory of ours,
            // and is async-signal-safe, as code between fork and exec must be.
            if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) } == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        };
        // SAFETY: the hook runs in the child between fork and exec, where only
        // async-signal-safe work is allowed: it makes one prctl call and, on failure, reads
        // errno; it allocates nothing and takes no lock.
        unsafe { cmd.pre_exec(die_with_parent) };
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({})", program.display()))?;
        Ok(Proc {
            name: name.to_string(),
            log: log.to_path_buf(),
            child,
            status: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the child has exited (reaping it), else None.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    fn terminate(&mut self) {
        if self.exited().is_none() {
            let pid = libc::pid_t::try_from(self.pid()).expect("a pid fits pid_t");
            // SAFETY: kill(2) reads no memory of ours; the child is not reaped yet (exited()
            // just said so, and only this module reaps it), so its pid still names it.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }

    fn kill(&mut self) {
        if self.exited().is_none() {
            drop(self.child.kill());
            self.status = self.child.wait().ok();
        }
    }

    /// The last lines of the child's log, indented for printing.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Only reached on a path that did not stop the child (a panic): never leave it running.
        self.kill();
    }
}

/// How a stop went.
#[derive(Default)]
pub struct StopReport {
    /// Children that needed SIGKILL.
    pub killed: Vec<String>,
    /// Children that stopped after SIGTERM with a failure status, with it.
    pub failed: Vec<(String, ExitStatus)>,
}

impl StopReport {
    pub fn clean(&self) -> bool {
        self.killed.is_empty() && self.failed.is_empty()
    }
}

/// Stops `group` (already exited children are left as they are): SIGTERM to each, then waits
/// up to [`STOP_TIMEOUT`], or until a second signal, and SIGKILLs the rest.
pub fn stop(group: &mut [Proc], signals: &Signals, report: &mut StopReport) {
    let running: Vec<usize> = (0..group.len())
        .filter(|&i| group[i].exited().is_none())
        .collect();
    for &i in &running {
        group[i].terminate();
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    let mut hurry = false;
    while !hurry
        && Instant::now() < deadline
        && running.iter().any(|&i| group[i].exited().is_none())
    {
        if let Some(name) = signals.wait(POLL_INTERVAL) {
            println!("cairn up: {name} while stopping: killing what is still running");
            hurry = true;
        }
    }
    for &i in &running {
        let p = &mut group[i];
        match p.exited() {
            Some(status) if !status.success() => report.failed.push((p.name.clone(), status)),
            Some(_) => {}
            None => {
                let within = if hurry {
                    "before the second signal".to_string()
                } else {
                    format!("within {STOP_TIMEOUT:?}")
                };
                eprintln!(
                    "cairn up: {} (pid {}) did not stop on SIGTERM {within}; killing it",
                    p.name,
                    p.pid(),
                );
                p.kill();
                report.killed.push(p.name.clone());
            }
        }
    }
}

/// The last [`LOG_TAIL_LINES`] lines of `log`, each indented, or a note that it is unreadable.
pub fn log_tail(log: &Path) -> String {
    let read = || -> std::io::Result<String> {
        let mut f = File::open(log)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES_MAX)))?;
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
            if tail.is_empty() {
                "    (the log is empty)".into()
            } else {
                tail.iter()
                    .map(|l| format!("    {l}\n"))
                    .collect::<String>()
            }
        }
        Err(e) => format!("    (cannot read {}: {e})", log.display()),
    }
}
