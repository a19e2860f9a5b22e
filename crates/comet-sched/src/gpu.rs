//! The GPU executor of the whole MoE layer (feature `gpu`): the CPU
//! executor's protocol ([`crate::cpu`]) run with the real grouped GEMM
//! kernels of comet-kernels over any [`DeviceTransport`] (the `nvlink`
//! transport; [`GpuWorld`] puts W ranks as threads of one process, all on
//! GPU 0 when there is only one).
//!
//! Per call (epoch `n`), on each rank:
//! 1. count exchange through the transport, exactly as the CPU executor
//!    (double-buffered by epoch parity; it is also the fence that keeps call
//!    n+1's writes out of buffers still read by call n);
//! 2. layer0: FC1+SwiGLU is ONE launch over the layer0 tile list whose
//!    prologue waits (bounded) on exactly the dispatch signals of each
//!    tile's rows (the COMET prologue), launched first; then `x`, staged on
//!    the host in send order (global expert order, slot order inside: the
//!    order of the segments) as bf16, is put per non-empty segment straight
//!    into its final rows on the destination, each followed on the same
//!    communication stream by `dispatch(le, me) = epoch`. The dispatch is a
//!    host-to-device put (copy engine), not a device-to-device one: with W
//!    ranks on one GPU, a hooked FC1 grid that filled every SM while it
//!    spun on a peer's signals timed out waiting for that peer's
//!    device-to-device dispatch (one H100, mixtral-8x7b size; small shapes
//!    passed). The likely cause is that same-device copies need SMs;
//!    host-to-device copies run on the copy engines and never do;
//! 3. layer1: FC2 is one launch per column chunk into a contiguous
//!    `[rows, cols]` chunk buffer (FC2 weights are stored chunk-major); the
//!    communication stream waits on an event recorded after launch c, then
//!    puts each combine block to its source and raises `combine(me, c)`, so
//!    chunk c is on the wire while c+1 computes;
//! 4. reduce: one small kernel that waits (bounded) for each chunk's
//!    combine signals and writes `y` in f32 from the bf16 combine buffer.
//!
//! The baseline runs the same pieces strictly in sequence: all dispatch,
//! host wait for every segment, FC1 without hooks, all FC2, all combine,
//! host wait for every combine signal, reduce.
//!
//! Signal ids are offset by W as in the CPU executor (the first W words are
//! the count-exchange signals): kernels get the signal array pointer
//! advanced by W words. Activations and FC2 outputs are bf16; accumulation
//! is f32. A timed-out device wait becomes a [`SchedError::Device`] naming
//! the rank and the signal.

use crate::cpu::{ExecMode, RankInput};
use crate::error::SchedError;
use crate::protocol::{
    build_ranks, check_input, check_inputs, exchange_counts, rank_err, run_ranks,
};
use comet_core::layout::{ring_dest, LayoutPlan};
use comet_core::schedule::{combine_waits, Layer0Schedule, Layer1Schedule, SignalMap, TileShape};
use comet_core::{ExpertWeights, MoeConfig, Routing};
use comet_kernels::device::SplitWorkspace;
use comet_kernels::gemm::check_error_word;
use comet_kernels::layer::{fill_u16, fill_u32, LayerKernels, ReduceArgs};
use comet_kernels::{
    Epilogue, GemmArgs, GemmRuntime, GemmVariant, HookArgs, Hooks, KernelError, TileDesc, TileList,
};
use comet_transport::gpu::DeviceTransport;
use comet_transport::nvlink::{NvlinkOptions, NvlinkTransport};
use comet_transport::{BufferId, SignalId, SignalOp};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DeviceRepr};
use half::bf16;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Reduce blocks per rank: blocks that wait on combine signals hold SM
/// slots that a peer's FC2 (sharing the GPU) may need to raise them.
const REDUCE_BLOCKS: u32 = 16;

/// Options of one GPU call.
#[derive(Debug, Clone)]
pub struct GpuExecOptions {
    /// Bound of every host and device wait.
    pub timeout: Duration,
    /// Fill activations, FC2 outputs and `y` with NaN before the call, so
    /// that anything not written shows up (tests).
    pub poison: bool,
}

impl Default for GpuExecOptions {
    fn default() -> Self {
        GpuExecOptions {
            timeout: Duration::from_secs(30),
            poison: false,
        }
    }
}

