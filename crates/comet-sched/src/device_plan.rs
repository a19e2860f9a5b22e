//! What the device forward runs for one layer (DESIGN.md 6b): decided once,
//! when the layer is built, from the shape, the capacity, this rank's share
//! of its GPU and the cost model. The persistent grids, the communication
//! blocks, the column chunks and the size of every per-call buffer come from
//! here, so `comet plan` prints exactly what `forward` uses, on any machine.
//!
//! Co-residency rule: a kernel that spins must never keep off the GPU a
//! block it waits for. Each rank owns `share = sms / ranks_per_gpu` SMs; a
//! GEMM CTA fills an SM, and whatever runs at the same time on one rank
//! (GEMM grid + communication blocks) never takes more than the share, so
//! every rank's blocks are resident together.

use crate::error::SchedError;
use comet_core::cost::MAX_GROUPS;
use comet_core::cost::{CostEstimate, CostModel, DeviceFigures, WireFormat};
use comet_core::MoeConfig;

/// Tile sizes of the GEMM kernels the layer will launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelTiles {
    /// Rows per tile.
    pub bm: usize,
    /// Output columns per FC1 (SwiGLU) tile.
    pub fc1_cols: usize,
    /// Output columns per FC2 tile.
    pub fc2_cols: usize,
    /// FC1 column tiles per raster group: the device tile lists take a
    /// group's row tiles (or a chunk's, FC2) column group by column group.
    pub fc1_group: usize,
    /// FC2 column tiles per raster group.
    pub fc2_group: usize,
    /// Whether the GEMMs' idle producer warps can move rows beside their
    /// tiles (the Hopper family's, unclustered).
    pub side_warps: bool,
}

/// The most experts the device route and layout handle.
pub const MAX_EXPERTS: usize = 1024;
/// The most ranks the device layout handles.
pub const MAX_RANKS: usize = 512;
/// The most top-k slots per token the device reduce handles.
pub const MAX_TOP_K: usize = 16;

/// The layer's plan (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct DevicePlan {
    pub cfg: MoeConfig,
    /// Tokens per call, at most.
    pub capacity: usize,
    /// Rows this rank can receive in one call.
    pub recv_capacity: usize,
    /// SMs the layers on this GPU may fill (the device's, less those
    /// left to a transport's own kernels: `LayerOptions::reserved_sms`).
    pub sms: usize,
    pub ranks_per_gpu: usize,
    /// SMs this rank may fill at once.
    pub share: usize,
    /// Whether the fused mode overlaps communication with the GEMMs: the
    /// cost model's verdict, or blocks given ([`Self::set_comm_blocks`]).
    pub overlap: bool,
    /// Fused, where the GEMMs can and the model overlaps no link (a rank
    /// alone; ranks whose transfers would not pay for chunks): the rows
    /// move inside the GEMMs, on the idle warps of their producer
    /// warpgroups: the dispatch in FC1, whose tiles wait on its segments,
    /// and in FC2 the combine of each finished chunk (a rank alone: the
    /// sums of its chunks but the last; docs/ARCHITECTURE.md, "Rows moved
    /// inside the GEMMs"). Nothing takes an SM from the GEMMs, which
    /// communication blocks would (docs/PERF.md, 2026-12-06: they did not
    /// pay alone). Off where blocks are given.
    pub side_warps: bool,
    /// Blocks of the communication kernels while the GEMMs run: the cost
    /// model's (a third of the share at most), or given; none on the side
    /// warps.
    pub comm_blocks: usize,
    /// Whether `comm_blocks` was given rather than the model's.
    pub comm_blocks_given: bool,
    /// CTAs of the persistent GEMMs when overlapping / in sequence.
    pub gemm_grid_overlap: usize,
    pub gemm_grid: usize,
    /// Blocks of the route, layout, reduce and sequential copy kernels.
    /// One per SM of the share: four per SM on a GPU of its own moved
    /// neither qwen's reduce nor its dispatch (docs/PERF.md, 2026-12-05).
    pub aux_blocks: usize,
    /// Output columns per layer1 chunk, and the number of chunks.
    pub chunk_cols: usize,
    pub chunks: usize,
    /// Expert groups of this rank's local experts: an overlapped call runs
    /// FC1 and FC2 group by group, and each group's combine leaves beside
    /// the later groups' GEMMs (ARCHITECTURE.md, "What is overlapped").
    /// The cost model's choice where the call overlaps between ranks, else 1.
    pub groups: usize,
    pub tiles: KernelTiles,
    /// Row tiles the receive capacity can need (tile list capacity).
    pub max_row_tiles: usize,
    /// How dispatch crosses the link, as the cost model counted it.
    pub wire: WireFormat,
    /// A proxy carries the combine token-once (no expert groups then).
    pub proxied_tokens: bool,
    /// FC1 reads x's rows in place (one rank: no row leaves it, so the
    /// dispatch only writes each receive row's token). `new` leaves it
    /// off; a layer of one rank sets it where asked
    /// (`LayerOptions::gather_x`).
    pub gather_x: bool,
    pub estimate: CostEstimate,
}

