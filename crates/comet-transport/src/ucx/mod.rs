//! The `ucx` transport: host-driven RMA through UCX (UCP), over RDMA, TCP
//! or shared memory, whatever UCX finds (`UCX_TLS` chooses).
//!
//! Every rank maps its symmetric buffers and its signal array with UCP,
//! packs their remote keys, and swaps addresses and keys with the others
//! through the [`Bootstrap`]. A put is `ucp_put_nbx` into the peer's copy
//! of the buffer (returning once the caller's slice may be reused); a
//! signal is a 64-bit atomic (swap for `Set`, add for `Add`) on the peer's
//! signal word, ordered after every earlier put by `ucp_worker_fence`
//! ([`SignalOrdering::Fence`], the default, no round trip) or by an
//! endpoint flush that waits until those puts completed at the target
//! ([`SignalOrdering::Flush`]); so the word is never raised before the data
//! it guards is in place. The atomic itself completes in the background. Waits poll the local word
//! while progressing the worker, which also serves peers whose operations
//! UCX emulates in software (TCP, shared memory). Every blocking step has a
//! deadline, and a peer that vanishes (its UCX endpoint fails, or its
//! bootstrap connection closes) turns into [`TransportError::PeerGone`].
//!
//! ## Binding choice
//! UCX is reached through a few dozen lines of C (`src/ucx/shim.c`) compiled
//! by the `cc` crate against the system's UCX headers (Debian's
//! `libucx-dev`, 1.13 on bookworm; `UCX_HOME` for another install), with
//! plain `extern "C"` declarations of that layer here. Why not the crates:
//! `ucx1-sys` builds UCX from vendored sources and runs bindgen, which needs
//! libclang and autotools and costs minutes of a 2-core CI budget on every
//! clean build, and its library must then be found at run time;
//! `async-ucx` adds an async runtime the synchronous [`Transport`] trait has
//! no use for; `ucx-sys` 0.1.3 predates the `*_nbx` API. UCP's parameter
//! structs change between releases, so filling them in C against the
//! installed headers is also safer than copying their layouts into Rust.
//! The cost is a C compiler and `libucx-dev` at build time
//! (scripts/install-ucx-deps.sh).
//!
//! UCX is configured by its environment as usual (`UCX_TLS`, `UCX_NET_DEVICES`,
//! ...). Over TCP, `UCX_TCP_TX_SEG_SIZE=256k UCX_TCP_RX_SEG_SIZE=256k` makes
//! puts of 64 KiB and more 2-3x faster than UCX's 8 KiB default
//! (docs/PERF.md); `comet bench transport` sets them where unset.
//!
//! Call [`Transport::barrier`] before dropping a transport, so no peer is
//! still writing into this rank's memory when it is unmapped.
//!
//! ## Peer failures, and a limit of UCX 1.13
//! A peer's death is seen through the bootstrap (its connection closes) and,
//! on TCP, through UCX's own endpoint errors; waits, puts and signals then
//! return [`TransportError::PeerGone`], and a transport whose world broke is
//! leaked at drop rather than torn down (UCX asserts when purging queued
//! operations to a dead shared-memory peer). Over TCP and shared memory UCX
//! emulates RMA with active messages that the target acknowledges; if a
//! rank dies while its own puts to a peer are unacknowledged, UCX 1.13 may
//! abort that peer inside `ucp_put_handler` ("Endpoint timeout") when it
//! next progresses. That is a crash, never a hang, and the launcher then
//! stops the job; RDMA transports have no such acknowledgement.

use crate::bootstrap::{Bootstrap, BootstrapError};
use crate::error::TransportError;
use crate::signal_core::{locate, wait_signal, Owner, Round, SignalSlots, SIGNAL_BYTES};
use crate::transport::{
    check_rank, BufferId, Capabilities, Initiation, SignalId, SignalOp, Transport,
};
use std::alloc::Layout;
use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

mod result;
mod sys;

use result::status_string;
use sys::{UCS_ERR_UNREACHABLE, UCS_INPROGRESS, UCS_OK};

/// The UCX library version this process runs with (major, minor, release).
pub fn ucx_version() -> (u32, u32, u32) {
    result::version()
}

#[derive(Debug, Clone, PartialEq)]
pub struct UcxConfig {
    /// Deadline of every put, signal flush, and collective step.
    pub op_timeout: Duration,
    /// Ask UCX to report failed peers on endpoints
    /// (`UCP_ERR_HANDLING_MODE_PEER`). `None`: ask, and fall back to no
    /// reporting where no transport can (UCX 1.13's shared memory), which
    /// leaves peer failures to the bootstrap's liveness tracking.
    pub peer_errors: Option<bool>,
    /// How a signal is ordered after the puts before it.
    pub ordering: SignalOrdering,
}

/// How [`Transport::signal`] keeps the signal word behind the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalOrdering {
    /// `ucp_worker_fence` before the atomic: UCP's documented guarantee
    /// that earlier operations complete before later ones (what OpenSHMEM's
    /// `shmem_fence` maps to). No round trip.
    Fence,
    /// `ucp_ep_flush_nbx` before the atomic: waits until every earlier put
    /// has completed at the target. One round trip per signal.
    Flush,
}

