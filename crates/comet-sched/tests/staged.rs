//! The staged proxy with host memory standing in for the device, over the
//! local transport with seeded delays: per rank a "kernel" thread does what
//! the device forward's kernels do to the buffers (count row into every
//! peer's mirror, rows into their final places in the mirrors of the
//! destinations' receive buffers, combine chunks into the mirrors of the
//! sources' combine buffers, ready words raised in random order) with
//! placement from comet-core's LayoutPlan, while a proxy thread carries the
//! pieces across. Each kernel checks every byte it waits for right after
//! its signal, over calls with changing routing, so a signal that overtakes
//! its bytes, a piece landed in the wrong place or a stale row of an
//! earlier call fails. Rows are their tokens' bytes (a token routed to
//! several experts of a rank is the same row there), so token-once
//! dispatch is checked too, and its wire bytes against the exact count.
//! Answers are bf16 numbers and slots have weights (zeros and ties among
//! them), so token-once combine (a token's answers summed per rank, landed
//! as one row) is checked as the kernels use it: each token's weighted sum
//! over every owner's rows, against f64 at bf16's rounding, the combine
//! buffer poisoned with NaN at each call's start. Also: a kernel that
//! never raises, a killed peer.
//! With feature `ucx` the same ranks run as processes over UCX (TCP and
//! shared memory), and a rank SIGKILLed while its peers are in a call must
//! leave every other rank with an error naming it, not a hang or an abort.

#[cfg(feature = "ucx")]
mod common;

use comet_core::layout::LayoutPlan;
use comet_core::{Dtype, MoeConfig};
use comet_sched::proxy_plan::{Buf, Geometry, Region, TokenPlace, WireFormat};
use comet_sched::staged::{
    SendOrder, SlotRows, Source, StagedDevice, StagedProxy, StagedStats, Ticket,
};
use comet_sched::SchedError;
use comet_transport::local::{local_world, DelayModel, LocalTransport};
use comet_transport::{BufferId, Transport};
use half::bf16;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);
const H: usize = 32; // bf16 columns: 64-byte rows
const POISON: u8 = 0xEE;
/// bf16 NaN bytes: a combine row nobody wrote poisons its token's sum,
/// whatever its weight.
const NAN: u8 = 0xFF;

/// One rank's "device": its own buffers and signals, its mirrors of every
/// peer's buffers and its ready words for every peer.
struct Device {
    /// Set when the proxy failed: the "kernel" stops waiting (on a GPU its
    /// bounded waits end in an error word instead).
    abort: AtomicBool,
    own: [Mutex<Vec<u8>>; 3],
    signals: Vec<AtomicU64>,
    mirrors: Vec<[Mutex<Vec<u8>>; 3]>,
    ready: Vec<Vec<AtomicU64>>,
    /// The call's send order (slot per send position) and its slots'
    /// weights, published by the "kernels" before any dispatch ready word,
    /// as the layout phase does.
    order: Mutex<SendOrder>,
}

impl Device {
    fn new(g: &Geometry) -> Device {
        let bufs = || Buf::ALL.map(|b| Mutex::new(vec![0u8; g.bytes(b)]));
        let nsig = g.signal_count();
        let words = || (0..nsig).map(|_| AtomicU64::new(0)).collect::<Vec<_>>();
        Device {
            abort: AtomicBool::new(false),
            own: bufs(),
            signals: words(),
            mirrors: (0..g.ranks).map(|_| bufs()).collect(),
            ready: (0..g.ranks).map(|_| words()).collect(),
            order: Mutex::new(SendOrder::default()),
        }
    }
}

fn copy_2d(r: Region, from: &[u8], packed: bool, to: &mut [u8]) {
    for row in 0..r.rows {
        let dev = r.offset + row * r.pitch;
        let wire = row * r.width;
        if packed {
            to[wire..wire + r.width].copy_from_slice(&from[dev..dev + r.width]);
        } else {
            to[dev..dev + r.width].copy_from_slice(&from[wire..wire + r.width]);
        }
    }
}

/// What the proxy sees of a [`Device`], with the host staging a GPU's
/// device side owns. A download finishes only after a random number of
/// looks, its bytes poisoned until then, as a copy engine would leave
/// them: a piece put out before its download finished arrives poisoned.
/// With `inbox` set it lands dispatch and combine pieces straight from the
/// transport's inbox, as a GPU does from a registered inbox, and with
/// `expand` too it does token-once's row work itself, as a GPU does: only
/// the fresh token rows the proxy names are copied into a device-side copy
/// of the inbox (poisoned at each call's end), and rows are expanded from
/// that copy, so a token the proxy failed to name arrives poisoned; it
/// sums combine rows per slot as it downloads them, and expands arrived
/// sums into the combine buffer (code of its own, not the proxy's).
struct HostSide<'t> {
    dev: Arc<Device>,
    send: Vec<[Vec<u8>; 3]>,
    landing: [Vec<u8>; 3],
    inbox: Option<(&'t dyn Transport, [BufferId; 3])>,
    expand: bool,
    tokens_copy: Vec<u8>,
    row_bytes: usize,
    /// Started, not finished: ticket, peer, region, wire, looks left, and
    /// the bytes it leaves (else the region's, packed).
    pending: std::collections::VecDeque<Download>,
    next: Ticket,
    finished: Ticket,
    rng: ChaCha8Rng,
    /// Downloads never finish (a copy queued behind the kernels waiting
    /// for it, as under one hardware queue).
    stalled: bool,
}

