"""A training run's state as files: the checkpoint payloads (last.pth, checkpoint_epoch_N.pth, the base of
best_model.pth and untrained_model.pth), resuming from a full one, and the run's summary.json.

`RunCheckpoints` is a component the trainer owns; `CheckpointedRun` declares everything of the trainer it reads
and restores, so the trainer's other attributes are free to change."""

from __future__ import annotations

import logging
import math
import weakref
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from kdlab.atomic_io import write_json_atomic
from kdlab.checkpoints import load_checkpoint, load_weights
from kdlab.config.schema import ExperimentConfig, TrainingConfig
from kdlab.engine.device import provenance
from kdlab.engine.distributed import DistContext
from kdlab.engine.ema import ModelEMA
from kdlab.engine.loss_book import LossBook
from kdlab.engine.monitor_follow import MonitorFollower
from kdlab.engine.optim import (
    StepLambdaLR,
    extended_schedule,
    schedule_fn,
    warmup_cosine_factor,
    warmup_steps_for,
)
from kdlab.engine.state import TrainState, capture_rng_state, restore_rng_state
from kdlab.errors import CheckpointError

log = logging.getLogger(__name__)


class CheckpointedRun(Protocol):
    """What `RunCheckpoints` reads from the run (the trainer) and, on resume, restores in it. Written on resume:
    `ema` (replaced when the checkpoint has no EMA state), `teacher_metrics` and `last_saved_step`; every
    other part is restored in place (its state_dict, the counters in `state`, `losses`, `monitor`)."""

    cfg: ExperimentConfig
    tcfg: TrainingConfig
    device: torch.device
    amp_dtype: torch.dtype | None
    run_dir: Path
    ckpt_dir: Path
    dist: DistContext
    task: Any  # its `name` goes into summary.json
    model: nn.Module  # the trained weights (EMA or not)
    task_modules: nn.Module  # what trains beside the model (feature adapters)
    ema: ModelEMA | None
    optimizer: torch.optim.Optimizer
    scheduler: StepLambdaLR
    scaler: torch.amp.GradScaler
    steps_per_epoch: int
    total_steps: int
    state: TrainState
    losses: LossBook
    monitor: MonitorFollower
    teacher_records: list[dict[str, Any]]
    teacher_metrics: dict[str, float] | None
    extra_summary: dict[str, Any]
    last_saved_step: int | None  # global_step of the last.pth this process wrote last

    @property
    def eval_model(self) -> nn.Module: ...  # what best_model.pth holds: the EMA weights or the model


