"""Classification metrics: top-k accuracy and expected calibration error (pure functions + an accumulator).

`ClassificationMetrics` keeps the per-sample predictions it needs (top-k hits, confidence, correctness) on
the inputs' device and reads them back once in `compute()`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "CLASSIFICATION_METRICS",
    "ECE_BINS",
    "ClassificationMetrics",
    "expected_calibration_error",
    "topk_correct",
]

# What `ClassificationMetrics.compute()` reports (top5 only with more than 5 classes; "loss" is the mean
# validation cross-entropy, logged as val_loss); reports use these.
CLASSIFICATION_METRICS = ("top1", "top5", "ece", "loss")
ECE_BINS = 15


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Bool [N]: is the label among the k highest logits of each row (`logits` [N,C], labels [N])?"""
    if k < 1 or k > logits.shape[1]:
        raise ValueError(f"k must be in [1, {logits.shape[1]}], got {k}")
    top = logits.topk(k, dim=1).indices
    return (top == labels.view(-1, 1)).any(dim=1)


def expected_calibration_error(
    confidences: torch.Tensor, correct: torch.Tensor, n_bins: int = ECE_BINS
) -> float:
    """ECE with `n_bins` equal-width confidence bins over (0, 1]:

        ECE = sum_b (|B_b| / N) · |accuracy(B_b) − mean confidence(B_b)|

    where sample i (confidence = max softmax probability) falls in bin b when b/n_bins < conf <= (b+1)/n_bins
    (confidence 0 goes to the first bin). Empty bins contribute 0; N = 0 gives NaN.
    """
    n = int(confidences.numel())
    if n == 0:
        return math.nan
    conf = confidences.double().reshape(-1)
    hits = correct.double().reshape(-1)
    bins = (torch.ceil(conf * n_bins).long() - 1).clamp_(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64, device=conf.device).scatter_add_(
        0, bins, torch.ones_like(conf)
    )
    conf_sum = torch.zeros_like(count).scatter_add_(0, bins, conf)
    hit_sum = torch.zeros_like(count).scatter_add_(0, bins, hits)
    gap = (hit_sum - conf_sum).abs()  # |B| · |acc − conf| per bin
    return float(gap.sum() / n)


class ClassificationMetrics:
    """Accumulates top-1, top-5 (when num_classes > 5), ECE and mean cross-entropy over batches."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.top1: list[torch.Tensor] = []
        self.top5: list[torch.Tensor] = []
        self.conf: list[torch.Tensor] = []
        self.loss_sum: torch.Tensor | float = 0.0
        self.count = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits = logits.float()
        probs = logits.softmax(dim=1)
        self.top1.append(topk_correct(logits, labels, 1))
        if self.num_classes > 5:
            self.top5.append(topk_correct(logits, labels, 5))
        self.conf.append(probs.max(dim=1).values)
        self.loss_sum = self.loss_sum + F.cross_entropy(logits, labels, reduction="sum")
        self.count += int(labels.shape[0])

    def merge_across_ranks(self) -> None:
        """Under DDP each rank saw its shard: gather every rank's per-sample values (small: one bool and one
        confidence per image) so that compute() reports the whole validation set."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return

        def cat(items: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
            return torch.cat(items).cpu() if items else torch.zeros(0, dtype=dtype)

        mine = (cat(self.top1, torch.bool), cat(self.top5, torch.bool), cat(self.conf, torch.float32),
                float(self.loss_sum), self.count)  # fmt: skip
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
        self.top1 = [p[0] for p in parts]
        self.top5 = [p[1] for p in parts] if self.num_classes > 5 else []
        self.conf = [p[2] for p in parts]
        self.loss_sum = sum(p[3] for p in parts)
        self.count = sum(p[4] for p in parts)

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            return {"top1": math.nan, "ece": math.nan, "loss": math.nan}
        top1 = torch.cat(self.top1)
        out = {"top1": float(top1.double().mean())}
        if self.top5:
            out["top5"] = float(torch.cat(self.top5).double().mean())
        out["ece"] = expected_calibration_error(torch.cat(self.conf), top1)
        out["loss"] = float(self.loss_sum) / self.count
        return out
