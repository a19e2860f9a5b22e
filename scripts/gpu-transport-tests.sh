#!/bin/bash
# GPU checks of the nvlink and nccl transports on a GPU machine, from
# binaries built elsewhere (no CUDA needed to build them):
#   cargo test  --release -p comet-transport --features nvlink,nccl --test nvlink_gpu --test nccl_gpu --no-run
#   cargo test  --release -p comet-sched --test gpu_signals --no-run
#   cargo build --release -p comet-transport --features nvlink --example nvlink_bench
#   cargo build --release -p comet-cli --features nvlink
# copied (test binaries without their hash suffix) into one folder DIR:
#   scripts/gpu-transport-tests.sh DIR [OUTDIR]
# The GPU tests are #[ignore]d in plain `cargo test` runs; here they run
# with --include-ignored, where a missing device or GPU fails them.
# On one GPU, W ranks share it (protocol checks, no link); NCCL runs a world
# of one there. With G GPUs the nccl tests use G ranks and the bench puts
# the two ranks on devices 0 and 1.
set -o pipefail
B=${1:?usage: gpu-transport-tests.sh DIR [OUTDIR]}
O=${2:-${OUT:-/tmp/comet-gpu-out}}
mkdir -p "$O"
export NCCL_NVLS_ENABLE=0
# cudarc loads libnccl.so; NCCL wheels and many installs ship only libnccl.so.2.
NCCL_SO=$(ldconfig -p 2>/dev/null | awk '/libnccl\.so/{print $NF; exit}')
[ -z "$NCCL_SO" ] && NCCL_SO=$(python3 -c 'import nvidia.nccl,os,glob;print(glob.glob(os.path.join(list(nvidia.nccl.__path__)[0],"lib","libnccl.so*"))[0])' 2>/dev/null)
if [ -n "$NCCL_SO" ]; then mkdir -p /tmp/comet-nccl-lib && ln -sf "$NCCL_SO" /tmp/comet-nccl-lib/libnccl.so; fi
export LD_LIBRARY_PATH=/tmp/comet-nccl-lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH}
echo "nccl: ${NCCL_SO:-not found}"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
rc=0
step() { echo "=== $1"; shift; "$@"; local r=$?; echo "=== rc=$r"; [ $r -eq 0 ] || rc=$r; }
step nvlink_gpu sh -c "timeout 240 $B/nvlink_gpu --include-ignored --test-threads=1 --nocapture 2>&1 | tee $O/nvlink_gpu.log | grep -E '^test |test result|panicked|skipped'"
step nccl_gpu sh -c "timeout 240 $B/nccl_gpu --include-ignored --test-threads=1 --nocapture 2>&1 | tee $O/nccl_gpu.log | grep -E '^test |test result|panicked|skipped'"
step gpu_signals sh -c "timeout 180 $B/gpu_signals --include-ignored --test-threads=1 --nocapture 2>&1 | tee $O/gpu_signals.log | grep -E '^test |test result|panicked|rank 0: [0-9]'"
if command -v compute-sanitizer >/dev/null; then
  step sanitizer sh -c "COMET_NVLINK_EPOCHS=4 timeout 200 compute-sanitizer --tool memcheck --error-exitcode 9 $B/nvlink_gpu --ignored --exact one_process_threads_w2 2>&1 | tee $O/sanitizer.log | tail -3"
fi
[ -x "$B/nvlink_bench" ] && step bench sh -c "timeout 150 $B/nvlink_bench 2>&1 | tee $O/nvlink_bench.md"
[ -x "$B/comet" ] && step cli sh -c "timeout 240 $B/comet bench transport --transports tcp,nvlink --markdown 2>&1 | tee $O/bench_transport.md"
exit $rc
