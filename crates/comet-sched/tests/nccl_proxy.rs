//! The NCCL proxy's logic on CPU: W ranks' schedulers driven by a simulator
//! that plays NCCL's point-to-point rules (per ordered pair a lane, the
//! k-th send meets the k-th recv, sizes must be equal, bytes reach the
//! receiver's staging only when its recv completes) and the device
//! forward's kernels, which run on their own: each writes its count row
//! and rows into its mirrors of the peers' buffers where comet-core's
//! LayoutPlan puts them, raises ready words, and moves on when its signals
//! come up, picking the next event at random with a seed.
//!
//! The driver side of the simulator does what the module docs of
//! `nccl_proxy` say with `proxy_plan`'s pieces: a send packs `region` of
//! the mirror, a recv fills receive staging at `wire`, a landing copies it
//! into `region` of the own buffer (an event of its own, so other recvs
//! fill staging in between, as they would on the GPU). Whether the bytes are right is checked
//! apart from `proxy_plan`, at the places LayoutPlan gives, right when each
//! signal is raised and again by the kernels that wait for it, over calls
//! with changing routing on the same buffers. Also checked: every signal
//! raised once by the proxy, nothing of the layer before the count exchange
//! is done on that rank, per-pair posting order, and no deadlock.

mod nccl_sim;

use comet_core::layout::LayoutPlan;
use comet_core::MoeConfig;
use comet_sched::nccl_proxy::{check_geometry, read_counts, Action, Op, PairScheduler, Phase};
use comet_sched::proxy_plan::{Buf, Geometry, Kind, Piece};
use comet_sched::SchedError;
use nccl_sim::{pack, piece_experts, random_counts, row_bytes, unpack, Shape, POISON};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{HashMap, VecDeque};

/// How far a rank's kernels are in a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Count row stored and announced; waiting for every count signal.
    Counting,
    /// Rows stored into the mirrors; waiting for every dispatch signal.
    Dispatched,
    /// Answers stored; waiting for every combine signal.
    Combining,
    Done,
}

enum Event {
    /// The proxy of `rank` sees its ready word `signal` for `to`.
    Ready {
        rank: usize,
        to: usize,
        signal: usize,
    },
    /// An op of `rank` completes; a recv brings its bytes.
    Complete {
        rank: usize,
        op: Op,
        bytes: Option<Vec<u8>>,
    },
    /// A landing `rank` posted runs and completes: the copy from staging,
    /// then the raise. It runs apart from the recv (on the GPU, on a stream
    /// other than the lane's), so other recvs may fill staging in between.
    Landing { rank: usize, op: Op },
}

struct Rank {
    own: [Vec<u8>; 3],
    signals: Vec<u64>,
    /// The kernels' view of every peer's buffers: `mirrors[to][buf]`.
    mirrors: Vec<[Vec<u8>; 3]>,
    /// Receive staging images of each buffer, wire layout.
    staging: [Vec<u8>; 3],
    sched: PairScheduler,
    stage: Stage,
    /// The call's counts as this rank's kernels read them.
    counts: Vec<Vec<usize>>,
    /// Signals the proxy raised this call, and how often.
    raised: HashMap<usize, usize>,
    /// Ops posted and not completed, with the phase that posted them.
    open: HashMap<Op, (Phase, Piece)>,
}

/// Ops of one lane not matched yet.
#[derive(Default)]
struct Lane {
    sends: VecDeque<(Op, Piece, Vec<u8>)>,
    recvs: VecDeque<(Op, Piece)>,
}

struct Sim {
    shape: Shape,
    geo: Geometry,
    cfg: MoeConfig,
    ranks: Vec<Rank>,
    rng: ChaCha8Rng,
    // Per call:
    epoch: u64,
    truth: Vec<Vec<u32>>,
    plan: LayoutPlan,
    events: Vec<Event>,
    lanes: HashMap<(usize, usize), Lane>,
    /// Per (from, to, is send), what was posted as (phase, index).
    posted: HashMap<(usize, usize, bool), Vec<(Phase, usize)>>,
    /// Bytes added to the offset of every landing into the receive buffer:
    /// 0, except where a test checks that the simulator notices.
    land_shift: usize,
}

