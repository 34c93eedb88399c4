"""Reading one run directory as the trainer and the runner leave it: summary.json, config.json,
logs/metrics.csv, checkpoints/best_model.onnx(.json), and the runner's record of the run (`RunRecord`).
Unreadable files are logged and read as absent: a report must not die on one broken run."""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdlab.experiments.plan import SEED_SUFFIX

log = logging.getLogger(__name__)

# Runs whose numbers count: trained now ("completed") or found finished on disk by an export-only pass
# ("exists"). A "skipped" run (its teacher failed) was not trained, so numbers on disk may be stale.
RESULT_STATUSES: frozenset[str] = frozenset({"completed", "exists"})


@dataclass
class RunRecord:
    """One experiment as the runner knows it; `role` None means "infer it from the configs"."""

    name: str
    run_dir: Path | None
    status: str  # "completed" | "failed" | "skipped" | ...
    role: str | None = None
    exit_code: int | None = None
    duration_s: float | None = None
    seed: int | None = None  # the seed of a --seeds run (None: inferred from a `__seed-<s>` name suffix)
    group: str | None = None  # the config (and sweep value) the run belongs to; None: the name without suffix

    def group_and_seed(self) -> tuple[str, int | None]:
        name_group, name_seed = split_seed(self.name)
        return self.group or name_group, self.seed if self.seed is not None else name_seed


def split_seed(name: str) -> tuple[str, int | None]:
    """`digits_student__seed-42` -> ("digits_student", 42); a name without the seed suffix -> (name, None)."""
    head, sep, tail = name.rpartition(SEED_SUFFIX)
    if sep and tail.isdigit():
        return head, int(tail)
    return name, None


@dataclass
class RunFiles:
    summary: dict[str, Any] | None
    config: dict[str, Any] | None
    onnx_meta: dict[str, Any] | None
    metrics_rows: list[dict[str, str]]
    onnx_path: Path | None


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("report: cannot read %s (%s); its values are left out", path, exc)
        return None
    return data if isinstance(data, dict) else None


def read_metrics_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a run's logs/metrics.csv ([] when absent or unreadable)."""
    if not path.is_file():
        return []
    try:
        with path.open(newline="") as fh:
            return list(csv.DictReader(fh))
    except (OSError, csv.Error) as exc:
        log.warning("report: cannot read %s (%s); its values are left out", path, exc)
        return []


def read_config(run_dir: Path | None) -> dict[str, Any] | None:
    """A run's config.json alone (None when absent or unreadable), for what needs no other file."""
    return None if run_dir is None else _read_json(run_dir / "config.json")


def read_run(run_dir: Path | None) -> RunFiles:
    if run_dir is None:
        return RunFiles(None, None, None, [], None)
    ckpt = run_dir / "checkpoints"
    onnx_path = ckpt / "best_model.onnx"
    return RunFiles(
        summary=_read_json(run_dir / "summary.json"),
        config=_read_json(run_dir / "config.json"),
        onnx_meta=_read_json(ckpt / "best_model.onnx.json"),
        metrics_rows=read_metrics_csv(run_dir / "logs" / "metrics.csv"),
        onnx_path=onnx_path if onnx_path.is_file() else None,
    )


def number(value: Any) -> float | None:
    """A finite float from a JSON/CSV value, else None ('' / 'nan' / None / text)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def nested(data: dict[str, Any] | None, *keys: str) -> Any:
    """data[k1][k2]..., or None where a level is missing or not a dict."""
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def as_dict(data: Any) -> dict[str, Any]:
    """`data` when it is a dict, else {} (a JSON section of the wrong type reads as empty)."""
    return data if isinstance(data, dict) else {}


def find_key(data: Any, key: str) -> Any:
    """The first value stored under `key` anywhere in nested dicts (metadata layouts may nest)."""
    if isinstance(data, dict):
        if key in data:
            return data[key]
        for value in data.values():
            found = find_key(value, key)
            if found is not None:
                return found
    return None
