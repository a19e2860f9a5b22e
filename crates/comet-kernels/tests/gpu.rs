//! GPU tests of the grouped GEMM (need a CUDA GPU of CC >= 8.0 and NVRTC;
//! ignored by default; run with `cargo test -p comet-kernels --test gpu --
//! --ignored`). Every numeric check poisons the output with NaN first and
//! compares sampled rows against an f64 CPU reference (tolerance in
//! `GroupedProblem::check`: per element 0.02|ref| + 0.02 rms, and relative
//! Frobenius error <= 1e-2).

use std::sync::Arc;
use std::time::Duration;

use comet_core::Preset;
use comet_kernels::device::{copy_rows_async, raise_signal_async, DeviceProblem};
use comet_kernels::problem::{ragged_counts, GroupedProblem};
use comet_kernels::{
    Epilogue, Family, GemmRuntime, GemmVariant, HookArgs, Hooks, KernelError, TailSplit, TileList,
};
use cudarc::driver::{CudaContext, CudaStream, DevicePtr};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn setup() -> (Arc<CudaContext>, Arc<CudaStream>, GemmRuntime) {
    let ctx = CudaContext::new(0).expect("a CUDA GPU");
    let stream = ctx.new_stream().expect("stream");
    let rt = GemmRuntime::new(ctx.clone()).expect("runtime");
    (ctx, stream, rt)
}

/// A stream of GPU 0 and the forward kernels loaded there.
fn forward_setup() -> (Arc<CudaStream>, comet_kernels::forward::ForwardKernels) {
    let ctx = CudaContext::new(0).expect("a CUDA GPU");
    let stream = ctx.new_stream().expect("stream");
    let k = comet_kernels::forward::ForwardKernels::load(&ctx).expect("forward kernels");
    (stream, k)
}

fn families(rt: &GemmRuntime) -> Vec<Family> {
    let mut f = vec![Family::Sm80];
    if rt.target().has_wgmma() {
        f.push(Family::SM90_DEFAULT);
        f.push(Family::SM90_TMA);
        f.push(Family::SM90_CLUSTER);
    }
    f
}

fn run_check(
    rt: &GemmRuntime,
    stream: &Arc<CudaStream>,
    v: GemmVariant,
    p: &GroupedProblem,
    label: &str,
) {
    let tiles = TileList::grouped(&p.counts, p.out_cols(), &v).unwrap();
    let mut dp = DeviceProblem::upload(stream.clone(), p, &v, &tiles).unwrap();
    // As the benchmark runs them: the last wave split where it gains.
    dp.enable_split(rt, &[v]).unwrap();
    dp.launch(rt, &v, None).unwrap();
    dp.finish().unwrap();
    let out = dp.download_c().unwrap();
    match p.check(&out, dp.ldc, 48) {
        Ok(r) => println!(
            "ok   {label:<40} {:<36} rows {:>5} split {:>3} checked {:>3} rel {:.2e} worst {:.2}",
            v.kernel_name(),
            p.rows(),
            split_ctas(rt, &v, tiles.tiles.len(), p.k),
            r.rows_checked,
            r.rel_error,
            r.worst_ratio
        ),
        Err(e) => panic!("{label} {}: {e}", v.kernel_name()),
    }
}

/// CTAs sharing the split tail of a launch of `num_tiles` tiles (0: none).
fn split_ctas(rt: &GemmRuntime, v: &GemmVariant, num_tiles: usize, k: usize) -> usize {
    let slots = rt.split_slots(v).unwrap();
    if slots == 0 {
        return 0;
    }
    TailSplit::plan(num_tiles, k / 64, slots).ctas
}

