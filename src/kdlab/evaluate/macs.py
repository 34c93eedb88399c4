"""Multiply-accumulates (MACs) of one forward pass, per task: the segmentation UNet + ROI head and timm
classifiers are counted with torch's FlopCounterMode (MACs = FLOPs / 2), the GRU sequence model by hand.

`*_config_macs(config)` read the architecture from a run's config.json (a dict) and return the count for the
report, or None when the config does not say enough; they raise on a config they cannot build.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kdlab.config.schema import ModelConfig
from kdlab.models.builders import build_classifier, build_model

log = logging.getLogger(__name__)

MacsCounter = Callable[[dict[str, Any]], int | None]
"""MACs of one forward pass of the model a run's config.json describes (None: not countable)."""

_MACS_CACHE: dict[tuple[str, tuple[int, int], int], int] = {}


def compute_macs(model_cfg: ModelConfig, input_size: tuple[int, int], rois_per_image: int = 1) -> int:
    """Multiply-accumulates of one forward pass for ONE image of `input_size` (H, W) with `rois_per_image` ROIs.

    Counted with torch's FlopCounterMode (MACs = FLOPs / 2; convolutions and matmuls, not RoIAlign or
    element-wise ops) under no_grad on the model built on CPU with random weights. The forward runs on
    the meta device (shapes only, the same count, ~10x faster than a CPU forward of a fresh model), with
    a CPU forward as the fallback. Cached in-process by the architecture (every model setting except
    encoder_weights), the input size and the ROI count.
    """
    if rois_per_image < 1:
        raise ValueError(f"rois_per_image must be >= 1, got {rois_per_image}")
    height, width = int(input_size[0]), int(input_size[1])
    arch = model_cfg.model_copy(update={"encoder_weights": None})
    key = (arch.model_dump_json(), (height, width), rois_per_image)
    if key in _MACS_CACHE:
        return _MACS_CACHE[key]
    model = build_model(arch).eval()
    try:
        flops = _count_flops(model, height, width, rois_per_image, torch.device("meta"))
    except (NotImplementedError, RuntimeError) as exc:  # an op without a meta kernel
        log.debug("MACs: meta-device forward failed (%s); counting with a CPU forward", exc)
        model = build_model(arch).eval()
        flops = _count_flops(model, height, width, rois_per_image, torch.device("cpu"))
    macs = flops // 2
    _MACS_CACHE[key] = macs
    log.debug("MACs of %s at %dx%d with %d ROI(s): %d", arch.encoder, height, width, rois_per_image, macs)
    return macs


def compute_classifier_macs(model_cfg: ModelConfig, image_size: int) -> int:
    """Multiply-accumulates of one forward pass of a timm classifier on ONE image_size x image_size image
    (FlopCounterMode on a CPU forward with random weights, MACs = FLOPs / 2); cached like `compute_macs`."""
    arch = model_cfg.model_copy(update={"weights": None, "encoder_weights": None})
    key = ("classifier:" + arch.model_dump_json(), (image_size, image_size), 0)
    if key not in _MACS_CACHE:
        model = build_classifier(arch).eval()
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(torch.rand(1, 3, image_size, image_size))
        _MACS_CACHE[key] = int(counter.get_total_flops()) // 2
    return _MACS_CACHE[key]


def compute_gru_macs(
    hidden_size: int, num_layers: int, input_dim: int, num_classes: int, seq_len: int
) -> int:
    """Multiply-accumulates of one GRU sequence model forward on ONE sequence of `seq_len` steps, counted by
    hand (FlopCounterMode does not see inside nn.GRU): per step and layer the three gates' input and
    recurrent matmuls, 3·H·(D_l + H) with D_l = input_dim for layer 0 else H; plus the readout of the
    T+1 states, (T+1)·H·C. Element-wise gate maths is not counted (as for convolutions elsewhere)."""
    h = hidden_size
    per_step = sum(3 * h * ((input_dim if layer == 0 else h) + h) for layer in range(num_layers))
    return per_step * seq_len + (seq_len + 1) * h * num_classes


def _count_flops(model: nn.Module, height: int, width: int, rois_per_image: int, device: torch.device) -> int:
    """FLOPs of model(image [1,3,H,W], rois [R,5]) on `device` (the model is moved there)."""
    model = model.to(device)
    images = torch.rand(1, 3, height, width, device=device)
    # ROIs over the central half of the image; the head's cost does not depend on where they lie.
    box = torch.tensor([0.0, width / 4, height / 4, 3 * width / 4, 3 * height / 4], device=device)
    rois = box.repeat(rois_per_image, 1)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(images, rois)
    return int(counter.get_total_flops())


def clear_macs_cache() -> None:
    """Forget every cached MAC count (tests; a long-lived process comparing many architectures)."""
    _MACS_CACHE.clear()


# ------------------------------------------------------------------------------- from a run's config.json
def segmentation_config_macs(config: dict[str, Any]) -> int | None:
    """One image at data.input_size with one ROI; None without a model section or a 2-sided input size."""
    model, data = config.get("model"), config.get("data")
    input_size = data.get("input_size") if isinstance(data, dict) else None
    if not isinstance(model, dict) or not isinstance(input_size, list | tuple) or len(input_size) != 2:
        return None
    return compute_macs(ModelConfig.model_validate(model), (int(input_size[0]), int(input_size[1])))


def classifier_config_macs(config: dict[str, Any]) -> int:
    """One image at data.classification.image_size."""
    size = config["data"]["classification"]["image_size"]
    return compute_classifier_macs(ModelConfig.model_validate(config["model"]), int(size))


def sequence_config_macs(config: dict[str, Any]) -> int:
    """One sequence of data.sequence.seq_len steps."""
    model, seq = config["model"], config["data"]["sequence"]
    return compute_gru_macs(int(model["hidden_size"]), int(model["num_layers"]), int(seq["input_dim"]),
                            int(model["num_classes"]), int(seq["seq_len"]))  # fmt: skip
