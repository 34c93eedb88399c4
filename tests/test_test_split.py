"""The held-out test split: chosen on val, reported on test.

Config keys and their one-line errors, the synthetic test split (deterministic, disjoint, leaving train/val
byte-identical), the digits and sequence test splits, and a tiny people run whose summary.json test_metrics
and logs/test_per_image.npz match scoring best_model.pth on the test images directly, also after a resume
of the finished run, with --test_only and in the ONNX export's accuracy record.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from kdlab.cli.common import run_cli
from kdlab.cli.train import main as train_main
from kdlab.config.loader import resolve_config, validate_config
from kdlab.config.schema import ClassificationDataConfig, ExperimentConfig
from kdlab.data.loaders import (
    SYNTHETIC_TEST_SEED_OFFSET,
    build_loader,
    build_test_dataset,
    resolve_data_paths,
)
from kdlab.errors import ConfigError
from kdlab.evaluate.evaluator import PerImageRows, SegmentationEvaluator, per_image_arrays
from kdlab.evaluate.metrics import CLASS_NAMES, confusion_matrix, per_roi_class_counts
from kdlab.tasks import model_from_checkpoint, task_of
from tests.helpers import error_lines, tiny_args, tree_hashes

TEST_IMAGES = 3
TEST_ARGS = (f"data.synthetic.test_images={TEST_IMAGES}", "training.num_vis_images=0")


# ----------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("given", ["test_annotations", "test_images"])
def test_one_test_key_alone_is_a_config_error_naming_both(given: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate_config({"data": {given: "somewhere"}})
    message = str(err.value)
    assert "\n" not in message
    assert "data.test_annotations" in message and "data.test_images" in message
    both = validate_config({"data": {"test_annotations": "a.json", "test_images": "imgs"}})
    assert (both.data.test_annotations, both.data.test_images) == ("a.json", "imgs")
    assert validate_config({}).data.test_annotations is None


def test_train_cli_exits_2_with_one_line_when_one_test_key_is_missing(tmp_path: Path, capsys) -> None:
    code = run_cli(train_main, tiny_args(tmp_path, "data.test_images=/somewhere"))
    assert code == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1
    assert "data.test_annotations" in errors[0] and "data.test_images" in errors[0]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()


def test_val_plus_test_fraction_must_leave_training_data() -> None:
    with pytest.raises(ConfigError, match="data.classification.test_fraction"):
        validate_config({"data": {"classification": {"val_fraction": 0.5, "test_fraction": 0.5}}})


# ----------------------------------------------------------------------------------------------- synthetic
def _people_config(root: Path, test_images: int) -> ExperimentConfig:
    return ExperimentConfig(
        data={
            "synthetic": {"root": str(root), "train_images": 4, "val_images": 3, "test_images": test_images,
                          "image_size": (64, 64)},
            "input_size": (64, 64),
        },
        model={"mask_size": (32, 24)},
    )  # fmt: skip


def _image_hashes(directory: Path) -> set[str]:
    return {hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.glob("*.jpg")}


def test_synthetic_test_split_is_deterministic_disjoint_and_leaves_train_val_alone(tmp_path: Path) -> None:
    without = resolve_data_paths(_people_config(tmp_path / "a", 0).data)
    assert without.test_annotations is None and without.test_images is None
    assert not list((tmp_path / "a").glob("test_*"))
    with_test = resolve_data_paths(_people_config(tmp_path / "b", 3).data)
    again = resolve_data_paths(_people_config(tmp_path / "c", 3).data)
    # train/ and val/ are byte-identical with and without a test split
    for split in ("train", "val"):
        a = getattr(without, f"{split}_annotations").parent
        b = getattr(with_test, f"{split}_annotations").parent
        assert a.name == b.name and tree_hashes(a) == tree_hashes(b)
    # the test split: its own seed stream, deterministic, no image shared with train or val
    assert with_test.test_annotations is not None and with_test.test_images is not None
    info = json.loads(with_test.test_annotations.read_text())["info"]
    assert info["seed"] == SYNTHETIC_TEST_SEED_OFFSET and info["num_images"] == 3
    assert again.test_annotations is not None
    assert tree_hashes(with_test.test_annotations.parent) == tree_hashes(again.test_annotations.parent)
    test_hashes = _image_hashes(with_test.test_images)
    assert len(test_hashes) == 3
    assert not test_hashes & (_image_hashes(with_test.train_images) | _image_hashes(with_test.val_images))


# ----------------------------------------------------------------------------------------------- other tasks
def _rows(images: torch.Tensor, labels: torch.Tensor) -> Counter:
    return Counter((img.numpy().tobytes(), int(y)) for img, y in zip(images, labels, strict=True))


def test_digits_test_fraction_is_a_disjoint_stratified_split_and_zero_keeps_todays_split() -> None:
    from kdlab.data.classification import (
        load_digits_images,
        load_image_sets,
        load_image_splits,
        split_off_test,
        stratified_split,
    )

    # today's split, as the code before the test split made it
    full = load_digits_images(32)
    train_idx, val_idx = stratified_split(full.labels.numpy(), 0.2, 0)
    today_train, today_val = full.subset(train_idx), full.subset(val_idx)

    train0, val0 = load_image_sets(ClassificationDataConfig(test_fraction=0.0))
    assert torch.equal(train0.images, today_train.images) and torch.equal(train0.labels, today_train.labels)
    assert torch.equal(val0.images, today_val.images) and torch.equal(val0.labels, today_val.labels)
    assert "test" not in load_image_splits(ClassificationDataConfig(test_fraction=0.0))

    splits = load_image_splits(ClassificationDataConfig(test_fraction=0.2))
    train, val, test = splits["train"], splits["val"], splits["test"]
    assert torch.equal(val.images, today_val.images)  # val picks the checkpoint: unchanged
    assert len(train.labels) + len(val.labels) + len(test.labels) == len(full.labels)
    # train and test partition today's training part exactly (as a multiset of images and labels)
    assert _rows(train.images, train.labels) + _rows(test.images, test.labels) == _rows(
        today_train.images, today_train.labels
    )
    # index level: disjoint, and stratified: per class round(class total * 0.2)
    labels = today_train.labels.numpy()
    totals = np.bincount(full.labels.numpy(), minlength=10)
    keep, held = split_off_test(labels, totals, 0.2, 0)
    assert not set(keep.tolist()) & set(held.tolist())
    assert sorted([*keep.tolist(), *held.tolist()]) == list(range(len(labels)))
    assert np.array_equal(np.bincount(labels[held], minlength=10), np.round(totals * 0.2).astype(int))
    assert np.array_equal(np.bincount(test.labels.numpy(), minlength=10), np.round(totals * 0.2).astype(int))
    # deterministic
    assert torch.equal(
        load_image_splits(ClassificationDataConfig(test_fraction=0.2))["test"].images, test.images
    )


def test_classification_and_sequence_tasks_build_their_test_split(tmp_path: Path) -> None:
    digits = validate_config({"task": "classification", "model": {"name": "test_resnet"}})
    assert task_of(digits).build_test_dataset(digits) is None
    with_test = validate_config(
        {"task": "classification", "model": {"name": "test_resnet"},
         "data": {"classification": {"test_fraction": 0.1}}}
    )  # fmt: skip
    test = task_of(with_test).build_test_dataset(with_test)
    assert test is not None and not test.augment
    from kdlab.data.classification import load_image_splits

    assert torch.equal(test.images, load_image_splits(with_test.data.classification)["test"].images)

    def sequence(test_samples: int, name: str) -> ExperimentConfig:
        return validate_config({
            "task": "sequence", "model": {"name": "gru", "num_classes": 3},
            "data": {"sequence": {"path": str(tmp_path / name), "train_samples": 12, "val_samples": 6,
                                  "test_samples": test_samples, "seq_len": 8}},
        })  # fmt: skip

    assert task_of(sequence(0, "none.h5")).build_test_dataset(sequence(0, "none.h5")) is None
    cfg = sequence(5, "test.h5")
    test = task_of(cfg).build_test_dataset(cfg)
    assert len(test) == 5 and test[0]["inputs"].shape == (8, cfg.data.sequence.input_dim)


# ----------------------------------------------------------------------------------------------- per image
def test_per_roi_counts_sum_to_the_confusion_matrix_iou_terms() -> None:
    gen = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 3, (7, 5, 4), generator=gen)
    target = torch.randint(0, 3, (7, 5, 4), generator=gen)
    inter, union = per_roi_class_counts(pred, target, 3)
    cm = confusion_matrix(pred, target, 3)
    assert inter.shape == union.shape == (7, 3)
    assert torch.equal(inter.sum(0), cm.diagonal())
    assert torch.equal(union.sum(0), cm.sum(0) + cm.sum(1) - cm.diagonal())
    # one ROI by hand: class c's intersection and union
    p, t = pred[2], target[2]
    for c in range(3):
        assert inter[2, c] == ((p == c) & (t == c)).sum() and union[2, c] == ((p == c) | (t == c)).sum()


def test_per_image_rows_of_several_ranks_land_in_dataset_order() -> None:
    """Under DDP rank r evaluates positions r, r + W, ...: the gathered rows go back to their positions."""
    parts = []
    for rank in range(2):
        rows = PerImageRows()
        positions = list(range(rank, 5, 2))
        rows.positions = positions
        rows.image_ids = [100 + p for p in positions]
        rows.intersection = [torch.tensor([[p, 0, 1] for p in positions])]
        rows.union = [torch.tensor([[p + 1, 2, 3] for p in positions])]
        parts.append(rows)
    arrays = per_image_arrays(parts, 5, 3)
    assert arrays["intersection"].dtype == np.float64 and arrays["intersection"].shape == (5, 3)
    assert arrays["intersection"][:, 0].tolist() == [0, 1, 2, 3, 4]
    assert arrays["union"][:, 0].tolist() == [1, 2, 3, 4, 5]
    assert arrays["image_ids"].tolist() == [100, 101, 102, 103, 104]
    assert arrays["class_names"].tolist() == list(CLASS_NAMES)


# ----------------------------------------------------------------------------------------------- people run
@pytest.fixture(scope="module")
def people_run(tmp_path_factory):
    """A 1-epoch tiny people run with a 3-image synthetic test split."""
    tmp = tmp_path_factory.mktemp("test_split")
    assert run_cli(train_main, tiny_args(tmp, *TEST_ARGS, epochs=1)) == 0
    return tmp, tmp / "runs" / "quickstart_baseline"


def _direct_test_metrics(run: Path) -> tuple[dict[str, float], dict[str, np.ndarray], list]:
    """best_model.pth scored on the test images with a freshly built evaluator (no trainer involved)."""
    cfg = resolve_config(str(run / "config.json"))
    test = build_test_dataset(cfg)
    assert test is not None
    model, _, _ = model_from_checkpoint(run / "checkpoints" / "best_model.pth", "checkpoint")
    loader = build_loader(test, 2, shuffle=False, seed=0, num_workers=0, pin_memory=False)
    evaluator = SegmentationEvaluator(loader, torch.device("cpu"), roi_margin=cfg.model.roi_margin)
    evaluator.collect_per_image = True
    metrics, _ = evaluator(model, desc="test")
    assert evaluator.per_image is not None
    return metrics, evaluator.per_image, [r.image_id for r in test.records]


def _same_metrics(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if a[key] is None or (isinstance(a[key], float) and math.isnan(a[key])):
            assert b[key] is None or math.isnan(b[key]), key
        else:
            assert a[key] == pytest.approx(b[key], abs=1e-9), key


def test_summary_reports_best_model_on_the_test_split(people_run) -> None:
    _, run = people_run
    summary = json.loads((run / "summary.json").read_text())
    best = torch.load(run / "checkpoints" / "best_model.pth", map_location="cpu", weights_only=True)
    assert summary["test"] == {"images": TEST_IMAGES, "checkpoint": "checkpoints/best_model.pth",
                               "epoch": best["epoch"], "selected_on": "val"}  # fmt: skip
    assert summary["test"]["epoch"] == summary["best_epoch"]
    direct, _, _ = _direct_test_metrics(run)
    _same_metrics(summary["test_metrics"], direct)
    assert summary["test_metrics"]["images"] == TEST_IMAGES != summary["final_metrics"]["images"]
    log_text = (run / "logs" / "training_log.txt").read_text()
    assert f"test: miou {direct['miou']:.4f} on {TEST_IMAGES} test images (checkpoint of epoch" in log_text


def test_per_image_sums_add_up_to_the_reported_test_ious(people_run) -> None:
    _, run = people_run
    summary = json.loads((run / "summary.json").read_text())
    with np.load(run / "logs" / "test_per_image.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    inter, union = arrays["intersection"], arrays["union"]
    assert inter.dtype == union.dtype == np.float64
    assert inter.shape == union.shape == (TEST_IMAGES, len(CLASS_NAMES))
    assert (inter <= union).all() and union.sum() > 0
    totals_i, totals_u = inter.sum(axis=0), union.sum(axis=0)
    ious = np.where(totals_u > 0, totals_i / np.maximum(totals_u, 1), np.nan)
    test_metrics = summary["test_metrics"]
    for c, name in enumerate(CLASS_NAMES):
        reported = test_metrics[f"iou_{name}"]
        if reported is None:
            assert math.isnan(ious[c])
        else:
            assert ious[c] == pytest.approx(reported, abs=1e-12)
    assert float(np.nanmean(ious)) == pytest.approx(test_metrics["miou"], abs=1e-12)
    # the test set's fixed order: row i is the i-th image of the test annotations, as a fresh evaluation gives
    _, direct_rows, image_ids = _direct_test_metrics(run)
    assert arrays["image_ids"].tolist() == image_ids
    assert np.array_equal(direct_rows["intersection"], inter) and np.array_equal(direct_rows["union"], union)


def test_resumed_finished_run_evaluates_on_test_again(people_run, tmp_path: Path) -> None:
    tmp, run = people_run
    shutil.copytree(tmp / "data", tmp_path / "data")
    copy = tmp_path / "runs" / run.name
    shutil.copytree(run, copy)
    original = json.loads((copy / "summary.json").read_text())
    cut = {
        k: v for k, v in original.items() if k not in ("test_metrics", "test")
    }  # killed during the test pass
    (copy / "summary.json").write_text(json.dumps(cut))
    (copy / "logs" / "test_per_image.npz").unlink()
    before = (copy / "checkpoints" / "best_model.pth").read_bytes()

    assert run_cli(train_main, tiny_args(tmp_path, *TEST_ARGS, "--resume", "auto", epochs=1)) == 0
    resumed = json.loads((copy / "summary.json").read_text())
    assert resumed["status"] == "completed" and resumed["epochs_completed"] == 1
    assert resumed["test"] == original["test"]
    _same_metrics(resumed["test_metrics"], original["test_metrics"])
    assert (copy / "logs" / "test_per_image.npz").is_file()
    assert (copy / "checkpoints" / "best_model.pth").read_bytes() == before  # nothing trained again


def test_test_only_scores_the_test_split(people_run, capsys) -> None:
    tmp, run = people_run
    capsys.readouterr()
    assert run_cli(train_main, tiny_args(tmp, *TEST_ARGS, "--test_only", epochs=1)) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "test"
    summary = json.loads((run / "summary.json").read_text())
    _same_metrics(
        {k: v for k, v in result["metrics"].items()},
        {k: (math.nan if v is None else v) for k, v in summary["test_metrics"].items()},
    )
    assert json.loads((run / "test_metrics.json").read_text())["split"] == "test"


def test_export_scores_the_onnx_file_on_the_test_split(people_run, tmp_path: Path) -> None:
    from kdlab.experiments import export_runs

    _, run = people_run
    copy = tmp_path / run.name
    shutil.copytree(run, copy)
    meta = export_runs.export_run_to_onnx(copy, show_progress=False)
    assert meta["accuracy"]["split"] == "test" and meta["accuracy"]["images"] == TEST_IMAGES
    assert export_runs.export_record(meta)["scored_split"] == "test"
    summary = json.loads((run / "summary.json").read_text())
    assert meta["accuracy"]["pytorch"]["miou"] == pytest.approx(summary["test_metrics"]["miou"], abs=1e-6)
    # without a test split the export is scored on val, and says so
    cfg = resolve_config(str(run / "config.json"), ["data.synthetic.test_images=0"])
    assert export_runs.validation_scorer(cfg, show_progress=False).split == "val"


def test_ddp_test_pass_gathers_every_rank_in_image_order(people_run, tmp_path: Path) -> None:
    """Two torchrun ranks each score their shard of the test images (positions 0, 2 and 1): the reduced metrics
    and the gathered per-image rows equal one process scoring best_model.pth on all of them, in order."""
    import os
    import subprocess
    import sys

    tmp, _ = people_run
    shutil.copytree(tmp / "data", tmp_path / "data")
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(root / "train_advanced.py"), *tiny_args(tmp_path, *TEST_ARGS, epochs=1)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "quickstart_baseline"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["test"]["images"] == TEST_IMAGES
    direct, rows, image_ids = _direct_test_metrics(run)
    _same_metrics(summary["test_metrics"], direct)
    with np.load(run / "logs" / "test_per_image.npz") as npz:
        assert npz["image_ids"].tolist() == image_ids
        assert np.array_equal(npz["intersection"], rows["intersection"])
        assert np.array_equal(npz["union"], rows["union"])


def test_per_image_sums_stay_on_the_device_of_the_logits() -> None:
    """On `meta` (see tests/test_device_paths.py) a CPU index meeting device counts raises as on CUDA."""
    meta = torch.device("meta")
    rows = PerImageRows()
    raw = {"rois": torch.tensor([[0, 0, 0, 8, 8], [1, 0, 0, 8, 8], [1, 2, 2, 6, 6.0]]),
           "images": torch.zeros(2, 3, 16, 16, dtype=torch.uint8), "indices": [4, 5], "image_ids": [7, 9]}  # fmt: skip
    logits = torch.empty(3, 3, 8, 6, device=meta)
    masks = torch.empty(3, 8, 6, dtype=torch.uint8, device=meta)
    rows.add(raw, logits, masks, 3)
    assert rows.intersection[0].device == meta and rows.intersection[0].shape == (2, 3)
    assert rows.union[0].device == meta and rows.positions == [4, 5] and rows.image_ids == [7, 9]
