"""One experiment end to end: validate inputs, prepare the run directory, train or evaluate.

Everything that can fail on bad input (config, data files, model, checkpoint) is checked before the run
directory is created or touched, so a typo never costs files already on disk. What differs between
tasks (data, model, loss, evaluator) comes from the config's `TaskSpec` (`kdlab.experiments.task_specs`).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdlab.atomic_io import write_json_atomic
from kdlab.config.loader import validate_config
from kdlab.config.schema import ExperimentConfig
from kdlab.distill.ema import ModelEMA
from kdlab.distill.kd_task import KDTask
from kdlab.distill.teacher import FrozenTeacher, LoadedTeacher, file_sha256, load_teacher
from kdlab.engine import distributed
from kdlab.engine.checkpoint import load_checkpoint
from kdlab.engine.compile import compile_forward
from kdlab.engine.trainer import Trainer, resolve_amp_dtype, resolve_device
from kdlab.errors import CheckpointError, ConfigError, DataError, KdlabInputError
from kdlab.evaluate.evaluator import SegmentationEvaluator
from kdlab.experiments.task_specs import build_model_for, check_teacher_task, task_spec

log = logging.getLogger(__name__)


@dataclass
class RunRequest:
    config: ExperimentConfig
    resume: str | None = None  # a checkpoint path, or "auto" for <run>/checkpoints/last.pth
    overwrite: bool = False
    test_only: bool = False
    show_progress: bool = True
    allow_teacher_change: bool = False


def run_dir_for(cfg: ExperimentConfig) -> Path:
    return Path(cfg.output_dir) / cfg.name


def find_resume_checkpoint(resume: str, cfg: ExperimentConfig) -> Path | None:
    """The checkpoint to resume from; `auto` means <run>/checkpoints/last.pth, or None (start fresh) when the
    run has none yet, so one command serves every restart of a pre-emptible job."""
    if resume == "auto":
        path = run_dir_for(cfg) / "checkpoints" / "last.pth"
        if not path.is_file():
            log.info("--resume auto: no %s yet; starting the run from scratch", path)
            return None
        return path
    path = Path(resume)
    if not path.is_file():
        raise CheckpointError(f"--resume checkpoint {resume} does not exist")
    return path


def run_dir_of_checkpoint(path: Path, cfg: ExperimentConfig) -> Path:
    """A checkpoint in <run>/checkpoints/ belongs to <run>; anything else continues in the configured run dir."""
    return path.parent.parent if path.parent.name == "checkpoints" else run_dir_for(cfg)


def check_output_dir_writable(output_dir: str) -> None:
    """Fail before any work when run directories cannot be created under `output_dir`."""
    ancestor = Path(output_dir).absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise KdlabInputError(
            f"output_dir {output_dir} cannot be created: {ancestor} is a file, not a directory; "
            "choose another --output_dir"
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise KdlabInputError(
            f"output_dir {output_dir} is not writable ({ancestor}); choose another --output_dir"
        )


def _check_run_dir_free(run_dir: Path, overwrite: bool) -> None:
    """Refuse (before any work) to start a new run over an existing run directory."""
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise KdlabInputError(
            f"run directory {run_dir} already exists; continue it with --resume "
            f"{run_dir / 'checkpoints' / 'last.pth'}, pass --overwrite to replace it, or choose another "
            "--output_dir / --set name=..."
        )


def _prepare_run_dir(run_dir: Path, overwrite: bool, resuming: bool) -> None:
    if not resuming:
        _check_run_dir_free(run_dir, overwrite)
        if run_dir.exists() and any(run_dir.iterdir()):
            log.warning("--overwrite: removing the existing run directory %s", run_dir)
            shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def execute(request: RunRequest) -> dict[str, Any]:
    """Train (or with test_only, evaluate) one experiment; returns its summary / metrics."""
    cfg = request.config
    resume_path: Path | None = None
    resume_payload: dict[str, Any] | None = None
    auto_fresh = False  # --resume auto on a run that never wrote last.pth: start over in its directory
    if request.resume:
        resume_path = find_resume_checkpoint(request.resume, cfg)
        auto_fresh = resume_path is None
        if resume_path is not None:
            resume_payload = load_checkpoint(resume_path)
    spec = task_spec(cfg)
    spec.check_inputs(cfg)
    if not request.test_only:
        check_output_dir_writable(cfg.output_dir)
    if not request.test_only and resume_path is None and not auto_fresh:
        _check_run_dir_free(run_dir_for(cfg), request.overwrite)
    device = resolve_device(cfg.training.device)
    ctx = distributed.init_distributed(device.type)
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    if not ctx.is_main:
        logging.getLogger("kdlab").setLevel(logging.WARNING)
    if cfg.training.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    torch.manual_seed(cfg.training.seed)

    cache_plan = (
        plan_teacher_cache(cfg, request, resume_path)
        if cfg.distillation.enabled and cfg.distillation.cache is not None and not request.test_only
        else None
    )
    live_teachers = cfg.distillation.enabled and cache_plan is None and not request.test_only
    teachers = load_teachers(cfg) if live_teachers else []
    if resume_payload is not None and teachers:
        check_teacher_unchanged(resume_payload, teachers, resume_path, request.allow_teacher_change)
    if not ctx.is_main:
        distributed.barrier()  # rank 0 generates any synthetic data first
    train_set, val_set = spec.build_datasets(cfg)
    if ctx.enabled and ctx.is_main:
        distributed.barrier()
    # Re-seeded here so the student's initial weights depend on the seed alone, not on whether a teacher was
    # built first: a distilled student starts from exactly the baseline's weights (a fair comparison), and
    # live and cached distillation start alike.
    torch.manual_seed(cfg.training.seed)
    model = build_model_for(cfg)
    amp_dtype = resolve_amp_dtype(cfg.training.amp, device)
    shard = {"rank": ctx.rank, "world_size": ctx.world_size}
    val_loader = spec.build_loader(
        val_set, cfg.training.batch_size, shuffle=False, seed=cfg.training.seed,
        num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda", **shard,
    )  # fmt: skip
    evaluator = spec.build_evaluator(cfg, val_loader, device, amp_dtype, request.show_progress, ctx.is_main)

    if request.test_only:
        return _test_only(request, cfg, model, evaluator, device, resume_path, resume_payload)

    if resume_payload is not None:
        check_resumable(resume_payload, resume_path, model)  # before the run directory is touched
    if cache_plan is not None:
        cache_plan.check(cfg, train_set, val_set, resume_payload, request.allow_teacher_change)
    run_dir = run_dir_of_checkpoint(resume_path, cfg) if resume_path else run_dir_for(cfg)
    if ctx.is_main:
        _prepare_run_dir(run_dir, request.overwrite, resuming=resume_path is not None or auto_fresh)
        write_json_atomic(run_dir / "config.json", cfg.model_dump(mode="json"))
        log.info("run directory: %s", run_dir.resolve())
    distributed.barrier()

    if cache_plan is not None:
        train_set = cache_plan.train_set(cfg, train_set, val_set, device, request.show_progress)
    train_loader = spec.build_loader(
        train_set, cfg.training.batch_size, shuffle=True, seed=cfg.training.seed,
        num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda", **shard,
    )  # fmt: skip
    extra = {
        "config_name": cfg.name,
        "train_images": len(train_set),
        "val_images": len(val_set),
        **spec.summary_extra(cfg),
    }
    if cache_plan is not None:
        task, teacher_eval_model, teacher_records, ema = cache_plan.kd_parts(cfg, model)
        extra["teacher_cache"] = cache_plan.summary()
    else:
        task, teacher_eval_model, teacher_records, ema = (
            spec.build_kd_task(cfg, model, teachers, device) if cfg.distillation.enabled else
            (spec.plain_task(cfg), None, [], None)
        )  # fmt: skip
    trainer = Trainer(cfg, model, task, train_loader, evaluator, run_dir, device,
                      show_progress=request.show_progress, extra_summary=extra,
                      teacher_eval_model=teacher_eval_model, teacher_records=teacher_records, ema=ema,
                      best_metric=spec.best_metric)  # fmt: skip
    if resume_path is not None:
        trainer.resume_from(resume_path, resume_payload)
    log.info(
        "training %s (%s): %s, %d epochs, device %s, amp %s",
        cfg.name, cfg.task, spec.describe_model(cfg, model), cfg.training.epochs, device,
        trainer.amp_dtype or "off",
    )  # fmt: skip
    summary = trainer.fit()
    summary["run_dir"] = str(run_dir)
    if cfg.export.onnx and ctx.is_main:
        from kdlab.export import exporter_for_task
        from kdlab.export.pipeline import export_run_to_onnx

        meta = export_run_to_onnx(run_dir, exporter_for_task(cfg.task), opset=cfg.export.opset)
        summary["onnx"] = {"parity_max_abs_diff": meta["parity"]["max_abs_diff"],
                           "onnx_ms_per_image": meta["latency"]["onnx_ms_per_image_median"]}  # fmt: skip
    return summary


def _test_only(
    request: RunRequest,
    cfg: ExperimentConfig,
    model: torch.nn.Module,
    evaluator: SegmentationEvaluator | Any,
    device: torch.device,
    resume_path: Path | None,
    payload: dict[str, Any] | None,
) -> dict[str, Any]:
    run_dir = run_dir_of_checkpoint(resume_path, cfg) if resume_path else run_dir_for(cfg)
    if payload is None:
        ckpt = run_dir / "checkpoints" / "best_model.pth"
        payload = load_checkpoint(ckpt)
        resume_path = ckpt
    try:
        model.load_state_dict(payload["model_state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {resume_path} does not match the configured model: {str(exc).splitlines()[0]}"
        ) from exc
    model.to(device)
    metrics, _ = evaluator(model, desc="test")
    result = {"checkpoint": str(resume_path), "metrics": metrics}
    if run_dir.is_dir():
        write_json_atomic(run_dir / "test_metrics.json", result)
    return result


def check_resumable(payload: dict[str, Any], path: Path | None, model: torch.nn.Module) -> None:
    """A resume checkpoint must be a full training state whose weights fit the configured model."""
    if "optimizer_state_dict" not in payload:
        raise CheckpointError(
            f"checkpoint {path} holds only model weights (e.g. best_model.pth); resume from checkpoints/last.pth"
        )
    try:
        model.load_state_dict(payload["model_state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {path} does not match the configured model: {str(exc).splitlines()[0]}"
        ) from exc


def load_teachers(cfg: ExperimentConfig) -> list[LoadedTeacher]:
    """Load every configured teacher strictly; each must fit the student's task (same task; for
    segmentation the same mask size, KD being per pixel; for classification the same class count)."""
    d = cfg.distillation
    specs = [(spec.checkpoint, spec.weight) for spec in d.teacher_specs()]
    if d.teacher_experiment and not d.teacher_checkpoint:
        specs.insert(0, (str(teacher_experiment_checkpoint(cfg)), 1.0))
    teachers = [
        load_teacher(path, weight, d.teacher_input_mean, d.teacher_input_std) for path, weight in specs
    ]
    for t in teachers:
        check_teacher_task(cfg, t)
    return teachers


def teacher_experiment_checkpoint(cfg: ExperimentConfig) -> Path:
    """Where `distillation.teacher_experiment`'s best model lives: <output_dir>/<name>/checkpoints/best_model.pth."""
    assert cfg.distillation.teacher_experiment
    return Path(cfg.output_dir) / cfg.distillation.teacher_experiment / "checkpoints" / "best_model.pth"


