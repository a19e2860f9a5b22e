//! A local process launcher with torchrun's environment.
//!
//! Starts W copies of a command on this host, each with `RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR` and
//! `MASTER_PORT` set, so that [`crate::bootstrap::Bootstrap::from_env`]
//! joins them into one world. Their output is forwarded line by line with a
//! `[rank r]` prefix (and can be captured for tests). If one rank fails,
//! the others are killed and the launch fails naming it, so a crashed rank
//! never leaves the rest waiting; the whole launch has a deadline too.
//! `comet launch` is a thin wrapper around [`launch`].

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use thiserror::Error;

/// The most ranks one launch starts: each is a process with two threads
/// here forwarding its output, so a mistyped `-n` is refused up front
/// instead of exhausting the machine's processes or threads.
pub const MAX_WORLD: usize = 1024;

/// What to do when one rank exits with a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// Kill every other rank at once and fail (the default).
    KillAll,
    /// Let the others run to their own end (failure tests check how they end).
    Wait,
}

#[derive(Debug, Clone)]
pub struct LaunchConfig {
    pub world: usize,
    pub master_addr: String,
    /// 0: pick a free port.
    pub master_port: u16,
    pub program: OsString,
    pub args: Vec<OsString>,
    /// Extra environment for every rank.
    pub env: Vec<(OsString, OsString)>,
    /// None: no deadline.
    pub timeout: Option<Duration>,
    pub on_failure: OnFailure,
    /// Write each rank's output, prefixed, to this process's stdout/stderr.
    pub forward: bool,
    /// Keep each rank's output lines in the report.
    pub capture: bool,
}

impl LaunchConfig {
    pub fn new(world: usize, program: impl Into<OsString>) -> Self {
        LaunchConfig {
            world,
            master_addr: "127.0.0.1".into(),
            master_port: 0,
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            timeout: None,
            on_failure: OnFailure::KillAll,
            forward: true,
            capture: false,
        }
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, k: impl Into<OsString>, v: impl Into<OsString>) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }
}

/// How one rank ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankOutcome {
    pub rank: usize,
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// Terminating signal, if it was killed (unix).
    pub signal: Option<i32>,
    /// Killed by the launcher (after another rank failed, or the deadline).
    pub killed_by_launcher: bool,
    /// Captured output lines (stdout and stderr interleaved), if asked for.
    pub output: Vec<String>,
}

impl RankOutcome {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    pub fn describe(&self) -> String {
        match (self.code, self.signal) {
            (Some(c), _) => format!("exit code {c}"),
            (None, Some(s)) => format!("killed by signal {s}"),
            (None, None) => "unknown end".into(),
        }
    }

