//! The `nvlink` transport: symmetric GPU memory mapped into every rank.
//!
//! Every rank allocates each buffer and its signal array with `cuMemAlloc`
//! (never a stream-ordered pool: those are not peer-accessible) and the
//! ranks exchange their addresses through a [`BlobExchange`]:
//!
//! - ranks that are threads of one process (one GPU each in production, or
//!   all on one GPU for tests) use each other's device pointers directly,
//!   with peer access enabled between different GPUs;
//! - ranks in different processes (one per GPU under torchrun, or several
//!   sharing one GPU in tests) export CUDA IPC handles and map each other's
//!   allocations.
//!
//! So every rank holds a pointer to every peer's copy of every buffer and
//! signal array: kernels store into peers and raise their signals
//! themselves ([`DeviceTransport`]), and the host-side calls of
//! [`Transport`] do the same from a communication stream: a put is an
//! asynchronous copy into the peer's buffer, a signal is a
//! `cuStreamWriteValue64` (system-wide barrier first) enqueued after it on
//! the same stream, so it can never overtake the data; counters
//! (`SignalOp::Add`) use a one-thread release-add kernel. A host wait polls
//! the local signal word through a separate stream, bounded by its timeout.

pub mod bench;

use crate::cuda::{self, DeviceAlloc, IpcMapping, IPC_HANDLE_BYTES};
use crate::error::TransportError;
use crate::gpu::{BlobExchange, DeviceTransport, RankDevice, ThreadExchange};
use crate::signal_core::{buffer, check_range, locate, Owner, SignalSlots};
use crate::transport::{
    check_rank, BufferId, Capabilities, Initiation, SignalId, SignalOp, Transport,
};
use cudarc::driver::{CudaContext, CudaStream};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::Duration;

const BACKEND: &str = "nvlink";
const MAGIC: u32 = 0x434f_4e56; // "CONV"
const KIND_HELLO: u8 = 0;
const KIND_BUFFER: u8 = 1;
const KIND_SIGNALS: u8 = 2;

/// Settings of an [`NvlinkTransport`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NvlinkOptions {
    /// Bound of every collective step (setup, allocations, teardown).
    pub collective_timeout: Duration,
}

impl Default for NvlinkOptions {
    fn default() -> Self {
        Self {
            collective_timeout: Duration::from_secs(60),
        }
    }
}

/// One symmetric allocation: ours, and every rank's address as seen here.
struct SymAlloc {
    local: DeviceAlloc,
    /// Indexed by rank; our own entry is `local.ptr()`.
    addrs: Vec<u64>,
    /// IPC mappings of peers in other processes, closed on drop.
    maps: Vec<IpcMapping>,
}

struct State {
    buffers: Vec<SymAlloc>,
    signals: Option<(SymAlloc, SignalSlots)>,
}

/// One rank of an nvlink world.
pub struct NvlinkTransport {
    rank: usize,
    world: usize,
    dev: RankDevice,
    exchange: Arc<dyn BlobExchange>,
    opts: NvlinkOptions,
    /// Whether each rank shares our process (direct pointers) or not (IPC).
    same_process: Vec<bool>,
    state: RwLock<State>,
}

struct Blob {
    kind: u8,
    token: u64,
    ordinal: u32,
    bytes: u64,
    ptr: u64,
    handle: [u8; IPC_HANDLE_BYTES],
}

