//! comet-py: the native half `comet._comet` of the Python package `comet`
//! (python/comet holds the other half, which is what users import).
//!
//! `Layer` is comet-sched's device [`MoeLayer`] over the nvlink or NCCL transport
//! for one rank: built collectively (through a torch.distributed group, the
//! TCP bootstrap of torchrun's environment, or alone), then called with
//! torch tensors and the caller's stream. Every entry point returns a
//! Python exception on bad input or failure and never lets a Rust panic
//! cross into Python (`guard`).

mod exchange;
mod tensor;

use comet_core::{Dtype, MoeConfig};
use comet_kernels::Family;
use comet_sched::device_plan::DevicePlan;
use comet_sched::device_world::WorldLayer;
use comet_sched::forward::{kernel_tiles_for, LayerKernels, LayerOptions, MoeLayer};
use comet_sched::nccl_device::NcclLayer;
use comet_sched::{ExecMode, SchedError};
use comet_transport::gpu::{agree, BlobExchange, DeviceTransport};
use comet_transport::nccl::{NcclOptions, NcclTransport};
use comet_transport::nvlink::{NvlinkOptions, NvlinkTransport};
use comet_transport::TransportError;
use cudarc::driver::sys::CUstream;
use exchange::{Plan, PyExchange};
use pyo3::create_exception;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tensor::Expect;

create_exception!(
    _comet,
    CometError,
    PyRuntimeError,
    "A failure of the layer at run time: bootstrap, transport, CUDA or a device error."
);

/// Runs `f`, turning a Rust panic into a CometError instead of unwinding
/// into Python.
fn guard<T>(what: &str, f: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(CometError::new_err(format!(
                "comet: internal error in {what} (please report): {msg}"
            )))
        }
    }
}

/// Argument problems become ValueError, everything else CometError.
fn sched_err(e: SchedError) -> PyErr {
    match e {
        SchedError::Input { .. } | SchedError::Core(_) | SchedError::Capacity { .. } => {
            PyValueError::new_err(format!("comet: {e}"))
        }
        other => CometError::new_err(format!("comet: {other}")),
    }
}

fn transport_err(e: TransportError) -> PyErr {
    CometError::new_err(format!("comet: {e}"))
}

fn value_err(m: String) -> PyErr {
    PyValueError::new_err(format!("comet: {m}"))
}

fn parse_mode(mode: &str) -> PyResult<ExecMode> {
    match mode {
        "fused" => Ok(ExecMode::Fused),
        "sequential" => Ok(ExecMode::Baseline),
        other => Err(value_err(format!(
            "mode must be \"fused\" or \"sequential\" (got {other:?})"
        ))),
    }
}

fn mode_name(m: ExecMode) -> &'static str {
    match m {
        ExecMode::Fused => "fused",
        ExecMode::Baseline => "sequential",
    }
}

/// The layer's shape, checked before anything touches a GPU or a peer.
fn config(
    hidden: usize,
    ffn: usize,
    experts: usize,
    top_k: usize,
    ranks: usize,
) -> PyResult<MoeConfig> {
    for (v, name) in [
        (hidden, "hidden"),
        (ffn, "ffn"),
        (experts, "experts"),
        (top_k, "top_k"),
    ] {
        if v == 0 {
            return Err(value_err(format!("{name} must be positive")));
        }
    }
    if top_k > experts {
        return Err(value_err(format!(
            "top_k={top_k} is more than the {experts} experts"
        )));
    }
    if !experts.is_multiple_of(ranks) {
        return Err(value_err(format!(
            "{experts} experts cannot be split evenly over {ranks} ranks"
        )));
    }
    let cfg = MoeConfig {
        hidden,
        ffn,
        experts,
        top_k,
        ranks,
        dtype: Dtype::Bf16,
    };
    cfg.validate().map_err(|e| value_err(e.to_string()))?;
    Ok(cfg)
}

