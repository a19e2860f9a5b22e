//! The NCCL calls of the `nccl` transport (cudarc's `nccl::result` level:
//! its safe `Comm` hides the raw communicator that send/recv of raw device
//! addresses need).

use crate::signal_core::{poll_bounded, Polled};
use cudarc::driver::CudaStream;
use cudarc::nccl::result::NcclStatus;
use cudarc::nccl::{result, sys};
use std::ffi::{c_char, c_int, c_uint};
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::time::Duration;

pub type NcclResult<T> = Result<T, result::NcclError>;

/// How a call on a communicator failed: NCCL's code, or NCCL's host side of
/// it still in progress when its bound ran out (communicators are
/// non-blocking, so a peer that never comes cannot hold a call for good).
#[derive(Debug)]
pub enum CommError {
    Nccl(result::NcclError),
    Stalled(Duration),
    /// An earlier call failed and aborted the communicator.
    Aborted,
}

impl From<result::NcclError> for CommError {
    fn from(e: result::NcclError) -> Self {
        CommError::Nccl(e)
    }
}

impl std::fmt::Display for CommError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CommError::Nccl(e) => f.write_str(&describe(e)),
            CommError::Stalled(waited) => write!(
                f,
                "still in progress after {waited:?} (a peer missing, gone, or in another \
                 call?); communicator aborted"
            ),
            CommError::Aborted => {
                f.write_str("the communicator was aborted after an earlier failure")
            }
        }
    }
}

pub type CommResult<T> = Result<T, CommError>;

/// The NCCL result code of `e` with NCCL's own words for it (cudarc's
/// `Debug` of an error says only "NcclError").
fn describe(e: &result::NcclError) -> String {
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
/// communicator here asks for; NCCL reads `size` bytes of it and takes its defaults
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
    /// The struct's tail padding, named so it is not left uninitialised:
    /// NCCL 2.26 reads a traffic class here whatever `version` says.
    traffic_class: c_int,
}

/// NCCL's `NCCL_CONFIG_UNDEF_INT`: "NCCL chooses".
const UNDEF: c_int = c_int::MIN;

