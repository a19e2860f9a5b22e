//! `comet plan`: the layout plan, tile schedules and cost-model choice for
//! a preset, without running anything.

use crate::limits::{available_memory, ensure_fits};
use crate::shape::ShapeArgs;
use crate::split_args::SplitArgs;
use anyhow::{bail, Result};
use clap::Args;
use comet_core::cost::{CostEstimate, CostModel, DeviceFigures, WireFormat};
use comet_core::schedule::{Layer0Schedule, Layer1Schedule, SignalMap};
use comet_core::{LayoutPlan, MoeConfig, Preset, Routing, RoutingKind};
use comet_kernels::Family;
use comet_sched::device_plan::DevicePlan;
use comet_sched::forward::kernel_tiles_for;
use comet_sched::proxy_plan::{Geometry, PROXY_KERNEL_SMS};

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// Model preset: mixtral-8x7b, qwen2-moe, phi3.5-moe, small.
    #[arg(long, default_value = "mixtral-8x7b")]
    pub preset: String,
    #[command(flatten)]
    pub shape: ShapeArgs,
    /// Expert-parallel ranks.
    #[arg(long, default_value_t = 2)]
    pub ranks: usize,
    /// Tokens per rank.
    #[arg(long, default_value_t = 8192)]
    pub tokens: usize,
    /// Routing: uniform, zipf, all-to-one, some-empty, silent-rank.
    #[arg(long, default_value = "uniform")]
    pub routing: String,
    /// Device figures for the cost model: h200-nvlink, h200-socket, or
    /// h200-same-gpu (ranks sharing one GPU, as `comet bench --gpu` runs them).
    #[arg(long, default_value = "h200-nvlink")]
    pub device: String,
    /// How a host proxy sends rows (`--device h200-socket`): `tokens`
    /// (each token once per rank, both ways; the proxy's default) or
    /// `rows` (a row per (token, expert); expert groups need it behind a
    /// proxy). Kernels storing into peers always store rows.
    #[arg(long)]
    pub wire: Option<String>,
    /// Ranks sharing one GPU (each gets its share of the SMs) for the
    /// device forward's plan; `comet bench --gpu` puts rank r on visible
    /// GPU r mod their count (all W on one GPU where there is one).
    #[arg(long, default_value_t = 1)]
    pub ranks_per_gpu: usize,
    #[command(flatten)]
    pub split: SplitArgs,
    /// Rank whose receive layout and schedules are printed.
    #[arg(long, default_value_t = 0)]
    pub rank: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

pub fn device_figures(name: &str) -> Result<DeviceFigures> {
    match name {
        "h200-nvlink" => Ok(DeviceFigures::h200_nvlink()),
        "h200-socket" => Ok(DeviceFigures::h200_slow_link()),
        "h200-same-gpu" => Ok(DeviceFigures::h200_same_gpu()),
        other => anyhow::bail!(
            "unknown --device '{other}' (known: h200-nvlink, h200-socket, h200-same-gpu)"
        ),
    }
}

/// `--device`'s figures with `--wire`'s format, which only a proxy's link
/// (`h200-socket`) takes.
fn plan_figures(a: &PlanArgs) -> Result<DeviceFigures> {
    let mut dev = device_figures(&a.device)?;
    if let Some(w) = &a.wire {
        anyhow::ensure!(
            dev.proxy,
            "--wire is how a host proxy sends rows: give it with --device h200-socket"
        );
        dev.wire = match w.as_str() {
            "rows" => WireFormat::Rows,
            "tokens" => WireFormat::Tokens,
            other => bail!("unknown --wire '{other}' (known: rows, tokens)"),
        };
    }
    Ok(dev)
}

/// Bytes `comet plan` holds: every rank's routing (ids and weights), the
/// router logits of one rank while it is generated, and the tiles of the
/// printed rank's schedules (at most one per row and chunk).
fn plan_bytes(cfg: &MoeConfig, tokens: usize) -> u128 {
    let (w, e, k) = (cfg.ranks as u128, cfg.experts as u128, cfg.top_k as u128);
    let t = tokens as u128;
    w * t * k * 8 + t * e * 4 * 2 + w * t * k * 64
}

pub fn run(a: PlanArgs) -> Result<()> {
    if a.tokens == 0 {
        bail!("--tokens must be at least 1");
    }
    a.split.check()?;
    anyhow::ensure!(a.ranks_per_gpu > 0, "--ranks-per-gpu must be at least 1");
    let shape = a
        .shape
        .resolve(a.preset.parse::<Preset>()?, a.ranks, "--ranks", 1)?;
    let cfg = shape.cfg;
    let kind: RoutingKind = a.routing.parse()?;
    ensure_fits(
        plan_bytes(&cfg, a.tokens),
        available_memory(),
        &format!(
            "planning {} tokens per rank over {} ranks ({cfg})",
            a.tokens, cfg.ranks
        ),
        "lower --tokens",
    )?;
    anyhow::ensure!(
        a.rank < cfg.ranks,
        "--rank {} is not below --ranks {}",
        a.rank,
        cfg.ranks
    );
    let dev = plan_figures(&a)?;
    let est = CostModel::estimate(&cfg, a.tokens, &dev);
    let routings: Vec<Routing> = (0..cfg.ranks)
        .map(|r| Routing::generate(&cfg, r, a.tokens, kind, a.seed))
        .collect();
    let plan = LayoutPlan::from_routings(&cfg, &routings)?;
    println!(
        "config   {} ({}), {} tokens/rank, {} routing",
        cfg, shape.label, a.tokens, a.routing
    );
    print_layout(&a, &cfg, &plan);
    print_schedules(&a, &cfg, &plan, &est);
    print_cost(&dev, &est);
    print_device_plan(&a, &cfg, &dev)
}

