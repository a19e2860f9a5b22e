#!/usr/bin/env bash
# The main job: builds the `comet` command in release mode and runs
# `comet bench` (without a GPU: the CPU executor on the small default).
# Extra arguments go to `comet bench`, e.g. `--preset qwen2-moe --scale-down 16`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! command -v cargo >/dev/null 2>&1; then
    echo "bench.sh: cargo not found; install a Rust toolchain (rustup) first" >&2
    exit 1
fi
cargo build --release -p comet-cli --quiet
exec ./target/release/comet bench --trace target/comet-bench.trace.json "$@"
