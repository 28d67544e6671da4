"""Training-step time of StoMPP+STE against full precision on CPU, in fp32 and in bf16 autocast, at three points of
the progression.

Reproduce (from the repository root, on an otherwise idle machine):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bf16_step.py

Writes `benchmarks/results/bf16_step.md`. The packaged all-MiniLM-L6-v2 at batch 32 x sequence 128, built and stepped
as in `train_overhead.py` (forward, backward, AdamW step, mask advance) with a 10,000-step progression of 7 stages (one
per encoder block, then the pooler), StoMPP+STE at the middle of its first stage (block 0 transitioning, everything
after it continuous), of its middle stage (blocks 0-2 frozen, block 3 transitioning, the rest continuous) and of its
last stage (every block frozen, the pooler transitioning). Each step of the bf16 setups runs its forward under
`torch.autocast("cpu", dtype=torch.bfloat16)`, as `Trainer` does with `bf16=True, use_cpu=True`; the weights and the
optimizer stay fp32. All setups are measured in one process, round-robin (in a fresh order every round:
`common.round_order`), and every ratio is the median of the per-round ratios of two steps timed in the same round, with
its interquartile range and a distribution-free 95% confidence interval of that median. One table per thread count
(default 1 and 2, measured one after the other): on the 2-vCPU VMs of this project a 2-thread step varies by 10-25%
from one step to the next, a 1-thread step by 2-4%, so the 1-thread ratios are the precise ones. On a CPU without bf16
instructions only fp32 is measured (`--precisions` overrides): PyTorch emulates bf16 there, 24x slower per step. This
is a timing: no accuracy claim rests on it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time

import torch
from common import iqr, median_ci, results_header, round_order
from train_overhead import build, one_step

from stompp_hf.kernels.cpu import has_native_bf16

PRECISIONS = ("fp32", "bf16")
POSITIONS = ("first", "middle", "last")
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--threads", default="1,2", help="comma-separated thread counts, one table each, measured one after another"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=31)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--positions", default=",".join(POSITIONS), help="comma-separated subset of " + str(POSITIONS))
    parser.add_argument(
        "--precisions",
        default=None,
        help="comma-separated subset of " + str(PRECISIONS) + "; default both, fp32 alone on a CPU without bf16 "
        "instructions (where autocast emulates bf16: 24x slower per step, and no user would train so)",
    )
    parser.add_argument("--output", default="benchmarks/results/bf16_step.md")
    args = parser.parse_args()
    native_bf16 = has_native_bf16() is not False
    precisions = args.precisions.split(",") if args.precisions else list(PRECISIONS if native_bf16 else ("fp32",))
    if not precisions or any(p not in PRECISIONS for p in precisions):
        parser.error(f"--precisions takes a comma-separated subset of {PRECISIONS}, got {args.precisions!r}")
    positions = [p for p in args.positions.split(",") if p]
    if not positions or any(p not in POSITIONS for p in positions):
        parser.error(f"--positions takes a comma-separated subset of {POSITIONS}, got {args.positions!r}")
    try:
        thread_counts = [int(t) for t in args.threads.split(",")]
    except ValueError:
        thread_counts = []
    if not thread_counts or min(thread_counts) < 1:
        parser.error(f"--threads takes comma-separated positive integers, got {args.threads!r}")
    keys = [("FP", None, prec) for prec in precisions]
    keys += [("StoMPP+STE", pos, prec) for pos in positions for prec in precisions]
    setups = {key: build("minilm", key[0], args.batch, args.seq, key[1] or "middle") for key in keys}
    command = "HF_HUB_OFFLINE=1 .venv/bin/python " + shlex.join(["benchmarks/bf16_step.py", *sys.argv[1:]])
    lines = [
        *results_header(
            "Training step of StoMPP+STE vs full precision, fp32 and bf16 autocast (CPU)",
            command,
            threads=" and ".join(map(str, thread_counts)) + " (a table each)",
        ),
        f"all-MiniLM-L6-v2, batch {args.batch} x sequence {args.seq}, {args.steps} timed rounds after "
        f"{args.warmup} warm-up per thread count, {len(keys)} setups interleaved (in a fresh order every round). "
        "Steps: median (interquartile range) over the rounds, in seconds. Ratios: median of the ratios of two steps "
        "timed in the same round (interquartile range; 95% confidence interval of the median). Positions: the "
        "middle of the progression's first, middle and last stage (of 7: one per encoder block, then the pooler).",
    ]
    if "bf16" not in precisions and not native_bf16:
        lines.append(
            "bf16 autocast not measured: this CPU has no bf16 instructions (PyTorch emulates bf16 there; "
            'docs/design.md, "bf16 on CPUs without bf16 instructions").'
        )
    for threads in thread_counts:
        torch.set_num_threads(threads)  # the kernels and fused passes follow torch's thread count
        times = run(setups, keys, args.warmup, args.steps, f"{threads} thread(s)")
        lines += ["", f"`torch.set_num_threads({threads})`:", "", *table(times, keys, precisions)]
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def run(setups: dict, keys: list[tuple], warmup: int, steps: int, label: str) -> dict[tuple, list[float]]:
    """Step times of every setup over `steps` rounds after `warmup`, the setups round-robin."""
    times: dict[tuple, list[float]] = {key: [] for key in keys}
    for round_ in range(warmup + steps):
        # a fresh order every round, so no setup always runs after the same one (this VM's speed drifts over
        # seconds, and a step leaves the caches and the allocator to the next)
        for key in round_order(keys, round_):
            start = time.perf_counter()
            one_step(*setups[key], autocast=AUTOCAST[key[2]])
            if round_ >= warmup:
                times[key].append(time.perf_counter() - start)
        print(f"  {label}: round {round_ + 1}/{warmup + steps}", flush=True)
    return times


def table(times: dict[tuple, list[float]], keys: list[tuple], precisions: list[str]) -> list[str]:
    def step(key: tuple) -> str:
        return f"{statistics.median(times[key]):.3f} ({iqr(times[key]):.3f})"

    def paired(a: tuple, b: tuple) -> str:
        """Median, interquartile range and 95% confidence interval of the median of the per-round ratios a / b."""
        ratios = [x / y for x, y in zip(times[a], times[b])]
        lo, hi = median_ci(ratios)
        return f"**{statistics.median(ratios):.3f}** ({iqr(ratios):.3f}; {lo:.3f}-{hi:.3f})"

    both = len(precisions) == 2
    header = ["rule", "position", *(f"{p} step (s)" for p in precisions)]
    header += [f"step / FP step, {p}" for p in precisions] + (["bf16 / fp32"] if both else [])
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for key in keys[:: len(precisions)]:
        cells = [key[0], key[1] or "-"]
        cells += [step((*key[:2], p)) for p in precisions]
        cells += [paired((*key[:2], p), ("FP", None, p)) for p in precisions]
        if both:
            cells.append(paired((*key[:2], "bf16"), (*key[:2], "fp32")))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    main()
