//! UCX for real: W = 2..4 processes of this test binary, started by the
//! launcher, bootstrap over loopback TCP and move data with UCX (TCP or
//! shared memory, per `UCX_TLS`). No GPU needed.
#![cfg(feature = "ucx")]

mod common;

use comet_transport::launch::{LaunchReport, OnFailure};
use comet_transport::ucx::{UcxConfig, UcxTransport};
use comet_transport::{SignalOp, Transport, TransportError};
use common::*;
use std::time::Duration;

const ENTRY: &str = "ucx_rank";

/// The line a rank prints once it ran its scenario to the end; the parent
/// checks it on every rank, so a rank that returned early (no scenario
/// variable, a test filter that matched nothing) fails the test.
fn done_marker(rank: usize, scenario: &str) -> String {
    format!("ucx_rank {rank}: scenario {scenario} done")
}

/// One rank: runs the scenario named by `COMET_TEST_SCENARIO` (inert
/// without it: only the launcher starts this entry point).
#[test]
#[ignore = "a rank of a multi-process test, started by the launcher"]
fn ucx_rank() {
    let Ok(scenario) = std::env::var("COMET_TEST_SCENARIO") else {
        return;
    };
    let seed: u64 = std::env::var("COMET_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let t = UcxTransport::from_env().expect("ucx transport");
    match scenario.as_str() {
        "bulk" => {
            let sum = bulk(&t, seed, 64 * MIB, Delivery::Eager).expect("bulk exchange");
            println!("rank {} received checksum {sum:016x}", t.rank());
        }
        "epochs" => epochs(&t, seed, 100, 8 * 1024 + 40, Delivery::Eager).expect("100 epochs"),
        "errors" => {
            misuse(&t).expect("misuse");
            wait_times_out(&t, Duration::from_millis(300)).expect("wait timeout");
        }
        "kill" => kill_scenario(&t),
        other => panic!("unknown scenario {other}"),
    }
    println!("{}", done_marker(t.rank(), &scenario));
}

/// Every rank of `rep` ran `scenario` to its end.
fn assert_ran(rep: &LaunchReport, scenario: &str) {
    assert_markers(rep, |r| done_marker(r, scenario));
}

/// The last rank dies (SIGKILL) in the middle of sending, its puts
/// acknowledged first (see the module docs of `ucx` on ranks that die with
/// emulated puts in flight); every other rank must come out with an error.
fn kill_scenario(t: &UcxTransport) {
    let die = || {
        t.flush().unwrap();
        let _ = std::process::Command::new("sh")
            .args(["-c", "kill -KILL $PPID"])
            .status();
        std::thread::sleep(Duration::from_secs(60));
        panic!("still alive after SIGKILL");
    };
    let e = vanished_peer(t, Duration::from_secs(30), die).expect("the traffic before the loss");
    println!("rank {}: error as expected: {e:?}", t.rank());
    // Stay (without progressing UCX) until the other survivors have seen the
    // failure too, so none of them acknowledges a put from an exited rank.
    std::thread::sleep(Duration::from_millis(300));
    // What a layer whose kernels timed out asks: the lost peer, by name.
    let victim = t.world() - 1;
    match t.peers_alive() {
        Err(TransportError::PeerGone { peer, .. }) if peer == victim => {}
        other => panic!(
            "rank {}: peers_alive after rank {victim} died: {other:?}",
            t.rank()
        ),
    }
}

/// UCX 1.13's shared-memory transports cannot report peer failures: say
/// so up front instead of letting UCX log a refused endpoint first.
fn peer_errors(tls: &str) -> &'static str {
    if tls.starts_with("tcp") {
        "1"
    } else {
        "0"
    }
}

fn run(scenario: &str, world: usize, tls: &str, ordering: &str) {
    let rep = expect_ok(launch_self(
        ENTRY,
        world,
        &[
            ("COMET_TEST_SCENARIO", scenario),
            ("COMET_TEST_SEED", "7"),
            ("UCX_TLS", tls),
            ("COMET_UCX_PEER_ERRORS", peer_errors(tls)),
            ("COMET_UCX_ORDERING", ordering),
            ("COMET_UCX_TIMEOUT_S", "60"),
        ],
        OnFailure::KillAll,
    ));
    assert_eq!(rep.ranks.len(), world);
    assert_ran(&rep, scenario);
}

#[test]
fn ucx_bulk_64mib_two_ranks_tcp() {
    run("bulk", 2, "tcp", "fence");
}

#[test]
fn ucx_bulk_64mib_three_ranks_shm() {
    run("bulk", 3, "sm,self", "fence");
}

#[test]
fn ucx_bulk_64mib_four_ranks_tcp() {
    run("bulk", 4, "tcp", "flush");
}

#[test]
fn ucx_100_epochs_without_reset_tcp() {
    run("epochs", 3, "tcp", "fence");
}

#[test]
fn ucx_100_epochs_without_reset_shm() {
    run("epochs", 2, "sm,self", "flush");
    run("epochs", 4, "sm,self", "fence");
}

