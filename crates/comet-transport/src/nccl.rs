//! The `nccl` transport: host-driven chunk transfers through NCCL
//! point-to-point, ending in the same signal ABI as `nvlink`.
//!
//! A communicator is built from a unique id that rank 0 creates and the
//! bootstrap all-gathers ([`BlobExchange`]); NCCL needs one GPU per rank.
//! Buffers and signal arrays are plain `cuMemAlloc` memory of each rank;
//! peers never map them.
//!
//! Data moves in steps ([`plan::Transfer`] lists). NCCL needs the receiver
//! to post a matching recv for every send, so both sides must know the
//! step: comet-sched derives it on every rank from the same layout plan and
//! calls [`NcclTransport::post`] as tiles complete (the proxy of DESIGN.md
//! section 4); each step is one NCCL group of sends and recvs on the
//! communication stream, and the receiver's signals are raised after the
//! group on that stream (`cuStreamWriteValue64`, or a one-thread release
//! add for counters), so a GEMM waits on them exactly as on nvlink.
//!
//! The plain [`Transport`] calls work too, but host-driven: `put` and
//! `signal` are staged on the sender and move at the next collective
//! `barrier` (or [`NcclTransport::flush`]), where the ranks all-gather
//! what they staged so that every receiver knows what to post. A `wait` for
//! a signal whose put has not been flushed yet times out.
//!
//! Every host-side wait is bounded: the stream is polled, not synchronised,
//! and a step that cannot complete (a peer that never posts or died)
//! aborts the communicator and becomes an error.

pub mod bench;
pub mod ffi;
pub mod plan;

use crate::cuda::{self, DeviceAlloc};
use crate::error::TransportError;
use crate::gpu::{BlobExchange, DeviceTransport, RankDevice};
use crate::signal_core::{
    buffer, check_range, locate, poll_bounded, Owner, Polled, Round, SignalSlots,
};
use crate::transport::{
    check_rank, BufferId, Capabilities, Initiation, SignalId, SignalOp, Transport,
};
use cudarc::driver::{CudaContext, CudaStream};
use ffi::Way;
use plan::{LocalOp, Source, Transfer};
use std::fmt::Display;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

const BACKEND: &str = "nccl";

/// Settings of an [`NcclTransport`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NcclOptions {
    /// Bound of setup, allocations and each step's completion.
    pub collective_timeout: Duration,
}

impl Default for NcclOptions {
    fn default() -> Self {
        Self {
            collective_timeout: Duration::from_secs(120),
        }
    }
}

struct Staged {
    transfers: Vec<Transfer>,
    host: Vec<u8>,
}

struct Inner {
    comm: ffi::RawComm,
    buffers: Vec<DeviceAlloc>,
    signals: Option<(DeviceAlloc, SignalSlots)>,
    staging: Option<DeviceAlloc>,
    staged: Staged,
}

/// One rank of an NCCL world.
pub struct NcclTransport {
    rank: usize,
    world: usize,
    dev: RankDevice,
    exchange: Arc<dyn BlobExchange>,
    opts: NcclOptions,
    inner: Mutex<Inner>,
}

fn nccl_err(rank: usize, what: &str, e: impl Into<ffi::CommError>) -> TransportError {
    TransportError::Backend {
        backend: BACKEND,
        rank,
        message: format!("{what}: {}", e.into()),
    }
}

