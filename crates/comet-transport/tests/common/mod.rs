//! Transport scenarios shared by every transport's tests (`local` as
//! threads, `ucx` as processes through the launcher, `nvlink` and `nccl` on
//! a GPU): the same traffic and the same misuse, checked the same way,
//! whatever carries it. Each scenario is one rank's part, written against
//! `&dyn Transport`; every rank of a world runs it.
#![allow(dead_code)]

use comet_transport::bootstrap::Bootstrap;
use comet_transport::launch::{launch, LaunchConfig, LaunchError, LaunchReport, OnFailure};
use comet_transport::{BufferId, SignalOp, Transport, TransportError};
use rand::seq::SliceRandom;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const T: Duration = Duration::from_secs(60);
pub const MIB: usize = 1 << 20;

fn rng(seed: u64, a: usize, b: usize, c: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(
        seed ^ (a as u64) << 48 ^ (b as u64) << 32 ^ c.wrapping_mul(0x9e37_79b9_7f4a_7c15),
    )
}

/// The bytes `src` sends to `dst` in `epoch`.
pub fn payload(seed: u64, src: usize, dst: usize, epoch: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng(seed, src, dst, epoch).fill_bytes(&mut v);
    v
}

/// Random chunk boundaries covering `[0, len)`: sizes in `[1, max]`.
pub fn chunks(seed: u64, src: usize, dst: usize, len: usize, max: usize) -> Vec<(usize, usize)> {
    let mut r = rng(seed, src, dst, u64::MAX);
    let mut out = Vec::new();
    let mut at = 0;
    while at < len {
        let n = r.gen_range(1..=max).min(len - at);
        out.push((at, n));
        at += n;
    }
    out
}

/// How a transport moves plain puts and signals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// As they are issued (local, ucx, nvlink).
    Eager,
    /// Staged until the next collective barrier (nccl).
    AtBarrier,
}

impl Delivery {
    /// Lets what this rank put and signalled so far reach its peers.
    fn settle(self, t: &dyn Transport) -> Result<(), TransportError> {
        match self {
            Delivery::Eager => Ok(()),
            Delivery::AtBarrier => t.barrier(T),
        }
    }
}

/// FNV-1a, to report what was checked.
pub fn checksum(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Every rank sends `total / (W (W-1))` bytes to every other rank (so
/// `total` bytes move in all) as chunks of random size, in random order
/// across destinations, each followed by a signal `Add(1)`; receivers wait
/// for their chunk counts and compare every byte (the buffer is poisoned
/// first). Returns the checksum of what this rank received.
pub fn bulk(
    t: &dyn Transport,
    seed: u64,
    total: usize,
    d: Delivery,
) -> Result<u64, TransportError> {
    let (me, w) = (t.rank(), t.world());
    assert!(w >= 2);
    let per = total / (w * (w - 1));
    let buf = t.alloc_buffer(w * per)?;
    t.alloc_signals(w)?;
    t.put(me, buf, 0, &vec![0xa5; w * per])?;
    t.barrier(T)?;
    let max_chunk = MIB + 4093;
    let mut sends: Vec<(usize, usize, usize)> = Vec::new();
    let mut data = vec![Vec::new(); w];
    for dst in (0..w).filter(|&d| d != me) {
        data[dst] = payload(seed, me, dst, 0, per);
        sends.extend(
            chunks(seed, me, dst, per, max_chunk)
                .into_iter()
                .map(|(o, n)| (dst, o, n)),
        );
    }
    sends.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ me as u64));
    for (dst, off, n) in sends {
        t.put(dst, buf, me * per + off, &data[dst][off..off + n])?;
        t.signal(dst, me as u32, SignalOp::Add(1))?;
    }
    d.settle(t)?;
    let mut sum = 0u64;
    let mut got = vec![0u8; per];
    for src in (0..w).filter(|&s| s != me) {
        let n = chunks(seed, src, me, per, max_chunk).len() as u64;
        let v = t.wait(src as u32, n, T)?;
        assert_eq!(
            v, n,
            "rank {me}: signal from {src} counted {v} chunks, {n} were sent"
        );
        for b in got.iter_mut() {
            *b = 0x5a;
        }
        t.read(buf, src * per, &mut got)?;
        let want = payload(seed, src, me, 0, per);
        let bad = got.iter().zip(&want).position(|(a, b)| a != b);
        assert!(
            bad.is_none(),
            "rank {me}: byte {} of {per} from rank {src} is wrong",
            bad.unwrap_or(0)
        );
        sum ^= checksum(&got);
    }
    t.barrier(T)?;
    Ok(sum)
}

