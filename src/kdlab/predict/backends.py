"""The people model behind `kdlab-predict`: a kdlab ONNX export (onnxruntime, CPU) or a .pth checkpoint.

Both become an `nn.Module` with the trainer's calling convention, `module(images, rois) -> {"logits": ...}`
(images float [B,3,H,W] in [0,1], rois [N,5] in input pixels, logits = log-probabilities [N,3,h,w]), so the
prediction pass and the trainer's own evaluator run either one unchanged. The experiment config comes from
the file itself: the ONNX metadata_props or the checkpoint payload.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn

from kdlab.checkpoints import load_checkpoint
from kdlab.config.schema import ExperimentConfig
from kdlab.errors import CheckpointError
from kdlab.export.graph import CONFIG_METADATA_KEY
from kdlab.export.runtime import ort_session
from kdlab.export.segmentation import INPUT_NAMES
from kdlab.tasks import model_from_checkpoint, task_of
from kdlab.tasks.segmentation import Segmentation

MODEL_SUFFIXES = (".onnx", ".pth", ".pt")
HINT = "give --model a run's checkpoints/best_model.onnx or checkpoints/best_model.pth"


@dataclass
class PeopleModel:
    """A loaded people-segmentation model: where it came from, its resolved config, how to run it."""

    path: Path
    kind: str  # "onnx" | "pth"
    config: ExperimentConfig
    module: nn.Module
    device: torch.device

    @property
    def input_size(self) -> tuple[int, int]:
        return int(self.config.data.input_size[0]), int(self.config.data.input_size[1])

    @property
    def roi_margin(self) -> float:
        return float(self.config.model.roi_margin)


class OnnxPeopleModule(nn.Module):
    """An onnxruntime session behind the model's forward: numpy in, `{"logits": masks}` out (CPU tensors)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.session = ort_session(path)

    def forward(self, images: torch.Tensor, rois: torch.Tensor) -> dict[str, torch.Tensor]:
        feed = {
            "images": np.ascontiguousarray(images.detach().float().cpu().numpy()),
            "rois": np.ascontiguousarray(rois.detach().float().cpu().numpy()),
        }
        (masks,) = self.session.run(["masks"], feed)
        return {"logits": torch.from_numpy(masks)}


def _validated_config(raw: Any, where: str) -> ExperimentConfig:
    if not isinstance(raw, dict):
        raise CheckpointError(
            f"{where} holds no kdlab experiment config, so its preprocessing is unknown; {HINT}"
        )
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise CheckpointError(f"{where} holds an invalid config: {exc.errors()[0]['msg']}") from exc


def require_segmentation(config: ExperimentConfig | dict[str, Any], where: str) -> None:
    """Prediction draws people masks: a model of another task (a classifier, a sequence model) is refused."""
    task = task_of(config)
    if not isinstance(task, Segmentation):
        raise CheckpointError(
            f"{where} is a {task.name} model; kdlab-predict runs people-segmentation models only "
            "(a best_model.onnx/.pth of a segmentation run)"
        )


def _onnx_config(path: Path) -> ExperimentConfig:
    """The resolved config stored in a kdlab export's metadata_props, after checking the graph's contract."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise CheckpointError(
            f"model {path} is not a readable ONNX file ({type(exc).__name__}); {HINT}"
        ) from exc
    meta = {p.key: p.value for p in proto.metadata_props}
    if CONFIG_METADATA_KEY not in meta:
        raise CheckpointError(
            f"model {path} has no kdlab config in its metadata (key {CONFIG_METADATA_KEY!r}); export it with "
            "kdlab (run_experiments.py --export_onnx) or pass its best_model.pth"
        )
    try:
        raw = json.loads(meta[CONFIG_METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"model {path}: its metadata config is not valid JSON ({exc})") from exc
    require_segmentation(raw if isinstance(raw, dict) else {}, f"model {path}")
    config = _validated_config(raw, f"model {path}")
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    if inputs != INPUT_NAMES or "masks" not in outputs:
        raise CheckpointError(
            f"model {path} is not a kdlab people-segmentation export (inputs {inputs}, outputs {outputs}; "
            f"expected inputs {INPUT_NAMES} and an output 'masks')"
        )
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    if len(dims) == 4 and dims[2] and dims[3] and (dims[2], dims[3]) != tuple(config.data.input_size):
        raise CheckpointError(
            f"model {path} takes {dims[2]}x{dims[3]} images but its config says data.input_size="
            f"{list(config.data.input_size)}; re-export it"
        )
    return config


def check_model_file(path: Path) -> None:
    """A missing file or one that is neither .onnx nor .pth fails before anything is loaded."""
    if not path.is_file():
        raise CheckpointError(f"model file {path} does not exist; {HINT}")
    if path.suffix.lower() not in MODEL_SUFFIXES:
        raise CheckpointError(f"model file {path} is neither .onnx nor .pth; {HINT}")


def load_people_model(path: str | Path, device: torch.device) -> PeopleModel:
    """Load `path` (.onnx -> onnxruntime on CPU; .pth -> the checkpoint's own architecture on `device`)."""
    path = Path(path)
    check_model_file(path)
    if path.suffix.lower() == ".onnx":
        config = _onnx_config(path)
        return PeopleModel(path, "onnx", config, OnnxPeopleModule(path).eval(), torch.device("cpu"))
    raw = load_checkpoint(path).get("config")
    require_segmentation(raw if isinstance(raw, dict) else {}, f"checkpoint {path}")
    _validated_config(raw, f"checkpoint {path}")
    model, config, _ = model_from_checkpoint(path, "checkpoint")
    return PeopleModel(path, "pth", config, model.to(device).eval(), device)
