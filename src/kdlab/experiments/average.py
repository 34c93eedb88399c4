"""Weight averaging of a run's top-k checkpoints (`python -m kdlab.average RUN_DIR`).

`training.save_top_k` keeps `best_model.pth` plus `best_model_top2.pth` ... `best_model_top{k}.pth`; their
float tensors are averaged (uniformly, in float64, cast back) into `checkpoints/averaged_model.pth`, a normal
best-model payload plus `averaged_from`, which is then evaluated on the validation set like the best model.

Integer tensors (BatchNorm's `num_batches_tracked`) are not averaged: they come from the best model. Float
buffers are averaged like weights, BatchNorm's running mean/var included; the average of running variances is
not the variance of the averaged network's activations (the weights moved), so the averaged model's
metrics are what tell whether that matters (SWA-style BN re-estimation is not done).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdlab.atomic_io import write_json_atomic
from kdlab.checkpoints import load_checkpoint, save_checkpoint_atomic
from kdlab.config.loader import validate_config
from kdlab.engine.device import resolve_amp_dtype, resolve_device
from kdlab.errors import CheckpointError, KdlabInputError
from kdlab.tasks import model_from_checkpoint, task_of

log = logging.getLogger(__name__)

BEST_NAME = "best_model.pth"
AVERAGED_NAME = "averaged_model.pth"
_TOP_K = re.compile(r"^best_model_top(\d+)\.pth$")
# Config keys that may differ between checkpoints of one run: --epochs on --resume extends training.epochs.
_CONFIG_KEYS_ALLOWED_TO_DIFFER = (("training", "epochs"),)


def top_k_checkpoints(ckpt_dir: Path) -> list[Path]:
    """best_model.pth, then every best_model_top{n}.pth present, in rank order (n ascending)."""
    best = ckpt_dir / BEST_NAME
    if not best.is_file():
        raise CheckpointError(
            f"{best} does not exist; train the run first (training.save_top_k >= 2 to average)"
        )
    ranked = sorted(
        (int(m.group(1)), p) for p in ckpt_dir.iterdir() if p.is_file() and (m := _TOP_K.match(p.name))
    )
    return [best, *(p for _, p in ranked)]


def _comparable_config(config: Any) -> Any:
    if not isinstance(config, dict):
        return config
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()}
    for section, key in _CONFIG_KEYS_ALLOWED_TO_DIFFER:
        if isinstance(out.get(section), dict):
            out[section].pop(key, None)
    return out


def check_same_model(payloads: list[dict[str, Any]], paths: list[Path]) -> None:
    """Every checkpoint has the first one's keys, tensor shapes/dtypes and config; else CheckpointError naming
    the file that differs."""
    ref_state, ref_path = payloads[0]["model_state_dict"], paths[0]
    ref_config = _comparable_config(payloads[0].get("config"))
    for payload, path in zip(payloads[1:], paths[1:], strict=True):
        state = payload["model_state_dict"]
        missing = [k for k in ref_state if k not in state]
        extra = [k for k in state if k not in ref_state]
        if missing or extra:
            listed = [f"missing {k}" for k in missing[:3]] + [f"unexpected {k}" for k in extra[:3]]
            raise CheckpointError(
                f"cannot average {path.name} with {ref_path.name}: its weights have other keys "
                f"({len(missing)} missing, {len(extra)} unexpected: {', '.join(listed)})"
            )
        for key, ref in ref_state.items():
            value = state[key]
            if tuple(value.shape) != tuple(ref.shape) or value.dtype != ref.dtype:
                raise CheckpointError(
                    f"cannot average {path.name} with {ref_path.name}: {key} is {tuple(value.shape)} {value.dtype} "
                    f"there and {tuple(ref.shape)} {ref.dtype} in {ref_path.name}"
                )
        if _comparable_config(payload.get("config")) != ref_config:
            raise CheckpointError(
                f"cannot average {path.name} with {ref_path.name}: they were trained with different configs"
            )


def average_state_dicts(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Uniform mean of the floating-point tensors (accumulated in float64, cast back to each tensor's dtype);
    other tensors (integer counters) are the first state's. The states must share keys and shapes."""
    if not states:
        raise ValueError("nothing to average")
    out: dict[str, torch.Tensor] = {}
    for key, first in states[0].items():
        if torch.is_floating_point(first):
            total = torch.zeros(first.shape, dtype=torch.float64)
            for state in states:
                total += state[key].detach().to("cpu", torch.float64)
            out[key] = (total / len(states)).to(first.dtype)
        else:
            out[key] = first.detach().cpu().clone()
    return out


