//! The NCCL calls of the `nccl` transport (cudarc's `nccl::result` level:
//! its safe `Comm` hides the raw communicator that send/recv of raw device
//! addresses need).

use cudarc::driver::CudaStream;
use cudarc::nccl::{result, sys};

pub type NcclResult<T> = Result<T, result::NcclError>;

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
