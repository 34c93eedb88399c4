"""Trainer options of issue 19: LR schedules, the monitored metric, early stopping and top-k checkpoints.

A Trainer is built directly around a linear model and a scripted evaluator (the validation value of each
epoch is fixed in advance), so every test runs in well under a second."""

from __future__ import annotations

import gc
import json
import logging
import math
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

from kdlab.checkpoints import load_checkpoint
from kdlab.cli.common import run_cli
from kdlab.cli.train import main as train_main
from kdlab.config.schema import ExperimentConfig, TrainingConfig
from kdlab.engine.monitor import TopK, default_mode
from kdlab.engine.optim import build_scheduler
from kdlab.engine.trainer import Trainer
from kdlab.evaluate.classification_metrics import ClassificationMetrics
from kdlab.evaluate.metrics import SegmentationMetrics
from kdlab.tasks import get_task
from tests.helpers import error_lines, tiny_args

STEPS_PER_EPOCH = 2


class RecordingTask:
    """Squared error of a linear model; records the LR of every optimizer step it is used for."""

    def __init__(self) -> None:
        self.trainer: Trainer | None = None
        self.lrs: list[float] = []

    def __call__(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        self.lrs.append(self.trainer.optimizer.param_groups[0]["lr"])
        return {"loss": ((model(batch["inputs"]) - batch["targets"]) ** 2).mean()}


class ScriptedEvaluator:
    """Reports `values[epoch - 1]` as `acc` for the epoch the trainer just finished."""

    def __init__(self, values: list[float], name: str = "acc") -> None:
        self.values, self.name = values, name
        self.trainer: Trainer | None = None

    def __call__(self, model: nn.Module, desc: str = "val") -> tuple[dict[str, float], None]:
        return {self.name: self.values[self.trainer.state.epoch - 1]}, None


def _batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"inputs": torch.randn(4, 3, generator=g), "targets": torch.randn(4, 1, generator=g)}
            for _ in range(STEPS_PER_EPOCH)]  # fmt: skip


def _trainer(run_dir: Path, values: list[float], best_metric: str = "acc", **training) -> Trainer:
    options = {"epochs": len(values), "lr": 1.0, "warmup_epochs": 0.0, "channels_last": False, "amp": "off",
               "checkpoint_every_steps": None, "save_every": 1, "grad_clip_norm": None, "device": "cpu",
               **training}  # fmt: skip
    cfg = ExperimentConfig(training=TrainingConfig(**options))
    torch.manual_seed(0)
    task, evaluator = RecordingTask(), ScriptedEvaluator(values, best_metric)
    trainer = Trainer(cfg, nn.Linear(3, 1), task, _batches(), evaluator, run_dir, torch.device("cpu"),
                      show_progress=False, best_metric=best_metric)  # fmt: skip
    task.trainer = evaluator.trainer = trainer
    return trainer


def _factors(cfg: TrainingConfig, steps: int) -> list[float]:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, cfg, STEPS_PER_EPOCH)
    return [sched.lr_lambdas[0](s) for s in range(steps)]


# ------------------------------------------------------------------------------------------ schedules
def test_step_schedule_halves_every_lr_step_size_epochs_after_the_warm_up():
    cfg = TrainingConfig(epochs=10, warmup_epochs=1.0, lr_schedule="step", lr_step_size=2, lr_gamma=0.5)
    # warm-up 2 steps (0.5, 1.0); then 1 for epochs 0-1 (steps 0-3), 0.5 for epochs 2-3, 0.25 for 4-5
    assert _factors(cfg, 12) == [0.5, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25]


def test_constant_schedule_is_one_after_the_warm_up():
    cfg = TrainingConfig(epochs=3, warmup_epochs=1.5, lr_schedule="constant")
    assert _factors(cfg, 6) == [1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0]


def test_cosine_schedule_is_todays_warm_up_and_cosine():
    cfg = TrainingConfig(epochs=10, warmup_epochs=1.0, min_lr_ratio=0.1)
    assert cfg.lr_schedule == "cosine"
    f = _factors(cfg, 20)
    # total 20 steps, warm-up 2: half-way through the remaining 18 steps (step 11) the factor is the midpoint
    assert f[:3] == [0.5, 1.0, 1.0]
    assert f[11] == pytest.approx(0.1 + 0.9 * 0.5)
    assert f[19] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 17 / 18)))


