"""Runs as submitit jobs: Slurm on a cluster (`--executor slurm`), or submitit's local executor on this machine
(`--executor submitit_local`). An optional dependency: `pip install kdlab[slurm]`.

Each job runs the same training command a local child would, with its output in the same log file, and
returns its exit status. On Slurm a student is submitted at once with `--dependency=afterok:<teacher job>`
(and `--kill-on-invalid-dep=yes`, so a failed teacher cancels its students instead of leaving them queued);
the local executor has no dependencies, so there the scheduler submits a student once its teacher is done.

How the runner knows a Slurm job's state, without Slurm's accounting (no `sacct`, which submitit relies on and
which many small clusters and the test cluster of scripts/slurm_local_cluster.sh do not have):

1. the job's own word: the job body writes the command's exit status to `<log>.exit` when the command
   ends; once that file is there, it is the run's exit status, whatever Slurm says;
2. otherwise the controller's: one `squeue -t all -j <ids>` for every watched job, at most every
   `QUEUE_REFRESH_S`. PENDING, RUNNING, COMPLETING and the like mean "not done". A job pending on a
   dependency that can never be satisfied (a site without `kill-on-invalid-dep`) is cancelled and ends the
   run. A job that ended without an exit file never finished its command (cancelled, timed out, a node
   failure, a dependency that failed): if it never ran (never seen running, nothing in its log past the
   runner's header), that is final at once; if it ran, or squeue no longer lists it, its exit file is
   waited for `EXIT_FILE_GRACE_S` more (a shared file system may show it late), then the run ends with
   `JOB_LOST_EXIT` and a line saying so in its log (with the tail of submitit's stderr of the job).

submitit's `Job.done()`/`Job.state` are never called for Slurm jobs: without accounting they warn on every
poll ("Bypassing sacct error") and never see a cancelled job end. Each submitted job is also recorded in
`<folder>/runs/<run>.json` (job id, command, log) until the runner collects its result, so that a runner
killed while its jobs run can be followed by `--resume`, which collects those jobs instead of submitting
them again (`recorded_job`).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdlab.atomic_io import write_json_atomic
from kdlab.errors import ConfigError

log = logging.getLogger(__name__)

EXECUTORS = ("local", "slurm", "submitit_local")
EXIT_SUFFIX = ".exit"
QUEUE_REFRESH_S = 5.0  # at most one squeue call per this many seconds, for all watched jobs
EXIT_FILE_GRACE_S = 30.0  # a job that ran and left the queue: how long its exit file is waited for
JOB_LOST_EXIT = 1  # the exit status recorded for a job that ended without its command's exit status
SQUEUE_WARN_EVERY_S = 600.0
# Slurm job states (squeue %T) of a job that is still queued or running, and of one that ended.
QUEUED_STATES = frozenset({
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
    "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD", "POWER_UP_NODE",
})  # fmt: skip
RAN_STATES = frozenset({"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "SUSPENDED", "STOPPED"})
NEVER_SATISFIED = "DependencyNeverSatisfied"


def run_child_job(command: list[str], env: dict[str, str], log_path: str) -> int:
    """The job body: run the training command, its output into `log_path`; raise when it fails, so that
    Slurm marks the job failed and `afterok` dependents never start. The exit status is also written beside
    the log, where the runner reads it."""
    from kdlab.experiments.scheduler import _die_with_parent

    path = Path(log_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as sink:
        proc = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, **env},
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )  # fmt: skip
        code = proc.wait()
    Path(str(path) + EXIT_SUFFIX).write_text(f"{code}\n")
    if code != 0:
        raise RuntimeError(f"training exited with status {code}; see {path}")
    return code


def read_exit_file(log_path: Path) -> int | None:
    """The exit status the job body wrote beside the log; None while there is none (or it is being written,
    still empty); 1 for one that is not a number."""
    exit_file = Path(str(log_path) + EXIT_SUFFIX)
    try:
        text = exit_file.read_text().strip()
    except OSError:
        return None
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        return 1


def slurm_parameters(
    name: str, gpus: int, partition: str | None, timeout_min: int, cpus: int | None, after_job: str | None
) -> dict[str, Any]:
    """submitit AutoExecutor parameters of one run's Slurm job (one node, one task; torchrun inside for >1 GPU)."""
    params: dict[str, Any] = {
        "name": name, "timeout_min": timeout_min, "nodes": 1, "tasks_per_node": 1, "gpus_per_node": gpus,
        "slurm_additional_parameters": {"kill-on-invalid-dep": "yes"},
    }  # fmt: skip
    if cpus is not None:
        params["cpus_per_task"] = cpus
    if partition:
        params["slurm_partition"] = partition
    if after_job is not None:
        params["slurm_dependency"] = f"afterok:{after_job}"
    return params


