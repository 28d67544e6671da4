"""Binarized inference: latency and resident memory of the reloaded packed model against FP32, per execution mode.

Reproduce (from the repository root, on an otherwise idle machine; about 10 minutes on 2 cores):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/inference.py --threads 2

Writes `benchmarks/results/inference.md`. Two models: the packaged all-MiniLM-L6-v2 (with a seeded random 2-label
classifier) and a BERT-base-sized `BertConfig()` with seeded random weights. Each is saved FP32, reloaded with
`StoMPPConfig()`, made fully binary, its activation scales measured by a few `model.train()` forwards, saved packed
(`save_pretrained`) and reloaded with `from_pretrained`. Execution modes of the reloaded packed model
(`stompp_hf.set_kernel`, `stompp_hf.set_unpack_cache`):

* `reference`: every forward unpacks the sign bits to a +-1 float matrix and runs the dense matmul;
* `reference + unpack cache`: the +-1 float matrices stay resident after the first forward;
* `xnor`: the bit-packed XNOR-popcount kernel of `stompp_hf.kernels.xnor` (weights stay packed, inputs are packed
  to bits on the fly).

Measured for each, batch 1 and 32 at sequence length 128, `model.eval()` under `torch.no_grad()`:

* whole-model latency: median of interleaved repeats (each repeat runs every mode once, rotating the order);
* binarized layers alone: the inputs of every binarized linear layer are captured in one forward, then the FP32
  model's `nn.Linear` layers and each mode's packed layers are run on them, interleaved; this isolates what the
  1-bit layers cost from the attention, embeddings and LayerNorms they do not change;
* resident memory: a fresh process per mode loads the model and runs one forward at batch 1 then one at batch 32;
  `VmRSS` after loading and `VmHWM` (peak) at the end, including the Python / torch baseline;
* exactness: logits of every packed mode at batch 1 and 32 against the in-memory binarized model (`torch.equal`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from common import MONITOR, interleaved, iqr, results_header, vm_status_kib

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "inference.md")
BATCHES = (1, 32)
SEQ = 128
TARGET = 1.5  # binarized layers of the fastest packed mode vs FP32, batch 1
#: mode -> (kernel, unpack cache); None = the FP32 model
MODES: dict[str, tuple[str, bool] | None] = {
    "FP32": None,
    "packed, reference": ("reference", False),
    "packed, reference + unpack cache": ("reference", True),
    "packed, xnor": ("xnor", False),
}
MODELS = {"minilm": "all-MiniLM-L6-v2", "base": "BERT-base-sized"}


def log(msg: str) -> None:
    print(f"[inference] {msg}", flush=True)


def fp_model(key: str):
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    from stompp_hf.assets import minilm_path

    torch.manual_seed(0)
    if key == "minilm":
        return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    return BertForSequenceClassification(BertConfig(num_labels=2))


def token_batch(vocab: int, batch: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000 if vocab > 2000 else 5, vocab, (batch, SEQ), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def load(path: str, mode: str):
    """The model of `mode` from the FP32 (`path/fp32`) or packed (`path/packed`) checkpoint, in eval mode."""
    from transformers import AutoModelForSequenceClassification

    import stompp_hf

    setting = MODES[mode]
    model = AutoModelForSequenceClassification.from_pretrained(
        os.path.join(path, "fp32" if setting is None else "packed")
    )
    if setting is not None:
        kernel, cache = setting
        stompp_hf.set_kernel(model, kernel)
        stompp_hf.set_unpack_cache(model, cache)
    return model.eval()


def prepare(key: str, work: str) -> tuple[dict[int, dict[str, torch.Tensor]], dict[int, torch.Tensor], dict]:
    """Save the FP32 and packed checkpoints under `work`; return inputs, in-memory binarized logits, and facts."""
    from transformers import AutoModelForSequenceClassification

    from stompp_hf import ProgressionController, StoMPPConfig
    from stompp_hf.conversion import stompp_modules
    from stompp_hf.export import binarization_progress

    fp = fp_model(key)
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
            model(**token_batch(vocab, 8, 100 + seed))
    model.eval()
    if not binarization_progress(model).complete:
        raise RuntimeError(f"{key}: not fully binary")
    layers = stompp_modules(model)
    inputs = {b: token_batch(vocab, b, b) for b in BATCHES}
    with torch.no_grad():
        reference = {b: model(**inputs[b]).logits for b in BATCHES}
    model.save_pretrained(os.path.join(work, "packed"))
    facts = {
        "layers": len(layers),
        "weights": sum(m.weight.numel() for m in layers.values()),
        "shapes": sorted({tuple(m.weight.shape) for m in layers.values()}),
    }
    return inputs, reference, facts


def whole_model(models: dict, inputs: dict, repeats: dict[int, int]) -> dict[tuple[str, int], list[float]]:
    names = list(models)
    samples: dict[tuple[str, int], list[float]] = {}
    with torch.no_grad():
        for b in BATCHES:
            # (the warm-up call fills the unpack cache and builds the kernel)
            runs = interleaved({n: lambda m=models[n], x=inputs[b]: m(**x) for n in names}, repeats[b])
            samples.update({(n, b): v for n, v in runs.items()})
            medians = ", ".join(f"{n} {ms(statistics.median(samples[(n, b)]))} ms" for n in names)
            log(f"batch {b}: {medians}")
    return samples


def binarized_layers(models: dict, inputs: dict, repeats: dict[int, int]) -> dict[tuple[str, int], list[float]]:
    """Time only the binarized layers: each mode's layers on the inputs captured from one packed forward."""
    from stompp_hf.nn import BinaryMixin

    packed_names = [n for n in models if MODES[n] is not None]
    probe = models[packed_names[0]]
    names_in_model = [name for name, m in probe.named_modules() if isinstance(m, BinaryMixin)]
    layers = {n: [models[n].get_submodule(name) for name in names_in_model] for n in models}
    samples: dict[tuple[str, int], list[float]] = {}
    with torch.no_grad():
        for b in BATCHES:
            captured: list[torch.Tensor] = []
            hooks = [
                m.register_forward_pre_hook(lambda mod, a, c=captured: c.append(a[0])) for m in layers[packed_names[0]]
            ]
            probe(**inputs[b])
            for h in hooks:
                h.remove()

            def run(mods, xs=captured):
                for m, x in zip(mods, xs):
                    m(x)

            runs = interleaved({n: lambda mods=layers[n]: run(mods) for n in models}, repeats[b])
            samples.update({(n, b): v for n, v in runs.items()})
            del captured
    return samples


