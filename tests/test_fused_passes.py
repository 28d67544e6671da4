"""The fused CPU passes of a training step (`stompp_hf.kernels.elementwise`, docs/design.md "Fused passes") give the
values of the torch ops they replace, bit for bit, and step aside wherever they do not apply."""

from __future__ import annotations

import contextlib
import math
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from stompp_hf import ProgressionController, StoMPPConfig, prepare_model
from stompp_hf.core import factored
from stompp_hf.core import functional as F
from stompp_hf.kernels import elementwise, xnor
from stompp_hf.kernels.build import XnorUnavailable

from .testing_utils import needs_cc

pytestmark = needs_cc

DTYPES = [torch.float32, torch.bfloat16]
N = (1 << 15) + 7  # above the fused passes' minimum size, and not a multiple of their 16 lanes


@contextlib.contextmanager
def torch_ops_only():
    """Run the block on the torch ops alone (the reference the fused passes must match)."""
    previous = F.set_fused_ops(None)
    try:
        yield
    finally:
        F.set_fused_ops(previous)


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    """Same dtype, shape and bits; a NaN matches any NaN (payloads are not part of the contract)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    nan = torch.isnan(want) if want.is_floating_point() else torch.zeros_like(want, dtype=torch.bool)
    assert torch.equal(torch.isnan(got) if got.is_floating_point() else nan, nan)
    view = {torch.float32: torch.int32, torch.bfloat16: torch.int16}.get(want.dtype, want.dtype)
    assert torch.equal(got[~nan].view(view), want[~nan].view(view))


def special_values(dtype: torch.dtype, bound: float) -> torch.Tensor:
    """Signed zeros, NaN, infinities, subnormals, and the clip bound with its neighbours in `dtype`."""
    b = torch.tensor(bound, dtype=dtype)
    up = torch.nextafter(b.float(), torch.tensor(math.inf)).to(dtype)
    if dtype == torch.bfloat16:  # the next bfloat16 up: one unit in the 8-bit mantissa
        up = (b.view(torch.int16) + 1).view(torch.bfloat16)
        down = (b.view(torch.int16) - 1).view(torch.bfloat16)
    else:
        down = torch.nextafter(b, torch.tensor(0.0))
    values = [0.0, -0.0, math.nan, math.inf, -math.inf, 1e-40, -1e-40]
    ends = torch.stack([b, -b, up, -up, down, -down])
    return torch.cat([torch.tensor(values, dtype=dtype), ends])


def data(dtype: torch.dtype, n: int = N, bound: float = 0.75, seed: int = 0) -> torch.Tensor:
    """Normal values with the special ones scattered through (NaN included)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g).to(dtype)
    special = special_values(dtype, bound)
    where = torch.randperm(n, generator=g)[: 4 * len(special)]
    x[where] = special.repeat(4)
    return x


def test_registered_by_default():
    assert isinstance(F.fused_ops(), elementwise.CpuFusedOps)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sign_matches_torch(dtype):
    x = data(dtype)
    fused = F.fused_ops().sign(x, False)
    assert fused is not None and fused[1] is None
    with torch_ops_only():
        want = F.binary_sign(x)
    assert_same(fused[0], want)
    assert_same(F.binary_sign(x), want)  # through the hook


