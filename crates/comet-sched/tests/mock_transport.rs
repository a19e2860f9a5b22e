//! The executor against a mockall transport: signals must be raised in
//! schedule order (each chunk's combine signal only after all of that
//! chunk's tiles counted), and a transport failure must surface as an error.

use comet_core::reference::{max_error, moe_layer};
use comet_core::routing::RoutingKind;
use comet_core::schedule::{Layer1Schedule, SignalMap, TileShape};
use comet_core::weights::random_tokens;
use comet_core::{ExpertWeights, LayoutPlan, MoeConfig, Routing};
use comet_sched::{CpuRank, ExecMode, ExecOptions, SchedError};
use comet_transport::{
    BufferId, Capabilities, Initiation, MockTransport, SignalId, SignalOp, Transport,
    TransportError,
};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Memory behind the mock: buffers, signal words and the log of raises.
#[derive(Default)]
struct Mem {
    bufs: Vec<Vec<u8>>,
    sigs: Vec<u64>,
    log: Vec<(u32, SignalOp)>,
}

fn mock_with_memory(
    mem: Arc<(Mutex<Mem>, Condvar)>,
    fail_puts_after: Option<usize>,
) -> MockTransport {
    let mut t = MockTransport::new();
    t.expect_rank().return_const(0usize);
    t.expect_world().return_const(1usize);
    t.expect_capabilities().returning(|| Capabilities {
        name: "mock",
        initiation: Initiation::Host,
        device_memory: false,
    });
    let m = mem.clone();
    t.expect_alloc_buffer().returning(move |bytes| {
        let mut g = m.0.lock().unwrap();
        g.bufs.push(vec![0; bytes]);
        Ok(BufferId(g.bufs.len() as u32 - 1))
    });
    let m = mem.clone();
    t.expect_alloc_signals().returning(move |n| {
        m.0.lock().unwrap().sigs = vec![0; n];
        Ok(())
    });
    t.expect_barrier().returning(|_| Ok(()));
    let m = mem.clone();
    let puts = Arc::new(Mutex::new(0usize));
    t.expect_put().returning(move |_dst, buf, off, data| {
        let mut n = puts.lock().unwrap();
        *n += 1;
        if fail_puts_after.is_some_and(|k| *n > k) {
            return Err(TransportError::Backend {
                backend: "mock",
                rank: 0,
                message: "link down".into(),
            });
        }
        m.0.lock().unwrap().bufs[buf.0 as usize][off..off + data.len()].copy_from_slice(data);
        Ok(())
    });
    let m = mem.clone();
    t.expect_signal().returning(move |_dst, sig, op| {
        let mut g = m.0.lock().unwrap();
        match op {
            SignalOp::Set(v) => g.sigs[sig as usize] = v,
            SignalOp::Add(v) => g.sigs[sig as usize] += v,
        }
        g.log.push((sig, op));
        m.1.notify_all();
        Ok(())
    });
    let m = mem;
    t.expect_read().returning(move |buf, off, out| {
        out.copy_from_slice(&m.0.lock().unwrap().bufs[buf.0 as usize][off..off + out.len()]);
        Ok(())
    });
    t
}

/// mockall serialises calls of one method, so a wait blocking inside the
/// mock would stall the other worker's waits: waits are served here, on
/// the same memory, and every other call goes through the mock.
struct Waiting {
    mock: MockTransport,
    mem: Arc<(Mutex<Mem>, Condvar)>,
}

impl Transport for Waiting {
    fn rank(&self) -> usize {
        self.mock.rank()
    }
    fn world(&self) -> usize {
        self.mock.world()
    }
    fn capabilities(&self) -> Capabilities {
        self.mock.capabilities()
    }
    fn alloc_buffer(&self, bytes: usize) -> Result<BufferId, TransportError> {
        self.mock.alloc_buffer(bytes)
    }
    fn alloc_signals(&self, count: usize) -> Result<(), TransportError> {
        self.mock.alloc_signals(count)
    }
    fn put(
        &self,
        dst: usize,
        buf: BufferId,
        offset: usize,
        data: &[u8],
    ) -> Result<(), TransportError> {
        self.mock.put(dst, buf, offset, data)
    }
    fn signal(&self, dst: usize, sig: SignalId, op: SignalOp) -> Result<(), TransportError> {
        self.mock.signal(dst, sig, op)
    }
    fn wait(&self, sig: SignalId, target: u64, timeout: Duration) -> Result<u64, TransportError> {
        let start = Instant::now();
        let mut g = self.mem.0.lock().unwrap();
        while g.sigs[sig as usize] < target {
            let observed = g.sigs[sig as usize];
            let left = timeout
                .checked_sub(start.elapsed())
                .ok_or(TransportError::WaitTimeout {
                    rank: 0,
                    signal: sig,
                    expected: target,
                    observed,
                    waited: start.elapsed(),
                })?;
            g = self.mem.1.wait_timeout(g, left).unwrap().0;
        }
        Ok(g.sigs[sig as usize])
    }
    fn read(&self, buf: BufferId, offset: usize, out: &mut [u8]) -> Result<(), TransportError> {
        self.mock.read(buf, offset, out)
    }
    fn barrier(&self, timeout: Duration) -> Result<(), TransportError> {
        self.mock.barrier(timeout)
    }
}

