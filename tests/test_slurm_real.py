"""`run_experiments.py --executor slurm` against a real one-node Slurm (scripts/slurm_local_cluster.sh starts it
when it is not running; .ci/run installs Debian's slurm/munge packages first). Skipped, with the reason, where
the packages are missing or the cluster cannot start. Tiny sequence runs (1 epoch, 48 sequences), one CPU each.

No Slurm accounting here: these tests also show that the runner needs none (no sacct call, no
"Bypassing sacct error" line). The state logic alone, without Slurm: tests/test_slurm_state.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm_local_cluster.sh"
RUNNER_TIMEOUT_S = 420
TINY = [
    "data.sequence.train_samples=48", "data.sequence.val_samples=16", "data.sequence.seq_len=8",
    "model.hidden_size=8", "training.log_every_steps=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def slurm_cluster() -> None:
    """The local cluster, started by the script when it is not running (never installs packages: .ci/run
    does that); the test is skipped with the script's reason when it cannot be started."""
    pytest.importorskip("submitit")
    if shutil.which("bash") is None:
        pytest.skip("no bash to run scripts/slurm_local_cluster.sh")
    proc = subprocess.run(["bash", str(SCRIPT), "--no-install"], capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        reason = reason.removeprefix("slurm_local_cluster: ")
        hint = " (.ci/run installs them as root: apt-get install slurmctld slurmd slurm-client munge)"
        pytest.skip(f"no local Slurm cluster: {reason}{hint if proc.returncode == 3 else ''}")


def _runner(out: Path, data: Path, configs: list[str], *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "run_experiments.py"), "--configs", *configs, "--epochs", "1",
            "--batch_size", "16", "--device", "cpu", "--output_dir", str(out), "--executor", "slurm",
            "--slurm_gpus_per_run", "0", "--set", f"data.sequence.path={data}", *TINY, *extra]  # fmt: skip


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _runs(out: Path) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads((out / "experiment_runs.json").read_text())}


def _job_dirs(out: Path) -> set[str]:
    return {p.name for p in (out / ".submitit").iterdir() if p.name.isdigit()}


def _squeue_state(job_id: str) -> str:
    proc = subprocess.run(
        ["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"], capture_output=True, text=True
    )
    return proc.stdout.strip()


def _cancel_leftovers(out: Path) -> None:
    """scancel the jobs this test submitted that are still queued (by id)."""
    if (out / ".submitit").is_dir():
        for job_id in _job_dirs(out):
            if _squeue_state(job_id) in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
                subprocess.run(["scancel", job_id], capture_output=True)


def _no_accounting_noise(stderr: str) -> None:
    assert "sacct" not in stderr and "Bypassing" not in stderr, stderr[-3000:]