/// Wall-clock phases of one GPU call on one rank (host view).
#[derive(Debug, Clone, Default)]
pub struct GpuCallStats {
    pub total: Duration,
    pub exchange: Duration,
    /// From the end of the count exchange to the end of the call.
    pub layers: Duration,
    /// The layer on the GPU: from the first dispatch put (inputs and
    /// tables uploaded) until both streams are done (host clock).
    pub device: Duration,
    pub rows_received: usize,
}

#[derive(Debug, Clone)]
pub struct GpuRankOutput {
    pub y: Vec<f32>,
    pub stats: GpuCallStats,
}

struct Buffers {
    counts: BufferId,
    /// bf16 `[recv_cap_rows, hidden]`, peers write into it.
    recv: BufferId,
    /// bf16 `[chunks][max_tokens * k][cols]`, peers write into it.
    combine: BufferId,
}

/// This rank's private device memory (never touched by peers).
struct Private {
    /// bf16 `[epr][2F][H]` (B of FC1: gate rows then up rows).
    w1: CudaSlice<bf16>,
    /// bf16 `[chunks][epr][cols][F]` (B of FC2, chunk-major).
    w2: CudaSlice<bf16>,
    /// bf16 `[recv_cap_rows, F]`.
    act: CudaSlice<bf16>,
    /// bf16 `[chunks][recv_cap_rows][cols]`.
    chunk_out: CudaSlice<bf16>,
    /// f32 `[max_tokens, H]`.
    y: CudaSlice<f32>,
    /// Split-tail workspace of the GEMMs (all on the compute stream, one
    /// after another, so they share it).
    split: Option<SplitWorkspace>,
}

/// The loaded kernels of one CUDA context, shared by the ranks on it.
#[derive(Clone)]
pub struct GpuKernels {
    pub gemm: Arc<GemmRuntime>,
    pub helpers: Arc<LayerKernels>,
}

impl GpuKernels {
    /// Loads the GEMM runtime and the layer helpers for `ctx`.
    pub fn load(ctx: &Arc<cudarc::driver::CudaContext>) -> Result<GpuKernels, KernelError> {
        ctx.bind_to_thread()?;
        Ok(GpuKernels {
            gemm: Arc::new(GemmRuntime::new(Arc::clone(ctx))?),
            helpers: Arc::new(LayerKernels::load(ctx)?),
        })
    }
}

/// One rank of the GPU executor.
pub struct GpuRank<T: DeviceTransport> {
    cfg: MoeConfig,
    t: T,
    rt: Arc<GemmRuntime>,
    helpers: Arc<LayerKernels>,
    stream: Arc<CudaStream>,
    shape: TileShape,
    map: SignalMap,
    max_tokens: usize,
    recv_cap_rows: usize,
    bufs: Buffers,
    mem: Private,
    fc1_fused: GemmVariant,
    fc1_plain: GemmVariant,
    fc2: GemmVariant,
    epoch: u64,
}

fn dev(rank: usize, what: &str, e: impl std::fmt::Display) -> SchedError {
    SchedError::Device {
        rank,
        message: format!("{what}: {e}"),
    }
}

fn ptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    // Event tracking is off in the transports' contexts: the guard only
    // borrows, ordering is ours (streams, events, signals).
    s.device_ptr(stream).0
}

fn upload<T: DeviceRepr + Default + Clone>(
    stream: &Arc<CudaStream>,
    data: &[T],
) -> Result<CudaSlice<T>, cudarc::driver::DriverError> {
    if data.is_empty() {
        stream.clone_htod(&[T::default()])
    } else {
        stream.clone_htod(data)
    }
}

/// Column chunk width for `hidden` that the FC2 tiles of `v` can cover:
/// a multiple of the kernel's output tile dividing `hidden`, about
/// `hidden / 4` (at least one tile).
pub fn chunk_cols_for(hidden: usize, v_out_cols: usize) -> Option<usize> {
    let cands: Vec<usize> = (1..=hidden / v_out_cols.max(1))
        .map(|m| m * v_out_cols)
        .filter(|c| hidden.is_multiple_of(*c))
        .collect();
    let goal = (hidden / 4).max(v_out_cols);
    cands
        .iter()
        .copied()
        .filter(|&c| c <= goal)
        .max()
        .or_else(|| cands.first().copied())
}

