"""What a task is, and the registry that finds one by name.

A task (people segmentation, classification, sequences) is one `TaskDefinition` subclass in its own file
under `kdlab.tasks`, registered with `@register_task`. It owns everything that differs between tasks:
input checks, datasets and loaders, the model builder and the teacher checks, the plain and KD losses,
the evaluator and the metric that picks best_model.pth, the pictures, the teacher-cache hooks, the ONNX
exporter (or none), and the report layout with the MAC count. Generic code asks the task (`task_of(cfg)`)
and never compares task names.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from kdlab.checkpoints import model_from_checkpoint as _model_from_checkpoint
from kdlab.config.schema import ExperimentConfig
from kdlab.distill.kd_base import KDTaskBase
from kdlab.distill.teacher import LoadedTeacher
from kdlab.distill.teacher import load_teacher as _load_teacher
from kdlab.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

DEFAULT_TASK = "segmentation"  # what a config or checkpoint written before tasks existed trained


@dataclass(frozen=True)
class CacheHooks:
    """What a task needs to train from a teacher cache (`kdlab.data.teacher_cache`, `kdlab.distill.cache`).

    `writer` generates the cache; the others check an existing one and read it back for training."""

    writer: Any
    fingerprints: Callable[[ExperimentConfig, Any, Any], dict[str, str]]  # (cfg, train_set, val_set)
    cached_train_set: Callable[[ExperimentConfig, Any, Any], Any]  # (cfg, train_set, CacheInfo)
    required_heads: Callable[[ExperimentConfig], list[str]]


class TaskDefinition:
    """One task's parts. Subclasses set the class attributes and implement the methods that raise here."""

    name: ClassVar[str]
    best_metric: ClassVar[str]  # the validation metric (higher is better) that picks best_model.pth
    kd_task_class: ClassVar[type[KDTaskBase]]
    cache: ClassVar[CacheHooks | None] = None  # None: training from a teacher cache is not implemented
    report_layout: ClassVar[Any]  # kdlab.evaluate.report_layout.ReportLayout

    # ------------------------------------------------------------------ inputs and data
    def check_inputs(self, cfg: ExperimentConfig) -> None:
        """Checks of the user's inputs before anything is written: paths (no parsing); the segmentation task also
        resolves and records its encoder weights."""

    def metric_names(self, cfg: ExperimentConfig) -> list[str]:
        """The validation metrics the task's evaluator reports (what training.monitor may name)."""
        return [self.best_metric]

    def build_datasets(self, cfg: ExperimentConfig) -> tuple[Any, Any]:
        raise NotImplementedError

    def build_test_dataset(self, cfg: ExperimentConfig) -> Any | None:
        """The held-out test split, viewed like validation, in a fixed order; None when none is configured.
        Validation picks the checkpoint (best, top k, early stopping, plateau); test only reports it."""
        return None

    def build_loader(self, dataset: Any, batch_size: int, **kwargs: Any) -> Any:
        """kwargs: shuffle, seed, num_workers, pin_memory, rank, world_size."""
        raise NotImplementedError

    # ------------------------------------------------------------------ model and teachers
    def build_model(self, cfg: ExperimentConfig) -> nn.Module:
        raise NotImplementedError

    def check_teacher(self, cfg: ExperimentConfig, teacher: LoadedTeacher) -> None:
        """A teacher of this task must also fit the student's outputs (classes, mask size, ...)."""

    def example_inputs(self, cfg: ExperimentConfig) -> tuple[torch.Tensor, ...]:
        """CPU inputs of one small batch: they size the feature adapters."""
        raise NotImplementedError

    # ------------------------------------------------------------------ losses, evaluation, pictures
    def plain_task(self, cfg: ExperimentConfig) -> Any:
        raise NotImplementedError

    def build_evaluator(
        self, cfg: ExperimentConfig, loader: Any, device: torch.device, amp: torch.dtype | None,
        progress: bool, main_rank: bool = True,
    ) -> Any:  # fmt: skip
        raise NotImplementedError

    def build_test_evaluator(
        self, cfg: ExperimentConfig, loader: Any, device: torch.device, amp: torch.dtype | None,
        progress: bool, main_rank: bool = True,
    ) -> Any:  # fmt: skip
        """The evaluator of the test pass: the validation evaluator without pictures (same metrics code, same
        sharding and reduction under DDP). A task whose evaluator keeps per-image sums turns them on here."""
        quiet = cfg.model_copy(update={"training": cfg.training.model_copy(update={"num_vis_images": 0})})
        return self.build_evaluator(quiet, loader, device, amp, progress, main_rank)

    def test_per_image(self, evaluator: Any) -> dict[str, Any] | None:
        """Per-image arrays of the last test pass (saved as logs/test_per_image.npz), or None: the task keeps
        none."""
        return None

    def write_pictures(self, vis: dict[str, Any], out_dir: Path) -> list[tuple[str, Any]]:
        """Draw the evaluator's picture data (none by default)."""
        return []

    def exporter(self) -> Any | None:
        """The task's ONNX exporter (`kdlab.export.interface.OnnxExporter`), or None: export not implemented.
        A method, so onnx and onnxruntime load only when something is exported."""
        return None

    # ------------------------------------------------------------------ what the run records
    def summary_extra(self, cfg: ExperimentConfig, model: nn.Module) -> dict[str, Any]:
        return {}

    def describe_model(self, cfg: ExperimentConfig, model: nn.Module) -> str:
        return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params"

    def count_macs(self, config: dict[str, Any]) -> float | None:
        """Multiply-accumulates per sample (GMACs) of the model a run's config.json describes; None if unknown."""
        return None


