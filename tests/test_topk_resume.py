"""Top-k checkpoints after a crash at an epoch end: between shifting the `best_model*.pth` files down a rank
(and writing the new one) and saving that epoch's last.pth. The resumed run rebuilds its top-k list from the
files on disk (each holds its epoch and monitored value); files of epochs after the resumed one are removed,
as that epoch is trained and ranked again. In the end files and list agree with an uninterrupted run.

A Trainer is built directly around a linear model and a scripted evaluator (as in test_trainer_options.py),
and the crash is an exception raised at the exact point: what the files on disk hold then is what a SIGKILL
there leaves (no checkpoint is written on the way out).
"""

from __future__ import annotations

import os
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from kdlab.checkpoints import load_checkpoint
from kdlab.config.schema import ExperimentConfig, TrainingConfig
from kdlab.engine import monitor
from kdlab.engine.monitor import TopK
from kdlab.engine.trainer import Trainer

VALUES = [0.5, 0.7, 0.6, 0.8, 0.4, 0.65]  # epoch 4 is a new best: every file shifts down one rank
CRASH_EPOCH = 4


class _Killed(BaseException):
    """Stands in for SIGKILL: nothing catches it, and no checkpoint is written after it."""


class _Task:
    def __call__(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        return {"loss": ((model(batch["inputs"]) - batch["targets"]) ** 2).mean()}


class _Evaluator:
    def __init__(self) -> None:
        self.trainer: Trainer | None = None

    def __call__(self, model: nn.Module, desc: str = "val") -> tuple[dict[str, float], None]:
        return {"acc": VALUES[self.trainer.state.epoch - 1]}, None


def _trainer(run_dir: Path) -> Trainer:
    cfg = ExperimentConfig(training=TrainingConfig(
        epochs=len(VALUES), lr=0.1, warmup_epochs=0.0, channels_last=False, amp="off", checkpoint_every_steps=None,
        save_every=100, grad_clip_norm=None, device="cpu", save_top_k=3,
    ))  # fmt: skip
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batches = [{"inputs": torch.randn(4, 3, generator=g), "targets": torch.randn(4, 1, generator=g)}
               for _ in range(2)]  # fmt: skip
    evaluator = _Evaluator()
    trainer = Trainer(cfg, nn.Linear(3, 1), _Task(), batches, evaluator, run_dir, torch.device("cpu"),
                      show_progress=False, best_metric="acc")  # fmt: skip
    evaluator.trainer = trainer
    return trainer


def _crash_after_shift(monkeypatch) -> None:
    """Killed right after the files moved down a rank, before the new best_model.pth is written."""
    real = TopK.insert

    def insert(self, epoch, value, rank, ckpt_dir):
        renames = real(self, epoch, value, rank, ckpt_dir)
        if epoch == CRASH_EPOCH:
            raise _Killed
        return renames

    monkeypatch.setattr(TopK, "insert", insert)


def _crash_after_best_write(monkeypatch) -> None:
    """Killed after the shift and the new best_model.pth, before the epoch's last.pth."""
    real = Trainer._follow_monitor

    def follow(self, epoch, value, last_epoch):
        real(self, epoch, value, last_epoch)
        if epoch + 1 == CRASH_EPOCH:
            raise _Killed

    monkeypatch.setattr(Trainer, "_follow_monitor", follow)


def _crash_mid_shift(monkeypatch) -> None:
    """Killed between two renames of the shift (top2 -> top3 done, best_model -> top2 not)."""
    renames = {"n": 0}

    def replace(src, dst):
        os.replace(src, dst)
        renames["n"] += 1
        if renames["n"] == 3:  # epochs 2 and 3 shifted once each; this is epoch 4's first rename
            raise _Killed

    monkeypatch.setattr(monitor, "os", types.SimpleNamespace(replace=replace))


def _on_disk(ckpt: Path) -> dict[str, tuple[int, float]]:
    found = {}
    for path in sorted(ckpt.glob("best_model*.pth")):
        payload = load_checkpoint(path)
        found[path.name] = (int(payload["epoch"]), float(payload["monitor"]["value"]))
    return found


@pytest.mark.parametrize("crash", [_crash_after_shift, _crash_after_best_write, _crash_mid_shift],
                         ids=["after_shift", "after_best_write", "mid_shift"])  # fmt: skip
def test_top_k_files_and_list_agree_after_a_crash_between_the_shift_and_last_pth(
    tmp_path, monkeypatch, crash
):
    reference = _trainer(tmp_path / "reference").fit()
    expected = [(4, 0.8, "best_model.pth"), (2, 0.7, "best_model_top2.pth"), (6, 0.65, "best_model_top3.pth")]
    assert [(e["epoch"], e["value"], e["file"]) for e in reference["top_k"]] == expected

    run = tmp_path / "run"
    crash(monkeypatch)
    with pytest.raises(_Killed):
        _trainer(run).fit()
    monkeypatch.undo()
    ckpt = run / "checkpoints"
    assert load_checkpoint(ckpt / "last.pth")["epoch"] == CRASH_EPOCH - 1  # the crash came before it

    resumed = _trainer(run)
    resumed.resume_from(ckpt / "last.pth")
    # Right after the resume the list is what the files hold: epoch 4's file is gone (that epoch is trained
    # again), epoch 1's was replaced in the shift, and epochs 2 and 3 are back under their ranks' names.
    assert [(e["epoch"], e["value"], e["file"]) for e in resumed.monitor.top_k.entries] == [
        (2, 0.7, "best_model.pth"), (3, 0.6, "best_model_top2.pth")
    ]  # fmt: skip
    assert {e["file"]: (e["epoch"], e["value"]) for e in resumed.monitor.top_k.entries} == _on_disk(ckpt)
    assert (resumed.state.best_epoch, resumed.state.best_metric) == (2, 0.7)
    summary = resumed.fit()

    assert summary["status"] == "completed"
    listed = {e["file"]: (e["epoch"], e["value"]) for e in summary["top_k"]}
    assert listed == _on_disk(ckpt)  # every listed file holds its listed epoch and value, and no other file
    assert [(e["epoch"], e["value"], e["file"]) for e in summary["top_k"]] == expected
    assert (summary["best_epoch"], summary["best_metric"]) == (4, 0.8)  # best_model.pth is the best
    for name in listed:  # and each file is what the uninterrupted run kept under that name
        ref = load_checkpoint(tmp_path / "reference" / "checkpoints" / name)["model_state_dict"]
        got = load_checkpoint(ckpt / name)["model_state_dict"]
        assert all(torch.equal(ref[k], got[k]) for k in ref), name