/// `calls` calls on the same buffers and signals, never reset: epoch `e`
/// goes to slot `e % 2` and is raised with `Set(e)`; the receiver checks it
/// and acknowledges with `Set(e)` on the sender's ack word, which the
/// sender waits for before reusing that slot two epochs later.
pub fn epochs(
    t: &dyn Transport,
    seed: u64,
    calls: u64,
    per: usize,
    d: Delivery,
) -> Result<(), TransportError> {
    let (me, w) = (t.rank(), t.world());
    let buf = t.alloc_buffer(2 * w * per)?;
    t.alloc_signals(2 * w)?;
    t.barrier(T)?;
    let slot = |e: u64, src: usize| ((e % 2) as usize * w + src) * per;
    let mut got = vec![0u8; per];
    for e in 1..=calls {
        for dst in 0..w {
            if e > 2 {
                t.wait((w + dst) as u32, e - 2, T)?;
            }
            let data = payload(seed, me, dst, e, per);
            let mut cs = chunks(seed ^ e, me, dst, per, per / 3 + 1);
            cs.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ e ^ 77));
            for (o, n) in cs {
                t.put(dst, buf, slot(e, me) + o, &data[o..o + n])?;
            }
            t.signal(dst, me as u32, SignalOp::Set(e))?;
        }
        d.settle(t)?;
        for src in 0..w {
            let v = t.wait(src as u32, e, T)?;
            // The sender may be one epoch ahead (other slot), never two.
            assert!(
                v == e || v == e + 1,
                "rank {me}: signal from {src} is {v} in epoch {e}"
            );
            for b in got.iter_mut() {
                *b = 0x5a;
            }
            t.read(buf, slot(e, src), &mut got)?;
            assert!(
                got == payload(seed, src, me, e, per),
                "rank {me}: epoch {e} data from rank {src} is wrong"
            );
            t.signal(src, (w + me) as u32, SignalOp::Set(e))?;
        }
    }
    t.barrier(T)?;
    Ok(())
}

/// Misuse is an error naming what was wrong, never a crash: a signal past
/// the array (raised towards a peer, waited on here) names the signal; a
/// put past a buffer's end, to a rank outside the world or into a buffer
/// never allocated, and a read past the end, are errors of this rank.
pub fn misuse(t: &dyn Transport) -> Result<(), TransportError> {
    let (me, w) = (t.rank(), t.world());
    let peer = (me + 1) % w;
    let buf = t.alloc_buffer(4096)?;
    t.alloc_signals(3)?;
    t.barrier(T)?;
    for sig in [3, 1000] {
        let named = |r: Result<_, TransportError>, op: &str| match r {
            Err(TransportError::NotAllocated { rank, what })
                if rank == me && what.contains(&format!("signal {sig} ")) => {}
            other => panic!("rank {me}: {op} of signal {sig} of 3 gave {other:?}"),
        };
        named(t.signal(peer, sig, SignalOp::Add(1)).map(|_| 0), "raise");
        named(t.wait(sig, 1, Duration::from_millis(20)), "wait");
    }
    match t.put(peer, buf, 4000, &[7; 97]) {
        Err(TransportError::OutOfBounds {
            rank,
            offset: 4000,
            len: 97,
            size: 4096,
            ..
        }) if rank == me => {}
        other => panic!("rank {me}: a put past the end gave {other:?}"),
    }
    match t.read(buf, 4095, &mut [0; 2]) {
        Err(TransportError::OutOfBounds { rank, .. }) if rank == me => {}
        other => panic!("rank {me}: a read past the end gave {other:?}"),
    }
    for r in [t.put(w, buf, 0, &[1]), t.signal(w, 0, SignalOp::Add(1))] {
        match r {
            Err(TransportError::BadRank { rank, peer, world })
                if (rank, peer, world) == (me, w, w) => {}
            other => panic!("rank {me}: an op towards rank {w} of {w} gave {other:?}"),
        }
    }
    match t.put(peer, BufferId(99), 0, &[1]) {
        Err(TransportError::NotAllocated { rank, .. }) if rank == me => {}
        other => panic!("rank {me}: a put into buffer 99 gave {other:?}"),
    }
    t.barrier(T)
}

/// A wait nobody answers is a `WaitTimeout` naming this rank, the signal,
/// its target and what it saw, neither before `timeout` nor long after.
pub fn wait_times_out(t: &dyn Transport, timeout: Duration) -> Result<(), TransportError> {
    let me = t.rank();
    t.alloc_signals(2)?;
    t.barrier(T)?;
    let start = Instant::now();
    let r = t.wait(1, 1, timeout);
    let took = start.elapsed();
    match r {
        Err(TransportError::WaitTimeout {
            rank,
            signal: 1,
            expected: 1,
            observed: 0,
            ..
        }) if rank == me => {}
        other => panic!("rank {me}: a wait on a signal nobody raises gave {other:?}"),
    }
    assert!(
        took >= timeout && took <= timeout * 3 / 2 + Duration::from_millis(250),
        "rank {me}: a wait of {timeout:?} gave up after {took:?}"
    );
    t.barrier(T)
}

/// Every scenario above but the vanished peer, one after another.
pub fn all(t: &dyn Transport, seed: u64, d: Delivery) -> Result<(), TransportError> {
    if t.world() >= 2 {
        bulk(t, seed, 16 * MIB, d)?;
    }
    epochs(t, seed, 30, 4096 + 8, d)?;
    misuse(t)?;
    wait_times_out(t, Duration::from_millis(300))
}

