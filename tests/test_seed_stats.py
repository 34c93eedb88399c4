"""Statistics over seeds (`kdlab.experiments.seed_stats`) and their use in `aggregate_rows`: each function is
checked against hand values, scipy, or a brute-force enumeration; the three statistics defects of issue 27
each have a regression test."""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
import time
from typing import Any

import numpy as np
import pytest
from scipy import optimize, stats

from kdlab.experiments.report import COLUMNS, aggregate_rows, layout_for_rows
from kdlab.experiments.seed_stats import (
    GAIN,
    HURTS,
    INCONCLUSIVE,
    VERDICT_LEGEND,
    ZERO_SPREAD,
    MeanInterval,
    equivalent_word,
    gap_closed,
    hierarchical_deltas,
    iou_from_sums,
    paired_bootstrap,
    paired_t_power,
    power_hint,
    prob_improvement,
    seeds_for_power,
    t_interval,
    verdict,
)


# ------------------------------------------------------------------------------------ rows without run dirs
def _row(
    name: str, role: str, value: float | None, encoder: str = "b0", status: str = "completed"
) -> dict[str, Any]:
    """A per-run row as `collect_rows` makes it, every metric column set to `value`."""
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    layout = layout_for_rows([row])
    row.update(experiment=name, status=status, role=role, encoder=encoder)
    for column in layout.metric_columns:
        row[column] = value
    return row


def _table(
    teacher: list[float], base: dict[int, float], dist: dict[int, float], **kwargs: Any
) -> dict[str, dict[str, Any]]:
    """aggregate_rows over a teacher config (its runs seeds 100, 101, ...), a baseline and a distilled config."""
    rows = [_row(f"teacher__seed-{100 + i}", "teacher", v, encoder="b3") for i, v in enumerate(teacher)]
    if len(teacher) == 1:
        rows[0]["experiment"] = "teacher"
    rows += [_row(f"base__seed-{s}", "student", v) for s, v in base.items()]
    rows += [_row(f"dist__seed-{s}", "distilled", v) for s, v in dist.items()]
    return {r["experiment"]: r for r in aggregate_rows(rows, [], **kwargs)}


def _fieller_by_root_finding(
    a: float, b: float, va: float, vb: float, c: float, q: float
) -> tuple[float, float]:
    """The ends of {ρ : |a − ρ·b| / sqrt(va − 2ρc + ρ²vb) <= q}, found numerically on each side of a/b."""

    def pivot(rho: float) -> float:
        return abs(a - rho * b) / math.sqrt(va - 2 * rho * c + rho * rho * vb) - q

    point = a / b
    return (
        optimize.brentq(pivot, point - 50.0, point, xtol=1e-14),
        optimize.brentq(pivot, point, point + 50.0, xtol=1e-14),
    )


# ------------------------------------------------------------------------------------ defect (a)
def test_gap_closed_point_uses_the_paired_seeds_of_its_interval() -> None:
    """Regression (issue 27, defect a): the baseline has a 4th seed (0.75) the distilled config lacks. The old
    point (mean distilled − mean baseline over all their seeds) / margin = 0.099 fell outside its own interval
    [0.222, 0.252] (paired seeds); the point is now mean paired Δ / margin."""
    base = {42: 0.60, 1: 0.61, 2: 0.62, 3: 0.75}
    dist = {42: 0.66, 1: 0.672, 2: 0.679}
    row = _table([0.9], base, dist)["dist"]
    diffs = [dist[s] - base[s] for s in dist]
    margin = 0.9 - statistics.fmean(base.values())
    assert row["delta_n"] == 3 and row["delta_mean"] == pytest.approx(statistics.fmean(diffs))
    assert row["gap_closed"] == pytest.approx(statistics.fmean(diffs) / margin)
    assert row["gap_closed_low"] is not None
    assert row["gap_closed_low"] <= row["gap_closed"] <= row["gap_closed_high"]


# ------------------------------------------------------------------------------------ defect (b)
def test_a_zero_spread_gives_no_interval_and_no_gain() -> None:
    """Regression (issue 27, defect b): three identical paired differences gave a zero-width interval and the
    verdict "gain"; a zero spread is not evidence (identical runs, rounding)."""
    diff = t_interval([0.02, 0.02, 0.02])
    assert diff.mean == pytest.approx(0.02) and diff.std == 0.0
    assert diff.low is None and diff.high is None
    assert verdict(diff) not in ("gain", "hurts") and verdict(diff) is not None


