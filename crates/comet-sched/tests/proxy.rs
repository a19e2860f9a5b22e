//! The host proxy over the local transport with seeded random delays:
//! "kernel" threads raise ready words in random order, receivers check
//! their bytes right after each signal, and the proxy's calls are logged to
//! check that each piece's signal follows its puts and that pieces go out
//! in readiness order. Also: a ready word that never comes, a killed peer,
//! zero pieces and malformed plans.

use comet_sched::proxy::{Piece, Proxy, Put, Raise, ReadyWords};
use comet_sched::SchedError;
use comet_transport::local::{local_world, DelayModel, LocalTransport};
use comet_transport::{BufferId, Capabilities, SignalId, SignalOp, Transport, TransportError};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(10);
const POISON: u8 = 0xEE;

/// One call made through a [`Logged`] transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ev {
    Put {
        dst: usize,
        offset: usize,
        len: usize,
    },
    Signal {
        dst: usize,
        sig: SignalId,
    },
}

/// A transport that logs its puts and signals, in call order.
struct Logged<'a> {
    inner: &'a LocalTransport,
    log: Mutex<Vec<Ev>>,
}

impl<'a> Logged<'a> {
    fn new(inner: &'a LocalTransport) -> Self {
        Self {
            inner,
            log: Mutex::new(Vec::new()),
        }
    }

    fn take(&self) -> Vec<Ev> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

impl Transport for Logged<'_> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world(&self) -> usize {
        self.inner.world()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn alloc_buffer(&self, bytes: usize) -> Result<BufferId, TransportError> {
        self.inner.alloc_buffer(bytes)
    }
    fn alloc_signals(&self, count: usize) -> Result<(), TransportError> {
        self.inner.alloc_signals(count)
    }
    fn put(
        &self,
        dst: usize,
        buf: BufferId,
        offset: usize,
        data: &[u8],
    ) -> Result<(), TransportError> {
        self.log.lock().unwrap().push(Ev::Put {
            dst,
            offset,
            len: data.len(),
        });
        self.inner.put(dst, buf, offset, data)
    }
    fn signal(&self, dst: usize, sig: SignalId, op: SignalOp) -> Result<(), TransportError> {
        self.log.lock().unwrap().push(Ev::Signal { dst, sig });
        self.inner.signal(dst, sig, op)
    }
    fn wait(&self, sig: SignalId, target: u64, timeout: Duration) -> Result<u64, TransportError> {
        self.inner.wait(sig, target, timeout)
    }
    fn read(&self, buf: BufferId, offset: usize, out: &mut [u8]) -> Result<(), TransportError> {
        self.inner.read(buf, offset, out)
    }
    fn barrier(&self, timeout: Duration) -> Result<(), TransportError> {
        self.inner.barrier(timeout)
    }
}

fn words(n: usize) -> Vec<AtomicU64> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

/// The byte `i` of piece `k` from `src` to `dst` in call `epoch`: never 0
/// (a fresh buffer) nor [`POISON`].
fn pattern(src: usize, dst: usize, k: usize, epoch: u64, i: usize) -> u8 {
    ((src * 53 + dst * 29 + k * 17 + epoch as usize * 11 + i) % 200 + 1) as u8
}

/// Pieces per destination, bytes per piece (sent as two puts).
const P: usize = 4;
const CHUNK: usize = 256;

/// Rank `me`'s plan: piece `dst * P + k` is ready on word `dst * P + k`
/// at `epoch`, puts its two halves at `dst`'s region `(me, k)` and sets
/// `dst`'s signal `me * P + k` to `epoch`.
fn plan(me: usize, world: usize, buf: BufferId, epoch: u64) -> Vec<Piece> {
    let mut pieces = Vec::new();
    for dst in 0..world {
        for k in 0..P {
            let from = (dst * P + k) * CHUNK;
            let to = (me * P + k) * CHUNK;
            let half = CHUNK / 2;
            pieces.push(Piece {
                ready: dst * P + k,
                target: epoch,
                puts: vec![
                    Put {
                        dst,
                        buf,
                        offset: to,
                        src: from..from + half,
                    },
                    Put {
                        dst,
                        buf,
                        offset: to + half,
                        src: from + half..from + CHUNK,
                    },
                ],
                raise: Some(Raise {
                    dst,
                    sig: (me * P + k) as SignalId,
                    op: SignalOp::Set(epoch),
                }),
            });
        }
    }
    pieces
}

