"""A distillation run's parts: the configured teachers (loaded strictly, checked against the student), the
KD task of the run's task, the model evaluated as "the teacher" before epoch 1, and the EMA."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from kdlab.config.schema import ExperimentConfig
from kdlab.distill.features import FeatureDistiller
from kdlab.distill.teacher import FrozenTeacher, LoadedTeacher
from kdlab.engine.compile import compile_forward
from kdlab.engine.ema import ModelEMA
from kdlab.errors import CheckpointError
from kdlab.tasks import TaskDefinition, check_teacher_fits, load_teacher

log = logging.getLogger(__name__)

KDParts = tuple[Any, torch.nn.Module | None, list[dict[str, Any]], ModelEMA | None]


def teacher_experiment_checkpoint(cfg: ExperimentConfig) -> Path:
    """Where `distillation.teacher_experiment`'s best model lives: <output_dir>/<name>/checkpoints/best_model.pth."""
    assert cfg.distillation.teacher_experiment
    return Path(cfg.output_dir) / cfg.distillation.teacher_experiment / "checkpoints" / "best_model.pth"


def load_teachers(cfg: ExperimentConfig) -> list[LoadedTeacher]:
    """Load every configured teacher strictly; each must fit the student's task (same task; for
    segmentation the same mask size, KD being per pixel; for classification the same class count)."""
    d = cfg.distillation
    specs = [(spec.checkpoint, spec.weight) for spec in d.teacher_specs()]
    if d.teacher_experiment and not d.teacher_checkpoint:
        specs.insert(0, (str(teacher_experiment_checkpoint(cfg)), 1.0))
    teachers = [
        load_teacher(path, weight, d.teacher_input_mean, d.teacher_input_std) for path, weight in specs
    ]
    for t in teachers:
        check_teacher_fits(cfg, t)
    return teachers


def check_teacher_unchanged(
    payload: dict[str, Any], teachers: list[LoadedTeacher], resume_path: Path | None, allow: bool
) -> None:
    """Refuse to resume a distillation run whose teacher file changed, unless the user allows it."""
    recorded = payload.get("teachers") or []
    for i, teacher in enumerate(teachers):
        before = recorded[i]["sha256"] if i < len(recorded) else None
        if before is not None and before != teacher.sha256:
            if allow:
                log.warning(
                    "teacher %s changed since the run started (--allow_teacher_change given)", teacher.path
                )
                continue
            raise CheckpointError(
                f"teacher {teacher.path} changed since {resume_path} was written (sha256 {before[:12]}... now "
                f"{teacher.sha256[:12]}...); pass --allow_teacher_change to resume with it anyway"
            )


def build_kd_task(
    cfg: ExperimentConfig, model: torch.nn.Module, teachers: list[LoadedTeacher], device: torch.device
) -> KDParts:
    """The KD parts of `cfg.task`: `kd_task_class(dcfg, loss_cfg, frozen teachers, feature distiller)`, the
    model evaluated as 'the teacher' before epoch 1, the teacher records and the EMA. The task's example
    inputs (CPU) size the feature adapters."""
    from kdlab.tasks import task_of

    task: TaskDefinition = task_of(cfg)
    example_inputs = task.example_inputs(cfg)
    d = cfg.distillation
    ema = ModelEMA(model, cfg.training.ema.decay) if cfg.training.ema.enabled else None
    if d.self_distillation:
        frozen = [(FrozenTeacher(ema.module), 1.0)]  # type: ignore[union-attr]
        eval_model = None
    else:
        frozen = [(t.teacher, t.weight) for t in teachers]
        eval_model = frozen[0][0] if d.evaluate_teacher and frozen else None
    distiller = None
    if d.features:  # sized by one dry pass on the CPU example inputs, before the teachers move to the device
        pairs = [(f.student, f.teacher, f.weight) for f in d.features]
        mgd = {i: f.mask_ratio for i, f in enumerate(d.features) if f.method == "mgd"}
        distiller = FeatureDistiller(model, frozen[0][0].model, pairs, mgd, seed=cfg.training.seed)
        distiller.infer_channels(model, frozen[0][0].model, *example_inputs)
    for teacher, _ in (
        frozen if not d.self_distillation else []
    ):  # the EMA teacher moves with the trainer's EMA
        teacher.to(device)
        if cfg.training.channels_last:  # the input is channels_last: no layout conversion at every conv
            teacher.to(memory_format=torch.channels_last)
        if cfg.training.compile:
            compile_forward(teacher.model, "teacher")
    records = [{"path": t.path, "sha256": t.sha256, "weight": t.weight} for t in teachers]
    return task.kd_task_class(d, cfg.training.loss, frozen, distiller), eval_model, records, ema
