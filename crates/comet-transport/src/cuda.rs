//! The few CUDA driver calls the GPU transports need, wrapped once.
//!
//! Everything `unsafe` of the `nvlink` and `nccl` transports that touches
//! the driver lives here: plain `cuMemAlloc` allocations (stream-ordered
//! pool allocations are neither peer-accessible nor IPC-exportable), CUDA
//! IPC export/import, peer access, asynchronous copies, stream memory
//! operations (`cuStreamWriteValue64` raises a signal after the data on the
//! same stream) and a one-thread PTX kernel for counter signals
//! (`SignalOp::Add`), which stream memory operations cannot express; and
//! for staged (host-proxied) transports, mapped pinned ready words and the
//! 2-D copies between device mirrors and staging (host staging for UCX,
//! device staging packed for NCCL's sends and landed from its recvs).
//!
//! The driver is loaded at run time (cudarc `dynamic-loading`), so this
//! builds and links on a machine with no CUDA; [`gpu_available`] says
//! whether a driver and a device are present before anything else runs.

use crate::error::TransportError;
use crate::signal_core::{poll_bounded, Polled};
use crate::transport::SignalOp;
use cudarc::driver::{
    result, sys, CudaContext, CudaFunction, CudaStream, DriverError, LaunchConfig, PushKernelArg,
};
use std::ffi::c_void;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Size of a CUDA IPC memory handle.
pub const IPC_HANDLE_BYTES: usize = 64;

/// Converts a driver error into the transport error, naming what failed.
pub fn driver_err(
    backend: &'static str,
    rank: usize,
    what: &str,
    e: DriverError,
) -> TransportError {
    TransportError::Backend {
        backend,
        rank,
        message: format!("{what}: {e:?}"),
    }
}

/// Whether a CUDA driver is loadable and reports at least one device.
/// Never panics (cudarc panics when it must load a missing library).
pub fn gpu_available() -> bool {
    device_count() > 0
}

/// Number of CUDA devices, 0 when there is no driver.
pub fn device_count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(|| {
        // SAFETY: only probes whether the shared library can be opened.
        if !unsafe { sys::is_culib_present() } {
            return 0;
        }
        if result::init().is_err() {
            return 0;
        }
        result::device::get_count()
            .map(|n| n.max(0) as usize)
            .unwrap_or(0)
    })
}

/// The hardware work queues CUDA gives this process's contexts, as
/// `CUDA_DEVICE_MAX_CONNECTIONS` says now (CUDA reads it once, when it
/// starts: a process that changes it later misleads this). Unset: 8, the
/// documented default; 1 to 32 as given. Outside that range CUDA's reading
/// is not documented: this takes 0 and unreadable values as the default,
/// larger ones as 32. With one queue every stream's kernels and
/// device-to-host copies queue behind every other stream's (docs/PERF.md,
/// 2026-12-06): work queued after a kernel that spins for it waits out the
/// spinner's timeout.
pub fn hardware_queues() -> usize {
    queues_from(std::env::var("CUDA_DEVICE_MAX_CONNECTIONS").ok().as_deref())
}

/// [`hardware_queues`] for a value of the variable.
pub fn queues_from(var: Option<&str>) -> usize {
    match var.and_then(|v| v.trim().parse::<usize>().ok()) {
        Some(n) if n >= 1 => n.min(32),
        _ => 8,
    }
}

/// Opens device `ordinal`'s primary context with cudarc's event tracking
/// off: the transports and the kernels that spin on signals synchronise
/// through signal words across streams, and tracking would insert waits
/// between those streams that deadlock against a spinning kernel.
pub fn open_context(ordinal: usize) -> Result<Arc<CudaContext>, DriverError> {
    let ctx = CudaContext::new(ordinal)?;
    // SAFETY: we never rely on cudarc's implicit cross-stream ordering of
    // CudaSlice uses; every cross-stream dependency is a signal or an
    // explicit synchronisation.
    unsafe { ctx.disable_event_tracking() };
    Ok(ctx)
}

/// A zeroed device allocation made with `cuMemAlloc`, freed on drop.
pub struct DeviceAlloc {
    ptr: sys::CUdeviceptr,
    bytes: usize,
    ctx: Arc<CudaContext>,
}

impl std::fmt::Debug for DeviceAlloc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceAlloc({:#x}, {} bytes)", self.ptr, self.bytes)
    }
}

