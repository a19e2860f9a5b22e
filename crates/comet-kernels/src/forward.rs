//! The kernels of the device forward around the two grouped GEMMs
//! (kernels/moe_forward.cu): route, layout, dispatch, wait, combine and
//! reduce, plus device fills for poisoning. A kernel-launch module: each
//! parameter struct mirrors its C struct byte for byte (size asserts
//! below), and every launch is `unsafe` because the structs carry raw
//! device pointers.

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::sys::{self, CUdeviceptr, CUstream};
use cudarc::driver::{CudaContext, CudaFunction};

use crate::error::KernelError;
use crate::gemm::{driver_version, load_function};
use crate::nvrtc::{CompileUnit, Compiler, Target};

const FORWARD_CU: &str = include_str!("../kernels/moe_forward.cu");
const COMMON_CUH: &str = include_str!("../kernels/gemm_common.cuh");
const ROWS_CUH: &str = include_str!("../kernels/moe_rows.cuh");
const SIGNAL_CUH: &str = include_str!("../kernels/signal.cuh");

/// Threads of the route, layout, dispatch, combine and reduce blocks.
pub const BLOCK_THREADS: u32 = 512;
/// Dynamic shared memory the layout kernel may use (set on load).
pub const LAYOUT_SMEM_MAX: usize = 96 * 1024;

/// The NVRTC unit of the forward kernels (the CI gate compiles it too).
pub fn forward_unit() -> CompileUnit {
    CompileUnit {
        name: "comet_moe_forward".into(),
        source: FORWARD_CU.into(),
        headers: BTreeMap::from([
            ("gemm_common.cuh".to_string(), COMMON_CUH.to_string()),
            ("moe_rows.cuh".to_string(), ROWS_CUH.to_string()),
            ("signal.cuh".to_string(), SIGNAL_CUH.to_string()),
        ]),
        extra_options: vec![],
    }
}

/// Shared memory of the layout kernel for `ranks` x `experts`.
pub fn layout_smem_bytes(ranks: usize, experts: usize) -> usize {
    let epr = experts / ranks.max(1);
    4 * (ranks * experts + 2 * epr + 5 * experts + 2)
}

/// What the layout kernel derived for this call (mirrors `comet::Scalars`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scalars {
    /// 1 when every rank's rows fit its receive capacity.
    pub ok: i32,
    pub recv_rows: i32,
    pub sent_rows: i32,
    pub row_tiles: i32,
    pub fc1_tiles: i32,
    pub fc2_tiles: i32,
    pub pad: [i32; 2],
    /// FC2 tiles of one column chunk (all expert groups).
    pub chunk_tiles: u64,
}

/// One expert group's runs of the tile lists (mirrors `comet::GroupTiles`):
/// its FC1 and FC2 launches start at `fc*_first` and run `fc*_tiles`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupTiles {
    pub fc1_first: i32,
    pub fc1_tiles: i32,
    pub fc2_first: i32,
    pub fc2_tiles: i32,
    /// FC2 tiles of one of the group's column chunks.
    pub piece_tiles: i32,
    pub pad: [i32; 3],
}

/// The most expert groups the device layout handles (`MAX_GROUPS`), the
/// cost model's limit too.
pub const MAX_GROUPS: usize = 16;
const _: () = assert!(MAX_GROUPS == comet_core::cost::MAX_GROUPS);

/// `comet::RouteParams`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct RouteParams {
    pub ids: CUdeviceptr,
    pub cnt: CUdeviceptr,
    pub local_idx: CUdeviceptr,
    pub epoch: CUdeviceptr,
    pub err: CUdeviceptr,
    pub slots: i32,
    pub experts: i32,
    pub ids_i64: i32,
    pub pad: i32,
}

