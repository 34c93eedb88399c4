"""ONNX suite: teacher, student, student INT8, fast student and fast student INT8, exported with the project's
exporter and timed in onnxruntime (CPU) in one interleaved run per input size; plus, for finished runs given
with --onnx_run, the exported file's validation target IoU next to the PyTorch model's.

Latency does not depend on the weights, so random-init models are timed (INT8 is calibrated on the synthetic
batch itself: its scales are meaningless for accuracy, not for speed). Every graph gets the same input (one
image, `rois_per_image` ROIs); `*_over_teacher` are ratios of medians from the same rounds.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from benchmarks.common import BenchSettings, Clock, experiment_config, interleaved, median, synthetic_batch
from kdlab.config.loader import resolve_config
from kdlab.config.schema import ModelConfig
from kdlab.export.quantize import quantize_int8
from kdlab.export.runtime import ort_session
from kdlab.export.segmentation import OUTPUT_NAMES, SegmentationExporter, export_model_to_onnx
from kdlab.models.builders import build_model

ROLES = ("teacher", "student", "student_int8", "fast", "fast_int8")


def fast_changes(s: BenchSettings) -> dict[str, Any]:
    """The model fields `s.fast_config` changes relative to `s.base_config` (e.g. the decoder widths)."""
    fast, base = resolve_config(s.fast_config).model, resolve_config(s.base_config).model
    return {k: v for k, v in fast.model_dump().items() if v != getattr(base, k) and k != "encoder"}


def _models(s: BenchSettings, base: ModelConfig) -> dict[str, ModelConfig]:
    student = base.model_copy(update={"encoder": s.student_encoder})
    return {
        "teacher": base.model_copy(update={"encoder": s.teacher_encoder}),
        "student": student,
        "fast": student.model_copy(update=fast_changes(s)),
    }


def onnx_latency_at(s: BenchSettings, size: tuple[int, int]) -> dict[str, Any]:
    sized = BenchSettings(**{**s.__dict__, "size": tuple(size), "batch_size": 1})
    cfg = experiment_config(sized)
    raw = synthetic_batch(sized, cfg)
    feed = {
        "images": (raw["images"].float() / 255.0).numpy(),
        "rois": np.ascontiguousarray(raw["rois"].numpy()),
    }
    sessions: dict[str, ort.InferenceSession] = {}
    sizes_mb: dict[str, float] = {}
    exporters: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="kdlab-bench-onnx-") as tmp:
        for role, model_cfg in _models(s, cfg.model).items():
            torch.manual_seed(0)
            model = build_model(model_cfg).eval()
            path = Path(tmp) / f"{role}.onnx"
            exporters[role] = export_model_to_onnx(model, path, tuple(size), opset=cfg.export.opset)
            paths = {role: path}
            if role != "teacher":
                int8 = Path(tmp) / f"{role}_int8.onnx"
                quantize_int8(path, int8, [(raw["images"], raw["rois"])], SegmentationExporter())
                paths[f"{role}_int8"] = int8
            for name, p in paths.items():
                sizes_mb[name] = p.stat().st_size / 2**20
                sessions[name] = ort_session(p)
        cases = {role: (lambda sess=sessions[role]: sess.run(OUTPUT_NAMES, feed)) for role in ROLES}
        wall, _ = interleaved(Clock(torch.device("cpu")), cases, s.onnx_runs, max(1, s.warmup))
    ms = {role: median(wall[role]) * 1e3 for role in ROLES}
    return {
        "size": list(size),
        "rois": int(raw["rois"].shape[0]),
        "models": {
            "roi_size": list(cfg.model.roi_size),
            "mask_size": list(cfg.model.mask_size),
            "fast_changes": fast_changes(s),
            "exporter": exporters,
        },  # fmt: skip
        "ms": ms,
        "mb": sizes_mb,
        **{f"{role}_over_teacher": ms[role] / ms["teacher"] for role in ROLES if role != "teacher"},
        # the names earlier results used
        "onnx_student_ms": ms["student"],
        "onnx_teacher_ms": ms["teacher"],
        "onnx_student_over_teacher": ms["student"] / ms["teacher"],
        "ort_threads": "onnxruntime default (all cores)",
    }


def run_accuracy(run_dir: Path) -> dict[str, Any]:
    """What the export recorded about a finished run's file: ONNX vs PyTorch on the validation set, and INT8."""
    meta_path = run_dir / "checkpoints" / "best_model.onnx.json"
    if not meta_path.is_file():
        return {"run": str(run_dir), "error": f"{meta_path} not found (export the run first)"}
    meta = json.loads(meta_path.read_text())
    accuracy, int8 = meta.get("accuracy") or {}, meta.get("int8") or {}
    metric = accuracy.get("metric", "target_iou")
    return {
        "run": run_dir.name,
        "metric": metric,
        "images": accuracy.get("images"),
        "pytorch": (accuracy.get("pytorch") or {}).get(metric),
        "onnx": (accuracy.get("onnx") or {}).get(metric),
        "int8": (int8.get("onnx") or {}).get(metric),
        "int8_accepted": int8.get("accepted"),
        "exporter": meta.get("exporter"),
        "parity_max_abs_diff": (meta.get("parity") or {}).get("max_abs_diff"),
    }


def run_onnx_suite(s: BenchSettings) -> dict[str, Any]:
    sizes = [tuple(s.size)] + [tuple(x) for x in s.onnx_sizes if tuple(x) != tuple(s.size)]
    results = [onnx_latency_at(s, size) for size in sizes]
    out = dict(results[0])
    if len(results) > 1:
        out["other_sizes"] = results[1:]
    out["accuracy"] = [run_accuracy(Path(d)) for d in s.onnx_run_dirs]
    return out
