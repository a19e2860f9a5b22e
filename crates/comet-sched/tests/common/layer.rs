//! One checked call of the ranks a GPU test's world holds (a process's one
//! rank of the staged layer over UCX or the layer over NCCL, or every rank
//! of one process): their inputs for the call (the routing kind and the
//! mode change with it), outputs poisoned, the call run and waited for,
//! each y against the f64 reference on the bf16-rounded weights.

use comet_core::reference::{max_error, moe_layer};
use comet_core::weights::random_tokens;
use comet_core::{Dtype, ExpertWeights, MoeConfig, Routing, RoutingKind};
use comet_sched::device_world::DeviceWorld;
use comet_sched::{ExecMode, RankInput};
use half::bf16;

/// `max |y - ref| / (1 + |ref|)` allowed (bf16 activations and outputs).
pub const TOL: f64 = 2e-2;

fn round(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
}

/// The small layer these tests run over `w` ranks: two experts each, top-2.
pub fn small_cfg(w: usize) -> MoeConfig {
    MoeConfig {
        hidden: 512,
        ffn: 256,
        experts: 2 * w,
        top_k: 2,
        ranks: w,
        dtype: Dtype::Bf16,
    }
}

/// Every rank's experts of `seed`, rounded to bf16 as the GPU gets them.
pub fn rounded_weights(cfg: &MoeConfig, seed: u64) -> ExpertWeights {
    let all = ExpertWeights::all(cfg, seed);
    ExpertWeights {
        fc1: all.fc1.iter().map(|m| round(m)).collect(),
        fc2: all.fc2.iter().map(|m| round(m)).collect(),
        ..all
    }
}

/// Call `call` of the ranks this world holds, `(rank, tokens)` each in
/// the world's order, checked. An error of the layer comes back (naming
/// the call); a wrong y panics.
pub fn checked_call(
    world: &mut DeviceWorld,
    all: &ExpertWeights,
    seed: u64,
    call: u64,
    ranks: &[(usize, usize)],
) -> Result<(), String> {
    let cfg = world.cfg.clone();
    let kinds = [
        RoutingKind::Uniform,
        RoutingKind::Zipf(1.2),
        RoutingKind::AllToOne,
        RoutingKind::SomeEmpty,
        RoutingKind::SilentRank,
    ];
    let kind = kinds[call as usize % kinds.len()];
    let inputs: Vec<RankInput> = ranks
        .iter()
        .map(|&(me, tokens)| {
            let routing = Routing::generate(&cfg, me, tokens, kind, seed ^ (call << 8) ^ me as u64);
            let x = round(&random_tokens(
                routing.tokens,
                cfg.hidden,
                seed + 100 * call + me as u64,
            ));
            RankInput { x, routing }
        })
        .collect();
    let mode = [ExecMode::Fused, ExecMode::Baseline][call as usize % 2];
    world.set_mode(mode);
    world.set_inputs(&inputs).expect("inputs");
    world.poison().expect("poison");
    let what = format!("call {call} {kind:?} {mode:?}");
    world
        .forward()
        .and_then(|_| world.check())
        .map_err(|e| format!("{what}: {e}"))?;
    let ys = world.outputs().expect("download y");
    for ((y, input), &(me, tokens)) in ys.iter().zip(&inputs).zip(ranks) {
        let want = moe_layer(&cfg, &input.x, &input.routing, all).expect("reference");
        let err = max_error(y, &want);
        assert!(err <= TOL, "rank {me} {what} T={tokens}: max error {err}");
    }
    Ok(())
}