impl Sim {
    fn new(shape: Shape, geo: Geometry, seed: u64) -> Sim {
        let w = shape.w;
        check_geometry(&geo, 0).unwrap();
        let nsig = geo.signal_count();
        let bufs = || Buf::ALL.map(|b| vec![POISON; geo.bytes(b)]);
        let ranks = (0..w)
            .map(|r| Rank {
                own: bufs(),
                signals: vec![0; nsig],
                mirrors: (0..w).map(|_| bufs()).collect(),
                staging: bufs(),
                sched: PairScheduler::new(r, geo, 0).unwrap(),
                stage: Stage::Done,
                counts: Vec::new(),
                raised: HashMap::new(),
                open: HashMap::new(),
            })
            .collect();
        let cfg = shape.cfg();
        let zero = vec![vec![0; cfg.experts]; w];
        Sim {
            shape,
            geo,
            plan: LayoutPlan::new(&cfg, zero).unwrap(),
            cfg,
            ranks,
            rng: ChaCha8Rng::seed_from_u64(seed),
            epoch: 0,
            truth: Vec::new(),
            events: Vec::new(),
            lanes: HashMap::new(),
            posted: HashMap::new(),
            land_shift: 0,
        }
    }

    /// Runs calls `epoch0, epoch0 + 1, ...` with these count matrices on
    /// the same buffers; panics on any broken rule or a deadlock.
    fn run(mut self, epoch0: u64, calls: Vec<Vec<Vec<u32>>>) {
        for (n, counts) in calls.into_iter().enumerate() {
            self.call(epoch0 + n as u64, counts);
        }
    }

    fn call(&mut self, epoch: u64, counts: Vec<Vec<u32>>) {
        let w = self.shape.w;
        let as_usize = counts
            .iter()
            .map(|r| r.iter().map(|&c| c as usize).collect())
            .collect();
        self.plan = LayoutPlan::new(&self.cfg, as_usize).unwrap();
        self.truth = counts;
        self.epoch = epoch;
        self.lanes.clear();
        self.posted.clear();
        for r in 0..w {
            let rank = &mut self.ranks[r];
            rank.sched = PairScheduler::new(r, self.geo, epoch).unwrap();
            rank.raised.clear();
            self.kernel_counts(r);
            let acts = self.ranks[r].sched.start_counts().unwrap();
            self.apply(r, acts);
        }
        while !self.events.is_empty() {
            let i = self.rng.gen_range(0..self.events.len());
            let (rank, acts) = match self.events.swap_remove(i) {
                Event::Ready { rank, to, signal } => {
                    // A driver may see a word more than once.
                    if self.rng.gen_bool(0.05) {
                        self.events.push(Event::Ready { rank, to, signal });
                    }
                    (rank, self.ranks[rank].sched.ready(to, signal).unwrap())
                }
                Event::Complete { rank, op, bytes } => {
                    let (_, p) = self.ranks[rank].open.remove(&op).unwrap();
                    if let Some(b) = bytes {
                        let s = &mut self.ranks[rank].staging[p.region.buf.index()];
                        s[p.wire..p.wire + b.len()].copy_from_slice(&b);
                    }
                    (rank, self.ranks[rank].sched.completed(op).unwrap())
                }
                Event::Landing { rank, op } => {
                    let (_, p) = self.ranks[rank].open.remove(&op).unwrap();
                    self.land(rank, p);
                    (rank, self.ranks[rank].sched.completed(op).unwrap())
                }
            };
            self.apply(rank, acts);
        }
        self.check_end();
    }

