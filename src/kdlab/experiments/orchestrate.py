"""Run -> export -> report: the whole `run_experiments.py` workflow, returning its exit status."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from kdlab.errors import ConfigError
from kdlab.experiments.plan import PlannedRun, plan_runs
from kdlab.experiments.runner import RunResult, run_all
from kdlab.experiments.runs_record import RECORDED_AT, RUNS_FILE, record_runs
from kdlab.tasks import task_of

log = logging.getLogger(__name__)


def export_finished(results: list[Any]) -> None:
    """Export every finished run's student to ONNX that its own process did not export (runs trained earlier,
    the --export_onnx --skip_training pass), in this process on the run's `training.device`; a failure is
    recorded on the run, never raised. A task without an exporter is skipped (logged); an explicit
    --export_onnx naming one is refused earlier."""
    from kdlab.config.schema import ExportConfig
    from kdlab.experiments.export_runs import export_record, export_run_to_onnx, failed_export_record

    for result in results:
        if result.status not in ("completed", "exists"):
            continue
        if result.export is not None:  # exported by the process that trained it
            if not result.export.get("ok"):
                log.error("%s: ONNX export failed: %s", result.name, result.export.get("error"))
            continue
        exporter = task_of(result.config).exporter()
        if exporter is None:
            log.info("%s: ONNX export is not implemented for task=%s; skipped", result.name, run_task(result))
            continue
        try:
            planned_export = (result.config or {}).get("export")
            export_cfg = ExportConfig.model_validate(planned_export) if planned_export else None
            meta = export_run_to_onnx(result.run_dir, export_cfg=export_cfg)
            result.export = export_record(meta)
            log.info(
                "%s: exported best_model.onnx (parity %.2e)", result.name, meta["parity"]["max_abs_diff"]
            )
        except Exception as exc:  # recorded per run; the overall status turns non-zero
            result.export = failed_export_record(exc)
            log.error("%s: ONNX export failed: %s", result.name, exc)


def runs_of(records: list[dict[str, Any]]) -> list[RunResult]:
    """The records of experiment_runs.json as RunResults: keys this version does not know are left out (the
    file keeps them), and a record lacking a field is skipped with a warning."""
    known = {f.name for f in dataclasses.fields(RunResult)}
    runs = []
    for entry in records:
        try:
            runs.append(RunResult(**{k: v for k, v in entry.items() if k in known}))
        except TypeError as exc:
            log.warning("experiment_runs.json: ignoring the record of %s: %s", entry.get("name"), exc)
    return runs


def run_record(result: RunResult, recorded_at: float | None) -> dict[str, Any]:
    """A result as the record file holds it: its fields and when the runner recorded it (None: now)."""
    return {**dataclasses.asdict(result), RECORDED_AT: recorded_at}


def run_task(result: RunResult) -> str:
    return task_of(result.config).name


def same_task_runs(all_runs: list[RunResult], current: list[RunResult]) -> list[RunResult]:
    """Earlier runs of another task (classifiers beside people segmentation in one output dir) stay in
    experiment_runs.json but not in this table: their metrics have other columns."""
    tasks = {run_task(r) for r in current}
    return [r for r in all_runs if run_task(r) in tasks]


def orchestrate(
    configs: list[str],
    set_items: list[str],
    flags: dict[str, Any],
    flags_argv: list[str],
    sweeps: list[str],
    output_dir: Path | None,
    resume: bool,
    fail_fast: bool,
    skip_training: bool,
    export: bool,
    export_requested: bool = False,
    seeds: list[int] | None = None,
    seed_teachers: bool = False,
    resume_path: str | None = None,
    gpus: str | None = None,
    parallel: int | None = None,
    threads_per_run: int | None = None,
    executor: str = "local",
    slurm: dict[str, Any] | None = None,
) -> tuple[int, dict[str, Path]]:
    """Returns (exit status, paths of the written files by kind: "runs_json", "csv", "markdown", ...).

    `export_requested`: --export_onnx was given. `resume_path`: --resume PATH, valid for one planned run only.
    `gpus`/`parallel`: several runs at once on this machine; `executor` "slurm"/"submitit_local": submitit
    jobs, with `slurm` holding partition, gpus_per_run, timeout_min, cpus_per_run.
    """
    from kdlab.experiments.report import RunRecord, collect_rows, write_report
    from kdlab.experiments.report_latency import measure_report_latency
    from kdlab.experiments.scheduler import SlotPool, parse_gpus

    planned = plan_runs(configs, set_items, flags, sweeps, seeds=seeds, seed_teachers=seed_teachers)
    if resume_path is not None:
        attach_resume_path(planned, resume_path)
    if export_requested:
        for p in planned:
            if task_of(p.config).exporter() is None:
                raise ConfigError(
                    f"--export_onnx: ONNX export is not implemented for task={p.config.task} ({p.run_name}); "
                    "drop --export_onnx or those configs"
                )
    out = output_dir or Path(planned[0].config.output_dir)
    gpu_ids = parse_gpus(gpus)
    SlotPool(gpu_ids, parallel, threads=threads_per_run)  # checks the flags before anything runs
    launcher = None
    if executor != "local" and not skip_training:
        if gpu_ids is not None:
            raise ConfigError(
                f"--gpus places runs on this machine; with --executor {executor} use --slurm_gpus_per_run"
            )
        from kdlab.experiments.slurm import SubmititLauncher

        launcher = SubmititLauncher(executor, out / ".submitit", **(slurm or {}))
    runs_json = out / RUNS_FILE
    order = {p.run_name: i for i, p in enumerate(planned)}
    done: list[RunResult] = []
    recorded_at: dict[str, float] = {}

    def record(result: RunResult) -> None:  # each run's result on disk as it ends: a killed runner loses none
        recorded_at[result.name] = time.time()
        done.append(result)
        # merged into the file as it is now (under its lock): what other runners recorded meanwhile stays
        ordered = sorted(done, key=lambda r: order[r.name])
        record_runs(runs_json, [run_record(r, recorded_at[r.name]) for r in ordered])

    results = run_all(
        planned, flags_argv, out, resume=resume, fail_fast=fail_fast, skip_training=skip_training,
        gpus=gpu_ids, parallel=parallel, threads_per_run=threads_per_run, launcher=launcher, on_result=None if skip_training else record,
        export=export,
    )  # fmt: skip
    if export:
        export_finished(results)
    # the exports, and the results of a --skip_training pass; the report covers every run the file holds
    all_runs = runs_of(record_runs(runs_json, [run_record(r, recorded_at.get(r.name)) for r in results]))
    records = [
        RunRecord(
            name=r.name,
            run_dir=Path(r.run_dir),
            status=r.status,
            exit_code=r.exit_code,
            duration_s=r.duration_s,
            seed=r.seed,
            group=r.group,
        )
        for r in same_task_runs(all_runs, results)
    ]
    latency = measure_report_latency([(r.name, r.run_dir) for r in records if r.run_dir is not None], out)
    paths = write_report(collect_rows(records, latency), out, records)
    paths["runs_json"] = runs_json
    ok_status = {"completed", "exists"}
    failed = [r.name for r in results if r.status not in ok_status]
    failed += [r.name for r in results if r.export is not None and not r.export.get("ok")]
    not_run = [p.run_name for p in planned if p.run_name not in {r.name for r in results}]
    if failed or not_run:
        log.error("not successful: %s", ", ".join(sorted(set(failed + not_run))))
    return (1 if failed or not_run else 0), paths


def attach_resume_path(planned: list[PlannedRun], resume_path: str) -> None:
    """--resume PATH continues exactly one run from that checkpoint; anything else is bad input."""
    if len(planned) != 1:
        names = ", ".join(p.run_name for p in planned)
        raise ConfigError(
            f"--resume {resume_path} names one run's checkpoint, but {len(planned)} runs are planned ({names}); "
            "give one config (and no --seeds/--sweep), or the bare --resume to continue every run"
        )
    if not Path(resume_path).is_file():
        raise ConfigError(f"--resume checkpoint {resume_path} does not exist")
    planned[0].resume_from = resume_path
