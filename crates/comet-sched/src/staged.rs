//! The proxy of one rank whose transport moves host memory only (UCX over
//! TCP or shared memory): the device forward's kernels run unchanged over
//! local mirrors of the peers' buffers and local ready words, and this
//! proxy carries each piece across as its ready word comes up, staged
//! through host memory on both ends.
//!
//! Per call (epoch `n`), for every peer:
//! - send: once the kernels have raised a piece's ready word to `n`, copy
//!   the piece's bytes out of the device mirror into host staging, put
//!   them into the peer's inbox (a transport buffer, same layout), then
//!   raise the piece's signal there: the transport orders the signal
//!   behind the puts, so an arrival never overtakes its bytes;
//! - land: once a peer's signal has arrived in this rank's inbox, copy the
//!   bytes into the device buffer and raise the signal the kernels wait on,
//!   in that order.
//!
//! The count exchange goes first at fixed offsets; with every rank's row of
//! counts known, [`Geometry::data_pieces`] names every other piece of the
//! call, on both ends alike. Pieces go out and land in the order they
//! become ready, many in flight.
//!
//! Reusing staging across calls is safe for the reason the kernels' own
//! buffers are: a peer raises call n+1's count only after it has received
//! everything of call n from this rank, and this rank stages call n+1's
//! data only after its kernels saw every peer's count of n+1.
//!
//! Downloads are pipelined: the proxy starts each ready piece's copy into
//! host staging at once and puts pieces out as their copies finish, so the
//! copies run beside the wire. Landings of one call are not waited for one
//! by one (their wire bytes never overlap), only at the call's end.
//!
//! [`StagedDevice`] is the device side (CUDA copies and mapped ready words
//! on a GPU; host memory in tests), so all of this runs on a laptop.

use crate::error::SchedError;
use crate::proxy_plan::{words, Buf, Geometry, Kind, Piece, Region};
use comet_transport::signal_core::Backoff;
use comet_transport::{BufferId, SignalId, SignalOp, Transport, TransportError};
use std::time::{Duration, Instant};

/// A download in flight: downloads finish in the order they were started.
pub type Ticket = u64;

/// The device side of a staged rank, as its proxy sees it. It owns the
/// host staging (pinned on a GPU, so copies run at the link's speed): an
/// image per peer of each buffer in wire layout for sending, and one of
/// each buffer for landing.
pub trait StagedDevice {
    /// This rank's ready word `signal` for peer `to` (acquire: the mirror
    /// bytes it covers are final once it is seen).
    fn ready(&self, to: usize, signal: usize) -> u64;

    /// Starts copying `region` of this rank's mirror of `to`'s buffer,
    /// packed, into the send image of `to`'s `region.buf` at `wire`. It
    /// runs beside the proxy's puts of earlier pieces; those bytes are
    /// not to be read before [`StagedDevice::downloaded`] says so.
    fn download(&mut self, to: usize, region: Region, wire: usize) -> Result<Ticket, SchedError>;

    /// Whether download `ticket` (and every earlier one) has finished.
    fn downloaded(&mut self, ticket: Ticket) -> Result<bool, SchedError>;

    /// `len` bytes of the send image of `to`'s `buf` at `wire`: what a
    /// finished download put there.
    fn sent_bytes(&self, to: usize, buf: Buf, wire: usize, len: usize) -> &[u8];

    /// `len` bytes of the landing image of `buf` at `wire`, for the proxy
    /// to fill with a piece that arrived (pieces of one call never share
    /// wire bytes, so no landing of the call is waited for).
    fn landing_bytes(&mut self, buf: Buf, wire: usize, len: usize) -> &mut [u8];

    /// Copies the piece at `wire` of the landing image into `region` of
    /// this rank's own buffer and then raises this rank's signal `signal`
    /// to `value`: the kernels never see the signal before the bytes. The
    /// raise may complete later, in order with earlier ones.
    fn land(
        &mut self,
        region: Region,
        wire: usize,
        signal: usize,
        value: u64,
    ) -> Result<(), SchedError>;

    /// The call's landings have finished (its landing bytes may be
    /// reused by the next call).
    fn end_call(&mut self) -> Result<(), SchedError>;

    /// Whether the owner asked the proxy to give up the call in flight
    /// (the layer is being dropped).
    fn stopped(&self) -> bool {
        false
    }
}

/// What one [`StagedProxy::call`] moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StagedStats {
    /// The call's counts exceed a capacity: every rank refused it.
    pub refused: bool,
    pub sent: usize,
    pub landed: usize,
    pub bytes_sent: usize,
    pub bytes_landed: usize,
}

/// One rank's staged proxy: its inboxes on the transport.
pub struct StagedProxy<'t> {
    t: &'t dyn Transport,
    geo: Geometry,
    inbox: [BufferId; 3],
    timeout: Duration,
}

