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
//! Token-once ([`WireFormat::Tokens`]), both ways. A token routed to
//! several experts of one peer is the same row several times in the
//! kernels' layout. The sender reads the kernels' send order (which slot,
//! hence which token and weight, each row is) and puts only rows of tokens
//! it has not sent to that peer in this call, at the pair's next token
//! slots, then the piece's index array (a slot per row) and ratio array;
//! the receiver expands the rows from its inbox into the landing image, so
//! the device sees the kernels' layout unchanged. Slots a piece names were
//! put before its signal (by it or an earlier piece to the same peer), so
//! they have arrived with it.
//!
//! Back, the expert side sums each combine chunk's rows per token slot,
//! row `r` scaled by its ratio `w_r / w_rep` (`w_rep` the weight of largest
//! magnitude among the token's rows on that rank, the first such in send
//! order; ratios 0 when it is 0), and puts one row per slot. The owner
//! lands a slot's sum as the token's representative row and zeros as its
//! other rows there, so the kernels' weighted sum `sum_j w_j row_j` over
//! them is `w_rep * sum` = the same sum, rounded once more to bf16 (a token
//! with one row on the rank crosses exact: its ratio is 1). Off NVLink
//! bytes are what cost: with top-k 8 over 2 ranks this sends about a
//! quarter of the rows each way, for a pass over the rows at each end:
//! kernels' where the device side has them ([`StagedDevice::token_kernels`]),
//! else the proxy's on the host. With the kernels, a dispatch piece's
//! token slots are given out as it is staged, and a kernel packs just its
//! fresh token rows into the pinned send image: only those cross PCIe, and
//! the proxy puts them from there without touching them.
//!
//! Downloads are pipelined: the proxy starts each ready piece's copy into
//! host staging at once and puts pieces out as their copies finish, so the
//! copies run beside the wire. Landings of one call are not waited for one
//! by one (their wire bytes never overlap), only at the call's end. Where
//! the device side can read the inbox itself (host memory registered with
//! the driver), a piece lands straight from it, with no host copy.
//!
//! [`StagedDevice`] is the device side (CUDA copies and mapped ready words
//! on a GPU; host memory in tests), so all of this runs on a laptop.

use crate::error::SchedError;
use crate::proxy_plan::{words, Buf, Geometry, Kind, Piece, Region, TokenPlace, WireFormat};
use comet_transport::signal_core::Backoff;
use comet_transport::{BufferId, SignalId, SignalOp, Transport, TransportError};
use std::collections::VecDeque;
use std::ops::Range;
use std::time::{Duration, Instant};

/// How long one round of the proxy puts pieces out before it looks at what
/// arrived: a few small puts' worth, far under a kernel's wait for a piece.
const SEND_SLICE: Duration = Duration::from_micros(200);

/// A download in flight: downloads finish in the order they were started.
pub type Ticket = u64;

/// Where a landing finds a piece's packed bytes (at its wire offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The landing image the proxy filled ([`StagedDevice::landing_bytes`]).
    Image,
    /// This rank's inbox on the transport, as the piece arrived.
    Inbox,
}

/// A token-once combine's tables for [`StagedDevice::download_sums`]: the
/// piece's rows of each token slot of pair `peer` in call `epoch`, and a
/// scale per row (the same for every piece of the pair and call).
#[derive(Debug, Clone, Copy)]
pub struct SlotRows<'a> {
    pub peer: usize,
    pub epoch: u64,
    pub slots: usize,
    /// `slots + 1` offsets into `rows`.
    pub starts: &'a [u32],
    /// Rows of each slot, slot after slot, ascending.
    pub rows: &'a [u32],
    pub ratio: &'a [f32],
}

fn unsupported(what: &str) -> SchedError {
    SchedError::StagedProtocol {
        rank: usize::MAX,
        message: format!("this device side does not {what}"),
    }
}

/// The kernels' send order of a call: the slot (`token * top_k + j`) at
/// each send position and that slot's routing weight.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SendOrder {
    pub slots: Vec<u32>,
    pub weights: Vec<f32>,
}

/// The device side of a staged rank, as its proxy sees it. It owns the
/// host staging (pinned on a GPU, so copies run at the link's speed): send
/// images (one of the rows sent, for every peer's dispatch pieces, at this
/// rank's send positions: [`Geometry::image_at`]; one per peer of the
/// count and combine buffers, in wire layout), and one image of each buffer
/// for landing.
pub trait StagedDevice {
    /// This rank's ready word `signal` for peer `to` (acquire: the mirror
    /// bytes it covers are final once it is seen).
    fn ready(&self, to: usize, signal: usize) -> u64;

    /// Starts copying `region` of this rank's mirror of `to`'s buffer,
    /// packed, into the send image of `to`'s `region.buf` at `at` (for
    /// recv pieces the one image every peer's share). It runs beside the
    /// proxy's puts of earlier pieces; those bytes are not to be read
    /// before [`StagedDevice::downloaded`] says so.
    fn download(&mut self, to: usize, region: Region, at: usize) -> Result<Ticket, SchedError>;

    /// Whether download `ticket` (and every earlier one) has finished.
    fn downloaded(&mut self, ticket: Ticket) -> Result<bool, SchedError>;

    /// `len` bytes of the send image of `to`'s `buf` at `at`: what a
    /// finished download put there.
    fn sent_bytes(&self, to: usize, buf: Buf, at: usize, len: usize) -> &[u8];

    /// `len` bytes of the landing image of `buf` at `wire`, for the proxy
    /// to fill with a piece that arrived (pieces of one call never share
    /// wire bytes, so no landing of the call is waited for).
    fn landing_bytes(&mut self, buf: Buf, wire: usize, len: usize) -> &mut [u8];

    /// Whether [`StagedDevice::land`] can read pieces of `buf` straight
    /// from this rank's inbox (host memory the GPU copies from), so the
    /// proxy does not copy them into the landing image first.
    fn lands_from_inbox(&self, buf: Buf) -> bool {
        let _ = buf;
        false
    }

