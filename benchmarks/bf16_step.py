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
optimizer stay fp32. Every setup trains in a process of its own (`--processes per-setup`, the default: one heap per
model, as in a user's training run: in one shared process, measured on the Xeon without AMX, the FP steps faulted in no
fresh memory at all, 0 minor faults a step against 43-51 thousand in a process of their own, while the first stage's
StoMPP+STE steps faulted 20-33 thousand: what the other setups leave in glibc's heap decides how much of its memory a
step finds mapped), and the setups are stepped round-robin from this process (in a fresh order every round:
`common.round_order`). A process keeps its own speed for its life: on the Xeon without AMX, three processes of each
setup stepped in the same rounds (2 threads, first stage, 31 rounds) put one FP process at 0.969x another (95% CI
0.913-0.994) and one StoMPP+STE process at 0.955x another (0.916-0.990), and the nine process pairs' StoMPP+STE / FP
medians spread from 0.979 to 1.072 (1.017 to 1.107 at 1 thread, 17 rounds). One pair of processes, however many rounds,
measures that pair. So the rounds are split over `--sets` sets of processes (default 4 of 8 timed rounds), built one
after another, each running every thread count. Every ratio is the median of the per-round ratios of two steps timed in
the same round, pooled over the sets, with its interquartile range, a 95% confidence interval of that median from a
two-stage bootstrap (sets, then rounds within them: `common.clustered_median_ci`) and the range of the sets' own
medians. One table per thread count (default 1 and 2, measured one after the other): on the 2-vCPU VMs of this project
a 2-thread step varies by 10-25% from one step to the next, a 1-thread step by 2-4%, so the 1-thread ratios are the
precise ones. On a CPU without bf16 instructions only fp32 is measured (`--precisions` overrides): PyTorch emulates
bf16 there, 24x slower per step. This is a timing: no accuracy claim rests on it.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shlex
import statistics
import sys
import time

import torch
from common import clustered_median_ci, iqr, minor_faults, results_header, round_order
from train_overhead import build, one_step

from stompp_hf.kernels.cpu import has_native_bf16

PRECISIONS = ("fp32", "bf16")
POSITIONS = ("first", "middle", "last")
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}
#: glibc malloc settings from the environment that a results file's command repeats
ALLOCATOR_ENV = (
    "GLIBC_TUNABLES",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_ARENA_MAX",
)


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
    if not thread_counts or min(thread_counts) < 1:
        parser.error(f"--threads takes comma-separated positive integers, got {args.threads!r}")
    if args.sets < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--sets and --steps take positive integers, --warmup a non-negative one")
    keys = [("FP", None, prec) for prec in precisions]
    keys += [("StoMPP+STE", pos, prec) for pos in positions for prec in precisions]
    # the allocator's settings change the steps' page faults (the workers inherit them): the command names them
    allocator = [f"{name}={shlex.quote(os.environ[name])}" for name in ALLOCATOR_ENV if name in os.environ]
    command = " ".join([*allocator, "HF_HUB_OFFLINE=1 .venv/bin/python"])
    command += " " + shlex.join(["benchmarks/bf16_step.py", *sys.argv[1:]])
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
    times: dict[int, dict[tuple, list[list[float]]]] = {t: {key: [] for key in keys} for t in thread_counts}
    faults: dict[int, dict[tuple, list[list[int]]]] = {t: {key: [] for key in keys} for t in thread_counts}
    first_round = 0  # of the next run: every round of the whole benchmark gets an order of its own
    for set_index in range(args.sets):
        setups = build_set(keys, args.batch, args.seq, args.processes)
        try:
            for threads in thread_counts:
                torch.set_num_threads(threads)  # the kernels and fused passes follow torch's thread count
                for setup in setups.values():
                    if isinstance(setup, Worker):
                        setup.threads(threads)
                label = f"set {set_index + 1}/{args.sets}, {threads} thread(s)"
                set_times, set_faults = run(setups, keys, args.warmup, args.steps, label, first_round)
                first_round += args.warmup + args.steps
                for key in keys:
                    times[threads][key].append(set_times[key])
                    faults[threads][key].append(set_faults[key])
        finally:
            for setup in setups.values():
                if isinstance(setup, Worker):
                    setup.close()
    for threads in thread_counts:
        rows = table(times[threads], faults[threads], keys, precisions)
        lines += ["", f"`torch.set_num_threads({threads})`:", "", *rows]
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def build_set(keys: list[tuple], batch: int, seq: int, processes: str) -> dict:
    """One set of setups: key -> a `Worker` (a process of its own, `processes="per-setup"`) or the tuple of
    `train_overhead.build` (built in this process, `"shared"`)."""
    if processes == "shared":
        return {key: build_setup(key, batch, seq) for key in keys}
    context = multiprocessing.get_context("spawn")  # no fork of a process that runs OpenMP
    setups: dict = {}
    try:
        for key in keys:  # built one after another (each load is a burst of memory traffic)
            setups[key] = Worker(context, key, batch, seq)
    except BaseException:
        for worker in setups.values():
            worker.close()
        raise
    return setups


