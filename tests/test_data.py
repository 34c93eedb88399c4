"""Tests for the people data pipeline: COCO reading, ROI masks, transforms, dataset, loader, data paths."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from kdlab.config.schema import AugmentConfig, ExperimentConfig
from kdlab.data import synthetic
from kdlab.data.coco import CocoPeopleDataset, decode_person_mask, read_coco_people
from kdlab.data.loaders import (
    EpochSeededSampler,
    build_datasets,
    build_loader,
    collate_people,
    resolve_data_paths,
)
from kdlab.data.roi_masks import OTHER, TARGET, build_roi_masks
from kdlab.data.synthetic import generate_synthetic_people, render_synthetic_image
from kdlab.data.transforms import (
    EvalTransform,
    Sample,
    TrainTransform,
    drop_lost_instances,
    fit_crop,
    horizontal_flip,
)
from kdlab.errors import DataError

# ----------------------------------------------------------------------------------------------- helpers


def _rect(x1: float, y1: float, x2: float, y2: float) -> list[float]:
    """A rectangle as one COCO polygon (pixel-edge coordinates)."""
    return [x1, y1, x2, y1, x2, y2, x1, y2]


def _person(ann_id: int, image_id: int, x1: int, y1: int, x2: int, y2: int, **extra: Any) -> dict[str, Any]:
    """A person annotation whose polygon and bbox are the same axis-aligned rectangle."""
    ann = {
        "id": ann_id,
        "image_id": image_id,
        "category_id": 1,
        "bbox": [x1, y1, x2 - x1, y2 - y1],
        "segmentation": [_rect(x1, y1, x2, y2)],
        "area": float((x2 - x1) * (y2 - y1)),
        "iscrowd": 0,
    }
    ann.update(extra)
    return ann


def _image(image_id: int, file_name: str, h: int, w: int) -> dict[str, Any]:
    return {"id": image_id, "file_name": file_name, "height": h, "width": w}


PERSON_CATS = [{"id": 1, "name": "person", "supercategory": "person"}]


def _write_coco(path: Path, images: list, annotations: list, categories: list | None = None) -> Path:
    cats = PERSON_CATS if categories is None else categories
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    return path


def _write_jpeg(path: Path, h: int, w: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, format="JPEG", quality=90)
    return path


def _synthetic_sample(index: int, seed: int, size: tuple[int, int]) -> Sample:
    """A generated image with its visible masks and tight xyxy boxes (original resolution)."""
    s = render_synthetic_image(index, seed, size)
    image = torch.from_numpy(s.image).permute(2, 0, 1).contiguous()
    masks = torch.from_numpy(np.stack(s.visible_masks))
    boxes = torch.tensor(
        [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in s.annotations)], dtype=torch.float32
    )
    return Sample(image, boxes, masks)


def _assert_masks_inside_boxes(sample: Sample, tol: float = 1.0) -> None:
    """Every mask is non-empty and its pixels lie inside its box (within `tol` px)."""
    assert sample.boxes.shape[0] == sample.masks.shape[0]
    for box, mask in zip(sample.boxes, sample.masks, strict=True):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert xs.numel() > 0
        mask_box = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
        assert (box[:2] - mask_box[:2]).max() <= tol, (box, mask_box)
        assert (mask_box[2:] - box[2:]).max() <= tol, (box, mask_box)


def _one_line_naming(exc: pytest.ExceptionInfo, path: Path) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    assert str(path) in msg
    return msg


# ----------------------------------------------------------------------------------------------- COCO reader


def test_person_category_found_by_name_with_zero_ids_and_other_categories_ignored(tmp_path: Path) -> None:
    cats = [{"id": 0, "name": "person"}, {"id": 1, "name": "car"}, {"id": 2, "name": "dog"}]
    people = _person(7, 0, 2, 3, 12, 23)
    people["category_id"] = 0
    # A car whose annotation would be rejected if it were read (2-point polygon, bbox outside the image).
    car = {"id": 8, "image_id": 0, "category_id": 1, "bbox": [500, 500, 5, 5], "segmentation": [[1, 1, 2, 2]]}
    dog_on_other = _person(9, 5, 1, 1, 20, 20)
    dog_on_other["category_id"] = 2
    ann = _write_coco(
        tmp_path / "a.json",
        [_image(0, "zero.jpg", 30, 40), _image(5, "five.jpg", 30, 40)],
        [car, people, dog_on_other],
        cats,
    )
    records = read_coco_people(ann)
    assert [r.image_id for r in records] == [0, 5]
    assert [len(r.people) for r in records] == [1, 0]
    person = records[0].people[0]
    assert person.annotation_id == 7
    assert person.box == (2.0, 3.0, 12.0, 23.0)  # xywh -> xyxy
    assert (records[0].height, records[0].width, records[0].file_name) == (30, 40, "zero.jpg")


def test_bbox_partly_outside_is_clipped_to_the_image(tmp_path: Path) -> None:
    ann = _person(1, 1, 0, 0, 10, 10)
    ann["bbox"] = [-5.0, 20.0, 30.0, 40.0]  # x -5..25, y 20..60 in a 40x50 (h x w) image
    path = _write_coco(tmp_path / "a.json", [_image(1, "a.jpg", 40, 50)], [ann])
    assert read_coco_people(path)[0].people[0].box == (0.0, 20.0, 25.0, 40.0)


def test_decode_rectangle_polygon_matches_pycocotools_pixel_semantics() -> None:
    # Pixel (x, y) covers [x, x+1) x [y, y+1): the rectangle 10..30 x 5..25 is exactly rows 5..24, cols 10..29.
    expected = np.zeros((40, 50), dtype=bool)
    expected[5:25, 10:30] = True
    got = decode_person_mask([_rect(10, 5, 30, 25)], 40, 50)
    assert got.dtype == np.bool_ and got.shape == (40, 50)
    np.testing.assert_array_equal(got, expected)


def test_decode_multi_polygon_person_is_the_union() -> None:
    expected = np.zeros((30, 30), dtype=bool)
    expected[2:8, 3:9] = True
    expected[20:28, 15:25] = True
    got = decode_person_mask([_rect(3, 2, 9, 8), _rect(15, 20, 25, 28)], 30, 30)
    np.testing.assert_array_equal(got, expected)


def test_decode_compressed_rle_with_string_counts() -> None:
    expected = np.zeros((40, 50), dtype=bool)
    expected[3:9, 7:20] = True
    expected[30:35, 40:48] = True
    rle = mask_utils.encode(np.asfortranarray(expected.astype(np.uint8)))
    seg = {"size": [40, 50], "counts": rle["counts"].decode("ascii")}  # what a JSON file holds
    got = decode_person_mask(seg, 40, 50)
    np.testing.assert_array_equal(got, expected)
    assert isinstance(seg["counts"], str)  # the caller's dict is not modified


def test_decode_uncompressed_rle_with_list_counts() -> None:
    # 4x5 mask with rows 1..2, cols 1..3 set; column-major runs (zeros first): 5,2,2,2,2,2,5.
    expected = np.zeros((4, 5), dtype=bool)
    expected[1:3, 1:4] = True
    got = decode_person_mask({"size": [4, 5], "counts": [5, 2, 2, 2, 2, 2, 5]}, 4, 5)
    np.testing.assert_array_equal(got, expected)


def test_crowd_and_small_boxes_are_skipped(tmp_path: Path) -> None:
    crowd = _person(1, 1, 0, 0, 30, 30, iscrowd=1)
    crowd["segmentation"] = {"size": [40, 50], "counts": [100, 50, 1850]}  # crowd RLE, as in real COCO
    small = _person(2, 1, 40, 2, 44, 30)  # 4 px wide
    exact = _person(3, 1, 2, 30, 10, 38)  # exactly 8x8: not smaller than min_box_size
    normal = _person(4, 1, 10, 5, 30, 25)
    path = _write_coco(tmp_path / "a.json", [_image(1, "a.jpg", 40, 50)], [crowd, small, exact, normal])
    (rec,) = read_coco_people(path, min_box_size=8.0)
    assert [p.annotation_id for p in rec.people] == [3, 4]
    (rec,) = read_coco_people(path, min_box_size=0.0)
    assert [p.annotation_id for p in rec.people] == [2, 3, 4]


def test_images_without_people_kept_or_dropped(tmp_path: Path) -> None:
    images = [_image(1, "a.jpg", 40, 50), _image(2, "b.jpg", 40, 50), _image(3, "c.jpg", 40, 50)]
    only_crowd = _person(2, 3, 0, 0, 30, 30, iscrowd=1)
    path = _write_coco(tmp_path / "a.json", images, [_person(1, 1, 10, 5, 30, 25), only_crowd])
    assert [r.image_id for r in read_coco_people(path, keep_images_without_people=True)] == [1, 2, 3]
    assert [r.image_id for r in read_coco_people(path, keep_images_without_people=False)] == [1]
    assert [r.image_id for r in read_coco_people(path, max_images=2)] == [1, 2]


def test_dataset_item_without_people_and_its_collate(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    _write_jpeg(tmp_path / "img" / "a.jpg", 48, 64, seed=1)
    _write_jpeg(tmp_path / "img" / "b.jpg", 48, 64, seed=2)
    path = _write_coco(
        tmp_path / "a.json",
        [_image(1, "a.jpg", 48, 64), _image(2, "b.jpg", 48, 64)],
        [_person(1, 1, 4, 4, 24, 40), _person(2, 1, 20, 8, 50, 44)],
    )
    records = read_coco_people(path, keep_images_without_people=True)
    ds = CocoPeopleDataset(records, tmp_path / "img", (64, 64), (16, 12), EvalTransform((64, 64)))
    empty = ds[1]
    assert empty["image"].shape == (3, 64, 64) and empty["image"].dtype == torch.uint8
    assert empty["boxes"].shape == (0, 4)
    assert empty["roi_masks"].shape == (0, 16, 12) and empty["roi_masks"].dtype == torch.uint8
    batch = collate_people([empty, ds[0]])
    assert batch["images"].shape == (2, 3, 64, 64)
    assert batch["rois"].shape == (2, 5) and batch["masks"].shape == (2, 16, 12)
    assert batch["rois"][:, 0].tolist() == [1.0, 1.0]  # both ROIs belong to the second image
    torch.testing.assert_close(batch["rois"][:, 1:], ds[0]["boxes"])
    assert batch["image_ids"] == [2, 1] and batch["indices"] == [1, 0]
    only_empty = collate_people([empty])
    assert only_empty["rois"].shape == (0, 5) and only_empty["masks"].shape == (0, 16, 12)


def test_dataset_decodes_polygon_and_rle_people_in_one_image(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    _write_jpeg(tmp_path / "img" / "a.jpg", 40, 50)
    rle_mask = np.zeros((40, 50), dtype=bool)
    rle_mask[20:36, 30:45] = True
    rle = mask_utils.encode(np.asfortranarray(rle_mask.astype(np.uint8)))
    rle_person = _person(2, 1, 30, 20, 45, 36)
    rle_person["segmentation"] = {"size": [40, 50], "counts": rle["counts"].decode("ascii")}
    path = _write_coco(
        tmp_path / "a.json", [_image(1, "a.jpg", 40, 50)], [_person(1, 1, 2, 3, 12, 23), rle_person]
    )
    ds = CocoPeopleDataset(
        read_coco_people(path), tmp_path / "img", (64, 64), (8, 8), EvalTransform((64, 64))
    )
    raw = ds.load_raw(0)
    poly_mask = np.zeros((40, 50), dtype=bool)
    poly_mask[3:23, 2:12] = True
    np.testing.assert_array_equal(raw.masks.numpy(), np.stack([poly_mask, rle_mask]))
    assert raw.image.shape == (3, 40, 50)


def _errors_case(tmp_path: Path, case: str) -> tuple[Path, dict[str, Any]]:
    """Write an annotations file broken in the way `case` names; return it and read_coco_people kwargs."""
    path = tmp_path / f"{case}.json"
    img = [_image(1, "a.jpg", 40, 50)]
    kwargs: dict[str, Any] = {}
    if case == "missing":
        return path, kwargs
    if case == "invalid_json":
        path.write_text('{"images": [')
    elif case == "top_level_list":
        path.write_text("[]")
    elif case == "no_categories":
        path.write_text(json.dumps({"images": [], "annotations": []}))
    elif case == "no_person":
        _write_coco(path, img, [], [{"id": 1, "name": "car"}, {"id": 2, "name": "dog"}])
    elif case == "two_point_polygon":
        ann = _person(1, 1, 2, 2, 10, 10)
        ann["segmentation"] = [[2, 2, 10, 10]]
        _write_coco(path, img, [ann])
    elif case == "odd_polygon":
        ann = _person(1, 1, 2, 2, 10, 10)
        ann["segmentation"] = [[2, 2, 10, 2, 10]]
        _write_coco(path, img, [ann])
    elif case == "empty_segmentation":
        ann = _person(1, 1, 2, 2, 10, 10)
        ann["segmentation"] = []
        _write_coco(path, img, [ann])
    elif case == "rle_size_mismatch":
        ann = _person(1, 1, 2, 2, 10, 10)
        ann["segmentation"] = {"size": [20, 25], "counts": [60, 8, 432]}
        _write_coco(path, img, [ann])
    elif case == "bbox_outside":
        ann = _person(1, 1, 2, 2, 10, 10)
        ann["bbox"] = [60, 45, 10, 10]
        _write_coco(path, img, [ann])
    elif case == "unknown_image":
        _write_coco(path, img, [_person(1, 99, 2, 2, 10, 10)])
    elif case == "all_crowd":
        _write_coco(path, img, [_person(1, 1, 2, 2, 10, 10, iscrowd=1)])
        kwargs["keep_images_without_people"] = False
    else:  # pragma: no cover
        raise AssertionError(case)
    return path, kwargs


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("missing", ["does not exist"]),
        ("invalid_json", ["not valid JSON"]),
        ("top_level_list", ["not a COCO instances file"]),
        ("no_categories", ["categories"]),
        ("no_person", ["'person'", "car", "dog"]),
        ("two_point_polygon", ["fewer than 3 points"]),
        ("odd_polygon", ["polygon"]),
        ("empty_segmentation", ["annotation 1"]),
        ("rle_size_mismatch", ["annotation 1", "[20, 25]", "height 40, width 50"]),
        ("bbox_outside", ["outside"]),
        ("unknown_image", ["unknown image_id 99"]),
        ("all_crowd", ["no usable images"]),
    ],
)
def test_broken_annotation_files_raise_one_line_data_error(
    tmp_path: Path, case: str, words: list[str]
) -> None:
    path, kwargs = _errors_case(tmp_path, case)
    with pytest.raises(DataError) as exc:
        read_coco_people(path, **kwargs)
    msg = _one_line_naming(exc, path)
    for word in words:
        assert word in msg, (word, msg)


# ----------------------------------------------------------------------------------------------- bad images


def _two_image_dataset(tmp_path: Path, skip_bad_images: bool) -> CocoPeopleDataset:
    """Image 0 is missing, image 1 is a truncated JPEG, image 2 is fine."""
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    truncated = _write_jpeg(img_dir / "truncated.jpg", 40, 50, seed=3)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    _write_jpeg(img_dir / "good.jpg", 40, 50, seed=4)
    images = [
        _image(1, "missing.jpg", 40, 50),
        _image(2, "truncated.jpg", 40, 50),
        _image(3, "good.jpg", 40, 50),
    ]
    anns = [_person(i, i, 5, 5, 30, 35) for i in (1, 2, 3)]
    path = _write_coco(tmp_path / "a.json", images, anns)
    return CocoPeopleDataset(
        read_coco_people(path),
        img_dir,
        (64, 64),
        (16, 12),
        EvalTransform((64, 64)),
        skip_bad_images=skip_bad_images,
    )


@pytest.mark.parametrize(("index", "name"), [(0, "missing.jpg"), (1, "truncated.jpg")])
def test_bad_image_raises_data_error_naming_the_file(tmp_path: Path, index: int, name: str) -> None:
    ds = _two_image_dataset(tmp_path, skip_bad_images=False)
    with pytest.raises(DataError) as exc:
        ds[index]
    _one_line_naming(exc, tmp_path / "img" / name)
    assert ds[2]["boxes"].shape == (1, 4)


def test_bad_images_skipped_and_collated_away(tmp_path: Path) -> None:
    ds = _two_image_dataset(tmp_path, skip_bad_images=True)
    assert ds[0] is None and ds[1] is None
    assert ds.bad_images == 2
    good = ds[2]
    batch = collate_people([None, good, None])
    assert batch["images"].shape == (1, 3, 64, 64)
    assert batch["rois"][:, 0].tolist() == [0.0]  # re-indexed after dropping the None
    assert batch["image_ids"] == [3]
    assert collate_people([None]) is None
    assert collate_people([None, None]) is None


def test_image_size_disagreeing_with_annotations_raises(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    _write_jpeg(tmp_path / "img" / "a.jpg", 40, 50)
    path = _write_coco(tmp_path / "a.json", [_image(1, "a.jpg", 50, 40)], [_person(1, 1, 2, 2, 20, 20)])
    ds = CocoPeopleDataset(
        read_coco_people(path), tmp_path / "img", (64, 64), (8, 8), EvalTransform((64, 64))
    )
    with pytest.raises(DataError, match="50x40"):
        ds[0]


# ----------------------------------------------------------------------------------------------- ROI masks


def _two_overlapping_people() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Person A: an L (rows 2..11 x cols 2..5 plus rows 2..7 x cols 6..9); person B: rows 6..15 x cols 6..13.

    They overlap in rows 6..7 x cols 6..9. Returns masks, tight boxes and the expected label crops.
    """
    masks = torch.zeros((2, 20, 20), dtype=torch.bool)
    masks[0, 2:12, 2:6] = True
    masks[0, 2:8, 6:10] = True
    masks[1, 6:16, 6:14] = True
    boxes = torch.tensor([[2.0, 2.0, 10.0, 12.0], [6.0, 6.0, 14.0, 16.0]])  # both 10 high x 8 wide
    expected = []
    for i, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
        label = torch.zeros((20, 20), dtype=torch.uint8)
        label[masks.any(0)] = OTHER
        label[masks[i]] = TARGET
        expected.append(label[y1:y2, x1:x2])
    return masks, boxes, torch.stack(expected)


