"""End-to-end: tiny CPU runs through the CLI write the whole run directory, reproduce, resume and refuse."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from kdlab.cli.common import run_cli
from kdlab.cli.train import main as train_main
from tests.helpers import assert_same_weights, error_lines, tiny_args, tree_hashes, weights


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    assert run_cli(train_main, tiny_args(tmp)) == 0
    return tmp, tmp / "runs" / "quickstart_baseline"


def test_run_directory_holds_every_file(trained_run):
    _, run = trained_run
    for rel in [
        "config.json",
        "summary.json",
        "checkpoints/untrained_model.pth",
        "checkpoints/checkpoint_epoch_0001.pth",
        "checkpoints/checkpoint_epoch_0002.pth",
        "checkpoints/last.pth",
        "checkpoints/best_model.pth",
        "logs/metrics.csv",
        "logs/training_log.txt",
        "visualizations/epoch_0001/val_00.png",
        "visualizations/epoch_0002/val_01.png",
    ]:
        assert (run / rel).is_file(), rel
    assert list((run / "logs").glob("events.out.tfevents.*"))
    assert "epoch 2/2" in (run / "logs" / "training_log.txt").read_text()
    assert not list(run.rglob("*.tmp*")), "temporary checkpoint files must not be left behind"


def test_summary_and_metrics_csv(trained_run):
    _, run = trained_run
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["epochs_completed"] == 2
    assert 0.0 <= summary["final_metrics"]["target_iou"] <= 1.0
    assert summary["best_epoch"] in (1, 2)
    assert summary["params"]["unet"] > 6_000_000
    params = summary["params"]
    assert 0 < params["roi_head"] < 1_000_000 and params["unet"] + params["roi_head"] == params["total"]
    rows = list(csv.DictReader((run / "logs" / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for column in (
        "train_loss",
        "train_ce",
        "train_dice",
        "train_bg_fg",
        "train_target",
        "lr",
        "val_target_iou",
        "val_miou",
    ):
        assert rows[-1][column] != "", column
    best_row = rows[summary["best_epoch"] - 1]
    assert float(best_row["val_target_iou"]) == pytest.approx(
        max(float(r["val_target_iou"]) for r in rows), rel=1e-4
    )


def test_checkpoint_contents(trained_run):
    _, run = trained_run
    last = torch.load(run / "checkpoints" / "last.pth", map_location="cpu", weights_only=True)
    for key in (
        "model_state_dict",
        "optimizer_state_dict",
        "scheduler_state_dict",
        "scaler_state_dict",
        "rng_state",
        "config",
    ):
        assert key in last, key
    assert last["epoch"] == 2
    best = torch.load(run / "checkpoints" / "best_model.pth", map_location="cpu", weights_only=True)
    assert "optimizer_state_dict" not in best and "model_state_dict" in best
    summary = json.loads((run / "summary.json").read_text())
    assert best["epoch"] == summary["best_epoch"]
    assert best["best_metric"] == pytest.approx(summary["best_metric"])
    untrained = weights(run / "checkpoints" / "untrained_model.pth")
    trained = weights(run / "checkpoints" / "last.pth")
    assert any(not torch.equal(untrained[k], trained[k]) for k in trained), "training must change the weights"


def test_tensorboard_has_loss_components_metrics_and_images(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run = trained_run
    acc = EventAccumulator(str(run / "logs"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/ce", "train/dice", "train/bg_fg", "train/target", "train/lr", "train/grad_norm",
                "train/images_per_sec", "val/target_iou", "val/miou"):  # fmt: skip
        assert tag in scalars, tag
    assert any(t.startswith("val/val_") for t in acc.Tags()["images"])


def test_config_json_reproduces_the_run(trained_run):
    tmp, run = trained_run
    code = run_cli(
        train_main,
        ["--config", str(run / "config.json"), "--output_dir", str(tmp / "again"), "--no_progress"],
    )
    assert code == 0
    assert_same_weights(
        run / "checkpoints" / "last.pth", tmp / "again" / "quickstart_baseline" / "checkpoints" / "last.pth"
    )


def test_resume_after_one_epoch_equals_two_epochs(trained_run):
    tmp, run = trained_run
    copy = tmp / "resumed" / "quickstart_baseline"
    shutil.copytree(run, copy)
    # Pretend the run stopped after epoch 1: its last.pth is the epoch-1 full state.
    shutil.copy(copy / "checkpoints" / "checkpoint_epoch_0001.pth", copy / "checkpoints" / "last.pth")
    assert run_cli(train_main, ["--resume", str(copy / "checkpoints" / "last.pth"), "--no_progress"]) == 0
    assert_same_weights(run / "checkpoints" / "last.pth", copy / "checkpoints" / "last.pth")
    rows = list(csv.DictReader((copy / "logs" / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]


def test_existing_run_directory_is_refused_untouched(trained_run, capsys):
    tmp, run = trained_run
    before = tree_hashes(run)
    assert run_cli(train_main, tiny_args(tmp)) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "--resume" in errors[0]
    assert tree_hashes(run) == before


def test_bad_data_path_fails_before_touching_disk(tmp_path, capsys):
    code = run_cli(train_main, tiny_args(tmp_path, "data.train_annotations=/nope.json"))
    assert code == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "/nope.json" in errors[0]
    assert not (tmp_path / "runs").exists()


def test_test_only_evaluates_best_model(trained_run, capsys):
    tmp, run = trained_run
    capsys.readouterr()
    code = run_cli(train_main, tiny_args(tmp, "--test_only"))
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    # the run has a test split: --test_only scores best_model.pth there, as the run's own test pass did
    assert result["split"] == "test"
    test_metrics = json.loads((run / "summary.json").read_text())["test_metrics"]
    assert result["metrics"]["target_iou"] == pytest.approx(test_metrics["target_iou"], abs=1e-6)
    assert (run / "test_metrics.json").is_file()


def _dataset_with_truncated_image(tmp: Path) -> tuple[Path, Path]:
    from kdlab.data.synthetic import generate_synthetic_people

    ann = generate_synthetic_people(tmp / "broken", 4, seed=3, image_size=(64, 64), show_progress=False)
    victim = tmp / "broken" / "images" / "000002.jpg"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    return ann, victim


@pytest.mark.parametrize("workers", ["0", "1"])
def test_truncated_image_in_a_worker_is_one_clean_error_line(tmp_path, capsys, workers):
    ann, victim = _dataset_with_truncated_image(tmp_path)
    images = str(victim.parent)
    args = tiny_args(
        tmp_path, f"data.train_annotations={ann}", f"data.train_images={images}",
        f"data.val_annotations={ann}", f"data.val_images={images}", f"data.num_workers={workers}",
        epochs=1,
    )  # fmt: skip
    assert run_cli(train_main, args) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "000002.jpg" in errors[0] and "\n" not in errors[0]


def test_skip_bad_images_trains_through_a_truncated_image(tmp_path):
    ann, victim = _dataset_with_truncated_image(tmp_path)
    images = str(victim.parent)
    args = tiny_args(
        tmp_path, f"data.train_annotations={ann}", f"data.train_images={images}",
        f"data.val_annotations={ann}", f"data.val_images={images}", "data.skip_bad_images=true",
        epochs=1,
    )  # fmt: skip
    assert run_cli(train_main, args) == 0
    summary = json.loads((tmp_path / "runs" / "quickstart_baseline" / "summary.json").read_text())
    assert summary["final_metrics"]["images"] == 3  # the truncated one was skipped


def test_extending_a_finished_run_does_not_raise_the_learning_rate(trained_run):
    tmp, run = trained_run
    copy = tmp / "extended" / "quickstart_baseline"
    shutil.copytree(run, copy)
    args = ["--resume", str(copy / "checkpoints" / "last.pth"), "--epochs", "3", "--no_progress"]
    assert run_cli(train_main, args) == 0
    rows = list(csv.DictReader((copy / "logs" / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(copy / "logs"), size_guidance={"scalars": 0})
    acc.Reload()
    by_step = {e.step: e.value for e in acc.Scalars("train/lr")}  # logged every step (log_every_steps=1)
    resume_step = int(rows[1]["step"])
    after = [v for step, v in by_step.items() if step > resume_step]
    assert after and max(after) <= by_step[resume_step] * (1 + 1e-6), by_step
    assert json.loads((copy / "summary.json").read_text())["epochs_completed"] == 3


def test_bf16_autocast_trains_on_cpu(tmp_path, monkeypatch):
    """training.amp=bf16 on CPU: every training forward runs under bf16 autocast, the losses stay finite, the
    fp32 master weights move, and the run writes its checkpoints and a finite validation metric."""
    import math

    from kdlab.models.roi_unet import RoiUNet

    seen: list[tuple[bool, torch.dtype]] = []
    real_forward = RoiUNet.forward

    def recording_forward(self, *args, **kwargs):
        if self.training:
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(RoiUNet, "forward", recording_forward)
    assert (
        run_cli(train_main, tiny_args(tmp_path, "training.amp=bf16", "training.num_vis_images=0", epochs=1))
        == 0
    )
    assert len(seen) == 2  # 8 images, batch 4
    assert all(s == (True, torch.bfloat16) for s in seen), seen
    run = tmp_path / "runs" / "quickstart_baseline"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["amp"] == "bfloat16"
    assert summary["timings"]["nonfinite_steps_skipped"] == 0
    (row,) = list(csv.DictReader((run / "logs" / "metrics.csv").open()))
    for column in ("train_loss", "train_ce", "train_dice", "val_target_iou"):
        assert math.isfinite(float(row[column])), column
    for name in ("last.pth", "best_model.pth", "checkpoint_epoch_0001.pth"):
        assert (run / "checkpoints" / name).is_file(), name
    untrained, trained = (
        weights(run / "checkpoints" / "untrained_model.pth"),
        weights(run / "checkpoints" / "last.pth"),
    )
    assert all(v.dtype == torch.float32 for k, v in trained.items() if v.is_floating_point())
    assert all(torch.isfinite(v).all() for v in trained.values() if v.is_floating_point())
    assert any(not torch.equal(untrained[k], trained[k]) for k in trained)