fn bad(field: &'static str, problem: String) -> SchedError {
    SchedError::Core(comet_core::CoreError::InvalidConfig { field, problem })
}

/// The shape, capacity and tiles a device plan can take: one error naming
/// the first field that cannot work.
fn check_shape(
    cfg: &MoeConfig,
    capacity: usize,
    sms: usize,
    ranks_per_gpu: usize,
    tiles: &KernelTiles,
) -> Result<(), SchedError> {
    cfg.validate()?;
    let (w, h, f) = (cfg.ranks, cfg.hidden, cfg.ffn);
    if capacity == 0 {
        return Err(bad("capacity", "must be at least one token".into()));
    }
    if cfg.experts > MAX_EXPERTS || w > MAX_RANKS {
        return Err(bad(
            "experts",
            format!(
                "{} experts over {w} ranks: the device layout handles at most \
                 {MAX_EXPERTS} experts and {MAX_RANKS} ranks",
                cfg.experts
            ),
        ));
    }
    if cfg.top_k > MAX_TOP_K {
        return Err(bad(
            "top_k",
            format!("{} exceeds the device reduce's {MAX_TOP_K}", cfg.top_k),
        ));
    }
    for (field, n) in [
        ("sms", sms),
        ("ranks_per_gpu", ranks_per_gpu),
        ("tile rows", tiles.bm),
        ("FC1 tile columns", tiles.fc1_cols),
        ("FC2 tile columns", tiles.fc2_cols),
        ("FC1 raster group", tiles.fc1_group),
        ("FC2 raster group", tiles.fc2_group),
    ] {
        if n == 0 {
            return Err(bad(field, "must be at least 1".into()));
        }
    }
    for (field, n, tile, which) in [
        ("hidden", h, tiles.fc2_cols, "FC2"),
        ("ffn", f, tiles.fc1_cols, "FC1"),
    ] {
        let step = lcm(64, tile);
        if !n.is_multiple_of(step) {
            return Err(bad(
                field,
                format!("{n} must be a multiple of {step} (of 64 and of the {which} tile's {tile} columns)"),
            ));
        }
    }
    if capacity * cfg.top_k > i32::MAX as usize {
        return Err(bad(
            "capacity",
            format!(
                "{capacity} tokens x top-{} rows do not fit 32-bit row indices",
                cfg.top_k
            ),
        ));
    }
    Ok(())
}

impl DevicePlan {
    /// `recv_capacity: None` sizes the receive side for the worst case
    /// (every rank sends all its tokens to this rank's experts).
    pub fn new(
        cfg: &MoeConfig,
        capacity: usize,
        recv_capacity: Option<usize>,
        sms: usize,
        ranks_per_gpu: usize,
        tiles: KernelTiles,
        figures: &DeviceFigures,
    ) -> Result<DevicePlan, SchedError> {
        check_shape(cfg, capacity, sms, ranks_per_gpu, &tiles)?;
        let (w, h, epr) = (cfg.ranks, cfg.hidden, cfg.experts_per_rank());
        let worst = w * capacity * cfg.top_k.min(epr);
        // A bound above the worst case buys nothing: nothing can arrive
        // beyond it.
        let recv_capacity = recv_capacity.unwrap_or(worst).min(worst).max(1);
        if recv_capacity > i32::MAX as usize / 2 {
            return Err(bad(
                "recv_capacity",
                format!("{recv_capacity} receive rows do not fit 32-bit row indices"),
            ));
        }
        let share = (sms / ranks_per_gpu).max(1);
        let mut dev = figures.clone();
        dev.gemm_tflops *= share as f64 / dev.sms.max(1) as f64;
        dev.sms = share;
        dev.bm = tiles.bm;
        let estimate = CostModel::estimate_groups(cfg, capacity, &dev, max_groups(&dev));
        let overlap = w > 1 && share > 1 && estimate.overlapped_ms < estimate.baseline_ms;
        let groups = if overlap {
            estimate.groups.clamp(1, epr)
        } else {
            1
        };
        // Where the model overlaps a link, blocks beside the GEMMs; where
        // it does not, the copies ride in the GEMMs' idle warps (ranks
        // sharing a GPU: no faster than in sequence, 2026-12-07, where
        // blocks given were faster), except behind a proxy, whose mirrors
        // and token-once rows the side warps have never been run or tested
        // against: a proxied layer the model does not overlap runs in
        // sequence.
        let side_warps = tiles.side_warps && !overlap && !(figures.proxy && w > 1);
        let comm_blocks = if side_warps { 0 } else { estimate.comm_blocks };
        let (chunk_cols, chunks) = if overlap {
            let cols = chunk_width(h, tiles.fc2_cols, h / estimate.chunks.max(1));
            (cols, h / cols)
        } else if side_warps {
            let cols = side_chunk_width(cfg, tiles.fc2_cols);
            (cols, h / cols)
        } else {
            (h, 1)
        };
        Ok(DevicePlan {
            cfg: cfg.clone(),
            capacity,
            recv_capacity,
            sms,
            ranks_per_gpu,
            share,
            overlap,
            side_warps,
            comm_blocks,
            comm_blocks_given: false,
            gemm_grid_overlap: share - comm_blocks,
            gemm_grid: share,
            aux_blocks: share,
            chunk_cols,
            chunks,
            groups,
            tiles,
            max_row_tiles: recv_capacity.div_ceil(tiles.bm) + epr,
            wire: figures.wire,
            proxied_tokens: max_groups(figures) == 1,
            gather_x: false,
            estimate,
        })
    }

