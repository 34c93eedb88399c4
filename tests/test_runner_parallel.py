"""The runner as a real process: killed mid-suite and resumed, and the same suite through submitit's local
executor (the Slurm code path without a cluster). Tiny digits runs on the CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdlab.cli.common import run_cli
from kdlab.cli.experiments import main as experiments_main
from kdlab.experiments.run_lock import run_dir_holder
from tests.test_runner import DIGITS_TINY, _started_at, digits_args

ROOT = Path(__file__).resolve().parents[1]
SEEDS = ("3", "4", "5")


def _runner(out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "run_experiments.py"), "--configs", "digits_student_baseline",
            "--seeds", *SEEDS, "--epochs", "8", "--batch_size", "32", "--device", "cpu", "--output_dir", str(out),
            "--no_export", "--set", *DIGITS_TINY, *extra]  # fmt: skip


def _progress(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "logs" / "progress.json").read_text())
    except (OSError, ValueError):
        return None


def test_a_runner_killed_mid_suite_resumes_without_retraining_what_finished(tmp_path):
    out = tmp_path / "runs"
    first, second, third = (out / f"digits_student_baseline__seed-{s}" for s in SEEDS)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runner = subprocess.Popen(
        _runner(out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # the second run is training (past its first epoch)
            prog = _progress(second)
            if prog is not None and prog["epoch"] >= 2 and (second / "checkpoints" / "last.pth").is_file():
                break
            assert runner.poll() is None, runner.stderr.read()
            time.sleep(0.05)
        else:
            pytest.fail("the second run never reached epoch 2")
        runner.send_signal(signal.SIGKILL)
        runner.wait()
    finally:
        if runner.poll() is None:
            runner.kill()
    # The orphaned child got SIGTERM from the kernel (parent-death signal): it saves last.pth and lets go.
    deadline = time.monotonic() + 120
    while run_dir_holder(second) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert run_dir_holder(second) is None
    recorded = {r["name"]: r["status"] for r in json.loads((out / "experiment_runs.json").read_text())}
    assert recorded == {
        first.name: "completed"
    }  # written as the first run ended; the runner never got further
    assert json.loads((second / "summary.json").read_text())["status"] == "interrupted"
    assert not third.exists()
    first_last = (first / "checkpoints" / "last.pth").stat().st_mtime_ns
    stopped_at = json.loads((second / "summary.json").read_text())["epochs_completed"]

    resumed = subprocess.run(_runner(out, "--resume"), capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    runs = {r["name"]: r for r in json.loads((out / "experiment_runs.json").read_text())}
    assert [runs[d.name]["status"] for d in (first, second, third)] == ["completed"] * 3
    assert f"{first.name}: already trained to 8 epochs; not rerun" in resumed.stderr
    assert (first / "checkpoints" / "last.pth").stat().st_mtime_ns == first_last
    second_log = (second / "logs" / "stdout.txt").read_text()
    assert f"resumed from {second / 'checkpoints' / 'last.pth'} at epoch {stopped_at}" in second_log
    assert second_log.count("# kdlab runner: ") == 2  # the killed runner's part of the log is kept
    assert "--resume auto: no" in (third / "logs" / "stdout.txt").read_text()  # it started from scratch
    for run in (second, third):
        assert json.loads((run / "summary.json").read_text())["epochs_completed"] == 8


def test_submitit_local_executor_runs_a_teacher_then_its_student(tmp_path, capsys):
    pytest.importorskip("submitit")
    out = tmp_path / "runs"
    args = ["--configs", "digits_teacher", "digits_student_distill", "--executor", "submitit_local",
            *digits_args(out)]  # fmt: skip
    assert run_cli(experiments_main, args) == 0
    runs = {r["name"]: r for r in json.loads((out / "experiment_runs.json").read_text())}
    assert {n: r["status"] for n, r in runs.items()} == {
        "digits_teacher": "completed", "digits_student_distill": "completed",
    }  # fmt: skip
    command = runs["digits_student_distill"]["command"]
    teacher_best = out / "digits_teacher" / "checkpoints" / "best_model.pth"
    assert command[command.index("--teacher_checkpoint") + 1] == str(teacher_best)
    student = out / "digits_student_distill"
    assert _started_at(student) >= (out / "digits_teacher" / "summary.json").stat().st_mtime - 0.01
    assert "as a submitit local job" in (student / "logs" / "stdout.txt").read_text().splitlines()[0]
    assert list((out / ".submitit").iterdir())  # the jobs' own submitit folders
    assert "| digits_student_distill" in capsys.readouterr().out
