//! When one rank posts its NCCL calls over one layer call: the state
//! machine of its proxy, over [`crate::proxy_plan`]'s pieces.
//!
//! The driver starts the count exchange ([`PairScheduler::start_counts`]),
//! then the layer once the exchange is done here
//! ([`PairScheduler::start_layer`], with the delivered counts), and feeds
//! it two kinds of events in whatever order they happen: a ready word
//! reached the call's epoch ([`PairScheduler::ready`]), and an op it
//! posted completed ([`PairScheduler::completed`]). Each returns the
//! [`Action`]s to take now. The rules:
//! - sends of one ordered pair go out in the pair's list order (NCCL
//!   matches the k-th send with the k-th recv), each as soon as it and all
//!   earlier pieces of that pair are ready; pairs never wait for each other;
//! - recvs are posted at the start of a phase, per pair in the same order:
//!   the sizes are known by then, and a recv waiting in its own lane
//!   blocks nothing else;
//! - a piece is landed (copied into place, then its signal raised) only
//!   after its recv completed; a piece of zero bytes has no NCCL call and
//!   its receiver raises its signal at once;
//! - the layer starts only once the count exchange is complete on this
//!   rank, its sends and landings too (the counts are read from the own
//!   buffer); nothing else is ever held.

use super::{check_geometry, count_pieces};
use crate::error::SchedError;
use crate::proxy_plan::{Geometry, Piece};
use std::collections::{HashSet, VecDeque};

/// An operation a driver posts and later reports completed; the index is
/// the piece's position in the current phase's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `ncclSend` of `piece.region` of the mirror of `piece.to`'s buffer,
    /// packed first when it is 2-D, on the lane of the pair.
    Send(usize),
    /// `ncclRecv` of the piece's packed bytes from `piece.from`, into
    /// receive staging at `piece.wire`, on the lane of the pair.
    Recv(usize),
    /// Posted once the recv completed: copy the packed bytes from staging
    /// at `piece.wire` into `piece.region` of this rank's buffer, then
    /// raise this rank's signal `piece.signal` to the call's epoch.
    /// Complete once the raise is done. Not on the lane's stream: that one
    /// already holds the pair's later recvs, and a landing queued behind
    /// them would wait for pieces that may need this very signal.
    Land(usize),
}

/// What the driver does now, in the order given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Post `op` of `piece`; report it to [`PairScheduler::completed`].
    Post { op: Op, piece: Piece },
    /// A piece of zero bytes: raise this rank's signal `piece.signal` to
    /// `value`; nothing moves.
    Raise { piece: Piece, value: u64 },
}

/// Which phase of the call a scheduler is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Nothing started yet.
    Idle,
    Counts,
    Layer,
}

/// One rank's proxy over one call, phase by phase.
#[derive(Debug)]
pub struct PairScheduler {
    rank: usize,
    geo: Geometry,
    epoch: u64,
    /// Signals per rank, which is also ready words per peer.
    signals: usize,
    /// Ready words seen at the epoch, `[to * signals + signal]`; they stay
    /// up for the whole call, so words of the layer seen during the count
    /// exchange are kept.
    ready: Vec<bool>,
    phase: Phase,
    pieces: Vec<Piece>,
    /// Per receiver: this rank's sends not posted yet, in list order.
    sends: Vec<VecDeque<usize>>,
    in_flight: HashSet<Op>,
    /// Completions this phase still needs on this rank (a recv needs two:
    /// its own and its landing's).
    left: usize,
}

impl PairScheduler {
    /// A scheduler for `rank` of a layer laid out as `geo`, raising signals
    /// to `epoch`; no phase started yet.
    pub fn new(rank: usize, geo: Geometry, epoch: u64) -> Result<Self, SchedError> {
        let signals = check_geometry(&geo, rank)?;
        if rank >= geo.ranks {
            return Err(SchedError::Input {
                rank,
                message: format!("rank {rank} is not in a world of {}", geo.ranks),
            });
        }
        Ok(PairScheduler {
            rank,
            geo,
            epoch,
            signals,
            ready: vec![false; signals * geo.ranks],
            phase: Phase::Idle,
            pieces: Vec::new(),
            sends: vec![VecDeque::new(); geo.ranks],
            in_flight: HashSet::new(),
            left: 0,
        })
    }

    fn misuse(&self, message: String) -> SchedError {
        SchedError::NcclProtocol {
            rank: self.rank,
            message,
        }
    }

    /// The value every signal of the call is raised to.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// True once every op of the current phase completed, landings included
    /// (and before the first phase): every signal the phase owes this rank
    /// is raised by then.
    pub fn phase_done(&self) -> bool {
        self.left == 0
    }

    /// True once the layer phase is done: the call is over on this rank.
    pub fn done(&self) -> bool {
        self.phase == Phase::Layer && self.phase_done()
    }

    /// Starts the count exchange: every recv, and the sends whose ready
    /// word is up already.
    pub fn start_counts(&mut self) -> Result<Vec<Action>, SchedError> {
        if self.phase != Phase::Idle {
            return Err(self.misuse(format!(
                "the count exchange started again, in phase {:?}",
                self.phase
            )));
        }
        self.phase = Phase::Counts;
        Ok(self.start_phase(count_pieces(&self.geo, self.epoch)))
    }

