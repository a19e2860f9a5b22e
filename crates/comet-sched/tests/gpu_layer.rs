//! The device forward (`MoeLayer`) against the f64 reference: W = 1, 2, 4
//! ranks as threads on the visible GPUs, rank r on GPU r mod their count
//! (with one GPU, all sharing it: the protocol on the real kernels, not
//! link speed; with several, each rank storing into its peers' GPUs), fused and non-overlapped, every routing kind, T = 0, 1 and
//! the capacity, 30 calls on the same buffers with changing routing and T,
//! a CUDA graph captured once and replayed with new routing written into
//! the same input buffers, and the bad inputs (T over capacity, expert ids
//! out of range or negative, rows over a receive capacity). Receive,
//! activation, FC2 output and y buffers are poisoned (NaN) before every
//! checked call.
//!
//! The reference is `comet_core::reference::moe_layer` on the bf16-rounded
//! x and weights the GPU gets; the GPU also rounds the FC1 activations, the
//! FC2 outputs and y to bf16 (f32 accumulation), so the tolerance is
//! `max |y - ref| / (1 + |ref|) <= 2e-2`.
//!
//! The same checks run over the staged path (`DeviceWorld::staged`: the
//! kernels over local mirrors and ready words, a proxy thread per rank
//! carrying the bytes through host memory over the local transport, which
//! is how UCX and NCCL put the layer across nodes).
//!
//! `#[ignore]`: run on a GPU machine with
//! `cargo test -p comet-sched --features gpu --test gpu_layer -- --ignored --test-threads=1`.
#![cfg(feature = "gpu")]

use comet_core::cost::{CostModel, DeviceFigures};
use comet_core::layout::{ring_source, LayoutPlan};
use comet_core::reference::{max_error, moe_layer};
use comet_core::weights::random_tokens;
use comet_core::{Dtype, ExpertWeights, MoeConfig, Routing, RoutingKind};
use comet_kernels::KernelError;
use comet_sched::device_world::{visible_placement, DeviceWorld, WorldWeights};
use comet_sched::forward::LayerOptions;
use comet_sched::proxy_plan::WireFormat;
use comet_sched::{ExecMode, RankInput, SchedError};
use comet_transport::local::DelayModel;
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

fn cfg(w: usize, ffn: usize, experts: usize, top_k: usize) -> MoeConfig {
    MoeConfig {
        hidden: 512,
        ..cfg_wide(w, ffn, experts, top_k)
    }
}

/// Hidden 2304 (nine FC2 column tiles of 256) and, with `ffn` 1152, nine
/// FC1 column tiles of 128: more than one raster group of 8 (the device
/// tile lists' column groups), the last one partial.
fn cfg_wide(w: usize, ffn: usize, experts: usize, top_k: usize) -> MoeConfig {
    MoeConfig {
        hidden: 2304,
        ffn,
        experts,
        top_k,
        ranks: w,
        dtype: Dtype::Bf16,
    }
}

/// Figures of a link whose transfers take about half the GEMM time, so the
/// cost model overlaps these small layers (W > 1) in two chunks: the
/// overlapped path is what the fused mode must prove here.
fn opts(cfg: &MoeConfig, capacity: usize) -> LayerOptions {
    let mut dev = DeviceFigures::h200_nvlink();
    dev.link_latency_us = 0.0;
    dev.chunk_overhead_us = 0.0;
    let mut scaled = dev.clone();
    scaled.gemm_tflops *= (132 / cfg.ranks) as f64 / dev.sms as f64;
    scaled.sms = 132 / cfg.ranks;
    let probe = CostModel::estimate(cfg, capacity, &scaled);
    dev.link_gbps *= probe.dispatch_ms.max(1e-9) / (probe.gemm_ms / 2.0);
    LayerOptions {
        timeout: Duration::from_secs(10),
        figures: Some(dev),
        ..LayerOptions::default()
    }
}

