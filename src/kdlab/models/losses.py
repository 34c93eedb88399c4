"""Supervised segmentation losses for the hierarchical people-segmentation head.

The head predicts, per ROI, three sets of logits at mask resolution: combined 3-class logits
(0 background, 1 the ROI's own person "target", 2 other people), a background/foreground head and a
target/non-target head. Every loss here is computed in float32 and is graph-connected even for N = 0 ROIs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["SegmentationLossWeights", "segmentation_loss"]

_NUM_CLASSES = 3


@dataclass(frozen=True)
class SegmentationLossWeights:
    """Weights of the terms of `base_total`, plus the CE class weights and the Dice smoothing constant."""

    ce: float = 1.0  # weighted CE on the 3-class logits
    dice: float = 1.0  # soft Dice on class 1 (target)
    bg_fg: float = 0.5  # CE on the bg/fg head
    target: float = 0.5  # CE on the target/non-target head, foreground pixels only
    class_weights: tuple[float, float, float] = (1.0, 2.0, 1.0)  # CE weights for classes 0, 1, 2
    dice_smooth: float = 1.0

    def __post_init__(self) -> None:
        if len(self.class_weights) != _NUM_CLASSES:
            raise ValueError(f"class_weights must have {_NUM_CLASSES} entries, got {len(self.class_weights)}")
        if any(w < 0 for w in self.class_weights) or sum(self.class_weights) <= 0:
            raise ValueError(f"class_weights must be >= 0 with a positive sum, got {self.class_weights}")
        if self.dice_smooth < 0:
            raise ValueError(f"dice_smooth must be >= 0, got {self.dice_smooth}")


def _check_shapes(outputs: dict[str, torch.Tensor], masks: torch.Tensor) -> None:
    """Raise ValueError unless the three heads and `masks` have the documented, mutually consistent shapes."""
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N,h,w], got shape {tuple(masks.shape)}")
    n, h, w = masks.shape
    expected = {
        "logits": (n, _NUM_CLASSES, h, w),
        "bg_fg_logits": (n, 2, h, w),
        "target_logits": (n, 2, h, w),
    }
    for key, shape in expected.items():
        if key not in outputs:
            raise ValueError(f"outputs is missing {key!r}")
        if tuple(outputs[key].shape) != shape:
            raise ValueError(f"outputs[{key!r}] must have shape {shape}, got {tuple(outputs[key].shape)}")


def _weighted_ce(logits: torch.Tensor, masks: torch.Tensor, class_weights: tuple[float, ...]) -> torch.Tensor:
    """Class-weighted CE, normalised by the summed pixel weights: sum_i w_{y_i} * nll_i / sum_i w_{y_i}.

    Equals `F.cross_entropy(logits, masks, weight=w)`, but builds the per-pixel weights from Python scalars
    (no weight tensor copied host->device each step) and gives a graph-connected 0 when there are no pixels.
    """
    nll = F.cross_entropy(logits, masks, reduction="none")  # [N,h,w]
    pixel_w = torch.zeros_like(nll)
    for cls, wc in enumerate(class_weights):
        pixel_w = pixel_w + (masks == cls).to(nll.dtype) * wc
    return (pixel_w * nll).sum() / pixel_w.sum().clamp_min(torch.finfo(nll.dtype).tiny)


def segmentation_loss(
    outputs: dict[str, torch.Tensor],
    masks: torch.Tensor,
    weights: SegmentationLossWeights = SegmentationLossWeights(),
) -> dict[str, torch.Tensor]:
    """Supervised loss of the three heads against `masks` ([N,h,w] int64 in {0,1,2}); all terms 0-dim float32.

    Normalisation (p = softmax of the head's logits, sums over pixels i of all ROIs unless stated):
    - ce: weighted mean over all pixels, sum_i w_{y_i} * (-log p_i[y_i]) / sum_i w_{y_i}, w = class_weights
      (same as `F.cross_entropy(logits, masks, weight=class_weights)`).
    - dice: per ROI 1 - (2*sum(p1*g1) + s) / (sum(p1) + sum(g1) + s), p1 = p[:,1], g1 = (masks == 1),
      s = dice_smooth, sums over that ROI's pixels; then the plain mean over ROIs (each ROI counts equally).
    - bg_fg: unweighted CE of bg_fg_logits against (masks > 0), mean over all pixels.
    - target: unweighted CE of target_logits against (masks == 2) (0 target, 1 non-target), mean over
      foreground pixels (masks > 0) only; 0 when there is no foreground pixel.
    - base_total = w.ce*ce + w.dice*dice + w.bg_fg*bg_fg + w.target*target.
    With N = 0 ROIs every term is 0 but still connected to the graph, so backward() works. No host sync.
    """
    _check_shapes(outputs, masks)
    logits = outputs["logits"].float()
    bg_fg_logits = outputs["bg_fg_logits"].float()
    target_logits = outputs["target_logits"].float()
    masks = masks.long()
    n_rois = masks.shape[0]
    n_pixels = masks.numel()

    ce = _weighted_ce(logits, masks, weights.class_weights)

    p1 = logits.softmax(dim=1)[:, 1]
    g1 = (masks == 1).float()
    inter = (p1 * g1).sum(dim=(1, 2))
    denom = p1.sum(dim=(1, 2)) + g1.sum(dim=(1, 2))
    dice_per_roi = 1.0 - (2.0 * inter + weights.dice_smooth) / (denom + weights.dice_smooth).clamp_min(
        torch.finfo(torch.float32).tiny
    )
    dice = dice_per_roi.sum() / max(n_rois, 1)

    fg = masks > 0
    bg_fg = F.cross_entropy(bg_fg_logits, fg.long(), reduction="none").sum() / max(n_pixels, 1)

    target_nll = F.cross_entropy(target_logits, (masks == 2).long(), reduction="none")
    # where (not multiply-by-mask) so a non-finite value at a background pixel cannot leak in as 0 * inf = NaN
    target = torch.where(fg, target_nll, 0.0).sum() / fg.sum().clamp_min(1)

    base_total = ce * weights.ce + dice * weights.dice + bg_fg * weights.bg_fg + target * weights.target
    return {"ce": ce, "dice": dice, "bg_fg": bg_fg, "target": target, "base_total": base_total}
