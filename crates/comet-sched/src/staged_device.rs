//! The device forward over a transport that moves host memory only (UCX
//! over TCP or shared memory, the local transport): the kernels run
//! unchanged, a proxy thread beside them carries the bytes (issue 16).
//!
//! [`StagedTransport`] is the [`DeviceTransport`] the layer is built on,
//! here and over NCCL (`crate::nccl_device`). What the kernels take for a
//! peer's buffer is a local device mirror of it, and for the peer's signal
//! array a local array of ready words in mapped pinned memory; every
//! buffer also gets an inbox on the inner transport, in the same layout
//! (host memory for UCX; for NCCL, the device receive staging). A proxy
//! finds all of it through one `ProxyView`. [`StagedLayer::new`] is the
//! layer plus its proxy thread ([`crate::proxy_layer`]) running
//! [`StagedProxy::call`] over [`CudaStaging`] for each call (downloads
//! from the mirrors, landings into the own buffers followed by a stream
//! write of the signal the kernels wait on).

use crate::error::SchedError;
use crate::forward::{LayerKernels, LayerOptions, MoeLayer, WeightType};
pub use crate::proxy_layer::StagedLayer;
use crate::proxy_layer::{needs_queues, ProxyCall, ProxyRun};
use crate::proxy_plan::{inbox_bytes, Buf, Geometry, Region, TokenPlace, WireFormat};
use crate::staged::{SendOrder, SlotRows, Source, StagedDevice, StagedProxy, Ticket};
use crate::stream_queue::{Marker, StreamQueue};
use comet_core::MoeConfig;
use comet_kernels::forward::{ForwardKernels, Rows, SlotSums};
use comet_kernels::KernelError;
use comet_transport::cuda::{
    self, DeviceAlloc, ErrorWord, HostRegistration, HostSignal, MappedWords, PinnedBytes,
};
use comet_transport::gpu::DeviceTransport;
use comet_transport::signal_core::buffer;
use comet_transport::{
    BufferId, Capabilities, Initiation, SignalId, SignalOp, Transport, TransportError,
};
use cudarc::driver::sys::CUstream;
use cudarc::driver::{sys, CudaContext, CudaEvent, CudaStream, DriverError};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

const NAME: &str = "staged";

/// One symmetric buffer: this rank's copy, its mirrors of the peers'
/// copies (none for itself) and its inbox on the inner transport.
struct Staged {
    own: DeviceAlloc,
    mirrors: Vec<Option<DeviceAlloc>>,
    inbox: BufferId,
}

/// This rank's signal words and its ready words for each peer.
struct Signals {
    own: DeviceAlloc,
    ready: Vec<Option<Arc<MappedWords>>>,
}

#[derive(Default)]
struct State {
    bufs: Vec<Staged>,
    signals: Option<Signals>,
}

struct Shared<T> {
    inner: T,
    ctx: Arc<CudaContext>,
    ordinal: usize,
    /// Bytes of a row of the layer's buffers (sizes the inboxes).
    row_bytes: usize,
    /// The proxy's stream (landings, signal writes), created before any
    /// other stream of this rank: streams beyond the device's hardware
    /// queues share them, and a landing queued behind a kernel that spins
    /// waiting for it would deadlock until the timeout.
    stream: Arc<CudaStream>,
    /// The proxy's downloads, created right after it for the same reason.
    downloads: Arc<CudaStream>,
    error_word: ErrorWord,
    state: Mutex<State>,
}

/// A [`DeviceTransport`] over a host-memory transport `T`: kernels see
/// mirrors and ready words for the peers; only a [`StagedLayer`]'s proxy
/// moves bytes between ranks, so the plain put/signal/wait of this
/// transport are refused with an error saying so. Cheap to clone (the
/// layer and its proxy share one).
pub struct StagedTransport<T> {
    s: Arc<Shared<T>>,
}

impl<T> Clone for StagedTransport<T> {
    fn clone(&self) -> Self {
        Self {
            s: Arc::clone(&self.s),
        }
    }
}

impl<T: Transport> StagedTransport<T> {
    /// Runs this rank's kernels on device `ordinal` over `inner`, for a
    /// layer whose rows are `row_bytes` long.
    pub fn new(inner: T, ordinal: usize, row_bytes: usize) -> Result<Self, TransportError> {
        let rank = inner.rank();
        let err = |what: &str, e| cuda::driver_err(NAME, rank, what, e);
        let ctx = cuda::open_context(ordinal).map_err(|e| err("open context", e))?;
        let stream = ctx.new_stream().map_err(|e| err("create stream", e))?;
        let downloads = ctx.new_stream().map_err(|e| err("create stream", e))?;
        let error_word = ErrorWord::zeroed(&ctx).map_err(|e| err("allocate error word", e))?;
        Ok(StagedTransport {
            s: Arc::new(Shared {
                inner,
                ctx,
                ordinal,
                row_bytes,
                stream,
                downloads,
                error_word,
                state: Mutex::new(State::default()),
            }),
        })
    }

    /// The transport that carries the bytes.
    pub fn inner(&self) -> &T {
        &self.s.inner
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.s.ctx
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.s.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn refused(&self, what: &str) -> TransportError {
        TransportError::Backend {
            backend: NAME,
            rank: self.rank(),
            message: format!(
                "{what}: a staged transport moves bytes only through its layer's proxy"
            ),
        }
    }

    fn not_allocated(&self, what: String) -> TransportError {
        TransportError::NotAllocated {
            rank: self.rank(),
            what,
        }
    }

    fn with_buf<R>(
        &self,
        buf: BufferId,
        f: impl FnOnce(&Staged) -> R,
    ) -> Result<R, TransportError> {
        let st = self.state();
        buffer(self.rank(), &st.bufs, buf).map(f)
    }

    /// Where a proxy finds `bufs` (the layer's counts, recv and comb
    /// buffers, in that order) and this rank's signals.
    pub(crate) fn proxy_view(&self, bufs: [BufferId; 3]) -> Result<ProxyView, SchedError> {
        let me = self.rank();
        let st = self.state();
        let mut view = ProxyView {
            own: [0; 3],
            bytes: [0; 3],
            mirrors: Default::default(),
            inbox: bufs,
            ready: Vec::new(),
            signals: 0,
            signal_count: 0,
        };
        for (i, &buf) in bufs.iter().enumerate() {
            let b = buffer(me, &st.bufs, buf)?;
            view.own[i] = b.own.ptr();
            view.bytes[i] = b.own.bytes();
            view.inbox[i] = b.inbox;
            // This rank's own copy stands for itself (no piece is sent there).
            view.mirrors[i] = b
                .mirrors
                .iter()
                .enumerate()
                .map(|(r, m)| match m {
                    _ if r == me => b.own.ptr(),
                    Some(m) => m.ptr(),
                    None => 0,
                })
                .collect();
        }
        let sig = st
            .signals
            .as_ref()
            .ok_or_else(|| self.not_allocated("signals".into()))?;
        view.ready = sig.ready.clone();
        view.signals = sig.own.ptr();
        view.signal_count = sig.own.bytes() / 8;
        Ok(view)
    }
}

/// What a proxy needs of one rank of a [`StagedTransport`]: per buffer (by
/// [`Buf::index`]) its own copy, size, mirrors by rank and inbox on the
/// inner transport; the ready words the kernels raise for each peer, and
/// the signal array they wait on.
pub(crate) struct ProxyView {
    pub own: [u64; 3],
    pub bytes: [usize; 3],
    pub mirrors: [Vec<u64>; 3],
    pub inbox: [BufferId; 3],
    pub ready: Vec<Option<Arc<MappedWords>>>,
    pub signals: u64,
    pub signal_count: usize,
}

impl ProxyView {
    /// This rank's ready word `signal` for peer `to` (acquire); 0 for a
    /// word that does not exist.
    pub fn ready(&self, to: usize, signal: usize) -> u64 {
        self.ready
            .get(to)
            .and_then(Option::as_ref)
            .map_or(0, |w| w.load(signal))
    }

