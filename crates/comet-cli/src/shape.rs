//! The model shape of a run: a preset, optionally overridden field by field
//! from the command line (`--hidden`, `--ffn`, `--experts`, `--top-k`), so
//! that any model can be planned and benchmarked, not only the presets.
//! `comet plan`, `comet bench` (CPU and GPU) and `comet bench gemm` all
//! resolve their shape here, with the same checks and the same messages.

use anyhow::{bail, Result};
use clap::Args;
use comet_core::{MoeConfig, Preset};

/// Shape flags, flattened into each command's arguments.
#[derive(Args, Debug, Clone, Default, PartialEq, Eq)]
pub struct ShapeArgs {
    /// Hidden size H (overrides the preset's).
    #[arg(long, value_name = "H")]
    pub hidden: Option<usize>,
    /// Expert FFN size F: FC1 maps H -> 2F, FC2 maps F -> H (overrides the preset's).
    #[arg(long, value_name = "F")]
    pub ffn: Option<usize>,
    /// Number of experts E in the whole model (overrides the preset's).
    #[arg(long, value_name = "E")]
    pub experts: Option<usize>,
    /// Experts per token (overrides the preset's).
    #[arg(long = "top-k", value_name = "K")]
    pub top_k: Option<usize>,
}

/// One resolved shape and how to name it in output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    /// The preset's name, `<preset>+overrides`, or `custom`.
    pub label: String,
    pub cfg: MoeConfig,
}

impl ShapeArgs {
    /// Whether any shape flag was given.
    pub fn any(&self) -> bool {
        self.hidden.is_some()
            || self.ffn.is_some()
            || self.experts.is_some()
            || self.top_k.is_some()
    }

    fn all_given(&self) -> bool {
        self.hidden.is_some()
            && self.ffn.is_some()
            && self.experts.is_some()
            && self.top_k.is_some()
    }

    /// The shapes a `--preset` value names (one preset, a comma-separated
    /// list, or `all` for `all_presets`) over `ranks` ranks, with the flags
    /// applied to each, then hidden and FFN divided by `scale_down`. With
    /// `all` and shape flags, all four flags must be given: they are then
    /// the one shape run. `ranks_flag` is how the rank count is named in
    /// errors (`--ranks`, or a sentence where the command fixes it).
    pub fn shapes(
        &self,
        spec: &str,
        all_presets: &[Preset],
        ranks: usize,
        ranks_flag: &str,
        scale_down: usize,
    ) -> Result<Vec<Shape>> {
        let spec = spec.trim();
        if spec == "all" && self.any() {
            if !self.all_given() {
                bail!(
                    "--preset all with shape flags needs all of --hidden, --ffn, --experts and --top-k \
                     (or name one preset with --preset to override some of its fields)"
                );
            }
            // Every field comes from the flags: the base preset is irrelevant.
            return Ok(vec![self.resolve(
                Preset::Small,
                ranks,
                ranks_flag,
                scale_down,
            )?]);
        }
        let presets: Vec<Preset> = if spec == "all" {
            all_presets.to_vec()
        } else {
            spec.split(',')
                .map(|s| s.trim().parse::<Preset>().map_err(anyhow::Error::from))
                .collect::<Result<_>>()?
        };
        presets
            .into_iter()
            .map(|p| self.resolve(p, ranks, ranks_flag, scale_down))
            .collect()
    }

