//! The NVRTC build pipeline: find and load libnvrtc (system CUDA or the pip
//! wheels that `scripts/install-nvrtc.sh` installs), compile a source unit
//! with its in-memory headers to a cubin for one target, and cache cubins on
//! disk keyed by source hash, options, target, NVRTC and driver version.
//!
//! The sources need no CUDA headers (bf16 is handled as raw bits), so a
//! machine with libnvrtc alone can compile every variant (the CI gate).

use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::nvrtc::sys;

use crate::error::KernelError;

/// A compilation target: the `--gpu-architecture` NVRTC gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    pub major: u32,
    pub minor: u32,
    /// Architecture-specific features (`sm_90a`: wgmma, setmaxnreg).
    pub arch_specific: bool,
}

impl Target {
    pub const SM80: Target = Target {
        major: 8,
        minor: 0,
        arch_specific: false,
    };
    pub const SM90A: Target = Target {
        major: 9,
        minor: 0,
        arch_specific: true,
    };

    /// The target for a GPU of compute capability `major.minor`: `sm_90a` on
    /// Hopper (9.0), the GPU's own `sm_XY` elsewhere; below 8.0 is refused
    /// (mma.sync bf16 and cp.async need 8.0).
    pub fn for_compute_capability(major: u32, minor: u32) -> Result<Target, KernelError> {
        if major < 8 {
            return Err(KernelError::Unsupported(format!(
                "compute capability {major}.{minor}: comet-kernels needs 8.0 or later"
            )));
        }
        Ok(Target {
            major,
            minor,
            arch_specific: major == 9 && minor == 0,
        })
    }

    pub fn arch_flag(&self) -> String {
        format!(
            "sm_{}{}{}",
            self.major,
            self.minor,
            if self.arch_specific { "a" } else { "" }
        )
    }

    /// Whether the Hopper kernel (wgmma, TMA, setmaxnreg) can run.
    pub fn has_wgmma(&self) -> bool {
        self.major == 9 && self.minor == 0 && self.arch_specific
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.arch_flag())
    }
}

/// One NVRTC program: a main source, the headers it includes by name, and
/// the kernels (explicit `extern "C"` names) it defines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileUnit {
    /// Program name (appears in NVRTC's log) and cache file prefix.
    pub name: String,
    pub source: String,
    pub headers: BTreeMap<String, String>,
    /// Extra options (e.g. `-DFOO=1`), after the ones the pipeline sets.
    pub extra_options: Vec<String>,
}

/// The NVRTC options for a unit and target, in the order NVRTC gets them.
pub fn build_options(target: Target, extra: &[String]) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture={}", target.arch_flag()),
        "--std=c++17".to_string(),
        "--device-as-default-execution-space".to_string(),
        "-DNDEBUG".to_string(),
        "--extra-device-vectorization".to_string(),
    ];
    o.extend(extra.iter().cloned());
    o
}

/// FNV-1a over two independent 64-bit lanes, as 32 hex digits. A cache key,
/// not a security boundary: a collision only costs a wrong cache hit between
/// two of our own sources, and the key also carries lengths.
pub fn hash128(parts: &[&[u8]]) -> String {
    let mut a: u64 = 0xcbf2_9ce4_8422_2325;
    let mut b: u64 = 0x6c62_272e_07bb_0142;
    for part in parts {
        for &byte in (part.len() as u64).to_le_bytes().iter().chain(part.iter()) {
            a = (a ^ byte as u64).wrapping_mul(0x0000_0100_0000_01b3);
            b = (b ^ byte as u64)
                .wrapping_mul(0x0000_0100_0000_01b3)
                .rotate_left(5);
        }
    }
    format!("{a:016x}{b:016x}")
}

/// The cache key of a unit compiled for `target` by NVRTC `nvrtc_version`
/// for a driver `driver_version` (0 when there is none, as in CI).
pub fn cache_key(
    unit: &CompileUnit,
    target: Target,
    nvrtc_version: (i32, i32),
    driver_version: i32,
) -> String {
    let opts = build_options(target, &unit.extra_options).join("\u{1}");
    let mut parts: Vec<&[u8]> = vec![unit.source.as_bytes()];
    for (k, v) in &unit.headers {
        parts.push(k.as_bytes());
        parts.push(v.as_bytes());
    }
    let meta = format!(
        "{opts}|{target}|nvrtc{}.{}|driver{driver_version}",
        nvrtc_version.0, nvrtc_version.1
    );
    parts.push(meta.as_bytes());
    hash128(&parts)
}

/// `$COMET_CACHE_DIR`, else `$XDG_CACHE_HOME/comet-rs`, else `~/.cache/comet-rs`.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("COMET_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("comet-rs"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("comet-rs"))
}

