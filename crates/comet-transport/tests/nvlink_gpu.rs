//! GPU tests of the `nvlink` transport: put + signal under load, in both
//! modes (several processes through CUDA IPC, several threads of one
//! process), on however many GPUs there are (all ranks share one GPU on a
//! single-GPU machine: that proves the protocol, not the link), then the
//! shared scenarios of `common` (chunked puts, epochs, misuse, timeouts).
//!
//! Every test needs a CUDA device, so all are ignored by default (CI counts
//! them as ignored, not passed); run them on a GPU machine with
//! `--include-ignored`, where a missing device is a failure. The
//! multi-process tests re-launch this test binary W times through
//! `comet_transport::launch`; the child entry points (`child_rank`,
//! `child_killed_peer`) are inert unless their variable is set, so each
//! child prints a marker line when it ran its part and the parent checks
//! every rank's marker, not only its exit status.
#![cfg(feature = "nvlink")]

mod common;

use comet_transport::cuda;
use comet_transport::gpu::{BlobExchange, DeviceTransport};
use comet_transport::launch::OnFailure;
use comet_transport::nvlink::{NvlinkOptions, NvlinkTransport};
use comet_transport::{SignalOp, Transport, TransportError};
use common::*;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;
use std::time::Duration;

const CHILD_ENV: &str = "COMET_NVLINK_CHILD";
const POISON: u8 = 0xA5;

/// These tests run only when asked for (`--ignored`): without a device
/// that is a failure, not a skip.
fn require_gpu() {
    assert!(
        cuda::gpu_available(),
        "this test needs a CUDA driver and device (none found)"
    );
}

/// Launches `w` ranks of this binary's ignored test `entry` with `env` set
/// and checks that each rank printed `marker(rank)`.
fn launch_children(
    w: usize,
    entry: &str,
    env: &str,
    timeout: Duration,
    on_failure: OnFailure,
    marker: impl Fn(usize) -> String,
) {
    let rep = expect_ok(launch_self_for(
        entry,
        w,
        &[(env, "1")],
        on_failure,
        timeout,
    ));
    assert_markers(&rep, marker);
}

/// Every rank sends a random segment to every rank (itself included) per
/// epoch, chunk by chunk, mixing device-to-device and host puts; a
/// counter signal counts chunks and an epoch signal closes each segment.
/// Buffers and signals are never reset: epochs only grow. Returns the
/// bytes this rank sent.
fn stress(t: &NvlinkTransport, seed: u64, epochs: u64, seg: usize) -> Result<u64, String> {
    let w = t.world();
    let me = t.rank();
    let buf = t.alloc_buffer(w * seg).map_err(|e| e.to_string())?;
    let stage = t.alloc_buffer(seg).map_err(|e| e.to_string())?;
    // [0, w): epoch per source; [w, 2w): chunk counters.
    t.alloc_signals(2 * w).map_err(|e| e.to_string())?;
    let stage_ptr = t.buffer_ptr(stage).map_err(|e| e.to_string())?;
    let mut expect_count = vec![0u64; w];
    let mut sent = 0u64;
    let poison = vec![POISON; w * seg];
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ me as u64);
    for epoch in 1..=epochs {
        t.put(me, buf, 0, &poison).map_err(|e| e.to_string())?;
        t.barrier(T).map_err(|e| e.to_string())?;
        let data = payload(seed, me, 0, epoch, seg);
        t.put(me, stage, 0, &data).map_err(|e| e.to_string())?;
        let mut dsts: Vec<usize> = (0..w).collect();
        dsts.shuffle(&mut rng);
        for dst in dsts {
            let host_path = (epoch + dst as u64).is_multiple_of(3);
            let mut cs = chunks(seed ^ epoch, me, dst, seg, seg / 3 + 1);
            cs.shuffle(&mut rng);
            for (off, len) in cs {
                if host_path {
                    t.put(dst, buf, me * seg + off, &data[off..off + len])
                        .map_err(|e| e.to_string())?;
                } else {
                    t.put_device(dst, buf, me * seg + off, stage_ptr + off as u64, len)
                        .map_err(|e| e.to_string())?;
                }
                t.signal(dst, (w + me) as u32, SignalOp::Add(1))
                    .map_err(|e| e.to_string())?;
                sent += len as u64;
            }
            t.signal(dst, me as u32, SignalOp::Set(epoch))
                .map_err(|e| e.to_string())?;
        }
        let mut out = vec![0u8; seg];
        for (src, count) in expect_count.iter_mut().enumerate() {
            *count += chunks(seed ^ epoch, src, me, seg, seg / 3 + 1).len() as u64;
            let v = t.wait(src as u32, epoch, T).map_err(|e| e.to_string())?;
            if v != epoch {
                return Err(format!(
                    "rank {me}: epoch signal of {src} is {v}, expected {epoch}"
                ));
            }
            t.wait((w + src) as u32, *count, T)
                .map_err(|e| e.to_string())?;
            t.read(buf, src * seg, &mut out)
                .map_err(|e| e.to_string())?;
            let want = payload(seed, src, 0, epoch, seg);
            if checksum(&out) != checksum(&want) || out != want {
                let bad = out.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
                return Err(format!(
                    "rank {me}, epoch {epoch}: segment from {src} differs at byte {bad} ({:#x} != {:#x}; poison is {POISON:#x})",
                    out[bad], want[bad]
                ));
            }
        }
        t.barrier(T).map_err(|e| e.to_string())?;
    }
    t.barrier(T).map_err(|e| e.to_string())?;
    Ok(sent)
}

