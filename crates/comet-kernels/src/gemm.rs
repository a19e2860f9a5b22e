//! Loading and launching grouped GEMM variants on a GPU (the crate's one
//! kernel-launch module). Compiled cubins come from [`crate::nvrtc`]; the
//! parameter structs here mirror `GemmParams`/`HopperParams` in the .cu
//! sources byte for byte.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{self, CUdeviceptr};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};

use crate::error::KernelError;
use crate::forward::{CombineParams, DispatchParams, ReduceParams};
use crate::nvrtc::{Compiler, Target};
use crate::tiles::TailSplit;
use crate::variants::{Epilogue, Family, GemmVariant, LaunchShape};

/// Signal hooks of one launch (raw device pointers: signal arrays may live
/// in peer or host-mapped memory).
#[derive(Debug, Clone, Copy)]
pub struct HookArgs {
    /// 64-bit signal words.
    pub signals: CUdeviceptr,
    /// u32 signal indices the tiles' `dep_off/dep_cnt` refer to.
    pub deps: CUdeviceptr,
    /// Wait until `signal >= wait_target` (this call's epoch).
    pub wait_target: u64,
    /// Value stored by set-mode raises (this call's epoch).
    pub raise_value: u64,
    /// Bound of every wait; past it the kernel records a timeout and exits.
    pub timeout_ns: u64,
}

/// Where the parts of split tail tiles meet ([`TailSplit`]): one slot per
/// CTA of f32 accumulators and two u64 flag words. Zeroed once, then reused
/// by every launch on one stream; `epoch` must grow by one per launch (the
/// flags hold the epoch whose part they announce, so a part left by an
/// aborted launch is never taken for a later one's).
#[derive(Debug, Clone, Copy)]
pub struct SplitArgs {
    /// `slots` x [`GemmRuntime::split_slot_bytes`] bytes.
    pub partials: CUdeviceptr,
    /// `2 * slots` u64 words.
    pub flags: CUdeviceptr,
    pub slots: usize,
    pub epoch: u64,
}

/// Bound of a last part's wait for the other parts when the launch has no
/// hooks (with hooks, their `timeout_ns`). Every part's CTA is resident
/// from the start, so only a failed launch comes near it.
const SPLIT_TIMEOUT_NS: u64 = 10_000_000_000;

/// A's rows gathered: tile row `r` (of the `total_rows` row space) reads
/// row `rows[r]` of `a`, which has `src_rows` rows, instead of row `r`.
/// One rank's FC1 reads x in place this way (no dispatch copy).
#[derive(Debug, Clone, Copy)]
pub struct Gather {
    /// i32 per tile row, each below `src_rows`.
    pub rows: CUdeviceptr,
    pub src_rows: usize,
}

/// One grouped GEMM launch. All pointers are device pointers; see
/// kernels/gemm_common.cuh for the layouts.
#[derive(Debug, Clone, Copy)]
pub struct GemmArgs {
    pub a: CUdeviceptr,
    pub b: CUdeviceptr,
    pub c: CUdeviceptr,
    pub tiles: CUdeviceptr,
    pub num_tiles: usize,
    pub total_rows: usize,
    pub k: usize,
    /// GEMM columns of B (SwiGLU: 2 x output columns).
    pub n: usize,
    pub ldc: usize,
    pub experts: usize,
    /// Scatter epilogue: i32 destination row and f32 weight per A row.
    pub scatter_idx: CUdeviceptr,
    pub scatter_w: CUdeviceptr,
    /// u64 error word (code << 32 | signal), needed by hooked variants.
    pub err: CUdeviceptr,
    pub hooks: Option<HookArgs>,
    /// Lets families that can ([`Family::splits_tail`]) cut the last wave
    /// of tiles along K; None runs every tile whole.
    pub split: Option<SplitArgs>,
    /// The tile count and epoch live in GPU memory (the device forward);
    /// `num_tiles` is then the tile list's capacity.
    pub device: Option<DeviceWork>,
    /// None: A's rows are the tile rows.
    pub gather: Option<Gather>,
    /// None: the producer's idle warps stay idle.
    pub side: Option<SideWork>,
}

/// Rows the idle warps of an sm90 launch's producer warpgroup move beside
/// its tiles (kernels/moe_rows.cuh): a rank's dispatch inside the FC1 that
/// waits on it, or the reduce or combine of FC2's finished chunks inside
/// the FC2 that counts them. Warps take the work from `next`, a u32 the
/// call zeroes.
#[derive(Debug, Clone, Copy)]
pub struct SideWork {
    pub rows: SideRows,
    pub next: CUdeviceptr,
}

