//! Device half of the signal ABI across processes: the blocks of one kernel
//! on rank 0 wait (comet-kernels `signal.cuh`, bounded) on signals that
//! OTHER PROCESSES raise through the `nvlink` transport after putting the
//! rows each block consumes; a signal nobody raises makes the kernel record
//! a timeout naming it and exit instead of hanging.
//!
//! All ranks share one GPU on a single-GPU machine (CUDA IPC between
//! processes); the code does not assume it. The tests need a CUDA device,
//! so they are ignored by default (counted as ignored, not passed); run
//! them on a GPU machine with `--include-ignored`, where a missing device
//! is a failure. The parent tests re-launch this binary; `gpu_child_rank`
//! is the child entry point, inert unless `COMET_SCHED_GPU_CHILD` is set,
//! and every rank prints a marker line that the parent checks.

use comet_transport::bootstrap::Bootstrap;
use comet_transport::cuda;
use comet_transport::gpu::{BlobExchange, DeviceTransport};
use comet_transport::launch::{launch, LaunchConfig};
use comet_transport::nvlink::{NvlinkOptions, NvlinkTransport};
use comet_transport::{SignalOp, Transport};
use cudarc::driver::{LaunchConfig as Grid, PushKernelArg};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;
use std::time::Duration;

const CHILD_ENV: &str = "COMET_SCHED_GPU_CHILD";
const T: Duration = Duration::from_secs(60);
const ROWS: usize = 96;
const COLS: usize = 1000;
const EPOCHS: u64 = 4;
const SIGNAL_TIMEOUT: u64 = 1 << 32; // COMET_ERR_SIGNAL_TIMEOUT (1) in the high word

const SIGNAL_CUH: &str = include_str!("../../comet-kernels/kernels/signal.cuh");

// Block b consumes row b once signal `first_sig + b` reaches `epoch`; a
// block whose wait fails leaves its row untouched (still poisoned).
const KERNEL: &str = r#"
extern "C" __global__ void consume_rows(const unsigned long long* signals, const float* data, float* out,
                                        unsigned cols, unsigned long long epoch,
                                        unsigned long long timeout_ns, unsigned long long* err) {
  __shared__ int ok;
  const unsigned row = blockIdx.x;
  const unsigned dep = row;
  if (!comet::signal_wait_block(signals, &dep, 1u, epoch, timeout_ns, err, &ok)) return;
  for (unsigned c = threadIdx.x; c < cols; c += blockDim.x)
    out[(size_t)row * cols + c] = data[(size_t)row * cols + c] * 2.0f + 1.0f;
}
"#;

/// These tests run only when asked for (`--ignored`): without a device
/// that is a failure, not a skip.
fn require_gpu() {
    assert!(
        cuda::gpu_available(),
        "this test needs a CUDA driver and device (none found)"
    );
}

fn row_data(epoch: u64, row: usize) -> Vec<f32> {
    let mut r = ChaCha8Rng::seed_from_u64(0x5161 ^ (epoch << 16) ^ row as u64);
    (0..COLS).map(|_| r.gen_range(-1.0f32..1.0)).collect()
}

fn producer_of(row: usize, world: usize) -> usize {
    1 + row % (world - 1)
}

fn as_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn consumer(t: &NvlinkTransport, data: comet_transport::BufferId, out: comet_transport::BufferId) {
    let ctx = t.context().clone();
    let arch: &'static str = match ctx.compute_capability().expect("compute capability") {
        (9, _) => "compute_90",
        (8, _) => "compute_80",
        _ => "compute_75",
    };
    let src = format!("{SIGNAL_CUH}\nusing namespace comet;\n{KERNEL}");
    let ptx = compile_ptx_with_opts(
        src,
        CompileOptions {
            arch: Some(arch),
            ..Default::default()
        },
    )
    .expect("nvrtc");
    let f = ctx
        .load_module(ptx)
        .expect("load module")
        .load_function("consume_rows")
        .expect("function");
    let stream = ctx.new_stream().expect("kernel stream");
    let signals = t.signals_ptr().expect("signals");
    let data_ptr = t.buffer_ptr(data).expect("data");
    let out_ptr = t.buffer_ptr(out).expect("out");
    let err = t.error_word_ptr();
    let cols = COLS as u32;
    let nan = as_bytes(&vec![f32::NAN; ROWS * COLS]);
    let launch_rows = |rows: usize, epoch: u64, timeout_ns: u64| {
        let mut b = stream.launch_builder(&f);
        b.arg(&signals)
            .arg(&data_ptr)
            .arg(&out_ptr)
            .arg(&cols)
            .arg(&epoch)
            .arg(&timeout_ns)
            .arg(&err);
        let grid = Grid {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match consume_rows' parameters; every
        // pointer is a live allocation of the transport sized for `rows`.
        unsafe { b.launch(grid) }.expect("launch");
    };
    for epoch in 1..=EPOCHS {
        t.put(0, out, 0, &nan).expect("poison");
        t.barrier(T).expect("barrier A");
        // Launched before any producer starts: the blocks really wait.
        launch_rows(ROWS, epoch, 30_000_000_000);
        t.barrier(T).expect("barrier B");
        stream.synchronize().expect("kernel");
        assert_eq!(
            t.read_error_word().expect("error word"),
            0,
            "epoch {epoch}: a block timed out"
        );
        let mut raw = vec![0u8; ROWS * COLS * 4];
        t.read(out, 0, &mut raw).expect("read out");
        for row in 0..ROWS {
            let want = row_data(epoch, row);
            for (c, x) in want.iter().enumerate() {
                let o = 4 * (row * COLS + c);
                let got = f32::from_le_bytes(raw[o..o + 4].try_into().expect("4 bytes"));
                // 2x is exact, so the fused and unfused forms agree: tolerance 0.
                assert_eq!(
                    got.to_bits(),
                    (x * 2.0 + 1.0).to_bits(),
                    "epoch {epoch} row {row} col {c}: got {got}"
                );
            }
        }
        t.barrier(T).expect("barrier C");
    }
    // One extra block waits on a signal no rank ever raises: it must record
    // the timeout naming that signal and the kernel must end.
    t.clear_error_word().expect("clear");
    launch_rows(ROWS + 1, EPOCHS, 100_000_000);
    stream
        .synchronize()
        .expect("kernel with a missing signal ends");
    let e = t.read_error_word().expect("error word");
    assert_eq!(e, SIGNAL_TIMEOUT | ROWS as u64, "error word {e:#x}");
    println!("rank 0: {EPOCHS} epochs checked; missing signal {ROWS} reported as {e:#x}");
    t.barrier(T).expect("final barrier");
}

