//! The higher-precision reference of the whole layer, on the CPU:
//! `y[t] = sum_j w[t,j] * FC2_e(SwiGLU(FC1_e(x[t])))` with f64 accumulation.
//! Deliberately the plainest loop possible: it is what every executor and
//! kernel is checked against.

use crate::config::MoeConfig;
use crate::error::CoreError;
use crate::routing::Routing;
use crate::weights::ExpertWeights;

pub fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

/// One expert applied to one row, in f64.
pub fn expert_row(x: &[f32], fc1: &[f32], fc2: &[f32], hidden: usize, ffn: usize) -> Vec<f64> {
    let mut act = vec![0f64; ffn];
    for (n, a) in act.iter_mut().enumerate() {
        let (mut g, mut u) = (0f64, 0f64);
        for (k, &xv) in x.iter().enumerate() {
            g += xv as f64 * fc1[k * 2 * ffn + n] as f64;
            u += xv as f64 * fc1[k * 2 * ffn + ffn + n] as f64;
        }
        *a = silu(g) * u;
    }
    let mut out = vec![0f64; hidden];
    for (f, &a) in act.iter().enumerate() {
        let row = &fc2[f * hidden..(f + 1) * hidden];
        for (o, &w) in out.iter_mut().zip(row) {
            *o += a * w as f64;
        }
    }
    out
}

/// The layer's output for one rank's tokens `x [tokens, hidden]`.
/// `weights` must hold every expert (see [`ExpertWeights::all`]).
pub fn moe_layer(
    cfg: &MoeConfig,
    x: &[f32],
    routing: &Routing,
    weights: &ExpertWeights,
) -> Result<Vec<f64>, CoreError> {
    routing.validate(cfg)?;
    let h = cfg.hidden;
    if x.len() != routing.tokens * h {
        return Err(CoreError::Shape {
            name: "x",
            expected: routing.tokens * h,
            got: x.len(),
        });
    }
    if weights.experts.len() != cfg.experts {
        return Err(CoreError::Shape {
            name: "reference weights",
            expected: cfg.experts,
            got: weights.experts.len(),
        });
    }
    let mut y = vec![0f64; routing.tokens * h];
    for t in 0..routing.tokens {
        let xr = &x[t * h..(t + 1) * h];
        for j in 0..routing.top_k {
            let e = routing.ids[t * routing.top_k + j] as usize;
            let w = routing.weights[t * routing.top_k + j] as f64;
            let out = expert_row(xr, &weights.fc1[e], &weights.fc2[e], h, cfg.ffn);
            for (yv, o) in y[t * h..(t + 1) * h].iter_mut().zip(out) {
                *yv += w * o;
            }
        }
    }
    Ok(y)
}

/// Largest `|a - b| / (1 + |b|)` over two equally long slices; NaN in `a`
/// counts as infinite error so unwritten (poisoned) outputs never pass.
pub fn max_error(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "max_error on slices of different length");
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            if x.is_finite() {
                (x as f64 - y).abs() / (1.0 + y.abs())
            } else {
                f64::INFINITY
            }
        })
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Preset;
    use crate::weights::random_tokens;

    #[test]
    fn one_expert_by_hand() {
        // H = 1, F = 1: y = w * silu(x * g) * (x * u) * d.
        let out = expert_row(&[2.0], &[0.5, 3.0], &[4.0], 1, 1);
        let expect = silu(1.0) * 6.0 * 4.0;
        assert!((out[0] - expect).abs() < 1e-12);
    }

    #[test]
    fn layer_is_a_weighted_sum() {
        let cfg = MoeConfig {
            hidden: 8,
            ffn: 8,
            ..Preset::Small.config(1).unwrap()
        };
        let w = ExpertWeights::all(&cfg, 3);
        let x = random_tokens(3, 8, 1);
        let r = Routing::generate(&cfg, 0, 3, crate::routing::RoutingKind::Uniform, 4);
        let y = moe_layer(&cfg, &x, &r, &w).unwrap();
        let t = 1;
        let mut expect = [0f64; 8];
        for j in 0..2 {
            let e = r.ids[t * 2 + j] as usize;
            let o = expert_row(&x[8..16], &w.fc1[e], &w.fc2[e], 8, 8);
            for i in 0..8 {
                expect[i] += r.weights[t * 2 + j] as f64 * o[i];
            }
        }
        assert_eq!(&y[8..16], &expect[..]);
        assert!(moe_layer(&cfg, &x[..5], &r, &w).is_err());
    }

    #[test]
    fn nan_never_passes() {
        assert_eq!(max_error(&[f32::NAN], &[0.0]), f64::INFINITY);
        assert!(max_error(&[1.0], &[1.0]) == 0.0);
    }
}
