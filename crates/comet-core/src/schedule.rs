//! Tile schedules of the two fused layers and the signal map they share
//! with the transports (DESIGN.md sections 1 and 4).
//!
//! Layer0 (dispatch -> FC1 -> SwiGLU): the receive buffer is cut by rows;
//! a tile of `bm` rows of one expert depends exactly on the segments
//! `(expert, src)` its rows overlap, and tiles are ordered by the arrival
//! step of their latest segment, so local rows are computed while remote
//! ones are still on the wire.
//!
//! Layer1 (FC2 -> combine): the output is cut by columns; every expert's
//! tiles of column chunk c come before chunk c+1, so chunk c is sent while
//! c+1 computes. Each chunk counts its finished tiles on a local counter
//! and, once complete, raises one combine signal on every source it feeds.
//! With expert groups ([`TileShape::groups`]) both layers run group by
//! group and layer1's chunks are pieces (group, column chunk), group-major.

use crate::config::MoeConfig;
use crate::error::CoreError;
use crate::layout::LayoutPlan;

/// A signal of the map, numbered from 0 (`SignalMap::dispatch`, `combine`,
/// `chunk_done`). Not the index the transports take: see [`WireSignal`].
pub type SignalId = u32;

/// Index of a 64-bit word in a rank's signal array as the transports see it.
///
/// The array holds the count exchange's `ranks` words first (word `src` is
/// raised by rank `src`), then the map's signals; so a map id and a wire
/// index are two integer spaces, and [`SignalMap::wire`] is the one place
/// that turns the first into the second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WireSignal(u32);

impl WireSignal {
    /// The count-exchange word that rank `src` raises on every rank.
    pub fn exchange(src: usize) -> WireSignal {
        WireSignal(src as u32)
    }
    /// The word's index in the signal array, as the transports take it.
    pub fn index(self) -> u32 {
        self.0
    }
}

/// How the signal array of every rank is laid out; identical on all ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignalMap {
    pub ranks: usize,
    pub experts_per_rank: usize,
    pub chunks: usize,
}

