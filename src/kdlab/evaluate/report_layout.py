"""What a comparison table of one task's runs looks like (`ReportLayout`), and the three tasks' layouts
(each task object names its own: `kdlab.tasks.<task>.report_layout`).

A layout is plain data (plus one function naming a run's architecture), so a task can build its own; the
report (kdlab.experiments.report) reads it and never asks which task it is rendering.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from kdlab.evaluate.classification_metrics import CLASSIFICATION_METRICS
from kdlab.evaluate.metrics import REPORTED_METRICS

ArchName = Callable[[dict[str, Any], dict[str, Any]], Any]
"""(config.json's model section, summary.json) -> the run's architecture name (None: unknown)."""


@dataclass(frozen=True)
class ReportLayout:
    """The table of one task's runs.

    columns: the table's columns, in order. metric_columns: the validation metrics (val_<m> in
    logs/metrics.csv). headline / headline_label: the metric of "% of teacher" and "gap closed" and how the
    text names it. arch_column / arch_name: the column saying which architecture a run is (baselines are
    matched to distilled runs on it) and how to read it. params_columns: (column, parameters per unit), e.g.
    ("params_m", 1e6). macs_columns: (column, its value per GMAC), e.g. ("macs_m", 1000.0). intro: the
    sentence of the report's intro that says what the runs are and how the metrics and MACs are measured.
    """

    columns: tuple[str, ...]
    metric_columns: tuple[str, ...]
    headline: str
    headline_label: str
    arch_column: str
    arch_name: ArchName
    params_columns: tuple[tuple[str, float], ...]
    macs_columns: tuple[tuple[str, float], ...]
    intro: str


_PEOPLE_COLUMNS: tuple[str, ...] = (
    "experiment", "status", "role", "encoder", "params_m", "macs_g", "target_iou", "miou", "iou_background",
    "iou_target", "iou_other", "boundary_f1", "best_epoch", "train_time_min", "onnx_latency_ms", "onnx_mb",
    "onnx_miou", "int8_miou", "int8_latency_ratio", "int8_shipped", "pct_of_teacher", "gap_closed",
)  # fmt: skip
_CLASSIFIER_COLUMNS: tuple[str, ...] = (
    "experiment", "status", "role", "model", "params_m", "macs_m", "top1", "top5", "ece", "best_epoch",
    "train_time_min", "onnx_latency_ms", "onnx_mb", "onnx_top1", "int8_top1", "int8_latency_ratio", "int8_shipped",
    "pct_of_teacher", "gap_closed",
)  # fmt: skip
_SEQUENCE_COLUMNS: tuple[str, ...] = (
    "experiment", "status", "role", "model", "params_k", "macs_m", "top1", "top5", "ece", "best_epoch",
    "train_time_min", "pct_of_teacher", "gap_closed",
)  # fmt: skip
_CLASSIFIER_METRICS: tuple[str, ...] = tuple(m for m in CLASSIFICATION_METRICS if m != "loss")


def _gru_name(model: dict[str, Any], summary: dict[str, Any]) -> str | None:
    hidden, layers = model.get("hidden_size"), model.get("num_layers")
    return f"gru-{hidden}x{layers}" if hidden and layers else None


SEGMENTATION_LAYOUT = ReportLayout(
    columns=_PEOPLE_COLUMNS,
    metric_columns=REPORTED_METRICS,
    headline="miou",
    headline_label="mIoU",
    arch_column="encoder",
    arch_name=lambda model, summary: model.get("encoder") or summary.get("encoder"),
    params_columns=(("params_m", 1e6),),
    macs_columns=(("macs_g", 1.0),),
    intro=(
        "People segmentation (mIoU = mean IoU of background / the ROI's own person / other people inside the "
        "ROIs; target IoU = per-ROI IoU of the ROI's own person; IoU other = 'other people'). A teacher may train "
        "on a longer schedule than its students: it is trained once and used many times. GMACs: one image, "
        "one ROI, configured input size."
    ),
)
CLASSIFICATION_LAYOUT = ReportLayout(
    columns=_CLASSIFIER_COLUMNS,
    metric_columns=_CLASSIFIER_METRICS,
    headline="top1",
    headline_label="top-1",
    arch_column="model",
    arch_name=lambda model, summary: model.get("name") or summary.get("model_name"),
    params_columns=(("params_m", 1e6),),
    macs_columns=(("macs_g", 1.0), ("macs_m", 1000.0)),
    intro=(
        "Classifiers (top-1/top-5 accuracy, ECE = expected calibration error over 15 confidence bins). MMACs: "
        "one image at the configured size."
    ),
)
SEQUENCE_LAYOUT = ReportLayout(
    columns=_SEQUENCE_COLUMNS,
    metric_columns=_CLASSIFIER_METRICS,
    headline="top1",
    headline_label="top-1",
    arch_column="model",
    arch_name=_gru_name,
    params_columns=(("params_m", 1e6), ("params_k", 1e3)),
    macs_columns=(("macs_g", 1.0), ("macs_m", 1000.0)),
    intro=(
        "GRU sequence classifiers (model = gru-<hidden>x<layers>; top-1 on the final logits, ECE over 15 "
        "confidence bins). MMACs: one sequence, counted by hand."
    ),
)


# How the report's text names each metric that can head a table (a run's training.monitor may pick any of
# them, and the report follows it). Only metrics where higher is better: "% of teacher" of a lower-is-better
# metric (ECE, a loss) would read backwards.
HEADLINE_LABELS: dict[str, str] = {
    "miou": "mIoU", "target_iou": "target IoU", "iou_background": "IoU bg", "iou_target": "IoU target",
    "iou_other": "IoU other", "boundary_f1": "boundary F1", "top1": "top-1", "top5": "top-5",
}  # fmt: skip


def with_headline(layout: ReportLayout, metric: str) -> ReportLayout:
    """`layout` headed by `metric` (one of its metric columns with a label in HEADLINE_LABELS): the headline,
    its label and the ONNX/INT8 score columns (onnx_<headline>, int8_<headline>) follow. Raises ValueError for
    a metric the layout cannot be headed by."""
    if metric == layout.headline:
        return layout
    if metric not in layout.metric_columns or metric not in HEADLINE_LABELS:
        raise ValueError(f"{metric!r} cannot head a {layout.headline} table")
    renamed = {f"onnx_{layout.headline}": f"onnx_{metric}", f"int8_{layout.headline}": f"int8_{metric}"}
    return replace(
        layout,
        headline=metric,
        headline_label=HEADLINE_LABELS[metric],
        columns=tuple(renamed.get(c, c) for c in layout.columns),
    )
