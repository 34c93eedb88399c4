"""The exporter interface: what one task's ONNX export needs beyond the shared pipeline (`OnnxExporter`).

Each task that ships as ONNX implements it in `kdlab.export.<task>`; the shared code (graph export, onnxruntime,
measurement, INT8, the run pipeline) only ever talks to this interface and never imports a task's exporter.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from kdlab.config.schema import ExperimentConfig
from kdlab.errors import ConfigError

Batch = tuple[torch.Tensor, ...]  # one batch of the exported graph's inputs, as the loader gives them


def float_images(x: torch.Tensor) -> torch.Tensor:
    """Loader batches hold uint8 images; the exported model takes float32 in [0,1]."""
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    return x.float()


def as_tuple(outputs: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """A wrapper's outputs as a tuple (a module with one output may return the tensor itself)."""
    return (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)


class OnnxExporter(ABC):
    """What one task's ONNX export needs beyond the shared pipeline.

    `wrap(model)` is the module that is traced and compared: it takes `input_names` positionally and returns
    a tuple in the order of `output_names` (a lone tensor is taken as a 1-tuple). A `Batch` holds the graph's inputs as the loader gives them
    (images may be uint8); `model_inputs` turns it into what the graph takes.
    """

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    min_parity_images: int = 1  # parity is measured on at least this many validation images

    @abstractmethod
    def build_model(self, cfg: ExperimentConfig) -> nn.Module:
        """The task's model for `cfg` (the checkpoint's weights are loaded into it)."""

    @abstractmethod
    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to export: `model` with its outputs as a tuple in `output_names` order."""

    @abstractmethod
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx's dynamic_axes: input/output name -> {dim: symbolic name}."""

    @abstractmethod
    def input_size(self, cfg: ExperimentConfig) -> tuple[int, int]:
        """The (H, W) the graph is traced at."""

    @abstractmethod
    def example_inputs(self, cfg: ExperimentConfig) -> Batch:
        """Inputs to trace with (on CPU; sizes other than 1, so none is mistaken for a constant)."""

    @abstractmethod
    def validation_batches(self, cfg: ExperimentConfig, num_images: int) -> list[Batch]:
        """The first `num_images` validation images of the run's own data, as batches."""

    def calibration_batches(self, cfg: ExperimentConfig, num_images: int) -> list[Batch]:
        """INT8 calibration data: the first `num_images` TRAINING images of the run's data, without
        augmentation, as graph batches (see `kdlab.export.quantize.calibration_batches`). A task without it
        cannot be quantized (the default)."""
        raise ConfigError(
            f"export.quantize=int8 is not implemented for task={cfg.task}: INT8 calibration is not implemented "
            f"for this task ({type(self).__name__}; only segmentation exports calibrate); set export.quantize=none"
        )

    @abstractmethod
    def latency_batch(self, batches: list[Batch]) -> Batch:
        """The one-image batch the latency is timed on."""

    @abstractmethod
    def counts(self, batch: Batch) -> dict[str, int]:
        """What a batch holds, e.g. {"images": 2, "rois": 5}; "images" is required (latency is per image)."""

    @abstractmethod
    def describe(self, cfg: ExperimentConfig) -> dict[str, Any]:
        """The task's part of the metadata JSON: inputs, outputs and what they mean, model facts."""

    def check_opset(self, opset: int) -> None:
        """Raise ConfigError when the graph cannot be exported correctly at `opset` (default: any works)."""
        return None

    def parity_scope(self, parity: dict[str, Any]) -> str:
        """How much data a parity result covers, for messages: "8 validation images"."""
        return f"{parity['num_images']} validation images"

    def model_inputs(self, batch: Batch) -> Batch:
        """The graph's float32 inputs; uint8 images (loader batches) are scaled to [0,1]."""
        return tuple(float_images(x) for x in batch)

    # The metric the ONNX file is scored by on the validation set (a key of the task's evaluator's metrics).
    accuracy_metric: str = "miou"  # the headline that selects checkpoints (SegmentationTask.best_metric)

    def as_model_outputs(self, outputs: tuple[torch.Tensor, ...]) -> Any:
        """The graph's outputs shaped like the model's own return value, so the task's evaluator can score an
        ONNX file as it scores the model (default: the first output is the model's output)."""
        return outputs[0]
