"""One experiment end to end, as a straight sequence of named steps, each done once:

1. `set_up_process`  device, DDP, determinism, seed;
2. `check_inputs`    resume checkpoint, data paths, output dir, teachers or teacher cache, datasets, model,
                     resume compatibility: everything that can fail on bad input, with nothing written yet;
3. `prepare_run_dir` the first write: <output_dir>/<name>/ and its config.json;
4. `build_parts`     loaders, evaluator, the plain or KD loss task (generating a missing teacher cache);
5. train             the shared `Trainer`;
6. `evaluate_selected_on_test`  the checkpoint selected on val (best_model.pth) scored once on the held-out
                     test split, when there is one (summary.json `test_metrics`);
7. `summarise`       summary (written by the trainer) plus the ONNX export when configured.

What differs between tasks comes from the config's task object (`kdlab.tasks.task_of`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdlab.atomic_io import atomic_write, write_json_atomic
from kdlab.checkpoints import load_checkpoint, load_weights
from kdlab.config.loader import validate_config
from kdlab.config.schema import ExperimentConfig
from kdlab.distill.teacher import LoadedTeacher
from kdlab.engine import distributed
from kdlab.engine.device import (
    check_resume_threads,
    resolve_amp_dtype,
    resolve_device,
    set_up_determinism,
)
from kdlab.engine.trainer import Trainer
from kdlab.errors import CheckpointError, ConfigError
from kdlab.experiments.cache_plan import TeacherCachePlan, plan_teacher_cache
from kdlab.experiments.kd_setup import build_kd_task, check_teacher_unchanged, load_teachers
from kdlab.experiments.run_dir import (
    check_output_dir_writable,
    check_run_dir_free,
    find_resume_checkpoint,
    prepare_run_dir,
    run_dir_for,
    run_dir_of,
)
from kdlab.experiments.run_lock import acquire_run_lock, release_run_lock
from kdlab.tasks import TaskDefinition, task_of

log = logging.getLogger(__name__)

# What the test pass scores and writes, relative to the run directory.
TEST_CHECKPOINT = "checkpoints/best_model.pth"  # the checkpoint selected on val (eval/EMA weights)
TEST_PER_IMAGE = "logs/test_per_image.npz"


@dataclass
class RunRequest:
    config: ExperimentConfig
    resume: str | None = None  # a checkpoint path, or "auto" for <run>/checkpoints/last.pth
    overwrite: bool = False
    test_only: bool = False
    show_progress: bool = True
    allow_teacher_change: bool = False
    # The runner's children: export after training (export.onnx on), and a failed export is recorded in
    # summary.json and logged, not raised, so the run (and, under Slurm, its students' afterok) stands.
    export_in_run: bool = False


@dataclass
class Process:
    device: torch.device
    ctx: distributed.DistContext
    amp_dtype: torch.dtype | None = None
    threads: int | None = None  # the CPU thread count a deterministic run pinned (set_up_determinism)


@dataclass
class CheckedInputs:
    """What step 2 established; nothing of it has written a file."""

    task: TaskDefinition
    resume_path: Path | None
    resume_payload: dict[str, Any] | None
    auto_fresh: bool  # --resume auto on a run that never wrote last.pth: start over in its directory
    cache_plan: TeacherCachePlan | None
    teachers: list[LoadedTeacher]
    train_set: Any
    val_set: Any
    model: torch.nn.Module
    evaluator: Any
    shard: dict[str, int] = field(default_factory=dict)
    test_set: Any = None  # the held-out test split (None: not configured); never used for selection


def set_up_process(cfg: ExperimentConfig) -> Process:
    device = resolve_device(cfg.training.device)
    ctx = distributed.init_distributed(device.type)
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    if not ctx.is_main:
        logging.getLogger("kdlab").setLevel(logging.WARNING)
    threads = set_up_determinism(device) if cfg.training.deterministic else None
    torch.manual_seed(cfg.training.seed)
    return Process(device, ctx, resolve_amp_dtype(cfg.training.amp, device), threads)


def recorded_threads(payload: dict[str, Any], resume_path: Path, cfg: ExperimentConfig) -> int | None:
    """The CPU thread count a run was trained with: the checkpoint's provenance when it has one, else the
    provenance in its run's summary.json (written at every epoch end and when a run stops); None if unknown."""
    provenance = payload.get("provenance")
    if not isinstance(provenance, dict):
        try:
            summary = json.loads((run_dir_of(resume_path, cfg) / "summary.json").read_text())
        except (OSError, ValueError):
            return None
        provenance = summary.get("provenance") if isinstance(summary, dict) else None
    threads = provenance.get("threads") if isinstance(provenance, dict) else None
    return threads if isinstance(threads, int) else None