def test_roi_masks_hand_made_own_wins_over_other() -> None:
    masks, boxes, expected = _two_overlapping_people()
    # mask size == box size: one mask pixel per image pixel.
    out = build_roi_masks(masks, boxes, (10, 8))
    assert out.dtype == torch.uint8 and out.shape == (2, 10, 8)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # Spelled out for ROI A (box origin x=2, y=2): the overlap (rows 6..7, cols 6..9) is its own person,
    # B's pixels below it (rows 8..11, cols 6..9) are "other", the rest of the L is its own person.
    assert (out[0, 4:6, 4:8] == TARGET).all()
    assert (out[0, 6:10, 4:8] == OTHER).all()
    assert (out[0, :, 0:4] == TARGET).all() and (out[0, 0:4, 4:8] == TARGET).all()
    # ROI B is a full rectangle: all its own person, although A covers part of it.
    assert (out[1] == TARGET).all()


def test_roi_masks_other_person_and_background() -> None:
    # Boxes larger than the people so that background and the other person both show up.
    masks = torch.zeros((2, 24, 24), dtype=torch.bool)
    masks[0, 4:14, 4:12] = True
    masks[1, 8:18, 8:16] = True
    boxes = torch.tensor([[2.0, 2.0, 18.0, 20.0], [4.0, 4.0, 20.0, 22.0]])  # 18 high x 16 wide
    out = build_roi_masks(masks, boxes, (18, 16))
    label0 = torch.zeros((24, 24), dtype=torch.uint8)
    label0[masks[1]] = OTHER
    label0[masks[0]] = TARGET  # own wins in the overlap
    label1 = torch.zeros((24, 24), dtype=torch.uint8)
    label1[masks[0]] = OTHER
    label1[masks[1]] = TARGET
    torch.testing.assert_close(out[0], label0[2:20, 2:18], rtol=0, atol=0)
    torch.testing.assert_close(out[1], label1[4:22, 4:20], rtol=0, atol=0)
    assert set(out.unique().tolist()) == {0, 1, 2}
    # Upsampled 2x: every image pixel becomes a 2x2 block.
    up = build_roi_masks(masks, boxes, (36, 32))
    expected_up = label0[2:20, 2:18].repeat_interleave(2, 0).repeat_interleave(2, 1)
    torch.testing.assert_close(up[0], expected_up, rtol=0, atol=0)