def run(
    setups: dict, keys: list[tuple], warmup: int, steps: int, label: str, first_round: int = 0
) -> tuple[dict, dict]:
    """Step times (seconds) and minor page faults of every setup over `steps` rounds after `warmup`, the setups
    round-robin in a fresh order every round (`first_round`: the index of the first, for that order). `setups`:
    key -> a `Worker` (its own process) or the tuple of `train_overhead.build` (stepped here)."""
    times: dict[tuple, list[float]] = {key: [] for key in keys}
    faults: dict[tuple, list[int]] = {key: [] for key in keys}
    for round_ in range(warmup + steps):
        # a fresh order every round, so no setup always runs after the same one (this VM's speed drifts over
        # seconds, and a step leaves the caches, and in one process the allocator, to the next)
        for key in round_order(keys, first_round + round_):
            setup = setups[key]
            seconds, faulted = setup.step() if isinstance(setup, Worker) else timed_step(setup, key)
            if round_ >= warmup:
                times[key].append(seconds)
                faults[key].append(faulted)
        print(f"  {label}: round {round_ + 1}/{warmup + steps}", flush=True)
    return times, faults


def build_setup(key: tuple, batch: int, seq: int) -> tuple:
    """`train_overhead.build` of the setup `key` (rule, position or None, precision)."""
    return build("minilm", key[0], batch, seq, key[1] or "middle")


def timed_step(setup: tuple, key: tuple) -> tuple[float, int]:
    """Seconds and minor page faults of one `one_step` of `setup` (in `key`'s precision)."""
    before = minor_faults()
    start = time.perf_counter()
    one_step(*setup, autocast=AUTOCAST[key[2]])
    return time.perf_counter() - start, minor_faults() - before


class Worker:
    """One setup in a process of its own, stepped on request: each model then has its own heap, as when a user
    trains it, instead of sharing glibc's heap with the other setups (where whether a step finds its memory mapped
    depends on what the other setups left there: the module docstring). The child builds its setup with
    `train_overhead.build` and waits on a pipe; `step` times one `one_step` there (the time and the faults are
    taken in the child, around the step only)."""

    def __init__(self, context, key: tuple, batch: int, seq: int) -> None:
        self.key = key
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child, key, batch, seq), daemon=True)
        self.process.start()
        child.close()
        self._reply()  # built

    def _reply(self):
        try:
            reply = self.conn.recv()
        except EOFError:  # the child died without a word: killed (out of memory?) or crashed
            self.process.join(5)
            raise RuntimeError(
                f"The worker process of setup {self.key} ended (exit code {self.process.exitcode}); with 8 setups "
                "the workers need about 20 GB of memory (fewer --positions / --precisions, or --processes shared, "
                "need less)."
            ) from None
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def threads(self, n: int) -> None:
        self.conn.send(("threads", n))
        self._reply()

    def step(self) -> tuple[float, int]:
        # the previous setup's OpenMP threads spin for a moment after their last region: let them stop
        time.sleep(0.05)
        self.conn.send(("step",))
        return self._reply()

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self.conn.send(("stop",))
            except (BrokenPipeError, OSError):  # the child is gone already
                pass
        self.process.join(60)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def _worker_main(conn, key: tuple, batch: int, seq: int) -> None:
    try:
        setup = build_setup(key, batch, seq)
        conn.send("built")
    except BaseException as exc:  # noqa: BLE001 - handed to the parent, which raises it
        conn.send(exc)
        return
    while True:
        command = conn.recv()
        try:
            if command[0] == "stop":
                return
            if command[0] == "threads":
                torch.set_num_threads(command[1])  # the kernels and fused passes follow torch's thread count
                conn.send("ok")
            else:
                conn.send(timed_step(setup, key))
        except BaseException as exc:  # noqa: BLE001
            conn.send(exc)
            return


def table(
    times: dict[tuple, list[list[float]]],
    faults: dict[tuple, list[list[int]]],
    keys: list[tuple],
    precisions: list[str],
) -> list[str]:
    """The table of one thread count. `times[key]` and `faults[key]` hold one list per set of processes."""

    def pooled(values: list[list[float]]) -> list[float]:
        return [v for group in values for v in group]

    def step(key: tuple) -> str:
        seconds = pooled(times[key])
        return f"{statistics.median(seconds):.3f} ({iqr(seconds):.3f}); {statistics.median(pooled(faults[key])):,.0f}"

    def paired(a: tuple, b: tuple) -> str:
        """Median and interquartile range of the per-round ratios a / b (rounds of every set), the 95% confidence
        interval of that median with the sets as groups, and the range of the sets' own medians."""
        groups = [[x / y for x, y in zip(ta, tb)] for ta, tb in zip(times[a], times[b])]
        ratios = pooled(groups)
        lo, hi = clustered_median_ci(groups)
        own = [statistics.median(g) for g in groups]
        sets = f"; sets {min(own):.3f}-{max(own):.3f}" if len(groups) > 1 else ""
        return f"**{statistics.median(ratios):.3f}** ({iqr(ratios):.3f}; {lo:.3f}-{hi:.3f}{sets})"

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
