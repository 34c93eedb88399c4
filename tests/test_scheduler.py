"""The runner's scheduler without training: slots, GPU pinning, dependency order, the lock probe, Slurm job
parameters and the flags' errors. Children are stand-in Python one-liners that take a fraction of a second."""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from kdlab.cli.common import run_cli
from kdlab.cli.experiments import main as experiments_main
from kdlab.engine.progress_file import ProgressFile, read_progress
from kdlab.errors import ConfigError
from kdlab.experiments.child_run import with_torchrun
from kdlab.experiments.plan import PlannedRun, plan_runs
from kdlab.experiments.run_lock import run_dir_holder
from kdlab.experiments.runner import SuiteBook
from kdlab.experiments.scheduler import ChildSpec, LiveLines, ProcessLauncher, SlotPool, parse_gpus, schedule
from kdlab.experiments.slurm import slurm_parameters
from tests.helpers import error_lines


@pytest.fixture(autouse=True)
def no_visible_gpus(monkeypatch):
    """These tests place runs on made-up GPU ids: on a GPU box the runner's own CUDA_VISIBLE_DEVICES and device
    count would change which ids are valid and what the children get (tests/test_gpu_visible_devices.py)."""
    import torch

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_cpu_slots_share_the_cores_and_a_single_slot_leaves_threads_to_torch():
    pool = SlotPool(None, parallel=2, cpus=8)
    a, b = pool.acquire(1), pool.acquire(1)
    assert pool.acquire(1) is None  # two at once, no more
    assert a.env() == {"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4"} and b.index != a.index
    pool.release(a)
    assert pool.acquire(1).index == a.index
    assert SlotPool(None, parallel=None, cpus=8).acquire(1).env() == {}
    assert SlotPool(None, parallel=1, cpus=8, threads=1).acquire(1).env()["OMP_NUM_THREADS"] == "1"


def test_gpu_slots_pin_disjoint_devices_and_multi_gpu_runs_wait_for_enough_free():
    pool = SlotPool([0, 1, 2, 3], parallel=None, cpus=16)
    two = pool.acquire(2)
    one = pool.acquire(1)
    assert two.env()["CUDA_VISIBLE_DEVICES"] == "0,1" and one.env()["CUDA_VISIBLE_DEVICES"] == "2"
    assert pool.acquire(2) is None  # only GPU 3 is free
    last = pool.acquire(1)
    assert last.gpus == (3,)
    pool.release(two)
    assert pool.acquire(2).gpus == (0, 1)
    with pytest.raises(ConfigError, match="devices_per_run=5 GPUs but --gpus gives 4"):
        pool.check_fits("big", 5)


@pytest.mark.parametrize(
    ("spec", "message"),
    [("0,x", "device ids like 0,1,3"), ("0,0", "lists a device twice"), ("-1", "ids >= 0")],
)
def test_bad_gpu_lists_are_config_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_gpus(spec)


def test_gpu_ids_parse():
    assert parse_gpus("3,1") == [3, 1] and parse_gpus(None) is None


def test_a_multi_gpu_run_is_launched_under_torchrun():
    base = [sys.executable, "-m", "kdlab.cli.train", "--config", "x", "--no_progress"]
    assert with_torchrun(base, 1) == base
    launched = with_torchrun(base, 4)
    assert launched[:5] == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=4",
    ]
    assert launched[5:] == ["-m", "kdlab.cli.train", "--config", "x", "--no_progress"]


def test_a_student_job_on_slurm_waits_for_its_teacher_job_and_dies_with_it():
    params = slurm_parameters("student", 2, "gpu", 90, 8, after_job="1234")
    assert params["slurm_dependency"] == "afterok:1234"
    assert params["slurm_additional_parameters"] == {"kill-on-invalid-dep": "yes"}
    assert (
        params["gpus_per_node"] == 2 and params["slurm_partition"] == "gpu" and params["cpus_per_task"] == 8
    )
    assert "slurm_dependency" not in slurm_parameters("teacher", 1, None, 90, None, after_job=None)


@dataclass
class FakeRun:
    run_name: str
    teacher: str | None = None
    devices: int = 1

    def run_dir(self) -> Path:
        return Path("/nonexistent") / self.run_name


class FakeBook:
    """Runs whose child is a short sleep; records the order of starts and ends and the devices each got."""

    def __init__(self, tmp: Path, sleep: dict[str, float], fail: set[str] = frozenset()) -> None:
        self.tmp, self.sleep, self.fail = tmp, sleep, fail
        self.events: list[tuple[str, str, float]] = []
        self.results: dict[str, str] = {}
        self.envs: dict[str, dict[str, str]] = {}

    def teacher_of(self, run):
        return run.teacher

    def blocked(self, run):
        if run.teacher is None:
            return None
        status = self.results.get(run.teacher)
        if status is None:
            return "wait"
        return None if status == "completed" else f"teacher {run.teacher} {status}"

    def devices_of(self, run):
        return run.devices

    def prepare(self, run, slot):
        self.events.append(("start", run.run_name, time.monotonic()))
        self.envs[run.run_name] = slot.env()
        code = 1 if run.run_name in self.fail else 0
        command = [
            sys.executable,
            "-c",
            f"import time; time.sleep({self.sleep.get(run.run_name, 0.1)}); exit({code})",
        ]
        return ChildSpec(command, {}, self.tmp / f"{run.run_name}.log")

    def skip(self, run, reason):
        self.results[run.run_name] = "skipped"
        return "skipped"

    def finish(self, run, code, seconds, slot):
        self.events.append(("end", run.run_name, time.monotonic()))
        self.results[run.run_name] = "completed" if code == 0 else "failed"
        return self.results[run.run_name]

    def stops(self, result):
        return False


