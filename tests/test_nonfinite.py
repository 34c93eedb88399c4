"""Non-finite losses: a NaN/inf step is skipped and counted; K in a row stop the run with one clear line and
the last good checkpoint kept."""

from __future__ import annotations

import hashlib
import json

import torch

from kdlab.cli.common import run_cli
from kdlab.cli.train import main as train_main
from kdlab.tasks.segmentation import SegmentationTask
from tests.helpers import error_lines, tiny_args


def _poison(monkeypatch, bad_calls):
    """Make the task's loss NaN on the given (1-based) calls."""
    real = SegmentationTask.__call__
    calls = {"n": 0}

    def poisoned(self, model, batch):
        calls["n"] += 1
        losses = real(self, model, batch)
        if bad_calls(calls["n"]):
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(SegmentationTask, "__call__", poisoned)


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    _poison(monkeypatch, lambda n: n in (2, 3))
    assert run_cli(train_main, tiny_args(tmp_path, "training.checkpoint_every_steps=1", epochs=2)) == 0
    run = tmp_path / "runs" / "quickstart_baseline"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["timings"]["nonfinite_steps_skipped"] == 2
    # 8 images, batch 4: 2 batches per epoch, 4 in all; the 2 poisoned ones did not step.
    last = torch.load(run / "checkpoints" / "last.pth", map_location="cpu", weights_only=True)
    assert last["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in last["model_state_dict"].values() if v.is_floating_point())
    assert summary["final_metrics"]["target_iou"] is not None


def test_consecutive_nonfinite_steps_stop_the_run_and_keep_the_last_good_checkpoint(
    tmp_path, monkeypatch, capsys
):
    args = tiny_args(
        tmp_path, "training.checkpoint_every_steps=1", "training.max_nonfinite_steps=2", epochs=3
    )
    _poison(monkeypatch, lambda n: n >= 3)  # steps 1 and 2 fine (epoch 1), then NaN forever
    assert run_cli(train_main, args) == 1
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "NaN/inf in 2 optimizer steps in a row" in errors[0]
    assert "last.pth is kept" in errors[0]
    run = tmp_path / "runs" / "quickstart_baseline"
    last = run / "checkpoints" / "last.pth"
    payload = torch.load(last, map_location="cpu", weights_only=True)
    assert payload["global_step"] == 2 and payload["epoch"] == 1
    assert json.loads((run / "summary.json").read_text())["status"] == "failed"
    digest = hashlib.sha256(last.read_bytes()).hexdigest()
    # A resume that fails the same way leaves the good checkpoint exactly as it was.
    assert run_cli(train_main, ["--resume", str(last), "--no_progress"]) == 1
    assert hashlib.sha256(last.read_bytes()).hexdigest() == digest
