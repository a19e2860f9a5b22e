//! Grouped GEMM benchmark: this crate's kernel against cuBLAS (a per-expert
//! loop of cublasGemmEx, and cublasGemmGroupedBatchedEx) on the same data,
//! timed with CUDA events in one process on one GPU. `comet bench gemm`
//! drives it and passes torch._grouped_mm in as an [`ExternalBaseline`]
//! (a helper process, scripts/bench_torch_gemm.py) timed in turns with ours.

use std::sync::Arc;

use cudarc::cublas::{sys as cbsys, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaContext, CudaStream, DevicePtr};
use half::bf16;

use crate::device::DeviceProblem;
use crate::error::KernelError;
use crate::gemm::GemmRuntime;
use crate::problem::GroupedProblem;
use crate::tiles::TileList;
use crate::variants::{Epilogue, Family, GemmVariant, Hooks};

/// One benchmark shape.
#[derive(Debug, Clone)]
pub struct BenchCase {
    pub label: String,
    pub counts: Vec<usize>,
    pub k: usize,
    pub n: usize,
    /// Also time the fused SwiGLU epilogue (FC1).
    pub swiglu: bool,
}

impl BenchCase {
    pub fn flops(&self) -> f64 {
        2.0 * self.counts.iter().sum::<usize>() as f64 * self.k as f64 * self.n as f64
    }
}

/// A GEMM timed by someone else on this GPU (torch._grouped_mm in a helper
/// process): the benchmark runs it in turns with its own kernels, each time
/// with this process's stream idle, so all see the same clocks.
pub trait ExternalBaseline {
    /// Sets `case` up on the baseline's side (same shapes, data of the same
    /// distribution); Ok(false) when the baseline cannot run it.
    fn prepare(&mut self, case: &BenchCase) -> Result<bool, KernelError>;
    /// Runs the prepared case once; its device milliseconds.
    fn run_once(&mut self) -> Result<f64, KernelError>;
}

/// Median milliseconds per variant; None where it could not run.
#[derive(Debug, Clone)]
pub struct BenchResult {
    pub case: BenchCase,
    pub ours_ms: f64,
    /// The same kernel with every tile whole, where `ours_ms` split its
    /// last wave ([`crate::TailSplit`]); None where nothing was split.
    pub ours_unsplit_ms: Option<f64>,
    pub ours_swiglu_ms: Option<f64>,
    pub cublas_loop_ms: f64,
    pub cublas_grouped_ms: Option<f64>,
    /// The [`ExternalBaseline`], timed in turns with ours.
    pub baseline_ms: Option<f64>,
    /// ||ours - cuBLAS|| / ||cuBLAS|| on the plain-store output.
    pub rel_diff_vs_cublas: f64,
    pub family: Family,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// One run of something timed, returning its device milliseconds once it
/// has finished.
type Timed<'a> = Box<dyn FnMut() -> Result<f64, KernelError> + 'a>;

/// `f` launched on `stream` between two events; waits for the end event.
fn evented<'a, F>(stream: &'a Arc<CudaStream>, mut f: F) -> Timed<'a>
where
    F: FnMut() -> Result<(), KernelError> + 'a,
{
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    Box::new(move || {
        let start = stream.record_event(flags)?;
        f()?;
        let end = stream.record_event(flags)?;
        end.synchronize()?;
        Ok(start.elapsed_ms(&end)? as f64)
    })
}

