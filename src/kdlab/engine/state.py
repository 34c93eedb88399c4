"""What a training run carries from step to step and across a restart: counters, the running sums of the
epoch in progress, the RNG states of torch, numpy and random (all weights-only loadable), the checkpoint
payloads built from them, resuming from one, and the run's summary.json."""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import distributed as dist

from kdlab.atomic_io import write_json_atomic
from kdlab.checkpoints import load_checkpoint, load_weights
from kdlab.engine.device import provenance
from kdlab.engine.ema import ModelEMA
from kdlab.engine.monitor import EarlyStopping, PlateauState, TopK, worst_value
from kdlab.engine.optim import extended_schedule, schedule_fn, warmup_cosine_factor, warmup_steps_for
from kdlab.errors import CheckpointError

log = logging.getLogger(__name__)


@dataclass
class TrainState:
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


@dataclass
class LossSums:
    """Running sums of the task's loss terms over some steps (a log interval, an epoch), kept on the device
    of the losses: adding reads nothing back to the host."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        for key, value in losses.items():
            v = value.detach().float()
            self.sums[key] = self.sums[key] + v if key in self.sums else v.clone()
            self.counts[key] = self.counts.get(key, 0) + 1

    def stacked_means(self) -> tuple[list[str], torch.Tensor]:
        """(sorted keys, their means stacked in one tensor on the losses' device): what one all-reduce
        averages over ranks and one host read turns into numbers."""
        keys = sorted(self.sums)
        return keys, torch.stack([self.sums[k] / self.counts[k] for k in keys])

    def __bool__(self) -> bool:
        return bool(self.sums)


@dataclass
class EpochProgress(LossSums):
    """Running sums of the epoch in progress; saved in a mid-epoch last.pth so a resumed epoch's row
    (metrics.csv) matches an uninterrupted one."""

    images: int = 0
    seconds: float = 0.0
    skipped: int = 0

    def to_payload(self) -> dict[str, Any]:
        return {"sums": {k: v.cpu() for k, v in self.sums.items()}, "counts": dict(self.counts),
                "images": self.images, "seconds": self.seconds, "skipped": self.skipped}  # fmt: skip

    @classmethod
    def from_payload(cls, data: dict[str, Any] | None, device: torch.device) -> EpochProgress:
        if not data:
            return cls()
        return cls({k: v.to(device) for k, v in data["sums"].items()}, dict(data["counts"]),
                   int(data["images"]), float(data["seconds"]), int(data.get("skipped", 0)))  # fmt: skip


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


class TrainerCheckpoints:
    """The `Trainer`'s state as files: last.pth / epoch / best payloads, resume, summary.json.

    A mixin: it reads the trainer's model, optimizer, scheduler, scaler, EMA, task modules and counters."""

    def _base_payload(self) -> dict[str, Any]:
        return {
            "format": "kdlab-checkpoint-v1",
            "model_state_dict": self.eval_model.state_dict(),
            "config": self.cfg.model_dump(mode="json"),
            "epoch": self.state.epoch,
            "metrics": dict(self.state.last_metrics),
        }

    def _full_payload(self) -> dict[str, Any]:
        payload = self._base_payload()
        payload["model_state_dict"] = self.model.state_dict()  # the trained weights, EMA or not
        payload.update(
            {
                "task_state_dict": self.task_modules.state_dict(),
                "ema_state_dict": self.ema.state_dict() if self.ema is not None else None,
                "teachers": self.teacher_records,
                "teacher_metrics": self.teacher_metrics,
                "optimizer_state_dict": self.optimizer.state_dict(),
                "scheduler_state_dict": self.scheduler.state_dict(),
                "scaler_state_dict": self.scaler.state_dict(),
                "global_step": self.state.global_step,
                "best_metric": self.state.best_metric,
                "best_epoch": self.state.best_epoch,
                "train_seconds": self.state.train_seconds,
                "images_seen": self.state.images_seen,
                "batches_done": self.state.batches_done,
                "nonfinite_steps": self.state.nonfinite_steps,
                "amp_overflow_steps": self.state.amp_overflow_steps,
                "epoch_progress": self.progress.to_payload() if self.state.batches_done else None,
                "monitor": {"name": self.best_metric_name, "mode": self.monitor_mode},
                "plateau_state": self.plateau.to_payload(),
                "early_stopping_state": self.early_stopping.to_payload(),
                "stopped_early": self.state.stopped_early,
                "top_k": self.top_k.to_payload(),
                "rng_state": capture_rng_state(),
            }
        )
        return payload

    def resume_from(self, path: str | Path, payload: dict[str, Any] | None = None) -> None:
        """Restore model, optimizer, scheduler, scaler, counters and RNG states from a full checkpoint
        (`payload` is the already-loaded file, when the caller has it)."""
        payload = payload if payload is not None else load_checkpoint(path)
        if "optimizer_state_dict" not in payload:
            raise CheckpointError(
                f"checkpoint {path} holds only model weights (e.g. best_model.pth); resume from checkpoints/last.pth"
            )
        load_weights(self.model, payload["model_state_dict"], path)
        if payload.get("task_state_dict"):
            self.task_modules.load_state_dict(payload["task_state_dict"])
        if self.ema is not None:
            if payload.get("ema_state_dict"):
                self.ema.load_state_dict(payload["ema_state_dict"])
            else:
                log.warning("checkpoint %s has no EMA state; the EMA restarts from the current weights", path)
                self.ema = ModelEMA(self.model, self.tcfg.ema.decay)
        self.teacher_metrics = payload.get("teacher_metrics")
        self.optimizer.load_state_dict(payload["optimizer_state_dict"])
        self.scheduler.load_state_dict(payload["scheduler_state_dict"])
        old_epochs = int(payload.get("config", {}).get("training", {}).get("epochs", self.tcfg.epochs))
        if old_epochs != self.tcfg.epochs:
            self._extend_schedule(payload, old_epochs)
        self.scaler.load_state_dict(payload["scaler_state_dict"])
        self.state.epoch = int(payload["epoch"])
        self.state.global_step = int(payload["global_step"])
        self.state.best_metric = float(payload["best_metric"])
        self.state.best_epoch = int(payload["best_epoch"])
        self.state.train_seconds = float(payload.get("train_seconds", 0.0))
        self.state.images_seen = int(payload.get("images_seen", 0))
        self.state.batches_done = int(payload.get("batches_done", 0))
        self.state.nonfinite_steps = int(payload.get("nonfinite_steps", 0))
        self.state.amp_overflow_steps = int(payload.get("amp_overflow_steps", 0))
        self.progress = EpochProgress.from_payload(payload.get("epoch_progress"), self.device)
        self.state.last_metrics = dict(payload.get("metrics", {}))
        in_place = Path(path).resolve().parent == self.ckpt_dir.resolve()  # this run's own checkpoint
        self._resume_monitor(payload, top_k_from_files=in_place)
        if Path(path).resolve() == (self.ckpt_dir / "last.pth").resolve():
            self._last_saved_step = self.state.global_step
        restore_rng_state(payload["rng_state"])
        where = f"epoch {self.state.epoch}" + (
            f" + {self.state.batches_done} batches of epoch {self.state.epoch + 1}"
            if self.state.batches_done
            else ""
        )
        log.info("resumed from %s at %s (step %d)", path, where, self.state.global_step)

    def _resume_monitor(self, payload: dict[str, Any], top_k_from_files: bool = False) -> None:
        """Plateau factor, early-stopping counter and top-k list as they were (absent in older checkpoints:
        the top-k list then holds the recorded best epoch, as best_model.pth). With `top_k_from_files` (the
        run resumes from a checkpoint of its own checkpoints/) the top-k list is rebuilt from the files
        there, which a crash at an epoch end may have moved after that checkpoint was written."""
        saved = payload.get("monitor")
        if saved and saved.get("name") != self.best_metric_name:
            log.warning(
                "the checkpoint monitored %s, this run monitors %s: the best value, top-k list, plateau and "
                "early-stopping states restart", saved.get("name"), self.best_metric_name,
            )  # fmt: skip
            self.state.best_metric, self.state.best_epoch = worst_value(self.monitor_mode), 0
            return
        if payload.get("plateau_state"):
            self.plateau = PlateauState.from_payload(payload["plateau_state"])
        if payload.get("early_stopping_state"):
            self.early_stopping = EarlyStopping.from_payload(payload["early_stopping_state"])
        stopped = payload.get("stopped_early")
        self.state.stopped_early = {k: int(v) for k, v in stopped.items()} if stopped else None
        if "top_k" in payload:
            self.top_k = TopK.from_payload(self.tcfg.save_top_k, payload["top_k"])
        elif self.state.best_epoch > 0 and math.isfinite(self.state.best_metric):
            self.top_k = TopK(self.tcfg.save_top_k, [
                {"epoch": self.state.best_epoch, "value": self.state.best_metric, "file": "best_model.pth"}
            ])  # fmt: skip
        if top_k_from_files:
            self._top_k_from_files()
        else:
            self.top_k.shrink(self.ckpt_dir if self.dist.is_main else None)

    def _top_k_from_files(self) -> None:
        """The top-k list (and the best value and epoch, its first entry) as the best_model*.pth files hold
        it: rank 0 reads and tidies the files (`TopK.from_files`: files of epochs after the resumed one are
        deleted, as those epochs are trained again) and hands the list to the other ranks."""
        saved = self.top_k.to_payload()
        entries = saved
        if self.dist.is_main:
            top, removed = TopK.from_files(
                self.tcfg.save_top_k,
                self.ckpt_dir,
                self.monitor_mode,
                self.state.epoch,
                self._top_k_file_info,
            )
            entries = top.to_payload()
            if removed:
                log.info(
                    "removed %s: top-k checkpoints of epochs after the resumed epoch %d (trained again) or "
                    "past the top %d", ", ".join(removed), self.state.epoch, self.tcfg.save_top_k,
                )  # fmt: skip
            if entries != saved[: self.tcfg.save_top_k]:
                log.warning(
                    "the top-k checkpoints on disk differ from the list saved in the checkpoint (the run was "
                    "stopped between moving them and saving last.pth); the list follows the files: %s",
                    ", ".join(f"{e['file']} (epoch {e['epoch']}, {e['value']:.4g})" for e in entries) or "none",
                )  # fmt: skip
        if dist.is_available() and dist.is_initialized():
            box = [entries]
            dist.broadcast_object_list(box, src=0)
            entries = box[0]
        self.top_k = TopK.from_payload(self.tcfg.save_top_k, entries)
        if entries:
            self.state.best_metric, self.state.best_epoch = entries[0]["value"], entries[0]["epoch"]
        else:  # no best file left: the next validated epoch is the best so far
            self.state.best_metric, self.state.best_epoch = worst_value(self.monitor_mode), 0

    def _top_k_file_info(self, path: Path) -> tuple[int, float] | None:
        """(epoch, monitored value) a best_model*.pth file was saved with, or None if it holds no such thing
        for this run's monitor (it is then not ranked)."""
        try:
            payload = load_checkpoint(path)
        except CheckpointError as exc:
            log.warning("%s; it is not counted among the top-k checkpoints", exc)
            return None
        monitor = payload.get("monitor") or {}
        if monitor.get("name", self.best_metric_name) != self.best_metric_name:
            return None
        value, epoch = monitor.get("value", payload.get("best_metric")), payload.get("epoch")
        if value is None or epoch is None:
            return None
        return int(epoch), float(value)

    def _extend_schedule(self, payload: dict[str, Any], old_epochs: int) -> None:
        """A run resumed with a new epoch total: continue the LR from where it was. Cosine decays from there to
        the new end; step, plateau and constant do not depend on the total and go on as they were (with the
        old warm-up length)."""
        old_total = max(1, old_epochs * self.steps_per_epoch)
        old_warmup = warmup_steps_for(self.tcfg, old_total, self.steps_per_epoch)
        step = int(payload["global_step"])
        if self.tcfg.lr_schedule != "cosine":
            fn = schedule_fn(
                self.tcfg, self.steps_per_epoch, old_total, old_warmup, lambda: self.plateau.factor
            )
            self.scheduler.lr_lambdas = [fn for _ in self.optimizer.param_groups]
            log.info("extending from %d to %d epochs: the %s schedule goes on", old_epochs, self.tcfg.epochs,
                     self.tcfg.lr_schedule)  # fmt: skip
            return
        at_resume = warmup_cosine_factor(step, old_total, old_warmup, self.tcfg.min_lr_ratio)
        fn = extended_schedule(step, at_resume, self.total_steps, self.tcfg.min_lr_ratio)
        self.scheduler.lr_lambdas = [fn for _ in self.optimizer.param_groups]
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base * fn(step)
        log.info(
            "extending from %d to %d epochs: LR continues at %.3g and decays to %.3g",
            old_epochs, self.tcfg.epochs, self.scheduler.base_lrs[0] * at_resume,
            self.scheduler.base_lrs[0] * self.tcfg.min_lr_ratio,
        )  # fmt: skip

    def write_summary(self, status: str) -> dict[str, Any]:
        """The run's summary; rank 0 writes it to summary.json (`extra_summary` adds the task's own entries,
        e.g. its parameter counts)."""
        summary = {
            "experiment": self.cfg.name,
            "status": status,
            "epochs_completed": self.state.epoch,
            "epochs": self.tcfg.epochs,
            "global_step": self.state.global_step,
            "best_metric_name": self.best_metric_name,
            "best_metric": self.state.best_metric if math.isfinite(self.state.best_metric) else None,
            "best_epoch": self.state.best_epoch,
            "best_metric_mode": self.monitor_mode,
            "stopped_early": self.state.stopped_early,
            "top_k": self.top_k.to_payload(),
            "final_metrics": {k: _json_number(v) for k, v in self.state.last_metrics.items()},
            "timings": {
                "train_seconds": self.state.train_seconds,
                "nonfinite_steps_skipped": self.state.nonfinite_steps,
                "amp_overflow_steps_skipped": self.state.amp_overflow_steps,
                "images_seen": self.state.images_seen,
                "train_images_per_sec": self.state.images_seen / self.state.train_seconds
                if self.state.train_seconds > 0
                else None,
            },
            "device": str(self.device),
            "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "off",
            "provenance": provenance(self.device, self.amp_dtype),
            "task": getattr(self.task, "name", type(self.task).__name__),
            "teacher_metrics": self.teacher_metrics,
            "teachers": self.teacher_records,
            **self.extra_summary,
        }
        if self.dist.world_size > 1:
            summary["world_size"] = self.dist.world_size
        if self.dist.is_main:
            write_json_atomic(self.run_dir / "summary.json", summary)
        return summary


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