def test_plateau_multiplies_the_lr_by_gamma_after_patience_validations_without_improvement(tmp_path):
    values = [0.5, 0.6, 0.6, 0.55, 0.7, 0.7]
    trainer = _trainer(tmp_path, values, lr_schedule="plateau", lr_patience=2, lr_gamma=0.5)
    trainer.fit()
    # epochs 3 and 4 do not improve on 0.6: the LR halves after epoch 4; epoch 6 alone is one bad validation
    assert trainer.task.lrs == [1.0] * 8 + [0.5] * 4
    assert (trainer.monitor.plateau.factor, trainer.monitor.plateau.bad, trainer.monitor.plateau.best) == (
        0.5,
        1,
        0.7,
    )


def test_a_plateau_reduction_is_reported_at_once_and_survives_a_checkpoint_round_trip(tmp_path):
    """The LR drops for the step right after the validation that reduced it: the optimizer, get_last_lr() and
    the scheduler state saved in last.pth all say so, and a trainer resumed from that last.pth does too."""
    values = [0.5, 0.4, 0.4]  # epochs 2 and 3 do not improve: the LR halves after epoch 3, the last one
    trainer = _trainer(tmp_path / "run", values, lr_schedule="plateau", lr_patience=2, lr_gamma=0.5)
    trainer.fit()
    assert trainer.task.lrs == [1.0] * 6 and trainer.monitor.plateau.factor == 0.5
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [0.5, 0.5]
    assert trainer.scheduler.get_last_lr() == [0.5, 0.5]
    payload = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pth")
    assert payload["scheduler_state_dict"]["_last_lr"] == [0.5, 0.5]
    resumed = _trainer(tmp_path / "resumed", values, lr_schedule="plateau", lr_patience=2, lr_gamma=0.5)
    resumed.resume_from(tmp_path / "run" / "checkpoints" / "last.pth")
    assert resumed.scheduler.get_last_lr() == [0.5, 0.5] and resumed.monitor.plateau.factor == 0.5
    assert [g["lr"] for g in resumed.optimizer.param_groups] == [0.5, 0.5]


@pytest.mark.parametrize("schedule", ["cosine", "step", "plateau", "constant"])
def test_resume_mid_schedule_is_bit_identical(tmp_path, schedule):
    values = [0.5, 0.6, 0.6, 0.6, 0.7, 0.65]
    opts = {
        "lr_schedule": schedule,
        "lr_step_size": 2,
        "lr_gamma": 0.5,
        "lr_patience": 2,
        "warmup_epochs": 1.0,
    }
    full = _trainer(tmp_path / "full", values, **opts)
    full.fit()
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    resumed = _trainer(tmp_path / "resumed", values, **opts)
    resumed.resume_from(tmp_path / "resumed" / "checkpoints" / "checkpoint_epoch_0003.pth")
    resumed.fit()
    assert resumed.task.lrs == full.task.lrs[3 * STEPS_PER_EPOCH :]
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert resumed.monitor.plateau == full.monitor.plateau and resumed.monitor.top_k == full.monitor.top_k


@pytest.mark.parametrize("schedule", ["cosine", "step", "plateau", "constant"])
def test_more_epochs_on_resume_never_raise_the_lr(tmp_path, schedule):
    values = [0.5, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4]
    opts = {"lr_schedule": schedule, "lr_step_size": 1, "lr_gamma": 0.5, "lr_patience": 1}
    short = _trainer(tmp_path, values[:4], **opts)
    short.fit()
    longer = _trainer(tmp_path, values, **opts)
    longer.resume_from(tmp_path / "checkpoints" / "last.pth")
    longer.fit()
    lrs = short.task.lrs + longer.task.lrs
    assert all(b <= a for a, b in zip(lrs, lrs[1:], strict=False)), lrs
    assert len(longer.task.lrs) == 4 * STEPS_PER_EPOCH


# ------------------------------------------------------------------------------------------ monitor
def test_default_mode_follows_the_metric_name():
    assert [default_mode(m) for m in ("top1", "target_iou", "loss", "val_loss", "ece")] == [
        "max", "max", "min", "min", "min"
    ]  # fmt: skip