impl ConfigV217 {
    /// Defaults, but non-blocking (a call may return while NCCL's host side
    /// of it still runs: [`RawComm`] waits for that, bounded), at most
    /// `max_ctas` CTAs per NCCL kernel, and resources never shared with
    /// the parent (a lane must not wait behind another).
    fn new(max_ctas: Option<u32>) -> Self {
        ConfigV217 {
            size: std::mem::size_of::<ConfigV217>(),
            magic: 0xcafe_beef,
            version: 21700,
            blocking: 0,
            cga_cluster_size: UNDEF,
            min_ctas: UNDEF,
            max_ctas: max_ctas.map_or(UNDEF, |n| n.clamp(1, 64) as c_int),
            net_name: std::ptr::null(),
            split_share: 0,
            traffic_class: UNDEF,
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

/// The direction of a point-to-point op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    Send,
    Recv,
}

/// A communicator, destroyed (or aborted, after an error) on drop.
///
/// Non-blocking: NCCL returns from set-up, splits, sends and receives while
/// its host side of them still runs (joining the peers, connecting a pair).
/// Each call here waits for that within the communicator's bound before it
/// returns, so the caller's next stream operation is ordered after the
/// NCCL kernel it enqueued, and a peer that never comes becomes an error
/// and an aborted communicator instead of a thread blocked inside NCCL.
/// Any failure aborts it; every later call is then an error.
pub struct RawComm {
    comm: sys::ncclComm_t,
    aborted: AtomicBool,
    bound: Duration,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls
// on it are not concurrent; `&mut`/`&` access from one thread at a time is
// what the owner (the transport's mutex, or a lane's one proxy thread)
// gives. Not `Sync`: two threads must not call into it at once.
unsafe impl Send for RawComm {}

impl RawComm {
    fn wrap(comm: sys::ncclComm_t, bound: Duration) -> RawComm {
        RawComm {
            comm,
            aborted: AtomicBool::new(false),
            bound,
        }
    }

    /// Collective over the `world` ranks that hold `id`; the calling
    /// thread's current CUDA context selects the device. A rank that does
    /// not join within `bound` makes it an error.
    pub fn init(id: &[u8; 128], rank: usize, world: usize, bound: Duration) -> CommResult<Self> {
        let mut uid = sys::ncclUniqueId { internal: [0; 128] };
        for (c, &b) in uid.internal.iter_mut().zip(id.iter()) {
            *c = b as _;
        }
        let mut cfg = ConfigV217::new(None);
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: NCCL writes `comm` (a handle usable for polling and abort
        // at once, while its set-up runs behind it) and reads `cfg.size`
        // bytes of `cfg`; world and rank are checked by the caller to fit
        // an i32.
        let status = unsafe {
            sys::ncclCommInitRankConfig(
                &mut comm,
                world as c_int,
                uid,
                rank as c_int,
                (&mut cfg as *mut ConfigV217).cast(),
            )
            .result()
        };
        if comm.is_null() {
            return Err(status
                .err()
                .unwrap_or(result::NcclError(sys::ncclResult_t::ncclInternalError))
                .into());
        }
        let c = RawComm::wrap(comm, bound);
        c.settled(status)?;
        Ok(c)
    }

    fn live(&self) -> CommResult<()> {
        if self.aborted.load(Ordering::Relaxed) {
            Err(CommError::Aborted)
        } else {
            Ok(())
        }
    }

    /// Waits until NCCL's host side of the last call is done, within the
    /// bound. A failure, or the bound, aborts the communicator (NCCL's
    /// abort stops a set-up or connection in progress; a destroy would
    /// not).
    fn settle(&self) -> CommResult<()> {
        self.live()?;
        let look = |_| {
            let mut state = sys::ncclResult_t::ncclSuccess;
            // SAFETY: a query on a live communicator into a local.
            let asked = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) }.result();
            Ok(match asked.and_then(|_| state.result()) {
                Ok(NcclStatus::InProgress) => None,
                Ok(_) => Some(Ok(())),
                Err(e) => Some(Err(CommError::Nccl(e))),
            })
        };
        let outcome = match poll_bounded(self.bound, look, std::thread::sleep) {
            Ok(Polled::Ready(r)) => r,
            Ok(Polled::TimedOut(waited)) => Err(CommError::Stalled(waited)),
            // `look` never fails: NCCL's error is its value.
            Err(_) => Err(CommError::Aborted),
        };
        if outcome.is_err() {
            self.abort();
        }
        outcome
    }

    /// What a non-blocking call returned: settled here, bounded, whatever
    /// it returned (a split returns success while it still runs).
    fn settled(&self, status: NcclResult<NcclStatus>) -> CommResult<()> {
        match status {
            Ok(_) => self.settle(),
            Err(e) => {
                self.abort();
                Err(e.into())
            }
        }
    }

    /// One point-to-point op, NCCL's return code as it is (nothing
    /// settled).
    ///
    /// # Safety
    /// As [`Self::post`].
    unsafe fn raw(
        &self,
        way: Way,
        ptr: u64,
        len: usize,
        peer: usize,
        stream: &CudaStream,
    ) -> NcclResult<NcclStatus> {
        let (ty, s) = (sys::ncclDataType_t::ncclUint8, stream.cu_stream() as _);
        match way {
            Way::Send => result::send(ptr as *const _, len, ty, peer as i32, self.comm, s),
            Way::Recv => result::recv(ptr as *mut _, len, ty, peer as i32, self.comm, s),
        }
    }

    /// Enqueues a send from (or a receive into) `len` bytes at device
    /// address `ptr`, outside any group: settled before it returns.
    ///
    /// # Safety
    /// `ptr .. ptr + len` must stay valid until the stream has run it.
    pub unsafe fn post(
        &self,
        way: Way,
        ptr: u64,
        len: usize,
        peer: usize,
        stream: &CudaStream,
    ) -> CommResult<()> {
        self.live()?;
        // SAFETY: the caller's promise, passed on.
        self.settled(unsafe { self.raw(way, ptr, len, peer, stream) })
    }

    /// A send or receive inside an open group: queued only, so neither
    /// settled nor, on failure, aborted here (an abort inside the group
    /// would be run by its end); the caller closes the group
    /// ([`group_abandon`] on failure) and then aborts.
    ///
    /// # Safety
    /// As [`Self::post`].
    pub unsafe fn queue(
        &self,
        way: Way,
        ptr: u64,
        len: usize,
        peer: usize,
        stream: &CudaStream,
    ) -> CommResult<()> {
        self.live()?;
        // SAFETY: the caller's promise, passed on.
        unsafe { self.raw(way, ptr, len, peer, stream) }?;
        Ok(())
    }

    /// Ends a group of sends and receives on this communicator alone; its
    /// operations are enqueued when this returns.
    pub fn group_end(&self) -> CommResult<()> {
        self.settled(result::group_end())
    }

    /// Collective over every rank of this communicator (each calls it, in
    /// the same order of splits): the ranks that pass the same `color` form
    /// a new communicator, ordered by `key`; `None` joins none and gets
    /// `None`. Its NCCL kernels use at most `max_ctas` CTAs, it shares no
    /// resources with this one, and its calls are bounded by `bound`.
    /// Needs NCCL 2.18 ([`SPLIT_SINCE`]).
    pub fn split(
        &self,
        color: Option<u32>,
        key: usize,
        max_ctas: Option<u32>,
        bound: Duration,
    ) -> CommResult<Option<RawComm>> {
        self.live()?;
        // NCCL_SPLIT_NOCOLOR; a colour must be a non-negative int.
        let color = color.map_or(-1, |c| c.min(i32::MAX as u32) as c_int);
        let key = key.min(i32::MAX as usize) as c_int;
        let mut cfg = ConfigV217::new(max_ctas);
        // NCCL's set-up thread stores the new handle here when it is done
        // (it stays null for NCCL_SPLIT_NOCOLOR); leaked if the split never
        // settles, as that thread might still write it.
        let slot = Box::new(AtomicPtr::<sys::ncclComm>::new(std::ptr::null_mut()));
        // SAFETY: `self.comm` is live and not used concurrently (callers
        // hold the transport's lock); NCCL reads `cfg.size` bytes of `cfg`
        // (a prefix of ncclConfig_t, see ConfigV217) and writes the slot,
        // which lives until the split settled (or is leaked).
        let status = unsafe {
            sys::ncclCommSplit(
                self.comm,
                color,
                key,
                slot.as_ptr(),
                (&mut cfg as *mut ConfigV217).cast(),
            )
            .result()
        };
        // A split's progress is the parent's to report.
        let done = self.settled(status);
        if let Err(CommError::Stalled(waited)) = done {
            Box::leak(slot);
            return Err(CommError::Stalled(waited));
        }
        let comm = slot.load(Ordering::Acquire);
        let child = (!comm.is_null()).then(|| RawComm::wrap(comm, bound));
        if let Err(e) = done {
            // A failed split may still hand out its half-made child.
            if let Some(c) = &child {
                c.abort();
            }
            return Err(e);
        }
        Ok(child)
    }

    /// The error NCCL recorded for this communicator while it ran its
    /// operations (a peer that failed or left, a network error), if any.
    pub fn async_error(&self) -> CommResult<()> {
        self.live()?;
        let mut found = sys::ncclResult_t::ncclSuccess;
        // SAFETY: a query on a live communicator into a local.
        unsafe { sys::ncclCommGetAsyncError(self.comm, &mut found).result()? };
        found.result().map(|_| ()).map_err(CommError::Nccl)
    }

    /// Abandons in-flight operations (a peer died or a wait timed out), so
    /// the stream can drain; the communicator is unusable afterwards.
    pub fn abort(&self) {
        if !self.aborted.swap(true, Ordering::Relaxed) {
            // SAFETY: the communicator is live and not used concurrently.
            let _ = unsafe { result::comm_abort(self.comm) };
        }
    }
}

impl Drop for RawComm {
    fn drop(&mut self) {
        if !self.aborted.load(Ordering::Relaxed) {
            // SAFETY: the communicator is live and settled (every call
            // above waits for its host side, and aborts it on any failure);
            // its streams were drained by the transport before dropping.
            let _ = unsafe { result::comm_destroy(self.comm) };
        }
    }
}

pub fn group_start() -> NcclResult<()> {
    result::group_start().map(|_| ())
}

/// Closes a group that failed half-way, whatever NCCL makes of it.
pub fn group_abandon() {
    let _ = result::group_end();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn the_config_prefix_lies_where_nccl_reads_it() {
        // ncclConfig_t of nccl.h (2.17 to 2.28, x86-64): NCCL reads `size`
        // bytes, so every byte of them must be a field it knows or ours.
        assert_eq!(size_of::<ConfigV217>(), 48);
        assert_eq!(offset_of!(ConfigV217, blocking), 16);
        assert_eq!(offset_of!(ConfigV217, max_ctas), 28);
        assert_eq!(offset_of!(ConfigV217, net_name), 32);
        assert_eq!(offset_of!(ConfigV217, split_share), 40);
        assert_eq!(offset_of!(ConfigV217, traffic_class), 44);
    }

    #[test]
    fn communicators_are_non_blocking_and_lanes_capped() {
        let c = ConfigV217::new(None);
        assert_eq!((c.blocking, c.max_ctas, c.traffic_class), (0, UNDEF, UNDEF));
        assert_eq!(c.size, 48);
        assert_eq!(ConfigV217::new(Some(2)).max_ctas, 2);
        assert_eq!(ConfigV217::new(Some(500)).max_ctas, 64);
        assert_eq!(ConfigV217::new(Some(0)).max_ctas, 1);
    }

    #[test]
    fn a_stalled_call_says_what_to_suspect() {
        let s = CommError::Stalled(Duration::from_secs(3)).to_string();
        assert!(
            s.contains("3s") && s.contains("peer") && s.contains("aborted"),
            "{s}"
        );
        assert!(CommError::Aborted.to_string().contains("earlier failure"));
    }
}
