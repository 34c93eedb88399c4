"""Rendering report tables: rows as pandas DataFrames, written as CSV, JSON and a padded Markdown pipe table
(per run, or per config over seeds with mean ± std, the paired Δ, its interval and the verdict), and the
report's intro and method text.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from kdlab.evaluate.report_layout import HEADLINE_LABELS, ReportLayout
from kdlab.experiments.report.aggregate import SPREAD_COLUMNS
from kdlab.experiments.seed_stats import EQUIVALENCE_MARGIN, GAIN, HURTS, INCONCLUSIVE, MAX_SEEDS, ZERO_SPREAD

MISSING = "—"


def table_frame(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> pd.DataFrame:
    """The rows as a DataFrame with exactly `columns` in that order (missing values NaN/None)."""
    return pd.DataFrame([{c: row.get(c) for c in columns} for row in rows], columns=list(columns))


def frame_to_csv(frame: pd.DataFrame) -> str:
    """CSV text: 6 significant digits, missing values empty."""
    return frame.to_csv(index=False, float_format="%.6g", lineterminator="\n")


def frame_to_json(frame: pd.DataFrame) -> str:
    """A JSON list of row objects (missing values null); `pandas.read_json` reads it back."""
    return frame.to_json(orient="records", indent=2) + "\n"


# header, format of a number (None = text)
_MD_FORMAT: dict[str, tuple[str, str | None]] = {
    "experiment": ("experiment", None),
    "status": ("status", None),
    "role": ("role", None),
    "encoder": ("encoder", None),
    "params_m": ("params M", "{:.2f}"),
    "macs_g": ("GMACs", "{:.2f}"),
    "target_iou": ("target IoU", "{:.4f}"),
    "miou": ("mIoU", "{:.4f}"),
    "iou_background": ("IoU bg", "{:.4f}"),
    "iou_target": ("IoU target", "{:.4f}"),
    "iou_other": ("IoU other", "{:.4f}"),
    "boundary_f1": ("boundary F1", "{:.4f}"),
    "best_epoch": ("best ep", "{:.0f}"),
    "train_time_min": ("train min", "{:.1f}"),
    "onnx_latency_ms": ("ONNX ms", "{:.2f}"),
    "onnx_mb": ("ONNX MB", "{:.1f}"),
    **{f"onnx_{m}": (f"ONNX {label}", "{:.4f}") for m, label in HEADLINE_LABELS.items()},
    **{f"int8_{m}": (f"INT8 {label}", "{:.4f}") for m, label in HEADLINE_LABELS.items()},
    "int8_latency_ratio": ("INT8/FP32 ms", "{:.2f}"),
    "int8_shipped": ("INT8 shipped", None),
    "pct_of_teacher": ("% of teacher", "{:.1f}"),
    "gap_closed": ("gap closed", "{:.2f}"),
    "model": ("model", None),
    "macs_m": ("MMACs", "{:.1f}"),
    "params_k": ("params k", "{:.1f}"),
    "top1": ("top-1", "{:.4f}"),
    "top5": ("top-5", "{:.4f}"),
    "ece": ("ECE", "{:.4f}"),
    "n": ("n", "{:.0f}"),
    "baseline": ("baseline", None),
    "verdict": ("verdict", None),
}


def _missing(value: Any) -> bool:
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


def _md_cell(column: str, value: Any) -> str:
    if _missing(value):
        return MISSING
    fmt = _MD_FORMAT[column][1]
    if fmt is not None and isinstance(value, int | float):
        return fmt.format(value)
    return str(value).replace("|", "\\|")


def _markdown(cells: pd.DataFrame, numeric: list[bool]) -> str:
    """Cells (strings) as a GitHub pipe table, numbers right-aligned, padded to be read as plain text."""
    align = ["right" if num else "left" for num in numeric]
    return cells.to_markdown(index=False, tablefmt="pipe", colalign=align, disable_numparse=True)


# Shown in the Markdown table only when some run has a value (INT8 exists only with export.quantize=int8);
# the CSV and JSON always have them.
OPTIONAL_COLUMNS = (*(f"int8_{m}" for m in HEADLINE_LABELS), "int8_latency_ratio", "int8_shipped")


def _shown(frame: pd.DataFrame, column: str) -> bool:
    if column not in OPTIONAL_COLUMNS:
        return True
    cells = [c for c in frame.columns if c == column or c.startswith(f"{column}_")]
    return any(not _missing(v) for c in cells for v in frame[c])


def runs_markdown(frame: pd.DataFrame, layout: ReportLayout) -> str:
    """The per-run table: one row per run, today's columns."""
    columns = [c for c in layout.columns if _shown(frame, c)]
    cells = pd.DataFrame(
        {_MD_FORMAT[c][0]: [_md_cell(c, v) for v in frame[c]] for c in columns},
        columns=[_MD_FORMAT[c][0] for c in columns],
    )
    return _markdown(cells, [_MD_FORMAT[c][1] is not None for c in columns])


def _signed(value: Any, fmt: str) -> str:
    return MISSING if _missing(value) else ("+" if value >= 0 else "−") + fmt.format(abs(value))


