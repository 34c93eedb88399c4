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
from kdlab.engine.launch import resume_command
from kdlab.engine.monitor import EarlyStopping, PlateauState, TopK, default_mode, worst_value
from kdlab.engine.optim import build_optimizer, build_scheduler
from kdlab.engine.progress_file import ProgressFile
from kdlab.engine.run_logger import RunLogger
from kdlab.engine.state import EpochProgress, LossSums, TrainerCheckpoints, TrainState
from kdlab.engine.stop_signals import StoppedAtOnce, StopSignals, TrainingInterrupted
from kdlab.engine.tasks import Task, misplaced_loss_terms
from kdlab.errors import NonFiniteLossError

log = logging.getLogger(__name__)

Evaluator = Callable[[nn.Module], tuple[dict[str, float], dict[str, torch.Tensor] | None]]
# Draws the evaluator's picture data into a directory; returns (file name, RGB array) per picture.
PictureWriter = Callable[[dict[str, Any], Path], list[tuple[str, Any]]]
# What a failed write (disk full: a checkpoint, summary.json, metrics.csv, a picture, the text log) tells the
# user to do once there is space again.
RETRY_AFTER_WRITE_FAILURE = RESUME_ADVICE


class Trainer(TrainerCheckpoints):
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
        best_metric: str = "loss",
        write_pictures: PictureWriter | None = None,
    ) -> None:
        self.cfg = cfg
        self.tcfg = cfg.training
        # The monitored validation metric: it picks best_model.pth (and the top k), drives early stopping and
        # the plateau schedule. `best_metric` is the task's headline, used when training.monitor is null.
        self.best_metric_name = self.tcfg.monitor or best_metric
        self.monitor_mode = self.tcfg.mode or default_mode(self.best_metric_name)
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
        worst = worst_value(self.monitor_mode)
        self.plateau = PlateauState(worst)
        self.early_stopping = EarlyStopping(worst)
        self.top_k = TopK(self.tcfg.save_top_k)
        self.scheduler = build_scheduler(
            self.optimizer, self.tcfg, self.steps_per_epoch, plateau_factor=lambda: self.plateau.factor
        )
        self.state = TrainState(best_metric=worst)
        self.progress = EpochProgress()
        self.logger: RunLogger | None = None
        self.progress_file: ProgressFile | None = (
            None  # rank 0: logs/progress.json for the runner's live lines
        )
        self._params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self._consecutive_nonfinite = 0
        self.skipped_by_scaler = False  # the last optimizer_step was an fp16 overflow the scaler skipped
        self._loss_dict_checked = False
        self._stop: StopSignals | None = None
        self._stop_agreed = False
        self._last_saved_step: int | None = None  # global_step of the last.pth this process wrote last
        self.dist = distributed.current()
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

    @property
    def eval_model(self) -> nn.Module:
        """What is validated and saved as best_model.pth: the EMA weights when training.ema.evaluate is on."""
        if self.ema is not None and self.tcfg.ema.evaluate:
            return self.ema.module
        return self.model

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
                        self._base_payload(),
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

    def forward_backward(
        self, batch: dict[str, Any], sync_grads: bool = True, micro_index: int | None = None
    ) -> dict[str, torch.Tensor]:
        """One micro-batch (already on the device): task forward under autocast, scaled backward.

        Returns the task's loss dict (tensors on the device; nothing is read back to the host). Under DDP,
        `sync_grads=False` skips the gradient all-reduce (micro-batches before an accumulation boundary).
        With `micro_index` (the micro-batch's place in the optimizer step, counted over all ranks) the RNG is
        seeded from (seed, step, micro_index): drop-path and dropout then depend on nothing else, so a
        resumed run, N DDP processes and one process with N-fold accumulation draw the same masks."""
        if micro_index is not None:
            torch.manual_seed(draw_seed(self.tcfg.seed, self.state.global_step, micro_index))
        set_progress = getattr(self.task, "set_progress", None)
        if set_progress is not None:
            set_progress(self.state.global_step, self.total_steps)
        no_sync = self.train_model.no_sync if self.dist.enabled and not sync_grads else contextlib.nullcontext
        with no_sync():
            with self._autocast():
                losses = self.task(self.train_model, batch)
            self.scaler.scale(losses["loss"] / self.tcfg.grad_accum_steps).backward()
        if not self._loss_dict_checked:  # once per run: the contract costs no host read
            wrong = misplaced_loss_terms(losses, self.device)
            if wrong:
                details = "; ".join(f"{k} is {v}" for k, v in sorted(wrong.items()))
                raise TypeError(
                    f"the {type(self.task).__name__} loss dict breaks the task contract: {details}"
                )
            self._loss_dict_checked = True
        return losses

    def optimizer_step(self, losses: list[dict[str, torch.Tensor]] | None = None) -> torch.Tensor | None:
        """Unscale, clip, step optimizer + scaler, zero grads, EMA, LR schedule; returns the grad norm.

        With `losses` (the accumulation window's loss dicts) a non-finite loss or gradient skips the step
        (no weight, optimizer, EMA or LR change) and returns None. That check reads one flag back to the
        host per optimizer step; the fp16 grad scaler already does the same. A step the fp16 scaler skips
        (inf/NaN gradients after scaling: it lowers its scale and tries again) is no step either: it returns
        None with `skipped_by_scaler` set and is counted in `state.amp_overflow_steps`."""
        self.skipped_by_scaler = False
        self.scaler.unscale_(self.optimizer)
        max_norm = self.tcfg.grad_clip_norm if self.tcfg.grad_clip_norm is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self._params, max_norm)
        if losses is not None and not self._all_finite(losses, grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.update()  # an fp16 scaler lowers its scale after an overflow
            return None
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        # The scaler lowers its scale exactly when it skipped the step (it only ever raises it otherwise); its
        # step already read its overflow flag back to the host, so these reads wait for nothing more.
        if scale is not None and self.scaler.get_scale() < scale:
            self.skipped_by_scaler = True
            self.state.amp_overflow_steps += 1
            return None
        if self.ema is not None:
            self.ema.update(self.model)
        self.scheduler.step()
        self.state.global_step += 1
        return grad_norm

    def step_flags(self, losses: list[dict[str, torch.Tensor]], grad_norm: torch.Tensor) -> torch.Tensor:
        """[non-finite step, stop requested] as floats on the device, max-reduced over ranks so every rank
        skips (and stops) together; no host read happens here."""
        total = torch.stack([d["loss"].detach().float() for d in losses]).sum()
        bad = ~torch.isfinite(total)
        if not self.scaler.is_enabled():  # with fp16, inf gradients are the scaler's business
            bad = bad | ~torch.isfinite(grad_norm)
        stop = torch.full((), float(self._stop_requested_locally()), device=bad.device)
        return distributed.all_reduce_max_(torch.stack([bad.float(), stop]))

    def _all_finite(self, losses: list[dict[str, torch.Tensor]], grad_norm: torch.Tensor) -> bool:
        bad, stop = self.step_flags(losses, grad_norm).tolist()  # the step's one host read
        self._stop_agreed = bool(stop)
        return not bool(bad)

    def new_loss_sums(self) -> LossSums:
        """Empty running sums for a log interval."""
        return LossSums()

    def _stop_requested_locally(self) -> bool:
        return self._stop is not None and self._stop.requested

    def _note_nonfinite(self, epoch: int) -> None:
        self.state.nonfinite_steps += 1
        self._consecutive_nonfinite += 1
        k = self.tcfg.max_nonfinite_steps
        log.warning(
            "epoch %d, step %d: non-finite loss or gradient; step skipped (%d in a row, %d in total; stop at %d)",
            epoch + 1, self.state.global_step + 1, self._consecutive_nonfinite, self.state.nonfinite_steps, k,
        )  # fmt: skip
        if self._consecutive_nonfinite >= k:
            last = self.ckpt_dir / "last.pth"
            kept = (
                f"the last good checkpoint {last} is kept"
                if last.is_file()
                else "no checkpoint was written yet"
            )
            raise NonFiniteLossError(
                f"the loss or gradients were NaN/inf in {k} optimizer steps in a row (epoch {epoch + 1}, step "
                f"{self.state.global_step + 1}); {kept}. Lower training.lr, check the data, or set training.amp=off"
            )

    def _save_last(self) -> None:
        if self.dist.is_main:
            save_checkpoint_atomic(
                self._full_payload(), self.ckpt_dir / "last.pth", retry=RETRY_AFTER_WRITE_FAILURE
            )
            self._last_saved_step = self.state.global_step

    def _stopped_at_once(self, signum: int) -> TrainingInterrupted:
        """The one-line outcome of a second signal: nothing was saved for it, the last complete last.pth
        (atomic writes: never a half-written one) is where a resume continues."""
        last = self.ckpt_dir / "last.pth"
        where = f"epoch {self.state.epoch}" + (
            f" + {self.state.batches_done} batches" if self.state.batches_done else ""
        )
        name, step = signal.Signals(signum).name, self.state.global_step
        head = f"stopped at once by a second {name} after step {step} ({where}), without saving"
        if not last.is_file():
            return TrainingInterrupted(
                signum, f"{head}; no last.pth was saved yet; start again with: {resume_command(Path('auto'))}"
            )
        saved = f" (step {self._last_saved_step})" if self._last_saved_step is not None else ""
        return TrainingInterrupted(
            signum, f"{head}; {last}{saved} stands; resume with: {resume_command(last)}"
        )

    def _stop_if_requested(self, epoch: int, at_epoch_end: bool = False) -> None:
        """After a step (or an epoch) a stop signal saves last.pth, then raises TrainingInterrupted."""
        stop = self._stop_agreed if not at_epoch_end else self._stop_requested_locally()
        if at_epoch_end and self.dist.enabled:
            flag = torch.tensor([float(stop)], device=self.device)
            stop = bool(distributed.all_reduce_max_(flag)[0])
        if not stop:
            return
        if not at_epoch_end:
            self._save_last()
        signum = self._stop.signum if self._stop is not None and self._stop.signum else signal.SIGTERM
        last = self.ckpt_dir / "last.pth"
        where = f"epoch {self.state.epoch}" + (
            f" + {self.state.batches_done} batches" if self.state.batches_done else ""
        )
        raise TrainingInterrupted(
            signum,
            f"stopped by {signal.Signals(signum).name} after step {self.state.global_step} ({where}); "
            f"saved {last}; resume with: {resume_command(last)}",
        )

    def _train_one_epoch(self, epoch: int) -> None:
        tcfg = self.tcfg
        resume_batches = self.state.batches_done
        if resume_batches == 0:
            # Reseed at every epoch start: randomness inside the epoch depends only on (seed, epoch), so a run
            # resumed at an epoch boundary replays exactly what an uninterrupted run does. A mid-epoch resume
            # restored the RNG states of the moment last.pth was written instead.
            torch.manual_seed(draw_seed(tcfg.seed, epoch, 0x7FFF))
            self.progress = EpochProgress()
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            if resume_batches:
                sampler.set_epoch(epoch, skip_batches=resume_batches)
            else:
                sampler.set_epoch(epoch)
        n_batches = len(
            self.train_loader
        )  # the whole epoch's batches (the sampler's length ignores skipping)
        self.model.train()
        self._stop_agreed = False
        prog = self.progress
        interval = self.new_loss_sums()
        pending: list[dict[str, torch.Tensor]] = []
        pending_images = 0
        grad_norm = torch.zeros((), device=self.device)
        t_start = time.perf_counter()
        seconds_before = prog.seconds
        t_interval = t_start
        interval_images = 0
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
            raise_if_data_error(raw)
            boundary = (i + 1) % accum == 0 or i + 1 == n_batches
            if raw is None:
                prog.skipped += 1
            else:
                batch = batch_to_device(raw, self.device, tcfg.channels_last)
                micro = (i % accum) * self.dist.world_size + self.dist.rank
                pending.append(self.forward_backward(batch, sync_grads=boundary, micro_index=micro))
                pending_images += batch_size_of(raw)
            if not boundary or not pending:
                continue
            step_norm = self.optimizer_step(pending)
            if step_norm is None and self.skipped_by_scaler:
                log.debug("epoch %d: fp16 overflow, step skipped by the grad scaler (scale now %g)",
                          epoch + 1, self.scaler.get_scale())  # fmt: skip
            elif step_norm is None:
                self._note_nonfinite(epoch)
            else:
                self._consecutive_nonfinite = 0
                grad_norm = step_norm
                for losses in pending:
                    prog.add(losses)
                    interval.add(losses)
                prog.images += pending_images
                interval_images += pending_images
            pending, pending_images = [], 0
            raise_deferred_write_failure()  # a log line failed to be written (disk full): stop before a save
            self.state.batches_done = i + 1
            if self.progress_file is not None:
                self.progress_file.batch(epoch, i + 1, n_batches, force=i + 1 == n_batches)
            if step_norm is not None and self.state.global_step % tcfg.log_every_steps == 0 and interval:
                elapsed = time.perf_counter() - t_interval
                values = self._reduced_means(interval)
                values["grad_norm"] = float(grad_norm)
                values["lr"] = self.optimizer.param_groups[0]["lr"]
                values["images_per_sec"] = interval_images * self.dist.world_size / max(elapsed, 1e-9)
                self._log_scalars(values, self.state.global_step, prefix="train/")
                bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{values['images_per_sec']:.1f}")
                interval, interval_images = self.new_loss_sums(), 0
                t_interval = time.perf_counter()
            if i + 1 < n_batches:
                every = tcfg.checkpoint_every_steps
                if step_norm is not None and every and self.state.global_step % every == 0:
                    prog.seconds = seconds_before + time.perf_counter() - t_start
                    self._save_last()
                prog.seconds = seconds_before + time.perf_counter() - t_start
                self._stop_if_requested(epoch)
        self._finish_epoch(epoch, prog, seconds_before + time.perf_counter() - t_start, grad_norm)

    def _follow_monitor(self, epoch: int, value: float, last_epoch: bool) -> None:
        """One validation's monitored value: best_model.pth and the top k, the plateau LR, early stopping."""
        tcfg = self.tcfg
        mode = self.monitor_mode
        rank = self.top_k.rank_of(value, mode)
        if rank is not None:
            if rank == 1:
                self.state.best_metric = value
                self.state.best_epoch = epoch + 1
            self.top_k.insert(epoch + 1, value, rank, self.ckpt_dir if self.dist.is_main else None)
            if self.dist.is_main:
                best = self._base_payload()
                best["best_metric"] = value
                best["monitor"] = {"name": self.best_metric_name, "mode": mode, "value": value}
                best_path = self.ckpt_dir / self.top_k.entries[rank - 1]["file"]
                save_checkpoint_atomic(best, best_path, retry=RETRY_AFTER_WRITE_FAILURE)
            log.info(
                "epoch %d: %s %s=%.4f -> %s", epoch + 1, "new best" if rank == 1 else f"top-{rank}",
                self.best_metric_name, value, self.top_k.entries[rank - 1]["file"],
            )  # fmt: skip
        if tcfg.lr_schedule == "plateau" and self.plateau.update(
            value, mode, tcfg.lr_patience, tcfg.lr_gamma
        ):
            step = self.state.global_step
            for group, base, fn in zip(
                self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas, strict=True
            ):
                group["lr"] = base * fn(step)
            self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
            log.info(
                "epoch %d: no %s improvement in %d validations; LR reduced to %.3g",
                epoch + 1, self.best_metric_name, tcfg.lr_patience, self.optimizer.param_groups[0]["lr"],
            )  # fmt: skip
        patience = tcfg.early_stopping_patience
        if patience is not None:
            self.early_stopping.update(value, mode, tcfg.early_stopping_min_delta)
            if self.early_stopping.bad >= patience and not last_epoch:
                self.state.stopped_early = {"epoch": epoch + 1, "best_epoch": self.state.best_epoch}
                log.info("stopped early at epoch %d (best %d)", epoch + 1, self.state.best_epoch)

    def _reduced_means(self, sums: LossSums) -> dict[str, float]:
        """Means of logged loss terms, averaged over ranks under DDP (one all-reduce per log interval)."""
        keys, stacked = sums.stacked_means()
        if self.dist.enabled:
            distributed.all_reduce_sum_(stacked).div_(self.dist.world_size)
        return dict(zip(keys, stacked.tolist(), strict=True))

    def _finish_epoch(
        self, epoch: int, prog: EpochProgress, epoch_seconds: float, grad_norm: torch.Tensor
    ) -> None:
        tcfg = self.tcfg
        self.state.epoch = epoch + 1
        self.state.batches_done = 0
        self.state.train_seconds += epoch_seconds
        self.state.images_seen += prog.images * self.dist.world_size
        row: dict[str, Any] = {"epoch": epoch + 1, "step": self.state.global_step}
        if prog.sums:
            row.update({f"train_{k}": v for k, v in self._reduced_means(prog).items()})
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
            full = self._full_payload()
            if (epoch + 1) % tcfg.save_every == 0 or last_epoch:
                epoch_path = self.ckpt_dir / f"checkpoint_epoch_{epoch + 1:04d}.pth"
                save_checkpoint_atomic(full, epoch_path, retry=RETRY_AFTER_WRITE_FAILURE)
            save_checkpoint_atomic(full, self.ckpt_dir / "last.pth", retry=RETRY_AFTER_WRITE_FAILURE)
            self._last_saved_step = self.state.global_step
            self.write_summary("running")