struct Download {
    ticket: Ticket,
    to: usize,
    region: Region,
    wire: usize,
    looks: u32,
    bytes: Option<Vec<u8>>,
}

impl<'t> HostSide<'t> {
    fn new(dev: Arc<Device>, g: &Geometry, seed: u64) -> HostSide<'t> {
        let image = || Buf::ALL.map(|b| vec![0u8; g.bytes(b)]);
        HostSide {
            dev,
            // Per peer its count and combine images (its recv image
            // empty: a dispatch piece placed there fails), then the one
            // image of every peer's dispatch pieces, at send positions.
            send: (0..g.ranks)
                .map(|_| {
                    let mut i = image();
                    i[Buf::Recv.index()] = Vec::new();
                    i
                })
                .chain([Buf::ALL.map(|b| match b {
                    Buf::Recv => vec![0u8; g.outbox_bytes()],
                    _ => Vec::new(),
                })])
                .collect(),
            landing: image(),
            inbox: None,
            expand: false,
            tokens_copy: vec![POISON; g.inbox_bytes(Buf::Recv)],
            row_bytes: g.row_bytes,
            pending: Default::default(),
            next: 0,
            finished: 0,
            rng: ChaCha8Rng::seed_from_u64(seed),
            stalled: false,
        }
    }
}

impl HostSide<'_> {
    /// Which of `send`'s entries holds the send image of `to`'s `buf`.
    fn slot(&self, to: usize, buf: Buf) -> usize {
        match buf {
            Buf::Recv => self.send.len() - 1,
            _ => to,
        }
    }

    /// A download of `region` (or of `bytes`) into the send image at
    /// `wire`, poisoned there until it finishes.
    fn start(&mut self, to: usize, region: Region, wire: usize, bytes: Option<Vec<u8>>) -> Ticket {
        let n = bytes.as_ref().map_or(region.bytes(), Vec::len);
        let slot = self.slot(to, region.buf);
        self.send[slot][region.buf.index()][wire..wire + n].fill(POISON);
        self.next += 1;
        let looks = if self.stalled {
            u32::MAX
        } else {
            self.rng.gen_range(0..4)
        };
        self.pending.push_back(Download {
            ticket: self.next,
            to,
            region,
            wire,
            looks,
            bytes,
        });
        self.next
    }
}