def _at(events, kind, name):
    return next(t for k, n, t in events if k == kind and n == name)


def test_students_start_only_after_their_teacher_ends_while_others_fill_the_free_slots(tmp_path):
    runs = [
        FakeRun("teacher"),
        FakeRun("student_a", "teacher"),
        FakeRun("other"),
        FakeRun("student_b", "teacher"),
    ]
    book = FakeBook(tmp_path, {"teacher": 1.5, "other": 0.2})
    schedule(runs, book, ProcessLauncher(), SlotPool(None, parallel=3, cpus=3))
    assert set(book.results.values()) == {"completed"}
    teacher_end = _at(book.events, "end", "teacher")
    for student in ("student_a", "student_b"):
        assert _at(book.events, "start", student) >= teacher_end
    assert _at(book.events, "start", "other") < teacher_end  # a blocked student does not hold the queue up


def test_a_failed_teacher_skips_its_students_and_gpus_are_never_shared(tmp_path):
    runs = [FakeRun("teacher"), FakeRun("student", "teacher"), FakeRun("wide", devices=2), FakeRun("narrow")]
    book = FakeBook(tmp_path, {"wide": 0.6, "narrow": 0.6}, fail={"teacher"})
    schedule(runs, book, ProcessLauncher(), SlotPool([0, 1, 2], parallel=None, cpus=3))
    assert book.results == {
        "teacher": "failed",
        "student": "skipped",
        "wide": "completed",
        "narrow": "completed",
    }
    # teacher (1 GPU) and wide (2 GPUs) fill the three devices; narrow waits for the teacher's GPU
    assert book.envs["teacher"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert book.envs["wide"]["CUDA_VISIBLE_DEVICES"] == "1,2"
    assert book.envs["narrow"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert _at(book.events, "start", "narrow") >= _at(book.events, "end", "teacher")


def test_the_runner_does_not_start_a_run_whose_directory_another_process_holds(tmp_path):
    plan = plan_runs(["digits_student_baseline"], [f"output_dir={tmp_path}"], {}, [])
    run: PlannedRun = plan[0]
    run_dir = run.run_dir()
    run_dir.mkdir(parents=True)
    (run_dir / "logs").mkdir()
    (run_dir / "logs" / "stdout.txt").write_text("the other process's log\n")
    assert run_dir_holder(run_dir) is None  # no lock file yet
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, json.dumps({"pid": 4242, "host": "elsewhere", "started": 0}).encode())
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert run_dir_holder(run_dir).startswith("pid 4242 on host elsewhere")
        book = SuiteBook(plan, [], tmp_path, resume=False, fail_fast=False, on_result=None)
        result = book.prepare(run, SlotPool(None, 1).acquire(1))
        assert result.status == "failed" and "in use by pid 4242 on host elsewhere" in result.error_tail
        assert (run_dir / "logs" / "stdout.txt").read_text() == "the other process's log\n"
        assert not (tmp_path / ".runner").exists()
    finally:
        os.close(fd)
    assert run_dir_holder(run_dir) is None  # the holder ended: free again


def test_progress_file_gives_epoch_batch_and_an_eta(tmp_path):
    progress = ProgressFile(tmp_path, epochs=4, min_interval_s=0.0)
    progress.batch(epoch=1, batch=5, n_batches=10)
    record = read_progress(tmp_path)
    assert (record["epoch"], record["epochs"], record["batch"], record["batches"]) == (2, 4, 5, 10)
    assert record["eta_s"] is not None and record["eta_s"] >= 0
    assert (
        read_progress(tmp_path, newer_than=time.time() + 60) is None
    )  # an old file (an earlier run) is ignored


def test_live_lines_off_a_terminal_print_a_run_when_its_epoch_changes(tmp_path, capsys):
    import io

    from kdlab.experiments.scheduler import Running, Slot

    stream = io.StringIO()
    live = LiveLines(stream, quiet_s=0.0)
    running = Running(None, "digits_teacher", tmp_path, Slot(threads=1), None, tmp_path / "log")
    live.draw([running])
    ProgressFile(tmp_path, epochs=3, min_interval_s=0.0).batch(0, 2, 4)
    live.draw([running])
    live.draw([running])  # same epoch: not printed again
    lines = stream.getvalue().splitlines()
    assert lines == ["digits_teacher  [cpu#0 (1 thr)]  starting", lines[1]]
    assert lines[1].startswith("digits_teacher  [cpu#0 (1 thr)]  epoch 1/3 batch 2/4 ETA ")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--parallel", "0"], "--parallel must be >= 1"),
        (["--threads_per_run", "0"], "--threads_per_run must be >= 1"),
        (["--gpus", "0,0"], "lists a device twice"),
        (["--slurm_partition", "gpu"], "--slurm_partition need --executor slurm"),
        (["--executor", "slurm", "--gpus", "0"], "with --executor slurm use --slurm_gpus_per_run"),
    ],
)
def test_bad_scheduling_flags_are_one_error_line_and_start_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "runs"
    code = run_cli(experiments_main, ["--configs", "digits", "--output_dir", str(out), *extra])
    assert code == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and message in lines[0]
    assert not out.exists()