/// `comet::LayoutParams`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct LayoutParams {
    pub cnt: CUdeviceptr,
    pub ids: CUdeviceptr,
    pub local_idx: CUdeviceptr,
    pub counts: CUdeviceptr,
    pub peer_counts: CUdeviceptr,
    pub peer_signals: CUdeviceptr,
    pub signals: CUdeviceptr,
    pub epoch: CUdeviceptr,
    pub err: CUdeviceptr,
    pub sc: CUdeviceptr,
    pub send_off: CUdeviceptr,
    pub dest_row: CUdeviceptr,
    pub segs: CUdeviceptr,
    pub rows_from: CUdeviceptr,
    pub send_slots: CUdeviceptr,
    pub fc1: CUdeviceptr,
    pub fc2: CUdeviceptr,
    pub group_tiles: CUdeviceptr,
    pub timeout_ns: u64,
    pub slots: i32,
    pub experts: i32,
    pub ranks: i32,
    pub me: i32,
    pub epr: i32,
    pub ids_i64: i32,
    pub recv_cap: i32,
    pub bm: i32,
    pub ncol1: i32,
    pub bn1: i32,
    pub nc2: i32,
    pub bn2: i32,
    pub cols: i32,
    pub chunks: i32,
    /// FC1 column tiles per raster group ([`crate::tiles::raster_group`]).
    pub group1: i32,
    /// FC2 column tiles per raster group.
    pub group2: i32,
    /// Expert groups, 1..=min(experts per rank, [`MAX_GROUPS`]).
    pub groups: i32,
    pub pad: i32,
}

/// `comet::DispatchParams`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct DispatchParams {
    pub x: CUdeviceptr,
    pub ids: CUdeviceptr,
    pub local_idx: CUdeviceptr,
    pub send_slots: CUdeviceptr,
    pub send_off: CUdeviceptr,
    pub dest_row: CUdeviceptr,
    pub cnt: CUdeviceptr,
    pub seg_done: CUdeviceptr,
    pub peer_recv: CUdeviceptr,
    pub peer_signals: CUdeviceptr,
    pub sc: CUdeviceptr,
    pub epoch: CUdeviceptr,
    /// i32 per receive row, or 0. Set (one rank, FC1 gathering x): the
    /// sequential dispatch writes each row's token there instead of
    /// copying the row.
    pub gather_rows: CUdeviceptr,
    pub hidden: i32,
    pub k: i32,
    pub experts: i32,
    pub epr: i32,
    pub ranks: i32,
    pub me: i32,
    pub ids_i64: i32,
    pub tokens: i32,
}

/// `comet::WaitParams`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct WaitParams {
    pub signals: CUdeviceptr,
    pub sc: CUdeviceptr,
    pub epoch: CUdeviceptr,
    pub err: CUdeviceptr,
    pub timeout_ns: u64,
    pub first: i32,
    pub count: i32,
}

/// `comet::CombineParams`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct CombineParams {
    pub out: CUdeviceptr,
    pub segs: CUdeviceptr,
    pub rows_from: CUdeviceptr,
    pub group_tiles: CUdeviceptr,
    pub chunk_done: CUdeviceptr,
    pub comb_done: CUdeviceptr,
    pub peer_comb: CUdeviceptr,
    pub peer_signals: CUdeviceptr,
    pub sc: CUdeviceptr,
    pub epoch: CUdeviceptr,
    pub err: CUdeviceptr,
    pub timeout_ns: u64,
    pub hidden: i32,
    pub cols: i32,
    pub chunks: i32,
    pub groups: i32,
    pub epr: i32,
    pub ranks: i32,
    pub me: i32,
    pub wait_chunks: i32,
    pub chunk_sig0: i32,
    /// The pieces `[piece_begin, piece_end)` this launch sends back.
    pub piece_begin: i32,
    pub piece_end: i32,
    pub pad: i32,
}

/// `comet::ReduceParams`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ReduceParams {
    pub out: CUdeviceptr,
    pub comb: CUdeviceptr,
    pub ids: CUdeviceptr,
    pub w: CUdeviceptr,
    pub local_idx: CUdeviceptr,
    pub send_off: CUdeviceptr,
    pub segs: CUdeviceptr,
    pub y: CUdeviceptr,
    pub signals: CUdeviceptr,
    pub sc: CUdeviceptr,
    pub epoch: CUdeviceptr,
    pub err: CUdeviceptr,
    pub chunk_done: CUdeviceptr,
    pub group_tiles: CUdeviceptr,
    pub timeout_ns: u64,
    pub tokens: i32,
    pub k: i32,
    pub hidden: i32,
    pub cols: i32,
    pub chunks: i32,
    pub groups: i32,
    pub epr: i32,
    pub ranks: i32,
    pub me: i32,
    pub ids_i64: i32,
    pub w_bf16: i32,
    pub wait_chunks: i32,
    pub chunk_sig0: i32,
    pub chunk_begin: i32,
    pub chunk_end: i32,
    pub pad: i32,
}

