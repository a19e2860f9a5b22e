//! Every transfer of one device-forward call between two ranks, derived
//! from the call's W x E count matrix in the layout the kernels use
//! (`moe_forward.cu`), for host-driven transports.
//!
//! Under a proxy the kernels run unchanged: what they take for a peer's
//! buffer is a local mirror of it, and what they take for the peer's signal
//! array is a local array of ready words. So a ready word says "these bytes
//! of my mirror of `to`'s buffer are final" without saying which bytes; the
//! proxy knows them only through this plan, which both ends derive from the
//! same counts: the sender to stage and send a piece, the receiver to land
//! it where its kernels read. The count exchange itself needs no counts
//! (fixed offsets), which is how the counts get there first.
//!
//! Buffers, as `forward.rs` allocates them on every rank:
//! - counts `[2][W][E]` u32, the slot of a call chosen by its epoch's parity;
//! - recv `[recv rows][hidden]` bf16, expert-major, sources in arrival
//!   order (the destination itself first, then destination-1, ...);
//! - comb `[send rows][hidden]` bf16, rows in the source's send order.
//!
//! Combine pieces are column chunks of whole rows, so on the device they
//! are 2-D (rows of `chunk_bytes`, `row_bytes` apart); on the wire each is
//! packed chunk-major ([`Piece::wire`]) and landed by a 2-D copy.
//!
//! Rows can also travel token-once ([`WireFormat::Tokens`]), both ways. A
//! token routed to several experts of one rank is one row per (token,
//! expert) in the kernels' layout, but the same bytes, so the staged proxy
//! sends it once per destination rank with a slot and a weight ratio per
//! row, and the receiver expands it on arrival. Back, the expert side sums
//! a token's rows (scaled by those ratios) into one row per token slot,
//! which the token's owner lands as its representative row (the others
//! zero), so the kernels' weighted sum comes out the same.
//! [`Geometry::token_place`] says where a pair's index and ratio arrays
//! and token rows sit in the receiver's inbox.

use crate::device_plan::DevicePlan;
use crate::error::SchedError;
use crate::host_memory::gib;
use comet_core::schedule::{SignalMap, WireSignal};

/// The layer's symmetric device buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Buf {
    Counts,
    Recv,
    Comb,
}

impl Buf {
    pub const ALL: [Buf; 3] = [Buf::Counts, Buf::Recv, Buf::Comb];

    /// Its place in [`Buf::ALL`] (tables of per-buffer things use it).
    pub fn index(self) -> usize {
        self as usize
    }
}

/// `rows` runs of `width` bytes, `pitch` apart, from byte `offset` of a
/// buffer (one run for a contiguous range).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub buf: Buf,
    pub offset: usize,
    pub rows: usize,
    pub width: usize,
    pub pitch: usize,
}

impl Region {
    fn flat(buf: Buf, offset: usize, len: usize) -> Region {
        Region {
            buf,
            offset,
            rows: 1,
            width: len,
            pitch: len,
        }
    }

    pub fn bytes(&self) -> usize {
        self.rows * self.width
    }

    /// One past the last byte it touches (its offset when empty).
    pub fn end(&self) -> usize {
        if self.bytes() == 0 {
            self.offset
        } else {
            self.offset + (self.rows - 1) * self.pitch + self.width
        }
    }
}

/// What a piece carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The sender's row of the count matrix.
    Counts,
    /// The sender's rows for local expert `le` of the receiver.
    Dispatch { le: usize },
    /// Piece `chunk` of the rows the sender computed for the receiver:
    /// column chunk `chunk % chunks` of expert group `chunk / chunks`'s
    /// rows ([`Geometry::pieces`]; with one group, the column chunk).
    Combine { chunk: usize },
}

/// One transfer of a call: `region` of the sender's mirror of `to`'s buffer
/// becomes the same region of `to`'s buffer, then `to`'s signal `signal`
/// (absolute index, as the kernels number them) is raised to the call's
/// epoch. The sender's ready word for it has the same index in its ready
/// array for `to`. A piece of zero bytes still raises its signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub from: usize,
    pub to: usize,
    pub kind: Kind,
    pub signal: usize,
    pub region: Region,
    /// Where the packed bytes sit in a host image of `region.buf` (sender's
    /// staging, receiver's inbox): the region's own offset when it is one
    /// run; chunk-major for combine chunks, so every piece's wire range is
    /// disjoint from every other's of the same call and receiver.
    pub wire: usize,
}

