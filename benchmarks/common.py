"""Helpers shared by the benchmark scripts: timing with a record of other processes' CPU use, process memory, and
the header of a results file (the command that wrote it and the machine it ran on).

The benchmarks run as scripts (`python benchmarks/inference.py`), so they import this file as their sibling
`common`; they do not import the recipes.
"""

from __future__ import annotations

import math
import os
import random
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import torch

from stompp_hf.kernels.cpu import describe_cpu

#: glibc malloc settings from the environment that a results file's command repeats: they change how much fresh
#: memory a step faults in (worker processes inherit them)
ALLOCATOR_ENV = (
    "GLIBC_TUNABLES",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_ARENA_MAX",
)


def reproduce_command(script: str) -> str:
    """The command line of this run for a results file: the allocator settings of the environment (`ALLOCATOR_ENV`),
    then `script` with this process's arguments."""
    allocator = [f"{name}={shlex.quote(os.environ[name])}" for name in ALLOCATOR_ENV if name in os.environ]
    return " ".join([*allocator, "HF_HUB_OFFLINE=1 .venv/bin/python", shlex.join([script, *sys.argv[1:]])])


def results_header(title: str, command: str, threads: str | None = None) -> list[str]:
    """The opening lines of a results file: its title, the command that wrote it, and the machine: the CPU (model,
    cores and its instruction-set extensions that matter for the kernels), the torch version and thread count
    (`threads`: what to say instead of the current count, for a file measured at several)."""
    return [
        f"# {title}",
        "",
        "Command:",
        "",
        "```bash",
        command,
        "```",
        "",
        f"- CPU: {describe_cpu()}",
        f"- torch {torch.__version__}, `torch.get_num_threads()` = {threads or torch.get_num_threads()}",
        "",
    ]


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    a = MONITOR.snapshot() if MONITOR.available else None
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    MONITOR.record(a, MONITOR.snapshot() if MONITOR.available else None)
    return seconds, out


