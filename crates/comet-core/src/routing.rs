//! Routing: softmax top-k with renormalised weights, and seeded generators
//! of the routings a production layer meets (uniform, skewed, adversarial).

use crate::config::MoeConfig;
use crate::error::CoreError;
use rand::distributions::{Distribution, WeightedIndex};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::str::FromStr;

/// One rank's routing: for each of `tokens` tokens, `top_k` distinct expert
/// ids and their weights (which sum to one per token).
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub tokens: usize,
    pub top_k: usize,
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
}

/// The shapes of routing the generators produce.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RoutingKind {
    /// Router logits drawn from a standard normal: near-uniform load.
    Uniform,
    /// Experts drawn with Zipf(s) popularity: a few hot experts.
    Zipf(f64),
    /// Every token picks the same k experts (all tokens to one expert's rank).
    AllToOne,
    /// Only a random half of the experts receive tokens; the rest are empty.
    SomeEmpty,
    /// Rank 0 has no tokens at all; the others route uniformly.
    SilentRank,
}

impl RoutingKind {
    pub const NAMES: &'static str = "uniform, zipf, all-to-one, some-empty, silent-rank";
}

impl FromStr for RoutingKind {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self, CoreError> {
        Ok(match s {
            "uniform" => RoutingKind::Uniform,
            "zipf" | "skewed" => RoutingKind::Zipf(1.2),
            "all-to-one" => RoutingKind::AllToOne,
            "some-empty" => RoutingKind::SomeEmpty,
            "silent-rank" => RoutingKind::SilentRank,
            other => {
                return Err(CoreError::BadRouting(format!(
                    "unknown routing '{other}' (known: {})",
                    RoutingKind::NAMES
                )))
            }
        })
    }
}

impl Routing {
    /// Softmax over each token's `experts` logits, keep the top-k, and
    /// renormalise their probabilities to sum to one. Ties go to the lower id.
    pub fn softmax_topk(
        logits: &[f32],
        experts: usize,
        top_k: usize,
    ) -> Result<Routing, CoreError> {
        if experts == 0 || top_k == 0 || top_k > experts {
            return Err(CoreError::BadRouting(format!(
                "top_k {top_k} with {experts} experts"
            )));
        }
        if !logits.len().is_multiple_of(experts) {
            return Err(CoreError::Shape {
                name: "logits",
                expected: experts,
                got: logits.len() % experts,
            });
        }
        let tokens = logits.len() / experts;
        let mut ids = Vec::with_capacity(tokens * top_k);
        let mut weights = Vec::with_capacity(tokens * top_k);
        let mut order: Vec<usize> = Vec::with_capacity(experts);
        for row in logits.chunks_exact(experts) {
            if let Some(bad) = row.iter().find(|v| !v.is_finite()) {
                return Err(CoreError::BadRouting(format!(
                    "non-finite router logit {bad}"
                )));
            }
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let probs: Vec<f64> = row.iter().map(|&v| ((v - max) as f64).exp()).collect();
            order.clear();
            order.extend(0..experts);
            order.sort_by(|&a, &b| probs[b].partial_cmp(&probs[a]).unwrap().then(a.cmp(&b)));
            // Renormalising over the kept k makes the softmax denominator cancel.
            let kept: f64 = order[..top_k].iter().map(|&e| probs[e]).sum();
            for &e in &order[..top_k] {
                ids.push(e as u32);
                weights.push((probs[e] / kept) as f32);
            }
        }
        Ok(Routing {
            tokens,
            top_k,
            ids,
            weights,
        })
    }

