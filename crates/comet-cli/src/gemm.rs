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
use comet_kernels::bench::{format_table, run_on_first_gpu, BenchCase, ExternalBaseline};
use comet_kernels::problem::routed_counts;
use comet_kernels::Family;

use crate::shape::{Shape, ShapeArgs};
use crate::torch_baseline::TorchBaseline;

#[derive(Args, Debug, Clone)]
pub struct GemmBenchArgs {
    /// Presets to run (comma separated), or `all`. With shape flags: the
    /// named presets with those fields replaced, or with `all` (the
    /// default) the one shape all four flags give.
    #[arg(long, default_value = "all")]
    pub preset: String,
    #[command(flatten)]
    pub shape: ShapeArgs,
    /// Tokens per rank; rows = tokens x top-k spread over E/2 local experts.
    #[arg(long, default_value_t = 8192)]
    pub tokens: usize,
    /// Timed rounds (median reported), after warm-ups of 50 ms per kernel.
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Kernel families, comma separated: auto (the default on this GPU),
    /// sm80, sm90 (plain 16-byte stores), sm90tma (TMA bulk stores; what
    /// auto picks on sm_90a) or sm90c2 (sm90tma in clusters of two sharing
    /// B by multicast).
    /// Each gets its own table with cuBLAS and torch beside it.
    #[arg(long, default_value = "auto")]
    pub family: String,
    /// torch._grouped_mm baseline: auto (when python3 + torch exist) or off.
    #[arg(long, default_value = "auto")]
    pub torch: String,
    /// Path of scripts/bench_torch_gemm.py (default: next to the binary, then ./scripts).
    #[arg(long)]
    pub torch_script: Option<PathBuf>,
}

/// The GEMMs of each shape at EP = 2: `tokens` x top-k rows over the
/// E/2 local experts, uniform and skewed (1/(i+1)), each expert's rows cut
/// to a multiple of 16 (the rest to expert 0); FC1 (H -> 2F, with the
/// SwiGLU epilogue timed too) and FC2 (F -> H).
fn cases(tokens: usize, shapes: &[Shape]) -> Vec<BenchCase> {
    let mut out = Vec::new();
    for s in shapes {
        let cfg = &s.cfg;
        let name = if s.label.contains("custom") || s.label.contains('+') {
            format!(
                "H{} F{} E{} k{}",
                cfg.hidden, cfg.ffn, cfg.experts, cfg.top_k
            )
        } else {
            s.label.clone()
        };
        let local = cfg.experts / 2;
        let total = tokens * cfg.top_k;
        for skewed in [false, true] {
            let mut counts = routed_counts(local, total, skewed);
            let mut carry = 0usize;
            for c in counts.iter_mut() {
                let r = *c % 16;
                *c -= r;
                carry += r;
            }
            counts[0] += carry;
            let dist = if skewed { "skewed" } else { "uniform" };
            out.push(BenchCase {
                label: format!("{name} FC1 {dist}"),
                counts: counts.clone(),
                k: cfg.hidden,
                n: 2 * cfg.ffn,
                swiglu: true,
            });
            out.push(BenchCase {
                label: format!("{name} FC2 {dist}"),
                counts,
                k: cfg.ffn,
                n: cfg.hidden,
                swiglu: false,
            });
        }
    }
    out
}

/// The shapes `--preset` and the shape flags name, at EP = 2.
fn shapes(args: &GemmBenchArgs) -> Result<Vec<Shape>> {
    args.shape.shapes(
        &args.preset,
        &[Preset::Mixtral8x7b, Preset::Qwen2Moe, Preset::Phi35Moe],
        2,
        "the EP size",
        1,
    )
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
    if args.tokens == 0 {
        bail!("--tokens must be at least 1");
    }
    let cases = cases(args.tokens, &shapes(&args)?);
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

#[cfg(test)]
mod tests {
    use super::*;
    use comet_kernels::bench::preset_cases;

    fn args(extra: &[&str]) -> GemmBenchArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            a: GemmBenchArgs,
        }
        let mut v = vec!["gemm"];
        v.extend_from_slice(extra);
        Cli::try_parse_from(v).unwrap().a
    }

    #[test]
    fn preset_cases_are_the_kernels_own() {
        let presets = [Preset::Mixtral8x7b, Preset::Qwen2Moe, Preset::Phi35Moe];
        let want = preset_cases(8192, &presets).unwrap();
        let got = cases(8192, &shapes(&args(&[])).unwrap());
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(
                (&g.label, &g.counts, g.k, g.n, g.swiglu),
                (&w.label, &w.counts, w.k, w.n, w.swiglu)
            );
        }
    }

    #[test]
    fn a_users_own_shape() {
        let a = args(&[
            "--hidden",
            "2048",
            "--ffn",
            "1408",
            "--experts",
            "60",
            "--top-k",
            "4",
            "--tokens",
            "1000",
        ]);
        let c = cases(a.tokens, &shapes(&a).unwrap());
        assert_eq!(c.len(), 4);
        for x in &c {
            assert!(x.label.starts_with("H2048 F1408 E60 k4 FC"), "{}", x.label);
            assert_eq!(x.counts.len(), 30);
            assert_eq!(x.counts.iter().sum::<usize>(), 4000);
        }
        assert_eq!((c[0].k, c[0].n, c[0].swiglu), (2048, 2816, true));
        assert_eq!((c[1].k, c[1].n, c[1].swiglu), (1408, 2048, false));
        let e = shapes(&args(&[
            "--experts",
            "61",
            "--top-k",
            "2",
            "--hidden",
            "8",
            "--ffn",
            "8",
        ]))
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("--experts 61 is not divisible by the EP size 2"),
            "{e}"
        );
    }
}
