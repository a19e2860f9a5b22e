//! comet-transport: how bytes and signals move between ranks.
//!
//! One [`Transport`] trait, whatever carries the bytes: the in-process
//! `local` transport (ranks as threads, for the CPU executor and tests),
//! NVLink peer memory, NCCL and UCX, each behind a cargo feature. Every
//! implementation ends in the same signal ABI (DESIGN.md section 4): a
//! 64-bit word per signal, raised after the data it guards is visible,
//! waited on for `word >= target` with a bound that becomes an error.

pub mod bootstrap;
#[cfg(any(feature = "nvlink", feature = "nccl"))]
pub mod cuda;
pub mod error;
pub mod gpu;
pub mod launch;
#[cfg(feature = "local")]
pub mod local;
#[cfg(feature = "nccl")]
pub mod nccl;
#[cfg(feature = "nvlink")]
pub mod nvlink;
pub mod signal_core;
pub mod transport;
#[cfg(feature = "ucx")]
pub mod ucx;

pub use error::TransportError;
pub use transport::{BufferId, Capabilities, Initiation, SignalId, SignalOp, Transport};

#[cfg(any(test, feature = "mock"))]
pub use transport::MockTransport;
