"""Comparison report of several experiment runs: one table (pandas DataFrame -> CSV, Markdown, JSON) and two
figures (PNG). When configs ran over several seeds (`--seeds`), the table has one row per config (mean ± std
over seeds, the paired difference of a distilled config from its baseline with a Student-t interval and a
verdict; see `aggregate_rows` and `seed_stats`), and the per-run rows go to experiment_comparison_runs.csv.

Each run directory is read as the trainer leaves it (summary.json, config.json, logs/metrics.csv and,
when exported, checkpoints/best_model.onnx.json). Metrics come from the best epoch's validation row;
roles (teacher / student / distilled) come from the runner or are inferred from the configs, and give
"% of teacher" and "gap closed" = (distilled - baseline) / (teacher - baseline) on the headline metric:
target_iou for segmentation runs, top-1 for classification and sequence runs (a table of classifiers only has
its own columns: model, top-1, top-5, ECE instead of the segmentation metrics; a table of sequence models
names each GRU `gru-<hidden>x<layers>`, counts parameters in thousands and has no ONNX columns).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kdlab.config.schema import ModelConfig
from kdlab.evaluate.classification_metrics import CLASSIFICATION_METRICS
from kdlab.evaluate.metrics import REPORTED_METRICS
from kdlab.experiments.runner import SEED_SUFFIX
from kdlab.experiments.seed_stats import t_interval, verdict
from kdlab.models.builders import build_classifier, build_model

log = logging.getLogger(__name__)

COLUMNS: tuple[str, ...] = (
    "experiment",
    "status",
    "role",
    "encoder",
    "params_m",
    "macs_g",
    "target_iou",
    "miou",
    "iou_background",
    "iou_target",
    "iou_other",
    "boundary_f1",
    "best_epoch",
    "train_time_min",
    "onnx_latency_ms",
    "onnx_mb",
    "pct_of_teacher",
    "gap_closed",
)
METRIC_COLUMNS: tuple[str, ...] = REPORTED_METRICS
CLASSIFICATION_COLUMNS: tuple[str, ...] = (
    "experiment",
    "status",
    "role",
    "model",
    "params_m",
    "macs_m",
    "top1",
    "top5",
    "ece",
    "best_epoch",
    "train_time_min",
    "onnx_latency_ms",
    "onnx_mb",
    "pct_of_teacher",
    "gap_closed",
)
CLASSIFICATION_METRIC_COLUMNS: tuple[str, ...] = tuple(m for m in CLASSIFICATION_METRICS if m != "loss")
SEQUENCE_COLUMNS: tuple[str, ...] = (
    "experiment",
    "status",
    "role",
    "model",
    "params_k",
    "macs_m",
    "top1",
    "top5",
    "ece",
    "best_epoch",
    "train_time_min",
    "pct_of_teacher",
    "gap_closed",
)
ROLES: tuple[str, ...] = ("teacher", "student", "distilled")
# Runs whose numbers count: trained now ("completed") or found finished on disk by an export-only pass
# ("exists"). A "skipped" run (its teacher failed) was not trained, so numbers on disk may be stale.
RESULT_STATUSES: frozenset[str] = frozenset({"completed", "exists"})
MISSING = "—"

_MACS_CACHE: dict[tuple[str, tuple[int, int], int], int] = {}


# --------------------------------------------------------------------------------------------- MACs
def compute_macs(model_cfg: ModelConfig, input_size: tuple[int, int], rois_per_image: int = 1) -> int:
    """Multiply-accumulates of one forward pass for ONE image of `input_size` (H, W) with `rois_per_image` ROIs.

    Counted with torch's FlopCounterMode (MACs = FLOPs / 2; convolutions and matmuls, not RoIAlign or
    element-wise ops) under no_grad on the model built on CPU with random weights. The forward runs on
    the meta device (shapes only, the same count, ~10x faster than a CPU forward of a fresh model), with
    a CPU forward as the fallback. Cached in-process by the architecture (every model setting except
    encoder_weights), the input size and the ROI count.
    """
    if rois_per_image < 1:
        raise ValueError(f"rois_per_image must be >= 1, got {rois_per_image}")
    height, width = int(input_size[0]), int(input_size[1])
    arch = model_cfg.model_copy(update={"encoder_weights": None})
    key = (arch.model_dump_json(), (height, width), rois_per_image)
    if key in _MACS_CACHE:
        return _MACS_CACHE[key]
    model = build_model(arch).eval()
    try:
        flops = _count_flops(model, height, width, rois_per_image, torch.device("meta"))
    except (NotImplementedError, RuntimeError) as exc:  # an op without a meta kernel
        log.debug("MACs: meta-device forward failed (%s); counting with a CPU forward", exc)
        model = build_model(arch).eval()
        flops = _count_flops(model, height, width, rois_per_image, torch.device("cpu"))
    macs = flops // 2
    _MACS_CACHE[key] = macs
    log.debug("MACs of %s at %dx%d with %d ROI(s): %d", arch.encoder, height, width, rois_per_image, macs)
    return macs


def compute_classifier_macs(model_cfg: ModelConfig, image_size: int) -> int:
    """Multiply-accumulates of one forward pass of a timm classifier on ONE image_size x image_size image
    (FlopCounterMode on a CPU forward with random weights, MACs = FLOPs / 2); cached like `compute_macs`."""
    arch = model_cfg.model_copy(update={"weights": None, "encoder_weights": None})
    key = ("classifier:" + arch.model_dump_json(), (image_size, image_size), 0)
    if key not in _MACS_CACHE:
        model = build_classifier(arch).eval()
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(torch.rand(1, 3, image_size, image_size))
        _MACS_CACHE[key] = int(counter.get_total_flops()) // 2
    return _MACS_CACHE[key]


def compute_gru_macs(
    hidden_size: int, num_layers: int, input_dim: int, num_classes: int, seq_len: int
) -> int:
    """Multiply-accumulates of one GRU sequence model forward on ONE sequence of `seq_len` steps, counted by
    hand (FlopCounterMode does not see inside nn.GRU): per step and layer the three gates' input and
    recurrent matmuls, 3·H·(D_l + H) with D_l = input_dim for layer 0 else H; plus the readout of the
    T+1 states, (T+1)·H·C. Element-wise gate maths is not counted (as for convolutions elsewhere)."""
    h = hidden_size
    per_step = sum(3 * h * ((input_dim if layer == 0 else h) + h) for layer in range(num_layers))
    return per_step * seq_len + (seq_len + 1) * h * num_classes


def _count_flops(model: nn.Module, height: int, width: int, rois_per_image: int, device: torch.device) -> int:
    """FLOPs of model(image [1,3,H,W], rois [R,5]) on `device` (the model is moved there)."""
    model = model.to(device)
    images = torch.rand(1, 3, height, width, device=device)
    # ROIs over the central half of the image; the head's cost does not depend on where they lie.
    box = torch.tensor([0.0, width / 4, height / 4, 3 * width / 4, 3 * height / 4], device=device)
    rois = box.repeat(rois_per_image, 1)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(images, rois)
    return int(counter.get_total_flops())


def clear_macs_cache() -> None:
    """Forget every cached MAC count (tests; a long-lived process comparing many architectures)."""
    _MACS_CACHE.clear()


# --------------------------------------------------------------------------------------------- rows
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
class _RunFiles:
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


def _read_run(run_dir: Path | None) -> _RunFiles:
    if run_dir is None:
        return _RunFiles(None, None, None, [], None)
    ckpt = run_dir / "checkpoints"
    onnx_path = ckpt / "best_model.onnx"
    return _RunFiles(
        summary=_read_json(run_dir / "summary.json"),
        config=_read_json(run_dir / "config.json"),
        onnx_meta=_read_json(ckpt / "best_model.onnx.json"),
        metrics_rows=read_metrics_csv(run_dir / "logs" / "metrics.csv"),
        onnx_path=onnx_path if onnx_path.is_file() else None,
    )


def _number(value: Any) -> float | None:
    """A finite float from a JSON/CSV value, else None ('' / 'nan' / None / text)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _get(data: dict[str, Any] | None, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _find_key(data: Any, key: str) -> Any:
    """The first value stored under `key` anywhere in nested dicts (metadata layouts may nest)."""
    if isinstance(data, dict):
        if key in data:
            return data[key]
        for value in data.values():
            found = _find_key(value, key)
            if found is not None:
                return found
    return None


def _best_epoch_row(
    rows: list[dict[str, str]], best_epoch: int | None, headline: str = "target_iou"
) -> dict[str, str] | None:
    """The validation row of `best_epoch`, or (without one) the row with the highest val_<headline>."""
    key = f"val_{headline}"
    validated = [r for r in rows if _number(r.get(key)) is not None]
    if best_epoch is not None and best_epoch > 0:
        for row in validated:
            if _number(row.get("epoch")) == best_epoch:
                return row
    if not validated:
        return None
    return max(validated, key=lambda r: _number(r[key]) or -math.inf)


def _teacher_checkpoints(config: dict[str, Any] | None) -> list[Path]:
    """Every teacher checkpoint a (distillation-enabled) config names, resolved against the cwd."""
    distill = _get(config, "distillation")
    if not isinstance(distill, dict) or not distill.get("enabled"):
        return []
    paths = [distill.get("teacher_checkpoint")]
    paths += [t.get("checkpoint") for t in distill.get("teachers") or [] if isinstance(t, dict)]
    return [Path(p).resolve() for p in paths if isinstance(p, str) and p]


def _is_inside(path: Path, run_dir: Path | None) -> bool:
    return run_dir is not None and path.is_relative_to(run_dir.resolve())


def _macs_g(config: dict[str, Any] | None, name: str) -> float | None:
    model = _get(config, "model")
    if _get(config, "task") == "sequence":
        seq = _get(config, "data", "sequence")
        try:
            macs = compute_gru_macs(int(model["hidden_size"]), int(model["num_layers"]), int(seq["input_dim"]),
                                    int(model["num_classes"]), int(seq["seq_len"]))  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:  # a report must not die on one odd config
            log.warning("report: cannot count MACs of %s (%s)", name, exc)
            return None
        return macs / 1e9
    if _get(config, "task") == "classification":
        size = _get(config, "data", "classification", "image_size")
        try:
            return compute_classifier_macs(ModelConfig.model_validate(model), int(size)) / 1e9
        except Exception as exc:  # a report must not die on one odd config
            log.warning("report: cannot count MACs of %s (%s)", name, exc)
            return None
    input_size = _get(config, "data", "input_size")
    if not isinstance(model, dict) or not isinstance(input_size, list | tuple) or len(input_size) != 2:
        return None
    try:
        macs = compute_macs(ModelConfig.model_validate(model), (int(input_size[0]), int(input_size[1])))
    except Exception as exc:  # a report must not die on one odd config
        log.warning("report: cannot count MACs of %s (%s)", name, exc)
        return None
    return macs / 1e9


def _base_row(record: RunRecord, files: _RunFiles, layout: ReportLayout | None = None) -> dict[str, Any]:
    layout = layout or SEGMENTATION_LAYOUT
    metric_columns = layout.metric_columns
    summary, config = files.summary, files.config
    best_epoch_value = _number(_get(summary, "best_epoch"))
    best_epoch = int(best_epoch_value) if best_epoch_value else None
    best_row = _best_epoch_row(files.metrics_rows, best_epoch, layout.headline)
    if best_row is not None:
        metrics = {k: _number(best_row.get(f"val_{k}")) for k in metric_columns}
        best_epoch = int(_number(best_row.get("epoch")) or 0) or best_epoch
    else:
        final = _get(summary, "final_metrics")
        metrics = {k: _number(_get(final, k)) for k in metric_columns}
    total_params = _number(_get(summary, "params", "total"))
    train_seconds = _number(_get(summary, "timings", "train_seconds"))
    onnx_mb = _number(_find_key(files.onnx_meta, "onnx_mb"))
    if onnx_mb is None and files.onnx_path is not None:
        onnx_mb = files.onnx_path.stat().st_size / 1e6
    macs_g = _macs_g(config, record.name)
    if layout is SEQUENCE_LAYOUT:
        hidden, layers = _get(config, "model", "hidden_size"), _get(config, "model", "num_layers")
        arch = f"gru-{hidden}x{layers}" if hidden and layers else None
    elif layout.arch_column == "model":
        arch = _get(config, "model", "name") or _get(summary, "model_name")
    else:
        arch = _get(config, "model", "encoder") or _get(summary, "encoder")
    return {
        "experiment": record.name,
        "status": record.status,
        "role": record.role,
        layout.arch_column: arch if isinstance(arch, str) else None,
        "params_m": total_params / 1e6 if total_params is not None else None,
        **(
            {"params_k": total_params / 1e3 if total_params is not None else None}
            if layout is SEQUENCE_LAYOUT
            else {}
        ),
        "macs_g": macs_g,
        **(
            {"macs_m": macs_g * 1000 if macs_g is not None else None} if layout.arch_column == "model" else {}
        ),
        **metrics,
        "best_epoch": best_epoch,
        "train_time_min": train_seconds / 60 if train_seconds is not None else None,
        "onnx_latency_ms": _number(_find_key(files.onnx_meta, "onnx_ms_per_image_median")),
        "onnx_mb": onnx_mb,
        "pct_of_teacher": None,
        "gap_closed": None,
    }


@dataclass(frozen=True)
class ReportLayout:
    """Which columns a table has, the headline metric of % of teacher / gap closed, and the column that
    says which architecture a run is (baselines are matched to distilled runs on it)."""

    columns: tuple[str, ...]
    metric_columns: tuple[str, ...]
    headline: str
    arch_column: str
    headline_label: str


SEGMENTATION_LAYOUT = ReportLayout(COLUMNS, METRIC_COLUMNS, "target_iou", "encoder", "target IoU")
CLASSIFICATION_LAYOUT = ReportLayout(
    CLASSIFICATION_COLUMNS, CLASSIFICATION_METRIC_COLUMNS, "top1", "model", "top-1"
)
SEQUENCE_LAYOUT = ReportLayout(SEQUENCE_COLUMNS, CLASSIFICATION_METRIC_COLUMNS, "top1", "model", "top-1")


def layout_for_configs(configs: list[dict[str, Any] | None]) -> ReportLayout:
    """The classification (sequence) layout when every run with a known config is a classifier (sequence
    model), else segmentation."""
    tasks = {_get(c, "task") or "segmentation" for c in configs if isinstance(c, dict)}
    if tasks == {"classification"}:
        return CLASSIFICATION_LAYOUT
    return SEQUENCE_LAYOUT if tasks == {"sequence"} else SEGMENTATION_LAYOUT


def layout_for_rows(rows: list[dict[str, Any]]) -> ReportLayout:
    if rows and "params_k" in rows[0]:
        return SEQUENCE_LAYOUT
    return (
        CLASSIFICATION_LAYOUT
        if rows and "top1" in rows[0] and "target_iou" not in rows[0]
        else SEGMENTATION_LAYOUT
    )


def _has_result(row: dict[str, Any], headline: str = "target_iou") -> bool:
    return row["status"] in RESULT_STATUSES and row.get(headline) is not None


def collect_rows(records: list[RunRecord]) -> list[dict[str, Any]]:
    """One row per experiment (keys = COLUMNS, missing numbers None), in the order of `records`.

    role: RunRecord.role, else 'distilled' when the config enables distillation, 'teacher' when a
    distilled run of the list names a checkpoint inside this run's directory, else 'student'.
    pct_of_teacher: 100 * target_iou / the teacher's (a distilled run's own teacher when it is in the list,
    else the first teacher with a result). gap_closed (distilled rows): (distilled - baseline) /
    (teacher - baseline) on target_iou, baseline = the first 'student' with a result and the same encoder,
    preferring one of the same seed (the paired run of a --seeds invocation).
    Only completed (or skipped, i.e. earlier) runs serve as teacher or baseline; failed runs keep a row.
    """
    files = [_read_run(r.run_dir) for r in records]
    layout = layout_for_configs([f.config for f in files])
    head, arch = layout.headline, layout.arch_column
    rows = [_base_row(r, f, layout) for r, f in zip(records, files, strict=True)]
    teacher_of: dict[int, list[int]] = {}  # distilled row index -> indices of its teacher rows
    for i, f in enumerate(files):
        ckpts = _teacher_checkpoints(f.config)
        teacher_of[i] = [
            j for c in ckpts for j, rec in enumerate(records) if j != i and _is_inside(c, rec.run_dir)
        ]
    for i, row in enumerate(rows):
        if row["role"] is not None:
            continue
        if _get(files[i].config, "distillation", "enabled"):
            row["role"] = "distilled"
        elif any(i in teachers for teachers in teacher_of.values()):
            row["role"] = "teacher"
        else:
            row["role"] = "student"

    usable_teachers = [j for j, r in enumerate(rows) if r["role"] == "teacher" and _has_result(r, head)]
    for i, row in enumerate(rows):
        own = [j for j in teacher_of[i] if j in usable_teachers]
        if row["role"] == "teacher" and i in usable_teachers:
            ref = i
        elif own:
            ref = own[0]
        elif usable_teachers:
            ref = usable_teachers[0]
        else:
            continue
        teacher_iou = rows[ref][head]
        if row[head] is not None and teacher_iou:
            row["pct_of_teacher"] = 100.0 * row[head] / teacher_iou
        if row["role"] != "distilled" or row[head] is None:
            continue
        baselines = [
            k
            for k, r in enumerate(rows)
            if r["role"] == "student" and _has_result(r, head) and r[arch] == row[arch]
        ]
        if not baselines:
            continue
        seed = records[i].group_and_seed()[1]
        baselines = [rows[k] for k in sorted(baselines, key=lambda k: records[k].group_and_seed()[1] != seed)]
        baseline_iou = baselines[0][head]
        # Only defined when the teacher beats the baseline: otherwise there is no gap to close, and the
        # ratio of two negative differences would read as success.
        if teacher_iou - baseline_iou > 1e-12:
            row["gap_closed"] = (row[head] - baseline_iou) / (teacher_iou - baseline_iou)
    return rows


# --------------------------------------------------------------------------------------------- seeds
# Columns that vary from seed to seed: mean ± std in the aggregated table. The others (architecture sizes)
# are the same for every seed of a config and keep one value (their mean).
_SPREAD_COLUMNS: tuple[str, ...] = ("best_epoch", "train_time_min", "onnx_latency_ms")
_FIXED_COLUMNS: tuple[str, ...] = ("params_m", "params_k", "macs_g", "macs_m", "onnx_mb")
DELTA_COLUMNS: tuple[str, ...] = (
    "baseline",
    "delta_mean",
    "delta_std",
    "delta_low",
    "delta_high",
    "delta_n",
    "verdict",
)


def aggregated_columns(layout: ReportLayout) -> tuple[str, ...]:
    """The columns of the per-config table: each metric as <m>_mean and <m>_std, n after status, the paired
    difference from the baseline (delta_*) and its verdict before gap_closed, which gets its interval."""
    out: list[str] = []
    for column in layout.columns:
        if column in layout.metric_columns or column in _SPREAD_COLUMNS:
            out += [f"{column}_mean", f"{column}_std"]
        elif column == "status":
            out += ["status", "n", "seeds"]
        elif column == "gap_closed":
            out += [*DELTA_COLUMNS, "gap_closed", "gap_closed_low", "gap_closed_high"]
        else:
            out.append(column)
    return tuple(out)


def is_multi_seed(records: list[RunRecord]) -> bool:
    """True when some config ran more than once (--seeds): the report then aggregates by config."""
    groups = [r.group_and_seed()[0] for r in records]
    return len(set(groups)) < len(groups)


def _sweep_part(group: str) -> str:
    return group.split("__", 1)[1] if "__" in group else ""


def aggregate_rows(
    rows: list[dict[str, Any]], records: list[RunRecord], layout: ReportLayout | None = None
) -> list[dict[str, Any]]:
    """One row per config (the runs of one group, i.e. config and sweep value, over seeds), in first-seen order.

    Runs without a result (failed, skipped) are named in `status` and left out of every mean; n counts the
    runs with a result. Distilled configs get the paired difference on the headline metric from their
    baseline (the first student config of the same architecture, preferring the same sweep value):
    distilled − baseline on each seed both have, its mean, std, 95% Student-t interval and verdict.
    gap_closed = (mean distilled − mean baseline) / (mean teacher − mean baseline), its interval the paired
    difference's interval over the same denominator; None when the teacher's margin over the baseline is not
    beyond the baseline's own 95% half-width (or, with one baseline seed, not above 0).
    """
    layout = layout or layout_for_rows(rows)
    head, arch = layout.headline, layout.arch_column
    by_name = {r.name: r for r in records}
    groups: dict[str, list[tuple[int | None, dict[str, Any], RunRecord | None]]] = {}
    for row in rows:
        record = by_name.get(row["experiment"])
        group, seed = record.group_and_seed() if record else split_seed(row["experiment"])
        groups.setdefault(group, []).append((seed, row, record))

    group_dirs: dict[str, list[Path]] = {}  # group -> the run directories of its runs
    for group, members in groups.items():
        group_dirs[group] = [rec.run_dir for _, _, rec in members if rec is not None and rec.run_dir]
    out: list[dict[str, Any]] = []
    values: dict[str, dict[int | None, float]] = {}  # group -> seed -> headline
    own_teacher: dict[str, str | None] = {}
    for group, members in groups.items():
        ok = [(seed, row) for seed, row, _ in members if _has_result(row, head)]
        # A run that failed before writing its config has an inferred role; one with a result knows better.
        first = ok[0][1] if ok else members[0][1]
        values[group] = {seed: row[head] for seed, row in ok}
        bad = [(seed, row["status"]) for seed, row, _ in members if not _has_result(row, head)]
        statuses = {row["status"] for _, row, _ in members}
        if not bad:
            status = statuses.pop() if len(statuses) == 1 else "completed"
        else:
            status = f"{len(ok)}/{len(members)} with results; " + ", ".join(
                f"{'seed ' + str(seed) if seed is not None else 'run'} {why}" for seed, why in bad
            )
        agg: dict[str, Any] = {
            "experiment": group,
            "status": status,
            "n": len(ok),
            "seeds": " ".join(str(seed) for seed, _ in ok if seed is not None) or None,
            "role": first["role"],
            arch: first.get(arch),
        }
        for column in layout.columns:
            if column in layout.metric_columns or column in _SPREAD_COLUMNS:
                stat = t_interval([row[column] for _, row in ok if row.get(column) is not None])
                agg[f"{column}_mean"], agg[f"{column}_std"] = stat.mean, stat.std
            elif column in _FIXED_COLUMNS:
                agg[column] = t_interval([row[column] for _, row in ok if row.get(column) is not None]).mean
        out.append(agg)
        own_teacher[group] = None
        for _, _, rec in members[:1]:
            files = _read_run(rec.run_dir) if rec is not None else None
            for ckpt in _teacher_checkpoints(files.config if files else None):
                own_teacher[group] = next(
                    (
                        g
                        for g, dirs in group_dirs.items()
                        if g != group and any(_is_inside(ckpt, d) for d in dirs)
                    ),
                    own_teacher[group],
                )

    means = {row["experiment"]: row[f"{head}_mean"] for row in out}
    teachers = [r["experiment"] for r in out if r["role"] == "teacher" and r[f"{head}_mean"] is not None]
    for row in out:
        group = row["experiment"]
        for column in (*DELTA_COLUMNS, "pct_of_teacher", "gap_closed", "gap_closed_low", "gap_closed_high"):
            row[column] = None
        if row["role"] == "teacher" and group in teachers:
            ref = group
        elif own_teacher[group] in teachers:
            ref = own_teacher[group]
        else:
            ref = teachers[0] if teachers else None
        teacher_mean = means.get(ref) if ref else None
        if row[f"{head}_mean"] is not None and teacher_mean:
            row["pct_of_teacher"] = 100.0 * row[f"{head}_mean"] / teacher_mean
        if row["role"] != "distilled" or row[f"{head}_mean"] is None:
            continue
        candidates = [
            r for r in out if r["role"] == "student" and r["n"] > 0 and r.get(arch) == row.get(arch)
        ]
        candidates.sort(key=lambda r: _sweep_part(r["experiment"]) != _sweep_part(group))
        if not candidates:
            continue
        baseline = candidates[0]["experiment"]
        paired = [values[group][s] - values[baseline][s] for s in values[group] if s in values[baseline]]
        diff = t_interval(paired)
        row.update(baseline=baseline, delta_mean=diff.mean, delta_std=diff.std, delta_low=diff.low,
                   delta_high=diff.high, delta_n=diff.n, verdict=verdict(diff))  # fmt: skip
        if teacher_mean is None:
            continue
        base_stat = t_interval(list(values[baseline].values()))
        margin = teacher_mean - base_stat.mean
        # The gap is only defined when the teacher beats the baseline beyond the baseline's own noise:
        # otherwise the ratio of two differences indistinguishable from 0 would read as a result.
        if margin > max(base_stat.half_width or 0.0, 1e-12):
            row["gap_closed"] = (row[f"{head}_mean"] - base_stat.mean) / margin
            if diff.low is not None and diff.high is not None:
                row["gap_closed_low"], row["gap_closed_high"] = diff.low / margin, diff.high / margin
    return out


# --------------------------------------------------------------------------------------------- files
def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_text_atomic(path: Path, text: str) -> None:
    _write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _new_figure(width: float, height: float) -> Figure:
    """A figure on the Agg canvas without pyplot: no global state, no GUI backend, safe in any process."""
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save_figure_atomic(fig: Figure, path: Path) -> None:
    _write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))