impl StagedDevice for HostSide<'_> {
    fn ready(&self, to: usize, signal: usize) -> u64 {
        self.dev.ready[to][signal].load(Ordering::Acquire)
    }

    fn download(&mut self, to: usize, region: Region, wire: usize) -> Result<Ticket, SchedError> {
        Ok(self.start(to, region, wire, None))
    }

    fn download_sums(
        &mut self,
        to: usize,
        region: Region,
        wire: usize,
        sums: SlotRows<'_>,
    ) -> Result<Ticket, SchedError> {
        let m = self.dev.mirrors[to][2].lock().unwrap();
        let mut out = Vec::with_capacity(sums.slots * region.width);
        for s in 0..sums.slots {
            let mut acc = vec![0f32; region.width / 2];
            for &r in &sums.rows[sums.starts[s] as usize..sums.starts[s + 1] as usize] {
                let at = region.offset + r as usize * region.pitch;
                for (c, a) in acc.iter_mut().enumerate() {
                    *a += sums.ratio[r as usize] * bf16_at(&m[at..], c) as f32;
                }
            }
            out.extend(acc.iter().flat_map(|&a| bf16::from_f32(a).to_le_bytes()));
        }
        drop(m);
        Ok(self.start(to, region, wire, Some(out)))
    }

    fn download_tokens(
        &mut self,
        to: usize,
        region: Region,
        at: usize,
        rows: &[u32],
    ) -> Result<Ticket, SchedError> {
        assert!(
            self.expand,
            "asked to pack token rows without token kernels"
        );
        let rb = self.row_bytes;
        let m = self.dev.mirrors[to][1].lock().unwrap();
        let mut out = Vec::with_capacity(rows.len() * rb);
        for &r in rows {
            assert!(
                (r as usize) < region.bytes() / rb,
                "row {r} outside {region:?}"
            );
            let from = region.offset + r as usize * rb;
            out.extend_from_slice(&m[from..from + rb]);
        }
        drop(m);
        Ok(self.start(to, region, at, Some(out)))
    }

    fn downloaded(&mut self, ticket: Ticket) -> Result<bool, SchedError> {
        // In order, like copies on one stream: the oldest finishes first.
        while let Some(d) = self.pending.front_mut() {
            if d.looks > 0 {
                d.looks -= 1;
                break;
            }
            let Some(d) = self.pending.pop_front() else {
                break;
            };
            let b = d.region.buf.index();
            let n = d.bytes.as_ref().map_or(d.region.bytes(), Vec::len);
            let slot = self.slot(d.to, d.region.buf);
            let out = &mut self.send[slot][b][d.wire..d.wire + n];
            match &d.bytes {
                Some(bytes) => out.copy_from_slice(bytes),
                None => copy_2d(
                    d.region,
                    &self.dev.mirrors[d.to][b].lock().unwrap(),
                    true,
                    out,
                ),
            }
            self.finished = d.ticket;
        }
        Ok(ticket <= self.finished)
    }

    fn sent_bytes(&self, to: usize, buf: Buf, wire: usize, len: usize) -> &[u8] {
        &self.send[self.slot(to, buf)][buf.index()][wire..wire + len]
    }

    fn landing_bytes(&mut self, buf: Buf, wire: usize, len: usize) -> &mut [u8] {
        &mut self.landing[buf.index()][wire..wire + len]
    }

    fn lands_from_inbox(&self, _: Buf) -> bool {
        self.inbox.is_some()
    }

    fn token_kernels(&self) -> bool {
        self.inbox.is_some() && self.expand
    }

    fn land_sums(
        &mut self,
        _: usize,
        _: u64,
        region: Region,
        wire: usize,
        index: &[u32],
        signal: usize,
        value: u64,
    ) -> Result<(), SchedError> {
        let Some((t, ids)) = self.inbox else {
            panic!("asked to expand sums without an inbox");
        };
        assert_eq!(index.len(), region.rows, "an index per row");
        let mut own = self.dev.own[2].lock().unwrap();
        for (r, &s) in index.iter().enumerate() {
            let at = region.offset + r * region.pitch;
            let row = &mut own[at..at + region.width];
            match s {
                u32::MAX => row.fill(0),
                s => t.read(ids[2], wire + s as usize * region.width, row)?,
            }
        }
        drop(own);
        self.dev.signals[signal].store(value, Ordering::Release);
        Ok(())
    }

    fn land_tokens(
        &mut self,
        region: Region,
        place: TokenPlace,
        fresh: Range<usize>,
        signal: usize,
        value: u64,
    ) -> Result<(), SchedError> {
        let Some((t, ids)) = self.inbox else {
            panic!("asked to expand tokens without an inbox");
        };
        let (rb, n) = (self.row_bytes, region.bytes() / self.row_bytes);
        let mut index = vec![0u8; 4 * n];
        t.read(ids[1], place.index, &mut index)?;
        let at = place.tokens + fresh.start * rb;
        t.read(
            ids[1],
            at,
            &mut self.tokens_copy[at..place.tokens + fresh.end * rb],
        )?;
        let mut own = self.dev.own[1].lock().unwrap();
        for (r, slot) in index.chunks_exact(4).enumerate() {
            let s = u32::from_le_bytes(slot.try_into().unwrap()) as usize;
            let (at, from) = (region.offset + r * rb, place.tokens + s * rb);
            own[at..at + rb].copy_from_slice(&self.tokens_copy[from..from + rb]);
        }
        drop(own);
        self.dev.signals[signal].store(value, Ordering::Release);
        Ok(())
    }

    fn land(
        &mut self,
        region: Region,
        wire: usize,
        from: Source,
        signal: usize,
        value: u64,
    ) -> Result<(), SchedError> {
        let b = region.buf.index();
        let mut arrived = vec![0u8; region.bytes()];
        match (from, self.inbox) {
            (Source::Image, _) => {
                arrived.copy_from_slice(&self.landing[b][wire..wire + region.bytes()])
            }
            (Source::Inbox, Some((t, ids))) => t.read(ids[b], wire, &mut arrived)?,
            (Source::Inbox, None) => panic!("asked to land from an inbox it has not got"),
        }
        let mut own = self.dev.own[b].lock().unwrap();
        copy_2d(region, &arrived, false, &mut own);
        drop(own);
        self.dev.signals[signal].store(value, Ordering::Release);
        Ok(())
    }

    fn send_order(&mut self, rows: usize) -> Result<SendOrder, SchedError> {
        let o = self.dev.order.lock().unwrap();
        let n = rows.min(o.slots.len());
        Ok(SendOrder {
            slots: o.slots[..n].to_vec(),
            weights: o.weights[..n].to_vec(),
        })
    }

    fn end_call(&mut self) -> Result<(), SchedError> {
        self.tokens_copy.fill(POISON);
        Ok(())
    }
}

/// Token `t` of `src` in call `epoch`: the bytes of every row it has.
fn token_bytes(epoch: u64, src: usize, t: usize) -> Vec<u8> {
    let seed = epoch * 1_000_003 + (src as u64) * 10_007 + t as u64;
    (0..2 * H)
        .map(|b| seed.wrapping_mul(31).wrapping_add(b as u64 * 7) as u8)
        .collect()
}

fn mix(seed: u64) -> u64 {
    let z = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (z ^ (z >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9) ^ (z >> 32)
}

/// The weight of slot `slot` of `src` in call `epoch`: quarters in
/// [-1, 1], so zeros and ties between a token's weights are common.
fn weight(epoch: u64, src: usize, slot: u32) -> f32 {
    let h = mix(epoch * 7_919 + (src as u64) * 104_729 + u64::from(slot));
    (h % 9) as f32 / 4.0 - 1.0
}

/// A rank's routing of one call made from its count row: for each expert,
/// the slot (`token * top_k + j`) of each row in segment order. Rows are
/// dealt to tokens round-robin, so a token has at most `top_k` rows, at
/// most one per expert, and often several on one rank; the order inside a
/// segment is shuffled, as the device's atomics leave it. Every rank
/// derives any rank's routing from the count matrix and the seed.
fn routing(row: &[u32], top_k: usize, seed: u64) -> Vec<Vec<u32>> {
    let total: usize = row.iter().map(|&c| c as usize).sum();
    let widest = row.iter().map(|&c| c as usize).max().unwrap_or(0);
    let tokens = total.div_ceil(top_k).max(widest).max(1);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut next, mut used) = (0, vec![0usize; tokens]);
    row.iter()
        .map(|&c| {
            let mut seg: Vec<u32> = (0..c as usize)
                .map(|_| {
                    let t = next % tokens;
                    next += 1;
                    used[t] += 1;
                    (t * top_k + used[t] - 1) as u32
                })
                .collect();
            seg.shuffle(&mut rng);
            seg
        })
        .collect()
}

