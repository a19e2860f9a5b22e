//! The `Transport` trait: symmetric buffers, puts, signals, bounded waits.
//!
//! Symmetric: every rank allocates the same buffers in the same order, so a
//! `BufferId` names the same buffer everywhere and a put addresses a peer's
//! copy by offset. A signal raised towards `dst` is ordered after every
//! earlier put from this rank to `dst` (release); a wait that returns has
//! seen that data (acquire). Device-initiated transports also hand their
//! peer pointers to kernels, which then perform the same protocol on the
//! GPU; host-driven ones are driven through these calls by a proxy.

use crate::error::TransportError;
use std::time::Duration;

/// Names a symmetric buffer; the same id on every rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BufferId(pub u32);

/// Index of a 64-bit signal word in every rank's signal array: the wire
/// index. comet-core's `SignalMap` numbers its signals from 0 after the
/// count exchange's words; its `SignalMap::wire` (a `WireSignal`) gives the
/// index to pass here.
pub type SignalId = u32;

/// How a signal word changes when raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalOp {
    /// Store the value (epochs: monotone, so never reset between calls).
    Set(u64),
    /// Add to the word (counters of finished tiles).
    Add(u64),
}

/// Who issues transfers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Initiation {
    /// GPU thread blocks store into peer memory and raise peer signals.
    Device,
    /// A host proxy posts transfers as tiles complete.
    Host,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    pub name: &'static str,
    pub initiation: Initiation,
    /// Whether buffers live in GPU memory.
    pub device_memory: bool,
}

#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
pub trait Transport: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    fn capabilities(&self) -> Capabilities;

    /// Collective: allocate a zeroed buffer of `bytes` on every rank.
    fn alloc_buffer(&self, bytes: usize) -> Result<BufferId, TransportError>;

    /// Collective: (re)size this rank's signal array to `count` words, all zero.
    fn alloc_signals(&self, count: usize) -> Result<(), TransportError>;

    /// Copy `data` into `dst`'s copy of `buf` at byte `offset`.
    fn put(
        &self,
        dst: usize,
        buf: BufferId,
        offset: usize,
        data: &[u8],
    ) -> Result<(), TransportError>;

    /// Raise signal `sig` on `dst`, after every earlier put from here to `dst`.
    fn signal(&self, dst: usize, sig: SignalId, op: SignalOp) -> Result<(), TransportError>;

    /// Wait until this rank's signal `sig` is at least `target`; returns its value.
    fn wait(&self, sig: SignalId, target: u64, timeout: Duration) -> Result<u64, TransportError>;

    /// Copy from this rank's copy of `buf` at `offset` into `out`.
    fn read(&self, buf: BufferId, offset: usize, out: &mut [u8]) -> Result<(), TransportError>;

    /// All ranks reach this point, or an error within `timeout`.
    fn barrier(&self, timeout: Duration) -> Result<(), TransportError>;

    /// Where this rank's copy of `buf` lies in host memory (address,
    /// bytes), when it is plain host memory that stays in place while the
    /// transport lives, so a staged proxy can have the GPU copy straight
    /// from it; None for device memory.
    fn host_memory(&self, buf: BufferId) -> Result<Option<(u64, usize)>, TransportError> {
        let _ = buf;
        Ok(None)
    }

    /// Fails with [`TransportError::PeerGone`] naming a peer this rank
    /// knows to be lost (its process or endpoint failed); Ok means nothing
    /// is known wrong. A layer whose kernels timed out waiting asks this to
    /// name the cause rather than the symptom.
    fn peers_alive(&self) -> Result<(), TransportError> {
        Ok(())
    }
}

/// Checks that `peer` is a rank of `t`'s world.
pub fn check_rank(t: &dyn Transport, peer: usize) -> Result<(), TransportError> {
    if peer >= t.world() {
        return Err(TransportError::BadRank {
            rank: t.rank(),
            peer,
            world: t.world(),
        });
    }
    Ok(())
}
