//! The device forward over NCCL (issue 16, item 3): the kernels run
//! unchanged over local mirrors and ready words ([`StagedTransport`] over
//! an [`NcclTransport`]), and a proxy thread beside them runs
//! [`NcclProxy::call`] for every call over [`CudaLanes`], the GPU
//! implementation of [`NcclLanes`]. [`NcclLayer`] is the layer with that
//! thread ([`StagedLayer::over_nccl`] builds it; the lifecycle rules are
//! [`StagedLayer`]'s).
//!
//! What [`CudaLanes`] holds, as [`NcclLanes`]'s docs ask:
//! - one communicator per ordered pair of ranks (a *lane*), split from the
//!   transport's world communicator ([`lanes::lane_splits`]: the rounds of
//!   a round-robin tournament, twice), its NCCL kernels capped at
//!   [`LANE_CTAS`] CTAs, each on a stream of its own and connected once at
//!   set-up (NCCL connects a pair at its first op, blocking the host until
//!   the peer does too, which the proxy's one thread must never do);
//! - device send staging of the combine buffer per peer (a chunk of
//!   several runs is packed there by a 2-D copy on the lane's stream ahead
//!   of its send), and device receive staging per buffer: the inner
//!   transport's inbox of it, in wire layout;
//! - a landing stream, the staged transport's first (created before the
//!   kernels' streams): a landing copies from receive staging into the own
//!   buffer, then writes the signal the kernels wait on;
//! - an event after every send, recv and landing, polled without blocking
//!   ([`StreamQueue`], in stream order), from a pool reused across calls;
//!   when nothing completed, each lane's `ncclCommGetAsyncError`, so a
//!   failed peer is an error naming its lane rather than a timeout.
//!
//! NCCL's kernels need SMs while the layer's kernels spin waiting for the
//! bytes they bring, so the layer leaves [`lane_sms`] SMs of its GPU to
//! them (`LayerOptions::reserved_sms`). The proxy's one kernel, the copy
//! of the count matrix into mapped pinned memory (a copy engine's download
//! could wait behind a caller's), runs on those SMs too: it is enqueued
//! once every op of the count exchange completed and before any op of the
//! layer is posted, so no NCCL kernel holds them then.
//!
//! On any error of a call the lanes are aborted (`ncclCommAbort`), so no
//! NCCL kernel is left waiting for a peer that will not come, and the
//! proxy stops; every wait for the streams is bounded by the timeout.

use crate::error::SchedError;
use crate::forward::{LayerKernels, LayerOptions, MoeLayer};
use crate::nccl_proxy::lanes::{self, Lane, Span};
use crate::nccl_proxy::{NcclLanes, NcclProxy, Op};
use crate::proxy_layer::{needs_queues, ProxyCall, ProxyRun, StagedLayer};
use crate::proxy_plan::{Buf, Geometry, Piece, Region, WireFormat};
use crate::staged_device::{proxy_event, ProxyView, StagedTransport};
use crate::stream_queue::StreamQueue;
use comet_core::MoeConfig;
use comet_kernels::forward::ForwardKernels;
use comet_transport::cuda::{self, DeviceAlloc, HostSignal, PinnedBytes, Runs};
use comet_transport::gpu::DeviceTransport;
use comet_transport::nccl::ffi::{self, RawComm, Way};
use comet_transport::nccl::NcclTransport;
use comet_transport::signal_core::{poll_bounded, Polled};
use comet_transport::{BufferId, SignalOp, Transport, TransportError};
use cudarc::driver::{CudaContext, CudaEvent, CudaStream, DriverError};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

/// CTAs one NCCL kernel of a lane may use (its communicator's `maxCTAs`).
/// Environment variables that NCCL reads (`NCCL_MAX_CTAS`) override it.
pub const LANE_CTAS: u32 = 2;

/// SMs the lanes of one rank of `ranks` may hold at once: a send and a
/// recv kernel per peer, of [`LANE_CTAS`] CTAs each.
pub fn lane_sms(ranks: usize) -> usize {
    2 * ranks.saturating_sub(1) * LANE_CTAS as usize
}

/// The device layer over NCCL, with its proxy thread.
pub type NcclLayer = StagedLayer<NcclTransport>;

impl StagedLayer<NcclTransport> {
    /// Refused under one hardware queue ([`needs_queues`]): callers that
    /// build the NCCL transport (collective) ask first, so every rank
    /// fails before it.
    pub fn check_queues(rank: usize) -> Result<(), SchedError> {
        needs_queues(
            rank,
            cuda::hardware_queues(),
            "NCCL's kernels and the proxy's copies",
        )
    }

