"""`StoMPPConfig`: every StoMPP training option, validated at construction (docs/design.md, "Configuration")."""

from __future__ import annotations

import copy
import math
import numbers
import re
from collections.abc import Iterable, Iterator
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
#: Accepted `activation_clip` (inclusive): the clip bound / STE window `c = activation_clip * beta`, in units of the
#: activation scale beta (the mean |x|). Below 1e-3 the window holds almost no input (the continuous path is ~0 and
#: the STE passes no gradient); above 1e3 no input reaches it, so it clips nothing (use 1e3 for "no clip").
ACTIVATION_CLIP_RANGE = (1e-3, 1e3)


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

    Every field is validated at construction, by `from_dict` (overrides included) and on assignment after
    construction (`config.refresh_rate = 0` raises); an invalid value raises a `ValueError` naming the field.
    Cross-field rules are checked on each assignment, so change dependent fields together with
    `dataclasses.replace(config, policy="deterministic", activations=None)`.
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
        default=100,
        metadata={
            "help": "r (an int >= 1): every optimizer step re-draws floor(n / r) entries of a mask; a tensor with "
            "fewer than r entries never refreshes (ProgressionController warns)."
        },
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
            "paper's clip(-1, 1); a pretrained transformer keeps its function only with a bound that never acts "
            "(1000, the recipes' choice: docs/design.md, 'The continuous proxy of a pretrained transformer'). "
            "A finite number in [1e-3, 1e3]: a narrower window passes no gradient, a wider one never clips."
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
        object.__setattr__(self, "_validated", True)  # from now on every field assignment is validated

    def post_init(self) -> None:
        """Validate every field; raise a `ValueError` naming the field, the accepted values and the value received.

        Numbers are normalized (`refresh_rate` / `seed` to int, `activation_clip` / `surge_eta` to float) and
        `modules_to_not_convert` to a list.
        """
        for name in _FIELD_ORDER:
            object.__setattr__(self, name, _check_field(name, getattr(self, name)))
        _check_combinations(self)

    def __setattr__(self, name: str, value: Any) -> None:
        """Assigning a field after construction validates it (and the cross-field rules it takes part in), as
        construction does; a rejected value leaves the old one in place. Other attributes are not checked."""
        if name not in _FIELD_ORDER or not self.__dict__.get("_validated", False):
            object.__setattr__(self, name, value)
            return
        old = getattr(self, name)
        object.__setattr__(self, name, _check_field(name, value))
        try:
            _check_combinations(self)
        except ValueError:
            object.__setattr__(self, name, old)
            raise

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        """The fields and their values (the base class iterates `__dict__`, which holds bookkeeping too)."""
        yield from self.to_dict().items()

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
        """The config of `config_dict` with the fields among `kwargs` overriding it, validated as one config (so
        cross-field overrides may come in any order); the other `kwargs` are returned as unused when
        `return_unused_kwargs`.

        Raises:
            ValueError: for a key of `config_dict` that is not a field, or an invalid value.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config_dict) - known)
        if unknown:
            raise ValueError(f"Unknown StoMPPConfig field(s) {unknown}; accepted fields are {sorted(known)}.")
        overrides = {k: v for k, v in kwargs.items() if k in known}
        unused = {k: v for k, v in kwargs.items() if k not in known}
        config = cls(**{**config_dict, **overrides})
        return (config, unused) if return_unused_kwargs else config


_FIELD_ORDER = tuple(f.name for f in fields(StoMPPConfig))
_CHOICES_CHECKED = frozenset(field_choices())


def _check_field(name: str, value: Any) -> Any:
    """`value` normalized for field `name`; raise a `ValueError` naming the field if it is not valid on its own."""
    if name in _CHOICES_CHECKED:
        choices = field_choices()[name]
        if value not in choices:
            raise ValueError(f"`{name}` must be one of {_fmt(choices)}, but got {value!r}.")
        return value
    if name == "quant_method":
        if value != "stompp":
            raise ValueError(f"`quant_method` must be 'stompp', but got {value!r}.")
        return value
    if name == "refresh_rate":
        if not _is_int(value) or value < 1:
            raise ValueError(f"`refresh_rate` must be an int >= 1, but got {value!r}.")
        return int(value)
    if name == "seed":
        if not _is_int(value):
            raise ValueError(f"`seed` must be an int, but got {value!r}.")
        return int(value)
    if name == "activation_clip":
        if not _is_number(value) or not value > 0:
            raise ValueError(f"`activation_clip` must be a number > 0, but got {value!r}.")
        if not ACTIVATION_CLIP_RANGE[0] <= value <= ACTIVATION_CLIP_RANGE[1]:
            low, high = ACTIVATION_CLIP_RANGE
            raise ValueError(
                f"`activation_clip` must be a finite number in [{low:g}, {high:g}]: it is the clip bound and STE "
                f"window in units of beta, and below {low:g} the window passes almost no input and no gradient, "
                f"while above {high:g} no input reaches it (it clips nothing); but got {value!r}."
            )
        return float(value)
    if name == "surge_eta":
        if not _is_number(value) or not value > 0:
            raise ValueError(f"`surge_eta` must be a number > 0, but got {value!r}.")
        if not math.isfinite(value):
            raise ValueError(f"`surge_eta` must be a finite number > 0, but got {value!r}.")
        return float(value)
    if name == "packed":
        if not isinstance(value, bool):
            raise ValueError(f"`packed` must be a bool, but got {value!r}.")
        return value
    if name == "modules_to_not_convert":
        if value is None:
            return None
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            raise ValueError(
                f"`modules_to_not_convert` must be a list of module names / patterns or None, but got {value!r}."
            )
        patterns = list(value)
        if not all(isinstance(m, str) for m in patterns):
            raise ValueError(
                f"`modules_to_not_convert` must be a list of module names / patterns or None, but got {value!r}."
            )
        for pattern in patterns:
            check_pattern(pattern)
        return patterns
    raise AssertionError(f"no validation for field {name!r}")


def check_pattern(pattern: str) -> None:
    """Raise a `ValueError` naming `pattern` and the regex error if it is not a valid regular expression.

    Every `modules_to_not_convert` entry is matched both as a name and as a regex (`conversion.name_matches`), so one
    that does not compile would otherwise never match as intended.
    """
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(
            f"`modules_to_not_convert` pattern {pattern!r} is not a valid regular expression ({e}); escape it "
            "(`re.escape`) to match a name literally."
        ) from None


def _check_combinations(config: StoMPPConfig) -> None:
    """Raise a `ValueError` if valid fields do not go together."""
    if config.weights is None and config.activations is None:
        raise ValueError(
            "`weights` and `activations` cannot both be None: at least one tensor must be binarized, "
            "but got weights=None, activations=None."
        )
    if config.policy == "deterministic" and config.activations is not None:
        raise ValueError(
            "`policy` 'deterministic' is only valid for binary-weight networks (`activations=None`), "
            f"but got activations={config.activations!r}."
        )
    if config.policy == "deterministic" and config.weights not in ("stompp", "stompp_ste"):
        raise ValueError(
            "`policy` 'deterministic' needs a progressive weight rule ('stompp' or 'stompp_ste'), "
            f"but got weights={config.weights!r}."
        )


def _is_int(value: Any) -> bool:
    """An integer (Python or numpy), not a bool, not a float with an integral value."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
