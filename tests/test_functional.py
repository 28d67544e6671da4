"""The masked binarize on hand-computed values: forward, and the gradient of every rule (DESIGN.md §1)."""

import pytest
import torch

from stompp_hf import binary_sign, masked_binarize

U = torch.tensor([-2.0, -0.5, 0.0, 0.25, 1.5, -0.75])
MASK = torch.tensor([True, False, True, False, True, True])
G = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])


def run(rule, clip_smooth, mask=MASK, scale=1.0, bound=1.0):
    u = U.clone().requires_grad_(True)
    out = masked_binarize(u, mask, rule=rule, scale=scale, bound=bound, clip_smooth=clip_smooth)
    if not out.requires_grad:  # an all-frozen "stompp" tensor is a constant: no gradient reaches u at all
        return out, torch.zeros_like(U)
    out.backward(G)
    return out.detach(), u.grad


def test_sign_of_zero_is_plus_one():
    assert torch.equal(binary_sign(torch.tensor([-0.0, 0.0, -1e-8, 3.0])), torch.tensor([1.0, 1.0, -1.0, 1.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_binary_sign_bits_in_every_dtype(dtype):
    """Exactly +1 or -1 (the bits of `torch.ones`), with sign(+-0) = +1, sign(NaN) = -1 (either NaN sign), the
    smallest subnormals and the infinities, on a strided view too; the dtype is kept."""
    tiny = torch.finfo(dtype).smallest_normal / 4 if dtype != torch.bfloat16 else 1e-40
    nan = torch.tensor(float("nan"), dtype=dtype)
    special = torch.stack(
        [torch.tensor(v, dtype=dtype) for v in (-0.0, 0.0, tiny, -tiny, float("inf"), -float("inf"))]
    )
    u = torch.cat([special, nan[None], -nan[None], torch.randn(40, dtype=dtype)])
    expected = torch.where(u >= 0, torch.ones((), dtype=dtype), -torch.ones((), dtype=dtype))
    assert expected[:8].tolist() == [1, 1, 1, -1, 1, -1, -1, -1]
    for x, want in ((u, expected), (u.view(2, -1).t(), expected.view(2, -1).t())):
        got = binary_sign(x)
        assert got.dtype == dtype and got.stride() == torch.empty_like(x).stride()
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
        assert torch.equal(got.contiguous().view(bits), want.contiguous().view(bits))


def test_input_forward_and_stompp_gradient():
    out, grad = run("stompp", clip_smooth=True)
    # frozen -> sign, continuous -> clip(u, -1, 1)
    assert torch.equal(out, torch.tensor([-1.0, -0.5, 1.0, 0.25, 1.0, -1.0]))
    # frozen entries: exactly 0; continuous: g * 1{|u| <= 1}
    assert torch.equal(grad, torch.tensor([0.0, 2.0, 0.0, 4.0, 0.0, 0.0]))


def test_input_stompp_ste_gradient():
    out, grad = run("stompp_ste", clip_smooth=True)
    assert torch.equal(out, torch.tensor([-1.0, -0.5, 1.0, 0.25, 1.0, -1.0]))
    # frozen entries get the clipped STE g * 1{|u| <= 1}: u=-2 -> 0, u=0 -> 3, u=1.5 -> 0, u=-0.75 -> 6
    assert torch.equal(grad, torch.tensor([0.0, 2.0, 3.0, 4.0, 0.0, 6.0]))


def test_weight_forward_and_gradients():
    out, grad = run("stompp", clip_smooth=False)
    # weights: smooth is the identity, so continuous entries pass through unclipped with gradient g
    assert torch.equal(out, torch.tensor([-1.0, -0.5, 1.0, 0.25, 1.0, -1.0]))
    assert torch.equal(grad, torch.tensor([0.0, 2.0, 0.0, 4.0, 0.0, 0.0]))
    mask = torch.tensor([False, False, False, False, True, False])
    out, grad = run("stompp", clip_smooth=False, mask=mask)
    assert torch.equal(out, torch.tensor([-2.0, -0.5, 0.0, 0.25, 1.0, -0.75]))
    assert torch.equal(grad, torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 6.0]))
    # BinaryConnect on the frozen entries: the identity, |u| > 1 included (u = -2 and 1.5 move again; their latent
    # value is clipped to [-1, 1] after the optimizer step instead, `ProgressionController.clip_latent_weights`)
    _, grad = run("stompp_ste", clip_smooth=False)
    assert torch.equal(grad, torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))


