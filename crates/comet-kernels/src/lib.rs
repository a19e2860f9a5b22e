//! comet-kernels: CUDA C++ sources embedded as text and compiled at run
//! time by NVRTC for the GPU present, with the device half of the signal ABI.
//!
//! - [`nvrtc`]: loading NVRTC, compiling a [`nvrtc::CompileUnit`] to a cubin
//!   for a [`nvrtc::Target`], and the on-disk cache.
//! - [`variants`]: the grouped GEMM variants (template instantiations with
//!   explicit kernel names) the planner can choose; the CI gate compiles all.
//! - [`tiles`]: tile lists (pure Rust) built from expert row counts or from
//!   comet-core's layer schedules.
//! - [`gemm`]: loading and launching a variant on a GPU.

pub mod bench;
pub mod device;
pub mod error;
pub mod gemm;
pub mod nvrtc;
pub mod problem;
pub mod tiles;
pub mod variants;

pub use error::KernelError;
pub use gemm::{GemmArgs, GemmRuntime, HookArgs};
pub use nvrtc::{Compiler, Target};
pub use tiles::{TileDesc, TileList};
pub use variants::{Epilogue, Family, GemmVariant, Hooks};

/// The device half of the signal ABI, for other crates' kernels.
pub const SIGNAL_CUH: &str = include_str!("../kernels/signal.cuh");