    /// Collective, as [`MoeLayer::new`]: rank `inner.rank()` on
    /// `inner`'s device, its pieces carried by NCCL. Makes the lanes
    /// first (collective splits of `inner`'s communicator, each connected
    /// once), then the layer, which leaves [`lane_sms`] SMs to NCCL.
    pub fn over_nccl(
        cfg: &MoeConfig,
        capacity: usize,
        inner: NcclTransport,
        kernels: &LayerKernels,
        opts: &LayerOptions,
    ) -> Result<NcclLayer, SchedError> {
        let ordinal = inner.device_ordinal();
        Self::check_queues(inner.rank())?;
        let set = LaneSet::open(&inner, opts.timeout)?;
        let t = StagedTransport::new(inner, ordinal, 2 * cfg.hidden)?;
        let mut o = opts.clone();
        o.reserved_sms = o.reserved_sms.max(lane_sms(cfg.ranks));
        // Two-sided sends need sizes both ends know: NCCL's proxy sends rows.
        o.wire_format = WireFormat::Rows;
        let layer = MoeLayer::new(cfg, capacity, t, kernels, &o)?;
        let timeout = opts.timeout;
        StagedLayer::with_proxy(layer, |layer, stop| {
            let geo = Geometry::of(layer.plan());
            let bufs = layer.symmetric_buffers();
            let kernels = Arc::clone(&layer.kernels().forward);
            CudaLanes::new(set, layer.transport(), &geo, bufs, kernels, stop, timeout)
        })
    }
}

/// One lane of this rank: its communicator, stream, the peer's rank in
/// the communicator, and its ops in flight.
struct LaneOf {
    lane: Lane,
    comm: RawComm,
    stream: Arc<CudaStream>,
    peer: usize,
    ops: StreamQueue<Op, CudaEvent>,
}

/// A rank's lanes in the order of [`lanes::lane_splits`] (so every rank
/// connects, and on drop destroys, the lanes it shares with a peer in the
/// same order), with where to find the lane to each peer and from each
/// peer; none for itself.
struct LaneSet {
    rank: usize,
    lanes: Vec<LaneOf>,
    /// The index of the lane this rank sends to each peer on, and of the
    /// one it receives from each peer on.
    to: Vec<Option<usize>>,
    from: Vec<Option<usize>>,
}

impl LaneSet {
    /// Collective over `t`'s world: every split of
    /// [`lanes::lane_splits`], in order, each lane connected by one small
    /// send before the next split (both its ends do it in the same split
    /// step, so no rank waits for one that is elsewhere).
    fn open(t: &NcclTransport, timeout: Duration) -> Result<LaneSet, SchedError> {
        let (me, w) = (t.rank(), t.world());
        let ctx = Arc::clone(t.context());
        let device = |what: &str, e: DriverError| SchedError::Device {
            rank: me,
            message: format!("nccl lanes: {what}: {e}"),
        };
        // Two words: the one a lane's first send reads, the one its recv
        // fills.
        let scratch = DeviceAlloc::zeroed(&ctx, 16).map_err(|e| device("allocate scratch", e))?;
        let mut set = LaneSet {
            rank: me,
            lanes: Vec::with_capacity(2 * w.saturating_sub(1)),
            to: vec![None; w],
            from: vec![None; w],
        };
        for split in lanes::lane_splits(w) {
            let mine = split.colour_of(me);
            let comm = t.split(mine.map(|(c, _)| c), me, Some(LANE_CTAS), timeout)?;
            let (Some((_, lane)), Some(comm)) = (mine, comm) else {
                continue;
            };
            let stream = ctx
                .new_stream()
                .map_err(|e| device("create lane stream", e))?;
            let mut l = LaneOf {
                lane,
                comm,
                stream,
                peer: lane.peer_index(me),
                ops: StreamQueue::default(),
            };
            set.connect(&mut l, &ctx, &scratch, timeout)?;
            tracing::debug!(rank = me, from = lane.from, to = lane.to, "nccl lane up");
            let at = set.lanes.len();
            if lane.from == me {
                set.to[lane.to] = Some(at);
            } else {
                set.from[lane.from] = Some(at);
            }
            set.lanes.push(l);
        }
        Ok(set)
    }

