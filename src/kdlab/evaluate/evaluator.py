"""Validation pass: metrics over a loader, plus predictions of the first few images for pictures."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from kdlab.data.roi_masks import expand_rois
from kdlab.engine import distributed
from kdlab.engine.batches import autocast_for
from kdlab.evaluate.loop import eval_batches
from kdlab.evaluate.metrics import CLASS_NAMES, SegmentationMetrics, per_roi_class_counts


@dataclass
class PerImageRows:
    """One process's per-image IoU terms, in the order its loader gave the images: dataset positions, image
    ids and int64 [B,C] intersection / union pixel counts (every ROI of the image summed).

    Exact for the confusion-matrix metrics (per-class IoU, mIoU): their totals are sums of these. Not kept:
    the per-ROI means (target_iou, boundary_f1 average over ROIs, so an image's share needs its ROI count
    too) and pixel accuracy (needs per-class ground-truth counts, which union alone does not give)."""

    positions: list[int] = field(default_factory=list)
    image_ids: list[Any] = field(default_factory=list)
    intersection: list[torch.Tensor] = field(default_factory=list)
    union: list[torch.Tensor] = field(default_factory=list)

    def add(self, raw: dict[str, Any], logits: torch.Tensor, masks: torch.Tensor, num_classes: int) -> None:
        """A batch's ROIs' counts, summed per image (`rois[:, 0]` is the ROI's image in the batch); the sums stay
        on the logits' device (no host sync per batch)."""
        inter, union = per_roi_class_counts(logits.argmax(1), masks, num_classes)
        image_of_roi = raw["rois"][:, 0].long().to(inter.device)
        per_image = inter.new_zeros(raw["images"].shape[0], num_classes)
        self.intersection.append(per_image.index_add(0, image_of_roi, inter))
        self.union.append(per_image.index_add(0, image_of_roi, union))
        self.positions.extend(int(i) for i in raw["indices"])
        self.image_ids.extend(raw["image_ids"])

    def on_cpu(self) -> PerImageRows:
        """The same rows with the counts on the host, as one tensor each (what travels between ranks)."""

        def cat(parts: list[torch.Tensor]) -> list[torch.Tensor]:
            return [torch.cat(parts).cpu()] if parts else []

        return PerImageRows(
            list(self.positions), list(self.image_ids), cat(self.intersection), cat(self.union)
        )

    def gathered(self) -> list[PerImageRows]:
        """Every rank's rows, on the host (under DDP by `all_gather_object`: 2 x C counts per image, small)."""
        import torch.distributed as dist

        mine = self.on_cpu()
        if not (dist.is_available() and dist.is_initialized()):
            return [mine]
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
        return parts


def per_image_arrays(parts: list[PerImageRows], num_images: int, num_classes: int) -> dict[str, np.ndarray]:
    """The rows of every rank placed at their dataset position: float64 [num_images, C] `intersection` and
    `union` (an image never seen, e.g. skipped as unreadable, is a row of zeros: it added nothing to the
    totals either), its `image_ids` and the `class_names`."""
    intersection = np.zeros((num_images, num_classes), dtype=np.float64)
    union = np.zeros((num_images, num_classes), dtype=np.float64)
    ids: list[Any] = [-1] * num_images
    for part in parts:
        if not part.positions:
            continue
        rows = np.asarray(part.positions, dtype=np.int64)
        intersection[rows] = torch.cat(part.intersection).cpu().numpy()
        union[rows] = torch.cat(part.union).cpu().numpy()
        for row, image_id in zip(part.positions, part.image_ids, strict=True):
            ids[row] = image_id
    try:
        image_ids = np.asarray([int(i) for i in ids], dtype=np.int64)
    except (TypeError, ValueError):  # COCO ids are ints; anything else is kept as text
        image_ids = np.asarray([str(i) for i in ids])
    names = [CLASS_NAMES[i] if i < len(CLASS_NAMES) else f"class{i}" for i in range(num_classes)]
    return {
        "intersection": intersection,
        "union": union,
        "image_ids": image_ids,
        "class_names": np.asarray(names),
    }


def check_per_image_totals(arrays: dict[str, np.ndarray], confusion: torch.Tensor) -> None:
    """The per-image sums must add up to the confusion matrix the reported IoUs come from (exact: integer
    counts below 2**53 in float64); a mismatch is a bug, never bad input."""
    cm = confusion.double().cpu().numpy()
    tp = np.diagonal(cm)
    if not (
        np.array_equal(arrays["intersection"].sum(axis=0), tp)
        and np.array_equal(arrays["union"].sum(axis=0), cm.sum(axis=0) + cm.sum(axis=1) - tp)
    ):
        raise RuntimeError("per-image intersection/union sums do not add up to the confusion matrix")


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
        # The held-out test pass also keeps every image's per-class intersection and union (a paired bootstrap
        # over images resamples them); after a call they are in `per_image`, in the dataset's order.
        self.collect_per_image = False
        self.per_image: dict[str, np.ndarray] | None = None
        self._rows: PerImageRows | None = None

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast_for(self.device, self.autocast_dtype)

    def __call__(
        self, model: nn.Module, desc: str = "val"
    ) -> tuple[dict[str, float], dict[str, torch.Tensor] | None]:
        self._rows = PerImageRows() if self.collect_per_image else None
        metrics, images_seen, vis_out = self.accumulate(model, desc)
        reduce = self.reduce_across_ranks and distributed.current().enabled
        if reduce:  # each rank saw its shard: sum them
            state = {
                k: distributed.all_reduce_sum_(v.clone())
                for k, v in self.reduction_inputs(metrics, images_seen).items()
            }
            images_seen = int(state.pop("images")[0])
            metrics.load_state_tensors(state)
        if self._rows is not None:
            parts = self._rows.gathered() if reduce else [self._rows.on_cpu()]
            self.per_image = per_image_arrays(parts, len(self.loader.dataset), metrics.num_classes)
            check_per_image_totals(self.per_image, metrics.state_tensors()["confusion"])
            self._rows = None
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
            if self._rows is not None:
                self._rows.add(raw, logits, batch["masks"], metrics.num_classes)
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
