"""GPU tests of the `comet` module: the layer against comet.moe_reference
(f32 torch) with the same weights, for a Hugging Face Mixtral-style block
(softmax, top-2, renormalised weights, SwiGLU experts) at 2e-2 of the
output's scale; one rank in this process, two processes sharing GPU 0
(gloo group, and torchrun's environment without a group); several calls
with changing routing; under torch.cuda.graph.

Skipped without torch or without a CUDA device. Runs under pytest, or
alone without pytest: `python3 test_gpu.py` (prints a pytest-style total).
"""

import os
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

try:
    import pytest
except ImportError:  # standalone run on a machine without pytest
    pytest = None


class _Skip(Exception):
    pass


def skip(why):
    if pytest is not None:
        pytest.skip(why)
    raise _Skip(why)


def raises(exc, call, *args, **kw):
    """The exception `call` raises (which must be an `exc`)."""
    try:
        call(*args, **kw)
    except exc as e:
        return e
    raise AssertionError(f"{getattr(call, '__name__', call)} did not raise {exc.__name__}")


try:
    import torch
except ImportError:
    torch = None

import comet  # noqa: E402


def gpu():
    """Skips the test unless torch sees a CUDA device and comet does too."""
    if torch is None:
        skip("torch is not installed")
    if not torch.cuda.is_available() or not comet.cuda_available():
        skip("no CUDA device")
    import gpu_common

    return gpu_common


_LAYERS = {}


def layer_w1(**kw):
    """One rank in this process (layers are cached per options)."""
    c = gpu()
    key = tuple(sorted(kw.items()))
    if key not in _LAYERS:
        _LAYERS[key] = comet.MoeLayer(c.H, c.F, c.E, c.K, c.MAX_T, **kw)
    lay = _LAYERS[key]
    lay.mode = "fused"
    return lay


def test_hf_style_block_matches_the_reference_over_changing_routing():
    c = gpu()
    layer = layer_w1()
    assert (layer.rank, layer.world, layer.experts_per_rank) == (0, 1, c.E)
    w1, w2, router = c.weights(1)
    with torch.no_grad():
        for it, t in enumerate([300, c.MAX_T, 1, 77, 512, 129]):
            for mode in ("fused", "sequential"):
                layer.mode = mode
                wdt = torch.bfloat16 if it % 2 else torch.float32
                x, ids, w = c.routed_tokens(10 * it + (mode == "fused"), t, router,
                                            weight_dtype=wdt)
                if it in (2, 5):
                    ids = ids.to(torch.int32)
                # A poisoned output: every element must be written.
                out = torch.full_like(x, float("nan"))
                y = layer(x, ids, w, w1, w2, out=out)
                assert y is out
                info = layer.check()
                assert info["sent_rows"] == t * c.K and info["recv_rows"] == t * c.K, info
                err = c.max_rel_err(y, comet.moe_reference(x, ids, w, w1, w2))
                assert err <= c.TOL, f"call {it} ({mode}, T={t}, {wdt}): max rel err {err:.3g}"


def test_fresh_output_and_plain_torch_layer_agree():
    c = gpu()
    layer = layer_w1()
    w1, w2, router = c.weights(2)
    x, ids, w = c.routed_tokens(5, 256, router)
    with torch.no_grad():
        y = layer(x, ids, w, w1, w2)
        assert y.shape == x.shape and y.dtype == torch.bfloat16 and y.device == x.device
        plain = comet.moe_torch(x, ids, w, w1, w2)
    layer.check()
    ref = comet.moe_reference(x, ids, w, w1, w2)
    assert c.max_rel_err(y, ref) <= c.TOL
    assert c.max_rel_err(plain, ref) <= c.TOL


def test_dropped_slots_and_empty_calls():
    c = gpu()
    layer = layer_w1()
    w1, w2, router = c.weights(3)
    x, ids, w = c.routed_tokens(6, 200, router)
    ids[::3, 1] = -1
    ids[5, :] = -1
    with torch.no_grad():
        y = layer(x, ids, w, w1, w2)
    info = layer.check()
    assert info["sent_rows"] == int((ids >= 0).sum()), info
    assert y[5].abs().max().item() == 0.0, "a token with every slot dropped gets 0"
    assert c.max_rel_err(y, comet.moe_reference(x, ids, w, w1, w2)) <= c.TOL
    empty = x[:0]
    with torch.no_grad():
        y0 = layer(empty, ids[:0], w[:0], w1, w2)
    layer.check()
    assert y0.shape == (0, c.H)


