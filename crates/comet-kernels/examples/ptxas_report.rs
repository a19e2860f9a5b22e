//! Prints ptxas' resource report (registers, spills, shared memory) of the
//! grouped GEMM variants whose kernel name contains the first argument.

use comet_kernels::nvrtc::compile_cubin_with_log;
use comet_kernels::variants::all_gemm_variants;

fn main() {
    let filter = std::env::args().nth(1).unwrap_or_default();
    for (v, t) in all_gemm_variants() {
        let name = v.kernel_name();
        if !name.contains(&filter) {
            continue;
        }
        let mut unit = v.compile_unit();
        unit.extra_options.push("--ptxas-options=-v".into());
        match compile_cubin_with_log(&unit, t) {
            Ok((cubin, log)) => println!("{name} @ {t}: {} bytes\n{log}", cubin.len()),
            Err(e) => println!("{name} @ {t}: FAILED\n{e}"),
        }
    }
}
