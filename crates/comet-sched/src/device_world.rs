//! W ranks of the device layer as threads of one process, all on one GPU
//! when the ordinals repeat: over the nvlink transport
//! ([`crate::forward::MoeLayer`], kernels store into the peers), or staged
//! through host memory over the local transport
//! ([`crate::staged_device::StagedLayer`], a proxy thread per rank carries
//! the bytes); or this process's one rank of a world of processes, staged
//! over UCX or carried by NCCL (feature `nccl`): what the GPU tests and
//! `comet bench --gpu` drive. Each rank owns
//! its stream and capacity-sized device tensors (x, ids, weights, y and
//! its experts); [`DeviceWorld::forward`] enqueues every rank's call and
//! returns, [`DeviceWorld::check`] waits and reports the root cause of any
//! failure.

use crate::cpu::{ExecMode, RankInput};
use crate::device_plan::DevicePlan;
use crate::error::SchedError;
use crate::forward::{
    CallInfo, DeviceLayout, ForwardArgs, IdType, LayerKernels, LayerOptions, MoeLayer, WeightType,
};
use crate::protocol::build_ranks;
use crate::proxy_layer::needs_queues;
use crate::staged_device::StagedLayer;
use comet_core::{ExpertWeights, MoeConfig};
use comet_transport::cuda::{self, PinnedBytes};
use comet_transport::gpu::DeviceTransport;
use comet_transport::local::{local_world, DelayModel};
use comet_transport::nvlink::{NvlinkOptions, NvlinkTransport};
use comet_transport::Transport;
use cudarc::driver::sys::CUstream;
use cudarc::driver::{CudaContext, CudaGraph, CudaSlice, CudaStream, DevicePtr};
use half::bf16;
use std::sync::Arc;
use std::time::Duration;

/// Where the ranks' expert weights come from.
pub enum WorldWeights<'a> {
    /// f32 weights per rank (rounded to bf16 and laid out for the kernels).
    Host(&'a (dyn Fn(usize) -> ExpertWeights + Sync)),
    /// Uniform random bf16 generated on the device (benchmarks).
    Random { seed: u64, scale: f32 },
}

/// What a world rank drives: the device layer over nvlink, or staged.
/// The methods are the layer's own (see [`MoeLayer`]).
pub trait WorldLayer: Send {
    fn rank(&self) -> usize;
    fn plan(&self) -> &DevicePlan;
    fn set_mode(&mut self, mode: ExecMode);
    fn mode(&self) -> ExecMode;
    /// # Safety
    /// As [`MoeLayer::forward`].
    unsafe fn forward(&mut self, stream: CUstream, a: &ForwardArgs) -> Result<(), SchedError>;
    /// # Safety
    /// As [`MoeLayer::check`].
    unsafe fn check(&mut self, stream: CUstream) -> Result<CallInfo, SchedError>;
    /// # Safety
    /// As [`MoeLayer::gemms_only`].
    unsafe fn gemms_only(&mut self, stream: CUstream, a: &ForwardArgs) -> Result<(), SchedError>;
    /// # Safety
    /// As [`MoeLayer::comms_only`].
    unsafe fn comms_only(&mut self, stream: CUstream, a: &ForwardArgs) -> Result<(), SchedError>;
    /// # Safety
    /// As [`MoeLayer::poison`].
    unsafe fn poison(&self, stream: CUstream) -> Result<(), SchedError>;
    /// # Safety
    /// As [`MoeLayer::layout_tables`].
    unsafe fn layout_tables(&mut self, stream: CUstream) -> Result<DeviceLayout, SchedError>;
    /// Collective: meets every rank of the transport (before dropping a
    /// layer, so no peer still writes into this rank's memory).
    fn barrier(&self, timeout: Duration) -> Result<(), SchedError>;
    /// As [`MoeLayer::time_phases`].
    fn time_phases(&mut self, on: bool) -> Result<(), SchedError>;
    /// As [`MoeLayer::phase_times`].
    fn phase_times(&self) -> Result<Option<Vec<f32>>, SchedError>;
}

