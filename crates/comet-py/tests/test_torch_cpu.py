"""The torch-side helpers on the CPU: comet.moe_reference / moe_torch and
comet.from_hf_mixtral (both Hugging Face layouts, state dicts, one rank's
slice), and forward's argument checks on torch's own dtypes and tensors.
Skipped where torch is not installed (CI installs no torch; the GPU
machine runs these)."""

import pytest

torch = pytest.importorskip("torch")

import comet  # noqa: E402

H, F, E, K = 48, 32, 4, 2


def per_token(x, ids, w, w1, w2):
    """The layer token by token, slot by slot, in f64 (independent of
    comet's vectorised reference)."""
    y = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0:
                continue
            a = w1[e].double() @ x[t].double()
            a = torch.nn.functional.silu(a[:F]) * a[F:]
            y[t] += float(w[t, j]) * (w2[e].double() @ a)
    return y


def case(seed=0, t=9):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, H, generator=g).to(torch.bfloat16)
    w1 = (torch.randn(E, 2 * F, H, generator=g) / H**0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, H, F, generator=g) / F**0.5).to(torch.bfloat16)
    ids = torch.randint(0, E, (t, K), generator=g)
    w = torch.rand(t, K, generator=g)
    return x, ids, w, w1, w2


def test_reference_is_the_layer_token_by_token():
    x, ids, w, w1, w2 = case()
    ids[2, 1] = -1
    ids[4, :] = -1
    ref = comet.moe_reference(x, ids, w, w1, w2)
    assert ref.dtype == torch.float32 and ref.shape == (9, H)
    exact = per_token(x, ids, w, w1, w2)
    assert torch.allclose(ref.double(), exact, atol=1e-4, rtol=1e-4)
    assert ref[4].abs().max() == 0
    plain = comet.moe_torch(x, ids.to(torch.int32), w.to(torch.bfloat16), w1, w2)
    assert plain.dtype == torch.bfloat16
    err = (plain.double() - exact).abs().max() / exact.abs().max()
    assert err < 2e-2, err


def test_reference_refuses_bad_shapes_and_ids():
    x, ids, w, w1, w2 = case()
    with pytest.raises(ValueError, match="w1"):
        comet.moe_reference(x, ids, w, w1.transpose(1, 2), w2)
    with pytest.raises(ValueError, match="T=9"):
        comet.moe_reference(x, ids[:5], w, w1, w2)
    ids[0, 0] = E
    with pytest.raises(ValueError, match="out of range"):
        comet.moe_reference(x, ids, w, w1, w2)


class Top2MLP(torch.nn.Module):
    """transformers 4.x's MixtralBlockSparseTop2MLP: w1 gate, w3 up, w2 down."""

    def __init__(self):
        super().__init__()
        self.w1 = torch.nn.Linear(H, F, bias=False)
        self.w2 = torch.nn.Linear(F, H, bias=False)
        self.w3 = torch.nn.Linear(H, F, bias=False)

    def forward(self, x):
        return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))


class Block4(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = torch.nn.Linear(H, E, bias=False)
        self.experts = torch.nn.ModuleList([Top2MLP() for _ in range(E)])


class Experts5(torch.nn.Module):
    """transformers 5.x's MixtralExperts: fused [E, 2F, H] and [E, H, F]."""

    def __init__(self, transposed=False):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        gu = torch.randn(E, 2 * F, H, generator=g)
        dn = torch.randn(E, H, F, generator=g)
        if transposed:
            gu, dn = gu.transpose(1, 2).contiguous(), dn.transpose(1, 2).contiguous()
        self.gate_up_proj = torch.nn.Parameter(gu)
        self.down_proj = torch.nn.Parameter(dn)

    def forward(self, x, e):
        gate, up = torch.nn.functional.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, self.down_proj[e])


def expert_out(w1, w2, e, x):
    a = x.float() @ w1[e].float().t()
    return (torch.nn.functional.silu(a[:, :F]) * a[:, F:]) @ w2[e].float().t()


