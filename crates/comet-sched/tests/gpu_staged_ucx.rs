//! The device forward across processes over UCX (issue 16): 2-4 processes
//! of this test binary share GPU 0, each one rank of a staged layer
//! (`DeviceWorld::staged_over`: unchanged kernels over mirrors and ready
//! words, a proxy thread carrying the bytes through host memory over UCX
//! with TCP or shared memory). 30 calls with changing routing and T, both
//! modes, every y checked against the f64 reference with the outputs
//! poisoned first; and a rank SIGKILLed while its peers are in a call
//! leaves each of them with an error naming it, within the timeout.
//!
//! `#[ignore]`: needs a GPU and libucx. Run on a GPU machine with
//! `cargo test -p comet-sched --features gpu,ucx --test gpu_staged_ucx -- --ignored --test-threads=1`
//! (the bundle ships it with the UCX libraries: `.bundle/run.sh gpu_staged_ucx`).
#![cfg(all(feature = "gpu", feature = "ucx"))]

mod common;

use comet_core::cost::DeviceFigures;
use comet_core::ExpertWeights;
use comet_sched::device_world::{visible_placement, DeviceWorld, WorldWeights};
use comet_sched::forward::LayerOptions;
use comet_transport::launch::OnFailure;
use comet_transport::ucx::{UcxConfig, UcxTransport};
use comet_transport::Transport;
use common::layer::{checked_call, rounded_weights, small_cfg};
use common::{assert_all_done, assert_victim_named, die, launch_world, launch_world_env, marker};
use std::time::{Duration, Instant};

const ENTRY: &str = "gpu_staged_rank";
const CAP: usize = 160;
const CALLS: u64 = 30;
const KILLED_AT: u64 = 3;
const LIMIT: Duration = Duration::from_secs(300);

/// One rank (inert unless the launcher set `COMET_TEST_SCENARIO`).
#[test]
#[ignore = "a rank of a multi-process GPU test, started by the launcher"]
fn gpu_staged_rank() {
    let Ok(scenario) = std::env::var("COMET_TEST_SCENARIO") else {
        return;
    };
    // RUST_LOG=comet_sched=debug shows what each rank's proxy moves.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
    let t = UcxTransport::from_env().expect("ucx transport");
    let (w, me) = (t.world(), t.rank());
    let cfg = small_cfg(w);
    let seed = 0xC0FE;
    let kill = scenario == "kill";
    let opts = LayerOptions {
        timeout: Duration::from_secs(if kill { 3 } else { 20 }),
        ranks_per_gpu: w,
        figures: Some(DeviceFigures::h200_slow_link()),
        ..LayerOptions::default()
    };
    let weights = |r: usize| ExpertWeights::for_rank(&cfg, r, seed);
    let world = DeviceWorld::staged_over(&cfg, t, 0, CAP, WorldWeights::Host(&weights), &opts);
    if scenario == "one_queue" {
        let e = world
            .map(|_| ())
            .expect_err("a staged layer under one hardware queue");
        assert!(
            e.to_string().contains("CUDA_DEVICE_MAX_CONNECTIONS=1"),
            "rank {me}: {e}"
        );
        // No barrier before the transports go: the rank that drops second
        // finds its peer closed and leaks its UCX worker (quietly), which
        // the exit that follows cleans up.
        println!("{}", marker(me, &scenario));
        return;
    }
    let mut world = world.unwrap_or_else(|e| panic!("rank {me}: setup: {e}"));
    let all = rounded_weights(&cfg, seed);
    let start = Instant::now();
    let mut outcome = Ok(());
    for call in 1..=CALLS {
        if kill && call == KILLED_AT {
            // Every rank has finished the earlier calls (each checked its
            // y), so every piece of them landed and no put of the victim
            // is unacknowledged when it dies; the others go into the call.
            world
                .barrier(Duration::from_secs(30))
                .expect("barrier before the loss");
            if me == w - 1 {
                die();
            }
        }
        let tokens = 1 + (call as usize * 53 + me * 97) % CAP;
        if let Err(e) = checked_call(&mut world, &all, seed, call, &[(me, tokens)]) {
            outcome = Err(e);
            break;
        }
    }
    match (kill, outcome) {
        (false, Ok(())) => world
            .barrier(Duration::from_secs(30))
            .expect("final barrier"),
        (false, Err(e)) => panic!("rank {me}: {e}"),
        (true, Ok(())) => panic!("rank {me}: every call succeeded though rank {} died", w - 1),
        (true, Err(e)) => {
            println!(
                "rank {me}: error as expected after {:?}: {e}",
                start.elapsed()
            );
            // Stay (without progressing UCX) until every survivor has seen
            // the loss, then leave without tearing the broken world down.
            std::thread::sleep(Duration::from_millis(300));
            std::mem::forget(world);
        }
    }
    println!("{}", marker(me, &scenario));
}

