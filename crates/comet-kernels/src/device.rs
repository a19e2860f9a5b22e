//! Safe device-side plumbing for tests, benchmarks and the scheduler: a
//! grouped GEMM problem resident on the GPU (poisoned output, tile list,
//! error word), launched through [`GemmRuntime`], plus host-driven signal
//! raises through stream memory operations (how a host proxy raises a
//! signal once a transfer has landed).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cudarc::driver::sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DeviceRepr, ValidAsZeroBits};
use half::bf16;

use crate::error::KernelError;
use crate::gemm::{check_error_word, Gather, GemmArgs, GemmRuntime, HookArgs, SplitArgs};
use crate::problem::GroupedProblem;
use crate::tiles::{TileDesc, TileList};
use crate::variants::GemmVariant;

// SAFETY: TileDesc is repr(C) plain integers, valid for any bit pattern.
unsafe impl DeviceRepr for TileDesc {}
// SAFETY: all-zero bytes are a valid TileDesc.
unsafe impl ValidAsZeroBits for TileDesc {}

/// A problem's buffers on the GPU.
pub struct DeviceProblem {
    pub stream: Arc<CudaStream>,
    pub a: CudaSlice<bf16>,
    pub b: CudaSlice<bf16>,
    pub c: CudaSlice<bf16>,
    pub tiles: DeviceTiles,
    pub deps: CudaSlice<u32>,
    pub scatter_idx: CudaSlice<i32>,
    pub scatter_w: CudaSlice<f32>,
    pub err: CudaSlice<u64>,
    pub total_rows: usize,
    pub k: usize,
    pub n: usize,
    pub ldc: usize,
    pub experts: usize,
    pub out_rows: usize,
    /// Split-tail workspace ([`DeviceProblem::enable_split`]).
    split: Option<SplitWorkspace>,
    /// [`DeviceProblem::enable_gather`].
    gather: Option<GatherSource>,
}

/// A gathered A on the GPU: `src_rows` rows of K, and the source row of
/// each tile row.
struct GatherSource {
    src: CudaSlice<bf16>,
    rows: CudaSlice<i32>,
    src_rows: usize,
}

/// A tile list in device memory.
pub struct DeviceTiles {
    buf: CudaSlice<TileDesc>,
    len: usize,
}

impl DeviceTiles {
    fn upload(stream: &Arc<CudaStream>, tiles: &TileList) -> Result<DeviceTiles, KernelError> {
        let buf = if tiles.tiles.is_empty() {
            stream.alloc_zeros::<TileDesc>(1)?
        } else {
            stream.clone_htod(&tiles.tiles)?
        };
        Ok(DeviceTiles {
            buf,
            len: tiles.tiles.len(),
        })
    }
}

/// A split-tail workspace ([`SplitArgs`]) for GEMM launches that run one
/// after another on one stream, and the epoch each launch gets.
pub struct SplitWorkspace {
    partials: CudaSlice<f32>,
    flags: CudaSlice<u64>,
    slots: usize,
    epoch: AtomicU64,
}

impl SplitWorkspace {
    /// Room for launches of any of `variants` (compiled if needed); None
    /// when none of them splits its tail.
    pub fn new(
        stream: &Arc<CudaStream>,
        rt: &GemmRuntime,
        variants: &[GemmVariant],
    ) -> Result<Option<SplitWorkspace>, KernelError> {
        let mut slots = 0;
        let mut slot_bytes = 0;
        for v in variants {
            slots = slots.max(rt.split_slots(v)?);
            slot_bytes = slot_bytes.max(GemmRuntime::split_slot_bytes(v));
        }
        if slots == 0 {
            return Ok(None);
        }
        Ok(Some(SplitWorkspace {
            partials: stream.alloc_zeros::<f32>(slots * slot_bytes / 4)?,
            flags: stream.alloc_zeros::<u64>(2 * slots)?,
            slots,
            epoch: AtomicU64::new(0),
        }))
    }

    /// The arguments of the next launch on `stream` (a new epoch each call).
    pub fn next_launch(&self, stream: &CudaStream) -> SplitArgs {
        SplitArgs {
            partials: self.partials.device_ptr(stream).0,
            flags: self.flags.device_ptr(stream).0,
            slots: self.slots,
            epoch: self.epoch.fetch_add(1, Ordering::Relaxed) + 1,
        }
    }
}

