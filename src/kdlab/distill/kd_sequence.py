"""Sequence distillation task: `alpha · traj_mse + (1 − alpha) · CE` on a GRU's output-state history.

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
from torch import nn

from kdlab.config.schema import DistillationConfig, LossConfig
from kdlab.distill.kd_task import KDTaskBase, gradient_shares, make_schedule
from kdlab.distill.losses import mix_teacher_trajectories, trajectory_kd_loss
from kdlab.distill.teacher import FrozenTeacher

CACHE_KEY = "teacher_trajectory"


class SequenceKDTask(KDTaskBase):
    """Distils frozen GRU teachers (or a cached teacher trajectory) into a student GRU."""

    def __init__(
        self,
        dcfg: DistillationConfig,
        loss_cfg: LossConfig,
        teachers: list[tuple[FrozenTeacher, float]],
        feature_distiller: Any | None = None,
        cached: bool = False,
    ) -> None:
        if feature_distiller is not None:
            raise ValueError("feature distillation is not implemented for task=sequence")
        self.dcfg = dcfg
        self.label_smoothing = loss_cfg.label_smoothing
        self.teachers = teachers
        self.cached = cached  # the trajectory comes with every batch (an offline teacher cache)
        self.alpha = make_schedule(dcfg.alpha, dcfg.alpha_schedule)

    def teacher_trajectory(self, batch: dict[str, Any]) -> torch.Tensor:
        """The cached trajectory when the batch has one, else the live teachers' weighted mean."""
        if CACHE_KEY in batch:
            return batch[CACHE_KEY]
        if self.cached:
            raise RuntimeError(f"KD from a teacher cache got a batch without '{CACHE_KEY}'")
        if not self.teachers:
            raise ValueError(f"SequenceKDTask has no teacher and the batch carries no '{CACHE_KEY}'")
        inputs = batch["inputs"]
        trajectories = [teacher(inputs)["trajectory"] for teacher, _ in self.teachers]
        return mix_teacher_trajectories(trajectories, [w for _, w in self.teachers])

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        alpha = self.alpha.value(self.progress)
        outputs = model(batch["inputs"])
        target = self.teacher_trajectory(batch)
        parts = trajectory_kd_loss(
            outputs["trajectory"], outputs["logits"], target, batch["labels"], alpha, self.label_smoothing
        )
        losses: dict[str, torch.Tensor] = {
            "traj_mse": parts["traj_mse"], "ce": parts["ce"], "distill_total": parts["traj_mse"],
            "total": parts["loss"], "loss": parts["loss"], "alpha": torch.tensor(alpha),
        }  # fmt: skip
        every = self.dcfg.grad_share_every
        if every > 0 and self.step % every == 0 and torch.is_grad_enabled():
            contributions = {"ce": (1.0 - alpha) * parts["ce"], "traj_mse": alpha * parts["traj_mse"]}
            losses.update(gradient_shares(contributions, [p for p in model.parameters() if p.requires_grad]))
        return losses
