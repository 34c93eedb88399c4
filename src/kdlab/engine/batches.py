"""Moving a collated batch to the device: uint8 images become float in [0,1] there (4x less to copy).

Segmentation batches carry `rois` and `masks`, classification batches `labels`, sequence batches float
`inputs` (no `images`) and possibly cached teacher outputs under `teacher_*` keys (moved as float32);
whichever are present move.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def autocast_for(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision in `dtype` on `device`, or nothing when dtype is None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def batch_size_of(batch: dict[str, Any]) -> int:
    """Samples in a collated batch (images for the image tasks, sequences for the sequence task)."""
    return int((batch["images"] if "images" in batch else batch["inputs"]).shape[0])


def batch_to_device(batch: dict[str, Any], device: torch.device, channels_last: bool) -> dict[str, Any]:
    non_blocking = device.type == "cuda"
    out = dict(batch)
    if "images" in batch:
        images = batch["images"].to(device, non_blocking=non_blocking).float().div_(255.0)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        out["images"] = images
    if "inputs" in batch:
        out["inputs"] = batch["inputs"].to(device, non_blocking=non_blocking).float()
    if "rois" in batch:
        out["rois"] = batch["rois"].to(device, non_blocking=non_blocking)
    if "masks" in batch:
        out["masks"] = batch["masks"].to(device, non_blocking=non_blocking).long()
    if "labels" in batch:
        out["labels"] = batch["labels"].to(device, non_blocking=non_blocking).long()
    for key, value in batch.items():  # cached teacher outputs (float16 on disk) are used in float32
        if key.startswith("teacher_") and isinstance(value, torch.Tensor):
            out[key] = value.to(device, non_blocking=non_blocking).float()
    return out
