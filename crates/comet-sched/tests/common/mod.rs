//! Worlds of processes of a test binary (over UCX, or any transport that
//! bootstraps from the launcher's environment), shared by the staged
//! proxy's CPU tests and the proxied layer's GPU tests (UCX, NCCL; their
//! checked calls: [`layer`]): each rank is one `#[ignore]`d entry test of
//! the binary, inert unless the launcher set
//! `COMET_TEST_SCENARIO`, which prints `marker(rank, scenario)` once it ran
//! to its end; a rank that kills itself mid-layer must leave every other
//! rank with an error naming it.
#![allow(dead_code)]

#[cfg(feature = "gpu")]
pub mod layer;

use comet_transport::launch::{launch, LaunchConfig, LaunchError, LaunchReport, OnFailure};
use std::time::Duration;

/// The line a rank prints once its scenario ran to the end.
pub fn marker(rank: usize, scenario: &str) -> String {
    format!("rank {rank}: {scenario} done")
}

/// Runs `world` ranks of this binary's `entry` test over UCX with `tls`.
pub fn launch_world(
    entry: &str,
    scenario: &str,
    world: usize,
    tls: &str,
    on_failure: OnFailure,
    timeout: Duration,
) -> Result<LaunchReport, LaunchError> {
    launch_world_env(entry, scenario, world, tls, &[], on_failure, timeout)
}

/// As [`launch_world`], with `extra` in every rank's environment too.
pub fn launch_world_env(
    entry: &str,
    scenario: &str,
    world: usize,
    tls: &str,
    extra: &[(&str, &str)],
    on_failure: OnFailure,
    timeout: Duration,
) -> Result<LaunchReport, LaunchError> {
    // UCX 1.13's shared-memory transports cannot report peer failures.
    let peer_errors = if tls.starts_with("tcp") { "1" } else { "0" };
    let mut env = vec![
        ("UCX_TLS", tls),
        ("COMET_UCX_PEER_ERRORS", peer_errors),
        ("COMET_UCX_TIMEOUT_S", "60"),
    ];
    env.extend_from_slice(extra);
    launch_ranks(entry, scenario, world, &env, on_failure, timeout)
}

/// Runs `world` ranks of this binary's `entry` test with `env` (and
/// `COMET_TEST_SCENARIO`, `NCCL_NVLS_ENABLE=0`), each through the
/// torchrun-style bootstrap of the launcher.
pub fn launch_ranks(
    entry: &str,
    scenario: &str,
    world: usize,
    env: &[(&str, &str)],
    on_failure: OnFailure,
    timeout: Duration,
) -> Result<LaunchReport, LaunchError> {
    let exe = std::env::current_exe().expect("test binary path");
    let args = [
        entry,
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ];
    let mut cfg = LaunchConfig::new(world, exe).args(args.map(String::from).to_vec());
    let fixed = [("COMET_TEST_SCENARIO", scenario), ("NCCL_NVLS_ENABLE", "0")];
    for (k, v) in fixed.iter().chain(env) {
        cfg = cfg.env(k, v);
    }
    cfg.timeout = Some(timeout);
    cfg.on_failure = on_failure;
    cfg.capture = true;
    cfg.forward = std::env::var_os("COMET_TEST_VERBOSE").is_some();
    launch(&cfg)
}

/// Every rank's output, for failure messages.
pub fn text(rep: &LaunchReport) -> String {
    rep.ranks
        .iter()
        .map(|r| format!("--- rank {} ({}):\n{}", r.rank, r.describe(), r.text()))
        .collect()
}

/// Every rank of a `world` over `tls` ran `scenario` to its end.
pub fn assert_all_done(
    r: Result<LaunchReport, LaunchError>,
    scenario: &str,
    world: usize,
    tls: &str,
) {
    let rep = match r {
        Ok(r) => r,
        Err(e) => panic!(
            "{world} ranks over {tls}: {e}\n{}",
            e.report().map(text).unwrap_or_default()
        ),
    };
    for r in &rep.ranks {
        assert!(
            r.output
                .iter()
                .any(|l| l.contains(&marker(r.rank, scenario))),
            "{world} ranks over {tls}:\n{}",
            text(&rep)
        );
    }
}

/// The last rank died by SIGKILL and every other one came out of its call
/// with an error naming it (printed as "error as expected ... peer N"),
/// then ran `scenario` to its end: no hang, no abort.
pub fn assert_victim_named(
    r: Result<LaunchReport, LaunchError>,
    scenario: &str,
    world: usize,
    tls: &str,
) {
    let rep = match r {
        Err(LaunchError::Failed { failed, report }) => {
            assert_eq!(
                failed,
                vec![world - 1],
                "only the victim may fail:\n{}",
                text(&report)
            );
            report
        }
        other => panic!("{world} over {tls}: the victim should have died: {other:?}"),
    };
    assert_eq!(rep.ranks[world - 1].signal, Some(9), "{}", text(&rep));
    for r in &rep.ranks[..world - 1] {
        let said = r.text();
        assert!(
            r.success()
                && said.contains("error as expected")
                && said.contains(&format!("peer {}", world - 1))
                && said.contains(&marker(r.rank, scenario)),
            "{world} over {tls}, rank {}:\n{said}",
            r.rank
        );
    }
}

/// Ends this process at once, as a crash would (the launcher sees SIGKILL).
pub fn die() -> ! {
    let _ = std::process::Command::new("sh")
        .args(["-c", "kill -KILL $PPID"])
        .status();
    std::thread::sleep(Duration::from_secs(60));
    panic!("still alive after SIGKILL");
}
