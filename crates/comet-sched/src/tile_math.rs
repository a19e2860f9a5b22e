//! The f32 arithmetic of one GEMM tile on the CPU: FC1 with the SwiGLU
//! epilogue fused, and one column chunk of FC2. Loops run over contiguous
//! weight rows (axpy form) so the compiler vectorises them.

/// `act[r, :] = silu(x[r] . W1[:, :F]) * (x[r] . W1[:, F:])` for each row.
/// `x` is `[rows, hidden]`, `w1` is `[hidden, 2 * ffn]`, `act` is `[rows, ffn]`.
pub fn fc1_swiglu(x: &[f32], w1: &[f32], hidden: usize, ffn: usize, act: &mut [f32]) {
    let rows = x.len() / hidden;
    debug_assert_eq!(act.len(), rows * ffn);
    let mut acc = vec![0f32; 2 * ffn];
    for r in 0..rows {
        acc.iter_mut().for_each(|a| *a = 0.0);
        for (k, &xv) in x[r * hidden..(r + 1) * hidden].iter().enumerate() {
            let wrow = &w1[k * 2 * ffn..(k + 1) * 2 * ffn];
            for (a, &w) in acc.iter_mut().zip(wrow) {
                *a += xv * w;
            }
        }
        let (gate, up) = acc.split_at(ffn);
        for ((o, &g), &u) in act[r * ffn..(r + 1) * ffn].iter_mut().zip(gate).zip(up) {
            *o = g / (1.0 + (-g).exp()) * u;
        }
    }
}

/// `out[r, :] = act[r] . W2[:, col..col+cols]` for each row.
/// `act` is `[rows, ffn]`, `w2` is `[ffn, hidden]`, `out` is `[rows, cols]`.
pub fn fc2_cols(
    act: &[f32],
    w2: &[f32],
    ffn: usize,
    hidden: usize,
    col: usize,
    cols: usize,
    out: &mut [f32],
) {
    let rows = act.len() / ffn;
    debug_assert_eq!(out.len(), rows * cols);
    for r in 0..rows {
        let o = &mut out[r * cols..(r + 1) * cols];
        o.iter_mut().for_each(|v| *v = 0.0);
        for (f, &a) in act[r * ffn..(r + 1) * ffn].iter().enumerate() {
            let wrow = &w2[f * hidden + col..f * hidden + col + cols];
            for (v, &w) in o.iter_mut().zip(wrow) {
                *v += a * w;
            }
        }
    }
}

/// Reinterprets f32s as bytes for the transport (native endianness: all
/// ranks of a local world share one machine).
pub fn as_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_ne_bytes()).collect()
}

pub fn from_bytes(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use comet_core::reference::expert_row;
    use comet_core::weights::random_tokens;

    #[test]
    fn tile_math_matches_the_reference() {
        let (h, f, rows) = (24, 16, 5);
        let x = random_tokens(rows, h, 1);
        let w1 = random_tokens(h, 2 * f, 2);
        let w2 = random_tokens(f, h, 3);
        let mut act = vec![f32::NAN; rows * f];
        fc1_swiglu(&x, &w1, h, f, &mut act);
        let mut out = vec![f32::NAN; rows * 8];
        fc2_cols(&act, &w2, f, h, 8, 8, &mut out);
        for r in 0..rows {
            let want = expert_row(&x[r * h..(r + 1) * h], &w1, &w2, h, f);
            for c in 0..8 {
                let got = out[r * 8 + c] as f64;
                assert!(
                    (got - want[8 + c]).abs() < 1e-4 * (1.0 + want[8 + c].abs()),
                    "row {r} col {c}"
                );
            }
        }
    }

    #[test]
    fn byte_round_trip() {
        let v = vec![1.5f32, -0.0, f32::MAX];
        assert_eq!(from_bytes(&as_bytes(&v)), v);
    }
}
