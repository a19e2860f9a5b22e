//! torch._grouped_mm as the external baseline of `comet bench gemm`: a
//! python3 helper (scripts/bench_torch_gemm.py) kept running beside the
//! benchmark and asked for one timed call at a time, so torch is timed in
//! turns with our kernels and cuBLAS. Every answer is awaited with a
//! timeout; a helper that dies or hangs becomes an error, not a hang.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use comet_kernels::bench::{BenchCase, ExternalBaseline};
use comet_kernels::KernelError;
use serde_json::{json, Value};

/// Start-up and set-up of a case (allocation, first calls) may take a while.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(120);
/// One grouped GEMM of the presets runs in milliseconds.
const RUN_TIMEOUT: Duration = Duration::from_secs(30);

pub struct TorchBaseline {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    prepare_timeout: Duration,
    run_timeout: Duration,
}

fn err(what: String) -> KernelError {
    KernelError::Unsupported(format!("torch baseline: {what}"))
}

/// A helper script next to the binary (the GPU bundle) or in ./scripts.
pub fn find_script(name: &str) -> Option<std::path::PathBuf> {
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.to_path_buf()));
    [
        exe_dir.as_ref().map(|d| d.join(name)),
        exe_dir.as_ref().map(|d| d.join("scripts").join(name)),
        Some(std::path::Path::new("scripts").join(name)),
    ]
    .into_iter()
    .flatten()
    .find(|p| p.exists())
}

impl TorchBaseline {
    /// Starts the helper; Ok(None) (with the reason on stderr) where python3,
    /// torch or a GPU for it is missing.
    pub fn start(script: &Path) -> anyhow::Result<Option<TorchBaseline>> {
        Self::spawn(Command::new("python3").arg(script), PREPARE_TIMEOUT)
    }

    fn spawn(cmd: &mut Command, start_timeout: Duration) -> anyhow::Result<Option<TorchBaseline>> {
        let mut child = match cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                eprintln!("python3 not runnable ({e}); torch baseline skipped");
                return Ok(None);
            }
        };
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            anyhow::bail!("torch helper started without pipes");
        };
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut me = TorchBaseline {
            child,
            stdin,
            lines,
            prepare_timeout: PREPARE_TIMEOUT,
            run_timeout: RUN_TIMEOUT,
        };
        let hello = me.answer(start_timeout)?;
        if hello["ready"].as_bool() != Some(true) {
            eprintln!(
                "torch baseline skipped: {}",
                hello["why"].as_str().unwrap_or("helper not ready")
            );
            return Ok(None);
        }
        Ok(Some(me))
    }

    fn answer(&mut self, timeout: Duration) -> Result<Value, KernelError> {
        let line = match self.lines.recv_timeout(timeout) {
            Ok(l) => l,
            Err(RecvTimeoutError::Timeout) => {
                let _ = self.child.kill();
                return Err(err(format!("no answer within {timeout:?}; helper killed")));
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = reap(&mut self.child)
                    .map_or_else(|| "status unknown".to_string(), |s| s.to_string());
                return Err(err(format!("helper exited ({status})")));
            }
        };
        serde_json::from_str(&line).map_err(|e| err(format!("bad answer {line:?}: {e}")))
    }

    fn ask(&mut self, req: Value, timeout: Duration) -> Result<Value, KernelError> {
        writeln!(self.stdin, "{req}")
            .and_then(|_| self.stdin.flush())
            .map_err(|e| err(format!("helper gone: {e}")))?;
        let a = self.answer(timeout)?;
        if let Some(e) = a.get("error") {
            return Err(err(e.to_string()));
        }
        Ok(a)
    }
}

/// The exit status of a helper whose output ended: it is exiting, so it
/// gets a moment to finish on its own (its own status says why), and is
/// killed if it lingers with its output closed.
fn reap(child: &mut Child) -> Option<ExitStatus> {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => return None,
        }
    }
    let _ = child.kill();
    child.wait().ok()
}

