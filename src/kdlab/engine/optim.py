"""AdamW with decoupled weight decay (none on norms and biases) and the LR schedule: a linear warm-up in
front of cosine, step, plateau or constant."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from kdlab.config.schema import TrainingConfig


def build_optimizer(model: nn.Module, cfg: TrainingConfig, device: torch.device) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type == "cuda")


def warmup_cosine_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear 0->1 over `warmup_steps`, then cosine 1->min_lr_ratio at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps_for(cfg: TrainingConfig, total_steps: int, steps_per_epoch: int) -> int:
    return min(total_steps - 1, round(cfg.warmup_epochs * steps_per_epoch))


def schedule_factor(
    step: int, cfg: TrainingConfig, steps_per_epoch: int, warmup_steps: int, plateau_factor: float = 1.0
) -> float:
    """LR multiplier of the step/plateau/constant schedules: linear 0->1 over `warmup_steps`, then
    step: lr_gamma ** (completed epochs // lr_step_size), counted from the start of training;
    plateau: `plateau_factor` (the product of the reductions so far); constant: 1."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps * (plateau_factor if cfg.lr_schedule == "plateau" else 1.0)
    if cfg.lr_schedule == "step":
        return cfg.lr_gamma ** ((step // steps_per_epoch) // cfg.lr_step_size)
    if cfg.lr_schedule == "plateau":
        return plateau_factor
    return 1.0


def schedule_fn(
    cfg: TrainingConfig, steps_per_epoch: int, total_steps: int, warmup_steps: int,
    plateau_factor: Callable[[], float] = lambda: 1.0,
) -> Callable[[int], float]:  # fmt: skip
    """The LR multiplier by optimizer step; `plateau_factor` is read at every step (the plateau state)."""
    if cfg.lr_schedule == "cosine":
        return lambda step: warmup_cosine_factor(step, total_steps, warmup_steps, cfg.min_lr_ratio)
    return lambda step: schedule_factor(step, cfg, steps_per_epoch, warmup_steps, plateau_factor())


class StepLambdaLR(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR (one step per optimizer step) whose multiplier may change between two steps: the plateau
    factor drops after a validation, and the rate of the coming step must drop with it, not one step later.

    Its state is LambdaLR's (the same state_dict), so checkpoints and resumes are unchanged."""

    def apply_current_factor(self) -> list[float]:
        """Set every group's rate for the current step from the lambdas as they are now, as `step()` does for a
        new step but without advancing; `get_last_lr()` and the saved state report the new rates. Returns them."""
        for group, base, fn in zip(self.optimizer.param_groups, self.base_lrs, self.lr_lambdas, strict=True):
            group["lr"] = base * fn(self.last_epoch)
        # What LRScheduler.step records after setting the rates; it goes into state_dict (and last.pth).
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        return self.get_last_lr()


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainingConfig, steps_per_epoch: int,
    plateau_factor: Callable[[], float] = lambda: 1.0,
) -> StepLambdaLR:  # fmt: skip
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = warmup_steps_for(cfg, total, steps_per_epoch)
    return StepLambdaLR(optimizer, schedule_fn(cfg, steps_per_epoch, total, warmup, plateau_factor))


def extended_schedule(
    resume_step: int, factor_at_resume: float, new_total_steps: int, min_lr_ratio: float
) -> Callable[[int], float]:
    """LR multiplier for a run extended to more epochs: from its value at `resume_step`, cosine down to
    `min_lr_ratio` at the new total, so the rate never jumps back up when a finished run is continued."""
    span = max(1, new_total_steps - resume_step)

    def factor(step: int) -> float:
        progress = min(1.0, max(0.0, (step - resume_step) / span))
        return min_lr_ratio + (factor_at_resume - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
