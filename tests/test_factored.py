"""The frozen linear layer's factored form as one autograd node (`core.factored`): the forward of the ops one by one,
bit for bit, and the gradients of Eq. 3 written out (hand-computed values, and the unfused backward)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stompp_hf import StoMPPConfig
from stompp_hf.kernels import xnor
from stompp_hf.nn.training import StoMPPLinear

needs_kernel = pytest.mark.skipif(not xnor.is_available(), reason="the XNOR kernel is not available here")


def frozen_linear(
    fin: int = 64,
    fout: int = 48,
    weights: str | None = "stompp_ste",
    activations: str | None = "stompp_ste",
    bias: bool = True,
    fused: bool = True,
    **config,
) -> StoMPPLinear:
    torch.manual_seed(0)
    layer = StoMPPLinear.from_module(
        nn.Linear(fin, fout, bias=bias), StoMPPConfig(weights=weights, activations=activations, **config)
    )
    for b in layer.binarizers():
        b.controlled = True
        if b.mask is not None:
            b.mask.fill(True)
    if not fused:
        layer.factored_op = None  # the ops one by one, the reference
    return layer


def step(layer: StoMPPLinear, x0: torch.Tensor, g: torch.Tensor, autocast: torch.dtype | None = None):
    x = x0.clone().requires_grad_()
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        y = layer(x)
    y.backward(g.to(y.dtype))
    grads = (x.grad, layer.weight.grad, None if layer.bias is None else layer.bias.grad)
    return y.detach(), grads


def test_gradients_on_hand_computed_values():
    """x, W, g with exact products: gx = 1{|x| <= beta} * (g @ (alpha * sign W)), gW = beta * g^T @ sign x, gb = sum g
    (beta = mean |x|, alpha = per-row mean |W|; the default clip bound is beta itself)."""
    layer = frozen_linear(4, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, -0.5, 0.5, 0.5], [-1.0, 1.0, 0.5, -0.5]]))
        layer.bias.copy_(torch.tensor([0.25, -0.25]))
    x0 = torch.tensor([[1.0, -0.5, 0.0, -2.5], [0.5, 0.5, -1.0, 2.0]])  # mean |x| = 1
    g = torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
    y, (gx, gw, gb) = step(layer, x0, g)
    alpha = torch.tensor([0.5, 0.75])
    sx = torch.tensor([[1.0, -1.0, 1.0, -1.0], [1.0, 1.0, -1.0, 1.0]])
    sw = torch.tensor([[1.0, -1.0, 1.0, 1.0], [-1.0, 1.0, 1.0, -1.0]])
    assert torch.equal(y, sx @ sw.t() * alpha + torch.tensor([0.25, -0.25]))
    window = (x0.abs() <= 1.0).float()
    assert torch.equal(gx, window * (g @ (alpha[:, None] * sw)))
    assert torch.equal(gw, g.t() @ sx)
    assert torch.equal(gb, g.sum(0))


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
@pytest.mark.parametrize(
    ("weights", "activations", "bias"),
    [
        ("stompp_ste", "stompp_ste", True),
        ("stompp_ste", "stompp_ste", False),
        ("ste", "ste", True),
        ("stompp_ste", None, True),  # binary weights only: the input gradient is not windowed
        (None, "stompp_ste", True),  # binary inputs only
        ("stompp", "stompp", True),  # frozen 'stompp' tensors are constants: only the bias learns
        ("stompp_ste", "stompp", True),
    ],
)
def test_same_forward_bits_and_gradients_as_the_unfused_ops(autocast, weights, activations, bias):
    x0 = torch.randn(3, 40, 256, generator=torch.Generator().manual_seed(1))
    g = torch.randn(3, 40, 192, generator=torch.Generator().manual_seed(2))
    runs = [
        step(frozen_linear(256, 192, weights, activations, bias, fused=fused), x0, g, autocast)
        for fused in (True, False)
    ]
    (y_a, grads_a), (y_b, grads_b) = runs
    assert y_a.dtype == y_b.dtype and torch.equal(y_a, y_b)
    # the scales multiply other operands, so the roundings differ: within a few units of float32's / bfloat16's
    # last place of the largest entry (bf16 matmuls round their outputs to 8 bits, and each way rounds twice)
    resolution = 1e-6 if autocast is None else 2**-6
    for a, b in zip(grads_a, grads_b):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=0, atol=resolution * b.abs().max().item())


@needs_kernel
@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scales", ["channel", "none"])
def test_frozen_product_through_the_xnor_kernel(autocast, dtype, scales, monkeypatch):
    """Where the XNOR kernel's avx512 path runs (any dtype) or its avx2 path (float32 without autocast), a frozen
    layer with binary weights and inputs takes its forward product from the kernel, which reads the signs of the
    latent input (or of the autocast operand) and weight: the same bits as the ops one by one, and the same
    gradients as the node without the kernel. A NaN input, which the kernel refuses, takes the torch ops
    (binary_sign makes it -1). Elsewhere the kernel is not called."""
    paths = xnor.paths()
    used = "avx512" in paths or ("avx2" in paths and autocast is None and dtype is torch.float32)
    calls = []
    real = xnor.xnor_linear
    monkeypatch.setattr(xnor, "xnor_linear", lambda x, *a, **k: calls.append(x.dtype) or real(x, *a, **k))
    config = {"weight_scale": scales, "activation_scale": "tensor" if scales == "channel" else "none"}
    x0 = torch.randn(3, 40, 256, generator=torch.Generator().manual_seed(1)).to(dtype)
    g = torch.randn(3, 40, 192, generator=torch.Generator().manual_seed(2))
    nan = x0.clone()
    nan[1, 2, 3] = float("nan")
    for x, nan_input in ((x0, False), (nan, True)):
        layers = [frozen_linear(256, 192, fused=fused, **config).to(dtype) for fused in (True, False)]
        (y_a, grads_a), (y_b, grads_b) = (step(layer, x, g, autocast) for layer in layers)
        # one kernel call each (a NaN input, which it refuses, unless the layer wrote the autocast operand)
        assert calls == ([autocast or dtype] if used else [])
        calls.clear()
        assert y_a.dtype == y_b.dtype == (autocast or dtype)
        torch.testing.assert_close(y_a, y_b, rtol=0, atol=0, equal_nan=True)
        assert y_a.isnan().any() == (nan_input and scales == "channel")  # beta = mean |x| is NaN then
        if scales == "none":
            assert torch.equal(y_a, y_b)
        with monkeypatch.context() as patch:  # the node without the kernel: the same gradients
            patch.setattr("stompp_hf.nn.training.binary_linear_applies", lambda *a: False)
            _, grads_c = step(frozen_linear(256, 192, **config).to(dtype), x, g, autocast)
        for a, c in zip(grads_a, grads_c):
            torch.testing.assert_close(a, c, rtol=0, atol=0, equal_nan=True)


def test_zero_scales_pass_no_gradient():
    """An all-zero weight row (alpha = 0) gets no weight gradient, and an all-zero input (beta = 0) none either,
    as in the unfused form (which divides by the scale and maps a zero scale to no gradient)."""
    layer = frozen_linear(8, 4)
    with torch.no_grad():
        layer.weight[1].zero_()
    x0 = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    g = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    _, (gx, gw, _) = step(layer, x0, g)
    assert torch.equal(gw[1], torch.zeros(8)) and gw[0].abs().sum() > 0
    assert gx.abs().sum() > 0
    layer = frozen_linear(8, 4)
    _, (gx, gw, gb) = step(layer, torch.zeros(5, 8), g)
    assert torch.equal(gx, torch.zeros(5, 8))
    assert torch.equal(gw, torch.zeros(4, 8)) and torch.equal(gb, g.sum(0))


def test_used_only_where_it_applies():
    """Training with gradients takes the node; evaluation, no_grad and a layer mid-transition take the ops."""
    layer = frozen_linear()
    x = torch.randn(4, 64, requires_grad=True)
    assert type(layer(x).grad_fn).__name__ == "_FactoredLinearBackward"
    with torch.no_grad():
        assert layer(x).grad_fn is None
    layer.input_binarizer.mask.value = torch.rand(64) < 0.5
    assert type(layer(x).grad_fn).__name__ != "_FactoredLinearBackward"


def test_in_place_input_modification_is_caught():
    """The node saves the latent input: changing it in place before the backward raises, as for any saved tensor."""
    layer = frozen_linear()
    x = torch.randn(4, 64, requires_grad=True)
    h = x * 1.0
    y = layer(h)
    h.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("state", ["frozen", "continuous"])
@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_sibling_layers_share_the_passes_over_their_input(state, autocast, monkeypatch):
    """Three layers fed the same tensor (query, key, value) read it once for its sum of |x| and, frozen, once for
    its sign; continuous, they share one clipped tensor (float32): one clip in the forward, one window pass over
    the sum of their input gradients in the backward, and the clip kept for their weight gradients (`KeptClip`: no
    recompute). The same outputs, gradients and betas, bit for bit, as three layers fed three copies of it, which
    read one each. An in-place change of the input between two layers makes the next one read it again."""
    from stompp_hf.core import functional as F
    from stompp_hf.nn import binarizer

    counts = {"sign": 0, "abs_sum": 0, "clip_bits": 0, "bits_grad": 0, "recompute": 0}
    x0 = torch.randn(4, 40, 256, generator=torch.Generator().manual_seed(3))
    ops = type(F.fused_ops())

    def counted(name, real):
        def op(self, u, *a):
            # passes over the input only: without the kernel product (no avx512 path and autocast, or no
            # avx2 path either) the weights' signs are written through the same fused pass
            counts[name] += u.shape == x0.shape
            return real(self, u, *a)

        return op

    def clamp_to(u, *a):  # the recompute of a continuous input's clip, in the backward
        counts["recompute"] += u.shape == x0.shape
        return F.clamp_to(u, *a)

    for name in ("sign", "abs_sum", "clip_bits", "bits_grad"):
        monkeypatch.setattr(ops, name, counted(name, getattr(ops, name)))
    monkeypatch.setattr(binarizer, "clamp_to", clamp_to)

    def siblings():
        layers = [frozen_linear(256, 96 + 16 * i) for i in range(3)]
        for layer in layers:
            for b in layer.binarizers():
                b.mask.fill(state == "frozen")
        return layers

    gs = [torch.randn(4, 40, 96 + 16 * i, generator=torch.Generator().manual_seed(4 + i)) for i in range(3)]

    def run(layers, shared: bool):
        x = x0.clone().requires_grad_()
        h = x * 1.0  # a non-leaf input, as inside a model
        for name in counts:
            counts[name] = 0
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            ys = [layer(h if shared else h.clone()) for layer in layers]
        reads = counts["sign"] + counts["abs_sum"]  # the forward's passes over the input
        clips = counts["clip_bits"]
        torch.autograd.backward(ys, [g.to(y.dtype) for g, y in zip(gs, ys)])
        grads = [layer.weight.grad for layer in layers]
        passes = (reads, clips, counts["bits_grad"], counts["recompute"])
        return ys, x.grad, grads, [layer.input_binarizer.scale for layer in layers], passes

    *a, passes_shared = run(siblings(), shared=True)
    *b, passes_apart = run(siblings(), shared=False)
    # the input read once for the three layers (a frozen one reads its sign with the sum where it writes a sign:
    # under autocast, or without the kernel product), once each for three copies
    assert (passes_shared[0], passes_apart[0]) == (1, 3)
    if state == "continuous" and autocast is None:  # one clip and window pass for the three, the clip kept
        assert (passes_shared[1:], passes_apart[1:]) == ((1, 1, 0), (3, 3, 0))
    else:  # frozen: no clip; an autocast operand: each layer clips into bf16 and keeps it (no recompute)
        assert passes_shared[1:] == passes_apart[1:] == ((0, 0, 0) if state == "frozen" else (3, 3, 0))
    ys_a, gx_a, gw_a, beta_a = a
    ys_b, gx_b, gw_b, beta_b = b
    for a, b in zip([*ys_a, gx_a, *gw_a, *beta_a], [*ys_b, gx_b, *gw_b, *beta_b]):
        assert torch.equal(a, b)
    # an in-place change between two layers: the next one reads the input again, and sees the new values
    layers = siblings()
    for name in counts:
        counts[name] = 0
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        h = x0.clone().requires_grad_() * 1.0
        layers[0](h)
        with torch.no_grad():
            h.neg_()
        y = layers[1](h)
        assert counts["sign"] + counts["abs_sum"] == 2
        assert torch.equal(y, siblings()[1](x0.neg().requires_grad_() * 1.0))


def test_shared_clip_is_recomputed_once_and_let_go(monkeypatch):
    """Continuous siblings' shared clip where their input is held by something else too (`SharedRecompute`): the
    first backward recomputes it once for the three weight gradients and holds nothing afterwards; a second backward
    over the retained graph recomputes it again, and gives the same gradients again (accumulated: twice the
    first's); a sibling whose weight needs no gradient saves nothing and takes nothing from the others."""
    from stompp_hf.core import functional as F
    from stompp_hf.nn import binarizer, recompute

    recipes, computed = [], []
    real = recompute.SharedRecompute.__init__

    def init(self, fn):
        real(self, fn)
        recipes.append(self)

    def clamp_to(u, *a):
        out = F.clamp_to(u, *a)
        computed.append(out)
        return out

    monkeypatch.setattr(recompute.SharedRecompute, "__init__", init)
    monkeypatch.setattr(binarizer, "clamp_to", clamp_to)
    layers = [frozen_linear(64, 32) for _ in range(3)]
    for layer in layers:
        for b in layer.binarizers():
            b.mask.fill(False)
        layer.input_binarizer.keep_clip = False  # as once a holder of the input was seen
    layers[2].weight.requires_grad_(False)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    h = x * 1.0
    ys = [layer(h) for layer in layers]
    loss = sum((y * torch.linspace(-1, 1, 32)).sum() for y in ys)
    (recipe,) = recipes
    assert recipe.pending == 2  # the two layers whose op saves its input for a weight gradient
    loss.backward(retain_graph=True)
    first = [layers[i].weight.grad.clone() for i in range(2)], x.grad.clone()
    assert len(computed) == 1 and recipe.pending == 0 and recipe.value is None
    loss.backward()
    assert len(computed) == 3  # after the last save was read: recomputed per read, nothing kept
    assert recipe.value is None
    for i in range(2):
        assert torch.equal(layers[i].weight.grad, first[0][i] * 2)
    assert torch.equal(x.grad, first[1] * 2)


def _continuous_linear(seed: int = 0) -> StoMPPLinear:
    layer = frozen_linear(64, 32)
    torch.manual_seed(seed)
    layer.weight.data.normal_()
    for b in layer.binarizers():
        b.mask.fill(False)
    return layer


def _counting_recomputes(monkeypatch) -> list[int]:
    """Patches the continuous clip's recompute to count its calls (one entry per call)."""
    from stompp_hf.core import functional as F
    from stompp_hf.nn import binarizer

    calls: list[int] = []

    def clamp_to(u, *a):
        calls.append(u.numel())
        return F.clamp_to(u, *a)

    monkeypatch.setattr(binarizer, "clamp_to", clamp_to)
    return calls


def _reference_grads(x: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and weight gradients of `_continuous_linear` with the recomputed clip (the path before `KeptClip`)."""
    layer = _continuous_linear(seed)
    layer.input_binarizer.keep_clip = False
    x = x.detach().requires_grad_()
    (layer(x * 1.0) * torch.linspace(-1, 1, 32)).sum().backward()
    return x.grad, layer.weight.grad


def test_continuous_input_keeps_its_clip_and_lets_the_input_go(monkeypatch):
    """`KeptClip`: an input nothing else holds is freed with the forward (the layer keeps its clip instead, the one
    activation-sized tensor a full-precision layer keeps), the backward recomputes nothing, and the gradients are
    the recomputed path's bit for bit; a second backward over the retained graph reads the kept clip again."""
    import weakref

    calls = _counting_recomputes(monkeypatch)
    layer = _continuous_linear()
    x = torch.randn(4, 64, 64, generator=torch.Generator().manual_seed(1)).requires_grad_()  # fused: 1 bit a window
    u = x * 1.0
    freed = weakref.ref(u)
    y = layer(u)
    del u
    assert freed() is None  # not kept for the backward
    loss = (y * torch.linspace(-1, 1, 32)).sum()
    loss.backward(retain_graph=True)
    assert calls == [] and layer.input_binarizer.keep_clip
    gx, gw = _reference_grads(x)
    assert torch.equal(x.grad, gx) and torch.equal(layer.weight.grad, gw)
    calls.clear()  # the reference's recompute
    loss.backward()
    assert calls == [] and torch.equal(layer.weight.grad, 2 * gw)


@pytest.mark.parametrize("holder", ["producer", "later consumer", "after the last layer", "caller"])
def test_kept_clip_gives_way_to_a_recipe_where_the_input_is_held_anyway(holder, monkeypatch):
    """Where something else holds the input (so the recipe over it costs nothing), the layer keeps no clip beside it:
    a producer that saved its output (tanh) is seen when the layer saves (a recipe for that forward), a consumer
    that saved it after the layer at the next binarized layer's forward (the clip let go there, recomputed in the
    backward), a consumer after the last binarized layer when the input is freed inside the backward, and the
    caller holding it when the backward reads the clip. In the last three the layer saves a recipe from its next
    forward on. Gradients equal the recomputed path's throughout; an in-place change of an input the caller holds
    raises as with a recipe."""
    calls = _counting_recomputes(monkeypatch)
    layer, other = _continuous_linear(), _continuous_linear(1)
    w = torch.randn(5, 64, requires_grad=True)  # so that the consumer saves u for w's gradient
    x = torch.randn(4, 64, 64, generator=torch.Generator().manual_seed(1)).requires_grad_()  # fused: 1 bit a window
    u = torch.tanh(x) if holder == "producer" else x * 1.0
    y = layer(u)
    z = nn.functional.linear(u, w) if holder in ("later consumer", "after the last layer") else None
    if holder == "later consumer":
        other(torch.randn(4, 64, 64, requires_grad=True) * 1.0)
    assert layer.input_binarizer.keep_clip is (holder != "later consumer")
    if holder != "caller":
        del u
    loss = (y * torch.linspace(-1, 1, 32)).sum() + (z.sum() if z is not None else 0)
    loss.backward()
    assert len(calls) == (holder in ("producer", "later consumer"))  # else the kept clip
    assert layer.input_binarizer.keep_clip is (holder == "producer")
    ref_layer = _continuous_linear()
    ref_layer.input_binarizer.keep_clip = False
    xr = x.detach().requires_grad_()
    ur = torch.tanh(xr) if holder == "producer" else xr * 1.0
    ref_loss = (ref_layer(ur) * torch.linspace(-1, 1, 32)).sum()
    (ref_loss + (nn.functional.linear(ur, w).sum() if z is not None else 0)).backward()
    assert torch.equal(x.grad, xr.grad) and torch.equal(layer.weight.grad, ref_layer.weight.grad)
    # from now on the layer saves a recipe (a producer's save is seen anew at each forward)
    calls.clear()
    layer(x * 1.0).sum().backward()
    assert len(calls) == (holder != "producer")
    if holder == "caller":  # an in-place change before the backward raises, as for a recipe or a saved tensor
        fresh = _continuous_linear()
        h = x.detach() * 1.0
        out = fresh(h)
        h.mul_(-1.0)
        with pytest.raises(RuntimeError, match="cannot recompute the binarized input"):
            out.sum().backward()


def test_kept_clip_is_freed_with_its_graph_while_the_input_lives(monkeypatch):
    """Nothing but the graph holds a kept clip: with the caller still holding the input (and the cyclic garbage
    collector off), the clip is freed when the backward frees what the graph saved, not at some later collection."""
    import gc
    import weakref

    from stompp_hf.nn import recompute

    kept = []
    real = recompute.KeptClip.__init__

    def init(self, *a):
        real(self, *a)
        kept.append(weakref.ref(self.out))

    monkeypatch.setattr(recompute.KeptClip, "__init__", init)
    layer, other = _continuous_linear(), _continuous_linear(1)
    x = torch.randn(4, 64, 64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    u = x * 1.0
    enabled = gc.isenabled()
    gc.disable()
    try:
        y = layer(u)
        other(torch.randn(4, 64, 64) * 1.0)  # another input: the shared-pass cache lets u's clip go
        assert kept[0]() is not None  # the graph holds it
        y.sum().backward()  # which frees what it saved
        assert kept[0]() is None
    finally:
        if enabled:
            gc.enable()
    assert u.grad_fn is not None  # the input lived throughout
