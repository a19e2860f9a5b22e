//! The CPU executor against the f64 reference: every rank count, every
//! preset scaled down, every adversarial routing, random delays, many
//! epochs, and deliberate faults that the checks must catch.

use comet_core::reference::{max_error, moe_layer};
use comet_core::routing::RoutingKind;
use comet_core::schedule::TileShape;
use comet_core::weights::random_tokens;
use comet_core::{ExpertWeights, MoeConfig, Preset, Routing};
use comet_sched::{CpuWorld, ExecMode, ExecOptions, Fault, RankInput, SchedError};
use comet_transport::local::DelayModel;
use comet_transport::TransportError;
use std::time::Duration;

/// Relative tolerance of f32 tile arithmetic against the f64 reference.
const TOL: f64 = 1e-4;

fn inputs(cfg: &MoeConfig, tokens: usize, kind: RoutingKind, seed: u64) -> Vec<RankInput> {
    (0..cfg.ranks)
        .map(|r| {
            let routing = Routing::generate(cfg, r, tokens, kind, seed);
            RankInput {
                x: random_tokens(routing.tokens, cfg.hidden, seed * 131 + r as u64),
                routing,
            }
        })
        .collect()
}

/// Runs one call and returns the worst error over all ranks.
fn run_and_check(
    world: &mut CpuWorld,
    ins: &[RankInput],
    mode: ExecMode,
    opts: &ExecOptions,
    wseed: u64,
) -> Result<f64, SchedError> {
    let cfg = world.cfg.clone();
    let all = ExpertWeights::all(&cfg, wseed);
    let outs = world.run(ins, mode, opts)?;
    let mut worst = 0f64;
    for (inp, out) in ins.iter().zip(&outs) {
        let want = moe_layer(&cfg, &inp.x, &inp.routing, &all).unwrap();
        assert_eq!(out.y.len(), want.len());
        worst = worst.max(max_error(&out.y, &want));
    }
    Ok(worst)
}

fn delays(seed: u64) -> Option<DelayModel> {
    Some(DelayModel {
        seed,
        max: Duration::from_micros(400),
    })
}

fn opts() -> ExecOptions {
    ExecOptions {
        timeout: Duration::from_secs(20),
        ..ExecOptions::default()
    }
}

/// A world of `cfg` for 24 tokens a rank, its transport delayed by a
/// model seeded from the rank count.
fn world_of(cfg: &MoeConfig, shape: TileShape, seed: u64) -> CpuWorld {
    let delay = delays(cfg.ranks as u64);
    CpuWorld::new(cfg, 24, shape, delay, seed, Duration::from_secs(20)).unwrap()
}

/// Every routing kind at `tokens` tokens a rank, both modes, against the
/// reference (inputs seeded from `seed0`, the check from `seed`).
fn every_routing(world: &mut CpuWorld, tokens: usize, seed0: u64, seed: u64, label: &str) {
    let cfg = world.cfg.clone();
    for (i, kind) in [
        RoutingKind::Uniform,
        RoutingKind::Zipf(1.2),
        RoutingKind::AllToOne,
        RoutingKind::SomeEmpty,
        RoutingKind::SilentRank,
    ]
    .into_iter()
    .enumerate()
    {
        let ins = inputs(&cfg, tokens, kind, seed0 + i as u64);
        for mode in [ExecMode::Fused, ExecMode::Baseline] {
            let err = run_and_check(world, &ins, mode, &opts(), seed).unwrap();
            assert!(err < TOL, "{label} {kind:?} {mode:?}: error {err}");
        }
    }
}

#[test]
fn fused_and_baseline_match_reference_for_every_rank_count() {
    for w in 1..=8usize {
        let cfg = MoeConfig {
            hidden: 32,
            ffn: 24,
            experts: 2 * w,
            top_k: 2,
            ranks: w,
            dtype: comet_core::Dtype::Bf16,
        };
        let shape = TileShape {
            bm: 4,
            chunk_cols: 8,
            groups: 1,
        };
        let mut world = world_of(&cfg, shape, 5);
        every_routing(&mut world, 24, 100, 5, &format!("W={w}"));
    }
}