    /// Whether the device side does token-once's per-row work itself:
    /// packing the token rows of dispatch pieces
    /// ([`StagedDevice::download_tokens`]), expanding them on arrival
    /// ([`StagedDevice::land_tokens`]), summing
    /// combine rows per token ([`StagedDevice::download_sums`]) and
    /// expanding those sums ([`StagedDevice::land_sums`]), straight from
    /// the inbox; else the proxy does it on the host, through the images.
    fn token_kernels(&self) -> bool {
        false
    }

    /// As [`StagedDevice::download`] for token-once combine piece `region`
    /// (of the mirror of `to`'s comb buffer): what lands in the send image
    /// at `wire` is `sums.slots` packed rows, slot `s` the sum of the
    /// piece's rows `sums.rows[sums.starts[s]..sums.starts[s + 1]]`, row
    /// `r` scaled by `sums.ratio[r]`, in f32 rounded once to bf16.
    fn download_sums(
        &mut self,
        to: usize,
        region: Region,
        wire: usize,
        sums: SlotRows<'_>,
    ) -> Result<Ticket, SchedError> {
        let _ = (to, region, wire, sums);
        Err(unsupported("sum combine rows"))
    }

    /// As [`StagedDevice::download`] for token-once dispatch piece `region`
    /// (of the mirror of `to`'s recv buffer): what lands in the send image
    /// of `to`'s recv buffer at `at` is the region's rows `rows[i]` (each
    /// less than `region.rows`), packed in that order. Only the token rows
    /// cross to the host, not every (token, expert) row.
    fn download_tokens(
        &mut self,
        to: usize,
        region: Region,
        at: usize,
        rows: &[u32],
    ) -> Result<Ticket, SchedError> {
        let _ = (to, region, at, rows);
        Err(unsupported("pack token rows"))
    }

    /// Lands token-once combine piece `region` of `from`: its sums arrived
    /// packed at `wire` of this rank's comb inbox; row `r` of the region
    /// becomes sum `index[r]`, or zeros where it is `u32::MAX`; then
    /// raises `signal` to `value`, as [`StagedDevice::land`] does. `index`
    /// is the same for every piece of `from` in call `epoch`.
    #[allow(clippy::too_many_arguments)]
    fn land_sums(
        &mut self,
        from: usize,
        epoch: u64,
        region: Region,
        wire: usize,
        index: &[u32],
        signal: usize,
        value: u64,
    ) -> Result<(), SchedError> {
        let _ = (from, epoch, region, wire, index, signal, value);
        Err(unsupported("expand combine sums"))
    }

    /// Lands token-once dispatch piece `region` (whole rows of the recv
    /// buffer) from this rank's recv inbox: row `r` becomes the pair's
    /// token slot `index[r]`, the index being the piece's u32 array at
    /// `place.index` and slot `s` the row at `place.tokens + s * row
    /// bytes` (checked by the proxy against the pair's rows); then raises
    /// `signal` to `value`, as [`StagedDevice::land`] does. `fresh` are
    /// the pair's slots no earlier landing of the call named: the device
    /// side moves those rows, the index may name earlier ones too.
    fn land_tokens(
        &mut self,
        region: Region,
        place: TokenPlace,
        fresh: Range<usize>,
        signal: usize,
        value: u64,
    ) -> Result<(), SchedError> {
        let _ = (region, place, fresh, signal, value);
        Err(unsupported("expand token-once pieces"))
    }

    /// Copies the piece at `wire` of `from` into `region` of this rank's
    /// own buffer and then raises this rank's signal `signal` to `value`:
    /// the kernels never see the signal before the bytes. The raise may
    /// complete later, in order with earlier ones; the bytes at `wire` are
    /// not reused before [`StagedDevice::end_call`].
    fn land(
        &mut self,
        region: Region,
        wire: usize,
        from: Source,
        signal: usize,
        value: u64,
    ) -> Result<(), SchedError>;

    /// The slot (`token * top_k + j`) and its weight at each of this
    /// rank's first `rows` send positions of the call in flight, as its
    /// kernels ordered them: experts in global order, each expert's rows in
    /// their segment's row order. Asked for (token-once only) once a
    /// dispatch piece with rows is ready, when the kernels have written it.
    fn send_order(&mut self, rows: usize) -> Result<SendOrder, SchedError>;

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
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StagedStats {
    /// The call's counts exceed a capacity: every rank refused it.
    pub refused: bool,
    pub sent: usize,
    pub landed: usize,
    /// Bytes this rank put on the wire (token-once: token rows and index
    /// arrays), and bytes it landed in its device buffers.
    pub bytes_sent: usize,
    pub bytes_landed: usize,
    /// Where the proxy thread's time went: the whole call, sending pieces
    /// (the transport's puts and signals, and packing token rows or summing
    /// combine rows where the proxy does that), and handing arrived pieces
    /// to the device (reads, copies and launches enqueued); the rest is
    /// polling and starting downloads.
    pub elapsed: Duration,
    pub on_wire: Duration,
    pub landing: Duration,
}

/// One call in flight: its epoch, the count rows as they arrive, the whole
/// matrix once every row is in (empty before), and what moved.
struct Call {
    epoch: u64,
    rows: Vec<Option<Vec<u32>>>,
    counts: Vec<Vec<u32>>,
    /// Per peer, this rank's dispatch pieces to it not put out yet.
    unsent: Vec<usize>,
    stats: StagedStats,
}

/// A piece whose bytes are on their way into the send image; for a
/// token-once dispatch piece the device side packs, what else it carries.
struct Staging {
    piece: Piece,
    ticket: Ticket,
    tokens: Option<TokenPiece>,
}

/// What a token-once dispatch piece puts: the rows of its tokens new to
/// the pair in this call (`rows` says which of the piece's rows they are;
/// they take the pair's slots from `start` on, in that order), and its
/// index and ratio arrays (little-endian, a word per row).
struct TokenPiece {
    start: usize,
    rows: Vec<u32>,
    index: Vec<u8>,
    ratios: Vec<u8>,
}

/// Token-once state of a token's owner: the kernels' send order of the
/// call (fetched with the first dispatch piece that has rows) with each
/// position's ratio and whether it is its token's representative on its
/// rank, per peer the slot each token got there this call, stamped
/// with the call's epoch so no call clears it, and the index its sums from
/// that peer land by (`landing_index`, [`StagedProxy::sum_index`]). Of an
/// expert side: per peer
/// the token slots a landed piece named so far this call (`landed`), so
/// each token row is handed to the device once, and the pair's index and
/// ratio arrays once its first combine chunk goes back.
#[derive(Default)]
struct Tokens {
    order: Option<SendOrder>,
    ratio: Vec<f32>,
    rep: Vec<bool>,
    slot: Vec<Vec<(u64, u32)>>,
    used: Vec<usize>,
    landed: Vec<usize>,
    back: Vec<Option<PairRows>>,
    landing_index: Vec<Option<Vec<u32>>>,
    pack: Vec<u8>,
    sums: Vec<f32>,
}

impl Tokens {
    /// A new call's start: no send order yet, nothing used or landed, no
    /// pair's rows or landing index (the slots keep their epochs).
    fn reset(&mut self) {
        self.order = None;
        self.used.fill(0);
        self.landed.fill(0);
        self.back.iter_mut().for_each(|b| *b = None);
        self.landing_index.fill(None);
    }
}

/// What an expert side knows of the rows a peer sent it in this call: the
/// token slot and ratio of each row (in the pair's row order, which is
/// the order of its combine rows too) and how many slots they name.
struct PairRows {
    index: Vec<u32>,
    ratio: Vec<f32>,
    slots: usize,
    /// The same rows grouped by slot ([`SlotRows`]).
    starts: Vec<u32>,
    by_slot: Vec<u32>,
}

impl PairRows {
    fn new(index: Vec<u32>, ratio: Vec<f32>, slots: usize) -> PairRows {
        let mut starts = vec![0u32; slots + 1];
        for &s in &index {
            starts[s as usize + 1] += 1;
        }
        for s in 0..slots {
            starts[s + 1] += starts[s];
        }
        let mut next = starts.clone();
        let mut by_slot = vec![0u32; index.len()];
        for (r, &s) in index.iter().enumerate() {
            by_slot[next[s as usize] as usize] = r as u32;
            next[s as usize] += 1;
        }
        PairRows {
            index,
            ratio,
            slots,
            starts,
            by_slot,
        }
    }