/// The plan a layer would take on an H200-like GPU (132 SMs by default),
/// without a GPU: the cost model's choice for the shape.
fn nominal_plan(
    cfg: &MoeConfig,
    max_tokens: usize,
    max_recv_rows: Option<usize>,
    sms: usize,
    ranks_per_gpu: usize,
) -> PyResult<DevicePlan> {
    if max_tokens == 0 {
        return Err(value_err("max_tokens must be positive".into()));
    }
    if max_recv_rows == Some(0) {
        return Err(value_err("max_recv_rows must be positive".into()));
    }
    DevicePlan::new(
        cfg,
        max_tokens,
        max_recv_rows,
        sms,
        ranks_per_gpu,
        kernel_tiles_for(Family::chosen(true)),
        &LayerOptions {
            ranks_per_gpu,
            ..LayerOptions::default()
        }
        .figures_for(cfg.ranks),
    )
    .map_err(sched_err)
}

fn plan_dict<'py>(py: Python<'py>, p: &DevicePlan) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let c = &p.cfg;
    d.set_item("hidden", c.hidden)?;
    d.set_item("ffn", c.ffn)?;
    d.set_item("experts", c.experts)?;
    d.set_item("top_k", c.top_k)?;
    d.set_item("ranks", c.ranks)?;
    d.set_item("experts_per_rank", c.experts_per_rank())?;
    d.set_item("capacity", p.capacity)?;
    d.set_item("recv_capacity", p.recv_capacity)?;
    d.set_item("sms", p.sms)?;
    d.set_item("ranks_per_gpu", p.ranks_per_gpu)?;
    d.set_item("share", p.share)?;
    d.set_item("overlap", p.overlap)?;
    d.set_item("side_warps", p.side_warps)?;
    d.set_item("comm_blocks", p.comm_blocks)?;
    d.set_item("gemm_grid_overlap", p.gemm_grid_overlap)?;
    d.set_item("gemm_grid", p.gemm_grid)?;
    d.set_item("aux_blocks", p.aux_blocks)?;
    d.set_item("chunk_cols", p.chunk_cols)?;
    d.set_item("chunks", p.chunks)?;
    d.set_item("groups", p.groups)?;
    d.set_item("tile_rows", p.tiles.bm)?;
    d.set_item("fc1_tile_cols", p.tiles.fc1_cols)?;
    d.set_item("fc2_tile_cols", p.tiles.fc2_cols)?;
    d.set_item("max_row_tiles", p.max_row_tiles)?;
    d.set_item("gather_x", p.gather_x)?;
    // How token rows cross the link: "rows" from kernels storing into
    // peers, "tokens" (once per rank, both ways) from a host proxy.
    d.set_item(
        "wire",
        match p.wire {
            comet_core::cost::WireFormat::Rows => "rows",
            comet_core::cost::WireFormat::Tokens => "tokens",
        },
    )?;
    let est = PyDict::new(py);
    let e = &p.estimate;
    est.set_item("gemm_ms", e.gemm_ms)?;
    est.set_item("dispatch_ms", e.dispatch_ms)?;
    est.set_item("combine_ms", e.combine_ms)?;
    est.set_item("baseline_ms", e.baseline_ms)?;
    est.set_item("overlapped_ms", e.overlapped_ms)?;
    est.set_item("layer0_ms", e.layer0_ms)?;
    est.set_item("layer1_ms", e.layer1_ms)?;
    est.set_item("comm_blocks", e.comm_blocks)?;
    est.set_item("groups", e.groups)?;
    est.set_item("chunks", e.chunks)?;
    d.set_item("estimate", est)?;
    d.set_item("text", p.describe())?;
    Ok(d)
}

/// `plan(hidden, ffn, experts, top_k, max_tokens, ranks=1, ranks_per_gpu=1,
/// sms=132, max_recv_rows=None)`: what a layer of this shape would run on
/// an H200-like GPU, as a dict (no GPU needed).
#[pyfunction]
#[pyo3(signature = (hidden, ffn, experts, top_k, max_tokens, ranks=1, ranks_per_gpu=1, sms=132, max_recv_rows=None))]
#[allow(clippy::too_many_arguments)]
fn plan<'py>(
    py: Python<'py>,
    hidden: usize,
    ffn: usize,
    experts: usize,
    top_k: usize,
    max_tokens: usize,
    ranks: usize,
    ranks_per_gpu: usize,
    sms: usize,
    max_recv_rows: Option<usize>,
) -> PyResult<Bound<'py, PyDict>> {
    guard("plan", || {
        if ranks == 0 || ranks_per_gpu == 0 || sms == 0 {
            return Err(value_err(
                "ranks, ranks_per_gpu and sms must be positive".into(),
            ));
        }
        let cfg = config(hidden, ffn, experts, top_k, ranks)?;
        let p = nominal_plan(&cfg, max_tokens, max_recv_rows, sms, ranks_per_gpu)?;
        plan_dict(py, &p)
    })
}