    /// All captured output as one string.
    pub fn text(&self) -> String {
        self.output.join("\n")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchReport {
    pub master_port: u16,
    pub ranks: Vec<RankOutcome>,
}

#[derive(Debug, Error)]
pub enum LaunchError {
    #[error("launch: {0}")]
    Config(String),
    #[error("launch: cannot start rank {rank} ({program}): {detail}")]
    Spawn {
        rank: usize,
        program: String,
        detail: String,
    },
    #[error("launch: rank {rank} failed ({status}){}", stopped_note(.stopped))]
    RankFailed {
        rank: usize,
        status: String,
        /// The ranks the launcher killed because of it (those still running).
        stopped: Vec<usize>,
        report: LaunchReport,
    },
    #[error("launch: ranks {failed:?} failed")]
    Failed {
        failed: Vec<usize>,
        report: LaunchReport,
    },
    #[error("launch: ranks {running:?} still running after {waited:?}; all killed")]
    Timeout {
        running: Vec<usize>,
        waited: Duration,
        report: LaunchReport,
    },
}

fn stopped_note(stopped: &[usize]) -> String {
    match stopped {
        [] => String::new(),
        [r] => format!("; rank {r} was stopped"),
        rs => format!("; ranks {rs:?} were stopped"),
    }
}

impl LaunchError {
    /// The per-rank outcomes, where the launch got that far.
    pub fn report(&self) -> Option<&LaunchReport> {
        match self {
            LaunchError::RankFailed { report, .. }
            | LaunchError::Failed { report, .. }
            | LaunchError::Timeout { report, .. } => Some(report),
            _ => None,
        }
    }
}

/// A free TCP port on `addr` (bound and released: another process could
/// take it in between, which the bootstrap then reports as port taken).
pub fn free_port(addr: &str) -> std::io::Result<u16> {
    Ok(TcpListener::bind((addr, 0))?.local_addr()?.port())
}

struct Running {
    child: Child,
    status: Option<ExitStatus>,
    killed: bool,
    pumps: Vec<JoinHandle<()>>,
    lines: Arc<Mutex<Vec<String>>>,
}

fn pump(
    rank: usize,
    src: impl Read + Send + 'static,
    to_stderr: bool,
    forward: bool,
    capture: Option<Arc<Mutex<Vec<String>>>>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("comet-launch-out-{rank}"))
        .spawn(move || {
            let mut r = BufReader::new(src);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let line = String::from_utf8_lossy(&buf);
                let line = line.trim_end_matches(['\n', '\r']);
                if forward {
                    // Whole lines under the lock, so ranks never interleave mid-line.
                    let _ = if to_stderr {
                        writeln!(std::io::stderr().lock(), "[rank {rank}] {line}")
                    } else {
                        writeln!(std::io::stdout().lock(), "[rank {rank}] {line}")
                    };
                }
                if let Some(c) = &capture {
                    c.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(line.to_string());
                }
            }
        })
}

fn outcome(rank: usize, r: Running) -> RankOutcome {
    #[cfg(unix)]
    let signal = {
        use std::os::unix::process::ExitStatusExt;
        r.status.and_then(|s| s.signal())
    };
    #[cfg(not(unix))]
    let signal = None;
    // The pipes close when the rank exits, unless a process it started
    // still holds them: read what remains, but do not wait on such orphans.
    let deadline = Instant::now() + Duration::from_secs(2);
    for p in r.pumps {
        while !p.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        if p.is_finished() {
            let _ = p.join();
        }
    }
    let output = std::mem::take(&mut *r.lines.lock().unwrap_or_else(|e| e.into_inner()));
    RankOutcome {
        rank,
        code: r.status.and_then(|s| s.code()),
        signal,
        killed_by_launcher: r.killed,
        output,
    }
}

/// The report of every rank, each exited or stopped already.
fn collect_report(master_port: u16, ranks: Vec<Running>) -> LaunchReport {
    LaunchReport {
        master_port,
        ranks: ranks
            .into_iter()
            .enumerate()
            .map(|(i, r)| outcome(i, r))
            .collect(),
    }
}

fn kill_all(ranks: &mut [Running]) {
    for r in ranks.iter_mut().filter(|r| r.status.is_none()) {
        let _ = r.child.kill();
        r.killed = true;
    }
    for r in ranks.iter_mut().filter(|r| r.status.is_none()) {
        r.status = r.child.wait().ok();
    }
}

/// Runs `cfg.world` ranks of the command to completion.
pub fn launch(cfg: &LaunchConfig) -> Result<LaunchReport, LaunchError> {
    if cfg.world == 0 {
        return Err(LaunchError::Config("world size must be at least 1".into()));
    }
    if cfg.world > MAX_WORLD {
        return Err(LaunchError::Config(format!(
            "world size {} is above the launcher's limit of {MAX_WORLD} local ranks",
            cfg.world
        )));
    }
    let port = if cfg.master_port == 0 {
        free_port(&cfg.master_addr)
            .map_err(|e| LaunchError::Config(format!("no free port on {}: {e}", cfg.master_addr)))?
    } else {
        cfg.master_port
    };
    let start = Instant::now();
    let mut ranks: Vec<Running> = Vec::with_capacity(cfg.world);
    for rank in 0..cfg.world {
        match spawn_rank(cfg, rank, port) {
            Ok(r) => ranks.push(r),
            Err(e) => {
                kill_all(&mut ranks);
                return Err(e);
            }
        }
    }
    supervise(cfg, port, start, ranks)
}

