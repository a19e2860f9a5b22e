//! `comet bench --gpu`: the device forward (comet-sched's `MoeLayer`) timed
//! on the GPU with CUDA events, in turns in one run: fused, non-overlapped,
//! GEMM-only (the two grouped GEMMs over the same rows), and, for the
//! tokens the busiest GPU holds (those of all its ranks), what a
//! PyTorch user runs today on one GPU (the plain torch layer and Hugging
//! Face's MixtralSparseMoeBlock in each experts implementation, every
//! expert on it) through the scripts/bench_torch_layer.py helper. Plus
//! communication-only (route, count exchange, dispatch, combine: no GEMMs)
//! and the host time of one `forward` call.
//!
//! W ranks are threads of this process, rank r on visible GPU r mod their
//! count ([`visible_placement`]): with one GPU they share it (each gets its
//! share of the SMs) and for W > 1 the "link" is device memory, the
//! protocol on the real kernels, not link speed; with several, ranks store
//! into each other's GPUs over NVLink. With `--transport local` every rank
//! is staged through host memory instead, a proxy thread per rank carrying
//! the bytes over the local transport: the host path of UCX and NCCL, with
//! its copies. With
//! `--transport ucx` under `comet launch -n W` each process is one rank,
//! staged over UCX (TCP or shared memory, per `UCX_TLS`), and prints its
//! own row; the torch layers are not timed there. Without the launcher
//! the W ranks are UCX workers of this one process: processes sharing a
//! GPU take turns on it (a fused kernel spinning for a peer's piece holds
//! the GPU while the peer cannot make it), the ranks of one process run
//! at once, as ranks on GPUs of their own would. `--transport nccl` is
//! the same with one GPU per process, the pieces carried by NCCL
//! (comet-sched's `NcclLayer`). Correctness is the GPU tests' job (tests/gpu_layer.rs);
//! here fused and non-overlapped outputs must agree and be finite.

use crate::layer::LayerArgs;
use crate::torch_baseline::{find_script, TorchBaseline};
use anyhow::{Context, Result};
use comet_core::cost::DeviceFigures;
use comet_core::weights::random_tokens;
use comet_core::{MoeConfig, Routing, RoutingKind};
use comet_sched::device_world::{visible_placement, DeviceWorld, WorldWeights};
use comet_sched::forward::{overlap_bound_ms, LayerOptions, PHASES};
use comet_sched::proxy_plan::WireFormat;
use comet_sched::{ExecMode, RankInput};
use cudarc::driver::{CudaEvent, CudaStream};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The torch implementations timed beside ours.
const TORCH_IMPLS: [&str; 3] = ["torch", "hf-eager", "hf-grouped_mm"];

struct Row {
    label: String,
    ranks: usize,
    tokens: usize,
    fused: f64,
    seq: f64,
    gemm: f64,
    /// fused/GEMM-only of each round's pair: median, lowest, highest.
    fused_per_gemm: (f64, f64, f64),
    /// Route, count exchange, dispatch and combine alone.
    comm: f64,
    host_us: f64,
    /// (implementation, its ms, ours fused ms timed in turns with it).
    torch: Vec<(String, f64, f64)>,
    diff: f64,
    overlap: bool,
    /// Milliseconds of each phase of one sequential call (`--phases`).
    phases: Option<Vec<f32>>,
    /// ... and of one fused call on the GEMMs' side warps, whose dispatch
    /// runs inside FC1 and whose combine (alone: sums but the last
    /// chunk's) inside FC2.
    fused_phases: Option<Vec<f32>>,
}

