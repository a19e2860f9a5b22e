"""CPU timing of the per-call argument path of ``comet.MoeLayer.forward``
with real torch tensors, for machines without a GPU (not run by CI).

A GPU forward reads and checks its six tensors in Rust before the Rust
forward starts (``layer.enqueue_us`` times only the latter). CPU tensors
make ``comet.check_inputs`` do the same reads and then fail at the first
device check, so:

- ``check_inputs, 6 tensors`` is one call's argument parsing, all six
  tensors read, and one ValueError raised and caught;
- ``one tensor read`` is the difference between six tensors and five (y
  left out): the same call and the same exception, one tensor fewer.

The wrapper ``MoeLayer.forward`` is timed around a native layer that does
nothing and a stream getter that returns 0 (the current stream cannot be
read without CUDA, so its share is left to a GPU run); torch's calls in it
are also timed one by one.

    python crates/comet-py/bench/argument_path.py   # torch and comet installed
"""

import statistics
import time

import torch

import comet

H, F, EPR, K, T = 4096, 896, 8, 2, 128  # the cost does not depend on shapes
ROUNDS, CALLS = 30, 4000


def timed(cases):
    """Microseconds per call of each case: the minimum over ROUNDS rounds of
    CALLS calls, the cases interleaved so that load drifts hit all alike."""
    got = {name: [] for name in cases}
    for _ in range(ROUNDS):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            for _ in range(CALLS):
                fn()
            got[name].append((time.perf_counter() - t0) / CALLS * 1e6)
    return {name: (min(v), statistics.median(v)) for name, v in got.items()}


def main():
    x = torch.empty(T, H, dtype=torch.bfloat16)
    ids = torch.zeros(T, K, dtype=torch.int64)
    w = torch.zeros(T, K, dtype=torch.float32)
    w1 = torch.empty(EPR, 2 * F, H, dtype=torch.bfloat16)
    w2 = torch.empty(EPR, H, F, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    kw = dict(hidden=H, ffn=F, experts_per_rank=EPR, top_k=K, max_tokens=8192, device=0)

    try:
        comet.check_inputs(x, ids, w, w1, w2, y, **kw)
        raise SystemExit("CPU tensors were accepted: nothing here times the GPU path")
    except ValueError as e:
        if "x must be a CUDA tensor" not in str(e):
            raise
        print(f"CPU tensors stop at: {e}")

    def native(out, grad):
        def call():
            try:
                comet.check_inputs(x, ids, w, w1, w2, out, grad_enabled=grad, **kw)
            except ValueError:
                pass
        return call

    def raised():
        try:
            raise ValueError("comet: x must be a CUDA tensor on cuda:0 (got device cpu)")
        except ValueError:
            pass

    for grad in (False, True):
        r = timed({"six": native(y, grad), "five": native(None, grad)})
        six, five = r["six"][0], r["five"][0]
        print(f"grad_enabled={grad}: check_inputs, 6 tensors {six:.2f} us "
              f"(median {r['six'][1]:.2f}); one tensor read {six - five:.2f} us, "
              f"x6 = {6 * (six - five):.2f} us")

    class Native:
        def forward(self, *args):
            pass

    layer = comet.MoeLayer.__new__(comet.MoeLayer)
    layer._layer, layer.device, layer._current_stream = Native(), 0, lambda device: 0
    r = timed({"wrapper": lambda: layer.forward(x, ids, w, w1, w2),
               "native stub": lambda: layer._layer.forward(x, ids, w, w1, w2, y, 0, False)})
    print(f"MoeLayer.forward without the stream and the native call: "
          f"{r['wrapper'][0] - r['native stub'][0]:.2f} us")

    contiguous = torch.contiguous_format
    pieces = timed({
        "isinstance(x, torch.Tensor)": lambda: isinstance(x, torch.Tensor),
        "torch.empty_like(x, memory_format=contiguous)":
            lambda: torch.empty_like(x, memory_format=contiguous),
        "torch.is_grad_enabled()": torch.is_grad_enabled,
        "Python raise + catch of a ValueError": raised,
        "x.dtype": lambda: x.dtype,
        "str(x.dtype)": lambda: str(x.dtype),
        "x.shape": lambda: x.shape,
        "x.device": lambda: x.device,
        "x.device.type": lambda: x.device.type,
        "x.device.index": lambda: x.device.index,
        "x.is_cuda": lambda: x.is_cuda,
        "x.get_device()": lambda: x.get_device(),
        "x.is_contiguous()": lambda: x.is_contiguous(),
        "x.data_ptr()": lambda: x.data_ptr(),
        "x.requires_grad": lambda: x.requires_grad,
        "(empty lambda: the loop's own cost)": lambda: None,
    })
    print("from Python, each including the loop's own cost:")
    for name, (best, _) in pieces.items():
        print(f"  {name:48s} {best:6.3f} us")


if __name__ == "__main__":
    main()