impl DeviceAlloc {
    /// `bytes` may be 0: one byte is allocated so the buffer has an address
    /// and an IPC handle like every other.
    pub fn zeroed(ctx: &Arc<CudaContext>, bytes: usize) -> Result<Self, DriverError> {
        ctx.bind_to_thread()?;
        let n = bytes.max(1);
        // SAFETY: a plain allocation; it is zeroed below before anyone reads it.
        let ptr = unsafe { result::malloc_sync(n)? };
        let me = Self {
            ptr,
            bytes,
            ctx: Arc::clone(ctx),
        };
        // SAFETY: `ptr` is a live allocation of `n` bytes in this context.
        unsafe { result::memset_d8_sync(ptr, 0, n)? };
        Ok(me)
    }

    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The CUDA IPC handle of this allocation, for other processes.
    pub fn ipc_handle(&self) -> Result<[u8; IPC_HANDLE_BYTES], DriverError> {
        self.ctx.bind_to_thread()?;
        let mut h = std::mem::MaybeUninit::<sys::CUipcMemHandle>::uninit();
        // SAFETY: `ptr` is the base of a cuMemAlloc allocation of this context.
        unsafe { sys::cuIpcGetMemHandle(h.as_mut_ptr(), self.ptr).result()? };
        // SAFETY: initialised by the successful call above.
        let h = unsafe { h.assume_init() };
        let mut out = [0u8; IPC_HANDLE_BYTES];
        for (o, &c) in out.iter_mut().zip(h.reserved.iter()) {
            *o = c as u8;
        }
        Ok(out)
    }
}

impl Drop for DeviceAlloc {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: we own the allocation; peers that mapped it must have
            // been synchronised by the collective that dropped it.
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}

/// A peer process's allocation mapped through CUDA IPC; unmapped on drop.
pub struct IpcMapping {
    ptr: sys::CUdeviceptr,
    ctx: Arc<CudaContext>,
}

impl IpcMapping {
    pub fn open(
        ctx: &Arc<CudaContext>,
        handle: &[u8; IPC_HANDLE_BYTES],
    ) -> Result<Self, DriverError> {
        ctx.bind_to_thread()?;
        let mut h = sys::CUipcMemHandle {
            reserved: [0; IPC_HANDLE_BYTES],
        };
        for (c, &b) in h.reserved.iter_mut().zip(handle.iter()) {
            *c = b as _;
        }
        let mut ptr: sys::CUdeviceptr = 0;
        let flags = sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32;
        // SAFETY: the handle came from cuIpcGetMemHandle in another process;
        // the driver validates it and fails cleanly otherwise.
        unsafe { sys::cuIpcOpenMemHandle_v2(&mut ptr, h, flags).result()? };
        Ok(Self {
            ptr,
            ctx: Arc::clone(ctx),
        })
    }

    pub fn ptr(&self) -> u64 {
        self.ptr
    }
}

impl Drop for IpcMapping {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: the mapping was opened by us and is no longer used.
            let _ = unsafe { sys::cuIpcCloseMemHandle(self.ptr).result() };
        }
    }
}

/// Lets `ctx` access memory of `peer` (different devices of one process).
/// Already-enabled access is not an error.
pub fn enable_peer_access(
    ctx: &Arc<CudaContext>,
    peer: &Arc<CudaContext>,
) -> Result<(), DriverError> {
    if ctx.cu_device() == peer.cu_device() {
        return Ok(());
    }
    ctx.bind_to_thread()?;
    // SAFETY: both contexts are live primary contexts.
    let r = unsafe { sys::cuCtxEnablePeerAccess(peer.cu_ctx(), 0) };
    match r {
        sys::CUresult::CUDA_SUCCESS | sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED => {
            Ok(())
        }
        other => Err(DriverError(other)),
    }
}

/// Whether the two devices can access each other's memory.
pub fn can_access_peer(a: &Arc<CudaContext>, b: &Arc<CudaContext>) -> Result<bool, DriverError> {
    if a.cu_device() == b.cu_device() {
        return Ok(true);
    }
    let mut v: i32 = 0;
    // SAFETY: plain query on two valid device handles.
    unsafe { sys::cuDeviceCanAccessPeer(&mut v, a.cu_device(), b.cu_device()).result()? };
    Ok(v != 0)
}

