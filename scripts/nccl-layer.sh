#!/bin/bash
# The MoE layer over NCCL on a machine with G >= 2 GPUs (NCCL refuses two
# ranks on one GPU, so this cannot run on one). Run from the repository
# root with a Rust toolchain; results go to OUTDIR:
#   scripts/nccl-layer.sh [OUTDIR]
# What runs today:
#   1. the NCCL proxy's logic on CPU (comet-sched's nccl_proxy tests, and
#      proxy_plan's, which derives the pieces it schedules);
#   2. the nccl transport with G ranks (threads and processes) on the GPUs;
#   3. the nccl rows of `comet bench transport` (GPUs 0 and 1).
# What does not exist yet, and so is not run: the whole layer over NCCL.
# MoeLayer needs a transport that maps peers (nvlink); its NCCL path needs
# the proxy thread beside MoeLayer::forward driving comet_sched::nccl_proxy,
# ready words in mapped pinned memory, one lane (communicator and stream)
# per ordered pair, packing of combine chunks before their sends, receive
# staging and the landing copies with their signal raises. The kernels and
# their buffer layout stay as they are (comet_sched::proxy_plan), as under
# comet_sched::staged_device::StagedLayer over host-memory transports. Once
# these exist, step 4 becomes e.g.
#   comet bench layer --gpu --transport nccl --preset qwen2-moe
# (a flag that `comet bench layer` does not have today).
set -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
O=${1:-${OUT:-/tmp/comet-nccl-out}}
mkdir -p "$O"
export NCCL_NVLS_ENABLE=0
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
  grep -E '^test |test result|panicked|nccl|GB/s' "$O/$log.log"
  echo "=== rc=$r"; [ $r -eq 0 ] || rc=$r
}
step "1. proxy logic (CPU)" proxy_logic cargo test -p comet-sched --test nccl_proxy
step "1b. piece plan (CPU)" proxy_plan cargo test -p comet-sched --lib proxy_plan
step "2. nccl transport, $G ranks" nccl_gpu timeout 600 cargo test --release -p comet-transport --features nccl --test nccl_gpu -- --include-ignored --test-threads=1
step "3. nccl transport bench" bench timeout 300 cargo run --release -p comet-cli --features nccl -- bench transport --transports nccl --markdown
echo "=== 4. whole layer over NCCL: pending (see the header), not run"
exit $rc