def check_monitor(cfg: ExperimentConfig, task: TaskDefinition) -> None:
    """training.monitor must be a metric the task's evaluator reports."""
    monitor = cfg.training.monitor
    valid = task.metric_names(cfg)
    if monitor is not None and monitor not in valid:
        raise ConfigError(
            f"training.monitor={monitor!r} is not a validation metric of the {cfg.task} task; valid: "
            + ", ".join(valid)
        )


def check_inputs(request: RunRequest, proc: Process) -> CheckedInputs:
    cfg = request.config
    task = task_of(cfg)
    check_monitor(cfg, task)
    wandb = cfg.logging.wandb
    if wandb is not None and wandb.mode != "disabled":
        from kdlab.engine.wandb_sink import import_wandb

        import_wandb()  # a missing optional package is bad input, found before anything is written
    resume_path, payload, auto_fresh = None, None, False
    if request.resume:
        resume_path = find_resume_checkpoint(request.resume, cfg)
        auto_fresh = resume_path is None
        if resume_path is not None:
            payload = load_checkpoint(resume_path)
            if proc.threads is not None and proc.device.type == "cpu" and not request.test_only:
                check_resume_threads(recorded_threads(payload, resume_path, cfg), proc.threads, resume_path)
    task.check_inputs(cfg)
    training = not request.test_only
    if training:
        check_output_dir_writable(cfg.output_dir)
        if resume_path is None and not auto_fresh:
            check_run_dir_free(run_dir_for(cfg), request.overwrite)
    distilling = cfg.distillation.enabled and training
    cache_plan = (
        plan_teacher_cache(cfg, request.overwrite, resume_path)
        if distilling and cfg.distillation.cache is not None
        else None
    )
    teachers = load_teachers(cfg) if distilling and cache_plan is None else []
    if payload is not None and teachers:
        check_teacher_unchanged(payload, teachers, resume_path, request.allow_teacher_change)
    ctx = proc.ctx
    if not ctx.is_main:
        distributed.barrier()  # rank 0 generates any synthetic data first
    train_set, val_set = task.build_datasets(cfg)
    test_set = task.build_test_dataset(cfg)
    if ctx.enabled and ctx.is_main:
        distributed.barrier()
    # Re-seeded here so the student's initial weights depend on the seed alone, not on whether a teacher was
    # built first: a distilled student starts from exactly the baseline's weights (a fair comparison), and
    # live and cached distillation start alike.
    torch.manual_seed(cfg.training.seed)
    model = task.build_model(cfg)
    shard = {"rank": ctx.rank, "world_size": ctx.world_size}
    val_loader = task.build_loader(
        val_set, cfg.training.batch_size, **_loader_options(cfg, proc, shard, False)
    )
    evaluator = task.build_evaluator(
        cfg, val_loader, proc.device, proc.amp_dtype, request.show_progress, ctx.is_main
    )
    if training and payload is not None:
        if "optimizer_state_dict" not in payload:
            raise CheckpointError(
                f"checkpoint {resume_path} holds only model weights (e.g. best_model.pth); resume from "
                "checkpoints/last.pth"
            )
        load_weights(model, payload["model_state_dict"], resume_path)
    if cache_plan is not None:
        cache_plan.check(cfg, train_set, val_set, payload, request.allow_teacher_change)
    return CheckedInputs(task, resume_path, payload, auto_fresh, cache_plan, teachers, train_set, val_set,
                         model, evaluator, shard, test_set)  # fmt: skip


def _loader_options(
    cfg: ExperimentConfig, proc: Process, shard: dict[str, int], shuffle: bool
) -> dict[str, Any]:
    return {"shuffle": shuffle, "seed": cfg.training.seed, "num_workers": cfg.data.num_workers,
            "pin_memory": proc.device.type == "cuda", **shard}  # fmt: skip


def prepare_run(request: RunRequest, inputs: CheckedInputs, proc: Process) -> Path:
    cfg = request.config
    run_dir = run_dir_of(inputs.resume_path, cfg)
    if proc.ctx.is_main:
        resuming = inputs.resume_path is not None or inputs.auto_fresh
        if run_dir.is_dir():
            acquire_run_lock(run_dir)  # before anything in it is touched (--overwrite removes it)
        prepare_run_dir(run_dir, request.overwrite, resuming=resuming)
        acquire_run_lock(run_dir)  # held until the process ends: one writer per run directory
        write_json_atomic(run_dir / "config.json", cfg.model_dump(mode="json"))
        log.info("run directory: %s", run_dir.resolve())
    distributed.barrier()
    return run_dir


