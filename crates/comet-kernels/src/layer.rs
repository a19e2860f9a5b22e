//! The small kernels around a layer's grouped GEMMs (kernels/layer_helpers.cu)
//! and device fills, for comet-sched's GPU executor: the combine-side
//! reduce that waits (bounded) on each column chunk's combine signals, and
//! NaN poisoning of outputs. A kernel-launch module: the parameter struct
//! mirrors `comet::ReduceParams` byte for byte.

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::sys::{self, CUdeviceptr};
use cudarc::driver::{CudaContext, CudaFunction, CudaStream};

use crate::error::KernelError;
use crate::gemm::driver_version;
use crate::nvrtc::{CompileUnit, Compiler, Target};

const LAYER_CU: &str = include_str!("../kernels/layer_helpers.cu");
const SIGNAL_CUH: &str = include_str!("../kernels/signal.cuh");
const REDUCE: &str = "comet_layer_reduce";
const REDUCE_THREADS: u32 = 512;

/// The NVRTC unit of the layer helpers (the CI gate may compile it too).
pub fn layer_helpers_unit() -> CompileUnit {
    CompileUnit {
        name: "comet_layer_helpers".into(),
        source: LAYER_CU.into(),
        headers: BTreeMap::from([("signal.cuh".to_string(), SIGNAL_CUH.to_string())]),
        extra_options: vec![],
    }
}

/// One chunked combine reduce (all pointers device pointers).
#[derive(Debug, Clone, Copy)]
pub struct ReduceArgs {
    /// bf16 `[chunks][rows_sent][cols]`.
    pub comb: CUdeviceptr,
    /// i32 `[tokens * k]`: position of each slot in the send order.
    pub pos: CUdeviceptr,
    /// f32 `[tokens * k]`: routing weights.
    pub w: CUdeviceptr,
    /// f32 `[tokens, hidden]`, fully written.
    pub y: CUdeviceptr,
    /// Signal array the `waits` indices refer to.
    pub signals: CUdeviceptr,
    /// u32 `[chunks][nwait]` signal indices, each waited for `>= target`.
    pub waits: CUdeviceptr,
    pub err: CUdeviceptr,
    pub target: u64,
    pub timeout_ns: u64,
    pub tokens: usize,
    pub k: usize,
    pub hidden: usize,
    pub cols: usize,
    pub chunks: usize,
    pub rows_sent: usize,
    pub nwait: usize,
    /// Upper bound on blocks (waiting blocks hold SMs other ranks may need).
    pub max_blocks: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct ReduceParamsC {
    comb: u64,
    pos: u64,
    w: u64,
    y: u64,
    signals: u64,
    waits: u64,
    err: u64,
    target: u64,
    timeout_ns: u64,
    tokens: i32,
    k: i32,
    hidden: i32,
    cols: i32,
    chunks: i32,
    rows_sent: i32,
    nwait: i32,
    pad: i32,
}

const _: () = assert!(std::mem::size_of::<ReduceParamsC>() == 104);

fn i32_of(v: usize, what: &str) -> Result<i32, KernelError> {
    i32::try_from(v)
        .map_err(|_| KernelError::InvalidShape(format!("{what} = {v} does not fit in i32")))
}

/// The loaded layer helper kernels of one context.
pub struct LayerKernels {
    reduce: CudaFunction,
}

impl LayerKernels {
    /// Compiles (or loads from the kernel cache) and loads the helpers.
    pub fn load(ctx: &Arc<CudaContext>) -> Result<LayerKernels, KernelError> {
        let (major, minor) = ctx.compute_capability()?;
        let target = Target::for_compute_capability(major as u32, minor as u32)?;
        let cubin = Compiler::with_default_cache(driver_version())
            .compile(&layer_helpers_unit(), target)?;
        let module = ctx.load_module(cudarc::nvrtc::Ptx::from_binary(cubin))?;
        Ok(LayerKernels {
            reduce: module.load_function(REDUCE)?,
        })
    }

