"""Packed 1-bit export: state dicts, in-memory packing, checkpoint inspection and reload of packed modules.

A packed checkpoint stores, for every binarized layer `name`:

    name.weight          uint8 [out, ceil(K / 8)]   sign(W) row by row, 8 per byte, bit set = +1 (sign(0) = +1)
    name.weight_scale    [out]                      alpha, the per-output-channel mean |W| (weight_scale="channel")
    name.input_scale     [] float32                 beta, the activation scale (activation_scale="tensor")
    name.bias            [out]                      unchanged

and every other tensor as usual (in `export_dtype` when set). The packed signs sit under the layer's own `weight`
key so that a loader unaware of StoMPP fails with a size mismatch instead of loading random weights; checkpoints of
the earlier layout (`name.weight_packed`) still load. Loading validates a packed checkpoint against its config
(`convert_to_packed`: every binarized layer present, shapes, dtypes, no scale the config does not expect) and the
loaded values (`validate_packed_model`: finite, positive scales). This module knows nothing of Transformers: the
quantizer (`integrations/transformers/quantizer.py`) calls it from `save_pretrained` / `from_pretrained`, and timm
or plain models use `packed_state_dict` / `pack_model` / `convert_to_packed` directly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .conversion import eligible_modules, select_modules, stompp_modules
from .core.dtensor import full_tensor
from .core.packing import EXPORT_DTYPES
from .kernels import KERNELS, int8
from .nn import BinaryMixin, StoMPPModule, kind_of, packed_types
from .nn.packed import LEGACY_PACKED_KEY

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
    keys = [f"{n}.{s}" for n in weight_counts for s in ("weight", "weight_scale")]
    nbytes = sum(state_dict[k].numel() * state_dict[k].element_size() for k in keys if k in state_dict)
    return 8 * nbytes / sum(weight_counts.values())


@dataclass(frozen=True)
class TensorInfo:
    """The shape and safetensors dtype string ("U8", "F32", ...) of one checkpoint tensor, read from a header."""

    shape: tuple[int, ...]
    dtype: str | None = None


_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def read_checkpoint_index(files: Iterable[str]) -> dict[str, TensorInfo]:
    """Tensor name -> `TensorInfo` of safetensors checkpoint files, read from their headers (no tensor is loaded).

    Raises:
        ValueError: naming the file, when a header cannot be read (a truncated or corrupt file).
    """
    from safetensors import safe_open

    index = {}
    for path in files:
        if not str(path).endswith(".safetensors"):
            continue
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    piece = f.get_slice(key)
                    index[key] = TensorInfo(tuple(piece.get_shape()), piece.get_dtype())
        except Exception as e:  # safetensors raises its own SafetensorError for a bad header
            raise ValueError(
                f"Cannot read the safetensors header of {path}: {e}. The file is truncated or corrupt."
            ) from e
    return index


def read_checkpoint_shapes(files: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of safetensors checkpoint files, read from their headers (no tensor is loaded)."""
    return {k: v.shape for k, v in read_checkpoint_index(files).items()}


def _as_index(checkpoint: Mapping[str, TensorInfo | tuple[int, ...]]) -> dict[str, TensorInfo]:
    return {k: v if isinstance(v, TensorInfo) else TensorInfo(tuple(v)) for k, v in checkpoint.items()}


def is_packed_tensor(key: str, info: TensorInfo) -> bool:
    """A packed-sign tensor: `*.weight` stored as uint8 (no full-precision weight is), or legacy `*.weight_packed`."""
    return key.endswith("." + LEGACY_PACKED_KEY) or (key.endswith(".weight") and info.dtype == "U8")


def holds_packed_tensors(checkpoint: Mapping[str, TensorInfo]) -> list[str]:
    """The packed-sign tensors of a checkpoint index (empty for a full-precision or latent checkpoint)."""
    return [k for k, v in checkpoint.items() if is_packed_tensor(k, v)]


def _key_prefixes(name: str, prefix: str | None) -> list[str]:
    """Where `name`'s tensors may sit in a checkpoint, allowing for a base-model prefix added or stripped on load."""
    candidates = [f"{name}."]
    if prefix:
        candidates.append(f"{prefix}.{name}.")
        if name.startswith(prefix + "."):
            candidates.append(f"{name[len(prefix) + 1 :]}.")
    return candidates


def _find_key(keys: Iterable[str], name: str, prefix: str | None, suffix: str) -> str | None:
    """The key of `name.suffix` among `keys`, allowing for a base-model prefix added or stripped; None if absent."""
    return next((p + suffix for p in _key_prefixes(name, prefix) if p + suffix in keys), None)


def _packed_key(index: Mapping[str, TensorInfo], name: str, prefix: str | None) -> tuple[str, bool] | None:
    """`(key prefix, legacy layout)` of layer `name` when the checkpoint packed it, else None."""
    for p in _key_prefixes(name, prefix):
        if p + "weight" in index and is_packed_tensor(p + "weight", index[p + "weight"]):
            return p, False
        if p + LEGACY_PACKED_KEY in index:
            return p, True
    return None