impl Default for UcxConfig {
    fn default() -> Self {
        UcxConfig {
            op_timeout: Duration::from_secs(60),
            peer_errors: None,
            ordering: SignalOrdering::Fence,
        }
    }
}

impl UcxConfig {
    /// Defaults, with `COMET_UCX_TIMEOUT_S` (seconds) overriding the
    /// deadline and `COMET_UCX_PEER_ERRORS` (0, 1, auto) `peer_errors`.
    pub fn from_env() -> Result<Self, TransportError> {
        let mut c = UcxConfig::default();
        if let Ok(s) = std::env::var("COMET_UCX_TIMEOUT_S") {
            let v = s
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v > 0.0)
                .ok_or_else(|| {
                    TransportError::Bootstrap(format!(
                        "COMET_UCX_TIMEOUT_S is {s:?}, not a positive number of seconds"
                    ))
                })?;
            c.op_timeout = Duration::from_secs_f64(v);
        }
        if let Ok(s) = std::env::var("COMET_UCX_ORDERING") {
            c.ordering = match s.trim() {
                "fence" => SignalOrdering::Fence,
                "flush" => SignalOrdering::Flush,
                _ => {
                    return Err(TransportError::Bootstrap(format!(
                        "COMET_UCX_ORDERING is {s:?}, not fence or flush"
                    )))
                }
            };
        }
        if let Ok(s) = std::env::var("COMET_UCX_PEER_ERRORS") {
            c.peer_errors = match s.trim() {
                "1" | "on" | "true" => Some(true),
                "0" | "off" | "false" => Some(false),
                "" | "auto" => None,
                _ => {
                    return Err(TransportError::Bootstrap(format!(
                        "COMET_UCX_PEER_ERRORS is {s:?}, not 0, 1 or auto"
                    )))
                }
            };
        }
        Ok(c)
    }
}

/// Host memory mapped with UCP, and every peer's key for its copy.
struct Region {
    ptr: *mut u8,
    layout: Layout,
    /// Bytes the user asked for (the mapping may be larger).
    len: usize,
    memh: *mut c_void,
    /// Per rank: (remote address, unpacked key); null key for this rank.
    remote: Vec<(u64, *mut c_void)>,
}

struct Peer {
    ep: *mut c_void,
    /// Set by UCX's error callback (during progress) to the failure status.
    err: Box<AtomicI32>,
    /// Set by us after an operation towards the peer failed.
    broken: Option<String>,
    /// Whether the endpoint was created with peer failure reporting, which
    /// is also what lets a forced close purge its queued operations safely.
    peer_errors: bool,
}

/// A signal's atomic still in flight, with the operands UCX reads and
/// writes until it completes.
struct InFlight {
    req: *mut c_void,
    peer: usize,
    _operands: Box<[u64; 2]>,
}

struct Inner {
    ctx: *mut c_void,
    worker: *mut c_void,
    peers: Vec<Option<Peer>>,
    buffers: Vec<Region>,
    signals: Option<Region>,
    in_flight: Vec<InFlight>,
}

// SAFETY: the UCP context, worker, endpoints, keys and mapped memory are only
// touched while holding the `Mutex<Inner>` (the worker is created in
// UCS_THREAD_MODE_SERIALIZED mode, which allows calls from any thread as
// long as they never overlap), so moving `Inner` between threads is sound.
unsafe impl Send for Inner {}

enum Collective {
    Buffer = 1,
    Signals = 2,
}

/// One rank of a UCX world.
pub struct UcxTransport {
    rank: usize,
    world: usize,
    cfg: UcxConfig,
    inner: Mutex<Inner>,
    boot: Bootstrap,
}

impl std::fmt::Debug for UcxTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UcxTransport")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .finish()
    }
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Region {
    /// The words of a region holding a signal array.
    fn signal_slots(&self) -> SignalSlots {
        SignalSlots::new(self.len / SIGNAL_BYTES)
    }
}

impl Inner {
    fn progress(&mut self) -> u32 {
        // SAFETY: the worker is valid until drop and we hold the lock.
        unsafe { sys::cx_progress(self.worker) }
    }
}

impl UcxTransport {
    /// Joins the world of the torchrun environment and connects to every peer.
    pub fn from_env() -> Result<Self, TransportError> {
        let boot = Bootstrap::from_env()?;
        Self::new(boot, UcxConfig::from_env()?)
    }