def test_roi_masks_without_instances() -> None:
    out = build_roi_masks(torch.zeros((0, 30, 40), dtype=torch.bool), torch.zeros((0, 4)), (16, 12))
    assert out.shape == (0, 16, 12) and out.dtype == torch.uint8


# ----------------------------------------------------------------------------------------------- flip alignment


def test_horizontal_flip_boxes_masks_and_image() -> None:
    sample = _synthetic_sample(0, 11, (96, 128))
    flipped = horizontal_flip(sample)
    w = 128
    expected_boxes = torch.stack(
        [w - sample.boxes[:, 2], sample.boxes[:, 1], w - sample.boxes[:, 0], sample.boxes[:, 3]], dim=1
    )
    torch.testing.assert_close(flipped.boxes, expected_boxes)
    torch.testing.assert_close(flipped.masks, sample.masks.flip(-1))
    torch.testing.assert_close(flipped.image, sample.image.flip(-1))
    _assert_masks_inside_boxes(flipped, tol=0.0)


@pytest.mark.parametrize("mask_size", [(32, 24), (160, 120), (17, 13)])
def test_flip_then_build_equals_build_then_flip(mask_size: tuple[int, int]) -> None:
    differing = total = 0
    for index in range(4):
        sample = _synthetic_sample(index, 3, (96, 128))
        flipped = horizontal_flip(sample)
        a = build_roi_masks(flipped.masks, flipped.boxes, mask_size)
        b = build_roi_masks(sample.masks, sample.boxes, mask_size).flip(-1)
        assert (b == TARGET).any()
        differing += int((a != b).sum())
        total += a.numel()
    # RoIAlign's sample points mirror exactly under a flip, but the bilinear sums are accumulated in the
    # opposite order, so a crop value of exactly 0.5 can round to either side of the >= 0.5 threshold.
    # That touches a handful of pixels (measured: < 0.01%); a real misalignment (off by one pixel or a box
    # not flipped) changes whole columns along every edge, far more than 0.5%.
    assert differing <= 0.005 * total, (differing, total)


