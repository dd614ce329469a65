"""Welch's unequal-variance t-test and direction-aware comparisons of benchmark results."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from scipy import stats


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Two-sided Welch t statistic and p-value of mean(a) != mean(b), NaN values left out.

    NaN when either sample has fewer than two values or both have zero variance.
    """
    a, b = [v for v in a if not math.isnan(v)], [v for v in b if not math.isnan(v)]
    if len(a) < 2 or len(b) < 2 or (statistics.variance(a) == 0 and statistics.variance(b) == 0):
        return math.nan, math.nan
    result = stats.ttest_ind(a, b, equal_var=False)
    return float(result.statistic), float(result.pvalue)


def best_method(samples: dict[str, Sequence[float]], candidates: Sequence[str],
                higher_is_better: bool) -> str:
    """The candidate with the best mean (ignoring NaN means)."""
    means = {name: _mean(samples[name]) for name in candidates}
    finite = {name: m for name, m in means.items() if not math.isnan(m)}
    if not finite:
        return candidates[0]
    pick = max if higher_is_better else min
    return pick(finite, key=finite.get)


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan
