//! `cargo xtask ci` and `cargo xtask bench`: the gates every commit passes
//! and the benchmark runs, as one command each.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Instant;

fn cargo(args: &[&str]) -> Result<()> {
    let t0 = Instant::now();
    eprintln!("xtask: cargo {}", args.join(" "));
    let status = Command::new(env!("CARGO"))
        .args(args)
        .status()
        .with_context(|| format!("running cargo {}", args[0]))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    eprintln!(
        "xtask: cargo {} ok in {:.0} s",
        args[0],
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Test counts summed over every `test result:` line of a run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl Totals {
    /// Adds one libtest summary line (`test result: ok. 8 passed; 0 failed;
    /// 1 ignored; 0 measured; 0 filtered out; finished in 0.1s`); other
    /// lines are left alone. Returns whether the line was a summary.
    pub fn add_line(&mut self, line: &str) -> bool {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return false;
        };
        let mut seen = false;
        for part in rest.split(';') {
            // "ok. 8 passed" / "FAILED. 1 passed" / " 0 failed" / " 2 ignored"
            let part = part.rsplit(". ").next().unwrap_or(part).trim();
            let mut words = part.split_whitespace();
            let (Some(n), Some(what)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => continue,
            }
            seen = true;
        }
        seen
    }

    /// The one total line: `N passed, N failed, N ignored`.
    pub fn line(&self) -> String {
        format!(
            "{} passed, {} failed, {} ignored",
            self.passed, self.failed, self.ignored
        )
    }
}

/// `cargo test ARGS`, its output shown as it comes, every test binary's
/// summary line summed.
fn cargo_test(args: &[&str]) -> Result<(bool, Totals)> {
    let t0 = Instant::now();
    eprintln!("xtask: cargo {}", args.join(" "));
    let mut child = Command::new(env!("CARGO"))
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let mut totals = Totals::default();
    let out = child.stdout.take().context("cargo test's stdout")?;
    let mut stdout = std::io::stdout().lock();
    for line in BufReader::new(out).lines() {
        let line = line.context("reading cargo test's output")?;
        totals.add_line(&line);
        writeln!(stdout, "{line}")?;
    }
    drop(stdout);
    let status = child.wait().context("waiting for cargo test")?;
    eprintln!(
        "xtask: cargo test {} in {:.0} s",
        if status.success() { "ok" } else { "FAILED" },
        t0.elapsed().as_secs_f64()
    );
    Ok((status.success(), totals))
}

/// Format, lints with warnings denied, each transport feature alone, every
/// test (the Python module's pytest ones too), and the kernel compile gate
/// for sm_90a and sm_80. The last line printed is the test total over every
/// test binary and pytest (`N passed, N failed, N ignored`), also when a
/// step after the tests failed.
pub fn ci() -> Result<()> {
    let t0 = Instant::now();
    eprintln!("xtask ci [1/6]: format check");
    cargo(&["fmt", "--all", "--", "--check"])?;
    eprintln!("xtask ci [2/6]: clippy, warnings denied, every target and feature");
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--all-features",
        "--",
        "-D",
        "warnings",
    ])?;
    eprintln!("xtask ci [3/6]: comet-transport with each transport feature alone");
    for feature in ["local", "nvlink", "nccl", "ucx"] {
        cargo(&[
            "check",
            "-p",
            "comet-transport",
            "--no-default-features",
            "--features",
            feature,
        ])?;
    }
    eprintln!("xtask ci [4/6]: every test (GPU-only tests are ignored here)");
    let (tests_ok, mut totals) =
        cargo_test(&["test", "--workspace", "--all-features", "--no-fail-fast"])?;
    eprintln!(
        "xtask ci [5/6]: the Python module: pip install ./crates/comet-py into .venv-py, pytest"
    );
    let py_ok = match crate::python::python_tests() {
        Ok((ok, t)) => {
            totals.absorb(t);
            ok
        }
        Err(e) => {
            eprintln!("xtask: python tests FAILED: {e:#}");
            false
        }
    };
    let gate = if tests_ok && py_ok {
        eprintln!("xtask ci [6/6]: kernel compile gate, sm_90a and sm_80");
        crate::kernels::compile_gate(false, None)
    } else {
        Err(anyhow::anyhow!("tests failed"))
    };
    match &gate {
        Ok(()) => eprintln!("xtask: ci passed in {:.0} s", t0.elapsed().as_secs_f64()),
        Err(e) => eprintln!(
            "xtask: ci FAILED after {:.0} s: {e:#}",
            t0.elapsed().as_secs_f64()
        ),
    }
    std::io::stderr().flush()?;
    println!("{}", totals.line());
    if gate.is_err() {
        // The total stays the last line: no error report after it.
        std::process::exit(1);
    }
    Ok(())
}

/// The planner's criterion benches and the layer bench on this machine.
pub fn bench() -> Result<()> {
    cargo(&["bench", "-p", "comet-core", "--bench", "planner"])?;
    cargo(&["run", "--release", "-p", "comet-cli", "--", "bench"])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_sum_every_summary_line_and_nothing_else() {
        let mut t = Totals::default();
        assert!(t.add_line(
            "test result: ok. 8 passed; 0 failed; 1 ignored; 0 measured; 4 filtered out; finished in 0.14s"
        ));
        assert!(t.add_line(
            "test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s"
        ));
        assert!(!t.add_line("test local::tests::bad_puts_are_errors ... ok"));
        assert!(!t.add_line("running 8 tests"));
        assert!(t.add_line("test result: ok. 0 passed; 0 failed; 12 ignored; 0 measured; 0 filtered out; finished in 0.00s"));
        assert_eq!(
            t,
            Totals {
                passed: 11,
                failed: 2,
                ignored: 13
            }
        );
        assert_eq!(t.line(), "11 passed, 2 failed, 13 ignored");
    }
}
