//! Grouped GEMM variants: each is one template instantiation with an
//! explicit `extern "C"` kernel name, compiled as its own NVRTC unit so a
//! process compiles only what it launches. [`all_gemm_variants`] lists
//! every variant the planner can choose; the CI gate compiles them all.
//!
//! The storer-warp Hopper family (`sm90ws`) was removed: 10-20% slower than
//! the default and never chosen (docs/PERF.md), and its mbarrier hand-over
//! of staging buffers was the one source of racecheck reports (issue 14).

use std::collections::BTreeMap;

use crate::nvrtc::{CompileUnit, Target};

const SIGNAL_CUH: &str = include_str!("../kernels/signal.cuh");
const COMMON_CUH: &str = include_str!("../kernels/gemm_common.cuh");
const ROWS_CUH: &str = include_str!("../kernels/moe_rows.cuh");
const SM80_CU: &str = include_str!("../kernels/grouped_gemm_sm80.cu");
const SM90_CU: &str = include_str!("../kernels/grouped_gemm_sm90.cu");

/// What happens to an output tile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Epilogue {
    /// `C[row, col] = acc`.
    Store,
    /// FC1: `C[row, j] = silu(acc[row, j]) * acc[row, N/2 + j]`, N/2 outputs.
    SwiGlu,
    /// Combine: `C[idx[row], col] = w[row] * acc`, rows with idx < 0 skipped.
    Scatter,
}

impl Epilogue {
    pub const ALL: [Epilogue; 3] = [Epilogue::Store, Epilogue::SwiGlu, Epilogue::Scatter];
    /// Output columns of a GEMM with `n` columns (SwiGLU keeps half).
    pub fn out_cols(self, n: usize) -> usize {
        match self {
            Epilogue::SwiGlu => n / 2,
            Epilogue::Store | Epilogue::Scatter => n,
        }
    }
    fn code(self) -> u32 {
        match self {
            Epilogue::Store => 0,
            Epilogue::SwiGlu => 1,
            Epilogue::Scatter => 2,
        }
    }
    fn tag(self) -> &'static str {
        match self {
            Epilogue::Store => "store",
            Epilogue::SwiGlu => "swiglu",
            Epilogue::Scatter => "scatter",
        }
    }
}

/// Prologue (wait on the tile's dependency signals) and epilogue (raise the
/// tile's signal after its stores) hooks; compiled out when false.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Hooks {
    pub wait: bool,
    pub raise: bool,
}

impl Hooks {
    pub const NONE: Hooks = Hooks {
        wait: false,
        raise: false,
    };
    pub const ALL: [Hooks; 4] = [
        Hooks {
            wait: false,
            raise: false,
        },
        Hooks {
            wait: true,
            raise: false,
        },
        Hooks {
            wait: false,
            raise: true,
        },
        Hooks {
            wait: true,
            raise: true,
        },
    ];
    fn tag(self) -> &'static str {
        match (self.wait, self.raise) {
            (false, false) => "nohook",
            (true, false) => "wait",
            (false, true) => "raise",
            (true, true) => "wait_raise",
        }
    }
}

/// Kernel family: the portable mma.sync path or the Hopper wgmma path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// 128x128x64 tiles, 4 warps, cp.async ring; any CC >= 8.0.
    Sm80,
    /// 128 x `bn` x 64 tiles, TMA + mbarrier ring of `stages`, 1 producer
    /// warp + 2 consumer warpgroups with wgmma; sm_90a only. With
    /// `tma_store`, full tiles of the store epilogue leave through
    /// asynchronous TMA bulk stores (with the raise hook, each tile's
    /// signal once its stores completed, a tile later); every other case
    /// is the same code as without it. With `cluster` = 2, CTAs run as clusters of
    /// two along M sharing each k-block of B through TMA multicast; the tile
    /// list then holds pairs ([`TileList`](crate::TileList) builds them).
    Sm90 {
        bn: u32,
        stages: u32,
        tma_store: bool,
        cluster: u32,
    },
}