/// Every signal in `log` comes after all the puts into the region it
/// guards (from the same rank, to the same receiver).
fn check_signals_follow_puts(log: &[Ev]) {
    for (at, ev) in log.iter().enumerate() {
        if let Ev::Signal { dst, sig } = *ev {
            let region = sig as usize * CHUNK..(sig as usize + 1) * CHUNK;
            let covered: usize = log[..at]
                .iter()
                .filter_map(|e| match *e {
                    Ev::Put {
                        dst: d,
                        offset,
                        len,
                    } if d == dst && region.contains(&offset) => Some(len),
                    _ => None,
                })
                .sum();
            assert!(
                covered >= CHUNK,
                "signal {sig} to rank {dst} was raised before its puts: {log:?}"
            );
        }
    }
}

#[test]
fn signals_never_overtake_their_data_under_random_delays() {
    for world in 2..=4usize {
        for seed in 0..3u64 {
            let ranks = local_world(
                world,
                Some(DelayModel {
                    seed,
                    max: Duration::from_micros(300),
                }),
            );
            std::thread::scope(|s| {
                for t in &ranks {
                    s.spawn(move || rank_calls(t, world, seed));
                }
            });
        }
    }
}

/// Three calls of one rank: poison, then proxy + kernel + receiver.
fn rank_calls(t: &LocalTransport, world: usize, seed: u64) {
    let me = t.rank();
    let bytes = world * P * CHUNK;
    let buf = t.alloc_buffer(bytes).unwrap();
    let poisoned = (world * P) as SignalId;
    t.alloc_signals(world * P + 1).unwrap();
    let logged = Logged::new(t);
    let proxy = Proxy::new(&logged);
    let ready = words(world * P);
    let mut rng = ChaCha8Rng::seed_from_u64(seed * 100 + me as u64);
    t.barrier(T).unwrap();
    for epoch in 1..=3u64 {
        // Poison this rank's receive buffer; no peer posts before the barrier.
        t.put(me, buf, 0, &vec![POISON; bytes]).unwrap();
        t.signal(me, poisoned, SignalOp::Set(epoch)).unwrap();
        t.wait(poisoned, epoch, T).unwrap();
        t.barrier(T).unwrap();

        let mut src = vec![0u8; bytes];
        for dst in 0..world {
            for k in 0..P {
                for i in 0..CHUNK {
                    src[(dst * P + k) * CHUNK + i] = pattern(me, dst, k, epoch, i);
                }
            }
        }
        let pieces = plan(me, world, buf, epoch);
        let mut kernel_order: Vec<usize> = (0..world * P).collect();
        kernel_order.shuffle(&mut rng);
        let sleeps: Vec<u64> = (0..world * P).map(|_| rng.gen_range(0..300)).collect();
        let mut recv_order: Vec<(usize, usize)> = (0..world)
            .flat_map(|s| (0..P).map(move |k| (s, k)))
            .collect();
        recv_order.shuffle(&mut rng);

        std::thread::scope(|s| {
            let proxy_run = s.spawn(|| proxy.run(&pieces, &ready, &src, T));
            s.spawn(|| {
                for (&w, &us) in kernel_order.iter().zip(&sleeps) {
                    std::thread::sleep(Duration::from_micros(us));
                    ready[w].store(epoch, Ordering::Release);
                }
            });
            // The receiver: each region is checked right after its signal.
            let mut got = vec![0u8; CHUNK];
            for &(from, k) in &recv_order {
                let sig = (from * P + k) as SignalId;
                t.wait(sig, epoch, T).unwrap();
                t.read(buf, (from * P + k) * CHUNK, &mut got).unwrap();
                for (i, &b) in got.iter().enumerate() {
                    assert_eq!(
                        b,
                        pattern(from, me, k, epoch, i),
                        "world {world} seed {seed} epoch {epoch}: rank {me} saw signal {sig} \
                         from rank {from} before byte {i} of its data{}",
                        if b == POISON { " (poison)" } else { "" }
                    );
                }
            }
            let stats = proxy_run.join().unwrap().unwrap();
            assert_eq!(stats.pieces, world * P);
            assert_eq!(stats.bytes, world * P * CHUNK);
            assert!(stats.max_ready_together >= 1);
        });
        check_signals_follow_puts(&logged.take());
        t.barrier(T).unwrap();
    }
}

