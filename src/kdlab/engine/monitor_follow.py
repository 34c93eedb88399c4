"""One run's monitored validation metric and what follows it: best_model.pth and the top k, the plateau factor
of the LR schedule and early stopping, and their state across a resume.

The pure bookkeeping (which value is better, the counters, the top-k list and its files) is in
`kdlab.engine.monitor`; this is the run's side of it: it saves the best checkpoints, records the best value
in the `TrainState` and rebuilds the top-k list from the files on resume."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import distributed as dist

from kdlab.atomic_io import RESUME_ADVICE
from kdlab.checkpoints import load_checkpoint, save_checkpoint_atomic
from kdlab.config.schema import TrainingConfig
from kdlab.engine.monitor import EarlyStopping, Mode, PlateauState, TopK, worst_value
from kdlab.engine.state import TrainState
from kdlab.errors import CheckpointError

log = logging.getLogger(__name__)


class MonitorFollower:
    """Follows `name` (better when higher for mode "max") over the validations of a run whose checkpoints are
    in `ckpt_dir`; only the main process (`is_main`) writes, moves or deletes files there."""

    def __init__(self, name: str, mode: Mode, tcfg: TrainingConfig, ckpt_dir: Path, is_main: bool) -> None:
        self.name = name
        self.mode = mode
        self.tcfg = tcfg
        self.ckpt_dir = ckpt_dir
        self.is_main = is_main
        worst = worst_value(mode)
        self.plateau = PlateauState(worst)
        self.early_stopping = EarlyStopping(worst)
        self.top_k = TopK(tcfg.save_top_k)

    # ------------------------------------------------------------------ one validation
    def rank(
        self, epoch: int, value: float, state: TrainState, best_payload: Callable[[], dict[str, Any]]
    ) -> None:
        """A value in the top k: the files below its rank shift down one and `best_payload()` (the weights to
        keep, with this value) is saved at its rank; rank 1 is the run's new best."""
        rank = self.top_k.rank_of(value, self.mode)
        if rank is None:
            return
        if rank == 1:
            state.best_metric = value
            state.best_epoch = epoch + 1
        self.top_k.insert(epoch + 1, value, rank, self.ckpt_dir if self.is_main else None)
        if self.is_main:
            best = best_payload()
            best["best_metric"] = value
            best["monitor"] = {"name": self.name, "mode": self.mode, "value": value}
            best_path = self.ckpt_dir / self.top_k.entries[rank - 1]["file"]
            save_checkpoint_atomic(best, best_path, retry=RESUME_ADVICE)
        log.info(
            "epoch %d: %s %s=%.4f -> %s", epoch + 1, "new best" if rank == 1 else f"top-{rank}",
            self.name, value, self.top_k.entries[rank - 1]["file"],
        )  # fmt: skip

    def plateau_reduced(self, value: float) -> bool:
        """Under the plateau schedule, record the value; True when the LR factor was just reduced (the caller
        then applies it to the coming step)."""
        tcfg = self.tcfg
        return tcfg.lr_schedule == "plateau" and self.plateau.update(
            value, self.mode, tcfg.lr_patience, tcfg.lr_gamma
        )

    def check_early_stop(self, epoch: int, value: float, last_epoch: bool, state: TrainState) -> None:
        """With early stopping on, count the value; after `patience` without improvement (and before the last
        epoch) mark the run as stopped early in `state`."""
        patience = self.tcfg.early_stopping_patience
        if patience is None:
            return
        self.early_stopping.update(value, self.mode, self.tcfg.early_stopping_min_delta)
        if self.early_stopping.bad >= patience and not last_epoch:
            state.stopped_early = {"epoch": epoch + 1, "best_epoch": state.best_epoch}
            log.info("stopped early at epoch %d (best %d)", epoch + 1, state.best_epoch)

    # ------------------------------------------------------------------ resume
    def resume(self, payload: dict[str, Any], state: TrainState, top_k_from_files: bool = False) -> None:
        """Plateau factor, early-stopping counter and top-k list as they were (absent in older checkpoints:
        the top-k list then holds the recorded best epoch, as best_model.pth). With `top_k_from_files` (the
        run resumes from a checkpoint of its own checkpoints/) the top-k list is rebuilt from the files
        there, which a crash at an epoch end may have moved after that checkpoint was written. `state`
        already holds the checkpoint's counters and best value."""
        saved = payload.get("monitor")
        if saved and saved.get("name") != self.name:
            log.warning(
                "the checkpoint monitored %s, this run monitors %s: the best value, top-k list, plateau and "
                "early-stopping states restart", saved.get("name"), self.name,
            )  # fmt: skip
            state.best_metric, state.best_epoch = worst_value(self.mode), 0
            return
        if payload.get("plateau_state"):
            self.plateau = PlateauState.from_payload(payload["plateau_state"])
        if payload.get("early_stopping_state"):
            self.early_stopping = EarlyStopping.from_payload(payload["early_stopping_state"])
        stopped = payload.get("stopped_early")
        state.stopped_early = {k: int(v) for k, v in stopped.items()} if stopped else None
        if "top_k" in payload:
            self.top_k = TopK.from_payload(self.tcfg.save_top_k, payload["top_k"])
        elif state.best_epoch > 0 and math.isfinite(state.best_metric):
            self.top_k = TopK(self.tcfg.save_top_k, [
                {"epoch": state.best_epoch, "value": state.best_metric, "file": "best_model.pth"}
            ])  # fmt: skip
        if top_k_from_files:
            self._top_k_from_files(state)
        else:
            self.top_k.shrink(self.ckpt_dir if self.is_main else None)

    def _top_k_from_files(self, state: TrainState) -> None:
        """The top-k list (and the best value and epoch, its first entry) as the best_model*.pth files hold
        it: rank 0 reads and tidies the files (`TopK.from_files`: files of epochs after the resumed one are
        deleted, as those epochs are trained again) and hands the list to the other ranks."""
        k = self.tcfg.save_top_k
        saved = self.top_k.to_payload()
        entries = saved
        if self.is_main:
            top, removed = TopK.from_files(k, self.ckpt_dir, self.mode, state.epoch, self._top_k_file_info)
            entries = top.to_payload()
            if removed:
                log.info(
                    "removed %s: top-k checkpoints of epochs after the resumed epoch %d (trained again) or "
                    "past the top %d", ", ".join(removed), state.epoch, k,
                )  # fmt: skip
            if entries != saved[:k]:
                log.warning(
                    "the top-k checkpoints on disk differ from the list saved in the checkpoint (the run was "
                    "stopped between moving them and saving last.pth); the list follows the files: %s",
                    ", ".join(f"{e['file']} (epoch {e['epoch']}, {e['value']:.4g})" for e in entries) or "none",
                )  # fmt: skip
        if dist.is_available() and dist.is_initialized():
            box = [entries]
            dist.broadcast_object_list(box, src=0)
            entries = box[0]
        self.top_k = TopK.from_payload(k, entries)
        if entries:
            state.best_metric, state.best_epoch = entries[0]["value"], entries[0]["epoch"]
        else:  # no best file left: the next validated epoch is the best so far
            state.best_metric, state.best_epoch = worst_value(self.mode), 0

    def _top_k_file_info(self, path: Path) -> tuple[int, float] | None:
        """(epoch, monitored value) a best_model*.pth file was saved with, or None if it holds no such thing
        for this run's monitor (it is then not ranked)."""
        try:
            payload = load_checkpoint(path)
        except CheckpointError as exc:
            log.warning("%s; it is not counted among the top-k checkpoints", exc)
            return None
        monitor = payload.get("monitor") or {}
        if monitor.get("name", self.name) != self.name:
            return None
        value, epoch = monitor.get("value", payload.get("best_metric")), payload.get("epoch")
        if value is None or epoch is None:
            return None
        return int(epoch), float(value)