def aggregated_markdown(frame: pd.DataFrame, layout: ReportLayout) -> str:
    """The per-config table: metrics as mean ± std, n, the paired Δ with its 95% interval and the verdict."""
    cols: dict[str, list[str]] = {}
    numeric: list[bool] = []
    records = frame.to_dict(orient="records")

    def add(header: str, cells: list[str], is_number: bool) -> None:
        cols[header] = cells
        numeric.append(is_number)

    for column in (c for c in layout.columns if _shown(frame, c)):
        label, fmt = _MD_FORMAT[column]
        if column in layout.metric_columns or column in SPREAD_COLUMNS:

            def spread(row: dict[str, Any], column: str = column, fmt: str | None = fmt) -> str:
                mean, std = row[f"{column}_mean"], row[f"{column}_std"]
                if _missing(mean):
                    return MISSING
                text = (fmt or "{}").format(mean)
                return text if _missing(std) else f"{text} ± {(fmt or '{}').format(std)}"

            add(label, [spread(r) for r in records], True)
        elif column == "gap_closed":
            add("baseline", [_md_cell("baseline", r["baseline"]) for r in records], False)
            add(
                f"Δ {layout.headline_label} (paired)",
                [_signed(r["delta_mean"], "{:.4f}") for r in records],
                True,
            )
            add("95% CI of Δ", [
                MISSING if _missing(r["delta_mean"]) else
                (f"n={r['delta_n']:.0f}, no interval" if _missing(r["delta_low"]) else
                 f"[{_signed(r['delta_low'], '{:.4f}')}, {_signed(r['delta_high'], '{:.4f}')}]")
                for r in records
            ], True)  # fmt: skip
            add("verdict", [
                MISSING if _missing(r["verdict"]) and _missing(r["delta_mean"]) else
                (f"{MISSING} (n={r['delta_n']:.0f})" if _missing(r["verdict"]) else str(r["verdict"]))
                for r in records
            ], False)  # fmt: skip
            add("P(Δ>0)", [
                MISSING if _missing(r["p_improve"]) else f"{r['p_improve']:.2f}" for r in records
            ], True)  # fmt: skip
            if any(not _missing(r["boot_low"]) for r in records):
                add("bootstrap 95% CI (P(Δ>0))", [
                    MISSING if _missing(r["boot_low"]) else
                    f"[{_signed(r['boot_low'], '{:.4f}')}, {_signed(r['boot_high'], '{:.4f}')}] "
                    f"({r['boot_p_improve']:.2f})"
                    for r in records
                ], True)  # fmt: skip
            add("seeds for 80% power", [
                MISSING if _missing(r["power_hint"]) else
                (f">{MAX_SEEDS}" if _missing(r["power_seeds"]) else f"{r['power_seeds']:.0f}")
                for r in records
            ], True)  # fmt: skip
            add("gap closed", [
                MISSING if _missing(r["gap_closed"]) else
                f"{r['gap_closed']:.2f}" + ("" if _missing(r["gap_closed_low"]) else
                                            f" [{r['gap_closed_low']:.2f}, {r['gap_closed_high']:.2f}]")
                for r in records
            ], True)  # fmt: skip
        else:
            add(label, [_md_cell(column, r[column]) for r in records], fmt is not None)
            if column == "status":
                add("n", [_md_cell("n", r["n"]) for r in records], True)
    return _markdown(pd.DataFrame(cols, columns=list(cols)), numeric)


def intro(layout: ReportLayout, runs: int, completed: int, val_only: list[str] | None = None) -> str:
    """The intro paragraph: how many runs, what they are (the layout's sentence), which split the numbers are
    on, what the ratios use. `val_only`: the runs (with a result) that have no test split."""
    head = layout.headline_label
    text = (
        f"{runs} experiments ({completed} completed). {layout.intro} Each run's checkpoint is its best epoch by "
        f"{head} on the validation set; every metric shown is that checkpoint's score on the held-out test "
        f"split, scored once. The headline, % of teacher and gap closed = (distilled − baseline) / (teacher − "
        f"baseline) use {head}. {MISSING} = not available."
    )
    if val_only:
        text += (
            f" Without a test split ({', '.join(val_only)}), the best epoch is chosen on the same validation set "
            "that is reported, which inflates those numbers a little, each run by a different amount: small "
            "differences between such runs are not results."
        )
    return text


def lead_legend(rows: list[dict[str, Any]]) -> str | None:
    """Why "% of teacher" and "gap closed" read {MISSING} for some rows (their `teacher_lead_note`), grouped
    by reason; None when every row that could show them does."""
    reasons: dict[str, list[str]] = {}
    for row in rows:
        note = row.get("teacher_lead_note")
        if isinstance(note, str) and note:
            reasons.setdefault(note, []).append(str(row["experiment"]))
    if not reasons:
        return None
    parts = [f"{', '.join(names)}: {reason}" for reason, names in reasons.items()]
    return (
        f"% of teacher and gap closed read {MISSING} where the teacher's lead over the baseline is not larger "
        "than its own uncertainty (a ratio of differences within the noise is not a result). "
        + "; ".join(parts)
        + "."
    )


