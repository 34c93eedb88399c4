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

import csv
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdlab.evaluate.report_layout import HEADLINE_LABELS, ReportLayout, with_headline
from kdlab.experiments.runner import SEED_SUFFIX
from kdlab.experiments.seed_stats import paired_bootstrap
from kdlab.tasks import get_task, task_names, task_of

log = logging.getLogger(__name__)

ROLES: tuple[str, ...] = ("teacher", "student", "distilled")
# The file a run's test evaluation leaves for the paired bootstrap: float arrays `intersection` and `union`
# [n_test_images, n_classes], the summed pixel counts per image and class, in the test set's fixed order.
PER_IMAGE_FILE = "logs/test_per_image.npz"
# Headline metrics that are ratios of summed intersections and unions, so that a bootstrap can recompute
# them from per-image sums: metric -> the classes averaged (None: every class with a union, i.e. mIoU).
# Class ids as in kdlab.evaluate.metrics: 0 background, 1 target, 2 other.
SUMMED_HEADLINES: dict[str, tuple[int, ...] | None] = {
    "miou": None, "iou_background": (0,), "iou_target": (1,), "iou_other": (2,),
}  # fmt: skip
# Runs whose numbers count: trained now ("completed") or found finished on disk by an export-only pass
# ("exists"). A "skipped" run (its teacher failed) was not trained, so numbers on disk may be stale.
RESULT_STATUSES: frozenset[str] = frozenset({"completed", "exists"})


@dataclass
class RunRecord:
    """One experiment as the runner knows it; `role` None means "infer it from the configs"."""

    name: str
    run_dir: Path | None
    status: str  # "completed" | "failed" | "skipped" | ...
    role: str | None = None
    exit_code: int | None = None
    duration_s: float | None = None
    seed: int | None = None  # the seed of a --seeds run (None: inferred from a `__seed-<s>` name suffix)
    group: str | None = None  # the config (and sweep value) the run belongs to; None: the name without suffix

    def group_and_seed(self) -> tuple[str, int | None]:
        name_group, name_seed = split_seed(self.name)
        return self.group or name_group, self.seed if self.seed is not None else name_seed


def split_seed(name: str) -> tuple[str, int | None]:
    """`digits_student__seed-42` -> ("digits_student", 42); a name without the seed suffix -> (name, None)."""
    head, sep, tail = name.rpartition(SEED_SUFFIX)
    if sep and tail.isdigit():
        return head, int(tail)
    return name, None


# --------------------------------------------------------------------------------------------- files
@dataclass
class RunFiles:
    summary: dict[str, Any] | None
    config: dict[str, Any] | None
    onnx_meta: dict[str, Any] | None
    metrics_rows: list[dict[str, str]]
    onnx_path: Path | None


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("report: cannot read %s (%s); its values are left out", path, exc)
        return None
    return data if isinstance(data, dict) else None


def read_metrics_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a run's logs/metrics.csv ([] when absent or unreadable)."""
    if not path.is_file():
        return []
    try:
        with path.open(newline="") as fh:
            return list(csv.DictReader(fh))
    except (OSError, csv.Error) as exc:
        log.warning("report: cannot read %s (%s); its values are left out", path, exc)
        return []


def read_config(run_dir: Path | None) -> dict[str, Any] | None:
    """A run's config.json alone (None when absent or unreadable), for what needs no other file."""
    return None if run_dir is None else _read_json(run_dir / "config.json")


def read_run(run_dir: Path | None) -> RunFiles:
    if run_dir is None:
        return RunFiles(None, None, None, [], None)
    ckpt = run_dir / "checkpoints"
    onnx_path = ckpt / "best_model.onnx"
    return RunFiles(
        summary=_read_json(run_dir / "summary.json"),
        config=_read_json(run_dir / "config.json"),
        onnx_meta=_read_json(ckpt / "best_model.onnx.json"),
        metrics_rows=read_metrics_csv(run_dir / "logs" / "metrics.csv"),
        onnx_path=onnx_path if onnx_path.is_file() else None,
    )