/// A piece named for errors and logs as the kernels name its signal, with
/// its ends: `dispatch(expert 1, src 0) 0 -> 2`.
impl std::fmt::Display for Piece {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (from, to) = (self.from, self.to);
        match self.kind {
            Kind::Counts => write!(f, "count({from}) {from} -> {to}"),
            Kind::Dispatch { le } => write!(f, "dispatch(expert {le}, src {from}) {from} -> {to}"),
            Kind::Combine { chunk } => {
                write!(f, "combine(from {from}, chunk {chunk}) {from} -> {to}")
            }
        }
    }
}

/// How dispatch rows travel between hosts (the cost model's notion too:
/// it counts the bytes the same way).
pub use comet_core::cost::WireFormat;

/// Where a dispatch piece's token-once bytes sit in the receiver's recv
/// inbox (byte offsets). Each ordered pair has an area, sources in
/// arrival order: its index array (a u32 token slot per row, segments in
/// expert order), then its ratio array (an f32 per row, same order: the
/// row's weight over its token's representative weight on this rank, see
/// `staged`), each padded to 16 bytes, then its token rows, slot `s` at
/// `tokens + s * row_bytes`. A pair never has more distinct tokens than
/// rows, so the areas fit [`Geometry::inbox_bytes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenPlace {
    /// This piece's index array (`4 * rows` bytes).
    pub index: usize,
    /// This piece's ratio array (`4 * rows` bytes).
    pub ratio: usize,
    /// Slot 0 of the pair's token rows.
    pub tokens: usize,
    /// Rows the pair sends in the call: the most slots it can use.
    pub pair_rows: usize,
}

/// SMs per rank left to its proxy's kernels (copies, token packs, combine
/// sums, landings). They read every remote row of a call: on one SM a sequential
/// qwen2-moe call's reduce phase (the combine's sums landing) took 11.7 ms
/// over UCX shared memory, on 4 a rank 6.4 ms, on 8 5.3 ms (H100,
/// docs/PERF.md 2026-12-06 ~04:04), and past the GEMMs' saturation the
/// SMs cost them little.
pub const PROXY_KERNEL_SMS: usize = 4;

/// Memory one staged rank holds beyond the layer itself, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StagedBytes {
    pub device_mirrors: usize,
    /// A device copy of the recv inbox, which token-once landings expand
    /// from (the default dispatch wire).
    pub device_tokens: usize,
    /// Pinned on a GPU.
    pub host_staging: usize,
    /// On the transport (host memory for UCX).
    pub inbox: usize,
}

impl StagedBytes {
    /// Refuses staging that would pin more host memory than `available`
    /// (normally [`crate::host_memory::available`]; None skips the check):
    /// pinned pages cannot be swapped. A rank pins its images and
    /// registers its inbox; `ranks_here` ranks (those sharing its GPU, the
    /// fewest that pin at once on its host) do the same together. The
    /// images grow with the peers and the receive rows, which by default
    /// are sized for the worst case (every rank sending all its tokens
    /// here), so a wide world wants a bound on them.
    pub fn check_pinned(
        &self,
        geo: &Geometry,
        rank: usize,
        ranks_here: usize,
        available: Option<u128>,
    ) -> Result<(), SchedError> {
        let one = (self.host_staging + self.inbox) as u128;
        let need = one * ranks_here.max(1) as u128;
        match available {
            Some(avail) if need > avail => Err(SchedError::Input {
                rank,
                message: format!(
                    "staging through host memory would pin {} ({} a rank for {} ranks: the \
                     {} rows it sends, the {} combine rows of each of its {} peers, a \
                     landing image of {} receive rows and {} combine rows, rows of {} bytes, \
                     and the inbox) but the host has {} available; lower the layer's \
                     capacity or bound its receive rows (LayerOptions::recv_capacity)",
                    gib(need),
                    gib(one),
                    ranks_here.max(1),
                    geo.send_rows,
                    geo.send_rows,
                    geo.ranks.saturating_sub(1),
                    geo.recv_rows,
                    geo.send_rows,
                    geo.row_bytes,
                    gib(avail)
                ),
            }),
            _ => Ok(()),
        }
    }
}

