"""Crash safety: a run SIGKILLed at random moments (and inside a checkpoint write) and resumed each time ends
bit-identical to an uninterrupted run; SIGTERM saves last.pth mid-epoch and exits 143 with the resume command;
SIGINT goes through the real StopSignals handler (graceful stop, and a second signal stops at once).

Every killed or terminated run is a real `train_advanced.py` process, as on a pre-empted GPU node, and so is
the uninterrupted reference they are compared with. CPU results depend on the thread count (a reduction split
over 2 threads adds in another order than over 1), so every process here runs with one thread
(OMP_NUM_THREADS=1, `THREADS`), and so do the in-process runs (`one_thread`): the guarantee under test is
same machine, same torch, same thread count (docs/reliability.md). One thread also keeps the runs fast on a
loaded machine: two OpenMP threads per process on two busy cores made a training step 10-60x slower.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdlab.checkpoints import FAULT_ENV
from kdlab.cli.common import run_cli
from kdlab.cli.train import main as train_main
from kdlab.config.loader import resolve_config
from kdlab.engine.device import check_resume_threads
from kdlab.experiments.single_run import recorded_threads
from tests.helpers import assert_same_weights, error_lines, tiny_args

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 3  # 12 images, batch 2: 6 optimizer steps per epoch, 18 in all
RANDOM_KILLS = 5  # plus one inside a checkpoint write and one during start-up
THREADS = 1  # every training process of this module, the reference included
PINNED = {"OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}


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
        env={**os.environ, **PINNED, **(env or {})},
    )


def _last(run: Path) -> Path:
    return run / "checkpoints" / "last.pth"


def _step_of(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def _wait_for_saves(
    proc: subprocess.Popen, last: Path, saves: int, timeout: float = 180.0, log: object = ""
) -> bool:
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
    proc.kill()
    proc.communicate(timeout=60)
    raise AssertionError(f"the training process saved no last.pth for {timeout:.0f} s; {log}")


def _threads_of(run: Path) -> int:
    """The CPU thread count the run's last process trained with (summary.json provenance)."""
    return json.loads((run / "summary.json").read_text())["provenance"]["threads"]


@pytest.fixture
def one_thread():
    """In-process runs compared with the reference use its thread count; the pytest process's is put back."""
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def _reference_run(tmp: Path) -> Path:
    """The uninterrupted run: a subprocess pinned like the killed ones, not the pytest process (whose thread
    settings earlier tests may have changed)."""
    proc = _popen(_args(tmp, "reference"))
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-2000:]
    run = tmp / "reference" / "quickstart_baseline"
    assert _threads_of(run) == THREADS
    return run


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crash")
    return tmp, _reference_run(tmp)


class KillLog:
    """What each kill hit (the step of last.pth it left, the process's exit) and where each run resumed: part
    of every assertion message of the SIGKILL test, so a failure says at which kill and step it happened."""

    def __init__(self, run: Path) -> None:
        self.run, self.lines = run, []

    def step(self) -> int | None:
        return _step_of(_last(self.run)) if _last(self.run).exists() else None

    def add(self, what: str, proc: subprocess.Popen, resumed_from: int | None) -> None:
        start = "started fresh" if resumed_from is None else f"resumed from step {resumed_from}"
        self.lines.append(
            f"{len(self.lines) + 1}. {what}: {start}, exit {proc.returncode}, last.pth now at step {self.step()}"
        )

    def __str__(self) -> str:
        return "kill log:\n  " + "\n  ".join(self.lines)


def _same_weights(a: Path, b: Path, log: KillLog) -> None:
    try:
        assert_same_weights(a, b)
    except AssertionError as exc:
        raise AssertionError(f"{b.name} differs from the reference at {exc}; {log}") from None


