#!/usr/bin/env bash
# The main job: builds the `comet` command in release mode and runs
# `comet bench`. With an NVIDIA GPU present: the GPU executor, fused vs
# non-overlapped, on the three large presets (ranks share GPU 0). Without
# one: the CPU executor on the small default, with a Perfetto trace.
# Extra arguments go to `comet bench`, e.g. `--ranks 2 --tokens 512`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! command -v cargo >/dev/null 2>&1; then
    echo "bench.sh: cargo not found; install a Rust toolchain (rustup) first" >&2
    exit 1
fi
cargo build --release -p comet-cli --quiet
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    exec ./target/release/comet bench --gpu --preset all --ranks 2 "$@"
fi
exec ./target/release/comet bench --trace target/comet-bench.trace.json "$@"
