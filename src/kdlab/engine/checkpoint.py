"""Checkpoint files: atomic writes (temp file, fsync, rename) and safe loads (`weights_only=True`).

A checkpoint holds only tensors and plain Python data (the resolved config as a dict, RNG states as
tensors), so it loads with `torch.load(..., weights_only=True)` and never runs pickled code.
"""

from __future__ import annotations

import os
import random
import signal
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdlab.atomic_io import TMP_MARKER, atomic_write  # noqa: F401 - TMP_MARKER re-exported
from kdlab.errors import CheckpointError

# Fault injection for the crash tests: with KDLAB_FAULT_KILL_IN_SAVE=N the process SIGKILLs itself during
# its N-th checkpoint write, after the temp file is complete and before the rename.
FAULT_ENV = "KDLAB_FAULT_KILL_IN_SAVE"
_saves_in_process = 0


def save_checkpoint_atomic(payload: dict[str, Any], path: str | Path) -> Path:
    """Write `payload` to `path` via a temp file in the same directory, fsync, then rename into place."""
    global _saves_in_process
    _saves_in_process += 1
    kill_at = os.environ.get(FAULT_ENV)

    def write(tmp: Path) -> None:
        torch.save(payload, tmp)
        if kill_at is not None and int(kill_at) == _saves_in_process:
            os.kill(os.getpid(), signal.SIGKILL)

    return atomic_write(path, write, fsync_dir=True)


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


def capture_rng_state() -> dict[str, Any]:
    """RNG states of torch (CPU and CUDA), numpy and random, as weights-only-loadable objects."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": list(_py_state_to_list(random.getstate())),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _py_state_to_list(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