_TASKS: dict[str, TaskDefinition] = {}


def register_task(cls: type[TaskDefinition]) -> type[TaskDefinition]:
    """Class decorator: make the task findable by its `name` (one instance per task)."""
    if cls.name in _TASKS:
        raise RuntimeError(f"task {cls.name!r} is registered twice")
    _TASKS[cls.name] = cls()
    return cls


def task_names() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str) -> TaskDefinition:
    try:
        return _TASKS[name]
    except KeyError:
        raise ConfigError(f"task={name} is not a known task (known: {', '.join(task_names())})") from None


def task_of(config: ExperimentConfig | dict[str, Any] | None) -> TaskDefinition:
    """The task of a config (an `ExperimentConfig` or a config.json/checkpoint dict; none recorded: the
    default task, as configs written before there were other tasks)."""
    if isinstance(config, ExperimentConfig):
        return get_task(config.task)
    name = config.get("task") if isinstance(config, dict) else None
    return get_task(str(name) if name else DEFAULT_TASK)


def build_model(cfg: ExperimentConfig) -> nn.Module:
    """The model `cfg.task` trains."""
    return task_of(cfg).build_model(cfg)


def model_from_checkpoint(path: str | Path, label: str) -> tuple[nn.Module, ExperimentConfig, dict[str, Any]]:
    """The architecture a checkpoint's config describes (its own task's builder), weights loaded strictly."""
    return _model_from_checkpoint(path, label, build_model)


def load_teacher(
    path: str | Path,
    weight: float = 1.0,
    input_mean: tuple[float, float, float] | None = None,
    input_std: tuple[float, float, float] | None = None,
) -> LoadedTeacher:
    """A frozen teacher rebuilt from its checkpoint (its own task's model builder)."""
    return _load_teacher(path, build_model, weight, input_mean, input_std)


def check_teacher_fits(cfg: ExperimentConfig, teacher: LoadedTeacher) -> None:
    """A teacher must have been trained for the student's task (a UNet cannot teach a classifier) and fit
    the student's outputs."""
    check_teacher_task(cfg, teacher)
    task_of(cfg).check_teacher(cfg, teacher)


def check_teacher_task(cfg: ExperimentConfig, teacher: LoadedTeacher) -> None:
    """The teacher's checkpoint was trained for the student's task."""
    teacher_task = task_of(teacher.config).name
    if teacher_task != cfg.task:
        raise CheckpointError(
            f"teacher {teacher.path} is a {teacher_task} model but this experiment's task is {cfg.task}; "
            "use a teacher trained for the same task"
        )


def teacher_loader(cfg: ExperimentConfig) -> Callable[[Path], LoadedTeacher]:
    """Loads a .pth teacher with the configured input normalisation and checks its task (the cache
    generator's loader; its writer checks the rest)."""

    def load(path: Path) -> LoadedTeacher:
        d = cfg.distillation
        teacher = load_teacher(path, 1.0, d.teacher_input_mean, d.teacher_input_std)
        check_teacher_task(cfg, teacher)
        return teacher

    return load
