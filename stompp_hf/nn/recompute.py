"""Saved-tensor hooks that let a binarized layer keep what a full-precision layer keeps (docs/design.md, Memory)."""

from __future__ import annotations

from collections.abc import Callable

import torch


class _Recompute:
    __slots__ = ("fn", "size", "stride", "offset")

    def __init__(self, fn: Callable[[], torch.Tensor], size, stride, offset: int) -> None:
        self.fn, self.size, self.stride, self.offset = fn, size, stride, offset


class _RecomputeSaved(torch.autograd.graph.saved_tensors_hooks):
    """Recomputes binarized operands in the backward pass instead of keeping them from the forward pass.

    The op (a matmul / convolution) saves its operands for its backward; a saved tensor that is one of the
    registered results (the tensor itself or a view of all of it: same data pointer, same size) is stored as its
    recipe, `recompute()` plus the view's geometry, and rebuilt bit for bit when the backward needs it. The recipe
    holds the latent tensor (the layer input, which the previous layer or the other projections of the same input
    keep anyway, or the weight Parameter): an elementwise pass in the backward instead of an activation-sized
    copy per layer.
    """

    def __init__(self, entries: list[tuple[torch.Tensor, Callable[[], torch.Tensor]]]) -> None:
        table = {(t.data_ptr(), t.numel()): (t.storage_offset(), fn) for t, fn in entries}

        def pack(t: torch.Tensor):
            hit = table.get((t.data_ptr(), t.numel()))
            if hit is None:
                return t
            base_offset, fn = hit
            if isinstance(fn, SharedRecompute):
                fn.packed()
            return _Recompute(fn, t.size(), t.stride(), t.storage_offset() - base_offset)

        def unpack(saved):
            if isinstance(saved, _Recompute):
                r = saved.fn()
                return r.as_strided(saved.size, saved.stride, r.storage_offset() + saved.offset)
            return saved

        super().__init__(pack, unpack)


class SharedRecompute:
    """A recipe several layers save (sibling layers that share one binarized input, `nn.binarizer._SharedClip`):
    the first of their backward passes to need it recomputes it, the others reuse that tensor, and it is let go once
    every layer that saved it has read it. A read after that (a second backward over a retained graph) recomputes
    it again, and keeps nothing."""

    __slots__ = ("fn", "pending", "value")

    def __init__(self, fn: Callable[[], torch.Tensor]) -> None:
        self.fn = fn
        self.pending = 0  # saves not read back yet
        self.value: torch.Tensor | None = None

    def packed(self) -> None:
        self.pending += 1

    def __call__(self) -> torch.Tensor:
        value = self.value if self.value is not None else self.fn()
        self.pending -= 1
        self.value = value if self.pending > 0 else None
        return value