/// The premise of the GPU tests with several ranks, on CPU: with the
/// figures the harness gives, and behind a proxy the layer's own
/// adjustments (the proxy's cost form, its wire, the SMs its kernels
/// keep), every shape the tests build overlaps in more than one chunk,
/// on several communication blocks (the Hopper GEMMs' side warps too);
/// with the plain figures of `inside_opts` they move their rows in the
/// Hopper GEMMs' side warps instead, in more than one chunk.
#[test]
fn test_shapes_overlap_in_several_chunks() {
    use comet_sched::device_plan::DevicePlan;
    use comet_sched::forward::kernel_tiles_for;
    use comet_sched::proxy_plan::PROXY_KERNEL_SMS;
    let (tokens, rows) = (Some(WireFormat::Tokens), Some(WireFormat::Rows));
    // (W, ffn, experts, top-k, capacity, the wire behind a proxy or None).
    let shapes = [
        (2, 512, 4, 2, 256, None),
        (4, 256, 8, 3, 160, None),
        (2, 256, 16, 11, 96, None),
        (2, 256, 8, 2, 256, None),
        (2, 256, 8, 2, 128, None),
        (2, 256, 4, 2, 64, None),
        (2, 256, 4, 2, 32, None),
        (2, 256, 4, 2, 128, None),
        (2, 256, 8, 2, 96, None),
        (4, 256, 8, 2, 96, None),
        (2, 512, 4, 2, 256, tokens),
        (4, 256, 8, 3, 160, tokens),
        (3, 256, 6, 2, 200, tokens),
        (3, 256, 6, 2, 200, rows),
        (2, 256, 4, 2, 64, tokens),
        (2, 256, 4, 2, 32, tokens),
        (2, 256, 4, 2, 128, tokens),
    ];
    for (w, ffn, experts, k, cap) in INSIDE_SHAPES {
        let c = cfg(w, ffn, experts, k);
        let tiles = kernel_tiles_for(comet_kernels::Family::SM90_TMA);
        // Over nvlink; behind a proxy of either wire (as the staged
        // harness makes its figures) the same shapes run in sequence.
        for wire in [None, tokens, rows] {
            let o = if wire.is_some() {
                behind_a_proxy(inside_opts())
            } else {
                inside_opts()
            };
            let mut figures = o.figures.expect("figures");
            let mut reserved = 0;
            if let Some(wire) = wire {
                (figures.proxy, figures.wire) = (true, wire);
                reserved = PROXY_KERNEL_SMS * w;
            }
            let plan = DevicePlan::new(&c, cap, None, 132 - reserved, w, tiles, &figures).unwrap();
            assert!(!plan.overlap, "{c} {wire:?}: {plan:?}");
            match wire {
                None => assert!(plan.side_warps && plan.chunks > 1, "{c}: {plan:?}"),
                Some(_) => assert!(
                    !plan.side_warps && plan.chunks == 1,
                    "{c} {wire:?}: {plan:?}"
                ),
            }
        }
    }
    for (w, ffn, experts, k, cap, staged) in shapes {
        let c = cfg(w, ffn, experts, k);
        let mut o = opts(&c, cap);
        if staged.is_some() {
            o = behind_a_proxy(o);
        }
        let mut figures = o.figures.expect("figures");
        let mut reserved = 0;
        if let Some(wire) = staged {
            (figures.proxy, figures.wire) = (true, wire);
            reserved = PROXY_KERNEL_SMS * w;
        }
        for family in [comet_kernels::Family::SM90_TMA, comet_kernels::Family::Sm80] {
            let tiles = kernel_tiles_for(family);
            let plan = DevicePlan::new(&c, cap, None, 132 - reserved, w, tiles, &figures).unwrap();
            assert!(plan.overlap && plan.chunks > 1, "{c} {staged:?}: {plan:?}");
            assert!(
                !plan.side_warps && plan.comm_blocks > 1,
                "several blocks share the segments: {plan:?}"
            );
        }
    }
}

/// The H200 figures as they are: for the test shapes the model sees no
/// link worth overlapping, so ranks move their rows in the Hopper GEMMs'
/// side warps (FC1 the dispatch, FC2 the combine).
fn inside_opts() -> LayerOptions {
    LayerOptions {
        timeout: Duration::from_secs(10),
        figures: Some(DeviceFigures::h200_nvlink()),
        ..LayerOptions::default()
    }
}

/// (W, ffn, experts, top-k, capacity) of `ranks_move_their_rows_inside_the_gemms`.
const INSIDE_SHAPES: [(usize, usize, usize, usize, usize); 3] = [
    (2, 512, 4, 2, 256),
    (4, 256, 8, 3, 160),
    (2, 256, 16, 11, 96),
];

/// The harness's figures for a staged world: behind a proxy the blocks
/// also copy every row into the mirrors, and at a real block's rate those
/// copies alone would outlast these toy layers' GEMMs (the model would run
/// them in sequence), so here they copy fast enough not to count.
fn behind_a_proxy(mut o: LayerOptions) -> LayerOptions {
    if let Some(f) = o.figures.as_mut() {
        f.block_gbps = 1e4;
    }
    o
}

struct Harness {
    world: DeviceWorld,
    all: ExpertWeights,
    seed: u64,
}

impl Harness {
    fn new(cfg: &MoeConfig, capacity: usize, o: &LayerOptions) -> Harness {
        Self::build(cfg, capacity, o, false)
    }

    /// Every rank staged through host memory by its proxy.
    fn staged(cfg: &MoeConfig, capacity: usize, o: &LayerOptions) -> Harness {
        Self::build(cfg, capacity, o, true)
    }

    fn build(cfg: &MoeConfig, capacity: usize, o: &LayerOptions, staged: bool) -> Harness {
        Self::world(cfg, capacity, o, staged.then_some(None))
    }

