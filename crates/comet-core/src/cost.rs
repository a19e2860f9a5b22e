//! The cost model (COMET's adaptive workload assignment, DESIGN.md section 1).
//!
//! From a few device figures it predicts, per layer call, the time of the
//! non-overlapped execution (dispatch, FC1, FC2, combine one after another
//! on the whole device) and of the overlapped one, where `comm_blocks` of
//! the device's SMs move data while the rest run GEMM tiles. It then picks
//! the number of communication blocks and the layer1 chunk size that
//! minimise the overlapped time. The figures are either measured (CPU
//! executor calibration, autotune) or the reference ones of DESIGN.md.

use crate::config::MoeConfig;
use crate::schedule::TileShape;

/// The most expert groups the model considers (the device layout's limit).
pub const MAX_GROUPS: usize = 16;

/// How token rows cross the link, both ways.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WireFormat {
    /// One row per (token, expert), as the kernels lay them out (what
    /// kernels storing into peers move).
    #[default]
    Rows,
    /// Each token once per destination rank, both ways (a host proxy's
    /// way): dispatch sends a token's row once plus a slot and a weight
    /// ratio per (token, expert), expanded on arrival; combine sends one
    /// row per token, its expert rows on that rank summed there.
    Tokens,
}

/// What the model needs to know about a device and its link.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceFigures {
    pub name: String,
    /// Dense GEMM rate on the whole device, TFLOP/s.
    pub gemm_tflops: f64,
    /// Link bandwidth to the other ranks, one direction, GB/s.
    pub link_gbps: f64,
    /// Latency of one put + signal, microseconds.
    pub link_latency_us: f64,
    /// Parallel units (SMs, or worker threads on a CPU).
    pub sms: usize,
    /// Bandwidth one communication block can drive alone, GB/s.
    pub block_gbps: f64,
    /// Fixed cost of one layer1 chunk (signal, wait, launch of its sends), us.
    pub chunk_overhead_us: f64,
    /// Fixed cost of each expert group beyond the first (two more GEMM
    /// launches, each ending in a part-filled wave of tiles), us. Not
    /// isolated by a measurement yet: over UCX shared memory on an H100,
    /// 30-55 ms calls ran faster up to 8 groups (docs/PERF.md 2026-12-06
    /// ~19:35-19:55), so a group costs a small part of a millisecond.
    pub group_overhead_us: f64,
    /// Rows per GEMM tile on this device.
    pub bm: usize,
    /// How token rows cross the link.
    pub wire: WireFormat,
    /// A host proxy carries the link's bytes (UCX, or NCCL across nodes):
    /// the communication blocks then copy every row of the call, local
    /// ones too, into device memory (`block_gbps` each) while the proxy
    /// moves the wire's bytes over the link beside them.
    pub proxy: bool,
    /// Fraction of the SMs at which the grouped GEMMs already run at the
    /// whole device's rate (beyond it they are bound by power and memory,
    /// not SMs): SMs taken for communication cost GEMM time only below
    /// it. 1.0 = rate in proportion to SMs.
    pub gemm_saturation: f64,
}

impl DeviceFigures {
    /// 2 x H200 over NVLink (NV18), figures from DESIGN.md section 7.
    pub fn h200_nvlink() -> DeviceFigures {
        DeviceFigures {
            name: "h200-nvlink".into(),
            gemm_tflops: 700.0,
            link_gbps: 371.0,
            link_latency_us: 3.0,
            sms: 132,
            block_gbps: 25.0,
            chunk_overhead_us: 2.0,
            // Two more launches and their tails, at most.
            group_overhead_us: 10.0,
            bm: 128,
            wire: WireFormat::Rows,
            proxy: false,
            // Measured on an H100 (docs/PERF.md, 2026-12-06 ~05:00): GEMM-only
            // at 8192 tokens with 80/65/50/35/25% of the SMs (MPS) ran at
            // 100/87/81/60/42% of the whole rate (mixtral-8x7b) and
            // 92/81/69/49/33% (qwen2-moe): min(1, share / 0.65) within 0.13
            // of each (it overstates the rate near the knee, at 65%).
            gemm_saturation: 0.65,
        }
    }