/// The sizes the kernels lay the buffers out with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub ranks: usize,
    pub experts: usize,
    pub row_bytes: usize,
    /// Column chunks of layer1, `chunk_bytes` wide.
    pub chunks: usize,
    pub chunk_bytes: usize,
    /// Expert groups of each rank's local experts (`DevicePlan::groups`):
    /// a combine piece is one column chunk of one group's rows.
    pub groups: usize,
    pub recv_rows: usize,
    pub send_rows: usize,
    /// Slots per token: the kernels number slot `j` of token `t` as
    /// `t * top_k + j`.
    pub top_k: usize,
}

impl Geometry {
    pub fn of(plan: &DevicePlan) -> Geometry {
        Geometry {
            ranks: plan.cfg.ranks,
            experts: plan.cfg.experts,
            row_bytes: plan.cfg.hidden * 2,
            chunks: plan.chunks,
            chunk_bytes: plan.chunk_cols * 2,
            groups: plan.groups,
            recv_rows: plan.recv_capacity,
            send_rows: plan.send_capacity(),
            top_k: plan.cfg.top_k,
        }
    }

    fn epr(&self) -> usize {
        self.experts / self.ranks
    }

    /// Combine pieces between two ranks: `groups` x `chunks`, piece
    /// `g * chunks + c` column chunk `c` of expert group `g`'s rows.
    pub fn pieces(&self) -> usize {
        self.groups * self.chunks
    }

    /// Expert group `g`'s first local expert (comet-core's `group_lo`).
    pub fn group_lo(&self, g: usize) -> usize {
        comet_core::schedule::group_lo(self.epr(), self.groups, g)
    }

    /// Bytes of `buf` on one rank.
    pub fn bytes(&self, buf: Buf) -> usize {
        match buf {
            Buf::Counts => 2 * self.ranks * self.experts * 4,
            Buf::Recv => self.recv_rows * self.row_bytes,
            Buf::Comb => self.send_rows * self.row_bytes,
        }
    }

    /// Bytes of `buf`'s inbox on a host-memory transport: the buffer and
    /// room for token-once index arrays ([`inbox_bytes`]).
    pub fn inbox_bytes(&self, buf: Buf) -> usize {
        inbox_bytes(self.bytes(buf), self.row_bytes, self.ranks)
    }

    /// What one rank holds to run staged (the proxy path of host-memory
    /// transports), in bytes: device mirrors of every peer's buffers; as
    /// pinned host staging, the send images (one of the rows sent, for
    /// every peer's dispatch pieces; each peer's count and combine
    /// buffers), a landing image of each buffer, and the send order and
    /// its weights (token-once's per-peer tables, a few bytes a row, are
    /// left out); its inbox.
    pub fn staged_bytes(&self) -> StagedBytes {
        let one: usize = Buf::ALL.iter().map(|&b| self.bytes(b)).sum();
        let peers = self.ranks.saturating_sub(1);
        let outbox = if peers > 0 { self.outbox_bytes() } else { 0 };
        let order = 2 * 4 * self.send_rows;
        StagedBytes {
            device_mirrors: peers * one,
            device_tokens: if peers > 0 {
                self.inbox_bytes(Buf::Recv)
            } else {
                0
            },
            host_staging: peers * (one - self.bytes(Buf::Recv)) + outbox + one + order,
            inbox: Buf::ALL.iter().map(|&b| self.inbox_bytes(b)).sum(),
        }
    }

    /// Bytes of the send image of dispatch pieces: one for every peer,
    /// each piece at this rank's send positions of its expert
    /// ([`Geometry::image_at`]), so it holds a call's sent rows once.
    pub fn outbox_bytes(&self) -> usize {
        self.send_rows * self.row_bytes
    }

    /// `from`'s send position of global expert `e`: the rows it sends to
    /// experts before `e` (the kernels' send order is expert-major).
    pub fn send_position(&self, counts: &[Vec<u32>], from: usize, e: usize) -> usize {
        counts[from][..e].iter().map(|&c| c as usize).sum()
    }

    /// Where piece `p` (sent by `p.from`) stands in its send image: a
    /// dispatch piece at `p.from`'s send position of its expert (its rows
    /// are consecutive there; the one image serves every peer), any other
    /// piece at its wire offset (an image per peer). `counts` as checked
    /// by [`Geometry::data_pieces`].
    pub fn image_at(&self, counts: &[Vec<u32>], p: &Piece) -> usize {
        match p.kind {
            Kind::Dispatch { le } => {
                self.send_position(counts, p.from, p.to * self.epr() + le) * self.row_bytes
            }
            _ => p.wire,
        }
    }

