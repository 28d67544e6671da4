"""Packed 1-bit inference modules `BinaryLinear` / `BinaryConv2d`.

They hold a fully binarized layer as 1-bit packed weights (`weight`, uint8, 8 signs per byte) plus the
per-output-channel scale (`weight_scale`) and the activation scale (`input_scale`), and compute exactly what the
frozen training module computes (same sign convention, same operations in the same order), so logits match the
trained model bit for bit.

The packed signs live under the layer's own `weight` key, shaped `[out, ceil(K / 8)]`: a loader that does not know
StoMPP (plain Transformers, `pipeline`, sentence-transformers, timm) then fails with a size mismatch instead of
loading random full-precision weights (docs/design.md, "Export"). Checkpoints of the earlier layout, which stored
them as `weight_packed`, still load (`LEGACY_PACKED_KEY`).
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..core.dtensor import full_tensor
from ..core.functional import binary_sign, hard_sign, output_scale, scale_output
from ..core.packing import pack_signs, unpack_signs
from ..kernels import bconv, int8, xnor

if TYPE_CHECKING:
    from .training import StoMPPMixin

#: Why "auto" keeps a bfloat16 forward on the reference path on a CPU without the avx512 kernels.
BF16_NEEDS_AVX512 = "bfloat16 inputs need the kernels' avx512 path (the AMX one needs it too)"
_warned_bf16_fallback = False


def _note_reference_fallback(reason: str | None) -> None:
    """Warn once per process when "auto" sends bfloat16 activations to the reference path for want of the avx512
    kernels: unpacked signs through the dense bf16 op, which runs 4-9x slower than float32 on CPUs without bf16
    instructions (AVX2-only AMD EPYC, `benchmarks/results/inference_epyc_avx2.md`)."""
    global _warned_bf16_fallback
    if reason != BF16_NEEDS_AVX512 or _warned_bf16_fallback or xnor._forced is not None:
        return
    _warned_bf16_fallback = True
    warnings.warn(
        "Packed layers got bfloat16 inputs on a CPU without the kernels' avx512 path: they run the reference path "
        "(the dense bf16 op on unpacked signs). The float32 kernels run on this CPU: cast the model to float32 "
        "(`model.float()`) for the 1-bit speed.",
        UserWarning,
        stacklevel=3,
    )


#: The key under which checkpoints of stompp_hf up to 0.2.0.dev0 stored the packed signs; renamed to `weight` on load.
LEGACY_PACKED_KEY = "weight_packed"


def _rename_legacy_keys(module, state_dict, prefix, *args) -> None:
    """`load_state_dict` pre-hook: read a checkpoint of the earlier layout (`<layer>.weight_packed`)."""
    legacy = prefix + LEGACY_PACKED_KEY
    if legacy in state_dict and prefix + "weight" not in state_dict:
        state_dict[prefix + "weight"] = state_dict.pop(legacy)


class BinaryMixin:
    """Packed inference state shared by `BinaryLinear` and `BinaryConv2d`.

    Buffers (the names a packed checkpoint stores under the module's prefix):
        weight: uint8 `[out, ceil(K / 8)]`, K = prod(weight_shape[1:]); bit set = +1 (see `pack_signs`). The
            same tensor is `weight_packed`.
        weight_scale: `[out]`, the per-output-channel alpha (only with `weight_scale="channel"`).
        input_scale: scalar float32 beta (only with binarized inputs and `activation_scale="tensor"`).
    A layer whose weights stay full precision (`weights=None`, a binary-activation-only network) keeps its float
    `weight` parameter.

    Args:
        unpack_cache: keep the unpacked float weight resident after the first forward (faster, but costs the
            memory of a float copy); by default every forward unpacks and the float copy is freed.
    """

    weight_shape: tuple[int, ...]
    binary_inputs: bool
    unpack_cache: bool
    feature_ndim: int
    kernel: str

    def _init_binary(
        self,
        weight_shape: tuple[int, ...],
        *,
        bias: bool,
        binary_weights: bool,
        weight_scale: bool,
        binary_inputs: bool,
        input_scale: bool,
        unpack_cache: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        out = weight_shape[0]
        self.weight_shape = tuple(weight_shape)
        self.binary_inputs = binary_inputs
        self.unpack_cache = unpack_cache
        #: How the layer computes (`set_kernel`): "auto", "xnor", "int8" or "reference" (see its `forward`).
        self.kernel = "auto"
        #: STE window of the input binarization, in units of beta (`StoMPPConfig.activation_clip`); only used when
        #: gradients flow through the layer.
        self.input_clip = 1.0
        self._unpacked: tuple[int, torch.Tensor] | None = None
        #: The kernels' weight layouts, built on first use: name -> ((data pointer, version) of `weight`, layout).
        self._kernel_layouts: dict[str, tuple[tuple[int, int], torch.Tensor]] = {}
        self._vectors_cache: tuple | None = None  # `kernel_vectors`' last result and what it was computed from
        self._binary_weights = binary_weights
        factory = {"dtype": dtype, "device": device}
        if binary_weights:
            nbytes = (math.prod(weight_shape[1:]) + 7) // 8
            self.register_buffer("weight", torch.zeros(out, nbytes, dtype=torch.uint8, device=device))
            self.register_buffer("weight_scale", torch.ones(out, **factory) if weight_scale else None)
        else:
            self.weight = nn.Parameter(torch.empty(weight_shape, **factory), requires_grad=False)
            self.register_buffer("weight_scale", None)
        self.bias = nn.Parameter(torch.zeros(out, **factory), requires_grad=False) if bias else None
        scale = torch.ones((), dtype=torch.float32, device=device) if binary_inputs and input_scale else None
        self.register_buffer("input_scale", scale)
        self._register_load_state_dict_pre_hook(_rename_legacy_keys, with_module=True)

    @classmethod
    def flags_from_config(cls, config) -> dict[str, bool]:
        return {
            "binary_weights": config.weights is not None,
            "weight_scale": config.weight_scale == "channel",
            # at activation sites the layer reads the +-1 output of a `BinaryActivation` and binarizes nothing more
            "binary_inputs": config.activations is not None and config.activation_sites != "activation",
            "input_scale": config.activation_scale == "tensor",
        }

    @property
    def binary_weights(self) -> bool:
        return self._binary_weights

    @property
    def weight_packed(self) -> torch.Tensor | None:
        """The packed signs (the uint8 `weight` buffer), or None where weights stay full precision."""
        return self.weight if self._binary_weights else None

    @property
    def qweight(self) -> torch.Tensor:
        """The weight under the name quantization tooling (peft, GPTQ conventions) looks for to find the device of
        a quantized layer: the packed signs, or the full-precision `weight`."""
        return self.weight

    def extra_repr(self) -> str:
        return (
            f"weight_shape={self.weight_shape}, bias={self.bias is not None}, binary_weights={self.binary_weights}, "
            f"binary_inputs={self.binary_inputs}, unpack_cache={self.unpack_cache}"
        )

    def sign_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The +-1 float weight `sign(W)` (kept resident with `unpack_cache`), or the full-precision `weight`."""
        if not self._binary_weights:
            return self.weight
        dtype = dtype or torch.get_default_dtype()
        version = self.weight._version
        cached = self._unpacked
        if cached is not None and cached[0] == version and cached[1].dtype == dtype:
            return cached[1]
        weight = unpack_signs(self.weight, math.prod(self.weight_shape[1:]), dtype).reshape(self.weight_shape)
        if self.unpack_cache:
            self._unpacked = (version, weight)
        return weight

    def unpacked_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight the layer computes with: alpha * sign(W) (or +-1), or the full-precision `weight`."""
        weight = self.sign_weight(dtype)
        if not self._binary_weights or self.weight_scale is None:
            return weight
        return weight * self.weight_scale.view(-1, *([1] * (len(self.weight_shape) - 1))).to(weight.dtype)

    def binarize_input(self, x: torch.Tensor) -> torch.Tensor:
        """`sign(x)` in {-1, +1}, sign(0) = +1 exactly as in training (beta multiplies the layer output instead);
        NaN stays NaN.

        When autograd tracks `x` (e.g. LoRA adapters before this layer are training on a packed base), the same
        values come with the clipped straight-through gradient `1{|x| <= input_clip * beta}` (with respect to
        `beta * sign(x)`), so gradients reach earlier layers; the packed weights themselves never receive one.
        """
        if not self.binary_inputs:
            return x
        if x.requires_grad and torch.is_grad_enabled():
            scale = self.input_scale.to(x.dtype) if self.input_scale is not None else 1.0
            return hard_sign(x, ste=True, scale=scale, bound=scale * self.input_clip, factored=True)
        # A NaN input stays NaN (`binary_sign` alone makes it -1), so a NaN upstream shows in the outputs instead of
        # plausible numbers; the XNOR kernel raises instead. One extra pass over `x`, no device sync.
        return binary_sign(x).masked_fill_(torch.isnan(x), float("nan"))

    def output_scale(self) -> torch.Tensor | None:
        """`beta * alpha`, the factor of the layer output (see `output_scale`)."""
        return output_scale(self.input_scale, self.weight_scale, self.feature_ndim)

    def __getstate__(self) -> dict:
        # the kernels' layouts are rebuilt on first use: a pickled or deep-copied module does not carry them
        state = super().__getstate__()
        state["_kernel_layouts"] = {}
        state["_vectors_cache"] = None
        return state

    def kernel_layout(self, name: str, build) -> torch.Tensor:
        """The weight in a kernel's own layout (`name`: "xnor" panels, "int8" matrix for `torch._int_mm`, "amx"
        tiles), built by `build()` on first use and kept until `weight` changes (a `load_state_dict`, a move): about
        the packed weight's size for the XNOR panels, 8 bits per weight for the int8 ones."""
        key = (self.weight.data_ptr(), self.weight._version)
        cached = self._kernel_layouts.get(name)
        if cached is None or cached[0] != key:
            cached = (key, build())
            self._kernel_layouts[name] = cached
        return cached[1]

    def drop_int8_layouts(self) -> None:
        """Free the int8 paths' weight layouts (8 bits per weight), e.g. once "auto" measured them slower."""
        self._kernel_layouts.pop("int8", None)
        self._kernel_layouts.pop("amx", None)

    def kernel_scale(self) -> torch.Tensor | None:
        """`output_scale()` as the kernels take it: a float32 vector over the output channels, or None."""
        scale = self.output_scale()
        if scale is None:
            return None
        return scale.reshape(-1).expand(self.weight_shape[0]) if scale.numel() == 1 else scale.reshape(-1)

    def kernel_inapplicable(self, x: torch.Tensor) -> str | None:
        """Why no kernel can compute this forward (the reasons every kernel shares), or None."""
        if torch.compiler.is_exporting() or torch.jit.is_tracing():
            return "a tracer (torch.export, torch.jit.trace) cannot see into the C kernels"
        if not self.binary_weights:
            return "the layer's weights are not binary"
        if x.device.type != "cpu" or x.dtype not in xnor.ACTIVATION_DTYPES:
            return f"the kernels take float32 or bfloat16 inputs on CPU, got {x.dtype} on {x.device.type}"
        if x.dtype == torch.bfloat16 and ("avx512" not in xnor.paths() or xnor._forced not in (None, "avx512")):
            return BF16_NEEDS_AVX512
        tracked = (x, self.bias, self.weight_scale, self.input_scale)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tracked):
            return "autograd tracks this forward and the kernels have no backward pass"
        if any(t is not None and t.dtype not in xnor.ACTIVATION_DTYPES for t in self._float_params()):
            return "the layer's scales or bias are neither float32 nor bfloat16"
        return None

    def _float_params(self) -> tuple[torch.Tensor | None, ...]:
        return (self.weight_scale, self.input_scale, self.bias)

    def kernel_vectors(self, dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`(kernel_scale(), bias)` as float32 vectors holding the values the reference path multiplies and adds
        for activations of `dtype`: cast to `dtype` first (`scale_output` casts them to the output's dtype), so a
        bfloat16 model's kernels round like its reference path.

        Kept until one of the scales or the bias is replaced or changed in place (its version counter), or the
        dtype changes: computing them costs about as much as a small kernel call."""
        params = self._float_params()
        cached = getattr(self, "_vectors_cache", None)
        if (
            cached is not None
            and cached[0] == dtype
            and all(a is b and (b is None or v == b._version) for a, v, b in zip(cached[1], cached[2], params))
        ):
            return cached[3]
        scale, bias = self.kernel_scale(), self.bias
        if dtype != torch.float32:
            scale = scale.to(dtype) if scale is not None else None
            bias = bias.to(dtype) if bias is not None else None
        vectors = tuple(t.float().contiguous() if t is not None else None for t in (scale, bias))
        self._vectors_cache = (dtype, params, tuple(p._version if p is not None else None for p in params), vectors)
        return vectors  # type: ignore[return-value]

    def _binary_forward(self, x: torch.Tensor, op) -> torch.Tensor:
        y = op(self.binarize_input(x), self.sign_weight(x.dtype), None)
        return scale_output(y, self.output_scale(), self.bias, self.feature_ndim)

    @classmethod
    def from_module(cls, module: nn.Module, config, unpack_cache: bool = False):
        """An empty packed module shaped like `module` (an `nn.Linear` / `nn.Conv2d`, on any device incl. meta)."""
        new = cls._empty_like(module, unpack_cache=unpack_cache, **cls.flags_from_config(config))
        new.input_clip = config.activation_clip
        return new

    @classmethod
    def from_stompp(cls, module: StoMPPMixin, unpack_cache: bool = False):
        """Pack a fully frozen training module: the result computes the frozen module's outputs bit for bit."""
        new = cls._empty_like(module, unpack_cache=unpack_cache, **module.binary_flags())
        if module.input_binarizer is not None:
            new.input_clip = module.input_binarizer.clip
        with torch.no_grad():
            w = full_tensor(module.weight.detach())
            if module.weight_binarizer is not None:
                new.weight.copy_(pack_signs((w >= 0).reshape(w.shape[0], -1)))
                if new.weight_scale is not None:
                    new.weight_scale.copy_(module.weight_binarizer.weight_scale(w).reshape(-1))
            else:
                new.weight.copy_(w)
            if new.bias is not None:
                new.bias.copy_(full_tensor(module.bias.detach()))
            if new.input_scale is not None:
                new.input_scale.copy_(full_tensor(module.input_binarizer.scale))
        return new


class BinaryLinear(BinaryMixin, nn.Module):
    """Packed 1-bit inference twin of `StoMPPLinear`: `linear(sign(x), sign(W)) * (beta * alpha) + b`."""

    feature_ndim = 1

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        binary_weights: bool = True,
        weight_scale: bool = True,
        binary_inputs: bool = True,
        input_scale: bool = True,
        unpack_cache: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self._init_binary(
            (out_features, in_features),
            bias=bias,
            binary_weights=binary_weights,
            weight_scale=weight_scale,
            binary_inputs=binary_inputs,
            input_scale=input_scale,
            unpack_cache=unpack_cache,
            dtype=dtype,
            device=device,
        )

    @classmethod
    def _empty_like(cls, module: nn.Linear, **kwargs) -> BinaryLinear:
        w = module.weight
        return cls(
            module.in_features, module.out_features, module.bias is not None, dtype=w.dtype, device=w.device, **kwargs
        )

    def xnor_applies(self, x: torch.Tensor) -> str | None:
        """Why the XNOR kernel (and the int8 path) cannot compute this forward, or None when it can."""
        if not (self.binary_weights and self.binary_inputs):
            return "the layer does not binarize both its weights and its inputs"
        return self.kernel_inapplicable(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`kernel` "reference": unpack and `F.linear`; "xnor": the XNOR-popcount kernel, raising where it cannot
        run; "auto": the kernel where it runs (and, on CPUs with AMX int8, the exact int8 path for the shapes where
        it measured faster: `kernels.int8.choose`), the reference path elsewhere; "int8": the int8 path where it
        runs (AMX tiles, else `torch._int_mm`), as "auto" elsewhere. All give the same bits."""
        if self.kernel != "reference":
            reason = self.xnor_applies(x)
            if reason is None and (self.kernel == "xnor" or xnor.is_available()):
                return self._kernel_forward(x)
            if self.kernel == "xnor":
                raise ValueError(f"kernel='xnor' cannot run this forward: {reason}. Use kernel='auto' to fall back.")
            _note_reference_fallback(reason)
        return self._binary_forward(x, F.linear)

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, bias = self.kernel_vectors(x.dtype)
        k = self.in_features

        def run_int8() -> torch.Tensor:
            if int8.amx_available():
                weight = self.kernel_layout("amx", lambda: int8.amx_weight(self.weight, self.out_features, k))
                return int8.amx_linear(x, weight, self.out_features, scale, bias)
            weight = self.kernel_layout("int8", lambda: int8.int8_weight(self.weight, k))
            return int8.int8_linear(x, weight, scale, bias)

        def run_xnor() -> torch.Tensor:
            prepared = None
            if "avx512" in xnor.paths():
                prepared = self.kernel_layout("xnor", lambda: xnor.prepare_weights(self.weight, self.out_features, k))
            return xnor.xnor_linear(x, self.weight, k, scale, bias, prepared=prepared)

        int8_takes_x = x.dtype == torch.float32 or int8.amx_available()  # `torch._int_mm` takes float32 only
        if self.kernel == "int8" and int8_takes_x and int8.available():
            return run_int8()
        if self.kernel == "auto" and int8_takes_x and int8.worth_measuring():
            key = (int8.bucket(x.numel() // k), self.out_features, k, x.dtype)
            choice, y = int8.choose(key, run_xnor, run_int8)
            if choice == "xnor" and not int8.chosen_anywhere():
                self.drop_int8_layouts()  # measured slower everywhere so far: free its weight
            return y
        return run_xnor()


class BinaryConv2d(BinaryMixin, nn.Module):
    """Packed 1-bit inference twin of `StoMPPConv2d`; padding is applied to the binarized input, as in training."""

    feature_ndim = 3
    #: Set when a weights-only layer met an input that is not all +-1: "auto" then keeps to the reference path.
    _inputs_not_binary = False

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        binary_weights: bool = True,
        weight_scale: bool = True,
        binary_inputs: bool = True,
        input_scale: bool = True,
        unpack_cache: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        # Reuse nn.Conv2d's argument normalisation (tuples, 'same' padding, reversed padding for padding_mode).
        ref = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, False, padding_mode, "meta"
        )
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
            setattr(self, name, getattr(ref, name))
        self.padding_mode = padding_mode
        self._reversed_padding_repeated_twice = ref._reversed_padding_repeated_twice
        self._init_binary(
            tuple(ref.weight.shape),
            bias=bias,
            binary_weights=binary_weights,
            weight_scale=weight_scale,
            binary_inputs=binary_inputs,
            input_scale=input_scale,
            unpack_cache=unpack_cache,
            dtype=dtype,
            device=device,
        )

    @classmethod
    def _empty_like(cls, module: nn.Conv2d, **kwargs) -> BinaryConv2d:
        w = module.weight
        return cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
            module.bias is not None,
            module.padding_mode,
            dtype=w.dtype,
            device=w.device,
            **kwargs,
        )

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return F.conv2d(x, weight, bias, self.stride, padding, self.dilation, self.groups)

    def conv_padding(self) -> tuple[int, int] | None:
        """The symmetric zero padding (rows, columns) the binary conv kernel applies after `padding_mode` padding
        (which `F.pad` does first, as in the reference path), or None for an asymmetric `"same"` padding."""
        if self.padding_mode != "zeros":
            return (0, 0)
        if isinstance(self.padding, str):
            left, right, top, bottom = self._reversed_padding_repeated_twice
            return (top, left) if (left, top) == (right, bottom) else None
        return tuple(self.padding)

    def conv_kernel_applies(self, x: torch.Tensor) -> str | None:
        """Why the binary conv kernel cannot compute this forward, or None when it can. A layer that binarizes
        only its weights runs it when its inputs are +-1 already (a `BinaryActivation` before it, the paper's BNN):
        the kernel checks that while it packs them."""
        reason = self.kernel_inapplicable(x)
        if reason is not None:
            return reason
        if self.conv_padding() is None:
            return "its 'same' padding is asymmetric"
        if max(self.kernel_size) > 32:
            return "its kernel is larger than 32"
        return None

    def conv_kernel_pays(self) -> bool:
        """Whether "auto" should use the kernel here: it needs the avx512 or avx2 path (or a forced one) and at
        least 1/32 of its vector lanes x bits busy, min(outputs per group, 16) x min(inputs per group, 32) >= 16
        (measured at 4 x 4 per group: about even with the dense path; depthwise (1 x 1): 4 to 8 times slower)."""
        if not {"avx512", "avx2"} & set(xnor.paths()) and xnor._forced is None:
            return False
        per_group_out, per_group_in = self.out_channels // self.groups, self.in_channels // self.groups
        return min(per_group_out, 16) * min(per_group_in, 32) >= 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`kernel` "reference": unpack and `F.conv2d`; "xnor": the binary conv kernel (`kernels.bconv`), raising
        where it cannot run; "auto": the kernel where it runs and pays (`conv_kernel_pays`), and on CPUs with AMX
        int8 the AMX int8 convolution (`kernels.int8.amx_conv2d`, groups of 1) for the shapes where it measured
        faster (`kernels.int8.choose`), the reference path elsewhere; "int8": the AMX convolution where it runs, as
        "auto" elsewhere. All give the same bits."""
        if self.kernel != "reference":
            reason = self.conv_kernel_applies(x)
            auto = xnor.is_available() and self.conv_kernel_pays() and not self._inputs_not_binary
            use = reason is None and (self.kernel == "xnor" or auto)
            if use:
                try:
                    return self._kernel_forward(x)
                except xnor.InputNotBinary:
                    if self.kernel == "xnor":
                        raise ValueError(
                            "kernel='xnor' cannot run this forward: the layer binarizes its weights only and its "
                            "inputs are not all +-1. Use kernel='auto' to fall back."
                        ) from None
                    self._inputs_not_binary = True  # "auto" stops trying for this layer
            elif self.kernel == "xnor":
                raise ValueError(f"kernel='xnor' cannot run this forward: {reason}. Use kernel='auto' to fall back.")
            else:
                _note_reference_fallback(reason)
        return self._binary_forward(x, self._conv)

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = self.conv_padding()
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
        (scale, bias), strict = self.kernel_vectors(x.dtype), not self.binary_inputs

        def run_xnor() -> torch.Tensor:
            prepared = self.kernel_layout(
                "xnor", lambda: bconv.prepare_conv2d(self.weight, self.weight_shape, self.groups)
            )
            return bconv.binary_conv2d(
                x,
                self.weight,
                self.weight_shape,
                self.stride,
                padding,
                self.dilation,
                self.groups,
                scale,
                bias,
                strict=strict,
                prepared=prepared,
            )

        def run_int8() -> torch.Tensor:
            o, c, kh, kw = self.weight_shape
            weight = self.kernel_layout("amx", lambda: int8.amx_weight(self.weight, o, c, kh * kw))
            return int8.amx_conv2d(
                x, weight, self.weight_shape, self.stride, padding, self.dilation, scale, bias, strict=strict
            )

        if self.kernel == "xnor" or self.groups != 1 or not int8.amx_available():
            return run_xnor()
        if self.kernel == "int8":
            return run_int8()
        if not int8.worth_measuring():
            return run_xnor()
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        key = (
            "conv2d",
            x.dtype,
            int8.bucket(x.shape[0]),
            *x.shape[1:],
            *self.weight_shape,
            self.stride,
            padding,
            self.dilation,
            channels_last,
        )
        choice, y = int8.choose(key, run_xnor, run_int8)
        if choice == "xnor" and not int8.chosen_anywhere():
            self.drop_int8_layouts()
        return y
