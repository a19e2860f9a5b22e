//! What the NCCL proxy's CPU tests share: a layer's shape, the rows the
//! simulated kernels write (distinct per call and row), packing pieces to
//! and from the wire, and random count matrices with empty experts.
#![allow(dead_code)]

use comet_core::{Dtype, MoeConfig};
use comet_sched::proxy_plan::{Geometry, Region};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::ops::Range;

pub const POISON: u8 = 0xA5;

/// A layer's shape: ranks, experts per rank, hidden columns (bf16) and
/// columns per combine chunk.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub w: usize,
    pub epr: usize,
    pub hidden: usize,
    pub chunk_cols: usize,
    /// Expert groups of each rank's local experts (combine pieces per
    /// group and column chunk).
    pub groups: usize,
}

impl Shape {
    pub fn random(rng: &mut ChaCha8Rng, w: usize) -> Shape {
        let hidden = [8, 16, 24][rng.gen_range(0..3)];
        let epr = rng.gen_range(1..=3);
        Shape {
            w,
            epr,
            hidden,
            chunk_cols: [8, hidden][rng.gen_range(0..2)],
            groups: rng.gen_range(1..=epr),
        }
    }

    pub fn experts(&self) -> usize {
        self.w * self.epr
    }

    pub fn cfg(&self) -> MoeConfig {
        MoeConfig {
            hidden: self.hidden,
            ffn: 8,
            experts: self.experts(),
            top_k: 1,
            ranks: self.w,
            dtype: Dtype::Bf16,
        }
    }

    /// Buffers large enough for every call of `calls`, plus `slack` rows.
    pub fn geometry(&self, calls: &[Vec<Vec<u32>>], slack: usize) -> Geometry {
        let epr = self.epr;
        let (mut recv, mut send) = (0u32, 0u32);
        for c in calls {
            for d in 0..self.w {
                let got: u32 = c
                    .iter()
                    .map(|r| r[d * epr..(d + 1) * epr].iter().sum::<u32>())
                    .sum();
                recv = recv.max(got);
            }
            for r in c {
                send = send.max(r.iter().sum());
            }
        }
        Geometry {
            ranks: self.w,
            experts: self.experts(),
            row_bytes: 2 * self.hidden,
            chunks: self.hidden / self.chunk_cols,
            chunk_bytes: 2 * self.chunk_cols,
            groups: self.groups,
            recv_rows: recv as usize + slack,
            send_rows: send as usize + slack,
            top_k: 1,
        }
    }
}

/// Combine piece `j` of owner `from`: the global experts whose rows it
/// carries (expert group `j / chunks` of `from`'s) and its column chunk.
pub fn piece_experts(geo: &Geometry, from: usize, j: usize) -> (Range<usize>, usize) {
    let epr = geo.experts / geo.ranks;
    let (grp, chunk) = (j / geo.chunks, j % geo.chunks);
    let first = from * epr;
    (
        first + geo.group_lo(grp)..first + geo.group_lo(grp + 1),
        chunk,
    )
}

/// Row `i` of expert `e` sent by `src` in call `epoch`, or (`back`) what
/// the expert's owner returns for it: distinct per call and row.
pub fn row_bytes(len: usize, epoch: u64, src: usize, e: usize, i: usize, back: bool) -> Vec<u8> {
    let mut x = epoch
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((src as u64) << 40)
        .wrapping_add((e as u64) << 20)
        .wrapping_add(i as u64 * 2 + u64::from(back));
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Packs `r` of `buf` (device layout) into its wire form.
pub fn pack(r: Region, buf: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(r.bytes());
    for row in 0..r.rows {
        let at = r.offset + row * r.pitch;
        out.extend_from_slice(&buf[at..at + r.width]);
    }
    out
}

/// Copies the packed `bytes` into `r` of `buf`.
pub fn unpack(r: Region, bytes: &[u8], buf: &mut [u8]) {
    for row in 0..r.rows {
        let at = r.offset + row * r.pitch;
        buf[at..at + r.width].copy_from_slice(&bytes[row * r.width..(row + 1) * r.width]);
    }
}

pub fn random_counts(rng: &mut ChaCha8Rng, ranks: usize, experts: usize) -> Vec<Vec<u32>> {
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