    /// `n` communication blocks beside the overlapped GEMMs instead of the
    /// cost model's choice or the side warps, at least one and leaving the
    /// GEMMs one SM.
    /// Blocks given always overlap: where the model would run in sequence
    /// (a rank alone, with no link to hide; ranks sharing a GPU over
    /// NVLink) the dispatch then runs beside FC1 and the combine and
    /// reduce beside FC2, in chunks of about an eighth of the hidden size.
    pub fn set_comm_blocks(&mut self, n: usize) {
        if !self.overlap && self.share > 1 && !self.gather_x {
            let h = self.cfg.hidden;
            self.overlap = true;
            self.chunk_cols = chunk_width(h, self.tiles.fc2_cols, h / GIVEN_CHUNKS);
            self.chunks = h / self.chunk_cols;
        }
        if self.overlap {
            self.side_warps = false;
            self.comm_blocks = n.clamp(1, self.share.saturating_sub(1).max(1));
            self.comm_blocks_given = true;
            self.gemm_grid_overlap = self.share - self.comm_blocks;
        }
    }

    /// FC1 reads x's rows in place, gathered by token (one rank): the
    /// dispatch then only writes each receive row's token, in sequence.
    pub fn gather_in_place(&mut self) {
        self.gather_x = true;
        self.side_warps = false;
        (self.chunk_cols, self.chunks) = (self.cfg.hidden, 1);
    }

    /// `n` expert groups instead of the cost model's choice. More than one
    /// needs a combine to overlap (ranks > 1, overlapping) and a wire that
    /// keeps one row per (token, expert) back: a proxy's token-once combine
    /// sums a token's rows per rank, not per group.
    pub fn set_groups(&mut self, n: usize) -> Result<(), SchedError> {
        let epr = self.cfg.experts_per_rank();
        let limit = epr.min(MAX_GROUPS);
        if n == 0 || n > limit {
            return Err(bad(
                "expert groups",
                format!("{n}: must be 1 to {limit} ({epr} local experts, at most {MAX_GROUPS})"),
            ));
        }
        if n > 1 && (self.cfg.ranks == 1 || !self.overlap) {
            return Err(bad(
                "expert groups",
                format!("{n} needs ranks that overlap a combine (this layer does not)"),
            ));
        }
        if n > 1 && self.proxied_tokens {
            return Err(bad(
                "expert groups",
                format!(
                    "{n} needs the rows wire: a token-once combine sums per rank, not per group"
                ),
            ));
        }
        self.groups = n;
        Ok(())
    }

    /// `n` layer1 column chunks instead of the plan's, each of whole FC2
    /// tiles. Only where chunks matter: a call that overlaps, or a rank
    /// alone whose FC2 side warps sum every chunk but the last. After
    /// [`Self::set_comm_blocks`], which may choose chunks of its own.
    pub fn set_chunks(&mut self, n: usize) -> Result<(), SchedError> {
        let (h, tile) = (self.cfg.hidden, self.tiles.fc2_cols);
        if !self.overlap && !self.side_warps {
            return Err(bad(
                "layer1 chunks",
                format!("{n}: this layer runs in sequence, where chunks change nothing"),
            ));
        }
        if n == 0 || !h.is_multiple_of(n) || !(h / n).is_multiple_of(tile) {
            let valid: Vec<String> = chunk_widths(h, tile)
                .map(|w| (h / w).to_string())
                .rev()
                .collect();
            return Err(bad(
                "layer1 chunks",
                format!(
                    "{n}: chunks are whole FC2 tiles of {tile} columns dividing hidden {h}: {}",
                    valid.join(", ")
                ),
            ));
        }
        (self.chunks, self.chunk_cols) = (n, h / n);
        Ok(())
    }

