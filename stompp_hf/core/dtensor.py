"""Sharded-tensor helpers (FSDP2 / tensor-parallel `DTensor`s), without importing torch.distributed's DTensor."""

from __future__ import annotations

import torch


def is_sharded(tensor: torch.Tensor) -> bool:
    """True for a `DTensor` (FSDP2, tensor parallel), which holds only this rank's shard."""
    return hasattr(tensor, "device_mesh") and hasattr(tensor, "full_tensor")


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded `DTensor` (a collective: every rank must call it), or `tensor` itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor
