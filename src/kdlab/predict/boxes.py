"""Which images to predict on and the person boxes (ROIs) of each, from one of three sources.

- `--coco instances.json`: the person boxes of a COCO file (the project's loader: person category by name,
  crowd skipped, boxes clipped to the image), its image ids kept;
- `--boxes boxes.json`: `{file_name: [[x1, y1, x2, y2], ...]}` in original-image pixels;
- `--whole_image`: one box covering each image.

With a folder, a box source's file names resolve under it exactly as training resolves a COCO file's names
under data.*_images (`kdlab.data.coco.image_path`: subfolders included, e.g. `JPEGImages/x.jpg`).

Everything here only reads image headers (sizes); a box outside its image, an image without boxes or no
boxes at all fail as one DataError before anything runs or is written.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from kdlab.data.coco import ImageRecord, image_path, read_coco_people
from kdlab.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_CATEGORY_ID = 1  # COCO's person id, used when the boxes do not come from a COCO file


@dataclass
class ImageJob:
    """One image to predict on: its id in predictions.json, file, original size, boxes [K,4] xyxy and its
    name as the box source gives it (a COCO file_name such as `JPEGImages/x.jpg`, a --boxes key)."""

    image_id: Any
    path: Path
    height: int
    width: int
    boxes: np.ndarray  # float32 [K,4], original-image pixels
    file_name: str


@dataclass
class ImageSelection:
    """What `--images` names: the files (a folder's own, not its subfolders'), and the folder when one folder
    was given (a box source's file names resolve under it, subfolders included)."""

    files: list[Path]
    folder: Path | None


@dataclass
class BoxPlan:
    """The images with their boxes, the category id predictions carry and, from --coco, each predicted COCO
    file_name's image path (the metrics pass builds its validation dataset from them)."""

    jobs: list[ImageJob]
    category_id: int
    coco_files: dict[str, Path] | None = None


def select_images(paths: list[str]) -> ImageSelection:
    """`--images`: one folder (its image files, sorted) or image files; a missing path is a DataError. A folder
    may hold its images in subfolders only (a COCO export's `JPEGImages/`): the box source names them."""
    given = [Path(p) for p in paths]
    if len(given) == 1 and given[0].is_dir():
        folder = given[0]
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        return ImageSelection(files, folder)
    for p in given:
        if p.is_dir():
            raise DataError(
                f"--images takes one folder or a list of image files; {p} is a folder among others"
            )
        if not p.is_file():
            raise DataError(f"image file {p} does not exist (check --images)")
    names = [p.name for p in given]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(
            f"--images names two files called {duplicates[0]}; boxes and outputs are keyed by file name, "
            "so give each image a unique name"
        )
    return ImageSelection(sorted(given, key=str), None)


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file header; the pixels are decoded later, when the image is predicted."""
    try:
        with Image.open(path) as img:
            width, height = img.size
    except Exception as exc:
        raise DataError(f"image file {path} is not a readable image ({type(exc).__name__}: {exc})") from exc
    return int(height), int(width)


def clip_box(box: Any, height: int, width: int, where: str) -> list[float]:
    """A finite [x1, y1, x2, y2] clipped to the image (as the COCO loader clips); nothing left is an error."""
    if not (
        isinstance(box, (list, tuple))
        and len(box) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)
    ):
        raise DataError(f"{where}: box {box!r:.60} is not [x1, y1, x2, y2] (four finite numbers)")
    x1, y1, x2, y2 = (float(v) for v in box)
    if x2 <= x1 or y2 <= y1:
        raise DataError(f"{where}: box {list(box)} has x2 <= x1 or y2 <= y1; boxes are [x1, y1, x2, y2]")
    cx1, cy1, cx2, cy2 = max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2)
    if cx2 <= cx1 or cy2 <= cy1:
        raise DataError(
            f"{where}: box {list(box)} lies outside its {width}x{height} image; boxes are in original-image "
            "pixels, x in [0, width], y in [0, height]"
        )
    return [cx1, cy1, cx2, cy2]


def _as_boxes(boxes: list[list[float]]) -> np.ndarray:
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def _numbered(
    boxes_of: dict[Path, list[list[float]]], sizes: dict[Path, tuple[int, int]], names: dict[Path, str]
) -> list[ImageJob]:
    """Jobs with ids = the index in sorted file order (what images.json maps back to file names)."""
    ordered = sorted(boxes_of, key=str)
    return [ImageJob(i, p, *sizes[p], _as_boxes(boxes_of[p]), names[p]) for i, p in enumerate(ordered)]


def whole_image_boxes(selection: ImageSelection) -> BoxPlan:
    if not selection.files:
        raise DataError(
            f"image folder {selection.folder} holds no image files ({', '.join(IMAGE_SUFFIXES)}; its "
            "subfolders are not searched); check --images"
        )
    sizes = {p: image_size(p) for p in selection.files}
    boxes = {p: [[0.0, 0.0, float(w), float(h)]] for p, (h, w) in sizes.items()}
    return BoxPlan(_numbered(boxes, sizes, {p: p.name for p in boxes}), DEFAULT_CATEGORY_ID)


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise DataError(f"{what} file {path} does not exist")
    try:
        with path.open("rb") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{what} file {path} is not valid JSON: {exc}") from exc


def _resolve_names(names: list[str], selection: ImageSelection, source: str) -> dict[str, Path]:
    """Map each file name of a box source to its image: under the folder as training resolves it
    (subfolders included), or among the listed files (by base name)."""
    by_name = {p.name: p for p in selection.files}
    resolved: dict[str, Path] = {}
    missing: list[str] = []
    for name in names:
        if selection.folder is not None:
            path = image_path(selection.folder, name)
            found = path if path.is_file() else None
        else:
            found = by_name.get(Path(name).name)
        if found is None:
            missing.append(name)
        else:
            resolved[name] = found
    if missing and selection.folder is not None:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DataError(
            f"{source} names image {missing[0]}{more} that is not in {selection.folder} (no file "
            f"{image_path(selection.folder, missing[0])}; names resolve under --images as under training's "
            "data.*_images, subfolders included; check --images)"
        )
    return resolved


def _require_all_listed(selection: ImageSelection, used: set[Path], source: str) -> None:
    """An explicitly listed image must be covered by the box source (a folder may hold extra images)."""
    if selection.folder is None:
        unlisted = [p for p in selection.files if p not in used]
        if unlisted:
            raise DataError(
                f"image {unlisted[0]} given with --images has no entry in {source}; add its boxes"
            )


def json_boxes(path: Path, selection: ImageSelection) -> BoxPlan:
    """`--boxes`: {file_name: [[x1, y1, x2, y2], ...]}; each named image must exist and have boxes."""
    data = _read_json(path, "boxes")
    source = f"boxes file {path}"
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise DataError(f"{source} must be an object {{file_name: [[x1, y1, x2, y2], ...]}}")
    if not data:
        raise DataError(f"{source} gives no images; it needs {{file_name: [[x1, y1, x2, y2], ...]}}")
    resolved = _resolve_names(list(data), selection, source)
    ignored = [name for name in data if name not in resolved]
    if ignored:
        raise DataError(f"{source} names image {ignored[0]} that is not among the --images files")
    sizes: dict[Path, tuple[int, int]] = {}
    boxes: dict[Path, list[list[float]]] = {}
    names: dict[Path, str] = {}
    for name, raw_boxes in data.items():
        image = resolved[name]
        if not raw_boxes:
            raise DataError(f"{source} gives no boxes for {name}; add boxes or remove the entry")
        sizes[image] = image_size(image)
        h, w = sizes[image]
        boxes[image] = [clip_box(b, h, w, f"{source}, image {name}") for b in raw_boxes]
        names[image] = name
    _require_all_listed(selection, set(boxes), source)
    skipped = sum(1 for p in selection.files if p not in boxes)
    if skipped:
        log.info(
            "%d image(s) of %s have no entry in %s and are not predicted", skipped, selection.folder, path
        )
    return BoxPlan(_numbered(boxes, sizes, names), DEFAULT_CATEGORY_ID)


def person_category_id(path: Path, person_category: str) -> int:
    """The id of the person category (by name, as the loader finds it) that predictions must carry."""
    data = _read_json(path, "coco")
    ids = [
        c.get("id")
        for c in data.get("categories", [])
        if isinstance(c, dict) and c.get("name") == person_category
    ]
    return int(ids[0])


def coco_boxes(path: Path, selection: ImageSelection, person_category: str) -> BoxPlan:
    """`--coco`: every non-crowd person box of the file's images found in --images (ids kept). Images without
    people are skipped (COCO has many); an image file missing from --images, or no box at all, is an error."""
    records = read_coco_people(path, person_category, 0.0, keep_images_without_people=True, what="coco")
    source = f"coco file {path}"
    with_people = [r for r in records if r.people]
    if len(with_people) < len(records):
        log.info(
            "%d image(s) in %s have no person boxes and are not predicted",
            len(records) - len(with_people),
            path,
        )
    resolved = _resolve_names([r.file_name for r in with_people], selection, source)
    chosen = [r for r in with_people if r.file_name in resolved]
    if selection.folder is None:  # a listed file must be in the COCO file (with or without people)
        known = _resolve_names([r.file_name for r in records], selection, source)
        _require_all_listed(selection, set(known.values()), source)
    jobs: list[ImageJob] = []
    for rec in chosen:
        image = resolved[rec.file_name]
        h, w = image_size(image)
        if (h, w) != (rec.height, rec.width):
            raise DataError(f"image file {image} is {w}x{h} but {source} says {rec.width}x{rec.height}")
        people = _as_boxes([list(p.box) for p in rec.people])
        jobs.append(ImageJob(rec.image_id, image, h, w, people, rec.file_name))
    if not jobs:
        raise DataError(f"{source} has no person boxes for the --images given; nothing to predict")
    files = {r.file_name: resolved[r.file_name] for r in chosen}
    return BoxPlan(jobs, person_category_id(path, person_category), files)


def records_at_paths(records: list[ImageRecord], files: dict[str, Path]) -> list[ImageRecord]:
    """The records of `files` (COCO file_name -> image path), their file_name replaced by the absolute path,
    so a dataset finds each image wherever --images put it."""
    return [
        ImageRecord(r.image_id, str(files[r.file_name].resolve()), r.height, r.width, list(r.people))
        for r in records
        if r.file_name in files
    ]
