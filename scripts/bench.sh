#!/usr/bin/env bash
# The main job: builds the `comet` command in release mode and runs
# `comet bench`. With an NVIDIA GPU present: the device forward, fused vs
# non-overlapped vs GEMM-only vs the PyTorch layers users run today, on the
# three large presets, W=1 and W=2 on one GPU, and with several GPUs also
# W = their count, a GPU a rank over NVLink. Without
# one: the CPU executor on the small default, with a Perfetto trace.
# Extra arguments go to `comet bench`, e.g. `--ranks 2 --tokens 512`; a
# flag given here replaces the script's own default for it (--trace,
# --preset; --ranks or --tokens run that one configuration).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! command -v cargo >/dev/null 2>&1; then
    echo "bench.sh: cargo not found; install a Rust toolchain (rustup) first" >&2
    exit 1
fi
# Whether the caller passed flag $1 (as `--flag value` or `--flag=value`).
given() {
    local flag=$1 a
    shift
    for a in "$@"; do
        case "$a" in "$flag" | "$flag"=*) return 0 ;; esac
    done
    return 1
}
# One progress line on stderr: the words, space-separated.
say() { local IFS=' '; echo "$*" >&2; }
# The most hardware queues: a staged rank's proxy work must not queue
# behind kernels that wait for it (one queue is refused; 32 is a margin).
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-32}
echo "bench.sh: building comet in release mode (cargo; a few minutes on a fresh clone)" >&2
cargo build --release -p comet-cli
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    defaults=(--gpu)
    given --preset "$@" || defaults+=(--preset all)
    if given --ranks "$@" || given --tokens "$@"; then
        say "bench.sh: GPU found; running: comet bench" "${defaults[@]}" "$@"
        exec ./target/release/comet bench "${defaults[@]}" "$@"
    fi
    # The two regimes of the issue's targets on the first GPU: one rank on
    # the whole GPU (16384 tokens), and two ranks sharing it (8192 tokens
    # each); then, with several GPUs, one rank on each (8192 tokens each).
    # The GPUs CUDA will show (CUDA_VISIBLE_DEVICES where set).
    visible=${CUDA_VISIBLE_DEVICES:-$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | paste -sd, - || true)}
    first=${visible%%,*}
    for run in "--ranks 1 --tokens 16384" "--ranks 2 --tokens 8192"; do
        # shellcheck disable=SC2086
        say "bench.sh: GPU found; running on GPU $first: comet bench" "${defaults[@]}" $run "$@"
        # shellcheck disable=SC2086
        env ${first:+CUDA_VISIBLE_DEVICES=$first} ./target/release/comet bench "${defaults[@]}" $run "$@"
    done
    gpus=$(echo "$visible" | tr ',' '\n' | grep -c . || true)
    if [ "$gpus" -ge 2 ]; then
        say "bench.sh: $gpus GPUs; running: comet bench" "${defaults[@]}" --ranks "$gpus" --tokens 8192 "$@"
        ./target/release/comet bench "${defaults[@]}" --ranks "$gpus" --tokens 8192 "$@"
    fi
    exit 0
fi
defaults=()
given --trace "$@" || defaults+=(--trace target/comet-bench.trace.json)
say "bench.sh: no GPU; running the CPU executor: comet bench" ${defaults[@]+"${defaults[@]}"} "$@"
exec ./target/release/comet bench ${defaults[@]+"${defaults[@]}"} "$@"
