"""Statistics over seeds: mean ± std, the paired difference of a distilled config from its baseline with its
interval, verdict, probability of improvement and power hint, the gap closed with Fieller's interval, and a
paired hierarchical bootstrap over seeds and test images. Pure functions of numbers and numpy arrays.

A distilled run and its baseline of one seed share their initial weights and data order, so the per-seed
difference d_i = distilled_i − baseline_i (i = 1..n) removes most of the seed-to-seed noise. Its mean d̄ gets
the two-sided 95% Student-t interval d̄ ± t(0.975, n−1) · s / √n (s the std with ddof=1). With n < 2, or a zero
spread (s = 0 up to rounding: identical runs, rounded metrics), there is no interval: s = 0 with a handful of
seeds is not evidence of anything, and a zero-width interval would turn any non-zero mean into a "gain".

Verdict words (see `verdict`): "gain", "hurts", "equivalent within ±m", "inconclusive", and
"inconclusive (zero spread)". `VERDICT_LEGEND` says what each means.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
EQUIVALENCE_MARGIN = 0.005  # default ±m of the equivalence verdict
TARGET_POWER = 0.8
MAX_SEEDS = 100  # the power hint says "more than MAX_SEEDS" beyond this

GAIN, HURTS, INCONCLUSIVE = "gain", "hurts", "inconclusive"
EQUIVALENT = "equivalent within ±{margin:g}"  # formatted with the margin: `equivalent_word(m)`
ZERO_SPREAD = "inconclusive (zero spread)"
VERDICT_LEGEND: dict[str, str] = {
    GAIN: "the 95% interval of the paired Δ lies above 0",
    HURTS: "the 95% interval of the paired Δ lies below 0",
    "equivalent within ±m": "the 95% interval of the paired Δ lies inside (−m, +m), m = the equivalence margin (default 0.005)",
    INCONCLUSIVE: "the 95% interval contains 0 and reaches beyond ±m: more seeds needed (see the power hint)",
    ZERO_SPREAD: "every paired Δ is the same (identical or rounded runs): no interval, no evidence",
}
# A spread this small relative to the values' size is rounding: 0.55 − 0.5 and 0.65 − 0.6 differ by 1e-17.
_ZERO_SPREAD_RTOL = 1e-9


def equivalent_word(margin: float) -> str:
    """The verdict word for equivalence against `margin`: "equivalent within ±0.005"."""
    return EQUIVALENT.format(margin=margin)


@dataclass(frozen=True)
class MeanInterval:
    """The mean of n values, their std (ddof=1) and the two-sided Student-t interval of the mean.

    mean is None when n == 0; std is None when n < 2; low and high are None when n < 2 or the spread is zero
    (`zero_spread`)."""

    mean: float | None
    std: float | None
    n: int
    low: float | None
    high: float | None

    @property
    def half_width(self) -> float | None:
        return None if self.high is None or self.mean is None else self.high - self.mean

    @property
    def zero_spread(self) -> bool:
        """n >= 2 values that are all the same (std 0 up to rounding): no interval."""
        return self.n >= 2 and self.std == 0.0


def _is_zero_spread(std: float, values: Sequence[float]) -> bool:
    return std <= _ZERO_SPREAD_RTOL * max(1.0, max(abs(v) for v in values))


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> MeanInterval:
    """Mean x̄, std s (ddof=1, reported as 0.0 for a zero spread) and the `confidence` Student-t interval
    x̄ ± t((1 + confidence)/2, n−1) · s / √n of the mean of `values`; no interval for n < 2 or a zero spread."""
    n = len(values)
    if n == 0:
        return MeanInterval(None, None, 0, None, None)
    mean = math.fsum(values) / n
    if n < 2:
        return MeanInterval(mean, None, 1, None, None)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    if _is_zero_spread(std, values):
        return MeanInterval(mean, 0.0, n, None, None)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return MeanInterval(mean, std, n, mean - half, mean + half)


# --------------------------------------------------------------------------------------------- verdict
def verdict(diff: MeanInterval, margin: float = EQUIVALENCE_MARGIN) -> str | None:
    """The verdict of a paired difference from its 95% interval [lo, hi] and an equivalence margin m > 0:

    - "gain" if lo > 0; "hurts" if hi < 0 (a detectable effect wins even when it is smaller than m);
    - "equivalent within ±m" if −m < lo and hi < m;
    - "inconclusive" otherwise (the interval holds 0 and reaches beyond ±m: it settles neither);
    - "inconclusive (zero spread)" when n >= 2 differences are all the same: no interval, no evidence;
    - None when n < 2.

    Equivalence uses the same two-sided 95% interval the table shows, i.e. two one-sided tests (TOST) at
    α = 0.025 each: more conservative than the usual TOST at α = 0.05 (the 90% interval), chosen so that one
    interval in the table decides every verdict and a reader can check it by eye."""
    if margin <= 0:
        raise ValueError(f"the equivalence margin must be > 0, got {margin}")
    if diff.zero_spread:
        return ZERO_SPREAD
    if diff.low is None or diff.high is None:
        return None
    if diff.low > 0:
        return GAIN
    if diff.high < 0:
        return HURTS
    if -margin < diff.low and diff.high < margin:
        return equivalent_word(margin)
    return INCONCLUSIVE


def prob_improvement(values: Sequence[float]) -> float | None:
    """P(μ > 0) for the mean μ of the paired differences d_1..d_n: the Student-t posterior probability

        P(μ > 0 | d) = F_{t, n−1}(d̄ / (s / √n))

    (F the cdf of Student's t with n−1 degrees of freedom). Under the reference prior p(μ, σ) ∝ 1/σ the
    posterior of μ is d̄ + (s/√n)·T_{n−1}, so this is the Bayesian probability that distillation helps on
    average over seeds; frequentist reading: 1 − the one-sided p-value of H0: μ <= 0. With n = 2 (Cauchy)
    it is 1/2 + atan(t)/π. None for n < 2 or a zero spread (no evidence, see the module docstring).
    The bootstrap's P(Δ > 0) (`paired_bootstrap`) is the same question answered over seeds and images."""
    diff = t_interval(values)
    if diff.n < 2 or diff.zero_spread or diff.std is None or diff.mean is None:
        return None
    return float(stats.t.cdf(diff.mean / (diff.std / math.sqrt(diff.n)), diff.n - 1))


# --------------------------------------------------------------------------------------------- power
def paired_t_power(n: int | np.ndarray, sd: float, delta: float, confidence: float = CONFIDENCE) -> Any:
    """Power of the two-sided paired t-test at level 1 − confidence with n pairs, for a true mean difference
    `delta` and a std of the differences `sd`:

        power(n) = P(|T| > t_c),  t_c = t((1 + confidence)/2, n−1),  T ~ noncentral t(df = n−1, nc = δ√n/sd)
                 = sf(t_c; n−1, nc) + cdf(−t_c; n−1, nc) = sf(t_c; n−1, nc) + sf(t_c; n−1, −nc)

    (the lower tail through the symmetry T(−nc) = −T(nc): scipy's nct.cdf returns NaN deep in the lower tail,
    e.g. at df = 1, nc = 8). `n` may be an array (vectorised); n >= 2, sd > 0."""
    n_arr = np.asarray(n, dtype=float)
    if np.any(n_arr < 2) or sd <= 0:
        raise ValueError(f"power needs n >= 2 and sd > 0, got n={n}, sd={sd}")
    df = n_arr - 1
    t_c = stats.t.ppf(0.5 + confidence / 2, df)
    nc = delta * np.sqrt(n_arr) / sd
    power = stats.nct.sf(t_c, df, nc) + stats.nct.sf(t_c, df, -nc)
    return float(power) if np.ndim(power) == 0 else power


def seeds_for_power(
    sd: float,
    delta: float,
    power: float = TARGET_POWER,
    confidence: float = CONFIDENCE,
    max_n: int = MAX_SEEDS,
) -> int | None:
    """The smallest number of paired seeds n >= 2 for which `paired_t_power(n, sd, delta)` >= `power`; None
    when more than `max_n` would be needed (or delta is 0)."""
    if delta == 0:
        return None
    n = np.arange(2, max_n + 1)
    ok = np.nonzero(paired_t_power(n, sd, abs(delta), confidence) >= power)[0]
    return int(n[ok[0]]) if ok.size else None


def power_hint(
    sd: float,
    delta: float,
    power: float = TARGET_POWER,
    confidence: float = CONFIDENCE,
    max_n: int = MAX_SEEDS,
) -> str:
    """One line: "at this spread (sd 0.0081) about 7 seeds detect a Δ of 0.0100 with 80% power" (or "more
    than 100 seeds are needed to detect ..."), from `seeds_for_power`."""
    n = seeds_for_power(sd, delta, power, confidence, max_n)
    head = f"at this spread (sd {sd:.4f})"
    tail = f"a Δ of {abs(delta):.4f} with {power:.0%} power"
    if n is None:
        return f"{head} more than {max_n} seeds are needed to detect {tail}"
    return f"{head} about {n} seeds detect {tail}"


# --------------------------------------------------------------------------------------------- gap closed
@dataclass(frozen=True)
class GapClosed:
    """Gap closed = mean paired Δ / margin, margin = teacher mean − baseline mean, with Fieller's interval.

    point, low, high: None when not shown (see `gap_closed`); low/high also None when Fieller's set is not a
    bounded interval or the paired Δ has no interval. margin_half_width: the 95% half-width of the margin
    (None when not estimable). note: what the margin's uncertainty is made of."""

    point: float | None
    low: float | None
    high: float | None
    margin: float | None
    margin_half_width: float | None
    note: str


def _var_of_mean(values: Sequence[float]) -> float:
    """s² / n (s² the sample variance, ddof=1, exact sums); 0 for n < 2."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = math.fsum(values) / n
    return math.fsum((v - mean) ** 2 for v in values) / (n - 1) / n


@dataclass(frozen=True)
class TeacherLead:
    """The teacher's lead over a baseline, margin = mean(T) − mean(B), with the variance of that difference of
    means (v_b = s_T²/n_T + s_B²/n_B; a sample of one value has no estimable spread and counts 0), its
    Welch–Satterthwaite degrees of freedom, the 95% half-width (None when no spread is estimable) and whether
    the lead is resolved: margin > half-width (with no estimable spread: margin > 0, `note` says so)."""

    margin: float
    variance: float
    dof: float
    half_width: float | None
    resolved: bool
    note: str


def teacher_lead(
    teacher: Sequence[float], baseline: Sequence[float], confidence: float = CONFIDENCE
) -> TeacherLead:
    """`TeacherLead` of the teacher's values over the baseline's (each over seeds; both non-empty).

    ν_b = v_b² / Σ_k (s_k²/n_k)² / (n_k − 1) over the terms with n_k >= 2, half-width = t((1+confidence)/2, ν_b)
    · sqrt(v_b). Used to show "% of teacher" and "gap closed" only where the teacher's lead is real."""
    b = math.fsum(teacher) / len(teacher) - math.fsum(baseline) / len(baseline)
    notes: list[str] = []
    terms: list[tuple[float, int]] = []  # (variance of the mean, n) of each part of the margin
    for name, values in (("teacher", teacher), ("baseline", baseline)):
        if len(values) < 2:
            notes.append(f"one {name} run: its spread is not estimable and counts 0")
        else:
            terms.append((_var_of_mean(values), len(values)))
    v_b = math.fsum(v for v, _ in terms)
    if v_b > 0:
        nu_b = v_b**2 / math.fsum(v**2 / (n - 1) for v, n in terms if v > 0)
        half_b: float | None = float(stats.t.ppf(0.5 + confidence / 2, nu_b)) * math.sqrt(v_b)
    else:
        nu_b, half_b = math.inf, (None if not terms else 0.0)
    note = "; ".join(notes) or "teacher and baseline spreads both counted"
    return TeacherLead(b, v_b, nu_b, half_b, b > max(half_b or 0.0, 1e-12), note)


def gap_closed(
    diffs: Mapping[Any, float],
    baseline: Mapping[Any, float],
    teacher: Sequence[float],
    confidence: float = CONFIDENCE,
) -> GapClosed:
    """Gap closed ρ = a / b with Fieller's interval, from the paired differences d_s (seed s → distilled −
    baseline), the baseline's values B_s (seed → value; the paired seeds are among them) and the teacher's
    values T_j.

        a = mean_P(d) over the n_p paired seeds,          v_a = s_d² / n_p
        b = mean(T) − mean(B) over all seeds of each,     v_b = s_T² / n_T + s_B² / n_B
        c = Cov(a, b) = −s_dB / n_B                       (s_dB: sample covariance of d and B over the paired
                                                           seeds; the teacher is independent of the students)

    A term whose sample has one value has no estimable variance and counts 0; `note` says so (e.g. with a
    single teacher run the margin's uncertainty is the baseline's alone).

    Shown (point not None) only where the teacher's lead exceeds its uncertainty: b − q_b · sqrt(v_b) > 0, q_b
    the t quantile at the margin's Welch–Satterthwaite degrees of freedom
    ν_b = v_b² / Σ_k (s_k²/n_k)² / (n_k − 1) (over the terms with n_k >= 2); with v_b = 0, b > 0. With one
    teacher run this is the earlier rule "margin beyond the baseline's own 95% half-width".

    Fieller's interval is {ρ : (a − ρ b)² <= q² (v_a − 2ρ c + ρ² v_b)}, q = t((1 + confidence)/2, ν),
    ν = min(n_p − 1, ν_b) (the fewer degrees of freedom: conservative). Its ends are the roots of
    A ρ² − 2 B ρ + C = 0, A = b² − q² v_b, B = a b − q² c, C = a² − q² v_a:  ρ = (B ± √(B² − A C)) / A, a bounded
    interval that holds a/b iff A > 0 (b significantly non-zero at level q). With v_b = 0 and c = 0 it is the
    t interval of a divided by b. None ends (point alone) when A <= 0, n_p < 2, or the d_s have a zero spread.
    Fieller rather than a bootstrap over seeds: with 3 seeds a bootstrap has 10 distinct resamples and no
    t quantile, so its interval is far too narrow; Fieller keeps the t quantiles of the paired interval.
    """
    paired = [s for s in diffs if s in baseline]
    d = [diffs[s] for s in paired]
    base = list(baseline.values())
    if not d or not base or not teacher:
        return GapClosed(None, None, None, None, None, "no paired seeds, baseline or teacher")
    a = math.fsum(d) / len(d)
    lead = teacher_lead(teacher, base, confidence)
    b, v_b, nu_b, half_b, note = lead.margin, lead.variance, lead.dof, lead.half_width, lead.note
    if not lead.resolved:
        return GapClosed(None, None, None, b, half_b, note + "; the teacher's lead is within its uncertainty")
    point = a / b
    diff = t_interval(d)
    if diff.low is None:  # n_p < 2 or a zero spread: no interval of the numerator, none of the ratio
        return GapClosed(point, None, None, b, half_b, note)
    v_a = diff.std**2 / len(d) if diff.std is not None else 0.0
    b_paired = [baseline[s] for s in paired]
    mean_d, mean_bp = a, math.fsum(b_paired) / len(b_paired)
    s_db = math.fsum((x - mean_d) * (y - mean_bp) for x, y in zip(d, b_paired, strict=True)) / (len(d) - 1)
    c = -s_db / len(base)
    q = float(stats.t.ppf(0.5 + confidence / 2, min(len(d) - 1, nu_b)))
    big_a, big_b, big_c = b * b - q * q * v_b, a * b - q * q * c, a * a - q * q * v_a
    if big_a <= 0:
        return GapClosed(
            point, None, None, b, half_b, note + "; Fieller's set is unbounded at this confidence"
        )
    root = math.sqrt(max(big_b * big_b - big_a * big_c, 0.0))
    return GapClosed(point, (big_b - root) / big_a, (big_b + root) / big_a, b, half_b, note)


# --------------------------------------------------------------------------------------------- bootstrap
_CHUNK = 256  # bootstrap replicates computed at once


@dataclass(frozen=True)
class BootstrapResult:
    """Paired hierarchical bootstrap of Δ = metric(A) − metric(B): the point estimate on the original data, the
    percentile interval [low, high], P(Δ > 0) over the replicates, and the replicates themselves."""

    point: float
    low: float
    high: float
    p_improve: float
    n_boot: int
    replicates: np.ndarray = field(repr=False, compare=False)


def _stack(arm: Sequence[tuple[Any, Any]]) -> tuple[np.ndarray, np.ndarray]:
    inter = np.stack([np.asarray(i, dtype=float) for i, _ in arm])
    union = np.stack([np.asarray(u, dtype=float) for _, u in arm])
    if inter.ndim != 3 or inter.shape != union.shape:
        raise ValueError(f"per seed: inter and union [n_images, n_classes] of one shape, got {inter.shape}")
    return inter, union


def iou_from_sums(inter: np.ndarray, union: np.ndarray, classes: Sequence[int] | None = None) -> np.ndarray:
    """mean over classes c (of `classes`, default all) with U_c > 0 of I_c / U_c, over the last axis of summed
    intersections I and unions U; NaN where no class has U_c > 0. One class: that class's IoU."""
    if classes is not None:
        inter, union = inter[..., list(classes)], union[..., list(classes)]
    valid = union > 0
    iou = np.where(valid, inter / np.where(valid, union, 1.0), 0.0)
    count = valid.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, iou.sum(axis=-1) / count, np.nan)


