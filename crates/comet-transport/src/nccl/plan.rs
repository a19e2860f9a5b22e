//! Host logic of the `nccl` transport, free of CUDA: transfer steps, their
//! lowering to one rank's NCCL calls, and the wire form of staged puts.
//!
//! NCCL point-to-point needs both sides to post: a send on the source and a
//! matching recv on the destination, matched per (source, destination) pair
//! in posting order and equal in size. Neither side may guess. So every
//! rank derives the same [`Transfer`] list for a step — comet-sched from
//! the layout plan, which every rank computes identically from the routing
//! counts; the plain [`crate::Transport`] API by all-gathering what each
//! rank staged — and [`lower`] walks it in list order, so the k-th send
//! from `a` to `b` meets the k-th recv at `b` from `a`.

use crate::error::TransportError;
use crate::transport::{BufferId, SignalId, SignalOp};

/// Where a transfer's bytes come from on the sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The sender's copy of a symmetric buffer.
    Buffer(BufferId),
    /// The sender's host-put staging area.
    Staging,
    /// `src_offset` is an absolute device address on the sender
    /// (device-to-device puts of memory the transport did not allocate).
    RawDevice,
}

impl From<BufferId> for Source {
    fn from(b: BufferId) -> Self {
        Source::Buffer(b)
    }
}

// The wire form writes a source as a buffer id, the two others as ids no
// buffer has; a destination with one of them is refused when decoded.
const WIRE_STAGING: u32 = u32::MAX;
const WIRE_RAW_DEVICE: u32 = u32::MAX - 1;

impl Source {
    fn wire(self) -> u32 {
        match self {
            Source::Buffer(b) => b.0,
            Source::Staging => WIRE_STAGING,
            Source::RawDevice => WIRE_RAW_DEVICE,
        }
    }

    fn from_wire(id: u32) -> Self {
        match id {
            WIRE_STAGING => Source::Staging,
            WIRE_RAW_DEVICE => Source::RawDevice,
            b => Source::Buffer(BufferId(b)),
        }
    }
}

/// One chunk moving from `src`'s memory into `dst`'s copy of `dst_buf`,
/// optionally raising `dst`'s signal once it has landed. `len == 0` with a
/// signal is a bare signal, ordered after the step's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    pub src: usize,
    pub dst: usize,
    pub src_buf: Source,
    pub src_offset: usize,
    pub dst_buf: BufferId,
    pub dst_offset: usize,
    pub len: usize,
    pub signal: Option<(SignalId, SignalOp)>,
}

/// What one rank does for a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalOp {
    /// Before the NCCL group: a transfer to itself.
    Copy {
        src_buf: Source,
        src_offset: usize,
        dst_buf: BufferId,
        dst_offset: usize,
        len: usize,
    },
    /// Inside the group.
    Send {
        peer: usize,
        buf: Source,
        offset: usize,
        len: usize,
    },
    /// Inside the group.
    Recv {
        peer: usize,
        buf: BufferId,
        offset: usize,
        len: usize,
    },
    /// After the group, on the same stream: the receives have completed.
    Signal { sig: SignalId, op: SignalOp },
}

/// This rank's calls for `step`, in the order they must be issued: copies,
/// then the group of sends and receives, then the signals it receives.
pub fn lower(rank: usize, world: usize, step: &[Transfer]) -> Result<Vec<LocalOp>, TransportError> {
    let mut copies = Vec::new();
    let mut group = Vec::new();
    let mut signals = Vec::new();
    for t in step {
        if t.src >= world || t.dst >= world {
            return Err(TransportError::BadRank {
                rank,
                peer: t.src.max(t.dst),
                world,
            });
        }
        if t.len > 0 {
            match (t.src == rank, t.dst == rank) {
                (true, true) => copies.push(LocalOp::Copy {
                    src_buf: t.src_buf,
                    src_offset: t.src_offset,
                    dst_buf: t.dst_buf,
                    dst_offset: t.dst_offset,
                    len: t.len,
                }),
                (true, false) => group.push(LocalOp::Send {
                    peer: t.dst,
                    buf: t.src_buf,
                    offset: t.src_offset,
                    len: t.len,
                }),
                (false, true) => group.push(LocalOp::Recv {
                    peer: t.src,
                    buf: t.dst_buf,
                    offset: t.dst_offset,
                    len: t.len,
                }),
                (false, false) => {}
            }
        }
        if let (true, Some((sig, op))) = (t.dst == rank, t.signal) {
            signals.push(LocalOp::Signal { sig, op });
        }
    }
    copies.extend(group);
    copies.extend(signals);
    Ok(copies)
}

const REC: usize = 8 * 7 + 1 + 4 + 1 + 8;