# ------------------------------------------------------------------------------ job state without accounting
@dataclass(frozen=True)
class Verdict:
    """What one poll concludes about a Slurm job: still going (`code` None), or ended with `code`; `cancel`:
    the job must be cancelled first (pending forever on a failed dependency); `why`: for the run's log."""

    code: int | None = None
    cancel: bool = False
    why: str = ""


def judge(
    exit_code: int | None, state: str | None, reason: str, ran: bool, ended_for_s: float,
    grace_s: float = EXIT_FILE_GRACE_S,
) -> Verdict:  # fmt: skip
    """The state logic, free of Slurm: `exit_code` from the job's exit file (None: none yet); `state`/`reason`
    from squeue (`state` None: squeue does not list the job any more, "UNKNOWN": squeue could not be asked);
    `ran`: the job was seen running or its log grew past the runner's header; `ended_for_s`: how long the job
    has been seen ended (or gone) without an exit file."""
    if exit_code is not None:
        return Verdict(exit_code)
    if state == "UNKNOWN":  # squeue failed (controller busy or down): keep waiting
        return Verdict()
    if state in QUEUED_STATES:
        if state == "PENDING" and reason == NEVER_SATISFIED:
            return Verdict(JOB_LOST_EXIT, cancel=True, why=f"pending on a dependency that failed ({reason})")
        return Verdict()
    ended = "left the queue" if state is None else f"ended {state}" + (f" ({reason})" if reason else "")
    if not ran and state is not None:  # e.g. CANCELLED (DependencyNeverSatisfied): final at once
        return Verdict(JOB_LOST_EXIT, why=f"{ended} without running its command")
    if ended_for_s < grace_s:
        return Verdict()
    return Verdict(JOB_LOST_EXIT, why=f"{ended}; its command wrote no exit status within {grace_s:.0f} s")


def parse_squeue(text: str) -> dict[str, tuple[str, str]]:
    """`squeue -h -o %i|%T|%r` lines -> {job id: (state, reason)}."""
    out: dict[str, tuple[str, str]] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 2 and parts[0]:
            out[parts[0]] = (parts[1].strip().upper(), parts[2].strip() if len(parts) > 2 else "")
    return out


class SlurmQueue:
    """The controller's view of some jobs through squeue (`-t all` lists a job for MinJobAge after it ended),
    at most one call per `refresh_s`; squeue failures are logged at most once per SQUEUE_WARN_EVERY_S."""

    def __init__(self, refresh_s: float = QUEUE_REFRESH_S, squeue: str = "squeue") -> None:
        self.refresh_s = refresh_s
        self.squeue = squeue
        self.states: dict[str, tuple[str, str]] = {}
        self.asked: set[str] = set()
        self.ok = True
        self.last = float("-inf")
        self.last_warning = float("-inf")

    def query(self, job_ids: list[str]) -> tuple[bool, dict[str, tuple[str, str]]]:
        """(whether squeue answered, its states). A list of only unknown ids is an answer: none listed."""
        command = [self.squeue, "-h", "-t", "all", "-j", ",".join(job_ids), "-o", "%i|%T|%r"]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return self._failed(str(exc))
        if proc.returncode != 0:
            if "invalid job id" in proc.stderr.lower():
                return True, {}
            return self._failed(proc.stderr.strip() or f"exit {proc.returncode}")
        return True, parse_squeue(proc.stdout)

    def _failed(self, why: str) -> tuple[bool, dict[str, tuple[str, str]]]:
        now = time.monotonic()
        if now - self.last_warning >= SQUEUE_WARN_EVERY_S:
            log.warning(
                "squeue failed (%s); job states unknown until it answers",
                (why.splitlines() or ["?"])[0][:200],
            )
            self.last_warning = now
        return False, {}

    def state(self, job_id: str, watched: list[str]) -> tuple[str | None, str]:
        """(state, reason) of `job_id`: None when squeue does not list it, "UNKNOWN" when squeue failed."""
        now = time.monotonic()
        if now - self.last >= self.refresh_s or job_id not in self.asked:
            ids = sorted(set(watched) | {job_id}, key=lambda i: (len(i), i))
            self.ok, self.states = self.query(ids)
            self.asked, self.last = set(ids), now
        if not self.ok:
            return "UNKNOWN", ""
        state, reason = self.states.get(job_id, (None, ""))
        return state, reason


