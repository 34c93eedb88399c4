"""Supervised segmentation losses for the hierarchical people-segmentation head.

The head predicts, per ROI, three sets of logits at mask resolution: combined 3-class logits
(0 background, 1 the ROI's own person "target", 2 other people), a background/foreground head and a
target/non-target head. Every loss here is computed in float32 and is graph-connected even for N = 0 ROIs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "SegmentationLossWeights", "boundary_band", "contour_target", "distance_transform_target",
    "instance_cue_losses", "segmentation_loss",
]  # fmt: skip

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
    # Instance cues (0 = off). distance / contour need the head's `distance` / `contour_logits` outputs.
    distance: float = 0.0  # MSE of sigmoid(distance) against the target's normalised distance transform
    contour: float = 0.0  # class-balanced BCE of contour_logits against the target's boundary pixels
    boundary_weight: float = (
        0.0  # CE pixel weight x (1 + boundary_weight) within boundary_width px of a label change
    )
    boundary_width: int = 2
    distance_max: int = 8  # distance transform cap, in mask pixels (the target is distance / distance_max)

    @classmethod
    def from_config(cls, cfg: Any) -> SegmentationLossWeights:
        """From a `LossConfig` (training.loss)."""
        return cls(
            ce=cfg.ce, dice=cfg.dice, bg_fg=cfg.bg_fg, target=cfg.target,
            class_weights=tuple(cfg.class_weights), distance=cfg.distance, contour=cfg.contour,
            boundary_weight=cfg.boundary_weight, boundary_width=cfg.boundary_width,
            distance_max=cfg.distance_max,
        )  # fmt: skip

    def __post_init__(self) -> None:
        if len(self.class_weights) != _NUM_CLASSES:
            raise ValueError(f"class_weights must have {_NUM_CLASSES} entries, got {len(self.class_weights)}")
        if any(w < 0 for w in self.class_weights) or sum(self.class_weights) <= 0:
            raise ValueError(f"class_weights must be >= 0 with a positive sum, got {self.class_weights}")
        if self.dice_smooth < 0:
            raise ValueError(f"dice_smooth must be >= 0, got {self.dice_smooth}")
        if self.boundary_width < 1 or self.distance_max < 1:
            raise ValueError("boundary_width and distance_max must be >= 1")


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


def _erode(mask: torch.Tensor) -> torch.Tensor:
    """3x3 binary erosion of float {0,1} maps [N,h,w]; the crop's edge is not a boundary (max-pool ignores
    its padding), so a person cut by the box edge keeps its distance there."""
    return -F.max_pool2d(-mask.unsqueeze(1), 3, stride=1, padding=1).squeeze(1)


def _dilate(mask: torch.Tensor, steps: int) -> torch.Tensor:
    """(2*steps+1)-square binary dilation of float {0,1} maps [N,h,w]."""
    if steps <= 0:
        return mask
    return F.max_pool2d(mask.unsqueeze(1), 2 * steps + 1, stride=1, padding=steps).squeeze(1)


def distance_transform_target(target: torch.Tensor, distance_max: int) -> torch.Tensor:
    """Normalised chessboard distance of each target pixel to the nearest non-target pixel, capped.

    target bool/float [N,h,w] -> float [N,h,w] in [0,1]: 0 outside the target, k/distance_max for a pixel
    that survives k-1 but not k 3x3 erosions (so 1/distance_max on the target's boundary), at most 1.
    Computed with `distance_max` max-pools: exact, on any device, no host round trip.
    """
    current = target.float()
    total = torch.zeros_like(current)
    for _ in range(distance_max):
        total = total + current
        current = _erode(current)
    return total / distance_max


def contour_target(target: torch.Tensor) -> torch.Tensor:
    """The target's inner boundary: target pixels with a non-target pixel among their 8 neighbours."""
    mask = target.float()
    return mask - _erode(mask)


def boundary_band(masks: torch.Tensor, width: int) -> torch.Tensor:
    """float [N,h,w]: 1 within `width` px (square) of a place where the 3-class label changes, else 0."""
    labels = masks.float()
    change = F.max_pool2d(labels.unsqueeze(1), 3, 1, 1) != -F.max_pool2d(-labels.unsqueeze(1), 3, 1, 1)
    return _dilate(change.squeeze(1).float(), width - 1)


def _weighted_ce(
    logits: torch.Tensor,
    masks: torch.Tensor,
    class_weights: tuple[float, ...],
    band: torch.Tensor | None = None,
    boundary_weight: float = 0.0,
) -> torch.Tensor:
    """Class-weighted CE, normalised by the summed pixel weights: sum_i w_i * nll_i / sum_i w_i.

    w_i = class_weights[y_i], times (1 + boundary_weight) where `band` is 1 (boundary-aware weighting).
    Without a band it equals `F.cross_entropy(logits, masks, weight=w)`, but builds the per-pixel weights from
    Python scalars (no weight tensor copied host->device each step) and gives a graph-connected 0 when there
    are no pixels.
    """
    nll = F.cross_entropy(logits, masks, reduction="none")  # [N,h,w]
    pixel_w = torch.zeros_like(nll)
    for cls, wc in enumerate(class_weights):
        pixel_w = pixel_w + (masks == cls).to(nll.dtype) * wc
    if band is not None:
        pixel_w = pixel_w * (1.0 + boundary_weight * band)
    return (pixel_w * nll).sum() / pixel_w.sum().clamp_min(torch.finfo(nll.dtype).tiny)


def _balanced_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean BCE over positive pixels + mean BCE over negative pixels); a missing side adds 0."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    pos = target > 0.5
    pos_term = torch.where(pos, bce, 0.0).sum() / pos.sum().clamp_min(1)
    neg_term = torch.where(pos, 0.0, bce).sum() / (~pos).sum().clamp_min(1)
    return 0.5 * (pos_term + neg_term)


