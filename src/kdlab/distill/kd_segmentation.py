"""People-segmentation distillation: `alpha · distill_total + (1 − alpha) · base_total` (see `kd_base`).

distill_total = final_weight · KD(logits) + bg_fg_weight · KD(bg/fg head) + target_weight · KD(target head)
              + cwd_weight · CWD(logits) + dist_weight · DIST(logits)
              + sum_i w_i · MSE(adapter_i(student feature_i), teacher feature_i)   (MGD pairs: masked, generated)
where KD is `T² · mean over ROIs and pixels of KL(p_teacher || softmax(student / T))` (see
`kdlab.distill.losses`), so alpha keeps the same meaning at any mask resolution; with
`logit_standardize` both sides' logits are standardised over the classes first
(`kdlab.distill.logit_standardization`). DIST is `kdlab.distill.dist` at its own temperature. With several
teachers the KD target p_teacher is their weighted mixture in probability space, and CWD and DIST are the
weighted means of the per-teacher terms. From a teacher cache the teacher's logits for the batch's ROIs
(flips replayed) come with the batch and no teacher runs.
"""

from __future__ import annotations

from typing import Any

import torch

from kdlab.data.teacher_cache import teacher_outputs_from_batch
from kdlab.distill.dist import dist_loss
from kdlab.distill.kd_base import KDTaskBase, Terms
from kdlab.distill.losses import cwd_loss, kd_kl_loss, mix_teacher_probs, teacher_probs
from kdlab.models.losses import SegmentationLossWeights, segmentation_loss

HEADS = (("distill_final", "logits"), ("distill_bg_fg", "bg_fg_logits"), ("distill_target", "target_logits"))


class SegmentationKDTask(KDTaskBase):
    """Distils one or more frozen ROI-UNet teachers (or the student's EMA, or a cache) into the student."""

    base_key = "base_total"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.base_weights = SegmentationLossWeights.from_config(self.loss_cfg)
        d = self.dcfg
        self.head_weights = {
            "distill_final": d.final_weight, "distill_bg_fg": d.bg_fg_weight, "distill_target": d.target_weight,
        }  # fmt: skip

    def inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        return batch["images"], batch["rois"]

    def teacher_outputs(self, batch: dict[str, Any]) -> list[tuple[Any, float]]:
        if not self.cached:
            return super().teacher_outputs(batch)
        outputs = teacher_outputs_from_batch(batch)
        if outputs is None:
            raise RuntimeError("KD from a teacher cache got a batch without cached teacher outputs")
        return [(outputs, 1.0)]

    def base_losses(self, student: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return segmentation_loss(student, batch["masks"], self.base_weights)

    def distill_terms(
        self, student: Any, teachers: list[tuple[Any, float]], batch: dict[str, Any], temperature: float
    ) -> Terms:
        weights = [w for _, w in teachers]
        d = self.dcfg
        terms: Terms = {}
        for name, key in HEADS:
            weight = self.head_weights[name]
            if weight <= 0:
                continue
            probs = [teacher_probs(self.kl_logits(out[key]), temperature) for out, _ in teachers]
            target = mix_teacher_probs(probs, weights)
            terms[name] = (kd_kl_loss(self.kl_logits(student[key]), target, temperature), weight)
        if d.cwd_weight > 0:
            cwd = sum(w * cwd_loss(student["logits"], out["logits"], temperature) for out, w in teachers)
            terms["distill_cwd"] = (cwd / sum(weights), d.cwd_weight)
        if d.dist_weight > 0:
            dist = sum(
                w * dist_loss(student["logits"], out["logits"], d.dist_temperature, d.dist_beta, d.dist_gamma)
                for out, w in teachers
            )
            terms["distill_dist"] = (dist / sum(weights), d.dist_weight)
        return terms


def required_cache_heads(dcfg: Any) -> list[str]:
    """The teacher heads a cache must hold for the configured distillation weights."""
    weights = {"distill_final": dcfg.final_weight, "distill_bg_fg": dcfg.bg_fg_weight,
               "distill_target": dcfg.target_weight}  # fmt: skip
    heads = [key for name, key in HEADS if weights[name] > 0]
    needs_logits = dcfg.cwd_weight > 0 or dcfg.dist_weight > 0
    return heads + (["logits"] if needs_logits and "logits" not in heads else [])