def test_hugging_face_mixtral_block():
    c = gpu()
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        skip("transformers is not installed")
    cfg = MixtralConfig(hidden_size=c.H, intermediate_size=c.F, num_local_experts=c.E,
                        num_experts_per_tok=c.K)
    torch.manual_seed(0)
    with torch.device("cuda"):
        block = MixtralSparseMoeBlock(cfg).to(torch.bfloat16).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.uniform_(-1, 1).div_(p.shape[-1] ** 0.5)
    w1, w2 = comet.from_hf_mixtral(block.experts)
    assert w1.shape == (c.E, 2 * c.F, c.H) and w2.shape == (c.E, c.H, c.F)
    layer = layer_w1()
    x = (torch.rand(1, 333, c.H, device="cuda") * 2 - 1).to(torch.bfloat16)
    with torch.no_grad():
        hf = block(x)
        hf = hf[0] if isinstance(hf, tuple) else hf
        logits = torch.nn.functional.linear(x[0], block.gate.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        w, ids = torch.topk(probs, c.K, dim=-1)
        w = (w / w.sum(-1, keepdim=True)).to(torch.bfloat16)
        y = layer(x[0], ids, w, w1, w2)
    layer.check()
    ref = hf[0].float()
    assert c.max_rel_err(y, ref) <= c.TOL, f"vs HF: {c.max_rel_err(y, ref):.3g}"


def _graph(capture_error_mode):
    c = gpu()
    layer = layer_w1()
    w1, w2, router = c.weights(4)
    t = 384
    x, ids, w = c.routed_tokens(40, t, router)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            layer(x, ids, w, w1, w2)
        torch.cuda.current_stream().wait_stream(side)
        layer.check()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, capture_error_mode=capture_error_mode):
            y = layer(x, ids, w, w1, w2)
        for rep in range(4):
            nx, nids, nw = c.routed_tokens(50 + rep, t, router)
            x.copy_(nx)
            ids.copy_(nids)
            w.copy_(nw)
            y.fill_(float("nan"))
            g.replay()
            layer.check()
            err = c.max_rel_err(y, comet.moe_reference(x, ids, w, w1, w2))
            assert err <= c.TOL, f"replay {rep} ({capture_error_mode}): max rel err {err:.3g}"


def test_cuda_graph_relaxed_capture():
    _graph("relaxed")


def test_cuda_graph_default_capture():
    _graph("global")


