//! The `ucx` transport: host-driven RMA through UCX (UCP), over RDMA, TCP
//! or shared memory, whatever UCX finds (`UCX_TLS` chooses).
//!
//! Every rank has UCP allocate and map its symmetric buffers and its signal
//! array (`UCP_MEM_MAP_ALLOCATE`: over shared memory that memory is a
//! segment peers attach, so a put is a copy into it; memory mapped by
//! address is reached there only by active messages, 15-30x slower,
//! docs/PERF.md 2026-12-06), packs their remote keys, and swaps addresses
//! and keys with the others through the [`Bootstrap`]. A put is `ucp_put_nbx` into the peer's copy
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
//! `libucx-dev`, 1.13 on bookworm; `UCX_HOME` for another install), in
//! three levels as cudarc does: `sys` declares that layer, `result` turns
//! statuses into text, `safe` holds the handles (worker, endpoints, mapped
//! memory, keys, requests) that release themselves on drop; the transport
//! below uses only those, with one deliberately unsafe call (a put's
//! request borrows the caller's slice). Why not the crates:
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
//! ...), except that TCP segments are 256 KiB unless `UCX_TCP_TX_SEG_SIZE`
//! / `UCX_TCP_RX_SEG_SIZE` say otherwise: puts of 64 KiB and more are 2-3x
//! faster than with UCX's 8 KiB default (docs/PERF.md).
//!
//! Call [`Transport::barrier`] before dropping a transport, so no peer is
//! still writing into this rank's memory when it is unmapped.
//!
//! ## Peer failures, and a limit of UCX 1.13
//! A peer's death is seen through the bootstrap (its connection closes) and,
//! on TCP, through UCX's own endpoint errors; waits, puts and signals then
//! return [`TransportError::PeerGone`], and a transport whose world broke is
//! leaked at drop rather than torn down (UCX asserts when purging queued
//! operations to a dead shared-memory peer). Over TCP UCX emulates RMA
//! with active messages that the target acknowledges; if a rank dies
//! while its own puts to a peer are unacknowledged, UCX 1.13 may
//! abort that peer inside `ucp_put_handler` ("Endpoint timeout") when it
//! next progresses. That is a crash, never a hang, and the launcher then
//! stops the job; RDMA transports have no such acknowledgement.

use crate::bootstrap::{Bootstrap, BootstrapConfig, BootstrapError};
use crate::error::TransportError;
use crate::signal_core::{
    buffer, check_range, locate, wait_signal, Owner, Round, SignalSlots, SIGNAL_BYTES,
};
use crate::transport::{
    check_rank, BufferId, Capabilities, Initiation, SignalId, SignalOp, Transport,
};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

mod result;
mod safe;
mod sys;

