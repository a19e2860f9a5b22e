//! `cargo xtask compile-kernels`: the CI compile gate. Compiles every grouped
//! GEMM variant the planner can choose, and the device forward kernels, for
//! sm_90a and sm_80 with NVRTC on a
//! machine with no GPU, installing NVRTC from the pip wheels
//! (scripts/install-nvrtc.sh) into .tools/nvrtc when none is found.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use comet_kernels::forward::forward_unit;
use comet_kernels::nvrtc::{compile_cubin_with_log, ensure_nvrtc, CompileUnit, Target};
use comet_kernels::variants::all_gemm_variants;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Makes NVRTC loadable: an explicit COMET_NVRTC_LIB_DIR, the project's
/// .tools/nvrtc, or a fresh install of the pinned wheels there.
fn provide_nvrtc(root: &Path) -> Result<()> {
    let lib = root.join(".tools/nvrtc/nvidia/cu13/lib");
    if std::env::var_os("COMET_NVRTC_LIB_DIR").is_none() && !lib.join("libnvrtc.so.13").exists() {
        eprintln!("compile-kernels: installing NVRTC wheels into .tools/nvrtc");
        let status = Command::new("bash")
            .arg(root.join("scripts/install-nvrtc.sh"))
            .stdout(std::process::Stdio::null())
            .status()
            .context("running scripts/install-nvrtc.sh")?;
        if !status.success() {
            bail!("scripts/install-nvrtc.sh failed ({status})");
        }
    }
    if std::env::var_os("COMET_NVRTC_LIB_DIR").is_none() {
        // SAFETY-free: set before any thread starts and before NVRTC loads.
        std::env::set_var("COMET_NVRTC_LIB_DIR", &lib);
    }
    ensure_nvrtc().context("loading NVRTC")?;
    Ok(())
}

/// Compiles every variant for its targets; `verbose` prints ptxas' resource
/// report (registers, spills, shared memory) of each, and `cubins` names a
/// folder to write each cubin to (`<kernel>@<target>.cubin`, for reading
/// the SASS with `cuobjdump -sass` on a machine without a GPU).
pub fn compile_gate(verbose: bool, cubins: Option<&Path>) -> Result<()> {
    let root = workspace_root();
    provide_nvrtc(&root)?;
    // Every GEMM variant for its targets, and the forward kernels for both.
    let mut jobs: Vec<(String, CompileUnit, Target)> = all_gemm_variants()
        .into_iter()
        .map(|(v, t)| (v.kernel_name(), v.compile_unit(), t))
        .collect();
    for t in [Target::SM80, Target::SM90A] {
        jobs.push(("comet_moe_forward".into(), forward_unit(), t));
    }
    let t0 = Instant::now();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 4);
    let chunk = jobs.len().div_ceil(threads);
    if let Some(dir) = cubins {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let results: Vec<(String, Result<String, String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|(kernel, unit, t)| {
                            let mut unit = unit.clone();
                            if verbose {
                                unit.extra_options.push("--ptxas-options=-v".into());
                            }
                            let name = format!("{kernel} @ {t}");
                            let r = compile_cubin_with_log(&unit, *t)
                                .map_err(|e| e.to_string())
                                .and_then(|(cubin, log)| match cubins {
                                    Some(dir) => {
                                        let p = dir.join(format!("{kernel}@{t}.cubin"));
                                        std::fs::write(&p, cubin)
                                            .map(|_| log)
                                            .map_err(|e| format!("writing {}: {e}", p.display()))
                                    }
                                    None => Ok(log),
                                });
                            (name, r)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("compile thread panicked"))
            .collect()
    });
    let mut failed = 0;
    for (name, r) in &results {
        match r {
            Ok(log) => {
                println!("ok   {name}");
                let bad = log.contains("spill") && !log.contains("0 bytes spill stores");
                if verbose || bad || log.contains("warning") {
                    for line in log.lines().filter(|l| !l.trim().is_empty()) {
                        println!("       {line}");
                    }
                }
            }
            Err(e) => {
                failed += 1;
                println!("FAIL {name}\n{e}");
            }
        }
    }
    println!(
        "compile-kernels: {} units, {failed} failed, {:.1} s",
        results.len(),
        t0.elapsed().as_secs_f64()
    );
    if failed > 0 {
        bail!("{failed} kernel variants failed to compile");
    }
    Ok(())
}
