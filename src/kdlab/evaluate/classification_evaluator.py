"""Validation pass for classifiers: top-1/top-5/ECE/val loss over a loader (same call contract as
`SegmentationEvaluator`: `evaluator(model, desc=...) -> (metrics, vis)`; vis is None, classifiers draw no pictures)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from kdlab.engine import distributed
from kdlab.engine.batches import autocast_for
from kdlab.evaluate.classification_metrics import ClassificationMetrics
from kdlab.evaluate.loop import eval_batches


class ClassificationEvaluator:
    """Runs the model in eval mode under `torch.inference_mode()`; metrics from `classification_metrics`."""

    def __init__(
        self,
        loader: Any,
        device: torch.device,
        num_classes: int,
        autocast_dtype: torch.dtype | None = None,
        channels_last: bool = False,
        show_progress: bool = True,
        input_key: str = "images",
        output_key: str | None = None,
    ) -> None:
        """`input_key` names the batch entry the model takes; `output_key` the logits in a dict output
        (None: the model returns the logits)."""
        self.input_key = input_key
        self.output_key = output_key
        self.loader = loader
        self.device = device
        self.num_classes = num_classes
        self.autocast_dtype = autocast_dtype
        self.channels_last = channels_last
        self.show_progress = show_progress
        self.reduce_across_ranks = (
            True  # False: one rank alone over the whole set (see SegmentationEvaluator)
        )

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast_for(self.device, self.autocast_dtype)

    def __call__(self, model: nn.Module, desc: str = "val") -> tuple[dict[str, float], None]:
        metrics, images_seen = self.accumulate(model, desc)
        if self.reduce_across_ranks and distributed.current().enabled:  # each rank saw its shard
            images_seen = int(
                distributed.all_reduce_sum_(self.reduction_inputs(metrics, images_seen)["images"])[0]
            )
            metrics.merge_across_ranks()
        result = metrics.compute()
        result["images"] = images_seen
        return result, None

    def accumulate(self, model: nn.Module, desc: str = "val") -> tuple[ClassificationMetrics, int]:
        """This process's pass over its loader: (per-sample values on the device, images seen)."""
        metrics = ClassificationMetrics(self.num_classes)
        images_seen = 0
        for raw, batch in eval_batches(
            model, self.loader, self.device, self.channels_last, desc, self.show_progress
        ):
            with self._autocast():
                out = model(batch[self.input_key])
            logits = out[self.output_key] if self.output_key else out
            metrics.update(logits.float(), batch["labels"])
            images_seen += raw[self.input_key].shape[0]
        return metrics, images_seen

    def reduction_inputs(self, metrics: ClassificationMetrics, images_seen: int) -> dict[str, torch.Tensor]:
        """What the all-reduce sums over ranks, on this evaluator's device (the process group's: NCCL reduces
        only CUDA tensors). The per-sample values travel by `all_gather_object` (`merge_across_ranks`)."""
        return {"images": torch.full((1,), float(images_seen), dtype=torch.float64, device=self.device)}
