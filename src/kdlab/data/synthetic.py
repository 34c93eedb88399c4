"""Synthetic people generator writing a real COCO instance-segmentation dataset.

Each image has a textured background and 1..N person-like figures (head, neck, torso, two-segment arms and
legs, optional hands and feet) in varied poses and scales that often overlap. Annotations are modal, like
real COCO: a figure that nothing covers is stored as its part polygons, an occluded one as the compressed
RLE of its visible pixels. All masks come from pycocotools' own polygon rasteriser, and the figures are
painted with exactly those masks, so pixels, stored annotations and `COCO.annToMask` agree exactly.

Output is fully deterministic by seed (one `numpy.random.Generator` per image derived from the dataset
seed and the image index), including the JPEG bytes. Used for the quick-start configs and for tests, so that
the whole pipeline can run without downloading COCO.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from pycocotools import mask as mask_utils
from tqdm import tqdm

from kdlab.atomic_io import atomic_path

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
DESCRIPTION = "kdlab synthetic people"
MIN_VISIBLE_AREA = 64
MIN_IMAGE_SIDE = 32
PERSON_CATEGORY: dict[str, Any] = {"id": 1, "name": "person", "supercategory": "person"}
ANNOTATIONS_NAME = "annotations.json"
IMAGES_DIRNAME = "images"
JPEG_QUALITY = 90

# Paint order of materials inside one figure (legs first, head and hands on top).
_SKIN, _SHIRT, _TROUSERS, _SHOES = "skin", "shirt", "trousers", "shoes"
_SKIN_TONES = np.array(
    [[255, 224, 196], [241, 194, 155], [224, 172, 128], [198, 134, 90], [160, 102, 62], [110, 70, 45]],
    dtype=np.float32,
)


@dataclass(frozen=True)
class _Part:
    """One polygon of a figure and the material it is painted with."""

    polygon: np.ndarray  # (k, 2) float64, x/y image coordinates
    material: str


@dataclass
class _Figure:
    """A person-like figure: its parts in paint order and its materials."""

    parts: list[_Part]
    materials: dict[str, dict[str, Any]]
    bottom: float = 0.0


@dataclass
class SyntheticImage:
    """One rendered image, its modal annotations (without ids) and the visible mask of each annotation."""

    image: np.ndarray  # (h, w, 3) uint8
    annotations: list[dict[str, Any]]
    visible_masks: list[np.ndarray] = field(default_factory=list)  # (h, w) bool, one per annotation
    num_figures: int = 0  # figures generated, including hidden ones that were dropped


# ----------------------------------------------------------------------------------------------- geometry


def _rotate(v: np.ndarray, angle: float) -> np.ndarray:
    """Rotate a 2-vector by `angle` radians (positive = clockwise on screen, since y points down)."""
    c, s = math.cos(angle), math.sin(angle)
    return np.array([v[0] * c - v[1] * s, v[0] * s + v[1] * c])


def _segment(p0: np.ndarray, p1: np.ndarray, thickness: float, extend: float = 0.35) -> np.ndarray:
    """A thick segment p0->p1 as a rotated rectangle, slightly extended at both ends to close joints."""
    d = p1 - p0
    length = float(np.hypot(d[0], d[1])) or 1e-6
    u = d / length
    n = np.array([-u[1], u[0]]) * (thickness / 2.0)
    a, b = p0 - u * thickness * extend, p1 + u * thickness * extend
    return np.stack([a + n, b + n, b - n, a - n])


def _ellipse(center: np.ndarray, rx: float, ry: float, angle: float, vertices: int = 16) -> np.ndarray:
    """A rotated ellipse as a polygon with `vertices` vertices."""
    t = np.linspace(0.0, 2.0 * math.pi, vertices, endpoint=False)
    pts = np.stack([rx * np.cos(t), ry * np.sin(t)], axis=1)
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, s], [-s, c]])
    return pts @ rot + center


def _clip_polygon(poly: np.ndarray, width: int, height: int) -> np.ndarray:
    """Clip a polygon to the image rectangle [0, width] x [0, height] (Sutherland-Hodgman)."""

    def clip(points: list[np.ndarray], axis: int, limit: float, keep_below: bool) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        if not points:
            return out
        prev = points[-1]
        prev_in = prev[axis] <= limit if keep_below else prev[axis] >= limit
        for cur in points:
            cur_in = cur[axis] <= limit if keep_below else cur[axis] >= limit
            if cur_in != prev_in:
                t = (limit - prev[axis]) / (cur[axis] - prev[axis])
                out.append(prev + t * (cur - prev))
            if cur_in:
                out.append(cur)
            prev, prev_in = cur, cur_in
        return out

    pts = list(poly)
    for axis, limit, keep_below in (
        (0, 0.0, False),
        (0, float(width), True),
        (1, 0.0, False),
        (1, float(height), True),
    ):
        pts = clip(pts, axis, limit, keep_below)
    return np.array(pts, dtype=np.float64).reshape(-1, 2)


def _coco_polygons(parts: list[_Part], width: int, height: int) -> tuple[list[list[float]], list[str]]:
    """Parts clipped to the image and rounded to 2 decimals in COCO form, with the material of each kept part."""
    polygons: list[list[float]] = []
    materials: list[str] = []
    for part in parts:
        clipped = np.round(_clip_polygon(part.polygon, width, height), 2)
        if len(clipped) < 3:
            continue
        polygons.append([round(float(v), 2) for v in clipped.reshape(-1)])
        materials.append(part.material)
    return polygons, materials


# ----------------------------------------------------------------------------------------------- figures


def _random_colour(rng: np.random.Generator, lo: float = 20.0, hi: float = 235.0) -> np.ndarray:
    """A random RGB colour."""
    return rng.uniform(lo, hi, size=3).astype(np.float32)


def _random_materials(rng: np.random.Generator) -> dict[str, dict[str, Any]]:
    """Clothing and skin colours with a pattern for the shirt, so figures are not a single flat colour."""
    skin = _SKIN_TONES[rng.integers(len(_SKIN_TONES))] + rng.normal(0.0, 8.0, size=3).astype(np.float32)
    shirt_pattern = str(rng.choice(["plain", "stripes", "checks"], p=[0.5, 0.3, 0.2]))
    return {
        _SKIN: {"base": np.clip(skin, 0, 255), "pattern": "plain", "noise": 5.0},
        _SHIRT: {
            "base": _random_colour(rng),
            "alt": _random_colour(rng),
            "pattern": shirt_pattern,
            "period": float(rng.uniform(4.0, 14.0)),
            "noise": float(rng.uniform(4.0, 12.0)),
        },
        _TROUSERS: {
            "base": _random_colour(rng, 10, 200),
            "pattern": "plain",
            "noise": float(rng.uniform(4.0, 10.0)),
        },
        _SHOES: {"base": _random_colour(rng, 0, 120), "pattern": "plain", "noise": 4.0},
    }


def _build_figure(rng: np.random.Generator, fig_height: float) -> _Figure:
    """A figure with its hip centre at the origin: body proportions of `fig_height`, random pose."""
    h = fig_height
    lean = float(rng.normal(0.0, 0.12))
    up = np.array([math.sin(lean), -math.cos(lean)])
    down = -up
    right = np.array([math.cos(lean), math.sin(lean)])  # perpendicular, towards +x

    build = float(rng.uniform(0.85, 1.2))  # slim .. broad
    torso_len, neck_len = 0.30 * h, 0.035 * h
    shoulder_w, hip_w = 0.22 * h * build, 0.17 * h * build
    arm_t, forearm_t = 0.060 * h * build, 0.050 * h * build
    thigh_t, shin_t = 0.085 * h * build, 0.068 * h * build
    upper_arm, lower_arm = 0.17 * h, 0.16 * h
    upper_leg, lower_leg = 0.25 * h, 0.23 * h
    head_rx, head_ry = 0.052 * h, 0.068 * h

    hip = np.zeros(2)
    neck_base = hip + up * torso_len
    short_sleeves = rng.random() < 0.45
    shorts = rng.random() < 0.2
    parts_legs: list[_Part] = []
    parts_arms: list[_Part] = []
    parts_extra: list[_Part] = []
    seated = rng.random() < 0.12

    for side in (-1.0, 1.0):
        # Legs: outward spread, knee bend either way; sometimes a raised (seated / kicking) thigh.
        hip_joint = hip + right * side * (hip_w / 2.0 - thigh_t / 2.0) + down * 0.02 * h
        spread = float(rng.uniform(1.0, 1.4) if seated and side > 0 else rng.uniform(-0.15, 0.45))
        thigh_dir = _rotate(down, -side * spread)
        knee = hip_joint + thigh_dir * upper_leg
        bend = float(rng.uniform(-0.7, 0.7))
        if seated and side > 0:
            bend = float(side * rng.uniform(0.9, 1.4))
        shin_dir = _rotate(thigh_dir, bend)
        ankle = knee + shin_dir * lower_leg
        parts_legs.append(_Part(_segment(hip_joint, knee, thigh_t), _TROUSERS))
        parts_legs.append(_Part(_segment(knee, ankle, shin_t), _SKIN if shorts else _TROUSERS))
        if rng.random() < 0.8:
            toe = ankle + right * float(rng.choice([-1.0, 1.0])) * 0.09 * h
            parts_extra.append(_Part(_segment(ankle, toe, 0.045 * h, extend=0.5), _SHOES))

        # Arms: hang, spread or raise; elbow bend either way.
        shoulder = neck_base + right * side * (shoulder_w / 2.0 - arm_t / 2.0) + down * arm_t * 0.3
        raise_angle = float(rng.uniform(-0.3, 2.7) if rng.random() < 0.35 else rng.uniform(-0.2, 0.8))
        arm_dir = _rotate(down, -side * raise_angle)
        elbow = shoulder + arm_dir * upper_arm
        forearm_dir = _rotate(arm_dir, float(rng.uniform(-1.8, 1.8)))
        wrist = elbow + forearm_dir * lower_arm
        parts_arms.append(_Part(_segment(shoulder, elbow, arm_t), _SHIRT))
        parts_arms.append(_Part(_segment(elbow, wrist, forearm_t), _SKIN if short_sleeves else _SHIRT))
        if rng.random() < 0.8:
            hand = wrist + forearm_dir * 0.025 * h
            parts_extra.append(
                _Part(_ellipse(hand, 0.032 * h, 0.026 * h, float(rng.uniform(0, math.pi)), 10), _SKIN)
            )

    hip_l = hip - right * hip_w / 2.0 + down * 0.03 * h
    hip_r = hip + right * hip_w / 2.0 + down * 0.03 * h
    sh_l = neck_base - right * shoulder_w / 2.0
    sh_r = neck_base + right * shoulder_w / 2.0
    torso = _Part(np.stack([hip_l, hip_r, sh_r, sh_l]), _SHIRT)
    neck_top = neck_base + up * neck_len
    neck = _Part(_segment(neck_base, neck_top, 0.05 * h, extend=0.2), _SKIN)
    head_tilt = float(rng.normal(0.0, 0.15))
    head_center = neck_top + _rotate(up, head_tilt) * head_ry * 0.85
    head = _Part(_ellipse(head_center, head_rx, head_ry, lean + head_tilt, 16), _SKIN)

    shoes = [p for p in parts_extra if p.material == _SHOES]
    hands = [p for p in parts_extra if p.material != _SHOES]
    parts = parts_legs + shoes + [torso] + parts_arms + [neck, head] + hands
    return _Figure(parts=parts, materials=_random_materials(rng))


def _place_figures(rng: np.random.Generator, count: int, height: int, width: int) -> list[_Figure]:
    """Build `count` figures and place them, often next to an earlier one so they overlap; back to front."""
    figures: list[_Figure] = []
    boxes: list[tuple[float, float, float, float]] = []  # placed (x0, y0, x1, y1)
    for _ in range(count):
        fig = _build_figure(rng, float(rng.uniform(0.35, 0.9)) * height)
        pts = np.concatenate([p.polygon for p in fig.parts])
        x0, y0 = pts.min(axis=0)
        x1, y1 = pts.max(axis=0)
        bw, bh = x1 - x0, y1 - y0
        if boxes and rng.random() < 0.55:  # next to an earlier figure: overlap
            ox0, oy0, ox1, oy1 = boxes[int(rng.integers(len(boxes)))]
            cx = (ox0 + ox1) / 2.0 + float(rng.normal(0.0, 0.35)) * max(bw, ox1 - ox0)
            cy = (oy0 + oy1) / 2.0 + float(rng.normal(0.0, 0.15)) * bh
        else:
            cx, cy = float(rng.uniform(0, width)), float(rng.uniform(0, height))
        # Keep most of the figure inside: the box may leave the image by at most ~15% of its size.
        cx = float(np.clip(cx, bw * 0.35, max(bw * 0.35, width - bw * 0.35)))
        cy = float(np.clip(cy, bh * 0.40, max(bh * 0.40, height - bh * 0.35)))
        shift = np.array([cx - (x0 + x1) / 2.0, cy - (y0 + y1) / 2.0])
        fig.parts = [_Part(p.polygon + shift, p.material) for p in fig.parts]
        fig.bottom = float(y1 + shift[1])
        boxes.append((x0 + shift[0], y0 + shift[1], x1 + shift[0], y1 + shift[1]))
        figures.append(fig)
    # Depth order: figures standing lower in the image are nearer, hence painted later.
    order = sorted(range(count), key=lambda i: figures[i].bottom)
    return [figures[i] for i in order]


# ----------------------------------------------------------------------------------------------- painting


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Gradient + soft blotches + a few sharp rectangles + sinusoidal stripes + pixel noise, (h, w, 3) float32."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = float(rng.uniform(0, 2 * math.pi))
    proj = xx * math.cos(angle) + yy * math.sin(angle)
    t = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1e-6)
    c0, c1 = _random_colour(rng), _random_colour(rng)
    bg = c0 + t[..., None] * (c1 - c0)

    layer = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(layer)
    for _ in range(int(rng.integers(3, 13))):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        rx, ry = rng.uniform(0.05, 0.3) * width, rng.uniform(0.05, 0.3) * height
        box = [float(cx - rx), float(cy - ry), float(cx + rx), float(cy + ry)]
        fill = tuple(int(v) for v in _random_colour(rng))
        (draw.ellipse if rng.random() < 0.6 else draw.rectangle)(box, fill=fill)
    layer = layer.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(2.0, 8.0))))
    draw = ImageDraw.Draw(layer)
    for _ in range(int(rng.integers(0, 4))):
        x0, y0 = rng.uniform(-0.1, 0.9) * width, rng.uniform(-0.1, 0.9) * height
        x1, y1 = x0 + rng.uniform(0.05, 0.4) * width, y0 + rng.uniform(0.05, 0.4) * height
        draw.rectangle(
            [float(x0), float(y0), float(x1), float(y1)], fill=tuple(int(v) for v in _random_colour(rng))
        )
    bg = np.asarray(layer, dtype=np.float32)

    s_angle = float(rng.uniform(0, math.pi))
    freq = float(rng.uniform(2.0, 20.0)) / max(height, width)
    phase = float(rng.uniform(0, 2 * math.pi))
    stripes = np.sin(2 * math.pi * freq * (xx * math.cos(s_angle) + yy * math.sin(s_angle)) + phase)
    bg += stripes[..., None] * (
        rng.uniform(-1.0, 1.0, size=3).astype(np.float32) * float(rng.uniform(4.0, 30.0))
    )
    bg += rng.standard_normal(bg.shape, dtype=np.float32) * np.float32(rng.uniform(2.0, 10.0))
    return bg


def _material_texture(
    rng: np.random.Generator, material: dict[str, Any], shape: tuple[int, int]
) -> np.ndarray:
    """Colour of a material over a (h, w) crop: base colour, optional pattern, side lighting and pixel noise."""
    h, w = shape
    yy = np.arange(h, dtype=np.float32)[:, None, None]
    xx = np.arange(w, dtype=np.float32)[None, :, None]
    base = np.asarray(material["base"], dtype=np.float32)
    period = material.get("period", 8.0)
    if material["pattern"] == "stripes":
        tex = np.where((yy // period) % 2 == 1, material["alt"], base)
    elif material["pattern"] == "checks":
        tex = np.where(((yy // period) + (xx // period)) % 2 == 1, material["alt"], base)
    else:
        tex = base[None, None, :]
    ramp = xx / max(w - 1, 1)
    light = 0.85 + 0.25 * ramp if rng.random() < 0.5 else 1.1 - 0.25 * ramp
    noise = rng.standard_normal((h, w, 3), dtype=np.float32) * np.float32(material["noise"])
    return (tex * light).astype(np.float32) + noise


def _paint_figure(
    rng: np.random.Generator,
    canvas: np.ndarray,
    figure: _Figure,
    part_masks: np.ndarray,
    materials: list[str],
) -> None:
    """Paint a figure's parts (pycocotools masks, paint order) onto the canvas with per-material textures."""
    full = part_masks.any(axis=2)
    rows, cols = np.flatnonzero(full.any(axis=1)), np.flatnonzero(full.any(axis=0))
    if rows.size == 0:
        return
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    crop = canvas[r0:r1, c0:c1]
    textures: dict[str, np.ndarray] = {}
    for name in (_SKIN, _SHIRT, _TROUSERS, _SHOES):  # fixed order: deterministic rng use
        textures[name] = _material_texture(rng, figure.materials[name], (r1 - r0, c1 - c0))
    for k, name in enumerate(materials):
        m = part_masks[r0:r1, c0:c1, k]
        crop[m] = textures[name][m]


