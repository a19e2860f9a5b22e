"""CPU tests of the `comet` module (run by `cargo xtask ci`): import, the
argument checks and their messages, plans, and bootstrap errors. They need
neither a GPU nor torch: tensors are small fakes answering the attributes
the module reads (dtype, shape, is_cuda, get_device(), is_contiguous(),
data_ptr(), requires_grad, and device for error messages) the way
torch.Tensor does."""

import os
import socket
import threading
import time

import pytest

import comet

H, F, E, K, EPR, MAX_T = 512, 384, 8, 2, 4, 64


class Dtype:
    def __init__(self, name):
        self.name = name

    def __str__(self):
        return "torch." + self.name


class Device:
    def __init__(self, type_, index):
        self.type = type_
        self.index = index


class Fake:
    """A tensor-like object: what comet reads of a torch.Tensor."""

    _next = 0x7F00_0000_0000

    def __init__(self, shape, dtype, device=("cuda", 0), contiguous=True, ptr=None,
                 requires_grad=False):
        self.shape = tuple(shape)
        self.dtype = Dtype(dtype)
        self.device = Device(*device)
        self._contiguous = contiguous
        if ptr is None:
            Fake._next += 1 << 20
            ptr = Fake._next
        self._ptr = ptr
        self.requires_grad = requires_grad

    @property
    def is_cuda(self):
        return self.device.type == "cuda"

    def get_device(self):
        # torch: the CUDA ordinal, -1 for a CPU tensor.
        return self.device.index if self.device.type == "cuda" else -1

    def data_ptr(self):
        return self._ptr

    def is_contiguous(self):
        return self._contiguous


def inputs(t=10, **over):
    """A valid call's tensors; `over` replaces some of them."""
    d = dict(
        x=Fake((t, H), "bfloat16"),
        topk_ids=Fake((t, K), "int64"),
        topk_weights=Fake((t, K), "float32"),
        w1=Fake((EPR, 2 * F, H), "bfloat16"),
        w2=Fake((EPR, H, F), "bfloat16"),
        y=Fake((t, H), "bfloat16"),
    )
    d.update(over)
    return d


def check(grad_enabled=False, **tensors):
    return comet.check_inputs(
        hidden=H, ffn=F, experts_per_rank=EPR, top_k=K, max_tokens=MAX_T,
        device=0, grad_enabled=grad_enabled, **tensors,
    )


def test_import_and_names():
    assert comet.__version__
    assert issubclass(comet.CometError, RuntimeError)
    for name in ("MoeLayer", "plan", "check_inputs", "moe_reference", "from_hf_mixtral",
                 "cuda_available"):
        assert hasattr(comet, name), name
    assert comet._comet.Layer.__module__ == "comet._comet"


def test_valid_inputs_pass_and_report_their_types():
    got = check(**inputs(t=10))
    assert got == {"tokens": 10, "ids": "int64", "weights": "float32"}
    got = check(**inputs(t=MAX_T, topk_ids=Fake((MAX_T, K), "int32"),
                         topk_weights=Fake((MAX_T, K), "bfloat16")))
    assert got == {"tokens": MAX_T, "ids": "int32", "weights": "bfloat16"}
    # No tokens at all is a valid call (every rank calls every time).
    empty = inputs(t=0, x=Fake((0, H), "bfloat16", ptr=0), y=Fake((0, H), "bfloat16", ptr=0))
    assert check(**empty)["tokens"] == 0
    # y may be left out (argument checks only).
    d = inputs()
    d.pop("y")
    assert check(**d)["tokens"] == 10


@pytest.mark.parametrize(
    "name,bad,message",
    [
        ("x", Fake((10, H), "float32"), "x must be torch.bfloat16 (got torch.float32)"),
        ("x", Fake((10, H), "float16"), "x must be torch.bfloat16 (got torch.float16)"),
        ("topk_ids", Fake((10, K), "float32"),
         "topk_ids must be torch.int32 or torch.int64 (got torch.float32)"),
        ("topk_ids", Fake((10, K), "uint8"),
         "topk_ids must be torch.int32 or torch.int64 (got torch.uint8)"),
        ("topk_weights", Fake((10, K), "float16"),
         "topk_weights must be torch.float32 or torch.bfloat16 (got torch.float16)"),
        ("w1", Fake((EPR, 2 * F, H), "float32"), "w1 must be torch.bfloat16"),
        ("w2", Fake((EPR, H, F), "float16"), "w2 must be torch.bfloat16"),
        ("y", Fake((10, H), "float32"), "y must be torch.bfloat16"),
    ],
)
def test_wrong_dtypes_are_named(name, bad, message):
    with pytest.raises(ValueError) as e:
        check(**inputs(**{name: bad}))
    assert message in str(e.value)


