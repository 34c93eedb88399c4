"""Validation pass for sequence classifiers: top-1 (and top-5 with > 5 classes), ECE and val loss on the final
logits. Same call contract and maths as `ClassificationEvaluator` (whose loop it uses): `evaluator(model,
desc=...) -> (metrics, None)`, metrics reduced across DDP ranks; the sequence count is reported as "images",
the key the trainer logs for every task."""

from __future__ import annotations

from typing import Any

import torch

from kdlab.evaluate.classification_evaluator import ClassificationEvaluator


class SequenceEvaluator(ClassificationEvaluator):
    """The classifier evaluator on `batch["inputs"]`, reading the GRU's final `logits`."""

    def __init__(
        self,
        loader: Any,
        device: torch.device,
        num_classes: int,
        autocast_dtype: torch.dtype | None = None,
        show_progress: bool = True,
    ) -> None:
        super().__init__(
            loader, device, num_classes, autocast_dtype, channels_last=False, show_progress=show_progress,
            input_key="inputs", output_key="logits",
        )  # fmt: skip
