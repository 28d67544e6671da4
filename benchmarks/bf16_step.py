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
optimizer stay fp32. Every setup trains in a process of its own (`--processes per-setup`, the default), in `--sets`
sets of fresh processes (default 4 of 8 timed rounds) built one after another, each running every thread count, and the
setups are stepped from this process in a fresh order every round (`common.round_order`): why processes, and why sets
of them, is in `workers.py` (one heap per model as in a user's run; a process keeps its own speed for its life, so one
pair of processes, however many rounds, measures that pair). Every ratio is the median of the per-round ratios of two
steps timed in the same round, pooled over the sets, with its interquartile range, a 95% confidence interval of that
median from a two-stage bootstrap (sets, then rounds within them: `common.clustered_median_ci`) and the range of the
sets' own medians. One table per thread count (default 1 and 2, measured one after the other): on the 2-vCPU VMs of
this project a 2-thread step varies by 10-25% from one step to the next, a 1-thread step by 2-4%, so the 1-thread
ratios are the precise ones. On a CPU without bf16 instructions only fp32 is measured (`--precisions` overrides):
PyTorch emulates bf16 there, 24x slower per step. This is a timing: no accuracy claim rests on it.
"""

from __future__ import annotations

import argparse
import os
import statistics

from common import iqr, reproduce_command, results_header
from workers import Ratio, Setup, pooled, run_sets, values

from stompp_hf.kernels.cpu import has_native_bf16

PRECISIONS = ("fp32", "bf16")
POSITIONS = ("first", "middle", "last")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--threads", default="1,2", help="comma-separated thread counts, one table each, measured one after another"
    )
    parser.add_argument(
        "--sets",
        type=int,
        default=4,
        help="sets of worker processes (one process per setup), built one after another; each set runs --warmup "
        "then --steps rounds at every thread count, and the ratios' confidence intervals count the sets as groups",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds per set and thread count")
    parser.add_argument("--steps", type=int, default=8, help="timed rounds per set and thread count")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--positions", default=",".join(POSITIONS), help="comma-separated subset of " + str(POSITIONS))
    parser.add_argument(
        "--precisions",
        default=None,
        help="comma-separated subset of " + str(PRECISIONS) + "; default both, fp32 alone on a CPU without bf16 "
        "instructions (where autocast emulates bf16: 24x slower per step, and no user would train so)",
    )
    parser.add_argument(
        "--processes",
        choices=("per-setup", "shared"),
        default="per-setup",
        help="per-setup (default): every setup trains in a process of its own, as a user's model does; shared: all "
        "in this process, sharing one heap (what this benchmark did before: the steps then fault in different "
        "amounts of fresh memory depending on what the other setups freed)",
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
    if not thread_counts or min(thread_counts) < 1 or len(set(thread_counts)) < len(thread_counts):
        parser.error(f"--threads takes distinct comma-separated positive integers, got {args.threads!r}")
    if args.sets < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--sets and --steps take positive integers, --warmup a non-negative one")
    keys = [("FP", None, prec) for prec in precisions]
    keys += [("StoMPP+STE", pos, prec) for pos in positions for prec in precisions]
    command = reproduce_command("benchmarks/bf16_step.py")
    lines = [
        *results_header(
            "Training step of StoMPP+STE vs full precision, fp32 and bf16 autocast (CPU)",
            command,
            threads=" and ".join(map(str, thread_counts)) + " (a table each)",
        ),
        f"all-MiniLM-L6-v2, batch {args.batch} x sequence {args.seq}; {args.sets} set(s) of processes built one "
        f"after another, each running {args.warmup} warm-up and {args.steps} timed rounds per thread count "
        f"({args.sets * args.steps} timed rounds in all), {len(keys)} setups interleaved in a fresh order every "
        "round. Steps: median (interquartile range) over the rounds, in seconds. Ratios: median of the ratios of two "
        "steps timed in the same round (interquartile range; 95% confidence interval of the median from a two-stage "
        "bootstrap over the sets and their rounds, which counts each set's own speed; sets: the lowest and highest "
        "median of one set). Positions: the middle of the progression's first, middle and last stage (of 7: one per "
        "encoder block, then the pooler). Faults: the median of the minor page faults of a step (fresh memory the "
        "step touched).",
        "Each setup trains in a process of its own (one heap per model, as a user's training run has), stepped "
        "from this one; a step is timed in its process. A process keeps its speed for its life: two processes of the "
        "same setup differ by a few percent, so every set starts new ones."
        if args.processes == "per-setup"
        else "All setups train in this process and share its heap (`--processes shared`).",
    ]
    if "bf16" not in precisions and not native_bf16:
        lines.append(
            "bf16 autocast not measured: this CPU has no bf16 instructions (PyTorch emulates bf16 there; "
            'docs/design.md, "bf16 on CPUs without bf16 instructions").'
        )
    setups = {key: Setup("minilm", key[0], args.batch, args.seq, key[1] or "middle", key[2]) for key in keys}
    samples = run_sets(setups, args.sets, args.warmup, args.steps, thread_counts, shared=args.processes == "shared")
    times = {t: {key: values(groups, "seconds") for key, groups in by_key.items()} for t, by_key in samples.items()}
    faults = {t: {key: values(groups, "faults") for key, groups in by_key.items()} for t, by_key in samples.items()}
    for threads in thread_counts:
        rows = table(times[threads], faults[threads], keys, precisions)
        lines += ["", f"`torch.set_num_threads({threads})`:", "", *rows]
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def table(
    times: dict[tuple, list[list[float]]],
    faults: dict[tuple, list[list[int]]],
    keys: list[tuple],
    precisions: list[str],
) -> list[str]:
    """The table of one thread count. `times[key]` and `faults[key]` hold one list per set of processes."""

    def step(key: tuple) -> str:
        seconds = pooled(times[key])
        return f"{statistics.median(seconds):.3f} ({iqr(seconds):.3f}); {statistics.median(pooled(faults[key])):,.0f}"

    def paired(a: tuple, b: tuple) -> str:
        return Ratio.of(times[a], times[b]).cell()

    both = len(precisions) == 2
    header = ["rule", "position", *(f"{p} step (s); faults" for p in precisions)]
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
