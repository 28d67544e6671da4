"""`Binarizer`: binarizes one tensor (a weight, or a layer's input) under its `MaskState` (docs/design.md, Eq. 1-3)."""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from ..core.functional import (
    abs_sum,
    clamp_to,
    fused_ops,
    hard_sign,
    masked_binarize,
    scaled_sign,
    sign_and_abs_sum,
    state_binarize,
)
from ..core.masks import (
    ABSENT,
    FROZEN,
    TRANSITIONING,
    UNSIZED,
    MaskState,
    absent_mask_state,
    decode_mask_state,
    encode_mask_state,
)
from .recompute import KeptClip, SharedRecompute, co_held, inplace_error, settle_unsettled

#: Momentum of the running mean of |x| that sets the activation scale beta.
ACTIVATION_SCALE_MOMENTUM = 0.1


def compiles_by_state(u: torch.Tensor) -> bool:
    """Whether a compiled forward binarizes `u` with `state_binarize` (a plain tensor: a `DTensor` shard is traced
    through the eager code instead, specialized to its mask state)."""
    return type(u) in (torch.Tensor, nn.Parameter)


def _in_backward() -> bool:
    """True while autograd runs a backward pass on this thread (where checkpointed forwards are recomputed)."""
    if torch.compiler.is_compiling():  # a compiled graph never re-runs the forward inside the backward
        return False
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


class _InputPasses:
    """What the input binarizers read from one input tensor: its sum of |x|, for factored layers its sign by dtype,
    and for continuous inputs the clipped tensor by clip (`_SharedClip`). Sibling layers fed the same tensor (a
    block's query, key and value projections) reuse them instead of reading it again (docs/design.md, "Fused passes
    (CPU)"). Valid while the tensor is the same object at the same version and data pointer, under the same fused
    passes; emptied when the tensor is freed, or when the next layer's input is another tensor."""

    __slots__ = ("ref", "key", "sum", "signs", "clips")

    def __init__(self, u: torch.Tensor) -> None:
        self.ref = weakref.ref(u, self.release)
        self.key = _input_key(u)
        self.sum: torch.Tensor | None = None
        self.signs: dict[torch.dtype, torch.Tensor] = {}
        self.clips: dict[tuple, _SharedClip] = {}

    def release(self, _ref: weakref.ref | None = None) -> None:
        self.sum, self.signs, self.clips = None, {}, {}

    def holds(self, u: torch.Tensor) -> bool:
        return self.ref() is u and self.key == _input_key(u)


def _input_key(u: torch.Tensor) -> tuple:
    return (u._version, u.data_ptr(), id(fused_ops()))


class _LastInput(threading.local):
    passes: _InputPasses | None = None


_last_input = _LastInput()


def _trackable(u: torch.Tensor) -> bool:
    """Whether `u`'s identity, version and holders can be followed: not a tensor subclass, not an inference tensor
    (no version counter), not under `torch.compile`."""
    return not torch.compiler.is_compiling() and type(u) is torch.Tensor and not u.is_inference()


def _input_passes(u: torch.Tensor) -> _InputPasses | None:
    """The shared passes of input `u` (a fresh record if the last one was another tensor's), or None where `u`
    cannot be tracked (`_trackable`)."""
    if not _trackable(u):
        return None
    passes = _last_input.passes
    if passes is None or not passes.holds(u):
        if passes is not None:  # what it holds is not read again: let it go with the layers that saved it
            passes.release()
        passes = _last_input.passes = _InputPasses(u)
    return passes


def _shared_abs_sum(u: torch.Tensor) -> torch.Tensor:
    """`abs_sum(u)`, computed once for the layers that read the same input one after the other."""
    passes = _input_passes(u)
    if passes is None:
        return abs_sum(u)
    if passes.sum is None:
        passes.sum = abs_sum(u)
    return passes.sum