    /// The device address of this rank's signal `signal`, checked.
    pub fn signal_at(&self, rank: usize, signal: usize) -> Result<u64, SchedError> {
        if signal >= self.signal_count {
            return Err(SchedError::Input {
                rank,
                message: format!(
                    "signal {signal} outside the {} this rank has",
                    self.signal_count
                ),
            });
        }
        Ok(self.signals + 8 * signal as u64)
    }
}

impl<T: Transport> StagedTransport<T> {
    /// Fills this rank's mirrors of `bufs`' receive and combine buffers
    /// (the second and third) with bf16 NaN on `stream`.
    ///
    /// # Safety
    /// `stream` is a live stream of this transport's context.
    pub unsafe fn poison_mirrors(
        &self,
        stream: CUstream,
        bufs: [BufferId; 3],
    ) -> Result<(), SchedError> {
        let rank = self.rank();
        let st = self.state();
        for buf in &bufs[1..] {
            let b = buffer(rank, &st.bufs, *buf)?;
            for m in b.mirrors.iter().flatten() {
                // SAFETY: the whole of a live allocation of this context.
                unsafe { comet_kernels::forward::fill_u16(stream, m.ptr(), 0xFFFF, m.bytes() / 2) }
                    .map_err(|source| SchedError::Kernel { rank, source })?;
            }
        }
        Ok(())
    }
}

impl<T: Transport> Transport for StagedTransport<T> {
    fn rank(&self) -> usize {
        self.s.inner.rank()
    }

    fn world(&self) -> usize {
        self.s.inner.world()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            name: NAME,
            initiation: Initiation::Host,
            device_memory: true,
        }
    }

    fn alloc_buffer(&self, bytes: usize) -> Result<BufferId, TransportError> {
        let (rank, w) = (self.rank(), self.world());
        let inbox = self
            .s
            .inner
            .alloc_buffer(inbox_bytes(bytes, self.s.row_bytes, w))?;
        let err = |e| cuda::driver_err(NAME, rank, "allocate device buffer", e);
        let own = DeviceAlloc::zeroed(&self.s.ctx, bytes).map_err(err)?;
        let mirrors = (0..w)
            .map(|r| {
                (r != rank)
                    .then(|| DeviceAlloc::zeroed(&self.s.ctx, bytes))
                    .transpose()
                    .map_err(err)
            })
            .collect::<Result<_, _>>()?;
        let mut st = self.state();
        st.bufs.push(Staged {
            own,
            mirrors,
            inbox,
        });
        Ok(BufferId((st.bufs.len() - 1) as u32))
    }

    fn alloc_signals(&self, count: usize) -> Result<(), TransportError> {
        let (rank, w) = (self.rank(), self.world());
        self.s.inner.alloc_signals(count)?;
        let err = |what: &str, e| cuda::driver_err(NAME, rank, what, e);
        let own =
            DeviceAlloc::zeroed(&self.s.ctx, 8 * count).map_err(|e| err("allocate signals", e))?;
        let ready = (0..w)
            .map(|r| {
                (r != rank)
                    .then(|| MappedWords::zeroed(&self.s.ctx, count).map(Arc::new))
                    .transpose()
                    .map_err(|e| err("allocate ready words", e))
            })
            .collect::<Result<_, _>>()?;
        self.state().signals = Some(Signals { own, ready });
        Ok(())
    }

    fn put(&self, _: usize, _: BufferId, _: usize, _: &[u8]) -> Result<(), TransportError> {
        Err(self.refused("put"))
    }

    fn signal(&self, _: usize, _: SignalId, _: SignalOp) -> Result<(), TransportError> {
        Err(self.refused("signal"))
    }

    fn wait(&self, _: SignalId, _: u64, _: Duration) -> Result<u64, TransportError> {
        Err(self.refused("wait"))
    }

    fn read(&self, _: BufferId, _: usize, _: &mut [u8]) -> Result<(), TransportError> {
        Err(self.refused("read"))
    }

    fn barrier(&self, timeout: Duration) -> Result<(), TransportError> {
        self.s.inner.barrier(timeout)
    }
}

impl<T: Transport> DeviceTransport for StagedTransport<T> {
    fn device_ordinal(&self) -> usize {
        self.s.ordinal
    }

    fn buffer_ptr(&self, buf: BufferId) -> Result<u64, TransportError> {
        self.with_buf(buf, |b| b.own.ptr())
    }

    fn peer_buffer_ptr(&self, peer: usize, buf: BufferId) -> Result<Option<u64>, TransportError> {
        comet_transport::transport::check_rank(self, peer)?;
        if peer == self.rank() {
            return self.buffer_ptr(buf).map(Some);
        }
        self.with_buf(buf, |b| b.mirrors[peer].as_ref().map(DeviceAlloc::ptr))
    }

    fn signals_ptr(&self) -> Result<u64, TransportError> {
        let st = self.state();
        st.signals
            .as_ref()
            .map(|s| s.own.ptr())
            .ok_or_else(|| self.not_allocated("signals".into()))
    }

    fn peer_signals_ptr(&self, peer: usize) -> Result<Option<u64>, TransportError> {
        comet_transport::transport::check_rank(self, peer)?;
        if peer == self.rank() {
            return self.signals_ptr().map(Some);
        }
        let st = self.state();
        let s = st
            .signals
            .as_ref()
            .ok_or_else(|| self.not_allocated("signals".into()))?;
        Ok(s.ready[peer].as_ref().map(|w| w.device_ptr()))
    }

    fn error_word_ptr(&self) -> u64 {
        self.s.error_word.ptr()
    }

    fn read_error_word(&self) -> Result<u64, TransportError> {
        let rank = self.rank();
        self.s
            .error_word
            .read(&self.s.stream)
            .map_err(|e| cuda::driver_err(NAME, rank, "read error word", e))
    }