def memory_child(path: str, mode: str) -> None:
    import transformers  # noqa: F401  (the import baseline is measured before the model exists)

    import stompp_hf  # noqa: F401

    vocab = int(os.environ["STOMPP_BENCH_VOCAB"])
    baseline = vm_status_kib("VmRSS")
    model = load(path, mode)
    tensors = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if t is not None)
    with torch.no_grad():
        for b in BATCHES:
            model(**token_batch(vocab, b, b))
    peak = vm_status_kib("VmHWM")
    print(json.dumps({"tensors_mib": tensors / 2**20, "baseline_mib": baseline / 1024, "peak_mib": peak / 1024}))


def memory(path: str, mode: str, vocab: int, threads: int) -> dict[str, float]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", path, mode]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "STOMPP_BENCH_VOCAB": str(vocab)}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["increment_mib"] = result["peak_mib"] - result["baseline_mib"]
    return result


def median(values: list[float]) -> float:
    return statistics.median(values)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def measure(key: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as work:
        log(f"{MODELS[key]}: building checkpoints")
        inputs, reference, facts = prepare(key, work)
        models = {mode: load(work, mode) for mode in MODES}
        vocab = models["FP32"].config.vocab_size
        exact = {}
        with torch.no_grad():
            for mode, model in models.items():
                if MODES[mode] is not None:
                    exact[mode] = all(torch.equal(model(**inputs[b]).logits, reference[b]) for b in BATCHES)
        log(f"{MODELS[key]}: bit-identical {exact}")
        repeats = {1: args.repeats_b1, 32: args.repeats_b32}
        if key == "base":
            repeats = {1: max(3, args.repeats_b1 // 3), 32: max(3, args.repeats_b32 // 2)}
        MONITOR.reset()
        whole = whole_model(models, inputs, repeats)
        layer = binarized_layers(models, inputs, {b: 2 * r for b, r in repeats.items()})
        other_cpu = MONITOR.cores
        del models
        gc.collect()
        mem = {mode: memory(work, mode, vocab, args.threads) for mode in MODES}
        log(f"{MODELS[key]}: memory {mem}")
    return {
        "facts": facts,
        "exact": exact,
        "whole": whole,
        "layer": layer,
        "memory": mem,
        "repeats": repeats,
        "other_cpu": other_cpu,
    }


def render(results: dict[str, dict], command: str, args: argparse.Namespace, elapsed: float) -> str:
    import transformers

    lines = [
        *results_header("Binarized inference: packed 1-bit models against FP32", command),
        f"- Machine: {platform.machine()}, transformers {transformers.__version__}, "
        f"`torch.set_num_threads({args.threads})`, no GPU. Whole run "
        f"{elapsed / 60:.1f} min.",
        f"- Sequence length {SEQ}; `model.eval()`, `torch.no_grad()`; one warm-up call per mode, then medians of "
        "interleaved repeats (every repeat runs each mode once, rotating the order). Ratios are FP32 median / mode "
        "median: above 1 is faster than FP32.",
        "- Modes of the reloaded packed model: `reference` unpacks the sign bits to a +-1 float matrix on every "
        "forward and runs the dense matmul; `+ unpack cache` keeps that matrix resident; `xnor` runs the bit-packed "
        "XNOR-popcount kernel (`stompp_hf.kernels.xnor`): weights stay 1 bit, inputs are packed to bits on the fly, "
        "`dot = K - 2 * popcount(x_bits XOR w_bits)`, then `* (beta * alpha) + bias` as in the reference.",
        "- Memory: a fresh process per mode imports torch, transformers and stompp_hf (the baseline RSS), loads the "
        "model and runs one forward at batch 1 and one at batch 32; the table gives the model's parameters and "
        "buffers in bytes and the peak RSS (`VmHWM`) minus the baseline: weights, activations, allocator and "
        "kernel overheads together. (`from_pretrained` memory-maps safetensors, so RSS right after loading would "
        "not count weights that no forward has touched yet.)",
        "",
    ]
    for key, r in results.items():
        f = r["facts"]
        lines += [
            f"## {MODELS[key]}",
            "",
            f"{f['layers']} binarized linear layers, {f['weights']:,} binarized weights; weight shapes "
            + ", ".join("x".join(map(str, s)) for s in f["shapes"])
            + f". Repeats: {r['repeats'][1]} (batch 1) and {r['repeats'][32]} (batch 32) for the whole model, twice "
            f"that for the layers alone. Other processes used {r['other_cpu']:.2f} of {os.cpu_count()} cores during "
            "the timed calls.",
            "",
            "| mode | model, batch 1 (ms) | x FP32 | model, batch 32 (ms) | x FP32 | binarized layers, batch 1 (ms) "
            "| x FP32 | binarized layers, batch 32 (ms) | x FP32 | model tensors (MiB) | peak RSS over baseline (MiB) "
            "| logits bit-identical |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for mode in MODES:
            cells = [mode]
            for table in ("whole", "layer"):
                for b in BATCHES:
                    t = median(r[table][(mode, b)])
                    fp = median(r[table][("FP32", b)])
                    cells += [ms(t), f"{fp / t:.2f}"]
            # reorder: whole b1, whole b32, layer b1, layer b32 already in that order
            mem = r["memory"][mode]
            cells += [f"{mem['tensors_mib']:.1f}", f"{mem['increment_mib']:.0f}"]
            cells.append("(reference model)" if MODES[mode] is None else ("**yes**" if r["exact"][mode] else "NO"))
            lines.append("| " + " | ".join(cells) + " |")
        spreads = {b: max(iqr(v) for (m, bb), v in r["layer"].items() if bb == b) for b in BATCHES}
        lines += [
            "",
            f"Widest interquartile range of the layer timings: {ms(spreads[1])} ms (batch 1), {ms(spreads[32])} ms "
            "(batch 32).",
            "",
        ]
    lines += ["## Reading", ""]
    for key, r in results.items():
        fp = median(r["layer"][("FP32", 1)])
        best = max((m for m in MODES if MODES[m] is not None), key=lambda m: fp / median(r["layer"][(m, 1)]))
        speed = fp / median(r["layer"][(best, 1)])
        verdict = "**met**" if speed >= TARGET and r["exact"][best] else "**not met**"
        fp_mem, xn_mem = r["memory"]["FP32"], r["memory"]["packed, xnor"]
        lines.append(
            f"- **{MODELS[key]}**: the fastest packed mode at batch 1 is `{best}`: its binarized layers run "
            f"{speed:.2f}x faster than the FP32 layers (target >= {TARGET}x with bit-identical logits: {verdict}); "
            f"the whole model {median(r['whole'][('FP32', 1)]) / median(r['whole'][(best, 1)]):.2f}x. At batch 32: "
            f"layers {median(r['layer'][('FP32', 32)]) / median(r['layer'][(best, 32)]):.2f}x, whole model "
            f"{median(r['whole'][('FP32', 32)]) / median(r['whole'][(best, 32)]):.2f}x. Memory with `xnor`: "
            f"{xn_mem['tensors_mib']:.1f} MiB of tensors vs {fp_mem['tensors_mib']:.1f} MiB for FP32 "
            f"({xn_mem['tensors_mib'] / fp_mem['tensors_mib']:.2f}x); peak RSS over baseline "
            f"{xn_mem['increment_mib']:.0f} vs {fp_mem['increment_mib']:.0f} MiB "
            f"({xn_mem['increment_mib'] / fp_mem['increment_mib']:.2f}x)."
        )
    lines += [
        "- What is left of the whole-model time in `xnor` mode is what binarization does not touch: attention "
        "(scores and softmax over 128 positions, in float32), the embeddings, LayerNorms, GELU and the classifier.",
        "- GPU: no accelerator was lent to this session, so there are no GPU rows; the XNOR kernel is CPU-only and "
        "GPU models use the reference path.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats-b1", type=int, default=30)
    parser.add_argument("--repeats-b32", type=int, default=7)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--idle-threshold", type=float, default=0.2)
    parser.add_argument("--idle-budget", type=float, default=180.0)
    parser.add_argument("--output", default=RESULTS)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        memory_child(*args.child)
        return
    torch.set_num_threads(args.threads)
    MONITOR.threshold, MONITOR.budget = args.idle_threshold, args.idle_budget
    command = "HF_HUB_OFFLINE=1 .venv/bin/python " + shlex.join(["benchmarks/inference.py", *sys.argv[1:]])
    start = time.perf_counter()
    results = {key: measure(key, args) for key in args.models}
    text = render(results, command, args, time.perf_counter() - start)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