impl DeviceProblem {
    /// Uploads `p` with the tile list `tiles` (validated first).
    pub fn upload(
        stream: Arc<CudaStream>,
        p: &GroupedProblem,
        v: &GemmVariant,
        tiles: &TileList,
    ) -> Result<DeviceProblem, KernelError> {
        tiles.validate(p.rows(), p.experts(), p.out_cols(), v)?;
        let one = |s: &Arc<CudaStream>| s.alloc_zeros::<u32>(1);
        let a = if p.a.is_empty() {
            stream.alloc_zeros::<bf16>(1)?
        } else {
            stream.clone_htod(&p.a)?
        };
        let b = stream.clone_htod(&p.b)?;
        let ldc = p.out_cols();
        let c = stream.alloc_zeros::<bf16>((p.out_rows * ldc).max(1))?;
        let t = DeviceTiles::upload(&stream, tiles)?;
        let deps = if tiles.deps.is_empty() {
            one(&stream)?
        } else {
            stream.clone_htod(&tiles.deps)?
        };
        let scatter_idx = if p.scatter_idx.is_empty() {
            stream.alloc_zeros::<i32>(1)?
        } else {
            stream.clone_htod(&p.scatter_idx)?
        };
        let scatter_w = if p.scatter_w.is_empty() {
            stream.alloc_zeros::<f32>(1)?
        } else {
            stream.clone_htod(&p.scatter_w)?
        };
        let err = stream.alloc_zeros::<u64>(1)?;
        let mut dp = DeviceProblem {
            stream: stream.clone(),
            a,
            b,
            c,
            tiles: t,
            deps,
            scatter_idx,
            scatter_w,
            err,
            total_rows: p.rows(),
            k: p.k,
            n: p.n,
            ldc,
            experts: p.experts(),
            out_rows: p.out_rows,
            split: None,
            gather: None,
        };
        dp.poison()?;
        Ok(dp)
    }

    /// Uploads another tile list for `v` over this problem's A and B (e.g.
    /// another epilogue), validated against the problem's shape; launch it
    /// with [`DeviceProblem::launch_tiles`].
    pub fn upload_tiles(
        &self,
        tiles: &TileList,
        v: &GemmVariant,
    ) -> Result<DeviceTiles, KernelError> {
        let out_cols = v.epilogue.out_cols(self.n);
        if out_cols > self.ldc {
            return Err(KernelError::InvalidShape(format!(
                "{out_cols} output columns for {} do not fit in C's {} columns",
                v.kernel_name(),
                self.ldc
            )));
        }
        tiles.validate(self.total_rows, self.experts, out_cols, v)?;
        DeviceTiles::upload(&self.stream, tiles)
    }

    /// Lets launches of any of `variants` split their last wave of tiles
    /// along K ([`crate::tiles::TailSplit`]); without it every tile runs
    /// whole. A no-op for families that never split.
    pub fn enable_split(
        &mut self,
        rt: &GemmRuntime,
        variants: &[GemmVariant],
    ) -> Result<(), KernelError> {
        self.split = SplitWorkspace::new(&self.stream, rt, variants)?;
        Ok(())
    }

    /// Launches from here on read A's rows from `src` (`src_rows` rows of
    /// K), tile row `r` from row `rows[r]`, as one rank's FC1 reads x.
    pub fn enable_gather(
        &mut self,
        src: &[bf16],
        src_rows: usize,
        rows: &[i32],
    ) -> Result<(), KernelError> {
        if src.len() != src_rows * self.k || rows.len() != self.total_rows {
            return Err(KernelError::InvalidShape(format!(
                "a gather of {} rows from {src_rows} x {} needs {} source values and {} row \
                 indices, got {} and {}",
                self.total_rows,
                self.k,
                src_rows * self.k,
                self.total_rows,
                src.len(),
                rows.len()
            )));
        }
        if let Some(r) = rows.iter().find(|&&r| r < 0 || r as usize >= src_rows) {
            return Err(KernelError::InvalidShape(format!(
                "gather row {r} is outside the {src_rows} source rows"
            )));
        }
        self.gather = Some(GatherSource {
            src: self.stream.clone_htod(src)?,
            rows: if rows.is_empty() {
                self.stream.alloc_zeros::<i32>(1)?
            } else {
                self.stream.clone_htod(rows)?
            },
            src_rows,
        });
        Ok(())
    }

    /// Fills C with NaN (0xFFFF in bf16) and clears the error word.
    pub fn poison(&mut self) -> Result<(), KernelError> {
        let (c, _g) = self.c.device_ptr(&self.stream);
        // SAFETY: c covers c.len() bf16 elements of this context.
        unsafe { sys::cuMemsetD16Async(c, 0xFFFF, self.c.len(), self.stream.cu_stream()) }
            .result()?;
        drop(_g);
        self.stream.memset_zeros(&mut self.err)?;
        Ok(())
    }

    /// Launches `v` over this problem; `signals` (raw pointer to u64 words)
    /// and the timeouts/epochs only matter for hooked variants.
    pub fn launch(
        &self,
        rt: &GemmRuntime,
        v: &GemmVariant,
        hooks: Option<HookArgs>,
    ) -> Result<(), KernelError> {
        self.launch_with(rt, v, &self.tiles, hooks, true)
    }

    /// As [`DeviceProblem::launch`] over `tiles` (from
    /// [`DeviceProblem::upload_tiles`] for `v`) instead of the problem's own list.
    pub fn launch_tiles(
        &self,
        rt: &GemmRuntime,
        v: &GemmVariant,
        tiles: &DeviceTiles,
        hooks: Option<HookArgs>,
    ) -> Result<(), KernelError> {
        self.launch_with(rt, v, tiles, hooks, true)
    }

