"""The INT8 step of a run's export: quantize the FP32 file, score and time it against FP32, then ship it as
best_model.onnx or keep it aside (`export.max_int8_iou_drop`). The quantization itself is `kdlab.export.quantize`;
the calibration data is the task's (`OnnxExporter.calibration_batches`)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import onnx
from torch import nn

from kdlab.atomic_io import atomic_write
from kdlab.config.schema import ExperimentConfig, ExportConfig
from kdlab.export.interface import Batch, OnnxExporter
from kdlab.export.measure import Scorer, interleaved_onnx_latency, numbers
from kdlab.export.quantize import calibration_batches, quantize_int8
from kdlab.export.runtime import OnnxRuntimeModel

log = logging.getLogger(__name__)

INT8_FILE = "best_model.int8.onnx"  # an INT8 model that lost too much accuracy is kept aside under this name
FP32_FILE = "best_model.fp32.onnx"  # the FP32 model, when an accepted INT8 model became best_model.onnx


def _copy_metadata_props(source: Path, target: Path) -> None:
    """Give `target` the metadata_props of `source` it lacks (the resolved config: kdlab-predict and the
    teacher cache read it from the file itself)."""
    src, dst = onnx.load(str(source)), onnx.load(str(target))
    have = {p.key for p in dst.metadata_props}
    missing = [p for p in src.metadata_props if p.key not in have]
    if not missing:
        return
    for prop in missing:
        entry = dst.metadata_props.add()
        entry.key, entry.value = prop.key, prop.value
    atomic_write(target, lambda tmp: onnx.save(dst, str(tmp)))


def int8_step(
    onnx_path: Path,
    model: nn.Module,
    cfg: ExperimentConfig,
    export_cfg: ExportConfig,
    exporter: OnnxExporter,
    score: Scorer,
    accuracy: dict[str, Any],
    latency_batch: Batch,
    latency_runs: int,
) -> dict[str, Any]:
    """Quantize the FP32 file, score and time it; ship it as best_model.onnx only when it loses at most
    `export.max_int8_iou_drop` of the accuracy metric (the FP32 file then moves to best_model.fp32.onnx);
    otherwise it stays aside as best_model.int8.onnx with a warning and best_model.onnx stays FP32."""
    int8_path = onnx_path.with_name(INT8_FILE)
    calib = calibration_batches(cfg, exporter, export_cfg.calibration_images)
    info = quantize_int8(onnx_path, int8_path, calib, exporter)
    _copy_metadata_props(onnx_path, int8_path)
    metric = accuracy["metric"]
    int8_metrics = numbers(score(OnnxRuntimeModel(int8_path, exporter)))
    ms = interleaved_onnx_latency(
        {"fp32": onnx_path, "int8": int8_path}, exporter, latency_batch, latency_runs
    )
    fp32_value, int8_value = accuracy["onnx"].get(metric), int8_metrics.get(metric)
    drop = fp32_value - int8_value if fp32_value is not None and int8_value is not None else math.inf
    if not math.isfinite(drop):
        drop = math.inf  # NaN metrics (nothing scored) never pass
    accepted = drop <= export_cfg.max_int8_iou_drop
    result: dict[str, Any] = {
        **info,
        "calibration_images_requested": export_cfg.calibration_images,
        "metric": metric,
        "onnx": int8_metrics,
        "fp32_value": fp32_value,
        "int8_value": int8_value,
        "drop": drop,
        "max_drop": export_cfg.max_int8_iou_drop,
        "accepted": accepted,
        "latency": {
            "fp32_ms_per_image_median": ms["fp32"],
            "int8_ms_per_image_median": ms["int8"],
            "int8_over_fp32": ms["int8"] / ms["fp32"] if ms["fp32"] > 0 else None,
            "runs": latency_runs,
            "interleaved": True,
        },
    }
    if accepted:
        onnx_path.replace(onnx_path.with_name(FP32_FILE))
        int8_path.replace(onnx_path)
        result["file"] = onnx_path.name
        log.info(
            "INT8 %s %.4f vs FP32 %.4f (drop %.4f <= %.4f): best_model.onnx is INT8, FP32 kept as %s",
            metric, int8_value, fp32_value, drop, export_cfg.max_int8_iou_drop, FP32_FILE,
        )  # fmt: skip
    else:
        result["file"] = INT8_FILE
        result["warning"] = (
            f"INT8 loses {drop:.4f} {metric} (> export.max_int8_iou_drop={export_cfg.max_int8_iou_drop}); "
            f"kept aside as {INT8_FILE}, best_model.onnx stays FP32"
        )
        log.warning("%s", result["warning"])
    return result
