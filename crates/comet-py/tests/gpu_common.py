"""What the GPU tests and their worker processes share: a Mixtral-style
block's weights and routing (softmax, top-k, renormalised weights, the way
Hugging Face's MixtralSparseMoeBlock routes), and the error check."""

import torch

H, F, E, K, MAX_T = 1024, 512, 8, 2, 512
TOL = 2e-2


def weights(seed, hidden=H, ffn=F, experts=E, device="cuda"):
    """Every expert's (w1 [E, 2F, H], w2 [E, H, F]) bf16 and the router
    [E, H]: the same on every rank for the same seed."""
    g = torch.Generator(device=device).manual_seed(seed)
    w1 = torch.randn(experts, 2 * ffn, hidden, generator=g, device=device) / hidden**0.5
    w2 = torch.randn(experts, hidden, ffn, generator=g, device=device) / ffn**0.5
    router = torch.randn(experts, hidden, generator=g, device=device) / hidden**0.5
    return w1.to(torch.bfloat16), w2.to(torch.bfloat16), router.to(torch.bfloat16)


def routed_tokens(seed, tokens, router, top_k=K, hidden=H, weight_dtype=torch.float32,
                  device="cuda"):
    """x bf16 [T, H] and its routing as an HF Mixtral block computes it:
    logits in bf16, softmax in f32, top-k, renormalised; int64 ids."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = (torch.rand(tokens, hidden, generator=g, device=device) * 2 - 1).to(torch.bfloat16)
    logits = torch.nn.functional.linear(x, router)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    w, ids = torch.topk(probs, top_k, dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)
    return x, ids, w.to(weight_dtype)


def max_rel_err(y, ref):
    """max |y - ref| / max |ref| (NaN or a wrong shape or dtype: inf)."""
    if y.dtype != torch.bfloat16 or tuple(y.shape) != tuple(ref.shape):
        return float("inf")
    if y.numel() == 0:
        return 0.0
    yf = y.float()
    if not torch.isfinite(yf).all():
        return float("inf")
    scale = ref.abs().max().item()
    return (yf - ref).abs().max().item() / max(scale, 1e-6)