    /// `staged`: `None` over nvlink, else staged with the transport's puts
    /// and signals delayed by this model (or not at all).
    fn world(
        cfg: &MoeConfig,
        capacity: usize,
        o: &LayerOptions,
        staged: Option<Option<DelayModel>>,
    ) -> Harness {
        // RUST_LOG=comet_sched=debug shows what the proxies move.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let seed = 0xC0FE + cfg.ranks as u64;
        let weights = |r: usize| ExpertWeights::for_rank(cfg, r, seed);
        // One GPU: every rank on it; several: ranks on their own GPUs,
        // storing into each other's over NVLink.
        let (ordinals, w) = (visible_placement(cfg.ranks), WorldWeights::Host(&weights));
        let proxied = behind_a_proxy(o.clone());
        let world = match staged {
            Some(delay) => DeviceWorld::staged(cfg, &ordinals, capacity, w, &proxied, delay),
            None => DeviceWorld::new(cfg, &ordinals, capacity, w, o),
        }
        .unwrap_or_else(|e| panic!("setup {cfg} (staged: {staged:?}): {e}"));
        let plan = world.ranks()[0].layer.plan();
        eprintln!("{cfg}: {}", plan.describe());
        // A fused call overlaps, on blocks or in the side warps; where the
        // GEMMs have none (sm80), the figures that would take them run in
        // sequence.
        let in_sequence = !plan.overlap && !plan.tiles.side_warps;
        if cfg.ranks > 1 && o.recv_capacity.is_none() && !in_sequence {
            assert!(
                (plan.overlap || plan.side_warps) && plan.chunks > 1,
                "the fused mode must overlap, on blocks or in the side warps: {plan:?}"
            );
        }
        Harness {
            world,
            all: rounded(&ExpertWeights::all(cfg, seed)),
            seed,
        }
    }

    fn inputs(&self, tokens: &[usize], kind: RoutingKind, call: u64) -> Vec<RankInput> {
        let cfg = &self.world.cfg;
        tokens
            .iter()
            .enumerate()
            .map(|(r, &t)| {
                let routing =
                    Routing::generate(cfg, r, t, kind, self.seed ^ (call << 8) ^ r as u64);
                let x = round(&random_tokens(
                    routing.tokens,
                    cfg.hidden,
                    self.seed + 100 * call + r as u64,
                ));
                RankInput { x, routing }
            })
            .collect()
    }

    /// Poisons, runs one call of every rank and checks every y.
    fn call(&mut self, inputs: &[RankInput], mode: ExecMode, label: &str) {
        self.world.set_mode(mode);
        self.world.set_inputs(inputs).unwrap();
        self.world.poison().unwrap();
        self.world
            .forward()
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        let infos = self
            .world
            .check()
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        self.compare(inputs, label, &infos);
    }

    fn compare(&self, inputs: &[RankInput], label: &str, infos: &[comet_sched::forward::CallInfo]) {
        let outs = self.world.outputs().unwrap();
        self.compare_outputs(&outs, inputs, label, infos);
    }

    fn compare_outputs(
        &self,
        outs: &[Vec<f32>],
        inputs: &[RankInput],
        label: &str,
        infos: &[comet_sched::forward::CallInfo],
    ) {
        let cfg = &self.world.cfg;
        for (r, (y, inp)) in outs.iter().zip(inputs).enumerate() {
            let want = moe_layer(cfg, &inp.x, &inp.routing, &self.all).unwrap();
            let err = max_error(y, &want);
            assert!(
                err <= TOL,
                "{label} rank {r}: tokens {} max error {err} > {TOL} ({:?})",
                inp.routing.tokens,
                infos.get(r)
            );
        }
    }
}

fn modes() -> [ExecMode; 2] {
    [ExecMode::Fused, ExecMode::Baseline]
}

fn routings() -> [RoutingKind; 5] {
    [
        RoutingKind::Uniform,
        RoutingKind::Zipf(1.2),
        RoutingKind::AllToOne,
        RoutingKind::SomeEmpty,
        RoutingKind::SilentRank,
    ]
}

/// Every routing kind at T = 0, 1, the capacity and below it, both modes,
/// on each (ranks, ffn, experts, top-k, capacity) of `shapes`.
/// `inside`: the plain figures, where ranks move their rows in the
/// GEMMs' side warps (else the harness's, overlapping on blocks).
fn every_routing(staged: bool, inside: bool, shapes: &[(usize, usize, usize, usize, usize)]) {
    for &(w, ffn, experts, k, cap) in shapes {
        let c = cfg(w, ffn, experts, k);
        let o = if inside { inside_opts() } else { opts(&c, cap) };
        let mut h = Harness::build(&c, cap, &o, staged);
        let plan = h.world.ranks()[0].layer.plan();
        assert!(w == 1 || plan.overlap != inside, "{plan:?}");
        // The GEMMs' side warps wherever these GEMMs have them.
        assert!(
            !inside || plan.side_warps == plan.tiles.side_warps,
            "{plan:?}"
        );
        for (i, kind) in routings().into_iter().enumerate() {
            for tokens in [0, 1, cap, cap - 37] {
                let toks: Vec<usize> = (0..w).map(|r| tokens.saturating_sub(r * 3)).collect();
                let inputs = h.inputs(&toks, kind, (i * 10 + tokens) as u64);
                for mode in modes() {
                    let label = format!(
                        "staged {staged} inside {inside} W={w} {kind:?} T={tokens} {mode:?}"
                    );
                    h.call(&inputs, mode, &label);
                }
            }
        }
    }
}

/// Each rank's tokens of call `call` of a run of changing T: 1 to `cap`.
fn changing_tokens(call: u64, w: usize, cap: usize) -> Vec<usize> {
    (0..w)
        .map(|r| 1 + ((call as usize * 53 + r * 97) % cap))
        .collect()
}

