"""Generate the teacher-output cache (HDF5) once, train students from it many times.

    uv run kdlab-cache generate --teacher CKPT_OR_ONNX --config NAME --out FILE.hdf5 \\
        [--subset_fraction F] [--max_samples N] [--batch_size B] [--seed S] [--set key=value ...]
    uv run kdlab-cache export-teacher --teacher CKPT --out TEACHER.onnx
    (`python -m kdlab.distill.cache ...` is the same command)

The teacher is a kdlab checkpoint (.pth; its architecture comes from the config inside it) or an ONNX
file exported by kdlab (run by onnxruntime, where the task's writer reads one). What the file holds per
split comes from the task's cache writer (`kdlab.distill.cache_segmentation`, `cache_sequence`); the
layout and the subset rules are documented in `kdlab.data.teacher_cache`. The file is written to a temp
name and renamed when complete, so an interrupted generation never leaves a half-written cache behind.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from kdlab.atomic_io import atomic_write
from kdlab.config.schema import ExperimentConfig
from kdlab.data.teacher_cache import FORMAT_VERSION, CacheInfo, draw_subset
from kdlab.distill.teacher import LoadedTeacher
from kdlab.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)


@dataclass
class CacheTeacher:
    """A teacher that fills a cache: `run(*inputs) -> {head: float32 [N, ...]}` (inputs as the writer feeds)."""

    path: str
    kind: str  # pth | onnx
    sha256: str
    config: dict[str, Any]
    heads: list[str]
    run: Callable[..., dict[str, torch.Tensor]]
    input_size: tuple[int, int] | None = None  # fixed by an ONNX graph
    mask_size: tuple[int, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class CacheWriter(Protocol):
    """What differs per task when a cache is generated."""

    task: str
    heads: list[str]  # the outputs a .pth teacher contributes
    symmetrize_flips: bool  # whether the writer can cache the mean over a view and its mirror

    def sources(self, cfg: ExperimentConfig) -> dict[str, tuple[Any, str]]: ...
    def preprocessing(self, cfg: ExperimentConfig) -> dict[str, Any]: ...
    def load_onnx_teacher(self, path: Path) -> CacheTeacher: ...
    def check_teacher(self, teacher: CacheTeacher, cfg: ExperimentConfig) -> None: ...
    def write_split(
        self, group: Any, dataset: Any, indices: np.ndarray, teacher: CacheTeacher, cfg: ExperimentConfig,
        request: CacheRequest, device: torch.device, progress: bool,
    ) -> None: ...  # fmt: skip


# Loads a .pth teacher for the configured student and checks it was trained for the same task.
TeacherLoader = Callable[[Path], LoadedTeacher]


def load_cache_teacher(
    path: str | Path, writer: CacheWriter, load: TeacherLoader, device: torch.device
) -> CacheTeacher:
    """A .onnx file runs in onnxruntime (when the task's writer reads ONNX); anything else loads as a
    kdlab checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"teacher {path} does not exist")
    if path.suffix.lower() == ".onnx":
        return writer.load_onnx_teacher(path)
    loaded = load(path)
    teacher = loaded.teacher.to(device)
    heads = list(writer.heads)
    mask = loaded.config.get("model", {}).get("mask_size")

    def run(*inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        out = teacher(*(x.to(device) for x in inputs))
        return {h: out[h].float() for h in heads}

    return CacheTeacher(
        str(path), "pth", loaded.sha256, loaded.config, heads, run,
        mask_size=tuple(mask) if mask else None,
    )  # fmt: skip


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
    writer: CacheWriter,
    load: TeacherLoader,
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
    teacher = load_cache_teacher(request.teacher, writer, load, device)
    writer.check_teacher(teacher, cfg)
    sources = sources or writer.sources(cfg)
    preprocessing = writer.preprocessing(cfg)
    subsets = {
        split: draw_subset(len(ds), request.subset_fraction, request.max_samples, request.seed, split)
        for split, (ds, _) in sources.items()
    }
    out = Path(request.out)
    log.info(
        "teacher cache: %s teacher %s -> %s (%s)", teacher.kind, teacher.path, out,
        ", ".join(f"{s} {len(i)} of {len(sources[s][0])}" for s, i in subsets.items()),
    )  # fmt: skip

    def write(tmp: Path) -> None:
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
            attrs["symmetrize_flips"] = bool(request.symmetrize_flips and writer.symmetrize_flips)
            attrs["heads"] = json.dumps(teacher.heads)
            for split, (dataset, fingerprint) in sources.items():
                group = handle.create_group(split)
                group.attrs["source_fingerprint"] = fingerprint
                group.attrs["num_source_samples"] = len(dataset)
                group.create_dataset("indices", data=subsets[split])
                writer.write_split(group, dataset, subsets[split], teacher, cfg, request, device, progress)

    atomic_write(out, write)
    info = CacheInfo(out)
    log.info(
        "teacher cache written: %s, %.1f MB (%s)", out, out.stat().st_size / 1e6, info.megabytes_per_1000()
    )
    return info


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


if __name__ == "__main__":
    # `python -m kdlab.distill.cache ...` is only an alias of the `kdlab-cache` command (kdlab.cli.cache):
    # the entry point is run by name so this layer does not import the CLI layer above it.
    import runpy

    runpy.run_module("kdlab.cli.cache", run_name="__main__")