#[test]
fn ucx_misuse_and_wait_timeout_are_errors() {
    run("errors", 2, "tcp", "fence");
    run("errors", 3, "sm,self", "flush");
}

#[test]
fn ucx_killed_peer_fails_every_other_rank() {
    for (world, tls) in [(2, "tcp"), (3, "tcp"), (3, "sm,self")] {
        let env = [
            ("COMET_TEST_SCENARIO", "kill"),
            ("UCX_TLS", tls),
            ("COMET_UCX_PEER_ERRORS", peer_errors(tls)),
        ];
        let r = launch_self(ENTRY, world, &env, OnFailure::Wait);
        let rep = match r {
            Err(comet_transport::launch::LaunchError::Failed { failed, report }) => {
                assert_eq!(
                    failed,
                    vec![world - 1],
                    "only the victim may fail: {report:#?}"
                );
                report
            }
            other => panic!("the victim should have died: {other:?}"),
        };
        assert_eq!(
            rep.ranks[world - 1].signal,
            Some(9),
            "victim: {}",
            rep.ranks[world - 1].describe()
        );
        for r in &rep.ranks[..world - 1] {
            assert!(
                r.text().contains("error as expected"),
                "rank {}:\n{}",
                r.rank,
                r.text()
            );
        }
        // The survivors ran the scenario to its end; the victim never did.
        let survivors = LaunchReport {
            master_port: rep.master_port,
            ranks: rep.ranks[..world - 1].to_vec(),
        };
        assert_ran(&survivors, "kill");
        assert!(!rep.ranks[world - 1]
            .output
            .iter()
            .any(|l| l.contains(&done_marker(world - 1, "kill"))));
    }
}

extern "C" {
    fn dlsym(
        handle: *mut std::ffi::c_void,
        symbol: *const std::ffi::c_char,
    ) -> *mut std::ffi::c_void;
}

/// The UCX this process loaded reports a version with the `*_nbx` API
/// (1.10 and later) and really exports every `*_nbx` entry point the
/// transport's C layer calls.
#[test]
fn ucx_library_has_the_nbx_api() {
    let (major, minor, _) = comet_transport::ucx::ucx_version();
    assert!(
        major >= 1 && (major > 1 || minor >= 10),
        "UCX {major}.{minor} lacks the *_nbx API"
    );
    for name in [
        c"ucp_put_nbx",
        c"ucp_atomic_op_nbx",
        c"ucp_ep_flush_nbx",
        c"ucp_worker_flush_nbx",
        c"ucp_ep_close_nbx",
    ] {
        // RTLD_DEFAULT (a null handle on glibc): search every loaded object.
        // SAFETY: dlsym only reads the NUL-terminated name.
        let p = unsafe { dlsym(std::ptr::null_mut(), name.as_ptr()) };
        assert!(!p.is_null(), "the loaded libucp has no {name:?}");
    }
}

fn world_of_one(cfg: UcxConfig) -> Result<UcxTransport, TransportError> {
    use comet_transport::bootstrap::{listen, Bootstrap, BootstrapConfig};
    let l = listen("127.0.0.1", 0).unwrap();
    let b = Bootstrap::with_listener(BootstrapConfig::local(0, 1, 0), l)?;
    UcxTransport::new(b, cfg)
}

#[test]
fn ucx_world_of_one_puts_and_signals_itself() {
    let t = world_of_one(UcxConfig::default()).unwrap();
    let b = t.alloc_buffer(1000).unwrap();
    t.alloc_signals(3).unwrap();
    let data: Vec<u8> = (0..200u32).map(|i| (i * 7 + 1) as u8).collect();
    t.put(0, b, 800, &data).unwrap();
    t.signal(0, 2, SignalOp::Set(5)).unwrap();
    t.signal(0, 2, SignalOp::Add(2)).unwrap();
    assert_eq!(t.wait(2, 7, T).unwrap(), 7);
    let mut out = vec![0u8; 200];
    t.read(b, 800, &mut out).unwrap();
    assert_eq!(out, data);
    misuse(&t).unwrap();
    wait_times_out(&t, Duration::from_millis(100)).unwrap();
    t.barrier(T).unwrap();
}

/// The ranks of one process (`UcxTransport::in_process`, what `comet bench
/// --gpu --transport ucx` runs without the launcher) pass every shared
/// scenario, each rank on a thread of its own.
#[test]
fn ucx_ranks_of_one_process_pass_the_shared_scenarios() {
    let ts = UcxTransport::in_process(3, UcxConfig::default()).unwrap();
    assert_eq!(
        ts.iter().map(|t| (t.rank(), t.world())).collect::<Vec<_>>(),
        [(0, 3), (1, 3), (2, 3)]
    );
    std::thread::scope(|s| {
        let runs: Vec<_> = ts
            .iter()
            .map(|t| s.spawn(move || all(t, 11, Delivery::Eager)))
            .collect();
        for (r, h) in runs.into_iter().enumerate() {
            h.join()
                .unwrap_or_else(|_| panic!("rank {r} panicked"))
                .unwrap_or_else(|e| panic!("rank {r}: {e}"));
        }
    });
}