const _: () = assert!(std::mem::size_of::<Scalars>() == 40);
const _: () = assert!(std::mem::size_of::<GroupTiles>() == 32);
const _: () = assert!(std::mem::size_of::<RouteParams>() == 56);
const _: () = assert!(std::mem::size_of::<LayoutParams>() == 224);
const _: () = assert!(std::mem::size_of::<DispatchParams>() == 136);
const _: () = assert!(std::mem::size_of::<WaitParams>() == 48);
const _: () = assert!(std::mem::size_of::<CombineParams>() == 144);
const _: () = assert!(std::mem::size_of::<ReduceParams>() == 184);

/// `comet::FillParams`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FillParams {
    pub dst: CUdeviceptr,
    pub n: i64,
    pub seed: u64,
    pub scale: f32,
    pub pad: i32,
}

const _: () = assert!(std::mem::size_of::<FillParams>() == 32);

/// `comet::StatusParams`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct StatusParams {
    err: CUdeviceptr,
    status: CUdeviceptr,
}

const _: () = assert!(std::mem::size_of::<StatusParams>() == 16);

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ExpandParams {
    pub tokens: CUdeviceptr,
    pub index: CUdeviceptr,
    pub dst: CUdeviceptr,
    pub rows: i64,
    pub vecs: i32,
    pub pitch: i32,
}

const _: () = assert!(std::mem::size_of::<ExpandParams>() == 40);

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct SumParams {
    pub src: CUdeviceptr,
    pub starts: CUdeviceptr,
    pub rows: CUdeviceptr,
    pub ratio: CUdeviceptr,
    pub dst: CUdeviceptr,
    pub slots: i64,
    pub vecs: i32,
    pub pitch: i32,
}

const _: () = assert!(std::mem::size_of::<SumParams>() == 56);

/// `comet::CopyParams`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct CopyParams {
    src: CUdeviceptr,
    dst: CUdeviceptr,
    src_pitch: i64,
    dst_pitch: i64,
    rows: i64,
    width: i64,
    vec: i32,
    pad: i32,
}

const _: () = assert!(std::mem::size_of::<CopyParams>() == 56);

/// The widest move (16, 4 or 1 bytes) dividing every address, pitch and
/// width of a copy from `src` rows to `dst` rows.
fn copy_vector(src: Rows, dst: Rows) -> usize {
    let all = [
        src.at as usize,
        dst.at as usize,
        src.pitch,
        dst.pitch,
        src.width,
    ];
    [16, 4]
        .into_iter()
        .find(|&v| all.iter().all(|x| x.is_multiple_of(v)))
        .unwrap_or(1)
}

/// Rows of `width` bytes, `pitch` apart from `at` (device addresses):
/// the rows of a piece as a staged proxy's kernels read or write them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rows {
    pub at: CUdeviceptr,
    pub rows: usize,
    pub width: usize,
    pub pitch: usize,
}

/// What the staged proxy's kernels need of a piece's rows: 16-byte vectors,
/// 16-byte aligned. Public so a proxy's tests can hold the addresses it
/// computes against it.
pub fn check_rows(r: Rows, what: &str) -> Result<(), KernelError> {
    let sixteen = [r.at as usize, r.width, r.pitch]
        .iter()
        .all(|x| x.is_multiple_of(16));
    if r.rows == 0 || (sixteen && r.width <= r.pitch && r.pitch <= i32::MAX as usize) {
        return Ok(());
    }
    Err(KernelError::InvalidShape(format!(
        "{what} needs rows of a multiple of 16 bytes, 16-byte aligned and a multiple of 16 apart \
         ({} rows of {} bytes, {} apart, at {:#x})",
        r.rows, r.width, r.pitch, r.at
    )))
}

/// Grid and dynamic shared memory of one launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid {
    pub blocks: u32,
    pub smem: u32,
}

impl Grid {
    pub fn blocks(blocks: u32) -> Grid {
        Grid {
            blocks: blocks.max(1),
            smem: 0,
        }
    }
}

