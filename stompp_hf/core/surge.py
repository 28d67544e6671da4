"""SURGE's dual-path gradient compensator (the auxiliary full-precision branch and the adaptive gradient scaler).

See `surge` and docs/design.md (SURGE).
"""

from __future__ import annotations

import torch

#: epsilon of SURGE's adaptive gradient scaler.
SURGE_EPS = 1e-8


class SurgeLink:
    """What the two autograd nodes of one SURGE forward share: the auxiliary op, eta, and the output gradient.

    `aux_fn(x, weight)` computes the auxiliary (full-precision) branch f_a; it is only run in the backward pass.
    `on_scale(lam)` receives the lambda of every backward (the layer records it for logging).
    """

    __slots__ = ("aux_fn", "eta", "on_scale", "grad_output", "autocast")

    def __init__(self, aux_fn, eta: float, on_scale=None, device_type: str = "cpu") -> None:
        self.aux_fn = aux_fn
        self.eta = eta
        self.on_scale = on_scale
        self.grad_output: torch.Tensor | None = None
        # The forward's autocast state: the auxiliary forward runs in the backward pass, where autocast is off, and
        # must see the dtypes the forward saw (as `torch.utils.checkpoint` does for its recomputation).
        self.autocast = (
            device_type,
            torch.is_autocast_enabled(device_type),
            torch.get_autocast_dtype(device_type),
        )

    def capture(self, grad: torch.Tensor) -> None:
        self.grad_output = grad


class _SurgeFork(torch.autograd.Function):
    """Identity on `x` in the forward. Backward: receives the binary branch's input gradient g_b and returns
    `g_b + lam * g_a` for `x` and `lam * dW_a` for the auxiliary weight, with g_a, dW_a the gradients of
    `<grad_output, aux_fn(x, W_a)>` and lam = eta * ||g_b|| / (||g_a|| + eps)."""

    @staticmethod
    def forward(ctx, x, aux_weight, link):  # type: ignore[override]
        ctx.save_for_backward(x, aux_weight)
        ctx.link = link
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_b):  # type: ignore[override]
        x, aux_weight = ctx.saved_tensors
        link = ctx.link
        grad_output, link.grad_output = link.grad_output, None
        if grad_output is None:  # the layer's output took no part in the loss
            return grad_b, None, None
        device_type, autocast, dtype = link.autocast
        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=autocast):
            x_a = x.detach().requires_grad_(True)
            w_a = aux_weight.detach().requires_grad_(True)
            out_a = link.aux_fn(x_a, w_a)
            grad_x_a, grad_w_a = torch.autograd.grad(out_a, (x_a, w_a), grad_output.to(out_a.dtype))
        lam = link.eta * grad_b.float().norm() / (grad_x_a.float().norm() + SURGE_EPS)
        if link.on_scale is not None:
            link.on_scale(lam.detach())
        lam = lam.to(grad_b.dtype)
        grad_x = grad_b + lam * grad_x_a if ctx.needs_input_grad[0] else None
        grad_w = lam * grad_w_a if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None


def surge(x: torch.Tensor, aux_weight: torch.Tensor, binary_fn, aux_fn, eta: float, on_scale=None) -> torch.Tensor:
    """SURGE's dual-path gradient compensator around one layer.

    The output is `binary_fn(x)` exactly (the forward never evaluates the auxiliary branch). In the backward pass
    the input gradient becomes `g_b + lam * g_a` and the auxiliary weight receives `lam * dW_a`, where g_b is the
    binary branch's input gradient (STE / StoMPP rule), g_a and dW_a are the gradients of the full-precision branch
    `aux_fn(x, aux_weight)` (fed the unbinarized input) for the same output gradient, and
    `lam = eta * ||g_b||_2 / (||g_a||_2 + 1e-8)` (the adaptive gradient scaler, per call). This is the gradient of
    `f_b + lam * f_a - stop_grad(lam * f_a)` with lam a constant, which is SURGE's formulation.

    The auxiliary forward runs inside the backward pass, under the forward's autocast state (bf16 mixed precision
    included): nothing extra is kept in memory between the two passes except a reference to `x` (which the binary
    branch keeps anyway).
    """
    link = SurgeLink(aux_fn, eta, on_scale, x.device.type)
    out = binary_fn(_SurgeFork.apply(x, aux_weight, link))
    if out.requires_grad:
        out.register_hook(link.capture)
    return out
