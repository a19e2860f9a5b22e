//! Handles over the C layer, each releasing what it holds on Drop: the
//! [`Worker`] (context and worker, finalized once the last handle made from
//! it is gone), an [`Endpoint`] (force-closed), [`Mapped`] host memory
//! (unmapped and freed), a [`RemoteKey`] (destroyed), a [`Request`] (given
//! back to UCX) and an [`InFlightAtomic`] (its operands leaked if it is
//! dropped unfinished). The one call left unsafe is [`Endpoint::put`]: its
//! request reads the caller's slice until it completes.
//!
//! Threads: the worker runs in `UCS_THREAD_MODE_SERIALIZED`, so calls on the
//! handles of one worker may come from any thread but must never overlap.
//! The handles are `Send` (not `Sync`) on that ground, and the transport
//! keeps all of them behind one mutex.

use super::sys::{self, UCS_ERR_INVALID_PARAM, UCS_ERR_NO_MEMORY, UCS_INPROGRESS, UCS_OK};
use std::ffi::{c_char, c_int, c_void, CString};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicI32, AtomicU64};
use std::sync::Arc;

/// A UCS status that is not `UCS_OK` (text through `result::status_string`).
pub type Status = c_int;

/// The context and its worker; finalized when the last handle drops.
struct Context {
    ctx: *mut c_void,
    worker: *mut c_void,
}

// SAFETY: the pointers are only used by the handles of this module, which
// the transport keeps behind one mutex, so calls on the worker never overlap
// (UCS_THREAD_MODE_SERIALIZED allows them from any thread on that condition).
unsafe impl Send for Context {}
// SAFETY: as above; `Context` has no method of its own, a shared reference
// only lets a handle reach the pointers under the transport's mutex.
unsafe impl Sync for Context {}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: every endpoint, key and mapping of this context held an
        // `Arc` to it, so all of them are gone; finalized once.
        unsafe { sys::cx_fini(self.ctx, self.worker) };
    }
}

impl Context {
    fn progress(&self) -> u32 {
        // SAFETY: the worker lives as long as `self`.
        unsafe { sys::cx_progress(self.worker) }
    }
}

/// What a non-blocking operation returned.
pub enum Posted {
    /// Completed in place.
    Done,
    /// Continues as a request.
    Pending(Request),
    /// Failed with this status.
    Failed(Status),
}

impl Posted {
    fn from_call(st: c_int, req: *mut c_void) -> Posted {
        match st {
            UCS_OK => Posted::Done,
            UCS_INPROGRESS => match NonNull::new(req) {
                Some(r) => Posted::Pending(Request(r)),
                None => Posted::Failed(UCS_INPROGRESS),
            },
            err => Posted::Failed(err),
        }
    }
}

/// A request in progress; dropping it hands it back to UCX, which frees it
/// when it completes.
pub struct Request(NonNull<c_void>);

// SAFETY: see the module's note on threads.
unsafe impl Send for Request {}

impl Request {
    /// `UCS_INPROGRESS` while pending, then the request's final status.
    pub fn check(&self) -> Status {
        // SAFETY: a live request handle, not yet freed (freed only on drop).
        unsafe { sys::cx_req_check(self.0.as_ptr()) }
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        // SAFETY: released exactly once; a pending request is freed by UCX
        // when it completes.
        unsafe { sys::cx_req_free(self.0.as_ptr()) };
    }
}

/// The UCP context and worker of this process.
#[derive(Clone)]
pub struct Worker(Arc<Context>);

// The `Arc<Context>` makes `Worker` and the handles holding one `Send`.

impl Worker {
    /// Creates the UCP context and its worker, configured by the
    /// environment and then `mods` (name without `UCX_`, value; at most
    /// 64). Also returns the names of those UCX refused (a tuning that
    /// does not apply leaves the environment's value).
    pub fn new(mods: &[(&str, &str)]) -> Result<(Worker, Vec<String>), Status> {
        let owned: Vec<CString> = mods
            .iter()
            .flat_map(|(k, v)| [*k, *v])
            .map(|x| CString::new(x).map_err(|_| UCS_ERR_INVALID_PARAM))
            .collect::<Result<_, _>>()?;
        let ptrs: Vec<*const c_char> = owned.iter().map(|c| c.as_ptr()).collect();
        let n = mods.len().min(64);
        let (mut ctx, mut worker, mut refused) = (std::ptr::null_mut(), std::ptr::null_mut(), 0u64);
        // SAFETY: `ptrs` holds 2 * n NUL-terminated strings alive for the
        // call; out-pointers are valid; on failure the shim has released
        // whatever it created and leaves both null.
        let st = unsafe {
            sys::cx_init(
                ptrs.as_ptr(),
                n as c_int,
                &mut refused,
                &mut ctx,
                &mut worker,
            )
        };
        if st != UCS_OK {
            return Err(st);
        }
        let refused = (0..n)
            .filter(|i| refused >> i & 1 == 1)
            .map(|i| mods[i].0.to_string())
            .collect();
        Ok((Worker(Arc::new(Context { ctx, worker })), refused))
    }