# ----------------------------------------------------------------------------------------------- transforms


def test_eval_transform_letterboxes_centred_with_exact_boxes() -> None:
    # 40x80 (H x W) into 64x64: scale 0.8 -> 32x64, 16 rows of padding above and below.
    image = torch.full((3, 40, 80), 200, dtype=torch.uint8)
    masks = torch.zeros((1, 40, 80), dtype=torch.bool)
    masks[0, 5:25, 10:30] = True
    sample = Sample(image, torch.tensor([[10.0, 5.0, 30.0, 25.0]]), masks)
    out = EvalTransform((64, 64))(sample)
    assert out.image.shape == (3, 64, 64) and out.image.dtype == torch.uint8
    assert (out.image[:, :16] == 0).all() and (out.image[:, 48:] == 0).all()
    assert (out.image[:, 16:48] == 200).all()
    torch.testing.assert_close(out.boxes, torch.tensor([[8.0, 20.0, 24.0, 36.0]]))
    expected = torch.zeros((64, 64), dtype=torch.bool)
    expected[20:36, 8:24] = True
    torch.testing.assert_close(out.masks[0], expected)


@pytest.mark.parametrize("size", [(72, 100), (100, 60), (48, 48)])
def test_eval_transform_output_size_and_box_mask_agreement(size: tuple[int, int]) -> None:
    sample = _synthetic_sample(1, 5, size)
    out = EvalTransform((64, 96))(sample)
    assert out.image.shape == (3, 64, 96) and out.image.dtype == torch.uint8
    assert out.masks.shape[1:] == (64, 96) and out.masks.dtype == torch.bool
    assert out.boxes.dtype == torch.float32 and out.boxes.shape[0] >= 1
    assert (out.boxes[:, 0::2] >= 0).all() and (out.boxes[:, 0::2] <= 96).all()
    assert (out.boxes[:, 1::2] >= 0).all() and (out.boxes[:, 1::2] <= 64).all()
    _assert_masks_inside_boxes(out)


