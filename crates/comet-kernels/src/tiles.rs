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
fn col_blocks(out_cols: usize, step: usize) -> impl Iterator<Item = usize> {
    (0..out_cols.div_ceil(step)).map(move |i| i * step)
}

impl TileList {
    /// Plain grouped GEMM without hooks: experts in order (expert `e`'s rows
    /// start at the sum of earlier counts). Inside an expert, column blocks
    /// are taken in groups of [`raster_group`] and row blocks run fastest
    /// within a group, so the tiles resident at one time share a few A row
    /// blocks and a few B column blocks (L2 reuse) instead of all of B.
    pub fn grouped(
        expert_rows: &[usize],
        out_cols: usize,
        v: &GemmVariant,
    ) -> Result<TileList, KernelError> {
        let (bm, bn) = (v.tile_rows(), v.tile_out_cols());
        let group = raster_group(v);
        let ncb = out_cols.div_ceil(bn);
        let mut tiles = Vec::new();
        let mut start = 0usize;
        for (e, &n) in expert_rows.iter().enumerate() {
            for g0 in (0..ncb).step_by(group) {
                let mut row = start;
                while row < start + n {
                    let rows = bm.min(start + n - row);
                    for cb in g0..(g0 + group).min(ncb) {
                        tiles.push(TileDesc {
                            expert: to_i32(e, "expert")?,
                            row0: to_i32(row, "row")?,
                            rows: rows as i32,
                            n0: to_i32(cb * bn, "column")?,
                            sig: -1,
                            ..TileDesc::default()
                        });
                    }
                    row += rows;
                }
            }
            start += n;
        }
        Ok(TileList {
            tiles,
            deps: Vec::new(),
        })
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
            // (row, rows, dep_off, dep_cnt) of every row block in the run.
            let mut blocks = Vec::new();
            for t in &tiles[i..j] {
                let dep_off = to_i32(list.deps.len(), "dependency offset")?;
                list.deps.extend(t.deps.iter().copied());
                let mut row = t.row;
                while row < t.row + t.rows {
                    let rows = bm.min(t.row + t.rows - row);
                    blocks.push((row, rows, dep_off, t.deps.len() as i32));
                    row += rows;
                }
            }
            let expert = to_i32(tiles[i].expert, "expert")?;
            for g0 in (0..ncb).step_by(group) {
                for &(row, rows, dep_off, dep_cnt) in &blocks {
                    for cb in g0..(g0 + group).min(ncb) {
                        list.tiles.push(TileDesc {
                            expert,
                            row0: to_i32(row, "row")?,
                            rows: rows as i32,
                            n0: to_i32(cb * bn, "column")?,
                            dep_off,
                            dep_cnt,
                            sig: -1,
                            sig_mode: 0,
                        });
                    }
                }
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
            let mut row = t.row;
            while row < t.row + t.rows {
                let rows = bm.min(t.row + t.rows - row);
                for c in col_blocks(t.cols, bn) {
                    list.tiles.push(TileDesc {
                        expert: to_i32(t.expert, "expert")?,
                        row0: to_i32(row, "row")?,
                        rows: rows as i32,
                        n0: to_i32(t.col + c, "column")?,
                        dep_off: 0,
                        dep_cnt: 0,
                        sig: to_i32(chunk.done_signal as usize, "signal")?,
                        sig_mode: 1,
                    });
                    per_chunk[t.chunk] += 1;
                }
                row += rows;
            }
            if t.cols % bn != 0 {
                return Err(KernelError::InvalidShape(format!(
                    "layer1 chunk width {} is not a multiple of the kernel's {bn} output columns",
                    t.cols
                )));
            }
        }
        Ok((list, per_chunk))
    }

