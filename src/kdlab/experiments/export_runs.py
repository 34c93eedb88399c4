"""Export a finished run's student to ONNX with its task's exporter (the task is read from the run), and score
the exported file with the task's own evaluator on the run's held-out test split (the validation set when the
run has none: the checkpoint was selected on val, so its val score is biased upwards)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdlab.checkpoints import load_checkpoint
from kdlab.config.schema import ExperimentConfig, ExportConfig
from kdlab.tasks import task_of


def scoring_device(cfg: ExperimentConfig) -> torch.device:
    """Where a process that did not train scores an export (the runner's --export_onnx --skip_training pass):
    the run's `training.device`, with "auto" meaning this process's current CUDA device when there is one."""
    from kdlab.engine.device import resolve_device

    return resolve_device(cfg.training.device)


def validation_scorer(
    cfg: ExperimentConfig,
    max_images: int | None = None,
    device: torch.device | None = None,
    show_progress: bool = True,
) -> Callable[[nn.Module], dict[str, Any]]:
    """model -> the task's metrics on the first `max_images` images (None: all) of the test split, or of the
    validation split when the config has no test split (`score.split` says which: "test" / "val"), computed
    by the same evaluator training uses (no pictures), on `device` (default `scoring_device(cfg)`; a training
    process passes its own). PyTorch models are scored there in float32 (no autocast) and handed back on the
    CPU; an ONNX file (`OnnxRuntimeModel`) runs in onnxruntime and returns its outputs on that device. This
    process scores the whole set alone: under torchrun that is rank 0, with no collective call."""
    task = task_of(cfg)
    split, images = scoring_split(cfg)
    if max_images is not None and max_images < len(images):
        images = torch.utils.data.Subset(images, range(max_images))
    device = device if device is not None else scoring_device(cfg)
    loader = task.build_loader(
        images, cfg.training.batch_size, shuffle=False, seed=cfg.training.seed,
        num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
    )  # fmt: skip
    quiet = cfg.model_copy(update={"training": cfg.training.model_copy(update={"num_vis_images": 0})})
    evaluator = task.build_evaluator(quiet, loader, device, None, show_progress)
    evaluator.reduce_across_ranks = False

    def score(model: nn.Module) -> dict[str, Any]:  # `score.device` names where it scores
        has_weights = any(True for _ in model.parameters())
        if has_weights:
            model.to(device)
        try:
            desc = "ONNX accuracy" if not has_weights else "PyTorch accuracy"
            metrics, _ = evaluator(model, desc=desc)
        finally:
            if has_weights:
                model.cpu()
        return metrics

    score.device = str(device)  # type: ignore[attr-defined]
    score.split = split  # type: ignore[attr-defined]
    return score


def scoring_split(cfg: ExperimentConfig) -> tuple[str, Any]:
    """("test", the test split) when the config has one, else ("val", the validation split)."""
    task = task_of(cfg)
    test = task.build_test_dataset(cfg)
    if test is not None:
        return "test", test
    _, val = task.build_datasets(cfg)
    return "val", val


def export_run_to_onnx(
    run_dir: str | Path,
    opset: int | None = None,
    export_cfg: ExportConfig | None = None,
    device: torch.device | None = None,
    show_progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """<run_dir>/checkpoints/best_model.pth -> best_model.onnx (+ .json) via `kdlab.export.pipeline`, scored on
    `export.accuracy_images` validation images on `device` (see `validation_scorer`). `export_cfg` (e.g. the
    runner's resolved config's, with --quantize) replaces the checkpoint's `export` section."""
    from kdlab.export.pipeline import export_run_to_onnx as export_with

    checkpoint = Path(run_dir) / "checkpoints" / "best_model.pth"
    config = load_checkpoint(checkpoint).get("config") if checkpoint.is_file() else None
    exporter = task_of(config).exporter()
    score = None
    if exporter is not None and isinstance(config, dict):
        cfg = ExperimentConfig.model_validate(config)
        chosen = export_cfg or cfg.export
        score = validation_scorer(cfg, chosen.accuracy_images, device, show_progress)
        split = getattr(score, "split", None)  # a wrapped scorer (tests) may not carry it: no reference then
        score.reference = pytorch_reference(Path(run_dir), chosen.accuracy_images, split)  # type: ignore[attr-defined]
        if chosen.latency_runs is not None:
            options.setdefault("latency_runs", chosen.latency_runs)
    return export_with(run_dir, exporter, opset=opset, score=score, export_cfg=export_cfg, **options)


def pytorch_reference(run_dir: Path, max_images: int | None, split: str | None) -> dict[str, Any] | None:
    """The PyTorch side of the ONNX accuracy check without a second pass: the run's own test pass
    (summary.json `test_metrics`) scored best_model.pth on the same whole test split with the same evaluator.
    Only when that pass ran in float32 (amp off: the scorer never autocasts) and the scorer uses the whole
    split; else None (the scorer then scores the PyTorch model itself)."""
    if split != "test" or max_images is not None:
        return None
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    metrics = summary.get("test_metrics")
    return metrics if isinstance(metrics, dict) and summary.get("amp") == "off" else None


def export_record(meta: dict[str, Any]) -> dict[str, Any]:
    """What a run's record (summary.json's `export`, experiment_runs.json) keeps of an export's metadata."""
    return {
        "ok": True,
        "parity_max_abs_diff": meta["parity"]["max_abs_diff"],
        "onnx_ms_per_image": meta["latency"]["onnx_ms_per_image_median"],
        "exporter": meta["exporter"],
        "precision": meta["precision"],
        "scored_on": (meta.get("accuracy") or {}).get("device"),
        "scored_split": (meta.get("accuracy") or {}).get("split"),
    }


def failed_export_record(exc: BaseException) -> dict[str, Any]:
    return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
