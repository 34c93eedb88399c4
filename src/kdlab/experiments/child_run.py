"""One run as a child process of the runner: its command line (`python -m kdlab.cli.train ...`, under
torchrun for several GPUs), its environment, where its log ends up, and what its run directory says about an
earlier pass (trained to the end, exported)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections import deque
from pathlib import Path
from typing import Any

import kdlab
from kdlab.experiments.plan import PlannedRun

# The child is the training CLI as a module, so it runs the same from a checkout and from an installed wheel.
TRAIN_MODULE = "kdlab.cli.train"
ERROR_TAIL_LINES = 30


def error_tail(path: Path, lines: int = ERROR_TAIL_LINES) -> str:
    """The last `lines` lines of a child's log: what a failed run's record shows."""
    if not path.is_file():
        return ""
    with path.open(errors="replace") as fh:
        return "".join(deque(fh, maxlen=lines))


def child_command(
    run: PlannedRun,
    flags_argv: list[str],
    teacher_ckpt: Path | None,
    resume: str | None,
    export: bool = False,
) -> list[str]:
    """The training argument list of one run; `resume` is "auto" or a checkpoint path; `export`: the child
    exports its student to ONNX after training (`--export_onnx`), on its own device, in its own job."""
    command = [sys.executable, "-m", TRAIN_MODULE, "--config", run.config_name, "--no_progress"]
    if run.set_items:
        command += ["--set", *run.set_items]
    command += flags_argv
    if teacher_ckpt is not None:
        command += ["--teacher_checkpoint", str(teacher_ckpt)]
    if resume:
        command += ["--resume", resume]
    if export:
        command += ["--export_onnx"]
    return command


def exports_in_run(run: PlannedRun) -> bool:
    """Whether the run's task ships as ONNX (the sequence task has no exporter)."""
    from kdlab.tasks import task_of

    return task_of(run.config).exporter() is not None


def recorded_export(run_dir: Path) -> dict[str, Any] | None:
    """The export outcome a child wrote into summary.json (`export`), if any."""
    try:
        export = json.loads((run_dir / "summary.json").read_text()).get("export")
    except (OSError, ValueError, AttributeError):
        return None
    return export if isinstance(export, dict) else None


def exported_before(run: PlannedRun, run_dir: Path) -> dict[str, Any] | None:
    """The export record of a finished run whose own process exported it (summary.json `export`, ok, and
    checkpoints/best_model.onnx still there), so that a --resume pass does not export and score it again; None
    when the run must be exported (no record, a failed one, a missing file, or INT8 now asked for)."""
    export = recorded_export(run_dir)
    if export is None or not export.get("ok") or run.config.export.quantize != "none":
        return None
    return export if (run_dir / "checkpoints" / "best_model.onnx").is_file() else None


def child_env() -> dict[str, str]:
    """This process's environment, unbuffered, with the directory holding this kdlab package first on
    PYTHONPATH, so the child imports the same kdlab (a checkout's src/ or an installed site-packages)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    package_parent = str(Path(kdlab.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = package_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def finished_before(run: PlannedRun) -> bool:
    """A run that already trained to its planned epochs (summary.json says completed, best_model.pth exists)
    and, when it has a test split, was scored on it (a kill during the test pass leaves a completed summary
    without test_metrics): `--resume` does not run it again."""
    run_dir = run.run_dir()
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        summary.get("status") == "completed"
        and summary.get("epochs") == run.config.training.epochs
        and (run_dir / "checkpoints" / "best_model.pth").is_file()
        and (not summary.get("test_images") or isinstance(summary.get("test_metrics"), dict))
    )


def with_torchrun(command: list[str], devices: int) -> list[str]:
    """A training command launched under torchrun on `devices` local processes (one per GPU), when > 1."""
    if devices <= 1:
        return command
    assert command[1:3] == ["-m", TRAIN_MODULE]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}"]
    return launch + ["-m", TRAIN_MODULE, *command[3:]]


def keep_child_log(staging: Path, run_dir: Path, append: bool) -> Path:
    """Move a child's log from the runner's staging area into `<run>/logs/stdout.txt` (appended to the earlier
    one when the run resumed); it stays in staging when the run never made its directory."""
    if not staging.is_file():
        return staging
    if not run_dir.is_dir():
        return staging
    final_log = run_dir / "logs" / "stdout.txt"
    final_log.parent.mkdir(parents=True, exist_ok=True)
    if final_log.exists() and append:
        with final_log.open("a") as out, staging.open() as inp:
            shutil.copyfileobj(inp, out)
        staging.unlink()
    else:
        shutil.move(staging, final_log)
    return final_log
