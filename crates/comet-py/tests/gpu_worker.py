"""One rank of the GPU tests' multi-process runs (started by test_gpu.py
with torchrun's environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

    python gpu_worker.py group|env|graph

- group: a gloo torch.distributed group carries the IPC handles;
- env:   no group, comet's TCP bootstrap from the environment;
- graph: as group, then the call captured in a CUDA graph and replayed.

Every rank builds the same full weights from one seed and keeps its
experts; each call's tokens and routing differ per rank and per call; every
output is checked against comet.moe_reference with all experts. Prints
"RANK r OK ..." at the end, or "RANK r FAIL ..." and exits 1.
"""

import os
import sys

import torch

import comet
from gpu_common import E, F, H, K, MAX_T, TOL, max_rel_err, routed_tokens, weights


def fail(rank, msg):
    print(f"RANK {rank} FAIL {msg}", flush=True)
    sys.exit(1)


def main():
    how = sys.argv[1]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(0)
    group = None
    if how in ("group", "graph"):
        import torch.distributed as dist

        dist.init_process_group("gloo", rank=rank, world_size=world)
        group = dist.group.WORLD
    layer = comet.MoeLayer(H, F, E, K, MAX_T, group=group, timeout_s=120)
    if (layer.rank, layer.world) != (rank, world):
        fail(rank, f"layer says rank {layer.rank} of {layer.world}")
    plan = layer.plan()
    if plan["ranks"] != world or plan["ranks_per_gpu"] != world:
        fail(rank, f"plan {plan}")
    w1_all, w2_all, router = weights(1234)
    mine = slice(rank * layer.experts_per_rank, (rank + 1) * layer.experts_per_rank)
    w1, w2 = w1_all[mine].contiguous(), w2_all[mine].contiguous()
    worst = 0.0
    calls = 0
    with torch.no_grad():
        for it in range(4):
            for mode in ("fused", "sequential"):
                layer.mode = mode
                # Different token counts per rank and call, one rank empty once.
                t = 0 if (it == 2 and rank == 1) else (137 * (it + 1) + 211 * rank) % MAX_T + 1
                wdt = torch.bfloat16 if it % 2 else torch.float32
                x, ids, w = routed_tokens(100 * it + 10 * rank + (mode == "fused"), t, router,
                                          weight_dtype=wdt)
                if it == 3:
                    ids = ids.to(torch.int32)
                y = layer(x, ids, w, w1, w2)
                info = layer.check()
                if info["sent_rows"] != t * K:
                    fail(rank, f"call {it} {mode}: sent {info['sent_rows']} rows for {t} tokens")
                err = max_rel_err(y, comet.moe_reference(x, ids, w, w1_all, w2_all))
                worst = max(worst, err)
                calls += 1
                if err > TOL:
                    fail(rank, f"call {it} {mode} T={t}: max rel err {err:.3g} > {TOL}")
        if how == "graph":
            t = 256 + 64 * rank
            x, ids, w = routed_tokens(7 + rank, t, router)
            layer.mode = "fused"
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                layer(x, ids, w, w1, w2)
            torch.cuda.current_stream().wait_stream(side)
            layer.check()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                y = layer(x, ids, w, w1, w2)
            for rep in range(3):
                nx, nids, nw = routed_tokens(1000 + 10 * rep + rank, t, router)
                x.copy_(nx)
                ids.copy_(nids)
                w.copy_(nw)
                g.replay()
                layer.check()
                err = max_rel_err(y, comet.moe_reference(x, ids, w, w1_all, w2_all))
                worst = max(worst, err)
                calls += 1
                if err > TOL:
                    fail(rank, f"graph replay {rep}: max rel err {err:.3g} > {TOL}")
    layer.close()
    print(f"RANK {rank} OK {how}: {calls} calls, max rel err {worst:.3g}", flush=True)


if __name__ == "__main__":
    main()
