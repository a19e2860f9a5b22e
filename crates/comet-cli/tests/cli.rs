//! The `comet` binary end to end: a verified bench with a loadable trace,
//! the plan printout, and one clear line plus a non-zero exit on bad input.

use std::process::Command;

fn comet(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_comet"))
        .args(args)
        .output()
        .expect("run comet")
}

#[test]
fn bench_prints_a_verified_result_and_a_valid_trace() {
    let dir = std::env::temp_dir().join(format!("comet-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let trace = dir.join("t.json");
    let out = comet(&[
        "bench",
        "--ranks",
        "2",
        "--tokens",
        "24",
        "--iters",
        "1",
        "--bm",
        "8",
        "--delay-us",
        "50",
        "--trace",
        trace.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("| total |"), "{stdout}");
    assert!(
        stdout.contains("fused") && stdout.contains(" ok, baseline"),
        "{stdout}"
    );
    assert!(stdout.contains("cost model"), "{stdout}");

    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let events = v["traceEvents"].as_array().unwrap();
    let complete: Vec<_> = events.iter().filter(|e| e["ph"] == "X").collect();
    assert!(!complete.is_empty());
    for e in &complete {
        assert!(e["ts"].as_f64().unwrap() >= 0.0 && e["dur"].as_f64().unwrap() >= 0.0);
        assert!(e["pid"].as_u64().unwrap() < 2);
    }
    // One compute and one communication track per rank.
    for rank in 0..2u64 {
        for tid in 0..2u64 {
            assert!(
                complete.iter().any(|e| e["pid"] == rank && e["tid"] == tid),
                "rank {rank} track {tid} empty"
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn plan_prints_layout_and_choice() {
    let out = comet(&[
        "plan",
        "--preset",
        "qwen2-moe",
        "--ranks",
        "8",
        "--tokens",
        "1024",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("receive layout") && stdout.contains("communication blocks"),
        "{stdout}"
    );
}

#[test]
fn bad_input_is_one_clear_line_and_a_failure() {
    for (args, needle) in [
        (vec!["bench", "--preset", "gpt-5"], "unknown preset 'gpt-5'"),
        (vec!["bench", "--ranks", "3"], "experts"),
        (
            vec!["bench", "--routing", "sideways"],
            "unknown routing 'sideways'",
        ),
        (vec!["plan", "--device", "tpu"], "unknown --device 'tpu'"),
    ] {
        let out = comet(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
        assert_eq!(lines.len(), 1, "{args:?}: {stderr}");
        assert!(lines[0].contains(needle), "{args:?}: {stderr}");
    }
    let out = comet(&["bench", "--no-such-flag"]);
    assert!(!out.status.success());
}
