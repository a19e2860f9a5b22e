//! The layout plan (DESIGN.md section 3).
//!
//! After routing, every rank holds the same W x E count matrix
//! `counts[src][e]`. From it alone each rank derives, identically, where
//! every row lives on every destination: expert-major receive buffers, and
//! inside an expert one segment per source, the destination's own rows
//! first and the other sources in ring order (the order in which their
//! rows are expected to arrive). Senders therefore write straight into the
//! final place and the receiver needs no permutation.

use crate::config::MoeConfig;
use crate::error::CoreError;
use crate::routing::Routing;

/// The rows one source sends to one local expert of a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Local expert index on the destination.
    pub expert: usize,
    pub src: usize,
    /// First row in the destination's receive buffer.
    pub row: usize,
    pub rows: usize,
}

/// One destination's receive buffer layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecvLayout {
    /// The destination rank this layout belongs to.
    pub rank: usize,
    /// First row of each local expert.
    pub expert_row: Vec<usize>,
    /// Rows of each local expert.
    pub expert_rows: Vec<usize>,
    /// Segments, expert-major then in arrival order of sources.
    pub segments: Vec<Segment>,
    pub total_rows: usize,
}

impl RecvLayout {
    /// The segment of `(local expert, src)`.
    pub fn segment(&self, expert: usize, src: usize, ranks: usize) -> &Segment {
        // Segments are expert-major with exactly `ranks` per expert, sources
        // in ring order: position i holds `ring_source(rank, i)`.
        let pos = (self.rank + ranks - src) % ranks;
        &self.segments[expert * ranks + pos]
    }

    /// Arrival position (0 = local) of `src` at this destination.
    pub fn arrival_step(&self, src: usize, ranks: usize) -> usize {
        (self.rank + ranks - src) % ranks
    }
}

/// The i-th source in arrival order at destination `dst`: itself first, then
/// `dst-1, dst-2, ...` because sender `s` targets `s+1, s+2, ...` in turn,
/// so at step i every sender writes to a different destination.
pub fn ring_source(dst: usize, i: usize, ranks: usize) -> usize {
    (dst + ranks - i % ranks) % ranks
}

/// The i-th destination in the send order of `src`: itself, then `src+1, ...`.
pub fn ring_dest(src: usize, i: usize, ranks: usize) -> usize {
    (src + i) % ranks
}

/// The plan every rank computes from the count matrix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutPlan {
    pub cfg: MoeConfig,
    /// `counts[src][e]`: rows `src` sends to global expert `e`.
    pub counts: Vec<Vec<usize>>,
    /// One receive layout per destination rank.
    pub recv: Vec<RecvLayout>,
}

/// Where one `(token, j)` pair of a source goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Destination {
    pub rank: usize,
    pub row: usize,
}

impl LayoutPlan {
    pub fn new(cfg: &MoeConfig, counts: Vec<Vec<usize>>) -> Result<LayoutPlan, CoreError> {
        cfg.validate()?;
        let w = cfg.ranks;
        if counts.len() != w {
            return Err(CoreError::BadCounts(format!(
                "{} rows for {w} ranks",
                counts.len()
            )));
        }
        if let Some((s, row)) = counts
            .iter()
            .enumerate()
            .find(|(_, r)| r.len() != cfg.experts)
        {
            return Err(CoreError::BadCounts(format!(
                "rank {s} has {} columns for {} experts",
                row.len(),
                cfg.experts
            )));
        }
        let epr = cfg.experts_per_rank();
        let recv = (0..w)
            .map(|dst| {
                let mut expert_row = Vec::with_capacity(epr);
                let mut expert_rows = Vec::with_capacity(epr);
                let mut segments = Vec::with_capacity(epr * w);
                let mut row = 0;
                for le in 0..epr {
                    let e = cfg.global_expert(dst, le);
                    expert_row.push(row);
                    let start = row;
                    for i in 0..w {
                        let src = ring_source(dst, i, w);
                        let rows = counts[src][e];
                        segments.push(Segment {
                            expert: le,
                            src,
                            row,
                            rows,
                        });
                        row += rows;
                    }
                    expert_rows.push(row - start);
                }
                RecvLayout {
                    rank: dst,
                    expert_row,
                    expert_rows,
                    segments,
                    total_rows: row,
                }
            })
            .collect();
        Ok(LayoutPlan {
            cfg: cfg.clone(),
            counts,
            recv,
        })
    }