def check_teacher_unchanged(
    payload: dict[str, Any], teachers: list[LoadedTeacher], resume_path: Path | None, allow: bool
) -> None:
    """Refuse to resume a distillation run whose teacher file changed, unless the user allows it."""
    recorded = payload.get("teachers") or []
    for i, teacher in enumerate(teachers):
        before = recorded[i]["sha256"] if i < len(recorded) else None
        if before is not None and before != teacher.sha256:
            if allow:
                log.warning(
                    "teacher %s changed since the run started (--allow_teacher_change given)", teacher.path
                )
                continue
            raise CheckpointError(
                f"teacher {teacher.path} changed since {resume_path} was written (sha256 {before[:12]}... now "
                f"{teacher.sha256[:12]}...); pass --allow_teacher_change to resume with it anyway"
            )


def build_distillation(
    cfg: ExperimentConfig,
    model: torch.nn.Module,
    teachers: list[LoadedTeacher],
    device: torch.device,
    task_class: Any,
    example_inputs: tuple[torch.Tensor, ...],
) -> tuple[Any, torch.nn.Module | None, list[dict[str, Any]], ModelEMA | None]:
    """Any task's KD parts: `task_class(dcfg, loss_cfg, frozen teachers, feature distiller)`, the model
    evaluated as 'the teacher' before epoch 1, the teacher records and the EMA. `example_inputs` (CPU)
    size the feature adapters."""
    d = cfg.distillation
    ema = ModelEMA(model, cfg.training.ema.decay) if cfg.training.ema.enabled else None
    if d.self_distillation:
        frozen = [(FrozenTeacher(ema.module), 1.0)]  # type: ignore[union-attr]
        eval_model = None
    else:
        frozen = [(t.teacher.to(device), t.weight) for t in teachers]
        eval_model = frozen[0][0] if d.evaluate_teacher and frozen else None
    distiller = None
    if d.features:
        from kdlab.distill.features import FeatureDistiller

        pairs = [(f.student, f.teacher, f.weight) for f in d.features]
        distiller = FeatureDistiller(model, frozen[0][0].model, pairs)
        distiller.infer_channels(model, frozen[0][0].model.to("cpu"), *example_inputs)
        frozen[0][0].to(device)
    for teacher, _ in frozen if not d.self_distillation else []:
        if cfg.training.channels_last:  # the input is channels_last: no layout conversion at every conv
            teacher.to(memory_format=torch.channels_last)
        if cfg.training.compile:
            compile_forward(teacher.model, "teacher")
    records = [{"path": t.path, "sha256": t.sha256, "weight": t.weight} for t in teachers]
    return task_class(d, cfg.training.loss, frozen, distiller), eval_model, records, ema


