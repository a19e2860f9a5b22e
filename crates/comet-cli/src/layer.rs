//! `comet bench` (the layer): runs the MoE layer fused and non-overlapped
//! side by side, checks both against the f64 reference, and prints the
//! per-phase times beside the cost model's prediction. Without a GPU this
//! is the CPU executor: W ranks as threads over the local transport.

use anyhow::{Context, Result};
use clap::Args;
use comet_core::cost::{CostModel, DeviceFigures};
use comet_core::reference::{max_error, moe_layer};
use comet_core::schedule::TileShape;
use comet_core::weights::random_tokens;
use comet_core::{ExpertWeights, MoeConfig, Preset, Routing, RoutingKind};
use comet_sched::tile_math::fc1_swiglu;
use comet_sched::{CallStats, CpuWorld, ExecMode, ExecOptions, RankInput, Trace};
use comet_transport::local::{DelayModel, LinkModel};
use std::time::{Duration, Instant};

/// Relative tolerance of the f32 executor against the f64 reference.
const TOLERANCE: f64 = 1e-4;

#[derive(Args, Debug, Clone)]
pub struct LayerArgs {
    /// Model preset: small, mixtral-8x7b, qwen2-moe, phi3.5-moe.
    #[arg(long, default_value = "small")]
    pub preset: String,
    /// Divide hidden and FFN sizes by this (CPU runs of the large presets).
    #[arg(long, default_value_t = 1)]
    pub scale_down: usize,
    /// Expert-parallel ranks.
    #[arg(long, default_value_t = 4)]
    pub ranks: usize,
    /// Tokens per rank.
    #[arg(long, default_value_t = 256)]
    pub tokens: usize,
    /// Routing: uniform, zipf, all-to-one, some-empty, silent-rank.
    #[arg(long, default_value = "uniform")]
    pub routing: String,
    /// Timed iterations of each mode (after one warm-up).
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    /// Rows per tile (the CPU executor's BM); the cost model picks chunks.
    #[arg(long, default_value_t = 32)]
    pub bm: usize,
    /// Random delay bound of the local transport per put/signal, microseconds.
    #[arg(long, default_value_t = 0)]
    pub delay_us: u64,
    /// Emulated link between ranks, GB/s per direction (0: plain memcpy).
    /// Gives the overlap something to hide on a CPU.
    #[arg(long, default_value_t = 0.0)]
    pub link_gbps: f64,
    /// Latency of the emulated link, microseconds.
    #[arg(long, default_value_t = 10)]
    pub link_latency_us: u64,
    /// Bound on every wait, seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout_s: u64,
    /// Write a Chrome/Perfetto trace of the last fused call here.
    #[arg(long)]
    pub trace: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Run on the GPU executor (all ranks share GPU 0); `--preset all`
    /// runs mixtral-8x7b, qwen2-moe and phi3.5-moe.
    #[arg(long)]
    pub gpu: bool,
}

struct ModeResult {
    median: CallStats,
    max_err: f64,
    trace: Option<Trace>,
}

/// Measures this machine's f32 tile rate (GFLOP/s on one thread) and copy
/// bandwidth, so the cost model's prediction uses real figures.
fn calibrate(cfg: &MoeConfig) -> (f64, f64) {
    let rows = 32;
    let x = random_tokens(rows, cfg.hidden, 1);
    let w1 = random_tokens(cfg.hidden, 2 * cfg.ffn, 2);
    let mut act = vec![0f32; rows * cfg.ffn];
    let start = Instant::now();
    let mut reps = 0;
    while start.elapsed() < Duration::from_millis(100) || reps < 2 {
        fc1_swiglu(&x, &w1, cfg.hidden, cfg.ffn, &mut act);
        reps += 1;
    }
    let gflops =
        2.0 * (rows * cfg.hidden * 2 * cfg.ffn * reps) as f64 / start.elapsed().as_secs_f64() / 1e9;
    let src = vec![1u8; 32 << 20];
    let mut dst = vec![0u8; 32 << 20];
    let start = Instant::now();
    for _ in 0..4 {
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst);
    }
    let gbps = 4.0 * (32 << 20) as f64 / start.elapsed().as_secs_f64() / 1e9;
    (gflops, gbps)
}

