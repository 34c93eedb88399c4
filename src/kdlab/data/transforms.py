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


@dataclass(frozen=True)
class CropWindow:
    """Where an image lands in the network input: resized to (new_h, new_w), then cropped at (top, left)
    (negative = padded) to the input size. `fit_crop` applies it; prediction inverts it."""

    height: int  # the original image's size
    width: int
    new_h: int
    new_w: int
    top: int
    left: int


def crop_window(
    image_size: tuple[int, int], input_size: tuple[int, int], zoom: float, offset: tuple[float, float]
) -> CropWindow:
    """The geometry of `fit_crop` for an image of `image_size` (H, W): aspect-kept fit times `zoom`, the
    window placed at `offset` in [0,1]^2 inside the slack (0.5, 0.5 = centred)."""
    in_h, in_w = input_size
    h, w = image_size
    scale = min(in_h / h, in_w / w) * zoom
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    top = math.floor((new_h - in_h) * offset[0]) if new_h >= in_h else -math.floor((in_h - new_h) * offset[0])
    left = (
        math.floor((new_w - in_w) * offset[1]) if new_w >= in_w else -math.floor((in_w - new_w) * offset[1])
    )
    return CropWindow(int(h), int(w), new_h, new_w, top, left)


def letterbox_window(image_size: tuple[int, int], input_size: tuple[int, int]) -> CropWindow:
    """The validation letterbox (`EvalTransform`): fit, no zoom, centred."""
    return crop_window(image_size, input_size, 1.0, (0.5, 0.5))


def crop_image(image: torch.Tensor, window: CropWindow, input_size: tuple[int, int]) -> torch.Tensor:
    """uint8 [3,H,W] -> [3,in_h,in_w] through `window` (antialiased resize, zero padding)."""
    image = F.resize(image, [window.new_h, window.new_w], antialias=True)
    return F.crop(image, window.top, window.left, *input_size)


def crop_boxes(boxes: torch.Tensor, window: CropWindow, input_size: tuple[int, int]) -> torch.Tensor:
    """float [K,4] xyxy in original pixels -> input pixels through `window` (clamped to the input)."""
    boxes = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(window.height, window.width))
    boxes = F.resize(boxes, [window.new_h, window.new_w])
    boxes = F.crop(boxes, window.top, window.left, *input_size)
    return boxes.as_subclass(torch.Tensor).to(torch.float32)


def uncrop_boxes(boxes: torch.Tensor, window: CropWindow) -> torch.Tensor:
    """The inverse of `crop_boxes` (without its clamping): [..., 4] xyxy input pixels -> original pixels."""
    sx, sy = window.width / window.new_w, window.height / window.new_h
    shift = torch.tensor([window.left, window.top, window.left, window.top], dtype=boxes.dtype)
    scale = torch.tensor([sx, sy, sx, sy], dtype=boxes.dtype)
    return (boxes + shift) * scale


def fit_crop(sample: Sample, input_size: tuple[int, int], zoom: float, offset: tuple[float, float]) -> Sample:
    """Resize so the image fits `input_size` (aspect kept) times `zoom`, then crop/pad to `input_size`.

    `offset` in [0,1]^2 chooses where the window sits inside the slack (0.5, 0.5 = centred); where the
    resized image is smaller than the input it is padded with zeros.
    """
    input_size = (int(input_size[0]), int(input_size[1]))
    window = crop_window(tuple(sample.image.shape[-2:]), input_size, zoom, offset)
    masks = tv_tensors.Mask(sample.masks.to(torch.uint8))
    masks = F.resize(masks, [window.new_h, window.new_w], interpolation=F.InterpolationMode.NEAREST)
    masks = F.crop(masks, window.top, window.left, *input_size)
    return Sample(
        image=crop_image(sample.image, window, input_size),
        boxes=crop_boxes(sample.boxes, window, input_size),
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