    /// Takes `rank`'s actions, then moves its driver and kernels on.
    fn apply(&mut self, rank: usize, acts: Vec<Action>) {
        for act in acts {
            let phase = self.ranks[rank].sched.phase();
            if phase == Phase::Layer {
                let early: Vec<_> = self.ranks[rank]
                    .open
                    .values()
                    .filter(|(ph, _)| *ph == Phase::Counts)
                    .collect();
                assert!(
                    early.is_empty(),
                    "rank {rank} acts in the layer ({act:?}) with count ops open: {early:?}"
                );
            }
            match act {
                Action::Post { op, piece } => self.post(rank, phase, op, piece),
                Action::Raise { piece, value } => {
                    assert_eq!(piece.region.bytes(), 0, "{piece:?} raised without bytes");
                    self.raise(rank, piece, value);
                }
            }
        }
        self.advance(rank);
    }

    /// Copies `piece` from `rank`'s receive staging into its buffer, then
    /// raises its signal.
    fn land(&mut self, rank: usize, piece: Piece) {
        let r = &mut self.ranks[rank];
        let mut region = piece.region;
        let packed =
            r.staging[region.buf.index()][piece.wire..piece.wire + region.bytes()].to_vec();
        if region.buf == Buf::Recv {
            region.offset += self.land_shift;
        }
        unpack(region, &packed, &mut r.own[region.buf.index()]);
        self.raise(rank, piece, self.epoch);
    }

    fn post(&mut self, rank: usize, phase: Phase, op: Op, p: Piece) {
        assert!(
            p.region.bytes() > 0,
            "rank {rank} posted {op:?} of an empty {p:?}"
        );
        assert!(self.ranks[rank].open.insert(op, (phase, p)).is_none());
        if let Op::Land(_) = op {
            assert_eq!(p.to, rank, "{op:?} of {p:?}");
            self.events.push(Event::Landing { rank, op });
            return;
        }
        let send = matches!(op, Op::Send(_));
        assert_eq!(if send { p.from } else { p.to }, rank, "{op:?} of {p:?}");
        let i = match op {
            Op::Send(i) | Op::Recv(i) | Op::Land(i) => i,
        };
        self.posted
            .entry((p.from, p.to, send))
            .or_default()
            .push((phase, i));
        let lane = self.lanes.entry((p.from, p.to)).or_default();
        if send {
            // What the send carries is what the mirror holds when it is
            // posted: a send ahead of its ready word carries stale bytes.
            let mirror = &self.ranks[rank].mirrors[p.to][p.region.buf.index()];
            lane.sends.push_back((op, p, pack(p.region, mirror)));
        } else {
            lane.recvs.push_back((op, p));
        }
        self.match_lane((p.from, p.to));
    }