def build_trainer(request: RunRequest, inputs: CheckedInputs, proc: Process, run_dir: Path) -> Trainer:
    cfg, task, model = request.config, inputs.task, inputs.model
    train_set = inputs.train_set
    if inputs.cache_plan is not None:
        train_set = inputs.cache_plan.train_set(
            cfg, train_set, inputs.val_set, proc.device, request.show_progress
        )
    train_loader = task.build_loader(
        train_set, cfg.training.batch_size, **_loader_options(cfg, proc, inputs.shard, True)
    )
    # test_images > 0 tells the runner that a "completed" summary without test_metrics still owes its test pass
    test_images = len(inputs.test_set) if inputs.test_set is not None else 0
    extra = {"config_name": cfg.name, "train_images": len(train_set), "val_images": len(inputs.val_set),
             "test_images": test_images, **task.summary_extra(cfg, model)}  # fmt: skip
    if inputs.cache_plan is not None:
        loss_task, teacher_eval_model, teacher_records, ema = inputs.cache_plan.kd_parts(cfg, model)
        extra["teacher_cache"] = inputs.cache_plan.summary()
    elif cfg.distillation.enabled:
        loss_task, teacher_eval_model, teacher_records, ema = build_kd_task(
            cfg, model, inputs.teachers, proc.device
        )
    else:
        loss_task, teacher_eval_model, teacher_records, ema = task.plain_task(cfg), None, [], None
    trainer = Trainer(cfg, model, loss_task, train_loader, inputs.evaluator, run_dir, proc.device,
                      show_progress=request.show_progress, extra_summary=extra,
                      teacher_eval_model=teacher_eval_model, teacher_records=teacher_records, ema=ema,
                      best_metric=task.best_metric, write_pictures=task.write_pictures)  # fmt: skip
    if inputs.resume_path is not None:
        trainer.resume_from(inputs.resume_path, inputs.resume_payload)
    log.info(
        "training %s (%s): %s, %d epochs, device %s, amp %s",
        cfg.name, cfg.task, task.describe_model(cfg, model), cfg.training.epochs, proc.device,
        trainer.amp_dtype or "off",
    )  # fmt: skip
    return trainer


def build_test_evaluator(
    cfg: ExperimentConfig, inputs: CheckedInputs, proc: Process, show_progress: bool
) -> Any:
    """The task's test evaluator over the test split, sharded across ranks like validation."""
    loader = inputs.task.build_loader(
        inputs.test_set, cfg.training.batch_size, **_loader_options(cfg, proc, inputs.shard, False)
    )
    return inputs.task.build_test_evaluator(
        cfg, loader, proc.device, proc.amp_dtype, show_progress, proc.ctx.is_main
    )


def evaluate_selected_on_test(
    cfg: ExperimentConfig,
    inputs: CheckedInputs,
    proc: Process,
    run_dir: Path,
    summary: dict[str, Any],
    show_progress: bool = True,
) -> dict[str, Any]:
    """Score the checkpoint chosen on val (best_model.pth) once on the held-out test split: summary.json gets
    `test_metrics` and `test`, and a task that keeps per-image sums writes logs/test_per_image.npz first.

    Selection and reporting on one split inflate every number; here val picks, test reports. Runs after
    every completed fit, a resumed finished run included, so a run killed during this pass redoes it with
    `--resume auto`. Every rank evaluates its shard (collectives inside the evaluator); rank 0 writes."""
    if inputs.test_set is None or summary.get("status") != "completed":
        return summary
    distributed.barrier()  # rank 0 renamed best_model.pth into place; now every rank reads it
    path = run_dir / TEST_CHECKPOINT
    if not path.is_file():
        log.warning("test: %s does not exist (no validation produced a best checkpoint); not evaluated", path)
        return summary
    payload = load_checkpoint(path)
    load_weights(inputs.model, payload["model_state_dict"], path)
    inputs.model.to(proc.device)
    evaluator = build_test_evaluator(cfg, inputs, proc, show_progress)
    metrics, _ = evaluator(inputs.model, desc="test")
    epoch = int(payload.get("epoch", summary.get("best_epoch", 0)))
    summary["test_metrics"] = {k: _json_number(v) for k, v in metrics.items()}
    summary["test"] = {"images": int(metrics.get("images", 0)), "checkpoint": TEST_CHECKPOINT, "epoch": epoch,
                       "selected_on": "val"}  # fmt: skip
    per_image = inputs.task.test_per_image(evaluator)
    if proc.ctx.is_main:
        if per_image is not None:  # before summary.json: test_metrics there means the file is complete
            write_npz_atomic(run_dir / TEST_PER_IMAGE, per_image)
        write_json_atomic(run_dir / "summary.json", summary)
    name = summary.get("best_metric_name") or inputs.task.best_metric
    with logged_to_run(run_dir, proc.ctx.is_main):
        log.info(
            "test: %s %.4f on %d test images (checkpoint of epoch %d, selected on val)",
            name, metrics.get(name, math.nan), summary["test"]["images"], epoch,
        )  # fmt: skip
    return summary