/// `check_inputs(x, topk_ids, topk_weights, w1, w2, y=None, *, hidden, ffn,
/// experts_per_rank, top_k, max_tokens, device=0, grad_enabled=False)`:
/// the checks `forward` makes, without running anything; returns the token
/// count and the id and weight types it would use.
#[pyfunction]
#[pyo3(signature = (x, topk_ids, topk_weights, w1, w2, y=None, *, hidden, ffn, experts_per_rank, top_k, max_tokens, device=0, grad_enabled=false))]
#[allow(clippy::too_many_arguments)]
fn check_inputs<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    topk_ids: &Bound<'py, PyAny>,
    topk_weights: &Bound<'py, PyAny>,
    w1: &Bound<'py, PyAny>,
    w2: &Bound<'py, PyAny>,
    y: Option<&Bound<'py, PyAny>>,
    hidden: usize,
    ffn: usize,
    experts_per_rank: usize,
    top_k: usize,
    max_tokens: usize,
    device: usize,
    grad_enabled: bool,
) -> PyResult<Bound<'py, PyDict>> {
    guard("check_inputs", || {
        let e = Expect {
            hidden,
            ffn,
            top_k,
            experts_per_rank,
            max_tokens,
            device,
        };
        let a = tensor::check_forward(&e, x, topk_ids, topk_weights, w1, w2, y, grad_enabled)?;
        let d = PyDict::new(py);
        d.set_item("tokens", a.tokens)?;
        d.set_item(
            "ids",
            match a.ids {
                comet_sched::forward::IdType::I32 => "int32",
                comet_sched::forward::IdType::I64 => "int64",
            },
        )?;
        d.set_item(
            "weights",
            match a.weights {
                comet_sched::forward::WeightType::F32 => "float32",
                comet_sched::forward::WeightType::Bf16 => "bfloat16",
            },
        )?;
        Ok(d)
    })
}

/// Whether a CUDA driver and at least one device are present.
#[pyfunction]
fn cuda_available() -> bool {
    guard("cuda_available", || {
        Ok(comet_transport::cuda::gpu_available())
    })
    .unwrap_or(false)
}

/// Kernels loaded once per device for the whole process.
fn kernels_for(ordinal: usize, t: &dyn DeviceTransport) -> Result<LayerKernels, SchedError> {
    static LOADED: Mutex<Vec<(usize, LayerKernels)>> = Mutex::new(Vec::new());
    let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, k)) = loaded.iter().find(|(o, _)| *o == ordinal) {
        return Ok(k.clone());
    }
    let k = LayerKernels::load(t.comm_stream().context()).map_err(|source| SchedError::Kernel {
        rank: t.rank(),
        source,
    })?;
    loaded.push((ordinal, k.clone()));
    Ok(k)
}

/// How many ranks of the world run on this rank's GPU (same device UUID).
fn ranks_on_my_gpu(
    ex: &dyn comet_transport::gpu::BlobExchange,
    ordinal: usize,
    timeout: Duration,
) -> Result<usize, TransportError> {
    let rank = ex.rank();
    let backend = |m: String| TransportError::Backend {
        backend: "nvlink",
        rank,
        message: m,
    };
    if !comet_transport::cuda::gpu_available() {
        return Err(backend("no CUDA driver or device".into()));
    }
    if ordinal >= comet_transport::cuda::device_count() {
        return Err(backend(format!(
            "device {ordinal} does not exist ({} devices)",
            comet_transport::cuda::device_count()
        )));
    }
    let ctx = comet_transport::cuda::open_context(ordinal)
        .map_err(|e| backend(format!("open device {ordinal}: {e}")))?;
    let uuid = ctx
        .uuid()
        .map_err(|e| backend(format!("device {ordinal} UUID: {e}")))?;
    let mine: Vec<u8> = uuid.bytes.iter().map(|&b| b as u8).collect();
    let all = ex.all_gather(&mine, timeout)?;
    Ok(all.iter().filter(|b| **b == mine).count().max(1))
}

