"""Generate the teacher-output cache (HDF5) once, train students from it many times.

    uv run python -m kdlab.distill.cache generate --teacher CKPT_OR_ONNX --config NAME --out FILE.hdf5 \\
        [--subset_fraction F] [--max_samples N] [--batch_size B] [--seed S] [--set key=value ...]
    uv run python -m kdlab.distill.cache export-teacher --teacher CKPT --out TEACHER.onnx

The teacher is a kdlab checkpoint (.pth; its architecture comes from the config inside it) or an ONNX
file exported by kdlab (run by onnxruntime). The file layout and the subset rules are documented in
`kdlab.data.teacher_cache`. The file is written to a temp name and renamed when complete, so an
interrupted generation never leaves a half-written cache behind.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from kdlab.atomic_io import temp_path_for
from kdlab.config.schema import ExperimentConfig
from kdlab.data.teacher_cache import (
    FORMAT_VERSION,
    ONNX_CONFIG_METADATA_KEY,
    SEGMENTATION_HEADS,
    CacheInfo,
    draw_subset,
    segmentation_preprocessing,
    sha256_of_file,
)
from kdlab.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

ONNX_OUTPUT_HEADS = {"masks": "logits", "bg_fg_logits": "bg_fg_logits", "target_logits": "target_logits"}


# ------------------------------------------------------------------------------------------------ teachers
@dataclass
class CacheTeacher:
    """A teacher that fills a cache: `run(images [B,3,H,W] in [0,1], rois [N,5]) -> {head: float32 [N,...]}`."""

    path: str
    kind: str  # pth | onnx
    sha256: str
    config: dict[str, Any]
    heads: list[str]
    run: Callable[..., dict[str, torch.Tensor]]
    input_size: tuple[int, int] | None = None  # fixed by an ONNX graph
    mask_size: tuple[int, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def load_cache_teacher(path: str | Path, cfg: ExperimentConfig, device: torch.device) -> CacheTeacher:
    """A .onnx file runs in onnxruntime; anything else loads as a kdlab checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"teacher {path} does not exist")
    if path.suffix.lower() == ".onnx":
        if cfg.task != "segmentation":
            raise ConfigError(
                f"ONNX teachers are implemented for task=segmentation only, not task={cfg.task}"
            )
        return _onnx_teacher(path)
    from kdlab.distill.teacher import load_teacher

    d = cfg.distillation
    loaded = load_teacher(path, 1.0, d.teacher_input_mean, d.teacher_input_std)
    teacher = loaded.teacher.to(device)
    teacher_task = loaded.config.get("task", "segmentation")
    if teacher_task != cfg.task:
        raise CheckpointError(
            f"teacher {path} is a {teacher_task} model but this experiment's task is {cfg.task}; use a "
            "teacher trained for the same task"
        )
    heads = list(SEGMENTATION_HEADS) if cfg.task == "segmentation" else ["trajectory"]
    mask = loaded.config.get("model", {}).get("mask_size")

    def run(*inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        out = teacher(*(x.to(device) for x in inputs))
        return {h: out[h].float() for h in heads}

    return CacheTeacher(
        str(path), "pth", loaded.sha256, loaded.config, heads, run,
        mask_size=tuple(mask) if mask else None,
    )  # fmt: skip


def _onnx_teacher(path: Path) -> CacheTeacher:
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
        sha256_of_file(path),
        config,
        heads,
        run,
        input_size=input_size,
        mask_size=mask_size,
    )


# -------------------------------------------------------------------------------------------- segmentation
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


def _segmentation_sources(cfg: ExperimentConfig) -> dict[str, tuple[Any, str]]:
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


def _check_segmentation_teacher(teacher: CacheTeacher, cfg: ExperimentConfig) -> None:
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


