"""People segmentation: the full-image UNet + RoIAlign + hierarchical ROI head on COCO-format people.

Everything task-specific lives here or is named here: data (`kdlab.data.loaders`), model
(`kdlab.models.roi_unet`), losses (`kdlab.models.losses`, `kdlab.distill.kd_segmentation`), evaluator and
pictures (`kdlab.evaluate`), teacher cache (`kdlab.distill.cache_segmentation`), ONNX export and report
layout. Best checkpoint: mIoU (target IoU alone favours checkpoints that never predict "other people").
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdlab.config.schema import ExperimentConfig
from kdlab.distill.cache_segmentation import SegmentationCacheWriter, segmentation_fingerprints
from kdlab.distill.kd_segmentation import SegmentationKDTask, required_cache_heads
from kdlab.distill.teacher import LoadedTeacher
from kdlab.errors import CheckpointError
from kdlab.evaluate.macs import segmentation_config_macs
from kdlab.evaluate.report_layout import SEGMENTATION_LAYOUT
from kdlab.models.losses import SegmentationLossWeights, segmentation_loss
from kdlab.tasks.base import CacheHooks, TaskDefinition, register_task

log = logging.getLogger(__name__)


class SegmentationTask:
    """Plain supervised training: the base segmentation loss on the model's outputs."""

    name = "segmentation"

    def __init__(self, cfg: Any) -> None:
        self.weights = SegmentationLossWeights.from_config(cfg)

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        outputs = model(batch["images"], batch["rois"])
        losses = segmentation_loss(outputs, batch["masks"], self.weights)
        losses["loss"] = losses["base_total"]
        return losses


def _cached_train_set(cfg: ExperimentConfig, train_set: Any, info: Any) -> Any:
    from kdlab.data.teacher_cache import CachedPeopleDataset

    log.info(
        "training from teacher cache %s: horizontal flips are replayed on the cached logits, colour jitter "
        "applies to the student's input, random zoom/crop (data.augment.scale_range) is off: cached logits "
        "are for the letterbox view and a crop would change what the full-image UNet sees",
        info.path,
    )
    split = info.splits["train"]
    return CachedPeopleDataset(train_set, info.path, "train", split["indices"], info.heads, cfg.data.augment)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@register_task