/// Enqueues a 64-bit store of `value` at `addr` on `stream`, after all
/// earlier work of the stream, preceded by a system-wide memory barrier
/// (the default flags), so the data copied before it is visible first.
///
/// # Safety
/// `addr` must be an 8-byte aligned device address valid in the stream's
/// context for as long as the stream may run the operation.
pub unsafe fn write_value64(stream: &CudaStream, addr: u64, value: u64) -> Result<(), DriverError> {
    let flags = sys::CUstreamWriteValue_flags::CU_STREAM_WRITE_VALUE_DEFAULT as u32;
    sys::cuStreamWriteValue64_v2(stream.cu_stream(), addr, value, flags).result()
}

/// Enqueues a device-to-device copy (any two addresses of the unified
/// address space this context can reach: local, peer or IPC-mapped).
///
/// # Safety
/// Both ranges must stay valid until the stream has run the copy.
pub unsafe fn copy_dtod_async(
    stream: &CudaStream,
    dst: u64,
    src: u64,
    bytes: usize,
) -> Result<(), DriverError> {
    result::memcpy_dtod_async(dst, src, bytes, stream.cu_stream())
}

/// Copy between devices of different contexts (the cuMemcpyPeer baseline).
///
/// # Safety
/// As [`copy_dtod_async`].
pub unsafe fn copy_peer_async(
    stream: &CudaStream,
    dst: u64,
    dst_ctx: &CudaContext,
    src: u64,
    src_ctx: &CudaContext,
    bytes: usize,
) -> Result<(), DriverError> {
    result::memcpy_peer_async(
        dst_ctx.cu_ctx(),
        dst,
        src_ctx.cu_ctx(),
        src,
        bytes,
        stream.cu_stream(),
    )
}

/// Whether `p` is page-locked (pinned or registered) host memory, which
/// an asynchronous copy reads later rather than before returning.
pub fn is_pinned_host(p: *const u8) -> bool {
    let mut ty: u32 = 0;
    let mut attr = sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE;
    let mut data = [(&mut ty as *mut u32).cast::<c_void>()];
    // SAFETY: a query. Unlike cuPointerGetAttribute, the plural form
    // answers "no type" for pageable memory instead of raising an API
    // error (which tools such as compute-sanitizer report).
    let r = unsafe { sys::cuPointerGetAttributes(1, &mut attr, data.as_mut_ptr(), p as u64) };
    r == sys::CUresult::CUDA_SUCCESS && ty == sys::CUmemorytype::CU_MEMORYTYPE_HOST as u32
}

/// Enqueues a host-to-device copy. From pageable memory the driver has
/// consumed `src` when this returns; from pinned memory the caller must
/// synchronise the stream before `src` changes (see [`is_pinned_host`]).
///
/// # Safety
/// `dst .. dst + src.len()` must be valid device memory.
pub unsafe fn copy_htod_async(
    stream: &CudaStream,
    dst: u64,
    src: &[u8],
) -> Result<(), DriverError> {
    result::memcpy_htod_async(dst, src, stream.cu_stream())
}

/// Synchronous device-to-host copy on `stream` (never the legacy default
/// stream, which would wait behind a spinning kernel).
///
/// # Safety
/// `src .. src + dst.len()` must be valid device memory.
pub unsafe fn copy_dtoh_sync(
    stream: &CudaStream,
    dst: &mut [u8],
    src: u64,
) -> Result<(), DriverError> {
    result::memcpy_dtoh_async(dst, src, stream.cu_stream())?;
    stream.synchronize()
}

/// Reads one 64-bit word of device memory through `stream`.
pub fn read_word(stream: &CudaStream, addr: u64) -> Result<u64, DriverError> {
    let mut b = [0u8; 8];
    // SAFETY: callers pass the address of a live signal word.
    unsafe { copy_dtoh_sync(stream, &mut b, addr)? };
    Ok(u64::from_le_bytes(b))
}

/// The 64-bit word where this rank's kernels record their first error
/// (signal.cuh layout: `code << 32 | signal`), read and cleared through a
/// poll stream that never queues behind the layer's own work.
pub struct ErrorWord(DeviceAlloc);

impl ErrorWord {
    pub fn zeroed(ctx: &Arc<CudaContext>) -> Result<Self, DriverError> {
        DeviceAlloc::zeroed(ctx, 8).map(ErrorWord)
    }

