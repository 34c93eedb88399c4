"""Comparison report of several experiment runs: one table (CSV + Markdown) and two figures (PNG).

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
import io
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kdlab.config.schema import ModelConfig
from kdlab.evaluate.classification_metrics import CLASSIFICATION_METRICS
from kdlab.evaluate.metrics import REPORTED_METRICS
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
    (teacher - baseline) on target_iou, baseline = the first 'student' with a result and the same encoder.
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
            r for r in rows if r["role"] == "student" and _has_result(r, head) and r[arch] == row[arch]
        ]
        if not baselines:
            continue
        baseline_iou = baselines[0][head]
        # Only defined when the teacher beats the baseline: otherwise there is no gap to close, and the
        # ratio of two negative differences would read as success.
        if teacher_iou - baseline_iou > 1e-12:
            row["gap_closed"] = (row[head] - baseline_iou) / (teacher_iou - baseline_iou)
    return rows


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


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    """The table as CSV text, columns in the layout's order (COLUMNS for segmentation), missing values empty."""
    columns = layout_for_rows(rows).columns
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in columns})
    return buffer.getvalue()


# header, format of a number (None = text), right-aligned
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
}


def _md_cell(column: str, value: Any) -> str:
    if value is None or value == "":
        return MISSING
    fmt = _MD_FORMAT[column][1]
    if fmt is not None and isinstance(value, int | float):
        return fmt.format(value)
    return str(value).replace("|", "\\|")


def rows_to_markdown(rows: list[dict[str, Any]]) -> str:
    """The table as GitHub Markdown with padded columns (readable as plain text too)."""
    layout = layout_for_rows(rows)
    columns = layout.columns
    headers = [_MD_FORMAT[c][0] for c in columns]
    cells = [[_md_cell(c, row.get(c)) for c in columns] for row in rows]
    widths = [max([len(h)] + [len(r[k]) for r in cells]) for k, h in enumerate(headers)]
    numeric = [_MD_FORMAT[c][1] is not None for c in columns]

    def line(values: list[str]) -> str:
        padded = [
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "| "
        + " | ".join(
            ("-" * (w - 1) + ":") if num else "-" * w for w, num in zip(widths, numeric, strict=True)
        )
        + " |"
    )
    completed = sum(1 for r in rows if r.get("status") in RESULT_STATUSES)
    if layout is SEQUENCE_LAYOUT:
        intro = [
            "# Experiment comparison",
            "",
            f"{len(rows)} experiments ({completed} completed). GRU sequence classifiers (model = gru-<hidden>x<layers>); "
            "metrics on the validation set at each run's best epoch (top-1 on the final logits, ECE over 15 "
            "confidence bins). MMACs: one sequence, counted by hand. % of teacher and gap closed = (distilled − "
            f"baseline) / (teacher − baseline) use top-1. {MISSING} = not available.",
            "",
        ]
        return "\n".join([*intro, line(headers), rule, *(line(r) for r in cells)]) + "\n"
    if layout is CLASSIFICATION_LAYOUT:
        intro = [
            "# Experiment comparison",
            "",
            f"{len(rows)} experiments ({completed} completed). Classifiers; metrics on the validation set at each "
            "run's best epoch (top-1/top-5 accuracy, ECE = expected calibration error over 15 confidence bins). "
            "MMACs: one image at the configured size. % of teacher and gap closed = (distilled − baseline) / "
            f"(teacher − baseline) use top-1. {MISSING} = not available.",
            "",
        ]
        return "\n".join([*intro, line(headers), rule, *(line(r) for r in cells)]) + "\n"
    intro = [
        "# Experiment comparison",
        "",
        f"{len(rows)} experiments ({completed} completed). Metrics on the validation set at each run's best epoch "
        "(target IoU = per-ROI IoU of the ROI's own person). GMACs: one image, one ROI, configured input size. "
        "% of teacher and gap closed = (distilled − baseline) / (teacher − baseline) use target IoU. "
        f"{MISSING} = not available.",
        "",
    ]
    return "\n".join([*intro, line(headers), rule, *(line(r) for r in cells)]) + "\n"


_ROLE_STYLE: dict[str, tuple[str, str]] = {  # marker, colour
    "teacher": ("^", "tab:red"),
    "student": ("o", "tab:blue"),
    "distilled": ("s", "tab:green"),
}


def _style(role: str | None) -> tuple[str, str]:
    return _ROLE_STYLE.get(role or "", ("D", "tab:gray"))


def _comparison_figure(rows: list[dict[str, Any]], layout: ReportLayout = SEGMENTATION_LAYOUT) -> Figure:
    head, label = layout.headline, layout.headline_label
    plotted = [r for r in rows if _has_result(r, head)]
    fig = _new_figure(12, 5)
    axes = fig.subplots(1, 2)
    panels = (("onnx_latency_ms", "ONNX latency (ms / image, median)"), ("params_m", "parameters (M)"))
    for ax, (x_key, x_label) in zip(axes, panels, strict=True):
        shown = [r for r in plotted if r.get(x_key) is not None]
        skipped = [r["experiment"] for r in plotted if r.get(x_key) is None]
        seen_roles: set[str] = set()
        for row in shown:
            marker, colour = _style(row.get("role"))
            role = row.get("role") or "other"
            ax.scatter(
                row[x_key], row[head], marker=marker, color=colour, s=80, zorder=3,
                label=role if role not in seen_roles else None, edgecolors="black", linewidths=0.5,
            )  # fmt: skip
            seen_roles.add(role)
            ax.annotate(
                row["experiment"], (row[x_key], row[head]), textcoords="offset points",
                xytext=(6, 6), fontsize=8,
            )  # fmt: skip
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"{label} (val, best epoch)")
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
    fig.suptitle("Experiment comparison (runs with results)")
    fig.tight_layout()
    return fig


def _curves_figure(
    curves_from: list[RunRecord], roles: dict[str, str | None], layout: ReportLayout = SEGMENTATION_LAYOUT
) -> Figure:
    fig = _new_figure(12, 4.5)
    ax_val, ax_loss = fig.subplots(1, 2)
    drawn = 0
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
        drawn += 1
        marker, _ = _style(record.role or roles.get(record.name))
        for ax, points in ((ax_val, val), (ax_loss, loss)):
            if points:
                ax.plot(*zip(*points, strict=True), marker=marker, markersize=4, label=record.name)
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
    """Write experiment_comparison.{csv,md,png} and training_curves.png into `out_dir` (each atomically).

    Returns the paths by kind: "csv", "markdown", "comparison_png", "curves_png".
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "csv": out_dir / "experiment_comparison.csv",
        "markdown": out_dir / "experiment_comparison.md",
        "comparison_png": out_dir / "experiment_comparison.png",
        "curves_png": out_dir / "training_curves.png",
    }
    _write_text_atomic(paths["csv"], rows_to_csv(rows))
    _write_text_atomic(paths["markdown"], rows_to_markdown(rows))
    layout = layout_for_rows(rows)
    _save_figure_atomic(_comparison_figure(rows, layout), paths["comparison_png"])
    roles = {r["experiment"]: r.get("role") for r in rows}
    _save_figure_atomic(_curves_figure(curves_from, roles, layout), paths["curves_png"])
    log.info("report: wrote %s", ", ".join(str(p) for p in paths.values()))
    return paths