use result::status_string;
use safe::{AtomicOp, Endpoint, InFlightAtomic, Mapped, Posted, RemoteKey, Worker};
use sys::{
    UCS_ERR_CONNECTION_RESET, UCS_ERR_ENDPOINT_TIMEOUT, UCS_ERR_NOT_CONNECTED, UCS_ERR_UNREACHABLE,
    UCS_INPROGRESS, UCS_OK,
};

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
        if std::env::var("UCX_TLS").is_ok_and(|tls| shared_memory_only(&tls)) {
            // Nothing to ask: UCX would log an error refusing it first.
            c.peer_errors = Some(false);
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

/// UCX settings this transport changes where TCP may carry it (`UCX_TLS`
/// unset or naming tcp) unless the environment sets them: UCX's 8 KiB TCP
/// segments cost 2-3x on puts of 64 KiB and up, and 1.8x on a staged
/// layer's calls (docs/PERF.md).
fn tuned_defaults() -> Vec<(&'static str, &'static str)> {
    let tls = std::env::var("UCX_TLS").ok();
    tuned_for(ucx_version(), tls.as_deref(), |v| {
        std::env::var_os(v).is_some()
    })
}

/// [`tuned_defaults`] for UCX `version`, a `UCX_TLS` of `tls` and the
/// variables `set`. `ucp_config_modify` caches a setting no UCP table
/// has and hands it to each UCT interface it opens, which matches it by
/// the field's name up to UCX 1.16 (`TX_SEG_SIZE`) and by its full name
/// from 1.17 on (`TCP_TX_SEG_SIZE`; 1.21 refuses other names).
fn tuned_for(
    version: (u32, u32, u32),
    tls: Option<&str>,
    set: impl Fn(&str) -> bool,
) -> Vec<(&'static str, &'static str)> {
    // A leading '^' negates the whole list: "^sm" leaves TCP in.
    let tcp = tls.is_none_or(|t| match t.trim().strip_prefix('^') {
        Some(out) => !out.split(',').any(|x| x.trim() == "tcp"),
        None => t.split(',').any(|x| matches!(x.trim(), "tcp" | "all")),
    });
    let full = version >= (1, 17, 0);
    [
        ("UCX_TCP_TX_SEG_SIZE", "TX_SEG_SIZE", "256k"),
        ("UCX_TCP_RX_SEG_SIZE", "RX_SEG_SIZE", "256k"),
    ]
    .into_iter()
    .filter(|(env, _, _)| tcp && !set(env))
    .map(|(env, field, value)| (if full { &env[4..] } else { field }, value))
    .collect()
}

/// Whether a `UCX_TLS` list names only shared-memory transports, none of
/// which can report a failed peer in UCX 1.13 (so asking for peer errors
/// only has UCX log a refused endpoint before the fallback).
fn shared_memory_only(tls: &str) -> bool {
    const SHM: [&str; 9] = [
        "sm", "shm", "self", "posix", "sysv", "cma", "knem", "xpmem", "mm",
    ];
    let names: Vec<&str> = tls.split(',').map(str::trim).collect();
    !tls.trim_start().starts_with('^')
        && names.iter().any(|n| !n.is_empty())
        && names.iter().all(|n| n.is_empty() || SHM.contains(n))
}

/// Host memory mapped with UCP, and every peer's key for its copy.
struct Region {
    /// Per rank: (remote address, unpacked key); no key for this rank.
    /// Declared before `mem`: the keys are destroyed before it is unmapped.
    remote: Vec<(u64, Option<RemoteKey>)>,
    mem: Mapped,
    /// Bytes the user asked for (the mapping may be larger).
    len: usize,
}

struct Peer {
    /// None once force-closed.
    ep: Option<Endpoint>,
    /// Set by UCX's error callback (during progress) to the failure status;
    /// outlives the endpoint.
    err: Arc<AtomicI32>,
    /// Set by us after an operation towards the peer failed.
    broken: Option<String>,
    /// Whether the endpoint was created with peer failure reporting, which
    /// is also what lets a forced close purge its queued operations safely.
    peer_errors: bool,
}

/// A signal's atomic still in flight towards `peer`.
struct InFlight {
    atomic: InFlightAtomic,
    peer: usize,
}

/// Every UCX handle of the transport; only touched while holding the
/// `Mutex<Inner>` (the worker runs in UCS_THREAD_MODE_SERIALIZED mode,
/// which allows calls from any thread as long as they never overlap).
/// Fields drop in order: atomics, memory, endpoints, then the worker.
struct Inner {
    in_flight: Vec<InFlight>,
    buffers: Vec<Region>,
    signals: Option<Region>,
    peers: Vec<Option<Peer>>,
    worker: Worker,
}

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
        self.worker.progress()
    }

    /// The live endpoint to `peer`, if any.
    fn endpoint(&self, peer: usize) -> Option<&Endpoint> {
        self.peers.get(peer)?.as_ref()?.ep.as_ref()
    }
}

impl UcxTransport {
    /// Joins the world of the torchrun environment and connects to every peer.
    pub fn from_env() -> Result<Self, TransportError> {
        let boot = Bootstrap::from_env()?;
        Self::new(boot, UcxConfig::from_env()?)
    }