def test_a_zero_spread_of_paired_differences_in_the_table_is_inconclusive() -> None:
    """The same through aggregate_rows, where floating-point differences 0.55 − 0.5, 0.65 − 0.6, 0.75 − 0.7
    differ in the 17th digit: still a zero spread."""
    row = _table([0.9], {42: 0.5, 1: 0.6, 2: 0.7}, {42: 0.55, 1: 0.65, 2: 0.75})["dist"]
    assert row["delta_mean"] == pytest.approx(0.05) and row["delta_n"] == 3
    assert row["delta_low"] is None and row["delta_high"] is None
    assert row["verdict"] not in ("gain", "hurts") and "zero spread" in row["verdict"]
    assert row["gap_closed_low"] is None and row["gap_closed_high"] is None
    assert row["p_improve"] is None and row["power_seeds"] is None and row["power_hint"] is None


# ------------------------------------------------------------------------------------ defect (c)
def test_gap_closed_interval_carries_the_baseline_uncertainty_fieller() -> None:
    """Regression (issue 27, defect c): the gap interval was the Δ interval / margin, as if the teacher and
    baseline means were exact. It is now Fieller's interval of (mean paired Δ) / (teacher − baseline mean),
    checked here by root finding on the Fieller pivot with hand-computed variances."""
    base = {42: 0.5, 1: 0.6, 2: 0.7}
    dist = {42: 0.56, 1: 0.68, 2: 0.75}
    row = _table([0.9], base, dist)["dist"]
    d = [dist[s] - base[s] for s in base]
    b_values = list(base.values())
    a, b = statistics.fmean(d), 0.9 - statistics.fmean(b_values)
    va = statistics.variance(d) / 3
    vb = statistics.variance(b_values) / 3  # the single teacher run adds no estimable variance
    c = -statistics.covariance(d, b_values) / 3  # Cov(mean Δ, teacher − mean baseline)
    q = stats.t.ppf(0.975, 2)
    low, high = _fieller_by_root_finding(a, b, va, vb, c, q)
    assert row["gap_closed"] == pytest.approx(a / b)
    assert (row["gap_closed_low"], row["gap_closed_high"]) == (pytest.approx(low), pytest.approx(high))
    # The old interval (a ± q·sqrt(va)) / b = [0.085, 0.338] ignored the denominator: the new one is [0.088, 1.04]
    # (the low end moves up a little because Δ and the baseline are negatively correlated over the seeds).
    old_low, old_high = (a - q * math.sqrt(va)) / b, (a + q * math.sqrt(va)) / b
    assert row["gap_closed_high"] > old_high + 0.5
    assert row["gap_closed_high"] - row["gap_closed_low"] > 3 * (old_high - old_low)


# ------------------------------------------------------------------------------------ t interval and verdict
def test_t_interval_against_hand_values() -> None:
    diff = t_interval([0.06, 0.08, 0.05])
    sd = statistics.stdev([0.06, 0.08, 0.05])
    half = 4.302653 * sd / math.sqrt(3)  # t(0.975, 2)
    assert (diff.mean, diff.std, diff.n) == (pytest.approx(0.19 / 3), pytest.approx(sd), 3)
    assert (diff.low, diff.high) == (pytest.approx(0.19 / 3 - half), pytest.approx(0.19 / 3 + half))
    assert t_interval([0.3]) == MeanInterval(0.3, None, 1, None, None)
    assert t_interval([]) == MeanInterval(None, None, 0, None, None)


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [
        (0.001, 0.02, GAIN),
        (0.001, 0.002, GAIN),  # a detectable gain smaller than the margin is still a gain
        (-0.02, -0.001, HURTS),
        (-0.004, 0.0049, "equivalent within ±0.005"),
        (-0.005, 0.004, INCONCLUSIVE),  # touches the margin: not inside (−m, +m)
        (-0.02, 0.03, INCONCLUSIVE),
        (-0.001, 0.006, INCONCLUSIVE),
    ],
)
def test_verdict_against_the_equivalence_margin(low: float, high: float, expected: str) -> None:
    diff = MeanInterval((low + high) / 2, 0.01, 3, low, high)
    assert verdict(diff) == expected
    assert verdict(diff, 0.005) == expected