/// Names a signal of the map (index relative to the map, not offset by W).
fn signal_name(map: &SignalMap, idx: u32) -> String {
    let (w, epr, chunks) = (map.ranks, map.experts_per_rank, map.chunks);
    let i = idx as usize;
    if i < epr * w {
        format!("dispatch(expert {}, src {})", i / w, i % w)
    } else if i < epr * w + w * chunks {
        let j = i - epr * w;
        format!("combine(from {}, chunk {})", j / chunks, j % chunks)
    } else if i < map.len() {
        format!("chunk_done({})", i - epr * w - w * chunks)
    } else {
        format!("signal {i} (outside the map)")
    }
}

impl<T: DeviceTransport> GpuRank<T> {
    /// Collective: every rank of the transport's world calls it together.
    /// `weights` are this rank's experts (f32, rounded to bf16 here).
    pub fn new(
        cfg: &MoeConfig,
        t: T,
        weights: &ExpertWeights,
        kernels: GpuKernels,
        max_tokens: usize,
        shape: TileShape,
        timeout: Duration,
    ) -> Result<Self, SchedError> {
        cfg.validate()?;
        shape.validate(cfg)?;
        let rank = t.rank();
        let (w, h, f, epr) = (cfg.ranks, cfg.hidden, cfg.ffn, cfg.experts_per_rank());
        if t.world() != w {
            return Err(rank_err(
                rank,
                format!("transport world {} but config has {w} ranks", t.world()),
            ));
        }
        if weights.experts.len() != epr || weights.hidden != h || weights.ffn != f {
            return Err(rank_err(rank, "expert weights do not match the config"));
        }
        let GpuKernels { gemm: rt, helpers } = kernels;
        let family = rt.default_family();
        let fc1_fused = GemmVariant::new(
            family,
            Epilogue::SwiGlu,
            Hooks {
                wait: true,
                raise: false,
            },
        );
        let fc1_plain = GemmVariant::new(family, Epilogue::SwiGlu, Hooks::NONE);
        let fc2 = GemmVariant::new(family, Epilogue::Store, Hooks::NONE);
        if shape.bm != fc1_fused.tile_rows() {
            return Err(rank_err(
                rank,
                format!(
                    "tile rows {} must equal the kernel's {}",
                    shape.bm,
                    fc1_fused.tile_rows()
                ),
            ));
        }
        if !shape.chunk_cols.is_multiple_of(fc2.tile_out_cols()) {
            return Err(rank_err(
                rank,
                format!(
                    "chunk width {} is not a multiple of the FC2 kernel's {} output columns",
                    shape.chunk_cols,
                    fc2.tile_out_cols()
                ),
            ));
        }
        if !f.is_multiple_of(fc1_fused.tile_out_cols()) || !h.is_multiple_of(64) {
            return Err(rank_err(
                rank,
                format!(
                    "ffn {f} must be a multiple of {} and hidden {h} of 64 for the GEMM kernels",
                    fc1_fused.tile_out_cols()
                ),
            ));
        }
        let chunks = shape.chunks(cfg);
        let cols = shape.chunk_cols;
        let map = SignalMap::new(cfg, chunks);
        let recv_cap_rows = w * max_tokens * cfg.top_k.min(epr);
        let sent_cap = max_tokens * cfg.top_k;
        let counts = t.alloc_buffer(2 * w * cfg.experts * 8)?;
        let recv = t.alloc_buffer(recv_cap_rows.max(1) * h * 2)?;
        let combine = t.alloc_buffer(sent_cap.max(1) * h * 2)?;
        t.alloc_signals(w + map.len())?;

        let ctx = rt_context(&t)?;
        ctx.bind_to_thread()
            .map_err(|e| dev(rank, "bind context", e))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| dev(rank, "create compute stream", e))?;
        // B of FC1 per expert: [2F, H], row n = column n of fc1 [H, 2F].
        let mut w1 = vec![bf16::ZERO; epr * 2 * f * h];
        for (le, fc1) in weights.fc1.iter().enumerate() {
            let dst = &mut w1[le * 2 * f * h..(le + 1) * 2 * f * h];
            for (k, row) in fc1.chunks_exact(2 * f).enumerate() {
                for (n, &v) in row.iter().enumerate() {
                    dst[n * h + k] = bf16::from_f32(v);
                }
            }
        }
        // B of FC2 per chunk and expert: [cols, F], row j = column c*cols+j of fc2 [F, H].
        let mut w2 = vec![bf16::ZERO; chunks * epr * cols * f];
        for (le, fc2) in weights.fc2.iter().enumerate() {
            for (k, row) in fc2.chunks_exact(h).enumerate() {
                for (col, &v) in row.iter().enumerate() {
                    let (c, j) = (col / cols, col % cols);
                    w2[((c * epr + le) * cols + j) * f + k] = bf16::from_f32(v);
                }
            }
        }
        let alloc = |what: &str, e| dev(rank, what, e);
        let mem = Private {
            w1: stream.clone_htod(&w1).map_err(|e| alloc("upload FC1", e))?,
            w2: stream.clone_htod(&w2).map_err(|e| alloc("upload FC2", e))?,
            act: stream
                .alloc_zeros::<bf16>(recv_cap_rows.max(1) * f)
                .map_err(|e| alloc("allocate activations", e))?,
            chunk_out: stream
                .alloc_zeros::<bf16>(recv_cap_rows.max(1) * h)
                .map_err(|e| alloc("allocate chunk buffers", e))?,
            y: stream
                .alloc_zeros::<f32>(max_tokens.max(1) * h)
                .map_err(|e| alloc("allocate y", e))?,
            split: SplitWorkspace::new(&stream, &rt, &[fc1_fused, fc1_plain, fc2])
                .map_err(|e| dev(rank, "allocate split workspace", e))?,
        };
        drop((w1, w2));
        for v in [&fc1_fused, &fc1_plain, &fc2] {
            rt.prepare(v).map_err(|e| dev(rank, "load GEMM", e))?;
        }
        // Poisoned receive and combine buffers: rows read before they land
        // compute NaN instead of plausible zeros.
        let recv_ptr = t.buffer_ptr(recv)?;
        let comb_ptr = t.buffer_ptr(combine)?;
        // SAFETY: both are this rank's symmetric buffers of the sizes above.
        unsafe {
            fill_u16(&stream, recv_ptr, 0xFFFF, recv_cap_rows * h)
                .and_then(|_| fill_u16(&stream, comb_ptr, 0xFFFF, sent_cap * h))
        }
        .map_err(|e| dev(rank, "poison buffers", e))?;
        stream
            .synchronize()
            .map_err(|e| dev(rank, "synchronize setup", e))?;
        t.clear_error_word()?;
        t.barrier(timeout)?;
        Ok(GpuRank {
            cfg: cfg.clone(),
            t,
            rt,
            helpers,
            stream,
            shape,
            map,
            max_tokens,
            recv_cap_rows,
            bufs: Buffers {
                counts,
                recv,
                combine,
            },
            mem,
            fc1_fused,
            fc1_plain,
            fc2,
            epoch: 0,
        })
    }

    pub fn transport(&self) -> &T {
        &self.t
    }

    pub fn rank(&self) -> usize {
        self.t.rank()
    }

    fn sig(&self, id: SignalId) -> SignalId {
        self.cfg.ranks as SignalId + id
    }

    /// One layer call: `x` is `[routing.tokens, hidden]`; returns `y`.
    pub fn call(
        &mut self,
        x: &[f32],
        routing: &Routing,
        mode: ExecMode,
        opts: &GpuExecOptions,
    ) -> Result<GpuRankOutput, SchedError> {
        let start = Instant::now();
        let rank = self.t.rank();
        let cfg = self.cfg.clone();
        let (w, h, f, k) = (cfg.ranks, cfg.hidden, cfg.ffn, cfg.top_k);
        check_input(&cfg, rank, x, routing, self.max_tokens)?;
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| dev(rank, "bind context", e))?;
        self.epoch += 1;
        let epoch = self.epoch;

        // 1. Count exchange.
        let t_ex = Instant::now();
        let plan = exchange_counts(
            &self.t,
            &self.cfg,
            self.bufs.counts,
            self.recv_cap_rows,
            routing,
            epoch,
            opts.timeout,
        )?;
        let exchange = t_ex.elapsed();
        let t_layers = Instant::now();
        let recv_rows = plan.recv[rank].total_rows;
        let l0 = Layer0Schedule::new(&plan, rank, self.shape, &self.map);
        let l1 = Layer1Schedule::new(&plan, rank, self.shape, &self.map);
        let positions = plan.send_positions(rank, routing)?;
        let rows_sent = plan.rows_sent(rank);
        let (chunks, cols) = (self.map.chunks, self.shape.chunk_cols);

        // Host staging: x rows in send order as bf16 bytes (little-endian
        // like the device), and the per-call tables.
        let mut send = vec![0u8; rows_sent * h * 2];
        for (slot, &p) in positions.iter().enumerate() {
            let t = slot / k;
            for (d, &v) in send[p * h * 2..(p + 1) * h * 2]
                .chunks_exact_mut(2)
                .zip(&x[t * h..(t + 1) * h])
            {
                d.copy_from_slice(&bf16::from_f32(v).to_bits().to_le_bytes());
            }
        }
        let fc1_v = match mode {
            ExecMode::Fused => self.fc1_fused,
            ExecMode::Baseline => self.fc1_plain,
        };
        let kerr = |e: KernelError| dev(rank, "tile list", e);
        let l0_list = TileList::layer0(&l0, f, &fc1_v).map_err(kerr)?;
        l0_list
            .validate(recv_rows, cfg.experts_per_rank(), f, &fc1_v)
            .map_err(kerr)?;
        let l1_list = fc2_chunk_tiles(&l1, &self.fc2)?;
        l1_list
            .validate(recv_rows, cfg.experts_per_rank(), cols, &self.fc2)
            .map_err(kerr)?;
        let pos_i32: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
        let mut waits = Vec::new();
        for c in 0..chunks {
            waits.extend(combine_waits(&plan, rank, c, &self.map));
        }
        let nwait = waits.len().checked_div(chunks).unwrap_or(0);

        let s = &self.stream;
        let up = |what: &str, e| dev(rank, what, e);
        let d_l0_tiles =
            upload::<TileDesc>(s, &l0_list.tiles).map_err(|e| up("upload tiles", e))?;
        let d_l0_deps = upload::<u32>(s, &l0_list.deps).map_err(|e| up("upload deps", e))?;
        let d_l1_tiles =
            upload::<TileDesc>(s, &l1_list.tiles).map_err(|e| up("upload tiles", e))?;
        let d_pos = upload::<i32>(s, &pos_i32).map_err(|e| up("upload positions", e))?;
        let d_w = upload::<f32>(s, &routing.weights).map_err(|e| up("upload weights", e))?;
        let d_waits = upload::<u32>(s, &waits).map_err(|e| up("upload waits", e))?;
        let act = ptr(&self.mem.act, s);
        let chunk_out = ptr(&self.mem.chunk_out, s);
        let y_ptr = ptr(&self.mem.y, s);
        if opts.poison {
            // SAFETY: each range is inside its allocation (capacities above).
            unsafe {
                fill_u16(s, act, 0xFFFF, self.recv_cap_rows * f)
                    .and_then(|_| fill_u16(s, chunk_out, 0xFFFF, self.recv_cap_rows * h))
                    .and_then(|_| fill_u32(s, y_ptr, 0x7FC0_0000, self.max_tokens * h))
            }
            .map_err(|e| dev(rank, "poison", e))?;
        }
        s.synchronize().map_err(|e| up("synchronize uploads", e))?;
        let t_dev = Instant::now();

        let recv_ptr = self.t.buffer_ptr(self.bufs.recv)?;
        let comb_ptr = self.t.buffer_ptr(self.bufs.combine)?;
        let signals = self.t.signals_ptr()? + 8 * w as u64;
        let err = self.t.error_word_ptr();
        let timeout_ns = opts.timeout.as_nanos().min(u64::MAX as u128) as u64;
        let split = || self.mem.split.as_ref().map(|w| w.next_launch(s));

        // 2. Layer0. Fused: FC1 first (its tiles wait on their segments'
        // signals), then the dispatch; baseline: dispatch, wait for every
        // segment, FC1 without hooks.
        let fc1_args = GemmArgs {
            a: recv_ptr,
            b: ptr(&self.mem.w1, s),
            c: act,
            tiles: ptr(&d_l0_tiles, s),
            num_tiles: l0_list.tiles.len(),
            total_rows: recv_rows,
            k: h,
            n: 2 * f,
            ldc: f,
            experts: cfg.experts_per_rank(),
            scatter_idx: 0,
            scatter_w: 0,
            err,
            hooks: (mode == ExecMode::Fused).then(|| HookArgs {
                signals,
                deps: ptr(&d_l0_deps, s),
                wait_target: epoch,
                raise_value: epoch,
                timeout_ns,
            }),
            split: split(),
        };
        let launch_fc1 = || {
            // SAFETY: A is the receive buffer (recv_rows <= capacity rows of
            // H), B holds epr experts of [2F, H], C holds recv_cap rows of F,
            // the tile list was validated against these shapes and lives
            // until the stream is synchronised below.
            unsafe { self.rt.launch(&fc1_v, &fc1_args, s) }.map_err(|e| dev(rank, "FC1", e))
        };
        if mode == ExecMode::Fused {
            launch_fc1()?;
        }
        self.dispatch(&plan, &send, epoch)?;
        if mode == ExecMode::Baseline {
            for seg in plan.recv[rank].segments.iter().filter(|s| s.rows > 0) {
                self.t.wait(
                    self.sig(self.map.dispatch(seg.expert, seg.src)),
                    epoch,
                    opts.timeout,
                )?;
            }
            launch_fc1()?;
        }

        // 3. Layer1: FC2 chunk by chunk; each chunk leaves once computed.
        let comm = self.t.comm_stream();
        let w2 = ptr(&self.mem.w2, s);
        let epr = cfg.experts_per_rank();
        let mut events = Vec::with_capacity(chunks);
        for c in 0..chunks {
            let args = GemmArgs {
                a: act,
                b: w2 + (c * epr * cols * f * 2) as u64,
                c: chunk_out + (c * self.recv_cap_rows * cols * 2) as u64,
                tiles: ptr(&d_l1_tiles, s),
                num_tiles: l1_list.tiles.len(),
                total_rows: recv_rows,
                k: f,
                n: cols,
                ldc: cols,
                experts: epr,
                scatter_idx: 0,
                scatter_w: 0,
                err,
                hooks: None,
                split: split(),
            };
            // SAFETY: A is act (recv_rows x F), B chunk c of the chunk-major
            // FC2 weights (epr x cols x F), C chunk c's buffer (recv_cap x
            // cols); tiles validated; all live until the synchronisation.
            unsafe { self.rt.launch(&self.fc2, &args, s) }.map_err(|e| dev(rank, "FC2", e))?;
            if mode == ExecMode::Fused {
                let ev = s
                    .record_event(None)
                    .map_err(|e| dev(rank, "record event", e))?;
                comm.wait(&ev).map_err(|e| dev(rank, "wait event", e))?;
                self.send_chunk(&plan, &l1.chunks[c], chunk_out, epoch)?;
                events.push(ev);
            }
        }
        if mode == ExecMode::Baseline {
            s.synchronize()
                .map_err(|e| dev(rank, "synchronize FC2", e))?;
            self.check_device(rank)?;
            for chunk in &l1.chunks {
                self.send_chunk(&plan, chunk, chunk_out, epoch)?;
            }
            for &sig in &waits {
                self.t.wait(self.sig(sig), epoch, opts.timeout)?;
            }
        }

        // 4. Reduce, chunk by chunk as the combine signals arrive.
        if routing.tokens > 0 {
            let args = ReduceArgs {
                comb: comb_ptr,
                pos: ptr(&d_pos, s),
                w: ptr(&d_w, s),
                y: y_ptr,
                signals,
                waits: ptr(&d_waits, s),
                err,
                target: epoch,
                timeout_ns,
                tokens: routing.tokens,
                k,
                hidden: h,
                cols,
                chunks,
                rows_sent,
                nwait,
                max_blocks: REDUCE_BLOCKS,
            };
            // SAFETY: the combine buffer holds chunks x rows_sent x cols
            // (= rows_sent x H) values, pos/w tokens x k, y max_tokens x H.
            unsafe { self.helpers.reduce(&args, s) }.map_err(|e| dev(rank, "reduce", e))?;
        }
        s.synchronize().map_err(|e| dev(rank, "synchronize", e))?;
        self.t
            .comm_stream()
            .synchronize()
            .map_err(|e| dev(rank, "synchronize comm", e))?;
        let device = t_dev.elapsed();
        drop(events);
        self.check_device(rank)?;
        let mut y = vec![0f32; routing.tokens * h];
        if routing.tokens > 0 {
            s.memcpy_dtoh(&self.mem.y.slice(0..routing.tokens * h), &mut y)
                .map_err(|e| dev(rank, "download y", e))?;
        }
        drop((d_l0_tiles, d_l0_deps, d_l1_tiles, d_pos, d_w, d_waits));
        Ok(GpuRankOutput {
            y,
            stats: GpuCallStats {
                total: start.elapsed(),
                exchange,
                layers: t_layers.elapsed(),
                device,
                rows_received: recv_rows,
            },
        })
    }

    /// Layer0 communication: every segment straight to its final rows on
    /// its destination (ring order), then `dispatch(le, me) = epoch` on the
    /// same stream. The rows are put from the host (a copy-engine transfer),
    /// so the dispatch never needs an SM; see the module docs for why.
    fn dispatch(&self, plan: &LayoutPlan, send: &[u8], epoch: u64) -> Result<(), SchedError> {
        let (w, h, rank) = (self.cfg.ranks, self.cfg.hidden, self.t.rank());
        for i in 0..w {
            let dst = ring_dest(rank, i, w);
            for le in 0..self.cfg.experts_per_rank() {
                let seg = plan.recv[dst].segment(le, rank, w);
                if seg.rows == 0 {
                    continue;
                }
                let from = plan.send_offset(rank, self.cfg.global_expert(dst, le)) * h * 2;
                self.t.put(
                    dst,
                    self.bufs.recv,
                    seg.row * h * 2,
                    &send[from..from + seg.rows * h * 2],
                )?;
                self.t.signal(
                    dst,
                    self.sig(self.map.dispatch(le, rank)),
                    SignalOp::Set(epoch),
                )?;
            }
        }
        Ok(())
    }

    /// Combine sends of one chunk (enqueued on the communication stream).
    fn send_chunk(
        &self,
        plan: &LayoutPlan,
        chunk: &comet_core::schedule::Layer1Chunk,
        chunk_out: u64,
        epoch: u64,
    ) -> Result<(), SchedError> {
        let base = chunk_out + (chunk.index * self.recv_cap_rows * chunk.cols * 2) as u64;
        for s in &chunk.sends {
            let rows_sent = plan.rows_sent(s.dst);
            let offset = chunk.col * rows_sent + s.dst_pos * chunk.cols;
            self.t.put_device(
                s.dst,
                self.bufs.combine,
                offset * 2,
                base + (s.row * chunk.cols * 2) as u64,
                s.rows * chunk.cols * 2,
            )?;
        }
        for &(dst, sig) in &chunk.raises {
            self.t.signal(dst, self.sig(sig), SignalOp::Set(epoch))?;
        }
        Ok(())
    }

    /// Turns the kernels' error word into an error naming rank and signal.
    fn check_device(&self, rank: usize) -> Result<(), SchedError> {
        let word = self.t.read_error_word()?;
        if word == 0 {
            return Ok(());
        }
        self.t.clear_error_word()?;
        let what = match check_error_word(word) {
            Err(KernelError::SignalTimeout { signal, .. }) => format!(
                "device wait timed out on signal {} = {} (epoch {})",
                signal as usize + self.cfg.ranks,
                signal_name(&self.map, signal),
                self.epoch
            ),
            Err(e) => e.to_string(),
            Ok(()) => return Ok(()),
        };
        Err(SchedError::Device {
            rank,
            message: what,
        })
    }
}

