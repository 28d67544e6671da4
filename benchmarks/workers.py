"""Training setups stepped side by side, each in a process of its own, in sets of fresh processes.

Used by `train_overhead.py` and `bf16_step.py`. Why processes, and why sets of them (measured on the Xeon without
AMX; docs/design.md, issue 19, "Sets of processes"):

* One heap per model, as in a user's training run. In one shared process what the other setups leave in glibc's heap
  decides how much fresh memory a step faults in (the FP steps faulted 0 minor faults a step there, 43-51 thousand in
  a process of their own).
* A process keeps its own speed for its life: two processes of one setup, stepped in the same rounds, differ by a few
  percent (one FP process at 0.969x another, 95% CI 0.913-0.994), mostly through how much of its heap glibc trims and
  the next step faults back in. One pair of processes, however many rounds, measures that pair; so the rounds are
  split over sets of fresh processes, and a ratio's confidence interval counts the sets as groups
  (`common.clustered_median_ci`).

The parent only sends commands down a pipe; each step is timed, and its page faults and mask-advance time are taken,
in its own process around the step alone.
"""

from __future__ import annotations

import multiprocessing
import statistics
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from common import clustered_median_ci, iqr, minor_faults, round_order

#: autocast dtype of a precision (`one_step(autocast=...)`)
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}


class Setup(NamedTuple):
    """What one worker trains: `train_overhead.build(model, rule, batch, seq, position)`, stepped in `precision`."""

    model: str
    rule: str
    batch: int
    seq: int
    position: str = "middle"
    precision: str = "fp32"
    compiled: bool = False  # the model under `torch.compile` (inductor): its first step compiles it


class Step(NamedTuple):
    seconds: float
    faults: int  # minor page faults of the step: fresh memory it touched
    advance: float  # seconds of the step spent advancing the masks


def build_setup(setup: Setup) -> tuple:
    from train_overhead import build  # not at import: train_overhead imports this module

    model, optimizer, controller, inputs = build(setup.model, setup.rule, setup.batch, setup.seq, setup.position)
    if setup.compiled:
        model = torch.compile(model)
    return model, optimizer, controller, inputs


def timed_step(built: tuple, setup: Setup) -> Step:
    """One `train_overhead.one_step` of `built` (the tuple of `build_setup`), timed with its faults."""
    from train_overhead import one_step

    before = minor_faults()
    start = time.perf_counter()
    advance = one_step(*built, autocast=AUTOCAST[setup.precision])
    return Step(time.perf_counter() - start, minor_faults() - before, advance)


class Worker:
    """One setup in a process of its own, stepped on request. The child builds its setup and waits on a pipe."""

    def __init__(self, context, setup: Setup) -> None:
        self.setup = setup
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child, setup), daemon=True)
        self.process.start()
        child.close()
        self._reply()  # built

    def _reply(self):
        try:
            reply = self.conn.recv()
        except EOFError:  # the child died without a word: killed (out of memory?) or crashed
            self.process.join(5)
            raise RuntimeError(
                f"The worker process of {self.setup} ended (exit code {self.process.exitcode}). Every setup of a "
                "set lives at once (bf16_step.py's 8 MiniLM setups need about 20 GB): measure fewer setups, or "
                "use --processes shared where the script has it."
            ) from None
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def threads(self, n: int) -> None:
        self.conn.send(("threads", n))
        self._reply()

    def step(self) -> Step:
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


def _worker_main(conn, setup: Setup) -> None:
    try:
        built = build_setup(setup)
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
                conn.send(timed_step(built, setup))
        except BaseException as exc:  # noqa: BLE001
            conn.send(exc)
            return


