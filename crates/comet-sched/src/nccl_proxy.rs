//! The NCCL side of the host proxy (issue 16, item 3): when one rank posts
//! which two-sided transfer of a layer call, for the device forward's
//! kernels running unchanged over local mirrors and ready words (on the
//! GPU: `nccl_device`).
//!
//! The pieces are [`crate::proxy_plan`]'s, the ones [`crate::staged`]
//! carries too, in the kernels' own buffer layout: the count exchange
//! first ([`Geometry::counts_piece`], fixed offsets, so it needs no
//! counts), then from the delivered count matrix every dispatch segment
//! and combine chunk ([`Geometry::data_pieces`]). Every rank derives the
//! same list. The ready word of a piece is the sender's word
//! `piece.signal` in its ready array for `piece.to`: the kernels raise the
//! word with the index of the receiver's signal.
//!
//! NCCL point-to-point is two-sided: the k-th send from `a` to `b` meets
//! the k-th recv at `b` from `a`, and both must have the same size. So
//! where the staged proxy sends in readiness order, a [`PairScheduler`]
//! sends per ordered pair in list order (a piece waits for the earlier
//! pieces of its pair; `data_pieces` lists a pair's pieces in the order the
//! kernels finish them, so such waits are short), pairs never waiting for
//! each other. The receiver posts its recvs in the same order as soon as
//! their sizes are known (the count exchange's at once, the layer's once
//! the counts have arrived) and raises a signal only after its recv has
//! completed. A piece of zero bytes has no NCCL call on either side: the
//! receiver knows its size from the counts and raises its signal at the
//! layer's start, since the kernels wait for every segment's signal. Own
//! rows never travel (the kernels write them in place and raise their own
//! signals), so there are no pieces from a rank to itself.
//!
//! On the wire a piece is its packed bytes, `region.bytes()` long:
//! - the sender sends `region` of its mirror of `to`'s buffer; a combine
//!   chunk is 2-D (column chunk of whole rows), so it is first packed by a
//!   2-D device copy into send staging at `piece.wire`, on the lane's
//!   stream ahead of the send; counts and dispatch pieces are one run and
//!   go straight from the mirror;
//! - the receiver receives into a packed staging image of `region.buf` at
//!   `piece.wire` (disjoint for all pieces of a call to one receiver, so
//!   every recv of a phase can be posted at once), then, once the recv
//!   completed, lands it ([`Op::Land`]): a copy (2-D for combine chunks)
//!   into `region` of its own buffer, then the raise of `signal` to the
//!   call's epoch, in that order, on a stream other than the lane's (which
//!   holds the pair's later recvs already). Other recvs may fill staging
//!   meanwhile, which is why wire ranges must not overlap.
//!
//! The count exchange is done on a rank once its landings are too, so the
//! driver then reads the count matrix from its own counts buffer
//! ([`read_counts`]).
//!
//! Reuse across calls: a landing of call n+1 writes the device buffers only
//! once the count exchange of n+1 is done here, which includes sending this
//! rank's own count row of n+1, raised by kernels that start after those
//! of call n have finished with the buffers. Staging is overwritten by the
//! recvs of n+1 only, posted after every landing of call n completed
//! ([`PairScheduler::done`] counts them).
//!
//! Assumption about NCCL: ops of different ordered pairs must not block
//! each other, so each ordered pair `(a, b)` is a lane of its own (a
//! communicator per ordered pair, on its own stream); within a lane ops run
//! in posting order. The simulator of the tests plays exactly this model.
//!
//! [`NcclProxy::call`] runs one call on one rank: it drives the scheduler
//! over [`NcclLanes`], the device side (ready words, posting sends, recvs
//! and landings, polling completions), the way `staged` drives its
//! `StagedDevice`. Host logic only, free of CUDA, tested on CPU against a
//! simulator of NCCL's matching; [`lanes`] (also CUDA-free, tested on CPU)
//! lays out a GPU implementation's lanes and the addresses of its ops.
//! That implementation is `nccl_device::CudaLanes` (features `gpu` and
//! `nccl`), with the mirrors and the ready words in mapped pinned memory
//! that `staged_device` gives the staged proxy too; `nccl_device::NcclLayer`
//! runs the layer with it. [`NcclLanes`]'s docs say what it does.