@dataclass
class TeacherCachePlan:
    """Training from a teacher cache: which file, whether it exists or is generated, and which teacher.

    Everything that can be checked before the run directory is touched is (`plan_teacher_cache`, `check`);
    a missing cache is generated after it (`train_set`), into a temp file renamed when complete.
    """

    path: Path
    teacher: str | None
    hooks: Any
    info: Any = None  # CacheInfo once the file exists

    def check(
        self, cfg: ExperimentConfig, train_set: Any, val_set: Any, payload: dict[str, Any] | None, allow: bool
    ) -> None:
        """An existing cache must match the configured data, preprocessing and (when present) teacher."""
        if self.info is None:
            return
        teacher_sha = file_sha256(self.teacher) if self.teacher and Path(self.teacher).is_file() else None
        self.info.check_matches(
            cfg.task,
            self.hooks.preprocessing(cfg),
            self.hooks.fingerprints(cfg, train_set, val_set),
            teacher_sha,
        )
        self._check_heads(cfg)
        recorded = (payload or {}).get("teachers") or []
        before = recorded[0].get("sha256") if recorded else None
        if before is not None and before != self.info.teacher_sha256:
            if not allow:
                raise CheckpointError(
                    f"teacher cache {self.path} holds another teacher's outputs than when the run started "
                    f"(sha256 {before[:12]}... now {self.info.teacher_sha256[:12]}...); pass "
                    "--allow_teacher_change to resume with it anyway"
                )
            log.warning("teacher cache %s changed teacher since the run started (allowed)", self.path)

    def _check_heads(self, cfg: ExperimentConfig) -> None:
        missing = [h for h in self.hooks.required_heads(cfg) if h not in self.info.heads]
        if missing:
            raise DataError(
                f"teacher cache {self.path} has no {missing[0]} outputs (its teacher exported only "
                f"{', '.join(self.info.heads)}): set the matching distillation.*_weight to 0, or regenerate it "
                "from a .pth teacher or an ONNX teacher made by python -m kdlab.distill.cache export-teacher"
            )

    def train_set(
        self, cfg: ExperimentConfig, train_set: Any, val_set: Any, device: torch.device, progress: bool
    ) -> Any:
        """The training set read from the cache, generating the cache first when it does not exist (under
        DDP rank 0 generates it while the others wait)."""
        if self.info is None:
            from kdlab.data.teacher_cache import CacheInfo
            from kdlab.distill.cache import generate_cache, request_from_config

            assert self.teacher is not None
            if distributed.current().is_main:
                prints = self.hooks.fingerprints(cfg, train_set, val_set)
                sources = {"train": (train_set, prints["train"]), "val": (val_set, prints["val"])}
                request = request_from_config(cfg, self.teacher, self.path)
                generate_cache(cfg, request, device, progress, sources=sources)
            distributed.barrier()
            self.info = CacheInfo(self.path)
            self._check_heads(cfg)
        return self.hooks.cached_train_set(cfg, train_set, self.info)

    def kd_parts(
        self, cfg: ExperimentConfig, model: torch.nn.Module
    ) -> tuple[Any, None, list[dict[str, Any]], Any]:
        """The KD task fed by the cache: no teacher is loaded, none is evaluated."""
        d = cfg.distillation
        ema = ModelEMA(model, cfg.training.ema.decay) if cfg.training.ema.enabled else None
        task = self.hooks.kd_task_class()(d, cfg.training.loss, [], None, cached=True)
        records = [{"path": str(self.path), "sha256": self.info.teacher_sha256, "weight": 1.0, "cache": True}]
        return task, None, records, ema

    def summary(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "teacher_sha256": self.info.teacher_sha256,
            "teacher_path": self.info.teacher_path,
            "samples": {split: len(v["indices"]) for split, v in self.info.splits.items()},
        }


