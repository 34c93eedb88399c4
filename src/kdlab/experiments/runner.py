"""Run several experiments, each as its own process (in series, or several at once), then export and compare them.

Each experiment runs `python -m kdlab.cli.train ...` (the CLI behind train_advanced.py) through an argument
list (never a shell; `kdlab.experiments.child_run`); its output is streamed live and into
`<run>/logs/stdout.txt`; its true exit status is recorded. A failed experiment is recorded with the tail of
its log and the others still run (unless fail_fast). An experiment whose teacher is another experiment runs
after it (`kdlab.experiments.plan`); if that teacher failed, it is skipped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdlab.experiments.child_run import (
    child_command,
    child_env,
    error_tail,
    exported_before,
    exports_in_run,
    finished_before,
    keep_child_log,
    recorded_export,
    with_torchrun,
)
from kdlab.experiments.plan import PlannedRun
from kdlab.experiments.run_lock import run_dir_holder
from kdlab.experiments.scheduler import ChildSpec, Launcher, ProcessLauncher, Slot, SlotPool, schedule

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    name: str
    config_name: str
    run_dir: str
    status: str  # completed | failed | skipped | interrupted | exists
    exit_code: int | None
    duration_s: float
    command: list[str]
    error_tail: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    export: dict[str, Any] | None = None
    seed: int | None = None
    group: str | None = None


class SuiteBook:
    """The runner's side of the scheduler (kdlab.experiments.scheduler.RunBook): commands, logs, results."""

    def __init__(
        self, planned: list[PlannedRun], flags_argv: list[str], output_dir: Path, resume: bool, fail_fast: bool,
        on_result: Callable[[RunResult], None] | None, gpus_for: Callable[[int], int] | None = None,
        job_kind: str | None = None, export: bool = False, adopt: Callable[[str], Any] | None = None,
    ) -> None:  # fmt: skip
        self.by_name = {p.run_name: p for p in planned}
        self.order = {p.run_name: i for i, p in enumerate(planned)}
        self.flags_argv, self.output_dir = flags_argv, output_dir
        self.resume, self.fail_fast = resume, fail_fast
        self.on_result = on_result
        self.gpus_for = gpus_for  # cluster jobs: the GPUs a run's job asks for
        self.job_kind = job_kind  # "Slurm job", "submitit local job"; None for a plain child process
        self.export = export  # each child exports its run to ONNX after training (scored on its own device)
        self.adopt = adopt  # cluster jobs: run name -> the ChildSpec of a job an earlier runner left, or None
        self.env = child_env()
        self.results: dict[str, RunResult] = {}
        self.commands: dict[str, tuple[list[str], str | None]] = {}

    def _record(self, result: RunResult) -> RunResult:
        self.results[result.name] = result
        if self.on_result is not None:
            self.on_result(result)
        return result

    def _result(self, run: PlannedRun, status: str, code: int | None, seconds: float, command: list[str],
                tail: str = "") -> RunResult:  # fmt: skip
        return RunResult(
            run.run_name, run.config_name, str(run.run_dir()), status, code, seconds, command, tail,
            run.config.model_dump(mode="json"), seed=run.seed, group=run.group or run.run_name,
        )  # fmt: skip

    def teacher_of(self, run: PlannedRun) -> str | None:
        return run.depends_on if run.depends_on in self.by_name else None

    def blocked(self, run: PlannedRun) -> str | None:
        teacher = self.teacher_of(run)
        if teacher is None:
            return None
        result = self.results.get(teacher)
        if result is None:
            return "wait"
        if result.status not in ("completed", "exists"):
            return f"teacher experiment {teacher} {result.status}"
        ckpt = Path(result.run_dir) / "checkpoints" / "best_model.pth"
        return None if ckpt.is_file() else f"teacher experiment {teacher} left no {ckpt}"

    def devices_of(self, run: PlannedRun) -> int:
        return run.config.training.devices_per_run

    def prepare(self, run: PlannedRun, slot: Slot | None) -> ChildSpec | RunResult:
        run_dir = run.run_dir()
        if self.resume and self.adopt is not None and run.resume_from is None:
            left = self.adopt(run.run_name)  # a job a killed runner submitted: collected, not resubmitted
            if left is not None:
                argv = left.command
                resume_arg = argv[argv.index("--resume") + 1] if "--resume" in argv else None
                self.commands[run.run_name] = (argv, resume_arg)
                return left
        if self.resume and run.resume_from is None and finished_before(run):
            log.info(
                "%s: already trained to %d epochs; not rerun (--resume)",
                run.run_name,
                run.config.training.epochs,
            )
            result = self._result(run, "exists", None, 0.0, [])
            result.export = exported_before(run, run_dir)  # not exported again after the suite
            return self._record(result)
        holder = run_dir_holder(run_dir)
        if holder is not None:
            message = f"run directory {run_dir} is in use by {holder}; not started"
            log.error("%s: %s", run.run_name, message)
            return self._record(self._result(run, "failed", None, 0.0, [], message))
        teacher = self.teacher_of(run)
        teacher_ckpt = self.by_name[teacher].run_dir() / "checkpoints" / "best_model.pth" if teacher else None
        resume_arg = run.resume_from or ("auto" if self.resume else None)
        devices = len(slot.gpus) if slot is not None and slot.gpus else 0
        if self.gpus_for is not None:
            devices = self.gpus_for(self.devices_of(run))
        export = self.export and exports_in_run(run)
        command = with_torchrun(
            child_command(run, self.flags_argv, teacher_ckpt, resume_arg, export), devices
        )
        self.commands[run.run_name] = (command, resume_arg)
        where = slot.label if slot is not None else f"{devices} GPU"
        if self.job_kind:
            where += f" as a {self.job_kind}"
        visible = slot.env().get("CUDA_VISIBLE_DEVICES") if slot is not None else None
        header = (
            f"# kdlab runner: {run.run_name} on {where}"
            + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")
            + f" at {time.time():.3f}"
        )
        log.info(
            "[%d/%d] %s: %s", self.order[run.run_name] + 1, len(self.order), run.run_name, " ".join(command)
        )
        env = {**self.env, **(slot.env() if slot is not None else {})}
        staging = self.output_dir / ".runner" / f"{run.run_name}.stdout.txt"
        keep_child_log(
            staging, run_dir, append=True
        )  # what a killed runner's child wrote is kept, not overwritten
        return ChildSpec(command, env, staging, devices=devices, header=header)

    def skip(self, run: PlannedRun, reason: str) -> RunResult:
        log.error("skipping %s: %s", run.run_name, reason)
        return self._record(self._result(run, "skipped", None, 0.0, [], reason))

    def finish(self, run: PlannedRun, code: int, seconds: float, slot: Slot | None) -> RunResult:
        command, resume_arg = self.commands.get(run.run_name, ([], None))
        run_dir = run.run_dir()
        staging = self.output_dir / ".runner" / f"{run.run_name}.stdout.txt"
        final_log = keep_child_log(staging, run_dir, append=bool(resume_arg))
        status = {0: "completed", 130: "interrupted", 143: "interrupted"}.get(code, "failed")
        export = recorded_export(run_dir) if "--export_onnx" in command and status == "completed" else None
        teacher = self.teacher_of(run)
        if status == "failed" and teacher and self.results.get(teacher, None) is not None:
            if self.results[teacher].status not in ("completed", "exists"):  # a cluster job cancelled with it
                status = "skipped"
        result = self._result(
            run, status, code, seconds, command, error_tail(final_log) if status != "completed" else ""
        )
        result.export = export
        log.info("%s: %s (exit %d) in %.1f s", run.run_name, status, code, seconds)
        return self._record(result)

    def stops(self, result: RunResult) -> bool:
        if result.status == "interrupted":
            return True
        if result.status == "failed" and self.fail_fast:
            log.error("--fail_fast: stopping after %s failed", result.name)
            return True
        return False


