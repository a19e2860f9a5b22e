#!/usr/bin/env python3
"""torch._grouped_mm baseline for `comet bench gemm`.

Reads a JSON list of cases ({"label", "counts", "k", "n"}) from the file
named by argv[1], times torch._grouped_mm on random bf16 data of the same
shapes (A [rows, K], B [E, N, K] used transposed, like comet-kernels'
layout), and prints one JSON object {"label": median_ms, ...} on stdout.
Exits 2 when torch or a GPU is missing, so the caller can skip it.
"""
import json
import sys


def main() -> int:
    try:
        import torch
    except ImportError:
        print("torch not installed", file=sys.stderr)
        return 2
    if not torch.cuda.is_available() or not hasattr(torch, "_grouped_mm"):
        print("no CUDA device or no torch._grouped_mm", file=sys.stderr)
        return 2
    cases = json.load(open(sys.argv[1]))
    iters = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    dev = torch.device("cuda")
    out = {}
    for c in cases:
        counts, k, n = c["counts"], c["k"], c["n"]
        rows = sum(counts)
        a = torch.empty(rows, k, device=dev, dtype=torch.bfloat16).uniform_(-1, 1)
        b = torch.empty(len(counts), n, k, device=dev, dtype=torch.bfloat16).uniform_(-1, 1) / k**0.5
        offs = torch.tensor(counts, device=dev, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        bt = b.transpose(-2, -1)
        try:
            for _ in range(2):
                torch._grouped_mm(a, bt, offs=offs)
            torch.cuda.synchronize()
            times = []
            for _ in range(iters):
                s = torch.cuda.Event(enable_timing=True)
                e = torch.cuda.Event(enable_timing=True)
                s.record()
                torch._grouped_mm(a, bt, offs=offs)
                e.record()
                e.synchronize()
                times.append(s.elapsed_time(e))
            times.sort()
            out[c["label"]] = times[len(times) // 2]
        except Exception as ex:  # report and keep going
            print(f"{c['label']}: {ex}", file=sys.stderr)
        del a, b, bt
        torch.cuda.empty_cache()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
