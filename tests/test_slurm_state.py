"""How the Slurm launcher knows a job's state without Slurm's accounting (kdlab.experiments.slurm), with no
Slurm: the pure state logic, and the launcher against fake `sbatch`/`squeue`/`scancel`/`sacct` commands on
PATH. The same code against a real Slurm: tests/test_slurm_real.py."""

from __future__ import annotations

import json
import logging
import os
import textwrap
from pathlib import Path

import pytest

from kdlab.experiments import slurm
from kdlab.experiments.scheduler import ChildSpec
from kdlab.experiments.slurm import JOB_LOST_EXIT, judge, parse_squeue, read_exit_file

GRACE = 30.0


@pytest.mark.parametrize(
    "exit_code, state, reason, ran, ended_for, expected",
    [
        (0, None, "", False, 0.0, (0, False)),  # the job's own exit file wins, whatever squeue says
        (2, "RUNNING", "None", True, 0.0, (2, False)),
        (143, "CANCELLED", "", True, 0.0, (143, False)),
        (None, "PENDING", "Dependency", False, 0.0, (None, False)),
        (None, "PENDING", "Priority", False, 99.0, (None, False)),
        (None, "RUNNING", "None", True, 0.0, (None, False)),
        (None, "COMPLETING", "None", True, 0.0, (None, False)),
        (None, "UNKNOWN", "", True, 999.0, (None, False)),  # squeue failed: wait, never guess
        # a student whose teacher failed, on a site without kill-on-invalid-dep: cancelled by the runner
        (None, "PENDING", "DependencyNeverSatisfied", False, 0.0, (JOB_LOST_EXIT, True)),
        # cancelled by kill-on-invalid-dep before it ran: final at once
        (None, "CANCELLED", "DependencyNeverSatisfied", False, 0.0, (JOB_LOST_EXIT, False)),
        # it ran and ended without an exit file (timeout, node failure): the file may be late on a shared FS
        (None, "TIMEOUT", "TimeLimit", True, 5.0, (None, False)),
        (None, "TIMEOUT", "TimeLimit", True, GRACE, (JOB_LOST_EXIT, False)),
        (None, "NODE_FAIL", "", True, GRACE + 1, (JOB_LOST_EXIT, False)),
        # no longer listed (purged after MinJobAge): the grace too, ran or not
        (None, None, "", False, 5.0, (None, False)),
        (None, None, "", False, GRACE, (JOB_LOST_EXIT, False)),
    ],
)
def test_a_jobs_state_comes_from_its_exit_file_then_squeue(
    exit_code, state, reason, ran, ended_for, expected
):
    verdict = judge(exit_code, state, reason, ran, ended_for, GRACE)
    assert (verdict.code, verdict.cancel) == expected
    if verdict.code is not None and exit_code is None:
        assert verdict.why  # said in the run's log


def test_squeue_lines_parse_and_an_exit_file_is_read_only_when_written(tmp_path):
    text = "12|RUNNING|None\n13|PENDING|Dependency\n14|cancelled|DependencyNeverSatisfied\n\n"
    assert parse_squeue(text) == {
        "12": ("RUNNING", "None"), "13": ("PENDING", "Dependency"),
        "14": ("CANCELLED", "DependencyNeverSatisfied"),
    }  # fmt: skip
    log_path = tmp_path / "run.stdout.txt"
    assert read_exit_file(log_path) is None
    Path(str(log_path) + ".exit").write_text("")  # being written
    assert read_exit_file(log_path) is None
    Path(str(log_path) + ".exit").write_text("143\n")
    assert read_exit_file(log_path) == 143
    Path(str(log_path) + ".exit").write_text("garbage")
    assert read_exit_file(log_path) == 1


