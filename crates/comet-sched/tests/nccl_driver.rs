//! The NCCL proxy's loop ([`NcclProxy::call`]) on CPU: W ranks' proxies
//! as threads, each over its own [`NcclLanes`] into one simulated world
//! that plays NCCL's point-to-point rules (per ordered pair a lane, the
//! k-th send meets the k-th recv, sizes must be equal, a send carries what
//! the mirror holds when it is posted, bytes reach the receiver's staging
//! only when its recv completes) and the device forward's kernels (count
//! row, then rows into the mirrors of the peers' buffers at comet-core's
//! LayoutPlan places, ready words raised in random order, each stage once
//! its signals are up, the next call's kernels as soon as a call is done;
//! a call over a capacity refused after the counts, as the layout kernel
//! does). Events of the world (ready words coming up, lanes completing,
//! landings running) happen in random order as the proxies poll.
//!
//! Checked: every signal's bytes at LayoutPlan's places when the proxy
//! raises it and again by the kernels waiting for it; every signal of a
//! call raised once, none of a refused call's layer; landings posted only
//! after their recv completed; no lane left with unmatched ops; stats that
//! add up. Also: a kernel that never raises (the timeout names its piece), a
//! lane that fails (its error at once, the other ranks stopped).

mod nccl_sim;

use comet_core::layout::LayoutPlan;
use comet_sched::nccl_proxy::{NcclLanes, NcclProxy, NcclStats, Op};
use comet_sched::proxy_plan::{Buf, Geometry, Kind, Piece};
use comet_sched::SchedError;
use nccl_sim::{pack, piece_experts, random_counts, row_bytes, unpack, Shape, POISON};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);

/// How far a rank's kernels are in their current call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Count row stored and announced; waiting for every count signal.
    Counting,
    /// Rows stored into the mirrors; waiting for every dispatch signal.
    Dispatched,
    /// Answers stored; waiting for every combine signal.
    Combining,
    /// The last call is over.
    Done,
}

enum Event {
    /// A kernel's ready word of `rank` for `to` becomes visible.
    Ready {
        rank: usize,
        to: usize,
        signal: usize,
        value: u64,
    },
    /// An op of `rank` completes; a recv brings its bytes.
    Complete {
        rank: usize,
        op: Op,
        bytes: Option<Vec<u8>>,
    },
    /// A landing `rank` posted runs: the copy from staging, then the raise.
    /// Apart from the lanes, so other recvs may fill staging in between.
    Landing { rank: usize, op: Op, value: u64 },
}

struct SimRank {
    own: [Vec<u8>; 3],
    signals: Vec<u64>,
    /// The kernels' view of every peer's buffers: `mirrors[to][buf]`.
    mirrors: Vec<[Vec<u8>; 3]>,
    /// Ready words `[to][signal]` as the proxy sees them.
    ready: Vec<Vec<u64>>,
    /// Receive staging images of each buffer, wire layout.
    staging: [Vec<u8>; 3],
    /// The call its kernels are in (an index of `World::calls`).
    call: usize,
    stage: Stage,
    /// The call's counts as its kernels read them.
    counts: Vec<Vec<usize>>,
    /// Ops the proxy posted that have not completed.
    open: HashMap<Op, Piece>,
    /// Recvs completed whose landing is not posted yet, by their landing.
    received: HashMap<Op, Piece>,
    /// Ops completed and not yet polled.
    done: Vec<Op>,
    /// How often the proxy raised each `(epoch, signal)`.
    raised: HashMap<(u64, usize), usize>,
}

/// Ops of one lane not matched yet.
#[derive(Default)]
struct Lane {
    sends: VecDeque<(Op, Piece, Vec<u8>)>,
    recvs: VecDeque<(Op, Piece)>,
}

struct World {
    shape: Shape,
    geo: Geometry,
    epoch0: u64,
    calls: Vec<Vec<Vec<u32>>>,
    plans: Vec<LayoutPlan>,
    /// Calls over a capacity, which every rank's kernels refuse.
    refused: Vec<bool>,
    ranks: Vec<SimRank>,
    lanes: HashMap<(usize, usize), Lane>,
    events: Vec<Event>,
    rng: ChaCha8Rng,
    /// A rank whose kernels never raise a ready word.
    mute: Option<usize>,
    /// The first broken rule: every lane errs from then on, so every
    /// proxy ends and the test reports it.
    broken: Option<String>,
}

