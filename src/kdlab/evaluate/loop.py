"""The validation loop every evaluator shares: eval mode, inference_mode, the batches on the device."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from kdlab.data.loaders import raise_if_data_error
from kdlab.engine.batches import batch_to_device


def eval_batches(
    model: nn.Module, loader: Any, device: torch.device, channels_last: bool, desc: str, show_progress: bool
) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """Yield (batch as loaded, batch on the device) with `model` in eval mode under `torch.inference_mode()`
    (the caller's forward runs inside both); an unreadable sample raises DataError, an empty batch is
    skipped; the model's training mode is restored at the end."""
    was_training = model.training
    model.eval()
    bar = tqdm(loader, desc=desc, leave=False, disable=not show_progress, unit="batch")
    try:
        with torch.inference_mode():
            for raw in bar:
                raise_if_data_error(raw)
                if raw is not None:
                    yield raw, batch_to_device(raw, device, channels_last)
    finally:
        if was_training:
            model.train()
