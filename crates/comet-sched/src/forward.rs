//! The MoE layer on the device (feature `gpu`; DESIGN.md 6b): tensors in
//! and out in GPU memory, every phase a kernel enqueued on the caller's
//! stream, no host synchronisation, capturable in a CUDA graph.
//!
//! [`MoeLayer::new`] (collective) sizes every buffer for a capacity once,
//! loads the kernels and fixes the [`DevicePlan`]; [`MoeLayer::forward`]
//! then enqueues the phases, the same names as in kernels/moe_forward.cu:
//!
//! 1. `route`: per-expert counts and each slot's index in its segment;
//! 2. `layout`: the count exchange and, on the device, the receive layout,
//!    send tables and both GEMMs' tile lists;
//! 3. `dispatch`: x rows into their final rows on their destinations,
//!    raising `dispatch(le, src)` per segment;
//! 4. `fc1`: the FC1+SwiGLU grouped GEMM over the device tile list, each
//!    tile waiting (overlapped mode) on exactly its segments;
//! 5. `fc2`: FC2 chunk-major, each tile counting into its chunk;
//! 6. `combine`: finished chunks back to their sources, `combine(from, c)`;
//! 7. `reduce`: the weighted top-k sum into y (bf16).
//!
//! Fused, inside the GEMMs (where they are Hopper's, unclustered, and the
//! plan overlaps no link: `plan.side_warps`): the idle warps of their
//! producer warpgroups move the rows. FC1's dispatch, its tiles waiting on the segments they
//! complete; FC2's combine of each finished chunk (a rank alone: the sums
//! of its chunks but the last); the reduce after FC2 on the whole share.
//! Nothing takes an SM from the GEMMs.
//! Overlapped on blocks (fused mode otherwise, when the plan says it pays,
//! or blocks given): dispatch and combine run on a side stream forked from
//! the caller's with `plan.comm_blocks` blocks while the GEMMs take the
//! rest of the rank's share of SMs. Sequential (the non-overlapped
//! baseline, and the fused mode when there is nothing to overlap): the
//! same kernels one after another on the caller's stream with the whole
//! share.
//!
//! Device errors (a bounded wait that timed out, an expert id out of
//! range, rows over a receive capacity) land in an error word whose value
//! the stream copies into pinned host memory at the end of each call: the
//! next `forward` returns it without enqueueing anything, and
//! [`MoeLayer::check`] (which synchronises) returns it at once.

use crate::cpu::ExecMode;
use crate::device_plan::{DevicePlan, KernelTiles};
use crate::error::SchedError;
use crate::proxy_plan::WireFormat;
use comet_core::cost::DeviceFigures;
use comet_core::layout::ring_source;
use comet_core::schedule::SignalMap;
use comet_core::MoeConfig;
use comet_kernels::forward::{
    fill_u16, fill_u32, layout_smem_bytes, CombineParams, DispatchParams, ForwardKernels, Grid,
    GroupTiles, LayoutParams, ReduceParams, RouteParams, Scalars, StatusWord, WaitParams,
};
use comet_kernels::gemm::{DeviceWork, Gather, SideRows, SideWork};
use comet_kernels::{
    Epilogue, GemmArgs, GemmRuntime, GemmVariant, HookArgs, Hooks, KernelError, TileDesc,
};
use comet_transport::gpu::DeviceTransport;
use comet_transport::{BufferId, Initiation, TransportError};
use cudarc::driver::sys::{self, CUdeviceptr, CUstream};
use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr};
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

/// Element type of `topk_ids`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdType {
    I32,
    I64,
}

/// Element type of `topk_weights`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightType {
    F32,
    Bf16,
}

/// One call's tensors, as device pointers (row-major, contiguous).
///
/// - `x`: bf16 `[tokens, hidden]`;
/// - `topk_ids`: `[tokens, top_k]` global expert ids; a negative id drops
///   the slot (it adds nothing to y); an id >= experts is an error;
/// - `topk_weights`: `[tokens, top_k]`, used as given (no renormalising);
/// - `w1`: bf16 `[experts_per_rank, 2 * ffn, hidden]`, this rank's experts:
///   gate rows `[0, ffn)` then up rows (each row a torch `Linear.weight` row);
/// - `w2`: bf16 `[experts_per_rank, hidden, ffn]` (torch `Linear.weight`);
/// - `y`: bf16 `[tokens, hidden]`, fully written:
///   `y[t] = sum_j w[t, j] * (silu(x W_gate^T) * (x W_up^T)) W_2^T` of
///   expert `ids[t, j]`.
#[derive(Debug, Clone, Copy)]
pub struct ForwardArgs {
    pub tokens: usize,
    pub x: CUdeviceptr,
    pub topk_ids: CUdeviceptr,
    pub ids: IdType,
    pub topk_weights: CUdeviceptr,
    pub weights: WeightType,
    pub w1: CUdeviceptr,
    pub w2: CUdeviceptr,
    pub y: CUdeviceptr,
}

/// Options of a layer.
#[derive(Debug, Clone)]
pub struct LayerOptions {
    /// Bound of every device wait; past it the call fails with an error
    /// naming the rank and the signal.
    pub timeout: Duration,
    /// Rows this rank can receive per call (None: the worst case).
    pub recv_capacity: Option<usize>,
    /// Ranks sharing this rank's GPU (each gets its share of the SMs).
    pub ranks_per_gpu: usize,
    /// Device and link figures for the cost model; None: by topology
    /// ([`LayerOptions::figures_for`]).
    pub figures: Option<DeviceFigures>,
    /// How a staged layer's proxy sends dispatch rows between hosts
    /// (kernels that store into peers always store rows, and NCCL's proxy
    /// sends rows); the cost model counts the bytes the same way.
    pub wire_format: WireFormat,
    /// SMs of the GPU left to the transport's own kernels (NCCL's, or a
    /// staged proxy's kernels, which must run while the layer's
    /// kernels spin waiting for what they bring): the ranks on the GPU
    /// share the others. 0: the transport's own choice where it needs
    /// some ([`crate::proxy_plan::PROXY_KERNEL_SMS`] a rank behind a
    /// proxy); else as given, except that NCCL's lanes always get the SMs
    /// they cannot run without.
    pub reserved_sms: usize,
    /// One rank: FC1 reads x's rows in place instead of rows the dispatch
    /// copied into expert order ([`DevicePlan::gather_x`]). Off by
    /// default: it saves the dispatch's copy (0.34 ms for qwen2-moe at
    /// 16384 tokens on an H100) but the layer ran 7-9% slower than over
    /// copied rows on a rested GPU, with its loads arriving on the ring
    /// through the hardware too (docs/PERF.md, 2026-12-06); `comet bench
    /// --gather-x` times it.
    pub gather_x: bool,
    /// Communication blocks beside the overlapped GEMMs (the SMs they
    /// leave free); None: the cost model's choice
    /// ([`DevicePlan::comm_blocks`]). Blocks given always overlap, a rank
    /// alone too ([`DevicePlan::set_comm_blocks`]).
    pub comm_blocks: Option<usize>,
    /// Expert groups of an overlapped call ([`DevicePlan::groups`]);
    /// None: the cost model's choice. More than one is refused where
    /// nothing overlaps a combine or a proxy sums the combine token-once
    /// ([`DevicePlan::set_groups`]).
    pub expert_groups: Option<usize>,
    /// Layer1 column chunks instead of the plan's
    /// ([`DevicePlan::set_chunks`]).
    pub chunks: Option<usize>,
}

impl Default for LayerOptions {
    fn default() -> Self {
        LayerOptions {
            timeout: Duration::from_secs(30),
            recv_capacity: None,
            ranks_per_gpu: 1,
            figures: None,
            wire_format: WireFormat::Tokens,
            reserved_sms: 0,
            gather_x: false,
            comm_blocks: None,
            expert_groups: None,
            chunks: None,
        }
    }
}

impl LayerOptions {
    /// The cost model's figures for `ranks` ranks, `ranks_per_gpu` of them
    /// on each GPU: the given ones, else an H200 whose link is NVLink, or
    /// its own memory when every rank shares the one GPU (where the cost
    /// model then runs the phases in sequence: docs/PERF.md, run 3).
    pub fn figures_for(&self, ranks: usize) -> DeviceFigures {
        match &self.figures {
            Some(f) => f.clone(),
            None if ranks > 1 && self.ranks_per_gpu >= ranks => DeviceFigures::h200_same_gpu(),
            None => DeviceFigures::h200_nvlink(),
        }
    }
}

/// The kernels of one CUDA context, shared by the layers on it.
#[derive(Clone)]
pub struct LayerKernels {
    pub gemm: Arc<GemmRuntime>,
    pub forward: Arc<ForwardKernels>,
}

impl LayerKernels {
    pub fn load(ctx: &Arc<CudaContext>) -> Result<LayerKernels, KernelError> {
        ctx.bind_to_thread()?;
        Ok(LayerKernels {
            gemm: Arc::new(GemmRuntime::new(Arc::clone(ctx))?),
            forward: Arc::new(ForwardKernels::load(ctx)?),
        })
    }

