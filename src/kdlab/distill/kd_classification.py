"""Classifier distillation task: `alpha · T² · KL(p_teacher || softmax(s/T)) + (1 − alpha) · CE` (+ features).

The same machinery as the segmentation `KDTask`: frozen teachers run under inference_mode (their input
normalisation lives in their own buffers, so each teacher sees the batch normalised its way), several
teachers mix in probability space, temperature and alpha follow their schedules, feature pairs go through
`FeatureDistiller` hooks (added to the distillation part with weight 1), and every term is logged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdlab.config.schema import DistillationConfig, LossConfig
from kdlab.distill.kd_task import KDTaskBase, gradient_shares, make_schedule
from kdlab.distill.losses import kd_ce_loss, mix_teacher_probs, teacher_probs
from kdlab.distill.teacher import FrozenTeacher


class ClassificationKDTask(KDTaskBase):
    """Distils one or more frozen classifier teachers (or the student's EMA) into a student classifier."""

    def __init__(
        self,
        dcfg: DistillationConfig,
        loss_cfg: LossConfig,
        teachers: list[tuple[FrozenTeacher, float]],
        feature_distiller: Any | None = None,
    ) -> None:
        if not teachers:
            raise ValueError("ClassificationKDTask needs at least one teacher")
        self.dcfg = dcfg
        self.label_smoothing = loss_cfg.label_smoothing
        self.teachers = teachers
        self.feature_distiller = feature_distiller
        self.temperature = make_schedule(dcfg.temperature, dcfg.temperature_schedule)
        self.alpha = make_schedule(dcfg.alpha, dcfg.alpha_schedule)

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images, labels = batch["images"], batch["labels"]
        temperature = self.temperature.value(self.progress)
        alpha = self.alpha.value(self.progress)
        logits = model(images)
        outputs = [(teacher(images), weight) for teacher, weight in self.teachers]
        target = mix_teacher_probs(
            [teacher_probs(t, temperature) for t, _ in outputs], [w for _, w in outputs]
        )
        parts = kd_ce_loss(logits, target, labels, temperature, alpha, self.label_smoothing)
        losses: dict[str, torch.Tensor] = {"distill_kl": parts["distill_kl"], "ce": parts["ce"]}
        distill_total = parts["distill_kl"]
        if self.feature_distiller is not None:
            feat_total, feat_terms = self.feature_distiller.loss()
            losses.update(feat_terms)
            losses["distill_features"] = feat_total
            distill_total = distill_total + feat_total
        total = alpha * distill_total + (1.0 - alpha) * parts["ce"]
        losses.update(
            {"distill_total": distill_total, "total": total, "loss": total,
             "temperature": torch.tensor(temperature), "alpha": torch.tensor(alpha)}
        )  # fmt: skip
        every = self.dcfg.grad_share_every
        if every > 0 and self.step % every == 0 and torch.is_grad_enabled():
            contributions = {"ce": (1.0 - alpha) * parts["ce"], "distill_kl": alpha * parts["distill_kl"]}
            if "distill_features" in losses:
                contributions["distill_features"] = alpha * losses["distill_features"]
            losses.update(gradient_shares(contributions, [p for p in model.parameters() if p.requires_grad]))
        return losses