    pub fn ptr(&self) -> u64 {
        self.0.ptr()
    }

    pub fn read(&self, poll: &CudaStream) -> Result<u64, DriverError> {
        read_word(poll, self.ptr())
    }

    pub fn clear(&self, poll: &CudaStream) -> Result<(), DriverError> {
        // SAFETY: our own live 8-byte word; the stream is synchronised next.
        unsafe { write_value64(poll, self.ptr(), 0)? };
        poll.synchronize()
    }
}

// A release add at system scope, issued by one thread after the fence that
// orders the stream's earlier copies before it. Hand-written PTX, JIT
// compiled by the driver for the device present: no NVRTC needed.
const SIGNAL_ADD_PTX: &str = r#"
.version 7.0
.target sm_70
.address_size 64
.visible .entry comet_transport_signal_add(.param .u64 p_addr, .param .u64 p_delta)
{
    .reg .b64 %rd<3>;
    ld.param.u64 %rd1, [p_addr];
    ld.param.u64 %rd2, [p_delta];
    fence.acq_rel.sys;
    red.release.sys.global.add.u64 [%rd1], %rd2;
    ret;
}
"#;

/// The counter-signal kernel, loaded once per [`HostSignal`] that adds.
pub struct SignalAdd {
    f: CudaFunction,
}

impl SignalAdd {
    pub fn load(ctx: &Arc<CudaContext>) -> Result<Self, DriverError> {
        let m = ctx.load_module(cudarc::nvrtc::Ptx::from_src(SIGNAL_ADD_PTX))?;
        let f = m.load_function("comet_transport_signal_add")?;
        // Loaded now, not at its first launch: under CUDA's lazy loading
        // that launch (behind kernels spinning for the signal it raises)
        // could wait on a context synchronization (comet-kernels'
        // load_function says more). cuFuncLoad came with CUDA 12.4.
        let mut v = 0;
        // SAFETY: out-pointer to a live int.
        unsafe { sys::cuDriverGetVersion(&mut v) }.result()?;
        if v >= 12040 {
            // SAFETY: a live function handle of the module `f` keeps loaded.
            unsafe { sys::cuFuncLoad(f.cu_function()) }.result()?;
        }
        Ok(Self { f })
    }

    /// Enqueues `*addr += delta` (release, system scope) on `stream`.
    ///
    /// # Safety
    /// As [`write_value64`].
    pub unsafe fn launch(
        &self,
        stream: &Arc<CudaStream>,
        addr: u64,
        delta: u64,
    ) -> Result<(), DriverError> {
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(&self.f);
        b.arg(&addr).arg(&delta);
        b.launch(cfg).map(|_| ())
    }
}

/// The host half of the signal ABI, the one way every GPU transport raises
/// a signal word from the host: enqueued on a stream after the data it
/// guards. `Set` is `cuStreamWriteValue64` with default flags (a
/// system-wide barrier first); `Add` is the one-thread release-add kernel
/// ([`SignalAdd`], loaded on first use), since stream memory operations
/// cannot add.
///
/// Why `cuStreamWriteValue64` and not an 8-byte host-to-device copy:
/// comet-kernels' `device::raise_signal_async` says the call answered
/// `CUDA_ERROR_INVALID_VALUE` on a 13.0 driver and copies instead, but the
/// nvlink transport has raised every `Set` this way on GPUs (H100, driver
/// 580: docs/PERF.md's nvlink put+signal rows, tests/nvlink_gpu.rs), and a
/// stream write orders after the stream's earlier copies without staging a
/// pageable host word. This is the path kept.
pub struct HostSignal {
    ctx: Arc<CudaContext>,
    add: OnceLock<SignalAdd>,
}

impl HostSignal {
    pub fn new(ctx: &Arc<CudaContext>) -> Self {
        Self {
            ctx: Arc::clone(ctx),
            add: OnceLock::new(),
        }
    }

    fn add_kernel(&self) -> Result<&SignalAdd, DriverError> {
        if let Some(k) = self.add.get() {
            return Ok(k);
        }
        let k = SignalAdd::load(&self.ctx)?;
        Ok(self.add.get_or_init(|| k))
    }