    /// The plan from every rank's routing (what the count exchange yields).
    pub fn from_routings(cfg: &MoeConfig, routings: &[Routing]) -> Result<LayoutPlan, CoreError> {
        let counts = routings
            .iter()
            .map(|r| r.counts_per_expert(cfg.experts))
            .collect();
        LayoutPlan::new(cfg, counts)
    }

    /// For every `(token, j)` of `src` (in `token * k + j` order), its
    /// destination. Inside a segment rows keep the source's slot order.
    pub fn dispatch_map(
        &self,
        src: usize,
        routing: &Routing,
    ) -> Result<Vec<Destination>, CoreError> {
        routing.validate(&self.cfg)?;
        let expect = &self.counts[src];
        if routing.counts_per_expert(self.cfg.experts) != *expect {
            return Err(CoreError::BadCounts(format!(
                "rank {src}'s routing disagrees with the count matrix"
            )));
        }
        let w = self.cfg.ranks;
        let epr = self.cfg.experts_per_rank();
        let mut next: Vec<usize> = (0..self.cfg.experts)
            .map(|e| {
                let dst = e / epr;
                self.recv[dst].segment(e % epr, src, w).row
            })
            .collect();
        Ok(routing
            .ids
            .iter()
            .map(|&e| {
                let e = e as usize;
                let row = next[e];
                next[e] += 1;
                Destination { rank: e / epr, row }
            })
            .collect())
    }

    /// Position of global expert `e`'s first row in `src`'s send order
    /// (global expert order, slot order inside). The combine buffer of
    /// `src` is laid out in this order, so each segment comes back as one
    /// contiguous block and the source un-permutes with its own dispatch map.
    pub fn send_offset(&self, src: usize, e: usize) -> usize {
        self.counts[src][..e].iter().sum()
    }

    /// Rows `src` sends in total (its `tokens * k`).
    pub fn rows_sent(&self, src: usize) -> usize {
        self.counts[src].iter().sum()
    }

    /// For every `(token, j)` slot of `src`, its position in `src`'s send
    /// order (where its expert output lands in the combine buffer).
    pub fn send_positions(&self, src: usize, routing: &Routing) -> Result<Vec<usize>, CoreError> {
        routing.validate(&self.cfg)?;
        if routing.counts_per_expert(self.cfg.experts) != self.counts[src] {
            return Err(CoreError::BadCounts(format!(
                "rank {src}'s routing disagrees with the count matrix"
            )));
        }
        let mut next: Vec<usize> = (0..self.cfg.experts)
            .map(|e| self.send_offset(src, e))
            .collect();
        Ok(routing
            .ids
            .iter()
            .map(|&e| {
                let p = next[e as usize];
                next[e as usize] += 1;
                p
            })
            .collect())
    }

    /// The combine map of destination `dst`: received row -> (source rank,
    /// position in that source's send order).
    pub fn combine_map(&self, dst: usize) -> Vec<(usize, usize)> {
        let layout = &self.recv[dst];
        let mut out = vec![(0, 0); layout.total_rows];
        for seg in &layout.segments {
            let base = self.send_offset(seg.src, self.cfg.global_expert(dst, seg.expert));
            for i in 0..seg.rows {
                out[seg.row + i] = (seg.src, base + i);
            }
        }
        out
    }

