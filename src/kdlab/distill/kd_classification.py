"""Classifier distillation: `alpha · T² · KL(p_teacher || softmax(s/T)) + (1 − alpha) · CE` (+ features).

The shared machinery is `kd_base`: teachers first under inference_mode (their input normalisation lives in
their own buffers, so each teacher sees the batch normalised its way), several teachers mix in
probability space, temperature and alpha follow their schedules, feature pairs go through
`FeatureDistiller` (weight 1 in the distillation part), every term is logged. With
`distillation.logit_standardize` both sides' logits are standardised over the classes before the KL.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kdlab.distill.kd_base import KDTaskBase, Terms
from kdlab.distill.losses import kd_kl_loss, mix_teacher_probs, teacher_probs


class ClassificationKDTask(KDTaskBase):
    """Distils one or more frozen classifier teachers (or the student's EMA) into a student classifier."""

    base_key = "ce"

    def inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        return (batch["images"],)

    def base_losses(self, student: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        smoothing = self.loss_cfg.label_smoothing
        return {"ce": F.cross_entropy(student.float(), batch["labels"].long(), label_smoothing=smoothing)}

    def distill_terms(
        self, student: Any, teachers: list[tuple[Any, float]], batch: dict[str, Any], temperature: float
    ) -> Terms:
        probs = [teacher_probs(self.kl_logits(t), temperature) for t, _ in teachers]
        target = mix_teacher_probs(probs, [w for _, w in teachers])
        return {"distill_kl": (kd_kl_loss(self.kl_logits(student), target, temperature), 1.0)}