/// Expert groups: layer0 then layer1 group by group, each group's combine
/// pieces on their own; every routing, both modes, several groups of
/// uneven size (3 of 4 local experts: 1, 1, 2).
#[test]
fn expert_groups_match_reference() {
    for (w, epr, groups) in [(2, 4, 3), (3, 2, 2), (4, 4, 4)] {
        let cfg = MoeConfig {
            hidden: 32,
            ffn: 24,
            experts: epr * w,
            top_k: 3,
            ranks: w,
            dtype: comet_core::Dtype::Bf16,
        };
        let shape = TileShape {
            bm: 4,
            chunk_cols: 16,
            groups,
        };
        let mut world = world_of(&cfg, shape, 7);
        every_routing(&mut world, 24, 300, 7, &format!("W={w} groups {groups}"));
    }
    let bad = TileShape {
        bm: 4,
        chunk_cols: 16,
        groups: 5,
    };
    let cfg = Preset::Small.config(2).unwrap();
    let err = CpuWorld::new(&cfg, 8, bad, None, 1, Duration::from_secs(5))
        .err()
        .unwrap();
    assert!(err.to_string().contains("expert groups"), "{err}");
}

#[test]
fn presets_scaled_down_match_reference() {
    for p in Preset::ALL {
        let full = p.config(4).unwrap();
        let factor = (full.hidden / 32).max(1);
        let cfg = full.scaled_down(factor);
        let chunk = cfg.hidden / 4;
        let shape = TileShape {
            bm: 8,
            chunk_cols: chunk,
            groups: 1,
        };
        let mut world =
            CpuWorld::new(&cfg, 16, shape, delays(3), 9, Duration::from_secs(20)).unwrap();
        let ins = inputs(&cfg, 16, RoutingKind::Uniform, 4);
        let err = run_and_check(&mut world, &ins, ExecMode::Fused, &opts(), 9).unwrap();
        assert!(err < TOL, "{}: error {err}", p.name());
    }
}

#[test]
fn epochs_are_reused_without_resetting_buffers() {
    let cfg = Preset::Small.config(4).unwrap().scaled_down(8);
    let shape = TileShape {
        bm: 5,
        chunk_cols: 8,
        groups: 1,
    };
    let mut world = CpuWorld::new(&cfg, 20, shape, delays(11), 1, Duration::from_secs(20)).unwrap();
    for call in 0..30u64 {
        // Token counts and routing change every call, so stale rows would show.
        let kind = [
            RoutingKind::Uniform,
            RoutingKind::AllToOne,
            RoutingKind::SilentRank,
        ][call as usize % 3];
        let ins = inputs(&cfg, 5 + (call as usize * 7) % 16, kind, call);
        let mode = if call % 4 == 3 {
            ExecMode::Baseline
        } else {
            ExecMode::Fused
        };
        let err = run_and_check(&mut world, &ins, mode, &opts(), 1).unwrap();
        assert!(err < TOL, "call {call}: error {err}");
    }
}

/// Proves the checks above can fail: a schedule whose layer0 tiles skip
/// their dependency waits computes on rows that have not landed yet.
#[test]
fn a_broken_dependency_set_is_caught() {
    let cfg = MoeConfig {
        hidden: 16,
        ffn: 16,
        experts: 4,
        top_k: 2,
        ranks: 2,
        dtype: comet_core::Dtype::Bf16,
    };
    let shape = TileShape {
        bm: 4,
        chunk_cols: 8,
        groups: 1,
    };
    // Remote puts are delayed far beyond a tile's compute time.
    let slow = Some(DelayModel {
        seed: 1,
        max: Duration::from_millis(60),
    });
    for fault in [Fault::DropLayer0Deps, Fault::SkipCombineWaits] {
        let mut world = CpuWorld::new(&cfg, 32, shape, slow, 2, Duration::from_secs(20)).unwrap();
        let ins = inputs(&cfg, 32, RoutingKind::Uniform, 3);
        let bad = ExecOptions {
            fault: Some(fault),
            ..opts()
        };
        let err = run_and_check(&mut world, &ins, ExecMode::Fused, &bad, 2).unwrap();
        assert!(err > TOL, "{fault:?} went unnoticed (error {err})");
    }
}

