"""Image classifier: a timm model by name behind the same input contract as the segmentation model.

`TimmClassifier` takes images in [0,1] and normalises them inside with its own `input_mean`/`input_std`
(non-persistent buffers set from the config), so a teacher trained with another normalisation can be fed
the same batch: only its buffers differ (`distillation.teacher_input_mean/std`). Timm models are always
built with `pretrained=False`; `model.weights` may name a local weights file, never a download.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from kdlab.config.schema import ModelConfig
from kdlab.errors import CheckpointError

log = logging.getLogger(__name__)


def normalise_images(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """`(images - mean) / std` per channel; images [B,3,H,W] in [0,1], mean/std broadcastable [1,3,1,1]."""
    return (images - mean) / std


class TimmClassifier(nn.Module):
    """`timm.create_model(name)` with in-model input normalisation; forward(images [B,3,H,W] in [0,1]) -> logits [B,C].

    The timm network is the submodule `net`, so feature-tap paths read e.g. 'net.layer4' (resnet) or
    'net.blocks.5' (efficientnet / mobilenetv3).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        import timm

        self.name = cfg.name
        self.num_classes = cfg.num_classes
        self.net = timm.create_model(
            cfg.name, pretrained=False, num_classes=cfg.num_classes, in_chans=3, drop_rate=cfg.drop_rate
        )
        self.register_buffer("input_mean", torch.tensor(cfg.input_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(cfg.input_std).view(1, 3, 1, 1), persistent=False)
        if cfg.weights:
            load_local_timm_weights(self.net, cfg.weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(normalise_images(images, self.input_mean, self.input_std))


def load_local_timm_weights(net: nn.Module, path: str | Path) -> None:
    """Load a local timm state dict (.pth/.bin via weights_only torch.load, or .safetensors) into `net`.

    The classifier head is skipped when its shape differs (ImageNet weights, another class count); any
    other missing, unexpected or mismatched key is a CheckpointError.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model.weights file {path} does not exist (weights are never downloaded)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"model.weights file {path} cannot be loaded: {type(exc).__name__}: {exc}"
        ) from exc
    if isinstance(state, dict) and "model_state_dict" in state:
        state = state["model_state_dict"]
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"model.weights file {path} does not hold a state dict")
    own = net.state_dict()
    head = getattr(net, "default_cfg", {}).get("classifier", "")
    heads = (head,) if isinstance(head, str) else tuple(head)
    skipped = [
        k
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape) and any(h and k.startswith(h) for h in heads)
    ]
    state = {k: v for k, v in state.items() if k not in skipped}
    missing = [k for k in own if k not in state and k not in skipped]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if unexpected or mismatched or [k for k in missing if not any(h and k.startswith(h) for h in heads)]:
        shown = "; ".join(
            [f"missing {k}" for k in missing][:4]
            + [f"unexpected {k}" for k in unexpected][:4]
            + [f"shape {k}" for k in mismatched][:4]
        )
        raise CheckpointError(f"model.weights file {path} does not fit {type(net).__name__}: {shown}")
    net.load_state_dict(state, strict=False)
    if skipped or missing:
        log.info(
            "model.weights %s: classifier head left at random init (%s)", path, ", ".join(skipped or missing)
        )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