#[test]
fn pieces_go_out_in_readiness_order_not_plan_order() {
    let ranks = local_world(
        2,
        Some(DelayModel {
            seed: 9,
            max: Duration::from_micros(200),
        }),
    );
    let buf = ranks[0].alloc_buffer(8 * 16).unwrap();
    ranks[1].alloc_buffer(8 * 16).unwrap();
    ranks[1].alloc_signals(8).unwrap();
    let src: Vec<u8> = (0..8 * 16).map(|i| i as u8).collect();
    // Piece i waits on word 7 - i and raises signal i.
    let pieces: Vec<Piece> = (0..8)
        .map(|i| Piece {
            ready: 7 - i,
            target: 1,
            puts: vec![Put {
                dst: 1,
                buf,
                offset: i * 16,
                src: i * 16..(i + 1) * 16,
            }],
            raise: Some(Raise {
                dst: 1,
                sig: i as SignalId,
                op: SignalOp::Add(1),
            }),
        })
        .collect();
    let mut readied: Vec<usize> = (0..8).collect();
    readied.shuffle(&mut ChaCha8Rng::seed_from_u64(4));
    assert_ne!(readied, (0..8).collect::<Vec<_>>());
    let ready = words(8);
    let logged = Logged::new(&ranks[0]);
    let stats = std::thread::scope(|s| {
        let run = s.spawn(|| Proxy::new(&logged).run(&pieces, &ready, &src, T));
        // The kernel readies one piece at a time and waits until it has
        // landed: a proxy that took pieces in plan order would stall here.
        for &p in &readied {
            ready[pieces[p].ready].store(1, Ordering::Release);
            ranks[1]
                .wait(p as SignalId, 1, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("piece {p} was not sent once ready: {e}"));
        }
        run.join().unwrap().unwrap()
    });
    let sent: Vec<usize> = logged
        .take()
        .iter()
        .filter_map(|e| match *e {
            Ev::Signal { sig, .. } => Some(sig as usize),
            Ev::Put { .. } => None,
        })
        .collect();
    assert_eq!(sent, readied, "pieces went out in another order than ready");
    assert_eq!((stats.pieces, stats.bytes), (8, 8 * 16));
    assert_eq!(stats.max_ready_together, 1);
    let mut got = vec![0u8; 8 * 16];
    ranks[1].read(buf, 0, &mut got).unwrap();
    assert_eq!(got, src);
}

#[test]
fn a_ready_word_that_never_comes_is_a_timeout_naming_the_piece() {
    let ranks = local_world(2, None);
    let buf = ranks[0].alloc_buffer(64).unwrap();
    ranks[1].alloc_buffer(64).unwrap();
    ranks[1].alloc_signals(3).unwrap();
    let src = vec![7u8; 64];
    // Piece i waits on word 2 * i for 5; word 2 (piece 1) stays at 4.
    let pieces: Vec<Piece> = (0..3)
        .map(|i| Piece {
            ready: 2 * i,
            target: 5,
            puts: vec![Put {
                dst: 1,
                buf,
                offset: i * 16,
                src: i * 16..(i + 1) * 16,
            }],
            raise: Some(Raise {
                dst: 1,
                sig: i as SignalId,
                op: SignalOp::Set(5),
            }),
        })
        .collect();
    let ready = words(6);
    ready[0].store(5, Ordering::Release);
    ready[2].store(4, Ordering::Release);
    ready[4].store(9, Ordering::Release);
    let timeout = Duration::from_millis(200);
    let start = Instant::now();
    let e = Proxy::new(&ranks[0])
        .run(&pieces, &ready, &src, timeout)
        .unwrap_err();
    let took = start.elapsed();
    assert!(
        took >= timeout && took < timeout + Duration::from_secs(2),
        "{took:?}"
    );
    match &e {
        SchedError::ProxyTimeout {
            rank: 0,
            piece: 1,
            word: 2,
            target: 5,
            observed: 4,
            pending: 1,
            ..
        } => {}
        other => panic!("{other:?}"),
    }
    assert!(e.to_string().contains("piece 1"), "{e}");
    // The ready pieces went out meanwhile.
    ranks[1].wait(0, 5, T).unwrap();
    ranks[1].wait(2, 5, T).unwrap();
}