#[test]
fn bad_inputs_are_clear_errors() {
    let cfg = Preset::Small.config(2).unwrap().scaled_down(8);
    let shape = TileShape {
        bm: 4,
        chunk_cols: 8,
        groups: 1,
    };
    let mut world = CpuWorld::new(&cfg, 8, shape, None, 1, Duration::from_secs(5)).unwrap();
    let mut ins = inputs(&cfg, 8, RoutingKind::Uniform, 1);
    ins[1].x.pop();
    let e = world.run(&ins, ExecMode::Fused, &opts()).unwrap_err();
    assert!(e.to_string().contains("rank 1"), "{e}");
    let too_many = inputs(&cfg, 9, RoutingKind::Uniform, 1);
    assert!(matches!(
        world.run(&too_many, ExecMode::Fused, &opts()),
        Err(SchedError::Capacity { .. })
    ));
    assert!(CpuWorld::new(
        &cfg,
        8,
        TileShape {
            bm: 4,
            chunk_cols: 7,
            groups: 1
        },
        None,
        1,
        Duration::from_secs(1)
    )
    .is_err());
}

#[test]
fn a_vanished_peer_is_an_error_not_a_hang() {
    let cfg = Preset::Small.config(4).unwrap().scaled_down(8);
    let shape = TileShape {
        bm: 4,
        chunk_cols: 8,
        groups: 1,
    };
    let mut world = CpuWorld::new(&cfg, 8, shape, None, 1, Duration::from_secs(5)).unwrap();
    world.rank(2).transport().kill();
    let ins = inputs(&cfg, 8, RoutingKind::Uniform, 1);
    let short = ExecOptions {
        timeout: Duration::from_millis(500),
        ..ExecOptions::default()
    };
    let e = world.run(&ins, ExecMode::Fused, &short).unwrap_err();
    assert!(
        matches!(
            e,
            SchedError::Transport(TransportError::PeerGone { peer: 2, .. })
        ),
        "{e}"
    );
}

mod props {
    use super::*;
    use proptest::prelude::*;

    fn kind_strategy() -> impl Strategy<Value = RoutingKind> {
        prop_oneof![
            Just(RoutingKind::Uniform),
            (0.5f64..2.0).prop_map(RoutingKind::Zipf),
            Just(RoutingKind::AllToOne),
            Just(RoutingKind::SomeEmpty),
            Just(RoutingKind::SilentRank),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
        #[test]
        fn fused_layer_equals_reference(
            w in 1usize..=6,
            epr in 1usize..=3,
            k_raw in 1usize..=4,
            h_mult in 1usize..=4,
            ffn in 4usize..=20,
            chunks_pow in 0u32..=2,
            groups_raw in 1usize..=3,
            bm in 1usize..=9,
            tokens in 0usize..=12,
            kind in kind_strategy(),
            seed in any::<u64>(),
        ) {
            let experts = w * epr;
            let top_k = k_raw.min(experts);
            let hidden = 8 * h_mult;
            let chunk_cols = hidden / (1usize << chunks_pow).min(hidden / 8 * 8).max(1);
            let chunk_cols = if hidden % chunk_cols == 0 { chunk_cols } else { hidden };
            let cfg = MoeConfig { hidden, ffn, experts, top_k, ranks: w, dtype: comet_core::Dtype::Bf16 };
            let shape = TileShape { bm, chunk_cols, groups: groups_raw.min(epr) };
            let mut world = CpuWorld::new(&cfg, tokens.max(1), shape, Some(DelayModel { seed, max: Duration::from_micros(150) }), seed, Duration::from_secs(20)).unwrap();
            let ins = inputs(&cfg, tokens, kind, seed % 1000);
            let err = run_and_check(&mut world, &ins, ExecMode::Fused, &opts(), seed).unwrap();
            prop_assert!(err < TOL, "error {}", err);
        }
    }
}
