"""Saved-tensor hooks that let a binarized layer keep what a full-precision layer keeps (docs/design.md, Memory)."""

from __future__ import annotations

import sys
import threading
import weakref
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


def co_held(u: torch.Tensor) -> bool:
    """Whether something besides `u`'s Python object holds `u`'s data: an autograd node that saved `u` (as an
    input, or as its own output, as relu and tanh do), a view of `u`, a grad accumulator (a leaf). A view's base
    counts once. Python references to `u` itself are not seen."""
    storage = torch._C._storage_Use_Count(u.untyped_storage()._cdata) - 1  # less the temporary storage object
    if u._use_count() > 1:
        return True
    if u._is_view():  # u and its base hold the data; the base is held by u's view record and its Python object
        return storage > 2 or u._base._use_count() > 2
    return storage > 1


def inplace_error(version: int, expected: int) -> RuntimeError:
    return RuntimeError(
        "A binarized layer's input was modified by an inplace operation after the layer used it, so its "
        f"backward pass cannot recompute the binarized input (version {version}, expected {expected}). "
        "Make the inplace operation out of place."
    )


class _Unsettled(threading.local):
    clips: list[weakref.ref] | None = None


_unsettled = _Unsettled()


class KeptClip(SharedRecompute):
    """The saved form of a continuous input's clip (docs/design.md, Memory): the clip itself, while the layer's
    input `u` is held by nothing but Python references, so that `u` is freed with the forward's frames and the
    backward recomputes nothing; a recipe over `u` (a `SharedRecompute`) from the moment something else turns out
    to hold `u`, which keeps it anyway.

    Checked when the layer saves the clip (`co_held`: a producer that saved its output `u`, a view, a leaf), then
    at each later continuous binarization of the forward (`settle_unsettled`: a consumer that saved `u` after the
    layer; the clip is let go there). Two cases show only afterwards: `u` freed inside a backward (an autograd
    node held it past the last check) or alive when the backward reads the clip (the caller holds it). Then
    `on_shared()` tells the layer, which saves a recipe from its next forward on."""

    __slots__ = ("out", "ref", "version", "make", "on_shared", "in_backward", "__weakref__")

    def __init__(
        self,
        out: torch.Tensor,
        u: torch.Tensor,
        make: Callable[[torch.Tensor], Callable[[], torch.Tensor]],
        on_shared: Callable[[], None],
        in_backward: Callable[[], bool],
    ) -> None:
        super().__init__(None)
        self.out: torch.Tensor | None = out
        self.version = u._version
        self.make, self.on_shared = make, on_shared
        # a forward run again inside a backward (gradient checkpointing) frees its inputs there by design
        self.in_backward = (lambda: False) if in_backward() else in_backward
        me = weakref.ref(self)  # the callback must not keep this (and its clip) alive while u lives

        def freed(_ref: weakref.ref, finalizing: Callable[[], bool] = sys.is_finalizing) -> None:
            kept = me()
            if kept is not None and not finalizing():  # at exit the modules it calls may be gone
                kept._freed()

        self.ref = weakref.ref(u, freed)
        if _unsettled.clips is None:
            _unsettled.clips = []
        _unsettled.clips.append(weakref.ref(self))

    def _freed(self) -> None:
        if self.out is not None and self.in_backward():  # an autograd node held u until its backward ran
            self.on_shared()

    def settle(self) -> bool:
        """Let the clip go for a recipe if something else holds `u` now; True once nothing is left to check."""
        u = self.ref() if self.out is not None else None
        if u is None:
            return True
        if not co_held(u):
            return False
        self.on_shared()
        if u._version == self.version:  # else the clip is what the backward needs, and u no longer gives it
            self.fn, self.out = self.make(u), None
        return True

    def __call__(self) -> torch.Tensor:
        if self.out is None:
            return super().__call__()
        u = self.ref()
        if u is not None:  # u outlived the forward: the caller or another node holds it
            if u._version != self.version:
                raise inplace_error(u._version, self.version)  # as a recipe (and a saved u) would
            self.on_shared()
        return self.out


def settle_unsettled() -> None:
    """`KeptClip.settle` for the clips kept so far on this thread whose input may still be shared."""
    clips = _unsettled.clips
    if clips:
        _unsettled.clips = [r for r in clips if (c := r()) is not None and not c.settle()]
