//! Grouped GEMM benchmark without the CLI: `bench_gemm [family name, see Family::NAMES] [iters]`.

use comet_core::Preset;
use comet_kernels::bench::{format_table, preset_cases, run_gemm_bench};
use comet_kernels::Family;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let family = args.get(1).and_then(|n| Family::from_name(n));
    let iters = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(10);
    let ctx = cudarc::driver::CudaContext::new(0).expect("a CUDA GPU");
    let cases = preset_cases(
        8192,
        &[Preset::Mixtral8x7b, Preset::Qwen2Moe, Preset::Phi35Moe],
    )
    .expect("cases");
    match run_gemm_bench(ctx, &cases, family, iters, None) {
        Ok(r) => print!("{}", format_table(&r, "baseline")),
        Err(e) => {
            eprintln!("bench_gemm: {e}");
            std::process::exit(1);
        }
    }
}
