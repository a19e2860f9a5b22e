//! The one error type of every transport: each variant names the rank and
//! the resource involved, so a failure on one of many ranks can be traced.

use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum TransportError {
    #[error("rank {rank}: timed out after {waited:?} waiting for signal {signal} to reach {expected} (it is {observed})")]
    WaitTimeout {
        rank: usize,
        signal: u32,
        expected: u64,
        observed: u64,
        waited: Duration,
    },
    #[error("rank {rank}: peer {peer} is gone ({reason})")]
    PeerGone {
        rank: usize,
        peer: usize,
        reason: String,
    },
    #[error("rank {rank}: {what} out of bounds: offset {offset} + {len} bytes exceeds {size}")]
    OutOfBounds {
        rank: usize,
        what: String,
        offset: usize,
        len: usize,
        size: usize,
    },
    #[error("rank {rank}: peer rank {peer} is not in a world of {world}")]
    BadRank {
        rank: usize,
        peer: usize,
        world: usize,
    },
    #[error("rank {rank}: {what} was never allocated")]
    NotAllocated { rank: usize, what: String },
    #[error("rank {rank}: collective {what} mismatch: {detail}")]
    Mismatch {
        rank: usize,
        what: &'static str,
        detail: String,
    },
    #[error("bootstrap: {0}")]
    Bootstrap(String),
    #[error("{backend} on rank {rank}: {message}")]
    Backend {
        backend: &'static str,
        rank: usize,
        message: String,
    },
}
