"""Teachers: loaded strictly from their own checkpoint, frozen, always in eval, run under inference_mode.

The student's config names only the checkpoint; the teacher's architecture comes from the config saved
inside it (its `task` picks the builder), so a B3, B5, any other encoder or any timm classifier works
without code changes. A mismatch between weights and
that architecture is an error listing the offending keys: a teacher must never silently train the
student on noise.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from kdlab.config.schema import ExperimentConfig
from kdlab.engine.checkpoint import load_checkpoint  # a leaf module: file I/O only
from kdlab.errors import CheckpointError
from kdlab.models.builders import build_task_model

MAX_KEYS_SHOWN = 10


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def strict_load(model: nn.Module, state: dict[str, Any], source: str) -> None:
    """load_state_dict(strict) with one readable error: up to 10 missing/unexpected/shape-mismatched keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        listed = (
            [f"missing {k}" for k in missing]
            + [f"unexpected {k}" for k in unexpected]
            + [f"shape {k}" for k in mismatched]
        )
        shown = "; ".join(listed[:MAX_KEYS_SHOWN])
        more = f"; and {len(listed) - MAX_KEYS_SHOWN} more" if len(listed) > MAX_KEYS_SHOWN else ""
        raise CheckpointError(
            f"{source} does not match its architecture ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(mismatched)} shape-mismatched keys): {shown}{more}"
        )
    model.load_state_dict(state, strict=True)


class FrozenTeacher(nn.Module):
    """Wraps a teacher model: no gradients, eval mode whatever `.train()` is asked, inference_mode forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True) -> FrozenTeacher:  # noqa: ARG002 - a teacher never trains
        return super().train(False)

    def forward(self, *inputs: torch.Tensor) -> Any:
        """The wrapped model's output for `(images, rois)` (segmentation) or `(images,)` (classification)."""
        with torch.inference_mode():
            return self.model(*inputs)


def model_from_checkpoint(path: str | Path, label: str) -> tuple[nn.Module, ExperimentConfig, dict[str, Any]]:
    """Rebuild the architecture recorded in a checkpoint's config and load its weights strictly."""
    payload = load_checkpoint(path)
    raw_config = payload.get("config")
    if not isinstance(raw_config, dict):
        raise CheckpointError(f"{label} {path} holds no config, so its architecture is unknown")
    try:
        config = ExperimentConfig.model_validate(raw_config)
    except ValidationError as exc:
        raise CheckpointError(f"{label} {path} holds an invalid config: {exc.errors()[0]['msg']}") from exc
    # The weights come from the checkpoint; a local encoder-weights file need not exist any more. The
    # architecture follows the checkpoint's own task (a segmentation UNet or a timm classifier).
    model = build_task_model(config, from_checkpoint=True)
    strict_load(model, payload["model_state_dict"], f"{label} {path}")
    return model, config, payload


@dataclass
class LoadedTeacher:
    teacher: FrozenTeacher
    path: str
    sha256: str
    config: dict[str, Any]
    weight: float = 1.0


def load_teacher(
    path: str | Path,
    weight: float = 1.0,
    input_mean: tuple[float, float, float] | None = None,
    input_std: tuple[float, float, float] | None = None,
) -> LoadedTeacher:
    """Build the architecture recorded in the checkpoint and load its weights strictly."""
    path = Path(path)
    model, _, payload = model_from_checkpoint(path, "teacher checkpoint")
    raw_config = payload["config"]
    if input_mean is not None:
        model.input_mean.copy_(torch.tensor(input_mean).view(1, 3, 1, 1))
    if input_std is not None:
        model.input_std.copy_(torch.tensor(input_std).view(1, 3, 1, 1))
    return LoadedTeacher(FrozenTeacher(model), str(path), file_sha256(path), raw_config, weight)
