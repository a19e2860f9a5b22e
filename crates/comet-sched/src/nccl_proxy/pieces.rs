//! The ordered piece list of one layer call over NCCL, derived identically
//! on every rank: the count exchange (fixed size, known before any count),
//! then from the count matrix the dispatch segments and combine chunks.
//!
//! NCCL sends and receives contiguous bytes, so the rows a piece carries
//! must be contiguous on both sides. The regions below are laid out so:
//! - dispatch: the sender stages its routed rows in send order (global
//!   expert order, slot order inside), so segment `(e, src)` is one block;
//!   it lands in the receive buffer at its segment (comet-core's layout);
//! - combine: the expert rank packs FC2 output chunk-major, and inside a
//!   chunk by source rank, so what goes back to one source is one block;
//!   the source receives it chunk-major in its own send order, the order
//!   its reduce already reads in. Own rows never travel (they stay in
//!   place, as in the device forward), so own combine pieces do not exist.

use super::NcclProxyError;
use comet_core::layout::LayoutPlan;
use comet_core::schedule::SignalMap;
use comet_core::MoeConfig;

/// A rank's memory a piece reads from or writes into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Region {
    /// `u32 [2 (epoch parity)][W][E]`: row `src` holds `src`'s counts.
    Counts,
    /// The sender's routed rows in send order (dispatch source).
    SendRows,
    /// The receive buffer, expert-major segments (dispatch destination).
    RecvRows,
    /// FC2 output packed chunk-major, then by source (combine source).
    CombineSend,
    /// Combine results, chunk-major, then in send order (combine destination).
    CombineRecv,
}

/// A byte offset in one region of one rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Place {
    pub region: Region,
    pub offset: usize,
}

/// What a piece carries (for logs and errors).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PieceKind {
    /// `src`'s row of the count matrix.
    Count { src: usize },
    /// Segment `(local expert, src)` of the receiver.
    Dispatch { expert: usize, src: usize },
    /// Column chunk `chunk` of the rows expert rank `from` computed for the
    /// receiver.
    Combine { from: usize, chunk: usize },
}

/// One transfer of a call: `len` bytes from `from` on `sender` to `to` on
/// `receiver`, posted once ready word `ready` of the sender reached the
/// call's epoch; once landed, `signal` (a wire index) is raised on the
/// receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NcclPiece {
    pub kind: PieceKind,
    pub sender: usize,
    pub receiver: usize,
    pub from: Place,
    pub to: Place,
    pub len: usize,
    pub ready: usize,
    pub signal: u32,
}

/// The ready words of one rank, raised by its kernels and polled by its
/// proxy: one for its count row, one per global expert (its rows for that
/// expert are staged) and one per (chunk, source rank) (that chunk's rows
/// for that source are packed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadyMap {
    pub ranks: usize,
    pub experts: usize,
    pub chunks: usize,
}

impl ReadyMap {
    pub fn count(&self) -> usize {
        0
    }
    pub fn dispatch(&self, expert: usize) -> usize {
        1 + expert
    }
    pub fn combine(&self, chunk: usize, to: usize) -> usize {
        1 + self.experts + chunk * self.ranks + to
    }
    pub fn len(&self) -> usize {
        1 + self.experts + self.chunks * self.ranks
    }
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// The shape of one layer call over NCCL; every rank builds the same one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NcclCall {
    cfg: MoeConfig,
    chunk_cols: usize,
    recv_capacity: usize,
    send_capacity: usize,
    epoch: u64,
    row_bytes: usize,
    map: SignalMap,
    ready: ReadyMap,
}

fn plan_err(message: String) -> NcclProxyError {
    NcclProxyError::Plan(message)
}