def _counts(idx: np.ndarray, size: int) -> np.ndarray:
    """How often each of 0..size−1 occurs in each row of idx [..., k] -> float [..., size]."""
    flat = idx.reshape(-1, idx.shape[-1])
    offsets = (np.arange(flat.shape[0]) * size)[:, None]
    counts = np.bincount((flat + offsets).ravel(), minlength=flat.shape[0] * size)
    return counts.reshape(*idx.shape[:-1], size).astype(float)


def hierarchical_deltas(
    a: tuple[np.ndarray, np.ndarray],
    b: tuple[np.ndarray, np.ndarray],
    seed_idx: np.ndarray,
    image_idx: np.ndarray,
    classes: Sequence[int] | None = None,
) -> np.ndarray:
    """Δ of each bootstrap replicate r for given draws. a, b: (inter, union) of arm A and arm B, each float
    [S, N, C] (S seeds, N test images in the same order for both arms, C classes). seed_idx: int [R, S], the
    seeds drawn (with replacement) into the S slots of replicate r. image_idx: int [R, N] (one image draw per
    replicate, shared by every slot) or [R, S, N] (one per slot).

    For slot k of replicate r, with drawn seed s = seed_idx[r, k] and drawn images i_1..i_N:
        I^X_{r,k,c} = Σ_j inter_X[s, i_j, c],  U^X_{r,k,c} = Σ_j union_X[s, i_j, c]   (X = A, B; same i_j)
        m^X_{r,k} = mean over classes with U^X_{r,k,c} > 0 of I^X_{r,k,c} / U^X_{r,k,c}
        Δ_r = (1/S) Σ_k m^A_{r,k} − (1/S) Σ_k m^B_{r,k}
    Computed through image counts w_{r,k,i} (how often image i was drawn): I = w @ inter, one matrix product."""
    ia, ua = a
    ib, ub = b
    s, n, c = ia.shape
    sums = np.concatenate([ia, ua, ib, ub], axis=2)  # [S, N, 4C]
    flat = sums.transpose(1, 0, 2).reshape(n, s * 4 * c)  # [N, S·4C]
    r = seed_idx.shape[0]
    if image_idx.ndim == 2:  # shared: sums of every seed under the replicate's one image draw
        per_seed = (_counts(image_idx, n) @ flat).reshape(r, s, 4 * c)
        drawn = np.take_along_axis(per_seed, seed_idx[:, :, None], axis=1)  # [R, S slots, 4C]
    else:  # per slot: each slot's own image draw, then its drawn seed
        per_slot = (_counts(image_idx, n).reshape(r * s, n) @ flat).reshape(r, s, s, 4 * c)
        drawn = np.take_along_axis(per_slot, seed_idx[:, :, None, None], axis=2)[:, :, 0]
    m_a = iou_from_sums(drawn[..., :c], drawn[..., c : 2 * c], classes)
    m_b = iou_from_sums(drawn[..., 2 * c : 3 * c], drawn[..., 3 * c :], classes)
    return m_a.mean(axis=1) - m_b.mean(axis=1)