    /// Where pair `from` -> `to`'s rows start in the send image of dispatch
    /// pieces: `from`'s send position of `to`'s first expert. Token-once
    /// packs the pair's token rows from there, at their slots (a pair never
    /// has more token slots than rows).
    pub fn pair_image_at(&self, counts: &[Vec<u32>], from: usize, to: usize) -> usize {
        self.send_position(counts, from, to * self.epr()) * self.row_bytes
    }

    /// Where dispatch piece `p` (of a checked count matrix `counts`)
    /// travels token-once in its receiver's inbox.
    pub fn token_place(&self, counts: &[Vec<u32>], p: &Piece) -> TokenPlace {
        let le = match p.kind {
            Kind::Dispatch { le } => le,
            _ => 0,
        };
        self.pair_place(counts, p.from, p.to, le)
    }

    /// Where the token-once bytes of pair `from` -> `to` sit in `to`'s
    /// recv inbox, the arrays from local expert `le`'s rows on (`le` 0:
    /// the pair's whole index and ratio arrays).
    pub fn pair_place(&self, counts: &[Vec<u32>], from: usize, to: usize, le: usize) -> TokenPlace {
        let (w, epr) = (self.ranks, self.epr());
        let rows = |from: usize, les: std::ops::Range<usize>| -> usize {
            les.map(|l| counts[from][to * epr + l] as usize).sum()
        };
        let mut area = 0;
        for i in 1..w {
            let src = (to + w - i) % w;
            let pair_rows = rows(src, 0..epr);
            let array = (4 * pair_rows).next_multiple_of(16);
            if src == from {
                let before = 4 * rows(src, 0..le);
                return TokenPlace {
                    index: area + before,
                    ratio: area + array + before,
                    tokens: area + 2 * array,
                    pair_rows,
                };
            }
            area += 2 * array + pair_rows * self.row_bytes;
        }
        TokenPlace {
            index: area,
            ratio: area,
            tokens: area,
            pair_rows: 0,
        }
    }

    /// The layer's signal numbering (comet-core's, as the kernels use it).
    fn map(&self) -> SignalMap {
        SignalMap {
            ranks: self.ranks,
            experts_per_rank: self.epr(),
            chunks: self.pieces(),
        }
    }

    /// Signal words a rank needs: count, dispatch and combine signals (the
    /// signal array without the local chunk counters, which are no
    /// transport's).
    pub fn signal_count(&self) -> usize {
        self.map().wire_len() - self.pieces()
    }

    pub fn count_signal(&self, from: usize) -> usize {
        WireSignal::exchange(from).index() as usize
    }

    pub fn dispatch_signal(&self, le: usize, from: usize) -> usize {
        let m = self.map();
        m.wire(m.dispatch(le, from)).index() as usize
    }

    /// `piece`: `g * chunks + c` ([`Geometry::pieces`]).
    pub fn combine_signal(&self, from: usize, piece: usize) -> usize {
        let m = self.map();
        m.wire(m.combine(from, piece)).index() as usize
    }

    /// The count-exchange piece `from` -> `to` of a call with `epoch`.
    pub fn counts_piece(&self, from: usize, to: usize, epoch: u64) -> Piece {
        let (w, e) = (self.ranks, self.experts);
        let slot = (epoch & 1) as usize;
        let offset = (slot * w + from) * e * 4;
        Piece {
            from,
            to,
            kind: Kind::Counts,
            signal: self.count_signal(from),
            region: Region::flat(Buf::Counts, offset, e * 4),
            wire: offset,
        }
    }

    /// Checks `counts` (`counts[src][e]`) against the geometry and the
    /// buffers' capacities, naming what does not fit. The kernels refuse
    /// such a call on every rank alike (nothing moves), so a proxy must
    /// too instead of computing ranges outside its buffers.
    /// `rank` is the rank that reports it.
    pub fn check_counts(&self, rank: usize, counts: &[Vec<u32>]) -> Result<(), SchedError> {
        let (w, e) = (self.ranks, self.experts);
        let bad = |m: String| Err(SchedError::Input { rank, message: m });
        if w == 0 || e == 0 || !e.is_multiple_of(w) {
            return bad(format!("{e} experts over {w} ranks"));
        }
        if counts.len() != w || counts.iter().any(|r| r.len() != e) {
            return bad(format!("the count matrix must be {w} x {e}"));
        }
        for (s, row) in counts.iter().enumerate() {
            let sent: u64 = row.iter().map(|&c| u64::from(c)).sum();
            if sent > self.send_rows as u64 {
                return bad(format!(
                    "rank {s} sends {sent} rows, over the {} its combine buffer holds",
                    self.send_rows
                ));
            }
        }
        for d in 0..w {
            let got: u64 = counts
                .iter()
                .flat_map(|row| &row[d * self.epr()..(d + 1) * self.epr()])
                .map(|&c| u64::from(c))
                .sum();
            if got > self.recv_rows as u64 {
                return bad(format!(
                    "rank {d} receives {got} rows, over its receive capacity of {}",
                    self.recv_rows
                ));
            }
        }
        Ok(())
    }

