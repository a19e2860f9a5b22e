//! The loop that runs one rank's NCCL proxy over a layer call: it turns
//! [`PairScheduler`]'s actions into work on the device side and the
//! device side's completions back into the scheduler, as
//! [`crate::staged::StagedProxy::call`] does for host-memory transports.
//!
//! [`NcclLanes`] is everything the loop needs from the device side, small
//! enough to implement over a CPU simulator (the tests) and over CUDA and
//! NCCL (`crate::nccl_device::CudaLanes`, features `gpu` and `nccl`). The
//! loop never blocks in it: every method posts or looks and returns, so
//! one thread keeps every lane of the rank moving. What a GPU
//! implementation must do is on [`NcclLanes`].

use super::schedule::{Action, Op, PairScheduler, Phase};
use super::{check_geometry, read_counts};
use crate::error::SchedError;
use crate::proxy_plan::{Buf, Geometry, Piece};
use comet_transport::signal_core::Backoff;
use std::time::{Duration, Instant};

/// The device side of one rank's NCCL proxy, as its loop sees it. Posting
/// methods return once the op is queued, never waiting for it; the loop
/// learns of its completion through [`NcclLanes::poll_completed`]. An
/// error from any method ends the call at once with that error, so it
/// should name what failed (the lane, the peer).
///
/// # What a GPU implementation of [`NcclLanes`] must do
///
/// (`crate::nccl_device::CudaLanes` does it, with
/// [`super::lanes`] for the splits and the addresses.)
///
/// - **Lanes.** One NCCL communicator per *ordered* pair `(a, b)` holding
///   just `a` and `b`, split from a world communicator with
///   `ncclCommSplit` (collective on the parent: every rank calls it for
///   every split, passing `NCCL_SPLIT_NOCOLOR` where it is not in the pair;
///   the pairs of one round of a round-robin tournament can share one split
///   call, one colour per pair, so 2(W-1) calls make them all). A rank sends
///   to `b` on lane `(me, b)` and receives from `a` on lane `(a, me)`, each
///   lane on a stream of its own. Ordered, not one per unordered pair: a
///   recv from `b` that waits for `b`'s kernels must never sit on the stream
///   ahead of the send to `b` those kernels need. Never group ops of
///   different lanes (`ncclGroupStart/End` would tie them together).
/// - **send.** A 2-D piece (`region.rows > 1`, combine chunks) is packed
///   first by a 2-D copy from the mirror of `to`'s buffer into device send
///   staging at `piece.wire` (one image of each buffer per peer; wire ranges
///   of one call and receiver are disjoint), on the lane's stream, then
///   `ncclSend` of `region.bytes()` bytes from there; a 1-D piece goes
///   straight from the mirror. Then record an event on the lane's stream.
/// - **recv.** `ncclRecv` of `region.bytes()` bytes into device receive
///   staging (one image of each buffer, wire layout) at `piece.wire`, on
///   the lane's stream, then an event.
/// - **land.** On a landing stream shared by all lanes and created before
///   the kernels' streams (as `staged_device`'s proxy stream, for the same
///   reason: streams beyond the hardware queues share them, and a landing
///   queued behind a kernel that spins on its signal stalls until the
///   timeout): a copy (2-D for combine chunks) from receive staging into
///   `region` of the own buffer, then the signal write to `value` (the
///   raise `staged_device::CudaStaging::land` uses), then an event. No wait
///   on the recv's event is needed: the loop posts a landing only after it
///   saw that event complete.
/// - **raise.** The signal write alone, on the landing stream.
/// - **poll_completed.** `cuEventQuery` on the event of every op in flight,
///   reporting each that is done, once; an event pool reused across calls.
///   Never synchronise. When nothing completed, ask each lane's
///   communicator for `ncclCommGetAsyncError`, so a failed or aborted peer
///   is an error naming it, not a timeout.
/// - **read_count_buffer.** A synchronous copy of the counts buffer
///   (`Geometry::bytes(Buf::Counts)`, a few hundred bytes) to the host, by
///   a kernel storing into mapped pinned memory: a copy engine's download
///   can wait behind a caller's download queued behind the call.
/// - **ready.** The mapped pinned ready words `staged_device` already gives
///   the staged proxy.
/// - **stopped.** The layer's stop flag, set when it is dropped.
///
/// Staging is device memory (NCCL moves device memory; no host copy on
/// either end). The loop runs on a proxy thread fed each call's epoch, as
/// `proxy_layer::StagedLayer` runs every proxy (context bound, capture
/// mode relaxed). Every lane holds an NCCL kernel while its op waits, and
/// the fused kernels spin while they wait for what it brings, so its CTAs
/// must find SMs the layer leaves free: bound them per lane (the lane
/// communicators' `maxCTAs`; `NCCL_MAX_NCHANNELS` in the environment
/// works too) and leave that many SMs to NCCL
/// (`LayerOptions::reserved_sms`).
pub trait NcclLanes {
    /// This rank's ready word `signal` for peer `to` (acquire: the bytes of
    /// the mirror it covers are final once its value is seen).
    fn ready(&self, to: usize, signal: usize) -> u64;