def test_a_min_monitor_picks_the_lowest_value(tmp_path):
    trainer = _trainer(tmp_path, [0.9, 0.3, 0.5], best_metric="acc", monitor=None, mode="min")
    summary = trainer.fit()
    assert (summary["best_epoch"], summary["best_metric"], summary["best_metric_mode"]) == (2, 0.3, "min")
    assert load_checkpoint(tmp_path / "checkpoints" / "best_model.pth")["epoch"] == 2


def test_metric_names_are_what_the_evaluators_report():
    seg = SegmentationMetrics()
    seg.update(torch.randn(1, 3, 4, 4), torch.randint(0, 3, (1, 4, 4)))
    assert set(get_task("segmentation").metric_names(ExperimentConfig())) == set(seg.compute()) - {"num_rois"}
    cls_cfg = ExperimentConfig.model_validate(
        {"task": "classification", "model": {"name": "resnet18", "num_classes": 10}}
    )
    metrics = ClassificationMetrics(10)
    metrics.update(torch.randn(8, 10), torch.randint(0, 10, (8,)))
    assert set(get_task("classification").metric_names(cls_cfg)) == set(metrics.compute())


def test_unknown_monitor_is_one_error_line_before_anything_is_written(tmp_path, capsys):
    code = run_cli(train_main, tiny_args(tmp_path, "training.monitor=top1"))
    assert code == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "training.monitor" in errors[0] and "target_iou" in errors[0]
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------ early stopping
def test_early_stopping_ends_the_run_cleanly_at_the_right_epoch(tmp_path, caplog):
    values = [0.5, 0.6, 0.6, 0.59, 0.6, 0.9, 0.9, 0.9, 0.9, 0.9]
    trainer = _trainer(tmp_path, values, early_stopping_patience=3)
    with caplog.at_level(logging.INFO, logger="kdlab.engine"):
        summary = trainer.fit()
    assert summary["status"] == "completed" and summary["epochs_completed"] == 5
    assert summary["stopped_early"] == {"epoch": 5, "best_epoch": 2}
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["stopped_early"] == {"epoch": 5, "best_epoch": 2} and on_disk["status"] == "completed"
    assert "stopped early at epoch 5 (best 2)" in caplog.text
    assert len(trainer.task.lrs) == 5 * STEPS_PER_EPOCH


def test_min_delta_counts_tiny_gains_as_no_improvement(tmp_path):
    values = [0.5, 0.501, 0.502, 0.503, 0.9]
    summary = _trainer(tmp_path, values, early_stopping_patience=2, early_stopping_min_delta=0.01).fit()
    assert summary["stopped_early"] == {"epoch": 3, "best_epoch": 3}


def test_no_early_stop_is_reported_when_the_patience_runs_out_at_the_last_epoch(tmp_path):
    summary = _trainer(tmp_path, [0.5, 0.4, 0.4], early_stopping_patience=2).fit()
    assert summary["stopped_early"] is None and summary["epochs_completed"] == 3


def test_the_patience_counter_survives_resume(tmp_path):
    values = [0.5, 0.6, 0.6, 0.59, 0.6, 0.9, 0.9, 0.9, 0.9, 0.9]
    _trainer(tmp_path / "full", values, early_stopping_patience=3).fit()
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    resumed = _trainer(tmp_path / "resumed", values, early_stopping_patience=3)
    resumed.resume_from(tmp_path / "resumed" / "checkpoints" / "checkpoint_epoch_0004.pth")
    assert resumed.monitor.early_stopping.bad == 2
    summary = resumed.fit()  # a counter reset to 0 would train on to epoch 6 and see 0.9
    assert summary["stopped_early"] == {"epoch": 5, "best_epoch": 2}
    assert len(resumed.task.lrs) == STEPS_PER_EPOCH
    again = _trainer(tmp_path / "resumed", values, early_stopping_patience=3)
    again.resume_from(tmp_path / "resumed" / "checkpoints" / "last.pth")
    assert again.fit()["stopped_early"] == {"epoch": 5, "best_epoch": 2} and again.task.lrs == []


