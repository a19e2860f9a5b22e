//! Chunk throughput and latency of the nccl transport between two GPUs:
//! rank 0 sends one chunk per step to rank 1 (one NCCL group each), rank 1
//! raises its signal on its stream after the receive, as comet-sched's
//! proxy does per chunk. Needs two GPUs (NCCL refuses two ranks on one).

use super::plan::Transfer;
use super::{NcclOptions, NcclTransport};
use crate::cuda;
use crate::error::TransportError;
use crate::gpu::{BlobExchange, DeviceTransport, GpuBenchRow, ThreadExchange};
use crate::transport::{BufferId, SignalOp, Transport};
use cudarc::driver::sys;
use rand::{RngCore, SeedableRng};
use std::sync::Arc;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(120);

fn e(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> TransportError {
    move |err| cuda::driver_err("nccl-bench", 0, what, err)
}

fn step(n: usize, src: BufferId, dst: BufferId, epoch: u64) -> [Transfer; 1] {
    [Transfer {
        src: 0,
        dst: 1,
        src_buf: src.into(),
        src_offset: 0,
        dst_buf: dst,
        dst_offset: 0,
        len: n,
        signal: Some((0, SignalOp::Set(epoch))),
    }]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Per size: (bandwidth seconds for `reps`, single-op device seconds,
/// host-observed seconds at the receiver).
type Point = (usize, usize, f64, Vec<f64>, Vec<f64>);

fn rank_loop(t: &NcclTransport, sizes: &[usize], max: usize) -> Result<Vec<Point>, TransportError> {
    let src = t.alloc_buffer(max)?;
    let dst = t.alloc_buffer(max)?;
    t.alloc_signals(1)?;
    if t.rank() == 0 {
        let mut bytes = vec![0u8; max];
        rand_chacha::ChaCha8Rng::seed_from_u64(11).fill_bytes(&mut bytes);
        t.put(0, src, 0, &bytes)?;
    }
    t.barrier(T)?;
    let ctx = t.context().clone();
    let s = t.comm_stream();
    let ev = || {
        ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(e("event"))
    };
    let mut epoch = 0u64;
    let mut out = Vec::new();
    for &n in sizes {
        let reps = ((256usize << 20) / n.max(1)).clamp(20, 2000);
        for _ in 0..3 {
            epoch += 1;
            t.post(&step(n, src, dst, epoch))?;
        }
        t.synchronize(T)?;
        t.barrier(T)?;
        let (a, b) = (ev()?, ev()?);
        a.record(&s).map_err(e("record"))?;
        for _ in 0..reps {
            epoch += 1;
            t.post(&step(n, src, dst, epoch))?;
        }
        b.record(&s).map_err(e("record"))?;
        let bw = f64::from(a.elapsed_ms(&b).map_err(e("elapsed"))?) * 1e-3;
        t.synchronize(T)?;
        let mut one = Vec::new();
        let mut host = Vec::new();
        for _ in 0..25 {
            t.barrier(T)?;
            epoch += 1;
            let (a, b) = (ev()?, ev()?);
            let start = Instant::now();
            a.record(&s).map_err(e("record"))?;
            t.post(&step(n, src, dst, epoch))?;
            b.record(&s).map_err(e("record"))?;
            if t.rank() == 1 {
                t.wait(0, epoch, T)?;
                host.push(start.elapsed().as_secs_f64());
            }
            one.push(f64::from(a.elapsed_ms(&b).map_err(e("elapsed"))?) * 1e-3);
        }
        t.synchronize(T)?;
        out.push((n, reps, bw, one, host));
    }
    Ok(out)
}

/// Runs on devices `ordinals` (two different GPUs); one row per size.
pub fn run(ordinals: [usize; 2], sizes: &[usize]) -> Result<Vec<GpuBenchRow>, TransportError> {
    if ordinals[0] == ordinals[1] {
        return Err(TransportError::Backend {
            backend: "nccl",
            rank: 0,
            message: "the nccl bench needs two different GPUs".into(),
        });
    }
    let max = sizes.iter().copied().max().unwrap_or(0).max(8);
    let ex = ThreadExchange::world(2);
    let results: Vec<Result<Vec<Point>, TransportError>> = std::thread::scope(|sc| {
        let hs: Vec<_> = ex
            .into_iter()
            .zip(ordinals)
            .map(|(x, o)| {
                sc.spawn(move || {
                    let t =
                        NcclTransport::new(o, x as Arc<dyn BlobExchange>, NcclOptions::default())?;
                    rank_loop(&t, sizes, max)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(TransportError::Bootstrap(
                        "nccl bench thread panicked".into(),
                    ))
                })
            })
            .collect()
    });
    let mut it = results.into_iter();
    let (r0, r1) = match (it.next(), it.next()) {
        (Some(a), Some(b)) => (a?, b?),
        _ => return Err(TransportError::Bootstrap("nccl bench lost a rank".into())),
    };
    Ok(r0
        .into_iter()
        .zip(r1)
        .map(|((n, reps, bw, one, _), (_, _, _, _, host))| GpuBenchRow {
            method: "nccl send/recv+signal".into(),
            bytes: n,
            gb_per_s: (n * reps) as f64 / bw / 1e9,
            device_us: median(one) * 1e6,
            host_us: Some(median(host) * 1e6),
        })
        .collect())
}
