"""Measuring an exported file against its PyTorch model: parity (max abs difference of the outputs), CPU latency
(median ms per image, onnxruntime and PyTorch, or several files in turns) and accuracy (the task's evaluator
scoring the file and the model on the same images)."""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdlab.export.interface import Batch, OnnxExporter, as_tuple
from kdlab.export.runtime import OnnxRuntimeModel, ort_feed, ort_session

log = logging.getLogger(__name__)

WARMUP_RUNS = 3
DEFAULT_LATENCY_RUNS = 20
DEFAULT_TOLERANCE = 1e-3


# --------------------------------------------------------------------------------- parity and latency
def _torch_outputs(model: nn.Module, exporter: OnnxExporter, batch: Batch) -> list[np.ndarray]:
    device = next(model.parameters()).device
    inputs = tuple(x.to(device) for x in exporter.model_inputs(batch))
    with torch.no_grad():
        return [o.float().cpu().numpy() for o in as_tuple(exporter.wrap(model)(*inputs))]


def _max_abs_diff(name: str, got: np.ndarray, expected: np.ndarray) -> float:
    """max |got - expected|; inf for a shape mismatch or a non-finite difference; 0 for empty outputs."""
    if got.shape != expected.shape:
        log.warning("ONNX output %s shape %s != PyTorch %s", name, got.shape, expected.shape)
        return math.inf
    if not got.size:
        return 0.0
    diff = float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64))))
    return diff if math.isfinite(diff) else math.inf


def onnx_parity_of(
    onnx_path: str | Path,
    model: nn.Module,
    exporter: OnnxExporter,
    batches: list[Batch],
    tolerance: float = DEFAULT_TOLERANCE,
) -> dict[str, Any]:
    """Max |onnxruntime - PyTorch| over every output of `exporter.wrap(model)` and every batch.

    The model runs in eval mode (its mode is restored). A shape mismatch or a non-finite difference counts
    as a failure (max_abs_diff = inf). Also counts what was compared: num_images, num_<...>, num_batches.
    """
    session = ort_session(onnx_path)
    was_training = model.training
    model.eval()
    worst = 0.0
    totals: dict[str, int] = {}
    try:
        for batch in batches:
            expected = _torch_outputs(model, exporter, batch)
            got = session.run(list(exporter.output_names), ort_feed(exporter, batch))
            for key, n in exporter.counts(batch).items():
                totals[key] = totals.get(key, 0) + n
            for name, g, e in zip(exporter.output_names, got, expected, strict=True):
                worst = max(worst, _max_abs_diff(name, g, e))
    finally:
        model.train(was_training)
    return {
        "max_abs_diff": worst,
        "tolerance": tolerance,
        "ok": bool(worst <= tolerance),
        **{f"num_{key}": n for key, n in totals.items()},
        "num_batches": len(batches),
    }


def median_ms(fn: Callable[[], object], runs: int) -> float:
    """Median wall time (ms) of `runs` calls after WARMUP_RUNS untimed ones."""
    for _ in range(WARMUP_RUNS):
        fn()
    times = []
    for _ in range(max(1, runs)):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return float(statistics.median(times))


def onnx_latency_of(
    onnx_path: str | Path, exporter: OnnxExporter, batch: Batch, runs: int = DEFAULT_LATENCY_RUNS
) -> float:
    """Median onnxruntime CPU time per image (ms) over `runs` timed runs after a warm-up."""
    session = ort_session(onnx_path)
    feed = ort_feed(exporter, batch)
    names = list(exporter.output_names)
    return median_ms(lambda: session.run(names, feed), runs) / max(1, exporter.counts(batch)["images"])


def torch_latency_of(
    model: nn.Module, exporter: OnnxExporter, batch: Batch, runs: int = DEFAULT_LATENCY_RUNS
) -> float:
    """Median PyTorch time per image (ms) on the model's device, eval mode, no grad; the reference for ONNX."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    inputs = tuple(x.to(device) for x in exporter.model_inputs(batch))

    def step() -> None:
        with torch.no_grad():
            model(*inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    try:
        return median_ms(step, runs) / max(1, exporter.counts(batch)["images"])
    finally:
        model.train(was_training)


def interleaved_onnx_latency(
    paths: dict[str, Path], exporter: OnnxExporter, batch: Batch, runs: int = DEFAULT_LATENCY_RUNS
) -> dict[str, float]:
    """Median onnxruntime CPU ms per image of each file, timed in turns (a, b, a, b, ...) so machine noise hits
    every file alike; their ratio is the number to trust, not the absolute times."""
    sessions = {name: ort_session(path) for name, path in paths.items()}
    feed = ort_feed(exporter, batch)
    names = list(exporter.output_names)
    for _ in range(WARMUP_RUNS):
        for session in sessions.values():
            session.run(names, feed)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(max(1, runs)):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(names, feed)
            times[name].append((time.perf_counter() - start) * 1000.0)
    per_image = max(1, exporter.counts(batch)["images"])
    return {name: float(statistics.median(t)) / per_image for name, t in times.items()}


# ------------------------------------------------------------------------------ scoring an ONNX file
# model -> the task's metrics (its evaluator) on the test split, or val without one; the scorer may carry
# `device` (where it runs) and `split` ("test" / "val") attributes, recorded with the accuracy.
Scorer = Callable[[nn.Module], dict[str, float]]


def numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of an evaluator's metrics, as floats (booleans and the rest left out)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def onnx_accuracy(
    onnx_path: str | Path, model: nn.Module, exporter: OnnxExporter, score: Scorer
) -> dict[str, Any]:
    """The task's metrics of the ONNX file (onnxruntime) next to the PyTorch model's, on the same images (the
    scorer's split: test when the run has one, else val); `difference` is ONNX - PyTorch of
    `exporter.accuracy_metric`."""
    metric = exporter.accuracy_metric
    onnx_metrics = numbers(score(OnnxRuntimeModel(onnx_path, exporter)))
    # The run's own float32 test pass already scored these weights on these images (`score.reference`)
    reference = getattr(score, "reference", None)
    torch_metrics = numbers(reference) if reference is not None else numbers(score(model))
    onnx_value, torch_value = onnx_metrics.get(metric), torch_metrics.get(metric)
    split = getattr(score, "split", "val")
    return {
        "metric": metric,
        "split": split,
        "data": "test" if split == "test" else "validation",
        "device": getattr(
            score, "device", None
        ),  # where the evaluator ran (onnxruntime itself runs on the CPU)
        "images": int(onnx_metrics.get("images", 0)),
        "onnx": onnx_metrics,
        "pytorch": torch_metrics,
        "pytorch_from": "the run's test pass (summary.json test_metrics)"
        if reference is not None
        else "scored here",
        "difference": (onnx_value - torch_value)
        if onnx_value is not None and torch_value is not None
        else None,
    }
