//! `comet bench` (the layer): runs the MoE layer fused and non-overlapped
//! side by side, checks both against the f64 reference, and prints the
//! per-phase times beside the cost model's prediction. Without a GPU this
//! is the CPU executor: W ranks as threads over the local transport.

use crate::limits::{available_memory, ensure_fits};
use crate::shape::{Shape, ShapeArgs};
use crate::split_args::SplitArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use comet_core::cost::{CostEstimate, CostModel, DeviceFigures};
use comet_core::reference::{max_error, moe_layer};
use comet_core::schedule::TileShape;
use comet_core::weights::random_tokens;
use comet_core::{ExpertWeights, MoeConfig, Preset, Routing, RoutingKind};
use comet_sched::tile_math::fc1_swiglu;
use comet_sched::{CallStats, CpuWorld, ExecMode, ExecOptions, RankInput, Trace};
use comet_transport::local::{DelayModel, LinkModel};
use std::path::Path;
use std::time::{Duration, Instant};

/// Relative tolerance of the f32 executor against the f64 reference.
const TOLERANCE: f64 = 1e-4;

#[derive(Args, Debug, Clone)]
pub struct LayerArgs {
    /// Model preset: small, mixtral-8x7b, qwen2-moe, phi3.5-moe.
    #[arg(long, default_value = "small")]
    pub preset: String,
    #[command(flatten)]
    pub shape: ShapeArgs,
    /// Divide hidden and FFN sizes by this (CPU runs of the large presets).
    #[arg(long, default_value_t = 1)]
    pub scale_down: usize,
    /// Expert-parallel ranks.
    #[arg(long, default_value_t = 4)]
    pub ranks: usize,
    /// Tokens per rank.
    #[arg(long, default_value_t = 256)]
    pub tokens: usize,
    /// Routing: uniform, zipf, all-to-one, some-empty, silent-rank.
    #[arg(long, default_value = "uniform")]
    pub routing: String,
    /// Timed iterations of each mode (after one warm-up).
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    /// Rows per tile (the CPU executor's BM); the cost model picks chunks.
    #[arg(long, default_value_t = 32)]
    pub bm: usize,
    /// Random delay bound of the local transport per put/signal, microseconds.
    #[arg(long, default_value_t = 0)]
    pub delay_us: u64,
    /// Emulated link between ranks, GB/s per direction (0: plain memcpy).
    /// Gives the overlap something to hide on a CPU. With --gpu and a
    /// staged --transport (local, ucx): the link's speed the cost model
    /// plans with (default 3, a socket; `comet bench transport` measures
    /// it).
    #[arg(long, default_value_t = 0.0)]
    pub link_gbps: f64,
    /// Latency of the emulated link, microseconds (default 10; needs
    /// --link-gbps).
    #[arg(long)]
    pub link_latency_us: Option<u64>,
    /// Bound on every wait, seconds: a call that has waited this long in
    /// all fails, naming the rank and the signal.
    #[arg(long, default_value_t = 60)]
    pub timeout_s: u64,
    /// Write a Chrome/Perfetto trace of the last fused call here.
    #[arg(long)]
    pub trace: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Run on the GPU executor (rank r on visible GPU r mod their count,
    /// so one GPU is shared by every rank); `--preset all`
    /// runs mixtral-8x7b, qwen2-moe and phi3.5-moe.
    #[arg(long)]
    pub gpu: bool,
    /// With --gpu, what carries the ranks' bytes: `nvlink` (ranks as
    /// threads, kernels store into the peers), `local` (ranks as threads,
    /// each staged through host memory by its proxy: the host path UCX and
    /// NCCL take across nodes), `ucx` (staged over UCX: under `comet
    /// launch -n W` this process is one rank, else every rank is a UCX
    /// worker of this process), `nccl` (this process is one rank of a world
    /// started by `comet launch -n W`, one GPU per rank, its pieces carried
    /// by NCCL). Ranks staged through
    /// host memory get socket-speed link figures for the cost model.
    #[arg(long, default_value = "nvlink")]
    pub transport: String,
    /// With a staged --transport (local, ucx), how each proxy moves token
    /// rows to and from another host: `tokens` (each token once per
    /// destination rank both ways: expanded there on dispatch, its expert
    /// rows summed there before combine) or `rows` (one row per token and
    /// expert, as the kernels lay them out).
    /// Default tokens; refused with any other transport.
    #[arg(long, value_parser = ["tokens", "rows"])]
    pub wire: Option<String>,
    /// With --gpu and one rank: FC1 reads x's rows in place instead of
    /// rows the dispatch copied into expert order (GEMM-only keeps the
    /// copied rows, so its ratio to fused shows what the gather costs or
    /// saves). Off by default: slower on an H100 (docs/PERF.md).
    #[arg(long)]
    pub gather_x: bool,
    /// With --gpu: how the device forward splits the GPU and sizes its
    /// buffers.
    #[command(flatten)]
    pub split: SplitArgs,
    /// With --gpu: also time each phase of one sequential call (route,
    /// layout, dispatch, fc1, fc2, combine, reduce) with CUDA events.
    #[arg(long)]
    pub phases: bool,
}

/// Fails fast, before any weight is generated, when this machine has no
/// CUDA device: no driver library (libcuda), or a driver that reports no
/// GPU. Cheap (the driver is probed once per process, no context created).
pub fn require_gpu() -> Result<()> {
    if comet_transport::cuda::device_count() == 0 {
        bail!(
            "--gpu: no CUDA device on this machine (no libcuda driver library, or it reports no GPU); \
             run without --gpu for the CPU executor"
        );
    }
    Ok(())
}

/// Checks that `--trace` can be written before anything runs: its folder
/// exists and a file can be created there (a file made only to check this
/// is removed again).
pub fn check_trace_path(path: &Path) -> Result<()> {
    if path.is_dir() {
        bail!("--trace {}: is a folder, not a file", path.display());
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        bail!(
            "--trace {}: folder {} does not exist",
            path.display(),
            parent.display()
        );
    }
    let existed = path.exists();
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .with_context(|| format!("--trace {}: cannot write there", path.display()))?;
    if !existed {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// Bytes the CPU executor holds at once for `tokens` per rank: inputs,
/// routing, the f64 reference, the weights (the model's and each rank's
/// copy), each rank's receive and combine buffers (sized for the worst
/// case, with their poison fill) and one call's intermediates.
pub fn cpu_bench_bytes(cfg: &MoeConfig, tokens: usize) -> u128 {
    let (w, h, f, e, k) = (
        cfg.ranks as u128,
        cfg.hidden as u128,
        cfg.ffn as u128,
        cfg.experts as u128,
        cfg.top_k as u128,
    );
    let t = tokens as u128;
    let kk = k.min(e / w.max(1));
    let rows = w * t * k; // rows of the world per call
    let inputs = w * t * h * 4 + w * t * k * 8 + t * e * 4;
    let reference = w * t * h * 8 + rows * f * 8;
    let weights = 2 * e * 3 * h * f * 4;
    let buffers = w * (w * t * kk * h * 4 * 2 + t * k * h * 4 * 2);
    let call = rows * h * 4 * 2 + rows * f * 4 + w * t * h * 4;
    inputs + reference + weights + buffers + call
}

impl LayerArgs {
    /// Whether --transport stages the GPU ranks' bytes through a proxy
    /// that chooses its wire format.
    pub fn staged(&self) -> bool {
        matches!(self.transport.as_str(), "local" | "ucx")
    }

    /// The wire format of a staged transport's proxy.
    pub fn wire(&self) -> &str {
        self.wire.as_deref().unwrap_or("tokens")
    }

    /// The flags every executor shares, checked before anything runs;
    /// each mistake named by its flag.
    pub fn check(&self) -> Result<()> {
        if self.tokens == 0 {
            bail!("--tokens must be at least 1");
        }
        if self.ranks == 0 {
            bail!("--ranks must be at least 1");
        }
        if self.iters == 0 {
            bail!("--iters must be at least 1");
        }
        if self.timeout_s == 0 {
            bail!("--timeout-s must be at least 1 (it bounds every wait of a call)");
        }
        if self.scale_down == 0 {
            bail!("--scale-down must be at least 1 (1 keeps the sizes as they are)");
        }
        if !(self.link_gbps >= 0.0 && self.link_gbps.is_finite()) {
            bail!("--link-gbps must be a finite number >= 0");
        }
        if self.link_latency_us.is_some() && self.link_gbps == 0.0 {
            bail!("--link-latency-us needs --link-gbps: without it there is no emulated link");
        }
        if self.gpu {
            let staged = self.staged();
            for (given, flag) in [
                (self.link_gbps > 0.0 && !staged, "--link-gbps"),
                (self.link_latency_us.is_some(), "--link-latency-us"),
                (self.delay_us > 0, "--delay-us"),
            ] {
                if given {
                    bail!(
                        "{flag} shapes the CPU executor's emulated link; --gpu has none \
                         (--link-gbps with a staged --transport is the link the cost model plans with)"
                    );
                }
            }
        }
        self.split.check()?;
        if self.phases && !self.gpu {
            bail!("--phases times the GPU forward's phases; it needs --gpu");
        }
        let mut gpu_only = self.split.given();
        if self.gather_x {
            gpu_only.push("--gather-x");
        }
        if let (Some(flag), false) = (gpu_only.first(), self.gpu) {
            bail!("{flag} sets how the GPU forward runs; it needs --gpu");
        }
        match (self.transport.as_str(), self.gpu) {
            ("nvlink", _) => {}
            ("local" | "ucx" | "nccl", true) => {}
            ("local" | "ucx" | "nccl", false) => bail!(
                "--transport {} carries the GPU ranks' bytes; it needs --gpu",
                self.transport
            ),
            (other, _) => bail!("--transport {other}: expected nvlink, local, ucx or nccl"),
        }
        if let (Some(w), false) = (&self.wire, self.gpu && self.staged()) {
            bail!(
                "--wire {w} sets how a staged transport's proxy moves rows; it needs --gpu \
                 with --transport local or ucx (nvlink stores rows, nccl sends rows)"
            );
        }
        if let Some(p) = &self.trace {
            check_trace_path(p)?;
        }
        Ok(())
    }

    /// The shapes to run: `--preset` (one name, or `all` for the three
    /// large presets) over `--ranks`, with the shape flags applied, then
    /// scaled down by `--scale-down`. The GPU bench iterates these.
    pub fn shapes(&self) -> Result<Vec<Shape>> {
        self.shape.shapes(
            &self.preset,
            &[Preset::Mixtral8x7b, Preset::Qwen2Moe, Preset::Phi35Moe],
            self.ranks,
            "--ranks",
            self.scale_down,
        )
    }

    /// The one shape of a run of one preset (`all` is an error here).
    pub fn config(&self) -> Result<Shape> {
        let mut v = self.shapes()?;
        if v.len() != 1 {
            bail!(
                "--preset {} names {} shapes; the CPU executor runs one (name a preset)",
                self.preset,
                v.len()
            );
        }
        Ok(v.remove(0))
    }
}

struct ModeResult {
    median: CallStats,
    max_err: f64,
    trace: Option<Trace>,
}

/// Measures this machine's f32 tile rate (GFLOP/s on one thread) and copy
/// bandwidth, so the cost model's prediction uses real figures.
fn calibrate(cfg: &MoeConfig) -> (f64, f64) {
    let rows = 32;
    let x = random_tokens(rows, cfg.hidden, 1);
    let w1 = random_tokens(cfg.hidden, 2 * cfg.ffn, 2);
    let mut act = vec![0f32; rows * cfg.ffn];
    let start = Instant::now();
    let mut reps = 0;
    while start.elapsed() < Duration::from_millis(100) || reps < 2 {
        fc1_swiglu(&x, &w1, cfg.hidden, cfg.ffn, &mut act);
        reps += 1;
    }
    let gflops =
        2.0 * (rows * cfg.hidden * 2 * cfg.ffn * reps) as f64 / start.elapsed().as_secs_f64() / 1e9;
    let src = vec![1u8; 32 << 20];
    let mut dst = vec![0u8; 32 << 20];
    let start = Instant::now();
    for _ in 0..4 {
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst);
    }
    let gbps = 4.0 * (32 << 20) as f64 / start.elapsed().as_secs_f64() / 1e9;
    (gflops, gbps)
}

fn median_stats(mut v: Vec<CallStats>) -> CallStats {
    v.sort_by_key(|s| s.total);
    v[v.len() / 2].clone()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn run(a: LayerArgs) -> Result<()> {
    a.check()?;
    if a.gpu {
        // Before the GPU bench generates gigabytes of weights.
        require_gpu()?;
        return crate::layer_gpu::run(&a);
    }
    anyhow::ensure!(a.bm >= 1, "--bm must be at least 1");
    let Shape { label, cfg } = a.config()?;
    let kind: RoutingKind = a.routing.parse()?;
    ensure_fits(
        cpu_bench_bytes(&cfg, a.tokens),
        available_memory(),
        &format!(
            "the CPU executor with {} tokens per rank over {} ranks ({cfg})",
            a.tokens, cfg.ranks
        ),
        "lower --tokens or --ranks, or raise --scale-down",
    )?;
    run_cpu(&a, &label, &cfg, kind)
}

/// The CPU executor's bench: the cost model's plan for this machine, both
/// modes timed against the f64 reference, then the report.
fn run_cpu(a: &LayerArgs, label: &str, cfg: &MoeConfig, kind: RoutingKind) -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let link = (a.link_gbps > 0.0).then(|| LinkModel {
        gbps: a.link_gbps,
        latency: Duration::from_micros(a.link_latency_us.unwrap_or(10)),
    });
    let plan = CpuPlan::new(a, cfg, cores, link);
    if let Some(l) = link {
        eprintln!(
            "comet bench: emulated link {} GB/s, {:?} latency between ranks",
            l.gbps, l.latency
        );
    }
    eprintln!(
        "comet bench: CPU executor (no GPU path selected), {} ({}), {} tokens/rank, {} routing, {} cores",
        label, cfg, a.tokens, a.routing, cores
    );
    let delay = (a.delay_us > 0).then(|| DelayModel {
        seed: a.seed,
        max: Duration::from_micros(a.delay_us),
    });
    let timeout = Duration::from_secs(a.timeout_s);
    let mut world = CpuWorld::with_link(cfg, a.tokens, plan.shape, delay, link, a.seed, timeout)?;
    let inputs: Vec<RankInput> = (0..cfg.ranks)
        .map(|r| {
            let routing = Routing::generate(cfg, r, a.tokens, kind, a.seed);
            RankInput {
                x: random_tokens(routing.tokens, cfg.hidden, a.seed * 7919 + r as u64),
                routing,
            }
        })
        .collect();
    let all = ExpertWeights::all(cfg, a.seed);
    let reference: Vec<Vec<f64>> = inputs
        .iter()
        .map(|i| moe_layer(cfg, &i.x, &i.routing, &all))
        .collect::<Result<_, _>>()?;
    let fused = time_mode(a, &mut world, &inputs, &reference, ExecMode::Fused)?;
    let base = time_mode(a, &mut world, &inputs, &reference, ExecMode::Baseline)?;
    print_cpu_report(a, label, cfg, &plan, &fused, &base)?;
    anyhow::ensure!(
        fused.max_err < TOLERANCE && base.max_err < TOLERANCE,
        "result does not match the reference"
    );
    Ok(())
}

/// What the cost model plans for this machine: its measured rates, the
/// link if one is emulated, and the tiles and chunks it picks.
struct CpuPlan {
    /// f32 tile rate of one thread, GFLOP/s (calibrated).
    gflops: f64,
    dev: DeviceFigures,
    est: CostEstimate,
    shape: TileShape,
}

impl CpuPlan {
    fn new(a: &LayerArgs, cfg: &MoeConfig, cores: usize, link: Option<LinkModel>) -> CpuPlan {
        let (gflops, gbps) = calibrate(cfg);
        // Per rank: its share of the cores computes; copies run beside it.
        let per_rank_gflops = gflops * cores.min(cfg.ranks) as f64 / cfg.ranks as f64;
        let mut dev = DeviceFigures::cpu(per_rank_gflops, gbps, 1);
        dev.bm = a.bm;
        if let Some(l) = link {
            dev.link_gbps = l.gbps;
            dev.block_gbps = l.gbps;
            dev.link_latency_us = l.latency.as_secs_f64() * 1e6;
        }
        let est = CostModel::estimate(cfg, a.tokens, &dev);
        let shape = TileShape {
            bm: a.bm,
            chunk_cols: est.shape.chunk_cols,
            groups: est.groups,
        };
        CpuPlan {
            gflops,
            dev,
            est,
            shape,
        }
    }
}

/// A warm-up call and `a.iters` timed calls in `mode`: the slowest rank's
/// median, the largest error against the reference, and the last fused
/// call's trace when one is asked for.
fn time_mode(
    a: &LayerArgs,
    world: &mut CpuWorld,
    inputs: &[RankInput],
    reference: &[Vec<f64>],
    mode: ExecMode,
) -> Result<ModeResult> {
    let mut stats = Vec::new();
    let mut max_err = 0f64;
    let mut trace = None;
    for it in 0..=a.iters {
        let opts = ExecOptions {
            timeout: Duration::from_secs(a.timeout_s),
            trace: a.trace.is_some() && mode == ExecMode::Fused && it == a.iters,
            fault: None,
        };
        let outs = world.run(inputs, mode, &opts)?;
        for (o, want) in outs.iter().zip(reference) {
            max_err = max_err.max(max_error(&o.y, want));
        }
        // A call ends when its slowest rank does.
        let slowest = outs
            .iter()
            .map(|o| o.stats.clone())
            .max_by_key(|s| s.total)
            .expect("ranks >= 1");
        if it > 0 {
            eprintln!(
                "  {:?} iteration {}/{}: {:.2} ms",
                mode,
                it,
                a.iters,
                ms(slowest.total)
            );
            stats.push(slowest);
        }
        if opts.trace {
            let mut t = Trace::new(outs[0].trace.origin);
            for o in outs {
                t.extend(o.trace);
            }
            trace = Some(t);
        }
    }
    Ok(ModeResult {
        median: median_stats(stats),
        max_err,
        trace,
    })
}

/// The phases of both modes, their ratio, the errors, the cost model's
/// prediction beside the measurement, and the trace file if asked for.
fn print_cpu_report(
    a: &LayerArgs,
    label: &str,
    cfg: &MoeConfig,
    plan: &CpuPlan,
    fused: &ModeResult,
    base: &ModeResult,
) -> Result<()> {
    println!(
        "comet bench — CPU executor, {} {} tokens/rank, {} routing",
        label, a.tokens, a.routing
    );
    println!(
        "config: {cfg}; tiles BM {}, {} layer1 chunks of {} columns, {} expert group(s) (cost model)",
        plan.shape.bm, plan.est.chunks, plan.shape.chunk_cols, plan.shape.groups
    );
    println!();
    println!(
        "| phase (slowest rank, median of {}) | fused ms | baseline ms |",
        a.iters
    );
    println!("| --- | ---: | ---: |");
    let (f, b) = (&fused.median, &base.median);
    for (phase, fd, bd) in [
        ("count exchange", f.exchange, b.exchange),
        ("layer0: dispatch + FC1/SwiGLU", f.layer0, b.layer0),
        ("layer1: FC2 + combine + reduce", f.layer1, b.layer1),
        ("compute worker blocked on signals", f.waiting, b.waiting),
        ("total", f.total, b.total),
    ] {
        println!("| {phase} | {:.3} | {:.3} |", ms(fd), ms(bd));
    }
    println!();
    println!("fused vs baseline: {:.2}x", ms(b.total) / ms(f.total));
    let verdict = |e: f64| if e < TOLERANCE { "ok" } else { "FAILED" };
    println!(
        "max error vs f64 reference (tolerance {TOLERANCE:e}): fused {:.2e} {}, baseline {:.2e} {}",
        fused.max_err,
        verdict(fused.max_err),
        base.max_err,
        verdict(base.max_err)
    );
    println!(
        "cost model (calibrated: {:.1} GFLOP/s per core, link {:.1} GB/s): predicted baseline {:.3} ms, overlapped {:.3} ms; measured {:.3} / {:.3} ms",
        plan.gflops, plan.dev.link_gbps, plan.est.baseline_ms, plan.est.overlapped_ms, ms(b.total), ms(f.total)
    );
    if let (Some(path), Some(t)) = (&a.trace, &fused.trace) {
        let text = serde_json::to_string(&t.to_json())?;
        std::fs::write(path, text).with_context(|| format!("writing trace {}", path.display()))?;
        println!(
            "trace: {} ({} slices; open in ui.perfetto.dev or chrome://tracing)",
            path.display(),
            t.slices.len()
        );
    }
    Ok(())
}