/// Median milliseconds of each of `fns`, timed in turns (one run of each per
/// round, `iters` rounds) so clock and temperature drift during the run
/// falls on all of them alike; each first runs for at least `warmup` runs
/// and 50 ms, so the first case does not meet an idle GPU's clocks.
fn time_interleaved(
    warmup: usize,
    iters: usize,
    fns: &mut [Timed<'_>],
) -> Result<Vec<f64>, KernelError> {
    for f in fns.iter_mut() {
        let t0 = std::time::Instant::now();
        let mut n = 0;
        while n < warmup || t0.elapsed() < std::time::Duration::from_millis(50) {
            f()?;
            n += 1;
        }
    }
    let mut times = vec![Vec::with_capacity(iters); fns.len()];
    for _ in 0..iters {
        for (f, t) in fns.iter_mut().zip(&mut times) {
            t.push(f()?);
        }
    }
    Ok(times.into_iter().map(median).collect())
}

fn time_ms<F: FnMut() -> Result<(), KernelError>>(
    stream: &Arc<CudaStream>,
    warmup: usize,
    iters: usize,
    f: F,
) -> Result<f64, KernelError> {
    Ok(time_interleaved(warmup, iters, &mut [evented(stream, f)])?[0])
}

fn blas_err(e: cudarc::cublas::result::CublasError) -> KernelError {
    KernelError::Unsupported(format!("cuBLAS: {e:?}"))
}

/// Runs every case: ours, the cuBLAS loop, ours unsplit (where the split
/// applies), ours with the SwiGLU epilogue (FC1) and the external baseline
/// (where given and able) timed in turns for `iters` rounds after
/// warm-ups; the grouped cuBLAS call after them, on its own.
pub fn run_gemm_bench(
    ctx: Arc<CudaContext>,
    cases: &[BenchCase],
    family: Option<Family>,
    iters: usize,
    mut baseline: Option<&mut dyn ExternalBaseline>,
) -> Result<Vec<BenchResult>, KernelError> {
    let stream = ctx.new_stream()?;
    let rt = GemmRuntime::new(ctx.clone())?;
    let family = family.unwrap_or_else(|| rt.default_family());
    let blas = CudaBlas::new(stream.clone()).map_err(blas_err)?;
    let mut out = Vec::new();
    for case in cases {
        let p = GroupedProblem::new(case.counts.clone(), case.k, case.n, Epilogue::Store, 1234);
        let v = GemmVariant::new(family, Epilogue::Store, Hooks::NONE);
        let tiles = TileList::grouped(&p.counts, p.out_cols(), &v)?;
        let mut dp = DeviceProblem::upload(stream.clone(), &p, &v, &tiles)?;
        rt.prepare(&v)?;
        // FC1 also with the fused SwiGLU epilogue over the same A and B.
        let vs = GemmVariant::new(family, Epilogue::SwiGlu, Hooks::NONE);
        let swiglu_tiles = if case.swiglu {
            rt.prepare(&vs)?;
            Some(dp.upload_tiles(&TileList::grouped(&p.counts, p.n / 2, &vs)?, &vs)?)
        } else {
            None
        };
        dp.enable_split(&rt, &[v, vs])?;
        let slots = rt.split_slots(&v)?;
        let splits =
            slots > 0 && crate::TailSplit::plan(tiles.tiles.len(), case.k / 64, slots).ctas > 0;

        // cuBLAS per-expert loop. Row-major C[m, n] = A[m, k] B[n, k]^T is
        // column-major C^T[n, m] = op(B)[n, k] * A^T[k, m] with op = T.
        let (k, n) = (case.k, case.n);
        let mut c = stream.alloc_zeros::<bf16>(p.rows().max(1) * n)?;
        let cublas_loop = || -> Result<(), KernelError> {
            let mut start = 0usize;
            for (e, &m) in case.counts.iter().enumerate() {
                if m > 0 {
                    let cfg = GemmConfig {
                        transa: cbsys::cublasOperation_t::CUBLAS_OP_T,
                        transb: cbsys::cublasOperation_t::CUBLAS_OP_N,
                        m: n as i32,
                        n: m as i32,
                        k: k as i32,
                        alpha: bf16::ONE,
                        lda: k as i32,
                        ldb: k as i32,
                        beta: bf16::ZERO,
                        ldc: n as i32,
                    };
                    let bv = dp.b.slice(e * n * k..(e + 1) * n * k);
                    let av = dp.a.slice(start * k..(start + m) * k);
                    let mut cv = c.slice_mut(start * n..(start + m) * n);
                    // SAFETY: the views cover exactly m x k, n x k and m x n
                    // elements as the config states.
                    unsafe { blas.gemm(cfg, &bv, &av, &mut cv) }.map_err(blas_err)?;
                }
                start += m;
            }
            Ok(())
        };
        // Ours (split where it gains), cuBLAS, ours unsplit, ours+SwiGLU
        // and the baseline, in turns.
        let mut fns: Vec<Timed<'_>> = vec![
            evented(&stream, || dp.launch(&rt, &v, None)),
            evented(&stream, cublas_loop),
        ];
        // Each optional entry's index in `fns`, where present.
        let (mut unsplit_at, mut swiglu_at, mut baseline_at) = (None, None, None);
        if splits {
            unsplit_at = Some(fns.len());
            fns.push(evented(&stream, || dp.launch_unsplit(&rt, &v, None)));
        }
        if let Some(st) = &swiglu_tiles {
            swiglu_at = Some(fns.len());
            fns.push(evented(&stream, || dp.launch_tiles(&rt, &vs, st, None)));
        }
        if let Some(b) = baseline.as_deref_mut() {
            if b.prepare(case)? {
                baseline_at = Some(fns.len());
                fns.push(Box::new(move || b.run_once()));
            }
        }
        let ms = time_interleaved(2, iters, &mut fns)?;
        drop(fns);
        let (ours_ms, cublas_loop_ms) = (ms[0], ms[1]);
        let ours_unsplit_ms = unsplit_at.map(|i| ms[i]);
        let ours_swiglu_ms = swiglu_at.map(|i| ms[i]);
        let baseline_ms = baseline_at.map(|i| ms[i]);
        // The output checked is the split launch's.
        dp.poison()?;
        dp.launch(&rt, &v, None)?;
        dp.finish()?;
        let ours_c: Vec<bf16> = dp.download_c()?;

        let ref_c: Vec<bf16> = stream.clone_dtoh(&c)?;
        let rel = rel_diff(&ours_c[..p.rows() * n], &ref_c[..p.rows() * n]);
        if rel.is_nan() || rel >= 2e-2 {
            return Err(KernelError::InvalidShape(format!(
                "{}: our output differs from cuBLAS by {rel:.3e}; refusing to report its speed",
                case.label
            )));
        }
        let cublas_grouped_ms = grouped_blas(&stream, &blas, &dp, &c, case, iters).ok();
        out.push(BenchResult {
            case: case.clone(),
            ours_ms,
            ours_unsplit_ms,
            ours_swiglu_ms,
            cublas_loop_ms,
            cublas_grouped_ms,
            baseline_ms,
            rel_diff_vs_cublas: rel,
            family,
        });
    }
    Ok(out)
}

