//! `cargo run --release --features nvlink --example nvlink_bench [sizes...]`:
//! the GPU rows of `comet bench transport` as a markdown table (the same
//! function the CLI calls). Ranks on devices 0 and 1, or both on device 0
//! when there is one GPU.

use comet_transport::cuda;
use comet_transport::nvlink::bench;

fn main() {
    if !cuda::gpu_available() {
        eprintln!("no CUDA device: nothing to measure");
        std::process::exit(2);
    }
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        (0..=7).map(|i| 4096usize << (2 * i)).collect()
    } else {
        sizes
    };
    let ordinals = if cuda::device_count() >= 2 {
        [0, 1]
    } else {
        [0, 0]
    };
    match bench::run(ordinals, &sizes) {
        Ok(r) => print!("{}", bench::markdown(&r)),
        Err(e) => {
            eprintln!("nvlink bench failed: {e}");
            std::process::exit(1);
        }
    }
}
