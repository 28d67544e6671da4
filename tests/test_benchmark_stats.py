"""The confidence intervals and paired ratios the timing benchmarks print (`benchmarks/common.py`,
`benchmarks/workers.py`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from common import clustered_median_ci, median_ci  # noqa: E402
from workers import Ratio  # noqa: E402


def test_median_ci_takes_the_order_statistics_of_the_binomial_ranks():
    # n = 31: ranks 31/2 -+ 1.96 * sqrt(31) / 2 = 15.5 -+ 5.456 -> 10 and 22 (rounded outwards, 1-based)
    values = [float(v) for v in range(100, 131)]
    assert median_ci(values[::-1]) == (109.0, 121.0)


def test_clustered_median_ci_of_equal_values_is_that_value():
    assert clustered_median_ci([[1.25] * 8, [1.25] * 5]) == (1.25, 1.25)


def test_clustered_median_ci_is_seeded_and_holds_the_pooled_median():
    groups = [[1.0, 1.02, 0.98, 1.01], [1.05, 1.07, 1.04, 1.06], [0.99, 1.0, 1.03, 0.97]]
    lo, hi = clustered_median_ci(groups)
    assert (lo, hi) == clustered_median_ci(groups)
    assert lo <= 1.01 <= hi  # the pooled median of the twelve values
    assert lo >= min(min(g) for g in groups) and hi <= max(max(g) for g in groups)


def test_clustered_median_ci_widens_with_the_groups_own_effects():
    # the same 32 values: four groups that each sit at their own level, against one group holding all of them
    groups = [[level + 0.001 * i for i in range(8)] for level in (0.95, 1.0, 1.05, 1.10)]
    lo, hi = clustered_median_ci(groups)
    one_lo, one_hi = clustered_median_ci([[v for g in groups for v in g]])
    assert hi - lo > 1.5 * (one_hi - one_lo)
    assert lo < 1.0 and hi > 1.05  # a group's level can move the median by a whole step between levels


def test_clustered_median_ci_needs_a_value():
    with pytest.raises(ValueError, match="at least one value"):
        clustered_median_ci([[], []])


def test_ratio_pairs_steps_of_the_same_round_and_pools_the_sets():
    # set 1: rounds with ratios 2.0 and 2.0; set 2: one round with ratio 3.0 (a slower pair of processes)
    ratio = Ratio.of([[2.0, 4.0], [3.0]], [[1.0, 2.0], [1.0]])
    assert (ratio.median, ratio.set_lo, ratio.set_hi, ratio.sets) == (2.0, 2.0, 3.0, 2)
    assert 2.0 <= ratio.lo <= ratio.hi <= 3.0
    assert ratio.cell().startswith("**2.000** (") and ratio.cell().endswith("; sets 2.000-3.000)")


def test_ratio_of_one_set_names_no_range_of_sets():
    ratio = Ratio.of([[1.1, 1.2, 1.3]], [[1.0, 1.0, 1.0]])
    assert ratio.median == pytest.approx(1.2) and ratio.sets == 1
    assert "sets" not in ratio.cell()
