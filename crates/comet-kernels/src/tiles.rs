//! Tile lists for the persistent grouped GEMM (pure Rust, no GPU).
//!
//! A [`TileDesc`] is one output tile: up to `tile_rows` rows of one expert,
//! `tile_out_cols` output columns, the signals it waits on before loading A
//! (prologue hook) and the signal it raises once stored (epilogue hook). The
//! kernels walk the list in order with a grid stride, so the list order is
//! the schedule order (COMET's rescheduling lives in comet-core; these
//! builders keep it).

use comet_core::schedule::{Layer0Schedule, Layer1Schedule};

use crate::error::KernelError;
use crate::variants::GemmVariant;

/// Mirrors `comet::TileDesc` in kernels/gemm_common.cuh (32 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TileDesc {
    pub expert: i32,
    pub row0: i32,
    pub rows: i32,
    pub n0: i32,
    pub dep_off: i32,
    pub dep_cnt: i32,
    /// Signal raised after the tile's stores, -1 for none.
    pub sig: i32,
    /// 0: store the call's raise value (epoch); 1: add one (counters).
    pub sig_mode: i32,
}

/// Tiles plus the flat dependency array their `dep_off/dep_cnt` index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TileList {
    pub tiles: Vec<TileDesc>,
    pub deps: Vec<u32>,
}

fn to_i32(v: usize, what: &str) -> Result<i32, KernelError> {
    i32::try_from(v)
        .map_err(|_| KernelError::InvalidShape(format!("{what} = {v} does not fit in i32")))
}

/// Column blocks per raster group: about 2048 GEMM columns of B.
pub fn raster_group(v: &GemmVariant) -> usize {
    (2048 / v.tile_gemm_cols()).max(1)
}

/// Column starts of `out_cols` output columns in steps of `step`.
fn col_blocks(out_cols: usize, step: usize) -> impl Iterator<Item = usize> + Clone {
    (0..out_cols.div_ceil(step)).map(move |i| i * step)
}

/// Up to `tile_rows` rows of one expert and the dependencies their tiles wait on.
#[derive(Debug, Clone, Copy)]
struct RowBlock {
    row: usize,
    rows: usize,
    dep_off: i32,
    dep_cnt: i32,
}

/// `rows` rows from `row` cut into row blocks of `bm`, all with one dependency range.
fn row_blocks(row: usize, rows: usize, bm: usize, dep_off: i32, dep_cnt: i32) -> Vec<RowBlock> {
    (row..row + rows)
        .step_by(bm)
        .map(|r| RowBlock {
            row: r,
            rows: bm.min(row + rows - r),
            dep_off,
            dep_cnt,
        })
        .collect()
}

impl TileList {
    /// Appends the tiles of `blocks` (rows of `expert`) by the output
    /// columns `n0s`: column blocks inside row blocks, so neighbours share A.
    /// For a clustered variant the row blocks go in groups of the cluster
    /// size, each group's tiles of one column block consecutive (they share
    /// B), the last group padded with empty tiles (rows 0). Returns how many
    /// non-empty tiles it added.
    fn push_blocks(
        &mut self,
        v: &GemmVariant,
        expert: usize,
        blocks: &[RowBlock],
        n0s: impl Iterator<Item = usize> + Clone,
        sig: (i32, i32),
    ) -> Result<u64, KernelError> {
        let expert = to_i32(expert, "expert")?;
        let cm = v.cluster();
        let mut real = 0;
        for group in blocks.chunks(cm) {
            for n0 in n0s.clone() {
                let n0 = to_i32(n0, "column")?;
                for k in 0..cm {
                    let tile = match group.get(k) {
                        Some(b) => {
                            real += 1;
                            TileDesc {
                                expert,
                                row0: to_i32(b.row, "row")?,
                                rows: b.rows as i32,
                                n0,
                                dep_off: b.dep_off,
                                dep_cnt: b.dep_cnt,
                                sig: sig.0,
                                sig_mode: sig.1,
                            }
                        }
                        None => TileDesc {
                            expert,
                            row0: to_i32(group[0].row, "row")?,
                            rows: 0,
                            n0,
                            sig: -1,
                            ..TileDesc::default()
                        },
                    };
                    self.tiles.push(tile);
                }
            }
        }
        Ok(real)
    }

