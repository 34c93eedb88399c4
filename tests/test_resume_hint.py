"""The resume hint printed after SIGINT/SIGTERM is the command line the run was started with, with
`--resume <last.pth>`: under torchrun a torchrun line, for `kdlab-train` users `kdlab-train`, never a
hard-coded `python train_advanced.py`."""

from __future__ import annotations

import shlex
import signal
from pathlib import Path

import pytest

LAST = Path("/runs/my run/checkpoints/last.pth")
PY = "/home/u/.venv/bin/python3"


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        ([PY, "train_advanced.py", "--config", "people_b0_from_b3", "--epochs", "50"], {},
         ["python3", "train_advanced.py", "--config", "people_b0_from_b3", "--epochs", "50"]),
        ([PY, "-u", "-m", "kdlab.cli.train", "--config", "c", "--resume", "auto", "--overwrite"], {},
         ["python3", "-m", "kdlab.cli.train", "--config", "c"]),
        ([PY, "/home/u/.venv/bin/kdlab-train", "--config", "c", "--resume=old.pth"], {},
         ["kdlab-train", "--config", "c"]),
        ([PY, "-u", "train_advanced.py", "--config", "c"],
         {"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "8"},
         ["torchrun", "--nnodes=2", "--nproc_per_node=4", "train_advanced.py", "--config", "c"]),
        ([PY, "-u", "-m", "kdlab.cli.train", "--config", "c"],
         {"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "2"},
         ["torchrun", "--nproc_per_node=2", "-m", "kdlab.cli.train", "--config", "c"]),
    ],
)  # fmt: skip
def test_the_hint_is_the_launch_command_with_resume(argv, env, expected):
    from kdlab.engine.launch import resume_command

    hint = resume_command(LAST, argv=argv, environ=env)
    assert shlex.split(hint) == [*expected, "--resume", str(LAST)]


def test_a_real_interrupted_run_prints_its_own_command(tmp_path, monkeypatch):
    """The trainer's stop message carries the hint of this process (here: pytest's argv stands in)."""
    import sys

    from kdlab.cli.common import run_cli
    from kdlab.cli.train import main as train_main
    from kdlab.engine import trainer as trainer_mod
    from kdlab.engine.stop_signals import TrainingInterrupted
    from tests.helpers import tiny_args

    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "/opt/bin/kdlab-train", "--config", "x"])
    real_step = trainer_mod.Trainer.optimizer_step
    messages = []

    def step_then_stop(self, losses=None):
        out = real_step(self, losses)
        self._stop.signum = signal.SIGTERM  # as a SIGTERM during this step would
        return out

    monkeypatch.setattr(trainer_mod.Trainer, "optimizer_step", step_then_stop)
    real_init = TrainingInterrupted.__init__

    def record(self, signum, message):
        messages.append(message)
        real_init(self, signum, message)

    monkeypatch.setattr(TrainingInterrupted, "__init__", record)
    assert run_cli(train_main, tiny_args(tmp_path, epochs=1)) == 143
    last = tmp_path / "runs" / "quickstart_baseline" / "checkpoints" / "last.pth"
    assert messages and messages[0].endswith(f"resume with: kdlab-train --config x --resume {last}")