/// The forward kernels loaded in one context.
pub struct ForwardKernels {
    route: CudaFunction,
    layout: CudaFunction,
    dispatch: CudaFunction,
    dispatch_tokens: CudaFunction,
    wait: CudaFunction,
    status: CudaFunction,
    combine: CudaFunction,
    reduce: CudaFunction,
    fill: CudaFunction,
    expand: CudaFunction,
    sum: CudaFunction,
    copy: CudaFunction,
}

impl ForwardKernels {
    /// Compiles (or loads from the kernel cache) and loads the kernels.
    pub fn load(ctx: &Arc<CudaContext>) -> Result<ForwardKernels, KernelError> {
        let (major, minor) = ctx.compute_capability()?;
        let target = Target::for_compute_capability(major as u32, minor as u32)?;
        let cubin =
            Compiler::with_default_cache(driver_version()).compile(&forward_unit(), target)?;
        let module = ctx.load_module(cudarc::nvrtc::Ptx::from_binary(cubin))?;
        let layout = load_function(&module, "comet_layout")?;
        // SAFETY: a plain attribute call on a function handle of this module.
        unsafe {
            sys::cuFuncSetAttribute(
                layout.cu_function(),
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                LAYOUT_SMEM_MAX as i32,
            )
        }
        .result()?;
        Ok(ForwardKernels {
            route: load_function(&module, "comet_route")?,
            layout,
            dispatch: load_function(&module, "comet_dispatch")?,
            dispatch_tokens: load_function(&module, "comet_dispatch_tokens")?,
            wait: load_function(&module, "comet_wait_signals")?,
            status: load_function(&module, "comet_store_status")?,
            combine: load_function(&module, "comet_combine")?,
            reduce: load_function(&module, "comet_reduce")?,
            fill: load_function(&module, "comet_fill_random")?,
            expand: load_function(&module, "comet_expand_rows")?,
            sum: load_function(&module, "comet_sum_rows")?,
            copy: load_function(&module, "comet_copy_runs")?,
        })
    }

    /// # Safety
    /// Every pointer in `p` is live device memory of this context, sized as
    /// kernels/moe_forward.cu documents, until the kernel ends.
    pub unsafe fn route(&self, p: &RouteParams, g: Grid, s: CUstream) -> Result<(), KernelError> {
        // SAFETY: forwarded contract.
        unsafe { launch(&self.route, g, BLOCK_THREADS, s, p) }
    }

    /// # Safety
    /// As [`ForwardKernels::route`].
    pub unsafe fn layout(&self, p: &LayoutParams, g: Grid, s: CUstream) -> Result<(), KernelError> {
        if g.smem as usize > LAYOUT_SMEM_MAX {
            return Err(KernelError::InvalidShape(format!(
                "layout needs {} bytes of shared memory (at most {LAYOUT_SMEM_MAX}): \
                 too many ranks x experts",
                g.smem
            )));
        }
        // SAFETY: forwarded contract.
        unsafe { launch(&self.layout, g, BLOCK_THREADS, s, p) }
    }

    /// # Safety
    /// As [`ForwardKernels::route`].
    pub unsafe fn dispatch(
        &self,
        p: &DispatchParams,
        g: Grid,
        s: CUstream,
    ) -> Result<(), KernelError> {
        // SAFETY: forwarded contract.
        unsafe { launch(&self.dispatch, g, BLOCK_THREADS, s, p) }
    }

    /// The sequential dispatch (a warp per token, x read once).
    ///
    /// # Safety
    /// As [`ForwardKernels::route`].
    pub unsafe fn dispatch_tokens(
        &self,
        p: &DispatchParams,
        g: Grid,
        s: CUstream,
    ) -> Result<(), KernelError> {
        // SAFETY: forwarded contract.
        unsafe { launch(&self.dispatch_tokens, g, BLOCK_THREADS, s, p) }
    }

    /// # Safety
    /// As [`ForwardKernels::route`].
    pub unsafe fn wait(&self, p: &WaitParams, s: CUstream) -> Result<(), KernelError> {
        // SAFETY: forwarded contract.
        unsafe { launch(&self.wait, Grid::blocks(1), 256, s, p) }
    }

