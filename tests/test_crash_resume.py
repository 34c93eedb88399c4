"""Crash safety: a run SIGKILLed at random moments (and inside a checkpoint write) and resumed each time ends
bit-identical to an uninterrupted run; SIGTERM saves last.pth mid-epoch and exits 143 with the resume command.

Every run here is a real `train_advanced.py` process, as on a pre-empted GPU node.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdlab.checkpoints import FAULT_ENV
from tests.helpers import assert_same_weights, tiny_args

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 3  # 12 images, batch 2: 6 optimizer steps per epoch, 18 in all
RANDOM_KILLS = 5  # plus one inside a checkpoint write and one during start-up


def _args(tmp: Path, out: str) -> list[str]:
    args = tiny_args(
        tmp,
        "data.synthetic.train_images=12",
        "training.checkpoint_every_steps=1",
        "training.num_vis_images=0",
        "training.save_every=100",
        "model.decoder_channels=32,16,16,8,8",
        epochs=EPOCHS,
    )
    args[args.index("--batch_size") + 1] = "2"
    args[args.index("--output_dir") + 1] = str(tmp / out)
    return args


def _popen(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train_advanced.py"), *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def _last(run: Path) -> Path:
    return run / "checkpoints" / "last.pth"


def _step_of(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def _wait_for_saves(proc: subprocess.Popen, last: Path, saves: int, timeout: float = 180.0) -> bool:
    """Wait until last.pth has been replaced `saves` times (one per optimizer step here) or the process
    ends; True if the saves happened. Counting saves, not seconds, keeps the kill points inside the run
    however fast or loaded the machine is."""
    seen = last.stat().st_mtime_ns if last.exists() else None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        now = last.stat().st_mtime_ns if last.exists() else None
        if now != seen:
            seen = now
            saves -= 1
            if saves <= 0:
                return True
        time.sleep(0.01)
    raise AssertionError("the training process made no progress")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crash")
    proc = _popen(_args(tmp, "reference"))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    return tmp, tmp / "reference" / "quickstart_baseline"


def test_sigkill_at_random_moments_then_resume_is_bit_identical(reference):
    tmp, ref_run = reference
    args = _args(tmp, "crashed")
    run = tmp / "crashed" / "quickstart_baseline"
    rng = random.Random(20261123)
    kill_log: list[str] = []

    # 1. Killed inside a checkpoint write: the temp file of the 3rd save (last.pth after step 2) is complete,
    #    the rename never happens.
    proc = _popen(args, env={FAULT_ENV: "3"})
    proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL
    assert list((run / "checkpoints").glob(".last.pth.tmp-*")), "the interrupted write leaves its temp file"
    kill_log.append(f"in save: last.pth at step {_step_of(_last(run))}")

    # 2. Killed during start-up, then at random steps (and a random moment within the step).
    proc = _popen(["--resume", "auto", *args])
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    kill_log.append(f"start-up: last.pth at step {_step_of(_last(run))}")
    # One random step in each of 5 windows over the 18 steps (leaving the end for the final resume).
    targets = [base + rng.randrange(2) for base in (2, 5, 8, 11, 13)][:RANDOM_KILLS]
    for target in targets:
        before = _step_of(_last(run))
        proc = _popen(["--resume", "auto", *args])
        assert _wait_for_saves(proc, _last(run), max(1, target - before)), f"finished early: {kill_log}"
        time.sleep(rng.uniform(0.0, 0.15))  # anywhere in the next step, its save included
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        kill_log.append(f"random (target step {target}): last.pth at step {_step_of(_last(run))}")

    # 3. Finish with an explicit path; leftovers of the interrupted write are gone, and the weights,
    #    optimizer and EMA-free state equal the uninterrupted run bit for bit.
    proc = _popen(["--resume", str(_last(run)), "--no_progress"])
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert not list((run / "checkpoints").glob(".*tmp-*"))
    assert_same_weights(_last(ref_run), _last(run))
    assert_same_weights(ref_run / "checkpoints" / "best_model.pth", run / "checkpoints" / "best_model.pth")
    ref = torch.load(_last(ref_run), map_location="cpu", weights_only=True)
    got = torch.load(_last(run), map_location="cpu", weights_only=True)
    assert got["global_step"] == ref["global_step"] == EPOCHS * 6
    for a, b in zip(
        ref["optimizer_state_dict"]["state"].values(),
        got["optimizer_state_dict"]["state"].values(),
        strict=True,
    ):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    print("kill points:", "; ".join(kill_log))


def test_sigterm_saves_last_pth_mid_epoch_and_prints_the_resume_command(reference):
    tmp, ref_run = reference
    args = _args(tmp, "terminated")
    args[args.index("training.checkpoint_every_steps=1")] = "training.checkpoint_every_steps=1000"
    run = tmp / "terminated" / "quickstart_baseline"
    proc = _popen(args)
    # untrained_model.pth appears right before the first step; stop a moment into epoch 1.
    untrained = run / "checkpoints" / "untrained_model.pth"
    deadline = time.monotonic() + 120
    while not untrained.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "SIGTERM" in errors[0]
    assert f"--resume {_last(run)}" in errors[0]
    payload = torch.load(_last(run), map_location="cpu", weights_only=True)
    assert payload["global_step"] >= 1
    assert payload["epoch"] * 6 + payload["batches_done"] == payload["global_step"]

    command = errors[0].split("resume with: ", 1)[1].split()
    proc = subprocess.run(
        [sys.executable, *command[1:], "--no_progress"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_weights(_last(ref_run), _last(run))


@pytest.mark.parametrize("stop_after", [3, 8])
def test_stopped_mid_epoch_and_resumed_in_process_is_bit_identical(reference, monkeypatch, stop_after):
    """A fast in-process variant: the run dies inside optimizer step `stop_after + 1` (last.pth holds step
    `stop_after`, mid-epoch), then resumes and must equal the uninterrupted subprocess run."""
    from kdlab.cli.common import run_cli
    from kdlab.cli.train import main as train_main
    from kdlab.engine.trainer import Trainer

    tmp, ref_run = reference
    out = f"stopped_{stop_after}"
    run = tmp / out / "quickstart_baseline"
    real_step = Trainer.optimizer_step
    calls = {"n": 0}

    def dying_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > stop_after:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(Trainer, "optimizer_step", dying_step)
    assert run_cli(train_main, _args(tmp, out)) == 130
    monkeypatch.setattr(Trainer, "optimizer_step", real_step)
    payload = torch.load(_last(run), map_location="cpu", weights_only=True)
    assert payload["global_step"] == stop_after and payload["batches_done"] == stop_after % 6
    assert run_cli(train_main, ["--resume", str(_last(run)), "--no_progress"]) == 0
    assert_same_weights(_last(ref_run), _last(run))