impl<T: DeviceTransport + 'static> WorldLayer for MoeLayer<T> {
    fn rank(&self) -> usize {
        MoeLayer::rank(self)
    }
    fn plan(&self) -> &DevicePlan {
        MoeLayer::plan(self)
    }
    fn set_mode(&mut self, mode: ExecMode) {
        MoeLayer::set_mode(self, mode)
    }
    fn mode(&self) -> ExecMode {
        MoeLayer::mode(self)
    }
    unsafe fn forward(&mut self, stream: CUstream, a: &ForwardArgs) -> Result<(), SchedError> {
        // SAFETY: forwarded contract.
        unsafe { MoeLayer::forward(self, stream, a) }
    }
    unsafe fn check(&mut self, stream: CUstream) -> Result<CallInfo, SchedError> {
        // SAFETY: forwarded contract.
        unsafe { MoeLayer::check(self, stream) }
    }
    unsafe fn gemms_only(&mut self, stream: CUstream, a: &ForwardArgs) -> Result<(), SchedError> {
        // SAFETY: forwarded contract.
        unsafe { MoeLayer::gemms_only(self, stream, a) }
    }
    unsafe fn comms_only(&mut self, stream: CUstream, a: &ForwardArgs) -> Result<(), SchedError> {
        // SAFETY: forwarded contract.
        unsafe { MoeLayer::comms_only(self, stream, a) }
    }
    unsafe fn poison(&self, stream: CUstream) -> Result<(), SchedError> {
        // SAFETY: forwarded contract.
        unsafe { MoeLayer::poison(self, stream) }
    }
    unsafe fn layout_tables(&mut self, stream: CUstream) -> Result<DeviceLayout, SchedError> {
        // SAFETY: forwarded contract.
        unsafe { MoeLayer::layout_tables(self, stream) }
    }
    fn barrier(&self, timeout: Duration) -> Result<(), SchedError> {
        Ok(self.transport().barrier(timeout)?)
    }
    fn time_phases(&mut self, on: bool) -> Result<(), SchedError> {
        MoeLayer::time_phases(self, on)
    }
    fn phase_times(&self) -> Result<Option<Vec<f32>>, SchedError> {
        MoeLayer::phase_times(self)
    }
}

impl<T: Transport + 'static> WorldLayer for StagedLayer<T> {
    fn rank(&self) -> usize {
        StagedLayer::rank(self)
    }
    fn plan(&self) -> &DevicePlan {
        StagedLayer::plan(self)
    }
    fn set_mode(&mut self, mode: ExecMode) {
        StagedLayer::set_mode(self, mode)
    }
    fn mode(&self) -> ExecMode {
        self.layer().mode()
    }
    unsafe fn forward(&mut self, stream: CUstream, a: &ForwardArgs) -> Result<(), SchedError> {
        // SAFETY: forwarded contract.
        unsafe { StagedLayer::forward(self, stream, a) }
    }
    unsafe fn check(&mut self, stream: CUstream) -> Result<CallInfo, SchedError> {
        // SAFETY: forwarded contract.
        unsafe { StagedLayer::check(self, stream) }
    }
    unsafe fn gemms_only(&mut self, stream: CUstream, a: &ForwardArgs) -> Result<(), SchedError> {
        // SAFETY: forwarded contract.
        unsafe { StagedLayer::gemms_only(self, stream, a) }
    }
    unsafe fn comms_only(&mut self, stream: CUstream, a: &ForwardArgs) -> Result<(), SchedError> {
        // SAFETY: forwarded contract.
        unsafe { StagedLayer::comms_only(self, stream, a) }
    }
    unsafe fn poison(&self, stream: CUstream) -> Result<(), SchedError> {
        // SAFETY: forwarded contract.
        unsafe { StagedLayer::poison(self, stream) }
    }
    unsafe fn layout_tables(&mut self, stream: CUstream) -> Result<DeviceLayout, SchedError> {
        // SAFETY: forwarded contract.
        unsafe { StagedLayer::layout_tables(self, stream) }
    }
    fn barrier(&self, timeout: Duration) -> Result<(), SchedError> {
        Ok(self.layer().transport().barrier(timeout)?)
    }
    fn time_phases(&mut self, on: bool) -> Result<(), SchedError> {
        StagedLayer::time_phases(self, on)
    }
    fn phase_times(&self) -> Result<Option<Vec<f32>>, SchedError> {
        self.layer().phase_times()
    }
}

/// One rank: its layer, stream and device tensors.
pub struct WorldRank {
    pub layer: Box<dyn WorldLayer>,
    pub stream: Arc<CudaStream>,
    w1: CudaSlice<bf16>,
    w2: CudaSlice<bf16>,
    x: CudaSlice<bf16>,
    ids: CudaSlice<i32>,
    weights: CudaSlice<f32>,
    y: CudaSlice<bf16>,
    tokens: usize,
}

