"""comet: the COMET Mixture-of-Experts layer of comet-rs for PyTorch.

One rank of an expert-parallel MoE layer whose token dispatch and combine
overlap the expert GEMMs on the GPU (arXiv 2502.19811). The kernels are
CUDA sources compiled at run time by NVRTC for the GPU present.

    import torch, comet
    layer = comet.MoeLayer(hidden=4096, ffn=14336, experts=8, top_k=2,
                           max_tokens=8192, group=dist.group.WORLD)
    w1, w2 = comet.from_hf_mixtral(hf_block.experts, rank=layer.rank,
                                   world=layer.world)
    with torch.no_grad():
        y = layer(x, topk_ids, topk_weights, w1, w2)

Tensors (all on the layer's CUDA device, contiguous, row-major):

- ``x``: bf16 ``[T, hidden]``, T <= max_tokens (T may differ per rank);
- ``topk_ids``: int64 or int32 ``[T, top_k]``, *global* expert ids in
  ``[0, experts)``; a negative id drops the slot; an id >= experts is a
  device error (raised by the next call or by ``check()``);
- ``topk_weights``: float32 or bf16 ``[T, top_k]``, used as given (no
  renormalisation);
- ``w1``: bf16 ``[experts_per_rank, 2 * ffn, hidden]``, this rank's experts
  (experts ``rank * experts_per_rank`` onwards): gate rows ``[0, ffn)`` then
  up rows, each a ``Linear.weight`` row;
- ``w2``: bf16 ``[experts_per_rank, hidden, ffn]`` (``Linear.weight``);
- returns ``y``: bf16 ``[T, hidden]``,
  ``y[t] = sum_j w[t, j] * W2_e (silu(W_gate,e x[t]) * W_up,e x[t])``,
  ``e = ids[t, j]``.

Every rank of the world calls the constructor and each ``forward``
together (the calls are collective), with the same mode.
"""

from __future__ import annotations

import os
import sys

from . import _comet
from ._comet import CometError, cuda_available
from .hf import from_hf_mixtral
from .reference import moe_reference, moe_torch

__all__ = [
    "MoeLayer",
    "CometError",
    "cuda_available",
    "plan",
    "check_inputs",
    "moe_reference",
    "moe_torch",
    "from_hf_mixtral",
]

__version__ = _comet.__version__


def plan(hidden, ffn, experts, top_k, max_tokens, ranks=1, ranks_per_gpu=1, sms=132,
         max_recv_rows=None):
    """What a layer of this shape would run on an H200-like GPU of ``sms``
    SMs (no GPU needed): the cost model's choice as a dict (comm_blocks,
    chunks, chunk_cols, overlap, side_warps (one rank: its rows move in
    the GEMMs' idle producer warps), share, gemm grids, recv_capacity,
    ``wire`` (how token rows cross the link: "rows"), the estimate in
    ms, and ``text``, the summary ``comet plan`` prints). ``max_recv_rows``
    as in ``MoeLayer``."""
    return _comet.plan(hidden, ffn, experts, top_k, max_tokens, ranks, ranks_per_gpu, sms,
                       max_recv_rows)


def check_inputs(x, topk_ids, topk_weights, w1, w2, y=None, *, hidden, ffn,
                 experts_per_rank, top_k, max_tokens, device=0, grad_enabled=False):
    """The checks ``MoeLayer.forward`` makes on its tensors, without a
    layer or a GPU; raises what forward would raise, else returns
    ``{"tokens", "ids", "weights"}``."""
    return _comet.check_inputs(
        x, topk_ids, topk_weights, w1, w2, y,
        hidden=hidden, ffn=ffn, experts_per_rank=experts_per_rank, top_k=top_k,
        max_tokens=max_tokens, device=device, grad_enabled=grad_enabled,
    )


def _torch():
    import torch

    return torch