def table_frame(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> pd.DataFrame:
    """The rows as a DataFrame with exactly `columns` in that order (missing values NaN/None)."""
    return pd.DataFrame([{c: row.get(c) for c in columns} for row in rows], columns=list(columns))


def frame_to_csv(frame: pd.DataFrame) -> str:
    """CSV text: 6 significant digits, missing values empty."""
    return frame.to_csv(index=False, float_format="%.6g", lineterminator="\n")


def frame_to_json(frame: pd.DataFrame) -> str:
    """A JSON list of row objects (missing values null); `pandas.read_json` reads it back."""
    return frame.to_json(orient="records", indent=2) + "\n"


# header, format of a number (None = text)
_MD_FORMAT: dict[str, tuple[str, str | None]] = {
    "experiment": ("experiment", None),
    "status": ("status", None),
    "role": ("role", None),
    "encoder": ("encoder", None),
    "params_m": ("params M", "{:.2f}"),
    "macs_g": ("GMACs", "{:.2f}"),
    "target_iou": ("target IoU", "{:.4f}"),
    "miou": ("mIoU", "{:.4f}"),
    "iou_background": ("IoU bg", "{:.4f}"),
    "iou_target": ("IoU target", "{:.4f}"),
    "iou_other": ("IoU other", "{:.4f}"),
    "boundary_f1": ("boundary F1", "{:.4f}"),
    "best_epoch": ("best ep", "{:.0f}"),
    "train_time_min": ("train min", "{:.1f}"),
    "onnx_latency_ms": ("ONNX ms", "{:.2f}"),
    "onnx_mb": ("ONNX MB", "{:.1f}"),
    "pct_of_teacher": ("% of teacher", "{:.1f}"),
    "gap_closed": ("gap closed", "{:.2f}"),
    "model": ("model", None),
    "macs_m": ("MMACs", "{:.1f}"),
    "params_k": ("params k", "{:.1f}"),
    "top1": ("top-1", "{:.4f}"),
    "top5": ("top-5", "{:.4f}"),
    "ece": ("ECE", "{:.4f}"),
    "n": ("n", "{:.0f}"),
    "baseline": ("baseline", None),
    "verdict": ("verdict", None),
}


def _missing(value: Any) -> bool:
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


def _md_cell(column: str, value: Any) -> str:
    if _missing(value):
        return MISSING
    fmt = _MD_FORMAT[column][1]
    if fmt is not None and isinstance(value, int | float):
        return fmt.format(value)
    return str(value).replace("|", "\\|")


def _markdown(cells: pd.DataFrame, numeric: list[bool]) -> str:
    """Cells (strings) as a GitHub pipe table, numbers right-aligned, padded to be read as plain text."""
    align = ["right" if num else "left" for num in numeric]
    return cells.to_markdown(index=False, tablefmt="pipe", colalign=align, disable_numparse=True)


def runs_markdown(frame: pd.DataFrame, layout: ReportLayout) -> str:
    """The per-run table: one row per run, today's columns."""
    columns = list(layout.columns)
    cells = pd.DataFrame(
        {_MD_FORMAT[c][0]: [_md_cell(c, v) for v in frame[c]] for c in columns},
        columns=[_MD_FORMAT[c][0] for c in columns],
    )
    return _markdown(cells, [_MD_FORMAT[c][1] is not None for c in columns])


def _signed(value: Any, fmt: str) -> str:
    return MISSING if _missing(value) else ("+" if value >= 0 else "−") + fmt.format(abs(value))


def aggregated_markdown(frame: pd.DataFrame, layout: ReportLayout) -> str:
    """The per-config table: metrics as mean ± std, n, the paired Δ with its 95% interval and the verdict."""
    cols: dict[str, list[str]] = {}
    numeric: list[bool] = []
    records = frame.to_dict(orient="records")

    def add(header: str, cells: list[str], is_number: bool) -> None:
        cols[header] = cells
        numeric.append(is_number)

    for column in layout.columns:
        label, fmt = _MD_FORMAT[column]
        if column in layout.metric_columns or column in _SPREAD_COLUMNS:

            def spread(row: dict[str, Any], column: str = column, fmt: str | None = fmt) -> str:
                mean, std = row[f"{column}_mean"], row[f"{column}_std"]
                if _missing(mean):
                    return MISSING
                text = (fmt or "{}").format(mean)
                return text if _missing(std) else f"{text} ± {(fmt or '{}').format(std)}"

            add(label, [spread(r) for r in records], True)
        elif column == "gap_closed":
            add("baseline", [_md_cell("baseline", r["baseline"]) for r in records], False)
            add(
                f"Δ {layout.headline_label} (paired)",
                [_signed(r["delta_mean"], "{:.4f}") for r in records],
                True,
            )
            add("95% CI of Δ", [
                MISSING if _missing(r["delta_mean"]) else
                (f"n={r['delta_n']:.0f}, no interval" if _missing(r["delta_low"]) else
                 f"[{_signed(r['delta_low'], '{:.4f}')}, {_signed(r['delta_high'], '{:.4f}')}]")
                for r in records
            ], True)  # fmt: skip
            add("verdict", [
                MISSING if _missing(r["verdict"]) and _missing(r["delta_mean"]) else
                (f"{MISSING} (n={r['delta_n']:.0f})" if _missing(r["verdict"]) else str(r["verdict"]))
                for r in records
            ], False)  # fmt: skip
            add("gap closed", [
                MISSING if _missing(r["gap_closed"]) else
                f"{r['gap_closed']:.2f}" + ("" if _missing(r["gap_closed_low"]) else
                                            f" [{r['gap_closed_low']:.2f}, {r['gap_closed_high']:.2f}]")
                for r in records
            ], True)  # fmt: skip
        else:
            add(label, [_md_cell(column, r[column]) for r in records], fmt is not None)
            if column == "status":
                add("n", [_md_cell("n", r["n"]) for r in records], True)
    return _markdown(pd.DataFrame(cols, columns=list(cols)), numeric)


def _intro(layout: ReportLayout, runs: int, completed: int) -> str:
    label = layout.headline_label
    if layout is SEQUENCE_LAYOUT:
        what = (
            "GRU sequence classifiers (model = gru-<hidden>x<layers>); metrics on the validation set at each run's "
            "best epoch (top-1 on the final logits, ECE over 15 confidence bins). MMACs: one sequence, counted by hand."
        )
    elif layout is CLASSIFICATION_LAYOUT:
        what = (
            "Classifiers; metrics on the validation set at each run's best epoch (top-1/top-5 accuracy, ECE = "
            "expected calibration error over 15 confidence bins). MMACs: one image at the configured size."
        )
    else:
        what = (
            "Metrics on the validation set at each run's best epoch, the one with the best mIoU (target IoU = "
            "per-ROI IoU of the ROI's own person; IoU other = 'other people' inside the ROIs). A teacher may train "
            "on a longer schedule than its students: it is trained once and used many times. GMACs: one image, "
            "one ROI, configured input size."
        )
    return (
        f"{runs} experiments ({completed} completed). {what} % of teacher and gap closed = (distilled − baseline) "
        f"/ (teacher − baseline) use {label}. {MISSING} = not available."
    )


def _seed_method(layout: ReportLayout) -> str:
    label = layout.headline_label
    return (
        "One row per config over its seeds: mean ± std (ddof=1) over the n runs with a result; failed or skipped "
        f"seeds are named in status and left out. Δ {label} (paired) = distilled − baseline on the same seed "
        "(same initial weights and data order), averaged over the seeds both have; 95% CI = mean ± "
        "t(0.975, n−1)·sd/√n (Student t over seeds). Verdict: gain when the interval lies above 0, hurts when "
        f"below, else no detectable difference; none with n < 2. Gap closed = (mean distilled − mean baseline) / "
        "(mean teacher − mean baseline), its interval the Δ interval over the same denominator; "
        f"{MISSING} when the teacher's margin over the baseline is within the baseline's own 95% interval. "
        "Per-seed rows: experiment_comparison_runs.csv and experiment_runs.json."
    )


_ROLE_STYLE: dict[str, tuple[str, str]] = {  # marker, colour
    "teacher": ("^", "tab:red"),
    "student": ("o", "tab:blue"),
    "distilled": ("s", "tab:green"),
}


def _style(role: str | None) -> tuple[str, str]:
    return _ROLE_STYLE.get(role or "", ("D", "tab:gray"))


def _plot_points(rows: list[dict[str, Any]], layout: ReportLayout, aggregated: bool) -> list[dict[str, Any]]:
    """What the comparison figure draws: per run, or per config with the std over seeds as error bar."""
    head = layout.headline
    if not aggregated:
        return [
            {"experiment": r["experiment"], "role": r.get("role"), "y": r[head], "yerr": None,
             "onnx_latency_ms": r.get("onnx_latency_ms"), "params_m": r.get("params_m")}
            for r in rows if _has_result(r, head)
        ]  # fmt: skip
    return [
        {"experiment": f"{r['experiment']} (n={r['n']})", "role": r.get("role"), "y": r[f"{head}_mean"],
         "yerr": r[f"{head}_std"], "onnx_latency_ms": r.get("onnx_latency_ms_mean"), "params_m": r.get("params_m")}
        for r in rows if r["n"] > 0 and r[f"{head}_mean"] is not None
    ]  # fmt: skip


def _comparison_figure(points: list[dict[str, Any]], layout: ReportLayout = SEGMENTATION_LAYOUT) -> Figure:
    label = layout.headline_label
    fig = _new_figure(12, 5)
    axes = fig.subplots(1, 2)
    panels = (("onnx_latency_ms", "ONNX latency (ms / image, median)"), ("params_m", "parameters (M)"))
    with_bars = any(p["yerr"] is not None for p in points)
    for ax, (x_key, x_label) in zip(axes, panels, strict=True):
        shown = [p for p in points if p.get(x_key) is not None]
        skipped = [p["experiment"] for p in points if p.get(x_key) is None]
        seen_roles: set[str] = set()
        for point in shown:
            marker, colour = _style(point.get("role"))
            role = point.get("role") or "other"
            ax.errorbar(
                point[x_key], point["y"], yerr=point["yerr"], fmt=marker, color=colour, markersize=9, capsize=4,
                zorder=3, label=role if role not in seen_roles else None, markeredgecolor="black",
                markeredgewidth=0.5,
            )  # fmt: skip
            seen_roles.add(role)
            ax.annotate(
                point["experiment"], (point[x_key], point["y"]), textcoords="offset points",
                xytext=(6, 6), fontsize=8,
            )  # fmt: skip
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"{label} (val, best epoch" + (", mean ± std over seeds)" if with_bars else ")"))
        ax.set_title(f"{label} vs {x_label.split(' (')[0]}")
        ax.grid(True, alpha=0.3)
        if shown:
            ax.legend(loc="lower right", fontsize=8)
            ax.margins(x=0.25, y=0.15)
        else:
            ax.text(0.5, 0.5, "no run has this value", transform=ax.transAxes, ha="center", va="center")
        if skipped:
            ax.text(
                0.01, 0.01, "not shown (no value): " + ", ".join(skipped), transform=ax.transAxes,
                fontsize=7, va="bottom", ha="left", color="dimgray", wrap=True,
            )  # fmt: skip
    fig.suptitle(
        "Experiment comparison (" + ("configs over seeds" if with_bars else "runs with results") + ")"
    )
    fig.tight_layout()
    return fig


