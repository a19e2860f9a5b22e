"""Hugging Face Mixtral expert weights -> ``MoeLayer``'s (w1, w2), once.

- transformers 5.x ``MixtralExperts`` (``block.experts``): ``gate_up_proj``
  ``[E, 2F, H]`` (gate rows then up rows) and ``down_proj`` ``[E, H, F]``,
  already our layout (a transposed variant, ``[E, H, 2F]`` / ``[E, F, H]``,
  is recognised by its shapes);
- transformers 4.x: ``block.experts`` is a ModuleList of
  ``MixtralBlockSparseTop2MLP`` with ``w1`` (gate, ``[F, H]``), ``w3`` (up,
  ``[F, H]``) and ``w2`` (down, ``[H, F]``) Linear layers: stacked as
  ``w1 = [w1; w3]`` per expert and ``w2``;
- a state dict of either (keys ending in ``gate_up_proj``/``down_proj``, or
  ``<i>.w1.weight``/``<i>.w2.weight``/``<i>.w3.weight``) for one layer;
- the sparse block itself (its ``experts`` is used).
"""

from __future__ import annotations

import re

_PER_EXPERT = re.compile(r"^(.*?)(\d+)\.(w[123])\.weight$")


def _state_of(src):
    if isinstance(src, dict) or hasattr(src, "keys") and not hasattr(src, "state_dict"):
        return dict(src)
    if hasattr(src, "experts") and not hasattr(src, "gate_up_proj"):
        src = src.experts
    if hasattr(src, "state_dict"):
        return src.state_dict()
    raise TypeError(
        f"from_hf_mixtral takes a Mixtral experts module, sparse block or state dict "
        f"(got {type(src).__name__})"
    )


def _one(state, suffix):
    keys = [k for k in state if k == suffix or k.endswith("." + suffix)]
    if len(keys) > 1:
        raise ValueError(
            f"the state dict holds several layers' {suffix} ({sorted(keys)[:4]}...); "
            "pass one layer's experts"
        )
    return state[keys[0]] if keys else None


def _fused(gate_up, down):
    if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[0] != down.shape[0]:
        raise ValueError(
            f"gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} "
            "must be [E, 2F, H] and [E, H, F]"
        )
    if gate_up.shape[1] == 2 * down.shape[2] and gate_up.shape[2] == down.shape[1]:
        return gate_up, down
    if gate_up.shape[2] == 2 * down.shape[1] and gate_up.shape[1] == down.shape[2]:
        return gate_up.transpose(1, 2), down.transpose(1, 2)
    raise ValueError(
        f"gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} are not "
        "[E, 2F, H] and [E, H, F] (nor their transposes)"
    )


def _per_expert(state):
    import torch

    found = {}
    prefixes = set()
    for k, v in state.items():
        m = _PER_EXPERT.match(k)
        if m:
            prefixes.add(m.group(1))
            found[(int(m.group(2)), m.group(3))] = v
    if not found:
        raise ValueError(
            "no Mixtral expert weights found: expected gate_up_proj/down_proj or "
            f"<i>.w1/w2/w3.weight keys (got {sorted(state)[:6]})"
        )
    if len(prefixes) > 1:
        raise ValueError(
            f"the state dict holds experts of several layers ({sorted(prefixes)[:4]}); "
            "pass one layer's experts"
        )
    n = 1 + max(i for i, _ in found)
    missing = [f"{i}.{w}" for i in range(n) for w in ("w1", "w2", "w3") if (i, w) not in found]
    if missing:
        raise ValueError(f"expert weights missing: {missing[:6]}")
    w1 = torch.stack([torch.cat([found[(i, "w1")], found[(i, "w3")]], 0) for i in range(n)])
    w2 = torch.stack([found[(i, "w2")] for i in range(n)])
    return w1, w2


def from_hf_mixtral(experts, rank=0, world=1, device=None, dtype=None):
    """(w1, w2) of ``rank``'s experts (``experts / world`` of them, global
    ids from ``rank * experts / world``), bf16 and contiguous, on
    ``device`` (default: where the weights are), detached."""
    import torch

    state = _state_of(experts)
    gu, dn = _one(state, "gate_up_proj"), _one(state, "down_proj")
    if gu is not None and dn is not None:
        w1, w2 = _fused(gu, dn)
    else:
        w1, w2 = _per_expert(state)
    e = w1.shape[0]
    if world < 1 or not 0 <= rank < world or e % world:
        raise ValueError(f"{e} experts cannot be split as rank {rank} of {world} ranks")
    per = e // world
    sl = slice(rank * per, (rank + 1) * per)
    dtype = dtype or torch.bfloat16
    out = []
    for w in (w1[sl], w2[sl]):
        w = w.detach()
        if device is not None:
            w = w.to(device)
        out.append(w.to(dtype).contiguous())
    return out[0], out[1]
