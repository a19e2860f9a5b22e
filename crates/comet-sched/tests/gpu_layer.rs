//! The GPU executor against the f64 reference: W = 1, 2, 4 ranks as
//! threads sharing one GPU (so this proves the protocol on the real
//! kernels, not link speed), fused and baseline, uniform, all-to-one and
//! silent-rank routing, several epochs on the same buffers, outputs
//! poisoned (NaN) before every call.
//!
//! The reference is `comet_core::reference::moe_layer` computed from the
//! bf16-rounded x and weights the GPU gets; the GPU also rounds the FC1
//! activations and the FC2 outputs to bf16 (f32 accumulation), so the
//! tolerance is `max |y - ref| / (1 + |ref|) <= 2e-2`.
//!
//! `#[ignore]`: run on a GPU machine with
//! `cargo test -p comet-sched --features gpu --test gpu_layer -- --ignored`.
#![cfg(feature = "gpu")]

use comet_core::reference::{max_error, moe_layer};
use comet_core::schedule::TileShape;
use comet_core::weights::random_tokens;
use comet_core::{Dtype, ExpertWeights, MoeConfig, Routing, RoutingKind};
use comet_sched::gpu::{GpuExecOptions, GpuWorld};
use comet_sched::{ExecMode, RankInput, SchedError};
use comet_transport::cuda;
use half::bf16;
use std::time::Duration;

const TOL: f64 = 2e-2;

fn round(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
}

fn rounded(w: &ExpertWeights) -> ExpertWeights {
    ExpertWeights {
        hidden: w.hidden,
        ffn: w.ffn,
        experts: w.experts.clone(),
        fc1: w.fc1.iter().map(|m| round(m)).collect(),
        fc2: w.fc2.iter().map(|m| round(m)).collect(),
    }
}

fn check(w: usize, ffn: usize, experts: usize, kind: RoutingKind, max_tokens: usize) {
    let cfg = MoeConfig {
        hidden: 512,
        ffn,
        experts,
        top_k: 2,
        ranks: w,
        dtype: Dtype::Bf16,
    };
    let seed = 0xC0FE + w as u64;
    let shape = TileShape {
        bm: 128,
        chunk_cols: 256,
    };
    let ordinals = vec![0; w];
    let weights = |r: usize| ExpertWeights::for_rank(&cfg, r, seed);
    let mut world = GpuWorld::new(
        &cfg,
        &ordinals,
        max_tokens,
        shape,
        &weights,
        Duration::from_secs(20),
    )
    .unwrap_or_else(|e| panic!("setup W={w}: {e}"));
    let all = rounded(&ExpertWeights::all(&cfg, seed));
    let opts = GpuExecOptions {
        timeout: Duration::from_secs(20),
        poison: true,
    };
    for epoch in 0..3u64 {
        let inputs: Vec<RankInput> = (0..w)
            .map(|r| {
                let tokens = (max_tokens - 37 * r - 11 * epoch as usize).max(1);
                let routing =
                    Routing::generate(&cfg, r, tokens, kind, seed ^ (epoch << 8) ^ r as u64);
                let x = round(&random_tokens(
                    routing.tokens,
                    cfg.hidden,
                    seed + 100 * epoch + r as u64,
                ));
                RankInput { x, routing }
            })
            .collect();
        let reference: Vec<Vec<f64>> = inputs
            .iter()
            .map(|inp| moe_layer(&cfg, &inp.x, &inp.routing, &all).unwrap())
            .collect();
        for mode in [ExecMode::Fused, ExecMode::Baseline] {
            let outs = world
                .run(&inputs, mode, &opts)
                .unwrap_or_else(|e| panic!("W={w} {kind:?} epoch {epoch} {mode:?}: {e}"));
            for (r, ((o, inp), want)) in outs.iter().zip(&inputs).zip(&reference).enumerate() {
                assert_eq!(o.y.len(), want.len());
                let err = max_error(&o.y, want);
                eprintln!(
                    "W={w} F={ffn} E={experts} {kind:?} epoch {epoch} {mode:?} rank {r}: tokens {} rows recv {} max err {err:.2e}",
                    inp.routing.tokens, o.stats.rows_received
                );
                assert!(
                    err <= TOL,
                    "W={w} {kind:?} epoch {epoch} {mode:?} rank {r}: max error {err} > {TOL}"
                );
            }
        }
    }
}

fn no_gpu() -> bool {
    if cuda::gpu_available() {
        return false;
    }
    eprintln!("skipped: no CUDA driver or device on this machine");
    true
}

#[test]
#[ignore = "needs a GPU"]
fn gpu_layer_matches_reference() {
    if no_gpu() {
        return;
    }
    check(1, 256, 4, RoutingKind::Uniform, 200);
    for kind in [
        RoutingKind::Uniform,
        RoutingKind::AllToOne,
        RoutingKind::SilentRank,
    ] {
        check(2, 512, 4, kind, 256);
        check(4, 256, 8, kind, 160);
    }
    check(2, 1024, 8, RoutingKind::Uniform, 512);
}

#[test]
#[ignore = "needs a GPU"]
fn gpu_layer_rejects_bad_shapes() {
    if no_gpu() {
        return;
    }
    let cfg = MoeConfig {
        hidden: 512,
        ffn: 256,
        experts: 2,
        top_k: 1,
        ranks: 1,
        dtype: Dtype::Bf16,
    };
    let weights = |r: usize| ExpertWeights::for_rank(&cfg, r, 1);
    // A chunk narrower than the FC2 kernel's tile is refused up front.
    let e = GpuWorld::new(
        &cfg,
        &[0],
        64,
        TileShape {
            bm: 128,
            chunk_cols: 128,
        },
        &weights,
        Duration::from_secs(10),
    )
    .map(|_| ())
    .unwrap_err();
    assert!(matches!(e, SchedError::Input { .. }), "{e}");
    assert!(e.to_string().contains("chunk width"), "{e}");
}