def _curves_figure(
    curves_from: list[RunRecord], roles: dict[str, str | None], layout: ReportLayout = SEGMENTATION_LAYOUT
) -> Figure:
    """Validation headline and train loss per epoch: one line per run, or, for a config run over several
    seeds, its mean per epoch with the std over seeds as error bars."""
    fig = _new_figure(12, 4.5)
    ax_val, ax_loss = fig.subplots(1, 2)
    curves: dict[str, list[tuple[list[tuple[float, float]], list[tuple[float, float]]]]] = {}
    markers: dict[str, str] = {}
    for record in curves_from:
        if record.run_dir is None:
            continue
        rows = read_metrics_csv(record.run_dir / "logs" / "metrics.csv")
        val = [(_number(r.get("epoch")), _number(r.get(f"val_{layout.headline}"))) for r in rows]
        loss = [(_number(r.get("epoch")), _number(r.get("train_loss"))) for r in rows]
        val = [(e, v) for e, v in val if e is not None and v is not None]
        loss = [(e, v) for e, v in loss if e is not None and v is not None]
        if not val and not loss:
            continue
        group = record.group_and_seed()[0]
        curves.setdefault(group, []).append((val, loss))  # type: ignore[arg-type]
        markers.setdefault(group, _style(record.role or roles.get(record.name) or roles.get(group))[0])
    drawn = sum(len(c) for c in curves.values())
    for group, runs in curves.items():
        for k, ax in enumerate((ax_val, ax_loss)):
            series = [run[k] for run in runs if run[k]]
            if not series:
                continue
            if len(series) == 1:
                ax.plot(*zip(*series[0], strict=True), marker=markers[group], markersize=4, label=group)
                continue
            by_epoch: dict[float, list[float]] = {}
            for points in series:
                for epoch, value in points:
                    by_epoch.setdefault(epoch, []).append(value)
            epochs = sorted(by_epoch)
            stats_ = [t_interval(by_epoch[e]) for e in epochs]
            ax.errorbar(
                epochs, [s.mean for s in stats_], yerr=[s.std or 0.0 for s in stats_], marker=markers[group],
                markersize=4, capsize=2, label=f"{group} (mean ± std, n={len(series)})",
            )  # fmt: skip
    for ax, title in ((ax_val, f"validation {layout.headline_label}"), (ax_loss, "train loss")):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no logs/metrics.csv values", transform=ax.transAxes, ha="center", va="center")
    ax_val.set_ylabel(layout.headline_label)
    ax_loss.set_ylabel("loss")
    fig.suptitle(f"Training curves ({drawn} runs)")
    fig.tight_layout()
    return fig


