"""Validation pass for sequence classifiers: top-1 (and top-5 with > 5 classes), ECE and val loss on the final
logits. Same call contract as `ClassificationEvaluator`: `evaluator(model, desc=...) -> (metrics, None)`,
metrics reduced across DDP ranks."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from kdlab.data.loaders import raise_if_data_error
from kdlab.engine import distributed
from kdlab.engine.batches import autocast_for, batch_to_device
from kdlab.evaluate.classification_metrics import ClassificationMetrics


class SequenceEvaluator:
    """Runs the model in eval mode under `torch.inference_mode()`; metrics from `classification_metrics`
    (the sequence count is reported as "images", the key the trainer logs for every task)."""

    def __init__(
        self,
        loader: Any,
        device: torch.device,
        num_classes: int,
        autocast_dtype: torch.dtype | None = None,
        show_progress: bool = True,
    ) -> None:
        self.loader = loader
        self.device = device
        self.num_classes = num_classes
        self.autocast_dtype = autocast_dtype
        self.show_progress = show_progress

    def __call__(self, model: nn.Module, desc: str = "val") -> tuple[dict[str, float], None]:
        was_training = model.training
        model.eval()
        metrics = ClassificationMetrics(self.num_classes)
        seen = 0
        bar = tqdm(self.loader, desc=desc, leave=False, disable=not self.show_progress, unit="batch")
        with torch.inference_mode():
            for raw in bar:
                raise_if_data_error(raw)
                if raw is None:
                    continue
                batch = batch_to_device(raw, self.device, channels_last=False)
                with autocast_for(self.device, self.autocast_dtype):
                    logits = model(batch["inputs"])["logits"]
                metrics.update(logits.float(), batch["labels"])
                seen += raw["inputs"].shape[0]
        seen = int(distributed.all_reduce_sum_(torch.tensor([float(seen)]))[0])
        if was_training:
            model.train()
        metrics.merge_across_ranks()
        result = metrics.compute()
        result["images"] = seen
        return result, None