    /// Checks every tile against the problem before it reaches the GPU.
    pub fn validate(
        &self,
        total_rows: usize,
        experts: usize,
        out_cols: usize,
        v: &GemmVariant,
    ) -> Result<(), KernelError> {
        for (i, t) in self.tiles.iter().enumerate() {
            let bad = |what: String| Err(KernelError::InvalidShape(format!("tile {i}: {what}")));
            if t.expert < 0 || t.expert as usize >= experts {
                return bad(format!("expert {} outside 0..{experts}", t.expert));
            }
            if t.rows < 1 || t.rows as usize > v.tile_rows() {
                return bad(format!("rows {} outside 1..={}", t.rows, v.tile_rows()));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::variants::{Epilogue, Family, Hooks};

    fn v(epi: Epilogue) -> GemmVariant {
        GemmVariant::new(Family::Sm80, epi, Hooks::NONE)
    }

    #[test]
    fn grouped_covers_every_row_and_column_once() {
        let counts = [0, 1, 127, 128, 129, 300];
        let n = 320;
        let list = TileList::grouped(&counts, n, &v(Epilogue::Store)).unwrap();
        let total: usize = counts.iter().sum();
        let mut seen = vec![0u8; total * n];
        for t in &list.tiles {
            for r in t.row0..t.row0 + t.rows {
                for c in t.n0 as usize..(t.n0 as usize + 128).min(n) {
                    seen[r as usize * n + c] += 1;
                }
            }
        }
        assert!(seen.iter().all(|&s| s == 1));
        list.validate(total, counts.len(), n, &v(Epilogue::Store))
            .unwrap();
        // rows of a tile never cross experts
        let mut start = 0;
        for (e, &c) in counts.iter().enumerate() {
            for t in list.tiles.iter().filter(|t| t.expert as usize == e) {
                assert!(t.row0 as usize >= start && (t.row0 + t.rows) as usize <= start + c);
            }
            start += c;
        }
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
    }

    #[test]
    fn layer_schedules_become_tiles() {
        use comet_core::schedule::{SignalMap, TileShape};
        use comet_core::{LayoutPlan, Preset, Routing, RoutingKind};
        let cfg = Preset::Mixtral8x7b.config(2).unwrap().scaled_down(16);
        let routings: Vec<Routing> = (0..2)
            .map(|r| Routing::generate(&cfg, r, 300, RoutingKind::Uniform, 7))
            .collect();
        let plan = LayoutPlan::from_routings(&cfg, &routings).unwrap();
        let shape = TileShape {
            bm: 128,
            chunk_cols: cfg.hidden / 2,
        };
        let signals = SignalMap::new(&cfg, shape.chunks(&cfg));
        let l0 = Layer0Schedule::new(&plan, 0, shape, &signals);
        let list = TileList::layer0(&l0, cfg.ffn, &v(Epilogue::SwiGlu)).unwrap();
        let rows0 = plan.recv[0].total_rows;
        list.validate(rows0, cfg.experts_per_rank(), cfg.ffn, &v(Epilogue::SwiGlu))
            .unwrap();
        assert!(list.tiles.iter().all(|t| t.dep_cnt > 0));
        // Every receive row x output column block exactly once.
        let ncb = cfg.ffn.div_ceil(v(Epilogue::SwiGlu).tile_out_cols());
        let mut seen = vec![0u8; rows0 * ncb];
        for t in &list.tiles {
            for r in t.row0..t.row0 + t.rows {
                seen[r as usize * ncb + t.n0 as usize / 64] += 1;
            }
        }
        assert!(seen.iter().all(|&s| s == 1));
        // A GEMM tile waits on the same signals as its schedule tile.
        for st in &l0.tiles {
            for t in list
                .tiles
                .iter()
                .filter(|t| t.row0 as usize >= st.row && (t.row0 as usize) < st.row + st.rows)
            {
                let deps = &list.deps[t.dep_off as usize..(t.dep_off + t.dep_cnt) as usize];
                assert_eq!(deps, &st.deps[..]);
            }
        }
        let l1 = Layer1Schedule::new(&plan, 0, shape, &signals);
        let (list1, per_chunk) = TileList::layer1(&l1, &v(Epilogue::Store)).unwrap();
        assert_eq!(per_chunk.iter().sum::<u64>() as usize, list1.tiles.len());
        assert!(list1.tiles.iter().all(|t| t.sig_mode == 1 && t.sig >= 0));
    }
}