    fn clear_error_word(&self) -> Result<(), TransportError> {
        let rank = self.rank();
        self.s
            .error_word
            .clear(&self.s.stream)
            .map_err(|e| cuda::driver_err(NAME, rank, "clear error word", e))
    }

    fn comm_stream(&self) -> Arc<CudaStream> {
        Arc::clone(&self.s.stream)
    }

    fn put_device(
        &self,
        _: usize,
        _: BufferId,
        _: usize,
        _: u64,
        _: usize,
    ) -> Result<(), TransportError> {
        Err(self.refused("put_device"))
    }
}

/// The proxy's view of one rank's device: the mirrors it downloads from,
/// the own buffers it lands into, the ready words it polls, its pinned
/// host staging, and two streams: downloads on one (each followed by an
/// event the proxy polls), landings and the signal writes that follow
/// them on the other, so a landing never waits behind a download.
pub struct CudaStaging {
    rank: usize,
    geo: Geometry,
    timeout: Duration,
    wire: WireFormat,
    stop: Arc<AtomicBool>,
    downloads: Arc<CudaStream>,
    landings: Arc<CudaStream>,
    raise: HostSignal,
    view: ProxyView,
    /// Send images of the count and combine buffers per peer (none for
    /// this rank), in wire layout; the send image of every peer's dispatch
    /// pieces, at this rank's send positions (`Geometry::image_at`; none
    /// alone); landing images per buffer in wire layout.
    send: Vec<Option<[PinnedBytes; 2]>>,
    outbox: Option<PinnedBytes>,
    landing: [PinnedBytes; 3],
    /// The recv and comb inboxes registered with the driver, where the
    /// inner transport's buffers are host memory: pieces land straight
    /// from them. Dropped after the streams are drained (at the end of
    /// `run`).
    inbox: [Option<HostRegistration>; 3],
    /// A device copy of the recv inbox (token-once only): each landing
    /// copies its fresh token rows and its index in by the copy kernel, and
    /// the expand kernel reads them from there, not across PCIe once per
    /// row.
    tokens_dev: Option<DeviceAlloc>,
    /// The layer's send order on the device and a pinned copy of it; the
    /// call in flight (where its weights are) and a pinned copy of them.
    order_dev: u64,
    order: PinnedBytes,
    call: Option<ProxyCall>,
    weights: PinnedBytes,
    /// Token-once tables, per peer (allocated with the staging: pinning
    /// memory during a call could wait for the kernels spinning on it).
    sums: Vec<Option<TokenTables>>,
    /// The layer's kernels (token-once landings expand on the device).
    kernels: Arc<ForwardKernels>,
    /// Downloads in flight with their events; spare events.
    pending: StreamQueue<Ticket, CudaEvent>,
    spare: Vec<CudaEvent>,
    next: Ticket,
    finished: Ticket,
}

/// Where a peer's token-once combine tables sit (byte offsets), laid out
/// for the receive capacity: slot starts, rows by slot, ratios.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TableLayout {
    starts: usize,
    rows: usize,
    ratio: usize,
    bytes: usize,
}

impl TableLayout {
    fn new(rows: usize) -> TableLayout {
        let rows_at = (4 * (rows + 1)).next_multiple_of(16);
        let ratio = rows_at + (4 * rows).next_multiple_of(16);
        TableLayout {
            starts: 0,
            rows: rows_at,
            ratio,
            bytes: ratio + 4 * rows,
        }
    }
}

/// Bytes the host fills once per call and the kernels read on the device:
/// a pinned copy, the device copy, and the call that last filled them.
struct Upload {
    host: PinnedBytes,
    dev: DeviceAlloc,
    epoch: u64,
}

impl Upload {
    fn new(ctx: &Arc<CudaContext>, bytes: usize) -> Result<Upload, DriverError> {
        Ok(Upload {
            host: PinnedBytes::zeroed(ctx, bytes)?,
            dev: DeviceAlloc::zeroed(ctx, bytes)?,
            epoch: 0,
        })
    }

    /// Unless call `epoch` filled them already: `fill` writes the host copy
    /// and its first `bytes` (within both copies) go up on `stream`, by the
    /// copy kernel. Returns the device copy's address.
    fn fill(
        &mut self,
        k: &ForwardKernels,
        stream: &CudaStream,
        epoch: u64,
        bytes: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<u64, KernelError> {
        if self.epoch != epoch {
            fill(&mut self.host);
            // SAFETY: `bytes` lie within both copies (the caller's check),
            // the host one pinned and mapped; the device copy is read only
            // by kernels enqueued on `stream` after this copy, and the host
            // copy is written again only in a later call, once the stream
            // has run everything of this one.
            unsafe {
                k.copy_bytes(
                    self.host.device_ptr_at(0),
                    self.dev.ptr(),
                    bytes,
                    stream.cu_stream(),
                )?
            };
            self.epoch = epoch;
        }
        Ok(self.dev.ptr())
    }
}

/// One peer's token-once tables: the row lists of the dispatch's token
/// packs (owner side), the combine's sum tables (expert side, laid out as
/// `layout` says) and its landing's row index (owner side).
struct TokenTables {
    pack: PackLists,
    layout: TableLayout,
    tables: Upload,
    index: Upload,
}

impl TokenTables {
    fn new(ctx: &Arc<CudaContext>, geo: &Geometry) -> Result<TokenTables, DriverError> {
        let layout = TableLayout::new(geo.recv_rows);
        Ok(TokenTables {
            pack: PackLists {
                list: Upload::new(ctx, 4 * geo.send_rows)?,
                used: 0,
            },
            layout,
            tables: Upload::new(ctx, layout.bytes)?,
            index: Upload::new(ctx, 4 * geo.send_rows)?,
        })
    }
}

/// The row lists of one call's token packs to one peer, each piece's at
/// the next free words: the pieces name distinct rows of this rank's
/// sends, so a call's lists fit in a word per send row. `list.epoch` is
/// the call they belong to.
struct PackLists {
    list: Upload,
    used: usize,
}

impl PackLists {
    /// `rows` on the device (4-byte words), uploaded on `stream` behind
    /// the call's earlier lists. Returns their device address.
    fn upload(
        &mut self,
        k: &ForwardKernels,
        stream: &CudaStream,
        epoch: u64,
        rows: &[u32],
    ) -> Result<u64, String> {
        if self.list.epoch != epoch {
            (self.list.epoch, self.used) = (epoch, 0);
        }
        let (at, bytes) = (self.used, 4 * rows.len());
        if !fits(at, bytes, self.list.host.len()) {
            return Err(format!(
                "{} rows past the {} send rows of the call",
                rows.len(),
                self.list.host.len() / 4 - at / 4
            ));
        }
        put_words(
            &mut self.list.host[at..at + bytes],
            rows.iter().map(|r| r.to_le_bytes()),
        );
        // SAFETY: `bytes` at `at` lie inside both copies (checked), the
        // host one pinned and mapped; no earlier list of the call uses
        // them, and a later call writes them again only after end_call
        // drained `stream`, which runs this copy before the kernel reading
        // it.
        unsafe {
            k.copy_bytes(
                self.list.host.device_ptr_at(at),
                self.list.dev.ptr() + at as u64,
                bytes,
                stream.cu_stream(),
            )
        }
        .map_err(|e| format!("upload: {e:?}"))?;
        self.used += bytes;
        Ok(self.list.dev.ptr() + at as u64)
    }
}

/// `r`'s rows in the buffer at device address `base`.
fn rows_of(base: u64, r: Region) -> Rows {
    Rows {
        at: base + r.offset as u64,
        rows: r.rows,
        width: r.width,
        pitch: r.pitch,
    }
}

/// Little-endian words into `dst`, from its start.
fn put_words(dst: &mut [u8], words: impl Iterator<Item = [u8; 4]>) {
    for (d, w) in dst.chunks_exact_mut(4).zip(words) {
        d.copy_from_slice(&w);
    }
}

/// `r`'s rows packed (no gaps) at device address `at`.
fn packed_rows(at: u64, r: Region) -> Rows {
    Rows {
        at,
        rows: r.rows,
        width: r.width,
        pitch: r.width,
    }
}

/// Whether `len` bytes at `at` lie inside `cap` bytes (no overflow).
fn fits(at: usize, len: usize, cap: usize) -> bool {
    at.checked_add(len).is_some_and(|end| end <= cap)
}

/// What a token-once landing's expand kernel reads and writes (device
/// addresses) and how many rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ExpandArgs {
    tokens: u64,
    index: u64,
    dst: Rows,
}