@pytest.mark.parametrize("dtype", DTYPES)
def test_abs_sum_is_exact_enough_and_independent_of_threads(dtype):
    """The fused sums accumulate in double in fixed pieces: within 1e-7 of the exact sum, and the same bits for any
    number of threads; a NaN makes it NaN, as torch's does."""
    x = torch.randn(3 * N).to(dtype)
    exact = x.double().abs().sum().item()
    threads = torch.get_num_threads()
    sums = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            sign, total = F.sign_and_abs_sum(x)
            sums += [total, F.abs_sum(x)]
    finally:
        torch.set_num_threads(threads)
    assert all(s.dtype == torch.float32 and s.dim() == 0 for s in sums)
    assert all(torch.equal(s, sums[0]) for s in sums)
    assert abs(sums[0].item() - exact) <= 1e-7 * exact
    x[N // 2] = math.nan
    assert math.isnan(F.abs_sum(x).item()) and math.isnan(F.sign_and_abs_sum(x)[1].item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("multiplier", [None, 1 / 0.9, 0.0])
def test_windowed_grad_matches_torch(dtype, multiplier):
    """`hardtanh_backward` (then `.mul_` by the multiplier): the closed window `|u| <= c` at its exact ends, a NaN
    `u` outside, the gradient's own zeros, NaN and infinities passed through; a zero multiplier (a zero scale)."""
    bound = torch.tensor(0.75, dtype=dtype)
    u, grad = data(dtype), data(dtype, seed=1)
    mult = None if multiplier is None else torch.tensor(multiplier, dtype=dtype)
    got = F._windowed_grad(grad, u, bound, mult)
    with torch_ops_only():
        want = F._windowed_grad(grad, u, bound, mult)
        window = F._window(u, bound, dtype)
    assert_same(got, want)
    inside = window.bool() & ~torch.isnan(u)
    assert torch.equal(got[~inside], torch.zeros_like(got[~inside]))  # outside the window (NaN u too): zero


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("shape", "mask_shape"),
    [((N,), (N,)), ((7, 4099), (4099,)), ((7, 4099), (1, 4099)), ((3, 5, 47, 47), (5, 47, 47)), ((2, 8193), ())],
)
@pytest.mark.parametrize("scale", [0.625, "tensor", 1.0])
def test_masked_matches_torch(dtype, shape, mask_shape, scale):
    """`where(M, a * sign(u), clamp(u, -c, c))` and the int8 window, for the per-sample masks of linear and conv
    inputs (a trailing-dimension mask repeated over the batch), a 0-d tensor scale and Python ones."""
    numel = math.prod(shape)
    u = data(dtype, numel).view(shape)
    mask = torch.rand(mask_shape, generator=torch.Generator().manual_seed(2)) < 0.5
    bound = torch.tensor(0.75, dtype=dtype)
    a = torch.tensor(0.8125, dtype=dtype) if scale == "tensor" else scale
    got, window = F._fused_masked(u, mask, a, bound, window=True)
    values = F._masked_values(u, mask, a, bound, True)  # through the hook: the fused values, no window
    with torch_ops_only():
        want = F._masked_values(u, mask, a, bound, True)
        want_window = F._window_int8(u, bound)
    assert_same(got, want)
    assert_same(values, want)
    assert_same(window, want_window)


def test_masked_autograd_matches_torch():
    """`masked_binarize` with a gradient: the forward and the gradient of both rules, fused and not."""
    u = data(torch.float32, 4 * 4099).view(4, 4099).nan_to_num(0.0, 3.0, -3.0)
    mask = torch.rand(4099) < 0.5
    grad = torch.randn(4, 4099)
    results = []
    for ops in ("fused", "torch"):
        for rule in ("stompp", "stompp_ste"):
            with torch_ops_only() if ops == "torch" else contextlib.nullcontext():
                x = u.clone().requires_grad_()
                out = F.masked_binarize(x, mask, rule=rule, scale=torch.tensor(0.5), bound=0.75, clip_smooth=True)
                out.backward(grad)
                results.append((out.detach(), x.grad))
    for (out_a, grad_a), (out_b, grad_b) in zip(results[:2], results[2:]):
        assert_same(out_a, out_b)
        assert_same(grad_a, grad_b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_channels_last_inputs(dtype):
    """The elementwise passes read a channels-last activation (a conv BNN's) as it lies in memory, and the outputs
    keep its layout; the masked pass, whose per-sample mask follows the standard order, leaves it to torch."""
    u = data(dtype, 4 * 16 * 33 * 33).view(4, 16, 33, 33).contiguous(memory_format=torch.channels_last)
    grad = data(dtype, u.numel(), seed=1).view(u.shape).contiguous(memory_format=torch.channels_last)
    bound = torch.tensor(0.75, dtype=dtype)
    ops = F.fused_ops()
    assert ops.sign(u, True) is not None and ops.windowed_grad(grad, u, -1.0, 1.0, None) is not None
    assert ops.masked(u, torch.ones(16, 33, 33, dtype=torch.bool), 1.0, 1.0, None) is None
    got = F.binary_sign(u), F._windowed_grad(grad, u, bound, torch.tensor(2.0, dtype=dtype))
    with torch_ops_only():
        want = F.binary_sign(u), F._windowed_grad(grad, u, bound, torch.tensor(2.0, dtype=dtype))
    for a, b in zip(got, want):
        assert a.is_contiguous(memory_format=torch.channels_last)
        assert a.stride() == b.stride()
        assert_same(a, b)
    finite = u.nan_to_num(0.0, 0.0, 0.0)
    assert abs(F.abs_sum(finite).item() - finite.double().abs().sum().item()) <= 1e-6 * finite.double().abs().sum()


def test_steps_aside_where_it_does_not_apply():
    """Each pass answers None (the torch ops run) for what it does not handle: another dtype, a strided view, a
    small tensor, mixed dtypes, a mask that is not a trailing-dimension mask, a non-0-d multiplier."""
    ops = F.fused_ops()
    x = torch.randn(256, 256)
    assert ops.sign(x.half(), False) is None
    assert ops.sign(x.double(), True) is None
    assert ops.sign(x.t(), False) is None
    assert ops.sign(torch.randn(100), False) is None
    assert ops.abs_sum(x[:, ::2]) is None
    assert ops.windowed_grad(x, x.bfloat16(), -1.0, 1.0, None) is None
    assert ops.windowed_grad(x, x.t(), -1.0, 1.0, None) is None
    y = torch.randn(4, 8, 32, 32)
    assert ops.windowed_grad(y, y.contiguous(memory_format=torch.channels_last), -1.0, 1.0, None) is None
    assert ops.windowed_grad(x, x, -1.0, 1.0, torch.ones(1)) is None
    assert ops.masked(x, torch.ones(256, 1, dtype=torch.bool), 1.0, 1.0, None) is None
    assert ops.masked(x, torch.ones(256, dtype=torch.int8), 1.0, 1.0, None) is None
    assert ops.masked(x, torch.ones(512, dtype=torch.bool)[::2], 1.0, 1.0, None) is None
    # and the hooked functions still give the torch values there
    with torch_ops_only():
        want = F.binary_sign(x.t())
    assert_same(F.binary_sign(x.t()), want)


def test_without_the_library_the_torch_ops_run(monkeypatch):
    """A kernel that cannot be built leaves training on the torch ops: same values, no error."""

    def unavailable():
        raise XnorUnavailable("no compiler (test)")

    monkeypatch.setattr(elementwise, "_library", unavailable)
    x = torch.randn(300, 300)
    assert F.fused_ops().sign(x, True) is None and F.fused_ops().abs_sum(x) is None
    with torch_ops_only():
        want = F.binary_sign(x), F.abs_sum(x)
    got = F.binary_sign(x), F.abs_sum(x)
    assert_same(got[0], want[0]) and assert_same(got[1], want[1])


def test_environment_variable_turns_it_off():
    code = "import stompp_hf.nn; from stompp_hf.core.functional import fused_ops; print(fused_ops() is None)"
    env = {"STOMPP_HF_FUSED_PASSES": "0", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
    assert elementwise.enabled()


def _layers(state: float) -> nn.Sequential:
    """Three binarized linear layers, one stage each, the progression restored to `state` (0.5: the second layer
    halfway through its stage, the first frozen, the third continuous)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 384), nn.Linear(384, 512), nn.Linear(512, 256))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the schedule warning of a short progression
        prepare_model(model, StoMPPConfig(weights="stompp_ste", activations="stompp_ste", granularity="module"))
        controller = ProgressionController(model, 300)
    model.train()
    model(torch.zeros(2, 512))  # sizes the input masks
    controller.restore(round(300 * state))
    return model


@pytest.mark.parametrize("state", [0.5, 1.0, 0.0])
@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_training_step_matches_torch_ops(state, autocast):
    """Whole forward and backward of binarized layers in every mask state (frozen and factored, transitioning,
    continuous), fp32 and bf16 autocast: outputs, gradients and the activation scales the same bits as on the torch
    ops. The inputs are multiples of 1/8, so both ways of summing |x| are exact and give the same beta."""
    x0 = torch.randint(-12, 13, (96, 512), generator=torch.Generator().manual_seed(3)).float() / 8
    results = []
    for ops in ("fused", "torch"):
        model = _layers(state)
        x = x0.clone().requires_grad_()
        with torch_ops_only() if ops == "torch" else contextlib.nullcontext():
            with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
                y = model(x)
            y.float().square().sum().backward()
        grads = [p.grad for p in model.parameters()]
        scales = [b for n, b in model.named_buffers() if n.endswith("scale")]
        results.append((y.detach(), x.grad, grads, scales))
    (y_a, gx_a, gp_a, s_a), (y_b, gx_b, gp_b, s_b) = results
    assert_same(y_a, y_b)
    assert_same(gx_a, gx_b)
    for a, b in zip(gp_a + s_a, gp_b + s_b):
        assert_same(a, b)


def test_uses_the_loaded_xnor_library():
    """The passes live in the XNOR kernel's library (one build, one set of threads)."""
    assert xnor.is_available()
    assert elementwise._library() is xnor._library()


@pytest.mark.parametrize("ops", ["fused", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("multiplier", [None, 1 / 0.9])
def test_windowed_grad_in_place(ops, dtype, multiplier):
    """`in_place`: the same bits as the out-of-place result, written into the gradient's own memory."""
    bound = torch.tensor(0.75, dtype=dtype)
    u, grad = data(dtype), data(dtype, seed=1)
    mult = None if multiplier is None else torch.tensor(multiplier, dtype=dtype)
    with torch_ops_only() if ops == "torch" else contextlib.nullcontext():
        want = F._windowed_grad(grad, u, bound, mult)
        target = grad.clone()
        got = F._windowed_grad(target, u, bound, mult, in_place=True)
    assert got.data_ptr() == target.data_ptr()
    assert_same(got, want)


def test_overwritable_only_for_a_plain_owned_gradient():
    """A backward overwrites its gradient only where the caller owns it, and never one that a graph records (double
    backward), of another dtype or shape, or with overlapping or scattered entries."""
    u = torch.zeros(4, 8)
    g = torch.ones(4, 8)
    assert F._overwritable(True, g, u)
    assert not F._overwritable(False, g, u)
    assert not F._overwritable(True, g.clone().requires_grad_(), u)
    assert not F._overwritable(True, g.double(), u)
    assert not F._overwritable(True, torch.ones(8).expand(4, 8), u)  # stride 0: entries share memory
    assert not F._overwritable(True, torch.ones(8, 4).t(), u)
    assert F._overwritable(True, torch.ones(2, 3, 4, 5).to(memory_format=torch.channels_last), torch.zeros(2, 3, 4, 5))


@pytest.mark.parametrize("state", [0.5, 1.0, 0.0])
@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_layers_overwrite_their_input_gradient_with_the_same_values(monkeypatch, state, autocast):
    """The binarized layer (the middle one; the first and last stay full precision) overwrites the input gradient
    that its op's backward hands it in every mask state, and the gradients are the bits of the out-of-place
    backward."""
    x0 = torch.randn(96, 512, generator=torch.Generator().manual_seed(3))
    calls = []
    overwritable = F._overwritable

    def spy(owned, grad, like):
        if like.shape[0] == x0.shape[0]:  # an input's gradient (a transitioning weight's asks too)
            calls.append(owned)
        return overwritable(owned, grad, like)

    results = []
    for in_place in (True, False):
        for module in (F, factored):  # the frozen layer's node (`core.factored`) asks too
            monkeypatch.setattr(module, "_overwritable", spy if in_place else (lambda owned, grad, like: False))
        model = _layers(state)
        x = x0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            y = model(x)
        y.float().square().sum().backward()
        results.append((x.grad, [p.grad for p in model.parameters()]))
    assert calls and all(calls)  # every input binarizer of a layer took the owned path
    (gx_a, gp_a), (gx_b, gp_b) = results
    assert_same(gx_a, gx_b)
    for a, b in zip(gp_a, gp_b):
        assert_same(a, b)


@pytest.mark.parametrize("frozen", [True, False])
def test_a_binarizer_used_directly_leaves_shared_gradients_alone(frozen):
    """A binarizer called on its own (`StoMPPActivation`, user code) does not know who else holds its gradient:
    here `AddBackward` hands one tensor to both the binarized input and `z`, and `z`'s gradient stays the upstream
    one."""
    from stompp_hf.nn.binarizer import Binarizer

    b = Binarizer("stompp_ste", "input", "none", (4096,))
    b.controlled = True
    b.mask.fill(frozen)
    x = (torch.randn(8, 4096, generator=torch.Generator().manual_seed(0)) * 2).requires_grad_()
    z = torch.zeros(8, 4096, requires_grad=True)
    upstream = torch.randn(8, 4096, generator=torch.Generator().manual_seed(1))
    (b(x, 1) + z).backward(upstream)
    assert torch.equal(z.grad, upstream)
    assert torch.equal(x.grad, upstream * (x.detach().abs() <= 1).float())


def test_float32_to_bfloat16_passes_match_torch():
    """The autocast passes: a float32 input's sign (with its sum |x|) and clamp written straight into bfloat16, and
    a bfloat16 gradient windowed into float32: the bits of the float32 pass followed by torch's cast (the clamp
    rounds to nearest even, as `.to(torch.bfloat16)`), and the float32 sum of the float32 input."""
    u = data(torch.float32) * 3  # values outside the bound too, and between bfloat16 values
    bound = torch.tensor(0.75)
    sign, total = F.sign_and_abs_sum(u, torch.bfloat16)
    clamped = F.clamp_to(u, bound, torch.bfloat16)
    grad = data(torch.bfloat16, seed=1)
    window = F._windowed_grad(grad, u, bound, torch.tensor(1 / 0.9))
    with torch_ops_only():
        want_sign, want_total = F.sign_and_abs_sum(u)
        want_clamped = F.clamp_to(u, bound).to(torch.bfloat16)
        want_window = F._windowed_grad(grad.float(), u, bound, torch.tensor(1 / 0.9))
        assert_same(F.clamp_to(u, bound, torch.bfloat16), want_clamped)  # the torch ops' own cast
        assert_same(F._windowed_grad(grad, u, bound, torch.tensor(1 / 0.9)), want_window)
    assert_same(sign, want_sign.to(torch.bfloat16))
    assert_same(total, F.sign_and_abs_sum(u)[1])
    assert_same(clamped, want_clamped)
    assert_same(window, want_window)
    # a mixed pair the passes do not take (bfloat16 to float32) steps aside
    assert F.fused_ops().sign(u.bfloat16(), False, torch.float32) is None
    assert F.fused_ops().windowed_grad(grad.float(), u.bfloat16(), -1.0, 1.0, None) is None


@pytest.mark.parametrize("state", [0.0, 1.0])
def test_autocast_layers_take_their_operand_in_the_autocast_dtype(state):
    """Under autocast a continuous (clamped) or frozen (sign) input reaches `F.linear` already in bfloat16 (the
    passes write it so), and its gradient comes back in float32."""
    model = _layers(state)
    layer = model[1]
    seen = []
    handle = layer.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    x = torch.randn(96, 512, generator=torch.Generator().manual_seed(3), requires_grad=True)
    calls = []
    linear = torch.nn.functional.linear

    def spy(inp, weight, bias=None):
        calls.append(inp.dtype)
        return linear(inp, weight, bias)

    try:
        torch.nn.functional.linear = spy
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
    finally:
        torch.nn.functional.linear = linear
        handle.remove()
    y.float().sum().backward()
    assert calls[1] == torch.bfloat16 and seen == [torch.bfloat16]
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("ops", ["fused", "torch"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_transitioning_input_in_the_autocast_dtype(ops, dtype):
    """A transitioning input's forward written in the operand dtype, and its backward (a bfloat16 gradient of the
    op) the window times the widened gradient: the bits of the float32 forward then the cast, and of the float32
    product with the window (NaN and negative gradients included)."""
    u = (data(torch.float32, 4 * 8209) * 2).view(4, 8209)
    mask = torch.rand(8209, generator=torch.Generator().manual_seed(5)) < 0.5
    grad = data(dtype or torch.float32, 4 * 8209, seed=2).view(4, 8209)
    with torch_ops_only() if ops == "torch" else contextlib.nullcontext():
        x = u.clone().requires_grad_()
        half = torch.tensor(0.5)
        out = F.masked_binarize(x, mask, rule="stompp_ste", scale=half, bound=0.75, clip_smooth=True, dtype=dtype)
        out.backward(grad)
    with torch_ops_only():
        want = F._masked_values(u, mask, torch.tensor(0.5), torch.tensor(0.75), True)
        want_grad = grad.float() * F._window(u, torch.tensor(0.75))
    assert_same(out.detach(), want if dtype is None else want.to(dtype))
    assert_same(x.grad, want_grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("scale", "bias"), [("channel", True), ("channel", False), ("one", True), (None, True)])
def test_scale_bias_matches_torch(monkeypatch, dtype, scale, bias):
    """The factored form's epilogue `y * s + b` (Eq. 5) in one pass: the bits of `y.mul_(s).add_(b)` (two roundings
    in y's dtype, the factors cast to it first), per output channel or with one scale; where autograd records the
    ops (a tensor that needs a gradient) the torch ops run."""
    g = torch.Generator().manual_seed(4)
    y0 = torch.randint(-300, 301, (3, 71, 384), generator=g).to(dtype)  # exact integers, as a binary matmul gives
    s = {"channel": torch.rand(384, generator=g) + 0.01, "one": torch.rand((), generator=g), None: None}[scale]
    b = torch.randn(384, generator=g) if bias else None
    got = F.scale_output(y0.clone(), s, b, 1)
    with torch_ops_only():
        want = F.scale_output(y0.clone(), s, b, 1)
    assert_same(got, want)
    calls = []
    original = type(F.fused_ops()).scale_bias
    monkeypatch.setattr(type(F.fused_ops()), "scale_bias", lambda self, *a: calls.append(1) or original(self, *a))
    F.scale_output(y0.clone(), s, b, 1)
    assert calls  # the fused pass ran
    calls.clear()
    y = y0.clone().requires_grad_()
    F.scale_output(y * 1, s, b, 1).sum().backward()
    assert not calls and torch.equal(y.grad, (torch.ones_like(y0) * (1 if s is None else s.to(dtype))))


@pytest.mark.parametrize(
    ("dtype", "out"),
    [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)],
)
def test_scaled_sign_matches_torch(monkeypatch, dtype, out):
    """A frozen weight's `alpha * sign(W)` in the input gradient's dtype in one pass: the bits of
    `(binary_sign(W) * alpha.view(-1, 1)).to(dtype)`, special values of W (NaN -> -alpha, +-0 -> +alpha) and
    scales that round in bfloat16, zero, infinite or NaN included; a transposed W takes the torch ops."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(192, 257, generator=g).to(dtype)
    special = special_values(dtype, 0.5)
    w[0, : len(special)] = special
    alpha = (torch.rand(192, 1, generator=g) + 1e-3).to(dtype)
    alpha[:4, 0] = torch.tensor([0.0, math.inf, math.nan, 1.0 + 2**-9]).to(dtype)
    calls = []
    original = type(F.fused_ops()).scaled_sign
    monkeypatch.setattr(type(F.fused_ops()), "scaled_sign", lambda self, *a: calls.append(1) or original(self, *a))
    for scale in (alpha, alpha.view(-1), None):
        got = F.scaled_sign(w, scale, out)
        with torch_ops_only():
            want = F.scaled_sign(w, scale, out)
        assert_same(got, want)
    assert len(calls) == 2  # the fused pass ran for both scale shapes (None takes the sign pass)
    with torch_ops_only():
        want = F.scaled_sign(w.t(), alpha[:1].expand(257, 1), out)
    assert_same(F.scaled_sign(w.t(), alpha[:1].expand(257, 1), out), want)
    assert len(calls) == 3 and original(F.fused_ops(), w.t(), alpha[:1].expand(257, 1), out) is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_inplace_matches_torch(monkeypatch, dtype):
    """BinaryConnect's in-place clip of latent weights in one read-mostly pass: the bits of `u.clamp_(-b, b)` and of
    the masked `u.copy_(where(mask, u.clamp(-b, b), u))`, special values included (NaN stays NaN, +-0 keep their
    sign, the bound and its neighbours), for blocks with and without an entry outside and a size that is not a
    multiple of the pass's blocks; a non-contiguous tensor takes the torch ops."""
    g = torch.Generator().manual_seed(11)
    base = (torch.randn(N, generator=g) * 0.05).to(dtype)  # mostly inside: most blocks write nothing
    special = special_values(dtype, 1.0)
    base[1000 : 1000 + len(special)] = special
    base[5000:5010] = torch.tensor([3.0, -3.0, 1.5, -1.5, 0.5, 2.0, -2.0, 1.0, -1.0, 7.0]).to(dtype)
    base[-3:] = torch.tensor([4.0, -4.0, 0.25]).to(dtype)  # the tail past the last whole block
    mask = torch.rand(N, generator=g) < 0.5
    mask[5000:5005] = True
    calls = []
    original = type(F.fused_ops()).clip_inplace
    monkeypatch.setattr(type(F.fused_ops()), "clip_inplace", lambda self, *a: calls.append(1) or original(self, *a))
    for m in (None, mask):
        got, want = base.clone(), base.clone()
        F.clip_inplace_(got, 1.0, m)
        with torch_ops_only():
            F.clip_inplace_(want, 1.0, m)
        assert_same(got, want)
        assert not torch.equal(got[5000:5010], base[5000:5010])  # something was clipped
    assert len(calls) == 2 and original(F.fused_ops(), base.clone(), 1.0, mask) is True
    strided = base.clone().view(-1, 5)[:, ::2]
    want = strided.clone()
    F.clip_inplace_(strided, 1.0)
    assert_same(strided, want.clamp_(-1.0, 1.0))
    assert original(F.fused_ops(), base.clone().view(-1, 5)[:, ::2], 1.0, None) is False


@pytest.mark.parametrize(
    ("dtype", "out"), [(torch.float32, None), (torch.float32, torch.bfloat16), (torch.bfloat16, None)]
)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "gradient in another layout"])
def test_clip_keeps_a_bit_window(monkeypatch, dtype, out, layout):
    """A continuous input's clip writes its window as one bit per entry in the clamp's own pass and saves that, not
    `u`: the forward and the gradient are the bits of the torch ops (`clamp`, then `hardtanh_backward`: the closed
    window at its exact ends, a NaN `u` outside, a NaN or infinite gradient outside the window gives 0), the
    gradient widened from an autocast operand's dtype; a gradient laid out unlike `u` unpacks the bits in torch. A
    bfloat16 `u` keeps itself; the passes themselves take bfloat16 too (`test_bit_window_passes_take_bfloat16`)."""
    shape = (3, 16, 25, 27)
    u0 = data(dtype, math.prod(shape)).view(shape)
    g0 = data(out or dtype, u0.numel(), seed=1).view(shape)
    g0.view(-1)[:64] = torch.tensor([math.nan, math.inf, -math.inf, 5.0] * 16, dtype=g0.dtype)
    u0.view(-1)[:64] = torch.tensor([7.0, -7.0, 0.5, 0.75] * 16, dtype=dtype)  # outside, outside, inside, the end
    if layout != "contiguous":
        u0 = u0.contiguous(memory_format=torch.channels_last)
    g0 = g0.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else g0.contiguous()
    bound = torch.tensor(0.75, dtype=dtype)
    calls = []
    for name in ("clip_bits", "bits_grad"):
        real = getattr(type(F.fused_ops()), name)
        monkeypatch.setattr(
            type(F.fused_ops()), name, lambda self, *a, _n=name, _r=real: calls.append(_n) or _r(self, *a)
        )
    results = []
    for ops in ("fused", "torch"):
        with torch_ops_only() if ops == "torch" else contextlib.nullcontext():
            u = u0.clone(memory_format=torch.preserve_format).requires_grad_()
            y = F.clip(u, bound, dtype=out)
            if ops == "fused" and dtype == torch.float32:
                saved = y.grad_fn.saved_tensors
                assert saved[0] is None and saved[2].dtype == torch.uint8 and saved[2].numel() == (u.numel() + 7) // 8
            elif ops == "fused":  # a bfloat16 u keeps itself (bits cost its forward more than they save)
                assert y.grad_fn.saved_tensors[0] is not None
            y.backward(g0)
            results.append((y.detach(), u.grad))
    if dtype == torch.bfloat16:
        assert calls == []
    else:
        assert calls == (["clip_bits", "bits_grad"] if layout != "gradient in another layout" else ["clip_bits"])
    (y_a, g_a), (y_b, g_b) = results
    assert_same(y_a, y_b)
    assert y_a.stride() == y_b.stride()
    # outside the window a NaN or infinite gradient gives 0
    assert torch.equal(g_a.reshape(-1)[:64].view(16, 4)[:, :2], torch.zeros(16, 2, dtype=dtype))
    nan_u = torch.isnan(u0)
    if layout == "gradient in another layout" and dtype == torch.float32:
        # aten's hardtanh_backward passes the gradient of a NaN u on its path for mixed layouts (it gives 0 on its
        # vectorized one); a NaN u is outside the window here, as everywhere in this library
        assert torch.equal(g_a[nan_u], torch.zeros_like(g_a[nan_u]))
        g_a, g_b = g_a[~nan_u], g_b[~nan_u]
    assert_same(g_a, g_b)


def test_bit_window_passes_take_bfloat16():
    """`clip_bits` and `bits_grad` on bfloat16 (in and out): the clamp, and the gradient of the torch ops."""
    u, g = data(torch.bfloat16), data(torch.bfloat16, seed=1)
    bound = torch.tensor(0.75, dtype=torch.bfloat16)
    ops = F.fused_ops()
    out, bits = ops.clip_bits(u, bound.item(), F._window_edges(u, bound))
    with torch_ops_only():
        assert_same(out, F.clamp_to(u, bound))
        want = F._windowed_grad(g, u, bound)
    assert_same(ops.bits_grad(g.clone(), bits, torch.bfloat16, in_place=True), want)
