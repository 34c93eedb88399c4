"""What every distillation task shares: `loss = alpha · distill_total + (1 − alpha) · base`.

distill_total = sum_k w_k · term_k over the task's weighted distillation terms (`distill_terms`) plus, with
feature pairs, `distill_features` (the weighted feature-MSE sum, weight 1). The base loss is the task's
plain supervised loss (`base_losses`, keyed `base_key`). Temperature and alpha follow their schedules over
training progress. The order is fixed here for every task: the teachers run first (under inference_mode),
so their activations are freed before the student's autograd graph is built and a step's peak memory is
max(teacher inference, student graph), not their sum. Every `grad_share_every` steps each contribution's
share of the student's gradient norm is logged as `gradshare_<term>`.

The feature adapters train with the student: `training_module(student)` puts them in one module with it,
applied inside its forward, which is what the trainer wraps in DDP (one gradient all-reduce for both).
A subclass supplies the inputs, the teacher outputs (live or from a cache), the base loss and the terms.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdlab.config.schema import DistillationConfig, LossConfig
from kdlab.distill.features import FeatureDistiller, unwrap_model
from kdlab.distill.logit_standardization import standardize_logits
from kdlab.distill.schedules import Schedule
from kdlab.distill.teacher import FrozenTeacher

Terms = dict[str, tuple[torch.Tensor, float]]  # name -> (value, weight in distill_total)
MIN_STANDARDIZED_CLASSES = 3  # logit_standardize leaves 2-class heads alone (see KDTaskBase.kl_logits)


def make_schedule(start: float, cfg: Any) -> Schedule:
    return Schedule(cfg.kind, start, start if cfg.end is None else cfg.end)


class StudentWithAdapters(nn.Module):
    """The module a distillation step trains: the student, and the feature adapters applied to its tapped
    features inside `forward` (the teacher, which ran first, fixes the target shapes)."""

    def __init__(self, student: nn.Module, distiller: FeatureDistiller) -> None:
        super().__init__()
        self.student = student
        self.distiller = distiller

    def forward(self, *inputs: torch.Tensor) -> Any:
        out = self.student(*inputs)
        self.distiller.adapt()
        return out


def student_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The trainable weights of the student inside `model` (DDP, compile and adapter wrappers removed)."""
    inner = unwrap_model(model)
    if isinstance(inner, StudentWithAdapters):
        inner = inner.student
    return [p for p in inner.parameters() if p.requires_grad]


class KDTaskBase:
    """The alpha mixing, the teacher-first order, the feature terms and the gradient shares of every KD task.

    Subclasses set `base_key` (the base loss' name in the loss dict) and implement `inputs`,
    `base_losses` and `distill_terms`; `teacher_outputs` runs the live teachers on `inputs(batch)` unless
    a subclass reads cached outputs from the batch."""

    name = "distillation"
    base_key = "base_total"
    uses_temperature = True  # False: the terms take no temperature and none is logged
    needs_teachers = True  # False: the batch may carry the teacher's outputs (an offline cache)
    progress = 0.0
    step = 0

    def __init__(
        self,
        dcfg: DistillationConfig,
        loss_cfg: LossConfig,
        teachers: list[tuple[FrozenTeacher, float]],
        feature_distiller: FeatureDistiller | None = None,
        cached: bool = False,
    ) -> None:
        if self.needs_teachers and not teachers and not cached:
            raise ValueError(f"{type(self).__name__} needs at least one teacher (or cached teacher outputs)")
        self.dcfg = dcfg
        self.loss_cfg = loss_cfg
        self.teachers = teachers
        self.feature_distiller = feature_distiller
        self.cached = cached
        self.temperature = make_schedule(dcfg.temperature, dcfg.temperature_schedule)
        self.alpha = make_schedule(dcfg.alpha, dcfg.alpha_schedule)

    # ------------------------------------------------------------------ what a task supplies
    def inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        """The model inputs in the batch (the same for student and teachers)."""
        raise NotImplementedError

    def teacher_outputs(self, batch: dict[str, Any]) -> list[tuple[Any, float]]:
        """(outputs, weight) per teacher: the live teachers run on the batch's inputs."""
        inputs = self.inputs(batch)
        return [(teacher(*inputs), weight) for teacher, weight in self.teachers]

    def base_losses(self, student: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The plain supervised loss and its components; `base_key` holds the total."""
        raise NotImplementedError

    def distill_terms(
        self, student: Any, teachers: list[tuple[Any, float]], batch: dict[str, Any], temperature: float
    ) -> Terms:
        """The weighted distillation terms of this task (not the feature terms)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared
    def kl_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """What a KL term softens: the logits, standardised over the classes with `logit_standardize` when
        there are at least 3 classes. A 2-class pair standardises to (−1, +1) whatever the teacher's
        confidence, with a gradient that grows as 1 / |z1 − z0| (at init on the quickstart the bg/fg head's
        KL gradient norm was 511 against 3.7 unstandardised), so 2-class heads keep the plain KL
        (`kdlab.distill.logit_standardization`)."""
        if self.dcfg.logit_standardize and logits.shape[1] >= MIN_STANDARDIZED_CLASSES:
            return standardize_logits(logits, dim=1)
        return logits

    def set_progress(self, step: int, total_steps: int) -> None:
        self.step = step
        self.progress = step / max(1, total_steps)

    def trainable_modules(self) -> list[nn.Module]:
        return [self.feature_distiller] if self.feature_distiller is not None else []

    def training_module(self, student: nn.Module) -> nn.Module:
        """What the trainer trains (and wraps in DDP): the student, with the adapters when there are any."""
        if self.feature_distiller is None:
            return student
        return StudentWithAdapters(student, self.feature_distiller)

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        temperature = self.temperature.value(self.progress)
        alpha = self.alpha.value(self.progress)
        teachers = self.teacher_outputs(batch)  # first: see the module docstring
        if self.feature_distiller is not None:
            self.feature_distiller.step = self.step  # seeds the MGD masks of this step
        student = model(*self.inputs(batch))
        losses = self.base_losses(student, batch)
        base = losses[self.base_key]
        terms = self.distill_terms(student, teachers, batch, temperature)
        if self.feature_distiller is not None:
            feat_total, feat_terms = self.feature_distiller.loss()
            losses.update(feat_terms)
            terms["distill_features"] = (feat_total, 1.0)
        distill_total = sum(w * v for v, w in terms.values()) if terms else base * 0
        total = alpha * distill_total + (1.0 - alpha) * base
        losses.update({name: value for name, (value, _) in terms.items()})
        losses.update({"distill_total": distill_total, "total": total, "loss": total})
        # Logged beside the losses, so on their device (the trainer stacks every term of a log interval), and
        # made by a fill, not a host-to-device copy, which would wait for the step's queued kernels.
        if self.uses_temperature:
            losses["temperature"] = total.new_full((), temperature, dtype=torch.float32)
        losses["alpha"] = total.new_full((), alpha, dtype=torch.float32)
        every = self.dcfg.grad_share_every
        if every > 0 and self.step % every == 0 and torch.is_grad_enabled():
            contributions = {self.base_key: (1.0 - alpha) * base}
            contributions.update({name: alpha * w * v for name, (v, w) in terms.items()})
            losses.update(gradient_shares(contributions, student_parameters(model)))
        return losses


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
