#!/usr/bin/env python3
"""torch._grouped_mm baseline for `comet bench gemm`, timed in turns with it.

A helper process speaking one JSON object per line (bench_torch_helper.py,
found next to this script). On start it prints
{"ready": true} or {"ready": false, "why": ...}. Then, per request on stdin:
  {"op": "prepare", "counts": [...], "k": K, "n": N}
      -> {"ok": true} (allocated and run twice) or {"ok": false, "why": ...}
  {"op": "run"}
      -> {"ms": t}: one call of the prepared case timed with CUDA events,
         returned after it finished, so the caller's GPU work never overlaps.
EOF on stdin ends it. Data as comet-kernels' GroupedProblem draws it:
A uniform in [-1, 1), B uniform in [-1, 1) / sqrt(K), bf16; A [rows, K],
B [E, N, K] used transposed (comet-kernels' layout).
"""
import sys

from bench_torch_helper import cuda_torch, reply, serve


def main() -> int:
    torch = cuda_torch()
    if torch is None:
        return 0
    dev = torch.device("cuda")
    reply({"ready": True, "torch": torch.__version__})

    def build(req):
        counts, k, n = req["counts"], req["k"], req["n"]
        a = torch.empty(sum(counts), k, device=dev, dtype=torch.bfloat16).uniform_(-1, 1)
        b = torch.empty(len(counts), n, k, device=dev, dtype=torch.bfloat16)
        b.uniform_(-1, 1).div_(k**0.5)
        bt = b.transpose(-2, -1)
        offs = torch.tensor(counts, device=dev, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        return lambda: torch._grouped_mm(a, bt, offs=offs)

    return serve(torch, build)


if __name__ == "__main__":
    sys.exit(main())