/// The expand of token-once piece `region` (whole rows of the recv buffer
/// at `own`) from its pair's area `place` in the inbox image at `inbox`
/// (`len` bytes); `None` when the piece's index array or the pair's token
/// rows lie past the inbox.
fn expand_args(
    inbox: u64,
    len: usize,
    own: u64,
    region: Region,
    place: TokenPlace,
    row_bytes: usize,
) -> Option<ExpandArgs> {
    let rows = region.bytes() / row_bytes.max(1);
    let token_bytes = place.pair_rows.checked_mul(row_bytes)?;
    let index_bytes = rows.checked_mul(4)?;
    if !fits(place.index, index_bytes, len) || !fits(place.tokens, token_bytes, len) {
        return None;
    }
    Some(ExpandArgs {
        tokens: inbox + place.tokens as u64,
        index: inbox + place.index as u64,
        dst: Rows {
            at: own + region.offset as u64,
            rows,
            width: row_bytes,
            pitch: row_bytes,
        },
    })
}

impl Marker for CudaEvent {
    type Error = DriverError;
    fn reached(&self) -> Result<bool, DriverError> {
        self.try_is_complete()
    }
}

/// An event of `ctx` for a proxy's completions: a spare one, else a new one.
pub(crate) fn proxy_event(
    ctx: &Arc<CudaContext>,
    spare: &mut Vec<CudaEvent>,
) -> Result<CudaEvent, DriverError> {
    match spare.pop() {
        Some(e) => Ok(e),
        None => ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)),
    }
}

impl CudaStaging {
    /// The staging of `layer` (on `t`), laid out as `geo` says; `stop`
    /// ends a call in flight once set, `timeout` bounds how long a call
    /// may stand still, `wire` is how dispatch rows travel.
    pub fn new<T: Transport>(
        t: &StagedTransport<T>,
        layer: &MoeLayer<StagedTransport<T>>,
        geo: &Geometry,
        stop: Arc<AtomicBool>,
        timeout: Duration,
        wire: WireFormat,
    ) -> Result<CudaStaging, SchedError> {
        let view = t.proxy_view(layer.symmetric_buffers())?;
        let rank = t.rank();
        geo.staged_bytes().check_pinned(
            geo,
            rank,
            layer.plan().ranks_per_gpu,
            crate::host_memory::available(),
        )?;
        let failed = |what: &str, e: DriverError| SchedError::Device {
            rank,
            message: format!("proxy {what}: {e}"),
        };
        let pinned = |bytes: usize| {
            PinnedBytes::zeroed(t.context(), bytes)
                .map_err(|e| failed("allocate pinned staging", e))
        };
        let one = |b: Buf| pinned(geo.bytes(b));
        let send = (0..geo.ranks)
            .map(|to| {
                (to != rank)
                    .then(|| Ok::<_, SchedError>([one(Buf::Counts)?, one(Buf::Comb)?]))
                    .transpose()
            })
            .collect::<Result<_, _>>()?;
        let outbox = (geo.ranks > 1)
            .then(|| pinned(geo.outbox_bytes()))
            .transpose()?;
        let landing = [one(Buf::Counts)?, one(Buf::Recv)?, one(Buf::Comb)?];
        let order = PinnedBytes::zeroed(t.context(), 4 * geo.send_rows)
            .map_err(|e| failed("allocate pinned send order", e))?;
        let weights = PinnedBytes::zeroed(t.context(), 4 * geo.send_rows)
            .map_err(|e| failed("allocate pinned weights", e))?;
        // Count rows always land through the landing image (the proxy reads
        // them to plan), so their inbox is not registered: the driver pins
        // whole pages and refuses a page registered already, and the small
        // counts inbox can share a page with the recv or comb inbox (heap
        // memory of the local transport), whose registration would then
        // fail and silently send every piece through the image.
        let inbox = Buf::ALL.map(|b| match b {
            Buf::Counts => None,
            Buf::Recv | Buf::Comb => register_inbox(t, view.inbox[b.index()]),
        });
        let sums = (0..geo.ranks)
            .map(|to| {
                (to != rank && wire == WireFormat::Tokens)
                    .then(|| TokenTables::new(t.context(), geo))
                    .transpose()
                    .map_err(|e| failed("allocate token-once combine tables", e))
            })
            .collect::<Result<_, _>>()?;
        let tokens_dev = match (&inbox[Buf::Recv.index()], wire) {
            (Some(r), WireFormat::Tokens) if geo.ranks > 1 => Some(
                DeviceAlloc::zeroed(t.context(), r.len())
                    .map_err(|e| failed("allocate the device token copy", e))?,
            ),
            _ => None,
        };
        Ok(CudaStaging {
            rank,
            geo: *geo,
            timeout,
            wire,
            stop,
            downloads: Arc::clone(&t.s.downloads),
            landings: t.comm_stream(),
            raise: HostSignal::new(t.context()),
            view,
            send,
            outbox,
            landing,
            inbox,
            tokens_dev,
            order_dev: layer.send_order_ptr(),
            order,
            call: None,
            weights,
            sums,
            kernels: Arc::clone(&layer.kernels().forward),
            pending: StreamQueue::default(),
            spare: Vec::new(),
            next: 0,
            finished: 0,
        })
    }