class CpuMonitor:
    """CPU use of other processes (machine busy time in /proc/stat minus this process's own), in cores.

    `wait_idle` holds the next timing round until the machine is quiet (within a total waiting budget); `timed`
    records how busy other processes were while each measurement ran, so the results can say how clean they are.
    """

    def __init__(self, threshold: float = 0.2, budget: float = 0.0) -> None:
        self.threshold, self.budget = threshold, budget
        self.other = self.wall = self.waited = 0.0
        try:
            self.snapshot()
            self.available = True
        except (OSError, ValueError):
            self.available = False

    @staticmethod
    def snapshot() -> tuple[float, float, float]:
        with open("/proc/stat", encoding="utf-8") as f:
            values = [int(v) for v in f.readline().split()[1:9]]
        busy = (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
        t = os.times()
        return busy, t.user + t.system, time.perf_counter()

    @staticmethod
    def others(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
        return max(0.0, (b[0] - a[0]) - (b[1] - a[1])) / max(b[2] - a[2], 1e-9)

    def wait_idle(self, window: float = 0.3) -> None:
        if not self.available:
            return
        start = time.perf_counter()
        while self.waited + time.perf_counter() - start < self.budget:
            a = self.snapshot()
            time.sleep(window)
            if self.others(a, self.snapshot()) <= self.threshold:
                break
        self.waited += time.perf_counter() - start

    def record(self, a: tuple[float, float, float] | None, b: tuple[float, float, float] | None) -> None:
        if a is not None and b is not None:
            self.other += self.others(a, b) * (b[2] - a[2])
            self.wall += b[2] - a[2]

    def reset(self) -> None:
        self.other = self.wall = 0.0

    @property
    def cores(self) -> float:
        return self.other / self.wall if self.wall else float("nan")


MONITOR = CpuMonitor()


def iqr(values: list[float]) -> float:
    """Interquartile range (0 for fewer than two values)."""
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def median_ci(values: list[float], z: float = 1.96) -> tuple[float, float]:
    """A distribution-free confidence interval of the median (95% for z = 1.96): the order statistics of ranks
    (1-based) n/2 - z * sqrt(n) / 2 and 1 + n/2 + z * sqrt(n) / 2, rounded outwards (the binomial's normal
    approximation; ranks 10 and 22 of 31), clamped to the sample."""
    ordered = sorted(values)
    n = len(ordered)
    half = z * math.sqrt(n) / 2
    lo = max(1, math.floor(n / 2 - half))
    hi = min(n, math.ceil(1 + n / 2 + half))
    return ordered[lo - 1], ordered[hi - 1]


def clustered_median_ci(
    groups: list[list[float]], level: float = 0.95, resamples: int = 4000, seed: int = 0
) -> tuple[float, float]:
    """A confidence interval (95% by default) of the median of values that come in groups sharing an effect of their
    own (the rounds timed in one set of worker processes: a process stays faster or slower than another of the same
    setup for its whole life, so its steps move together). A two-stage bootstrap: the groups drawn with replacement,
    then the values within each drawn group; the interval holds the middle `level` of the pooled medians (seeded, so
    a rerun gives the same interval). With one group it is the within-group bootstrap, which ignores the group effect
    that `median_ci` cannot see either."""
    groups = [list(g) for g in groups if g]
    if not groups:
        raise ValueError("clustered_median_ci needs at least one value.")
    rng = random.Random(seed)
    medians = []
    for _ in range(resamples):
        pooled = [v for g in rng.choices(groups, k=len(groups)) for v in rng.choices(g, k=len(g))]
        medians.append(statistics.median(pooled))
    medians.sort()
    tail = (1 - level) / 2
    return medians[int(tail * (resamples - 1))], medians[math.ceil((1 - tail) * (resamples - 1))]


def round_order(items: list, round_: int, seed: int = 0) -> list:
    """The order in which round `round_` runs `items`: a fresh permutation every round (seeded, so a rerun repeats
    it), so that no item always runs after the same one.

    Rotating a fixed order would not do that: every item would keep its predecessor, and the predecessor leaves the
    allocator and the caches to it. Measured on a VM whose balloon returns free pages to the host (384 -> 384 linear
    layer, 4096 rows, float32, the inference benchmark's ten modes): the XNOR mode that always ran right after the
    reference mode (which frees a lot, so glibc trims its heap) faulted its whole output back in on every call,
    1,504 minor faults and 16 ms a call, while the XNOR avx2 mode right after it faulted none (1.6 ms; the avx512
    kernel alone takes 0.6 ms).
    """
    order = list(items)
    random.Random(seed * 1_000_003 + round_).shuffle(order)
    return order


def minor_faults() -> int:
    """Minor page faults of this process so far (`getrusage`)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def interleaved(
    calls: dict[str, Callable[[], object]], repeats: int, faults: dict[str, int] | None = None
) -> dict[str, list[float]]:
    """Seconds per call over `repeats` rounds, after one warm-up call each. Every round waits for a quiet machine
    (`MONITOR.wait_idle`) and runs each call once, in a fresh order (`round_order`). With `faults` (a dict), each
    name's minor page faults over its timed calls are added to `faults[name]`."""
    names = list(calls)
    for n in names:
        calls[n]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        MONITOR.wait_idle()
        for n in round_order(names, r):
            before = minor_faults() if faults is not None else 0
            samples[n].append(timed(calls[n])[0])
            if faults is not None:
                faults[n] = faults.get(n, 0) + minor_faults() - before
    return samples


def vm_status_kib(field: str, pid: int | str = "self") -> int:
    """A `/proc/<pid>/status` memory field in KiB: `VmRSS` (resident now) or `VmHWM` (peak resident).

    Not `ru_maxrss`: Linux keeps it across exec, so a child process would report its parent's peak.
    """
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