    /// Enqueues the raise of the word at `addr` by `op` on `stream`, after
    /// all earlier work of the stream.
    ///
    /// # Safety
    /// As [`write_value64`].
    pub unsafe fn raise(
        &self,
        stream: &Arc<CudaStream>,
        addr: u64,
        op: SignalOp,
    ) -> Result<(), DriverError> {
        match op {
            // SAFETY: the caller's contract is write_value64's.
            SignalOp::Set(v) => unsafe { write_value64(stream, addr, v) },
            // SAFETY: as above.
            SignalOp::Add(d) => unsafe { self.add_kernel()?.launch(stream, addr, d) },
        }
    }
}

/// A token unique to this process (pid alone repeats across containers):
/// ranks that share it can use each other's device pointers directly.
pub fn process_token() -> u64 {
    static TOKEN: OnceLock<u64> = OnceLock::new();
    // Random from the OS-seeded generator, mixed with the pid.
    *TOKEN.get_or_init(|| rand::random::<u64>() ^ (u64::from(std::process::id()) << 32))
}

/// 64-bit words of pinned host memory mapped into the device's address
/// space: kernels raise them with system-scope stores and a host thread
/// polls them with plain atomic loads, no driver call per look (the ready
/// words of a staged proxy). Freed on drop.
pub struct MappedWords {
    host: *mut u64,
    dev: u64,
    len: usize,
    ctx: Arc<CudaContext>,
}

// SAFETY: the memory is pinned, owned by this value until drop, and only
// ever accessed through atomic loads on the host.
unsafe impl Send for MappedWords {}
// SAFETY: as above; shared access is atomic loads only.
unsafe impl Sync for MappedWords {}

impl std::fmt::Debug for MappedWords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MappedWords({:#x}, {} words)", self.dev, self.len)
    }
}

impl MappedWords {
    /// `len` zeroed words (at least one is allocated).
    pub fn zeroed(ctx: &Arc<CudaContext>, len: usize) -> Result<Self, DriverError> {
        ctx.bind_to_thread()?;
        let bytes = 8 * len.max(1);
        let mut host: *mut c_void = std::ptr::null_mut();
        let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
        // SAFETY: a plain pinned allocation of `bytes`, written below before use.
        unsafe { sys::cuMemHostAlloc(&mut host, bytes, flags).result()? };
        let mut me = Self {
            host: host.cast(),
            dev: 0,
            len,
            ctx: Arc::clone(ctx),
        };
        // SAFETY: `host` is a live allocation of `bytes` bytes, not yet shared.
        unsafe { std::ptr::write_bytes(host.cast::<u8>(), 0, bytes) };
        // SAFETY: `host` was allocated with DEVICEMAP in this context.
        unsafe { sys::cuMemHostGetDevicePointer_v2(&mut me.dev, host, 0).result()? };
        Ok(me)
    }