/// Phase times of one call in `mode` (None where that call's phases
/// cannot be told apart: an overlapped one).
fn phases_of(world: &mut DeviceWorld, mode: ExecMode) -> Result<Option<Vec<f32>>> {
    world.set_mode(mode);
    world.time_phases(true)?;
    world.forward()?;
    world.check()?;
    let t = world.phase_times()?;
    world.time_phases(false)?;
    Ok(t)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// `num[i] / den[i]` of each round: median, lowest, highest. Two modes timed
/// in the same round share the GPU's state then (clocks, power, heat), so
/// the ratio of a pair moves less than the ratio of two medians taken
/// over rounds in which that state drifts.
fn paired_ratio(num: &[f64], den: &[f64]) -> (f64, f64, f64) {
    let mut r: Vec<f64> = num.iter().zip(den).map(|(n, d)| n / d).collect();
    let m = median(&mut r);
    (m, r[0], r[r.len() - 1])
}

/// Device time of one call of every rank: first start to last end over
/// the ranks of a GPU, the slowest GPU's (events of different GPUs have
/// no common clock; the ranks of a call wait for each other, so each
/// GPU's span covers the call).
fn timed(world: &mut DeviceWorld, what: impl Fn(&mut DeviceWorld) -> Result<()>) -> Result<f64> {
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let streams: Vec<Arc<CudaStream>> = world
        .ranks()
        .iter()
        .map(|r| Arc::clone(&r.stream))
        .collect();
    let starts: Vec<CudaEvent> = streams
        .iter()
        .map(|s| s.record_event(flags))
        .collect::<Result<_, _>>()?;
    what(world)?;
    let ends: Vec<CudaEvent> = streams
        .iter()
        .map(|s| s.record_event(flags))
        .collect::<Result<_, _>>()?;
    world.check()?;
    let mut worst = 0f64;
    for (s, sst) in starts.iter().zip(&streams) {
        for (e, est) in ends.iter().zip(&streams) {
            if sst.context().ordinal() == est.context().ordinal() {
                worst = worst.max(s.elapsed_ms(e)? as f64);
            }
        }
    }
    Ok(worst)
}

fn inputs(cfg: &MoeConfig, tokens: usize, kind: RoutingKind, seed: u64) -> Vec<RankInput> {
    (0..cfg.ranks)
        .map(|r| {
            let routing = Routing::generate(cfg, r, tokens, kind, seed ^ r as u64);
            RankInput {
                x: random_tokens(tokens, cfg.hidden, seed * 7919 + r as u64),
                routing,
            }
        })
        .collect()
}

/// One shape: the world built, fused and sequential outputs compared, the
/// torch layers timed in turns with ours, then the modes in turns.
fn bench_one(
    cfg: &MoeConfig,
    label: &str,
    a: &LayerArgs,
    kind: RoutingKind,
    torch: &mut Option<TorchBaseline>,
) -> Result<Row> {
    let ordinals = visible_placement(cfg.ranks);
    let gpus = ordinals
        .iter()
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    let (mut world, overlap) = build_world(cfg, label, a, &ordinals, gpus)?;
    // Every rank's inputs, of which this process holds the ranks it runs.
    let all = inputs(cfg, a.tokens, kind, a.seed);
    let mine: Vec<RankInput> = world
        .ranks()
        .iter()
        .map(|r| all[r.layer.rank()].clone())
        .collect();
    world.set_inputs(&mine)?;
    let diff = fused_against_sequential(&mut world, label)?;
    // The busiest GPU's tokens: those of its ranks (a launched rank runs
    // the torch layers nowhere).
    let torch_ok = match torch.as_mut() {
        Some(t) => time_torch(
            t,
            &mut world,
            cfg,
            label,
            a,
            a.tokens * cfg.ranks.div_ceil(gpus),
        )?,
        None => Vec::new(),
    };
    let m = time_modes(&mut world, cfg, a)?;
    // A fused call's phases are timed where its rows ride in the GEMMs'
    // side warps (on blocks they overlap, so have no phases of their own;
    // without either it is the sequential call again).
    let side_warps = world.ranks().iter().any(|r| r.layer.plan().side_warps);
    let (phases, fused_phases) = if a.phases {
        (
            phases_of(&mut world, ExecMode::Baseline)?,
            if side_warps {
                phases_of(&mut world, ExecMode::Fused)?
            } else {
                None
            },
        )
    } else {
        (None, None)
    };
    world.barrier(Duration::from_secs(a.timeout_s))?;
    Ok(Row {
        phases,
        fused_phases,
        label: label.to_string(),
        ranks: cfg.ranks,
        tokens: a.tokens,
        fused_per_gemm: m.fused_per_gemm,
        fused: m.fused,
        seq: m.seq,
        gemm: m.gemm,
        comm: m.comm,
        host_us: m.host_us,
        torch: torch_ok,
        diff,
        overlap,
    })
}

/// This process's ranks of the world over `a.transport` (rank r on GPU
/// `ordinals[r]` where the ranks are this process's), and whether its plan
/// overlaps.
fn build_world(
    cfg: &MoeConfig,
    label: &str,
    a: &LayerArgs,
    ordinals: &[usize],
    gpus: usize,
) -> Result<(DeviceWorld, bool)> {
    let staged = a.staged();
    let mut opts = LayerOptions {
        timeout: Duration::from_secs(a.timeout_s),
        // Staged ranks talk through host memory: a slow link, not the GPU's
        // (NCCL between GPUs of one node takes NVLink).
        figures: staged.then(|| DeviceFigures {
            link_gbps: if a.link_gbps > 0.0 { a.link_gbps } else { 3.0 },
            ..DeviceFigures::h200_slow_link()
        }),
        wire_format: match a.wire() {
            "rows" => WireFormat::Rows,
            _ => WireFormat::Tokens,
        },
        gather_x: a.gather_x,
        comm_blocks: a.split.comm_sms,
        expert_groups: a.split.groups,
        chunks: a.split.chunks,
        reserved_sms: a.split.reserved_sms,
        recv_capacity: a.split.recv_rows,
        ..LayerOptions::default()
    };
    let wire = if staged {
        format!(" ({} on the wire)", a.wire())
    } else {
        String::new()
    };
    let placed = if launched(a) {
        String::new()
    } else {
        format!(" on {gpus} GPU(s)")
    };
    eprintln!(
        "comet bench --gpu: {label} ({cfg}), {} rank(s){placed} over {}{wire}, {} tokens/rank: building",
        cfg.ranks, a.transport, a.tokens
    );
    let weights = WorldWeights::Random {
        seed: a.seed,
        scale: 1.0 / (cfg.hidden as f32).sqrt(),
    };
    let world = match a.transport.as_str() {
        "local" => DeviceWorld::staged(cfg, ordinals, a.tokens, weights, &opts, None)?,
        "ucx" => ucx_world(cfg, ordinals, a.tokens, weights, &mut opts, launched(a))?,
        "nccl" => nccl_rank(cfg, a.tokens, weights, &opts)?,
        _ => DeviceWorld::new(cfg, ordinals, a.tokens, weights, &opts).with_context(|| {
            format!(
                "{} ranks over nvlink on GPUs {ordinals:?} (where GPUs cannot reach each \
                 other, CUDA_VISIBLE_DEVICES can name ones that can, or one for all to share)",
                cfg.ranks
            )
        })?,
    };
    let plan = world.ranks()[0].layer.plan();
    // Which GEMM tiles ran (COMET_GEMM_FAMILY can change them).
    eprintln!(
        "  GEMM tiles: {} rows, FC1 {} and FC2 {} output columns",
        plan.tiles.bm, plan.tiles.fc1_cols, plan.tiles.fc2_cols
    );
    if plan.overlap {
        eprintln!(
            "  overlapped: {} communication blocks beside {} GEMM CTAs, {} layer1 chunks, {} expert group(s)",
            plan.comm_blocks, plan.gemm_grid_overlap, plan.chunks, plan.groups
        );
    }
    let overlap = plan.overlap;
    Ok((world, overlap))
}

/// A warm-up call in each mode; the largest difference between the fused
/// and the sequential outputs, which must be finite.
fn fused_against_sequential(world: &mut DeviceWorld, label: &str) -> Result<f64> {
    let mut outs = Vec::new();
    for mode in [ExecMode::Fused, ExecMode::Baseline] {
        world.set_mode(mode);
        world.forward()?;
        world.check()?;
        outs.push(world.outputs()?);
    }
    let mut diff = 0f64;
    for (f, b) in outs[0].iter().flatten().zip(outs[1].iter().flatten()) {
        anyhow::ensure!(f.is_finite() && b.is_finite(), "{label}: non-finite output");
        diff = diff.max((f - b).abs() as f64);
    }
    Ok(diff)
}

/// Each torch layer the helper can run for `tokens` tokens on one GPU,
/// timed in turns with our fused call: (implementation, its ms, ours).
fn time_torch(
    t: &mut TorchBaseline,
    world: &mut DeviceWorld,
    cfg: &MoeConfig,
    label: &str,
    a: &LayerArgs,
    tokens: usize,
) -> Result<Vec<(String, f64, f64)>> {
    let mut done = Vec::new();
    for imp in TORCH_IMPLS {
        let req = json!({"op": "prepare", "impl": imp, "hidden": cfg.hidden, "ffn": cfg.ffn,
            "experts": cfg.experts, "top_k": cfg.top_k, "tokens": tokens, "seed": a.seed});
        if t.prepare_request(req, &format!("{imp} {label}"))? {
            // The helper holds one case at a time: time this one now, in
            // turns with ours.
            let mut ts = Vec::new();
            let mut ours = Vec::new();
            for _ in 0..a.iters {
                ts.push(t.time_once()?);
                world.set_mode(ExecMode::Fused);
                ours.push(timed(world, |w| Ok(w.forward()?))?);
            }
            let (tm, om) = (median(&mut ts), median(&mut ours));
            eprintln!("  {imp}: {tm:.3} ms (ours fused in turns {om:.3} ms)");
            done.push((imp.to_string(), tm, om));
        }
    }
    Ok(done)
}

/// Medians of the modes timed in turns (ms), fused/GEMM-only per round,
/// and the host's time per rank of one fused call (us).
struct Modes {
    fused: f64,
    seq: f64,
    gemm: f64,
    comm: f64,
    fused_per_gemm: (f64, f64, f64),
    host_us: f64,
}

/// `a.iters` rounds of fused, sequential, GEMM-only and communication-only,
/// each round starting with the next mode, so none always follows the
/// same one (the GPU runs power-bound back to back: docs/PERF.md); then
/// one fused call's host time.
fn time_modes(world: &mut DeviceWorld, cfg: &MoeConfig, a: &LayerArgs) -> Result<Modes> {
    let (mut f, mut s, mut g, mut c, mut host) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..a.iters {
        for m in 0..4 {
            match (round + m) % 4 {
                0 => {
                    world.set_mode(ExecMode::Fused);
                    f.push(timed(world, |w| Ok(w.forward()?))?);
                }
                1 => {
                    world.set_mode(ExecMode::Baseline);
                    s.push(timed(world, |w| Ok(w.forward()?))?);
                }
                2 => g.push(timed(world, |w| Ok(w.gemms_only()?))?),
                _ => c.push(timed(world, |w| Ok(w.comms_only()?))?),
            }
        }
        world.set_mode(ExecMode::Fused);
        let t0 = Instant::now();
        world.forward()?;
        host.push(t0.elapsed().as_secs_f64() * 1e6 / cfg.ranks as f64);
        world.check()?;
    }
    Ok(Modes {
        fused_per_gemm: paired_ratio(&f, &g),
        fused: median(&mut f),
        seq: median(&mut s),
        gemm: median(&mut g),
        comm: median(&mut c),
        host_us: median(&mut host),
    })
}

/// Runs `comet bench --gpu` with the layer arguments.
pub fn run(a: &LayerArgs) -> Result<()> {
    anyhow::ensure!(a.iters >= 1, "--iters must be at least 1");
    let kind: RoutingKind = a.routing.parse()?;
    let shapes: Vec<(String, MoeConfig)> =
        a.shapes()?.into_iter().map(|s| (s.label, s.cfg)).collect();
    let mut torch = match find_script("bench_torch_layer.py") {
        // One process of a launched world holds one rank: no whole-layer
        // torch figure to set beside it.
        _ if launched(a) => None,
        Some(script) => TorchBaseline::start(&script).context("starting the torch helper")?,
        None => {
            eprintln!("comet bench --gpu: scripts/bench_torch_layer.py not found; torch skipped");
            None
        }
    };
    let mut rows = Vec::new();
    for (label, cfg) in &shapes {
        rows.push(bench_one(cfg, label, a, kind, &mut torch)?);
    }
    println!(
        "comet bench --gpu: device forward, {} routing, median of {} calls timed with CUDA events \
         (first start to last end over the ranks of a GPU, the slowest GPU), modes in turns, each \
         round starting with the next; fused/GEMM-only the median of each round's pair; torch \
         layers on one GPU for the tokens the busiest GPU holds, every expert on it, in turns with ours; \
         host: time of one forward call per rank",
        a.routing, a.iters
    );
    println!();
    println!("| shape | W | tokens/rank | overlap | fused ms | sequential ms | GEMM-only ms | comm-only ms | fused/GEMM-only (rounds' range) | fused/max(comm, GEMM) | best torch | torch ms | fused ms in turns with it | torch/fused | host us/call | max abs fused-seq |");
    println!("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |");
    for r in &rows {
        let best = r
            .torch
            .iter()
            .min_by(|x, y| x.1.total_cmp(&y.1))
            .cloned()
            .unwrap_or(("-".into(), f64::NAN, f64::NAN));
        println!(
            "| {} | {} | {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} ({:.3}-{:.3}) | {:.3} | {} | {:.3} | {:.3} | {:.2}x | {:.1} | {:.1e} |",
            r.label,
            r.ranks,
            r.tokens,
            if r.overlap { "yes" } else { "no" },
            r.fused,
            r.seq,
            r.gemm,
            r.comm,
            r.fused_per_gemm.0,
            r.fused_per_gemm.1,
            r.fused_per_gemm.2,
            r.fused / r.comm.max(r.gemm),
            best.0,
            best.1,
            best.2,
            best.1 / best.2,
            r.host_us,
            r.diff
        );
    }
    let phase_line = |t: &[f32]| {
        let parts: Vec<String> = PHASES
            .iter()
            .zip(t)
            .map(|(name, ms)| format!("{name} {ms:.3}"))
            .collect();
        format!("{}; sum {:.3}", parts.join(", "), t.iter().sum::<f32>())
    };
    for r in rows.iter().filter(|r| r.phases.is_some()) {
        let t = r.phases.as_deref().unwrap_or_default();
        println!(
            "\nphases of one sequential call, {} (slowest rank, ms): {}",
            r.label,
            phase_line(t)
        );
        if let Some(f) = &r.fused_phases {
            println!(
                "phases of one fused call on the GEMMs' side warps, {} (the dispatch inside fc1; inside fc2 the combine of each chunk, alone the sums of every chunk but the last): {}",
                r.label,
                phase_line(f)
            );
        }
        if let Some(b) = overlap_bound_ms(t).filter(|_| r.overlap) {
            println!(
                "per-layer bound from these phases (route + layout + max(dispatch, fc1) + max(fc2, combine + reduce); ranks sharing a GPU contend more in sequence; expert groups pass it): {b:.3} ms; fused {:.3}",
                r.fused
            );
        }
    }
    let all: Vec<String> = rows
        .iter()
        .flat_map(|r| {
            r.torch
                .iter()
                .map(move |(i, ms, ours)| format!("{} {i} {ms:.3} ms (ours {ours:.3})", r.label))
        })
        .collect();
    if !all.is_empty() {
        println!();
        println!("torch layers: {}", all.join("; "));
    }
    Ok(())
}

/// Where this process's rank of a launched world runs: its local rank
/// and the ranks on its node (torchrun's environment), and the GPUs here.
#[cfg(any(feature = "ucx", feature = "nccl"))]
struct Placement {
    local: usize,
    local_world: usize,
    devices: usize,
}

#[cfg(any(feature = "ucx", feature = "nccl"))]
impl Placement {
    /// Rank `rank` of a launched world of `world`, which must be `cfg`'s.
    fn of(rank: usize, world: usize, cfg: &MoeConfig) -> Result<Placement> {
        anyhow::ensure!(
            world == cfg.ranks,
            "--ranks {} but the launched world has {world} ranks",
            cfg.ranks
        );
        let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok());
        Ok(Placement {
            local: env("LOCAL_RANK").unwrap_or(rank),
            local_world: env("LOCAL_WORLD_SIZE").unwrap_or(cfg.ranks),
            devices: comet_transport::cuda::device_count(),
        })
    }
}

