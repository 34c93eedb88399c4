"""The segmentation evaluator on a hand-made COCO file: two overlapping people, a model that answers with
the hand-drawn ground truth (every metric 1.0), then the same answer with a known set of pixels wrong."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch import nn

from kdlab.config.loader import resolve_config
from kdlab.data.loaders import build_datasets, build_loader
from kdlab.evaluate.evaluator import SegmentationEvaluator

SIZE = 32  # image = input size: no resize, so ROI pixels are image pixels
MASK = (16, 12)  # (h, w) = every box's size: the ROI targets are the image pixels of the box, one for one


def _people() -> dict[str, tuple[np.ndarray, tuple[int, int, int, int]]]:
    """name -> (visible mask [H,W] bool, box x1, y1, x2, y2). B stands in front of A and hides part of it."""
    b = np.zeros((SIZE, SIZE), bool)
    b[8:24, 10:22] = True
    b[20:24, 18:22] = False  # a notch: background inside B's own box
    a = np.zeros((SIZE, SIZE), bool)
    a[4:20, 4:16] = True
    a[4:8, 4:8] = False  # a notch
    a &= ~b  # occluded by B: A's box holds 72 pixels of B
    return {"A": (a, (4, 4, 16, 20)), "B": (b, (10, 8, 22, 24))}


def _expected_labels() -> dict[str, np.ndarray]:
    """Per person, the [16,12] map a perfect model outputs: 1 = this person, 2 = the other one, 0 = neither."""
    people = _people()
    out = {}
    for name, (own, (x1, y1, x2, y2)) in people.items():
        label = np.zeros((SIZE, SIZE), np.int64)
        for other, (mask, _) in people.items():
            if other != name:
                label[mask] = 2
        label[own] = 1
        out[name] = label[y1:y2, x1:x2]
    return out


@pytest.fixture(scope="module")
def val_loader(tmp_path_factory):
    tmp: Path = tmp_path_factory.mktemp("evaluator")
    images = tmp / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("people.png", "empty.png"):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(images / name)
    annotations = []
    for ann_id, (mask, (x1, y1, x2, y2)) in enumerate(_people().values(), start=1):
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        annotations.append({
            "id": ann_id, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": int(mask.sum()),
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
        })  # fmt: skip
    coco = {
        "images": [{"id": 1, "file_name": "people.png", "height": SIZE, "width": SIZE},
                   {"id": 2, "file_name": "empty.png", "height": SIZE, "width": SIZE}],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "person"}],
    }  # fmt: skip
    (tmp / "coco.json").write_text(json.dumps(coco))
    sets = [f"data.{split}_{kind}={tmp / path}" for split in ("train", "val")
            for kind, path in (("annotations", "coco.json"), ("images", "images"))]  # fmt: skip
    cfg = resolve_config(
        "quickstart_baseline", [*sets, f"data.input_size={SIZE},{SIZE}", "model.mask_size=16,12"]
    )
    _, val = build_datasets(cfg)
    assert len(val) == 2
    return build_loader(val, 2, shuffle=False, seed=0, num_workers=0, pin_memory=False)


class _Oracle(nn.Module):
    """Answers each ROI with a hand-made label map, found by its box; `wrong` overrides some pixels."""

    def __init__(self, wrong: dict[str, list[tuple[int, int, int]]] | None = None) -> None:
        super().__init__()
        self.labels = _expected_labels()
        for name, pixels in (wrong or {}).items():
            for row, col, value in pixels:
                self.labels[name][row, col] = value
        self.boxes = {name: box for name, (_, box) in _people().items()}
        self.rois_seen = 0

    def forward(self, images: torch.Tensor, rois: torch.Tensor) -> dict[str, torch.Tensor]:
        assert images.dtype == torch.float32 and images.shape[1:] == (3, SIZE, SIZE)
        maps = []
        for roi in rois.tolist():
            (name,) = [n for n, box in self.boxes.items() if np.allclose(roi[1:], box)]
            maps.append(torch.from_numpy(self.labels[name]))
        self.rois_seen += len(maps)
        labels = torch.stack(maps) if maps else torch.zeros((0, *MASK), dtype=torch.int64)
        return {"logits": 10.0 * nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float()}


def test_hand_counted_geometry():
    """The counts the expected values below are made of (a check on the fixture itself)."""
    labels = _expected_labels()
    assert [int((labels["A"] == c).sum()) for c in (0, 1, 2)] == [16, 104, 72]
    assert [int((labels["B"] == c).sum()) for c in (0, 1, 2)] == [16, 176, 0]


def test_a_model_answering_the_ground_truth_scores_1(val_loader):
    oracle = _Oracle()
    metrics, _ = SegmentationEvaluator(val_loader, torch.device("cpu"), show_progress=False)(oracle)
    assert oracle.rois_seen == 2 and metrics["num_rois"] == 2 and metrics["images"] == 2
    for key in (
        "target_iou",
        "miou",
        "iou_background",
        "iou_target",
        "iou_other",
        "boundary_f1",
        "pixel_accuracy",
    ):
        assert metrics[key] == 1.0, key


def test_known_wrong_pixels_give_the_hand_computed_metrics(val_loader):
    """8 of A's 104 target pixels answered "other person" (crop rows 4-7, columns 0-1):
    target IoU of A = 96/104, of B = 1, mean over ROIs (96/104 + 1) / 2;
    dataset confusion: 8 pixels gt 1 -> pred 2, so IoU target = 272/280, IoU other = 72/80, background 1."""
    wrong = {"A": [(row, col, 2) for row in range(4, 8) for col in range(2)]}
    assert all(_expected_labels()["A"][r, c] == 1 for r, c, _ in wrong["A"])
    metrics, _ = SegmentationEvaluator(val_loader, torch.device("cpu"), show_progress=False)(_Oracle(wrong))
    assert metrics["target_iou"] == pytest.approx((96 / 104 + 1) / 2)
    assert metrics["iou_target"] == pytest.approx(272 / 280)
    assert metrics["iou_other"] == pytest.approx(72 / 80)
    assert metrics["iou_background"] == 1.0
    assert metrics["miou"] == pytest.approx((1 + 272 / 280 + 72 / 80) / 3)
    assert metrics["pixel_accuracy"] == pytest.approx((384 - 8) / 384)
