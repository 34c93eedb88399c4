"""The people-segmentation exporter: the ROI UNet as an ONNX graph, for a student or a cached teacher.

The exported graph takes `images` float32 [B,3,H,W] in [0,1] (normalised inside the model) and `rois`
float32 [N,5] = (batch_index, x1, y1, x2, y2) in input pixels, and returns `masks` float32 [N,3,mask_h,mask_w],
the model's "logits" (log-probabilities of background / target / other). B and N are dynamic; H and W are
fixed to the run's `data.input_size`. The teacher is never loaded.

torchvision's `roi_align(aligned=True)` maps to ONNX RoiAlign with `coordinate_transformation_mode=
"half_pixel"`, which exists only from opset 16; at lower opsets it is silently exported without the
half-pixel offset, so opsets below 16 are refused. N = 0 (an image batch without ROIs) returns an empty
[0,3,mask_h,mask_w] thanks to `kdlab.export.graph`'s `TraceableGroupNorm`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdlab.checkpoints import ModelBuilder, model_from_checkpoint
from kdlab.config.schema import ExperimentConfig
from kdlab.data.loaders import build_datasets, build_loader, raise_if_data_error
from kdlab.data.teacher_cache import SEGMENTATION_HEADS
from kdlab.data.transforms import EvalTransform
from kdlab.errors import ConfigError
from kdlab.export.graph import (
    DYNAMO_MIN_OPSET,
    config_metadata,
    export_methods,
    export_with_fallback,
)
from kdlab.export.interface import (
    Batch,
    OnnxExporter,
)
from kdlab.export.measure import DEFAULT_LATENCY_RUNS, DEFAULT_TOLERANCE, onnx_latency_of, onnx_parity_of
from kdlab.models.roi_unet import RoiUNet

CLASSES = ["background", "target", "other"]
INPUT_NAMES = ["images", "rois"]
OUTPUT_NAMES = ["masks"]
MIN_OPSET = 16  # RoiAlign's coordinate_transformation_mode (half_pixel = torchvision aligned=True)

# Model output key -> ONNX output name. A student exports `masks` only; a teacher for the offline cache
# (`python -m kdlab.distill.cache export-teacher`) also exports the two aux heads the KD loss uses.
HEAD_OUTPUT_NAMES = {"logits": "masks", "bg_fg_logits": "bg_fg_logits", "target_logits": "target_logits"}


class SelectedHeads(nn.Module):
    """The exported graph: `RoiUNet` forward returning the named heads, in order."""

    def __init__(self, model: RoiUNet, heads: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.heads = heads

    def forward(self, images: torch.Tensor, rois: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(images, rois)
        return tuple(out[h] for h in self.heads)


def _input_size(cfg: ExperimentConfig) -> tuple[int, int]:
    return int(cfg.data.input_size[0]), int(cfg.data.input_size[1])


def _example_inputs(input_size: tuple[int, int]) -> Batch:
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
    return images, rois


def validation_batches(cfg: ExperimentConfig, num_images: int) -> list[Batch]:
    """The first `num_images` validation images (uint8) with their ROIs, in loader order."""
    _, val = build_datasets(cfg)
    return first_batches(val, cfg, num_images)


def first_batches(dataset: Any, cfg: ExperimentConfig, num_images: int) -> list[Batch]:
    """The first `num_images` images of a people dataset (uint8) with their ROIs, as (images, rois) batches."""
    batch_size = max(1, min(num_images, cfg.training.batch_size))
    loader = build_loader(
        dataset, batch_size, shuffle=False, seed=cfg.training.seed, num_workers=0, pin_memory=False
    )
    batches: list[Batch] = []
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


class SegmentationExporter(OnnxExporter):
    """images + rois -> the selected heads (default: `masks` only); dynamic image and ROI counts."""

    input_names = tuple(INPUT_NAMES)

    def __init__(self, heads: tuple[str, ...] = ("logits",)) -> None:
        self.heads = tuple(heads)
        self.output_names = tuple(HEAD_OUTPUT_NAMES[h] for h in self.heads)

    def build_model(self, cfg: ExperimentConfig) -> nn.Module:
        from kdlab.models.builders import build_model

        return build_model(cfg.model)

    def wrap(self, model: nn.Module) -> nn.Module:
        return SelectedHeads(model, self.heads)

    def as_model_outputs(self, outputs: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        """The graph's outputs under the model's own keys ("logits", ...), as `RoiUNet.forward` returns them."""
        return dict(zip(self.heads, outputs, strict=True))

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {
            "images": {0: "batch"},
            "rois": {0: "num_rois"},
            **{n: {0: "num_rois"} for n in self.output_names},
        }

    def check_opset(self, opset: int) -> None:
        if opset < MIN_OPSET:
            raise ConfigError(
                f"config value export.opset={opset} is too low for ONNX export: RoIAlign with aligned=True needs "
                f"opset >= {MIN_OPSET} (coordinate_transformation_mode=half_pixel)"
            )

    def input_size(self, cfg: ExperimentConfig) -> tuple[int, int]:
        return _input_size(cfg)

    def example_inputs(self, cfg: ExperimentConfig) -> Batch:
        return _example_inputs(_input_size(cfg))

    def validation_batches(self, cfg: ExperimentConfig, num_images: int) -> list[Batch]:
        return validation_batches(cfg, num_images)

    def calibration_batches(self, cfg: ExperimentConfig, num_images: int) -> list[Batch]:
        """The first `num_images` training images with their ROIs, letterboxed like validation (no augmentation)."""
        train, _ = build_datasets(cfg)
        # Calibration must see the inputs inference sees: the deterministic eval letterbox, not random crops.
        train.transform = EvalTransform(tuple(cfg.data.input_size))
        return first_batches(train, cfg, num_images)

    def latency_batch(self, batches: list[Batch]) -> Batch:
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

    def counts(self, batch: Batch) -> dict[str, int]:
        images, rois = batch
        return {"images": int(images.shape[0]), "rois": int(rois.shape[0])}

    def parity_scope(self, parity: dict[str, Any]) -> str:
        return f"{parity['num_images']} validation images / {parity['num_rois']} ROIs"

    def describe(self, cfg: ExperimentConfig) -> dict[str, Any]:
        return {
            "inputs": {
                "images": {"shape": ["batch", 3, *_input_size(cfg)], "dtype": "float32", "range": [0.0, 1.0]},
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
            "classes": CLASSES,
            "roi_size": list(cfg.model.roi_size),
            "mask_size": list(cfg.model.mask_size),
            "roi_sampling_ratio": cfg.model.roi_sampling_ratio,
            "encoder": cfg.model.encoder,
        }


# ------------------------------------------------------------- the pipeline on (images, rois), by hand
def export_model_to_onnx(
    model: RoiUNet,
    path: Path,
    input_size: tuple[int, int],
    opset: int = DYNAMO_MIN_OPSET,
    heads: tuple[str, ...] = ("logits",),
    metadata: dict[str, str] | None = None,
    exporter: str = "auto",
) -> str:
    """Export `model` (an eval-mode copy; `model` is untouched) to `path`: inputs images/rois, outputs the
    `heads` (default: masks only), dynamic B and N; `metadata` goes into the file's metadata_props.
    `exporter` is export.exporter's choice ("auto": dynamo, TorchScript if dynamo raises); returns the one used."""
    method, _ = export_with_fallback(
        model, SegmentationExporter(heads), Path(path), _example_inputs(tuple(input_size)), opset, metadata,
        export_methods(exporter),
    )  # fmt: skip
    return method