impl NcclTransport {
    /// Collective: joins the world of `exchange` on device `ordinal`.
    pub fn new(
        ordinal: usize,
        exchange: Arc<dyn BlobExchange>,
        opts: NcclOptions,
    ) -> Result<Self, TransportError> {
        let rank = exchange.rank();
        let world = exchange.world();
        if !cuda::gpu_available() {
            return Err(TransportError::Backend {
                backend: BACKEND,
                rank,
                message: "no CUDA driver or device".into(),
            });
        }
        if !ffi::nccl_available() {
            return Err(TransportError::Backend {
                backend: BACKEND,
                rank,
                message: "libnccl cannot be loaded: comet loads it (through cudarc) as libnccl.so, which \
                          NCCL's packages and pip wheels ship only as libnccl.so.2; put a \
                          libnccl.so link to it on LD_LIBRARY_PATH (scripts/nccl-layer.sh shows how)"
                    .into(),
            });
        }
        if ordinal >= cuda::device_count() || i32::try_from(world).is_err() {
            return Err(TransportError::Backend {
                backend: BACKEND,
                rank,
                message: format!(
                    "device {ordinal} of {} / world {world} is not usable",
                    cuda::device_count()
                ),
            });
        }
        let dev = RankDevice::open(BACKEND, rank, ordinal)?;
        let mine = if rank == 0 {
            ffi::unique_id()
                .map_err(|e| nccl_err(rank, "ncclGetUniqueId", e))?
                .to_vec()
        } else {
            Vec::new()
        };
        let all = exchange.all_gather(&mine, opts.collective_timeout)?;
        let id: [u8; 128] = all
            .first()
            .and_then(|b| b.as_slice().try_into().ok())
            .ok_or_else(|| TransportError::Mismatch {
                rank,
                what: "nccl unique id",
                detail: format!(
                    "rank 0 sent {} bytes, not 128",
                    all.first().map_or(0, Vec::len)
                ),
            })?;
        dev.bind()?;
        let comm = ffi::RawComm::init(&id, rank, world, opts.collective_timeout)
            .map_err(|e| nccl_err(rank, "ncclCommInitRank", e))?;
        tracing::debug!(rank, world, ordinal, "nccl transport up");
        Ok(Self {
            rank,
            world,
            dev,
            exchange,
            opts,
            inner: Mutex::new(Inner {
                comm,
                buffers: Vec::new(),
                signals: None,
                staging: None,
                staged: Staged {
                    transfers: Vec::new(),
                    host: Vec::new(),
                },
            }),
        })
    }

    /// The CUDA context of this rank's device.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.dev.ctx
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The device address of `len` bytes at `offset` in this rank's
    /// `buf`, bounds-checked.
    fn local_range(
        &self,
        inner: &Inner,
        buf: BufferId,
        offset: usize,
        len: usize,
        what: &str,
    ) -> Result<u64, TransportError> {
        let b = buffer(self.rank, &inner.buffers, buf)?;
        self.in_bounds(b, offset, len, format_args!("{what} buffer {}", buf.0))
    }

    /// As [`Self::local_range`], for any source of a transfer.
    fn source_range(
        &self,
        inner: &Inner,
        src: Source,
        offset: usize,
        len: usize,
        what: &str,
    ) -> Result<u64, TransportError> {
        match src {
            Source::Buffer(b) => self.local_range(inner, b, offset, len, what),
            Source::RawDevice => Ok(offset as u64),
            Source::Staging => {
                let s = inner
                    .staging
                    .as_ref()
                    .ok_or_else(|| TransportError::NotAllocated {
                        rank: self.rank,
                        what: "staging".into(),
                    })?;
                self.in_bounds(s, offset, len, format_args!("{what} staging"))
            }
        }
    }

    fn in_bounds(
        &self,
        a: &DeviceAlloc,
        offset: usize,
        len: usize,
        what: impl Display,
    ) -> Result<u64, TransportError> {
        check_range(self.rank, what, offset, len, a.bytes())?;
        Ok(a.ptr() + offset as u64)
    }

    /// The address of this rank's signal `sig`, checked. Raises towards
    /// a peer check the same index here: signal arrays are symmetric.
    fn signal_addr(&self, inner: &Inner, sig: SignalId) -> Result<u64, TransportError> {
        let ((s, _), off) = locate(
            self.rank,
            inner.signals.as_ref(),
            |(_, n)| *n,
            sig,
            Owner::Local,
        )?;
        Ok(s.ptr() + off as u64)
    }

    /// Collective over the ranks named in `step`: enqueues this rank's part
    /// of it on the communication stream (copies, one NCCL group of sends
    /// and recvs, then the signals this rank receives). Every rank must
    /// post the same steps in the same order; returns once enqueued.
    pub fn post(&self, step: &[Transfer]) -> Result<(), TransportError> {
        let ops = plan::lower(self.rank, self.world, step)?;
        let mut inner = self.inner();
        self.enqueue(&mut inner, &ops)
    }

