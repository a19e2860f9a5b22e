//! The NCCL calls of the `nccl` transport (cudarc's `nccl::result` level:
//! its safe `Comm` hides the raw communicator that send/recv of raw device
//! addresses need).

use cudarc::driver::CudaStream;
use cudarc::nccl::{result, sys};
use std::ffi::{c_char, c_int, c_uint};

pub type NcclResult<T> = Result<T, result::NcclError>;

/// The NCCL result code of `e` with NCCL's own words for it (cudarc's
/// `Debug` of an error says only "NcclError").
pub fn describe(e: &result::NcclError) -> String {
    // SAFETY: NCCL returns a static string for every result code.
    let words = unsafe { sys::ncclGetErrorString(e.0) };
    let words = if words.is_null() {
        String::new()
    } else {
        // SAFETY: non-null, NUL-terminated and static (above).
        unsafe { std::ffi::CStr::from_ptr(words) }
            .to_string_lossy()
            .into_owned()
    };
    format!("{:?} ({words})", e.0)
}

/// The version of the libnccl loaded (`major * 10000 + minor * 100 +
/// patch`), as NCCL_VERSION_CODE counts it from 2.9 on.
pub fn version() -> NcclResult<u32> {
    result::get_nccl_version().map(|v| v.max(0) as u32)
}

/// The first NCCL with `ncclCommSplit`.
pub const SPLIT_SINCE: u32 = 21800;

/// The part of `ncclConfig_t` that NCCL 2.17 defined, which is all a
/// split asks for; NCCL reads `size` bytes of it and takes its defaults
/// (`NCCL_CONFIG_INITIALIZER`) for every later field, whatever version of
/// the library is loaded.
#[repr(C)]
struct ConfigV217 {
    size: usize,
    magic: c_uint,
    version: c_uint,
    blocking: c_int,
    cga_cluster_size: c_int,
    min_ctas: c_int,
    max_ctas: c_int,
    net_name: *const c_char,
    split_share: c_int,
}

/// NCCL's `NCCL_CONFIG_UNDEF_INT`: "NCCL chooses".
const UNDEF: c_int = c_int::MIN;

impl ConfigV217 {
    /// Defaults, but blocking (every call returns with its work enqueued),
    /// at most `max_ctas` CTAs per NCCL kernel, and resources never shared
    /// with the parent (a lane must not wait behind another).
    fn new(max_ctas: Option<u32>) -> Self {
        ConfigV217 {
            size: std::mem::size_of::<ConfigV217>(),
            magic: 0xcafe_beef,
            version: 21700,
            blocking: 1,
            cga_cluster_size: UNDEF,
            min_ctas: UNDEF,
            max_ctas: max_ctas.map_or(UNDEF, |n| n.clamp(1, 64) as c_int),
            net_name: std::ptr::null(),
            split_share: 0,
        }
    }
}

/// Whether libnccl can be loaded (cudarc panics when it must load a
/// missing library, so ask first).
pub fn nccl_available() -> bool {
    // SAFETY: only probes whether the shared library can be opened.
    unsafe { sys::is_culib_present() }
}

pub fn unique_id() -> NcclResult<[u8; 128]> {
    let id = result::get_uniqueid()?;
    let mut out = [0u8; 128];
    for (o, &c) in out.iter_mut().zip(id.internal.iter()) {
        *o = c as u8;
    }
    Ok(out)
}

/// A communicator, destroyed (or aborted, after an error) on drop.
pub struct RawComm {
    comm: sys::ncclComm_t,
    aborted: bool,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls
// on it are not concurrent; the transport serialises them behind a mutex.
unsafe impl Send for RawComm {}
// SAFETY: see Send; shared references only reach it through that mutex.
unsafe impl Sync for RawComm {}

impl RawComm {
    /// Collective over the `world` ranks that hold `id`; the calling
    /// thread's current CUDA context selects the device.
    pub fn init(id: &[u8; 128], rank: usize, world: usize) -> NcclResult<Self> {
        let mut uid = sys::ncclUniqueId { internal: [0; 128] };
        for (c, &b) in uid.internal.iter_mut().zip(id.iter()) {
            *c = b as _;
        }
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: `comm` is written by NCCL on success; world and rank are
        // checked by the caller to fit an i32.
        unsafe { result::comm_init_rank(comm.as_mut_ptr(), world as i32, uid, rank as i32)? };
        // SAFETY: initialised by the successful call above.
        Ok(Self {
            comm: unsafe { comm.assume_init() },
            aborted: false,
        })
    }