    /// Posts the send of `piece` (`piece.from` is this rank) to `piece.to`:
    /// `region` of the mirror of `to`'s buffer, packed to `region.bytes()`
    /// bytes. The loop posts a piece only once its ready word is up, and the
    /// sends to one peer in the order NCCL matches them with the peer's
    /// recvs; the implementation keeps that order on the wire (one lane per
    /// ordered pair, in posting order) and lets no lane wait for another.
    /// Complete once the mirror and any staging may be written again.
    fn send(&mut self, op: Op, piece: &Piece) -> Result<(), SchedError>;

    /// Posts the recv of `piece` (`piece.to` is this rank) from
    /// `piece.from` into receive staging at `piece.wire`, `region.bytes()`
    /// bytes, on the lane of that pair, in posting order. Complete once the
    /// bytes are in staging.
    fn recv(&mut self, op: Op, piece: &Piece) -> Result<(), SchedError>;

    /// Posts the landing of a piece whose recv completed: copies its packed
    /// bytes from receive staging at `piece.wire` into `region` of this
    /// rank's own buffer, then raises this rank's signal `piece.signal` to
    /// `value`, in that order (the kernels must never see the signal before
    /// the bytes). Not behind the lane's later recvs. Complete once the
    /// signal is raised.
    fn land(&mut self, op: Op, piece: &Piece, value: u64) -> Result<(), SchedError>;

    /// Raises this rank's signal `piece.signal` to `value` for a piece of
    /// zero bytes (nothing moves, no completion is reported).
    fn raise(&mut self, piece: &Piece, value: u64) -> Result<(), SchedError>;

    /// Appends the posted ops that completed since the last look, each
    /// exactly once; returns at once, appending nothing when none did.
    fn poll_completed(&mut self, done: &mut Vec<Op>) -> Result<(), SchedError>;

    /// Copies this rank's counts buffer (device layout, `out.len()` bytes,
    /// the buffer's size) into `out`, complete when it returns. The loop
    /// calls it once the count exchange's landings completed.
    fn read_count_buffer(&mut self, out: &mut [u8]) -> Result<(), SchedError>;

    /// Whether the owner asked the proxy to give up the call in flight
    /// (the layer is being dropped).
    fn stopped(&self) -> bool {
        false
    }
}

/// What one [`NcclProxy::call`] moved on this rank.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NcclStats {
    /// The call's counts exceed a capacity: every rank refused it after the
    /// count exchange, and nothing else moved.
    pub refused: bool,
    /// Sends and recvs completed, landings completed, zero-byte raises.
    pub sent: usize,
    pub received: usize,
    pub landed: usize,
    pub raised: usize,
    pub bytes_sent: usize,
    pub bytes_landed: usize,
}