def test_transformers_4_experts_stack_gate_then_up():
    block = Block4()
    x = torch.randn(5, H)
    for src in (block, block.experts, block.experts.state_dict(), block.state_dict()):
        w1, w2 = comet.from_hf_mixtral(src, dtype=torch.float32)
        assert w1.shape == (E, 2 * F, H) and w2.shape == (E, H, F)
        assert w1.is_contiguous() and w2.is_contiguous() and not w1.requires_grad
        for e in range(E):
            want = block.experts[e](x)
            assert torch.allclose(expert_out(w1, w2, e, x), want, atol=1e-4)
    w1, w2 = comet.from_hf_mixtral(block, rank=1, world=2)
    assert w1.dtype == torch.bfloat16 and w1.shape == (E // 2, 2 * F, H)
    assert torch.equal(w1[0, :F], block.experts[2].w1.weight.to(torch.bfloat16))
    assert torch.equal(w1[1, F:], block.experts[3].w3.weight.to(torch.bfloat16))
    assert torch.equal(w2[1], block.experts[3].w2.weight.to(torch.bfloat16))


@pytest.mark.parametrize("transposed", [False, True])
def test_transformers_5_fused_experts(transposed):
    ex = Experts5(transposed)
    x = torch.randn(3, H)
    w1, w2 = comet.from_hf_mixtral(ex, dtype=torch.float32)
    for e in range(E):
        if not transposed:
            want = ex(x, e)
        else:
            a = x @ ex.gate_up_proj[e]
            want = (torch.nn.functional.silu(a[:, :F]) * a[:, F:]) @ ex.down_proj[e]
        assert torch.allclose(expert_out(w1, w2, e, x), want.detach(), atol=1e-3, rtol=1e-4)
    sd = {"model.layers.0.mlp.experts." + k: v for k, v in ex.state_dict().items()}
    a1, a2 = comet.from_hf_mixtral(sd, rank=3, world=4, dtype=torch.float32)
    assert torch.equal(a1, w1[3:]) and torch.equal(a2, w2[3:])


def test_hf_conversion_errors_are_named():
    block = Block4()
    with pytest.raises(ValueError, match="cannot be split as rank 0 of 3"):
        comet.from_hf_mixtral(block, world=3)
    sd = block.experts.state_dict()
    del sd["2.w3.weight"]
    with pytest.raises(ValueError, match="2.w3"):
        comet.from_hf_mixtral(sd)
    two = {f"layers.{i}.experts.{k}": v for i in range(2)
           for k, v in block.experts.state_dict().items()}
    with pytest.raises(ValueError, match="several layers"):
        comet.from_hf_mixtral(two)
    with pytest.raises(ValueError, match="no Mixtral expert weights"):
        comet.from_hf_mixtral({"foo": torch.zeros(1)})
    with pytest.raises(TypeError, match="experts module"):
        comet.from_hf_mixtral(42)


class CudaLike:
    """A CPU tensor answering as a CUDA tensor on device 0 would (no GPU
    here), so that the checks meet torch's own dtype objects and shapes."""

    _next = 0x7F00_0000_0000

    def __init__(self, t):
        self._t = t
        CudaLike._next += 1 << 20
        self._ptr = CudaLike._next
        self.is_cuda = True

    dtype = property(lambda self: self._t.dtype)
    shape = property(lambda self: self._t.shape)
    requires_grad = property(lambda self: self._t.requires_grad)

    def get_device(self):
        return 0

    def is_contiguous(self):
        return self._t.is_contiguous()

    def data_ptr(self):
        return self._ptr


def forward_args(t=6, ids=torch.int64, w=torch.float32, x=torch.bfloat16, real=()):
    """A call's tensors as CudaLike, or real CPU tensors for the names in `real`."""
    d = dict(
        x=torch.zeros(t, H, dtype=x),
        topk_ids=torch.zeros(t, K, dtype=ids),
        topk_weights=torch.zeros(t, K, dtype=w),
        w1=torch.zeros(E, 2 * F, H, dtype=torch.bfloat16),
        w2=torch.zeros(E, H, F, dtype=torch.bfloat16),
        y=torch.zeros(t, H, dtype=torch.bfloat16),
    )
    return {k: v if k in real else CudaLike(v) for k, v in d.items()}


def check(**tensors):
    return comet.check_inputs(hidden=H, ffn=F, experts_per_rank=E, top_k=K, max_tokens=64,
                              **tensors)


def test_torch_dtypes_are_recognised_on_every_call():
    # The first sight of each dtype object is remembered; later calls must
    # give the same answers, and a remembered dtype in the wrong place must
    # still be named.
    for _ in range(3):
        assert check(**forward_args()) == {"tokens": 6, "ids": "int64", "weights": "float32"}
        got = check(**forward_args(ids=torch.int32, w=torch.bfloat16))
        assert got == {"tokens": 6, "ids": "int32", "weights": "bfloat16"}
        with pytest.raises(ValueError, match=r"x must be torch.bfloat16 \(got torch.float16\)"):
            check(**forward_args(x=torch.float16))
        with pytest.raises(ValueError, match=r"x must be torch.bfloat16 \(got torch.float32\)"):
            check(**forward_args(x=torch.float32))
        with pytest.raises(ValueError, match=r"topk_weights must be torch.float32 or "
                                             r"torch.bfloat16 \(got torch.int64\)"):
            check(**forward_args(w=torch.int64))
        with pytest.raises(ValueError, match=r"topk_ids must be torch.int32 or torch.int64 "
                                             r"\(got torch.bfloat16\)"):
            check(**forward_args(ids=torch.bfloat16))


@pytest.mark.parametrize("name", ["x", "topk_ids", "topk_weights", "w1", "w2", "y"])
def test_real_cpu_tensors_are_refused_naming_their_device(name):
    with pytest.raises(ValueError) as e:
        check(**forward_args(real=(name,)))
    assert f"{name} must be a CUDA tensor on cuda:0 (got device cpu)" in str(e.value)


class NativeLayer:
    """Stands for comet._comet.Layer (which needs a GPU): records forward."""

    device = 3

    def __init__(self):
        self.calls = []

    def forward(self, *args):
        self.calls.append(args)


def wrapper():
    layer = comet.MoeLayer.__new__(comet.MoeLayer)
    layer._layer = NativeLayer()
    layer.device = NativeLayer.device
    layer._current_stream = None
    return layer


def test_forward_passes_the_current_stream_of_its_device(monkeypatch):
    # No CUDA here: torch's stream getters and CUDA initialisation are
    # replaced; what is checked is which one forward asks, for which device.
    asked, inits = [], []
    monkeypatch.setattr(torch.cuda, "init", lambda: inits.append(1))
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream",
                        lambda d: asked.append(d) or 0x5000 + d, raising=False)
    layer = wrapper()
    x = torch.zeros(4, H, dtype=torch.bfloat16)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            y = layer(x, None, None, None, None)
        args = layer._layer.calls[-1]
        assert args[5] is y and y.shape == x.shape and y.dtype == x.dtype
        assert args[6:] == (0x5003, grad)
    out = torch.empty_like(x)
    assert layer.forward(x, None, None, None, None, out=out) is out
    assert asked == [3, 3, 3] and inits == [1], "CUDA initialised once, raw stream each call"
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        layer(x.tolist(), None, None, None, None)


def test_forward_without_the_raw_getter_uses_current_stream(monkeypatch):
    class Stream:
        cuda_stream = 0x7000

    asked = []
    monkeypatch.delattr(torch._C, "_cuda_getCurrentRawStream", raising=False)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda d: asked.append(d) or Stream())
    layer = wrapper()
    layer(torch.zeros(2, H, dtype=torch.bfloat16), None, None, None, None)
    assert layer._layer.calls[-1][6] == 0x7000 and asked == [3]