    /// Creates the UCP context and worker, swaps worker addresses through
    /// `boot` and creates an endpoint to every other rank.
    pub fn new(boot: Bootstrap, cfg: UcxConfig) -> Result<Self, TransportError> {
        let rank = boot.rank();
        let world = boot.world();
        let be = |message: String| TransportError::Backend {
            backend: "ucx",
            rank,
            message,
        };
        let (mut ctx, mut worker) = (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: out-pointers are valid; on failure the shim has released
        // whatever it created and leaves both null.
        let st = unsafe { sys::cx_init(&mut ctx, &mut worker) };
        if st != UCS_OK {
            return Err(be(format!(
                "cannot create a UCP context and worker: {}",
                status_string(st)
            )));
        }
        let t = UcxTransport {
            rank,
            world,
            cfg,
            inner: Mutex::new(Inner {
                ctx,
                worker,
                peers: (0..world).map(|_| None).collect(),
                buffers: Vec::new(),
                signals: None,
                in_flight: Vec::new(),
            }),
            boot,
        };
        let my_addr = {
            let g = lock(&t.inner);
            let (mut a, mut len) = (std::ptr::null_mut(), 0usize);
            // SAFETY: valid worker; UCX allocates the address and reports its length.
            let st = unsafe { sys::cx_worker_address(g.worker, &mut a, &mut len) };
            if st != UCS_OK {
                return Err(be(format!("ucp_worker_get_address: {}", status_string(st))));
            }
            // SAFETY: UCX returned `len` readable bytes at `a`; copied, then released once.
            let v = unsafe { std::slice::from_raw_parts(a as *const u8, len) }.to_vec();
            // SAFETY: `a` came from cx_worker_address on this worker.
            unsafe { sys::cx_worker_release_address(g.worker, a) };
            v
        };
        let addrs = t.gather(&my_addr)?;
        {
            let mut g = lock(&t.inner);
            for (r, a) in addrs.iter().enumerate() {
                if r == rank {
                    continue;
                }
                let err = Box::new(AtomicI32::new(UCS_OK));
                let mut ep = std::ptr::null_mut();
                let mut st = UCS_ERR_UNREACHABLE;
                let mut with_errors = false;
                for peer_errors in [true, false] {
                    if t.cfg.peer_errors.is_some_and(|want| want != peer_errors) {
                        continue;
                    }
                    // SAFETY: `a` is a worker address packed by UCX on rank r; the
                    // error flag outlives the endpoint (both live in `Peer`, and
                    // the endpoint is closed before the Box is dropped).
                    st = unsafe {
                        sys::cx_ep_create(
                            g.worker,
                            a.as_ptr() as *const c_void,
                            peer_errors as c_int,
                            err.as_ptr(),
                            &mut ep,
                        )
                    };
                    if st != UCS_ERR_UNREACHABLE {
                        with_errors = peer_errors;
                        if !peer_errors {
                            tracing::debug!(
                                rank,
                                peer = r,
                                "ucx: no transport reports peer failures; relying on the bootstrap"
                            );
                        }
                        break;
                    }
                }
                if st != UCS_OK {
                    return Err(be(format!(
                        "cannot create an endpoint to rank {r}: {}",
                        status_string(st)
                    )));
                }
                g.peers[r] = Some(Peer {
                    ep,
                    err,
                    broken: None,
                    peer_errors: with_errors,
                });
            }
        }
        let (a, b, c) = ucx_version();
        tracing::debug!(
            rank,
            world,
            "ucx {a}.{b}.{c}: endpoints to every peer created"
        );
        Ok(t)
    }

    pub fn bootstrap(&self) -> &Bootstrap {
        &self.boot
    }

    fn be(&self, message: String) -> TransportError {
        TransportError::Backend {
            backend: "ucx",
            rank: self.rank,
            message,
        }
    }

    /// All-gather through the bootstrap, progressing the worker meanwhile.
    fn gather(&self, blob: &[u8]) -> Result<Vec<Vec<u8>>, TransportError> {
        let mut idle = || {
            lock(&self.inner).progress();
        };
        Ok(self
            .boot
            .all_gather_with(blob, self.cfg.op_timeout, &mut idle)?)
    }

    /// Fails if `peer` is known to be unreachable.
    fn peer_ok(&self, g: &Inner, peer: usize) -> Result<(), TransportError> {
        if let Some(p) = g.peers[peer].as_ref() {
            if let Some(why) = &p.broken {
                return Err(TransportError::PeerGone {
                    rank: self.rank,
                    peer,
                    reason: why.clone(),
                });
            }
            let st = p.err.load(Ordering::Acquire);
            if st != UCS_OK {
                return Err(TransportError::PeerGone {
                    rank: self.rank,
                    peer,
                    reason: format!("UCX endpoint failed: {}", status_string(st)),
                });
            }
        }
        if let Err(BootstrapError::PeerGone {
            peer: p, reason, ..
        }) = self.boot.check_peers()
        {
            return Err(TransportError::PeerGone {
                rank: self.rank,
                peer: p,
                reason,
            });
        }
        Ok(())
    }

    /// Drives `req` (from an operation towards `peer`, or the whole worker
    /// when `peer` is None) to completion within the operation deadline.
    /// On failure, the endpoint to `peer` is force-closed, which completes
    /// every request still using caller memory, and the peer marked broken.
    fn complete(
        &self,
        g: &mut MutexGuard<'_, Inner>,
        st: c_int,
        req: *mut c_void,
        peer: Option<usize>,
        what: &str,
    ) -> Result<(), TransportError> {
        if st == UCS_OK {
            return Ok(());
        }
        if st != UCS_INPROGRESS {
            let e = self.be(format!("{what}: {}", status_string(st)));
            if let Some(p) = peer {
                self.break_peer(g, p, &e.to_string());
            }
            return Err(e);
        }
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            g.progress();
            // SAFETY: `req` is a live request handle returned by UCX and not yet freed.
            let s = unsafe { sys::cx_req_check(req) };
            if s != UCS_INPROGRESS {
                // SAFETY: completed request, released exactly once.
                unsafe { sys::cx_req_free(req) };
                if s == UCS_OK {
                    return Ok(());
                }
                let e = match peer {
                    Some(p)
                        if g.peers[p]
                            .as_ref()
                            .is_some_and(|x| x.err.load(Ordering::Acquire) != UCS_OK) =>
                    {
                        TransportError::PeerGone {
                            rank: self.rank,
                            peer: p,
                            reason: format!("{what} failed: {}", status_string(s)),
                        }
                    }
                    _ => self.be(format!("{what}: {}", status_string(s))),
                };
                if let Some(p) = peer {
                    self.break_peer(g, p, &e.to_string());
                }
                return Err(e);
            }
            spins += 1;
            if spins & 63 == 0 {
                let fail = match peer {
                    Some(p) => self.peer_ok(g, p).err(),
                    None => self.boot.check_peers().err().map(Into::into),
                };
                let fail = fail.or_else(|| {
                    let waited = start.elapsed();
                    (waited >= self.cfg.op_timeout)
                        .then(|| self.be(format!("{what} did not complete within {waited:?}")))
                });
                if let Some(e) = fail {
                    // SAFETY: gives the pending request back to UCX, which frees it when it completes.
                    unsafe { sys::cx_req_free(req) };
                    match peer {
                        Some(p) => self.break_peer(g, p, &e.to_string()),
                        None => {
                            for p in 0..self.world {
                                self.break_peer(g, p, &e.to_string());
                            }
                        }
                    }
                    return Err(e);
                }
                // Other ranks' processes need the cores (CI has two).
                std::thread::yield_now();
            }
        }
    }

