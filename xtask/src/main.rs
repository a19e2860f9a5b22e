//! `cargo xtask`: project automation (kernel compile gate, GPU bundle).

mod bundle;
mod ci;
mod kernels;
mod python;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("ci") => ci::ci(),
        Some("bench") => ci::bench(),
        Some("compile-kernels") => {
            let cubins = args
                .iter()
                .position(|a| a == "--cubins")
                .map(|i| args.get(i + 1).map(std::path::PathBuf::from))
                .map(|d| d.ok_or_else(|| anyhow::anyhow!("--cubins needs a folder")))
                .transpose()?;
            kernels::compile_gate(args.iter().any(|a| a == "--verbose"), cubins.as_deref())
        }
        Some("bundle") => bundle::bundle().map(|_| ()),
        Some("wheel") => python::wheel(),
        _ => {
            anyhow::bail!(
                "usage: cargo xtask <ci | bench | compile-kernels [--verbose] [--cubins DIR] | bundle | wheel>"
            )
        }
    }
}