    fn tables(&self, peer: usize, epoch: u64) -> SlotRows<'_> {
        SlotRows {
            peer,
            epoch,
            slots: self.slots,
            starts: &self.starts,
            rows: &self.by_slot,
            ratio: &self.ratio,
        }
    }
}

/// One rank's staged proxy: its inboxes on the transport.
pub struct StagedProxy<'t> {
    t: &'t dyn Transport,
    geo: Geometry,
    inbox: [BufferId; 3],
    timeout: Duration,
    /// Token-once when set ([`WireFormat::Tokens`]).
    tokens: Option<Tokens>,
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
            t.alloc_buffer(geo.inbox_bytes(Buf::Counts))?,
            t.alloc_buffer(geo.inbox_bytes(Buf::Recv))?,
            t.alloc_buffer(geo.inbox_bytes(Buf::Comb))?,
        ];
        t.alloc_signals(geo.signal_count())?;
        t.barrier(timeout)?;
        Ok(inbox)
    }

    /// This rank's proxy over `t`, whose buffers `inbox` (counts, recv,
    /// comb, each of `geo.inbox_bytes`) receive the peers' pieces, with
    /// dispatch rows travelling as `wire` says (every rank alike).
    pub fn new(
        t: &'t dyn Transport,
        geo: Geometry,
        inbox: [BufferId; 3],
        timeout: Duration,
        wire: WireFormat,
    ) -> Result<Self, SchedError> {
        let (w, rank) = (geo.ranks, t.rank());
        if t.world() != w || rank >= w {
            return Err(SchedError::Input {
                rank,
                message: format!("a layer of {w} ranks over a transport of {}", t.world()),
            });
        }
        let tokens = match wire {
            WireFormat::Rows => None,
            WireFormat::Tokens if geo.top_k == 0 => {
                return Err(SchedError::Input {
                    rank,
                    message: "token-once dispatch with top_k 0".into(),
                })
            }
            WireFormat::Tokens => Some(Tokens {
                slot: vec![Vec::new(); w],
                used: vec![0; w],
                landed: vec![0; w],
                back: (0..w).map(|_| None).collect(),
                landing_index: vec![None; w],
                ..Tokens::default()
            }),
        };
        Ok(StagedProxy {
            t,
            geo,
            inbox,
            timeout,
            tokens,
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
        let peers = || (0..w).filter(move |&p| p != me);
        let mut sends: Vec<Piece> = peers()
            .map(|p| self.geo.counts_piece(me, p, epoch))
            .collect();
        let mut lands: Vec<Piece> = peers()
            .map(|p| self.geo.counts_piece(p, me, epoch))
            .collect();
        let mut call = Call {
            epoch,
            rows: vec![None; w],
            counts: Vec::new(),
            unsent: vec![0; w],
            stats: StagedStats::default(),
        };
        if let Some(tok) = &mut self.tokens {
            tok.reset();
        }
        // Downloads started, oldest first: put out as they finish.
        let mut staging: VecDeque<Staging> = Default::default();
        let mut planned = w == 1;
        // The bound is on standing still, not on the whole call: a call
        // may wait behind earlier work on the GPU, and each of the
        // kernels' own waits is bounded by the same timeout.
        let started = Instant::now();
        let (mut moved_at, mut reported) = (started, started);
        let mut idle = 0u32;
        while !(planned && sends.is_empty() && staging.is_empty() && lands.is_empty()) {
            let before = sends.len() + staging.len() + lands.len();
            // Puts for a short while per round, landings looked at between
            // rounds: a piece the kernels wait for lands while this rank's
            // backlog goes out.
            self.stage_ready(dev, &call, &mut sends, &mut staging)?;
            self.land_arrived(dev, &mut lands, &mut call)?;
            self.send_staged(dev, &mut staging, &mut call)?;
            if !planned && call.rows.iter().all(Option::is_some) {
                self.plan_pieces(&mut call, &mut sends, &mut lands);
                planned = true;
                // Planning is progress: the count rows all came in.
                idle = 0;
                moved_at = Instant::now();
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
                return Err(self.timed_out(dev, epoch, &staging, &sends, &lands, moved_at));
            }
            idle = idle.saturating_add(1);
            match Backoff::idle(idle) {
                // Idle long enough to sleep: worth a look at the peers.
                Some(d) => {
                    self.check_peers(&lands, epoch)?;
                    if reported.elapsed() >= Duration::from_secs(1) {
                        reported = Instant::now();
                        let still = self.timed_out(dev, epoch, &staging, &sends, &lands, moved_at);
                        tracing::debug!(
                            rank = me,
                            epoch,
                            "proxy standing still; at its timeout it would say: {still}"
                        );
                    }
                    std::thread::sleep(d)
                }
                None => std::thread::yield_now(),
            }
        }
        dev.end_call()?;
        call.stats.elapsed = started.elapsed();
        Ok(call.stats)
    }

    /// With every rank's row of counts in: this rank's data pieces to send
    /// and to land, or a refused call (rows over a receive capacity), which
    /// moves no data and which every rank refuses alike.
    fn plan_pieces(&self, call: &mut Call, sends: &mut Vec<Piece>, lands: &mut Vec<Piece>) {
        let me = self.t.rank();
        call.counts = call.rows.iter().flatten().cloned().collect();
        match self.geo.data_pieces(me, &call.counts) {
            Ok(all) => {
                sends.extend(all.iter().filter(|p| p.from == me).copied());
                for p in sends
                    .iter()
                    .filter(|p| matches!(p.kind, Kind::Dispatch { .. }))
                {
                    call.unsent[p.to] += 1;
                }
                lands.extend(all.iter().filter(|p| p.to == me).copied());
            }
            Err(e) => {
                tracing::debug!(rank = me, epoch = call.epoch, error = %e, "call refused");
                call.stats.refused = true;
            }
        }
    }

    /// Starts the download of every pending piece whose ready word has
    /// reached the call's epoch (token-once combine pieces summed on the
    /// way, where the device side does that).
    fn stage_ready(
        &mut self,
        dev: &mut dyn StagedDevice,
        call: &Call,
        sends: &mut Vec<Piece>,
        staging: &mut VecDeque<Staging>,
    ) -> Result<(), SchedError> {
        let mut i = 0;
        while i < sends.len() {
            let p = sends[i];
            if dev.ready(p.to, p.signal) < call.epoch {
                i += 1;
                continue;
            }
            sends.swap_remove(i);
            let kernels = self.tokens.is_some() && dev.token_kernels();
            let mut tokens = None;
            let ticket = match p.kind {
                Kind::Combine { .. } if kernels => {
                    let place = self.geo.pair_place(&call.counts, p.to, self.t.rank(), 0);
                    let inbox = self.inbox[Buf::Recv.index()];
                    let tok = self
                        .tokens
                        .as_mut()
                        .ok_or_else(|| unsupported("token-once"))?;
                    let pair = load_pair(self.t, inbox, place, p.to, &mut tok.back[p.to])?;
                    dev.download_sums(p.to, p.region, p.wire, pair.tables(p.to, call.epoch))?
                }
                Kind::Dispatch { le } if kernels && p.region.rows > 0 => {
                    let piece = self.token_piece(dev, &p, le, call)?;
                    let at = self.token_image_at(&call.counts, &p, &piece);
                    let ticket = dev.download_tokens(p.to, p.region, at, &piece.rows)?;
                    tokens = Some(piece);
                    ticket
                }
                _ => dev.download(p.to, p.region, self.geo.image_at(&call.counts, &p))?,
            };
            staging.push_back(Staging {
                piece: p,
                ticket,
                tokens,
            });
        }
        Ok(())
    }

    /// Puts out, oldest first, pieces whose downloads have finished, each
    /// followed by its signal, until [`SEND_SLICE`] has passed (one at
    /// least), so arrived pieces are landed between puts without polling
    /// every landing after each small put.
    fn send_staged(
        &mut self,
        dev: &mut dyn StagedDevice,
        staging: &mut VecDeque<Staging>,
        call: &mut Call,
    ) -> Result<(), SchedError> {
        let slice = Instant::now();
        let mut put = false;
        while let Some(s) = staging.front() {
            if (put && slice.elapsed() >= SEND_SLICE) || !dev.downloaded(s.ticket)? {
                break;
            }
            put = true;
            let Some(Staging {
                piece: p, tokens, ..
            }) = staging.pop_front()
            else {
                break;
            };
            let t0 = Instant::now();
            let sent = match (p.kind, tokens) {
                (Kind::Dispatch { .. }, Some(piece)) => {
                    let rows = dev.sent_bytes(
                        p.to,
                        Buf::Recv,
                        self.token_image_at(&call.counts, &p, &piece),
                        piece.rows.len() * self.geo.row_bytes,
                    );
                    self.put_tokens(&p, &piece, rows, &call.counts)?
                }
                (Kind::Dispatch { le }, None) if self.tokens.is_some() => {
                    self.send_tokens(dev, &p, le, call)?
                }
                (Kind::Combine { .. }, _) if self.tokens.is_some() => {
                    self.send_summed(dev, &p, &call.counts)?
                }
                _ => {
                    let n = p.region.bytes();
                    let at = self.geo.image_at(&call.counts, &p);
                    let out = dev.sent_bytes(p.to, p.region.buf, at, n);
                    if p.kind == Kind::Counts && call.rows[p.from].is_none() {
                        call.rows[p.from] = Some(words(out));
                    }
                    if n > 0 {
                        self.t
                            .put(p.to, self.inbox[p.region.buf.index()], p.wire, out)?;
                    }
                    n
                }
            };
            self.t
                .signal(p.to, p.signal as SignalId, SignalOp::Set(call.epoch))?;
            if matches!(p.kind, Kind::Dispatch { .. }) {
                call.unsent[p.to] -= 1;
            }
            call.stats.on_wire += t0.elapsed();
            call.stats.sent += 1;
            call.stats.bytes_sent += sent;
        }
        Ok(())
    }

    /// Puts out dispatch piece `p` (local expert `le` of `p.to`, rows
    /// downloaded) token-once, packing its token rows on the host. Returns
    /// the wire bytes.
    fn send_tokens(
        &mut self,
        dev: &mut dyn StagedDevice,
        p: &Piece,
        le: usize,
        call: &Call,
    ) -> Result<usize, SchedError> {
        let rb = self.geo.row_bytes;
        if p.region.bytes() == 0 {
            return Ok(0);
        }
        let piece = self.token_piece(dev, p, le, call)?;
        let at = self.geo.image_at(&call.counts, p);
        let rows = dev.sent_bytes(p.to, Buf::Recv, at, p.region.bytes());
        let Some(tok) = self.tokens.as_mut() else {
            return Ok(0);
        };
        tok.pack.clear();
        for &r in &piece.rows {
            let r = r as usize;
            tok.pack.extend_from_slice(&rows[r * rb..(r + 1) * rb]);
        }
        let pack = self.tokens.as_ref().map_or(&[][..], |t| &t.pack[..]);
        self.put_tokens(p, &piece, pack, &call.counts)
    }

    /// Token-once dispatch piece `p` (local expert `le` of `p.to`, its
    /// rows written by the kernels): the rows of tokens this call has not
    /// sent to `p.to` yet get the pair's next slots, in row order; every
    /// row is named by its token's slot and carries its ratio. Pieces to
    /// one peer take their slots in the order they are put out.
    fn token_piece(
        &mut self,
        dev: &mut dyn StagedDevice,
        p: &Piece,
        le: usize,
        call: &Call,
    ) -> Result<TokenPiece, SchedError> {
        let (me, to) = (self.t.rank(), p.to);
        let n = p.region.bytes() / self.geo.row_bytes;
        let mine = &call.counts[me];
        let epr = self.geo.experts / self.geo.ranks;
        let tok = self
            .tokens
            .as_mut()
            .ok_or_else(|| unsupported("token rows without token-once"))?;
        if tok.order.is_none() {
            let sent: usize = mine.iter().map(|&c| c as usize).sum();
            let order = dev.send_order(sent)?;
            check_order(&self.geo, me, &order, sent)?;
            (tok.ratio, tok.rep) = representatives(&order, mine, epr, self.geo.top_k);
            tok.order = Some(order);
        }
        let slots = tok.order.as_ref().map_or(&[][..], |o| &o.slots[..]);
        let e = to * epr + le;
        let first = self.geo.send_position(&call.counts, me, e);
        let seen = &mut tok.slot[to];
        let mut piece = TokenPiece {
            start: tok.used[to],
            rows: Vec::new(),
            index: Vec::with_capacity(4 * n),
            ratios: Vec::with_capacity(4 * n),
        };
        for (r, &slot) in slots[first..first + n].iter().enumerate() {
            let token = slot as usize / self.geo.top_k;
            if seen.len() <= token {
                seen.resize(token + 1, (0, 0));
            }
            if seen[token].0 != call.epoch {
                seen[token] = (call.epoch, tok.used[to] as u32);
                tok.used[to] += 1;
                piece.rows.push(r as u32);
            }
            piece.index.extend_from_slice(&seen[token].1.to_le_bytes());
            piece
                .ratios
                .extend_from_slice(&tok.ratio[first + r].to_le_bytes());
        }
        Ok(piece)
    }

    /// Where dispatch piece `p`'s fresh token rows are packed in the send
    /// image: the pair's rows' place there, at the piece's first slot.
    fn token_image_at(&self, counts: &[Vec<u32>], p: &Piece, piece: &TokenPiece) -> usize {
        self.geo.pair_image_at(counts, p.from, p.to) + piece.start * self.geo.row_bytes
    }

    /// Puts dispatch piece `p`'s fresh token rows (`rows`, packed) at the
    /// pair's slots from `piece.start`, then its index and ratio arrays
    /// (its signal follows them). Returns the wire bytes.
    fn put_tokens(
        &self,
        p: &Piece,
        piece: &TokenPiece,
        rows: &[u8],
        counts: &[Vec<u32>],
    ) -> Result<usize, SchedError> {
        let place = self.geo.token_place(counts, p);
        let inbox = self.inbox[Buf::Recv.index()];
        if !rows.is_empty() {
            let at = place.tokens + piece.start * self.geo.row_bytes;
            self.t.put(p.to, inbox, at, rows)?;
        }
        self.t.put(p.to, inbox, place.index, &piece.index)?;
        self.t.put(p.to, inbox, place.ratio, &piece.ratios)?;
        Ok(rows.len() + piece.index.len() + piece.ratios.len())
    }

    /// Puts out combine piece `p` (rows downloaded) token-once: per token
    /// slot of the pair, the sum of the chunk's rows of that token scaled
    /// by their ratios, in bf16. Returns the wire bytes.
    fn send_summed(
        &mut self,
        dev: &mut dyn StagedDevice,
        p: &Piece,
        counts: &[Vec<u32>],
    ) -> Result<usize, SchedError> {
        let (me, to, r) = (self.t.rank(), p.to, p.region);
        let place = self.geo.pair_place(counts, to, me, 0);
        let recv = self.inbox[Buf::Recv.index()];
        let tok = self
            .tokens
            .as_mut()
            .ok_or_else(|| unsupported("sum rows without token-once"))?;
        let pair = load_pair(self.t, recv, place, to, &mut tok.back[to])?;
        if pair.index.len() != r.rows {
            return Err(SchedError::StagedProtocol {
                rank: me,
                message: format!(
                    "{p} has {} rows, its pair sent {} this call",
                    r.rows,
                    pair.index.len()
                ),
            });
        }
        let inbox = self.inbox[Buf::Comb.index()];
        if dev.token_kernels() {
            // Summed by the device side on the way down.
            let sums = dev.sent_bytes(to, Buf::Comb, p.wire, pair.slots * r.width);
            if !sums.is_empty() {
                self.t.put(to, inbox, p.wire, sums)?;
            }
            return Ok(sums.len());
        }
        let rows = dev.sent_bytes(to, Buf::Comb, p.wire, r.bytes());
        sum_rows(rows, r.width, pair, &mut tok.sums, &mut tok.pack);
        if !tok.pack.is_empty() {
            self.t.put(to, inbox, p.wire, &tok.pack)?;
        }
        Ok(tok.pack.len())
    }

    /// Lands every pending piece whose signal has arrived.
    fn land_arrived(
        &mut self,
        dev: &mut dyn StagedDevice,
        lands: &mut Vec<Piece>,
        call: &mut Call,
    ) -> Result<(), SchedError> {
        let mut i = 0;
        while i < lands.len() {
            let p = lands[i];
            // A token-once combine piece names this rank's token slots on
            // its sender, complete once every dispatch piece to it is out
            // (on a GPU always so: its rows were computed from them).
            let early = self.tokens.is_some()
                && matches!(p.kind, Kind::Combine { .. })
                && call.unsent[p.from] > 0;
            if early || !self.arrived(p.signal, call.epoch)? {
                i += 1;
                continue;
            }
            lands.swap_remove(i);
            let t0 = Instant::now();
            let n = p.region.bytes();
            let from = match p.kind {
                Kind::Dispatch { .. } if self.tokens.is_some() => {
                    let (place, index) = self.token_index(&p, &call.counts)?;
                    if dev.token_kernels() {
                        let fresh = self.fresh_tokens(p.from, &index);
                        dev.land_tokens(p.region, place, fresh, p.signal, call.epoch)?;
                        call.stats.landing += t0.elapsed();
                        call.stats.landed += 1;
                        call.stats.bytes_landed += n;
                        continue;
                    }
                    self.expand_tokens(dev, &p, place, &index)?;
                    Source::Image
                }
                Kind::Combine { .. } if self.tokens.is_some() => {
                    let index = self.sum_index(p.from, &call.counts, call.epoch)?;
                    if dev.token_kernels() {
                        dev.land_sums(
                            p.from, call.epoch, p.region, p.wire, index, p.signal, call.epoch,
                        )?;
                        call.stats.landing += t0.elapsed();
                        call.stats.landed += 1;
                        call.stats.bytes_landed += n;
                        continue;
                    }
                    self.expand_sums(dev, &p)?;
                    Source::Image
                }
                // Count rows are read here anyway (the proxy plans with them).
                Kind::Dispatch { .. } | Kind::Combine { .. }
                    if dev.lands_from_inbox(p.region.buf) =>
                {
                    Source::Inbox
                }
                _ => {
                    let bytes = dev.landing_bytes(p.region.buf, p.wire, n);
                    self.t
                        .read(self.inbox[p.region.buf.index()], p.wire, bytes)?;
                    if p.kind == Kind::Counts {
                        call.rows[p.from] = Some(words(bytes));
                    }
                    Source::Image
                }
            };
            dev.land(p.region, p.wire, from, p.signal, call.epoch)?;
            call.stats.landing += t0.elapsed();
            call.stats.landed += 1;
            call.stats.bytes_landed += n;
        }
        Ok(())
    }

    /// Where token-once dispatch piece `p` sits in this rank's inbox and
    /// its index array, checked: every slot it names is one of the pair's
    /// (slots a piece names arrived before its signal, by it or an earlier
    /// piece of the pair).
    fn token_index(
        &mut self,
        p: &Piece,
        counts: &[Vec<u32>],
    ) -> Result<(TokenPlace, Vec<u32>), SchedError> {
        let n = p.region.bytes() / self.geo.row_bytes;
        let place = self.geo.token_place(counts, p);
        let mut raw = vec![0u8; 4 * n];
        self.t
            .read(self.inbox[Buf::Recv.index()], place.index, &mut raw)?;
        let index = words(&raw);
        if let Some(&bad) = index.iter().find(|&&s| s as usize >= place.pair_rows) {
            return Err(SchedError::StagedProtocol {
                rank: self.t.rank(),
                message: format!(
                    "{p} names token slot {bad} of the {} its pair can use",
                    place.pair_rows
                ),
            });
        }
        Ok((place, index))
    }

    /// The token slots of `from`'s pair that `index` is the first landed
    /// piece to name: from the end of those named before up to its highest
    /// slot. All of them are in the inbox once its signal is (a pair's
    /// token rows go out before the signal of the piece that first names
    /// them, and signals from one peer arrive in order).
    fn fresh_tokens(&mut self, from: usize, index: &[u32]) -> Range<usize> {
        let Some(tok) = self.tokens.as_mut() else {
            return 0..0;
        };
        let start = tok.landed[from];
        let end = index
            .iter()
            .map(|&s| s as usize + 1)
            .max()
            .unwrap_or(0)
            .max(start);
        tok.landed[from] = end;
        start..end
    }

    /// Fills the landing image of dispatch piece `p` (arrived token-once,
    /// `index` checked) with its rows: row `r` is the pair's token slot
    /// `index[r]`.
    fn expand_tokens(
        &mut self,
        dev: &mut dyn StagedDevice,
        p: &Piece,
        place: TokenPlace,
        index: &[u32],
    ) -> Result<(), SchedError> {
        let rb = self.geo.row_bytes;
        let n = index.len();
        let inbox = self.inbox[Buf::Recv.index()];
        let rows = dev.landing_bytes(Buf::Recv, p.wire, n * rb);
        let mut r = 0;
        while r < n {
            // Consecutive slots are one read (a pair's first piece is all
            // new tokens, packed in row order).
            let s = index[r] as usize;
            let mut len = 1;
            while r + len < n && index[r + len] as usize == s + len {
                len += 1;
            }
            self.t.read(
                inbox,
                place.tokens + s * rb,
                &mut rows[r * rb..(r + len) * rb],
            )?;
            r += len;
        }
        Ok(())
    }

    /// Per row this rank sent `from` this call (its send order on
    /// `from`'s experts, the rows of every combine piece from `from`): the
    /// slot of its token's sum if it is the token's representative there,
    /// else `u32::MAX` (a zero row). Made once per pair and call.
    fn sum_index(
        &mut self,
        from: usize,
        counts: &[Vec<u32>],
        epoch: u64,
    ) -> Result<&[u32], SchedError> {
        let me = self.t.rank();
        let epr = self.geo.experts / self.geo.ranks;
        let k = self.geo.top_k;
        let tok = self
            .tokens
            .as_mut()
            .ok_or_else(|| unsupported("expand sums without token-once"))?;
        if tok.landing_index[from].is_none() {
            let first: usize = counts[me][..from * epr].iter().map(|&c| c as usize).sum();
            let rows: usize = counts[me][from * epr..(from + 1) * epr]
                .iter()
                .map(|&c| c as usize)
                .sum();
            let slots = tok.order.as_ref().map_or(&[][..], |o| &o.slots[..]);
            let mut index = Vec::with_capacity(rows);
            for pos in first..first + rows {
                let (Some(&slot), Some(true)) = (slots.get(pos), tok.rep.get(pos).copied()) else {
                    index.push(u32::MAX);
                    continue;
                };
                let token = slot as usize / k;
                match tok.slot[from].get(token) {
                    Some(&(e, s)) if e == epoch && (s as usize) < tok.used[from] => index.push(s),
                    _ => {
                        return Err(SchedError::StagedProtocol {
                            rank: me,
                            message: format!(
                                "token {token} was not sent to rank {from} in call {epoch}"
                            ),
                        })
                    }
                }
            }
            tok.landing_index[from] = Some(index);
        }
        Ok(tok.landing_index[from].as_deref().unwrap_or(&[]))
    }

    /// Fills the landing image of combine piece `p` (arrived token-once:
    /// a row per token slot this rank sent `p.from`, its index made):
    /// each token's representative row there gets its slot's sum, every
    /// other row zero.
    fn expand_sums(&mut self, dev: &mut dyn StagedDevice, p: &Piece) -> Result<(), SchedError> {
        let r = p.region;
        let inbox = self.inbox[Buf::Comb.index()];
        let Some(tok) = self.tokens.as_mut() else {
            return Ok(());
        };
        let index = tok.landing_index[p.from].as_deref().unwrap_or(&[]);
        let image = dev.landing_bytes(Buf::Comb, p.wire, r.bytes());
        tok.pack.resize(tok.used[p.from] * r.width, 0);
        self.t.read(inbox, p.wire, &mut tok.pack)?;
        for (out, &s) in image.chunks_exact_mut(r.width).zip(index) {
            match tok
                .pack
                .get(s as usize * r.width..(s as usize + 1) * r.width)
            {
                Some(sum) => out.copy_from_slice(sum),
                None => out.fill(0),
            }
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

    /// What a call standing still since `moved_at` waits for: its first
    /// piece still waiting, named (the error at its timeout, and the debug
    /// line before it).
    fn timed_out(
        &self,
        dev: &dyn StagedDevice,
        epoch: u64,
        staging: &VecDeque<Staging>,
        sends: &[Piece],
        lands: &[Piece],
        moved_at: Instant,
    ) -> SchedError {
        let rank = self.t.rank();
        let waited = moved_at.elapsed();
        let pending = staging.len() + sends.len() + lands.len();
        // A download started goes first: its piece was ready before the
        // rest, and a download that never finishes (a copy queued behind
        // the kernels waiting for it) is not the kernels' doing.
        let what = match (staging.front(), sends.first(), lands.first()) {
            (Some(s), ..) => format!(
                "the download of {}, started once its ready word came up (call {epoch})",
                s.piece
            ),
            (None, Some(p), _) => format!(
                "the kernels' ready word of {} (it is {}, the call is {epoch})",
                p,
                dev.ready(p.to, p.signal)
            ),
            (None, None, Some(p)) => format!("the arrival of {p} from rank {}", p.from),
            (None, None, None) => "the count rows of every rank".into(),
        };
        SchedError::StagedTimeout {
            rank,
            what,
            pending,
            waited,
        }
    }
}

/// `back`, read once per call from `inbox` at `place`: the index and ratio
/// arrays of every row `from` sent this rank (all landed: the combine rows
/// they come back as were computed from them).
fn load_pair<'p>(
    t: &dyn Transport,
    inbox: BufferId,
    place: TokenPlace,
    from: usize,
    back: &'p mut Option<PairRows>,
) -> Result<&'p PairRows, SchedError> {
    if let Some(pair) = back {
        return Ok(pair);
    }
    let mut raw = vec![0u8; 4 * place.pair_rows];
    t.read(inbox, place.index, &mut raw)?;
    let index = words(&raw);
    t.read(inbox, place.ratio, &mut raw)?;
    let ratio = words(&raw).into_iter().map(f32::from_bits).collect();
    let slots = index.iter().map(|&s| s as usize + 1).max().unwrap_or(0);
    if slots > place.pair_rows {
        return Err(SchedError::StagedProtocol {
            rank: t.rank(),
            message: format!(
                "rank {from}'s rows name token slot {}, of the {} its pair can use",
                slots - 1,
                place.pair_rows
            ),
        });
    }
    Ok(back.insert(PairRows::new(index, ratio, slots)))
}

/// Checks a send order the device side gave for `sent` positions: a slot
/// and a weight each, every slot inside the send capacity.
fn check_order(geo: &Geometry, rank: usize, o: &SendOrder, sent: usize) -> Result<(), SchedError> {
    let bad = |message: String| Err(SchedError::StagedProtocol { rank, message });
    if o.slots.len() != sent || o.weights.len() != sent {
        return bad(format!(
            "the send order has {} positions and {} weights; the call sends {sent} rows",
            o.slots.len(),
            o.weights.len()
        ));
    }
    match o.slots.iter().find(|&&s| s as usize >= geo.send_rows) {
        Some(s) => bad(format!(
            "the send order names slot {s}, past the {} slots",
            geo.send_rows
        )),
        None => Ok(()),
    }
}

/// Per send position (of this rank's count row `mine`, `epr` experts per
/// rank): its ratio `w / w_rep` and whether it is `rep`, the first position
/// of largest weight magnitude among its token's positions on the same
/// destination rank. A token whose weights there are all 0 gets ratios 0;
/// an infinite weight makes its token's sum there NaN (inf / inf), where a
/// row per (token, expert) would give infinities.
fn representatives(o: &SendOrder, mine: &[u32], epr: usize, top_k: usize) -> (Vec<f32>, Vec<bool>) {
    let dest: Vec<usize> = mine
        .iter()
        .enumerate()
        .flat_map(|(e, &c)| std::iter::repeat_n(e / epr, c as usize))
        .collect();
    let ranks = mine.len() / epr.max(1);
    let key = |pos: usize| (o.slots[pos] as usize / top_k) * ranks + dest[pos];
    let keys = o
        .slots
        .iter()
        .map(|&s| s as usize / top_k + 1)
        .max()
        .unwrap_or(0)
        * ranks;
    let mut best = vec![usize::MAX; keys];
    for pos in 0..o.slots.len() {
        let b = &mut best[key(pos)];
        if *b == usize::MAX || o.weights[pos].abs() > o.weights[*b].abs() {
            *b = pos;
        }
    }
    (0..o.slots.len())
        .map(|pos| {
            let rep = best[key(pos)];
            let w = o.weights[rep];
            let ratio = if w == 0.0 { 0.0 } else { o.weights[pos] / w };
            (ratio, rep == pos)
        })
        .unzip()
}

/// Into `out` (bf16, `width` bytes per slot): per token slot of `pair`,
/// the sum of `rows` (packed, `width` bytes each, the pair's row order)
/// of that slot, each scaled by its ratio, summed in f32 in `sums`.
/// Written for the compiler to vectorize: it is the proxy's one pass over
/// every combine byte.
fn sum_rows(rows: &[u8], width: usize, pair: &PairRows, sums: &mut Vec<f32>, out: &mut Vec<u8>) {
    let cols = width / 2;
    sums.clear();
    sums.resize(pair.slots * cols, 0.0);
    for (row, (&s, &a)) in rows
        .chunks_exact(width)
        .zip(pair.index.iter().zip(&pair.ratio))
    {
        let acc = &mut sums[s as usize * cols..(s as usize + 1) * cols];
        let mut acc8 = acc.chunks_exact_mut(8);
        let mut row8 = row.chunks_exact(16);
        for (x, b) in (&mut acc8).zip(&mut row8) {
            let (Ok(x), Ok(b)) = (<&mut [f32; 8]>::try_from(x), <&[u8; 16]>::try_from(b)) else {
                continue;
            };
            for i in 0..8 {
                x[i] += a * bf16_value(b[2 * i], b[2 * i + 1]);
            }
        }
        for (x, b) in acc8
            .into_remainder()
            .iter_mut()
            .zip(row8.remainder().chunks_exact(2))
        {
            *x += a * bf16_value(b[0], b[1]);
        }
    }
    out.clear();
    out.resize(sums.len() * 2, 0);
    for (o, &x) in out.chunks_exact_mut(2).zip(sums.iter()) {
        o.copy_from_slice(&bf16_bits(x).to_le_bytes());
    }
}

/// The bf16 of little-endian bytes `lo`, `hi`, as f32 (exact).
#[inline(always)]
fn bf16_value(lo: u8, hi: u8) -> f32 {
    f32::from_bits((u32::from(hi) << 24) | (u32::from(lo) << 16))
}

/// `x` rounded to the nearest bf16 (ties to even), NaN kept a NaN.
fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    /// The proxy's rounding is IEEE's (as `half` does it), NaN included.
    #[test]
    fn f32_rounds_to_bf16_to_nearest_even() {
        let mut x = 0x1234_5678u32;
        for _ in 0..100_000 {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let f = f32::from_bits(x);
            let want = bf16::from_f32(f);
            if f.is_nan() {
                assert!(f32::from_bits(u32::from(bf16_bits(f)) << 16).is_nan());
            } else {
                assert_eq!(bf16_bits(f), want.to_bits(), "{f:e}");
            }
        }
        // Ties: 1 + 2^-8 rounds down to even, 1 + 3 * 2^-8 up.
        let ties = [0x3F80_8000, 0x3F81_8000].map(f32::from_bits);
        for f in [0.0, -0.0, 1.0, f32::INFINITY, f32::MAX, ties[0], ties[1]] {
            assert_eq!(bf16_bits(f), bf16::from_f32(f).to_bits(), "{f:e}");
        }
    }

    /// Two ranks of one expert each; token 0 has slots 0, 1 on rank 1 and
    /// slot 2 on rank 0; token 1 has slots 4, 5 (weights 0) on rank 1.
    #[test]
    fn a_tokens_representative_is_its_first_largest_weight_on_the_rank() {
        let o = SendOrder {
            slots: vec![2, 0, 1, 4, 5],
            weights: vec![0.3, -0.5, 0.5, 0.0, 0.0],
        };
        let (ratio, rep) = representatives(&o, &[1, 4], 1, 4);
        assert_eq!(rep, [true, true, false, true, false]);
        assert_eq!(ratio, [1.0, 1.0, -1.0, 0.0, 0.0]);
    }

    /// A send order that does not fit the call is a named error, not a
    /// panic further on: too few positions or weights, a slot past the
    /// send capacity.
    #[test]
    fn a_bad_send_order_is_named() {
        let geo = Geometry {
            ranks: 2,
            experts: 2,
            row_bytes: 16,
            chunks: 1,
            chunk_bytes: 16,
            groups: 1,
            recv_rows: 8,
            send_rows: 8,
            top_k: 2,
        };
        let order = |slots: Vec<u32>, weights: Vec<f32>| SendOrder { slots, weights };
        assert!(check_order(&geo, 0, &order(vec![0, 3], vec![0.5, 0.5]), 2).is_ok());
        for (o, sent, what) in [
            (order(vec![0], vec![0.5]), 2, "1 positions and 1 weights"),
            (order(vec![0, 1], vec![0.5]), 2, "2 positions and 1 weights"),
            (
                order(vec![0, 8], vec![0.5, 0.5]),
                2,
                "slot 8, past the 8 slots",
            ),
        ] {
            let e = check_order(&geo, 1, &o, sent).unwrap_err().to_string();
            assert!(e.contains(what) && e.contains("rank 1"), "{e}");
        }
    }

    /// Slot sums in f32, rounded once to bf16; a slot's one row with ratio
    /// 1 crosses bit for bit.
    #[test]
    fn rows_sum_per_slot_scaled_by_their_ratios() {
        let row = |v: [f32; 2]| v.map(|x| bf16::from_f32(x).to_le_bytes()).concat();
        let rows = [row([1.0, 2.0]), row([0.1, -3.0]), row([4.0, 0.5])].concat();
        let pair = PairRows::new(vec![1, 0, 1], vec![1.0, 1.0, 0.25], 2);
        assert_eq!(
            (pair.starts.as_slice(), pair.by_slot.as_slice()),
            (&[0, 1, 3][..], &[1, 0, 2][..])
        );
        let (mut sums, mut out) = (Vec::new(), Vec::new());
        sum_rows(&rows, 4, &pair, &mut sums, &mut out);
        assert_eq!(out, [row([0.1, -3.0]), row([2.0, 2.125])].concat());
    }
}