/// The last rank vanishes (`die`) in the middle of the traffic: every
/// other rank keeps putting, signalling and waiting for it, and must come
/// out with `PeerGone` naming it within `within`, not hang. Returns that
/// error (`None` on the victim, if `die` returns).
pub fn vanished_peer(
    t: &dyn Transport,
    within: Duration,
    die: impl FnOnce(),
) -> Result<Option<TransportError>, TransportError> {
    let (me, w) = (t.rank(), t.world());
    let victim = w - 1;
    let buf = t.alloc_buffer(w * 4 * MIB)?;
    t.alloc_signals(w)?;
    t.barrier(T)?;
    if me == victim {
        for dst in (0..w).filter(|&d| d != me) {
            t.put(dst, buf, me * 4 * MIB, &vec![1u8; MIB])?;
        }
        die();
        return Ok(None);
    }
    let start = Instant::now();
    let err = 'outer: loop {
        for dst in (0..w).filter(|&d| d != me) {
            let r = t
                .put(dst, buf, me * 4 * MIB, &vec![me as u8; 256 * 1024])
                .and_then(|_| t.signal(dst, me as u32, SignalOp::Add(1)));
            if let Err(e) = r {
                break 'outer e;
            }
        }
        if let Err(e) = t.wait(victim as u32, 1, Duration::from_millis(50)) {
            if !matches!(e, TransportError::WaitTimeout { .. }) || start.elapsed() > within {
                break e;
            }
        }
    };
    let took = start.elapsed();
    match &err {
        TransportError::PeerGone { rank, peer, .. } if (*rank, *peer) == (me, victim) => {}
        other => panic!("rank {me}: wanted PeerGone naming rank {victim}, got {other:?}"),
    }
    assert!(
        took <= within + Duration::from_secs(1),
        "rank {me}: the loss of rank {victim} took {took:?}"
    );
    Ok(Some(err))
}

/// Every rank of `rep` succeeded and printed `marker(rank)`: a child that
/// did not run its part (filter mismatch, variable missing) fails too.
pub fn assert_markers(rep: &LaunchReport, marker: impl Fn(usize) -> String) {
    for r in &rep.ranks {
        let want = marker(r.rank);
        assert!(
            r.success() && r.output.iter().any(|l| l.contains(&want)),
            "rank {} ({}) never printed {want:?}:\n{}",
            r.rank,
            r.describe(),
            r.text()
        );
    }
}

/// A launched GPU rank's start: `None` unless `env` is set (the entry
/// point is inert outside the launcher), else the bootstrap from the
/// launcher's variables and the ordinal of the GPU this rank uses out of
/// `devices` (ranks share GPUs round-robin).
pub fn child_bootstrap(env: &str, devices: usize) -> Option<(Arc<Bootstrap>, usize)> {
    std::env::var_os(env)?;
    let boot = Arc::new(Bootstrap::from_env().expect("bootstrap"));
    let ordinal = boot.rank() % devices.max(1);
    Some((boot, ordinal))
}

/// The arguments that make a libtest binary run exactly one test of itself.
pub fn self_args(test: &str) -> Vec<String> {
    vec![
        test.into(),
        "--exact".into(),
        "--ignored".into(),
        "--nocapture".into(),
        "--test-threads=1".into(),
    ]
}

/// Runs `world` ranks of this test binary's `entry` test with `env`,
/// killed after two minutes.
pub fn launch_self(
    entry: &str,
    world: usize,
    env: &[(&str, &str)],
    on_failure: OnFailure,
) -> Result<LaunchReport, LaunchError> {
    launch_self_for(entry, world, env, on_failure, Duration::from_secs(120))
}

/// [`launch_self`] with its own time limit.
pub fn launch_self_for(
    entry: &str,
    world: usize,
    env: &[(&str, &str)],
    on_failure: OnFailure,
    timeout: Duration,
) -> Result<LaunchReport, LaunchError> {
    let exe = std::env::current_exe().expect("test binary path");
    let mut cfg = LaunchConfig::new(world, exe).args(self_args(entry));
    for (k, v) in env {
        cfg = cfg.env(k, v);
    }
    cfg.timeout = Some(timeout);
    cfg.on_failure = on_failure;
    cfg.capture = true;
    cfg.forward = std::env::var_os("COMET_TEST_VERBOSE").is_some();
    launch(&cfg)
}

/// Unwraps a launch, printing every rank's output if it failed.
pub fn expect_ok(r: Result<LaunchReport, LaunchError>) -> LaunchReport {
    match r {
        Ok(r) => r,
        Err(e) => {
            if let Some(rep) = e.report() {
                for o in &rep.ranks {
                    eprintln!("--- rank {} ({}):\n{}", o.rank, o.describe(), o.text());
                }
            }
            panic!("{e}");
        }
    }
}
