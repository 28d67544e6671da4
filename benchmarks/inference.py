"""Binarized inference against what a user would run instead: packed 1-bit layers and models side by side with
dense FP32, bf16 and int8 peers, in one run.

Reproduce (from the repository root, on an otherwise idle machine; about 30 minutes on 2 cores):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/inference.py --threads 2

Writes `benchmarks/results/inference.md`. `--quick` runs every part at toy sizes (a minute or two) and writes to a
temporary file unless `--output` says otherwise: a check that the script works, not a measurement.

Parts, each timed as medians of interleaved repeats (every repeat runs each mode once, in a fresh order), under
`torch.no_grad()`, after one warm-up call per mode:

* Linear layers, one per weight shape of all-MiniLM-L6-v2 and BERT-base, at 128 rows (batch 1 x sequence 128) and
  4096 rows (batch 32): `F.linear` in FP32 and bf16 (inputs already bf16), `torch.ao` dynamic int8 quantization
  (`quantize_dynamic`'s linear), and `BinaryLinear` in each mode: the reference path, the XNOR kernel on each code
  path this CPU has (avx512 / avx2 / scalar, forced), and the exact int8 path (`torch._int_mm`).
* Convolutions: the 3x3 layers of ResNet-18 at 32 px (CIFAR stem, so layer1 runs at 32x32: the 64->64 3x3 at 32x32
  of issue #19) and at 224 px, batch 1 and 32: `F.conv2d` in FP32 (NCHW and channels-last) and bf16 (channels-last),
  `torch.ao` static int8 (`quantized.Conv2d`, quantizing the input per tensor and dequantizing the output), and
  `BinaryConv2d`: reference, the binary conv kernel (avx512, else avx2; NCHW and channels-last input), and its
  scalar path at batch 1.
* Whole models: all-MiniLM-L6-v2 (packaged, seeded classifier) and a BERT-base-sized `BertConfig()` with seeded
  random weights, saved FP32, binarized with `StoMPPConfig()`, saved packed and reloaded (`from_pretrained`); modes
  FP32, bf16, `torch.ao` dynamic int8, and the packed model under `reference` (+ unpack cache), `xnor`, `int8` and
  `auto` (on a CPU without AMX tiles or VNNI, the packed `int8` model runs batch 1 only: `slow_int8`). ResNet-18
  (timm, seeded) at 32 and 224 px as the paper's BNN (`activation_sites="activation"`, no scales:
  each binarized conv reads the +-1 output of a `BinaryActivation`), packed in memory: FP32, FP32 / bf16
  channels-last, and the packed model under `reference` and `auto` (NCHW and channels-last).
* Memory: for the transformers, a fresh process per mode loads the model and runs one forward at batch 1 and one at
  batch 32; `VmRSS` after the imports (baseline) and `VmHWM` (peak) at the end. For every model: the bytes of its
  parameters and buffers, and of the layouts the kernels build on first use (the XNOR panels; the int8 weights).
* Exactness: every packed mode's logits against the in-memory binarized model's (`torch.equal`).

The popcount limit: `threads x clock x 512` binary multiply-adds per second (one 512-bit VPOPCNTQ per cycle per
core), the clock being `--clock-ghz` or, by default, the highest "cpu MHz" that /proc/cpuinfo reports. The XNOR rows
give the fraction of it they reach, and next to it what the kernel's register loop alone reached during the row
(`xnor.popcount_rate`, timed as one more mode in the row's rounds): on a VM whose cores the host shares, that
ceiling moves from row to row. A VM's "cpu MHz" may be a base clock below the turbo clock its cores run at, which
would make the limit easy to reach: the run also measures the clock of one core at its start and end
(`xnor.clock_ghz`, a chain of dependent multiplies) and gives the fractions at the higher of the two as well.

Memory allocator: by default glibc's own settings, under which a freed output can go back to the system and the next
output of its size faults in fresh pages (on this project's VM, inside the interleaved linear table, the 384 -> 1536
layer at 4096 rows faulted in all 6,144 pages of its float32 output on every call: 12.7 ms, against 3.4 ms and no
faults under the tunables below, two runs minutes apart). `--keep-freed-memory` runs the whole benchmark under
glibc tunables that keep freed blocks of up to 32 MiB for reuse, as a user tuning for speed would; a run under it is
in `benchmarks/results/inference_keep_freed.md`:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/inference.py --threads 2 --layer-repeats 21 9 --keep-freed-memory \
        --output benchmarks/results/inference_keep_freed.md
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from common import MONITOR, interleaved, iqr, results_header, vm_status_kib
from torch import nn

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "inference.md")
#: the register-loop probe timed with every layer row (`xnor.popcount_rate`): its steps and their multiply-adds
PROBE = "register loop"
PROBE_STEPS = 1 << 18


@functools.cache
def probe_macs() -> int:
    """Binary multiply-adds of one probe call, as the kernel counts them (`xnor.popcount_probe`; one untimed call)."""
    from stompp_hf.kernels import xnor

    return xnor.popcount_probe(PROBE_STEPS)


#: transformer mode -> how the model is made: ("dense", dtype tag) or ("packed", kernel, unpack cache)
TF_MODES: dict[str, tuple] = {
    "FP32": ("dense", "fp32"),
    "bf16": ("dense", "bf16"),
    "int8 dynamic (torch.ao)": ("dense", "int8"),
    "packed, reference": ("packed", "reference", False),
    "packed, reference + unpack cache": ("packed", "reference", True),
    "packed, xnor": ("packed", "xnor", False),
    "packed, int8": ("packed", "int8", False),
    "packed, auto": ("packed", "auto", False),
    "packed, auto, bf16": ("packed", "auto", False, "bf16"),
}
TF_MODELS = {"minilm": "all-MiniLM-L6-v2", "base": "BERT-base-sized"}


def slow_int8() -> bool:
    """Whether the "packed, int8" whole model runs `torch._int_mm` on a CPU without AMX tiles or VNNI: there it took
    332 s per BERT-base batch-32 call (17-52x FP32 per layer; AVX2-only EPYC, inference_epyc_avx2.md), most of the
    benchmark's time, so its largest batch is skipped (the layer tables still time `_int_mm` at every batch)."""
    from stompp_hf.kernels import int8
    from stompp_hf.kernels.cpu import cpu_flags

    return not int8.amx_available() and not ({"avx512_vnni", "avx_vnni"} & cpu_flags())


def tf_batches(mode: str, batches: tuple[int, ...]) -> tuple[int, ...]:
    """The batches a whole-transformer mode runs at: all of them, except the largest for a slow int8 mode."""
    if mode == "packed, int8" and len(batches) > 1 and slow_int8():
        return tuple(b for b in batches if b != max(batches))
    return tuple(batches)


DENSE_LINEAR = ("FP32", "bf16", "int8 dynamic (torch.ao)")
DENSE_CONV = ("FP32", "FP32 channels-last", "bf16 channels-last", "int8 static (torch.ao)")