    /// Stores the device word at `err` into `status` on stream `s`, by a
    /// kernel: a device-to-host copy queued behind a call's kernels can
    /// hold back other streams' device-to-host copies.
    ///
    /// # Safety
    /// `err` is a live 8-byte device word of this context.
    pub unsafe fn store_status(
        &self,
        err: CUdeviceptr,
        status: &StatusWord,
        s: CUstream,
    ) -> Result<(), KernelError> {
        let p = StatusParams {
            err,
            status: status.device_ptr,
        };
        // SAFETY: `err` per the caller; `status` is the device address of a
        // live mapped pinned word, owned by `status`.
        unsafe { launch(&self.status, Grid::blocks(1), 32, s, &p) }
    }

    /// # Safety
    /// As [`ForwardKernels::route`].
    pub unsafe fn combine(
        &self,
        p: &CombineParams,
        g: Grid,
        s: CUstream,
    ) -> Result<(), KernelError> {
        // SAFETY: forwarded contract.
        unsafe { launch(&self.combine, g, BLOCK_THREADS, s, p) }
    }

    /// # Safety
    /// As [`ForwardKernels::route`].
    pub unsafe fn reduce(&self, p: &ReduceParams, g: Grid, s: CUstream) -> Result<(), KernelError> {
        // SAFETY: forwarded contract.
        unsafe { launch(&self.reduce, g, BLOCK_THREADS, s, p) }
    }
}

impl ForwardKernels {
    /// Fills `n` bf16 values at `dst` with uniform values in
    /// `[-scale, scale)` determined by `seed` (test and bench weights).
    ///
    /// # Safety
    /// `dst .. dst + 2n` is live device memory of this context.
    pub unsafe fn fill_random(
        &self,
        dst: CUdeviceptr,
        n: usize,
        seed: u64,
        scale: f32,
        s: CUstream,
    ) -> Result<(), KernelError> {
        if n == 0 {
            return Ok(());
        }
        let p = FillParams {
            dst,
            n: n as i64,
            seed,
            scale,
            pad: 0,
        };
        let blocks = n.div_ceil(BLOCK_THREADS as usize).min(4096) as u32;
        // SAFETY: forwarded contract.
        unsafe { launch(&self.fill, Grid::blocks(blocks), BLOCK_THREADS, s, &p) }
    }

    /// Row `r` of `dst` becomes row `index[r]` of `tokens` (packed rows of
    /// `dst.width` bytes), or zeros where `index[r]` is `u32::MAX`: a
    /// staged proxy's token-once landing, expanding a pair's token rows (or
    /// its combine sums) into the kernels' row layout on the device, and
    /// its dispatch, packing a piece's token rows for the wire. The
    /// index is 4-byte aligned, rows as [`check_rows`] says.
    ///
    /// # Safety
    /// `dst` is memory the device can write (its own, or pinned host
    /// memory it maps); `index` holds `dst.rows` u32 and `tokens` every
    /// row they name, in memory the device can read (the same kinds), none
    /// of it written by others until the stream has run the kernel.
    pub unsafe fn expand_rows(
        &self,
        tokens: CUdeviceptr,
        index: CUdeviceptr,
        dst: Rows,
        s: CUstream,
    ) -> Result<(), KernelError> {
        check_expand(tokens, index, dst)?;
        if dst.rows == 0 {
            return Ok(());
        }
        let p = ExpandParams {
            tokens,
            index,
            dst: dst.at,
            rows: dst.rows as i64,
            vecs: (dst.width / 16) as i32,
            pitch: (dst.pitch / 16) as i32,
        };
        // SAFETY: forwarded contract.
        unsafe {
            launch(
                &self.expand,
                vector_grid(dst.rows * dst.width),
                BLOCK_THREADS,
                s,
                &p,
            )
        }
    }