class RunCheckpoints:
    """Payloads of the run's checkpoint files, resume from one, summary.json."""

    def __init__(self, run: CheckpointedRun) -> None:
        # A weak reference: the trainer owns this part, which must not keep it alive. A cycle would leave the
        # trainer (and its loader's persistent workers) to the garbage collector, and a run stopped by SIGTERM
        # would then hang at exit joining workers that ignore SIGTERM.
        self.run: CheckpointedRun = weakref.proxy(run)

    def base_payload(self) -> dict[str, Any]:
        """The evaluated weights with the config, epoch and metrics: best_model.pth, untrained_model.pth."""
        run = self.run
        return {
            "format": "kdlab-checkpoint-v1",
            "model_state_dict": run.eval_model.state_dict(),
            "config": run.cfg.model_dump(mode="json"),
            "epoch": run.state.epoch,
            "metrics": dict(run.state.last_metrics),
        }

    def full_payload(self) -> dict[str, Any]:
        """Everything a resume needs to continue exactly: last.pth, checkpoint_epoch_N.pth."""
        run, state, monitor = self.run, self.run.state, self.run.monitor
        payload = self.base_payload()
        payload["model_state_dict"] = run.model.state_dict()  # the trained weights, EMA or not
        payload.update(
            {
                "task_state_dict": run.task_modules.state_dict(),
                "ema_state_dict": run.ema.state_dict() if run.ema is not None else None,
                "teachers": run.teacher_records,
                "teacher_metrics": run.teacher_metrics,
                "optimizer_state_dict": run.optimizer.state_dict(),
                "scheduler_state_dict": run.scheduler.state_dict(),
                "scaler_state_dict": run.scaler.state_dict(),
                "global_step": state.global_step,
                "best_metric": state.best_metric,
                "best_epoch": state.best_epoch,
                "train_seconds": state.train_seconds,
                "images_seen": state.images_seen,
                "batches_done": state.batches_done,
                "nonfinite_steps": state.nonfinite_steps,
                "amp_overflow_steps": state.amp_overflow_steps,
                "epoch_progress": run.losses.epoch.to_payload() if state.batches_done else None,
                "monitor": {"name": monitor.name, "mode": monitor.mode},
                "plateau_state": monitor.plateau.to_payload(),
                "early_stopping_state": monitor.early_stopping.to_payload(),
                "stopped_early": state.stopped_early,
                "top_k": monitor.top_k.to_payload(),
                "rng_state": capture_rng_state(),
            }
        )
        return payload

    def resume_from(self, path: str | Path, payload: dict[str, Any] | None = None) -> None:
        """Restore model, optimizer, scheduler, scaler, counters and RNG states from a full checkpoint
        (`payload` is the already-loaded file, when the caller has it)."""
        run, state = self.run, self.run.state
        payload = payload if payload is not None else load_checkpoint(path)
        if "optimizer_state_dict" not in payload:
            raise CheckpointError(
                f"checkpoint {path} holds only model weights (e.g. best_model.pth); resume from checkpoints/last.pth"
            )
        load_weights(run.model, payload["model_state_dict"], path)
        if payload.get("task_state_dict"):
            run.task_modules.load_state_dict(payload["task_state_dict"])
        if run.ema is not None:
            if payload.get("ema_state_dict"):
                run.ema.load_state_dict(payload["ema_state_dict"])
            else:
                log.warning("checkpoint %s has no EMA state; the EMA restarts from the current weights", path)
                run.ema = ModelEMA(run.model, run.tcfg.ema.decay)
        run.teacher_metrics = payload.get("teacher_metrics")
        run.optimizer.load_state_dict(payload["optimizer_state_dict"])
        run.scheduler.load_state_dict(payload["scheduler_state_dict"])
        old_epochs = int(payload.get("config", {}).get("training", {}).get("epochs", run.tcfg.epochs))
        if old_epochs != run.tcfg.epochs:
            self._extend_schedule(payload, old_epochs)
        run.scaler.load_state_dict(payload["scaler_state_dict"])
        state.epoch = int(payload["epoch"])
        state.global_step = int(payload["global_step"])
        state.best_metric = float(payload["best_metric"])
        state.best_epoch = int(payload["best_epoch"])
        state.train_seconds = float(payload.get("train_seconds", 0.0))
        state.images_seen = int(payload.get("images_seen", 0))
        state.batches_done = int(payload.get("batches_done", 0))
        state.nonfinite_steps = int(payload.get("nonfinite_steps", 0))
        state.amp_overflow_steps = int(payload.get("amp_overflow_steps", 0))
        run.losses.resume_epoch(payload.get("epoch_progress"), run.device)
        state.last_metrics = dict(payload.get("metrics", {}))
        in_place = Path(path).resolve().parent == run.ckpt_dir.resolve()  # this run's own checkpoint
        run.monitor.resume(payload, state, top_k_from_files=in_place)
        if Path(path).resolve() == (run.ckpt_dir / "last.pth").resolve():
            run.last_saved_step = state.global_step
        restore_rng_state(payload["rng_state"])
        where = f"epoch {state.epoch}" + (
            f" + {state.batches_done} batches of epoch {state.epoch + 1}" if state.batches_done else ""
        )
        log.info("resumed from %s at %s (step %d)", path, where, state.global_step)

    def _extend_schedule(self, payload: dict[str, Any], old_epochs: int) -> None:
        """A run resumed with a new epoch total: continue the LR from where it was. Cosine decays from there to
        the new end; step, plateau and constant do not depend on the total and go on as they were (with the
        old warm-up length)."""
        run, tcfg = self.run, self.run.tcfg
        scheduler, groups = run.scheduler, run.optimizer.param_groups
        old_total = max(1, old_epochs * run.steps_per_epoch)
        old_warmup = warmup_steps_for(tcfg, old_total, run.steps_per_epoch)
        step = int(payload["global_step"])
        if tcfg.lr_schedule != "cosine":
            monitor = run.monitor  # the lambda holds the monitor, not the trainer
            fn = schedule_fn(tcfg, run.steps_per_epoch, old_total, old_warmup, lambda: monitor.plateau.factor)
            scheduler.lr_lambdas = [fn for _ in groups]
            log.info("extending from %d to %d epochs: the %s schedule goes on", old_epochs, tcfg.epochs,
                     tcfg.lr_schedule)  # fmt: skip
            return
        at_resume = warmup_cosine_factor(step, old_total, old_warmup, tcfg.min_lr_ratio)
        fn = extended_schedule(step, at_resume, run.total_steps, tcfg.min_lr_ratio)
        scheduler.lr_lambdas = [fn for _ in groups]
        for group, base in zip(groups, scheduler.base_lrs, strict=True):
            group["lr"] = base * fn(step)
        log.info(
            "extending from %d to %d epochs: LR continues at %.3g and decays to %.3g",
            old_epochs, tcfg.epochs, scheduler.base_lrs[0] * at_resume, scheduler.base_lrs[0] * tcfg.min_lr_ratio,
        )  # fmt: skip

    def write_summary(self, status: str) -> dict[str, Any]:
        """The run's summary; rank 0 writes it to summary.json (`extra_summary` adds the task's own entries,
        e.g. its parameter counts)."""
        run, state, monitor = self.run, self.run.state, self.run.monitor
        summary = {
            "experiment": run.cfg.name,
            "status": status,
            "epochs_completed": state.epoch,
            "epochs": run.tcfg.epochs,
            "global_step": state.global_step,
            "best_metric_name": monitor.name,
            "best_metric": state.best_metric if math.isfinite(state.best_metric) else None,
            "best_epoch": state.best_epoch,
            "best_metric_mode": monitor.mode,
            "stopped_early": state.stopped_early,
            "top_k": monitor.top_k.to_payload(),
            "final_metrics": {k: _json_number(v) for k, v in state.last_metrics.items()},
            "timings": {
                "train_seconds": state.train_seconds,
                "nonfinite_steps_skipped": state.nonfinite_steps,
                "amp_overflow_steps_skipped": state.amp_overflow_steps,
                "images_seen": state.images_seen,
                "train_images_per_sec": state.images_seen / state.train_seconds
                if state.train_seconds > 0
                else None,
            },
            "device": str(run.device),
            "amp": str(run.amp_dtype).replace("torch.", "") if run.amp_dtype else "off",
            "provenance": provenance(run.device, run.amp_dtype),
            "task": getattr(run.task, "name", type(run.task).__name__),
            "teacher_metrics": run.teacher_metrics,
            "teachers": run.teacher_records,
            **run.extra_summary,
        }
        if run.dist.world_size > 1:
            summary["world_size"] = run.dist.world_size
        if run.dist.is_main:
            write_json_atomic(run.run_dir / "summary.json", summary)
        return summary


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
