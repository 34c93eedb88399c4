"""Segmentation metrics: the one place where every reported metric is defined.

Pure tensor functions (confusion matrix, IoU, per-ROI IoU, boundary F1) plus `SegmentationMetrics`, an
accumulator whose running sums stay on the inputs' device so `update` never forces a host-device sync.
Class ids: 0 background, 1 the ROI's own person ("target"), 2 other people.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "CLASS_NAMES",
    "REPORTED_METRICS",
    "SegmentationMetrics",
    "boundary_f1",
    "confusion_matrix",
    "iou_from_confusion",
    "mask_boundary",
    "per_roi_class_counts",
    "per_roi_iou",
]

CLASS_NAMES = ("background", "target", "other")
# The headline and per-class numbers `SegmentationMetrics.compute()` reports (reports and tables use these).
REPORTED_METRICS = ("target_iou", "miou", *(f"iou_{name}" for name in CLASS_NAMES), "boundary_f1")


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int = 3) -> torch.Tensor:
    """Pixel confusion matrix, int64 [C,C], rows = ground truth, cols = prediction, over all given pixels.

    Counts with a scatter-add of the flat index gt*C + pred (a bincount with fixed length): unlike
    `torch.bincount`, it does not read the maximum back to the host on CUDA. Values must lie in [0, C).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    idx = target.reshape(-1).long() * num_classes + pred.reshape(-1).long()
    counts = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=idx.device)
    counts.scatter_add_(0, idx, torch.ones_like(idx))
    return counts.reshape(num_classes, num_classes)


def iou_from_confusion(cm: torch.Tensor) -> torch.Tensor:
    """Per-class IoU, float64 [C]: TP / (TP + FP + FN); NaN for a class absent from both gt and pred."""
    cm = cm.double()
    tp = cm.diagonal()
    union = cm.sum(dim=0) + cm.sum(dim=1) - tp
    return torch.where(union > 0, tp / union.clamp_min(1.0), torch.full_like(tp, math.nan))


