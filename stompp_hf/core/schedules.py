"""Frozen-fraction schedules p(tau) and the stage planner.

A schedule maps the progress `tau` in [0, 1] of one stage to the target frozen fraction `p(tau)` in [0, 1], with
p(0) = 0 and p(1) = 1. The planner maps a global progress `g` in [0, 1] (optimizer steps done / progression steps)
to the progress of every stage, so that in `forward` order stage s transitions during g in [s/S, (s+1)/S]:
earlier stages are fully frozen, later ones fully continuous, and only one stage transitions at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable

Schedule = Callable[[float], float]

#: Every registered schedule by name; `StoMPPConfig.schedule` accepts exactly these keys.
SCHEDULES: dict[str, Schedule] = {}

#: Stage orders (`StoMPPConfig.order`): input to output, all stages at once, output to input.
ORDERS: tuple[str, ...] = ("forward", "global", "reverse")


def register_schedule(name: str, fn: Schedule | None = None):
    """Register `p(tau)` under `name`, directly (`register_schedule("mine", fn)`) or as a decorator
    (`@register_schedule("mine")`). A registered name is accepted by `StoMPPConfig(schedule=name)` from then on.

    Raises:
        ValueError: if `name` is registered already, or is not a non-empty string.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"A schedule name must be a non-empty string, but got {name!r}.")

    def wrap(fn: Schedule) -> Schedule:
        if name in SCHEDULES:
            raise ValueError(f"Schedule {name!r} is already registered.")
        if not callable(fn):
            raise ValueError(f"Schedule {name!r} must be a callable p(tau), but got {fn!r}.")
        SCHEDULES[name] = fn
        return fn

    return wrap if fn is None else wrap(fn)


@register_schedule("cubic")
def cubic(tau: float) -> float:
    """p = tau^3: the default; the stage stays mostly continuous for most of its window, then commits."""
    return tau * tau * tau


@register_schedule("quadratic")
def quadratic(tau: float) -> float:
    """p = tau^2: slow start, most freezing late in the stage."""
    return tau * tau


@register_schedule("linear")
def linear(tau: float) -> float:
    """p = tau."""
    return tau


@register_schedule("cosine")
def cosine(tau: float) -> float:
    """p = (1 - cos(pi * tau)) / 2."""
    return 0.5 * (1.0 - math.cos(math.pi * tau))


@register_schedule("flipped_quadratic")
def flipped_quadratic(tau: float) -> float:
    """p = 1 - (1 - tau)^2: fast start, slow finish."""
    return 1.0 - (1.0 - tau) ** 2


def get_schedule(name: str) -> Schedule:
    try:
        return SCHEDULES[name]
    except KeyError:
        raise ValueError(f"`schedule` must be one of {sorted(SCHEDULES)}, but got {name!r}.") from None


def stage_progress(step: int, total_steps: int, stage: int, num_stages: int, order: str) -> float:
    """Progress tau in [0, 1] of `stage` (numbered in forward order from 0) after `step` of `total_steps` steps.

    `forward`: stage s transitions while step/total is in [s/S, (s+1)/S]; `reverse`: the last stage first;
    `global`: every stage follows step/total itself. Integer arithmetic makes the ends exact: tau is exactly 1.0
    for every stage once `step >= total_steps`.
    """
    if total_steps < 1:
        raise ValueError(f"`total_steps` must be >= 1, but got {total_steps}.")
    step = min(max(step, 0), total_steps)
    if order == "global":
        return step / total_steps
    if order == "forward":
        slot = stage
    elif order == "reverse":
        slot = num_stages - 1 - stage
    else:
        raise ValueError(f"`order` must be one of {', '.join(map(repr, ORDERS))}, but got {order!r}.")
    numerator = step * num_stages - slot * total_steps
    return min(max(numerator, 0), total_steps) / total_steps
