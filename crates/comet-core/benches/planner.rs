//! Planner throughput: plan + both schedules for Qwen2-like at W = 8 and 64.

use comet_core::routing::{Routing, RoutingKind};
use comet_core::schedule::{Layer0Schedule, Layer1Schedule, SignalMap, TileShape};
use comet_core::{LayoutPlan, MoeConfig, Preset};
use criterion::{criterion_group, criterion_main, Criterion};

fn plan_all(cfg: &MoeConfig, counts: &[Vec<usize>]) -> usize {
    let plan = LayoutPlan::new(cfg, counts.to_vec()).unwrap();
    let shape = TileShape {
        bm: 128,
        chunk_cols: 512,
        groups: 1,
    };
    let sig = SignalMap::new(cfg, shape.pieces(cfg));
    let l0 = Layer0Schedule::new(&plan, 0, shape, &sig);
    let l1 = Layer1Schedule::new(&plan, 0, shape, &sig);
    l0.tiles.len() + l1.tiles.len()
}

fn bench(c: &mut Criterion) {
    for w in [8usize, 64] {
        let cfg = Preset::Qwen2Moe.config(w).unwrap();
        let counts: Vec<Vec<usize>> = (0..w)
            .map(|r| {
                Routing::generate(&cfg, r, 8192, RoutingKind::Zipf(1.2), 1)
                    .counts_per_expert(cfg.experts)
            })
            .collect();
        c.bench_function(
            &format!("plan+schedule qwen2-moe W={w} 8192 tok/rank"),
            |b| b.iter(|| plan_all(&cfg, std::hint::black_box(&counts))),
        );
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