/// The split tail (Hopper families that split): shapes whose last wave is
/// cut along K into 2-4 parts per tile, every epilogue, three launches on
/// one workspace (epochs 1-3, output poisoned before each), the raise hook
/// counting each split tile once, the wait hook with late signals, and a
/// missing signal ending in its timeout error instead of a hang.
#[test]
#[ignore = "needs a CUDA GPU"]
fn split_tail_parts_add_up() {
    let (ctx, stream, rt) = setup();
    let copier = ctx.new_stream().unwrap();
    let fams: Vec<Family> = families(&rt)
        .into_iter()
        .filter(|f| f.splits_tail())
        .collect();
    if fams.is_empty() {
        println!("skip: no family here splits its tail");
        return;
    }
    for fam in fams {
        for (epi, counts, k, n) in [
            (Epilogue::Store, vec![300, 0, 1, 129, 256], 2048, 512),
            (Epilogue::Store, vec![4000, 3000], 4096, 1024),
            (Epilogue::SwiGlu, vec![77, 0, 513], 3072, 1024),
            (Epilogue::Scatter, vec![128, 5, 260], 2048, 768),
        ] {
            let v = GemmVariant::new(fam, epi, Hooks::NONE);
            let p = GroupedProblem::new(counts, k, n, epi, 500 + k as u64);
            let tiles = TileList::grouped(&p.counts, p.out_cols(), &v).unwrap();
            let ctas = split_ctas(&rt, &v, tiles.tiles.len(), k);
            assert!(
                ctas > 0,
                "{} tiles of K = {k} should split",
                tiles.tiles.len()
            );
            let mut dp = DeviceProblem::upload(stream.clone(), &p, &v, &tiles).unwrap();
            dp.enable_split(&rt, &[v]).unwrap();
            for epoch in 1..=3 {
                dp.poison().unwrap();
                dp.launch(&rt, &v, None).unwrap();
                dp.finish().unwrap();
                let rep = p
                    .check(&dp.download_c().unwrap(), dp.ldc, 64)
                    .unwrap_or_else(|e| panic!("{} epoch {epoch}: {e}", v.kernel_name()));
                println!(
                    "ok   split {} tiles {} over {ctas} CTAs, K {k}, epoch {epoch}, rel {:.2e}",
                    v.kernel_name(),
                    tiles.tiles.len(),
                    rep.rel_error
                );
            }
        }

        // Raise hook: every tile's counter once, split or not.
        let v = GemmVariant::new(
            fam,
            Epilogue::Store,
            Hooks {
                wait: false,
                raise: true,
            },
        );
        let p = GroupedProblem::new(vec![400, 3, 250], 2048, 512, Epilogue::Store, 61);
        let mut tiles = TileList::grouped(&p.counts, p.out_cols(), &v).unwrap();
        for t in &mut tiles.tiles {
            t.sig = t.expert;
            t.sig_mode = 1;
        }
        let mut want = vec![0u64; 3];
        for t in &tiles.tiles {
            want[t.expert as usize] += 1;
        }
        assert!(split_ctas(&rt, &v, tiles.tiles.len(), p.k) > 0);
        let mut dp = DeviceProblem::upload(stream.clone(), &p, &v, &tiles).unwrap();
        dp.enable_split(&rt, &[v]).unwrap();
        let got = launch_raising(&rt, &stream, &dp, &v, 3, 0);
        assert_eq!(got, want, "{}", v.kernel_name());
        p.check(&dp.download_c().unwrap(), dp.ldc, 48)
            .unwrap_or_else(|e| panic!("{}: {e}", v.kernel_name()));
        println!("ok   split raise {} counters {want:?}", v.kernel_name());

        // Wait hook: A lands segment by segment after the launch; then one
        // segment never comes.
        let v = GemmVariant::new(
            fam,
            Epilogue::Store,
            Hooks {
                wait: true,
                raise: false,
            },
        );
        let p = GroupedProblem::new(vec![300, 0, 260], 2048, 512, Epilogue::Store, 62);
        let segs = segments(&p.counts, 3);
        let tiles = tiles_with_deps(&p, &v, &segs);
        assert!(split_ctas(&rt, &v, tiles.tiles.len(), p.k) > 0);
        let mut dp = DeviceProblem::upload(stream.clone(), &p, &v, &tiles).unwrap();
        dp.enable_split(&rt, &[v]).unwrap();
        for (epoch, missing) in [(1u64, None), (2, Some(segs.len() - 1))] {
            dp.poison().unwrap();
            let late = LateSegments {
                rt: &rt,
                stream: &stream,
                copier: &copier,
                segs: &segs,
                epoch,
                missing,
                timeout_ns: if missing.is_some() {
                    100_000_000
                } else {
                    20_000_000_000
                },
            };
            match (missing, late.run(&dp, &v, &p, |_| Duration::from_millis(2))) {
                (None, Ok(())) => {
                    p.check(&dp.download_c().unwrap(), dp.ldc, 64)
                        .unwrap_or_else(|e| panic!("{}: {e}", v.kernel_name()));
                    println!("ok   split wait {} late signals", v.kernel_name());
                }
                (Some(m), Err(KernelError::SignalTimeout { signal, .. })) => {
                    assert_eq!(signal as usize, m);
                    println!(
                        "ok   split wait {} timeout names signal {m}",
                        v.kernel_name()
                    );
                }
                (m, other) => panic!("{}: missing {m:?}, got {other:?}", v.kernel_name()),
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn presets_fc1_fc2_ragged() {
    let (_ctx, stream, rt) = setup();
    for fam in families(&rt) {
        for (pi, preset) in [Preset::Mixtral8x7b, Preset::Qwen2Moe, Preset::Phi35Moe]
            .into_iter()
            .enumerate()
        {
            let cfg = preset.config(2).unwrap();
            let local = cfg.experts / 2;
            let counts = ragged_counts(local);
            let seed = 100 + pi as u64;
            let fc1 = GroupedProblem::new(
                counts.clone(),
                cfg.hidden,
                2 * cfg.ffn,
                Epilogue::SwiGlu,
                seed,
            );
            run_check(
                &rt,
                &stream,
                GemmVariant::new(fam, Epilogue::SwiGlu, Hooks::NONE),
                &fc1,
                &format!("{} FC1 swiglu", preset.name()),
            );
            drop(fc1);
            let fc2 = GroupedProblem::new(
                counts.clone(),
                cfg.ffn,
                cfg.hidden,
                Epilogue::Store,
                seed + 10,
            );
            run_check(
                &rt,
                &stream,
                GemmVariant::new(fam, Epilogue::Store, Hooks::NONE),
                &fc2,
                &format!("{} FC2 store", preset.name()),
            );
            drop(fc2);
            if preset == Preset::Phi35Moe {
                let fc1p = GroupedProblem::new(
                    counts.clone(),
                    cfg.hidden,
                    2 * cfg.ffn,
                    Epilogue::Store,
                    seed + 20,
                );
                run_check(
                    &rt,
                    &stream,
                    GemmVariant::new(fam, Epilogue::Store, Hooks::NONE),
                    &fc1p,
                    &format!("{} FC1 store", preset.name()),
                );
                drop(fc1p);
                let sc =
                    GroupedProblem::new(counts, cfg.ffn, cfg.hidden, Epilogue::Scatter, seed + 30);
                run_check(
                    &rt,
                    &stream,
                    GemmVariant::new(fam, Epilogue::Scatter, Hooks::NONE),
                    &sc,
                    &format!("{} FC2 scatter", preset.name()),
                );
            }
        }
    }
}

/// Small shapes of every epilogue and hook-free variant; the case
/// compute-sanitizer runs.
#[test]
#[ignore = "needs a CUDA GPU"]
fn small_all_epilogues() {
    let (_ctx, stream, rt) = setup();
    for fam in families(&rt) {
        for epi in Epilogue::ALL {
            let p = GroupedProblem::new(vec![0, 1, 130, 5], 128, 256, epi, 7);
            run_check(
                &rt,
                &stream,
                GemmVariant::new(fam, epi, Hooks::NONE),
                &p,
                "small",
            );
        }
        // N not a multiple of the tile width (64 < 128 < 192 < 256).
        let p = GroupedProblem::new(vec![3, 200], 192, 192, Epilogue::Store, 8);
        run_check(
            &rt,
            &stream,
            GemmVariant::new(fam, Epilogue::Store, Hooks::NONE),
            &p,
            "small N=192",
        );
        let p = GroupedProblem::new(vec![3, 200], 64, 192 * 2, Epilogue::SwiGlu, 9);
        run_check(
            &rt,
            &stream,
            GemmVariant::new(fam, Epilogue::SwiGlu, Hooks::NONE),
            &p,
            "small swiglu F=192",
        );
    }
}

/// Segments of each expert's rows, as the layout plan makes them: every
/// expert's rows cut into `per_expert` contiguous pieces, one signal each.
fn segments(counts: &[usize], per_expert: usize) -> Vec<(usize, usize)> {
    let mut segs = Vec::new();
    let mut start = 0;
    for &c in counts {
        let step = c.div_ceil(per_expert).max(1);
        let mut r = start;
        while r < start + c {
            let n = step.min(start + c - r);
            segs.push((r, n));
            r += n;
        }
        start += c;
    }
    segs
}

/// Tile list whose tiles depend on every segment their rows overlap.
fn tiles_with_deps(p: &GroupedProblem, v: &GemmVariant, segs: &[(usize, usize)]) -> TileList {
    let mut list = TileList::grouped(&p.counts, p.out_cols(), v).unwrap();
    // The padding tiles of clustered variants (no rows) wait on nothing.
    for t in list.tiles.iter_mut().filter(|t| t.rows > 0) {
        let (r0, r1) = (t.row0 as usize, (t.row0 + t.rows) as usize);
        t.dep_off = list.deps.len() as i32;
        for (i, &(s, n)) in segs.iter().enumerate() {
            if s < r1 && r0 < s + n {
                list.deps.push(i as u32);
            }
        }
        t.dep_cnt = list.deps.len() as i32 - t.dep_off;
    }
    list
}

/// A wait-hook launch whose A lands after it, segment by segment.
struct LateSegments<'a> {
    rt: &'a GemmRuntime,
    stream: &'a Arc<CudaStream>,
    /// The stream the rows and signals land from.
    copier: &'a Arc<CudaStream>,
    /// Each segment's (first row, rows); segment `i` has signal `i`.
    segs: &'a [(usize, usize)],
    epoch: u64,
    /// A segment whose rows land but whose signal is never raised.
    missing: Option<usize>,
    timeout_ns: u64,
}

impl LateSegments<'_> {
    /// Launches `v` over `dp` with A all NaN (a tile that reads before its
    /// signal is wrong) and the signals already at the previous epoch, as
    /// after an earlier call; then lands `p`'s A segment by segment in an
    /// order shuffled by the epoch, sleeping `pause` before each, and
    /// raises each segment's signal to the epoch after its rows. Returns
    /// how the launch finished (the signal words live until then).
    fn run(
        &self,
        dp: &DeviceProblem,
        v: &GemmVariant,
        p: &GroupedProblem,
        mut pause: impl FnMut(&mut ChaCha8Rng) -> Duration,
    ) -> Result<(), KernelError> {
        let (stream, copier, segs, epoch) = (self.stream, self.copier, self.segs, self.epoch);
        let nan = vec![half::bf16::NAN; dp.a.len()];
        copy_rows_async(stream, &dp.a, 0, &nan).unwrap();
        let signals = stream.clone_htod(&vec![epoch - 1; segs.len()]).unwrap();
        stream.synchronize().unwrap();
        let (sig_ptr, _g) = signals.device_ptr(stream);
        let hooks = HookArgs {
            signals: sig_ptr,
            deps: 0,
            wait_target: epoch,
            raise_value: 0,
            timeout_ns: self.timeout_ns,
        };
        dp.launch(self.rt, v, Some(hooks)).unwrap();
        let mut order: Vec<usize> = (0..segs.len()).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(epoch);
        order.shuffle(&mut rng);
        for &i in &order {
            std::thread::sleep(pause(&mut rng));
            let (r, n) = segs[i];
            copy_rows_async(copier, &dp.a, r * p.k, &p.a[r * p.k..(r + n) * p.k]).unwrap();
            if Some(i) != self.missing {
                raise_signal_async(copier, &signals, i, epoch).unwrap();
            }
        }
        copier.synchronize().unwrap();
        dp.finish()
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn wait_hook_waits_for_late_signals_in_random_order() {
    let (ctx, stream, rt) = setup();
    let copier = ctx.new_stream().unwrap();
    for fam in families(&rt) {
        for epoch in [1u64, 2] {
            let v = GemmVariant::new(
                fam,
                Epilogue::SwiGlu,
                Hooks {
                    wait: true,
                    raise: false,
                },
            );
            let p = GroupedProblem::new(
                vec![300, 0, 77, 1, 450],
                256,
                512,
                Epilogue::SwiGlu,
                40 + epoch,
            );
            let segs = segments(&p.counts, 3);
            let tiles = tiles_with_deps(&p, &v, &segs);
            let mut dp = DeviceProblem::upload(stream.clone(), &p, &v, &tiles).unwrap();
            dp.poison().unwrap();
            let late = LateSegments {
                rt: &rt,
                stream: &stream,
                copier: &copier,
                segs: &segs,
                epoch,
                missing: None,
                timeout_ns: 20_000_000_000,
            };
            late.run(&dp, &v, &p, |rng| {
                Duration::from_millis(rng.gen_range(1..15))
            })
            .unwrap();
            let out = dp.download_c().unwrap();
            let rep = p
                .check(&out, dp.ldc, 64)
                .unwrap_or_else(|e| panic!("{}: {e}", v.kernel_name()));
            println!(
                "ok   wait hook epoch {epoch} {} rel {:.2e}",
                v.kernel_name(),
                rep.rel_error
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn wait_hook_times_out_on_a_missing_signal() {
    let (_ctx, stream, rt) = setup();
    for fam in families(&rt) {
        let v = GemmVariant::new(
            fam,
            Epilogue::Store,
            Hooks {
                wait: true,
                raise: true,
            },
        );
        let p = GroupedProblem::new(vec![200, 100], 128, 256, Epilogue::Store, 3);
        let segs = segments(&p.counts, 2);
        let tiles = tiles_with_deps(&p, &v, &segs);
        let dp = DeviceProblem::upload(stream.clone(), &p, &v, &tiles).unwrap();
        let missing = 2usize;
        let init: Vec<u64> = (0..segs.len())
            .map(|i| if i == missing { 0 } else { 1 })
            .collect();
        let signals = stream.clone_htod(&init).unwrap();
        let (sig_ptr, _g) = signals.device_ptr(&stream);
        let hooks = HookArgs {
            signals: sig_ptr,
            deps: 0,
            wait_target: 1,
            raise_value: 1,
            timeout_ns: 50_000_000,
        };
        dp.launch(&rt, &v, Some(hooks)).unwrap();
        match dp.finish() {
            Err(KernelError::SignalTimeout { signal, .. }) => {
                assert_eq!(signal as usize, missing);
                println!("ok   timeout names signal {signal} ({})", v.kernel_name());
            }
            other => panic!(
                "{}: expected a timeout on signal {missing}, got {other:?}",
                v.kernel_name()
            ),
        }
    }
}

/// Launches `v` (a raise-hook variant) over `dp` with `signals` zeroed
/// signal words and set-mode raises of `raise_value`; returns the words
/// once the kernel is done.
fn launch_raising(
    rt: &GemmRuntime,
    stream: &Arc<CudaStream>,
    dp: &DeviceProblem,
    v: &GemmVariant,
    signals: usize,
    raise_value: u64,
) -> Vec<u64> {
    let words = stream.alloc_zeros::<u64>(signals).unwrap();
    let (ptr, _g) = words.device_ptr(stream);
    let hooks = HookArgs {
        signals: ptr,
        deps: 0,
        wait_target: 0,
        raise_value,
        timeout_ns: 1_000_000_000,
    };
    dp.launch(rt, v, Some(hooks)).unwrap();
    dp.finish().unwrap();
    drop(_g);
    stream.clone_dtoh(&words).unwrap()
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn raise_hook_counts_and_stores() {
    let (_ctx, stream, rt) = setup();
    for fam in families(&rt) {
        let v = GemmVariant::new(
            fam,
            Epilogue::Store,
            Hooks {
                wait: false,
                raise: true,
            },
        );
        let p = GroupedProblem::new(vec![129, 0, 64, 300], 128, 512, Epilogue::Store, 11);
        let mut tiles = TileList::grouped(&p.counts, p.out_cols(), &v).unwrap();
        // Column chunk c of the output counts its tiles on signal c (add);
        // tiles of expert 2 also store the epoch into signal 8 (set).
        let bn = v.tile_out_cols() as i32;
        let mut want = vec![0u64; 9];
        for t in tiles.tiles.iter_mut().filter(|t| t.rows > 0) {
            if t.expert == 2 {
                t.sig = 8;
                t.sig_mode = 0;
                want[8] = 7;
            } else {
                t.sig = t.n0 / bn;
                t.sig_mode = 1;
                want[t.sig as usize] += 1;
            }
        }
        let dp = DeviceProblem::upload(stream.clone(), &p, &v, &tiles).unwrap();
        let got = launch_raising(&rt, &stream, &dp, &v, 9, 7);
        assert_eq!(got, want, "{}", v.kernel_name());
        let out = dp.download_c().unwrap();
        p.check(&out, dp.ldc, 32)
            .unwrap_or_else(|e| panic!("{}: {e}", v.kernel_name()));
        println!("ok   raise hook {} counters {:?}", v.kernel_name(), got);
    }
}

/// Tile lists built from comet-core's real schedules drive the hooks:
/// layer0 (FC1 + SwiGLU) waits on dispatch signals raised segment by
/// segment in shuffled order after the rows land; layer1 (FC2) counts its
/// tiles on the chunk counters the schedule names.
#[test]
#[ignore = "needs a CUDA GPU"]
fn schedules_from_comet_core_drive_the_hooks() {
    use comet_core::schedule::{Layer0Schedule, Layer1Schedule, SignalMap, TileShape};
    use comet_core::{LayoutPlan, Routing, RoutingKind};
    let (ctx, stream, rt) = setup();
    let copier = ctx.new_stream().unwrap();
    let cfg = Preset::Phi35Moe.config(2).unwrap().scaled_down(4);
    let routings: Vec<Routing> = (0..2)
        .map(|r| Routing::generate(&cfg, r, 700, RoutingKind::Zipf(1.1), 5))
        .collect();
    let plan = LayoutPlan::from_routings(&cfg, &routings).unwrap();
    let recv = &plan.recv[0];
    let counts = recv.expert_rows.clone();
    for fam in families(&rt) {
        let v0 = GemmVariant::new(
            fam,
            Epilogue::SwiGlu,
            Hooks {
                wait: true,
                raise: false,
            },
        );
        let shape = TileShape {
            bm: 128,
            chunk_cols: 2 * v0.tile_gemm_cols(),
            groups: 1,
        };
        let signals_map = SignalMap::new(&cfg, shape.pieces(&cfg));
        let l0 = Layer0Schedule::new(&plan, 0, shape, &signals_map);
        let p = GroupedProblem::new(
            counts.clone(),
            cfg.hidden,
            2 * cfg.ffn,
            Epilogue::SwiGlu,
            77,
        );
        let tiles = TileList::layer0(&l0, cfg.ffn, &v0).unwrap();
        let dp = DeviceProblem::upload(stream.clone(), &p, &v0, &tiles).unwrap();
        let nan = vec![half::bf16::NAN; dp.a.len()];
        copy_rows_async(&stream, &dp.a, 0, &nan).unwrap();
        let signals = stream.alloc_zeros::<u64>(signals_map.len()).unwrap();
        stream.synchronize().unwrap();
        let (sig_ptr, _g) = signals.device_ptr(&stream);
        let hooks = HookArgs {
            signals: sig_ptr,
            deps: 0,
            wait_target: 1,
            raise_value: 0,
            timeout_ns: 20_000_000_000,
        };
        dp.launch(&rt, &v0, Some(hooks)).unwrap();
        let mut segs: Vec<_> = recv.segments.iter().filter(|s| s.rows > 0).collect();
        segs.shuffle(&mut ChaCha8Rng::seed_from_u64(9));
        for s in segs {
            std::thread::sleep(Duration::from_millis(3));
            copy_rows_async(
                &copier,
                &dp.a,
                s.row * p.k,
                &p.a[s.row * p.k..(s.row + s.rows) * p.k],
            )
            .unwrap();
            raise_signal_async(
                &copier,
                &signals,
                signals_map.dispatch(s.expert, s.src) as usize,
                1,
            )
            .unwrap();
        }
        // Tiles depend only on segments that carry rows: nothing else is raised.
        copier.synchronize().unwrap();
        dp.finish().unwrap();
        p.check(&dp.download_c().unwrap(), dp.ldc, 48)
            .unwrap_or_else(|e| panic!("layer0 {}: {e}", v0.kernel_name()));

        let v1 = GemmVariant::new(
            fam,
            Epilogue::Store,
            Hooks {
                wait: false,
                raise: true,
            },
        );
        let l1 = Layer1Schedule::new(&plan, 0, shape, &signals_map);
        let (tiles1, per_chunk) = TileList::layer1(&l1, &v1).unwrap();
        let p1 = GroupedProblem::new(counts.clone(), cfg.ffn, cfg.hidden, Epilogue::Store, 78);
        let dp1 = DeviceProblem::upload(stream.clone(), &p1, &v1, &tiles1).unwrap();
        let counters = stream.alloc_zeros::<u64>(signals_map.len()).unwrap();
        let (cptr, _g1) = counters.device_ptr(&stream);
        let hooks = HookArgs {
            signals: cptr,
            deps: 0,
            wait_target: 0,
            raise_value: 0,
            timeout_ns: 1_000_000_000,
        };
        dp1.launch(&rt, &v1, Some(hooks)).unwrap();
        dp1.finish().unwrap();
        drop(_g1);
        let got = stream.clone_dtoh(&counters).unwrap();
        for (c, chunk) in l1.chunks.iter().enumerate() {
            assert_eq!(
                got[chunk.done_signal as usize], per_chunk[c],
                "chunk {c} counter"
            );
        }
        p1.check(&dp1.download_c().unwrap(), dp1.ldc, 48)
            .unwrap_or_else(|e| panic!("layer1 {}: {e}", v1.kernel_name()));
        println!(
            "ok   schedules {} + {}: {} + {} tiles, chunks {:?}",
            v0.kernel_name(),
            v1.kernel_name(),
            tiles.tiles.len(),
            tiles1.tiles.len(),
            per_chunk
        );
    }
}

/// A second tile list over one upload (the benchmark's SwiGLU column): a
/// SwiGLU launch over a plain-store problem's A and B writes the SwiGLU
/// outputs into C's first N/2 columns; a list wider than C is refused.
#[test]
#[ignore = "needs a CUDA GPU"]
fn second_tile_list_over_one_upload() {
    let (_ctx, stream, rt) = setup();
    let counts = ragged_counts(5);
    for family in families(&rt) {
        let v = GemmVariant::new(family, Epilogue::Store, Hooks::NONE);
        let vs = GemmVariant::new(family, Epilogue::SwiGlu, Hooks::NONE);
        let p = GroupedProblem::new(counts.clone(), 256, 512, Epilogue::Store, 77);
        // Same seed and shapes: the same A and B, checked as SwiGLU.
        let ps = GroupedProblem::new(counts.clone(), 256, 512, Epilogue::SwiGlu, 77);
        let tiles = TileList::grouped(&p.counts, p.out_cols(), &v).unwrap();
        let mut dp = DeviceProblem::upload(stream.clone(), &p, &v, &tiles).unwrap();
        dp.enable_split(&rt, &[v, vs]).unwrap();
        let st = dp
            .upload_tiles(&TileList::grouped(&p.counts, p.n / 2, &vs).unwrap(), &vs)
            .unwrap();
        for _ in 0..2 {
            dp.poison().unwrap();
            dp.launch_tiles(&rt, &vs, &st, None).unwrap();
            dp.finish().unwrap();
            let out = dp.download_c().unwrap();
            if let Err(e) = ps.check(&out, dp.ldc, 32) {
                panic!("{}: {e}", vs.kernel_name());
            }
        }

        let tiles_s = TileList::grouped(&ps.counts, ps.out_cols(), &vs).unwrap();
        let narrow = DeviceProblem::upload(stream.clone(), &ps, &vs, &tiles_s).unwrap();
        let wide = TileList::grouped(&ps.counts, ps.n, &v).unwrap();
        match narrow.upload_tiles(&wide, &v) {
            Err(KernelError::InvalidShape(m)) => assert!(m.contains("do not fit"), "{m}"),
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("a store list wider than C was accepted"),
        }
    }
}

/// The staged proxy's token kernels against the host (comet-sched's
/// staged.rs does the same on a host without them): `comet_sum_rows` sums a
/// piece's rows (2-D: narrower than their pitch) per slot, each scaled by
/// its ratio, equal to f32 products and sums in row order rounded once to
/// bf16, bit for bit; `comet_expand_rows` lands slot rows, or zeros, into
/// rows with a pitch and leaves the bytes between them alone. Outputs
/// poisoned with NaN first.
#[test]
#[ignore = "needs a CUDA GPU"]
fn token_kernels_sum_and_expand_pieces() {
    use comet_kernels::forward::{Rows, SlotSums};
    use half::bf16;
    let (stream, k) = forward_setup();
    let mut rng = ChaCha8Rng::seed_from_u64(0x70CE);
    let (rows, slots, width, pitch) = (37usize, 11usize, 64usize, 160usize); // bf16 columns
    let src: Vec<bf16> = (0..rows * pitch)
        .map(|_| bf16::from_f32(rng.gen_range(-2.0f32..2.0)))
        .collect();
    let index: Vec<u32> = (0..rows).map(|_| rng.gen_range(0..slots as u32)).collect();
    let ratio: Vec<f32> = (0..rows).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let mut starts = vec![0u32; slots + 1];
    for &s in &index {
        starts[s as usize + 1] += 1;
    }
    for s in 0..slots {
        starts[s + 1] += starts[s];
    }
    let index = &index;
    let by_slot: Vec<u32> = (0..slots as u32)
        .flat_map(|s| (0..rows as u32).filter(move |&r| index[r as usize] == s))
        .collect();
    // The host's sums: row order within a slot, products and sums rounded apart.
    let mut want = vec![0f32; slots * width];
    for (r, &s) in index.iter().enumerate() {
        for c in 0..width {
            let x = ratio[r] * src[r * pitch + c].to_f32();
            want[s as usize * width + c] += x;
        }
    }
    let nan = bf16::from_bits(0xFFFF);
    let d_src = stream.clone_htod(&src).unwrap();
    let d_starts = stream.clone_htod(&starts).unwrap();
    let d_rows = stream.clone_htod(&by_slot).unwrap();
    let d_ratio = stream.clone_htod(&ratio).unwrap();
    let d_sums = stream.clone_htod(&vec![nan; slots * width]).unwrap();
    let (src_p, _a) = d_src.device_ptr(&stream);
    let (starts_p, _b) = d_starts.device_ptr(&stream);
    let (rows_p, _c) = d_rows.device_ptr(&stream);
    let (ratio_p, _d) = d_ratio.device_ptr(&stream);
    let (sums_p, _e) = d_sums.device_ptr(&stream);
    let piece = Rows {
        at: src_p,
        rows,
        width: 2 * width,
        pitch: 2 * pitch,
    };
    let tables = SlotSums {
        starts: starts_p,
        rows: rows_p,
        ratio: ratio_p,
        dst: sums_p,
        slots,
    };
    // SAFETY: every pointer is a live allocation of this context sized as
    // the call says (src rows * pitch, slots + 1 starts, rows entries and
    // ratios, slots sums), untouched until the stream synchronizes.
    unsafe { k.sum_rows(piece, tables, stream.cu_stream()) }.unwrap();
    stream.synchronize().unwrap();
    let got = stream.clone_dtoh(&d_sums).unwrap();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            g.to_bits(),
            bf16::from_f32(*w).to_bits(),
            "sum {i}: {g} against {w}"
        );
    }

    // Expand: 29 rows, each a slot or a zero row, into rows 160 columns apart.
    let n = 29usize;
    let land: Vec<u32> = (0..n)
        .map(|_| {
            if rng.gen_bool(0.3) {
                u32::MAX
            } else {
                rng.gen_range(0..slots as u32)
            }
        })
        .collect();
    let d_land = stream.clone_htod(&land).unwrap();
    let d_out = stream.clone_htod(&vec![nan; n * pitch]).unwrap();
    let (land_p, _f) = d_land.device_ptr(&stream);
    let (out_p, _g) = d_out.device_ptr(&stream);
    let dst = Rows {
        at: out_p,
        rows: n,
        width: 2 * width,
        pitch: 2 * pitch,
    };
    // SAFETY: as above; `land` names only slots the sums hold.
    unsafe { k.expand_rows(sums_p, land_p, dst, stream.cu_stream()) }.unwrap();
    stream.synchronize().unwrap();
    let out = stream.clone_dtoh(&d_out).unwrap();
    for (r, &s) in land.iter().enumerate() {
        for c in 0..pitch {
            let g = out[r * pitch + c].to_bits();
            let w = match (c < width, s) {
                (false, _) => 0xFFFF,
                (true, u32::MAX) => 0,
                (true, s) => got[s as usize * width + c].to_bits(),
            };
            assert_eq!(g, w, "row {r} (slot {s}), column {c}");
        }
    }
}

/// A gathered A (one rank's FC1 reading x in place): tile row r reads row
/// rows[r] of a source with fewer rows, every family that takes one CTA
/// per tile, SwiGLU and store epilogues, ragged counts (partial and empty
/// tiles). The output matches the f64 reference over the gathered rows and
/// equals, bit for bit, the same GEMM over those rows materialised (same
/// operands, same order of the math). Output poisoned first. A clustered
/// variant refuses a gather.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gathered_rows_equal_materialised_rows() {
    let (_ctx, stream, rt) = setup();
    let mut rng = ChaCha8Rng::seed_from_u64(91);
    // Small; and more tiles than CTAs with 16 k-blocks a tile, so every
    // ring slot is reused and producers run on into further tiles.
    let shapes = [
        (vec![0, 1, 130, 5, 257], 256, Epilogue::SwiGlu),
        (vec![0, 1, 130, 5, 257], 256, Epilogue::Store),
        (vec![20000, 3, 900], 1024, Epilogue::SwiGlu),
    ];
    for family in families(&rt) {
        for (counts, k, epi) in &shapes {
            let (counts, k, epi) = (counts.clone(), *k, *epi);
            let n = if epi == Epilogue::SwiGlu { 384 } else { 192 };
            let mut p = GroupedProblem::new(counts, k, n, epi, 13);
            let (k, src_rows) = (p.k, 97);
            let src: Vec<half::bf16> = (0..src_rows * k)
                .map(|_| half::bf16::from_f32(rng.gen_range(-1.0f32..1.0)))
                .collect();
            let rows: Vec<i32> = (0..p.rows())
                .map(|_| rng.gen_range(0..src_rows as i32))
                .collect();
            for (r, &s) in rows.iter().enumerate() {
                let s = s as usize;
                p.a[r * k..(r + 1) * k].copy_from_slice(&src[s * k..(s + 1) * k]);
            }
            let v = GemmVariant::new(family, epi, Hooks::NONE);
            let tiles = TileList::grouped(&p.counts, p.out_cols(), &v).unwrap();
            let mut dp = DeviceProblem::upload(stream.clone(), &p, &v, &tiles).unwrap();
            dp.launch(&rt, &v, None).unwrap();
            dp.finish().unwrap();
            let materialised = dp.download_c().unwrap();
            dp.enable_gather(&src, src_rows, &rows).unwrap();
            dp.poison().unwrap();
            let launched = dp.launch(&rt, &v, None);
            if v.cluster() > 1 {
                match launched {
                    Err(KernelError::InvalidShape(m)) => assert!(m.contains("clusters"), "{m}"),
                    other => panic!("{}: a clustered gather ran: {other:?}", v.kernel_name()),
                }
                continue;
            }
            launched.unwrap();
            dp.finish().unwrap();
            let gathered = dp.download_c().unwrap();
            if let Err(e) = p.check(&gathered, dp.ldc, 64) {
                panic!("gather {}: {e}", v.kernel_name());
            }
            let bits = |c: &[half::bf16]| c.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert!(
                bits(&gathered) == bits(&materialised),
                "gather {}: output differs from the materialised rows'",
                v.kernel_name()
            );
            println!("ok   gather {}", v.kernel_name());
        }
    }
}

/// Pinned host memory the device maps (with unified addressing, at the same
/// address): what a staged proxy's staging and inboxes are.
struct MappedHost {
    ptr: *mut u8,
    len: usize,
}

impl MappedHost {
    fn new(len: usize, fill: u8) -> MappedHost {
        // SAFETY: a plain pinned allocation of `len` bytes, filled at once.
        let ptr = unsafe { cudarc::driver::result::malloc_host(len, 0) }.unwrap() as *mut u8;
        // SAFETY: freshly allocated, `len` bytes.
        unsafe { std::ptr::write_bytes(ptr, fill, len) };
        MappedHost { ptr, len }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: live, `len` bytes, read after the stream synchronized.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for MappedHost {
    fn drop(&mut self) {
        // SAFETY: allocated by malloc_host, freed once, after the stream ran.
        let _ = unsafe { cudarc::driver::result::free_host(self.ptr.cast()) };
    }
}

/// The staged proxy's copy kernel, both ways: strided device rows packed
/// into mapped host memory and back into a second device buffer at another
/// pitch, with moves of 16, 4 and 1 bytes (what the addresses, pitches and
/// width allow), and rows from registered host memory. Destinations
/// poisoned first; bytes between rows must stay poisoned.
#[test]
#[ignore = "needs a CUDA GPU"]
fn copy_rows_between_device_and_mapped_host_memory() {
    use comet_kernels::forward::Rows;
    let (stream, k) = forward_setup();
    let mut rng = ChaCha8Rng::seed_from_u64(0xC0B1);
    // (rows, width, source pitch, destination pitch, offset into both)
    for (rows, width, sp, dp, off) in [
        (37usize, 64usize, 160usize, 96usize, 0usize),
        (300, 36, 100, 40, 4),
        (5, 13, 29, 17, 3),
        (1, 4096, 4096, 4096, 16),
    ] {
        let label = format!("{rows} rows of {width} bytes, pitches {sp} -> {dp}, offset {off}");
        let src: Vec<u8> = (0..off + rows * sp).map(|_| rng.gen()).collect();
        let d_src = stream.clone_htod(&src).unwrap();
        let d_back = stream.clone_htod(&vec![0xABu8; off + rows * dp]).unwrap();
        let host = MappedHost::new(off + rows * width, 0xCD);
        let (src_p, _a) = d_src.device_ptr(&stream);
        let (back_p, _b) = d_back.device_ptr(&stream);
        let at = |p: u64, pitch: usize| Rows {
            at: p + off as u64,
            rows,
            width,
            pitch,
        };
        let packed = at(host.ptr as u64, width);
        // SAFETY: every row set lies inside its live allocation (sizes
        // above), the host one pinned and mapped at its own address; none
        // is touched until the stream synchronizes.
        unsafe {
            k.copy_rows(at(src_p, sp), packed, stream.cu_stream())
                .unwrap();
            k.copy_rows(packed, at(back_p, dp), stream.cu_stream())
                .unwrap();
        }
        stream.synchronize().unwrap();
        let h = host.bytes();
        assert!(
            h[..off].iter().all(|&b| b == 0xCD),
            "{label}: before the rows"
        );
        let back = stream.clone_dtoh(&d_back).unwrap();
        for r in 0..rows {
            let want = &src[off + r * sp..off + r * sp + width];
            assert_eq!(
                &h[off + r * width..off + (r + 1) * width],
                want,
                "{label}: host row {r}"
            );
            assert_eq!(
                &back[off + r * dp..off + r * dp + width],
                want,
                "{label}: device row {r}"
            );
            let gap = &back[off + r * dp + width..(off + (r + 1) * dp).min(back.len())];
            assert!(
                gap.iter().all(|&b| b == 0xAB),
                "{label}: between rows after {r}"
            );
        }
        assert!(
            back[..off].iter().all(|&b| b == 0xAB),
            "{label}: before the rows"
        );
    }
    // From memory someone else allocated, registered with the driver and
    // mapped (a staged proxy's inbox on UCX), at an offset no vector fits.
    {
        use cudarc::driver::sys;
        let (rows, width, pitch, off) = (9usize, 48usize, 80usize, 5usize);
        let inbox: Vec<u8> = (0..off + rows * width).map(|_| rng.gen()).collect();
        let d_dst = stream.clone_htod(&vec![0xABu8; rows * pitch]).unwrap();
        let (dst_p, _d) = d_dst.device_ptr(&stream);
        let flags = sys::CU_MEMHOSTREGISTER_PORTABLE | sys::CU_MEMHOSTREGISTER_DEVICEMAP;
        let mut mapped: u64 = 0;
        // SAFETY: `inbox` is live and not moved or dropped until it is
        // unregistered below, after the stream ran the copy.
        unsafe {
            sys::cuMemHostRegister_v2(inbox.as_ptr() as *mut _, inbox.len(), flags)
                .result()
                .unwrap();
            sys::cuMemHostGetDevicePointer_v2(&mut mapped, inbox.as_ptr() as *mut _, 0)
                .result()
                .unwrap();
            let src = Rows {
                at: mapped + off as u64,
                rows,
                width,
                pitch: width,
            };
            let dst = Rows {
                at: dst_p,
                rows,
                width,
                pitch,
            };
            k.copy_rows(src, dst, stream.cu_stream()).unwrap();
            stream.synchronize().unwrap();
            sys::cuMemHostUnregister(inbox.as_ptr() as *mut _)
                .result()
                .unwrap();
        }
        let back = stream.clone_dtoh(&d_dst).unwrap();
        for r in 0..rows {
            let want = &inbox[off + r * width..off + (r + 1) * width];
            assert_eq!(
                &back[r * pitch..r * pitch + width],
                want,
                "registered: row {r}"
            );
            assert!(
                back[r * pitch + width..(r + 1) * pitch]
                    .iter()
                    .all(|&b| b == 0xAB),
                "registered: between rows after {r}"
            );
        }
    }
    // Rows of different shapes, or overlapping ones, are refused before
    // anything is enqueued.
    let bad = Rows {
        at: 0,
        rows: 2,
        width: 16,
        pitch: 16,
    };
    // SAFETY: refused before any launch.
    let e = unsafe { k.copy_rows(bad, Rows { rows: 3, ..bad }, stream.cu_stream()) };
    assert!(e.is_err());
    // SAFETY: refused before any launch.
    let e = unsafe { k.copy_rows(bad, Rows { pitch: 8, ..bad }, stream.cu_stream()) };
    assert!(e.is_err());
}
