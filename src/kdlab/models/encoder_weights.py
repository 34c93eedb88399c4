"""Where a segmentation encoder's starting weights come from (`model.encoder_weights`).

Three routes, told apart by the value:
- a weights name smp knows for the encoder (`imagenet`, `advprop`, ...): smp fetches it itself, from the Hugging
  Face Hub into its usual cache (~/.cache/huggingface/hub), so a box that reaches the internet downloads once;
- a local file: a bare encoder state dict, a whole smp `Unet` / RoiUNet, a kdlab checkpoint, or a file that
  `kdlab-weights import` wrote (`{"state_dict": ..., "source": {...}}`), loaded strictly;
- null: random init.
`resolve_encoder_weights` checks the value before a run writes anything (offline, a one-line error naming the
local-file routes) and returns where the weights came from, which the run records in its config.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import TypeVar

import segmentation_models_pytorch as smp
from torch import nn

from kdlab.config.schema import ModelConfig
from kdlab.errors import CheckpointError, ConfigError
from kdlab.file_hash import file_sha256
from kdlab.models.weights_file import encoder_part, load_strictly, read_weights_file

log = logging.getLogger(__name__)
T = TypeVar("T")

# Exceptions of these packages (besides OSError) mean "the download did not work", not a bug in kdlab.
_DOWNLOAD_ERROR_MODULES = frozenset({"huggingface_hub", "httpx", "httpx2", "requests", "urllib3", "urllib"})


# ------------------------------------------------------------------------------------------ smp's named weights
@cache
def all_smp_weights_names() -> frozenset[str]:
    """Every weights name any smp encoder knows (`imagenet`, `advprop`, `ssl`, ...)."""
    names = {"imagenet"}
    for entry in smp.encoders.encoders.values():
        names.update(entry.get("pretrained_settings", {}))
    return frozenset(names)


def is_weights_name(value: str | None) -> bool:
    """True when `model.encoder_weights` names smp weights rather than a file (a name always wins)."""
    return value is not None and value in all_smp_weights_names()


def smp_weights_names(encoder: str) -> list[str]:
    """The weights names smp has for `encoder` (a timm-universal `tu-` encoder: timm's default, 'imagenet')."""
    if encoder.startswith("tu-"):
        return ["imagenet"]
    entry = smp.encoders.encoders.get(encoder, {})
    return sorted(entry.get("pretrained_settings", {}))


def smp_weights_argument(encoder: str, name: str) -> str | bool:
    """What smp's `encoder_weights=` takes for `name`: the name itself, or True for a `tu-` encoder."""
    return True if encoder.startswith("tu-") else name


def check_weights_name(encoder: str, name: str) -> None:
    names = smp_weights_names(encoder)
    if name not in names:
        have = ", ".join(names) if names else "none"
        raise ConfigError(
            f"config value model.encoder_weights='{name}' is not a weights name smp has for encoder "
            f"{encoder} (it has: {have}); give one of those, a local weights file, or null"
        )


def smp_source(encoder: str, name: str) -> dict[str, str]:
    """The record of smp's named weights: the Hub repository and revision smp pins for them."""
    record = {"kind": "smp", "name": name, "encoder": encoder}
    settings = smp.encoders.encoders.get(encoder, {}).get("pretrained_settings", {}).get(name, {})
    for key in ("repo_id", "revision", "url"):
        if isinstance(settings.get(key), str):
            record[key] = settings[key]
    return record


def _is_download_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in _DOWNLOAD_ERROR_MODULES


def offline_message(encoder: str, name: str, exc: BaseException) -> str:
    from kdlab.models.weight_import import import_hint

    where = smp_source(encoder, name).get("repo_id", "its pretrained weights")
    reason = (str(exc).strip().splitlines() or [""])[0][:200]
    return (
        f"model.encoder_weights='{name}' needs smp to download {where} for encoder {encoder} from the Hugging "
        f"Face Hub, which failed ({type(exc).__name__}: {reason}); offline, set model.encoder_weights to a "
        f"local weights file instead: {import_hint(encoder)} (docs/data.md, 'Encoder weights')"
    )


def with_smp_download(encoder: str, name: str, build: Callable[[], T]) -> T:
    """Run `build` (which asks smp for named weights); a failed download becomes one CheckpointError line."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*timm-. encoders are deprecated.*")
            return build()
    except Exception as exc:
        if _is_download_error(exc):
            raise CheckpointError(offline_message(encoder, name, exc)) from exc
        raise


def fetch_smp_weights(encoder: str, name: str) -> dict[str, str]:
    """Have smp build `encoder` with its `name` weights (downloading them into its cache when they are not there
    yet), so the model build that follows finds them; returns the source record."""
    check_weights_name(encoder, name)
    with_smp_download(
        encoder, name, lambda: smp.encoders.get_encoder(encoder, weights=smp_weights_argument(encoder, name))
    )
    return smp_source(encoder, name)


# ------------------------------------------------------------------------------------------------ local files
def missing_file_message(path: str, encoder: str) -> str:
    from kdlab.models.weight_import import import_hint

    return (
        f"model.encoder_weights file {path} does not exist; {import_hint(encoder, path)}, or set "
        "model.encoder_weights=null for random init (docs/data.md, 'Encoder weights')"
    )


def file_source(path: str, embedded: dict[str, str]) -> dict[str, str]:
    """The record of a local weights file: its path, sha256 and, for an imported file, where it came from."""
    return {"kind": "file", "path": path, "sha256": file_sha256(path), **embedded}


def load_encoder_weights(encoder: nn.Module, path: str, encoder_name: str = "") -> None:
    """Load encoder weights from a local file (never a download); strict, with a readable error."""
    if not Path(path).is_file():
        raise CheckpointError(missing_file_message(path, encoder_name))
    state, _ = read_weights_file(path)
    load_strictly(
        encoder, encoder_part(state), f"model.encoder_weights file {path} does not match the encoder"
    )


# ------------------------------------------------------------------------------------------------ resolution
def resolve_encoder_weights(cfg: ModelConfig) -> dict[str, str] | None:
    """Check `cfg.encoder_weights` before anything is written and return where the weights come from.

    A smp name is fetched into smp's cache now (offline: CheckpointError naming the local-file routes). A file
    must exist and be readable; a missing file at the default place of a packaged import
    (weights/efficientnet-liteN.pth) is imported first when its package is installed.
    """
    value = cfg.encoder_weights
    if value is None:
        return None
    if is_weights_name(value):
        return fetch_smp_weights(cfg.encoder, value)
    if not Path(value).is_file():
        from kdlab.models.weight_import import auto_import_default

        if not auto_import_default(value, cfg.encoder):
            raise CheckpointError(missing_file_message(value, cfg.encoder))
    _, embedded = read_weights_file(value)
    return file_source(value, embedded)
