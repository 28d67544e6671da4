"""Bit packing of signs (8 per byte) and the dtypes a packed checkpoint's full-precision remainder may take."""

from __future__ import annotations

import torch

#: `StoMPPConfig.export_dtype` values (None keeps the training dtype) and the torch dtypes they stand for.
EXPORT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def pack_signs(positive: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor `[rows, K]` (True = +1, False = -1) into uint8 `[rows, ceil(K / 8)]`, 8 values per byte.

    Entry `k` of a row is bit `k % 8` (least significant first) of byte `k // 8`; a short last byte is zero-padded.
    """
    if positive.dtype != torch.bool or positive.ndim != 2:
        raise ValueError(
            f"pack_signs expects a 2-D bool tensor, got {positive.dtype} of shape {tuple(positive.shape)}."
        )
    rows, k = positive.shape
    pad = (-k) % 8
    bits = torch.nn.functional.pad(positive.to(torch.uint8), (0, pad)).view(rows, -1, 8)
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=positive.device)
    return (bits * weights).sum(dim=-1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, k: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Inverse of `pack_signs`: uint8 `[rows, ceil(k / 8)]` to bool `[rows, k]` (True = +1), or, with a floating
    `dtype`, straight to the +-1 values (the comparison writes floats directly: much faster than via bool)."""
    if packed.dtype != torch.uint8 or packed.ndim != 2 or packed.shape[1] != (k + 7) // 8:
        raise ValueError(
            f"unpack_signs expects uint8 [rows, {(k + 7) // 8}] for {k} values per row, "
            f"got {packed.dtype} of shape {tuple(packed.shape)}."
        )
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=packed.device)
    masked = packed.unsqueeze(-1) & weights
    if dtype is None:
        return (masked != 0).view(packed.shape[0], -1)[:, :k]
    signs = torch.ne(masked, 0, out=torch.empty(masked.shape, dtype=dtype, device=packed.device)).mul_(2).sub_(1)
    return signs.view(packed.shape[0], -1)[:, :k]