/// The CUDA context of a device transport's rank (the one its comm stream
/// belongs to).
fn rt_context<T: DeviceTransport>(t: &T) -> Result<Arc<cudarc::driver::CudaContext>, SchedError> {
    Ok(Arc::clone(t.comm_stream().context()))
}

/// The FC2 tiles of one chunk, columns relative to the chunk (every chunk
/// has the same rows, so one list serves all chunk launches).
fn fc2_chunk_tiles(l1: &Layer1Schedule, v: &GemmVariant) -> Result<TileList, SchedError> {
    let bn = v.tile_out_cols();
    let mut list = TileList::default();
    for t in l1.tiles.iter().filter(|t| t.chunk == 0) {
        if !t.cols.is_multiple_of(bn) {
            return Err(rank_err(
                l1.rank,
                format!("chunk width {} is not a multiple of {bn}", t.cols),
            ));
        }
        list.push_rows(v, t.expert, t.row, t.rows, (0..t.cols).step_by(bn))
            .map_err(|e| dev(l1.rank, "tile list", e))?;
    }
    Ok(list)
}

/// W ranks of the GPU executor as threads of this process over the
/// `nvlink` transport (all on one GPU when `ordinals` repeats one).
pub struct GpuWorld {
    pub cfg: MoeConfig,
    ranks: Vec<GpuRank<NvlinkTransport>>,
}