fn routing_seed(epoch: u64, src: usize) -> u64 {
    epoch * 7919 + src as u64
}

/// What the owner of expert `e` sends back for row `i` of `src` in call
/// `epoch`: bf16 eighths in [-1, 1], distinct per call and row.
fn answer(epoch: u64, src: usize, e: usize, i: usize) -> Vec<u8> {
    let seed = epoch * 1_000_003 + (src as u64) * 10_007 + (e as u64) * 101 + i as u64;
    (0..H)
        .flat_map(|c| {
            let v = (mix(seed * 64 + c as u64) % 17) as f32 / 8.0 - 1.0;
            bf16::from_f32(v).to_le_bytes()
        })
        .collect()
}

fn bf16_at(bytes: &[u8], col: usize) -> f64 {
    f64::from(bf16::from_le_bytes([bytes[2 * col], bytes[2 * col + 1]]).to_f32())
}

struct Kernel<'a> {
    me: usize,
    g: Geometry,
    cfg: MoeConfig,
    dev: &'a Device,
    rng: ChaCha8Rng,
    /// Called before this call touches anything (a rank that dies while its
    /// peers are in the call; all its earlier puts were complete).
    die: Option<&'a (dyn Fn() + Sync)>,
    wire: WireFormat,
}

/// What a call should have been on a rank: refused (nothing but counts
/// moved), and the exact bytes its proxy puts on the wire.
#[derive(Debug, PartialEq, Eq)]
struct Expect {
    refused: bool,
    wire_bytes: usize,
}

