"""The helper-process protocol of bench_torch_gemm.py and bench_torch_layer.py,
shared by both (imported from next to them: python puts a script's folder
first on sys.path, and the bundle copies this file beside them).

One JSON object per line on stdout. On start a {"ready": ...} line; then,
per request on stdin, "prepare" builds a case and runs it twice and "run"
times one call of it with CUDA events, returning after it finished, so the
caller's GPU work never overlaps it. EOF on stdin ends it.
"""
import json
import sys


def reply(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def cuda_torch():
    """torch, where it has a CUDA device and torch._grouped_mm; otherwise
    None, after the {"ready": false, "why": ...} line."""
    try:
        import torch
    except ImportError:
        reply({"ready": False, "why": "torch not installed"})
        return None
    if not torch.cuda.is_available() or not hasattr(torch, "_grouped_mm"):
        reply({"ready": False, "why": "no CUDA device or no torch._grouped_mm"})
        return None
    return torch


def serve(torch, build, why=str) -> int:
    """Answers requests until EOF. `build(req)` turns a prepare request into
    a call of no arguments (or raises: {"ok": false, "why": why(error)});
    the case of the last successful prepare is what "run" times."""
    call = None
    for line in sys.stdin:
        req = json.loads(line)
        op = req.get("op")
        if op == "prepare":
            call = None
            torch.cuda.empty_cache()
            try:
                call = build(req)
                for _ in range(2):
                    call()
                torch.cuda.synchronize()
                reply({"ok": True})
            except Exception as ex:  # the caller reports it and goes on
                call = None
                torch.cuda.empty_cache()
                reply({"ok": False, "why": why(ex)})
        elif op == "run":
            if call is None:
                reply({"error": "run before a successful prepare"})
                continue
            s = torch.cuda.Event(enable_timing=True)
            e = torch.cuda.Event(enable_timing=True)
            s.record()
            call()
            e.record()
            e.synchronize()
            reply({"ms": s.elapsed_time(e)})
        else:
            reply({"error": f"unknown op {op!r}"})
    return 0