impl GpuWorld {
    /// `weights(r)` gives rank r's experts. Rank r runs on `ordinals[r]`.
    pub fn new(
        cfg: &MoeConfig,
        ordinals: &[usize],
        max_tokens: usize,
        shape: TileShape,
        weights: &(dyn Fn(usize) -> ExpertWeights + Sync),
        timeout: Duration,
    ) -> Result<GpuWorld, SchedError> {
        cfg.validate()?;
        shape.validate(cfg)?;
        if ordinals.len() != cfg.ranks {
            return Err(rank_err(
                0,
                format!("{} device ordinals for {} ranks", ordinals.len(), cfg.ranks),
            ));
        }
        let transports = NvlinkTransport::in_process(
            ordinals,
            NvlinkOptions {
                collective_timeout: timeout,
            },
        )?;
        // One set of kernels per CUDA context (ranks sharing a GPU share it).
        let mut loaded: Vec<GpuKernels> = Vec::new();
        let mut per_rank: Vec<usize> = Vec::with_capacity(cfg.ranks);
        for (r, t) in transports.iter().enumerate() {
            let ctx = t.context();
            let same = (0..r).find(|&i| transports[i].context().cu_ctx() == ctx.cu_ctx());
            let idx = match same {
                Some(i) => per_rank[i],
                None => {
                    loaded.push(GpuKernels::load(ctx).map_err(|e| dev(r, "load kernels", e))?);
                    loaded.len() - 1
                }
            };
            per_rank.push(idx);
        }
        let ranks = build_ranks(transports, |r, t| {
            let kernels = loaded[per_rank[r]].clone();
            let w = weights(r);
            GpuRank::new(cfg, t, &w, kernels, max_tokens, shape, timeout)
        })?;
        Ok(GpuWorld {
            cfg: cfg.clone(),
            ranks,
        })
    }

