"""Image classification: a timm classifier by `model.name` on the embedded digits or an image folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.config.schema import ExperimentConfig
from kdlab.distill.kd_classification import ClassificationKDTask
from kdlab.distill.teacher import LoadedTeacher
from kdlab.errors import CheckpointError, ConfigError, DataError
from kdlab.evaluate.macs import classifier_config_macs
from kdlab.evaluate.report_layout import CLASSIFICATION_LAYOUT
from kdlab.tasks.base import TaskDefinition, register_task


class ClassificationTask:
    """Plain supervised classification: cross-entropy (optional label smoothing) on the model's logits."""

    name = "classification"

    def __init__(self, cfg: Any) -> None:
        self.label_smoothing = cfg.label_smoothing

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        logits = model(batch["images"])
        ce = F.cross_entropy(logits.float(), batch["labels"], label_smoothing=self.label_smoothing)
        return {"loss": ce, "ce": ce}


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@register_task
class Classification(TaskDefinition):
    name = "classification"
    best_metric = "top1"
    report_layout = CLASSIFICATION_LAYOUT
    kd_task_class = ClassificationKDTask

    def metric_names(self, cfg: ExperimentConfig) -> list[str]:
        """ClassificationMetrics: top5 only with more than 5 classes."""
        return ["top1", *(["top5"] if cfg.model.num_classes > 5 else []), "ece", "loss"]

    def check_inputs(self, cfg: ExperimentConfig) -> None:
        data = cfg.data.classification
        if data.source == "image_folder":
            if not data.root:
                raise ConfigError("data.classification.source=image_folder needs data.classification.root")
            if not Path(data.root).is_dir():
                raise DataError(f"data.classification.root directory {data.root} does not exist")

    def build_datasets(self, cfg: ExperimentConfig) -> tuple[Any, Any]:
        from kdlab.data.classification import build_classification_datasets

        return build_classification_datasets(cfg)

    def build_test_dataset(self, cfg: ExperimentConfig) -> Any | None:
        from kdlab.data.classification import build_classification_test_dataset

        return build_classification_test_dataset(cfg)

    def build_loader(self, dataset: Any, batch_size: int, **kwargs: Any) -> Any:
        from kdlab.data.classification import build_classification_loader

        return build_classification_loader(dataset, batch_size, **kwargs)

    def build_model(self, cfg: ExperimentConfig) -> nn.Module:
        from kdlab.models.builders import build_classifier

        return build_classifier(cfg.model)

    def check_teacher(self, cfg: ExperimentConfig, teacher: LoadedTeacher) -> None:
        classes = teacher.config.get("model", {}).get("num_classes")
        if classes != cfg.model.num_classes:
            raise CheckpointError(
                f"teacher {teacher.path} predicts {classes} classes but the student's model.num_classes is "
                f"{cfg.model.num_classes}"
            )

    def example_inputs(self, cfg: ExperimentConfig) -> tuple[torch.Tensor, ...]:
        size = cfg.data.classification.image_size
        return (torch.rand(2, 3, size, size),)

    def plain_task(self, cfg: ExperimentConfig) -> Any:
        return ClassificationTask(cfg.training.loss)

    def build_evaluator(
        self, cfg: ExperimentConfig, loader: Any, device: torch.device, amp: torch.dtype | None,
        progress: bool, main_rank: bool = True,
    ) -> Any:  # fmt: skip
        from kdlab.evaluate.classification_evaluator import ClassificationEvaluator

        return ClassificationEvaluator(
            loader, device, cfg.model.num_classes, amp, cfg.training.channels_last, progress and main_rank
        )

    def summary_extra(self, cfg: ExperimentConfig, model: nn.Module) -> dict[str, Any]:
        size = cfg.data.classification.image_size
        return {"model_name": cfg.model.name, "input_size": [size, size], "num_classes": cfg.model.num_classes,
                "params": {"total": parameter_count(model), "unet": None, "roi_head": None}}  # fmt: skip

    def describe_model(self, cfg: ExperimentConfig, model: nn.Module) -> str:
        return f"timm {cfg.model.name}, {parameter_count(model) / 1e6:.2f}M params, {cfg.model.num_classes} classes"

    def count_macs(self, config: dict[str, Any]) -> float | None:
        return classifier_config_macs(config)

    def exporter(self) -> Any:
        from kdlab.export.classification import ClassificationExporter

        return ClassificationExporter()
