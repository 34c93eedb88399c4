"""Which device and mixed-precision dtype a run uses ("auto" resolves here, once)."""

from __future__ import annotations

import torch

from kdlab.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda was asked for but no CUDA device is available (use --device cpu or auto)"
        )
    return torch.device(name)


def resolve_amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA when supported (fp16 otherwise); off on CPU unless asked for explicitly."""
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None