impl<'t> StagedProxy<'t> {
    /// Collective: allocates the inboxes of `geo`'s buffers and the signal
    /// words on `t`, then meets every rank (no peer puts into an inbox
    /// before its owner has it). A layer that allocates its buffers itself
    /// (a [`crate::staged_device::StagedTransport`] under the device
    /// forward) skips this and names its inboxes to [`StagedProxy::new`].
    pub fn allocate(
        t: &dyn Transport,
        geo: Geometry,
        timeout: Duration,
    ) -> Result<[BufferId; 3], SchedError> {
        let inbox = [
            t.alloc_buffer(geo.bytes(Buf::Counts))?,
            t.alloc_buffer(geo.bytes(Buf::Recv))?,
            t.alloc_buffer(geo.bytes(Buf::Comb))?,
        ];
        t.alloc_signals(geo.signal_count())?;
        t.barrier(timeout)?;
        Ok(inbox)
    }

    /// This rank's proxy over `t`, whose buffers `inbox` (counts, recv,
    /// comb, each of `geo`'s size) receive the peers' pieces.
    pub fn new(
        t: &'t dyn Transport,
        geo: Geometry,
        inbox: [BufferId; 3],
        timeout: Duration,
    ) -> Result<Self, SchedError> {
        let (w, rank) = (geo.ranks, t.rank());
        if t.world() != w || rank >= w {
            return Err(SchedError::Input {
                rank,
                message: format!("a layer of {w} ranks over a transport of {}", t.world()),
            });
        }
        Ok(StagedProxy {
            t,
            geo,
            inbox,
            timeout,
        })
    }

    /// Runs call `epoch` to its end: every piece this rank sends and every
    /// piece it receives. A call whose counts some buffer cannot hold is
    /// refused by every rank's kernels alike and moves nothing: its count
    /// pieces still finish and it returns with `refused` set, so the next
    /// call starts whole. Errors: a transport error at once (a peer gone is
    /// named by it); nothing moving for the timeout, the first piece still
    /// waiting, named; the device side asking to stop.
    pub fn call(
        &mut self,
        dev: &mut dyn StagedDevice,
        epoch: u64,
    ) -> Result<StagedStats, SchedError> {
        let (w, me) = (self.geo.ranks, self.t.rank());
        let mut stats = StagedStats::default();
        let peers = || (0..w).filter(move |&p| p != me);
        let mut sends: Vec<Piece> = peers()
            .map(|p| self.geo.counts_piece(me, p, epoch))
            .collect();
        let mut lands: Vec<Piece> = peers()
            .map(|p| self.geo.counts_piece(p, me, epoch))
            .collect();
        let mut rows: Vec<Option<Vec<u32>>> = vec![None; w];
        // Downloads started, oldest first: put out as they finish.
        let mut staging: std::collections::VecDeque<(Piece, Ticket)> = Default::default();
        let mut planned = w == 1;
        // The bound is on standing still, not on the whole call: a call
        // may wait behind earlier work on the GPU, and each of the
        // kernels' own waits is bounded by the same timeout.
        let mut moved_at = Instant::now();
        let mut idle = 0u32;
        while !(planned && sends.is_empty() && staging.is_empty() && lands.is_empty()) {
            let before = sends.len() + staging.len() + lands.len();
            self.stage_ready(dev, epoch, &mut sends, &mut staging)?;
            self.send_staged(dev, epoch, &mut staging, &mut rows, &mut stats)?;
            self.land_arrived(dev, epoch, &mut lands, &mut rows, &mut stats)?;
            if !planned && rows.iter().all(Option::is_some) {
                let counts: Vec<Vec<u32>> = rows.iter().flatten().cloned().collect();
                planned = true;
                match self.geo.data_pieces(me, &counts) {
                    Ok(all) => {
                        sends.extend(all.iter().filter(|p| p.from == me).copied());
                        lands.extend(all.iter().filter(|p| p.to == me).copied());
                    }
                    Err(e) => {
                        tracing::debug!(rank = me, epoch, error = %e, "call refused");
                        stats.refused = true;
                    }
                }
                continue;
            }
            if sends.len() + staging.len() + lands.len() != before {
                idle = 0;
                moved_at = Instant::now();
                continue;
            }
            if dev.stopped() {
                return Err(SchedError::Device {
                    rank: me,
                    message: format!("staged proxy stopped with call {epoch} in flight"),
                });
            }
            if moved_at.elapsed() >= self.timeout {
                let waiting: Vec<Piece> = staging.iter().map(|(p, _)| *p).collect();
                let sends = [waiting, sends].concat();
                return Err(self.timed_out(dev, epoch, &sends, &lands, moved_at.elapsed()));
            }
            idle = idle.saturating_add(1);
            match Backoff::idle(idle) {
                // Idle long enough to sleep: worth a look at the peers.
                Some(d) => {
                    self.check_peers(&lands, epoch)?;
                    std::thread::sleep(d)
                }
                None => std::thread::yield_now(),
            }
        }
        dev.end_call()?;
        Ok(stats)
    }

