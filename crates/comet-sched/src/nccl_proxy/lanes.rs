//! How a GPU implementation of [`super::NcclLanes`] lays out its lanes and
//! the addresses of each op, free of CUDA so it is tested on CPU: which
//! `ncclCommSplit` calls make one communicator per ordered pair, which
//! rank a peer is inside a lane, and where a send reads, a recv writes
//! and a landing copies (bounds-checked, packing only pieces of more than
//! one run).

use crate::error::SchedError;
use crate::proxy_plan::{Piece, Region};

/// The lane of the ordered pair `from -> to`: a communicator holding just
/// the two ranks, on whose stream `from` posts its sends to `to` and `to`
/// its recvs from `from`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lane {
    pub from: usize,
    pub to: usize,
}

impl Lane {
    /// The rank of `me`'s peer inside the lane's communicator, whose ranks
    /// are ordered by world rank (the split's key): 0 or 1.
    pub fn peer_index(&self, me: usize) -> usize {
        let peer = if me == self.from { self.to } else { self.from };
        usize::from(peer > me)
    }
}

/// One `ncclCommSplit` of the world communicator: the ranks of `lanes[c]`
/// pass colour `c`, every other rank passes none. The lanes of one split
/// are disjoint pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    pub lanes: Vec<Lane>,
}

impl Split {
    /// The colour `rank` passes and the lane it gets, or `None` when no
    /// lane of this split holds it.
    pub fn colour_of(&self, rank: usize) -> Option<(u32, Lane)> {
        self.lanes
            .iter()
            .position(|l| l.from == rank || l.to == rank)
            .map(|c| (c as u32, self.lanes[c]))
    }
}

/// The splits that give every ordered pair of a world of `w` ranks its
/// lane, the same list on every rank (every rank makes every split, in
/// this order): the rounds of a round-robin tournament, where each round's
/// pairs are disjoint, each round twice (lanes `lo -> hi`, then `hi ->
/// lo`). `2(w-1)` splits for an even `w`, `2w` for an odd one, none for
/// one rank.
pub fn lane_splits(w: usize) -> Vec<Split> {
    if w < 2 {
        return Vec::new();
    }
    // The circle method over an even number of seats; with an odd world
    // the extra seat is a bye.
    let n = w + w % 2;
    let mut out = Vec::with_capacity(2 * (n - 1));
    for round in 0..n - 1 {
        let mut pairs = vec![(round, n - 1)];
        for i in 1..n / 2 {
            pairs.push(((round + i) % (n - 1), (round + n - 1 - i) % (n - 1)));
        }
        let pairs: Vec<(usize, usize)> = pairs
            .into_iter()
            .filter(|&(a, b)| a < w && b < w)
            .map(|(a, b)| (a.min(b), a.max(b)))
            .collect();
        for up in [true, false] {
            let lanes = pairs
                .iter()
                .map(|&(lo, hi)| match up {
                    true => Lane { from: lo, to: hi },
                    false => Lane { from: hi, to: lo },
                })
                .collect();
            out.push(Split { lanes });
        }
    }
    out
}

/// A range of device memory: `len` bytes from address `at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub at: u64,
    pub len: usize,
}

/// Where one send reads its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendPlan {
    /// Several runs: first gathered from `src` (`region`'s runs) into
    /// send staging at `from`, on the lane's stream.
    pub pack: Option<u64>,
    /// The address the send reads `len` bytes from.
    pub from: u64,
    pub len: usize,
}

/// Whether `r` is one contiguous range (then it is sent and landed as one
/// run, without packing).
pub fn one_run(r: &Region) -> bool {
    r.rows <= 1 || r.pitch == r.width
}

fn outside(rank: usize, p: &Piece, what: &str, at: usize, len: usize, of: usize) -> SchedError {
    SchedError::Input {
        rank,
        message: format!("{p}: {len} bytes at {at} lie past the {of} bytes of {what}"),
    }
}