def test_bad_calls_raise_and_the_layer_recovers():
    c = gpu()
    layer = layer_w1()
    w1, w2, router = c.weights(5)
    x, ids, w = c.routed_tokens(60, 64, router)
    with torch.no_grad():
        e = raises(ValueError, layer, x.float(), ids, w, w1, w2)
        assert "x must be torch.bfloat16" in str(e)
        e = raises(ValueError, layer, x.cpu(), ids, w, w1, w2)
        assert "x must be a CUDA tensor" in str(e)
        e = raises(ValueError, layer, x, ids, w, w1[:, : w1.shape[1] // 2].contiguous(), w2)
        assert "w1 must have shape" in str(e)
        e = raises(ValueError, layer, x, ids, w, w1.transpose(1, 2), w2)
        assert "w1 must be contiguous" in str(e)
        e = raises(ValueError, layer, x, ids, w, w1[:, ::2], w2)
        assert "w1 must have shape" in str(e) or "contiguous" in str(e)
        e = raises(ValueError, layer, x, ids.t().contiguous().t(), w, w1, w2)
        assert "topk_ids must be contiguous" in str(e)
        big = torch.zeros(c.MAX_T + 1, c.H, device="cuda", dtype=torch.bfloat16)
        e = raises(ValueError, layer, big, ids, w, w1, w2)
        assert f"max_tokens={c.MAX_T}" in str(e)
        e = raises(ValueError, layer, x, ids.float(), w, w1, w2)
        assert "topk_ids must be torch.int32 or torch.int64" in str(e)
        # An expert id out of range is found on the device: raised by check().
        bad = ids.clone()
        bad[3, 0] = c.E
        layer(x, bad, w, w1, w2)
    e = raises(comet.CometError, layer.check)
    assert "expert id out of range at slot 6" in str(e), str(e)
    # Autograd: no backward yet.
    xg = x.float().requires_grad_(True).to(torch.bfloat16)
    e = raises(NotImplementedError, layer, xg, ids, w, w1, w2)
    assert "backward is not supported yet" in str(e)
    # The layer works again after the errors.
    with torch.no_grad():
        y = layer(x, ids, w, w1, w2)
    layer.check()
    assert c.max_rel_err(y, comet.moe_reference(x, ids, w, w1, w2)) <= c.TOL


def test_a_receive_bound_refuses_a_call_beyond_it():
    """max_recv_rows: a call routing more rows to the rank than its bound
    fails on the device (raised by check()) and moves nothing; a call
    within it matches the reference."""
    c = gpu()
    layer = layer_w1(max_recv_rows=100)
    assert layer.plan()["recv_capacity"] == 100
    w1, w2, router = c.weights(7)
    with torch.no_grad():
        x, ids, w = c.routed_tokens(70, 64, router)  # 128 rows at one rank
        layer(x, ids, w, w1, w2)
        e = raises(comet.CometError, layer.check)
        assert "rank 0 would receive more rows than its receive capacity" in str(e), str(e)
        x, ids, w = c.routed_tokens(71, 40, router)  # 80 rows
        y = layer(x, ids, w, w1, w2)
    layer.check()
    assert c.max_rel_err(y, comet.moe_reference(x, ids, w, w1, w2)) <= c.TOL


def test_one_rank_over_nccl_matches_the_reference():
    """The layer over NCCL (proxy thread, lanes, landings) on one rank; two
    ranks need a GPU each (NCCL refuses two on one), so they wait for a
    multi-GPU machine (scripts/nccl-layer.sh). Needs libnccl.so on the
    library path (device-checks.sh links torch's libnccl.so.2)."""
    c = gpu()
    try:
        layer = layer_w1(transport="nccl")
    except comet.CometError as e:
        if "libnccl cannot be loaded" in str(e):
            skip(str(e))
        raise
    assert layer.plan()["wire"] == "rows"
    w1, w2, router = c.weights(3)
    with torch.no_grad():
        for it, t in enumerate([300, 1, c.MAX_T, 77]):
            for mode in ("fused", "sequential"):
                layer.mode = mode
                x, ids, w = c.routed_tokens(40 + 2 * it + (mode == "fused"), t, router)
                out = torch.full_like(x, float("nan"))
                y = layer(x, ids, w, w1, w2, out=out)
                layer.check()
                err = c.max_rel_err(y, comet.moe_reference(x, ids, w, w1, w2))
                assert err <= c.TOL, f"nccl call {it} ({mode}, T={t}): max rel err {err:.3g}"


def test_plan_mode_and_repr_on_the_device():
    c = gpu()
    layer = layer_w1()
    p = layer.plan()
    props = torch.cuda.get_device_properties(layer.device)
    assert p["sms"] == props.multi_processor_count and p["ranks_per_gpu"] == 1
    assert p["capacity"] == c.MAX_T and p["overlap"] is False
    layer.mode = "sequential"
    assert layer.mode == "sequential"
    e = raises(ValueError, setattr, layer, "mode", "fast")
    assert 'mode must be "fused" or "sequential"' in str(e)
    layer.mode = "fused"
    assert "rank=0" in repr(layer) and "world=1" in repr(layer)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(how, world=2, timeout=600):
    gpu()
    port = _free_port()
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env.pop("TORCHELASTIC_RUN_ID", None)
        env.pop("COMET_MASTER_PORT", None)
        procs.append(subprocess.Popen([sys.executable, os.path.join(HERE, "gpu_worker.py"), how],
                                      env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + timeout
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"RANK {r} OK" in out, (
            f"rank {r} exited {p.returncode}:\n{out[-4000:]}"
        )
        print(out.strip().splitlines()[-1])


def test_two_processes_on_one_gpu_through_a_gloo_group():
    _two_processes("group")


def test_two_processes_on_one_gpu_from_the_torchrun_environment():
    _two_processes("env")


def test_two_processes_on_one_gpu_under_a_cuda_graph():
    _two_processes("graph")


def _main():
    tests = [(n, f) for n, f in globals().items() if n.startswith("test_") and callable(f)]
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    t0 = time.monotonic()
    for name, f in tests:
        try:
            f()
        except _Skip as e:
            counts["skipped"] += 1
            print(f"SKIPPED {name}: {e}")
        except Exception as e:  # report every test, then the total
            counts["failed"] += 1
            print(f"FAILED {name}: {type(e).__name__}: {e}")
        else:
            counts["passed"] += 1
            print(f"PASSED {name}")
    print(", ".join(f"{v} {k}" for k, v in counts.items() if v) +
          f" in {time.monotonic() - t0:.2f}s")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(_main())
