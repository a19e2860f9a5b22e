//! Host-side grouped GEMM problems for tests and benchmarks (pure Rust):
//! seeded random bf16 data generated in parallel, per-expert row counts
//! (ragged, uniform or skewed), and an f64 reference over sampled rows.

use half::bf16;

use crate::variants::Epilogue;

/// Counter-based generator: value `i` of stream `seed` in [-1, 1).
fn uniform(seed: u64, i: u64) -> f32 {
    let mut z = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    ((z >> 40) as f32) / ((1u64 << 23) as f32) - 1.0
}

/// `len` bf16 values uniform in [-scale, scale), filled by all cores.
pub fn random_bf16(len: usize, scale: f32, seed: u64) -> Vec<bf16> {
    let mut v = vec![bf16::ZERO; len];
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let chunk = len.div_ceil(threads).max(1 << 16);
    std::thread::scope(|s| {
        for (ci, part) in v.chunks_mut(chunk).enumerate() {
            s.spawn(move || {
                let base = (ci * chunk) as u64;
                for (j, x) in part.iter_mut().enumerate() {
                    *x = bf16::from_f32(scale * uniform(seed, base + j as u64));
                }
            });
        }
    });
    v
}

/// Row counts of `experts` experts summing to `total`: uniform splits
/// evenly; skewed gives expert i a share proportional to 1/(i+1).
pub fn routed_counts(experts: usize, total: usize, skewed: bool) -> Vec<usize> {
    let w: Vec<f64> = (0..experts)
        .map(|i| if skewed { 1.0 / (i as f64 + 1.0) } else { 1.0 })
        .collect();
    let sum: f64 = w.iter().sum();
    let mut c: Vec<usize> = w
        .iter()
        .map(|x| (x / sum * total as f64).floor() as usize)
        .collect();
    let short = total - c.iter().sum::<usize>();
    for x in c.iter_mut().take(short) {
        *x += 1;
    }
    c
}

/// Ragged counts for correctness runs: empty experts, one row, one short
/// of a tile, one over, and a few hundred.
pub fn ragged_counts(experts: usize) -> Vec<usize> {
    const PATTERN: [usize; 8] = [0, 1, 127, 129, 300, 0, 64, 511];
    (0..experts).map(|e| PATTERN[e % PATTERN.len()]).collect()
}

/// One grouped GEMM: A [rows, k], B [experts, n, k] (K contiguous), the
/// epilogue, and the scatter map when the epilogue scatters.
pub struct GroupedProblem {
    pub counts: Vec<usize>,
    pub k: usize,
    pub n: usize,
    pub epilogue: Epilogue,
    pub a: Vec<bf16>,
    pub b: Vec<bf16>,
    /// Scatter: destination row per A row (-1 skips) and its weight.
    pub scatter_idx: Vec<i32>,
    pub scatter_w: Vec<f32>,
    /// Rows of the output buffer.
    pub out_rows: usize,
}

impl GroupedProblem {
    pub fn new(
        counts: Vec<usize>,
        k: usize,
        n: usize,
        epilogue: Epilogue,
        seed: u64,
    ) -> GroupedProblem {
        let rows: usize = counts.iter().sum();
        let a = random_bf16(rows * k, 1.0, seed);
        // 1/sqrt(k) keeps outputs near unit scale whatever K is.
        let b = random_bf16(
            counts.len() * n * k,
            1.0 / (k as f32).sqrt(),
            seed.wrapping_add(1),
        );
        let (mut scatter_idx, mut scatter_w, mut out_rows) = (Vec::new(), Vec::new(), rows);
        if epilogue == Epilogue::Scatter {
            // A permutation into a buffer twice as tall, every 7th row dropped.
            out_rows = 2 * rows.max(1);
            let mut perm: Vec<usize> = (0..out_rows).collect();
            for i in (1..out_rows).rev() {
                let j = ((uniform(seed ^ 0x5ca7, i as u64) + 1.0) * 0.5 * (i + 1) as f32) as usize;
                perm.swap(i, j.min(i));
            }
            scatter_idx = (0..rows)
                .map(|r| if r % 7 == 3 { -1 } else { perm[r] as i32 })
                .collect();
            scatter_w = (0..rows)
                .map(|r| 0.5 + 0.5 * uniform(seed ^ 0x3e1, r as u64).abs())
                .collect();
        }
        GroupedProblem {
            counts,
            k,
            n,
            epilogue,
            a,
            b,
            scatter_idx,
            scatter_w,
            out_rows,
        }
    }

    pub fn rows(&self) -> usize {
        self.counts.iter().sum()
    }

    pub fn experts(&self) -> usize {
        self.counts.len()
    }

