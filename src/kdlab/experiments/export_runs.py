"""Export a finished run's student to ONNX with its task's exporter (the task is read from the run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdlab.checkpoints import load_checkpoint
from kdlab.tasks import task_of


def export_run_to_onnx(run_dir: str | Path, opset: int | None = None, **options: Any) -> dict[str, Any]:
    """<run_dir>/checkpoints/best_model.pth -> best_model.onnx (+ .json) via `kdlab.export.pipeline`."""
    from kdlab.export.pipeline import export_run_to_onnx as export_with

    checkpoint = Path(run_dir) / "checkpoints" / "best_model.pth"
    config = load_checkpoint(checkpoint).get("config") if checkpoint.is_file() else None
    return export_with(run_dir, task_of(config).exporter(), opset=opset, **options)