/// The ranks of this process over UCX: its one rank of a launched world,
/// or every rank.
#[cfg(feature = "ucx")]
fn ucx_world(
    cfg: &MoeConfig,
    ordinals: &[usize],
    tokens: usize,
    weights: WorldWeights<'_>,
    opts: &mut LayerOptions,
    launched: bool,
) -> Result<DeviceWorld> {
    if launched {
        ucx_rank(cfg, tokens, weights, opts)
    } else {
        ucx_in_process(cfg, ordinals, tokens, weights, opts)
    }
}

/// This process's rank of a world launched by `comet launch -n W`, staged
/// over UCX on the GPU its local rank picks (processes on one GPU share
/// its SMs).
#[cfg(feature = "ucx")]
fn ucx_rank(
    cfg: &MoeConfig,
    tokens: usize,
    weights: WorldWeights<'_>,
    opts: &mut LayerOptions,
) -> Result<DeviceWorld> {
    use comet_transport::Transport;
    let t = comet_transport::ucx::UcxTransport::from_env()
        .context("--transport ucx: UCX bootstrap (run under `comet launch -n W`)")?;
    let p = Placement::of(t.rank(), t.world(), cfg)?;
    let devices = p.devices.max(1);
    let local = p.local;
    opts.ranks_per_gpu = p.local_world.div_ceil(devices);
    if opts.ranks_per_gpu > 1 && !mps_running() && t.rank() == 0 {
        eprintln!(
            "comet bench --gpu: {} processes share a GPU and no MPS control pipe was found: \
             without MPS their kernels take turns on it, so a fused kernel waiting for a \
             peer's piece holds the GPU while the peer cannot make it (run the daemon, \
             nvidia-cuda-mps-control -d, or leave out `comet launch` for ranks of one process)",
            opts.ranks_per_gpu
        );
    }
    Ok(DeviceWorld::staged_over(
        cfg,
        t,
        local % devices,
        tokens,
        weights,
        opts,
    )?)
}