impl WorldRank {
    /// This rank's call arguments (its current inputs).
    pub fn args(&self) -> ForwardArgs {
        let s = &self.stream;
        ForwardArgs {
            tokens: self.tokens,
            x: self.x.device_ptr(s).0,
            topk_ids: self.ids.device_ptr(s).0,
            ids: IdType::I32,
            topk_weights: self.weights.device_ptr(s).0,
            weights: WeightType::F32,
            w1: self.w1.device_ptr(s).0,
            w2: self.w2.device_ptr(s).0,
            y: self.y.device_ptr(s).0,
        }
    }

    fn dev(&self, what: &str, e: impl std::fmt::Display) -> SchedError {
        SchedError::Device {
            rank: self.layer.rank(),
            message: format!("{what}: {e}"),
        }
    }
}

/// The ranks of one in-process world.
pub struct DeviceWorld {
    pub cfg: MoeConfig,
    ranks: Vec<WorldRank>,
    /// Each rank's output copied out by [`DeviceWorld::forward_copying_outputs`]
    /// (pinned; empty until then).
    copies: Vec<PinnedBytes>,
}

impl Drop for DeviceWorld {
    fn drop(&mut self) {
        // A copy still queued must not outlive the memory it writes.
        if !self.copies.is_empty() {
            for r in &self.ranks {
                let _ = r.stream.synchronize();
            }
        }
    }
}

/// B of FC1 per expert `[2F, H]` and of FC2 `[H, F]` (K contiguous) from
/// comet-core's `fc1 [H, 2F]` and `fc2 [F, H]`.
pub fn kernel_weights(w: &ExpertWeights) -> (Vec<bf16>, Vec<bf16>) {
    let (h, f) = (w.hidden, w.ffn);
    let mut w1 = vec![bf16::ZERO; w.fc1.len() * 2 * f * h];
    for (le, fc1) in w.fc1.iter().enumerate() {
        let dst = &mut w1[le * 2 * f * h..(le + 1) * 2 * f * h];
        for (k, row) in fc1.chunks_exact(2 * f).enumerate() {
            for (n, &v) in row.iter().enumerate() {
                dst[n * h + k] = bf16::from_f32(v);
            }
        }
    }
    let mut w2 = vec![bf16::ZERO; w.fc2.len() * h * f];
    for (le, fc2) in w.fc2.iter().enumerate() {
        let dst = &mut w2[le * h * f..(le + 1) * h * f];
        for (k, row) in fc2.chunks_exact(h).enumerate() {
            for (n, &v) in row.iter().enumerate() {
                dst[n * f + k] = bf16::from_f32(v);
            }
        }
    }
    (w1, w2)
}

/// Where a world of `ranks` ranks in one process runs: rank r on visible
/// GPU r mod `gpus`, so each rank has a GPU of its own while there are
/// GPUs enough, and ranks share them evenly after that (a GPU's SMs are
/// then split among its ranks). `CUDA_VISIBLE_DEVICES` picks the GPUs.
pub fn spread_over_gpus(ranks: usize, gpus: usize) -> Vec<usize> {
    (0..ranks).map(|r| r % gpus.max(1)).collect()
}

/// [`spread_over_gpus`] over the GPUs this process sees (GPU 0 only where
/// the driver reports none: opening it then names the problem).
pub fn visible_placement(ranks: usize) -> Vec<usize> {
    spread_over_gpus(ranks, cuda::device_count())
}

impl DeviceWorld {
    /// Rank r runs on `ordinals[r]`; `capacity` tokens per rank and call.
    pub fn new(
        cfg: &MoeConfig,
        ordinals: &[usize],
        capacity: usize,
        weights: WorldWeights<'_>,
        opts: &LayerOptions,
    ) -> Result<DeviceWorld, SchedError> {
        cfg.validate()?;
        check_ordinals(cfg, ordinals)?;
        check_queues(ordinals, cuda::hardware_queues())?;
        let transports = NvlinkTransport::in_process(
            ordinals,
            NvlinkOptions {
                collective_timeout: opts.timeout,
            },
        )?;
        let contexts: Vec<Arc<CudaContext>> =
            transports.iter().map(|t| Arc::clone(t.context())).collect();
        Self::build(
            cfg,
            ordinals,
            &contexts,
            transports,
            weights,
            opts,
            |t, k, o| Ok(Box::new(MoeLayer::new(cfg, capacity, t, k, o)?)),
            capacity,
        )
    }

    /// As [`DeviceWorld::new`], but every rank's layer is staged through
    /// host memory over the local transport, a proxy thread per rank
    /// carrying the bytes: the host-proxy path of UCX and NCCL on kernels
    /// that never store into a peer. `delay` holds each of the transport's
    /// puts and signals back by a random time (tests).
    pub fn staged(
        cfg: &MoeConfig,
        ordinals: &[usize],
        capacity: usize,
        weights: WorldWeights<'_>,
        opts: &LayerOptions,
        delay: Option<DelayModel>,
    ) -> Result<DeviceWorld, SchedError> {
        let transports = local_world(cfg.ranks, delay);
        Self::staged_on(cfg, ordinals, transports, capacity, weights, opts)
    }