    /// A seeded routing of `tokens` tokens of `rank` under `kind`.
    pub fn generate(
        cfg: &MoeConfig,
        rank: usize,
        tokens: usize,
        kind: RoutingKind,
        seed: u64,
    ) -> Routing {
        let (e, k) = (cfg.experts, cfg.top_k);
        let mut rng =
            ChaCha8Rng::seed_from_u64(seed ^ (rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        match kind {
            RoutingKind::Uniform => {
                let logits = normal_logits(&mut rng, tokens * e);
                Routing::softmax_topk(&logits, e, k).expect("validated config")
            }
            RoutingKind::SilentRank => {
                let t = if rank == 0 { 0 } else { tokens };
                let logits = normal_logits(&mut rng, t * e);
                Routing::softmax_topk(&logits, e, k).expect("validated config")
            }
            RoutingKind::Zipf(s) => Self::zipf(e, k, tokens, s, seed, &mut rng),
            RoutingKind::AllToOne => Self::all_to_one(e, k, tokens, seed, &mut rng),
            RoutingKind::SomeEmpty => Self::some_empty(e, k, tokens, seed, &mut rng),
        }
    }

    /// Popularity 1/(i+1)^s over a seeded permutation of the experts, the
    /// same permutation on every rank (seeded without the rank).
    fn zipf(e: usize, k: usize, tokens: usize, s: f64, seed: u64, rng: &mut ChaCha8Rng) -> Routing {
        let perm = shuffled(e, &mut ChaCha8Rng::seed_from_u64(seed));
        let pop: Vec<f64> = (0..e).map(|i| 1.0 / ((i + 1) as f64).powf(s)).collect();
        Self::token_by_token(tokens, k, rng, |rng, ids| {
            let mut w = pop.clone();
            for _ in 0..k {
                let idx = WeightedIndex::new(&w)
                    .expect("positive weights")
                    .sample(rng);
                w[idx] = 0.0;
                ids.push(perm[idx] as u32);
            }
        })
    }

    /// Every token to the same k experts from a seeded one on.
    fn all_to_one(e: usize, k: usize, tokens: usize, seed: u64, rng: &mut ChaCha8Rng) -> Routing {
        let hot = (seed as usize) % e;
        Self::token_by_token(tokens, k, rng, |_, ids| {
            ids.extend((0..k).map(|j| ((hot + j) % e) as u32));
        })
    }

    /// For each token in turn: its k experts from `choose`, then its
    /// weights ([`token_weights`]), both from `rng`.
    fn token_by_token(
        tokens: usize,
        k: usize,
        rng: &mut ChaCha8Rng,
        mut choose: impl FnMut(&mut ChaCha8Rng, &mut Vec<u32>),
    ) -> Routing {
        let mut ids = Vec::with_capacity(tokens * k);
        let mut weights = Vec::with_capacity(tokens * k);
        for _ in 0..tokens {
            choose(rng, &mut ids);
            weights.extend(token_weights(rng, k));
        }
        Routing {
            tokens,
            top_k: k,
            ids,
            weights,
        }
    }

    /// Uniform over a live half of the experts (at least k), the others
    /// empty. The live subset is seeded without the rank so that it is the
    /// same everywhere and the other experts are truly empty.
    fn some_empty(e: usize, k: usize, tokens: usize, seed: u64, rng: &mut ChaCha8Rng) -> Routing {
        let live = k.max(e / 2);
        let perm = shuffled(e, &mut ChaCha8Rng::seed_from_u64(seed.wrapping_add(1)));
        let live_set = &perm[..live];
        let logits = normal_logits(rng, tokens * live);
        let sub = Routing::softmax_topk(&logits, live, k).expect("k <= live");
        let ids = sub
            .ids
            .iter()
            .map(|&i| live_set[i as usize] as u32)
            .collect();
        Routing {
            tokens,
            top_k: k,
            ids,
            weights: sub.weights,
        }
    }

    /// Checks ids against the config: in range, distinct per token, finite weights.
    pub fn validate(&self, cfg: &MoeConfig) -> Result<(), CoreError> {
        if self.top_k != cfg.top_k {
            return Err(CoreError::BadRouting(format!(
                "top_k {} but config has {}",
                self.top_k, cfg.top_k
            )));
        }
        let n = self.tokens * self.top_k;
        if self.ids.len() != n {
            return Err(CoreError::Shape {
                name: "routing ids",
                expected: n,
                got: self.ids.len(),
            });
        }
        if self.weights.len() != n {
            return Err(CoreError::Shape {
                name: "routing weights",
                expected: n,
                got: self.weights.len(),
            });
        }
        for (t, row) in self.ids.chunks_exact(self.top_k.max(1)).enumerate() {
            for (j, &id) in row.iter().enumerate() {
                if id as usize >= cfg.experts {
                    return Err(CoreError::BadRouting(format!(
                        "token {t} slot {j}: expert {id} >= {}",
                        cfg.experts
                    )));
                }
                if row[..j].contains(&id) {
                    return Err(CoreError::BadRouting(format!(
                        "token {t}: expert {id} chosen twice"
                    )));
                }
            }
        }
        if let Some(w) = self.weights.iter().find(|w| !w.is_finite()) {
            return Err(CoreError::BadRouting(format!(
                "non-finite routing weight {w}"
            )));
        }
        Ok(())
    }

    /// Rows this rank sends to each global expert.
    pub fn counts_per_expert(&self, experts: usize) -> Vec<usize> {
        let mut c = vec![0; experts];
        for &id in &self.ids {
            c[id as usize] += 1;
        }
        c
    }
}

/// `n` standard normal logits (Box-Muller keeps us on plain `rand`
/// without rand_distr).
fn normal_logits(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1: f32 = rng.gen_range(1e-7f32..1.0);
            let u2: f32 = rng.gen();
            (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        })
        .collect()
}

/// A permutation of `0..n` drawn from `rng` (Fisher-Yates): the generators
/// draw their expert orders this way, from rank-independent seeds.
fn shuffled(n: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
    let mut perm: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        perm.swap(i, rng.gen_range(0..=i));
    }
    perm
}