# ------------------------------------------------------------------------------------------ top-k
def _files(ckpt: Path) -> dict[str, int]:
    return {p.name: load_checkpoint(p)["epoch"] for p in sorted(ckpt.glob("best_model*.pth"))}


def test_top_k_keeps_the_k_best_ranked_and_deletes_the_rest(tmp_path):
    values = [0.5, 0.7, 0.6, 0.8, 0.4, 0.65]
    trainer = _trainer(tmp_path, values[:4], save_top_k=3)
    trainer.fit()
    ckpt = tmp_path / "checkpoints"
    # epoch 4 is the new best: 2 -> top2, 3 -> top3, epoch 1 falls out
    assert _files(ckpt) == {"best_model.pth": 4, "best_model_top2.pth": 2, "best_model_top3.pth": 3}
    longer = _trainer(tmp_path, values, save_top_k=3)
    longer.resume_from(ckpt / "last.pth")
    summary = longer.fit()
    # epoch 5 (0.4) is not kept; epoch 6 (0.65) takes rank 3 and epoch 3 falls out
    assert _files(ckpt) == {"best_model.pth": 4, "best_model_top2.pth": 2, "best_model_top3.pth": 6}
    assert [(e["epoch"], e["value"], e["file"]) for e in summary["top_k"]] == [
        (4, 0.8, "best_model.pth"), (2, 0.7, "best_model_top2.pth"), (6, 0.65, "best_model_top3.pth")
    ]  # fmt: skip
    assert not list(ckpt.glob("*.tmp*"))


def test_default_top_1_writes_only_best_model(tmp_path):
    _trainer(tmp_path, [0.5, 0.7, 0.6]).fit()
    assert _files(tmp_path / "checkpoints") == {"best_model.pth": 2}


def test_top_k_ties_rank_after_the_earlier_epoch_and_min_mode_ranks_low_first():
    top = TopK(2)
    for epoch, value in enumerate([0.3, 0.3, 0.1], start=1):
        rank = top.rank_of(value, "min")
        if rank is not None:
            top.insert(epoch, value, rank, None)
    assert [(e["epoch"], e["file"]) for e in top.entries] == [
        (3, "best_model.pth"),
        (1, "best_model_top2.pth"),
    ]
    assert top.rank_of(float("nan"), "min") is None


# ------------------------------------------------------------------------------------------ report
def test_report_best_epoch_follows_the_monitor_and_stays_on_the_headline_by_default():
    from kdlab.experiments.report.collect import _best_epoch_row, _monitored

    rows = [
        {"epoch": "1", "val_miou": "0.5", "val_loss": "0.9"},
        {"epoch": "2", "val_miou": "0.4", "val_loss": "0.3"},
    ]
    assert _monitored({}, {"training": {"monitor": None}}, "miou") == ("miou", "max")
    assert _best_epoch_row(rows, None, *_monitored({}, {"training": {}}, "miou"))["epoch"] == "1"
    summary, config = {"best_metric_mode": "min"}, {"training": {"monitor": "loss", "mode": None}}
    assert _best_epoch_row(rows, None, *_monitored(summary, config, "miou"))["epoch"] == "2"
    assert (
        _best_epoch_row(rows, 1, *_monitored(summary, config, "miou"))["epoch"] == "1"
    )  # summary's best_epoch


@pytest.mark.parametrize("schedule", ["cosine", "plateau"])
def test_the_trainer_is_freed_by_reference_counting(tmp_path, schedule):
    """No part of the trainer (steps, checkpoints, the scheduler's lambdas) refers back to it: a cycle would leave
    it, and its loader's persistent workers, to the garbage collector, and a run stopped by SIGTERM would hang at
    exit joining workers that ignore SIGTERM (tests/test_crash_resume.py, the process-group test)."""
    cfg = ExperimentConfig(training=TrainingConfig(epochs=1, lr_schedule=schedule, device="cpu", amp="off"))
    gc.disable()
    try:
        trainer = Trainer(cfg, nn.Linear(3, 1), RecordingTask(), _batches(), ScriptedEvaluator([0.5]), tmp_path,
                          torch.device("cpu"), show_progress=False, best_metric="acc")  # fmt: skip
        ref = weakref.ref(trainer)
        del trainer
        assert ref() is None
    finally:
        gc.enable()