fn producer(t: &NvlinkTransport, data: comet_transport::BufferId) {
    let me = t.rank();
    let mut rng = ChaCha8Rng::seed_from_u64(me as u64);
    for epoch in 1..=EPOCHS {
        t.barrier(T).expect("barrier A");
        t.barrier(T).expect("barrier B");
        let mut rows: Vec<usize> = (0..ROWS)
            .filter(|&r| producer_of(r, t.world()) == me)
            .collect();
        rows.shuffle(&mut rng);
        for row in rows {
            t.put(0, data, row * COLS * 4, &as_bytes(&row_data(epoch, row)))
                .expect("put row");
            t.signal(0, row as u32, SignalOp::Set(epoch))
                .expect("signal row");
            if rng.gen_bool(0.2) {
                std::thread::sleep(Duration::from_micros(rng.gen_range(0..2000)));
            }
        }
        t.synchronize().expect("sync");
        t.barrier(T).expect("barrier C");
    }
    t.barrier(T).expect("final barrier");
    println!("rank {me}: produced {EPOCHS} epochs");
}

/// Entry point of one launched rank (inert without `COMET_SCHED_GPU_CHILD`).
#[test]
#[ignore = "a rank of a multi-process test, started by the launcher"]
fn gpu_child_rank() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let boot = Arc::new(Bootstrap::from_env().expect("bootstrap"));
    let ordinal = boot.rank() % cuda::device_count().max(1);
    let t = NvlinkTransport::new(
        ordinal,
        boot as Arc<dyn BlobExchange>,
        NvlinkOptions::default(),
    )
    .expect("nvlink");
    let data = t.alloc_buffer(ROWS * COLS * 4).expect("data");
    let out = t.alloc_buffer(ROWS * COLS * 4).expect("out");
    t.alloc_signals(ROWS + 1).expect("signals");
    if t.rank() == 0 {
        consumer(&t, data, out);
    } else {
        producer(&t, data);
    }
    t.shutdown(T).expect("shutdown");
}

fn run(w: usize) {
    require_gpu();
    let exe = std::env::current_exe().expect("test binary");
    let mut cfg = LaunchConfig {
        timeout: Some(Duration::from_secs(240)),
        ..LaunchConfig::new(w, exe)
    }
    .args([
        "--exact",
        "gpu_child_rank",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD_ENV, "1");
    cfg.capture = true;
    let rep = launch(&cfg).unwrap_or_else(|e| panic!("{e}"));
    for r in &rep.ranks {
        // The consumer's line carries what it checked; producers say they ran.
        let want = if r.rank == 0 {
            format!("rank 0: {EPOCHS} epochs checked")
        } else {
            format!("rank {}: produced {EPOCHS} epochs", r.rank)
        };
        assert!(
            r.success() && r.output.iter().any(|l| l.contains(&want)),
            "rank {} ({}) did not print {want:?}:\n{}",
            r.rank,
            r.describe(),
            r.text()
        );
    }
}

#[test]
#[ignore = "needs a GPU"]
fn kernel_waits_on_signals_raised_by_another_process() {
    run(2);
}

#[test]
#[ignore = "needs a GPU"]
fn kernel_waits_on_signals_raised_by_two_other_processes() {
    run(3);
}