def test_train_transform_deterministic_per_generator_seed() -> None:
    sample = _synthetic_sample(2, 5, (80, 100))
    transform = TrainTransform((64, 64), AugmentConfig())
    a = transform(sample, torch.Generator().manual_seed(123))
    b = transform(sample, torch.Generator().manual_seed(123))
    torch.testing.assert_close(a.image, b.image, rtol=0, atol=0)
    torch.testing.assert_close(a.boxes, b.boxes, rtol=0, atol=0)
    torch.testing.assert_close(a.masks, b.masks)
    others = [transform(sample, torch.Generator().manual_seed(s)) for s in (124, 125, 126)]
    assert all(not torch.equal(a.image, o.image) for o in others)
    for out in [a, *others]:
        assert out.image.shape == (3, 64, 64) and out.image.dtype == torch.uint8
        _assert_masks_inside_boxes(out)


def test_train_transform_does_not_touch_global_rng() -> None:
    sample = _synthetic_sample(2, 5, (80, 100))
    transform = TrainTransform((64, 64), AugmentConfig())
    torch.manual_seed(0)
    a = transform(sample, torch.Generator().manual_seed(7))
    torch.manual_seed(999)
    b = transform(sample, torch.Generator().manual_seed(7))
    torch.testing.assert_close(a.image, b.image, rtol=0, atol=0)


