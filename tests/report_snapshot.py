"""Snapshot of the comparison report for fabricated run directories, to check that a refactoring of the report
keeps its output: `uv run python tests/report_snapshot.py OUT` writes, per case, the report files
(experiment_comparison.{md,csv,json}, experiment_comparison_runs.csv, the PNGs) plus rows.json (the rows of
`collect_rows` and of `aggregate_rows`, floats as repr). Run it before and after, then
`diff -r --exclude='*.png' BEFORE AFTER`. Not a test (pytest does not collect it): the MAC counts depend on
the installed torch/timm.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from kdlab.config.schema import ExperimentConfig
from kdlab.experiments import report
from kdlab.experiments.report import RunRecord, collect_rows, write_report

SEG_MODEL = {"roi_size": (16, 12), "mask_size": (32, 24), "head_channels": 16}
SEG_METRICS = ("target_iou", "miou", "iou_background", "iou_target", "iou_other", "boundary_f1")
CLS_METRICS = ("top1", "top5", "ece", "loss")


def seg_config(encoder: str) -> dict[str, Any]:
    return {"model": {"encoder": encoder, **SEG_MODEL}, "data": {"input_size": (64, 64)}}


def cls_config(model: str) -> dict[str, Any]:
    return {
        "task": "classification",
        "model": {"name": model, "num_classes": 10},
        "data": {"classification": {"source": "digits", "image_size": 16}},
    }


def seq_config(hidden: int, layers: int) -> dict[str, Any]:
    return {
        "task": "sequence",
        "model": {"name": "gru", "hidden_size": hidden, "num_layers": layers, "num_classes": 8},
        "data": {"sequence": {"input_dim": 8, "seq_len": 48}},
        "training": {"channels_last": False},
    }


def fabricate(
    root: Path,
    name: str,
    base: dict[str, Any],
    headline_values: list[float],
    metrics: tuple[str, ...],
    teacher: Path | None = None,
    params: int = 1_234_567,
    onnx_meta: dict[str, Any] | None = None,
    drop_task_key: bool = False,
) -> Path:
    run = root / name
    (run / "logs").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    cfg = {**base, "name": name}
    if teacher is not None:
        cfg["distillation"] = {
            "enabled": True,
            "teacher_checkpoint": str(teacher / "checkpoints" / "best_model.pth"),
        }
        if cfg.get("task") == "sequence":
            cfg["distillation"]["alpha"] = 0.7
    config = ExperimentConfig.model_validate(cfg).model_dump(mode="json")
    if drop_task_key:
        config.pop("task")  # a config.json from before the task key existed
    (run / "config.json").write_text(json.dumps(config))
    best = max(range(len(headline_values)), key=lambda i: headline_values[i])
    with (run / "logs" / "metrics.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, ["epoch", "step", "train_loss", "lr", *(f"val_{m}" for m in metrics)])
        writer.writeheader()
        for i, v in enumerate(headline_values):
            row = {"epoch": i + 1, "step": 10 * (i + 1), "train_loss": 2.0 / (i + 1) + v / 7, "lr": 1e-3}
            row.update({f"val_{m}": round(v - 0.013 * k + i / 97, 6) for k, m in enumerate(metrics)})
            writer.writerow(row)
    summary = {
        "status": "completed",
        "best_epoch": best + 1,
        "final_metrics": {m: headline_values[-1] for m in metrics},
        "params": {"total": params},
        "timings": {"train_seconds": 61.5 * len(headline_values)},
    }
    (run / "summary.json").write_text(json.dumps(summary))
    if onnx_meta is not None:
        (run / "checkpoints" / "best_model.onnx.json").write_text(json.dumps(onnx_meta))
    return run


def trio_case(root: Path, kind: str, seeds: tuple[int, ...] | None) -> list[RunRecord]:
    """Teacher, baseline and distilled student of one task; over `seeds` when given (plus a failed seed)."""
    metrics, teacher_cfg, student_cfg = {
        "seg": (SEG_METRICS, seg_config("timm-efficientnet-b3"), seg_config("timm-efficientnet-b0")),
        "cls": (CLS_METRICS, cls_config("resnet18"), cls_config("mobilenetv3_small_100")),
        "seq": (CLS_METRICS, seq_config(32, 2), seq_config(8, 1)),
    }[kind]
    teacher = fabricate(root, "teacher", teacher_cfg, [0.6, 0.81, 0.79], metrics, params=13_160_123,
                        onnx_meta={"onnx_ms_per_image_median": 9.87, "onnx_mb": 52.1})  # fmt: skip
    records = [RunRecord("teacher", teacher, "completed")]
    for k, seed in enumerate(seeds or (None,)):
        suffix = "" if seed is None else f"__seed-{seed}"
        base = fabricate(root, f"base{suffix}", student_cfg, [0.4, 0.5 + k / 50, 0.47], metrics, params=6_250_001,
                         onnx_meta={"latency": {"onnx_ms_per_image_median": 4.2 + k / 10}})  # fmt: skip
        dist = fabricate(root, f"dist{suffix}", student_cfg, [0.5, 0.62 + k / 37, 0.6], metrics, teacher=teacher,
                         params=6_250_001, onnx_meta={"onnx_ms_per_image_median": 4.1, "onnx_mb": 24.5})  # fmt: skip
        records += [RunRecord(base.name, base, "completed"), RunRecord(dist.name, dist, "completed")]
    if seeds:
        records.append(RunRecord(f"dist__seed-{seeds[-1] + 1}", None, "failed", exit_code=1))
    else:
        records.append(RunRecord("never_started", None, "failed", exit_code=2))
    return records


def cases(root: Path) -> dict[str, list[RunRecord]]:
    out = {
        "segmentation_single": trio_case(root / "segmentation_single", "seg", None),
        "segmentation_seeds": trio_case(root / "segmentation_seeds", "seg", (42, 1, 2)),
        "classification_single": trio_case(root / "classification_single", "cls", None),
        "classification_seeds": trio_case(root / "classification_seeds", "cls", (0, 1)),
        "sequence_single": trio_case(root / "sequence_single", "seq", None),
        "sequence_seeds": trio_case(root / "sequence_seeds", "seq", (3, 4, 5)),
    }
    legacy = root / "segmentation_no_task_key"
    t = fabricate(legacy, "t", seg_config("timm-efficientnet-b3"), [0.7], SEG_METRICS, drop_task_key=True)
    s = fabricate(
        legacy, "s", seg_config("timm-efficientnet-b0"), [0.5], SEG_METRICS, teacher=t, drop_task_key=True
    )
    out["segmentation_no_task_key"] = [RunRecord("t", t, "completed"), RunRecord("s", s, "completed")]
    mixed = root / "mixed_tasks"
    a = fabricate(mixed, "seg", seg_config("timm-efficientnet-b0"), [0.5], SEG_METRICS)
    b = fabricate(mixed, "cls", cls_config("resnet18"), [0.9], CLS_METRICS)
    c = fabricate(mixed, "seq", seq_config(8, 1), [0.7], CLS_METRICS)
    out["mixed_tasks"] = [RunRecord(n, d, "completed") for n, d in (("seg", a), ("cls", b), ("seq", c))]
    out["nothing"] = [RunRecord("never_started", None, "failed")]
    return out


def main(out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    runs = out.parent / f"{out.name}_runs"
    if runs.exists():
        shutil.rmtree(runs)
    for name, records in cases(runs).items():
        rows = collect_rows(records)
        write_report(rows, out / name, records)
        dump = {"rows": rows, "aggregated": report.aggregate_rows(rows, records)}
        text = json.dumps(dump, indent=1, default=repr, sort_keys=False)
        (out / name / "rows.json").write_text(text.replace(str(runs), "<runs>") + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
