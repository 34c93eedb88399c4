"""The ONNX pipeline every task shares: checkpoint -> ONNX file -> onnxruntime parity -> latency -> metadata.

What differs per task (the wrapper module, inputs, names, axes, the description) is an `OnnxExporter`;
see `kdlab.export.segmentation` and `kdlab.export.classification`. Files written beside the checkpoint:
`checkpoints/best_model.onnx` (the resolved config in its metadata_props) and `best_model.onnx.json`.

Two exporters (`export.exporter`): "dynamo" (`torch.export` + onnxscript, the supported one since torch 2.9,
opset >= 18) and "torchscript" (the deprecated tracer, kept as a recorded fallback); "auto" tries dynamo and
falls back to TorchScript when dynamo raises or misses parity; `best_model.onnx.json` records which one wrote
the file and why. Two traps of the TorchScript exporter (the copy below makes them harmless for both):
- It calls `.train(<mode the exported module had>)` on the way out, recursively. A freshly built wrapper
  module is in training mode, so exporting `Wrapper(model)` silently leaves the model in training mode
  (BatchNorm on batch statistics, drop-path on) and any PyTorch comparison made afterwards is wrong by ~1.
  `export_to_onnx` exports an eval-mode deep copy and never touches the caller's model.
- torch's GroupNorm symbolic reshapes to [N, groups, -1], which onnxruntime cannot resolve when N = 0
  (e.g. an image batch without ROIs). The copy's GroupNorms are swapped for `TraceableGroupNorm`, the same
  maths in plain ops with no inferred dimension.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import statistics
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision
from torch import nn

from kdlab.atomic_io import atomic_write, write_json_atomic
from kdlab.checkpoints import file_sha256, load_checkpoint, model_from_checkpoint
from kdlab.config.schema import ExperimentConfig, ExportConfig
from kdlab.data.teacher_cache import ONNX_CONFIG_METADATA_KEY
from kdlab.errors import CheckpointError, ConfigError, KdlabRunFailure

log = logging.getLogger(__name__)

CONFIG_METADATA_KEY = ONNX_CONFIG_METADATA_KEY  # the resolved experiment config (JSON) in metadata_props
EXPORT_METHODS = ("dynamo", "torchscript")
# What export.exporter="auto" tries, in order. tests/conftest.py narrows it to TorchScript (2 s instead of ~25 s
# per export on CPU) for the tests that only need some ONNX file; the dynamo tests ask for "dynamo" by name.
AUTO_ORDER: tuple[str, ...] = EXPORT_METHODS
DYNAMO_MIN_OPSET = 18  # the dynamo exporter's lowest opset: it would convert down, or fail to, noisily
WARMUP_RUNS = 3
DEFAULT_LATENCY_RUNS = 20
DEFAULT_TOLERANCE = 1e-3

Batch = tuple[torch.Tensor, ...]  # one batch of the exported graph's inputs, as the loader gives them


class ExportParityError(KdlabRunFailure):
    """onnxruntime's output differs from PyTorch's by more than the tolerance."""


class OnnxExporter(ABC):
    """What one task's ONNX export needs beyond the shared pipeline.

    `wrap(model)` is the module that is traced and compared: it takes `input_names` positionally and returns
    a tuple in the order of `output_names` (a lone tensor is taken as a 1-tuple). A `Batch` holds the graph's inputs as the loader gives them
    (images may be uint8); `model_inputs` turns it into what the graph takes.
    """

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    min_parity_images: int = 1  # parity is measured on at least this many validation images

    @abstractmethod
    def build_model(self, cfg: ExperimentConfig) -> nn.Module:
        """The task's model for `cfg` (the checkpoint's weights are loaded into it)."""

    @abstractmethod
    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to export: `model` with its outputs as a tuple in `output_names` order."""

    @abstractmethod
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx's dynamic_axes: input/output name -> {dim: symbolic name}."""

    @abstractmethod
    def input_size(self, cfg: ExperimentConfig) -> tuple[int, int]:
        """The (H, W) the graph is traced at."""

    @abstractmethod
    def example_inputs(self, cfg: ExperimentConfig) -> Batch:
        """Inputs to trace with (on CPU; sizes other than 1, so none is mistaken for a constant)."""

    @abstractmethod
    def validation_batches(self, cfg: ExperimentConfig, num_images: int) -> list[Batch]:
        """The first `num_images` validation images of the run's own data, as batches."""

    @abstractmethod
    def latency_batch(self, batches: list[Batch]) -> Batch:
        """The one-image batch the latency is timed on."""

    @abstractmethod
    def counts(self, batch: Batch) -> dict[str, int]:
        """What a batch holds, e.g. {"images": 2, "rois": 5}; "images" is required (latency is per image)."""

    @abstractmethod
    def describe(self, cfg: ExperimentConfig) -> dict[str, Any]:
        """The task's part of the metadata JSON: inputs, outputs and what they mean, model facts."""

    def check_opset(self, opset: int) -> None:
        """Raise ConfigError when the graph cannot be exported correctly at `opset` (default: any works)."""
        return None

    def parity_scope(self, parity: dict[str, Any]) -> str:
        """How much data a parity result covers, for messages: "8 validation images"."""
        return f"{parity['num_images']} validation images"

    def model_inputs(self, batch: Batch) -> Batch:
        """The graph's float32 inputs; uint8 images (loader batches) are scaled to [0,1]."""
        return tuple(float_images(x) for x in batch)

    # The metric the ONNX file is scored by on the validation set (a key of the task's evaluator's metrics).
    accuracy_metric: str = "miou"  # the headline that selects checkpoints (SegmentationTask.best_metric)

    def as_model_outputs(self, outputs: tuple[torch.Tensor, ...]) -> Any:
        """The graph's outputs shaped like the model's own return value, so the task's evaluator can score an
        ONNX file as it scores the model (default: the first output is the model's output)."""
        return outputs[0]