/// Rank `rank` started with torchrun's environment, its output pumped.
fn spawn_rank(cfg: &LaunchConfig, rank: usize, port: u16) -> Result<Running, LaunchError> {
    let mut cmd = Command::new(&cfg.program);
    cmd.args(&cfg.args)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", cfg.world.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("LOCAL_WORLD_SIZE", cfg.world.to_string())
        .env("GROUP_RANK", "0")
        .env("MASTER_ADDR", &cfg.master_addr)
        .env("MASTER_PORT", port.to_string())
        .envs(cfg.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let spawn_err = |detail: String| LaunchError::Spawn {
        rank,
        program: cfg.program.to_string_lossy().into_owned(),
        detail,
    };
    let mut child = cmd.spawn().map_err(|e| spawn_err(e.to_string()))?;
    let lines = Arc::new(Mutex::new(Vec::new()));
    let cap = cfg.capture.then(|| Arc::clone(&lines));
    let mut pumps = Vec::new();
    let mut started = Ok(());
    if let Some(o) = child.stdout.take() {
        started = pump(rank, o, false, cfg.forward, cap.clone()).map(|p| pumps.push(p));
    }
    if let (Ok(()), Some(e)) = (&started, child.stderr.take()) {
        started = pump(rank, e, true, cfg.forward, cap).map(|p| pumps.push(p));
    }
    if let Err(e) = started {
        let _ = child.kill();
        let _ = child.wait();
        return Err(spawn_err(format!(
            "cannot start a thread for its output: {e}"
        )));
    }
    tracing::debug!(rank, pid = child.id(), "rank started");
    Ok(Running {
        child,
        status: None,
        killed: false,
        pumps,
        lines,
    })
}

/// Waits for every rank: on the first failure stops the others (with
/// `OnFailure::KillAll`), past the timeout stops them all; the report.
fn supervise(
    cfg: &LaunchConfig,
    port: u16,
    start: Instant,
    mut ranks: Vec<Running>,
) -> Result<LaunchReport, LaunchError> {
    let mut first_failure: Option<usize> = None;
    loop {
        for (rank, r) in ranks.iter_mut().enumerate() {
            if r.status.is_some() {
                continue;
            }
            if let Ok(Some(s)) = r.child.try_wait() {
                r.status = Some(s);
                if !s.success() && first_failure.is_none() {
                    tracing::warn!(rank, status = %s, "rank failed");
                    first_failure = Some(rank);
                }
            }
        }
        if let (Some(rank), OnFailure::KillAll) = (first_failure, cfg.on_failure) {
            kill_all(&mut ranks);
            let report = collect_report(port, ranks);
            let status = report.ranks[rank].describe();
            let stopped = report
                .ranks
                .iter()
                .filter(|r| r.killed_by_launcher)
                .map(|r| r.rank)
                .collect();
            return Err(LaunchError::RankFailed {
                rank,
                status,
                stopped,
                report,
            });
        }
        let running: Vec<usize> = (0..ranks.len())
            .filter(|&i| ranks[i].status.is_none())
            .collect();
        if running.is_empty() {
            break;
        }
        if let Some(t) = cfg.timeout {
            let waited = start.elapsed();
            if waited >= t {
                kill_all(&mut ranks);
                let report = collect_report(port, ranks);
                return Err(LaunchError::Timeout {
                    running,
                    waited,
                    report,
                });
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let report = collect_report(port, ranks);
    let failed: Vec<usize> = report
        .ranks
        .iter()
        .filter(|r| !r.success())
        .map(|r| r.rank)
        .collect();
    if !failed.is_empty() {
        return Err(LaunchError::Failed { failed, report });
    }
    Ok(report)
}