    /// Tiles of `rows` rows of `expert` from `row` by the output columns
    /// `n0s` (no hooks), cut and ordered as the kernels of `v` take them.
    pub fn push_rows(
        &mut self,
        v: &GemmVariant,
        expert: usize,
        row: usize,
        rows: usize,
        n0s: impl Iterator<Item = usize> + Clone,
    ) -> Result<(), KernelError> {
        let blocks = row_blocks(row, rows, v.tile_rows(), 0, 0);
        self.push_blocks(v, expert, &blocks, n0s, (-1, 0))
            .map(|_| ())
    }

    /// Plain grouped GEMM without hooks: experts in order (expert `e`'s rows
    /// start at the sum of earlier counts). Inside an expert, column blocks
    /// are taken in groups of [`raster_group`], and each group runs over
    /// all row blocks, so the tiles resident at one time share a few A row
    /// blocks and a few B column blocks (L2 reuse) instead of all of B.
    pub fn grouped(
        expert_rows: &[usize],
        out_cols: usize,
        v: &GemmVariant,
    ) -> Result<TileList, KernelError> {
        let bn = v.tile_out_cols();
        let group = raster_group(v);
        let ncb = out_cols.div_ceil(bn);
        let mut list = TileList::default();
        let mut start = 0usize;
        for (e, &n) in expert_rows.iter().enumerate() {
            for g0 in (0..ncb).step_by(group) {
                let n0s = (g0..(g0 + group).min(ncb)).map(|cb| cb * bn);
                list.push_rows(v, e, start, n, n0s)?;
            }
            start += n;
        }
        Ok(list)
    }

    /// Layer0 (FC1 after dispatch): each schedule tile, in schedule order,
    /// becomes GEMM tiles over all `out_cols` columns that wait on the
    /// schedule tile's dispatch signals. Rows are receive-buffer rows.
    pub fn layer0(
        sched: &Layer0Schedule,
        out_cols: usize,
        v: &GemmVariant,
    ) -> Result<TileList, KernelError> {
        let (bm, bn) = (v.tile_rows(), v.tile_out_cols());
        let group = raster_group(v);
        let ncb = out_cols.div_ceil(bn);
        let mut list = TileList::default();
        // Runs of schedule tiles that become ready together (same expert and
        // arrival step) are rastered like `grouped`: column groups outside,
        // row blocks inside. Order between runs is the schedule's.
        let tiles = &sched.tiles;
        let mut i = 0;
        while i < tiles.len() {
            let mut j = i + 1;
            while j < tiles.len()
                && tiles[j].expert == tiles[i].expert
                && tiles[j].ready_step == tiles[i].ready_step
            {
                j += 1;
            }
            let mut blocks = Vec::new();
            for t in &tiles[i..j] {
                let dep_off = to_i32(list.deps.len(), "dependency offset")?;
                list.deps.extend(t.deps.iter().copied());
                blocks.extend(row_blocks(t.row, t.rows, bm, dep_off, t.deps.len() as i32));
            }
            for g0 in (0..ncb).step_by(group) {
                let n0s = (g0..(g0 + group).min(ncb)).map(|cb| cb * bn);
                list.push_blocks(v, tiles[i].expert, &blocks, n0s, (-1, 0))?;
            }
            i = j;
        }
        Ok(list)
    }