    /// Moves 8 bytes over `l` and waits for them (bounded), so NCCL makes
    /// the pair's connection now; aborts the lane if it does not come up
    /// (for any reason: destroying a communicator whose op never completes
    /// would wait for it for good).
    fn connect(
        &self,
        l: &mut LaneOf,
        ctx: &Arc<CudaContext>,
        scratch: &DeviceAlloc,
        timeout: Duration,
    ) -> Result<(), SchedError> {
        let up = self.connect_once(l, ctx, scratch, timeout);
        if up.is_err() {
            l.comm.abort();
        }
        up
    }

    fn connect_once(
        &self,
        l: &mut LaneOf,
        ctx: &Arc<CudaContext>,
        scratch: &DeviceAlloc,
        timeout: Duration,
    ) -> Result<(), SchedError> {
        let me = self.rank;
        let name = format!("lane {} -> {}", l.lane.from, l.lane.to);
        let nccl = |e: ffi::CommError| lane_err(me, &name, "connect", e);
        // SAFETY: both words lie in `scratch`, which lives until the wait
        // below has seen the op complete (or the lane was aborted).
        unsafe {
            if l.lane.from == me {
                l.comm.post(Way::Send, scratch.ptr(), 8, l.peer, &l.stream)
            } else {
                l.comm
                    .post(Way::Recv, scratch.ptr() + 8, 8, l.peer, &l.stream)
            }
        }
        .map_err(nccl)?;
        let device = |e: DriverError| SchedError::Device {
            rank: me,
            message: format!("nccl {name}: connect: {e}"),
        };
        let event = proxy_event(ctx, &mut Vec::new()).map_err(device)?;
        event.record(&l.stream).map_err(device)?;
        let look = |_| -> Result<Option<()>, TransportError> {
            l.comm
                .async_error()
                .map_err(|e| nccl_transport_err(me, &name, "connect", e))?;
            event
                .try_is_complete()
                .map(|done| done.then_some(()))
                .map_err(|e| cuda::driver_err("nccl", me, "connect", e))
        };
        match poll_bounded(timeout, look, std::thread::sleep)? {
            Polled::Ready(()) => Ok(()),
            Polled::TimedOut(waited) => Err(SchedError::Device {
                rank: me,
                message: format!(
                    "nccl {name} did not connect within {waited:?} (its peer never \
                     reached the same split?); aborted"
                ),
            }),
        }
    }
}

/// The lane index `by[peer]`, none for a peer outside the world.
fn lane_at(by: &[Option<usize>], peer: usize) -> Option<usize> {
    by.get(peer).copied().flatten()
}

fn nccl_transport_err(
    rank: usize,
    lane: &str,
    what: &str,
    e: impl Into<ffi::CommError>,
) -> TransportError {
    TransportError::Backend {
        backend: "nccl",
        rank,
        message: format!("{lane}: {what}: {}", e.into()),
    }
}

fn lane_err(rank: usize, lane: &str, what: &str, e: impl Into<ffi::CommError>) -> SchedError {
    SchedError::Transport(nccl_transport_err(rank, lane, what, e))
}

/// One rank's lanes, staging and landing stream: [`NcclLanes`] on a GPU
/// (see the module docs).
pub struct CudaLanes {
    rank: usize,
    geo: Geometry,
    timeout: Duration,
    stop: Arc<AtomicBool>,
    ctx: Arc<CudaContext>,
    set: LaneSet,
    landings: Arc<CudaStream>,
    landed: StreamQueue<Op, CudaEvent>,
    raise: HostSignal,
    view: ProxyView,
    /// Receive staging per buffer (by `Buf::index`): the inner transport's
    /// inbox, device memory in wire layout.
    recv_staging: [Span; 3],
    /// Send staging of the combine buffer per peer, when chunks are 2-D.
    send_staging: Vec<Option<DeviceAlloc>>,
    /// Host image of the counts buffer, pinned and mapped: the copy kernel
    /// stores it (a copy engine's download could wait behind a caller's
    /// device-to-host copy queued behind the call, docs/PERF.md
    /// 2026-12-06 ~16:30).
    counts: PinnedBytes,
    kernels: Arc<ForwardKernels>,
    spare: Vec<CudaEvent>,
}