def onnx_parity(
    onnx_path: str | Path, model: RoiUNet, batches: list[Batch], tolerance: float = DEFAULT_TOLERANCE
) -> dict[str, Any]:
    """Max |onnxruntime - PyTorch| of the masks over `batches` of (images, rois); images uint8 or [0,1] float."""
    return onnx_parity_of(onnx_path, model, SegmentationExporter(), batches, tolerance)


def onnx_latency_ms(
    onnx_path: str | Path, images: torch.Tensor, rois: torch.Tensor, runs: int = DEFAULT_LATENCY_RUNS
) -> float:
    """Median onnxruntime CPU time per image (ms) over `runs` timed runs after a warm-up."""
    return onnx_latency_of(onnx_path, SegmentationExporter(), (images, rois), runs)


def export_teacher_onnx(
    checkpoint: str | Path, out: str | Path, build: ModelBuilder, opset: int = DYNAMO_MIN_OPSET
) -> Path:
    """Export a segmentation teacher with all three heads (masks, bg_fg_logits, target_logits) and its
    config in the metadata, so it can fill a teacher cache (`python -m kdlab.distill.cache generate --teacher x.onnx`)."""
    model, cfg, _ = model_from_checkpoint(checkpoint, "teacher checkpoint", build)
    if not isinstance(model, RoiUNet):
        raise ConfigError(f"export-teacher exports segmentation teachers; {checkpoint} is a {cfg.task} model")
    metadata = config_metadata(cfg)
    export_model_to_onnx(
        model.eval(), Path(out), _input_size(cfg), opset, heads=SEGMENTATION_HEADS, metadata=metadata,
        exporter=cfg.export.exporter,
    )  # fmt: skip
    return Path(out)
