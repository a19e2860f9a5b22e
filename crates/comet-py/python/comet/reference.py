"""The layer in plain torch: ``moe_reference`` (f32 math, for checks) and
``moe_torch`` (bf16 math, the way a PyTorch model computes it: the baseline
the example times comet against). Both take *every* expert's weights
(``[experts, 2 * ffn, hidden]`` and ``[experts, hidden, ffn]``, the layout of
``MoeLayer``'s w1/w2 stacked over all ranks) and global ids."""

from __future__ import annotations


def _check(torch, x, topk_ids, topk_weights, w1, w2):
    if x.dim() != 2:
        raise ValueError(f"x must be [T, hidden] (got {tuple(x.shape)})")
    t, h = x.shape
    if topk_ids.dim() != 2 or topk_ids.shape[0] != t or topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} "
            f"must both be [T={t}, top_k]"
        )
    if w1.dim() != 3 or w2.dim() != 3 or w1.shape[2] != h or w2.shape[1] != h:
        raise ValueError(
            f"w1 {tuple(w1.shape)} must be [experts, 2*ffn, {h}] and w2 {tuple(w2.shape)} "
            f"[experts, {h}, ffn]"
        )
    e, f = w2.shape[0], w2.shape[2]
    if w1.shape[0] != e or w1.shape[1] != 2 * f:
        raise ValueError(f"w1 {tuple(w1.shape)} does not match w2 {tuple(w2.shape)}")
    return t, h, e, f


def _moe(x, topk_ids, topk_weights, w1, w2, dtype):
    import torch

    t, h, e, f = _check(torch, x, topk_ids, topk_weights, w1, w2)
    ids = topk_ids.long()
    xs = x.to(dtype)
    y = torch.zeros(t, h, device=x.device, dtype=torch.float32)
    for ex in torch.unique(ids[ids >= 0]).tolist():
        if ex >= e:
            raise ValueError(f"expert id {ex} out of range for {e} experts")
        tok, slot = (ids == ex).nonzero(as_tuple=True)
        a = xs[tok] @ w1[ex].to(dtype).t()
        a = torch.nn.functional.silu(a[:, :f]) * a[:, f:]
        o = a @ w2[ex].to(dtype).t()
        y.index_add_(0, tok, o.float() * topk_weights[tok, slot].float().unsqueeze(1))
    return y


def moe_reference(x, topk_ids, topk_weights, w1, w2):
    """``y[t] = sum_j w[t,j] * W2_e(silu(W_gate,e x[t]) * W_up,e x[t])`` with
    ``e = topk_ids[t, j]`` (negative ids dropped), every product in f32.
    Returns f32 ``[T, hidden]``. Synchronises (it looks at the ids)."""
    import torch

    return _moe(x, topk_ids, topk_weights, w1, w2, torch.float32)


def moe_torch(x, topk_ids, topk_weights, w1, w2):
    """The same layer in x's dtype (bf16 GEMMs, f32 sum), as a plain
    PyTorch MoE block computes it; returns x's dtype."""
    return _moe(x, topk_ids, topk_weights, w1, w2, x.dtype).to(x.dtype)