    /// Copies the rows of `src` into the rows of `dst` (as many, as wide;
    /// each at its own pitch) by a kernel: a staged proxy's downloads,
    /// landings and uploads, between device memory and mapped host memory,
    /// kept off the copy engines.
    ///
    /// # Safety
    /// Both row sets lie in memory the device can read (and write, for
    /// `dst`): device memory of this context or mapped host memory,
    /// untouched by others until the stream has run the kernel; they do
    /// not overlap.
    pub unsafe fn copy_rows(&self, src: Rows, dst: Rows, s: CUstream) -> Result<(), KernelError> {
        if src.rows != dst.rows || src.width != dst.width {
            return Err(KernelError::InvalidShape(format!(
                "copy_rows: {} rows of {} bytes into {} rows of {}",
                src.rows, src.width, dst.rows, dst.width
            )));
        }
        if src.rows > 1 && (src.width > src.pitch || dst.width > dst.pitch) {
            return Err(KernelError::InvalidShape(format!(
                "copy_rows: rows of {} bytes at pitches {} and {} would overlap",
                src.width, src.pitch, dst.pitch
            )));
        }
        if src.rows == 0 || src.width == 0 {
            return Ok(());
        }
        let vec = copy_vector(src, dst);
        let p = CopyParams {
            src: src.at,
            dst: dst.at,
            src_pitch: src.pitch as i64,
            dst_pitch: dst.pitch as i64,
            rows: src.rows as i64,
            width: src.width as i64,
            vec: vec as i32,
            pad: 0,
        };
        let moves = src.rows * (src.width / vec);
        let blocks = moves.div_ceil(BLOCK_THREADS as usize).clamp(1, 256) as u32;
        // SAFETY: forwarded contract.
        unsafe { launch(&self.copy, Grid::blocks(blocks), BLOCK_THREADS, s, &p) }
    }

    /// Copies `bytes` contiguous bytes from `src` to `dst`, as
    /// [`ForwardKernels::copy_rows`] copies one row.
    ///
    /// # Safety
    /// As [`ForwardKernels::copy_rows`].
    pub unsafe fn copy_bytes(
        &self,
        src: CUdeviceptr,
        dst: CUdeviceptr,
        bytes: usize,
        s: CUstream,
    ) -> Result<(), KernelError> {
        let row = |at| Rows {
            at,
            rows: 1,
            width: bytes,
            pitch: bytes,
        };
        // SAFETY: forwarded contract.
        unsafe { self.copy_rows(row(src), row(dst), s) }
    }

    /// Into `dst` (`slots` packed rows of `src.width` bytes): per slot `s`,
    /// the sum over entries `e` in `starts[s]..starts[s + 1]` of row
    /// `rows[e]` of `src` scaled by `ratio[rows[e]]`, in f32, rounded once
    /// to bf16: a staged proxy's token-once combine on the expert side.
    ///
    /// # Safety
    /// `src` is this context's device memory; `starts` holds `slots + 1`
    /// u32, `rows` every entry they name (each a row of `src`), `ratio` an
    /// f32 per row of `src`, and `dst` `slots` rows, in memory the device
    /// can read (and write, for `dst`): device memory or mapped host
    /// memory, untouched by others until the stream has run the kernel.
    pub unsafe fn sum_rows(
        &self,
        src: Rows,
        sums: SlotSums,
        s: CUstream,
    ) -> Result<(), KernelError> {
        check_rows(src, "sum_rows")?;
        let aligned = [sums.starts, sums.rows, sums.ratio]
            .iter()
            .all(|a| a.is_multiple_of(4))
            && sums.dst.is_multiple_of(16);
        if !aligned {
            return Err(KernelError::InvalidShape(format!(
                "sum_rows needs 4-byte aligned tables and a 16-byte aligned output: {sums:?}"
            )));
        }
        if sums.slots == 0 || src.width == 0 {
            return Ok(());
        }
        let p = SumParams {
            src: src.at,
            starts: sums.starts,
            rows: sums.rows,
            ratio: sums.ratio,
            dst: sums.dst,
            slots: sums.slots as i64,
            vecs: (src.width / 16) as i32,
            pitch: (src.pitch / 16) as i32,
        };
        let g = vector_grid(sums.slots * src.width);
        // SAFETY: forwarded contract.
        unsafe { launch(&self.sum, g, BLOCK_THREADS, s, &p) }
    }
}

/// The tables and output of [`ForwardKernels::sum_rows`] (device
/// addresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotSums {
    pub starts: CUdeviceptr,
    pub rows: CUdeviceptr,
    pub ratio: CUdeviceptr,
    pub dst: CUdeviceptr,
    pub slots: usize,
}