/// Directories that may hold libnvrtc, most specific first.
fn nvrtc_lib_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("COMET_NVRTC_LIB_DIR") {
        dirs.push(PathBuf::from(d));
    }
    // The project folder the install script fills, found from the current
    // directory upwards (cargo runs tests and xtask inside the workspace).
    if let Ok(mut cwd) = std::env::current_dir() {
        loop {
            let cand = cwd.join(".tools/nvrtc/nvidia/cu13/lib");
            if cand.is_dir() {
                dirs.push(cand);
                break;
            }
            if !cwd.pop() {
                break;
            }
        }
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(d) = std::env::var_os(var) {
            dirs.push(PathBuf::from(d).join("lib64"));
        }
    }
    dirs.push(PathBuf::from("/usr/local/cuda/lib64"));
    dirs
}

/// Loads libnvrtc once for the process. Libraries in the directories above
/// are opened by full path with RTLD_GLOBAL first (builtins, then nvrtc), so
/// that cudarc's later `dlopen("libnvrtc.so.13")` and NVRTC's own dlopen of
/// its builtins resolve to them by soname, whatever LD_LIBRARY_PATH was at
/// process start.
pub fn ensure_nvrtc() -> Result<(), KernelError> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let mut tried = Vec::new();
            for dir in nvrtc_lib_dirs() {
                let Ok(entries) = std::fs::read_dir(&dir) else { continue };
                let mut names: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
                names.sort();
                let builtins = names.iter().find(|p| file_starts(p, "libnvrtc-builtins.so."));
                let main = names.iter().find(|p| file_starts(p, "libnvrtc.so.") && !file_starts(p, "libnvrtc.so.1."));
                let main = main.or_else(|| names.iter().find(|p| file_starts(p, "libnvrtc.so")));
                if let (Some(b), Some(m)) = (builtins, main) {
                    tried.push(m.display().to_string());
                    if open_global(b).is_ok() && open_global(m).is_ok() {
                        tracing::debug!(lib = %m.display(), "preloaded libnvrtc");
                        break;
                    }
                }
            }
            // SAFETY: is_culib_present only dlopen()s candidate names and drops them.
            if unsafe { sys::is_culib_present() } {
                Ok(())
            } else {
                Err(format!(
                    "no libnvrtc in the dynamic loader's path nor in {:?}; run scripts/install-nvrtc.sh \
                     or set COMET_NVRTC_LIB_DIR",
                    nvrtc_lib_dirs()
                ))
            }
        })
        .clone()
        .map_err(KernelError::NvrtcNotFound)
}

fn file_starts(p: &Path, prefix: &str) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(prefix))
}

fn open_global(path: &Path) -> Result<(), libloading::Error> {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    // SAFETY: libnvrtc and its builtins have no initialisers with
    // preconditions; the handle is leaked on purpose so the library stays
    // loaded for the process (cudarc holds its own handle to it).
    let lib = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) }?;
    std::mem::forget(lib);
    Ok(())
}

/// NVRTC's version, once loaded.
pub fn nvrtc_version() -> Result<(i32, i32), KernelError> {
    ensure_nvrtc()?;
    let (mut major, mut minor) = (0 as c_int, 0 as c_int);
    // SAFETY: two valid out-pointers.
    let r = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
    check(r, "nvrtcVersion")?;
    Ok((major, minor))
}