impl CudaLanes {
    fn new(
        set: LaneSet,
        t: &StagedTransport<NcclTransport>,
        geo: &Geometry,
        bufs: [BufferId; 3],
        kernels: Arc<ForwardKernels>,
        stop: Arc<AtomicBool>,
        timeout: Duration,
    ) -> Result<CudaLanes, SchedError> {
        let rank = t.rank();
        let ctx = Arc::clone(t.context());
        let device = |what: &str, e: DriverError| SchedError::Device {
            rank,
            message: format!("nccl proxy: {what}: {e}"),
        };
        let view = t.proxy_view(bufs)?;
        for b in Buf::ALL {
            if view.bytes[b.index()] < geo.bytes(b) {
                return Err(SchedError::Input {
                    rank,
                    message: format!(
                        "{b:?} buffer of {} bytes under the layout's {}",
                        view.bytes[b.index()],
                        geo.bytes(b)
                    ),
                });
            }
        }
        let mut recv_staging = [Span { at: 0, len: 0 }; 3];
        for b in Buf::ALL {
            recv_staging[b.index()] = Span {
                at: t.inner().buffer_ptr(view.inbox[b.index()])?,
                len: view.bytes[b.index()],
            };
        }
        // Only combine chunks narrower than a row have several runs.
        let packs = geo.chunks > 1;
        let send_staging = (0..geo.ranks)
            .map(|to| {
                (packs && to != rank)
                    .then(|| DeviceAlloc::zeroed(&ctx, geo.bytes(Buf::Comb)))
                    .transpose()
                    .map_err(|e| device("allocate send staging", e))
            })
            .collect::<Result<_, _>>()?;
        let counts = PinnedBytes::zeroed(&ctx, geo.bytes(Buf::Counts))
            .map_err(|e| device("allocate the counts image", e))?;
        Ok(CudaLanes {
            rank,
            geo: *geo,
            timeout,
            stop,
            landings: t.comm_stream(),
            landed: StreamQueue::default(),
            raise: HostSignal::new(&ctx),
            ctx,
            set,
            view,
            recv_staging,
            send_staging,
            counts,
            kernels,
            spare: Vec::new(),
        })
    }

    fn failed(&self, what: &str, e: impl std::fmt::Display) -> SchedError {
        SchedError::Device {
            rank: self.rank,
            message: format!("nccl proxy: {what}: {e}"),
        }
    }

    fn misuse(&self, message: String) -> SchedError {
        SchedError::NcclProtocol {
            rank: self.rank,
            message,
        }
    }

    /// An event recorded on `stream` now.
    fn mark(&mut self, stream: &CudaStream, what: &str) -> Result<CudaEvent, SchedError> {
        let e = proxy_event(&self.ctx, &mut self.spare).map_err(|e| self.failed(what, e))?;
        e.record(stream).map_err(|e| self.failed(what, e))?;
        Ok(e)
    }

    /// Records the event of `op`, just posted on lane `i`'s stream.
    fn posted(&mut self, i: usize, op: Op, what: &str) -> Result<(), SchedError> {
        let stream = Arc::clone(&self.set.lanes[i].stream);
        let e = self.mark(&stream, what)?;
        self.set.lanes[i].ops.push(op, e);
        Ok(())
    }

    /// Abandons every lane's ops in flight (`ncclCommAbort`): a lane that
    /// waits for a peer that will not come would hold its stream for good.
    fn abort(&mut self) {
        for l in &mut self.set.lanes {
            l.comm.abort();
            l.ops.clear(&mut self.spare);
        }
        tracing::debug!(rank = self.rank, "nccl proxy: lanes aborted");
    }

    /// Whether every lane's stream and the landing stream ran dry within
    /// `timeout`.
    fn idle_within(&self, timeout: Duration) -> Result<bool, SchedError> {
        let streams: Vec<&CudaStream> = self
            .set
            .lanes
            .iter()
            .map(|l| &*l.stream)
            .chain([&*self.landings])
            .collect();
        Ok(cuda::streams_idle_within(
            &streams, timeout, "nccl", self.rank, "drain",
        )?)
    }

    /// Waits for everything enqueued (bounded by the timeout); aborts the
    /// lanes and says so if they do not finish.
    fn drain(&mut self) -> Result<(), SchedError> {
        if self.idle_within(self.timeout)? {
            return Ok(());
        }
        self.abort();
        let idle = self.idle_within(self.timeout)?;
        Err(self.failed(
            "drain",
            format!(
                "the lanes did not finish within {:?}; aborted{}",
                self.timeout,
                if idle { "" } else { ", and still busy" }
            ),
        ))
    }

    fn span(&self, buf: Buf, at: u64) -> Span {
        Span {
            at,
            len: self.view.bytes[buf.index()],
        }
    }
}

