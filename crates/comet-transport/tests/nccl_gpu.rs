//! GPU tests of the `nccl` transport. NCCL refuses two ranks on one GPU,
//! so a single-GPU machine runs a world of one (communicator set-up from a
//! unique id, staged puts, flush, plan steps, signals on the stream,
//! bounded waits); with G >= 2 GPUs the same workload runs with G ranks,
//! as threads of one process and as G processes through the bootstrap.
//! Every test needs a GPU and libnccl (two tests need two GPUs), so all
//! are ignored by default and counted as such; run them on a GPU machine
//! with `--include-ignored`, where a missing device, library or second GPU
//! is a failure. The child entry point `child_rank` prints a marker line
//! that the parent checks on every rank.
#![cfg(feature = "nccl")]

mod common;

use comet_transport::cuda;
use comet_transport::gpu::{BlobExchange, DeviceTransport, ThreadExchange};
use comet_transport::launch::OnFailure;
use comet_transport::nccl::ffi::nccl_available;
use comet_transport::nccl::plan::Transfer;
use comet_transport::nccl::{NcclOptions, NcclTransport};
use comet_transport::{SignalOp, Transport, TransportError};
use common::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;
use std::time::Duration;

const CHILD_ENV: &str = "COMET_NCCL_CHILD";
const POISON: u8 = 0x5A;

/// These tests run only when asked for (`--ignored`): without what they
/// need that is a failure, not a skip.
fn require(need_gpus: usize) {
    assert!(
        cuda::gpu_available() && nccl_available(),
        "this test needs a CUDA device and libnccl (not found)"
    );
    assert!(
        cuda::device_count() >= need_gpus,
        "this test needs {need_gpus} GPUs (NCCL wants one per rank), found {}",
        cuda::device_count()
    );
}

/// The shared scenarios over the plain Transport calls (staged, moved at
/// each barrier), then plan steps posted by every rank from the same
/// transfer list, with counter signals; buffers and signals reused across
/// epochs, never reset.
fn workload(t: &NcclTransport, epochs: u64, seg: usize) -> Result<(), String> {
    let w = t.world();
    let me = t.rank();
    let s = |e: TransportError| e.to_string();
    all(t, 0x5EED, Delivery::AtBarrier).map_err(s)?;
    let buf = t.alloc_buffer(w * seg).map_err(s)?;
    let src = t.alloc_buffer(w * seg).map_err(s)?;
    t.alloc_signals(2 * w).map_err(s)?;
    let mut counts = vec![0u64; w];
    let mut out = vec![0u8; seg];
    for epoch in 1..=epochs {
        // Path 2: a plan step every rank derives identically, chunked.
        for dst in 0..w {
            t.put(me, src, dst * seg, &payload(0, me, dst, epoch, seg))
                .map_err(s)?;
        }
        t.put(me, buf, 0, &vec![POISON; w * seg]).map_err(s)?;
        t.barrier(T).map_err(s)?;
        let mut step = Vec::new();
        let mut r = ChaCha8Rng::seed_from_u64(epoch);
        for a in 0..w {
            for b in 0..w {
                let mut off = 0;
                while off < seg {
                    let len = r.gen_range(1..=seg / 2).min(seg - off);
                    step.push(Transfer {
                        src: a,
                        dst: b,
                        src_buf: src.into(),
                        src_offset: b * seg + off,
                        dst_buf: buf,
                        dst_offset: a * seg + off,
                        len,
                        signal: Some(((w + a) as u32, SignalOp::Add(1))),
                    });
                    off += len;
                }
            }
        }
        for (a, c) in counts.iter_mut().enumerate() {
            *c += step.iter().filter(|x| x.src == a && x.dst == me).count() as u64;
        }
        t.post(&step).map_err(s)?;
        for (from, &c) in counts.iter().enumerate() {
            t.wait((w + from) as u32, c, T).map_err(s)?;
            t.read(buf, from * seg, &mut out).map_err(s)?;
            if out != payload(0, from, me, epoch, seg) {
                return Err(format!(
                    "rank {me} epoch {epoch}: planned segment from {from} differs"
                ));
            }
        }
        t.barrier(T).map_err(s)?;
    }
    if t.peer_buffer_ptr(0, buf).map_err(s)?.is_some() {
        return Err("nccl must not claim peer pointers".into());
    }
    Ok(())
}

fn threads(w: usize) {
    let ex = ThreadExchange::world(w);
    std::thread::scope(|sc| {
        let hs: Vec<_> = ex
            .into_iter()
            .enumerate()
            .map(|(r, x)| {
                sc.spawn(move || {
                    let t =
                        NcclTransport::new(r, x as Arc<dyn BlobExchange>, NcclOptions::default())
                            .map_err(|e| e.to_string())?;
                    workload(&t, 20, 100_003)
                })
            })
            .collect();
        for h in hs {
            h.join().expect("rank thread").expect("nccl workload");
        }
    });
}

#[test]
#[ignore = "needs a GPU"]
fn world_of_one_on_one_gpu() {
    require(1);
    threads(1);
}

/// A rank that takes the unique id but never joins: the other's set-up
/// (inside NCCL, which waits for every rank with no bound of its own) ends
/// in an error that says so, not a thread blocked for good. One GPU does:
/// the missing rank never touches a device.
#[test]
#[ignore = "needs a GPU"]
fn a_rank_that_never_joins_fails_the_set_up() {
    require(1);
    let mut ex = ThreadExchange::world(2).into_iter();
    let (joins, leaves) = (ex.next().unwrap(), ex.next().unwrap());
    let leaver = std::thread::spawn(move || leaves.all_gather(&[], T).map(|_| ()));
    let opts = NcclOptions {
        collective_timeout: Duration::from_secs(3),
    };
    let got = NcclTransport::new(0, joins as Arc<dyn BlobExchange>, opts);
    leaver.join().expect("leaver").expect("id exchange");
    let e = got
        .err()
        .expect("set-up with a rank missing must fail")
        .to_string();
    for want in ["rank 0", "ncclCommInitRank", "still in progress", "aborted"] {
        assert!(e.contains(want), "{want:?} missing from: {e}");
    }
}

#[test]
#[ignore = "needs two GPUs"]
fn one_process_one_thread_per_gpu() {
    require(2);
    threads(cuda::device_count());
}

/// Entry point of one launched rank (inert without `COMET_NCCL_CHILD`).
#[test]
#[ignore = "a rank of a multi-process test, started by the launcher"]
fn child_rank() {
    let Some((boot, ordinal)) = child_bootstrap(CHILD_ENV, cuda::device_count()) else {
        return;
    };
    let t = NcclTransport::new(
        ordinal,
        boot as Arc<dyn BlobExchange>,
        NcclOptions::default(),
    )
    .expect("nccl up");
    workload(&t, 20, 1 << 20).expect("nccl workload");
    println!("rank {}: nccl workload ok", t.rank());
}

#[test]
#[ignore = "needs two GPUs"]
fn one_process_per_gpu() {
    require(2);
    let rep = expect_ok(launch_self_for(
        "child_rank",
        cuda::device_count(),
        &[(CHILD_ENV, "1"), ("NCCL_NVLS_ENABLE", "0")],
        OnFailure::KillAll,
        Duration::from_secs(300),
    ));
    assert_markers(&rep, |r| format!("rank {r}: nccl workload ok"));
}
