"""What differs between tasks (segmentation, classification, ...): one `TaskSpec` per `ExperimentConfig.task`.

`single_run.execute` does the same steps for every task (validate inputs, prepare the run directory,
train with the shared `Trainer`, export); the spec supplies the task's data, model, loss task, evaluator,
teacher checks and the metric that picks best_model.pth. A new task adds one entry to `TASK_SPECS`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kdlab.config.schema import ExperimentConfig
from kdlab.distill.ema import ModelEMA
from kdlab.distill.teacher import LoadedTeacher
from kdlab.errors import CheckpointError
from kdlab.models.builders import build_task_model

log = logging.getLogger(__name__)

KDParts = tuple[Any, torch.nn.Module | None, list[dict[str, Any]], ModelEMA | None]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    best_metric: str
    check_inputs: Callable[[ExperimentConfig], None]  # cheap checks of user paths (no parsing)
    build_datasets: Callable[[ExperimentConfig], tuple[Any, Any]]
    build_loader: Callable[..., Any]  # (dataset, batch_size, shuffle, seed, num_workers, pin_memory)
    build_evaluator: Callable[[ExperimentConfig, Any, torch.device, torch.dtype | None, bool], Any]
    plain_task: Callable[[ExperimentConfig], Any]
    build_kd_task: Callable[[ExperimentConfig, torch.nn.Module, list[LoadedTeacher], torch.device], KDParts]
    check_teacher: Callable[[ExperimentConfig, LoadedTeacher], None]
    summary_extra: Callable[[ExperimentConfig], dict[str, Any]]
    describe_model: Callable[[ExperimentConfig, torch.nn.Module], str]
    teacher_cache: CacheHooks | None = None  # None: training from a teacher cache is not implemented


@dataclass(frozen=True)
class CacheHooks:
    """What a task needs to train from a teacher cache (`kdlab.data.teacher_cache`)."""

    preprocessing: Callable[[ExperimentConfig], dict[str, Any]]
    fingerprints: Callable[[ExperimentConfig, Any, Any], dict[str, str]]  # (cfg, train_set, val_set)
    cached_train_set: Callable[[ExperimentConfig, Any, Any], Any]  # (cfg, train_set, CacheInfo)
    kd_task_class: Callable[[], Any]
    required_heads: Callable[[ExperimentConfig], list[str]]


def build_model_for(cfg: ExperimentConfig) -> torch.nn.Module:
    return build_task_model(cfg)


# ------------------------------------------------------------------------------------ segmentation
def _seg_check_inputs(cfg: ExperimentConfig) -> None:
    from kdlab.data.loaders import check_given_data_paths

    check_given_data_paths(cfg.data)


def _seg_datasets(cfg: ExperimentConfig) -> tuple[Any, Any]:
    from kdlab.data.loaders import build_datasets

    return build_datasets(cfg)


def _seg_loader(*args: Any, **kwargs: Any) -> Any:
    from kdlab.data.loaders import build_loader

    return build_loader(*args, **kwargs)


def _seg_evaluator(
    cfg: ExperimentConfig,
    val_loader: Any,
    device: torch.device,
    amp: torch.dtype | None,
    progress: bool,
    main_rank: bool = True,
) -> Any:
    """Under DDP only rank 0 shows a progress bar and collects pictures."""
    from kdlab.evaluate.evaluator import SegmentationEvaluator

    vis = cfg.training.num_vis_images if main_rank else 0
    return SegmentationEvaluator(
        val_loader, device, amp, cfg.training.channels_last, vis, progress and main_rank,
        roi_margin=cfg.model.roi_margin,
    )


def _seg_plain_task(cfg: ExperimentConfig) -> Any:
    from kdlab.engine.tasks import SegmentationTask

    return SegmentationTask(cfg.training.loss)


def _seg_kd_task(
    cfg: ExperimentConfig, model: torch.nn.Module, teachers: list[LoadedTeacher], device: torch.device
) -> KDParts:
    from kdlab.experiments.single_run import build_kd_task

    return build_kd_task(cfg, model, teachers, device)


def _seg_check_teacher(cfg: ExperimentConfig, t: LoadedTeacher) -> None:
    mask_size = list(t.config.get("model", {}).get("mask_size", []))
    if mask_size != list(cfg.model.mask_size):
        raise CheckpointError(
            f"teacher {t.path} predicts {mask_size} masks but the student's model.mask_size is "
            f"{list(cfg.model.mask_size)}; set model.mask_size to the teacher's"
        )
    margin = float(t.config.get("model", {}).get("roi_margin", 0.0))
    if margin != cfg.model.roi_margin:
        raise CheckpointError(
            f"teacher {t.path} predicts masks on boxes grown by roi_margin={margin} but the student's "
            f"model.roi_margin is {cfg.model.roi_margin}; set model.roi_margin to the teacher's"
        )


def _seg_summary(cfg: ExperimentConfig) -> dict[str, Any]:
    return {"encoder": cfg.model.encoder, "input_size": list(cfg.data.input_size)}


def _seg_describe(cfg: ExperimentConfig, model: torch.nn.Module) -> str:
    from kdlab.models.roi_unet import count_parameters

    return (
        f"{cfg.model.encoder} encoder, {count_parameters(model) / 1e6:.2f}M params "
        f"(UNet {count_parameters(model.unet) / 1e6:.2f}M, {cfg.model.head} head "
        f"{count_parameters(model.head) / 1e6:.3f}M)"
    )


def _seg_cached_train_set(cfg: ExperimentConfig, train_set: Any, info: Any) -> Any:
    from kdlab.data.teacher_cache import CachedPeopleDataset

    log.info(
        "training from teacher cache %s: horizontal flips are replayed on the cached logits, colour jitter "
        "applies to the student's input, random zoom/crop (data.augment.scale_range) is off: cached logits "
        "are for the letterbox view and a crop would change what the full-image UNet sees",
        info.path,
    )
    split = info.splits["train"]
    return CachedPeopleDataset(train_set, info.path, "train", split["indices"], info.heads, cfg.data.augment)


def _seg_fingerprints(cfg: ExperimentConfig, train_set: Any, val_set: Any) -> dict[str, str]:
    from kdlab.distill.cache import segmentation_fingerprints

    return segmentation_fingerprints(cfg, train_set, val_set)


def _seg_preprocessing(cfg: ExperimentConfig) -> dict[str, Any]:
    from kdlab.data.teacher_cache import segmentation_preprocessing

    return segmentation_preprocessing(cfg)


def _seg_required_heads(cfg: ExperimentConfig) -> list[str]:
    from kdlab.distill.kd_task import HEADS

    d = cfg.distillation
    weights = {
        "distill_final": d.final_weight,
        "distill_bg_fg": d.bg_fg_weight,
        "distill_target": d.target_weight,
    }
    heads = [key for name, key in HEADS if weights[name] > 0]
    return heads + (["logits"] if d.cwd_weight > 0 and "logits" not in heads else [])


def _seg_kd_class() -> Any:
    from kdlab.distill.kd_task import KDTask

    return KDTask


SEGMENTATION_CACHE = CacheHooks(
    _seg_preprocessing, _seg_fingerprints, _seg_cached_train_set, _seg_kd_class, _seg_required_heads
)


# ---------------------------------------------------------------------------------- classification
def _cls_check_inputs(cfg: ExperimentConfig) -> None:
    from kdlab.errors import ConfigError, DataError

    data = cfg.data.classification
    if data.source == "image_folder":
        if not data.root:
            raise ConfigError("data.classification.source=image_folder needs data.classification.root")
        from pathlib import Path

        if not Path(data.root).is_dir():
            raise DataError(f"data.classification.root directory {data.root} does not exist")


def _cls_datasets(cfg: ExperimentConfig) -> tuple[Any, Any]:
    from kdlab.data.classification import build_classification_datasets

    return build_classification_datasets(cfg)


def _cls_loader(*args: Any, **kwargs: Any) -> Any:
    from kdlab.data.classification import build_classification_loader

    return build_classification_loader(*args, **kwargs)


def _cls_evaluator(
    cfg: ExperimentConfig,
    val_loader: Any,
    device: torch.device,
    amp: torch.dtype | None,
    progress: bool,
    main_rank: bool = True,
) -> Any:
    from kdlab.evaluate.classification_evaluator import ClassificationEvaluator

    return ClassificationEvaluator(
        val_loader, device, cfg.model.num_classes, amp, cfg.training.channels_last, progress and main_rank
    )


def _cls_plain_task(cfg: ExperimentConfig) -> Any:
    from kdlab.engine.tasks import ClassificationTask

    return ClassificationTask(cfg.training.loss)


def _cls_kd_task(
    cfg: ExperimentConfig, model: torch.nn.Module, teachers: list[LoadedTeacher], device: torch.device
) -> KDParts:
    """The classifier KD parts (see `single_run.build_distillation`)."""
    from kdlab.distill.kd_classification import ClassificationKDTask
    from kdlab.experiments.single_run import build_distillation

    size = cfg.data.classification.image_size
    return build_distillation(
        cfg, model, teachers, device, ClassificationKDTask, (torch.rand(2, 3, size, size),)
    )


def _cls_check_teacher(cfg: ExperimentConfig, t: LoadedTeacher) -> None:
    classes = t.config.get("model", {}).get("num_classes")
    if classes != cfg.model.num_classes:
        raise CheckpointError(
            f"teacher {t.path} predicts {classes} classes but the student's model.num_classes is "
            f"{cfg.model.num_classes}"
        )


def _cls_summary(cfg: ExperimentConfig) -> dict[str, Any]:
    size = cfg.data.classification.image_size
    return {"model_name": cfg.model.name, "input_size": [size, size], "num_classes": cfg.model.num_classes}


def _cls_describe(cfg: ExperimentConfig, model: torch.nn.Module) -> str:
    params = sum(p.numel() for p in model.parameters())
    return f"timm {cfg.model.name}, {params / 1e6:.2f}M params, {cfg.model.num_classes} classes"


# ---------------------------------------------------------------------------------------- sequence
def _seq_check_inputs(cfg: ExperimentConfig) -> None:
    from kdlab.data.sequence import check_sequence_inputs

    check_sequence_inputs(cfg.data.sequence)


def _seq_datasets(cfg: ExperimentConfig) -> tuple[Any, Any]:
    from kdlab.data.sequence import build_sequence_datasets

    return build_sequence_datasets(cfg)


def _seq_loader(*args: Any, **kwargs: Any) -> Any:
    from kdlab.data.sequence import build_sequence_loader

    return build_sequence_loader(*args, **kwargs)


def _seq_evaluator(
    cfg: ExperimentConfig,
    val_loader: Any,
    device: torch.device,
    amp: torch.dtype | None,
    progress: bool,
    main_rank: bool = True,
) -> Any:
    from kdlab.evaluate.sequence_evaluator import SequenceEvaluator

    return SequenceEvaluator(val_loader, device, cfg.model.num_classes, amp, progress and main_rank)


def _seq_plain_task(cfg: ExperimentConfig) -> Any:
    from kdlab.engine.tasks import SequenceTask

    return SequenceTask(cfg.training.loss)


def _seq_kd_task(
    cfg: ExperimentConfig, model: torch.nn.Module, teachers: list[LoadedTeacher], device: torch.device
) -> KDParts:
    """The sequence KD parts (see `single_run.build_distillation`; no feature pairs for sequences)."""
    from kdlab.distill.kd_sequence import SequenceKDTask
    from kdlab.experiments.single_run import build_distillation

    data = cfg.data.sequence
    example = (torch.rand(2, data.seq_len, data.input_dim),)
    return build_distillation(cfg, model, teachers, device, SequenceKDTask, example)


def _seq_check_teacher(cfg: ExperimentConfig, t: LoadedTeacher) -> None:
    model = t.config.get("model", {})
    seq = t.config.get("data", {}).get("sequence", {})
    theirs = {"model.num_classes": model.get("num_classes"), "data.sequence.input_dim": seq.get("input_dim")}
    ours = {
        "model.num_classes": cfg.model.num_classes,
        "data.sequence.input_dim": cfg.data.sequence.input_dim,
    }
    for key, value in theirs.items():
        if value != ours[key]:
            raise CheckpointError(
                f"teacher {t.path} has {key}={value} but the student's {key} is {ours[key]}; they must match"
            )


def _seq_summary(cfg: ExperimentConfig) -> dict[str, Any]:
    return {"model_name": cfg.model.name, "hidden_size": cfg.model.hidden_size,
            "num_layers": cfg.model.num_layers, "input_dim": cfg.data.sequence.input_dim,
            "num_classes": cfg.model.num_classes}  # fmt: skip


def _seq_describe(cfg: ExperimentConfig, model: torch.nn.Module) -> str:
    params = sum(p.numel() for p in model.parameters())
    return (
        f"GRU hidden {cfg.model.hidden_size} x {cfg.model.num_layers} layer(s), {params / 1e3:.1f}k params, "
        f"{cfg.data.sequence.input_dim} inputs, {cfg.model.num_classes} classes"
    )


def _seq_cached_train_set(cfg: ExperimentConfig, train_set: Any, info: Any) -> Any:
    """The cache's train split as it was cached: inputs, class labels and the teacher trajectory."""
    import h5py

    from kdlab.data.sequence import SequenceDataset, SequenceSplit

    with h5py.File(info.path, "r") as fh:
        group = fh["train"]
        split = SequenceSplit(group["data"][()], group["class_labels"][()])
        trajectory = group["labels"][()]
    log.info("training from teacher cache %s: %d sequences with the teacher's %s trajectories", info.path,
             len(split.labels), "x".join(str(d) for d in trajectory.shape[1:]))  # fmt: skip
    return SequenceDataset(split, extra={"teacher_trajectory": trajectory})