    /// H200s linked by something like the socket path of DESIGN.md (3 GB/s),
    /// which a host proxy drives, sending token-once.
    pub fn h200_slow_link() -> DeviceFigures {
        DeviceFigures {
            name: "h200-socket".into(),
            link_gbps: 3.0,
            link_latency_us: 30.0,
            wire: WireFormat::Tokens,
            proxy: true,
            ..DeviceFigures::h200_nvlink()
        }
    }

    /// Ranks sharing one H200 (the tests' and `comet bench --gpu`'s W > 1):
    /// the "link" is the GPU's own memory, which a put reads and writes
    /// (about half of the 4.3 TB/s device copy rate KINDS.md measured), and
    /// the communication blocks move every row, local ones too. The per
    /// block rate is a lead, not a measurement.
    pub fn h200_same_gpu() -> DeviceFigures {
        DeviceFigures {
            name: "h200-same-gpu".into(),
            link_gbps: 2000.0,
            link_latency_us: 2.0,
            block_gbps: 50.0,
            // With the GEMMs' saturation the model overlaps these ranks,
            // and fused calls then ran 7-10% slower than sequential ones
            // for mixtral-8x7b and phi3.5-moe (15% faster for qwen2-moe;
            // H100, docs/PERF.md 2026-12-06): the fused path's fixed costs,
            // which the model lacks, outweigh the little there is to hide.
            gemm_saturation: 1.0,
            ..DeviceFigures::h200_nvlink()
        }
    }

    /// A CPU running the CPU executor: `threads` compute workers at
    /// `gflops_per_thread`, local copies at `copy_gbps`.
    pub fn cpu(gflops_per_thread: f64, copy_gbps: f64, threads: usize) -> DeviceFigures {
        DeviceFigures {
            name: "cpu".into(),
            gemm_tflops: gflops_per_thread * threads as f64 / 1e3,
            link_gbps: copy_gbps,
            link_latency_us: 20.0,
            sms: threads.max(1),
            block_gbps: copy_gbps,
            chunk_overhead_us: 30.0,
            group_overhead_us: 60.0,
            bm: 32,
            wire: WireFormat::Rows,
            proxy: false,
            gemm_saturation: 1.0,
        }
    }
}

/// The model's prediction for one layer call on one rank.
#[derive(Debug, Clone, PartialEq)]
pub struct CostEstimate {
    pub gemm_ms: f64,
    pub dispatch_ms: f64,
    pub combine_ms: f64,
    /// Everything in sequence on the whole device.
    pub baseline_ms: f64,
    /// Fused layers with the chosen split: `layer0_ms + layer1_ms`.
    pub overlapped_ms: f64,
    /// Fused, until the last FC1 ends. With one expert group that is
    /// layer0, the dispatch beside FC1: the longer of the two, plus FC1's
    /// work on the last segment to land.
    pub layer0_ms: f64,
    /// Fused, the rest. With one expert group that is layer1, FC2 beside
    /// the combine: the longer of the two, plus the first chunk's FC2
    /// (nothing leaves before it) and each chunk's signalling. One group
    /// hides only each layer's own transfer, so the sum is at least about
    /// 7/6 of max(communication, GEMMs) where the two are equal; more
    /// groups send a group's combine beside later groups' GEMMs
    /// (ARCHITECTURE.md, "What is overlapped").
    pub layer1_ms: f64,
    pub comm_blocks: usize,
    pub chunks: usize,
    /// Expert groups of each rank's local experts, run FC1 then FC2 group
    /// by group (1: the plain per-layer overlap).
    pub groups: usize,
    pub shape: TileShape,
}

impl CostEstimate {
    pub fn speedup(&self) -> f64 {
        self.baseline_ms / self.overlapped_ms
    }
}

pub struct CostModel;

/// One overlapped call's parts, each over all the call's work and bytes.
#[derive(Debug, Clone, Copy)]
struct FusedParts {
    fc1: f64,
    fc2: f64,
    dispatch: f64,
    combine: f64,
    /// Dispatch segments (expert, source) of a rank.
    segments: f64,
    chunks: usize,
    chunk_overhead: f64,
    group_overhead: f64,
}

