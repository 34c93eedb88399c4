"""Where a run's numbers go: TensorBoard scalars/images, logs/metrics.csv (a row per epoch), training_log.txt,
and, when `logging.wandb` is set, the same scalars and images to Weights & Biases (`kdlab.engine.wandb_sink`)."""

from __future__ import annotations

import csv
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from kdlab.atomic_io import FileWriteError, append_bytes, atomic_path, defer_write_failure
from kdlab.config.schema import WandbConfig

log = logging.getLogger(__name__)


class RunLogger:
    """Writes TensorBoard events, the per-epoch CSV and the text log of one run directory; with `wandb` (a
    `logging.wandb` section whose mode is not "disabled") also a W&B run that gets the same scalars and images
    and `config` (the resolved config) as its run config. TensorBoard is always on."""

    def __init__(
        self,
        run_dir: Path,
        resume_epoch: int | None = None,
        *,
        wandb: WandbConfig | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.logs_dir = run_dir / "logs"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.wandb = None
        if wandb is not None and wandb.mode != "disabled":  # first: a missing package leaves nothing open
            from kdlab.engine.wandb_sink import WandbSink

            self.wandb = WandbSink(wandb, self.logs_dir, run_dir.name, config)
        self.csv_path = self.logs_dir / "metrics.csv"
        self.rows: list[dict[str, Any]] = []
        if resume_epoch is not None and self.csv_path.is_file():
            with self.csv_path.open(newline="") as fh:
                self.rows = [r for r in csv.DictReader(fh) if int(r.get("epoch", 0)) <= resume_epoch]
        self.writer = SummaryWriter(log_dir=str(self.logs_dir))
        self.file_handler = RunLogHandler(self.logs_dir / "training_log.txt")
        self.file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("kdlab").addHandler(self.file_handler)

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        finite = {k: v for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        for key, value in finite.items():
            self.writer.add_scalar(f"{prefix}{key}", value, step)
        if self.wandb is not None:
            self.wandb.scalars(finite, step, prefix)

    def image(self, tag: str, image_hwc: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, image_hwc, step, dataformats="HWC")
        if self.wandb is not None:
            self.wandb.image(tag, image_hwc, step)

    def epoch_row(self, row: dict[str, Any]) -> None:
        """Append one epoch's row and rewrite metrics.csv atomically (columns may grow over epochs)."""
        self.rows.append(row)
        columns: list[str] = []
        for r in self.rows:
            columns.extend(k for k in r if k not in columns)
        with atomic_path(self.csv_path, fsync=False) as tmp, tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            for r in self.rows:
                writer.writerow({k: _fmt(r.get(k, "")) for k in columns})
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
        if self.wandb is not None:
            self.wandb.close()
        logging.getLogger("kdlab").removeHandler(self.file_handler)
        self.file_handler.close()


class RunLogHandler(logging.Handler):
    """Appends each record to the run's text log as whole lines, in one write (`atomic_io.append_bytes`).

    A write that fails for lack of space leaves the file as it was before that record (no torn last line),
    prints no "--- Logging error ---" traceback and drops the records after it; the failure is handed to
    `atomic_io.defer_write_failure`, and the trainer raises it as one error line at its next safe point."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = Path(path)
        self.fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if self.failed or self.fd is None:
            return
        try:
            data = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
            append_bytes(self.fd, data, self.path)
        except FileWriteError as exc:
            self.failed = True
            defer_write_failure(exc)
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self.acquire()
        try:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None
        finally:
            self.release()
        super().close()


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return value
