"""Classifier distillation end to end on tiny CPU runs: the digits suite, a student sweep, ONNX, resume, errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from kdlab.cli.common import run_cli
from kdlab.cli.experiments import main as experiments_main
from kdlab.cli.train import main as train_main
from tests.helpers import assert_same_weights, error_lines

TINY = [
    "data.classification.image_size=16",
    "data.classification.max_train_samples=64",
    "data.classification.val_fraction=0.1",
    "training.log_every_steps=1",
    "export.exporter=torchscript",  # the runner's children export: see tests/test_runner.py TINY_SET
    "export.latency_runs=1",
]


def suite_args(out: Path, *extra: str) -> list[str]:
    return [
        "--epochs",
        "1",
        "--batch_size",
        "32",
        "--device",
        "cpu",
        "--output_dir",
        str(out),
        "--set",
        *TINY,
        *extra,
    ]


@pytest.fixture(scope="module")
def digits_suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "runs"
    code = run_cli(experiments_main, ["--configs", "digits", *suite_args(out)])
    return code, out


def test_digits_suite_trains_distils_exports_and_reports_top1(digits_suite):
    code, out = digits_suite
    assert code == 0
    runs = json.loads((out / "experiment_runs.json").read_text())
    assert [r["name"] for r in runs] == [
        "digits_teacher",
        "digits_student_baseline",
        "digits_student_distill",
    ]
    assert all(r["status"] == "completed" and r["export"]["ok"] for r in runs)
    summary = json.loads((out / "digits_student_distill" / "summary.json").read_text())
    assert summary["best_metric_name"] == "top1" and summary["task"] == "distillation"
    assert 0.0 <= summary["teacher_metrics"]["top1"] <= 1.0
    assert {"top1", "top5", "ece", "loss"} <= set(summary["final_metrics"])
    rows = list(csv.DictReader((out / "experiment_comparison.csv").open()))
    assert list(rows[0]) == ["experiment", "status", "role", "model", "params_m", "macs_m", "top1", "top5", "ece",
                             "best_epoch", "split", "train_time_min", "onnx_latency_ms", "onnx_mb", "onnx_top1",
                             "int8_top1", "int8_latency_ratio", "int8_shipped", "pct_of_teacher", "gap_closed",
                             "teacher_lead_note"]  # fmt: skip
    assert [r["role"] for r in rows] == ["teacher", "student", "distilled"]
    assert [r["model"] for r in rows] == ["resnet18", "mobilenetv3_small_100", "mobilenetv3_small_100"]
    assert float(rows[0]["pct_of_teacher"]) == pytest.approx(100.0)
    assert all(r["top1"] and r["onnx_latency_ms"] for r in rows)
    # The exported file, scored by the same evaluator on the whole validation set, matches the checkpoint.
    assert all(abs(float(r["onnx_top1"]) - float(r["top1"])) <= 0.01 for r in rows)
    assert not any(r["int8_top1"] for r in rows)  # no export.quantize: no INT8 model
    assert "| top-1 |" in (out / "experiment_comparison.md").read_text().replace("  ", " ").replace("  ", " ")


def test_classifier_onnx_export_matches_pytorch(digits_suite):
    _, out = digits_suite
    meta = json.loads((out / "digits_student_distill" / "checkpoints" / "best_model.onnx.json").read_text())
    assert meta["parity_ok"] is True and meta["parity"]["num_images"] >= 8
    assert meta["parity"]["max_abs_diff"] <= 1e-3
    assert meta["outputs"]["logits"]["shape"] == ["batch", 10]
    assert meta["inputs"]["images"]["shape"] == ["batch", 3, 16, 16]


def test_sweep_of_student_architectures_lands_in_one_table_with_the_teacher(digits_suite):
    code, out = digits_suite
    assert code == 0
    args = [
        "--configs",
        "digits_student_distill",
        "--sweep",
        "model.name=test_resnet,test_efficientnet",
        "--no_export",
    ]
    assert run_cli(experiments_main, [*args, *suite_args(out)]) == 0
    rows = {r["experiment"]: r for r in csv.DictReader((out / "experiment_comparison.csv").open())}
    swept = ["digits_student_distill__name-test_resnet", "digits_student_distill__name-test_efficientnet"]
    assert set(swept) <= set(rows) and "digits_teacher" in rows
    assert [rows[name]["model"] for name in swept] == ["test_resnet", "test_efficientnet"]
    assert all(rows[name]["role"] == "distilled" for name in swept)
    # one run each, no per-image sums: % of teacher is withheld, with the reason
    assert all(not rows[name]["pct_of_teacher"] and rows[name]["teacher_lead_note"] for name in swept)
    config = json.loads((out / swept[0] / "config.json").read_text())
    assert config["distillation"]["teacher_experiment"] == "digits_teacher"


def single_args(tmp: Path, *extra: str, epochs: int = 2) -> list[str]:
    return ["--config", "digits_student_baseline", "--output_dir", str(tmp / "runs"), "--epochs", str(epochs),
            "--batch_size", "16", "--device", "cpu", "--no_progress", "--set", *TINY, "model.name=test_efficientnet",
            "training.save_every=1", "training.deterministic=true", *extra]  # fmt: skip


def test_resuming_a_classifier_run_equals_an_uninterrupted_one(tmp_path):
    assert run_cli(train_main, single_args(tmp_path, "training.ema.enabled=true")) == 0
    run = tmp_path / "runs" / "digits_student_baseline"
    copy = tmp_path / "resumed" / "digits_student_baseline"
    shutil.copytree(run, copy)
    shutil.copy(copy / "checkpoints" / "checkpoint_epoch_0001.pth", copy / "checkpoints" / "last.pth")
    assert run_cli(train_main, ["--resume", str(copy / "checkpoints" / "last.pth"), "--no_progress"]) == 0
    assert_same_weights(run / "checkpoints" / "last.pth", copy / "checkpoints" / "last.pth")


@pytest.mark.parametrize("problem", ["missing_root", "truncated_image", "model_typo"])
def test_bad_classification_input_is_one_error_line_and_no_run_dir(tmp_path, capsys, problem):
    root = tmp_path / "images"
    extra = [
        "data.classification.source=image_folder",
        f"data.classification.root={root}",
        "model.num_classes=2",
    ]
    if problem == "truncated_image":
        from PIL import Image

        for cls in ("a", "b"):
            (root / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40, 40), (i * 40, 0, 0)).save(root / cls / f"{i}.png")
        data = (root / "b" / "1.png").read_bytes()
        (root / "b" / "1.png").write_bytes(data[: len(data) // 2])
    if problem == "model_typo":
        extra = ["model.name=mobilenetv3_smal_100"]
    assert run_cli(train_main, single_args(tmp_path, *extra)) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1
    needle = {"missing_root": "does not exist", "truncated_image": "could not be decoded",
              "model_typo": "mobilenetv3_small_100"}[problem]  # fmt: skip
    assert needle in lines[0]
    assert not (tmp_path / "runs").exists()
