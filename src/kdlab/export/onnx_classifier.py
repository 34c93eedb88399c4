"""ONNX export of a trained classifier, with the same parity check, latency and metadata as segmentation.

The exported graph takes `images` float32 [B,3,S,S] in [0,1] (normalised inside the model) and returns
`logits` float32 [B,num_classes]; B is dynamic. Files: checkpoints/best_model.onnx + best_model.onnx.json.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision
from torch import nn

from kdlab.atomic_io import atomic_write, write_json_atomic
from kdlab.config.schema import ExperimentConfig
from kdlab.distill.teacher import file_sha256
from kdlab.export.onnx_export import (
    WARMUP_RUNS,
    ExportParityError,
    _jsonable,
    _median_ms,
    _session,
    export_ready_copy,
)

log = logging.getLogger(__name__)

INPUT_NAMES = ["images"]
OUTPUT_NAMES = ["logits"]
DYNAMIC_AXES = {"images": {0: "batch"}, "logits": {0: "batch"}}


def export_classifier_to_onnx(model: nn.Module, path: Path, image_size: int, opset: int = 17) -> None:
    """Trace an eval-mode copy of `model` to `path` (images -> logits, dynamic batch); checked, atomic."""
    wrapper = export_ready_copy(model)
    device = next(model.parameters()).device
    example = torch.rand(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(device)

    def write(tmp: Path) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(
                wrapper, (example,), str(tmp), input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
                dynamic_axes=DYNAMIC_AXES, opset_version=opset, do_constant_folding=True,
                training=torch.onnx.TrainingMode.EVAL, dynamo=False,
            )  # fmt: skip
        onnx.checker.check_model(str(tmp))

    atomic_write(path, write)
    log.info("exported classifier ONNX (opset %d) to %s", opset, path)


def classifier_parity(
    onnx_path: Path, model: nn.Module, batches: list[torch.Tensor], tolerance: float = 1e-3
) -> dict[str, Any]:
    """Max |onnxruntime - PyTorch| of the logits over `batches` of uint8 or [0,1] float images."""
    session = _session(onnx_path)
    was_training = model.training
    model.eval()
    worst = 0.0
    num_images = 0
    try:
        for images in batches:
            x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
            with torch.no_grad():
                expected = model(x).float().numpy()
            got = session.run(OUTPUT_NAMES, {"images": np.ascontiguousarray(x.numpy())})[0]
            num_images += int(x.shape[0])
            if got.shape != expected.shape:
                worst = math.inf
                continue
            diff = float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64))))
            worst = max(worst, diff if math.isfinite(diff) else math.inf)
    finally:
        model.train(was_training)
    return {"max_abs_diff": worst, "tolerance": tolerance, "ok": bool(worst <= tolerance),
            "num_images": num_images, "num_batches": len(batches)}  # fmt: skip


def _validation_images(cfg: ExperimentConfig, num_images: int) -> list[torch.Tensor]:
    from kdlab.data.classification import build_classification_datasets

    _, val = build_classification_datasets(cfg)
    n = min(num_images, len(val))
    return [torch.stack([val[i]["image"] for i in range(n)])] if n else []


def export_classifier_run(
    run_dir: Path,
    checkpoint: Path,
    model: nn.Module,
    cfg: ExperimentConfig,
    payload: dict[str, Any],
    opset: int,
    parity_images: int = 8,
    latency_runs: int = 20,
    tolerance: float = 1e-3,
) -> dict[str, Any]:
    """Export a loaded classifier checkpoint to best_model.onnx(+.json); raises ExportParityError on a mismatch."""
    size = cfg.data.classification.image_size
    batches = _validation_images(cfg, max(1, parity_images))  # before writing anything
    if not batches:
        from kdlab.errors import CheckpointError

        raise CheckpointError(f"run {run_dir} has no validation images to check the ONNX export against")
    onnx_path = checkpoint.with_suffix(".onnx")
    export_classifier_to_onnx(model, onnx_path, size, opset)
    parity = classifier_parity(onnx_path, model, batches, tolerance)
    log.info("ONNX parity on %d val images: max abs diff %.3g", parity["num_images"], parity["max_abs_diff"])
    one = batches[0][:1].float() / 255.0
    session = _session(onnx_path)
    feed = {"images": np.ascontiguousarray(one.numpy())}
    onnx_ms = _median_ms(lambda: session.run(OUTPUT_NAMES, feed), latency_runs)
    model.eval()

    def torch_step() -> None:
        with torch.no_grad():
            model(one)

    torch_ms = _median_ms(torch_step, latency_runs)
    log.info("CPU latency per image: onnxruntime %.2f ms, PyTorch %.2f ms", onnx_ms, torch_ms)
    metadata = {
        "onnx_file": onnx_path.name,
        "task": "classification",
        "inputs": {"images": {"shape": ["batch", 3, size, size], "dtype": "float32", "range": [0.0, 1.0]}},
        "outputs": {
            "logits": {
                "shape": ["batch", cfg.model.num_classes],
                "dtype": "float32",
                "meaning": "class logits (softmax over dim 1 for probabilities)",
            }
        },
        "input_size": [size, size],
        "normalization": {
            "mean": list(cfg.model.input_mean),
            "std": list(cfg.model.input_std),
            "applied_inside_model": True,
            "input_range": [0.0, 1.0],
        },  # fmt: skip
        "num_classes": cfg.model.num_classes,
        "model_name": cfg.model.name,
        "opset": opset,
        "experiment": cfg.name,
        "parity": {**parity, "data": "validation"},
        "parity_ok": parity["ok"],
        "latency": {
            "onnx_ms_per_image_median": onnx_ms,
            "torch_ms_per_image_median": torch_ms,
            "runs": latency_runs,
            "warmup_runs": WARMUP_RUNS,
            "batch_images": 1,
            "device": "cpu",
            "torch_threads": torch.get_num_threads(),
        },  # fmt: skip
        "onnx_mb": onnx_path.stat().st_size / 1e6,
        "source_checkpoint": str(checkpoint),
        "source_checkpoint_sha256": file_sha256(checkpoint),
        "checkpoint_metrics": payload.get("metrics"),
        "exporter": "torch.onnx.export (TorchScript, dynamo=False)",
        "versions": {
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
        },  # fmt: skip
    }
    metadata = _jsonable(metadata)
    write_json_atomic(onnx_path.with_name(onnx_path.name + ".json"), metadata)
    if not parity["ok"]:
        raise ExportParityError(
            f"ONNX export {onnx_path} does not match PyTorch: max abs diff {parity['max_abs_diff']:.3g} > "
            f"tolerance {tolerance:.3g} on {parity['num_images']} validation images "
            f"(do not use this file; details in {onnx_path.name}.json)"
        )
    return metadata