    /// Launches the reduce on `stream`; nothing when there are no tokens.
    ///
    /// # Safety
    /// Every pointer must be a live device allocation of this context, large
    /// enough for the shapes given, until the kernel ends.
    pub unsafe fn reduce(&self, a: &ReduceArgs, stream: &CudaStream) -> Result<(), KernelError> {
        if a.tokens == 0 || a.chunks == 0 {
            return Ok(());
        }
        if a.cols == 0 || a.cols * a.chunks != a.hidden || a.k == 0 {
            return Err(KernelError::InvalidShape(format!(
                "reduce: {} chunks of {} columns do not make hidden {} (k {})",
                a.chunks, a.cols, a.hidden, a.k
            )));
        }
        if a.nwait == 0 || a.rows_sent < a.tokens * a.k {
            return Err(KernelError::InvalidShape(format!(
                "reduce: {} rows sent for {} tokens x k {}, {} signals per chunk",
                a.rows_sent, a.tokens, a.k, a.nwait
            )));
        }
        if [a.comb, a.pos, a.w, a.y, a.signals, a.waits, a.err].contains(&0) {
            return Err(KernelError::InvalidShape("reduce: null pointer".into()));
        }
        let mut p = ReduceParamsC {
            comb: a.comb,
            pos: a.pos,
            w: a.w,
            y: a.y,
            signals: a.signals,
            waits: a.waits,
            err: a.err,
            target: a.target,
            timeout_ns: a.timeout_ns,
            tokens: i32_of(a.tokens, "tokens")?,
            k: i32_of(a.k, "k")?,
            hidden: i32_of(a.hidden, "hidden")?,
            cols: i32_of(a.cols, "cols")?,
            chunks: i32_of(a.chunks, "chunks")?,
            rows_sent: i32_of(a.rows_sent, "rows sent")?,
            nwait: i32_of(a.nwait, "signals per chunk")?,
            pad: 0,
        };
        let want = (a.tokens * a.cols).div_ceil(REDUCE_THREADS as usize);
        let grid = (want.min(a.max_blocks.max(1) as usize)).max(1) as u32;
        let mut params = [&mut p as *mut ReduceParamsC as *mut c_void];
        // SAFETY: one parameter laid out as the kernel's ReduceParams;
        // pointer validity is the caller's contract.
        unsafe {
            cudarc::driver::result::launch_kernel(
                self.reduce.cu_function(),
                (grid, 1, 1),
                (REDUCE_THREADS, 1, 1),
                0,
                stream.cu_stream(),
                &mut params,
            )
        }?;
        Ok(())
    }
}

/// Fills `count` 16-bit words at `ptr` with `value` on `stream`
/// (0xFFFF: bf16 NaN, to poison outputs).
///
/// # Safety
/// `ptr .. ptr + 2 * count` must be live device memory of the stream's context.
pub unsafe fn fill_u16(
    stream: &CudaStream,
    ptr: CUdeviceptr,
    value: u16,
    count: usize,
) -> Result<(), KernelError> {
    if count == 0 {
        return Ok(());
    }
    // SAFETY: the caller guarantees the range.
    unsafe { sys::cuMemsetD16Async(ptr, value, count, stream.cu_stream()) }
        .result()
        .map_err(KernelError::Driver)
}

/// Fills `count` 32-bit words at `ptr` with `value` on `stream`
/// (0x7FC0_0000: f32 NaN).
///
/// # Safety
/// `ptr .. ptr + 4 * count` must be live device memory of the stream's context.
pub unsafe fn fill_u32(
    stream: &CudaStream,
    ptr: CUdeviceptr,
    value: u32,
    count: usize,
) -> Result<(), KernelError> {
    if count == 0 {
        return Ok(());
    }
    // SAFETY: the caller guarantees the range.
    unsafe { sys::cuMemsetD32Async(ptr, value, count, stream.cu_stream()) }
        .result()
        .map_err(KernelError::Driver)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_helpers_compile() {
        if let Err(e) = crate::nvrtc::ensure_nvrtc() {
            eprintln!("skipping: {e}");
            return;
        }
        for t in [Target::SM80, Target::SM90A] {
            if let Err(e) = crate::nvrtc::compile_cubin(&layer_helpers_unit(), t) {
                panic!("{e}");
            }
        }
    }
}