    /// What of the plan every rank of a layer must derive alike, by name:
    /// the receive capacity every rank's refusal assumes, the pieces that
    /// number the combine signals and their columns, the wire a proxy
    /// carries. Ranks derive it from their own GPU's SMs and kernels, so
    /// GPUs that differ may derive another (comet-py compares it across
    /// ranks before the first call).
    pub fn protocol(&self) -> Vec<(&'static str, String)> {
        vec![
            ("recv_capacity", self.recv_capacity.to_string()),
            ("chunks", self.chunks.to_string()),
            ("chunk_cols", self.chunk_cols.to_string()),
            ("expert_groups", self.groups.to_string()),
            ("wire", format!("{:?}", self.wire)),
            ("proxied_tokens", self.proxied_tokens.to_string()),
        ]
    }

    /// Layer1 pieces a rank sends each other rank: column chunks of each
    /// expert group (the combine signals and FC2 counters).
    pub fn pieces(&self) -> usize {
        self.groups * self.chunks
    }

    /// FC1 tile list capacity.
    pub fn fc1_tiles_cap(&self) -> usize {
        self.max_row_tiles * (self.cfg.ffn / self.tiles.fc1_cols)
    }

    /// FC2 tile list capacity (every chunk).
    pub fn fc2_tiles_cap(&self) -> usize {
        self.max_row_tiles * (self.cfg.hidden / self.tiles.fc2_cols)
    }

    /// Rows this rank sends in one call, at most.
    pub fn send_capacity(&self) -> usize {
        self.capacity * self.cfg.top_k
    }

    /// Blocks of the route kernel for `tokens` tokens (about 4096 slots each).
    pub fn route_blocks(&self, tokens: usize) -> usize {
        (tokens * self.cfg.top_k)
            .div_ceil(4096)
            .clamp(1, self.aux_blocks)
    }

    /// The plan in a few lines, as `comet plan` prints it.
    pub fn describe(&self) -> String {
        format!(
            "device forward: {} SMs, {} rank(s) per GPU -> {} SMs per rank\n\
             overlap: {} ({}cost model: overlapped {:.3} ms vs sequential {:.3} ms){}\n\
             link (cost model): dispatch {} {:.3} ms, combine {:.3} ms\n\
             GEMM grid: {} CTAs overlapping, {} in sequence; communication blocks: {}\n\
             tiles: {} rows, FC1 {} cols, FC2 {} cols, in column groups of {} (FC1) and {} (FC2); layer1 chunks: {} x {} cols\n\
             expert groups: {} (FC1 then FC2 group by group; the cost model's {}: fused {:.3} ms, of which {:.3} ms after the last FC1)\n\
             FC1 reads: {}\n\
             capacity: {} tokens, {} receive rows, {} row tiles",
            self.sms,
            self.ranks_per_gpu,
            self.share,
            self.overlap,
            if self.comm_blocks_given {
                "communication blocks given; "
            } else {
                ""
            },
            self.estimate.overlapped_ms,
            self.estimate.baseline_ms,
            match (self.side_warps, self.cfg.ranks) {
                (false, _) => "",
                (true, 1) => "; the GEMMs' idle producer warps move the rows (FC1 the dispatch, FC2 the sums of its chunks but the last)",
                (true, _) => "; the GEMMs' idle producer warps move the rows (FC1 the dispatch, FC2 the combine of each chunk)",
            },
            match self.wire {
                WireFormat::Rows => "a row per (token, expert)",
                WireFormat::Tokens => "token-once",
            },
            self.estimate.dispatch_ms,
            self.estimate.combine_ms,
            self.gemm_grid_overlap,
            self.gemm_grid,
            self.comm_blocks,
            self.tiles.bm,
            self.tiles.fc1_cols,
            self.tiles.fc2_cols,
            self.tiles.fc1_group,
            self.tiles.fc2_group,
            self.chunks,
            self.chunk_cols,
            self.groups,
            self.estimate.groups,
            self.estimate.overlapped_ms,
            self.estimate.layer1_ms,
            if self.gather_x {
                "x in place (rows gathered by token)"
            } else {
                "rows dispatched into expert order"
            },
            self.capacity,
            self.recv_capacity,
            self.max_row_tiles,
        )
    }
}

/// Expert groups the model may choose on `dev`: one where a proxy sums a
/// token's combine rows per rank (token-once), which a group cannot split.
fn max_groups(dev: &DeviceFigures) -> usize {
    if dev.proxy && dev.wire == WireFormat::Tokens {
        1
    } else {
        MAX_GROUPS
    }
}

fn lcm(a: usize, b: usize) -> usize {
    let gcd = |mut x: usize, mut y: usize| {
        while y != 0 {
            (x, y) = (y, x % y);
        }
        x
    };
    a / gcd(a, b) * b
}

/// Chunks where blocks are given and the model would not overlap: the last
/// chunk's combine and sum are what is left after FC2.
const GIVEN_CHUNKS: usize = 8;

/// Part of the time to read FC2's A once that a chunk more adds to FC2
/// (its tiles go chunk by chunk, so each chunk reads A again; the GEMM
/// hides the rest): qwen2-moe at 16384 tokens lost about 0.035 ms a chunk
/// on an H100, where reading its A (0.67 GB) takes 0.2 ms (docs/PERF.md,
/// 2026-12-06 ~22:10).
const A_REREAD_EXPOSED: f64 = 0.17;