    /// The words' address for kernels of this context.
    pub fn device_ptr(&self) -> u64 {
        self.dev
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Word `i` with acquire ordering (what the device wrote before its
    /// release store of the word is visible after); 0 outside the words.
    pub fn load(&self, i: usize) -> u64 {
        if i >= self.len {
            return 0;
        }
        // SAFETY: `i` is in bounds, the memory is live and 8-byte aligned
        // (pinned allocations are page aligned), and every host access is
        // atomic.
        let w = unsafe { &*self.host.add(i).cast::<std::sync::atomic::AtomicU64>() };
        w.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl Drop for MappedWords {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: allocated by cuMemHostAlloc in `zeroed`, freed once.
            // A failure here leaves the memory to the context's teardown.
            let _ = unsafe { sys::cuMemFreeHost(self.host.cast()) };
        }
    }
}

/// The runs of a 2-D copy: `rows` runs of `width` bytes, `pitch` apart on
/// the strided side, packed (one after another) on the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Runs {
    pub rows: usize,
    pub width: usize,
    pub pitch: usize,
}

/// One side of a copy of runs.
#[derive(Clone, Copy)]
enum Side {
    Host(*mut u8),
    Device(u64),
}

/// Enqueues a copy of `runs` between `src` and `dst` on `stream`: the
/// strided side has them `pitch` apart, the other packed. One run is a
/// plain copy (2-D copies refuse pitches over the device's limit, and a
/// single run of a large piece can exceed it).
///
/// # Safety
/// Both sides are live memory of the stream's context (host sides
/// pinned) for the extent of `runs` on them, neither written by anyone
/// else (nor the destination read) until the stream has run the copy.
unsafe fn copy_runs(
    stream: &CudaStream,
    src: Side,
    dst: Side,
    runs: Runs,
    strided_src: bool,
) -> Result<(), DriverError> {
    if runs.rows == 0 || runs.width == 0 {
        return Ok(());
    }
    let s = stream.cu_stream();
    if runs.rows == 1 {
        // SAFETY (every arm): both sides as the caller promises.
        return unsafe {
            match (src, dst) {
                (Side::Device(a), Side::Host(b)) => {
                    sys::cuMemcpyDtoHAsync_v2(b.cast(), a, runs.width, s)
                }
                (Side::Host(a), Side::Device(b)) => {
                    sys::cuMemcpyHtoDAsync_v2(b, a.cast_const().cast(), runs.width, s)
                }
                (Side::Device(a), Side::Device(b)) => {
                    sys::cuMemcpyDtoDAsync_v2(b, a, runs.width, s)
                }
                (Side::Host(_), Side::Host(_)) => sys::CUresult::CUDA_ERROR_INVALID_VALUE,
            }
            .result()
        };
    }
    let (src_pitch, dst_pitch) = if strided_src {
        (runs.pitch, runs.width)
    } else {
        (runs.width, runs.pitch)
    };
    // Every field named: the memory-type enums have no zero value, so an
    // all-zero struct (mem::zeroed) is not a valid value of this type.
    let (src_type, src_host, src_device) = match src {
        Side::Host(p) => (
            sys::CUmemorytype::CU_MEMORYTYPE_HOST,
            p.cast_const().cast(),
            0,
        ),
        Side::Device(p) => (sys::CUmemorytype::CU_MEMORYTYPE_DEVICE, std::ptr::null(), p),
    };
    let (dst_type, dst_host, dst_device) = match dst {
        Side::Host(p) => (sys::CUmemorytype::CU_MEMORYTYPE_HOST, p.cast(), 0),
        Side::Device(p) => (
            sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            std::ptr::null_mut(),
            p,
        ),
    };
    let c = sys::CUDA_MEMCPY2D {
        srcXInBytes: 0,
        srcY: 0,
        srcMemoryType: src_type,
        srcHost: src_host,
        srcDevice: src_device,
        srcArray: std::ptr::null_mut(),
        srcPitch: src_pitch,
        dstXInBytes: 0,
        dstY: 0,
        dstMemoryType: dst_type,
        dstHost: dst_host,
        dstDevice: dst_device,
        dstArray: std::ptr::null_mut(),
        dstPitch: dst_pitch,
        WidthInBytes: runs.width,
        Height: runs.rows,
    };
    // SAFETY: both sides as the caller promises.
    unsafe { sys::cuMemcpy2DAsync_v2(&c, s).result() }
}

/// Enqueues a copy of `runs` from device `src` into host memory at `dst`,
/// packed (`rows * width` bytes), on `stream`.
///
/// # Safety
/// `src .. src + (rows-1)*pitch + width` is live device memory of the
/// stream's context, not written until the copy has run; `dst` is
/// `rows * width` bytes of pinned host memory, neither read nor written by
/// anyone else until the stream has run the copy.
pub unsafe fn copy_runs_to_host(
    stream: &CudaStream,
    src: u64,
    runs: Runs,
    dst: *mut u8,
) -> Result<(), DriverError> {
    // SAFETY: the caller's contract is copy_runs'.
    unsafe { copy_runs(stream, Side::Device(src), Side::Host(dst), runs, true) }
}

/// Enqueues a copy of packed host memory at `src` (`rows * width` bytes)
/// into `runs` at device `dst`, on `stream`.
///
/// # Safety
/// `dst .. dst + (rows-1)*pitch + width` is live device memory of the
/// stream's context until the stream has run the copy; `src` is pinned
/// host memory left unwritten until then.
pub unsafe fn copy_runs_to_device(
    stream: &CudaStream,
    src: *const u8,
    dst: u64,
    runs: Runs,
) -> Result<(), DriverError> {
    // SAFETY: the caller's contract is copy_runs'.
    unsafe {
        copy_runs(
            stream,
            Side::Host(src.cast_mut()),
            Side::Device(dst),
            runs,
            false,
        )
    }
}

/// Enqueues a device-to-device copy of `runs` at `src` into `dst`, packed
/// (`rows * width` bytes), on `stream` (a 2-D piece gathered for a
/// transport that sends one contiguous range).
///
/// # Safety
/// `src .. src + (rows-1)*pitch + width` and `dst .. dst + rows*width` are
/// live device memory of the stream's context, the first not written and
/// the second not touched by anyone else until the stream has run the copy.
pub unsafe fn pack_runs(
    stream: &CudaStream,
    src: u64,
    runs: Runs,
    dst: u64,
) -> Result<(), DriverError> {
    // SAFETY: the caller's contract is copy_runs'.
    unsafe { copy_runs(stream, Side::Device(src), Side::Device(dst), runs, true) }
}

/// Enqueues a device-to-device copy of packed bytes at `src` (`rows *
/// width`) into `runs` at `dst`, on `stream` (the inverse of
/// [`pack_runs`]).
///
/// # Safety
/// As [`pack_runs`], the two sides swapped.
pub unsafe fn unpack_runs(
    stream: &CudaStream,
    src: u64,
    dst: u64,
    runs: Runs,
) -> Result<(), DriverError> {
    // SAFETY: the caller's contract is copy_runs'.
    unsafe { copy_runs(stream, Side::Device(src), Side::Device(dst), runs, false) }
}

/// Whether `stream` has run everything enqueued on it so far
/// (`cuStreamQuery`: never waits).
pub fn stream_idle(stream: &CudaStream) -> Result<bool, DriverError> {
    // SAFETY: a query on a live stream of the current context.
    match unsafe { sys::cuStreamQuery(stream.cu_stream()) } {
        sys::CUresult::CUDA_SUCCESS => Ok(true),
        sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
        other => Err(DriverError(other)),
    }
}

/// Whether every stream of `streams` ran dry within `timeout`: the bounded
/// stand-in for synchronizing them, so a proxy whose copies cannot run
/// (no SM free for its kernels, a peer that never sends) returns an error
/// instead of blocking for good. Errors name `backend`, `rank` and `what`.
pub fn streams_idle_within(
    streams: &[&CudaStream],
    timeout: Duration,
    backend: &'static str,
    rank: usize,
    what: &str,
) -> Result<bool, TransportError> {
    let look = |_| -> Result<Option<()>, TransportError> {
        for s in streams {
            if !stream_idle(s).map_err(|e| driver_err(backend, rank, what, e))? {
                return Ok(None);
            }
        }
        Ok(Some(()))
    };
    Ok(matches!(
        poll_bounded(timeout, look, std::thread::sleep)?,
        Polled::Ready(())
    ))
}

/// Whether `stream` is being captured into a CUDA graph.
///
/// # Safety
/// `stream` is a live stream handle (or null, the legacy default stream).
pub unsafe fn is_capturing(stream: sys::CUstream) -> Result<bool, DriverError> {
    let mut status = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    // SAFETY: a query on a live stream (caller) into a local.
    unsafe { sys::cuStreamIsCapturing(stream, &mut status).result()? };
    Ok(status != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
}

/// Lets this thread make calls that are unsafe while a stream is captured
/// (synchronous copies, synchronisations) without failing or invalidating
/// a capture that another thread of the process runs in global mode (a
/// proxy thread beside a model that captures CUDA graphs).
pub fn relax_capture_mode() -> Result<(), DriverError> {
    let mut mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED;
    // SAFETY: exchanges this thread's mode with a valid enum value.
    unsafe { sys::cuThreadExchangeStreamCaptureMode(&mut mode) }.result()
}

/// Bytes of pinned (page-locked) host memory, mapped for the device:
/// copies to and from the device run at the link's speed without the
/// driver staging them, and kernels read and write it over the bus (a
/// staged proxy's sums and tables). Freed on drop.
pub struct PinnedBytes {
    ptr: *mut u8,
    dev: u64,
    len: usize,
    ctx: Arc<CudaContext>,
}

// SAFETY: plain host memory owned by this value, moved with it like a Vec.
unsafe impl Send for PinnedBytes {}

impl PinnedBytes {
    /// `len` zeroed bytes (at least one is allocated).
    pub fn zeroed(ctx: &Arc<CudaContext>, len: usize) -> Result<Self, DriverError> {
        ctx.bind_to_thread()?;
        let mut p: *mut c_void = std::ptr::null_mut();
        let flags = sys::CU_MEMHOSTALLOC_PORTABLE | sys::CU_MEMHOSTALLOC_DEVICEMAP;
        // SAFETY: a plain pinned allocation, zeroed below before use.
        unsafe { sys::cuMemHostAlloc(&mut p, len.max(1), flags).result()? };
        // SAFETY: `p` is a live allocation of at least `len` bytes.
        unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0, len.max(1)) };
        let mut me = Self {
            ptr: p.cast(),
            dev: 0,
            len,
            ctx: Arc::clone(ctx),
        };
        // SAFETY: allocated with DEVICEMAP just above; on error `me` frees it.
        unsafe { sys::cuMemHostGetDevicePointer_v2(&mut me.dev, p, 0).result()? };
        Ok(me)
    }