impl SignalMap {
    pub fn new(cfg: &MoeConfig, chunks: usize) -> SignalMap {
        SignalMap {
            ranks: cfg.ranks,
            experts_per_rank: cfg.experts_per_rank(),
            chunks,
        }
    }
    /// On a destination: segment `(local expert, src)` has landed.
    pub fn dispatch(&self, expert: usize, src: usize) -> SignalId {
        (expert * self.ranks + src) as SignalId
    }
    /// On a source: expert rank `from` has delivered column chunk `chunk`.
    pub fn combine(&self, from: usize, chunk: usize) -> SignalId {
        (self.experts_per_rank * self.ranks + from * self.chunks + chunk) as SignalId
    }
    /// Local counter: finished layer1 tiles of `chunk`.
    pub fn chunk_done(&self, chunk: usize) -> SignalId {
        (self.experts_per_rank * self.ranks + self.ranks * self.chunks + chunk) as SignalId
    }
    pub fn len(&self) -> usize {
        self.experts_per_rank * self.ranks + self.ranks * self.chunks + self.chunks
    }
    /// Where map signal `id` lies in the signal array: after the `ranks`
    /// count-exchange words.
    pub fn wire(&self, id: SignalId) -> WireSignal {
        WireSignal(self.ranks as u32 + id)
    }
    /// Words of the whole signal array: the count exchange's, then the map's.
    pub fn wire_len(&self) -> usize {
        self.ranks + self.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The first of `experts_per_rank` local experts in expert group `g` of
/// `groups`: group g holds `g * epr / groups` up to `(g + 1) * epr / groups`,
/// as the device kernels split them (`moe_forward.cu`'s `group_lo`).
pub fn group_lo(experts_per_rank: usize, groups: usize, g: usize) -> usize {
    g * experts_per_rank / groups.max(1)
}

/// Tile sizes chosen by the planner (cost model or autotune).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileShape {
    /// Rows per GEMM tile.
    pub bm: usize,
    /// Output columns per layer1 chunk (divides `hidden`).
    pub chunk_cols: usize,
    /// Expert groups of each rank's local experts (1 to experts per rank):
    /// layer0 and layer1 run group by group, FC1(g0), FC2(g0), FC1(g1),
    /// ..., and layer1's pieces are (group, column chunk), piece
    /// `g * chunks + c`, so a group's combine leaves beside the later
    /// groups' GEMMs (docs/ARCHITECTURE.md, "What is overlapped").
    pub groups: usize,
}

impl TileShape {
    pub fn validate(&self, cfg: &MoeConfig) -> Result<(), CoreError> {
        if self.bm == 0 {
            return Err(CoreError::InvalidConfig {
                field: "bm",
                problem: "must be > 0".into(),
            });
        }
        if self.chunk_cols == 0 || !cfg.hidden.is_multiple_of(self.chunk_cols) {
            return Err(CoreError::InvalidConfig {
                field: "chunk_cols",
                problem: format!("{} does not divide hidden {}", self.chunk_cols, cfg.hidden),
            });
        }
        let epr = cfg.experts_per_rank();
        if self.groups == 0 || self.groups > epr {
            return Err(CoreError::InvalidConfig {
                field: "groups",
                problem: format!("{} expert groups of {epr} local experts", self.groups),
            });
        }
        Ok(())
    }
    pub fn chunks(&self, cfg: &MoeConfig) -> usize {
        cfg.hidden / self.chunk_cols
    }
    /// Layer1 pieces a rank sends each source: groups x column chunks (the
    /// [`SignalMap`]'s `chunks`).
    pub fn pieces(&self, cfg: &MoeConfig) -> usize {
        self.chunks(cfg) * self.groups
    }
    /// The first local expert of expert group `g` ([`group_lo`]).
    pub fn group_lo(&self, cfg: &MoeConfig, g: usize) -> usize {
        group_lo(cfg.experts_per_rank(), self.groups, g)
    }
    /// The expert group of local expert `le`.
    pub fn group_of(&self, cfg: &MoeConfig, le: usize) -> usize {
        (0..self.groups)
            .rfind(|&g| self.group_lo(cfg, g) <= le)
            .unwrap_or(0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer0Tile {
    /// Local expert.
    pub expert: usize,
    pub row: usize,
    pub rows: usize,
    /// Dispatch signals this tile waits on (each for `>= epoch`).
    pub deps: Vec<SignalId>,
    /// Arrival step of the latest dependency (0 = only local rows).
    pub ready_step: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer0Schedule {
    pub rank: usize,
    pub tiles: Vec<Layer0Tile>,
}

impl Layer0Schedule {
    pub fn new(
        plan: &LayoutPlan,
        rank: usize,
        shape: TileShape,
        signals: &SignalMap,
    ) -> Layer0Schedule {
        let w = plan.cfg.ranks;
        let layout = &plan.recv[rank];
        let mut tiles = Vec::new();
        for le in 0..plan.cfg.experts_per_rank() {
            let (start, n) = (layout.expert_row[le], layout.expert_rows[le]);
            let segs = &layout.segments[le * w..(le + 1) * w];
            let mut row = start;
            while row < start + n {
                let rows = shape.bm.min(start + n - row);
                let overlapping = segs
                    .iter()
                    .filter(|s| s.rows > 0 && s.row < row + rows && row < s.row + s.rows);
                let mut deps = Vec::new();
                let mut ready_step = 0;
                for s in overlapping {
                    deps.push(signals.dispatch(le, s.src));
                    ready_step = ready_step.max(layout.arrival_step(s.src, w));
                }
                tiles.push(Layer0Tile {
                    expert: le,
                    row,
                    rows,
                    deps,
                    ready_step,
                });
                row += rows;
            }
        }
        // Group by group (the compute runs FC1 of a group, then its FC2),
        // arrival steps inside; stable: equal steps keep expert-major order.
        tiles.sort_by_key(|t| (shape.group_of(&plan.cfg, t.expert), t.ready_step));
        Layer0Schedule { rank, tiles }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layer1Tile {
    pub expert: usize,
    pub row: usize,
    pub rows: usize,
    /// Its layer1 piece ([`TileShape::pieces`]; with one group, the chunk).
    pub chunk: usize,
    pub col: usize,
    pub cols: usize,
}

/// One block of combined rows: rows `[row, row + rows)` of this rank's
/// FC2 output, columns of the chunk, go to `dst` at `dst_pos` in its send
/// order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CombineSend {
    pub dst: usize,
    pub row: usize,
    pub rows: usize,
    pub dst_pos: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer1Chunk {
    /// The piece: column chunk `index % chunks` of expert group
    /// `index / chunks` (with one group, the column chunk).
    pub index: usize,
    pub col: usize,
    pub cols: usize,
    /// Tiles that must finish before the chunk leaves.
    pub tiles: usize,
    /// Counter the tiles raise; the chunk leaves at `base + tiles`.
    pub done_signal: SignalId,
    /// Sends grouped by destination, destinations in ring order.
    pub sends: Vec<CombineSend>,
    /// `(dst, signal on dst)` raised once this chunk's sends to dst are out.
    pub raises: Vec<(usize, SignalId)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer1Schedule {
    pub rank: usize,
    pub tiles: Vec<Layer1Tile>,
    pub chunks: Vec<Layer1Chunk>,
}

impl Layer1Schedule {
    pub fn new(
        plan: &LayoutPlan,
        rank: usize,
        shape: TileShape,
        signals: &SignalMap,
    ) -> Layer1Schedule {
        let cfg = &plan.cfg;
        let w = cfg.ranks;
        let layout = &plan.recv[rank];
        let nchunks = shape.chunks(cfg);
        let mut tiles = Vec::new();
        let mut chunks = Vec::with_capacity(shape.pieces(cfg));
        // Piece j: column chunk c of expert group g's rows, groups first.
        for j in 0..shape.pieces(cfg) {
            let (g, c) = (j / nchunks, j % nchunks);
            let group = shape.group_lo(cfg, g)..shape.group_lo(cfg, g + 1);
            let col = c * shape.chunk_cols;
            let before = tiles.len();
            for le in group.clone() {
                let (start, n) = (layout.expert_row[le], layout.expert_rows[le]);
                let mut row = start;
                while row < start + n {
                    let rows = shape.bm.min(start + n - row);
                    tiles.push(Layer1Tile {
                        expert: le,
                        row,
                        rows,
                        chunk: j,
                        col,
                        cols: shape.chunk_cols,
                    });
                    row += rows;
                }
            }
            let mut sends = Vec::new();
            let mut raises = Vec::new();
            for i in 0..w {
                let dst = crate::layout::ring_dest(rank, i, w);
                if plan.rows_between(dst, rank) == 0 {
                    continue;
                }
                for le in group.clone() {
                    let seg = layout.segment(le, dst, w);
                    if seg.rows > 0 {
                        let dst_pos = plan.send_offset(dst, cfg.global_expert(rank, le));
                        sends.push(CombineSend {
                            dst,
                            row: seg.row,
                            rows: seg.rows,
                            dst_pos,
                        });
                    }
                }
                raises.push((dst, signals.combine(rank, j)));
            }
            chunks.push(Layer1Chunk {
                index: j,
                col,
                cols: shape.chunk_cols,
                tiles: tiles.len() - before,
                done_signal: signals.chunk_done(j),
                sends,
                raises,
            });
        }
        Layer1Schedule {
            rank,
            tiles,
            chunks,
        }
    }
}

/// The combine signals a source waits on for layer1 piece `chunk` (with one
/// expert group, the column chunk): one per expert rank it sent rows to.
pub fn combine_waits(
    plan: &LayoutPlan,
    src: usize,
    chunk: usize,
    signals: &SignalMap,
) -> Vec<SignalId> {
    (0..plan.cfg.ranks)
        .filter(|&d| plan.rows_between(src, d) > 0)
        .map(|d| signals.combine(d, chunk))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Preset;
    use crate::routing::{Routing, RoutingKind};

    fn plan(w: usize, kind: RoutingKind) -> LayoutPlan {
        let cfg = Preset::Small.config(w).unwrap();
        let routings: Vec<Routing> = (0..w)
            .map(|r| Routing::generate(&cfg, r, 61, kind, 5))
            .collect();
        LayoutPlan::from_routings(&cfg, &routings).unwrap()
    }

    #[test]
    fn wire_words_are_the_exchange_then_the_map_without_overlap() {
        let cfg = Preset::Small.config(4).unwrap();
        let map = SignalMap::new(&cfg, 3);
        let mut words: Vec<u32> = (0..cfg.ranks)
            .map(|src| WireSignal::exchange(src).index())
            .collect();
        words.extend((0..map.len() as SignalId).map(|id| map.wire(id).index()));
        let want: Vec<u32> = (0..map.wire_len() as u32).collect();
        assert_eq!(words, want);
        assert_eq!(map.wire(map.dispatch(0, 0)).index(), cfg.ranks as u32);
    }

    #[test]
    fn layer0_deps_are_exact_and_ordered() {
        let p = plan(4, RoutingKind::Uniform);
        let sig = SignalMap::new(&p.cfg, 4);
        let shape = TileShape {
            bm: 16,
            chunk_cols: 64,
            groups: 1,
        };
        for rank in 0..4 {
            let s = Layer0Schedule::new(&p, rank, shape, &sig);
            let covered: usize = s.tiles.iter().map(|t| t.rows).sum();
            assert_eq!(covered, p.recv[rank].total_rows);
            assert!(s
                .tiles
                .windows(2)
                .all(|w| w[0].ready_step <= w[1].ready_step));
            for t in &s.tiles {
                // A dep for every non-empty segment the rows touch, no others.
                for seg in &p.recv[rank].segments {
                    let touches = seg.expert == t.expert
                        && seg.rows > 0
                        && seg.row < t.row + t.rows
                        && t.row < seg.row + seg.rows;
                    assert_eq!(touches, t.deps.contains(&sig.dispatch(seg.expert, seg.src)));
                }
            }
        }
    }

    #[test]
    fn layer1_chunks_are_column_major_and_cover_everything() {
        let p = plan(4, RoutingKind::Zipf(1.2));
        let shape = TileShape {
            bm: 16,
            chunk_cols: 64,
            groups: 1,
        };
        let sig = SignalMap::new(&p.cfg, shape.pieces(&p.cfg));
        for rank in 0..4 {
            let s = Layer1Schedule::new(&p, rank, shape, &sig);
            assert!(s.tiles.windows(2).all(|w| w[0].chunk <= w[1].chunk));
            for c in &s.chunks {
                let rows: usize = s
                    .tiles
                    .iter()
                    .filter(|t| t.chunk == c.index)
                    .map(|t| t.rows)
                    .sum();
                assert_eq!(rows, p.recv[rank].total_rows);
                let sent: usize = c.sends.iter().map(|x| x.rows).sum();
                assert_eq!(sent, p.recv[rank].total_rows);
                // The chunk leaves after exactly its own tiles: one per BM
                // rows (rounded up) of every local expert, counted here
                // independently of the schedule, and the same number of
                // tiles in the list carry this chunk's columns.
                let want: usize = p.recv[rank]
                    .expert_rows
                    .iter()
                    .map(|&n| n.div_ceil(shape.bm))
                    .sum();
                assert_eq!(c.tiles, want, "rank {rank} chunk {}", c.index);
                let listed: Vec<&Layer1Tile> =
                    s.tiles.iter().filter(|t| t.chunk == c.index).collect();
                assert_eq!(listed.len(), c.tiles, "rank {rank} chunk {}", c.index);
                assert!(listed
                    .iter()
                    .all(|t| t.col == c.col && t.cols == c.cols && t.rows <= shape.bm));
            }
        }
        // Every source waits exactly on the ranks that raise its signals.
        for src in 0..4 {
            for c in 0..sig.chunks {
                let waits = combine_waits(&p, src, c, &sig);
                let raised: Vec<SignalId> = (0..4)
                    .flat_map(|d| {
                        Layer1Schedule::new(&p, d, shape, &sig).chunks[c]
                            .raises
                            .clone()
                    })
                    .filter(|&(dst, _)| dst == src)
                    .map(|(_, s)| s)
                    .collect();
                let (mut a, mut b) = (waits.clone(), raised);
                a.sort();
                b.sort();
                assert_eq!(a, b);
            }
        }
    }

    #[test]
    fn signal_ids_are_distinct() {
        let cfg = Preset::Qwen2Moe.config(8).unwrap();
        let m = SignalMap::new(&cfg, 7);
        let mut all = Vec::new();
        for e in 0..m.experts_per_rank {
            for s in 0..8 {
                all.push(m.dispatch(e, s));
            }
        }
        for r in 0..8 {
            for c in 0..7 {
                all.push(m.combine(r, c));
            }
        }
        for c in 0..7 {
            all.push(m.chunk_done(c));
        }
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n);
        assert_eq!(n, m.len());
    }

    #[test]
    fn bad_tile_shape() {
        let cfg = Preset::Small.config(2).unwrap();
        assert!(TileShape {
            bm: 0,
            chunk_cols: 64,
            groups: 1
        }
        .validate(&cfg)
        .is_err());
        assert!(TileShape {
            bm: 64,
            chunk_cols: 100,
            groups: 1
        }
        .validate(&cfg)
        .is_err());
    }
}