impl Blob {
    const LEN: usize = 4 + 1 + 8 + 4 + 8 + 8 + IPC_HANDLE_BYTES;

    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::LEN);
        v.extend_from_slice(&MAGIC.to_le_bytes());
        v.push(self.kind);
        v.extend_from_slice(&self.token.to_le_bytes());
        v.extend_from_slice(&self.ordinal.to_le_bytes());
        v.extend_from_slice(&self.bytes.to_le_bytes());
        v.extend_from_slice(&self.ptr.to_le_bytes());
        v.extend_from_slice(&self.handle);
        v
    }

    fn decode(b: &[u8]) -> Option<Blob> {
        if b.len() != Self::LEN || b[0..4] != MAGIC.to_le_bytes() {
            return None;
        }
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let mut handle = [0u8; IPC_HANDLE_BYTES];
        handle.copy_from_slice(&b[33..33 + IPC_HANDLE_BYTES]);
        Some(Blob {
            kind: b[4],
            token: u64_at(5),
            ordinal: u32::from_le_bytes(b[13..17].try_into().expect("4 bytes")),
            bytes: u64_at(17),
            ptr: u64_at(25),
            handle,
        })
    }
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        KIND_HELLO => "setup",
        KIND_BUFFER => "alloc_buffer",
        _ => "alloc_signals",
    }
}

impl NvlinkTransport {
    /// Collective: joins the world of `exchange` with device `ordinal`.
    /// Every rank of the world calls it at the same time.
    pub fn new(
        ordinal: usize,
        exchange: Arc<dyn BlobExchange>,
        opts: NvlinkOptions,
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
        if ordinal >= cuda::device_count() {
            return Err(TransportError::Backend {
                backend: BACKEND,
                rank,
                message: format!(
                    "device {ordinal} does not exist ({} devices)",
                    cuda::device_count()
                ),
            });
        }
        let dev = RankDevice::open(BACKEND, rank, ordinal)?;
        let hello = Blob {
            kind: KIND_HELLO,
            token: cuda::process_token(),
            ordinal: ordinal as u32,
            bytes: 0,
            ptr: 0,
            handle: [0; IPC_HANDLE_BYTES],
        };
        let all = exchange.all_gather(&hello.encode(), opts.collective_timeout)?;
        let blobs = decode_all(rank, KIND_HELLO, &all)?;
        let same_process: Vec<bool> = blobs.iter().map(|b| b.token == hello.token).collect();
        for (peer, b) in blobs.iter().enumerate() {
            if peer == rank || !same_process[peer] || b.ordinal as usize == ordinal {
                continue;
            }
            let pctx = cuda::open_context(b.ordinal as usize)
                .map_err(|e| dev.err("open peer context", e))?;
            if !cuda::can_access_peer(&dev.ctx, &pctx)
                .map_err(|e| dev.err("query peer access", e))?
            {
                return Err(TransportError::Backend {
                    backend: BACKEND,
                    rank,
                    message: format!(
                        "device {ordinal} cannot access device {} of rank {peer}",
                        b.ordinal
                    ),
                });
            }
            cuda::enable_peer_access(&dev.ctx, &pctx)
                .map_err(|e| dev.err("enable peer access", e))?;
        }
        tracing::debug!(rank, world, ordinal, ?same_process, "nvlink transport up");
        Ok(Self {
            rank,
            world,
            dev,
            exchange,
            opts,
            same_process,
            state: RwLock::new(State {
                buffers: Vec::new(),
                signals: None,
            }),
        })
    }