def _write_segmentation_split(
    group: Any,
    dataset: Any,
    indices: np.ndarray,
    teacher: CacheTeacher,
    cfg: ExperimentConfig,
    batch_size: int,
    symmetrize: bool,
    device: torch.device,
    progress: bool,
) -> int:
    """Fill one split's `data` (image file names) and `labels` (per-ROI teacher logits); returns the ROIs."""
    import h5py

    from kdlab.data.loaders import ErrorsAsValues, raise_if_data_error

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
    loader = DataLoader(
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
    return offsets[-1]


# -------------------------------------------------------------------------------------------- generation
@dataclass
class CacheRequest:
    teacher: str
    out: Path
    subset_fraction: float = 1.0
    max_samples: int | None = None
    batch_size: int = 32
    seed: int = 0
    symmetrize_flips: bool = True


def generate_cache(
    cfg: ExperimentConfig,
    request: CacheRequest,
    device: torch.device | None = None,
    progress: bool = True,
    sources: dict[str, tuple[Any, str]] | None = None,
) -> CacheInfo:
    """Run the teacher over the configured data's subset and write the cache file atomically.

    `sources` (split -> (dataset, fingerprint)) skips rebuilding datasets the caller already has.
    """
    import h5py

    device = device or torch.device("cpu")
    if not 0.0 < request.subset_fraction <= 1.0:
        raise ConfigError(f"--subset_fraction must be in (0, 1], got {request.subset_fraction}")
    if request.max_samples is not None and request.max_samples <= 0:
        raise ConfigError(f"--max_samples must be > 0, got {request.max_samples}")
    if request.batch_size <= 0:
        raise ConfigError(f"--batch_size must be > 0, got {request.batch_size}")
    if cfg.task == "sequence":
        writer = _sequence_writer()
    elif cfg.task != "segmentation":
        raise ConfigError(
            f"a teacher cache for task={cfg.task} is not implemented (segmentation and sequence are)"
        )
    teacher = load_cache_teacher(request.teacher, cfg, device)
    if cfg.task == "segmentation":
        _check_segmentation_teacher(teacher, cfg)
        sources = sources or _segmentation_sources(cfg)
        preprocessing = segmentation_preprocessing(cfg)
    else:
        sources = sources or writer.sources(cfg)
        preprocessing = writer.preprocessing(cfg)
    subsets = {
        split: draw_subset(len(ds), request.subset_fraction, request.max_samples, request.seed, split)
        for split, (ds, _) in sources.items()
    }
    out = Path(request.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(out)
    log.info(
        "teacher cache: %s teacher %s -> %s (%s)", teacher.kind, teacher.path, out,
        ", ".join(f"{s} {len(i)} of {len(sources[s][0])}" for s, i in subsets.items()),
    )  # fmt: skip
    try:
        with h5py.File(tmp, "w") as handle:
            attrs = handle.attrs
            attrs["format_version"] = FORMAT_VERSION
            attrs["task"] = cfg.task
            attrs["teacher_sha256"] = teacher.sha256
            attrs["teacher_path"] = str(teacher.path)
            attrs["teacher_kind"] = teacher.kind
            attrs["teacher_config"] = json.dumps(teacher.config)
            attrs["preprocessing"] = json.dumps(preprocessing)
            attrs["subset_seed"] = request.seed
            attrs["subset_fraction"] = request.subset_fraction
            attrs["max_samples"] = request.max_samples or 0
            attrs["symmetrize_flips"] = bool(request.symmetrize_flips and cfg.task == "segmentation")
            attrs["heads"] = json.dumps(teacher.heads)
            for split, (dataset, fingerprint) in sources.items():
                group = handle.create_group(split)
                group.attrs["source_fingerprint"] = fingerprint
                group.attrs["num_source_samples"] = len(dataset)
                group.create_dataset("indices", data=subsets[split])
                if cfg.task == "segmentation":
                    rois = _write_segmentation_split(
                        group, dataset, subsets[split], teacher, cfg, request.batch_size,
                        request.symmetrize_flips, device, progress,
                    )  # fmt: skip
                    log.info("teacher cache %s: %d images, %d ROIs", split, len(subsets[split]), rois)
                else:
                    writer.write_split(
                        group, dataset, subsets[split], teacher, request.batch_size, device, progress
                    )
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    info = CacheInfo(out)
    log.info(
        "teacher cache written: %s, %.1f MB (%s)", out, out.stat().st_size / 1e6, info.megabytes_per_1000()
    )
    return info


# --------------------------------------------------------------------------------------------- sequences
def sequence_preprocessing(cfg: ExperimentConfig) -> dict[str, Any]:
    return {
        "task": "sequence",
        "input_dim": cfg.data.sequence.input_dim,
        "num_classes": cfg.model.num_classes,
    }


def sequence_fingerprint(dataset: Any) -> str:
    """Identifies a sequence split: the bytes of its inputs and class labels (after data.* selection)."""
    import hashlib

    digest = hashlib.sha256(np.ascontiguousarray(dataset.inputs.numpy()).tobytes())
    digest.update(np.ascontiguousarray(dataset.labels.numpy()).tobytes())
    return digest.hexdigest()


class _SequenceWriter:
    """Sequences: `data` = the inputs [n,T,D_in], `labels` = the teacher's trajectory [n,T+1,D_out]
    (its output-state history, t = 0 included), `class_labels` [n]."""

    @staticmethod
    def sources(cfg: ExperimentConfig) -> dict[str, tuple[Any, str]]:
        from kdlab.data.sequence import SequenceDataset, load_sequence_splits

        splits = load_sequence_splits(cfg.data.sequence, cfg.model.num_classes)
        out = {}
        for name, split in splits.items():
            dataset = SequenceDataset(split)
            out[name] = (dataset, sequence_fingerprint(dataset))
        return out

    preprocessing = staticmethod(sequence_preprocessing)

    @staticmethod
    def write_split(
        group: Any, dataset: Any, indices: np.ndarray, teacher: CacheTeacher, batch_size: int,
        device: torch.device, progress: bool,
    ) -> None:  # fmt: skip
        inputs = dataset.inputs[torch.from_numpy(indices)]
        group.create_dataset("data", data=inputs.numpy().astype(np.float32))
        group.create_dataset("class_labels", data=dataset.labels[torch.from_numpy(indices)].numpy())
        chunks = []
        starts = range(0, len(indices), batch_size)
        for start in tqdm(
            starts, desc=f"teacher cache {group.name.strip('/')}", unit="batch", disable=not progress
        ):
            chunks.append(teacher.run(inputs[start : start + batch_size])["trajectory"].cpu().numpy())
        group.create_dataset("labels", data=np.concatenate(chunks).astype(np.float32))


def _sequence_writer() -> Any:
    return _SequenceWriter


def request_from_config(cfg: ExperimentConfig, teacher: str, out: Path, args: Any = None) -> CacheRequest:
    """The config's `distillation.cache` settings, overridden by the CLI flags that were given."""
    c = cfg.distillation.cache
    req = CacheRequest(
        teacher=teacher, out=out,
        subset_fraction=c.subset_fraction if c else 1.0, max_samples=c.max_samples if c else None,
        batch_size=c.batch_size if c else 32, seed=c.seed if c else 0,
        symmetrize_flips=c.symmetrize_flips if c else True,
    )  # fmt: skip
    if args is not None:
        for name in ("subset_fraction", "max_samples", "batch_size", "seed"):
            if getattr(args, name) is not None:
                setattr(req, name, getattr(args, name))
        if args.no_symmetrize_flips:
            req.symmetrize_flips = False
    return req


if __name__ == "__main__":  # `python -m kdlab.distill.cache ...`; the command line lives in kdlab.cli.cache
    from kdlab.cli.cache import entrypoint

    entrypoint()
