//! Bootstrap over loopback TCP, ranks as threads: the collectives, and one
//! test per failure the rendezvous must name.

use comet_transport::bootstrap::{listen, Bootstrap, BootstrapConfig, BootstrapError, PeerState};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::thread;
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

fn cfg(rank: usize, world: usize, port: u16, timeout: Duration) -> BootstrapConfig {
    BootstrapConfig {
        timeout,
        ..BootstrapConfig::local(rank, world, port)
    }
}

/// Starts rank 0 on a fresh port and runs `f(rank, result)` for every rank
/// of `ranks` (each a claimed rank and world) on its own thread.
fn world<R: Send + 'static>(
    ranks: Vec<(usize, usize)>,
    timeout: Duration,
    f: impl Fn(usize, Result<Bootstrap, BootstrapError>) -> R + Send + Sync + Clone + 'static,
) -> Vec<R> {
    let l = listen("127.0.0.1", 0).unwrap();
    let port = l.local_addr().unwrap().port();
    let mut l = Some(l);
    let hs: Vec<_> = ranks
        .into_iter()
        .map(|(rank, w)| {
            let f = f.clone();
            let c = cfg(rank, w, port, timeout);
            let l = if rank == 0 { l.take() } else { None };
            thread::spawn(move || match l {
                Some(l) => f(rank, Bootstrap::with_listener(c, l)),
                None => f(rank, Bootstrap::connect(c)),
            })
        })
        .collect();
    hs.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn all_gather_and_barrier_for_two_to_four_ranks() {
    for w in 2..=4 {
        world((0..w).map(|r| (r, w)).collect(), T, move |rank, b| {
            let b = b.unwrap();
            assert_eq!((b.rank(), b.world()), (rank, w));
            for round in 0..20u8 {
                // Blobs of different lengths, including empty ones.
                let mine = vec![round ^ rank as u8; (rank * 37 + round as usize) % 5000];
                let all = b.all_gather(&mine, T).unwrap();
                assert_eq!(all.len(), w);
                for (r, blob) in all.iter().enumerate() {
                    assert_eq!(
                        *blob,
                        vec![round ^ r as u8; (r * 37 + round as usize) % 5000],
                        "round {round} rank {r}"
                    );
                }
                b.barrier(T).unwrap();
            }
            let big = vec![rank as u8; 3 << 20];
            let all = b.all_gather(&big, T).unwrap();
            assert!(all
                .iter()
                .enumerate()
                .all(|(r, v)| v.len() == 3 << 20 && v.iter().all(|&x| x == r as u8)));
            b.barrier(T).unwrap();
        });
    }
}

#[test]
fn wrong_world_size_is_named_on_both_sides() {
    let out = world(vec![(0, 2), (1, 3)], T, |_, b| b.map(|_| ()));
    assert!(
        matches!(
            &out[0],
            Err(BootstrapError::WorldMismatch {
                peer: 1,
                theirs: 3,
                ours: 2
            })
        ),
        "{:?}",
        out[0]
    );
    match &out[1] {
        Err(BootstrapError::Rejected { rank: 1, reason }) => {
            assert!(reason.contains("3 ranks"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn duplicate_rank_is_refused() {
    let out = world(vec![(0, 3), (1, 3), (1, 3)], T, |_, b| b.map(|_| ()));
    assert!(
        matches!(&out[0], Err(BootstrapError::DuplicateRank { rank: 1 })),
        "{:?}",
        out[0]
    );
    // One claimant is refused; the other loses rank 0 during the rendezvous.
    let refused = out[1..]
        .iter()
        .filter(|r| matches!(r, Err(BootstrapError::Rejected { .. })))
        .count();
    let lost = out[1..]
        .iter()
        .filter(|r| matches!(r, Err(BootstrapError::PeerGone { peer: 0, .. })))
        .count();
    assert_eq!((refused, lost), (1, 1), "{out:?}");
}

#[test]
fn port_taken_is_named() {
    let squatter = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = squatter.local_addr().unwrap().port();
    match Bootstrap::connect(cfg(0, 2, port, T)) {
        Err(BootstrapError::PortTaken { addr, .. }) => assert!(addr.ends_with(&port.to_string())),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_rank_that_never_comes_is_named() {
    let out = world(vec![(0, 3), (1, 3)], Duration::from_millis(400), |_, b| {
        b.map(|_| ())
    });
    match &out[0] {
        Err(BootstrapError::MissingRanks { missing, .. }) => assert_eq!(missing, &vec![2]),
        other => panic!("{other:?}"),
    }
    assert!(
        matches!(
            &out[1],
            Err(BootstrapError::PeerGone { peer: 0, .. }) | Err(BootstrapError::Timeout { .. })
        ),
        "{:?}",
        out[1]
    );
}

#[test]
fn no_master_is_unreachable() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    match Bootstrap::connect(cfg(1, 2, port, Duration::from_millis(300))) {
        Err(BootstrapError::Unreachable { rank: 1, .. }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_stranger_on_the_port_is_a_protocol_error() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let h = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = [0u8; 64];
        let _ = s.read(&mut buf);
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
    });
    match Bootstrap::connect(cfg(1, 2, port, Duration::from_secs(5))) {
        Err(BootstrapError::Protocol { detail, .. }) => {
            assert!(detail.contains("magic"), "{detail}")
        }
        other => panic!("{other:?}"),
    }
    h.join().unwrap();
}

#[test]
fn a_vanished_peer_fails_every_collective() {
    // Rank 2 crashes after the rendezvous; ranks 0 and 1 are in a collective.
    let out = world(vec![(0, 3), (1, 3), (2, 3)], T, |rank, b| {
        let b = b.unwrap();
        b.barrier(T).unwrap();
        if rank == 2 {
            b.abandon();
            return None;
        }
        let e = b.all_gather(b"x", T).unwrap_err();
        Some((e, b.peer_state(2)))
    });
    for (rank, o) in out.into_iter().enumerate().take(2) {
        let (e, state) = o.unwrap();
        assert!(
            matches!(e, BootstrapError::PeerGone { peer: 2, .. }),
            "rank {rank}: {e:?}"
        );
        assert!(
            matches!(state, PeerState::Gone(_)),
            "rank {rank}: {state:?}"
        );
    }
}

#[test]
fn a_vanished_root_fails_the_others() {
    let out = world(vec![(0, 3), (1, 3), (2, 3)], T, |rank, b| {
        let b = b.unwrap();
        b.barrier(T).unwrap();
        if rank == 0 {
            b.abandon();
            return None;
        }
        Some(b.barrier(T).unwrap_err())
    });
    for e in out.into_iter().flatten() {
        assert!(
            matches!(e, BootstrapError::PeerGone { peer: 0, .. }),
            "{e:?}"
        );
    }
}

#[test]
fn a_rank_that_skips_a_collective_times_out_by_name() {
    let out = world(vec![(0, 2), (1, 2)], T, |rank, b| {
        let b = b.unwrap();
        if rank == 1 {
            // Never joins; stays connected past rank 0's deadline.
            thread::sleep(Duration::from_millis(600));
            return None;
        }
        Some(b.barrier(Duration::from_millis(200)).unwrap_err())
    });
    match &out[0] {
        Some(BootstrapError::Timeout { missing, .. }) => assert_eq!(missing, &vec![1]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_orderly_exit_is_no_failure_but_cannot_join_collectives() {
    let out = world(vec![(0, 2), (1, 2)], T, |rank, b| {
        let b = b.unwrap();
        b.barrier(T).unwrap();
        if rank == 1 {
            drop(b);
            return None;
        }
        thread::sleep(Duration::from_millis(100));
        Some((b.check_peers(), b.peer_state(1), b.barrier(T).unwrap_err()))
    });
    let (check, state, e) = out[0].clone().unwrap();
    assert_eq!(check, Ok(()));
    assert_eq!(state, PeerState::Departed);
    assert!(
        matches!(e, BootstrapError::PeerGone { peer: 1, .. }),
        "{e:?}"
    );
}

#[test]
fn strangers_on_rank_0s_port_are_ignored() {
    let l = listen("127.0.0.1", 0).unwrap();
    let port = l.local_addr().unwrap().port();
    // A port scanner that connects and leaves, and one that speaks HTTP.
    let _ = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut http = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    http.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let root = thread::spawn(move || Bootstrap::with_listener(cfg(0, 2, port, T), l));
    let one = Bootstrap::connect(cfg(1, 2, port, T)).unwrap();
    let root = root.join().unwrap().unwrap();
    let h = thread::spawn(move || one.all_gather(b"b", T).unwrap());
    let all = root.all_gather(b"a", T).unwrap();
    assert_eq!(all, vec![b"a".to_vec(), b"b".to_vec()]);
    assert_eq!(h.join().unwrap(), all);
    drop(http);
}

#[test]
fn a_rank_of_another_protocol_version_is_refused() {
    let l = listen("127.0.0.1", 0).unwrap();
    let port = l.local_addr().unwrap().port();
    let root = thread::spawn(move || Bootstrap::with_listener(cfg(0, 2, port, T), l));
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    // The frame header of a hello from protocol version 99.
    let mut frame = 0x434d_5442u32.to_le_bytes().to_vec();
    frame.extend_from_slice(&99u16.to_le_bytes());
    frame.extend_from_slice(&1u16.to_le_bytes());
    frame.extend_from_slice(&8u32.to_le_bytes());
    frame.extend_from_slice(&[1, 0, 0, 0, 2, 0, 0, 0]);
    s.write_all(&frame).unwrap();
    match root.join().unwrap() {
        Err(BootstrapError::Protocol { detail, .. }) => {
            assert!(detail.contains("version 99"), "{detail}")
        }
        other => panic!("{other:?}"),
    }
}

/// A peer that joined, sent its part of an all_gather and then stopped
/// reading (its process frozen): rank 0's write of the result stands still
/// once the socket's buffers are full, and ends in an error within the
/// bootstrap's timeout instead of blocking rank 0 for good.
#[test]
fn a_write_to_a_peer_that_stopped_reading_is_an_error() {
    let l = listen("127.0.0.1", 0).unwrap();
    let port = l.local_addr().unwrap().port();
    let quick = Duration::from_secs(1);
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let root = Bootstrap::with_listener(cfg(0, 2, port, quick), l).unwrap();
        // Far more than loopback's socket buffers hold.
        let _ = tx.send(root.all_gather(&vec![7u8; 64 << 20], T));
    });
    let frame = |kind: u16, payload: &[u8]| {
        let mut f = 0x434d_5442u32.to_le_bytes().to_vec();
        f.extend_from_slice(&1u16.to_le_bytes());
        f.extend_from_slice(&kind.to_le_bytes());
        f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        f.extend_from_slice(payload);
        f
    };
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&frame(1, &[1, 0, 0, 0, 2, 0, 0, 0])).unwrap();
    let mut welcome = [0u8; 12];
    s.read_exact(&mut welcome).unwrap();
    assert_eq!(u16::from_le_bytes([welcome[6], welcome[7]]), 2, "a welcome");
    // Its part of all_gather #0, then nothing more is read.
    let mut gather = 0u64.to_le_bytes().to_vec();
    gather.push(1);
    s.write_all(&frame(4, &gather)).unwrap();
    let got = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("rank 0 still blocked writing to a peer that stopped reading");
    match got {
        Err(BootstrapError::Io { context, .. }) => {
            assert!(context.contains("all_gather #0 to rank 1"), "{context}")
        }
        other => panic!("{:?}", other.map(|b| b.len())),
    }
    drop(s);
}
