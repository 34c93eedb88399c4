"""The teacher-output cache (HDF5): subset rules, fingerprints, layout, and datasets that read it.

Layout (format version 1). Root attributes: `format_version`, `task`, `teacher_sha256`, `teacher_path`,
`teacher_kind` (pth | onnx), `teacher_config` (JSON), `preprocessing` (JSON), `subset_seed`,
`subset_fraction`, `max_samples` (0 = none), `heads` (JSON list). One group per split the source has
(`train`, `val`, `test`), each with attributes `source_fingerprint` and `num_source_samples`, and:
- `indices` int64 [n]: the subset, as sorted row numbers of the source split;
- `data`: the inputs (sequences: float32 [n,T,D_in]) or references to the source images (segmentation:
  the image file names, UTF-8 strings [n]);
- `labels`: the teacher outputs. Sequences: float32 [n,T+1,D_out], the teacher's output-state history
  (t = 0 included), plus `class_labels` int64 [n]. Segmentation: a group with one float16 dataset per head
  (`logits` [R,3,h,w], `bg_fg_logits` [R,2,h,w], `target_logits` [R,2,h,w], R = ROIs over the split's
  cached images), `boxes` float32 [R,4] (each ROI in input pixels) and `roi_offsets` int64 [n+1] (image
  i owns rows offsets[i]:offsets[i+1]).

Segmentation caches hold each ROI's teacher logits for the deterministic letterbox view (the validation
geometry). Training replays a horizontal flip on them (mirror the ROI's logits); with
`symmetrize_flips` the cached logits are the mean of the teacher on the image and, mirrored back, on
its mirror image, so the replay is exact. Random zoom/crop is not replayed (a full-image UNet sees other
context in a crop, so cached logits would not be exact) and is off when training from a cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from kdlab.config.schema import AugmentConfig, ExperimentConfig
from kdlab.data.coco import CocoPeopleDataset
from kdlab.data.roi_masks import build_roi_masks
from kdlab.data.seeds import mixed_index_seed
from kdlab.data.transforms import EvalTransform, Sample, color_jitter, horizontal_flip
from kdlab.errors import DataError
from kdlab.file_hash import file_sha256

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
SEGMENTATION_HEADS = ("logits", "bg_fg_logits", "target_logits")
TEACHER_KEY_PREFIX = "teacher_"  # batch keys that carry cached teacher outputs
ONNX_CONFIG_METADATA_KEY = "kdlab_config"  # an ONNX export's experiment config (JSON) in its metadata_props


# ------------------------------------------------------------------------------------------ subset rules
def subset_size(num_samples: int, fraction: float, max_samples: int | None) -> int:
    """How many samples of a split are cached: floor(fraction * N) first, then at most `max_samples`.

    10,000 samples: 0.5/none -> 5,000; 1.0/1,000 -> 1,000; 0.5/1,000 -> 1,000.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"subset_fraction must be in (0, 1], got {fraction}")
    if max_samples is not None and max_samples <= 0:
        raise ValueError(f"max_samples must be > 0, got {max_samples}")
    size = int(np.floor(num_samples * fraction + 1e-9))
    return size if max_samples is None else min(size, max_samples)


def draw_subset(
    num_samples: int, fraction: float, max_samples: int | None, seed: int, split: str
) -> np.ndarray:
    """The split's cached rows: a seeded permutation (seed, split) cut to `subset_size`, sorted.

    Drawn without replacement; the same (seed, split, N, fraction, cap) always gives the same rows, and a
    smaller cap gives a prefix of the same permutation. An empty result is a DataError naming the split.
    """
    size = subset_size(num_samples, fraction, max_samples)
    if size == 0:
        cap = "none" if max_samples is None else str(max_samples)
        raise DataError(
            f"the teacher cache's {split} split would be empty: subset_fraction={fraction} of {num_samples} "
            f"samples (max_samples={cap}) rounds down to 0; raise the fraction (--subset_fraction or distillation.cache.subset_fraction)"
        )
    rng = np.random.default_rng([seed & 0xFFFFFFFF, SPLITS.index(split)])
    return np.sort(rng.permutation(num_samples)[:size]).astype(np.int64)


# ------------------------------------------------------------------------------------------ fingerprints
def coco_split_fingerprint(dataset: CocoPeopleDataset, annotations: str | Path) -> str:
    """Identifies a COCO split: the annotation file's bytes and the image records the config selects."""
    digest = hashlib.sha256(file_sha256(annotations).encode())
    for rec in dataset.records:
        digest.update(f"\n{rec.file_name}|{rec.height}|{rec.width}|{len(rec.people)}".encode())
    return digest.hexdigest()