mod driver;
pub mod lanes;
mod schedule;

pub use driver::{NcclLanes, NcclProxy, NcclStats};
pub use schedule::{Action, Op, PairScheduler, Phase};

use crate::error::SchedError;
use crate::proxy_plan::{words, Buf, Geometry, Piece};

/// The count-exchange pieces of call `epoch`: every rank's row to every
/// other rank, from-major.
pub fn count_pieces(geo: &Geometry, epoch: u64) -> Vec<Piece> {
    let w = geo.ranks;
    (0..w)
        .flat_map(|from| {
            (0..w)
                .filter(move |&to| to != from)
                .map(move |to| (from, to))
        })
        .map(|(from, to)| geo.counts_piece(from, to, epoch))
        .collect()
}

/// The count matrix of call `epoch` (`counts[src][expert]`) from a host
/// image of `rank`'s counts buffer once its count exchange is done: each
/// row where [`Geometry::counts_piece`] lands it (its own row where its
/// kernels wrote it).
pub fn read_counts(
    geo: &Geometry,
    rank: usize,
    epoch: u64,
    image: &[u8],
) -> Result<Vec<Vec<u32>>, SchedError> {
    let need = geo.bytes(Buf::Counts);
    if image.len() < need {
        return Err(SchedError::Input {
            rank,
            message: format!(
                "a counts buffer of {} bytes, under the {need} of {} ranks x {} experts",
                image.len(),
                geo.ranks,
                geo.experts
            ),
        });
    }
    Ok((0..geo.ranks)
        .map(|src| {
            let r = geo.counts_piece(src, rank, epoch).region;
            words(&image[r.offset..r.end()])
        })
        .collect())
}

/// Checks that `geo` describes buffers the kernels could lay out (experts
/// split evenly over ranks, rows split into whole chunks) and that none of
/// its sizes overflows, so that every offset derived from it fits a
/// `usize`. Returns the number of signals per rank (and of ready words per
/// peer). `rank` reports errors.
pub fn check_geometry(geo: &Geometry, rank: usize) -> Result<usize, SchedError> {
    let bad = |m: String| Err(SchedError::Input { rank, message: m });
    let (w, e) = (geo.ranks, geo.experts);
    if w == 0 || e == 0 || !e.is_multiple_of(w) {
        return bad(format!("{e} experts over {w} ranks"));
    }
    if geo.chunks == 0 || geo.chunks.checked_mul(geo.chunk_bytes) != Some(geo.row_bytes) {
        return bad(format!(
            "{} chunks of {} bytes do not make a row of {} bytes",
            geo.chunks, geo.chunk_bytes, geo.row_bytes
        ));
    }
    if geo.groups == 0 || geo.groups > (e / w).min(comet_core::cost::MAX_GROUPS) {
        return bad(format!(
            "{} expert groups of {} local experts",
            geo.groups,
            e / w
        ));
    }
    for (what, rows) in [("receive", geo.recv_rows), ("send", geo.send_rows)] {
        if rows.checked_mul(geo.row_bytes).is_none() {
            return bad(format!(
                "a {what} capacity of {rows} rows overflows its bytes"
            ));
        }
    }
    if w.checked_mul(e).and_then(|n| n.checked_mul(8)).is_none() {
        return bad(format!(
            "{w} ranks x {e} experts overflow the counts buffer's bytes"
        ));
    }
    // count(src), dispatch(le, src) and combine(from, piece): W each per
    // local expert and per piece, plus W (Geometry::signal_count, checked
    // here); the ready words are W times that.
    let signals = geo
        .groups
        .checked_mul(geo.chunks)
        .and_then(|p| (1 + e / w).checked_add(p))
        .and_then(|n| n.checked_mul(w));
    match signals.filter(|s| s.checked_mul(w).is_some()) {
        Some(_) => Ok(geo.signal_count()),
        None => bad(format!(
            "{w} ranks x {} chunks x {} groups overflow the signal count",
            geo.chunks, geo.groups
        )),
    }
}
