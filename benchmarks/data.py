"""Data suite: the real training DataLoader (decode, augmentation, ROI masks, collate) against the KD step.

A synthetic COCO people dataset is generated into a temporary directory; for each worker count the train
loader (`build_loader`, the project's transforms) is timed over whole epochs after one warm epoch (persistent
workers already started). `loader_over_step` = loader images/s / KD-step images/s: above 1 the loader keeps
up. Then the real loop is run fed by the loader (`fed_over_step_time`: loop time / step-alone time, 1 = the
loader costs nothing); on CUDA the GPU-busy fraction of that loop comes from torch.profiler kernel times.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import BenchSettings, Clock, experiment_config, median
from benchmarks.kd import ProjectSteps
from kdlab.data.loaders import build_datasets, build_loader, raise_if_data_error
from kdlab.engine.batches import batch_to_device


def _epoch(loader: Any) -> int:
    images = 0
    for raw in loader:
        raise_if_data_error(raw)
        if raw is not None:
            images += int(raw["images"].shape[0])
    return images


def run_data_suite(s: BenchSettings, step_images_per_sec: float | None = None) -> dict[str, Any]:
    device = torch.device(s.device)
    clock = Clock(device)
    with tempfile.TemporaryDirectory(prefix="kdlab-bench-data-") as tmp:
        h, w = s.size
        synthetic = {"root": str(Path(tmp) / "synthetic"), "train_images": s.data_images, "val_images": 2,
                     "image_size": [h, w], "seed": 0}  # fmt: skip
        data = {"train_annotations": None, "train_images": None, "val_annotations": None, "val_images": None,
                "synthetic": synthetic, "max_train_images": None}  # fmt: skip
        cfg = experiment_config(s, data=data)
        t0 = time.perf_counter()
        train_set, _ = build_datasets(cfg)
        generate_s = time.perf_counter() - t0
        loaders = {
            n: build_loader(train_set, s.batch_size, shuffle=True, seed=0, num_workers=n,
                            pin_memory=device.type == "cuda")
            for n in s.workers
        }  # fmt: skip
        for loader in loaders.values():  # warm epoch: starts the persistent workers, fills page cache
            _epoch(loader)
        per_workers: dict[int, list[float]] = {n: [] for n in s.workers}
        for _ in range(max(1, min(s.reps, 3))):
            for n, loader in loaders.items():
                start = time.perf_counter()
                images = _epoch(loader)
                per_workers[n].append(images / (time.perf_counter() - start))
        loader_ips = {n: median(v) for n, v in per_workers.items()}
        steps = ProjectSteps(s, Path(tmp))
        if step_images_per_sec is None:  # the KD suite did not run: measure the step here
            for _ in range(max(1, s.warmup)):
                steps.kd_step()
            times = [clock.time(steps.kd_step)[0] for _ in range(max(1, min(s.reps, 3)))]
            step_images_per_sec = s.batch_size / median(times)
        loop_workers = max(s.workers)
        fed = fed_loop(steps, loaders[loop_workers], clock)
        loaders.clear()  # shuts the persistent workers down before the dataset directory goes
    best = max(loader_ips, key=lambda n: loader_ips[n])
    out: dict[str, Any] = {
        "synthetic_images": s.data_images,
        "generate_seconds": generate_s,
        "loader_images_per_sec": {str(n): v for n, v in loader_ips.items()},
        "step_images_per_sec": step_images_per_sec,
        "loader_over_step": {str(n): v / step_images_per_sec for n, v in loader_ips.items()},
        "loader_over_step_best": loader_ips[best] / step_images_per_sec,
        "best_workers": best,
        "fed_loop_workers": loop_workers,
        **fed,
    }
    return out


def fed_loop(steps: ProjectSteps, loader: Any, clock: Clock) -> dict[str, Any]:
    """The KD step fed by the loader (one epoch) against the same number of steps on a resident batch."""
    device = steps.device
    channels_last = steps.cfg.training.channels_last

    def run_fed() -> int:
        n = 0
        for raw in loader:
            raise_if_data_error(raw)
            if raw is None:
                continue
            steps.kd_trainer.forward_backward(batch_to_device(raw, device, channels_last))
            steps.kd_trainer.optimizer_step()
            n += 1
        return n

    run_fed()  # warm: shapes vary with the ROI count per batch
    fed_s, _ = clock.time(run_fed)
    n_steps = len(loader)
    alone_s, _ = clock.time(lambda: [steps.kd_step() for _ in range(n_steps)])
    out: dict[str, Any] = {
        "fed_loop_seconds": fed_s,
        "step_alone_seconds": alone_s,
        "fed_over_step_time": fed_s / alone_s,
    }
    if device.type == "cuda":
        out["gpu_busy_fraction"] = gpu_busy_fraction(run_fed)
    return out


def gpu_busy_fraction(run: Any) -> float | None:
    """Share of the loop's wall time during which at least one CUDA kernel runs (torch.profiler trace).

    The union of kernel intervals is divided by the span of the CPU range that wraps the loop, so gaps where
    the GPU waits for data, for the host or for a sync count as idle.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("kdlab_fed_loop"):
            run()
        torch.cuda.synchronize()
    events = prof.events()
    loop = [e for e in events if e.name == "kdlab_fed_loop" and e.device_type == DeviceType.CPU]
    kernels = sorted(
        (e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA
    )
    if not loop or not kernels:
        return None
    start = loop[0].time_range.start
    end = max(loop[0].time_range.end, kernels[-1][1])
    busy = 0.0
    cur_start, cur_end = None, None
    for k_start, k_end in kernels:
        k_start, k_end = max(k_start, start), min(k_end, end)
        if k_end <= k_start:
            continue
        if cur_end is None or k_start > cur_end:
            if cur_end is not None:
                busy += cur_end - cur_start
            cur_start, cur_end = k_start, k_end
        else:
            cur_end = max(cur_end, k_end)
    if cur_end is not None:
        busy += cur_end - cur_start
    return busy / max(end - start, 1e-9)
