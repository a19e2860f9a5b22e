//! The per-rank host proxy of host-driven transports (issue 16, item 1).
//!
//! Kernels of a host-driven transport (UCX, NCCL) cannot store into peer
//! memory, so instead of raising the receiver's signal they raise a local
//! "ready" word. The proxy polls those words; as each piece's word reaches
//! the call's target it posts the piece's transfers and then raises the
//! receiver's signal, with many pieces in flight, so the fused overlap
//! works where kernels cannot store into peers. Pieces go out in the order
//! they become ready, not in plan order.
//!
//! Ordering: a piece's signal is raised only after every put of that piece
//! was posted on the same transport, and the transport orders a signal
//! behind every earlier put from this rank to the same receiver
//! ([`Transport::signal`]), so a signal never overtakes its data.
//!
//! This is the host half only: it runs over any [`Transport`] and reads the
//! ready words through [`ReadyWords`], which tests implement with atomics.
//! The GPU wiring (kernels writing ready words into mapped pinned memory,
//! the staging of GPU rows into the source bytes) is not built yet.

use crate::error::SchedError;
use comet_transport::signal_core::{poll_bounded, Polled};
use comet_transport::{BufferId, SignalId, SignalOp, Transport, TransportError};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The local ready words that kernels raise and the proxy polls.
pub trait ReadyWords: Sync {
    /// Word `index`, read with acquire ordering (the staged bytes it
    /// guards are visible once it is seen). `index` is below
    /// [`Self::count`].
    fn load(&self, index: usize) -> u64;

    /// How many words there are.
    fn count(&self) -> usize;
}

impl ReadyWords for Vec<AtomicU64> {
    fn load(&self, index: usize) -> u64 {
        self[index].load(Ordering::Acquire)
    }

    fn count(&self) -> usize {
        self.len()
    }
}

/// One transfer of a piece: the source bytes `src` go to `dst`'s copy of
/// `buf` at byte `offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Put {
    pub dst: usize,
    pub buf: BufferId,
    pub offset: usize,
    pub src: Range<usize>,
}

/// The signal a piece raises on `dst` once its puts are posted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Raise {
    pub dst: usize,
    pub sig: SignalId,
    pub op: SignalOp,
}

/// A segment or chunk: posted once ready word `ready` is at least `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub ready: usize,
    pub target: u64,
    pub puts: Vec<Put>,
    pub raise: Option<Raise>,
}

/// What one [`Proxy::run`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Pieces posted.
    pub pieces: usize,
    /// Bytes put.
    pub bytes: usize,
    /// The most pieces found ready in one look over the pending ones: how
    /// far the kernels ran ahead of the proxy.
    pub max_ready_together: usize,
}

/// One rank's proxy over its transport.
pub struct Proxy<'t> {
    transport: &'t dyn Transport,
}

impl<'t> Proxy<'t> {
    pub fn new(transport: &'t dyn Transport) -> Self {
        Self { transport }
    }

    /// Posts every piece of `pieces` as its ready word in `words` reaches
    /// its target, reading the bytes of its puts from `src`, within one
    /// overall `timeout`. Checks the whole plan before posting anything.
    ///
    /// Errors: a malformed piece ([`SchedError::Input`], naming it); a
    /// transport error, at once ([`SchedError::Transport`]); past the
    /// deadline, [`SchedError::ProxyTimeout`] naming the first piece still
    /// pending and its ready word.
    pub fn run(
        &self,
        pieces: &[Piece],
        words: &dyn ReadyWords,
        src: &[u8],
        timeout: Duration,
    ) -> Result<ProxyStats, SchedError> {
        self.check(pieces, words, src)?;
        let mut stats = ProxyStats::default();
        let mut pending: Vec<usize> = (0..pieces.len()).collect();
        let start = Instant::now();
        let deadline = start + timeout;
        while !pending.is_empty() {
            // One bounded poll per batch of progress, so the back-off
            // starts over (spinning) after each piece that went out.
            let left = deadline.saturating_duration_since(Instant::now());
            let polled = poll_bounded(
                left,
                |_| self.post_ready(pieces, words, src, &mut pending, &mut stats),
                std::thread::sleep,
            )?;
            if let Polled::TimedOut(_) = polled {
                let i = pending[0];
                let p = &pieces[i];
                return Err(SchedError::ProxyTimeout {
                    rank: self.transport.rank(),
                    piece: i,
                    word: p.ready,
                    target: p.target,
                    observed: words.load(p.ready),
                    pending: pending.len(),
                    waited: start.elapsed(),
                });
            }
        }
        Ok(stats)
    }

    /// One look: posts every pending piece whose word is ready and drops it
    /// from `pending`. `Some` once something went out (or nothing is left).
    fn post_ready(
        &self,
        pieces: &[Piece],
        words: &dyn ReadyWords,
        src: &[u8],
        pending: &mut Vec<usize>,
        stats: &mut ProxyStats,
    ) -> Result<Option<()>, TransportError> {
        let before = pending.len();
        let mut result = Ok(());
        pending.retain(|&i| {
            if result.is_err() {
                return true;
            }
            let p = &pieces[i];
            if words.load(p.ready) < p.target {
                return true;
            }
            result = self.post(i, p, src, stats);
            result.is_err()
        });
        result?;
        let posted = before - pending.len();
        stats.max_ready_together = stats.max_ready_together.max(posted);
        Ok((posted > 0 || pending.is_empty()).then_some(()))
    }

    /// Posts piece `i`: every put, then its raise.
    fn post(
        &self,
        i: usize,
        p: &Piece,
        src: &[u8],
        stats: &mut ProxyStats,
    ) -> Result<(), TransportError> {
        for put in &p.puts {
            self.transport
                .put(put.dst, put.buf, put.offset, &src[put.src.clone()])?;
            stats.bytes += put.src.len();
        }
        if let Some(r) = p.raise {
            self.transport.signal(r.dst, r.sig, r.op)?;
        }
        stats.pieces += 1;
        tracing::trace!(
            rank = self.transport.rank(),
            piece = i,
            puts = p.puts.len(),
            "proxy posted piece"
        );
        Ok(())
    }

    /// Every index of the plan in range: ready words, source bytes, ranks.
    fn check(
        &self,
        pieces: &[Piece],
        words: &dyn ReadyWords,
        src: &[u8],
    ) -> Result<(), SchedError> {
        let rank = self.transport.rank();
        let world = self.transport.world();
        let bad = |i: usize, what: String| SchedError::Input {
            rank,
            message: format!("proxy piece {i}: {what}"),
        };
        for (i, p) in pieces.iter().enumerate() {
            if p.ready >= words.count() {
                return Err(bad(
                    i,
                    format!(
                        "ready word {} is not below the {} ready words",
                        p.ready,
                        words.count()
                    ),
                ));
            }
            for (j, put) in p.puts.iter().enumerate() {
                if put.src.start > put.src.end || put.src.end > src.len() {
                    return Err(bad(
                        i,
                        format!("put {j} reads source bytes {:?} of {}", put.src, src.len()),
                    ));
                }
                if put.dst >= world {
                    return Err(bad(
                        i,
                        format!("put {j} goes to rank {} of a world of {world}", put.dst),
                    ));
                }
            }
            if let Some(r) = p.raise {
                if r.dst >= world {
                    return Err(bad(
                        i,
                        format!(
                            "raises signal {} on rank {} of a world of {world}",
                            r.sig, r.dst
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}
