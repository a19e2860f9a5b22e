#!/usr/bin/env bash
# Every test, on a fresh Debian machine or CI: installs what is missing
# (rustfmt/clippy components, UCX from Debian, NVRTC wheels into .tools/),
# then runs `cargo xtask ci` (fmt, clippy -D warnings, feature builds, all
# tests, kernel compile gate for sm_90a and sm_80). Needs no GPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "test.sh: cargo not found; install a Rust toolchain (rustup) first" >&2
    exit 1
fi
if command -v rustup >/dev/null 2>&1; then
    for c in rustfmt clippy; do
        rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c"
    done
fi
bash scripts/install-ucx-deps.sh
eval "$(bash scripts/install-nvrtc.sh)"
# UCX over loopback only: TCP and shared memory, no RDMA devices needed.
export UCX_TLS="${UCX_TLS:-tcp,self,sm}"
export NCCL_NVLS_ENABLE=0
cargo xtask ci
