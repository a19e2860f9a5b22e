//! Expert weights: FC1 `[hidden, 2 * ffn]` (gate columns then up columns)
//! and FC2 `[ffn, hidden]`, both row-major, generated from a seed per
//! global expert so that every rank can build its own experts alone.

use crate::config::MoeConfig;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone, PartialEq)]
pub struct ExpertWeights {
    pub hidden: usize,
    pub ffn: usize,
    /// Global expert ids held, in local order.
    pub experts: Vec<usize>,
    pub fc1: Vec<Vec<f32>>,
    pub fc2: Vec<Vec<f32>>,
}

fn uniform(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
}

impl ExpertWeights {
    /// Weights of the given global experts; scaled by 1/sqrt(fan_in) so the
    /// activations stay O(1) at every size.
    pub fn generate(cfg: &MoeConfig, experts: Vec<usize>, seed: u64) -> ExpertWeights {
        let (h, f) = (cfg.hidden, cfg.ffn);
        let s1 = (3.0 / h as f32).sqrt();
        let s2 = (3.0 / f as f32).sqrt();
        let fc1 = experts
            .iter()
            .map(|&e| uniform(seed ^ (2 * e as u64 + 1) << 20, h * 2 * f, s1))
            .collect();
        let fc2 = experts
            .iter()
            .map(|&e| uniform(seed ^ (2 * e as u64 + 2) << 20, f * h, s2))
            .collect();
        ExpertWeights {
            hidden: h,
            ffn: f,
            experts,
            fc1,
            fc2,
        }
    }

    /// The local experts of `rank`.
    pub fn for_rank(cfg: &MoeConfig, rank: usize, seed: u64) -> ExpertWeights {
        let epr = cfg.experts_per_rank();
        ExpertWeights::generate(cfg, (rank * epr..(rank + 1) * epr).collect(), seed)
    }

    /// Every expert of the model.
    pub fn all(cfg: &MoeConfig, seed: u64) -> ExpertWeights {
        ExpertWeights::generate(cfg, (0..cfg.experts).collect(), seed)
    }
}

/// Seeded activations `[tokens, hidden]` in [-1, 1).
pub fn random_tokens(tokens: usize, hidden: usize, seed: u64) -> Vec<f32> {
    uniform(
        seed.wrapping_mul(0x2545_F491_4F6C_DD1D).wrapping_add(17),
        tokens * hidden,
        1.0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Preset;

    #[test]
    fn per_rank_weights_match_the_global_ones() {
        let cfg = Preset::Small.config(4).unwrap();
        let all = ExpertWeights::all(&cfg, 9);
        let r2 = ExpertWeights::for_rank(&cfg, 2, 9);
        assert_eq!(r2.experts, vec![4, 5]);
        assert_eq!(r2.fc1[1], all.fc1[5]);
        assert_eq!(r2.fc2[0], all.fc2[4]);
        assert_ne!(all.fc1[0], all.fc1[1]);
    }
}