    /// NCCL's rule: the heads of a lane meet, sizes equal; the bytes reach
    /// the receiver when its recv completes.
    fn match_lane(&mut self, (a, b): (usize, usize)) {
        let lane = self.lanes.get_mut(&(a, b)).unwrap();
        while !lane.sends.is_empty() && !lane.recvs.is_empty() {
            let (sop, s, bytes) = lane.sends.pop_front().unwrap();
            let (rop, r) = lane.recvs.pop_front().unwrap();
            assert_eq!(
                s.region.bytes(),
                r.region.bytes(),
                "lane {a}->{b}: send of {s:?} met recv of {r:?}"
            );
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
    }

    /// The proxy raises `rank`'s signal of `p`: checks the bytes the
    /// kernels will read behind it, at LayoutPlan's places.
    fn raise(&mut self, rank: usize, p: Piece, value: u64) {
        assert_eq!(p.to, rank, "{p:?} raised on rank {rank}");
        assert_eq!(value, self.epoch);
        *self.ranks[rank].raised.entry(p.signal).or_default() += 1;
        let g = self.geo;
        let want_signal = match p.kind {
            Kind::Counts => g.count_signal(p.from),
            Kind::Dispatch { le } => g.dispatch_signal(le, p.from),
            Kind::Combine { chunk } => g.combine_signal(p.from, chunk),
        };
        assert_eq!(p.signal, want_signal, "{p:?}");
        if let Err(m) = self.check_signal(rank, p.kind, p.from) {
            panic!(
                "rank {rank} raised signal {} of {p:?} before its bytes: {m}",
                p.signal
            );
        }
        self.ranks[rank].signals[p.signal] = value;
    }

    /// The bytes behind one signal of `rank`, from `from`.
    fn check_signal(&self, rank: usize, kind: Kind, from: usize) -> Result<(), String> {
        let (w, e, rb) = (self.shape.w, self.shape.experts(), self.geo.row_bytes);
        let epr = self.shape.epr;
        let own = &self.ranks[rank].own;
        match kind {
            Kind::Counts => {
                let at = (((self.epoch & 1) as usize) * w + from) * e * 4;
                let want: Vec<u8> = self.truth[from]
                    .iter()
                    .flat_map(|c| c.to_le_bytes())
                    .collect();
                if own[Buf::Counts.index()][at..at + 4 * e] != want[..] {
                    return Err(format!("count row of {from} at byte {at}"));
                }
            }
            Kind::Dispatch { le } => {
                let ge = rank * epr + le;
                let seg = self.plan.recv[rank].segment(le, from, w);
                for i in 0..seg.rows {
                    let at = (seg.row + i) * rb;
                    if own[Buf::Recv.index()][at..at + rb]
                        != row_bytes(rb, self.epoch, from, ge, i, false)[..]
                    {
                        return Err(format!(
                            "row {i} of (expert {le}, src {from}) at row {}",
                            seg.row + i
                        ));
                    }
                }
            }
            Kind::Combine { chunk: j } => {
                let cb = self.geo.chunk_bytes;
                let (experts, chunk) = piece_experts(&self.geo, from, j);
                for ge in experts {
                    for i in 0..self.truth[rank][ge] as usize {
                        let at = (self.plan.send_offset(rank, ge) + i) * rb + chunk * cb;
                        let want = row_bytes(rb, self.epoch, rank, ge, i, true);
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

    /// The kernels store their count row in their own buffer and every
    /// mirror, raise their own count signal and the ready words.
    fn kernel_counts(&mut self, me: usize) {
        let (w, e, epoch) = (self.shape.w, self.shape.experts(), self.epoch);
        let at = (((epoch & 1) as usize) * w + me) * e * 4;
        let row: Vec<u8> = self.truth[me]
            .iter()
            .flat_map(|c| c.to_le_bytes())
            .collect();
        let r = &mut self.ranks[me];
        r.own[Buf::Counts.index()][at..at + row.len()].copy_from_slice(&row);
        r.signals[self.geo.count_signal(me)] = epoch;
        for to in (0..w).filter(|&t| t != me) {
            r.mirrors[to][Buf::Counts.index()][at..at + row.len()].copy_from_slice(&row);
            self.events.push(Event::Ready {
                rank: me,
                to,
                signal: self.geo.count_signal(me),
            });
        }
        r.stage = Stage::Counting;
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

    /// A kernel's raise of signal `signal` of `to`: its own signal when
    /// `to` is itself, else the ready word the proxy will see.
    fn kernel_raise(&mut self, me: usize, to: usize, signal: usize) {
        if to == me {
            self.ranks[me].signals[signal] = self.epoch;
        } else {
            self.events.push(Event::Ready {
                rank: me,
                to,
                signal,
            });
        }
    }

    fn all_up(&self, rank: usize, signals: impl IntoIterator<Item = usize>) -> bool {
        signals
            .into_iter()
            .all(|s| self.ranks[rank].signals[s] >= self.epoch)
    }

    /// Moves `me`'s driver (the layer once its count exchange is done) and
    /// kernels (each stage once its signals are up) as far as they go.
    fn advance(&mut self, me: usize) {
        let (w, epr, g, epoch) = (self.shape.w, self.shape.epr, self.geo, self.epoch);
        let rb = g.row_bytes;
        let r = &self.ranks[me];
        let stage = r.stage;
        if r.sched.phase() == Phase::Counts && r.sched.phase_done() {
            let counts = read_counts(&g, me, epoch, &r.own[Buf::Counts.index()]).unwrap();
            assert_eq!(counts, self.truth, "rank {me}: counts after the exchange");
            let acts = self.ranks[me].sched.start_layer(&counts).unwrap();
            self.apply(me, acts);
            return;
        }
        match stage {
            Stage::Counting if self.all_up(me, (0..w).map(|s| g.count_signal(s))) => {
                let counts: Vec<Vec<usize>> = (0..w)
                    .map(|s| {
                        self.check_signal(me, Kind::Counts, s).unwrap();
                        self.truth[s].iter().map(|&c| c as usize).collect()
                    })
                    .collect();
                self.ranks[me].counts = counts;
                // Dispatch: every row into its destination's receive rows.
                for ge in 0..w * epr {
                    let (dst, le) = (ge / epr, ge % epr);
                    let seg = *self.plan.recv[dst].segment(le, me, w);
                    for i in 0..seg.rows {
                        let b = row_bytes(rb, epoch, me, ge, i, false);
                        self.store(me, dst, Buf::Recv, (seg.row + i) * rb, &b);
                    }
                    self.kernel_raise(me, dst, g.dispatch_signal(le, me));
                }
                self.ranks[me].stage = Stage::Dispatched;
                self.advance(me);
            }
            Stage::Dispatched
                if self.all_up(
                    me,
                    (0..epr).flat_map(|le| (0..w).map(move |s| g.dispatch_signal(le, s))),
                ) =>
            {
                for le in 0..epr {
                    for s in 0..w {
                        if let Err(m) = self.check_signal(me, Kind::Dispatch { le }, s) {
                            panic!("rank {me} kernel after its dispatch signals: {m}");
                        }
                    }
                }
                // FC, then each answer piece (column chunk c of expert
                // group grp) into its source's combine rows.
                let cb = g.chunk_bytes;
                for j in 0..g.pieces() {
                    let (grp, c) = (j / g.chunks, j % g.chunks);
                    for s in 0..w {
                        for ge in me * epr + g.group_lo(grp)..me * epr + g.group_lo(grp + 1) {
                            for i in 0..self.ranks[me].counts[s][ge] {
                                let at = (self.plan.send_offset(s, ge) + i) * rb + c * cb;
                                let b = row_bytes(rb, epoch, s, ge, i, true);
                                self.store(me, s, Buf::Comb, at, &b[c * cb..(c + 1) * cb]);
                            }
                        }
                        if s != me {
                            self.kernel_raise(me, s, g.combine_signal(me, j));
                        }
                    }
                }
                self.ranks[me].stage = Stage::Combining;
                self.advance(me);
            }
            Stage::Combining
                if self.all_up(
                    me,
                    (0..w)
                        .filter(|&o| o != me)
                        .flat_map(|o| (0..g.pieces()).map(move |c| g.combine_signal(o, c))),
                ) =>
            {
                for o in 0..w {
                    for c in 0..g.pieces() {
                        if let Err(m) = self.check_signal(me, Kind::Combine { chunk: c }, o) {
                            panic!("rank {me} reduce: {m}");
                        }
                    }
                }
                self.ranks[me].stage = Stage::Done;
            }
            _ => {}
        }
    }

    fn check_end(&self) {
        for (r, rank) in self.ranks.iter().enumerate() {
            assert!(
                rank.sched.done() && rank.stage == Stage::Done,
                "deadlock in call {}: rank {r}'s proxy in {:?}, kernels in {:?}; blocked {:?}, in flight {:?}",
                self.epoch,
                rank.sched.phase(),
                rank.stage,
                rank.sched.blocked(),
                rank.sched.in_flight()
            );
            assert!(rank.open.is_empty());
        }
        for ((a, b), lane) in &self.lanes {
            assert!(
                lane.sends.is_empty() && lane.recvs.is_empty(),
                "lane {a}->{b} left unmatched ops"
            );
        }
        for ((a, b, send), list) in &self.posted {
            assert!(
                list.windows(2).all(|p| p[0] < p[1]),
                "lane {a}->{b}: {} posted out of order: {list:?}",
                if *send { "sends" } else { "recvs" }
            );
        }
        // The proxy raises every signal of the call a peer owes, exactly
        // once, and nothing else.
        let (w, g) = (self.shape.w, self.geo);
        for (r, rank) in self.ranks.iter().enumerate() {
            let mut want = HashMap::new();
            for from in (0..w).filter(|&f| f != r) {
                want.insert(g.count_signal(from), 1);
                for le in 0..self.shape.epr {
                    want.insert(g.dispatch_signal(le, from), 1);
                }
                for c in 0..g.pieces() {
                    want.insert(g.combine_signal(from, c), 1);
                }
            }
            assert_eq!(rank.raised, want, "rank {r}: signals the proxy raised");
        }
    }
}

/// Runs `calls` on one set of buffers (capacities fit the largest call,
/// with random slack).
fn run(rng: &mut ChaCha8Rng, shape: Shape, epoch0: u64, calls: Vec<Vec<Vec<u32>>>, seed: u64) {
    let geo = shape.geometry(&calls, rng.gen_range(0..3));
    Sim::new(shape, geo, seed).run(epoch0, calls);
}

#[test]
fn random_calls_land_in_place_and_raise_each_signal_once() {
    for seed in 0..300u64 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let w = rng.gen_range(2..=4);
        let shape = Shape::random(&mut rng, w);
        let calls = (0..rng.gen_range(1..=3))
            .map(|_| random_counts(&mut rng, w, shape.experts()))
            .collect();
        let epoch0 = rng.gen_range(1..100);
        run(&mut rng, shape, epoch0, calls, seed);
    }
}

#[test]
fn all_rows_to_one_expert() {
    for seed in 0..20u64 {
        let mut rng = ChaCha8Rng::seed_from_u64(100 + seed);
        let w = rng.gen_range(2..=4);
        let shape = Shape::random(&mut rng, w);
        let hot = rng.gen_range(0..shape.experts());
        let counts: Vec<Vec<u32>> = (0..w)
            .map(|_| {
                let mut row = vec![0; shape.experts()];
                row[hot] = rng.gen_range(1..9);
                row
            })
            .collect();
        run(&mut rng, shape, 7, vec![counts], seed);
    }
}

#[test]
fn a_silent_rank_and_an_idle_one() {
    for seed in 0..20u64 {
        let mut rng = ChaCha8Rng::seed_from_u64(200 + seed);
        let w = rng.gen_range(2..=4);
        let shape = Shape::random(&mut rng, w);
        let epr = shape.epr;
        let mut counts = random_counts(&mut rng, w, shape.experts());
        // One rank routes nothing; another's experts receive nothing.
        let (silent, idle) = (rng.gen_range(0..w), rng.gen_range(0..w));
        counts[silent].iter_mut().for_each(|c| *c = 0);
        for row in &mut counts {
            row[idle * epr..(idle + 1) * epr].fill(0);
        }
        run(&mut rng, shape, 2, vec![counts], seed);
    }
}

#[test]
fn nothing_routed_and_a_world_of_one() {
    let mut rng = ChaCha8Rng::seed_from_u64(300);
    for w in 1..=4 {
        let shape = Shape {
            w,
            epr: 2,
            hidden: 16,
            chunk_cols: 8,
            groups: 1,
        };
        let zero = vec![vec![0; shape.experts()]; w];
        run(&mut rng, shape, 3, vec![zero.clone(), zero], w as u64);
    }
    let shape = Shape {
        w: 1,
        epr: 3,
        hidden: 16,
        chunk_cols: 8,
        groups: 1,
    };
    run(&mut rng, shape, 4, vec![vec![vec![4, 0, 2]]], 9);
}

/// Completes every op in flight, and the landings that follow.
fn finish(s: &mut PairScheduler) {
    while let Some(&op) = s.in_flight().first() {
        s.completed(op).unwrap();
    }
}

fn sends(acts: &[Action]) -> Vec<(usize, Kind)> {
    acts.iter()
        .filter_map(|a| match a {
            Action::Post {
                op: Op::Send(_),
                piece,
            } => Some((piece.to, piece.kind)),
            _ => None,
        })
        .collect()
}

/// Rank 0 of three with two segments to rank 1 and one to rank 2: a later
/// segment of a pair waits for the earlier one; other pairs do not wait.
#[test]
fn one_pair_keeps_its_order_while_others_go() {
    let shape = Shape {
        w: 3,
        epr: 2,
        hidden: 8,
        chunk_cols: 8,
        groups: 1,
    };
    let counts = vec![vec![1, 2, 3, 4, 0, 6], vec![0; 6], vec![0; 6]];
    let g = shape.geometry(std::slice::from_ref(&counts), 0);
    let mut s = PairScheduler::new(0, g, 1).unwrap();
    let acts = s.start_counts().unwrap();
    // Rank 0 receives both peers' rows and sends its own once it is ready.
    assert_eq!(acts.len(), 2);
    assert_eq!(
        sends(&s.ready(1, g.count_signal(0)).unwrap()),
        vec![(1, Kind::Counts)]
    );
    // A dispatch word seen during the count exchange is kept for the layer.
    assert!(s.ready(2, g.dispatch_signal(1, 0)).unwrap().is_empty());
    assert!(s.start_layer(&counts).is_err());
    s.completed(Op::Send(0)).unwrap();
    assert_eq!(
        sends(&s.ready(2, g.count_signal(0)).unwrap()),
        vec![(2, Kind::Counts)]
    );
    finish(&mut s);
    let acts = s.start_layer(&counts).unwrap();
    // Expert (rank 2, 0) receives nothing from rank 0: no send, and the
    // next segment of the pair goes at once.
    assert_eq!(sends(&acts), vec![(2, Kind::Dispatch { le: 1 })]);
    assert!(sends(&s.ready(1, g.dispatch_signal(1, 0)).unwrap()).is_empty());
    assert_eq!(
        sends(&s.ready(1, g.dispatch_signal(0, 0)).unwrap()),
        vec![(1, Kind::Dispatch { le: 0 }), (1, Kind::Dispatch { le: 1 })]
    );
    // Rank 0's experts receive nothing: its combine pieces are empty and
    // nothing of them is raised or posted; it only receives answers.
    assert_eq!(s.blocked(), vec![]);
    let recvs = acts
        .iter()
        .filter(|a| {
            matches!(
                a,
                Action::Post {
                    op: Op::Recv(_),
                    ..
                }
            )
        })
        .count();
    assert_eq!(recvs, 2 * g.chunks);
}

#[test]
fn malformed_counts_and_shapes_are_named_errors() {
    let shape = Shape {
        w: 2,
        epr: 2,
        hidden: 16,
        chunk_cols: 8,
        groups: 1,
    };
    let g = Geometry {
        recv_rows: 10,
        send_rows: 10,
        ..shape.geometry(&[], 0)
    };
    let layer = |c: Vec<Vec<u32>>| {
        let mut s = PairScheduler::new(1, g, 1).unwrap();
        s.start_counts().unwrap();
        s.ready(0, g.count_signal(1)).unwrap();
        finish(&mut s);
        match s.start_layer(&c) {
            Err(SchedError::Input { rank: 1, message }) => message,
            other => panic!("{other:?}"),
        }
    };
    assert!(layer(vec![vec![0; 4]]).contains("2 x 4"));
    assert!(layer(vec![vec![0; 4], vec![0; 3]]).contains("2 x 4"));
    assert!(layer(vec![vec![0, 0, 6, 0], vec![0, 0, 0, 5]]).contains("rank 1 receives 11 rows"));
    assert!(layer(vec![vec![0; 4], vec![5, 0, 6, 0]]).contains("rank 1 sends 11 rows"));
    assert!(layer(vec![vec![0, u32::MAX, 0, 0], vec![0; 4]]).contains("rank 0 sends"));
    let shape_err = |geo: Geometry| match PairScheduler::new(0, geo, 1) {
        Err(SchedError::Input { rank: 0, message }) => message,
        other => panic!("{other:?}"),
    };
    assert!(shape_err(Geometry { chunks: 0, ..g }).contains("0 chunks"));
    assert!(shape_err(Geometry {
        chunk_bytes: 10,
        groups: 1,
        ..g
    })
    .contains("row of 32 bytes"));
    assert!(shape_err(Geometry { experts: 3, ..g }).contains("3 experts over 2 ranks"));
    assert!(shape_err(Geometry { ranks: 0, ..g }).contains("over 0 ranks"));
    assert!(shape_err(Geometry {
        recv_rows: usize::MAX / 2,
        ..g
    })
    .contains("receive capacity"));
    assert!(shape_err(Geometry {
        ranks: 1,
        experts: usize::MAX / 2,
        ..g
    })
    .contains("counts buffer"));
    let image = vec![0u8; g.bytes(Buf::Counts) - 1];
    let err = read_counts(&g, 0, 1, &image).unwrap_err().to_string();
    assert!(err.contains("counts buffer of 63 bytes"), "{err}");
}

#[test]
fn driver_mistakes_are_errors_naming_the_rank() {
    let shape = Shape {
        w: 2,
        epr: 1,
        hidden: 8,
        chunk_cols: 8,
        groups: 1,
    };
    let g = shape.geometry(&[vec![vec![1, 1], vec![1, 1]]], 0);
    assert!(matches!(
        PairScheduler::new(2, g, 1),
        Err(SchedError::Input { rank: 2, .. })
    ));
    let mut s = PairScheduler::new(1, g, 1).unwrap();
    let err = |r: Result<Vec<Action>, SchedError>| match r {
        Err(SchedError::NcclProtocol { rank: 1, message }) => message,
        other => panic!("{other:?}"),
    };
    assert!(err(s.start_layer(&[vec![0, 0], vec![0, 0]])).contains("phase Idle"));
    let acts = s.start_counts().unwrap();
    let recv = g.counts_piece(0, 1, 1);
    assert_eq!(
        acts,
        vec![Action::Post {
            op: Op::Recv(0),
            piece: recv
        }]
    );
    assert!(err(s.start_counts()).contains("started again"));
    assert!(err(s.completed(Op::Send(1))).contains("not in flight"));
    assert!(err(s.ready(2, 0)).contains("for rank 2"));
    let words = check_geometry(&g, 1).unwrap();
    assert!(err(s.ready(0, words)).contains(&format!("ready word {words}")));
    assert!(err(s.start_layer(&[vec![1, 1], vec![1, 1]])).contains("3 op(s)"));
    let acts = s.ready(0, g.count_signal(1)).unwrap();
    assert_eq!(
        acts,
        vec![Action::Post {
            op: Op::Send(1),
            piece: g.counts_piece(1, 0, 1)
        }]
    );
    assert!(s.completed(Op::Send(1)).unwrap().is_empty());
    assert_eq!(
        s.completed(Op::Recv(0)).unwrap(),
        vec![Action::Post {
            op: Op::Land(0),
            piece: recv
        }]
    );
    assert!(err(s.completed(Op::Recv(0))).contains("not in flight"));
    // The counts are read from the own buffer: not before they landed.
    assert!(err(s.start_layer(&[vec![1, 1], vec![1, 1]])).contains("1 op(s)"));
    assert!(s.completed(Op::Land(0)).unwrap().is_empty());
    assert!(s.phase_done() && !s.done());
    s.start_layer(&[vec![1, 1], vec![1, 1]]).unwrap();
    assert!(err(s.start_layer(&[vec![1, 1], vec![1, 1]])).contains("phase Layer"));
}

/// The simulator itself notices a landing at a wrong offset (here every
/// dispatch segment one row further on), so a wrong region in the plan or
/// the driver cannot pass unseen.
#[test]
#[should_panic(expected = "before its bytes")]
fn the_simulator_catches_a_landing_one_row_off() {
    let shape = Shape {
        w: 2,
        epr: 1,
        hidden: 8,
        chunk_cols: 8,
        groups: 1,
    };
    let counts = vec![vec![2, 3], vec![1, 2]];
    let geo = shape.geometry(std::slice::from_ref(&counts), 2);
    let mut sim = Sim::new(shape, geo, 1);
    sim.land_shift = geo.row_bytes;
    sim.run(1, vec![counts]);
}
