//! The MoE layer's configuration, its validation and the model presets.
//!
//! Figures for the presets come from the models' published configs (as
//! listed in DESIGN.md): Mixtral-8x7B, a Qwen2-MoE-like shape and
//! Phi-3.5-MoE. `small` is ours: it runs in seconds on two CPU cores.

use crate::error::CoreError;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Element type of activations and weights on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Dtype {
    Bf16,
    F16,
    F32,
}

impl Dtype {
    pub fn bytes(self) -> usize {
        match self {
            Dtype::Bf16 | Dtype::F16 => 2,
            Dtype::F32 => 4,
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
            Dtype::F32 => "f32",
        })
    }
}

impl FromStr for Dtype {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self, CoreError> {
        match s {
            "bf16" => Ok(Dtype::Bf16),
            "f16" => Ok(Dtype::F16),
            "f32" => Ok(Dtype::F32),
            other => Err(CoreError::InvalidConfig {
                field: "dtype",
                problem: format!("'{other}' is not one of bf16, f16, f32"),
            }),
        }
    }
}

/// One MoE layer spread over `ranks` expert-parallel ranks.
///
/// Experts are SwiGLU FFNs: FC1 maps `hidden -> 2 * ffn` (gate and up
/// halves), FC2 maps `ffn -> hidden`. Routing is dropless: every token
/// reaches all of its top-k experts whatever the imbalance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoeConfig {
    pub hidden: usize,
    pub ffn: usize,
    pub experts: usize,
    pub top_k: usize,
    pub ranks: usize,
    pub dtype: Dtype,
}

/// A named model shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    Mixtral8x7b,
    Qwen2Moe,
    Phi35Moe,
    Small,
}

impl Preset {
    pub const ALL: [Preset; 4] = [
        Preset::Mixtral8x7b,
        Preset::Qwen2Moe,
        Preset::Phi35Moe,
        Preset::Small,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Preset::Mixtral8x7b => "mixtral-8x7b",
            Preset::Qwen2Moe => "qwen2-moe",
            Preset::Phi35Moe => "phi3.5-moe",
            Preset::Small => "small",
        }
    }

    /// The preset's config over `ranks` ranks (validated).
    pub fn config(self, ranks: usize) -> Result<MoeConfig, CoreError> {
        let (hidden, ffn, experts, top_k) = match self {
            Preset::Mixtral8x7b => (4096, 14336, 8, 2),
            Preset::Qwen2Moe => (3584, 2560, 64, 8),
            Preset::Phi35Moe => (4096, 6400, 16, 2),
            Preset::Small => (256, 512, 8, 2),
        };
        MoeConfig {
            hidden,
            ffn,
            experts,
            top_k,
            ranks,
            dtype: Dtype::Bf16,
        }
        .validated()
    }
}

impl FromStr for Preset {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self, CoreError> {
        Preset::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                let known: Vec<&str> = Preset::ALL.iter().map(|p| p.name()).collect();
                CoreError::UnknownPreset(s.to_string(), known.join(", "))
            })
    }
}

fn invalid(field: &'static str, problem: impl Into<String>) -> CoreError {
    CoreError::InvalidConfig {
        field,
        problem: problem.into(),
    }
}

impl MoeConfig {
    /// Checks every field; the first mistake found is reported by name.
    pub fn validate(&self) -> Result<(), CoreError> {
        if self.hidden == 0 {
            return Err(invalid("hidden", "must be > 0"));
        }
        if self.ffn == 0 {
            return Err(invalid("ffn", "must be > 0"));
        }
        if self.experts == 0 {
            return Err(invalid("experts", "must be > 0"));
        }
        if self.ranks == 0 {
            return Err(invalid("ranks", "must be > 0"));
        }
        if self.top_k == 0 {
            return Err(invalid("top_k", "must be > 0"));
        }
        if self.top_k > self.experts {
            return Err(invalid(
                "top_k",
                format!(
                    "{} exceeds the number of experts {}",
                    self.top_k, self.experts
                ),
            ));
        }
        if !self.experts.is_multiple_of(self.ranks) {
            return Err(invalid(
                "experts",
                format!("{} is not divisible by ranks {}", self.experts, self.ranks),
            ));
        }
        Ok(())
    }

