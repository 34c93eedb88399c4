"""Runs as submitit jobs: Slurm on a cluster (`--executor slurm`), or submitit's local executor on this machine
(`--executor submitit_local`, what the tests use, so CI needs no cluster). An optional dependency:
`pip install kdlab[slurm]`.

Each job runs the same training command a local child would, with its output in the same log file, and
returns its exit status. On Slurm a student is submitted at once with `--dependency=afterok:<teacher job>`
(and `--kill-on-invalid-dep=yes`, so a failed teacher cancels its students instead of leaving them queued);
the local executor has no dependencies, so there the scheduler submits a student once its teacher is done.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from kdlab.errors import ConfigError

log = logging.getLogger(__name__)

EXECUTORS = ("local", "slurm", "submitit_local")
EXIT_SUFFIX = ".exit"


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


class SubmititLauncher:
    """The scheduler's launcher for submitit jobs; a handle is a submitit Job."""

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
        self.executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=self.cluster)
        self.partition = partition
        self.gpus_per_run = gpus_per_run
        self.timeout_min = timeout_min
        self.cpus_per_run = cpus_per_run

    def gpus_for(self, devices_per_run: int) -> int:
        return (
            self.gpus_per_run
            if self.gpus_per_run is not None
            else (devices_per_run if self.cluster == "slurm" else 0)
        )

    def start(self, name: str, spec: Any, start_after: list[Any]) -> Any:
        log_path = spec.log_path
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
        job = self.executor.submit(run_child_job, spec.command, spec.env, str(log_path))
        job.kdlab_log = log_path
        log.info("%s: submitted as job %s%s", name, job.job_id, f" after job {after}" if after else "")
        return job

    def poll(self, job: Any) -> int | None:
        if not job.done():
            return None
        exit_file = Path(str(job.kdlab_log) + EXIT_SUFFIX)
        if exit_file.is_file():
            try:
                return int(exit_file.read_text().strip())
            except ValueError:
                return 1
        try:  # the job never ran the command (cancelled, a dependency that failed, a node failure)
            job.result()
        except Exception as exc:
            log.error("job %s ended without running its command: %s", job.job_id, str(exc).splitlines()[0:1])
        return 1

    def terminate(self, job: Any) -> None:
        job.cancel(check=False)

    def kill(self, job: Any) -> None:
        job.cancel(check=False)
