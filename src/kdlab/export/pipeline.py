"""One run's ONNX export, the steps every task shares: checkpoint -> ONNX file -> onnxruntime parity -> latency
-> accuracy -> (INT8) -> metadata.

What differs per task (the wrapper module, inputs, names, axes, the description, calibration data) is an
`OnnxExporter` (`kdlab.export.interface`); see `kdlab.export.segmentation` and `kdlab.export.classification`.
The steps live beside this module: `graph` writes the file (dynamo, TorchScript fallback), `runtime` runs it in
onnxruntime, `measure` compares it with PyTorch, `int8` quantizes it and decides which file ships. Files written
beside the checkpoint: `checkpoints/best_model.onnx` (the resolved config in its metadata_props) and
`best_model.onnx.json`, which records which exporter wrote the file and why.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision
from torch import nn

from kdlab.atomic_io import write_json_atomic
from kdlab.checkpoints import file_sha256, load_checkpoint, model_from_checkpoint
from kdlab.config.schema import ExperimentConfig, ExportConfig
from kdlab.errors import CheckpointError, ConfigError, KdlabRunFailure
from kdlab.export import measure
from kdlab.export.graph import (
    config_metadata,
    export_methods,
    export_with_fallback,
    exporter_tool,
    file_opset,
)
from kdlab.export.int8 import FP32_FILE, INT8_FILE, int8_step
from kdlab.export.interface import OnnxExporter
from kdlab.export.measure import (
    DEFAULT_LATENCY_RUNS,
    DEFAULT_TOLERANCE,
    Scorer,
    onnx_accuracy,
    onnx_latency_of,
    onnx_parity_of,
    torch_latency_of,
)

log = logging.getLogger(__name__)


class ExportParityError(KdlabRunFailure):
    """onnxruntime's output differs from PyTorch's by more than the tolerance."""


def load_student(
    checkpoint: Path, exporter: OnnxExporter
) -> tuple[nn.Module, ExperimentConfig, dict[str, Any]]:
    """The student described by the config saved in `checkpoint`, weights loaded strictly, on CPU, in eval."""
    model, cfg, payload = model_from_checkpoint(checkpoint, "checkpoint", exporter.build_model)
    model.eval()
    return model, cfg, payload


def _jsonable(value: Any) -> Any:
    """Plain JSON: tensors and numpy scalars to numbers, non-finite floats to None."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _remove_stale(paths: list[Path]) -> None:
    """Files an earlier export wrote that this one does not (the new metadata would not describe them)."""
    for path in paths:
        if path.is_file():
            log.info("removing %s from an earlier export", path.name)
            path.unlink()


