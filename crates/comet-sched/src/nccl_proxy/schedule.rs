//! When one rank posts its NCCL calls: the state machine of its proxy.
//!
//! The driver feeds it two kinds of events, in whatever order they happen:
//! a ready word reached the call's epoch ([`PairScheduler::ready`]), and an
//! op it posted has completed ([`PairScheduler::completed`]). Each returns
//! the [`Action`]s to take now. The rules:
//! - sends of one ordered pair go out in the pair's list order (NCCL
//!   matches the k-th send with the k-th recv), each as soon as it and all
//!   earlier pieces of that pair are ready; pairs never wait for each other;
//! - recvs are posted at the start of a phase, per pair in the same order:
//!   the sizes are known by then, and a recv waiting in its own lane
//!   blocks nothing else;
//! - a signal is raised only after its recv (or local copy) completed; a
//!   piece of zero bytes has no NCCL call and its receiver raises its
//!   signal at once, as the kernels wait for every segment's signal;
//! - a phase (the count exchange, then the layer) starts only once the
//!   previous one is complete on this rank; nothing else is ever held.

use super::{NcclPiece, NcclProxyError};
use std::collections::{HashSet, VecDeque};

/// An operation a driver posts and later reports completed; the index is
/// the piece's position in the current phase's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `ncclSend` of the piece's bytes to its receiver.
    Send(usize),
    /// `ncclRecv` of the piece's bytes from its sender.
    Recv(usize),
    /// A device-to-device copy: a piece whose sender is its receiver.
    Copy(usize),
}

/// What the driver does now, in the order given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Post(Op),
    /// Raise this rank's signal `signal` to `value` (the call's epoch): the
    /// piece's bytes have landed here.
    Raise {
        piece: usize,
        signal: u32,
        value: u64,
    },
}

/// One rank's proxy over one call, phase by phase.
#[derive(Debug)]
pub struct PairScheduler {
    rank: usize,
    world: usize,
    epoch: u64,
    /// Ready words seen at the epoch; they stay up for the whole call.
    ready: Vec<bool>,
    pieces: Vec<NcclPiece>,
    /// Per receiver: this rank's sends not posted yet, in list order.
    sends: Vec<VecDeque<usize>>,
    /// Pieces to itself whose ready word has not come up yet.
    local: Vec<usize>,
    in_flight: HashSet<Op>,
    /// Completions and raises this phase still needs on this rank.
    left: usize,
}

impl PairScheduler {
    /// A scheduler for `rank` of `world` ranks, `words` ready words, raising
    /// signals to `epoch`; no phase started yet.
    pub fn new(
        rank: usize,
        world: usize,
        words: usize,
        epoch: u64,
    ) -> Result<Self, NcclProxyError> {
        if rank >= world {
            return Err(NcclProxyError::Protocol {
                rank,
                message: format!("rank {rank} is not in a world of {world}"),
            });
        }
        Ok(PairScheduler {
            rank,
            world,
            epoch,
            ready: vec![false; words],
            pieces: Vec::new(),
            sends: vec![VecDeque::new(); world],
            local: Vec::new(),
            in_flight: HashSet::new(),
            left: 0,
        })
    }

    fn misuse(&self, message: String) -> NcclProxyError {
        NcclProxyError::Protocol {
            rank: self.rank,
            message,
        }
    }

    /// True once every op of the current phase completed and every signal
    /// it owes this rank was raised (or before the first phase).
    pub fn phase_done(&self) -> bool {
        self.left == 0
    }