#[derive(Debug, Clone, Copy)]
pub enum SideRows {
    /// Needs the wait hook: FC1's tiles wait on the segments it completes.
    Dispatch(DispatchParams),
    /// Needs the raise hook: it sums a chunk once FC2 counted its tiles.
    Reduce(ReduceParams),
    /// Needs the raise hook: it sends a piece back to its sources once FC2
    /// counted its tiles; the pieces of one expert group.
    Combine(CombineParams),
}

/// Work a launch reads from GPU memory at run time (DESIGN.md 6b): the
/// kernels that derive the layout on the device write the tile list and
/// its length, and the call's epoch lives in a device word, so one launch
/// (or one captured graph node) serves every call. No tail is split.
#[derive(Debug, Clone, Copy)]
pub struct DeviceWork {
    /// i32: tiles of this call (at most the launch's `num_tiles`).
    pub num_tiles: CUdeviceptr,
    /// u64: the hooks' wait target and set-mode raise value.
    pub epoch: CUdeviceptr,
    /// CTAs of the persistent grid (this rank's share of the SMs).
    pub grid: u32,
    /// i32: where this launch's tiles start in the list (0 for none: at
    /// its head). The device forward's expert groups keep every group's
    /// tiles in one list and launch each group from its own first tile.
    pub first_tile: CUdeviceptr,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct GemmParamsC {
    a: u64,
    b: u64,
    c: u64,
    tiles: u64,
    scatter_idx: u64,
    scatter_w: u64,
    signals: u64,
    deps: u64,
    err: u64,
    wait_target: u64,
    raise_value: u64,
    timeout_ns: u64,
    num_tiles: i32,
    k: i32,
    n: i32,
    ldc: i32,
    total_rows: i32,
    experts: i32,
    sk_partials: u64,
    sk_flags: u64,
    sk_epoch: u64,
    sk_begin: i32,
    sk_len: i32,
    sk_ctas: i32,
    num_tiles_dev: u64,
    epoch_dev: u64,
    a_rows: u64,
    first_tile_dev: u64,
}

#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct HopperParamsC {
    tma_a: [u64; 16],
    tma_b: [u64; 16],
    tma_c: [u64; 16],
    p: GemmParamsC,
    tma_store: i32,
    side: SideWorkC,
}

/// `comet::SideWork`; `kind` 0 (none), 1 (dispatch), 2 (reduce) or 3
/// (combine) says which of the three blocks is read.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SideWorkC {
    kind: i32,
    pad: i32,
    next: u64,
    dispatch: DispatchParams,
    reduce: ReduceParams,
    combine: CombineParams,
}

impl SideWorkC {
    fn of(side: Option<SideWork>) -> SideWorkC {
        let mut c = SideWorkC::default();
        if let Some(s) = side {
            c.next = s.next;
            match s.rows {
                SideRows::Dispatch(d) => (c.kind, c.dispatch) = (1, d),
                SideRows::Reduce(r) => (c.kind, c.reduce) = (2, r),
                SideRows::Combine(m) => (c.kind, c.combine) = (3, m),
            }
        }
        c
    }
}

const _: () = assert!(std::mem::size_of::<GemmParamsC>() == 192);
const _: () = assert!(std::mem::offset_of!(HopperParamsC, tma_store) == 576);
const _: () = assert!(std::mem::offset_of!(HopperParamsC, side) == 584);
const _: () = assert!(std::mem::size_of::<SideWorkC>() == 480);
const _: () = assert!(std::mem::size_of::<HopperParamsC>() == 1088);