impl Kernel<'_> {
    fn wait(&self, signal: usize, epoch: u64) -> Result<(), String> {
        let start = Instant::now();
        while self.dev.signals[signal].load(Ordering::Acquire) < epoch {
            if self.dev.abort.load(Ordering::Acquire) {
                return Err(format!("rank {}: aborted (the proxy failed)", self.me));
            }
            if start.elapsed() > T {
                return Err(format!(
                    "rank {}: signal {signal} never reached {epoch}",
                    self.me
                ));
            }
            std::thread::yield_now();
        }
        Ok(())
    }

    /// Writes `bytes` at `offset` of `to`'s buffer as the kernels would:
    /// into the own buffer for itself, else into the mirror.
    fn store(&self, to: usize, buf: Buf, offset: usize, bytes: &[u8]) {
        let m = if to == self.me {
            &self.dev.own[buf.index()]
        } else {
            &self.dev.mirrors[to][buf.index()]
        };
        m.lock().unwrap()[offset..offset + bytes.len()].copy_from_slice(bytes);
    }

    fn raise(&self, to: usize, signal: usize, epoch: u64) {
        let w = if to == self.me {
            &self.dev.signals[signal]
        } else {
            &self.dev.ready[to][signal]
        };
        w.store(epoch, Ordering::Release);
    }

    fn jitter(&mut self) {
        if self.rng.gen_bool(0.3) {
            std::thread::sleep(Duration::from_micros(self.rng.gen_range(0..300)));
        }
    }

    /// Bytes this rank's proxy puts on the wire in a call it does not
    /// refuse: count rows, dispatch rows (token-once: each token once per
    /// peer plus a slot and a ratio per row), and the combine rows of its
    /// experts (token-once: one per token of the peer).
    fn wire_bytes(&self, routes: &[Vec<Vec<u32>>]) -> usize {
        let (w, e, me, rb) = (self.g.ranks, self.g.experts, self.me, 2 * H);
        let epr = e / w;
        let tokens = |slots: &[u32]| {
            let mut t: Vec<u32> = slots.iter().map(|s| s / self.g.top_k as u32).collect();
            t.sort_unstable();
            t.dedup();
            t.len()
        };
        let mut n = (w - 1) * 4 * e;
        for d in (0..w).filter(|&d| d != me) {
            let out: Vec<u32> = routes[me][d * epr..(d + 1) * epr].concat();
            let back: Vec<u32> = routes[d][me * epr..(me + 1) * epr].concat();
            n += match self.wire {
                WireFormat::Rows => (out.len() + back.len()) * rb,
                WireFormat::Tokens => (tokens(&out) + tokens(&back)) * rb + 8 * out.len(),
            };
        }
        n
    }

    /// One call: `mine` is this rank's row of the count matrix. A call
    /// whose counts exceed a capacity is refused (nothing moves, as the
    /// device's layout kernel does).
    fn call(&mut self, epoch: u64, mine: &[u32]) -> Result<Expect, String> {
        if let Some(die) = self.die {
            die();
        }
        // No piece of this call lands before its count rows are out.
        self.dev.own[Buf::Comb.index()].lock().unwrap().fill(NAN);
        let (w, e, me) = (self.g.ranks, self.g.experts, self.me);
        let epr = e / w;
        let row: Vec<u8> = mine.iter().flat_map(|c| c.to_le_bytes()).collect();
        for to in 0..w {
            let p = self.g.counts_piece(me, to, epoch);
            self.store(to, Buf::Counts, p.region.offset, &row);
            self.raise(to, self.g.count_signal(me), epoch);
        }
        for s in 0..w {
            self.wait(self.g.count_signal(s), epoch)?;
        }

        let counts: Vec<Vec<usize>> = {
            let c = self.dev.own[0].lock().unwrap();
            (0..w)
                .map(|s| {
                    let off = self.g.counts_piece(s, me, epoch).region.offset;
                    c[off..off + 4 * e]
                        .chunks_exact(4)
                        .map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize)
                        .collect()
                })
                .collect()
        };
        let over = (0..w).any(|d| {
            let got: usize = counts.iter().flat_map(|r| &r[d * epr..(d + 1) * epr]).sum();
            got > self.g.recv_rows
        });
        if over {
            return Ok(Expect {
                refused: true,
                wire_bytes: (w - 1) * 4 * e,
            });
        }
        let plan = LayoutPlan::new(&self.cfg, counts.clone()).map_err(|x| x.to_string())?;
        let k = self.g.top_k;
        let routes: Vec<Vec<Vec<u32>>> = counts
            .iter()
            .enumerate()
            .map(|(s, r)| {
                let r: Vec<u32> = r.iter().map(|&c| c as u32).collect();
                routing(&r, k, routing_seed(epoch, s))
            })
            .collect();
        let slots = routes[me].concat();
        let weights = slots.iter().map(|&s| weight(epoch, me, s)).collect();
        *self.dev.order.lock().unwrap() = SendOrder { slots, weights };
        // Dispatch, segments in random order.
        let mut segs: Vec<usize> = (0..e).collect();
        segs.shuffle(&mut self.rng);
        for ge in segs {
            let (dst, le) = (ge / epr, ge % epr);
            let seg = *plan.recv[dst].segment(le, me, w);
            for (i, &slot) in routes[me][ge].iter().enumerate() {
                let b = token_bytes(epoch, me, slot as usize / k);
                self.store(dst, Buf::Recv, (seg.row + i) * 2 * H, &b);
            }
            self.jitter();
            self.raise(dst, self.g.dispatch_signal(le, me), epoch);
        }
        // Every segment of this rank's experts, checked right after its
        // signal; then "FC": each row's answer into its source's combine
        // buffer at the source's send position, chunk by chunk.
        for le in 0..epr {
            for (s, route) in routes.iter().enumerate() {
                self.wait(self.g.dispatch_signal(le, s), epoch)?;
                let seg = plan.recv[me].segment(le, s, w);
                let recv = self.dev.own[1].lock().unwrap();
                for (i, &slot) in route[me * epr + le].iter().enumerate() {
                    let at = (seg.row + i) * 2 * H;
                    if recv[at..at + 2 * H] != token_bytes(epoch, s, slot as usize / k)[..] {
                        return Err(format!(
                            "rank {me} call {epoch}: row {i} of (expert {le}, src {s}) wrong"
                        ));
                    }
                }
            }
        }
        // Layer1 pieces: column chunk c of expert group g's rows, as
        // j = g * chunks + c, in random order.
        let (cb, chunks) = (self.g.chunk_bytes, self.g.chunks);
        let mut order: Vec<usize> = (0..self.g.pieces()).collect();
        order.shuffle(&mut self.rng);
        for j in order {
            let (grp, c) = (j / chunks, j % chunks);
            for (s, from_s) in counts.iter().enumerate() {
                for le in self.g.group_lo(grp)..self.g.group_lo(grp + 1) {
                    let ge = me * epr + le;
                    for i in 0..from_s[ge] {
                        let pos = plan.send_offset(s, ge) + i;
                        let b = answer(epoch, s, ge, i);
                        self.store(s, Buf::Comb, pos * 2 * H + c * cb, &b[c * cb..(c + 1) * cb]);
                    }
                }
                self.jitter();
                if s != me {
                    self.raise(s, self.g.combine_signal(me, j), epoch);
                }
            }
        }
        // This rank's answers from every other owner, each piece checked
        // after its signal.
        for o in (0..w).filter(|&o| o != me) {
            for j in 0..self.g.pieces() {
                let (grp, c) = (j / chunks, j % chunks);
                self.wait(self.g.combine_signal(o, j), epoch)?;
                let comb = self.dev.own[2].lock().unwrap();
                let les = self.g.group_lo(grp)..self.g.group_lo(grp + 1);
                let check = match self.wire {
                    WireFormat::Rows => self.check_rows(&comb, epoch, (o, les), c, &counts, &plan),
                    WireFormat::Tokens => self.check_sums(&comb, epoch, o, c, &routes[me], &plan),
                };
                check.map_err(|m| format!("rank {me} call {epoch}: {m}"))?;
            }
        }
        Ok(Expect {
            refused: false,
            wire_bytes: self.wire_bytes(&routes),
        })
    }
}