#[test]
#[ignore = "needs a GPU and libucx"]
fn staged_layer_over_ucx_processes_matches_the_reference() {
    for (world, tls) in [(2, "tcp"), (3, "sm,self"), (4, "tcp")] {
        let r = launch_world(ENTRY, "calls", world, tls, OnFailure::KillAll, LIMIT);
        assert_all_done(r, "calls", world, tls);
    }
}

/// Megatron-LM runs with `CUDA_DEVICE_MAX_CONNECTIONS=1`: every stream's
/// kernels and device-to-host copies in one hardware queue. There each
/// proxy's count download waited behind the kernels waiting for it, and
/// every call timed out (docs/PERF.md, 2026-12-06); a staged layer is
/// refused at setup instead, naming the variable, on every rank.
#[test]
#[ignore = "needs a GPU and libucx"]
fn staged_layer_under_one_hardware_queue_is_refused() {
    let (world, tls) = (2, "tcp");
    let one = [("CUDA_DEVICE_MAX_CONNECTIONS", "1")];
    // Setup alone: well inside the 90 s device-checks gives this test.
    let limit = Duration::from_secs(60);
    let r = launch_world_env(
        ENTRY,
        "one_queue",
        world,
        tls,
        &one,
        OnFailure::KillAll,
        limit,
    );
    assert_all_done(r, "one_queue", world, tls);
}

/// Every rank a UCX worker of this process (`UcxTransport::in_process`,
/// what `comet bench --gpu --transport ucx` runs without the launcher),
/// all on GPU 0: 30 calls against the reference, T changing per rank.
#[test]
#[ignore = "needs a GPU and libucx"]
fn staged_layer_over_ucx_ranks_of_one_process_matches_the_reference() {
    let w = 3;
    let cfg = small_cfg(w);
    let seed = 0xC0FF;
    let opts = LayerOptions {
        timeout: Duration::from_secs(20),
        figures: Some(DeviceFigures::h200_slow_link()),
        ..LayerOptions::default()
    };
    let ts = UcxTransport::in_process(w, UcxConfig::from_env().unwrap()).expect("ucx ranks");
    let weights = |r: usize| ExpertWeights::for_rank(&cfg, r, seed);
    let mut world = DeviceWorld::staged_on(
        &cfg,
        &visible_placement(w),
        ts,
        CAP,
        WorldWeights::Host(&weights),
        &opts,
    )
    .expect("setup");
    let all = rounded_weights(&cfg, seed);
    for call in 1..=CALLS {
        let ranks: Vec<(usize, usize)> = (0..w)
            .map(|me| (me, (call as usize * 53 + me * 97) % (CAP + 1)))
            .collect();
        checked_call(&mut world, &all, seed, call, &ranks).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
#[ignore = "needs a GPU and libucx"]
fn staged_layer_rank_killed_mid_layer_is_named_by_the_others() {
    for (world, tls) in [(2, "tcp"), (3, "tcp")] {
        let r = launch_world(ENTRY, "kill", world, tls, OnFailure::Wait, LIMIT);
        assert_victim_named(r, "kill", world, tls);
    }
}
