"""Exponential moving average (EMA) of a model's weights."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["ModelEMA"]


def _unwrap(model: nn.Module) -> nn.Module:
    """The wrapped module of a DistributedDataParallel model; any other model is returned unchanged."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


class ModelEMA:
    """Exponential moving average of a model's parameters and buffers (everything in its `state_dict`).

    On each `update(model)`, with d the effective decay:
    - floating-point tensors: `ema = d · ema + (1 - d) · model`;
    - other tensors (integer / bool buffers, e.g. BatchNorm `num_batches_tracked`): copied from the model.

    Effective decay: `d = decay` when `warmup=False`; with `warmup=True`,
    `d = min(decay, (1 + updates) / (10 + updates))`, where `updates` counts the updates done *before* this
    one (so the first update uses d = 0.1 and the EMA quickly forgets the initial weights). `updates` is
    incremented after each update.

    `module` is a deepcopy of the model taken at construction, in eval mode, with `requires_grad=False`.
    Create the EMA after the model is on its device and in its dtype/memory format; the per-tensor updates
    work across memory formats (e.g. a channels_last model), but not across devices or dtypes.
    A DistributedDataParallel wrapper is unwrapped (`.module`) both at construction and in `update`.
    No host synchronisation: the decay is a Python float.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.module: nn.Module = copy.deepcopy(_unwrap(model)).eval()
        self.module.requires_grad_(False)
        self.decay: float = float(decay)
        self.warmup: bool = bool(warmup)
        self.updates: int = 0

    def current_decay(self) -> float:
        """The decay the next `update` will use (see the class docstring for the warm-up formula)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current weights of `model` (same architecture as `module`) into the average."""
        d = self.current_decay()
        model_state = _unwrap(model).state_dict()
        ema_state = self.module.state_dict()
        if model_state.keys() != ema_state.keys():
            missing = sorted(ema_state.keys() - model_state.keys())[:5]
            extra = sorted(model_state.keys() - ema_state.keys())[:5]
            raise KeyError(f"model and EMA state_dict keys differ (missing {missing}, unexpected {extra})")
        ema_float: list[torch.Tensor] = []
        model_float: list[torch.Tensor] = []
        for key, ema_t in ema_state.items():
            src = model_state[key].detach()
            if ema_t.is_floating_point():
                ema_float.append(ema_t)
                model_float.append(src)
            else:
                ema_t.copy_(src)
        if ema_float:
            torch._foreach_mul_(ema_float, d)
            torch._foreach_add_(ema_float, model_float, alpha=1.0 - d)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        """`{"module": module.state_dict(), "updates": updates, "decay": decay}` (plus `warmup`)."""
        return {
            "module": self.module.state_dict(),
            "updates": self.updates,
            "decay": self.decay,
            "warmup": self.warmup,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the averaged weights and `updates`; `decay`/`warmup` too when present in `state`."""
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
        if "decay" in state:
            self.decay = float(state["decay"])
        if "warmup" in state:
            self.warmup = bool(state["warmup"])
