"""Joint image / box / instance-mask transforms (torchvision.transforms.v2 functional ops on tv_tensors).

Random parameters come from an explicit `torch.Generator` seeded per sample, so augmentation does not
depend on worker processes or global RNG state: a resumed run sees exactly the same augmentations.
Geometry: letterbox-fit the image into the input size, zoom by a random factor, random crop/pad to the
input size, random horizontal flip. Photometric: brightness, contrast, saturation, hue (image only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from kdlab.config.schema import AugmentConfig


@dataclass
class Sample:
    """An image (uint8 [3,H,W]), its person boxes (float [K,4] xyxy) and instance masks (bool [K,H,W])."""

    image: torch.Tensor
    boxes: torch.Tensor
    masks: torch.Tensor


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=gen).item()


def horizontal_flip(sample: Sample) -> Sample:
    """Mirror image, boxes and masks left-right."""
    h, w = sample.image.shape[-2:]
    boxes = tv_tensors.BoundingBoxes(sample.boxes, format="XYXY", canvas_size=(h, w))
    return Sample(
        image=F.horizontal_flip(sample.image),
        boxes=F.horizontal_flip(boxes).as_subclass(torch.Tensor),
        masks=F.horizontal_flip(tv_tensors.Mask(sample.masks)).as_subclass(torch.Tensor),
    )


def fit_crop(sample: Sample, input_size: tuple[int, int], zoom: float, offset: tuple[float, float]) -> Sample:
    """Resize so the image fits `input_size` (aspect kept) times `zoom`, then crop/pad to `input_size`.

    `offset` in [0,1]^2 chooses where the window sits inside the slack (0.5, 0.5 = centred); where the
    resized image is smaller than the input it is padded with zeros.
    """
    in_h, in_w = input_size
    h, w = sample.image.shape[-2:]
    scale = min(in_h / h, in_w / w) * zoom
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    boxes = tv_tensors.BoundingBoxes(sample.boxes, format="XYXY", canvas_size=(h, w))
    masks = tv_tensors.Mask(sample.masks.to(torch.uint8))
    image = F.resize(sample.image, [new_h, new_w], antialias=True)
    boxes = F.resize(boxes, [new_h, new_w])
    masks = F.resize(masks, [new_h, new_w], interpolation=F.InterpolationMode.NEAREST)
    top = math.floor((new_h - in_h) * offset[0]) if new_h >= in_h else -math.floor((in_h - new_h) * offset[0])
    left = (
        math.floor((new_w - in_w) * offset[1]) if new_w >= in_w else -math.floor((in_w - new_w) * offset[1])
    )
    image = F.crop(image, top, left, in_h, in_w)
    boxes = F.crop(boxes, top, left, in_h, in_w)
    masks = F.crop(masks, top, left, in_h, in_w)
    return Sample(
        image=image,
        boxes=boxes.as_subclass(torch.Tensor).to(torch.float32),
        masks=masks.as_subclass(torch.Tensor).bool(),
    )


def color_jitter(image: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    if cfg.brightness > 0:
        image = F.adjust_brightness(image, _uniform(gen, 1 - cfg.brightness, 1 + cfg.brightness))
    if cfg.contrast > 0:
        image = F.adjust_contrast(image, _uniform(gen, 1 - cfg.contrast, 1 + cfg.contrast))
    if cfg.saturation > 0:
        image = F.adjust_saturation(image, _uniform(gen, 1 - cfg.saturation, 1 + cfg.saturation))
    if cfg.hue > 0:
        image = F.adjust_hue(image, _uniform(gen, -cfg.hue, cfg.hue))
    return image


def drop_lost_instances(sample: Sample, min_size: float = 2.0) -> Sample:
    """Drop people whose box shrank below `min_size` px or whose mask left the frame after a crop."""
    if sample.boxes.shape[0] == 0:
        return sample
    wh = sample.boxes[:, 2:] - sample.boxes[:, :2]
    keep = (wh >= min_size).all(dim=1) & sample.masks.flatten(1).any(dim=1)
    return Sample(sample.image, sample.boxes[keep], sample.masks[keep])


class TrainTransform:
    """Random zoom/crop, flip and colour jitter, all drawn from the per-sample generator."""

    def __init__(self, input_size: tuple[int, int], augment: AugmentConfig) -> None:
        self.input_size = tuple(input_size)
        self.augment = augment

    def __call__(self, sample: Sample, gen: torch.Generator) -> Sample:
        zoom = _uniform(gen, *self.augment.scale_range)
        offset = (_uniform(gen, 0.0, 1.0), _uniform(gen, 0.0, 1.0))
        flip = _uniform(gen, 0.0, 1.0) < self.augment.hflip_prob
        sample = fit_crop(sample, self.input_size, zoom, offset)
        if flip:
            sample = horizontal_flip(sample)
        image = color_jitter(sample.image, self.augment, gen)
        return drop_lost_instances(Sample(image, sample.boxes, sample.masks))


class EvalTransform:
    """Deterministic letterbox into the input size (centred)."""

    def __init__(self, input_size: tuple[int, int]) -> None:
        self.input_size = tuple(input_size)

    def __call__(self, sample: Sample, gen: torch.Generator | None = None) -> Sample:
        return drop_lost_instances(fit_crop(sample, self.input_size, 1.0, (0.5, 0.5)))