def test_plain_ste_ignores_mask():
    out, grad = run("ste", clip_smooth=True, mask=torch.zeros(6, dtype=torch.bool))
    assert torch.equal(out, torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0, -1.0]))
    assert torch.equal(grad, torch.tensor([0.0, 2.0, 3.0, 4.0, 0.0, 6.0]))


def test_scale_is_a_constant_and_bound_clips():
    scale = torch.tensor(0.5, requires_grad=True)
    u = U.clone().requires_grad_(True)
    out = masked_binarize(u, MASK, rule="stompp", scale=scale, bound=scale, clip_smooth=True)
    out.backward(G)
    assert torch.equal(out.detach(), torch.tensor([-0.5, -0.5, 0.5, 0.25, 0.5, -0.5]))
    assert torch.equal(u.grad, torch.tensor([0.0, 2.0, 0.0, 4.0, 0.0, 0.0]))
    assert scale.grad is None


@pytest.mark.parametrize("rule", ["stompp", "stompp_ste"])
def test_binarizer_activation_clip_widens_bound_in_units_of_beta(rule):
    from stompp_hf.nn import Binarizer

    b = Binarizer(rule, "input", "tensor", shape=(6,), clip=3.0)
    b.scale.fill_(0.5)  # beta = 0.5, so the clip bound is c = 1.5
    b.mask.value = MASK.clone()
    b.eval()
    u = U.clone().requires_grad_(True)
    out = b(u, feature_ndim=1)
    out.backward(G)
    # frozen -> beta * sign(u); continuous -> clamp(u, -1.5, 1.5): -0.5 and 0.25 pass unchanged
    assert torch.equal(out.detach(), torch.tensor([-0.5, -0.5, 0.5, 0.25, 0.5, -0.5]))
    # continuous: g * 1{|u| <= 1.5}; frozen (stompp_ste): g * 1{|u| <= 1.5}: u=-2 -> 0, 0 -> 3, 1.5 -> 5, -0.75 -> 6
    frozen = torch.tensor([0.0, 0.0, 3.0, 0.0, 5.0, 6.0]) if rule == "stompp_ste" else torch.zeros(6)
    assert torch.equal(u.grad, torch.tensor([0.0, 2.0, 0.0, 4.0, 0.0, 0.0]) + frozen)


def test_per_channel_weight_scale_broadcasts():
    w = torch.tensor([[0.1, -0.3], [0.02, 0.06]], requires_grad=True)
    alpha = w.detach().abs().mean(dim=1, keepdim=True)  # [[0.2], [0.04]]
    out = masked_binarize(w, True, rule="stompp_ste", scale=alpha, clip_smooth=False)
    assert torch.allclose(out, torch.tensor([[0.2, -0.2], [0.04, 0.04]]), atol=0, rtol=0)


