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