def plan_teacher_cache(
    cfg: ExperimentConfig, request: RunRequest, resume_path: Path | None
) -> TeacherCachePlan:
    """Resolve `distillation.cache`: reuse an existing file (the log says so) or plan its generation from a
    teacher (`cache.teacher_model_path`, else the distillation's teacher); neither is an error."""
    from kdlab.data.teacher_cache import CacheInfo

    spec = task_spec(cfg)
    if spec.teacher_cache is None:
        raise ConfigError(f"distillation.cache is not implemented for task={cfg.task}")
    c, d = cfg.distillation.cache, cfg.distillation
    assert c is not None
    run_dir = run_dir_of_checkpoint(resume_path, cfg) if resume_path else run_dir_for(cfg)
    path = Path(c.distillation_data_path) if c.distillation_data_path else run_dir / "teacher_cache.hdf5"
    teacher = c.teacher_model_path or d.teacher_checkpoint
    if teacher is None and d.teacher_experiment:
        teacher = str(teacher_experiment_checkpoint(cfg))
    replaced = request.overwrite and resume_path is None and path.resolve().is_relative_to(run_dir.resolve())
    if path.is_file() and not replaced:
        info = CacheInfo(path)
        log.info("reusing the existing teacher cache %s: %s", path, info.describe())
        return TeacherCachePlan(path, teacher, spec.teacher_cache, info)
    if teacher is None:
        raise DataError(
            f"teacher cache {path} does not exist and no teacher is configured to generate it: set "
            "distillation.cache.teacher_model_path, or generate it with python -m kdlab.distill.cache generate"
        )
    if not Path(teacher).is_file():
        raise CheckpointError(f"teacher {teacher} (to generate the teacher cache {path}) does not exist")
    log.info("teacher cache %s does not exist yet: it will be generated from %s", path, teacher)
    return TeacherCachePlan(path, teacher, spec.teacher_cache)


def build_kd_task(
    cfg: ExperimentConfig, model: torch.nn.Module, teachers: list[LoadedTeacher], device: torch.device
) -> tuple[KDTask, torch.nn.Module | None, list[dict[str, Any]], ModelEMA | None]:
    """The people-segmentation KD parts (see `build_distillation`)."""
    h, w = cfg.data.input_size
    example = (torch.rand(1, 3, h, w), torch.tensor([[0.0, 0.0, 0.0, float(w), float(h)]]))
    return build_distillation(cfg, model, teachers, device, KDTask, example)


def config_from_checkpoint(path: str) -> ExperimentConfig:
    """The resolved config stored inside a checkpoint (used by --resume without --config)."""
    payload = load_checkpoint(path)
    if "config" not in payload:
        raise CheckpointError(f"checkpoint {path} holds no config; pass --config as well")
    return validate_config(payload["config"], where=f"checkpoint {path}")