    /// The GEMM variants a layer launches: FC1 (SwiGLU) waiting on its
    /// segments or not, FC2 counting into chunks or not.
    fn variants(&self) -> Variants {
        let family = layer_family(self.gemm.default_family());
        let wait = Hooks {
            wait: true,
            raise: false,
        };
        let raise = Hooks {
            wait: false,
            raise: true,
        };
        Variants {
            fc1_wait: GemmVariant::new(family, Epilogue::SwiGlu, wait),
            fc1: GemmVariant::new(family, Epilogue::SwiGlu, Hooks::NONE),
            fc2_raise: GemmVariant::new(family, Epilogue::Store, raise),
            fc2: GemmVariant::new(family, Epilogue::Store, Hooks::NONE),
        }
    }

    /// Tile sizes of the variants (for the plan).
    pub fn tiles(&self) -> KernelTiles {
        self.variants().tiles()
    }
}

#[derive(Debug, Clone, Copy)]
struct Variants {
    fc1_wait: GemmVariant,
    fc1: GemmVariant,
    fc2_raise: GemmVariant,
    fc2: GemmVariant,
}

impl Variants {
    fn tiles(&self) -> KernelTiles {
        tiles_of(&self.fc1, &self.fc2)
    }
}

/// The tile shape and raster groups of an FC1 and an FC2 variant.
fn tiles_of(fc1: &GemmVariant, fc2: &GemmVariant) -> KernelTiles {
    KernelTiles {
        // A side warp's sums go in rounds of 32 vectors (256 columns).
        side_warps: matches!(fc1.family, comet_kernels::Family::Sm90 { cluster: 1, .. })
            && fc2.tile_out_cols().is_multiple_of(256),
        bm: fc1.tile_rows(),
        fc1_cols: fc1.tile_out_cols(),
        fc2_cols: fc2.tile_out_cols(),
        fc1_group: comet_kernels::tiles::raster_group(fc1),
        fc2_group: comet_kernels::tiles::raster_group(fc2),
    }
}

/// The family a layer launches for `family`: device tile counts need one
/// CTA per tile, so a clustered family's unclustered form.
fn layer_family(family: comet_kernels::Family) -> comet_kernels::Family {
    if family.cluster() != 1 {
        comet_kernels::Family::SM90_TMA
    } else {
        family
    }
}

/// Tile sizes of the kernels the default GEMM family of `target` launches
/// (what `comet plan` shows without a GPU).
pub fn kernel_tiles_for(family: comet_kernels::Family) -> KernelTiles {
    let family = layer_family(family);
    let v = |e| GemmVariant::new(family, e, Hooks::NONE);
    tiles_of(&v(Epilogue::SwiGlu), &v(Epilogue::Store))
}

/// How one of a call's GEMM launches runs.
#[derive(Debug, Clone, Copy)]
struct GemmLaunch {
    /// FC1 waits on its segments, FC2 counts its chunks.
    hooked: bool,
    /// That expert group's tiles, else the whole list.
    group: Option<usize>,
    /// CTAs of the persistent grid.
    grid: usize,
    /// Rows the producer's idle warps move beside the tiles.
    side: Option<SideWork>,
}

impl GemmLaunch {
    fn plain(grid: usize) -> GemmLaunch {
        GemmLaunch {
            hooked: false,
            group: None,
            grid,
            side: None,
        }
    }

    fn hooked(grid: usize) -> GemmLaunch {
        GemmLaunch {
            hooked: true,
            ..GemmLaunch::plain(grid)
        }
    }

    fn of_group(self, g: usize) -> GemmLaunch {
        GemmLaunch {
            group: Some(g),
            ..self
        }
    }

    fn with(self, side: SideWork) -> GemmLaunch {
        GemmLaunch {
            side: Some(side),
            ..self
        }
    }
}

/// The layout tables of one call as the device derived them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceLayout {
    /// This rank's send offset of each global expert, and the total.
    pub send_off: Vec<i32>,
    /// First row of (expert e, this rank) on e's owner.
    pub dest_row: Vec<i32>,
    /// This rank's receive segments, expert-major then arrival order:
    /// [first row, rows, source, the source's send position].
    pub segments: Vec<[i32; 4]>,
    /// Rows received from each source, per expert group (group-major:
    /// `[group * ranks + source]`).
    pub rows_from: Vec<i32>,
    /// Each expert group's runs of the tile lists.
    pub groups: Vec<GroupTiles>,
}

/// What one finished call did (read by [`MoeLayer::check`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallInfo {
    pub recv_rows: usize,
    pub sent_rows: usize,
    pub fc1_tiles: usize,
    pub fc2_tiles: usize,
}

/// The symmetric buffers (peers write into them) and every rank's address
/// of them.
struct Symmetric {
    counts: BufferId,
    recv: BufferId,
    comb: BufferId,
    /// This rank's copies, resolved once (they never move).
    counts_at: CUdeviceptr,
    recv_at: CUdeviceptr,
    comb_at: CUdeviceptr,
    signals_at: CUdeviceptr,
}

impl Symmetric {
    /// The symmetric buffers and signals on the transport, sized for the
    /// plan (every rank allocates the same, collectively).
    fn alloc<T: DeviceTransport>(
        t: &T,
        plan: &DevicePlan,
        map: &SignalMap,
    ) -> Result<Symmetric, SchedError> {
        let (w, h, e) = (plan.cfg.ranks, plan.cfg.hidden, plan.cfg.experts);
        let sized = |e| plans_differ(t.rank(), plan, e);
        let (counts, recv, comb) = (
            t.alloc_buffer(2 * w * e * 4).map_err(sized)?,
            t.alloc_buffer(plan.recv_capacity * h * 2).map_err(sized)?,
            t.alloc_buffer(plan.send_capacity() * h * 2)
                .map_err(sized)?,
        );
        t.alloc_signals(map.wire_len()).map_err(sized)?;
        Ok(Symmetric {
            counts,
            recv,
            comb,
            counts_at: t.buffer_ptr(counts)?,
            recv_at: t.buffer_ptr(recv)?,
            comb_at: t.buffer_ptr(comb)?,
            signals_at: t.signals_ptr()?,
        })
    }
}

/// Device memory a layer owns, sized once for its plan. Zeroed per call:
/// `counters` (segment, chunk and combine counts).
struct Scratch {
    _mem: Vec<CudaSlice<u8>>,
    counters: CUdeviceptr,
    counters_words: usize,
    chunk_done: CUdeviceptr,
    cnt: CUdeviceptr,
    seg_done: CUdeviceptr,
    comb_done: CUdeviceptr,
    /// u32 work counters of the GEMMs' side warps: FC1's, FC2's.
    side_next: CUdeviceptr,
    /// [`GroupTiles`] per expert group, among the counters.
    group_tiles: CUdeviceptr,
    epoch: CUdeviceptr,
    err: CUdeviceptr,
    sc: CUdeviceptr,
    local_idx: CUdeviceptr,
    send_slots: CUdeviceptr,
    send_off: CUdeviceptr,
    dest_row: CUdeviceptr,
    segs: CUdeviceptr,
    rows_from: CUdeviceptr,
    fc1_tiles: CUdeviceptr,
    fc2_tiles: CUdeviceptr,
    deps: CUdeviceptr,
    peer_counts: CUdeviceptr,
    peer_signals: CUdeviceptr,
    peer_recv: CUdeviceptr,
    peer_comb: CUdeviceptr,
    act: CUdeviceptr,
    out: CUdeviceptr,
    /// i32 token per receive row (plan.gather_x), else 0.
    gather_rows: CUdeviceptr,
}

/// Byte offsets inside the state block: epoch, error word, scalars.
const STATE_EPOCH: u64 = 0;
const STATE_ERR: u64 = 8;
const STATE_SCALARS: u64 = 16;
const STATE_BYTES: usize = 16 + std::mem::size_of::<Scalars>();

/// One rank's MoE layer on the device (see the module docs).
///
/// Its memory goes with it: drop it only once the streams it enqueued on
/// have run its calls (`check` waits for that) and every rank has met
/// (the transport's barrier), or a kernel still running, here or on a
/// peer, may touch freed memory.
pub struct MoeLayer<T: DeviceTransport> {
    plan: DevicePlan,
    t: T,
    k: LayerKernels,
    v: Variants,
    sym: Symmetric,
    s: Scratch,
    map: SignalMap,
    side: Arc<CudaStream>,
    fork: CudaEvent,
    join: CudaEvent,
    status: StatusWord,
    mode: ExecMode,
    timeout_ns: u64,
    /// Calls whose route was enqueued: the device's epoch counter after
    /// them (route bumps it), whatever failed later in the call.
    routed: u64,
    /// Timing events around the phases of sequential calls, when asked.
    marks: Option<PhaseMarks>,
}

