#!/usr/bin/env python3
"""torch._grouped_mm baseline for `comet bench gemm`, timed in turns with it.

A helper process speaking one JSON object per line. On start it prints
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
import json
import sys


def reply(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> int:
    try:
        import torch
    except ImportError:
        reply({"ready": False, "why": "torch not installed"})
        return 0
    if not torch.cuda.is_available() or not hasattr(torch, "_grouped_mm"):
        reply({"ready": False, "why": "no CUDA device or no torch._grouped_mm"})
        return 0
    dev = torch.device("cuda")
    reply({"ready": True, "torch": torch.__version__})
    case = None
    for line in sys.stdin:
        req = json.loads(line)
        op = req.get("op")
        if op == "prepare":
            case = None
            torch.cuda.empty_cache()
            counts, k, n = req["counts"], req["k"], req["n"]
            try:
                a = torch.empty(sum(counts), k, device=dev, dtype=torch.bfloat16).uniform_(-1, 1)
                b = torch.empty(len(counts), n, k, device=dev, dtype=torch.bfloat16)
                b.uniform_(-1, 1).div_(k**0.5)
                offs = torch.tensor(counts, device=dev, dtype=torch.int32).cumsum(0, dtype=torch.int32)
                case = (a, b.transpose(-2, -1), offs)
                for _ in range(2):
                    torch._grouped_mm(*case[:2], offs=offs)
                torch.cuda.synchronize()
                reply({"ok": True})
            except Exception as ex:  # the caller reports it and goes on
                case = None
                reply({"ok": False, "why": str(ex)})
        elif op == "run":
            if case is None:
                reply({"error": "run before a successful prepare"})
                continue
            s = torch.cuda.Event(enable_timing=True)
            e = torch.cuda.Event(enable_timing=True)
            s.record()
            torch._grouped_mm(case[0], case[1], offs=case[2])
            e.record()
            e.synchronize()
            reply({"ms": s.elapsed_time(e)})
        else:
            reply({"error": f"unknown op {op!r}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