def test_verdict_margin_is_a_parameter_and_the_words_are_exported() -> None:
    diff = MeanInterval(0.0, 0.01, 3, -0.004, 0.004)
    assert verdict(diff, 0.01) == equivalent_word(0.01) == "equivalent within ±0.01"
    assert verdict(diff, 0.003) == INCONCLUSIVE
    assert verdict(MeanInterval(0.1, None, 1, None, None)) is None  # n < 2
    assert verdict(MeanInterval(0.1, 0.0, 3, None, None)) == ZERO_SPREAD
    assert {GAIN, HURTS, INCONCLUSIVE, ZERO_SPREAD, "equivalent within ±m"} == set(VERDICT_LEGEND)
    with pytest.raises(ValueError):
        verdict(diff, 0.0)


# ------------------------------------------------------------------------------------ probability of improvement
def test_prob_improvement_is_the_student_t_posterior() -> None:
    d = [0.06, 0.08, 0.05]
    t = statistics.fmean(d) / (statistics.stdev(d) / math.sqrt(3))
    assert prob_improvement(d) == pytest.approx(stats.t.cdf(t, 2))
    # the t cdf with 2 df in closed form: 1/2 + t / (2·sqrt(2 + t²))
    assert prob_improvement(d) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)))
    # n = 2: Student t with 1 df is Cauchy, cdf(t) = 1/2 + atan(t)/π; here t = 0.03 / (0.01 / √2 / √2) = 6
    assert prob_improvement([0.02, 0.04]) == pytest.approx(0.5 + math.atan(3.0) / math.pi)
    assert prob_improvement([0.01, -0.01]) == pytest.approx(0.5)  # mean 0
    assert prob_improvement([-0.06, -0.08, -0.05]) == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)))
    assert prob_improvement([0.02]) is None and prob_improvement([0.02, 0.02, 0.02]) is None


# ------------------------------------------------------------------------------------ power
def test_paired_t_power_against_scipy_and_hand_values() -> None:
    # no effect: the power is the level, 5%
    assert paired_t_power(7, 0.01, 0.0) == pytest.approx(0.05)
    for n, sd, delta in ((3, 0.0081, 0.010), (7, 0.0081, 0.010), (20, 0.02, 0.005)):
        t_c = stats.t.ppf(0.975, n - 1)
        nc = delta * math.sqrt(n) / sd
        # (nct.cdf has no NaN at these values)
        expected = 1 - stats.nct.cdf(t_c, n - 1, nc) + stats.nct.cdf(-t_c, n - 1, nc)
        assert paired_t_power(n, sd, delta) == pytest.approx(expected, rel=1e-9)
        assert paired_t_power(n, sd, -delta) == pytest.approx(expected, rel=1e-9)  # two-sided: symmetric


def test_seeds_for_power_matches_a_scipy_search_and_textbook_sample_sizes() -> None:
    # Paired / one-sample t-test, two-sided α = 0.05, power 0.8: effect size d = Δ/sd = 1 needs n = 10 and
    # d = 0.5 needs n = 34 (Cohen's tables; G*Power gives the same).
    assert seeds_for_power(1.0, 1.0) == 10
    assert seeds_for_power(0.01, 0.005) == 34
    for sd, delta in ((0.0081, 0.010), (0.0104, 0.0088), (0.02, 0.03), (0.005, 0.1)):
        n = 2
        while True:
            t_c = stats.t.ppf(0.975, n - 1)
            nc = delta * math.sqrt(n) / sd
            # P(T < −t_c) as P(T' > t_c), T' ~ nct(−nc): scipy's nct.cdf is NaN deep in the lower tail
            if stats.nct.sf(t_c, n - 1, nc) + stats.nct.sf(t_c, n - 1, -nc) >= 0.8:
                break
            n += 1
        assert seeds_for_power(sd, delta) == n
    assert seeds_for_power(0.0081, 0.010) == 8
    assert seeds_for_power(0.005, 0.1) == 2  # a huge effect (nc = 28): the smallest n with a t-test
    assert paired_t_power(2, 0.005, 0.1) == pytest.approx(0.9735, abs=1e-4)  # where nct.cdf(−t_c) is NaN
    assert seeds_for_power(0.05, 0.001) is None  # d = 0.02: thousands of seeds
    assert seeds_for_power(0.01, 0.0) is None


