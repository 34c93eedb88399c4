"""fp16 mixed precision: a step the GradScaler skips (inf/NaN gradients after scaling) is a step that did not
happen: no weight, LR-schedule, EMA or global_step change, and it is counted and reported.

A Trainer is built around a linear model with a CPU GradScaler (the fp16 scaler's logic is the same on every
device); the loss is finite but large enough that its scaled gradients overflow, as fp16 gradients do."""

from __future__ import annotations

import torch
from torch import nn

from kdlab.config.schema import ExperimentConfig, TrainingConfig
from kdlab.engine.trainer import Trainer


class ScaledLoss:
    """Squared error times `factor[0]`: 1e35 makes the loss finite and its 65536-scaled gradients inf."""

    name = "scaled"

    def __init__(self) -> None:
        self.factor = [1.0]

    def __call__(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        return {"loss": ((model(batch["inputs"]) - batch["targets"]) ** 2).mean() * self.factor[0]}


def _trainer(tmp_path) -> tuple[Trainer, ScaledLoss, dict]:
    cfg = ExperimentConfig(training=TrainingConfig(
        epochs=1, lr=0.1, warmup_epochs=0.0, amp="off", channels_last=False, grad_clip_norm=None, device="cpu",
        ema={"enabled": True, "decay": 0.5},
    ))  # fmt: skip
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batch = {"inputs": torch.randn(4, 3, generator=g), "targets": torch.randn(4, 1, generator=g)}
    task = ScaledLoss()
    trainer = Trainer(cfg, nn.Linear(3, 1), task, [batch] * 4, lambda m, desc="val": ({}, None), tmp_path,
                      torch.device("cpu"), show_progress=False)  # fmt: skip
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)  # what amp=fp16 gives on CUDA
    return trainer, task, batch


def _snapshot(trainer: Trainer) -> dict:
    return {
        "weights": [p.detach().clone() for p in trainer.model.parameters()],
        "ema": [p.detach().clone() for p in trainer.ema.module.parameters()],
        "lr": trainer.optimizer.param_groups[0]["lr"],
        "scheduler_epoch": trainer.scheduler.last_epoch,
        "global_step": trainer.state.global_step,
    }


def test_an_overflow_step_changes_nothing_and_is_counted(tmp_path):
    trainer, task, batch = _trainer(tmp_path)
    losses = [trainer.forward_backward(batch)]
    assert trainer.optimizer_step(losses) is not None  # a normal step first: the EMA and LR have moved
    before = _snapshot(trainer)
    task.factor[0] = 1e35
    losses = [trainer.forward_backward(batch)]
    assert torch.isfinite(losses[0]["loss"])  # the loss is fine; its scaled gradients are not
    assert trainer.optimizer_step(losses) is None
    after = _snapshot(trainer)
    assert trainer.scaler.get_scale() == 2.0**15  # the scaler lowered its scale
    assert after["global_step"] == before["global_step"] == 1
    assert after["scheduler_epoch"] == before["scheduler_epoch"] and after["lr"] == before["lr"]
    assert all(torch.equal(a, b) for a, b in zip(after["weights"], before["weights"], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(after["ema"], before["ema"], strict=True))
    assert trainer.state.amp_overflow_steps == 1 and trainer.state.nonfinite_steps == 0
    task.factor[0] = 1.0  # and training goes on
    assert trainer.optimizer_step([trainer.forward_backward(batch)]) is not None
    assert trainer.state.global_step == 2


def test_overflow_steps_reach_the_summary_and_do_not_stop_the_run(tmp_path):
    """Overflow steps are the scaler's normal business (it calibrates its scale with them): counted in the
    summary and metrics.csv, never taken for the NaN streak that stops a run."""
    trainer, task, _ = _trainer(tmp_path)
    trainer.tcfg = trainer.tcfg.model_copy(update={"max_nonfinite_steps": 2})
    task.factor[0] = 1e35  # every step of the epoch overflows: 4 in a row, more than max_nonfinite_steps
    summary = trainer.fit()
    assert summary["status"] == "completed"
    assert summary["timings"]["amp_overflow_steps_skipped"] == 4
    assert summary["global_step"] == 0
    header, row = (tmp_path / "logs" / "metrics.csv").read_text().splitlines()[:2]
    assert dict(zip(header.split(","), row.split(","), strict=True))["amp_overflow_steps"] == "4"