impl FusedParts {
    /// (end of the last FC1, end of the call), in seconds, with the local
    /// experts in `groups` equal groups: FC1(g0), FC2(g0), FC1(g1), ... on
    /// the GEMM side, every group's dispatch then every group's combine on
    /// the link (one side stream). A group's FC1 ends once its work is done
    /// and, after its last segment lands, the tiles of that segment; its
    /// combine starts after the previous one, after the whole dispatch and
    /// after its own first chunk of FC2. One group is the per-layer overlap.
    fn timeline(&self, groups: usize) -> (f64, f64) {
        let g = groups as f64;
        let (fc1, fc2) = (self.fc1 / g, self.fc2 / g);
        let (dispatch, combine) = (self.dispatch / g, self.combine / g);
        let tail = fc1 / (self.segments / g).max(1.0);
        let (mut gemm, mut link, mut fc1_end, mut end) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
        for i in 0..groups {
            let landed = (i + 1) as f64 * dispatch;
            fc1_end = (gemm + fc1).max(landed + tail);
            gemm = fc1_end + fc2;
            let start = link
                .max(self.dispatch)
                .max(fc1_end + fc2 / self.chunks as f64);
            link = start + combine;
            end = end.max(gemm).max(link);
        }
        let fixed = (g - 1.0) * self.group_overhead + g * self.chunks as f64 * self.chunk_overhead;
        (fc1_end, end + fixed)
    }
}

impl CostModel {
    /// Candidate chunk counts: those whose chunk width divides `hidden`
    /// and stays a multiple of 64 columns (a GEMM tile width) when it can.
    pub fn chunk_candidates(hidden: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (1..=64)
            .filter(|&n| hidden.is_multiple_of(n) && (hidden / n).is_multiple_of(64))
            .collect();
        if v.is_empty() {
            v = (1..=hidden.min(64))
                .filter(|&n| hidden.is_multiple_of(n))
                .collect();
        }
        v
    }

    /// Probability that a token routed uniformly to `top_k` distinct
    /// experts has at least one on a given rank (of `experts_per_rank`).
    pub fn rank_hit(cfg: &MoeConfig) -> f64 {
        let (e, epr) = (cfg.experts as f64, cfg.experts_per_rank() as f64);
        // 1 - C(E - epr, k) / C(E, k), as a product that reaches 0 once
        // every choice must land on the rank.
        let miss: f64 = (0..cfg.top_k)
            .map(|i| ((e - epr - i as f64) / (e - i as f64)).max(0.0))
            .product();
        1.0 - miss
    }

    /// Bytes one rank sends to the others in a call's dispatch and in its
    /// combine, for `tokens` tokens routed uniformly.
    pub fn wire_bytes(cfg: &MoeConfig, tokens: usize, wire: WireFormat) -> (f64, f64) {
        let w = cfg.ranks as f64;
        let remote_rows = (tokens * cfg.top_k) as f64 * (w - 1.0) / w;
        let row = (cfg.hidden * cfg.dtype.bytes()) as f64;
        match wire {
            WireFormat::Rows => (remote_rows * row, remote_rows * row),
            WireFormat::Tokens => {
                let once = tokens as f64 * (w - 1.0) * Self::rank_hit(cfg) * row;
                (once + remote_rows * 8.0, once)
            }
        }
    }

    /// Prediction for `tokens` tokens per rank, routed uniformly.
    pub fn estimate(cfg: &MoeConfig, tokens: usize, dev: &DeviceFigures) -> CostEstimate {
        Self::estimate_groups(cfg, tokens, dev, MAX_GROUPS)
    }