    /// Starts the download of every pending piece whose ready word has
    /// reached `epoch`.
    fn stage_ready(
        &mut self,
        dev: &mut dyn StagedDevice,
        epoch: u64,
        sends: &mut Vec<Piece>,
        staging: &mut std::collections::VecDeque<(Piece, Ticket)>,
    ) -> Result<(), SchedError> {
        let mut i = 0;
        while i < sends.len() {
            let p = sends[i];
            if dev.ready(p.to, p.signal) < epoch {
                i += 1;
                continue;
            }
            sends.swap_remove(i);
            let ticket = dev.download(p.to, p.region, p.wire)?;
            staging.push_back((p, ticket));
        }
        Ok(())
    }

    /// Puts out, oldest first, every piece whose download has finished,
    /// each followed by its signal.
    fn send_staged(
        &mut self,
        dev: &mut dyn StagedDevice,
        epoch: u64,
        staging: &mut std::collections::VecDeque<(Piece, Ticket)>,
        rows: &mut [Option<Vec<u32>>],
        stats: &mut StagedStats,
    ) -> Result<(), SchedError> {
        while let Some(&(p, ticket)) = staging.front() {
            if !dev.downloaded(ticket)? {
                break;
            }
            staging.pop_front();
            let n = p.region.bytes();
            let out = dev.sent_bytes(p.to, p.region.buf, p.wire, n);
            if p.kind == Kind::Counts && rows[p.from].is_none() {
                rows[p.from] = Some(words(out));
            }
            if n > 0 {
                self.t
                    .put(p.to, self.inbox[p.region.buf.index()], p.wire, out)?;
            }
            self.t
                .signal(p.to, p.signal as SignalId, SignalOp::Set(epoch))?;
            stats.sent += 1;
            stats.bytes_sent += n;
        }
        Ok(())
    }

    /// Lands every pending piece whose signal has arrived.
    fn land_arrived(
        &mut self,
        dev: &mut dyn StagedDevice,
        epoch: u64,
        lands: &mut Vec<Piece>,
        rows: &mut [Option<Vec<u32>>],
        stats: &mut StagedStats,
    ) -> Result<(), SchedError> {
        let mut i = 0;
        while i < lands.len() {
            let p = lands[i];
            if !self.arrived(p.signal, epoch)? {
                i += 1;
                continue;
            }
            lands.swap_remove(i);
            let n = p.region.bytes();
            let bytes = dev.landing_bytes(p.region.buf, p.wire, n);
            self.t
                .read(self.inbox[p.region.buf.index()], p.wire, bytes)?;
            if p.kind == Kind::Counts {
                rows[p.from] = Some(words(bytes));
            }
            dev.land(p.region, p.wire, p.signal, epoch)?;
            stats.landed += 1;
            stats.bytes_landed += n;
        }
        Ok(())
    }

    /// Whether this rank's inbox signal `signal` has reached `epoch`: a
    /// look (a wait for 0 returns the word at once and progresses the
    /// transport, without the liveness checks of a wait that runs out).
    fn arrived(&self, signal: usize, epoch: u64) -> Result<bool, SchedError> {
        Ok(self.t.wait(signal as SignalId, 0, Duration::ZERO)? >= epoch)
    }

    /// When nothing moved: a peer found gone is an error now, not at the
    /// call's timeout (a wait that runs out checks the peers).
    fn check_peers(&self, lands: &[Piece], epoch: u64) -> Result<(), SchedError> {
        let Some(p) = lands.first() else {
            return Ok(());
        };
        match self.t.wait(p.signal as SignalId, epoch, Duration::ZERO) {
            Ok(_) | Err(TransportError::WaitTimeout { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn timed_out(
        &self,
        dev: &dyn StagedDevice,
        epoch: u64,
        sends: &[Piece],
        lands: &[Piece],
        waited: Duration,
    ) -> SchedError {
        let rank = self.t.rank();
        let pending = sends.len() + lands.len();
        let what = match (sends.first(), lands.first()) {
            (Some(p), _) => format!(
                "the kernels' ready word of {} (it is {}, the call is {epoch})",
                p,
                dev.ready(p.to, p.signal)
            ),
            (None, Some(p)) => format!("the arrival of {p} from rank {}", p.from),
            (None, None) => "the count rows of every rank".into(),
        };
        SchedError::StagedTimeout {
            rank,
            what,
            pending,
            waited,
        }
    }
}