@dataclass
class Setting:
    """Sizes of one run: the full measurement, or `--quick`'s toy version of every part."""

    batches: tuple[int, int] = (1, 32)
    seq: int = 128
    linear_shapes: tuple[tuple[int, int], ...] = ((384, 384), (384, 1536), (1536, 384), (768, 768), (768, 3072))
    linear_shapes_extra: tuple[tuple[int, int], ...] = ((3072, 768),)
    image_sizes: tuple[int, ...] = (32, 224)
    resnet_widths: tuple[int, ...] = (64, 128, 256, 512)
    tiny_bert: bool = False
    repeats: tuple[int, int] = (20, 5)  # batch 1, batch 32


QUICK = Setting(
    batches=(1, 2),
    seq=16,
    linear_shapes=((64, 96),),
    linear_shapes_extra=(),
    image_sizes=(32, 64),
    resnet_widths=(8, 16, 16, 32),
    tiny_bert=True,
    repeats=(2, 1),
)


def log(msg: str) -> None:
    print(f"[inference] {msg}", flush=True)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}" if seconds < 0.01 else f"{seconds * 1e3:.1f}"


def median(values: list[float]) -> float:
    return statistics.median(values)


# ---------------------------------------------------------------------------------------------------------------
# the machine


def stated_clock(override: float | None) -> tuple[float, str]:
    """The clock the popcount limit is stated at (`--clock-ghz`, else what /proc/cpuinfo reports) and where it came
    from; `measured_clock` is the one the cores run at."""
    if override:
        return override, "`--clock-ghz`"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            mhz = [float(line.split(":")[1]) for line in f if line.startswith("cpu MHz")]
    except OSError:
        mhz = []
    if mhz:
        return max(mhz) / 1000, "the highest `cpu MHz` in /proc/cpuinfo"
    return 2.5, "an assumed 2.5 GHz (no clock in /proc/cpuinfo)"


def measured_clock(repeats: int = 5) -> float | None:
    """The clock one core runs at now (GHz, median of `repeats` `xnor.clock_ghz` chains), or None where it cannot be
    measured (no kernel, not x86). A VM's /proc/cpuinfo may report a base clock below the turbo clock its cores run
    at; the fractions of the popcount limit are also given at this clock."""
    from stompp_hf.kernels import xnor

    if not xnor.is_available():
        return None
    values = [xnor.clock_ghz() for _ in range(repeats)]
    return None if None in values else median(values)


def copy_bandwidth(mib: int = 256, repeats: int = 7) -> dict[str, float]:
    """Bytes per second (read + written) of `dst.copy_(src)` on `mib` MiB of float32, medians of `repeats`: into a
    destination already touched ("warm", the memory floor used below) and into a fresh `torch.empty` each time
    ("fresh", which pays the page faults every layer's fresh output pays)."""
    src = torch.randn(mib * 2**18)
    dst = torch.empty_like(src).copy_(src)
    nbytes = 2 * src.numel() * 4
    warm, fresh = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        warm.append(time.perf_counter() - start)
        start = time.perf_counter()
        torch.empty_like(src).copy_(src)
        fresh.append(time.perf_counter() - start)
    return {"warm": nbytes / median(warm), "fresh": nbytes / median(fresh), "mib": mib}


def popcount_limit(threads: int, ghz: float) -> float:
    """Binary multiply-adds per second at one 512-bit popcount per cycle per core."""
    return threads * ghz * 1e9 * 512


@contextlib.contextmanager
def forced(path: str | None):
    from stompp_hf.kernels import xnor

    with xnor.forced_path(path):
        yield


def kernel_call(layer: nn.Module, x: torch.Tensor, kernel: str, path: str | None = None) -> Callable[[], object]:
    """A timed call of a packed layer in one of our modes: `kernel` (`set_kernel`) and, for "xnor", a forced path."""
    from stompp_hf.export import set_kernel

    def call():
        set_kernel(layer, kernel)
        with forced(path):
            return layer(x)

    return call