/// The layer over nvlink (kernels store into peers) or over NCCL (a
/// proxy thread sends per ordered pair).
type Inner = Box<dyn WorldLayer>;

/// The transports a Python layer runs over.
const TRANSPORTS: &str = "\"nvlink\" (CUDA peer memory and IPC, ranks on one host) or \"nccl\" \
     (one GPU per rank, on one host or across hosts)";

/// Builds this rank's layer over `transport` (collective).
#[allow(clippy::too_many_arguments)]
fn build_layer(
    transport: &str,
    cfg: &MoeConfig,
    max_tokens: usize,
    device: usize,
    ex: Arc<dyn BlobExchange>,
    opts: &LayerOptions,
) -> PyResult<Inner> {
    let per_gpu = opts.ranks_per_gpu;
    match transport {
        "nccl" => {
            if per_gpu > 1 {
                return Err(value_err(format!(
                    "transport \"nccl\" needs a GPU per rank (NCCL refuses two ranks on one \
                     GPU), but {per_gpu} ranks share cuda:{device}; use \"nvlink\" there"
                )));
            }
            NcclLayer::check_queues(ex.rank()).map_err(sched_err)?;
            let t = NcclTransport::new(
                device,
                ex,
                NcclOptions {
                    collective_timeout: opts.timeout,
                },
            )
            .map_err(transport_err)?;
            let kernels = kernels_for(device, &t).map_err(sched_err)?;
            let layer =
                NcclLayer::over_nccl(cfg, max_tokens, t, &kernels, opts).map_err(sched_err)?;
            Ok(Box::new(layer))
        }
        _ => {
            let t = NvlinkTransport::new(
                device,
                ex,
                NvlinkOptions {
                    collective_timeout: opts.timeout,
                },
            )
            .map_err(transport_err)?;
            let kernels = kernels_for(device, &t).map_err(sched_err)?;
            let layer = MoeLayer::new(cfg, max_tokens, t, &kernels, opts).map_err(sched_err)?;
            Ok(Box::new(layer))
        }
    }
}

/// One rank's layer (see the module docs); `comet.MoeLayer` wraps it.
#[pyclass(module = "comet._comet")]
struct Layer {
    inner: Mutex<Option<Inner>>,
    expect: Expect,
    rank: usize,
    world: usize,
    timeout: Duration,
    /// Nanoseconds the Rust forward took to enqueue the last call.
    enqueue_ns: AtomicU64,
}

impl Layer {
    fn lock(&self) -> PyResult<MutexGuard<'_, Option<Inner>>> {
        self.inner
            .lock()
            .map_err(|_| CometError::new_err("comet: the layer failed in another thread"))
    }
}

fn with_layer<T>(
    g: &mut MutexGuard<'_, Option<Inner>>,
    f: impl FnOnce(&mut Inner) -> PyResult<T>,
) -> PyResult<T> {
    match g.as_mut() {
        Some(l) => f(l),
        None => Err(CometError::new_err("comet: the layer is closed")),
    }
}

fn stream_of(stream: u64) -> CUstream {
    stream as usize as CUstream
}