    /// The device address of this rank's mirror of `to`'s `buf`.
    fn mirror(&self, to: usize, buf: Buf) -> Result<u64, SchedError> {
        self.view.mirrors[buf.index()]
            .get(to)
            .copied()
            .filter(|&m| m != 0)
            .ok_or_else(|| self.failed("download", format!("no mirror of rank {to}")))
    }

    /// A ticket for everything enqueued on the download stream so far.
    fn ticket(&mut self) -> Result<Ticket, SchedError> {
        let event = proxy_event(self.downloads.context(), &mut self.spare)
            .map_err(|e| self.failed("create event", e))?;
        event
            .record(&self.downloads)
            .map_err(|e| self.failed("record download", e))?;
        self.next += 1;
        self.pending.push(self.next, event);
        Ok(self.next)
    }

    /// `sums`' tables on the device, uploaded on the download stream once
    /// per pair and call (the call before's sum kernels have run: its
    /// downloads all finished before it ended), checked whole then; `rows`
    /// is the piece's.
    fn sum_tables(&mut self, sums: SlotRows<'_>, rows: usize) -> Result<SlotSums, SchedError> {
        let fits = sums.slots <= rows
            && rows <= self.geo.recv_rows
            && sums.starts.len() == sums.slots + 1
            && sums.rows.len() == rows
            && sums.ratio.len() == rows;
        let Some(t) = self.sums.get_mut(sums.peer).and_then(Option::as_mut) else {
            return Err(self.failed("sum rows", format!("no tables for rank {}", sums.peer)));
        };
        let whole = || {
            sums.starts.windows(2).all(|w| w[0] <= w[1])
                && sums.starts.last().is_some_and(|&n| n as usize == rows)
                && sums.rows.iter().all(|&r| (r as usize) < rows)
        };
        if !fits || (t.tables.epoch != sums.epoch && !whole()) {
            return Err(self.failed(
                "sum rows",
                format!("tables of {} slots over {rows} rows", sums.slots),
            ));
        }
        let l = t.layout;
        let dev = t
            .tables
            .fill(
                &self.kernels,
                &self.downloads,
                sums.epoch,
                l.ratio + 4 * rows,
                |b| {
                    put_words(
                        &mut b[l.starts..l.rows],
                        sums.starts.iter().map(|x| x.to_le_bytes()),
                    );
                    put_words(
                        &mut b[l.rows..l.ratio],
                        sums.rows.iter().map(|x| x.to_le_bytes()),
                    );
                    put_words(
                        &mut b[l.ratio..l.bytes],
                        sums.ratio.iter().map(|x| x.to_le_bytes()),
                    );
                },
            )
            .map_err(|e| self.failed("upload sum tables", e))?;
        let at = |x: usize| dev + x as u64;
        Ok(SlotSums {
            starts: at(l.starts),
            rows: at(l.rows),
            ratio: at(l.ratio),
            dst: 0,
            slots: sums.slots,
        })
    }

    /// `index` on the device for landings from `from`, uploaded on the
    /// landing stream once per call (the call before's landings were
    /// drained at its end).
    fn sum_index(&mut self, from: usize, epoch: u64, index: &[u32]) -> Result<u64, SchedError> {
        let Some(t) = self.sums.get_mut(from).and_then(Option::as_mut) else {
            return Err(self.failed("land sums", format!("no index for rank {from}")));
        };
        let bytes = 4 * index.len();
        if bytes > t.index.host.len() {
            return Err(self.failed(
                "land sums",
                format!("{} rows past the send capacity", index.len()),
            ));
        }
        t.index
            .fill(&self.kernels, &self.landings, epoch, bytes, |b| {
                put_words(b, index.iter().map(|x| x.to_le_bytes()))
            })
            .map_err(|e| self.failed("upload sum index", e))
    }

    /// Waits for everything enqueued on both streams.
    fn drain(&self) -> Result<(), SchedError> {
        self.idle(&[&self.downloads, &self.landings], "drain")
    }

    /// The last wait before this staging (its pinned images, the inboxes'
    /// registrations) and the layer's memory are freed: bounded first, so
    /// a stuck copy is reported; then, if copies are still queued, waited
    /// out, because freeing memory a queued kernel will touch is worse
    /// than the wait. Their kernels get SMs once the layer's kernels end,
    /// and every wait in those is bounded on the device.
    fn drain_before_free(&self) -> Result<(), SchedError> {
        let drained = self.drain();
        if drained.is_err() {
            tracing::warn!(
                rank = self.rank,
                "staged proxy: copies still queued at its end; waiting them out before freeing"
            );
            let _ = self.downloads.synchronize();
            let _ = self.landings.synchronize();
        }
        drained
    }

    /// Waits, bounded by the timeout, for everything enqueued on `streams`.
    fn idle(&self, streams: &[&CudaStream], what: &str) -> Result<(), SchedError> {
        match cuda::streams_idle_within(streams, self.timeout, "staged", self.rank, what) {
            Ok(true) => Ok(()),
            Ok(false) => Err(SchedError::Device {
                rank: self.rank,
                message: format!(
                    "proxy {what}: its copy kernels did not finish within {:?} (no SM free for them?)",
                    self.timeout
                ),
            }),
            Err(e) => Err(SchedError::Device {
                rank: self.rank,
                message: format!("proxy {what}: {e}"),
            }),
        }
    }

    fn failed(&self, what: &str, e: impl std::fmt::Debug) -> SchedError {
        SchedError::Device {
            rank: self.rank,
            message: format!("proxy {what}: {e:?}"),
        }
    }

    /// Raises this rank's signal `signal` to `value` on the landing stream,
    /// behind the landing just enqueued there.
    fn raise_after_landing(&self, signal: usize, value: u64) -> Result<(), SchedError> {
        let at = self.view.signal_at(self.rank, signal)?;
        // SAFETY: `at` is a word of this rank's signal array (checked).
        unsafe { self.raise.raise(&self.landings, at, SignalOp::Set(value)) }
            .map_err(|e| self.failed("raise signal", e))
    }

    fn send_image(&self, to: usize, buf: Buf) -> Result<&PinnedBytes, SchedError> {
        self.image(to, buf)
            .ok_or_else(|| self.failed("send image", format!("none for rank {to}")))
    }

    /// The send image of `to`'s `buf`: the one of every peer's dispatch
    /// pieces, or `to`'s own of the others.
    fn image(&self, to: usize, buf: Buf) -> Option<&PinnedBytes> {
        let own = self.send.get(to).and_then(Option::as_ref)?;
        match buf {
            Buf::Counts => Some(&own[0]),
            Buf::Recv => self.outbox.as_ref(),
            Buf::Comb => Some(&own[1]),
        }
    }
}

impl StagedDevice for CudaStaging {
    fn ready(&self, to: usize, signal: usize) -> u64 {
        self.view.ready(to, signal)
    }

