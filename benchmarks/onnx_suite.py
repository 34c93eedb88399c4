"""ONNX suite: random-init student and teacher exported with the project's exporter, onnxruntime CPU latency.

Latency does not depend on the weights, so no training is needed. Both graphs get the same input (one image,
`rois_per_image` ROIs) and are timed interleaved; `onnx_student_over_teacher` is the ratio of the medians.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from benchmarks.common import BenchSettings, Clock, experiment_config, interleaved, median, synthetic_batch
from kdlab.export.segmentation import OUTPUT_NAMES, export_model_to_onnx
from kdlab.models.builders import build_model


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_latency_at(s: BenchSettings, size: tuple[int, int]) -> dict[str, Any]:
    sized = BenchSettings(**{**s.__dict__, "size": tuple(size), "batch_size": 1})
    cfg = experiment_config(sized)
    raw = synthetic_batch(sized, cfg)
    feed = {
        "images": (raw["images"].float() / 255.0).numpy(),
        "rois": np.ascontiguousarray(raw["rois"].numpy()),
    }
    models = {"student": s.student_encoder, "teacher": s.teacher_encoder}
    sessions: dict[str, ort.InferenceSession] = {}
    sizes_mb: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="kdlab-bench-onnx-") as tmp:
        for role, encoder in models.items():
            torch.manual_seed(0)
            model = build_model(cfg.model.model_copy(update={"encoder": encoder})).eval()
            path = Path(tmp) / f"{role}.onnx"
            export_model_to_onnx(model, path, tuple(size), opset=cfg.export.opset)
            sizes_mb[role] = path.stat().st_size / 2**20
            sessions[role] = _session(path)
        cases = {role: (lambda sess=sess: sess.run(OUTPUT_NAMES, feed)) for role, sess in sessions.items()}
        wall, _ = interleaved(Clock(torch.device("cpu")), cases, s.onnx_runs, max(1, s.warmup))
    student, teacher = median(wall["student"]), median(wall["teacher"])
    return {
        "size": list(size),
        "rois": int(raw["rois"].shape[0]),
        "onnx_student_ms": student * 1e3,
        "onnx_teacher_ms": teacher * 1e3,
        "onnx_student_over_teacher": student / teacher,
        "onnx_student_mb": sizes_mb["student"],
        "onnx_teacher_mb": sizes_mb["teacher"],
        "ort_threads": "onnxruntime default (all cores)",
    }


def run_onnx_suite(s: BenchSettings) -> dict[str, Any]:
    sizes = [tuple(s.size)] + [tuple(x) for x in s.onnx_sizes if tuple(x) != tuple(s.size)]
    results = [onnx_latency_at(s, size) for size in sizes]
    out = dict(results[0])
    if len(results) > 1:
        out["other_sizes"] = results[1:]
    return out
