//! The error type of comet-sched: what failed, and on which rank.

use comet_core::CoreError;
use comet_transport::TransportError;
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SchedError {
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("rank {rank}: {message}")]
    Input { rank: usize, message: String },
    #[error("rank {rank}: {what} needs {needed} but the executor was built for {capacity}")]
    Capacity {
        rank: usize,
        what: &'static str,
        needed: usize,
        capacity: usize,
    },
    /// A GPU failure: a driver or kernel error, or a device wait that
    /// timed out (the message names the signal).
    #[error("rank {rank}: GPU: {message}")]
    Device { rank: usize, message: String },
    /// A kernel or driver error of the GPU layer, with its source.
    #[cfg(feature = "gpu")]
    #[error("rank {rank}: {source}")]
    Kernel {
        rank: usize,
        #[source]
        source: comet_kernels::KernelError,
    },
    /// A staged proxy's call ran past its timeout, waiting for `what`.
    #[error("rank {rank}: staged proxy timed out after {waited:?} waiting for {what}; {pending} piece(s) pending")]
    StagedTimeout {
        rank: usize,
        what: String,
        pending: usize,
        waited: Duration,
    },
    /// An NCCL proxy's call stood still for its timeout, waiting for
    /// `what` (the first piece still waiting, named).
    #[error("rank {rank}: nccl proxy timed out after {waited:?} in call {epoch} waiting for {what}; {in_flight} op(s) in flight")]
    NcclTimeout {
        rank: usize,
        epoch: u64,
        what: String,
        in_flight: usize,
        waited: Duration,
    },
    /// The driver of an NCCL proxy's scheduler broke its protocol: an op
    /// completed that is not in flight, a phase out of turn, a ready word
    /// that does not exist.
    #[error("rank {rank}: nccl proxy: {message}")]
    NcclProtocol { rank: usize, message: String },
    /// A staged proxy found a peer's bytes breaking the protocol (a
    /// token-once index past its pair's rows) or its device side's send
    /// order naming slots that do not exist.
    #[error("rank {rank}: staged proxy: {message}")]
    StagedProtocol { rank: usize, message: String },
    #[error("rank {rank} worker panicked: {message}")]
    Panicked { rank: usize, message: String },
}