    fn enqueue(&self, inner: &mut Inner, ops: &[LocalOp]) -> Result<(), TransportError> {
        self.dev.bind()?;
        // Resolve and bounds-check every address before enqueuing anything.
        let mut addrs = Vec::with_capacity(ops.len());
        for op in ops {
            addrs.push(match *op {
                LocalOp::Copy {
                    src_buf,
                    src_offset,
                    dst_buf,
                    dst_offset,
                    len,
                } => (
                    self.source_range(inner, src_buf, src_offset, len, "copy from")?,
                    self.local_range(inner, dst_buf, dst_offset, len, "copy to")?,
                ),
                LocalOp::Send {
                    buf, offset, len, ..
                } => (self.source_range(inner, buf, offset, len, "send from")?, 0),
                LocalOp::Recv {
                    buf, offset, len, ..
                } => (self.local_range(inner, buf, offset, len, "recv into")?, 0),
                LocalOp::Signal { sig, .. } => (self.signal_addr(inner, sig)?, 0),
            });
        }
        let mut in_group = false;
        let enqueued = self.enqueue_resolved(inner, ops, &addrs, &mut in_group);
        if enqueued.is_err() {
            // Leave no group open on this thread (NCCL would defer every
            // later call of it, an abort too), then give the communicator
            // up: part of the step may be queued.
            if in_group {
                ffi::group_abandon();
            }
            inner.comm.abort();
        }
        enqueued
    }

    /// `ops` at their resolved addresses, sends and receives in groups
    /// (`in_group` says whether one is open, for the caller's cleanup).
    fn enqueue_resolved(
        &self,
        inner: &mut Inner,
        ops: &[LocalOp],
        addrs: &[(u64, u64)],
        in_group: &mut bool,
    ) -> Result<(), TransportError> {
        for (op, &(a, b)) in ops.iter().zip(addrs) {
            let grouped = matches!(op, LocalOp::Send { .. } | LocalOp::Recv { .. });
            if grouped && !*in_group {
                ffi::group_start().map_err(|e| nccl_err(self.rank, "ncclGroupStart", e))?;
                *in_group = true;
            }
            if !grouped && *in_group {
                // Closed by ncclGroupEnd whatever it returns.
                *in_group = false;
                inner
                    .comm
                    .group_end()
                    .map_err(|e| nccl_err(self.rank, "ncclGroupEnd", e))?;
            }
            match *op {
                // SAFETY (all arms): addresses were resolved against live
                // allocations of this rank and bounds-checked above.
                LocalOp::Copy { len, .. } => {
                    unsafe { cuda::copy_dtod_async(&self.dev.stream, b, a, len) }
                        .map_err(|e| self.dev.err("local copy", e))?
                }
                LocalOp::Send { peer, len, .. } => {
                    unsafe { inner.comm.queue(Way::Send, a, len, peer, &self.dev.stream) }
                        .map_err(|e| nccl_err(self.rank, "ncclSend", e))?
                }
                LocalOp::Recv { peer, len, .. } => {
                    unsafe { inner.comm.queue(Way::Recv, a, len, peer, &self.dev.stream) }
                        .map_err(|e| nccl_err(self.rank, "ncclRecv", e))?
                }
                LocalOp::Signal { op, .. } => {
                    unsafe { self.dev.raise.raise(&self.dev.stream, a, op) }
                        .map_err(|e| self.dev.err("signal", e))?
                }
            }
        }
        if *in_group {
            *in_group = false;
            inner
                .comm
                .group_end()
                .map_err(|e| nccl_err(self.rank, "ncclGroupEnd", e))?;
        }
        Ok(())
    }

    /// Collective over the world: the ranks that pass the same `color`
    /// get a new communicator of their own, ordered by `key` (`None`
    /// joins none), whose NCCL kernels use at most `max_ctas` CTAs and
    /// whose calls are bounded by `bound`. Every rank makes the same splits
    /// in the same order; a proxy builds its lanes this way (one
    /// communicator per ordered pair of ranks).
    pub fn split(
        &self,
        color: Option<u32>,
        key: usize,
        max_ctas: Option<u32>,
        bound: Duration,
    ) -> Result<Option<ffi::RawComm>, TransportError> {
        let have = ffi::version().map_err(|e| nccl_err(self.rank, "ncclGetVersion", e))?;
        if have < ffi::SPLIT_SINCE {
            return Err(TransportError::Backend {
                backend: BACKEND,
                rank: self.rank,
                message: format!(
                    "libnccl {have} has no ncclCommSplit (needs {} or later)",
                    ffi::SPLIT_SINCE
                ),
            });
        }
        self.dev.bind()?;
        self.inner()
            .comm
            .split(color, key, max_ctas, bound)
            .map_err(|e| nccl_err(self.rank, "ncclCommSplit", e))
    }