impl World {
    fn new(
        shape: Shape,
        geo: Geometry,
        epoch0: u64,
        calls: Vec<Vec<Vec<u32>>>,
        seed: u64,
    ) -> World {
        let w = shape.w;
        let cfg = shape.cfg();
        let bufs = || Buf::ALL.map(|b| vec![POISON; geo.bytes(b)]);
        let nsig = geo.signal_count();
        let plans = calls
            .iter()
            .map(|c| {
                let c = c
                    .iter()
                    .map(|r| r.iter().map(|&x| x as usize).collect())
                    .collect();
                LayoutPlan::new(&cfg, c).unwrap()
            })
            .collect();
        let refused = calls
            .iter()
            .map(|c| geo.check_counts(0, c).is_err())
            .collect();
        let ranks = (0..w)
            .map(|_| SimRank {
                own: bufs(),
                signals: vec![0; nsig],
                mirrors: (0..w).map(|_| bufs()).collect(),
                ready: vec![vec![0; nsig]; w],
                staging: bufs(),
                call: 0,
                stage: Stage::Done,
                counts: Vec::new(),
                open: HashMap::new(),
                received: HashMap::new(),
                done: Vec::new(),
                raised: HashMap::new(),
            })
            .collect();
        World {
            shape,
            geo,
            epoch0,
            calls,
            plans,
            refused,
            ranks,
            lanes: HashMap::new(),
            events: Vec::new(),
            rng: ChaCha8Rng::seed_from_u64(seed),
            mute: None,
            broken: None,
        }
    }

    /// The epoch `rank`'s kernels are in.
    fn epoch(&self, rank: usize) -> u64 {
        self.epoch0 + self.ranks[rank].call as u64
    }

    fn broke(&mut self, rank: usize, m: String) -> SchedError {
        let m = self.broken.get_or_insert(m).clone();
        SchedError::Input {
            rank,
            message: format!("simulator: {m}"),
        }
    }

    fn check(&self, rank: usize) -> Result<(), SchedError> {
        match &self.broken {
            Some(m) => Err(SchedError::Input {
                rank,
                message: format!("simulator: {m}"),
            }),
            None => Ok(()),
        }
    }

    /// Runs up to `n` events, picked at random.
    fn step(&mut self, n: usize) {
        for _ in 0..n {
            if self.events.is_empty() || self.broken.is_some() {
                return;
            }
            let i = self.rng.gen_range(0..self.events.len());
            let r = match self.events.swap_remove(i) {
                Event::Ready {
                    rank,
                    to,
                    signal,
                    value,
                } => {
                    let word = &mut self.ranks[rank].ready[to][signal];
                    *word = (*word).max(value);
                    Ok(())
                }
                Event::Complete { rank, op, bytes } => self.complete(rank, op, bytes),
                Event::Landing { rank, op, value } => self.land(rank, op, value),
            };
            if let Err(m) = r {
                self.broken.get_or_insert(m);
            }
        }
    }

    fn complete(&mut self, rank: usize, op: Op, bytes: Option<Vec<u8>>) -> Result<(), String> {
        let r = &mut self.ranks[rank];
        let p = r
            .open
            .remove(&op)
            .ok_or(format!("{op:?} of rank {rank} not open"))?;
        if let (Some(b), Op::Recv(i)) = (bytes, op) {
            r.staging[p.region.buf.index()][p.wire..p.wire + b.len()].copy_from_slice(&b);
            r.received.insert(Op::Land(i), p);
        }
        r.done.push(op);
        Ok(())
    }

    /// A landing runs: staging into the own buffer, then the raise.
    fn land(&mut self, rank: usize, op: Op, value: u64) -> Result<(), String> {
        let r = &mut self.ranks[rank];
        let p = r
            .open
            .remove(&op)
            .ok_or(format!("{op:?} of rank {rank} not open"))?;
        let buf = p.region.buf.index();
        let packed = r.staging[buf][p.wire..p.wire + p.region.bytes()].to_vec();
        unpack(p.region, &packed, &mut r.own[buf]);
        self.raise(rank, p, value)?;
        self.ranks[rank].done.push(op);
        Ok(())
    }

