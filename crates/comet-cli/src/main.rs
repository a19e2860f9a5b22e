//! The `comet` command: benchmarks, plans and traces of the COMET MoE layer.

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

mod gemm;
mod launch;
mod layer;
mod layer_gpu;
mod limits;
mod plan;
mod shape;
mod split_args;
mod torch_baseline;
mod transport_bench;

#[derive(Parser)]
#[command(
    name = "comet",
    version,
    about = "Fine-grained overlapped MoE layers (COMET) — bench, plan, trace"
)]
struct Cli {
    /// Log filter (tracing's EnvFilter syntax), e.g. `info` or `comet_sched=debug`.
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run and time the MoE layer (default), or a component benchmark.
    Bench(Box<BenchCmd>),
    /// Print the layout plan and the cost model's choices for a preset.
    Plan(plan::PlanArgs),
    /// Start W local ranks of a command with torchrun's environment.
    Launch(launch::LaunchArgs),
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct BenchCmd {
    #[command(subcommand)]
    what: Option<BenchWhat>,
    #[command(flatten)]
    layer: layer::LayerArgs,
}

#[derive(Subcommand)]
enum BenchWhat {
    /// The whole MoE layer: fused (overlapped) vs baseline vs reference.
    Layer(layer::LayerArgs),
    /// Transports' bandwidth and latency per message size, with a baseline.
    Transport(transport_bench::TransportBenchArgs),
    /// Grouped expert GEMM: comet-kernels vs cuBLAS vs torch._grouped_mm.
    Gemm(gemm::GemmBenchArgs),
}

/// A closed pipe (`comet plan | head`) ends the process quietly, as for
/// other Unix tools, instead of making the next `println!` panic.
fn default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of one signal at start-up,
    // before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() {
    default_sigpipe();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour_on_stderr())
        .init();
    if let Err(e) = run(cli.cmd) {
        eprintln!("comet: error: {e:#}");
        std::process::exit(launch::exit_code(&e).unwrap_or(1));
    }
}

/// Colour only for a terminal, and never when NO_COLOR is set to
/// anything non-empty (no-color.org).
fn colour_on_stderr() -> bool {
    use std::io::IsTerminal;
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    !no_color && std::io::stderr().is_terminal()
}

fn run(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Bench(b) => match b.what {
            None => layer::run(b.layer),
            Some(BenchWhat::Layer(a)) => layer::run(a),
            Some(BenchWhat::Transport(a)) => transport_bench::run(a),
            Some(BenchWhat::Gemm(a)) => gemm::run(a),
        },
        Cmd::Launch(a) => launch::run(a),
        Cmd::Plan(a) => plan::run(a),
    }
}