/// One rank's NCCL proxy: runs each layer call to its end over the lanes.
#[derive(Debug)]
pub struct NcclProxy {
    rank: usize,
    geo: Geometry,
    timeout: Duration,
    /// A host image of the counts buffer, reused by every call.
    counts: Vec<u8>,
    /// Completions of one look, reused.
    done: Vec<Op>,
}

impl NcclProxy {
    /// The proxy of `rank` for a layer laid out as `geo`; `timeout` bounds
    /// how long a call may stand still.
    pub fn new(rank: usize, geo: Geometry, timeout: Duration) -> Result<Self, SchedError> {
        check_geometry(&geo, rank)?;
        if rank >= geo.ranks {
            return Err(SchedError::Input {
                rank,
                message: format!("rank {rank} is not in a world of {}", geo.ranks),
            });
        }
        Ok(NcclProxy {
            rank,
            geo,
            timeout,
            counts: vec![0; geo.bytes(Buf::Counts)],
            done: Vec::new(),
        })
    }

    /// Runs call `epoch` to its end on this rank: the count exchange, then
    /// every piece of the layer this rank sends or receives, once the
    /// counts are known here. A call whose counts some buffer cannot hold is
    /// refused by every rank's kernels alike: its count pieces finish,
    /// nothing else moves, and it returns with `refused` set, so the next
    /// call starts whole. Errors: any from the lanes, at once; nothing
    /// moving for the timeout (the first piece still waiting, named); the
    /// lanes asking to stop.
    pub fn call(&mut self, lanes: &mut dyn NcclLanes, epoch: u64) -> Result<NcclStats, SchedError> {
        let me = self.rank;
        let mut stats = NcclStats::default();
        if self.geo.ranks == 1 {
            // No peer, no piece: the kernels raise every signal themselves.
            return Ok(stats);
        }
        let mut s = PairScheduler::new(me, self.geo, epoch)?;
        let acts = s.start_counts()?;
        take(lanes, acts, epoch, &mut stats)?;
        // The bound is on standing still, not on the whole call: a call may
        // wait behind earlier work on the GPU, and each of the kernels' own
        // waits is bounded by the same timeout.
        let mut moved_at = Instant::now();
        let mut idle = 0u32;
        loop {
            let mut moved = self.post_ready(lanes, &mut s, epoch, &mut stats)?;
            moved |= self.take_completions(lanes, &mut s, epoch, &mut stats)?;
            if s.phase() == Phase::Counts && s.phase_done() {
                // Every count row has landed here (and this rank's own was
                // written before its count sends could go): the counts are
                // final in the own buffer.
                lanes.read_count_buffer(&mut self.counts)?;
                let counts = read_counts(&self.geo, me, epoch, &self.counts)?;
                if let Err(e) = self.geo.check_counts(me, &counts) {
                    tracing::debug!(rank = me, epoch, error = %e, "nccl proxy: call refused");
                    stats.refused = true;
                    return Ok(stats);
                }
                let acts = s.start_layer(&counts)?;
                take(lanes, acts, epoch, &mut stats)?;
                moved = true;
            }
            if s.done() {
                tracing::trace!(rank = me, epoch, ?stats, "nccl proxy call done");
                return Ok(stats);
            }
            if moved {
                idle = 0;
                moved_at = Instant::now();
                continue;
            }
            if lanes.stopped() {
                return Err(SchedError::Device {
                    rank: me,
                    message: format!("nccl proxy stopped with call {epoch} in flight"),
                });
            }
            let waited = moved_at.elapsed();
            if waited >= self.timeout {
                return Err(self.timed_out(lanes, &s, epoch, waited));
            }
            idle = idle.saturating_add(1);
            match Backoff::idle(idle) {
                Some(d) => std::thread::sleep(d),
                None => std::thread::yield_now(),
            }
        }
    }