/// The phases of a sequential call, in order (dispatch includes its wait).
pub const PHASES: [&str; 7] = [
    "route", "layout", "dispatch", "fc1", "fc2", "combine", "reduce",
];

/// The least a fused call can take by the phases of a sequential one
/// (`times` in [`PHASES`] order, ms), were each phase as long in a fused
/// call: each layer hides only its own transfer, so route + layout +
/// max(dispatch, fc1) + max(fc2, combine + reduce) (ARCHITECTURE.md, "What
/// is overlapped"). Ranks sharing a GPU run their GEMMs at once in
/// sequence but staggered when fused, so there fused calls can beat it.
/// None unless every phase is there.
pub fn overlap_bound_ms(times: &[f32]) -> Option<f32> {
    let &[route, layout, dispatch, fc1, fc2, combine, reduce] = times else {
        return None;
    };
    Some(route + layout + dispatch.max(fc1) + fc2.max(combine + reduce))
}

/// One timing event before the first phase and one after each.
struct PhaseMarks {
    events: Vec<CudaEvent>,
    /// Whether the last call recorded all of them (it ran in sequence).
    complete: bool,
}

fn dev(rank: usize, what: &str, e: impl std::fmt::Display) -> SchedError {
    SchedError::Device {
        rank,
        message: format!("{what}: {e}"),
    }
}

/// A collective allocation that differs between ranks most often means
/// their plans differ (each derives its own from its GPU: SMs, reserved
/// SMs, options); say so with this rank's plan, not only the byte counts.
fn plans_differ(rank: usize, plan: &DevicePlan, e: TransportError) -> SchedError {
    match e {
        TransportError::Mismatch { detail, what, .. } => {
            let mine: Vec<String> = plan
                .protocol()
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            SchedError::Input {
                rank,
                message: format!(
                    "the ranks' layer set-up differs ({what}: {detail}), as when they derive \
                     different device plans; this rank's is {}: every rank needs the same GPU \
                     model, reserved SMs and layer options",
                    mine.join(", ")
                ),
            }
        }
        e => e.into(),
    }
}

fn kerr(rank: usize) -> impl Fn(KernelError) -> SchedError {
    move |source| SchedError::Kernel { rank, source }
}