fn inside(
    rank: usize,
    p: &Piece,
    what: &str,
    at: usize,
    len: usize,
    span: Span,
) -> Result<u64, SchedError> {
    match at.checked_add(len) {
        Some(end) if end <= span.len => Ok(span.at + at as u64),
        _ => Err(outside(rank, p, what, at, len, span.len)),
    }
}

/// The send of `p` from `mirror` (this rank's mirror of the receiver's
/// buffer): straight from it when the region is one run, else packed into
/// `staging` (this rank's send staging of that buffer for the receiver,
/// wire layout) at `p.wire` first. `rank` reports errors: a region outside
/// the mirror, a packed piece without staging or outside it.
pub fn send_plan(
    rank: usize,
    p: &Piece,
    mirror: Span,
    staging: Option<Span>,
) -> Result<SendPlan, SchedError> {
    let r = p.region;
    let src = inside(rank, p, "the mirror", r.offset, r.end() - r.offset, mirror)?;
    if one_run(&r) {
        return Ok(SendPlan {
            pack: None,
            from: src,
            len: r.bytes(),
        });
    }
    let staging = staging.ok_or_else(|| SchedError::Input {
        rank,
        message: format!("{p}: {} runs to pack but no send staging for them", r.rows),
    })?;
    let to = inside(rank, p, "the send staging", p.wire, r.bytes(), staging)?;
    Ok(SendPlan {
        pack: Some(src),
        from: to,
        len: r.bytes(),
    })
}

/// Where the recv of `p` writes in `staging` (this rank's receive staging
/// of the buffer, wire layout): `p.wire`, checked.
pub fn recv_at(rank: usize, p: &Piece, staging: Span) -> Result<u64, SchedError> {
    inside(
        rank,
        p,
        "the receive staging",
        p.wire,
        p.region.bytes(),
        staging,
    )
}

/// A landing's copy: the packed bytes at `from` into `p.region`'s runs at
/// `to` (`to` is the region's first byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LandPlan {
    pub from: u64,
    pub to: u64,
}

