"""Pictures of fixed validation images: every ROI's three classes, ground truth beside the predictions.

One PNG per image: on top the image with its numbered ROI boxes and a legend; below, one row per ROI with
the ROI's window (what the head sees, cropped exactly as the masks are), then the ground truth, the
student's prediction and, for a distilled run, the teacher's prediction, each as a colour overlay:
green = the ROI's own person, orange = other people, darkened = background.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.ops import roi_align

from kdlab.atomic_io import atomic_path

PALETTE = np.array(
    [
        (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
        (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    ],
    dtype=np.float32,
)  # fmt: skip

# Class colours (0 background, 1 the ROI's own person, 2 other people) and how strongly they tint.
CLASS_COLOURS = {1: (46, 204, 64), 2: (255, 133, 27)}
CLASS_NAMES = {0: "background", 1: "own person", 2: "other people"}
BACKGROUND_DIM = 0.45
TINT = 0.55
TILE_HEIGHT = 144  # ROI tiles are enlarged to about this height
MAX_ROWS = 6  # ROIs drawn per image
OVERVIEW_HEIGHT = 256


def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    if image.dtype != torch.uint8:
        image = (image.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return image


def class_overlay(crop: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """crop uint8 [h,w,3] + classes [h,w] in {0,1,2} -> uint8 [h,w,3]: background dimmed, classes tinted."""
    out = crop.astype(np.float32)
    out[classes == 0] *= BACKGROUND_DIM
    for cls, colour in CLASS_COLOURS.items():
        sel = classes == cls
        out[sel] = (1 - TINT) * out[sel] + TINT * np.asarray(colour, dtype=np.float32)
    return out.clip(0, 255).astype(np.uint8)


def roi_crops(image: torch.Tensor, windows: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """uint8 [K,h,w,3]: each window ([K,4] xyxy) of `image` ([3,H,W]) sampled like the masks (RoIAlign)."""
    if windows.shape[0] == 0:
        return np.zeros((0, *size, 3), dtype=np.uint8)
    img = _to_uint8(image).float()[None]
    rois = torch.cat([torch.zeros((windows.shape[0], 1)), windows.float()], dim=1)
    crops = roi_align(img, rois, size, 1.0, 2, aligned=True)
    return crops.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _legend(draw: ImageDraw.ImageDraw, x: int, y: int) -> None:
    font = _font(12)
    for cls in (1, 2, 0):
        colour = CLASS_COLOURS.get(cls, tuple(int(BACKGROUND_DIM * 160) for _ in range(3)))
        draw.rectangle([x, y + 2, x + 12, y + 14], fill=colour, outline=(0, 0, 0))
        draw.text((x + 16, y + 1), CLASS_NAMES[cls], fill=(0, 0, 0), font=font)
        x += 22 + int(draw.textlength(CLASS_NAMES[cls], font=font))


def image_panel(
    image: torch.Tensor,
    boxes: torch.Tensor,
    windows: torch.Tensor,
    columns: list[tuple[str, torch.Tensor]],
    title: str = "",
) -> Image.Image:
    """One image's picture. image [3,H,W]; boxes/windows [K,4] xyxy (the person box and the head's window,
    equal without a context margin); columns: (label, classes [K,h,w]) drawn left to right."""
    k = min(boxes.shape[0], MAX_ROWS)
    mask_h, mask_w = columns[0][1].shape[-2:] if columns and k else (TILE_HEIGHT, TILE_HEIGHT)
    scale = max(1, round(TILE_HEIGHT / mask_h))
    tile_w, tile_h = mask_w * scale, mask_h * scale
    font = _font(12)
    # Overview: the whole image with numbered boxes.
    array = _to_uint8(image).permute(1, 2, 0).cpu().numpy()
    overview = Image.fromarray(array)
    factor = max(1, -(-OVERVIEW_HEIGHT // overview.height))
    overview = overview.resize((overview.width * factor, overview.height * factor), Image.NEAREST)
    draw = ImageDraw.Draw(overview)
    for i in range(boxes.shape[0]):
        colour = tuple(int(c) for c in PALETTE[i % len(PALETTE)])
        draw.rectangle((boxes[i] * factor).tolist(), outline=colour, width=2)
        draw.text(
            (float(boxes[i, 0]) * factor + 3, float(boxes[i, 1]) * factor + 2), str(i), fill=colour, font=font
        )
    label_w, header, gap = 28, 40, 4
    n_cols = 1 + len(columns)
    width = max(overview.width, label_w + n_cols * (tile_w + gap))
    height = header + overview.height + gap + 18 + k * (tile_h + gap)
    panel = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    draw.text((4, 2), title, fill=(0, 0, 0), font=font)
    _legend(draw, 4, 18)
    panel.paste(overview, (0, header))
    top = header + overview.height + gap
    for c, label in enumerate(["ROI window", *(name for name, _ in columns)]):
        draw.text((label_w + c * (tile_w + gap) + 2, top), label, fill=(0, 0, 0), font=font)
    top += 18
    crops = roi_crops(image, windows[:k], (mask_h, mask_w))
    for i in range(k):
        y = top + i * (tile_h + gap)
        colour = tuple(int(c) for c in PALETTE[i % len(PALETTE)])
        draw.text((4, y + tile_h // 2 - 6), str(i), fill=colour, font=_font(14))
        tiles = [crops[i]] + [class_overlay(crops[i], classes[i].cpu().numpy()) for _, classes in columns]
        for c, tile in enumerate(tiles):
            x = label_w + c * (tile_w + gap)
            panel.paste(Image.fromarray(tile).resize((tile_w, tile_h), Image.NEAREST), (x, y))
            if c == 0:  # the person's box inside its window (the whole tile without a context margin)
                bx = _box_in_window(boxes[i], windows[i], tile_w, tile_h)
                draw.rectangle([x + bx[0], y + bx[1], x + bx[2] - 1, y + bx[3] - 1], outline=colour, width=2)
    return panel


def _box_in_window(box: torch.Tensor, window: torch.Tensor, tile_w: int, tile_h: int) -> list[float]:
    wx1, wy1, wx2, wy2 = window.tolist()
    sx, sy = tile_w / max(wx2 - wx1, 1e-6), tile_h / max(wy2 - wy1, 1e-6)
    x1, y1, x2, y2 = box.tolist()
    return [(x1 - wx1) * sx, (y1 - wy1) * sy, (x2 - wx1) * sx, (y2 - wy1) * sy]


def save_visualizations(vis: dict[str, torch.Tensor], out_dir: Path) -> list[tuple[str, np.ndarray]]:
    """Write one PNG per image of `vis` (images, rois [N,5], windows [N,5] (optional), masks, preds and,
    for a distilled run, teacher_preds); return (name, HWC array) pairs. Each is written atomically (no fsync:
    a picture is redrawn by the next validation); a full disk raises atomic_io.FileWriteError."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    images, rois = vis["images"], vis["rois"]
    windows = vis.get("windows", rois)
    for b in range(images.shape[0]):
        sel = rois[:, 0] == b
        columns = [("ground truth", vis["masks"][sel]), ("prediction", vis["preds"][sel])]
        if "teacher_preds" in vis:
            columns[1] = ("student", vis["preds"][sel])
            columns.append(("teacher", vis["teacher_preds"][sel]))
        panel = image_panel(images[b], rois[sel, 1:], windows[sel, 1:], columns, f"validation image {b}")
        name = f"val_{b:02d}.png"
        with atomic_path(out_dir / name, fsync=False) as tmp:
            panel.save(tmp, format="PNG")
        written.append((name, np.asarray(panel)))
    return written