def int_mm_call(layer: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """The exact int8 path through `torch._int_mm` (`kernels.int8.int8_linear`), called directly: where AMX runs,
    the layer's "int8" kernel takes the AMX tiles instead."""
    from stompp_hf.kernels import int8

    weight = int8.int8_weight(layer.weight, layer.in_features)
    scale = layer.kernel_scale()
    return lambda: int8.int8_linear(x, weight, scale, layer.bias)


def with_probe(calls: dict[str, Callable[[], object]]) -> dict[str, Callable[[], object]]:
    """`calls` plus the register-loop probe (where a vector path runs), timed in the same rounds as the layer, so
    that it samples the same moments of the machine."""
    from stompp_hf.kernels import xnor

    if {"avx512", "avx2"} & set(kernel_paths()):
        calls[PROBE] = lambda: xnor.popcount_rate(PROBE_STEPS)
    return calls


def probe_rate(samples: dict[str, list[float]]) -> float | None:
    """The probe's median rate (binary multiply-adds per second on one thread), taken out of `samples`."""
    times = samples.pop(PROBE, None)
    return probe_macs() / median(times) if times else None


def ours_exact(calls: dict[str, Callable[[], object]], expected: torch.Tensor, expected_bf16: torch.Tensor) -> bool:
    """Whether every one of our modes among `calls` gives the reference path's bits (bf16 modes: the bf16 layer's)."""
    return all(
        torch.equal(calls[c](), expected_bf16 if c.endswith("bf16") else expected)
        for c in calls
        if c.startswith(("xnor", "int8 ("))
    )


def kernel_paths() -> tuple[str, ...]:
    from stompp_hf.kernels import xnor

    return xnor.paths() if xnor.is_available() else ()


# ---------------------------------------------------------------------------------------------------------------
# layers


def seeded_binary_linear(k: int, n: int, seed: int):
    from stompp_hf.core.packing import pack_signs
    from stompp_hf.nn import BinaryLinear

    g = torch.Generator().manual_seed(seed)
    layer = BinaryLinear(k, n)
    with torch.no_grad():
        layer.weight.copy_(pack_signs(torch.rand(n, k, generator=g) < 0.5))
        layer.weight_scale.uniform_(0.01, 0.1, generator=g)
        layer.input_scale.fill_(0.5)
        layer.bias.normal_(generator=g)
    return layer.eval()


def linear_table(setting: Setting, repeats: tuple[int, int], limit: float) -> list[dict]:
    """Per shape and row count: every dense peer and every mode of `BinaryLinear`, interleaved."""
    from stompp_hf.kernels import int8

    rows_out = []
    paths = kernel_paths()
    for k, n in (*setting.linear_shapes, *setting.linear_shapes_extra):
        dense = nn.Linear(k, n).eval()
        bf16 = copy.deepcopy(dense).to(torch.bfloat16)
        qint8 = torch.ao.quantization.quantize_dynamic(nn.Sequential(copy.deepcopy(dense)), {nn.Linear})
        binary = seeded_binary_linear(k, n, seed=k * 7 + n)
        binary_bf16 = copy.deepcopy(binary).to(torch.bfloat16)
        for b, reps in zip(setting.batches, repeats):
            m = b * setting.seq
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            xb = x.bfloat16()

            calls: dict[str, Callable[[], object]] = {
                "FP32": lambda f=dense, x=x: f(x),
                "bf16": lambda f=bf16, x=xb: f(x),
                "int8 dynamic (torch.ao)": lambda f=qint8, x=x: f(x),
                "reference": kernel_call(binary, x, "reference"),
            }
            for path in paths:
                calls[f"xnor {path}"] = kernel_call(binary, x, "xnor", path)
            if int8.amx_available():
                calls["int8 (AMX tiles)"] = kernel_call(binary, x, "int8")
            if hasattr(torch, "_int_mm") and kernel_paths():
                calls["int8 (_int_mm)"] = int_mm_call(binary, x)
            if "avx512" in paths:  # bf16 in and out, as the bf16 peer
                calls["xnor avx512, bf16"] = kernel_call(binary_bf16, xb, "xnor", "avx512")
                if int8.amx_available():
                    calls["int8 (AMX tiles), bf16"] = kernel_call(binary_bf16, xb, "int8")
            with torch.no_grad():
                exact = ours_exact(
                    calls, kernel_call(binary, x, "reference")(), kernel_call(binary_bf16, xb, "reference")()
                )
                samples = interleaved(with_probe(calls), reps)
            probe = probe_rate(samples)
            row = {
                "shape": (k, n),
                "rows": m,
                "batch": b,
                "exact": exact,
                "t": {c: median(v) for c, v in samples.items()},
                "probe": probe,
            }
            row["iqr"] = max(iqr(v) for v in samples.values())
            row["macs"] = m * n * k
            row["io_bytes"] = 4 * m * (k + n)  # float32 input read, float32 output written
            rows_out.append(row)
            best = paths[0] if paths else None
            log(
                f"linear {k}->{n}, {m} rows: "
                + ", ".join(f"{c} {ms(t)} ms" for c, t in row["t"].items())
                + (f"; xnor {best}: {row['macs'] / row['t'][f'xnor {best}'] / limit:.1%} of the limit" if best else "")
            )
    return rows_out


def resnet18_conv_shapes(size: int, widths: tuple[int, ...]) -> list[tuple[int, int, int, int]]:
    """(in, out, input map side, stride) of ResNet-18's distinct 3x3 convs at `size` px (CIFAR stem at <= 64 px:
    layer1 at the full size; else the 7x7 stride-2 stem and the max-pool: layer1 at size / 4)."""
    side = size if size <= 64 else size // 4
    shapes = []
    c_in = widths[0]
    for i, c in enumerate(widths):
        if i:
            shapes.append((c_in, c, side, 2))
            side = (side + 1) // 2
        shapes.append((c, c, side, 1))
        c_in = c
    return shapes


def static_int8_conv(conv: nn.Conv2d, x: torch.Tensor):
    """`torch.ao`'s static int8 convolution of `conv` (per-channel weights, per-tensor activations calibrated on
    `x`), as a float -> float call: quantize, `quantized.Conv2d`, dequantize."""
    import torch.ao.nn.quantized as nnq

    torch.backends.quantized.engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"
    w = conv.weight.detach()
    w_scale = w.abs().amax(dim=(1, 2, 3)).clamp_min(1e-8) / 127
    qw = torch.quantize_per_channel(w, w_scale, torch.zeros_like(w_scale, dtype=torch.int64), 0, torch.qint8)
    x_scale = float(x.abs().max().clamp_min(1e-8)) / 127
    with torch.no_grad():
        y = conv(x)
    q = nnq.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding)
    q.set_weight_bias(qw, conv.bias.detach() if conv.bias is not None else None)
    q.scale, q.zero_point = float(y.abs().max().clamp_min(1e-8)) / 127, 0

    def call(x=x):
        return q(torch.quantize_per_tensor(x, x_scale, 0, torch.qint8)).dequantize()

    try:
        call()
    except RuntimeError:  # an engine without signed activations
        q.zero_point = 128

        def call(x=x):
            return q(torch.quantize_per_tensor(x, x_scale, 128, torch.quint8)).dequantize()

        call()
    return call


def conv_table(setting: Setting, repeats: tuple[int, int], limit: float) -> list[dict]:
    from stompp_hf.core.packing import pack_signs
    from stompp_hf.kernels import int8
    from stompp_hf.nn import BinaryConv2d

    rows_out = []
    paths = kernel_paths()
    seen = set()
    for size in setting.image_sizes:
        for c_in, c_out, side, stride in resnet18_conv_shapes(size, setting.resnet_widths):
            if (c_in, c_out, side, stride) in seen:
                continue
            seen.add((c_in, c_out, side, stride))
            g = torch.Generator().manual_seed(c_in + c_out + side)
            dense = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False).eval()
            dense_cl = copy.deepcopy(dense).to(memory_format=torch.channels_last)
            bf16_cl = copy.deepcopy(dense_cl).to(torch.bfloat16)
            binary = BinaryConv2d(c_in, c_out, 3, stride, 1, bias=False).eval()
            with torch.no_grad():
                binary.weight.copy_(pack_signs(dense.weight.reshape(c_out, -1) >= 0))
                binary.weight_scale.uniform_(0.01, 0.1, generator=g)
                binary.input_scale.fill_(0.5)
            binary_bf16 = copy.deepcopy(binary).to(torch.bfloat16)
            for b, reps in zip(setting.batches, repeats):
                x = torch.randn(b, c_in, side, side, generator=g)
                x_cl = x.contiguous(memory_format=torch.channels_last)
                x_bf = x_cl.bfloat16()

                calls: dict[str, Callable[[], object]] = {
                    "FP32": lambda f=dense, x=x: f(x),
                    "FP32 channels-last": lambda f=dense_cl, x=x_cl: f(x),
                    "bf16 channels-last": lambda f=bf16_cl, x=x_bf: f(x),
                    "int8 static (torch.ao)": static_int8_conv(dense, x),
                    "reference": kernel_call(binary, x, "reference"),
                }
                if "avx512" in paths:
                    calls["xnor avx512"] = kernel_call(binary, x, "xnor", "avx512")
                    calls["xnor avx512, channels-last"] = kernel_call(binary, x_cl, "xnor", "avx512")
                elif "avx2" in paths:  # what "auto" runs where there is no avx512 path
                    calls["xnor avx2"] = kernel_call(binary, x, "xnor", "avx2")
                    calls["xnor avx2, channels-last"] = kernel_call(binary, x_cl, "xnor", "avx2")
                if b == setting.batches[0] and paths:
                    calls["xnor scalar"] = kernel_call(binary, x, "xnor", "scalar")
                if int8.amx_available():
                    calls["int8 (AMX tiles)"] = kernel_call(binary, x, "int8")
                    calls["int8 (AMX tiles), channels-last"] = kernel_call(binary, x_cl, "int8")
                if "avx512" in paths:  # bf16 channels-last in and out, as the bf16 peer
                    calls["xnor avx512, channels-last, bf16"] = kernel_call(binary_bf16, x_bf, "xnor", "avx512")
                    if int8.amx_available():
                        calls["int8 (AMX tiles), channels-last, bf16"] = kernel_call(binary_bf16, x_bf, "int8")
                with torch.no_grad():
                    exact = ours_exact(
                        calls, kernel_call(binary, x, "reference")(), kernel_call(binary_bf16, x_bf, "reference")()
                    )
                    samples = interleaved(with_probe(calls), reps)
                ho = (side - 1) // stride + 1
                probe = probe_rate(samples)
                row = {
                    "shape": (c_in, c_out, side, stride),
                    "size": size,
                    "batch": b,
                    "exact": exact,
                    "t": {c: median(v) for c, v in samples.items()},
                    "probe": probe,
                    "iqr": max(iqr(v) for v in samples.values()),
                    "macs": b * c_out * ho * ho * c_in * 9,
                    "io_bytes": 4 * b * (c_in * side * side + c_out * ho * ho),
                }
                rows_out.append(row)
                log(
                    f"conv {c_in}->{c_out} at {side}x{side} /{stride}, batch {b}: "
                    + ", ".join(f"{c} {ms(t)} ms" for c, t in row["t"].items())
                )
    return rows_out


