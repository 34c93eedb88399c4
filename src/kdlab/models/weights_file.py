"""Reading an encoder weights file and loading it strictly: the part shared by `model.encoder_weights`
(`kdlab.models.encoder_weights`) and `kdlab-weights import` (`kdlab.models.weight_import`), which need each
other only lazily (the first names the import command in its errors and imports packaged weights on first use).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdlab.errors import CheckpointError

# Keys that hold a state dict inside a checkpoint-like file, in the order they are tried.
_STATE_KEYS = ("state_dict", "model_state_dict")
# Prefixes of whole-model state dicts whose encoder part is wanted.
_ENCODER_PREFIXES = ("unet.encoder.", "encoder.")


def unwrap_state_dict(obj: Any) -> dict[str, Any] | None:
    """The state dict inside a weights file: bare, under `state_dict` / `model_state_dict`, else None."""
    if isinstance(obj, dict):
        for key in _STATE_KEYS:
            if isinstance(obj.get(key), dict):
                return obj[key]
        if all(isinstance(k, str) for k in obj) and any(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    return None


def encoder_part(state: dict[str, Any]) -> dict[str, Any]:
    """The encoder's keys of a whole RoiUNet / smp Unet state dict (a bare encoder state dict unchanged)."""
    for prefix in _ENCODER_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def read_weights_file(
    path: str | Path, label: str = "model.encoder_weights file"
) -> tuple[dict[str, Any], dict[str, str]]:
    """(state dict, embedded source record) of a local weights file; CheckpointError when unusable."""
    file = Path(path)
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{label} {path} is not a readable weights file: {reason}") from exc
    state = unwrap_state_dict(obj)
    if state is None:
        raise CheckpointError(f"{label} {path} does not hold a state dict")
    source = obj.get("source") if isinstance(obj, dict) else None
    record = {str(k): str(v) for k, v in source.items()} if isinstance(source, dict) else {}
    return state, record


def describe_mismatch(own: dict[str, Any], state: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, shape-mismatched) keys of `state` against the module state dict `own`."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        k for k in own if k in state and tuple(getattr(state[k], "shape", ())) != tuple(own[k].shape)
    ]
    return missing, unexpected, mismatched


def mismatch_summary(missing: list[str], unexpected: list[str], mismatched: list[str], shown: int = 8) -> str:
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched)):
        if keys:
            more = f", ... {len(keys) - shown} more" if len(keys) > shown else ""
            parts.append(f"{len(keys)} {label}: {', '.join(keys[:shown])}{more}")
    return "; ".join(parts)


def load_strictly(encoder: nn.Module, state: dict[str, Any], what: str) -> None:
    """Load `state` into `encoder` with every key and shape matching; else one CheckpointError,
    `what (N missing: ...; M unexpected: ...; shape mismatches: ...)`."""
    missing, unexpected, mismatched = describe_mismatch(encoder.state_dict(), state)
    if missing or unexpected or mismatched:
        raise CheckpointError(f"{what} ({mismatch_summary(missing, unexpected, mismatched)})")
    nn.Module.load_state_dict(encoder, state, strict=True)
