"""Tests for the synthetic people generator: determinism, COCO validity, modal masks, reuse and CLI."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from kdlab.data import synthetic
from kdlab.data.synthetic import (
    GENERATOR_VERSION,
    ensure_synthetic_dataset,
    generate_synthetic_people,
    render_synthetic_image,
)

# Non-square on purpose: a height/width mix-up anywhere shows up as a shape mismatch.
SIZE = (160, 192)
NUM = 16
SEED = 7
MAX_PEOPLE = 5


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    return generate_synthetic_people(out, NUM, SEED, SIZE, 1, MAX_PEOPLE, show_progress=False)


def _jpegs(ann_path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((ann_path.parent / "images").glob("*.jpg"))}


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    a = generate_synthetic_people(tmp_path / "a", 5, 3, (96, 128), show_progress=False)
    b = generate_synthetic_people(tmp_path / "b", 5, 3, (96, 128), show_progress=False)
    c = generate_synthetic_people(tmp_path / "c", 5, 4, (96, 128), show_progress=False)
    assert a.read_bytes() == b.read_bytes()
    jpegs_a, jpegs_b, jpegs_c = _jpegs(a), _jpegs(b), _jpegs(c)
    assert list(jpegs_a) == [f"{i:06d}.jpg" for i in range(5)]
    assert jpegs_a == jpegs_b
    assert all(jpegs_a[name] != jpegs_c[name] for name in jpegs_a)
    assert a.read_bytes() != c.read_bytes()


def test_coco_structure(dataset: Path) -> None:
    coco = COCO(str(dataset))
    assert coco.loadCats(coco.getCatIds(catNms=["person"])) == [
        {"id": 1, "name": "person", "supercategory": "person"}
    ]
    assert sorted(coco.getImgIds()) == list(range(NUM))
    for img_id in range(NUM):
        img = coco.loadImgs([img_id])[0]
        assert img["file_name"] == f"{img_id:06d}.jpg"
        assert (img["height"], img["width"]) == SIZE
        with Image.open(dataset.parent / "images" / img["file_name"]) as im:
            assert im.size == (SIZE[1], SIZE[0]) and im.mode == "RGB"

    info = coco.dataset["info"]
    assert info["generator_version"] == GENERATOR_VERSION and info["seed"] == SEED
    assert info["num_images"] == NUM and info["image_size"] == list(SIZE)
    assert (info["min_people"], info["max_people"]) == (1, MAX_PEOPLE)

    anns = coco.dataset["annotations"]
    assert [a["id"] for a in anns] == list(range(1, len(anns) + 1))
    assert all(a["iscrowd"] == 0 and a["category_id"] == 1 for a in anns)
    counts = [len(coco.getAnnIds(imgIds=[i])) for i in range(NUM)]
    assert all(0 <= c <= MAX_PEOPLE for c in counts)
    assert sum(c >= 1 for c in counts) >= NUM - 1
    assert len(set(counts)) >= 3  # the number of people varies

    kinds = {"rle" if isinstance(a["segmentation"], dict) else "polygon" for a in anns}
    assert kinds == {"rle", "polygon"}
    h, w = SIZE
    for a in anns:
        seg = a["segmentation"]
        if isinstance(seg, dict):
            assert seg["size"] == [h, w] and isinstance(seg["counts"], str)
        else:
            assert seg and all(len(p) >= 6 and len(p) % 2 == 0 for p in seg)
            xs = np.array([v for p in seg for v in p[0::2]])
            ys = np.array([v for p in seg for v in p[1::2]])
            assert xs.min() >= 0 and xs.max() <= w and ys.min() >= 0 and ys.max() <= h


def test_decoded_masks_match_generator_and_are_disjoint(dataset: Path) -> None:
    coco = COCO(str(dataset))
    for img_id in range(NUM):
        sample = render_synthetic_image(img_id, SEED, SIZE, 1, MAX_PEOPLE)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img_id]))
        assert len(anns) == len(sample.visible_masks)
        coverage = np.zeros(SIZE, dtype=np.int32)
        for ann, expected in zip(anns, sample.visible_masks, strict=True):
            decoded = coco.annToMask(ann).astype(bool)
            assert decoded.shape == SIZE
            np.testing.assert_array_equal(decoded, expected)
            assert ann["area"] == float(decoded.sum()) >= synthetic.MIN_VISIBLE_AREA
            ys, xs = np.nonzero(decoded)
            x0, y0, x1, y1 = xs.min(), ys.min(), xs.max(), ys.max()
            assert ann["bbox"] == [float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)]
            coverage += decoded
        assert coverage.max() <= 1, f"image {img_id}: two annotations claim the same pixel"

        # The written JPEG is the rendered image (up to JPEG loss).
        with Image.open(dataset.parent / "images" / f"{img_id:06d}.jpg") as im:
            pixels = np.asarray(im.convert("RGB"), dtype=np.float32)
        # JPEG drops the pixel noise, so compare 8x8 block means (160 x 192 divides evenly).
        diff = (pixels - sample.image.astype(np.float32)).reshape(20, 8, 24, 8, 3).mean(axis=(1, 3))
        assert float(np.abs(diff).mean()) < 2.0


def test_paint_is_confined_to_annotated_masks(dataset: Path) -> None:
    """People are painted exactly on their masks: background elsewhere, clearly different pixels inside."""
    h, w = SIZE
    for img_id in range(4):
        sample = render_synthetic_image(img_id, SEED, SIZE, 1, MAX_PEOPLE)
        # The background is the first thing drawn from the image's generator, so it can be re-created.
        background = synthetic._background(np.random.default_rng([SEED, img_id]), h, w)
        background = np.clip(np.rint(background), 0, 255).astype(np.uint8)
        person = np.zeros(SIZE, dtype=bool)
        for m in sample.visible_masks:
            person |= m
        np.testing.assert_array_equal(sample.image[~person], background[~person])
        if person.any():
            diff = np.abs(sample.image[person].astype(np.int32) - background[person].astype(np.int32))
            assert float(diff.mean()) > 10.0
            assert (
                float(sample.image[person].astype(np.float32).std(axis=0).mean()) > 5.0
            )  # not one flat colour


def test_ensure_reuses_matching_dataset_and_regenerates_otherwise(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "ds"
    caplog.set_level(logging.INFO, logger="kdlab.data.synthetic")
    path = ensure_synthetic_dataset(out, 4, 1, (64, 80), 1, 3)
    first_json = path.read_bytes()
    mtimes = {p: p.stat().st_mtime_ns for p in [path, *sorted((out / "images").glob("*.jpg"))]}

    caplog.clear()
    assert ensure_synthetic_dataset(out, 4, 1, (64, 80), 1, 3) == path
    assert any("Reusing" in r.getMessage() for r in caplog.records)
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes

    # Different parameters: regenerated, and images left over from the larger dataset are removed.
    caplog.clear()
    ensure_synthetic_dataset(out, 3, 2, (64, 80), 1, 3)
    assert not any("Reusing" in r.getMessage() for r in caplog.records)
    data = json.loads(path.read_text())
    assert data["info"]["seed"] == 2 and len(data["images"]) == 3
    assert sorted(p.name for p in (out / "images").glob("*.jpg")) == [f"{i:06d}.jpg" for i in range(3)]

    # A missing image makes the dataset incomplete: regenerate rather than reuse.
    (out / "images" / "000001.jpg").unlink()
    ensure_synthetic_dataset(out, 3, 2, (64, 80), 1, 3)
    assert (out / "images" / "000001.jpg").is_file()

    # Back to the first parameters: identical to the first generation.
    ensure_synthetic_dataset(out, 4, 1, (64, 80), 1, 3)
    assert path.read_bytes() == first_json


def test_interrupted_generation_leaves_no_annotations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "ds"
    generate_synthetic_people(out, 3, 0, (64, 64), show_progress=False)
    real_render = synthetic.render_synthetic_image

    def failing_render(index: int, *args: object, **kwargs: object) -> synthetic.SyntheticImage:
        if index == 2:
            raise KeyboardInterrupt
        return real_render(index, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(synthetic, "render_synthetic_image", failing_render)
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic_people(out, 3, 5, (64, 64), show_progress=False)
    assert not (out / "annotations.json").exists()
    assert [p.name for p in out.iterdir()] == ["images"]  # no temp file left either


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_images": 0}, "num_images"),
        ({"image_size": (16, 64)}, "image_size"),
        ({"min_people": 0}, "min_people"),
        ({"min_people": 4, "max_people": 2}, "min_people"),
    ],
)
def test_invalid_arguments_raise(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    params: dict[str, object] = {"num_images": 2, "seed": 0, "image_size": (64, 64), **kwargs}
    with pytest.raises(ValueError, match=message):
        generate_synthetic_people(tmp_path, show_progress=False, **params)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        ensure_synthetic_dataset(tmp_path, **params)  # type: ignore[arg-type]
    assert not (tmp_path / "annotations.json").exists()
