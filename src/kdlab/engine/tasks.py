"""Tasks turn a batch into a loss dict; the training loop never asks what kind of training it runs.

A task is any object with `__call__(model, batch) -> {"loss": tensor, "<component>": tensor, ...}` and a
`name`. `SegmentationTask`, `ClassificationTask` and `SequenceTask` are the plain (no teacher) ones; the KD tasks live in
`kdlab.distill`.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.config.schema import LossConfig
from kdlab.models.losses import SegmentationLossWeights, segmentation_loss


class Task(Protocol):
    name: str

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]: ...


class SegmentationTask:
    """Plain supervised training: the base segmentation loss on the model's outputs."""

    name = "segmentation"

    def __init__(self, cfg: LossConfig) -> None:
        self.weights = SegmentationLossWeights.from_config(cfg)

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        outputs = model(batch["images"], batch["rois"])
        losses = segmentation_loss(outputs, batch["masks"], self.weights)
        losses["loss"] = losses["base_total"]
        return losses


class ClassificationTask:
    """Plain supervised classification: cross-entropy (optional label smoothing) on the model's logits."""

    name = "classification"

    def __init__(self, cfg: LossConfig) -> None:
        self.label_smoothing = cfg.label_smoothing

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        logits = model(batch["images"])
        ce = F.cross_entropy(logits.float(), batch["labels"], label_smoothing=self.label_smoothing)
        return {"loss": ce, "ce": ce}


class SequenceTask:
    """Plain supervised sequence classification: cross-entropy on the final logits (readout of h_T)."""

    name = "sequence"

    def __init__(self, cfg: LossConfig) -> None:
        self.label_smoothing = cfg.label_smoothing

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        logits = model(batch["inputs"])["logits"]
        ce = F.cross_entropy(logits.float(), batch["labels"], label_smoothing=self.label_smoothing)
        return {"loss": ce, "ce": ce}
