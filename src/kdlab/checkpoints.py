"""Checkpoint files (bottom layer: every other layer may import it, it imports only config and errors).

Atomic writes (temp file, fsync, rename), safe loads (`weights_only=True`), the file hash recorded for
teachers and exports, strict weight loading with one readable error, and rebuilding a model from the
config stored in a checkpoint. A checkpoint holds only tensors and plain Python data (the resolved config
as a dict, RNG states as tensors), so it loads with `torch.load(..., weights_only=True)` and never runs
pickled code.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from kdlab.atomic_io import TMP_MARKER, atomic_write, size_text
from kdlab.config.schema import ExperimentConfig
from kdlab.errors import CheckpointError, CheckpointWriteError
from kdlab.file_hash import file_sha256

__all__ = [
    "ENOSPC_FAULT_ENV", "FAULT_ENV", "ModelBuilder", "file_sha256", "load_checkpoint", "load_weights",
    "model_from_checkpoint", "remove_stale_temp_files", "save_checkpoint_atomic", "strict_load",
]  # fmt: skip

# Fault injection for the crash tests: with KDLAB_FAULT_KILL_IN_SAVE=N the process SIGKILLs itself during
# its N-th checkpoint write, after the temp file is complete and before the rename. With
# KDLAB_FAULT_ENOSPC_IN_SAVE=N its N-th checkpoint write fails as on a full disk: half the temp file is
# written, then OSError(ENOSPC) is raised. (kdlab.atomic_io's KDLAB_FAULT_ENOSPC_WRITE=PATTERN:N does the same
# by file name, for checkpoints and every other file a run writes.)
FAULT_ENV = "KDLAB_FAULT_KILL_IN_SAVE"
ENOSPC_FAULT_ENV = "KDLAB_FAULT_ENOSPC_IN_SAVE"
_saves_in_process = 0

# torch.save to a path writes through a C++ zip writer, so a full disk (or any failed write) reaches Python
# as a RuntimeError: measured on a full tmpfs with torch 2.15, "[enforce fail at inline_container.cc:671] .
# unexpected pos 576 vs 534" (the disk fills during the write) and "basic_ios::clear: iostream error" (it
# was full already); older versions say "PytorchStreamWriter failed writing file data/0: file write
# failed". Any other RuntimeError is a bug and is not caught.
_TORCH_WRITE_FAILURES = ("PytorchStreamWriter", "inline_container", "unexpected pos", "file write failed",
                         "iostream error", "cannot be opened")  # fmt: skip


def save_checkpoint_atomic(payload: dict[str, Any], path: str | Path, *, retry: str = "rerun") -> Path:
    """Write `payload` to `path` via a temp file in the same directory, fsync, then rename into place.

    A write that fails (disk full, quota, I/O error) raises CheckpointWriteError: one line naming the file,
    the reason and what to do (`retry` says how to continue, e.g. "rerun ... with --resume auto"). The temp
    file is removed and the file at `path`, if any, is left as it was."""
    global _saves_in_process
    _saves_in_process += 1
    path = Path(path)
    kill_at = os.environ.get(FAULT_ENV)
    enospc_at = os.environ.get(ENOSPC_FAULT_ENV)
    existed = path.is_file()

    def write(tmp: Path) -> None:
        torch.save(payload, tmp)
        if kill_at is not None and int(kill_at) == _saves_in_process:
            os.kill(os.getpid(), signal.SIGKILL)
        if enospc_at is not None and int(enospc_at) == _saves_in_process:
            os.truncate(tmp, tmp.stat().st_size // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

    try:
        return atomic_write(path, write, fsync_dir=True, wrap_errors=False)
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise CheckpointWriteError(_write_failure(path, reason, existed, retry)) from exc
    except RuntimeError as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if not any(marker in message for marker in _TORCH_WRITE_FAILURES):
            raise
        reason = _torch_write_reason(path.parent, _payload_bytes(payload), message)
        raise CheckpointWriteError(_write_failure(path, reason, existed, retry)) from exc


def _write_failure(path: Path, reason: str, existed: bool, retry: str) -> str:
    kept = f"the previous {path.name} is intact" if existed else f"no {path.name} was written"
    return (
        f"could not write checkpoint {path}: {reason}; {kept}. Free disk space on {path.parent} and {retry}"
    )


def _torch_write_reason(directory: Path, needed: int, message: str) -> str:
    """torch's zip writer gives no errno: compare the free space with the checkpoint's size instead."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return f"the write failed ({message})"
    if free < needed:
        return f"No space left on device (the checkpoint needs about {size_text(needed)}, {size_text(free)} free)"
    return f"the write failed ({message}; {size_text(free)} free)"


def _payload_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_payload_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_payload_bytes(v) for v in value)
    return 0


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Delete temp files left by a checkpoint write that was killed before its rename (never a real file)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [p for p in directory.iterdir() if p.name.startswith(".") and TMP_MARKER in p.name]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely; missing, unreadable or non-weights-only files raise CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        if not zipfile.is_zipfile(path):
            raise CheckpointError(
                f"checkpoint {path} is not a PyTorch checkpoint (corrupt, truncated or another format)"
            ) from exc
        if "Weights only load failed" in str(exc):
            raise CheckpointError(
                f"checkpoint {path} holds pickled objects beyond plain weights; refusing to load it "
                "(kdlab loads checkpoints with weights_only=True)"
            ) from exc
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} cannot be loaded (corrupt or truncated): {reason}") from exc
    if not isinstance(payload, dict) or "model_state_dict" not in payload:
        raise CheckpointError(f"checkpoint {path} is not a kdlab checkpoint (no 'model_state_dict')")
    return payload


def load_weights(model: nn.Module, state: dict[str, Any], path: str | Path | None) -> None:
    """`model.load_state_dict(state)`; weights that do not fit the configured model are one CheckpointError."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {path} does not match the configured model: {str(exc).splitlines()[0]}"
        ) from exc


MAX_KEYS_SHOWN = 10


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


ModelBuilder = Callable[[ExperimentConfig], nn.Module]


def model_from_checkpoint(
    path: str | Path, label: str, build: ModelBuilder
) -> tuple[nn.Module, ExperimentConfig, dict[str, Any]]:
    """Rebuild the architecture recorded in a checkpoint's config with `build` and load its weights strictly.

    The weights come from the checkpoint, so local weight files named in its config (encoder_weights,
    weights) are not read: they need not exist any more. `build` is the model builder of the checkpoint's
    task (`kdlab.tasks.build_model` picks it from the config)."""
    payload = load_checkpoint(path)
    raw_config = payload.get("config")
    if not isinstance(raw_config, dict):
        raise CheckpointError(f"{label} {path} holds no config, so its architecture is unknown")
    try:
        config = ExperimentConfig.model_validate(raw_config)
    except ValidationError as exc:
        raise CheckpointError(f"{label} {path} holds an invalid config: {exc.errors()[0]['msg']}") from exc
    model_cfg = config.model.model_copy(update={"encoder_weights": None, "weights": None})
    model = build(config.model_copy(update={"model": model_cfg}))
    strict_load(model, payload["model_state_dict"], f"{label} {path}")
    return model, config, payload