impl NcclLanes for CudaLanes {
    fn ready(&self, to: usize, signal: usize) -> u64 {
        self.view.ready(to, signal)
    }

    fn send(&mut self, op: Op, piece: &Piece) -> Result<(), SchedError> {
        let (me, to, buf) = (self.rank, piece.to, piece.region.buf);
        if piece.from != me || to == me {
            return Err(self.misuse(format!("rank {me} asked to send {piece}")));
        }
        let mirror = self.view.mirrors[buf.index()]
            .get(to)
            .copied()
            .ok_or_else(|| self.misuse(format!("{piece}: no rank {to}")))?;
        let staging = match buf {
            Buf::Comb => self
                .send_staging
                .get(to)
                .and_then(Option::as_ref)
                .map(|s| Span {
                    at: s.ptr(),
                    len: s.bytes(),
                }),
            _ => None,
        };
        let plan = lanes::send_plan(me, piece, self.span(buf, mirror), staging)?;
        let i = lane_at(&self.set.to, to)
            .ok_or_else(|| self.misuse(format!("{piece}: no lane to rank {to}")))?;
        let l = &self.set.lanes[i];
        let name = format!("lane {me} -> {to}");
        if let Some(src) = plan.pack {
            // SAFETY: `send_plan` checked the region inside this rank's
            // mirror of `to`'s buffer and the packed bytes inside the send
            // staging for `to`; the kernels finished the region (its ready
            // word) and the staging range is this piece's alone in the call
            // (wire ranges are disjoint), reused only by a later call after
            // this send completed.
            unsafe { cuda::pack_runs(&l.stream, src, runs(piece.region), plan.from) }
                .map_err(|e| self.failed("pack", e))?;
        }
        // SAFETY: `plan.from .. + len` is checked memory of this rank
        // (mirror or send staging, above), live until the layer is dropped,
        // which drains the lanes first; NCCL reads it on the lane's stream
        // after the packing.
        unsafe {
            l.comm
                .post(Way::Send, plan.from, plan.len, l.peer, &l.stream)
        }
        .map_err(|e| lane_err(me, &name, "ncclSend", e))?;
        self.posted(i, op, "record send")
    }

    fn recv(&mut self, op: Op, piece: &Piece) -> Result<(), SchedError> {
        let (me, from, buf) = (self.rank, piece.from, piece.region.buf);
        if piece.to != me || from == me {
            return Err(self.misuse(format!("rank {me} asked to receive {piece}")));
        }
        let at = lanes::recv_at(me, piece, self.recv_staging[buf.index()])?;
        let i = lane_at(&self.set.from, from)
            .ok_or_else(|| self.misuse(format!("{piece}: no lane from rank {from}")))?;
        let l = &self.set.lanes[i];
        let name = format!("lane {from} -> {me}");
        // SAFETY: `recv_at` checked the range inside this rank's receive
        // staging of the buffer, which no other piece of the call uses
        // (disjoint wire ranges) and which the next call's recvs reach only
        // after this call's landings completed.
        unsafe {
            l.comm
                .post(Way::Recv, at, piece.region.bytes(), l.peer, &l.stream)
        }
        .map_err(|e| lane_err(me, &name, "ncclRecv", e))?;
        self.posted(i, op, "record recv")
    }

    fn land(&mut self, op: Op, piece: &Piece, value: u64) -> Result<(), SchedError> {
        let (me, buf) = (self.rank, piece.region.buf);
        let own = self.span(buf, self.view.own[buf.index()]);
        let plan = lanes::land_plan(me, piece, self.recv_staging[buf.index()], own)?;
        let at = self.view.signal_at(me, piece.signal)?;
        // SAFETY: `land_plan` checked both ranges (receive staging, whose
        // recv completed before this landing was posted, and the region
        // inside this rank's own buffer, which the kernels read only once
        // the signal below is up).
        unsafe { cuda::unpack_runs(&self.landings, plan.from, plan.to, runs(piece.region)) }
            .map_err(|e| self.failed("land", e))?;
        // SAFETY: `at` is a word of this rank's signal array (checked),
        // written after the copy on the same stream.
        unsafe { self.raise.raise(&self.landings, at, SignalOp::Set(value)) }
            .map_err(|e| self.failed("raise signal", e))?;
        let stream = Arc::clone(&self.landings);
        let e = self.mark(&stream, "record landing")?;
        self.landed.push(op, e);
        Ok(())
    }