    pub fn validated(self) -> Result<Self, CoreError> {
        self.validate()?;
        Ok(self)
    }

    pub fn experts_per_rank(&self) -> usize {
        self.experts / self.ranks
    }

    /// The rank that owns global expert `e`.
    pub fn owner(&self, e: usize) -> usize {
        e / self.experts_per_rank()
    }

    /// Global index of local expert `le` of `rank`.
    pub fn global_expert(&self, rank: usize, le: usize) -> usize {
        rank * self.experts_per_rank() + le
    }

    /// The same model with hidden and FFN sizes divided by `factor`
    /// (never below 8), for CPU runs of the large presets.
    pub fn scaled_down(&self, factor: usize) -> Self {
        let f = factor.max(1);
        MoeConfig {
            hidden: (self.hidden / f).max(8),
            ffn: (self.ffn / f).max(8),
            ..self.clone()
        }
    }

    /// FLOPs of both expert GEMMs for `rows` routed rows (FC1 + FC2).
    pub fn expert_flops(&self, rows: usize) -> f64 {
        let (h, f, r) = (self.hidden as f64, self.ffn as f64, rows as f64);
        2.0 * r * h * (2.0 * f) + 2.0 * r * f * h
    }
}

impl fmt::Display for MoeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "H={} F={} E={} k={} W={} {}",
            self.hidden, self.ffn, self.experts, self.top_k, self.ranks, self.dtype
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_and_parse() {
        for p in Preset::ALL {
            let c = p.config(2).unwrap();
            assert_eq!(p.name().parse::<Preset>().unwrap(), p);
            assert_eq!(c.experts % 2, 0);
        }
        let m = Preset::Mixtral8x7b.config(8).unwrap();
        assert_eq!((m.hidden, m.ffn, m.experts, m.top_k), (4096, 14336, 8, 2));
        let q = Preset::Qwen2Moe.config(8).unwrap();
        assert_eq!((q.hidden, q.ffn, q.experts, q.top_k), (3584, 2560, 64, 8));
    }

    #[test]
    fn each_mistake_is_named() {
        let ok = Preset::Small.config(2).unwrap();
        let cases: Vec<(MoeConfig, &str)> = vec![
            (
                MoeConfig {
                    hidden: 0,
                    ..ok.clone()
                },
                "hidden",
            ),
            (
                MoeConfig {
                    ffn: 0,
                    ..ok.clone()
                },
                "ffn",
            ),
            (
                MoeConfig {
                    experts: 0,
                    ..ok.clone()
                },
                "experts",
            ),
            (
                MoeConfig {
                    ranks: 0,
                    ..ok.clone()
                },
                "ranks",
            ),
            (
                MoeConfig {
                    top_k: 0,
                    ..ok.clone()
                },
                "top_k",
            ),
            (
                MoeConfig {
                    top_k: 9,
                    ..ok.clone()
                },
                "top_k",
            ),
            (
                MoeConfig {
                    ranks: 3,
                    ..ok.clone()
                },
                "experts",
            ),
        ];
        for (cfg, field) in cases {
            match cfg.validate() {
                Err(CoreError::InvalidConfig { field: f, .. }) => assert_eq!(f, field),
                other => panic!("expected error on {field}, got {other:?}"),
            }
        }
        assert!(matches!(
            "nope".parse::<Preset>(),
            Err(CoreError::UnknownPreset(..))
        ));
        assert!("bf17".parse::<Dtype>().is_err());
    }

    #[test]
    fn ownership() {
        let c = Preset::Qwen2Moe.config(8).unwrap();
        assert_eq!(c.experts_per_rank(), 8);
        assert_eq!(c.owner(17), 2);
        assert_eq!(c.global_expert(2, 1), 17);
    }
}
