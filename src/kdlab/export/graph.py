"""Graph export: a model -> a checked ONNX file, with torch's dynamo exporter or the TorchScript fallback.

Two exporters (`export.exporter`): "dynamo" (`torch.export` + onnxscript, the supported one since torch 2.9,
opset >= 18) and "torchscript" (the deprecated tracer, kept as a recorded fallback); "auto" tries dynamo and
falls back to TorchScript when dynamo raises or misses parity (`export_with_fallback`). Two traps of the
TorchScript exporter (the copy below makes them harmless for both):
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
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from kdlab.atomic_io import atomic_write
from kdlab.config.schema import ExperimentConfig
from kdlab.data.teacher_cache import ONNX_CONFIG_METADATA_KEY
from kdlab.errors import ConfigError
from kdlab.export.interface import Batch, OnnxExporter, as_tuple

log = logging.getLogger(__name__)

CONFIG_METADATA_KEY = ONNX_CONFIG_METADATA_KEY  # the resolved experiment config (JSON) in metadata_props
EXPORT_METHODS = ("dynamo", "torchscript")
# What export.exporter="auto" tries, in order. tests/conftest.py narrows it to TorchScript (2 s instead of ~25 s
# per export on CPU) for the tests that only need some ONNX file; the dynamo tests ask for "dynamo" by name.
AUTO_ORDER: tuple[str, ...] = EXPORT_METHODS
DYNAMO_MIN_OPSET = 18  # the dynamo exporter's lowest opset: it would convert down, or fail to, noisily


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


def exporter_tool(method: str) -> str:
    """How the file was written, for the metadata (with the onnxscript version for dynamo)."""
    if method == "dynamo":
        import onnxscript

        return f"torch.onnx.export(dynamo=True), onnxscript {onnxscript.__version__}"
    return "torch.onnx.export(dynamo=False, TorchScript tracer)"