    /// One process, `ordinals.len()` ranks (rank r on device `ordinals[r]`;
    /// repeats allowed, e.g. all on device 0 for tests). The handles are
    /// then moved each to its own thread.
    pub fn in_process(
        ordinals: &[usize],
        opts: NvlinkOptions,
    ) -> Result<Vec<Self>, TransportError> {
        let ex = ThreadExchange::world(ordinals.len());
        let results: Vec<Result<Self, TransportError>> = std::thread::scope(|s| {
            let hs: Vec<_> = ordinals
                .iter()
                .zip(ex)
                .map(|(&o, x)| {
                    s.spawn(move || NvlinkTransport::new(o, x as Arc<dyn BlobExchange>, opts))
                })
                .collect();
            hs.into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(TransportError::Bootstrap(
                            "a rank's setup thread panicked".into(),
                        ))
                    })
                })
                .collect()
        });
        results.into_iter().collect()
    }

    /// The CUDA context of this rank's device.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.dev.ctx
    }

    /// Whether `peer` runs in this process (direct pointers, not IPC).
    pub fn peer_in_process(&self, peer: usize) -> bool {
        self.same_process.get(peer).copied().unwrap_or(false)
    }

    fn state(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Allocates locally, exchanges, and maps every peer's copy.
    fn symmetric(&self, kind: u8, bytes: usize) -> Result<SymAlloc, TransportError> {
        self.dev.bind()?;
        let local = DeviceAlloc::zeroed(&self.dev.ctx, bytes)
            .map_err(|e| self.dev.err(kind_name(kind), e))?;
        let needs_ipc = self.same_process.iter().any(|s| !s);
        let handle = if needs_ipc {
            local
                .ipc_handle()
                .map_err(|e| self.dev.err("export IPC handle", e))?
        } else {
            [0; IPC_HANDLE_BYTES]
        };
        let mine = Blob {
            kind,
            token: cuda::process_token(),
            ordinal: self.dev.ordinal as u32,
            bytes: bytes as u64,
            ptr: local.ptr(),
            handle,
        };
        let all = self
            .exchange
            .all_gather(&mine.encode(), self.opts.collective_timeout)?;
        let blobs = decode_all(self.rank, kind, &all)?;
        if let Some((peer, b)) = blobs
            .iter()
            .enumerate()
            .find(|(_, b)| b.bytes != bytes as u64)
        {
            return Err(TransportError::Mismatch {
                rank: self.rank,
                what: if kind == KIND_BUFFER {
                    "alloc_buffer"
                } else {
                    "alloc_signals"
                },
                detail: format!("{bytes} bytes here but {} on rank {peer}", b.bytes),
            });
        }
        let mut addrs = Vec::with_capacity(self.world);
        let mut maps = Vec::new();
        for (peer, b) in blobs.iter().enumerate() {
            if peer == self.rank || self.same_process[peer] {
                addrs.push(b.ptr);
            } else {
                let m = IpcMapping::open(&self.dev.ctx, &b.handle)
                    .map_err(|e| self.dev.err(&format!("open IPC handle of rank {peer}"), e))?;
                addrs.push(m.ptr());
                maps.push(m);
            }
        }
        Ok(SymAlloc { local, addrs, maps })
    }

    fn buffer_addr(
        &self,
        st: &State,
        rank: usize,
        buf: BufferId,
        offset: usize,
        len: usize,
        what: &str,
    ) -> Result<u64, TransportError> {
        let b = buffer(self.rank, &st.buffers, buf)?;
        check_range(
            self.rank,
            format_args!("{what} buffer {} on rank {rank}", buf.0),
            offset,
            len,
            b.local.bytes(),
        )?;
        Ok(b.addrs[rank] + offset as u64)
    }

    fn signal_addr(&self, st: &State, rank: usize, sig: SignalId) -> Result<u64, TransportError> {
        let on = if rank == self.rank {
            Owner::Local
        } else {
            Owner::Peer(rank)
        };
        let ((s, _), off) = locate(self.rank, st.signals.as_ref(), |(_, n)| *n, sig, on)?;
        Ok(s.addrs[rank] + off as u64)
    }

    /// Reads signal `sig` of this rank once.
    pub fn read_signal(&self, sig: SignalId) -> Result<u64, TransportError> {
        self.dev.bind()?;
        let addr = self.signal_addr(&self.state(), self.rank, sig)?;
        cuda::read_word(&self.dev.poll, addr).map_err(|e| self.dev.err("read signal", e))
    }

    /// Waits until every put and signal this rank enqueued has executed.
    pub fn synchronize(&self) -> Result<(), TransportError> {
        self.dev.bind()?;
        self.dev
            .stream
            .synchronize()
            .map_err(|e| self.dev.err("synchronize communication stream", e))
    }

    /// Collective teardown: finish our work, unmap peers, and free our
    /// memory only once no peer maps it any more.
    pub fn shutdown(self, timeout: Duration) -> Result<(), TransportError> {
        self.synchronize()?;
        self.exchange.barrier(timeout)?;
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        for b in st.buffers.iter_mut() {
            b.maps.clear();
        }
        if let Some((s, _)) = st.signals.as_mut() {
            s.maps.clear();
        }
        drop(st);
        self.exchange.barrier(timeout)
    }
}

