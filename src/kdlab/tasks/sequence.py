"""Sequence classification: a GRU over [T, D] sequences; KD matches the teacher's output-state trajectory."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.config.schema import ExperimentConfig
from kdlab.distill.cache_sequence import SequenceCacheWriter, sequence_fingerprint
from kdlab.distill.kd_sequence import SequenceKDTask
from kdlab.distill.teacher import LoadedTeacher
from kdlab.errors import CheckpointError
from kdlab.evaluate.macs import sequence_config_macs
from kdlab.evaluate.report_layout import SEQUENCE_LAYOUT
from kdlab.tasks.base import CacheHooks, TaskDefinition, register_task

log = logging.getLogger(__name__)


class SequenceTask:
    """Plain supervised sequence classification: cross-entropy on the final logits (readout of h_T)."""

    name = "sequence"

    def __init__(self, cfg: Any) -> None:
        self.label_smoothing = cfg.label_smoothing

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        logits = model(batch["inputs"])["logits"]
        ce = F.cross_entropy(logits.float(), batch["labels"], label_smoothing=self.label_smoothing)
        return {"loss": ce, "ce": ce}


def _cached_train_set(cfg: ExperimentConfig, train_set: Any, info: Any) -> Any:
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


def _fingerprints(cfg: ExperimentConfig, train_set: Any, val_set: Any) -> dict[str, str]:
    return {"train": sequence_fingerprint(train_set), "val": sequence_fingerprint(val_set)}


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@register_task
class Sequence(TaskDefinition):
    name = "sequence"
    best_metric = "top1"
    report_layout = SEQUENCE_LAYOUT
    kd_task_class = SequenceKDTask
    cache = CacheHooks(SequenceCacheWriter(), _fingerprints, _cached_train_set, lambda cfg: ["trajectory"])

    def metric_names(self, cfg: ExperimentConfig) -> list[str]:
        """ClassificationMetrics: top5 only with more than 5 classes."""
        return ["top1", *(["top5"] if cfg.model.num_classes > 5 else []), "ece", "loss"]

    def check_inputs(self, cfg: ExperimentConfig) -> None:
        from kdlab.data.sequence import check_sequence_inputs

        check_sequence_inputs(cfg.data.sequence)

    def build_datasets(self, cfg: ExperimentConfig) -> tuple[Any, Any]:
        from kdlab.data.sequence import build_sequence_datasets

        return build_sequence_datasets(cfg)

    def build_test_dataset(self, cfg: ExperimentConfig) -> Any | None:
        from kdlab.data.sequence import build_sequence_test_dataset

        return build_sequence_test_dataset(cfg)

    def build_loader(self, dataset: Any, batch_size: int, **kwargs: Any) -> Any:
        from kdlab.data.sequence import build_sequence_loader

        return build_sequence_loader(dataset, batch_size, **kwargs)

    def build_model(self, cfg: ExperimentConfig) -> nn.Module:
        """The GRU; its input size is `data.sequence.input_dim` (checked against the data)."""
        from kdlab.models.sequence import GRUSequenceModel

        return GRUSequenceModel(cfg.model, cfg.data.sequence.input_dim)

    def check_teacher(self, cfg: ExperimentConfig, teacher: LoadedTeacher) -> None:
        model = teacher.config.get("model", {})
        seq = teacher.config.get("data", {}).get("sequence", {})
        theirs = {
            "model.num_classes": model.get("num_classes"),
            "data.sequence.input_dim": seq.get("input_dim"),
        }
        ours = {
            "model.num_classes": cfg.model.num_classes,
            "data.sequence.input_dim": cfg.data.sequence.input_dim,
        }
        for key, value in theirs.items():
            if value != ours[key]:
                raise CheckpointError(
                    f"teacher {teacher.path} has {key}={value} but the student's {key} is {ours[key]}; "
                    "they must match"
                )

    def example_inputs(self, cfg: ExperimentConfig) -> tuple[torch.Tensor, ...]:
        data = cfg.data.sequence
        return (torch.rand(2, data.seq_len, data.input_dim),)

    def plain_task(self, cfg: ExperimentConfig) -> Any:
        return SequenceTask(cfg.training.loss)

    def build_evaluator(
        self, cfg: ExperimentConfig, loader: Any, device: torch.device, amp: torch.dtype | None,
        progress: bool, main_rank: bool = True,
    ) -> Any:  # fmt: skip
        from kdlab.evaluate.sequence_evaluator import SequenceEvaluator

        return SequenceEvaluator(loader, device, cfg.model.num_classes, amp, progress and main_rank)

    def summary_extra(self, cfg: ExperimentConfig, model: nn.Module) -> dict[str, Any]:
        return {"model_name": cfg.model.name, "hidden_size": cfg.model.hidden_size,
                "num_layers": cfg.model.num_layers, "input_dim": cfg.data.sequence.input_dim,
                "num_classes": cfg.model.num_classes,
                "params": {"total": parameter_count(model), "unet": None, "roi_head": None}}  # fmt: skip

    def describe_model(self, cfg: ExperimentConfig, model: nn.Module) -> str:
        return (
            f"GRU hidden {cfg.model.hidden_size} x {cfg.model.num_layers} layer(s), "
            f"{parameter_count(model) / 1e3:.1f}k params, {cfg.data.sequence.input_dim} inputs, "
            f"{cfg.model.num_classes} classes"
        )

    def count_macs(self, config: dict[str, Any]) -> float | None:
        return sequence_config_macs(config)