def _shared_sign_and_abs_sum(u: torch.Tensor, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`sign_and_abs_sum(u, dtype)`, the sign shared between the layers that read the same input: only for callers
    that never write into it nor hand it on as an autograd output (the factored form's operand)."""
    passes = _input_passes(u)
    if passes is None:
        return sign_and_abs_sum(u, dtype)
    key = u.dtype if dtype is None else dtype
    sign = passes.signs.get(key)
    if sign is None:
        if passes.sum is None:
            sign, passes.sum = sign_and_abs_sum(u, dtype)
        else:  # the sum without the sign was read already (a layer that wrote no sign)
            sign = scaled_sign(u, None, key)  # the sign alone, in one pass where a fused one applies
        passes.signs[key] = sign
    return sign, passes.sum


class _SharedClip(NamedTuple):
    """A continuous input's clipped tensor (an autograd output) and its recipe, handed to each sibling layer that
    clips the same input to the same bound: one clip in the forward, one window pass in the backward over the sum of
    the siblings' gradients (autograd adds them first, as it adds a full-precision model's gradients of the shared
    input), one recompute for the siblings' weight gradients (`SharedRecompute`)."""

    out: torch.Tensor
    version: int
    recipe: Callable[[], torch.Tensor] | None


def _clip_key(rule: str, bound: torch.Tensor | float, owned_grad: bool) -> tuple | None:
    """What makes two continuous binarizations of one input the same tensor: the clip bound's value (bit for bit:
    siblings' betas are equal when they have seen the same inputs from the same start, as a block's projections
    have) and the gradient ownership; None where the bound is not a number on the host."""
    if isinstance(bound, torch.Tensor):
        if bound.numel() != 1 or not bound.is_cpu:
            return None
        value = (bound.dtype, bound.item())
    else:
        value = (None, float(bound))
    return (rule, value, owned_grad)


class Binarizer(nn.Module):
    """Binarizes one tensor (a weight, or a layer's input) under its `MaskState`.

    Args:
        rule: 'stompp', 'stompp_ste' or 'ste'.
        kind: 'weight' (smooth = identity, straight-through gradient the identity as in BinaryConnect, optional
            per-output-channel scale) or 'input' (smooth = clip, straight-through gradient the clipped identity
            `1{|x| <= c}` as in BinaryNet, optional per-tensor scale beta kept as the buffer `scale`).
        scale_mode: 'channel' / 'none' for weights, 'tensor' / 'none' for inputs.
        shape: the mask shape: the weight's shape, or the per-sample input shape (None: set on first forward).
        clip: inputs only: the clip bound in units of the scale (`StoMPPConfig.activation_clip`).
    """

    #: A continuous input keeps its clip for the backward instead of the input (`KeptClip`), until the input turns
    #: out to be held by something else too; from then on the backward recomputes the clip. A class default, so
    #: that a module pickled before the attribute existed loads with it.
    keep_clip: bool = True

    def __init__(
        self, rule: str, kind: str, scale_mode: str, shape: tuple[int, ...] | None = None, clip: float = 1.0
    ) -> None:
        super().__init__()
        self.rule = rule
        self.clip = clip
        self.kind = kind
        self.scale_mode = scale_mode
        self.mask = self._new_mask(shape) if shape is not None else None
        # Set by `binarized(model)`: evaluate as if every entry were frozen, without touching any state.
        self.force_frozen = False
        # Set by `ProgressionController`; a progressive tensor trained without one never advances its mask.
        self.controlled = False
        #: The stage this tensor belongs to (stages numbered in forward order from 0), set at conversion.
        self.stage = 0
        #: `(step, total_steps)` of the progression that last moved the mask, set by `ProgressionController`;
        #: (-1, -1) when none did. Saved with the mask in every state dict (`get_extra_state`).
        self.progress: tuple[int, int] = (-1, -1)
        #: What the last `load_state_dict` read for this tensor, `LoadedMask`, until a resume check consumes it.
        self.loaded: LoadedMask | None = None
        self._register_load_state_dict_pre_hook(_default_mask_state, with_module=True)
        if kind == "input" and scale_mode == "tensor":
            self.register_buffer("scale", torch.zeros((), dtype=torch.float32))
        else:
            self.scale = None

    def _input_shared(self) -> None:
        self.keep_clip = False

    def extra_repr(self) -> str:
        clip = f", clip={self.clip}" if self.kind == "input" and self.clip != 1.0 else ""
        return f"rule={self.rule!r}, kind={self.kind!r}, scale={self.scale_mode!r}{clip}"

    @property
    def progressive(self) -> bool:
        return self.rule in ("stompp", "stompp_ste")

    def _new_mask(self, shape: tuple[int, ...]) -> MaskState:
        mask = MaskState(shape)
        mask.fill(self.rule == "ste")  # plain STE is hard sign from step 0; progressive rules start continuous
        return mask

    def weight_scale(self, w: torch.Tensor) -> torch.Tensor | float:
        """alpha: the per-output-channel mean |W| (`'channel'`), or 1."""
        if self.scale_mode == "channel":
            return w.detach().abs().mean(dim=tuple(range(1, w.ndim)), keepdim=True)
        return 1.0

    def ensure_mask(self, feature_shape: tuple[int, ...]) -> MaskState:
        if self.mask is None:
            self.mask = self._new_mask(feature_shape)
        elif self.mask.shape != tuple(feature_shape):
            raise ValueError(
                f"Binarized input has per-sample shape {tuple(feature_shape)} but this layer's input mask was "
                f"sized {self.mask.shape}; StoMPP input masks need a fixed input size."
            )
        return self.mask

    def _input_scale(self, x: torch.Tensor, batch_sum: torch.Tensor | None = None) -> torch.Tensor:
        """beta: the running mean of |x|, updated in training (not under `binarized`), initialised on first use.

        A forward run inside a backward pass is a gradient-checkpointing recomputation: it reuses the beta of the
        original forward instead of updating it a second time (which would also make the recomputed forward
        differ from the original one).

        The result is never the buffer itself: autograd saves beta (as a clip bound, an output scale) and recipes
        close over it, and the next training forward updates the buffer in place, which would break (or silently
        change) the backward of a forward run before it, as in two forwards then one backward.

        `batch_sum` is `abs_sum(x)` when the caller has it already (`sign_and_abs_sum`).
        """
        batch = (_shared_abs_sum(x) if batch_sum is None else batch_sum) / x.numel()  # mean |x|, summed in float32
        if self.training and not self.force_frozen and not _in_backward():
            with torch.no_grad():
                ema = (1 - ACTIVATION_SCALE_MOMENTUM) * self.scale + ACTIVATION_SCALE_MOMENTUM * batch
                beta = torch.where(self.scale > 0, ema, batch)
                self.scale.copy_(beta)
            return beta.to(x.dtype)
        return torch.where(self.scale > 0, self.scale, batch).to(x.dtype)

    @property
    def frozen(self) -> bool:
        """This forward takes the all-frozen path: plain STE, `binarized(model)`, or a finished stage (whose mask is
        the constant True; a transitioning mask stays a tensor even if every entry happens to be drawn frozen).

        Under `torch.compile` a finished stage does not count: the compiled graph must not depend on the mask state,
        which `state_binarize` reads when it runs (docs/design.md, "torch.compile")."""
        return self.is_frozen(torch.compiler.is_compiling())

    def is_frozen(self, compiling: bool) -> bool:
        """`frozen`, for a caller that knows whether this forward is being compiled (`torch.compiler.is_compiling`)."""
        return (
            self.force_frozen
            or self.rule == "ste"
            or (not compiling and self.mask is not None and self.mask.value is True)
        )

    @property
    def frozen_fraction(self) -> float:
        """The fraction of entries frozen to sign (1 for plain STE; 0 for an input mask not sized yet)."""
        if self.rule == "ste":
            return 1.0
        return self.mask.frozen_fraction if self.mask is not None else 0.0

    @property
    def committed(self) -> bool:
        """Every entry is frozen to sign (whatever `binarized` forces): the tensor can be packed."""
        return self.frozen_fraction == 1.0

    def _scale_and_bound(
        self, u: torch.Tensor, feature_ndim: int | None, batch_sum: torch.Tensor | None = None
    ) -> tuple[MaskState, torch.Tensor | float, torch.Tensor | float | None]:
        """`(mask state, scale, clip bound)`. A weight has no clip bound (None): its straight-through gradient is
        BinaryConnect's identity, and its latent values are clipped to [-1, 1] by the controller instead.
        `batch_sum`: `abs_sum(u)` of an input, when the caller has it already."""
        if self.training and self.progressive and not self.controlled:
            warnings.warn(
                "A StoMPP model is being trained without a StoMPPCallback (or ProgressionController): its masks "
                "never advance, so it trains fully continuous and never becomes binary. Pass "
                "`callbacks=[StoMPPCallback()]` to `Trainer`.",
                UserWarning,
                stacklevel=3,
            )
        if self.kind == "input":
            mask_state = self.ensure_mask(tuple(u.shape[-feature_ndim:]))
            scale = self._input_scale(u, batch_sum) if self.scale is not None else 1.0
            return mask_state, scale, scale * self.clip if self.clip != 1.0 else scale
        if (
            not torch.compiler.is_compiling()  # first: a compiled graph must not depend on the mask state
            and self.mask is not None
            and self.mask.value is False
            and not self.force_frozen
            and self.rule != "ste"
        ):
            return self.mask, 1.0, None  # a continuous weight is itself: no scale multiplies anything
        return self.mask, self.weight_scale(u), None

    def forward(self, u: torch.Tensor, feature_ndim: int | None = None) -> torch.Tensor:
        return self.binarize(u, feature_ndim)[0]

    def binarize(
        self,
        u: torch.Tensor,
        feature_ndim: int | None = None,
        factored: bool = False,
        recompute: bool = True,
        owned_grad: bool = False,
        operand_dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | float | None, Callable[[], torch.Tensor] | None]:
        """`(binarized u, output scale, recompute)`: what a layer's forward needs from this binarizer.

        With `factored` (only for a `frozen` tensor) the result is `sign(u)` in {-1, +1} with this rule's gradient
        and the scale is returned for the caller to apply to the layer output (`forward(u) == scale * result`);
        otherwise the result is `forward(u)` and the scale None. `recompute()` rebuilds the result bit for bit from
        `u` (None where the result is `u` itself, or the tensor is mid-transition), so the layer can let its op
        save `u`, which it shares with other layers or keeps anyway, instead of a second activation-sized copy; for
        a continuous input that nothing else holds it gives the result itself, kept instead of `u` (`KeptClip`).
        Pass `recompute=False` when no backward can use it (the caller knows that nothing needs a gradient): no
        recipe is built then, and none is ever built with grad disabled (`no_grad`, `inference_mode`).
        `owned_grad`: the result feeds only the caller's op, so the backward may overwrite the gradient it receives
        (`core.functional.hard_sign`). `operand_dtype`: the dtype that op casts its operand to under autocast; a
        continuous or transitioning input is then written straight into it (one pass instead of the binarization's
        and the op's cast, and its backward widens the op's gradient in the window's pass), and the op keeps that
        operand for its backward as it keeps its own cast (no recipe). None, and for a frozen input (whose sign the
        frozen linear node writes in that dtype, `frozen_sign`): `u`'s dtype.

        A continuous input of `u`'s own dtype, with a graph, is the same tensor (and recipe) for sibling binarizers
        that clip the same `u` to the same bound one after the other (`_SharedClip`).
        """
        compiling = torch.compiler.is_compiling()
        frozen = self.is_frozen(compiling)
        recompute = recompute and torch.is_grad_enabled()
        if frozen:
            sign, scale, bound = self.frozen_sign(u, feature_ndim)
            out = hard_sign(
                u,
                ste=self.rule != "stompp",
                scale=scale,
                bound=bound,
                factored=factored,
                sign=sign,
                owned_grad=owned_grad,
            )
            # the same values without the straight-through graph
            recipe = _recipe(u, lambda: hard_sign(u, ste=False, scale=scale, factored=factored)) if recompute else None
            return out, scale if factored else None, recipe
        if factored:
            raise ValueError("`factored` binarization needs a frozen tensor.")
        mask_state, scale, bound = self._scale_and_bound(u, feature_ndim)
        if compiling and compiles_by_state(u):
            # one graph for every mask state: the operator reads the state when it runs, not when it is traced
            return self._by_state(u, mask_state, scale, bound, None), None, None
        mask = mask_state.as_mask()
        cast = operand_dtype if self.kind == "input" and operand_dtype != u.dtype else None
        # a continuous input clipped in its own dtype: what a recipe can rebuild, and what siblings may share
        clipped = mask is False and self.kind == "input" and cast is None
        shared = key = None
        if clipped and u.requires_grad and torch.is_grad_enabled():
            # a continuous input with a graph: siblings fed the same input share its clip (`_SharedClip`). Not an
            # autocast operand: autograd would add the siblings' bfloat16 gradients in bfloat16, where a
            # full-precision model adds them in float32 after each op's cast back
            shared = _input_passes(u)
            key = _clip_key(self.rule, bound, owned_grad) if shared is not None else None
            hit = shared.clips.get(key) if key is not None else None
            if hit is not None and hit.out._version == hit.version and (hit.recipe is not None or not recompute):
                return hit.out, None, hit.recipe if recompute else None
        out = masked_binarize(
            u,
            mask,
            rule=self.rule,
            scale=scale,
            bound=bound,
            clip_smooth=self.kind == "input",
            owned_grad=owned_grad,
            dtype=cast,
        )
        recipe = None
        if recompute and clipped:
            b = torch.as_tensor(bound, dtype=u.dtype, device=u.device).detach()

            def make(v: torch.Tensor) -> Callable[[], torch.Tensor] | None:
                return _recipe(v, lambda: clamp_to(v.detach(), b))

            settle_unsettled()  # clips kept before this one whose input something has saved since
            if self.keep_clip and _trackable(u) and not co_held(u):
                recipe = KeptClip(out, u, make, self._input_shared, _in_backward)
            else:
                recipe = make(u)
                if key is not None and recipe is not None:
                    recipe = SharedRecompute(recipe)
        if key is not None and (recipe is not None or not recompute):
            shared.clips[key] = _SharedClip(out, out._version, recipe)
        return out, None, recipe

    def frozen_sign(
        self,
        u: torch.Tensor,
        feature_ndim: int | None = None,
        dtype: torch.dtype | None = None,
        sign: bool = True,
        shared: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | float, torch.Tensor | float | None]:
        """`(sign(u) or None, scale, clip bound)` of a frozen tensor, the scale updated as by `binarize`. The sign
        (no graph, in `dtype`, None: `u`'s) comes with an input's scale, from the same read of `u` where a fused
        pass applies; None otherwise (`binary_sign(u)` gives it), and always None with `sign=False` (a kernel
        reads the signs of `u` itself). `shared`: the caller only reads the sign (the factored form's operand), so
        it may be the one written for a sibling layer that read the same input (`_shared_sign_and_abs_sum`)."""
        signs = batch_sum = None
        if self.kind == "input" and self.scale is not None and sign:
            # one read of u for both where a fused pass applies
            signs, batch_sum = _shared_sign_and_abs_sum(u, dtype) if shared else sign_and_abs_sum(u, dtype)
        _, scale, bound = self._scale_and_bound(u, feature_ndim, batch_sum)
        return signs, scale, bound

    def binarize_by_state(
        self, u: torch.Tensor, feature_ndim: int | None, group: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor | float]:
        """`(binarized u, scale)` for a layer compiled with `torch.compile` (`StoMPPMixin._binary_op`): what `binarize`
        gives, chosen when the graph runs instead of when it is traced. `group` holds the mask handles of the
        layer's tensors (`layer_frozen`): once all are frozen the result is `sign(u)` and the layer multiplies its
        output by `scale` (Eq. 5), as `binarize(..., factored=True)` does in eager mode."""
        mask_state, scale, bound = self._scale_and_bound(u, feature_ndim)
        return self._by_state(u, mask_state, scale, bound, group), scale

    def _by_state(self, u, mask_state: MaskState, scale, bound, group: list[int] | None) -> torch.Tensor:
        return state_binarize(
            u,
            mask_state,
            rule=self.rule,
            scale=scale,
            bound=bound if bound is not None else 1.0,
            clip_smooth=self.kind == "input",
            group=group,
            forced=self.force_frozen,
        )

    def get_extra_state(self) -> torch.Tensor:
        """The mask and its progression position, for the state dict (a latent checkpoint keeps both)."""
        return encode_mask_state(self.mask, *self.progress)

    def set_extra_state(self, state: torch.Tensor) -> None:
        """Restore the mask saved by `get_extra_state` and remember it in `loaded` (for resume checks).

        Raises:
            ValueError: when the saved mask does not fit this tensor (another model or config).
        """
        code, mask, step, total, numel = decode_mask_state(state)
        if code == ABSENT:
            return
        if code == UNSIZED:
            self.loaded = LoadedMask(code, None, step, total)
            return
        if self.mask is None:
            if code == TRANSITIONING:
                raise ValueError("The checkpoint holds a transitioning mask for an input whose size is not known yet.")
        elif self.mask.numel != numel:
            raise ValueError(
                f"The checkpoint's mask has {numel} entries, but this tensor's mask has {self.mask.numel} "
                f"(shape {self.mask.shape}): the checkpoint was written for another model."
            )
        elif code == TRANSITIONING:
            mask = mask.reshape(self.mask.shape)
            self.mask.value = mask
        else:
            self.mask.fill(code == FROZEN)
        self.progress = (step, total)
        self.loaded = LoadedMask(code, mask, step, total)


class LoadedMask(NamedTuple):
    """A mask state read from a checkpoint: its code (`core.masks`), the bool mask when transitioning, and the
    progression position `(step, total_steps)` it was saved at."""

    code: int
    mask: torch.Tensor | None
    step: int
    total_steps: int


def _default_mask_state(module: Binarizer, state_dict, prefix, *args) -> None:
    """`load_state_dict` pre-hook: a checkpoint without masks (full precision, or written before masks were
    saved) loads as "absent", which changes nothing, instead of failing a strict load."""
    state_dict.setdefault(prefix + "_extra_state", absent_mask_state())


def _recipe(u: torch.Tensor, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor] | None:
    """`fn`, guarded like a tensor autograd saved: it raises if `u` was modified in place before the backward.

    None for an inference tensor (made under `torch.inference_mode()`), which has no version counter to guard it
    and which autograd could not save either: the layer's op then saves its binarized operand as it is.
    """
    if u.is_inference():
        return None
    version = u._version

    def recompute() -> torch.Tensor:
        if u._version != version:
            raise inplace_error(u._version, version)
        return fn()

    return recompute