def test_power_hint_text() -> None:
    assert (
        power_hint(0.0081, 0.010)
        == "at this spread (sd 0.0081) about 8 seeds detect a Δ of 0.0100 with 80% power"
    )
    assert power_hint(0.05, -0.001) == (
        "at this spread (sd 0.0500) more than 100 seeds are needed to detect a Δ of 0.0010 with 80% power"
    )
    with pytest.raises(ValueError):
        paired_t_power(3, 0.0, 0.01)


# ------------------------------------------------------------------------------------ gap closed (Fieller)
def test_gap_closed_with_an_exact_denominator_is_the_t_interval_over_the_margin() -> None:
    """Hand case: a baseline without spread and one teacher run make the margin exact (v_b = 0, c = 0), and
    Fieller's interval reduces to the paired t interval divided by the margin."""
    d = {1: 0.06, 2: 0.08, 3: 0.05}
    gap = gap_closed(d, {1: 0.5, 2: 0.5, 3: 0.5}, [0.9])
    diff = t_interval(list(d.values()))
    assert gap.margin == pytest.approx(0.4)
    assert gap.point == pytest.approx(diff.mean / 0.4)
    assert (gap.low, gap.high) == (pytest.approx(diff.low / 0.4), pytest.approx(diff.high / 0.4))
    assert "one teacher run" in gap.note


def test_gap_closed_with_teacher_seeds_uses_welch_and_fieller() -> None:
    d = {1: 0.03, 2: 0.05, 3: 0.02, 4: 0.04}
    base = {1: 0.50, 2: 0.53, 3: 0.49, 4: 0.52}
    teacher = [0.60, 0.62, 0.59]
    gap = gap_closed(d, base, teacher)
    dv, bv = list(d.values()), list(base.values())
    a, b = statistics.fmean(dv), statistics.fmean(teacher) - statistics.fmean(bv)
    vt, vb = statistics.variance(teacher) / 3, statistics.variance(bv) / 4
    nu = (vt + vb) ** 2 / (vt**2 / 2 + vb**2 / 3)  # Welch–Satterthwaite
    assert gap.margin_half_width == pytest.approx(stats.t.ppf(0.975, nu) * math.sqrt(vt + vb))
    c = -statistics.covariance(dv, bv) / 4
    q = stats.t.ppf(0.975, min(3, nu))
    low, high = _fieller_by_root_finding(a, b, statistics.variance(dv) / 4, vt + vb, c, q)
    assert gap.point == pytest.approx(a / b)
    assert (gap.low, gap.high) == (pytest.approx(low), pytest.approx(high))
    assert gap.note == "teacher and baseline spreads both counted"


def test_gap_closed_is_hidden_when_the_teachers_lead_is_within_its_uncertainty() -> None:
    d = {1: 0.03, 2: 0.05, 3: 0.02}
    base = {1: 0.50, 2: 0.60, 3: 0.70}  # half-width 0.2484
    assert gap_closed(d, base, [0.80]).point is None  # lead 0.2
    assert gap_closed(d, base, [0.85]).point is not None  # lead 0.25
    assert gap_closed(d, base, [0.60, 0.95]).point is None  # the teacher's own spread now counts
    assert gap_closed(d, {1: 0.6}, [0.59]).point is None  # not above 0
    # Numerator with 1 df (q = 12.7), margin with 2 (q = 4.30): shown, but Fieller's set is unbounded
    gap = gap_closed({1: 0.03, 2: 0.05}, base, [0.9])
    assert gap.point == pytest.approx(0.04 / 0.3) and gap.low is None and "unbounded" in gap.note


# ------------------------------------------------------------------------------------ bootstrap
def _loop_delta(arm_a: list, arm_b: list, seeds: tuple[int, ...], images: list[tuple[int, ...]]) -> float:
    """One replicate by hand: slot k uses seed seeds[k] and images images[k], the same for both arms."""

    def arm_mean(arm: list) -> float:
        per_slot = []
        for seed, imgs in zip(seeds, images, strict=True):
            inter, union = arm[seed]
            n_classes = len(inter[0])
            ious = []
            for c in range(n_classes):
                i_sum = sum(float(inter[i][c]) for i in imgs)
                u_sum = sum(float(union[i][c]) for i in imgs)
                if u_sum > 0:
                    ious.append(i_sum / u_sum)
            per_slot.append(sum(ious) / len(ious))
        return sum(per_slot) / len(per_slot)

    return arm_mean(arm_a) - arm_mean(arm_b)