# ------------------------------------------------------------------------ the launcher against fake commands
@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """Fake sbatch (job ids from 100 up), squeue (prints `state/squeue.out`; exits with `state/squeue.rc` and
    `state/squeue.err` when given), scancel and sacct (record their calls in `state/calls`)."""
    pytest.importorskip("submitit")
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    bin_dir.mkdir()
    state.mkdir()
    scripts = {
        "sbatch": f"""
            n=$(cat {state}/next 2>/dev/null || echo 100); echo $((n + 1)) > {state}/next
            echo "sbatch $*" >> {state}/calls; echo "Submitted batch job $n"
        """,
        "squeue": f"""
            echo "squeue $*" >> {state}/calls
            if [ -f {state}/squeue.rc ]; then cat {state}/squeue.err >&2; exit $(cat {state}/squeue.rc); fi
            cat {state}/squeue.out 2>/dev/null; exit 0
        """,
        "scancel": f'echo "scancel $*" >> {state}/calls',
        "sacct": f'echo "sacct $*" >> {state}/calls; echo "Slurm accounting storage is disabled" >&2; exit 1',
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/usr/bin/env bash\n" + textwrap.dedent(body))
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return state


def _calls(state: Path, command: str) -> list[str]:
    path = state / "calls"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [line for line in lines if line.split()[0] == command]


def _launcher(tmp_path: Path) -> slurm.SubmititLauncher:
    launcher = slurm.SubmititLauncher("slurm", tmp_path / "out" / ".submitit", gpus_per_run=0)
    launcher.queue.refresh_s = 0.0  # every poll asks squeue
    return launcher


def _submit(launcher, tmp_path: Path, name: str, after=None) -> slurm.SlurmJob:
    log_path = tmp_path / "out" / ".runner" / f"{name}.stdout.txt"
    spec = ChildSpec(["python", "-m", "kdlab.cli.train", "--config", name], {}, log_path, header="# header")
    return launcher.start(name, spec, [after] if after is not None else [])


def test_the_launcher_follows_jobs_by_exit_file_and_squeue_never_sacct(tmp_path, fake_slurm, caplog):
    launcher = _launcher(tmp_path)
    teacher = _submit(launcher, tmp_path, "teacher")
    student = _submit(launcher, tmp_path, "student", after=teacher)
    assert (teacher.job_id, student.job_id) == ("100", "101")
    submission = (tmp_path / "out" / ".submitit" / "101" / "101_submission.sh").read_text()
    assert "--dependency=afterok:100" in submission and "--kill-on-invalid-dep=yes" in submission
    records = tmp_path / "out" / ".submitit" / "runs"
    assert json.loads((records / "student.json").read_text())["job_id"] == "101"

    (fake_slurm / "squeue.out").write_text("100|RUNNING|None\n101|PENDING|Dependency\n")
    assert launcher.poll(teacher) is None and launcher.poll(student) is None
    assert all("-t all -j 100,101" in c for c in _calls(fake_slurm, "squeue"))  # one call for all jobs
    # the teacher's command fails: its exit file says so; Slurm cancels the student before it runs
    Path(str(teacher.log_path) + ".exit").write_text("2\n")
    (fake_slurm / "squeue.out").write_text(
        "100|FAILED|NonZeroExitCode\n101|CANCELLED|DependencyNeverSatisfied\n"
    )
    asked = len(_calls(fake_slurm, "squeue"))
    assert launcher.poll(teacher) == 2
    assert len(_calls(fake_slurm, "squeue")) == asked  # an exit file needs no squeue
    with caplog.at_level(logging.WARNING):
        assert launcher.poll(student) == JOB_LOST_EXIT
    assert launcher.poll(student) == JOB_LOST_EXIT  # decided once, remembered
    assert "Slurm job 101 ended CANCELLED (DependencyNeverSatisfied) without running its command" in (
        student.log_path.read_text()
    )
    assert not list(records.iterdir())  # both collected: nothing left for a --resume
    assert _calls(fake_slurm, "sacct") == [] and "sacct" not in caplog.text


def test_a_job_pending_on_a_failed_dependency_is_cancelled_and_a_job_that_ran_gets_a_grace(
    tmp_path, fake_slurm
):
    launcher = _launcher(tmp_path)
    launcher.exit_grace_s = 0.3
    waiting, running = _submit(launcher, tmp_path, "waiting"), _submit(launcher, tmp_path, "running")
    (fake_slurm / "squeue.out").write_text("100|PENDING|DependencyNeverSatisfied\n101|RUNNING|None\n")
    assert launcher.poll(waiting) == JOB_LOST_EXIT
    assert "scancel 100" in _calls(fake_slurm, "scancel")
    assert launcher.poll(running) is None
    (fake_slurm / "squeue.out").write_text("101|TIMEOUT|TimeLimit\n")
    assert launcher.poll(running) is None  # it ran: its exit file may still come
    import time

    time.sleep(0.35)
    assert launcher.poll(running) == JOB_LOST_EXIT
    assert "ended TIMEOUT (TimeLimit); its command wrote no exit status" in running.log_path.read_text()


def test_a_failing_squeue_means_unknown_and_warns_once(tmp_path, fake_slurm, caplog):
    launcher = _launcher(tmp_path)
    job = _submit(launcher, tmp_path, "run")
    (fake_slurm / "squeue.rc").write_text("1")
    (fake_slurm / "squeue.err").write_text("slurm_load_jobs error: Unable to contact slurm controller\n")
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            assert launcher.poll(job) is None
    assert caplog.text.count("squeue failed") == 1
    # squeue refuses a list of only unknown ids: an answer (the job is gone), not a failure
    (fake_slurm / "squeue.err").write_text("slurm_load_jobs error: Invalid job id specified\n")
    assert launcher.queue.query(["100"]) == (True, {})


def test_resume_collects_a_recorded_job_that_runs_or_succeeded_and_forgets_one_that_failed(
    tmp_path, fake_slurm
):
    first = _launcher(tmp_path)
    jobs = {name: _submit(first, tmp_path, name) for name in ("queued", "succeeded", "failed", "vanished")}
    del first  # the runner is killed: its jobs are recorded in <folder>/runs/
    Path(str(jobs["succeeded"].log_path) + ".exit").write_text("0\n")
    Path(str(jobs["failed"].log_path) + ".exit").write_text("1\n")
    (fake_slurm / "squeue.out").write_text("100|RUNNING|None\n")  # 103 (vanished) is gone

    second = _launcher(tmp_path)
    for name in ("queued", "succeeded"):
        spec = second.recorded_job(name)
        assert spec.job_id == jobs[name].job_id and spec.log_path == jobs[name].log_path
        assert spec.command[-1] == name
        handle = second.start(name, spec, [])
        assert handle.job_id == jobs[name].job_id
    assert second.recorded_job("failed") is None and second.recorded_job("vanished") is None
    assert second.recorded_job("never_submitted") is None
    assert sorted(p.stem for p in (tmp_path / "out" / ".submitit" / "runs").iterdir()) == [
        "queued",
        "succeeded",
    ]
    assert len(_calls(fake_slurm, "sbatch")) == 4  # nothing submitted again


def test_the_runner_hands_a_recorded_job_to_the_launcher_under_resume(tmp_path):
    from kdlab.experiments.plan import plan_runs
    from kdlab.experiments.runner import SuiteBook

    [run] = plan_runs(["sequence_teacher"], [f"data.sequence.path={tmp_path / 'seq.h5'}"], {}, [])
    command = ["python", "-m", "kdlab.cli.train", "--config", "sequence_teacher", "--resume", "auto"]
    left = ChildSpec(command, {}, tmp_path / "log.txt", job_id="7")
    asked: list[str] = []

    def adopt(name: str) -> ChildSpec:
        asked.append(name)
        return left

    book = SuiteBook([run], [], tmp_path, resume=False, fail_fast=False, on_result=None, adopt=adopt)
    assert book.prepare(run, None) is not left and asked == []  # without --resume: a new job
    book = SuiteBook([run], [], tmp_path, resume=True, fail_fast=False, on_result=None, adopt=adopt)
    assert book.prepare(run, None) is left and asked == ["sequence_teacher"]
    assert book.commands["sequence_teacher"] == (command, "auto")