/// A grid of a thread per 16-byte vector of `bytes`, at most 1024 blocks.
fn vector_grid(bytes: usize) -> Grid {
    Grid::blocks((bytes / 16).div_ceil(BLOCK_THREADS as usize).clamp(1, 1024) as u32)
}

/// What `comet_expand_rows` needs of its operands: rows move as 16-byte
/// vectors ([`check_rows`], the source rows packed as wide as `dst`'s),
/// the index is read as u32 (a piece's index array starts at any multiple
/// of 4 inside its pair's area).
pub fn check_expand(tokens: CUdeviceptr, index: CUdeviceptr, dst: Rows) -> Result<(), KernelError> {
    check_rows(dst, "expand_rows")?;
    if dst.rows == 0 || (tokens.is_multiple_of(16) && index.is_multiple_of(4)) {
        return Ok(());
    }
    Err(KernelError::InvalidShape(format!(
        "expand_rows needs 16-byte aligned source rows and a 4-byte aligned index \
         (rows at {tokens:#x}, index at {index:#x})"
    )))
}

/// One launch whose only parameter is `p` (a `__grid_constant__` struct).
///
/// # Safety
/// `P` must be laid out as the kernel's parameter struct and its pointers
/// valid for the kernel's whole run.
unsafe fn launch<P: Copy>(
    f: &CudaFunction,
    g: Grid,
    threads: u32,
    s: CUstream,
    p: &P,
) -> Result<(), KernelError> {
    let mut copy = *p;
    let mut params = [&mut copy as *mut P as *mut c_void];
    // SAFETY: one parameter laid out as the kernel expects (caller's
    // contract); the driver copies it before returning.
    unsafe {
        cudarc::driver::result::launch_kernel(
            f.cu_function(),
            (g.blocks.max(1), 1, 1),
            (threads, 1, 1),
            g.smem,
            s,
            &mut params,
        )
    }?;
    Ok(())
}

/// Fills `count` 16-bit words at `ptr` with `value` on `stream`
/// (0xFFFF: bf16 NaN, to poison outputs).
///
/// # Safety
/// `ptr .. ptr + 2 * count` must be live device memory of the stream's context.
pub unsafe fn fill_u16(
    stream: CUstream,
    ptr: CUdeviceptr,
    value: u16,
    count: usize,
) -> Result<(), KernelError> {
    if count == 0 {
        return Ok(());
    }
    // SAFETY: the caller guarantees the range.
    unsafe { sys::cuMemsetD16Async(ptr, value, count, stream) }
        .result()
        .map_err(KernelError::Driver)
}

/// Fills `count` 32-bit words at `ptr` with `value` on `stream`.
///
/// # Safety
/// `ptr .. ptr + 4 * count` must be live device memory of the stream's context.
pub unsafe fn fill_u32(
    stream: CUstream,
    ptr: CUdeviceptr,
    value: u32,
    count: usize,
) -> Result<(), KernelError> {
    if count == 0 {
        return Ok(());
    }
    // SAFETY: the caller guarantees the range.
    unsafe { sys::cuMemsetD32Async(ptr, value, count, stream) }
        .result()
        .map_err(KernelError::Driver)
}

/// A 64-bit word in mapped pinned host memory that a kernel stores a device
/// word into at the end of every call ([`ForwardKernels::store_status`]),
/// so the host learns a call's status by reading memory: no
/// synchronisation, and it works in a CUDA graph.
pub struct StatusWord {
    ptr: *mut u64,
    /// The same word as the device addresses it (the allocation is mapped).
    device_ptr: CUdeviceptr,
    ctx: Arc<CudaContext>,
}

// SAFETY: the word is plain pinned memory owned by this value; reads and
// writes are volatile and the owner is the only host-side user.
unsafe impl Send for StatusWord {}

