"""Packed 1-bit export: state dicts, in-memory packing, checkpoint inspection and reload of packed modules.

A packed checkpoint stores, for every binarized layer `name`:

    name.weight_packed   uint8 [out, ceil(K / 8)]   sign(W) row by row, 8 per byte, bit set = +1 (sign(0) = +1)
    name.weight_scale    [out]                      alpha, the per-output-channel mean |W| (weight_scale="channel")
    name.input_scale     [] float32                 beta, the activation scale (activation_scale="tensor")
    name.bias            [out]                      unchanged

and every other tensor as usual (in `export_dtype` when set). This module knows nothing of Transformers: the
quantizer (`integrations/transformers/quantizer.py`) calls it from `save_pretrained` / `from_pretrained`, and timm
or plain models use `packed_state_dict` / `pack_model` / `convert_to_packed` directly.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .conversion import eligible_modules, select_modules, stompp_modules
from .core.dtensor import full_tensor
from .core.packing import EXPORT_DTYPES
from .kernels import KERNELS
from .nn import BinaryMixin, StoMPPModule, kind_of, packed_types

logger = logging.getLogger(__name__)


@dataclass
class Progress:
    """How far a StoMPP model is from fully binary: frozen vs all binarized tensors, and what is left."""

    frozen: int
    total: int
    unfinished: list[str]

    @property
    def complete(self) -> bool:
        return self.frozen == self.total


def binarization_progress(model: nn.Module) -> Progress:
    """Count the binarized tensors of `model` that are fully frozen (packed modules count as frozen)."""
    frozen = total = 0
    unfinished = []
    for name, module in model.named_modules():
        if isinstance(module, StoMPPModule):
            n = len(module.binarizers())
            total += n
            if module.fully_frozen:
                frozen += n
            else:
                unfinished.append(name)
        elif isinstance(module, packed_types()):
            n = int(module.binary_weights) + int(module.binary_inputs)
            total += n
            frozen += n
    return Progress(frozen, total, unfinished)


def checkpoint_format(model: nn.Module, keep_latent: bool = False) -> tuple[str, str]:
    """Whether a save of `model` writes a "packed" 1-bit checkpoint or a "latent" (resumable) one, and why.

    Every save path (`save_pretrained` through the quantizer, timm's `save_pretrained`, the model card) asks this
    one function. Packed when every binarized tensor is frozen and `keep_latent` is False (a `Trainer` checkpoint
    written mid-training keeps latent weights so that training can resume); latent otherwise.
    """
    progress = binarization_progress(model)
    if keep_latent and any(isinstance(m, StoMPPModule) for m in model.modules()):
        return "latent", "training in progress: latent full-precision weights are kept so that training can resume"
    if not progress.complete:
        return "latent", (
            f"{progress.total - progress.frozen} of {progress.total} binarized tensors are still in progression "
            f"(first unfinished layer: `{progress.unfinished[0]}`)"
        )
    return "packed", f"all {progress.total} binarized tensors are frozen"


def _check_packable(name: str, module: StoMPPModule) -> None:
    if not module.fully_frozen:
        raise ValueError(
            f"Cannot pack `{name}`: its masks are not all frozen (weight {module.weight_frozen_fraction}, "
            f"input {module.input_frozen_fraction}); finish the StoMPP progression first."
        )
    a = module.input_binarizer
    if a is not None and a.scale is not None and not bool(a.scale > 0):
        raise ValueError(
            f"Cannot pack `{name}`: its activation scale beta was never measured (it is set by forward passes in "
            "training mode). Train the model, or run a few batches through it in `model.train()` first."
        )


def pack_module(name: str, module: StoMPPModule, unpack_cache: bool = False) -> nn.Module:
    """The packed inference twin of one fully frozen training module."""
    _check_packable(name, module)
    return kind_of(module).packed.from_stompp(module, unpack_cache=unpack_cache)


def pack_model(model: nn.Module, unpack_cache: bool = False) -> dict[str, nn.Module]:
    """Replace every (fully frozen) StoMPP module of `model` by its packed inference module, in place."""
    packed = {}
    for name, module in stompp_modules(model).items():
        new = pack_module(name, module, unpack_cache=unpack_cache)
        model.set_submodule(name, new)
        packed[name] = new
    return packed


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is None or not tensor.is_floating_point():
        return tensor
    return tensor.to(dtype)


def packed_state_dict(model: nn.Module, export_dtype: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict of the packed checkpoint of `model`, without modifying the model.

    Under FSDP2 every rank must call it (gathering sharded tensors is a collective), as `save_pretrained` is.

    Every StoMPP module is replaced by its packed buffers (it must be fully frozen); floating-point tensors other
    than the activation scales are cast to `export_dtype` ('float32', 'float16', 'bfloat16'; None keeps them).
    """
    dtype = EXPORT_DTYPES[export_dtype] if export_dtype is not None else None
    # Sharded (FSDP2 / tensor-parallel DTensor) entries are gathered: the packed checkpoint holds whole tensors.
    state = {k: full_tensor(v) for k, v in model.state_dict().items()}
    for name, module in stompp_modules(model).items():
        for key in module.state_dict():
            del state[f"{name}.{key}"]
        for key, value in pack_module(name, module).state_dict().items():
            state[f"{name}.{key}"] = value
    return {k: v if k.endswith(".input_scale") else _cast(v, dtype) for k, v in state.items()}


def packed_bits_per_weight(state_dict: Mapping[str, torch.Tensor], weight_counts: Mapping[str, int]) -> float:
    """Bits per binarized weight in a packed state dict: (packed bytes + scale bytes) * 8 / weights."""
    nbytes = sum(
        state_dict[f"{n}.{s}"].numel() * state_dict[f"{n}.{s}"].element_size()
        for n in weight_counts
        for s in ("weight_packed", "weight_scale")
        if f"{n}.{s}" in state_dict
    )
    return 8 * nbytes / sum(weight_counts.values())


def read_checkpoint_shapes(files: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of safetensors checkpoint files, read from their headers (no tensor is loaded)."""
    from safetensors import safe_open

    shapes = {}
    for path in files:
        if not str(path).endswith(".safetensors"):
            continue
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def _lookup(shapes: Mapping[str, tuple[int, ...]], name: str, prefix: str | None) -> str | None:
    """The checkpoint key of `name.weight_packed`, allowing for a base-model prefix added or stripped on load."""
    candidates = [f"{name}.weight_packed"]
    if prefix:
        candidates.append(f"{prefix}.{name}.weight_packed")
        if name.startswith(prefix + "."):
            candidates.append(f"{name[len(prefix) + 1 :]}.weight_packed")
    return next((c for c in candidates if c in shapes), None)


def convert_to_packed(
    model: nn.Module,
    config,
    checkpoint_shapes: Mapping[str, tuple[int, ...]] | None = None,
    base_model_prefix: str | None = None,
    unpack_cache: bool = False,
) -> dict[str, BinaryMixin]:
    """Swap the layers a packed checkpoint binarized for empty `BinaryLinear` / `BinaryConv2d`, before loading.

    With `checkpoint_shapes` (tensor name -> shape, from `read_checkpoint_shapes`) the checkpoint decides which
    layers are packed and every packed tensor's shape is checked against the model built from its config. Without
    it the layers are chosen as training chose them (`config.modules_to_not_convert` or the model-aware defaults).

    Raises:
        ValueError: naming the tensor, when a packed tensor's shape disagrees with the model's layer.
    """
    if checkpoint_shapes is None:
        keys = {n: None for n, _ in select_modules(model, config)}
    else:
        keys = {n: _lookup(checkpoint_shapes, n, base_model_prefix) for n, _ in eligible_modules(model)}
        keys = {n: k for n, k in keys.items() if k is not None}
    converted = {}
    for name, key in keys.items():
        module = model.get_submodule(name)
        new = kind_of(module).packed.from_module(module, config, unpack_cache=unpack_cache)
        if key is not None:
            _check_shapes(new, name, key[: -len("weight_packed")], checkpoint_shapes)
        model.set_submodule(name, new)
        converted[name] = new
    if checkpoint_shapes is not None and not converted:
        raise ValueError(
            "The checkpoint is marked as a packed StoMPP checkpoint (`quantization_config.packed=True`) but holds no "
            "`*.weight_packed` tensor matching a linear or conv layer of this model."
        )
    return converted


def _check_shapes(module: BinaryMixin, name: str, key_prefix: str, shapes: Mapping[str, tuple[int, ...]]) -> None:
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items() if k != "bias"}
    for suffix, shape in expected.items():
        key = key_prefix + suffix
        if key not in shapes:
            raise ValueError(
                f"Packed checkpoint is missing `{key}` for layer `{name}` (expected shape {shape}); the checkpoint "
                "and its quantization_config disagree."
            )
        if tuple(shapes[key]) != shape:
            k = math.prod(module.weight_shape[1:])
            raise ValueError(
                f"Packed checkpoint tensor `{key}` has shape {tuple(shapes[key])}, but layer `{name}` built from the "
                f"model config (weight {module.weight_shape}, {k} inputs per output) needs {shape}. The checkpoint "
                "does not match this model config."
            )


def set_unpack_cache(model: nn.Module, enabled: bool = True) -> int:
    """Turn the unpacked-weight cache of every packed module on (speed) or off (memory); return how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, BinaryMixin):
            module.unpack_cache = enabled
            module._unpacked = None
            count += 1
    return count


def set_kernel(model: nn.Module, kernel: str = "auto") -> int:
    """Choose how the packed linear layers of `model` compute; return how many packed modules were set.

    Args:
        kernel: "auto" (the default): the bit-packed XNOR-popcount kernel (`stompp_hf.kernels.xnor`) wherever it
            applies (binary inputs and weights, float32 on CPU, no autograd) and compiles, the reference path
            elsewhere;
            "xnor": the kernel, raising where it cannot run; "reference": always unpack the signs to a float
            matrix and use the dense matmul. All three give bit-identical outputs. Packed convolutions always use
            the reference path.
    """
    if kernel not in KERNELS:
        raise ValueError(f"`kernel` must be one of {', '.join(map(repr, KERNELS))}, but got {kernel!r}.")
    count = 0
    for module in model.modules():
        if isinstance(module, BinaryMixin):
            module.kernel = kernel
            count += 1
    return count