fn params() -> (u64, u64, usize) {
    let epochs = std::env::var("COMET_NVLINK_EPOCHS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let seg = std::env::var("COMET_NVLINK_SEG")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256 * 1024 + 13);
    (0xC0FE, epochs, seg)
}

/// Entry point of one launched rank (inert without `COMET_NVLINK_CHILD`).
#[test]
#[ignore = "a rank of a multi-process test, started by the launcher"]
fn child_rank() {
    let Some((boot, ordinal)) = child_bootstrap(CHILD_ENV, cuda::device_count()) else {
        return;
    };
    let rank = boot.rank();
    let t = NvlinkTransport::new(
        ordinal,
        boot.clone() as Arc<dyn BlobExchange>,
        NvlinkOptions::default(),
    )
    .expect("nvlink up");
    assert!(!t.peer_in_process((rank + 1) % t.world()) || t.world() == 1);
    let (seed, epochs, seg) = params();
    match stress(&t, seed, epochs, seg) {
        Ok(sent) => println!("rank {rank}: stress sent {sent} bytes over {epochs} epochs"),
        Err(e) => panic!("{e}"),
    }
    all(&t, seed, Delivery::Eager).expect("shared scenarios");
    println!("rank {rank}: ok, shared scenarios done");
    t.shutdown(T).expect("shutdown");
}

fn run_processes(w: usize) {
    require_gpu();
    launch_children(
        w,
        "child_rank",
        CHILD_ENV,
        Duration::from_secs(300),
        OnFailure::KillAll,
        |r| format!("rank {r}: ok, shared scenarios done"),
    );
}

#[test]
#[ignore = "needs a GPU"]
fn ipc_processes_w2() {
    run_processes(2);
}

#[test]
#[ignore = "needs a GPU"]
fn ipc_processes_w3() {
    run_processes(3);
}

#[test]
#[ignore = "needs a GPU"]
fn ipc_processes_w4() {
    run_processes(4);
}

fn run_threads(w: usize) {
    require_gpu();
    let n = cuda::device_count();
    let ordinals: Vec<usize> = (0..w).map(|r| r % n).collect();
    let ranks =
        NvlinkTransport::in_process(&ordinals, NvlinkOptions::default()).expect("in-process world");
    let (seed, epochs, seg) = params();
    std::thread::scope(|s| {
        let hs: Vec<_> = ranks
            .iter()
            .map(|t| {
                assert!(w == 1 || t.peer_in_process((t.rank() + 1) % w));
                s.spawn(move || {
                    stress(t, seed + 1, epochs / 2, seg).expect("stress");
                    all(t, seed + 1, Delivery::Eager).expect("shared scenarios");
                })
            })
            .collect();
        for h in hs {
            h.join().expect("rank thread");
        }
    });
}

#[test]
#[ignore = "needs a GPU"]
fn one_process_threads_w2() {
    run_threads(2);
}

#[test]
#[ignore = "needs a GPU"]
fn one_process_threads_w4() {
    run_threads(4);
}

#[test]
#[ignore = "needs a GPU"]
fn mismatched_allocation_is_an_error_on_every_rank() {
    require_gpu();
    let ranks = NvlinkTransport::in_process(&[0, 0], NvlinkOptions::default()).expect("world");
    std::thread::scope(|s| {
        let hs: Vec<_> = ranks
            .iter()
            .map(|t| s.spawn(move || t.alloc_buffer(1024 * (t.rank() + 1))))
            .collect();
        for h in hs {
            let e = h.join().expect("thread").unwrap_err();
            assert!(
                matches!(
                    e,
                    TransportError::Mismatch {
                        what: "alloc_buffer",
                        ..
                    }
                ),
                "{e}"
            );
        }
    });
}

const KILL_ENV: &str = "COMET_NVLINK_KILL_CHILD";

/// Rank 1 vanishes after one signal; rank 0's next wait and barrier must
/// end in errors within their bounds, not hang.
#[test]
#[ignore = "a rank of a multi-process test, started by the launcher"]
fn child_killed_peer() {
    let Some((boot, ordinal)) = child_bootstrap(KILL_ENV, cuda::device_count()) else {
        return;
    };
    let t = NvlinkTransport::new(
        ordinal,
        boot as Arc<dyn BlobExchange>,
        NvlinkOptions::default(),
    )
    .expect("nvlink up");
    let buf = t.alloc_buffer(1 << 20).expect("buffer");
    t.alloc_signals(1).expect("signals");
    t.barrier(T).expect("barrier");
    if t.rank() == 1 {
        t.put(0, buf, 0, &payload(1, 1, 0, 1, 1 << 20))
            .expect("put");
        t.signal(0, 0, SignalOp::Set(1)).expect("signal");
        t.synchronize().expect("sync");
        println!("rank 1: signalled once, vanishing");
        // No goodbye, no destructors: as if killed.
        std::process::exit(0);
    }
    assert_eq!(t.wait(0, 1, T).expect("first signal arrives"), 1);
    match t.wait(0, 2, Duration::from_secs(2)) {
        Err(TransportError::WaitTimeout {
            rank: 0,
            signal: 0,
            expected: 2,
            observed: 1,
            ..
        }) => {}
        other => panic!("wait after the peer died gave {other:?}"),
    }
    let e = t
        .barrier(Duration::from_secs(30))
        .expect_err("barrier with a dead peer must fail");
    println!("rank 0: peer loss reported as: {e}");
}

#[test]
#[ignore = "needs a GPU"]
fn a_vanished_peer_is_an_error_not_a_hang() {
    require_gpu();
    launch_children(
        2,
        "child_killed_peer",
        KILL_ENV,
        Duration::from_secs(120),
        OnFailure::Wait,
        |r| {
            if r == 0 {
                "rank 0: peer loss reported as".to_string()
            } else {
                "rank 1: signalled once, vanishing".to_string()
            }
        },
    );
}