def convert_to_packed(
    model: nn.Module,
    config,
    checkpoint: Mapping[str, TensorInfo | tuple[int, ...]] | None = None,
    base_model_prefix: str | None = None,
    unpack_cache: bool = False,
) -> dict[str, BinaryMixin]:
    """Swap the layers a packed checkpoint binarized for empty `BinaryLinear` / `BinaryConv2d`, before loading.

    With `checkpoint` (tensor name -> `TensorInfo` from `read_checkpoint_index`, or -> shape) the checkpoint
    decides which layers are packed, and it is validated against the model built from its config: every layer the
    config binarizes has its packed tensors or its full-precision weight, and every packed tensor has the shape and
    dtype the layer needs, with no scale the config does not expect. Without it the layers are chosen as training
    chose them (`config.modules_to_not_convert` or the model-aware defaults).

    Raises:
        ValueError: naming the tensor and what was expected, for a checkpoint that does not match its config.
    """
    if checkpoint is None:
        keys: dict[str, tuple[str, bool] | None] = {n: None for n, _ in select_modules(model, config)}
    else:
        index = _as_index(checkpoint)
        found = {n: _packed_key(index, n, base_model_prefix) for n, _ in eligible_modules(model)}
        keys = {n: k for n, k in found.items() if k is not None}
        if not keys:
            raise ValueError(
                "The checkpoint is marked as a packed StoMPP checkpoint (`quantization_config.packed=True`) but "
                "holds no packed `*.weight` (uint8) tensor matching a linear or conv layer of this model."
            )
        _check_layers_present(model, config, index, keys, base_model_prefix)
    converted = {}
    for name, key in keys.items():
        module = model.get_submodule(name)
        new = kind_of(module).packed.from_module(module, config, unpack_cache=unpack_cache)
        if key is not None:
            _check_tensors(new, name, *key, index, config)
        model.set_submodule(name, new)
        converted[name] = new
    return converted


def _check_layers_present(model, config, index, packed, prefix) -> None:
    """Every layer the config binarizes is in the checkpoint, packed or (excluded at export) full precision: a
    layer with no tensor at all would otherwise load as a randomly initialized full-precision layer."""
    for name, _ in select_modules(model, config):
        if name in packed:
            continue
        key = _find_key(index, name, prefix, "weight")
        dtype = index[key].dtype if key is not None else None
        if dtype is not None and dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"Packed checkpoint tensor `{key}` of layer `{name}` has dtype {dtype}, expected U8 (packed signs) "
                "or a float (a layer kept full precision): the file is corrupt or was not written by stompp_hf."
            )
        if key is None:
            raise ValueError(
                f"The packed checkpoint has no tensor for layer `{name}` (expected `{name}.weight`, uint8 packed "
                "signs, and its scales): it is incomplete, or was written for another model or config."
            )


def _check_tensors(
    module: BinaryMixin, name: str, key_prefix: str, legacy: bool, index: Mapping[str, TensorInfo], config
) -> None:
    expected = {k: v for k, v in module.state_dict().items() if k != "bias"}
    for suffix, tensor in expected.items():
        key = key_prefix + (LEGACY_PACKED_KEY if legacy and suffix == "weight" else suffix)
        shape = tuple(tensor.shape)
        if key not in index:
            raise ValueError(
                f"Packed checkpoint is missing `{key}` for layer `{name}` (expected shape {shape}); the checkpoint "
                "and its quantization_config disagree."
            )
        info = index[key]
        if info.shape != shape:
            k = math.prod(module.weight_shape[1:])
            raise ValueError(
                f"Packed checkpoint tensor `{key}` has shape {info.shape}, but layer `{name}` built from the "
                f"model config (weight {module.weight_shape}, {k} inputs per output) needs {shape}. The checkpoint "
                "does not match this model config."
            )
        want = ("U8",) if tensor.dtype == torch.uint8 else _FLOAT_DTYPES
        if info.dtype is not None and info.dtype not in want:
            raise ValueError(
                f"Packed checkpoint tensor `{key}` of layer `{name}` has dtype {info.dtype}, expected "
                f"{' or '.join(want)}: the file is corrupt or was not written by stompp_hf."
            )
    fields = {
        "weight_scale": f"weight_scale={config.weight_scale!r}",
        "input_scale": (
            f"activations={config.activations!r}, activation_scale={config.activation_scale!r}, "
            f"activation_sites={config.activation_sites!r}"
        ),
    }
    for suffix, setting in fields.items():
        if suffix not in expected and key_prefix + suffix in index:
            raise ValueError(
                f"Packed checkpoint stores `{key_prefix + suffix}` for layer `{name}`, but its quantization_config "
                f"({setting}) has no such tensor: the config and the weights disagree, and loading would drop it "
                "and compute wrong outputs."
            )