/// Chunk width where FC2's side warps move the chunks and the cost model
/// sees no link worth overlapping (a rank alone summing every chunk but
/// the last; ranks sharing a GPU combining each): the whole FC2 tiles
/// dividing `hidden` whose count C costs least, (C - 1) re-reads of A's
/// exposed part against the last chunk's work after FC2 (1/C of every row
/// read and y written; a combine moves about as many bytes). Both go by
/// bytes per row, so the tokens and the memory's speed drop out: qwen2-moe
/// (F 2560, H 3584, top-8) takes 2 chunks, mixtral (F 14336, H 4096,
/// top-2) 2.
fn side_chunk_width(cfg: &MoeConfig, tile: usize) -> usize {
    let (h, f, k) = (cfg.hidden as f64, cfg.ffn as f64, cfg.top_k as f64);
    let cost = |cols: usize| {
        let c = (cfg.hidden / cols) as f64;
        (c - 1.0) * f * A_REREAD_EXPOSED + h * (1.0 + 1.0 / k) / c
    };
    chunk_widths(cfg.hidden, tile)
        .min_by(|a, b| cost(*a).total_cmp(&cost(*b)))
        .unwrap_or(cfg.hidden)
}

/// The multiple of `tile` dividing `hidden` closest to `goal` (ties: wider).
fn chunk_width(hidden: usize, tile: usize, goal: usize) -> usize {
    chunk_widths(hidden, tile)
        .min_by_key(|&c| (c.abs_diff(goal), usize::MAX - c))
        .unwrap_or(hidden)
}

/// The chunk widths of whole `tile`s that divide `hidden`, narrowest first.
fn chunk_widths(hidden: usize, tile: usize) -> impl DoubleEndedIterator<Item = usize> {
    (1..=hidden / tile)
        .map(move |m| m * tile)
        .filter(move |c| hidden.is_multiple_of(*c))
}

/// The Hopper GEMMs' tiles, for plans made in tests without a GPU.
#[cfg(test)]
pub(crate) const TEST_TILES: KernelTiles = KernelTiles {
    bm: 128,
    fc1_cols: 128,
    fc2_cols: 256,
    fc1_group: 8,
    fc2_group: 8,
    side_warps: true,
};

#[cfg(test)]
mod tests {
    use super::*;
    use comet_core::Preset;

    const TILES: KernelTiles = TEST_TILES;

    fn plan(p: Preset, w: usize, per_gpu: usize) -> DevicePlan {
        let cfg = p.config(w).unwrap();
        DevicePlan::new(
            &cfg,
            8192,
            None,
            132,
            per_gpu,
            TILES,
            &DeviceFigures::h200_nvlink(),
        )
        .unwrap()
    }

    #[test]
    fn concurrent_blocks_stay_within_the_share() {
        for p in [Preset::Mixtral8x7b, Preset::Qwen2Moe, Preset::Phi35Moe] {
            for (w, per_gpu) in [(1, 1), (2, 2), (4, 4), (2, 1), (8, 1)] {
                let d = plan(p, w, per_gpu);
                assert_eq!(d.share, 132 / per_gpu);
                assert!(
                    !d.overlap || d.gemm_grid_overlap + d.comm_blocks <= d.share,
                    "{d:?}"
                );
                assert!(d.gemm_grid <= d.share && d.aux_blocks <= d.share);
                assert!(d.share * per_gpu <= 132);
                assert_eq!(d.chunk_cols * d.chunks, d.cfg.hidden);
                assert!(d.chunk_cols.is_multiple_of(TILES.fc2_cols));
            }
        }
    }

    #[test]
    fn communication_blocks_given_replace_the_cost_models_within_the_share() {
        let mut d = plan(Preset::Qwen2Moe, 2, 2);
        assert!(d.overlap, "{d:?}");
        for (asked, got) in [(16, 16), (0, 1), (500, d.share - 1)] {
            d.set_comm_blocks(asked);
            assert_eq!(d.comm_blocks, got, "{asked}");
            assert_eq!(d.gemm_grid_overlap + d.comm_blocks, d.share);
            assert_eq!(d.gemm_grid, d.share, "the sequential grid keeps the share");
        }
    }

