"""One micro-batch's forward and backward, and one optimizer step: AMP, gradient clipping, the finite check
and the stop flag agreed over ranks, the EMA and the LR schedule, and the count of skipped non-finite steps.

`TrainingSteps` is a component the trainer owns; `SteppedRun` declares what of the trainer it uses."""

from __future__ import annotations

import contextlib
import logging
import weakref
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from kdlab.config.schema import TrainingConfig
from kdlab.data.seeds import draw_seed
from kdlab.engine import distributed
from kdlab.engine.batches import autocast_for
from kdlab.engine.distributed import DistContext
from kdlab.engine.ema import ModelEMA
from kdlab.engine.optim import StepLambdaLR
from kdlab.engine.state import TrainState
from kdlab.engine.tasks import Task, misplaced_loss_terms
from kdlab.errors import NonFiniteLossError

log = logging.getLogger(__name__)


class SteppedRun(Protocol):
    """What `TrainingSteps` reads from the run (the trainer); it writes only `state`'s step counters."""

    tcfg: TrainingConfig
    device: torch.device
    amp_dtype: torch.dtype | None
    dist: DistContext
    ckpt_dir: Path  # named when the run stops on non-finite steps
    task: Task
    model: nn.Module  # the student, which the EMA follows
    train_model: nn.Module  # what the task calls: the student with its adapters, DDP-wrapped under torchrun
    ema: ModelEMA | None
    optimizer: torch.optim.Optimizer
    scheduler: StepLambdaLR
    scaler: torch.amp.GradScaler
    total_steps: int
    state: TrainState

    def stop_requested_locally(self) -> bool: ...  # a SIGINT/SIGTERM reached this process


class TrainingSteps:
    """Forward/backward and optimizer steps of one run; after each step, `skipped_by_scaler` and `stop_agreed`
    say what the step found (an fp16 overflow; a stop signal on any rank)."""

    def __init__(self, run: SteppedRun) -> None:
        # A weak reference: the trainer owns this part, which must not keep it alive. A cycle would leave the
        # trainer (and its loader's persistent workers) to the garbage collector, and a run stopped by SIGTERM
        # would then hang at exit joining workers that ignore SIGTERM.
        self.run: SteppedRun = weakref.proxy(run)
        self.params = [p for group in run.optimizer.param_groups for p in group["params"]]
        self.skipped_by_scaler = False  # the last optimizer_step was an fp16 overflow the scaler skipped
        self.stop_agreed = False  # some rank was asked to stop before the last step's check
        self.consecutive_nonfinite = 0
        self._loss_dict_checked = False

    def forward_backward(
        self, batch: dict[str, Any], sync_grads: bool = True, micro_index: int | None = None
    ) -> dict[str, torch.Tensor]:
        """One micro-batch (already on the device): task forward under autocast, scaled backward.

        Returns the task's loss dict (tensors on the device; nothing is read back to the host). Under DDP,
        `sync_grads=False` skips the gradient all-reduce (micro-batches before an accumulation boundary).
        With `micro_index` (the micro-batch's place in the optimizer step, counted over all ranks) the RNG is
        seeded from (seed, step, micro_index): drop-path and dropout then depend on nothing else, so a
        resumed run, N DDP processes and one process with N-fold accumulation draw the same masks."""
        run = self.run
        if micro_index is not None:
            torch.manual_seed(draw_seed(run.tcfg.seed, run.state.global_step, micro_index))
        set_progress = getattr(run.task, "set_progress", None)
        if set_progress is not None:
            set_progress(run.state.global_step, run.total_steps)
        no_sync = run.train_model.no_sync if run.dist.enabled and not sync_grads else contextlib.nullcontext
        with no_sync():
            with autocast_for(run.device, run.amp_dtype):
                losses = run.task(run.train_model, batch)
            run.scaler.scale(losses["loss"] / run.tcfg.grad_accum_steps).backward()
        if not self._loss_dict_checked:  # once per run: the contract costs no host read
            wrong = misplaced_loss_terms(losses, run.device)
            if wrong:
                details = "; ".join(f"{k} is {v}" for k, v in sorted(wrong.items()))
                raise TypeError(
                    f"the {type(run.task).__name__} loss dict breaks the task contract: {details}"
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
        run = self.run
        scaler, optimizer = run.scaler, run.optimizer
        self.skipped_by_scaler = False
        scaler.unscale_(optimizer)
        max_norm = run.tcfg.grad_clip_norm if run.tcfg.grad_clip_norm is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if losses is not None and not self._all_finite(losses, grad_norm):
            optimizer.zero_grad(set_to_none=True)
            scaler.update()  # an fp16 scaler lowers its scale after an overflow
            return None
        scale = scaler.get_scale() if scaler.is_enabled() else None
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        # The scaler lowers its scale exactly when it skipped the step (it only ever raises it otherwise); its
        # step already read its overflow flag back to the host, so these reads wait for nothing more.
        if scale is not None and scaler.get_scale() < scale:
            self.skipped_by_scaler = True
            run.state.amp_overflow_steps += 1
            return None
        if run.ema is not None:
            run.ema.update(run.model)
        run.scheduler.step()
        run.state.global_step += 1
        return grad_norm

    def step_flags(self, losses: list[dict[str, torch.Tensor]], grad_norm: torch.Tensor) -> torch.Tensor:
        """[non-finite step, stop requested] as floats on the device, max-reduced over ranks so every rank
        skips (and stops) together; no host read happens here."""
        total = torch.stack([d["loss"].detach().float() for d in losses]).sum()
        bad = ~torch.isfinite(total)
        if not self.run.scaler.is_enabled():  # with fp16, inf gradients are the scaler's business
            bad = bad | ~torch.isfinite(grad_norm)
        stop = torch.full((), float(self.run.stop_requested_locally()), device=bad.device)
        return distributed.all_reduce_max_(torch.stack([bad.float(), stop]))

    def _all_finite(self, losses: list[dict[str, torch.Tensor]], grad_norm: torch.Tensor) -> bool:
        bad, stop = self.step_flags(losses, grad_norm).tolist()  # the step's one host read
        self.stop_agreed = bool(stop)
        return not bool(bad)

    def note_finite(self) -> None:
        """A step was taken: the count of non-finite steps in a row starts again."""
        self.consecutive_nonfinite = 0

    def note_nonfinite(self, epoch: int) -> None:
        """A step skipped as non-finite: counted; `max_nonfinite_steps` in a row raise NonFiniteLossError."""
        state = self.run.state
        state.nonfinite_steps += 1
        self.consecutive_nonfinite += 1
        k = self.run.tcfg.max_nonfinite_steps
        log.warning(
            "epoch %d, step %d: non-finite loss or gradient; step skipped (%d in a row, %d in total; stop at %d)",
            epoch + 1, state.global_step + 1, self.consecutive_nonfinite, state.nonfinite_steps, k,
        )  # fmt: skip
        if self.consecutive_nonfinite >= k:
            last = self.run.ckpt_dir / "last.pth"
            kept = (
                f"the last good checkpoint {last} is kept"
                if last.is_file()
                else "no checkpoint was written yet"
            )
            raise NonFiniteLossError(
                f"the loss or gradients were NaN/inf in {k} optimizer steps in a row (epoch {epoch + 1}, step "
                f"{state.global_step + 1}); {kept}. Lower training.lr, check the data, or set training.amp=off"
            )