    fn download(&mut self, to: usize, region: Region, at: usize) -> Result<Ticket, SchedError> {
        let base = self.mirror(to, region.buf)?;
        let dst = self.send_image(to, region.buf)?;
        if !fits(at, region.bytes(), dst.len()) {
            return Err(self.failed(
                "download",
                format!("{} bytes at {at} past the image", region.bytes()),
            ));
        }
        let dst = packed_rows(dst.device_ptr_at(at), region);
        // SAFETY: the mirror is a live allocation of the buffer's size and
        // `region` lies inside it (proxy_plan checks counts against the
        // capacities); the kernels finished writing it (its ready word). The
        // destination is inside this rank's pinned send image (checked),
        // mapped, and the proxy reads it only once `downloaded` says the
        // copy ran.
        unsafe {
            self.kernels
                .copy_rows(rows_of(base, region), dst, self.downloads.cu_stream())
        }
        .map_err(|e| self.failed("download", e))?;
        self.ticket()
    }

    fn download_sums(
        &mut self,
        to: usize,
        region: Region,
        wire: usize,
        sums: SlotRows<'_>,
    ) -> Result<Ticket, SchedError> {
        let base = self.mirror(to, Buf::Comb)?;
        let out_bytes = sums.slots * region.width;
        let dst = self.send_image(to, Buf::Comb)?;
        if !fits(wire, out_bytes, dst.len()) {
            return Err(self.failed(
                "sum rows",
                format!("{out_bytes} bytes at {wire} past the image"),
            ));
        }
        let dst = dst.device_ptr_at(wire);
        let tables = self.sum_tables(sums, region.rows)?;
        let src = rows_of(base, region);
        // SAFETY: the mirror region is final (its ready word) and inside
        // the mirror (as in download); the tables are this call's, on the
        // device, uploaded before on this stream (checked against the
        // piece's rows: every row they name is one of the region's) and
        // rewritten only in a later call; the sums go to this rank's pinned
        // send image (checked), read by the proxy only once the ticket says
        // the kernel ran.
        unsafe {
            self.kernels
                .sum_rows(src, SlotSums { dst, ..tables }, self.downloads.cu_stream())
        }
        .map_err(|e| self.failed("sum rows", e))?;
        self.ticket()
    }

    fn download_tokens(
        &mut self,
        to: usize,
        region: Region,
        at: usize,
        rows: &[u32],
    ) -> Result<Ticket, SchedError> {
        let rb = self.geo.row_bytes;
        let base = self.mirror(to, Buf::Recv)?;
        let image = self.send_image(to, Buf::Recv)?;
        let n = region.bytes() / rb.max(1);
        let whole = region.buf == Buf::Recv && region.end() - region.offset == n * rb;
        if !whole
            || rows.iter().any(|&r| r as usize >= n)
            || !fits(at, rows.len() * rb, image.len())
        {
            return Err(self.failed(
                "pack tokens",
                format!("{} of {region:?}'s rows to {at} of the image", rows.len()),
            ));
        }
        let dst = Rows {
            at: image.device_ptr_at(at),
            rows: rows.len(),
            width: rb,
            pitch: rb,
        };
        let Some(epoch) = self.call.map(|c| c.epoch) else {
            return Err(self.failed("pack tokens", "no call in flight"));
        };
        let Some(t) = self.sums.get_mut(to).and_then(Option::as_mut) else {
            return Err(self.failed("pack tokens", format!("no tables for rank {to}")));
        };
        let list = t
            .pack
            .upload(&self.kernels, &self.downloads, epoch, rows)
            .map_err(|e| self.failed("pack tokens", e))?;
        // SAFETY: the region's rows are whole rows inside the mirror of
        // `to`'s recv buffer, final once its ready word came up (as in
        // download), and the list names only them (checked); the list was
        // uploaded before on this stream and is kept until the call ends.
        // The packed rows go to this rank's pinned send image, which the
        // device maps (checked to fit), read by the proxy only once the
        // ticket says the kernel ran.
        unsafe {
            self.kernels.expand_rows(
                base + region.offset as u64,
                list,
                dst,
                self.downloads.cu_stream(),
            )
        }
        .map_err(|e| self.failed("pack tokens", e))?;
        self.ticket()
    }

    fn downloaded(&mut self, ticket: Ticket) -> Result<bool, SchedError> {
        let mut finished = self.finished;
        let looked = self.pending.pop_reached(&mut self.spare, |t| finished = t);
        self.finished = finished;
        looked.map_err(|e| self.failed("download", e))?;
        Ok(ticket <= self.finished)
    }

    fn sent_bytes(&self, to: usize, buf: Buf, at: usize, len: usize) -> &[u8] {
        match self.image(to, buf) {
            Some(i) => &i[at..at + len],
            None => &[],
        }
    }

    fn landing_bytes(&mut self, buf: Buf, wire: usize, len: usize) -> &mut [u8] {
        &mut self.landing[buf.index()][wire..wire + len]
    }

    fn lands_from_inbox(&self, buf: Buf) -> bool {
        self.inbox[buf.index()].is_some()
    }

    fn token_kernels(&self) -> bool {
        // The kernels move 16-byte vectors: rows, chunks and the comb
        // inbox (read in place) must be aligned to them.
        let aligned = self.geo.row_bytes.is_multiple_of(16)
            && self.geo.chunk_bytes.is_multiple_of(16)
            && self.inbox[Buf::Comb.index()]
                .as_ref()
                .is_some_and(|r| r.device_ptr_at(0).is_multiple_of(16));
        aligned && self.inbox[Buf::Recv.index()].is_some() && self.tokens_dev.is_some()
    }

    fn land_tokens(
        &mut self,
        region: Region,
        place: TokenPlace,
        fresh: Range<usize>,
        signal: usize,
        value: u64,
    ) -> Result<(), SchedError> {
        let (inbox, copy) = match (&self.inbox[Buf::Recv.index()], &self.tokens_dev) {
            (Some(i), Some(c)) => (i, c),
            _ => return Err(self.failed("land tokens", "no registered inbox or token copy")),
        };
        let (base, len, rb) = (copy.ptr(), inbox.len(), self.geo.row_bytes);
        let args = expand_args(
            base,
            len,
            self.view.own[Buf::Recv.index()],
            region,
            place,
            rb,
        )
        .ok_or_else(|| self.failed("land tokens", format!("{place:?} past the inbox")))?;
        let fresh_at = place.tokens + fresh.start * rb;
        let fresh_bytes = fresh.len() * rb;
        if fresh.end > place.pair_rows || !fits(fresh_at, fresh_bytes, len) {
            return Err(self.failed(
                "land tokens",
                format!("token slots {fresh:?} past the pair's {}", place.pair_rows),
            ));
        }
        // SAFETY: the fresh token rows and the piece's index lie inside the
        // registered inbox and, at the same offsets, inside its device copy
        // (both `len` bytes; checked above and by expand_args); the inbox
        // bytes arrived before this piece's signal and nobody writes them
        // before the next call, which starts only after end_call drained
        // this stream. The expand then reads the copy behind both copies on
        // the same stream and writes `rows` whole rows of this rank's own
        // recv buffer (region, as in download).
        unsafe {
            let s = self.landings.cu_stream();
            let copy = |x: usize, n: usize| {
                self.kernels
                    .copy_bytes(inbox.device_ptr_at(x), base + x as u64, n, s)
            };
            copy(fresh_at, fresh_bytes)
                .and_then(|_| copy(place.index, 4 * args.dst.rows))
                .map_err(|e| self.failed("land tokens", e))?;
            self.kernels
                .expand_rows(args.tokens, args.index, args.dst, s)
        }
        .map_err(|e| self.failed("land tokens", e))?;
        self.raise_after_landing(signal, value)
    }