    pub fn out_cols(&self) -> usize {
        self.epilogue.out_cols(self.n)
    }

    /// The expert of A row `r`.
    pub fn expert_of(&self, r: usize) -> usize {
        let mut start = 0;
        for (e, &c) in self.counts.iter().enumerate() {
            if r < start + c {
                return e;
            }
            start += c;
        }
        panic!("row {r} outside the problem's {} rows", start)
    }

    /// Rows worth checking: every expert's first and last rows, rows around
    /// tile boundaries (127, 128, 129), plus `extra` spread over the rest.
    pub fn sample_rows(&self, extra: usize) -> Vec<usize> {
        let mut rows = Vec::new();
        let mut start = 0;
        for &c in &self.counts {
            for off in [0, 1, 63, 64, 127, 128, 129, 255, 256] {
                if off < c {
                    rows.push(start + off);
                }
            }
            if c > 0 {
                rows.push(start + c - 1);
            }
            start += c;
        }
        let total = self.rows();
        for i in 0..extra.min(total) {
            rows.push((i * 7919 + 13) % total);
        }
        rows.sort_unstable();
        rows.dedup();
        rows
    }

    /// f64 reference of A row `r`'s output (before scatter weighting):
    /// `out_cols` values.
    pub fn reference_row(&self, r: usize) -> Vec<f64> {
        let e = self.expert_of(r);
        let (k, n) = (self.k, self.n);
        let a: Vec<f32> = self.a[r * k..(r + 1) * k]
            .iter()
            .map(|x| x.to_f32())
            .collect();
        let full: Vec<f64> = (0..n)
            .map(|j| {
                let b = &self.b[(e * n + j) * k..(e * n + j + 1) * k];
                a.iter().zip(b).map(|(&x, y)| (x * y.to_f32()) as f64).sum()
            })
            .collect();
        match self.epilogue {
            Epilogue::SwiGlu => {
                let f = n / 2;
                (0..f)
                    .map(|j| comet_core::reference::silu(full[j]) * full[f + j])
                    .collect()
            }
            Epilogue::Scatter => full.iter().map(|v| v * self.scatter_w[r] as f64).collect(),
            Epilogue::Store => full,
        }
    }

    /// Compares a device output (`out_rows x ldc`, poisoned with NaN before
    /// the run) against the reference on sampled rows, and checks that every
    /// element that should be written was, and (scatter) nothing else was.
    /// Tolerance: |d| <= 0.02 |ref| + 0.02 rms(ref) per element, and
    /// ||d|| / ||ref|| <= 1e-2 over the sample (bf16 output rounding alone
    /// gives about 2e-3).
    pub fn check(
        &self,
        out: &[bf16],
        ldc: usize,
        extra_samples: usize,
    ) -> Result<CheckReport, String> {
        let need = self.out_rows * ldc;
        if out.len() < need {
            return Err(format!(
                "output has {} elements, expected {need}",
                out.len()
            ));
        }
        self.check_coverage(out, ldc)?;
        let refs = self.reference_rows(&self.sample_rows(extra_samples));
        self.compare(out, ldc, &refs)
    }

    /// Every output row that some input row maps to holds no NaN; every
    /// other row (scatter) is still all NaN.
    fn check_coverage(&self, out: &[bf16], ldc: usize) -> Result<(), String> {
        let oc = self.out_cols();
        let mut written = vec![false; self.out_rows];
        if self.epilogue == Epilogue::Scatter {
            for &d in &self.scatter_idx {
                if d >= 0 {
                    written[d as usize] = true;
                }
            }
        } else {
            written.iter_mut().take(self.rows()).for_each(|w| *w = true);
        }
        for (row, &w) in written.iter().enumerate() {
            let vals = &out[row * ldc..row * ldc + oc];
            let nan = vals.iter().filter(|v| v.is_nan()).count();
            if w && nan > 0 {
                return Err(format!(
                    "row {row}: {nan} of {oc} outputs never written (still NaN)"
                ));
            }
            if !w && nan != oc {
                return Err(format!("row {row}: written though no input row maps to it"));
            }
        }
        Ok(())
    }