def segmentation_preprocessing(cfg: ExperimentConfig) -> dict[str, Any]:
    """Every setting that changes which ROIs a cached image has or what the teacher saw."""
    data = cfg.data
    return {
        "task": "segmentation",
        "geometry": "letterbox-centred",
        "input_size": list(data.input_size),
        "mask_size": list(cfg.model.mask_size),
        "roi_margin": cfg.model.roi_margin,
        "person_category": data.person_category,
        "min_box_size": data.min_box_size,
        "max_rois_per_image": data.max_rois_per_image,
        "keep_images_without_people": data.keep_images_without_people,
    }


# Where a preprocessing entry comes from, to name the key in a mismatch error.
PREPROCESSING_KEYS = {
    "input_size": "data.input_size",
    "mask_size": "model.mask_size",
    "roi_margin": "model.roi_margin",
    "person_category": "data.person_category",
    "min_box_size": "data.min_box_size",
    "max_rois_per_image": "data.max_rois_per_image",
    "keep_images_without_people": "data.keep_images_without_people",
}


# ------------------------------------------------------------------------------------------------ reading
def _h5py() -> Any:
    import h5py

    return h5py


def open_cache(path: str | Path) -> Any:
    """Open a cache read-only; a missing, non-HDF5 or foreign file is one DataError line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"teacher cache {path} does not exist")
    h5py = _h5py()
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"teacher cache {path} is not a readable HDF5 file ({exc})") from exc
    version = handle.attrs.get("format_version")
    if version is None or "task" not in handle.attrs:
        handle.close()
        raise DataError(f"{path} is not a kdlab teacher cache (no format_version/task attributes)")
    if int(version) != FORMAT_VERSION:
        handle.close()
        raise DataError(
            f"teacher cache {path} has format version {int(version)}; this kdlab reads version "
            f"{FORMAT_VERSION}: regenerate it with python -m kdlab.distill.cache generate"
        )
    return handle


def _attr_str(handle: Any, key: str) -> str:
    value = handle.attrs.get(key, "")
    return value.decode() if isinstance(value, bytes) else str(value)


class CacheInfo:
    """A cache's root attributes and per-split fingerprints/indices (the file is closed afterwards)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open_cache(self.path) as handle:
            self.task = _attr_str(handle, "task")
            self.teacher_sha256 = _attr_str(handle, "teacher_sha256")
            self.teacher_path = _attr_str(handle, "teacher_path")
            self.teacher_kind = _attr_str(handle, "teacher_kind")
            self.teacher_config = json.loads(_attr_str(handle, "teacher_config") or "{}")
            self.preprocessing = json.loads(_attr_str(handle, "preprocessing") or "{}")
            self.heads = json.loads(_attr_str(handle, "heads") or "[]")
            self.subset_seed = int(handle.attrs.get("subset_seed", 0))
            self.subset_fraction = float(handle.attrs.get("subset_fraction", 1.0))
            cap = int(handle.attrs.get("max_samples", 0))
            self.max_samples = cap or None
            self.splits: dict[str, dict[str, Any]] = {}
            for split in SPLITS:
                if split in handle:
                    group = handle[split]
                    self.splits[split] = {
                        "fingerprint": _attr_str(group, "source_fingerprint"),
                        "num_source_samples": int(group.attrs.get("num_source_samples", 0)),
                        "indices": np.asarray(group["indices"][()], dtype=np.int64),
                    }

    def describe(self) -> str:
        sizes = ", ".join(
            f"{s} {len(v['indices'])}/{v['num_source_samples']}" for s, v in self.splits.items()
        )
        return f"{self.task} cache from teacher {self.teacher_sha256[:12]}... ({sizes})"

    def megabytes_per_1000(self) -> str:
        """File size per 1,000 cached samples (images or sequences), for the log and the docs."""
        count = sum(len(v["indices"]) for v in self.splits.values())
        per = self.path.stat().st_size / 1e6 / max(1, count) * 1000
        return f"{per:.1f} MB per 1,000 samples"

    def check_matches(
        self,
        task: str,
        preprocessing: dict[str, Any],
        fingerprints: dict[str, str],
        teacher_sha256: str | None,
    ) -> None:
        """The configured task, preprocessing, source data (and teacher, when one is configured) must be
        the cache's; the first difference is a DataError naming it."""
        where = f"teacher cache {self.path}"
        if self.task != task:
            raise DataError(f"{where} holds {self.task} teacher outputs but this experiment's task is {task}")
        for key, expected in preprocessing.items():
            got = self.preprocessing.get(key)
            if got != expected:
                name = PREPROCESSING_KEYS.get(key, key)
                raise DataError(
                    f"{where} was made with {name}={json.dumps(got)} but the config has {json.dumps(expected)}; "
                    "regenerate the cache or use the config it was made with"
                )
        for split, fingerprint in fingerprints.items():
            if split not in self.splits:
                raise DataError(f"{where} has no {split} split; regenerate it from this data")
            if self.splits[split]["fingerprint"] != fingerprint:
                raise DataError(
                    f"{where} was made from other {split} data (source fingerprint "
                    f"{self.splits[split]['fingerprint'][:12]}... vs {fingerprint[:12]}... now): the dataset "
                    "files or the data.* selection changed; regenerate the cache"
                )
        if teacher_sha256 is not None and teacher_sha256 != self.teacher_sha256:
            raise DataError(
                f"{where} was made by teacher {self.teacher_sha256[:12]}... but the configured teacher is "
                f"{teacher_sha256[:12]}...; delete the cache to regenerate it, or unset "
                "distillation.cache.teacher_model_path to train from the cache as it is"
            )