@pytest.fixture()
def tiny_arms() -> tuple[list, list]:
    """2 seeds × 2 images × 2 classes of summed intersections and unions; class 1 is absent from image 1 in
    arm A of seed 0 and in both arms of seed 1, so a resample of image 1 twice drops it there."""
    a = [
        (np.array([[5.0, 3.0], [4.0, 0.0]]), np.array([[8.0, 6.0], [5.0, 0.0]])),
        (np.array([[6.0, 1.0], [2.0, 0.0]]), np.array([[9.0, 5.0], [6.0, 0.0]])),
    ]
    b = [
        (np.array([[4.0, 2.0], [4.0, 1.0]]), np.array([[8.0, 7.0], [6.0, 2.0]])),
        (np.array([[5.0, 2.0], [3.0, 0.0]]), np.array([[9.0, 5.0], [7.0, 0.0]])),
    ]
    return a, b


def _stacked(arm: list) -> tuple[np.ndarray, np.ndarray]:
    return np.stack([i for i, _ in arm]), np.stack([u for _, u in arm])


def _enumerate(shared: bool) -> tuple[list[tuple[int, ...]], list[list[tuple[int, ...]]]]:
    """Every equally likely outcome of one replicate with 2 seeds and 2 images: (seed draw, image draws)."""
    draws = list(itertools.product(range(2), repeat=2))
    if shared:
        return [s for s in draws for _ in draws], [[i, i] for _ in draws for i in draws]
    per_slot = list(itertools.product(draws, repeat=2))
    return [s for s in draws for _ in per_slot], [list(p) for _ in draws for p in per_slot]


@pytest.mark.parametrize("shared", [True, False])
def test_hierarchical_deltas_equal_a_hand_loop_on_every_outcome(
    tiny_arms: tuple[list, list], shared: bool
) -> None:
    a, b = tiny_arms
    seeds, images = _enumerate(shared)
    seed_idx = np.array(seeds)
    image_idx = np.array([i[0] for i in images]) if shared else np.array(images)
    got = hierarchical_deltas(_stacked(a), _stacked(b), seed_idx, image_idx)
    expected = [_loop_delta(a, b, s, i) for s, i in zip(seeds, images, strict=True)]
    assert got.shape == (len(expected),) and len(expected) == (16 if shared else 64)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("shared", [True, False])
def test_paired_bootstrap_matches_the_exact_distribution(tiny_arms: tuple[list, list], shared: bool) -> None:
    """Brute force: the exact distribution of Δ over all 16 (shared) or 64 (per seed) equally likely resamples;
    the bootstrap's mean and P(Δ > 0) over 200 000 replicates agree within Monte-Carlo error (4 SE)."""
    a, b = tiny_arms
    seeds, images = _enumerate(shared)
    exact = np.array([_loop_delta(a, b, s, i) for s, i in zip(seeds, images, strict=True)])
    n_boot = 200_000
    boot = paired_bootstrap(a, b, n_boot=n_boot, seed=1, shared_images=shared)
    assert boot.point == pytest.approx(_loop_delta(a, b, (0, 1), [(0, 1), (0, 1)]))
    assert abs(boot.replicates.mean() - exact.mean()) < 4 * exact.std() / math.sqrt(n_boot)
    p_exact = float(np.mean(exact > 0))
    assert 0.05 < p_exact < 0.95  # a distribution on both sides of 0
    assert abs(boot.p_improve - p_exact) < 4 * math.sqrt(p_exact * (1 - p_exact) / n_boot)
    assert (boot.low, boot.high) == tuple(np.quantile(boot.replicates, [0.025, 0.975]))
    assert exact.min() <= boot.low <= boot.high <= exact.max()