/// 30 calls on the same buffers with changing routing, T and mode; staged
/// ranks' transport delays every put and signal by up to 300 us, and their
/// proxies send dispatch rows as `wire` says.
fn thirty_calls(staged: bool, w: usize, experts: usize, cap: usize, wire: WireFormat) {
    let c = cfg(w, 256, experts, 2);
    let delay = DelayModel {
        seed: 11,
        max: Duration::from_micros(300),
    };
    let o = LayerOptions {
        wire_format: wire,
        ..opts(&c, cap)
    };
    let mut h = Harness::world(&c, cap, &o, staged.then_some(Some(delay)));
    for call in 0..30u64 {
        let toks = changing_tokens(call, w, cap);
        let kind = routings()[call as usize % 5];
        let inputs = h.inputs(&toks, kind, 1000 + call);
        let mode = modes()[call as usize % 2];
        h.call(
            &inputs,
            mode,
            &format!("staged {staged} {wire:?} call {call} {kind:?} {mode:?}"),
        );
    }
}

/// One rank whose FC1 reads x in place (`LayerOptions::gather_x`), top-2
/// and top-11 (dropped slots among them: SomeEmpty, SilentRank).
#[test]
#[ignore = "needs a GPU"]
fn one_rank_gathering_x_matches_the_reference() {
    for (experts, k, cap) in [(4, 2, 200), (16, 11, 96)] {
        let c = cfg(1, 512, experts, k);
        let o = LayerOptions {
            gather_x: true,
            ..opts(&c, cap)
        };
        let mut h = Harness::new(&c, cap, &o);
        assert!(h.world.ranks()[0].layer.plan().gather_x);
        one_rank_calls(&mut h, cap, "gather");
    }
}

/// One rank's fused calls move its rows in the GEMMs' side warps (the
/// default where the GEMMs are Hopper's): the dispatch inside FC1, whose
/// tiles wait on its segments, and the sums of all chunks but the last
/// inside FC2. Top-2 and top-11 (dropped slots among them) in two chunks,
/// then a wide layer in three and in nine (few calls: its reference is
/// slow on the host).
#[test]
#[ignore = "needs a GPU"]
fn one_rank_moves_its_rows_inside_the_gemms() {
    for (c, cap) in [(cfg(1, 512, 4, 2), 200), (cfg(1, 256, 16, 11), 96)] {
        let mut h = Harness::new(&c, cap, &opts(&c, cap));
        let plan = h.world.ranks()[0].layer.plan();
        assert!(plan.side_warps && plan.chunks > 1, "{plan:?}");
        one_rank_calls(&mut h, cap, "side warps");
    }
    for chunks in [None, Some(9)] {
        let c = cfg_wide(1, 1152, 4, 2);
        let o = LayerOptions {
            chunks,
            ..opts(&c, 96)
        };
        let mut h = Harness::new(&c, 96, &o);
        assert_eq!(h.world.ranks()[0].layer.plan().chunks, chunks.unwrap_or(3));
        for (i, kind) in [RoutingKind::Uniform, RoutingKind::SomeEmpty]
            .into_iter()
            .enumerate()
        {
            for tokens in [96, 41, 1] {
                let inputs = h.inputs(&[tokens], kind, (i * 100 + tokens) as u64);
                h.call(
                    &inputs,
                    ExecMode::Fused,
                    &format!("side warps wide {chunks:?} {kind:?} T={tokens}"),
                );
            }
        }
    }
}

/// One rank given communication blocks overlaps its own copies: the
/// dispatch beside FC1 (tiles waiting on their segments) and the reduce on
/// the side stream summing each chunk once FC2's tiles of it are done.
#[test]
#[ignore = "needs a GPU"]
fn one_rank_overlapping_its_copies_matches_the_reference() {
    for (experts, k, cap, blocks) in [(4, 2, 200, 1), (16, 11, 96, 6)] {
        let c = cfg(1, 512, experts, k);
        let o = LayerOptions {
            comm_blocks: Some(blocks),
            ..opts(&c, cap)
        };
        let mut h = Harness::new(&c, cap, &o);
        let plan = h.world.ranks()[0].layer.plan();
        assert!(plan.overlap && plan.chunks > 1, "{plan:?}");
        one_rank_calls(&mut h, cap, "alone overlapped");
    }
}

/// Every routing kind at T = 0, 1, the capacity and below it, both modes,
/// against the reference; then 30 calls with changing routing and T.
fn one_rank_calls(h: &mut Harness, cap: usize, what: &str) {
    for (i, kind) in routings().into_iter().enumerate() {
        for tokens in [0, 1, cap, cap - 37] {
            let inputs = h.inputs(&[tokens], kind, (i * 10 + tokens) as u64);
            for mode in modes() {
                h.call(
                    &inputs,
                    mode,
                    &format!("{what} {kind:?} T={tokens} {mode:?}"),
                );
            }
        }
    }
    for call in 0..30u64 {
        let tokens = [cap, 1, cap / 2, 0, cap - 5][call as usize % 5];
        let kind = routings()[call as usize % 5];
        let inputs = h.inputs(&[tokens], kind, 1000 + call);
        h.call(
            &inputs,
            modes()[call as usize % 2],
            &format!("{what} call {call}"),
        );
    }
}

#[test]
#[ignore = "needs a GPU"]
fn every_routing_and_size_matches_the_reference() {
    every_routing(
        false,
        false,
        &[
            (1, 256, 4, 2, 200),
            (2, 512, 4, 2, 256),
            (4, 256, 8, 3, 160),
            // Above the reduce's group of 8 rows loaded at once.
            (2, 256, 16, 11, 96),
        ],
    );
}