class _LazyH5:
    """An HDF5 handle opened on first use in each process (h5py handles must not cross a fork)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: Any = None
        self._pid = -1

    def get(self) -> Any:
        if self._handle is None or self._pid != os.getpid():
            self._handle = _h5py().File(self.path, "r")
            self._pid = os.getpid()
        return self._handle

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_handle": None, "_pid": -1}


class CachedPeopleDataset(Dataset):
    """A split's cached images with their teacher logits: letterbox, random flip replayed on the cached
    logits, colour jitter on the student's input only. Items are `(position, seed)` like
    `CocoPeopleDataset`; each sample carries `teacher_<head>` [R,C,h,w] float16 for its R ROIs.
    """

    def __init__(
        self,
        base: CocoPeopleDataset,
        cache_path: str | Path,
        split: str,
        indices: np.ndarray,
        heads: list[str],
        augment: AugmentConfig | None,
    ) -> None:
        self.base = base
        self.split = split
        self.indices = indices
        self.heads = list(heads)
        self.augment = augment
        self.geometry = EvalTransform(base.input_size)
        self.h5 = _LazyH5(Path(cache_path))

    def __len__(self) -> int:
        return len(self.indices)

    def _teacher_rows(self, position: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        labels = self.h5.get()[self.split]["labels"]
        start, stop = (int(v) for v in labels["roi_offsets"][position : position + 2])
        outputs = {h: torch.from_numpy(labels[h][start:stop]) for h in self.heads}
        return outputs, torch.from_numpy(labels["boxes"][start:stop])

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        position, seed = item if isinstance(item, tuple) else (item, mixed_index_seed(item))
        index = int(self.indices[position])
        sample = self.geometry(self.base.load_raw(index))
        outputs, cached_boxes = self._teacher_rows(position)
        gen = torch.Generator().manual_seed(seed)
        flip = self.augment is not None and torch.rand((), generator=gen).item() < self.augment.hflip_prob
        if flip:
            sample = horizontal_flip(sample)
            width = float(sample.image.shape[-1])
            cached_boxes = torch.stack(
                [
                    width - cached_boxes[:, 2],
                    cached_boxes[:, 1],
                    width - cached_boxes[:, 0],
                    cached_boxes[:, 3],
                ],
                dim=1,
            )
            outputs = {h: v.flip(-1) for h, v in outputs.items()}
        self._check_rois(sample, cached_boxes, index)
        image = color_jitter(sample.image, self.augment, gen) if self.augment is not None else sample.image
        sample = Sample(image, sample.boxes, sample.masks)
        roi_masks = build_roi_masks(
            sample.masks,
            sample.boxes,
            self.base.mask_size,
            self.base.roi_sampling_ratio,
            self.base.roi_margin,
        )
        out: dict[str, Any] = {
            "image": sample.image.contiguous(),
            "boxes": sample.boxes,
            "roi_masks": roi_masks,
            "image_id": self.base.records[index].image_id,
            "index": index,
        }
        for head, value in outputs.items():
            out[TEACHER_KEY_PREFIX + head] = value
        return out

    def _check_rois(self, sample: Sample, cached_boxes: torch.Tensor, index: int) -> None:
        """The image's ROIs now must be the ones whose logits were cached (same count, same boxes)."""
        boxes = sample.boxes
        same = boxes.shape == cached_boxes.shape and bool(torch.allclose(boxes, cached_boxes, atol=1e-2))
        if not same:
            raise DataError(
                f"teacher cache {self.h5.path} does not match image {self.base.records[index].file_name}: "
                f"{cached_boxes.shape[0]} cached ROIs vs {boxes.shape[0]} now (or other boxes); regenerate "
                "the cache for this data"
            )


def collate_teacher_outputs(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Concatenate every sample's `teacher_*` ROI rows (same order as the batch's ROIs)."""
    keys = [k for k in samples[0] if k.startswith(TEACHER_KEY_PREFIX)] if samples else []
    return {k: torch.cat([s[k] for s in samples], dim=0) for k in keys}


def teacher_outputs_from_batch(batch: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """`{"logits": ..., "bg_fg_logits": ..., ...}` from a batch's cached `teacher_*` tensors, or None."""
    found = {k[len(TEACHER_KEY_PREFIX) :]: v for k, v in batch.items() if k.startswith(TEACHER_KEY_PREFIX)}
    return found or None