def export_run_to_onnx(
    run_dir: str | Path,
    exporter: OnnxExporter | None,
    opset: int | None = None,
    parity_images: int = 4,
    latency_runs: int = DEFAULT_LATENCY_RUNS,
    tolerance: float = DEFAULT_TOLERANCE,
    score: Scorer | None = None,
    export_cfg: ExportConfig | None = None,
) -> dict[str, Any]:
    """Export <run_dir>/checkpoints/best_model.pth -> best_model.onnx + best_model.onnx.json; returns the metadata.

    `exporter` is the run's task's (`kdlab.tasks.<task>.exporter()`); None means the task has none, a
    ConfigError. `export_cfg` (default: the checkpoint's config's `export` section) picks the exporter
    ("auto": dynamo, TorchScript when dynamo raises or misses parity) and INT8. Parity is measured on the
    first `parity_images` validation images of the run's own data (at least `exporter.min_parity_images`);
    when it fails, the metadata (with parity.ok = false) is still written, then ExportParityError is raised.
    `score` (the task's evaluator on the validation set, see `kdlab.experiments.export_runs`) scores the
    ONNX file next to the PyTorch model; without it no accuracy is recorded and INT8 is refused.
    INT8 (`kdlab.export.int8`) calibrates on `exporter.calibration_batches`. `latency_runs` timed runs follow
    `measure.WARMUP_RUNS` untimed ones.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    checkpoint = run_dir / "checkpoints" / "best_model.pth"
    if not checkpoint.is_file():
        raise CheckpointError(f"run directory {run_dir} has no checkpoints/best_model.pth (train it first)")
    if exporter is None:
        task = (load_checkpoint(checkpoint).get("config") or {}).get("task")
        raise ConfigError(f"ONNX export is not implemented for task={task} ({run_dir})")
    model, cfg, payload = load_student(checkpoint, exporter)
    export_cfg = cfg.export if export_cfg is None else export_cfg
    opset = export_cfg.opset if opset is None else opset
    methods = export_methods(export_cfg.exporter)
    if export_cfg.quantize == "int8" and score is None:
        raise ConfigError("export.quantize=int8 needs the validation scorer (kdlab.experiments.export_runs)")
    # Load the parity data before writing anything: a missing dataset fails without touching the run.
    batches = exporter.validation_batches(cfg, max(1, parity_images, exporter.min_parity_images))
    if not batches:
        raise CheckpointError(f"run {run_dir} has no validation images to check the ONNX export against")

    onnx_path = checkpoint.with_suffix(".onnx")
    parities: dict[str, dict[str, Any]] = {}

    def parity_reason(method: str) -> str | None:
        parities[method] = onnx_parity_of(onnx_path, model, exporter, batches, tolerance)
        worst = parities[method]["max_abs_diff"]
        return (
            None if parities[method]["ok"] else f"parity max abs diff {worst:.3g} > tolerance {tolerance:.3g}"
        )

    method, failures = export_with_fallback(
        model, exporter, onnx_path, exporter.example_inputs(cfg), opset, config_metadata(cfg), methods,
        accept=parity_reason,
    )  # fmt: skip
    parity = parities[method]
    _remove_stale(
        [onnx_path.with_name(INT8_FILE), onnx_path.with_name(FP32_FILE)]
    )  # only once a new file exists
    log.info(
        "ONNX parity on %s: max abs diff %.3g (tolerance %.3g)", exporter.parity_scope(parity), parity["max_abs_diff"],
        tolerance,
    )  # fmt: skip
    latency_batch = exporter.latency_batch(batches)
    onnx_ms = onnx_latency_of(onnx_path, exporter, latency_batch, latency_runs)
    torch_ms = torch_latency_of(model, exporter, latency_batch, latency_runs)
    log.info("CPU latency per image: onnxruntime %.2f ms, PyTorch %.2f ms", onnx_ms, torch_ms)
    accuracy = None
    if score is not None and parity["ok"]:
        accuracy = onnx_accuracy(onnx_path, model, exporter, score)
        log.info(
            "ONNX %s on %d %s images: %.4f (PyTorch %.4f)", accuracy["metric"], accuracy["images"], accuracy["data"],
            accuracy["onnx"].get(accuracy["metric"], math.nan), accuracy["pytorch"].get(accuracy["metric"], math.nan),
        )  # fmt: skip

    metadata = {
        "onnx_file": onnx_path.name,
        "precision": "fp32",
        **exporter.describe(cfg),
        "input_size": list(exporter.input_size(cfg)),
        "normalization": {
            "mean": list(cfg.model.input_mean),
            "std": list(cfg.model.input_std),
            "applied_inside_model": True,
            "input_range": [0.0, 1.0],
        },
        "opset": file_opset(onnx_path),
        "opset_requested": opset,
        "experiment": cfg.name,
        "parity": {**parity, "data": "validation"},
        "parity_ok": parity["ok"],
        "accuracy": accuracy,
        "latency": {
            "onnx_ms_per_image_median": onnx_ms,
            "torch_ms_per_image_median": torch_ms,
            "runs": latency_runs,
            "warmup_runs": measure.WARMUP_RUNS,
            **{f"batch_{key}": n for key, n in exporter.counts(latency_batch).items()},
            "device": "cpu",
            "torch_threads": torch.get_num_threads(),
        },
        "onnx_mb": onnx_path.stat().st_size / 1e6,
        "source_checkpoint": str(checkpoint),
        "source_checkpoint_sha256": file_sha256(checkpoint),
        "checkpoint_metrics": payload.get("metrics"),
        "exporter": method,
        "exporter_requested": export_cfg.exporter,
        "exporter_tool": exporter_tool(method),
        "exporter_fallbacks": failures,
        "onnx_checker": "onnx.checker.check_model(full_check=True) passed",
        "versions": {
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
        },
    }
    json_path = onnx_path.with_name(onnx_path.name + ".json")
    if not parity["ok"]:
        write_json_atomic(json_path, _jsonable(metadata))
        raise ExportParityError(
            f"ONNX export {onnx_path} does not match PyTorch: max abs diff {parity['max_abs_diff']:.3g} > "
            f"tolerance {tolerance:.3g} on {exporter.parity_scope(parity)} "
            f"(do not use this file; details in {onnx_path.name}.json)"
        )
    if export_cfg.quantize == "int8":
        assert score is not None and accuracy is not None
        metadata["int8"] = int8_step(
            onnx_path, model, cfg, export_cfg, exporter, score, accuracy, latency_batch, latency_runs
        )
        if metadata["int8"]["accepted"]:
            metadata["precision"] = "int8"
            metadata["fp32_file"] = FP32_FILE
    metadata = _jsonable(metadata)
    write_json_atomic(json_path, metadata)
    return metadata
