"""ONNX export of the trained student, with an onnxruntime parity check and CPU latency.

The exported graph takes `images` float32 [B,3,H,W] in [0,1] (normalised inside the model) and `rois`
float32 [N,5] = (batch_index, x1, y1, x2, y2) in input pixels, and returns `masks` float32 [N,3,mask_h,mask_w],
the model's "logits" (log-probabilities of background / target / other). B and N are dynamic; H and W are
fixed to the run's `data.input_size`. The teacher is never loaded.

We use the TorchScript exporter (`dynamo=False`; the dynamo exporter needs `onnxscript`). Three traps:
- It calls `.train(<mode the exported module had>)` on the way out, recursively. A freshly built wrapper
  module is in training mode, so exporting `Wrapper(model)` silently leaves the model in training mode
  (BatchNorm on batch statistics, drop-path on) and any PyTorch comparison made afterwards is wrong by ~1.
  `export_model_to_onnx` exports an eval-mode deep copy and never touches the caller's model.
- torchvision's `roi_align(aligned=True)` maps to ONNX RoiAlign with
  `coordinate_transformation_mode="half_pixel"`, which exists only from opset 16; at lower opsets it is
  silently exported without the half-pixel offset. Opsets below 16 are therefore refused.
- torch's GroupNorm symbolic reshapes to [N, groups, -1], which onnxruntime cannot resolve when N = 0
  (an image batch without ROIs). The copy's GroupNorms are swapped for `TraceableGroupNorm`, the same
  maths in plain ops with no inferred dimension, so N = 0 returns an empty [0,3,mask_h,mask_w].
"""

from __future__ import annotations

import copy
import json
import logging
import math
import statistics
import time
import warnings
from collections.abc import Callable
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
from kdlab.data.loaders import build_datasets, build_loader, raise_if_data_error
from kdlab.data.teacher_cache import ONNX_CONFIG_METADATA_KEY, SEGMENTATION_HEADS
from kdlab.distill.teacher import file_sha256, model_from_checkpoint
from kdlab.errors import CheckpointError, ConfigError, KdlabRunFailure
from kdlab.models.roi_unet import RoiUNet

log = logging.getLogger(__name__)

CLASSES = ["background", "target", "other"]
INPUT_NAMES = ["images", "rois"]
OUTPUT_NAMES = ["masks"]
MIN_OPSET = 16  # RoiAlign's coordinate_transformation_mode (half_pixel = torchvision aligned=True)
WARMUP_RUNS = 3


class ExportParityError(KdlabRunFailure):
    """onnxruntime's output differs from PyTorch's by more than the tolerance."""


# Model output key -> ONNX output name. A student exports `masks` only; a teacher for the offline cache
# (`python -m kdlab.distill.cache export-teacher`) also exports the two aux heads the KD loss uses.
HEAD_OUTPUT_NAMES = {"logits": "masks", "bg_fg_logits": "bg_fg_logits", "target_logits": "target_logits"}
CONFIG_METADATA_KEY = ONNX_CONFIG_METADATA_KEY  # the resolved experiment config (JSON) in metadata_props


