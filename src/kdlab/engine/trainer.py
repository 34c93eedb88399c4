"""The training loop: AdamW + warm-up and an LR schedule, AMP, clipping, accumulation, validation, logging, checkpoints,
early stopping and the top-k best checkpoints by a monitored validation metric.

It is task-agnostic: a task object turns a batch into `{"loss": ..., "<component>": ...}` and every
component is logged. Loss values stay on the device between log intervals (no per-step host syncs).
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from kdlab.atomic_io import RESUME_ADVICE, raise_deferred_write_failure, write_failure_advice
from kdlab.checkpoints import remove_stale_temp_files, save_checkpoint_atomic
from kdlab.config.schema import ExperimentConfig
from kdlab.data.loaders import raise_if_data_error
from kdlab.data.seeds import draw_seed
from kdlab.engine import distributed
from kdlab.engine.batches import autocast_for, batch_size_of, batch_to_device
from kdlab.engine.compile import compile_forward
from kdlab.engine.device import resolve_amp_dtype
from kdlab.engine.ema import ModelEMA
from kdlab.engine.loss_book import LossBook
from kdlab.engine.monitor import default_mode, worst_value
from kdlab.engine.monitor_follow import MonitorFollower
from kdlab.engine.optim import build_optimizer, build_scheduler
from kdlab.engine.progress_file import ProgressFile
from kdlab.engine.run_checkpoints import RunCheckpoints
from kdlab.engine.run_logger import RunLogger
from kdlab.engine.state import TrainState
from kdlab.engine.steps import TrainingSteps
from kdlab.engine.stop_signals import (
    StoppedAtOnce,
    StopSignals,
    TrainingInterrupted,
    interrupted_after_save,
    interrupted_at_once,
    where_stopped,
)
from kdlab.engine.tasks import Task

log = logging.getLogger(__name__)

Evaluator = Callable[[nn.Module], tuple[dict[str, float], dict[str, torch.Tensor] | None]]
# Draws the evaluator's picture data into a directory; returns (file name, RGB array) per picture.
PictureWriter = Callable[[dict[str, Any], Path], list[tuple[str, Any]]]
# What a failed write (disk full: a checkpoint, summary.json, metrics.csv, a picture, the text log) tells the
# user to do once there is space again.
RETRY_AFTER_WRITE_FAILURE = RESUME_ADVICE


class Trainer:
    """Trains `model` with `task` on `train_loader`; `evaluator(model)` gives validation metrics.

    Its parts: `steps` (forward/backward, optimizer steps), `losses` (the logged losses' sums and timing),
    `monitor` (best_model.pth and the top k, the plateau factor, early stopping), `checkpoints` (payloads,
    resume, summary.json) and `state` (the counters). The loop itself is `_train_one_epoch` and
    `_finish_epoch`."""

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
        best_metric: str = "loss",
        write_pictures: PictureWriter | None = None,
    ) -> None:
        self.cfg = cfg
        self.tcfg = cfg.training
        self.dist = distributed.current()
        self.write_pictures = write_pictures
        self.device = device
        self.model = model.to(device)
        if self.tcfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.task = task
        self.train_loader = train_loader
        self.evaluator = evaluator
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        # The monitored validation metric: it picks best_model.pth (and the top k), drives early stopping and
        # the plateau schedule. `best_metric` is the task's headline, used when training.monitor is null.
        name = self.tcfg.monitor or best_metric
        mode = self.tcfg.mode or default_mode(name)
        self.monitor = MonitorFollower(name, mode, self.tcfg, self.ckpt_dir, self.dist.is_main)
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
        if self.tcfg.compile:
            compile_forward(self.model, "student")  # after the EMA copy, which stays eager
        self.teacher_eval_model = teacher_eval_model
        self.teacher_records = teacher_records or []
        self.teacher_metrics: dict[str, float] | None = None
        self.teacher_vis_preds: torch.Tensor | None = None
        self.total_steps = self.steps_per_epoch * self.tcfg.epochs
        # The lambda holds the monitor, not the trainer: no part keeps the trainer alive (see TrainingSteps).
        monitor = self.monitor
        self.scheduler = build_scheduler(
            self.optimizer, self.tcfg, self.steps_per_epoch, plateau_factor=lambda: monitor.plateau.factor
        )
        self.state = TrainState(best_metric=worst_value(mode))
        self.losses = LossBook(self.dist)
        self.checkpoints = RunCheckpoints(self)
        self.logger: RunLogger | None = None
        # rank 0: logs/progress.json for the runner's live lines
        self.progress_file: ProgressFile | None = None
        self._stop: StopSignals | None = None
        self.last_saved_step: int | None = None  # global_step of the last.pth this process wrote last
        # The module the task calls: the student, with whatever trains beside it (feature adapters) inside the
        # same module, wrapped in DDP under torchrun so one all-reduce covers every trained weight (never the
        # teacher's).
        wrap = getattr(task, "training_module", None)
        self.train_model: nn.Module = wrap(self.model) if wrap is not None else self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = None
            if device.type == "cuda":
                ids = [device.index if device.index is not None else torch.cuda.current_device()]
            self.train_model = DistributedDataParallel(self.train_model, device_ids=ids)
        self.steps = TrainingSteps(self)

    @property
    def eval_model(self) -> nn.Module:
        """What is validated and saved as best_model.pth: the EMA weights when training.ema.evaluate is on."""
        if self.ema is not None and self.tcfg.ema.evaluate:
            return self.ema.module
        return self.model

    @property
    def best_metric_name(self) -> str:
        return self.monitor.name

    def resume_from(self, path: str | Path, payload: dict[str, Any] | None = None) -> None:
        """Continue from a full checkpoint (`RunCheckpoints.resume_from`)."""
        self.checkpoints.resume_from(path, payload)

    def write_summary(self, status: str) -> dict[str, Any]:
        """summary.json with `status` (`RunCheckpoints.write_summary`)."""
        return self.checkpoints.write_summary(status)

    # ----------------------------------------------------------------- loop
    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast_for(self.device, self.amp_dtype)

    def fit(self) -> dict[str, Any]:
        """Train to `training.epochs`; returns the summary written to summary.json.

        SIGINT/SIGTERM finish the current optimizer step, save last.pth and raise TrainingInterrupted. A write
        that fails for lack of space (any file of the run) raises FileWriteError or CheckpointWriteError, one
        line that says to rerun with --resume auto; last.pth is then the one of the last completed save."""
        with write_failure_advice(RETRY_AFTER_WRITE_FAILURE):
            return self._fit()

    def _fit(self) -> dict[str, Any]:
        start_epoch = self.state.epoch
        fresh = start_epoch == 0 and self.state.global_step == 0 and self.state.batches_done == 0
        if self.dist.is_main:
            self.logger = RunLogger(
                self.run_dir, resume_epoch=None if fresh else start_epoch,
                wandb=self.cfg.logging.wandb, config=self.cfg.model_dump(mode="json"),
            )  # fmt: skip
            remove_stale_temp_files(self.ckpt_dir)
            self.progress_file = ProgressFile(self.run_dir, self.tcfg.epochs)
        status = "failed"
        try:
            with StopSignals() as self._stop:
                if fresh and self.dist.is_main:
                    save_checkpoint_atomic(
                        self.checkpoints.base_payload(),
                        self.ckpt_dir / "untrained_model.pth",
                        retry=RETRY_AFTER_WRITE_FAILURE,
                    )
                if self.teacher_eval_model is not None and self.teacher_metrics is None:
                    self._evaluate_teacher()
                if self.state.stopped_early is not None:
                    log.info("the run had stopped early at epoch %d; nothing left to train",
                             self.state.stopped_early["epoch"])  # fmt: skip
                for epoch in range(start_epoch, self.tcfg.epochs):
                    if self.state.stopped_early is not None:
                        break
                    self._train_one_epoch(epoch)
                    self._stop_if_requested(epoch, at_epoch_end=True)
                raise_deferred_write_failure()  # the text log failed after the last epoch's check
            status = "completed"
        except (KeyboardInterrupt, TrainingInterrupted):
            status = "interrupted"
            raise
        except StoppedAtOnce as exc:  # a second signal: an interruption too, only without a save
            status = "interrupted"
            raise self._stopped_at_once(exc.signum) from None
        finally:
            self._stop = None
            summary = self._close_run(status)
        return summary

    def _close_run(self, status: str) -> dict[str, Any]:
        """summary.json with the final status, then close the logs. When the run is already failing or
        stopping (a checkpoint write hit a full disk, a signal), an OSError here (the same full disk) is
        logged, not raised: it would replace the run's one-line error with a traceback."""
        summary: dict[str, Any] = {}
        try:
            summary = self.write_summary(status)
        except OSError as exc:
            if status == "completed":
                raise
            log.warning("summary.json not updated to status %r: %s", status, exc)
        finally:
            if self.logger is not None:
                try:
                    self.logger.close()
                except OSError as exc:
                    if status == "completed":
                        raise
                    log.warning("closing the run's logs failed: %s", exc)
        return summary

    def _evaluate_teacher(self) -> None:
        """Evaluate the teacher once on the validation set before training: the bar the student aims at."""
        metrics, vis = self.evaluator(self.teacher_eval_model, desc="teacher val")
        self.teacher_metrics = metrics
        if vis is not None and "preds" in vis:  # drawn beside the student's in every epoch's pictures
            self.teacher_vis_preds = vis["preds"]
        self._log_scalars(metrics, 0, prefix="teacher/")
        log.info(
            "teacher: %s %.4f on %d val images",
            self.best_metric_name, metrics.get(self.best_metric_name, float("nan")), metrics.get("images", 0),
        )  # fmt: skip

    def _log_scalars(self, values: dict[str, float], step: int, prefix: str) -> None:
        if self.logger is not None:
            self.logger.scalars(values, step, prefix=prefix)

    def _train_one_epoch(self, epoch: int) -> None:
        tcfg = self.tcfg
        resume_batches = self.state.batches_done
        if resume_batches == 0:
            # Reseed at every epoch start: randomness inside the epoch depends only on (seed, epoch), so a run
            # resumed at an epoch boundary replays exactly what an uninterrupted run does. A mid-epoch resume
            # restored the RNG states of the moment last.pth was written instead.
            torch.manual_seed(draw_seed(tcfg.seed, epoch, 0x7FFF))
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            if resume_batches:
                sampler.set_epoch(epoch, skip_batches=resume_batches)
            else:
                sampler.set_epoch(epoch)
        n_batches = len(self.train_loader)  # the whole epoch (the sampler's length ignores skipping)
        self.model.train()
        self.steps.stop_agreed = False
        pending: list[dict[str, torch.Tensor]] = []  # the loss dicts of the accumulation window
        pending_images = 0
        grad_norm = torch.zeros((), device=self.device)
        self.losses.start_epoch(fresh=resume_batches == 0)
        accum = tcfg.grad_accum_steps
        batches = iter(self.train_loader)  # draws nothing from torch's global RNG (the loader has its own)
        bar = tqdm(
            batches,
            desc=f"train {epoch + 1}/{tcfg.epochs}",
            disable=not (self.show_progress and self.dist.is_main),
            unit="batch",
            dynamic_ncols=True,
            total=n_batches,
            initial=resume_batches,
        )
        self.optimizer.zero_grad(set_to_none=True)
        for i, raw in enumerate(bar, start=resume_batches):
            # 1. one micro-batch forward and backward; on to the next until the accumulation window closes
            raise_if_data_error(raw)
            boundary = (i + 1) % accum == 0 or i + 1 == n_batches
            if raw is None:
                self.losses.skip_batch()
            else:
                batch = batch_to_device(raw, self.device, tcfg.channels_last)
                micro = (i % accum) * self.dist.world_size + self.dist.rank
                pending.append(self.forward_backward(batch, sync_grads=boundary, micro_index=micro))
                pending_images += batch_size_of(raw)
            if not boundary or not pending:
                continue
            # 2. the optimizer step; only a completed one counts in the logged losses
            step_norm = self.optimizer_step(pending)
            if step_norm is None and self.skipped_by_scaler:
                log.debug("epoch %d: fp16 overflow, step skipped by the grad scaler (scale now %g)",
                          epoch + 1, self.scaler.get_scale())  # fmt: skip
            elif step_norm is None:
                self.steps.note_nonfinite(epoch)
            else:
                self.steps.note_finite()
                grad_norm = step_norm
                self.losses.add_step(pending, pending_images)
            pending, pending_images = [], 0
            raise_deferred_write_failure()  # a log line failed to be written (disk full): stop before a save
            self.state.batches_done = i + 1
            if self.progress_file is not None:
                self.progress_file.batch(epoch, i + 1, n_batches, force=i + 1 == n_batches)
            # 3. the log interval, a mid-epoch last.pth, a stop signal
            if (
                step_norm is not None
                and self.state.global_step % tcfg.log_every_steps == 0
                and self.losses.interval
            ):
                self._log_interval(grad_norm, bar)
            if i + 1 < n_batches:
                every = tcfg.checkpoint_every_steps
                if step_norm is not None and every and self.state.global_step % every == 0:
                    self.losses.stamp_seconds()
                    self._save_last()
                self.losses.stamp_seconds()
                self._stop_if_requested(epoch)
        self._finish_epoch(epoch, self.losses.epoch_seconds(), grad_norm)

    def _log_interval(self, grad_norm: torch.Tensor, bar: tqdm) -> None:
        """train/ scalars of the log interval: loss means (over ranks), grad norm, LR, throughput."""
        values, images_per_sec = self.losses.take_interval()
        values["grad_norm"] = float(grad_norm)
        values["lr"] = self.optimizer.param_groups[0]["lr"]
        values["images_per_sec"] = images_per_sec
        self._log_scalars(values, self.state.global_step, prefix="train/")
        bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{values['images_per_sec']:.1f}")
        self.losses.restart_interval_clock()

    def _finish_epoch(self, epoch: int, epoch_seconds: float, grad_norm: torch.Tensor) -> None:
        """The epoch's row (metrics.csv, epoch/ scalars), validation with pictures and the monitor, then the
        epoch's checkpoints and summary.json."""
        tcfg = self.tcfg
        prog = self.losses.epoch
        self.state.epoch = epoch + 1
        self.state.batches_done = 0
        self.state.train_seconds += epoch_seconds
        self.state.images_seen += prog.images * self.dist.world_size
        row: dict[str, Any] = {"epoch": epoch + 1, "step": self.state.global_step}
        row.update({f"train_{k}": v for k, v in self.losses.epoch_means().items()})
        row["lr"] = self.optimizer.param_groups[0]["lr"]
        row["grad_norm"] = float(grad_norm)
        row["train_images_per_sec"] = prog.images * self.dist.world_size / max(epoch_seconds, 1e-9)
        row["epoch_seconds"] = epoch_seconds
        if self.state.nonfinite_steps:
            row["nonfinite_steps"] = self.state.nonfinite_steps
        if self.state.amp_overflow_steps:
            row["amp_overflow_steps"] = self.state.amp_overflow_steps
        if prog.skipped:
            log.warning(
                "epoch %d: %d batches had only unreadable images and were skipped", epoch + 1, prog.skipped
            )
        last_epoch = epoch + 1 == tcfg.epochs
        if (epoch + 1) % tcfg.val_every == 0 or last_epoch:
            t_val = time.perf_counter()
            metrics, vis = self.evaluator(self.eval_model)
            row["val_seconds"] = time.perf_counter() - t_val
            row.update({f"val_{k}": v for k, v in metrics.items()})
            self.state.last_metrics = metrics
            self._log_scalars(metrics, epoch + 1, prefix="val/")
            if vis is not None and self.logger is not None and self.write_pictures is not None:
                if self.teacher_vis_preds is not None and len(self.teacher_vis_preds) == len(vis["preds"]):
                    vis["teacher_preds"] = self.teacher_vis_preds
                vis_dir = self.run_dir / "visualizations" / f"epoch_{epoch + 1:04d}"
                for name, array in self.write_pictures(vis, vis_dir):
                    self.logger.image(f"val/{name.removesuffix('.png')}", array, epoch + 1)
            value = metrics.get(self.best_metric_name, float("nan"))
            self._follow_monitor(epoch, value, last_epoch)
            log.info(
                "epoch %d/%d: loss %.4f, val %s %.4f (%s), %.1f img/s",
                epoch + 1,
                tcfg.epochs,
                row.get("train_loss", float("nan")),
                self.best_metric_name,
                value,
                ", ".join(
                    f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in metrics.items()
                    if k != self.best_metric_name and k != "images"
                ),
                row["train_images_per_sec"],
            )
        else:
            log.info("epoch %d/%d: loss %.4f", epoch + 1, tcfg.epochs, row.get("train_loss", float("nan")))
        # The text log failed during this epoch: stop before its metrics.csv row and last.pth, so --resume auto
        # redoes the epoch and its log lines.
        raise_deferred_write_failure()
        if self.logger is not None:
            self.logger.scalars(
                {k: v for k, v in row.items() if k.startswith("train_") or k in ("lr",)},
                epoch + 1,
                prefix="epoch/",
            )
            self.logger.epoch_row(row)
        if self.dist.is_main:
            full = self.checkpoints.full_payload()
            if (epoch + 1) % tcfg.save_every == 0 or last_epoch:
                epoch_path = self.ckpt_dir / f"checkpoint_epoch_{epoch + 1:04d}.pth"
                save_checkpoint_atomic(full, epoch_path, retry=RETRY_AFTER_WRITE_FAILURE)
            self._save_last(full)
            self.write_summary("running")

    def _follow_monitor(self, epoch: int, value: float, last_epoch: bool) -> None:
        """One validation's monitored value: best_model.pth and the top k, the plateau LR, early stopping."""
        self.monitor.rank(epoch, value, self.state, self.checkpoints.base_payload)
        if self.monitor.plateau_reduced(value):
            lr = self.scheduler.apply_current_factor()[0]  # the coming step trains at the reduced rate
            log.info(
                "epoch %d: no %s improvement in %d validations; LR reduced to %.3g",
                epoch + 1, self.monitor.name, self.tcfg.lr_patience, lr,
            )  # fmt: skip
        self.monitor.check_early_stop(epoch, value, last_epoch, self.state)

    # ----------------------------------------------------------------- one step (TrainingSteps)
    def forward_backward(
        self, batch: dict[str, Any], sync_grads: bool = True, micro_index: int | None = None
    ) -> dict[str, torch.Tensor]:
        """One micro-batch: forward under autocast, scaled backward (`TrainingSteps.forward_backward`)."""
        return self.steps.forward_backward(batch, sync_grads=sync_grads, micro_index=micro_index)

    def optimizer_step(self, losses: list[dict[str, torch.Tensor]] | None = None) -> torch.Tensor | None:
        """One optimizer step; None when skipped (`TrainingSteps.optimizer_step`)."""
        return self.steps.optimizer_step(losses)

    def step_flags(self, losses: list[dict[str, torch.Tensor]], grad_norm: torch.Tensor) -> torch.Tensor:
        """[non-finite step, stop requested], max-reduced over ranks (`TrainingSteps.step_flags`)."""
        return self.steps.step_flags(losses, grad_norm)

    @property
    def skipped_by_scaler(self) -> bool:
        return self.steps.skipped_by_scaler

    def stop_requested_locally(self) -> bool:
        return self._stop is not None and self._stop.requested

    # ----------------------------------------------------------------- stops and saves
    def _save_last(self, payload: dict[str, Any] | None = None) -> None:
        """Rank 0 writes last.pth (`payload`, else the full payload of now)."""
        if self.dist.is_main:
            payload = payload if payload is not None else self.checkpoints.full_payload()
            save_checkpoint_atomic(payload, self.ckpt_dir / "last.pth", retry=RETRY_AFTER_WRITE_FAILURE)
            self.last_saved_step = self.state.global_step

    def _stopped_at_once(self, signum: int) -> TrainingInterrupted:
        where = where_stopped(self.state.epoch, self.state.batches_done)
        last = self.ckpt_dir / "last.pth"
        return interrupted_at_once(signum, self.state.global_step, where, last, self.last_saved_step)

    def _stop_if_requested(self, epoch: int, at_epoch_end: bool = False) -> None:
        """After a step (or an epoch) a stop signal saves last.pth, then raises TrainingInterrupted."""
        stop = self.steps.stop_agreed if not at_epoch_end else self.stop_requested_locally()
        if at_epoch_end and self.dist.enabled:
            flag = torch.tensor([float(stop)], device=self.device)
            stop = bool(distributed.all_reduce_max_(flag)[0])
        if not stop:
            return
        if not at_epoch_end:
            self._save_last()
        signum = self._stop.signum if self._stop is not None and self._stop.signum else signal.SIGTERM
        where = where_stopped(self.state.epoch, self.state.batches_done)
        raise interrupted_after_save(signum, self.state.global_step, where, self.ckpt_dir / "last.pth")