@pytest.mark.parametrize("rule", ["stompp", "stompp_ste"])
@pytest.mark.parametrize("clip_smooth", [True, False])
def test_constant_masks_match_materialized_masks(rule, clip_smooth):
    for constant in (True, False):
        fast_out, fast_grad = run(rule, clip_smooth, mask=constant)
        full_out, full_grad = run(rule, clip_smooth, mask=torch.full((6,), constant))
        assert torch.equal(fast_out, full_out)
        assert torch.equal(fast_grad, full_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bound", [1.0, 0.3, 1.006, 0.0])
def test_fused_clipped_identity_gradient_matches_the_product(dtype, bound):
    """The one-pass CPU window gradient (aten's hardtanh_backward with bounds one ulp outside) gives the values of
    `1{|u| <= bound} * g`, the closed ends included: at `u = +-bound` exactly, one ulp inside and outside, zeros and
    bounds that the input's dtype rounds (1.006 rounds up in bf16, so a bf16 input equal to the rounded bound passes,
    as it does in the comparison)."""
    from stompp_hf.core.functional import _window, _windowed_grad

    b = torch.tensor(bound)
    edge = b.to(dtype)
    up = torch.nextafter(edge, torch.tensor(float("inf"), dtype=dtype))
    down = torch.nextafter(edge, torch.tensor(-float("inf"), dtype=dtype))
    special = torch.stack([edge, -edge, up, -up, down, -down]).to(dtype)
    u = torch.cat([special, torch.tensor([0.0, -0.0], dtype=dtype), torch.randn(997, dtype=dtype)])
    g = torch.randn(u.shape, dtype=dtype)
    expected = _window(u, b, g.dtype).mul_(g)
    got = _windowed_grad(g, u, b)
    assert got.dtype == g.dtype and torch.equal(got, expected)
    assert torch.equal(got[:2] != 0, g[:2] != 0)  # u = +-bound (as rounded): inside
    assert not got[2:4].any()  # one ulp outside
    if bound > 0:
        assert torch.equal(got[4:6] != 0, g[4:6] != 0)  # one ulp inside


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bound", [1.0, 0.3, 1000.0, 0.0])
def test_clamp_to_a_read_back_bound_matches_the_tensor_bound(dtype, bound):
    """`clamp_to` (on CPU the bound read back as a Python number) gives torch's clamp to tensor bounds bit for bit:
    at the bound and one ulp either side, signed zeros and infinities, in every float dtype; a NaN stays a NaN (its
    sign bit may differ in bfloat16, which no later step reads: the sign of a NaN is -1 either way)."""
    from stompp_hf.core.functional import clamp_to

    b = torch.tensor(bound, dtype=dtype)
    up = torch.nextafter(b, torch.tensor(float("inf"), dtype=dtype))
    down = torch.nextafter(b, torch.tensor(-float("inf"), dtype=dtype))
    special = torch.stack([b, -b, up, -up, down, -down]).to(dtype)
    odd = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan")], dtype=dtype)
    u = torch.cat([special, odd, 3 * torch.randn(989, dtype=dtype)])
    got = clamp_to(u, b)
    expected = torch.clamp(u, -b, b)
    assert got.dtype == dtype
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    nan = u.isnan()
    assert torch.equal(got.view(bits)[~nan], expected.view(bits)[~nan])  # the same bits: signed zeros included
    assert got[nan].isnan().all() and got.abs().le(b).sum() == u.numel() - 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bound", [1.0, 0.3, 1.006, 0.0])
def test_int8_window_matches_the_comparison(dtype, bound):
    """The saved window of a transitioning input (on CPU a `hardtanh_backward` of broadcast ones) is
    `1{|u| <= bound}` as int8, at the bound and one ulp either side, signed zeros included."""
    from stompp_hf.core.functional import _window, _window_int8

    b = torch.tensor(bound)
    edge = b.to(dtype)
    up = torch.nextafter(edge, torch.tensor(float("inf"), dtype=dtype))
    down = torch.nextafter(edge, torch.tensor(-float("inf"), dtype=dtype))
    u = torch.cat([torch.stack([edge, -edge, up, -up, down, -down]).to(dtype), torch.tensor([0.0, -0.0], dtype=dtype)])
    u = torch.cat([u, torch.randn(992, dtype=dtype)]).reshape(10, 100)
    got = _window_int8(u, b)
    assert got.dtype == torch.int8 and got.shape == u.shape
    assert torch.equal(got, _window(u, b).to(torch.int8))
    assert got[0, :2].tolist() == [1, 1] and got[0, 2:4].tolist() == [0, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["input", "weight"])
def test_masked_values_written_in_place_match_the_out_of_place_ops(dtype, kind):
    """`_masked_values` writes `a * sign(u)` and the `where` into the sign's tensor; the values are those of
    `where(M, sign(u) * a, smooth(u))` computed out of place, bit for bit, for a per-tensor (input, 0-d) and a
    per-channel (weight, [out, 1]) scale, for a scale of another dtype (which promotes) and one that broadcasts
    beyond `u`'s shape."""
    from stompp_hf.core.functional import _masked_values

    g = torch.Generator().manual_seed(0)
    u = torch.randn(6, 40, generator=g).to(dtype)
    u[0, :3] = torch.tensor([0.0, -0.0, float("nan")])
    bound = torch.tensor(0.7, dtype=dtype)
    if kind == "input":
        mask, scales = torch.rand(40, generator=g) < 0.5, [torch.tensor(0.7, dtype=dtype), 1.0]
    else:
        mask = torch.rand(6, 40, generator=g) < 0.5
        scales = [
            u.abs().mean(dim=1, keepdim=True),
            torch.rand(6, 1, generator=g, dtype=torch.float64),
            torch.rand(2, 6, 1, generator=g).to(dtype),  # broadcasts beyond u's shape: out of place
            1.0,
        ]
    for scale in scales:
        sign = torch.where(u >= 0, 1.0, -1.0).to(dtype)
        soft = torch.clamp(u, -bound, bound) if kind == "input" else u
        expected = torch.where(mask, sign * scale, soft)
        got = _masked_values(u, mask, scale, bound, kind == "input")
        assert got.dtype == expected.dtype and got.shape == expected.shape
        bits = torch.int16 if got.dtype.itemsize == 2 else {4: torch.int32, 8: torch.int64}[got.dtype.itemsize]
        nan = expected.isnan()
        assert torch.equal(got.view(bits)[~nan], expected.view(bits)[~nan]) and got[nan].isnan().all()


def test_scale_output_in_place_gives_the_two_rounded_steps_and_their_gradients():
    """`scale_output` updates the op's fresh output in place; values `(y * s) + b` rounded step by step, and the
    gradients to the op's operands and the bias are those of the out-of-place expression."""
    from stompp_hf.core.functional import scale_output

    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 7, generator=g).sign().requires_grad_()
    w = torch.randn(3, 7, generator=g).sign().requires_grad_()
    b = torch.randn(3, generator=g, requires_grad=True)
    s = torch.rand(3, generator=g) + 0.5
    gy = torch.randn(5, 3, generator=g)
    ref = torch.nn.functional.linear(x, w) * s + b
    ref.backward(gy)
    expected = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    got = scale_output(torch.nn.functional.linear(x, w), s, b, 1)
    assert torch.equal(got, ref.detach())
    got.backward(gy)
    assert all(torch.equal(t.grad, e) for t, e in zip((x, w, b), expected))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(3, 5), (2, 1 << 20), (3, 700_001)])