    pub fn rank(&self, r: usize) -> &GpuRank<NvlinkTransport> {
        &self.ranks[r]
    }

    /// One call on every rank; the root-cause error of any rank is returned.
    pub fn run(
        &mut self,
        inputs: &[RankInput],
        mode: ExecMode,
        opts: &GpuExecOptions,
    ) -> Result<Vec<GpuRankOutput>, SchedError> {
        let caps: Vec<usize> = self.ranks.iter().map(|r| r.max_tokens).collect();
        check_inputs(&self.cfg, inputs, &caps)?;
        run_ranks(&mut self.ranks, inputs, |rank, inp| {
            rank.call(&inp.x, &inp.routing, mode, opts)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_widths_fit_the_kernel() {
        assert_eq!(chunk_cols_for(4096, 256), Some(1024));
        assert_eq!(chunk_cols_for(3584, 256), Some(512));
        assert_eq!(chunk_cols_for(512, 256), Some(256));
        assert_eq!(chunk_cols_for(256, 256), Some(256));
        assert_eq!(chunk_cols_for(192, 256), None);
    }

    #[test]
    fn signals_are_named() {
        let map = SignalMap {
            ranks: 2,
            experts_per_rank: 3,
            chunks: 4,
        };
        assert_eq!(
            signal_name(&map, map.dispatch(2, 1)),
            "dispatch(expert 2, src 1)"
        );
        assert_eq!(
            signal_name(&map, map.combine(1, 3)),
            "combine(from 1, chunk 3)"
        );
        assert_eq!(signal_name(&map, map.chunk_done(2)), "chunk_done(2)");
    }
}