    /// As [`DeviceProblem::launch`] with every tile whole even when the
    /// split workspace is there (the benchmark's side-by-side baseline).
    pub fn launch_unsplit(
        &self,
        rt: &GemmRuntime,
        v: &GemmVariant,
        hooks: Option<HookArgs>,
    ) -> Result<(), KernelError> {
        self.launch_with(rt, v, &self.tiles, hooks, false)
    }

    fn launch_with(
        &self,
        rt: &GemmRuntime,
        v: &GemmVariant,
        tiles: &DeviceTiles,
        hooks: Option<HookArgs>,
        split: bool,
    ) -> Result<(), KernelError> {
        let s = &self.stream;
        let (a, _ga) = match &self.gather {
            Some(g) => g.src.device_ptr(s),
            None => self.a.device_ptr(s),
        };
        let gather_rows = self
            .gather
            .as_ref()
            .map(|g| (g.rows.device_ptr(s), g.src_rows));
        let gather = gather_rows
            .as_ref()
            .map(|&((rows, _), src_rows)| Gather { rows, src_rows });
        let (b, _gb) = self.b.device_ptr(s);
        let (c, _gc) = self.c.device_ptr(s);
        let num_tiles = tiles.len;
        let (tiles, _gt) = tiles.buf.device_ptr(s);
        let (deps, _gd) = self.deps.device_ptr(s);
        let (si, _gsi) = self.scatter_idx.device_ptr(s);
        let (sw, _gsw) = self.scatter_w.device_ptr(s);
        let (err, _ge) = self.err.device_ptr(s);
        let hooks = hooks.map(|h| HookArgs { deps, ..h });
        let split = self
            .split
            .as_ref()
            .filter(|_| split)
            .map(|w| w.next_launch(s));
        let args = GemmArgs {
            a,
            b,
            c,
            tiles,
            num_tiles,
            total_rows: self.total_rows,
            k: self.k,
            n: self.n,
            ldc: self.ldc,
            experts: self.experts,
            scatter_idx: si,
            scatter_w: sw,
            err,
            hooks,
            split,
            device: None,
            gather,
            side: None,
        };
        if self.total_rows == 0 && num_tiles > 0 {
            return Err(KernelError::InvalidShape(
                "tiles given for a problem with no rows".into(),
            ));
        }
        // SAFETY: every buffer was sized by `upload` for this problem and
        // tile list (validated there); they outlive the launch because the
        // caller synchronizes before dropping self. Signal pointers come from
        // the caller's HookArgs and must cover the indices in `deps`.
        unsafe { rt.launch(v, &args, s) }
    }

    pub fn download_c(&self) -> Result<Vec<bf16>, KernelError> {
        Ok(self.stream.clone_dtoh(&self.c)?)
    }

    /// Synchronizes and turns the device error word into a Result.
    pub fn finish(&self) -> Result<(), KernelError> {
        self.stream.synchronize()?;
        let w = self.stream.clone_dtoh(&self.err)?;
        check_error_word(w[0])
    }

    pub fn err_ptr(&self) -> sys::CUdeviceptr {
        let (p, _g) = self.err.device_ptr(&self.stream);
        p
    }
}

/// Stores `value` into signal word `index` of `signals` from `stream`, after
/// all earlier work on that stream (e.g. the copy that delivered the data):
/// an 8-byte host-to-device copy, ordered after the stream's earlier copies.
/// (cuStreamWriteValue64_v2 answered CUDA_ERROR_INVALID_VALUE on the 13.0
/// driver through cudarc's binding, so a copy it is.)
pub fn raise_signal_async(
    stream: &CudaStream,
    signals: &CudaSlice<u64>,
    index: usize,
    value: u64,
) -> Result<(), KernelError> {
    if index >= signals.len() {
        return Err(KernelError::InvalidShape(format!(
            "signal {index} outside {} signals",
            signals.len()
        )));
    }
    let (base, _g) = signals.device_ptr(stream);
    let v = value;
    // SAFETY: the address is inside `signals` (checked above); the source is
    // pageable, so the driver stages it before returning.
    unsafe {
        sys::cuMemcpyHtoDAsync_v2(
            base + (index * 8) as u64,
            &v as *const u64 as *const _,
            8,
            stream.cu_stream(),
        )
    }
    .result()?;
    Ok(())
}

/// Copies host rows into a device bf16 buffer at element offset `at`.
pub fn copy_rows_async(
    stream: &CudaStream,
    dst: &CudaSlice<bf16>,
    at: usize,
    src: &[bf16],
) -> Result<(), KernelError> {
    if at + src.len() > dst.len() {
        return Err(KernelError::InvalidShape(format!(
            "copy of {} at {at} outside {}",
            src.len(),
            dst.len()
        )));
    }
    let (base, _g) = dst.device_ptr(stream);
    // SAFETY: the range is inside dst (checked); src stays alive until the
    // caller synchronizes the stream (pageable copies are staged by the
    // driver before this call returns).
    unsafe {
        sys::cuMemcpyHtoDAsync_v2(
            base + (at * 2) as u64,
            src.as_ptr() as *const _,
            src.len() * 2,
            stream.cu_stream(),
        )
    }
    .result()?;
    Ok(())
}