def test_paired_bootstrap_is_deterministic_fast_and_centred() -> None:
    rng = np.random.default_rng(7)
    union = rng.integers(50, 200, size=(3, 300, 3)).astype(float)
    inter_b = np.floor(union * rng.uniform(0.3, 0.7, size=union.shape))
    inter_a = np.minimum(union, inter_b + rng.integers(0, 8, size=union.shape))  # A better on most images
    arm_a = [(inter_a[s], union[s]) for s in range(3)]
    arm_b = [(inter_b[s], union[s]) for s in range(3)]
    elapsed = []
    for _ in range(2):
        start = time.perf_counter()
        first = paired_bootstrap(arm_a, arm_b, n_boot=2000, seed=3)
        elapsed.append(time.perf_counter() - start)
    assert min(elapsed) < 1.0  # 2000 replicates over 3 seeds × 300 images
    again = paired_bootstrap(arm_a, arm_b, n_boot=2000, seed=3)
    np.testing.assert_array_equal(first.replicates, again.replicates)
    assert paired_bootstrap(arm_a, arm_b, n_boot=2000, seed=4).low != first.low
    point = np.mean(iou_from_sums(inter_a.sum(1), union.sum(1))) - np.mean(
        iou_from_sums(inter_b.sum(1), union.sum(1))
    )
    assert first.point == pytest.approx(point)
    assert first.low < first.point < first.high and first.p_improve == 1.0
    one_class = paired_bootstrap(arm_a, arm_b, n_boot=200, classes=(1,))
    assert one_class.point == pytest.approx(
        np.mean(inter_a[..., 1].sum(1) / union[..., 1].sum(1))
        - np.mean(inter_b[..., 1].sum(1) / union[..., 1].sum(1))
    )
    with pytest.raises(ValueError):
        paired_bootstrap(arm_a, arm_b[:2])
    with pytest.raises(ValueError):
        paired_bootstrap(arm_a, [(i[:10], u[:10]) for i, u in arm_b])