/// Checks the shape rules every variant shares; one error naming the problem.
pub fn validate_args(v: &GemmVariant, a: &GemmArgs) -> Result<(), KernelError> {
    let bad = |m: String| Err(KernelError::InvalidShape(m));
    if a.k == 0 || !a.k.is_multiple_of(64) {
        return bad(format!("K = {} must be a positive multiple of 64", a.k));
    }
    if a.n == 0 || !a.n.is_multiple_of(64) {
        return bad(format!("N = {} must be a positive multiple of 64", a.n));
    }
    if v.epilogue == Epilogue::SwiGlu && !a.n.is_multiple_of(128) {
        return bad(format!(
            "SwiGLU needs N = 2F with F a multiple of 64, got N = {}",
            a.n
        ));
    }
    let out = v.epilogue.out_cols(a.n);
    if a.ldc < out {
        return bad(format!("ldc = {} is below the {out} output columns", a.ldc));
    }
    if !a.ldc.is_multiple_of(8) {
        return bad(format!(
            "ldc = {} must be a multiple of 8 (16-byte row stores)",
            a.ldc
        ));
    }
    if a.experts == 0 {
        return bad("experts must be > 0".into());
    }
    if !a.num_tiles.is_multiple_of(v.cluster()) {
        return bad(format!(
            "{} tiles for {}: each cluster takes {} consecutive tiles",
            a.num_tiles,
            v.kernel_name(),
            v.cluster()
        ));
    }
    for (val, what) in [
        (a.k, "K"),
        (a.n, "N"),
        (a.ldc, "ldc"),
        (a.total_rows, "rows"),
        (a.num_tiles, "tiles"),
    ] {
        if val > i32::MAX as usize {
            return bad(format!("{what} = {val} does not fit in i32"));
        }
    }
    if a.num_tiles > 0 && (a.a == 0 || a.b == 0 || a.c == 0 || a.tiles == 0) {
        return bad("A, B, C and the tile list must be non-null".into());
    }
    if v.epilogue == Epilogue::Scatter
        && a.num_tiles > 0
        && (a.scatter_idx == 0 || a.scatter_w == 0)
    {
        return bad("the scatter epilogue needs scatter_idx and scatter_w".into());
    }
    if let Some(g) = a.gather {
        if a.num_tiles > 0 && g.rows == 0 {
            return bad("a gather needs its row map".into());
        }
        if g.src_rows == 0 || g.src_rows > i32::MAX as usize {
            return bad(format!(
                "a gather's A has {} rows (1 to i32::MAX)",
                g.src_rows
            ));
        }
        if v.cluster() != 1 || v.hooks.wait {
            return bad(format!(
                "{}: a gather takes one CTA per tile and no dependency waits (not clusters, \
                 not the wait hook)",
                v.kernel_name()
            ));
        }
    }
    if let Some(s) = a.side {
        let (fits, what) = match s.rows {
            SideRows::Dispatch(_) => (v.hooks.wait, "a dispatch needs the wait hook"),
            SideRows::Reduce(_) => (v.hooks.raise, "a reduce needs the raise hook"),
            SideRows::Combine(_) => (v.hooks.raise, "a combine needs the raise hook"),
        };
        if !matches!(v.family, Family::Sm90 { cluster: 1, .. }) || !fits || a.gather.is_some() {
            return bad(format!(
                "{}: side work runs in unclustered sm90 launches without a gather ({what})",
                v.kernel_name()
            ));
        }
        if s.next == 0 {
            return bad("side work needs its work counter".into());
        }
        // Every lane of a side warp shuffles in each 32-vector round.
        if let SideRows::Reduce(r) = s.rows {
            if r.cols <= 0 || r.cols % 256 != 0 {
                return bad(format!(
                    "a side reduce sums chunks of whole 256-column rounds, not {}",
                    r.cols
                ));
            }
        }
        // The kernel takes its expert group from the first piece.
        if let SideRows::Combine(m) = s.rows {
            let group = |j: i32| j.div_euclid(m.chunks.max(1));
            if m.chunks <= 0
                || m.piece_begin < 0
                || m.piece_begin >= m.piece_end
                || m.piece_end > m.groups.saturating_mul(m.chunks)
                || group(m.piece_begin) != group(m.piece_end - 1)
            {
                return bad(format!(
                    "a side combine sends pieces of one expert group, not [{}, {}) of {} \
                     groups of {} chunks",
                    m.piece_begin, m.piece_end, m.groups, m.chunks
                ));
            }
        }
    }
    if v.hooks.wait || v.hooks.raise {
        match a.hooks {
            None => return bad(format!("{} needs hook arguments", v.kernel_name())),
            Some(h) if h.signals == 0 || a.err == 0 || (v.hooks.wait && h.deps == 0) => {
                return bad("hooked variants need signals, deps and the error word".into())
            }
            _ => {}
        }
    }
    Ok(())
}

/// Compiled variants for one GPU, loaded lazily and kept for the process.
pub struct GemmRuntime {
    ctx: Arc<CudaContext>,
    target: Target,
    sms: u32,
    compiler: Compiler,
    funcs: Mutex<HashMap<GemmVariant, (CudaFunction, u32)>>,
    maps: MapCache,
}

fn drv(r: sys::CUresult) -> Result<(), KernelError> {
    r.result().map_err(KernelError::Driver)
}

/// Opens GPU `ordinal`, with an error instead of cudarc's panic when no
/// CUDA driver library can be loaded (machines without a GPU).
pub fn open_gpu(ordinal: usize) -> Result<Arc<CudaContext>, KernelError> {
    // SAFETY: only dlopen()s candidate library names and closes them.
    if !unsafe { sys::is_culib_present() } {
        return Err(KernelError::Unsupported(
            "no CUDA driver library (libcuda) found".into(),
        ));
    }
    Ok(CudaContext::new(ordinal)?)
}

/// `name` of `module`, its code loaded onto the device now. Under CUDA's
/// lazy loading (the default since 12.2) a kernel's code loads at its
/// first launch, and that load may synchronize the context (CUDA C++
/// Programming Guide, "Lazy Loading": concurrent execution). Our kernels
/// spin waiting for each other and for a proxy's launches, so a first
/// launch under a spinning kernel could wait for it forever: every kernel
/// is loaded when its module is (`cuFuncLoad`, drivers of CUDA 12.4 on).
pub fn load_function(module: &Arc<CudaModule>, name: &str) -> Result<CudaFunction, KernelError> {
    let f = module.load_function(name)?;
    if driver_version() >= 12040 {
        // SAFETY: a live function handle of a module that `f` keeps loaded.
        drv(unsafe { sys::cuFuncLoad(f.cu_function()) })?;
    }
    Ok(f)
}

