"""Packed 1-bit export of StoMPP models: checkpoint size, reload time and CPU eval latency against FP32.

Reproduce (from the repository root; under 10 minutes on 2 idle CPU cores):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/export_size.py --threads 2

Writes `benchmarks/results/export_size.md`. Two models are measured:

* the real all-MiniLM-L6-v2 (`stompp_hf.assets.minilm_path()`), loaded as `AutoModelForSequenceClassification`
  with a seeded, randomly initialised 2-label classifier; Rotten Tomatoes sentences as inputs;
* a BERT-base-sized `BertForSequenceClassification(BertConfig())`, seeded random init; random token ids as inputs.

For each: the FP32 model is saved with `save_pretrained`, reloaded with `quantization_config=StoMPPConfig()`,
made fully binary (`ProgressionController(model, 1).advance(1)`), its activation scales are measured by a few
`model.train()` forward passes under `torch.no_grad()`, and it is saved packed with the full-precision remainder
in float32 and in float16. Sizes, bits per binarized weight, reload time and eval latency (batch 1 and 32,
sequence length 128) of the reloaded packed model (unpack cache off / on) and of the FP32 model are measured in
the same run, interleaved. Before each timing round the script waits (at most `--idle-budget` seconds in all)
until other processes leave the CPU, and it records how much CPU they used during the timed calls. Every number
in the results file is computed here; nothing is hard-coded.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import transformers
from common import MONITOR, interleaved, iqr, timed
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification

import stompp_hf  # noqa: F401  (registers quant_method="stompp" with Transformers)
from stompp_hf import ProgressionController, StoMPPConfig, assets
from stompp_hf.conversion import stompp_modules
from stompp_hf.export import binarization_progress, packed_bits_per_weight, set_kernel, set_unpack_cache
from stompp_hf.kernels.cpu import describe_cpu
from stompp_hf.nn import BinaryMixin

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "export_size.md")
BATCHES = (1, 32)
TARGETS = {"MiniLM-L6": 0.30, "BERT-base-sized": 0.15}  # packed (float16 remainder) / FP32 checkpoint
CALIBRATION_BATCHES = 3
CALIBRATION_BATCH_SIZE = 8


@dataclass
class Result:
    name: str
    description: str
    binarized_layers: list[str] = field(default_factory=list)
    binarized_weights: int = 0
    sizes: dict[str, int] = field(default_factory=dict)  # fp32 / packed_f32 / packed_f16 -> file bytes
    bits: dict[str, float] = field(default_factory=dict)  # packed_f32 / packed_f16 -> bits per binarized weight
    breakdown: dict[str, dict[str, int]] = field(default_factory=dict)  # export -> category -> bytes
    reload: dict[str, float] = field(default_factory=dict)  # fp32 / packed_f32 / packed_f16 -> median seconds
    reload_dtype: dict[str, str] = field(default_factory=dict)
    latency: dict[tuple[str, int], float] = field(default_factory=dict)  # (variant, batch) -> median seconds
    latency_min: dict[tuple[str, int], float] = field(default_factory=dict)  # (variant, batch) -> fastest repeat
    spread: dict[int, float] = field(default_factory=dict)  # batch -> widest interquartile range of the variants
    config_dtype: dict[str, str] = field(default_factory=dict)  # packed export -> `dtype` in its config.json
    other_cpu: float = float("nan")  # cores used by other processes while the latencies were measured
    unpack_once: float = 0.0  # seconds to unpack every binarized weight once
    binarize_inputs: dict[int, float] = field(default_factory=dict)  # batch -> seconds of all sign(x)
    memory: dict[str, int] = field(default_factory=dict)  # in-memory tensor bytes
    equal: dict[str, bool] = field(default_factory=dict)
    f16_max_diff: float = 0.0
    check_shape: tuple[int, ...] = ()


# ----------------------------------------------------------------------------------------------------- helpers


def file_size(directory: str) -> int:
    return os.path.getsize(os.path.join(directory, "model.safetensors"))


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def model_bytes(model: torch.nn.Module) -> int:
    return tensor_bytes(list(model.parameters()) + list(model.buffers()))


def cache_bytes(model: torch.nn.Module) -> int:
    return sum(
        m._unpacked[1].numel() * m._unpacked[1].element_size()
        for m in model.modules()
        if isinstance(m, BinaryMixin) and m._unpacked is not None
    )


def load(path: str) -> torch.nn.Module:
    return AutoModelForSequenceClassification.from_pretrained(path).eval()


def categorize(key: str, binarized: set[str]) -> str:
    module, _, leaf = key.rpartition(".")
    if module in binarized:
        return {
            "weight": "binarized layers: sign bits (weight, uint8)",
            "weight_scale": "binarized layers: per-channel weight scales",
            "input_scale": "binarized layers: activation scales",
            "bias": "binarized layers: biases",
        }.get(leaf, "binarized layers: other")
    if "word_embeddings" in key:
        return "word embeddings"
    if "embeddings" in key and "LayerNorm" not in key:
        return "position + token-type embeddings"
    if "LayerNorm" in key:
        return "LayerNorm"
    if key.startswith("classifier."):
        return "classifier"
    return "other"


def breakdown(path: str, binarized: set[str]) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    state = load_file(os.path.join(path, "model.safetensors"))
    out: dict[str, int] = {}
    for key, value in state.items():
        cat = categorize(key, binarized)
        out[cat] = out.get(cat, 0) + value.numel() * value.element_size()
    out["safetensors header"] = file_size(path) - sum(out.values())
    return out, state


# ---------------------------------------------------------------------------------------------------- measuring


def measure(
    res: Result,
    fp_dir: str,
    work: str,
    calibration: list[dict[str, torch.Tensor]],
    inputs: dict[int, dict[str, torch.Tensor]],
    args: argparse.Namespace,
) -> None:
    log = lambda msg: print(f"[{res.name}] {msg}", flush=True)  # noqa: E731
    res.sizes["fp32"] = file_size(fp_dir)

    # Binarize: StoMPP model from the FP32 checkpoint, all masks frozen, activation scales measured.
    model = AutoModelForSequenceClassification.from_pretrained(fp_dir, quantization_config=StoMPPConfig())
    ProgressionController(model, total_steps=1).advance(1)
    model.train()
    with torch.no_grad():
        for batch in calibration:
            model(**batch)
    model.eval()
    progress = binarization_progress(model)
    if not progress.complete:
        raise RuntimeError(f"{res.name}: model is not fully binary after advance(1): {progress}")
    layers = stompp_modules(model)
    res.binarized_layers = list(layers)
    res.binarized_weights = sum(m.weight.numel() for m in layers.values())
    check = inputs[max(inputs)]
    res.check_shape = tuple(check["input_ids"].shape)
    with torch.no_grad():
        reference = model(**check).logits

    dirs = {"packed_f32": os.path.join(work, "packed_f32"), "packed_f16": os.path.join(work, "packed_f16")}
    for variant, dtype in (("packed_f32", "float32"), ("packed_f16", "float16")):
        model.config.quantization_config.export_dtype = dtype
        model.save_pretrained(dirs[variant])
        if not model.config.quantization_config.packed:
            raise RuntimeError(f"{res.name}: save_pretrained wrote a latent checkpoint, not a packed one")
        res.sizes[variant] = file_size(dirs[variant])
        with open(os.path.join(dirs[variant], "config.json"), encoding="utf-8") as f:
            res.config_dtype[variant] = str(json.load(f).get("dtype"))
        res.breakdown[variant], state = breakdown(dirs[variant], set(layers))
        missing = [n for n in layers for s in ("weight", "weight_scale") if f"{n}.{s}" not in state]
        if missing:
            raise RuntimeError(f"{res.name}: packed checkpoint lacks {missing[:3]}")
        res.bits[variant] = packed_bits_per_weight(state, {n: m.weight.numel() for n, m in layers.items()})
        del state
    log(f"sizes {res.sizes}")
    del model, layers
    gc.collect()

    # Reload time: median of interleaved from_pretrained calls (OS file cache warm after the first round).
    dirs["fp32"] = fp_dir
    times: dict[str, list[float]] = {k: [] for k in ("fp32", "packed_f32", "packed_f16")}
    loaded: dict[str, torch.nn.Module] = {}
    load(fp_dir), load(dirs["packed_f32"])  # warm the file cache and the import paths
    for _ in range(args.reload_repeats):
        MONITOR.wait_idle()
        for variant in times:
            loaded.pop(variant, None)
            gc.collect()
            seconds, loaded[variant] = timed(lambda v=variant: load(dirs[v]))
            times[variant].append(seconds)
    res.reload = {k: statistics.median(v) for k, v in times.items()}
    res.reload_dtype = {k: str(next(m.parameters()).dtype).replace("torch.", "") for k, m in loaded.items()}
    log(f"reload {res.reload}")

    fp32, packed = loaded["fp32"], loaded["packed_f32"]
    cached = load(dirs["packed_f32"])
    set_unpack_cache(cached, True)
    for model in (packed, cached):  # the unpack-and-matmul path; the XNOR kernel is measured by inference.py
        set_kernel(model, "reference")
    with torch.no_grad():
        res.equal["cache off"] = torch.equal(packed(**check).logits, reference)
        res.equal["cache on"] = torch.equal(cached(**check).logits, reference)
        f16 = loaded["packed_f16"](**check).logits
        res.f16_max_diff = (f16.float() - reference).abs().max().item()
    del loaded["packed_f16"], f16
    gc.collect()

    # Eval latency, interleaved: every repeat runs each model once, in a fresh order.
    variants = {"fp32": fp32, "packed, cache off": packed, "packed, cache on": cached}
    names = list(variants)
    MONITOR.reset()
    with torch.no_grad():
        for batch in BATCHES:
            repeats = args.repeats_b1 if batch == 1 else args.repeats_b32
            # (the warm-up call fills the unpack cache of the cached model)
            samples = interleaved({n: lambda m=variants[n], x=inputs[batch]: m(**x) for n in names}, repeats)
            res.spread[batch] = max(iqr(v) for v in samples.values())
            for n in names:
                res.latency[(n, batch)] = statistics.median(samples[n])
                res.latency_min[(n, batch)] = min(samples[n])
            log(f"batch {batch}: " + ", ".join(f"{n} {res.latency[(n, batch)] * 1e3:.1f} ms" for n in names))

        binary = [m for m in packed.modules() if isinstance(m, BinaryMixin)]
        unpack = []
        for _ in range(args.repeats_b1):
            MONITOR.wait_idle()
            unpack.append(timed(lambda: [m.sign_weight(torch.float32) for m in binary])[0])
        res.unpack_once = statistics.median(unpack)

        # The elementwise input binarization alone: capture every BinaryLinear's input in one forward, re-time it.
        for batch in BATCHES:
            captured: list[tuple[BinaryMixin, torch.Tensor]] = []
            hooks = [
                m.register_forward_pre_hook(lambda mod, a, c=captured: c.append((mod, a[0])))
                for m in cached.modules()
                if isinstance(m, BinaryMixin)
            ]
            cached(**inputs[batch])
            for h in hooks:
                h.remove()
            repeats = args.repeats_b1 if batch == 1 else args.repeats_b32
            binarize = []
            for _ in range(repeats):
                MONITOR.wait_idle()
                binarize.append(timed(lambda c=captured: [m.binarize_input(x) for m, x in c])[0])
            res.binarize_inputs[batch] = statistics.median(binarize)
            captured.clear()
    res.other_cpu = MONITOR.cores
    log(f"other processes used {res.other_cpu:.2f} cores meanwhile")

    res.memory = {
        "fp32": model_bytes(fp32),
        "packed": model_bytes(packed),
        "cache": cache_bytes(cached),
    }
    del fp32, packed, cached, variants, loaded
    gc.collect()


def minilm(work: str, args: argparse.Namespace) -> Result:
    res = Result("MiniLM-L6", "real all-MiniLM-L6-v2 + random 2-label classifier")
    fp_dir = os.path.join(work, "fp32")
    torch.manual_seed(args.seed)
    fp = AutoModelForSequenceClassification.from_pretrained(assets.minilm_path(), num_labels=2)
    fp.save_pretrained(fp_dir)
    del fp
    tokenizer = AutoTokenizer.from_pretrained(assets.minilm_path())
    n_cal = CALIBRATION_BATCHES * CALIBRATION_BATCH_SIZE
    train, validation = assets.load_rotten_tomatoes(n_cal, max(BATCHES), args.seed)

    def encode(rows: list[dict]) -> dict[str, torch.Tensor]:
        sentences = [r["sentence"] for r in rows]
        return dict(
            tokenizer(sentences, padding="max_length", truncation=True, max_length=args.seq_len, return_tensors="pt")
        )

    calibration = [
        encode(train[i * CALIBRATION_BATCH_SIZE : (i + 1) * CALIBRATION_BATCH_SIZE])
        for i in range(CALIBRATION_BATCHES)
    ]
    inputs = {b: encode(validation[:b]) for b in BATCHES}
    measure(res, fp_dir, work, calibration, inputs, args)
    return res


def bert_base(work: str, args: argparse.Namespace) -> Result:
    config = BertConfig(num_labels=2)
    res = Result(
        "BERT-base-sized",
        f"BertConfig() defaults (hidden {config.hidden_size}, {config.num_hidden_layers} layers, vocab "
        f"{config.vocab_size}, intermediate {config.intermediate_size}), seeded random init",
    )
    fp_dir = os.path.join(work, "fp32")
    torch.manual_seed(args.seed)
    BertForSequenceClassification(config).save_pretrained(fp_dir)
    gen = torch.Generator().manual_seed(args.seed + 1)

    def random_batch(batch: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, config.vocab_size, (batch, args.seq_len), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    calibration = [random_batch(CALIBRATION_BATCH_SIZE) for _ in range(CALIBRATION_BATCHES)]
    inputs = {b: random_batch(b) for b in BATCHES}
    measure(res, fp_dir, work, calibration, inputs, args)
    return res


# ----------------------------------------------------------------------------------------------------- writing


def mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms"


def pct(a: float, b: float) -> str:
    return f"{100 * a / b:.1f}%"


def layer_summary(names: list[str]) -> str:
    encoder = [n for n in names if ".encoder." in n]
    rest = [n for n in names if ".encoder." not in n]
    return f"{len(names)}: {len(encoder)} encoder linears" + (
        f" + {', '.join(f'`{n}`' for n in rest)}" if rest else ""
    )


def render(results: list[Result], command: str, elapsed: float, args: argparse.Namespace) -> str:
    cols = [r.name for r in results]
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, fn: Callable[[Result], str]) -> None:
        rows.append((label, [fn(r) for r in results]))

    row("Model", lambda r: r.description)
    row("Binarized layers", lambda r: layer_summary(r.binarized_layers))
    row("Binarized weights", lambda r: f"{r.binarized_weights:,}")
    row("FP32 checkpoint (`model.safetensors`)", lambda r: mb(r.sizes["fp32"]))
    row(
        "Packed, float32 remainder (% of FP32)",
        lambda r: f"{mb(r.sizes['packed_f32'])} ({pct(r.sizes['packed_f32'], r.sizes['fp32'])})",
    )
    row(
        "Packed, float16 remainder (% of FP32)",
        lambda r: f"{mb(r.sizes['packed_f16'])} ({pct(r.sizes['packed_f16'], r.sizes['fp32'])})",
    )
    row(
        "Target: packed float16 / FP32",
        lambda r: (
            f"<= {100 * TARGETS[r.name]:.0f}%: "
            + ("**met**" if r.sizes["packed_f16"] <= TARGETS[r.name] * r.sizes["fp32"] else "**NOT met**")
            + f" ({pct(r.sizes['packed_f16'], r.sizes['fp32'])})"
        ),
    )
    row(
        "Bits per binarized weight, float32 / float16 export",
        lambda r: f"{r.bits['packed_f32']:.4f} / {r.bits['packed_f16']:.4f}",
    )
    row(
        f"Reload `from_pretrained`, median of {args.reload_repeats}: FP32",
        lambda r: f"{ms(r.reload['fp32'])} (loads as {r.reload_dtype['fp32']})",
    )
    for variant, label in (("packed_f32", "packed float32"), ("packed_f16", "packed float16")):
        row(
            f"Reload: {label} (x FP32)",
            lambda r, v=variant: (
                f"{ms(r.reload[v])} ({r.reload[v] / r.reload['fp32']:.2f}x; loads as {r.reload_dtype[v]})"
            ),
        )
    for batch in BATCHES:
        repeats = args.repeats_b1 if batch == 1 else args.repeats_b32
        row(
            f"Eval latency, batch {batch} x {args.seq_len} tokens, median of {repeats}: FP32",
            lambda r, b=batch: f"{ms(r.latency[('fp32', b)])} (fastest {ms(r.latency_min[('fp32', b)])})",
        )
        for variant in ("packed, cache off", "packed, cache on"):
            row(
                f"Eval latency, batch {batch}: {variant} (x FP32)",
                lambda r, b=batch, v=variant: (
                    f"{ms(r.latency[(v, b)])} ({r.latency[(v, b)] / r.latency[('fp32', b)]:.2f}x; fastest "
                    f"{ms(r.latency_min[(v, b)])}, {r.latency_min[(v, b)] / r.latency_min[('fp32', b)]:.2f}x)"
                ),
            )
    row(
        "Run-to-run spread: widest interquartile range of the three variants' repeats, "
        + " / ".join(f"batch {b}" for b in BATCHES),
        lambda r: " / ".join(ms(r.spread[b]) for b in BATCHES),
    )
    row(
        "Unpack every binarized weight once (the per-forward cost with cache off)",
        lambda r: (
            f"{ms(r.unpack_once)} ({pct(r.unpack_once, r.latency[('packed, cache off', 1)])} of batch-1 "
            "cache-off latency)"
        ),
    )
    row(
        "Input binarization `sign(x)` of every binarized layer, timed alone: "
        + " / ".join(f"batch {b}" for b in BATCHES),
        lambda r: " / ".join(ms(r.binarize_inputs[b]) for b in BATCHES),
    )
    row(
        "In-memory tensors: FP32 / packed / unpack cache adds",
        lambda r: f"{mb(r.memory['fp32'])} / {mb(r.memory['packed'])} / {mb(r.memory['cache'])}",
    )
    row(
        "Reloaded packed (float32 export) logits `torch.equal` in-memory binarized logits",
        lambda r: (
            f"cache off: **{'yes' if r.equal['cache off'] else 'NO'}**, cache on: "
            f"**{'yes' if r.equal['cache on'] else 'NO'}** (batch {r.check_shape[0]} x {r.check_shape[1]})"
        ),
    )
    row("Packed float16 export: max abs logit difference vs in-memory", lambda r: f"{r.f16_max_diff:.3g}")

    lines = [
        "# Packed 1-bit export: checkpoint size, reload time, CPU eval latency",
        "",
        "Reproduce (from the repository root):",
        "",
        "```bash",
        command,
        "```",
        "",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}",
        f"- CPU: {describe_cpu()}; "
        f"`torch.set_num_threads({args.threads})` -> `torch.get_num_threads()` = {torch.get_num_threads()}",
        f"- Sequence length {args.seq_len} for every forward pass (inputs padded / truncated to exactly "
        f"{args.seq_len} tokens). Activation scales measured by {CALIBRATION_BATCHES} `model.train()` forward passes "
        f"of batch {CALIBRATION_BATCH_SIZE} under `torch.no_grad()`. Seed {args.seed}.",
        "- MB = 10^6 bytes. Latencies: `model.eval()`, `torch.no_grad()`, one warm-up call per model, then the median "
        "of interleaved repeats (each repeat runs every model once, in a fresh order). Reload times: median of "
        "interleaved `from_pretrained` calls after one warm-up load (the files are in the OS page cache).",
        f"- Whole run: {elapsed / 60:.1f} min. Before each timing round the run waited until other processes used "
        f"at most {args.idle_threshold} cores over 0.3 s (total waiting budget {args.idle_budget:.0f} s; "
        f"waited {MONITOR.waited:.0f} s). CPU used by other processes during the timed calls "
        "(/proc/stat busy time minus this process's, averaged over the timed wall time): "
        + "; ".join(f"{r.name} {r.other_cpu:.2f} of {os.cpu_count()} cores" for r in results)
        + (
            ": the machine was shared, so latencies are noisy; the interleaving keeps the comparison side by "
            "side, and the fastest repeat is given too."
            if max(r.other_cpu for r in results) > 0.1
            else "."
        ),
        "",
        "| | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    lines += [f"| {label} | " + " | ".join(values) + " |" for label, values in rows]

    # Where the bytes of the packed checkpoints are.
    cats: list[str] = []
    for r in results:
        for part in r.breakdown.values():
            cats += [c for c in part if c not in cats]
    cats.sort(key=lambda c: -max(r.breakdown["packed_f16"].get(c, 0) for r in results))
    lines += [
        "",
        "## Where the bytes of the packed checkpoints are",
        "",
        "| Part of `model.safetensors` | "
        + " | ".join(f"{r.name} {e}" for r in results for e in ("float32", "float16"))
        + " |",
        "|---|" + "---|" * (2 * len(results)),
    ]
    for cat in cats:
        cells = []
        for r in results:
            for variant in ("packed_f32", "packed_f16"):
                n = r.breakdown[variant].get(cat, 0)
                cells.append(f"{mb(n)} ({pct(n, r.sizes[variant])})")
        lines.append(f"| {cat} | " + " | ".join(cells) + " |")

    lines += ["", "## Reading the numbers", ""] + prose(results, args)
    return "\n".join(lines) + "\n"


def prose(results: list[Result], args: argparse.Namespace) -> list[str]:
    out = []
    sign = "binarized layers: sign bits (weight, uint8)"
    for r in results:
        part = r.breakdown["packed_f16"]
        total = r.sizes["packed_f16"]
        top, top_bytes = max(((c, n) for c, n in part.items()), key=lambda cn: cn[1])
        full_precision = total - part.get(sign, 0)
        out.append(
            f"- **{r.name}, size.** The {r.binarized_weights:,} binarized weights cost {mb(part.get(sign, 0))} of "
            f"sign bits ({pct(part.get(sign, 0), total)} of the float16 packed file); everything else, "
            f"{mb(full_precision)} ({pct(full_precision, total)}), is the full-precision remainder. The largest part "
            f"is **{top}** at {mb(top_bytes)} ({pct(top_bytes, total)}): embeddings are lookup tables, not linear "
            "layers, so StoMPP keeps them full precision, and `export_dtype='float16'` only halves them. "
            f"Bits per binarized weight are {r.bits['packed_f16']:.4f} with float16 scales "
            f"({r.bits['packed_f32']:.4f} with float32 ones): 1 bit of sign plus one per-output-channel scale per row "
            "of each weight matrix. The float32 export keeps the remainder at 4 bytes per value, hence "
            f"{pct(r.sizes['packed_f32'], r.sizes['fp32'])} of FP32 instead of "
            f"{pct(r.sizes['packed_f16'], r.sizes['fp32'])}."
        )
    if len(results) > 1:
        share = {r.name: r.sizes["packed_f16"] / r.sizes["fp32"] for r in results}
        best, worst = min(results, key=lambda r: share[r.name]), max(results, key=lambda r: share[r.name])
        emb = {r.name: r.breakdown["packed_f32"].get("word embeddings", 0) / r.sizes["fp32"] for r in results}
        out.append(
            f"- **Model size matters.** {best.name} packs to {pct(best.sizes['packed_f16'], best.sizes['fp32'])} of "
            f"FP32, {worst.name} to {pct(worst.sizes['packed_f16'], worst.sizes['fp32'])}. The word embeddings are "
            + ", ".join(f"{100 * emb[r.name]:.1f}% of the {r.name} FP32 checkpoint" for r in results)
            + "; whatever the FP32 checkpoint spends on full-precision tensors survives packing at half size "
            "(float16), and only the binarized linears shrink 32-fold, so the more of a model's bytes sit in "
            "linear layers, the smaller its packed ratio."
        )
    for r in results:
        lat = r.latency
        off, on = "packed, cache off", "packed, cache on"
        ratio = {v: [lat[(v, b)] / lat[("fp32", b)] for b in BATCHES] for v in (off, on)}
        gap = [lat[(off, b)] - lat[(on, b)] for b in BATCHES]
        rest = [lat[(on, b)] - lat[("fp32", b)] for b in BATCHES]
        both = lambda xs, f: " and ".join(f"{f(x)} (batch {b})" for x, b in zip(xs, BATCHES))  # noqa: E731
        out.append(
            f"- **{r.name}, latency.** In the reference mode measured here (`set_kernel(model, 'reference')`) a "
            "`BinaryLinear` forward unpacks its sign bits to a +-1 float32 matrix and runs the same dense "
            "`F.linear` as the FP32 layer on `sign(x)`, then multiplies the output by `beta * alpha`; no bit-level "
            "kernel is used, so no CPU speed-up is expected, only overhead (the default `'auto'` mode runs the "
            "XNOR-popcount kernel instead: `benchmarks/results/inference.md`). Measured: cache off runs at "
            + both(ratio[off], lambda x: f"{x:.2f}x")
            + ", cache on at "
            + both(ratio[on], lambda x: f"{x:.2f}x")
            + " the FP32 median. With the cache off every forward re-unpacks all "
            f"{len(r.binarized_layers)} layers; unpacking them once, timed alone, takes {ms(r.unpack_once)}, and "
            "the measured cache-off minus cache-on gap is "
            + both(gap, ms)
            + ". "
            + "".join(
                f"At batch {b} that gap is within the run-to-run spread (interquartile range of one model's "
                f"repeats up to {ms(r.spread[b])}), so it is not resolved there. "
                for g, b in zip(gap, BATCHES)
                if abs(g) < r.spread[b]
            )
            + "The unpacking does not grow with the batch, so it weighs most at batch 1. The cache costs "
            f"{mb(r.memory['cache'])} of resident float32 weights on top of the {mb(r.memory['packed'])} of packed "
            "tensors. With it, the matmuls are FP32's own and what remains is elementwise: every `BinaryLinear` "
            "computes `sign(x)` of its own input (query, key and value each binarize the same hidden states) and "
            "scales its output, passes that each write a fresh activation-sized tensor: memory-bound work that "
            "grows with the batch. "
            "Cache-on minus FP32 is "
            + both(rest, ms)
            + "; that binarization, timed alone on the inputs of one forward, takes "
            + both([r.binarize_inputs[b] for b in BATCHES], ms)
            + "."
        )
    for r in results:
        if r.reload_dtype.get("packed_f16") != "float16":
            out.append(
                f"- **{r.name}, reload.** The float16 export reloads as a {r.reload_dtype.get('packed_f16')} model "
                f"(its config.json records dtype {r.config_dtype.get('packed_f16')}), so float16 saves disk and "
                "download, not memory once loaded."
            )
    out.append(
        "- **Exactness.** The float32 export reproduces the in-memory binarized model's logits bit for bit when "
        "the equality row says yes; the float16 export cannot, because its embeddings, LayerNorm, classifier, biases "
        "and weight scales were rounded to float16 (max abs logit difference in the table)."
    )
    slower = [r.name for r in results if r.reload["packed_f32"] > r.reload["fp32"]]
    if slower:
        out.append(
            f"- **Reload time.** Although it reads fewer bytes, the packed float32 checkpoint reloads slower than "
            f"FP32 for {', '.join(slower)}. With the files in the OS page cache, reading bytes is cheap; the packed "
            "path does extra work (the quantizer reads the safetensors headers to find the packed layers, checks "
            "their shapes and swaps in `BinaryLinear` modules; the float16 export is also upcast to float32), which "
            "is the likely cost. This run does not profile it further."
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for the whole run")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats-b1", type=int, default=30, help="timed repeats at batch 1")
    parser.add_argument("--repeats-b32", type=int, default=9, help="timed repeats at batch 32")
    parser.add_argument("--reload-repeats", type=int, default=5, help="timed from_pretrained calls per checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", nargs="+", default=["minilm", "bert-base"], choices=["minilm", "bert-base"])
    parser.add_argument("--output", default=RESULTS)
    parser.add_argument(
        "--idle-threshold",
        type=float,
        default=0.2,
        help="before each timing round, wait until other processes use at most this many cores",
    )
    parser.add_argument("--idle-budget", type=float, default=180.0, help="total seconds the run may wait for idle")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    MONITOR.threshold, MONITOR.budget = args.idle_threshold, args.idle_budget
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    env = "HF_HUB_OFFLINE=1 " if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
    command = env + ".venv/bin/python " + shlex.join(["benchmarks/export_size.py", *sys.argv[1:]])

    start = time.perf_counter()
    results = []
    builders = {"minilm": minilm, "bert-base": bert_base}
    for key in args.models:
        with tempfile.TemporaryDirectory(prefix=f"export_size_{key}_") as work:
            results.append(builders[key](work, args))
        gc.collect()
    text = render(results, command, time.perf_counter() - start, args)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
