"""The people-segmentation task's teacher cache: per image split, the image file names (`data`) and per
ROI the teacher's logits of every head (`labels/<head>`, float16), the letterboxed boxes and the ROI offsets
per image. A teacher may be a .pth checkpoint or a kdlab ONNX export with its auxiliary heads."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from kdlab.config.schema import ExperimentConfig
from kdlab.data.teacher_cache import ONNX_CONFIG_METADATA_KEY, SEGMENTATION_HEADS, segmentation_preprocessing
from kdlab.distill.cache import CacheRequest, CacheTeacher
from kdlab.errors import CheckpointError
from kdlab.file_hash import file_sha256

log = logging.getLogger(__name__)

ONNX_OUTPUT_HEADS = {"masks": "logits", "bg_fg_logits": "bg_fg_logits", "target_logits": "target_logits"}


def load_onnx_segmentation_teacher(path: Path) -> CacheTeacher:
    import onnx
    import onnxruntime as ort

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise CheckpointError(f"teacher {path} is not a readable ONNX file ({type(exc).__name__})") from exc
    meta = {p.key: p.value for p in proto.metadata_props}
    config = json.loads(meta[ONNX_CONFIG_METADATA_KEY]) if ONNX_CONFIG_METADATA_KEY in meta else {}
    inputs = {i.name: i for i in proto.graph.input}
    outputs = [o.name for o in proto.graph.output]
    if set(inputs) != {"images", "rois"} or "masks" not in outputs:
        raise CheckpointError(
            f"teacher {path} is not a kdlab segmentation export (inputs images/rois, output masks); export "
            "one with python -m kdlab.distill.cache export-teacher"
        )
    dims = inputs["images"].type.tensor_type.shape.dim
    input_size = (int(dims[2].dim_value), int(dims[3].dim_value))
    mask_dims = proto.graph.output[outputs.index("masks")].type.tensor_type.shape.dim
    mask_size = (int(mask_dims[2].dim_value), int(mask_dims[3].dim_value))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [n for n in outputs if n in ONNX_OUTPUT_HEADS]
    heads = [ONNX_OUTPUT_HEADS[n] for n in names]

    def run(images: torch.Tensor, rois: torch.Tensor) -> dict[str, torch.Tensor]:
        feed = {
            "images": np.ascontiguousarray(images.float().cpu().numpy()),
            "rois": np.ascontiguousarray(rois.float().cpu().numpy()),
        }
        got = session.run(names, feed)
        return {h: torch.from_numpy(v) for h, v in zip(heads, got, strict=True)}

    return CacheTeacher(
        str(path),
        "onnx",
        file_sha256(path),
        config,
        heads,
        run,
        input_size=input_size,
        mask_size=mask_size,
    )


class _LetterboxedImages(Dataset):
    """Rows of a people split in the cache's geometry (the validation letterbox): image and ROI boxes."""

    def __init__(self, base: Any, indices: np.ndarray) -> None:
        from kdlab.data.transforms import EvalTransform

        self.base = base
        self.indices = indices
        self.geometry = EvalTransform(base.input_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict[str, Any]:
        sample = self.geometry(self.base.load_raw(int(self.indices[position])))
        return {"image": sample.image, "boxes": sample.boxes}


def _collate_letterboxed(samples: list[dict[str, Any]]) -> dict[str, Any]:
    from kdlab.data.loaders import ERROR_KEY

    for s in samples:
        if ERROR_KEY in s:
            return s
    rois = [
        torch.cat([torch.full((s["boxes"].shape[0], 1), float(i)), s["boxes"].float()], dim=1)
        for i, s in enumerate(samples)
    ]
    return {
        "images": torch.stack([s["image"] for s in samples]),
        "rois": torch.cat(rois),
        "counts": [int(s["boxes"].shape[0]) for s in samples],
        "boxes": torch.cat([s["boxes"].float() for s in samples]),
    }


def mirrored_rois(rois: torch.Tensor, width: int, batch_offset: int) -> torch.Tensor:
    """ROIs of the horizontally mirrored images, their batch index moved by `batch_offset`."""
    x1, x2 = rois[:, 1], rois[:, 3]
    return torch.stack([rois[:, 0] + batch_offset, width - x2, rois[:, 2], width - x1, rois[:, 4]], dim=1)


def teacher_roi_outputs(
    teacher: CacheTeacher, images: torch.Tensor, rois: torch.Tensor, symmetrize: bool
) -> dict[str, torch.Tensor]:
    """The teacher's per-ROI outputs; with `symmetrize`, the mean with its mirrored-back outputs on the
    mirrored images (one teacher pass over 2B images), which makes a replayed flip exact."""
    if not symmetrize:
        return teacher.run(images, rois)
    b, width = images.shape[0], images.shape[-1]
    both = teacher.run(torch.cat([images, images.flip(-1)]), torch.cat([rois, mirrored_rois(rois, width, b)]))
    n = rois.shape[0]
    return {h: 0.5 * (v[:n] + v[n:].flip(-1)) for h, v in both.items()}


def segmentation_sources(cfg: ExperimentConfig) -> dict[str, tuple[Any, str]]:
    """split -> (dataset, source fingerprint) for the configured people data."""
    from kdlab.data.loaders import build_datasets

    train, val = build_datasets(cfg)
    prints = segmentation_fingerprints(cfg, train, val)
    return {"train": (train, prints["train"]), "val": (val, prints["val"])}


def segmentation_fingerprints(cfg: ExperimentConfig, train: Any, val: Any) -> dict[str, str]:
    from kdlab.data.loaders import resolve_data_paths
    from kdlab.data.teacher_cache import coco_split_fingerprint

    paths = resolve_data_paths(cfg.data, generate=False)
    return {
        "train": coco_split_fingerprint(train, paths.train_annotations),
        "val": coco_split_fingerprint(val, paths.val_annotations),
    }


def check_segmentation_teacher(teacher: CacheTeacher, cfg: ExperimentConfig) -> None:
    if teacher.mask_size is not None and list(teacher.mask_size) != list(cfg.model.mask_size):
        raise CheckpointError(
            f"teacher {teacher.path} predicts {list(teacher.mask_size)} masks but model.mask_size is "
            f"{list(cfg.model.mask_size)}; set model.mask_size to the teacher's"
        )
    if teacher.input_size is not None and list(teacher.input_size) != list(cfg.data.input_size):
        raise CheckpointError(
            f"ONNX teacher {teacher.path} takes {list(teacher.input_size)} images but data.input_size is "
            f"{list(cfg.data.input_size)}"
        )


def write_segmentation_split(
    group: Any,
    dataset: Any,
    indices: np.ndarray,
    teacher: CacheTeacher,
    cfg: ExperimentConfig,
    request: CacheRequest,
    device: torch.device,
    progress: bool,
) -> None:
    """Fill one split's `data` (image file names) and `labels` (per-ROI teacher logits)."""
    batch_size, symmetrize = request.batch_size, request.symmetrize_flips
    import h5py

    from kdlab.data.loaders import ErrorsAsValues, WorkerLoader, raise_if_data_error

    names = [dataset.records[int(i)].file_name for i in indices]
    group.create_dataset("data", data=np.array(names, dtype=object), dtype=h5py.string_dtype())
    group["data"].attrs["images_dir"] = str(dataset.images_dir)
    labels = group.create_group("labels")
    mask_h, mask_w = cfg.model.mask_size
    channels = {"logits": 3, "bg_fg_logits": 2, "target_logits": 2}
    for head in teacher.heads:
        c = channels[head]
        labels.create_dataset(
            head, shape=(0, c, mask_h, mask_w), maxshape=(None, c, mask_h, mask_w), dtype=np.float16,
            chunks=(1, c, mask_h, mask_w),
        )  # fmt: skip
    labels.create_dataset("boxes", shape=(0, 4), maxshape=(None, 4), dtype=np.float32, chunks=(256, 4))
    offsets = [0]
    # The workers leave a group-wide SIGTERM to this process: exit 143, and the temp cache file is removed.
    loader = WorkerLoader(
        ErrorsAsValues(_LetterboxedImages(dataset, indices)), batch_size=batch_size, shuffle=False,
        num_workers=cfg.data.num_workers, collate_fn=_collate_letterboxed,
    )  # fmt: skip
    bar = tqdm(loader, desc=f"teacher cache {group.name.strip('/')}", unit="batch", disable=not progress)
    for batch in bar:
        raise_if_data_error(batch)
        images = batch["images"].to(device).float().div_(255.0)
        rois = batch["rois"].to(device)
        outputs = teacher_roi_outputs(teacher, images, rois, symmetrize) if rois.shape[0] else {}
        start, n = offsets[-1], int(rois.shape[0])
        if n:
            for head in teacher.heads:
                ds = labels[head]
                ds.resize(start + n, axis=0)
                ds[start : start + n] = outputs[head].cpu().numpy().astype(np.float16)
            labels["boxes"].resize(start + n, axis=0)
            labels["boxes"][start : start + n] = batch["boxes"].numpy()
        for count in batch["counts"]:
            offsets.append(offsets[-1] + count)
    labels.create_dataset("roi_offsets", data=np.asarray(offsets, dtype=np.int64))
    log.info("teacher cache %s: %d images, %d ROIs", group.name.strip("/"), len(indices), offsets[-1])


class SegmentationCacheWriter:
    task = "segmentation"
    heads = list(SEGMENTATION_HEADS)
    symmetrize_flips = True
    sources = staticmethod(segmentation_sources)
    preprocessing = staticmethod(segmentation_preprocessing)
    load_onnx_teacher = staticmethod(load_onnx_segmentation_teacher)
    check_teacher = staticmethod(check_segmentation_teacher)
    write_split = staticmethod(write_segmentation_split)