@pytest.mark.parametrize(
    "name,bad,message",
    [
        ("x", Fake((10, H + 64), "bfloat16"), f"x must have shape [T, {H}] (got [10, {H + 64}])"),
        ("x", Fake((10, 1, H), "bfloat16"), f"x must have shape [T, {H}]"),
        ("topk_ids", Fake((10, K + 1), "int64"), f"topk_ids must have shape [10, {K}]"),
        ("topk_ids", Fake((9, K), "int64"), f"topk_ids must have shape [10, {K}] (got [9, {K}])"),
        ("topk_weights", Fake((11, K), "float32"), f"topk_weights must have shape [10, {K}]"),
        ("topk_weights", Fake((10 * K,), "float32"), f"topk_weights must have shape [10, {K}]"),
        ("w1", Fake((EPR, F, H), "bfloat16"),
         f"w1 must have shape [{EPR}, {2 * F}, {H}] (got [{EPR}, {F}, {H}])"),
        ("w1", Fake((E, 2 * F, H), "bfloat16"), f"w1 must have shape [{EPR}, {2 * F}, {H}]"),
        ("w1", Fake((EPR, H, 2 * F), "bfloat16"), f"w1 must have shape [{EPR}, {2 * F}, {H}]"),
        ("w2", Fake((EPR, F, H), "bfloat16"), f"w2 must have shape [{EPR}, {H}, {F}]"),
        ("y", Fake((9, H), "bfloat16"), f"y must have shape [10, {H}]"),
    ],
)
def test_wrong_shapes_are_named(name, bad, message):
    with pytest.raises(ValueError) as e:
        check(**inputs(**{name: bad}))
    assert message in str(e.value)


@pytest.mark.parametrize("name", ["x", "topk_ids", "topk_weights", "w1", "w2", "y"])
def test_cpu_tensors_are_refused(name):
    good = inputs()[name]
    bad = Fake(good.shape, good.dtype.name, device=("cpu", None))
    with pytest.raises(ValueError) as e:
        check(**inputs(**{name: bad}))
    assert f"{name} must be a CUDA tensor on cuda:0 (got device cpu)" in str(e.value)


def test_tensors_on_another_gpu_are_refused():
    with pytest.raises(ValueError) as e:
        check(**inputs(w2=Fake((EPR, H, F), "bfloat16", device=("cuda", 1))))
    assert "w2 is on cuda:1 but the layer runs on cuda:0" in str(e.value)


@pytest.mark.parametrize("name", ["x", "topk_ids", "topk_weights", "w1", "w2", "y"])
def test_non_contiguous_tensors_are_refused(name):
    good = inputs()[name]
    bad = Fake(good.shape, good.dtype.name, contiguous=False)
    with pytest.raises(ValueError) as e:
        check(**inputs(**{name: bad}))
    assert f"{name} must be contiguous" in str(e.value)


def test_more_tokens_than_the_layer_was_built_for():
    t = MAX_T + 1
    with pytest.raises(ValueError) as e:
        check(**inputs(t=t))
    assert f"x has {t} tokens but the layer was built for max_tokens={MAX_T}" in str(e.value)


def test_misaligned_and_aliased_tensors():
    with pytest.raises(ValueError) as e:
        check(**inputs(x=Fake((10, H), "bfloat16", ptr=0x10008)))
    assert "x must start at a 16-byte aligned address" in str(e.value)
    x = Fake((10, H), "bfloat16")
    with pytest.raises(ValueError) as e:
        check(**inputs(x=x, y=Fake((10, H), "bfloat16", ptr=x.data_ptr())))
    assert "y must not be x" in str(e.value)


@pytest.mark.parametrize("name", ["x", "topk_weights", "w1", "w2"])
def test_grad_under_autograd_is_not_supported_yet(name):
    good = inputs()[name]
    needs = Fake(good.shape, good.dtype.name, requires_grad=True)
    with pytest.raises(NotImplementedError) as e:
        check(grad_enabled=True, **inputs(**{name: needs}))
    assert "backward is not supported yet" in str(e.value)
    assert name in str(e.value)
    # Without autograd (torch.no_grad / inference_mode) the same call is fine.
    assert check(grad_enabled=False, **inputs(**{name: needs}))["tokens"] == 10