class Segmentation(TaskDefinition):
    name = "segmentation"
    best_metric = "miou"
    report_layout = SEGMENTATION_LAYOUT
    kd_task_class = SegmentationKDTask
    cache = CacheHooks(
        SegmentationCacheWriter(), segmentation_fingerprints, _cached_train_set,
        lambda cfg: required_cache_heads(cfg.distillation),
    )  # fmt: skip

    def metric_names(self, cfg: ExperimentConfig) -> list[str]:
        from kdlab.evaluate.metrics import CLASS_NAMES

        return ["target_iou", "miou", "boundary_f1", "pixel_accuracy", *(f"iou_{n}" for n in CLASS_NAMES)]

    def check_inputs(self, cfg: ExperimentConfig) -> None:
        """Data paths, and `model.encoder_weights`: smp's named weights are fetched into its cache now (offline:
        one error line), a file must be readable; where they came from goes into the run's config
        (`model.encoder_weights_source`, saved in config.json and every checkpoint)."""
        from kdlab.data.loaders import check_given_data_paths
        from kdlab.models.encoder_weights import resolve_encoder_weights

        check_given_data_paths(cfg.data)
        cfg.model.encoder_weights_source = resolve_encoder_weights(cfg.model)

    def build_datasets(self, cfg: ExperimentConfig) -> tuple[Any, Any]:
        from kdlab.data.loaders import build_datasets

        return build_datasets(cfg)

    def build_test_dataset(self, cfg: ExperimentConfig) -> Any | None:
        from kdlab.data.loaders import build_test_dataset

        return build_test_dataset(cfg)

    def build_loader(self, dataset: Any, batch_size: int, **kwargs: Any) -> Any:
        from kdlab.data.loaders import build_loader

        return build_loader(dataset, batch_size, **kwargs)

    def build_model(self, cfg: ExperimentConfig) -> nn.Module:
        from kdlab.models.builders import build_model

        return build_model(cfg.model)

    def check_teacher(self, cfg: ExperimentConfig, teacher: LoadedTeacher) -> None:
        model = teacher.config.get("model", {})
        mask_size = list(model.get("mask_size", []))
        if mask_size != list(cfg.model.mask_size):
            raise CheckpointError(
                f"teacher {teacher.path} predicts {mask_size} masks but the student's model.mask_size is "
                f"{list(cfg.model.mask_size)}; set model.mask_size to the teacher's"
            )
        margin = float(model.get("roi_margin", 0.0))
        if margin != cfg.model.roi_margin:
            raise CheckpointError(
                f"teacher {teacher.path} predicts masks on boxes grown by roi_margin={margin} but the student's "
                f"model.roi_margin is {cfg.model.roi_margin}; set model.roi_margin to the teacher's"
            )

    def example_inputs(self, cfg: ExperimentConfig) -> tuple[torch.Tensor, ...]:
        h, w = cfg.data.input_size
        return torch.rand(1, 3, h, w), torch.tensor([[0.0, 0.0, 0.0, float(w), float(h)]])

    def plain_task(self, cfg: ExperimentConfig) -> Any:
        return SegmentationTask(cfg.training.loss)

    def build_evaluator(
        self, cfg: ExperimentConfig, loader: Any, device: torch.device, amp: torch.dtype | None,
        progress: bool, main_rank: bool = True,
    ) -> Any:  # fmt: skip
        """Under DDP only rank 0 shows a progress bar and collects pictures."""
        from kdlab.evaluate.evaluator import SegmentationEvaluator

        vis = cfg.training.num_vis_images if main_rank else 0
        return SegmentationEvaluator(
            loader, device, amp, cfg.training.channels_last, vis, progress and main_rank,
            roi_margin=cfg.model.roi_margin,
        )  # fmt: skip

    def build_test_evaluator(
        self, cfg: ExperimentConfig, loader: Any, device: torch.device, amp: torch.dtype | None,
        progress: bool, main_rank: bool = True,
    ) -> Any:  # fmt: skip
        """The validation evaluator without pictures, also keeping every test image's per-class intersection
        and union (what the dataset-level IoUs sum), for a paired bootstrap over images."""
        evaluator = super().build_test_evaluator(cfg, loader, device, amp, progress, main_rank)
        evaluator.collect_per_image = True
        return evaluator

    def test_per_image(self, evaluator: Any) -> dict[str, Any] | None:
        return evaluator.per_image

    def write_pictures(self, vis: dict[str, Any], out_dir: Path) -> list[tuple[str, Any]]:
        from kdlab.evaluate.roi_pictures import save_visualizations

        return save_visualizations(vis, out_dir)

    def summary_extra(self, cfg: ExperimentConfig, model: nn.Module) -> dict[str, Any]:
        return {
            "encoder": cfg.model.encoder,
            "input_size": list(cfg.data.input_size),
            "params": {"total": count_parameters(model), "unet": count_parameters(model.unet),
                       "roi_head": count_parameters(model.head)},
        }  # fmt: skip

    def describe_model(self, cfg: ExperimentConfig, model: nn.Module) -> str:
        return (
            f"{cfg.model.encoder} encoder, {count_parameters(model) / 1e6:.2f}M params "
            f"(UNet {count_parameters(model.unet) / 1e6:.2f}M, {cfg.model.head} head "
            f"{count_parameters(model.head) / 1e6:.3f}M)"
        )

    def count_macs(self, config: dict[str, Any]) -> float | None:
        return segmentation_config_macs(config)

    def exporter(self) -> Any:
        from kdlab.export.segmentation import SegmentationExporter

        return SegmentationExporter()
