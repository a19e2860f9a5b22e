//! The `local` transport: W ranks as threads of one process.
//!
//! Buffers and signal words are host memory shared by the threads. With a
//! delay model, every put and signal is handed to a delivery thread that
//! applies it after a seeded random delay, so puts overtake each other and
//! arrive late, as on a real link; a signal is never applied before the
//! puts that preceded it from the same sender to the same receiver
//! (release ordering). Without one, operations apply at once.

use crate::error::TransportError;
use crate::signal_core::{check_range, wait_signal, Owner, Round, SignalSlots};
use crate::transport::{
    check_rank, BufferId, Capabilities, Initiation, SignalId, SignalOp, Transport,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Seeded random delays for every put and signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DelayModel {
    pub seed: u64,
    /// Each operation is applied after a uniform delay in `[0, max)`.
    pub max: Duration,
}

/// An emulated link between every pair of ranks: puts between two ranks
/// are serialised at `gbps` and land `latency` after their last byte left,
/// so the CPU executor sees transfers that take time, as on a real link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkModel {
    pub gbps: f64,
    pub latency: Duration,
}

type Buffer = Arc<Mutex<Vec<u8>>>;

struct RankMem {
    buffers: Mutex<Vec<Buffer>>,
    signals: Mutex<Vec<u64>>,
    /// A delayed signal that found its word gone when it landed (the
    /// receiver re-allocated fewer signals meanwhile): `(src, signal)`.
    /// Its waiters get an error instead of timing out.
    lost: Mutex<Option<(usize, SignalId)>>,
    cv: Condvar,
}

enum Op {
    Put {
        dst: usize,
        buf: Buffer,
        offset: usize,
        data: Vec<u8>,
    },
    Signal {
        src: usize,
        dst: usize,
        sig: SignalId,
        op: SignalOp,
    },
}

struct Pending {
    due: Instant,
    seq: u64,
    op: Op,
}

impl PartialEq for Pending {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, o: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(o))
    }
}
impl Ord for Pending {
    // Reversed: BinaryHeap pops the earliest due first, ties by issue order.
    fn cmp(&self, o: &Self) -> CmpOrdering {
        (o.due, o.seq).cmp(&(self.due, self.seq))
    }
}

struct DeliveryState {
    heap: BinaryHeap<Pending>,
    seq: u64,
    rng: ChaCha8Rng,
    /// Latest due time of a put per (src, dst): signals wait for it.
    last_put_due: Vec<Option<Instant>>,
    /// When the emulated link (src, dst) is free for the next put.
    link_free: Vec<Option<Instant>>,
    shutdown: bool,
}

struct Delivery {
    max: Duration,
    link: Option<LinkModel>,
    state: Mutex<DeliveryState>,
    cv: Condvar,
}

struct Shared {
    world: usize,
    ranks: Vec<RankMem>,
    dead: Vec<AtomicBool>,
    alive: AtomicUsize,
    barrier: Mutex<(u64, usize)>,
    barrier_cv: Condvar,
    delivery: Option<Delivery>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking rank thread must not take the others down with poison.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn apply(&self, op: Op) {
        match op {
            Op::Put {
                dst: _,
                buf,
                offset,
                data,
            } => {
                lock(&buf)[offset..offset + data.len()].copy_from_slice(&data);
            }
            Op::Signal { src, dst, sig, op } => {
                let mem = &self.ranks[dst];
                let mut s = lock(&mem.signals);
                match s.get_mut(sig as usize) {
                    Some(w) => match op {
                        SignalOp::Set(v) => *w = v,
                        SignalOp::Add(v) => *w += v,
                    },
                    None => {
                        // `signal` checked the index when it was raised.
                        tracing::error!(src, dst, sig, "signal landed after its word was freed");
                        *lock(&mem.lost) = Some((src, sig));
                    }
                }
                drop(s);
                mem.cv.notify_all();
            }
        }
    }

    fn first_dead(&self) -> Option<usize> {
        self.dead.iter().position(|d| d.load(Ordering::Acquire))
    }