def number(value: Any) -> float | None:
    """A finite float from a JSON/CSV value, else None ('' / 'nan' / None / text)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def _get(data: dict[str, Any] | None, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _section(data: Any) -> dict[str, Any]:
    return data if isinstance(data, dict) else {}


def _find_key(data: Any, key: str) -> Any:
    """The first value stored under `key` anywhere in nested dicts (metadata layouts may nest)."""
    if isinstance(data, dict):
        if key in data:
            return data[key]
        for value in data.values():
            found = _find_key(value, key)
            if found is not None:
                return found
    return None


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
    monitor = _get(config, "training", "monitor")
    if isinstance(monitor, str) and monitor:
        mode = _get(summary, "best_metric_mode") or _get(config, "training", "mode")
        return monitor, mode if mode in ("max", "min") else "max"
    return headline, "max"


def teacher_checkpoints(config: dict[str, Any] | None) -> list[Path]:
    """Every teacher checkpoint a (distillation-enabled) config names, resolved against the cwd."""
    distill = _get(config, "distillation")
    if not isinstance(distill, dict) or not distill.get("enabled"):
        return []
    paths = [distill.get("teacher_checkpoint")]
    paths += [t.get("checkpoint") for t in distill.get("teachers") or [] if isinstance(t, dict)]
    return [Path(p).resolve() for p in paths if isinstance(p, str) and p]


def is_inside(path: Path, run_dir: Path | None) -> bool:
    return run_dir is not None and path.is_relative_to(run_dir.resolve())


# --------------------------------------------------------------------------------------------- layout
def run_task(config: dict[str, Any] | None) -> str:
    """The task of a run's config.json (`kdlab.tasks.task_of`: none recorded is the default task)."""
    return task_of(config if isinstance(config, dict) else None).name


def layout_for_task(name: str) -> ReportLayout:
    return get_task(name).report_layout


def report_layouts() -> tuple[ReportLayout, ...]:
    """Every task's layout (the report recognises which one collected rows follow)."""
    return tuple(get_task(name).report_layout for name in task_names())


def layout_for_configs(configs: list[dict[str, Any] | None]) -> ReportLayout:
    """The layout of the runs' task when every run with a known config has the same task, else the default
    task's (segmentation), headed by the metric that selected the runs' checkpoints (`monitored_metric`)
    when every run with a known config used the same one and it can head the table; else the task's own."""
    known = [c for c in configs if isinstance(c, dict)]
    tasks = {run_task(c) for c in known}
    layout = layout_for_task(tasks.pop() if len(tasks) == 1 else run_task(None))
    monitors = {monitored_metric(c) for c in known}
    if len(monitors) == 1:
        (metric,) = monitors
        if metric in layout.metric_columns and metric in HEADLINE_LABELS:
            return with_headline(layout, metric)
    if len(monitors) > 1:
        log.warning("report: the runs select checkpoints by different metrics (%s); the table is headed by %s",
                    ", ".join(sorted(monitors)), layout.headline)  # fmt: skip
    return layout


def monitored_metric(config: dict[str, Any] | None) -> str:
    """The metric that picked a run's best epoch: its training.monitor, else its task's default."""
    monitor = _get(config, "training", "monitor")
    if isinstance(monitor, str) and monitor:
        return monitor
    return get_task(run_task(config)).best_metric


def headline_layouts() -> tuple[ReportLayout, ...]:
    """Every layout a report can have: each task's, headed by each metric that can head it."""
    return tuple(
        with_headline(lay, m) for lay in report_layouts() for m in lay.metric_columns if m in HEADLINE_LABELS
    )


def row_columns(layout: ReportLayout) -> tuple[str, ...]:
    """The keys of a collected row, in order: more than the table shows (every row has params_m, macs_g
    and the ONNX columns, which the figures use)."""
    return (
        "experiment", "status", "role", layout.arch_column, *(c for c, _ in layout.params_columns),
        *(c for c, _ in layout.macs_columns), *layout.metric_columns, "best_epoch", "split", "train_time_min",
        "onnx_latency_ms", "onnx_mb", *onnx_score_columns(layout), "pct_of_teacher", "gap_closed",
        "teacher_lead_note",
    )  # fmt: skip