impl Kernel<'_> {
    /// Rows: every answer of owner `o`'s local experts `les` (an expert
    /// group), chunk `c`, exactly.
    fn check_rows(
        &self,
        comb: &[u8],
        epoch: u64,
        (o, les): (usize, Range<usize>),
        c: usize,
        counts: &[Vec<usize>],
        plan: &LayoutPlan,
    ) -> Result<(), String> {
        let (me, cb) = (self.me, self.g.chunk_bytes);
        let epr = self.g.experts / self.g.ranks;
        let experts = o * epr + les.start..o * epr + les.end;
        for (ge, &n) in counts[me]
            .iter()
            .enumerate()
            .skip(experts.start)
            .take(experts.len())
        {
            for i in 0..n {
                let at = (plan.send_offset(me, ge) + i) * 2 * H + c * cb;
                if comb[at..at + cb] != answer(epoch, me, ge, i)[c * cb..(c + 1) * cb] {
                    return Err(format!("answer {i} of expert {ge}, chunk {c} wrong"));
                }
            }
        }
        Ok(())
    }

    /// Token-once: per token, its weighted sum over owner `o`'s rows of
    /// chunk `c` (`route` is this rank's, per expert) is the sum of its
    /// answers, within one bf16 rounding of it (2^-8 of it at most) and
    /// f32 rounding of its terms (2^-20 of the sum of their magnitudes).
    fn check_sums(
        &self,
        comb: &[u8],
        epoch: u64,
        o: usize,
        c: usize,
        route: &[Vec<u32>],
        plan: &LayoutPlan,
    ) -> Result<(), String> {
        let (me, k) = (self.me, self.g.top_k);
        let epr = self.g.experts / self.g.ranks;
        let cols = self.g.chunk_bytes / 2;
        // Per token: (got, want, magnitude) per column.
        let mut sums: std::collections::BTreeMap<u32, Vec<(f64, f64, f64)>> = Default::default();
        for (ge, slots) in route.iter().enumerate().skip(o * epr).take(epr) {
            for (i, &slot) in slots.iter().enumerate() {
                let w = f64::from(weight(epoch, me, slot));
                let row = (plan.send_offset(me, ge) + i) * 2 * H;
                let want = answer(epoch, me, ge, i);
                let acc = sums
                    .entry(slot / k as u32)
                    .or_insert_with(|| vec![(0.0, 0.0, 0.0); cols]);
                for (x, a) in acc.iter_mut().enumerate() {
                    let col = c * cols + x;
                    let v = bf16_at(&want, col);
                    a.0 += w * bf16_at(&comb[row..row + 2 * H], col);
                    a.1 += w * v;
                    a.2 += (w * v).abs();
                }
            }
        }
        for (t, acc) in sums {
            for (x, (got, want, mag)) in acc.into_iter().enumerate() {
                // NaN fails too: a row nobody wrote.
                // One bf16 rounding of the sum (half an ulp: 2^-8 of it at
                // most) and f32 rounding of its terms.
                let close = (got - want).abs() <= want.abs() / 256.0 + mag / f64::from(1 << 20);
                if !close {
                    return Err(format!(
                        "token {t}, owner {o}, chunk {c}, column {x}: {got} instead of {want}"
                    ));
                }
            }
        }
        Ok(())
    }
}

fn config(w: usize, epr: usize) -> (MoeConfig, Geometry) {
    let cfg = MoeConfig {
        hidden: H,
        ffn: 64,
        experts: w * epr,
        top_k: (w * epr).min(4),
        ranks: w,
        dtype: Dtype::Bf16,
    };
    let chunks = 2;
    let tokens = 24;
    let g = Geometry {
        ranks: w,
        experts: w * epr,
        row_bytes: 2 * H,
        chunks,
        chunk_bytes: 2 * H / chunks,
        groups: 1,
        recv_rows: w * tokens * 2,
        // Slots (`token * top_k + j`), a bound on the rows sent too.
        send_rows: tokens * 2 * cfg.top_k,
        top_k: cfg.top_k,
    };
    (cfg, g)
}

/// Counts of one call: `kind` 0 random with empty experts, 1 all to expert
/// 0, 2 this rank silent (rank 1 sends nothing).
fn counts_for(rng: &mut ChaCha8Rng, me: usize, e: usize, kind: usize) -> Vec<u32> {
    let mut row = vec![0u32; e];
    match kind {
        0 => {
            for _ in 0..rng.gen_range(0..=48) {
                let x = rng.gen_range(0..e);
                if x % 3 != 2 {
                    row[x] += 1;
                }
            }
        }
        1 => row[0] = 40,
        // A few rows anywhere.
        3 => {
            for _ in 0..rng.gen_range(0..=8) {
                row[rng.gen_range(0..e)] += 1;
            }
        }
        _ => {
            if me != 1 {
                row[e - 1] = 17;
            }
        }
    }
    row
}

/// The kind of counts of call `epoch` (see `counts_for`).
type Kinds = fn(u64) -> usize;

/// Random, all to one expert, a silent rank, in turn.
fn mixed(epoch: u64) -> usize {
    (epoch % 3) as usize
}

