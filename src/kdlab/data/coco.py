"""COCO instances -> per-image people samples (image, every person box as an ROI, each ROI's 3-class mask).

The person category is found by name (ids differ between files, and image or category ids may be 0);
crowd annotations are skipped; polygons and RLE both work (pycocotools decodes them); images without
people are kept or dropped by configuration. Broken files fail with a `DataError` naming the file.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from kdlab.data.roi_masks import build_roi_masks
from kdlab.data.seeds import mixed_index_seed
from kdlab.data.transforms import EvalTransform, Sample, TrainTransform
from kdlab.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class PersonAnnotation:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in original image pixels
    segmentation: Any
    annotation_id: Any


@dataclass
class ImageRecord:
    image_id: Any
    file_name: str
    height: int
    width: int
    people: list[PersonAnnotation] = field(default_factory=list)


def image_path(images_dir: str | Path, file_name: str) -> Path:
    """Where a COCO image entry's `file_name` lies: relative to the images folder, subfolders included
    (`JPEGImages/x.jpg`, as COCO exports such as labelme's write it). Training (data.*_images) and
    kdlab-predict (--images FOLDER) both resolve names here."""
    return Path(images_dir) / file_name


def _load_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{what} file {path} does not exist (set data.{what} to a COCO instances JSON)")
    try:
        with path.open("rb") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{what} file {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise DataError(f"{what} file {path} is not a COCO instances file (top level is not an object)")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise DataError(
            f"{what} file {path} is not a COCO instances file (missing list(s): {', '.join(missing)})"
        )
    return data


def _polygon_ok(seg: Any) -> bool:
    return (
        isinstance(seg, list)
        and len(seg) > 0
        and all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in seg)
    )


def read_coco_people(
    annotations: str | Path,
    person_category: str = "person",
    min_box_size: float = 0.0,
    keep_images_without_people: bool = True,
    max_images: int | None = None,
    what: str = "annotations",
) -> list[ImageRecord]:
    """Parse a COCO instances file into per-image person records (validated, crowd skipped)."""
    path = Path(annotations)
    data = _load_json(path, what)
    person_ids = [
        c.get("id") for c in data["categories"] if isinstance(c, dict) and c.get("name") == person_category
    ]
    if not person_ids:
        names = sorted({str(c.get("name")) for c in data["categories"] if isinstance(c, dict)})
        shown = ", ".join(names[:10]) or "none"
        raise DataError(
            f"{what} file {path} has no '{person_category}' category (categories: {shown}); "
            "set data.person_category to the right name"
        )
    person_set = set(person_ids)
    records: dict[Any, ImageRecord] = {}
    for img in data["images"]:
        try:
            records[img["id"]] = ImageRecord(
                img["id"], str(img["file_name"]), int(img["height"]), int(img["width"])
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(
                f"{what} file {path}: image entry {img!r:.80} lacks id/file_name/height/width"
            ) from exc
    for ann in data["annotations"]:
        if not isinstance(ann, dict) or ann.get("category_id") not in person_set or ann.get("iscrowd", 0):
            continue
        rec = records.get(ann.get("image_id"))
        ann_id = ann.get("id")
        if rec is None:
            raise DataError(
                f"{what} file {path}: annotation {ann_id} refers to unknown image_id {ann.get('image_id')}"
            )
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise DataError(f"{what} file {path}: annotation {ann_id} has no valid bbox [x, y, w, h]")
        x, y, w, h = (float(v) for v in bbox)
        if not all(math.isfinite(v) for v in (x, y, w, h)) or w < 0 or h < 0:
            raise DataError(f"{what} file {path}: annotation {ann_id} has an invalid bbox {bbox}")
        x1, y1 = max(0.0, x), max(0.0, y)
        x2, y2 = min(float(rec.width), x + w), min(float(rec.height), y + h)
        if x2 <= x1 or y2 <= y1:
            raise DataError(
                f"{what} file {path}: annotation {ann_id} bbox {bbox} lies outside its "
                f"{rec.width}x{rec.height} image {rec.file_name}"
            )
        if min(x2 - x1, y2 - y1) < min_box_size:
            continue
        seg = ann.get("segmentation")
        if isinstance(seg, list):
            if not _polygon_ok(seg):
                raise DataError(
                    f"{what} file {path}: annotation {ann_id} has no polygon or a polygon with fewer than 3 points "
                    "(or an odd number of coordinates)"
                )
        elif not (isinstance(seg, dict) and "counts" in seg and "size" in seg):
            raise DataError(f"{what} file {path}: annotation {ann_id} has no polygon or RLE segmentation")
        elif not isinstance(seg["size"], (list, tuple)) or list(seg["size"]) != [rec.height, rec.width]:
            raise DataError(
                f"{what} file {path}: annotation {ann_id} has an RLE of size {seg['size']} (height, width) "
                f"but its image {rec.file_name} has height {rec.height}, width {rec.width}"
            )
        rec.people.append(PersonAnnotation((x1, y1, x2, y2), seg, ann_id))
    out = [r for r in records.values() if r.people or keep_images_without_people]
    if max_images is not None:
        out = out[:max_images]
    if not out:
        raise DataError(
            f"{what} file {path} has no usable images with '{person_category}' annotations "
            f"(after skipping crowd and boxes smaller than data.min_box_size={min_box_size})"
        )
    return out


def decode_person_mask(seg: Any, height: int, width: int) -> np.ndarray:
    """Polygon list or (compressed/uncompressed) RLE -> bool [H,W] (polygons of one person are unioned)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pycocotools' numpy-2 `copy=` notice
        return _decode_person_mask(seg, height, width)


def _decode_person_mask(seg: Any, height: int, width: int) -> np.ndarray:
    if isinstance(seg, list):
        rles = mask_utils.frPyObjects(seg, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = dict(seg)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    return mask_utils.decode(rle).astype(bool)


def read_image(path: Path) -> torch.Tensor:
    """Decode an image file to uint8 RGB [3,H,W]; a missing or truncated file raises DataError."""
    if not path.is_file():
        raise DataError(f"image file {path} does not exist (check data.*_images)")
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"))  # decodes fully: a truncated file raises here
    except Exception as exc:
        raise DataError(f"image file {path} could not be decoded ({type(exc).__name__}: {exc})") from exc
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class CocoPeopleDataset(Dataset):
    """Per image: uint8 image at the input size, person boxes (the ROIs) and their 3-class masks.

    Items are indexed by int or by `(index, seed)` (what `EpochSeededSampler` yields), the seed driving
    augmentation. A bad image raises DataError, or returns None (counted) with skip_bad_images.
    """

    def __init__(
        self,
        records: list[ImageRecord],
        images_dir: str | Path,
        input_size: tuple[int, int],
        mask_size: tuple[int, int],
        transform: TrainTransform | EvalTransform,
        max_rois_per_image: int | None = None,
        skip_bad_images: bool = False,
        roi_sampling_ratio: int = 2,
        roi_margin: float = 0.0,
    ) -> None:
        self.records = records
        self.images_dir = Path(images_dir)
        self.input_size = tuple(input_size)
        self.mask_size = tuple(mask_size)
        self.transform = transform
        self.max_rois_per_image = max_rois_per_image
        self.skip_bad_images = skip_bad_images
        self.roi_sampling_ratio = roi_sampling_ratio
        self.roi_margin = roi_margin
        self.bad_images = 0

    def __len__(self) -> int:
        return len(self.records)

    def load_raw(self, index: int) -> Sample:
        """The image and its people at the original resolution, before any transform."""
        rec = self.records[index]
        path = image_path(self.images_dir, rec.file_name)
        image = read_image(path)
        h, w = image.shape[-2:]
        if (h, w) != (rec.height, rec.width):
            raise DataError(f"image file {path} is {w}x{h} but its annotations say {rec.width}x{rec.height}")
        people = rec.people
        if self.max_rois_per_image is not None:
            people = people[: self.max_rois_per_image]
        if people:
            masks = torch.from_numpy(np.stack([decode_person_mask(p.segmentation, h, w) for p in people]))
            boxes = torch.tensor([p.box for p in people], dtype=torch.float32)
        else:
            masks = torch.zeros((0, h, w), dtype=torch.bool)
            boxes = torch.zeros((0, 4), dtype=torch.float32)
        return Sample(image, boxes, masks)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any] | None:
        index, seed = item if isinstance(item, tuple) else (item, mixed_index_seed(item))
        try:
            raw = self.load_raw(index)
        except DataError as exc:
            if not self.skip_bad_images:
                raise
            self.bad_images += 1
            log.warning("skipping bad image (data.skip_bad_images=true): %s", exc)
            return None
        gen = torch.Generator().manual_seed(seed)
        sample = self.transform(raw, gen)
        roi_masks = build_roi_masks(
            sample.masks, sample.boxes, self.mask_size, self.roi_sampling_ratio, self.roi_margin
        )
        return {
            "image": sample.image.contiguous(),
            "boxes": sample.boxes,
            "roi_masks": roi_masks,
            "image_id": self.records[index].image_id,
            "index": index,
        }
