"""Reading run directories into report rows: one row per run, with its role (teacher / student / distilled),
"% of teacher" and "gap closed".

Each run directory is read as the trainer leaves it (summary.json, config.json, logs/metrics.csv and, when
exported, checkpoints/best_model.onnx.json). Metrics are the test split's score of the checkpoint selected
on validation (summary.json `test_metrics`) when the run has a test split, else the best epoch's validation
row (selected and reported on the same set; the report says so). What differs per task (columns, headline
metric, architecture name, MAC count) comes from the task's `ReportLayout` and MAC counter, looked up by the
run's task; the headline follows the runs' `training.monitor` (the metric that selected their checkpoints).

"% of teacher" and "gap closed" are shown only where the teacher's lead over the baseline exceeds its own
uncertainty (`teacher_lead_note`): a ratio of two differences within the noise reads as a result.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from kdlab.evaluate.report_layout import ReportLayout
from kdlab.experiments.report.layouts import layout_for_configs, onnx_score_columns, run_task
from kdlab.experiments.report.run_files import (
    RESULT_STATUSES,
    RunFiles,
    RunRecord,
    as_dict,
    find_key,
    nested,
    number,
    read_run,
)
from kdlab.experiments.report.teacher_lead import per_image_sums, teacher_lead_note
from kdlab.tasks import get_task

log = logging.getLogger(__name__)

ROLES: tuple[str, ...] = ("teacher", "student", "distilled")


def _best_epoch_row(
    rows: list[dict[str, str]], best_epoch: int | None, headline: str, mode: str = "max"
) -> dict[str, str] | None:
    """The validation row of `best_epoch` (summary.json's, which follows training.monitor), or (without one)
    the row with the best val_<headline> (lowest when `mode` is "min")."""
    key = f"val_{headline}"
    validated = [r for r in rows if number(r.get(key)) is not None]
    if best_epoch is not None and best_epoch > 0:
        for row in validated:
            if number(row.get("epoch")) == best_epoch:
                return row
    if not validated:
        return None
    if mode == "min":
        return min(validated, key=lambda r: number(r[key]) or math.inf)
    return max(validated, key=lambda r: number(r[key]) or -math.inf)


def _monitored(
    summary: dict[str, Any] | None, config: dict[str, Any] | None, headline: str
) -> tuple[str, str]:
    """(metric, mode) that picks the best epoch: training.monitor when the run set one, else the headline."""
    monitor = nested(config, "training", "monitor")
    if isinstance(monitor, str) and monitor:
        mode = nested(summary, "best_metric_mode") or nested(config, "training", "mode")
        return monitor, mode if mode in ("max", "min") else "max"
    return headline, "max"


def teacher_checkpoints(config: dict[str, Any] | None, run_dir: Path | None = None) -> list[Path]:
    """Every teacher checkpoint a (distillation-enabled) config names, resolved against the cwd. A relative
    path under the config's own `output_dir` (as the runner writes them: experiments/<teacher>/...) is also
    tried under the directory that holds `run_dir` now, so a report still finds the teacher when the output
    directory was moved or renamed, or the report runs from another directory."""
    distill = nested(config, "distillation")
    if not isinstance(distill, dict) or not distill.get("enabled"):
        return []
    paths = [distill.get("teacher_checkpoint")]
    paths += [t.get("checkpoint") for t in distill.get("teachers") or [] if isinstance(t, dict)]
    found = [Path(p).resolve() for p in paths if isinstance(p, str) and p]
    output_dir = nested(config, "output_dir")
    if (
        run_dir is not None
        and isinstance(output_dir, str)
        and output_dir
        and not Path(output_dir).is_absolute()
    ):
        for p in paths:
            if isinstance(p, str) and p and not Path(p).is_absolute() and Path(p).is_relative_to(output_dir):
                moved = (Path(run_dir).parent / Path(p).relative_to(output_dir)).resolve()
                if moved not in found:
                    found.append(moved)
    return found


def is_inside(path: Path, run_dir: Path | None) -> bool:
    return run_dir is not None and path.is_relative_to(run_dir.resolve())


def _onnx_scores(meta: dict[str, Any] | None, layout: ReportLayout) -> dict[str, Any]:
    """best_model.onnx.json -> the row's ONNX score columns (None where the export recorded none)."""
    head = layout.headline
    onnx_col, int8_col, ratio_col, shipped_col = onnx_score_columns(layout)
    out: dict[str, Any] = dict.fromkeys(onnx_score_columns(layout))
    accuracy = nested(meta, "accuracy")
    out[onnx_col] = number(nested(accuracy, "onnx", head)) if isinstance(accuracy, dict) else None
    int8 = nested(meta, "int8")
    if isinstance(int8, dict):
        out[int8_col] = number(nested(int8, "onnx", head))
        out[ratio_col] = number(nested(int8, "latency", "int8_over_fp32"))
        drop = number(nested(int8, "drop"))
        out[shipped_col] = "yes" if int8.get("accepted") else (
            f"no: −{drop:.4f} > {int8.get('max_drop')}" if drop is not None else "no"
        )  # fmt: skip
    return out


def has_result(row: dict[str, Any], headline: str) -> bool:
    return row["status"] in RESULT_STATUSES and row.get(headline) is not None


def _macs_g(config: dict[str, Any] | None, name: str) -> float | None:
    """GMACs of one forward pass, counted by the run's own task; None when not countable."""
    if not isinstance(config, dict):
        return None
    try:
        macs = get_task(run_task(config)).count_macs(config)
    except Exception as exc:  # a report must not die on one odd config
        log.warning("report: cannot count MACs of %s (%s)", name, exc)
        return None
    return macs / 1e9 if macs is not None else None


def _base_row(record: RunRecord, files: RunFiles, layout: ReportLayout) -> dict[str, Any]:
    summary, config = files.summary, files.config
    best_epoch_value = number(nested(summary, "best_epoch"))
    best_epoch = int(best_epoch_value) if best_epoch_value else None
    best_row = _best_epoch_row(files.metrics_rows, best_epoch, *_monitored(summary, config, layout.headline))
    test = nested(summary, "test_metrics")
    split = "val"
    if best_row is not None:
        metrics = {k: number(best_row.get(f"val_{k}")) for k in layout.metric_columns}
        best_epoch = int(number(best_row.get("epoch")) or 0) or best_epoch
    else:
        final = nested(summary, "final_metrics")
        metrics = {k: number(nested(final, k)) for k in layout.metric_columns}
    if isinstance(test, dict) and number(test.get(layout.headline)) is not None:
        # the checkpoint selected on validation, scored once on the held-out test split
        metrics, split = {k: number(test.get(k)) for k in layout.metric_columns}, "test"
        best_epoch = int(number(nested(summary, "test", "epoch")) or 0) or best_epoch
    total_params = number(nested(summary, "params", "total"))
    train_seconds = number(nested(summary, "timings", "train_seconds"))
    onnx_mb = number(find_key(files.onnx_meta, "onnx_mb"))
    if onnx_mb is None and files.onnx_path is not None:
        onnx_mb = files.onnx_path.stat().st_size / 1e6
    macs_g = _macs_g(config, record.name)
    arch = layout.arch_name(as_dict(nested(config, "model")), as_dict(summary))
    return {
        "experiment": record.name,
        "status": record.status,
        "role": record.role,
        layout.arch_column: arch if isinstance(arch, str) else None,
        **{c: total_params / per if total_params is not None else None for c, per in layout.params_columns},
        **{c: macs_g * scale if macs_g is not None else None for c, scale in layout.macs_columns},
        **metrics,
        "best_epoch": best_epoch,
        "split": split if any(v is not None for v in metrics.values()) else None,
        "train_time_min": train_seconds / 60 if train_seconds is not None else None,
        "onnx_latency_ms": number(find_key(files.onnx_meta, "onnx_ms_per_image_median")),
        "onnx_mb": onnx_mb,
        **_onnx_scores(files.onnx_meta, layout),
        "pct_of_teacher": None,
        "gap_closed": None,
        "teacher_lead_note": None,
    }


def _infer_roles(rows: list[dict[str, Any]], files: list[RunFiles], teacher_of: dict[int, list[int]]) -> None:
    """'distilled' when the config enables distillation, 'teacher' when a distilled run of the list names a
    checkpoint inside this run's directory, else 'student'; a role the runner gave is kept."""
    for i, row in enumerate(rows):
        if row["role"] is not None:
            continue
        if nested(files[i].config, "distillation", "enabled"):
            row["role"] = "distilled"
        elif any(i in teachers for teachers in teacher_of.values()):
            row["role"] = "teacher"
        else:
            row["role"] = "student"


def collect_rows(records: list[RunRecord], latency: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """One row per experiment (keys = `row_columns` of the layout, missing numbers None), in record order.

    role: RunRecord.role, else inferred (`_infer_roles`).
    pct_of_teacher: 100 * headline / the teacher's (a distilled run's own teacher when it is in the list,
    else the first teacher with a result). gap_closed (distilled rows): (distilled - baseline) /
    (teacher - baseline) on the headline, baseline = `_baseline_index`. Both only where the teacher's lead
    over that baseline is resolved (`teacher_lead_note`; the reason is the row's teacher_lead_note).
    Only completed (or skipped, i.e. earlier) runs serve as teacher or baseline; failed runs keep a row.
    `latency` (run name -> ms, `kdlab.experiments.report_latency`) replaces the export-time ONNX latency.
    """
    files = [read_run(r.run_dir) for r in records]
    layout = layout_for_configs([f.config for f in files])
    head, arch = layout.headline, layout.arch_column
    rows = [_base_row(r, f, layout) for r, f in zip(records, files, strict=True)]
    for row in rows:  # one interleaved measurement of every exported file beats each export's own figure
        if latency and row["experiment"] in latency:
            row["onnx_latency_ms"] = latency[row["experiment"]]
    teacher_of: dict[int, list[int]] = {}  # distilled row index -> indices of its teacher rows
    for i, f in enumerate(files):
        ckpts = teacher_checkpoints(f.config, records[i].run_dir)
        teacher_of[i] = [
            j for j, rec in enumerate(records) if j != i and any(is_inside(c, rec.run_dir) for c in ckpts)
        ]
    _infer_roles(rows, files, teacher_of)

    usable_teachers = [j for j, r in enumerate(rows) if r["role"] == "teacher" and has_result(r, head)]
    per_image = per_image_sums(records)
    checked: dict[tuple[int, int], str | None] = {}  # (teacher, baseline) -> why the lead is not resolved
    for i, row in enumerate(rows):
        own = [j for j in teacher_of[i] if j in usable_teachers]
        if row["role"] == "teacher" and i in usable_teachers:
            ref = i
        elif own:
            ref = own[0]
        elif usable_teachers:
            ref = usable_teachers[0]
        else:
            continue
        teacher_value = rows[ref][head]
        if row[head] is None or not teacher_value:
            continue
        if ref == i:
            row["pct_of_teacher"] = 100.0
            continue
        base = _baseline_index(rows, records, i, layout)
        if base is None:
            row["teacher_lead_note"] = (
                "no baseline (a student without distillation) to measure the teacher's lead"
            )
            continue
        if (ref, base) not in checked:
            checked[(ref, base)] = teacher_lead_note(rows[ref], rows[base], per_image, layout)
        row["teacher_lead_note"] = checked[(ref, base)]
        if row["teacher_lead_note"] is not None:
            continue
        row["pct_of_teacher"] = 100.0 * row[head] / teacher_value
        if row["role"] == "distilled" and rows[base][arch] == row[arch]:
            baseline_value = rows[base][head]
            row["gap_closed"] = (row[head] - baseline_value) / (teacher_value - baseline_value)
    return rows


def _baseline_index(
    rows: list[dict[str, Any]], records: list[RunRecord], i: int, layout: ReportLayout
) -> int | None:
    """The baseline the teacher's lead is measured against for row i: a student row itself; for a distilled
    row the first student with a result and the same architecture, preferring one of the same seed (the paired
    run of a --seeds invocation), else the first student with a result."""
    head, arch = layout.headline, layout.arch_column
    if rows[i]["role"] == "student":
        return i
    students = [k for k, r in enumerate(rows) if r["role"] == "student" and has_result(r, head)]
    same_arch = [k for k in students if rows[k][arch] == rows[i][arch]]
    seed = records[i].group_and_seed()[1]
    same_arch.sort(key=lambda k: records[k].group_and_seed()[1] != seed)
    return (same_arch or students or [None])[0]