fn transport(fail_puts_after: Option<usize>) -> (Waiting, Arc<(Mutex<Mem>, Condvar)>) {
    let mem = Arc::new((Mutex::new(Mem::default()), Condvar::new()));
    (
        Waiting {
            mock: mock_with_memory(mem.clone(), fail_puts_after),
            mem: mem.clone(),
        },
        mem,
    )
}

fn setup() -> (MoeConfig, TileShape, Routing, Vec<f32>) {
    let cfg = MoeConfig {
        hidden: 32,
        ffn: 16,
        experts: 3,
        top_k: 2,
        ranks: 1,
        dtype: comet_core::Dtype::Bf16,
    };
    let shape = TileShape {
        bm: 4,
        chunk_cols: 8,
        groups: 1,
    };
    let routing = Routing::generate(&cfg, 0, 13, RoutingKind::Zipf(1.0), 3);
    let x = random_tokens(13, 32, 4);
    (cfg, shape, routing, x)
}

#[test]
fn signals_follow_the_schedule() {
    let (cfg, shape, routing, x) = setup();
    let (t, mem) = transport(None);
    let mut rank = CpuRank::new(
        &cfg,
        t,
        ExpertWeights::for_rank(&cfg, 0, 1),
        13,
        shape,
        Duration::from_secs(5),
    )
    .unwrap();
    let out = rank
        .call(
            &x,
            &routing,
            ExecMode::Fused,
            &ExecOptions::default(),
            Instant::now(),
        )
        .unwrap();
    let want = moe_layer(&cfg, &x, &routing, &ExpertWeights::all(&cfg, 1)).unwrap();
    assert!(max_error(&out.y, &want) < 1e-4);

    let plan = LayoutPlan::from_routings(&cfg, std::slice::from_ref(&routing)).unwrap();
    let map = SignalMap::new(&cfg, shape.pieces(&cfg));
    let l1 = Layer1Schedule::new(&plan, 0, shape, &map);
    let wire = |id| map.wire(id).index();
    let log = mem.0.lock().unwrap().log.clone();
    // Chunk counters are raised tile by tile in the schedule's chunk-major order.
    let adds: Vec<u32> = log
        .iter()
        .filter(|(_, op)| matches!(op, SignalOp::Add(_)))
        .map(|(s, _)| *s)
        .collect();
    let want_adds: Vec<u32> = l1
        .tiles
        .iter()
        .map(|t| wire(map.chunk_done(t.chunk)))
        .collect();
    assert_eq!(adds, want_adds);
    // Combine signals go out chunk by chunk, each after its chunk's last tile.
    let combine_pos: Vec<usize> = (0..map.chunks)
        .map(|c| {
            log.iter()
                .position(|&(s, _)| s == wire(map.combine(0, c)))
                .expect("combine raised")
        })
        .collect();
    assert!(
        combine_pos.windows(2).all(|w| w[0] < w[1]),
        "combine signals out of order"
    );
    for (c, &p) in combine_pos.iter().enumerate() {
        let last_tile = log
            .iter()
            .rposition(|&(s, _)| s == wire(map.chunk_done(c)))
            .unwrap();
        assert!(last_tile < p, "chunk {c} left before its tiles were done");
    }
    // Every non-empty segment's dispatch signal is raised before any combine.
    for seg in plan.recv[0].segments.iter().filter(|s| s.rows > 0) {
        let p = log
            .iter()
            .position(|&(s, _)| s == wire(map.dispatch(seg.expert, seg.src)))
            .expect("dispatch raised");
        assert!(p < combine_pos[0]);
    }
}

#[test]
fn a_transport_failure_is_an_error() {
    let (cfg, shape, routing, x) = setup();
    // The executor's first two puts poison its own buffers at construction.
    for fail_after in [2, 3, 5] {
        let (t, _mem) = transport(Some(fail_after));
        let mut rank = CpuRank::new(
            &cfg,
            t,
            ExpertWeights::for_rank(&cfg, 0, 1),
            13,
            shape,
            Duration::from_secs(5),
        )
        .unwrap();
        let opts = ExecOptions {
            timeout: Duration::from_millis(300),
            ..ExecOptions::default()
        };
        let e = rank
            .call(&x, &routing, ExecMode::Fused, &opts, Instant::now())
            .unwrap_err();
        let text = e.to_string();
        assert!(
            matches!(e, SchedError::Transport(TransportError::Backend { .. })),
            "{text}"
        );
        assert!(text.contains("link down"), "{text}");
    }
}