fn op_code(op: Option<(SignalId, SignalOp)>) -> (u8, u32, u64) {
    match op {
        None => (0, 0, 0),
        Some((s, SignalOp::Set(v))) => (1, s, v),
        Some((s, SignalOp::Add(v))) => (2, s, v),
    }
}

/// Wire form of a rank's staged transfers (for the all-gather).
pub fn encode(ts: &[Transfer]) -> Vec<u8> {
    let mut v = Vec::with_capacity(ts.len() * REC);
    for t in ts {
        for x in [t.src, t.dst, t.src_offset, t.dst_offset, t.len] {
            v.extend_from_slice(&(x as u64).to_le_bytes());
        }
        v.extend_from_slice(&u64::from(t.src_buf.wire()).to_le_bytes());
        v.extend_from_slice(&u64::from(t.dst_buf.0).to_le_bytes());
        let (code, sig, val) = op_code(t.signal);
        v.push(code);
        v.extend_from_slice(&sig.to_le_bytes());
        v.push(0);
        v.extend_from_slice(&val.to_le_bytes());
    }
    v
}

/// Inverse of [`encode`]; `from` names the sender in errors.
pub fn decode(rank: usize, from: usize, b: &[u8]) -> Result<Vec<Transfer>, TransportError> {
    let bad = |detail: String| TransportError::Mismatch {
        rank,
        what: "nccl staged transfers",
        detail,
    };
    if !b.len().is_multiple_of(REC) {
        return Err(bad(format!(
            "rank {from} sent {} bytes, not a multiple of {REC}",
            b.len()
        )));
    }
    b.chunks_exact(REC)
        .map(|r| {
            let u = |i: usize| u64::from_le_bytes(r[8 * i..8 * i + 8].try_into().expect("8 bytes"));
            let id = |i: usize| {
                u32::try_from(u(i))
                    .map_err(|_| bad(format!("rank {from}: buffer id {} too large", u(i))))
            };
            let dst_buf = match Source::from_wire(id(6)?) {
                Source::Buffer(b) => b,
                other => {
                    return Err(bad(format!(
                        "rank {from}: a transfer targets {other:?}, which is only a source"
                    )))
                }
            };
            let sig = u32::from_le_bytes(r[57..61].try_into().expect("4 bytes"));
            let val = u64::from_le_bytes(r[62..70].try_into().expect("8 bytes"));
            let signal = match r[56] {
                0 => None,
                1 => Some((sig, SignalOp::Set(val))),
                2 => Some((sig, SignalOp::Add(val))),
                c => return Err(bad(format!("rank {from}: unknown signal op {c}"))),
            };
            Ok(Transfer {
                src: u(0) as usize,
                dst: u(1) as usize,
                src_offset: u(2) as usize,
                dst_offset: u(3) as usize,
                len: u(4) as usize,
                src_buf: Source::from_wire(id(5)?),
                dst_buf,
                signal,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use std::collections::HashMap;

    fn random_step(r: &mut ChaCha8Rng, world: usize, seg: usize) -> Vec<Transfer> {
        let mut step = Vec::new();
        for src in 0..world {
            for dst in 0..world {
                let mut off = 0;
                let at = |off: usize, len: usize, signal| Transfer {
                    src,
                    dst,
                    src_buf: BufferId(0).into(),
                    src_offset: dst * seg + off,
                    dst_buf: BufferId(1),
                    dst_offset: src * seg + off,
                    len,
                    signal,
                };
                while off < seg {
                    let len = r.gen_range(1..=(seg / 2).max(1)).min(seg - off);
                    let sig = if r.gen_bool(0.5) {
                        Some((src as u32, SignalOp::Add(1)))
                    } else {
                        None
                    };
                    step.push(at(off, len, sig));
                    off += len;
                }
                if r.gen_bool(0.3) {
                    // A bare signal: no bytes, still ordered after the data.
                    step.push(at(0, 0, Some((src as u32, SignalOp::Add(1)))));
                }
            }
        }
        step.shuffle(r);
        step
    }

    /// Plays every rank's lowered calls the way NCCL matches them (per
    /// pair, in posting order, sizes equal) on host arrays.
    fn simulate(
        world: usize,
        seg: usize,
        step: &[Transfer],
        src_mem: &[Vec<u8>],
    ) -> (Vec<Vec<u8>>, Vec<Vec<u64>>) {
        let ops: Vec<Vec<LocalOp>> = (0..world).map(|r| lower(r, world, step).unwrap()).collect();
        let mut dst_mem = vec![vec![0u8; world * seg]; world];
        let mut sigs = vec![vec![0u64; world]; world];
        let mut sends: HashMap<(usize, usize), Vec<(usize, usize)>> = HashMap::new();
        for (r, list) in ops.iter().enumerate() {
            let mut phase = 0;
            for op in list {
                let p = match op {
                    LocalOp::Copy { .. } => 0,
                    LocalOp::Send { .. } | LocalOp::Recv { .. } => 1,
                    LocalOp::Signal { .. } => 2,
                };
                assert!(p >= phase, "rank {r}: copies, then the group, then signals");
                phase = p;
                if let LocalOp::Send {
                    peer, offset, len, ..
                } = *op
                {
                    sends.entry((r, peer)).or_default().push((offset, len));
                }
            }
        }
        for (r, list) in ops.iter().enumerate() {
            let mut taken: HashMap<usize, usize> = HashMap::new();
            for op in list {
                match *op {
                    LocalOp::Copy {
                        src_offset,
                        dst_offset,
                        len,
                        ..
                    } => {
                        let data = src_mem[r][src_offset..src_offset + len].to_vec();
                        dst_mem[r][dst_offset..dst_offset + len].copy_from_slice(&data);
                    }
                    LocalOp::Recv {
                        peer, offset, len, ..
                    } => {
                        let k = taken.entry(peer).or_default();
                        let (soff, slen) = sends[&(peer, r)][*k];
                        *k += 1;
                        assert_eq!(
                            slen, len,
                            "recv at {r} from {peer} #{k} does not match the send's size"
                        );
                        let data = src_mem[peer][soff..soff + len].to_vec();
                        dst_mem[r][offset..offset + len].copy_from_slice(&data);
                    }
                    LocalOp::Signal {
                        sig,
                        op: SignalOp::Add(d),
                    } => sigs[r][sig as usize] += d,
                    LocalOp::Signal {
                        sig,
                        op: SignalOp::Set(v),
                    } => sigs[r][sig as usize] = v,
                    LocalOp::Send { .. } => {}
                }
            }
            for peer in 0..world {
                let posted = sends.get(&(peer, r)).map_or(0, Vec::len);
                assert_eq!(
                    taken.get(&peer).copied().unwrap_or(0),
                    posted,
                    "unmatched sends from {peer} to {r}"
                );
            }
        }
        (dst_mem, sigs)
    }

    #[test]
    fn lowered_steps_match_pairwise_and_move_every_byte() {
        for seed in 0..40u64 {
            let mut r = ChaCha8Rng::seed_from_u64(seed);
            let world = r.gen_range(1..=5);
            let seg = r.gen_range(1..300);
            let step = random_step(&mut r, world, seg);
            let src_mem: Vec<Vec<u8>> = (0..world)
                .map(|_| (0..world * seg).map(|_| r.gen()).collect())
                .collect();
            let (dst_mem, sigs) = simulate(world, seg, &step, &src_mem);
            for d in 0..world {
                for s in 0..world {
                    assert_eq!(
                        &dst_mem[d][s * seg..(s + 1) * seg],
                        &src_mem[s][d * seg..(d + 1) * seg],
                        "seed {seed}: segment {s}->{d}"
                    );
                    let want = step
                        .iter()
                        .filter(|t| t.src == s && t.dst == d && t.signal.is_some())
                        .count() as u64;
                    assert_eq!(sigs[d][s], want, "seed {seed}: signal count {s}->{d}");
                }
            }
        }
    }

    #[test]
    fn wire_form_round_trips_and_rejects_garbage() {
        let mut r = ChaCha8Rng::seed_from_u64(3);
        let mut step = random_step(&mut r, 3, 50);
        step.push(Transfer {
            src: 1,
            dst: 2,
            src_buf: Source::RawDevice,
            src_offset: 0x7f00_0000_1000,
            dst_buf: BufferId(4),
            dst_offset: 9,
            len: 0,
            signal: Some((7, SignalOp::Set(u64::MAX))),
        });
        let raw = encode(&step);
        assert_eq!(decode(0, 1, &raw).unwrap(), step);
        assert!(decode(0, 1, &raw[..raw.len() - 1])
            .unwrap_err()
            .to_string()
            .contains("rank 1"));
        let mut bad = raw.clone();
        bad[56] = 9;
        assert!(decode(0, 2, &bad).is_err());
    }

    #[test]
    fn bad_steps_are_errors() {
        let t = Transfer {
            src: 0,
            dst: 3,
            src_buf: BufferId(0).into(),
            src_offset: 0,
            dst_buf: BufferId(0),
            dst_offset: 0,
            len: 4,
            signal: None,
        };
        assert!(matches!(
            lower(0, 2, &[t]),
            Err(TransportError::BadRank { peer: 3, .. })
        ));
        // A staging area or raw address is only ever a source: a peer's
        // record that names one as a destination is refused.
        let t = Transfer { dst: 1, ..t };
        let mut raw = encode(&[t]);
        raw[48..56].copy_from_slice(&u64::from(WIRE_STAGING).to_le_bytes());
        assert!(matches!(
            decode(0, 1, &raw),
            Err(TransportError::Mismatch { detail, .. }) if detail.contains("Staging")
        ));
    }
}
