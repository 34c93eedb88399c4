"""`<run>/logs/progress.json`: where a training run is (epoch, batch, ETA), for a runner watching many runs.

Rank 0 rewrites the file (atomically, without fsync) at most every `min_interval_s` seconds and at each
epoch end. The runner shows one live line per running experiment from it instead of interleaved bars.
Only host-side counters go in: writing it never waits for the device.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from kdlab.atomic_io import write_json_atomic_nosync

PROGRESS_FILE = "progress.json"


class ProgressFile:
    """Throttled writer of the run's progress; the ETA is the wall time per batch so far in this process
    (evaluation included) times the batches left."""

    def __init__(self, run_dir: Path, epochs: int, min_interval_s: float = 2.0) -> None:
        self.path = Path(run_dir) / "logs" / PROGRESS_FILE
        self.epochs = epochs
        self.min_interval_s = min_interval_s
        self._started = time.perf_counter()
        self._last_write = float("-inf")
        self._batches_here = 0

    def batch(
        self, epoch: int, batch: int, n_batches: int, phase: str = "train", force: bool = False
    ) -> None:
        """Record that `batch` (1-based) of `n_batches` in epoch `epoch` (0-based) is done."""
        self._batches_here += 1
        now = time.perf_counter()
        if not force and now - self._last_write < self.min_interval_s:
            return
        self._last_write = now
        elapsed = now - self._started
        left = (self.epochs - epoch - 1) * n_batches + (n_batches - batch)
        eta = elapsed / self._batches_here * left if self._batches_here else None
        write_json_atomic_nosync(self.path, {
            "phase": phase, "epoch": epoch + 1, "epochs": self.epochs, "batch": batch, "batches": n_batches,
            "elapsed_s": round(elapsed, 1), "eta_s": None if eta is None else round(eta, 1),
            "updated": time.time(),
        })  # fmt: skip


def read_progress(run_dir: Path, newer_than: float = 0.0) -> dict | None:
    """The run's last progress record, or None when there is none written after `newer_than` (a time.time())."""
    path = Path(run_dir) / "logs" / PROGRESS_FILE
    try:
        if path.stat().st_mtime < newer_than:
            return None
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
