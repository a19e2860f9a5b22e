//! The Python module `comet` (crates/comet-py) in CI and as a wheel.
//!
//! CI: a virtual environment in `.venv-py` (made once) with maturin and
//! pytest, the module built and installed by `pip install ./crates/comet-py`
//! (dev profile: CI needs the checks, not the speed), then its pytest
//! tests; the CPU ones run anywhere, the GPU ones skip themselves without
//! CUDA and torch and are counted as ignored.
//!
//! `cargo xtask wheel`: the release abi3 wheel (one file for every Python
//! >= 3.9) for a GPU machine, built by maturin into `target/wheels`.

use crate::ci::Totals;
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

const VENV: &str = ".venv-py";
const CRATE: &str = "crates/comet-py";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// `.venv-py/bin` first on PATH: the maturin build backend runs `maturin`.
fn venv_path(root: &Path) -> std::ffi::OsString {
    let mut paths = vec![root.join(VENV).join("bin")];
    if let Some(p) = std::env::var_os("PATH") {
        paths.extend(std::env::split_paths(&p));
    }
    std::env::join_paths(paths).unwrap_or_default()
}

/// `py -m pip install` of `args`, run in `root`: quiet and without pip's
/// upgrade notice, so that CI output shows only what went wrong.
fn pip_install(py: &Path, root: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(py);
    cmd.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ])
    .args(args)
    .current_dir(root);
    cmd
}