    /// Force-closes the endpoint to `peer` so no request keeps using caller memory.
    fn break_peer(&self, g: &mut Inner, peer: usize, why: &str) {
        let Some(p) = g.peers.get_mut(peer).and_then(Option::as_mut) else {
            return;
        };
        if p.broken.is_some() {
            return;
        }
        p.broken = Some(why.to_string());
        if !p.peer_errors {
            // UCX 1.13 asserts when it purges operations queued on a
            // shared-memory endpoint to a dead peer: leave the endpoint
            // (and, at drop, the whole worker) alone instead.
            tracing::warn!(
                rank = self.rank,
                peer,
                reason = why,
                "ucx: peer marked unreachable"
            );
            return;
        }
        let mut req = std::ptr::null_mut();
        // SAFETY: live endpoint; a forced close completes its outstanding requests with an error.
        let st = unsafe { sys::cx_ep_close(p.ep, 1, &mut req) };
        if st == UCS_INPROGRESS {
            for _ in 0..10_000 {
                // SAFETY: live request handle.
                if unsafe { sys::cx_req_check(req) } != UCS_INPROGRESS {
                    break;
                }
                g.progress();
            }
            // SAFETY: releases the close request (freed by UCX on completion if still pending).
            unsafe { sys::cx_req_free(req) };
        }
        // The endpoint is gone: its keys must not be used (or destroyed) through it again.
        if let Some(p) = g.peers.get_mut(peer).and_then(Option::as_mut) {
            p.ep = std::ptr::null_mut();
        }
        for r in g.buffers.iter_mut().chain(g.signals.iter_mut()) {
            if let Some(k) = r.remote.get_mut(peer) {
                if !k.1.is_null() {
                    // SAFETY: key unpacked on the endpoint just closed, destroyed once.
                    unsafe { sys::cx_rkey_destroy(k.1) };
                    k.1 = std::ptr::null_mut();
                }
            }
        }
        tracing::warn!(
            rank = self.rank,
            peer,
            reason = why,
            "ucx: peer marked unreachable"
        );
    }

