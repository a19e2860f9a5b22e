//! What the GPU transports (`nvlink`, `nccl`) share: the extension trait
//! that hands device pointers to kernels, and the blob all-gather through
//! which ranks exchange IPC handles and NCCL unique ids.
//!
//! [`BlobExchange`] is the only thing these transports need from a
//! bootstrap: the TCP rendezvous of the `bootstrap` module implements it
//! for ranks in different processes, [`ThreadExchange`] for ranks that are
//! threads of one process.

use crate::error::TransportError;
#[cfg(any(feature = "nvlink", feature = "nccl"))]
use crate::transport::{BufferId, Transport};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// All-gather of byte blobs among the ranks of one world.
pub trait BlobExchange: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Every rank contributes `blob`; returns all blobs indexed by rank.
    /// Collective: every rank calls it the same number of times.
    fn all_gather(&self, blob: &[u8], timeout: Duration) -> Result<Vec<Vec<u8>>, TransportError>;
    fn barrier(&self, timeout: Duration) -> Result<(), TransportError> {
        self.all_gather(&[], timeout).map(|_| ())
    }
}

/// Collective: every rank of `ex` has the same `settings` (name, value
/// pairs in the same order; `what` they are, e.g. "settings" or "device
/// plan"), or one error on every rank naming the first that differs from
/// rank 0's: "rank 1 has max_tokens = 4096 where rank 0 has 8192".
/// Settings that size buffers or shape the protocol must agree, or a rank
/// would write past another's buffers or wait for signals never raised.
pub fn agree(
    ex: &dyn BlobExchange,
    what: &'static str,
    settings: &[(&str, String)],
    timeout: Duration,
) -> Result<(), TransportError> {
    let mine: String = settings
        .iter()
        .map(|(name, value)| format!("{name}={value}\n"))
        .collect();
    let all = ex.all_gather(mine.as_bytes(), timeout)?;
    let parse = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let first = parse(&all[0]);
    for (r, blob) in all.iter().enumerate().skip(1) {
        let theirs = parse(blob);
        let differs = first
            .lines()
            .zip(theirs.lines())
            .find(|(a, b)| a != b)
            .map(|(a, b)| (a.to_string(), b.to_string()));
        let detail = match differs {
            Some((a, b)) => {
                let (name, v0) = a.split_once('=').unwrap_or((&a, ""));
                let v = b.split_once('=').map_or(b.as_str(), |(_, v)| v);
                format!("rank {r} has {name} = {v} where rank 0 has {v0}")
            }
            None if first.lines().count() != theirs.lines().count() => {
                format!("rank {r} passed other settings than rank 0")
            }
            None => continue,
        };
        return Err(TransportError::Mismatch {
            rank: ex.rank(),
            what,
            detail: format!("{detail}: every rank of a layer must have the same {what}"),
        });
    }
    Ok(())
}

#[cfg(any(feature = "nvlink", feature = "nccl"))]
/// GPU-side view of a transport: the addresses kernels need.
///
/// Device-initiated transports (`nvlink`) map every peer's buffers and
/// signal words, so a kernel stores into a peer and raises its signal
/// itself; host-driven ones (`nccl`) return `None` for peers and raise the
/// local signal words from the stream when a transfer lands. Either way a
/// kernel waits on [`DeviceTransport::signals_ptr`] of its own rank with
/// the device half of the ABI (comet-kernels `signal.cuh`).
pub trait DeviceTransport: Transport {
    /// CUDA ordinal of this rank's device.
    fn device_ordinal(&self) -> usize;
    /// This rank's copy of `buf`.
    fn buffer_ptr(&self, buf: BufferId) -> Result<u64, TransportError>;
    /// `peer`'s copy of `buf` as addressable from this rank's device, or
    /// `None` when the transport cannot map peers.
    fn peer_buffer_ptr(&self, peer: usize, buf: BufferId) -> Result<Option<u64>, TransportError>;
    /// This rank's signal array (`alloc_signals` words).
    fn signals_ptr(&self) -> Result<u64, TransportError>;
    /// `peer`'s signal array as addressable from here, or `None`.
    fn peer_signals_ptr(&self, peer: usize) -> Result<Option<u64>, TransportError>;
    /// A zeroed 64-bit word where kernels of this rank record the first
    /// error (signal.cuh layout: code << 32 | signal index).
    fn error_word_ptr(&self) -> u64;
    /// Reads the error word; 0 means no kernel reported an error.
    fn read_error_word(&self) -> Result<u64, TransportError>;
    /// Clears the error word before the next launch.
    fn clear_error_word(&self) -> Result<(), TransportError>;
    /// The communication stream on which puts and signals are enqueued.
    fn comm_stream(&self) -> Arc<cudarc::driver::CudaStream>;
    /// Device-to-device put: `len` bytes at device address `src` (this
    /// rank's memory) into `dst`'s copy of `buf` at `offset`, enqueued on
    /// the communication stream. `src` must stay valid until the stream
    /// has run it.
    fn put_device(
        &self,
        dst: usize,
        buf: BufferId,
        offset: usize,
        src: u64,
        len: usize,
    ) -> Result<(), TransportError>;
}