    fn land_sums(
        &mut self,
        from: usize,
        epoch: u64,
        region: Region,
        wire: usize,
        index: &[u32],
        signal: usize,
        value: u64,
    ) -> Result<(), SchedError> {
        let slots = index
            .iter()
            .filter(|&&s| s != u32::MAX)
            .map(|&s| s as usize + 1)
            .max()
            .unwrap_or(0);
        let (tokens, len) = match &self.inbox[Buf::Comb.index()] {
            Some(r) => (r.device_ptr_at(wire), r.len()),
            None => return Err(self.failed("land sums", "no registered comb inbox")),
        };
        if index.len() != region.rows || !fits(wire, slots * region.width, len) {
            return Err(self.failed(
                "land sums",
                format!(
                    "{} rows of {} sums at {wire} ({} rows landing)",
                    index.len(),
                    slots,
                    region.rows
                ),
            ));
        }
        let index = self.sum_index(from, epoch, index)?;
        let dst = rows_of(self.view.own[Buf::Comb.index()], region);
        // SAFETY: the sums arrived in the registered comb inbox before this
        // piece's signal, inside it (checked), and nobody writes them before
        // the next call, which starts after end_call drained this stream;
        // the index is this call's, on the device, uploaded before on this
        // stream (an entry per row, naming only arrived sums); `dst` is
        // `region` of this rank's own comb buffer (as in land).
        unsafe {
            self.kernels
                .expand_rows(tokens, index, dst, self.landings.cu_stream())
        }
        .map_err(|e| self.failed("land sums", e))?;
        self.raise_after_landing(signal, value)
    }

    fn land(
        &mut self,
        region: Region,
        wire: usize,
        from: Source,
        signal: usize,
        value: u64,
    ) -> Result<(), SchedError> {
        let b = region.buf.index();
        let (src, len) = match (from, &self.inbox[b]) {
            (Source::Inbox, Some(r)) => (r.device_ptr_at(wire), r.len()),
            (Source::Inbox, None) => {
                return Err(self.failed("land", format!("no registered inbox of {:?}", region.buf)))
            }
            (Source::Image, _) => (self.landing[b].device_ptr_at(wire), self.landing[b].len()),
        };
        if !fits(wire, region.bytes(), len) {
            return Err(self.failed(
                "land",
                format!("{} bytes at {wire} past the {from:?}", region.bytes()),
            ));
        }
        let dst = rows_of(self.view.own[b], region);
        // SAFETY: `region` lies inside this rank's own buffer (as in
        // download); the source is inside the pinned landing image or the
        // registered inbox (checked), both mapped, whose bytes at `wire` no
        // other piece of this call uses and nobody writes before the next
        // call, which starts only after end_call drained this copy.
        unsafe {
            self.kernels
                .copy_rows(packed_rows(src, region), dst, self.landings.cu_stream())
        }
        .map_err(|e| self.failed("land", e))?;
        self.raise_after_landing(signal, value)
    }

    fn send_order(&mut self, rows: usize) -> Result<SendOrder, SchedError> {
        let Some(call) = self.call else {
            return Err(self.failed("send order", "no call in flight"));
        };
        let wb = match call.weight_type {
            WeightType::F32 => 4,
            WeightType::Bf16 => 2,
        };
        if rows > self.geo.send_rows || call.slots > self.geo.send_rows {
            return Err(self.failed(
                "send order",
                format!(
                    "{rows} positions and {} weights, past the {} slots",
                    call.slots, self.geo.send_rows
                ),
            ));
        }
        // SAFETY: the layer's send order holds a position per slot (the
        // send capacity, checked above); the layout phase wrote it before
        // any dispatch ready word came up, and the next call rewrites it
        // only after this call's count exchange, which this proxy has not
        // finished. The weights are the call's `[tokens, top_k]` (its
        // slots, checked), written before its route ran and kept until its
        // reduce, which waits for this proxy. Both destinations are this
        // staging's pinned copies (each large enough, as checked), read
        // below only after the stream ran the copies.
        unsafe {
            let s = self.downloads.cu_stream();
            let (order, weights) = (4 * rows, wb * call.slots);
            self.kernels
                .copy_bytes(self.order_dev, self.order.device_ptr_at(0), order, s)
                .and_then(|_| {
                    self.kernels
                        .copy_bytes(call.weights, self.weights.device_ptr_at(0), weights, s)
                })
        }
        .map_err(|e| self.failed("send order", e))?;
        self.idle(&[&self.downloads], "send order")?;
        let slots = crate::proxy_plan::words(&self.order[..4 * rows]);
        let w = &self.weights[..wb * call.slots];
        let weight = |s: usize| match call.weight_type {
            WeightType::F32 => {
                f32::from_le_bytes([w[4 * s], w[4 * s + 1], w[4 * s + 2], w[4 * s + 3]])
            }
            WeightType::Bf16 => half::bf16::from_le_bytes([w[2 * s], w[2 * s + 1]]).to_f32(),
        };
        if let Some(bad) = slots.iter().find(|&&s| s as usize >= call.slots) {
            return Err(self.failed(
                "send order",
                format!("slot {bad} of a call of {} slots", call.slots),
            ));
        }
        let weights = slots.iter().map(|&s| weight(s as usize)).collect();
        Ok(SendOrder { slots, weights })
    }

    fn end_call(&mut self) -> Result<(), SchedError> {
        self.drain()
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
}

/// The inner transport's memory of `inbox`, registered with the driver,
/// when it is host memory and registration works (else pieces of it land
/// through the pinned landing image).
fn register_inbox<T: Transport>(
    t: &StagedTransport<T>,
    inbox: BufferId,
) -> Option<HostRegistration> {
    let (addr, len) = t.inner().host_memory(inbox).ok().flatten()?;
    // SAFETY: the inner transport keeps its buffers in place until it
    // drops, after the proxy thread has drained its streams and dropped
    // this staging (the thread holds the transport).
    match unsafe { HostRegistration::new(t.context(), addr, len) } {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::debug!(rank = t.rank(), error = %e, "inbox not registered; landing through staging");
            None
        }
    }
}

