//! Put + signal throughput and latency of the nvlink transport, side by
//! side in one run with the plain copy the driver offers for the same
//! bytes (`cuMemcpyDtoD` when both ranks share a GPU, `cuMemcpyPeer`
//! between two GPUs).
//!
//! Two ranks in one process: rank 0 puts device memory into rank 1's
//! buffer and raises rank 1's signal after it, on its communication
//! stream. On a single GPU both ranks live on the same device, so the
//! numbers measure a same-device copy plus the signal, not a link.

use super::{NvlinkOptions, NvlinkTransport};
use crate::cuda;
use crate::error::TransportError;
use crate::gpu::DeviceTransport;
use crate::transport::{BufferId, SignalOp, Transport};
use cudarc::driver::{sys, CudaStream, DriverError};
use rand::{RngCore, SeedableRng};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use crate::gpu::GpuBenchRow;

/// What was measured, and on what.
#[derive(Debug, Clone)]
pub struct GpuBenchReport {
    pub device: String,
    /// Rank 0 and rank 1 devices.
    pub ordinals: [usize; 2],
    pub rows: Vec<GpuBenchRow>,
    pub notes: Vec<String>,
}

const BACKEND: &str = "nvlink-bench";

fn e(what: &str) -> impl Fn(DriverError) -> TransportError + '_ {
    move |err| cuda::driver_err(BACKEND, 0, what, err)
}

