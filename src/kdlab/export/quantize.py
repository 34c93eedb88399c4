"""INT8 static quantization of an exported FP32 ONNX graph with onnxruntime (QDQ format, per-channel weights).

The FP32 file is pre-processed (shape inference + graph optimisation) into a temp file, calibrated on the
first training images of the run (deterministic: the validation-style transform, no augmentation) and
written as QuantizeLinear/DequantizeLinear pairs around the ops that are worth running in int8. onnxruntime's
CPU provider fuses every `DequantizeLinear -> op -> QuantizeLinear` group into an integer kernel; an op with a
float input or output outside such a group runs in float.

What stays float is decided by op type and by graph pattern, never by node name, so the same rule works on
the TorchScript and the dynamo exporter's graphs (`DEFAULT_KEEP_FLOAT`, measured in docs/onnx.md "INT8").
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from kdlab.atomic_io import atomic_write
from kdlab.config.schema import ExperimentConfig
from kdlab.errors import CheckpointError, ConfigError
from kdlab.export.interface import Batch, OnnxExporter
from kdlab.export.runtime import ort_feed

log = logging.getLogger(__name__)

# A graph pattern rather than an op type: the squeeze-excitation block of every EfficientNet stage,
# spatial mean -> Conv -> activation -> Conv -> Sigmoid -> Mul (the gate).
SQUEEZE_EXCITATION = "squeeze_excitation"

# Ops the quantizer may wrap in Q/DQ; everything else is float by construction. These are the ones whose
# int8 kernels onnxruntime's CPU provider has (QLinearConv, QGemm, QLinearAdd, QLinearConcat, ...) or that
# only move data (int8 in, int8 out, no arithmetic).
QUANTIZABLE_OPS = (
    "Conv", "Gemm", "MatMul", "Add", "Mul", "Concat", "Resize", "Relu", "Clip", "Sigmoid", "Softmax",
    "AveragePool", "GlobalAveragePool", "MaxPool", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice",
    "Split", "Gather", "Flatten", "Pad", "Where",
)  # fmt: skip

_NO_GAIN = "no speed gain measured from int8 here (docs/onnx.md INT8), so one rounding step fewer"
# Measured on the quickstart student and the seed student's sizes (docs/onnx.md "INT8"): quantizing also
# SiLU/Add/Concat was no faster than Conv/Gemm alone (within run-to-run noise) and neither lost IoU.
DEFAULT_KEEP_FLOAT: dict[str, str] = {
    "RoiAlign": "onnxruntime has no int8 RoiAlign kernel; the crops are float (and carry the box geometry)",
    "Softmax": "by design (not measured quantized): p(fg) gates the target branch, and 2 channels cost "
    "nothing in float",
    "LogSoftmax": "by design (not measured quantized): the output log-probabilities of small probabilities "
    "do not fit 8-bit steps",
    "Sigmoid": "SiLU and the squeeze-excitation gate; " + _NO_GAIN,
    "Mul": "SiLU, the squeeze-excitation gate and the fg gate of the head; " + _NO_GAIN,
    "Add": "residuals and the head's context add; " + _NO_GAIN + " (onnxruntime still fuses a residual Add "
    "whose inputs and output are all quantized for the neighbouring convs)",
    "Concat": "UNet skip joins; " + _NO_GAIN,
    "Resize": "UNet upsampling; " + _NO_GAIN,
}

# Always float whatever `keep_float` says: onnxruntime 1.32's fused int8 Add crashes (segfault) on an empty
# tensor, which every Add of the per-ROI head sees for an image batch without ROIs (N = 0).
PER_ROI_ADD = "per_roi_add"
REQUIRED_FLOAT: dict[str, str] = {
    "RoiAlign": DEFAULT_KEEP_FLOAT["RoiAlign"],
    PER_ROI_ADD: "onnxruntime's int8 Add crashes on an empty tensor: the per-ROI head sees one when N = 0",
}

# Entropy and Percentile are not offered: their histogram collector (onnxruntime 1.32) stacks each tensor's
# values over the calibration feeds with np.asarray and fails when the ROI count differs between feeds.
CALIBRATION_METHODS = {"minmax": CalibrationMethod.MinMax}
ACTIVATION_TYPES = {"qint8": QuantType.QInt8, "quint8": QuantType.QUInt8}
DEFAULT_CALIBRATION = "minmax"
DEFAULT_ACTIVATION_TYPE = "quint8"


# ------------------------------------------------------------------------------------------ calibration
class BatchCalibrationReader(CalibrationDataReader):
    """onnxruntime calibration feeds from loader-style batches: one feed per batch, then None.

    Feeds are built lazily with `ort_feed(exporter, batch)`, so uint8 images are scaled exactly as at
    inference. `rewind()` starts over (onnxruntime's calibrator reads the data once; tests read it twice).
    """

    def __init__(self, batches: list[Batch], exporter: OnnxExporter) -> None:
        self.batches = list(batches)
        self.exporter = exporter
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.batches):
            return None
        batch = self.batches[self._next]
        self._next += 1
        return ort_feed(self.exporter, batch)

    def rewind(self) -> None:
        self._next = 0

    def __len__(self) -> int:
        return len(self.batches)


def calibration_batches(cfg: ExperimentConfig, exporter: OnnxExporter, num_images: int) -> list[Batch]:
    """The first `num_images` TRAINING images of the run's data, without augmentation, as graph batches
    (`exporter.calibration_batches`; a ConfigError for a task without INT8 calibration).

    Training images, not validation ones: the INT8 model is scored on the validation set afterwards, and
    calibrating on it would let the quantization ranges peek at the test data.
    """
    if num_images <= 0:
        raise ConfigError(f"config value export.calibration_images={num_images} must be > 0")
    return exporter.calibration_batches(cfg, num_images)


# --------------------------------------------------------------------------------------- graph patterns
def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {name: node for node in graph.node for name in node.output}


_SE_INNER_OPS = {"Conv", "Sigmoid", "Mul", "Relu", "Clip", "HardSigmoid", "HardSwish"}
_SPATIAL_POOLS = {"ReduceMean", "GlobalAveragePool"}


def squeeze_excitation_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes of every squeeze-excitation block: a spatial pool whose result goes straight into a Conv, then
    forward through Conv/activation nodes up to and including the gating Mul (the first Mul with an input
    from outside the block). The pool itself is included; anything not ending in a gate is ignored."""
    consumers, producers = _consumers(graph), _producers(graph)
    found: list[onnx.NodeProto] = []
    for pool in graph.node:
        if pool.op_type not in _SPATIAL_POOLS:
            continue
        first = consumers.get(pool.output[0], [])
        if not first or any(n.op_type != "Conv" for n in first):
            continue
        block: dict[int, onnx.NodeProto] = {id(pool): pool}
        frontier, gated = list(first), False
        while frontier and len(block) < 16:
            node = frontier.pop()
            if id(node) in block or node.op_type not in _SE_INNER_OPS:
                continue
            block[id(node)] = node
            inside = [id(producers[i]) in block for i in node.input if i in producers]
            if node.op_type == "Mul" and not all(inside):
                gated = True  # the gate: x * sigmoid(...), x from outside the block
                continue
            frontier.extend(c for o in node.output for c in consumers.get(o, []))
        if gated:
            found.extend(block.values())
    return found


# Inputs that carry data, for ops whose other inputs are shapes, indices or scales (never quantized).
_DATA_INPUTS: dict[str, tuple[int, ...]] = {
    op: (0,)
    for op in ("Resize", "Reshape", "Slice", "Pad", "Squeeze", "Unsqueeze", "Split", "Gather", "Clip")
} | {"Where": (1, 2)}


def per_roi_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Every node downstream of a RoiAlign: the per-ROI head, whose batch dimension is the ROI count N."""
    consumers = _consumers(graph)
    seen: dict[int, onnx.NodeProto] = {}
    frontier = [n for n in graph.node if n.op_type == "RoiAlign"]
    while frontier:
        node = frontier.pop()
        if id(node) in seen:
            continue
        seen[id(node)] = node
        frontier.extend(c for o in node.output for c in consumers.get(o, []))
    return [n for n in graph.node if id(n) in seen]


def _runs_in_int8(node: onnx.NodeProto, producers: Mapping[str, onnx.NodeProto],
                  consumers: Mapping[str, list[onnx.NodeProto]]) -> bool:  # fmt: skip
    """True when `node` sits in a DequantizeLinear -> node -> QuantizeLinear group (what onnxruntime fuses
    into an integer kernel): every non-empty input comes from a DequantizeLinear and every output goes only
    into QuantizeLinear nodes."""
    if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
        return False
    positions = _DATA_INPUTS.get(node.op_type, range(len(node.input)))
    inputs = [node.input[p] for p in positions if p < len(node.input) and node.input[p]]
    if not inputs or any(i not in producers or producers[i].op_type != "DequantizeLinear" for i in inputs):
        return False
    outputs = [consumers.get(o, []) for o in node.output if o]
    return bool(outputs) and all(c and all(n.op_type == "QuantizeLinear" for n in c) for c in outputs)


def int8_node_counts(model: onnx.ModelProto) -> dict[str, int]:
    """How many nodes of each quantizable op type run in int8 (see `_runs_in_int8`); a float-only op that
    merely sits between a DequantizeLinear and a QuantizeLinear (e.g. ReduceMean) is not counted."""
    graph = model.graph
    producers, consumers = _producers(graph), _consumers(graph)
    counts = Counter(
        n.op_type
        for n in graph.node
        if n.op_type in QUANTIZABLE_OPS and _runs_in_int8(n, producers, consumers)
    )
    return dict(sorted(counts.items()))


def float_nodes_of(model: onnx.ModelProto, keep_float: Mapping[str, str]) -> list[onnx.NodeProto]:
    """The nodes left out of quantization: `keep_float`'s op types, its SQUEEZE_EXCITATION pattern when
    listed, and REQUIRED_FLOAT (RoiAlign, the per-ROI head's Adds) always."""
    graph = model.graph
    chosen = [n for n in graph.node if n.op_type in keep_float or n.op_type == "RoiAlign"]
    if SQUEEZE_EXCITATION in keep_float:
        chosen += squeeze_excitation_nodes(graph)
    chosen += [n for n in per_roi_nodes(graph) if n.op_type == "Add"]
    unique = {id(n): n for n in chosen}
    return [n for n in graph.node if id(n) in unique]


# -------------------------------------------------------------------------------------------- quantize
def _check_choices(calibrate_method: str, activation_type: str, keep_float: Mapping[str, str]) -> None:
    if calibrate_method not in CALIBRATION_METHODS:
        raise ConfigError(
            f"INT8 calibrate_method {calibrate_method!r} is not one of {sorted(CALIBRATION_METHODS)}"
        )
    if activation_type not in ACTIVATION_TYPES:
        raise ConfigError(
            f"INT8 activation_type {activation_type!r} is not one of {sorted(ACTIVATION_TYPES)}"
        )
    for key, reason in keep_float.items():
        if not isinstance(reason, str) or not reason:
            raise ConfigError(f"keep_float[{key!r}] needs a reason string (why the op stays float)")


def _named(nodes: Iterable[onnx.NodeProto], prefix: str) -> None:
    """Give unnamed nodes a unique name: `nodes_to_exclude` works by name and exporters may leave them empty."""
    for i, node in enumerate(nodes):
        if not node.name:
            node.name = f"{prefix}{i}_{node.op_type}"


def _pre_process(fp32_path: Path, prepared: Path) -> str:
    """onnxruntime's recommended pre-processing (symbolic + ONNX shape inference, graph optimisation) into
    `prepared`; returns what was run.

    The symbolic shape inferencer cannot follow the TorchScript exporter's Shape->Gather->Concat->Reshape
    chains (an assertion on the reshape's rank), so on failure it is retried with ONNX shape inference only,
    which is all the quantizer needs for the graphs exported here.
    """
    try:
        quant_pre_process(str(fp32_path), str(prepared))
        return "symbolic+onnx shape inference, optimized"
    except Exception as exc:  # noqa: BLE001 - the inferencer raises bare AssertionErrors and more
        log.info(
            "symbolic shape inference failed on %s (%r); retrying with ONNX shape inference", fp32_path, exc
        )
    try:
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        return "onnx shape inference, optimized"
    except Exception as exc:  # noqa: BLE001 - onnx raises many types for a broken file
        raise CheckpointError(f"ONNX file {fp32_path} could not be prepared for quantization: {exc}") from exc


def quantize_int8(
    fp32_path: str | Path,
    out_path: str | Path,
    calibration: list[Batch],
    exporter: OnnxExporter,
    *,
    per_channel: bool = True,
    keep_float: Mapping[str, str] = DEFAULT_KEEP_FLOAT,
    calibrate_method: str = DEFAULT_CALIBRATION,
    activation_type: str = DEFAULT_ACTIVATION_TYPE,
) -> dict[str, Any]:
    """Statically quantize `fp32_path` to `out_path` (QDQ, int8 weights) calibrated on `calibration`.

    `keep_float` maps op types (or SQUEEZE_EXCITATION) to the reason they stay float; their nodes are left
    out of quantization. Dynamic batch/ROI axes are kept. `out_path` appears only when complete (atomic
    write). Returns a JSON-able description of what was done.
    """
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    if not fp32_path.is_file():
        raise CheckpointError(f"FP32 ONNX file {fp32_path} does not exist (export it before quantizing)")
    if not calibration:
        raise ConfigError("INT8 calibration needs at least one batch (export.calibration_images > 0)")
    _check_choices(calibrate_method, activation_type, keep_float)
    num_images = sum(exporter.counts(b)["images"] for b in calibration)

    with tempfile.TemporaryDirectory(prefix="kdlab-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        pre_process = _pre_process(fp32_path, prepared)
        model = onnx.load(str(prepared))
        _named(model.graph.node, "kdlab_node_")
        onnx.save(model, str(prepared))
        excluded = float_nodes_of(model, keep_float)
        op_types = sorted({n.op_type for n in model.graph.node} & (set(QUANTIZABLE_OPS) - set(keep_float)))

        def write(target: Path) -> None:
            quantize_static(
                str(prepared),
                str(target),
                BatchCalibrationReader(calibration, exporter),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=op_types,
                nodes_to_exclude=[n.name for n in excluded],
                per_channel=per_channel,
                activation_type=ACTIVATION_TYPES[activation_type],
                weight_type=QuantType.QInt8,
                calibrate_method=CALIBRATION_METHODS[calibrate_method],
            )
            onnx.checker.check_model(str(target))

        atomic_write(out_path, write)

    quantized = onnx.load(str(out_path))
    info = describe_int8(quantized, keep_float)
    info.update(
        per_channel=per_channel,
        activation_type=activation_type,
        weight_type="qint8",
        calibrate_method=calibrate_method,
        calibration_images=num_images,
        calibration_batches=len(calibration),
        file_mb=out_path.stat().st_size / 1e6,
        fp32_file_mb=fp32_path.stat().st_size / 1e6,
        onnxruntime=ort.__version__,
        onnx_file=out_path.name,
        pre_process=pre_process,
    )
    log.info("INT8 (%s, %s activations) written to %s", calibrate_method, activation_type, out_path)
    return info


def describe_int8(model: onnx.ModelProto, keep_float: Mapping[str, str]) -> dict[str, Any]:
    """What runs in int8 (counts by op type) and what was kept float and why, read off the quantized graph.

    kept_float[op]: `count` nodes of that op type (or pattern), `float` of them outside any int8 group (an
    Add between quantized convs is fused by onnxruntime anyway), and the reason."""
    graph = model.graph
    producers, consumers = _producers(graph), _consumers(graph)
    reasons = {**keep_float, **REQUIRED_FLOAT}
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if node.op_type in reasons:
            groups.setdefault(node.op_type, []).append(node)
    if SQUEEZE_EXCITATION in keep_float:
        # One spatial pool per block; the block's other nodes are counted under their op types.
        groups[SQUEEZE_EXCITATION] = [
            n for n in squeeze_excitation_nodes(graph) if n.op_type in _SPATIAL_POOLS
        ]
    groups[PER_ROI_ADD] = [n for n in per_roi_nodes(graph) if n.op_type == "Add"]
    kept_float = {
        key: {
            "count": len(nodes),
            "float": sum(not _runs_in_int8(n, producers, consumers) for n in nodes),
            "reason": reasons[key],
        }
        for key, nodes in sorted(groups.items())
        if nodes
    }
    return {"format": "QDQ", "quantized_ops": int8_node_counts(model), "kept_float": kept_float}