def test_sigkill_at_random_moments_then_resume_is_bit_identical(reference):
    tmp, ref_run = reference
    args = _args(tmp, "crashed")
    run = tmp / "crashed" / "quickstart_baseline"
    rng = random.Random(20261123)
    log = KillLog(run)

    # 1. Killed inside a checkpoint write: the temp file of the 3rd save (last.pth after step 2) is complete,
    #    the rename never happens.
    proc = _popen(args, env={FAULT_ENV: "3"})
    proc.communicate(timeout=600)
    log.add("SIGKILL inside the 3rd checkpoint write", proc, None)
    assert proc.returncode == -signal.SIGKILL, log
    temp_files = list((run / "checkpoints").glob(".last.pth.tmp-*"))
    assert temp_files, f"the interrupted write leaves its temp file; {log}"

    # 2. Killed during start-up, then at random steps (and a random moment within the step).
    before = log.step()
    proc = _popen(["--resume", "auto", *args])
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    log.add("SIGKILL 1 s after start", proc, before)
    # One random step in each of 5 windows over the 18 steps (leaving the end for the final resume).
    targets = [base + rng.randrange(2) for base in (2, 5, 8, 11, 13)][:RANDOM_KILLS]
    for target in targets:
        before = log.step()
        proc = _popen(["--resume", "auto", *args])
        saved = _wait_for_saves(proc, _last(run), max(1, target - (before or 0)), log=log)
        delay = rng.uniform(0.0, 0.15)
        time.sleep(delay)  # anywhere in the next step, its save included
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        log.add(f"SIGKILL aimed at step {target} (+{delay:.2f} s)", proc, before)
        assert saved, f"the run finished before the kill aimed at step {target}; {log}"

    # 3. Finish with an explicit path; leftovers of the interrupted write are gone, and the weights,
    #    optimizer and EMA-free state equal the uninterrupted run bit for bit.
    before = log.step()
    proc = _popen(["--resume", str(_last(run)), "--no_progress"])
    _, err = proc.communicate(timeout=600)
    log.add("final resume, to the end", proc, before)
    assert proc.returncode == 0, f"{err[-2000:]}\n{log}"
    assert not list((run / "checkpoints").glob(".*tmp-*")), log
    assert _threads_of(run) == _threads_of(ref_run) == THREADS, log
    _same_weights(_last(ref_run), _last(run), log)
    _same_weights(ref_run / "checkpoints" / "best_model.pth", run / "checkpoints" / "best_model.pth", log)
    ref = torch.load(_last(ref_run), map_location="cpu", weights_only=True)
    got = torch.load(_last(run), map_location="cpu", weights_only=True)
    assert got["global_step"] == ref["global_step"] == EPOCHS * 6, log
    ref_moments, got_moments = (list(p["optimizer_state_dict"]["state"].values()) for p in (ref, got))
    assert len(ref_moments) == len(got_moments), log
    for index, (a, b) in enumerate(zip(ref_moments, got_moments, strict=True)):
        same = torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
        assert same, f"Adam moments of parameter {index} differ; {log}"
    print(log)


def test_sigterm_saves_last_pth_mid_epoch_and_prints_the_resume_command(reference, one_thread):
    tmp, ref_run = reference
    args = _args(tmp, "terminated")
    args[args.index("training.checkpoint_every_steps=1")] = "training.checkpoint_every_steps=1000"
    run = tmp / "terminated" / "quickstart_baseline"
    proc = _popen(args)
    # untrained_model.pth is written (with the handlers already installed) right before the first step:
    # SIGTERM now lands in epoch 1, and the run stops after the step in progress, mid-epoch.
    untrained = run / "checkpoints" / "untrained_model.pth"
    deadline = time.monotonic() + 120
    while not untrained.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "SIGTERM" in errors[0]
    assert f"--resume {_last(run)}" in errors[0]
    payload = torch.load(_last(run), map_location="cpu", weights_only=True)
    assert payload["epoch"] == 0 and 0 < payload["batches_done"] < 6, "saved mid-epoch, not at an epoch end"
    assert payload["global_step"] == payload["batches_done"]
    assert payload["epoch_progress"] is not None  # the partial epoch's sums, for an exact resume
    assert _threads_of(run) == THREADS  # the interrupted run's summary.json: what a resume is checked against

    command = shlex.split(errors[0].split("resume with: ", 1)[1])
    # the command this run was started with (the interpreter by name, the script as given), plus --resume
    assert command[0] == Path(sys.executable).name and command[1] == str(ROOT / "train_advanced.py")
    assert run_cli(train_main, [*command[2:], "--no_progress"]) == 0  # the printed command, in-process
    assert_same_weights(_last(ref_run), _last(run))


def test_sigterm_to_the_whole_process_group_with_loader_workers_still_stops_gracefully(tmp_path):
    """Slurm (and `kill -- -PGID`) signal every process of the job: the loader workers must not die of it
    and take the run down with exit 1; the main process saves last.pth and exits 143."""
    args = _args(tmp_path, "group") + ["--set", "data.num_workers=1"]
    args[args.index("training.checkpoint_every_steps=1")] = "training.checkpoint_every_steps=1000"
    run = tmp_path / "group" / "quickstart_baseline"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train_advanced.py"), *args], cwd=ROOT, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    untrained = run / "checkpoints" / "untrained_model.pth"
    deadline = time.monotonic() + 120
    while not untrained.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(0.5)  # the first batches are being loaded by the worker
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # never leave the run (and its worker) behind
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        pytest.fail(f"the run did not exit within 120 s of a group SIGTERM; stderr: {err[-2000:]}")
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err and "killed by signal" not in err
    assert _last(run).is_file()


