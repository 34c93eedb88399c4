"""The knowledge-distillation task: `alpha * distill_total + (1 - alpha) * base_total`.

distill_total = final_weight * KD(logits) + bg_fg_weight * KD(bg/fg head) + target_weight * KD(target head)
              + cwd_weight * CWD(logits) + sum_i w_i * MSE(adapter_i(student feature_i), teacher feature_i)
where KD is `T² · mean over ROIs and pixels of KL(p_teacher || softmax(student / T))` (see
`kdlab.distill.losses`), so alpha keeps the same meaning at any mask resolution. With several teachers
the target p_teacher is their weighted mixture in probability space. Temperature and alpha follow their
schedules over training progress. Every term is returned (and so logged) separately; every
`grad_share_every` steps the task also measures each term's share of the gradient norm.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdlab.config.schema import DistillationConfig, LossConfig
from kdlab.data.teacher_cache import teacher_outputs_from_batch
from kdlab.distill.losses import cwd_loss, kd_kl_loss, mix_teacher_probs, teacher_probs
from kdlab.distill.schedules import Schedule
from kdlab.distill.teacher import FrozenTeacher
from kdlab.models.losses import SegmentationLossWeights, segmentation_loss

HEADS = (("distill_final", "logits"), ("distill_bg_fg", "bg_fg_logits"), ("distill_target", "target_logits"))


def make_schedule(start: float, cfg: Any) -> Schedule:
    return Schedule(cfg.kind, start, start if cfg.end is None else cfg.end)


class KDTaskBase:
    """What every KD task shares: where training stands (schedules and the gradient-share interval read it)
    and the modules that train with the student without being part of it (feature adapters)."""

    name = "distillation"
    feature_distiller: Any | None = None
    progress = 0.0
    step = 0

    def set_progress(self, step: int, total_steps: int) -> None:
        self.step = step
        self.progress = step / max(1, total_steps)

    def trainable_modules(self) -> list[nn.Module]:
        return [self.feature_distiller] if self.feature_distiller is not None else []


class KDTask(KDTaskBase):
    """Distils one or more frozen teachers (or the student's EMA) into the student."""

    def __init__(
        self,
        dcfg: DistillationConfig,
        loss_cfg: LossConfig,
        teachers: list[tuple[FrozenTeacher, float]],
        feature_distiller: Any | None = None,
        cached: bool = False,
    ) -> None:
        if not teachers and not cached:
            raise ValueError("KDTask needs at least one teacher (or cached teacher outputs)")
        self.cached = cached
        self.dcfg = dcfg
        self.base_weights = SegmentationLossWeights.from_config(loss_cfg)
        self.teachers = teachers
        self.feature_distiller = feature_distiller
        self.temperature = make_schedule(dcfg.temperature, dcfg.temperature_schedule)
        self.alpha = make_schedule(dcfg.alpha, dcfg.alpha_schedule)
        self.head_weights = {
            "distill_final": dcfg.final_weight,
            "distill_bg_fg": dcfg.bg_fg_weight,
            "distill_target": dcfg.target_weight,
        }

    def current_values(self) -> dict[str, float]:
        return {
            "temperature": self.temperature.value(self.progress),
            "alpha": self.alpha.value(self.progress),
        }

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images, rois = batch["images"], batch["rois"]
        temperature = self.temperature.value(self.progress)
        alpha = self.alpha.value(self.progress)
        # Teachers first: their activations are freed before the student's autograd graph is built, so the
        # step's peak memory is max(teacher inference, student graph), not their sum. From a cache, the
        # teacher's logits for these ROIs (flips replayed) came with the batch and no teacher runs.
        teacher_outputs = (
            [(cached_teacher_outputs(batch), 1.0)]
            if self.cached
            else [(teacher(images, rois), weight) for teacher, weight in self.teachers]
        )
        student = model(images, rois)
        losses = segmentation_loss(student, batch["masks"], self.base_weights)
        weights = [w for _, w in teacher_outputs]
        terms: dict[str, tuple[torch.Tensor, float]] = {}
        for name, key in HEADS:
            weight = self.head_weights[name]
            if weight <= 0:
                continue
            target = mix_teacher_probs(
                [teacher_probs(out[key], temperature) for out, _ in teacher_outputs], weights
            )
            terms[name] = (kd_kl_loss(student[key], target, temperature), weight)
        if self.dcfg.cwd_weight > 0:
            total_w = sum(weights)
            cwd = sum(
                w * cwd_loss(student["logits"], out["logits"], temperature) for out, w in teacher_outputs
            )
            terms["distill_cwd"] = (cwd / total_w, self.dcfg.cwd_weight)
        if self.feature_distiller is not None:
            feat_total, feat_terms = self.feature_distiller.loss()
            for key, value in feat_terms.items():
                losses[key] = value
            terms["distill_features"] = (feat_total, 1.0)
        distill_total = sum(w * v for v, w in terms.values())
        if not terms:
            distill_total = student["logits"].sum() * 0
        total = alpha * distill_total + (1.0 - alpha) * losses["base_total"]
        for name, (value, _) in terms.items():
            losses[name] = value
        losses["distill_total"] = distill_total
        losses["total"] = total
        losses["loss"] = total
        losses["temperature"] = torch.tensor(temperature)
        losses["alpha"] = torch.tensor(alpha)
        every = self.dcfg.grad_share_every
        if every > 0 and self.step % every == 0 and torch.is_grad_enabled():
            contributions = {"base_total": (1.0 - alpha) * losses["base_total"]}
            contributions.update({name: alpha * w * v for name, (v, w) in terms.items()})
            losses.update(gradient_shares(contributions, [p for p in model.parameters() if p.requires_grad]))
        return losses


def cached_teacher_outputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The batch's cached teacher heads; a batch without them means the loader is not reading the cache."""
    outputs = teacher_outputs_from_batch(batch)
    if outputs is None:
        raise RuntimeError("KD from a teacher cache got a batch without cached teacher outputs")
    return outputs


def gradient_shares(terms: dict[str, torch.Tensor], params: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each term's gradient norm on `params` as a share of the sum of norms: `gradshare_<term>`.

    Costs one extra backward per term, so the task only does it every `grad_share_every` steps.
    """
    norms = {}
    for name, term in terms.items():
        if not term.requires_grad:
            norms[name] = torch.zeros((), device=term.device)
            continue
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        squares = [g.float().pow(2).sum() for g in grads if g is not None]
        norms[name] = torch.stack(squares).sum().sqrt() if squares else torch.zeros((), device=term.device)
    total = torch.stack(list(norms.values())).sum().clamp_min(1e-12)
    return {f"gradshare_{name}": norm / total for name, norm in norms.items()}
