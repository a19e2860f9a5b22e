#!/bin/bash
# Everything built for the GPU but not yet run there, in one device call
# (a session has 30 minutes of device time), from what `cargo xtask bundle`
# (.bundle) and `cargo xtask wheel` (target/wheels) build on a machine with
# no CUDA. Run from the repository root on a GPU machine, carrying
# [".bundle", "target/wheels"]:
#   bash scripts/device-checks.sh [OUTDIR]
# Each step prints its summary lines and `=== rc=N`; full logs go to OUTDIR
# ($OUT on the device machine). The figures go to docs/PERF.md by hand,
# with the date, device and commit.
set -o pipefail
O=${1:-${OUT:-/tmp/comet-device-checks}}
mkdir -p "$O"
R=.bundle/run.sh
export NCCL_NVLS_ENABLE=0 COMET_CACHE_DIR=${COMET_CACHE_DIR:-/tmp/comet-cache}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
rc=0
step() { echo "=== $1"; shift; "$@"; local r=$?; echo "=== rc=$r"; [ $r -eq 0 ] || rc=$r; }
tests() { timeout "$2" $R "$1" --ignored --test-threads=1 2>&1 | tee "$O/$1.log" | grep -E '^test |test result|panicked'; }

# Correctness first: the device forward (nvlink and staged in-process
# worlds), the kernels, the staged layer over UCX processes.
step gpu_layer tests gpu_layer 600
step comet-kernels-gpu tests comet-kernels-gpu 300
step gpu_staged_ucx tests gpu_staged_ucx 400

# The staged path against nvlink on one shape, then over UCX processes
# (fused, sequential, GEMM-only and communication-only in turns).
B="--gpu --preset qwen2-moe --tokens 4096 --iters 3 --ranks 2"
step bench-nvlink bash -c "timeout 300 $R comet bench $B --transport nvlink 2>&1 | tee $O/bench_nvlink.md | grep '^|'"
step bench-local bash -c "timeout 300 $R comet bench $B --transport local 2>&1 | tee $O/bench_local.md | grep '^|'"
step bench-ucx bash -c "UCX_TLS=sm,self timeout 300 $R comet launch -n 2 -- .bundle/comet bench $B --transport ucx 2>&1 | tee $O/bench_ucx.md | grep '|'"

# comet-py: its GPU tests, and the example's timings with the host split
# (Python side vs the Rust forward) and the sync overhead (issue 15).
if ls target/wheels/comet_rs-*.whl >/dev/null 2>&1; then
  step wheel bash -c "PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --no-index --no-deps --force-reinstall target/wheels/comet_rs-*.whl"
  step comet-py-gpu bash -c "timeout 300 python3 crates/comet-py/tests/test_gpu.py 2>&1 | tee $O/comet_py_gpu.log | tail -5"
  for t in 4096 128; do
    step "example T=$t" bash -c "timeout 200 python3 examples/moe_torchrun.py --tokens $t --iters 50 --turns 2 2>&1 | tee $O/example_$t.log | tail -3"
  done
fi
exit $rc