    /// Every dispatch and combine piece of a call between any two different
    /// ranks, for a checked count matrix (the count exchange is
    /// [`Geometry::counts_piece`]); `rank` reports errors. Sources to a receiver, in arrival
    /// order; pieces of one pair in the order the kernels finish them.
    pub fn data_pieces(&self, rank: usize, counts: &[Vec<u32>]) -> Result<Vec<Piece>, SchedError> {
        self.check_counts(rank, counts)?;
        let (w, epr, rb) = (self.ranks, self.epr(), self.row_bytes);
        let cnt = |s: usize, e: usize| counts[s][e] as usize;
        let mut out = Vec::new();
        for to in 0..w {
            // Dispatch: `to`'s receive layout, expert-major, sources in
            // arrival order (itself first, then to-1, to-2, ...).
            let mut row = 0;
            for le in 0..epr {
                let e = to * epr + le;
                for i in 0..w {
                    let from = (to + w - i) % w;
                    let rows = cnt(from, e);
                    if from != to {
                        out.push(Piece {
                            from,
                            to,
                            kind: Kind::Dispatch { le },
                            signal: self.dispatch_signal(le, from),
                            region: Region::flat(Buf::Recv, row * rb, rows * rb),
                            wire: row * rb,
                        });
                    }
                    row += rows;
                }
            }
        }
        for to in 0..w {
            // Combine: the rows `from` computed for `to` sit at `to`'s send
            // positions of `from`'s experts, which are consecutive, and so
            // are those of each expert group; groups in order, then chunks.
            for from in (0..w).filter(|&f| f != to) {
                for g in 0..self.groups {
                    let experts = from * epr + self.group_lo(g)..from * epr + self.group_lo(g + 1);
                    let first: usize = (0..experts.start).map(|x| cnt(to, x)).sum();
                    let rows: usize = experts.map(|x| cnt(to, x)).sum();
                    for c in 0..self.chunks {
                        let cb = self.chunk_bytes;
                        let chunk = g * self.chunks + c;
                        out.push(Piece {
                            from,
                            to,
                            kind: Kind::Combine { chunk },
                            signal: self.combine_signal(from, chunk),
                            region: Region {
                                buf: Buf::Comb,
                                offset: first * rb + c * cb,
                                rows,
                                width: cb,
                                pitch: rb,
                            },
                            wire: (c * self.send_rows + first) * cb,
                        });
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Bytes of the inbox of a device buffer of `bytes` whose rows are
/// `row_bytes` long, in a world of `ranks`: room for two 4-byte words per
/// row and 32 bytes of padding per source beyond the buffer, so token-once
/// areas fit ([`TokenPlace`]). The same rule for every buffer keeps it one
/// rule.
pub fn inbox_bytes(bytes: usize, row_bytes: usize, ranks: usize) -> usize {
    bytes + 8 * bytes.div_ceil(row_bytes.max(1)) + 32 * ranks
}

/// Little-endian u32 words of `b` (a count row as it travels); a trailing
/// partial word is dropped.
pub(crate) fn words(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use comet_core::layout::LayoutPlan;
    use comet_core::MoeConfig;
    use rand::{Rng, SeedableRng};

    fn geometry(w: usize, e: usize, chunks: usize, recv_rows: usize, send_rows: usize) -> Geometry {
        Geometry {
            ranks: w,
            experts: e,
            row_bytes: 64 * 2,
            chunks,
            chunk_bytes: 64 * 2 / chunks,
            groups: 1,
            recv_rows,
            send_rows,
            top_k: 2,
        }
    }

    fn random_counts(rng: &mut impl Rng, w: usize, e: usize, tokens: usize) -> Vec<Vec<u32>> {
        (0..w)
            .map(|_| {
                let mut row = vec![0u32; e];
                for _ in 0..tokens {
                    // Skewed: a third of the experts get nothing.
                    let x = rng.gen_range(0..e);
                    if x % 3 != 1 {
                        row[x] += 1;
                    }
                }
                row
            })
            .collect()
    }

    /// A rank's dispatch pieces to every peer share one send image without
    /// touching: each at its send positions, inside the image's rows, and
    /// each pair's token rows (at most its rows) inside the pair's own.
    #[test]
    fn dispatch_pieces_share_one_send_image_apart() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(17);
        for (w, e) in [(2, 2), (2, 8), (3, 6), (4, 8), (4, 16)] {
            for _ in 0..20 {
                let counts = random_counts(&mut rng, w, e, 40);
                let g = geometry(w, e, 2, w * 40, 40);
                let pieces = g.data_pieces(0, &counts).unwrap();
                for from in 0..w {
                    let mut used = vec![false; g.outbox_bytes()];
                    let mine = pieces.iter().filter(|p| p.from == from);
                    for p in mine.filter(|p| matches!(p.kind, Kind::Dispatch { .. })) {
                        let at = g.image_at(&counts, p);
                        for b in &mut used[at..at + p.region.bytes()] {
                            assert!(!*b, "{p} overlaps another piece in the image");
                            *b = true;
                        }
                        let pair = g.pair_image_at(&counts, from, p.to);
                        let epr = e / w;
                        let pair_rows: usize = (0..epr)
                            .map(|l| counts[from][p.to * epr + l] as usize)
                            .sum();
                        assert!(pair <= at && at + p.region.bytes() <= pair + pair_rows * 128);
                    }
                    // Everything sent is in the image: the rows of each
                    // remote expert, at its send position.
                    let remote: usize = (0..e)
                        .filter(|&x| x / (e / w) != from)
                        .map(|x| counts[from][x] as usize)
                        .sum();
                    assert_eq!(used.iter().filter(|&&b| b).count(), remote * 128);
                }
            }
        }
    }

    /// Dispatch pieces land exactly where comet-core's layout plan (which
    /// the device layout kernel is tested equal to) puts each segment.
    #[test]
    fn dispatch_pieces_are_the_layout_plans_segments() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for (w, e) in [(2, 2), (2, 8), (3, 6), (4, 8), (4, 16)] {
            let counts = random_counts(&mut rng, w, e, 40);
            let g = geometry(w, e, 2, w * 40, 40);
            let pieces = g.data_pieces(0, &counts).unwrap();
            let cfg = MoeConfig {
                hidden: 64,
                ffn: 64,
                experts: e,
                top_k: 1,
                ranks: w,
                dtype: comet_core::config::Dtype::Bf16,
            };
            let usize_counts: Vec<Vec<usize>> = counts
                .iter()
                .map(|r| r.iter().map(|&c| c as usize).collect())
                .collect();
            let plan = LayoutPlan::new(&cfg, usize_counts).unwrap();
            for to in 0..w {
                for le in 0..e / w {
                    for from in (0..w).filter(|&f| f != to) {
                        let seg = plan.recv[to].segment(le, from, w);
                        let p: Vec<_> = pieces
                            .iter()
                            .filter(|p| {
                                p.to == to && p.from == from && p.kind == Kind::Dispatch { le }
                            })
                            .collect();
                        assert_eq!(p.len(), 1);
                        assert_eq!(
                            p[0].region.offset,
                            seg.row * g.row_bytes,
                            "{w} {e} {to} {le} {from}"
                        );
                        assert_eq!(p[0].region.bytes(), seg.rows * g.row_bytes);
                        assert_eq!(p[0].signal, g.dispatch_signal(le, from));
                    }
                }
            }
        }
    }

    /// A receiver's pieces of one buffer never overlap, on the device or on
    /// the wire, and stay inside the buffer; combine pieces cover exactly
    /// the rows each source sent to each owner, every chunk once, each
    /// expert group's piece the rows of that group's experts.
    #[test]
    fn pieces_are_disjoint_and_inside_their_buffers() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for _ in 0..80 {
            let w = rng.gen_range(2..=4);
            let epr = rng.gen_range(1..=5);
            let e = w * epr;
            let chunks = [1, 2, 4][rng.gen_range(0..3)];
            let tokens = rng.gen_range(0..30);
            let counts = random_counts(&mut rng, w, e, tokens);
            let g = Geometry {
                groups: rng.gen_range(1..=epr),
                ..geometry(w, e, chunks, w * 30, 30)
            };
            let pieces = g.data_pieces(0, &counts).unwrap();
            for (to, to_counts) in counts.iter().enumerate() {
                for buf in [Buf::Recv, Buf::Comb] {
                    let mut wire: Vec<(usize, usize)> = Vec::new();
                    let mut bytes_on = vec![false; g.bytes(buf)];
                    for p in pieces.iter().filter(|p| p.to == to && p.region.buf == buf) {
                        let r = p.region;
                        assert!(r.end() <= g.bytes(buf), "{p:?}");
                        assert!(p.wire + r.bytes() <= g.bytes(buf), "{p:?}");
                        wire.push((p.wire, p.wire + r.bytes()));
                        for row in 0..r.rows {
                            for b in 0..r.width {
                                let at = r.offset + row * r.pitch + b;
                                assert!(!bytes_on[at], "byte {at} of {buf:?} twice: {p:?}");
                                bytes_on[at] = true;
                            }
                        }
                    }
                    wire.sort();
                    assert!(wire.windows(2).all(|x| x[0].1 <= x[1].0), "{wire:?}");
                }
                for from in (0..w).filter(|&f| f != to) {
                    let sent: usize = (from * e / w..(from + 1) * e / w)
                        .map(|x| to_counts[x] as usize)
                        .sum();
                    let comb: Vec<_> = pieces
                        .iter()
                        .filter(|p| p.to == to && p.from == from && p.region.buf == Buf::Comb)
                        .collect();
                    assert_eq!(comb.len(), g.pieces());
                    for (i, p) in comb.iter().enumerate() {
                        // In order: groups, then chunks inside each.
                        assert_eq!(p.kind, Kind::Combine { chunk: i });
                        assert_eq!(p.signal, g.combine_signal(from, i));
                        let grp = i / chunks;
                        let rows: usize = (from * epr + g.group_lo(grp)
                            ..from * epr + g.group_lo(grp + 1))
                            .map(|x| to_counts[x] as usize)
                            .sum();
                        assert_eq!(p.region.rows, rows, "{p:?}");
                    }
                    assert_eq!(
                        comb.iter().map(|p| p.region.bytes()).sum::<usize>(),
                        sent * g.row_bytes
                    );
                }
            }
            // Signals: one piece per (receiver, signal), as the kernels wait.
            let mut seen: Vec<(usize, usize)> = pieces.iter().map(|p| (p.to, p.signal)).collect();
            seen.sort();
            let n = seen.len();
            seen.dedup();
            assert_eq!(seen.len(), n);
        }
    }

    #[test]
    fn staged_memory_is_a_mirror_and_an_image_per_peer() {
        let g = geometry(4, 8, 2, 100, 30);
        let one = 2 * 4 * 8 * 4 + 100 * 128 + 30 * 128;
        let b = g.staged_bytes();
        assert_eq!(b.device_mirrors, 3 * one);
        // One image of the sent rows for every peer's dispatch pieces, a
        // landing image of each buffer, the send order and its weights.
        assert_eq!(
            b.host_staging,
            3 * (one - 100 * 128) + 30 * 128 + one + 2 * 4 * 30
        );
        // Room for two words per row and 32 bytes per rank, per buffer.
        let rows = 2 + 100 + 30; // the 256-byte count buffer is two 128-byte rows
        assert_eq!(b.inbox, one + 8 * rows + 3 * 32 * 4);
        assert_eq!(b.device_tokens, 100 * 128 + 8 * 100 + 32 * 4);
        let alone = geometry(1, 8, 1, 10, 10).staged_bytes();
        assert_eq!((alone.device_mirrors, alone.device_tokens), (0, 0));
    }

    /// Staging that would pin more than the host has is refused, naming
    /// the sizes and the way out; exactly enough, or an unknown amount,
    /// passes.
    #[test]
    fn staging_beyond_the_hosts_memory_is_refused() {
        let g = geometry(4, 8, 2, 100, 30);
        let b = g.staged_bytes();
        let one = (b.host_staging + b.inbox) as u128;
        assert!(b.check_pinned(&g, 2, 1, Some(one)).is_ok());
        assert!(b.check_pinned(&g, 2, 3, None).is_ok());
        // Three ranks on the GPU pin three times as much.
        assert!(b.check_pinned(&g, 2, 3, Some(3 * one)).is_ok());
        let e = b.check_pinned(&g, 2, 3, Some(3 * one - 1)).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, SchedError::Input { rank: 2, .. }), "{e:?}");
        for part in [
            "for 3 ranks",
            "3 peers",
            "100 receive rows",
            "30 combine rows",
            "recv_capacity",
        ] {
            assert!(msg.contains(part), "{part}: {msg}");
        }
    }

    /// Token-once areas: every piece's index and ratio arrays and its
    /// pair's token rows (as many slots as the pair has rows) lie inside the recv inbox,
    /// disjoint from every other pair's and piece's, for any counts.
    #[test]
    fn token_places_are_disjoint_and_inside_the_inbox() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        for _ in 0..200 {
            let w = rng.gen_range(2..=5);
            let e = w * rng.gen_range(1..=4);
            let tokens = rng.gen_range(0..40);
            let counts = random_counts(&mut rng, w, e, tokens);
            let recv: usize = (0..w)
                .map(|d| {
                    counts
                        .iter()
                        .flat_map(|r| &r[d * e / w..(d + 1) * e / w])
                        .sum::<u32>()
                })
                .max()
                .unwrap() as usize;
            let g = geometry(w, e, 2, recv + rng.gen_range(0..3), 40);
            let pieces = g.data_pieces(0, &counts).unwrap();
            for to in 0..w {
                let mut used: Vec<(usize, usize)> = Vec::new();
                let mut areas = std::collections::BTreeSet::new();
                for p in pieces
                    .iter()
                    .filter(|p| p.to == to && matches!(p.kind, Kind::Dispatch { .. }))
                {
                    let place = g.token_place(&counts, p);
                    let rows = p.region.bytes() / g.row_bytes;
                    used.push((place.index, place.index + 4 * rows));
                    used.push((place.ratio, place.ratio + 4 * rows));
                    // A pair's arrays are its pieces' arrays in expert order:
                    // what the expert side reads back whole for combine.
                    let Kind::Dispatch { le } = p.kind else {
                        unreachable!()
                    };
                    let pair = g.pair_place(&counts, p.from, to, 0);
                    let before: usize = (0..le)
                        .map(|l| counts[p.from][to * (e / w) + l] as usize)
                        .sum();
                    assert_eq!(place.index, pair.index + 4 * before, "{p}");
                    assert_eq!(place.ratio, pair.ratio + 4 * before, "{p}");
                    assert_eq!(
                        (place.tokens, place.pair_rows),
                        (pair.tokens, pair.pair_rows)
                    );
                    if areas.insert(place.tokens) {
                        let end = place.tokens + place.pair_rows * g.row_bytes;
                        used.push((place.tokens, end));
                    }
                    assert_eq!(place.tokens % 16, 0, "{p}");
                }
                used.retain(|r| r.1 > r.0);
                used.sort();
                assert!(used.windows(2).all(|x| x[0].1 <= x[1].0), "{used:?}");
                if let Some(last) = used.last() {
                    assert!(last.1 <= g.inbox_bytes(Buf::Recv), "{last:?}");
                }
            }
        }
    }