    /// Rows `src` sends to `dst` in total.
    pub fn rows_between(&self, src: usize, dst: usize) -> usize {
        let epr = self.cfg.experts_per_rank();
        self.counts[src][dst * epr..(dst + 1) * epr].iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Preset;
    use crate::routing::RoutingKind;

    #[test]
    fn ring_orders_are_permutations() {
        for w in 1..9 {
            for r in 0..w {
                let mut s: Vec<usize> = (0..w).map(|i| ring_source(r, i, w)).collect();
                assert_eq!(s[0], r);
                s.sort();
                assert_eq!(s, (0..w).collect::<Vec<_>>());
                // At step i, distinct senders hit distinct destinations.
                let mut d: Vec<usize> = (0..w).map(|src| ring_dest(src, 1, w)).collect();
                d.sort();
                assert_eq!(d, (0..w).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn dispatch_and_combine_are_inverse() {
        let cfg = Preset::Small.config(4).unwrap();
        for kind in [
            RoutingKind::Uniform,
            RoutingKind::AllToOne,
            RoutingKind::SilentRank,
            RoutingKind::SomeEmpty,
        ] {
            let routings: Vec<Routing> = (0..4)
                .map(|r| Routing::generate(&cfg, r, 37, kind, 11))
                .collect();
            let plan = LayoutPlan::from_routings(&cfg, &routings).unwrap();
            let mut slots: Vec<Vec<Option<(usize, usize)>>> =
                plan.recv.iter().map(|l| vec![None; l.total_rows]).collect();
            for (src, r) in routings.iter().enumerate() {
                for (slot, d) in plan.dispatch_map(src, r).unwrap().into_iter().enumerate() {
                    assert!(slots[d.rank][d.row].is_none(), "row written twice");
                    slots[d.rank][d.row] = Some((src, slot));
                    // The row lies in the right expert's range.
                    let le = r.ids[slot] as usize % cfg.experts_per_rank();
                    let l = &plan.recv[d.rank];
                    assert!(
                        d.row >= l.expert_row[le] && d.row < l.expert_row[le] + l.expert_rows[le]
                    );
                }
            }
            let positions: Vec<Vec<usize>> = routings
                .iter()
                .enumerate()
                .map(|(s, r)| plan.send_positions(s, r).unwrap())
                .collect();
            for (dst, s) in slots.iter().enumerate() {
                assert!(
                    s.iter().all(|x| x.is_some()),
                    "a receive row is never written"
                );
                for (row, &(src, pos)) in plan.combine_map(dst).iter().enumerate() {
                    let (src0, slot) = s[row].unwrap();
                    assert_eq!(src, src0);
                    assert_eq!(positions[src][slot], pos, "combine lands on the wrong slot");
                }
            }
        }
    }

    #[test]
    fn own_rows_come_first() {
        let cfg = Preset::Small.config(4).unwrap();
        let routings: Vec<Routing> = (0..4)
            .map(|r| Routing::generate(&cfg, r, 50, RoutingKind::Uniform, 2))
            .collect();
        let plan = LayoutPlan::from_routings(&cfg, &routings).unwrap();
        for (dst, l) in plan.recv.iter().enumerate() {
            for le in 0..cfg.experts_per_rank() {
                assert_eq!(l.segments[le * 4].src, dst);
                assert_eq!(l.segments[le * 4].row, l.expert_row[le]);
            }
        }
    }

    #[test]
    fn bad_counts_are_errors() {
        let cfg = Preset::Small.config(2).unwrap();
        assert!(LayoutPlan::new(&cfg, vec![vec![0; 8]]).is_err());
        assert!(LayoutPlan::new(&cfg, vec![vec![0; 8], vec![0; 7]]).is_err());
        let plan = LayoutPlan::new(&cfg, vec![vec![0; 8], vec![0; 8]]).unwrap();
        let r = Routing::generate(&cfg, 0, 4, RoutingKind::Uniform, 1);
        assert!(plan.dispatch_map(0, &r).is_err());
    }
}
