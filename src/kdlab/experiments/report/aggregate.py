"""Aggregation over seeds: when configs ran over several seeds (`--seeds`), one row per config with mean ± std
over its seeds and, for a distilled config, the paired difference from its baseline (same seed) with a
Student-t interval, a verdict against an equivalence margin, the probability of improvement, a power hint,
the gap closed with Fieller's interval and, given per-image sums, a paired bootstrap (see `seed_stats`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kdlab.evaluate.report_layout import HEADLINE_LABELS, ReportLayout
from kdlab.experiments.report.collect import has_result, is_inside, teacher_checkpoints
from kdlab.experiments.report.layouts import layout_for_rows
from kdlab.experiments.report.run_files import RunRecord, read_run, split_seed
from kdlab.experiments.report.teacher_lead import SUMMED_HEADLINES, teacher_lead_note
from kdlab.experiments.seed_stats import (
    EQUIVALENCE_MARGIN,
    gap_closed,
    paired_bootstrap,
    power_hint,
    prob_improvement,
    seeds_for_power,
    t_interval,
    teacher_lead,
    verdict,
)

log = logging.getLogger(__name__)

# Columns that vary from seed to seed: mean ± std in the aggregated table. The others (architecture sizes)
# are the same for every seed of a config and keep one value (their mean).
SPREAD_COLUMNS: tuple[str, ...] = (
    "best_epoch", "train_time_min", "onnx_latency_ms", "int8_latency_ratio",
    *(f"{kind}_{m}" for kind in ("onnx", "int8") for m in HEADLINE_LABELS),
)  # fmt: skip
_FIXED_COLUMNS: tuple[str, ...] = ("params_m", "params_k", "macs_g", "macs_m", "onnx_mb")
DELTA_COLUMNS: tuple[str, ...] = (
    "baseline",
    "delta_mean",
    "delta_std",
    "delta_low",
    "delta_high",
    "delta_n",
    "verdict",
    "p_improve",
    "boot_low",
    "boot_high",
    "boot_p_improve",
    "power_seeds",
    "power_hint",
)
PerImageSums = Mapping[str, tuple[np.ndarray, np.ndarray]]


def aggregated_columns(layout: ReportLayout) -> tuple[str, ...]:
    """The columns of the per-config table: each metric as <m>_mean and <m>_std, n after status, the paired
    difference from the baseline (delta_*), its verdict, p_improve, the bootstrap (boot_*) and the power hint
    before gap_closed, which gets its interval."""
    out: list[str] = []
    for column in layout.columns:
        if column in layout.metric_columns or column in SPREAD_COLUMNS:
            out += [f"{column}_mean", f"{column}_std"]
        elif column == "status":
            out += ["status", "n", "seeds"]
        elif column == "gap_closed":
            out += [*DELTA_COLUMNS, "gap_closed", "gap_closed_low", "gap_closed_high", "teacher_lead_note"]
        else:
            out.append(column)
    return tuple(out)


UNSEEDED_SUFFIX = " (no seed)"  # the row of a run left out of its config's seed group


def separate_unseeded(records: list[RunRecord]) -> list[RunRecord]:
    """The records, where a run without a seed whose config also has seed runs (`<config>` beside
    `<config>__seed-0..2`: typically left by an earlier invocation without --seeds, maybe with other settings
    and the config's default seed) is moved out of that seed group into its own, `<config> (no seed)`.
    Idempotent; the others are returned as they are."""
    seeded = {g for g, s in (r.group_and_seed() for r in records) if s is not None}
    out = []
    for record in records:
        group, seed = record.group_and_seed()
        if seed is None and group in seeded:
            record = dataclasses.replace(record, group=group + UNSEEDED_SUFFIX)
        out.append(record)
    return out


def grouping_note(records: list[RunRecord]) -> str | None:
    """The sentence that says which runs each row over seeds pools and which runs were left out of a seed
    group, and why; None when no row pools several runs."""
    records = separate_unseeded(records)
    groups: dict[str, list[RunRecord]] = {}
    for record in records:
        groups.setdefault(record.group_and_seed()[0], []).append(record)
    pooled = [f"{g}: {', '.join(r.name for r in rs)}" for g, rs in groups.items() if len(rs) > 1]
    if not pooled:
        return None
    text = "Runs pooled per row (one config over its seeds, `<config>__seed-<s>`): " + "; ".join(pooled) + "."
    left_out = [r for r in records if r.group and r.group.endswith(UNSEEDED_SUFFIX)]
    if left_out:
        names = ", ".join(f"{r.name} (its own row, {r.group})" for r in left_out)
        text += (
            f" Left out of a seed group: {names}: recorded without a seed, e.g. by an earlier invocation without "
            "--seeds, so its seed and settings may differ from the seed runs of its config."
        )
    return text


def is_multi_seed(records: list[RunRecord]) -> bool:
    """True when some config ran more than once (--seeds): the report then aggregates by config."""
    groups = [r.group_and_seed()[0] for r in separate_unseeded(records)]
    return len(set(groups)) < len(groups)


def _sweep_part(group: str) -> str:
    return group.split("__", 1)[1] if "__" in group else ""


def aggregate_rows(
    rows: list[dict[str, Any]],
    records: list[RunRecord],
    layout: ReportLayout | None = None,
    *,
    equivalence_margin: float = EQUIVALENCE_MARGIN,
    per_image: PerImageSums | None = None,
) -> list[dict[str, Any]]:
    """One row per config (the runs of one group, i.e. config and sweep value, over seeds), in first-seen order;
    a run without a seed is not pooled with its config's seed runs (`separate_unseeded`).

    Runs without a result (failed, skipped) are named in `status` and left out of every mean; n counts the
    runs with a result. Distilled configs get, on the headline metric, from their baseline (the first student
    config of the same architecture, preferring the same sweep value, then one with seeds in common), over the
    seeds both have:
    - delta_*: the paired difference distilled − baseline, its mean, std, n and 95% Student-t interval (none
      for n < 2 or a zero spread);
    - verdict: `seed_stats.verdict` against ±`equivalence_margin` (the runs' `report.equivalence_margin`);
    - p_improve: P(mean Δ > 0) from the t distribution (`seed_stats.prob_improvement`);
    - power_seeds / power_hint: how many paired seeds a two-sided 95% t-test needs to detect a Δ of
      max(|mean Δ|, margin) with 80% power at the observed sd of the differences (`seed_stats.seeds_for_power`,
      None beyond 100 seeds) and the one-line hint that says it (`seed_stats.power_hint`); both None for
      n < 2 or a zero spread;
    - gap_closed = mean paired Δ / (teacher mean − baseline mean), with Fieller's 95% interval
      gap_closed_low/high that carries the uncertainty of the teacher and baseline means; None unless the
      teacher's lead exceeds its own 95% uncertainty (`seed_stats.gap_closed`);
    - boot_low/boot_high/boot_p_improve: the paired hierarchical bootstrap over seeds and test images
      (`seed_stats.paired_bootstrap`, 2000 replicates, seed 0) when `per_image` (run name -> (inter, union)
      arrays [n_images, n_classes]) holds both arms of every paired seed and the headline is a ratio of summed
      intersections and unions (`SUMMED_HEADLINES`); else None.
    """
    layout = layout or layout_for_rows(rows)
    head, arch = layout.headline, layout.arch_column
    by_name = {r.name: r for r in separate_unseeded(records)}
    groups: dict[str, list[tuple[int | None, dict[str, Any], RunRecord | None]]] = {}
    for row in rows:
        record = by_name.get(row["experiment"])
        group, seed = record.group_and_seed() if record else split_seed(row["experiment"])
        groups.setdefault(group, []).append((seed, row, record))

    group_dirs: dict[str, list[Path]] = {}  # group -> the run directories of its runs
    for group, members in groups.items():
        group_dirs[group] = [rec.run_dir for _, _, rec in members if rec is not None and rec.run_dir]
    out: list[dict[str, Any]] = []
    values: dict[str, dict[int | None, float]] = {}  # group -> seed -> headline
    run_names: dict[str, dict[int | None, str]] = {}  # group -> seed -> run name (runs with a result)
    own_teacher: dict[str, str | None] = {}
    for group, members in groups.items():
        ok = [(seed, row) for seed, row, _ in members if has_result(row, head)]
        # A run that failed before writing its config has an inferred role; one with a result knows better.
        first = ok[0][1] if ok else members[0][1]
        values[group] = {seed: row[head] for seed, row in ok}
        run_names[group] = {seed: row["experiment"] for seed, row in ok}
        bad = [(seed, row["status"]) for seed, row, _ in members if not has_result(row, head)]
        statuses = {row["status"] for _, row, _ in members}
        if not bad:
            status = statuses.pop() if len(statuses) == 1 else "completed"
        else:
            status = f"{len(ok)}/{len(members)} with results; " + ", ".join(
                f"{'seed ' + str(seed) if seed is not None else 'run'} {why}" for seed, why in bad
            )
        agg: dict[str, Any] = {
            "experiment": group,
            "status": status,
            "n": len(ok),
            "seeds": " ".join(str(seed) for seed, _ in ok if seed is not None) or None,
            "role": first["role"],
            arch: first.get(arch),
        }
        for column in layout.columns:
            if column in layout.metric_columns or column in SPREAD_COLUMNS:
                stat = t_interval([row[column] for _, row in ok if row.get(column) is not None])
                agg[f"{column}_mean"], agg[f"{column}_std"] = stat.mean, stat.std
            elif column in _FIXED_COLUMNS:
                agg[column] = t_interval([row[column] for _, row in ok if row.get(column) is not None]).mean
            elif column == "int8_shipped":
                verdicts = [row[column] for _, row in ok if row.get(column) is not None]
                shipped = sum(v == "yes" for v in verdicts)
                agg[column] = f"{shipped}/{len(verdicts)} seeds" if verdicts else None
        out.append(agg)
        own_teacher[group] = None
        for _, _, rec in members[:1]:
            files = read_run(rec.run_dir) if rec is not None else None
            for ckpt in teacher_checkpoints(files.config if files else None, rec.run_dir if rec else None):
                own_teacher[group] = next(
                    (
                        g
                        for g, dirs in group_dirs.items()
                        if g != group and any(is_inside(ckpt, d) for d in dirs)
                    ),
                    own_teacher[group],
                )

    means = {row["experiment"]: row[f"{head}_mean"] for row in out}
    teachers = [r["experiment"] for r in out if r["role"] == "teacher" and r[f"{head}_mean"] is not None]
    for row in out:
        group = row["experiment"]
        for column in (*DELTA_COLUMNS, "pct_of_teacher", "gap_closed", "gap_closed_low", "gap_closed_high",
                       "teacher_lead_note"):  # fmt: skip
            row[column] = None
        if row["role"] == "teacher" and group in teachers:
            ref = group
        elif own_teacher[group] in teachers:
            ref = own_teacher[group]
        else:
            ref = teachers[0] if teachers else None
        teacher_mean = means.get(ref) if ref else None
        if row[f"{head}_mean"] is None:
            continue
        candidates = [
            r for r in out if r["role"] == "student" and r["n"] > 0 and r.get(arch) == row.get(arch)
        ]
        # the same sweep value first, then a config with seeds in common (not a run left out of its seed group)
        candidates.sort(key=lambda r: (_sweep_part(r["experiment"]) != _sweep_part(group),
                                       not values[r["experiment"]].keys() & values[group].keys()))  # fmt: skip
        students = [r["experiment"] for r in out if r["role"] == "student" and r["n"] > 0]
        lead_base = group if row["role"] == "student" else (
            candidates[0]["experiment"] if candidates else (students[0] if students else None)
        )  # fmt: skip
        if ref is None or not teacher_mean:
            pass
        elif ref == group:
            row["pct_of_teacher"] = 100.0
        elif lead_base is None:
            row["teacher_lead_note"] = (
                "no baseline (a student without distillation) to measure the teacher's lead"
            )
        else:
            row["teacher_lead_note"] = _lead_note(values, run_names, rows, ref, lead_base, per_image, layout)
            if row["teacher_lead_note"] is None:
                row["pct_of_teacher"] = 100.0 * row[f"{head}_mean"] / teacher_mean
        if row["role"] != "distilled" or not candidates:
            continue
        baseline = candidates[0]["experiment"]
        seeds = [s for s in values[group] if s in values[baseline]]
        diffs = {s: values[group][s] - values[baseline][s] for s in seeds}
        diff = t_interval(list(diffs.values()))
        row.update(baseline=baseline, delta_mean=diff.mean, delta_std=diff.std, delta_low=diff.low,
                   delta_high=diff.high, delta_n=diff.n, verdict=verdict(diff, equivalence_margin),
                   p_improve=prob_improvement(list(diffs.values())), delta_seeds=seeds)  # fmt: skip
        if diff.std and diff.mean is not None:  # n >= 2 and a non-zero spread
            target = max(abs(diff.mean), equivalence_margin)
            row["power_seeds"] = seeds_for_power(diff.std, target)
            row["power_hint"] = power_hint(diff.std, target)
        if per_image is not None and seeds:
            row.update(_bootstrap(per_image, head, [run_names[group][s] for s in seeds],
                                  [run_names[baseline][s] for s in seeds], group))  # fmt: skip
        if ref is None or not teacher_mean or row["teacher_lead_note"] is not None:
            continue
        gap = gap_closed(diffs, values[baseline], list(values[ref].values()))
        row.update(gap_closed=gap.point, gap_closed_low=gap.low, gap_closed_high=gap.high)
    return out


def _lead_note(
    values: dict[str, dict[int | None, float]],
    run_names: dict[str, dict[int | None, str]],
    rows: list[dict[str, Any]],
    teacher: str,
    baseline: str,
    per_image: PerImageSums | None,
    layout: ReportLayout,
) -> str | None:
    """None when the teacher config's lead over the baseline config is resolved over seeds
    (`seed_stats.teacher_lead`: margin beyond its 95% half-width); with one run of each, the per-run rule
    (`teacher_lead.teacher_lead_note`, a bootstrap over test images). Else the reason, for the legend."""
    t_values, b_values = list(values[teacher].values()), list(values[baseline].values())
    if len(t_values) < 2 and len(b_values) < 2:
        by_name = {r["experiment"]: r for r in rows}
        t_row = by_name[next(iter(run_names[teacher].values()))]
        b_row = by_name[next(iter(run_names[baseline].values()))]
        return teacher_lead_note(t_row, b_row, dict(per_image or {}), layout)
    lead = teacher_lead(t_values, b_values)
    if lead.resolved:
        return None
    width = f"±{lead.half_width:.4f}" if lead.half_width is not None else "not estimable"
    return (
        f"the teacher {teacher}'s lead over {baseline} ({lead.margin:+.4f} {layout.headline_label}) is within its "
        f"95% uncertainty over seeds ({width}; {lead.note})"
    )


def _bootstrap(
    per_image: PerImageSums, head: str, distilled: list[str], baseline: list[str], group: str
) -> dict[str, float | None]:
    """boot_low, boot_high, boot_p_improve of the paired bootstrap (None where it cannot be computed)."""
    none: dict[str, float | None] = {"boot_low": None, "boot_high": None, "boot_p_improve": None}
    if head not in SUMMED_HEADLINES:
        log.warning("report: no bootstrap for %s: %s is not a ratio of summed intersections and unions",
                    group, head)  # fmt: skip
        return none
    missing = [name for name in (*distilled, *baseline) if name not in per_image]
    if missing:
        log.warning("report: no bootstrap for %s: no per-image sums of %s", group, ", ".join(missing))
        return none
    try:
        boot = paired_bootstrap(
            [per_image[name] for name in distilled],
            [per_image[name] for name in baseline],
            classes=SUMMED_HEADLINES[head],
        )
    except ValueError as exc:  # a report must not die on one odd input
        log.warning("report: no bootstrap for %s (%s)", group, exc)
        return none
    return {"boot_low": boot.low, "boot_high": boot.high, "boot_p_improve": boot.p_improve}
