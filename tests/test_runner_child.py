"""The runner's child process: the training CLI as a module, importable from the runner's environment alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdlab.config.loader import CONFIGS_ENV, resolve_config
from kdlab.experiments.child_run import child_command, child_env
from kdlab.experiments.plan import PlannedRun


def test_the_child_is_the_training_module_not_a_script_path(tmp_path: Path) -> None:
    run = PlannedRun("quickstart_baseline", "quickstart_baseline", ["training.lr=0.1"], resolve_config(
        "quickstart_baseline", [], {}
    ))  # fmt: skip
    command = child_command(run, ["--epochs", "1"], tmp_path / "teacher.pth", "auto")
    assert command == [
        sys.executable, "-m", "kdlab.cli.train", "--config", "quickstart_baseline", "--no_progress",
        "--set", "training.lr=0.1", "--epochs", "1", "--teacher_checkpoint", str(tmp_path / "teacher.pth"),
        "--resume", "auto",
    ]  # fmt: skip


def test_the_child_runs_outside_the_checkout_with_only_the_runners_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.delenv(CONFIGS_ENV, raising=False)
    env = child_env()
    assert env["PYTHONUNBUFFERED"] == "1"
    proc = subprocess.run(
        [sys.executable, "-m", "kdlab.cli.train", "--list_configs"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "quickstart_teacher" in proc.stdout  # the checkout's configs/, found from another directory
    bad = subprocess.run(
        [sys.executable, "-m", "kdlab.cli.train", "--no_such_flag"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")


def test_child_env_keeps_an_existing_pythonpath_after_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import kdlab

    monkeypatch.setenv("PYTHONPATH", "/some/where")
    parts = child_env()["PYTHONPATH"].split(os.pathsep)
    assert parts == [str(Path(kdlab.__file__).resolve().parent.parent), "/some/where"]