def _left_and_right_people() -> Sample:
    masks = torch.zeros((2, 64, 64), dtype=torch.bool)
    masks[0, 20:40, 2:10] = True  # far left
    masks[1, 20:40, 50:60] = True  # far right
    boxes = torch.tensor([[2.0, 20.0, 10.0, 40.0], [50.0, 20.0, 60.0, 40.0]])
    return Sample(torch.full((3, 64, 64), 90, dtype=torch.uint8), boxes, masks)


def test_people_cropped_away_are_dropped() -> None:
    sample = _left_and_right_people()
    # Zoom 2x, window at the right edge: the left person leaves the frame entirely.
    out = drop_lost_instances(fit_crop(sample, (64, 64), 2.0, (0.5, 1.0)))
    assert out.boxes.shape == (1, 4) and out.masks.shape == (1, 64, 64)
    torch.testing.assert_close(out.boxes, torch.tensor([[36.0, 8.0, 56.0, 48.0]]))
    _assert_masks_inside_boxes(out)
    # Window at the left edge: the right person goes.
    out = drop_lost_instances(fit_crop(sample, (64, 64), 2.0, (0.5, 0.0)))
    torch.testing.assert_close(out.boxes, torch.tensor([[4.0, 8.0, 20.0, 48.0]]))


def test_train_transform_drops_lost_people_keeping_boxes_and_masks_paired() -> None:
    sample = _left_and_right_people()
    aug = AugmentConfig(scale_range=(2.5, 2.5), hflip_prob=0.5)
    transform = TrainTransform((64, 64), aug)
    counts = set()
    for seed in range(12):
        out = transform(sample, torch.Generator().manual_seed(seed))
        assert out.boxes.shape[0] == out.masks.shape[0]
        _assert_masks_inside_boxes(out)
        counts.add(out.boxes.shape[0])
    assert 0 in counts or 1 in counts  # some crops lose a person


# ----------------------------------------------------------------------------------------------- dataset + loader


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic_people")
    return generate_synthetic_people(out, 6, 21, (64, 64), 1, 4, show_progress=False)


def _dataset(ann_path: Path, train: bool = True) -> CocoPeopleDataset:
    transform = TrainTransform((64, 64), AugmentConfig()) if train else EvalTransform((64, 64))
    return CocoPeopleDataset(
        read_coco_people(ann_path), ann_path.parent / "images", (64, 64), (32, 24), transform
    )