    fn deliver_loop(self: Arc<Self>) {
        let d = self
            .delivery
            .as_ref()
            .expect("delivery thread without a delay model");
        let mut st = lock(&d.state);
        loop {
            let now = Instant::now();
            match st.heap.peek() {
                Some(p) if p.due <= now || st.shutdown => {
                    let p = st.heap.pop().expect("peeked");
                    drop(st);
                    self.apply(p.op);
                    st = lock(&d.state);
                }
                Some(p) => {
                    let wait = p.due - now;
                    st =
                        d.cv.wait_timeout(st, wait)
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                }
                None if st.shutdown => return,
                None => st = d.cv.wait(st).unwrap_or_else(|e| e.into_inner()),
            }
        }
    }
}

/// One rank's handle on a local world.
pub struct LocalTransport {
    rank: usize,
    shared: Arc<Shared>,
    deliverer: Option<JoinHandle<()>>,
}

/// Builds the W handles of one in-process world.
pub fn local_world(world: usize, delay: Option<DelayModel>) -> Vec<LocalTransport> {
    local_world_with_link(world, delay, None)
}

/// Like [`local_world`], with puts between ranks timed by an emulated link.
pub fn local_world_with_link(
    world: usize,
    delay: Option<DelayModel>,
    link: Option<LinkModel>,
) -> Vec<LocalTransport> {
    let delay = delay.filter(|d| !d.max.is_zero());
    let link = link.filter(|l| l.gbps > 0.0 && l.gbps.is_finite());
    let shared = Arc::new(Shared {
        world,
        ranks: (0..world)
            .map(|_| RankMem {
                buffers: Mutex::new(Vec::new()),
                signals: Mutex::new(Vec::new()),
                lost: Mutex::new(None),
                cv: Condvar::new(),
            })
            .collect(),
        dead: (0..world).map(|_| AtomicBool::new(false)).collect(),
        alive: AtomicUsize::new(world),
        barrier: Mutex::new((0, 0)),
        barrier_cv: Condvar::new(),
        delivery: (delay.is_some() || link.is_some()).then(|| Delivery {
            max: delay.map_or(Duration::ZERO, |d| d.max),
            link,
            state: Mutex::new(DeliveryState {
                heap: BinaryHeap::new(),
                seq: 0,
                rng: ChaCha8Rng::seed_from_u64(delay.map_or(0, |d| d.seed)),
                last_put_due: vec![None; world * world],
                link_free: vec![None; world * world],
                shutdown: false,
            }),
            cv: Condvar::new(),
        }),
    });
    let deliverer = shared.delivery.as_ref().map(|_| {
        let s = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("comet-local-delivery".into())
            .spawn(move || s.deliver_loop())
            .expect("spawn delivery thread")
    });
    let mut handles: Vec<LocalTransport> = (0..world)
        .map(|rank| LocalTransport {
            rank,
            shared: Arc::clone(&shared),
            deliverer: None,
        })
        .collect();
    if let Some(h) = handles.first_mut() {
        h.deliverer = deliverer;
    }
    handles
}

impl LocalTransport {
    /// Simulates this rank crashing: every other rank's waits and barriers
    /// fail with `PeerGone` instead of waiting out their timeout.
    pub fn kill(&self) {
        self.shared.dead[self.rank].store(true, Ordering::Release);
        for r in &self.shared.ranks {
            let _g = lock(&r.signals);
            r.cv.notify_all();
        }
        let _g = lock(&self.shared.barrier);
        self.shared.barrier_cv.notify_all();
    }

    fn check_alive(&self, peer: usize) -> Result<(), TransportError> {
        if let Some(dead) = self.shared.first_dead() {
            if dead == peer || dead == self.rank {
                return Err(TransportError::PeerGone {
                    rank: self.rank,
                    peer: dead,
                    reason: "rank was killed".into(),
                });
            }
        }
        Ok(())
    }