impl Family {
    /// Consumers store their own tiles with plain 16-byte stores; 4-stage
    /// ring. (The runtime's default is [`Family::SM90_TMA`].)
    pub const SM90_DEFAULT: Family = Family::Sm90 {
        bn: 256,
        stages: 4,
        tma_store: false,
        cluster: 1,
    };
    /// As [`Family::SM90_DEFAULT`], with TMA bulk stores for full tiles of
    /// the store epilogue: the default on sm_90a (about 1% faster there,
    /// docs/PERF.md).
    pub const SM90_TMA: Family = Family::Sm90 {
        bn: 256,
        stages: 4,
        tma_store: true,
        cluster: 1,
    };
    /// As [`Family::SM90_TMA`], in clusters of two CTAs along M that
    /// multicast B (each SM loads 32 instead of 48 KiB per k-block).
    pub const SM90_CLUSTER: Family = Family::Sm90 {
        bn: 256,
        stages: 4,
        tma_store: true,
        cluster: 2,
    };
    /// The names `comet bench gemm --family` and `COMET_GEMM_FAMILY` take.
    pub const NAMES: [(&'static str, Family); 4] = [
        ("sm80", Family::Sm80),
        ("sm90", Family::SM90_DEFAULT),
        ("sm90tma", Family::SM90_TMA),
        ("sm90c2", Family::SM90_CLUSTER),
    ];

    /// The family a GPU runs: Hopper's with TMA bulk stores
    /// ([`Family::SM90_TMA`]) where wgmma exists (sm_90a), the portable one
    /// elsewhere, unless `COMET_GEMM_FAMILY` names another ([`Family::NAMES`])
    /// that such a GPU runs. `comet plan` asks it for sm_90a without a GPU.
    pub fn chosen(has_wgmma: bool) -> Family {
        let fallback = if has_wgmma {
            Family::SM90_TMA
        } else {
            Family::Sm80
        };
        match std::env::var("COMET_GEMM_FAMILY") {
            Ok(name) => match Family::from_name(name.trim()) {
                Some(f) if has_wgmma || f == Family::Sm80 => f,
                _ => {
                    tracing::warn!(%name, "COMET_GEMM_FAMILY not usable here; using the default");
                    fallback
                }
            },
            Err(_) => fallback,
        }
    }

    /// The family called `name` in [`Family::NAMES`].
    pub fn from_name(name: &str) -> Option<Family> {
        Family::NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|&(_, f)| f)
    }

    /// Whether launches may split the last wave of tiles along K
    /// ([`TailSplit`](crate::tiles::TailSplit)): the Hopper kernels
    /// without clusters.
    pub fn splits_tail(self) -> bool {
        matches!(self, Family::Sm90 { cluster: 1, .. })
    }