# ---------------------------------------------------------------------------------------------------------------
# transformer models


def fp_model(key: str, setting: Setting):
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    from stompp_hf.assets import minilm_path

    torch.manual_seed(0)
    if key == "minilm":
        kwargs = {"num_hidden_layers": 1} if setting.tiny_bert else {}
        return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2, **kwargs)
    if setting.tiny_bert:
        config = BertConfig(
            num_labels=2, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2
        )
    else:
        config = BertConfig(num_labels=2)
    return BertForSequenceClassification(config)


def token_batch(vocab: int, batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000 if vocab > 2000 else 5, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def load(path: str, mode: str):
    """The model of `mode` from the FP32 (`path/fp32`) or packed (`path/packed`) checkpoint, in eval mode."""
    from transformers import AutoModelForSequenceClassification

    import stompp_hf

    setting = TF_MODES[mode]
    model = AutoModelForSequenceClassification.from_pretrained(
        os.path.join(path, "fp32" if setting[0] == "dense" else "packed")
    ).eval()
    if setting[0] == "dense":
        if setting[1] == "bf16":
            model = model.to(torch.bfloat16)
        elif setting[1] == "int8":
            model = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
        return model
    _, kernel, cache, *dtype = setting
    if dtype == ["bf16"]:
        model = model.to(torch.bfloat16)
    stompp_hf.set_kernel(model, kernel)
    stompp_hf.set_unpack_cache(model, cache)
    return model


def prepare(key: str, work: str, setting: Setting) -> tuple[dict, dict, dict]:
    """Save the FP32 and packed checkpoints under `work`; return inputs, in-memory binarized logits, and facts."""
    from transformers import AutoModelForSequenceClassification

    from stompp_hf import ProgressionController, StoMPPConfig
    from stompp_hf.conversion import stompp_modules
    from stompp_hf.export import binarization_progress

    fp = fp_model(key, setting)
    fp.save_pretrained(os.path.join(work, "fp32"))
    vocab = fp.config.vocab_size
    del fp
    model = AutoModelForSequenceClassification.from_pretrained(
        os.path.join(work, "fp32"), quantization_config=StoMPPConfig()
    )
    ProgressionController(model, total_steps=1).advance(1)
    model.train()
    with torch.no_grad():
        for seed in range(3):  # measures the activation scales
            model(**token_batch(vocab, 8, setting.seq, 100 + seed))
    model.eval()
    if not binarization_progress(model).complete:
        raise RuntimeError(f"{key}: not fully binary")
    layers = stompp_modules(model)
    inputs = {b: token_batch(vocab, b, setting.seq, b) for b in setting.batches}
    with torch.no_grad():
        reference = {b: model(**inputs[b]).logits for b in setting.batches}
    model.save_pretrained(os.path.join(work, "packed"))
    facts = {
        "layers": len(layers),
        "weights": sum(m.weight.numel() for m in layers.values()),
        "shapes": sorted({tuple(m.weight.shape) for m in layers.values()}),
        "vocab": vocab,
    }
    return inputs, reference, facts


def tensor_mib(model: nn.Module) -> float:
    ts = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in ts if t is not None) / 2**20


def layout_mib(model: nn.Module) -> float:
    """MiB of the layouts the kernels built on first use (XNOR panels, int8 weights)."""
    from stompp_hf.nn.packed import BinaryMixin

    total = 0
    for m in model.modules():
        if isinstance(m, BinaryMixin):
            total += sum(t.numel() * t.element_size() for _, t in m._kernel_layouts.values())
    return total / 2**20


def memory_child(path: str, mode: str) -> None:
    import transformers  # noqa: F401  (the import baseline is measured before the model exists)

    import stompp_hf  # noqa: F401

    vocab, seq = int(os.environ["STOMPP_BENCH_VOCAB"]), int(os.environ["STOMPP_BENCH_SEQ"])
    batches = json.loads(os.environ["STOMPP_BENCH_BATCHES"])
    baseline = vm_status_kib("VmRSS")
    model = load(path, mode)
    with torch.no_grad():
        for b in batches:
            model(**token_batch(vocab, b, seq, b))
    peak = vm_status_kib("VmHWM")
    out = {"tensors_mib": tensor_mib(model), "layouts_mib": layout_mib(model)}
    print(json.dumps({**out, "baseline_mib": baseline / 1024, "peak_mib": peak / 1024}))


def memory(path: str, mode: str, vocab: int, threads: int, setting: Setting) -> dict[str, float]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", path, mode]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "STOMPP_BENCH_VOCAB": str(vocab),
        "STOMPP_BENCH_SEQ": str(setting.seq),
        "STOMPP_BENCH_BATCHES": json.dumps(list(tf_batches(mode, setting.batches))),
    }
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["increment_mib"] = result["peak_mib"] - result["baseline_mib"]
    return result