fn median_stats(mut v: Vec<CallStats>) -> CallStats {
    v.sort_by_key(|s| s.total);
    v[v.len() / 2].clone()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn run(a: LayerArgs) -> Result<()> {
    if a.gpu {
        return crate::layer_gpu::run(&a);
    }
    anyhow::ensure!(a.iters >= 1, "--iters must be at least 1");
    anyhow::ensure!(a.bm >= 1, "--bm must be at least 1");
    let preset: Preset = a.preset.parse()?;
    let cfg = preset
        .config(a.ranks)
        .with_context(|| format!("preset {} over {} ranks", a.preset, a.ranks))?
        .scaled_down(a.scale_down);
    let kind: RoutingKind = a.routing.parse()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (gflops, gbps) = calibrate(&cfg);
    // Per rank: its share of the cores computes; copies run beside it.
    let per_rank_gflops = gflops * cores.min(cfg.ranks) as f64 / cfg.ranks as f64;
    anyhow::ensure!(
        a.link_gbps >= 0.0 && a.link_gbps.is_finite(),
        "--link-gbps must be a finite number >= 0"
    );
    let link = (a.link_gbps > 0.0).then(|| LinkModel {
        gbps: a.link_gbps,
        latency: Duration::from_micros(a.link_latency_us),
    });
    let mut dev = DeviceFigures::cpu(per_rank_gflops, gbps, 1);
    dev.bm = a.bm;
    if let Some(l) = link {
        dev.link_gbps = l.gbps;
        dev.block_gbps = l.gbps;
        dev.link_latency_us = l.latency.as_secs_f64() * 1e6;
    }
    let est = CostModel::estimate(&cfg, a.tokens, &dev);
    let shape = TileShape {
        bm: a.bm,
        chunk_cols: est.shape.chunk_cols,
    };

    if let Some(l) = link {
        eprintln!(
            "comet bench: emulated link {} GB/s, {:?} latency between ranks",
            l.gbps, l.latency
        );
    }
    eprintln!(
        "comet bench: CPU executor (no GPU path selected), {} ({}), {} tokens/rank, {} routing, {} cores",
        preset.name(), cfg, a.tokens, a.routing, cores
    );
    let delay = (a.delay_us > 0).then(|| DelayModel {
        seed: a.seed,
        max: Duration::from_micros(a.delay_us),
    });
    let timeout = Duration::from_secs(a.timeout_s);
    let mut world = CpuWorld::with_link(&cfg, a.tokens, shape, delay, link, a.seed, timeout)?;
    let inputs: Vec<RankInput> = (0..cfg.ranks)
        .map(|r| {
            let routing = Routing::generate(&cfg, r, a.tokens, kind, a.seed);
            RankInput {
                x: random_tokens(routing.tokens, cfg.hidden, a.seed * 7919 + r as u64),
                routing,
            }
        })
        .collect();
    let all = ExpertWeights::all(&cfg, a.seed);
    let reference: Vec<Vec<f64>> = inputs
        .iter()
        .map(|i| moe_layer(&cfg, &i.x, &i.routing, &all))
        .collect::<Result<_, _>>()?;

    let mut results = Vec::new();
    for mode in [ExecMode::Fused, ExecMode::Baseline] {
        let mut stats = Vec::new();
        let mut max_err = 0f64;
        let mut trace = None;
        for it in 0..=a.iters {
            let opts = ExecOptions {
                timeout,
                trace: a.trace.is_some() && mode == ExecMode::Fused && it == a.iters,
                fault: None,
            };
            let outs = world.run(&inputs, mode, &opts)?;
            for (o, want) in outs.iter().zip(&reference) {
                max_err = max_err.max(max_error(&o.y, want));
            }
            // A call ends when its slowest rank does.
            let slowest = outs
                .iter()
                .map(|o| o.stats.clone())
                .max_by_key(|s| s.total)
                .expect("ranks >= 1");
            if it > 0 {
                eprintln!(
                    "  {:?} iteration {}/{}: {:.2} ms",
                    mode,
                    it,
                    a.iters,
                    ms(slowest.total)
                );
                stats.push(slowest);
            }
            if opts.trace {
                let mut t = Trace::new(outs[0].trace.origin);
                for o in outs {
                    t.extend(o.trace);
                }
                trace = Some(t);
            }
        }
        results.push(ModeResult {
            median: median_stats(stats),
            max_err,
            trace,
        });
    }
    let (fused, base) = (&results[0], &results[1]);

    println!(
        "comet bench — CPU executor, {} {} tokens/rank, {} routing",
        preset.name(),
        a.tokens,
        a.routing
    );
    println!(
        "config: {cfg}; tiles BM {}, {} layer1 chunks of {} columns (cost model)",
        shape.bm, est.chunks, shape.chunk_cols
    );
    println!();
    println!(
        "| phase (slowest rank, median of {}) | fused ms | baseline ms |",
        a.iters
    );
    println!("| --- | ---: | ---: |");
    println!(
        "| count exchange | {:.3} | {:.3} |",
        ms(fused.median.exchange),
        ms(base.median.exchange)
    );
    println!(
        "| layer0: dispatch + FC1/SwiGLU | {:.3} | {:.3} |",
        ms(fused.median.layer0),
        ms(base.median.layer0)
    );
    println!(
        "| layer1: FC2 + combine + reduce | {:.3} | {:.3} |",
        ms(fused.median.layer1),
        ms(base.median.layer1)
    );
    println!(
        "| compute worker blocked on signals | {:.3} | {:.3} |",
        ms(fused.median.waiting),
        ms(base.median.waiting)
    );
    println!(
        "| total | {:.3} | {:.3} |",
        ms(fused.median.total),
        ms(base.median.total)
    );
    println!();
    println!(
        "fused vs baseline: {:.2}x",
        ms(base.median.total) / ms(fused.median.total)
    );
    let verdict = |e: f64| if e < TOLERANCE { "ok" } else { "FAILED" };
    println!(
        "max error vs f64 reference (tolerance {TOLERANCE:e}): fused {:.2e} {}, baseline {:.2e} {}",
        fused.max_err,
        verdict(fused.max_err),
        base.max_err,
        verdict(base.max_err)
    );
    println!(
        "cost model (calibrated: {:.1} GFLOP/s per core, link {:.1} GB/s): predicted baseline {:.3} ms, overlapped {:.3} ms; measured {:.3} / {:.3} ms",
        gflops, dev.link_gbps, est.baseline_ms, est.overlapped_ms, ms(base.median.total), ms(fused.median.total)
    );
    if let (Some(path), Some(t)) = (&a.trace, &fused.trace) {
        let text = serde_json::to_string(&t.to_json())?;
        std::fs::write(path, text).with_context(|| format!("writing trace {}", path.display()))?;
        println!(
            "trace: {} ({} slices; open in ui.perfetto.dev or chrome://tracing)",
            path.display(),
            t.slices.len()
        );
    }
    anyhow::ensure!(
        fused.max_err < TOLERANCE && base.max_err < TOLERANCE,
        "result does not match the reference"
    );
    Ok(())
}