    /// Enqueues a send of `len` bytes at device address `ptr`.
    ///
    /// # Safety
    /// `ptr .. ptr + len` must stay valid until the stream has run it.
    pub unsafe fn send(
        &self,
        ptr: u64,
        len: usize,
        peer: usize,
        stream: &CudaStream,
    ) -> NcclResult<()> {
        result::send(
            ptr as *const _,
            len,
            sys::ncclDataType_t::ncclUint8,
            peer as i32,
            self.comm,
            stream.cu_stream() as _,
        )
        .map(|_| ())
    }

    /// Enqueues a receive of `len` bytes into device address `ptr`.
    ///
    /// # Safety
    /// As [`Self::send`].
    pub unsafe fn recv(
        &self,
        ptr: u64,
        len: usize,
        peer: usize,
        stream: &CudaStream,
    ) -> NcclResult<()> {
        result::recv(
            ptr as *mut _,
            len,
            sys::ncclDataType_t::ncclUint8,
            peer as i32,
            self.comm,
            stream.cu_stream() as _,
        )
        .map(|_| ())
    }

    /// Collective over every rank of this communicator (each calls it, in
    /// the same order of splits): the ranks that pass the same `color` form
    /// a new communicator, ordered by `key`; `None` joins none and gets
    /// `None`. Its NCCL kernels use at most `max_ctas` CTAs, and it shares
    /// no resources with this one. Needs NCCL 2.18 ([`SPLIT_SINCE`]).
    pub fn split(
        &self,
        color: Option<u32>,
        key: usize,
        max_ctas: Option<u32>,
    ) -> NcclResult<Option<RawComm>> {
        // NCCL_SPLIT_NOCOLOR; a colour must be a non-negative int.
        let color = color.map_or(-1, |c| c.min(i32::MAX as u32) as c_int);
        let key = key.min(i32::MAX as usize) as c_int;
        let mut cfg = ConfigV217::new(max_ctas);
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `self.comm` is live and not used concurrently (callers
        // hold the transport's lock); NCCL reads `cfg.size` bytes of `cfg`
        // (a prefix of ncclConfig_t, see ConfigV217) and writes `comm`,
        // null for NCCL_SPLIT_NOCOLOR.
        unsafe {
            sys::ncclCommSplit(
                self.comm,
                color,
                key,
                &mut comm,
                (&mut cfg as *mut ConfigV217).cast(),
            )
            .result()?
        };
        Ok((!comm.is_null()).then_some(RawComm {
            comm,
            aborted: false,
        }))
    }

    /// The error NCCL recorded for this communicator while it ran its
    /// operations (a peer that failed or left, a network error), if any.
    pub fn async_error(&self) -> NcclResult<()> {
        if self.aborted {
            return Ok(());
        }
        let mut found = sys::ncclResult_t::ncclSuccess;
        // SAFETY: a query on a live communicator into a local.
        unsafe { sys::ncclCommGetAsyncError(self.comm, &mut found).result()? };
        found.result().map(|_| ())
    }

    /// Abandons in-flight operations (a peer died or a wait timed out), so
    /// the stream can drain; the communicator is unusable afterwards.
    pub fn abort(&mut self) {
        if !self.aborted {
            self.aborted = true;
            // SAFETY: the communicator is live and not used concurrently.
            let _ = unsafe { result::comm_abort(self.comm) };
        }
    }
}

impl Drop for RawComm {
    fn drop(&mut self) {
        if !self.aborted {
            // SAFETY: the communicator is live; its streams were drained by
            // the transport before dropping.
            let _ = unsafe { result::comm_destroy(self.comm) };
        }
    }
}

pub fn group_start() -> NcclResult<()> {
    result::group_start().map(|_| ())
}

pub fn group_end() -> NcclResult<()> {
    result::group_end().map(|_| ())
}
