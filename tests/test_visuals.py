"""Validation pictures: all three classes of every ROI in their colours, the legend, the teacher column."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from kdlab.evaluate.roi_pictures import CLASS_COLOURS, class_overlay, roi_crops, save_visualizations


def _vis(teacher: bool) -> dict[str, torch.Tensor]:
    images = torch.full((1, 3, 64, 64), 0.6)
    rois = torch.tensor([[0.0, 8.0, 8.0, 40.0, 56.0], [0.0, 20.0, 4.0, 60.0, 60.0]])
    masks = torch.zeros(2, 16, 12, dtype=torch.uint8)
    masks[:, 4:12, 3:9] = 1
    masks[:, 12:, :] = 2
    vis = {"images": images, "rois": rois, "windows": rois, "masks": masks, "preds": torch.ones_like(masks)}
    if teacher:
        vis["teacher_preds"] = torch.full_like(masks, 2)
    return vis


def _has_colour(picture: np.ndarray, colour: tuple[int, int, int], tol: int = 3) -> bool:
    return bool((np.abs(picture.astype(int) - np.array(colour)).max(axis=-1) <= tol).any())


def test_overlay_gives_each_class_its_own_colour():
    crop = np.full((2, 3, 3), 200, dtype=np.uint8)
    classes = np.array([[0, 1, 2], [2, 1, 0]])
    out = class_overlay(crop, classes).astype(int)
    assert out[0, 0].max() < 200  # background dimmed
    green, orange = out[0, 1], out[0, 2]
    assert green[1] > green[0] and green[1] > green[2]
    assert orange[0] > orange[2] and not np.array_equal(green, orange)


def test_roi_crops_sample_the_window_like_the_masks():
    image = torch.zeros(3, 32, 32)
    image[:, :, 16:] = 1.0  # right half white
    crops = roi_crops(image, torch.tensor([[8.0, 0.0, 24.0, 32.0]]), (4, 4))
    assert crops.shape == (1, 4, 4, 3)
    assert (crops[0, :, :2] == 0).all() and (crops[0, :, 2:] == 255).all()


def test_pictures_show_the_teacher_beside_the_student(tmp_path):
    ((name, student_only),) = save_visualizations(_vis(teacher=False), tmp_path / "a")
    ((_, with_teacher),) = save_visualizations(_vis(teacher=True), tmp_path / "b")
    assert name == "val_00.png" and (tmp_path / "a" / name).is_file()
    assert with_teacher.shape[1] > student_only.shape[1]  # one more column of ROI tiles
    assert with_teacher.shape[0] == student_only.shape[0]
    png = np.asarray(Image.open(tmp_path / "b" / name).convert("RGB"))
    for colour in CLASS_COLOURS.values():  # the legend swatches
        assert _has_colour(png, colour, tol=0)
