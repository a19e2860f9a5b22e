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
//! - [`forward`]: the kernels of the device forward around the GEMMs
//!   (route, layout, dispatch, combine, reduce) for comet-sched's MoeLayer.
//! - [`device`]: a problem's buffers on the GPU (poisoned output, error
//!   word) and host-driven signal raises; [`problem`]: host data and the
//!   f64 reference; [`mod@bench`]: the side-by-side benchmark.
//!
//! A fused layer launch from the scheduler looks like this (pointers are
//! the layer's buffers; `signals` may be peer or host-mapped memory):
//!
//! ```ignore
//! let rt = GemmRuntime::new(ctx)?;                       // picks sm_90a on H100/H200
//! let v = GemmVariant::new(rt.default_family(), Epilogue::SwiGlu,
//!                          Hooks { wait: true, raise: false });
//! let tiles = TileList::layer0(&layer0_schedule, cfg.ffn, &v)?;  // upload tiles + deps
//! let args = GemmArgs { a, b, c, tiles: d_tiles, num_tiles, total_rows, k: cfg.hidden,
//!     n: 2 * cfg.ffn, ldc: cfg.ffn, experts, scatter_idx: 0, scatter_w: 0, err,
//!     hooks: Some(HookArgs { signals, deps: d_deps, wait_target: epoch,
//!                            raise_value: epoch, timeout_ns }), split: None, device: None,
//!     gather: None, side: None };
//! unsafe { rt.launch(&v, &args, &stream)? };
//! // after the stream: gemm::check_error_word(err word) names a timed-out signal
//! ```
//!
//! B is per expert `[N, K]` row-major (K contiguous, like torch's
//! `Linear.weight`), i.e. the transpose of comet_core's `fc1`/`fc2`.

pub mod bench;
pub mod device;
pub mod error;
pub mod forward;
pub mod gemm;
pub mod nvrtc;
pub mod problem;
pub mod tiles;
pub mod variants;

pub use error::KernelError;
pub use gemm::{GemmArgs, GemmRuntime, HookArgs};
pub use nvrtc::{Compiler, Target};
pub use tiles::{TailSplit, TileDesc, TileList};
pub use variants::{Epilogue, Family, GemmVariant, Hooks};

/// The device half of the signal ABI, for other crates' kernels.
pub const SIGNAL_CUH: &str = include_str!("../kernels/signal.cuh");
