"""One picture per image: each ROI's own person tinted in its box's colour, other people orange, the
background dimmed, the boxes numbered with their scores, and a legend strip on top.

Drawn with numpy and PIL at the original resolution, then scaled so small images stay readable and large
ones stay small (`MIN_SIDE`..`MAX_SIDE` px on the longer side).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from kdlab.evaluate.roi_pictures import BACKGROUND_DIM, CLASS_COLOURS, TINT

# One colour per ROI for its own person (no orange: that is "other people").
ROI_COLOURS = [
    (46, 204, 64), (0, 116, 217), (240, 18, 190), (57, 204, 204), (177, 13, 201),
    (1, 255, 112), (127, 219, 255), (255, 65, 54), (133, 20, 75), (61, 153, 112),
]  # fmt: skip
OTHER_COLOUR = CLASS_COLOURS[2]
MIN_SIDE, MAX_SIDE = 384, 1280
LEGEND_HEIGHT = 22


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def roi_colour(index: int) -> tuple[int, int, int]:
    return ROI_COLOURS[index % len(ROI_COLOURS)]


def tint(image: np.ndarray, own: list[np.ndarray], other: np.ndarray) -> np.ndarray:
    """uint8 [H,W,3] with background dimmed, `other` pixels orange and each own mask in its ROI colour
    (a later ROI wins where two own masks overlap)."""
    out = image.astype(np.float32)
    person = other.copy()
    for mask in own:
        person |= mask
    out[~person] *= BACKGROUND_DIM
    only_other = other.copy()
    for mask in own:
        only_other &= ~mask
    out[only_other] = (1 - TINT) * out[only_other] + TINT * np.asarray(OTHER_COLOUR, np.float32)
    for i, mask in enumerate(own):
        out[mask] = (1 - TINT) * out[mask] + TINT * np.asarray(roi_colour(i), np.float32)
    return out.clip(0, 255).astype(np.uint8)


def _display_scale(height: int, width: int) -> float:
    side = max(height, width)
    if side < MIN_SIDE:
        return MIN_SIDE / side
    if side > MAX_SIDE:
        return MAX_SIDE / side
    return 1.0


def _legend(draw: ImageDraw.ImageDraw, width: int) -> None:
    font = _font(12)
    entries = [
        ("own person (box colour)", roi_colour(0)),
        ("other people", OTHER_COLOUR),
        ("background", tuple(int(BACKGROUND_DIM * 160) for _ in range(3))),
    ]
    x = 4
    for label, colour in entries:
        draw.rectangle([x, 5, x + 12, 17], fill=colour, outline=(0, 0, 0))
        draw.text((x + 16, 4), label, fill=(0, 0, 0), font=font)
        x += 26 + int(draw.textlength(label, font=font))
        if x > width:
            break


def draw_overlay(
    image: np.ndarray, own: list[np.ndarray], other: np.ndarray, boxes: np.ndarray, scores: list[float]
) -> Image.Image:
    """image uint8 [H,W,3]; own: one bool [H,W] per ROI; other bool [H,W]; boxes [K,4] xyxy original pixels."""
    h, w = image.shape[:2]
    scale = _display_scale(h, w)
    picture = Image.fromarray(tint(image, own, other))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if scale != 1.0:
        picture = picture.resize(size, Image.NEAREST if scale > 1 else Image.BILINEAR)
    canvas = Image.new("RGB", (size[0], size[1] + LEGEND_HEIGHT), (255, 255, 255))
    canvas.paste(picture, (0, LEGEND_HEIGHT))
    draw = ImageDraw.Draw(canvas)
    _legend(draw, size[0])
    font = _font(12)
    for i, (box, score) in enumerate(zip(boxes, scores, strict=True)):
        x1, y1, x2, y2 = (float(v) * scale for v in box)
        y1, y2 = y1 + LEGEND_HEIGHT, y2 + LEGEND_HEIGHT
        colour = roi_colour(i)
        draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=colour, width=2)
        label = f"{i} {score:.2f}"
        tw = draw.textlength(label, font=font)
        draw.rectangle([x1, y1, x1 + tw + 4, y1 + 14], fill=colour)
        draw.text((x1 + 2, y1 + 1), label, fill=(0, 0, 0), font=font)
    return canvas
