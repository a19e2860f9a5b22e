//! comet-sched: turns (config, routing, transport) into plans and runs them.
//!
//! Every rank derives the same layout plan and tile schedules from the
//! exchanged count matrix, then runs the two fused layers: tiles wait on
//! the transport's signals in their prologue and raise them in their
//! epilogue (DESIGN.md sections 3, 4 and 6). This crate holds the CPU
//! executor (ranks as threads over any `Transport`, one compute and one
//! communication worker per rank, mirroring the GPU's specialised thread
//! blocks) and the non-overlapped baseline executor used for comparison;
//! the plan of the device forward ([`device_plan`], pure Rust), and
//! (feature `gpu`) the device forward itself ([`forward::MoeLayer`]: tensors
//! in and out on the GPU, no host in the loop) with an in-process world of
//! W ranks for tests and benchmarks ([`device_world`]). Host-driven
//! transports run the same kernels through a proxy: [`proxy_plan`] derives
//! every piece of a device-forward call in the kernels' own buffer layout,
//! which [`staged`] carries over host-memory transports in readiness order
//! (on the GPU: `staged_device`, feature `gpu`) and [`nccl_proxy`]
//! schedules over NCCL's two-sided send/recv (per pair in one order on both
//! sides; on the GPU: `nccl_device`, feature `nccl`); `proxy_layer` runs
//! either beside the device layer on a thread of its own.

pub mod cpu;
pub mod device_plan;
#[cfg(feature = "gpu")]
pub mod device_world;
pub mod error;
#[cfg(feature = "gpu")]
pub mod forward;
pub mod host_memory;
#[cfg(feature = "nccl")]
pub mod nccl_device;
pub mod nccl_proxy;
mod protocol;
#[cfg(feature = "gpu")]
pub mod proxy_layer;
pub mod proxy_plan;
pub mod staged;
#[cfg(feature = "gpu")]
pub mod staged_device;
pub mod stream_queue;
pub mod tile_math;
pub mod trace;

pub use cpu::{CallStats, CpuRank, CpuWorld, ExecMode, ExecOptions, Fault, RankInput, RankOutput};
pub use error::SchedError;
pub use trace::{Trace, TraceSlice, Track};