    /// The f64 reference of each row of `samples`, computed on every core.
    fn reference_rows(&self, samples: &[usize]) -> Vec<(usize, Vec<f64>)> {
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let chunk = samples.len().div_ceil(threads).max(1);
        std::thread::scope(|s| {
            let hs: Vec<_> = samples
                .chunks(chunk)
                .map(|part| {
                    s.spawn(move || {
                        part.iter()
                            .map(|&r| (r, self.reference_row(r)))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            hs.into_iter()
                .flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        })
    }

    /// The sampled rows of `out` against their references, element by
    /// element and as a whole (the tolerances of [`Self::check`]).
    fn compare(
        &self,
        out: &[bf16],
        ldc: usize,
        refs: &[(usize, Vec<f64>)],
    ) -> Result<CheckReport, String> {
        let (mut num, mut den, mut count) = (0f64, 0f64, 0usize);
        for (_, rf) in refs {
            den += rf.iter().map(|v| v * v).sum::<f64>();
            count += rf.len();
        }
        let rms = (den / count.max(1) as f64).sqrt();
        let mut worst = 0f64;
        for (r, rf) in refs {
            let orow = match self.epilogue {
                Epilogue::Scatter => match self.scatter_idx[*r] {
                    d if d < 0 => continue,
                    d => d as usize,
                },
                _ => *r,
            };
            for (j, &want) in rf.iter().enumerate() {
                let got = out[orow * ldc + j].to_f64();
                let d = (got - want).abs();
                num += d * d;
                let tol = 0.02 * want.abs() + 0.02 * rms;
                worst = worst.max(d / tol);
                if d.is_nan() || d > tol {
                    return Err(format!(
                        "row {r} (expert {}) col {j}: got {got}, want {want:.5} (tolerance {tol:.5})",
                        self.expert_of(*r)
                    ));
                }
            }
        }
        let rel = (num / den.max(f64::MIN_POSITIVE)).sqrt();
        if rel > 1e-2 {
            return Err(format!(
                "relative error {rel:.2e} over the sample exceeds 1e-2"
            ));
        }
        Ok(CheckReport {
            rows_checked: refs.len(),
            rel_error: rel,
            worst_ratio: worst,
        })
    }
}

#[derive(Debug, Clone, Copy)]
pub struct CheckReport {
    pub rows_checked: usize,
    /// ||out - ref|| / ||ref|| over the sampled rows.
    pub rel_error: f64,
    /// Largest |d| / tolerance seen (< 1 passes).
    pub worst_ratio: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_sum_and_skew() {
        let u = routed_counts(4, 16384, false);
        assert_eq!(u, vec![4096; 4]);
        let s = routed_counts(8, 1000, true);
        assert_eq!(s.iter().sum::<usize>(), 1000);
        assert!(s[0] > s[7]);
        assert_eq!(ragged_counts(3), vec![0, 1, 127]);
    }

    #[test]
    fn random_data_is_seeded_and_spread() {
        let a = random_bf16(1000, 1.0, 5);
        assert_eq!(a, random_bf16(1000, 1.0, 5));
        assert_ne!(a, random_bf16(1000, 1.0, 6));
        let mean: f32 = a.iter().map(|x| x.to_f32()).sum::<f32>() / 1000.0;
        assert!(mean.abs() < 0.1 && a.iter().all(|x| x.to_f32().abs() <= 1.0));
    }

    /// The checker must fail on wrong data: a CPU "kernel" with one wrong
    /// element, one unwritten element, and a stray scatter write.
    #[test]
    fn checker_catches_errors() {
        for epi in [Epilogue::Store, Epilogue::SwiGlu, Epilogue::Scatter] {
            let p = GroupedProblem::new(vec![3, 0, 2], 64, 128, epi, 1);
            let oc = p.out_cols();
            let mut out = vec![bf16::NAN; p.out_rows * oc];
            for r in 0..p.rows() {
                let orow = if epi == Epilogue::Scatter {
                    match p.scatter_idx[r] {
                        d if d < 0 => continue,
                        d => d as usize,
                    }
                } else {
                    r
                };
                for (j, v) in p.reference_row(r).into_iter().enumerate() {
                    out[orow * oc + j] = bf16::from_f64(v);
                }
            }
            let rep = p.check(&out, oc, 10).unwrap();
            assert!(rep.rel_error < 5e-3);
            let mut bad = out.clone();
            let first = if epi == Epilogue::Scatter {
                p.scatter_idx[0] as usize
            } else {
                0
            };
            bad[first * oc + 5] = bf16::from_f32(bad[first * oc + 5].to_f32() + 1.0);
            assert!(p.check(&bad, oc, 10).is_err());
            let mut hole = out.clone();
            hole[first * oc + 7] = bf16::NAN;
            assert!(p.check(&hole, oc, 10).is_err());
            if epi == Epilogue::Scatter {
                let stray = (0..p.out_rows)
                    .find(|r| !p.scatter_idx.contains(&(*r as i32)))
                    .unwrap();
                let mut s = out.clone();
                s[stray * oc] = bf16::ONE;
                assert!(p.check(&s, oc, 10).is_err());
            }
        }
    }
}
