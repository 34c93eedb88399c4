"""Statistics over seeds: mean ± std, a Student-t interval of a mean, and the verdict of a paired difference.

A distilled run and its baseline of one seed share their initial weights and data order, so the per-seed
difference (distilled − baseline) removes most of the seed-to-seed noise; its mean gets a two-sided 95%
interval mean ± t(0.975, n−1) · sd / √n (sd with ddof=1). With n < 2 there is no interval and no verdict.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats

CONFIDENCE = 0.95
GAIN, NO_DIFFERENCE, HURTS = "gain", "no detectable difference", "hurts"


@dataclass(frozen=True)
class MeanInterval:
    """The mean of n values, their std (ddof=1) and the two-sided Student-t interval of the mean.

    std, low and high are None when n < 2; mean is None when n == 0."""

    mean: float | None
    std: float | None
    n: int
    low: float | None
    high: float | None

    @property
    def half_width(self) -> float | None:
        return None if self.high is None or self.mean is None else self.high - self.mean


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> MeanInterval:
    """Mean, std (ddof=1) and the `confidence` Student-t interval of the mean of `values`."""
    n = len(values)
    if n == 0:
        return MeanInterval(None, None, 0, None, None)
    mean = math.fsum(values) / n
    if n < 2:
        return MeanInterval(mean, None, 1, None, None)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return MeanInterval(mean, std, n, mean - half, mean + half)


def verdict(diff: MeanInterval) -> str | None:
    """`gain` when the interval of the paired difference lies above 0, `hurts` when below, else
    `no detectable difference`; None without an interval (n < 2)."""
    if diff.low is None or diff.high is None:
        return None
    if diff.low > 0:
        return GAIN
    if diff.high < 0:
        return HURTS
    return NO_DIFFERENCE
