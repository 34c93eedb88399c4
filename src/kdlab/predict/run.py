"""`kdlab-predict` end to end: check every input, run the model, paste masks back, write the outputs.

1. `plan`: the model file (and its config), the images, their boxes — all checked; nothing is written.
2. `execute`: the images are letterboxed exactly as validation does (`kdlab.data.transforms`), the boxes
   mapped the same way; each ROI's 3-class mask is pasted back onto the original pixels
   (`kdlab.data.roi_masks.paste_roi_probabilities`) and its own-person mask RLE-encoded for COCO. With
   `--coco` the trainer's evaluator also scores the model on the same images, through the validation
   dataset's own target construction (ROI mask space, letterboxed input), so the numbers are the
   trainer's. Everything is written into a hidden staging folder and moved into `--output` only when the
   whole run succeeded: a bad image found half-way leaves nothing behind.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset
from tqdm import tqdm

from kdlab.atomic_io import atomic_path, write_json_atomic
from kdlab.data.coco import read_coco_people, read_image
from kdlab.data.loaders import (
    ErrorsAsValues,
    WorkerLoader,
    build_loader,
    raise_if_data_error,
    readable_samples,
    validation_dataset,
)
from kdlab.data.roi_masks import OTHER, TARGET, expand_rois, paste_roi_probabilities
from kdlab.data.transforms import CropWindow, crop_boxes, crop_image, letterbox_window, uncrop_boxes
from kdlab.engine.batches import batch_to_device
from kdlab.engine.device import resolve_device
from kdlab.errors import DataError, KdlabInputError
from kdlab.evaluate.metrics import REPORTED_METRICS
from kdlab.predict.backends import PeopleModel, check_model_file, load_people_model
from kdlab.predict.boxes import (
    BoxPlan,
    ImageJob,
    coco_boxes,
    json_boxes,
    records_at_paths,
    select_images,
    whole_image_boxes,
)
from kdlab.predict.overlay import draw_overlay
from kdlab.tasks import task_of

log = logging.getLogger(__name__)

PREDICTIONS_FILE, IMAGES_FILE, METRICS_FILE, OVERLAYS_DIR = (
    "predictions.json",
    "images.json",
    "metrics.json",
    "overlays",
)
METRIC_KEYS = (*REPORTED_METRICS, "pixel_accuracy", "num_rois")


@dataclass
class PredictRequest:
    """What the user asked for (the CLI's flags); exactly one of coco / boxes / whole_image."""

    model: Path
    images: list[str]
    output: Path = Path("predictions")
    coco: Path | None = None
    boxes: Path | None = None
    whole_image: bool = False
    batch_size: int = 4
    device: str = "auto"
    num_workers: int = 0
    overlays: bool = True
    show_progress: bool = True


@dataclass
class PredictPlan:
    request: PredictRequest
    model: PeopleModel
    boxes: BoxPlan


@dataclass
class PredictResult:
    output: Path
    num_images: int
    num_rois: int
    metrics: dict[str, Any] | None
    files: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- checks
def _check_request(req: PredictRequest) -> None:
    sources = [req.coco is not None, req.boxes is not None, bool(req.whole_image)]
    if sum(sources) != 1:
        raise KdlabInputError(
            "give exactly one box source: --coco instances.json, --boxes boxes.json or --whole_image"
        )
    if req.batch_size < 1:
        raise KdlabInputError(f"--batch_size must be >= 1, got {req.batch_size}")
    if req.num_workers < 0:
        raise KdlabInputError(f"--num_workers must be >= 0, got {req.num_workers}")
    if not req.images:
        raise KdlabInputError("--images needs a folder or image files")
    if req.output.exists() and not req.output.is_dir():
        raise KdlabInputError(f"--output {req.output} is a file; give a directory")


def plan(req: PredictRequest) -> PredictPlan:
    """Every check, cheapest first; raises KdlabInputError (exit 2) and writes nothing. --boxes and
    --whole_image are checked before the model loads; COCO boxes need its config's person category."""
    _check_request(req)
    check_model_file(req.model)
    selection = select_images(req.images)
    boxes = None
    if req.boxes is not None:
        boxes = json_boxes(req.boxes, selection)
    elif req.whole_image:
        boxes = whole_image_boxes(selection)
    model = load_people_model(req.model, resolve_device(req.device))
    if boxes is None:
        assert req.coco is not None
        boxes = coco_boxes(req.coco, selection, model.config.data.person_category)
    return PredictPlan(req, model, boxes)


# ------------------------------------------------------------------------------------ the model pass
class LetterboxedJobs(Dataset):
    """Per image: the decoded original, the validation letterbox of it, and its boxes in input pixels."""

    def __init__(self, jobs: list[ImageJob], input_size: tuple[int, int]) -> None:
        self.jobs = jobs
        self.input_size = input_size

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        job = self.jobs[index]
        original = read_image(job.path)
        if tuple(original.shape[-2:]) != (job.height, job.width):
            raise DataError(
                f"image file {job.path} decodes to {tuple(original.shape[-2:])}, its header said otherwise"
            )
        window = letterbox_window((job.height, job.width), self.input_size)
        boxes = crop_boxes(torch.from_numpy(job.boxes), window, self.input_size)
        return {
            "image": crop_image(original, window, self.input_size),
            "boxes": boxes,
            "original": original,
            "window": window,
            "index": index,
        }


def collate_jobs(samples: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Images stacked, every image's boxes as ROIs (batch_index, x1, y1, x2, y2); a DataError travels as a value."""
    error, samples = readable_samples(samples)
    if error is not None:
        return error
    rois = [
        torch.cat([torch.full((s["boxes"].shape[0], 1), float(i)), s["boxes"]], dim=1)
        for i, s in enumerate(samples)
    ]
    return {
        "images": torch.stack([s["image"] for s in samples]),
        "rois": torch.cat(rois),
        "originals": [s["original"] for s in samples],
        "windows": [s["window"] for s in samples],
        "indices": [s["index"] for s in samples],
    }


@dataclass
class RoiPrediction:
    """One ROI at the original resolution: its own-person mask, the 'other people' it saw, its score."""

    own: np.ndarray  # bool [H,W]
    other: np.ndarray  # bool [H,W]
    score: float


def roi_score(probs: torch.Tensor) -> float:
    """Mean target probability over the ROI-mask pixels predicted as target (0 when there are none)."""
    own = probs.argmax(0) == TARGET
    return float(probs[TARGET][own].mean()) if bool(own.any()) else 0.0


def paste_roi(probs: torch.Tensor, window: torch.Tensor, size: tuple[int, int]) -> RoiPrediction:
    """probs [3,h,w] over `window` (original pixels) -> the ROI's classes on the image's pixels."""
    own = np.zeros(size, dtype=bool)
    other = np.zeros(size, dtype=bool)
    (x0, y0, x1, y1), region = paste_roi_probabilities(probs, window, size)
    if region.numel():
        classes = region.argmax(0).cpu().numpy()
        own[y0:y1, x0:x1] = classes == TARGET
        other[y0:y1, x0:x1] = classes == OTHER
    return RoiPrediction(own, other, roi_score(probs))


def image_rois(
    logits: torch.Tensor, rois: torch.Tensor, window: CropWindow, margin: float
) -> list[RoiPrediction]:
    """One image's ROIs: logits [K,3,h,w] (log-probabilities) and rois [K,4] in input pixels."""
    probs = logits.float().exp().cpu()
    windows = uncrop_boxes(expand_rois(rois.float().cpu(), margin), window)  # the head's window, original px
    return [paste_roi(probs[k], windows[k], (window.height, window.width)) for k in range(probs.shape[0])]


def coco_result(job: ImageJob, box: np.ndarray, roi: RoiPrediction, category_id: int) -> dict[str, Any]:
    """One COCO results entry (what COCO.loadRes takes): the own-person mask as compressed RLE."""
    rle = mask_utils.encode(np.asfortranarray(roi.own.astype(np.uint8)))
    x1, y1, x2, y2 = (float(v) for v in box)
    return {
        "image_id": job.image_id,
        "category_id": category_id,
        "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
        "score": round(roi.score, 6),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],  # the predicted mask's box
        "roi_box": [x1, y1, x2 - x1, y2 - y1],  # the input box, [x, y, w, h]
    }


def _overlay_names(jobs: list[ImageJob]) -> list[str]:
    """`<stem>.png`; `<name>.png` where two images share a stem (a.jpg and a.png); where they share the name
    too (in two subfolders of --images) the box source's file name, `/` written `__`
    (`JPEGImages__a.jpg.png`), and if even that repeats, the image id in front."""
    stems = Counter(j.path.stem for j in jobs)
    names = Counter(j.path.name for j in jobs)
    flat = [j.file_name.replace("\\", "/").replace("/", "__") for j in jobs]
    picked = []
    for job, flat_name in zip(jobs, flat, strict=True):
        if stems[job.path.stem] == 1:
            picked.append(job.path.stem)
        elif names[job.path.name] == 1:
            picked.append(job.path.name)
        else:
            picked.append(flat_name if flat.count(flat_name) == 1 else f"{job.image_id}__{flat_name}")
    return [f"{name}.png" for name in picked]


def predict_images(plan: PredictPlan, staging: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The model over every job, in batches: (COCO results, one images.json entry per image). Overlays go
    to `staging/overlays/`."""
    req, model, jobs = plan.request, plan.model, plan.boxes.jobs
    # The workers leave a group-wide SIGTERM to this process: exit 143, nothing written (the staging goes).
    loader = WorkerLoader(
        ErrorsAsValues(LetterboxedJobs(jobs, model.input_size)), batch_size=req.batch_size, shuffle=False,
        num_workers=req.num_workers, collate_fn=collate_jobs,
    )  # fmt: skip
    names = _overlay_names(jobs)
    results: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    bar = tqdm(loader, desc="predict", unit="batch", disable=not req.show_progress, leave=False)
    with torch.inference_mode():
        for raw in bar:
            raise_if_data_error(raw)
            batch = batch_to_device(raw, model.device, False)
            logits = model.module(batch["images"], batch["rois"])["logits"]
            rois = raw["rois"]
            for b, index in enumerate(raw["indices"]):
                job = jobs[index]
                sel = rois[:, 0] == b
                preds = image_rois(
                    logits[sel.to(logits.device)], rois[sel, 1:], raw["windows"][b], model.roi_margin
                )
                results.extend(
                    coco_result(job, box, p, plan.boxes.category_id)
                    for box, p in zip(job.boxes, preds, strict=True)
                )
                images.append(_image_entry(job, preds, names[index] if req.overlays else None))
                if req.overlays:
                    _write_overlay(raw["originals"][b], job, preds, staging / OVERLAYS_DIR / names[index])
    return results, images


def _image_entry(job: ImageJob, preds: list[RoiPrediction], overlay: str | None) -> dict[str, Any]:
    return {
        "id": job.image_id, "file_name": job.file_name, "path": str(job.path), "height": job.height,
        "width": job.width, "num_rois": len(preds), "overlay": f"{OVERLAYS_DIR}/{overlay}" if overlay else None,
    }  # fmt: skip


def _write_overlay(original: torch.Tensor, job: ImageJob, preds: list[RoiPrediction], path: Path) -> None:
    other = np.zeros((job.height, job.width), dtype=bool)
    for p in preds:
        other |= p.other
    picture = draw_overlay(
        original.permute(1, 2, 0).numpy(), [p.own for p in preds], other, job.boxes, [p.score for p in preds]
    )
    with atomic_path(path, fsync=False) as tmp:
        picture.save(tmp, format="PNG")


# ------------------------------------------------------------------------------ metrics (with --coco)
def coco_metrics(plan: PredictPlan) -> dict[str, Any]:
    """The trainer's validation metrics on the --coco images: the validation dataset (letterbox, the
    config's min_box_size, max_rois_per_image and ROI targets) through the task's own evaluator."""
    req, model = plan.request, plan.model
    cfg = model.config
    cfg = cfg.model_copy(update={
        "training": cfg.training.model_copy(update={"num_vis_images": 0}),
        "data": cfg.data.model_copy(update={"skip_bad_images": False}),
    })  # fmt: skip
    assert req.coco is not None and plan.boxes.coco_files is not None
    records = read_coco_people(
        req.coco,
        cfg.data.person_category,
        cfg.data.min_box_size,
        keep_images_without_people=True,
        what="coco",
    )
    dataset = validation_dataset(cfg, records_at_paths(records, plan.boxes.coco_files), Path("/"))
    loader = build_loader(
        dataset,
        req.batch_size,
        shuffle=False,
        seed=cfg.training.seed,
        num_workers=req.num_workers,
        pin_memory=False,
    )
    evaluator = task_of(cfg).build_evaluator(cfg, loader, model.device, None, req.show_progress)
    metrics, _ = evaluator(model.module, desc="metrics")
    return {key: _finite_or_none(metrics.get(key)) for key in METRIC_KEYS} | {"images": metrics.get("images")}


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


# ------------------------------------------------------------------------------------------- output
def _staging_dir(output: Path) -> Path:
    """A hidden folder beside the output's nearest existing ancestor (same filesystem: moves are renames)."""
    anchor = output.absolute().parent
    while not anchor.exists():
        anchor = anchor.parent
    return anchor / f".kdlab-predict-{output.name}-{os.getpid()}.partial"


def _publish(staging: Path, output: Path) -> list[str]:
    """Move every staged file into `output` (created now), each by an atomic rename; return their names."""
    moved = []
    for src in sorted(p for p in staging.rglob("*") if p.is_file()):
        rel = src.relative_to(staging)
        dest = output / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dest)
        moved.append(str(rel))
    return moved


def _metadata(plan: PredictPlan, num_rois: int) -> dict[str, Any]:
    req, model = plan.request, plan.model
    source = "coco" if req.coco else "boxes" if req.boxes else "whole_image"
    return {
        "model": str(model.path), "model_kind": model.kind, "experiment": model.config.name,
        "input_size": list(model.input_size), "mask_size": list(model.config.model.mask_size),
        "roi_margin": model.roi_margin, "box_source": source,
        "box_file": str(req.coco or req.boxes) if source != "whole_image" else None,
        "num_images": len(plan.boxes.jobs), "num_rois": num_rois,
        "device": str(model.device),  # where the model ran (an .onnx file: onnxruntime on the CPU)
    }  # fmt: skip


def execute(plan: PredictPlan) -> PredictResult:
    """Run a checked plan; the outputs appear in `--output` only once everything has succeeded."""
    req = plan.request
    staging = _staging_dir(req.output)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        results, images = predict_images(plan, staging)
        metrics = coco_metrics(plan) if req.coco is not None else None
        write_json_atomic(staging / PREDICTIONS_FILE, results)
        write_json_atomic(staging / IMAGES_FILE, {"info": _metadata(plan, len(results)), "images": images})
        if metrics is not None:
            write_json_atomic(
                staging / METRICS_FILE, {"info": _metadata(plan, len(results)), "metrics": metrics}
            )
        files = _publish(staging, req.output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote %d predictions for %d images to %s", len(results), len(images), req.output)
    return PredictResult(req.output, len(images), len(results), metrics, files)


def predict(req: PredictRequest) -> PredictResult:
    """`plan` then `execute`: the library form of `kdlab-predict`."""
    return execute(plan(req))


def metrics_table(metrics: dict[str, Any]) -> str:
    """A short two-column table of the metrics, for the terminal."""
    rows = [(k, metrics.get(k)) for k in METRIC_KEYS]
    width = max(len(k) for k, _ in rows)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    for key, value in rows:
        shown = "n/a" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)