/// What every rank of a GPU transport (`nvlink`, `nccl`) holds on its
/// device, and the calls on it that both make alike: its context, the
/// communication stream (puts, signals, NCCL steps), the poll stream (host
/// reads of signal and error words, which must not queue behind the
/// communication stream), the kernels' error word and the host-side
/// signal raiser. Driver errors name `backend` and `rank`.
#[cfg(any(feature = "nvlink", feature = "nccl"))]
pub(crate) struct RankDevice {
    pub backend: &'static str,
    pub rank: usize,
    pub ordinal: usize,
    pub ctx: Arc<cudarc::driver::CudaContext>,
    pub stream: Arc<cudarc::driver::CudaStream>,
    pub poll: Arc<cudarc::driver::CudaStream>,
    pub error_word: crate::cuda::ErrorWord,
    pub raise: crate::cuda::HostSignal,
}

#[cfg(any(feature = "nvlink", feature = "nccl"))]
impl RankDevice {
    /// Opens device `ordinal`'s context, the two streams and the error word.
    pub fn open(
        backend: &'static str,
        rank: usize,
        ordinal: usize,
    ) -> Result<Self, TransportError> {
        use crate::cuda;
        let err = |what: &str, e| cuda::driver_err(backend, rank, what, e);
        let ctx = cuda::open_context(ordinal).map_err(|e| err("open context", e))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| err("create communication stream", e))?;
        let poll = ctx.new_stream().map_err(|e| err("create poll stream", e))?;
        let error_word =
            cuda::ErrorWord::zeroed(&ctx).map_err(|e| err("allocate error word", e))?;
        Ok(Self {
            backend,
            rank,
            ordinal,
            raise: cuda::HostSignal::new(&ctx),
            ctx,
            stream,
            poll,
            error_word,
        })
    }

    pub fn err(&self, what: &str, e: cudarc::driver::DriverError) -> TransportError {
        crate::cuda::driver_err(self.backend, self.rank, what, e)
    }

    pub fn bind(&self) -> Result<(), TransportError> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| self.err("bind context", e))
    }

    pub fn read_error_word(&self) -> Result<u64, TransportError> {
        self.bind()?;
        self.error_word
            .read(&self.poll)
            .map_err(|e| self.err("read error word", e))
    }

    pub fn clear_error_word(&self) -> Result<(), TransportError> {
        self.bind()?;
        self.error_word
            .clear(&self.poll)
            .map_err(|e| self.err("clear error word", e))
    }

    /// A host `wait` on this rank's signal `sig`, whose word is at device
    /// address `addr`: polled through the poll stream. The caller binds
    /// the context first.
    pub fn wait_word(
        &self,
        addr: u64,
        sig: crate::transport::SignalId,
        target: u64,
        timeout: Duration,
    ) -> Result<u64, TransportError> {
        let read = |_: crate::signal_core::Round| {
            crate::cuda::read_word(&self.poll, addr).map_err(|e| self.err("poll signal", e))
        };
        crate::signal_core::wait_signal(self.rank, sig, target, timeout, read, std::thread::sleep)
    }
}

/// One measured (method, size) point of a GPU transport bench.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuBenchRow {
    pub method: String,
    pub bytes: usize,
    /// Bytes moved per second, one direction, over back-to-back repeats
    /// timed with device events.
    pub gb_per_s: f64,
    /// Median device time of one operation alone (events around it).
    pub device_us: f64,
    /// Median time from enqueueing on the host to the host seeing the
    /// receiver's signal (put + signal only; includes one 8-byte poll).
    pub host_us: Option<f64>,
}

struct ExchangeState {
    generation: u64,
    arrived: usize,
    slots: Vec<Option<Vec<u8>>>,
    last: Arc<Vec<Vec<u8>>>,
    broken: Option<String>,
}

/// In-process [`BlobExchange`] for ranks that are threads of one process.
pub struct ThreadExchange {
    rank: usize,
    world: usize,
    shared: Arc<(Mutex<ExchangeState>, Condvar)>,
}

impl ThreadExchange {
    /// The `world` handles of one in-process world, indexed by rank.
    pub fn world(world: usize) -> Vec<Arc<ThreadExchange>> {
        let shared = Arc::new((
            Mutex::new(ExchangeState {
                generation: 0,
                arrived: 0,
                slots: vec![None; world],
                last: Arc::new(Vec::new()),
                broken: None,
            }),
            Condvar::new(),
        ));
        (0..world)
            .map(|rank| {
                Arc::new(ThreadExchange {
                    rank,
                    world,
                    shared: Arc::clone(&shared),
                })
            })
            .collect()
    }
}