def whole_model(
    models: dict, inputs: dict, repeats: dict[int, int], call=None, skip: set[tuple[str, int]] = frozenset()
) -> dict[tuple[str, int], float]:
    """Median seconds per call of every model at every batch, interleaved; `(mode, batch)` pairs in `skip` are not
    run (and not in the result)."""
    call = call or (lambda m, x: m(**x))
    samples: dict[tuple[str, int], float] = {}
    with torch.no_grad():
        for b, x in inputs.items():
            names = [n for n in models if (n, b) not in skip]
            runs = interleaved({n: lambda m=models[n], x=x: call(m, x) for n in names}, repeats[b])
            samples.update({(n, b): median(v) for n, v in runs.items()})
            log(f"batch {b}: " + ", ".join(f"{n} {ms(samples[(n, b)])} ms" for n in names))
    return samples


def measure_transformer(key: str, args: argparse.Namespace, setting: Setting) -> dict:
    with tempfile.TemporaryDirectory() as work:
        log(f"{TF_MODELS[key]}: building checkpoints")
        inputs, reference, facts = prepare(key, work, setting)
        models = {mode: load(work, mode) for mode in TF_MODES}
        exact = {}
        with torch.no_grad():
            # bf16 modes: against the same packed model's reference path in bf16 (what a bf16 model computes)
            ref_bf16 = load(work, "packed, reference").to(torch.bfloat16)
            reference_bf16 = {b: ref_bf16(**inputs[b]).logits for b in setting.batches}
            del ref_bf16
            for mode, model in models.items():
                if TF_MODES[mode][0] == "packed":
                    expected = reference_bf16 if TF_MODES[mode][3:] == ("bf16",) else reference
                    exact[mode] = all(
                        torch.equal(model(**inputs[b]).logits, expected[b]) for b in tf_batches(mode, setting.batches)
                    )
        log(f"{TF_MODELS[key]}: bit-identical {exact}")
        repeats = dict(zip(setting.batches, setting.repeats))
        if key == "base" and not setting.tiny_bert:
            repeats = {b: max(3, r // 3) for b, r in repeats.items()}
        MONITOR.reset()
        whole = whole_model(
            models,
            inputs,
            repeats,
            skip={(m, b) for m in models for b in setting.batches if b not in tf_batches(m, setting.batches)},
        )
        other_cpu = MONITOR.cores
        layouts = {mode: layout_mib(model) for mode, model in models.items()}
        del models
        gc.collect()
        mem = {mode: memory(work, mode, facts["vocab"], args.threads, setting) for mode in TF_MODES}
        log(f"{TF_MODELS[key]}: memory {mem}")
    return {
        "facts": facts,
        "exact": exact,
        "whole": whole,
        "memory": mem,
        "layouts": layouts,
        "repeats": repeats,
        "other_cpu": other_cpu,
    }


# ---------------------------------------------------------------------------------------------------------------
# ResNet-18, the paper's BNN


PAPER_BNN = {
    "weights": "stompp",
    "activations": "stompp",
    "weight_scale": "none",
    "activation_scale": "none",
    "refresh_rate": 1,
}


def resnet18(size: int, setting: Setting):
    import timm

    from stompp_hf.integrations.timm import policy

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10, channels=setting.resnet_widths)
    if size <= 64:
        policy.cifar_stem(model)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, size, size)}
    return model.eval()