    fn raise(&mut self, piece: &Piece, value: u64) -> Result<(), SchedError> {
        let at = self.view.signal_at(self.rank, piece.signal)?;
        // SAFETY: as in land: a checked word of this rank's signal array.
        unsafe { self.raise.raise(&self.landings, at, SignalOp::Set(value)) }
            .map_err(|e| self.failed("raise signal", e))
    }

    fn poll_completed(&mut self, done: &mut Vec<Op>) -> Result<(), SchedError> {
        let before = done.len();
        let me = self.rank;
        let spare = &mut self.spare;
        for l in &mut self.set.lanes {
            l.ops
                .pop_reached(spare, |op| done.push(op))
                .map_err(|e| SchedError::Device {
                    rank: me,
                    message: format!("nccl lane {} -> {}: {e}", l.lane.from, l.lane.to),
                })?;
        }
        self.landed
            .pop_reached(spare, |op| done.push(op))
            .map_err(|e| SchedError::Device {
                rank: me,
                message: format!("nccl proxy: landing: {e}"),
            })?;
        if done.len() == before {
            // Nothing moved: has a lane failed (a peer gone, a network error)?
            for l in &self.set.lanes {
                let name = format!("lane {} -> {}", l.lane.from, l.lane.to);
                l.comm
                    .async_error()
                    .map_err(|e| lane_err(me, &name, "asynchronous error", e))?;
            }
        }
        Ok(())
    }

    fn read_count_buffer(&mut self, out: &mut [u8]) -> Result<(), SchedError> {
        let n = out.len();
        if n > self.counts.len() || n > self.view.bytes[Buf::Counts.index()] {
            return Err(self.misuse(format!(
                "a counts read of {n} bytes, over the buffer's {}",
                self.counts.len()
            )));
        }
        let (src, dst) = (
            self.view.own[Buf::Counts.index()],
            self.counts.device_ptr_at(0),
        );
        // SAFETY: the first `n` bytes of this rank's counts buffer (checked)
        // into the pinned, mapped image, which nothing else touches until
        // the event below says the copy ran. Only this call's epoch slot of
        // what it reads is decoded: after a refused call the next call's
        // kernels may already write the other slot.
        unsafe {
            self.kernels
                .copy_bytes(src, dst, n, self.landings.cu_stream())
        }
        .map_err(|e| self.failed("read counts", e))?;
        let stream = Arc::clone(&self.landings);
        let e = self.mark(&stream, "record counts read")?;
        let rank = self.rank;
        let look = |_| -> Result<Option<()>, TransportError> {
            e.try_is_complete()
                .map(|d| d.then_some(()))
                .map_err(|err| cuda::driver_err("nccl", rank, "read counts", err))
        };
        let polled = poll_bounded(self.timeout, look, std::thread::sleep)?;
        self.spare.push(e);
        match polled {
            Polled::Ready(()) => {
                out.copy_from_slice(&self.counts[..n]);
                Ok(())
            }
            Polled::TimedOut(waited) => Err(self.failed(
                "read counts",
                format!("the copy kernel did not finish within {waited:?} (no SM free for it?)"),
            )),
        }
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
}

/// The NCCL proxy's life on its thread: every call in order; on an error
/// the lanes are aborted; the streams drained (bounded) before it ends.
impl ProxyRun<NcclTransport> for CudaLanes {
    fn run(
        mut self,
        _: &StagedTransport<NcclTransport>,
        calls: &mpsc::Receiver<ProxyCall>,
    ) -> Result<(), SchedError> {
        let rank = self.rank;
        let mut proxy = NcclProxy::new(rank, self.geo, self.timeout)?;
        let ran = calls.iter().try_for_each(|call| {
            let epoch = call.epoch;
            let stats = proxy.call(&mut self, epoch)?;
            tracing::trace!(rank, epoch, ?stats, "nccl proxy call done");
            Ok::<_, SchedError>(())
        });
        if ran.is_err() {
            self.abort();
        }
        let drained = self.drain();
        if drained.is_err() {
            // The landings stream holds only copy kernels, which run once
            // the layer's bounded kernels leave them SMs: waited out before
            // the staging they write is freed. The lanes were aborted.
            tracing::warn!(
                rank,
                "nccl proxy: landings still queued at its end; waiting them out"
            );
            let _ = self.landings.synchronize();
        }
        ran.and(drained)
    }
}

/// The copy of `r`'s runs.
fn runs(r: Region) -> Runs {
    Runs {
        rows: r.rows,
        width: r.width,
        pitch: r.pitch,
    }
}