#[pymethods]
impl Layer {
    /// Collective over the world of `exchange` (or of torchrun's
    /// environment, or alone).
    #[new]
    #[pyo3(signature = (hidden, ffn, experts, top_k, max_tokens, *, exchange=None, transport="nvlink", mode="fused", timeout_s=30.0, ranks_per_gpu=None, device=0, max_recv_rows=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        hidden: usize,
        ffn: usize,
        experts: usize,
        top_k: usize,
        max_tokens: usize,
        exchange: Option<&Bound<'_, PyAny>>,
        transport: &str,
        mode: &str,
        timeout_s: f64,
        ranks_per_gpu: Option<usize>,
        device: usize,
        max_recv_rows: Option<usize>,
    ) -> PyResult<Layer> {
        guard("MoeLayer()", || {
            if transport != "nvlink" && transport != "nccl" {
                return Err(value_err(format!(
                    "transport {transport:?} is not available from Python; {TRANSPORTS} are"
                )));
            }
            let mode = parse_mode(mode)?;
            if !(timeout_s.is_finite() && timeout_s > 0.0) {
                return Err(value_err(format!(
                    "timeout_s must be a positive number of seconds (got {timeout_s})"
                )));
            }
            if ranks_per_gpu == Some(0) {
                return Err(value_err("ranks_per_gpu must be positive".into()));
            }
            let timeout = Duration::from_secs_f64(timeout_s);
            let plan = match exchange {
                Some(obj) => Plan::Group(PyExchange::new(obj)?),
                None => match exchange::env_config(timeout).map_err(transport_err)? {
                    Some(cfg) => Plan::Env(cfg),
                    None => Plan::Alone,
                },
            };
            let world = plan.world();
            let cfg = config(hidden, ffn, experts, top_k, world)?;
            // The shape's rules (tile multiples, capacity) before any peer
            // or GPU is involved.
            nominal_plan(&cfg, max_tokens, max_recv_rows, 132, 1)?;
            // Everything collective runs without the GIL; a group's
            // exchange takes it back for its all_gather.
            let built = py.detach(|| -> Result<(Inner, usize), PyErr> {
                let ex = plan.connect().map_err(transport_err)?;
                // What sizes buffers or shapes the protocol is the same on
                // every rank, before any GPU or peer memory depends on it.
                let settings = [
                    ("hidden", hidden.to_string()),
                    ("ffn", ffn.to_string()),
                    ("experts", experts.to_string()),
                    ("top_k", top_k.to_string()),
                    ("max_tokens", max_tokens.to_string()),
                    ("max_recv_rows", format!("{max_recv_rows:?}")),
                    ("transport", transport.to_string()),
                    ("ranks_per_gpu", format!("{ranks_per_gpu:?}")),
                ];
                agree(ex.as_ref(), "settings", &settings, timeout).map_err(transport_err)?;
                let per_gpu = match ranks_per_gpu {
                    Some(n) => n,
                    None => ranks_on_my_gpu(ex.as_ref(), device, timeout).map_err(transport_err)?,
                };
                let rank = ex.rank();
                let opts = LayerOptions {
                    timeout,
                    ranks_per_gpu: per_gpu,
                    recv_capacity: max_recv_rows,
                    ..LayerOptions::default()
                };
                let mut layer =
                    build_layer(transport, &cfg, max_tokens, device, Arc::clone(&ex), &opts)?;
                // ... and what each rank derived from its own GPU, before
                // any kernel writes a peer's memory.
                let derived = layer.plan().protocol();
                agree(ex.as_ref(), "device plan", &derived, timeout).map_err(transport_err)?;
                layer.set_mode(mode);
                Ok((layer, rank))
            })?;
            let (layer, rank) = built;
            Ok(Layer {
                inner: Mutex::new(Some(layer)),
                expect: Expect {
                    hidden,
                    ffn,
                    top_k,
                    experts_per_rank: cfg.experts_per_rank(),
                    max_tokens,
                    device,
                },
                rank,
                world,
                timeout,
                enqueue_ns: AtomicU64::new(0),
            })
        })
    }

    #[getter]
    fn rank(&self) -> usize {
        self.rank
    }

    #[getter]
    fn world(&self) -> usize {
        self.world
    }

    #[getter]
    fn device(&self) -> usize {
        self.expect.device
    }

    #[getter]
    fn experts_per_rank(&self) -> usize {
        self.expect.experts_per_rank
    }

    #[getter]
    fn max_tokens(&self) -> usize {
        self.expect.max_tokens
    }

    /// Microseconds the Rust forward took to enqueue the last call: the
    /// host time of a call beyond comet-py's Python-side checks.
    #[getter]
    fn enqueue_us(&self) -> f64 {
        self.enqueue_ns.load(Ordering::Relaxed) as f64 / 1e3
    }

    #[getter]
    fn get_mode(&self) -> PyResult<&'static str> {
        guard("mode", || {
            let mut g = self.lock()?;
            with_layer(&mut g, |l| Ok(mode_name(l.mode())))
        })
    }

    #[setter]
    fn set_mode(&self, mode: &str) -> PyResult<()> {
        guard("mode", || {
            let m = parse_mode(mode)?;
            let mut g = self.lock()?;
            with_layer(&mut g, |l| {
                l.set_mode(m);
                Ok(())
            })
        })
    }

    /// The layer's plan as a dict.
    fn plan<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        guard("plan", || {
            let mut g = self.lock()?;
            with_layer(&mut g, |l| plan_dict(py, l.plan()))
        })
    }

    /// Enqueues one call on `stream` (a CUstream handle, as
    /// `torch.cuda.current_stream().cuda_stream` gives it) and returns.
    #[pyo3(signature = (x, topk_ids, topk_weights, w1, w2, y, stream, grad_enabled=false))]
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &Bound<'_, PyAny>,
        topk_ids: &Bound<'_, PyAny>,
        topk_weights: &Bound<'_, PyAny>,
        w1: &Bound<'_, PyAny>,
        w2: &Bound<'_, PyAny>,
        y: &Bound<'_, PyAny>,
        stream: u64,
        grad_enabled: bool,
    ) -> PyResult<()> {
        guard("forward", || {
            let a = tensor::check_forward(
                &self.expect,
                x,
                topk_ids,
                topk_weights,
                w1,
                w2,
                Some(y),
                grad_enabled,
            )?;
            let mut g = self.lock()?;
            with_layer(&mut g, |l| {
                // SAFETY: check_forward has verified that every pointer is
                // a contiguous CUDA tensor on this layer's device (the
                // primary context, which cudarc and torch share) with the
                // dtype and shape ForwardArgs documents. The caller (the
                // Python wrapper) holds the tensors for the call and
                // enqueues on the stream it passes, a live stream of that
                // device; torch's caching allocator does not hand the
                // memory to another stream's work before this stream has
                // run the call, as for any torch kernel on it.
                let t0 = Instant::now();
                let r = unsafe { l.forward(stream_of(stream), &a) }.map_err(sched_err);
                let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
                self.enqueue_ns.store(ns, Ordering::Relaxed);
                r
            })
        })
    }

    /// Synchronises `stream` and the layer's own, then raises the first
    /// device error of the calls so far; returns what the last call did.
    #[pyo3(signature = (stream=0))]
    fn check<'py>(&self, py: Python<'py>, stream: u64) -> PyResult<Bound<'py, PyDict>> {
        guard("check", || {
            let mut g = self.lock()?;
            let info = with_layer(&mut g, |l| {
                // SAFETY: `stream` is a live stream of this layer's device
                // (the wrapper passes torch's current stream; 0 is the
                // legacy default stream, always valid).
                unsafe { l.check(stream_of(stream)) }.map_err(sched_err)
            })?;
            let d = PyDict::new(py);
            d.set_item("recv_rows", info.recv_rows)?;
            d.set_item("sent_rows", info.sent_rows)?;
            d.set_item("fc1_tiles", info.fc1_tiles)?;
            d.set_item("fc2_tiles", info.fc2_tiles)?;
            Ok(d)
        })
    }

    /// Collective: waits for the layer's work, meets every rank, then frees
    /// it (no peer still reads this rank's memory afterwards).
    #[pyo3(signature = (stream=0))]
    fn close(&self, py: Python<'_>, stream: u64) -> PyResult<()> {
        guard("close", || {
            let mut g = self.lock()?;
            let Some(mut l) = g.take() else {
                return Ok(());
            };
            // Unlocked before the GIL is let go: a thread that holds the
            // GIL and waits for this lock would otherwise keep the barrier
            // below from ever getting the GIL back. It now finds the layer
            // closed.
            drop(g);
            // SAFETY: as in check.
            let synced = unsafe { l.check(stream_of(stream)) };
            let timeout = self.timeout;
            // The layer is freed once every rank met (without the GIL: a
            // group's barrier may need another thread).
            let met = py.detach(move || {
                let met = l.barrier(timeout);
                drop(l);
                met
            });
            synced.map_err(sched_err)?;
            met.map_err(sched_err)
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "comet._comet.Layer(rank={}, world={}, device=cuda:{}, hidden={}, ffn={}, \
             top_k={}, experts_per_rank={}, max_tokens={})",
            self.rank,
            self.world,
            self.expect.device,
            self.expect.hidden,
            self.expect.ffn,
            self.expect.top_k,
            self.expect.experts_per_rank,
            self.expect.max_tokens
        )
    }
}

#[pymodule]
fn _comet(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Layer>()?;
    m.add_function(wrap_pyfunction!(plan, m)?)?;
    m.add_function(wrap_pyfunction!(check_inputs, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_available, m)?)?;
    m.add("CometError", m.py().get_type::<CometError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
