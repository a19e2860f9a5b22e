//! Build script: with feature `ucx`, compiles the small C layer over UCP
//! (src/ucx/shim.c) against the installed UCX headers and links libucp.
//! Without it, does nothing. `UCX_HOME` points at a UCX install prefix
//! other than the system's (for example a source build in /opt/ucx).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=UCX_HOME");
    if std::env::var_os("CARGO_FEATURE_UCX").is_some() {
        #[cfg(feature = "ucx")]
        ucx();
    }
}

#[cfg(feature = "ucx")]
fn ucx() {
    use std::path::PathBuf;
    println!("cargo:rerun-if-changed=src/ucx/shim.c");
    let home = std::env::var_os("UCX_HOME").map(PathBuf::from);
    let include = home.as_ref().map(|h| h.join("include"));
    let header_dirs: Vec<PathBuf> = include
        .iter()
        .cloned()
        .chain([
            PathBuf::from("/usr/include"),
            PathBuf::from("/usr/local/include"),
        ])
        .collect();
    if !header_dirs.iter().any(|d| d.join("ucp/api/ucp.h").exists()) {
        panic!(
            "feature `ucx`: UCX headers (ucp/api/ucp.h) not found in {header_dirs:?}. \
             Install them with scripts/install-ucx-deps.sh (Debian: apt-get install libucx-dev) \
             or set UCX_HOME to a UCX install prefix."
        );
    }
    let mut b = cc::Build::new();
    b.file("src/ucx/shim.c").warnings(true).extra_warnings(true);
    if let Some(i) = &include {
        b.include(i);
    }
    b.compile("comet_ucx_shim");
    if let Some(h) = &home {
        for lib in ["lib", "lib64"] {
            let d = h.join(lib);
            if d.exists() {
                println!("cargo:rustc-link-search=native={}", d.display());
                println!("cargo:rustc-link-arg=-Wl,-rpath,{}", d.display());
            }
        }
    }
    println!("cargo:rustc-link-lib=dylib=ucp");
    println!("cargo:rustc-link-lib=dylib=ucs");
}
