"""Mask-overlay pictures of fixed validation images: ground truth beside prediction, one colour per person.

Each ROI's class-1 ("this person") mask is pasted back into its box; class 2 ("other people") is drawn as a
faint grey tint so a user can see whether the head separates the target from the people around it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

PALETTE = np.array(
    [
        (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
        (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    ],
    dtype=np.float32,
)  # fmt: skip


MIN_PANEL_HEIGHT = 320


def paste_roi_masks(
    image: np.ndarray, rois: torch.Tensor, roi_classes: torch.Tensor, alpha: float = 0.5
) -> Image.Image:
    """image uint8 [H,W,3]; rois [K,4] xyxy; roi_classes [K,h,w] in {0,1,2} -> overlay with boxes."""
    canvas = image.astype(np.float32)
    height, width = canvas.shape[:2]
    for k in range(rois.shape[0]):
        x1, y1, x2, y2 = rois[k].tolist()
        ix1, iy1 = max(0, int(np.floor(x1))), max(0, int(np.floor(y1)))
        ix2, iy2 = min(width, int(np.ceil(x2))), min(height, int(np.ceil(y2)))
        if ix2 <= ix1 or iy2 <= iy1:
            continue
        resized = F.interpolate(
            roi_classes[k][None, None].float(),
            size=(round(y2 - y1) or 1, round(x2 - x1) or 1),
            mode="nearest",
        )[0, 0].numpy()
        # Align the resized mask with the integer window of the box.
        oy, ox = iy1 - int(np.floor(y1)), ix1 - int(np.floor(x1))
        patch = resized[oy : oy + (iy2 - iy1), ox : ox + (ix2 - ix1)]
        ph, pw = patch.shape
        region = canvas[iy1 : iy1 + ph, ix1 : ix1 + pw]
        colour = PALETTE[k % len(PALETTE)]
        target = patch == 1
        other = patch == 2
        region[target] = (1 - alpha) * region[target] + alpha * colour
        region[other] = 0.75 * region[other] + 0.25 * 128.0
    out = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for k in range(rois.shape[0]):
        colour = tuple(int(c) for c in PALETTE[k % len(PALETTE)])
        draw.rectangle(rois[k].tolist(), outline=colour, width=1)
    return out


def comparison_panel(
    image: torch.Tensor, rois: torch.Tensor, gt: torch.Tensor, pred: torch.Tensor, title: str = ""
) -> Image.Image:
    """Side-by-side ground truth | prediction for one image (image uint8 or float [3,H,W])."""
    if image.dtype != torch.uint8:
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    array = image.permute(1, 2, 0).cpu().numpy()
    left = paste_roi_masks(array, rois, gt)
    right = paste_roi_masks(array, rois, pred)
    if left.height < MIN_PANEL_HEIGHT:  # small training images: enlarge so masks are visible
        factor = -(-MIN_PANEL_HEIGHT // left.height)
        size = (left.width * factor, left.height * factor)
        left, right = left.resize(size, Image.NEAREST), right.resize(size, Image.NEAREST)
    header = 14
    panel = Image.new("RGB", (left.width * 2 + 4, left.height + header), (255, 255, 255))
    panel.paste(left, (0, header))
    panel.paste(right, (left.width + 4, header))
    draw = ImageDraw.Draw(panel)
    draw.text((2, 1), f"ground truth {title}", fill=(0, 0, 0))
    draw.text((left.width + 6, 1), "prediction", fill=(0, 0, 0))
    return panel


def save_visualizations(vis: dict[str, torch.Tensor], out_dir: Path) -> list[tuple[str, np.ndarray]]:
    """Write one PNG per image of `vis` (images, rois [N,5], masks, preds); return (name, HWC array) pairs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    images, rois = vis["images"], vis["rois"]
    for b in range(images.shape[0]):
        sel = rois[:, 0] == b
        panel = comparison_panel(
            images[b], rois[sel, 1:], vis["masks"][sel], vis["preds"][sel], f"(image {b})"
        )
        name = f"val_{b:02d}.png"
        panel.save(out_dir / name)
        written.append((name, np.asarray(panel)))
    return written
