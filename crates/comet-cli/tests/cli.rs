//! The `comet` binary end to end: a verified bench with a loadable trace,
//! the plan printout, and one clear line plus a non-zero exit on bad input.

use std::process::Command;
use std::time::{Duration, Instant};

fn comet(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_comet"))
        .args(args)
        .output()
        .expect("run comet")
}

/// Runs comet expecting success; returns stdout.
fn succeeds(args: &[&str]) -> String {
    let out = comet(args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{args:?}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Checks that `out` of comet `args` is a failure whose stderr has exactly
/// one line mentioning "error", containing `needle`. Returns stderr.
fn one_error_line(args: &[&str], out: &std::process::Output, needle: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} succeeded:\n{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(lines.len(), 1, "{args:?}: {stderr}");
    assert!(lines[0].contains(needle), "{args:?}: {stderr}");
    stderr
}

/// Runs comet expecting a failure: exactly one line mentioning "error",
/// containing `needle`, within `within`. Returns stderr.
fn fails_with(args: &[&str], env: &[(&str, &str)], needle: &str, within: Duration) -> String {
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_comet"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run comet");
    let took = start.elapsed();
    let stderr = one_error_line(args, &out, needle);
    assert!(took < within, "{args:?} took {took:?}: {stderr}");
    stderr
}

#[test]
fn bench_prints_a_verified_result_and_a_valid_trace() {
    let dir = std::env::temp_dir().join(format!("comet-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let trace = dir.join("t.json");
    let stdout = succeeds(&[
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

/// qwen2-moe over 8 ranks, 1024 tokens a rank: what the plan tests print.
const QWEN_PLAN: [&str; 7] = [
    "plan",
    "--preset",
    "qwen2-moe",
    "--ranks",
    "8",
    "--tokens",
    "1024",
];

#[test]
fn plan_prints_layout_and_choice() {
    let stdout = succeeds(&QWEN_PLAN);
    assert!(
        stdout.contains("receive layout") && stdout.contains("communication blocks"),
        "{stdout}"
    );
}

/// A bound on the receive rows sizes the device forward's buffers (and a
/// staged rank's mirrors and images with them).
#[test]
fn plan_takes_a_bound_on_the_receive_rows() {
    let worst = succeeds(&QWEN_PLAN);
    assert!(worst.contains("65536 receive rows"), "{worst}");
    let bound = succeeds(&[&QWEN_PLAN[..], &["--recv-rows", "16384"]].concat());
    assert!(bound.contains("16384 receive rows"), "{bound}");
}

/// Blocks given to a rank alone overlap its copies, as the bench runs it.
#[test]
fn plan_shows_blocks_given_to_a_rank_alone() {
    let args = [
        "plan",
        "--preset",
        "qwen2-moe",
        "--ranks",
        "1",
        "--tokens",
        "1024",
    ];
    let alone = succeeds(&args);
    assert!(alone.contains("overlap: false"), "{alone}");
    let given = succeeds(&[&args[..], &["--comm-sms", "16"]].concat());
    assert!(
        given.contains("overlap: true (communication blocks given;"),
        "{given}"
    );
    assert!(given.contains("GEMM grid: 116 CTAs overlapping"), "{given}");
}

/// The plan says how dispatch crosses the link: kernels store rows over
/// NVLink; the socket path is a host proxy's, token-once.
/// qwen2-moe over 2 ranks, 1024 tokens a rank.
const QWEN_TWO: [&str; 7] = [
    "plan",
    "--preset",
    "qwen2-moe",
    "--ranks",
    "2",
    "--tokens",
    "1024",
];

#[test]
fn plan_names_the_dispatch_format_of_the_link() {
    let args = QWEN_TWO;
    let nvlink = succeeds(&args);
    assert!(
        nvlink.contains("dispatch a row per (token, expert)"),
        "{nvlink}"
    );
    let socket = succeeds(&[&args[..], &["--device", "h200-socket"]].concat());
    assert!(socket.contains("dispatch token-once"), "{socket}");
}

/// Expert groups in the plan: the model's where a combine overlaps,
/// given ones shown, and refused behind a token-once proxy by name.
#[test]
fn plan_shows_expert_groups_given_and_refuses_them_token_once() {
    let args = [&QWEN_TWO[..], &["--device", "h200-socket"]].concat();
    let rows = succeeds(&[&args[..], &["--wire", "rows", "--groups", "4"]].concat());
    assert!(rows.contains("expert groups: 4 ("), "{rows}");
    assert!(
        rows.contains("dispatch a row per (token, expert)"),
        "{rows}"
    );
    let tokens = succeeds(&args);
    assert!(tokens.contains("expert groups: 1 ("), "{tokens}");
    let refused = [&args[..], &["--groups", "4"]].concat();
    one_error_line(&refused, &comet(&refused), "token-once");
    let nvlink = ["plan", "--wire", "rows"];
    one_error_line(&nvlink, &comet(&nvlink), "--device h200-socket");
    let bad = ["plan", "--device", "h200-socket", "--wire", "bytes"];
    one_error_line(&bad, &comet(&bad), "unknown --wire 'bytes'");
}

/// A rank alone moves its rows in the GEMMs' side warps; chunks given
/// are shown, and a count that is not whole FC2 tiles is refused naming
/// the counts that are.
#[test]
fn plan_of_a_rank_alone_shows_side_warps_and_chunks_given() {
    let alone = ["plan", "--preset", "qwen2-moe", "--ranks", "1"];
    let model = succeeds(&alone);
    assert!(
        model.contains("idle producer warps move the rows"),
        "{model}"
    );
    let two = succeeds(&[&alone[..], &["--chunks", "2"]].concat());
    assert!(two.contains("layer1 chunks: 2 x 1792 cols"), "{two}");
    let refused = [&alone[..], &["--chunks", "4"]].concat();
    one_error_line(&refused, &comet(&refused), "1, 2, 7, 14");
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
        one_error_line(&args, &comet(&args), needle);
    }
    let out = comet(&["bench", "--no-such-flag"]);
    assert!(!out.status.success());
}

#[test]
fn bad_values_are_refused_up_front_naming_the_flag() {
    let quick = Duration::from_secs(5);
    for (args, needle) in [
        (
            vec!["bench", "--tokens", "0"],
            "--tokens must be at least 1",
        ),
        (
            vec!["bench", "--timeout-s", "0"],
            "--timeout-s must be at least 1",
        ),
        (
            vec!["bench", "--scale-down", "0"],
            "--scale-down must be at least 1",
        ),
        (
            vec!["bench", "--link-latency-us", "5"],
            "--link-latency-us needs --link-gbps",
        ),
        (
            vec!["bench", "--trace", "/nonexistent/comet-dir/t.json"],
            "--trace /nonexistent/comet-dir/t.json: folder /nonexistent/comet-dir does not exist",
        ),
        (vec!["bench", "--gpu", "--delay-us", "5"], "--delay-us"),
        (
            vec!["bench", "--gpu", "--link-gbps", "5"],
            "--link-gbps shapes the CPU executor's emulated link; --gpu has none",
        ),
        (
            vec![
                "bench",
                "--gpu",
                "--transport",
                "ucx",
                "--link-gbps",
                "5",
                "--link-latency-us",
                "3",
            ],
            "--link-latency-us shapes",
        ),
        (
            vec!["bench", "--phases"],
            "--phases times the GPU forward's phases; it needs --gpu",
        ),
        (
            vec!["bench", "--transport", "local"],
            "--transport local carries the GPU ranks' bytes; it needs --gpu",
        ),
        (
            vec!["bench", "--comm-sms", "8"],
            "--comm-sms sets how the GPU forward runs; it needs --gpu",
        ),
        (
            vec!["bench", "--reserved-sms", "8"],
            "--reserved-sms sets how the GPU forward runs; it needs --gpu",
        ),
        (
            vec!["bench", "--gather-x"],
            "--gather-x sets how the GPU forward runs; it needs --gpu",
        ),
        (
            vec!["bench", "--wire", "rows"],
            "--wire rows sets how a staged transport's proxy moves rows; it needs --gpu",
        ),
        (
            vec!["bench", "--gpu", "--wire", "tokens"],
            "--wire tokens sets how a staged transport's proxy moves rows; it needs --gpu",
        ),
        (
            vec!["bench", "--gpu", "--recv-rows", "0"],
            "--recv-rows must be at least 1",
        ),
        (
            vec!["plan", "--recv-rows", "0"],
            "--recv-rows must be at least 1",
        ),
        (
            vec!["plan", "--reserved-sms", "132"],
            "--reserved-sms 132 leaves none of the 132 SMs to the layer",
        ),
        (
            vec!["bench", "--gpu", "--transport", "rdma"],
            "--transport rdma: expected nvlink, local, ucx or nccl",
        ),
        (
            vec!["bench", "--hidden", "0"],
            "--hidden must be at least 1",
        ),
        (vec!["bench", "--ffn", "0"], "--ffn must be at least 1"),
        (
            vec!["bench", "--top-k", "9"],
            "--top-k 9 exceeds --experts (from preset small) 8",
        ),
        (
            vec!["bench", "--experts", "6", "--ranks", "4"],
            "--experts 6 is not divisible by --ranks 4",
        ),
        (
            vec!["plan", "--experts", "60", "--ranks", "8"],
            "--experts 60 is not divisible by --ranks 8",
        ),
        (vec!["plan", "--tokens", "0"], "--tokens must be at least 1"),
        (
            vec!["bench", "gemm", "--experts", "61", "--preset", "small"],
            "--experts 61 is not divisible by the EP size 2",
        ),
        (
            vec!["bench", "gemm", "--hidden", "1024"],
            "--preset all with shape flags needs all of",
        ),
        (
            vec!["bench", "gemm", "--tokens", "0"],
            "--tokens must be at least 1",
        ),
        (vec!["bench", "transport", "--volume", "0"], "--volume 0"),
        (vec!["bench", "transport", "--sizes", "4K,x"], "--sizes x"),
        // Sizes far beyond any machine's memory: one line, no allocation.
        (vec!["bench", "--tokens", "100000000000"], "needs about"),
        (vec!["plan", "--tokens", "4000000000000"], "needs about"),
        (
            vec!["launch", "-n", "1000000", "--", "true"],
            "limit of 1024",
        ),
    ] {
        fails_with(&args, &[], needle, quick);
    }
    if !cfg!(feature = "ucx") {
        fails_with(
            &["bench", "transport", "--ucx-tls", "tcp"],
            &[],
            "built without UCX",
            quick,
        );
    }
}

#[test]
fn gpu_bench_without_a_device_fails_before_generating_weights() {
    // No device visible (also on a GPU machine): the check comes first,
    // before gigabytes of Mixtral weights would be generated.
    fails_with(
        &["bench", "--gpu", "--preset", "mixtral-8x7b"],
        &[("CUDA_VISIBLE_DEVICES", "")],
        "--gpu: no CUDA device",
        Duration::from_secs(5),
    );
    // --wire with a staged transport passes the flags' check (refused
    // without --gpu or with nvlink: bad_values_are_refused_up_front...).
    fails_with(
        &["bench", "--gpu", "--transport", "local", "--wire", "rows"],
        &[("CUDA_VISIBLE_DEVICES", "")],
        "--gpu: no CUDA device",
        Duration::from_secs(5),
    );
}

#[test]
fn a_timeout_ends_the_run_within_about_its_length() {
    // A link so slow nothing arrives: every wait would time out in turn.
    for extra in [["--link-gbps", "0.000001"], ["--delay-us", "100000000"]] {
        let mut args = vec![
            "bench",
            "--ranks",
            "2",
            "--tokens",
            "32",
            "--iters",
            "1",
            "--timeout-s",
            "2",
        ];
        args.extend(extra);
        let err = fails_with(&args, &[], "timed out after", Duration::from_secs(8));
        assert!(err.contains("rank "), "{err}");
    }
}

#[test]
fn any_model_shape_from_the_command_line() {
    // The shape users bring: H 2048, F 1408, 60 experts, top-4.
    let stdout = succeeds(&[
        "plan",
        "--hidden",
        "2048",
        "--ffn",
        "1408",
        "--experts",
        "60",
        "--top-k",
        "4",
        "--ranks",
        "4",
        "--tokens",
        "512",
    ]);
    assert!(stdout.contains("H=2048 F=1408 E=60 k=4 W=4"), "{stdout}");
    // Rows received over the 4 ranks: 512 tokens x top-4 x 4 ranks.
    let line = stdout
        .lines()
        .find(|l| l.starts_with("rows received per rank"))
        .expect("rows line");
    let total: usize = line
        .split(['[', ']', ','])
        .filter_map(|x| x.trim().parse::<usize>().ok())
        .sum();
    assert_eq!(total, 512 * 4 * 4, "{line}");

    // The same flags on the CPU bench (scaled down to run in a second),
    // checked against the reference; overriding only some fields.
    let stdout = succeeds(&[
        "bench",
        "--hidden",
        "2048",
        "--ffn",
        "1408",
        "--experts",
        "60",
        "--top-k",
        "4",
        "--scale-down",
        "32",
        "--ranks",
        "2",
        "--tokens",
        "16",
        "--iters",
        "1",
        "--bm",
        "8",
    ]);
    assert!(
        stdout.contains("config: H=64 F=44 E=60 k=4 W=2"),
        "{stdout}"
    );
    assert!(stdout.contains(" ok, baseline"), "{stdout}");
    let stdout = succeeds(&[
        "plan", "--preset", "small", "--top-k", "3", "--tokens", "64",
    ]);
    assert!(
        stdout.contains("H=256 F=512 E=8 k=3 W=2") && stdout.contains("small+overrides"),
        "{stdout}"
    );
}

#[test]
fn launch_passes_the_rank_exit_code_through_without_colour() {
    let out = Command::new(env!("CARGO_BIN_EXE_comet"))
        .args([
            "launch",
            "-n",
            "2",
            "--",
            "sh",
            "-c",
            "[ \"$RANK\" = 1 ] && exit 3; sleep 20",
        ])
        .env_remove("NO_COLOR")
        .output()
        .expect("run comet");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        !stderr.contains('\x1b'),
        "colour codes in piped output: {stderr:?}"
    );
    assert!(stderr.contains("rank 0 was stopped"), "{stderr}");
    // A world of one: nobody else to stop, and the code still comes through.
    let out = comet(&["launch", "-n", "1", "--", "sh", "-c", "exit 7"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{stderr}");
    assert!(!stderr.contains("stopped"), "{stderr}");
    let out = comet(&["launch", "-n", "2", "--", "true"]);
    assert!(out.status.success());
}

#[cfg(unix)]
#[test]
fn a_closed_pipe_ends_quietly() {
    // `comet plan | head`: the reader is gone before comet writes a line.
    let mut child = Command::new(env!("CARGO_BIN_EXE_comet"))
        .args(["plan", "--preset", "qwen2-moe", "--ranks", "2"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
}

/// The plan shows the tiles of the GEMM family a GPU would run:
/// `COMET_GEMM_FAMILY` picks it there, so it picks it here too; a name
/// no GPU runs keeps the default.
#[test]
fn plan_shows_the_tiles_of_the_family_chosen() {
    let plan = |family: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_comet"));
        cmd.args([
            "plan",
            "--preset",
            "mixtral-8x7b",
            "--ranks",
            "1",
            "--tokens",
            "512",
        ]);
        cmd.env_remove("COMET_GEMM_FAMILY");
        if let Some(f) = family {
            cmd.env("COMET_GEMM_FAMILY", f);
        }
        let out = cmd.output().expect("run comet");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let default = "FC1 128 cols, FC2 256 cols, in column groups of 8 (FC1) and 8 (FC2)";
    assert!(plan(None).contains(default), "{}", plan(None));
    let sm80 = plan(Some("sm80"));
    assert!(
        sm80.contains("FC1 64 cols, FC2 128 cols, in column groups of 16 (FC1) and 16 (FC2)"),
        "{sm80}"
    );
    assert!(plan(Some("sm90ws")).contains(default));
}