    /// The one place a shape is built and checked: `preset`'s fields, each
    /// replaced by its flag where given, over `ranks` ranks, hidden and FFN
    /// divided by `scale_down` (never below 8). Every mistake is reported
    /// by the flag that causes it.
    pub fn resolve(
        &self,
        preset: Preset,
        ranks: usize,
        ranks_flag: &str,
        scale_down: usize,
    ) -> Result<Shape> {
        // The preset's own fields (validated over one rank: any rank count
        // is checked below, where the message can name the flag).
        let base = preset.config(1)?;
        let pick = |flag: &str, v: Option<usize>, preset_value: usize| -> Result<usize> {
            match v {
                Some(0) => bail!("{flag} must be at least 1"),
                Some(v) => Ok(v),
                None => Ok(preset_value),
            }
        };
        let hidden = pick("--hidden", self.hidden, base.hidden)?;
        let ffn = pick("--ffn", self.ffn, base.ffn)?;
        let experts = pick("--experts", self.experts, base.experts)?;
        let top_k = pick("--top-k", self.top_k, base.top_k)?;
        if ranks == 0 {
            bail!("{ranks_flag} must be at least 1");
        }
        if scale_down == 0 {
            bail!("--scale-down must be at least 1 (1 keeps the sizes as they are)");
        }
        let named = |flag: &str, given: bool| {
            if given {
                flag.to_string()
            } else {
                format!("{flag} (from preset {})", preset.name())
            }
        };
        if top_k > experts {
            bail!(
                "{} {top_k} exceeds {} {experts}: a token picks each expert at most once",
                named("--top-k", self.top_k.is_some()),
                named("--experts", self.experts.is_some()),
            );
        }
        if experts % ranks != 0 {
            bail!(
                "{} {experts} is not divisible by {ranks_flag} {ranks}: every rank holds the same number of experts",
                named("--experts", self.experts.is_some()),
            );
        }
        let cfg = MoeConfig {
            hidden,
            ffn,
            experts,
            top_k,
            ranks,
            ..base
        }
        .validated()?
        .scaled_down(scale_down);
        let label = if self.all_given() {
            "custom".to_string()
        } else if self.any() {
            format!("{}+overrides", preset.name())
        } else {
            preset.name().to_string()
        };
        Ok(Shape { label, cfg })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(h: Option<usize>, f: Option<usize>, e: Option<usize>, k: Option<usize>) -> ShapeArgs {
        ShapeArgs {
            hidden: h,
            ffn: f,
            experts: e,
            top_k: k,
        }
    }

    #[test]
    fn flags_override_the_preset_field_by_field() {
        let s = flags(Some(2048), Some(1408), Some(60), Some(4))
            .resolve(Preset::Mixtral8x7b, 4, "--ranks", 1)
            .unwrap();
        assert_eq!(
            (
                s.cfg.hidden,
                s.cfg.ffn,
                s.cfg.experts,
                s.cfg.top_k,
                s.cfg.ranks
            ),
            (2048, 1408, 60, 4, 4)
        );
        assert_eq!(s.label, "custom");
        let s = flags(None, Some(1000), None, None)
            .resolve(Preset::Small, 2, "--ranks", 1)
            .unwrap();
        assert_eq!((s.cfg.hidden, s.cfg.ffn, s.cfg.experts), (256, 1000, 8));
        assert_eq!(s.label, "small+overrides");
        let s = ShapeArgs::default()
            .resolve(Preset::Qwen2Moe, 8, "--ranks", 32)
            .unwrap();
        assert_eq!(s.cfg, Preset::Qwen2Moe.config(8).unwrap().scaled_down(32));
        assert_eq!(s.label, "qwen2-moe");
    }

    #[test]
    fn each_mistake_names_its_flag() {
        let err = |a: ShapeArgs, ranks: usize, scale: usize| {
            a.resolve(Preset::Small, ranks, "--ranks", scale)
                .unwrap_err()
                .to_string()
        };
        assert!(err(flags(Some(0), None, None, None), 2, 1).starts_with("--hidden must be"));
        assert!(err(flags(None, Some(0), None, None), 2, 1).starts_with("--ffn must be"));
        assert!(err(flags(None, None, Some(0), None), 2, 1).starts_with("--experts must be"));
        assert!(err(flags(None, None, None, Some(0)), 2, 1).starts_with("--top-k must be"));
        let e = err(flags(None, None, None, Some(9)), 2, 1);
        assert!(
            e.contains("--top-k 9 exceeds --experts (from preset small) 8"),
            "{e}"
        );
        let e = err(flags(None, None, Some(4), Some(5)), 2, 1);
        assert!(e.contains("--top-k 5 exceeds --experts 4"), "{e}");
        let e = err(flags(None, None, Some(60), None), 8, 1);
        assert!(
            e.contains("--experts 60 is not divisible by --ranks 8"),
            "{e}"
        );
        assert!(err(ShapeArgs::default(), 0, 1).starts_with("--ranks must be"));
        assert!(err(ShapeArgs::default(), 2, 0).starts_with("--scale-down must be"));
    }

    #[test]
    fn preset_lists_and_all() {
        let all = [Preset::Mixtral8x7b, Preset::Phi35Moe];
        let none = ShapeArgs::default();
        let v = none.shapes("all", &all, 2, "--ranks", 1).unwrap();
        assert_eq!(
            v.iter().map(|s| s.label.as_str()).collect::<Vec<_>>(),
            ["mixtral-8x7b", "phi3.5-moe"]
        );
        let v = flags(None, Some(512), None, None)
            .shapes("small, qwen2-moe", &all, 2, "--ranks", 1)
            .unwrap();
        assert_eq!(v.len(), 2);
        assert!(v.iter().all(|s| s.cfg.ffn == 512));
        let e = flags(Some(1024), None, None, None)
            .shapes("all", &all, 2, "--ranks", 1)
            .unwrap_err();
        assert!(e.to_string().contains("needs all of --hidden"), "{e}");
        let v = flags(Some(2048), Some(1408), Some(60), Some(4))
            .shapes("all", &all, 2, "--ranks", 1)
            .unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].cfg.experts, 60);
        assert!(none.shapes("nope", &all, 2, "--ranks", 1).is_err());
    }
}