#[test]
fn a_killed_peer_is_an_error_not_a_hang() {
    let ranks = local_world(
        3,
        Some(DelayModel {
            seed: 2,
            max: Duration::from_micros(200),
        }),
    );
    let buf = ranks[0].alloc_buffer(32).unwrap();
    for t in &ranks[1..] {
        t.alloc_buffer(32).unwrap();
        t.alloc_signals(1).unwrap();
    }
    let src = vec![1u8; 32];
    let pieces: Vec<Piece> = (1..3)
        .map(|dst| Piece {
            ready: dst - 1,
            target: 1,
            puts: vec![Put {
                dst,
                buf,
                offset: 0,
                src: 0..32,
            }],
            raise: Some(Raise {
                dst,
                sig: 0,
                op: SignalOp::Set(1),
            }),
        })
        .collect();
    let ready = words(2);
    let start = Instant::now();
    let e = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(20));
            ranks[2].kill();
            for w in &ready {
                w.store(1, Ordering::Release);
            }
        });
        Proxy::new(&ranks[0])
            .run(&pieces, &ready, &src, Duration::from_secs(30))
            .unwrap_err()
    });
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert!(
        matches!(
            e,
            SchedError::Transport(TransportError::PeerGone {
                rank: 0,
                peer: 2,
                ..
            })
        ),
        "{e:?}"
    );
}

#[test]
fn zero_pieces_return_at_once() {
    let ranks = local_world(2, None);
    let start = Instant::now();
    let stats = Proxy::new(&ranks[0])
        .run(&[], &words(0), &[], Duration::from_secs(30))
        .unwrap();
    assert!(start.elapsed() < Duration::from_secs(1));
    assert_eq!(
        (stats.pieces, stats.bytes, stats.max_ready_together),
        (0, 0, 0)
    );
}

#[test]
fn malformed_plans_are_input_errors_before_anything_is_posted() {
    let ranks = local_world(2, None);
    let buf = ranks[0].alloc_buffer(16).unwrap();
    ranks[1].alloc_buffer(16).unwrap();
    ranks[1].alloc_signals(1).unwrap();
    let src = [3u8; 16];
    let good = Piece {
        ready: 0,
        target: 1,
        puts: vec![Put {
            dst: 1,
            buf,
            offset: 0,
            src: 0..16,
        }],
        raise: Some(Raise {
            dst: 1,
            sig: 0,
            op: SignalOp::Set(1),
        }),
    };
    let ready = words(2);
    for w in &ready {
        w.store(1, Ordering::Release);
    }
    let with = |f: &dyn Fn(&mut Piece)| {
        let mut p = good.clone();
        f(&mut p);
        p
    };
    #[allow(clippy::reversed_empty_ranges)]
    let cases: Vec<(Piece, &str)> = vec![
        (with(&|p| p.ready = 2), "ready word 2"),
        (with(&|p| p.puts[0].src = 8..17), "source bytes 8..17 of 16"),
        (with(&|p| p.puts[0].src = 9..8), "source bytes 9..8"),
        (with(&|p| p.puts[0].dst = 2), "rank 2"),
        (
            with(&|p| p.raise.as_mut().unwrap().dst = 5),
            "signal 0 on rank 5",
        ),
    ];
    for (bad, says) in cases {
        let logged = Logged::new(&ranks[0]);
        let e = Proxy::new(&logged)
            .run(&[good.clone(), bad], &ready, &src, T)
            .unwrap_err();
        match &e {
            SchedError::Input { rank: 0, message } => {
                assert!(message.contains("piece 1"), "{message}");
                assert!(message.contains(says), "{message} lacks {says}");
            }
            other => panic!("{says}: {other:?}"),
        }
        assert!(logged.take().is_empty(), "{says}: posted before the check");
    }
    // A put past the receiver's buffer is the transport's error, at once.
    let past = with(&|p| p.puts[0].offset = 8);
    let e = Proxy::new(&ranks[0])
        .run(&[past], &ready, &src, T)
        .unwrap_err();
    assert!(
        matches!(
            e,
            SchedError::Transport(TransportError::OutOfBounds { rank: 0, .. })
        ),
        "{e:?}"
    );
    // The good piece alone goes through.
    let stats = Proxy::new(&ranks[0])
        .run(std::slice::from_ref(&good), &ready, &src, T)
        .unwrap();
    assert_eq!((stats.pieces, stats.bytes), (1, 16));
    ranks[1].wait(0, 1, T).unwrap();
}

/// `ReadyWords` over a plain vector of atomics reads what was stored.
#[test]
fn ready_words_over_atomics() {
    let w = words(3);
    w[1].store(42, Ordering::Release);
    let r: &dyn ReadyWords = &w;
    assert_eq!((r.count(), r.load(0), r.load(1)), (3, 0, 42));
}