def test_a_teacher_and_its_students_run_as_slurm_jobs_the_student_after_the_teacher(tmp_path, slurm_cluster):
    out = tmp_path / "runs"
    try:
        proc = subprocess.run(_runner(out, tmp_path / "seq.h5", ["sequence"]), capture_output=True, text=True,
                              env=_env(), timeout=RUNNER_TIMEOUT_S)  # fmt: skip
    finally:
        _cancel_leftovers(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = _runs(out)
    assert {n: r["status"] for n, r in runs.items()} == {
        "sequence_teacher": "completed", "sequence_student_baseline": "completed",
        "sequence_student_distill": "completed",
    }  # fmt: skip
    teacher_job = next(
        line.split("submitted as job ")[1].split()[0]
        for line in proc.stderr.splitlines()
        if "sequence_teacher: submitted as job" in line
    )
    assert f"after job {teacher_job}" in proc.stderr
    student_job = next(
        line.split("submitted as job ")[1].split()[0]
        for line in proc.stderr.splitlines()
        if "sequence_student_distill: submitted as job" in line
    )
    submission = (out / ".submitit" / student_job / f"{student_job}_submission.sh").read_text()
    assert f"--dependency=afterok:{teacher_job}" in submission and "--kill-on-invalid-dep=yes" in submission
    student_log = (out / "sequence_student_distill" / "logs" / "stdout.txt").read_text()
    assert "as a Slurm job" in student_log.splitlines()[0] and "completed" in student_log
    assert (out / "experiment_comparison.md").is_file() and "sequence_student_distill" in proc.stdout
    assert not list((out / ".submitit" / "runs").iterdir())  # every job collected
    _no_accounting_noise(proc.stderr)


def test_a_teacher_failing_at_train_time_gets_its_student_job_cancelled_and_recorded_as_skipped(
    tmp_path, slurm_cluster
):
    out = tmp_path / "runs"
    garbage = tmp_path / "not_hdf5.h5"
    garbage.write_text("not an HDF5 file\n")  # the config is valid: the teacher fails when it reads its data
    command = _runner(out, garbage, ["sequence_teacher", "sequence_student_distill"])
    started = time.monotonic()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=RUNNER_TIMEOUT_S)
    finally:
        _cancel_leftovers(out)
    assert proc.returncode == 1, proc.stderr[-3000:]
    runs = _runs(out)
    teacher, student = runs["sequence_teacher"], runs["sequence_student_distill"]
    assert teacher["status"] == "failed" and teacher["exit_code"] == 2
    assert "is not a readable HDF5 file" in teacher["error_tail"]
    assert student["status"] == "skipped"
    assert "without running its command" in student["error_tail"] or "dependency" in student["error_tail"]
    assert not (out / "sequence_student_distill" / "summary.json").exists()  # it never ran
    assert time.monotonic() - started < RUNNER_TIMEOUT_S  # the runner saw the cancelled job end
    _no_accounting_noise(proc.stderr)


def test_a_runner_killed_while_its_jobs_run_is_resumed_and_collects_them_without_resubmitting(
    tmp_path, slurm_cluster
):
    out = tmp_path / "runs"
    command = _runner(out, tmp_path / "seq.h5", ["sequence_teacher", "sequence_student_distill"])
    records = out / ".submitit" / "runs"
    runner = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env()
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # both jobs submitted, the teacher's running
            if records.is_dir() and len(list(records.glob("*.json"))) == 2:
                teacher_job = json.loads((records / "sequence_teacher.json").read_text())["job_id"]
                if _squeue_state(teacher_job) == "RUNNING":
                    break
            assert runner.poll() is None, runner.stderr.read()[-3000:]
            time.sleep(0.2)
        else:
            pytest.fail("the teacher job never ran")
        runner.send_signal(signal.SIGKILL)
        runner.wait()
        jobs = {p.stem: json.loads(p.read_text())["job_id"] for p in records.glob("*.json")}
        submitted = _job_dirs(out)
        assert set(jobs.values()) == submitted
        assert _squeue_state(jobs["sequence_teacher"]) in ("RUNNING", "COMPLETING", "COMPLETED")  # not killed

        resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, env=_env(),
                                 timeout=RUNNER_TIMEOUT_S)  # fmt: skip
    finally:
        if runner.poll() is None:
            runner.kill()
        _cancel_leftovers(out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name, job_id in jobs.items():
        assert f"{name}: collecting job {job_id}, submitted by an earlier runner" in resumed.stderr
    assert "submitted as job" not in resumed.stderr
    assert _job_dirs(out) == submitted  # no new job
    runs = _runs(out)
    assert {n: r["status"] for n, r in runs.items()} == {
        "sequence_teacher": "completed", "sequence_student_distill": "completed",
    }  # fmt: skip
    teacher_log = (out / "sequence_teacher" / "logs" / "stdout.txt").read_text()
    assert teacher_log.count("# kdlab runner: ") == 1 and "sequence_teacher: completed" in teacher_log
    assert not list(records.iterdir())
    _no_accounting_noise(resumed.stderr)