@pytest.mark.parametrize("train", [True, False])
def test_dataset_items_on_synthetic_data(synthetic_set: Path, train: bool) -> None:
    ds = _dataset(synthetic_set, train)
    assert len(ds) == 6
    rois = with_target = 0
    for i in range(len(ds)):
        item = ds[(i, 1000 + i)] if train else ds[i]
        assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.uint8
        k = item["boxes"].shape[0]
        assert item["boxes"].shape == (k, 4) and item["boxes"].dtype == torch.float32
        assert item["roi_masks"].shape == (k, 32, 24) and item["roi_masks"].dtype == torch.uint8
        assert set(item["roi_masks"].unique().tolist()) <= {0, 1, 2}
        assert item["image_id"] == i and item["index"] == i
        rois += k
        with_target += int((item["roi_masks"] == TARGET).flatten(1).any(1).sum())
    assert rois >= 6
    assert with_target >= 0.9 * rois


def test_dataset_int_index_is_deterministic(synthetic_set: Path) -> None:
    ds = _dataset(synthetic_set, train=True)
    torch.testing.assert_close(ds[3]["image"], ds[3]["image"], rtol=0, atol=0)
    a, b = ds[(3, 1)], ds[(3, 2)]
    assert not torch.equal(a["image"], b["image"])


def _batches(loader: Any, epoch: int) -> list[dict[str, Any]]:
    loader.sampler.set_epoch(epoch)
    return list(loader)


def test_loader_batches_and_roi_indexing(synthetic_set: Path) -> None:
    ds = _dataset(synthetic_set)
    loader = build_loader(ds, batch_size=4, shuffle=True, seed=5, num_workers=0, pin_memory=False)
    assert isinstance(loader.sampler, EpochSeededSampler)
    batches = _batches(loader, 0)
    assert [len(b["indices"]) for b in batches] == [4, 2]
    assert sorted(i for b in batches for i in b["indices"]) == list(range(6))
    seeds = [seed for _, seed in loader.sampler]
    position = 0
    more_rois_than_images = False
    for batch in batches:
        b = len(batch["indices"])
        n = batch["rois"].shape[0]
        assert batch["images"].shape == (b, 3, 64, 64) and batch["images"].dtype == torch.uint8
        assert batch["rois"].shape == (n, 5) and batch["masks"].shape == (n, 32, 24)
        more_rois_than_images |= n > b
        # rois[:, 0] says which image of this batch each ROI belongs to, in order.
        for j, index in enumerate(batch["indices"]):
            item = ds[(index, seeds[position])]
            position += 1
            own = batch["rois"][:, 0] == j
            torch.testing.assert_close(batch["rois"][own, 1:], item["boxes"], rtol=0, atol=0)
            torch.testing.assert_close(batch["masks"][own], item["roi_masks"], rtol=0, atol=0)
            torch.testing.assert_close(batch["images"][j], item["image"], rtol=0, atol=0)
        assert set(batch["rois"][:, 0].long().tolist()) <= set(range(b))
        assert torch.equal(batch["rois"][:, 0], batch["rois"][:, 0].sort().values)
    assert more_rois_than_images  # the UNet-once-per-image contract is actually exercised


def test_loader_same_seed_and_epoch_repeat_other_epoch_differs(synthetic_set: Path) -> None:
    ds = _dataset(synthetic_set)
    make = lambda: build_loader(ds, 3, True, 9, 0, False)  # noqa: E731
    first, second = _batches(make(), 2), _batches(make(), 2)
    assert [b["indices"] for b in first] == [b["indices"] for b in second]
    for x, y in zip(first, second, strict=True):
        for key in ("images", "rois", "masks"):
            torch.testing.assert_close(x[key], y[key], rtol=0, atol=0)
    other = _batches(make(), 3)
    assert [b["indices"] for b in other] != [b["indices"] for b in first]
    sampler = EpochSeededSampler(6, True, 9)
    sampler.set_epoch(2)
    assert [i for i, _ in sampler] == [i for b in first for i in b["indices"]]
    unshuffled = EpochSeededSampler(6, False, 9)
    assert [i for i, _ in unshuffled] == list(range(6))


def test_loader_independent_of_worker_count(synthetic_set: Path) -> None:
    ds = _dataset(synthetic_set)
    single = _batches(build_loader(ds, 4, True, 1, 0, False), 1)
    multi = _batches(build_loader(ds, 4, True, 1, 2, False), 1)
    assert [b["indices"] for b in single] == [b["indices"] for b in multi]
    for x, y in zip(single, multi, strict=True):
        for key in ("images", "rois", "masks"):
            torch.testing.assert_close(x[key], y[key], rtol=0, atol=0)