    /// Starts a phase over `pieces` (the same list on every rank); refused
    /// while the previous phase is still running here. Returns the recvs,
    /// the raises of empty pieces, and whatever is ready already.
    pub fn start_phase(&mut self, pieces: Vec<NcclPiece>) -> Result<Vec<Action>, NcclProxyError> {
        if !self.phase_done() {
            return Err(self.misuse(format!(
                "a phase started while {} completion(s) of the previous one are outstanding",
                self.left
            )));
        }
        for (i, p) in pieces.iter().enumerate() {
            if p.sender >= self.world || p.receiver >= self.world {
                return Err(self.misuse(format!(
                    "piece {i} ({:?}) goes from rank {} to rank {} in a world of {}",
                    p.kind, p.sender, p.receiver, self.world
                )));
            }
            if p.sender == self.rank && p.ready >= self.ready.len() {
                return Err(self.misuse(format!(
                    "piece {i} ({:?}) waits for ready word {} of {}",
                    p.kind,
                    p.ready,
                    self.ready.len()
                )));
            }
        }
        self.pieces = pieces;
        let mut out = Vec::new();
        for (i, p) in self.pieces.iter().enumerate() {
            let (to_me, from_me) = (p.receiver == self.rank, p.sender == self.rank);
            match (p.len, from_me, to_me) {
                (0, _, true) => out.push(self.raise(i)),
                (0, _, false) | (_, false, false) => {}
                (_, true, true) => {
                    self.local.push(i);
                    self.left += 1;
                }
                (_, true, false) => {
                    self.sends[p.receiver].push_back(i);
                    self.left += 1;
                }
                (_, false, true) => {
                    self.in_flight.insert(Op::Recv(i));
                    out.push(Action::Post(Op::Recv(i)));
                    self.left += 1;
                }
            }
        }
        self.pump(&mut out);
        Ok(out)
    }

    /// Ready word `word` reached the epoch (repeats are harmless: the
    /// driver may see a word more than once).
    pub fn ready(&mut self, word: usize) -> Result<Vec<Action>, NcclProxyError> {
        let words = self.ready.len();
        let flag = self
            .ready
            .get_mut(word)
            .ok_or_else(|| NcclProxyError::Protocol {
                rank: self.rank,
                message: format!("ready word {word} of {words}"),
            })?;
        *flag = true;
        let mut out = Vec::new();
        self.pump(&mut out);
        Ok(out)
    }

    /// The posted `op` completed (for a recv or copy: its bytes landed).
    pub fn completed(&mut self, op: Op) -> Result<Vec<Action>, NcclProxyError> {
        if !self.in_flight.remove(&op) {
            return Err(self.misuse(format!("{op:?} completed but it is not in flight")));
        }
        self.left -= 1;
        Ok(match op {
            Op::Send(_) => Vec::new(),
            Op::Recv(i) | Op::Copy(i) => vec![self.raise(i)],
        })
    }

    /// The head of each pair (and each own piece) whose ready word has not
    /// come up: what a timeout's message names.
    pub fn blocked(&self) -> Vec<NcclPiece> {
        let heads = self.sends.iter().filter_map(|q| q.front());
        heads
            .chain(&self.local)
            .map(|&i| self.pieces[i])
            .filter(|p| !self.ready[p.ready])
            .collect()
    }

    /// Ops posted and not completed yet.
    pub fn in_flight(&self) -> Vec<Op> {
        self.in_flight.iter().copied().collect()
    }

    fn raise(&self, i: usize) -> Action {
        Action::Raise {
            piece: i,
            signal: self.pieces[i].signal,
            value: self.epoch,
        }
    }

    /// Posts every send whose pair is unblocked up to a piece not ready
    /// yet, and every ready local piece.
    fn pump(&mut self, out: &mut Vec<Action>) {
        for q in &mut self.sends {
            while let Some(&i) = q.front() {
                if !self.ready[self.pieces[i].ready] {
                    break;
                }
                q.pop_front();
                self.in_flight.insert(Op::Send(i));
                out.push(Action::Post(Op::Send(i)));
                tracing::trace!(rank = self.rank, piece = i, kind = ?self.pieces[i].kind, "nccl proxy send");
            }
        }
        let mut still = Vec::new();
        for i in std::mem::take(&mut self.local) {
            let p = self.pieces[i];
            if !self.ready[p.ready] {
                still.push(i);
            } else if p.from == p.to {
                // Already in place (a rank's own count row): nothing moves.
                self.left -= 1;
                out.push(self.raise(i));
            } else {
                self.in_flight.insert(Op::Copy(i));
                out.push(Action::Post(Op::Copy(i)));
            }
        }
        self.local = still;
    }
}