    fn buffer(&self, rank: usize, buf: BufferId) -> Result<Buffer, TransportError> {
        lock(&self.shared.ranks[rank].buffers)
            .get(buf.0 as usize)
            .cloned()
            .ok_or_else(|| TransportError::NotAllocated {
                rank: self.rank,
                what: format!("buffer {} on rank {rank}", buf.0),
            })
    }

    fn submit(&self, src: usize, op: Op) {
        let Some(d) = self.shared.delivery.as_ref() else {
            self.shared.apply(op);
            return;
        };
        let mut st = lock(&d.state);
        let now = Instant::now();
        let delay = if d.max.is_zero() {
            Duration::ZERO
        } else {
            st.rng.gen_range(Duration::ZERO..d.max)
        };
        let mut due = now + delay;
        if let (Some(link), Op::Put { dst, data, .. }) = (d.link, &op) {
            if *dst != src {
                let slot = &mut st.link_free[src * self.shared.world + dst];
                let start = slot.map_or(now, |t| t.max(now));
                let done = start + Duration::from_secs_f64(data.len() as f64 / (link.gbps * 1e9));
                *slot = Some(done);
                due = due.max(done + link.latency);
            }
        }
        let seq = st.seq;
        st.seq += 1;
        match &op {
            Op::Put { dst, .. } => {
                let slot = &mut st.last_put_due[src * self.shared.world + dst];
                *slot = Some(slot.map_or(due, |t| t.max(due)));
            }
            Op::Signal { dst, .. } => {
                if let Some(t) = st.last_put_due[src * self.shared.world + dst] {
                    due = due.max(t);
                }
            }
        }
        st.heap.push(Pending { due, seq, op });
        drop(st);
        d.cv.notify_one();
    }
}

impl Drop for LocalTransport {
    fn drop(&mut self) {
        if self.shared.alive.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Some(d) = self.shared.delivery.as_ref() {
                lock(&d.state).shutdown = true;
                d.cv.notify_all();
            }
        }
        if let Some(h) = self.deliverer.take() {
            // The last handle's drop above stops the thread; an earlier drop
            // of this handle leaves it to finish on its own.
            if self.shared.alive.load(Ordering::Acquire) == 0 {
                let _ = h.join();
            }
        }
    }
}

