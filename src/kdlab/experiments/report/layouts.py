"""Which `ReportLayout` a report has: the runs' task's, headed by the metric that selected their checkpoints,
and the columns of a collected row, of the per-run CSV and of the ONNX scores."""

from __future__ import annotations

import logging
from typing import Any

from kdlab.evaluate.report_layout import HEADLINE_LABELS, ReportLayout, with_headline
from kdlab.experiments.report.run_files import nested
from kdlab.tasks import get_task, task_names, task_of

log = logging.getLogger(__name__)


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
    monitor = nested(config, "training", "monitor")
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


def layout_for_rows(rows: list[dict[str, Any]]) -> ReportLayout:
    """The layout that collected `rows` (recognised by their keys); the default task's without rows."""
    keys = tuple(rows[0]) if rows else ()
    return next(
        (lay for lay in headline_layouts() if row_columns(lay) == keys), layout_for_task(run_task(None))
    )
