#!/usr/bin/env python3
"""A Mixtral-shaped MoE layer across ranks with comet, against the plain
torch layer on the same GPU for the same tokens.

    torchrun --nproc_per_node=2 examples/moe_torchrun.py            # 2 ranks
    torchrun --nproc_per_node=2 examples/moe_torchrun.py --gpus 1   # both on GPU 0
    python3 examples/moe_torchrun.py                                 # 1 rank

Every rank builds the same Mixtral-8x7B-shaped weights (H=4096, F=14336,
8 experts, top-2; --scale-down divides H and F) from one seed, keeps its
experts for comet and all of them for the plain torch layer, routes its own
tokens the way Hugging Face's MixtralSparseMoeBlock does (softmax, top-2,
renormalised), and times, with CUDA events in turns, comet fused, comet
sequential (no overlap) and the plain torch layer (a per-expert loop of bf16
GEMMs, as HF's eager block runs). Ranks talk through a gloo group (NCCL
refuses two ranks on one GPU; --backend nccl when each rank has its own).
Rank 0 prints each rank's times, the max difference between comet and the
torch layer, the host time of one comet call (the call only enqueues; in
brackets the part the Rust forward takes, the rest is comet-py's Python
side), and the sync overhead: the wall time of a call followed by a
synchronize, minus the GPU's own time for one call (in brackets the same
for the torch layer: what a GPU started from idle costs either).
"""

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

import comet


def args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank and call")
    p.add_argument("--scale-down", type=int, default=1, help="divide hidden and ffn by this")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--iters", type=int, default=20, help="timed calls per turn")
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--gpus", type=int, default=0,
                   help="GPUs to spread the ranks over (0: every visible one)")
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    return p.parse_args()


def timed(fn, iters):
    """Median ms of one call (CUDA events around each), collective-safe:
    every rank makes the same calls."""
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def host_times(fn, layer, iters):
    """Host us of one call while the GPU stays busy (each call returns as
    soon as its work is queued), and of that the Rust forward's own
    enqueueing (`layer.enqueue_us`); the rest is comet-py's Python side."""
    torch.cuda.synchronize()
    host, rust = [], []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e6)
        rust.append(layer.enqueue_us)
    return statistics.median(host), statistics.median(rust)


def sync_overhead_us(fn, iters):
    """What a synchronous caller pays beyond the GPU's own time: the median
    wall time of (call; synchronize) minus the device time of a call, the
    latter from `iters` calls queued back to back (no host gaps in it)."""
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    s.record()
    for _ in range(iters):
        fn()
    e.record()
    e.synchronize()
    device_us = s.elapsed_time(e) * 1e3 / iters
    wall = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(wall) - device_us


def main():
    a = args()
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", rank))
    gpus = a.gpus or torch.cuda.device_count()
    torch.cuda.set_device(local % gpus)
    group = None
    if world > 1:
        dist.init_process_group(a.backend)
        group = dist.group.WORLD
    h = max(256, 4096 // a.scale_down // 256 * 256)
    f = max(128, 14336 // a.scale_down // 128 * 128)
    e, k, t = a.experts, a.top_k, a.tokens

    layer = comet.MoeLayer(h, f, e, k, max_tokens=t, group=group, timeout_s=120)
    epr = layer.experts_per_rank
    gen = torch.Generator(device="cuda").manual_seed(0)
    bf = torch.bfloat16
    w1_all = (torch.randn(e, 2 * f, h, generator=gen, device="cuda") / h**0.5).to(bf)
    w2_all = (torch.randn(e, h, f, generator=gen, device="cuda") / f**0.5).to(bf)
    router = (torch.randn(e, h, generator=gen, device="cuda") / h**0.5).to(bf)
    mine = slice(rank * epr, (rank + 1) * epr)
    w1, w2 = w1_all[mine].contiguous(), w2_all[mine].contiguous()

    g = torch.Generator(device="cuda").manual_seed(1 + rank)
    x = (torch.rand(t, h, generator=g, device="cuda") * 2 - 1).to(bf)
    probs = torch.softmax(torch.nn.functional.linear(x, router), dim=-1, dtype=torch.float32)
    wts, ids = torch.topk(probs, k, dim=-1)
    wts = (wts / wts.sum(-1, keepdim=True)).to(bf)

    with torch.no_grad():
        y = layer(x, ids, wts, w1, w2)
        layer.check()
        plain = comet.moe_torch(x, ids, wts, w1_all, w2_all)
        diff = (y.float() - plain.float()).abs().max().item()
        scale = plain.float().abs().max().item()

        def comet_call():
            layer(x, ids, wts, w1, w2)

        def torch_call():
            comet.moe_torch(x, ids, wts, w1_all, w2_all)

        res = {"fused": [], "sequential": [], "torch": []}
        for _ in range(a.turns):
            for mode in ("fused", "sequential"):
                layer.mode = mode
                res[mode].append(timed(comet_call, a.iters))
            layer.check()
            if group is not None:
                dist.barrier(group)
            res["torch"].append(timed(torch_call, a.iters))
            if group is not None:
                dist.barrier(group)
        layer.mode = "fused"
        host, enqueue = host_times(comet_call, layer, a.iters)
        overhead = sync_overhead_us(comet_call, a.iters)
        if group is not None:
            dist.barrier(group)
        overhead_torch = sync_overhead_us(torch_call, a.iters)
        layer.check()

    mine_row = {
        "rank": rank,
        "device": torch.cuda.current_device(),
        "fused_ms": min(res["fused"]),
        "sequential_ms": min(res["sequential"]),
        "torch_ms": min(res["torch"]),
        "max_diff": diff,
        "scale": scale,
        "host_us": host,
        "enqueue_us": enqueue,
        "overhead_us": overhead,
        "overhead_torch_us": overhead_torch,
    }
    rows = [mine_row]
    if group is not None:
        rows = [None] * world
        dist.all_gather_object(rows, mine_row, group=group)
    if rank == 0:
        p = layer.plan()
        print(f"comet {comet.__version__}: H={h} F={f} E={e} top-{k}, {t} tokens per rank, "
              f"{world} rank(s); plan: overlap={p['overlap']} chunks={p['chunks']} "
              f"comm_blocks={p['comm_blocks']} share={p['share']} SMs")
        print("rank gpu  comet fused ms  comet seq ms  torch ms  torch/fused  "
              "max|comet-torch| (of max|y|)  host us/call (rust)  sync overhead us (torch's)")
        for r in rows:
            print(f"{r['rank']:>4} {r['device']:>3}  {r['fused_ms']:>14.3f}  "
                  f"{r['sequential_ms']:>12.3f}  {r['torch_ms']:>8.3f}  "
                  f"{r['torch_ms'] / r['fused_ms']:>11.2f}  "
                  f"{r['max_diff']:>10.4f} ({r['scale']:.3f})        "
                  f"{r['host_us']:>8.1f} ({r['enqueue_us']:.1f})  {r['overhead_us']:>8.1f} ({r['overhead_torch_us']:.1f})")
    layer.close()
    if group is not None:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