impl BlobExchange for ThreadExchange {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_gather(&self, blob: &[u8], timeout: Duration) -> Result<Vec<Vec<u8>>, TransportError> {
        let start = Instant::now();
        let (m, cv) = &*self.shared;
        let mut st = m.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(why) = &st.broken {
            return Err(TransportError::Bootstrap(format!(
                "rank {}: exchange is broken: {why}",
                self.rank
            )));
        }
        let gen = st.generation;
        st.slots[self.rank] = Some(blob.to_vec());
        st.arrived += 1;
        if st.arrived == self.world {
            let all: Vec<Vec<u8>> = st
                .slots
                .iter_mut()
                .map(|s| s.take().unwrap_or_default())
                .collect();
            st.last = Arc::new(all);
            st.arrived = 0;
            st.generation += 1;
            cv.notify_all();
            return Ok(st.last.as_ref().clone());
        }
        loop {
            if st.generation != gen {
                return Ok(st.last.as_ref().clone());
            }
            if let Some(why) = &st.broken {
                return Err(TransportError::Bootstrap(format!(
                    "rank {}: exchange is broken: {why}",
                    self.rank
                )));
            }
            let waited = start.elapsed();
            if waited >= timeout {
                let missing: Vec<usize> = st
                    .slots
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.is_none())
                    .map(|(r, _)| r)
                    .collect();
                let why = format!(
                    "rank {} gave up after {waited:?}; ranks {missing:?} never arrived",
                    self.rank
                );
                st.broken = Some(why.clone());
                cv.notify_all();
                return Err(TransportError::Bootstrap(why));
            }
            st = cv
                .wait_timeout(st, timeout - waited)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Ranks in different processes exchange through the TCP bootstrap.
impl BlobExchange for crate::bootstrap::Bootstrap {
    fn rank(&self) -> usize {
        crate::bootstrap::Bootstrap::rank(self)
    }

    fn world(&self) -> usize {
        crate::bootstrap::Bootstrap::world(self)
    }

    fn all_gather(&self, blob: &[u8], timeout: Duration) -> Result<Vec<Vec<u8>>, TransportError> {
        crate::bootstrap::Bootstrap::all_gather(self, blob, timeout).map_err(TransportError::from)
    }

    fn barrier(&self, timeout: Duration) -> Result<(), TransportError> {
        crate::bootstrap::Bootstrap::barrier(self, timeout).map_err(TransportError::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_agree_on_settings_or_all_name_the_first_difference() {
        let run = |tokens: [usize; 3]| -> Vec<Result<(), TransportError>> {
            let w = ThreadExchange::world(3);
            std::thread::scope(|s| {
                let handles: Vec<_> = w
                    .iter()
                    .map(|x| {
                        let t = tokens[x.rank()];
                        s.spawn(move || {
                            let settings = [
                                ("hidden", "4096".to_string()),
                                ("max_tokens", t.to_string()),
                            ];
                            agree(x.as_ref(), "settings", &settings, Duration::from_secs(10))
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            })
        };
        assert!(run([8192; 3]).iter().all(|r| r.is_ok()));
        for (rank, r) in run([8192, 8192, 4096]).into_iter().enumerate() {
            let e = r.unwrap_err().to_string();
            assert!(
                e.contains(&format!("rank {rank}: collective settings mismatch"))
                    && e.contains("rank 2 has max_tokens = 4096 where rank 0 has 8192"),
                "{e}"
            );
        }
    }

    #[test]
    fn thread_exchange_gathers_in_rank_order_many_rounds() {
        let w = ThreadExchange::world(4);
        std::thread::scope(|s| {
            for x in &w {
                s.spawn(move || {
                    for round in 0..200u32 {
                        let mine = vec![x.rank() as u8; (round as usize % 7) + x.rank()];
                        let all = x.all_gather(&mine, Duration::from_secs(10)).unwrap();
                        assert_eq!(all.len(), 4);
                        for (r, b) in all.iter().enumerate() {
                            assert_eq!(
                                b,
                                &vec![r as u8; (round as usize % 7) + r],
                                "round {round}"
                            );
                        }
                    }
                });
            }
        });
    }

    #[test]
    fn thread_exchange_times_out_naming_missing_ranks() {
        let w = ThreadExchange::world(3);
        let e = w[0]
            .all_gather(b"x", Duration::from_millis(30))
            .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("[1, 2]"), "{msg}");
        // The world is broken from then on: no later call hangs.
        assert!(w[1].all_gather(b"y", Duration::from_secs(30)).is_err());
    }
}