def test_abs_sum_is_the_float32_sum_of_abs(dtype, shape, monkeypatch):
    """`abs_sum` (chunked on CPU above `_ABS_SUM_CHUNK` elements) is the float32 sum of |x|: exactly for values
    whose partial sums are exact in float32 (small integers), and to float32 rounding for random ones; a chunk
    boundary inside a row and a partial last chunk included; a non-contiguous input takes the plain sum."""
    from stompp_hf.core import functional

    g = torch.Generator().manual_seed(0)
    ints = torch.randint(-8, 9, shape, generator=g).to(dtype)
    assert functional.abs_sum(ints).dtype == torch.float32
    assert functional.abs_sum(ints).item() == ints.double().abs().sum().item()
    x = torch.randn(shape, generator=g).to(dtype)
    exact = x.double().abs().sum().item()
    assert abs(functional.abs_sum(x).item() - exact) <= 1e-5 * exact
    assert abs(functional.abs_sum(x.t()).item() - exact) <= 1e-5 * exact
    monkeypatch.setattr(functional, "_ABS_SUM_CHUNK", 7)  # many chunks, the last one partial
    small = torch.randint(-8, 9, (3, 10), generator=g).to(dtype)
    assert functional.abs_sum(small).item() == small.double().abs().sum().item()