    /// Layer1 (FC2 before combine): chunk-major schedule tiles, each cut
    /// into GEMM tiles that add one to their chunk's `chunk_done` counter.
    /// Returns, per chunk, how many raises the counter gets per call (the
    /// chunk is complete at `base + count`).
    pub fn layer1(
        sched: &Layer1Schedule,
        v: &GemmVariant,
    ) -> Result<(TileList, Vec<u64>), KernelError> {
        let (bm, bn) = (v.tile_rows(), v.tile_out_cols());
        let mut list = TileList::default();
        let mut per_chunk = vec![0u64; sched.chunks.len()];
        for t in &sched.tiles {
            let chunk = sched.chunks.get(t.chunk).ok_or_else(|| {
                KernelError::InvalidShape(format!(
                    "layer1 tile refers to chunk {} of {}",
                    t.chunk,
                    sched.chunks.len()
                ))
            })?;
            if t.cols % bn != 0 {
                return Err(KernelError::InvalidShape(format!(
                    "layer1 chunk width {} is not a multiple of the kernel's {bn} output columns",
                    t.cols
                )));
            }
            let sig = to_i32(chunk.done_signal as usize, "signal")?;
            let blocks = row_blocks(t.row, t.rows, bm, 0, 0);
            let n0s = col_blocks(t.cols, bn).map(|c| t.col + c);
            per_chunk[t.chunk] += list.push_blocks(v, t.expert, &blocks, n0s, (sig, 1))?;
        }
        Ok((list, per_chunk))
    }

    /// Checks every tile against the problem before it reaches the GPU.
    /// For a clustered variant also the grouping: each cluster's tiles share
    /// expert and columns, and only the first must have rows.
    pub fn validate(
        &self,
        total_rows: usize,
        experts: usize,
        out_cols: usize,
        v: &GemmVariant,
    ) -> Result<(), KernelError> {
        let cm = v.cluster();
        if !self.tiles.len().is_multiple_of(cm) {
            return Err(KernelError::InvalidShape(format!(
                "{} tiles: {} takes them in clusters of {cm}",
                self.tiles.len(),
                v.kernel_name()
            )));
        }
        for (i, t) in self.tiles.iter().enumerate() {
            let bad = |what: String| Err(KernelError::InvalidShape(format!("tile {i}: {what}")));
            if t.expert < 0 || t.expert as usize >= experts {
                return bad(format!("expert {} outside 0..{experts}", t.expert));
            }
            let lead = &self.tiles[i - i % cm];
            if (t.expert, t.n0) != (lead.expert, lead.n0) {
                return bad(format!(
                    "expert {} column {} differ from tile {} of its cluster (expert {} column {})",
                    t.expert,
                    t.n0,
                    i - i % cm,
                    lead.expert,
                    lead.n0
                ));
            }
            let min_rows = if i % cm == 0 { 1 } else { 0 };
            if t.rows < min_rows || t.rows as usize > v.tile_rows() {
                return bad(format!(
                    "rows {} outside {min_rows}..={}",
                    t.rows,
                    v.tile_rows()
                ));
            }
            if t.rows == 0 && (t.sig >= 0 || t.dep_cnt != 0) {
                return bad("an empty tile can neither wait nor raise".into());
            }
            if t.row0 < 0 || t.row0 as usize + t.rows as usize > total_rows {
                return bad(format!(
                    "rows {}..{} outside the {total_rows} rows of A",
                    t.row0,
                    t.row0 + t.rows
                ));
            }
            if t.n0 < 0 || t.n0 as usize >= out_cols {
                return bad(format!("column {} outside 0..{out_cols}", t.n0));
            }
            if t.dep_cnt < 0 || t.dep_off < 0 || (t.dep_off + t.dep_cnt) as usize > self.deps.len()
            {
                return bad("dependency range outside the dependency list".into());
            }
        }
        Ok(())
    }
}

/// What a [`TailPiece`] contributes; mirrors `PieceRole` in the sm90 kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceRole {
    /// All of the tile's K: stored by the epilogue.
    Whole,
    /// A part that ends before the tile's last k-block: its f32
    /// accumulators go to the CTA's workspace slot.
    Part,
    /// The part holding the tile's last k-block: adds the parts of CTAs
    /// `from..cta`, then runs the epilogue.
    Last,
}