    /// As [`CostModel::estimate`], with at most `max_groups` expert groups
    /// (1: the per-layer overlap).
    pub fn estimate_groups(
        cfg: &MoeConfig,
        tokens: usize,
        dev: &DeviceFigures,
        max_groups: usize,
    ) -> CostEstimate {
        let flops = cfg.expert_flops(tokens * cfg.top_k);
        let gemm_s = flops / (dev.gemm_tflops * 1e12);
        let (l0_s, l1_s) = (gemm_s * 2.0 / 3.0, gemm_s / 3.0);
        let (dispatch_bytes, combine_bytes) = Self::wire_bytes(cfg, tokens, dev.wire);
        let lat = dev.link_latency_us * 1e-6;
        let link = |bytes: f64, gbps: f64| {
            if bytes == 0.0 {
                0.0
            } else {
                bytes / (gbps * 1e9) + lat
            }
        };
        let dispatch_s = link(dispatch_bytes, dev.link_gbps);
        let combine_s = link(combine_bytes, dev.link_gbps);
        // Every row of the call, each way (what a proxy's blocks copy).
        let rows_bytes = (tokens * cfg.top_k * cfg.hidden * cfg.dtype.bytes()) as f64;
        // In sequence the copies run on every SM.
        let all_copy_s = if dev.proxy {
            2.0 * rows_bytes / (dev.sms as f64 * dev.block_gbps * 1e9)
        } else {
            0.0
        };
        let baseline_s = dispatch_s + combine_s + all_copy_s + gemm_s;

        // (blocks, chunks, groups, layer0, layer1) of the best split.
        let mut best: Option<(usize, usize, usize, f64, f64)> = None;
        let max_groups = cfg.experts_per_rank().min(max_groups).clamp(1, MAX_GROUPS);
        // A third of the SMs at most: 48 blocks of a 66-SM share measured
        // 1.6x slower than 24 behind a proxy (docs/PERF.md, 2026-12-06).
        let max_blocks = (dev.sms / 3).max(1);
        for blocks in 1..=max_blocks {
            if blocks >= dev.sms && dev.sms > 1 {
                break;
            }
            let compute_share = if dev.sms > 1 {
                let left = (dev.sms - blocks) as f64 / dev.sms as f64;
                (left / dev.gemm_saturation.clamp(0.05, 1.0)).min(1.0)
            } else {
                1.0
            };
            let blocks_gbps = blocks as f64 * dev.block_gbps;
            let (comm0, comm1) = if dev.proxy {
                // The blocks fill the mirrors, the proxy empties them. Fused
                // calls measure as the sum of the two, not the larger: the
                // proxy takes whole pieces, which come at the blocks' pace
                // (H100, qwen2-moe and mixtral over UCX sm and tcp with 1 to
                // 48 blocks: docs/PERF.md, 2026-12-06 ~04:50).
                let copy = rows_bytes / (blocks_gbps * 1e9);
                (dispatch_s + copy, combine_s + copy)
            } else {
                let gbps = dev.link_gbps.min(blocks_gbps);
                (link(dispatch_bytes, gbps), link(combine_bytes, gbps))
            };
            for &n in &CostModel::chunk_candidates(cfg.hidden) {
                let parts = FusedParts {
                    fc1: l0_s / compute_share,
                    fc2: l1_s / compute_share,
                    dispatch: comm0,
                    combine: comm1,
                    segments: (cfg.ranks * cfg.experts_per_rank()) as f64,
                    chunks: n,
                    chunk_overhead: dev.chunk_overhead_us * 1e-6,
                    group_overhead: dev.group_overhead_us * 1e-6,
                };
                for groups in 1..=max_groups {
                    let (layer0, end) = parts.timeline(groups);
                    if best.is_none_or(|(.., l0, l1)| end < l0 + l1) {
                        best = Some((blocks, n, groups, layer0, end - layer0));
                    }
                }
            }
        }
        let (comm_blocks, chunks, groups, layer0_s, layer1_s) =
            best.expect("at least one candidate");
        CostEstimate {
            gemm_ms: gemm_s * 1e3,
            dispatch_ms: dispatch_s * 1e3,
            combine_ms: combine_s * 1e3,
            baseline_ms: baseline_s * 1e3,
            overlapped_ms: (layer0_s + layer1_s) * 1e3,
            layer0_ms: layer0_s * 1e3,
            layer1_ms: layer1_s * 1e3,
            comm_blocks,
            chunks,
            groups,
            shape: TileShape {
                bm: dev.bm,
                chunk_cols: cfg.hidden / chunks,
                groups,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Preset;

    #[test]
    fn compute_bound_hides_communication() {
        // Mixtral over NVLink: the GEMMs dwarf the transfers.
        let cfg = Preset::Mixtral8x7b.config(2).unwrap();
        let e = CostModel::estimate(&cfg, 8192, &DeviceFigures::h200_nvlink());
        assert!(e.gemm_ms > 5.0 * e.dispatch_ms, "{e:?}");
        // Overlap can only win the communication back, and does most of it.
        assert!(e.overlapped_ms < e.baseline_ms);
        assert!(e.overlapped_ms < e.gemm_ms * 1.1, "{e:?}");
        // Few blocks suffice to feed the link, so most SMs keep computing.
        assert!(e.comm_blocks <= 32, "{e:?}");
        assert!(e.shape.validate(&cfg).is_ok());
    }

    #[test]
    fn communication_bound_is_limited_by_the_link() {
        let cfg = Preset::Qwen2Moe.config(2).unwrap();
        for proxy in [false, true] {
            let mut dev = DeviceFigures::h200_slow_link();
            dev.proxy = proxy;
            let e = CostModel::estimate(&cfg, 8192, &dev);
            assert!(e.combine_ms > 3.0 * e.gemm_ms, "{e:?}");
            // Nothing beats sending the bytes both ways over the link.
            assert!(
                e.overlapped_ms >= (e.dispatch_ms + e.combine_ms) * 0.99,
                "{e:?}"
            );
            assert!(e.speedup() < 1.3, "{e:?}");
            if !proxy {
                // Blocks storing into peers: one saturates a slow link.
                assert_eq!(e.comm_blocks, 1);
            }
        }
    }

    /// Behind a host proxy the blocks copy every row of the call into the
    /// mirrors, not just the wire's bytes, and the proxy sends a piece only
    /// once it is copied: even a slow link takes more blocks than kernels
    /// storing into peers need, and a token with more rows (top-8 against
    /// top-2) more still.
    #[test]
    fn a_proxys_blocks_copy_every_row() {
        let qwen = Preset::Qwen2Moe.config(2).unwrap();
        let mixtral = Preset::Mixtral8x7b.config(2).unwrap();
        let figures = |gbps: f64, proxy: bool| {
            let mut dev = DeviceFigures::h200_slow_link();
            (dev.link_gbps, dev.proxy, dev.sms) = (gbps, proxy, 66);
            dev
        };
        let blocks = |cfg: &MoeConfig, gbps: f64, proxy: bool| {
            CostModel::estimate(cfg, 4096, &figures(gbps, proxy)).comm_blocks
        };
        assert_eq!(blocks(&qwen, 3.0, false), 1);
        assert!(blocks(&qwen, 3.0, true) > 8, "{}", blocks(&qwen, 3.0, true));
        // Where blocks cost the GEMMs (a rate in proportion to SMs, so the
        // third-of-the-share cap does not decide), top-2 takes fewer.
        let linear = |cfg: &MoeConfig| {
            let mut dev = figures(30.0, true);
            dev.gemm_saturation = 1.0;
            CostModel::estimate(cfg, 4096, &dev).comm_blocks
        };
        assert!(linear(&mixtral) < linear(&qwen), "top-2 copies fewer rows");
        assert!(blocks(&qwen, 3.0, true) <= 22, "a third of the SMs at most");
        // The copies add to the link's time.
        let dev = figures(10.0, true);
        let e = CostModel::estimate(&qwen, 4096, &dev);
        let rows_ms =
            (4096 * 8 * qwen.hidden * 2) as f64 / (e.comm_blocks as f64 * dev.block_gbps * 1e6);
        assert!(
            e.overlapped_ms >= e.dispatch_ms + e.combine_ms + 2.0 * rows_ms,
            "{e:?}"
        );
    }

    /// GEMMs bound by power and memory keep their rate on fewer SMs: below
    /// the saturation point the model gives communication SMs for free,
    /// and with a rate in proportion to SMs it gives fewer.
    #[test]
    fn sms_beyond_the_gemms_saturation_are_free() {
        let mut cfg = Preset::Mixtral8x7b.config(2).unwrap();
        cfg.ffn = 28672;
        let mut dev = DeviceFigures::h200_slow_link();
        dev.sms = 66;
        let sat = CostModel::estimate_groups(&cfg, 4096, &dev, 1);
        dev.gemm_saturation = 1.0;
        let linear = CostModel::estimate_groups(&cfg, 4096, &dev, 1);
        assert!(sat.comm_blocks > linear.comm_blocks, "{sat:?} {linear:?}");
        assert!(
            sat.overlapped_ms < linear.overlapped_ms,
            "{sat:?} {linear:?}"
        );
        assert_eq!(DeviceFigures::cpu(1.0, 1.0, 4).gemm_saturation, 1.0);
    }

    #[test]
    fn balanced_case_gains_most() {
        // Pick a link so that each transfer takes about a layer's compute.
        let cfg = Preset::Qwen2Moe.config(2).unwrap();
        let mut dev = DeviceFigures::h200_nvlink();
        let probe = CostModel::estimate(&cfg, 8192, &dev);
        dev.link_gbps *= probe.dispatch_ms / (probe.gemm_ms / 2.0);
        let e = CostModel::estimate(&cfg, 8192, &dev);
        assert!(e.speedup() > 1.4, "{e:?}");
        assert!(e.chunks > 1, "layer1 should pipeline in chunks: {e:?}");
    }

    /// With one expert group each layer hides only its own transfer, the
    /// bytes are the same both ways and FC1 does twice FC2's work: where
    /// communication equals the GEMMs, the best split still takes 7/6 of
    /// the larger (ARCHITECTURE.md, "What is overlapped"; UCX shared
    /// memory measured 1.13-1.25).
    #[test]
    fn per_layer_overlap_is_bounded_at_the_equal_point() {
        let (cfg, dev) = equal_point();
        let comm = |e: &CostEstimate| e.dispatch_ms + e.combine_ms;
        let e = CostModel::estimate_groups(&cfg, 8192, &dev, 1);
        assert_eq!(e.groups, 1);
        assert!((comm(&e) / e.gemm_ms - 1.0).abs() < 1e-9, "{e:?}");
        assert!(e.overlapped_ms >= e.gemm_ms * 7.0 / 6.0, "{e:?}");
        // The two layers: FC1 (2/3 of the GEMMs) is the longer in layer0,
        // the combine (half the communication) in layer1.
        assert!(
            (e.layer0_ms + e.layer1_ms - e.overlapped_ms).abs() < 1e-9,
            "{e:?}"
        );
        assert!(
            e.layer0_ms >= e.gemm_ms * 2.0 / 3.0 * (1.0 - 1e-12),
            "{e:?}"
        );
        assert!(e.layer1_ms >= e.combine_ms * (1.0 - 1e-12), "{e:?}");
        assert!(e.speedup() <= 12.0 / 7.0, "{e:?}");
        // Halve the link: the GEMMs hide under the transfers again.
        let mut dev = dev;
        dev.link_gbps /= 2.0;
        let slow = CostModel::estimate_groups(&cfg, 8192, &dev, 1);
        assert!(slow.overlapped_ms < comm(&slow) * 1.1, "{slow:?}");
    }

    /// Qwen2-moe over a link on which communication takes as long as the
    /// GEMMs (no latency).
    fn equal_point() -> (MoeConfig, DeviceFigures) {
        let cfg = Preset::Qwen2Moe.config(2).unwrap();
        let mut dev = DeviceFigures::h200_nvlink();
        dev.link_latency_us = 0.0;
        let probe = CostModel::estimate(&cfg, 8192, &dev);
        dev.link_gbps *= (probe.dispatch_ms + probe.combine_ms) / probe.gemm_ms;
        (cfg, dev)
    }

    /// Expert groups send a group's combine beside the later groups'
    /// GEMMs: at the equal point the model takes several, under the
    /// per-layer bound of 7/6 and at least max(communication, GEMMs);
    /// with two groups the timeline gives about 13/12 (ARCHITECTURE.md).
    #[test]
    fn expert_groups_pass_the_per_layer_bound() {
        let (cfg, dev) = equal_point();
        let one = CostModel::estimate_groups(&cfg, 8192, &dev, 1);
        let two = CostModel::estimate_groups(&cfg, 8192, &dev, 2);
        let best = CostModel::estimate(&cfg, 8192, &dev);
        let g = best.gemm_ms;
        assert_eq!(two.groups, 2, "{two:?}");
        assert!(two.overlapped_ms < one.overlapped_ms, "{two:?} {one:?}");
        assert!(two.overlapped_ms < g * 1.15, "{two:?}");
        assert!(best.groups > 2, "{best:?}");
        assert!(best.overlapped_ms <= two.overlapped_ms, "{best:?}");
        assert!(best.overlapped_ms >= g * (1.0 - 1e-9), "{best:?}");
        assert!(
            (best.layer0_ms + best.layer1_ms - best.overlapped_ms).abs() < 1e-9,
            "{best:?}"
        );
        // A group's fixed cost bounds how many pay.
        let mut dear = dev.clone();
        dear.group_overhead_us = 1e6;
        assert_eq!(CostModel::estimate(&cfg, 8192, &dear).groups, 1);
        // Groups never exceed the local experts.
        let mut few = cfg.clone();
        few.experts = 4;
        assert!(CostModel::estimate(&few, 8192, &dev).groups <= 2);
    }

    /// The timeline with one group is the per-layer model: layer0 the
    /// longer of FC1 and the dispatch (plus the last segment's tiles),
    /// layer1 the longer of FC2 and the combine after FC2's first chunk.
    #[test]
    fn one_group_is_the_per_layer_overlap() {
        let parts = FusedParts {
            fc1: 4.0,
            fc2: 2.0,
            dispatch: 3.0,
            combine: 3.0,
            segments: 8.0,
            chunks: 4,
            chunk_overhead: 0.01,
            group_overhead: 0.5,
        };
        let (l0, end) = parts.timeline(1);
        assert!((l0 - 4.0).abs() < 1e-12, "{l0}");
        assert!((end - (4.0 + 0.5 + 3.0 + 0.04)).abs() < 1e-12, "{end}");
        // Two groups: FC1(g0) 2, FC2(g0) 1, combine(g0) from 3 to 4.5,
        // FC1(g1) to 5, FC2(g1) to 6, combine(g1) from 5.25 to 6.75, plus
        // one group's cost and eight chunks'.
        let (l0, end) = parts.timeline(2);
        assert!((l0 - 5.0).abs() < 1e-12, "{l0}");
        assert!((end - (6.75 + 0.5 + 0.08)).abs() < 1e-12, "{end}");
    }

    /// Token-once sends each token once per rank it has experts on, both
    /// ways: as many row bytes as rows when top-1, fewer for top-8
    /// (Qwen2-57B's 64 experts over 2 ranks: about 4 rows per token and
    /// rank), and the model's times follow the bytes.
    #[test]
    fn token_once_dispatch_counts_each_token_once_per_rank() {
        let mut cfg = MoeConfig {
            hidden: 3584,
            ffn: 2560,
            experts: 64,
            top_k: 8,
            ranks: 2,
            dtype: crate::config::Dtype::Bf16,
        };
        let hit = CostModel::rank_hit(&cfg);
        // 1 - C(32, 8) / C(64, 8)
        assert!(
            (hit - (1.0 - 10_518_300.0 / 4_426_165_368.0)).abs() < 1e-12,
            "{hit}"
        );
        let (rows, comb) = CostModel::wire_bytes(&cfg, 2048, WireFormat::Rows);
        let (once, back) = CostModel::wire_bytes(&cfg, 2048, WireFormat::Tokens);
        assert_eq!(rows, comb);
        let ratio = once / rows;
        assert!(ratio > 0.25 && ratio < 0.26, "{ratio}");
        let ratio = back / comb;
        assert!(ratio > 0.24 && ratio < 0.26, "{ratio}");
        let mut dev = DeviceFigures::h200_slow_link();
        dev.wire = WireFormat::Rows;
        let by_rows = CostModel::estimate(&cfg, 2048, &dev);
        dev.wire = WireFormat::Tokens;
        let by_tokens = CostModel::estimate(&cfg, 2048, &dev);
        assert!(
            by_tokens.dispatch_ms < 0.3 * by_rows.dispatch_ms,
            "{by_tokens:?}"
        );
        assert!(
            by_tokens.combine_ms < 0.3 * by_rows.combine_ms,
            "{by_tokens:?}"
        );
        assert!(by_tokens.baseline_ms < by_rows.baseline_ms);
        // Top-1: every row is its own token.
        cfg.top_k = 1;
        let (rows, comb) = CostModel::wire_bytes(&cfg, 2048, WireFormat::Rows);
        let (once, back) = CostModel::wire_bytes(&cfg, 2048, WireFormat::Tokens);
        assert!(
            (once - rows - 2048.0 * 0.5 * 8.0).abs() < 1e-6,
            "{once} {rows}"
        );
        assert!((back - comb).abs() < 1e-6, "{back} {comb}");
        // 32 ranks of 2 experts: 1 - C(62, 8) / C(64, 8) = 1 - 56 * 55 / (64 * 63).
        cfg.top_k = 8;
        cfg.ranks = 32;
        let hit = CostModel::rank_hit(&cfg);
        assert!(
            (hit - (1.0 - 56.0 * 55.0 / (64.0 * 63.0))).abs() < 1e-12,
            "{hit}"
        );
    }

    #[test]
    fn chunk_candidates_divide_hidden() {
        for h in [8, 100, 256, 3584, 4096] {
            let c = CostModel::chunk_candidates(h);
            assert!(!c.is_empty());
            assert!(c.iter().all(|&n| h % n == 0));
        }
    }
}