impl NcclCall {
    /// `chunk_cols` columns per combine chunk (divides `hidden`); buffers
    /// hold `recv_capacity` received and `send_capacity` sent rows; the
    /// call's `epoch` picks the count block (its parity) and is the value
    /// every signal is raised to.
    pub fn new(
        cfg: &MoeConfig,
        chunk_cols: usize,
        recv_capacity: usize,
        send_capacity: usize,
        epoch: u64,
    ) -> Result<NcclCall, NcclProxyError> {
        cfg.validate().map_err(|e| plan_err(e.to_string()))?;
        if chunk_cols == 0 || !cfg.hidden.is_multiple_of(chunk_cols) {
            return Err(plan_err(format!(
                "chunk_cols {chunk_cols} does not divide hidden {}",
                cfg.hidden
            )));
        }
        let row_bytes = cfg
            .hidden
            .checked_mul(cfg.dtype.bytes())
            .ok_or_else(|| plan_err(format!("hidden {} overflows a row's bytes", cfg.hidden)))?;
        // Every offset below stays inside a region, so checking the regions'
        // sizes once rules out overflow in the offsets.
        for (what, rows) in [("recv", recv_capacity), ("send", send_capacity)] {
            if rows.checked_mul(row_bytes).is_none() {
                return Err(plan_err(format!(
                    "{what} capacity of {rows} rows overflows its bytes"
                )));
            }
        }
        if cfg
            .ranks
            .checked_mul(cfg.experts)
            .and_then(|n| n.checked_mul(8))
            .is_none()
        {
            return Err(plan_err(format!(
                "{} ranks x {} experts overflow the count region's bytes",
                cfg.ranks, cfg.experts
            )));
        }
        let chunks = cfg.hidden / chunk_cols;
        Ok(NcclCall {
            map: SignalMap::new(cfg, chunks),
            ready: ReadyMap {
                ranks: cfg.ranks,
                experts: cfg.experts,
                chunks,
            },
            cfg: cfg.clone(),
            chunk_cols,
            recv_capacity,
            send_capacity,
            epoch,
            row_bytes,
        })
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }
    pub fn ranks(&self) -> usize {
        self.cfg.ranks
    }
    pub fn ready_map(&self) -> ReadyMap {
        self.ready
    }
    pub fn signal_map(&self) -> SignalMap {
        self.map
    }

    fn chunk_bytes(&self) -> usize {
        self.chunk_cols * self.cfg.dtype.bytes()
    }

    /// Bytes of `region` on every rank (regions are symmetric).
    pub fn region_bytes(&self, region: Region) -> usize {
        match region {
            Region::Counts => 2 * self.cfg.ranks * self.cfg.experts * 4,
            Region::SendRows | Region::CombineRecv => self.send_capacity * self.row_bytes,
            Region::RecvRows | Region::CombineSend => self.recv_capacity * self.row_bytes,
        }
    }

    /// Where this call's count matrix lies in the count region, and its
    /// length: what [`decode_counts`] reads once the count phase is done.
    pub fn counts_block(&self) -> (Place, usize) {
        let row = self.cfg.experts * 4;
        let at = (self.epoch & 1) as usize * self.cfg.ranks * row;
        (
            Place {
                region: Region::Counts,
                offset: at,
            },
            self.cfg.ranks * row,
        )
    }

    /// The count exchange: every rank's row to every rank (itself too, in
    /// place), raising `count(src)` there. Fixed size, so it needs no count.
    pub fn count_pieces(&self) -> Vec<NcclPiece> {
        let w = self.cfg.ranks;
        let row = self.cfg.experts * 4;
        let (block, _) = self.counts_block();
        let mut out = Vec::with_capacity(w * w);
        for src in 0..w {
            let at = Place {
                region: Region::Counts,
                offset: block.offset + src * row,
            };
            for dst in 0..w {
                out.push(NcclPiece {
                    kind: PieceKind::Count { src },
                    sender: src,
                    receiver: dst,
                    from: at,
                    to: at,
                    len: row,
                    ready: self.ready.count(),
                    signal: src as u32,
                });
            }
        }
        out
    }

