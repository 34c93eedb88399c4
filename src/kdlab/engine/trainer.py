"""The training loop: AdamW + warm-up/cosine, AMP, clipping, accumulation, validation, logging, checkpoints.

It is task-agnostic: a task object turns a batch into `{"loss": ..., "<component>": ...}` and every
component is logged. Loss values stay on the device between log intervals (no per-step host syncs).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from kdlab.atomic_io import write_json_atomic
from kdlab.config.schema import ExperimentConfig
from kdlab.data.coco import sample_seed
from kdlab.data.loaders import raise_if_data_error
from kdlab.distill.ema import ModelEMA
from kdlab.engine.batches import batch_to_device
from kdlab.engine.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint_atomic,
)
from kdlab.engine.optim import build_optimizer, build_scheduler, extended_schedule, warmup_cosine_factor
from kdlab.engine.run_logger import RunLogger
from kdlab.engine.tasks import Task
from kdlab.engine.visuals import save_visualizations
from kdlab.errors import CheckpointError

log = logging.getLogger(__name__)

Evaluator = Callable[[nn.Module], tuple[dict[str, float], dict[str, torch.Tensor] | None]]
BEST_METRIC = "target_iou"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from kdlab.errors import ConfigError

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


@dataclass
class TrainState:
    epoch: int = 0  # completed epochs
    global_step: int = 0
    best_metric: float = -math.inf
    best_epoch: int = 0
    last_metrics: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0
    images_seen: int = 0


class Trainer:
    """Trains `model` with `task` on `train_loader`; `evaluator(model)` gives validation metrics."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        model: nn.Module,
        task: Task,
        train_loader: Any,
        evaluator: Evaluator,
        run_dir: Path,
        device: torch.device,
        show_progress: bool = True,
        extra_summary: dict[str, Any] | None = None,
        teacher_eval_model: nn.Module | None = None,
        teacher_records: list[dict[str, Any]] | None = None,
        ema: ModelEMA | None = None,
        best_metric: str = BEST_METRIC,
    ) -> None:
        self.cfg = cfg
        self.best_metric_name = (
            best_metric  # the validation metric that picks best_model.pth (higher is better)
        )
        self.tcfg = cfg.training
        self.device = device
        self.model = model.to(device)
        if self.tcfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.task = task
        self.train_loader = train_loader
        self.evaluator = evaluator
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.show_progress = show_progress
        self.extra_summary = extra_summary or {}
        self.amp_dtype = resolve_amp_dtype(self.tcfg.amp, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.steps_per_epoch = max(1, math.ceil(len(train_loader) / self.tcfg.grad_accum_steps))
        self.task_modules = nn.ModuleList(list(getattr(task, "trainable_modules", lambda: [])())).to(device)
        self.optimizer = build_optimizer(nn.ModuleList([self.model, self.task_modules]), self.tcfg, device)
        if ema is None and self.tcfg.ema.enabled:
            ema = ModelEMA(self.model, self.tcfg.ema.decay)
        self.ema = ema
        if self.ema is not None:
            self.ema.module.to(device)
            if self.tcfg.channels_last:
                self.ema.module.to(memory_format=torch.channels_last)
        self.teacher_eval_model = teacher_eval_model
        self.teacher_records = teacher_records or []
        self.teacher_metrics: dict[str, float] | None = None
        self.total_steps = self.steps_per_epoch * self.tcfg.epochs
        self.scheduler = build_scheduler(self.optimizer, self.tcfg, self.steps_per_epoch)
        self.state = TrainState()
        self.logger: RunLogger | None = None

    @property
    def eval_model(self) -> nn.Module:
        """What is validated and saved as best_model.pth: the EMA weights when training.ema.evaluate is on."""
        if self.ema is not None and self.tcfg.ema.evaluate:
            return self.ema.module
        return self.model

    # ----------------------------------------------------------------- checkpoints
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
        try:
            self.model.load_state_dict(payload["model_state_dict"])
        except RuntimeError as exc:
            raise CheckpointError(
                f"checkpoint {path} does not match the configured model: {str(exc).splitlines()[0]}"
            ) from exc
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
        self.state.last_metrics = dict(payload.get("metrics", {}))
        restore_rng_state(payload["rng_state"])
        log.info("resumed from %s at epoch %d (step %d)", path, self.state.epoch, self.state.global_step)

    def _extend_schedule(self, payload: dict[str, Any], old_epochs: int) -> None:
        """A run resumed with a new epoch total: continue the LR from where it was, cosine to the new end."""
        old_total = max(1, old_epochs * self.steps_per_epoch)
        old_warmup = min(old_total - 1, round(self.tcfg.warmup_epochs * self.steps_per_epoch))
        step = int(payload["global_step"])
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

    # ----------------------------------------------------------------- loop
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def fit(self) -> dict[str, Any]:
        """Train to `training.epochs`; returns the summary written to summary.json."""
        start_epoch = self.state.epoch
        self.logger = RunLogger(self.run_dir, resume_epoch=start_epoch if start_epoch > 0 else None)
        status = "failed"
        try:
            if start_epoch == 0:
                save_checkpoint_atomic(self._base_payload(), self.ckpt_dir / "untrained_model.pth")
            if self.teacher_eval_model is not None and self.teacher_metrics is None:
                self._evaluate_teacher()
            for epoch in range(start_epoch, self.tcfg.epochs):
                self._train_one_epoch(epoch)
            status = "completed"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            summary = self.write_summary(status)
            self.logger.close()
        return summary

    def _evaluate_teacher(self) -> None:
        """Evaluate the teacher once on the validation set before training: the bar the student aims at."""
        metrics, _ = self.evaluator(self.teacher_eval_model, desc="teacher val")
        self.teacher_metrics = metrics
        self.logger.scalars(metrics, 0, prefix="teacher/")
        log.info(
            "teacher: %s %.4f on %d val images",
            self.best_metric_name, metrics.get(self.best_metric_name, float("nan")), metrics.get("images", 0),
        )  # fmt: skip

    def _train_one_epoch(self, epoch: int) -> None:
        tcfg = self.tcfg
        # Reseed at every epoch start: randomness inside the epoch depends only on (seed, epoch), so a run
        # resumed at an epoch boundary replays exactly what an uninterrupted run does.
        torch.manual_seed(sample_seed(tcfg.seed, epoch, 0x7FFF))
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        self.model.train()
        sums: dict[str, torch.Tensor] = {}
        sum_counts: dict[str, int] = {}
        interval: dict[str, torch.Tensor] = {}
        interval_counts: dict[str, int] = {}
        set_progress = getattr(self.task, "set_progress", None)
        epoch_batches = 0
        epoch_images = 0
        skipped = 0
        grad_norm = torch.zeros((), device=self.device)
        t_epoch = time.perf_counter()
        t_interval = t_epoch
        interval_images = 0
        accum = tcfg.grad_accum_steps
        n_batches = len(self.train_loader)
        bar = tqdm(
            self.train_loader,
            desc=f"train {epoch + 1}/{tcfg.epochs}",
            disable=not self.show_progress,
            unit="batch",
            dynamic_ncols=True,
        )
        self.optimizer.zero_grad(set_to_none=True)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        for i, raw in enumerate(bar):
            raise_if_data_error(raw)
            if raw is None:
                skipped += 1
                continue
            batch = batch_to_device(raw, self.device, tcfg.channels_last)
            if set_progress is not None:
                set_progress(self.state.global_step, self.total_steps)
            with self._autocast():
                losses = self.task(self.model, batch)
            self.scaler.scale(losses["loss"] / accum).backward()
            n_images = raw["images"].shape[0]
            epoch_images += n_images
            interval_images += n_images
            epoch_batches += 1
            for key, value in losses.items():
                v = value.detach().float()
                sums[key] = sums.get(key, 0) + v
                sum_counts[key] = sum_counts.get(key, 0) + 1
                interval[key] = interval.get(key, 0) + v
                interval_counts[key] = interval_counts.get(key, 0) + 1
            if (i + 1) % accum == 0 or i + 1 == n_batches:
                self.scaler.unscale_(self.optimizer)
                if tcfg.grad_clip_norm is not None:
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip_norm)
                else:
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                if self.ema is not None:
                    self.ema.update(self.model)
                self.scheduler.step()
                self.state.global_step += 1
                if self.state.global_step % tcfg.log_every_steps == 0:
                    elapsed = time.perf_counter() - t_interval
                    values = {k: (v / interval_counts[k]).item() for k, v in interval.items()}
                    values["grad_norm"] = float(grad_norm)
                    values["lr"] = self.optimizer.param_groups[0]["lr"]
                    values["images_per_sec"] = interval_images / max(elapsed, 1e-9)
                    self.logger.scalars(values, self.state.global_step, prefix="train/")
                    bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{values['images_per_sec']:.1f}")
                    interval, interval_counts, interval_images = {}, {}, 0
                    t_interval = time.perf_counter()
        epoch_seconds = time.perf_counter() - t_epoch
        self.state.epoch = epoch + 1
        self.state.train_seconds += epoch_seconds
        self.state.images_seen += epoch_images
        row: dict[str, Any] = {"epoch": epoch + 1, "step": self.state.global_step}
        for key, value in sums.items():
            row[f"train_{key}"] = (value / sum_counts[key]).item()
        row["lr"] = self.optimizer.param_groups[0]["lr"]
        row["grad_norm"] = float(grad_norm)
        row["train_images_per_sec"] = epoch_images / max(epoch_seconds, 1e-9)
        row["epoch_seconds"] = epoch_seconds
        if skipped:
            log.warning(
                "epoch %d: %d batches had only unreadable images and were skipped", epoch + 1, skipped
            )
        last_epoch = epoch + 1 == tcfg.epochs
        if (epoch + 1) % tcfg.val_every == 0 or last_epoch:
            t_val = time.perf_counter()
            metrics, vis = self.evaluator(self.eval_model)
            row["val_seconds"] = time.perf_counter() - t_val
            row.update({f"val_{k}": v for k, v in metrics.items()})
            self.state.last_metrics = metrics
            self.logger.scalars(metrics, epoch + 1, prefix="val/")
            if vis is not None:
                vis_dir = self.run_dir / "visualizations" / f"epoch_{epoch + 1:04d}"
                for name, array in save_visualizations(vis, vis_dir):
                    self.logger.image(f"val/{name.removesuffix('.png')}", array, epoch + 1)
            value = metrics.get(self.best_metric_name, float("nan"))
            if math.isfinite(value) and value > self.state.best_metric:
                self.state.best_metric = value
                self.state.best_epoch = epoch + 1
                best = self._base_payload()
                best["best_metric"] = value
                save_checkpoint_atomic(best, self.ckpt_dir / "best_model.pth")
                log.info(
                    "epoch %d: new best %s=%.4f -> best_model.pth", epoch + 1, self.best_metric_name, value
                )
            log.info(
                "epoch %d/%d: loss %.4f, val %s %.4f (%s), %.1f img/s",
                epoch + 1,
                tcfg.epochs,
                row.get("train_loss", float("nan")),
                self.best_metric_name,
                value,
                ", ".join(
                    f"{k} {v:.4f}" for k, v in metrics.items() if k != self.best_metric_name and k != "images"
                ),
                row["train_images_per_sec"],
            )
        else:
            log.info("epoch %d/%d: loss %.4f", epoch + 1, tcfg.epochs, row.get("train_loss", float("nan")))
        self.logger.scalars(
            {k: v for k, v in row.items() if k.startswith("train_") or k in ("lr",)},
            epoch + 1,
            prefix="epoch/",
        )
        self.logger.epoch_row(row)
        full = self._full_payload()
        if (epoch + 1) % tcfg.save_every == 0 or last_epoch:
            save_checkpoint_atomic(full, self.ckpt_dir / f"checkpoint_epoch_{epoch + 1:04d}.pth")
        save_checkpoint_atomic(full, self.ckpt_dir / "last.pth")
        self.write_summary("running")

    # ----------------------------------------------------------------- summary
    def write_summary(self, status: str) -> dict[str, Any]:
        from kdlab.models.roi_unet import count_parameters

        model = self.model
        summary = {
            "experiment": self.cfg.name,
            "status": status,
            "epochs_completed": self.state.epoch,
            "epochs": self.tcfg.epochs,
            "global_step": self.state.global_step,
            "best_metric_name": self.best_metric_name,
            "best_metric": self.state.best_metric if math.isfinite(self.state.best_metric) else None,
            "best_epoch": self.state.best_epoch,
            "final_metrics": {k: _json_number(v) for k, v in self.state.last_metrics.items()},
            "params": {
                "total": count_parameters(model),
                "unet": count_parameters(model.unet) if hasattr(model, "unet") else None,
            },
            "timings": {
                "train_seconds": self.state.train_seconds,
                "images_seen": self.state.images_seen,
                "train_images_per_sec": self.state.images_seen / self.state.train_seconds
                if self.state.train_seconds > 0
                else None,
            },
            "device": str(self.device),
            "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "off",
            "task": getattr(self.task, "name", type(self.task).__name__),
            "teacher_metrics": self.teacher_metrics,
            "teachers": self.teacher_records,
            **self.extra_summary,
        }
        write_json_atomic(self.run_dir / "summary.json", summary)
        return summary


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
