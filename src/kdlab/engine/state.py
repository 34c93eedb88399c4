"""What a training run carries from step to step and across a restart: its counters (`TrainState`) and the
RNG states of torch, numpy and random (weights-only loadable). The checkpoint payloads built from them are
`kdlab.engine.run_checkpoints`'s; the logged losses of the epoch in progress are `kdlab.engine.loss_book`'s."""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """The run's counters and its best monitored value; all go into last.pth and summary.json."""

    epoch: int = 0  # completed epochs
    global_step: int = 0
    best_metric: float = -math.inf
    best_epoch: int = 0
    last_metrics: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0
    images_seen: int = 0
    batches_done: int = 0  # batches of the current, unfinished epoch already trained (mid-epoch last.pth)
    nonfinite_steps: int = 0  # optimizer steps skipped because the loss or gradients were NaN/inf
    amp_overflow_steps: int = 0  # fp16 steps the grad scaler skipped (scaled gradients overflowed)
    stopped_early: dict[str, int] | None = None  # {"epoch", "best_epoch"} once early stopping ended the run


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
    if state.get("cuda") and torch.cuda.is_available():  # resumed on CPU: the CUDA states have no use
        _restore_cuda_rng_states(state["cuda"])


def _restore_cuda_rng_states(saved: list[torch.Tensor]) -> None:
    """Each visible device gets its saved state; a resume on a machine (or CUDA_VISIBLE_DEVICES) with another
    GPU count restores the devices both have and warns once."""
    visible = torch.cuda.device_count()
    for index in range(min(len(saved), visible)):
        torch.cuda.set_rng_state(saved[index], index)
    if len(saved) != visible:
        log.warning(
            "the checkpoint holds RNG states for %d CUDA devices and %d are visible: restored the first %d; "
            "the RNG of the other devices is not restored, so a bit-exact resume is not guaranteed",
            len(saved), visible, min(len(saved), visible),
        )  # fmt: skip