    /// The proxy raises `rank`'s signal of `p`: the bytes the kernels will
    /// read behind it must be there, at LayoutPlan's places.
    fn raise(&mut self, rank: usize, p: Piece, value: u64) -> Result<(), String> {
        let epoch = self.epoch(rank);
        if p.to != rank || value != epoch {
            return Err(format!("rank {rank} in call {epoch} raised {p} to {value}"));
        }
        self.check_signal(rank, p.kind, p.from).map_err(|m| {
            format!(
                "rank {rank} raised signal {} of {p} before its bytes: {m}",
                p.signal
            )
        })?;
        *self.ranks[rank]
            .raised
            .entry((value, p.signal))
            .or_default() += 1;
        self.ranks[rank].signals[p.signal] = value;
        self.advance(rank)
    }

    /// The bytes behind one signal of `rank` from `from`, in its call.
    fn check_signal(&self, rank: usize, kind: Kind, from: usize) -> Result<(), String> {
        let (w, e, rb, epr) = (
            self.shape.w,
            self.shape.experts(),
            self.geo.row_bytes,
            self.shape.epr,
        );
        let (c, epoch) = (self.ranks[rank].call, self.epoch(rank));
        let (truth, plan) = (&self.calls[c], &self.plans[c]);
        let own = &self.ranks[rank].own;
        match kind {
            Kind::Counts => {
                let at = (((epoch & 1) as usize) * w + from) * e * 4;
                let want: Vec<u8> = truth[from].iter().flat_map(|c| c.to_le_bytes()).collect();
                if own[Buf::Counts.index()][at..at + 4 * e] != want[..] {
                    return Err(format!("count row of {from} at byte {at}"));
                }
            }
            Kind::Dispatch { le } => {
                let seg = plan.recv[rank].segment(le, from, w);
                for i in 0..seg.rows {
                    let at = (seg.row + i) * rb;
                    let want = row_bytes(rb, epoch, from, rank * epr + le, i, false);
                    if own[Buf::Recv.index()][at..at + rb] != want[..] {
                        return Err(format!("row {i} of (expert {le}, src {from})"));
                    }
                }
            }
            Kind::Combine { chunk: j } => {
                let cb = self.geo.chunk_bytes;
                let (experts, chunk) = piece_experts(&self.geo, from, j);
                for ge in experts {
                    for i in 0..truth[rank][ge] as usize {
                        let at = (plan.send_offset(rank, ge) + i) * rb + chunk * cb;
                        let want = row_bytes(rb, epoch, rank, ge, i, true);
                        if own[Buf::Comb.index()][at..at + cb] != want[chunk * cb..(chunk + 1) * cb]
                        {
                            return Err(format!("answer {i} of expert {ge}, chunk {chunk}"));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Stores bytes where the kernels of `me` would for `to`: in place for
    /// itself, else into the mirror.
    fn store(&mut self, me: usize, to: usize, buf: Buf, at: usize, bytes: &[u8]) {
        let r = &mut self.ranks[me];
        let b = if to == me {
            &mut r.own[buf.index()]
        } else {
            &mut r.mirrors[to][buf.index()]
        };
        b[at..at + bytes.len()].copy_from_slice(bytes);
    }

    /// A kernel's raise: its own signal for itself, else a ready word that
    /// becomes visible to the proxy at a random later point.
    fn kernel_raise(&mut self, me: usize, to: usize, signal: usize) {
        let epoch = self.epoch(me);
        if to == me {
            self.ranks[me].signals[signal] = epoch;
        } else if self.mute != Some(me) {
            self.events.push(Event::Ready {
                rank: me,
                to,
                signal,
                value: epoch,
            });
        }
    }

    /// The kernels of `me` start their current call: the count row into
    /// the own buffer and every mirror, then its signals.
    fn start_call(&mut self, me: usize) {
        let (w, e, epoch) = (self.shape.w, self.shape.experts(), self.epoch(me));
        let at = (((epoch & 1) as usize) * w + me) * e * 4;
        let row: Vec<u8> = self.calls[self.ranks[me].call][me]
            .iter()
            .flat_map(|c| c.to_le_bytes())
            .collect();
        for to in 0..w {
            self.store(me, to, Buf::Counts, at, &row);
        }
        for to in 0..w {
            self.kernel_raise(me, to, self.geo.count_signal(me));
        }
        self.ranks[me].stage = Stage::Counting;
    }

    fn all_up(&self, rank: usize, signals: impl IntoIterator<Item = usize>) -> bool {
        let epoch = self.epoch(rank);
        signals
            .into_iter()
            .all(|s| self.ranks[rank].signals[s] >= epoch)
    }

    /// Moves `me`'s kernels on as far as their signals let them, into the
    /// next call when one is over.
    fn advance(&mut self, me: usize) -> Result<(), String> {
        let (w, epr, g) = (self.shape.w, self.shape.epr, self.geo);
        let rb = g.row_bytes;
        loop {
            let (c, epoch) = (self.ranks[me].call, self.epoch(me));
            match self.ranks[me].stage {
                Stage::Counting if self.all_up(me, (0..w).map(|s| g.count_signal(s))) => {
                    for s in 0..w {
                        self.check_signal(me, Kind::Counts, s).map_err(|m| {
                            format!("rank {me} kernel after its count signals: {m}")
                        })?;
                    }
                    if self.refused[c] {
                        self.next_call(me);
                        continue;
                    }
                    self.ranks[me].counts = self.calls[c]
                        .iter()
                        .map(|r| r.iter().map(|&x| x as usize).collect())
                        .collect();
                    for ge in 0..w * epr {
                        let (dst, le) = (ge / epr, ge % epr);
                        let seg = *self.plans[c].recv[dst].segment(le, me, w);
                        for i in 0..seg.rows {
                            let b = row_bytes(rb, epoch, me, ge, i, false);
                            self.store(me, dst, Buf::Recv, (seg.row + i) * rb, &b);
                        }
                        self.kernel_raise(me, dst, g.dispatch_signal(le, me));
                    }
                    self.ranks[me].stage = Stage::Dispatched;
                }
                Stage::Dispatched
                    if self.all_up(
                        me,
                        (0..epr).flat_map(|le| (0..w).map(move |s| g.dispatch_signal(le, s))),
                    ) =>
                {
                    for le in 0..epr {
                        for s in 0..w {
                            self.check_signal(me, Kind::Dispatch { le }, s)
                                .map_err(|m| format!("rank {me} kernel after dispatch: {m}"))?;
                        }
                    }
                    let cb = g.chunk_bytes;
                    for j in 0..g.pieces() {
                        let (grp, ch) = (j / g.chunks, j % g.chunks);
                        for s in 0..w {
                            for ge in me * epr + g.group_lo(grp)..me * epr + g.group_lo(grp + 1) {
                                for i in 0..self.ranks[me].counts[s][ge] {
                                    let at = (self.plans[c].send_offset(s, ge) + i) * rb + ch * cb;
                                    let b = row_bytes(rb, epoch, s, ge, i, true);
                                    self.store(me, s, Buf::Comb, at, &b[ch * cb..(ch + 1) * cb]);
                                }
                            }
                            if s != me {
                                self.kernel_raise(me, s, g.combine_signal(me, j));
                            }
                        }
                    }
                    self.ranks[me].stage = Stage::Combining;
                }
                Stage::Combining
                    if self.all_up(
                        me,
                        (0..w)
                            .filter(|&o| o != me)
                            .flat_map(|o| (0..g.pieces()).map(move |ch| g.combine_signal(o, ch))),
                    ) =>
                {
                    for o in (0..w).filter(|&o| o != me) {
                        for ch in 0..g.pieces() {
                            self.check_signal(me, Kind::Combine { chunk: ch }, o)
                                .map_err(|m| format!("rank {me} reduce: {m}"))?;
                        }
                    }
                    self.next_call(me);
                }
                _ => return Ok(()),
            }
        }
    }

    /// The kernels of the next call start as soon as a call is over (the
    /// forwards are enqueued ahead on the device).
    fn next_call(&mut self, me: usize) {
        self.ranks[me].call += 1;
        self.ranks[me].stage = Stage::Done;
        if self.ranks[me].call < self.calls.len() {
            self.start_call(me);
        }
    }

    /// NCCL's rule: the heads of a lane meet, sizes equal; the bytes reach
    /// the receiver when its recv completes.
    fn match_lane(&mut self, (a, b): (usize, usize)) -> Result<(), String> {
        let lane = self.lanes.entry((a, b)).or_default();
        while !lane.sends.is_empty() && !lane.recvs.is_empty() {
            let (sop, s, bytes) = lane.sends.pop_front().unwrap();
            let (rop, r) = lane.recvs.pop_front().unwrap();
            if s.region.bytes() != r.region.bytes() {
                return Err(format!("lane {a}->{b}: send of {s} met recv of {r}"));
            }
            self.events.push(Event::Complete {
                rank: a,
                op: sop,
                bytes: None,
            });
            self.events.push(Event::Complete {
                rank: b,
                op: rop,
                bytes: Some(bytes),
            });
        }
        Ok(())
    }

    /// After every proxy ended well: the rest of the world runs out, then
    /// every rule of a whole run.
    fn finish(&mut self) {
        while !self.events.is_empty() {
            self.step(64);
        }
        assert_eq!(self.broken, None);
        let (w, g) = (self.shape.w, self.geo);
        for (r, rank) in self.ranks.iter().enumerate() {
            assert_eq!(
                rank.call,
                self.calls.len(),
                "rank {r}'s kernels in {:?}",
                rank.stage
            );
            assert!(
                rank.open.is_empty() && rank.received.is_empty() && rank.done.is_empty(),
                "rank {r}"
            );
            let mut want = HashMap::new();
            for (c, &refused) in self.refused.iter().enumerate() {
                let epoch = self.epoch0 + c as u64;
                for from in (0..w).filter(|&f| f != r) {
                    want.insert((epoch, g.count_signal(from)), 1);
                    if refused {
                        continue;
                    }
                    for le in 0..self.shape.epr {
                        want.insert((epoch, g.dispatch_signal(le, from)), 1);
                    }
                    for ch in 0..g.pieces() {
                        want.insert((epoch, g.combine_signal(from, ch)), 1);
                    }
                }
            }
            assert_eq!(rank.raised, want, "rank {r}: signals the proxy raised");
        }
        for ((a, b), lane) in &self.lanes {
            assert!(
                lane.sends.is_empty() && lane.recvs.is_empty(),
                "lane {a}->{b} left unmatched ops"
            );
        }
    }
}

/// One rank's lanes into the shared world.
struct SimLanes {
    world: Arc<Mutex<World>>,
    rank: usize,
    /// Set by the test once any rank's proxy failed.
    stop: Arc<AtomicBool>,
    /// The post (counted from 0) at which this rank's lane fails.
    fail_at: Option<usize>,
    posts: usize,
}

impl SimLanes {
    fn world(&self) -> MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a post; the one at `fail_at` fails as a lane would.
    fn post(&mut self, what: &str, p: &Piece) -> Result<(), SchedError> {
        self.posts += 1;
        if self.fail_at == Some(self.posts - 1) {
            return Err(SchedError::Device {
                rank: self.rank,
                message: format!(
                    "lane {} -> {}: {what} of {p} failed (simulated)",
                    p.from, p.to
                ),
            });
        }
        self.world().check(self.rank)
    }

    /// Posts a send or recv on its lane.
    fn post_on_lane(&mut self, op: Op, p: &Piece) -> Result<(), SchedError> {
        let send = matches!(op, Op::Send(_));
        self.post(if send { "send" } else { "recv" }, p)?;
        let me = self.rank;
        let mut w = self.world();
        if p.region.bytes() == 0 || (if send { p.from } else { p.to }) != me {
            return Err(w.broke(me, format!("rank {me} posted {op:?} of {p}")));
        }
        if w.ranks[me].open.insert(op, *p).is_some() {
            return Err(w.broke(me, format!("rank {me} posted {op:?} twice")));
        }
        if send {
            // What a send carries is what the mirror holds when it is
            // posted: a send ahead of its ready word carries stale bytes.
            let bytes = pack(p.region, &w.ranks[me].mirrors[p.to][p.region.buf.index()]);
            w.lanes
                .entry((p.from, p.to))
                .or_default()
                .sends
                .push_back((op, *p, bytes));
        } else {
            w.lanes
                .entry((p.from, p.to))
                .or_default()
                .recvs
                .push_back((op, *p));
        }
        w.match_lane((p.from, p.to)).map_err(|m| w.broke(me, m))
    }
}

impl NcclLanes for SimLanes {
    fn ready(&self, to: usize, signal: usize) -> u64 {
        self.world().ranks[self.rank].ready[to][signal]
    }

    fn send(&mut self, op: Op, piece: &Piece) -> Result<(), SchedError> {
        self.post_on_lane(op, piece)
    }

    fn recv(&mut self, op: Op, piece: &Piece) -> Result<(), SchedError> {
        self.post_on_lane(op, piece)
    }

    fn land(&mut self, op: Op, piece: &Piece, value: u64) -> Result<(), SchedError> {
        self.post("landing", piece)?;
        let me = self.rank;
        let mut w = self.world();
        if w.ranks[me].received.remove(&op) != Some(*piece) {
            return Err(w.broke(
                me,
                format!("rank {me} landed {piece} ({op:?}) before its recv completed"),
            ));
        }
        w.ranks[me].open.insert(op, *piece);
        w.events.push(Event::Landing {
            rank: me,
            op,
            value,
        });
        Ok(())
    }

    fn raise(&mut self, piece: &Piece, value: u64) -> Result<(), SchedError> {
        let me = self.rank;
        let mut w = self.world();
        w.check(me)?;
        if piece.region.bytes() != 0 {
            return Err(w.broke(me, format!("rank {me} raised {piece} without its bytes")));
        }
        w.raise(me, *piece, value).map_err(|m| w.broke(me, m))
    }

    fn poll_completed(&mut self, done: &mut Vec<Op>) -> Result<(), SchedError> {
        let mut w = self.world();
        w.step(4);
        w.check(self.rank)?;
        done.append(&mut w.ranks[self.rank].done);
        Ok(())
    }

    fn read_count_buffer(&mut self, out: &mut [u8]) -> Result<(), SchedError> {
        out.copy_from_slice(&self.world().ranks[self.rank].own[Buf::Counts.index()]);
        Ok(())
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
}

/// What each rank's proxy returned: its calls' stats, or its error.
type Outcome = Vec<Result<Vec<NcclStats>, SchedError>>;

/// Runs every call of `world` with a proxy thread per rank; `fail` makes
/// one rank's lane fail at a post, and then, once its proxy failed, the
/// others are stopped (as a layer being dropped stops its proxy).
fn run(world: World, timeout: Duration, fail: Option<(usize, usize)>) -> (Outcome, World) {
    let (w, geo, epoch0, calls) = (world.shape.w, world.geo, world.epoch0, world.calls.len());
    let world = Arc::new(Mutex::new(world));
    {
        let mut wd = world.lock().unwrap();
        for r in 0..w {
            wd.start_call(r);
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let out = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..w)
            .map(|rank| {
                let mut lanes = SimLanes {
                    world: Arc::clone(&world),
                    rank,
                    stop: Arc::clone(&stop),
                    fail_at: fail.and_then(|(r, at)| (r == rank).then_some(at)),
                    posts: 0,
                };
                let stop = &stop;
                sc.spawn(move || {
                    let mut proxy = NcclProxy::new(rank, geo, timeout)?;
                    let run = (0..calls as u64)
                        .map(|c| proxy.call(&mut lanes, epoch0 + c))
                        .collect::<Result<Vec<_>, _>>();
                    if run.is_err() && fail.is_some() {
                        stop.store(true, Ordering::Release);
                    }
                    run
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let world = Arc::into_inner(world).unwrap().into_inner().unwrap();
    (out, world)
}

/// Runs `calls` on one set of buffers and checks everything of a whole run:
/// each call refused exactly when the kernels refuse it, bytes sent equal
/// bytes landed, every recv landed.
fn run_ok(shape: Shape, geo: Geometry, epoch0: u64, calls: Vec<Vec<Vec<u32>>>, seed: u64) {
    let world = World::new(shape, geo, epoch0, calls, seed);
    let (out, mut world) = run(world, T, None);
    let stats: Vec<Vec<NcclStats>> = out
        .into_iter()
        .enumerate()
        .map(|(r, o)| o.unwrap_or_else(|e| panic!("seed {seed} rank {r}: {e}")))
        .collect();
    world.finish();
    for (c, &refused) in world.refused.iter().enumerate() {
        let per: Vec<NcclStats> = stats.iter().map(|s| s[c]).collect();
        assert!(
            per.iter().all(|s| s.refused == refused),
            "call {c}: {per:?}"
        );
        let sent: usize = per.iter().map(|s| s.bytes_sent).sum();
        let landed: usize = per.iter().map(|s| s.bytes_landed).sum();
        assert_eq!(sent, landed, "call {c}");
        assert!(
            per.iter().all(|s| s.received == s.landed),
            "call {c}: {per:?}"
        );
    }
}

/// Random calls with empty experts, capacities for the largest with slack.
fn random_run(rng: &mut ChaCha8Rng, w: usize, calls: usize, seed: u64) {
    let shape = Shape::random(rng, w);
    let calls: Vec<_> = (0..calls)
        .map(|_| random_counts(rng, w, shape.experts()))
        .collect();
    let geo = shape.geometry(&calls, rng.gen_range(0..3));
    run_ok(shape, geo, rng.gen_range(1..100), calls, seed);
}

#[test]
fn random_calls_on_two_to_four_ranks() {
    for seed in 0..60u64 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let w = 2 + (seed % 3) as usize;
        random_run(&mut rng, w, 3, seed);
    }
}

#[test]
fn many_calls_on_the_same_buffers() {
    let mut rng = ChaCha8Rng::seed_from_u64(77);
    random_run(&mut rng, 4, 12, 77);
}

#[test]
fn all_rows_to_one_expert_and_a_silent_rank() {
    for seed in 0..12u64 {
        let mut rng = ChaCha8Rng::seed_from_u64(500 + seed);
        let w = 2 + (seed % 3) as usize;
        let shape = Shape::random(&mut rng, w);
        let e = shape.experts();
        let hot = rng.gen_range(0..e);
        let to_one: Vec<Vec<u32>> = (0..w)
            .map(|_| {
                let mut row = vec![0; e];
                row[hot] = rng.gen_range(1..9);
                row
            })
            .collect();
        // One rank routes nothing; another's experts receive nothing.
        let mut silent = random_counts(&mut rng, w, e);
        let (quiet, idle) = (rng.gen_range(0..w), rng.gen_range(0..w));
        silent[quiet].fill(0);
        for row in &mut silent {
            row[idle * shape.epr..(idle + 1) * shape.epr].fill(0);
        }
        let nothing = vec![vec![0; e]; w];
        let calls = vec![to_one, silent, nothing];
        let geo = shape.geometry(&calls, 0);
        run_ok(shape, geo, 4, calls, seed);
    }
}

#[test]
fn a_refused_call_moves_nothing_and_the_next_is_whole() {
    for seed in 0..8u64 {
        let mut rng = ChaCha8Rng::seed_from_u64(900 + seed);
        let w = 2 + (seed % 3) as usize;
        let shape = Shape::random(&mut rng, w);
        let e = shape.experts();
        let fits: Vec<_> = (0..3).map(|_| random_counts(&mut rng, w, e)).collect();
        let geo = shape.geometry(&fits, 0);
        // One rank more than its expert's owner can receive, and one more
        // than a sender's combine buffer holds.
        let mut over_recv = fits[0].clone();
        over_recv[0][0] += geo.recv_rows as u32 + 1;
        let mut over_send = vec![vec![0; e]; w];
        over_send[w - 1][0] = geo.send_rows as u32 + 1;
        let calls = vec![
            over_recv,
            fits[0].clone(),
            over_send,
            fits[1].clone(),
            fits[2].clone(),
        ];
        let world = World::new(shape, geo, 1, calls, seed);
        assert_eq!(world.refused, [true, false, true, false, false]);
        let (out, mut world) = run(world, T, None);
        for (r, o) in out.into_iter().enumerate() {
            let stats = o.unwrap_or_else(|e| panic!("seed {seed} rank {r}: {e}"));
            for s in [stats[0], stats[2]] {
                // Only the count rows moved: one to and one from each peer.
                assert_eq!((s.sent, s.landed, s.raised), (w - 1, w - 1, 0), "{s:?}");
            }
        }
        world.finish();
    }
}

#[test]
fn a_world_of_one_moves_nothing() {
    let shape = Shape {
        w: 1,
        epr: 3,
        hidden: 16,
        chunk_cols: 8,
        groups: 1,
    };
    let calls = vec![vec![vec![4, 0, 2]], vec![vec![0, 0, 0]]];
    let geo = shape.geometry(&calls, 0);
    let mut p = NcclProxy::new(0, geo, T).unwrap();
    let world = Arc::new(Mutex::new(World::new(shape, geo, 1, calls, 0)));
    let mut lanes = SimLanes {
        world,
        rank: 0,
        stop: Arc::new(AtomicBool::new(false)),
        fail_at: Some(0),
        posts: 0,
    };
    assert_eq!(p.call(&mut lanes, 1).unwrap(), NcclStats::default());
    assert!(matches!(
        NcclProxy::new(1, geo, T),
        Err(SchedError::Input { rank: 1, .. })
    ));
}

#[test]
fn a_kernel_that_never_raises_is_named_after_the_timeout() {
    let shape = Shape {
        w: 3,
        epr: 1,
        hidden: 8,
        chunk_cols: 8,
        groups: 1,
    };
    let calls = vec![vec![vec![1, 2, 0], vec![0, 1, 1], vec![2, 0, 0]]];
    let geo = shape.geometry(&calls, 0);
    let mut world = World::new(shape, geo, 1, calls, 3);
    world.mute = Some(1);
    let timeout = Duration::from_millis(300);
    let start = Instant::now();
    let (out, _) = run(world, timeout, None);
    let waited = start.elapsed();
    assert!(
        waited >= timeout && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    let msg = |r: usize| match &out[r] {
        Err(e @ SchedError::NcclTimeout { rank, epoch: 1, .. }) if *rank == r => e.to_string(),
        other => panic!("rank {r}: {other:?}"),
    };
    // The silent kernel's own proxy names its count row's ready word; the
    // others name the recv of that row.
    let m = msg(1);
    assert!(
        m.contains("ready word of count(1) 1 -> 0 (it is 0, the call is 1)"),
        "{m}"
    );
    for r in [0, 2] {
        let m = msg(r);
        assert!(
            m.contains(&format!("the recv of count(1) 1 -> {r} from rank 1")),
            "{m}"
        );
    }
}

#[test]
fn a_failing_lane_ends_the_call_at_once() {
    let shape = Shape {
        w: 3,
        epr: 2,
        hidden: 16,
        chunk_cols: 8,
        groups: 1,
    };
    let calls = vec![
        vec![
            vec![1, 2, 0, 1, 3, 0],
            vec![0, 1, 1, 2, 0, 0],
            vec![2, 0, 0, 1, 1, 1],
        ],
        vec![
            vec![0, 1, 0, 1, 0, 1],
            vec![1, 0, 1, 0, 1, 0],
            vec![2, 2, 0, 0, 1, 1],
        ],
    ];
    let geo = shape.geometry(&calls, 0);
    // Rank 2's seventh post fails: well into the first call's layer.
    let world = World::new(shape, geo, 1, calls, 5);
    let start = Instant::now();
    let (out, _) = run(world, T, Some((2, 6)));
    assert!(start.elapsed() < T / 4, "{:?}", start.elapsed());
    match &out[2] {
        Err(SchedError::Device { rank: 2, message }) => {
            assert!(message.contains("failed (simulated)"), "{message}")
        }
        other => panic!("rank 2: {other:?}"),
    }
    // The others were stopped by their owner (or finished before).
    for r in [0, 1] {
        if let Err(e) = &out[r] {
            assert!(e.to_string().contains("stopped with call"), "rank {r}: {e}");
        }
    }
}