    /// Looks at the ready word of each pair's next send and posts what came
    /// up (a pair's later sends follow at once when theirs are up too).
    /// Whether anything was posted.
    fn post_ready(
        &self,
        lanes: &mut dyn NcclLanes,
        s: &mut PairScheduler,
        epoch: u64,
        stats: &mut NcclStats,
    ) -> Result<bool, SchedError> {
        let mut moved = false;
        loop {
            let mut acts = Vec::new();
            // Only the heads: a pair's later pieces cannot go before them,
            // and each head that goes brings the next one into view here.
            for p in s.blocked() {
                if lanes.ready(p.to, p.signal) >= epoch {
                    acts.extend(s.ready(p.to, p.signal)?);
                }
            }
            if acts.is_empty() {
                return Ok(moved);
            }
            moved = true;
            take(lanes, acts, epoch, stats)?;
        }
    }

    /// Hands every op the lanes report completed to the scheduler and
    /// posts what follows (a recv's landing). Whether any completed.
    fn take_completions(
        &mut self,
        lanes: &mut dyn NcclLanes,
        s: &mut PairScheduler,
        epoch: u64,
        stats: &mut NcclStats,
    ) -> Result<bool, SchedError> {
        self.done.clear();
        lanes.poll_completed(&mut self.done)?;
        for &op in &self.done {
            let bytes = s.piece(op).map_or(0, |p| p.region.bytes());
            // The scheduler refuses an op it did not post, before any count.
            let acts = s.completed(op)?;
            match op {
                Op::Send(_) => {
                    stats.sent += 1;
                    stats.bytes_sent += bytes;
                }
                Op::Recv(_) => stats.received += 1,
                Op::Land(_) => {
                    stats.landed += 1;
                    stats.bytes_landed += bytes;
                }
            }
            take(lanes, acts, epoch, stats)?;
        }
        Ok(!self.done.is_empty())
    }

    /// The error of a call that stood still: the first pair whose next
    /// send waits for the kernels, else the first op in flight (recvs, then
    /// sends, then landings, by their place in the list).
    fn timed_out(
        &self,
        lanes: &dyn NcclLanes,
        s: &PairScheduler,
        epoch: u64,
        waited: Duration,
    ) -> SchedError {
        let mut ops = s.in_flight();
        ops.sort_by_key(|op| match *op {
            Op::Recv(i) => (0, i),
            Op::Send(i) => (1, i),
            Op::Land(i) => (2, i),
        });
        let what = match (s.blocked().first(), ops.first()) {
            (Some(p), _) => format!(
                "the kernels' ready word of {p} (it is {}, the call is {epoch})",
                lanes.ready(p.to, p.signal)
            ),
            (None, Some(&op)) => match (op, s.piece(op)) {
                (Op::Recv(_), Some(p)) => format!("the recv of {p} from rank {}", p.from),
                (Op::Send(_), Some(p)) => format!("rank {} to receive {p}", p.to),
                (Op::Land(_), Some(p)) => format!("the landing of {p}"),
                (_, None) => format!("{op:?}"),
            },
            (None, None) => "nothing (the scheduler is stuck)".into(),
        };
        SchedError::NcclTimeout {
            rank: self.rank,
            epoch,
            what,
            in_flight: ops.len(),
            waited,
        }
    }
}

/// Does `acts` on the lanes, in order.
fn take(
    lanes: &mut dyn NcclLanes,
    acts: Vec<Action>,
    epoch: u64,
    stats: &mut NcclStats,
) -> Result<(), SchedError> {
    for a in acts {
        match a {
            Action::Post {
                op: op @ Op::Send(_),
                piece,
            } => lanes.send(op, &piece)?,
            Action::Post {
                op: op @ Op::Recv(_),
                piece,
            } => lanes.recv(op, &piece)?,
            Action::Post {
                op: op @ Op::Land(_),
                piece,
            } => lanes.land(op, &piece, epoch)?,
            Action::Raise { piece, value } => {
                lanes.raise(&piece, value)?;
                stats.raised += 1;
            }
        }
    }
    Ok(())
}