/// The installed driver's version (e.g. 13000), 0 when none is loaded.
pub fn driver_version() -> i32 {
    let mut v = 0;
    // SAFETY: out-pointer to a live int; errors leave it 0.
    let _ = unsafe { sys::cuDriverGetVersion(&mut v) };
    v
}

impl GemmRuntime {
    pub fn new(ctx: Arc<CudaContext>) -> Result<GemmRuntime, KernelError> {
        let (major, minor) = ctx.compute_capability()?;
        let target = Target::for_compute_capability(major as u32, minor as u32)?;
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
            as u32;
        Ok(GemmRuntime {
            ctx,
            target,
            sms,
            compiler: Compiler::with_default_cache(driver_version()),
            funcs: Mutex::new(HashMap::new()),
            maps: MapCache::default(),
        })
    }

    pub fn target(&self) -> Target {
        self.target
    }

    pub fn sm_count(&self) -> u32 {
        self.sms
    }

    /// The fastest correct family here ([`Family::chosen`]).
    pub fn default_family(&self) -> Family {
        Family::chosen(self.target.has_wgmma())
    }

    /// Compiles (or loads from the cache) and loads `v`; returns the
    /// function and its grid size limit (resident blocks on the GPU).
    fn function(&self, v: &GemmVariant) -> Result<(CudaFunction, u32), KernelError> {
        let mut funcs = self
            .funcs
            .lock()
            .map_err(|_| KernelError::Unsupported("kernel table poisoned".into()))?;
        if let Some(f) = funcs.get(v) {
            return Ok(f.clone());
        }
        if !v.supports(self.target) {
            return Err(KernelError::Unsupported(format!(
                "{} does not run on {}",
                v.kernel_name(),
                self.target
            )));
        }
        let cubin = self.compiler.compile(&v.compile_unit(), self.target)?;
        let module = self
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))?;
        let f = load_function(&module, &v.kernel_name())?;
        let shape = v.launch_shape();
        // SAFETY: f is a live function of this context; the attribute value
        // is within the device's opt-in limit (checked by the driver).
        drv(unsafe {
            sys::cuFuncSetAttribute(
                f.cu_function(),
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                shape.smem_bytes as i32,
            )
        })?;
        let mut per_sm = 0i32;
        // SAFETY: out-pointer to a live int; f is valid.
        drv(unsafe {
            sys::cuOccupancyMaxActiveBlocksPerMultiprocessor(
                &mut per_sm,
                f.cu_function(),
                shape.threads as i32,
                shape.smem_bytes as usize,
            )
        })?;
        if per_sm < 1 {
            return Err(KernelError::Unsupported(format!(
                "{} cannot be resident on this GPU",
                v.kernel_name()
            )));
        }
        let cm = v.cluster() as u32;
        let grid_cap = if cm > 1 {
            // Clusters must fit in one GPC each, so fewer than sms / cm may be
            // resident at once; the persistent grid takes exactly those.
            let cfg = sys::CUlaunchConfig {
                gridDimX: self.sms.div_ceil(cm) * cm,
                gridDimY: 1,
                gridDimZ: 1,
                blockDimX: shape.threads,
                blockDimY: 1,
                blockDimZ: 1,
                sharedMemBytes: shape.smem_bytes,
                hStream: std::ptr::null_mut(),
                attrs: std::ptr::null_mut(),
                numAttrs: 0,
            };
            let mut clusters = 0i32;
            // SAFETY: out-pointer to a live int, a config with no attribute
            // array (the cluster shape is compiled into f); f is valid.
            drv(unsafe {
                sys::cuOccupancyMaxActiveClusters(&mut clusters, f.cu_function(), &cfg)
            })?;
            if clusters < 1 {
                return Err(KernelError::Unsupported(format!(
                    "no cluster of {cm} blocks of {} fits on this GPU",
                    v.kernel_name()
                )));
            }
            clusters as u32 * cm
        } else {
            self.sms * per_sm as u32
        };
        tracing::debug!(kernel = %v.kernel_name(), grid_cap, "persistent grid");
        funcs.insert(*v, (f.clone(), grid_cap));
        Ok((f, grid_cap))
    }

    /// Bytes of one workspace slot of [`SplitArgs::partials`] for `v`: a
    /// tile's f32 accumulators.
    pub fn split_slot_bytes(v: &GemmVariant) -> usize {
        v.tile_rows() * v.tile_gemm_cols() * 4
    }

    /// Workspace slots a launch of `v` may use when split (its grid limit;
    /// 0 for families that never split). Compiles `v` if needed.
    pub fn split_slots(&self, v: &GemmVariant) -> Result<usize, KernelError> {
        if !v.family.splits_tail() {
            return Ok(0);
        }
        Ok(self.function(v)?.1 as usize)
    }

    /// Compiles and loads `v` ahead of time (keeps NVRTC out of timings).
    pub fn prepare(&self, v: &GemmVariant) -> Result<(), KernelError> {
        self.function(v).map(|_| ())
    }

    /// Launches `v` on `stream`.
    ///
    /// # Safety
    /// Every pointer in `args` must be a device allocation of this context
    /// large enough for the shapes and tile list given (A: total_rows x K,
    /// B: experts x N x K, C: rows written x ldc, tiles: num_tiles entries,
    /// deps: every index a tile names), and stay alive until the kernel ends.
    pub unsafe fn launch(
        &self,
        v: &GemmVariant,
        args: &GemmArgs,
        stream: &CudaStream,
    ) -> Result<(), KernelError> {
        // SAFETY: forwarded contract.
        unsafe { self.launch_raw(v, args, stream.cu_stream()) }
    }

    /// [`GemmRuntime::launch`] on a raw stream handle of this context (a
    /// caller's stream, e.g. PyTorch's current stream).
    ///
    /// # Safety
    /// As [`GemmRuntime::launch`]; `stream` is a live stream of this context.
    pub unsafe fn launch_raw(
        &self,
        v: &GemmVariant,
        args: &GemmArgs,
        stream: sys::CUstream,
    ) -> Result<(), KernelError> {
        validate_args(v, args)?;
        if args.num_tiles == 0 {
            return Ok(());
        }
        let (f, grid_cap) = self.function(v)?;
        let (split, sk) = launch_split(v, args, grid_cap)?;
        let p = gemm_params(args, &split, sk);
        let (grid, shape) = (split.grid as u32, v.launch_shape());
        match v.family {
            // SAFETY: the parameter is laid out as the kernel's GemmParams;
            // pointer validity is the caller's contract.
            Family::Sm80 => unsafe { launch_with(&f, grid, shape, stream, p) },
            Family::Sm90 { bn, tma_store, .. } => {
                let hp = self.hopper_params(v, args, p, bn, tma_store)?;
                // SAFETY: laid out as the kernel's HopperParams; as above.
                unsafe { launch_with(&f, grid, shape, stream, hp) }
            }
        }
    }

    /// The kernel parameter of a Hopper launch: tensor maps of A (none when
    /// the producer gathers A), B and, for the store epilogue with bulk
    /// stores, C, beside the common parameters.
    fn hopper_params(
        &self,
        v: &GemmVariant,
        args: &GemmArgs,
        p: GemmParamsC,
        bn: u32,
        tma_store: bool,
    ) -> Result<HopperParamsC, KernelError> {
        // A gather loads A with cp.async, not TMA
        // (kernels/grouped_gemm_sm90.cu): no map for it.
        let tma_a = match args.gather {
            Some(_) => [0; 16],
            None => self.maps.get(
                args.a,
                &[args.k as u64, args.total_rows as u64],
                &[args.k as u64 * 2],
                &[64, 128],
            )?,
        };
        let tma_b = self.maps.get(
            args.b,
            &[args.k as u64, args.n as u64, args.experts as u64],
            &[args.k as u64 * 2, (args.n * args.k * 2) as u64],
            &[64, bn / 2, 1],
        )?;
        // C as bulk stores see it; a C the driver will not map (e.g. a
        // misaligned base) just keeps every tile on plain stores.
        let tma_c = if tma_store && v.epilogue == Epilogue::Store {
            self.maps
                .get(
                    args.c,
                    &[args.n as u64, args.total_rows as u64],
                    &[args.ldc as u64 * 2],
                    &[64, 64],
                )
                .ok()
        } else {
            None
        };
        Ok(HopperParamsC {
            tma_a,
            tma_b,
            tma_c: tma_c.unwrap_or([0; 16]),
            p,
            tma_store: i32::from(tma_c.is_some()),
            side: SideWorkC::of(args.side),
        })
    }
}