fn decode_all(rank: usize, kind: u8, all: &[Vec<u8>]) -> Result<Vec<Blob>, TransportError> {
    all.iter()
        .enumerate()
        .map(|(peer, raw)| {
            let b = Blob::decode(raw).ok_or_else(|| TransportError::Mismatch {
                rank,
                what: "nvlink exchange",
                detail: format!(
                    "rank {peer} sent {} bytes that are not an nvlink {} record",
                    raw.len(),
                    kind_name(kind)
                ),
            })?;
            if b.kind != kind {
                return Err(TransportError::Mismatch {
                    rank,
                    what: "nvlink exchange",
                    detail: format!(
                        "rank {peer} is in {} while this rank is in {}",
                        kind_name(b.kind),
                        kind_name(kind)
                    ),
                });
            }
            Ok(b)
        })
        .collect()
}

impl Drop for NvlinkTransport {
    fn drop(&mut self) {
        // Best effort: what we enqueued must not run on freed memory.
        if self.dev.ctx.bind_to_thread().is_ok() {
            let _ = self.dev.stream.synchronize();
        }
    }
}

impl Transport for NvlinkTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            name: "nvlink",
            initiation: Initiation::Device,
            device_memory: true,
        }
    }

    fn alloc_buffer(&self, bytes: usize) -> Result<BufferId, TransportError> {
        let sym = self.symmetric(KIND_BUFFER, bytes)?;
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        st.buffers.push(sym);
        Ok(BufferId((st.buffers.len() - 1) as u32))
    }

    fn alloc_signals(&self, count: usize) -> Result<(), TransportError> {
        // Our pending signal writes target the old arrays: finish them first.
        self.synchronize()?;
        let sym = self.symmetric(KIND_SIGNALS, SignalSlots::new(count).bytes(self.rank)?)?;
        let old = {
            let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
            st.signals.replace((sym, SignalSlots::new(count)))
        };
        if let Some((mut old, _)) = old {
            old.maps.clear();
            // Free our old array only when no peer maps it any more.
            self.exchange.barrier(self.opts.collective_timeout)?;
            drop(old);
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
        let addr = self.buffer_addr(&self.state(), dst, buf, offset, data.len(), "put to")?;
        if data.is_empty() {
            return Ok(());
        }
        self.dev.bind()?;
        // SAFETY: `addr .. addr + len` was bounds-checked against the
        // symmetric buffer, which lives as long as `self`.
        unsafe { cuda::copy_htod_async(&self.dev.stream, addr, data) }
            .map_err(|e| self.dev.err("put", e))?;
        if cuda::is_pinned_host(data.as_ptr()) {
            // The copy engine reads pinned memory later; the caller's slice
            // is only borrowed for this call.
            self.synchronize()?;
        }
        Ok(())
    }

    fn signal(&self, dst: usize, sig: SignalId, op: SignalOp) -> Result<(), TransportError> {
        check_rank(self, dst)?;
        let addr = self.signal_addr(&self.state(), dst, sig)?;
        self.dev.bind()?;
        // SAFETY: `addr` is a live signal word of `dst`, mapped here.
        unsafe { self.dev.raise.raise(&self.dev.stream, addr, op) }
            .map_err(|e| self.dev.err("signal", e))
    }

    fn wait(&self, sig: SignalId, target: u64, timeout: Duration) -> Result<u64, TransportError> {
        self.dev.bind()?;
        let addr = self.signal_addr(&self.state(), self.rank, sig)?;
        self.dev.wait_word(addr, sig, target, timeout)
    }

    fn read(&self, buf: BufferId, offset: usize, out: &mut [u8]) -> Result<(), TransportError> {
        let addr = self.buffer_addr(&self.state(), self.rank, buf, offset, out.len(), "read of")?;
        if out.is_empty() {
            return Ok(());
        }
        // Our own puts to ourselves must have landed.
        self.synchronize()?;
        // SAFETY: bounds-checked above; `out` is exclusively borrowed.
        unsafe { cuda::copy_dtoh_sync(&self.dev.poll, out, addr) }
            .map_err(|e| self.dev.err("read", e))
    }

    fn barrier(&self, timeout: Duration) -> Result<(), TransportError> {
        self.synchronize()?;
        self.exchange.barrier(timeout)
    }
}

