//! `comet bench --gpu`: the MoE layer on the GPU executor of comet-sched,
//! fused vs non-overlapped side by side, for one preset or all three large
//! ones (`--preset all`). All W ranks are threads sharing GPU 0, so the
//! "link" is device memory and the ranks compete for the SMs: this proves
//! the protocol on the real kernels, not link speed.
//!
//! The error is checked against the f64 reference (bf16-rounded inputs and
//! weights) on the first few tokens of every rank: the full reference of
//! a large preset would take minutes on the CPU.

use crate::layer::LayerArgs;
use anyhow::{Context, Result};
use comet_core::reference::{max_error, moe_layer};
use comet_core::schedule::TileShape;
use comet_core::weights::random_tokens;
use comet_core::{ExpertWeights, MoeConfig, Preset, Routing, RoutingKind};
use comet_sched::gpu::{chunk_cols_for, GpuExecOptions, GpuWorld};
use comet_sched::{ExecMode, RankInput};
use std::time::Duration;

/// bf16 activations and FC2 outputs, f32 accumulation.
const TOLERANCE: f64 = 2e-2;
/// Tokens per rank checked against the f64 reference.
const CHECKED_TOKENS: usize = 4;

fn round_bf16(v: &[f32]) -> Vec<f32> {
    // Round to nearest even on the upper 16 bits, as half::bf16 does.
    v.iter()
        .map(|&x| {
            let b = x.to_bits();
            let r = b.wrapping_add(0x7FFF + ((b >> 16) & 1)) & 0xFFFF_0000;
            if x.is_nan() {
                x
            } else {
                f32::from_bits(r)
            }
        })
        .collect()
}

/// Every expert of the model, generated in parallel (one thread per expert).
fn all_weights(cfg: &MoeConfig, seed: u64) -> ExpertWeights {
    let per: Vec<ExpertWeights> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..cfg.experts)
            .map(|e| s.spawn(move || ExpertWeights::generate(cfg, vec![e], seed)))
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("weight generation"))
            .collect()
    });
    let mut all = ExpertWeights {
        hidden: cfg.hidden,
        ffn: cfg.ffn,
        experts: (0..cfg.experts).collect(),
        fc1: Vec::with_capacity(cfg.experts),
        fc2: Vec::with_capacity(cfg.experts),
    };
    for mut w in per {
        all.fc1.push(w.fc1.pop().expect("one expert"));
        all.fc2.push(w.fc2.pop().expect("one expert"));
    }
    all
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

struct Row {
    preset: &'static str,
    chunks: usize,
    fused_ms: f64,
    base_ms: f64,
    fused_dev_ms: f64,
    base_dev_ms: f64,
    err_fused: f64,
    err_base: f64,
    max_diff: f64,
}