/// Launches `f` with its one parameter block `param` (a `__grid_constant__`
/// struct the driver copies at the launch).
///
/// # Safety
/// `param` is laid out as the kernel's parameter; the pointers in it are
/// valid for the kernel; `stream` is a live stream of `f`'s context.
unsafe fn launch_with<P>(
    f: &CudaFunction,
    grid: u32,
    shape: LaunchShape,
    stream: sys::CUstream,
    mut param: P,
) -> Result<(), KernelError> {
    let mut params = [&mut param as *mut P as *mut c_void];
    // SAFETY: the caller's contract; `param` outlives the call, which
    // copies it.
    unsafe {
        cudarc::driver::result::launch_kernel(
            f.cu_function(),
            (grid, 1, 1),
            (shape.threads, 1, 1),
            shape.smem_bytes,
            stream,
            &mut params,
        )
    }?;
    Ok(())
}

/// How a launch spreads its tiles: its grid (clustered variants one
/// cluster per tile pair; a device tile count at most its grid) and, where
/// the family splits the last wave along K and the workspace is given,
/// that split with its (partials, flags, epoch) workspace.
fn launch_split(
    v: &GemmVariant,
    args: &GemmArgs,
    grid_cap: u32,
) -> Result<(TailSplit, (u64, u64, u64)), KernelError> {
    let cm = v.cluster() as u32;
    let mut split = TailSplit::none(args.num_tiles / cm as usize, (grid_cap / cm) as usize);
    split.grid *= cm as usize;
    split.begin = args.num_tiles;
    let mut sk = (0, 0, 0);
    if let Some(d) = args.device {
        if cm != 1 {
            return Err(KernelError::InvalidShape(format!(
                "{} runs in clusters; a device tile count needs one CTA per tile",
                v.kernel_name()
            )));
        }
        split.grid = split.grid.min(d.grid.max(1) as usize);
    } else if let (Some(w), true) = (args.split, v.family.splits_tail()) {
        let plan = TailSplit::plan(args.num_tiles, args.k / 64, grid_cap as usize);
        if plan.ctas > 0 {
            if w.slots < plan.ctas || w.partials == 0 || w.flags == 0 || args.err == 0 {
                return Err(KernelError::InvalidShape(format!(
                    "the split tail needs {} workspace slots, flags and the error word \
                     (given {} slots)",
                    plan.ctas, w.slots
                )));
            }
            tracing::debug!(?plan, "split tail");
            split = plan;
            sk = (w.partials, w.flags, w.epoch);
        }
    }
    Ok((split, sk))
}

