"""Running an ONNX file in onnxruntime (CPU): the session, the feeds, and `OnnxRuntimeModel`, a file behind the
model's call signature so the task's own evaluator can score it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from kdlab.export.interface import Batch, OnnxExporter


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
    """onnxruntime's feed for a loader batch: input name -> the graph's float32 input as a host array."""
    inputs = exporter.model_inputs(batch)
    return {
        n: np.ascontiguousarray(x.cpu().numpy()) for n, x in zip(exporter.input_names, inputs, strict=True)
    }


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