    /// Progresses the worker once; returns the number of events handled.
    pub fn progress(&self) -> u32 {
        self.0.progress()
    }

    /// The worker's address, for peers to connect to.
    pub fn address(&self) -> Result<Vec<u8>, Status> {
        let (mut a, mut len) = (std::ptr::null_mut(), 0usize);
        // SAFETY: valid worker; UCX allocates the address and reports its length.
        let st = unsafe { sys::cx_worker_address(self.0.worker, &mut a, &mut len) };
        if st != UCS_OK {
            return Err(st);
        }
        // SAFETY: UCX returned `len` readable bytes at `a`; copied, then released once.
        let v = unsafe { std::slice::from_raw_parts(a as *const u8, len) }.to_vec();
        // SAFETY: `a` came from cx_worker_address on this worker.
        unsafe { sys::cx_worker_release_address(self.0.worker, a) };
        Ok(v)
    }

    /// An endpoint to the worker whose packed address is `addr`; with
    /// `peer_errors`, UCX reports the peer's failure on it.
    pub fn connect(&self, addr: &[u8], peer_errors: bool) -> Result<Endpoint, Status> {
        let err = Arc::new(AtomicI32::new(UCS_OK));
        let mut ep = std::ptr::null_mut();
        // SAFETY: `addr` is a worker address packed by UCX (the shim only
        // reads it); the error flag is kept alive by the endpoint, which is
        // closed before its `Arc` is released (or leaked together with it).
        let st = unsafe {
            sys::cx_ep_create(
                self.0.worker,
                addr.as_ptr() as *const c_void,
                peer_errors as c_int,
                err.as_ptr(),
                &mut ep,
            )
        };
        if st != UCS_OK {
            return Err(st);
        }
        Ok(Endpoint {
            ep,
            cx: self.0.clone(),
            err,
        })
    }

    /// `ucp_worker_fence`: operations posted before complete before those after.
    pub fn fence(&self) -> Result<(), Status> {
        // SAFETY: valid worker.
        let st = unsafe { sys::cx_worker_fence(self.0.worker) };
        if st != UCS_OK {
            return Err(st);
        }
        Ok(())
    }

    /// `ucp_worker_flush_nbx`: completes every operation of the worker.
    pub fn flush(&self) -> Posted {
        let mut req = std::ptr::null_mut();
        // SAFETY: valid worker.
        let st = unsafe { sys::cx_worker_flush(self.0.worker, &mut req) };
        Posted::from_call(st, req)
    }

    /// Has UCX allocate and map at least `size` zeroed bytes. UCX's own
    /// allocation (a shared-memory segment where it has one) lets a peer on
    /// the same host put into it by a copy: memory mapped by address took
    /// the active-message path there, 1.2 GB/s against 21 for a copy
    /// (docs/PERF.md, 2026-12-06).
    pub fn map_zeroed(&self, size: usize) -> Result<Mapped, Status> {
        let (mut memh, mut addr, mut len) = (std::ptr::null_mut(), std::ptr::null_mut(), 0usize);
        // SAFETY: valid context; UCX writes the handle, address and length.
        let st =
            unsafe { sys::cx_mem_alloc(self.0.ctx, size.max(8), &mut memh, &mut addr, &mut len) };
        if st != UCS_OK {
            return Err(st);
        }
        let Some(ptr) = NonNull::new(addr.cast::<u8>()) else {
            // SAFETY: mapped on this context just now, unmapped once.
            unsafe { sys::cx_mem_unmap(self.0.ctx, memh) };
            return Err(UCS_ERR_NO_MEMORY);
        };
        // SAFETY: UCX allocated `len` bytes at `ptr` for this mapping; no
        // peer has its key yet, so nothing else writes them.
        unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, len) };
        Ok(Mapped {
            ptr,
            len,
            memh,
            cx: self.0.clone(),
        })
    }
}