#[test]
#[ignore = "needs a GPU"]
fn layers_wider_than_a_raster_group_match_the_reference() {
    for w in [1, 2] {
        let c = cfg_wide(w, 1152, 4, 2);
        let mut h = Harness::build(&c, 96, &opts(&c, 96), false);
        for (i, kind) in [RoutingKind::Uniform, RoutingKind::Zipf(1.2)]
            .into_iter()
            .enumerate()
        {
            for tokens in [96, 41] {
                let toks: Vec<usize> = (0..w).map(|r| tokens - r * 5).collect();
                let inputs = h.inputs(&toks, kind, (i * 100 + tokens) as u64);
                for mode in modes() {
                    h.call(
                        &inputs,
                        mode,
                        &format!("wide W={w} {kind:?} T={tokens} {mode:?}"),
                    );
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a GPU"]
fn thirty_calls_on_the_same_buffers() {
    // Chunks > 1 and overlap on: a wide hidden over several ranks.
    thirty_calls(false, 2, 8, 256, WireFormat::Rows);
}

#[test]
#[ignore = "needs a GPU"]
fn a_captured_graph_replays_with_new_routing() {
    // W = 1 and 2 twice: the rows moved in the GEMMs' side warps, and on
    // blocks (given, or the model's); W = 2 with two expert groups too
    // (each group's GEMMs read their first tile and count on the device,
    // so the graph serves every call's routing).
    for (w, blocks, groups, inside) in [
        (1, None, None, false),
        (1, Some(4), None, false),
        (2, None, None, true),
        (2, None, None, false),
        (2, None, Some(2), false),
    ] {
        let c = cfg(w, 256, 8, 2);
        let figures = if inside { inside_opts() } else { opts(&c, 128) };
        let o = LayerOptions {
            comm_blocks: blocks,
            expert_groups: groups,
            ..figures
        };
        let mut h = Harness::new(&c, 128, &o);
        assert_eq!(
            h.world.ranks()[0].layer.plan().overlap,
            (w > 1 && !inside) || blocks.is_some()
        );
        let first = h.inputs(&vec![128; w], RoutingKind::Uniform, 7);
        h.world.set_inputs(&first).unwrap();
        let graphs = h
            .world
            .capture()
            .unwrap_or_else(|e| panic!("capture W={w}: {e}"));
        for call in 0..10u64 {
            // A graph replays the captured token count: no silent rank here.
            let kind = routings()[call as usize % 4];
            let inputs = h.inputs(&vec![128; w], kind, 2000 + call);
            h.world.set_inputs(&inputs).unwrap();
            h.world.poison().unwrap();
            for g in &graphs {
                g.launch().unwrap();
            }
            let infos = h
                .world
                .check()
                .unwrap_or_else(|e| panic!("replay {call}: {e}"));
            h.compare(&inputs, &format!("W={w} replay {call} {kind:?}"), &infos);
        }
    }
}

#[test]
#[ignore = "needs a GPU"]
fn bad_inputs_are_clear_errors() {
    for staged in [false, true] {
        bad_inputs(staged);
    }
}

fn bad_inputs(staged: bool) {
    let c = cfg(2, 256, 4, 2);
    let mut h = Harness::build(&c, 64, &opts(&c, 64), staged);
    // T above the capacity: refused on the host, nothing enqueued.
    h.world.ranks_mut()[0].set_tokens(65);
    let e = h.world.forward().unwrap_err();
    assert!(e.to_string().contains("capacity of 64"), "{e}");

    // An expert id out of range: a device error naming the slot, the slot
    // dropped, no hang; the next call is clean.
    let inputs = h.inputs(&[64, 64], RoutingKind::Uniform, 1);
    h.world.set_inputs(&inputs).unwrap();
    let mut ids: Vec<i32> = inputs[0].routing.ids.iter().map(|&e| e as i32).collect();
    ids[5] = 4;
    h.world.ranks_mut()[0].set_raw_ids(&ids).unwrap();
    h.world.forward().unwrap();
    match h.world.check() {
        Err(SchedError::Kernel {
            rank: 0,
            source: KernelError::BadExpert { slot: 5 },
        }) => {}
        other => panic!("expected a bad expert at slot 5 of rank 0, got {other:?}"),
    }
    h.call(&inputs, ExecMode::Fused, "after a bad id");

    // Negative ids drop their slot: the reference sees weight 0 there.
    let mut dropped = inputs.clone();
    let mut ids: Vec<i32> = inputs[1].routing.ids.iter().map(|&e| e as i32).collect();
    for s in [0, 3, 10, 11] {
        ids[s] = -1;
        dropped[1].routing.weights[s] = 0.0;
    }
    for mode in modes() {
        h.world.set_mode(mode);
        h.world.set_inputs(&inputs).unwrap();
        h.world.ranks_mut()[1].set_raw_ids(&ids).unwrap();
        h.world.poison().unwrap();
        h.world.forward().unwrap();
        let infos = h.world.check().unwrap();
        h.compare(&dropped, &format!("dropped slots {mode:?}"), &infos);
    }
}

#[test]
#[ignore = "needs a GPU"]
fn rows_over_the_receive_capacity_are_refused_by_every_rank() {
    for staged in [false, true] {
        refused_over_capacity(staged);
    }
}

fn refused_over_capacity(staged: bool) {
    let c = cfg(2, 256, 4, 2);
    let o = LayerOptions {
        recv_capacity: Some(100),
        ..opts(&c, 64)
    };
    let mut h = Harness::build(&c, 64, &o, staged);
    // Everything to rank 0's experts: 128 rows > 100.
    let inputs = h.inputs(&[64, 64], RoutingKind::AllToOne, 3);
    h.world.set_inputs(&inputs).unwrap();
    h.world.forward().unwrap();
    let e = h.world.check().unwrap_err();
    assert!(
        matches!(
            e,
            SchedError::Kernel {
                source: KernelError::Capacity { .. },
                ..
            }
        ),
        "staged {staged}: {e}"
    );
    // A call that fits still works afterwards.
    let inputs = h.inputs(&[20, 20], RoutingKind::Uniform, 4);
    h.call(&inputs, ExecMode::Fused, "after a refused call");
}

/// One small call per mode: what compute-sanitizer runs (memcheck on
/// both, racecheck on one rank, whose kernels never wait on another
/// stream's).
fn small_layer(w: usize) {
    let c = cfg(w, 256, 4, 2);
    let mut h = Harness::new(&c, 64, &opts(&c, 64));
    let toks: Vec<usize> = (0..w).map(|r| 64 - 9 * r).collect();
    let inputs = h.inputs(&toks, RoutingKind::Uniform, 9);
    for mode in modes() {
        h.call(&inputs, mode, &format!("small W={w} {mode:?}"));
    }
}

#[test]
#[ignore = "needs a GPU"]
fn small_layer_one_rank() {
    small_layer(1);
}

#[test]
#[ignore = "needs a GPU"]
fn small_layer_two_ranks() {
    small_layer(2);
}

#[test]
#[ignore = "needs a GPU"]
fn the_device_layout_equals_comet_core_s() {
    // comet-core's LayoutPlan is the reference of what comet_layout derives.
    for (w, experts, kind, groups) in [
        (2, 8, RoutingKind::Zipf(1.2), 1),
        (4, 8, RoutingKind::SomeEmpty, 1),
        (4, 8, RoutingKind::SilentRank, 1),
        (2, 8, RoutingKind::Zipf(1.2), 3),
        (4, 8, RoutingKind::SomeEmpty, 2),
    ] {
        let c = cfg(w, 256, experts, 2);
        let o = LayerOptions {
            expert_groups: Some(groups),
            ..opts(&c, 96)
        };
        let mut h = Harness::new(&c, 96, &o);
        let inputs = h.inputs(&vec![96; w], kind, 77);
        h.call(&inputs, ExecMode::Fused, &format!("layout W={w} {kind:?}"));
        let routings: Vec<Routing> = inputs.iter().map(|i| i.routing.clone()).collect();
        let plan = LayoutPlan::from_routings(&c, &routings).unwrap();
        let epr = c.experts_per_rank();
        for (me, r) in h.world.ranks_mut().iter_mut().enumerate() {
            // SAFETY: the rank's own stream.
            let d = unsafe { r.layer.layout_tables(r.stream.cu_stream()) }.unwrap();
            for e in 0..c.experts {
                assert_eq!(
                    d.send_off[e] as usize,
                    plan.send_offset(me, e),
                    "send_off[{e}] rank {me}"
                );
                let (dst, le) = (e / epr, e % epr);
                assert_eq!(
                    d.dest_row[e] as usize,
                    plan.recv[dst].segment(le, me, w).row,
                    "dest_row[{e}] rank {me}"
                );
            }
            assert_eq!(d.send_off[c.experts] as usize, plan.rows_sent(me));
            for le in 0..epr {
                for i in 0..w {
                    let src = ring_source(me, i, w);
                    let want = plan.recv[me].segment(le, src, w);
                    let got = d.segments[le * w + i];
                    assert_eq!(
                        (
                            got[0] as usize,
                            got[1] as usize,
                            got[2] as usize,
                            got[3] as usize
                        ),
                        (
                            want.row,
                            want.rows,
                            src,
                            plan.send_offset(src, c.global_expert(me, le))
                        ),
                        "segment (expert {le}, src {src}) of rank {me}"
                    );
                }
            }
            // Expert group g: local experts [g*epr/groups, (g+1)*epr/groups).
            let lo = |g: usize| g * epr / groups;
            let bm = r.layer.plan().tiles.bm;
            let (ncol1, nc2) = {
                let p = r.layer.plan();
                (c.ffn / p.tiles.fc1_cols, p.chunk_cols / p.tiles.fc2_cols)
            };
            let chunks = r.layer.plan().chunks;
            let (mut fc1, mut fc2) = (0, 0);
            for g in 0..groups {
                for src in 0..w {
                    let rows: usize = (lo(g)..lo(g + 1))
                        .map(|le| plan.recv[me].segment(le, src, w).rows)
                        .sum();
                    assert_eq!(
                        d.rows_from[g * w + src] as usize,
                        rows,
                        "rows from {src} in group {g} at rank {me}"
                    );
                }
                // Every local expert's rows in whole row tiles, the group's
                // runs back to back in both lists.
                let row_tiles: usize = (lo(g)..lo(g + 1))
                    .map(|le| {
                        (0..w)
                            .map(|s| plan.recv[me].segment(le, s, w).rows)
                            .sum::<usize>()
                    })
                    .map(|rows| rows.div_ceil(bm))
                    .sum();
                let t = d.groups[g];
                assert_eq!(
                    (
                        t.fc1_first,
                        t.fc1_tiles,
                        t.fc2_first,
                        t.fc2_tiles,
                        t.piece_tiles
                    ),
                    (
                        fc1 as i32,
                        (row_tiles * ncol1) as i32,
                        fc2 as i32,
                        (row_tiles * nc2 * chunks) as i32,
                        (row_tiles * nc2) as i32
                    ),
                    "group {g} of rank {me}"
                );
                fc1 += row_tiles * ncol1;
                fc2 += row_tiles * nc2 * chunks;
            }
        }
    }
}

#[test]
#[ignore = "needs a GPU"]
fn a_rank_that_never_calls_is_a_timeout_naming_its_count_signal() {
    for staged in [false, true] {
        let c = cfg(2, 256, 4, 2);
        let o = LayerOptions {
            timeout: Duration::from_millis(500),
            ..opts(&c, 32)
        };
        let mut h = Harness::build(&c, 32, &o, staged);
        let inputs = h.inputs(&[32, 32], RoutingKind::Uniform, 5);
        h.world.set_inputs(&inputs).unwrap();
        // Only rank 0 calls: its layout waits for rank 1's counts, bounded
        // (staged: its proxy waits for rank 1's count row, bounded too).
        let r0 = &mut h.world.ranks_mut()[0];
        let a = r0.args();
        // SAFETY: the rank's own tensors and stream.
        unsafe { r0.layer.forward(r0.stream.cu_stream(), &a) }.unwrap();
        let t0 = std::time::Instant::now();
        // SAFETY: as above.
        let e = unsafe { r0.layer.check(r0.stream.cu_stream()) }.unwrap_err();
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "staged {staged}: took {:?}",
            t0.elapsed()
        );
        let text = e.to_string();
        let named = text.contains("count(src 1)") || (staged && text.contains("count(1)"));
        assert!(text.contains("rank 0") && named, "staged {staged}: {text}");
    }
}

/// Expert groups given (the toy layers' GEMMs are too short for the
/// model to pay a group's fixed cost): FC1 and FC2 run group by group and
/// each group's combine pieces leave on their own, over nvlink and staged
/// (a row per (token, expert): a token-once combine sums per rank); every
/// routing at T = 0, 1 and the capacity, both modes, then ten calls with
/// changing routing and T.
#[test]
#[ignore = "needs a GPU"]
fn expert_groups_match_the_reference() {
    // (staged, W, experts, groups, capacity)
    for (staged, w, experts, groups, cap) in [
        (false, 2, 8, 2, 128),
        (false, 2, 8, 4, 96),
        (false, 4, 8, 2, 96),
        (true, 2, 8, 3, 128),
        (true, 3, 6, 2, 96),
    ] {
        let c = cfg(w, 256, experts, 2);
        let o = LayerOptions {
            wire_format: WireFormat::Rows,
            expert_groups: Some(groups),
            ..opts(&c, cap)
        };
        let mut h = Harness::build(&c, cap, &o, staged);
        assert_eq!(h.world.ranks()[0].layer.plan().groups, groups);
        for (i, kind) in routings().into_iter().enumerate() {
            for tokens in [0, 1, cap] {
                let toks: Vec<usize> = (0..w).map(|r| tokens.saturating_sub(r * 3)).collect();
                let inputs = h.inputs(&toks, kind, (i * 10 + tokens) as u64);
                for mode in modes() {
                    let label = format!(
                        "groups {groups} staged {staged} W={w} {kind:?} T={tokens} {mode:?}"
                    );
                    h.call(&inputs, mode, &label);
                }
            }
        }
        for call in 0..10u64 {
            let toks = changing_tokens(call, w, cap);
            let kind = routings()[call as usize % 5];
            let inputs = h.inputs(&toks, kind, 2000 + call);
            h.call(
                &inputs,
                ExecMode::Fused,
                &format!("groups {groups} staged {staged} W={w} call {call} {kind:?}"),
            );
        }
    }
}

#[test]
#[ignore = "needs a GPU"]
fn staged_every_routing_matches_the_reference() {
    every_routing(true, false, &[(2, 512, 4, 2, 256), (4, 256, 8, 3, 160)]);
}

/// Ranks with no link worth overlapping move their rows in the Hopper
/// GEMMs' side warps: the dispatch inside FC1 (tiles waiting on the
/// segments the peers' side warps complete), the combine of each chunk
/// inside FC2, the reduce after it.
#[test]
#[ignore = "needs a GPU"]
fn ranks_move_their_rows_inside_the_gemms() {
    every_routing(false, true, &INSIDE_SHAPES);
}

#[test]
#[ignore = "needs a GPU"]
fn staged_thirty_calls_on_the_same_buffers() {
    // Token-once (3 ranks of 2 experts, top-2: about a fifth of uniform
    // tokens have both experts on one rank), then a row per (token, expert).
    thirty_calls(true, 3, 6, 200, WireFormat::Tokens);
    thirty_calls(true, 3, 6, 200, WireFormat::Rows);
}

/// Every rank's output copied to the host on its stream as soon as its
/// call is enqueued, before its peers' calls: the copy waits behind a call
/// that waits for the peers, and must hold back nothing the call needs (a
/// staged proxy's downloads once waited behind the layer's own status copy:
/// docs/PERF.md, 2026-12-06). Over nvlink and staged, 30 calls each.
#[test]
#[ignore = "needs a GPU"]
fn outputs_copied_out_at_once_hold_nothing_back() {
    for staged in [false, true] {
        let (w, cap) = (3, 200);
        let c = cfg(w, 256, 6, 2);
        let mut h = Harness::build(&c, cap, &opts(&c, cap), staged);
        for call in 0..30u64 {
            let toks: Vec<usize> = (0..w)
                .map(|r| (call as usize * 41 + r * 67) % (cap + 1))
                .collect();
            let kind = routings()[call as usize % 5];
            let mode = modes()[call as usize % 2];
            let inputs = h.inputs(&toks, kind, 5000 + call);
            let label = format!("staged {staged} call {call} {kind:?} {mode:?} copied out");
            h.world.set_mode(mode);
            h.world.set_inputs(&inputs).unwrap();
            h.world.poison().unwrap();
            h.world
                .forward_copying_outputs()
                .unwrap_or_else(|e| panic!("{label}: {e}"));
            let infos = h.world.check().unwrap_or_else(|e| panic!("{label}: {e}"));
            h.compare_outputs(&h.world.copied_outputs(), &inputs, &label, &infos);
        }
    }
}

#[test]
#[ignore = "needs a GPU"]
fn staged_calls_cannot_be_captured() {
    let c = cfg(2, 256, 4, 2);
    let mut h = Harness::staged(&c, 64, &opts(&c, 64));
    let inputs = h.inputs(&[64, 64], RoutingKind::Uniform, 9);
    h.world.set_inputs(&inputs).unwrap();
    let e = h.world.capture().map(|_| ()).unwrap_err();
    assert!(e.to_string().contains("cannot be captured"), "{e}");
}

#[test]
#[ignore = "needs a GPU"]
fn communication_only_calls_keep_every_rank_in_step() {
    for staged in [false, true] {
        let c = cfg(2, 256, 4, 2);
        let mut h = Harness::build(&c, 128, &opts(&c, 128), staged);
        for call in 0..6u64 {
            let inputs = h.inputs(&[128, 100], RoutingKind::Zipf(1.2), 4000 + call);
            if call % 2 == 1 {
                h.call(
                    &inputs,
                    ExecMode::Fused,
                    &format!("staged {staged} call {call}"),
                );
                continue;
            }
            h.world.set_inputs(&inputs).unwrap();
            h.world
                .comms_only()
                .unwrap_or_else(|e| panic!("staged {staged} comms {call}: {e}"));
            let infos = h
                .world
                .check()
                .unwrap_or_else(|e| panic!("staged {staged} comms {call}: {e}"));
            for (r, (info, inp)) in infos.iter().zip(&inputs).enumerate() {
                let slots = inp.routing.ids.len();
                assert_eq!(
                    info.sent_rows, slots,
                    "staged {staged} call {call} rank {r}"
                );
            }
        }
    }
}

#[test]
#[ignore = "needs a GPU"]
fn phases_of_sequential_calls_are_timed() {
    let c = cfg(2, 256, 4, 2);
    let mut h = Harness::new(&c, 128, &opts(&c, 128));
    let inputs = h.inputs(&[128, 128], RoutingKind::Uniform, 21);
    h.world.time_phases(true).unwrap();
    h.call(&inputs, ExecMode::Baseline, "timed phases");
    let t = h
        .world
        .phase_times()
        .unwrap()
        .expect("a sequential call was timed");
    assert_eq!(t.len(), comet_sched::forward::PHASES.len());
    assert!(t.iter().all(|ms| ms.is_finite() && *ms >= 0.0), "{t:?}");
    assert!(t[3] > 0.0 && t[4] > 0.0, "the GEMMs take time: {t:?}");
    // A fused call overlapping on blocks has no phases in sequence to
    // time; one moving its rows in the GEMMs' side warps (one group) is
    // timed by GEMM.
    h.call(&inputs, ExecMode::Fused, "overlapped on blocks");
    assert!(h.world.phase_times().unwrap().is_none());
    h.world.time_phases(false).unwrap();
    drop(h);
    // Where the plan overlaps nothing a fused call runs on the side warps
    // (Hopper's GEMMs) or in sequence: timed either way.
    let mut inside = Harness::new(&c, 128, &inside_opts());
    let plan = inside.world.ranks()[0].layer.plan();
    assert_eq!(plan.side_warps, plan.tiles.side_warps, "{plan:?}");
    inside.world.time_phases(true).unwrap();
    inside.call(&inputs, ExecMode::Fused, "inside the GEMMs");
    let t = inside
        .world
        .phase_times()
        .unwrap()
        .expect("a fused call on the side warps was timed");
    assert!(t[3] > 0.0 && t[4] > 0.0, "the GEMMs take time: {t:?}");
}