# --------------------------------------------------------------------------------------------- the graph
class TraceableGroupNorm(nn.Module):
    """`nn.GroupNorm` in plain tensor ops that export without an inferred (-1) dimension.

    Same parameters (shared, not copied) and the same maths: per sample and group, subtract the mean and
    divide by sqrt(biased variance + eps), then the per-channel affine transform.
    """

    def __init__(self, norm: nn.GroupNorm) -> None:
        super().__init__()
        self.num_groups = norm.num_groups
        self.num_channels = norm.num_channels
        self.eps = norm.eps
        self.weight = norm.weight
        self.bias = norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grouped = x.unflatten(1, (self.num_groups, self.num_channels // self.num_groups))
        dims = tuple(range(2, grouped.dim()))
        mean = grouped.mean(dim=dims, keepdim=True)
        var = (grouped - mean).square().mean(dim=dims, keepdim=True)
        out = ((grouped - mean) * torch.rsqrt(var + self.eps)).reshape(x.shape)
        if self.weight is not None:
            affine_shape = (1, self.num_channels) + (1,) * (x.dim() - 2)
            out = out * self.weight.view(affine_shape) + self.bias.view(affine_shape)
        return out


def export_ready_copy(model: nn.Module) -> nn.Module:
    """An eval-mode deep copy of `model` whose GroupNorms are `TraceableGroupNorm`s (the original is untouched)."""
    clone = copy.deepcopy(model).eval()
    for module in list(clone.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.GroupNorm):
                setattr(module, name, TraceableGroupNorm(child))
    return clone.eval()


def _declare_static_output_dims(
    path: Path, per_sample_shapes: list[tuple[int, ...]], metadata: dict[str, str] | None = None
) -> None:
    """Write the fixed per-sample dims into each output's type (the tracer can leave them symbolic), and
    `metadata` into metadata_props.

    Only dim 0 is dynamic, so the others never vary; declaring them lets users and tools see e.g. the mask
    size in the graph signature.
    """
    model_proto = onnx.load(str(path))
    for output, per_sample_shape in zip(model_proto.graph.output, per_sample_shapes, strict=True):
        dims = output.type.tensor_type.shape.dim
        for dim, value in zip(dims[1:], per_sample_shape, strict=True):
            dim.Clear()
            dim.dim_value = int(value)
    for key, value in (metadata or {}).items():
        entry = model_proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model_proto, str(path))


def as_tuple(outputs: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """A wrapper's outputs as a tuple (a module with one output may return the tensor itself)."""
    return (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)


def _dynamic_shapes(exporter: OnnxExporter) -> tuple[dict[int, Any], ...]:
    """torch.export's dynamic_shapes for the graph's inputs, from `exporter.dynamic_axes()`: one Dim per
    symbolic name (shared where two inputs share one), allowed down to 0 (an image batch without ROIs)."""
    dims: dict[str, Any] = {}
    axes = exporter.dynamic_axes()
    return tuple(
        {d: dims.setdefault(sym, torch.export.Dim(sym, min=0)) for d, sym in axes.get(name, {}).items()}
        for name in exporter.input_names
    )


def _torch_onnx_export(
    wrapper: nn.Module, exporter: OnnxExporter, inputs: Batch, tmp: Path, opset: int, method: str
) -> None:
    common = {"input_names": list(exporter.input_names), "output_names": list(exporter.output_names)}
    if method == "dynamo":
        torch.onnx.export(
            wrapper, inputs, str(tmp), **common, dynamic_shapes=_dynamic_shapes(exporter),
            opset_version=max(opset, DYNAMO_MIN_OPSET), dynamo=True, external_data=False, verbose=False,
        )  # fmt: skip
        return
    with warnings.catch_warnings():
        # Expected and harmless here: the legacy-exporter deprecation notice and tracer warnings about
        # shape checks (sizes fixed by the config are constants).
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            wrapper, inputs, str(tmp), **common, dynamic_axes=exporter.dynamic_axes(), opset_version=opset,
            do_constant_folding=True, training=torch.onnx.TrainingMode.EVAL, dynamo=False,
        )  # fmt: skip


def file_opset(path: str | Path) -> int:
    """The default-domain opset an ONNX file was written at (dynamo may raise the requested one)."""
    model_proto = onnx.load(str(path), load_external_data=False)
    return next((int(o.version) for o in model_proto.opset_import if o.domain in ("", "ai.onnx")), -1)


def export_to_onnx(
    model: nn.Module,
    exporter: OnnxExporter,
    path: Path,
    example_inputs: Batch,
    opset: int = DYNAMO_MIN_OPSET,
    metadata: dict[str, str] | None = None,
    method: str = "dynamo",
) -> None:
    """Export `exporter.wrap(<eval-mode copy of model>)` on `example_inputs` to `path` with `method`
    ("dynamo" or "torchscript"); `metadata` goes into the file's metadata_props.

    `model` and its train/eval mode are untouched. Written to a temp file, checked with `onnx.checker`,
    then renamed into place. Dynamo writes at opset max(opset, 18).
    """
    if method not in EXPORT_METHODS:
        raise ConfigError(f"unknown ONNX exporter {method!r}; use one of {', '.join(EXPORT_METHODS)}")
    exporter.check_opset(opset)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    # Eval-mode wrapper: the exporter restores the wrapper's mode, recursively, when it is done.
    wrapper = exporter.wrap(export_ready_copy(model)).eval()
    inputs = tuple(x.to(device) for x in example_inputs)

    def write(tmp: Path) -> None:
        with torch.no_grad():
            _torch_onnx_export(wrapper, exporter, inputs, tmp, opset, method)
            per_sample_shapes = [tuple(o.shape[1:]) for o in as_tuple(wrapper(*inputs))]
        _declare_static_output_dims(tmp, per_sample_shapes, metadata)
        onnx.checker.check_model(str(tmp), full_check=True)

    atomic_write(path, write)
    log.info("exported ONNX (%s, opset %d) to %s", method, file_opset(path), path)


def export_methods(requested: str) -> tuple[str, ...]:
    """The exporters to try for export.exporter=`requested`, in order ("auto": AUTO_ORDER)."""
    if requested == "auto":
        return AUTO_ORDER
    if requested not in EXPORT_METHODS:
        raise ConfigError(
            f"config value export.exporter={requested!r} is unknown; use auto, dynamo or torchscript"
        )
    return (requested,)


def export_with_fallback(
    model: nn.Module,
    exporter: OnnxExporter,
    path: Path,
    example_inputs: Batch,
    opset: int,
    metadata: dict[str, str] | None,
    methods: tuple[str, ...],
    accept: Callable[[str], str | None] = lambda method: None,
) -> tuple[str, list[dict[str, str]]]:
    """Export with the first of `methods` that works; returns (the method used, the attempts that failed).

    A method fails when it raises or when `accept(method)` (called with the file written) returns a reason
    (e.g. parity missed). The last method's file is kept whatever `accept` says, so the caller can report it;
    when the last method raises, the error propagates (with the earlier failures logged).
    """
    failures: list[dict[str, str]] = []
    for i, method in enumerate(methods):
        last = i == len(methods) - 1
        try:
            export_to_onnx(model, exporter, path, example_inputs, opset, metadata, method)
        except ConfigError:
            raise
        except Exception as exc:
            if last:
                raise
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            log.warning("ONNX export with %s failed (%s); trying %s", method, reason, methods[i + 1])
            failures.append({"exporter": method, "reason": reason})
            continue
        reason = accept(method)
        if reason is None or last:
            return method, failures
        log.warning("ONNX export with %s rejected (%s); trying %s", method, reason, methods[i + 1])
        failures.append({"exporter": method, "reason": reason})
    raise AssertionError("unreachable: methods is never empty")


def config_metadata(cfg: ExperimentConfig) -> dict[str, str]:
    """metadata_props holding the resolved config, so the file alone says how it was built."""
    return {CONFIG_METADATA_KEY: json.dumps(cfg.model_dump(mode="json"))}


# --------------------------------------------------------------------------------- parity and latency
def float_images(x: torch.Tensor) -> torch.Tensor:
    """Loader batches hold uint8 images; the exported model takes float32 in [0,1]."""
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    return x.float()


def ort_session(onnx_path: str | Path) -> ort.InferenceSession:
    """A CPU onnxruntime session that logs errors only, on the process's thread budget: as many intra-op
    threads as torch has (the runner pins each run's threads; onnxruntime's default, one per core, would spin
    on the cores of the runs beside it)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def ort_feed(exporter: OnnxExporter, batch: Batch) -> dict[str, np.ndarray]:
    inputs = exporter.model_inputs(batch)
    return {
        n: np.ascontiguousarray(x.cpu().numpy()) for n, x in zip(exporter.input_names, inputs, strict=True)
    }


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


def host_array(x: torch.Tensor) -> np.ndarray:
    """A float32 numpy copy of a model input, wherever the tensor lives (onnxruntime reads host memory)."""
    return np.ascontiguousarray(x.detach().float().cpu().numpy())


class OnnxRuntimeModel(nn.Module):
    """An ONNX file behind the model's call signature (CPU onnxruntime), so the task's own evaluator scores
    the exported file exactly as it scores the PyTorch model: same data, same metrics code. The outputs come
    back on the device of the inputs, where the evaluator's targets are (a CUDA evaluator on a GPU box)."""

    def __init__(self, path: str | Path, exporter: OnnxExporter) -> None:
        super().__init__()
        self.path = Path(path)
        self.exporter = exporter
        self.session = ort_session(path)

    def forward(self, *inputs: torch.Tensor) -> Any:
        feed = {name: host_array(x) for name, x in zip(self.exporter.input_names, inputs, strict=True)}
        outputs = self.session.run(list(self.exporter.output_names), feed)
        device = inputs[0].device
        return self.exporter.as_model_outputs(tuple(torch.from_numpy(o).to(device) for o in outputs))


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def onnx_accuracy(
    onnx_path: str | Path, model: nn.Module, exporter: OnnxExporter, score: Scorer
) -> dict[str, Any]:
    """The task's metrics of the ONNX file (onnxruntime) next to the PyTorch model's, on the same images (the
    scorer's split: test when the run has one, else val); `difference` is ONNX - PyTorch of
    `exporter.accuracy_metric`."""
    metric = exporter.accuracy_metric
    onnx_metrics = _numbers(score(OnnxRuntimeModel(onnx_path, exporter)))
    # The run's own float32 test pass already scored these weights on these images (`score.reference`)
    reference = getattr(score, "reference", None)
    torch_metrics = _numbers(reference) if reference is not None else _numbers(score(model))
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


# ------------------------------------------------------------------------------------------ one run
def load_student(
    checkpoint: Path, exporter: OnnxExporter
) -> tuple[nn.Module, ExperimentConfig, dict[str, Any]]:
    """The student described by the config saved in `checkpoint`, weights loaded strictly, on CPU, in eval."""
    model, cfg, payload = model_from_checkpoint(checkpoint, "checkpoint", exporter.build_model)
    model.eval()
    return model, cfg, payload


def _jsonable(value: Any) -> Any:
    """Plain JSON: tensors and numpy scalars to numbers, non-finite floats to None."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


INT8_FILE = "best_model.int8.onnx"  # an INT8 model that lost too much accuracy is kept aside under this name
FP32_FILE = "best_model.fp32.onnx"  # the FP32 model, when an accepted INT8 model became best_model.onnx


def _exporter_tool(method: str) -> str:
    if method == "dynamo":
        import onnxscript

        return f"torch.onnx.export(dynamo=True), onnxscript {onnxscript.__version__}"
    return "torch.onnx.export(dynamo=False, TorchScript tracer)"


def _remove_stale(paths: list[Path]) -> None:
    """Files an earlier export wrote that this one does not (the new metadata would not describe them)."""
    for path in paths:
        if path.is_file():
            log.info("removing %s from an earlier export", path.name)
            path.unlink()


def export_run_to_onnx(
    run_dir: str | Path,
    exporter: OnnxExporter | None,
    opset: int | None = None,
    parity_images: int = 4,
    latency_runs: int = DEFAULT_LATENCY_RUNS,
    tolerance: float = DEFAULT_TOLERANCE,
    score: Scorer | None = None,
    export_cfg: ExportConfig | None = None,
    calibration: Callable[[ExperimentConfig, int], list[Batch]] | None = None,
) -> dict[str, Any]:
    """Export <run_dir>/checkpoints/best_model.pth -> best_model.onnx + best_model.onnx.json; returns the metadata.

    `exporter` is the run's task's (`kdlab.tasks.<task>.exporter()`); None means the task has none, a
    ConfigError. `export_cfg` (default: the checkpoint's config's `export` section) picks the exporter
    ("auto": dynamo, TorchScript when dynamo raises or misses parity) and INT8. Parity is measured on the
    first `parity_images` validation images of the run's own data (at least `exporter.min_parity_images`);
    when it fails, the metadata (with parity.ok = false) is still written, then ExportParityError is raised.
    `score` (the task's evaluator on the validation set, see `kdlab.experiments.export_runs`) scores the
    ONNX file next to the PyTorch model; without it no accuracy is recorded and INT8 is refused.
    `calibration(cfg, n)` gives INT8's calibration batches (default: `kdlab.export.quantize`'s).
    `latency_runs` timed runs follow WARMUP_RUNS untimed ones.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    checkpoint = run_dir / "checkpoints" / "best_model.pth"
    if not checkpoint.is_file():
        raise CheckpointError(f"run directory {run_dir} has no checkpoints/best_model.pth (train it first)")
    if exporter is None:
        task = (load_checkpoint(checkpoint).get("config") or {}).get("task")
        raise ConfigError(f"ONNX export is not implemented for task={task} ({run_dir})")
    model, cfg, payload = load_student(checkpoint, exporter)
    export_cfg = cfg.export if export_cfg is None else export_cfg
    opset = export_cfg.opset if opset is None else opset
    methods = export_methods(export_cfg.exporter)
    if export_cfg.quantize == "int8" and score is None:
        raise ConfigError("export.quantize=int8 needs the validation scorer (kdlab.experiments.export_runs)")
    # Load the parity data before writing anything: a missing dataset fails without touching the run.
    batches = exporter.validation_batches(cfg, max(1, parity_images, exporter.min_parity_images))
    if not batches:
        raise CheckpointError(f"run {run_dir} has no validation images to check the ONNX export against")

    onnx_path = checkpoint.with_suffix(".onnx")
    parities: dict[str, dict[str, Any]] = {}

    def parity_reason(method: str) -> str | None:
        parities[method] = onnx_parity_of(onnx_path, model, exporter, batches, tolerance)
        worst = parities[method]["max_abs_diff"]
        return (
            None if parities[method]["ok"] else f"parity max abs diff {worst:.3g} > tolerance {tolerance:.3g}"
        )

    method, failures = export_with_fallback(
        model, exporter, onnx_path, exporter.example_inputs(cfg), opset, config_metadata(cfg), methods,
        accept=parity_reason,
    )  # fmt: skip
    parity = parities[method]
    _remove_stale(
        [onnx_path.with_name(INT8_FILE), onnx_path.with_name(FP32_FILE)]
    )  # only once a new file exists
    log.info(
        "ONNX parity on %s: max abs diff %.3g (tolerance %.3g)", exporter.parity_scope(parity), parity["max_abs_diff"],
        tolerance,
    )  # fmt: skip
    latency_batch = exporter.latency_batch(batches)
    onnx_ms = onnx_latency_of(onnx_path, exporter, latency_batch, latency_runs)
    torch_ms = torch_latency_of(model, exporter, latency_batch, latency_runs)
    log.info("CPU latency per image: onnxruntime %.2f ms, PyTorch %.2f ms", onnx_ms, torch_ms)
    accuracy = None
    if score is not None and parity["ok"]:
        accuracy = onnx_accuracy(onnx_path, model, exporter, score)
        log.info(
            "ONNX %s on %d %s images: %.4f (PyTorch %.4f)", accuracy["metric"], accuracy["images"], accuracy["data"],
            accuracy["onnx"].get(accuracy["metric"], math.nan), accuracy["pytorch"].get(accuracy["metric"], math.nan),
        )  # fmt: skip

    metadata = {
        "onnx_file": onnx_path.name,
        "precision": "fp32",
        **exporter.describe(cfg),
        "input_size": list(exporter.input_size(cfg)),
        "normalization": {
            "mean": list(cfg.model.input_mean),
            "std": list(cfg.model.input_std),
            "applied_inside_model": True,
            "input_range": [0.0, 1.0],
        },
        "opset": file_opset(onnx_path),
        "opset_requested": opset,
        "experiment": cfg.name,
        "parity": {**parity, "data": "validation"},
        "parity_ok": parity["ok"],
        "accuracy": accuracy,
        "latency": {
            "onnx_ms_per_image_median": onnx_ms,
            "torch_ms_per_image_median": torch_ms,
            "runs": latency_runs,
            "warmup_runs": WARMUP_RUNS,
            **{f"batch_{key}": n for key, n in exporter.counts(latency_batch).items()},
            "device": "cpu",
            "torch_threads": torch.get_num_threads(),
        },
        "onnx_mb": onnx_path.stat().st_size / 1e6,
        "source_checkpoint": str(checkpoint),
        "source_checkpoint_sha256": file_sha256(checkpoint),
        "checkpoint_metrics": payload.get("metrics"),
        "exporter": method,
        "exporter_requested": export_cfg.exporter,
        "exporter_tool": _exporter_tool(method),
        "exporter_fallbacks": failures,
        "onnx_checker": "onnx.checker.check_model(full_check=True) passed",
        "versions": {
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
        },
    }
    json_path = onnx_path.with_name(onnx_path.name + ".json")
    if not parity["ok"]:
        write_json_atomic(json_path, _jsonable(metadata))
        raise ExportParityError(
            f"ONNX export {onnx_path} does not match PyTorch: max abs diff {parity['max_abs_diff']:.3g} > "
            f"tolerance {tolerance:.3g} on {exporter.parity_scope(parity)} "
            f"(do not use this file; details in {onnx_path.name}.json)"
        )
    if export_cfg.quantize == "int8":
        assert score is not None and accuracy is not None
        metadata["int8"] = _int8_step(
            onnx_path,
            model,
            cfg,
            export_cfg,
            exporter,
            score,
            accuracy,
            latency_batch,
            latency_runs,
            calibration,
        )
        if metadata["int8"]["accepted"]:
            metadata["precision"] = "int8"
            metadata["fp32_file"] = FP32_FILE
    metadata = _jsonable(metadata)
    write_json_atomic(json_path, metadata)
    return metadata


def _copy_metadata_props(source: Path, target: Path) -> None:
    """Give `target` the metadata_props of `source` it lacks (the resolved config: kdlab-predict and the
    teacher cache read it from the file itself)."""
    src, dst = onnx.load(str(source)), onnx.load(str(target))
    have = {p.key for p in dst.metadata_props}
    missing = [p for p in src.metadata_props if p.key not in have]
    if not missing:
        return
    for prop in missing:
        entry = dst.metadata_props.add()
        entry.key, entry.value = prop.key, prop.value
    atomic_write(target, lambda tmp: onnx.save(dst, str(tmp)))


def _int8_step(
    onnx_path: Path,
    model: nn.Module,
    cfg: ExperimentConfig,
    export_cfg: ExportConfig,
    exporter: OnnxExporter,
    score: Scorer,
    accuracy: dict[str, Any],
    latency_batch: Batch,
    latency_runs: int,
    calibration: Callable[[ExperimentConfig, int], list[Batch]] | None,
) -> dict[str, Any]:
    """Quantize the FP32 file, score and time it; ship it as best_model.onnx only when it loses at most
    `export.max_int8_iou_drop` of the accuracy metric (the FP32 file then moves to best_model.fp32.onnx);
    otherwise it stays aside as best_model.int8.onnx with a warning and best_model.onnx stays FP32."""
    from kdlab.export import quantize

    calibrate = calibration or (lambda c, n: quantize.calibration_batches(c, exporter, n))
    int8_path = onnx_path.with_name(INT8_FILE)
    calib = calibrate(cfg, export_cfg.calibration_images)
    info = quantize.quantize_int8(onnx_path, int8_path, calib, exporter)
    _copy_metadata_props(onnx_path, int8_path)
    metric = accuracy["metric"]
    int8_metrics = _numbers(score(OnnxRuntimeModel(int8_path, exporter)))
    ms = interleaved_onnx_latency(
        {"fp32": onnx_path, "int8": int8_path}, exporter, latency_batch, latency_runs
    )
    fp32_value, int8_value = accuracy["onnx"].get(metric), int8_metrics.get(metric)
    drop = fp32_value - int8_value if fp32_value is not None and int8_value is not None else math.inf
    if not math.isfinite(drop):
        drop = math.inf  # NaN metrics (nothing scored) never pass
    accepted = drop <= export_cfg.max_int8_iou_drop
    result: dict[str, Any] = {
        **info,
        "calibration_images_requested": export_cfg.calibration_images,
        "metric": metric,
        "onnx": int8_metrics,
        "fp32_value": fp32_value,
        "int8_value": int8_value,
        "drop": drop,
        "max_drop": export_cfg.max_int8_iou_drop,
        "accepted": accepted,
        "latency": {
            "fp32_ms_per_image_median": ms["fp32"],
            "int8_ms_per_image_median": ms["int8"],
            "int8_over_fp32": ms["int8"] / ms["fp32"] if ms["fp32"] > 0 else None,
            "runs": latency_runs,
            "interleaved": True,
        },
    }
    if accepted:
        onnx_path.replace(onnx_path.with_name(FP32_FILE))
        int8_path.replace(onnx_path)
        result["file"] = onnx_path.name
        log.info(
            "INT8 %s %.4f vs FP32 %.4f (drop %.4f <= %.4f): best_model.onnx is INT8, FP32 kept as %s",
            metric, int8_value, fp32_value, drop, export_cfg.max_int8_iou_drop, FP32_FILE,
        )  # fmt: skip
    else:
        result["file"] = INT8_FILE
        result["warning"] = (
            f"INT8 loses {drop:.4f} {metric} (> export.max_int8_iou_drop={export_cfg.max_int8_iou_drop}); "
            f"kept aside as {INT8_FILE}, best_model.onnx stays FP32"
        )
        log.warning("%s", result["warning"])
    return result