def instance_cue_losses(
    outputs: dict[str, torch.Tensor], masks: torch.Tensor, weights: SegmentationLossWeights
) -> dict[str, torch.Tensor]:
    """The enabled instance-cue terms (float32, 0-dim), each over all pixels of all ROIs:

    - distance: mean over pixels of (sigmoid(outputs["distance"]) - distance_transform_target(masks == 1))^2;
    - contour: `_balanced_bce(outputs["contour_logits"], contour_target(masks == 1))`.
    """
    terms: dict[str, torch.Tensor] = {}
    target = masks == 1
    for name, key in (("distance", "distance"), ("contour", "contour_logits")):
        if getattr(weights, name) <= 0:
            continue
        if key not in outputs:
            raise ValueError(
                f"training.loss.{name} > 0 needs the head's {key!r} output; set model.instance_cues=true"
            )
        pred = outputs[key].float().squeeze(1)
        if name == "distance":
            goal = distance_transform_target(target, weights.distance_max)
            terms[name] = (pred.sigmoid() - goal).square().sum() / max(goal.numel(), 1)
        else:
            terms[name] = _balanced_bce(pred, contour_target(target))
    return terms


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
    - ce with boundary_weight > 0: pixel weights times (1 + boundary_weight) within boundary_width px of a
      label change (`boundary_band`), same normalisation by the summed weights.
    - distance / contour (when their weights are > 0): see `instance_cue_losses`.
    - base_total = w.ce*ce + w.dice*dice + w.bg_fg*bg_fg + w.target*target (+ w.distance*distance
      + w.contour*contour).
    With N = 0 ROIs every term is 0 but still connected to the graph, so backward() works. No host sync.
    """
    _check_shapes(outputs, masks)
    logits = outputs["logits"].float()
    bg_fg_logits = outputs["bg_fg_logits"].float()
    target_logits = outputs["target_logits"].float()
    masks = masks.long()
    n_rois = masks.shape[0]
    n_pixels = masks.numel()

    band = boundary_band(masks, weights.boundary_width) if weights.boundary_weight > 0 else None
    ce = _weighted_ce(logits, masks, weights.class_weights, band, weights.boundary_weight)

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
    cues = instance_cue_losses(outputs, masks, weights)
    for name, value in cues.items():
        base_total = base_total + getattr(weights, name) * value
    return {"ce": ce, "dice": dice, "bg_fg": bg_fg, "target": target, **cues, "base_total": base_total}