    /// A rank alone runs in sequence unless blocks are given: then its
    /// dispatch and reduce run beside the GEMMs, the reduce in chunks.
    #[test]
    fn blocks_given_to_a_rank_alone_overlap_its_copies() {
        let mut one = plan(Preset::Qwen2Moe, 1, 1);
        assert!(!one.overlap);
        one.set_comm_blocks(16);
        assert!(one.overlap, "{one:?}");
        assert_eq!((one.comm_blocks, one.gemm_grid_overlap), (16, 116));
        assert_eq!(one.gemm_grid, 132, "the sequential grid keeps the GPU");
        assert_eq!(one.chunk_cols * one.chunks, one.cfg.hidden);
        assert!(one.chunks > 1 && one.chunk_cols.is_multiple_of(TILES.fc2_cols));
        assert!(one
            .describe()
            .contains("overlap: true (communication blocks given;"));
        // FC1 gathering x in place has no dispatch to overlap.
        let mut gathering = plan(Preset::Qwen2Moe, 1, 1);
        gathering.gather_in_place();
        gathering.set_comm_blocks(16);
        assert!(!gathering.overlap);
    }

    #[test]
    fn one_rank_moves_its_rows_in_the_gemms_side_warps_on_the_whole_gpu() {
        let d = plan(Preset::Mixtral8x7b, 1, 1);
        assert!(!d.overlap && d.side_warps, "{d:?}");
        assert!(!d.gather_x, "FC1 over dispatched rows unless a layer asks");
        assert_eq!((d.gemm_grid, d.gemm_grid_overlap), (132, 132));
        // Chunks of whole FC2 tiles: the last one's sum is what is left
        // after FC2, each one more re-reads FC2's A.
        assert_eq!((d.chunks, d.chunk_cols), (2, 2048));
        assert!(d.describe().contains("idle producer warps move the rows"));
        let qwen = plan(Preset::Qwen2Moe, 1, 1);
        assert_eq!((qwen.chunks, qwen.chunk_cols), (2, 1792));
        // A wide layer whose A is narrow takes more: the sum weighs more
        // than the re-reads.
        let mut wide = Preset::Qwen2Moe.config(1).unwrap();
        (wide.hidden, wide.ffn, wide.top_k) = (8192, 1024, 8);
        let w = DevicePlan::new(
            &wide,
            4096,
            None,
            132,
            1,
            TILES,
            &DeviceFigures::h200_nvlink(),
        )
        .unwrap();
        assert_eq!((w.chunks, w.chunk_cols), (8, 1024), "{w:?}");
        // Without side warps (the portable GEMMs), and where FC1 gathers x
        // or blocks are given, a rank alone runs in sequence or on blocks.
        let portable = KernelTiles {
            side_warps: false,
            ..TILES
        };
        let cfg = Preset::Mixtral8x7b.config(1).unwrap();
        let h200 = DeviceFigures::h200_nvlink();
        let d = DevicePlan::new(&cfg, 4096, None, 132, 1, portable, &h200).unwrap();
        assert!(!d.side_warps && !d.overlap && d.chunks == 1, "{d:?}");
        let mut gathering = plan(Preset::Mixtral8x7b, 1, 1);
        gathering.gather_in_place();
        assert!(gathering.gather_x && !gathering.side_warps);
        assert_eq!(gathering.chunks, 1, "in sequence FC2 takes one chunk");
        let mut blocks = plan(Preset::Mixtral8x7b, 1, 1);
        blocks.set_comm_blocks(8);
        assert!(blocks.overlap && !blocks.side_warps);
    }

    #[test]
    fn chunks_given_are_whole_fc2_tiles_where_chunks_matter() {
        let mut qwen = plan(Preset::Qwen2Moe, 1, 1);
        qwen.set_chunks(2).unwrap();
        assert_eq!((qwen.chunks, qwen.chunk_cols), (2, 1792));
        let e = qwen.set_chunks(4).unwrap_err().to_string();
        assert!(e.contains("dividing hidden 3584: 1, 2, 7, 14"), "{e}");
        assert!(qwen.set_chunks(0).is_err());
        assert_eq!(qwen.chunks, 2, "a refused count changes nothing");
        let mut two = plan(Preset::Mixtral8x7b, 2, 1);
        two.set_chunks(8).unwrap();
        assert_eq!(two.pieces(), 8 * two.groups);
        let mut sequential = plan(Preset::Mixtral8x7b, 1, 1);
        sequential.gather_in_place();
        let e = sequential.set_chunks(2).unwrap_err().to_string();
        assert!(e.contains("runs in sequence"), "{e}");
    }