def csv_columns(layout: ReportLayout) -> tuple[str, ...]:
    """The per-run CSV/JSON columns: the table's, plus which split the metrics are on (after best_epoch) and
    why % of teacher / gap closed are withheld (last)."""
    columns = list(layout.columns)
    columns.insert(columns.index("best_epoch") + 1, "split")
    return (*columns, "teacher_lead_note")


def onnx_score_columns(layout: ReportLayout) -> tuple[str, ...]:
    """The exported file's own validation score (and its INT8 model's), named after the headline metric:
    onnx_target_iou for people, onnx_top1 for classifiers."""
    return (f"onnx_{layout.headline}", f"int8_{layout.headline}", "int8_latency_ratio", "int8_shipped")


def _onnx_scores(meta: dict[str, Any] | None, layout: ReportLayout) -> dict[str, Any]:
    """best_model.onnx.json -> the row's ONNX score columns (None where the export recorded none)."""
    head = layout.headline
    onnx_col, int8_col, ratio_col, shipped_col = onnx_score_columns(layout)
    out: dict[str, Any] = dict.fromkeys(onnx_score_columns(layout))
    accuracy = _get(meta, "accuracy")
    out[onnx_col] = number(_get(accuracy, "onnx", head)) if isinstance(accuracy, dict) else None
    int8 = _get(meta, "int8")
    if isinstance(int8, dict):
        out[int8_col] = number(_get(int8, "onnx", head))
        out[ratio_col] = number(_get(int8, "latency", "int8_over_fp32"))
        drop = number(_get(int8, "drop"))
        out[shipped_col] = "yes" if int8.get("accepted") else (
            f"no: −{drop:.4f} > {int8.get('max_drop')}" if drop is not None else "no"
        )  # fmt: skip
    return out


def layout_for_rows(rows: list[dict[str, Any]]) -> ReportLayout:
    """The layout that collected `rows` (recognised by their keys); the default task's without rows."""
    keys = tuple(rows[0]) if rows else ()
    return next(
        (lay for lay in headline_layouts() if row_columns(lay) == keys), layout_for_task(run_task(None))
    )