    /// The device's address of byte `at` (`at` within), for kernels.
    pub fn device_ptr_at(&self, at: usize) -> u64 {
        self.dev + at.min(self.len) as u64
    }
}

impl PinnedBytes {
    /// Where byte `at` lies, for copies the device makes (`at` within).
    pub fn ptr_at(&self, at: usize) -> *mut u8 {
        self.ptr.wrapping_add(at.min(self.len))
    }
}

impl std::ops::Deref for PinnedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: live, initialised (zeroed) memory of `len` bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl std::ops::DerefMut for PinnedBytes {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, borrowed mutably through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for PinnedBytes {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: allocated by cuMemHostAlloc in `zeroed`, freed once; a
            // failure leaves the memory to the context's teardown.
            let _ = unsafe { sys::cuMemFreeHost(self.ptr.cast()) };
        }
    }
}

/// Host memory someone else owns, page-locked, registered with the driver
/// and mapped into the device's address space until drop, so the GPU
/// copies straight from it and kernels read it (a staged proxy lands
/// pieces out of the transport's inbox this way, without a host copy into
/// its own pinned staging first).
pub struct HostRegistration {
    ptr: *mut u8,
    dev: u64,
    len: usize,
    ctx: Arc<CudaContext>,
}

// SAFETY: the registration names memory by address only; who reads or
// writes it is governed by the owner's protocol, not by this value.
unsafe impl Send for HostRegistration {}

