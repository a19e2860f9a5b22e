//! The NCCL proxy's logic on CPU: W ranks' schedulers driven by a simulator
//! that plays NCCL's point-to-point rules (per ordered pair a lane, the
//! k-th send meets the k-th recv, sizes must be equal, bytes land only when
//! the recv completes) and the kernels' order (dispatch ready words after
//! the count exchange, combine ready words after every dispatch signal),
//! picking the next event at random with a seed. It checks that every
//! signal is raised exactly once, after its bytes, that the count exchange
//! completes before anything of the layer is posted, per-pair posting
//! order, and that the run completes (no deadlock).

use comet_core::{Dtype, MoeConfig};
use comet_sched::nccl_proxy::{
    decode_counts, Action, NcclCall, NcclPiece, NcclProxyError, Op, PairScheduler, PieceKind,
    Place, Region,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{HashMap, VecDeque};

const POISON: u8 = 0xA5;
const REGIONS: [Region; 5] = [
    Region::Counts,
    Region::SendRows,
    Region::RecvRows,
    Region::CombineSend,
    Region::CombineRecv,
];

fn config(ranks: usize, experts_per_rank: usize, hidden: usize) -> MoeConfig {
    MoeConfig {
        hidden,
        ffn: 8,
        experts: ranks * experts_per_rank,
        top_k: 1,
        ranks,
        dtype: Dtype::Bf16,
    }
}

/// A layer call's shape, with buffers just large enough for `counts`.
fn call_for(cfg: &MoeConfig, counts: &[Vec<usize>], chunk_cols: usize, epoch: u64) -> NcclCall {
    let epr = cfg.experts_per_rank();
    let recv = (0..cfg.ranks)
        .map(|d| {
            counts
                .iter()
                .map(|r| r[d * epr..(d + 1) * epr].iter().sum::<usize>())
                .sum()
        })
        .max()
        .unwrap_or(0);
    let send = counts.iter().map(|r| r.iter().sum()).max().unwrap_or(0);
    NcclCall::new(cfg, chunk_cols, recv, send, epoch).unwrap()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Counts,
    Layer,
}

enum Event {
    Ready {
        rank: usize,
        word: usize,
    },
    Complete {
        rank: usize,
        op: Op,
        land: Option<(Place, Vec<u8>)>,
    },
}

struct Rank {
    sched: PairScheduler,
    mem: HashMap<Region, Vec<u8>>,
    phase: Phase,
    pieces: Vec<NcclPiece>,
    combine_up: bool,
    raised: HashMap<u32, usize>,
}

/// Ops waiting at the head of the lane of an ordered pair.
#[derive(Default)]
struct Lane {
    sends: VecDeque<(Op, NcclPiece)>,
    recvs: VecDeque<(Op, NcclPiece)>,
}

struct Sim {
    call: NcclCall,
    counts: Vec<Vec<usize>>,
    layer: Vec<NcclPiece>,
    ranks: Vec<Rank>,
    lanes: HashMap<(usize, usize), Lane>,
    /// Per pair and kind of op, what was posted, as (phase, piece index).
    posted: HashMap<(usize, usize, bool), Vec<(Phase, usize)>>,
    events: Vec<Event>,
    rng: ChaCha8Rng,
}

impl Sim {
    fn new(call: NcclCall, counts: Vec<Vec<usize>>, seed: u64) -> Sim {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let w = call.ranks();
        let layer = call.layer_pieces(&counts).unwrap();
        let (block, _) = call.counts_block();
        let e = counts[0].len();
        let ranks = (0..w)
            .map(|r| {
                let mut mem = HashMap::new();
                for region in REGIONS {
                    let n = call.region_bytes(region);
                    let bytes = match region {
                        Region::SendRows | Region::CombineSend => {
                            (0..n).map(|_| rng.gen()).collect()
                        }
                        _ => vec![POISON; n],
                    };
                    mem.insert(region, bytes);
                }
                // The kernel stores its own count row before raising word 0.
                let row: Vec<u8> = counts[r]
                    .iter()
                    .flat_map(|&c| (c as u32).to_le_bytes())
                    .collect();
                let at = block.offset + r * e * 4;
                mem.get_mut(&Region::Counts).unwrap()[at..at + row.len()].copy_from_slice(&row);
                Rank {
                    sched: PairScheduler::new(r, w, call.ready_map().len(), call.epoch()).unwrap(),
                    mem,
                    phase: Phase::Counts,
                    pieces: Vec::new(),
                    combine_up: false,
                    raised: HashMap::new(),
                }
            })
            .collect();
        Sim {
            call,
            counts,
            layer,
            ranks,
            lanes: HashMap::new(),
            posted: HashMap::new(),
            events: Vec::new(),
            rng,
        }
    }

    fn bytes(&self, rank: usize, at: Place, len: usize) -> &[u8] {
        &self.ranks[rank].mem[&at.region][at.offset..at.offset + len]
    }

    /// Runs the call to its end; panics on any broken rule or a deadlock.
    fn run(mut self) {
        let w = self.call.ranks();
        for r in 0..w {
            let acts = self.ranks[r]
                .sched
                .start_phase(self.call.count_pieces())
                .unwrap();
            self.ranks[r].pieces = self.call.count_pieces();
            self.apply(r, acts);
            self.events.push(Event::Ready {
                rank: r,
                word: self.call.ready_map().count(),
            });
        }
        while !self.events.is_empty() {
            let i = self.rng.gen_range(0..self.events.len());
            let (rank, acts) = match self.events.swap_remove(i) {
                Event::Ready { rank, word } => (rank, self.ranks[rank].sched.ready(word).unwrap()),
                Event::Complete { rank, op, land } => {
                    if let Some((at, data)) = land {
                        let mem = self.ranks[rank].mem.get_mut(&at.region).unwrap();
                        mem[at.offset..at.offset + data.len()].copy_from_slice(&data);
                    }
                    (rank, self.ranks[rank].sched.completed(op).unwrap())
                }
            };
            self.apply(rank, acts);
        }
        self.check_end();
    }

    /// Takes `rank`'s actions, then moves it on when its kernels would.
    fn apply(&mut self, rank: usize, acts: Vec<Action>) {
        for act in acts {
            match act {
                Action::Post(op) => self.post(rank, op),
                Action::Raise {
                    piece,
                    signal,
                    value,
                } => {
                    let p = self.ranks[rank].pieces[piece];
                    assert_eq!((p.receiver, p.signal), (rank, signal), "{p:?}");
                    assert_eq!(value, self.call.epoch());
                    assert_eq!(
                        self.bytes(rank, p.to, p.len),
                        self.bytes(p.sender, p.from, p.len),
                        "rank {rank} raised signal {signal} of {:?} before its bytes landed",
                        p.kind
                    );
                    *self.ranks[rank].raised.entry(signal).or_default() += 1;
                }
            }
        }
        self.advance(rank);
    }

    fn post(&mut self, rank: usize, op: Op) {
        let r = &self.ranks[rank];
        let (phase, p) = match op {
            Op::Send(i) | Op::Recv(i) | Op::Copy(i) => (r.phase, r.pieces[i]),
        };
        if phase == Phase::Layer {
            let counted = (0..self.call.ranks())
                .filter(|&s| r.raised.contains_key(&(s as u32)))
                .count();
            assert_eq!(
                counted,
                self.call.ranks(),
                "rank {rank} posted {:?} before its count exchange completed",
                p.kind
            );
        }
        match op {
            Op::Copy(_) => {
                let data = self.bytes(rank, p.from, p.len).to_vec();
                self.events.push(Event::Complete {
                    rank,
                    op,
                    land: Some((p.to, data)),
                });
            }
            Op::Send(i) | Op::Recv(i) => {
                let send = matches!(op, Op::Send(_));
                let pair = (p.sender, p.receiver);
                self.posted
                    .entry((pair.0, pair.1, send))
                    .or_default()
                    .push((phase, i));
                let lane = self.lanes.entry(pair).or_default();
                if send {
                    lane.sends.push_back((op, p));
                } else {
                    lane.recvs.push_back((op, p));
                }
                self.match_lane(pair);
            }
        }
    }

    /// NCCL's rule: the heads of a lane meet, sizes equal; the bytes move
    /// now but land when the recv completes.
    fn match_lane(&mut self, (a, b): (usize, usize)) {
        loop {
            let lane = self.lanes.get_mut(&(a, b)).unwrap();
            if lane.sends.is_empty() || lane.recvs.is_empty() {
                return;
            }
            let (sop, s) = lane.sends.pop_front().unwrap();
            let (rop, r) = lane.recvs.pop_front().unwrap();
            assert_eq!(
                s.len, r.len,
                "lane {a}->{b}: send of {:?} ({} bytes) met recv of {:?} ({} bytes)",
                s.kind, s.len, r.kind, r.len
            );
            let data = self.bytes(a, s.from, s.len).to_vec();
            self.events.push(Event::Complete {
                rank: a,
                op: sop,
                land: None,
            });
            self.events.push(Event::Complete {
                rank: b,
                op: rop,
                land: Some((r.to, data)),
            });
        }
    }

    /// The kernels' side: after the count exchange, the layout is known
    /// (the layer phase starts and dispatch rows get staged); after every
    /// dispatch signal, FC1/FC2 run and combine chunks get packed.
    fn advance(&mut self, rank: usize) {
        let w = self.call.ranks();
        let ready = self.call.ready_map();
        let r = &self.ranks[rank];
        if r.phase == Phase::Counts && r.sched.phase_done() {
            let (block, len) = self.call.counts_block();
            let got = decode_counts(self.bytes(rank, block, len), w, ready.experts).unwrap();
            assert_eq!(got, self.counts, "rank {rank}: counts after the exchange");
            let pieces = self.call.layer_pieces(&got).unwrap();
            assert_eq!(pieces, self.layer, "rank {rank} derived another plan");
            let r = &mut self.ranks[rank];
            r.phase = Phase::Layer;
            r.pieces = pieces.clone();
            let acts = r.sched.start_phase(pieces).unwrap();
            for e in 0..ready.experts {
                self.events.push(Event::Ready {
                    rank,
                    word: ready.dispatch(e),
                });
            }
            self.apply(rank, acts);
            return;
        }
        let map = self.call.signal_map();
        let all_dispatch = (0..map.experts_per_rank).all(|le| {
            (0..w).all(|s| {
                r.raised
                    .contains_key(&map.wire(map.dispatch(le, s)).index())
            })
        });
        if r.phase == Phase::Layer && !r.combine_up && all_dispatch {
            self.ranks[rank].combine_up = true;
            for c in 0..ready.chunks {
                for to in 0..w {
                    self.events.push(Event::Ready {
                        rank,
                        word: ready.combine(c, to),
                    });
                }
            }
        }
    }

    fn check_end(&self) {
        for (r, rank) in self.ranks.iter().enumerate() {
            assert!(
                rank.phase == Phase::Layer && rank.sched.phase_done(),
                "deadlock: rank {r} stuck in {:?}; blocked {:?}, in flight {:?}",
                rank.phase,
                rank.sched.blocked(),
                rank.sched.in_flight()
            );
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
        // Every signal of the call exactly once, and nothing else.
        let mut want: Vec<HashMap<u32, usize>> = vec![HashMap::new(); self.ranks.len()];
        for p in self.call.count_pieces().iter().chain(&self.layer) {
            *want[p.receiver].entry(p.signal).or_default() += 1;
            assert_eq!(
                self.bytes(p.receiver, p.to, p.len),
                self.bytes(p.sender, p.from, p.len)
            );
        }
        for (r, rank) in self.ranks.iter().enumerate() {
            assert!(want[r].values().all(|&n| n == 1));
            assert_eq!(rank.raised, want[r], "rank {r}: signals raised");
        }
    }
}

fn random_counts(rng: &mut ChaCha8Rng, ranks: usize, experts: usize) -> Vec<Vec<usize>> {
    (0..ranks)
        .map(|_| {
            (0..experts)
                .map(|_| {
                    if rng.gen_bool(0.4) {
                        0
                    } else {
                        rng.gen_range(1..7)
                    }
                })
                .collect()
        })
        .collect()
}

/// A random shape for `ranks`: experts per rank, hidden and chunk width.
fn random_shape(rng: &mut ChaCha8Rng, ranks: usize) -> (MoeConfig, usize) {
    let hidden = [8, 16, 24][rng.gen_range(0..3)];
    let chunk_cols = [8, hidden][rng.gen_range(0..2)];
    (config(ranks, rng.gen_range(1..=3), hidden), chunk_cols)
}

#[test]
fn random_calls_match_in_order_and_raise_each_signal_once() {
    for seed in 0..300u64 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let w = rng.gen_range(2..=4);
        let (cfg, chunk_cols) = random_shape(&mut rng, w);
        let counts = random_counts(&mut rng, w, cfg.experts);
        let call = call_for(&cfg, &counts, chunk_cols, rng.gen_range(1..100));
        Sim::new(call, counts, seed).run();
    }
}

#[test]
fn all_rows_to_one_expert() {
    for seed in 0..20u64 {
        let mut rng = ChaCha8Rng::seed_from_u64(100 + seed);
        let w = rng.gen_range(2..=4);
        let (cfg, chunk_cols) = random_shape(&mut rng, w);
        let hot = rng.gen_range(0..cfg.experts);
        let counts: Vec<Vec<usize>> = (0..w)
            .map(|_| {
                let mut row = vec![0; cfg.experts];
                row[hot] = rng.gen_range(1..9);
                row
            })
            .collect();
        let call = call_for(&cfg, &counts, chunk_cols, 7);
        Sim::new(call, counts, seed).run();
    }
}

#[test]
fn a_silent_rank_and_an_idle_one() {
    for seed in 0..20u64 {
        let mut rng = ChaCha8Rng::seed_from_u64(200 + seed);
        let w = rng.gen_range(2..=4);
        let (cfg, chunk_cols) = random_shape(&mut rng, w);
        let epr = cfg.experts_per_rank();
        let mut counts = random_counts(&mut rng, w, cfg.experts);
        // One rank routes nothing; another's experts receive nothing.
        let (silent, idle) = (rng.gen_range(0..w), rng.gen_range(0..w));
        counts[silent].iter_mut().for_each(|c| *c = 0);
        for row in &mut counts {
            row[idle * epr..(idle + 1) * epr].fill(0);
        }
        let call = call_for(&cfg, &counts, chunk_cols, 2);
        Sim::new(call, counts, seed).run();
    }
}

#[test]
fn nothing_routed_and_a_world_of_one() {
    for w in 1..=4 {
        let cfg = config(w, 2, 16);
        let zero = vec![vec![0; cfg.experts]; w];
        Sim::new(call_for(&cfg, &zero, 8, 3), zero, w as u64).run();
    }
    let cfg = config(1, 3, 16);
    let counts = vec![vec![4, 0, 2]];
    Sim::new(call_for(&cfg, &counts, 8, 4), counts, 9).run();
}

/// Rank 0 of three with two segments to rank 1 and one to rank 2: a later
/// segment of a pair waits for the earlier one; other pairs do not wait.
#[test]
fn one_pair_keeps_its_order_while_others_go() {
    let cfg = config(3, 2, 8);
    let counts = vec![vec![1, 2, 3, 4, 5, 6], vec![0; 6], vec![0; 6]];
    let call = call_for(&cfg, &counts, 8, 1);
    let ready = call.ready_map();
    let mut s = PairScheduler::new(0, 3, ready.len(), 1).unwrap();
    let pieces = call.layer_pieces(&counts).unwrap();
    let sends = |acts: Vec<Action>| -> Vec<(usize, usize)> {
        acts.iter()
            .filter_map(|a| match a {
                Action::Post(Op::Send(i)) => match pieces[*i].kind {
                    PieceKind::Dispatch { expert, .. } => Some((pieces[*i].receiver, expert)),
                    _ => None,
                },
                _ => None,
            })
            .collect()
    };
    // Own segments (experts 0, 1) are local copies; no count phase needed
    // for this unit, the scheduler starts idle.
    s.start_phase(pieces.clone()).unwrap();
    assert!(sends(s.ready(ready.dispatch(3)).unwrap()).is_empty());
    assert_eq!(sends(s.ready(ready.dispatch(4)).unwrap()), vec![(2, 0)]);
    assert_eq!(
        sends(s.ready(ready.dispatch(2)).unwrap()),
        vec![(1, 0), (1, 1)]
    );
    assert_eq!(sends(s.ready(ready.dispatch(5)).unwrap()), vec![(2, 1)]);
}

#[test]
fn malformed_counts_and_shapes_are_named_errors() {
    let cfg = config(2, 2, 16);
    let call = NcclCall::new(&cfg, 8, 10, 10, 1).unwrap();
    let plan = |c: Vec<Vec<usize>>| match call.layer_pieces(&c) {
        Err(NcclProxyError::Plan(m)) => m,
        other => panic!("{other:?}"),
    };
    assert!(plan(vec![vec![0; 4]]).contains("1 rows for 2 ranks"));
    assert!(plan(vec![vec![0; 4], vec![0; 3]]).contains("rank 1 has 3 columns"));
    let huge = u32::MAX as usize + 1;
    assert!(plan(vec![vec![0, huge, 0, 0], vec![0; 4]]).contains("rank 0 for expert 1"));
    assert!(plan(vec![vec![0, 0, 6, 0], vec![0, 0, 0, 5]]).contains("rank 1 would receive 11 rows"));
    assert!(plan(vec![vec![0; 4], vec![5, 0, 6, 0]]).contains("rank 1 would send 11 rows"));
    let shape = |r: Result<NcclCall, NcclProxyError>| r.unwrap_err().to_string();
    assert!(shape(NcclCall::new(&cfg, 5, 1, 1, 1)).contains("chunk_cols 5"));
    assert!(shape(NcclCall::new(&cfg, 0, 1, 1, 1)).contains("chunk_cols 0"));
    assert!(shape(NcclCall::new(&cfg, 8, usize::MAX / 2, 1, 1)).contains("recv capacity"));
    let odd = MoeConfig {
        experts: 3,
        ..cfg.clone()
    };
    assert!(shape(NcclCall::new(&odd, 8, 1, 1, 1)).contains("experts"));
    let vast = MoeConfig {
        experts: usize::MAX / 2 - 1,
        ranks: 1,
        ..cfg.clone()
    };
    assert!(shape(NcclCall::new(&vast, 8, 1, 1, 1)).contains("count region"));
    assert!(decode_counts(&[0; 15], 2, 2)
        .unwrap_err()
        .to_string()
        .contains("15 bytes"));
    assert!(decode_counts(&[0; 4], usize::MAX, 2).is_err());
}

#[test]
fn driver_mistakes_are_errors_naming_the_rank() {
    let cfg = config(2, 1, 8);
    let call = NcclCall::new(&cfg, 8, 4, 4, 1).unwrap();
    let words = call.ready_map().len();
    assert!(PairScheduler::new(2, 2, words, 1).is_err());
    let mut s = PairScheduler::new(1, 2, words, 1).unwrap();
    let acts = s.start_phase(call.count_pieces()).unwrap();
    // Count pieces run src-major: rank 1 receives piece 1, sends piece 2
    // and holds its own row (piece 3) in place.
    assert_eq!(acts, vec![Action::Post(Op::Recv(1))]);
    let err = |r: Result<Vec<Action>, NcclProxyError>| match r {
        Err(NcclProxyError::Protocol { rank: 1, message }) => message,
        other => panic!("{other:?}"),
    };
    assert!(err(s.completed(Op::Send(0))).contains("not in flight"));
    assert!(err(s.ready(words)).contains(&format!("ready word {words}")));
    assert!(err(s.start_phase(Vec::new())).contains("outstanding"));
    // Rank 1's own row is in place once its word is up; rank 0's row lands.
    let acts = s.ready(0).unwrap();
    assert!(acts.contains(&Action::Post(Op::Send(2))));
    assert!(acts
        .iter()
        .any(|a| matches!(a, Action::Raise { piece: 3, .. })));
    assert!(!s.phase_done());
    s.completed(Op::Send(2)).unwrap();
    let acts = s.completed(Op::Recv(1)).unwrap();
    assert!(matches!(
        acts[..],
        [Action::Raise {
            piece: 1,
            signal: 0,
            value: 1
        }]
    ));
    assert!(s.phase_done());
    let mut bad = call.count_pieces();
    bad[0].receiver = 5;
    assert!(err(s.start_phase(bad)).contains("to rank 5"));
}