fn timed<F: FnMut() -> Result<(), TransportError>>(
    t: &NvlinkTransport,
    reps: usize,
    mut op: F,
) -> Result<f64, TransportError> {
    let ctx = t.context();
    let s: Arc<CudaStream> = t.comm_stream();
    let a = ctx
        .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(e("event"))?;
    let b = ctx
        .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(e("event"))?;
    a.record(&s).map_err(e("record"))?;
    for _ in 0..reps {
        op()?;
    }
    b.record(&s).map_err(e("record"))?;
    let ms = a.elapsed_ms(&b).map_err(e("elapsed"))?;
    Ok(f64::from(ms) * 1e-3)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs the benchmark on devices `ordinals` (equal on a one-GPU machine)
/// for every size in `sizes`.
pub fn run(ordinals: [usize; 2], sizes: &[usize]) -> Result<GpuBenchReport, TransportError> {
    let max = sizes.iter().copied().max().unwrap_or(0).max(8);
    let ranks = NvlinkTransport::in_process(&ordinals, NvlinkOptions::default())?;
    let ids: Vec<Result<(BufferId, BufferId), TransportError>> = std::thread::scope(|s| {
        let hs: Vec<_> = ranks
            .iter()
            .map(|t| {
                s.spawn(move || {
                    let src = t.alloc_buffer(max)?;
                    let dst = t.alloc_buffer(max)?;
                    t.alloc_signals(2)?;
                    Ok((src, dst))
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(TransportError::Bootstrap("bench setup panicked".into()))
                })
            })
            .collect()
    });
    let mut got = Vec::new();
    for r in ids {
        got.push(r?);
    }
    let (src, dst) = got[0];
    let (t0, t1) = (&ranks[0], &ranks[1]);
    // Random bytes, never zeros.
    let mut bytes = vec![0u8; max];
    rand_chacha::ChaCha8Rng::seed_from_u64(7).fill_bytes(&mut bytes);
    t0.put(0, src, 0, &bytes)?;
    t0.synchronize()?;
    let src_ptr = t0.buffer_ptr(src)?;
    let dst_ptr = t0.peer_buffer_ptr(1, dst)?.unwrap_or(0);
    let same_device = ordinals[0] == ordinals[1];
    let stream = t0.comm_stream();
    let ctx0 = t0.context().clone();
    let ctx1 = t1.context().clone();
    let baseline_name = if same_device {
        "cuMemcpyDtoDAsync"
    } else {
        "cuMemcpyPeerAsync"
    };
    let copy = |n: usize| -> Result<(), TransportError> {
        // SAFETY: both ranges lie inside live symmetric buffers of `max` bytes.
        unsafe {
            if same_device {
                cuda::copy_dtod_async(&stream, dst_ptr, src_ptr, n)
            } else {
                cuda::copy_peer_async(&stream, dst_ptr, &ctx1, src_ptr, &ctx0, n)
            }
        }
        .map_err(e("baseline copy"))
    };
    let mut epoch = 0u64;
    let mut rows = Vec::new();
    for &n in sizes {
        let reps = ((256usize << 20) / n.max(1)).clamp(20, 2000);
        // Warm-up of both methods.
        for _ in 0..3 {
            copy(n)?;
            epoch += 1;
            t0.put_device(1, dst, 0, src_ptr, n)?;
            t0.signal(1, 0, SignalOp::Set(epoch))?;
        }
        t0.synchronize()?;
        let base_s = timed(t0, reps, || copy(n))?;
        let put_s = timed(t0, reps, || {
            epoch += 1;
            t0.put_device(1, dst, 0, src_ptr, n)?;
            t0.signal(1, 0, SignalOp::Set(epoch))
        })?;
        let mut base_one = Vec::new();
        let mut put_one = Vec::new();
        let mut host = Vec::new();
        for _ in 0..25 {
            base_one.push(timed(t0, 1, || copy(n))?);
            put_one.push(timed(t0, 1, || {
                epoch += 1;
                t0.put_device(1, dst, 0, src_ptr, n)?;
                t0.signal(1, 0, SignalOp::Set(epoch))
            })?);
            epoch += 1;
            let start = Instant::now();
            t0.put_device(1, dst, 0, src_ptr, n)?;
            t0.signal(1, 0, SignalOp::Set(epoch))?;
            // Rank 1 polls its own word, as a host-driven receiver would.
            t1.wait(0, epoch, Duration::from_secs(10))?;
            host.push(start.elapsed().as_secs_f64());
        }
        let gb = |s: f64| (n * reps) as f64 / s / 1e9;
        rows.push(GpuBenchRow {
            method: baseline_name.into(),
            bytes: n,
            gb_per_s: gb(base_s),
            device_us: median(base_one) * 1e6,
            host_us: None,
        });
        rows.push(GpuBenchRow {
            method: "nvlink put+signal".into(),
            bytes: n,
            gb_per_s: gb(put_s),
            device_us: median(put_one) * 1e6,
            host_us: Some(median(host) * 1e6),
        });
        tracing::info!(
            bytes = n,
            base_gbps = gb(base_s),
            put_gbps = gb(put_s),
            "nvlink bench point"
        );
    }
    let mut notes = Vec::new();
    if same_device {
        notes.push(format!(
            "both ranks on device {}: a same-device copy (read + write of the same HBM) plus the signal; no link is measured",
            ordinals[0]
        ));
    }
    notes.push(
        "NCCL rows need one GPU per rank (NCCL refuses two ranks on one GPU); not run here".into(),
    );
    let device = ctx0.name().unwrap_or_else(|_| "unknown".into());
    std::thread::scope(|s| {
        for t in ranks {
            s.spawn(move || t.shutdown(Duration::from_secs(30)));
        }
    });
    Ok(GpuBenchReport {
        device,
        ordinals,
        rows,
        notes,
    })
}

/// The report as a markdown table (for docs/PERF.md and the CLI).
pub fn markdown(r: &GpuBenchReport) -> String {
    let mut s = format!(
        "device: {} (ranks on devices {} and {})\n\n",
        r.device, r.ordinals[0], r.ordinals[1]
    );
    s.push_str("| method | bytes | GB/s | device us/op | host-observed us |\n| --- | ---: | ---: | ---: | ---: |\n");
    for row in &r.rows {
        let host = row.host_us.map_or("-".to_string(), |h| format!("{h:.1}"));
        s.push_str(&format!(
            "| {} | {} | {:.1} | {:.2} | {} |\n",
            row.method, row.bytes, row.gb_per_s, row.device_us, host
        ));
    }
    for n in &r.notes {
        s.push_str(&format!("\nNote: {n}\n"));
    }
    s
}
