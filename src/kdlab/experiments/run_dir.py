"""Where a run lives and when it may be (re)written: <output_dir>/<name>/, resume checkpoints, --overwrite.

Everything here is checked before the run directory is created or touched, so a typo never costs files
already on disk; `prepare_run_dir` is the first write.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from kdlab.config.schema import ExperimentConfig
from kdlab.errors import CheckpointError, KdlabInputError

log = logging.getLogger(__name__)


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


def run_dir_of(resume_path: Path | None, cfg: ExperimentConfig) -> Path:
    """A checkpoint in <run>/checkpoints/ belongs to <run>; anything else continues in the configured run dir."""
    if resume_path is not None and resume_path.parent.name == "checkpoints":
        return resume_path.parent.parent
    return run_dir_for(cfg)


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


def check_run_dir_free(run_dir: Path, overwrite: bool) -> None:
    """Refuse (before any work) to start a new run over an existing run directory."""
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise KdlabInputError(
            f"run directory {run_dir} already exists; continue it with --resume "
            f"{run_dir / 'checkpoints' / 'last.pth'}, pass --overwrite to replace it, or choose another "
            "--output_dir / --set name=..."
        )


def prepare_run_dir(run_dir: Path, overwrite: bool, resuming: bool) -> None:
    if not resuming:
        check_run_dir_free(run_dir, overwrite)
        if run_dir.exists() and any(run_dir.iterdir()):
            log.warning("--overwrite: removing the existing run directory %s", run_dir)
            shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