    /// CTAs per cluster (1: no cluster). Tile lists of a clustered family
    /// hold one tile per CTA of each cluster, consecutively.
    pub fn cluster(self) -> usize {
        match self {
            Family::Sm90 { cluster, .. } => cluster.max(1) as usize,
            _ => 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GemmVariant {
    pub family: Family,
    pub epilogue: Epilogue,
    pub hooks: Hooks,
}

/// Shared memory a variant needs (dynamic), and its block size.
pub struct LaunchShape {
    pub threads: u32,
    pub smem_bytes: u32,
}

impl GemmVariant {
    pub fn new(family: Family, epilogue: Epilogue, hooks: Hooks) -> GemmVariant {
        GemmVariant {
            family,
            epilogue,
            hooks,
        }
    }

    pub fn kernel_name(&self) -> String {
        match self.family {
            Family::Sm80 => format!(
                "comet_gemm_sm80_{}_{}",
                self.epilogue.tag(),
                self.hooks.tag()
            ),
            Family::Sm90 {
                bn,
                stages,
                tma_store,
                ..
            } => {
                let cm = self.family.cluster();
                format!(
                    "comet_gemm_sm90_{}_{}_n{bn}_s{stages}{}{}",
                    self.epilogue.tag(),
                    self.hooks.tag(),
                    if tma_store { "_tma" } else { "" },
                    if cm > 1 {
                        format!("_c{cm}")
                    } else {
                        String::new()
                    }
                )
            }
        }
    }

    /// Rows per tile.
    pub fn tile_rows(&self) -> usize {
        128
    }

    /// CTAs per cluster; see [`Family::cluster`].
    pub fn cluster(&self) -> usize {
        self.family.cluster()
    }

    /// GEMM columns one tile covers.
    pub fn tile_gemm_cols(&self) -> usize {
        match self.family {
            Family::Sm80 => 128,
            Family::Sm90 { bn, .. } => bn as usize,
        }
    }

    /// Output columns one tile writes (SwiGLU halves them).
    pub fn tile_out_cols(&self) -> usize {
        match self.epilogue {
            Epilogue::SwiGlu => self.tile_gemm_cols() / 2,
            _ => self.tile_gemm_cols(),
        }
    }

    pub fn launch_shape(&self) -> LaunchShape {
        match self.family {
            Family::Sm80 => LaunchShape {
                threads: 128,
                smem_bytes: 3 * (128 + 128) * 64 * 2,
            },
            Family::Sm90 { bn, stages, .. } => LaunchShape {
                threads: 384,
                smem_bytes: stages * (128 * 64 * 2 + bn * 64 * 2) + 2 * 64 * 128 * 2 + 128 + 1024,
            },
        }
    }

    /// Whether this variant can run on (or be compiled for) `target`.
    pub fn supports(&self, target: Target) -> bool {
        match self.family {
            Family::Sm80 => target.major >= 8,
            Family::Sm90 { .. } => target.has_wgmma(),
        }
    }

    /// The NVRTC unit: the family's source plus one instantiation.
    pub fn compile_unit(&self) -> CompileUnit {
        let name = self.kernel_name();
        let (epi, w, r) = (self.epilogue.code(), self.hooks.wait, self.hooks.raise);
        let (body, inst) = match self.family {
            Family::Sm80 => (
                SM80_CU,
                format!(
                    "extern \"C\" __global__ void __launch_bounds__(128) {name}(const __grid_constant__ \
                     comet::GemmParams p) {{ comet::sm80::gemm<{epi}, {w}, {r}>(p); }}\n"
                ),
            ),
            Family::Sm90 {
                bn,
                stages,
                tma_store,
                ..
            } => {
                let cm = self.family.cluster();
                let (cluster_attr, tail) = if cm > 1 {
                    (
                        format!("__cluster_dims__({cm}, 1, 1) "),
                        format!(", {tma_store}, {cm}"),
                    )
                } else if tma_store {
                    (String::new(), ", true".to_string())
                } else {
                    (String::new(), String::new())
                };
                (
                    SM90_CU,
                    format!(
                        "extern \"C\" __global__ void {cluster_attr}__launch_bounds__(384, 1) {name}(const \
                         __grid_constant__ comet::sm90::HopperParams hp) {{ \
                         comet::sm90::gemm<{epi}, {w}, {r}, {bn}, {stages}{tail}>(hp); }}\n"
                    ),
                )
            }
        };
        CompileUnit {
            name,
            source: format!("{body}\n{inst}"),
            headers: BTreeMap::from([
                ("signal.cuh".to_string(), SIGNAL_CUH.to_string()),
                ("gemm_common.cuh".to_string(), COMMON_CUH.to_string()),
                ("moe_rows.cuh".to_string(), ROWS_CUH.to_string()),
            ]),
            extra_options: vec![],
        }
    }
}

/// Every variant the planner can choose, with the targets each is built for:
/// the portable family for sm_80 and for sm_90a (it is the fallback on
/// Hopper too), the Hopper family for sm_90a.
pub fn all_gemm_variants() -> Vec<(GemmVariant, Target)> {
    let mut v = Vec::new();
    for epi in Epilogue::ALL {
        for hooks in Hooks::ALL {
            v.push((GemmVariant::new(Family::Sm80, epi, hooks), Target::SM80));
            v.push((GemmVariant::new(Family::Sm80, epi, hooks), Target::SM90A));
            v.push((
                GemmVariant::new(Family::SM90_DEFAULT, epi, hooks),
                Target::SM90A,
            ));
            v.push((
                GemmVariant::new(Family::SM90_TMA, epi, hooks),
                Target::SM90A,
            ));
            v.push((
                GemmVariant::new(Family::SM90_CLUSTER, epi, hooks),
                Target::SM90A,
            ));
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_explicit() {
        let all = all_gemm_variants();
        let mut names: Vec<String> = all
            .iter()
            .map(|(v, t)| format!("{}@{t}", v.kernel_name()))
            .collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all.len());
        let v = GemmVariant::new(
            Family::SM90_DEFAULT,
            Epilogue::SwiGlu,
            Hooks {
                wait: true,
                raise: false,
            },
        );
        assert_eq!(v.kernel_name(), "comet_gemm_sm90_swiglu_wait_n256_s4");
        assert!(v
            .compile_unit()
            .source
            .contains("gemm<1, true, false, 256, 4>"));
        assert_eq!(v.tile_out_cols(), 128);
    }

    #[test]
    fn family_names_round_trip() {
        for (n, f) in Family::NAMES {
            assert_eq!(Family::from_name(n), Some(f));
        }
        // A removed family's name is unknown, so an old COMET_GEMM_FAMILY
        // gets the runtime's warning and the default, not a panic.
        assert_eq!(Family::from_name("sm90ws"), None);
    }

    #[test]
    fn hopper_needs_sm90a_and_fits_shared_memory() {
        let v = GemmVariant::new(Family::SM90_DEFAULT, Epilogue::Store, Hooks::NONE);
        assert!(v.supports(Target::SM90A));
        assert!(!v.supports(Target::SM80));
        assert!(v.launch_shape().smem_bytes <= 227 * 1024);
        for f in [Family::SM90_DEFAULT, Family::SM90_TMA, Family::SM90_CLUSTER] {
            let v = GemmVariant::new(f, Epilogue::Scatter, Hooks::ALL[3]);
            assert!(
                v.launch_shape().smem_bytes <= 227 * 1024,
                "{}",
                v.kernel_name()
            );
        }
    }

    #[test]
    fn all_variants_compile_for_their_targets() {
        // The full gate is `cargo xtask compile-kernels`; here one of each family.
        if let Err(e) = crate::nvrtc::ensure_nvrtc() {
            eprintln!("skipping: {e}");
            return;
        }
        for (v, t) in [
            (
                GemmVariant::new(
                    Family::Sm80,
                    Epilogue::SwiGlu,
                    Hooks {
                        wait: true,
                        raise: true,
                    },
                ),
                Target::SM80,
            ),
            (
                GemmVariant::new(
                    Family::SM90_DEFAULT,
                    Epilogue::Scatter,
                    Hooks {
                        wait: true,
                        raise: true,
                    },
                ),
                Target::SM90A,
            ),
        ] {
            if let Err(e) = crate::nvrtc::compile_cubin(&v.compile_unit(), t) {
                panic!("{e}");
            }
        }
    }
}