    /// Ranks the model overlaps (over NVLink on these figures) take
    /// communication blocks from the share; ranks with no link worth
    /// overlapping move their rows in the GEMMs' side warps (FC2 the
    /// combine of each chunk), the GEMMs on the whole share.
    #[test]
    fn several_ranks_overlap_over_nvlink() {
        let d = plan(Preset::Qwen2Moe, 8, 1);
        assert!(d.overlap && !d.side_warps, "{d:?}");
        assert!(d.comm_blocks >= 1 && d.comm_blocks <= d.share / 3);
        assert_eq!(d.gemm_grid_overlap + d.comm_blocks, d.share);
        assert!(d.chunks >= 1);
        // A link so fast its transfers cannot pay for a chunk's overhead.
        let mut fast = DeviceFigures::h200_nvlink();
        fast.link_gbps *= 1e3;
        fast.chunk_overhead_us = 1e3;
        let cfg = Preset::Qwen2Moe.config(2).unwrap();
        let d = DevicePlan::new(&cfg, 8192, None, 132, 2, TILES, &fast).unwrap();
        assert!(!d.overlap && d.side_warps, "{d:?}");
        assert_eq!((d.comm_blocks, d.gemm_grid_overlap), (0, d.share));
        assert_eq!((d.chunks, d.chunk_cols), (2, 1792), "side_chunk_width's");
        assert!(d.describe().contains("FC2 the combine of each chunk"));
        let mut blocks = d.clone();
        blocks.set_comm_blocks(12);
        assert!(!blocks.side_warps && blocks.comm_blocks == 12, "{blocks:?}");
        assert_eq!(blocks.gemm_grid_overlap, d.share - 12);
        // Behind a proxy the same verdict runs in sequence: the side warps
        // never ran against a proxy's mirrors.
        let proxied = DeviceFigures {
            proxy: true,
            ..fast.clone()
        };
        let p = DevicePlan::new(&cfg, 8192, None, 132, 2, TILES, &proxied).unwrap();
        assert!(!p.overlap && !p.side_warps && p.chunks == 1, "{p:?}");
    }

    #[test]
    fn the_protocol_names_what_ranks_must_derive_alike() {
        let cfg = Preset::Qwen2Moe.config(8).unwrap();
        let h200 = DeviceFigures::h200_nvlink();
        let on = |sms| DevicePlan::new(&cfg, 8192, None, sms, 1, TILES, &h200).unwrap();
        let (a, b) = (on(132), on(16));
        assert_eq!(a.protocol(), on(132).protocol());
        assert_ne!(a.chunks, b.chunks, "{a:?} {b:?}");
        let differs: Vec<_> = a
            .protocol()
            .into_iter()
            .zip(b.protocol())
            .filter(|(x, y)| x != y)
            .map(|(x, _)| x.0)
            .collect();
        assert!(differs.contains(&"chunks"), "{differs:?}");
    }

    #[test]
    fn worst_case_receive_capacity() {
        let d = plan(Preset::Qwen2Moe, 2, 2);
        // Each token has at most min(k, experts per rank) rows on one rank.
        assert_eq!(d.recv_capacity, 2 * 8192 * 8);
        assert_eq!(d.max_row_tiles, (2 * 8192 * 8usize).div_ceil(128) + 32);
        let cfg = Preset::Mixtral8x7b.config(8).unwrap();
        let d = DevicePlan::new(
            &cfg,
            100,
            None,
            132,
            1,
            TILES,
            &DeviceFigures::h200_nvlink(),
        )
        .unwrap();
        assert_eq!(d.recv_capacity, 8 * 100);
        let fig = DeviceFigures::h200_nvlink();
        let loose = DevicePlan::new(&cfg, 100, Some(1 << 20), 132, 1, TILES, &fig).unwrap();
        assert_eq!(
            loose.recv_capacity, d.recv_capacity,
            "a bound above the worst case"
        );
    }

    #[test]
    fn bad_shapes_are_named() {
        // The plan's error for a capacity, ranks per GPU and tiles must
        // name `want`.
        let refused =
            |cfg: &MoeConfig, cap: usize, per_gpu: usize, tiles: KernelTiles, want: &str| {
                let fig = DeviceFigures::h200_nvlink();
                let e = DevicePlan::new(cfg, cap, None, 132, per_gpu, tiles, &fig).unwrap_err();
                assert!(e.to_string().contains(want), "{e}");
            };
        let mut cfg = Preset::Mixtral8x7b.config(1).unwrap();
        cfg.ffn = 1000;
        refused(&cfg, 16, 1, TILES, "ffn");
        cfg.ffn = 1024;
        cfg.hidden = 4096 + 64;
        refused(
            &cfg,
            16,
            1,
            TILES,
            "hidden 4160 must be a multiple of 256 (of 64 and of the FC2 tile's 256 columns)",
        );
        cfg.hidden = 4096;
        refused(&cfg, 16, 0, TILES, "ranks_per_gpu must be at least 1");
        let no_group = KernelTiles {
            fc2_group: 0,
            ..TILES
        };
        refused(&cfg, 16, 1, no_group, "FC2 raster group must be at least 1");
        refused(
            &cfg,
            (1 << 29) + 1,
            1,
            TILES,
            "recv_capacity 1073741826 receive rows",
        );
        let cfg = Preset::Mixtral8x7b.config(1).unwrap();
        refused(&cfg, 0, 1, TILES, "capacity");
    }