    #[test]
    fn buffers_index_their_table() {
        for (i, b) in Buf::ALL.into_iter().enumerate() {
            assert_eq!(b.index(), i);
        }
    }

    #[test]
    fn counts_pieces_alternate_slots_by_epoch() {
        let g = geometry(3, 6, 1, 10, 10);
        let a = g.counts_piece(1, 2, 4);
        let b = g.counts_piece(1, 2, 5);
        assert_eq!(a.region.offset, 6 * 4);
        assert_eq!(b.region.offset, (3 + 1) * 6 * 4);
        assert_eq!(a.signal, 1);
        assert!(b.region.end() <= g.bytes(Buf::Counts));
    }

    #[test]
    fn counts_over_a_capacity_are_refused_by_name() {
        let g = geometry(2, 4, 1, 5, 4);
        let err = g
            .data_pieces(0, &[vec![3, 3, 0, 0], vec![0, 0, 0, 0]])
            .unwrap_err();
        assert!(err.to_string().contains("rank 0 sends 6 rows"), "{err}");
        let err = g
            .data_pieces(0, &[vec![2, 2, 0, 0], vec![1, 1, 0, 0]])
            .unwrap_err();
        assert!(err.to_string().contains("rank 0 receives 6 rows"), "{err}");
        let err = g.data_pieces(0, &[vec![0; 4]]).unwrap_err();
        assert!(err.to_string().contains("2 x 4"), "{err}");
    }
}