fn rel_diff(a: &[bf16], b: &[bf16]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b).step_by(7) {
        let (x, y) = (x.to_f64(), y.to_f64());
        num += (x - y) * (x - y);
        den += y * y;
    }
    if num.is_nan() {
        return f64::INFINITY;
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// cublasGemmGroupedBatchedEx over the non-empty experts (one group each).
fn grouped_blas(
    stream: &Arc<CudaStream>,
    blas: &CudaBlas,
    dp: &DeviceProblem,
    c: &cudarc::driver::CudaSlice<bf16>,
    case: &BenchCase,
    iters: usize,
) -> Result<f64, KernelError> {
    let (k, n) = (case.k, case.n);
    let (a0, _ga) = dp.a.device_ptr(stream);
    let (b0, _gb) = dp.b.device_ptr(stream);
    let (c0, _gc) = c.device_ptr(stream);
    let (mut ap, mut bp, mut cp, mut ms) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut start = 0usize;
    for (e, &m) in case.counts.iter().enumerate() {
        if m > 0 {
            bp.push(b0 + (e * n * k * 2) as u64);
            ap.push(a0 + (start * k * 2) as u64);
            cp.push(c0 + (start * n * 2) as u64);
            ms.push(m as i32);
        }
        start += m;
    }
    let g = ms.len();
    let d_ap = stream.clone_htod(&ap)?;
    let d_bp = stream.clone_htod(&bp)?;
    let d_cp = stream.clone_htod(&cp)?;
    let (pa, _g1) = d_ap.device_ptr(stream);
    let (pb, _g2) = d_bp.device_ptr(stream);
    let (pc, _g3) = d_cp.device_ptr(stream);
    let ta = vec![cbsys::cublasOperation_t::CUBLAS_OP_T; g];
    let tb = vec![cbsys::cublasOperation_t::CUBLAS_OP_N; g];
    let nn = vec![n as i32; g];
    let kk = vec![k as i32; g];
    let alpha = vec![1f32; g];
    let beta = vec![0f32; g];
    let sizes = vec![1i32; g];
    time_ms(stream, 2, iters, || {
        // SAFETY: host arrays have g entries; device pointer arrays hold g
        // pointers into live buffers sized for each group's m, n, k.
        let st = unsafe {
            cbsys::cublasGemmGroupedBatchedEx(
                *blas.handle(),
                ta.as_ptr(),
                tb.as_ptr(),
                nn.as_ptr(),
                ms.as_ptr(),
                kk.as_ptr(),
                alpha.as_ptr() as *const _,
                pb as *const *const std::ffi::c_void,
                cbsys::cudaDataType_t::CUDA_R_16BF,
                kk.as_ptr(),
                pa as *const *const std::ffi::c_void,
                cbsys::cudaDataType_t::CUDA_R_16BF,
                kk.as_ptr(),
                beta.as_ptr() as *const _,
                pc as *const *mut std::ffi::c_void,
                cbsys::cudaDataType_t::CUDA_R_16BF,
                nn.as_ptr(),
                g as i32,
                sizes.as_ptr(),
                cbsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            )
        };
        if st != cbsys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(KernelError::Unsupported(format!(
                "cublasGemmGroupedBatchedEx: {st:?}"
            )));
        }
        Ok(())
    })
}