def write_report(rows: list[dict[str, Any]], out_dir: Path, curves_from: list[RunRecord]) -> dict[str, Path]:
    """Write experiment_comparison.{csv,md,json,png}, experiment_comparison_runs.csv and training_curves.png
    into `out_dir` (each atomically) from the per-run `rows` of `collect_rows(curves_from)`.

    When some config ran over several seeds the table has one row per config (`aggregate_rows`) and the
    per-run rows (with their seed) go to experiment_comparison_runs.csv; otherwise both hold the per-run rows.
    Returns the paths by kind: "csv", "markdown", "json", "runs_csv", "comparison_png", "curves_png".
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "csv": out_dir / "experiment_comparison.csv",
        "markdown": out_dir / "experiment_comparison.md",
        "json": out_dir / "experiment_comparison.json",
        "runs_csv": out_dir / "experiment_comparison_runs.csv",
        "comparison_png": out_dir / "experiment_comparison.png",
        "curves_png": out_dir / "training_curves.png",
    }
    layout = layout_for_rows(rows)
    aggregated = is_multi_seed(curves_from)
    by_name = {r.name: r for r in curves_from}
    seeded = [
        {**row, "config": g, "seed": s}
        for row in rows
        for g, s in [by_name[row["experiment"]].group_and_seed() if row["experiment"] in by_name
                     else split_seed(row["experiment"])]
    ]  # fmt: skip
    runs_frame = table_frame(seeded, (*layout.columns[:1], "config", "seed", *layout.columns[1:]))
    _write_text_atomic(paths["runs_csv"], frame_to_csv(runs_frame))
    completed = sum(1 for r in rows if r.get("status") in RESULT_STATUSES)
    intro = ["# Experiment comparison", "", _intro(layout, len(rows), completed)]
    if aggregated:
        table = aggregate_rows(rows, curves_from, layout)
        frame = table_frame(table, aggregated_columns(layout))
        intro += ["", _seed_method(layout)]
        body = aggregated_markdown(frame, layout)
    else:
        table = rows
        frame = table_frame(rows, layout.columns)
        body = runs_markdown(frame, layout)
    _write_text_atomic(paths["csv"], frame_to_csv(frame))
    _write_text_atomic(paths["json"], frame_to_json(frame))
    _write_text_atomic(paths["markdown"], "\n".join([*intro, "", body]) + "\n")
    _save_figure_atomic(
        _comparison_figure(_plot_points(table, layout, aggregated), layout), paths["comparison_png"]
    )
    roles = {r["experiment"]: r.get("role") for r in rows}
    roles.update({r["experiment"]: r.get("role") for r in table})
    _save_figure_atomic(_curves_figure(curves_from, roles, layout), paths["curves_png"])
    log.info("report: wrote %s", ", ".join(str(p) for p in paths.values()))
    return paths
