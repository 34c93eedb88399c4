"""Build each ROI's 3-class target mask (0 background, 1 this person, 2 any other person), and paste a
predicted one back onto the image's pixels.

Masks are built *after* geometric augmentation, with the same RoIAlign sampling the model uses to crop its
features, so the target of ROI i lines up pixel for pixel with what the head sees.
"""

from __future__ import annotations

import math

import torch
from torch.nn.functional import grid_sample
from torchvision.ops import roi_align

BACKGROUND, TARGET, OTHER = 0, 1, 2


def expand_rois(rois: torch.Tensor, margin: float) -> torch.Tensor:
    """Grow each box (the last 4 columns, x1 y1 x2 y2) by `margin` x its width/height on every side.

    The model crops its context window with this and the dataset builds the targets on the same window, so
    the two always agree. margin 0 returns `rois` unchanged.
    """
    if margin == 0:
        return rois
    x1, y1, x2, y2 = rois[..., -4], rois[..., -3], rois[..., -2], rois[..., -1]
    dx, dy = (x2 - x1) * margin, (y2 - y1) * margin
    grown = torch.stack([x1 - dx, y1 - dy, x2 + dx, y2 + dy], dim=-1)
    return torch.cat([rois[..., :-4], grown], dim=-1)


def build_roi_masks(
    instance_masks: torch.Tensor,
    boxes: torch.Tensor,
    mask_size: tuple[int, int],
    sampling_ratio: int = 2,
    margin: float = 0.0,
) -> torch.Tensor:
    """instance_masks bool/uint8 [K,H,W], boxes float [K,4] (x1,y1,x2,y2, pixels) -> uint8 [K,mask_h,mask_w].

    With `margin` > 0 each mask covers the box grown by `expand_rois` (the model's context window).

    One RoIAlign call over a single (K+1)-channel image (K instance channels + their union) crops every ROI;
    for ROI i we keep channel i (its own person) and the union channel (anyone). A crop value >= 0.5 counts
    as inside. Vectorised: no Python loop over ROIs.
    """
    k = instance_masks.shape[0]
    mask_h, mask_w = mask_size
    if k == 0:
        return torch.zeros((0, mask_h, mask_w), dtype=torch.uint8)
    masks = instance_masks.to(torch.float32)
    union = masks.amax(dim=0, keepdim=True)
    stacked = torch.cat([masks, union], dim=0).unsqueeze(0)  # [1, K+1, H, W]
    rois = torch.cat([torch.zeros((k, 1), dtype=torch.float32), boxes.to(torch.float32)], dim=1)
    rois = expand_rois(rois, margin)
    crops = roi_align(stacked, rois, (mask_h, mask_w), 1.0, sampling_ratio, aligned=True)  # [K, K+1, h, w]
    own = crops[torch.arange(k), torch.arange(k)] >= 0.5
    anyone = crops[:, k] >= 0.5
    out = torch.zeros((k, mask_h, mask_w), dtype=torch.uint8)
    out[anyone] = OTHER
    out[own] = TARGET
    return out


def window_pixel_region(window: torch.Tensor, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1): the pixels of an `image_size` (H, W) image whose centres lie inside `window`
    (x1 y1 x2 y2, continuous pixel coordinates: pixel i covers [i, i+1]); empty (x1 <= x0) if none do."""
    h, w = image_size
    wx1, wy1, wx2, wy2 = (float(v) for v in window)
    x0, y0 = max(0, math.ceil(wx1 - 0.5)), max(0, math.ceil(wy1 - 0.5))
    x1, y1 = min(w, math.floor(wx2 - 0.5) + 1), min(h, math.floor(wy2 - 0.5) + 1)
    return x0, y0, max(x0, x1), max(y0, y1)


def paste_roi_probabilities(
    probs: torch.Tensor, window: torch.Tensor, image_size: tuple[int, int]
) -> tuple[tuple[int, int, int, int], torch.Tensor]:
    """One ROI's class probabilities [C,mask_h,mask_w] over `window` -> the same classes on the image's
    pixel grid inside the window: ((x0, y0, x1, y1), float [C, y1-y0, x1-x0]).

    The inverse of the RoIAlign crop that builds targets (`build_roi_masks`, aligned=True): mask cell j spans
    [wx1 + j*bw, wx1 + (j+1)*bw], so each pixel centre is sampled bilinearly at its place in that grid
    (clamped to the edge cells). Pixels outside the window are left to the caller (the ROI says nothing
    there). Only the window's region is returned, so large images cost memory for the ROI alone.
    """
    x0, y0, x1, y1 = window_pixel_region(window, image_size)
    channels = probs.shape[0]
    if x1 <= x0 or y1 <= y0:
        return (x0, y0, x1, y1), probs.new_zeros((channels, max(0, y1 - y0), max(0, x1 - x0)))
    wx1, wy1, wx2, wy2 = (float(v) for v in window)
    xs = (torch.arange(x0, x1, dtype=torch.float32) + 0.5 - wx1) / (wx2 - wx1) * 2 - 1
    ys = (torch.arange(y0, y1, dtype=torch.float32) + 0.5 - wy1) / (wy2 - wy1) * 2 - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None]  # [1, rh, rw, (x, y)]
    pasted = grid_sample(
        probs[None].float(),
        grid.to(probs.device),
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )
    return (x0, y0, x1, y1), pasted[0]