fn status_string(r: sys::nvrtcResult) -> String {
    // SAFETY: nvrtcGetErrorString returns a static C string for any code.
    let p = unsafe { sys::nvrtcGetErrorString(r) };
    if p.is_null() {
        format!("{r:?}")
    } else {
        // SAFETY: non-null static C string from NVRTC.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

fn check(r: sys::nvrtcResult, call: &'static str) -> Result<(), KernelError> {
    if r == sys::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(KernelError::Nvrtc {
            call,
            status: status_string(r),
        })
    }
}

fn cstring(s: &str, what: &str) -> Result<CString, KernelError> {
    CString::new(s).map_err(|_| KernelError::InvalidShape(format!("{what} contains a NUL byte")))
}

/// Compiles `unit` for `target` to a cubin, without the cache.
pub fn compile_cubin(unit: &CompileUnit, target: Target) -> Result<Vec<u8>, KernelError> {
    compile_cubin_with_log(unit, target).map(|(cubin, _)| cubin)
}

/// As [`compile_cubin`], also returning NVRTC's log (warnings, and ptxas'
/// resource report when the unit asks for `--ptxas-options=-v`).
pub fn compile_cubin_with_log(
    unit: &CompileUnit,
    target: Target,
) -> Result<(Vec<u8>, String), KernelError> {
    ensure_nvrtc()?;
    let src = cstring(&unit.source, "source")?;
    let name = cstring(&unit.name, "unit name")?;
    let hnames: Vec<CString> = unit
        .headers
        .keys()
        .map(|k| cstring(k, "header name"))
        .collect::<Result<_, _>>()?;
    let hsrcs: Vec<CString> = unit
        .headers
        .values()
        .map(|v| cstring(v, "header"))
        .collect::<Result<_, _>>()?;
    let hname_ptrs: Vec<*const c_char> = hnames.iter().map(|c| c.as_ptr()).collect();
    let hsrc_ptrs: Vec<*const c_char> = hsrcs.iter().map(|c| c.as_ptr()).collect();
    let opts: Vec<CString> = build_options(target, &unit.extra_options)
        .iter()
        .map(|o| cstring(o, "option"))
        .collect::<Result<_, _>>()?;
    let opt_ptrs: Vec<*const c_char> = opts.iter().map(|c| c.as_ptr()).collect();

    let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: every pointer refers to a live NUL-terminated string; the arrays
    // have the lengths passed.
    let r = unsafe {
        sys::nvrtcCreateProgram(
            &mut prog,
            src.as_ptr(),
            name.as_ptr(),
            hsrc_ptrs.len() as c_int,
            hsrc_ptrs.as_ptr(),
            hname_ptrs.as_ptr(),
        )
    };
    check(r, "nvrtcCreateProgram")?;
    let result = (|| {
        // SAFETY: prog is a valid program; options are live C strings.
        let r =
            unsafe { sys::nvrtcCompileProgram(prog, opt_ptrs.len() as c_int, opt_ptrs.as_ptr()) };
        if r != sys::nvrtcResult::NVRTC_SUCCESS {
            return Err(KernelError::Compile {
                kernel: unit.name.clone(),
                arch: target.arch_flag(),
                status: status_string(r),
                log: program_log(prog).unwrap_or_else(|e| format!("(no log: {e})")),
            });
        }
        let log = program_log(prog).unwrap_or_default();
        if !log.trim().is_empty() {
            tracing::debug!(unit = %unit.name, %target, "NVRTC log:\n{log}");
        }
        let mut size = 0usize;
        // SAFETY: valid program, valid out-pointer.
        check(
            unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) },
            "nvrtcGetCUBINSize",
        )?;
        let mut cubin = vec![0u8; size];
        // SAFETY: the buffer holds `size` bytes as NVRTC asked.
        check(
            unsafe { sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut c_char) },
            "nvrtcGetCUBIN",
        )?;
        Ok((cubin, log))
    })();
    // SAFETY: prog came from nvrtcCreateProgram and is destroyed once.
    unsafe { sys::nvrtcDestroyProgram(&mut prog) };
    result
}

fn program_log(prog: sys::nvrtcProgram) -> Result<String, KernelError> {
    let mut size = 0usize;
    // SAFETY: valid program and out-pointer.
    check(
        unsafe { sys::nvrtcGetProgramLogSize(prog, &mut size) },
        "nvrtcGetProgramLogSize",
    )?;
    let mut buf = vec![0u8; size.max(1)];
    // SAFETY: buffer of the size NVRTC reported.
    check(
        unsafe { sys::nvrtcGetProgramLog(prog, buf.as_mut_ptr() as *mut c_char) },
        "nvrtcGetProgramLog",
    )?;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
}

/// Compiles with an on-disk cache. The driver version enters the key so
/// that a driver upgrade recompiles.
#[derive(Debug, Clone)]
pub struct Compiler {
    cache_dir: Option<PathBuf>,
    driver_version: i32,
}

impl Compiler {
    /// `cache_dir` None disables the cache.
    pub fn new(cache_dir: Option<PathBuf>, driver_version: i32) -> Compiler {
        Compiler {
            cache_dir,
            driver_version,
        }
    }

    pub fn with_default_cache(driver_version: i32) -> Compiler {
        Compiler::new(default_cache_dir(), driver_version)
    }

    pub fn cache_path(
        &self,
        unit: &CompileUnit,
        target: Target,
    ) -> Result<Option<PathBuf>, KernelError> {
        let Some(dir) = &self.cache_dir else {
            return Ok(None);
        };
        let key = cache_key(unit, target, nvrtc_version()?, self.driver_version);
        Ok(Some(dir.join(format!(
            "{}-{}-{}.cubin",
            unit.name,
            target.arch_flag(),
            key
        ))))
    }

