//! `comet bench gemm`: the grouped GEMM of comet-kernels against cuBLAS (a
//! per-expert loop and the grouped API) in this process, and
//! torch._grouped_mm through a scripts/bench_torch_gemm.py helper when
//! python3 with torch is present, all timed in turns, on the presets'
//! FC1/FC2 shapes (EP = 2: tokens x top-k rows over E/2 local experts),
//! uniform and skewed routing.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use comet_core::Preset;
use comet_kernels::bench::{format_table, preset_cases, run_on_first_gpu, ExternalBaseline};
use comet_kernels::Family;

use crate::torch_baseline::TorchBaseline;

#[derive(Args, Debug, Clone)]
pub struct GemmBenchArgs {
    /// Presets to run (comma separated), or `all`.
    #[arg(long, default_value = "all")]
    pub preset: String,
    /// Tokens per rank; rows = tokens x top-k spread over E/2 local experts.
    #[arg(long, default_value_t = 8192)]
    pub tokens: usize,
    /// Timed rounds (median reported), after warm-ups of 50 ms per kernel.
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Kernel families, comma separated: auto (the default on this GPU),
    /// sm80, sm90 (consumers store), sm90ws (storer warps), sm90tma (TMA
    /// bulk stores; what auto picks on sm_90a) or sm90c2 (sm90tma in
    /// clusters of two sharing B by multicast). Each gets
    /// its own table with cuBLAS and torch beside it.
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

/// The torch helper, or None when `--torch off` or it cannot run here.
fn start_torch(args: &GemmBenchArgs) -> Result<Option<TorchBaseline>> {
    if args.torch == "off" {
        return Ok(None);
    }
    let Some(script) = torch_script(args) else {
        eprintln!(
            "comet bench gemm: scripts/bench_torch_gemm.py not found; torch baseline skipped"
        );
        return Ok(None);
    };
    TorchBaseline::start(&script)
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
    if args.torch != "off" && args.torch != "auto" {
        bail!("--torch {:?}: expected auto or off", args.torch);
    }
    let cases = preset_cases(args.tokens, &presets(&args.preset)?)?;
    let mut torch = start_torch(&args)?;
    for fam in families {
        let baseline = torch.as_mut().map(|t| t as &mut dyn ExternalBaseline);
        let (gpu, results) = run_on_first_gpu(&cases, fam, args.iters, baseline)?;
        let name = results
            .first()
            .map(|r| format!("{:?}", r.family))
            .unwrap_or_default();
        println!(
            "device: {gpu}; kernel family: {name}; tokens {} per rank, EP = 2; median of {} rounds, kernels (and torch) timed in turns",
            args.tokens, args.iters
        );
        print!("{}", format_table(&results, "torch._grouped_mm"));
        println!();
    }
    Ok(())
}