class SetupSet:
    """One set of setups, key -> a `Worker` (`shared=False`: a process each, built one after another, since each
    load is a burst of memory traffic) or the tuple of `build_setup` (`shared=True`: all in this process, sharing its
    heap). A context manager that closes the workers."""

    def __init__(self, setups: dict, shared: bool = False) -> None:
        self.setups = dict(setups)
        self.members: dict = {}
        if shared:
            self.members = {key: build_setup(setup) for key, setup in self.setups.items()}
            return
        context = multiprocessing.get_context("spawn")  # no fork of a process that runs OpenMP
        try:
            for key, setup in self.setups.items():
                self.members[key] = Worker(context, setup)
        except BaseException:
            self.close()
            raise

    def threads(self, n: int) -> None:
        torch.set_num_threads(n)  # this process's, for the shared setups
        for member in self.members.values():
            if isinstance(member, Worker):
                member.threads(n)

    def step(self, key) -> Step:
        member = self.members[key]
        return member.step() if isinstance(member, Worker) else timed_step(member, self.setups[key])

    def run(self, warmup: int, steps: int, label: str, first_round: int = 0) -> dict:
        """key -> the `Step`s of `steps` rounds after `warmup`, every setup once a round, in a fresh order every round
        (`first_round`: the index of the first, for that order): no setup always runs after the same one (this VM's
        speed drifts over seconds, and a step leaves the caches, and in one process the allocator, to the next)."""
        keys = list(self.members)
        samples: dict = {key: [] for key in keys}
        for round_ in range(warmup + steps):
            for key in round_order(keys, first_round + round_):
                step = self.step(key)
                if round_ >= warmup:
                    samples[key].append(step)
            print(f"  {label}: round {round_ + 1}/{warmup + steps}", flush=True)
        return samples

    def close(self) -> None:
        for member in self.members.values():
            if isinstance(member, Worker):
                member.close()

    def __enter__(self) -> SetupSet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_sets(
    setups: dict,
    sets: int,
    warmup: int,
    steps: int,
    thread_counts: Sequence[int],
    label: str = "",
    shared: bool = False,
    before_rounds: Callable[[SetupSet], None] | None = None,
) -> dict[int, dict]:
    """thread count -> key -> one list of `Step`s per set: `sets` `SetupSet`s of `setups`, built one after another,
    each running `warmup` untimed and `steps` timed rounds at every thread count in turn. Every round of the whole run
    gets an order of its own (`SetupSet.run`'s `first_round` counts on across sets and thread counts).
    `before_rounds(members)` runs before the rounds of each thread count (a compiled setup's compiling step)."""
    samples: dict[int, dict] = {threads: {key: [] for key in setups} for threads in thread_counts}
    first_round = 0
    for set_index in range(sets):
        with SetupSet(setups, shared=shared) as members:
            for threads in thread_counts:
                members.threads(threads)  # the kernels and fused passes follow torch's thread count
                if before_rounds is not None:
                    before_rounds(members)
                where = f"{label}set {set_index + 1}/{sets}, {threads} thread(s)"
                for key, steps_ in members.run(warmup, steps, where, first_round).items():
                    samples[threads][key].append(steps_)
                first_round += warmup + steps
    return samples


def values(groups: list[list[Step]], field: str) -> list[list]:
    """One `Step` field (`"seconds"`, `"faults"`, `"advance"`) of every step, grouped as `groups` is."""
    return [[getattr(step, field) for step in group] for group in groups]


def pooled(groups: list[list[float]]) -> list[float]:
    return [v for group in groups for v in group]


class Ratio(NamedTuple):
    """The per-round ratios of two setups, pooled over sets: median, interquartile range, the 95% confidence interval
    of the median from a two-stage bootstrap over the sets and their rounds, and the lowest and highest set median."""

    median: float
    iqr: float
    lo: float
    hi: float
    set_lo: float
    set_hi: float
    sets: int

    @classmethod
    def of(cls, a: list[list[float]], b: list[list[float]]) -> Ratio:
        """`a` and `b`: the step times of two setups, one list per set, timed in the same rounds."""
        groups = [[x / y for x, y in zip(ta, tb)] for ta, tb in zip(a, b)]
        ratios = pooled(groups)
        lo, hi = clustered_median_ci(groups)
        own = [statistics.median(g) for g in groups]
        return cls(statistics.median(ratios), iqr(ratios), lo, hi, min(own), max(own), len(groups))

    def cell(self) -> str:
        sets = f"; sets {self.set_lo:.3f}-{self.set_hi:.3f}" if self.sets > 1 else ""
        return f"**{self.median:.3f}** ({self.iqr:.3f}; {self.lo:.3f}-{self.hi:.3f}{sets})"