    /// Allocates and maps `len` zeroed bytes, and swaps keys with everyone.
    fn map_region(&self, len: usize, kind: Collective) -> Result<Region, TransportError> {
        let size = len.max(8).next_multiple_of(64);
        let layout = Layout::from_size_align(size, 4096)
            .map_err(|e| self.be(format!("cannot lay out {len} bytes: {e}")))?;
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(self.be(format!("out of host memory allocating {len} bytes")));
        }
        let mut region = Region {
            ptr,
            layout,
            len,
            memh: std::ptr::null_mut(),
            remote: Vec::new(),
        };
        let blob = {
            let g = lock(&self.inner);
            let mut memh = std::ptr::null_mut();
            // SAFETY: maps memory we own for the region's lifetime (unmapped in drop_region).
            let st = unsafe { sys::cx_mem_map(g.ctx, ptr as *mut c_void, size, &mut memh) };
            if st != UCS_OK {
                drop(g);
                self.drop_region(region);
                return Err(self.be(format!(
                    "ucp_mem_map of {size} bytes: {}",
                    status_string(st)
                )));
            }
            region.memh = memh;
            let (mut kb, mut klen) = (std::ptr::null_mut(), 0usize);
            // SAFETY: memh was just mapped on this context.
            let st = unsafe { sys::cx_rkey_pack(g.ctx, memh, &mut kb, &mut klen) };
            if st != UCS_OK {
                drop(g);
                self.drop_region(region);
                return Err(self.be(format!("ucp_rkey_pack: {}", status_string(st))));
            }
            let mut blob = vec![kind as u8];
            blob.extend_from_slice(&(len as u64).to_le_bytes());
            blob.extend_from_slice(&(ptr as u64).to_le_bytes());
            // SAFETY: UCX returned `klen` bytes at `kb`; copied, then released once.
            blob.extend_from_slice(unsafe { std::slice::from_raw_parts(kb as *const u8, klen) });
            // SAFETY: buffer from ucp_rkey_pack.
            unsafe { sys::cx_rkey_buffer_release(kb) };
            blob
        };
        let all = match self.gather(&blob) {
            Ok(a) => a,
            Err(e) => {
                self.drop_region(region);
                return Err(e);
            }
        };
        let what = if blob[0] == Collective::Buffer as u8 {
            "alloc_buffer"
        } else {
            "alloc_signals"
        };
        for (r, b) in all.iter().enumerate() {
            let theirs = (b.len() >= 17).then(|| {
                (
                    b[0],
                    u64::from_le_bytes(b[1..9].try_into().unwrap_or_default()),
                )
            });
            if theirs != Some((blob[0], len as u64)) {
                self.drop_region(region);
                let detail = match theirs {
                    Some((k, n)) if k == blob[0] => format!("{len} bytes here but {n} on rank {r}"),
                    _ => format!("rank {r} called a different collective"),
                };
                return Err(TransportError::Mismatch {
                    rank: self.rank,
                    what: if blob[0] == 1 {
                        "alloc_buffer"
                    } else {
                        "alloc_signals"
                    },
                    detail,
                });
            }
        }
        let g = lock(&self.inner);
        for (r, b) in all.iter().enumerate() {
            let addr = u64::from_le_bytes(b[9..17].try_into().unwrap_or_default());
            let mut rkey = std::ptr::null_mut();
            if let Some(p) = g.peers[r].as_ref().filter(|p| !p.ep.is_null()) {
                // SAFETY: a key packed by rank r's UCX, unpacked on our endpoint to r.
                let st = unsafe {
                    sys::cx_rkey_unpack(p.ep, b[17..].as_ptr() as *const c_void, &mut rkey)
                };
                if st != UCS_OK {
                    region.remote.push((addr, std::ptr::null_mut()));
                    drop(g);
                    self.drop_region(region);
                    return Err(self.be(format!(
                        "{what}: cannot unpack rank {r}'s key: {}",
                        status_string(st)
                    )));
                }
            }
            region.remote.push((addr, rkey));
        }
        Ok(region)
    }

    fn drop_region(&self, r: Region) {
        let g = lock(&self.inner);
        for &(_, k) in &r.remote {
            if !k.is_null() {
                // SAFETY: unpacked key, destroyed once.
                unsafe { sys::cx_rkey_destroy(k) };
            }
        }
        if !r.memh.is_null() {
            // SAFETY: mapped on this context, unmapped once.
            unsafe { sys::cx_mem_unmap(g.ctx, r.memh) };
        }
        // SAFETY: allocated with this layout in map_region, freed once.
        unsafe { std::alloc::dealloc(r.ptr, r.layout) };
    }

    /// Completes every operation this rank has issued, at their targets.
    pub fn flush(&self) -> Result<(), TransportError> {
        self.flush_all()
    }

    fn flush_all(&self) -> Result<(), TransportError> {
        let mut g = lock(&self.inner);
        let mut req = std::ptr::null_mut();
        // SAFETY: valid worker.
        let st = unsafe { sys::cx_worker_flush(g.worker, &mut req) };
        self.complete(&mut g, st, req, None, "worker flush")?;
        self.reap(&mut g)
    }

    /// Releases the signal atomics that have completed; the first failure
    /// (its peer is then marked broken) is returned.
    fn reap(&self, g: &mut Inner) -> Result<(), TransportError> {
        let mut first = None;
        let mut i = 0;
        while i < g.in_flight.len() {
            // SAFETY: a live request handle of an atomic not yet released.
            let st = unsafe { sys::cx_req_check(g.in_flight[i].req) };
            if st == UCS_INPROGRESS {
                i += 1;
                continue;
            }
            let f = g.in_flight.swap_remove(i);
            // SAFETY: completed, released once; its operands are dropped after.
            unsafe { sys::cx_req_free(f.req) };
            if st != UCS_OK && first.is_none() {
                let e = TransportError::PeerGone {
                    rank: self.rank,
                    peer: f.peer,
                    reason: format!("a signal to it failed: {}", status_string(st)),
                };
                self.break_peer(g, f.peer, &e.to_string());
                first = Some(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    fn remote(
        &self,
        region: &Region,
        dst: usize,
        offset: usize,
        len: usize,
        what: &str,
    ) -> Result<(u64, *mut c_void), TransportError> {
        if offset.checked_add(len).is_none_or(|end| end > region.len) {
            return Err(TransportError::OutOfBounds {
                rank: self.rank,
                what: what.into(),
                offset,
                len,
                size: region.len,
            });
        }
        let (addr, key) = region.remote[dst];
        Ok((addr + offset as u64, key))
    }
}

/// The steps of raising a signal word on a peer: what keeps the word
/// behind the data it guards is the order [`raise_after_puts`] takes them in.
trait SignalSteps {
    /// `ucp_worker_fence`: earlier operations complete before later ones.
    fn fence(&mut self) -> Result<(), TransportError>;
    /// `ucp_ep_flush_nbx` to the peer: earlier operations have completed
    /// at the target when it returns.
    fn flush(&mut self) -> Result<(), TransportError>;
    /// Posts the 64-bit atomic on the peer's signal word.
    fn atomic(&mut self) -> Result<(), TransportError>;
}

/// Raises a signal on a peer after every earlier put to it: a fence or a
/// flush (per `ordering`), then the atomic. Without the first step UCX
/// may complete the atomic before the puts (the tests model that).
fn raise_after_puts(
    steps: &mut impl SignalSteps,
    ordering: SignalOrdering,
) -> Result<(), TransportError> {
    match ordering {
        SignalOrdering::Fence => steps.fence()?,
        SignalOrdering::Flush => steps.flush()?,
    }
    steps.atomic()
}

/// [`SignalSteps`] over UCX, for one signal towards a live peer.
struct UcxRaise<'a, 'g> {
    t: &'a UcxTransport,
    g: &'a mut MutexGuard<'g, Inner>,
    ep: *mut c_void,
    dst: usize,
    sig: SignalId,
    raddr: u64,
    rkey: *mut c_void,
    op: SignalOp,
}

impl SignalSteps for UcxRaise<'_, '_> {
    fn fence(&mut self) -> Result<(), TransportError> {
        // SAFETY: valid worker, used under the lock.
        let st = unsafe { sys::cx_worker_fence(self.g.worker) };
        if st != UCS_OK {
            return Err(self.t.be(format!(
                "fence before signal {} on rank {}: {}",
                self.sig,
                self.dst,
                status_string(st)
            )));
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), TransportError> {
        let mut req = std::ptr::null_mut();
        // SAFETY: live endpoint (peer_ok passed).
        let st = unsafe { sys::cx_ep_flush(self.ep, &mut req) };
        self.t.complete(
            self.g,
            st,
            req,
            Some(self.dst),
            &format!("flush before signal {} on rank {}", self.sig, self.dst),
        )
    }

    fn atomic(&mut self) -> Result<(), TransportError> {
        let (dst, sig) = (self.dst, self.sig);
        let mut operands = Box::new([
            match self.op {
                SignalOp::Set(v) | SignalOp::Add(v) => v,
            },
            0u64,
        ]);
        let opcode = if matches!(self.op, SignalOp::Set(_)) {
            1
        } else {
            0
        };
        let (value, reply) = {
            let [v, r] = &mut *operands;
            (v as *mut u64, r as *mut u64)
        };
        let mut req = std::ptr::null_mut();
        // SAFETY: live endpoint and key; the operands are boxed and kept in
        // `in_flight` until the request completes (or leaked with the worker).
        let st = unsafe {
            sys::cx_atomic64(
                self.ep, opcode, value, reply, self.raddr, self.rkey, &mut req,
            )
        };
        match st {
            UCS_OK => Ok(()),
            UCS_INPROGRESS => {
                self.g.in_flight.push(InFlight {
                    req,
                    peer: dst,
                    _operands: operands,
                });
                Ok(())
            }
            err => {
                let e = self.t.be(format!(
                    "signal {sig} on rank {dst}: {}",
                    status_string(err)
                ));
                self.t.break_peer(self.g, dst, &e.to_string());
                Err(e)
            }
        }
    }
}

impl Transport for UcxTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            name: "ucx",
            initiation: Initiation::Host,
            device_memory: false,
        }
    }

    fn alloc_buffer(&self, bytes: usize) -> Result<BufferId, TransportError> {
        let r = self.map_region(bytes, Collective::Buffer)?;
        let mut g = lock(&self.inner);
        g.buffers.push(r);
        Ok(BufferId(g.buffers.len() as u32 - 1))
    }

    fn alloc_signals(&self, count: usize) -> Result<(), TransportError> {
        // Everyone's operations into the old array complete before anyone
        // gets past the key exchange, so the old array can then be freed.
        self.flush_all()?;
        let bytes = SignalSlots::new(count).bytes(self.rank)?;
        let new = self.map_region(bytes, Collective::Signals)?;
        let old = lock(&self.inner).signals.replace(new);
        if let Some(old) = old {
            self.drop_region(old);
        }
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
        let mut g = lock(&self.inner);
        let what = || format!("put to buffer {} on rank {dst}", buf.0);
        let region = g
            .buffers
            .get(buf.0 as usize)
            .ok_or_else(|| TransportError::NotAllocated {
                rank: self.rank,
                what: format!("buffer {}", buf.0),
            })?;
        let (raddr, rkey) = self.remote(region, dst, offset, data.len(), &what())?;
        if data.is_empty() {
            return Ok(());
        }
        if dst == self.rank {
            // SAFETY: bounds checked above; the region is ours and stays mapped
            // while we hold the lock; `data` cannot alias it (it is borrowed
            // shared while this rank's buffer is only written here).
            unsafe {
                std::ptr::copy_nonoverlapping(data.as_ptr(), region.ptr.add(offset), data.len())
            };
            return Ok(());
        }
        self.peer_ok(&g, dst)?;
        let ep = g.peers[dst].as_ref().map_or(std::ptr::null_mut(), |p| p.ep);
        let mut req = std::ptr::null_mut();
        // SAFETY: live endpoint and key for dst (peer_ok passed, so neither
        // was closed); the data stays borrowed until `complete` returns, and
        // on failure the endpoint is force-closed, ending the request.
        let st = unsafe {
            sys::cx_put(
                ep,
                data.as_ptr() as *const c_void,
                data.len(),
                raddr,
                rkey,
                &mut req,
            )
        };
        self.complete(&mut g, st, req, Some(dst), &what())
    }

    fn signal(&self, dst: usize, sig: SignalId, op: SignalOp) -> Result<(), TransportError> {
        check_rank(self, dst)?;
        let mut g = lock(&self.inner);
        let (region, off) = locate(
            self.rank,
            g.signals.as_ref(),
            Region::signal_slots,
            sig,
            Owner::Peer(dst),
        )?;
        let (raddr, rkey) = region.remote[dst];
        let raddr = raddr + off as u64;
        if dst == self.rank {
            // SAFETY: in bounds (checked), 8-aligned (page-aligned base), and
            // only ever accessed atomically, here and by UCX's atomics.
            let w = unsafe { AtomicU64::from_ptr(region.ptr.add(off) as *mut u64) };
            match op {
                SignalOp::Set(v) => w.store(v, Ordering::Release),
                SignalOp::Add(v) => {
                    w.fetch_add(v, Ordering::AcqRel);
                }
            }
            return Ok(());
        }
        self.peer_ok(&g, dst)?;
        let ep = g.peers[dst].as_ref().map_or(std::ptr::null_mut(), |p| p.ep);
        let mut raise = UcxRaise {
            t: self,
            g: &mut g,
            ep,
            dst,
            sig,
            raddr,
            rkey,
            op,
        };
        raise_after_puts(&mut raise, self.cfg.ordering)?;
        // Keep the list short; completed atomics are common after a progress.
        if g.in_flight.len() >= 64 {
            g.progress();
            self.reap(&mut g)?;
        }
        Ok(())
    }

    fn wait(&self, sig: SignalId, target: u64, timeout: Duration) -> Result<u64, TransportError> {
        let look = |round: Round| {
            let mut g = lock(&self.inner);
            g.progress();
            let (region, off) = locate(
                self.rank,
                g.signals.as_ref(),
                Region::signal_slots,
                sig,
                Owner::Local,
            )?;
            // SAFETY: in bounds, aligned, and only accessed atomically (see signal).
            let v = unsafe { AtomicU64::from_ptr(region.ptr.add(off) as *mut u64) }
                .load(Ordering::Acquire);
            if v < target && round.checkpoint() {
                self.reap(&mut g)?;
                if let Err(BootstrapError::PeerGone { peer, reason, .. }) = self.boot.check_peers()
                {
                    return Err(TransportError::PeerGone {
                        rank: self.rank,
                        peer,
                        reason: format!(
                            "{reason}, while waiting for signal {sig} to reach {target}"
                        ),
                    });
                }
                for (peer, p) in g.peers.iter().enumerate() {
                    let st = p.as_ref().map_or(UCS_OK, |p| p.err.load(Ordering::Acquire));
                    if st != UCS_OK {
                        return Err(TransportError::PeerGone {
                            rank: self.rank,
                            peer,
                            reason: format!(
                                "UCX endpoint failed ({}), while waiting for signal {sig}",
                                status_string(st)
                            ),
                        });
                    }
                }
            }
            Ok(v)
        };
        wait_signal(self.rank, sig, target, timeout, look, std::thread::sleep)
    }

    fn read(&self, buf: BufferId, offset: usize, out: &mut [u8]) -> Result<(), TransportError> {
        let g = lock(&self.inner);
        let region = g
            .buffers
            .get(buf.0 as usize)
            .ok_or_else(|| TransportError::NotAllocated {
                rank: self.rank,
                what: format!("buffer {}", buf.0),
            })?;
        if offset
            .checked_add(out.len())
            .is_none_or(|end| end > region.len)
        {
            return Err(TransportError::OutOfBounds {
                rank: self.rank,
                what: format!("read of buffer {}", buf.0),
                offset,
                len: out.len(),
                size: region.len,
            });
        }
        // SAFETY: bounds checked; the region stays mapped while we hold the
        // lock. Peers may be writing other parts of it (their puts land
        // without us); the protocol (wait on a signal first) keeps them off
        // the part read here.
        unsafe {
            std::ptr::copy_nonoverlapping(region.ptr.add(offset), out.as_mut_ptr(), out.len())
        };
        Ok(())
    }

    fn barrier(&self, timeout: Duration) -> Result<(), TransportError> {
        self.flush_all()?;
        let mut idle = || {
            lock(&self.inner).progress();
        };
        Ok(self.boot.barrier_with(timeout, &mut idle)?)
    }
}

impl Drop for UcxTransport {
    fn drop(&mut self) {
        let broken = self.boot.check_peers().is_err() || {
            let g = lock(&self.inner);
            g.peers
                .iter()
                .flatten()
                .any(|p| p.broken.is_some() || p.err.load(Ordering::Acquire) != UCS_OK)
        };
        if broken {
            // Operations to a dead peer may still be queued inside UCX, and
            // live peers may still write into our memory: tearing down could
            // trip UCX's assertions or free memory under them. A broken world
            // is abandoned as it is; the process is expected to exit.
            tracing::warn!(rank = self.rank, "ucx: a peer failed; leaking the UCX worker and registered memory instead of tearing down");
            let mut g = lock(&self.inner);
            std::mem::forget(std::mem::take(&mut g.buffers));
            std::mem::forget(g.signals.take());
            std::mem::forget(std::mem::take(&mut g.peers));
            std::mem::forget(std::mem::take(&mut g.in_flight));
            return;
        }
        {
            // Signals still in flight complete (the caller's barrier made
            // sure peers are there to answer), or their operands are leaked.
            let mut g = lock(&self.inner);
            let deadline = Instant::now() + Duration::from_secs(1);
            while !g.in_flight.is_empty() && Instant::now() < deadline {
                g.progress();
                let _ = self.reap(&mut g);
            }
            std::mem::forget(std::mem::take(&mut g.in_flight));
        }
        let regions: Vec<Region> = {
            let mut g = lock(&self.inner);
            let mut v: Vec<Region> = g.buffers.drain(..).collect();
            v.extend(g.signals.take());
            v
        };
        for r in regions {
            self.drop_region(r);
        }
        let mut g = lock(&self.inner);
        for peer in 0..self.world {
            let Some(ep) = g.peers[peer]
                .as_ref()
                .map(|p| p.ep)
                .filter(|e| !e.is_null())
            else {
                continue;
            };
            let mut req = std::ptr::null_mut();
            // SAFETY: live endpoint, closed once; forced so a departed peer cannot stall us.
            let st = unsafe { sys::cx_ep_close(ep, 1, &mut req) };
            if st == UCS_INPROGRESS {
                for _ in 0..100_000 {
                    // SAFETY: live request handle.
                    if unsafe { sys::cx_req_check(req) } != UCS_INPROGRESS {
                        break;
                    }
                    g.progress();
                }
                // SAFETY: released once.
                unsafe { sys::cx_req_free(req) };
            }
        }
        g.peers.clear();
        // SAFETY: every endpoint, key and mapping of this context is gone.
        unsafe { sys::cx_fini(g.ctx, g.worker) };
        g.ctx = std::ptr::null_mut();
        g.worker = std::ptr::null_mut();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer's memory behind a link that holds puts back: they land only
    /// when a fence or a flush orders them, while an atomic lands at once,
    /// which UCX allows when nothing orders them (separate lanes, RDMA
    /// completing out of order).
    struct DelayingLink {
        memory: Vec<u8>,
        held: Vec<(usize, Vec<u8>)>,
        word: u64,
        op: SignalOp,
    }

    impl DelayingLink {
        fn put(&mut self, offset: usize, data: &[u8]) {
            self.held.push((offset, data.to_vec()));
        }

        fn land(&mut self) {
            for (offset, data) in self.held.drain(..) {
                self.memory[offset..offset + data.len()].copy_from_slice(&data);
            }
        }
    }

    impl SignalSteps for DelayingLink {
        fn fence(&mut self) -> Result<(), TransportError> {
            self.land();
            Ok(())
        }

        fn flush(&mut self) -> Result<(), TransportError> {
            self.land();
            Ok(())
        }

        fn atomic(&mut self) -> Result<(), TransportError> {
            match self.op {
                SignalOp::Set(v) => self.word = v,
                SignalOp::Add(v) => self.word += v,
            }
            Ok(())
        }
    }

    /// A signal never overtakes its data: the receiver that sees the word
    /// raised finds every byte of the puts before it. Removing the fence
    /// (or the flush) in `raise_after_puts` fails this test.
    #[test]
    fn a_signal_never_overtakes_the_puts_before_it() {
        for ordering in [SignalOrdering::Fence, SignalOrdering::Flush] {
            let mut link = DelayingLink {
                memory: vec![0; 4096],
                held: Vec::new(),
                word: 0,
                op: SignalOp::Set(0),
            };
            for epoch in 1..=20u64 {
                let fill = epoch as u8;
                link.put(0, &[fill; 1024]);
                link.put(3072, &[fill; 1024]);
                link.op = if epoch % 2 == 0 {
                    SignalOp::Set(epoch)
                } else {
                    SignalOp::Add(epoch - link.word)
                };
                raise_after_puts(&mut link, ordering).unwrap();
                // The receiver: its wait returns once the word reaches the epoch.
                assert_eq!(link.word, epoch, "{ordering:?}");
                for range in [0..1024, 3072..4096] {
                    assert!(
                        link.memory[range.clone()].iter().all(|&b| b == fill),
                        "{ordering:?}, epoch {epoch}: signal seen before the data at {range:?}"
                    );
                }
            }
        }
    }
}