def paired_bootstrap(
    arm_a: Sequence[tuple[Any, Any]],
    arm_b: Sequence[tuple[Any, Any]],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = CONFIDENCE,
    classes: Sequence[int] | None = None,
    shared_images: bool = True,
) -> BootstrapResult:
    """Paired hierarchical bootstrap over seeds and test images of Δ = mIoU(A) − mIoU(B).

    arm_a[k], arm_b[k]: seed k's (inter, union) per image and class, arrays [N, C] of summed pixel
    intersections and unions, for the same N test images in the same order in both arms (and every seed).
    One replicate (`hierarchical_deltas`): draw S seeds with replacement; draw N images with replacement, the
    same image indices for both arms; recompute each drawn seed's IoU_c = ΣI_c / ΣU_c from the resampled sums,
    mIoU = the mean over classes with ΣU_c > 0 (`classes`: only those, e.g. (1,) for one class's IoU); average
    over the drawn seeds per arm; Δ = A − B.

    shared_images=True (default): one image draw per replicate, used by every drawn seed, since all seeds are
    scored on the same test set (images and seeds are crossed factors: the two-way "pigeonhole" bootstrap,
    Owen 2007, which keeps the test set's sampling error common to all seeds instead of averaging it away).
    shared_images=False: an independent image draw for each drawn seed (nested hierarchical bootstrap, for
    test sets that differ per seed).

    Returns the point estimate on the original data (mean over seeds of mIoU_A − mean of mIoU_B), the
    percentile interval (the (1 ± confidence)/2 quantiles of the replicates, numpy's linear interpolation),
    and P(Δ > 0) = the fraction of replicates with Δ > 0 (ties count as no improvement). Replicates whose Δ is
    NaN (no class with a union) are left out. Deterministic given `seed` (numpy PCG64 Generator); replicates
    are computed `_CHUNK` at a time to bound the memory."""
    if len(arm_a) != len(arm_b) or not arm_a:
        raise ValueError(f"both arms need the same seeds, got {len(arm_a)} and {len(arm_b)}")
    a, b = _stack(arm_a), _stack(arm_b)
    if a[0].shape != b[0].shape:
        raise ValueError(f"arms differ in shape: {a[0].shape} vs {b[0].shape}")
    s, n, _ = a[0].shape
    point = float(
        np.mean(iou_from_sums(a[0].sum(axis=1), a[1].sum(axis=1), classes))
        - np.mean(iou_from_sums(b[0].sum(axis=1), b[1].sum(axis=1), classes))
    )
    rng = np.random.default_rng(seed)
    parts = []
    for start in range(0, n_boot, _CHUNK):
        r = min(_CHUNK, n_boot - start)
        seed_idx = rng.integers(0, s, size=(r, s))
        image_idx = rng.integers(0, n, size=(r, n) if shared_images else (r, s, n))
        parts.append(hierarchical_deltas(a, b, seed_idx, image_idx, classes))
    deltas = np.concatenate(parts)
    finite = deltas[np.isfinite(deltas)]
    if finite.size == 0:
        raise ValueError("no replicate has a class with a union > 0")
    low, high = np.quantile(finite, [(1 - confidence) / 2, (1 + confidence) / 2])
    return BootstrapResult(point, float(low), float(high), float(np.mean(finite > 0)), n_boot, deltas)
