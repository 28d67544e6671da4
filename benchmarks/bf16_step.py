"""Training-step time in bf16 autocast against fp32 on CPU, for full precision and StoMPP+STE.

Reproduce (from the repository root, on an otherwise idle machine):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bf16_step.py --threads 2

Writes `benchmarks/results/bf16_step.md`. The packaged all-MiniLM-L6-v2 at batch 32 x sequence 128, built and
stepped as in `train_overhead.py` (forward, backward, AdamW step, mask advance; StoMPP+STE at the middle of the
middle stage of a 10,000-step progression). Each step of the bf16 setups runs its forward under
`torch.autocast("cpu", dtype=torch.bfloat16)`, as `Trainer` does with `bf16=True, use_cpu=True`; the weights and
the optimizer stay fp32. The four setups are measured in one process, round-robin (the order rotating every
round), and the table gives medians and ratios from the same rounds. This is a timing: no accuracy claim rests on
it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time

import torch
from common import iqr, results_header
from train_overhead import build, one_step

SETUPS = [("FP", "fp32"), ("FP", "bf16"), ("StoMPP+STE", "fp32"), ("StoMPP+STE", "bf16")]
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=11)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--output", default="benchmarks/results/bf16_step.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setups = {key: build("minilm", key[0], args.batch, args.seq) for key in SETUPS}
    times: dict[tuple[str, str], list[float]] = {key: [] for key in SETUPS}
    for round_ in range(args.warmup + args.steps):
        # the order rotates every round, so no setup always runs after the same one (this VM's speed drifts over
        # seconds, and a step leaves the caches and the allocator to the next)
        keys = SETUPS[round_ % len(SETUPS) :] + SETUPS[: round_ % len(SETUPS)]
        for key in keys:
            start = time.perf_counter()
            one_step(*setups[key], autocast=AUTOCAST[key[1]])
            if round_ >= args.warmup:
                times[key].append(time.perf_counter() - start)
        print(f"  round {round_ + 1}/{args.warmup + args.steps}", flush=True)
    median = {key: statistics.median(v) for key, v in times.items()}

    def paired(a: tuple[str, str], b: tuple[str, str]) -> str:
        """Median and interquartile range of the per-round ratios a / b (both timed in the same round)."""
        ratios = [x / y for x, y in zip(times[a], times[b])]
        return f"{statistics.median(ratios):.3f} ({iqr(ratios):.3f})"

    command = "HF_HUB_OFFLINE=1 .venv/bin/python " + shlex.join(["benchmarks/bf16_step.py", *sys.argv[1:]])
    lines = [
        *results_header("Training step in bf16 autocast vs fp32 (CPU)", command),
        f"all-MiniLM-L6-v2, batch {args.batch} x sequence {args.seq}, {args.steps} timed rounds after "
        f"{args.warmup} warm-up, setups interleaved (the order rotating every round). Steps: median (interquartile "
        "range) over the rounds; ratios: median (interquartile range) of the ratios of the two steps timed in the "
        "same round.",
        "",
        "| rule | fp32 step (s) | bf16 step (s) | bf16 / fp32 | step / FP step (fp32) | step / FP step (bf16) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for rule in ("FP", "StoMPP+STE"):
        f32, b16 = (rule, "fp32"), (rule, "bf16")
        lines.append(
            f"| {rule} | {median[f32]:.3f} ({iqr(times[f32]):.3f}) | {median[b16]:.3f} ({iqr(times[b16]):.3f}) | "
            f"{paired(b16, f32)} | {paired(f32, ('FP', 'fp32'))} | {paired(b16, ('FP', 'bf16'))} |"
        )
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
