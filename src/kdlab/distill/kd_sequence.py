"""Sequence distillation: `alpha · traj_mse + (1 − alpha) · CE` on a GRU's output-state history.

traj_mse (see `kdlab.distill.losses.trajectory_mse_loss`) is the mean over batch, all T+1 time steps (t = 0
is the readout of the learnable initial state) and the C outputs of (student_traj − teacher_traj)²; CE is
the batch mean on the final logits. The teacher trajectory is `batch["teacher_trajectory"]` when the batch
carries one (an offline teacher-output cache: no teacher runs, `teachers` may be empty), else the weighted
mean (weights normalised) of the live frozen teachers' trajectories. Temperature is unused: trajectories
are matched as raw outputs, not softened distributions. Alpha follows `distillation.alpha_schedule`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kdlab.distill.kd_base import KDTaskBase, Terms
from kdlab.distill.losses import mix_teacher_trajectories, trajectory_mse_loss

CACHE_KEY = "teacher_trajectory"


class SequenceKDTask(KDTaskBase):
    """Distils frozen GRU teachers (or a cached teacher trajectory) into a student GRU."""

    base_key = "ce"
    uses_temperature = False
    needs_teachers = False  # the batch may carry the trajectory

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.feature_distiller is not None:
            raise ValueError("feature distillation is not implemented for task=sequence")

    def inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        return (batch["inputs"],)

    def teacher_outputs(self, batch: dict[str, Any]) -> list[tuple[Any, float]]:
        """The cached trajectory when the batch has one, else the live teachers' weighted mean."""
        if CACHE_KEY in batch:
            return [(batch[CACHE_KEY], 1.0)]
        if self.cached:
            raise RuntimeError(f"KD from a teacher cache got a batch without '{CACHE_KEY}'")
        if not self.teachers:
            raise ValueError(f"SequenceKDTask has no teacher and the batch carries no '{CACHE_KEY}'")
        trajectories = [out["trajectory"] for out, _ in super().teacher_outputs(batch)]
        return [(mix_teacher_trajectories(trajectories, [w for _, w in self.teachers]), 1.0)]

    def base_losses(self, student: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        smoothing = self.loss_cfg.label_smoothing
        ce = F.cross_entropy(student["logits"].float(), batch["labels"].long(), label_smoothing=smoothing)
        return {"ce": ce}

    def distill_terms(
        self, student: Any, teachers: list[tuple[Any, float]], batch: dict[str, Any], temperature: float
    ) -> Terms:
        return {"traj_mse": (trajectory_mse_loss(student["trajectory"], teachers[0][0]), 1.0)}