def run_all(
    planned: list[PlannedRun],
    flags_argv: list[str],
    output_dir: Path,
    resume: bool = False,
    fail_fast: bool = False,
    skip_training: bool = False,
    *,
    gpus: list[int] | None = None,
    parallel: int | None = None,
    threads_per_run: int | None = None,
    launcher: Launcher | None = None,
    on_result: Callable[[RunResult], None] | None = None,
    export: bool = False,
) -> list[RunResult]:
    """Train every planned run (or, with skip_training, just collect the existing ones), in plan order.

    `parallel`/`gpus` run several at once on this machine (kdlab.experiments.scheduler); `launcher` replaces
    local processes with cluster jobs (kdlab.experiments.slurm). `on_result` is called as each run ends.
    `export`: each trained run exports itself to ONNX in its own process (`--export_onnx`)."""
    if skip_training:
        results = []
        for run in planned:
            run_dir = run.run_dir()
            best = run_dir / "checkpoints" / "best_model.pth"
            exists = best.is_file()
            results.append(RunResult(
                run.run_name, run.config_name, str(run_dir), "exists" if exists else "missing", None, 0.0, [],
                "" if exists else f"no {best}", run.config.model_dump(mode="json"),
                seed=run.seed, group=run.group or run.run_name,
            ))  # fmt: skip
        return results
    gpus_for = getattr(launcher, "gpus_for", None)
    book = SuiteBook(planned, flags_argv, output_dir, resume, fail_fast, on_result, gpus_for=gpus_for,
                     job_kind=getattr(launcher, "job_kind", None), export=export,
                     adopt=getattr(launcher, "recorded_job", None))  # fmt: skip
    if launcher is None:
        launcher, pool = ProcessLauncher(), SlotPool(gpus, parallel, threads=threads_per_run)
    else:
        pool = None if launcher.expresses_dependencies else SlotPool(None, parallel, threads=threads_per_run)
    schedule(planned, book, launcher, pool)
    return sorted(book.results.values(), key=lambda r: book.order[r.name])