/// One rank's calls 1..=`calls`: a "kernel" thread per call beside the
/// proxy; `die` (rank, epoch, action) ends a rank mid-layer. The proxy
/// must refuse exactly the calls the kernels refuse.
fn run_rank(
    t: &dyn Transport,
    cfg: &MoeConfig,
    (g, wire): (Geometry, WireFormat),
    (calls, kinds): (u64, Kinds),
    seed: u64,
    die: Option<(u64, &(dyn Fn() + Sync))>,
) -> Result<(), String> {
    let me = t.rank();
    let dev = Arc::new(Device::new(&g));
    let inbox = StagedProxy::allocate(t, g, T).map_err(|e| e.to_string())?;
    let mut host = HostSide::new(Arc::clone(&dev), &g, seed ^ 0xD0 ^ me as u64);
    // Half the worlds land straight from the inbox, half of those
    // expanding token-once pieces on the "device" (each rank's own
    // business: its peers cannot tell).
    if seed % 2 == 1 {
        host.inbox = Some((t, inbox));
        host.expand = seed % 4 == 3;
    }
    let mut proxy = StagedProxy::new(t, g, inbox, T, wire).map_err(|e| e.to_string())?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ me as u64);
    for epoch in 1..=calls {
        let mine = counts_for(&mut rng, me, g.experts, kinds(epoch));
        let mut k = Kernel {
            me,
            g,
            cfg: cfg.clone(),
            dev: &dev,
            rng: ChaCha8Rng::seed_from_u64(seed ^ (epoch << 8) ^ me as u64),
            die: die.and_then(|(at, f)| (at == epoch).then_some(f)),
            wire,
        };
        std::thread::scope(|inner| {
            let kernel = inner.spawn(move || k.call(epoch, &mine));
            let proxied = proxy.call(&mut host, epoch).map_err(|e| e.to_string());
            if proxied.is_err() {
                dev.abort.store(true, Ordering::Release);
            }
            let kernel = kernel.join().map_err(|_| "kernel panicked".to_string())?;
            match (kernel, proxied) {
                (Ok(k), Ok(p)) => check_stats(epoch, &k, &p),
                (Err(k), Ok(_)) => Err(format!("kernel: {k}")),
                (Err(k), Err(p)) if !k.contains("aborted") => {
                    Err(format!("kernel: {k}; proxy: {p}"))
                }
                (_, Err(p)) => Err(format!("proxy: {p}")),
            }
        })?;
    }
    Ok(())
}

/// The proxy refused exactly what the kernels refused, and put exactly
/// the bytes the call's routing needs on the wire.
fn check_stats(epoch: u64, want: &Expect, got: &StagedStats) -> Result<(), String> {
    let got = Expect {
        refused: got.refused,
        wire_bytes: got.bytes_sent,
    };
    if got == *want {
        Ok(())
    } else {
        Err(format!(
            "call {epoch}: the kernels say {want:?}, the proxy {got:?}"
        ))
    }
}

fn run_world(w: usize, epr: usize, calls: u64, seed: u64, wire: WireFormat) {
    run_world_groups(w, epr, 1, calls, seed, wire);
}

/// As `run_world`, with the local experts in `groups` expert groups: the
/// combine travels as one piece per (group, column chunk).
fn run_world_groups(w: usize, epr: usize, groups: usize, calls: u64, seed: u64, wire: WireFormat) {
    let (cfg, mut g) = config(w, epr);
    g.groups = groups;
    let world = local_world(
        w,
        Some(DelayModel {
            seed,
            max: Duration::from_micros(200),
        }),
    );
    std::thread::scope(|sc| {
        let handles: Vec<_> = world
            .iter()
            .map(|t| {
                let cfg = &cfg;
                sc.spawn(move || run_rank(t, cfg, (g, wire), (calls, mixed), seed, None))
            })
            .collect();
        for (r, h) in handles.into_iter().enumerate() {
            h.join()
                .unwrap()
                .unwrap_or_else(|e| panic!("rank {r}: {e}"));
        }
    });
}

#[test]
fn two_ranks_thirty_calls() {
    // Seeds 1 and 3: token-once's row work by the proxy, then by the device side.
    run_world(2, 2, 30, 1, WireFormat::Tokens);
    run_world(2, 2, 30, 3, WireFormat::Tokens);
    run_world(2, 2, 30, 1, WireFormat::Rows);
}

/// Expert groups (a row per (token, expert): a token-once combine sums a
/// token's rows per rank, which a group cannot split): each group's
/// combine pieces carry exactly its rows, checked after their signals.
#[test]
fn expert_groups_carry_each_groups_rows() {
    run_world_groups(2, 3, 2, 20, 1, WireFormat::Rows);
    run_world_groups(3, 4, 3, 12, 2, WireFormat::Rows);
    run_world_groups(2, 2, 2, 12, 3, WireFormat::Rows);
}

#[test]
fn three_and_four_ranks() {
    for wire in [WireFormat::Tokens, WireFormat::Rows] {
        run_world(3, 1, 12, 2, wire);
        run_world(4, 3, 12, 3, wire);
    }
    // Tokens with several rows on one rank, the proxy doing the row work:
    // through the landing image (seed 2) and from the inbox (seed 1).
    run_world(3, 2, 12, 2, WireFormat::Tokens);
    run_world(4, 3, 12, 1, WireFormat::Tokens);
}

#[test]
fn refused_calls_move_nothing_and_the_next_is_whole() {
    let (cfg, mut g) = config(2, 2);
    // 40 rows of each rank to expert 0 exceed rank 0's 50; a few fit.
    g.recv_rows = 50;
    let world = local_world(2, None);
    let kinds: Kinds = |epoch| if epoch % 2 == 1 { 1 } else { 3 };
    std::thread::scope(|sc| {
        let hs: Vec<_> = world
            .iter()
            .map(|t| {
                let cfg = &cfg;
                sc.spawn(move || run_rank(t, cfg, (g, WireFormat::Tokens), (8, kinds), 5, None))
            })
            .collect();
        for (r, h) in hs.into_iter().enumerate() {
            h.join()
                .unwrap()
                .unwrap_or_else(|e| panic!("rank {r}: {e}"));
        }
    });
}

