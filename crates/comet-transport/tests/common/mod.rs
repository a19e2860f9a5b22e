//! Transport scenarios shared by the `local` (threads) and `ucx`
//! (processes through the launcher) tests: the same traffic, checked the
//! same way, whatever carries it.
#![allow(dead_code)]

use comet_transport::launch::{launch, LaunchConfig, LaunchError, LaunchReport, OnFailure};
use comet_transport::{SignalOp, Transport, TransportError};
use rand::seq::SliceRandom;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Duration;

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
pub fn bulk(t: &dyn Transport, seed: u64, total: usize) -> Result<u64, TransportError> {
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
pub fn epochs(t: &dyn Transport, seed: u64, calls: u64, per: usize) -> Result<(), TransportError> {
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

/// Runs `world` ranks of this test binary's `entry` test with `env`.
pub fn launch_self(
    entry: &str,
    world: usize,
    env: &[(&str, &str)],
    on_failure: OnFailure,
) -> Result<LaunchReport, LaunchError> {
    let exe = std::env::current_exe().expect("test binary path");
    let mut cfg = LaunchConfig::new(world, exe).args(self_args(entry));
    for (k, v) in env {
        cfg = cfg.env(k, v);
    }
    cfg.timeout = Some(Duration::from_secs(120));
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
