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