class SelectedHeads(nn.Module):
    """The exported graph of a teacher: `RoiUNet` forward returning the named heads, in order."""

    def __init__(self, model: RoiUNet, heads: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.heads = heads

    def forward(self, images: torch.Tensor, rois: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(images, rois)
        return tuple(out[h] for h in self.heads)


class TraceableGroupNorm(nn.Module):
    """`nn.GroupNorm` in plain tensor ops that export without an inferred (-1) dimension.

    Same parameters (shared, not copied) and the same maths: per sample and group, subtract the mean and
    divide by sqrt(biased variance + eps), then the per-channel affine transform.
    """

    def __init__(self, norm: nn.GroupNorm) -> None:
        super().__init__()
        self.num_groups = norm.num_groups
        self.num_channels = norm.num_channels
        self.eps = norm.eps
        self.weight = norm.weight
        self.bias = norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grouped = x.unflatten(1, (self.num_groups, self.num_channels // self.num_groups))
        dims = tuple(range(2, grouped.dim()))
        mean = grouped.mean(dim=dims, keepdim=True)
        var = (grouped - mean).square().mean(dim=dims, keepdim=True)
        out = ((grouped - mean) * torch.rsqrt(var + self.eps)).reshape(x.shape)
        if self.weight is not None:
            affine_shape = (1, self.num_channels) + (1,) * (x.dim() - 2)
            out = out * self.weight.view(affine_shape) + self.bias.view(affine_shape)
        return out


def export_ready_copy(model: nn.Module) -> nn.Module:
    """An eval-mode deep copy of `model` whose GroupNorms are `TraceableGroupNorm`s (the original is untouched)."""
    clone = copy.deepcopy(model).eval()
    for module in list(clone.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.GroupNorm):
                setattr(module, name, TraceableGroupNorm(child))
    return clone.eval()


def _example_inputs(input_size: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images and three ROIs (not 1 and 1, so no size is mistaken for a constant while tracing)."""
    h, w = input_size
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, h, w, generator=gen)
    rois = torch.tensor(
        [
            [0.0, 0.1 * w, 0.1 * h, 0.6 * w, 0.9 * h],
            [1.0, 0.3 * w, 0.2 * h, 0.9 * w, 0.8 * h],
            [1.0, 0.0, 0.0, 0.5 * w, 0.5 * h],
        ]
    )
    return images.to(device), rois.to(device)


def _declare_static_output_dims(
    path: Path, per_roi_shapes: list[tuple[int, ...]], metadata: dict[str, str] | None = None
) -> None:
    """Write the fixed [C, mask_h, mask_w] into each output's type (the tracer leaves them symbolic), and
    `metadata` into metadata_props.

    The Resize to the mask size has constant target sizes, so these dims never vary; declaring them lets
    users and tools see the mask size in the graph signature.
    """
    model_proto = onnx.load(str(path))
    for output, per_roi_shape in zip(model_proto.graph.output, per_roi_shapes, strict=True):
        dims = output.type.tensor_type.shape.dim
        for dim, value in zip(dims[1:], per_roi_shape, strict=True):
            dim.Clear()
            dim.dim_value = int(value)
    for key, value in (metadata or {}).items():
        entry = model_proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model_proto, str(path))


def export_model_to_onnx(
    model: RoiUNet,
    path: Path,
    input_size: tuple[int, int],
    opset: int = 17,
    heads: tuple[str, ...] = ("logits",),
    metadata: dict[str, str] | None = None,
) -> None:
    """Trace `model` (in eval mode) to `path`: inputs images/rois, outputs the `heads` (default: masks
    only), dynamic B and N; `metadata` goes into the file's metadata_props.

    Exports an eval-mode copy (see `export_ready_copy`), so `model` and its train/eval mode are untouched.
    Written to a temp file, checked with `onnx.checker`, then renamed into place.
    """
    if opset < MIN_OPSET:
        raise ConfigError(
            f"config value export.opset={opset} is too low for ONNX export: RoIAlign with aligned=True needs "
            f"opset >= {MIN_OPSET} (coordinate_transformation_mode=half_pixel)"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    # Eval-mode wrapper: the exporter restores the wrapper's mode, recursively, when it is done.
    wrapper = SelectedHeads(export_ready_copy(model), tuple(heads)).eval()
    output_names = [HEAD_OUTPUT_NAMES[h] for h in heads]
    dynamic_axes = {
        "images": {0: "batch"},
        "rois": {0: "num_rois"},
        **{n: {0: "num_rois"} for n in output_names},
    }
    images, rois = _example_inputs(tuple(input_size), device)

    def write(tmp: Path) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            # Expected and harmless here: the legacy-exporter deprecation notice and tracer warnings about
            # shape checks (the ROI and mask sizes are fixed by the config, so they are constants).
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(
                wrapper,
                (images, rois),
                str(tmp),
                input_names=INPUT_NAMES,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                do_constant_folding=True,
                training=torch.onnx.TrainingMode.EVAL,
                dynamo=False,
            )
            per_roi_shapes = [tuple(o.shape[1:]) for o in wrapper(images, rois)]
        _declare_static_output_dims(tmp, per_roi_shapes, metadata)
        onnx.checker.check_model(str(tmp))

    atomic_write(path, write)
    log.info("exported ONNX (opset %d) to %s", opset, path)


def _session(onnx_path: str | Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def _float_images(images: torch.Tensor) -> torch.Tensor:
    """Loader batches hold uint8 images; the exported model takes float32 in [0,1]."""
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return images.float()


def _ort_inputs(images: torch.Tensor, rois: torch.Tensor) -> dict[str, np.ndarray]:
    return {
        "images": np.ascontiguousarray(_float_images(images).cpu().numpy()),
        "rois": np.ascontiguousarray(rois.float().cpu().numpy()),
    }


def _torch_masks(model: RoiUNet, images: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    with torch.no_grad():
        return model(_float_images(images).to(device), rois.float().to(device))["logits"].float().cpu()


def onnx_parity(
    onnx_path: str | Path,
    model: RoiUNet,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    tolerance: float = 1e-3,
) -> dict[str, Any]:
    """Max |onnxruntime - PyTorch| of the masks over `batches` of (images, rois); images uint8 or [0,1] float.

    The model runs in eval mode (its mode is restored). A shape mismatch or a non-finite difference counts
    as a failure (max_abs_diff = inf).
    """
    session = _session(onnx_path)
    was_training = model.training
    model.eval()
    worst = 0.0
    num_images = num_rois = 0
    try:
        for images, rois in batches:
            expected = _torch_masks(model, images, rois).numpy()
            got = session.run(OUTPUT_NAMES, _ort_inputs(images, rois))[0]
            num_images += int(images.shape[0])
            num_rois += int(rois.shape[0])
            if got.shape != expected.shape:
                log.warning("ONNX output shape %s != PyTorch %s", got.shape, expected.shape)
                worst = math.inf
                continue
            if got.size:
                diff = float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64))))
                worst = max(worst, diff if math.isfinite(diff) else math.inf)
    finally:
        model.train(was_training)
    return {
        "max_abs_diff": worst,
        "tolerance": tolerance,
        "ok": bool(worst <= tolerance),
        "num_images": num_images,
        "num_rois": num_rois,
        "num_batches": len(batches),
    }


def _median_ms(fn: Callable[[], object], runs: int) -> float:
    """Median wall time (ms) of `runs` calls after WARMUP_RUNS untimed ones."""
    for _ in range(WARMUP_RUNS):
        fn()
    times = []
    for _ in range(max(1, runs)):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return float(statistics.median(times))


def onnx_latency_ms(onnx_path: str | Path, images: torch.Tensor, rois: torch.Tensor, runs: int = 20) -> float:
    """Median onnxruntime CPU time per image (ms) over `runs` timed runs after a warm-up."""
    session = _session(onnx_path)
    feed = _ort_inputs(images, rois)
    return _median_ms(lambda: session.run(OUTPUT_NAMES, feed), runs) / max(1, int(images.shape[0]))


def torch_latency_ms(model: RoiUNet, images: torch.Tensor, rois: torch.Tensor, runs: int = 20) -> float:
    """Median PyTorch time per image (ms) on the model's device, eval mode, no grad; the reference for ONNX."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x, r = _float_images(images).to(device), rois.float().to(device)

    def step() -> None:
        with torch.no_grad():
            model(x, r)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    try:
        return _median_ms(step, runs) / max(1, int(images.shape[0]))
    finally:
        model.train(was_training)


def load_student(checkpoint: Path) -> tuple[nn.Module, ExperimentConfig, dict[str, Any]]:
    """The student described by the config saved in `checkpoint`, weights loaded strictly, on CPU, in eval."""
    model, cfg, payload = model_from_checkpoint(checkpoint, "checkpoint")
    model.eval()
    return model, cfg, payload


def validation_batches(cfg: ExperimentConfig, num_images: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `num_images` validation images (uint8) with their ROIs, in loader order."""
    _, val = build_datasets(cfg)
    batch_size = max(1, min(num_images, cfg.training.batch_size))
    loader = build_loader(
        val, batch_size, shuffle=False, seed=cfg.training.seed, num_workers=0, pin_memory=False
    )
    batches: list[tuple[torch.Tensor, torch.Tensor]] = []
    taken = 0
    for batch in loader:
        raise_if_data_error(batch)
        if batch is None:
            continue
        images, rois = batch["images"], batch["rois"]
        keep = min(images.shape[0], num_images - taken)
        if keep < images.shape[0]:
            images, rois = images[:keep], rois[rois[:, 0] < keep]
        batches.append((images, rois))
        taken += keep
        if taken >= num_images:
            break
    return batches


def _latency_inputs(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One image with its ROIs (the first image that has any; else one full-image ROI)."""
    for images, rois in batches:
        for i in range(images.shape[0]):
            own = rois[rois[:, 0] == i]
            if own.shape[0]:
                own = own.clone()
                own[:, 0] = 0
                return images[i : i + 1], own
    images = batches[0][0][:1]
    h, w = images.shape[-2:]
    return images, torch.tensor([[0.0, 0.0, 0.0, float(w), float(h)]])


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


def export_run_to_onnx(
    run_dir: str | Path,
    opset: int | None = None,
    parity_images: int = 4,
    latency_runs: int = 20,
    tolerance: float = 1e-3,
) -> dict[str, Any]:
    """Export <run_dir>/checkpoints/best_model.pth -> best_model.onnx + best_model.onnx.json; returns the metadata.

    Classifier runs (config task=classification) go through `kdlab.export.onnx_classifier` (same files).

    Parity is measured on the first `parity_images` validation images of the run's own data; when it fails,
    the metadata (with parity.ok = false) is still written, then ExportParityError is raised.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    checkpoint = run_dir / "checkpoints" / "best_model.pth"
    if not checkpoint.is_file():
        raise CheckpointError(f"run directory {run_dir} has no checkpoints/best_model.pth (train it first)")
    model, cfg, payload = load_student(checkpoint)
    opset = cfg.export.opset if opset is None else opset
    if cfg.task == "classification":
        from kdlab.export.onnx_classifier import export_classifier_run

        return export_classifier_run(
            run_dir, checkpoint, model, cfg, payload, opset, max(parity_images, 8), latency_runs, tolerance
        )
    input_size = (int(cfg.data.input_size[0]), int(cfg.data.input_size[1]))
    # Load the parity data before writing anything: a missing dataset fails without touching the run.
    batches = validation_batches(cfg, max(1, parity_images))
    if not batches:
        raise CheckpointError(f"run {run_dir} has no validation images to check the ONNX export against")

    onnx_path = checkpoint.with_suffix(".onnx")
    config_json = json.dumps(cfg.model_dump(mode="json"))
    export_model_to_onnx(model, onnx_path, input_size, opset, metadata={CONFIG_METADATA_KEY: config_json})
    parity = onnx_parity(onnx_path, model, batches, tolerance)
    log.info(
        "ONNX parity on %d val images / %d ROIs: max abs diff %.3g (tolerance %.3g)",
        parity["num_images"],
        parity["num_rois"],
        parity["max_abs_diff"],
        tolerance,
    )
    images, rois = _latency_inputs(batches)
    onnx_ms = onnx_latency_ms(onnx_path, images, rois, latency_runs)
    torch_ms = torch_latency_ms(model, images, rois, latency_runs)
    log.info("CPU latency per image: onnxruntime %.1f ms, PyTorch %.1f ms", onnx_ms, torch_ms)

    metadata = {
        "onnx_file": onnx_path.name,
        "inputs": {
            "images": {"shape": ["batch", 3, *input_size], "dtype": "float32", "range": [0.0, 1.0]},
            "rois": {
                "shape": ["num_rois", 5],
                "dtype": "float32",
                "layout": "(batch_index, x1, y1, x2, y2) in input pixels",
            },
        },
        "outputs": {
            "masks": {
                "shape": ["num_rois", len(CLASSES), *cfg.model.mask_size],
                "dtype": "float32",
                "meaning": "log-probabilities of the classes (softmax/argmax over dim 1)",
            }
        },
        "input_size": list(input_size),
        "normalization": {
            "mean": list(cfg.model.input_mean),
            "std": list(cfg.model.input_std),
            "applied_inside_model": True,
            "input_range": [0.0, 1.0],
        },
        "classes": CLASSES,
        "roi_size": list(cfg.model.roi_size),
        "mask_size": list(cfg.model.mask_size),
        "roi_sampling_ratio": cfg.model.roi_sampling_ratio,
        "opset": opset,
        "encoder": cfg.model.encoder,
        "experiment": cfg.name,
        "parity": {**parity, "data": "validation"},
        "parity_ok": parity["ok"],
        "latency": {
            "onnx_ms_per_image_median": onnx_ms,
            "torch_ms_per_image_median": torch_ms,
            "runs": latency_runs,
            "warmup_runs": WARMUP_RUNS,
            "batch_images": int(images.shape[0]),
            "batch_rois": int(rois.shape[0]),
            "device": "cpu",
            "torch_threads": torch.get_num_threads(),
        },
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
        },
    }
    metadata = _jsonable(metadata)
    write_json_atomic(onnx_path.with_name(onnx_path.name + ".json"), metadata)
    if not parity["ok"]:
        raise ExportParityError(
            f"ONNX export {onnx_path} does not match PyTorch: max abs diff {parity['max_abs_diff']:.3g} > "
            f"tolerance {tolerance:.3g} on {parity['num_images']} validation images / {parity['num_rois']} ROIs "
            f"(do not use this file; details in {onnx_path.name}.json)"
        )
    return metadata


def export_teacher_onnx(checkpoint: str | Path, out: str | Path, opset: int = 17) -> Path:
    """Export a segmentation teacher with all three heads (masks, bg_fg_logits, target_logits) and its
    config in the metadata, so it can fill a teacher cache (`python -m kdlab.distill.cache generate --teacher x.onnx`)."""
    model, cfg, _ = model_from_checkpoint(checkpoint, "teacher checkpoint")
    if cfg.task != "segmentation":
        raise ConfigError(f"export-teacher exports segmentation teachers; {checkpoint} is a {cfg.task} model")
    size = (int(cfg.data.input_size[0]), int(cfg.data.input_size[1]))
    metadata = {CONFIG_METADATA_KEY: json.dumps(cfg.model_dump(mode="json"))}
    export_model_to_onnx(model.eval(), Path(out), size, opset, heads=SEGMENTATION_HEADS, metadata=metadata)
    return Path(out)
