"""The classifier exporter: images -> logits, through the shared pipeline (same parity, latency, files).

The exported graph takes `images` float32 [B,3,S,S] in [0,1] (normalised inside the model) and returns
`logits` float32 [B,num_classes]; B is dynamic. Files: checkpoints/best_model.onnx + best_model.onnx.json.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdlab.config.schema import ExperimentConfig
from kdlab.export.interface import Batch, OnnxExporter

INPUT_NAMES = ["images"]
OUTPUT_NAMES = ["logits"]
DYNAMIC_AXES = {"images": {0: "batch"}, "logits": {0: "batch"}}


class ClassificationExporter(OnnxExporter):
    """The classifier itself is the graph (it returns the logits tensor); parity on at least 8 images."""

    input_names = tuple(INPUT_NAMES)
    output_names = tuple(OUTPUT_NAMES)
    min_parity_images = 8
    accuracy_metric = "top1"

    def build_model(self, cfg: ExperimentConfig) -> nn.Module:
        from kdlab.models.builders import build_classifier

        return build_classifier(cfg.model)

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return DYNAMIC_AXES

    def input_size(self, cfg: ExperimentConfig) -> tuple[int, int]:
        size = cfg.data.classification.image_size
        return size, size

    def example_inputs(self, cfg: ExperimentConfig) -> Batch:
        size = cfg.data.classification.image_size
        return (torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)),)

    def validation_batches(self, cfg: ExperimentConfig, num_images: int) -> list[Batch]:
        """One batch of the first `num_images` validation images (uint8)."""
        from kdlab.data.classification import build_classification_datasets

        _, val = build_classification_datasets(cfg)
        n = min(num_images, len(val))
        return [(torch.stack([val[i]["image"] for i in range(n)]),)] if n else []

    def latency_batch(self, batches: list[Batch]) -> Batch:
        return (batches[0][0][:1],)

    def counts(self, batch: Batch) -> dict[str, int]:
        return {"images": int(batch[0].shape[0])}

    def describe(self, cfg: ExperimentConfig) -> dict[str, Any]:
        size = cfg.data.classification.image_size
        return {
            "task": "classification",
            "inputs": {
                "images": {"shape": ["batch", 3, size, size], "dtype": "float32", "range": [0.0, 1.0]}
            },
            "outputs": {
                "logits": {
                    "shape": ["batch", cfg.model.num_classes],
                    "dtype": "float32",
                    "meaning": "class logits (softmax over dim 1 for probabilities)",
                }
            },
            "num_classes": cfg.model.num_classes,
            "model_name": cfg.model.name,
        }