@dataclass
class SlurmJob:
    """The scheduler's handle of one Slurm job (submitted here, or by an earlier runner and collected)."""

    job_id: str
    log_path: Path
    stderr_path: Path | None = None  # submitit's stderr of the job (its own failures, before the command)
    ran: bool = False
    ended_since: float | None = None  # monotonic time it was first seen ended without an exit file
    run_name: str | None = None  # whose record (<folder>/runs/<run>.json) goes once the result is collected
    code: int | None = None  # decided exit status


def _log_grew(log_path: Path) -> bool:
    """Whether the job wrote to its log: more than the runner's one header line."""
    try:
        with log_path.open("rb") as fh:
            return len(fh.read(64 * 1024).splitlines()) > 1
    except OSError:
        return False


def _tail_lines(path: Path | None, lines: int = 5) -> list[str]:
    if path is None:
        return []
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


class SubmititLauncher:
    """The scheduler's launcher for submitit jobs; a handle is a `SlurmJob` on Slurm, a submitit Job locally."""

    def __init__(
        self, cluster: str, folder: Path, partition: str | None = None, gpus_per_run: int | None = None,
        timeout_min: int = 24 * 60, cpus_per_run: int | None = None,
    ) -> None:  # fmt: skip
        try:
            import submitit
        except ImportError:
            raise ConfigError(
                f"--executor {cluster} needs submitit: pip install 'kdlab[slurm]' (or submitit)"
            ) from None
        self.cluster = "local" if cluster == "submitit_local" else cluster
        self.expresses_dependencies = self.cluster == "slurm"
        self.job_kind = "Slurm job" if self.cluster == "slurm" else "submitit local job"
        self.folder = folder
        self.executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=self.cluster)
        self.partition = partition
        self.gpus_per_run = gpus_per_run
        self.timeout_min = timeout_min
        self.cpus_per_run = cpus_per_run
        self.queue = SlurmQueue()
        self.exit_grace_s = EXIT_FILE_GRACE_S
        self.watched: dict[str, SlurmJob] = {}  # job id -> handle, for jobs not yet decided

    def gpus_for(self, devices_per_run: int) -> int:
        return (
            self.gpus_per_run
            if self.gpus_per_run is not None
            else (devices_per_run if self.cluster == "slurm" else 0)
        )

    # ------------------------------------------------------------------ jobs recorded for a later --resume
    def _record_path(self, name: str) -> Path:
        return self.folder / "runs" / f"{name}.json"

    def _stderr_path(self, job_id: str) -> Path:
        return self.folder / job_id / f"{job_id}_0_log.err"

    def _forget(self, name: str) -> None:
        self._record_path(name).unlink(missing_ok=True)

    def recorded_job(self, name: str) -> Any:
        """A job an earlier runner submitted for run `name` and never collected, as the ChildSpec to watch
        (`job_id` set): one still queued or running, or one whose command ended with status 0. None when there
        is none to collect; a recorded job that failed, or ended without its command's exit status, is
        forgotten (its run starts again, with --resume)."""
        from kdlab.experiments.scheduler import ChildSpec

        if self.cluster != "slurm":
            return None
        path = self._record_path(name)
        try:
            record = json.loads(path.read_text())
            job_id, log_path, command = str(record["job_id"]), Path(record["log"]), list(record["command"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        code = read_exit_file(log_path)
        if code is not None:
            collect, outcome = code == 0, f"exited with status {code}"
        else:
            answered, states = self.queue.query([job_id])
            if not answered:
                raise ConfigError(
                    f"cannot ask Slurm (squeue) about job {job_id}, which an earlier runner submitted for "
                    f"{name}; retry when the controller answers"
                )
            state, reason = states.get(job_id, (None, ""))
            collect = state in QUEUED_STATES and not (state == "PENDING" and reason == NEVER_SATISFIED)
            outcome = "ended without finishing its command" if state is None else f"is {state} ({reason})"
            if state in QUEUED_STATES and not collect:
                subprocess.run(["scancel", job_id], capture_output=True, check=False)
        if not collect:
            log.info("%s: job %s of an earlier runner %s; the run starts again", name, job_id, outcome)
            self._forget(name)
            return None
        return ChildSpec(command, {}, log_path, job_id=job_id)

    # ------------------------------------------------------------------------------------- the launcher
    def start(self, name: str, spec: Any, start_after: list[Any]) -> Any:
        log_path = spec.log_path
        if getattr(spec, "job_id", None) is not None:
            job = SlurmJob(spec.job_id, log_path, self._stderr_path(spec.job_id), run_name=name)
            self.watched[job.job_id] = job
            log.info("%s: collecting job %s, submitted by an earlier runner (--resume)", name, job.job_id)
            return job
        log_path.parent.mkdir(parents=True, exist_ok=True)
        Path(str(log_path) + EXIT_SUFFIX).unlink(missing_ok=True)
        log_path.write_text(spec.header + "\n" if spec.header else "")
        after = start_after[0].job_id if start_after else None
        params = slurm_parameters(
            name, spec.devices, self.partition, self.timeout_min, self.cpus_per_run, after
        )
        if self.cluster != "slurm":
            params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
        self.executor.update_parameters(**params)
        submitted = self.executor.submit(run_child_job, spec.command, spec.env, str(log_path))
        log.info("%s: submitted as job %s%s", name, submitted.job_id, f" after job {after}" if after else "")
        if self.cluster != "slurm":
            submitted.kdlab_log = log_path
            return submitted
        job = SlurmJob(str(submitted.job_id), log_path, Path(submitted.paths.stderr), run_name=name)
        self.watched[job.job_id] = job
        record = {"job_id": job.job_id, "log": str(log_path), "command": spec.command}
        write_json_atomic(self._record_path(name), {**record, "submitted": time.time()})
        return job

    def poll(self, job: Any) -> int | None:
        if isinstance(job, SlurmJob):
            return self._poll_slurm(job)
        if not job.done():
            return None
        code = read_exit_file(job.kdlab_log)
        if code is not None:
            return code
        try:  # the job never ran the command (cancelled, a dependency that failed, a node failure)
            job.result()
        except Exception as exc:
            log.error("job %s ended without running its command: %s", job.job_id, str(exc).splitlines()[0:1])
        return 1

    def _poll_slurm(self, job: SlurmJob) -> int | None:
        if job.code is not None:
            return job.code
        code = read_exit_file(job.log_path)
        state, reason = (None, "") if code is not None else self.queue.state(job.job_id, list(self.watched))
        if state in RAN_STATES:
            job.ran = True
        still_queued = state in QUEUED_STATES or state == "UNKNOWN"
        if code is None and not still_queued and job.ended_since is None:  # first seen ended, no exit file
            job.ended_since = time.monotonic()
            job.ran = job.ran or _log_grew(job.log_path)
        elif still_queued:  # (again: a requeued job)
            job.ended_since = None
        ended_for = 0.0 if job.ended_since is None else time.monotonic() - job.ended_since
        verdict = judge(code, state, reason, job.ran, ended_for, self.exit_grace_s)
        if verdict.code is None:
            return None
        if verdict.cancel:
            subprocess.run(["scancel", job.job_id], capture_output=True, check=False)
        if verdict.why:
            message = f"Slurm job {job.job_id} {verdict.why}"
            log.warning("%s", message)
            extra = [f"#   {line}" for line in _tail_lines(job.stderr_path)]
            try:
                with job.log_path.open("a", encoding="utf-8") as sink:
                    sink.write("\n".join([f"# kdlab runner: {message}", *extra]) + "\n")
            except OSError:
                pass
        job.code = verdict.code
        self.watched.pop(job.job_id, None)
        if job.run_name is not None:
            self._forget(job.run_name)
        return job.code

    def terminate(self, job: Any) -> None:
        if isinstance(job, SlurmJob):
            if job.code is None:
                subprocess.run(["scancel", job.job_id], capture_output=True, check=False)
            return
        job.cancel(check=False)

    def kill(self, job: Any) -> None:
        if isinstance(job, SlurmJob):
            if job.code is None:  # SIGKILL to what runs now; a plain scancel for a job still pending
                for command in (["scancel", "-s", "KILL", job.job_id], ["scancel", job.job_id]):
                    subprocess.run(command, capture_output=True, check=False)
            return
        job.cancel(check=False)
