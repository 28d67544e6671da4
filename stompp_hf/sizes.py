"""`summary(model)`: parameters, bits per parameter, bytes and binarized MACs per module group, versus FP32.

Sizes are those of the model's packed 1-bit export (what `save_pretrained` writes once every tensor is frozen):
a binarized weight costs 1 bit plus its share of the per-channel scale, everything else its dtype (or the
config's `export_dtype`). For a model still in progression the table is a projection of that export.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .conversion import block_keys
from .core.packing import EXPORT_DTYPES
from .export import binarization_progress
from .nn import BinaryConv2d, BinaryLinear, BinaryMixin, StoMPPMixin
from .progression import find_config


@dataclass
class SummaryRow:
    """One module group: `params` parameters of which `binarized` are 1-bit weights, stored in `nbytes` bytes."""

    group: str
    params: int = 0
    binarized: int = 0
    nbytes: int = 0
    binary_macs: int = 0
    fp_macs: int = 0

    @property
    def bits_per_param(self) -> float:
        return 8 * self.nbytes / self.params if self.params else 0.0

    def add(self, other: SummaryRow) -> None:
        self.params += other.params
        self.binarized += other.binarized
        self.nbytes += other.nbytes
        self.binary_macs += other.binary_macs
        self.fp_macs += other.fp_macs


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1000
    raise AssertionError("unreachable")


@dataclass
class ModelSummary:
    """The table `summary` prints; `str()` gives the plain-text table, `to_markdown()` a Markdown one."""

    model_name: str
    fmt: str
    rows: list[SummaryRow]
    mac_unit: str
    total: SummaryRow = field(init=False)

    def __post_init__(self) -> None:
        self.total = SummaryRow("total")
        for row in self.rows:
            self.total.add(row)

    @property
    def fp32_bytes(self) -> int:
        return 4 * self.total.params

    @property
    def ratio(self) -> float:
        """Size of the export as a fraction of the same parameters in FP32."""
        return self.total.nbytes / self.fp32_bytes if self.fp32_bytes else 0.0

    def _cells(self) -> tuple[list[str], list[list[str]]]:
        header = [
            "group",
            "params",
            "binarized",
            "bits/param",
            "bytes",
            f"1-bit MACs/{self.mac_unit}",
            f"FP MACs/{self.mac_unit}",
        ]
        body = [
            [
                r.group,
                f"{r.params:,}",
                f"{r.binarized:,}",
                f"{r.bits_per_param:.2f}",
                _human(r.nbytes),
                f"{r.binary_macs:,}",
                f"{r.fp_macs:,}",
            ]
            for r in [*self.rows, self.total]
        ]
        return header, body

    def footer(self) -> str:
        return (
            f"{self.model_name} ({self.fmt}): {_human(self.total.nbytes)} vs {_human(self.fp32_bytes)} in FP32 "
            f"({100 * self.ratio:.1f}%, {1 / self.ratio:.1f}x smaller); "
            f"{self.total.binarized:,} of {self.total.params:,} parameters binarized."
        )

    def __str__(self) -> str:
        header, body = self._cells()
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

        def line(cells: list[str]) -> str:
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

        rule = "-" * len(line(header))
        return "\n".join([line(header), rule, *[line(r) for r in body[:-1]], rule, line(body[-1]), "", self.footer()])

    def to_markdown(self) -> str:
        header, body = self._cells()
        out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        for i, row in enumerate(body):
            cells = [f"**{c}**" for c in row] if i == len(body) - 1 else row
            out.append("| " + " | ".join(cells) + " |")
        return "\n".join(out) + "\n\n" + self.footer() + "\n"


def _nbytes(numel: int, dtype: torch.dtype, export_dtype: torch.dtype | None) -> int:
    if export_dtype is not None and dtype.is_floating_point:
        dtype = export_dtype
    return numel * dtype.itemsize


def _module_row(module: nn.Module, export_dtype: torch.dtype | None) -> tuple[int, int, int]:
    """(params, binarized weights, bytes in the packed export) of one StoMPP or packed module, own tensors only."""
    if isinstance(module, BinaryMixin):
        params = math.prod(module.weight_shape) + (module.bias.numel() if module.bias is not None else 0)
        binarized = math.prod(module.weight_shape) if module.binary_weights else 0
        nbytes = sum(_nbytes(t.numel(), t.dtype, None) for t in module.state_dict().values())
        return params, binarized, nbytes
    w = module.weight
    out_channels, k = w.shape[0], math.prod(w.shape[1:])
    params = w.numel() + (module.bias.numel() if module.bias is not None else 0)
    nbytes = _nbytes(module.bias.numel(), module.bias.dtype, export_dtype) if module.bias is not None else 0
    wb = module.weight_binarizer
    if wb is None:
        binarized = 0
        nbytes += _nbytes(w.numel(), w.dtype, export_dtype)
    else:
        binarized = w.numel()
        nbytes += out_channels * ((k + 7) // 8)
        if wb.scale_mode == "channel":
            nbytes += _nbytes(out_channels, w.dtype, export_dtype)
    if module.input_binarizer is not None and module.input_binarizer.scale is not None:
        nbytes += 4
    return params, binarized, nbytes


def _group_namer(model: nn.Module, binarized_names: list[str]):
    stage_of = dict(zip(binarized_names, block_keys(model, binarized_names, "block")))
    stages = sorted(set(stage_of.values()), key=len, reverse=True)
    prefix = getattr(model, "base_model_prefix", None)

    def group(module_name: str) -> str:
        for stage in stages:
            if module_name == stage or module_name.startswith(stage + "."):
                return stage
        parts = module_name.split(".")
        depth = 2 if prefix and parts[0] == prefix and len(parts) > 1 else 1
        return ".".join(parts[:depth]) or "(root)"

    return group


def _count_macs(model: nn.Module, example_inputs, binary_activations: bool = False) -> dict[str, tuple[int, bool]]:
    """MACs per sample of every linear / conv layer on `example_inputs`, and whether they are 1-bit x 1-bit."""
    macs: dict[str, tuple[int, bool]] = {}
    hooks = []

    def hook(name):
        def fn(module, args, output):
            batch = args[0].shape[0] if args[0].ndim > 1 else 1
            if isinstance(module, (nn.Linear, BinaryLinear)):
                k = module.in_features
            else:
                k = module.in_channels // module.groups * math.prod(module.kernel_size)
            binary = _is_binary_binary(module, binary_activations)
            macs[name] = (output.numel() // batch * k, binary)

        return fn

    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, BinaryLinear, BinaryConv2d)):
            hooks.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if isinstance(example_inputs, Mapping):
                model(**example_inputs)
            else:
                model(example_inputs)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return macs


def _is_binary_binary(module: nn.Module, binary_activations: bool = False) -> bool:
    """Whether `module` multiplies 1-bit inputs by 1-bit weights. `binary_activations`: the model binarizes its
    activations at activation sites, so a layer that binarizes only its weights reads +-1 inputs there."""
    if isinstance(module, BinaryMixin):
        return module.binary_weights and (module.binary_inputs or binary_activations)
    if isinstance(module, StoMPPMixin):
        return module.weight_binarizer is not None and (module.input_binarizer is not None or binary_activations)
    return False


def summary(model: nn.Module, example_inputs=None, export_dtype: str | None = None, print_fn=print) -> ModelSummary:
    """Print (with `print_fn`, None to stay silent) and return the size table of `model`'s packed export.

    Args:
        model: a StoMPP training model (sizes projected for its packed export) or a reloaded packed model.
        example_inputs: a batch (tensor, or dict of model kwargs) to count MACs per sample, convolutions included.
            Without it, MACs of linear layers are counted per token (per input row) and convolutions are skipped.
        export_dtype: dtype of the full-precision remainder; defaults to the model config's `export_dtype`.
    """
    try:
        config = find_config(model)
    except ValueError:
        config = None
    if export_dtype is None and config is not None:
        export_dtype = config.export_dtype
    dtype = EXPORT_DTYPES[export_dtype] if export_dtype is not None else None
    at_sites = config is not None and config.activation_sites == "activation" and config.activations is not None

    converted = {n: m for n, m in model.named_modules() if isinstance(m, (StoMPPMixin, BinaryMixin))}
    group = _group_namer(model, list(converted))
    rows: dict[str, SummaryRow] = {}
    position = {n: i for i, (n, _) in enumerate(model.named_modules())}
    first: dict[str, int] = {}

    def row(module_name: str) -> SummaryRow:
        key = group(module_name)
        first[key] = min(first.get(key, math.inf), position.get(module_name, math.inf))
        return rows.setdefault(key, SummaryRow(key))

    for name, module in converted.items():
        params, binarized, nbytes = _module_row(module, dtype)
        r = row(name)
        r.params += params
        r.binarized += binarized
        r.nbytes += nbytes
    inside = tuple(f"{n}." for n in converted)
    seen: set[int] = set()
    for name, tensor in [*model.named_parameters(), *_persistent_buffers(model)]:
        if name.startswith(inside) or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        r = row(name.rpartition(".")[0])
        r.params += tensor.numel() if isinstance(tensor, nn.Parameter) else 0
        r.nbytes += _nbytes(tensor.numel(), tensor.dtype, dtype)

    if example_inputs is not None:
        mac_unit = "sample"
        for name, (count, binary) in _count_macs(model, example_inputs, at_sites).items():
            if binary:
                row(name).binary_macs += count
            else:
                row(name).fp_macs += count
    else:
        mac_unit = "token"
        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, BinaryLinear)):
                count = math.prod(module.weight_shape if isinstance(module, BinaryMixin) else module.weight.shape)
                if _is_binary_binary(module, at_sites):
                    row(name).binary_macs += count
                else:
                    row(name).fp_macs += count

    if any(isinstance(m, BinaryMixin) for m in converted.values()):
        fmt = "packed 1-bit checkpoint"
    elif binarization_progress(model).complete:
        fmt = "packed 1-bit export"
    else:
        fmt = "projected packed 1-bit export; still in progression"
    fmt += f", remainder in {export_dtype or 'training dtype'}"
    ordered = sorted(rows.values(), key=lambda r: first[r.group])
    result = ModelSummary(type(model).__name__, fmt, ordered, mac_unit)
    if print_fn is not None:
        print_fn(str(result))
    return result


def _persistent_buffers(model: nn.Module):
    for module_name, module in model.named_modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and name not in module._non_persistent_buffers_set:
                yield (f"{module_name}.{name}" if module_name else name), buf