/// The shapes: Mixtral, Qwen2-like and Phi presets, FC1 (H -> 2F)
/// and FC2 (F -> H), `tokens x top-k` rows spread over the E/2 local experts
/// of EP = 2, uniform and skewed (1/(i+1)) routing. Counts are rounded to
/// multiples of 16 rows (torch._grouped_mm's alignment) keeping the total.
pub fn preset_cases(
    tokens: usize,
    presets: &[comet_core::Preset],
) -> Result<Vec<BenchCase>, KernelError> {
    let mut cases = Vec::new();
    for &preset in presets {
        let cfg = preset
            .config(2)
            .map_err(|e| KernelError::InvalidShape(e.to_string()))?;
        let local = cfg.experts / 2;
        let total = tokens * cfg.top_k;
        for skewed in [false, true] {
            let mut counts = crate::problem::routed_counts(local, total, skewed);
            let mut carry = 0usize;
            for c in counts.iter_mut() {
                let r = *c % 16;
                *c -= r;
                carry += r;
            }
            counts[0] += carry;
            let dist = if skewed { "skewed" } else { "uniform" };
            cases.push(BenchCase {
                label: format!("{} FC1 {dist}", preset.name()),
                counts: counts.clone(),
                k: cfg.hidden,
                n: 2 * cfg.ffn,
                swiglu: true,
            });
            cases.push(BenchCase {
                label: format!("{} FC2 {dist}", preset.name()),
                counts,
                k: cfg.ffn,
                n: cfg.hidden,
                swiglu: false,
            });
        }
    }
    Ok(cases)
}

/// A plain-text table of results (TFLOP/s and ratios); the external
/// baseline's columns are headed `baseline`.
pub fn format_table(results: &[BenchResult], baseline: &str) -> String {
    let mut s = format!(
        "| case | rows | K | N | ours TFLOP/s | ours unsplit | ours+SwiGLU | cuBLAS loop | cuBLAS grouped | {baseline} | ours/loop | ours/grouped | ours/{baseline} | unsplit/ours | rel diff |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for r in results {
        let f = r.case.flops();
        let tf = |ms: f64| f / (ms * 1e-3) / 1e12;
        let opt = |m: Option<f64>| {
            m.map(|x| format!("{:.0}", tf(x)))
                .unwrap_or_else(|| "n/a".into())
        };
        let ratio = |m: Option<f64>| {
            m.map(|x| format!("{:.2}", x / r.ours_ms))
                .unwrap_or_else(|| "n/a".into())
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {:.0} | {} | {} | {:.0} | {} | {} | {:.2} | {} | {} | {} | {:.1e} |\n",
            r.case.label,
            r.case.counts.iter().sum::<usize>(),
            r.case.k,
            r.case.n,
            tf(r.ours_ms),
            opt(r.ours_unsplit_ms),
            opt(r.ours_swiglu_ms),
            tf(r.cublas_loop_ms),
            opt(r.cublas_grouped_ms),
            opt(r.baseline_ms),
            r.cublas_loop_ms / r.ours_ms,
            ratio(r.cublas_grouped_ms),
            ratio(r.baseline_ms),
            ratio(r.ours_unsplit_ms),
            r.rel_diff_vs_cublas
        ));
    }
    s
}

/// Opens GPU 0 and runs [`run_gemm_bench`] there (for binaries that do not
/// depend on cudarc themselves).
pub fn run_on_first_gpu(
    cases: &[BenchCase],
    family: Option<Family>,
    iters: usize,
    baseline: Option<&mut dyn ExternalBaseline>,
) -> Result<(String, Vec<BenchResult>), KernelError> {
    let ctx = crate::gemm::open_gpu(0)?;
    // SAFETY: only dlopen()s candidate names; checked so a missing cuBLAS
    // is an error, not cudarc's panic.
    if !unsafe { cbsys::is_culib_present() } {
        return Err(KernelError::Unsupported(
            "no cuBLAS library found (LD_LIBRARY_PATH)".into(),
        ));
    }
    let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
    Ok((name, run_gemm_bench(ctx, cases, family, iters, baseline)?))
}
