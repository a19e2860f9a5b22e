//! `cargo xtask ci` and `cargo xtask bench`: the gates every commit passes
//! and the benchmark runs, as one command each.

use anyhow::{bail, Context, Result};
use std::process::Command;
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

/// Format, lints with warnings denied, each transport feature alone, every
/// test, and the kernel compile gate for sm_90a and sm_80.
pub fn ci() -> Result<()> {
    let t0 = Instant::now();
    cargo(&["fmt", "--all", "--", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--all-features",
        "--",
        "-D",
        "warnings",
    ])?;
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
    cargo(&["test", "--workspace", "--all-features", "--no-fail-fast"])?;
    crate::kernels::compile_gate(false)?;
    eprintln!("xtask: ci passed in {:.0} s", t0.elapsed().as_secs_f64());
    Ok(())
}

/// The planner's criterion benches and the layer bench on this machine.
pub fn bench() -> Result<()> {
    cargo(&["bench", "-p", "comet-core", "--bench", "planner"])?;
    cargo(&["run", "--release", "-p", "comet-cli", "--", "bench"])?;
    Ok(())
}