def test_shapes_other_than_tuples_are_read_or_refused():
    as_list = Fake((10, H), "bfloat16")
    as_list.shape = [10, H]
    assert check(**inputs(x=as_list))["tokens"] == 10
    for shape, message in [("ab", "shape is not a sequence of integers"),
                           ((10, -H), "negative dimension"),
                           ((10, 1.5), "shape is not a sequence of integers")]:
        bad = Fake((10, H), "bfloat16")
        bad.shape = shape
        with pytest.raises(TypeError) as e:
            check(**inputs(x=bad))
        assert "x must be a torch.Tensor" in str(e.value) and message in str(e.value)


@pytest.mark.parametrize("bad", [None, 3, "x", [1, 2], object()])
def test_non_tensors_are_type_errors(bad):
    with pytest.raises(TypeError) as e:
        check(**inputs(x=bad))
    assert "x must be a torch.Tensor" in str(e.value)


def test_plan_of_a_mixtral_layer():
    p = comet.plan(4096, 14336, 8, 2, 8192)
    assert p["ranks"] == 1 and p["experts_per_rank"] == 8
    assert p["overlap"] is False, "one rank has no link to overlap"
    assert p["side_warps"] is True, "its rows move in the GEMMs' idle producer warps"
    assert p["chunks"] == 2 and p["chunk_cols"] == 2048, "the last chunk's sum is left after FC2"
    assert p["groups"] == 1, "expert groups need a combine to overlap"
    assert p["share"] == 132 and p["gemm_grid"] == 132
    assert p["capacity"] == 8192 and p["recv_capacity"] == 8192 * 2
    assert "device forward" in p["text"]
    assert p["wire"] == "rows", "kernels store a row per (token, expert) over nvlink"
    assert p["gather_x"] is False, "FC1 reads dispatched rows unless asked"
    assert "rows dispatched into expert order" in p["text"]
    est = p["estimate"]
    assert est["gemm_ms"] > 0 and est["baseline_ms"] >= est["gemm_ms"]
    assert abs(est["layer0_ms"] + est["layer1_ms"] - est["overlapped_ms"]) < 1e-9


def test_plan_of_ranks_sharing_a_gpu_stays_within_the_share():
    for ranks, per_gpu in [(2, 2), (4, 4), (8, 1)]:
        p = comet.plan(3584, 2560, 64, 8, 4096, ranks=ranks, ranks_per_gpu=per_gpu)
        assert p["share"] == 132 // per_gpu
        assert p["chunk_cols"] * p["chunks"] == 3584
        assert p["chunk_cols"] % p["fc2_tile_cols"] == 0
        if p["overlap"]:
            assert p["gemm_grid_overlap"] + p["comm_blocks"] <= p["share"]
        assert 1 <= p["groups"] <= 64 // ranks
        assert p["groups"] == 1 or p["overlap"]
    assert comet.plan(3584, 2560, 64, 8, 8192, ranks=8)["overlap"] is True


def test_plan_takes_a_bound_on_the_receive_rows():
    worst = comet.plan(7168, 2048, 256, 8, 4096, ranks=8)["recv_capacity"]
    assert worst == 8 * 4096 * 8, "by default every rank may send all its rows here"
    p = comet.plan(7168, 2048, 256, 8, 4096, ranks=8, max_recv_rows=2 * 4096 * 8)
    assert p["recv_capacity"] == 2 * 4096 * 8


@pytest.mark.parametrize(
    "args,message",
    [
        (dict(hidden=100), "hidden 100 must be a multiple of 256 (of 64 and of the FC2 tile"),
        (dict(ffn=1000), "ffn 1000 must be a multiple of 128 (of 64 and of the FC1 tile"),
        (dict(top_k=9), "top_k=9 is more than the 8 experts"),
        (dict(ranks=3), "8 experts cannot be split evenly over 3 ranks"),
        (dict(max_tokens=0), "max_tokens must be positive"),
        (dict(experts=0), "experts must be positive"),
        (dict(ranks_per_gpu=0), "must be positive"),
        (dict(max_recv_rows=0), "max_recv_rows must be positive"),
    ],
)
def test_plan_refuses_bad_shapes(args, message):
    kw = dict(hidden=1024, ffn=512, experts=8, top_k=2, max_tokens=128)
    kw.update(args)
    with pytest.raises(ValueError) as e:
        comet.plan(**kw)
    assert message in str(e.value)


