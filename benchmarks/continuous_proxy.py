"""How much of a fine-tuned transformer's function the StoMPP continuous input path keeps, by clip bound.

Reproduce (from the repository root; a fine-tuned full-precision checkpoint first, e.g. the `fp` row of the GLUE
table; about 1 minute on 2 cores):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/continuous_proxy.py --model outputs/glue/fp-seed0

Writes `benchmarks/results/continuous_proxy.md`. Before its stage starts, every StoMPP tensor is continuous: a
weight is the identity and an input is `clip(x, -c, c)` with `c = activation_clip * beta` (beta = mean |x|, or 1
with `activation_scale="none"`; docs/design.md, Eq. 1). A student initialised from a fine-tuned model therefore
starts as that model with its binarized layers' inputs clipped. This script converts the checkpoint with each
clip bound, leaves every mask continuous (step 0 of the progression), and evaluates it on the packaged Rotten
Tomatoes validation snippets (the SST-2 stand-in of `recipes/glue.py`): accuracy, agreement of its predictions
with the full-precision model's, and the share of input entries the clip changes. The fully frozen network
(`binarized`) at step 0 is the other end of the progression. Evaluation only: nothing is trained.
"""

from __future__ import annotations

import argparse
import os

import torch
from common import results_header
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from stompp_hf import StoMPPConfig, binarized
from stompp_hf.assets import load_rotten_tomatoes
from stompp_hf.conversion import stompp_modules

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "continuous_proxy.md")


def batches(tokenizer, samples: list[dict], size: int, max_length: int):
    for start in range(0, len(samples), size):
        chunk = samples[start : start + size]
        inputs = tokenizer(
            [s["sentence"] for s in chunk], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        )
        yield inputs, torch.tensor([s["label"] for s in chunk])


class ClipCounter:
    """Counts, over every binarized layer's input, the entries with |x| > c (the ones the continuous clip changes)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.clipped = self.total = 0
        self.handles = [m.register_forward_pre_hook(self.hook) for m in stompp_modules(model).values()]
        self.binarizers = {id(m): m.input_binarizer for m in stompp_modules(model).values()}

    def hook(self, module: torch.nn.Module, args: tuple) -> None:
        binarizer = self.binarizers[id(module)]
        if binarizer is None:
            return
        x = args[0].detach()
        scale = x.abs().mean() if binarizer.scale is not None else 1.0
        self.clipped += int((x.abs() > binarizer.clip * scale).sum())
        self.total += x.numel()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def evaluate(model, tokenizer, samples, reference=None, max_length=64):
    """(accuracy, agreement with `reference` predictions, predictions)."""
    model.eval()
    preds, labels = [], []
    for inputs, y in batches(tokenizer, samples, 128, max_length):
        preds.append(model(**inputs).logits.argmax(-1))
        labels.append(y)
    preds, labels = torch.cat(preds), torch.cat(labels)
    accuracy = float((preds == labels).float().mean())
    agreement = float((preds == reference).float().mean()) if reference is not None else 1.0
    return accuracy, agreement, preds


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="outputs/glue/fp-seed0", help="A fine-tuned full-precision checkpoint.")
    parser.add_argument("--clips", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0, 16.0, 1000.0])
    parser.add_argument("--samples", type=int, default=1000, help="Validation snippets evaluated.")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not os.path.isdir(args.model):
        raise SystemExit(
            f"{args.model} is not a checkpoint folder: train the full-precision row first, e.g. "
            "`recipes/glue_experiments.py recipes/experiments/glue/fp.json --seeds 0`."
        )
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    _, samples = load_rotten_tomatoes(0, args.samples)
    fp = AutoModelForSequenceClassification.from_pretrained(args.model)
    fp_accuracy, _, reference = evaluate(fp, tokenizer, samples)

    settings = [("tensor", c) for c in args.clips] + [("none", 1.0)]
    rows, frozen = [], {}
    for scale, clip in settings:
        config = StoMPPConfig(
            weights="stompp_ste",
            activations="stompp_ste",
            granularity="block",
            activation_scale=scale,
            activation_clip=clip,
        )
        model = AutoModelForSequenceClassification.from_pretrained(args.model, quantization_config=config)
        accuracy, agreement, _ = evaluate(model, tokenizer, samples, reference)
        counter = ClipCounter(model)  # the clipped share, on the first 256 snippets
        evaluate(model, tokenizer, samples[:256])
        counter.remove()
        if scale not in frozen:  # the clip bound does not change the all-frozen forward
            with binarized(model):
                frozen[scale] = evaluate(model, tokenizer, samples, reference)[0]
        bound = f"{clip:g} beta" if scale == "tensor" else f"{clip:g} (no scale)"
        if scale == "tensor" and clip >= 1000:
            bound += " (never clips)"
        rows.append((bound, accuracy, agreement, counter.clipped / max(1, counter.total), frozen[scale]))
        print(rows[-1], flush=True)

    command = "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/continuous_proxy.py --model " + args.model
    lines = [
        *results_header("What the continuous input path keeps of a fine-tuned model", command),
        f"Checkpoint: `{args.model}` (full precision, {fp_accuracy:.1%} on {len(samples)} validation snippets).",
        "Every StoMPP tensor continuous (step 0 of the progression): weights the identity, binarized layers' inputs",
        "`clip(x, -c, c)`. 'agreement' is the share of predictions equal to the full-precision model's; 'clipped' the",
        "share of input entries with |x| > c; 'all frozen' the same conversion under `binarized` (W1A1, no training).",
        "",
        "| clip bound c | accuracy | agreement with FP | clipped | all frozen |",
        "|---|---:|---:|---:|---:|",
        f"| full precision | {fp_accuracy:.1%} | 100.0% | 0.0% | n/a |",
    ]
    lines += [f"| {b} | {a:.1%} | {g:.1%} | {c:.1%} | {f:.1%} |" for b, a, g, c, f in rows]
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        f.write(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