def _ensure_nvrtc():
    """Points the kernel compiler at the NVRTC that pip's CUDA wheels (the
    ones torch depends on) installed, unless COMET_NVRTC_LIB_DIR is set."""
    if os.environ.get("COMET_NVRTC_LIB_DIR"):
        return
    for base in sys.path:
        for sub in ("nvidia/cu13/lib", "nvidia/cuda_nvrtc/lib"):
            d = os.path.join(base or ".", sub)
            try:
                names = os.listdir(d)
            except OSError:
                continue
            if any(n.startswith("libnvrtc.so") for n in names) and any(
                n.startswith("libnvrtc-builtins.so") for n in names
            ):
                os.environ["COMET_NVRTC_LIB_DIR"] = d
                return


class _GroupExchange:
    """The IPC-handle all-gather through a torch.distributed group (gloo or
    nccl): what the native layer calls back while it is being built."""

    def __init__(self, group):
        import torch.distributed as dist

        if not dist.is_initialized():
            raise ValueError("comet: group given but torch.distributed is not initialised")
        self._dist = dist
        self._group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        if self.rank < 0:
            raise ValueError("comet: this process is not a member of the group")

    def all_gather(self, blob, timeout_s):
        # The group's own timeout bounds this collective.
        out = [None] * self.world
        self._dist.all_gather_object(out, bytes(blob), group=self._group)
        return [bytes(b) for b in out]


def _exchange_for(group):
    if group is None:
        return None
    # Any object with rank, world and all_gather(blob, timeout_s) -> list of
    # bytes can carry the exchange (tests use this); otherwise a
    # torch.distributed ProcessGroup.
    if all(hasattr(group, a) for a in ("rank", "world", "all_gather")) and not callable(
        getattr(group, "rank")
    ):
        return group
    return _GroupExchange(group)


