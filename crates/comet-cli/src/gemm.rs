//! `comet bench gemm`: the grouped GEMM of comet-kernels against cuBLAS (a
//! per-expert loop and the grouped API) in this process, and
//! torch._grouped_mm through scripts/bench_torch_gemm.py when python3 with
//! torch is present, on the presets' FC1/FC2 shapes (EP = 2: tokens x top-k
//! rows over E/2 local experts), uniform and skewed routing.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::Args;
use comet_core::Preset;
use comet_kernels::bench::{format_table, preset_cases, run_on_first_gpu, BenchResult};
use comet_kernels::Family;

#[derive(Args, Debug, Clone)]
pub struct GemmBenchArgs {
    /// Presets to run (comma separated), or `all`.
    #[arg(long, default_value = "all")]
    pub preset: String,
    /// Tokens per rank; rows = tokens x top-k spread over E/2 local experts.
    #[arg(long, default_value_t = 8192)]
    pub tokens: usize,
    /// Timed repetitions per kernel (median reported), after 2 warm-ups.
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Kernel families, comma separated: auto (the default on this GPU),
    /// sm80, sm90 (consumers store), sm90ws (storer warps), sm90tma (TMA
    /// bulk stores; what auto picks on sm_90a) or sm90c2 (sm90tma in
    /// clusters of two sharing B by multicast). Each gets
    /// its own table with cuBLAS beside it; torch is compared with the first.
    #[arg(long, default_value = "auto")]
    pub family: String,
    /// torch._grouped_mm baseline: auto (when python3 + torch exist) or off.
    #[arg(long, default_value = "auto")]
    pub torch: String,
    /// Path of scripts/bench_torch_gemm.py (default: next to the binary, then ./scripts).
    #[arg(long)]
    pub torch_script: Option<PathBuf>,
}

fn presets(spec: &str) -> Result<Vec<Preset>> {
    if spec == "all" {
        return Ok(vec![
            Preset::Mixtral8x7b,
            Preset::Qwen2Moe,
            Preset::Phi35Moe,
        ]);
    }
    spec.split(',')
        .map(|s| s.trim().parse::<Preset>().map_err(anyhow::Error::from))
        .collect()
}

fn torch_script(args: &GemmBenchArgs) -> Option<PathBuf> {
    if let Some(p) = &args.torch_script {
        return Some(p.clone());
    }
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.to_path_buf()));
    let candidates = [
        exe_dir.as_ref().map(|d| d.join("bench_torch_gemm.py")),
        exe_dir
            .as_ref()
            .map(|d| d.join("scripts/bench_torch_gemm.py")),
        Some(PathBuf::from("scripts/bench_torch_gemm.py")),
    ];
    candidates.into_iter().flatten().find(|p| p.exists())
}

/// Median ms per case label from the torch script, or None when skipped.
fn run_torch(args: &GemmBenchArgs, results: &[BenchResult]) -> Result<Option<serde_json::Value>> {
    if args.torch == "off" {
        return Ok(None);
    }
    let Some(script) = torch_script(args) else {
        eprintln!(
            "comet bench gemm: scripts/bench_torch_gemm.py not found; torch baseline skipped"
        );
        return Ok(None);
    };
    let cases: Vec<serde_json::Value> = results
        .iter()
        .map(|r| serde_json::json!({"label": r.case.label, "counts": r.case.counts, "k": r.case.k, "n": r.case.n}))
        .collect();
    let file = std::env::temp_dir().join(format!("comet-gemm-cases-{}.json", std::process::id()));
    std::fs::write(&file, serde_json::to_vec(&cases)?).context("writing the torch case file")?;
    let out = Command::new("python3")
        .arg(&script)
        .arg(&file)
        .arg(args.iters.to_string())
        .output();
    let _ = std::fs::remove_file(&file);
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            eprintln!("comet bench gemm: python3 not runnable ({e}); torch baseline skipped");
            return Ok(None);
        }
    };
    if out.status.code() == Some(2) {
        eprintln!(
            "comet bench gemm: torch baseline skipped: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return Ok(None);
    }
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !stderr.trim().is_empty() {
        eprintln!("{}", stderr.trim());
    }
    Ok(Some(
        serde_json::from_slice(&out.stdout).context("parsing the torch script's JSON")?,
    ))
}

fn family(name: &str) -> Result<Option<Family>> {
    let name = name.trim();
    if name == "auto" {
        return Ok(None);
    }
    match Family::from_name(name) {
        Some(f) => Ok(Some(f)),
        None => {
            let known: Vec<&str> = Family::NAMES.iter().map(|(n, _)| *n).collect();
            bail!(
                "unknown --family {name:?}: expected auto or one of {}",
                known.join(", ")
            )
        }
    }
}

pub fn run(args: GemmBenchArgs) -> Result<()> {
    let families: Vec<Option<Family>> =
        args.family.split(',').map(family).collect::<Result<_>>()?;
    if args.iters == 0 {
        bail!("--iters must be at least 1");
    }
    let cases = preset_cases(args.tokens, &presets(&args.preset)?)?;
    let mut first: Option<Vec<BenchResult>> = None;
    for fam in families {
        let (gpu, results) = run_on_first_gpu(&cases, fam, args.iters)?;
        let name = results
            .first()
            .map(|r| format!("{:?}", r.family))
            .unwrap_or_default();
        println!(
            "device: {gpu}; kernel family: {name}; tokens {} per rank, EP = 2; median of {} runs",
            args.tokens, args.iters
        );
        print!("{}", format_table(&results));
        println!();
        first.get_or_insert(results);
    }
    let results = first.unwrap_or_default();
    if let Some(torch) = run_torch(&args, &results)? {
        println!("| case | ours TFLOP/s | torch._grouped_mm TFLOP/s | ours/torch |\n| --- | --- | --- | --- |");
        for r in &results {
            let f = r.case.flops();
            match torch.get(&r.case.label).and_then(|v| v.as_f64()) {
                Some(ms) => println!(
                    "| {} | {:.0} | {:.0} | {:.2} |",
                    r.case.label,
                    f / (r.ours_ms * 1e-3) / 1e12,
                    f / (ms * 1e-3) / 1e12,
                    ms / r.ours_ms
                ),
                None => println!(
                    "| {} | {:.0} | n/a | n/a |",
                    r.case.label,
                    f / (r.ours_ms * 1e-3) / 1e12
                ),
            }
        }
    }
    Ok(())
}