impl HostRegistration {
    /// Registers `len` bytes at `addr`.
    ///
    /// # Safety
    /// `addr .. addr + len` is host memory that stays allocated until this
    /// value is dropped, and no copy the driver makes from it is still
    /// running then.
    pub unsafe fn new(ctx: &Arc<CudaContext>, addr: u64, len: usize) -> Result<Self, DriverError> {
        ctx.bind_to_thread()?;
        let ptr = addr as *mut u8;
        let flags = sys::CU_MEMHOSTREGISTER_PORTABLE | sys::CU_MEMHOSTREGISTER_DEVICEMAP;
        // SAFETY: live host memory of `len` bytes (the caller's contract).
        unsafe { sys::cuMemHostRegister_v2(ptr.cast(), len.max(1), flags).result()? };
        let mut me = Self {
            ptr,
            dev: 0,
            len,
            ctx: Arc::clone(ctx),
        };
        // SAFETY: `ptr` was registered with DEVICEMAP just above; on error
        // `me` unregisters it.
        unsafe { sys::cuMemHostGetDevicePointer_v2(&mut me.dev, ptr.cast(), 0).result()? };
        Ok(me)
    }

    /// The device's address of byte `at` (`at` within).
    pub fn device_ptr_at(&self, at: usize) -> u64 {
        self.dev + at.min(self.len) as u64
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where byte `at` lies, for copies the device makes (`at` within).
    pub fn ptr_at(&self, at: usize) -> *const u8 {
        self.ptr.wrapping_add(at.min(self.len)).cast_const()
    }
}

impl Drop for HostRegistration {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: registered in `new`, unregistered once; a failure
            // leaves it to the context's teardown.
            let _ = unsafe { sys::cuMemHostUnregister(self.ptr.cast()) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::queues_from;

    #[test]
    fn hardware_queues_read_the_variable() {
        assert_eq!(queues_from(None), 8, "unset: CUDA's default");
        assert_eq!(queues_from(Some("1")), 1, "Megatron-LM's setting");
        assert_eq!(queues_from(Some(" 32 ")), 32);
        assert_eq!(queues_from(Some("64")), 32, "the most there are");
        assert_eq!(queues_from(Some("0")), 8, "not a count: the default");
        assert_eq!(queues_from(Some("many")), 8, "unreadable: the default");
    }
}
