#!/bin/bash
# The MoE layer over NCCL on a machine with G >= 2 GPUs (NCCL refuses two
# ranks on one GPU, so this cannot run on one). Run from the repository
# root with a Rust toolchain; results go to OUTDIR:
#   scripts/nccl-layer.sh [OUTDIR]
# Steps:
#   1. the NCCL proxy's logic on CPU (comet-sched's nccl_proxy tests, and
#      proxy_plan's, which derives the pieces it schedules; the lanes'
#      splits and addresses);
#   2. the nccl transport with G ranks (threads and processes) on the GPUs;
#   3. the nccl rows of `comet bench transport` (GPUs 0 and 1);
#   4. the whole layer over NCCL (comet_sched::nccl_device::NcclLayer: the
#      kernels over mirrors and ready words, a proxy thread per rank driving
#      comet_sched::nccl_proxy over a communicator and stream per ordered
#      pair): 4a. its GPU test, 2 processes on 2 GPUs (and min(G, 4))
#      against the f64 reference; 4b. `comet bench --gpu --transport nccl`
#      under `comet launch -n 2`, qwen2-moe.
set -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
O=${1:-${OUT:-/tmp/comet-nccl-out}}
mkdir -p "$O"
export NCCL_NVLS_ENABLE=0
# The most hardware queues: a landing queued behind a kernel that spins
# waiting for it would stall until the timeout (one queue is refused).
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-32}
G=$(nvidia-smi -L 2>/dev/null | wc -l)
if [ "$G" -lt 2 ]; then
  echo "nccl-layer: $G GPU(s) here; NCCL needs one GPU per rank, so this needs 2 or more" >&2
  exit 2
fi
# cudarc loads libnccl.so; NCCL wheels and many installs ship only libnccl.so.2.
NCCL_SO=$(ldconfig -p 2>/dev/null | awk '/libnccl\.so/{print $NF; exit}')
[ -z "$NCCL_SO" ] && NCCL_SO=$(python3 -c 'import nvidia.nccl,os,glob;print(glob.glob(os.path.join(list(nvidia.nccl.__path__)[0],"lib","libnccl.so*"))[0])' 2>/dev/null)
if [ -n "$NCCL_SO" ]; then mkdir -p /tmp/comet-nccl-lib && ln -sf "$NCCL_SO" /tmp/comet-nccl-lib/libnccl.so; fi
export LD_LIBRARY_PATH=/tmp/comet-nccl-lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH}
echo "nccl-layer: $G GPUs, nccl: ${NCCL_SO:-not found}"
rc=0
step() {
  local name=$1 log=$2; shift 2
  echo "=== $name"
  "$@" >"$O/$log.log" 2>&1; local r=$?
  grep -E '^test |test result|panicked|nccl|GB/s|^[|]|^phases|skipped' "$O/$log.log"
  echo "=== rc=$r"; [ $r -eq 0 ] || rc=$r
}
step "1. proxy logic (CPU)" proxy_logic cargo test -p comet-sched --test nccl_proxy --test nccl_driver
step "1b. piece plan and lanes (CPU)" proxy_plan cargo test -p comet-sched --lib -- proxy_plan nccl_proxy stream_queue
step "2. nccl transport, $G ranks" nccl_gpu timeout 600 cargo test --release -p comet-transport --features nccl --test nccl_gpu -- --include-ignored --test-threads=1
step "3. nccl transport bench" bench timeout 300 cargo run --release -p comet-cli --features nccl -- bench transport --transports nccl --markdown
step "4a. whole layer over NCCL, 2 processes on 2 GPUs" nccl_layer timeout 600 cargo test --release -p comet-sched --features gpu,nccl --test gpu_nccl_layer -- --include-ignored --test-threads=1
cargo build --release -p comet-cli --features nccl >"$O/build_cli.log" 2>&1 || rc=1
C=${CARGO_TARGET_DIR:-target}/release/comet
step "4b. comet bench --gpu --transport nccl, 2 ranks" layer_bench timeout 400 "$C" launch -n 2 -- "$C" bench --gpu --transport nccl --ranks 2 --preset qwen2-moe --tokens 4096 --iters 3 --phases
exit $rc