# ----------------------------------------------------------------------------------------------- rendering


def _bbox_of(mask: np.ndarray) -> list[float]:
    """Tight [x, y, w, h] of a non-empty boolean mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]


def render_synthetic_image(
    index: int,
    seed: int,
    image_size: tuple[int, int] = (256, 256),
    min_people: int = 1,
    max_people: int = 5,
    min_visible_area: int = MIN_VISIBLE_AREA,
) -> SyntheticImage:
    """Render image `index` of the dataset with `seed`: pixels, modal annotations and their visible masks.

    Deterministic: the same arguments always give the same result. Exposed so tests can compare the masks
    the generator computed with what pycocotools decodes from the written annotations.
    """
    height, width = image_size
    rng = np.random.default_rng([seed, index])
    canvas = _background(rng, height, width)
    count = int(rng.integers(min_people, max_people + 1))
    figures = _place_figures(rng, count, height, width)

    # Rasterise every figure with pycocotools, so stored polygons decode to exactly these masks.
    polygons: list[list[list[float]]] = []
    part_materials: list[list[str]] = []
    part_masks: list[np.ndarray | None] = []
    for fig in figures:
        polys, mats = _coco_polygons(fig.parts, width, height)
        polygons.append(polys)
        part_materials.append(mats)
        if polys:
            part_masks.append(mask_utils.decode(mask_utils.frPyObjects(polys, height, width)).astype(bool))
        else:
            part_masks.append(None)

    # Visibility front to back. A hidden figure is dropped entirely (neither annotated nor painted), so no
    # person pixel is ever left unlabelled and every kept figure is occluded only by kept ones.
    occluder = np.zeros((height, width), dtype=bool)
    kept: list[tuple[int, np.ndarray, np.ndarray]] = []  # (figure index, full mask, visible mask)
    for i in range(len(figures) - 1, -1, -1):
        masks = part_masks[i]
        if masks is None:
            continue
        full = masks.any(axis=2)
        visible = full & ~occluder
        if int(visible.sum()) < min_visible_area:
            continue
        occluder |= full
        kept.append((i, full, visible))
    kept.reverse()  # back to front

    annotations: list[dict[str, Any]] = []
    visible_masks: list[np.ndarray] = []
    for i, full, visible in kept:
        masks = part_masks[i]
        assert masks is not None
        _paint_figure(rng, canvas, figures[i], masks, part_materials[i])
        if np.array_equal(visible, full):
            segmentation: Any = polygons[i]
        else:
            rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
            segmentation = {"size": [height, width], "counts": rle["counts"].decode("ascii")}
        annotations.append(
            {
                "category_id": PERSON_CATEGORY["id"],
                "segmentation": segmentation,
                "area": float(visible.sum()),
                "bbox": _bbox_of(visible),
                "iscrowd": 0,
            }
        )
        visible_masks.append(visible)

    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return SyntheticImage(
        image=image, annotations=annotations, visible_masks=visible_masks, num_figures=count
    )


# ----------------------------------------------------------------------------------------------- dataset


def _validate(
    num_images: int, image_size: tuple[int, int], min_people: int, max_people: int, min_visible_area: int
) -> None:
    """Raise ValueError with a clear message on invalid generation parameters."""
    if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 1:
        raise ValueError(f"num_images must be an integer >= 1, got {num_images!r}")
    if len(image_size) != 2 or any(int(s) != s or s < MIN_IMAGE_SIDE for s in image_size):
        raise ValueError(
            f"image_size must be (height, width) with integer sides >= {MIN_IMAGE_SIDE}, got {image_size!r}"
        )
    if not (1 <= min_people <= max_people):
        raise ValueError(
            f"need 1 <= min_people <= max_people, got min_people={min_people}, max_people={max_people}"
        )
    if min_visible_area < 1:
        raise ValueError(f"min_visible_area must be >= 1, got {min_visible_area}")


def _dataset_info(
    seed: int,
    num_images: int,
    image_size: tuple[int, int],
    min_people: int,
    max_people: int,
    min_visible_area: int,
) -> dict[str, Any]:
    """The `info` block; also the key that `ensure_synthetic_dataset` compares to decide on reuse."""
    return {
        "description": DESCRIPTION,
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "num_images": int(num_images),
        "image_size": [int(image_size[0]), int(image_size[1])],
        "min_people": int(min_people),
        "max_people": int(max_people),
        "min_visible_area": int(min_visible_area),
    }


def generate_synthetic_people(
    out_dir: str | Path,
    num_images: int,
    seed: int,
    image_size: tuple[int, int] = (256, 256),
    min_people: int = 1,
    max_people: int = 5,
    show_progress: bool = True,
    *,
    min_visible_area: int = MIN_VISIBLE_AREA,
) -> Path:
    """Write out_dir/images/*.jpg and out_dir/annotations.json; return the annotations path.

    The annotations file is written last (temp file + atomic rename) and any previous one is removed first,
    so an interrupted run never leaves a complete-looking dataset behind.
    """
    _validate(num_images, image_size, min_people, max_people, min_visible_area)
    height, width = int(image_size[0]), int(image_size[1])
    out = Path(out_dir)
    images_dir = out / IMAGES_DIRNAME
    images_dir.mkdir(parents=True, exist_ok=True)
    ann_path = out / ANNOTATIONS_NAME
    ann_path.unlink(missing_ok=True)
    for stale in images_dir.glob("[0-9][0-9][0-9][0-9][0-9][0-9].jpg"):  # left over from a larger dataset
        if int(stale.stem) >= num_images:
            stale.unlink()

    start = time.perf_counter()
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    polygon_count = rle_count = hidden = 0
    for index in tqdm(
        range(num_images), desc="synthetic people", unit="img", disable=not show_progress, file=sys.stderr
    ):
        sample = render_synthetic_image(
            index, seed, (height, width), min_people, max_people, min_visible_area
        )
        file_name = f"{index:06d}.jpg"
        Image.fromarray(sample.image).save(
            images_dir / file_name, format="JPEG", quality=JPEG_QUALITY, optimize=False
        )
        images.append({"id": index, "file_name": file_name, "width": width, "height": height})
        hidden += sample.num_figures - len(sample.annotations)
        for ann in sample.annotations:
            is_rle = isinstance(ann["segmentation"], dict)
            rle_count += is_rle
            polygon_count += not is_rle
            annotations.append({"id": len(annotations) + 1, "image_id": index, **ann})

    dataset = {
        "info": _dataset_info(seed, num_images, (height, width), min_people, max_people, min_visible_area),
        "images": images,
        "annotations": annotations,
        "categories": [dict(PERSON_CATEGORY)],
    }
    with atomic_path(ann_path, fsync=False) as tmp, tmp.open("w", encoding="utf-8") as f:
        json.dump(dataset, f, separators=(",", ":"))
    logger.info(
        "Generated %d synthetic images with %d people (%d polygon, %d RLE, %d hidden dropped) in %s in %.1fs",
        num_images, len(annotations), polygon_count, rle_count, hidden, out, time.perf_counter() - start,
    )  # fmt: skip
    return ann_path


def _matches(ann_path: Path, expected_info: dict[str, Any]) -> bool:
    """Whether an existing annotations file was generated with `expected_info` and all its images exist."""
    try:
        with ann_path.open(encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict) or data.get("info") != expected_info:
        return False
    images = data.get("images")
    if not isinstance(images, list) or len(images) != expected_info["num_images"]:
        return False
    images_dir = ann_path.parent / IMAGES_DIRNAME
    return all(
        isinstance(im, dict) and (images_dir / str(im.get("file_name", ""))).is_file() for im in images
    )


def ensure_synthetic_dataset(
    out_dir: str | Path,
    num_images: int,
    seed: int,
    image_size: tuple[int, int] = (256, 256),
    min_people: int = 1,
    max_people: int = 5,
    *,
    min_visible_area: int = MIN_VISIBLE_AREA,
    show_progress: bool = True,
) -> Path:
    """Reuse out_dir/annotations.json when its `info` matches these parameters and the generator version,
    otherwise (re)generate. Returns the annotations path."""
    _validate(num_images, image_size, min_people, max_people, min_visible_area)
    ann_path = Path(out_dir) / ANNOTATIONS_NAME
    expected = _dataset_info(seed, num_images, image_size, min_people, max_people, min_visible_area)
    if ann_path.is_file():
        if _matches(ann_path, expected):
            logger.info("Reusing synthetic dataset %s (%d images, seed %d)", ann_path, num_images, seed)
            return ann_path
        logger.info("Synthetic dataset %s does not match the requested parameters; regenerating", ann_path)
    return generate_synthetic_people(
        out_dir, num_images, seed, image_size, min_people, max_people, show_progress,
        min_visible_area=min_visible_area,
    )  # fmt: skip


# The command line is `kdlab-synthetic` (kdlab.cli.synthetic); this module is the generator alone.
if __name__ == "__main__":
    print("error: the generator's command is kdlab-synthetic (or python -m kdlab.cli.synthetic), same flags",
          file=sys.stderr)  # fmt: skip
    raise SystemExit(2)