def _seq_fingerprints(cfg: ExperimentConfig, train_set: Any, val_set: Any) -> dict[str, str]:
    from kdlab.distill.cache import sequence_fingerprint

    return {"train": sequence_fingerprint(train_set), "val": sequence_fingerprint(val_set)}


def _seq_preprocessing(cfg: ExperimentConfig) -> dict[str, Any]:
    from kdlab.distill.cache import sequence_preprocessing

    return sequence_preprocessing(cfg)


def _seq_kd_class() -> Any:
    from kdlab.distill.kd_sequence import SequenceKDTask

    return SequenceKDTask


SEQUENCE_CACHE = CacheHooks(
    _seq_preprocessing, _seq_fingerprints, _seq_cached_train_set, _seq_kd_class, lambda cfg: ["trajectory"]
)


TASK_SPECS: dict[str, TaskSpec] = {
    "segmentation": TaskSpec(
        "segmentation", "miou", _seg_check_inputs, _seg_datasets, _seg_loader, _seg_evaluator,
        _seg_plain_task, _seg_kd_task, _seg_check_teacher, _seg_summary, _seg_describe, SEGMENTATION_CACHE,
    ),
    "classification": TaskSpec(
        "classification", "top1", _cls_check_inputs, _cls_datasets, _cls_loader, _cls_evaluator,
        _cls_plain_task, _cls_kd_task, _cls_check_teacher, _cls_summary, _cls_describe,
    ),
    "sequence": TaskSpec(
        "sequence", "top1", _seq_check_inputs, _seq_datasets, _seq_loader, _seq_evaluator,
        _seq_plain_task, _seq_kd_task, _seq_check_teacher, _seq_summary, _seq_describe, SEQUENCE_CACHE,
    ),
}  # fmt: skip


def task_spec(cfg: ExperimentConfig) -> TaskSpec:
    return TASK_SPECS[cfg.task]


def check_teacher_task(cfg: ExperimentConfig, teacher: LoadedTeacher) -> None:
    """A teacher must have been trained for the student's task (a UNet cannot teach a classifier)."""
    teacher_task = teacher.config.get("task", "segmentation")
    if teacher_task != cfg.task:
        raise CheckpointError(
            f"teacher {teacher.path} is a {teacher_task} model but this experiment's task is {cfg.task}; "
            "use a teacher trained for the same task"
        )
    task_spec(cfg).check_teacher(cfg, teacher)