def seed_method(layout: ReportLayout, equivalence_margin: float = EQUIVALENCE_MARGIN) -> str:
    """How the per-config table over seeds is computed."""
    label, m = layout.headline_label, f"{equivalence_margin:g}"
    return (
        "One row per config over its seeds: mean ± std (ddof=1) over the n runs with a result; failed or skipped "
        f"seeds are named in status and left out. Δ {label} (paired) = distilled − baseline on the same seed "
        "(same initial weights and data order), averaged over the seeds both have; 95% CI = mean ± "
        "t(0.975, n−1)·sd/√n (Student t over seeds); none with n < 2 or when every paired Δ is the same. "
        f"Verdict: gain when the interval lies above 0, hurts when below, equivalent within ±{m} when it lies "
        f"inside (−{m}, +{m}) (the equivalence margin), else inconclusive; inconclusive (zero spread) when "
        "every paired Δ is the same (identical or rounded runs: no evidence). P(Δ>0) = the Student-t probability "
        "that the mean Δ over seeds is above 0. Bootstrap (when per-image sums exist): 2000 paired resamples of "
        "seeds, then test images with the same indices for both arms, IoU recomputed from the summed "
        "intersections and unions; percentile 95% interval and the share of resamples with Δ > 0. Seeds for 80% "
        "power: how many paired seeds a two-sided 95% t-test needs to detect a Δ of max(|mean Δ|, margin) at the "
        "observed sd (power_hint in the CSV says it in words). Gap closed = mean paired Δ / (mean teacher − "
        "mean baseline), with Fieller's 95% interval, which carries the uncertainty of the teacher and baseline "
        f"means; it and % of teacher read {MISSING} when the teacher's margin over the baseline is within its own "
        "95% uncertainty (over seeds: mean difference ± t·sqrt(s_T²/n_T + s_B²/n_B), Welch degrees of freedom, a "
        "single run's spread counting 0; one run each: a bootstrap over test images). "
        "Per-seed rows: experiment_comparison_runs.csv and experiment_runs.json."
    )


def suggested_seeds(seeds: list[Any], wanted: int) -> list[int] | None:
    """The seeds to pass to --seeds for `wanted` paired seeds: the ones already run, then the smallest unused
    integers. None when the runs have no integer seeds (nothing to extend)."""
    have = [s for s in seeds if isinstance(s, int) and not isinstance(s, bool)]
    if len(have) != len(seeds) or not have:
        return None
    out, candidate = sorted(have), 0
    while len(out) < wanted:
        if candidate not in out:
            out.append(candidate)
        candidate += 1
    return sorted(out)


def verdict_summary(rows: list[dict[str, Any]], layout: ReportLayout, scored_on: str) -> str | None:
    """The verdicts in words, one line per distilled config with a baseline: the paired Δ, its interval, the
    seeds, what the verdict means and, when it is inconclusive, how many seeds would settle it and the
    `--seeds ... --resume` that adds them. The report's last lines (and so the runner's last output)."""
    lines = []
    for row in rows:
        if _missing(row.get("delta_mean")):
            continue
        seeds = list(row.get("delta_seeds") or [])
        if all(isinstance(s, int) for s in seeds):
            seeds.sort()
        name, base = row["experiment"], row["baseline"]
        n = int(row["delta_n"])  # = len(seeds): the seeds both configs have
        text = f"- **{name}** vs {base}, {n} paired seed{'s' if n != 1 else ''}"
        text += f" ({', '.join(str(s) for s in seeds)})" if seeds else ""
        text += f": Δ {_signed(row['delta_mean'], '{:.4f}')}"
        if not _missing(row.get("delta_low")):
            text += (
                f", 95% CI [{_signed(row['delta_low'], '{:.4f}')}, {_signed(row['delta_high'], '{:.4f}')}]"
            )
        word = row.get("verdict")
        if _missing(word):
            text += ": no verdict from one seed (an interval needs two or more)."
        elif word == GAIN:
            text += ": **gain** (the whole interval lies above 0)."
        elif word == HURTS:
            text += ": **hurts** (the whole interval lies below 0)."
        elif word == ZERO_SPREAD:
            text += ": **inconclusive**: every seed gave the same Δ, so there is no spread to build an interval from."
        elif word == INCONCLUSIVE:
            text += ": **inconclusive** (the interval holds 0 and reaches beyond the equivalence margin)."
        else:  # equivalent within ±m
            text += f": **{word}** (the whole interval lies inside that margin)."
        hint, wanted = row.get("power_hint"), row.get("power_seeds")
        if word not in (GAIN, HURTS) and isinstance(hint, str) and hint:
            text += f" {hint[0].upper()}{hint[1:]}"
            more = None if _missing(wanted) else suggested_seeds(seeds, int(wanted))
            if more is not None and len(more) > n:
                text += (
                    f": rerun the same command with `--seeds {' '.join(str(s) for s in more)} --resume` "
                    "(finished runs are reused, not retrained)."
                )
            else:
                text += "."
        lines.append(text)
    if not lines:
        return None
    return "\n".join([f"Verdicts ({layout.headline_label}, {scored_on}, paired by seed):", "", *lines])
