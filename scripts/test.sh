#!/usr/bin/env bash
# Every test, on a fresh Debian machine or CI: installs what is missing
# (rustfmt/clippy components, UCX from Debian, NVRTC wheels into .tools/),
# then runs `cargo xtask ci` (fmt, clippy -D warnings, feature builds, all
# tests, the Python module's pytest tests, kernel compile gate for sm_90a and
# sm_80). Needs no GPU. The last line is the total over every test binary
# and pytest:
# `N passed, N failed, N ignored` (GPU-only tests are among the ignored).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "test.sh: cargo not found; install a Rust toolchain (rustup) first" >&2
    exit 1
fi
echo "test.sh: [1/4] rustfmt and clippy components" >&2
if command -v rustup >/dev/null 2>&1; then
    for c in rustfmt clippy; do
        rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c"
    done
fi
echo "test.sh: [2/4] UCX headers and libraries (apt, when missing)" >&2
bash scripts/install-ucx-deps.sh
echo "test.sh: [3/4] NVRTC wheels for the kernel compile gate (pip, when missing)" >&2
eval "$(bash scripts/install-nvrtc.sh)"
# UCX over loopback only: TCP and shared memory, no RDMA devices needed.
export UCX_TLS="${UCX_TLS:-tcp,self,sm}"
export NCCL_NVLS_ENABLE=0
# The Python module's tests run in a venv (.venv-py): Debian's python3
# needs python3-venv for that.
if ! python3 -c "import ensurepip, venv" >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    echo "test.sh: python3-venv for the Python module's tests (apt)" >&2
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
fi
echo "test.sh: [4/4] cargo xtask ci (format, clippy, feature builds, all tests, Python module + pytest, kernel compile gate); ends with the test total" >&2
cargo xtask ci
