//! The shared transport scenarios (`common`) on the `local` transport
//! (ranks as threads, seeded random delivery delays) for W = 2..4: 64 MiB
//! in random chunks, 100 epochs without resetting buffers, misuse, a wait
//! past its timeout, and a rank killed mid-traffic.

#![cfg(feature = "local")]

mod common;

use comet_transport::local::{local_world, DelayModel, LocalTransport};
use comet_transport::Transport;
use common::*;
use std::time::Duration;

/// Runs `rank` on every rank of local worlds of 2..=4 ranks (one thread
/// each), deliveries delayed by up to `max_delay`.
fn on_worlds(max_delay: Duration, rank: impl Fn(&LocalTransport) + Sync) {
    for w in 2..=4 {
        let world = local_world(
            w,
            Some(DelayModel {
                seed: w as u64,
                max: max_delay,
            }),
        );
        std::thread::scope(|s| {
            for t in &world {
                let rank = &rank;
                s.spawn(move || rank(t));
            }
        });
    }
}

#[test]
fn local_bulk_64mib_two_to_four_ranks() {
    on_worlds(Duration::from_micros(200), |t| {
        bulk(t, 11, 64 * MIB, Delivery::Eager).unwrap();
    });
}

#[test]
fn local_100_epochs_without_reset_two_to_four_ranks() {
    on_worlds(Duration::from_micros(100), |t| {
        epochs(t, 5, 100, 4 * 1024 + 8, Delivery::Eager).unwrap()
    });
}

#[test]
fn local_misuse_and_wait_timeout_are_errors() {
    on_worlds(Duration::from_micros(100), |t| {
        misuse(t).unwrap();
        wait_times_out(t, Duration::from_millis(200)).unwrap();
    });
}

#[test]
fn local_killed_peer_fails_every_other_rank() {
    on_worlds(Duration::from_micros(100), |t| {
        let r = vanished_peer(t, Duration::from_secs(10), || t.kill()).unwrap();
        assert_eq!(r.is_none(), t.rank() == t.world() - 1);
    });
}
