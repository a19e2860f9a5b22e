//! `cargo xtask bundle`: release binaries for a GPU machine that has only
//! the driver and CUDA libraries (cudarc loads libcuda, libnvrtc and
//! libcublas at run time): the `comet` CLI (with the nvlink, nccl and ucx
//! transports), the GPU test binaries of comet-kernels, comet-sched
//! (`gpu_layer`, `gpu_signals`, `gpu_nccl_layer`, and `gpu_staged_ucx`
//! with the UCX libraries it links, which GPU machines lack, in lib/) and
//! comet-transport (`nvlink_gpu`, `nccl_gpu`), the torch
//! baseline scripts and an env/run script, in .bundle/ (< 64 MiB).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

const LIMIT: u64 = 64 << 20;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Test executables cargo reports for `args` (JSON messages on stdout).
fn test_executables(args: &[&str]) -> Result<Vec<PathBuf>> {
    let out = cargo()
        .current_dir(root())
        .args(["test", "--release", "--no-run", "--message-format=json"])
        .args(args)
        .output()
        .context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!(
            "cargo test --no-run failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut exes = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(_) => continue,
        };
        if let Some(exe) = v.get("executable").and_then(|e| e.as_str()) {
            exes.push(PathBuf::from(exe));
        }
    }
    Ok(exes)
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