/// Rank `t`'s proxy, its inboxes allocated (collective).
fn proxy(t: &LocalTransport, g: Geometry, timeout: Duration) -> StagedProxy<'_> {
    let inbox = StagedProxy::allocate(t, g, T).unwrap();
    StagedProxy::new(t, g, inbox, timeout, WireFormat::Tokens).unwrap()
}

/// Proxies of a world of two, built together; rank 0's with `timeout`.
fn both(
    world: &[LocalTransport],
    g: Geometry,
    timeout: Duration,
) -> (StagedProxy<'_>, StagedProxy<'_>) {
    std::thread::scope(|sc| {
        let peer = sc.spawn(|| proxy(&world[1], g, T));
        let p0 = proxy(&world[0], g, timeout);
        (p0, peer.join().unwrap())
    })
}

#[test]
fn a_kernel_that_never_raises_is_named() {
    let (_, g) = config(2, 1);
    let world = local_world(2, None);
    let dev = Arc::new(Device::new(&g));
    let (mut proxy, _peer) = both(&world, g, Duration::from_millis(300));
    let start = Instant::now();
    let err = proxy.call(&mut HostSide::new(dev, &g, 1), 1).unwrap_err();
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("rank 0") && msg.contains("count(0) 0 -> 1"),
        "{msg}"
    );
}

#[test]
fn a_download_that_never_finishes_is_named() {
    let (_, g) = config(2, 1);
    let world = local_world(2, None);
    let dev = Arc::new(Device::new(&g));
    dev.ready[1][g.count_signal(0)].store(1, Ordering::Release);
    let (mut proxy, _peer) = both(&world, g, Duration::from_millis(300));
    let mut side = HostSide::new(dev, &g, 1);
    side.stalled = true;
    let msg = proxy.call(&mut side, 1).unwrap_err().to_string();
    assert!(
        msg.contains("rank 0") && msg.contains("the download of count(0) 0 -> 1"),
        "{msg}"
    );
}

#[test]
fn a_killed_peer_is_named_not_waited_out() {
    let (_, g) = config(2, 1);
    let world: Vec<LocalTransport> = local_world(2, None);
    let dev = Arc::new(Device::new(&g));
    // The count row is "raised" by the kernels; the peer dies before sending.
    dev.ready[1][g.count_signal(0)].store(1, Ordering::Release);
    let (mut proxy, _peer) = both(&world, g, T);
    world[1].kill();
    let start = Instant::now();
    let err = proxy.call(&mut HostSide::new(dev, &g, 1), 1).unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert!(err.to_string().contains('1'), "{err}");
}

#[cfg(feature = "ucx")]
mod over_ucx {
    use super::*;
    use crate::common::{assert_all_done, assert_victim_named, die, launch_world, marker};
    use comet_transport::launch::OnFailure;
    use comet_transport::ucx::UcxTransport;

    const ENTRY: &str = "over_ucx::staged_rank";
    const CALLS: u64 = 30;
    const KILLED_AT: u64 = 3;
    const LIMIT: Duration = Duration::from_secs(120);

    /// One rank (inert unless the launcher set `COMET_TEST_SCENARIO`).
    #[test]
    #[ignore = "a rank of a multi-process test, started by the launcher"]
    fn staged_rank() {
        let Ok(scenario) = std::env::var("COMET_TEST_SCENARIO") else {
            return;
        };
        let t = UcxTransport::from_env().expect("ucx transport");
        let (cfg, g) = config(t.world(), 2);
        let (me, victim) = (t.rank(), t.world() - 1);
        match scenario.as_str() {
            "calls" => {
                run_rank(&t, &cfg, (g, WireFormat::Tokens), (CALLS, mixed), 7, None)
                    .unwrap_or_else(|e| panic!("rank {me}: {e}"));
                t.barrier(T).expect("final barrier");
            }
            "kill" => {
                let die = || {
                    t.flush().expect("flush before dying");
                    die()
                };
                let die: &(dyn Fn() + Sync) = &die;
                let at = (me == victim).then_some((KILLED_AT, die));
                let start = Instant::now();
                let e = run_rank(&t, &cfg, (g, WireFormat::Tokens), (CALLS, mixed), 7, at)
                    .expect_err("the peer died");
                println!(
                    "rank {me}: error as expected after {:?}: {e}",
                    start.elapsed()
                );
                // Stay (without progressing UCX) until every survivor has seen
                // the loss, so none acknowledges a put of an exited rank.
                std::thread::sleep(Duration::from_millis(300));
            }
            other => panic!("unknown scenario {other}"),
        }
        println!("{}", marker(me, &scenario));
    }

    #[test]
    fn staged_ranks_over_ucx_tcp_and_shared_memory() {
        for (world, tls) in [(2, "tcp"), (3, "sm,self"), (4, "tcp")] {
            let r = launch_world(ENTRY, "calls", world, tls, OnFailure::KillAll, LIMIT);
            assert_all_done(r, "calls", world, tls);
        }
    }

    #[test]
    fn staged_rank_killed_mid_layer_is_named_by_every_other_rank() {
        for (world, tls) in [(2, "tcp"), (3, "tcp"), (3, "sm,self")] {
            let r = launch_world(ENTRY, "kill", world, tls, OnFailure::Wait, LIMIT);
            assert_victim_named(r, "kill", world, tls);
        }
    }
}
