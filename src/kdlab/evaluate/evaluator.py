"""Validation pass: metrics over a loader, plus predictions of the first few images for pictures."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from kdlab.data.roi_masks import expand_rois
from kdlab.engine import distributed
from kdlab.engine.batches import autocast_for
from kdlab.evaluate.loop import eval_batches
from kdlab.evaluate.metrics import SegmentationMetrics


class SegmentationEvaluator:
    """Runs the model in eval mode under `torch.inference_mode()`; metrics from `kdlab.evaluate.metrics`."""

    def __init__(
        self,
        loader: Any,
        device: torch.device,
        autocast_dtype: torch.dtype | None = None,
        channels_last: bool = False,
        num_vis_images: int = 0,
        show_progress: bool = True,
        roi_margin: float = 0.0,
    ) -> None:
        self.loader = loader
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.channels_last = channels_last
        self.num_vis_images = num_vis_images
        self.show_progress = show_progress
        self.roi_margin = roi_margin  # the head's window is the box grown by this (pictures crop it)
        # Under DDP each rank evaluates its shard and the sums are reduced; False for a pass that one rank runs
        # alone over the whole set (scoring an export), where the other ranks take no part in a collective.
        self.reduce_across_ranks = True

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast_for(self.device, self.autocast_dtype)

    def __call__(
        self, model: nn.Module, desc: str = "val"
    ) -> tuple[dict[str, float], dict[str, torch.Tensor] | None]:
        metrics, images_seen, vis_out = self.accumulate(model, desc)
        if self.reduce_across_ranks and distributed.current().enabled:  # each rank saw its shard: sum them
            state = {
                k: distributed.all_reduce_sum_(v.clone())
                for k, v in self.reduction_inputs(metrics, images_seen).items()
            }
            images_seen = int(state.pop("images")[0])
            metrics.load_state_tensors(state)
        result = metrics.compute()
        result["images"] = images_seen
        return result, vis_out

    def reduction_inputs(self, metrics: SegmentationMetrics, images_seen: int) -> dict[str, torch.Tensor]:
        """What the all-reduce sums over ranks: the metric sums and the image count, on this evaluator's device
        (the process group's: NCCL reduces only CUDA tensors), also for a rank whose shard held no ROI."""
        count = torch.full((1,), float(images_seen), dtype=torch.float64, device=self.device)
        return {**metrics.state_tensors(), "images": count}

    def accumulate(
        self, model: nn.Module, desc: str = "val"
    ) -> tuple[SegmentationMetrics, int, dict[str, torch.Tensor] | None]:
        """This process's pass over its loader: (metric sums on the device, images seen, picture data)."""
        metrics = SegmentationMetrics(device=self.device)
        vis: dict[str, list[torch.Tensor]] = {
            "images": [],
            "rois": [],
            "windows": [],
            "masks": [],
            "preds": [],
        }
        vis_count = 0
        images_seen = 0
        for raw, batch in eval_batches(
            model, self.loader, self.device, self.channels_last, desc, self.show_progress
        ):
            with self._autocast():
                outputs = model(batch["images"], batch["rois"])
            logits = outputs["logits"].float()
            metrics.update(logits, batch["masks"])
            images_seen += raw["images"].shape[0]
            if vis_count < self.num_vis_images:
                take = min(self.num_vis_images - vis_count, raw["images"].shape[0])
                sel = raw["rois"][:, 0] < take
                rois = raw["rois"][sel].clone()
                rois[:, 0] += vis_count
                vis["images"].append(raw["images"][:take])
                vis["rois"].append(rois)
                vis["windows"].append(expand_rois(rois, self.roi_margin))
                vis["masks"].append(raw["masks"][sel])
                vis["preds"].append(logits.argmax(1)[sel.to(logits.device)].to(torch.uint8).cpu())
                vis_count += take
        vis_out = {k: torch.cat(v) for k, v in vis.items()} if vis_count else None
        return metrics, images_seen, vis_out