fn bench_one(preset: Preset, a: &LayerArgs, kind: RoutingKind) -> Result<Row> {
    let cfg = preset
        .config(a.ranks)
        .with_context(|| format!("preset {} over {} ranks", preset.name(), a.ranks))?
        .scaled_down(a.scale_down);
    let out_cols = 256; // the sm90 FC2 tile; sm80's 128 divides it
    let chunk_cols = chunk_cols_for(cfg.hidden, out_cols)
        .with_context(|| format!("no chunk width for hidden {}", cfg.hidden))?;
    let shape = TileShape {
        bm: 128,
        chunk_cols,
    };
    let timeout = Duration::from_secs(a.timeout_s);
    eprintln!(
        "comet bench --gpu: {} ({cfg}), {} ranks on GPU 0, {} tokens/rank, generating weights",
        preset.name(),
        cfg.ranks,
        a.tokens
    );
    let mut all = all_weights(&cfg, a.seed);
    let epr = cfg.experts_per_rank();
    let weights = |r: usize| ExpertWeights {
        hidden: cfg.hidden,
        ffn: cfg.ffn,
        experts: (r * epr..(r + 1) * epr).collect(),
        fc1: all.fc1[r * epr..(r + 1) * epr].to_vec(),
        fc2: all.fc2[r * epr..(r + 1) * epr].to_vec(),
    };
    let mut world = GpuWorld::new(
        &cfg,
        &vec![0; cfg.ranks],
        a.tokens,
        shape,
        &weights,
        timeout,
    )?;
    let inputs: Vec<RankInput> = (0..cfg.ranks)
        .map(|r| {
            let routing = Routing::generate(&cfg, r, a.tokens, kind, a.seed);
            RankInput {
                x: round_bf16(&random_tokens(
                    routing.tokens,
                    cfg.hidden,
                    a.seed * 7919 + r as u64,
                )),
                routing,
            }
        })
        .collect();
    // Reference on the first tokens of each rank, from bf16-rounded weights.
    for m in all.fc1.iter_mut().chain(all.fc2.iter_mut()) {
        *m = round_bf16(m);
    }
    let h = cfg.hidden;
    let reference: Vec<(usize, Vec<f64>)> = std::thread::scope(|s| {
        let hs: Vec<_> = inputs
            .iter()
            .map(|inp| {
                let all = &all;
                let cfg = &cfg;
                s.spawn(move || {
                    let n = inp.routing.tokens.min(CHECKED_TOKENS);
                    let k = cfg.top_k;
                    let part = Routing {
                        tokens: n,
                        top_k: k,
                        ids: inp.routing.ids[..n * k].to_vec(),
                        weights: inp.routing.weights[..n * k].to_vec(),
                    };
                    moe_layer(cfg, &inp.x[..n * h], &part, all).map(|y| (n, y))
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("reference thread"))
            .collect::<Result<Vec<_>, _>>()
    })?;
    drop(all);
    let opts = GpuExecOptions {
        timeout,
        poison: false,
    };
    let mut times = [Vec::new(), Vec::new()];
    let mut dev_times = [Vec::new(), Vec::new()];
    let mut errs = [0f64; 2];
    let mut last: [Vec<Vec<f32>>; 2] = [Vec::new(), Vec::new()];
    // Alternate the modes so drift (clocks, temperature) hits both alike.
    for it in 0..=a.iters {
        for (m, mode) in [ExecMode::Fused, ExecMode::Baseline]
            .into_iter()
            .enumerate()
        {
            let outs = world.run(&inputs, mode, &opts)?;
            for (o, (n, want)) in outs.iter().zip(&reference) {
                errs[m] = errs[m].max(max_error(&o.y[..n * h], want));
            }
            let slowest = outs
                .iter()
                .map(|o| o.stats.total)
                .max()
                .expect("ranks >= 1");
            let slowest_dev = outs
                .iter()
                .map(|o| o.stats.device)
                .max()
                .expect("ranks >= 1");
            if it > 0 {
                times[m].push(slowest);
                dev_times[m].push(slowest_dev);
            }
            last[m] = outs.into_iter().map(|o| o.y).collect();
        }
    }
    let max_diff = last[0]
        .iter()
        .zip(&last[1])
        .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs() as f64))
        .fold(0f64, f64::max);
    let med = |v: &mut Vec<Duration>| {
        v.sort();
        ms(v[v.len() / 2])
    };
    let [mut tf, mut tb] = times;
    let [mut df, mut db] = dev_times;
    Ok(Row {
        preset: preset.name(),
        chunks: cfg.hidden / chunk_cols,
        fused_ms: med(&mut tf),
        base_ms: med(&mut tb),
        fused_dev_ms: med(&mut df),
        base_dev_ms: med(&mut db),
        err_fused: errs[0],
        err_base: errs[1],
        max_diff,
    })
}

/// Runs `comet bench --gpu` with the layer arguments.
pub fn run(a: &LayerArgs) -> Result<()> {
    anyhow::ensure!(a.iters >= 1, "--iters must be at least 1");
    let kind: RoutingKind = a.routing.parse()?;
    let presets: Vec<Preset> = if a.preset == "all" {
        vec![Preset::Mixtral8x7b, Preset::Qwen2Moe, Preset::Phi35Moe]
    } else {
        vec![a.preset.parse()?]
    };
    let mut rows = Vec::new();
    for p in presets {
        rows.push(bench_one(p, a, kind)?);
    }
    println!(
        "comet bench --gpu: {} ranks as threads sharing GPU 0 (the link is device memory, \
         ranks compete for the SMs: protocol on real kernels, not link speed); {} tokens/rank, \
         {} routing, median of {} calls of the slowest rank. \"layer\": first dispatch put to both streams done; \
         \"call\": whole call incl. count exchange, host bf16 staging, uploads and y download",
        a.ranks, a.tokens, a.routing, a.iters
    );
    println!();
    println!("| preset | chunks | layer fused ms | layer baseline ms | baseline/fused | call fused ms | call baseline ms | max err fused | max err baseline | max abs fused-baseline |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in &rows {
        println!(
            "| {} | {} | {:.3} | {:.3} | {:.2}x | {:.3} | {:.3} | {:.2e} | {:.2e} | {:.2e} |",
            r.preset,
            r.chunks,
            r.fused_dev_ms,
            r.base_dev_ms,
            r.base_dev_ms / r.fused_dev_ms,
            r.fused_ms,
            r.base_ms,
            r.err_fused,
            r.err_base,
            r.max_diff
        );
    }
    println!();
    println!(
        "error: max |y - ref| / (1 + |ref|) over the first {CHECKED_TOKENS} tokens of every rank, tolerance {TOLERANCE:e}"
    );
    anyhow::ensure!(
        rows.iter()
            .all(|r| r.err_fused <= TOLERANCE && r.err_base <= TOLERANCE),
        "result does not match the reference"
    );
    Ok(())
}