    /// Waits for the communication stream, bounded: a step whose peer never
    /// posts aborts the communicator and returns an error.
    pub fn synchronize(&self, timeout: Duration) -> Result<(), TransportError> {
        self.dev.bind()?;
        let look = |_: Round| match cuda::stream_idle(&self.dev.stream) {
            Ok(idle) => Ok(idle.then_some(())),
            Err(e) => Err(self.dev.err("communication stream", e)),
        };
        match poll_bounded(timeout, look, std::thread::sleep)? {
            Polled::Ready(()) => Ok(()),
            Polled::TimedOut(waited) => {
                self.inner().comm.abort();
                Err(TransportError::Backend {
                    backend: BACKEND,
                    rank: self.rank,
                    message: format!("a step did not complete within {waited:?} (a peer never posted its side?); communicator aborted"),
                })
            }
        }
    }

    /// Collective: moves everything staged by `put`/`signal` on every rank.
    pub fn flush(&self, timeout: Duration) -> Result<(), TransportError> {
        let (mine, host) = {
            let mut inner = self.inner();
            let s = std::mem::replace(
                &mut inner.staged,
                Staged {
                    transfers: Vec::new(),
                    host: Vec::new(),
                },
            );
            (s.transfers, s.host)
        };
        let all = self.exchange.all_gather(&plan::encode(&mine), timeout)?;
        let mut step = Vec::new();
        for (from, raw) in all.iter().enumerate() {
            step.extend(plan::decode(self.rank, from, raw)?);
        }
        if step.is_empty() {
            return Ok(());
        }
        let ops = plan::lower(self.rank, self.world, &step)?;
        {
            let mut inner = self.inner();
            if !host.is_empty() {
                self.dev.bind()?;
                if inner
                    .staging
                    .as_ref()
                    .is_none_or(|s| s.bytes() < host.len())
                {
                    inner.staging = None;
                    inner.staging = Some(
                        DeviceAlloc::zeroed(&self.dev.ctx, host.len())
                            .map_err(|e| self.dev.err("staging", e))?,
                    );
                }
                let dst = inner.staging.as_ref().map_or(0, DeviceAlloc::ptr);
                // SAFETY: staging holds at least `host.len()` bytes; `host`
                // is pageable, so the driver consumed it before returning,
                // and it lives until the stream is synchronised below anyway.
                unsafe { cuda::copy_htod_async(&self.dev.stream, dst, &host) }
                    .map_err(|e| self.dev.err("stage puts", e))?;
            }
            self.enqueue(&mut inner, &ops)?;
        }
        self.synchronize(timeout)
    }

    fn check_sizes(&self, what: &'static str, bytes: usize) -> Result<(), TransportError> {
        let all = self
            .exchange
            .all_gather(&(bytes as u64).to_le_bytes(), self.opts.collective_timeout)?;
        for (peer, b) in all.iter().enumerate() {
            let theirs = b
                .as_slice()
                .try_into()
                .map(u64::from_le_bytes)
                .unwrap_or(u64::MAX);
            if theirs != bytes as u64 {
                return Err(TransportError::Mismatch {
                    rank: self.rank,
                    what,
                    detail: format!("{bytes} bytes here but {theirs} on rank {peer}"),
                });
            }
        }
        Ok(())
    }
}

impl Drop for NcclTransport {
    fn drop(&mut self) {
        if self.dev.ctx.bind_to_thread().is_ok()
            && self.synchronize(Duration::from_secs(10)).is_err()
        {
            tracing::warn!(
                rank = self.rank,
                "nccl transport dropped with unfinished steps; communicator aborted"
            );
        }
    }
}