    /// Every rank of the world in this process, rank r staged over
    /// `transports[r]` (UCX ranks of one process, say) on `ordinals[r]`.
    pub fn staged_on<T: Transport + 'static>(
        cfg: &MoeConfig,
        ordinals: &[usize],
        transports: Vec<T>,
        capacity: usize,
        weights: WorldWeights<'_>,
        opts: &LayerOptions,
    ) -> Result<DeviceWorld, SchedError> {
        cfg.validate()?;
        check_ordinals(cfg, ordinals)?;
        check_queues(ordinals, cuda::hardware_queues())?;
        if transports.len() != cfg.ranks {
            return Err(SchedError::Input {
                rank: 0,
                message: format!(
                    "{} transports for a world of {} ranks",
                    transports.len(),
                    cfg.ranks
                ),
            });
        }
        let contexts = ordinals
            .iter()
            .enumerate()
            .map(|(r, &o)| {
                cuda::open_context(o).map_err(|e| SchedError::Device {
                    rank: r,
                    message: format!("open device {o}: {e}"),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let transports: Vec<(usize, T)> = ordinals.iter().copied().zip(transports).collect();
        Self::build(
            cfg,
            ordinals,
            &contexts,
            transports,
            weights,
            opts,
            |(o, t), k, lo| Ok(Box::new(StagedLayer::new(cfg, capacity, t, o, k, lo)?)),
            capacity,
        )
    }

    /// The one rank of this process in a world of processes: staged over
    /// `inner` (UCX across processes or nodes) on device `ordinal`, with
    /// `opts.ranks_per_gpu` processes sharing that device. Collective over
    /// `inner`'s world.
    pub fn staged_over<T: Transport + 'static>(
        cfg: &MoeConfig,
        inner: T,
        ordinal: usize,
        capacity: usize,
        weights: WorldWeights<'_>,
        opts: &LayerOptions,
    ) -> Result<DeviceWorld, SchedError> {
        let rank = inner.rank();
        let ctx = cuda::open_context(ordinal).map_err(|e| SchedError::Device {
            rank,
            message: format!("open device {ordinal}: {e}"),
        })?;
        Self::process_rank(
            cfg,
            (ordinal, ctx),
            inner,
            capacity,
            weights,
            opts,
            |t, k, lo| {
                Ok(Box::new(StagedLayer::new(
                    cfg, capacity, t, ordinal, k, lo,
                )?))
            },
        )
    }

    /// The one rank of this process in a world of processes over NCCL, one
    /// GPU each (`inner`'s device): the kernels over mirrors and ready
    /// words, its pieces carried by NCCL through a proxy thread
    /// ([`crate::nccl_device::NcclLayer`]). Collective over `inner`'s
    /// world.
    #[cfg(feature = "nccl")]
    pub fn nccl_over(
        cfg: &MoeConfig,
        inner: comet_transport::nccl::NcclTransport,
        capacity: usize,
        weights: WorldWeights<'_>,
        opts: &LayerOptions,
    ) -> Result<DeviceWorld, SchedError> {
        let device = (inner.device_ordinal(), Arc::clone(inner.context()));
        Self::process_rank(cfg, device, inner, capacity, weights, opts, |t, k, lo| {
            Ok(Box::new(StagedLayer::over_nccl(cfg, capacity, t, k, lo)?))
        })
    }

    /// A world of this process's one rank, on `device` (ordinal, context),
    /// its layer made by `layer` over `inner`.
    fn process_rank<X: Send>(
        cfg: &MoeConfig,
        device: (usize, Arc<CudaContext>),
        inner: X,
        capacity: usize,
        weights: WorldWeights<'_>,
        opts: &LayerOptions,
        layer: impl Fn(X, &LayerKernels, &LayerOptions) -> Result<Box<dyn WorldLayer>, SchedError>
            + Sync,
    ) -> Result<DeviceWorld, SchedError> {
        cfg.validate()?;
        let (ordinal, ctx) = device;
        Self::build(
            cfg,
            &[ordinal],
            &[ctx],
            vec![inner],
            weights,
            opts,
            layer,
            capacity,
        )
    }

    /// Loads the kernels once per device, then builds every rank's layer
    /// (collectively, a thread each) and its tensors.
    #[allow(clippy::too_many_arguments)]
    fn build<X: Send>(
        cfg: &MoeConfig,
        ordinals: &[usize],
        contexts: &[Arc<CudaContext>],
        transports: Vec<X>,
        weights: WorldWeights<'_>,
        opts: &LayerOptions,
        layer: impl Fn(X, &LayerKernels, &LayerOptions) -> Result<Box<dyn WorldLayer>, SchedError>
            + Sync,
        capacity: usize,
    ) -> Result<DeviceWorld, SchedError> {
        // One set of kernels per device (ranks sharing a GPU share it).
        let mut loaded: Vec<(usize, LayerKernels)> = Vec::new();
        for (r, ctx) in contexts.iter().enumerate() {
            if !loaded.iter().any(|(o, _)| *o == ordinals[r]) {
                let k = LayerKernels::load(ctx)
                    .map_err(|source| SchedError::Kernel { rank: r, source })?;
                loaded.push((ordinals[r], k));
            }
        }
        let ranks = build_ranks(transports, |r, t| {
            let kernels = loaded
                .iter()
                .find(|(o, _)| *o == ordinals[r])
                .map(|(_, k)| k.clone())
                .expect("loaded above");
            // Ranks of this process on the device, or more if the caller
            // says other processes share it.
            let per_gpu = ordinals.iter().filter(|&&o| o == ordinals[r]).count();
            let mut lopts = opts.clone();
            lopts.ranks_per_gpu = per_gpu.max(opts.ranks_per_gpu);
            let layer = layer(t, &kernels, &lopts)?;
            let stream = contexts[r].new_stream().map_err(|e| SchedError::Device {
                rank: r,
                message: format!("create stream: {e}"),
            })?;
            WorldRank::new(layer, stream, cfg, capacity, &weights, &kernels)
        })?;
        Ok(DeviceWorld {
            cfg: cfg.clone(),
            ranks,
            copies: Vec::new(),
        })
    }

    pub fn ranks(&self) -> &[WorldRank] {
        &self.ranks
    }

    pub fn ranks_mut(&mut self) -> &mut [WorldRank] {
        &mut self.ranks
    }

    pub fn set_mode(&mut self, mode: ExecMode) {
        for r in &mut self.ranks {
            r.layer.set_mode(mode);
        }
    }

    /// Uploads each rank's x (rounded to bf16), ids and weights.
    pub fn set_inputs(&mut self, inputs: &[RankInput]) -> Result<(), SchedError> {
        if inputs.len() != self.ranks.len() {
            return Err(SchedError::Input {
                rank: 0,
                message: format!("{} inputs for {} ranks", inputs.len(), self.ranks.len()),
            });
        }
        for (r, inp) in self.ranks.iter_mut().zip(inputs) {
            r.set_input(&self.cfg, inp)?;
        }
        Ok(())
    }

    /// NaN in every rank's receive, activation, FC2 output and y buffers.
    pub fn poison(&mut self) -> Result<(), SchedError> {
        for r in &mut self.ranks {
            // The memsets are raw driver calls on this rank's stream: its
            // context current (ranks may be on different GPUs).
            r.stream
                .context()
                .bind_to_thread()
                .map_err(|e| r.dev("bind context", e))?;
            // SAFETY: the rank's own stream, of its layer's context.
            unsafe { r.layer.poison(r.stream.cu_stream()) }?;
            let n = r.y.len();
            let y = r.y.device_ptr(&r.stream).0;
            // SAFETY: y holds n bf16 values.
            unsafe { comet_kernels::forward::fill_u16(r.stream.cu_stream(), y, 0xFFFF, n) }
                .map_err(|source| SchedError::Kernel {
                    rank: r.layer.rank(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Enqueues one call on every rank and returns.
    pub fn forward(&mut self) -> Result<(), SchedError> {
        for r in &mut self.ranks {
            let a = r.args();
            // SAFETY: the tensors are this rank's own, sized for the
            // capacity and live as long as the world.
            unsafe { r.layer.forward(r.stream.cu_stream(), &a) }?;
        }
        Ok(())
    }

    /// Enqueues one call on every rank, each followed on its stream by a
    /// copy of its output into pinned host memory before the next rank's
    /// call is enqueued: a caller reading its output back at once, whose
    /// copy then waits behind a call that waits for its peers
    /// (docs/ARCHITECTURE.md, copies that wait). [`DeviceWorld::copied_outputs`]
    /// reads them once `check` has returned.
    pub fn forward_copying_outputs(&mut self) -> Result<(), SchedError> {
        if self.copies.is_empty() {
            // Pinned before any call is enqueued: allocating pinned memory
            // may wait for the device.
            self.copies = self
                .ranks
                .iter()
                .map(|r| {
                    PinnedBytes::zeroed(r.stream.context(), 2 * r.y.len())
                        .map_err(|e| r.dev("allocate output copy", e))
                })
                .collect::<Result<_, _>>()?;
        }
        for (r, o) in self.ranks.iter().zip(self.copies.iter_mut()) {
            // The last copy has run before the copy is poisoned (bf16 NaN).
            r.stream
                .synchronize()
                .map_err(|e| r.dev("synchronize", e))?;
            o.fill(0xFF);
        }
        for (r, o) in self.ranks.iter_mut().zip(&self.copies) {
            let a = r.args();
            // SAFETY: as in forward.
            unsafe { r.layer.forward(r.stream.cu_stream(), &a) }?;
            let bytes = 2 * r.tokens * self.cfg.hidden;
            if bytes == 0 {
                continue;
            }
            let runs = cuda::Runs {
                rows: 1,
                width: bytes,
                pitch: bytes,
            };
            // SAFETY: y's first `bytes` are live device memory of this
            // rank's context, written only by calls on this stream, ahead of
            // the copy; `o` is pinned, as long as all of y, and owned by the
            // world, which waits for the streams before dropping or
            // poisoning it and reads it only after `check`.
            unsafe { cuda::copy_runs_to_host(&r.stream, a.y, runs, o.ptr_at(0)) }
                .map_err(|e| r.dev("copy y out", e))?;
        }
        Ok(())
    }

    /// Each rank's output as [`DeviceWorld::forward_copying_outputs`] copied
    /// it (f32, `tokens x hidden`); call `check` first.
    pub fn copied_outputs(&self) -> Vec<Vec<f32>> {
        let h = self.cfg.hidden;
        self.ranks
            .iter()
            .zip(&self.copies)
            .map(|(r, o)| {
                o[..2 * r.tokens * h]
                    .chunks_exact(2)
                    .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect()
            })
            .collect()
    }

    /// Enqueues only the two grouped GEMMs of every rank over the rows of
    /// its last call (the bench's GEMM-only column).
    pub fn gemms_only(&mut self) -> Result<(), SchedError> {
        for r in &mut self.ranks {
            let a = r.args();
            // SAFETY: as in forward.
            unsafe { r.layer.gemms_only(r.stream.cu_stream(), &a) }?;
        }
        Ok(())
    }

    /// Enqueues the communication of a call on every rank (route, count
    /// exchange, dispatch, combine; no GEMMs, no reduce): the bench's
    /// communication-only figure.
    pub fn comms_only(&mut self) -> Result<(), SchedError> {
        for r in &mut self.ranks {
            let a = r.args();
            // SAFETY: as in forward.
            unsafe { r.layer.comms_only(r.stream.cu_stream(), &a) }?;
        }
        Ok(())
    }

    /// Waits for every rank; the root-cause error of any rank (a kernel
    /// error before a timeout, which may only be its consequence).
    pub fn check(&mut self) -> Result<Vec<CallInfo>, SchedError> {
        let results: Vec<_> = self
            .ranks
            .iter_mut()
            // SAFETY: each rank's own stream, of its layer's context.
            .map(|r| unsafe { r.layer.check(r.stream.cu_stream()) })
            .collect();
        let mut infos = Vec::with_capacity(results.len());
        let mut first: Option<SchedError> = None;
        for res in results {
            match res {
                Ok(i) => infos.push(i),
                Err(e) => {
                    if first
                        .as_ref()
                        .is_none_or(|f| may_be_consequence(f) && !may_be_consequence(&e))
                    {
                        first = Some(e);
                    }
                }
            }
        }
        first.map_or(Ok(infos), Err)
    }

    /// Times the phases of every rank's sequential calls from now on (or
    /// stops): see [`MoeLayer::time_phases`].
    pub fn time_phases(&mut self, on: bool) -> Result<(), SchedError> {
        self.ranks
            .iter_mut()
            .try_for_each(|r| r.layer.time_phases(on))
    }

    /// Each phase's milliseconds in the last call, the slowest rank's, once
    /// `check` has returned; `None` unless every rank timed its phases and
    /// ran the call in sequence.
    pub fn phase_times(&self) -> Result<Option<Vec<f32>>, SchedError> {
        let mut worst: Option<Vec<f32>> = None;
        for r in &self.ranks {
            let Some(t) = r.layer.phase_times()? else {
                return Ok(None);
            };
            worst = Some(match worst {
                None => t,
                Some(w) => w.iter().zip(&t).map(|(a, b)| a.max(*b)).collect(),
            });
        }
        Ok(worst)
    }

    /// Collective: every rank meets every other (a thread each), so none is
    /// dropped while a peer may still write into its memory.
    pub fn barrier(&mut self, timeout: Duration) -> Result<(), SchedError> {
        std::thread::scope(|s| {
            let hs: Vec<_> = self
                .ranks
                .iter_mut()
                .map(|r| s.spawn(move || r.layer.barrier(timeout)))
                .collect();
            hs.into_iter().try_for_each(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(SchedError::Panicked {
                        rank: 0,
                        message: "barrier thread".into(),
                    })
                })
            })
        })
    }

    /// Each rank's y as f32 (`tokens x hidden`).
    pub fn outputs(&self) -> Result<Vec<Vec<f32>>, SchedError> {
        let h = self.cfg.hidden;
        self.ranks
            .iter()
            .map(|r| {
                let mut y = vec![bf16::ZERO; r.tokens * h];
                if r.tokens > 0 {
                    r.stream
                        .memcpy_dtoh(&r.y.slice(0..r.tokens * h), &mut y)
                        .map_err(|e| r.dev("download y", e))?;
                    r.stream.synchronize().map_err(|e| r.dev("download y", e))?;
                }
                Ok(y.iter().map(|v| v.to_f32()).collect())
            })
            .collect()
    }

    /// Captures one call of every rank as a CUDA graph on its stream;
    /// launching graph r replays rank r's call on its current inputs.
    pub fn capture(&mut self) -> Result<Vec<CudaGraph>, SchedError> {
        let mode = cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED;
        let mut graphs = Vec::with_capacity(self.ranks.len());
        for r in &mut self.ranks {
            r.stream
                .begin_capture(mode)
                .map_err(|e| r.dev("begin capture", e))?;
            let a = r.args();
            // SAFETY: as in forward.
            let res = unsafe { r.layer.forward(r.stream.cu_stream(), &a) };
            let g = r
                .stream
                .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0))
                .map_err(|e| r.dev("end capture", e))?;
            res?;
            graphs.push(g.ok_or_else(|| r.dev("capture", "empty graph"))?);
        }
        Ok(graphs)
    }
}

/// One device ordinal per rank.
fn check_ordinals(cfg: &MoeConfig, ordinals: &[usize]) -> Result<(), SchedError> {
    if ordinals.len() != cfg.ranks {
        return Err(SchedError::Input {
            rank: 0,
            message: format!("{} device ordinals for {} ranks", ordinals.len(), cfg.ranks),
        });
    }
    Ok(())
}

/// Ranks of one process on one GPU wait in their kernels for each other's
/// kernels: refused under one hardware queue ([`needs_queues`]).
fn check_queues(ordinals: &[usize], queues: usize) -> Result<(), SchedError> {
    match ordinals
        .iter()
        .enumerate()
        .find(|&(r, o)| ordinals[..r].contains(o))
    {
        Some((r, o)) => needs_queues(
            r,
            queues,
            &format!("the kernels of ranks sharing GPU {o} (a GPU per rank avoids it)"),
        ),
        None => Ok(()),
    }
}

/// A device wait that timed out (or a driver failure): possibly only the
/// consequence of another rank's error.
fn may_be_consequence(e: &SchedError) -> bool {
    matches!(e, SchedError::Device { .. })
}

impl WorldRank {
    fn new(
        layer: Box<dyn WorldLayer>,
        stream: Arc<CudaStream>,
        cfg: &MoeConfig,
        capacity: usize,
        weights: &WorldWeights<'_>,
        kernels: &LayerKernels,
    ) -> Result<WorldRank, SchedError> {
        let rank = layer.rank();
        let (h, f, epr, k) = (cfg.hidden, cfg.ffn, cfg.experts_per_rank(), cfg.top_k);
        let d = |what: &str, e: cudarc::driver::DriverError| SchedError::Device {
            rank,
            message: format!("{what}: {e}"),
        };
        let (w1, w2) = match weights {
            WorldWeights::Host(f_w) => {
                let (a, b) = kernel_weights(&f_w(rank));
                (
                    stream.clone_htod(&a).map_err(|e| d("upload w1", e))?,
                    stream.clone_htod(&b).map_err(|e| d("upload w2", e))?,
                )
            }
            WorldWeights::Random { seed, scale } => {
                let a = stream
                    .alloc_zeros::<bf16>(epr * 2 * f * h)
                    .map_err(|e| d("allocate w1", e))?;
                let b = stream
                    .alloc_zeros::<bf16>(epr * h * f)
                    .map_err(|e| d("allocate w2", e))?;
                let s = stream.cu_stream();
                let seed = seed ^ ((rank as u64) << 32);
                // SAFETY: both allocations hold exactly the counts filled.
                unsafe {
                    kernels
                        .forward
                        .fill_random(a.device_ptr(&stream).0, a.len(), seed, *scale, s)
                        .and_then(|_| {
                            kernels.forward.fill_random(
                                b.device_ptr(&stream).0,
                                b.len(),
                                seed ^ 1,
                                *scale,
                                s,
                            )
                        })
                }
                .map_err(|source| SchedError::Kernel { rank, source })?;
                (a, b)
            }
        };
        let cap = capacity.max(1);
        Ok(WorldRank {
            x: stream
                .alloc_zeros(cap * h)
                .map_err(|e| d("allocate x", e))?,
            ids: stream
                .alloc_zeros(cap * k)
                .map_err(|e| d("allocate ids", e))?,
            weights: stream
                .alloc_zeros(cap * k)
                .map_err(|e| d("allocate weights", e))?,
            y: stream
                .alloc_zeros(cap * h)
                .map_err(|e| d("allocate y", e))?,
            layer,
            stream,
            w1,
            w2,
            tokens: 0,
        })
    }

    fn set_input(&mut self, cfg: &MoeConfig, inp: &RankInput) -> Result<(), SchedError> {
        let t = inp.routing.tokens;
        let (h, k) = (cfg.hidden, cfg.top_k);
        if t > self.layer.plan().capacity || inp.x.len() != t * h {
            return Err(SchedError::Input {
                rank: self.layer.rank(),
                message: format!(
                    "{t} tokens with {} x values (capacity {})",
                    inp.x.len(),
                    self.layer.plan().capacity
                ),
            });
        }
        if t > 0 {
            let x: Vec<bf16> = inp.x.iter().map(|&v| bf16::from_f32(v)).collect();
            let ids: Vec<i32> = inp.routing.ids.iter().map(|&e| e as i32).collect();
            let s = Arc::clone(&self.stream);
            s.memcpy_htod(&x, &mut self.x.slice_mut(0..t * h))
                .and_then(|_| s.memcpy_htod(&ids, &mut self.ids.slice_mut(0..t * k)))
                .and_then(|_| {
                    s.memcpy_htod(&inp.routing.weights, &mut self.weights.slice_mut(0..t * k))
                })
                .and_then(|_| s.synchronize())
                .map_err(|e| self.dev("upload inputs", e))?;
        }
        self.tokens = t;
        Ok(())
    }

    /// Writes raw ids (e.g. out of range or negative) for the next call.
    pub fn set_raw_ids(&mut self, ids: &[i32]) -> Result<(), SchedError> {
        let s = Arc::clone(&self.stream);
        s.memcpy_htod(ids, &mut self.ids.slice_mut(0..ids.len()))
            .and_then(|_| s.synchronize())
            .map_err(|e| self.dev("upload ids", e))
    }

    /// Sets the token count of the next call without new data.
    pub fn set_tokens(&mut self, tokens: usize) {
        self.tokens = tokens;
    }
}

#[cfg(test)]
mod tests {
    use super::{check_queues, spread_over_gpus};

    #[test]
    fn ranks_sharing_a_gpu_need_more_than_one_hardware_queue() {
        let e = check_queues(&[0, 0], 1).unwrap_err().to_string();
        assert!(
            e.contains("CUDA_DEVICE_MAX_CONNECTIONS=1") && e.contains("GPU 0"),
            "{e}"
        );
        assert!(check_queues(&[0, 1, 1], 1)
            .unwrap_err()
            .to_string()
            .contains("rank 2"));
        assert!(check_queues(&[0, 0], 2).is_ok());
        assert!(check_queues(&[0, 1], 1).is_ok(), "a GPU each");
        assert!(check_queues(&[0], 1).is_ok());
    }

    #[test]
    fn ranks_take_a_gpu_each_then_share_them_round_robin() {
        assert_eq!(spread_over_gpus(4, 8), [0, 1, 2, 3]);
        assert_eq!(spread_over_gpus(8, 8), [0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(spread_over_gpus(4, 2), [0, 1, 0, 1]);
        assert_eq!(spread_over_gpus(3, 1), [0, 0, 0]);
        assert_eq!(
            spread_over_gpus(2, 0),
            [0, 0],
            "no GPU seen: GPU 0, whose opening fails"
        );
    }
}