def test_iou_from_sums_skips_classes_without_a_union() -> None:
    inter = np.array([[2.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    union = np.array([[4.0, 0.0, 4.0], [0.0, 0.0, 0.0]])
    out = iou_from_sums(inter, union)
    assert out[0] == pytest.approx((0.5 + 0.25) / 2) and math.isnan(out[1])


# ------------------------------------------------------------------------------------ wired into aggregate_rows
def test_aggregate_rows_adds_p_improve_power_hint_and_the_margin_verdict() -> None:
    base = {1: 0.5, 2: 0.6, 3: 0.7}
    dist = {1: 0.501, 2: 0.599, 3: 0.7005}  # diffs 0.001, −0.001, 0.0005: [−0.0024, +0.0028]
    row = _table([0.9], base, dist)["dist"]
    d = [dist[s] - base[s] for s in base]
    assert row["verdict"] == "equivalent within ±0.005"
    assert _table([0.9], base, dist, equivalence_margin=0.002)["dist"]["verdict"] == INCONCLUSIVE
    assert row["p_improve"] == pytest.approx(prob_improvement(d))
    # the target Δ is max(|mean Δ|, margin) = the margin 0.005
    assert row["power_hint"] == power_hint(statistics.stdev(d), 0.005)
    assert row["power_seeds"] == seeds_for_power(statistics.stdev(d), 0.005) == 3  # sd 0.00104 vs Δ 0.005
    assert row["boot_low"] is None and row["boot_high"] is None and row["boot_p_improve"] is None
    assert _table([0.9], base, dist)["base"]["p_improve"] is None


def test_aggregate_rows_bootstraps_when_per_image_sums_are_given() -> None:
    rng = np.random.default_rng(0)
    per_image: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for s in (1, 2, 3):
        union = rng.integers(50, 100, size=(40, 3)).astype(float)
        per_image[f"base__seed-{s}"] = (np.floor(union * 0.5), union)
        per_image[f"dist__seed-{s}"] = (np.floor(union * 0.55), union)
    rows = [_row("teacher", "teacher", 0.9, encoder="b3")]
    rows += [_row(f"base__seed-{s}", "student", 0.5 + s / 100) for s in (1, 2, 3)]
    rows += [_row(f"dist__seed-{s}", "distilled", 0.55 + s / 100 + s / 1000) for s in (1, 2, 3)]
    layout = dataclasses.replace(layout_for_rows(rows), headline="miou")
    table = {r["experiment"]: r for r in aggregate_rows(rows, [], layout, per_image=per_image)}
    boot = paired_bootstrap(
        [per_image[f"dist__seed-{s}"] for s in (1, 2, 3)], [per_image[f"base__seed-{s}"] for s in (1, 2, 3)]
    )
    dist = table["dist"]
    assert (dist["boot_low"], dist["boot_high"]) == (boot.low, boot.high)
    assert dist["boot_p_improve"] == boot.p_improve
    assert table["base"]["boot_low"] is None
    # one run's sums missing, or a headline that is not a ratio of sums (target IoU: a mean over ROIs): none
    partial = {k: v for k, v in per_image.items() if k != "dist__seed-2"}
    target = dataclasses.replace(layout, headline="target_iou")
    for lay, sums in ((layout, partial), (target, per_image)):
        dist = {r["experiment"]: r for r in aggregate_rows(rows, [], lay, per_image=sums)}["dist"]
        assert dist["boot_low"] is None and dist["boot_p_improve"] is None


# ---------------------------------------------------------------------------------- the verdicts in words
def _summary(table: dict[str, dict[str, Any]]) -> str:
    from kdlab.experiments.report.tables import verdict_summary

    rows = list(table.values())
    text = verdict_summary(rows, layout_for_rows(rows), "test split")
    assert text is not None
    return text


def test_suggested_seeds_keep_the_seeds_run_and_add_the_smallest_unused() -> None:
    from kdlab.experiments.report.tables import suggested_seeds

    assert suggested_seeds([0, 1, 2], 6) == [0, 1, 2, 3, 4, 5]
    assert suggested_seeds([42, 1, 2], 5) == [0, 1, 2, 3, 42]
    assert suggested_seeds([2, 0, 1], 2) == [0, 1, 2]  # never fewer than were run
    assert suggested_seeds([None], 5) is None  # unseeded runs: nothing to extend


def test_an_inconclusive_verdict_says_why_and_gives_the_command_that_adds_the_seeds_the_power_hint_asks_for() -> (
    None
):
    base, dist = {0: 0.3625, 1: 0.4070, 2: 0.3923}, {0: 0.4302, 1: 0.4296, 2: 0.4196}  # the main job's seeds
    table = _table([0.4461], base, dist)
    row = table["dist"]
    assert row["verdict"] == INCONCLUSIVE and row["delta_seeds"] == [0, 1, 2]
    wanted = seeds_for_power(row["delta_std"], row["delta_mean"])
    assert wanted is not None and wanted > 3
    text = _summary(table)
    assert text.startswith("Verdicts (mIoU, test split, paired by seed):")
    (line,) = [x for x in text.splitlines() if x.startswith("- ")]
    d = [dist[s] - base[s] for s in base]
    half = stats.t.ppf(0.975, 2) * statistics.stdev(d) / math.sqrt(3)
    low, high = statistics.mean(d) - half, statistics.mean(d) + half  # -0.0224, +0.1008: hand values below
    assert f"{low:.4f}, {high:.4f}" == "-0.0224, 0.1008"
    assert line.startswith(
        "- **dist** vs base, 3 paired seeds (0, 1, 2): Δ +0.0392, 95% CI [−0.0224, +0.1008]"
    )
    assert "**inconclusive** (the interval holds 0" in line
    assert f"about {wanted} seeds detect a Δ of 0.0392" in line
    assert f"--seeds {' '.join(str(s) for s in range(wanted))} --resume" in line


def test_gain_hurts_equivalent_and_one_seed_read_as_such_without_a_seeds_command() -> None:
    gain = _summary(_table([0.9], {1: 0.5, 2: 0.6, 3: 0.7}, {1: 0.56, 2: 0.68, 3: 0.75}))
    assert "**gain** (the whole interval lies above 0)" in gain and "--resume" not in gain
    hurts = _summary(_table([0.9], {1: 0.56, 2: 0.68, 3: 0.75}, {1: 0.5, 2: 0.6, 3: 0.7}))
    assert "**hurts** (the whole interval lies below 0)" in hurts and "--resume" not in hurts
    same = _summary(_table([0.9], {1: 0.5, 2: 0.6, 3: 0.7}, {1: 0.501, 2: 0.599, 3: 0.7005}))
    assert "**equivalent within ±0.005** (the whole interval lies inside that margin)" in same
    one = _summary(_table([0.9], {1: 0.5}, {1: 0.56}))
    assert "1 paired seed (1): Δ +0.0600: no verdict from one seed" in one
    assert "95% CI" not in one


def test_no_verdict_lines_without_a_distilled_config_with_a_baseline() -> None:
    from kdlab.experiments.report.tables import verdict_summary

    rows = list(_table([0.9], {1: 0.5, 2: 0.6}, {}).values())
    assert verdict_summary(rows, layout_for_rows(rows), "test split") is None