/// The kernels' common parameter block for one launch.
fn gemm_params(args: &GemmArgs, split: &TailSplit, sk: (u64, u64, u64)) -> GemmParamsC {
    let h = args.hooks.unwrap_or(HookArgs {
        signals: 0,
        deps: 0,
        wait_target: 0,
        raise_value: 0,
        timeout_ns: 0,
    });
    GemmParamsC {
        a: args.a,
        b: args.b,
        c: args.c,
        tiles: args.tiles,
        scatter_idx: args.scatter_idx,
        scatter_w: args.scatter_w,
        signals: h.signals,
        deps: h.deps,
        err: args.err,
        wait_target: h.wait_target,
        raise_value: h.raise_value,
        timeout_ns: if args.hooks.is_none() && split.ctas > 0 {
            SPLIT_TIMEOUT_NS
        } else {
            h.timeout_ns
        },
        num_tiles: args.num_tiles as i32,
        k: args.k as i32,
        n: args.n as i32,
        ldc: args.ldc as i32,
        total_rows: args.total_rows as i32,
        experts: args.experts as i32,
        sk_partials: sk.0,
        sk_flags: sk.1,
        sk_epoch: sk.2,
        sk_begin: split.begin as i32,
        sk_len: split.len as i32,
        sk_ctas: split.ctas as i32,
        num_tiles_dev: args.device.map_or(0, |d| d.num_tiles),
        epoch_dev: args.device.map_or(0, |d| d.epoch),
        first_tile_dev: args.device.map_or(0, |d| d.first_tile),
        a_rows: args.gather.map_or(0, |g| g.rows),
    }
}

/// What a tensor map is encoded from: equal keys, equal maps.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct MapKey {
    base: CUdeviceptr,
    dims: Vec<u64>,
    strides: Vec<u64>,
    boxes: Vec<u32>,
}

/// Encoded tensor maps by what they were encoded from. A layer launches its
/// GEMMs over the same buffers and weights call after call, and encoding
/// is a driver call per map per launch on the host's critical path; a map
/// depends on nothing but its key, so a cached one is the same bytes.
#[derive(Default)]
struct MapCache(Mutex<HashMap<MapKey, [u64; 16]>>);

/// Maps kept at most (then the cache starts over): far more than the
/// buffers and weights of a model's layers.
const MAP_CACHE_MAX: usize = 4096;

impl MapCache {
    fn get(
        &self,
        base: CUdeviceptr,
        dims: &[u64],
        strides: &[u64],
        boxes: &[u32],
    ) -> Result<[u64; 16], KernelError> {
        let key = MapKey {
            base,
            dims: dims.to_vec(),
            strides: strides.to_vec(),
            boxes: boxes.to_vec(),
        };
        self.get_or(key, || tensor_map(base, dims, strides, boxes))
    }

