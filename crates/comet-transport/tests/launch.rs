//! The launcher: torchrun environment, output, failures and deadlines; and
//! a bootstrapped world of W processes of this test binary.

mod common;

use comet_transport::bootstrap::Bootstrap;
use comet_transport::launch::{launch, LaunchConfig, LaunchError, OnFailure};
use common::*;
use std::time::Duration;

fn sh(world: usize, script: &str) -> LaunchConfig {
    let mut c = LaunchConfig::new(world, "sh").args(["-c", script]);
    c.capture = true;
    c.forward = false;
    c.timeout = Some(Duration::from_secs(60));
    c
}

#[test]
fn every_rank_gets_the_torchrun_environment() {
    let rep = launch(&sh(
        3,
        "echo \"$RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $MASTER_ADDR $MASTER_PORT\"",
    ))
    .unwrap();
    assert_eq!(rep.ranks.len(), 3);
    for r in &rep.ranks {
        assert!(r.success());
        assert_eq!(
            r.output,
            vec![format!(
                "{0} 3 {0} 3 127.0.0.1 {1}",
                r.rank, rep.master_port
            )]
        );
    }
}

#[test]
fn stderr_is_kept_too() {
    let rep = launch(&sh(2, "echo out; echo err >&2")).unwrap();
    for r in &rep.ranks {
        let mut o = r.output.clone();
        o.sort();
        assert_eq!(o, vec!["err".to_string(), "out".to_string()]);
    }
}

#[test]
fn one_failing_rank_stops_the_others() {
    let c = sh(
        3,
        "if [ \"$RANK\" = 1 ]; then echo dying; exit 3; fi; exec sleep 30",
    );
    let r = launch(&c);
    let message = r.as_ref().err().map(|e| e.to_string()).unwrap_or_default();
    match r {
        Err(LaunchError::RankFailed {
            rank: 1,
            status,
            stopped,
            report,
        }) => {
            assert_eq!(status, "exit code 3");
            assert_eq!(stopped, vec![0, 2]);
            assert_eq!(report.ranks[1].output, vec!["dying".to_string()]);
            assert!(report.ranks[0].killed_by_launcher && report.ranks[2].killed_by_launcher);
            assert!(
                message.ends_with("; ranks [0, 2] were stopped"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn no_stopped_ranks_are_claimed_when_there_were_none() {
    // A world of one, and a world whose other rank had already finished.
    for (world, script) in [
        (1, "exit 3"),
        (
            2,
            "if [ \"$RANK\" = 1 ]; then sleep 0.5; exit 4; fi; exit 0",
        ),
    ] {
        match &launch(&sh(world, script)) {
            Err(e @ LaunchError::RankFailed { stopped, .. }) => {
                assert!(stopped.is_empty(), "{e}");
                assert!(!e.to_string().contains("stopped"), "{e}");
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn too_many_ranks_are_refused_up_front() {
    let start = std::time::Instant::now();
    match launch(&LaunchConfig::new(1_000_000, "true")) {
        Err(LaunchError::Config(m)) => assert!(m.contains("limit of 1024"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(1));
}

#[test]
fn failures_are_reported_when_others_may_finish() {
    let mut c = sh(2, "exit $RANK");
    c.on_failure = OnFailure::Wait;
    match launch(&c) {
        Err(LaunchError::Failed { failed, report }) => {
            assert_eq!(failed, vec![1]);
            assert!(report.ranks[0].success());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_deadline_kills_everyone() {
    let mut c = sh(2, "exec sleep 30");
    c.timeout = Some(Duration::from_millis(300));
    match launch(&c) {
        Err(LaunchError::Timeout { running, .. }) => assert_eq!(running, vec![0, 1]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_missing_program_is_a_spawn_error() {
    let c = LaunchConfig::new(2, "/nonexistent/comet-no-such-program");
    assert!(matches!(
        launch(&c),
        Err(LaunchError::Spawn { rank: 0, .. })
    ));
    assert!(matches!(
        launch(&LaunchConfig::new(0, "sh")),
        Err(LaunchError::Config(_))
    ));
}

/// One rank of `processes_bootstrap_through_the_launcher`.
#[test]
#[ignore = "a rank of a multi-process test, started by the launcher"]
fn boot_rank() {
    if std::env::var_os("COMET_TEST_SCENARIO").is_none() {
        return;
    }
    let b = Bootstrap::from_env().expect("bootstrap from the launcher's environment");
    let blob = format!("rank {} pid {}", b.rank(), std::process::id());
    let all = b.all_gather(blob.as_bytes(), T).unwrap();
    for (r, x) in all.iter().enumerate() {
        assert!(String::from_utf8_lossy(x).starts_with(&format!("rank {r} pid")));
    }
    b.barrier(T).unwrap();
    println!("rank {} of {} joined", b.rank(), b.world());
}

#[test]
fn processes_bootstrap_through_the_launcher() {
    for w in 2..=4 {
        let rep = expect_ok(launch_self(
            "boot_rank",
            w,
            &[("COMET_TEST_SCENARIO", "boot")],
            OnFailure::KillAll,
        ));
        for r in &rep.ranks {
            assert!(
                r.text().contains(&format!("rank {} of {w} joined", r.rank)),
                "{}",
                r.text()
            );
        }
    }
}
