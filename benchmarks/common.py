"""Shared pieces of the suites: settings, the experiment config they imply, timing, batches, machine info."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from kdlab.config.loader import deep_merge, named_config_dict, validate_config
from kdlab.config.schema import ExperimentConfig

B0 = "timm-efficientnet-b0"
B3 = "timm-efficientnet-b3"


@dataclass
class BenchSettings:
    """Everything a suite needs; `defaults_for(device)` fills the sizes that suit the device."""

    device: str = "cpu"
    batch_size: int = 4
    size: tuple[int, int] = (192, 192)
    teacher_encoder: str = B3
    student_encoder: str = B0
    amp: str = "auto"  # auto|bf16|fp16|off, as training.amp
    channels_last: bool = True
    compile: bool = False
    reps: int = 7
    warmup: int = 2
    workers: tuple[int, ...] = (0, 1, 2)
    rois_per_image: int = 3
    base_config: str = "quickstart_distill"  # ROI/mask/head sizes come from here
    fast_config: str = (
        "quickstart_fast_distill"  # onnx suite: the fast student = base + this config's model changes
    )
    onnx_run_dirs: tuple[
        str, ...
    ] = ()  # onnx suite: finished runs whose exported file's accuracy is reported
    data_images: int = 32  # synthetic images for the data suite
    onnx_runs: int = 10
    onnx_sizes: tuple[tuple[int, int], ...] = ()  # extra ONNX resolutions besides `size`, e.g. ((640, 640),)
    peak_memory: bool = True  # CPU: measure max RSS in a fresh subprocess
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    naive: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["size"] = list(self.size)
        out["workers"] = list(self.workers)
        out["onnx_sizes"] = [list(x) for x in self.onnx_sizes]
        out["onnx_run_dirs"] = list(self.onnx_run_dirs)
        return out


def defaults_for(device: str) -> BenchSettings:
    """CPU: quickstart sizes (192x192, batch 2: a few minutes on 2 cores), one torch thread. CUDA: the seed's
    640x640, batch 16.

    One thread on CPU: on a shared 2-core machine two OpenMP threads spin against the other processes and
    the same step's wall time varied 3x between rounds; with one thread its CPU time varied by ~5 %. Pass
    `--threads 2` on a dedicated machine."""
    if device == "cuda":
        return BenchSettings(
            device="cuda", batch_size=16, size=(640, 640), base_config="people_b0_from_b3",
            fast_config="people_fast_from_b3", reps=20, warmup=5,
            workers=(0, 2, 4, 8), data_images=128, onnx_runs=20, onnx_sizes=(),
        )  # fmt: skip
    return BenchSettings(batch_size=2, reps=9, warmup=1, threads=1)


def experiment_config(
    s: BenchSettings, encoder: str | None = None, data: dict[str, Any] | None = None
) -> ExperimentConfig:
    """The named base config at the benchmark's sizes; distillation on, gradient-share measurement off."""
    base = named_config_dict(s.base_config)
    h, w = s.size
    override: dict[str, Any] = {
        "model": {"encoder": encoder or s.student_encoder, "encoder_weights": None},
        "data": {"input_size": [h, w], **(data or {})},
        "training": {
            "batch_size": s.batch_size,
            "amp": s.amp,
            "channels_last": s.channels_last,
            "compile": s.compile,
            "device": s.device,
            "epochs": 1000,  # a long schedule: the LR stays in warm-up/cosine, never at an edge
            "grad_accum_steps": 1,
            "ema": {"enabled": False},
        },
        # grad_share_every=0: the per-term gradient-share measurement (one extra backward per term, every N
        # steps) is excluded from the timed KD step.
        "distillation": {"grad_share_every": 0},
    }
    return validate_config(deep_merge(base, override), where="benchmark settings")


def synthetic_batch(s: BenchSettings, cfg: ExperimentConfig, seed: int = 0) -> dict[str, Any]:
    """A collated CPU batch like the loader's: uint8 images, `rois_per_image` ROIs per image, 3-class masks."""
    gen = torch.Generator().manual_seed(seed)
    b = s.batch_size
    h, w = s.size
    k = max(1, s.rois_per_image)
    images = torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=gen)
    x1 = torch.rand(b * k, generator=gen) * 0.5 * w
    y1 = torch.rand(b * k, generator=gen) * 0.4 * h
    x2 = x1 + (0.2 + 0.3 * torch.rand(b * k, generator=gen)) * w
    y2 = y1 + (0.3 + 0.3 * torch.rand(b * k, generator=gen)) * h
    index = torch.arange(b).repeat_interleave(k).float()
    rois = torch.stack([index, x1, y1, x2.clamp(max=w - 1), y2.clamp(max=h - 1)], dim=1)
    mh, mw = cfg.model.mask_size
    masks = torch.randint(0, 3, (b * k, mh, mw), dtype=torch.uint8, generator=gen)
    return {
        "images": images,
        "rois": rois,
        "masks": masks,
        "image_ids": list(range(b)),
        "indices": list(range(b)),
    }


class Clock:
    """Wall time of a region, plus this process's CPU time (all threads) on CPU runs.

    On CUDA the device is synchronised before and after the region (in the benchmark only, never in the
    library). CPU time is recorded because the benchmark machine may be shared: other processes stretch wall
    time but barely change the CPU time a step needs, so ratios of CPU times are a steadier cross-check.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], object]) -> tuple[float, float]:
        """(wall seconds, process CPU seconds) of `fn()`."""
        self.sync()
        cpu = time.process_time()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start, time.process_time() - cpu


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def interleaved(
    clock: Clock, cases: dict[str, Callable[[], object]], reps: int, warmup: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Warm every case up, then `reps` rounds that time each case once; round r starts at case r mod n.

    Returns per-case lists of wall times and of CPU times (seconds). Interleaving spreads slow phases of a
    shared machine over all cases instead of one, and rotating the order keeps any "runs right after case X"
    effect (caches, allocator) from favouring one case."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    clock.sync()
    wall: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for r in range(max(1, reps)):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            w, c = clock.time(cases[name])
            wall[name].append(w)
            cpu[name].append(c)
    return wall, cpu


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
             "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
        )  # fmt: skip
    return info


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor()


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    import logging

    root = logging.getLogger("kdlab")
    old = root.level
    root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.setLevel(old)


def settings_from_json(data: dict[str, Any]) -> BenchSettings:
    data = dict(data)
    data["size"] = tuple(data["size"])
    data["workers"] = tuple(data["workers"])
    data["onnx_sizes"] = tuple(tuple(x) for x in data.get("onnx_sizes", ()))
    return BenchSettings(**data)
