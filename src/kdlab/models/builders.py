"""Build models by config (one builder per task), with readable errors for unknown encoders."""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable

import segmentation_models_pytorch as smp
from torch import nn

from kdlab.config.schema import ExperimentConfig, ModelConfig
from kdlab.errors import ConfigError
from kdlab.models.roi_unet import RoiUNet


def available_encoders() -> list[str]:
    return sorted(smp.encoders.get_encoder_names())


def build_model(cfg: ModelConfig) -> RoiUNet:
    """The people-segmentation model described by `cfg` (random init unless encoder_weights is a local file)."""
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


def build_sequence_model(cfg: ExperimentConfig) -> nn.Module:
    """The GRU of task=sequence; its input size is `data.sequence.input_dim` (checked against the data)."""
    from kdlab.models.sequence import GRUSequenceModel

    return GRUSequenceModel(cfg.model, cfg.data.sequence.input_dim)


# The model of each task, built from the whole experiment config (one entry per `ExperimentConfig.task`).
MODEL_BUILDERS: dict[str, Callable[[ExperimentConfig], nn.Module]] = {
    "segmentation": lambda cfg: build_model(cfg.model),
    "classification": lambda cfg: build_classifier(cfg.model),
    "sequence": build_sequence_model,
}


def build_task_model(cfg: ExperimentConfig, from_checkpoint: bool = False) -> nn.Module:
    """The model `cfg.task` trains; `from_checkpoint` skips local weight files (the checkpoint has them)."""
    if from_checkpoint:
        model_cfg = cfg.model.model_copy(update={"encoder_weights": None, "weights": None})
        cfg = cfg.model_copy(update={"model": model_cfg})
    return MODEL_BUILDERS[cfg.task](cfg)