    /// The dispatch segments and combine chunks of the call, from the count
    /// matrix `counts[src][global expert]` the count phase delivered.
    /// Errors name what is wrong: the matrix's shape, a count beyond the
    /// u32 the exchange carries, or a rank over a buffer's capacity.
    pub fn layer_pieces(&self, counts: &[Vec<usize>]) -> Result<Vec<NcclPiece>, NcclProxyError> {
        for (src, row) in counts.iter().enumerate() {
            if let Some((e, c)) = row.iter().enumerate().find(|(_, &c)| c > u32::MAX as usize) {
                return Err(plan_err(format!(
                    "count of rank {src} for expert {e} is {c}, beyond u32"
                )));
            }
        }
        let plan =
            LayoutPlan::new(&self.cfg, counts.to_vec()).map_err(|e| plan_err(e.to_string()))?;
        let w = self.cfg.ranks;
        for r in 0..w {
            let (recv, sent) = (plan.recv[r].total_rows, plan.rows_sent(r));
            if recv > self.recv_capacity {
                return Err(plan_err(format!(
                    "rank {r} would receive {recv} rows, over the receive capacity {}",
                    self.recv_capacity
                )));
            }
            if sent > self.send_capacity {
                return Err(plan_err(format!(
                    "rank {r} would send {sent} rows, over the send capacity {}",
                    self.send_capacity
                )));
            }
        }
        let mut out = self.dispatch_pieces(&plan);
        out.extend(self.combine_pieces(&plan));
        Ok(out)
    }

    /// Per pair, segments in local-expert order.
    fn dispatch_pieces(&self, plan: &LayoutPlan) -> Vec<NcclPiece> {
        let (w, epr, rb) = (self.cfg.ranks, self.cfg.experts_per_rank(), self.row_bytes);
        let mut out = Vec::with_capacity(w * self.cfg.experts);
        for src in 0..w {
            for dst in 0..w {
                for le in 0..epr {
                    let e = self.cfg.global_expert(dst, le);
                    let seg = plan.recv[dst].segment(le, src, w);
                    out.push(NcclPiece {
                        kind: PieceKind::Dispatch { expert: le, src },
                        sender: src,
                        receiver: dst,
                        from: Place {
                            region: Region::SendRows,
                            offset: plan.send_offset(src, e) * rb,
                        },
                        to: Place {
                            region: Region::RecvRows,
                            offset: seg.row * rb,
                        },
                        len: seg.rows * rb,
                        ready: self.ready.dispatch(e),
                        signal: self.map.wire(self.map.dispatch(le, src)).index(),
                    });
                }
            }
        }
        out
    }

    /// Per pair, chunks in order (FC2 finishes them in that order).
    fn combine_pieces(&self, plan: &LayoutPlan) -> Vec<NcclPiece> {
        let (w, epr, cb) = (
            self.cfg.ranks,
            self.cfg.experts_per_rank(),
            self.chunk_bytes(),
        );
        let mut out = Vec::new();
        for from in 0..w {
            // The packed chunk of `from` holds every other source's rows,
            // by source rank; `before[to]` rows precede those of `to`.
            let mut before = vec![0; w];
            let mut packed = 0;
            for (to, b) in before.iter_mut().enumerate() {
                *b = packed;
                if to != from {
                    packed += plan.rows_between(to, from);
                }
            }
            for (to, &b) in before.iter().enumerate().filter(|&(to, _)| to != from) {
                let rows = plan.rows_between(to, from);
                let sent = plan.rows_sent(to);
                let back = plan.send_offset(to, from * epr);
                for chunk in 0..self.ready.chunks {
                    out.push(NcclPiece {
                        kind: PieceKind::Combine { from, chunk },
                        sender: from,
                        receiver: to,
                        from: Place {
                            region: Region::CombineSend,
                            offset: (chunk * packed + b) * cb,
                        },
                        to: Place {
                            region: Region::CombineRecv,
                            offset: (chunk * sent + back) * cb,
                        },
                        len: rows * cb,
                        ready: self.ready.combine(chunk, to),
                        signal: self.map.wire(self.map.combine(from, chunk)).index(),
                    });
                }
            }
        }
        out
    }
}

/// The count matrix from the bytes of [`NcclCall::counts_block`]
/// (little-endian u32 per count, row per source rank).
pub fn decode_counts(
    raw: &[u8],
    ranks: usize,
    experts: usize,
) -> Result<Vec<Vec<usize>>, NcclProxyError> {
    if ranks.checked_mul(experts).and_then(|n| n.checked_mul(4)) != Some(raw.len()) {
        return Err(plan_err(format!(
            "count block of {} bytes, not {ranks} ranks x {experts} experts x 4",
            raw.len()
        )));
    }
    let words: Vec<usize> = raw
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .collect();
    Ok(words
        .chunks(experts.max(1))
        .map(<[usize]>::to_vec)
        .collect())
}