/// Host memory UCP allocated and mapped.
pub struct Mapped {
    ptr: NonNull<u8>,
    len: usize,
    memh: *mut c_void,
    cx: Arc<Context>,
}

// SAFETY: see the module's note on threads; the memory is owned.
unsafe impl Send for Mapped {}

impl Mapped {
    /// Bytes mapped.
    pub fn size(&self) -> usize {
        self.len
    }

    /// The memory's address, as peers name it in RMA operations.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// The packed remote key peers unpack to reach this memory.
    pub fn pack_key(&self) -> Result<Vec<u8>, Status> {
        let (mut kb, mut klen) = (std::ptr::null_mut(), 0usize);
        // SAFETY: memh is mapped on this context.
        let st = unsafe { sys::cx_rkey_pack(self.cx.ctx, self.memh, &mut kb, &mut klen) };
        if st != UCS_OK {
            return Err(st);
        }
        // SAFETY: UCX returned `klen` bytes at `kb`; copied, then released once.
        let v = unsafe { std::slice::from_raw_parts(kb as *const u8, klen) }.to_vec();
        // SAFETY: buffer from ucp_rkey_pack.
        unsafe { sys::cx_rkey_buffer_release(kb) };
        Ok(v)
    }

    fn fits(&self, offset: usize, len: usize) -> bool {
        offset
            .checked_add(len)
            .is_some_and(|end| end <= self.size())
    }

    /// Copies `data` in at `offset`; false (nothing written) if out of bounds.
    pub fn write(&self, offset: usize, data: &[u8]) -> bool {
        if !self.fits(offset, data.len()) {
            return false;
        }
        // SAFETY: in bounds; the memory is owned and stays allocated while
        // `self` lives; `data` cannot alias it (only raw pointers reach it).
        // Peers' puts land in other parts (the protocol keeps them apart).
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(offset), data.len())
        };
        true
    }

    /// Copies out from `offset`; false (nothing read) if out of bounds.
    pub fn read(&self, offset: usize, out: &mut [u8]) -> bool {
        if !self.fits(offset, out.len()) {
            return false;
        }
        // SAFETY: in bounds, allocated while `self` lives. Peers may be
        // writing other parts of it (their puts land without us); the
        // protocol (wait on a signal first) keeps them off the part read.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset),
                out.as_mut_ptr(),
                out.len(),
            )
        };
        true
    }

    /// The 64-bit word at byte `offset`; None if out of bounds or unaligned.
    /// Such words are only ever accessed atomically, here and by UCX's atomics.
    pub fn word(&self, offset: usize) -> Option<&AtomicU64> {
        if !self.fits(offset, 8) || !(self.addr() as usize + offset).is_multiple_of(8) {
            return None;
        }
        // SAFETY: in bounds and 8-aligned (checked above); the memory
        // lives as long as the returned reference, and signal words are only
        // accessed atomically.
        Some(unsafe { AtomicU64::from_ptr(self.ptr.as_ptr().add(offset) as *mut u64) })
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: mapped (and allocated) on this context by UCX, unmapped
        // once, which frees the memory.
        unsafe { sys::cx_mem_unmap(self.cx.ctx, self.memh) };
    }
}

/// A peer's remote key, unpacked on the endpoint to it.
pub struct RemoteKey(NonNull<c_void>);

// SAFETY: see the module's note on threads.
unsafe impl Send for RemoteKey {}

impl Drop for RemoteKey {
    fn drop(&mut self) {
        // SAFETY: an unpacked key, destroyed once.
        unsafe { sys::cx_rkey_destroy(self.0.as_ptr()) };
    }
}

/// A signal's 64-bit atomic in flight, with the operands UCX reads and
/// writes until it completes. Dropped unfinished, its operands are leaked.
pub struct InFlightAtomic {
    req: Option<Request>,
    operands: Option<Box<[u64; 2]>>,
}

impl InFlightAtomic {
    /// As [`Request::check`].
    pub fn check(&self) -> Status {
        self.req.as_ref().map_or(UCS_OK, Request::check)
    }
}

impl Drop for InFlightAtomic {
    fn drop(&mut self) {
        if self.check() == UCS_INPROGRESS {
            std::mem::forget(self.operands.take());
        }
        // The request is released before the operands are dropped.
        self.req = None;
    }
}

