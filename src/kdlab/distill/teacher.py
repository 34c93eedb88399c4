"""Teachers: loaded strictly from their own checkpoint, frozen, always in eval, run under inference_mode.

The student's config names only the checkpoint; the teacher's architecture comes from the config saved
inside it (the caller passes its task's model builder: `kdlab.tasks.load_teacher`), so a B3, B5, any other
encoder or any timm classifier works without code changes. A mismatch between weights and that
architecture is an error listing the offending keys: a teacher must never silently train the student on
noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdlab.checkpoints import ModelBuilder, file_sha256, model_from_checkpoint


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


@dataclass
class LoadedTeacher:
    teacher: FrozenTeacher
    path: str
    sha256: str
    config: dict[str, Any]
    weight: float = 1.0


def load_teacher(
    path: str | Path,
    build: ModelBuilder,
    weight: float = 1.0,
    input_mean: tuple[float, float, float] | None = None,
    input_std: tuple[float, float, float] | None = None,
) -> LoadedTeacher:
    """Build the architecture recorded in the checkpoint with `build` and load its weights strictly."""
    path = Path(path)
    model, _, payload = model_from_checkpoint(path, "teacher checkpoint", build)
    raw_config = payload["config"]
    if input_mean is not None:
        model.input_mean.copy_(torch.tensor(input_mean).view(1, 3, 1, 1))
    if input_std is not None:
        model.input_std.copy_(torch.tensor(input_std).view(1, 3, 1, 1))
    return LoadedTeacher(FrozenTeacher(model), str(path), file_sha256(path), raw_config, weight)