impl TorchBaseline {
    /// Asks the helper to build a case (`req` with `"op": "prepare"`);
    /// false, with the reason on stderr, when it cannot.
    pub fn prepare_request(&mut self, req: Value, label: &str) -> Result<bool, KernelError> {
        let a = self.ask(req, self.prepare_timeout)?;
        if a["ok"].as_bool() == Some(true) {
            return Ok(true);
        }
        eprintln!(
            "torch baseline cannot run {label}: {}",
            a["why"].as_str().unwrap_or("no reason given")
        );
        Ok(false)
    }

    /// One timed call of the prepared case, in milliseconds.
    pub fn time_once(&mut self) -> Result<f64, KernelError> {
        let a = self.ask(json!({"op": "run"}), self.run_timeout)?;
        a["ms"]
            .as_f64()
            .ok_or_else(|| err(format!("answer without ms: {a}")))
    }
}

impl ExternalBaseline for TorchBaseline {
    fn prepare(&mut self, case: &BenchCase) -> Result<bool, KernelError> {
        self.prepare_request(
            json!({"op": "prepare", "counts": case.counts, "k": case.k, "n": case.n}),
            &format!("torch._grouped_mm {}", case.label),
        )
    }

    fn run_once(&mut self) -> Result<f64, KernelError> {
        self.time_once()
    }
}

impl Drop for TorchBaseline {
    fn drop(&mut self) {
        // Closing stdin ends the helper's loop; kill covers a stuck one.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in helper: python3 running `body` after a ready line.
    fn fake(body: &str) -> TorchBaseline {
        let src = format!(
            "import json, sys, time\nprint(json.dumps({{'ready': True}}), flush=True)\n{body}"
        );
        TorchBaseline::spawn(
            Command::new("python3").args(["-c", &src]),
            Duration::from_secs(20),
        )
        .expect("spawn")
        .expect("ready")
    }

    fn case() -> BenchCase {
        BenchCase {
            label: "t".into(),
            counts: vec![16, 0, 32],
            k: 64,
            n: 128,
            swiglu: false,
        }
    }

    #[test]
    fn speaks_the_protocol() {
        // Echoes what it was asked, so the request's fields are checked too.
        let mut t = fake(
            "for line in sys.stdin:\n    r = json.loads(line)\n    if r['op'] == 'prepare':\n        print(json.dumps({'ok': r['counts'] == [16, 0, 32] and r['k'] == 64 and r['n'] == 128}), flush=True)\n    else:\n        print(json.dumps({'ms': 1.5}), flush=True)\n",
        );
        assert!(t.prepare(&case()).unwrap());
        assert_eq!(t.run_once().unwrap(), 1.5);
        assert_eq!(t.run_once().unwrap(), 1.5);
    }

    #[test]
    fn refusal_is_not_an_error_but_errors_are() {
        let mut t = fake(
            "for line in sys.stdin:\n    r = json.loads(line)\n    if r['op'] == 'prepare':\n        print(json.dumps({'ok': False, 'why': 'shape'}), flush=True)\n    else:\n        print(json.dumps({'error': 'run before prepare'}), flush=True)\n",
        );
        assert!(!t.prepare(&case()).unwrap());
        let e = t.run_once().unwrap_err().to_string();
        assert!(e.contains("run before prepare"), "{e}");
    }

    #[test]
    fn a_hung_or_dead_helper_is_an_error() {
        let mut t = fake("time.sleep(60)\n");
        t.run_timeout = Duration::from_millis(300);
        let e = t.run_once().unwrap_err().to_string();
        assert!(e.contains("no answer"), "{e}");
        let mut t = fake("sys.exit(0)\n");
        let e = t.run_once().unwrap_err().to_string();
        assert!(e.contains("exited") || e.contains("gone"), "{e}");
    }

    /// Output closed but the process lingering: killed, not waited for.
    #[test]
    fn a_helper_that_closes_its_output_and_lingers_is_killed() {
        let mut t = fake("import os\nos.close(1)\ntime.sleep(600)\n");
        let e = t.run_once().unwrap_err().to_string();
        assert!(e.contains("exited (signal: 9"), "{e}");
    }

    #[test]
    fn a_helper_without_torch_is_skipped() {
        let t = TorchBaseline::spawn(
            Command::new("python3")
                .args(["-c", "print('{\"ready\": false, \"why\": \"no torch\"}')"]),
            Duration::from_secs(20),
        )
        .unwrap();
        assert!(t.is_none());
    }
}