/// The staged proxy's life on its thread: every call handed over, in
/// order, until the channel closes; its streams drained before it ends,
/// so the layer's memory is not freed under a landing (and the inboxes'
/// registrations, dropped with the staging, outlive every copy).
impl<T: Transport + 'static> ProxyRun<T> for CudaStaging {
    fn run(
        mut self,
        t: &StagedTransport<T>,
        calls: &mpsc::Receiver<ProxyCall>,
    ) -> Result<(), SchedError> {
        let rank = self.rank;
        let mut proxy = StagedProxy::new(
            t.inner(),
            self.geo,
            self.view.inbox,
            self.timeout,
            self.wire,
        )?;
        let ran = calls.iter().try_for_each(|call| {
            let epoch = call.epoch;
            self.call = Some(call);
            let stats = proxy.call(&mut self, epoch)?;
            tracing::debug!(
                rank,
                epoch,
                sent = stats.sent,
                landed = stats.landed,
                mb_sent = stats.bytes_sent as f64 / 1e6,
                ms = stats.elapsed.as_secs_f64() * 1e3,
                wire_ms = stats.on_wire.as_secs_f64() * 1e3,
                landing_ms = stats.landing.as_secs_f64() * 1e3,
                "proxy call done"
            );
            Ok(())
        });
        // The call's error, if any, is the cause of a failed drain.
        let drained = self.drain_before_free();
        ran.and(drained)
    }
}

impl<T: Transport + 'static> StagedLayer<T> {
    /// Collective, as [`MoeLayer::new`]; rank `inner.rank()` runs on
    /// device `ordinal`, its pieces staged through host memory over
    /// `inner` (UCX, the local transport). Over NCCL: `over_nccl`
    /// (`crate::nccl_device`, feature `nccl`).
    pub fn new(
        cfg: &MoeConfig,
        capacity: usize,
        inner: T,
        ordinal: usize,
        kernels: &LayerKernels,
        opts: &LayerOptions,
    ) -> Result<Self, SchedError> {
        let rank = inner.rank();
        if inner.capabilities().name == "nccl" {
            return Err(SchedError::Input {
                rank,
                message: "NCCL moves nothing at a put: its layer is built by \
                          StagedLayer::over_nccl (nccl_device)"
                    .into(),
            });
        }
        needs_queues(rank, cuda::hardware_queues(), "the proxy's downloads")?;
        let t = StagedTransport::new(inner, ordinal, 2 * cfg.hidden)?;
        let mut o = opts.clone();
        if o.reserved_sms == 0 && cfg.ranks > 1 {
            // The proxy's copies, packs, sums and landings are kernels,
            // which need SMs that the persistent GEMMs waiting for them do
            // not hold. Kernels rather than copy engines: a copy waiting
            // behind a call on another stream held a copy engine's
            // download back (docs/ARCHITECTURE.md).
            o.reserved_sms = crate::proxy_plan::PROXY_KERNEL_SMS * o.ranks_per_gpu.max(1);
        }
        let layer = MoeLayer::new(cfg, capacity, t, kernels, &o)?;
        let (timeout, wire) = (opts.timeout, opts.wire_format);
        StagedLayer::with_proxy(layer, |layer, stop| {
            let geo = Geometry::of(layer.plan());
            CudaStaging::new(layer.transport(), layer, &geo, stop, timeout, wire)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy_plan::Kind;
    use rand::{Rng, SeedableRng};

    /// Every token-once piece's expand takes arguments the kernel accepts
    /// (comet_kernels' check_expand), whatever the counts: the index array
    /// of a pair's later experts starts 4 bytes per earlier row into the
    /// pair's area, so it is only word aligned, which the kernel allows.
    #[test]
    fn every_token_piece_expands_on_the_device() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(17);
        let (inbox, own) = (0x7f00_0000_0010u64, 0x7e00_0000_0000u64);
        for _ in 0..200 {
            let w = rng.gen_range(2..=4);
            let e = w * rng.gen_range(1..=4);
            let counts: Vec<Vec<u32>> = (0..w)
                .map(|_| (0..e).map(|_| rng.gen_range(0..7)).collect())
                .collect();
            let recv = (0..w)
                .map(|d| {
                    let epr = e / w;
                    counts
                        .iter()
                        .flat_map(|r| &r[d * epr..(d + 1) * epr])
                        .sum::<u32>() as usize
                })
                .max()
                .unwrap_or(0);
            let geo = Geometry {
                ranks: w,
                experts: e,
                row_bytes: 2 * 64 * rng.gen_range(1..=4),
                chunks: 1,
                chunk_bytes: 0,
                groups: 1,
                recv_rows: recv,
                send_rows: 7 * e,
                top_k: 2,
            };
            let geo = Geometry {
                chunk_bytes: geo.row_bytes,
                groups: 1,
                ..geo
            };
            let len = geo.inbox_bytes(Buf::Recv);
            for p in geo.data_pieces(0, &counts).unwrap() {
                if !matches!(p.kind, Kind::Dispatch { .. }) {
                    continue;
                }
                let place = geo.token_place(&counts, &p);
                let a = expand_args(inbox, len, own, p.region, place, geo.row_bytes)
                    .unwrap_or_else(|| panic!("{p}: {place:?} past {len} bytes"));
                assert_eq!(a.dst.rows, p.region.bytes() / geo.row_bytes);
                comet_kernels::forward::check_expand(a.tokens, a.index, a.dst)
                    .unwrap_or_else(|err| panic!("{p}: {place:?}: {err}"));
            }
        }
    }

    /// The combine tables' areas are 16-byte aligned, in order, apart, and
    /// each holds what a pair of the receive capacity can need.
    #[test]
    fn sum_tables_hold_a_pair_of_the_receive_capacity() {
        for rows in [0, 1, 3, 4, 5, 1000, 262_144] {
            let l = TableLayout::new(rows);
            assert_eq!(l.starts, 0);
            assert!(
                l.rows.is_multiple_of(16) && l.ratio.is_multiple_of(16),
                "{l:?}"
            );
            assert!(l.rows >= 4 * (rows + 1), "{l:?}");
            assert!(l.ratio >= l.rows + 4 * rows, "{l:?}");
            assert_eq!(l.bytes, l.ratio + 4 * rows);
        }
        let mut b = vec![0u8; 12];
        put_words(&mut b[..8], [1u32, 2, 3].iter().map(|x| x.to_le_bytes()));
        assert_eq!(b, [1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn an_area_past_the_inbox_is_refused() {
        let region = Region {
            buf: Buf::Recv,
            offset: 0,
            rows: 1,
            width: 2 * 128,
            pitch: 2 * 128,
        };
        let place = TokenPlace {
            index: 0,
            ratio: 8,
            tokens: 16,
            pair_rows: 2,
        };
        assert!(expand_args(0, 16 + 2 * 128, 0, region, place, 128).is_some());
        assert!(expand_args(0, 16 + 2 * 128 - 1, 0, region, place, 128).is_none());
        let far = TokenPlace {
            pair_rows: usize::MAX,
            ..place
        };
        assert!(expand_args(0, usize::MAX, 0, region, far, 128).is_none());
    }
}
