//! The shared transport scenarios on the `local` transport (ranks as
//! threads, seeded random delivery delays): 64 MiB in random chunks, and
//! 100 epochs without resetting buffers, for W = 2..4.

#![cfg(feature = "local")]

mod common;

use comet_transport::local::{local_world, DelayModel};
use common::*;
use std::time::Duration;

#[test]
fn local_bulk_64mib_two_to_four_ranks() {
    for w in 2..=4 {
        let world = local_world(
            w,
            Some(DelayModel {
                seed: w as u64,
                max: Duration::from_micros(200),
            }),
        );
        std::thread::scope(|s| {
            for t in &world {
                s.spawn(move || bulk(t, 11, 64 * MIB).unwrap());
            }
        });
    }
}

#[test]
fn local_100_epochs_without_reset_two_to_four_ranks() {
    for w in 2..=4 {
        let world = local_world(
            w,
            Some(DelayModel {
                seed: 3,
                max: Duration::from_micros(100),
            }),
        );
        std::thread::scope(|s| {
            for t in &world {
                s.spawn(move || epochs(t, 5, 100, 4 * 1024 + 8).unwrap());
            }
        });
    }
}