    /// A cubin for `unit` on `target`, from the cache when present.
    pub fn compile(&self, unit: &CompileUnit, target: Target) -> Result<Vec<u8>, KernelError> {
        let path = self.cache_path(unit, target)?;
        if let Some(p) = &path {
            if let Ok(bytes) = std::fs::read(p) {
                if !bytes.is_empty() {
                    tracing::debug!(path = %p.display(), "kernel cache hit");
                    return Ok(bytes);
                }
            }
        }
        let t0 = std::time::Instant::now();
        let cubin = compile_cubin(unit, target)?;
        tracing::info!(unit = %unit.name, %target, ms = t0.elapsed().as_millis() as u64, "compiled with NVRTC");
        if let Some(p) = &path {
            // A cache that cannot be written only costs a recompile.
            if let Err(e) = write_atomic(p, &cubin) {
                tracing::warn!(path = %p.display(), error = %e, "could not write the kernel cache");
            }
        }
        Ok(cubin)
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(src: &str) -> CompileUnit {
        CompileUnit {
            name: "t".into(),
            source: src.into(),
            headers: BTreeMap::from([("h.cuh".to_string(), "// h".to_string())]),
            extra_options: vec![],
        }
    }

    #[test]
    fn targets_from_compute_capability() {
        assert_eq!(
            Target::for_compute_capability(9, 0).unwrap().arch_flag(),
            "sm_90a"
        );
        assert_eq!(
            Target::for_compute_capability(8, 6).unwrap().arch_flag(),
            "sm_86"
        );
        assert_eq!(
            Target::for_compute_capability(10, 0).unwrap().arch_flag(),
            "sm_100"
        );
        assert!(Target::for_compute_capability(7, 5).is_err());
        assert!(Target::SM90A.has_wgmma() && !Target::SM80.has_wgmma());
    }

    #[test]
    fn options_carry_target_and_extras() {
        let o = build_options(Target::SM90A, &["-DX=1".to_string()]);
        assert_eq!(o[0], "--gpu-architecture=sm_90a");
        assert_eq!(o.last().unwrap(), "-DX=1");
    }

    #[test]
    fn cache_key_changes_with_every_input() {
        let base = unit("a");
        let k = cache_key(&base, Target::SM80, (13, 0), 13000);
        assert_eq!(k, cache_key(&base.clone(), Target::SM80, (13, 0), 13000));
        assert_eq!(k.len(), 32);
        assert_ne!(k, cache_key(&unit("b"), Target::SM80, (13, 0), 13000));
        assert_ne!(k, cache_key(&base, Target::SM90A, (13, 0), 13000));
        assert_ne!(k, cache_key(&base, Target::SM80, (13, 1), 13000));
        assert_ne!(k, cache_key(&base, Target::SM80, (13, 0), 12080));
        let mut h = base.clone();
        h.headers.insert("h.cuh".into(), "// h2".into());
        assert_ne!(k, cache_key(&h, Target::SM80, (13, 0), 13000));
        let mut o = base.clone();
        o.extra_options.push("-DY".into());
        assert_ne!(k, cache_key(&o, Target::SM80, (13, 0), 13000));
        // Part boundaries matter: ("ab","c") != ("a","bc").
        assert_ne!(hash128(&[b"ab", b"c"]), hash128(&[b"a", b"bc"]));
    }

    #[test]
    fn cache_dir_honours_env() {
        // The only test that sets the variable. It points at a writable
        // temporary folder, so a test compiling at the same time still
        // works, and the previous value is put back.
        let before = std::env::var_os("COMET_CACHE_DIR");
        let dir = std::env::temp_dir().join(format!("comet-cache-env-test-{}", std::process::id()));
        std::env::set_var("COMET_CACHE_DIR", &dir);
        let got = default_cache_dir();
        match &before {
            Some(v) => std::env::set_var("COMET_CACHE_DIR", v),
            None => std::env::remove_var("COMET_CACHE_DIR"),
        }
        assert_eq!(got, Some(dir));
    }

    #[test]
    fn compile_error_returns_the_log() {
        if let Err(e) = ensure_nvrtc() {
            eprintln!("skipping: {e}");
            return;
        }
        let err = compile_cubin(
            &unit("__global__ void k() { this_is_not_defined(); }"),
            Target::SM80,
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("this_is_not_defined"), "{msg}");
    }

    #[test]
    fn compiles_and_caches() {
        if let Err(e) = ensure_nvrtc() {
            eprintln!("skipping: {e}");
            return;
        }
        let dir = std::env::temp_dir().join(format!("comet-cache-test-{}", std::process::id()));
        let c = Compiler::new(Some(dir.clone()), 0);
        let u = unit(
            "#include \"h.cuh\"\nextern \"C\" __global__ void k(int* p) { p[threadIdx.x] = 1; }",
        );
        let a = c.compile(&u, Target::SM80).unwrap();
        assert!(a.starts_with(b"\x7fELF"), "a cubin is an ELF image");
        let path = c.cache_path(&u, Target::SM80).unwrap().unwrap();
        assert!(path.exists());
        assert_eq!(c.compile(&u, Target::SM80).unwrap(), a);
        let _ = std::fs::remove_dir_all(dir);
    }
}