def measure_resnet(size: int, setting: Setting) -> dict:
    from stompp_hf import ProgressionController, StoMPPConfig, prepare_model, set_kernel
    from stompp_hf.export import binarization_progress, pack_model

    log(f"ResNet-18 at {size} px: building")
    fp = resnet18(size, setting)
    model = prepare_model(copy.deepcopy(fp), StoMPPConfig(**PAPER_BNN))
    ProgressionController(model, total_steps=1).advance(1)
    model.eval()
    if not binarization_progress(model).complete:
        raise RuntimeError("ResNet-18: not fully binary")
    inputs = {b: torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(b)) for b in setting.batches}
    with torch.no_grad():
        reference = {b: model(x) for b, x in inputs.items()}
    packed = pack_model(model)
    facts = {"convs": sum(1 for m in packed.values() if m.__class__.__name__ == "BinaryConv2d")}
    packed_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    set_kernel(packed_cl, "auto")
    ref_model = copy.deepcopy(model)
    set_kernel(ref_model, "reference")
    set_kernel(model, "auto")
    fp_cl = copy.deepcopy(fp).to(memory_format=torch.channels_last)
    models = {
        "FP32": (fp, lambda x: x),
        "FP32 channels-last": (fp_cl, lambda x: x.contiguous(memory_format=torch.channels_last)),
        "bf16 channels-last": (
            copy.deepcopy(fp_cl).to(torch.bfloat16),
            lambda x: x.contiguous(memory_format=torch.channels_last).bfloat16(),
        ),
        "packed, reference": (ref_model, lambda x: x),
        "packed, auto": (model, lambda x: x),
        "packed, auto, channels-last": (packed_cl, lambda x: x.contiguous(memory_format=torch.channels_last)),
        "packed, auto, channels-last, bf16": (
            copy.deepcopy(packed_cl).to(torch.bfloat16),
            lambda x: x.contiguous(memory_format=torch.channels_last).bfloat16(),
        ),
    }
    staged = {name: {b: prep(x) for b, x in inputs.items()} for name, (_, prep) in models.items()}
    exact = {}
    with torch.no_grad():
        ref_bf16 = copy.deepcopy(ref_model).to(torch.bfloat16)  # bf16: against the packed model's bf16 reference
        reference_bf16 = {b: ref_bf16(x.bfloat16()) for b, x in inputs.items()}
        for name in ("packed, reference", "packed, auto", "packed, auto, channels-last"):
            m = models[name][0]
            exact[name] = all(torch.equal(m(staged[name][b]), reference[b]) for b in setting.batches)
        name = "packed, auto, channels-last, bf16"
        exact[name] = all(torch.equal(models[name][0](staged[name][b]), reference_bf16[b]) for b in setting.batches)
    log(f"ResNet-18 at {size} px: bit-identical {exact}")
    repeats = dict(zip(setting.batches, setting.repeats))
    if size > 64 and not setting.tiny_bert:
        repeats = {b: max(3, r // 2) for b, r in repeats.items()}
    MONITOR.reset()
    samples: dict[tuple[str, int], float] = {}
    with torch.no_grad():
        for b in setting.batches:
            calls = {n: lambda m=models[n][0], x=staged[n][b]: m(x) for n in models}
            runs = interleaved(calls, repeats[b])
            samples.update({(n, b): median(v) for n, v in runs.items()})
            log(f"ResNet-18 at {size} px, batch {b}: " + ", ".join(f"{n} {ms(samples[(n, b)])} ms" for n in models))
    return {
        "facts": facts,
        "exact": exact,
        "whole": samples,
        "repeats": repeats,
        "other_cpu": MONITOR.cores,
        "tensors": {n: tensor_mib(m) for n, (m, _) in models.items()},
        "layouts": {n: layout_mib(m) for n, (m, _) in models.items()},
    }


# ---------------------------------------------------------------------------------------------------------------
# the report


def fastest(row: dict, names: tuple[str, ...]) -> tuple[str, float]:
    name = min((n for n in names if n in row["t"]), key=lambda n: row["t"][n])
    return name, row["t"][name]


def ours_best(row: dict) -> tuple[str, float]:
    name = min((n for n in row["t"] if n.startswith(("xnor", "int8 ("))), key=lambda n: row["t"][n])
    return name, row["t"][name]


def fastest_xnor(row: dict) -> tuple[str, float] | None:
    """The fastest XNOR-popcount column of a layer row (float32 or bf16 activations), or None."""
    names = [c for c in row["t"] if c.startswith("xnor")]
    return (min(names, key=row["t"].__getitem__), min(row["t"][c] for c in names)) if names else None


def floor_seconds(row: dict, limit: float, bandwidth: float) -> tuple[float, float]:
    """(popcount floor, memory floor) of a layer for its fastest XNOR column: its multiply-adds at the popcount
    limit, and its input and output (float32, or bf16 for a bf16 column) at the warm copy bandwidth (weights and
    packed bits, a few % of it, left out)."""
    best = fastest_xnor(row)
    io = row["io_bytes"] / (2 if best and best[0].endswith("bf16") else 1)
    return row["macs"] / limit, io / bandwidth


def probe_share(row: dict, limit: float, threads: int) -> float | None:
    """The register-loop probe's rate during a row, on all `threads`, as a fraction of the popcount limit."""
    return row["probe"] * threads / limit if row.get("probe") else None


def render_layers(
    title: str,
    rows: list[dict],
    dense: tuple[str, ...],
    limit: float,
    bandwidth: float,
    threads: int,
    what: Callable,
) -> list[str]:
    columns = list(dict.fromkeys(c for r in rows for c in r["t"]))
    lines = [
        title,
        "",
        "| layer | batch | " + " | ".join(f"{c} (ms)" for c in columns) + " | fastest dense | ours, best | "
        "x fastest dense | popcount limit reached | register loop reached | AMX int8 limit reached | memory floor "
        "(ms) | tighter floor reached | bit-identical |",
        "|---|---:|" + "---:|" * len(columns) + "---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        peer, t_peer = fastest(r, dense)
        mine, t_mine = ours_best(r)
        xnor_times = [t for c, t in r["t"].items() if c.startswith("xnor")]
        reached = f"{r['macs'] / min(xnor_times) / limit:.1%}" if xnor_times else "-"
        amx_times = [t for c, t in r["t"].items() if c.startswith("int8 (AMX")]
        amx = f"{r['macs'] / min(amx_times) / (2 * limit):.1%}" if amx_times else "-"
        pop, mem = floor_seconds(r, limit, bandwidth)
        tighter = f"{max(pop, mem) / min(xnor_times):.1%}" if xnor_times else "-"
        cells = [what(r), str(r["batch"]), *(ms(r["t"][c]) if c in r["t"] else "-" for c in columns)]
        share = probe_share(r, limit, threads)
        cells += [peer, mine, f"{t_peer / t_mine:.2f}", reached, f"{share:.1%}" if share else "-", amx, ms(mem)]
        cells.append(tighter)
        cells.append("**yes**" if r["exact"] else "NO")
        lines.append("| " + " | ".join(cells) + " |")
    widest = max(r["iqr"] for r in rows)
    lines += ["", f"Widest interquartile range of these timings: {ms(widest)} ms.", ""]
    return lines


def render(results: dict, command: str, args: argparse.Namespace, setting: Setting, elapsed: float) -> str:
    import transformers

    from stompp_hf.kernels import int8, xnor

    ghz, source = stated_clock(args.clock_ghz)
    limit = popcount_limit(args.threads, ghz)
    bandwidth = results["bandwidth"]["warm"]
    clocks = [c for c in results.get("clock", []) if c]
    turbo = max(clocks) if clocks else None  # the higher measured clock: the stricter limit
    b1, b32 = setting.batches
    lines = [
        *results_header(
            "Binarized inference: packed 1-bit layers and models against dense FP32, bf16 and int8", command
        ),
        f"- transformers {transformers.__version__}, `torch.set_num_threads({args.threads})`, no GPU. Whole run "
        f"{elapsed / 60:.1f} min." + (" **`--quick`: toy sizes, not a measurement.**" if args.quick else ""),
        "- Memory allocator: "
        + (
            f"glibc with `GLIBC_TUNABLES={KEEP_FREED}` (`--keep-freed-memory`: freed blocks up to 32 MiB are kept "
            "and reused, so an output of that size reuses warm pages instead of faulting in fresh ones; every mode "
            "runs under it)."
            if args.keep_freed_memory
            else "glibc's defaults (a freed block can go back to the system, and the next output of its size then "
            "faults in fresh pages: `--keep-freed-memory` keeps them)."
        ),
        f"- XNOR kernel paths on this CPU: {', '.join(kernel_paths()) or 'none (no kernel)'}; the binary "
        f"convolution's: {', '.join(p for p in ('avx512', 'avx2', 'scalar') if p in kernel_paths()) or 'none'}. "
        f"`auto` times the int8 path against XNOR only on CPUs with AMX int8: "
        f"{'yes' if int8.worth_measuring() else 'not here'}; the int8 path runs on "
        f"{'AMX tiles (our kernel, `int8.amx_linear` / `amx_conv2d`)' if int8.amx_available() else '`torch._int_mm`'}"
        ". Kernel threads: "
        + (
            "torch's own OpenMP team (`xnor.thread_runtime()` = openmp)."
            if kernel_paths() and xnor.thread_runtime() == "openmp"
            else "the kernel's pthread pool."
        ),
        f"- Popcount limit = {args.threads} threads x {ghz:.2f} GHz ({source}) x 512 binary multiply-adds per cycle "
        f"(one 512-bit VPOPCNTQ per cycle per core) = {limit / 1e12:.2f} T binary multiply-adds/s. The fraction "
        "reached is the layer's multiply-adds (rows x inputs x outputs; for a conv, outputs x in channels x 9) over "
        "the fastest XNOR path's median time and this limit. `AMX int8 limit reached`: the same over the AMX int8 "
        "path's time and twice this limit (one 16 x 64 x 16 int8 tile product, TDPBSSD, per 16 cycles per core: "
        "1024 multiply-adds per cycle). `register loop reached`: what the XNOR register tile's inner loop alone "
        "reaches (`xnor.popcount_rate`, one thread, scaled to the threads), timed as one more mode in the same "
        "rounds as the row: a ceiling for the kernel at those moments. "
        + (
            "On this CPU it is the avx512 tile's 16 XOR / VPOPCNTD / ADD per step on registers, no memory, no "
            "epilogue (three vector operations per 512 multiply-adds on the two 512-bit ports: about 2/3 of the "
            "limit on an idle core at the stated clock, more under turbo, less where the host shares the core)."
            if "avx512" in kernel_paths()
            else "This CPU has no AVX-512 VPOPCNTDQ, so the limit above (the issue's formula, kept as the bar) has "
            "no instruction behind it here: AVX2 has no vector popcount, and the kernels look popcounts up in "
            "byte tables (VPSHUFB: an activation nibble selects one of 16 tables of popcount(a ^ v), and one "
            "lookup counts 4 inputs for 32 weight rows, 128 multiply-adds). The probe is the avx2 convolution's "
            "table tile (4 pixels x 64 channels) on operands in L1: one VPSHUFB and one VPADDB per 128 "
            "multiply-adds, at most 256 per cycle where two shuffle pipes and four vector pipes are free (AMD Zen "
            "3), half the limit; a vCPU whose core is shared retires fewer."
            if "avx2" in kernel_paths()
            else "No vector path runs on this CPU: no probe."
        ),
        (
            f"- Clock measured on one core (`xnor.clock_ghz`: a chain of dependent 64-bit multiplies, 3 cycles "
            f"each, median of 5): {clocks[0]:.2f} GHz at the start of the run, {clocks[-1]:.2f} GHz at the end. "
            f"At the higher one the popcount limit is {popcount_limit(args.threads, turbo) / 1e12:.2f} T/s, and a "
            f"layer reaches {ghz / turbo:.2f} times the fraction it reaches of the limit above (the Reading gives "
            "both)."
            if turbo
            else "- Clock: not measured (no kernel, or not x86)."
        ),
        f"- Memory floor = the layer's input and output bytes (float32, or bf16 where the fastest XNOR column is a "
        f"bf16 one) at the copy bandwidth measured at the start "
        f"(`dst.copy_(src)`, {results['bandwidth']['mib']} MiB, read + written): {bandwidth / 1e9:.1f} GB/s into "
        "touched memory (the floor), "
        f"{results['bandwidth']['fresh'] / 1e9:.1f} GB/s into a fresh `torch.empty` (what a fresh output pays). "
        "`tighter floor reached` = max(popcount floor, memory floor) / the fastest XNOR time: a layer whose memory "
        "floor is above its popcount floor cannot reach the popcount limit, whatever the kernel does.",
        f"- Batch {b1} and {b32}, sequence {setting.seq} for the transformers; medians of interleaved repeats after "
        f"one warm-up call per mode (layer tables: {results['layer_repeats'][0]} repeats at batch {b1}, "
        f"{results['layer_repeats'][1]} at batch {b32}); `x fastest dense` = fastest dense peer's median / our "
        "fastest mode's (above 1: faster). bf16 peers get inputs already in bf16 (a bf16 model keeps its "
        "activations so); the int8 peers quantize their inputs inside the call.",
        "",
    ]
    if results["linear"]:
        lines += render_layers(
            f"## Linear layers: one `BinaryLinear` per weight shape (rows = batch x {setting.seq})",
            results["linear"],
            DENSE_LINEAR,
            limit,
            bandwidth,
            args.threads,
            lambda r: f"{r['shape'][0]} -> {r['shape'][1]}, {r['rows']} rows",
        )
    if results["conv"]:
        lines += render_layers(
            "## Convolutions: ResNet-18's 3x3 layers (32 px with the CIFAR stem, and 224 px)",
            results["conv"],
            DENSE_CONV,
            limit,
            bandwidth,
            args.threads,
            lambda r: (
                f"{r['shape'][0]} -> {r['shape'][1]} at {r['shape'][2]}x{r['shape'][2]}"
                + (" /2" if r["shape"][3] == 2 else "")
                + f" ({r['size']} px)"
            ),
        )
    for key, r in results["transformers"].items():
        f = r["facts"]
        lines += [
            f"## {TF_MODELS[key]}: whole model",
            "",
            f"{f['layers']} binarized linear layers, {f['weights']:,} binarized weights; weight shapes "
            + ", ".join("x".join(map(str, s)) for s in f["shapes"])
            + f". Repeats {r['repeats']}. Other processes used {r['other_cpu']:.2f} of {os.cpu_count()} cores during "
            "the timed calls. Kernel layouts: built on first use (XNOR panels, int8 weights); peak RSS includes them.",
            "",
            f"| mode | batch {b1} (ms) | x FP32 | batch {b32} (ms) | x FP32 | model tensors (MiB) | kernel layouts "
            "(MiB) | peak RSS over baseline (MiB) | logits bit-identical |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for mode in TF_MODES:
            cells = [mode]
            for b in setting.batches:
                if (mode, b) not in r["whole"]:
                    cells += ["skipped (below)", "-"]
                    continue
                t, fp = r["whole"][(mode, b)], r["whole"][("FP32", b)]
                cells += [ms(t), f"{fp / t:.2f}"]
            mem = r["memory"][mode]
            cells += [f"{mem['tensors_mib']:.1f}", f"{mem['layouts_mib']:.1f}", f"{mem['increment_mib']:.0f}"]
            cells.append("(dense peer)" if TF_MODES[mode][0] == "dense" else ("**yes**" if r["exact"][mode] else "NO"))
            lines.append("| " + " | ".join(cells) + " |")
        skipped = [(m, b) for m in TF_MODES for b in setting.batches if (m, b) not in r["whole"]]
        for mode, b in skipped:
            lines += [
                "",
                f"`{mode}` at batch {b}: skipped. Without AMX int8 tiles or VNNI this mode runs `torch._int_mm`, "
                "which took 332 s per BERT-base batch-32 call on an AVX2-only EPYC (`slow_int8`); its bit-identity "
                "and peak RSS above are from the other batch only, and the layer tables time `_int_mm` at both.",
            ]
        lines.append("")
    for size, r in results["resnet"].items():
        lines += [
            f"## ResNet-18 at {size} px (the paper's BNN): whole model",
            "",
            f"{r['facts']['convs']} binarized convolutions (weights only; each reads a `BinaryActivation`'s +-1). "
            f"Repeats {r['repeats']}. Other processes used {r['other_cpu']:.2f} of {os.cpu_count()} cores.",
            "",
            f"| mode | batch {b1} (ms) | x FP32 | batch {b32} (ms) | x FP32 | model tensors (MiB) | kernel layouts "
            "(MiB) | logits bit-identical |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for mode in r["tensors"]:
            cells = [mode]
            for b in setting.batches:
                t, fp = r["whole"][(mode, b)], r["whole"][("FP32", b)]
                cells += [ms(t), f"{fp / t:.2f}"]
            cells += [f"{r['tensors'][mode]:.1f}", f"{r['layouts'][mode]:.1f}"]
            cells.append("**yes**" if r["exact"].get(mode) else ("(dense peer)" if mode not in r["exact"] else "NO"))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Reading", ""]
    for kind, rows, dense in (("linear", results["linear"], DENSE_LINEAR), ("conv", results["conv"], DENSE_CONV)):
        for b in setting.batches:
            ratios = [fastest(r, dense)[1] / ours_best(r)[1] for r in rows if r["batch"] == b]
            if not ratios:
                continue
            beaten = sum(x > 1 for x in ratios)
            lines.append(
                f"- {kind} layers, batch {b}: ours faster than the fastest dense peer on {beaten} of {len(ratios)} "
                f"shapes (x {min(ratios):.2f} to {max(ratios):.2f}); target: all."
            )
    for kind, rows in (("linear", results["linear"]), ("conv", results["conv"])):
        fracs = [
            r["macs"] / min(t for c, t in r["t"].items() if c.startswith("xnor")) / limit
            for r in rows
            if r["batch"] == b32 and any(c.startswith("xnor") for c in r["t"])
        ]
        if fracs:
            met = sum(f >= 0.25 for f in fracs)
            lines.append(
                f"- {kind} layers, batch {b32}: {min(fracs):.1%} to {max(fracs):.1%} of the popcount limit; "
                f">= 25% on {met} of {len(fracs)} shapes (target: all)."
            )
            if turbo:
                at = [f * ghz / turbo for f in fracs]
                lines.append(
                    f"  At the measured clock ({turbo:.2f} GHz): {min(at):.1%} to {max(at):.1%}; >= 25% on "
                    f"{sum(f >= 0.25 for f in at)} of {len(at)} shapes."
                )
            misses = [
                (r, min(t for c, t in r["t"].items() if c.startswith("xnor")))
                for r in rows
                if r["batch"] == b32 and any(c.startswith("xnor") for c in r["t"])
            ]
            shares = [probe_share(r, limit, args.threads) for r in rows if r["batch"] == b32]
            shares = [v for v in shares if v]
            if shares:
                lines.append(
                    f"  The register loop alone reached {min(shares):.0%} to {max(shares):.0%} of the limit during "
                    "these rows."
                )
            misses = [(r, t) for r, t in misses if r["macs"] / t / limit < 0.25]
            if misses:
                bound = [floor_seconds(r, limit, bandwidth) for r, _ in misses]
                memory_bound = sum(mem > 0.25 * t for (r, t), (_, mem) in zip(misses, bound))
                lines.append(
                    f"  Of the {len(misses)} below 25%, {memory_bound} have a memory floor above a quarter of their "
                    f"time (moving their input and output alone takes "
                    f"{min(m / t for (_, t), (_, m) in zip(misses, bound)):.0%} to "
                    f"{max(m / t for (_, t), (_, m) in zip(misses, bound)):.0%} of it at the warm copy bandwidth)."
                )
    lines += [
        "- Whole models: see each table's `x FP32` column and memory columns; the packed modes' logits are "
        "compared bit for bit with the in-memory binarized model, the bf16 modes' with the same packed model's "
        "reference path in bf16 (a bf16 model's own computation).",
        f"- The XNOR kernel: {xnor.__name__}; binary conv: stompp_hf.kernels.bconv; int8 path: "
        "stompp_hf.kernels.int8.",
        "",
    ]
    return "\n".join(lines)


#: glibc malloc tunables of `--keep-freed-memory`: blocks up to 32 MiB come from the heap, which is never trimmed.
KEEP_FREED = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=17179869184"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="every part at toy sizes: a check, not a measurement")
    parser.add_argument("--parts", nargs="+", default=["linear", "conv", "transformers", "resnet"])
    parser.add_argument("--models", nargs="+", default=list(TF_MODELS), choices=list(TF_MODELS))
    parser.add_argument("--clock-ghz", type=float, default=None, help="clock of the popcount limit")
    parser.add_argument(
        "--layer-repeats",
        type=int,
        nargs=2,
        metavar=("BATCH1", "BATCH32"),
        default=None,
        help=f"repeats of the layer tables at batch 1 and 32 (default {Setting().repeats[0]} {Setting().repeats[1]}; "
        "more where sporadic stalls of the machine move the medians)",
    )
    parser.add_argument("--idle-threshold", type=float, default=0.2)
    parser.add_argument("--idle-budget", type=float, default=300.0)
    parser.add_argument("--output", default=None, help=f"default {RESULTS} (a temporary file with --quick)")
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="run under glibc tunables that keep freed memory for reuse (mmap threshold 32 MiB, the most glibc "
        "takes; trim threshold 16 GiB), as a user tuning for speed would (like preloading jemalloc or tcmalloc): "
        "outputs of up to 32 MiB then reuse warm pages instead of faulting in fresh ones on every call. Applies to "
        "every mode, dense peers included; recorded in the results",
    )
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.keep_freed_memory and KEEP_FREED not in os.environ.get("GLIBC_TUNABLES", ""):
        # glibc reads its tunables at process start: run again with them (the memory children inherit them)
        tunables = ":".join(t for t in (os.environ.get("GLIBC_TUNABLES"), KEEP_FREED) if t)
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "GLIBC_TUNABLES": tunables})
    if args.child:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        memory_child(*args.child)
        return
    setting = QUICK if args.quick else Setting()
    output = args.output or (
        os.path.join(tempfile.gettempdir(), "stompp_inference_quick.md") if args.quick else RESULTS
    )
    torch.set_num_threads(args.threads)
    MONITOR.threshold, MONITOR.budget = args.idle_threshold, (0.0 if args.quick else args.idle_budget)
    command = "HF_HUB_OFFLINE=1 .venv/bin/python " + shlex.join(["benchmarks/inference.py", *sys.argv[1:]])
    ghz, _ = stated_clock(args.clock_ghz)
    limit = popcount_limit(args.threads, ghz)
    start = time.perf_counter()
    results: dict = {"linear": [], "conv": [], "transformers": {}, "resnet": {}}
    MONITOR.wait_idle()
    results["bandwidth"] = copy_bandwidth(16 if args.quick else 256)
    results["clock"] = [measured_clock()]
    bw = results["bandwidth"]
    log(f"copy bandwidth: {bw['warm'] / 1e9:.1f} GB/s warm, {bw['fresh'] / 1e9:.1f} GB/s fresh")
    layer_repeats = tuple(args.layer_repeats) if args.layer_repeats else setting.repeats
    results["layer_repeats"] = layer_repeats
    if "linear" in args.parts:
        results["linear"] = linear_table(setting, layer_repeats, limit)
    if "conv" in args.parts:
        results["conv"] = conv_table(setting, layer_repeats, limit)
    if "transformers" in args.parts:
        results["transformers"] = {key: measure_transformer(key, args, setting) for key in args.models}
    if "resnet" in args.parts:
        results["resnet"] = {size: measure_resnet(size, setting) for size in setting.image_sizes}
    results["clock"].append(measured_clock())
    text = render(results, command, args, setting, time.perf_counter() - start)
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    with open(output, "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    log(f"wrote {output}")


if __name__ == "__main__":
    main()