/// Whether this process is one rank of a launched world (UCX or NCCL
/// under `comet launch`, which sets torchrun's environment).
fn launched(a: &LayerArgs) -> bool {
    a.transport == "nccl" || (a.transport == "ucx" && std::env::var_os("WORLD_SIZE").is_some())
}

/// Every rank a UCX worker of this process, on the GPUs `ordinals` names.
#[cfg(feature = "ucx")]
fn ucx_in_process(
    cfg: &MoeConfig,
    ordinals: &[usize],
    tokens: usize,
    weights: WorldWeights<'_>,
    opts: &LayerOptions,
) -> Result<DeviceWorld> {
    use comet_transport::ucx::{UcxConfig, UcxTransport};
    let ts = UcxTransport::in_process(cfg.ranks, UcxConfig::from_env()?)
        .context("--transport ucx: UCX ranks in this process")?;
    Ok(DeviceWorld::staged_on(
        cfg, ordinals, ts, tokens, weights, opts,
    )?)
}

/// Whether an MPS daemon's control pipe is where CUDA looks for it
/// (`CUDA_MPS_PIPE_DIRECTORY`, by default /tmp/nvidia-mps).
#[cfg(feature = "ucx")]
fn mps_running() -> bool {
    let dir = std::env::var_os("CUDA_MPS_PIPE_DIRECTORY")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/tmp/nvidia-mps".into());
    dir.join("control").exists()
}

