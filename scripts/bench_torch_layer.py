#!/usr/bin/env python3
"""What a PyTorch user runs today, for `comet bench --gpu`, timed in turns with it.

A helper process speaking one JSON object per line (the protocol of
bench_torch_gemm.py, in bench_torch_helper.py next to this script). On
start it prints {"ready": true, ...} or {"ready": false, "why": ...}.
Then, per request on stdin:
  {"op": "prepare", "impl": IMPL, "hidden": H, "ffn": F, "experts": E,
   "top_k": K, "tokens": T, "seed": S}
      -> {"ok": true} (built and run twice) or {"ok": false, "why": ...}
  {"op": "run"}
      -> {"ms": t}: one layer call timed with CUDA events, returned after it
         finished, so the caller's GPU work never overlaps it.
IMPL is one of
  "torch":          plain PyTorch on one GPU: softmax top-k of router logits,
                    argsort, gather, torch._grouped_mm FC1, silu(gate) * up,
                    torch._grouped_mm FC2, weighted index_add into y;
  "hf-eager", "hf-grouped_mm", "hf-batched_mm":
                    Hugging Face transformers' MixtralSparseMoeBlock configured
                    to the shape, with that experts implementation.
Weights are random bf16 (uniform / sqrt(fan-in)), x uniform in [-1, 1).
"""
import sys

from bench_torch_helper import cuda_torch, reply, serve


def plain_layer(torch, h, f, e, k, t, dev, gen):
    bf = torch.bfloat16
    x = torch.empty(t, h, device=dev, dtype=bf).uniform_(-1, 1, generator=gen)
    router = torch.empty(t, e, device=dev, dtype=torch.float32).normal_(generator=gen)
    w1 = (torch.empty(e, h, 2 * f, device=dev, dtype=bf).uniform_(-1, 1, generator=gen) / h**0.5).contiguous()
    w2 = (torch.empty(e, f, h, device=dev, dtype=bf).uniform_(-1, 1, generator=gen) / f**0.5).contiguous()
    ones = torch.ones(t * k, device=dev, dtype=torch.int32)

    def call():
        probs = torch.softmax(router, dim=-1)
        wts, ids = torch.topk(probs, k, dim=-1)
        wts = wts / wts.sum(-1, keepdim=True)
        flat = ids.view(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.zeros(e, device=dev, dtype=torch.int32).scatter_add_(0, flat, ones)
        offs = counts.cumsum(0, dtype=torch.int32)
        tok = order // k
        hid = torch._grouped_mm(x[tok], w1, offs=offs)
        act = torch.nn.functional.silu(hid[:, :f]) * hid[:, f:]
        out = torch._grouped_mm(act, w2, offs=offs)
        out = out * wts.view(-1)[order].unsqueeze(1).to(out.dtype)
        return torch.zeros(t, h, device=dev, dtype=bf).index_add_(0, tok, out)

    return call


def hf_block(torch, impl, h, f, e, k, t, dev, gen):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(
        hidden_size=h,
        intermediate_size=f,
        num_local_experts=e,
        num_experts_per_tok=k,
        experts_implementation=impl,
    )
    with torch.device(dev):
        block = MixtralSparseMoeBlock(cfg).to(torch.bfloat16).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.uniform_(-1, 1, generator=gen).div_(p.shape[-1] ** 0.5)
    x = torch.empty(1, t, h, device=dev, dtype=torch.bfloat16).uniform_(-1, 1, generator=gen)

    def call():
        with torch.no_grad():
            return block(x)

    return call


def main() -> int:
    torch = cuda_torch()
    if torch is None:
        return 0
    dev = torch.device("cuda")
    try:
        import transformers

        tf = transformers.__version__
    except ImportError:
        tf = None
    reply({"ready": True, "torch": torch.__version__, "transformers": tf})

    def build(req):
        gen = torch.Generator(device=dev)
        gen.manual_seed(int(req.get("seed", 1)))
        shape = (req["hidden"], req["ffn"], req["experts"], req["top_k"], req["tokens"])
        impl = req["impl"]
        if impl == "torch":
            return plain_layer(torch, *shape, dev, gen)
        if impl.startswith("hf-"):
            if tf is None:
                raise RuntimeError("transformers not installed")
            return hf_block(torch, impl[3:], *shape, dev, gen)
        raise ValueError(f"unknown impl {impl!r}")

    return serve(torch, build, why=lambda ex: f"{type(ex).__name__}: {ex}")


if __name__ == "__main__":
    sys.exit(main())