/// K-blocks `kb0..kb1` of tile `tile`, as one CTA of a split tail runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TailPiece {
    pub tile: usize,
    pub kb0: usize,
    pub kb1: usize,
    pub role: PieceRole,
    pub from: usize,
}

/// How one launch of the persistent grid cuts the last, partial wave of its
/// tile list along K (the data-parallel + Stream-K hybrid of Osama et al.,
/// "Stream-K", PPoPP 2023). With `n` tiles on `grid` CTAs the last
/// `n % grid` tiles would leave the other CTAs idle for a whole tile; here
/// their k-blocks are dealt out in equal runs of `len` to `ctas` CTAs, and
/// a tile cut between CTAs is summed (in f32) by the CTA holding its last
/// k-block. Long-K shapes gain most: Mixtral FC2 on 132 SMs has 2048 tiles,
/// 15.5 waves, so 3% of the time was the idle half wave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TailSplit {
    /// CTAs to launch.
    pub grid: usize,
    /// First tile of the tail; the tile count when nothing is split.
    pub begin: usize,
    /// K-blocks per tail CTA (0: nothing split).
    pub len: usize,
    /// CTAs sharing the tail: each needs its workspace slot.
    pub ctas: usize,
}

impl TailSplit {
    /// Shortest run of k-blocks a CTA takes: a part's f32 round trip through
    /// L2 (128 KiB out, 128 KiB back in) costs about as much as 3-4 k-blocks
    /// of a 128 x 256 tile, so shorter parts would lose what they balance.
    pub const MIN_RUN: usize = 16;

    /// Every tile whole, grid-strided over at most `grid_cap` CTAs.
    pub fn none(num_tiles: usize, grid_cap: usize) -> TailSplit {
        TailSplit {
            grid: num_tiles.min(grid_cap).max(1),
            begin: num_tiles,
            len: 0,
            ctas: 0,
        }
    }

    /// The split of `num_tiles` tiles of `kblocks` k-blocks each on up to
    /// `grid_cap` resident CTAs; [`TailSplit::none`] where it cannot gain.
    pub fn plan(num_tiles: usize, kblocks: usize, grid_cap: usize) -> TailSplit {
        let none = TailSplit::none(num_tiles, grid_cap);
        if grid_cap == 0 || kblocks < 2 * Self::MIN_RUN {
            return none;
        }
        let tail = num_tiles % grid_cap;
        if tail == 0 {
            return none;
        }
        let work = tail * kblocks;
        let len = work.div_ceil(grid_cap).max(Self::MIN_RUN);
        // A run almost a tile long balances almost nothing.
        if len + Self::MIN_RUN / 2 > kblocks {
            return none;
        }
        let ctas = work.div_ceil(len);
        let begin = num_tiles - tail;
        TailSplit {
            grid: if begin > 0 { grid_cap } else { ctas },
            begin,
            len,
            ctas,
        }
    }