def _stream_reader(torch):
    """A function from a CUDA ordinal to the handle of torch's current
    stream there, for ``forward``. ``torch.cuda.current_stream`` checks
    torch's CUDA initialisation and builds a Stream object on every call;
    the raw getter (the one torch's own compiler uses) returns the handle
    alone, so it is taken where this torch has it, after initialising
    torch's CUDA once, which the raw getter does not do."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is None:
        return lambda device: torch.cuda.current_stream(device).cuda_stream
    torch.cuda.init()
    return raw


def _device_index(device):
    if device is None:
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            return torch.cuda.current_device()
        return 0
    if isinstance(device, int):
        return device
    if isinstance(device, str):
        device = _torch().device(device)
    if getattr(device, "type", "cuda") != "cuda":
        raise ValueError(f"comet: the layer runs on a CUDA device (got {device})")
    idx = getattr(device, "index", None)
    if idx is None:
        return _device_index(None)
    return int(idx)


class MoeLayer:
    """One rank of the MoE layer (see the module docs for the tensors).

    ``MoeLayer(hidden, ffn, experts, top_k, max_tokens, group=None,
    transport="nvlink", mode="fused", timeout_s=30.0, ranks_per_gpu=None,
    device=None)`` is collective. The world is ``group``'s (a
    torch.distributed group, gloo or nccl, through which the CUDA IPC
    handles travel); without a group, torchrun's environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) with comet's TCP
    bootstrap, rank 0 listening on ``COMET_MASTER_PORT``, else under
    torchrun on ``MASTER_PORT + 1`` (torchrun's store holds MASTER_PORT),
    else on ``MASTER_PORT``; without either, one rank. Ranks may share a
    GPU (each gets its share of the SMs; ``ranks_per_gpu`` is found from
    the device UUIDs unless given, and then must be given on every rank).
    ``timeout_s`` bounds every device wait and every bootstrap step: past
    it the call fails naming the rank and the signal instead of hanging.
    Through a ``group`` the IPC-handle exchange is the group's own
    collective, bounded by the group's timeout, not ``timeout_s``; with
    ``transport="nccl"``, NCCL's communicator set-up blocks inside NCCL
    (docs/ARCHITECTURE.md).
    ``device`` is a CUDA ordinal or torch.device (default: torch's current
    device); ``dtype`` may only be torch.bfloat16 (x, y and the weights).
    ``transport`` is "nvlink" (the kernels store into the peers' memory:
    ranks on one host, which may share GPUs) or "nccl" (a proxy thread
    sends each piece as the kernels finish it, per ordered pair of ranks:
    one GPU per rank, on one host or across hosts; its calls cannot be
    captured in a CUDA graph, since the proxy must see every call).
    ``max_recv_rows`` bounds the rows one rank receives in a call (default:
    the worst case, every rank sending all its ``max_tokens * top_k`` rows
    to it, which grows with the world); a call whose routing would send a
    rank more fails with an error naming that rank, never dropping rows.
    """

    def __init__(self, hidden, ffn, experts, top_k, max_tokens, group=None,
                 transport="nvlink", mode="fused", timeout_s=30.0, ranks_per_gpu=None,
                 device=None, dtype=None, max_recv_rows=None):
        if dtype is not None and str(dtype) != "torch.bfloat16":
            raise ValueError(f"comet: the layer computes in torch.bfloat16 only (got {dtype})")
        _ensure_nvrtc()
        self._layer = _comet.Layer(
            hidden, ffn, experts, top_k, max_tokens,
            exchange=_exchange_for(group), transport=transport, mode=mode,
            timeout_s=float(timeout_s), ranks_per_gpu=ranks_per_gpu,
            device=_device_index(device), max_recv_rows=max_recv_rows,
        )
        self.hidden, self.ffn, self.experts, self.top_k = hidden, ffn, experts, top_k
        self.max_tokens = max_tokens
        self.device = self._layer.device
        # Chosen by the first forward, where torch is known to be wanted.
        self._current_stream = None

    @property
    def rank(self):
        return self._layer.rank

    @property
    def world(self):
        return self._layer.world

    @property
    def experts_per_rank(self):
        return self._layer.experts_per_rank

    @property
    def expert_range(self):
        """The global ids of this rank's experts (w1/w2 hold them in order)."""
        e = self.experts_per_rank
        return range(self.rank * e, (self.rank + 1) * e)

    @property
    def enqueue_us(self):
        """Microseconds the Rust forward took to enqueue the last call (the
        host time of a call beyond the Python-side argument checks)."""
        return self._layer.enqueue_us

    @property
    def mode(self):
        """``"fused"`` (overlapped where the plan says it pays) or
        ``"sequential"`` (the non-overlapped baseline); every rank must use
        the same mode for a call."""
        return self._layer.mode

    @mode.setter
    def mode(self, value):
        self._layer.mode = value

    def plan(self):
        """The layer's plan (see ``comet.plan``) for this GPU and world."""
        return self._layer.plan()

    def forward(self, x, topk_ids, topk_weights, w1, w2, out=None):
        """Enqueues the layer on torch's current stream and returns ``y``
        (or ``out``, filled) at once, without synchronising; capturable in
        a CUDA graph. Collective: every rank calls it, T may differ."""
        torch = _torch()
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"comet: x must be a torch.Tensor (got {type(x).__name__})")
        y = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
        current_stream = self._current_stream
        if current_stream is None:
            current_stream = self._current_stream = _stream_reader(torch)
        self._layer.forward(x, topk_ids, topk_weights, w1, w2, y, current_stream(self.device),
                            torch.is_grad_enabled())
        return y

    __call__ = forward

    def check(self):
        """Synchronises the current stream and the layer's, then raises
        CometError for the first device error of the calls so far (a
        device wait that timed out, an expert id out of range, receive
        capacity exceeded); returns what the last call did."""
        return self._layer.check(self._stream())

    def close(self):
        """Collective: waits for the layer's work, meets every rank, frees
        the layer's GPU memory. Without it the memory goes with the object,
        possibly while a peer still reads it."""
        self._layer.close(self._stream())

    def _stream(self):
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available():
            return 0
        return torch.cuda.current_stream(self.device).cuda_stream

    def __repr__(self):
        return (f"comet.MoeLayer(hidden={self.hidden}, ffn={self.ffn}, experts={self.experts}, "
                f"top_k={self.top_k}, max_tokens={self.max_tokens}, rank={self.rank}, "
                f"world={self.world}, device=cuda:{self.device}, mode={self.mode!r})")