    fn get_or(
        &self,
        key: MapKey,
        encode: impl FnOnce() -> Result<[u64; 16], KernelError>,
    ) -> Result<[u64; 16], KernelError> {
        let mut maps = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = maps.get(&key) {
            return Ok(*m);
        }
        let m = encode()?;
        if maps.len() >= MAP_CACHE_MAX {
            maps.clear();
        }
        maps.insert(key, m);
        Ok(m)
    }
}

/// A bf16 tiled tensor map with 128-byte swizzle and zero fill out of bounds.
fn tensor_map(
    base: CUdeviceptr,
    dims: &[u64],
    strides: &[u64],
    boxes: &[u32],
) -> Result<[u64; 16], KernelError> {
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    let elem = vec![1u32; dims.len()];
    // SAFETY: arrays have rank (dims.len()) and rank-1 (strides) entries as
    // the driver expects; map is a writable CUtensorMap.
    drv(unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            dims.len() as u32,
            base as *mut c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            elem.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    })?;
    // SAFETY: initialised by the successful call above.
    let map = unsafe { map.assume_init() };
    Ok(map.opaque)
}

/// Turns the kernels' error word into a Result.
pub fn check_error_word(word: u64) -> Result<(), KernelError> {
    match KernelError::from_error_word(word) {
        None => Ok(()),
        Some(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::variants::Hooks;

    fn key(base: u64, k: u64) -> MapKey {
        MapKey {
            base,
            dims: vec![k, 128],
            strides: vec![2 * k],
            boxes: vec![64, 128],
        }
    }

    #[test]
    fn tensor_maps_are_encoded_once_per_key() {
        let cache = MapCache::default();
        let encodes = std::cell::Cell::new(0u64);
        let enc = |tag: u64| {
            encodes.set(encodes.get() + 1);
            Ok([tag; 16])
        };
        assert_eq!(cache.get_or(key(0x1000, 64), || enc(1)).unwrap()[0], 1);
        assert_eq!(cache.get_or(key(0x1000, 64), || enc(2)).unwrap()[0], 1);
        assert_eq!(encodes.get(), 1);
        // Another base or shape is another map.
        assert_eq!(cache.get_or(key(0x2000, 64), || enc(3)).unwrap()[0], 3);
        assert_eq!(cache.get_or(key(0x1000, 128), || enc(4)).unwrap()[0], 4);
        assert_eq!(encodes.get(), 3);
        // A failed encode is not kept.
        let failed = cache.get_or(key(0x3000, 64), || {
            Err(KernelError::Unsupported("x".into()))
        });
        assert!(failed.is_err());
        assert_eq!(cache.get_or(key(0x3000, 64), || enc(5)).unwrap()[0], 5);
    }

    #[test]
    fn the_map_cache_stays_bounded() {
        let cache = MapCache::default();
        for i in 0..(MAP_CACHE_MAX as u64 + 10) {
            cache.get_or(key(i * 256, 64), || Ok([i; 16])).unwrap();
        }
        let n = cache.0.lock().unwrap().len();
        assert!((10..=MAP_CACHE_MAX).contains(&n), "{n}");
    }

    fn args() -> GemmArgs {
        GemmArgs {
            a: 1,
            b: 1,
            c: 1,
            tiles: 1,
            num_tiles: 1,
            total_rows: 10,
            k: 128,
            n: 256,
            ldc: 256,
            experts: 1,
            scatter_idx: 0,
            scatter_w: 0,
            err: 0,
            hooks: None,
            split: None,
            device: None,
            gather: None,
            side: None,
        }
    }

    /// `a` with hook arguments and an error word.
    fn hooked(a: GemmArgs) -> GemmArgs {
        GemmArgs {
            hooks: Some(HookArgs {
                signals: 1,
                deps: 1,
                wait_target: 1,
                raise_value: 1,
                timeout_ns: 1,
            }),
            err: 1,
            ..a
        }
    }

    #[test]
    fn side_work_needs_its_hook_an_unclustered_sm90_launch_and_a_counter() {
        let hooks = |wait, raise| Hooks { wait, raise };
        let side = |rows, next| GemmArgs {
            side: Some(SideWork { rows, next }),
            ..hooked(args())
        };
        let dispatch = SideRows::Dispatch(DispatchParams::default());
        let reduce = SideRows::Reduce(ReduceParams {
            cols: 512,
            ..ReduceParams::default()
        });
        let narrow = SideRows::Reduce(ReduceParams {
            cols: 128,
            ..ReduceParams::default()
        });
        // Pieces [begin, end) of 2 groups of 3 chunks.
        let combine = |piece_begin, piece_end| {
            SideRows::Combine(CombineParams {
                groups: 2,
                chunks: 3,
                piece_begin,
                piece_end,
                ..CombineParams::default()
            })
        };
        let fc1 = GemmVariant::new(Family::SM90_TMA, Epilogue::SwiGlu, hooks(true, false));
        let fc2 = GemmVariant::new(Family::SM90_TMA, Epilogue::Store, hooks(false, true));
        validate_args(&fc1, &side(dispatch, 8)).unwrap();
        validate_args(&fc2, &side(reduce, 8)).unwrap();
        validate_args(&fc2, &side(combine(3, 6), 8)).unwrap();
        validate_args(&fc2, &side(combine(4, 5), 8)).unwrap();
        for (v, a, what) in [
            (&fc1, side(reduce, 8), "raise hook"),
            (&fc2, side(dispatch, 8), "wait hook"),
            (&fc1, side(combine(0, 3), 8), "raise hook"),
            (&fc1, side(dispatch, 0), "work counter"),
            (&fc2, side(narrow, 8), "256-column rounds, not 128"),
            (&fc2, side(combine(2, 4), 8), "one expert group, not [2, 4)"),
            (&fc2, side(combine(3, 3), 8), "one expert group, not [3, 3)"),
            (
                &fc2,
                side(combine(6, 7), 8),
                "not [6, 7) of 2 groups of 3 chunks",
            ),
        ] {
            let e = validate_args(v, &a).unwrap_err().to_string();
            assert!(e.contains(what), "{e}");
        }
        for fam in [Family::Sm80, Family::SM90_CLUSTER] {
            let v = GemmVariant::new(fam, Epilogue::SwiGlu, hooks(true, false));
            let a = GemmArgs {
                num_tiles: 2,
                ..side(dispatch, 8)
            };
            let e = validate_args(&v, &a).unwrap_err().to_string();
            assert!(e.contains("unclustered sm90"), "{e}");
        }
    }

    #[test]
    fn a_gather_needs_its_rows_one_cta_per_tile_and_no_waits() {
        let g = |rows, src_rows| GemmArgs {
            gather: Some(Gather { rows, src_rows }),
            ..args()
        };
        for fam in [Family::Sm80, Family::SM90_DEFAULT] {
            let v = GemmVariant::new(fam, Epilogue::SwiGlu, Hooks::NONE);
            validate_args(&v, &g(0x100, 7)).unwrap();
            let e = validate_args(&v, &g(0, 7)).unwrap_err().to_string();
            assert!(e.contains("row map"), "{e}");
            let e = validate_args(&v, &g(0x100, 0)).unwrap_err().to_string();
            assert!(e.contains("0 rows"), "{e}");
            let waits = GemmVariant::new(
                fam,
                Epilogue::SwiGlu,
                Hooks {
                    wait: true,
                    raise: false,
                },
            );
            let e = validate_args(&waits, &hooked(g(0x100, 7)))
                .unwrap_err()
                .to_string();
            assert!(e.contains("no dependency waits"), "{e}");
        }
        let c2 = GemmVariant::new(Family::SM90_CLUSTER, Epilogue::Store, Hooks::NONE);
        let e = validate_args(
            &c2,
            &GemmArgs {
                num_tiles: 2,
                ..g(0x100, 7)
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("clusters"), "{e}");
    }

    #[test]
    fn shape_errors_name_the_problem() {
        let v = GemmVariant::new(Family::Sm80, Epilogue::Store, Hooks::NONE);
        validate_args(&v, &args()).unwrap();
        let e = validate_args(&v, &GemmArgs { k: 100, ..args() })
            .unwrap_err()
            .to_string();
        assert!(e.contains("K = 100"), "{e}");
        let e = validate_args(&v, &GemmArgs { n: 96, ..args() })
            .unwrap_err()
            .to_string();
        assert!(e.contains("N = 96"), "{e}");
        let sw = GemmVariant::new(Family::Sm80, Epilogue::SwiGlu, Hooks::NONE);
        assert!(validate_args(
            &sw,
            &GemmArgs {
                n: 192,
                ldc: 96,
                ..args()
            }
        )
        .is_err());
        validate_args(&sw, &GemmArgs { ldc: 128, ..args() }).unwrap();
        let sc = GemmVariant::new(Family::Sm80, Epilogue::Scatter, Hooks::NONE);
        assert!(validate_args(&sc, &args()).is_err());
        let hk = GemmVariant::new(
            Family::Sm80,
            Epilogue::Store,
            Hooks {
                wait: true,
                raise: false,
            },
        );
        assert!(validate_args(&hk, &args()).is_err());
    }

    #[test]
    fn error_words_decode() {
        check_error_word(0).unwrap();
        match check_error_word((1u64 << 32) | 17) {
            Err(KernelError::SignalTimeout { signal: 17, .. }) => {}
            other => panic!("{other:?}"),
        }
        match check_error_word((3u64 << 32) | 5) {
            Err(KernelError::SplitTimeout { tile: 5 }) => {}
            other => panic!("{other:?}"),
        }
    }
}
