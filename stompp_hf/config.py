"""`StoMPPConfig`: every StoMPP training option, validated at construction (docs/design.md, "Configuration")."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .core.functional import RULES
from .core.packing import EXPORT_DTYPES
from .core.schedules import ORDERS, SCHEDULES

# Accepted values of the fields that name a choice. Choices implemented by a registry are read from it at validation
# time (a schedule registered with `register_schedule` is accepted from then on); the rest are defined here, once.
POLICIES = ("stochastic", "deterministic")
GRANULARITIES = ("layer", "block", "module", None)
ACTIVATION_SITES = ("activation", "input", None)
WEIGHT_SCALES = ("channel", "none")
ACTIVATION_SCALES = ("tensor", "none")
COMPENSATIONS = (None, "surge")


def field_choices() -> dict[str, tuple]:
    """The accepted values of every choice field of `StoMPPConfig`, from the registries that implement them."""
    rules = (*RULES, None)
    return {
        "weights": rules,
        "activations": rules,
        "schedule": tuple(SCHEDULES),
        "order": ORDERS,
        "policy": POLICIES,
        "granularity": GRANULARITIES,
        "activation_sites": ACTIVATION_SITES,
        "weight_scale": WEIGHT_SCALES,
        "activation_scale": ACTIVATION_SCALES,
        "compensation": COMPENSATIONS,
        "export_dtype": (None, *EXPORT_DTYPES),
    }


def _fmt(values: tuple) -> str:
    return ", ".join(repr(v) for v in values)


@dataclass
class StoMPPConfig(QuantizationConfigMixin):
    """Configuration of StoMPP binarized training.

    Pass it to `from_pretrained(..., quantization_config=StoMPPConfig())` or to `prepare_model`. Every binarized
    tensor `u` is computed as `M * scale * sign(u) + (1 - M) * smooth(u)` with a boolean mask `M` that a
    `StoMPPCallback` (or `ProgressionController`) advances stage by stage over training.
    """

    weights: str | None = field(
        default="stompp",
        metadata={"help": "Training rule for weights: 'stompp', 'stompp_ste', 'ste' or None (full precision)."},
    )
    activations: str | None = field(
        default="stompp",
        metadata={"help": "Training rule for the inputs of binarized layers; None keeps them full precision (a BWN)."},
    )
    schedule: str = field(default="cubic", metadata={"help": "Shape of the frozen fraction p(tau) within a stage."})
    refresh_rate: int = field(
        default=100, metadata={"help": "r: every optimizer step re-draws floor(n / r) entries of a mask."}
    )
    order: str = field(
        default="forward",
        metadata={"help": "Stage order: 'forward' (input to output), 'reverse', or 'global' (all at once)."},
    )
    policy: str = field(
        default="stochastic",
        metadata={
            "help": "'stochastic' draws masks from Bernoulli(p); 'deterministic' freezes the p-fraction of weights "
            "closest to +-scale (weights only, so `activations` must be None)."
        },
    )
    granularity: str | None = field(
        default=None,
        metadata={
            "help": "What one stage is: 'layer' (every weight tensor and every activation its own stage, in execution "
            "order: the paper's Algorithm 2), 'block' (an encoder layer, a residual block) or 'module' (one layer, "
            "weight and input together). None: the model's default ('layer' for timm CNNs, 'block' otherwise)."
        },
    )
    activation_sites: str | None = field(
        default=None,
        metadata={
            "help": "Where activations are binarized: 'activation' (the paper's BNN: every activation function "
            "feeding binarized layers or their residual stream, the post-addition one included, becomes a StoMPP "
            "activation, so a frozen one blocks all upstream gradient) or 'input' (each binarized layer binarizes its "
            "own input; the residual stream stays real, Bi-Real style). None: the model's default ('activation' for "
            "vanilla timm CNNs whose binarized layers all read an activation, 'input' otherwise)."
        },
    )
    weight_scale: str = field(
        default="channel",
        metadata={"help": "'channel' multiplies sign(W) by the per-output-channel mean |W|; 'none' uses +-1."},
    )
    activation_scale: str = field(
        default="tensor",
        metadata={
            "help": "'tensor' binarizes inputs to beta * sign(x) with beta a running mean of |x| (a buffer); "
            "'none' uses +-1 and clips at 1."
        },
    )
    activation_clip: float = field(
        default=1.0,
        metadata={
            "help": "Clip bound of the continuous input path and of the STE window, in units of beta (of 1 with "
            "activation_scale='none'): smooth(x) = clamp(x, -c, c) with c = activation_clip * beta. 1.0 is the "
            "paper's clip(-1, 1); pretrained transformers keep their function only with a wider bound (~3-4)."
        },
    )
    compensation: str | None = field(
        default=None,
        metadata={
            "help": "None, or 'surge' for the SURGE dual-path gradient compensator: a full-precision auxiliary "
            "weight per binarized layer whose input gradient, scaled by the adaptive gradient scaler, is added to "
            "the binary branch's in training (the forward value and the exported model are unchanged)."
        },
    )
    surge_eta: float = field(
        default=0.5,
        metadata={
            "help": "SURGE's eta: lambda = eta * ||g_b|| / (||g_a|| + 1e-8) per layer and step, so the compensation "
            "added to the input gradient has eta times the norm of the binary branch's gradient."
        },
    )
    modules_to_not_convert: list[str] | None = field(
        default=None,
        metadata={
            "help": "Module names or regular expressions kept in full precision. None uses model-aware defaults "
            "(classifier / output head, `_keep_in_fp32_modules`; for plain modules the first and last layer)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seeds every mask draw; identical on all distributed ranks."})
    export_dtype: str | None = field(
        default=None,
        metadata={
            "help": "dtype of the full-precision remainder (embeddings, norms, head, per-channel weight scales) in "
            "a packed checkpoint: 'float32', 'float16', 'bfloat16', or None to keep the training dtype."
        },
    )
    packed: bool = field(
        default=False,
        metadata={
            "help": "Written by `save_pretrained`, not a training option: True when the checkpoint holds packed "
            "1-bit weights (loaded as BinaryLinear / BinaryConv2d), False when it holds latent weights."
        },
    )
    quant_method: str = field(default="stompp", metadata={"help": "Always 'stompp'."})

    def __post_init__(self) -> None:
        self.post_init()

    def post_init(self) -> None:
        """Validate every field; raise a `ValueError` naming the field, the accepted values and the value received."""
        for name, choices in field_choices().items():
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"`{name}` must be one of {_fmt(choices)}, but got {value!r}.")
        if self.quant_method != "stompp":
            raise ValueError(f"`quant_method` must be 'stompp', but got {self.quant_method!r}.")
        if isinstance(self.refresh_rate, bool) or not isinstance(self.refresh_rate, int) or self.refresh_rate < 1:
            raise ValueError(f"`refresh_rate` must be an int >= 1, but got {self.refresh_rate!r}.")
        if (
            isinstance(self.activation_clip, bool)
            or not isinstance(self.activation_clip, (int, float))
            or not self.activation_clip > 0
        ):
            raise ValueError(f"`activation_clip` must be a number > 0, but got {self.activation_clip!r}.")
        self.activation_clip = float(self.activation_clip)
        if isinstance(self.surge_eta, bool) or not isinstance(self.surge_eta, (int, float)) or not self.surge_eta > 0:
            raise ValueError(f"`surge_eta` must be a number > 0, but got {self.surge_eta!r}.")
        self.surge_eta = float(self.surge_eta)
        if not isinstance(self.packed, bool):
            raise ValueError(f"`packed` must be a bool, but got {self.packed!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"`seed` must be an int, but got {self.seed!r}.")
        if self.weights is None and self.activations is None:
            raise ValueError(
                "`weights` and `activations` cannot both be None: at least one tensor must be binarized, "
                "but got weights=None, activations=None."
            )
        if self.policy == "deterministic" and self.activations is not None:
            raise ValueError(
                "`policy` 'deterministic' is only valid for binary-weight networks (`activations=None`), "
                f"but got activations={self.activations!r}."
            )
        if self.policy == "deterministic" and self.weights not in ("stompp", "stompp_ste"):
            raise ValueError(
                "`policy` 'deterministic' needs a progressive weight rule ('stompp' or 'stompp_ste'), "
                f"but got weights={self.weights!r}."
            )
        if self.modules_to_not_convert is not None:
            if isinstance(self.modules_to_not_convert, str) or not all(
                isinstance(m, str) for m in self.modules_to_not_convert
            ):
                raise ValueError(
                    "`modules_to_not_convert` must be a list of module names / patterns or None, "
                    f"but got {self.modules_to_not_convert!r}."
                )
            self.modules_to_not_convert = list(self.modules_to_not_convert)

    @property
    def progressive(self) -> bool:
        """Whether any tensor follows a progressive (masked) rule and so needs a schedule."""
        return "stompp" in (self.weights, self.activations) or "stompp_ste" in (self.weights, self.activations)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}

    def to_diff_dict(self) -> dict[str, Any]:
        defaults = StoMPPConfig()
        diff = {k: v for k, v in self.to_dict().items() if v != getattr(defaults, k)}
        diff["quant_method"] = self.quant_method
        return diff

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config_dict) - known)
        if unknown:
            raise ValueError(f"Unknown StoMPPConfig field(s) {unknown}; accepted fields are {sorted(known)}.")
        return super().from_dict(dict(config_dict), return_unused_kwargs=return_unused_kwargs, **kwargs)