/// One token's `k` weights for the generators that choose experts without
/// logits: uniform in [0.05, 1), renormalised to sum to one.
fn token_weights(rng: &mut ChaCha8Rng, k: usize) -> Vec<f32> {
    let raw: Vec<f32> = (0..k).map(|_| rng.gen_range(0.05f32..1.0)).collect();
    let sum: f32 = raw.iter().sum();
    raw.into_iter().map(|r| r / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Preset;

    #[test]
    fn softmax_topk_picks_largest_and_renormalises() {
        let logits = [0.0f32, 3.0, 1.0, 2.0];
        let r = Routing::softmax_topk(&logits, 4, 2).unwrap();
        assert_eq!(r.ids, vec![1, 3]);
        let e = (1.0f64).exp();
        assert!((r.weights[0] as f64 - e / (e + 1.0)).abs() < 1e-6);
        assert!(((r.weights[0] + r.weights[1]) - 1.0).abs() < 1e-6);
        assert!(Routing::softmax_topk(&[f32::NAN, 0.0], 2, 1).is_err());
        assert!(Routing::softmax_topk(&[0.0; 3], 2, 1).is_err());
    }

    #[test]
    fn generators_are_valid_and_seeded() {
        let cfg = Preset::Small.config(4).unwrap();
        for kind in [
            RoutingKind::Uniform,
            RoutingKind::Zipf(1.2),
            RoutingKind::AllToOne,
            RoutingKind::SomeEmpty,
            RoutingKind::SilentRank,
        ] {
            for rank in 0..4 {
                let r = Routing::generate(&cfg, rank, 64, kind, 7);
                r.validate(&cfg).unwrap();
                assert_eq!(r, Routing::generate(&cfg, rank, 64, kind, 7));
            }
        }
        let silent = Routing::generate(&cfg, 0, 64, RoutingKind::SilentRank, 1);
        assert_eq!(silent.tokens, 0);
        let hot = Routing::generate(&cfg, 1, 64, RoutingKind::AllToOne, 3);
        assert_eq!(hot.counts_per_expert(8)[3], 64);
        let empty = Routing::generate(&cfg, 1, 256, RoutingKind::SomeEmpty, 3);
        assert_eq!(
            empty
                .counts_per_expert(8)
                .iter()
                .filter(|&&c| c == 0)
                .count(),
            4
        );
    }

    #[test]
    fn validate_catches_bad_ids() {
        let cfg = Preset::Small.config(2).unwrap();
        let bad = Routing {
            tokens: 1,
            top_k: 2,
            ids: vec![3, 3],
            weights: vec![0.5, 0.5],
        };
        assert!(bad.validate(&cfg).is_err());
        let oob = Routing {
            tokens: 1,
            top_k: 2,
            ids: vec![3, 99],
            weights: vec![0.5, 0.5],
        };
        assert!(oob.validate(&cfg).is_err());
    }
}