impl Transport for LocalTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.shared.world
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            name: "local",
            initiation: Initiation::Host,
            device_memory: false,
        }
    }

    fn alloc_buffer(&self, bytes: usize) -> Result<BufferId, TransportError> {
        // Only this rank's thread appends to its list, so the id is stable
        // without holding the lock; holding it while locking the peers'
        // lists would deadlock ranks that allocate at the same time.
        let id = lock(&self.shared.ranks[self.rank].buffers).len();
        for (r, mem) in self.shared.ranks.iter().enumerate() {
            if r == self.rank {
                continue;
            }
            let theirs = lock(&mem.buffers).get(id).cloned();
            if let Some(b) = theirs {
                let theirs = lock(&b).len();
                if theirs != bytes {
                    return Err(TransportError::Mismatch {
                        rank: self.rank,
                        what: "alloc_buffer",
                        detail: format!(
                            "buffer {id} is {bytes} bytes here but {theirs} on rank {r}"
                        ),
                    });
                }
            }
        }
        lock(&self.shared.ranks[self.rank].buffers).push(Arc::new(Mutex::new(vec![0u8; bytes])));
        Ok(BufferId(id as u32))
    }

    fn alloc_signals(&self, count: usize) -> Result<(), TransportError> {
        let mem = &self.shared.ranks[self.rank];
        *lock(&mem.signals) = vec![0; count];
        *lock(&mem.lost) = None;
        Ok(())
    }

    fn put(
        &self,
        dst: usize,
        buf: BufferId,
        offset: usize,
        data: &[u8],
    ) -> Result<(), TransportError> {
        check_rank(self, dst)?;
        self.check_alive(dst)?;
        let b = self.buffer(dst, buf)?;
        let size = lock(&b).len();
        check_range(
            self.rank,
            format_args!("put to buffer {} on rank {dst}", buf.0),
            offset,
            data.len(),
            size,
        )?;
        self.submit(
            self.rank,
            Op::Put {
                dst,
                buf: b,
                offset,
                data: data.to_vec(),
            },
        );
        Ok(())
    }

    /// Fails at once, naming the signal, if `sig` is not below the number
    /// of signals `dst` allocated: never dropped on the way, so the waiter
    /// is not left to time out.
    fn signal(&self, dst: usize, sig: SignalId, op: SignalOp) -> Result<(), TransportError> {
        check_rank(self, dst)?;
        self.check_alive(dst)?;
        let n = lock(&self.shared.ranks[dst].signals).len();
        SignalSlots::new(n).index(self.rank, sig, Owner::Peer(dst))?;
        self.submit(
            self.rank,
            Op::Signal {
                src: self.rank,
                dst,
                sig,
                op,
            },
        );
        Ok(())
    }

    fn wait(&self, sig: SignalId, target: u64, timeout: Duration) -> Result<u64, TransportError> {
        let mem = &self.shared.ranks[self.rank];
        let look = |_: Round| {
            let s = lock(&mem.signals);
            let i = SignalSlots::new(s.len()).index(self.rank, sig, Owner::Local)?;
            let v = s[i];
            if v >= target {
                return Ok(v);
            }
            if let Some((src, lost)) = *lock(&mem.lost) {
                return Err(TransportError::NotAllocated {
                    rank: self.rank,
                    what: format!(
                        "signal {lost} raised by rank {src} (re-allocated before it landed)"
                    ),
                });
            }
            if let Some(dead) = self.shared.first_dead() {
                return Err(TransportError::PeerGone {
                    rank: self.rank,
                    peer: dead,
                    reason: format!("while waiting for signal {sig} to reach {target}"),
                });
            }
            Ok(v)
        };
        // Idles on the condition variable that every landing signal, loss
        // and kill notifies, checking under its lock first so no wake-up
        // between the look and the idle is missed.
        let idle = |d: Duration| {
            let s = lock(&mem.signals);
            let settled = s.get(sig as usize).is_none_or(|&v| v >= target)
                || lock(&mem.lost).is_some()
                || self.shared.first_dead().is_some();
            if !settled {
                let _ = mem.cv.wait_timeout(s, d);
            }
        };
        wait_signal(self.rank, sig, target, timeout, look, idle)
    }

    fn host_memory(&self, buf: BufferId) -> Result<Option<(u64, usize)>, TransportError> {
        // A buffer is never resized, so its bytes stay where they are.
        let b = self.buffer(self.rank, buf)?;
        let g = lock(&b);
        Ok(Some((g.as_ptr() as u64, g.len())))
    }

    fn read(&self, buf: BufferId, offset: usize, out: &mut [u8]) -> Result<(), TransportError> {
        let b = self.buffer(self.rank, buf)?;
        let g = lock(&b);
        check_range(
            self.rank,
            format_args!("read of buffer {}", buf.0),
            offset,
            out.len(),
            g.len(),
        )?;
        out.copy_from_slice(&g[offset..offset + out.len()]);
        Ok(())
    }

    fn peers_alive(&self) -> Result<(), TransportError> {
        match self.shared.first_dead() {
            Some(peer) => Err(TransportError::PeerGone {
                rank: self.rank,
                peer,
                reason: "rank was killed".into(),
            }),
            None => Ok(()),
        }
    }

    fn barrier(&self, timeout: Duration) -> Result<(), TransportError> {
        let start = Instant::now();
        let mut g = lock(&self.shared.barrier);
        let gen = g.0;
        g.1 += 1;
        if g.1 == self.shared.world {
            *g = (gen + 1, 0);
            self.shared.barrier_cv.notify_all();
            return Ok(());
        }
        loop {
            if g.0 != gen {
                return Ok(());
            }
            if let Some(dead) = self.shared.first_dead() {
                return Err(TransportError::PeerGone {
                    rank: self.rank,
                    peer: dead,
                    reason: "during barrier".into(),
                });
            }
            let waited = start.elapsed();
            if waited >= timeout {
                g.1 -= 1;
                return Err(TransportError::WaitTimeout {
                    rank: self.rank,
                    signal: u32::MAX,
                    expected: gen + 1,
                    observed: gen,
                    waited,
                });
            }
            g = self
                .shared
                .barrier_cv
                .wait_timeout(g, timeout - waited)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn put_then_signal_is_seen_in_order_under_delays() {
        for seed in 0..8 {
            let world = local_world(
                3,
                Some(DelayModel {
                    seed,
                    max: Duration::from_micros(300),
                }),
            );
            std::thread::scope(|s| {
                for t in &world {
                    s.spawn(move || {
                        let b = t.alloc_buffer(3 * 4096).unwrap();
                        t.alloc_signals(3).unwrap();
                        t.barrier(T).unwrap();
                        for epoch in 1..=20u64 {
                            for dst in 0..3 {
                                let data =
                                    vec![
                                        (epoch as u8).wrapping_mul(7).wrapping_add(t.rank() as u8);
                                        4096
                                    ];
                                t.put(dst, b, t.rank() * 4096, &data).unwrap();
                                t.signal(dst, t.rank() as u32, SignalOp::Set(epoch))
                                    .unwrap();
                            }
                            for src in 0..3 {
                                t.wait(src as u32, epoch, T).unwrap();
                                let mut out = vec![0u8; 4096];
                                t.read(b, src * 4096, &mut out).unwrap();
                                let want = (epoch as u8).wrapping_mul(7).wrapping_add(src as u8);
                                // A later epoch may already have landed; never an older one.
                                assert!(
                                    out.iter().all(|&v| v == want || v == want.wrapping_add(7)),
                                    "seed {seed}"
                                );
                            }
                            t.barrier(T).unwrap();
                        }
                    });
                }
            });
        }
    }

    #[test]
    fn emulated_link_paces_puts() {
        // 1 GB/s: four 1 MB puts to one peer take about 4 ms on the link.
        let link = LinkModel {
            gbps: 1.0,
            latency: Duration::from_micros(10),
        };
        let w = local_world_with_link(2, None, Some(link));
        let b0 = w[0].alloc_buffer(4 << 20).unwrap();
        w[1].alloc_buffer(4 << 20).unwrap();
        w[1].alloc_signals(1).unwrap();
        let start = Instant::now();
        for i in 0..4 {
            w[0].put(1, b0, i << 20, &vec![i as u8 + 1; 1 << 20])
                .unwrap();
        }
        w[0].signal(1, 0, SignalOp::Set(1)).unwrap();
        w[1].wait(0, 1, T).unwrap();
        assert!(
            start.elapsed() >= Duration::from_micros(4000),
            "link did not pace the puts"
        );
        let mut out = vec![0u8; 4 << 20];
        w[1].read(b0, 0, &mut out).unwrap();
        for i in 0..4 {
            assert!(out[i << 20..(i + 1) << 20]
                .iter()
                .all(|&v| v == i as u8 + 1));
        }
    }

    #[test]
    fn bounded_wait_names_rank_and_signal() {
        let w = local_world(2, None);
        w[1].alloc_signals(4).unwrap();
        let e = w[1].wait(2, 1, Duration::from_millis(20)).unwrap_err();
        match e {
            TransportError::WaitTimeout {
                rank: 1,
                signal: 2,
                expected: 1,
                observed: 0,
                ..
            } => {}
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().contains("signal 2"));
    }

    #[test]
    fn killed_peer_fails_waiters_fast() {
        let w = local_world(2, None);
        w[0].alloc_signals(1).unwrap();
        let start = Instant::now();
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(20));
                w[1].kill();
            });
            let e = w[0].wait(0, 1, Duration::from_secs(30)).unwrap_err();
            assert!(
                matches!(e, TransportError::PeerGone { peer: 1, .. }),
                "{e:?}"
            );
        });
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(w[0].barrier(Duration::from_secs(1)).is_err());
    }

    #[test]
    fn peers_alive_names_a_killed_peer() {
        let w = local_world(3, None);
        assert!(w[0].peers_alive().is_ok());
        w[2].kill();
        for r in [0, 1] {
            match w[r].peers_alive() {
                Err(TransportError::PeerGone { rank, peer: 2, .. }) => assert_eq!(rank, r),
                other => panic!("rank {r}: {other:?}"),
            }
        }
    }

    #[test]
    fn bad_puts_are_errors() {
        let w = local_world(2, None);
        let b0 = w[0].alloc_buffer(16).unwrap();
        let _ = w[1].alloc_buffer(16).unwrap();
        assert!(matches!(
            w[0].put(1, b0, 8, &[0; 9]),
            Err(TransportError::OutOfBounds { .. })
        ));
        assert!(matches!(
            w[0].put(2, b0, 0, &[0; 1]),
            Err(TransportError::BadRank { peer: 2, .. })
        ));
        assert!(matches!(
            w[0].put(1, BufferId(5), 0, &[0; 1]),
            Err(TransportError::NotAllocated { .. })
        ));
        assert!(matches!(
            w[0].signal(1, 0, SignalOp::Set(1)),
            Err(TransportError::NotAllocated { .. })
        ));
        w[0].alloc_buffer(32).unwrap();
        assert!(matches!(
            w[1].alloc_buffer(64),
            Err(TransportError::Mismatch { .. })
        ));
    }

    #[test]
    fn out_of_range_signal_is_an_error_at_the_raise() {
        for delay in [
            None,
            Some(DelayModel {
                seed: 3,
                max: Duration::from_millis(2),
            }),
        ] {
            let w = local_world(2, delay);
            w[0].alloc_signals(2).unwrap();
            w[1].alloc_signals(4).unwrap();
            // Index 4 is one past rank 1's signals (rank 0 has only 2, so
            // the check must use the receiver's count, and 3 is fine).
            match w[0].signal(1, 4, SignalOp::Set(1)) {
                Err(TransportError::NotAllocated { rank: 0, what }) => {
                    assert!(what.contains("signal 4 on rank 1"), "{what}")
                }
                other => panic!("raise of signal 4 of 4 gave {other:?}"),
            }
            assert!(matches!(
                w[1].signal(0, 2, SignalOp::Add(1)),
                Err(TransportError::NotAllocated { rank: 1, .. })
            ));
            assert!(matches!(
                w[0].signal(1, u32::MAX, SignalOp::Set(1)),
                Err(TransportError::NotAllocated { .. })
            ));
            w[0].signal(1, 3, SignalOp::Set(7)).unwrap();
            assert_eq!(w[1].wait(3, 7, T).unwrap(), 7);
        }
    }

    #[test]
    fn a_signal_whose_word_is_gone_when_it_lands_fails_the_waiter() {
        // 100 KB at 1 MB/s: the put, and so the signal behind it, lands
        // about 100 ms after it was issued.
        let link = LinkModel {
            gbps: 0.001,
            latency: Duration::ZERO,
        };
        let w = local_world_with_link(2, None, Some(link));
        let b = w[0].alloc_buffer(100_000).unwrap();
        w[1].alloc_buffer(100_000).unwrap();
        w[1].alloc_signals(8).unwrap();
        w[0].put(1, b, 0, &[1u8; 100_000]).unwrap();
        w[0].signal(1, 6, SignalOp::Set(1)).unwrap();
        // Rank 1 shrinks its signals before the delayed raise lands.
        w[1].alloc_signals(2).unwrap();
        let start = Instant::now();
        let e = w[1].wait(0, 1, Duration::from_secs(20)).unwrap_err();
        assert!(
            matches!(&e, TransportError::NotAllocated { rank: 1, what } if what.contains("signal 6")),
            "{e:?}"
        );
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn barrier_times_out_when_a_rank_never_comes() {
        let w = local_world(2, None);
        assert!(matches!(
            w[0].barrier(Duration::from_millis(20)),
            Err(TransportError::WaitTimeout { .. })
        ));
    }
}
