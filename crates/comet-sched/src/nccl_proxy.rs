//! The NCCL side of the host proxy (issue 16, item 3): which two-sided
//! transfers one layer call needs, and when each rank posts them.
//!
//! NCCL point-to-point is two-sided: the k-th send from `a` to `b` meets
//! the k-th recv at `b` from `a`, and both must have the same size. So the
//! proxy of [`crate::proxy`] (one-sided puts, posted in readiness order)
//! does not carry over. Instead every rank derives the same ordered piece
//! list for the call ([`NcclCall`]): first the fixed-size count exchange,
//! then, from the count matrix it delivered, the dispatch segments and the
//! combine chunks. A [`PairScheduler`] per rank then posts sends pair by
//! pair in that order as ready words come up (pairs independent of each
//! other), posts every recv as soon as its size is known, and raises the
//! receiver's signal only once the recv has completed.
//!
//! Assumption about NCCL: ops of different ordered pairs must not block
//! each other, so each ordered pair `(a, b)` is a lane of its own (a
//! communicator per ordered pair, on its own stream); within a lane ops run
//! in posting order. The simulator of the tests plays exactly this model.
//!
//! Host logic only, free of CUDA: the GPU wiring (ready words in mapped
//! pinned memory, lanes, stream write-values after recvs) is not built yet.

mod pieces;
mod schedule;

pub use pieces::{decode_counts, NcclCall, NcclPiece, PieceKind, Place, ReadyMap, Region};
pub use schedule::{Action, Op, PairScheduler};

use thiserror::Error;

/// What went wrong in planning or driving the NCCL proxy.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum NcclProxyError {
    /// The layer's shape or its count matrix cannot be planned.
    #[error("nccl proxy plan: {0}")]
    Plan(String),
    /// The driver of a [`PairScheduler`] broke its protocol (named).
    #[error("rank {rank}: nccl proxy: {message}")]
    Protocol { rank: usize, message: String },
}