    /// A link whose transfers take about half the GEMM time: where the cost
    /// model overlaps (the GPU tests build their small layers this way).
    fn balanced(cfg: &MoeConfig, tokens: usize, share: usize) -> DeviceFigures {
        let mut dev = DeviceFigures::h200_nvlink();
        dev.link_latency_us = 0.0;
        dev.chunk_overhead_us = 0.0;
        let mut scaled = dev.clone();
        scaled.gemm_tflops *= share as f64 / dev.sms as f64;
        scaled.sms = share;
        let probe = CostModel::estimate(cfg, tokens, &scaled);
        dev.link_gbps *= probe.dispatch_ms / (probe.gemm_ms / 2.0);
        dev
    }

    #[test]
    fn a_balanced_link_makes_small_layers_overlap_in_chunks() {
        for (w, experts, cap) in [(2, 8, 256), (4, 8, 160), (2, 4, 256)] {
            let cfg = MoeConfig {
                hidden: 512,
                ffn: 256,
                experts,
                top_k: 2,
                ranks: w,
                dtype: comet_core::Dtype::Bf16,
            };
            let fig = balanced(&cfg, cap, 132 / w);
            let d = DevicePlan::new(&cfg, cap, None, 132, w, TILES, &fig).unwrap();
            assert!(d.overlap, "{d:?}");
            assert_eq!(d.chunks, 2, "{d:?}");
        }
    }

    #[test]
    fn ranks_sharing_one_gpu_move_their_rows_in_the_side_warps() {
        // Their "link" is the GPU's own memory: nothing worth an SM to hide
        // (measured: overlapped slower than sequential, docs/PERF.md
        // 2026-12-06; 2026-12-07 the other way round), so their copies
        // ride in the GEMMs' side warps.
        for p in [Preset::Mixtral8x7b, Preset::Qwen2Moe, Preset::Phi35Moe] {
            let cfg = p.config(2).unwrap();
            let d = DevicePlan::new(
                &cfg,
                8192,
                None,
                132,
                2,
                TILES,
                &DeviceFigures::h200_same_gpu(),
            )
            .unwrap();
            assert!(!d.overlap && d.side_warps && d.comm_blocks == 0, "{d:?}");
            // Blocks given overlap there too, in chunks.
            let mut given = d.clone();
            given.set_comm_blocks(8);
            assert!(given.overlap && given.chunks > 1, "{given:?}");
            assert_eq!(given.gemm_grid_overlap + 8, given.share);
        }
    }

    /// The model splits the local experts into groups where a combine
    /// overlaps and comes back a row per (token, expert); never where a
    /// proxy sums it token-once, and groups given are checked.
    #[test]
    fn expert_groups_follow_the_model_and_are_checked() {
        let cfg = Preset::Qwen2Moe.config(2).unwrap();
        let mut fig = DeviceFigures::h200_slow_link();
        fig.wire = WireFormat::Rows;
        // Communication about as long as the GEMMs on a 66-SM share.
        let probe = DevicePlan::new(&cfg, 4096, None, 132, 2, TILES, &fig).unwrap();
        let e = &probe.estimate;
        fig.link_gbps *= (e.dispatch_ms + e.combine_ms) / e.gemm_ms;
        let d = DevicePlan::new(&cfg, 4096, None, 132, 2, TILES, &fig).unwrap();
        assert!(d.overlap && d.groups > 1, "{d:?}");
        assert_eq!(d.groups, d.estimate.groups);
        assert_eq!(d.pieces(), d.groups * d.chunks);
        assert!(d
            .describe()
            .contains(&format!("expert groups: {}", d.groups)));
        let mut one = d.clone();
        one.set_groups(1).unwrap();
        assert_eq!(one.pieces(), one.chunks);
        for n in [0, cfg.experts_per_rank() + 1] {
            let err = one.set_groups(n).unwrap_err().to_string();
            assert!(err.contains("expert groups"), "{err}");
        }
        // Token-once over a proxy: one group, and more are refused by name.
        fig.wire = WireFormat::Tokens;
        let mut t = DevicePlan::new(&cfg, 4096, None, 132, 2, TILES, &fig).unwrap();
        assert_eq!(t.groups, 1, "{t:?}");
        let err = t.set_groups(2).unwrap_err().to_string();
        assert!(err.contains("token-once"), "{err}");
        // Nothing overlapped (ranks sharing a GPU): one group, until
        // blocks given make the combine overlap.
        let mut s = DevicePlan::new(
            &cfg,
            4096,
            None,
            132,
            2,
            TILES,
            &DeviceFigures::h200_same_gpu(),
        )
        .unwrap();
        assert_eq!(s.groups, 1);
        assert!(s.set_groups(2).is_err());
        s.set_comm_blocks(8);
        s.set_groups(2).unwrap();
        assert_eq!(s.pieces(), 2 * s.chunks);
    }

    #[test]
    fn chunk_width_is_a_dividing_multiple() {
        assert_eq!(chunk_width(4096, 256, 1024), 1024);
        assert_eq!(chunk_width(3584, 256, 900), 512);
        assert_eq!(chunk_width(3584, 256, 3584), 3584);
        assert_eq!(chunk_width(256, 256, 1), 256);
    }
}
