"""Exact binary convolution on CPU: binary input x binary weight through XNOR and popcount.

`binary_conv2d(x, weight_packed, weight_shape, stride, padding, dilation, groups, out_scale, bias)` computes, bit for
bit, what the dense torch path of a packed convolution computes::

    y = F.conv2d(sign(x), sign(W), None, stride, padding, dilation, groups)     # zero padding: padded entries are 0
    y = y * out_scale[:, None, None]                                             # optional, one float32 rounding
    y = y + bias[:, None, None]                                                  # optional, one float32 rounding

with `sign(x) = where(x >= 0, 1, -1)`. The C kernel (`xnor_conv.c`, built with `xnor.c`) packs the signs into a
zero-bordered bit image (32 channels per word), runs every output pixel over all taps with the linear kernel's
register tile, and adds back what the border's -1 entries contributed (the padding correction, a small table per
call): see the top of `xnor_conv.c`. Paths: "avx512" (AVX-512 VPOPCNTDQ), "avx2" (byte-table popcounts on
nibble-split words, float32 only) and "scalar". The output has the input's memory format (channels-last in,
channels-last out; NCHW otherwise), as `F.conv2d` would give.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch

from . import xnor

__all__ = ["CONV_PATHS", "binary_conv2d", "conv_geometry", "conv_paths", "prepare_conv2d"]

#: The convolution kernel's code paths, fastest first.
CONV_PATHS: tuple[str, ...] = ("avx512", "avx2", "scalar")

# Below this many (output, 64-input word) pairs per thread, waking another thread costs more than it saves.
_MIN_WORK_PER_THREAD = 1 << 13
# The kernel classifies which kernel rows / columns of an output fall into the padding with a 32-bit mask.
_MAX_TAPS = 32


def conv_paths() -> tuple[str, ...]:
    """The convolution paths this CPU supports, fastest first ("scalar" always)."""
    return tuple(p for p in CONV_PATHS if p in xnor.paths())


def prepare_conv2d(weight_packed: torch.Tensor, weight_shape: Sequence[int], groups: int = 1) -> torch.Tensor:
    """The packed conv weight `[O, ceil(Cg * kh * kw / 8)]` in the kernel's panel layout (see
    `xnor.prepare_weights`): about the size of `weight_packed`, built once and kept by `BinaryConv2d`."""
    o, cg, kh, kw = (int(v) for v in weight_shape)
    return xnor.prepare_weights(weight_packed, o, cg, kh * kw, groups)


def _pair(v: int | Sequence[int], name: str, caller: str = "binary_conv2d") -> tuple[int, int]:
    pair = (int(v), int(v)) if isinstance(v, int) else tuple(int(a) for a in v)
    if len(pair) != 2:
        raise ValueError(f"{caller} expects `{name}` as an int or a pair, got {v!r}.")
    return pair  # type: ignore[return-value]


def conv_geometry(
    x: torch.Tensor,
    weight_shape: Sequence[int],
    stride: int | Sequence[int],
    padding: int | Sequence[int],
    dilation: int | Sequence[int],
    groups: int,
    caller: str,
) -> tuple[ctypes.Array, tuple[int, int, int]]:
    """The 18 int64 geometry values the C convolutions read (B, C, H, W, the strides of `x` in elements, O, kh, kw,
    stride, padding, dilation, groups) and `(B, Ho, Wo)`, after checking them.

    Raises:
        ValueError: On a non-float32 / non-CPU / non-4-D `x`, or a geometry no kernel handles.
    """
    o, cg, kh, kw = (int(v) for v in weight_shape)
    (sh, sw), (ph, pw), (dh, dw) = (
        _pair(v, n, caller) for v, n in ((stride, "stride"), (padding, "padding"), (dilation, "dilation"))
    )
    if not isinstance(x, torch.Tensor) or x.dtype not in xnor.ACTIVATION_DTYPES or not x.is_cpu or x.ndim != 4:
        raise ValueError(f"{caller} expects x as a 4-D float32 or bfloat16 CPU tensor, got {xnor._describe(x)}.")
    b, c, h, w = x.shape
    if groups < 1 or c != cg * groups or o % groups or not 0 < kh <= _MAX_TAPS or not 0 < kw <= _MAX_TAPS:
        raise ValueError(
            f"{caller} expects weight_shape (O, C / groups, kh, kw) with O divisible by groups and kernel sides "
            f"up to {_MAX_TAPS}; got weight_shape={tuple(weight_shape)}, groups={groups} for x of shape "
            f"{tuple(x.shape)}."
        )
    if min(sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError(
            f"{caller} expects positive stride and dilation and non-negative padding, got stride={stride}, "
            f"padding={padding}, dilation={dilation}."
        )
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"{caller}: the kernel does not fit the padded input {tuple(x.shape)}.")
    geometry = (ctypes.c_int64 * 18)(b, c, h, w, *x.stride(), o, kh, kw, sh, sw, ph, pw, dh, dw, groups)
    return geometry, (b, ho, wo)


def binary_conv2d(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_shape: Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    out_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    strict: bool = False,
    num_threads: int | None = None,
    path: str | None = None,
    prepared: torch.Tensor | None = None,
) -> torch.Tensor:
    """Binary-input x binary-weight `conv2d` with zero padding, bit-identical to the dense torch path.

    Inference only (no autograd graph). Exact for `Cg * kh * kw < 2**24`.

    Args:
        x: Float32 CPU tensor `[B, C, H, W]`, NCHW or channels-last (other layouts are copied); or bfloat16 (the
            avx512 path, which reads it channels-last: another layout is copied there and the output back), for a
            bfloat16 output rounded as torch's bf16 conv and ops round it (see `xnor.xnor_linear`).
        weight_packed: Uint8 `[O, ceil(Cg * kh * kw / 8)]`: the signs of the `[O, Cg, kh, kw]` weight flattened per
            output channel, in `pack_signs` layout.
        weight_shape: `(O, Cg, kh, kw)`, Cg = C / groups; kh, kw <= 32.
        stride, padding, dilation, groups: As in `F.conv2d` (numbers, not `"same"`).
        out_scale: Optional float32 `[O]`, multiplied into the integer sums.
        bias: Optional float32 `[O]`, added last.
        strict: The input is already +-1 (a binary activation's output): any other value raises
            `xnor.InputNotBinary` and nothing is computed.
        num_threads: Threads to use (default `torch.get_num_threads()`); small problems use fewer.
        path: "avx512", "avx2" or "scalar" to force a code path (it must be in `conv_paths()`).
        prepared: `prepare_conv2d(weight_packed, weight_shape, groups)`; built by the call when missing.

    Returns:
        `[B, O, Ho, Wo]` of `x`'s dtype, in the memory format of `x`.

    Raises:
        ValueError: On wrong dtypes, devices or shapes, a NaN in `x`, a `path` this CPU cannot run, or grad mode on
            with a tensor that requires grad.
        xnor.InputNotBinary: With `strict`, when `x` has a value other than +-1.
        XnorUnavailable: When the kernel could not be compiled or loaded.
        MemoryError: When the scratch buffers cannot be allocated.
    """
    lib = xnor._library()
    o, cg, kh, kw = (int(v) for v in weight_shape)
    geometry, (b, ho, wo) = conv_geometry(x, weight_shape, stride, padding, dilation, groups, "binary_conv2d")
    xnor._check_packed(weight_packed, o, (cg * kh * kw + 7) // 8, "binary_conv2d")
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, out_scale, bias))
    if grad:
        raise ValueError(
            "The binary convolution kernel is inference-only (no autograd): call it under torch.no_grad() or "
            "torch.inference_mode(), or with tensors that do not require grad."
        )
    out_scale, scale_ptr = xnor._vector_pointer("out_scale", out_scale, o, "binary_conv2d")
    bias, bias_ptr = xnor._vector_pointer("bias", bias, o, "binary_conv2d")
    num_threads = xnor._threads(num_threads, "binary_conv2d")
    path_id = xnor._path_id(path, "binary convolution")
    if prepared is None:
        prepared = prepare_conv2d(weight_packed.contiguous(), weight_shape, groups)
    else:
        xnor._check_prepared(prepared, o, cg, kh * kw, groups)

    bf16 = x.dtype is torch.bfloat16
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    xc = x
    if bf16 and not channels_last:  # the bf16 kernel reads channels-last only: copy there, and the output back
        xc = x.contiguous(memory_format=torch.channels_last)
    elif not channels_last and not x.is_contiguous():
        xc = x.contiguous()
    geometry[4:8] = xc.stride()
    nchw_out = not channels_last and not bf16
    if nchw_out:
        y = torch.empty((b, o, ho, wo), dtype=x.dtype)
    else:
        y = torch.empty((b, ho, wo, o), dtype=x.dtype).permute(0, 3, 1, 2)
    if b == 0:
        return y if channels_last or nchw_out else y.contiguous()
    rc = lib.conv2d(
        xc.data_ptr(),
        ctypes.addressof(geometry),
        prepared.data_ptr(),
        scale_ptr,
        bias_ptr,
        y.data_ptr(),
        int(nchw_out),
        int(strict),
        num_threads,
        _MIN_WORK_PER_THREAD,
        path_id,
        int(bf16),
    )
    xnor._raise_for(rc, "binary_conv2d", x)
    return y if channels_last or nchw_out else y.contiguous()
