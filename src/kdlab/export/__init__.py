"""Export: ONNX export and onnxruntime parity (`pipeline`), with one small exporter per task."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kdlab.export.pipeline import OnnxExporter


def exporter_for_task(task_name: str) -> OnnxExporter | None:
    """The ONNX exporter of a task, or None when the task has none (today: sequence).

    The one place that decides "can this task export"; it moves into the task objects (kdlab.tasks).
    Imported lazily: onnx and onnxruntime load only when something is exported.
    """
    from kdlab.export.classification import ClassificationExporter
    from kdlab.export.segmentation import SegmentationExporter

    exporters: dict[str, type[OnnxExporter]] = {
        "segmentation": SegmentationExporter,
        "classification": ClassificationExporter,
    }
    exporter = exporters.get(task_name)
    return exporter() if exporter is not None else None
