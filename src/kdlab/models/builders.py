"""Build the image models by config, with readable errors for unknown encoders (each task picks its builder:
`kdlab.tasks`)."""

from __future__ import annotations

import difflib
import warnings

import segmentation_models_pytorch as smp
from torch import nn

from kdlab.config.schema import ModelConfig
from kdlab.errors import ConfigError
from kdlab.models.roi_unet import RoiUNet


def available_encoders() -> list[str]:
    return sorted(smp.encoders.get_encoder_names())


def build_model(cfg: ModelConfig) -> RoiUNet:
    """The people-segmentation model described by `cfg` (random init unless `encoder_weights` names smp weights
    or a local file: `kdlab.models.encoder_weights`)."""
    encoders = available_encoders()
    if cfg.encoder not in encoders:
        close = difflib.get_close_matches(cfg.encoder, encoders, n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"config value model.encoder='{cfg.encoder}' is not a known smp encoder{hint}")
    with warnings.catch_warnings():
        # smp marks `timm-` encoders deprecated in favour of `tu-`; the project's seed names are `timm-` ones.
        warnings.filterwarnings("ignore", message=".*timm-. encoders are deprecated.*")
        return RoiUNet(cfg)


def build_classifier(cfg: ModelConfig) -> nn.Module:
    """A timm classifier by `cfg.name` (random init unless `cfg.weights` is a local file)."""
    from kdlab.models.classifier import TimmClassifier

    return TimmClassifier(cfg)