impl StatusWord {
    pub fn new(ctx: &Arc<CudaContext>) -> Result<StatusWord, KernelError> {
        ctx.bind_to_thread()?;
        // SAFETY: an 8-byte pinned allocation, zeroed before use.
        let ptr = unsafe { cudarc::driver::result::malloc_host(8, sys::CU_MEMHOSTALLOC_DEVICEMAP) }?
            as *mut u64;
        // SAFETY: freshly allocated, aligned and 8 bytes long.
        unsafe { ptr.write_volatile(0) };
        let mut word = StatusWord {
            ptr,
            device_ptr: 0,
            ctx: Arc::clone(ctx),
        };
        let mut device_ptr: CUdeviceptr = 0;
        // SAFETY: `ptr` is a live mapped allocation of this context; on
        // error `word` frees it.
        unsafe { sys::cuMemHostGetDevicePointer_v2(&mut device_ptr, ptr as *mut c_void, 0) }
            .result()?;
        word.device_ptr = device_ptr;
        Ok(word)
    }

    /// The last value the device stored here.
    pub fn read(&self) -> u64 {
        // SAFETY: live, aligned, owned by self.
        unsafe { self.ptr.read_volatile() }
    }

    pub fn clear(&self) {
        // SAFETY: as in read.
        unsafe { self.ptr.write_volatile(0) }
    }
}

impl Drop for StatusWord {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: allocated by malloc_host in new; stores into it are
        // ordered before any drop by the owner's stream synchronisation.
        let _ = unsafe { cudarc::driver::result::free_host(self.ptr as *mut c_void) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The copy kernel moves the widest vector every address, pitch and
    /// width allows.
    #[test]
    fn copies_move_the_widest_vector_all_allow() {
        let r = |at: u64, width: usize, pitch: usize| Rows {
            at,
            rows: 3,
            width,
            pitch,
        };
        assert_eq!(copy_vector(r(0x1000, 64, 160), r(0x2000, 64, 64)), 16);
        assert_eq!(copy_vector(r(0x1004, 64, 160), r(0x2000, 64, 64)), 4);
        assert_eq!(copy_vector(r(0x1000, 36, 160), r(0x2000, 36, 36)), 4);
        assert_eq!(copy_vector(r(0x1000, 64, 162), r(0x2000, 64, 64)), 1);
        assert_eq!(copy_vector(r(0x1000, 13, 16), r(0x2003, 13, 13)), 1);
    }

    /// A piece's index array may start at any multiple of 4 (its pair's
    /// earlier pieces have any number of rows); token rows and the rows
    /// landed into must be 16-byte aligned, whole vectors.
    #[test]
    fn expand_takes_any_u32_aligned_index_and_16_byte_rows() {
        let rows = |at: u64, rows: usize, width: usize, pitch: usize| Rows {
            at,
            rows,
            width,
            pitch,
        };
        assert!(check_expand(0x1000, 0x2004, rows(0x3000, 5, 7168, 7168)).is_ok());
        assert!(check_expand(0x1000, 0x2002, rows(0x3000, 5, 7168, 7168)).is_err());
        assert!(check_expand(0x1008, 0x2000, rows(0x3000, 5, 7168, 7168)).is_err());
        assert!(check_expand(0x1000, 0x2000, rows(0x3008, 5, 7168, 7168)).is_err());
        assert!(check_expand(0x1000, 0x2000, rows(0x3000, 5, 7160, 7160)).is_err());
        assert!(check_expand(0x1001, 0x2001, rows(0x3001, 0, 7, 7)).is_ok());
        // Combine chunks: narrower than their pitch, never wider.
        assert!(check_expand(0x1000, 0x2000, rows(0x3000, 5, 1792, 7168)).is_ok());
        assert!(check_expand(0x1000, 0x2000, rows(0x3000, 5, 1792, 1800)).is_err());
        assert!(check_expand(0x1000, 0x2000, rows(0x3000, 5, 7168, 1792)).is_err());
    }

    #[test]
    fn forward_kernels_compile() {
        if let Err(e) = crate::nvrtc::ensure_nvrtc() {
            eprintln!("skipping: {e}");
            return;
        }
        for t in [Target::SM80, Target::SM90A] {
            if let Err(e) = crate::nvrtc::compile_cubin(&forward_unit(), t) {
                panic!("{e}");
            }
        }
    }

    #[test]
    fn layout_smem_grows_with_ranks_times_experts() {
        assert_eq!(layout_smem_bytes(1, 8), 4 * (8 + 16 + 40 + 2));
        assert!(layout_smem_bytes(8, 256) < LAYOUT_SMEM_MAX);
        assert!(layout_smem_bytes(64, 1024) > LAYOUT_SMEM_MAX);
    }
}