@dataclass
class AverageResult:
    path: Path
    averaged_from: list[str]
    metric_name: str
    best_metrics: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] | None = None  # None: not evaluated (--no_eval)
    metrics_path: Path | None = None


def average_checkpoints(paths: list[Path]) -> dict[str, Any]:
    """The averaged payload of `paths` (the first is the best model: its config, epoch and integer buffers)."""
    payloads = [load_checkpoint(p) for p in paths]
    check_same_model(payloads, paths)
    best = payloads[0]
    return {
        "format": best.get("format", "kdlab-checkpoint-v1"),
        "model_state_dict": average_state_dicts([p["model_state_dict"] for p in payloads]),
        "config": best.get("config"),
        "epoch": best.get("epoch"),
        "metrics": {},
        "best_metric": None,
        "averaged_from": [p.name for p in paths],
    }


def _monitored_metric(cfg: Any) -> str:
    """The metric best_model.pth was picked by: `training.monitor` where the config has one, else the task's."""
    return getattr(cfg.training, "monitor", None) or task_of(cfg).best_metric


def evaluate_checkpoint(path: Path, device_name: str, show_progress: bool) -> dict[str, Any]:
    """Rebuild the model a checkpoint describes and evaluate it on the validation set of its config."""
    model, cfg, _ = model_from_checkpoint(path, "averaged model")
    task = task_of(cfg)
    device = resolve_device(device_name)
    # fp16 autocast exists on CUDA only: a run trained in fp16 is evaluated in fp32 on a CPU box
    amp = resolve_amp_dtype(
        "off" if cfg.training.amp == "fp16" and device.type == "cpu" else cfg.training.amp, device
    )
    _, val_set = task.build_datasets(cfg)
    loader = task.build_loader(
        val_set, cfg.training.batch_size, shuffle=False, seed=cfg.training.seed,
        num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda", rank=0, world_size=1,
    )  # fmt: skip
    evaluator = task.build_evaluator(cfg, loader, device, amp, show_progress, True)
    model.to(device)
    metrics, _ = evaluator(model, desc="averaged val")
    return metrics


def average_run(
    run_dir: str | Path,
    out: str | Path | None = None,
    evaluate: bool = True,
    device: str = "auto",
    show_progress: bool = True,
) -> AverageResult:
    """Average a run's best_model.pth and best_model_top*.pth into `out` (default
    checkpoints/averaged_model.pth) and, with `evaluate`, write its validation metrics next to it (.json)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise KdlabInputError(f"run directory {run_dir} does not exist")
    ckpt_dir = run_dir / "checkpoints"
    paths = top_k_checkpoints(ckpt_dir)
    if len(paths) < 2:
        raise CheckpointError(
            f"{ckpt_dir} holds only {BEST_NAME}, nothing to average; train with training.save_top_k >= 2"
        )
    out_path = Path(out) if out is not None else ckpt_dir / AVERAGED_NAME
    if out_path.resolve() in {p.resolve() for p in paths}:
        raise KdlabInputError(f"--out {out_path} would overwrite one of the checkpoints being averaged")
    if not out_path.parent.is_dir():
        raise KdlabInputError(f"--out {out_path}: directory {out_path.parent} does not exist")
    payload = average_checkpoints(paths)
    best = load_checkpoint(paths[0])
    cfg = validate_config(payload["config"], where=f"checkpoint {paths[0]}")
    metric = _monitored_metric(cfg)
    save_checkpoint_atomic(payload, out_path)
    log.info("averaged %s -> %s", ", ".join(payload["averaged_from"]), out_path)
    result = AverageResult(out_path, payload["averaged_from"], metric, dict(best.get("metrics") or {}))
    if not evaluate:
        return result
    metrics = evaluate_checkpoint(out_path, device, show_progress)
    payload["metrics"] = dict(metrics)
    value = metrics.get(metric)
    payload["best_metric"] = float(value) if isinstance(value, (int, float)) else None
    save_checkpoint_atomic(payload, out_path)  # the same weights, now with their metrics
    result.metrics = dict(metrics)
    result.metrics_path = out_path.with_suffix(".json")
    write_json_atomic(
        result.metrics_path,
        {"checkpoint": str(out_path), "averaged_from": result.averaged_from, "metric": metric,
         "metrics": result.metrics, "best_model_metrics": result.best_metrics},
    )  # fmt: skip
    return result