/// Rows each rank receives, and rank `a.rank`'s receive segments.
fn print_layout(a: &PlanArgs, cfg: &MoeConfig, plan: &LayoutPlan) {
    println!(
        "rows received per rank: {:?}",
        plan.recv.iter().map(|l| l.total_rows).collect::<Vec<_>>()
    );
    let layout = &plan.recv[a.rank];
    println!(
        "\nrank {} receive layout (expert-major, own rows first, then ring order):",
        a.rank
    );
    println!(
        "  {:>6} {:>6} {:>10} {:>8}",
        "expert", "src", "first row", "rows"
    );
    for s in &layout.segments {
        println!(
            "  {:>6} {:>6} {:>10} {:>8}",
            cfg.global_expert(a.rank, s.expert),
            s.src,
            s.row,
            s.rows
        );
    }
}

/// Rank `a.rank`'s layer0 tiles (when each is ready, what it waits on)
/// and layer1 chunks, at the cost model's tile shape.
fn print_schedules(a: &PlanArgs, cfg: &MoeConfig, plan: &LayoutPlan, est: &CostEstimate) {
    let sig = SignalMap::new(cfg, est.shape.pieces(cfg));
    let l0 = Layer0Schedule::new(plan, a.rank, est.shape, &sig);
    let l1 = Layer1Schedule::new(plan, a.rank, est.shape, &sig);
    let steps = l0.tiles.iter().map(|t| t.ready_step).max().unwrap_or(0);
    println!(
        "\nlayer0: {} tiles of <= {} rows, ready over {} arrival steps; first tiles:",
        l0.tiles.len(),
        est.shape.bm,
        steps + 1
    );
    for t in l0.tiles.iter().take(6) {
        println!(
            "  expert {:>3} rows {:>7}..{:<7} step {} waits on {:?}",
            t.expert,
            t.row,
            t.row + t.rows,
            t.ready_step,
            t.deps
        );
    }
    println!(
        "layer1: {} chunks of {} columns in {} expert group(s), {} pieces; piece 0 has {} tiles and sends {} blocks",
        est.shape.chunks(cfg),
        est.shape.chunk_cols,
        est.shape.groups,
        l1.chunks.len(),
        l1.chunks.first().map_or(0, |c| c.tiles),
        l1.chunks.first().map_or(0, |c| c.sends.len())
    );
}

/// The cost model's times and choice on `dev`.
fn print_cost(dev: &DeviceFigures, est: &CostEstimate) {
    println!("\ncost model ({}):", dev.name);
    println!("  expert GEMMs      {:8.3} ms", est.gemm_ms);
    println!("  dispatch/combine  {:8.3} ms each", est.dispatch_ms);
    println!("  baseline          {:8.3} ms", est.baseline_ms);
    println!(
        "  overlapped        {:8.3} ms  ({:.2}x)",
        est.overlapped_ms,
        est.speedup()
    );
    println!(
        "    layer0          {:8.3} ms  (to the last FC1: the dispatch beside FC1)",
        est.layer0_ms
    );
    println!(
        "    layer1          {:8.3} ms  (the rest: FC2 beside the combine)",
        est.layer1_ms
    );
    println!("  choice            {} communication blocks of {} SMs, {} layer1 chunks of {} columns, {} expert group(s), BM {} (the schedules above; the device forward's own below)", est.comm_blocks, dev.sms, est.chunks, est.shape.chunk_cols, est.groups, est.shape.bm);
}

/// What MoeLayer::forward will run on an H200 (sm_90a kernels, of the
/// family COMET_GEMM_FAMILY names, as there) with `--tokens` as its
/// capacity: the same DevicePlan it builds, and what a staged rank holds.
fn print_device_plan(a: &PlanArgs, cfg: &MoeConfig, dev: &DeviceFigures) -> Result<()> {
    anyhow::ensure!(
        a.split.reserved_sms < dev.sms,
        "--reserved-sms {} leaves none of the {} SMs to the layer",
        a.split.reserved_sms,
        dev.sms
    );
    let mut device = DevicePlan::new(
        cfg,
        a.tokens,
        a.split.recv_rows,
        dev.sms - a.split.reserved_sms,
        a.ranks_per_gpu,
        kernel_tiles_for(Family::chosen(true)),
        dev,
    )?;
    if let Some(n) = a.split.comm_sms {
        device.set_comm_blocks(n);
    }
    if let Some(n) = a.split.groups {
        device.set_groups(n)?;
    }
    if let Some(n) = a.split.chunks {
        device.set_chunks(n)?;
    }
    println!("\n{}", device.describe());
    if cfg.ranks > 1 {
        let mib = |b: usize| b as f64 / (1 << 20) as f64;
        let s = Geometry::of(&device).staged_bytes();
        println!(
            "staged over a host-memory transport (--transport ucx|local): per rank {:.1} MiB of \
             device mirrors and token copy, {:.1} MiB of pinned host staging, {:.1} MiB of inbox; \
             its proxy's kernels take {} SMs a rank (plan with --reserved-sms {} for its split)",
            mib(s.device_mirrors + s.device_tokens),
            mib(s.host_staging),
            mib(s.inbox),
            PROXY_KERNEL_SMS,
            PROXY_KERNEL_SMS * a.ranks_per_gpu
        );
    }
    Ok(())
}