impl<T: DeviceTransport> MoeLayer<T> {
    /// Collective: every rank of the transport's world calls it together.
    /// `capacity` is the most tokens one call of this rank may carry.
    pub fn new(
        cfg: &MoeConfig,
        capacity: usize,
        t: T,
        kernels: &LayerKernels,
        opts: &LayerOptions,
    ) -> Result<Self, SchedError> {
        let rank = t.rank();
        if t.world() != cfg.ranks {
            return Err(SchedError::Input {
                rank,
                message: format!(
                    "transport world {} but config has {} ranks",
                    t.world(),
                    cfg.ranks
                ),
            });
        }
        let ctx = Arc::clone(t.comm_stream().context());
        ctx.bind_to_thread()
            .map_err(|e| dev(rank, "bind context", e))?;
        let v = kernels.variants();
        let plan = Self::device_plan(cfg, capacity, &t, kernels, opts)?;
        for var in [v.fc1_wait, v.fc1, v.fc2_raise, v.fc2] {
            kernels.gemm.prepare(&var).map_err(kerr(rank))?;
        }
        let map = SignalMap::new(cfg, plan.pieces());
        let sym = Symmetric::alloc(&t, &plan, &map)?;
        let side = ctx
            .new_stream()
            .map_err(|e| dev(rank, "create side stream", e))?;
        let no_timing = Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING);
        let fork = ctx
            .new_event(no_timing)
            .map_err(|e| dev(rank, "create event", e))?;
        let join = ctx
            .new_event(no_timing)
            .map_err(|e| dev(rank, "create event", e))?;
        let s = Scratch::new(&plan, &map, &t, &side, &sym)?;
        let status = StatusWord::new(&ctx).map_err(kerr(rank))?;
        side.synchronize()
            .map_err(|e| dev(rank, "synchronize setup", e))?;
        t.barrier(opts.timeout)?;
        Ok(MoeLayer {
            plan,
            t,
            k: kernels.clone(),
            v,
            sym,
            s,
            map,
            side,
            fork,
            join,
            status,
            mode: ExecMode::Fused,
            timeout_ns: opts.timeout.as_nanos().min(u64::MAX as u128) as u64,
            routed: 0,
            marks: None,
        })
    }

    /// The plan this layer runs on this GPU: the cost model's figures for
    /// the transport (a proxy's wire format where one carries the bytes),
    /// the SMs left after `opts.reserved_sms`, and the options' overrides.
    fn device_plan(
        cfg: &MoeConfig,
        capacity: usize,
        t: &T,
        kernels: &LayerKernels,
        opts: &LayerOptions,
    ) -> Result<DevicePlan, SchedError> {
        let rank = t.rank();
        let mut figures = opts.figures_for(cfg.ranks);
        if t.capabilities().initiation == Initiation::Host {
            // A proxy carries the bytes, in its dispatch wire format, from
            // mirrors the communication blocks fill.
            figures.wire = opts.wire_format;
            figures.proxy = true;
        }
        let sms = kernels.gemm.sm_count() as usize;
        if opts.reserved_sms >= sms {
            return Err(SchedError::Input {
                rank,
                message: format!(
                    "{} SMs reserved for the transport leave none of the GPU's {sms} to the layer",
                    opts.reserved_sms
                ),
            });
        }
        let mut plan = DevicePlan::new(
            cfg,
            capacity,
            opts.recv_capacity,
            sms - opts.reserved_sms,
            opts.ranks_per_gpu,
            kernels.variants().tiles(),
            &figures,
        )?;
        if opts.gather_x && cfg.ranks == 1 {
            plan.gather_in_place();
        }
        if let Some(n) = opts.comm_blocks {
            plan.set_comm_blocks(n);
        }
        if let Some(n) = opts.expert_groups {
            plan.set_groups(n)?;
        }
        if let Some(n) = opts.chunks {
            plan.set_chunks(n)?;
        }
        if layout_smem_bytes(cfg.ranks, cfg.experts) > comet_kernels::forward::LAYOUT_SMEM_MAX {
            return Err(SchedError::Input {
                rank,
                message: format!(
                    "{} ranks x {} experts exceed the device layout's shared memory",
                    cfg.ranks, cfg.experts
                ),
            });
        }
        Ok(plan)
    }

    pub fn plan(&self) -> &DevicePlan {
        &self.plan
    }

    /// The symmetric buffers on the transport: counts, recv, comb (what a
    /// proxy that carries them needs to know them by).
    pub fn symmetric_buffers(&self) -> [BufferId; 3] {
        [self.sym.counts, self.sym.recv, self.sym.comb]
    }

    /// Device address of the call's send order (the slot at each send
    /// position, i32, written by the layout phase): what a token-once proxy
    /// reads to know which token each dispatch row is.
    pub(crate) fn send_order_ptr(&self) -> u64 {
        self.s.send_slots
    }

    /// The layer's kernels (a proxy launches its landing kernels from them).
    pub(crate) fn kernels(&self) -> &LayerKernels {
        &self.k
    }

    pub fn rank(&self) -> usize {
        self.t.rank()
    }

    pub fn transport(&self) -> &T {
        &self.t
    }

    /// Fused (overlapped where the plan says so) or the non-overlapped
    /// baseline; every rank must use the same mode for a call.
    pub fn set_mode(&mut self, mode: ExecMode) {
        self.mode = mode;
    }

    pub fn mode(&self) -> ExecMode {
        self.mode
    }

    /// Enqueues one call on `stream` and returns at once.
    ///
    /// # Safety
    /// Every pointer in `a` is device memory of this layer's context with
    /// the shape [`ForwardArgs`] documents, and stays valid (and unwritten
    /// by others) until `stream` has run the call. `stream` belongs to the
    /// same context.
    pub unsafe fn forward(&mut self, stream: CUstream, a: &ForwardArgs) -> Result<(), SchedError> {
        self.check_args(a)?;
        // First: a failed last call's status is cleared by a memset on
        // this layer's side stream, which needs its context current.
        self.bind()?;
        self.take_status()?;
        // SAFETY: the caller's contract covers `a` and `stream`; everything
        // else is this layer's own memory, sized by its plan.
        unsafe {
            self.begin(stream)?;
            let fused = self.mode == ExecMode::Fused;
            let sequential = !(fused && (self.plan.overlap || self.plan.side_warps));
            if let Some(m) = self.marks.as_mut() {
                m.complete = sequential || self.plan.side_warps;
            }
            self.mark(0, stream)?;
            self.route(stream, a)?;
            self.mark(1, stream)?;
            self.layout(stream, a)?;
            self.mark(2, stream)?;
            if sequential {
                self.sequential(stream, a)?;
            } else if self.plan.side_warps {
                self.inside(stream, a)?;
            } else {
                self.overlapped(stream, a)?;
            }
            self.finish(stream)
        }
    }

    /// Records a timing event around every phase of the calls that follow
    /// in sequence or on the GEMMs' side warps (a
    /// diagnosis of where a call's time goes: a record per phase on the
    /// host; on the side warps the dispatch is inside FC1, and the combine
    /// or, alone, all chunks' sums but the last inside FC2), or stops.
    pub fn time_phases(&mut self, on: bool) -> Result<(), SchedError> {
        if !on {
            self.marks = None;
            return Ok(());
        }
        let rank = self.rank();
        let ctx = self.t.comm_stream().context().clone();
        let events = (0..=PHASES.len())
            .map(|_| {
                ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                    .map_err(|e| dev(rank, "create timing event", e))
            })
            .collect::<Result<_, _>>()?;
        self.marks = Some(PhaseMarks {
            events,
            complete: false,
        });
        Ok(())
    }

    /// Milliseconds of each of [`PHASES`] in the last call, once its stream
    /// has run it (`check`); `None` unless phases are timed and the call
    /// ran in sequence or on the side warps.
    pub fn phase_times(&self) -> Result<Option<Vec<f32>>, SchedError> {
        let Some(m) = self.marks.as_ref().filter(|m| m.complete) else {
            return Ok(None);
        };
        let rank = self.rank();
        m.events
            .windows(2)
            .map(|w| {
                w[0].elapsed_ms(&w[1])
                    .map_err(|e| dev(rank, "read timing event", e))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// Records timing event `i` on `stream` when phases are timed.
    unsafe fn mark(&self, i: usize, stream: CUstream) -> Result<(), SchedError> {
        let Some(m) = self.marks.as_ref() else {
            return Ok(());
        };
        // SAFETY: a live event of this layer's context, on the caller's
        // live stream of the same context.
        unsafe { sys::cuEventRecord(m.events[i].cu_event(), stream) }
            .result()
            .map_err(|e| dev(self.rank(), "record timing event", e))
    }

    /// Makes this layer's context current on the calling thread.
    fn bind(&self) -> Result<(), SchedError> {
        let rank = self.rank();
        self.t
            .comm_stream()
            .context()
            .bind_to_thread()
            .map_err(|e| dev(rank, "bind context", e))
    }

    /// Waits for `stream` (and this layer's side stream), then returns the
    /// first device error of the calls so far, or what the last call did.
    ///
    /// # Safety
    /// `stream` is a live stream of this layer's context.
    pub unsafe fn check(&mut self, stream: CUstream) -> Result<CallInfo, SchedError> {
        let rank = self.rank();
        // SAFETY: synchronising a live stream handle of this context.
        unsafe { sys::cuStreamSynchronize(stream) }
            .result()
            .map_err(|e| dev(rank, "synchronize", e))?;
        self.side
            .synchronize()
            .map_err(|e| dev(rank, "synchronize side stream", e))?;
        let mut state = [0u8; STATE_BYTES];
        self.side
            .memcpy_dtoh(&self.state_view(), &mut state)
            .map_err(|e| dev(rank, "read state", e))?;
        self.side
            .synchronize()
            .map_err(|e| dev(rank, "read state", e))?;
        let word = u64::from_le_bytes(state[8..16].try_into().expect("8 bytes"));
        if word != 0 {
            self.status.clear();
            self.clear_error()?;
            return Err(self.device_error(word));
        }
        let sc = |i: usize| {
            i32::from_le_bytes(state[16 + 4 * i..20 + 4 * i].try_into().expect("4 bytes")).max(0)
                as usize
        };
        Ok(CallInfo {
            recv_rows: sc(1),
            sent_rows: sc(2),
            fc1_tiles: sc(4),
            fc2_tiles: sc(5),
        })
    }

    /// The layout tables the last call derived on the device (waits for
    /// `stream`): what tests compare with comet-core's `LayoutPlan`.
    ///
    /// # Safety
    /// `stream` is a live stream of this layer's context.
    pub unsafe fn layout_tables(&mut self, stream: CUstream) -> Result<DeviceLayout, SchedError> {
        // SAFETY: forwarded contract.
        unsafe { self.check(stream) }?;
        let (e, w, groups) = (self.plan.cfg.experts, self.plan.cfg.ranks, self.plan.groups);
        let rank = self.rank();
        let read = |src: CUdeviceptr, n: usize| -> Result<Vec<i32>, SchedError> {
            let mut bytes = vec![0u8; 4 * n];
            // SAFETY: src is a scratch table of at least n i32 (Scratch::new);
            // the copy is synchronous.
            unsafe { cudarc::driver::result::memcpy_dtoh_sync(&mut bytes, src) }
                .map_err(|err| dev(rank, "read layout tables", err))?;
            Ok(bytes
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect())
        };
        let segs = read(self.s.segs, 4 * e)?;
        Ok(DeviceLayout {
            send_off: read(self.s.send_off, e + 1)?,
            dest_row: read(self.s.dest_row, e)?,
            segments: segs
                .chunks_exact(4)
                .map(|c| [c[0], c[1], c[2], c[3]])
                .collect(),
            rows_from: read(self.s.rows_from, w * groups)?,
            groups: read(self.s.group_tiles, 8 * groups)?
                .chunks_exact(8)
                .map(|g| GroupTiles {
                    fc1_first: g[0],
                    fc1_tiles: g[1],
                    fc2_first: g[2],
                    fc2_tiles: g[3],
                    piece_tiles: g[4],
                    pad: [0; 3],
                })
                .collect(),
        })
    }

    fn state_view(&self) -> cudarc::driver::CudaView<'_, u8> {
        self.s._mem[0].slice(0..STATE_BYTES)
    }

    /// Host-side checks, before anything is enqueued.
    fn check_args(&self, a: &ForwardArgs) -> Result<(), SchedError> {
        let rank = self.rank();
        let bad = |m: String| Err(SchedError::Input { rank, message: m });
        if a.tokens > self.plan.capacity {
            return bad(format!(
                "{} tokens exceed the layer's capacity of {}",
                a.tokens, self.plan.capacity
            ));
        }
        for (p, what) in [
            (a.x, "x"),
            (a.topk_ids, "topk_ids"),
            (a.topk_weights, "topk_weights"),
            (a.y, "y"),
        ] {
            if a.tokens > 0 && p == 0 {
                return bad(format!("{what} is a null pointer"));
            }
        }
        for (p, what) in [(a.w1, "w1"), (a.w2, "w2")] {
            if p == 0 {
                return bad(format!("{what} is a null pointer"));
            }
        }
        for (p, what) in [(a.x, "x"), (a.y, "y"), (a.w1, "w1"), (a.w2, "w2")] {
            if p % 16 != 0 {
                return bad(format!("{what} must be 16-byte aligned (got {p:#x})"));
            }
        }
        Ok(())
    }

    /// An earlier call's device error (from the status word), if any.
    fn take_status(&mut self) -> Result<(), SchedError> {
        let word = self.status.read();
        if word == 0 {
            return Ok(());
        }
        self.status.clear();
        self.clear_error()?;
        Err(self.device_error(word))
    }

    fn clear_error(&self) -> Result<(), SchedError> {
        let rank = self.rank();
        // SAFETY: the error word (two u32) of this layer's state block, on
        // its side stream, synchronised next.
        unsafe { fill_u32(self.side.cu_stream(), self.s.err, 0, 2) }.map_err(kerr(rank))?;
        self.side
            .synchronize()
            .map_err(|e| dev(rank, "clear error word", e))
    }

    /// Names what a device error word means for this layer.
    fn device_error(&self, word: u64) -> SchedError {
        let rank = self.rank();
        match KernelError::from_error_word(word) {
            Some(KernelError::SignalTimeout { signal, .. }) => SchedError::Device {
                rank,
                message: format!(
                    "device wait timed out on {}",
                    signal_name(&self.map, self.plan.groups, signal as usize)
                ),
            },
            Some(source) => SchedError::Kernel { rank, source },
            None => dev(rank, "error word", "empty"),
        }
    }

    /// Zeroes this call's counters.
    unsafe fn begin(&self, stream: CUstream) -> Result<(), SchedError> {
        // SAFETY: the counters block of the scratch, on the call's stream.
        unsafe { fill_u32(stream, self.s.counters, 0, self.s.counters_words) }
            .map_err(kerr(self.rank()))
    }

    fn route_params(&self, a: &ForwardArgs) -> RouteParams {
        RouteParams {
            ids: a.topk_ids,
            cnt: self.s.cnt,
            local_idx: self.s.local_idx,
            epoch: self.s.epoch,
            err: self.s.err,
            slots: (a.tokens * self.plan.cfg.top_k) as i32,
            experts: self.plan.cfg.experts as i32,
            ids_i64: i32::from(a.ids == IdType::I64),
            pad: 0,
        }
    }

    unsafe fn route(&mut self, stream: CUstream, a: &ForwardArgs) -> Result<(), SchedError> {
        let g = Grid {
            blocks: self.plan.route_blocks(a.tokens) as u32,
            smem: (4 * self.plan.cfg.experts) as u32,
        };
        // SAFETY: ids has tokens*k entries (caller); the rest is scratch.
        unsafe { self.k.forward.route(&self.route_params(a), g, stream) }
            .map_err(kerr(self.rank()))?;
        self.routed += 1;
        Ok(())
    }

    /// Calls of the protocol enqueued so far (each bumped the device's
    /// epoch), counting those that failed after their route: what a proxy
    /// must follow call by call.
    pub fn calls(&self) -> u64 {
        self.routed
    }

    fn layout_params(&self, a: &ForwardArgs) -> Result<LayoutParams, SchedError> {
        let (cfg, p) = (&self.plan.cfg, &self.plan);
        Ok(LayoutParams {
            cnt: self.s.cnt,
            ids: a.topk_ids,
            local_idx: self.s.local_idx,
            counts: self.sym.counts_at,
            peer_counts: self.s.peer_counts,
            peer_signals: self.s.peer_signals,
            signals: self.sym.signals_at,
            epoch: self.s.epoch,
            err: self.s.err,
            sc: self.s.sc,
            send_off: self.s.send_off,
            dest_row: self.s.dest_row,
            segs: self.s.segs,
            rows_from: self.s.rows_from,
            send_slots: self.s.send_slots,
            fc1: self.s.fc1_tiles,
            fc2: self.s.fc2_tiles,
            group_tiles: self.s.group_tiles,
            timeout_ns: self.timeout_ns,
            slots: (a.tokens * cfg.top_k) as i32,
            experts: cfg.experts as i32,
            ranks: cfg.ranks as i32,
            me: self.rank() as i32,
            epr: cfg.experts_per_rank() as i32,
            ids_i64: i32::from(a.ids == IdType::I64),
            recv_cap: p.recv_capacity as i32,
            bm: p.tiles.bm as i32,
            ncol1: (cfg.ffn / p.tiles.fc1_cols) as i32,
            bn1: p.tiles.fc1_cols as i32,
            nc2: (p.chunk_cols / p.tiles.fc2_cols) as i32,
            bn2: p.tiles.fc2_cols as i32,
            cols: p.chunk_cols as i32,
            chunks: p.chunks as i32,
            group1: p.tiles.fc1_group as i32,
            group2: p.tiles.fc2_group as i32,
            groups: p.groups as i32,
            pad: 0,
        })
    }

    unsafe fn layout(&self, stream: CUstream, a: &ForwardArgs) -> Result<(), SchedError> {
        let cfg = &self.plan.cfg;
        let g = Grid {
            blocks: self.plan.aux_blocks.min(32) as u32,
            smem: layout_smem_bytes(cfg.ranks, cfg.experts) as u32,
        };
        let p = self.layout_params(a)?;
        // SAFETY: as in route; peer tables hold live symmetric addresses.
        unsafe { self.k.forward.layout(&p, g, stream) }.map_err(kerr(self.rank()))
    }

    /// What the dispatch reads and writes; `gather`: the sequential
    /// dispatch writes each receive row's token instead of copying it.
    fn dispatch_params(&self, a: &ForwardArgs, gather: bool) -> DispatchParams {
        let cfg = &self.plan.cfg;
        DispatchParams {
            x: a.x,
            ids: a.topk_ids,
            local_idx: self.s.local_idx,
            send_slots: self.s.send_slots,
            send_off: self.s.send_off,
            dest_row: self.s.dest_row,
            cnt: self.s.cnt,
            seg_done: self.s.seg_done,
            peer_recv: self.s.peer_recv,
            peer_signals: self.s.peer_signals,
            sc: self.s.sc,
            epoch: self.s.epoch,
            gather_rows: if gather { self.s.gather_rows } else { 0 },
            hidden: cfg.hidden as i32,
            k: cfg.top_k as i32,
            experts: cfg.experts as i32,
            epr: cfg.experts_per_rank() as i32,
            ranks: cfg.ranks as i32,
            me: self.rank() as i32,
            ids_i64: i32::from(a.ids == IdType::I64),
            tokens: a.tokens as i32,
        }
    }

    /// Overlapped: send positions in ring order (own rows first), a few
    /// blocks. Sequential: a warp per token, x read once, the whole share.
    unsafe fn dispatch(
        &self,
        stream: CUstream,
        a: &ForwardArgs,
        blocks: usize,
        overlapped: bool,
    ) -> Result<(), SchedError> {
        let p = self.dispatch_params(a, !overlapped && self.gathers(a));
        let (f, g) = (&self.k.forward, Grid::blocks(blocks as u32));
        // SAFETY: x has tokens rows of hidden (caller); the rest is scratch
        // and the peers' receive buffers of the plan's capacity.
        unsafe {
            if overlapped {
                f.dispatch(&p, g, stream)
            } else {
                f.dispatch_tokens(&p, g, stream)
            }
        }
        .map_err(kerr(self.rank()))
    }

    /// Sequential mode: every segment of this rank has landed. Alone, the
    /// rank's own dispatch ran before on the same stream: nothing to wait
    /// for, and a launch less on the host.
    unsafe fn wait_dispatch(&self, stream: CUstream) -> Result<(), SchedError> {
        let w = self.plan.cfg.ranks;
        if w == 1 {
            return Ok(());
        }
        let first = self.map.wire(self.map.dispatch(0, 0)).index() as usize;
        // SAFETY: indices inside this rank's signal array.
        unsafe { self.wait_signals(stream, first, self.plan.cfg.experts_per_rank() * w) }
    }

    /// Every other rank's combine chunks have landed here (this rank's own
    /// rows are never sent, so its own combine signals are skipped).
    unsafe fn wait_combine(&self, stream: CUstream) -> Result<(), SchedError> {
        let (w, me, chunks) = (self.plan.cfg.ranks, self.rank(), self.plan.pieces());
        let at = |from: usize| self.map.wire(self.map.combine(from, 0)).index() as usize;
        // SAFETY: both ranges lie inside this rank's signal array.
        unsafe {
            self.wait_signals(stream, at(0), me * chunks)?;
            self.wait_signals(stream, at(0) + (me + 1) * chunks, (w - me - 1) * chunks)
        }
    }

    /// Waits on signals `first .. first + count` of this rank for the call.
    unsafe fn wait_signals(
        &self,
        stream: CUstream,
        first: usize,
        count: usize,
    ) -> Result<(), SchedError> {
        if count == 0 {
            return Ok(());
        }
        let p = WaitParams {
            signals: self.sym.signals_at,
            sc: self.s.sc,
            epoch: self.s.epoch,
            err: self.s.err,
            timeout_ns: self.timeout_ns,
            first: first as i32,
            count: count as i32,
        };
        // SAFETY: the caller's indices are inside this rank's signal array.
        unsafe { self.k.forward.wait(&p, stream) }.map_err(kerr(self.rank()))
    }

    /// What a GEMM launch reads on the device: FC1's (`fc2` false) or
    /// FC2's tiles, of the whole list or of expert group `group`'s run.
    fn work(&self, fc2: bool, group: Option<usize>, grid: usize) -> DeviceWork {
        use std::mem::{offset_of, size_of};
        let (num_tiles, first_tile) = match (group, fc2) {
            (None, false) => (self.s.sc + offset_of!(Scalars, fc1_tiles) as u64, 0),
            (None, true) => (self.s.sc + offset_of!(Scalars, fc2_tiles) as u64, 0),
            (Some(g), _) => {
                let at = self.s.group_tiles + (g * size_of::<GroupTiles>()) as u64;
                let (first, tiles) = if fc2 {
                    (
                        offset_of!(GroupTiles, fc2_first),
                        offset_of!(GroupTiles, fc2_tiles),
                    )
                } else {
                    (
                        offset_of!(GroupTiles, fc1_first),
                        offset_of!(GroupTiles, fc1_tiles),
                    )
                };
                (at + tiles as u64, at + first as u64)
            }
        };
        DeviceWork {
            num_tiles,
            epoch: self.s.epoch,
            grid: grid as u32,
            first_tile,
        }
    }

    /// Whether this call's FC1 reads x in place: one rank (nothing to
    /// send) and rows to read. The sequential dispatch then only writes
    /// each receive row's token.
    fn gathers(&self, a: &ForwardArgs) -> bool {
        self.plan.gather_x && a.tokens > 0
    }

    /// `gather`: A is x, its rows by the dispatch's gather rows.
    unsafe fn fc1(
        &self,
        stream: CUstream,
        a: &ForwardArgs,
        gather: bool,
        l: GemmLaunch,
    ) -> Result<(), SchedError> {
        let (cfg, p) = (&self.plan.cfg, &self.plan);
        let v = if l.hooked {
            self.v.fc1_wait
        } else {
            self.v.fc1
        };
        // Rows read are tokens, all below this call's count.
        let gather = gather.then_some(Gather {
            rows: self.s.gather_rows,
            src_rows: p.capacity,
        });
        let args = GemmArgs {
            a: if gather.is_some() {
                a.x
            } else {
                self.sym.recv_at
            },
            b: a.w1,
            c: self.s.act,
            tiles: self.s.fc1_tiles,
            num_tiles: p.fc1_tiles_cap(),
            total_rows: p.recv_capacity,
            k: cfg.hidden,
            n: 2 * cfg.ffn,
            ldc: cfg.ffn,
            experts: cfg.experts_per_rank(),
            scatter_idx: 0,
            scatter_w: 0,
            err: self.s.err,
            hooks: l.hooked.then_some(HookArgs {
                signals: self.sym.signals_at,
                deps: self.s.deps,
                wait_target: 0,
                raise_value: 0,
                timeout_ns: self.timeout_ns,
            }),
            split: None,
            device: Some(self.work(false, l.group, l.grid)),
            gather,
            side: l.side,
        };
        self.launch_gemm(&v, &args, stream)
    }

    unsafe fn fc2(
        &self,
        stream: CUstream,
        a: &ForwardArgs,
        l: GemmLaunch,
    ) -> Result<(), SchedError> {
        let (cfg, p) = (&self.plan.cfg, &self.plan);
        let v = if l.hooked {
            self.v.fc2_raise
        } else {
            self.v.fc2
        };
        let args = GemmArgs {
            a: self.s.act,
            b: a.w2,
            c: self.s.out,
            tiles: self.s.fc2_tiles,
            num_tiles: p.fc2_tiles_cap(),
            total_rows: p.recv_capacity,
            k: cfg.ffn,
            n: cfg.hidden,
            ldc: cfg.hidden,
            experts: cfg.experts_per_rank(),
            scatter_idx: 0,
            scatter_w: 0,
            err: self.s.err,
            hooks: l.hooked.then_some(HookArgs {
                signals: self.s.chunk_done,
                deps: 0,
                wait_target: 0,
                raise_value: 0,
                timeout_ns: self.timeout_ns,
            }),
            split: None,
            device: Some(self.work(true, l.group, l.grid)),
            gather: None,
            side: l.side,
        };
        self.launch_gemm(&v, &args, stream)
    }

    fn launch_gemm(
        &self,
        v: &GemmVariant,
        args: &GemmArgs,
        stream: CUstream,
    ) -> Result<(), SchedError> {
        // SAFETY: A, C and the tile list are this layer's buffers sized for
        // the plan's capacity (tile lists hold fc*_tiles_cap entries, rows
        // stay below recv_capacity); B is the caller's weights of the shape
        // ForwardArgs documents; all live until the stream has run.
        unsafe { self.k.gemm.launch_raw(v, args, stream) }.map_err(kerr(self.rank()))
    }

    /// What the combine of `pieces` (of the plan's layer1 pieces) reads
    /// and writes. `beside_fc2`: while FC2 runs, each piece sent once its
    /// FC2 tiles are counted.
    fn combine_params(&self, beside_fc2: bool, pieces: Range<usize>) -> CombineParams {
        let cfg = &self.plan.cfg;
        CombineParams {
            out: self.s.out,
            segs: self.s.segs,
            rows_from: self.s.rows_from,
            group_tiles: self.s.group_tiles,
            chunk_done: self.s.chunk_done,
            comb_done: self.s.comb_done,
            peer_comb: self.s.peer_comb,
            peer_signals: self.s.peer_signals,
            sc: self.s.sc,
            epoch: self.s.epoch,
            err: self.s.err,
            timeout_ns: self.timeout_ns,
            hidden: cfg.hidden as i32,
            cols: self.plan.chunk_cols as i32,
            chunks: self.plan.chunks as i32,
            groups: self.plan.groups as i32,
            epr: cfg.experts_per_rank() as i32,
            ranks: cfg.ranks as i32,
            me: self.rank() as i32,
            wait_chunks: i32::from(beside_fc2),
            chunk_sig0: self.map.wire(self.map.chunk_done(0)).index() as i32,
            piece_begin: pieces.start as i32,
            piece_end: pieces.end as i32,
            pad: 0,
        }
    }

    /// Every piece back to its sources on `blocks` blocks (`overlapped`:
    /// on the side stream while FC2 runs).
    unsafe fn combine(
        &self,
        stream: CUstream,
        overlapped: bool,
        blocks: usize,
    ) -> Result<(), SchedError> {
        let cfg = &self.plan.cfg;
        if cfg.ranks == 1 {
            return Ok(());
        }
        let p = self.combine_params(overlapped, 0..self.plan.pieces());
        let g = Grid {
            blocks: blocks.max(1) as u32,
            smem: (16 * cfg.experts) as u32,
        };
        // SAFETY: scratch and the peers' combine buffers of the plan's
        // send capacity; the segment table (4 ints per segment) fits smem.
        unsafe { self.k.forward.combine(&p, g, stream) }.map_err(kerr(self.rank()))
    }

    /// What the sums of `chunks` (of the plan's layer1 chunks) read and
    /// write. `beside_fc2`: while FC2 runs (one rank), each chunk summed
    /// once its FC2 tiles are counted.
    fn reduce_params(
        &self,
        a: &ForwardArgs,
        beside_fc2: bool,
        chunks: Range<usize>,
    ) -> ReduceParams {
        let cfg = &self.plan.cfg;
        ReduceParams {
            out: self.s.out,
            comb: self.sym.comb_at,
            ids: a.topk_ids,
            w: a.topk_weights,
            local_idx: self.s.local_idx,
            send_off: self.s.send_off,
            segs: self.s.segs,
            y: a.y,
            signals: self.sym.signals_at,
            sc: self.s.sc,
            epoch: self.s.epoch,
            err: self.s.err,
            chunk_done: self.s.chunk_done,
            group_tiles: self.s.group_tiles,
            timeout_ns: self.timeout_ns,
            tokens: a.tokens as i32,
            k: cfg.top_k as i32,
            hidden: cfg.hidden as i32,
            cols: self.plan.chunk_cols as i32,
            chunks: self.plan.chunks as i32,
            groups: self.plan.groups as i32,
            epr: cfg.experts_per_rank() as i32,
            ranks: cfg.ranks as i32,
            me: self.rank() as i32,
            ids_i64: i32::from(a.ids == IdType::I64),
            w_bf16: i32::from(a.weights == WeightType::Bf16),
            wait_chunks: i32::from(beside_fc2),
            chunk_sig0: self.map.wire(self.map.chunk_done(0)).index() as i32,
            chunk_begin: chunks.start as i32,
            chunk_end: chunks.end as i32,
            pad: 0,
        }
    }

    /// The sums of `chunks` on `blocks` blocks (`beside_fc2`: on the side
    /// stream while FC2 runs).
    unsafe fn reduce(
        &self,
        stream: CUstream,
        a: &ForwardArgs,
        blocks: usize,
        beside_fc2: bool,
        chunks: Range<usize>,
    ) -> Result<(), SchedError> {
        if a.tokens == 0 || chunks.is_empty() {
            return Ok(());
        }
        let p = self.reduce_params(a, beside_fc2, chunks);
        // SAFETY: ids/weights have tokens*k entries and y tokens rows
        // (caller); the rest is this layer's memory.
        unsafe {
            self.k
                .forward
                .reduce(&p, Grid::blocks(blocks as u32), stream)
        }
        .map_err(kerr(self.rank()))
    }

    /// Dispatch and combine on the side stream beside the GEMMs.
    unsafe fn overlapped(&self, stream: CUstream, a: &ForwardArgs) -> Result<(), SchedError> {
        let (comm, grid) = (self.plan.comm_blocks, self.plan.gemm_grid_overlap);
        let side = self.side.cu_stream();
        // SAFETY: the phases' contracts as in forward; the side stream is
        // forked from and joined back into the caller's stream.
        unsafe {
            self.fork_side(stream)?;
            self.dispatch(side, a, comm, true)?;
            for g in 0..self.plan.groups {
                let l = GemmLaunch::hooked(grid).of_group(g);
                self.fc1(stream, a, false, l)?;
                self.fc2(stream, a, l)?;
            }
            let chunks = self.plan.chunks;
            if self.plan.cfg.ranks == 1 {
                // Alone there is no combine to wait for: the sums follow
                // FC2's chunks beside it, but the last chunk's would be a
                // tail on the communication blocks' few SMs, so the whole
                // grid sums it once FC2 is done.
                self.reduce(side, a, comm, true, 0..chunks - 1)?;
                self.reduce(stream, a, self.plan.gemm_grid, false, chunks - 1..chunks)?;
            } else {
                self.combine(side, true, comm)?;
                self.reduce(stream, a, grid, false, 0..chunks)?;
            }
            self.join_side(stream)
        }
    }

    /// Fused inside the GEMMs (`DevicePlan::side_warps`, which overlaps no
    /// link and so runs one expert group): nothing runs beside them, their
    /// producers' idle warps move the rows. FC1 carries the dispatch; FC2
    /// sends each piece back as its tiles finish, or, a rank alone with
    /// nothing to send, sums every chunk but the last, which on those
    /// warps would be a tail. The whole grid sums the rest after FC2.
    unsafe fn inside(&self, stream: CUstream, a: &ForwardArgs) -> Result<(), SchedError> {
        let (grid, chunks) = (self.plan.gemm_grid, self.plan.chunks);
        let alone = self.plan.cfg.ranks == 1;
        let dispatch = SideWork {
            rows: SideRows::Dispatch(self.dispatch_params(a, false)),
            next: self.s.side_next,
        };
        let fc2_side = SideWork {
            rows: if alone {
                SideRows::Reduce(self.reduce_params(a, true, 0..chunks - 1))
            } else {
                SideRows::Combine(self.combine_params(true, 0..chunks))
            },
            next: self.s.side_next + 4,
        };
        let rest = if alone { chunks - 1..chunks } else { 0..chunks };
        // SAFETY: as in forward; the side warps' rows are the dispatch's,
        // the combine's and the reduce's, whose launches read the same.
        // Timed phases: the dispatch inside FC1, the combine or the sums
        // inside FC2.
        unsafe {
            self.mark(3, stream)?;
            self.fc1(stream, a, false, GemmLaunch::hooked(grid).with(dispatch))?;
            self.mark(4, stream)?;
            self.fc2(stream, a, GemmLaunch::hooked(grid).with(fc2_side))?;
            self.mark(5, stream)?;
            self.mark(6, stream)?;
            self.reduce(stream, a, grid, false, rest)?;
            self.mark(7, stream)
        }
    }

    /// Every phase in sequence on the caller's stream.
    unsafe fn sequential(&self, stream: CUstream, a: &ForwardArgs) -> Result<(), SchedError> {
        let (aux, grid) = (self.plan.aux_blocks, self.plan.gemm_grid);
        // SAFETY: as in forward.
        unsafe {
            self.dispatch(stream, a, aux, false)?;
            self.wait_dispatch(stream)?;
            self.mark(3, stream)?;
            self.fc1(stream, a, self.gathers(a), GemmLaunch::plain(grid))?;
            self.mark(4, stream)?;
            self.fc2(stream, a, GemmLaunch::plain(grid))?;
            self.mark(5, stream)?;
            self.combine(stream, false, aux)?;
            self.mark(6, stream)?;
            self.reduce(stream, a, aux, false, 0..self.plan.chunks)?;
            self.mark(7, stream)
        }
    }

    unsafe fn fork_side(&self, stream: CUstream) -> Result<(), SchedError> {
        let rank = self.rank();
        // SAFETY: live event and streams of this context.
        unsafe {
            sys::cuEventRecord(self.fork.cu_event(), stream)
                .result()
                .and_then(|_| {
                    sys::cuStreamWaitEvent(self.side.cu_stream(), self.fork.cu_event(), 0).result()
                })
        }
        .map_err(|e| dev(rank, "fork side stream", e))
    }

    unsafe fn join_side(&self, stream: CUstream) -> Result<(), SchedError> {
        let rank = self.rank();
        // SAFETY: live event and streams of this context.
        unsafe {
            sys::cuEventRecord(self.join.cu_event(), self.side.cu_stream())
                .result()
                .and_then(|_| sys::cuStreamWaitEvent(stream, self.join.cu_event(), 0).result())
        }
        .map_err(|e| dev(rank, "join side stream", e))
    }

    /// The call's status into pinned host memory (read by the next call),
    /// stored by a kernel: no device-to-host copy waits behind the call.
    unsafe fn finish(&self, stream: CUstream) -> Result<(), SchedError> {
        // SAFETY: the error word of this layer's state block.
        unsafe {
            self.k
                .forward
                .store_status(self.s.err, &self.status, stream)
        }
        .map_err(kerr(self.rank()))
    }

    /// Enqueues only the two grouped GEMMs (no hooks, whole share) over the
    /// rows and tile lists of the last call: the bench's GEMM-only figure.
    /// FC1 reads the receive rows even where the forward gathers x (one
    /// rank): the plain grouped GEMM is the baseline the gather is judged
    /// by (those rows then hold whatever they held; the time does not
    /// depend on it).
    ///
    /// # Safety
    /// As [`MoeLayer::forward`]; a call must have run before.
    pub unsafe fn gemms_only(
        &mut self,
        stream: CUstream,
        a: &ForwardArgs,
    ) -> Result<(), SchedError> {
        self.check_args(a)?;
        // The launches are raw driver calls: this rank's context current
        // (ranks of one thread may be on different GPUs).
        self.bind()?;
        // SAFETY: as in forward.
        unsafe {
            let l = GemmLaunch::plain(self.plan.gemm_grid);
            self.fc1(stream, a, false, l)?;
            self.fc2(stream, a, l)
        }
    }

    /// Enqueues only the communication of a call, in sequence: route, the
    /// count exchange and layout, dispatch, and combine (of whatever the
    /// FC2 output holds), waiting for every segment and chunk to land: the
    /// bench's communication-only figure. A call of the protocol like
    /// `forward` (every rank makes it together; it counts as a call).
    ///
    /// # Safety
    /// As [`MoeLayer::forward`].
    pub unsafe fn comms_only(
        &mut self,
        stream: CUstream,
        a: &ForwardArgs,
    ) -> Result<(), SchedError> {
        self.check_args(a)?;
        // First: a failed last call's status is cleared by a memset on
        // this layer's side stream, which needs its context current.
        self.bind()?;
        self.take_status()?;
        if let Some(m) = self.marks.as_mut() {
            m.complete = false;
        }
        let aux = self.plan.aux_blocks;
        // SAFETY: as in forward.
        unsafe {
            self.begin(stream)?;
            self.route(stream, a)?;
            self.layout(stream, a)?;
            self.dispatch(stream, a, aux, false)?;
            self.wait_dispatch(stream)?;
            self.combine(stream, false, aux)?;
            self.wait_combine(stream)?;
            self.finish(stream)
        }
    }

    /// Fills the receive, activation and FC2 output buffers with NaN (tests:
    /// rows read before they are written show up).
    ///
    /// # Safety
    /// `stream` is a live stream of this layer's context.
    pub unsafe fn poison(&self, stream: CUstream) -> Result<(), SchedError> {
        self.bind()?;
        let p = &self.plan;
        let (h, f) = (p.cfg.hidden, p.cfg.ffn);
        let (recv, comb) = (self.sym.recv_at, self.sym.comb_at);
        // SAFETY: each range lies inside its allocation (plan capacities).
        unsafe {
            fill_u16(stream, recv, 0xFFFF, p.recv_capacity * h)
                .and_then(|_| fill_u16(stream, comb, 0xFFFF, p.send_capacity() * h))
                .and_then(|_| fill_u16(stream, self.s.act, 0xFFFF, p.recv_capacity * f))
                .and_then(|_| fill_u16(stream, self.s.out, 0xFFFF, p.recv_capacity * h))
        }
        .map_err(kerr(self.rank()))
    }
}

/// Names a signal by its absolute index in a rank's signal array.
/// `groups`: the layer's expert groups; the map's `chunks` are its layer1
/// pieces, `groups` x column chunks, named by group where there are
/// several.
pub fn signal_name(map: &SignalMap, groups: usize, index: usize) -> String {
    let (w, epr, chunks) = (map.ranks, map.experts_per_rank, map.chunks);
    let cols = (chunks / groups.max(1)).max(1);
    let piece = |j: usize| {
        if groups > 1 {
            format!("group {}, chunk {}", j / cols, j % cols)
        } else {
            format!("chunk {j}")
        }
    };
    if index < w {
        return format!("count(src {index})");
    }
    let i = index - w;
    if i < epr * w {
        format!("dispatch(expert {}, src {})", i / w, i % w)
    } else if i < epr * w + w * chunks {
        let j = i - epr * w;
        format!("combine(from {}, {})", j / chunks, piece(j % chunks))
    } else if i < map.len() {
        let j = i - epr * w - w * chunks;
        if groups > 1 {
            format!("chunk_done({})", piece(j))
        } else {
            format!("chunk_done({j})")
        }
    } else {
        format!("signal {index} (outside the map)")
    }
}

impl Scratch {
    fn new<T: DeviceTransport>(
        plan: &DevicePlan,
        map: &SignalMap,
        t: &T,
        stream: &Arc<CudaStream>,
        sym: &Symmetric,
    ) -> Result<Scratch, SchedError> {
        let rank = t.rank();
        let cfg = &plan.cfg;
        let (w, e) = (cfg.ranks, cfg.experts);
        let mut mem: Vec<CudaSlice<u8>> = Vec::new();
        let mut alloc = |bytes: usize, what: &str| -> Result<CUdeviceptr, SchedError> {
            let s = stream
                .alloc_zeros::<u8>(bytes.max(16))
                .map_err(|err| dev(rank, what, err))?;
            let p = s.device_ptr(stream).0;
            mem.push(s);
            Ok(p)
        };
        let state = alloc(STATE_BYTES, "allocate state")?;
        let (chunks, groups) = (plan.pieces(), plan.groups);
        // u64 piece counters first, then u32 counts and the side warps'
        // two work counters, then each expert group's tile runs (zeroed
        // with the counters: a call the layout refuses runs no tile).
        let side_at = 8 * chunks + 4 * (2 * e + chunks * w);
        let group_at = side_at + 8;
        let counters_words = group_at / 4 + groups * std::mem::size_of::<GroupTiles>() / 4;
        let counters = alloc(4 * counters_words, "allocate counters")?;
        let slots = plan.send_capacity();
        let tile = std::mem::size_of::<TileDesc>();
        let mut s = Scratch {
            _mem: Vec::new(),
            counters,
            counters_words,
            chunk_done: counters,
            cnt: counters + 8 * chunks as u64,
            seg_done: counters + 8 * chunks as u64 + 4 * e as u64,
            comb_done: counters + 8 * chunks as u64 + 8 * e as u64,
            side_next: counters + side_at as u64,
            group_tiles: counters + group_at as u64,
            epoch: state + STATE_EPOCH,
            err: state + STATE_ERR,
            sc: state + STATE_SCALARS,
            local_idx: alloc(4 * slots, "allocate slot indices")?,
            send_slots: alloc(4 * slots, "allocate send order")?,
            send_off: alloc(4 * (e + 1), "allocate send offsets")?,
            dest_row: alloc(4 * e, "allocate destination rows")?,
            segs: alloc(16 * e, "allocate segments")?,
            rows_from: alloc(4 * w * groups, "allocate source rows")?,
            fc1_tiles: alloc(tile * plan.fc1_tiles_cap(), "allocate FC1 tiles")?,
            fc2_tiles: alloc(tile * plan.fc2_tiles_cap(), "allocate FC2 tiles")?,
            deps: alloc(4 * e, "allocate dependencies")?,
            peer_counts: alloc(8 * w, "allocate peer tables")?,
            peer_signals: alloc(8 * w, "allocate peer tables")?,
            peer_recv: alloc(8 * w, "allocate peer tables")?,
            peer_comb: alloc(8 * w, "allocate peer tables")?,
            act: alloc(2 * plan.recv_capacity * cfg.ffn, "allocate activations")?,
            out: alloc(2 * plan.recv_capacity * cfg.hidden, "allocate FC2 output")?,
            gather_rows: if plan.gather_x {
                alloc(4 * plan.recv_capacity, "allocate gather rows")?
            } else {
                0
            },
        };
        let (deps, [counts, signals, recv, comb]) = Self::static_tables(plan, map, t, sym)?;
        let tables = [
            (s.peer_counts, counts),
            (s.peer_signals, signals),
            (s.peer_recv, recv),
            (s.peer_comb, comb),
        ];
        // The zero fills of the allocations above run on `stream`; the
        // synchronous uploads below must come after them.
        stream
            .synchronize()
            .map_err(|e| dev(rank, "allocate scratch", e))?;
        let upload = |dst: CUdeviceptr, bytes: &[u8]| -> Result<(), SchedError> {
            // SAFETY: dst is a scratch allocation of at least bytes.len()
            // bytes; the copy is synchronous.
            unsafe { cudarc::driver::result::memcpy_htod_sync(dst, bytes) }
                .map_err(|e| dev(rank, "upload tables", e))
        };
        upload(s.deps, &words(&deps))?;
        for (dst, ptrs) in &tables {
            upload(*dst, &words(ptrs))?;
        }
        s._mem = mem;
        Ok(s)
    }

    /// The tables that never change: each FC1 tile's dependencies (local
    /// expert le's dispatch signals, its segments in arrival order), and
    /// every rank's counts, signals, receive and combine buffers as this
    /// rank's kernels address them.
    fn static_tables<T: DeviceTransport>(
        plan: &DevicePlan,
        map: &SignalMap,
        t: &T,
        sym: &Symmetric,
    ) -> Result<(Vec<u32>, [Vec<u64>; 4]), SchedError> {
        let rank = t.rank();
        let (w, epr) = (plan.cfg.ranks, plan.cfg.experts_per_rank());
        let deps: Vec<u32> = (0..epr)
            .flat_map(|le| {
                (0..w).map(move |i| map.wire(map.dispatch(le, ring_source(rank, i, w))).index())
            })
            .collect();
        let peers = |f: &dyn Fn(usize) -> Result<Option<u64>, comet_transport::TransportError>,
                     what: &str|
         -> Result<Vec<u64>, SchedError> {
            (0..w)
                .map(|r| {
                    f(r)?.ok_or_else(|| SchedError::Input {
                        rank,
                        message: format!(
                            "the transport cannot map rank {r}'s {what}: the device forward \
                             needs a device-initiated transport (nvlink)"
                        ),
                    })
                })
                .collect()
        };
        let own_or_peer = |buf: BufferId| {
            move |r: usize| {
                if r == rank {
                    t.buffer_ptr(buf).map(Some)
                } else {
                    t.peer_buffer_ptr(r, buf)
                }
            }
        };
        let sig = |r: usize| {
            if r == rank {
                t.signals_ptr().map(Some)
            } else {
                t.peer_signals_ptr(r)
            }
        };
        Ok((
            deps,
            [
                peers(&own_or_peer(sym.counts), "counts")?,
                peers(&sig, "signals")?,
                peers(&own_or_peer(sym.recv), "receive buffer")?,
                peers(&own_or_peer(sym.comb), "combine buffer")?,
            ],
        ))
    }
}

/// Little-endian bytes of plain integers (the device's byte order).
fn words<W: Copy + Into<u64>>(v: &[W]) -> Vec<u8> {
    let size = std::mem::size_of::<W>();
    v.iter()
        .flat_map(|&x| x.into().to_le_bytes().into_iter().take(size))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_overlap_bound_takes_the_longer_of_each_layer() {
        // mixtral-8x7b over UCX shared memory (docs/PERF.md 2026-12-06):
        // FC1 outlasts the dispatch, the combine and reduce outlast FC2.
        let t = [0.018, 0.296, 5.223, 9.563, 3.425, 0.484, 4.857];
        let b = overlap_bound_ms(&t).unwrap();
        assert!((b - (0.018 + 0.296 + 9.563 + 5.341)).abs() < 1e-4, "{b}");
        assert!(b < t.iter().sum::<f32>());
        assert_eq!(overlap_bound_ms(&t[..6]), None);
    }

    #[test]
    fn a_size_mismatch_names_the_plans_and_other_errors_pass() {
        let cfg = comet_core::Preset::Mixtral8x7b.config(2).unwrap();
        let tiles = crate::device_plan::TEST_TILES;
        let plan = DevicePlan::new(
            &cfg,
            256,
            None,
            132,
            1,
            tiles,
            &DeviceFigures::h200_nvlink(),
        )
        .unwrap();
        let e = TransportError::Mismatch {
            rank: 1,
            what: "alloc_buffer",
            detail: "10 bytes here but 20 on rank 0".into(),
        };
        let msg = plans_differ(1, &plan, e).to_string();
        for want in [
            "rank 1",
            "different device plans",
            "20 on rank 0",
            "chunks",
            "recv_capacity",
        ] {
            assert!(msg.contains(want), "{want} missing from {msg}");
        }
        let other = TransportError::Bootstrap("gone".into());
        assert!(matches!(
            plans_differ(1, &plan, other),
            SchedError::Transport(TransportError::Bootstrap(_))
        ));
    }

    #[test]
    fn signals_are_named() {
        let map = SignalMap {
            ranks: 2,
            experts_per_rank: 3,
            chunks: 4,
        };
        assert_eq!(signal_name(&map, 1, 1), "count(src 1)");
        assert_eq!(
            signal_name(&map, 1, 2 + map.dispatch(2, 1) as usize),
            "dispatch(expert 2, src 1)"
        );
        assert_eq!(
            signal_name(&map, 1, 2 + map.combine(1, 3) as usize),
            "combine(from 1, chunk 3)"
        );
        assert_eq!(
            signal_name(&map, 1, 2 + map.chunk_done(2) as usize),
            "chunk_done(2)"
        );
        assert!(signal_name(&map, 1, 1000).contains("outside"));
        // Two expert groups of two column chunks: piece 3 is group 1's
        // chunk 1, piece 2 its chunk 0.
        let grouped = |i: u32| signal_name(&map, 2, 2 + i as usize);
        assert_eq!(
            grouped(map.combine(1, 3)),
            "combine(from 1, group 1, chunk 1)"
        );
        assert_eq!(grouped(map.chunk_done(2)), "chunk_done(group 1, chunk 0)");
    }

    #[test]
    fn words_are_little_endian() {
        assert_eq!(words(&[1u32, 0x0102_0304]), vec![1, 0, 0, 0, 4, 3, 2, 1]);
        assert_eq!(words(&[2u64]).len(), 8);
    }
}