    /// Starts the layer from the count matrix the exchange delivered
    /// (`counts[src][expert]`): refused until the exchange is done here,
    /// and for counts no buffer can hold (named, as the kernels refuse
    /// them on every rank alike).
    pub fn start_layer(&mut self, counts: &[Vec<u32>]) -> Result<Vec<Action>, SchedError> {
        if self.phase != Phase::Counts {
            return Err(self.misuse(format!(
                "the layer started in phase {:?}, not after the count exchange",
                self.phase
            )));
        }
        if !self.phase_done() {
            return Err(self.misuse(format!(
                "the layer started while {} op(s) of the count exchange are outstanding",
                self.left
            )));
        }
        let pieces = self.geo.data_pieces(self.rank, counts)?;
        self.phase = Phase::Layer;
        Ok(self.start_phase(pieces))
    }

    /// Ready word `signal` for peer `to` reached the epoch (repeats are
    /// harmless: the driver may see a word more than once).
    pub fn ready(&mut self, to: usize, signal: usize) -> Result<Vec<Action>, SchedError> {
        if to >= self.geo.ranks || signal >= self.signals {
            return Err(self.misuse(format!(
                "ready word {signal} for rank {to}: there are {} words for each of {} ranks",
                self.signals, self.geo.ranks
            )));
        }
        self.ready[to * self.signals + signal] = true;
        let mut out = Vec::new();
        self.pump(&mut out);
        Ok(out)
    }

    /// The posted `op` completed (a recv: its bytes are in staging; a
    /// landing: its signal is raised).
    pub fn completed(&mut self, op: Op) -> Result<Vec<Action>, SchedError> {
        if !self.in_flight.remove(&op) {
            return Err(self.misuse(format!("{op:?} completed but it is not in flight")));
        }
        self.left -= 1;
        Ok(match op {
            Op::Send(_) | Op::Land(_) => Vec::new(),
            Op::Recv(i) => {
                self.in_flight.insert(Op::Land(i));
                vec![Action::Post {
                    op: Op::Land(i),
                    piece: self.pieces[i],
                }]
            }
        })
    }

    /// The head of each pair whose ready word has not come up: what a
    /// timeout's message names.
    pub fn blocked(&self) -> Vec<Piece> {
        self.sends
            .iter()
            .filter_map(|q| q.front())
            .map(|&i| self.pieces[i])
            .filter(|p| !self.is_ready(p))
            .collect()
    }

    /// Ops posted and not completed yet.
    pub fn in_flight(&self) -> Vec<Op> {
        self.in_flight.iter().copied().collect()
    }

    /// The piece `op` moves in the current phase (what errors name).
    pub fn piece(&self, op: Op) -> Option<Piece> {
        let (Op::Send(i) | Op::Recv(i) | Op::Land(i)) = op;
        self.pieces.get(i).copied()
    }

    fn is_ready(&self, p: &Piece) -> bool {
        self.ready[p.to * self.signals + p.signal]
    }

    /// Takes the pieces of this rank out of the phase's list (the same on
    /// every rank): recvs and zero-byte raises now, sends queued per pair.
    fn start_phase(&mut self, pieces: Vec<Piece>) -> Vec<Action> {
        self.pieces = pieces;
        let mut out = Vec::new();
        let (mut sends, mut recvs) = (0, 0);
        for (i, p) in self.pieces.iter().enumerate() {
            let (from_me, to_me) = (p.from == self.rank, p.to == self.rank);
            if p.region.bytes() == 0 {
                // Nothing to move, and the size is known here: no NCCL
                // call on either side, the receiver raises at once.
                if to_me {
                    out.push(Action::Raise {
                        piece: *p,
                        value: self.epoch,
                    });
                }
            } else if from_me {
                self.sends[p.to].push_back(i);
                sends += 1;
            } else if to_me {
                self.in_flight.insert(Op::Recv(i));
                out.push(Action::Post {
                    op: Op::Recv(i),
                    piece: *p,
                });
                recvs += 1;
            }
        }
        self.left = sends + 2 * recvs;
        tracing::debug!(rank = self.rank, phase = ?self.phase, sends, recvs, "nccl proxy phase");
        self.pump(&mut out);
        out
    }

    /// Posts, pair by pair, every queued send up to the first whose ready
    /// word has not come up.
    fn pump(&mut self, out: &mut Vec<Action>) {
        for to in 0..self.sends.len() {
            while let Some(&i) = self.sends[to].front() {
                let p = self.pieces[i];
                if !self.is_ready(&p) {
                    break;
                }
                self.sends[to].pop_front();
                self.in_flight.insert(Op::Send(i));
                out.push(Action::Post {
                    op: Op::Send(i),
                    piece: p,
                });
                tracing::trace!(rank = self.rank, to, piece = i, kind = ?p.kind, "nccl proxy send");
            }
        }
    }
}