#[cfg(not(feature = "ucx"))]
fn ucx_world(
    _: &MoeConfig,
    _: &[usize],
    _: usize,
    _: WorldWeights<'_>,
    _: &mut LayerOptions,
    _: bool,
) -> Result<DeviceWorld> {
    anyhow::bail!("--transport ucx: this comet was built without UCX (cargo build -p comet-cli --features ucx)")
}

/// This process's rank of a world launched by `comet launch -n W` over
/// NCCL, on the GPU its local rank picks (one GPU per rank: NCCL refuses
/// two ranks on one).
#[cfg(feature = "nccl")]
fn nccl_rank(
    cfg: &MoeConfig,
    tokens: usize,
    weights: WorldWeights<'_>,
    opts: &LayerOptions,
) -> Result<DeviceWorld> {
    use comet_transport::bootstrap::Bootstrap;
    use comet_transport::nccl::{NcclOptions, NcclTransport};
    let boot = Bootstrap::from_env()
        .context("--transport nccl: bootstrap (run under `comet launch -n W`)")?;
    let p = Placement::of(boot.rank(), boot.world(), cfg)?;
    anyhow::ensure!(
        p.local_world <= p.devices && p.local < p.devices,
        "--transport nccl needs one GPU per rank: {} ranks on this node, {} GPU(s)",
        p.local_world,
        p.devices
    );
    let t = NcclTransport::new(
        p.local,
        std::sync::Arc::new(boot) as std::sync::Arc<dyn comet_transport::gpu::BlobExchange>,
        NcclOptions::default(),
    )
    .context("--transport nccl: NCCL world")?;
    Ok(DeviceWorld::nccl_over(cfg, t, tokens, weights, opts)?)
}

#[cfg(not(feature = "nccl"))]
fn nccl_rank(
    _: &MoeConfig,
    _: usize,
    _: WorldWeights<'_>,
    _: &LayerOptions,
) -> Result<DeviceWorld> {
    anyhow::bail!("--transport nccl: this comet was built without NCCL (cargo build -p comet-cli --features nccl)")
}

#[cfg(test)]
mod tests {
    use super::paired_ratio;

    #[test]
    fn paired_ratios_follow_each_round_not_the_medians() {
        // The GPU slows down over the rounds; each round's pair keeps 1.1.
        let fused = [11.0, 22.0, 33.0];
        let gemm = [10.0, 20.0, 30.0];
        let (m, lo, hi) = paired_ratio(&fused, &gemm);
        assert!((m - 1.1).abs() < 1e-12 && (lo - 1.1).abs() < 1e-12 && (hi - 1.1).abs() < 1e-12);
        let (m, lo, hi) = paired_ratio(&[1.0, 3.0, 2.0, 5.0], &[1.0, 1.0, 1.0, 1.0]);
        assert_eq!((m, lo, hi), (3.0, 1.0, 5.0));
    }
}
