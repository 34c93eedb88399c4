"""Training from a teacher cache: which file, whether it exists or is generated, and from which teacher.

Everything that can be checked before the run directory is touched is (`plan_teacher_cache`, `check`); a
missing cache is generated after it (`train_set`), into a temp file renamed when complete.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdlab.checkpoints import file_sha256
from kdlab.config.schema import ExperimentConfig
from kdlab.engine import distributed
from kdlab.engine.ema import ModelEMA
from kdlab.errors import CheckpointError, ConfigError, DataError
from kdlab.experiments.kd_setup import teacher_experiment_checkpoint
from kdlab.experiments.run_dir import run_dir_of
from kdlab.tasks import CacheHooks, task_of, teacher_loader

log = logging.getLogger(__name__)


@dataclass
class TeacherCachePlan:
    path: Path
    teacher: str | None
    hooks: CacheHooks
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
            self.hooks.writer.preprocessing(cfg),
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
                generate_cache(
                    cfg, request, self.hooks.writer, teacher_loader(cfg), device, progress, sources=sources
                )
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
        task = task_of(cfg).kd_task_class(d, cfg.training.loss, [], None, cached=True)
        records = [{"path": str(self.path), "sha256": self.info.teacher_sha256, "weight": 1.0, "cache": True}]
        return task, None, records, ema

    def summary(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "teacher_sha256": self.info.teacher_sha256,
            "teacher_path": self.info.teacher_path,
            "samples": {split: len(v["indices"]) for split, v in self.info.splits.items()},
        }


def plan_teacher_cache(cfg: ExperimentConfig, overwrite: bool, resume_path: Path | None) -> TeacherCachePlan:
    """Resolve `distillation.cache`: reuse an existing file (the log says so) or plan its generation from a
    teacher (`cache.teacher_model_path`, else the distillation's teacher); neither is an error."""
    from kdlab.data.teacher_cache import CacheInfo

    hooks = task_of(cfg).cache
    if hooks is None:
        raise ConfigError(f"distillation.cache is not implemented for task={cfg.task}")
    c, d = cfg.distillation.cache, cfg.distillation
    assert c is not None
    run_dir = run_dir_of(resume_path, cfg)
    path = Path(c.distillation_data_path) if c.distillation_data_path else run_dir / "teacher_cache.hdf5"
    teacher = c.teacher_model_path or d.teacher_checkpoint
    if teacher is None and d.teacher_experiment:
        teacher = str(teacher_experiment_checkpoint(cfg))
    replaced = overwrite and resume_path is None and path.resolve().is_relative_to(run_dir.resolve())
    if path.is_file() and not replaced:
        info = CacheInfo(path)
        log.info("reusing the existing teacher cache %s: %s", path, info.describe())
        return TeacherCachePlan(path, teacher, hooks, info)
    if teacher is None:
        raise DataError(
            f"teacher cache {path} does not exist and no teacher is configured to generate it: set "
            "distillation.cache.teacher_model_path, or generate it with python -m kdlab.distill.cache generate"
        )
    if not Path(teacher).is_file():
        raise CheckpointError(f"teacher {teacher} (to generate the teacher cache {path}) does not exist")
    log.info("teacher cache %s does not exist yet: it will be generated from %s", path, teacher)
    return TeacherCachePlan(path, teacher, hooks)
