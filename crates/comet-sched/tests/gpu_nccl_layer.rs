//! The device forward over NCCL (issue 16, item 3): W processes of this
//! test binary, one GPU each (NCCL refuses two ranks on one GPU), each one
//! rank of `DeviceWorld::nccl_over`: the kernels unchanged over mirrors and
//! ready words, a proxy thread running `NcclProxy::call` over `CudaLanes`
//! (a communicator and stream per ordered pair, combine chunks packed on
//! the device, landings with their signal writes on their own stream). 24
//! calls with changing routing kinds and T (T = 0 included), fused and
//! non-overlapped in turns, every y checked against the f64 reference with
//! the outputs poisoned first. The shape and link figures make the fused
//! mode overlap in several column chunks, so 2-D chunks are packed and
//! landed (checked on CPU by the one test here that is not ignored).
//!
//! `#[ignore]`: needs 2 GPUs and libnccl; with fewer GPUs it says so and
//! passes. Run on a GPU machine with
//! `cargo test -p comet-sched --features gpu,nccl --test gpu_nccl_layer -- --ignored --test-threads=1`
//! (or `scripts/nccl-layer.sh`, step 4; the bundle ships it as
//! `.bundle/run.sh gpu_nccl_layer`).
#![cfg(all(feature = "gpu", feature = "nccl"))]

mod common;

use comet_core::cost::{CostModel, DeviceFigures};
use comet_core::{ExpertWeights, MoeConfig};
use comet_sched::device_plan::DevicePlan;
use comet_sched::device_world::{DeviceWorld, WorldWeights};
use comet_sched::forward::{kernel_tiles_for, LayerOptions};
use comet_sched::nccl_device::lane_sms;
use comet_transport::bootstrap::Bootstrap;
use comet_transport::cuda;
use comet_transport::gpu::BlobExchange;
use comet_transport::launch::OnFailure;
use comet_transport::nccl::ffi::nccl_available;
use comet_transport::nccl::{NcclOptions, NcclTransport};
use common::layer::{checked_call, rounded_weights, small_cfg};
use common::{assert_all_done, launch_ranks, marker};
use std::sync::Arc;
use std::time::Duration;

const ENTRY: &str = "gpu_nccl_rank";
const CAP: usize = 160;
const CALLS: u64 = 24;
const LIMIT: Duration = Duration::from_secs(300);
/// SMs of the H200 the figures describe.
const SMS: usize = 132;

/// Figures of a link whose transfers take about half the GEMM time, so
/// the cost model overlaps this small layer in several chunks. Behind
/// NCCL's proxy the communication blocks also copy every row into the
/// mirrors; at a real block's rate those copies alone would outlast this
/// toy layer's GEMMs, so its blocks copy fast enough not to count.
fn opts(cfg: &MoeConfig) -> LayerOptions {
    let mut dev = DeviceFigures::h200_nvlink();
    dev.link_latency_us = 0.0;
    dev.chunk_overhead_us = 0.0;
    dev.block_gbps = 1e4;
    let probe = CostModel::estimate(cfg, CAP, &dev);
    dev.link_gbps *= probe.dispatch_ms.max(1e-9) / (probe.gemm_ms / 2.0);
    LayerOptions {
        timeout: Duration::from_secs(20),
        figures: Some(dev),
        ..LayerOptions::default()
    }
}

/// The premise of the GPU test, on CPU: on an H200 (Hopper tiles, the SMs
/// NCCL's lanes leave) the fused mode overlaps in more than one chunk, on
/// several blocks (the portable GEMMs' tiles too).
#[test]
fn the_test_shape_overlaps_in_several_chunks() {
    for w in [2, 4] {
        let c = small_cfg(w);
        let o = opts(&c);
        // As the layer sees them behind NCCL's proxy (MoeLayer::new).
        let mut figures = o.figures.clone().expect("figures");
        figures.proxy = true;
        figures.wire = comet_core::cost::WireFormat::Rows;
        for family in [comet_kernels::Family::SM90_TMA, comet_kernels::Family::Sm80] {
            let tiles = kernel_tiles_for(family);
            let plan = DevicePlan::new(&c, CAP, None, SMS - lane_sms(w), 1, tiles, &figures)
                .expect("plan");
            assert!(plan.overlap && plan.chunks > 1, "W={w}: {plan:?}");
            assert!(
                !plan.side_warps && plan.comm_blocks > 1,
                "several blocks share the pieces: {plan:?}"
            );
        }
    }
}

/// One rank (inert unless the launcher set `COMET_TEST_SCENARIO`).
#[test]
#[ignore = "a rank of a multi-process GPU test, started by the launcher"]
fn gpu_nccl_rank() {
    let Ok(scenario) = std::env::var("COMET_TEST_SCENARIO") else {
        return;
    };
    let boot = Bootstrap::from_env().expect("bootstrap");
    let (w, me) = (boot.world(), boot.rank());
    let local = std::env::var("LOCAL_RANK")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(me);
    let ordinal = local % cuda::device_count().max(1);
    let t = NcclTransport::new(
        ordinal,
        Arc::new(boot) as Arc<dyn BlobExchange>,
        NcclOptions::default(),
    )
    .unwrap_or_else(|e| panic!("rank {me}: nccl: {e}"));
    let cfg = small_cfg(w);
    let seed = 0x9CC1;
    let weights = |r: usize| ExpertWeights::for_rank(&cfg, r, seed);
    let mut world = DeviceWorld::nccl_over(&cfg, t, CAP, WorldWeights::Host(&weights), &opts(&cfg))
        .unwrap_or_else(|e| panic!("rank {me}: setup: {e}"));
    let plan = world.ranks()[0].layer.plan().clone();
    println!(
        "rank {me}: GPU {ordinal}, {} of its SMs to the layer, overlap {}, {} chunk(s)",
        plan.sms, plan.overlap, plan.chunks
    );
    let all = rounded_weights(&cfg, seed);
    for call in 1..=CALLS {
        let tokens = match call % 9 {
            4 => 0,
            8 => CAP,
            _ => 1 + (call as usize * 53 + me * 97) % CAP,
        };
        if let Err(e) = checked_call(&mut world, &all, seed, call, &[(me, tokens)]) {
            panic!("rank {me} {e}");
        }
    }
    world
        .barrier(Duration::from_secs(30))
        .expect("final barrier");
    println!("{}", marker(me, &scenario));
}

#[test]
#[ignore = "needs two GPUs and libnccl"]
fn nccl_layer_over_processes_matches_the_reference() {
    let g = cuda::device_count();
    if g < 2 {
        eprintln!(
            "skipped: the layer over NCCL needs 2 GPUs (NCCL refuses two ranks on one GPU); \
             this machine has {g}"
        );
        return;
    }
    assert!(
        nccl_available(),
        "libnccl cannot be loaded (scripts/nccl-layer.sh puts it on LD_LIBRARY_PATH)"
    );
    let mut worlds = vec![2];
    if g > 2 {
        worlds.push(g.min(4));
    }
    for w in worlds {
        let r = launch_ranks(ENTRY, "calls", w, &[], OnFailure::KillAll, LIMIT);
        assert_all_done(r, "calls", w, "nccl");
    }
}
