"""What a comparison table of one task's runs looks like (`ReportLayout`), and the three tasks' layouts
(each task object names its own: `kdlab.tasks.<task>.report_layout`).

A layout is plain data (plus one function naming a run's architecture), so a task can build its own; the
report (kdlab.experiments.report) reads it and never asks which task it is rendering.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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
    "onnx_target_iou", "int8_target_iou", "int8_latency_ratio", "int8_shipped", "pct_of_teacher", "gap_closed",
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
    headline="target_iou",
    headline_label="target IoU",
    arch_column="encoder",
    arch_name=lambda model, summary: model.get("encoder") or summary.get("encoder"),
    params_columns=(("params_m", 1e6),),
    macs_columns=(("macs_g", 1.0),),
    intro=(
        "Metrics on the validation set at each run's best epoch, the one with the best mIoU (target IoU = "
        "per-ROI IoU of the ROI's own person; IoU other = 'other people' inside the ROIs). A teacher may train "
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
        "Classifiers; metrics on the validation set at each run's best epoch (top-1/top-5 accuracy, ECE = "
        "expected calibration error over 15 confidence bins). MMACs: one image at the configured size."
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
        "GRU sequence classifiers (model = gru-<hidden>x<layers>); metrics on the validation set at each run's "
        "best epoch (top-1 on the final logits, ECE over 15 confidence bins). MMACs: one sequence, counted by hand."
    ),
)