def per_roi_class_counts(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """(intersection, union), int64 [N,C]: per ROI and class, TP and TP + FP + FN pixel counts of [N,h,w] maps.

    These are the confusion matrix's IoU terms split by ROI: summed over ROIs, intersection is its diagonal
    and union its column sum + row sum - diagonal, exactly (integer counts), so dataset-level IoU and mIoU
    can be recomputed from any regrouping of them (per image: a paired bootstrap over images).
    """
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(
            f"pred and target must both be [N,h,w], got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    classes = torch.arange(num_classes, device=pred.device).view(1, -1, 1, 1)
    p = pred.long().unsqueeze(1) == classes  # [N,C,h,w]
    g = target.long().unsqueeze(1) == classes
    intersection = (p & g).sum(dim=(2, 3))
    union = (p | g).sum(dim=(2, 3))
    return intersection, union


def per_roi_iou(pred: torch.Tensor, target: torch.Tensor, cls: int = 1) -> torch.Tensor:
    """IoU of class `cls` per ROI, float64 [N], for [N,h,w] label maps; 1.0 where the union is empty.

    An ROI where both gt and prediction lack the class is a perfect answer, hence 1.0 rather than NaN.
    """
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(
            f"pred and target must both be [N,h,w], got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    p = pred == cls
    g = target == cls
    inter = (p & g).sum(dim=(1, 2)).double()
    union = (p | g).sum(dim=(1, 2)).double()
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(union))


def mask_boundary(mask: torch.Tensor) -> torch.Tensor:
    """Inner boundary, bool [N,h,w]: mask pixels with at least one of their 8 neighbours outside the mask.

    8-neighbourhood (3x3 square erosion), matching the Chebyshev tolerance of `boundary_f1`; pixels beyond
    the image border count as outside, so a mask touching the border has its border pixels on the boundary.
    """
    if mask.ndim != 3:
        raise ValueError(f"mask must be [N,h,w], got shape {tuple(mask.shape)}")
    m = mask.bool()
    if m.numel() == 0:
        return m.clone()
    outside = F.pad((~m).float().unsqueeze(1), (1, 1, 1, 1), value=1.0)
    near_outside = F.max_pool2d(outside, kernel_size=3, stride=1).squeeze(1) > 0
    return m & near_outside


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Bool [N,h,w] dilation by a (2r+1)x(2r+1) square: pixels within Chebyshev distance r of a True pixel."""
    if radius == 0:
        return mask
    pooled = F.max_pool2d(mask.float().unsqueeze(1), kernel_size=2 * radius + 1, stride=1, padding=radius)
    return pooled.squeeze(1) > 0


def boundary_f1(pred: torch.Tensor, target: torch.Tensor, tolerance: int = 2) -> torch.Tensor:
    """Boundary F1 per ROI, float64 [N], of bool masks [N,h,w], with a Chebyshev `tolerance` in pixels.

    Precision = share of pred-boundary pixels within `tolerance` of a gt-boundary pixel, recall the reverse;
    F1 = 2PR/(P+R). Both boundaries empty -> 1.0; exactly one empty -> 0.0; P+R = 0 -> 0.0.
    """
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(
            f"pred and target must both be [N,h,w], got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    if pred.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64, device=pred.device)
    pb = mask_boundary(pred)
    tb = mask_boundary(target)
    n_pb = pb.sum(dim=(1, 2)).double()
    n_tb = tb.sum(dim=(1, 2)).double()
    precision = (pb & _dilate(tb, tolerance)).sum(dim=(1, 2)).double() / n_pb.clamp_min(1.0)
    recall = (tb & _dilate(pb, tolerance)).sum(dim=(1, 2)).double() / n_tb.clamp_min(1.0)
    pr = precision + recall
    f1 = torch.where(pr > 0, 2.0 * precision * recall / pr.clamp_min(1e-300), torch.zeros_like(pr))
    both_empty = (n_pb == 0) & (n_tb == 0)
    # exactly one empty already gives P = 0 or R = 0 with the other 0 too (nothing to match), hence F1 = 0
    return torch.where(both_empty, torch.ones_like(f1), f1)


class SegmentationMetrics:
    """Running segmentation metrics over ROIs; `update` keeps device-side sums, `compute` syncs once.

    Reports the dataset-level confusion-matrix metrics (per-class IoU, mIoU, pixel accuracy) and the per-ROI
    means of the class-1 IoU (`target_iou`, the headline metric) and of the class-1 boundary F1.
    """

    def __init__(
        self, num_classes: int = 3, boundary_tolerance: int = 2, device: torch.device | str | None = None
    ) -> None:
        """`device` sets where the sums start (default CPU); `update` moves them to its inputs' device."""
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (class 1 is the target), got {num_classes}")
        if boundary_tolerance < 0:
            raise ValueError(f"boundary_tolerance must be >= 0, got {boundary_tolerance}")
        self.num_classes = num_classes
        self.boundary_tolerance = boundary_tolerance
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self.reset()

    def reset(self) -> None:
        """Zero every running sum (on the current device)."""
        c, dev = self.num_classes, self._device
        self._confusion = torch.zeros(c, c, dtype=torch.int64, device=dev)
        self._roi_iou_sum = torch.zeros((), dtype=torch.float64, device=dev)
        self._boundary_f1_sum = torch.zeros((), dtype=torch.float64, device=dev)
        self._num_rois = torch.zeros((), dtype=torch.int64, device=dev)

    def _to(self, device: torch.device) -> None:
        """Move the running sums to `device` (a one-off copy when the inputs' device changes)."""
        if device == self._device:
            return
        self._device = device
        self._confusion = self._confusion.to(device)
        self._roi_iou_sum = self._roi_iou_sum.to(device)
        self._boundary_f1_sum = self._boundary_f1_sum.to(device)
        self._num_rois = self._num_rois.to(device)

    @torch.no_grad()
    def update(self, logits_or_pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: [N,C,h,w] logits (argmax taken) or [N,h,w] int predictions, with [N,h,w] int gt."""
        if logits_or_pred.ndim == 4:
            if logits_or_pred.shape[1] != self.num_classes:
                raise ValueError(
                    f"logits must have {self.num_classes} channels, got {logits_or_pred.shape[1]}"
                )
            pred = logits_or_pred.argmax(dim=1)
        elif logits_or_pred.ndim == 3:
            pred = logits_or_pred.long()
        else:
            raise ValueError(
                f"expected [N,C,h,w] logits or [N,h,w] predictions, got {tuple(logits_or_pred.shape)}"
            )
        if target.ndim != 3 or pred.shape != target.shape:
            raise ValueError(
                f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} must match [N,h,w]"
            )
        n = pred.shape[0]
        if n == 0:
            return
        self._to(pred.device)
        target = target.long()
        self._confusion += confusion_matrix(pred, target, self.num_classes)
        self._roi_iou_sum += per_roi_iou(pred, target, cls=1).sum()
        self._boundary_f1_sum += boundary_f1(pred == 1, target == 1, self.boundary_tolerance).sum()
        self._num_rois += n

    def compute(self) -> dict[str, float]:
        """Metrics over everything seen since `reset`; NaN values (and num_rois 0) when no ROI was seen.

        target_iou / boundary_f1: means over ROIs; iou_<class>: dataset-level confusion-matrix IoU (NaN for
        a class absent from gt and prediction); miou: mean of the non-NaN class IoUs; pixel_accuracy:
        correctly labelled pixels / all pixels.
        """
        cm = self._confusion.cpu()
        num_rois = int(self._num_rois.item())
        ious = iou_from_confusion(cm)
        total = int(cm.sum().item())
        nan = math.nan
        out: dict[str, float] = {
            "target_iou": float(self._roi_iou_sum.item()) / num_rois if num_rois else nan,
            "miou": float(torch.nanmean(ious).item()) if num_rois else nan,
            "boundary_f1": float(self._boundary_f1_sum.item()) / num_rois if num_rois else nan,
            "pixel_accuracy": float(cm.diagonal().sum().item()) / total if total else nan,
        }
        for i in range(self.num_classes):
            name = CLASS_NAMES[i] if i < len(CLASS_NAMES) else f"class{i}"
            out[f"iou_{name}"] = float(ious[i].item())
        out["num_rois"] = num_rois  # an int: the only non-float value
        return out

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The live running-sum tensors; all are additive, so an all-reduce SUM of each merges workers."""
        return {
            "confusion": self._confusion,
            "roi_iou_sum": self._roi_iou_sum,
            "boundary_f1_sum": self._boundary_f1_sum,
            "num_rois": self._num_rois,
        }

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the running sums with copies of `state` (as from `state_tensors`, e.g. reduced)."""
        current = self.state_tensors()
        if set(state) != set(current):
            raise ValueError(f"state keys must be {sorted(current)}, got {sorted(state)}")
        for key, ref in current.items():
            if tuple(state[key].shape) != tuple(ref.shape):
                raise ValueError(
                    f"state[{key!r}] must have shape {tuple(ref.shape)}, got {tuple(state[key].shape)}"
                )
        device = state["confusion"].device
        self._device = device
        self._confusion = state["confusion"].to(device=device, dtype=torch.int64).clone()
        self._roi_iou_sum = state["roi_iou_sum"].to(device=device, dtype=torch.float64).clone()
        self._boundary_f1_sum = state["boundary_f1_sum"].to(device=device, dtype=torch.float64).clone()
        self._num_rois = state["num_rois"].to(device=device, dtype=torch.int64).clone()
