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

use comet_transport::bootstrap::Bootstrap;
use comet_transport::cuda;
use comet_transport::gpu::{BlobExchange, DeviceTransport, ThreadExchange};
use comet_transport::launch::{launch, LaunchConfig};
use comet_transport::nccl::ffi::nccl_available;
use comet_transport::nccl::plan::Transfer;
use comet_transport::nccl::{NcclOptions, NcclTransport};
use comet_transport::{SignalOp, Transport, TransportError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;
use std::time::Duration;

const CHILD_ENV: &str = "COMET_NCCL_CHILD";
const T: Duration = Duration::from_secs(60);
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

fn payload(epoch: u64, src: usize, dst: usize, len: usize) -> Vec<u8> {
    let mut r = ChaCha8Rng::seed_from_u64((epoch << 16) ^ ((src as u64) << 8) ^ dst as u64);
    (0..len).map(|_| r.gen()).collect()
}

/// Staged puts + signals moved at each barrier, then plan steps posted by
/// every rank from the same transfer list, with counter signals; buffers
/// and signals reused across epochs, never reset.
fn workload(t: &NcclTransport, epochs: u64, seg: usize) -> Result<(), String> {
    let w = t.world();
    let me = t.rank();
    let s = |e: TransportError| e.to_string();
    let buf = t.alloc_buffer(w * seg).map_err(s)?;
    let src = t.alloc_buffer(w * seg).map_err(s)?;
    t.alloc_signals(2 * w + 1).map_err(s)?;
    let mut counts = vec![0u64; w];
    for epoch in 1..=epochs {
        // Path 1: the plain Transport calls (staged, moved at the barrier).
        t.put(me, buf, 0, &vec![POISON; w * seg]).map_err(s)?;
        t.barrier(T).map_err(s)?;
        for dst in 0..w {
            t.put(dst, buf, me * seg, &payload(epoch, me, dst, seg))
                .map_err(s)?;
            t.signal(dst, me as u32, SignalOp::Set(epoch)).map_err(s)?;
        }
        t.barrier(T).map_err(s)?;
        let mut out = vec![0u8; seg];
        for from in 0..w {
            t.wait(from as u32, epoch, T).map_err(s)?;
            t.read(buf, from * seg, &mut out).map_err(s)?;
            if out != payload(epoch, from, me, seg) {
                return Err(format!(
                    "rank {me} epoch {epoch}: staged segment from {from} differs"
                ));
            }
        }
        // Path 2: a plan step every rank derives identically, chunked.
        for dst in 0..w {
            t.put(me, src, dst * seg, &payload(epoch + 1000, me, dst, seg))
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
            if out != payload(epoch + 1000, from, me, seg) {
                return Err(format!(
                    "rank {me} epoch {epoch}: planned segment from {from} differs"
                ));
            }
        }
        t.barrier(T).map_err(s)?;
    }
    let never = (2 * w) as u32;
    match t.wait(never, 1, Duration::from_millis(50)) {
        Err(TransportError::WaitTimeout { rank, signal, .. }) if rank == me && signal == never => {}
        other => return Err(format!("never-raised signal gave {other:?}")),
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
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let boot = Arc::new(Bootstrap::from_env().expect("bootstrap"));
    let ordinal = boot.rank() % cuda::device_count().max(1);
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
    let exe = std::env::current_exe().expect("test binary");
    let mut cfg = LaunchConfig {
        timeout: Some(Duration::from_secs(300)),
        ..LaunchConfig::new(cuda::device_count(), exe)
    }
    .args([
        "--exact",
        "child_rank",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD_ENV, "1")
    .env("NCCL_NVLS_ENABLE", "0");
    cfg.capture = true;
    let rep = launch(&cfg).unwrap_or_else(|e| panic!("{e}"));
    for r in &rep.ranks {
        let want = format!("rank {}: nccl workload ok", r.rank);
        assert!(
            r.success() && r.output.iter().any(|l| l.contains(&want)),
            "rank {} ({}) did not print {want:?}:\n{}",
            r.rank,
            r.describe(),
            r.text()
        );
    }
}