/// The landing of `p`: from `staging` at `p.wire` into `own` (this rank's
/// buffer) at the region, both checked.
pub fn land_plan(rank: usize, p: &Piece, staging: Span, own: Span) -> Result<LandPlan, SchedError> {
    let r = p.region;
    Ok(LandPlan {
        from: recv_at(rank, p, staging)?,
        to: inside(rank, p, "the own buffer", r.offset, r.end() - r.offset, own)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy_plan::{Buf, Geometry, Kind};
    use std::collections::HashSet;

    #[test]
    fn every_ordered_pair_gets_one_lane_from_disjoint_splits() {
        for w in 1..=9 {
            let splits = lane_splits(w);
            let expect = if w < 2 { 0 } else { 2 * (w + w % 2 - 1) };
            assert_eq!(splits.len(), expect, "w={w}");
            let mut seen = HashSet::new();
            for s in &splits {
                let mut ranks = HashSet::new();
                for l in &s.lanes {
                    assert!(l.from < w && l.to < w && l.from != l.to, "w={w} {l:?}");
                    assert!(ranks.insert(l.from) && ranks.insert(l.to), "w={w}: {s:?}");
                    assert!(seen.insert(*l), "w={w}: {l:?} twice");
                }
                for r in 0..w {
                    match s.colour_of(r) {
                        Some((c, l)) => {
                            assert_eq!(s.lanes[c as usize], l);
                            assert!(l.from == r || l.to == r);
                        }
                        None => assert!(!ranks.contains(&r)),
                    }
                }
            }
            assert_eq!(seen.len(), w * w.saturating_sub(1), "w={w}");
        }
    }

    #[test]
    fn the_peer_index_follows_world_rank_order() {
        let l = Lane { from: 5, to: 2 };
        assert_eq!(l.peer_index(5), 0);
        assert_eq!(l.peer_index(2), 1);
        let l = Lane { from: 0, to: 3 };
        assert_eq!(l.peer_index(0), 1);
        assert_eq!(l.peer_index(3), 0);
    }

    fn geo(chunks: usize) -> Geometry {
        Geometry {
            ranks: 2,
            experts: 4,
            row_bytes: 64,
            chunks,
            chunk_bytes: 64 / chunks,
            groups: 1,
            recv_rows: 16,
            send_rows: 8,
            top_k: 2,
        }
    }

    fn span(at: u64, len: usize) -> Span {
        Span { at, len }
    }

    #[test]
    fn a_combine_chunk_is_packed_at_its_wire_place_and_landed_from_it() {
        let g = geo(4);
        let counts = vec![vec![1, 2, 3, 0], vec![2, 0, 1, 1]];
        let pieces = g.data_pieces(0, &counts).unwrap();
        let comb = g.bytes(Buf::Comb);
        let mut n = 0;
        for p in pieces
            .iter()
            .filter(|p| matches!(p.kind, Kind::Combine { .. }))
        {
            let r = p.region;
            let plan = send_plan(0, p, span(0x1000, comb), Some(span(0x9000, comb))).unwrap();
            assert_eq!(plan.len, r.bytes());
            if r.rows > 1 {
                assert_eq!(plan.pack, Some(0x1000 + r.offset as u64), "{p}");
                assert_eq!(plan.from, 0x9000 + p.wire as u64, "{p}");
                n += 1;
            } else {
                assert_eq!(plan.pack, None, "{p}");
                assert_eq!(plan.from, 0x1000 + r.offset as u64, "{p}");
            }
            let land = land_plan(1, p, span(0x5000, comb), span(0x7000, comb)).unwrap();
            assert_eq!(land.from, 0x5000 + p.wire as u64);
            assert_eq!(land.to, 0x7000 + r.offset as u64);
        }
        assert!(n > 0, "no piece of several runs in {pieces:?}");
    }

    #[test]
    fn one_run_pieces_go_straight_from_the_mirror() {
        let g = geo(1);
        let counts = vec![vec![1, 2, 3, 0], vec![2, 0, 1, 1]];
        for p in g.data_pieces(1, &counts).unwrap() {
            // Whole rows (one chunk) and dispatch segments are contiguous.
            let plan = send_plan(p.from, &p, span(0x1000, g.bytes(p.region.buf)), None).unwrap();
            assert_eq!(
                (plan.pack, plan.from),
                (None, 0x1000 + p.region.offset as u64),
                "{p}"
            );
        }
        let c = g.counts_piece(1, 0, 7);
        let plan = send_plan(1, &c, span(0, g.bytes(Buf::Counts)), None).unwrap();
        assert_eq!((plan.from, plan.len), (c.region.offset as u64, 16));
    }

    #[test]
    fn pieces_outside_their_buffers_are_refused_by_name() {
        let g = geo(4);
        let counts = vec![vec![1, 2, 3, 0], vec![2, 0, 1, 1]];
        let pieces = g.data_pieces(0, &counts).unwrap();
        let p = pieces
            .iter()
            .find(|p| p.region.rows > 1 && !one_run(&p.region))
            .unwrap();
        let small = span(0, p.region.end() - 1);
        let e = send_plan(0, p, small, None).unwrap_err().to_string();
        assert!(e.contains("the mirror") && e.contains("combine"), "{e}");
        let big = span(0, g.bytes(Buf::Comb));
        let e = send_plan(0, p, big, None).unwrap_err().to_string();
        assert!(e.contains("no send staging"), "{e}");
        let e = send_plan(0, p, big, Some(span(0, p.wire)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("send staging"), "{e}");
        let e = recv_at(1, p, span(0, p.wire + 1)).unwrap_err().to_string();
        assert!(e.contains("receive staging"), "{e}");
        let e = land_plan(1, p, big, span(0, 8)).unwrap_err().to_string();
        assert!(e.contains("own buffer"), "{e}");
        // Overflowing offsets are refused, not wrapped.
        let mut q = *p;
        q.wire = usize::MAX - 1;
        assert!(recv_at(1, &q, big).is_err());
    }
}
