"""Run -> export -> report: the whole `run_experiments.py` workflow, returning its exit status."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

from kdlab.errors import ConfigError
from kdlab.experiments.runner import PlannedRun, RunResult, plan_runs, run_all, write_runs_json
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


def read_runs(path: Path) -> list[RunResult]:
    """The runs recorded in experiment_runs.json ([] when there is none or it cannot be read)."""
    if not path.is_file():
        return []
    try:
        return [RunResult(**entry) for entry in json.loads(path.read_text())]
    except (json.JSONDecodeError, TypeError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return []


def merge_runs(previous: list[RunResult], results: list[RunResult]) -> list[RunResult]:
    """Earlier runs stay in the table; this invocation's results replace entries of the same name (an
    export-only pass keeps the original training record and adds the export)."""
    merged = {r.name: copy.copy(r) for r in previous}
    for r in results:
        earlier = merged.get(r.name)
        if r.status == "exists" and earlier is not None and earlier.status == "completed":
            earlier.export = r.export
            continue
        merged[r.name] = r
    return list(merged.values())


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
    runs_json = out / "experiment_runs.json"
    previous = read_runs(runs_json)
    order = {p.run_name: i for i, p in enumerate(planned)}
    done: list[RunResult] = []

    def record(result: RunResult) -> None:  # each run's result on disk as it ends: a killed runner loses none
        done.append(result)
        write_runs_json(merge_runs(previous, sorted(done, key=lambda r: order[r.name])), runs_json)

    results = run_all(
        planned, flags_argv, out, resume=resume, fail_fast=fail_fast, skip_training=skip_training,
        gpus=gpu_ids, parallel=parallel, threads_per_run=threads_per_run, launcher=launcher, on_result=None if skip_training else record,
        export=export,
    )  # fmt: skip
    if export:
        export_finished(results)
    all_runs = merge_runs(previous, results)
    write_runs_json(all_runs, out / "experiment_runs.json")
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
    paths["runs_json"] = out / "experiment_runs.json"
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