const RUN_SH: &str = r#"#!/bin/bash
# Environment for the bundle on a GPU machine: CUDA libraries from the
# toolkit or from pip wheels (nvidia-*), found by cudarc's dlopen.
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [[ -d $d ]] && LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH}"
done
PYNV=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null)
if [[ -n "$PYNV" ]]; then
  for d in "$PYNV"/nvidia/cu13/lib "$PYNV"/nvidia/*/lib; do
    [[ -d $d ]] && LD_LIBRARY_PATH="${LD_LIBRARY_PATH}:$d"
  done
fi
# UCX (for gpu_staged_ucx) from the bundle; its transports built into
# libuct (tcp, shared memory) need no modules.
if [[ -d $HERE/lib ]]; then
  LD_LIBRARY_PATH="$HERE/lib:${LD_LIBRARY_PATH}"
  export UCX_MODULE_DIR="$HERE/lib/ucx"
fi
# cudarc opens libnccl.so, which NCCL wheels and many installs ship only as
# libnccl.so.2: link one under that name where none is on the path.
if ! ldconfig -p 2>/dev/null | grep -q 'libnccl\.so '; then
  NCCL_SO=$(ldconfig -p 2>/dev/null | awk '/libnccl\.so/{print $NF; exit}')
  [[ -z "$NCCL_SO" && -n "$PYNV" ]] && NCCL_SO=$(ls "$PYNV"/nvidia/nccl/lib/libnccl.so* 2>/dev/null | head -1)
  if [[ -n "$NCCL_SO" ]]; then
    mkdir -p /tmp/comet-nccl-lib && ln -sf "$NCCL_SO" /tmp/comet-nccl-lib/libnccl.so
    LD_LIBRARY_PATH="/tmp/comet-nccl-lib:${LD_LIBRARY_PATH}"
  fi
fi
# The most hardware queues: a staged rank's proxy work must not queue
# behind kernels that wait for it. One queue is refused (docs/PERF.md,
# 2026-12-06); 4 to 32 held nothing back there; 32 is the margin kept.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-32}
export LD_LIBRARY_PATH NCCL_NVLS_ENABLE=0
export COMET_CACHE_DIR="${COMET_CACHE_DIR:-/tmp/comet-cache}"
# usage: .bundle/run.sh comet bench gemm | .bundle/run.sh comet-kernels-gpu --ignored --test-threads=1
#        .bundle/run.sh gpu_layer --ignored --test-threads=1
#        .bundle/run.sh gpu_staged_ucx --ignored --test-threads=1
#        .bundle/run.sh gpu_nccl_layer --ignored --test-threads=1   (2+ GPUs)
#        .bundle/run.sh nvlink_gpu --ignored --test-threads=1   (host-driven put and signal)
#        .bundle/run.sh nccl_gpu --ignored --test-threads=1   (a world of one; 2+ GPUs for the rest)
#        .bundle/run.sh gpu_signals --ignored --test-threads=1
exe="$1"; shift
exec "$HERE/$exe" "$@"
"#;

/// A GPU test binary of the bundle: the cargo package and features that
/// build it, its test target and its name in the bundle.
struct GpuTest {
    package: &'static str,
    features: &'static str,
    test: &'static str,
    name: &'static str,
}

const GPU_TESTS: [GpuTest; 7] = [
    GpuTest {
        package: "comet-kernels",
        features: "",
        test: "gpu",
        name: "comet-kernels-gpu",
    },
    GpuTest {
        package: "comet-sched",
        features: "gpu",
        test: "gpu_layer",
        name: "gpu_layer",
    },
    GpuTest {
        package: "comet-sched",
        features: "gpu,ucx",
        test: "gpu_staged_ucx",
        name: "gpu_staged_ucx",
    },
    GpuTest {
        package: "comet-sched",
        features: "gpu,nccl",
        test: "gpu_nccl_layer",
        name: "gpu_nccl_layer",
    },
    GpuTest {
        package: "comet-sched",
        features: "gpu",
        test: "gpu_signals",
        name: "gpu_signals",
    },
    GpuTest {
        package: "comet-transport",
        features: "nvlink",
        test: "nvlink_gpu",
        name: "nvlink_gpu",
    },
    GpuTest {
        package: "comet-transport",
        features: "nccl",
        test: "nccl_gpu",
        name: "nccl_gpu",
    },
];

/// The torch baseline scripts, run from the bundle's folder (the helper is
/// imported by the other two from there).
const SCRIPTS: [&str; 3] = [
    "bench_torch_gemm.py",
    "bench_torch_layer.py",
    "bench_torch_helper.py",
];

/// Builds the bundle; returns its folder.
pub fn bundle() -> Result<PathBuf> {
    build_cli()?;
    let tests = build_gpu_tests()?;
    let dir = root().join(".bundle");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    fill(&dir, &tests)?;
    let total = bytes_under(&dir)?;
    println!(
        "bundle: {} ({:.1} MiB)",
        dir.display(),
        total as f64 / (1 << 20) as f64
    );
    if total > LIMIT {
        bail!("bundle is {total} bytes, over the 64 MiB limit");
    }
    Ok(dir)
}

/// The `comet` CLI with every transport: cudarc loads CUDA and NCCL at
/// run time, and the UCX libraries it links travel in lib/ (GPU machines
/// have none), for `comet bench --gpu --transport ucx`.
fn build_cli() -> Result<()> {
    eprintln!("bundle: building comet (release, features nvlink,nccl,ucx)");
    let status = cargo()
        .current_dir(root())
        .args(["build", "--release", "-p", "comet-cli", "--bin", "comet"])
        .args(["--features", "nvlink,nccl,ucx"])
        .status()
        .context("cargo build --release -p comet-cli")?;
    if !status.success() {
        bail!("building the comet CLI failed");
    }
    Ok(())
}

/// Every GPU test binary, built; its executable with its bundle name.
fn build_gpu_tests() -> Result<Vec<(PathBuf, &'static str)>> {
    eprintln!(
        "bundle: building the GPU test binaries ({})",
        GPU_TESTS.map(|t| t.name).join(", ")
    );
    GPU_TESTS
        .iter()
        .map(|t| {
            let mut args = vec!["-p", t.package, "--test", t.test];
            if !t.features.is_empty() {
                args.extend(["--features", t.features]);
            }
            let exe = test_executables(&args)?
                .into_iter()
                .next()
                .with_context(|| format!("no test executable reported for {}", t.name))?;
            Ok((exe, t.name))
        })
        .collect()
}

/// Copies the CLI, the test binaries (stripped), the scripts, the UCX
/// libraries and run.sh into `dir`.
fn fill(dir: &Path, tests: &[(PathBuf, &'static str)]) -> Result<()> {
    let root = root();
    let mut files: Vec<(PathBuf, &str)> = vec![(target_dir().join("release/comet"), "comet")];
    files.extend(tests.iter().cloned());
    files.extend(SCRIPTS.map(|s| (root.join("scripts").join(s), s)));
    for (src, name) in &files {
        std::fs::copy(src, dir.join(name)).with_context(|| format!("copying {}", src.display()))?;
        // Symbols are not needed to run; a missing `strip` only costs size.
        if !name.ends_with(".py") {
            let _ = Command::new("strip").arg(dir.join(name)).status();
        }
    }
    let ucx_test = tests
        .iter()
        .find(|(_, name)| *name == "gpu_staged_ucx")
        .map(|(exe, _)| exe)
        .context("gpu_staged_ucx is one of the GPU tests")?;
    copy_ucx_libs(ucx_test, &dir.join("lib"))?;
    std::fs::write(dir.join("run.sh"), RUN_SH)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join("run.sh"), std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

/// Copies the UCX libraries `exe` links (and libnuma, which they need),
/// as `ldd` resolves them here, into `lib` under their sonames.
fn copy_ucx_libs(exe: &Path, lib: &Path) -> Result<()> {
    let out = Command::new("ldd")
        .arg(exe)
        .output()
        .context("running ldd")?;
    std::fs::create_dir_all(lib.join("ucx"))?;
    let mut n = 0;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "libucp.so.0 => /lib/x86_64-linux-gnu/libucp.so.0 (0x...)"
        let mut w = line.split_whitespace();
        let (Some(name), Some("=>"), Some(path)) = (w.next(), w.next(), w.next()) else {
            continue;
        };
        if name.starts_with("libuc") || name.starts_with("libnuma") {
            std::fs::copy(path, lib.join(name)).with_context(|| format!("copying {path}"))?;
            n += 1;
        }
    }
    if n == 0 {
        bail!("ldd found no UCX library in {}", exe.display());
    }
    Ok(())
}

fn bytes_under(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let m = e.metadata()?;
        total += if m.is_dir() {
            bytes_under(&e.path())?
        } else {
            m.len()
        };
    }
    Ok(total)
}