#: The safetensors metadata key of a packed checkpoint's per-tensor checksums of its packed signs.
DIGESTS_METADATA_KEY = "stompp_packed_blake2b"


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.blake2b(tensor.detach().contiguous().cpu().numpy().tobytes(), digest_size=8).hexdigest()


def packed_digests(state_dict: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """A 64-bit BLAKE2b checksum of every packed-sign tensor of a packed state dict, for its file's metadata."""
    return {k: _digest(v) for k, v in state_dict.items() if k.endswith(".weight") and v.dtype == torch.uint8}


def packed_metadata(state_dict: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """The safetensors metadata of a packed checkpoint: its format and the checksums of its packed signs."""
    return {"stompp_format": "packed", DIGESTS_METADATA_KEY: json.dumps(packed_digests(state_dict), sort_keys=True)}


def read_packed_digests(files: Iterable[str]) -> dict[str, str]:
    """The packed-sign checksums stored in the metadata of safetensors `files` (empty when none were stored)."""
    from safetensors import safe_open

    digests: dict[str, str] = {}
    for path in files:
        if str(path).endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                stored = (f.metadata() or {}).get(DIGESTS_METADATA_KEY)
            if stored:
                digests.update(json.loads(stored))
    return digests


def validate_packed_model(
    model: nn.Module, digests: Mapping[str, str] | None = None, base_model_prefix: str | None = None
) -> None:
    """Check the loaded values of every packed module: scales finite and positive, and packed signs equal to the
    checksums the checkpoint stored (`digests`, from `read_packed_digests`), which catches flipped bits.

    Cost, once per load: one pass over the scales, and BLAKE2b over the packed signs (1/32 of the float weights'
    bytes; ~10 ms for BERT-base's 10 MB of signs on one core).

    Raises:
        ValueError: naming the tensor, for a NaN / Inf / non-positive scale or a checksum mismatch.
    """
    for name, module in model.named_modules():
        if not isinstance(module, BinaryMixin):
            continue
        if digests and module.binary_weights and module.weight.device.type != "meta":
            key = _find_key(digests, name, base_model_prefix, "weight")
            if key is not None and _digest(module.weight) != digests[key]:
                raise ValueError(
                    f"Packed checkpoint tensor `{key}` does not match the checksum stored with it: the file is "
                    "corrupt (flipped bits). Download or copy it again."
                )
        for key in ("weight_scale", "input_scale"):
            value = getattr(module, key)
            if value is None or value.device.type == "meta":
                continue
            bad = ~torch.isfinite(value) | (value <= 0)
            if bool(bad.any()):
                first = value.reshape(-1)[bad.reshape(-1)][0].item()
                raise ValueError(
                    f"Packed checkpoint tensor `{name}.{key}` has {int(bad.sum())} non-finite or non-positive "
                    f"value(s) (e.g. {first}); a scale must be a positive number. The file is corrupt."
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
    """Choose how the packed layers of `model` compute; return how many packed modules were set.

    Args:
        kernel: "auto" (the default): the C kernels wherever they apply (binary weights, float32 or bfloat16 on
            CPU, no autograd, no tracer) and compile: XNOR-popcount for linear layers (`stompp_hf.kernels.xnor`, the
            AVX-512, AVX2 or scalar path the CPU runs; bfloat16 on AVX-512), the binary convolution
            (`stompp_hf.kernels.bconv`) for convolutions except depthwise ones, and on CPUs with AMX int8 the exact
            int8 path (`stompp_hf.kernels.int8`: AMX tiles) for the shapes where it measured faster; the reference
            path elsewhere.
            "xnor": the kernels, raising where they cannot run (depthwise convolutions included);
            "int8": +-1 as int8 with int32 sums (exact): AMX tiles for linear layers and groups-1 convolutions where
            the CPU has them, else `torch._int_mm` for linear layers; "auto" elsewhere; "reference": always unpack
            the signs to a float matrix and use the dense op. All give bit-identical outputs on finite inputs.
    """
    if kernel not in KERNELS:
        raise ValueError(f"`kernel` must be one of {', '.join(map(repr, KERNELS))}, but got {kernel!r}.")
    count = 0
    for module in model.modules():
        if isinstance(module, BinaryMixin):
            module.kernel = kernel
            count += 1
    if kernel == "int8" and count and not int8.amx_available():
        warnings.warn(
            "kernel='int8' without AMX int8 tiles runs `torch._int_mm`: measured 5-7x slower than XNOR-popcount "
            "on an AMD EPYC with AVX-512 VNNI and 17-52x slower than float32 on an AVX2-only one "
            "(docs/design.md, Export). kernel='auto' is the fast choice on this CPU.",
            UserWarning,
            stacklevel=2,
        )
    return count