    /// `world` ranks in this process, bootstrapped over loopback (a thread
    /// each while they connect), rank r at index r. One process's ranks on
    /// one GPU share its CUDA context, so their kernels run at once where
    /// processes would take turns.
    pub fn in_process(world: usize, cfg: UcxConfig) -> Result<Vec<Self>, TransportError> {
        let l = crate::bootstrap::listen("127.0.0.1", 0)?;
        let port = l
            .local_addr()
            .map_err(|e| TransportError::Bootstrap(format!("loopback listener: {e}")))?
            .port();
        let cfg = &cfg;
        std::thread::scope(|s| {
            let peers: Vec<_> = (1..world)
                .map(|r| {
                    s.spawn(move || {
                        Self::new(
                            Bootstrap::connect(BootstrapConfig::local(r, world, port))?,
                            cfg.clone(),
                        )
                    })
                })
                .collect();
            let root = Bootstrap::with_listener(BootstrapConfig::local(0, world, port), l)
                .map_err(TransportError::from)
                .and_then(|b| Self::new(b, cfg.clone()));
            let mut all = vec![root];
            for (r, h) in peers.into_iter().enumerate() {
                all.push(h.join().unwrap_or_else(|_| {
                    Err(TransportError::Bootstrap(format!(
                        "ucx rank {} of {world}: its thread panicked",
                        r + 1
                    )))
                }));
            }
            all.into_iter().collect()
        })
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
        let (worker, refused) = Worker::new(&tuned_defaults()).map_err(|st| {
            be(format!(
                "cannot create a UCP context and worker: {}",
                status_string(st)
            ))
        })?;
        if !refused.is_empty() {
            tracing::warn!(
                rank,
                ?refused,
                "UCX refused these settings; its defaults apply"
            );
        }
        let t = UcxTransport {
            rank,
            world,
            cfg,
            inner: Mutex::new(Inner {
                in_flight: Vec::new(),
                buffers: Vec::new(),
                signals: None,
                peers: (0..world).map(|_| None).collect(),
                worker,
            }),
            boot,
        };
        let my_addr = lock(&t.inner)
            .worker
            .address()
            .map_err(|st| be(format!("ucp_worker_get_address: {}", status_string(st))))?;
        let addrs = t.gather(&my_addr)?;
        {
            let mut g = lock(&t.inner);
            for (r, a) in addrs.iter().enumerate() {
                if r == rank {
                    continue;
                }
                let mut made = Err(UCS_ERR_UNREACHABLE);
                for peer_errors in [true, false] {
                    if t.cfg.peer_errors.is_some_and(|want| want != peer_errors) {
                        continue;
                    }
                    made = g.worker.connect(a, peer_errors).map(|ep| (ep, peer_errors));
                    if made.as_ref().err() != Some(&UCS_ERR_UNREACHABLE) {
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
                let (ep, with_errors) = made.map_err(|st| {
                    be(format!(
                        "cannot create an endpoint to rank {r}: {}",
                        status_string(st)
                    ))
                })?;
                g.peers[r] = Some(Peer {
                    err: ep.failure_flag(),
                    ep: Some(ep),
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

    /// The error of an operation towards `peer` that UCX failed with
    /// `status`: the peer is gone when its endpoint reported an error or
    /// the status says the endpoint failed (a post can fail so before the
    /// error callback ran); any other failure is the backend's.
    fn op_error(&self, g: &Inner, peer: Option<usize>, what: &str, status: i32) -> TransportError {
        let lost = |p: usize| {
            endpoint_failed(status)
                || g.peers[p]
                    .as_ref()
                    .is_some_and(|x| x.err.load(Ordering::Acquire) != UCS_OK)
        };
        match peer {
            Some(p) if lost(p) => TransportError::PeerGone {
                rank: self.rank,
                peer: p,
                reason: format!("{what} failed: {}", status_string(status)),
            },
            _ => self.be(format!("{what}: {}", status_string(status))),
        }
    }

    /// Drives `req` (from an operation towards `peer`, or the whole worker
    /// when `peer` is None) to completion within the operation deadline.
    /// On failure, the endpoint to `peer` is force-closed, which completes
    /// every request still using caller memory, and the peer marked broken.
    fn complete(
        &self,
        g: &mut MutexGuard<'_, Inner>,
        posted: Posted,
        peer: Option<usize>,
        what: &str,
    ) -> Result<(), TransportError> {
        let req = match posted {
            Posted::Done => return Ok(()),
            Posted::Pending(req) => req,
            Posted::Failed(st) => {
                let e = self.op_error(g, peer, what, st);
                if let Some(p) = peer {
                    self.break_peer(g, p, &e.to_string());
                }
                return Err(e);
            }
        };
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            g.progress();
            let s = req.check();
            if s != UCS_INPROGRESS {
                // Completed: released exactly once.
                drop(req);
                if s == UCS_OK {
                    return Ok(());
                }
                let e = self.op_error(g, peer, what, s);
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
                    // Gives the pending request back to UCX, which frees it when it completes.
                    drop(req);
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
        // A forced close completes the endpoint's outstanding requests with an error.
        if let Some(ep) = p.ep.take() {
            ep.close(10_000);
        }
        // The endpoint is gone: its keys must not be used through it again.
        for r in g.buffers.iter_mut().chain(g.signals.iter_mut()) {
            if let Some(k) = r.remote.get_mut(peer) {
                k.1 = None;
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
        let (mut region, blob) = {
            let g = lock(&self.inner);
            let mem = g.worker.map_zeroed(size).map_err(|st| {
                self.be(format!(
                    "ucp_mem_map allocating {size} bytes: {}",
                    status_string(st)
                ))
            });
            // A failed mapping is released under the lock.
            let mem = mem?;
            let key = match mem.pack_key() {
                Ok(k) => k,
                Err(st) => {
                    drop(mem);
                    return Err(self.be(format!("ucp_rkey_pack: {}", status_string(st))));
                }
            };
            let mut blob = vec![kind as u8];
            blob.extend_from_slice(&(len as u64).to_le_bytes());
            blob.extend_from_slice(&mem.addr().to_le_bytes());
            blob.extend_from_slice(&key);
            let region = Region {
                remote: Vec::new(),
                mem,
                len,
            };
            (region, blob)
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
            let mut rkey = None;
            if let Some(ep) = g.endpoint(r) {
                // A key packed by rank r's UCX, unpacked on our endpoint to r.
                match ep.unpack_key(&b[17..]) {
                    Ok(k) => rkey = Some(k),
                    Err(st) => {
                        region.remote.push((addr, None));
                        drop(g);
                        self.drop_region(region);
                        return Err(self.be(format!(
                            "{what}: cannot unpack rank {r}'s key: {}",
                            status_string(st)
                        )));
                    }
                }
            }
            region.remote.push((addr, rkey));
        }
        Ok(region)
    }

    /// Destroys the region's keys, unmaps and frees it, under the lock.
    fn drop_region(&self, r: Region) {
        let _g = lock(&self.inner);
        drop(r);
    }

    /// Completes every operation this rank has issued, at their targets.
    pub fn flush(&self) -> Result<(), TransportError> {
        self.flush_all()
    }

    fn flush_all(&self) -> Result<(), TransportError> {
        let mut g = lock(&self.inner);
        let posted = g.worker.flush();
        self.complete(&mut g, posted, None, "worker flush")?;
        self.reap(&mut g)
    }

    /// Releases the signal atomics that have completed; the first failure
    /// (its peer is then marked broken) is returned.
    fn reap(&self, g: &mut Inner) -> Result<(), TransportError> {
        let mut first = None;
        let mut i = 0;
        while i < g.in_flight.len() {
            let st = g.in_flight[i].atomic.check();
            if st == UCS_INPROGRESS {
                i += 1;
                continue;
            }
            // Completed: its request is released, then its operands dropped.
            let f = g.in_flight.swap_remove(i);
            drop(f.atomic);
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

    /// The address of `offset` in `dst`'s copy of `region`, bounds checked.
    fn remote(
        &self,
        region: &Region,
        dst: usize,
        offset: usize,
        len: usize,
        what: &str,
    ) -> Result<u64, TransportError> {
        check_range(self.rank, what, offset, len, region.len)?;
        Ok(region.remote[dst].0 + offset as u64)
    }

    /// The live endpoint to `dst` and its key for `region`; an error if
    /// either is missing (a closed endpoint takes its keys with it).
    fn reach<'g>(
        &self,
        g: &'g Inner,
        region: &'g Region,
        dst: usize,
        what: &dyn Fn() -> String,
    ) -> Result<(&'g Endpoint, &'g RemoteKey), TransportError> {
        match (g.endpoint(dst), region.remote[dst].1.as_ref()) {
            (Some(ep), Some(key)) => Ok((ep, key)),
            _ => Err(self.reach_lost(dst, &what())),
        }
    }

    /// `dst` has no live endpoint (or key) although it was not marked broken.
    /// Fails naming a peer known to be lost: a completion that failed
    /// towards it, its bootstrap connection closed, or its endpoint failed.
    /// `context` says what this rank was doing.
    fn lost_peer(&self, g: &mut Inner, context: &str) -> Result<(), TransportError> {
        self.reap(g)?;
        if let Err(BootstrapError::PeerGone { peer, reason, .. }) = self.boot.check_peers() {
            return Err(TransportError::PeerGone {
                rank: self.rank,
                peer,
                reason: format!("{reason}, {context}"),
            });
        }
        for (peer, p) in g.peers.iter().enumerate() {
            let st = p.as_ref().map_or(UCS_OK, |p| p.err.load(Ordering::Acquire));
            if st != UCS_OK {
                return Err(TransportError::PeerGone {
                    rank: self.rank,
                    peer,
                    reason: format!("UCX endpoint failed ({}), {context}", status_string(st)),
                });
            }
        }
        Ok(())
    }

    fn reach_lost(&self, dst: usize, what: &str) -> TransportError {
        TransportError::PeerGone {
            rank: self.rank,
            peer: dst,
            reason: format!("{what}: no endpoint or key to it"),
        }
    }
}

/// Whether a UCX status says the peer's endpoint failed (the peer is
/// gone or unreachable), as opposed to a local or usage error.
fn endpoint_failed(status: i32) -> bool {
    matches!(
        status,
        UCS_ERR_UNREACHABLE
            | UCS_ERR_NOT_CONNECTED
            | UCS_ERR_CONNECTION_RESET
            | UCS_ERR_ENDPOINT_TIMEOUT
    )
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
    dst: usize,
    sig: SignalId,
    raddr: u64,
    op: SignalOp,
}

impl UcxRaise<'_, '_> {
    fn what(&self) -> String {
        format!("signal {} on rank {}", self.sig, self.dst)
    }
}

impl SignalSteps for UcxRaise<'_, '_> {
    fn fence(&mut self) -> Result<(), TransportError> {
        if let Err(st) = self.g.worker.fence() {
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
        let posted = match self.g.endpoint(self.dst) {
            Some(ep) => ep.flush(),
            None => return Err(self.t.reach_lost(self.dst, &self.what())),
        };
        self.t.complete(
            self.g,
            posted,
            Some(self.dst),
            &format!("flush before signal {} on rank {}", self.sig, self.dst),
        )
    }

    fn atomic(&mut self) -> Result<(), TransportError> {
        let (dst, sig) = (self.dst, self.sig);
        let (op, value) = match self.op {
            SignalOp::Set(v) => (AtomicOp::Swap, v),
            SignalOp::Add(v) => (AtomicOp::Add, v),
        };
        let posted = {
            let g: &Inner = self.g;
            let region = g
                .signals
                .as_ref()
                .ok_or_else(|| TransportError::NotAllocated {
                    rank: self.t.rank,
                    what: "signals".into(),
                })?;
            let (ep, key) = self.t.reach(g, region, dst, &|| self.what())?;
            ep.atomic64(op, value, self.raddr, key)
        };
        match posted {
            Ok(None) => Ok(()),
            Ok(Some(atomic)) => {
                self.g.in_flight.push(InFlight { atomic, peer: dst });
                Ok(())
            }
            Err(err) => {
                let e = self.t.op_error(
                    self.g,
                    Some(dst),
                    &format!("signal {sig} on rank {dst}"),
                    err,
                );
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
        let region = buffer(self.rank, &g.buffers, buf)?;
        let raddr = self.remote(region, dst, offset, data.len(), &what())?;
        if data.is_empty() {
            return Ok(());
        }
        if dst == self.rank {
            // Bounds checked above (the mapping is at least `region.len`);
            // the region stays mapped while we hold the lock.
            region.mem.write(offset, data);
            return Ok(());
        }
        self.peer_ok(&g, dst)?;
        let (ep, key) = self.reach(&g, region, dst, &what)?;
        // SAFETY: `data` stays borrowed until `complete` returns, which is
        // when the request has completed or, on failure, the endpoint was
        // force-closed, ending the request.
        let posted = unsafe { ep.put(data, raddr, key) };
        self.complete(&mut g, posted, Some(dst), &what())
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
        let raddr = region.remote[dst].0 + off as u64;
        if dst == self.rank {
            // In bounds (checked by locate), 8-aligned, and only ever
            // accessed atomically, here and by UCX's atomics.
            let Some(w) = region.mem.word(off) else {
                return Err(self.be(format!("signal {sig}: word {off} is not addressable")));
            };
            match op {
                SignalOp::Set(v) => w.store(v, Ordering::Release),
                SignalOp::Add(v) => {
                    w.fetch_add(v, Ordering::AcqRel);
                }
            }
            return Ok(());
        }
        self.peer_ok(&g, dst)?;
        let mut raise = UcxRaise {
            t: self,
            g: &mut g,
            dst,
            sig,
            raddr,
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
            // In bounds, aligned, and only accessed atomically (see signal).
            let v = region
                .mem
                .word(off)
                .ok_or_else(|| self.be(format!("signal {sig}: word {off} is not addressable")))?
                .load(Ordering::Acquire);
            if v < target && round.checkpoint() {
                self.lost_peer(
                    &mut g,
                    &format!("while waiting for signal {sig} to reach {target}"),
                )?;
            }
            Ok(v)
        };
        wait_signal(self.rank, sig, target, timeout, look, std::thread::sleep)
    }

    fn peers_alive(&self) -> Result<(), TransportError> {
        let mut g = lock(&self.inner);
        g.progress();
        self.lost_peer(&mut g, "found after this rank's kernels timed out")
    }

    fn host_memory(&self, buf: BufferId) -> Result<Option<(u64, usize)>, TransportError> {
        // The mapping stays in place until the transport drops.
        let g = lock(&self.inner);
        let region = buffer(self.rank, &g.buffers, buf)?;
        Ok(Some((region.mem.addr(), region.len)))
    }

    fn read(&self, buf: BufferId, offset: usize, out: &mut [u8]) -> Result<(), TransportError> {
        let g = lock(&self.inner);
        let region = buffer(self.rank, &g.buffers, buf)?;
        check_range(
            self.rank,
            format_args!("read of buffer {}", buf.0),
            offset,
            out.len(),
            region.len,
        )?;
        // Bounds checked; the region stays mapped while we hold the lock.
        region.mem.read(offset, out);
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
            std::mem::forget(g.worker.clone());
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
        // Endpoints are force-closed (on drop), then the context and worker
        // finalized once the last handle is gone (when `inner` drops).
        lock(&self.inner).peers.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A post can fail with an endpoint status before the peer's error
    /// callback ran: those name the peer as gone; other failures do not.
    #[test]
    fn tcp_segments_grow_where_tcp_may_carry_and_the_user_chose_nothing() {
        let none = |_: &str| false;
        let v13 = (1, 13, 1);
        let both = [("TX_SEG_SIZE", "256k"), ("RX_SEG_SIZE", "256k")];
        for tls in [None, Some("tcp"), Some("sm,tcp"), Some("all"), Some("^sm")] {
            assert_eq!(tuned_for(v13, tls, none), both, "{tls:?}");
        }
        for tls in ["sm,self", "sm", "^tcp", "^sm,tcp", "rc"] {
            assert!(tuned_for(v13, Some(tls), none).is_empty(), "{tls}");
        }
        let tx_set = |v: &str| v == "UCX_TCP_TX_SEG_SIZE";
        assert_eq!(
            tuned_for(v13, Some("tcp"), tx_set),
            [("RX_SEG_SIZE", "256k")]
        );
        // From UCX 1.17 on, the interface's table matches full names.
        let full = [("TCP_TX_SEG_SIZE", "256k"), ("TCP_RX_SEG_SIZE", "256k")];
        assert_eq!(tuned_for((1, 17, 0), None, none), full);
        assert_eq!(tuned_for((1, 16, 2), None, none), both);
    }

    #[test]
    fn shared_memory_transport_lists_ask_for_no_peer_errors() {
        for tls in ["sm,self", "sm", "posix,sysv,cma,self", " shm , self "] {
            assert!(shared_memory_only(tls), "{tls}");
        }
        for tls in [
            "tcp",
            "sm,self,tcp",
            "^tcp",
            "all",
            "",
            "rc,sm",
            "cuda_copy,sm",
        ] {
            assert!(!shared_memory_only(tls), "{tls}");
        }
    }

    #[test]
    fn endpoint_failures_are_a_lost_peer() {
        for st in [-6, -24, -25, -80] {
            assert!(endpoint_failed(st), "{st}");
        }
        for st in [0, 1, -2, -3, -16] {
            assert!(!endpoint_failed(st), "{st}");
        }
    }

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