def test_loader_iteration_leaves_torch_global_rng_alone(synthetic_set: Path) -> None:
    """A checkpoint saves torch's global RNG state. A loader's first iter() (a persistent one: once per process)
    must not draw from it, or a resumed run saves another state than an uninterrupted one (the kill soak's
    finding). Both shuffled and fixed-order loaders, with and without workers."""
    ds = _dataset(synthetic_set)
    for shuffle, workers in ((True, 0), (False, 0), (True, 1), (False, 1)):
        loader = build_loader(ds, 4, shuffle, 3, workers, False)
        torch.manual_seed(123)
        before = torch.get_rng_state()
        _batches(loader, 0)
        _batches(loader, 1)
        assert torch.equal(torch.get_rng_state(), before), (shuffle, workers)


# ----------------------------------------------------------------------------------------------- data paths


def test_resolve_data_paths_generates_once_and_reuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = ExperimentConfig(
        data={
            "synthetic": {"root": "gen/people", "train_images": 4, "val_images": 2, "image_size": (64, 64)},
            "input_size": (64, 64),
            "min_box_size": 0.0,
        },
        model={"mask_size": (32, 24)},
    )
    assert not (tmp_path / "gen").exists()

    not_generated = resolve_data_paths(cfg.data, generate=False)
    assert not (tmp_path / "gen").exists()
    paths = resolve_data_paths(cfg.data)
    assert paths == not_generated
    assert paths.train_annotations.resolve().is_relative_to(tmp_path / "gen" / "people")
    assert paths.train_annotations != paths.val_annotations
    for key in ("train_annotations", "val_annotations"):
        assert getattr(paths, key).is_file()
    assert len(list(paths.train_images.glob("*.jpg"))) == 4
    assert len(list(paths.val_images.glob("*.jpg"))) == 2
    mtimes = (paths.train_annotations.stat().st_mtime_ns, paths.val_annotations.stat().st_mtime_ns)

    def no_regeneration(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("synthetic dataset regenerated although it exists")

    monkeypatch.setattr(synthetic, "generate_synthetic_people", no_regeneration)
    again = resolve_data_paths(cfg.data)
    assert again == paths
    assert (paths.train_annotations.stat().st_mtime_ns, paths.val_annotations.stat().st_mtime_ns) == mtimes

    train, val = build_datasets(cfg)
    assert (len(train), len(val)) == (4, 2)
    assert train[0]["image"].shape == (3, 64, 64) and val[1]["roi_masks"].shape[1:] == (32, 24)


def test_explicit_paths_win_over_synthetic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("t.json", "v.json"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "t").mkdir()
    (tmp_path / "v").mkdir()
    cfg = ExperimentConfig(
        data={
            "train_annotations": "t.json",
            "train_images": "t",
            "val_annotations": "v.json",
            "val_images": "v",
            "synthetic": {"root": "gen", "train_images": 4, "val_images": 2, "image_size": (64, 64)},
        }
    )
    paths = resolve_data_paths(cfg.data)
    assert paths.train_annotations == Path("t.json") and paths.val_images == Path("v")
    assert not (tmp_path / "gen").exists()


def test_missing_explicit_path_fails_before_any_generation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = ExperimentConfig(
        data={
            "train_annotations": "missing.json",
            "synthetic": {"root": "gen", "train_images": 4, "val_images": 2, "image_size": (64, 64)},
        }
    )
    with pytest.raises(DataError, match="missing.json"):
        resolve_data_paths(cfg.data)
    assert not (tmp_path / "gen").exists()


def test_sampler_blocks_per_rank_match_single_process_micro_batches():
    """N ranks with batch b see exactly the micro-batches of one process with batch b (DDP == accumulation)."""
    single = list(EpochSeededSampler(12, True, 5, batch_size=2))
    ranks = [list(EpochSeededSampler(12, True, 5, batch_size=2, rank=r, world_size=3)) for r in range(3)]
    assert all(len(r) == 4 for r in ranks)
    for k in range(2):  # global batch k = micro-batches 3k, 3k+1, 3k+2 of the single process
        for r in range(3):
            assert ranks[r][2 * k : 2 * k + 2] == single[6 * k + 2 * r : 6 * k + 2 * r + 2]


def test_sampler_pads_training_evenly_and_shards_evaluation_exactly_once():
    train = [list(EpochSeededSampler(7, True, 1, batch_size=2, rank=r, world_size=2)) for r in range(2)]
    assert len(train[0]) == len(train[1]) == 4  # 7 padded to 8: same number of steps on every rank
    evals = [
        EpochSeededSampler(7, False, 1, batch_size=2, rank=r, world_size=2, pad_even=False) for r in range(2)
    ]
    seen = sorted(i for s in evals for i, _ in s)
    assert seen == list(range(7)) and len(evals[0]) + len(evals[1]) == 7


def test_sampler_skip_resumes_mid_epoch_with_the_same_seeds():
    full = EpochSeededSampler(10, True, 3, batch_size=2)
    full.set_epoch(4)
    resumed = EpochSeededSampler(10, True, 3, batch_size=2)
    resumed.set_epoch(4, skip_batches=3)
    assert list(resumed) == list(full)[6:]
