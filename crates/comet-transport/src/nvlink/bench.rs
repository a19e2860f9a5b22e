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
    let (src, dst) = alloc_pair(&ranks, max)?;
    let mut pair = Pair::new(&ranks, src, dst, max, ordinals[0] == ordinals[1])?;
    let mut rows = Vec::new();
    for &n in sizes {
        rows.extend(pair.measure(n)?);
    }
    let mut notes = Vec::new();
    if pair.same_device {
        notes.push(format!(
            "both ranks on device {}: a same-device copy (read + write of the same HBM) plus the signal; no link is measured",
            ordinals[0]
        ));
    }
    notes.push(
        "NCCL rows need one GPU per rank (NCCL refuses two ranks on one GPU); not run here".into(),
    );
    let device = ranks[0]
        .context()
        .name()
        .unwrap_or_else(|_| "unknown".into());
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

/// Collective: a source and a destination buffer of `max` bytes and two
/// signals on each rank (a thread each); rank 0's ids.
fn alloc_pair(
    ranks: &[NvlinkTransport],
    max: usize,
) -> Result<(BufferId, BufferId), TransportError> {
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
    ids.into_iter()
        .collect::<Result<Vec<_>, _>>()
        .map(|got| got[0])
}

/// Rank 0 putting its source buffer (random bytes, never zeros) into rank
/// 1's destination buffer, by the transport and by the driver's copy.
struct Pair<'a> {
    t0: &'a NvlinkTransport,
    t1: &'a NvlinkTransport,
    dst: BufferId,
    src_ptr: u64,
    dst_ptr: u64,
    same_device: bool,
    stream: Arc<CudaStream>,
    epoch: u64,
}

impl<'a> Pair<'a> {
    fn new(
        ranks: &'a [NvlinkTransport],
        src: BufferId,
        dst: BufferId,
        max: usize,
        same_device: bool,
    ) -> Result<Self, TransportError> {
        let (t0, t1) = (&ranks[0], &ranks[1]);
        let mut bytes = vec![0u8; max];
        rand_chacha::ChaCha8Rng::seed_from_u64(7).fill_bytes(&mut bytes);
        t0.put(0, src, 0, &bytes)?;
        t0.synchronize()?;
        Ok(Self {
            t0,
            t1,
            dst,
            src_ptr: t0.buffer_ptr(src)?,
            dst_ptr: t0.peer_buffer_ptr(1, dst)?.unwrap_or(0),
            same_device,
            stream: t0.comm_stream(),
            epoch: 0,
        })
    }

    fn baseline_name(&self) -> &'static str {
        if self.same_device {
            "cuMemcpyDtoDAsync"
        } else {
            "cuMemcpyPeerAsync"
        }
    }

    /// The driver's copy of `n` bytes.
    fn copy(&self, n: usize) -> Result<(), TransportError> {
        // SAFETY: both ranges lie inside live symmetric buffers of `max` bytes.
        unsafe {
            if self.same_device {
                cuda::copy_dtod_async(&self.stream, self.dst_ptr, self.src_ptr, n)
            } else {
                let (ctx0, ctx1) = (self.t0.context(), self.t1.context());
                cuda::copy_peer_async(&self.stream, self.dst_ptr, ctx1, self.src_ptr, ctx0, n)
            }
        }
        .map_err(e("baseline copy"))
    }

    /// The transport's put of `n` bytes and the signal after it.
    fn put(&mut self, n: usize) -> Result<(), TransportError> {
        self.epoch += 1;
        self.t0.put_device(1, self.dst, 0, self.src_ptr, n)?;
        self.t0.signal(1, 0, SignalOp::Set(self.epoch))
    }

    /// Both methods at `n` bytes: throughput over many repetitions, the
    /// device time of one, and for the put the time until rank 1's host
    /// sees the signal.
    fn measure(&mut self, n: usize) -> Result<[GpuBenchRow; 2], TransportError> {
        let t0 = self.t0;
        let reps = ((256usize << 20) / n.max(1)).clamp(20, 2000);
        for _ in 0..3 {
            self.copy(n)?;
            self.put(n)?;
        }
        t0.synchronize()?;
        let base_s = timed(t0, reps, || self.copy(n))?;
        let put_s = timed(t0, reps, || self.put(n))?;
        let (mut base_one, mut put_one, mut host) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..25 {
            base_one.push(timed(t0, 1, || self.copy(n))?);
            put_one.push(timed(t0, 1, || self.put(n))?);
            let start = Instant::now();
            self.put(n)?;
            // Rank 1 polls its own word, as a host-driven receiver would.
            self.t1.wait(0, self.epoch, Duration::from_secs(10))?;
            host.push(start.elapsed().as_secs_f64());
        }
        let gb = |s: f64| (n * reps) as f64 / s / 1e9;
        tracing::info!(
            bytes = n,
            base_gbps = gb(base_s),
            put_gbps = gb(put_s),
            "nvlink bench point"
        );
        Ok([
            GpuBenchRow {
                method: self.baseline_name().into(),
                bytes: n,
                gb_per_s: gb(base_s),
                device_us: median(base_one) * 1e6,
                host_us: None,
            },
            GpuBenchRow {
                method: "nvlink put+signal".into(),
                bytes: n,
                gb_per_s: gb(put_s),
                device_us: median(put_one) * 1e6,
                host_us: Some(median(host) * 1e6),
            },
        ])
    }
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