    /// The tail pieces CTA `cta` runs, in its order (the kernel's
    /// `tail_piece`): a piece that starts a tile first, since it never
    /// waits, so a [`PieceRole::Last`] only waits on CTAs whose part is
    /// the first thing they run of the tail.
    pub fn pieces(&self, num_tiles: usize, kblocks: usize, cta: usize) -> Vec<TailPiece> {
        let tail = num_tiles.saturating_sub(self.begin);
        if tail == 0 || cta >= self.ctas || self.len == 0 {
            return Vec::new();
        }
        let work = tail * kblocks;
        let r0 = cta * self.len;
        let r1 = (r0 + self.len).min(work);
        if r0 >= r1 {
            return Vec::new();
        }
        let cut = ((r0 / kblocks + 1) * kblocks).min(r1);
        let piece = |a: usize, b: usize| {
            let tl = a / kblocks;
            let (kb0, kb1) = (a - tl * kblocks, b - tl * kblocks);
            TailPiece {
                tile: self.begin + tl,
                kb0,
                kb1,
                role: if kb1 < kblocks {
                    PieceRole::Part
                } else if kb0 == 0 {
                    PieceRole::Whole
                } else {
                    PieceRole::Last
                },
                from: tl * kblocks / self.len,
            }
        };
        if cut < r1 {
            vec![piece(cut, r1), piece(r0, cut)]
        } else {
            vec![piece(r0, cut)]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::variants::{Epilogue, Family, Hooks};

    fn v(epi: Epilogue) -> GemmVariant {
        GemmVariant::new(Family::Sm80, epi, Hooks::NONE)
    }

    /// One unclustered and one clustered variant.
    fn variants(epi: Epilogue) -> [GemmVariant; 2] {
        [
            v(epi),
            GemmVariant::new(Family::SM90_CLUSTER, epi, Hooks::NONE),
        ]
    }

    /// Each cluster's tiles share expert and columns, take adjacent row
    /// blocks, and only trailing ones are empty.
    fn assert_clusters(list: &TileList, v: &GemmVariant) {
        let cm = v.cluster();
        assert_eq!(list.tiles.len() % cm, 0);
        for g in list.tiles.chunks(cm) {
            assert!(g[0].rows > 0, "{g:?}");
            for (k, t) in g.iter().enumerate().skip(1) {
                assert_eq!((t.expert, t.n0), (g[0].expert, g[0].n0), "{g:?}");
                if t.rows > 0 {
                    assert_eq!(g[k - 1].rows as usize, v.tile_rows(), "{g:?}");
                    assert_eq!(t.row0, g[k - 1].row0 + g[k - 1].rows, "{g:?}");
                } else {
                    assert!(g[k..].iter().all(|t| t.rows == 0 && t.sig < 0), "{g:?}");
                }
            }
        }
    }

    #[test]
    fn grouped_covers_every_row_and_column_once() {
        let counts = [0, 1, 127, 128, 129, 300, 256];
        let n = 320;
        for v in variants(Epilogue::Store) {
            let list = TileList::grouped(&counts, n, &v).unwrap();
            let total: usize = counts.iter().sum();
            let mut seen = vec![0u8; total * n];
            for t in &list.tiles {
                for r in t.row0..t.row0 + t.rows {
                    for c in t.n0 as usize..(t.n0 as usize + v.tile_out_cols()).min(n) {
                        seen[r as usize * n + c] += 1;
                    }
                }
            }
            assert!(seen.iter().all(|&s| s == 1), "{}", v.kernel_name());
            list.validate(total, counts.len(), n, &v).unwrap();
            assert_clusters(&list, &v);
            // rows of a tile never cross experts
            let mut start = 0;
            for (e, &c) in counts.iter().enumerate() {
                for t in list
                    .tiles
                    .iter()
                    .filter(|t| t.expert as usize == e && t.rows > 0)
                {
                    assert!(t.row0 as usize >= start && (t.row0 + t.rows) as usize <= start + c);
                }
                start += c;
            }
        }
        // 129 rows in clusters of two: one full pair per column block.
        let c2 = GemmVariant::new(Family::SM90_CLUSTER, Epilogue::Store, Hooks::NONE);
        let list = TileList::grouped(&[129], 256, &c2).unwrap();
        let rows: Vec<i32> = list.tiles.iter().map(|t| t.rows).collect();
        assert_eq!(rows, vec![128, 1]);
        let list = TileList::grouped(&[100], 512, &c2).unwrap();
        let rows: Vec<(i32, i32)> = list.tiles.iter().map(|t| (t.n0, t.rows)).collect();
        assert_eq!(rows, vec![(0, 100), (0, 0), (256, 100), (256, 0)]);
    }

    /// Every (tile, k-block) of the tail is run once; each tile has one
    /// finisher whose parts are exactly the CTAs `from..cta`, each the
    /// first tail piece of its CTA; data-parallel tiles fill whole waves.
    #[test]
    fn tail_split_covers_k_once_and_waits_only_on_first_pieces() {
        let mut split_seen = 0;
        for grid_cap in [1, 7, 132] {
            for kblocks in [1, 16, 32, 56, 64, 100, 224] {
                for n in [1, 3, 68, 131, 132, 133, 200, 2048, 7560] {
                    let s = TailSplit::plan(n, kblocks, grid_cap);
                    assert!(s.grid >= 1 && s.grid <= grid_cap);
                    assert!(s.ctas <= s.grid);
                    if s.begin == n {
                        assert_eq!(s, TailSplit::none(n, grid_cap));
                        continue;
                    }
                    assert_eq!(s.begin % s.grid, 0, "{s:?}");
                    split_seen += 1;
                    assert!(s.begin == 0 || s.grid == grid_cap, "{s:?}");
                    assert!(s.len >= TailSplit::MIN_RUN && s.len < kblocks, "{s:?}");
                    let mut count = vec![0u8; (n - s.begin) * kblocks];
                    let mut finisher = vec![None; n];
                    let mut part_of = vec![None; s.ctas];
                    for (cta, part) in part_of.iter_mut().enumerate() {
                        let ps = s.pieces(n, kblocks, cta);
                        assert!(!ps.is_empty() && ps.len() <= 2, "{s:?} cta {cta}");
                        for (i, p) in ps.iter().enumerate() {
                            assert!(p.kb0 < p.kb1 && p.kb1 <= kblocks);
                            for kb in p.kb0..p.kb1 {
                                count[(p.tile - s.begin) * kblocks + kb] += 1;
                            }
                            match p.role {
                                PieceRole::Part => {
                                    assert_eq!(i, 0, "a part runs first: {ps:?}");
                                    assert!(part.replace(p.tile).is_none());
                                }
                                _ => {
                                    assert_eq!(p.kb1, kblocks);
                                    assert!(finisher[p.tile].replace((cta, p.from)).is_none());
                                }
                            }
                        }
                    }
                    assert!(count.iter().all(|&c| c == 1), "{s:?}");
                    for (tile, fin) in finisher.iter().enumerate().skip(s.begin) {
                        let (cta, from) = fin.expect("every tile finished");
                        let parts: Vec<usize> =
                            (0..s.ctas).filter(|&c| part_of[c] == Some(tile)).collect();
                        assert_eq!(parts, (from..cta).collect::<Vec<_>>(), "tile {tile}");
                    }
                }
            }
        }
        assert!(split_seen > 20);
        // Mixtral FC2 on 132 SMs: 15 whole waves, 68 tiles of 224 k-blocks
        // over all 132 CTAs in runs of 116.
        let s = TailSplit::plan(2048, 224, 132);
        assert_eq!((s.grid, s.begin, s.len, s.ctas), (132, 1980, 116, 132));
        // A shape whose tiles fill waves exactly is left alone.
        assert_eq!(TailSplit::plan(264, 224, 132), TailSplit::none(264, 132));
    }

    #[test]
    fn swiglu_tiles_step_half_width() {
        let list = TileList::grouped(&[5], 128, &v(Epilogue::SwiGlu)).unwrap();
        assert_eq!(
            list.tiles.iter().map(|t| t.n0).collect::<Vec<_>>(),
            vec![0, 64]
        );
    }

    #[test]
    fn validate_rejects_bad_tiles() {
        let mut list = TileList::grouped(&[10], 128, &v(Epilogue::Store)).unwrap();
        list.tiles[0].expert = 3;
        assert!(list.validate(10, 1, 128, &v(Epilogue::Store)).is_err());
        let mut list = TileList::grouped(&[10], 128, &v(Epilogue::Store)).unwrap();
        list.tiles[0].dep_cnt = 2;
        assert!(list.validate(10, 1, 128, &v(Epilogue::Store)).is_err());
        // Clusters: the pair must share columns, an empty tile cannot lead
        // or raise, and the count must be whole pairs.
        let c2 = GemmVariant::new(Family::SM90_CLUSTER, Epilogue::Store, Hooks::NONE);
        let good = TileList::grouped(&[300], 512, &c2).unwrap();
        good.validate(300, 1, 512, &c2).unwrap();
        let mut list = good.clone();
        list.tiles[1].n0 = 256;
        let e = list.validate(300, 1, 512, &c2).unwrap_err().to_string();
        assert!(e.contains("tile 1") && e.contains("column"), "{e}");
        let mut list = good.clone();
        list.tiles.swap(4, 5);
        assert!(list.validate(300, 1, 512, &c2).is_err());
        let mut list = good.clone();
        list.tiles[5].sig = 3;
        assert!(list.validate(300, 1, 512, &c2).is_err());
        let mut list = good;
        list.tiles.pop();
        let e = list.validate(300, 1, 512, &c2).unwrap_err().to_string();
        assert!(e.contains("clusters of 2"), "{e}");
        // The unclustered kernels never take empty tiles.
        let mut list = TileList::grouped(&[10], 128, &v(Epilogue::Store)).unwrap();
        list.tiles[0].rows = 0;
        assert!(list.validate(10, 1, 128, &v(Epilogue::Store)).is_err());
    }

    #[test]
    fn layer_schedules_become_tiles() {
        use comet_core::schedule::{SignalMap, TileShape};
        use comet_core::{LayoutPlan, Preset, Routing, RoutingKind};
        let cfg = Preset::Mixtral8x7b.config(2).unwrap().scaled_down(8);
        let routings: Vec<Routing> = (0..2)
            .map(|r| Routing::generate(&cfg, r, 300, RoutingKind::Uniform, 7))
            .collect();
        let plan = LayoutPlan::from_routings(&cfg, &routings).unwrap();
        let shape = TileShape {
            bm: 128,
            chunk_cols: cfg.hidden / 2,
            groups: 1,
        };
        let signals = SignalMap::new(&cfg, shape.pieces(&cfg));
        let l0 = Layer0Schedule::new(&plan, 0, shape, &signals);
        for v0 in variants(Epilogue::SwiGlu) {
            let list = TileList::layer0(&l0, cfg.ffn, &v0).unwrap();
            let rows0 = plan.recv[0].total_rows;
            list.validate(rows0, cfg.experts_per_rank(), cfg.ffn, &v0)
                .unwrap();
            assert_clusters(&list, &v0);
            assert!(list.tiles.iter().all(|t| t.dep_cnt > 0 || t.rows == 0));
            // Every receive row x output column block exactly once.
            let ncb = cfg.ffn.div_ceil(v0.tile_out_cols());
            let mut seen = vec![0u8; rows0 * ncb];
            for t in &list.tiles {
                for r in t.row0..t.row0 + t.rows {
                    seen[r as usize * ncb + t.n0 as usize / v0.tile_out_cols()] += 1;
                }
            }
            assert!(seen.iter().all(|&s| s == 1), "{}", v0.kernel_name());
            // A GEMM tile waits on the same signals as its schedule tile.
            for st in &l0.tiles {
                for t in list.tiles.iter().filter(|t| {
                    t.rows > 0 && t.row0 as usize >= st.row && (t.row0 as usize) < st.row + st.rows
                }) {
                    let deps = &list.deps[t.dep_off as usize..(t.dep_off + t.dep_cnt) as usize];
                    assert_eq!(deps, &st.deps[..]);
                }
            }
        }
        let l1 = Layer1Schedule::new(&plan, 0, shape, &signals);
        for v1 in variants(Epilogue::Store) {
            let (list1, per_chunk) = TileList::layer1(&l1, &v1).unwrap();
            assert_clusters(&list1, &v1);
            let real: Vec<&TileDesc> = list1.tiles.iter().filter(|t| t.rows > 0).collect();
            assert_eq!(per_chunk.iter().sum::<u64>() as usize, real.len());
            assert!(real.iter().all(|t| t.sig_mode == 1 && t.sig >= 0));
        }
    }
}