impl Transport for NcclTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            name: "nccl",
            initiation: Initiation::Host,
            device_memory: true,
        }
    }

    fn alloc_buffer(&self, bytes: usize) -> Result<BufferId, TransportError> {
        self.check_sizes("alloc_buffer", bytes)?;
        self.dev.bind()?;
        let b = DeviceAlloc::zeroed(&self.dev.ctx, bytes)
            .map_err(|e| self.dev.err("alloc_buffer", e))?;
        let mut inner = self.inner();
        inner.buffers.push(b);
        Ok(BufferId((inner.buffers.len() - 1) as u32))
    }

    fn alloc_signals(&self, count: usize) -> Result<(), TransportError> {
        self.synchronize(self.opts.collective_timeout)?;
        let slots = SignalSlots::new(count);
        let bytes = slots.bytes(self.rank)?;
        self.check_sizes("alloc_signals", bytes)?;
        self.dev.bind()?;
        let s = DeviceAlloc::zeroed(&self.dev.ctx, bytes)
            .map_err(|e| self.dev.err("alloc_signals", e))?;
        self.inner().signals = Some((s, slots));
        Ok(())
    }

    fn put(
        &self,
        dst: usize,
        buf: BufferId,
        offset: usize,
        data: &[u8],
    ) -> Result<(), TransportError> {
        check_rank(self, dst)?;
        let mut inner = self.inner();
        // Symmetric buffers: our size is the peer's size.
        self.local_range(&inner, buf, offset, data.len(), "put to")?;
        let at = inner.staged.host.len();
        inner.staged.host.extend_from_slice(data);
        inner.staged.transfers.push(Transfer {
            src: self.rank,
            dst,
            src_buf: Source::Staging,
            src_offset: at,
            dst_buf: buf,
            dst_offset: offset,
            len: data.len(),
            signal: None,
        });
        Ok(())
    }

    fn signal(&self, dst: usize, sig: SignalId, op: SignalOp) -> Result<(), TransportError> {
        check_rank(self, dst)?;
        let mut inner = self.inner();
        self.signal_addr(&inner, sig)?;
        inner.staged.transfers.push(Transfer {
            src: self.rank,
            dst,
            src_buf: Source::Staging,
            src_offset: 0,
            dst_buf: BufferId(0),
            dst_offset: 0,
            len: 0,
            signal: Some((sig, op)),
        });
        Ok(())
    }

    fn wait(&self, sig: SignalId, target: u64, timeout: Duration) -> Result<u64, TransportError> {
        self.dev.bind()?;
        let addr = self.signal_addr(&self.inner(), sig)?;
        self.dev.wait_word(addr, sig, target, timeout)
    }

    fn read(&self, buf: BufferId, offset: usize, out: &mut [u8]) -> Result<(), TransportError> {
        let addr = self.local_range(&self.inner(), buf, offset, out.len(), "read of")?;
        if out.is_empty() {
            return Ok(());
        }
        self.synchronize(self.opts.collective_timeout)?;
        // SAFETY: bounds-checked above; `out` is exclusively borrowed.
        unsafe { cuda::copy_dtoh_sync(&self.dev.poll, out, addr) }
            .map_err(|e| self.dev.err("read", e))
    }

    fn barrier(&self, timeout: Duration) -> Result<(), TransportError> {
        self.flush(timeout)?;
        self.exchange.barrier(timeout)
    }
}

impl DeviceTransport for NcclTransport {
    fn device_ordinal(&self) -> usize {
        self.dev.ordinal
    }

    fn buffer_ptr(&self, buf: BufferId) -> Result<u64, TransportError> {
        self.local_range(&self.inner(), buf, 0, 0, "address of")
    }

    fn peer_buffer_ptr(&self, peer: usize, _buf: BufferId) -> Result<Option<u64>, TransportError> {
        check_rank(self, peer)?;
        Ok(None)
    }

    fn signals_ptr(&self) -> Result<u64, TransportError> {
        self.signal_addr(&self.inner(), 0)
    }

    fn peer_signals_ptr(&self, peer: usize) -> Result<Option<u64>, TransportError> {
        check_rank(self, peer)?;
        Ok(None)
    }

    fn error_word_ptr(&self) -> u64 {
        self.dev.error_word.ptr()
    }

    fn read_error_word(&self) -> Result<u64, TransportError> {
        self.dev.read_error_word()
    }

    fn clear_error_word(&self) -> Result<(), TransportError> {
        self.dev.clear_error_word()
    }

    fn comm_stream(&self) -> Arc<CudaStream> {
        Arc::clone(&self.dev.stream)
    }

    /// Staged like `put` (moves at the next flush): the source address is
    /// read then, so it must stay valid until the flush returns.
    fn put_device(
        &self,
        dst: usize,
        buf: BufferId,
        offset: usize,
        src: u64,
        len: usize,
    ) -> Result<(), TransportError> {
        check_rank(self, dst)?;
        let mut inner = self.inner();
        self.local_range(&inner, buf, offset, len, "put to")?;
        inner.staged.transfers.push(Transfer {
            src: self.rank,
            dst,
            src_buf: Source::RawDevice,
            src_offset: src as usize,
            dst_buf: buf,
            dst_offset: offset,
            len,
            signal: None,
        });
        Ok(())
    }
}