/// An endpoint to one peer; force-closed on drop.
pub struct Endpoint {
    /// Null once closed.
    ep: *mut c_void,
    cx: Arc<Context>,
    /// Set by UCX's error callback (during progress) to the failure status.
    err: Arc<AtomicI32>,
}

// SAFETY: see the module's note on threads.
unsafe impl Send for Endpoint {}

/// The 64-bit atomic operations a signal uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtomicOp {
    Add = 0,
    Swap = 1,
}

impl Endpoint {
    /// The flag UCX sets to the failure status when the peer fails; it
    /// outlives the endpoint.
    pub fn failure_flag(&self) -> Arc<AtomicI32> {
        self.err.clone()
    }

    /// Unpacks a key packed by the peer's UCX.
    pub fn unpack_key(&self, packed: &[u8]) -> Result<RemoteKey, Status> {
        let mut rkey = std::ptr::null_mut();
        // SAFETY: live endpoint; the shim only reads the packed key.
        let st =
            unsafe { sys::cx_rkey_unpack(self.ep, packed.as_ptr() as *const c_void, &mut rkey) };
        if st != UCS_OK {
            return Err(st);
        }
        NonNull::new(rkey).map(RemoteKey).ok_or(UCS_OK)
    }

    /// `ucp_ep_flush_nbx`: every earlier operation has completed at the peer.
    pub fn flush(&self) -> Posted {
        let mut req = std::ptr::null_mut();
        // SAFETY: live endpoint.
        let st = unsafe { sys::cx_ep_flush(self.ep, &mut req) };
        Posted::from_call(st, req)
    }

    /// `ucp_put_nbx` of `data` to `raddr` in the peer's memory behind `key`.
    ///
    /// # Safety
    /// If this returns [`Posted::Pending`], UCX may read `data` until the
    /// request completes: the caller keeps `data` alive and unchanged until
    /// then, or until this endpoint is force-closed, which ends the request.
    pub unsafe fn put(&self, data: &[u8], raddr: u64, key: &RemoteKey) -> Posted {
        let mut req = std::ptr::null_mut();
        // SAFETY: live endpoint and key; `data` outlives the request by the
        // caller's contract above.
        let st = unsafe {
            sys::cx_put(
                self.ep,
                data.as_ptr() as *const c_void,
                data.len(),
                raddr,
                key.0.as_ptr(),
                &mut req,
            )
        };
        Posted::from_call(st, req)
    }

    /// Posts `op` with `value` on the peer's 64-bit word at `raddr`. None:
    /// completed in place; otherwise the atomic in flight.
    pub fn atomic64(
        &self,
        op: AtomicOp,
        value: u64,
        raddr: u64,
        key: &RemoteKey,
    ) -> Result<Option<InFlightAtomic>, Status> {
        let mut operands = Box::new([value, 0u64]);
        let (v, r) = {
            let [v, r] = &mut *operands;
            (v as *mut u64, r as *mut u64)
        };
        let mut req = std::ptr::null_mut();
        // SAFETY: live endpoint and key; the operands are boxed and kept by
        // the returned `InFlightAtomic` until the request completes (leaked
        // if it is dropped before).
        let st = unsafe {
            sys::cx_atomic64(self.ep, op as c_int, v, r, raddr, key.0.as_ptr(), &mut req)
        };
        match Posted::from_call(st, req) {
            Posted::Done => Ok(None),
            Posted::Pending(req) => Ok(Some(InFlightAtomic {
                req: Some(req),
                operands: Some(operands),
            })),
            Posted::Failed(st) => Err(st),
        }
    }

    /// Force-closes the endpoint, progressing the worker at most `spins`
    /// times for the close to finish; its outstanding requests complete
    /// with an error.
    pub fn close(mut self, spins: u32) {
        self.force_close(spins);
    }

    fn force_close(&mut self, spins: u32) {
        if self.ep.is_null() {
            return;
        }
        let mut req = std::ptr::null_mut();
        // SAFETY: live endpoint, closed once (nulled below); forced so a
        // departed peer cannot stall us.
        let st = unsafe { sys::cx_ep_close(self.ep, 1, &mut req) };
        self.ep = std::ptr::null_mut();
        if let Posted::Pending(req) = Posted::from_call(st, req) {
            for _ in 0..spins {
                if req.check() != UCS_INPROGRESS {
                    break;
                }
                self.cx.progress();
            }
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.force_close(100_000);
    }
}