impl DeviceTransport for NvlinkTransport {
    fn device_ordinal(&self) -> usize {
        self.dev.ordinal
    }

    fn buffer_ptr(&self, buf: BufferId) -> Result<u64, TransportError> {
        self.buffer_addr(&self.state(), self.rank, buf, 0, 0, "address of")
    }

    fn peer_buffer_ptr(&self, peer: usize, buf: BufferId) -> Result<Option<u64>, TransportError> {
        check_rank(self, peer)?;
        self.buffer_addr(&self.state(), peer, buf, 0, 0, "address of")
            .map(Some)
    }

    fn signals_ptr(&self) -> Result<u64, TransportError> {
        self.signal_addr(&self.state(), self.rank, 0)
    }

    fn peer_signals_ptr(&self, peer: usize) -> Result<Option<u64>, TransportError> {
        check_rank(self, peer)?;
        self.signal_addr(&self.state(), peer, 0).map(Some)
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

    fn put_device(
        &self,
        dst: usize,
        buf: BufferId,
        offset: usize,
        src: u64,
        len: usize,
    ) -> Result<(), TransportError> {
        check_rank(self, dst)?;
        let addr = self.buffer_addr(&self.state(), dst, buf, offset, len, "put to")?;
        if len == 0 {
            return Ok(());
        }
        self.dev.bind()?;
        // SAFETY: the destination was bounds-checked; the caller guarantees
        // `src .. src + len` is live device memory until the stream runs.
        unsafe { cuda::copy_dtod_async(&self.dev.stream, addr, src, len) }
            .map_err(|e| self.dev.err("put_device", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_round_trips_and_rejects_garbage() {
        let b = Blob {
            kind: KIND_BUFFER,
            token: 7,
            ordinal: 3,
            bytes: 1 << 20,
            ptr: 0xdead_0000,
            handle: [5; IPC_HANDLE_BYTES],
        };
        let raw = b.encode();
        assert_eq!(raw.len(), Blob::LEN);
        let d = Blob::decode(&raw).unwrap();
        assert_eq!(
            (d.kind, d.token, d.ordinal, d.bytes, d.ptr, d.handle),
            (b.kind, 7, 3, 1 << 20, 0xdead_0000, [5; 64])
        );
        assert!(Blob::decode(&raw[1..]).is_none());
        assert!(Blob::decode(b"").is_none());
        let all = vec![raw.clone(), b"junk".to_vec()];
        let e = decode_all(0, KIND_BUFFER, &all).map(|_| ()).unwrap_err();
        assert!(e.to_string().contains("rank 1"), "{e}");
        let e = decode_all(0, KIND_SIGNALS, &[raw]).map(|_| ()).unwrap_err();
        assert!(e.to_string().contains("alloc_buffer"), "{e}");
    }

    #[test]
    fn no_gpu_is_a_clean_error() {
        if cuda::gpu_available() {
            return;
        }
        let x = ThreadExchange::world(1).pop().unwrap();
        let e = NvlinkTransport::new(0, x, NvlinkOptions::default())
            .map(|_| ())
            .unwrap_err();
        assert!(e.to_string().contains("no CUDA"), "{e}");
    }
}