@pytest.fixture
def clean_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
              "MASTER_PORT", "COMET_MASTER_PORT", "TORCHELASTIC_RUN_ID",
              "COMET_BOOTSTRAP_TIMEOUT_S"):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    "args,error,message",
    [
        (dict(transport="ucx"), ValueError, 'transport "ucx" is not available from Python'),
        (dict(mode="overlapped"), ValueError, 'mode must be "fused" or "sequential"'),
        (dict(timeout_s=0), ValueError, "timeout_s must be a positive number"),
        (dict(timeout_s=float("nan")), ValueError, "timeout_s must be a positive number"),
        (dict(ranks_per_gpu=0), ValueError, "ranks_per_gpu must be positive"),
        (dict(max_recv_rows=0), ValueError, "max_recv_rows must be positive"),
        (dict(hidden=1000), ValueError, "hidden 1000 must be a multiple of 256"),
        (dict(top_k=0), ValueError, "top_k must be positive"),
        (dict(max_tokens=0), ValueError, "max_tokens must be positive"),
        (dict(dtype=Dtype("float16")), ValueError, "torch.bfloat16 only (got torch.float16)"),
    ],
)
def test_layer_arguments_are_checked_before_anything_else(clean_env, args, error, message):
    kw = dict(hidden=1024, ffn=512, experts=8, top_k=2, max_tokens=128)
    kw.update(args)
    with pytest.raises(error) as e:
        comet.MoeLayer(**kw)
    assert message in str(e.value)


@pytest.mark.skipif(comet.cuda_available(), reason="a CUDA device is present")
@pytest.mark.parametrize("transport", ["nvlink", "nccl"])
def test_no_cuda_is_a_clear_error(clean_env, transport):
    with pytest.raises(comet.CometError) as e:
        comet.MoeLayer(1024, 512, 8, 2, 128, transport=transport)
    assert "no CUDA driver or device" in str(e.value)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(env, rank, world, port):
    env.setenv("RANK", str(rank))
    env.setenv("WORLD_SIZE", str(world))
    env.setenv("MASTER_ADDR", "127.0.0.1")
    env.setenv("MASTER_PORT", str(port))


def test_bootstrap_to_a_port_nobody_listens_on_times_out(clean_env):
    port = free_port()
    torchrun_env(clean_env, 1, 2, port)
    t0 = time.monotonic()
    with pytest.raises(comet.CometError) as e:
        comet.MoeLayer(1024, 512, 8, 2, 128, timeout_s=0.5)
    took = time.monotonic() - t0
    msg = str(e.value)
    assert "could not reach rank 0" in msg and f"127.0.0.1:{port}" in msg, msg
    assert took < 10, f"took {took:.1f} s for a 0.5 s timeout"


def test_bootstrap_rank0_names_the_ranks_that_never_came(clean_env):
    torchrun_env(clean_env, 0, 3, free_port())
    t0 = time.monotonic()
    with pytest.raises(comet.CometError) as e:
        comet.MoeLayer(1024, 768, 6, 2, 128, timeout_s=0.5)
    assert "ranks [1, 2] never joined" in str(e.value), str(e.value)
    assert time.monotonic() - t0 < 10


def test_bootstrap_under_torchrun_uses_the_next_port(clean_env):
    port = free_port()
    torchrun_env(clean_env, 1, 2, port)
    clean_env.setenv("TORCHELASTIC_RUN_ID", "none")
    with pytest.raises(comet.CometError) as e:
        comet.MoeLayer(1024, 512, 8, 2, 128, timeout_s=0.3)
    assert f"127.0.0.1:{port + 1}" in str(e.value), str(e.value)
    other = free_port()
    clean_env.setenv("COMET_MASTER_PORT", str(other))
    with pytest.raises(comet.CometError) as e:
        comet.MoeLayer(1024, 512, 8, 2, 128, timeout_s=0.3)
    assert f"127.0.0.1:{other}" in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "var,value,message",
    [
        ("WORLD_SIZE", "two", 'WORLD_SIZE is "two", not a non-negative integer'),
        ("RANK", "5", "rank 5 is not in a world of 2"),
        ("MASTER_PORT", "70000", "MASTER_PORT is 70000, above 65535"),
    ],
)
def test_bad_torchrun_environment(clean_env, var, value, message):
    torchrun_env(clean_env, 0, 2, free_port())
    clean_env.setenv(var, value)
    with pytest.raises(comet.CometError) as e:
        comet.MoeLayer(1024, 512, 8, 2, 128, timeout_s=0.5)
    assert message in str(e.value)