/// The venv's python, with maturin and pytest installed (pip only when one
/// is missing).
fn ensure_venv(root: &Path) -> Result<PathBuf> {
    let bin = root.join(VENV).join("bin");
    let py = bin.join("python");
    if !py.exists() {
        let system = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        eprintln!("xtask: {system} -m venv {VENV}");
        run(
            Command::new(&system)
                .args(["-m", "venv", VENV])
                .current_dir(root),
            &format!(
                "{system} -m venv {VENV} (on Debian: apt-get install python3-venv; or set PYTHON)"
            ),
        )?;
    }
    let have_pytest = Command::new(&py)
        .args(["-c", "import pytest"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !have_pytest || !bin.join("maturin").exists() {
        eprintln!("xtask: pip install maturin pytest into {VENV}");
        run(
            &mut pip_install(&py, root, &["maturin>=1.9,<2", "pytest"]),
            "pip install maturin pytest",
        )?;
    }
    Ok(py)
}

impl Totals {
    /// Adds pytest's summary line (`3 failed, 70 passed, 4 skipped in
    /// 1.75s`, with or without `=` around it): skipped counts as ignored,
    /// errors as failed. Returns whether the line was a summary.
    pub fn add_pytest_line(&mut self, line: &str) -> bool {
        let line = line.trim().trim_matches('=').trim();
        let Some((counts, time)) = line.rsplit_once(" in ") else {
            return false;
        };
        if !time.trim_end().ends_with('s') {
            return false;
        }
        let mut t = Totals::default();
        for part in counts.split(", ") {
            let mut words = part.split_whitespace();
            let (Some(n), Some(what), None) = (words.next(), words.next(), words.next()) else {
                return false;
            };
            let Ok(n) = n.parse::<u64>() else {
                return false;
            };
            match what {
                "passed" | "xpassed" => t.passed += n,
                "failed" | "error" | "errors" => t.failed += n,
                "skipped" | "xfailed" => t.ignored += n,
                "deselected" | "warning" | "warnings" => {}
                _ => return false,
            }
        }
        self.absorb(t);
        true
    }

    pub fn absorb(&mut self, o: Totals) {
        self.passed += o.passed;
        self.failed += o.failed;
        self.ignored += o.ignored;
    }
}

/// Builds and installs the module into `.venv-py` and runs its tests;
/// returns whether everything passed and pytest's counts.
pub fn python_tests() -> Result<(bool, Totals)> {
    let t0 = Instant::now();
    let root = root();
    let py = ensure_venv(&root)?;
    eprintln!("xtask: pip install ./{CRATE} (maturin, dev profile)");
    run(
        pip_install(
            &py,
            &root,
            &[
                "--no-build-isolation",
                "--no-deps",
                "--force-reinstall",
                &format!("./{CRATE}"),
            ],
        )
        .env("PATH", venv_path(&root))
        .env("MATURIN_PEP517_ARGS", "--profile dev"),
        "pip install ./crates/comet-py",
    )?;
    eprintln!("xtask: pytest {CRATE}/tests");
    let mut child = Command::new(&py)
        .args([
            "-m",
            "pytest",
            &format!("{CRATE}/tests"),
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
        ])
        .current_dir(&root)
        .stdout(Stdio::piped())
        .spawn()
        .context("running pytest")?;
    let out = child.stdout.take().context("pytest's stdout")?;
    let mut last = Totals::default();
    let mut seen = false;
    let mut stdout = std::io::stdout().lock();
    for line in BufReader::new(out).lines() {
        let line = line.context("reading pytest's output")?;
        let mut t = Totals::default();
        if t.add_pytest_line(&line) {
            last = t;
            seen = true;
        }
        writeln!(stdout, "{line}")?;
    }
    drop(stdout);
    let status = child.wait().context("waiting for pytest")?;
    let ok = status.success() && seen;
    if !seen {
        last.failed += 1;
        eprintln!("xtask: pytest printed no summary line ({status})");
    }
    eprintln!(
        "xtask: python tests {} in {:.0} s",
        if ok { "ok" } else { "FAILED" },
        t0.elapsed().as_secs_f64()
    );
    Ok((ok, last))
}

/// `cargo xtask wheel`: the release wheel of the module, for pip on a
/// machine without network (`pip install --no-index <wheel>`).
pub fn wheel() -> Result<()> {
    let root = root();
    ensure_venv(&root)?;
    // Always the workspace's target/wheels (whatever CARGO_TARGET_DIR says
    // about the build), so the wheel is found at one place to carry.
    let out = root.join("target").join("wheels");
    // One wheel to carry and install: an older one (a debug build the
    // python tests left, an earlier version) would match the same glob.
    if let Ok(dir) = std::fs::read_dir(&out) {
        for old in dir.flatten().map(|e| e.path()) {
            if old.extension().is_some_and(|x| x == "whl") {
                std::fs::remove_file(&old)
                    .with_context(|| format!("removing stale wheel {}", old.display()))?;
            }
        }
    }
    eprintln!("xtask: maturin build --release -> {}", out.display());
    run(
        Command::new(root.join(VENV).join("bin").join("maturin"))
            .args(["build", "--release", "--manifest-path"])
            .arg(root.join(CRATE).join("Cargo.toml"))
            .arg("--out")
            .arg(&out)
            .env("PATH", venv_path(&root))
            .current_dir(&root),
        "maturin build --release",
    )?;
    let mut wheels: Vec<_> = std::fs::read_dir(&out)
        .with_context(|| format!("reading {}", out.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "whl"))
        .collect();
    wheels.sort();
    for w in &wheels {
        let size = std::fs::metadata(w).map(|m| m.len()).unwrap_or(0);
        println!(
            "{} ({:.1} MiB)",
            w.display(),
            size as f64 / (1 << 20) as f64
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pytest_summaries_are_counted_and_other_lines_are_not() {
        let mut t = Totals::default();
        assert!(t.add_pytest_line("74 passed in 1.75s"));
        assert!(
            t.add_pytest_line("===== 1 failed, 70 passed, 4 skipped, 2 warnings in 12.31s =====")
        );
        assert!(t.add_pytest_line("2 errors, 1 xfailed in 0.10s"));
        assert!(!t.add_pytest_line("crates/comet-py/tests/test_cpu.py ......  [ 97%]"));
        assert!(!t.add_pytest_line("SKIPPED [3] test_gpu.py:12: no CUDA device in 1 place"));
        assert!(!t.add_pytest_line("FAILED test_cpu.py::test_x - assert 1 in 2s"));
        assert_eq!(
            t,
            Totals {
                passed: 144,
                failed: 3,
                ignored: 5
            }
        );
    }
}