# --------------------------------------------------------------------------------------------- rows
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
    best_epoch_value = number(_get(summary, "best_epoch"))
    best_epoch = int(best_epoch_value) if best_epoch_value else None
    best_row = _best_epoch_row(files.metrics_rows, best_epoch, *_monitored(summary, config, layout.headline))
    test = _get(summary, "test_metrics")
    split = "val"
    if best_row is not None:
        metrics = {k: number(best_row.get(f"val_{k}")) for k in layout.metric_columns}
        best_epoch = int(number(best_row.get("epoch")) or 0) or best_epoch
    else:
        final = _get(summary, "final_metrics")
        metrics = {k: number(_get(final, k)) for k in layout.metric_columns}
    if isinstance(test, dict) and number(test.get(layout.headline)) is not None:
        # the checkpoint selected on validation, scored once on the held-out test split
        metrics, split = {k: number(test.get(k)) for k in layout.metric_columns}, "test"
        best_epoch = int(number(_get(summary, "test", "epoch")) or 0) or best_epoch
    total_params = number(_get(summary, "params", "total"))
    train_seconds = number(_get(summary, "timings", "train_seconds"))
    onnx_mb = number(_find_key(files.onnx_meta, "onnx_mb"))
    if onnx_mb is None and files.onnx_path is not None:
        onnx_mb = files.onnx_path.stat().st_size / 1e6
    macs_g = _macs_g(config, record.name)
    arch = layout.arch_name(_section(_get(config, "model")), _section(summary))
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
        "onnx_latency_ms": number(_find_key(files.onnx_meta, "onnx_ms_per_image_median")),
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
        if _get(files[i].config, "distillation", "enabled"):
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
        ckpts = teacher_checkpoints(f.config)
        teacher_of[i] = [
            j for c in ckpts for j, rec in enumerate(records) if j != i and is_inside(c, rec.run_dir)
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


def teacher_lead_note(
    teacher: dict[str, Any],
    baseline: dict[str, Any],
    per_image: dict[str, tuple[np.ndarray, np.ndarray]],
    layout: ReportLayout,
) -> str | None:
    """None when the teacher's lead over the baseline (one run each) is real: the 95% interval of a paired
    bootstrap over the test images (both runs scored on the same images) lies above 0. Otherwise the reason,
    for the report's legend. Without per-image sums the lead's uncertainty is unknown: not shown either."""
    head, label = layout.headline, layout.headline_label
    t_name, b_name = teacher["experiment"], baseline["experiment"]
    lead = teacher[head] - baseline[head]
    if lead <= 1e-12:
        return f"the teacher {t_name} does not lead {b_name} on {label} ({lead:+.4f})"
    if head not in SUMMED_HEADLINES or t_name not in per_image or b_name not in per_image:
        return (
            f"one run each and no per-image test sums: the uncertainty of the teacher's lead over {b_name} "
            f"({lead:+.4f} {label}) is unknown (run --seeds, or give the runs a test split)"
        )
    try:
        boot = paired_bootstrap([per_image[t_name]], [per_image[b_name]], classes=SUMMED_HEADLINES[head])
    except ValueError as exc:  # e.g. the two runs were scored on different test sets
        return f"the uncertainty of the teacher's lead over {b_name} cannot be estimated ({exc})"
    if boot.low <= 0:
        return (
            f"the teacher's lead over {b_name} ({lead:+.4f} {label}) is within its 95% bootstrap interval over "
            f"test images [{boot.low:+.4f}, {boot.high:+.4f}]"
        )
    return None


def read_per_image(run_dir: Path | None) -> tuple[np.ndarray, np.ndarray] | None:
    """A run's per-image test sums (`PER_IMAGE_FILE`) as (intersection, union), or None when absent or
    unreadable (logged)."""
    if run_dir is None:
        return None
    path = run_dir / PER_IMAGE_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            inter, union = np.asarray(data["intersection"], float), np.asarray(data["union"], float)
    except (OSError, KeyError, ValueError) as exc:
        log.warning("report: cannot read %s (%s); no bootstrap uses it", path, exc)
        return None
    if inter.ndim != 2 or inter.shape != union.shape:
        log.warning("report: %s holds arrays of shapes %s and %s, not [images, classes]; ignored",
                    path, inter.shape, union.shape)  # fmt: skip
        return None
    return inter, union


def per_image_sums(records: list[RunRecord]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Run name -> its per-image test sums, for the runs with a result that left them."""
    out = {}
    for record in records:
        if record.status in RESULT_STATUSES and (sums := read_per_image(record.run_dir)) is not None:
            out[record.name] = sums
    return out


# What makes numbers of one table incomparable when it differs between runs (summary.json `provenance`).
PROVENANCE_KEYS = ("torch", "device_name", "threads", "amp")


def provenance_note(records: list[RunRecord]) -> str | None:
    """A sentence naming what differs between the runs' provenance (torch version, hardware, threads, AMP), or
    None when every run with a recorded provenance agrees. Runs written before provenance was recorded are
    left out of the comparison."""
    seen: dict[str, dict[str, list[str]]] = {key: {} for key in PROVENANCE_KEYS}
    for record in records:
        prov = _get(read_run(record.run_dir).summary, "provenance")
        if not isinstance(prov, dict):
            continue
        for key in PROVENANCE_KEYS:
            seen[key].setdefault(str(prov.get(key)), []).append(record.name)
    parts = []
    for key, values in seen.items():
        if len(values) > 1:
            listed = "; ".join(f"{value}: {', '.join(names)}" for value, names in values.items())
            parts.append(f"{key} ({listed})")
    if not parts:
        return None
    return (
        "Provenance differs between these runs, so their numbers are not strictly comparable: "
        + ", ".join(parts)
        + "."
    )