def _signal_at_step(monkeypatch, step: int, signals: list[int]) -> None:
    """Send `signals` to this process (one after the other) at the start of optimizer step `step`: the real
    handlers installed by StopSignals see them, exactly as for a Ctrl-C in a terminal."""
    from kdlab.engine.trainer import Trainer

    real_step = Trainer.optimizer_step
    calls = {"n": 0}

    def signalled_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == step:
            for signum in signals:
                os.kill(os.getpid(), signum)
        return real_step(self, *a, **k)

    monkeypatch.setattr(Trainer, "optimizer_step", signalled_step)


@pytest.mark.parametrize("stop_after", [3, 8])
def test_sigint_mid_epoch_stops_after_the_step_and_resumes_bit_identical(
    reference, one_thread, monkeypatch, capsys, stop_after
):
    """In-process: a real SIGINT during optimizer step `stop_after` lets that step finish, saves last.pth
    (mid-epoch) and exits 130 with the resume command; resuming equals the uninterrupted run."""
    tmp, ref_run = reference
    out = f"stopped_{stop_after}"
    run = tmp / out / "quickstart_baseline"
    args = _args(tmp, out)
    args[args.index("training.checkpoint_every_steps=1")] = "training.checkpoint_every_steps=1000"
    before = signal.getsignal(signal.SIGINT)
    _signal_at_step(monkeypatch, stop_after, [signal.SIGINT])
    capsys.readouterr()
    assert run_cli(train_main, args) == 130
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and f"stopped by SIGINT after step {stop_after}" in errors[0], errors
    assert f"--resume {_last(run)}" in errors[0]
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are put back
    monkeypatch.undo()
    payload = torch.load(_last(run), map_location="cpu", weights_only=True)
    assert payload["global_step"] == stop_after and payload["batches_done"] == stop_after % 6
    assert run_cli(train_main, ["--resume", str(_last(run)), "--no_progress"]) == 0
    assert_same_weights(_last(ref_run), _last(run))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_second_signal_stops_at_once_without_finishing_the_step(tmp_path, monkeypatch, capsys, signum):
    """Two signals during step 3: the second one ends the run inside that step (StopSignals raises
    StoppedAtOnce), so step 3 is never taken or saved; still an interruption: 130/143, one line, status
    `interrupted` (tests/test_second_sigterm.py does this to a real process and resumes it)."""
    args = _args(tmp_path, "twice")  # checkpoint_every_steps=1: last.pth follows every finished step
    run = tmp_path / "twice" / "quickstart_baseline"
    _signal_at_step(monkeypatch, 3, [signum, signum])
    capsys.readouterr()
    assert run_cli(train_main, args) == 128 + signum
    errors = error_lines(capsys.readouterr().err)
    name = signal.Signals(signum).name
    # not the graceful "stopped by SIGINT after step 3"
    assert len(errors) == 1 and f"stopped at once by a second {name} after step 2" in errors[0], errors
    payload = torch.load(_last(run), map_location="cpu", weights_only=True)
    assert payload["global_step"] == 2  # the last finished step; the interrupted one left no trace
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"


def test_a_deterministic_resume_with_another_thread_count_warns(tmp_path, caplog):
    """The thread count a run trained with comes from the checkpoint's provenance or, without one, its run's
    summary.json; a resume with another count warns (it continues, but is no longer bit-exact)."""
    last = tmp_path / "run" / "checkpoints" / "last.pth"
    last.parent.mkdir(parents=True)
    cfg = resolve_config("quickstart_baseline")
    assert recorded_threads({}, last, cfg) is None
    (last.parent.parent / "summary.json").write_text(json.dumps({"provenance": {"threads": 2}}))
    assert recorded_threads({}, last, cfg) == 2
    assert recorded_threads({"provenance": {"threads": 3}}, last, cfg) == 3
    with caplog.at_level(logging.WARNING, logger="kdlab.engine.device"):
        check_resume_threads(2, 2, last)
        check_resume_threads(None, 1, last)
        assert not caplog.records
        check_resume_threads(2, 1, last)
    assert "trained with 2 CPU threads and this process has 1" in caplog.text
    assert "OMP_NUM_THREADS=2" in caplog.text
