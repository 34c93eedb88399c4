"""The one contract between the training loop and what it trains: a task turns a batch into a loss dict.

A task is any object with `__call__(model, batch) -> {"loss": tensor, "<component>": tensor, ...}` and a
`name`; the loop logs every component and never asks whether it is distilling. Optional: `set_progress(step,
total)` (schedules), `trainable_modules()` (weights that train beside the model, saved as task_state_dict)
and `training_module(model)` (the module to train and wrap in DDP, when those weights take part in the
forward). The plain tasks live in `kdlab.tasks.<task>`, the distillation ones in `kdlab.distill.kd_*`.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn


class Task(Protocol):
    name: str

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]: ...


def misplaced_loss_terms(losses: dict[str, Any], device: torch.device) -> dict[str, str]:
    """The loss dict's entries that break the contract: not a 0-dim tensor, or on another device than the
    run's (name -> what is wrong). The loop stacks every term of a log interval into one tensor, which on
    CUDA refuses a CPU tensor among device ones."""
    wrong = {}
    for name, value in losses.items():
        if not isinstance(value, torch.Tensor):
            wrong[name] = f"a {type(value).__name__}, not a tensor"
        elif value.ndim != 0:
            wrong[name] = f"shape {tuple(value.shape)}, not a scalar"
        elif value.device.type != device.type or (
            device.index is not None and value.device.index not in (None, device.index)
        ):
            wrong[name] = f"on {value.device}, not on {device}"
    return wrong