@contextlib.contextmanager
def logged_to_run(run_dir: Path, enabled: bool) -> Iterator[None]:
    """Also append kdlab's log lines to the run's logs/training_log.txt (the trainer closed its handler), so
    the test result stands in the run's own log after the epochs."""
    if not enabled:
        yield
        return
    handler = logging.FileHandler(run_dir / "logs" / "training_log.txt", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("kdlab")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()


def write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """`np.savez` through a temp file and a rename (a file object: savez would append .npz to the temp name)."""

    def write(tmp: Path) -> None:
        with tmp.open("wb") as fh:
            np.savez(fh, **arrays)

    return atomic_write(path, write)


def _json_number(value: Any) -> Any:
    """NaN/inf become null, as in final_metrics (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def summarise(
    cfg: ExperimentConfig,
    summary: dict[str, Any],
    run_dir: Path,
    proc: Process,
    record_failure: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """The run's summary, with the ONNX export when `export.onnx` is on: made here, in the process (and on the
    device, and under Slurm in the job) that trained the run. Its outcome goes into summary.json's `export`,
    where the runner reads it; a failed export is recorded there, then raised (the run trained; the export
    did not work), or with `record_failure` only logged."""
    summary["run_dir"] = str(run_dir)
    if cfg.export.onnx and proc.ctx.is_main and summary.get("status") == "completed":
        from kdlab.experiments.export_runs import export_record, export_run_to_onnx, failed_export_record

        try:
            meta = export_run_to_onnx(
                run_dir, opset=cfg.export.opset, export_cfg=cfg.export, device=proc.device,
                show_progress=show_progress,
            )  # fmt: skip
        except Exception as exc:
            summary["export"] = failed_export_record(exc)
            write_json_atomic(run_dir / "summary.json", summary)
            if not record_failure:
                raise
            log.error("%s: ONNX export failed: %s", cfg.name, exc)
            return summary
        summary["export"] = export_record(meta)
        write_json_atomic(run_dir / "summary.json", summary)
    return summary


def execute(request: RunRequest) -> dict[str, Any]:
    """Train (or with test_only, evaluate) one experiment; returns its summary / metrics."""
    proc = set_up_process(request.config)
    inputs = check_inputs(request, proc)
    if request.test_only:
        return evaluate_only(request.config, inputs, proc, request.show_progress)
    run_dir = prepare_run(request, inputs, proc)
    try:
        trainer = build_trainer(request, inputs, proc, run_dir)
        summary = evaluate_selected_on_test(
            request.config, inputs, proc, run_dir, trainer.fit(), request.show_progress
        )
        return summarise(
            request.config, summary, run_dir, proc, record_failure=request.export_in_run,
            show_progress=request.show_progress,
        )  # fmt: skip
    finally:
        if proc.ctx.is_main:
            release_run_lock(run_dir)


def evaluate_only(
    cfg: ExperimentConfig, inputs: CheckedInputs, proc: Process, show_progress: bool = True
) -> dict[str, Any]:
    """--test_only: evaluate the given checkpoint (default: the run's best_model.pth) on the test split when
    the config has one, else on the val set; `split` in the result (and test_metrics.json) says which."""
    run_dir = run_dir_of(inputs.resume_path, cfg)
    payload, path = inputs.resume_payload, inputs.resume_path
    if payload is None:
        path = run_dir / TEST_CHECKPOINT
        payload = load_checkpoint(path)
    load_weights(inputs.model, payload["model_state_dict"], path)
    inputs.model.to(proc.device)
    split, evaluator = "val", inputs.evaluator
    if inputs.test_set is not None:
        split, evaluator = "test", build_test_evaluator(cfg, inputs, proc, show_progress)
    metrics, _ = evaluator(inputs.model, desc=split)
    result = {"checkpoint": str(path), "split": split, "metrics": metrics}
    if run_dir.is_dir() and proc.ctx.is_main:
        write_json_atomic(run_dir / "test_metrics.json", result)
    return result


def config_from_checkpoint(path: str) -> ExperimentConfig:
    """The resolved config stored inside a checkpoint (used by --resume without --config)."""
    payload = load_checkpoint(path)
    if "config" not in payload:
        raise CheckpointError(f"checkpoint {path} holds no config; pass --config as well")
    return validate_config(payload["config"], where=f"checkpoint {path}")