def test_world_from_the_environment_checks_the_expert_split_first(clean_env):
    # 8 experts over 3 ranks: refused before any connection is tried.
    torchrun_env(clean_env, 1, 3, free_port())
    t0 = time.monotonic()
    with pytest.raises(ValueError) as e:
        comet.MoeLayer(1024, 512, 8, 2, 128, timeout_s=5)
    assert "8 experts cannot be split evenly over 3 ranks" in str(e.value)
    assert time.monotonic() - t0 < 2


class Group:
    """An exchange object (what a torch.distributed group is turned into)."""

    def __init__(self, rank, world):
        self.rank, self.world = rank, world
        self.calls = 0

    def all_gather(self, blob, timeout_s):
        self.calls += 1
        raise RuntimeError("the group is down")


def test_group_world_is_used_and_checked(clean_env):
    with pytest.raises(ValueError) as e:
        comet.MoeLayer(1024, 512, 8, 2, 128, group=Group(0, 3))
    assert "8 experts cannot be split evenly over 3 ranks" in str(e.value)
    with pytest.raises(ValueError) as e:
        comet.MoeLayer(1024, 512, 8, 2, 128, group=Group(2, 2))
    assert "rank 2 of 2 ranks" in str(e.value)


def test_group_failure_is_a_comet_error(clean_env):
    g = Group(0, 2)
    with pytest.raises(comet.CometError) as e:
        comet.MoeLayer(1024, 512, 8, 2, 128, group=g)
    assert "the group is down" in str(e.value)
    assert g.calls == 1


class SharedGroup:
    """Ranks in threads of one process gathering through shared lists."""

    def __init__(self, rank, board):
        self.rank, self.world, self.board = rank, len(board["blobs"]), board

    def all_gather(self, blob, timeout_s):
        b = self.board
        b["blobs"][self.rank] = bytes(blob)
        b["filled"].wait(timeout_s)
        out = list(b["blobs"])
        b["read"].wait(timeout_s)  # no rank refills before all have read
        return out


def layers_in_threads(max_tokens):
    """comet.MoeLayer on a rank per thread, one max_tokens each; the
    exception each raised."""
    n = len(max_tokens)
    board = {"blobs": [None] * n, "filled": threading.Barrier(n), "read": threading.Barrier(n)}
    errors = [None] * n

    def rank(r):
        try:
            comet.MoeLayer(1024, 512, 8, 2, max_tokens[r], group=SharedGroup(r, board), timeout_s=5)
        except Exception as e:  # noqa: BLE001 - each rank's error is the result
            errors[r] = e

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return errors


def test_ranks_must_pass_the_same_settings(clean_env):
    # Before any GPU or peer memory: every rank names the same difference.
    for e in layers_in_threads([128, 64]):
        assert isinstance(e, comet.CometError), e
        assert "rank 1 has max_tokens = 64 where rank 0 has 128" in str(e), e


@pytest.mark.skipif(comet.cuda_available(), reason="a CUDA device is present")
def test_missing_cuda_is_a_comet_error_once_ranks_agree(clean_env):
    for e in layers_in_threads([128, 128]):
        assert isinstance(e, comet.CometError), e
        assert "no CUDA driver or device" in str(e), e


def test_layer_mode_and_repr_need_no_gpu_for_errors():
    # The native class refuses to exist without its collective setup: no
    # half-built layer is ever returned.
    with pytest.raises(TypeError):
        comet._comet.Layer()


def test_nvrtc_lookup_leaves_an_explicit_setting_alone(monkeypatch, tmp_path):
    monkeypatch.setenv("COMET_NVRTC_LIB_DIR", str(tmp_path))
    comet._ensure_nvrtc()
    assert os.environ["COMET_NVRTC_LIB_DIR"] == str(tmp_path)
    lib = tmp_path / "site" / "nvidia" / "cu13" / "lib"
    lib.mkdir(parents=True)
    (lib / "libnvrtc.so.13").write_bytes(b"")
    (lib / "libnvrtc-builtins.so.13.0").write_bytes(b"")
    monkeypatch.delenv("COMET_NVRTC_LIB_DIR")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    comet._ensure_nvrtc()
    assert os.environ["COMET_NVRTC_LIB_DIR"] == str(lib)
